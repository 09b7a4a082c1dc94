"""All benchmarks in one run: storage, getting a fine-tuned model ready,
forward passes, merge/unmerge and memory, against the ways people do it today.

    .venv/bin/python benchmarks/run.py            # convnext_tiny (+ vit_tiny), about 10 minutes
    .venv/bin/python benchmarks/run.py --tiny     # small configs, a smoke run

Each time is the median of several runs after a warm-up; figures that are
compared are measured side by side (interleaved). Writes
benchmarks/results/local/run.json, table.md and, when matplotlib is installed,
ratios.png (untracked: pass --out benchmarks/results to update the committed
figures).
"""

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapter_size import directory_size, prefix_size
from pool_bench import interleaved_medians, make_adapters, median_time

import lora_ckpt
from lora_ckpt import AdapterPool, load_base_weights, load_lora_state, save_lora_state, tf

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "local")
TINY = dict(embed_dim=(8, 16), nb_blocks=(1, 1), input_size=(32, 32), nb_classes=5, init_scale=1.0)
TINY_VIT = dict(
    input_size=(32, 32), patch_size=8, embed_dim=16, nb_blocks=2, nb_heads=2, nb_classes=5
)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def storage(name, config, ranks, tmp) -> dict:
    """1. Bytes on disk: adapter vs the full model's weights (HDF5 and TF checkpoint)."""
    import tfimm

    regular = tfimm.create_model(name, **config)
    regular.save_weights(os.path.join(tmp, f"{name}_full.h5"))
    regular.save_weights(os.path.join(tmp, f"{name}_ckpt", "model"))
    full_h5 = os.path.getsize(os.path.join(tmp, f"{name}_full.h5"))
    full_ckpt = prefix_size(os.path.join(tmp, f"{name}_ckpt", "model"))
    rows = {}
    for rank in ranks:
        model = lora_ckpt.create_model(name, lora_rank=rank, lora_train_classifier=False, **config)
        path = save_lora_state(model, os.path.join(tmp, f"{name}_size_r{rank}"))
        size = directory_size(path)
        rows[str(rank)] = {
            "adapter_bytes": size,
            "vs_h5": size / full_h5,
            "vs_tf_checkpoint": size / full_ckpt,
        }
    return {"full_h5_bytes": full_h5, "full_tf_checkpoint_bytes": full_ckpt, "ranks": rows}


