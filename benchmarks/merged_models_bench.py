"""One AdapterPool against what users would do instead: one merged SavedModel per adapter.

    .venv/bin/python benchmarks/merged_models_bench.py            # convnext_tiny 224, N = 8, 64
    .venv/bin/python benchmarks/merged_models_bench.py --tiny     # a small config, seconds

For each N, in a fresh process: N merged SavedModels (``export_merged_savedmodel``,
as TF Serving would load them, called through ``serving_default``) and one
pool (``max_rank`` = the adapters' rank) holding N adapters, side by side:

- memory: resident set growth of the process for the pool with its N adapters
  (base model, graphs and slots), then for the N SavedModels on top;
- cold start per adapter: ``tf.saved_model.load`` + first answer, against
  ``pool.load`` + first answer (median over the adapters);
- throughput, interleaved round by round: batch 1 (a request for one adapter,
  cycling over them), batch 8 for one adapter, and 8 requests for 8 different
  adapters (one mixed batch for the pool; 8 calls of batch 1, one per
  SavedModel, for the merged models).

Eight distinct adapters are exported; for N > 8 each further SavedModel is a
copy of one of them in a directory of its own (separate files, separate
memory once loaded: values do not change the cost). Writes
benchmarks/results/local/merged_models.json and, with matplotlib,
merged_models.png (--out chooses the JSON path; the plot goes beside it).
"""

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pool_bench import TINY, interleaved_medians

import lora_ckpt  # before tfimm: it makes TensorFlow use Keras 2

DISTINCT = 8


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prepare(model_name, config, rank, count, work) -> dict:
    """Base weights, ``DISTINCT`` adapters and ``count`` merged SavedModels under ``work``."""
    import tfimm

    from lora_ckpt.export import export_merged_savedmodel

    base_file = os.path.join(work, "base.h5")
    tfimm.create_model(model_name, **config).save_weights(base_file)
    model = lora_ckpt.create_model(
        model_name, lora_rank=rank, lora_train_classifier=False, **config
    )
    lora_ckpt.load_base_weights(model, base_file)
    adapters, exported = [], []
    for i in range(min(DISTINCT, count)):
        rng = np.random.default_rng(i)
        for _, layer in lora_ckpt.lora_layers(model):
            for var in (layer.kernel_lora_a, layer.kernel_lora_b):
                var.assign(rng.normal(0, 0.02, var.shape).astype("float32"))
        adapters.append(lora_ckpt.save_lora_state(model, os.path.join(work, f"adapter{i}")))
        exported.append(export_merged_savedmodel(model, os.path.join(work, f"merged{i}")))
    for i in range(len(exported), count):
        shutil.copytree(exported[i % DISTINCT], os.path.join(work, f"merged{i}"))
    return {"base": base_file, "adapters": adapters}


def child(model_name, config, rank, count, work, rounds, budget) -> dict:
    """Runs in a fresh process: every figure for one N. SavedModels stop loading
    once they hold ``budget`` bytes; their memory for N is then extrapolated
    (``merged_rss_extrapolated``) and their throughput cycles over those loaded."""
    from lora_ckpt import AdapterPool, tf

    adapters = [os.path.join(work, f"adapter{i}") for i in range(min(DISTINCT, count))]
    gc.collect()
    start_rss = rss_bytes()
    model = lora_ckpt.create_model(
        model_name, lora_rank=rank, lora_train_classifier=False, **config
    )
    lora_ckpt.load_base_weights(model, os.path.join(work, "base.h5"))
    pool = AdapterPool(model, capacity=count, max_rank=rank)
    shape = pool.input_shape
    x = np.random.default_rng(0).normal(size=(8, *shape)).astype("float32")
    names = [f"a{i}" for i in range(count)]
    pool_cold = []
    for i, name in enumerate(names):
        began = time.perf_counter()
        pool.load(name, adapters[i % len(adapters)])
        pool.predict(x[:1], adapter=name)
        pool_cold.append(time.perf_counter() - began)
    gc.collect()
    pool_rss = rss_bytes() - start_rss

    merged, merged_cold = [], []
    for i in range(count):
        if rss_bytes() - start_rss - pool_rss > budget:
            break  # a shared machine: the rest is extrapolated from the models loaded
        began = time.perf_counter()
        loaded = tf.saved_model.load(os.path.join(work, f"merged{i}"))
        serve = loaded.signatures["serving_default"]
        serve(images=tf.constant(x[:1]))
        merged_cold.append(time.perf_counter() - began)
        merged.append((loaded, serve))
    gc.collect()
    merged_rss = rss_bytes() - start_rss - pool_rss
    loaded = len(merged)

    cycle = {"pool": 0, "merged": 0}

    def next_index(kind):
        cycle[kind] += 1
        return cycle[kind] % (count if kind == "pool" else loaded)

    def merged_call(i, batch):
        return merged[i][1](images=tf.constant(batch))["logits"].numpy()

    distinct = names[: min(8, loaded)]
    timed = interleaved_medians(
        {
            "pool_b1": lambda: pool.predict(x[:1], adapter=names[next_index("pool")]),
            "merged_b1": lambda: merged_call(next_index("merged"), x[:1]),
            "pool_b8": lambda: pool.predict(x, adapter=names[next_index("pool")]),
            "merged_b8": lambda: merged_call(next_index("merged"), x),
            "pool_mixed8": lambda: pool.predict(x[: len(distinct)], adapters=distinct),
            "merged_mixed8": lambda: [merged_call(j, x[j : j + 1]) for j in range(len(distinct))],
        },
        rounds,
    )
    samples = {"b1": 1, "b8": 8, "mixed8": len(distinct)}
    result = {
        "n": count,
        "pool_rss_bytes": pool_rss,
        "merged_loaded": loaded,
        "merged_rss_bytes": merged_rss * count / loaded,
        "merged_rss_extrapolated": loaded < count,
        "pool_rss_per_adapter": pool_rss / count,
        "merged_rss_per_adapter": merged_rss / loaded,
        "pool_cold_start_s": statistics.median(pool_cold),
        "merged_cold_start_s": statistics.median(merged_cold),
        "times_s": timed,
    }
    for kind, n in samples.items():
        result[f"pool_{kind}_per_s"] = n / timed[f"pool_{kind}"]
        result[f"merged_{kind}_per_s"] = n / timed[f"merged_{kind}"]
        result[f"pool_vs_merged_{kind}_throughput"] = (
            timed[f"merged_{kind}"] / timed[f"pool_{kind}"]
        )
    result["merged_vs_pool_memory"] = merged_rss / pool_rss
    result["merged_vs_pool_cold_start"] = (
        result["merged_cold_start_s"] / result["pool_cold_start_s"]
    )
    return result


