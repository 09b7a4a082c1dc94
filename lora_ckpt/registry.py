"""Registry of LoRA architectures: base model class <-> LoRA model class.

This is a model-class registry, not tfimm's model-name registry: keys are
classes such as ``ConvNeXt``, values their LoRA variants such as
``LoRAConvNeXt`` and the LoRA config class. The API is tfimm's.
"""

import warnings
from functools import partial

from .errors import UnregisteredArchitectureError
from .selection import LoRATrainableMixin

_lora_model_class: dict[type, type] = {}
_lora_model_base_class: dict[type, type] = {}  # inverse of _lora_model_class
_lora_model_config: dict[type, type] = {}


def register_lora_architecture(lora_cls=None, *, base_cls: type | None = None):
    """Registers ``lora_cls`` as the LoRA variant of ``base_cls``.

    Use as a decorator on a subclass of the base model::

        @register_lora_architecture
        class LoRAResNet(ResNet):
            cfg_class = LoRAResNetConfig

    or with an explicit base class, which may be the class itself for a model
    that builds regular or LoRA layers depending on its config::

        register_lora_architecture(FlexibleModel, base_cls=FlexibleModel)

    A class that does not inherit :class:`lora_ckpt.selection.LoRATrainableMixin`
    gets its ``trainable_weights``/``non_trainable_weights`` override here, so
    that ``fit`` trains what an adapter of it saves (the LoRA weights, the
    biases of ``cfg.lora_train_bias``, the classifier if
    ``cfg.lora_train_classifier``).

    Args:
        lora_cls: The LoRA model class; its ``cfg_class`` attribute names its
            config dataclass, or is ``None`` (as tfimm allows): the base
            class's config is used then.
        base_cls: The regular model class; defaults to ``lora_cls``'s direct
            base class.

    Returns:
        ``lora_cls`` (or a decorator, if called with keywords only).
    """
    if lora_cls is None:
        return partial(register_lora_architecture, base_cls=base_cls)

    if base_cls is None:
        base_cls = lora_cls.__base__
    lora_cfg = getattr(lora_cls, "cfg_class", None)
    if base_cls in _lora_model_class and _lora_model_class[base_cls] is not lora_cls:
        warnings.warn(
            f"Model class {base_cls.__name__} has already registered a LoRA version "
            f"{_lora_model_class[base_cls].__name__}. Registering "
            f"{lora_cls.__name__} will overwrite this.",
            stacklevel=2,
        )

    # A self-registered class is its own base: its regular use keeps Keras' rules.
    if base_cls is not lora_cls and not issubclass(lora_cls, LoRATrainableMixin):
        for name, member in vars(LoRATrainableMixin).items():
            if not name.startswith("__"):
                setattr(lora_cls, name, member)
    _lora_model_class[base_cls] = lora_cls
    _lora_model_base_class[lora_cls] = base_cls
    _lora_model_config[base_cls] = lora_cfg
    return lora_cls


def _registered_names() -> list[str]:
    return sorted(cls.__name__ for cls in _lora_model_class)


def lora_architecture(model_cls: type) -> type:
    """Returns the LoRA model class registered for a base model class.

    Args:
        model_cls: A regular model class such as tfimm's ``ConvNeXt``.

    Returns:
        Its LoRA class, e.g. ``LoRAConvNeXt``.

    Raises:
        UnregisteredArchitectureError: If no LoRA variant is registered.
    """
    if model_cls not in _lora_model_class:
        raise UnregisteredArchitectureError(
            f"No LoRA variant is registered for architecture {model_cls.__name__}. "
            f"Registered architectures: {_registered_names()}. Register one with "
            "@register_lora_architecture."
        )
    return _lora_model_class[model_cls]


def lora_base_architecture(lora_cls: type) -> type:
    """Returns the base model class of a registered LoRA model class.

    Args:
        lora_cls: A LoRA model class such as ``LoRAConvNeXt``.

    Returns:
        The regular class it was registered for (itself for a model that
        builds regular or LoRA layers depending on its config).

    Raises:
        UnregisteredArchitectureError: If ``lora_cls`` is not a registered
            LoRA variant.
    """
    if lora_cls not in _lora_model_base_class:
        raise UnregisteredArchitectureError(
            f"The class {lora_cls.__name__} is not registered as the LoRA variant of "
            f"any architecture. Registered LoRA classes: "
            f"{sorted(c.__name__ for c in _lora_model_base_class)}."
        )
    return _lora_model_base_class[lora_cls]


def lora_config(model_cls: type) -> type | None:
    """Returns the LoRA config class registered for a base model class.

    Args:
        model_cls: A regular model class.

    Returns:
        The LoRA class's ``cfg_class``, or ``None`` if it declared
        ``cfg_class = None`` (it then takes the base class's config).

    Raises:
        UnregisteredArchitectureError: If no LoRA variant is registered.
    """
    lora_architecture(model_cls)  # raises with the full message if unregistered
    return _lora_model_config[model_cls]


def is_lora_architecture(model_cls: type) -> bool:
    """Whether ``model_cls`` is a registered LoRA model class.

    Args:
        model_cls: Any class.

    Returns:
        ``True`` for a class registered as some architecture's LoRA variant.
    """
    return model_cls in _lora_model_base_class


def registered_architectures() -> dict[type, type]:
    """The registered architectures.

    Returns:
        A copy of the mapping base model class -> LoRA model class.
    """
    return dict(_lora_model_class)


__all__ = [
    "is_lora_architecture",
    "lora_architecture",
    "lora_base_architecture",
    "lora_config",
    "register_lora_architecture",
    "registered_architectures",
]
