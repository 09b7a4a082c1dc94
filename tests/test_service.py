"""The demo, the CLI and the real HTTP service in subprocesses, driven by a
real HTTP client; the exported SavedModel in a process without lora_ckpt.

All slow: every test runs subprocesses (the store fixture trains the demo)."""

import base64
import io
import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import AdapterPool, tf
from lora_ckpt.serving.store import adapter_path, build_base_model, store_adapters
from lora_ckpt.synthetic import make_task_dataset

from .helpers.http_server import ENV, Server

pytestmark = pytest.mark.slow

TASKS = ["color", "stripes", "size"]


def cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "lora_ckpt.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("service") / "store")
    result = cli("demo", "--quick", "--store", path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"path": path, "output": result.stdout}


def test_demo_prints_the_table_and_adapters_beat_the_base(store):
    out = store["output"]
    assert "[1/3]" in out and "epoch 1/" in out  # progress while training
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in TASKS:
            rows[parts[0]] = (float(parts[2]), float(parts[3]))
    assert sorted(rows) == sorted(TASKS)
    for task, (adapter_acc, base_acc) in rows.items():
        assert adapter_acc >= base_acc + 0.25, (task, adapter_acc, base_acc)
    assert store_adapters(store["path"]) == sorted(TASKS)


@pytest.fixture(scope="module")
def reference_pool(store):
    model, _ = build_base_model(store["path"])
    pool = AdapterPool(model, capacity=3)
    for task in TASKS:
        pool.load(task, adapter_path(store["path"], task))
    return pool


def serve(store_path, *extra):
    """``lora-ckpt serve`` on the demo store, with the limits these tests expect."""
    return Server(store_path, "--capacity", "3", "--max-body-bytes", "200000", *extra)


@pytest.fixture(scope="module")
def server(store):
    srv = serve(store["path"])
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


def task_images(task, n=4, seed=7):
    return make_task_dataset(task, n, 32, seed=seed)[0]


def test_predictions_equal_the_pool(server, reference_pool):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for task in TASKS + ["off"]:
            images = task_images(task if task != "off" else "color")
            expected = reference_pool.predict(images, adapter=task)
            for image, want in zip(images, expected, strict=True):
                response = client.post(f"/predict/{task}", json={"tensor": image.tolist()})
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["adapter"] == task and body["class"] == int(np.argmax(want))
                np.testing.assert_allclose(body["logits"], want, rtol=1e-5, atol=1e-5)


def _png(image: np.ndarray) -> bytes:
    pixels = np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return tf.io.encode_png(pixels).numpy()


def test_image_uploads(server, reference_pool):
    image = task_images("color", 1)[0]
    png = _png(image)
    expected_input = tf.cast(tf.io.decode_png(png, channels=3), tf.float32).numpy() / 127.5 - 1.0
    expected = reference_pool.predict(expected_input[None], adapter="color")[0]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        as_json = client.post(
            "/predict/color", json={"image_base64": base64.b64encode(png).decode()}
        )
        as_upload = client.post(
            "/predict/color", files={"image": ("x.png", io.BytesIO(png), "image/png")}
        )
    for response in (as_json, as_upload):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["logits"], expected, rtol=1e-5, atol=1e-5)


def test_jpeg_upload_decodes_like_tensorflow(server, reference_pool):
    # JPEG decoders differ by a few levels per pixel; the service decodes with
    # TensorFlow, as a SavedModel exported --with-preprocessing does.
    image = task_images("size", 1)[0]
    pixels = np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)
    jpeg = tf.io.encode_jpeg(pixels, quality=95).numpy()
    decoded = tf.cast(tf.io.decode_image(jpeg, channels=3), tf.float32).numpy() / 127.5 - 1.0
    expected = reference_pool.predict(decoded[None], adapter="size")[0]
    response = httpx.post(
        server.url + "/predict/size", files={"image": ("x.jpg", jpeg, "image/jpeg")}, timeout=30
    )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["logits"], expected, rtol=1e-5, atol=1e-5)


def test_list_cli(store):
    listed = cli("list", store["path"], "--json")
    assert listed.returncode == 0
    names = [entry["name"] for entry in json.loads(listed.stdout)]
    assert names == sorted(TASKS)
    human = cli("list", store["path"])
    assert all(task in human.stdout for task in TASKS)


