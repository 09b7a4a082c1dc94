"""Scaling out: the service on Ray Serve with 1 and 2 replicas, over a store in
S3-compatible object storage, and the cost of a cold adapter from object
storage against local disk. Everything on loopback; every phase bounded.

    .venv/bin/python benchmarks/scale_bench.py            # ~3-4 minutes
    .venv/bin/python benchmarks/scale_bench.py --quick    # fewer requests

Measured:
- requests/s and p50/p99 latency of ``POST /predict/{adapter}`` from
  ``--concurrency`` closed-loop clients, adapters drawn uniformly from
  ``--adapters`` (more than one replica's ``--capacity``), for the
  single-process service and for ``--ray`` with 1 and 2 replicas, plus how
  many adapter loads each needed;
- a cold ``AdapterPool.load``: from local disk, from S3 with an empty cache
  (download + checks + load), from S3 with the cache warm (one config GET).

On a 2-core machine two replicas compete for the same cores as the client,
the ingress and the S3 server: the figures show correctness and overhead
(and fewer loads, since two replicas hold twice the adapters), not speedup.
Needs the scale extra. Writes benchmarks/results/local/scale_bench.json (untracked; --out to choose).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.helpers: the moto server and the tiny store

from lora_ckpt import AdapterPool  # noqa: E402
from lora_ckpt.serving.store import adapter_path, build_base_model, upload_store  # noqa: E402
from lora_ckpt.storage import CACHE_ENV  # noqa: E402
from tests.helpers.scale import images, make_tiny_store, moto_s3  # noqa: E402

REMOTE = "s3://lora/bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cold_loads(local_store: str, names: list[str], rounds: int) -> dict:
    """Median ms of a cold AdapterPool.load: local disk, S3 with an empty cache, S3 cached."""
    model, _ = build_base_model(local_store)
    pool = AdapterPool(model, capacity=2)
    times = {"local_disk_ms": [], "s3_empty_cache_ms": [], "s3_cached_ms": []}
    for round_ in range(rounds):
        for name in names:
            cache = tempfile.mkdtemp(prefix="scale-bench-cache-")
            os.environ[CACHE_ENV] = cache
            order = [
                ("local_disk_ms", adapter_path(local_store, name)),
                ("s3_empty_cache_ms", adapter_path(REMOTE, name)),
                ("s3_cached_ms", adapter_path(REMOTE, name)),
            ]
            if round_ % 2:  # alternate, so neither side gains from running first
                order = [order[1], order[2], order[0]]
            for key, path in order:
                if "slot" in pool.names():
                    pool.unload("slot")
                started = time.perf_counter()
                pool.load("slot", path)
                times[key].append((time.perf_counter() - started) * 1e3)
            shutil.rmtree(cache, ignore_errors=True)
    return {key: round(statistics.median(values), 2) for key, values in times.items()}


class Server:
    def __init__(self, env: dict, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Closed (and removed) in stop().
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w+", prefix="scale-bench-", suffix=".log"
        )
        command = [sys.executable, "-m", "lora_ckpt.cli", "serve", "--store", REMOTE]
        command += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, replicas: int | None, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited: {self.log.read()[-3000:]}")
            try:
                response = httpx.get(self.url + "/ready", timeout=5)
                if response.status_code == 200 and (
                    replicas is None or response.json().get("replicas") == replicas
                ):
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError("the server did not become ready")

    def loads(self) -> int:
        replicas = httpx.get(self.url + "/replicas", timeout=10)
        if replicas.status_code == 200:
            return sum(sum(r["loads"].values()) for r in replicas.json()["replicas"])
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("lora_adapter_loads_total "):
                return int(float(line.split()[1]))
        return -1

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()


def load_test(url: str, names: list[str], requests: int, concurrency: int, cap_s: float) -> dict:
    """Closed-loop clients; each request names a uniformly drawn adapter."""
    x = images(8, seed=21)
    latencies, errors = [], []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + cap_s

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    if next(counter, None) is None:
                        return
                name = names[int(rng.integers(len(names)))]
                body = {"tensor": x[int(rng.integers(len(x)))].tolist()}
                started = time.perf_counter()
                try:
                    status = http.post(f"/predict/{name}", json=body).status_code
                except httpx.TransportError as exc:
                    status = repr(exc)
                elapsed = time.perf_counter() - started
                with lock:
                    (latencies if status == 200 else errors).append(elapsed)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 1),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=8, help="adapters per replica")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60, help="cap on each load test")
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "local", "scale_bench.json")
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.seconds = 120, 30
    work = tempfile.mkdtemp(prefix="scale-bench-")
    names = [f"task{i:02d}" for i in range(args.adapters)]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    started = time.perf_counter()
    try:
        local = os.path.join(work, "store")
        print(f"[1/3] a tiny store with {len(names)} adapters, uploaded to a local S3 server")
        make_tiny_store(local, names)
        with moto_s3() as s3_env:
            upload_store(local, REMOTE)
            print("[2/3] cold adapter loads: local disk vs object storage")
            result["cold_load"] = cold_loads(local, names[:4], rounds=2 if args.quick else 4)
            print(f"      {result['cold_load']}")
            print("[3/3] requests/s and p99: single process, Ray Serve with 1 and 2 replicas")
            env = dict(
                os.environ,
                **s3_env,
                LORA_CKPT_CACHE_DIR=os.path.join(work, "cache"),
                TF_CPP_MIN_LOG_LEVEL="3",
            )
            result["serving"] = {}
            common = ["--capacity", str(args.capacity)]
            setups = {
                "single_process": (common, None),
                "ray_1_replica": ([*common, "--ray", "--replicas", "1", "--num-cpus", "2"], 1),
                "ray_2_replicas": ([*common, "--ray", "--replicas", "2", "--num-cpus", "2"], 2),
            }
            for label, (extra, replicas) in setups.items():
                server = Server(env, *extra)
                try:
                    server.wait_ready(replicas)
                    for name in names[: args.capacity]:  # warm: base graphs traced, some loaded
                        httpx.post(
                            f"{server.url}/predict/{name}",
                            json={"tensor": images(1)[0].tolist()},
                            timeout=60,
                        )
                    loads_before = server.loads()
                    figures = load_test(
                        server.url, names, args.requests, args.concurrency, args.seconds
                    )
                    figures["adapter_loads"] = server.loads() - loads_before
                finally:
                    server.stop()
                result["serving"][label] = figures
                print(f"      {label}: {figures}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"Wrote {args.out} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
