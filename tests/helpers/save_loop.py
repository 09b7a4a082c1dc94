"""Saves an adapter over and over, each version filled with its number, until killed.

Used by test_crash_safety: prints "ready" once TensorFlow is up, then the
number of every version whose save returned.
"""

import sys

import lora_ckpt
from lora_ckpt._tf import tf


def main(path: str) -> None:
    inputs = tf.keras.Input((128,))
    hidden = lora_ckpt.LoRADense(128, lora_rank=16, name="fc0")(inputs)
    model = tf.keras.Model(inputs, lora_ckpt.LoRADense(128, lora_rank=16, name="fc1")(hidden))
    lora_vars = [v for v in model.weights if "lora" in v.name]
    print("ready", flush=True)
    version = 0
    while True:
        version += 1
        for var in lora_vars:
            var.assign(tf.fill(var.shape, float(version)))
        lora_ckpt.save_lora_state(model, path, overwrite=True, metadata={"version": version})
        print(version, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
