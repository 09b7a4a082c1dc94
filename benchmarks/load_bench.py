"""What the hardened read path costs: loads of one convnext_tiny rank-4 adapter,
side by side in one run (interleaved).

    .venv/bin/python benchmarks/load_bench.py          # convnext_tiny at 224
    .venv/bin/python benchmarks/load_bench.py --tiny   # a small config, seconds

Compared:
- ``load_lora_state``: the hardened path (bounded, confined reads, the hashed
  bytes parsed from memory, every field cross-checked, finite tensors, the
  fit and base checks) assigning into the model's variables;
- a trusting load: ``tf.train`` reads the checkpoint straight from disk and
  assigns, with no check at all (what a load cost before any validation);
- ``AdapterPool.load`` into a slot;
- the floor: the same arrays read with numpy from an ``.npz`` and assigned
  to the model's variables in one grouped op.

Writes benchmarks/results/local/load_bench.json (untracked; --out to choose).
"""

import argparse
import json
import os
import tempfile

import numpy as np
from pool_bench import TINY, interleaved_medians, lora_model, make_adapters

from lora_ckpt import AdapterPool, load_lora_state, read_lora_state, tf
from lora_ckpt.state import ModelSignature
from lora_ckpt.state.compiled import assign_all
from lora_ckpt.state.format import checkpoint_key


def run(name: str, config: dict, rank: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        import tfimm

        base_file = os.path.join(tmp, "base.h5")
        tfimm.create_model(name, **config).save_weights(base_file)
        path = make_adapters(name, config, rank, base_file, tmp, count=1)[0]
        model = lora_model(name, config, rank, base_file)
        variables = ModelSignature.of(model).variables
        state = read_lora_state(path)
        npz = os.path.join(tmp, "adapter.npz")
        np.savez(npz, **{k.replace("/", "|"): v for k, v in state.tensors.items()})
        pool = AdapterPool(lora_model(name, config, rank, base_file), capacity=2, max_rank=rank)

        def trusting():
            reader = tf.train.load_checkpoint(f"{path}/adapter")
            for key in state.tensors:
                variables[key].assign(reader.get_tensor(checkpoint_key(key)))

        targets = [variables[key] for key in state.tensors]

        def numpy_floor():
            with np.load(npz) as data:
                assign_all(targets, [data[key.replace("/", "|")] for key in state.tensors])

        def pool_load():
            pool.load("cold", path)
            pool.unload("cold")

        timed = interleaved_medians(
            {
                "load_lora_state": lambda: load_lora_state(model, path),
                "trusting_load": trusting,
                "numpy_floor": numpy_floor,
                "pool_load_and_unload": pool_load,
            },
            rounds,
        )
    return {
        "model": name,
        "rank": rank,
        "adapter_bytes": sum(f.size for f in state.config.files.values()),
        "seconds": timed,
        "load_lora_state_vs_trusting": timed["load_lora_state"] / timed["trusting_load"],
        "load_lora_state_vs_numpy": timed["load_lora_state"] / timed["numpy_floor"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="a small config, for a smoke run")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "local", "load_bench.json"),
    )
    args = parser.parse_args(argv)
    result = run(args.model, TINY if args.tiny else {}, args.rank, args.rounds)
    seconds = result["seconds"]
    print(f"{args.model} rank {args.rank}, adapter {result['adapter_bytes']:,} bytes:")
    for what, value in seconds.items():
        print(f"  {what:<22} {value * 1e3:7.2f} ms")
    print(
        f"  load_lora_state = {result['load_lora_state_vs_trusting']:.2f}x a trusting load,"
        f" {result['load_lora_state_vs_numpy']:.2f}x the numpy floor"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
