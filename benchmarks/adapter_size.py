"""Bytes on disk: a LoRA adapter against the full model's weights files.

    .venv/bin/python benchmarks/adapter_size.py            # convnext_tiny, rank 4
    .venv/bin/python benchmarks/adapter_size.py --tiny     # a small config, seconds

Prints the sizes and ratios and writes benchmarks/results/local/adapter_size.json (untracked; --out to choose).
"""

import argparse
import json
import os
import tempfile
import time

import lora_ckpt
from lora_ckpt.state import inspect_adapter, save_lora_state

TINY = dict(embed_dim=(8, 16), nb_blocks=(1, 1), input_size=(32, 32), nb_classes=5)


def directory_size(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def prefix_size(prefix: str) -> int:
    folder, stem = os.path.split(prefix)
    return sum(
        os.path.getsize(os.path.join(folder, f))
        for f in os.listdir(folder)
        if f.startswith(stem + ".")
    )


def measure(model_name: str, rank: int, config: dict) -> dict:
    model = lora_ckpt.create_model(
        model_name, lora_rank=rank, lora_train_classifier=False, **config
    )
    regular = lora_ckpt.convert_to_regular_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = save_lora_state(model, os.path.join(tmp, "adapter"))
        regular.save_weights(os.path.join(tmp, "full.h5"))
        regular.save_weights(os.path.join(tmp, "full_ckpt", "model"))
        adapter_bytes = directory_size(adapter)
        assert adapter_bytes == inspect_adapter(adapter)["size_bytes"]
        h5_bytes = os.path.getsize(os.path.join(tmp, "full.h5"))
        ckpt_bytes = prefix_size(os.path.join(tmp, "full_ckpt", "model"))
    return {
        "model": model_name,
        "rank": rank,
        "config_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "adapter_bytes": adapter_bytes,
        "full_h5_bytes": h5_bytes,
        "full_tf_checkpoint_bytes": ckpt_bytes,
        "adapter_vs_h5": adapter_bytes / h5_bytes,
        "adapter_vs_tf_checkpoint": adapter_bytes / ckpt_bytes,
        "trainable_params": int(sum(v.shape.num_elements() for v in model.trainable_weights)),
        "total_params": int(model.count_params()),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a small config, for a smoke run")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "local", "adapter_size.json"),
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = measure(args.model, args.rank, TINY if args.tiny else {})
    result["seconds"] = round(time.perf_counter() - started, 2)
    print(f"{args.model} rank {args.rank}{' (tiny config)' if args.tiny else ''}")
    print(f"  adapter (LoRA A/B only): {result['adapter_bytes']:>12,} bytes")
    print(
        f"  full weights, HDF5:      {result['full_h5_bytes']:>12,} bytes   "
        f"adapter = {100 * result['adapter_vs_h5']:.3f}%"
    )
    print(
        f"  full weights, TF ckpt:   {result['full_tf_checkpoint_bytes']:>12,} bytes   "
        f"adapter = {100 * result['adapter_vs_tf_checkpoint']:.3f}%"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
