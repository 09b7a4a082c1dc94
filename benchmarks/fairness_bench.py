"""Fair queues under a flood: latency of four light adapters, with and without
one adapter flooded at 8x their rate, through the service's batcher.

    .venv/bin/python benchmarks/fairness_bench.py          # ~1 minute
    .venv/bin/python benchmarks/fairness_bench.py --tiny   # seconds

Builds a small ConvNeXt pool (96x96, 5 rank-4 adapters; ``--tiny``: 32x32) in process and drives
its :class:`~lora_ckpt.serving.batching.MicroBatcher` (max batch 8, 5 ms
wait) with open-loop Poisson arrivals: four light adapters at rate ``r``
each and, in the flood phase, a fifth at ``8 r``. ``r`` is set from the
pool's measured throughput ``C`` (samples/s at batch 8) so that the flood
phase offers ``--load`` x ``C`` in all (default 1.2: the flood overloads
the pool) and the calm phase a third of that. Both queue disciplines run:
``fair`` (a queue per adapter, batches filled round-robin: the service's)
and ``fifo`` (one queue, the old batcher), interleaved round by round
(calm and flood phases alternate inside each round), so the ratios are
measured side by side. Reported: p50/p99 latency of the light adapters'
requests per discipline and phase, and the ratio flood p99 / calm p99 (the
goal for ``fair``: within 1.5x). After each phase every request still queued
is answered before the next phase starts (not timed).

Writes benchmarks/results/local/fairness_bench.json unless --out says otherwise.
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np

LIGHT = ["light0", "light1", "light2", "light3"]
HOT = "hot"


SIZES = {
    # A batch must cost the pool more than the event loop spends per request,
    # or the benchmark measures asyncio, not the queue: "small" does ~300-500
    # samples/s here, "tiny" (32x32) thousands.
    "tiny": dict(embed_dim=[8, 16], nb_blocks=[1, 1], input_size=[32, 32]),
    "small": dict(embed_dim=[48, 96], nb_blocks=[2, 2], input_size=[96, 96]),
}


def build_pool(directory: str, size: str):
    """A ConvNeXt pool with the light adapters and the hot one resident."""
    import lora_ckpt  # first: TensorFlow with Keras 2
    import tfimm  # isort: skip

    from lora_ckpt.serving.pool import AdapterPool
    from lora_ckpt.serving.store import adapter_path, build_base_model, write_base

    store = os.path.join(directory, "store")
    config = dict(SIZES[size], nb_classes=4, init_scale=1.0)
    lora = {"lora_rank": 4, "lora_train_classifier": False}
    lora_ckpt.tf.keras.utils.set_random_seed(0)
    write_base(store, "convnext_tiny", config, lora, tfimm.create_model("convnext_tiny", **config))
    model, _ = build_base_model(store)
    rng = np.random.default_rng(0)
    for name in [*LIGHT, HOT]:
        for var in model.trainable_variables:
            var.assign(rng.normal(0, 0.1, var.shape).astype("float32"))
        lora_ckpt.save_lora_state(model, adapter_path(store, name))
    serving, _ = build_base_model(store)
    pool = AdapterPool(serving, capacity=len(LIGHT) + 1)
    for name in [*LIGHT, HOT]:
        pool.load(name, adapter_path(store, name))
    return pool


def pool_throughput(pool, x: np.ndarray, repeat: int) -> float:
    """Samples per second of mixed batches of 8 through ``pool.predict_rows``."""
    names = [*LIGHT, HOT, *LIGHT][:8]
    batch = np.repeat(x[:1], 8, axis=0)
    pool.predict_rows(batch, names)  # warm
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        pool.predict_rows(batch, names)
        times.append(time.perf_counter() - started)
    return 8 / statistics.median(times)


def arrivals(rate: float, seconds: float, rng) -> list[float]:
    """Poisson arrival times in ``[0, seconds)``."""
    times, now = [], 0.0
    while True:
        now += rng.exponential(1 / rate)
        if now >= seconds:
            return times
        times.append(now)


async def phase(batcher, x, rate: float, flood: bool, seconds: float, rng) -> dict:
    """One phase: light (and hot) requests; returns the light latencies (s)."""
    plan = [(t, name) for name in LIGHT for t in arrivals(rate, seconds, rng)]
    if flood:
        plan += [(t, HOT) for t in arrivals(8 * rate, seconds, rng)]
    plan.sort()
    latencies, tasks = {"light": [], "hot": []}, []

    async def one(name: str):
        started = time.perf_counter()
        await batcher.predict(x[0], name)
        latencies["hot" if name == HOT else "light"].append(time.perf_counter() - started)

    start = time.perf_counter()
    for at, name in plan:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(name)))
    await asyncio.gather(*tasks)  # the backlog is answered before the next phase
    return latencies


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def main(argv=None) -> dict:
    """Runs the benchmark; returns (and writes) its results."""
    from lora_ckpt.serving.batching import MicroBatcher

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="short phases, 2 rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per phase")
    parser.add_argument("--load", type=float, default=1.2, help="flood load / pool throughput")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "local", "fairness_bench.json"),
    )
    args = parser.parse_args(argv)
    rounds, seconds = (2, 1.0) if args.tiny else (args.rounds, args.seconds)
    size = "tiny" if args.tiny else "small"
    side = SIZES[size]["input_size"][0]
    x = np.random.default_rng(1).uniform(-1, 1, (1, side, side, 3)).astype("float32")
    with tempfile.TemporaryDirectory() as tmp:
        pool = build_pool(tmp, size)
        capacity = pool_throughput(pool, x, 5 if args.tiny else 20)
        rate = args.load * capacity / (len(LIGHT) + 8)  # per light adapter
        batchers = {
            "fair": MicroBatcher(pool, 8, 0.005, fair=True),
            "fifo": MicroBatcher(pool, 8, 0.005, fair=False),
        }
        samples = {(d, p): {"light": [], "hot": []} for d in batchers for p in ("calm", "flood")}
        rng = np.random.default_rng(2)

        async def run():
            for batcher in batchers.values():  # warm-up, not recorded
                await phase(batcher, x, rate, True, min(seconds, 1.0), rng)
            for round_ in range(rounds):
                # Alternate which discipline and phase go first, round by round.
                order = [(d, p) for d in batchers for p in ("calm", "flood")]
                for discipline, name in order if round_ % 2 == 0 else order[::-1]:
                    got = await phase(batchers[discipline], x, rate, name == "flood", seconds, rng)
                    for key in got:
                        samples[(discipline, name)][key] += got[key]

        asyncio.run(run())
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": f"convnext_tiny {SIZES[size]}",
        "pool_samples_per_s": capacity,
        "light_rate_per_adapter": rate,
        "hot_rate": 8 * rate,
        "flood_load": args.load,
        "rounds": rounds,
        "seconds_per_phase": seconds,
        "latency_ms": {},
    }
    for (discipline, name), got in samples.items():
        results["latency_ms"][f"{discipline} {name}"] = {
            "light_p50": percentile(got["light"], 50),
            "light_p99": percentile(got["light"], 99),
            "light_requests": len(got["light"]),
            "hot_p99": percentile(got["hot"], 99),
            "hot_requests": len(got["hot"]),
        }
    for discipline in batchers:
        calm = results["latency_ms"][f"{discipline} calm"]["light_p99"]
        flood = results["latency_ms"][f"{discipline} flood"]["light_p99"]
        results[f"{discipline}_flood_vs_calm_p99"] = flood / calm
    print(
        f"pool {capacity:.0f} samples/s; light {rate:.1f}/s each, hot {8 * rate:.1f}/s "
        f"(flood load {args.load:g}x)"
    )
    for key, row in results["latency_ms"].items():
        print(
            f"{key:<12} light p50 {row['light_p50']:7.1f} ms  p99 {row['light_p99']:7.1f} ms"
            f"  ({row['light_requests']} requests)   hot p99 {row['hot_p99']:7.1f} ms"
        )
    print(
        f"light p99 flood / calm: fair {results['fair_flood_vs_calm_p99']:.2f}x (goal <= 1.5x), "
        f"fifo {results['fifo_flood_vs_calm_p99']:.2f}x"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
