"""Saves an adapter over and over, each version filled with its number, until killed.

Used by test_crash_safety: prints "ready" once TensorFlow is up, then the
number of every version whose save returned. ``build_model`` and
``fill_version`` are shared with the fault-injection tests.
"""

import sys

import lora_ckpt
from lora_ckpt import tf


def build_model(width=128, rank=16):
    """Two LoRA Dense layers in a functional model."""
    inputs = tf.keras.Input((width,))
    hidden = lora_ckpt.LoRADense(width, lora_rank=rank, name="fc0")(inputs)
    outputs = lora_ckpt.LoRADense(width, lora_rank=rank, name="fc1")(hidden)
    return tf.keras.Model(inputs, outputs)


def fill_version(model, version: int) -> None:
    """Fills every LoRA A and B with ``version``, so a reader can tell versions apart."""
    for _, layer in lora_ckpt.lora_layers(model):
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            var.assign(tf.fill(var.shape, float(version)))


def main(path: str) -> None:
    model = build_model()
    print("ready", flush=True)
    version = 0
    while True:
        version += 1
        fill_version(model, version)
        lora_ckpt.save_lora_state(model, path, overwrite=True, metadata={"version": version})
        print(version, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
