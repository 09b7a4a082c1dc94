"""lora_ckpt: LoRA adapters for TensorFlow vision models.

The tfimm LoRA API (``create_model``, ``convert_to_lora_model``, ...) plus
what tfimm never did: merge/unmerge that restores kernels exactly, more layer
types and architectures, and saving/loading adapters on their own.
"""
from . import _tf  # noqa: F401  (first: TensorFlow must come up with Keras 2)
from .errors import (
    KerasVersionError,
    LayerNotFoundError,
    LoRAConfigError,
    LoRAError,
    MergeStateError,
    UnknownModelError,
    UnregisteredArchitectureError,
    UnsupportedLayerError,
)
from .layers import (
    LORA_WEIGHT_NAMES,
    LoRAConv2D,
    LoRADense,
    convert_to_lora_layer,
    is_lora_layer,
)
from .registry import (
    lora_architecture,
    lora_base_architecture,
    lora_config,
    register_lora_architecture,
)
from .models import (
    convert_to_lora_model,
    convert_to_regular_model,
    create_model,
    lora_layers,
    lora_non_trainable_weights,
    lora_trainable_weights,
    merge_lora_weights,
    merge_weights,
    set_lora_enabled,
    unmerge_lora_weights,
)
from .architectures import LoRAConvNeXt, LoRAConvNeXtConfig
from .version import __version__

__all__ = [
    "KerasVersionError",
    "LORA_WEIGHT_NAMES",
    "LayerNotFoundError",
    "LoRAConfigError",
    "LoRAConv2D",
    "LoRAConvNeXt",
    "LoRAConvNeXtConfig",
    "LoRADense",
    "LoRAError",
    "MergeStateError",
    "UnknownModelError",
    "UnregisteredArchitectureError",
    "UnsupportedLayerError",
    "__version__",
    "convert_to_lora_layer",
    "convert_to_lora_model",
    "convert_to_regular_model",
    "create_model",
    "is_lora_layer",
    "lora_architecture",
    "lora_base_architecture",
    "lora_config",
    "lora_layers",
    "lora_non_trainable_weights",
    "lora_trainable_weights",
    "merge_lora_weights",
    "merge_weights",
    "register_lora_architecture",
    "set_lora_enabled",
    "unmerge_lora_weights",
]
