"""The names LoRA variables are saved under.

Checkpoints, ``.keras`` files, HDF5 weight files and adapter files key LoRA
variables by these names: changing one breaks every file written before.
"""

__all__ = [
    "LORA_A_NAME",
    "LORA_B_NAME",
    "LORA_MAGNITUDE_NAME",
    "LORA_STATE_NAME",
    "LORA_WEIGHT_NAMES",
]


LORA_A_NAME = "kernel_lora_a"
"""``A``: ``[in, R]`` (Dense) or ``[kh, kw, in, R]`` (Conv2D)."""

LORA_B_NAME = "kernel_lora_b"
"""``B``: ``[R, out]``."""

LORA_MAGNITUDE_NAME = "lora_magnitude"
"""DoRA's trainable magnitude per output channel, ``[out]``."""

LORA_STATE_NAME = "lora_state"
"""The checkpoint name of a LoRA layer's ``[merged, enabled]`` state variable."""

LORA_WEIGHT_NAMES = [LORA_A_NAME, LORA_B_NAME, LORA_MAGNITUDE_NAME, LORA_STATE_NAME]
"""
Patterns that match the LoRA weights, so they can be left out of weight
transfers between a model and its LoRA variant (tfimm's ``transfer_weights``).
"""
