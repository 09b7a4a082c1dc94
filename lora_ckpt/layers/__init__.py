"""LoRA layers: drop-in subclasses of Keras' ``Dense`` and ``Conv2D``.

Each layer computes ``base(x) + scaling * B(A(dropout(x)))`` before bias and
activation, with ``scaling = lora_alpha / lora_rank`` (rsLoRA:
``lora_alpha / sqrt(lora_rank)``) and ``B`` initialised to zero, so a fresh
LoRA layer computes exactly what its base layer computes. With DoRA the sum is
multiplied per output channel by ``magnitude / ||W0 + scaling * A @ B||``
(the column norm over every kernel axis but the last), with the magnitude
trainable and initialised to the base kernel's column norms.

The low-rank update is a separate branch of the forward pass, never written
into the kernel inside ``call``: gradients reach ``kernel_lora_a`` and
``kernel_lora_b``, and concurrent calls never see a half-updated kernel.
Merging folds the update into the kernel for inference; it is computed from a
pristine copy of the base kernel, so unmerging restores it bit for bit.

As in tfimm, a freshly constructed LoRA layer freezes nothing: all its
variables are trainable. Converting a model (``create_model``,
``convert_to_lora_model``) freezes the base, which sets ``lora_freeze_base``.

Modules, lowest first:

- :mod:`.names`: the names LoRA variables are saved under.
- :mod:`.args`: validation of LoRA hyper-parameters, scaling, ``A``'s initializer.
- :mod:`.ops`: tensor helpers (matmul over the last axis, column norms).
- :mod:`.merge_state`: the merged/enabled flags and the kept base copy.
- :mod:`.variants`: plain LoRA and DoRA as strategy objects.
- :mod:`.mixin`: what every LoRA layer shares.
- :mod:`.dense`, :mod:`.conv`: ``LoRADense``, ``LoRAConv2D``.
- :mod:`.convert`: the base class -> LoRA class table and layer conversion.
"""

from .args import (
    FLOAT32_MAX,
    LORA_INITIALIZERS,
    LORA_LAYER_ARGS,
    MAX_LORA_RANK,
    lora_scaling,
    resolve_lora_initializer,
    validate_lora_args,
)
from .conv import LoRAConv2D
from .convert import (
    convert_to_lora_layer,
    describe_unsupported,
    has_kernel,
    has_lora_counterpart,
    is_lora_layer,
    register_lora_layer,
    supported_layer_types,
)
from .dense import LoRADense
from .merge_state import KeptBase, MergeState
from .mixin import LoRALayerMixin
from .names import LORA_STATE_NAME, LORA_WEIGHT_NAMES
from .ops import column_norm, dora_scale, kernel_fingerprint, matmul_last_axis
from .variants import DORA, PLAIN_LORA, DoRAVariant, LoRAVariant, lora_variant

__all__ = [
    "DORA",
    "FLOAT32_MAX",
    "LORA_INITIALIZERS",
    "LORA_LAYER_ARGS",
    "LORA_STATE_NAME",
    "LORA_WEIGHT_NAMES",
    "MAX_LORA_RANK",
    "PLAIN_LORA",
    "DoRAVariant",
    "KeptBase",
    "LoRAConv2D",
    "LoRADense",
    "LoRALayerMixin",
    "LoRAVariant",
    "MergeState",
    "column_norm",
    "convert_to_lora_layer",
    "describe_unsupported",
    "dora_scale",
    "has_kernel",
    "has_lora_counterpart",
    "is_lora_layer",
    "kernel_fingerprint",
    "lora_scaling",
    "lora_variant",
    "matmul_last_axis",
    "register_lora_layer",
    "resolve_lora_initializer",
    "supported_layer_types",
    "validate_lora_args",
]