def plot(results: dict, path: str) -> bool:
    """Bars, pool against merged SavedModels, for each N; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    counts = list(results["n"])
    positions = np.arange(len(counts))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (title, key, scale) in zip(
        axes[:2],
        [
            ("memory per adapter (MiB, log)", "rss_per_adapter", 2**-20),
            ("cold start per adapter, to the first answer (ms, log)", "cold_start_s", 1e3),
        ],
        strict=True,
    ):
        pool = [results["n"][n][f"pool_{key}"] * scale for n in counts]
        merged = [results["n"][n][f"merged_{key}"] * scale for n in counts]
        ax.bar(positions - 0.2, pool, 0.4, label="AdapterPool", color="#3b7dd8")
        ax.bar(positions + 0.2, merged, 0.4, label="merged SavedModels", color="#d8863b")
        ax.set_xticks(positions, [f"N = {n}" for n in counts])
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    # Throughput as a ratio measured interleaved in one process: absolute
    # figures of the N = 8 and N = 64 processes saw different machine loads.
    kinds = [
        ("b1", "batch 1"),
        ("b8", "batch 8, one adapter"),
        ("mixed8", "8 requests, 8 adapters"),
    ]
    for i, (kind, label) in enumerate(kinds):
        values = [results["n"][n][f"pool_vs_merged_{kind}_throughput"] for n in counts]
        axes[2].bar(positions + (i - 1) * 0.27, values, 0.27, label=label)
    axes[2].axhline(1.0, color="black", linewidth=0.8)
    axes[2].set_xticks(positions, [f"N = {n}" for n in counts])
    axes[2].set_title("pool throughput / merged SavedModels' (interleaved)", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{results['model']} rank {results['rank']}: one pool vs N merged SavedModels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--counts", default="8,64")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tiny", action="store_true", help="a small config, for a smoke run")
    parser.add_argument(
        "--max-merged-gib",
        type=float,
        default=6.0,
        help="stop loading SavedModels past this much memory (the machine is shared)",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "local", "merged_models.json"),
    )
    args = parser.parse_args(argv)
    config = TINY if args.tiny else {}
    if args.child:
        budget = args.max_merged_gib * 2**30
        result = child(args.model, config, args.rank, args.child, args.work, args.rounds, budget)
        print(json.dumps(result))
        return result
    counts = [int(c) for c in args.counts.split(",")]
    results = {"model": args.model, "rank": args.rank, "tiny": args.tiny, "n": {}}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        prepare(args.model, config, args.rank, max(counts), work)
        for count in counts:
            command = [sys.executable, os.path.abspath(__file__), "--child", str(count)]
            command += ["--work", work, "--rounds", str(args.rounds), "--model", args.model]
            command += ["--rank", str(args.rank), "--max-merged-gib", str(args.max_merged_gib)]
            command += ["--tiny"] if args.tiny else []
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            results["n"][count] = json.loads(out.stdout.strip().splitlines()[-1])
    results["seconds"] = time.perf_counter() - began
    for count, r in results["n"].items():
        note = (
            f"; {r['merged_loaded']} loaded, extrapolated" if r["merged_rss_extrapolated"] else ""
        )
        print(
            f"N = {count:>3}: memory per adapter pool {r['pool_rss_per_adapter'] / 2**20:.1f} MiB"
            f" | merged {r['merged_rss_per_adapter'] / 2**20:.1f} MiB"
            f" ({r['merged_vs_pool_memory']:.1f}x the pool's total{note})"
            f" | cold start pool {r['pool_cold_start_s'] * 1e3:.0f} ms"
            f" | merged {r['merged_cold_start_s'] * 1e3:.0f} ms"
        )
        print(
            f"         samples/s pool vs merged: batch 1 {r['pool_b1_per_s']:.1f} vs"
            f" {r['merged_b1_per_s']:.1f} ({r['pool_vs_merged_b1_throughput']:.2f}x)"
            f" | batch 8 {r['pool_b8_per_s']:.1f} vs {r['merged_b8_per_s']:.1f}"
            f" ({r['pool_vs_merged_b8_throughput']:.2f}x)"
            f" | 8 adapters {r['pool_mixed8_per_s']:.1f} vs {r['merged_mixed8_per_s']:.1f}"
            f" ({r['pool_vs_merged_mixed8_throughput']:.2f}x)"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    print(
        f"done in {results['seconds']:.0f} s; "
        + (png if plot(results, png) else "no matplotlib: no plot")
    )
    return results


if __name__ == "__main__":
    main()
