"""`lora-ckpt serve --auth FILE` in a subprocess, with a real HTTP client:
401/403/404/429 as the key file says, SIGHUP re-reads it, TF Serving's
columnar, named-instance, version and metadata shapes, several adapters in
one mixed batch, and no server path in any error body. One server start
over a tiny store; slow."""

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from .helpers.http_server import ENV, Server

pytestmark = pytest.mark.slow


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = [
    {"sha256": digest("acme-key"), "tenant": "acme", "adapters": ["a0", "a1", "broken"]},
    {"sha256": digest("admin-key"), "tenant": "ops", "adapters": ["*"], "admin": True},
    {"sha256": digest("rate-key"), "tenant": "metered", "adapters": ["*"], "rate": 0.2, "burst": 2},
    {"sha256": digest("one-key"), "tenant": "single", "adapters": ["*"], "concurrency": 1},
]
ACME, ADMIN = {"authorization": "Bearer acme-key"}, {"authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from .helpers.scale import make_tiny_store

    path = tmp_path_factory.mktemp("auth-store")
    make_tiny_store(str(path), names=("a0", "a1", "a2", "broken"))
    # An adapter whose config no longer parses: its errors would quote its path.
    (path / "adapters" / "broken" / "adapter_config.json").write_text("{not json")
    return path


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"keys": KEYS}))
    running = Server(str(store), "--auth", str(keys))
    running.keys = keys
    try:
        running.wait()
        yield running
    finally:
        running.stop()


def url(server, path: str) -> str:
    return server.url + path


def x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(3).uniform(-1, 1, (n, 32, 32, 3)).astype("float32")


def png(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_health_and_ready_are_open_and_keys_decide_the_rest(server):
    assert httpx.get(url(server, "/health")).status_code == 200
    ready = httpx.get(url(server, "/ready"))
    assert ready.status_code == 200 and "resident" not in ready.json()
    for headers in ({}, {"authorization": "Bearer nope"}, {"x-api-key": "nope"}):
        response = httpx.get(url(server, "/adapters"), headers=headers)
        assert response.status_code == 401 and "www-authenticate" in response.headers
    assert httpx.get(url(server, "/adapters"), headers={"x-api-key": "acme-key"}).status_code == 200
    # Admin routes: 403 for the tenant, done for the admin.
    for method, path in (("POST", "/adapters/a0"), ("DELETE", "/adapters/a1"), ("GET", "/metrics")):
        response = httpx.request(method, url(server, path), headers=ACME, timeout=60)
        assert response.status_code == 403, path
    assert httpx.post(url(server, "/adapters/a0"), headers=ADMIN, timeout=60).status_code == 200
    assert httpx.get(url(server, "/metrics"), headers=ADMIN).status_code == 200


def test_another_tenants_adapter_does_not_exist_for_a_key(server):
    listing = httpx.get(url(server, "/adapters"), headers=ACME).json()
    assert listing["store"] == ["a0", "a1", "broken"] and listing["tenant"] == "acme"
    assert "a2" not in json.dumps(listing)
    tensor = {"tensor": x(1)[0].tolist()}
    hidden = httpx.post(url(server, "/predict/a2"), json=tensor, headers=ACME, timeout=60)
    missing = httpx.post(url(server, "/predict/zz"), json=tensor, headers=ACME, timeout=60)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"] == missing.json()["error"]["message"].replace(
        "zz", "a2"
    )
    v1 = httpx.post(
        url(server, "/v1/models/a2:predict"), json={"instances": [tensor["tensor"]]}, headers=ACME
    )
    assert v1.status_code == 404
    assert v1.json() == {"error": "Servable not found for request: Latest(a2)"}
    assert httpx.get(url(server, "/v1/models/a2/metadata"), headers=ACME).status_code == 404
    # The admin sees it.
    assert (
        httpx.post(url(server, "/predict/a2"), json=tensor, headers=ADMIN, timeout=60).status_code
        == 200
    )


def test_over_its_rate_a_key_gets_429_with_retry_after(server):
    metered = {"authorization": "Bearer rate-key"}
    statuses = [httpx.get(url(server, "/adapters"), headers=metered).status_code for _ in range(3)]
    assert statuses[:2] == [200, 200] and statuses[2] == 429
    response = httpx.get(url(server, "/adapters"), headers=metered)
    assert response.status_code == 429 and 1 <= int(response.headers["retry-after"]) <= 5
    assert "metered" in response.json()["error"]["message"]


