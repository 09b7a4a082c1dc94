"""lora_ckpt: LoRA adapters for TensorFlow vision models.

The tfimm LoRA API (``create_model``, ``convert_to_lora_model``, ...) plus
what tfimm never did: merge/unmerge that restores kernels exactly, more layer
types and architectures, adapters saved and loaded on their own
(``save_lora_state``/``load_lora_state``), and an ``AdapterPool`` that serves
many adapters on one base model. ``lora-ckpt`` (lora_ckpt.cli) is the command.

The names below are the user's workflow. Error classes live in
``lora_ckpt.errors``, architecture classes in ``lora_ckpt.architectures``,
training-checkpoint callbacks in ``lora_ckpt.state``. ``lora_ckpt.tf`` is
TensorFlow, imported with the Keras 2 API (``tf_keras``) that lora_ckpt needs.
"""

# isort: off
from ._tf import tf  # first: TensorFlow must come up with Keras 2

# isort: on
from . import architectures  # noqa: F401  (registers the LoRA architectures)
from .errors import LoRAError
from .layers import (
    LORA_WEIGHT_NAMES,
    LoRAConv2D,
    LoRADense,
    convert_to_lora_layer,
    is_lora_layer,
)
from .models import (
    convert_to_lora_model,
    convert_to_regular_model,
    create_model,
    lora_disabled,
    lora_layers,
    merge_lora_weights,
    merge_weights,
    print_trainable_parameters,
    set_lora_enabled,
    supported_architectures,
    unmerge_lora_weights,
)
from .registry import (
    lora_architecture,
    lora_base_architecture,
    lora_config,
    register_lora_architecture,
)
from .selection import LoRATrainableMixin, lora_non_trainable_weights, lora_trainable_weights
from .serving.pool import OFF, AdapterPool
from .state import (
    AdapterState,
    LoadReport,
    combine_adapters,
    from_adapter,
    inspect_adapter,
    list_adapters,
    load_base_weights,
    load_lora_state,
    read_lora_state,
    save_lora_state,
)
from .version import __version__

__all__ = [
    "LORA_WEIGHT_NAMES",
    "OFF",
    "AdapterPool",
    "AdapterState",
    "LoRAConv2D",
    "LoRADense",
    "LoRAError",
    "LoRATrainableMixin",
    "LoadReport",
    "__version__",
    "combine_adapters",
    "convert_to_lora_layer",
    "convert_to_lora_model",
    "convert_to_regular_model",
    "create_model",
    "from_adapter",
    "inspect_adapter",
    "is_lora_layer",
    "list_adapters",
    "load_base_weights",
    "load_lora_state",
    "lora_architecture",
    "lora_base_architecture",
    "lora_config",
    "lora_disabled",
    "lora_layers",
    "lora_non_trainable_weights",
    "lora_trainable_weights",
    "merge_lora_weights",
    "merge_weights",
    "print_trainable_parameters",
    "read_lora_state",
    "register_lora_architecture",
    "save_lora_state",
    "set_lora_enabled",
    "supported_architectures",
    "tf",
    "unmerge_lora_weights",
]