def readiness(name, config, rank, tmp, repeat) -> dict:
    """2. Getting a fine-tuned model ready to serve from disk, five ways."""
    import tfimm

    base_file = os.path.join(tmp, f"{name}_base.h5")
    tfimm.create_model(name, **config).save_weights(base_file)
    tuned = lora_ckpt.create_model(name, lora_rank=rank, lora_train_classifier=False, **config)
    load_base_weights(tuned, base_file)
    for _, layer in lora_ckpt.lora_layers(tuned):
        layer.kernel_lora_b.assign(np.full(layer.kernel_lora_b.shape, 0.01, "float32"))
    adapter = save_lora_state(tuned, os.path.join(tmp, f"{name}_ready_adapter"))
    full_file = os.path.join(tmp, f"{name}_finetuned_full.h5")
    lora_ckpt.convert_to_regular_model(tuned).save_weights(full_file)

    serving_full = tfimm.create_model(name, **config)
    serving_lora = lora_ckpt.create_model(
        name, lora_rank=rank, lora_train_classifier=False, **config
    )
    load_base_weights(serving_lora, base_file)
    pool = AdapterPool(serving_lora, capacity=2, max_rank=rank)
    pool.load("resident", adapter)

    def tfimm_way():  # tfimm's README: regular model, its full weights, then convert
        regular = tfimm.create_model(name, **config)
        regular.load_weights(full_file)
        lora_ckpt.convert_to_lora_model(regular, lora_rank=rank, lora_train_classifier=False)

    times = {
        "a_tfimm_build_load_convert_s": median_time(tfimm_way, max(3, repeat // 2)),
        "b_load_full_weights_s": median_time(lambda: serving_full.load_weights(full_file), repeat),
        "c_load_lora_state_s": median_time(lambda: load_lora_state(serving_lora, adapter), repeat),
        "d_pool_load_s": median_time(
            lambda: pool.load("cold", adapter),
            repeat,
            setup=lambda: "cold" in pool.names() and pool.unload("cold"),
        ),
        "e_switch_resident_s": median_time(lambda: pool.activate("resident"), repeat * 50),
    }
    times.update(
        {
            "c_vs_a": times["a_tfimm_build_load_convert_s"] / times["c_load_lora_state_s"],
            "c_vs_b": times["b_load_full_weights_s"] / times["c_load_lora_state_s"],
            "e_vs_c": times["c_load_lora_state_s"] / times["e_switch_resident_s"],
        }
    )
    return times


def forward(name, config, rank, tmp, repeat) -> dict:
    """3. Forward time at batch 1 and 8; 4. merge/unmerge time and drift."""
    import tfimm

    base_file = os.path.join(tmp, f"{name}_base.h5")
    regular = tfimm.create_model(name, **config)
    regular.load_weights(base_file)
    base_forward = tf.function(lambda t: regular(t, training=False))
    adapters = make_adapters(name, config, rank, base_file, tmp, count=8)
    model = lora_ckpt.create_model(name, lora_rank=rank, lora_train_classifier=False, **config)
    load_base_weights(model, base_file)
    pool = AdapterPool(model, capacity=8, max_rank=rank)
    names = [f"a{i}" for i in range(8)]
    for n, path in zip(names, adapters, strict=True):
        pool.load(n, path)
    shape = regular.dummy_inputs.shape[1:]
    result = {}
    for batch in (1, 8):
        x = np.random.default_rng(batch).normal(size=(batch, *shape)).astype("float32")

        def one_by_one():
            for i in range(batch):
                pool.activate(names[i % 8])
                pool.predict(x[i : i + 1])

        timed = interleaved_medians(
            {
                "base": lambda: base_forward(x).numpy(),
                "unmerged": lambda: pool.predict(x, adapter="a0"),
                "mixed": lambda: pool.predict(x, adapters=[names[i % 8] for i in range(batch)]),
                "one_by_one_with_swaps": one_by_one,
            },
            repeat,
        )
        pool.merge("a0")
        merged = interleaved_medians(
            {
                "base": lambda: base_forward(x).numpy(),
                "merged": lambda: pool.predict(x, adapter="a0"),
            },
            2 * repeat,
        )
        pool.unmerge()
        result[f"batch_{batch}"] = {
            **{f"{k}_s": v for k, v in timed.items()},
            "merged_s": merged["merged"],
            "unmerged_vs_base": timed["unmerged"] / timed["base"],
            "merged_vs_base": merged["merged"] / merged["base"],
            "mixed_vs_one_by_one_speedup": timed["one_by_one_with_swaps"] / timed["mixed"],
        }

    layers = [layer for _, layer in lora_ckpt.lora_layers(model)]
    kernels = [layer.kernel.numpy().copy() for layer in layers]
    result["merge_s"] = median_time(
        lambda: pool.merge("a1"), repeat, setup=lambda: pool.merged and pool.unmerge()
    )
    pool.unmerge()
    result["unmerge_s"] = median_time(pool.unmerge, repeat, setup=lambda: pool.merge("a1"))
    for i in range(1000):
        pool.merge(names[i % 8])
        pool.unmerge()
    result["max_abs_error_after_1000_cycles"] = float(
        max(
            np.abs(layer.kernel.numpy() - kernel).max()
            for layer, kernel in zip(layers, kernels, strict=True)
        )
    )
    return result


def _probe(args) -> None:
    """Runs in a fresh process: resident memory added by one thing (see memory())."""
    import tfimm

    kind, name, config, rank, k, max_rank, base_file, adapter = args
    config = json.loads(config)
    config = {key: tuple(v) if isinstance(v, list) else v for key, v in config.items()}
    model = lora_ckpt.create_model(name, lora_rank=int(rank), lora_train_classifier=False, **config)
    load_base_weights(model, base_file)
    model(model.dummy_inputs)
    gc.collect()
    before = rss_bytes()
    keep = []
    if kind == "pool":
        pool = AdapterPool(model, capacity=int(k), max_rank=int(max_rank))
        for i in range(int(k)):
            pool.load(f"a{i}", adapter)
        pool.predict(np.asarray(model.dummy_inputs), adapter="a0")
        keep.append(pool)
    else:  # one more fine-tuned model, as a serving process would hold it
        copy = tfimm.create_model(name, **config)
        copy.load_weights(base_file)
        copy(copy.dummy_inputs)
        keep.append(copy)
    gc.collect()
    print(json.dumps({"rss_added_bytes": rss_bytes() - before}))


def _run_probe(*args) -> int:
    import subprocess

    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--probe", *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_added_bytes"]


def memory(name, config, rank, tmp, counts) -> dict:
    """5. Resident memory K adapters add to a serving process, against K full
    fine-tuned copies; each figure measured in a fresh process."""
    base_file = os.path.join(tmp, f"{name}_base.h5")
    adapter = make_adapters(name, config, rank, base_file, tmp, count=1)[0]
    cfg = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})
    full_copy = _run_probe("full", name, cfg, rank, 0, rank, base_file, adapter)
    result = {"full_copy_rss_bytes": full_copy, "k": {}}
    for k in counts:
        for max_rank in sorted({rank, 4 * rank}):
            added = _run_probe("pool", name, cfg, rank, k, max_rank, base_file, adapter)
            result["k"][f"{k}_maxrank{max_rank}"] = {
                "k": k,
                "max_rank": max_rank,
                "rss_added_bytes": added,
                "full_copies_bytes": k * full_copy,
                "vs_full_copies": added / (k * full_copy),
            }
    return result