def test_over_its_concurrency_a_key_gets_429(server):
    single = {"x-api-key": "one-key", "content-type": "application/json"}
    body = json.dumps({"tensor": x(1)[0].tolist()}).encode()
    started, results = threading.Event(), {}

    def trickle():  # holds the key's one place while its body arrives
        yield body[:10]
        started.set()
        time.sleep(2.0)
        yield body[10:]

    def slow_request():
        results["slow"] = httpx.post(
            url(server, "/predict/a0"), content=trickle(), headers=single, timeout=60
        )

    thread = threading.Thread(target=slow_request)
    thread.start()
    started.wait(10)
    time.sleep(0.5)
    second = httpx.get(url(server, "/adapters"), headers=single)
    thread.join(60)
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert results["slow"].status_code == 200
    assert httpx.get(url(server, "/adapters"), headers=single).status_code == 200  # released


def test_tf_serving_row_columnar_named_and_b64_instances_agree(server):
    batch = x(2)
    single = [
        httpx.post(
            url(server, "/predict/a0"), json={"tensor": t.tolist()}, headers=ACME, timeout=60
        ).json()["logits"]
        for t in batch
    ]
    forms = {
        "predictions": [
            {"instances": batch.tolist()},
            {"instances": [{"images": t.tolist()} for t in batch]},
        ],
        "outputs": [
            {"inputs": batch.tolist()},
            {"inputs": {"images": batch.tolist()}, "signature_name": "serving_default"},
        ],
    }
    for key, bodies in forms.items():
        for body in bodies:
            response = httpx.post(
                url(server, "/v1/models/a0:predict"), json=body, headers=ACME, timeout=60
            )
            assert response.status_code == 200, response.text
            assert list(response.json()) == [key]
            np.testing.assert_allclose(response.json()[key], single, rtol=1e-5, atol=1e-5)
    images = [png(1), png(2)]
    named = {"instances": [{"image_bytes": {"b64": image}} for image in images]}
    columnar = {"inputs": {"image_bytes": [{"b64": image} for image in images]}}
    row = httpx.post(url(server, "/v1/models/a0:predict"), json=named, headers=ACME, timeout=60)
    col = httpx.post(url(server, "/v1/models/a0:predict"), json=columnar, headers=ACME, timeout=60)
    np.testing.assert_allclose(row.json()["predictions"], col.json()["outputs"], rtol=1e-6)
    other = httpx.post(
        url(server, "/v1/models/a0:predict"),
        json={"signature_name": "classify", "instances": batch.tolist()},
        headers=ACME,
    )
    assert other.status_code == 400 and list(other.json()) == ["error"]