def test_concurrent_clients_are_batched_and_correct(server, reference_pool):
    images = {task: task_images(task, 5, seed=11) for task in TASKS}
    expected = {task: reference_pool.predict(images[task], adapter=task) for task in TASKS}
    failures = []

    def client_thread(seed):
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(50):
                task = TASKS[rng.integers(3)]
                i = int(rng.integers(5))
                response = client.post(
                    f"/predict/{task}", json={"tensor": images[task][i].tolist()}
                )
                if response.status_code != 200 or not np.allclose(
                    response.json()["logits"], expected[task][i], rtol=1e-5, atol=1e-5
                ):
                    failures.append((task, response.status_code, response.text[:200]))

    threads = [threading.Thread(target=client_thread, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    metrics = httpx.get(server.url + "/metrics").text
    batches = [line for line in metrics.splitlines() if line.startswith("lora_batch_size_count")]
    samples = [line for line in metrics.splitlines() if line.startswith("lora_batch_size_sum")]
    assert float(samples[0].split()[-1]) > float(
        batches[0].split()[-1]
    )  # some batches held >1 request


def test_bad_input_gets_its_status_and_the_server_keeps_serving(server, reference_pool):
    image = task_images("size", 1)[0]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        cases = [
            (
                client.post(
                    "/predict/size",
                    content=b"{not json",
                    headers={"content-type": "application/json"},
                ),
                400,
            ),
            (client.post("/predict/size", json={"tensor": [[1.0, 2.0]]}), 400),
            (client.post("/predict/size", json={"pixels": []}), 400),
            (client.post("/predict/size", json={"image_base64": "%%%"}), 400),
            (
                client.post(
                    "/predict/size",
                    json={"image_base64": base64.b64encode(b"not an image").decode()},
                ),
                400,
            ),
            (client.post("/predict/.hidden", json={"tensor": image.tolist()}), 400),
            (client.post("/predict/bad%20name", json={"tensor": image.tolist()}), 400),
            (client.post("/adapters/a..b"), 400),
            (
                client.post("/predict/..%2F..%2Fetc", json={"tensor": image.tolist()}),
                404,
            ),  # never a path
            (client.post("/predict/no_such_task", json={"tensor": image.tolist()}), 404),
            (client.post("/adapters/no_such_task"), 404),
            (client.delete("/adapters/no_such_task"), 404),
            (client.post("/predict/size", json={"tensor": np.zeros((160, 160, 3)).tolist()}), 413),
        ]
        for response, status in cases:
            assert response.status_code == status, (status, response.text)
            assert set(response.json()["error"]) == {"type", "message"}
        response = client.post("/predict/size", json={"tensor": image.tolist()})
        assert response.status_code == 200
        np.testing.assert_allclose(
            response.json()["logits"],
            reference_pool.predict(image[None], adapter="size")[0],
            rtol=1e-5,
            atol=1e-5,
        )
        # adapter management
        assert client.delete("/adapters/stripes").status_code == 200
        assert "stripes" not in client.get("/adapters").json()["resident"]
        assert client.post("/adapters/stripes").status_code == 200
        assert client.get("/adapters").json()["store"] == sorted(TASKS)
    metrics = httpx.get(server.url + "/metrics").text
    for name in (
        "lora_requests_total",
        "lora_request_latency_seconds",
        "lora_adapter_loads",
        "lora_adapter_evictions",
        "lora_resident_adapters",
    ):
        assert name in metrics


def test_not_ready_is_503(store):
    srv = serve(store["path"], "--startup-delay", "30")
    try:
        srv.wait("/health")
        response = httpx.post(
            srv.url + "/predict/color", json={"tensor": task_images("color", 1)[0].tolist()}
        )
        assert response.status_code == 503 and "not ready" in response.json()["error"]["message"]
        assert httpx.get(srv.url + "/ready").status_code == 503
    finally:
        srv.stop()


def test_inspect_cli(store):
    path = adapter_path(store["path"], "color")
    human = cli("inspect", path)
    assert (
        human.returncode == 0 and "LoRAConvNeXt" in human.stdout and "kernel_lora_a" in human.stdout
    )
    as_json = json.loads(cli("inspect", path, "--json").stdout)
    assert as_json == lora_ckpt.inspect_adapter(path)
    missing = cli("inspect", path + "_missing")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_exported_savedmodel_matches_the_pool_without_lora_ckpt(store, reference_pool, tmp_path):
    out = tmp_path / "exported"
    result = cli(
        "export",
        "--store",
        store["path"],
        "--adapter",
        adapter_path(store["path"], "stripes"),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = task_images("stripes", 4)
    np.save(tmp_path / "x.npy", images)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(out)!r})\n"
        f"y = m.signatures['serving_default'](images=tf.constant(np.load({str(tmp_path / 'x.npy')!r})))['logits']\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y.numpy())\n"
        "assert not any(name.startswith(('lora_ckpt', 'tfimm')) for name in sys.modules), 'imported'\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"),
        reference_pool.predict(images, adapter="stripes"),
        rtol=1e-5,
        atol=1e-5,
    )
