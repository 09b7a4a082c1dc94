"""LoRA's scaling rule and the limits an adapter may hold, shared by the layers
and the adapter format. Plain Python: reading an adapter's config (listing a
store) needs no TensorFlow."""

import math

__all__ = ["FLOAT32_MAX", "MAX_LORA_RANK", "lora_scaling"]


MAX_LORA_RANK = 1 << 16
"""The largest rank a layer (or an adapter file) may have."""

FLOAT32_MAX = 3.4028234663852886e38
"""A scaling above this is infinite in float32: refused in layers and files."""


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's ``alpha / rank``, or rsLoRA's ``alpha / sqrt(rank)``, as a Python float.

    Adapter configs record this value and loaders compare it exactly, so every
    place computes it with this one function.

    Args:
        alpha: The scale numerator ``lora_alpha``.
        rank: The LoRA rank.
        rslora: Whether to divide by ``sqrt(rank)`` (rsLoRA).

    Returns:
        The scaling.
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank
