"""The HTTP service as production meets it, in a subprocess with a real HTTP
client on loopback: bad adapters isolated, hostile requests bounded, TF
Serving REST, labels, live reload, queueing, CLI exit codes."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tfimm
from PIL import Image

import lora_ckpt
from lora_ckpt.serving.store import adapter_path, build_base_model, write_base

from .helpers.http_server import ENV, Server

pytestmark = pytest.mark.slow

CONFIG = {"embed_dim": [8, 16], "nb_blocks": [1, 1], "input_size": [32, 32], "nb_classes": 4}
LORA = {"lora_rank": 2, "lora_train_classifier": False}
LABELS = ["north-west", "north-east", "south-west", "south-east"]


def fill(model, seed, value=None):
    rng = np.random.default_rng(seed)
    for _, layer in lora_ckpt.lora_layers(model):
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            values = rng.normal(0, 0.3, var.shape).astype("float32")
            if value is not None:
                values.flat[0] = value
            var.assign(values)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with two good adapters (one with labels), and a truncated, a NaN
    and a hostile one; the good ones' outputs on ``x`` as references."""
    path = str(tmp_path_factory.mktemp("production") / "store")
    lora_ckpt.tf.keras.utils.set_random_seed(5)
    config = dict(CONFIG, init_scale=1.0)
    write_base(path, "convnext_tiny", config, LORA, tfimm.create_model("convnext_tiny", **config))
    model, _ = build_base_model(path)
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype("float32")
    reference = {}
    for seed, name in enumerate(["good", "labelled"]):
        fill(model, seed)
        labels = LABELS if name == "labelled" else None
        lora_ckpt.save_lora_state(model, adapter_path(path, name), labels=labels)
        reference[name] = model(x).numpy()
    fill(model, 7)
    lora_ckpt.save_lora_state(model, adapter_path(path, "truncated"))
    with open(
        os.path.join(adapter_path(path, "truncated"), "adapter.data-00000-of-00001"), "r+b"
    ) as f:
        f.truncate(64)
    fill(model, 8, value=np.nan)
    lora_ckpt.save_lora_state(model, adapter_path(path, "nan"))
    shutil.copytree(adapter_path(path, "good"), adapter_path(path, "hostile"))
    config_path = os.path.join(adapter_path(path, "hostile"), "adapter_config.json")
    with open(config_path) as handle:
        document = json.load(handle)
    document["checkpoint"]["files"]["../../../../dev/zero"] = {"size": 1 << 30, "sha256": "0"}
    with open(config_path, "w") as handle:
        json.dump(document, handle)
    return {"path": path, "x": x, "reference": reference, "model": model}


@pytest.fixture(scope="module")
def server(store):
    srv = Server(store["path"], "--capacity", "3", "--max-body-bytes", "2000000",
                 "--max-pixels", "1000000", "--request-timeout", "5")  # fmt: skip
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


def predict(server, name, tensor):
    try:
        return httpx.post(
            f"{server.url}/predict/{name}", json={"tensor": tensor.tolist()}, timeout=60
        )
    except httpx.TimeoutException:
        pytest.fail(f"no answer for {name!r} in 60 s; the server:\n{server.stacks()}")


def test_broken_adapters_are_reported_while_good_ones_and_off_serve(server, store):
    x = store["x"]
    for name in ("truncated", "nan", "hostile"):
        response = predict(server, name, x[0])
        assert response.status_code == 422, (name, response.text)
        assert response.json()["error"]["type"] in ("CorruptAdapterError", "AdapterFailedError")
        again = predict(server, name, x[0])  # remembered: not read again until it changes
        assert again.status_code == 422 and again.json()["error"]["type"] == "AdapterFailedError"
    for name in ("good", "labelled"):
        response = predict(server, name, x[0])
        assert response.status_code == 200
        np.testing.assert_allclose(
            response.json()["logits"], store["reference"][name][0], rtol=1e-4, atol=1e-5
        )
    assert predict(server, "off", x[0]).status_code == 200
    failed = httpx.get(f"{server.url}/adapters", timeout=10).json()["failed"]
    assert sorted(failed) == ["hostile", "nan", "truncated"]
    assert "truncated" in failed["truncated"] and "NaN" in failed["nan"]
    assert "dev/zero" in failed["hostile"]
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "lora_failed_adapters 3.0" in metrics
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200


