"""The service as operators run it, in a subprocess with a real HTTP client on
loopback: slow and silent connections bounded, animated images decoded one
frame, an object-store outage answered 503/504 in time, a start that fails
exits non-zero, readiness after warm-up and named adapters, pins, a drain on
SIGTERM that loses no request, JSON logs with request ids. Every socket is
closed in ``finally``; counts and times are bounded."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lora_ckpt.serving.store import upload_store
from tests.helpers.http_server import ENV, Server, free_port
from tests.helpers.scale import images, make_tiny_store, moto_s3

pytestmark = pytest.mark.slow


# The helpers' server, under the name this file's tests use.
Serve = Server


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("operations") / "store")
    make_tiny_store(path, ["a0", "a1", "a2", "a3"])
    return path


@pytest.fixture(scope="module")
def server(store):
    srv = Serve(store, "--log-format", "json", "--capacity", "2", "--pin", "a0")
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


def tensor_body(index: int = 0) -> dict:
    return {"tensor": images(index + 1)[index].tolist()}


def test_half_sent_and_silent_connections_do_not_lock_out_other_clients(server):
    # More than --limit-concurrency (256) connections that never finish their
    # request head: they are closed after --header-timeout (10 s), and another
    # client is answered within 15 s of their arrival.
    held = []
    try:
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i % 2 == 0:
                sock.sendall(b"POST /predict/a0 HTT")  # half a request line
            held.append(sock)
        started = time.monotonic()
        answered = None
        with httpx.Client(base_url=server.url, timeout=5) as client:
            while time.monotonic() - started < 15:
                try:
                    response = client.post("/predict/a0", json=tensor_body())
                    if response.status_code == 200:
                        answered = time.monotonic() - started
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        assert answered is not None, "no answer within 15 s"
        # The held connections were closed by the server (EOF), not by us.
        held[0].settimeout(5)
        assert held[0].recv(1) == b""
    finally:
        for sock in held:
            sock.close()


def animated_gif(width: int, height: int, frames: int) -> bytes:
    """An animated GIF of ``frames`` identical full-size frames (small: LZW of one colour)."""
    import io

    from PIL import Image

    one = io.BytesIO()
    Image.new("P", (width, height), 1).save(one, "GIF")
    data = one.getvalue()
    packed = data[10]  # the logical screen descriptor: is there a global palette, how large
    start = 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)
    assert data[-1] == 0x3B  # the trailer
    return data[:start] + data[start:-1] * frames + b"\x3b"


def test_an_animated_gif_decodes_one_frame(server):
    gif = animated_gif(4096, 4096, 64)
    assert len(gif) < 1_000_000
    before, peak, done = server.rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], server.rss_bytes())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = httpx.post(
            f"{server.url}/predict/a1", files={"image": ("a.gif", gif)}, timeout=60
        )
    finally:
        done.set()
        watcher.join()
    assert response.status_code == 200, response.text
    assert peak[0] - before < 256 << 20, (peak[0] - before) >> 20


def test_pinned_adapters_stay_while_others_come_and_go(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name in ("a1", "a2", "a3", "a1", "a2"):
            assert client.post(f"/predict/{name}", json=tensor_body()).status_code == 200
            assert "a0" in client.get("/adapters").json()["resident"]
        refused = client.delete("/adapters/a0")
        assert refused.status_code == 409 and refused.json()["error"]["type"] == "Pinned"
        ready = client.get("/ready").json()
        assert ready["pinned"] == ["a0"]
        metrics = client.get("/metrics").text
    assert "lora_pinned_adapters 1.0" in metrics
    for name in (
        "lora_adapter_loads_total",
        "lora_adapter_evictions_total",
        "lora_adapter_cache_hits_total",
        "lora_adapter_cache_misses_total",
        "lora_queue_depth",
        "lora_adapter_load_seconds_bucket",
        "process_resident_memory_bytes",
        "python_gc_collections_total",
    ):
        assert name in metrics, name
    evictions = [line for line in metrics.splitlines() if line.startswith("lora_adapter_evictions")]
    assert float(evictions[0].split()[-1]) >= 3  # capacity 2, one slot pinned: a1..a3 rotate


def test_json_log_lines_carry_the_request_id_and_an_access_line(server):
    response = httpx.post(
        f"{server.url}/predict/a0", json={}, headers={"x-request-id": "req-42"}, timeout=30
    )
    assert response.status_code == 400 and response.headers["x-request-id"] == "req-42"
    time.sleep(0.5)
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("request_id") == "req-42"]
    assert access and access[-1]["logger"] == "lora_ckpt.access"
    assert access[-1]["status"] == 400 and access[-1]["path"] == "/predict/a0"
    assert {"time", "level", "logger", "message"} <= set(access[-1])


def test_ready_only_once_warm_and_pins_loaded_then_sigterm_drains(store):
    srv = Serve(store, "--startup-delay", "3", "--pin", "a1", "--drain-timeout", "20")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        not_ready = httpx.get(srv.url + "/ready", timeout=5)
        assert not_ready.status_code == 503, not_ready.text
        srv.wait()
        assert "a1" in httpx.get(srv.url + "/adapters", timeout=10).json()["resident"]

        # 8 clients on keep-alive connections; SIGTERM in the middle.
        results, stop, signalled = [], threading.Event(), []

        def client(seed):
            with httpx.Client(base_url=srv.url, timeout=30) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        status = http.post(
                            f"/predict/a{seed % 4}", json=tensor_body(seed % 3)
                        ).status_code
                    except httpx.TransportError as exc:
                        status = type(exc).__name__
                    results.append((sent, status))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        signalled.append(time.monotonic())
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        try:
            ready = httpx.get(srv.url + "/ready", timeout=5).status_code
        except httpx.TransportError:
            ready = "closed"
        code = srv.proc.wait(timeout=40)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert code == 0, srv.output()[-3000:]
        assert ready in (503, "closed")
        before = [status for sent, status in results if sent < signalled[0]]
        assert len(before) > 16 and all(status == 200 for status in before), before
    finally:
        srv.stop()


def test_a_store_or_base_that_cannot_load_exits_non_zero(store, tmp_path):
    started = time.monotonic()
    missing = subprocess.run(
        [sys.executable, "-m", "lora_ckpt.cli", "serve", "--store", str(tmp_path / "missing"),
         "--port", str(free_port())],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1 and "not an adapter store" in missing.stderr
    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    for name in ("base.json", "base.h5"):
        with open(os.path.join(store, name), "rb") as source:
            data = source.read()
        with open(os.path.join(broken, name), "wb") as target:
            target.write(data if name == "base.json" else data[:1000])
    truncated = subprocess.run(
        [sys.executable, "-m", "lora_ckpt.cli", "serve", "--store", broken,
         "--port", str(free_port())],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert truncated.returncode == 1, truncated.stderr[-2000:]
    assert "the base model failed to load" in truncated.stderr
    assert time.monotonic() - started < 60


def test_an_object_store_outage_is_503_or_504_within_the_load_timeout(store, tmp_path):
    cache = {"LORA_CKPT_CACHE_DIR": str(tmp_path / "cache")}
    with moto_s3() as env:
        upload_store(store, "s3://lora/store")
        srv = Serve("s3://lora/store", "--load-timeout", "5", "--capacity", "2",
                    env={**env, **cache})  # fmt: skip
        try:
            srv.wait()
            assert (
                httpx.post(f"{srv.url}/predict/a0", json=tensor_body(), timeout=30).status_code
                == 200
            )
            # The endpoint goes away: nothing listens there any more.
            endpoint = env["AWS_ENDPOINT_URL"]
            _stop_moto_listening(endpoint)
            for name in ("a2", "a3"):
                started = time.monotonic()
                response = httpx.post(f"{srv.url}/predict/{name}", json=tensor_body(), timeout=30)
                elapsed = time.monotonic() - started
                assert response.status_code in (503, 504), response.text
                assert elapsed < 5 + 2, elapsed
                body = response.text
                assert "s3://" not in body and "/tmp" not in body and endpoint not in body, body
            resident = httpx.post(f"{srv.url}/predict/a0", json=tensor_body(), timeout=30)
            assert resident.status_code == 200  # resident adapters keep serving
        finally:
            srv.stop()


def _stop_moto_listening(endpoint: str) -> None:
    """Makes the S3 endpoint refuse connections: every thread-moto server in
    this process is shut down (moto_s3's own stop then finds it stopped)."""
    import gc

    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    for server in [o for o in gc.get_objects() if isinstance(o, ThreadedMotoServer)]:
        _, port = server.get_host_and_port()
        if endpoint.endswith(f":{port}"):
            server.stop()
            server._server.server_close()  # refused, not accepted and left unanswered
