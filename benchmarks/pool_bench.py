"""AdapterPool speed on convnext_tiny at batch 8, every figure measured side by side.

    .venv/bin/python benchmarks/pool_bench.py            # convnext_tiny, ranks 4/16/64
    .venv/bin/python benchmarks/pool_bench.py --tiny     # a small config, seconds

Each time is the median of several runs after a warm-up. Prints the ratios
and writes benchmarks/results/local/pool_bench.json (untracked; --out to choose).
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

import lora_ckpt
from lora_ckpt import (
    AdapterPool,
    load_base_weights,
    load_lora_state,
    read_lora_state,
    save_lora_state,
    tf,
)

TINY = dict(embed_dim=(8, 16), nb_blocks=(1, 1), input_size=(32, 32), nb_classes=5, init_scale=1.0)


def median_time(fn, repeat: int, warmup: int = 1, setup=None) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs; ``setup`` runs untimed before each."""
    times = []
    for i in range(warmup + repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, rounds: int) -> dict:
    """Median time of each function, run in turn round after round (in
    reverse order every other round, so running first or second favours none),
    so every figure sees the same machine conditions (these machines are noisy)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    order = list(fns.items())
    for round_index in range(rounds):
        for name, fn in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def lora_model(name, config, rank, base_file):
    model = lora_ckpt.create_model(name, lora_rank=rank, lora_train_classifier=False, **config)
    load_base_weights(model, base_file)
    return model


def make_adapters(name, config, rank, base_file, directory, count):
    model = lora_model(name, config, rank, base_file)
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        for _, layer in lora_ckpt.lora_layers(model):
            for var in (layer.kernel_lora_a, layer.kernel_lora_b):
                var.assign(rng.normal(0, 0.02, var.shape).astype("float32"))
        paths.append(
            save_lora_state(model, os.path.join(directory, f"r{rank}_{i}"), overwrite=True)
        )
    return paths


def grouped_numpy_baseline(pool, path, npz_path, repeat):
    """Reads the adapter's arrays with numpy and assigns them into a slot in
    one grouped op: the floor a pool load is compared with."""
    state = read_lora_state(path)
    np.savez(npz_path, **{k.replace("/", "|"): v for k, v in state.tensors.items()})
    targets = []
    for layer_path, slots in pool._lora.items():
        targets.append((slots.a, f"{layer_path}/kernel_lora_a"))
        targets.append((slots.b, f"{layer_path}/kernel_lora_b"))

    @tf.function
    def assign_all(values):
        for i, ((var, _), value) in enumerate(zip(targets, values, strict=True)):
            if i % 2 == 0:
                var[1, ..., : value.shape[-1]].assign(value)
            else:
                var[1, : value.shape[0]].assign(value)

    def run():
        with np.load(npz_path) as data:
            values = [data[key.replace("/", "|")] for _, key in targets]
        assign_all(values)

    return median_time(run, repeat, warmup=2)


def run(name, config, ranks, batch, repeat, capacity):
    results = {"model": name, "batch": batch, "capacity": capacity, "ranks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        import tfimm

        regular = tfimm.create_model(name, **config)
        base_file = os.path.join(tmp, "base.h5")
        regular.save_weights(base_file)
        x = (
            np.random.default_rng(0)
            .normal(size=(batch, *regular.dummy_inputs.shape[1:]))
            .astype("float32")
        )
        base_forward = tf.function(lambda t: regular(t, training=False))

        for rank in ranks:
            adapters = make_adapters(name, config, rank, base_file, tmp, count=capacity)
            model = lora_model(name, config, rank, base_file)
            pool = AdapterPool(model, capacity=capacity + 1, max_rank=rank)  # + a slot for "cold"
            for i, path in enumerate(adapters):
                pool.load(f"a{i}", path)
            names = [f"a{i}" for i in range(capacity)]
            cycle = iter(range(10**9))

            switch = median_time(lambda: pool.activate(names[next(cycle) % capacity]), repeat * 20)
            disk = median_time(lambda: load_lora_state(model, adapters[0]), repeat)
            # A cold load into a free slot (the previous "cold" unloaded, untimed).
            cold = median_time(
                lambda: pool.load("cold", adapters[0]),
                repeat,
                setup=lambda: "cold" in pool.names() and pool.unload("cold"),
            )
            floor = grouped_numpy_baseline(pool, adapters[0], os.path.join(tmp, "a.npz"), repeat)
            entry = {
                "switch_s": switch,
                "load_lora_state_s": disk,
                "pool_load_s": cold,
                "numpy_grouped_assign_s": floor,
                "load_vs_switch": disk / switch,
                "pool_load_vs_numpy": cold / floor,
            }
            if rank == ranks[0]:
                mix = [names[i % capacity] for i in range(batch)]

                def one_by_one():
                    for i in range(batch):
                        pool.activate(mix[i])
                        pool.predict(x[i : i + 1])

                def base_one_by_one():
                    for i in range(batch):
                        base_forward(x[i : i + 1]).numpy()

                single = interleaved_medians(
                    {  # batch 1: the request most services see
                        "base": lambda: base_forward(x[:1]).numpy(),
                        "unmerged": lambda: pool.predict(x[:1], adapter="a0"),
                    },
                    4 * repeat,
                )

                timed = interleaved_medians(
                    {
                        "base": lambda: base_forward(x).numpy(),
                        "base_one_by_one": base_one_by_one,
                        "unmerged": lambda: pool.predict(x, adapter="a0"),
                        "mixed": lambda: pool.predict(x, adapters=mix),
                        "one_by_one": one_by_one,
                    },
                    repeat,
                )
                pool.merge("a0")
                merged = interleaved_medians(
                    {  # a 1% target: twice the rounds
                        "base": lambda: base_forward(x).numpy(),
                        "merged": lambda: pool.predict(x, adapter="a0"),
                    },
                    2 * repeat,
                )
                pool.unmerge()
                entry.update(
                    {
                        "base_forward_s": timed["base"],
                        "unmerged_forward_s": timed["unmerged"],
                        "merged_forward_s": merged["merged"],
                        "mixed_batch_s": timed["mixed"],
                        "one_by_one_with_swaps_s": timed["one_by_one"],
                        "unmerged_vs_base": timed["unmerged"] / timed["base"],
                        "merged_vs_base": merged["merged"] / merged["base"],
                        "mixed_throughput_vs_single_adapter": timed["unmerged"] / timed["mixed"],
                        "mixed_speedup_vs_one_by_one": timed["one_by_one"] / timed["mixed"],
                        "base_batch_speedup_per_sample": timed["base_one_by_one"] / timed["base"],
                        "batch1_base_s": single["base"],
                        "batch1_unmerged_s": single["unmerged"],
                        "batch1_unmerged_vs_base": single["unmerged"] / single["base"],
                    }
                )
            results["ranks"][str(rank)] = entry
    return results


def slot_bytes_per_adapter(pool) -> int:
    """Bytes one slot takes in every layer's slot storage (LoRA and full layers)."""
    variables = [v for s in pool._lora.values() for v in s.slot_variables]
    variables += [v for s in pool._full.values() for v in s.slots.values()]
    return sum(v.shape[1:].num_elements() * v.dtype.size for v in variables)


