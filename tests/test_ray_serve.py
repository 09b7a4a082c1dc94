"""``lora-ckpt serve --ray --replicas 2`` over a store in a real S3 server, end
to end with a real HTTP client: a local Ray cluster (2 CPUs, loopback only)
started by the command in a subprocess, moto's S3 server on 127.0.0.1.

Shows: answers equal a direct AdapterPool over the same store; requests for
one adapter land on the replica that holds it (Ray's multiplexed routing, by
the per-replica load counts); a reload after the store's copy changed, and
an unload, reach every replica; a killed replica loses no request that the
client retries, and comes back; SIGTERM stops everything.

Slow: about two to three minutes on 2 cores (the cluster and three TensorFlow
processes start once for the module)."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from lora_ckpt import AdapterPool, save_lora_state
from lora_ckpt.serving.store import adapter_path, build_base_model, upload_store
from lora_ckpt.serving.store import copy_adapter as upload_adapter
from tests.helpers.scale import images, make_tiny_store, moto_s3, vary

pytestmark = pytest.mark.slow

pytest.importorskip("ray.serve", reason="needs the scale extra: pip install 'lora_ckpt[scale]'")

REMOTE = "s3://lora/store"
NAMES = ["a0", "a1", "a2"]
STARTUP_SECONDS = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(client, path, **kwargs):
    """A GET that rides over connection errors while Ray starts or recovers."""
    for _ in range(30):
        try:
            return client.get(path, **kwargs)
        except httpx.TransportError:
            time.sleep(1)
    raise TimeoutError(f"GET {path} kept failing")


class RayServer:
    """The serve command in its own session, so every process it starts can be stopped."""

    def __init__(self, env: dict, log_path: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lora_ckpt.cli",
                "serve",
                "--store",
                REMOTE,
                "--ray",
                "--replicas",
                "2",
                "--capacity",
                "2",
                "--num-cpus",
                "2",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=open(log_path, "w"),  # noqa: SIM115  (closed with the process)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-4000:]

    def wait_ready(self, replicas: int = 2, timeout: float = STARTUP_SECONDS) -> dict:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited: {self.log()}")
                try:
                    response = client.get("/ready")
                    if response.status_code == 200 and response.json()["replicas"] == replicas:
                        return response.json()
                except (httpx.TransportError, ValueError, KeyError):
                    pass
                time.sleep(1)
        raise TimeoutError(f"not ready with {replicas} replicas: {self.log()}")

    def terminate(self, timeout: float = 90) -> int | None:
        """SIGTERM, as a process manager stops it; the exit code (None if it hung)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        return self.proc.returncode

    def leftovers(self) -> str:
        """Processes still in the command's session (the cluster it started)."""
        return subprocess.run(
            ["ps", "-o", "pid=,cmd=", "-s", str(self.proc.pid)], capture_output=True, text=True
        ).stdout.strip()

    def stop(self) -> None:
        self.terminate()
        try:  # whatever the command started and left (it should leave nothing)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ray-store") / "store")
    make_tiny_store(path, NAMES)
    return path


@pytest.fixture(scope="module")
def reference_pool(store):
    model, _ = build_base_model(store)
    pool = AdapterPool(model, capacity=len(NAMES))
    for name in NAMES:
        pool.load(name, adapter_path(store, name))
    return pool


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    work = tmp_path_factory.mktemp("ray-server")
    with moto_s3() as s3_env:
        upload_store(store, REMOTE)
        env = dict(
            os.environ,
            **s3_env,
            LORA_CKPT_CACHE_DIR=str(work / "cache"),
            TF_CPP_MIN_LOG_LEVEL="3",
        )
        srv = RayServer(env, str(work / "serve.log"))
        try:
            srv.wait_ready()
            yield srv
        finally:
            srv.stop()