def write_table(results: dict, path: str) -> str:
    lines = [
        f"Machine: {results['machine']}",
        "",
        "| figure | measured | target |",
        "| --- | --- | --- |",
    ]
    main = results["models"][results["main_model"]]
    r = main["readiness"]
    rank = results["rank"]
    for rk, row in main["storage"]["ranks"].items():
        lines.append(
            f"| adapter bytes, rank {rk} | {row['adapter_bytes']:,} B = {100 * row['vs_h5']:.2f}% of the "
            f"full HDF5 ({main['storage']['full_h5_bytes']:,} B) | |"
        )
    lines += [
        f"| (a) tfimm way: build regular, load full weights, convert | {r['a_tfimm_build_load_convert_s'] * 1e3:.0f} ms | |",
        f"| (b) load the full fine-tuned weights | {r['b_load_full_weights_s'] * 1e3:.0f} ms | |",
        f"| (c) `load_lora_state` onto the loaded base | {r['c_load_lora_state_s'] * 1e3:.1f} ms: "
        f"{r['c_vs_a']:.1f}x faster than (a), {r['c_vs_b']:.1f}x faster than (b) | >= 10x (a), >= 2x (b) |",
        f"| (d) `AdapterPool.load` into a slot | {r['d_pool_load_s'] * 1e3:.1f} ms | |",
        f"| (e) switch to a resident adapter | {r['e_switch_resident_s'] * 1e6:.2f} us: {r['e_vs_c']:,.0f}x faster "
        "than (c) | >= 100x |",
    ]
    f = main["forward"]
    for batch in ("batch_1", "batch_8"):
        b = f[batch]
        lines.append(
            f"| forward {batch.replace('_', ' ')}: base {b['base_s'] * 1e3:.1f} ms | unmerged {b['unmerged_vs_base']:.3f}x,"
            f" merged {b['merged_vs_base']:.3f}x; mixed over {batch[-1]} adapter(s) {b['mixed_s'] * 1e3:.1f} ms,"
            f" {b['mixed_vs_one_by_one_speedup']:.2f}x faster than one by one with swaps | |"
        )
    lines.append(
        f"| merge / unmerge (rank {rank}) | {f['merge_s'] * 1e3:.1f} / {f['unmerge_s'] * 1e3:.1f} ms; "
        f"max abs error after 1000 cycles: {f['max_abs_error_after_1000_cycles']} | 0 |"
    )
    copy = main["memory"]["full_copy_rss_bytes"]
    lines.append(
        f"| one more full fine-tuned copy in a process | {copy / 2**20:.1f} MiB resident | |"
    )
    for m in main["memory"]["k"].values():
        lines.append(
            f"| {m['k']} resident rank-{rank} adapters, pool max_rank {m['max_rank']} | process grew "
            f"{m['rss_added_bytes'] / 2**20:.1f} MiB = {100 * m['vs_full_copies']:.2f}% of {m['k']} full copies"
            f" | < 10% (64) |"
        )
    text = "\n".join(lines) + "\n"
    with open(path, "w") as handle:
        handle.write(text)
    return text


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    main = results["models"][results["main_model"]]
    r, f = main["readiness"], main["forward"]["batch_8"]
    labels = [
        "(c) vs (a)\nload speed-up",
        "(c) vs (b)\nload speed-up",
        "(e) vs (c)\nswitch speed-up",
        "full / adapter\nbytes",
        "mixed vs one-by-one\n(batch 8)",
    ]
    values = [
        r["c_vs_a"],
        r["c_vs_b"],
        r["e_vs_c"],
        1 / main["storage"]["ranks"][str(results["rank"])]["vs_h5"],
        f["mixed_vs_one_by_one_speedup"],
    ]
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(labels, values, color="#3b7dd8")
    ax.set_yscale("log")
    ax.set_ylabel("ratio (log scale)")
    ax.set_title(
        f"lora_ckpt, {results['main_model']} rank {results['rank']} ({results['machine_short']})"
    )
    for bar, value in zip(bars, values, strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2, value, f"{value:,.1f}x", ha="center", va="bottom"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small configs, a smoke run")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--probe", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        _probe(args.probe)
        return {}
    started = time.perf_counter()
    if args.tiny:
        models = {"convnext_tiny": TINY, "vit_tiny_patch16_224": TINY_VIT}
    else:
        models = {"convnext_tiny": {}, "vit_tiny_patch16_224": {}}
    ranks = [2, 4] if args.tiny else [2, 4, 16, 64]
    rank = 4
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}, {platform.platform()}",
        "machine_short": f"{os.cpu_count()} CPU cores",
        "main_model": "convnext_tiny",
        "rank": rank,
        "tiny": args.tiny,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in models.items():
            print(f"== {name}", flush=True)
            entry = {"storage": storage(name, config, ranks, tmp)}
            entry["readiness"] = readiness(name, config, rank, tmp, args.repeat)
            if name == results["main_model"]:
                entry["forward"] = forward(name, config, rank, tmp, args.repeat)
                entry["memory"] = memory(
                    name, config, rank, tmp, [1, 8] if args.tiny else [1, 8, 64]
                )
            results["models"][name] = entry
    results["seconds"] = time.perf_counter() - started
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "run.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(write_table(results, os.path.join(args.out, "table.md")))
    plotted = plot(results, os.path.join(args.out, "ratios.png"))
    print(
        f"done in {results['seconds']:.0f} s{'; plot: ratios.png' if plotted else ' (no matplotlib: no plot)'}"
    )
    return results


if __name__ == "__main__":
    main()
