"""lora_ckpt: LoRA adapters for TensorFlow vision models.

The tfimm LoRA API (``create_model``, ``convert_to_lora_model``, ...) plus
what tfimm never did: merge/unmerge that restores kernels exactly, more layer
types and architectures, adapters saved and loaded on their own
(``save_lora_state``/``load_lora_state``), and an ``AdapterPool`` that serves
many adapters on one base model. ``lora-ckpt`` (lora_ckpt.cli) is the command.

The names below are the user's workflow; every name that
``tfimm.architectures.lora`` exports is among them, so ``import lora_ckpt as
lora`` replaces ``from tfimm.architectures import lora``. Error classes live
in ``lora_ckpt.errors``, architecture classes in ``lora_ckpt.architectures``,
training-checkpoint callbacks in ``lora_ckpt.state``. ``lora_ckpt.tf`` is
TensorFlow, imported with the Keras 2 API (``tf_keras``) that lora_ckpt needs.

Names are imported when first used (PEP 562), so ``import lora_ckpt`` and
``lora_ckpt.errors`` do not import TensorFlow: ``lora-ckpt --help`` and a
listing of a local store start in a fraction of a second. The first name
that needs TensorFlow imports it (with Keras 2) and registers the LoRA
architectures, so ``lora_ckpt.create_model(...)`` works right after
``import lora_ckpt`` as it always did.
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING

from ._keras_env import prefer_keras_2 as _prefer_keras_2

# Before anything else can import TensorFlow: a user who imports lora_ckpt and
# then TensorFlow gets Keras 2, as when this import brought TensorFlow up.
_prefer_keras_2()

# Public name -> the module that defines it; importing it is deferred to the
# name's first use.
_EXPORTS = {
    "__version__": "version",
    "LoRAError": "errors",
    "tf": "_tf",
    "LORA_WEIGHT_NAMES": "layers",
    "LoRAConv2D": "layers",
    "LoRADense": "layers",
    "convert_to_lora_layer": "layers",
    "is_lora_layer": "layers",
    "LoRAConvNeXt": "architectures",
    "LoRAConvNeXtConfig": "architectures",
    "convert_to_lora_model": "models",
    "convert_to_regular_model": "models",
    "create_model": "models",
    "lora_disabled": "models",
    "lora_layers": "models",
    "merge_lora_weights": "models",
    "merge_weights": "models",
    "print_trainable_parameters": "models",
    "set_lora_enabled": "models",
    "supported_architectures": "models",
    "unmerge_lora_weights": "models",
    "lora_architecture": "registry",
    "lora_base_architecture": "registry",
    "lora_config": "registry",
    "register_lora_architecture": "registry",
    "LoRATrainableMixin": "selection",
    "lora_non_trainable_weights": "selection",
    "lora_trainable_weights": "selection",
    "OFF": "serving.pool",
    "AdapterPool": "serving.pool",
    "AdapterState": "state",
    "LoadReport": "state",
    "combine_adapters": "state",
    "from_adapter": "state",
    "inspect_adapter": "state",
    "list_adapters": "state",
    "load_base_weights": "state",
    "load_lora_state": "state",
    "read_lora_state": "state",
    "save_lora_state": "state",
    "LoraConfig": "state",
    "get_lora_model": "state",
    "import_peft": "state",
    "export_peft": "state",
    "train_adapter": "training",
    "evaluate_adapter": "training",
}
# Modules reached without registering the LoRA architectures first: those
# that import no TensorFlow (the CLI imports it per subcommand), and `tf`,
# which is TensorFlow alone. Every other name and submodule comes with the
# architectures registered, as when `import lora_ckpt` imported everything.
_WITHOUT_ARCHITECTURES = {
    "version",
    "errors",
    "cli",
    "cli_store",
    "cli_train",
    "scaling",
    "storage",
    "synthetic",
    "_keras_env",
    "_tf",
}

# Spelled out for tools that read __all__ without running the module; a test
# checks it against _EXPORTS.
__all__ = [
    "AdapterPool",
    "AdapterState",
    "LORA_WEIGHT_NAMES",
    "LoRAConv2D",
    "LoRAConvNeXt",
    "LoRAConvNeXtConfig",
    "LoRADense",
    "LoRAError",
    "LoRATrainableMixin",
    "LoadReport",
    "LoraConfig",
    "OFF",
    "__version__",
    "combine_adapters",
    "convert_to_lora_layer",
    "convert_to_lora_model",
    "convert_to_regular_model",
    "create_model",
    "export_peft",
    "evaluate_adapter",
    "from_adapter",
    "get_lora_model",
    "import_peft",
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
    "train_adapter",
    "unmerge_lora_weights",
]


def _submodule(name: str):
    if name not in _WITHOUT_ARCHITECTURES:
        importlib.import_module(".architectures", __name__)  # registers the LoRA classes
    return importlib.import_module(f".{name}", __name__)


def __getattr__(name: str):
    """Imports a public name's module on first access (PEP 562).

    Submodules (``lora_ckpt.state``, ``lora_ckpt.registry``, ...) are also
    reachable as attributes, as when ``import lora_ckpt`` imported them all.

    Raises:
        AttributeError: For a name lora_ckpt does not have.
    """
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(_submodule(module), name)
        globals()[name] = value  # later accesses skip __getattr__
        return value
    # Found before importing anything: tools probe modules for attributes
    # (hasattr), and a miss must not bring TensorFlow up.
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        return _submodule(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what IDEs and type checkers see; never run
    from ._tf import tf
    from .architectures import LoRAConvNeXt, LoRAConvNeXtConfig
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
    from .selection import (
        LoRATrainableMixin,
        lora_non_trainable_weights,
        lora_trainable_weights,
    )
    from .serving.pool import OFF, AdapterPool
    from .state import (
        AdapterState,
        LoadReport,
        LoraConfig,
        combine_adapters,
        export_peft,
        from_adapter,
        get_lora_model,
        import_peft,
        inspect_adapter,
        list_adapters,
        load_base_weights,
        load_lora_state,
        read_lora_state,
        save_lora_state,
    )
    from .training import evaluate_adapter, train_adapter
    from .version import __version__
