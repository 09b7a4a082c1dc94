"""AdapterPool speed on convnext_tiny at batch 8, every figure measured side by side.

    .venv/bin/python benchmarks/pool_bench.py            # convnext_tiny, ranks 4/16/64
    .venv/bin/python benchmarks/pool_bench.py --tiny     # a small config, seconds

Figures: the rank mix (a mixed batch of rank-4 adapters in a pool built for
``max_rank=64`` against one built for ``max_rank=4``; the slot bytes of
adapters of rank 4 to 64 against their own tensors), the capacity sweep,
then per rank switch, load and forward, batch 1 against the base.
Each time is the median of several runs after a warm-up; compared figures
are interleaved round by round, and ratios come with the spread of the
per-round ratios. Prints the ratios and writes
benchmarks/results/local/pool_bench.json (untracked; --out to choose).
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


def interleaved_times(fns: dict, rounds: int) -> dict:
    """Each function's time in each round, run in turn round after round (in
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
    return times


def interleaved_medians(fns: dict, rounds: int) -> dict:
    """Median time of each function, measured by :func:`interleaved_times`."""
    times = interleaved_times(fns, rounds)
    return {name: statistics.median(values) for name, values in times.items()}


def ratio_spread(times: dict, numerator: str, denominator: str) -> dict:
    """The ratio of two interleaved figures: of their medians, and the median,
    lowest and highest of the per-round ratios (the spread)."""
    rounds = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
    return {
        "ratio": statistics.median(times[numerator]) / statistics.median(times[denominator]),
        "round_median": statistics.median(rounds),
        "round_min": min(rounds),
        "round_max": max(rounds),
    }


def _spread(r: dict) -> str:
    return f"{r['ratio']:.3f}x (rounds: median {r['round_median']:.3f}, {r['round_min']:.3f}-{r['round_max']:.3f})"


def base_and_batch(name, config, directory, batch):
    """The regular tfimm model, its weights saved as ``directory/base.h5``, and a
    seeded random input batch of ``batch`` samples."""
    import tfimm

    regular = tfimm.create_model(name, **config)
    base_file = os.path.join(directory, "base.h5")
    regular.save_weights(base_file)
    shape = regular.dummy_inputs.shape[1:]
    x = np.random.default_rng(0).normal(size=(batch, *shape)).astype("float32")
    return regular, base_file, x


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
    """Reads the adapter's arrays with numpy and assigns them into pages 1..r of
    every layer in one grouped op: the floor a pool load is compared with."""
    state = read_lora_state(path)
    np.savez(npz_path, **{k.replace("/", "|"): v for k, v in state.tensors.items()})
    targets = []
    for layer_path, slots in pool._lora.items():
        targets.append((slots.a_pages, f"{layer_path}/kernel_lora_a"))
        targets.append((slots.b_pages, f"{layer_path}/kernel_lora_b"))

    @tf.function
    def assign_all(values):
        for (var, _), value in zip(targets, values, strict=True):
            var[1 : 1 + value.shape[0]].assign(value)

    def run():
        with np.load(npz_path) as data:
            values = [data[key.replace("/", "|")] for _, key in targets]
        # A page is a column of A: the pool moves the rank axis first too.
        assign_all([np.moveaxis(v, -1, 0) if i % 2 == 0 else v for i, v in enumerate(values)])

    return median_time(run, repeat, warmup=2)


def run(name, config, ranks, batch, repeat, capacity):
    results = {"model": name, "batch": batch, "capacity": capacity, "ranks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        regular, base_file, x = base_and_batch(name, config, tmp, batch)
        base_forward = tf.function(lambda t: regular(t, training=False))
        # Batch 1 calls the base's traced graph directly, as the pool calls its own.
        base_single = base_forward.get_concrete_function(tf.TensorSpec(x[:1].shape, x.dtype))

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

                single_times = interleaved_times(
                    {  # batch 1: the request most services see
                        "base": lambda: base_single(x[:1]).numpy(),
                        "unmerged": lambda: pool.predict(x[:1], adapter="a0"),
                    },
                    8 * repeat,  # a 5% target on a noisy machine: many rounds
                )
                single = {k: statistics.median(v) for k, v in single_times.items()}

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
                        "batch1_spread": ratio_spread(single_times, "unmerged", "base"),
                    }
                )
            results["ranks"][str(rank)] = entry
    return results


def adapter_slot_bytes(pool, name) -> int:
    """Bytes resident adapter ``name`` takes: its pages and rows in every LoRA
    layer, and its slot of every full layer (heads, norms)."""
    slot = pool._table.slot_of(name)
    total = sum(slots.slot_bytes(slot) for slots in pool._lora.values())
    variables = [v for s in pool._full.values() for v in s.slots.values()]
    return total + sum(v.shape[1:].num_elements() * v.dtype.size for v in variables)


def slot_bytes_per_adapter(pool) -> float:
    """Mean bytes a resident adapter takes (:func:`adapter_slot_bytes`)."""
    names = pool.names()
    return sum(adapter_slot_bytes(pool, n) for n in names) / len(names)


def allocated_slot_bytes(pool) -> int:
    """Bytes of every LoRA layer's page and row stacks as allocated now (free
    pages and the zero page included), and of the full layers' slots."""
    total = sum(slots.allocated_bytes() for slots in pool._lora.values())
    variables = [v for s in pool._full.values() for v in s.slots.values()]
    return total + sum(v.shape.num_elements() * v.dtype.size for v in variables)


