"""The HTTP service under load, on loopback: throughput, latency, 503s, wrong answers.

    .venv/bin/python benchmarks/http_bench.py            # convnext_tiny 224, 16 clients x 12
    .venv/bin/python benchmarks/http_bench.py --tiny     # a tiny model: HTTP cost dominates

Builds a store (convnext_tiny at 224x224, 10 classes, 5 rank-4 adapters),
starts ``lora-ckpt serve`` as a subprocess on 127.0.0.1, and sends JPEG
uploads (as production clients do) from 16 concurrent clients spread over 5
adapters, at capacity 8 (every adapter
resident) and capacity 2 (adapters evicted and reloaded), each with the
service's queue (requests wait for a slot) and without it (``--queue-timeout
0.001``: the old behaviour, 503 at once). Every answer is checked against the
adapter's own model. The pool's own throughput on the same requests, in
batches of 8 as the batcher forms them, is the reference for the HTTP
overhead. Bounded: a fixed number of requests, each with a timeout.

Writes benchmarks/results/local/http_bench.json (untracked; --out to choose).
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

ADAPTERS = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_store(directory: str, tiny: bool) -> tuple[str, dict, list, np.ndarray]:
    """A store with adapters a0..a4; returns the store, the reference outputs
    per adapter, the JPEG requests and the inputs they decode to."""
    import io

    import lora_ckpt  # first: TensorFlow must come up with Keras 2
    import tfimm  # isort: skip
    from PIL import Image

    from lora_ckpt.serving.inputs import decode_image
    from lora_ckpt.serving.store import adapter_path, build_base_model, write_base

    store = os.path.join(directory, "store")
    config = {"nb_classes": 10}
    if tiny:
        config.update(embed_dim=[8, 16], nb_blocks=[1, 1], input_size=[32, 32], init_scale=1.0)
    lora = {"lora_rank": 4, "lora_train_classifier": False}
    write_base(store, "convnext_tiny", config, lora, tfimm.create_model("convnext_tiny", **config))
    model, _ = build_base_model(store)
    shape = tuple(model.dummy_inputs.shape[1:])
    rng = np.random.default_rng(0)
    jpegs, images = [], []
    for _ in range(16):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (shape[0], shape[1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
        images.append(decode_image(buffer.getvalue(), shape, max_pixels=1 << 30))
    x = np.stack(images).astype("float32")
    reference = {}
    for i in range(ADAPTERS):
        weights = np.random.default_rng(100 + i)
        for _, layer in lora_ckpt.lora_layers(model):
            for var in (layer.kernel_lora_a, layer.kernel_lora_b):
                var.assign(weights.normal(0, 0.05, var.shape).astype("float32"))
        name = f"a{i}"
        lora_ckpt.save_lora_state(model, adapter_path(store, name), overwrite=True)
        reference[name] = model(x).numpy()
    return store, reference, jpegs, x


def pool_throughput(store: str, names: list, x: np.ndarray, rounds: int) -> float:
    """Samples per second of the pool alone on the same mixed batches of 8."""
    from lora_ckpt import AdapterPool
    from lora_ckpt.serving.store import adapter_path, build_base_model

    model, _ = build_base_model(store)
    pool = AdapterPool(model, capacity=8)
    for name in sorted(set(names)):
        pool.load(name, adapter_path(store, name))
    batches = [
        (x[[i % len(x) for i in range(k, k + 8)]], names[k : k + 8])
        for k in range(0, len(names), 8)
    ]
    pool.predict_rows(*batches[0])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for images, adapters in batches:
            pool.predict_rows(images[: len(adapters)], adapters)
        times.append(time.perf_counter() - start)
    return len(names) / statistics.median(times)


async def load(port: int, plan: list, jpegs: list, reference: dict, clients: int) -> dict:
    """Sends ``plan`` (``(adapter, sample index)`` pairs) from ``clients`` concurrent clients."""
    latencies, statuses, wrong = [], [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits
    ) as client:

        async def worker():
            nonlocal wrong
            while not queue.empty():
                name, index = queue.get_nowait()
                start = time.perf_counter()
                files = {"image": ("x.jpg", jpegs[index], "image/jpeg")}
                response = await client.post(f"/predict/{name}", files=files)
                latencies.append(time.perf_counter() - start)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    logits = np.asarray(response.json()["logits"])
                    if not np.allclose(logits, reference[name][index], rtol=1e-4, atol=1e-4):
                        wrong += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ok = statuses.count(200)
    return {
        "requests": len(plan),
        "ok": ok,
        "throughput_rps": ok / elapsed,
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
        "rate_503": statuses.count(503) / len(plan),
        "other_errors": len(plan) - ok - statuses.count(503),
        "wrong_answers": wrong,
    }


def serve(store: str, port: int, capacity: int, queue_timeout: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lora_ckpt.cli",
            "serve",
            "--store",
            store,
            "--port",
            str(port),
            "--capacity",
            str(capacity),
            "--queue-timeout",
            str(queue_timeout),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the service did not become ready in 120 s")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=12)
    parser.add_argument("--tiny", action="store_true", help="a tiny model, 16 x 40 requests")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "local", "http_bench.json"),
    )
    args = parser.parse_args(argv)
    per_client = 40 if args.tiny else args.per_client
    results = {"clients": args.clients, "adapters": ADAPTERS, "tiny": args.tiny, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store, reference, jpegs, x = make_store(tmp, args.tiny)
        rng = np.random.default_rng(1)
        total = args.clients * per_client
        plan = [(f"a{rng.integers(ADAPTERS)}", int(rng.integers(len(x)))) for _ in range(total)]
        results["pool_samples_per_s"] = pool_throughput(store, [n for n, _ in plan], x, 3)
        for capacity in (8, 2):
            # 0.001 s: no wait for a slot (the service refuses 0), the old behaviour.
            for queue_timeout in (10.0, 0.001):
                port = free_port()
                process = serve(store, port, capacity, queue_timeout)
                try:
                    warm_up = plan[: args.clients]
                    asyncio.run(load(port, warm_up, jpegs, reference, args.clients))
                    run = asyncio.run(load(port, plan, jpegs, reference, args.clients))
                finally:
                    process.terminate()
                    process.wait(timeout=30)
                key = f"capacity {capacity}, queue {queue_timeout:g} s"
                results["runs"][key] = run
                print(
                    f"{key:<26} {run['throughput_rps']:6.1f} req/s  p50 {run['p50_ms']:6.1f} ms"
                    f"  p99 {run['p99_ms']:7.1f} ms  503 {100 * run['rate_503']:5.1f}%"
                    f"  other errors {run['other_errors']}  wrong {run['wrong_answers']}"
                )
    best = results["runs"]["capacity 8, queue 10 s"]["throughput_rps"]
    results["http_vs_pool"] = best / results["pool_samples_per_s"]
    print(
        f"pool alone on the same batches: {results['pool_samples_per_s']:.1f} samples/s; the service"
        f" reaches {100 * results['http_vs_pool']:.0f}% of it at capacity 8"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