def capacity_sweep(name, config, rank, capacities, batch, repeat):
    """A mixed batch of ``batch`` samples over 8 adapters, in pools of growing
    capacity, timed side by side (interleaved), with a single-adapter batch as
    the reference: the cost must follow the adapters present, not the
    resident ones."""
    results = {"model": name, "rank": rank, "batch": batch, "capacities": {}}
    with tempfile.TemporaryDirectory() as tmp:
        import tfimm

        regular = tfimm.create_model(name, **config)
        base_file = os.path.join(tmp, "base.h5")
        regular.save_weights(base_file)
        shape = regular.dummy_inputs.shape[1:]
        del regular
        x = np.random.default_rng(0).normal(size=(batch, *shape)).astype("float32")
        adapters = make_adapters(name, config, rank, base_file, tmp, count=8)
        mix = [f"a{i % 8}" for i in range(batch)]
        pools = {}
        for capacity in capacities:
            pool = AdapterPool(lora_model(name, config, rank, base_file), capacity, max_rank=rank)
            for i, path in enumerate(adapters):
                pool.load(f"a{i}", path)
            pools[capacity] = pool
        fns = {f"mixed@{c}": (lambda p=p: p.predict(x, adapters=mix)) for c, p in pools.items()}
        fns["single@8"] = lambda: pools[capacities[0]].predict(x, adapter="a0")
        timed = interleaved_medians(fns, repeat)
        for capacity, pool in pools.items():
            results["capacities"][str(capacity)] = {
                "mixed_s": timed[f"mixed@{capacity}"],
                "mixed_vs_capacity_8": timed[f"mixed@{capacity}"] / timed[f"mixed@{capacities[0]}"],
                "slot_bytes_per_adapter": slot_bytes_per_adapter(pool),
            }
        results["single_adapter_s"] = timed["single@8"]
        results["mixed_vs_single_adapter"] = timed[f"mixed@{capacities[0]}"] / timed["single@8"]
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--ranks", default="4,16,64")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--tiny", action="store_true", help="a small config, for a smoke run")
    parser.add_argument("--capacities", default="8,64,256,1024", help="capacity sweep at rank 16")
    parser.add_argument("--sweep-only", action="store_true", help="only the capacity sweep")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "local", "pool_bench.json"),
    )
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    config = TINY if args.tiny else {}
    capacities = [int(c) for c in args.capacities.split(",")]
    sweep = capacity_sweep(args.model, config, 16, capacities, args.batch, args.repeat)
    print(f"capacity sweep, {args.model}, rank 16, mixed batch of {args.batch} over 8 adapters:")
    for capacity, r in sweep["capacities"].items():
        print(
            f"  capacity {capacity:>5}: {r['mixed_s'] * 1e3:7.1f} ms = {r['mixed_vs_capacity_8']:.3f}x"
            f" capacity {capacities[0]} | {r['slot_bytes_per_adapter'] / 2**20:.2f} MiB per resident adapter"
        )
    print(
        f"  mixed at capacity {capacities[0]} = {sweep['mixed_vs_single_adapter']:.3f}x a single-adapter batch"
    )
    if args.sweep_only:
        results = {"capacity_sweep": sweep, "tiny": args.tiny}
        _write(results, args.out)
        return results
    results = run(args.model, config, ranks, args.batch, args.repeat, capacity=8)
    results["capacity_sweep"] = sweep
    results["tiny"] = args.tiny

    print(f"{args.model}{' (tiny config)' if args.tiny else ''}, batch {args.batch}, capacity 8")
    for rank, r in results["ranks"].items():
        print(
            f"rank {rank:>3}: switch {r['switch_s'] * 1e6:8.1f} us | load_lora_state {r['load_lora_state_s'] * 1e3:7.1f} ms"
            f" ({r['load_vs_switch']:,.0f}x switch) | pool.load {r['pool_load_s'] * 1e3:6.1f} ms"
            f" = {r['pool_load_vs_numpy']:.2f}x numpy+grouped assign ({r['numpy_grouped_assign_s'] * 1e3:.1f} ms)"
        )
    r = results["ranks"][str(ranks[0])]
    print(
        f"batch 1, rank {ranks[0]}: base {r['batch1_base_s'] * 1e3:.1f} ms | unmerged"
        f" {r['batch1_unmerged_vs_base']:.3f}x base"
    )
    print(
        f"forward, rank {ranks[0]}: base {r['base_forward_s'] * 1e3:.1f} ms | unmerged {r['unmerged_vs_base']:.3f}x"
        f" | merged {r['merged_vs_base']:.3f}x base"
    )
    print(
        f"mixed batch of {args.batch} over 8 adapters: {r['mixed_throughput_vs_single_adapter']:.2f}x the throughput"
        f" of one adapter | {r['mixed_speedup_vs_one_by_one']:.2f}x faster than {args.batch} requests one by one"
        " with a swap before each"
    )
    print(
        f"(the base model itself: a batch of {args.batch} is {r['base_batch_speedup_per_sample']:.2f}x faster per"
        " sample than batch 1 on this machine)"
    )
    _write(results, args.out)
    return results


def _write(results, path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