def test_tf_serving_versions_status_and_metadata(server):
    status = httpx.get(url(server, "/v1/models/a0"), headers=ACME, timeout=60).json()
    assert status == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert httpx.get(url(server, "/v1/models/a0/versions/1"), headers=ACME).json() == status
    body = {"instances": x(1).tolist()}
    versioned = httpx.post(
        url(server, "/v1/models/a0/versions/1:predict"), json=body, headers=ACME, timeout=60
    )
    latest = httpx.post(url(server, "/v1/models/a0:predict"), json=body, headers=ACME, timeout=60)
    assert versioned.status_code == 200 and versioned.json() == latest.json()
    for method, path in (
        ("POST", "/v1/models/a0/versions/2:predict"),
        ("GET", "/v1/models/a0/versions/2"),
        ("GET", "/v1/models/a0/versions/2/metadata"),
    ):
        response = httpx.request(method, url(server, path), json=body, headers=ACME)
        assert response.status_code == 404
        assert response.json() == {"error": "Servable not found for request: Specific(a0, 2)"}
    meta = httpx.get(url(server, "/v1/models/a0/versions/1/metadata"), headers=ACME).json()
    assert meta["model_spec"] == {"name": "a0", "signature_name": "", "version": "1"}
    signature = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    dims = signature["inputs"]["images"]["tensor_shape"]["dim"]
    assert [d["size"] for d in dims] == ["-1", "32", "32", "3"]
    assert [d["size"] for d in signature["outputs"]["logits"]["tensor_shape"]["dim"]] == ["-1", "4"]
    assert signature["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert meta["metadata"]["labels"] == [f"a0-{c}" for c in range(4)]


def _batches(server) -> tuple[float, float]:
    text = httpx.get(url(server, "/metrics"), headers=ADMIN).text
    count = float(re.search(r"^lora_batch_size_count (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^lora_batch_size_sum (\S+)$", text, re.M).group(1))
    return count, total


def test_several_adapters_one_input_one_mixed_batch(server):
    batch = x(2)
    for name in ("a0", "a1"):  # resident first: a load would split the batch
        assert (
            httpx.post(url(server, f"/adapters/{name}"), headers=ADMIN, timeout=60).status_code
            == 200
        )
    expected = {
        name: httpx.post(
            url(server, f"/v1/models/{name}:predict"),
            json={"instances": batch.tolist()},
            headers=ACME,
            timeout=60,
        ).json()["predictions"]
        for name in ("a0", "a1")
    }
    before = _batches(server)
    body = {"instances": batch.tolist(), "adapters": ["a0", "a1"]}
    response = httpx.post(url(server, "/v1/adapters:predict"), json=body, headers=ACME, timeout=60)
    after = _batches(server)
    assert response.status_code == 200, response.text
    assert list(response.json()["predictions"]) == ["a0", "a1"]
    for name in ("a0", "a1"):
        np.testing.assert_allclose(
            response.json()["predictions"][name], expected[name], rtol=1e-5, atol=1e-5
        )
    assert (after[0] - before[0], after[1] - before[1]) == (1, 4)  # one batch of 2 x 2
    hidden = {"instances": batch.tolist(), "adapters": ["a0", "a2"]}
    assert (
        httpx.post(url(server, "/v1/adapters:predict"), json=hidden, headers=ACME).status_code
        == 404
    )


def test_no_server_path_in_any_error_body(server, store):
    tensor = {"tensor": x(1)[0].tolist()}
    answers = [
        httpx.post(url(server, "/predict/broken"), json=tensor, headers=ACME, timeout=60),
        httpx.post(
            url(server, "/v1/models/broken:predict"),
            json={"instances": [tensor["tensor"]]},
            headers=ACME,
            timeout=60,
        ),
        httpx.get(url(server, "/v1/models/broken"), headers=ACME, timeout=60),
        httpx.get(url(server, "/adapters"), headers=ACME),
    ]
    assert answers[0].status_code == answers[1].status_code == 422
    assert answers[2].json()["model_version_status"][0]["state"] == "END"
    assert "broken" in answers[3].json()["failed"]
    for response in answers:
        assert str(store) not in response.text and os.path.basename(str(store)) not in response.text
        assert "adapter_config.json" in response.text  # the reason is still there


def test_sighup_reads_the_key_file_again_and_nothing_logs_a_key(server):
    response = httpx.get(url(server, "/adapters"), headers={"x-api-key": "late-key"})
    assert response.status_code == 401
    extra = {"sha256": digest("late-key"), "tenant": "late", "adapters": ["a1"]}
    server.keys.write_text(json.dumps({"keys": [*KEYS, extra]}))
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    listing = httpx.get(url(server, "/adapters"), headers={"x-api-key": "late-key"})
    assert listing.status_code == 200 and listing.json()["store"] == ["a1"]
    log = server.output()
    assert "late" in log  # the reload names its tenants
    for key in ("acme-key", "admin-key", "late-key"):
        assert key not in log and digest(key) not in log


def test_a_non_loopback_host_needs_keys_or_insecure(tmp_path):
    command = [
        sys.executable,
        "-m",
        "lora_ckpt.cli",
        "serve",
        "--store",
        str(tmp_path),
        "--host",
        "0.0.0.0",
    ]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--auth FILE" in done.stderr and "--insecure" in done.stderr


def test_an_overwrite_is_the_next_tf_serving_version(server, store):
    from lora_ckpt import save_lora_state
    from lora_ckpt.serving.store import adapter_path, build_base_model

    from .helpers.scale import vary

    model, _ = build_base_model(str(store))
    vary(model, 77)
    save_lora_state(model, adapter_path(str(store), "a2"), overwrite=True, labels=list("abcd"))
    reload = httpx.post(url(server, "/adapters/a2"), headers=ADMIN, timeout=60)
    assert reload.status_code == 200, reload.text
    body = {"instances": x(1).tolist()}
    second = httpx.post(
        url(server, "/v1/models/a2/versions/2:predict"), json=body, headers=ADMIN, timeout=60
    )
    assert second.status_code == 200, second.text
    first = httpx.post(url(server, "/v1/models/a2/versions/1:predict"), json=body, headers=ADMIN)
    assert first.status_code == 404
    status = httpx.get(url(server, "/v1/models/a2"), headers=ADMIN, timeout=60).json()
    assert status["model_version_status"][0]["version"] == "2"
