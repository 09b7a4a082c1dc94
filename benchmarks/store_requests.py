"""S3 requests and time per cold adapter load and per save, against a real S3
server on loopback (moto), for this tree and optionally an older one, run
alternately in fresh processes so that both see the same machine.

    .venv/bin/python benchmarks/store_requests.py
    .venv/bin/python benchmarks/store_requests.py --baseline /path/to/old/checkout

Requests are counted where every version of lora_ckpt sends them: aiobotocore's
``_make_api_call`` (s3fs's client), so no version's own bookkeeping is trusted.
Measured per tree: the requests of a cold ``AdapterPool.load`` (empty local
cache), of a warm one (cache filled), of a first ``save_lora_state`` to a new
prefix and of an overwrite; the median time of a cold load over ``--loads``
loads. Uses only the public API both trees have. Needs the scale extra.
Writes benchmarks/results/local/store_requests.json (untracked; ``--out`` to
choose another file).
"""

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODEL = "convnext_tiny"
CONFIG = dict(embed_dim=[8, 16], nb_blocks=[1, 1], input_size=[32, 32], nb_classes=4)
LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_layer_groups": ["mlp"]}


class Requests:
    """Counts S3 API calls by operation name while active."""

    def __init__(self):
        self.calls = collections.Counter()

    @contextlib.contextmanager
    def counting(self):
        from aiobotocore.client import AioBaseClient

        real = AioBaseClient._make_api_call
        calls = collections.Counter()

        async def counted(client, operation, params):
            calls[operation] += 1
            return await real(client, operation, params)

        AioBaseClient._make_api_call = counted
        try:
            yield calls
        finally:
            AioBaseClient._make_api_call = real


def _moto():
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import s3fs

    s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).mkdir("bench")
    return server


def measure(loads: int) -> dict:
    """One tree's figures (runs in the process whose lora_ckpt is under test)."""
    # isort: off
    import lora_ckpt  # first: TensorFlow must come up with Keras 2
    import numpy as np
    import tfimm

    # isort: on
    from lora_ckpt import AdapterPool, save_lora_state
    from lora_ckpt.serving.store import adapter_path, build_base_model, upload_store, write_base

    server = _moto()
    requests = Requests()
    try:
        local = os.path.join(tempfile.mkdtemp(), "store")
        lora_ckpt.tf.keras.utils.set_random_seed(0)
        base = tfimm.create_model(
            MODEL, **{k: tuple(v) if isinstance(v, list) else v for k, v in CONFIG.items()}
        )
        write_base(local, MODEL, CONFIG, LORA, base)
        model, _ = build_base_model(local)
        rng = np.random.default_rng(0)
        for var in model.trainable_variables:
            var.assign(rng.normal(0, 0.1, var.shape).astype("float32"))
        save_lora_state(model, adapter_path(local, "task"))
        remote = "s3://bench/store"
        upload_store(local, remote)
        pool = AdapterPool(build_base_model(remote)[0], capacity=2)
        url = adapter_path(remote, "task")

        def cold_load():
            os.environ["LORA_CKPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="store-requests-")
            if "task" in pool.names():
                pool.unload("task")
            started = time.perf_counter()
            pool.load("task", url)
            return (time.perf_counter() - started) * 1e3

        cold_load()  # warm-up: the graphs, the fingerprint cache
        with requests.counting() as cold:
            cold_load()
        with requests.counting() as warm:
            pool.unload("task")
            pool.load("task", url)
        times = [cold_load() for _ in range(loads)]
        with requests.counting() as first_save:
            save_lora_state(model, "s3://bench/saves/new")
        with requests.counting() as overwrite:
            save_lora_state(model, "s3://bench/saves/new", overwrite=True)
        return {
            "cold_load_requests": dict(cold),
            "warm_load_requests": dict(warm),
            "first_save_requests": dict(first_save),
            "overwrite_requests": dict(overwrite),
            "cold_load_ms": statistics.median(times),
        }
    finally:
        server.stop()


def _run_tree(tree: str, loads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--measure", "--loads", str(loads)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode:
        raise SystemExit(f"{tree}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def _total(counts: dict) -> str:
    return f"{sum(counts.values())} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="an older checkout to compare with, run alternately")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the trees")
    parser.add_argument("--loads", type=int, default=5, help="cold loads timed per round")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", default=os.path.join(HERE, "results", "local", "store_requests.json")
    )
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.loads)))
        return
    trees = {"this tree": ROOT}
    if args.baseline:
        trees["baseline"] = os.path.abspath(args.baseline)
    runs = {name: [] for name in trees}
    for round_ in range(args.rounds):
        order = list(trees.items())
        if round_ % 2:  # alternate, so neither gains from running first
            order.reverse()
        for name, tree in order:
            runs[name].append(_run_tree(tree, args.loads))
    summary = {}
    for name, results in runs.items():
        summary[name] = dict(results[0])
        summary[name]["cold_load_ms"] = round(
            statistics.median(r["cold_load_ms"] for r in results), 2
        )
        summary[name]["cold_load_ms_per_round"] = [round(r["cold_load_ms"], 2) for r in results]
    for name, figures in summary.items():
        print(f"== {name}")
        for key in ("cold_load", "warm_load", "first_save", "overwrite"):
            print(f"  {key:<11} requests: {_total(figures[f'{key}_requests'])}")
        print(
            f"  cold load: {figures['cold_load_ms']} ms (median; rounds {figures['cold_load_ms_per_round']})"
        )
    if args.baseline:
        ratio = summary["this tree"]["cold_load_ms"] / summary["baseline"]["cold_load_ms"]
        print(f"cold load time, this tree / baseline: {ratio:.3f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"rounds": args.rounds, "loads": args.loads, "trees": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
