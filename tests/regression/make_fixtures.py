"""Writes the frozen regression fixtures of this library version. Not run by the tests.

Every adapter here was written once, by the lora_ckpt version that names its
directory, and is committed with the outputs its model computed before it was
saved. tests/test_regression.py reads them with today's code and must get the
same tensors and outputs: a change made to writer and reader alike cannot
pass unnoticed (PEFT's tests/regression/ does the same).

Layout (``VERSION`` is ``lora_ckpt.__version__`` when they were made)::

    tests/regression/
      input.npy                    the fixed input, (4, 32, 32, 3) float32
      VERSION/
        bases/NAME.h5              regular tfimm base weights, shared by fixtures
        FIXTURE/
          fixture.json             what it covers, how its model and its base are built
          adapter/                 the adapter directory exactly as saved
          expected.npy             the saved model's outputs on input.npy
          tensors.npz              every saved variable, taken from the model

Run it from the repository root to add the fixtures of a new version:

    python tests/regression/make_fixtures.py

It refuses to touch a version directory that exists: fixtures are never
rewritten, only added.
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

import tfimm  # noqa: E402

import lora_ckpt  # noqa: E402
from lora_ckpt import tf  # noqa: E402
from lora_ckpt.traversal import named_variables  # noqa: E402

# The tiny models of tests/conftest.py (kept literal here: fixtures must not
# change when the suite's models do).
TINY_CONVNEXT = dict(
    embed_dim=[8, 16],
    nb_blocks=[1, 1],
    input_size=[32, 32],
    nb_classes=4,
    init_scale=1.0,
    drop_path_rate=0.0,
)
TINY_VIT = dict(
    input_size=[32, 32], patch_size=8, embed_dim=16, nb_blocks=2, nb_heads=2, nb_classes=4
)
BASES = {
    "convnext": ("convnext_tiny", TINY_CONVNEXT),
    "vit": ("vit_tiny_patch16_224", TINY_VIT),
}

# name -> (base, create_model LoRA kwargs, save_lora_state kwargs, what it covers)
FIXTURES = {
    "v1_convnext_lora_head_labels": (
        "convnext",
        dict(
            nb_classes=3,
            lora_rank=2,
            lora_alpha=4.0,
            lora_train_classifier=True,
            lora_train_bias="lora_only",
        ),
        dict(labels=["red", "green", "blue"], metadata={"task": "color"}),
        "format 1: plain LoRA (rank 2, alpha 4), a classifier head of 3 classes trained "
        "in full on a base of 4, biases of LoRA layers (lora_only), labels and metadata",
    ),
    "v1_convnext_rank_pattern_bias_all": (
        "convnext",
        dict(
            lora_rank=2,
            lora_alpha=2.0,
            lora_rank_pattern={"*fc2": 3},
            lora_alpha_pattern={"*fc1": 5.0},
            lora_train_bias="all",
        ),
        dict(),
        "format 1: a rank pattern (fc2 rank 3) and an alpha pattern (fc1 alpha 5), "
        "every bias and norm beta saved (all)",
    ),
    "v2_convnext_dora": (
        "convnext",
        dict(lora_rank=2, lora_alpha=4.0, lora_use_dora=True),
        dict(),
        "format 2: DoRA (lora_magnitude per output, moved off the base's column norms)",
    ),
    "v2_vit_rslora": (
        "vit",
        dict(lora_rank=4, lora_alpha=4.0, lora_use_rslora=True),
        dict(),
        "format 2: rsLoRA (scaling alpha / sqrt(rank)) on a ViT",
    ),
}


def _perturb(model, rng) -> None:
    """Moves every trained variable off its initial value, so outputs differ from
    the base and a reader that dropped or swapped any of them would be caught."""
    for var in model.trainable_weights:
        value = var.numpy()
        if "lora_magnitude" in var.name:
            value = value * rng.uniform(0.5, 1.5, value.shape)
        elif "lora_a" in var.name or "lora_b" in var.name:
            value = rng.normal(0, 0.3, value.shape)
        else:  # biases, norm betas, the head
            value = value + rng.normal(0, 0.2, value.shape)
        var.assign(value.astype(var.dtype.as_numpy_dtype))


def main() -> int:
    version_dir = os.path.join(HERE, lora_ckpt.__version__)
    if os.path.exists(version_dir):
        print(f"{version_dir} exists; fixtures are never rewritten.", file=sys.stderr)
        return 1
    input_file = os.path.join(HERE, "input.npy")
    if os.path.exists(input_file):
        x = np.load(input_file)
    else:
        x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype("float32")
        np.save(input_file, x)
    os.makedirs(os.path.join(version_dir, "bases"))

    base_files = {}
    for i, (base, (model_name, config)) in enumerate(BASES.items()):
        tf.keras.utils.set_random_seed(100 + i)
        regular = tfimm.create_model(
            model_name, **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        )
        regular(regular.dummy_inputs)
        base_files[base] = f"bases/{base}.h5"
        regular.save_weights(os.path.join(version_dir, base_files[base]))

    for i, (name, (base, lora_kwargs, save_kwargs, covers)) in enumerate(FIXTURES.items()):
        model_name, config = BASES[base]
        tf.keras.utils.set_random_seed(i)
        kwargs = dict(config, **lora_kwargs)
        model = lora_ckpt.create_model(model_name, **kwargs)
        # A head of its own width comes from the adapter, not from the base's file.
        own_head = ["fc"] if kwargs["nb_classes"] != config["nb_classes"] else None
        lora_ckpt.load_base_weights(
            model, os.path.join(version_dir, base_files[base]), skip=own_head
        )
        _perturb(model, np.random.default_rng(i))
        expected = model(x, training=False).numpy()

        directory = os.path.join(version_dir, name)
        adapter = os.path.join(directory, "adapter")
        lora_ckpt.save_lora_state(model, adapter, **save_kwargs)
        summary = lora_ckpt.inspect_adapter(adapter)
        variables = named_variables(model)
        tensors = {key: variables[key].numpy() for key in summary["variables"]}
        read = lora_ckpt.read_lora_state(adapter).tensors
        assert sorted(read) == sorted(tensors)
        for key, value in tensors.items():
            np.testing.assert_array_equal(read[key], value)
        assert not np.allclose(
            expected, lora_ckpt.convert_to_regular_model(model, merge=False)(x).numpy()
        ), f"{name}: the adapter does not change the outputs"

        np.save(os.path.join(directory, "expected.npy"), expected)
        np.savez(os.path.join(directory, "tensors.npz"), **tensors)
        record = {
            "library_version": lora_ckpt.__version__,
            "format_version": summary["format_version"],
            "covers": covers,
            "model_name": model_name,
            "create_model_kwargs": kwargs,
            "base_weights": f"../{base_files[base]}",
            "base_model_kwargs": config,
            "save_kwargs": save_kwargs,
            "input": "../../input.npy",
            "expected_shape": list(expected.shape),
            "extra_layers": summary["saved"]["extra_layers"],
        }
        with open(os.path.join(directory, "fixture.json"), "w") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
            handle.write("\n")
        print(f"{name}: format {summary['format_version']}, {summary['size_bytes']:,} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