def _predict(client, name, image, attempts=20):
    """POST /predict, retried on connection errors and 5xx like a careful client."""
    last = None
    for attempt in range(attempts):
        try:
            response = client.post(f"/predict/{name}", json={"tensor": image.tolist()})
            if response.status_code < 500:
                return response, attempt
            last = response.text
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(min(0.25 * (attempt + 1), 2))
    raise AssertionError(f"/predict/{name} failed {attempts} times: {last}")


def test_answers_equal_the_single_process_pool(server, reference_pool):
    x = images(3, seed=5)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name in [*NAMES, "off"]:
            expected = reference_pool.predict(x, adapter=name)
            for image, want in zip(x, expected, strict=True):
                response, _ = _predict(client, name, image)
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["adapter"] == name and body["class"] == int(np.argmax(want))
                if name != "off":
                    assert body["label"] == f"{name}-{body['class']}"
                np.testing.assert_allclose(body["logits"], want, rtol=1e-5, atol=1e-5)
        # TF Serving's REST predict, several instances in one request.
        response = client.post("/v1/models/a1:predict", json={"instances": x.tolist()})
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(
            response.json()["predictions"],
            reference_pool.predict(x, adapter="a1"),
            rtol=1e-5,
            atol=1e-5,
        )
        # Errors have the single-process service's statuses and shape.
        response = client.post("/predict/nope", json={"tensor": x[0].tolist()})
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "AdapterNotFound"
        response = client.post("/predict/a0", json={"tensor": [[1.0]]})
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "BadTensor"
        meta = client.get("/v1/models/a2/metadata").json()["metadata"]
        assert meta["input_shape"] == [32, 32, 3] and meta["labels"][0] == "a2-0"
        adapters = _get(client, "/adapters").json()
        assert adapters["store"] == NAMES and set(adapters["resident"]) <= set(NAMES)
        assert len(adapters["replicas"]) == 2


def _replicas(client) -> list[dict]:
    return _get(client, "/replicas").json()["replicas"]


def test_requests_for_an_adapter_land_on_the_replica_that_holds_it(server):
    x = images(2, seed=9)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # Until each adapter is resident somewhere: the router learns where adapters
        # are a moment after they load, so the first placements may shuffle.
        for _ in range(10):
            for name in NAMES:
                _predict(client, name, x[0])
            time.sleep(2)  # model ids reach the router; the directory hears the replicas
            before = {r["replica"]: r for r in _replicas(client)}
            holders = {
                name: {rid for rid, r in before.items() if name in r["resident"]} for name in NAMES
            }
            if len(before) == 2 and all(holders.values()):
                break
        assert len(before) == 2 and all(holders.values()), before
        # Capacity 2 per replica: the three adapters span both replicas.
        assert {rid for held in holders.values() for rid in held} == set(before)
        served = {name: set() for name in NAMES}
        for round_ in range(8):
            for name in NAMES:
                response, _ = _predict(client, name, x[round_ % 2])
                assert response.status_code == 200, response.text
                served[name].add(response.headers["x-lora-replica"])
        time.sleep(2.5)  # the replicas' next reports (each second)
        after = {r["replica"]: r for r in _replicas(client)}
    for name in NAMES:
        assert served[name] <= holders[name], (name, served[name], holders[name])
        # Served where resident: no replica loaded it again.
        loads_before = sum(r["loads"].get(name, 0) for r in before.values())
        loads_after = sum(r["loads"].get(name, 0) for r in after.values())
        assert loads_after == loads_before, (name, before, after)
        for rid in served[name]:
            gained = after[rid]["requests"].get(name, 0) - before[rid]["requests"].get(name, 0)
            assert gained >= 1
    metrics = httpx.get(server.url + "/metrics").text
    # Counters end in _total (Prometheus' naming); the single process's names too.
    assert "lora_replica_adapter_loads_total{" in metrics and "lora_replicas 2" in metrics
    assert "lora_adapter_loads_total" in metrics and "lora_queue_depth" in metrics