def own_bytes(path) -> int:
    """Bytes of an adapter's own tensors (what ``read_lora_state`` returns)."""
    return sum(v.nbytes for v in read_lora_state(path).tensors.values())


def rank_mix(name, config, batch, repeat, small=4, large=64, ranks=(4, 8, 16, 32, 64)):
    """Rank-``small`` adapters in a pool built for ``max_rank=large`` against the
    same adapters in a pool built for ``max_rank=small`` (interleaved), and the
    slot bytes each rank takes in the large pool against its own tensors."""
    results = {"model": name, "batch": batch, "small": small, "large": large, "by_rank": {}}
    with tempfile.TemporaryDirectory() as tmp:
        _, base_file, x = base_and_batch(name, config, tmp, batch)
        adapters = make_adapters(name, config, small, base_file, tmp, count=8)
        others = {r: make_adapters(name, config, r, base_file, tmp, count=1)[0] for r in ranks}
        pools = {
            small: AdapterPool(lora_model(name, config, small, base_file), 8, max_rank=small),
            large: AdapterPool(
                lora_model(name, config, large, base_file), 8 + len(ranks), max_rank=large
            ),
        }
        for pool in pools.values():
            for i, path in enumerate(adapters):
                pool.load(f"a{i}", path)
        mix = [f"a{i % 8}" for i in range(batch)]
        times = interleaved_times(
            {
                "mixed_large": lambda: pools[large].predict(x, adapters=mix),
                "mixed_small": lambda: pools[small].predict(x, adapters=mix),
                "single_large": lambda: pools[large].predict(x, adapter="a0"),
                "single_small": lambda: pools[small].predict(x, adapter="a0"),
            },
            repeat,
        )
        results["mixed"] = ratio_spread(times, "mixed_large", "mixed_small")
        results["single"] = ratio_spread(times, "single_large", "single_small")
        results["mixed_small_s"] = statistics.median(times["mixed_small"])
        pool = pools[large]
        for rank, path in others.items():
            pool.load(f"r{rank}", path)
            taken, own = adapter_slot_bytes(pool, f"r{rank}"), own_bytes(path)
            results["by_rank"][str(rank)] = {
                "slot_bytes": taken,
                "own_bytes": own,
                "slot_vs_own": taken / own,
                "padded_to_max_rank_bytes": own
                * large
                // rank,  # what slots as wide as max_rank took
            }
        residents = len(pool.names())
        results["allocated_bytes"] = allocated_slot_bytes(pool)
        results["resident_bytes"] = sum(adapter_slot_bytes(pool, n) for n in pool.names())
        results["allocated_vs_resident"] = results["allocated_bytes"] / results["resident_bytes"]
        results["residents"] = residents
    return results


def capacity_sweep(name, config, rank, capacities, batch, repeat):
    """A mixed batch of ``batch`` samples over 8 adapters, in pools of growing
    capacity, timed side by side (interleaved), with a single-adapter batch as
    the reference: the cost must follow the adapters present, not the
    resident ones."""
    results = {"model": name, "rank": rank, "batch": batch, "capacities": {}}
    with tempfile.TemporaryDirectory() as tmp:
        _, base_file, x = base_and_batch(name, config, tmp, batch)
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
    parser.add_argument("--skip-sweep", action="store_true", help="no capacity sweep")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "local", "pool_bench.json"),
    )
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    config = TINY if args.tiny else {}
    capacities = [int(c) for c in args.capacities.split(",")]
    mix = rank_mix(args.model, config, args.batch, args.repeat)
    print(
        f"rank mix, {args.model}, mixed batch of {args.batch} over 8 rank-{mix['small']} adapters:"
        f" pool max_rank={mix['large']} vs max_rank={mix['small']}: {_spread(mix['mixed'])}"
        f" | one adapter: {_spread(mix['single'])}"
    )
    for rank, r in mix["by_rank"].items():
        print(
            f"  rank {rank:>2} adapter in the max_rank={mix['large']} pool: {r['slot_bytes'] / 2**20:.2f} MiB"
            f" = {r['slot_vs_own']:.3f}x its own tensors (padded to max_rank: {r['padded_to_max_rank_bytes'] / 2**20:.2f} MiB)"
        )
    print(
        f"  allocated page and row stacks: {mix['allocated_bytes'] / 2**20:.1f} MiB for {mix['residents']} adapters"
        f" = {mix['allocated_vs_resident']:.3f}x their bytes"
    )
    results = {"rank_mix": mix, "tiny": args.tiny}
    if not args.skip_sweep:
        sweep = capacity_sweep(args.model, config, 16, capacities, args.batch, args.repeat)
        print(
            f"capacity sweep, {args.model}, rank 16, mixed batch of {args.batch} over 8 adapters:"
        )
        for capacity, r in sweep["capacities"].items():
            print(
                f"  capacity {capacity:>5}: {r['mixed_s'] * 1e3:7.1f} ms = {r['mixed_vs_capacity_8']:.3f}x"
                f" capacity {capacities[0]} | {r['slot_bytes_per_adapter'] / 2**20:.2f} MiB per resident adapter"
            )
        print(
            f"  mixed at capacity {capacities[0]} = {sweep['mixed_vs_single_adapter']:.3f}x a single-adapter batch"
        )
        results["capacity_sweep"] = sweep
    if args.sweep_only:
        _write(results, args.out)
        return results
    results.update(run(args.model, config, ranks, args.batch, args.repeat, capacity=8))

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
        f" {_spread(r['batch1_spread'])} the base"
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