def test_tf_serving_predict_with_three_instances_equals_predict(server, store):
    x = store["x"]
    response = httpx.post(
        f"{server.url}/v1/models/good:predict", json={"instances": x.tolist()}, timeout=60
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    for i in range(3):
        single = predict(server, "good", x[i]).json()["logits"]
        np.testing.assert_allclose(predictions[i], single, rtol=1e-5, atol=1e-6)
    status = httpx.get(f"{server.url}/v1/models/good", timeout=10).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    assert predict(server, "nan", x[0]).status_code == 422  # a load was tried and failed
    broken = httpx.get(f"{server.url}/v1/models/nan", timeout=10).json()
    assert broken["model_version_status"][0]["state"] == "END"
    metadata = httpx.get(f"{server.url}/v1/models/labelled/metadata", timeout=30).json()["metadata"]
    assert metadata["input_shape"] == [32, 32, 3] and metadata["classes"] == 4
    assert metadata["labels"] == LABELS
    assert httpx.get(f"{server.url}/v1/models/missing", timeout=10).status_code == 404


def test_labels_and_top_k_probabilities(server, store):
    answer = predict(server, "labelled", store["x"][1]).json()
    logits = np.asarray(store["reference"]["labelled"][1], np.float64)
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert answer["class"] == int(np.argmax(logits))
    assert answer["label"] == LABELS[answer["class"]]
    assert [entry["class"] for entry in answer["top_k"]] == list(np.argsort(-logits))
    np.testing.assert_allclose(
        [e["probability"] for e in answer["top_k"]], np.sort(probabilities)[::-1], rtol=1e-5
    )
    assert predict(server, "good", store["x"][1]).json()["label"] is None


def test_image_instances_as_b64_match_a_multipart_upload(server):
    buffer = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 90)).save(buffer, "PNG")
    data = buffer.getvalue()
    tfs = httpx.post(
        f"{server.url}/v1/models/good:predict",
        json={"instances": [{"b64": base64.b64encode(data).decode()}]},
        timeout=60,
    )
    upload = httpx.post(f"{server.url}/predict/good", files={"image": ("a.png", data)}, timeout=60)
    assert tfs.status_code == upload.status_code == 200
    np.testing.assert_allclose(tfs.json()["predictions"][0], upload.json()["logits"], rtol=1e-5)


def test_decompression_bomb_is_refused_from_its_header_without_memory_growth(server):
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, "PNG")  # ~400 KB claiming 400 Mpixels
    bomb = buffer.getvalue()
    assert len(bomb) < 2_000_000
    before = server.rss_bytes()
    for _ in range(3):
        response = httpx.post(
            f"{server.url}/predict/good", files={"image": ("b.png", bomb)}, timeout=60
        )
        assert response.status_code == 413, response.text
    assert server.rss_bytes() - before < 256 << 20


def test_chunked_upload_over_the_limit_is_refused_before_it_is_read(server):
    sent = 0

    def body():
        nonlocal sent
        chunk = b"x" * (1 << 20)
        for _ in range(64):  # 64 MiB, chunked: no content-length to refuse up front
            sent += len(chunk)
            yield chunk

    try:
        response = httpx.post(f"{server.url}/predict/good", content=body(), timeout=60)
        assert response.status_code == 413
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still sending
    assert sent < 16 << 20  # refused within the first few MiB, not after 64