def test_a_reload_and_an_unload_reach_every_replica(server, store, tmp_path):
    x = images(3, seed=21)
    model, _ = build_base_model(store)
    vary(model, 77)
    new_version = str(tmp_path / "a1")
    save_lora_state(model, new_version, labels=[f"new-{c}" for c in range(4)])
    expected = model(x).numpy()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        _predict(client, "a1", x[0])  # resident somewhere, at the version of the store
        time.sleep(2.5)  # the replicas' next reports
        old = {r["versions"]["a1"] for r in _replicas(client) if "a1" in r["resident"]}
        assert len(old) == 1
        try:
            upload_adapter(new_version, adapter_path(REMOTE, "a1"), overwrite=True)
            response = client.post("/adapters/a1")
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["outcome"] == "reloaded"
            assert body["replicas"]["pending"] == [] and len(body["replicas"]["done"]) == 2
            holders = {r["replica"]: r for r in _replicas(client) if "a1" in r["resident"]}
            versions = {r["versions"]["a1"] for r in holders.values()}
            assert len(versions) == 1 and versions != old, holders
            for i in range(6):  # whichever replica answers
                response, _ = _predict(client, "a1", x[i % 3])
                assert response.json()["label"].startswith("new-")
                np.testing.assert_allclose(
                    response.json()["logits"], expected[i % 3], rtol=1e-5, atol=1e-5
                )

            response = client.delete("/adapters/a1")
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body["from"]) >= set(holders) and body["replicas"]["pending"] == []
            assert all("a1" not in r["resident"] for r in _replicas(client))
            assert client.delete("/adapters/a1").status_code == 404
        finally:  # the store's own a1 again, for the tests that follow
            upload_adapter(adapter_path(store, "a1"), adapter_path(REMOTE, "a1"), overwrite=True)


def test_a_killed_replica_loses_no_retried_request_and_comes_back(server, reference_pool):
    x = images(4, seed=13)
    expected = {name: reference_pool.predict(x, adapter=name) for name in NAMES}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        replicas = _replicas(client)
        victim = next(r for r in replicas if "a0" in r["resident"])
        outcomes, stop = [], threading.Event()

        def traffic():
            with httpx.Client(base_url=server.url, timeout=60) as own:
                i = 0
                while not stop.is_set() and i < 400:
                    name = NAMES[i % len(NAMES)]
                    response, retries = _predict(own, name, x[i % len(x)])
                    ok = response.status_code == 200 and np.allclose(
                        response.json()["logits"], expected[name][i % len(x)], atol=1e-5
                    )
                    outcomes.append((name, ok, retries, response.status_code))
                    i += 1

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            time.sleep(2)
            os.kill(victim["pid"], signal.SIGKILL)
            killed_at = time.monotonic()
            deadline = killed_at + 180
            back = None
            while time.monotonic() < deadline:
                now = _replicas(client)
                if len(now) == 2 and victim["replica"] not in {r["replica"] for r in now}:
                    back = now
                    break
                time.sleep(1)
            assert back is not None, f"the replica did not come back: {server.log()}"
            assert all(r["pid"] != victim["pid"] for r in back)
            time.sleep(2)  # traffic through the new replica too
        finally:
            stop.set()
            thread.join(120)
    assert outcomes, "no request was sent"
    assert all(ok for _, ok, _, _ in outcomes), [o for o in outcomes if not o[1]][:5]
    # Every adapter still answers, a0 (the victim's) included.
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response, _ = _predict(client, "a0", x[0])
        np.testing.assert_allclose(response.json()["logits"], expected["a0"][0], atol=1e-5)


def test_sigterm_stops_the_service_and_its_cluster(server):
    assert server.terminate() == 0, server.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
    deadline = time.monotonic() + 30  # Ray's own processes exit right after the command
    while server.leftovers() and time.monotonic() < deadline:
        time.sleep(1)
    assert server.leftovers() == ""
