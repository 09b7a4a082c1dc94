"""LoRA hyper-parameters: validation, scaling and ``A``'s initializer.

Every place that takes a rank, alpha, dropout or initializer from a user
(layers, architecture configs, adapter files) checks it here, so the limits
and messages are the same everywhere.
"""

import math
import numbers

import numpy as np

from .._tf import tf
from ..errors import LoRAConfigError
from ..scaling import FLOAT32_MAX, MAX_LORA_RANK, lora_scaling

__all__ = [
    "FLOAT32_MAX",
    "LORA_INITIALIZERS",
    "LORA_LAYER_ARGS",
    "MAX_LORA_RANK",
    "flag",
    "lora_scaling",
    "resolve_lora_initializer",
    "validate_lora_args",
]


LORA_INITIALIZERS = ("gaussian", "kaiming_uniform")
"""PEFT's names for ``A``'s initialisation, accepted besides Keras initializers."""

LORA_LAYER_ARGS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_initializer",
    "lora_regularizer",
    "lora_use_dora",
    "lora_use_rslora",
    "lora_freeze_base",
    "lora_bias_trainable",
    "lora_enabled",
)
"""Keyword arguments a LoRA layer takes besides those of its base layer."""


def resolve_lora_initializer(spec, rank: int) -> tf.keras.initializers.Initializer:
    """The Keras initializer for ``A`` from a Keras spec or one of PEFT's names.

    Args:
        spec: A Keras initializer (object, name or config), ``"gaussian"``
            (normal with standard deviation ``1 / rank``, PEFT's ``"gaussian"``)
            or ``"kaiming_uniform"`` (PEFT's default for ``A``: uniform within
            ``1 / sqrt(fan_in)``).
        rank: The LoRA rank.

    Returns:
        The initializer.

    Raises:
        LoRAConfigError: If Keras does not know ``spec``.
    """
    if spec == "gaussian":
        return tf.keras.initializers.RandomNormal(stddev=1.0 / rank)
    if spec in ("kaiming_uniform", "kaiming"):
        # torch's kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + 5) * fan_in)).
        return tf.keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")
    try:
        initializer = tf.keras.initializers.get(spec)
        # A bad config fails here, not at build; a copy is called, since Keras
        # initializers remember their first call.
        if isinstance(initializer, tf.keras.initializers.Initializer):
            probe = initializer.__class__.from_config(initializer.get_config())
            probe(shape=(1, 1), dtype=tf.float32)
        return initializer
    except (ValueError, TypeError) as exc:
        raise LoRAConfigError(
            f"lora_initializer {spec!r:.80} is not a usable initializer ({exc!s:.80}): use a "
            f"Keras initializer or one of {list(LORA_INITIALIZERS)}."
        ) from exc


def validate_lora_args(lora_rank, lora_alpha, lora_dropout=0.0) -> None:
    """Checks LoRA hyper-parameters and raises a clear error for bad ones.

    Args:
        lora_rank: Rank of the update; an integer from 1 to :data:`MAX_LORA_RANK`.
        lora_alpha: Scale numerator; a positive number whose scaling is
            finite in float32.
        lora_dropout: Dropout rate on the LoRA branch input, in ``[0, 1)``.

    Raises:
        LoRAConfigError: If any argument is out of range or of the wrong type.
    """
    if (
        isinstance(lora_rank, bool)
        or not isinstance(lora_rank, numbers.Integral)
        or not 0 < lora_rank <= MAX_LORA_RANK
    ):
        raise LoRAConfigError(
            f"lora_rank must be a positive integer (at most {MAX_LORA_RANK}), got "
            f"{lora_rank!r:.40}. Typical values are 1 to 64."
        )
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise LoRAConfigError(f"lora_alpha must be a number, got {lora_alpha!r:.40}.")
    try:
        scaling = lora_scaling(float(lora_alpha), int(lora_rank))
    except OverflowError:
        scaling = math.inf
    if not lora_alpha > 0 or not scaling <= FLOAT32_MAX:
        raise LoRAConfigError(
            f"lora_alpha must be positive, and alpha / rank finite in float32, got "
            f"{lora_alpha!r:.40}; the update is scaled by lora_alpha / lora_rank."
        )
    if (
        isinstance(lora_dropout, bool)
        or not isinstance(lora_dropout, numbers.Real)
        or not 0.0 <= lora_dropout < 1.0
    ):
        raise LoRAConfigError(f"lora_dropout must be a rate in [0, 1), got {lora_dropout!r:.40}.")


def flag(value, name: str) -> bool:
    """``value`` as a bool, if it is one.

    Raises:
        LoRAConfigError: For anything but ``True``/``False`` (``bool("no")``
            is True, so a string must not pass as a flag).
    """
    if not isinstance(value, (bool, np.bool_)):
        raise LoRAConfigError(f"{name} must be True or False, got {value!r:.40}.")
    return bool(value)