@pytest.mark.parametrize(
    "payload, status",
    [
        (b"[" * 100000, 400),  # deeply nested JSON
        (json.dumps({"tensor": [["1"] * 3] * 2}).encode(), 400),  # strings
        (json.dumps({"tensor": True}).encode(), 400),  # a boolean
        (json.dumps({"tensor": np.ones((32, 32, 3)).tolist() + [[0]]}).encode(), 400),  # ragged
        (b'{"tensor": [NaN]}', 400),
        (b"not json", 400),
    ],
)
def test_malformed_input_is_a_400_with_a_json_error(server, payload, status):
    response = httpx.post(
        f"{server.url}/predict/good",
        content=payload,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status
    assert set(response.json()["error"]) == {"type", "message"}


def test_adapter_names_match_exactly(server, store):
    for name in ("good%0a", "good%0A", "..%2Fgood", "good.tmp-1234abcd"):
        assert predict(server, name, store["x"][0]).status_code in (400, 404), name


def test_reload_after_an_overwrite_serves_the_new_version(server, store):
    x, model = store["x"], store["model"]
    path = adapter_path(store["path"], "reloaded")
    fill(model, 11)
    lora_ckpt.save_lora_state(model, path, overwrite=True)
    first = model(x[:1]).numpy()[0]
    assert httpx.post(f"{server.url}/adapters/reloaded", timeout=60).json()["outcome"] == "loaded"
    np.testing.assert_allclose(
        predict(server, "reloaded", x[0]).json()["logits"], first, rtol=1e-4, atol=1e-5
    )
    fill(model, 12)
    lora_ckpt.save_lora_state(model, path, overwrite=True)
    second = model(x[:1]).numpy()[0]
    assert not np.allclose(first, second)
    stale = predict(server, "reloaded", x[0]).json()["logits"]  # not reloaded yet
    np.testing.assert_allclose(stale, first, rtol=1e-4, atol=1e-5)
    assert httpx.post(f"{server.url}/adapters/reloaded", timeout=60).json()["outcome"] == "reloaded"
    np.testing.assert_allclose(
        predict(server, "reloaded", x[0]).json()["logits"], second, rtol=1e-4, atol=1e-5
    )
    assert httpx.post(f"{server.url}/adapters/reloaded", timeout=60).json()["outcome"] == "resident"


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "lora_ckpt.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_exits_non_zero_on_failures(store, tmp_path):
    assert cli("list", str(tmp_path / "missing")).returncode == 1
    broken = cli("inspect", adapter_path(store["path"], "hostile"))
    assert broken.returncode == 1 and "dev/zero" in broken.stderr
    listing = cli("list", store["path"], "--json")
    assert listing.returncode == 0
    entries = {entry["name"]: entry for entry in json.loads(listing.stdout)}
    assert "error" in entries["hostile"] and "error" not in entries["good"]
    for command in ("serve", "export", "list", "inspect", "gc", "demo"):
        help_text = cli(command, "--help").stdout
        flags = [word for word in help_text.split() if word.startswith("--")]
        assert flags, command  # every command documents its flags


def test_export_writes_tf_serving_layout_with_labels_and_preprocessing(store, tmp_path):
    out = tmp_path / "models"
    result = cli(
        "export", "--store", store["path"], "--adapter", "labelled", "--out", str(out),
        "--tf-serving", "--with-preprocessing",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[3/3]" in result.stdout
    version = out / "labelled" / "1"
    assert (version / "saved_model.pb").exists()
    assert (version / "assets" / "labels.txt").read_text().split() == LABELS
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, "PNG")
    script = (
        "import sys, tensorflow as tf; m = tf.saved_model.load(sys.argv[1]);"
        "out = m.signatures['serving_default'](image_bytes=tf.constant([open(sys.argv[2], 'rb').read()]));"
        "print(out['logits'].numpy().tolist())"
    )
    image = tmp_path / "a.png"
    image.write_bytes(buffer.getvalue())
    env = dict(ENV, TF_USE_LEGACY_KERAS="1")
    exported = subprocess.run(
        [sys.executable, "-c", script, str(version), str(image)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr[-2000:]
    served = Server(store["path"], "--capacity", "2")
    try:
        served.wait()
        upload = httpx.post(
            f"{served.url}/predict/labelled",
            files={"image": ("a.png", buffer.getvalue())},
            timeout=60,
        )
    finally:
        served.stop()
    np.testing.assert_allclose(
        json.loads(exported.stdout)[0], upload.json()["logits"], rtol=1e-3, atol=1e-3
    )
