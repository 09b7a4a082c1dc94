"""What the LoRA model factory and the conversions share: keyword and config
handling, building, weight transfer by layer path, tfimm's own factory."""

import dataclasses
import importlib.util
import warnings

import tfimm

from . import architectures  # noqa: F401  (registers the LoRA classes this factory builds)
from ._tf import tf
from .errors import (
    LoRAConfigError,
    LoRAError,
    MissingDependencyError,
)
from .layers import LORA_WEIGHT_NAMES
from .model_ops import lora_layers
from .registry import (
    lora_config,
)
from .selection import (
    classifier_paths,
)
from .traversal import named_variables

__all__ = [
    "build",
    "config_with_overrides",
    "lora_cfg_class",
    "normalize_kwargs",
    "reset_magnitudes",
    "tfimm_create",
    "transfer",
]


# tfimm's LoRAConvNeXtConfig spells this field `lora_train_classifer`.

_DEPRECATED_KWARGS = {"lora_train_classifer": "lora_train_classifier"}


def normalize_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for old, new in _DEPRECATED_KWARGS.items():
        if old in kwargs:
            warnings.warn(
                f"`{old}` is tfimm's misspelling; use `{new}`.", DeprecationWarning, stacklevel=3
            )
            kwargs.setdefault(new, kwargs.pop(old))
    return kwargs


def config_with_overrides(cfg_cls, base: dict, overrides: dict, model_desc: str):
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise LoRAConfigError(
            f"Unknown config field(s) {unknown} for {model_desc}. Valid fields: {sorted(fields)}."
        )
    values = {k: v for k, v in base.items() if k in fields}
    values.update(overrides)
    return cfg_cls(**values)


def build(model: tf.keras.Model) -> tf.keras.Model:
    if not model.built:
        model(model.dummy_inputs)
    return model


def reset_magnitudes(model) -> None:
    # DoRA magnitudes start as the column norms of the kernels the model holds
    # now (after building or after the base weights were transferred).
    for _, layer in lora_layers(model):
        layer.reset_lora_magnitude()


def lora_cfg_class(model_cls: type) -> type:
    # tfimm allows `cfg_class = None` on a LoRA class: it takes the base's config.
    return lora_config(model_cls) or model_cls.cfg_class


def _missing_timm(model_name: str, package: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"tfimm converts the pretrained weights of '{model_name}' from timm (PyTorch), "
        f"and {package} is not installed: `pip install timm torch` (the first call also "
        "downloads the weights), or pass model_path= with weights saved by "
        "tfimm/Keras, or load base weights with lora_ckpt.load_base_weights."
    )


def tfimm_create(model_name: str, **kwargs) -> tf.keras.Model:
    if kwargs.get("pretrained") and not kwargs.get("model_path"):
        # Asked before tfimm tries: it logs an error of its own before raising.
        for package in ("timm", "torch"):
            if importlib.util.find_spec(package) is None:
                raise _missing_timm(model_name, package)
    try:
        return tfimm.create_model(model_name, **kwargs)
    except ModuleNotFoundError as exc:
        if exc.name not in ("timm", "torch"):
            raise
        raise _missing_timm(model_name, exc.name) from exc


def transfer(src: tf.keras.Model, dst: tf.keras.Model) -> None:
    """Copies every variable of ``src`` into ``dst`` by layer path (LoRA's own left out).

    By path, not by TensorFlow variable name as tfimm's ``transfer_weights``
    does: names depend on when a layer was built, paths only on the model.
    A classifier whose width differs (an ``nb_classes`` override) keeps its
    fresh initialisation; any other difference is an error.
    """
    source = named_variables(src)
    heads = tuple(path + "/" for path in classifier_paths(dst))
    for key, var in named_variables(dst).items():
        if key.rsplit("/", 1)[-1] in LORA_WEIGHT_NAMES:
            continue
        value = source.get(key)
        if value is not None and value.shape == var.shape:
            var.assign(value)
        elif not key.startswith(heads):
            raise LoRAError(
                f"Cannot transfer the weights of {type(src).__name__} to "
                f"{type(dst).__name__}: variable '{key}' "
                + ("is missing." if value is None else f"has shape {value.shape}, not {var.shape}.")
            )


# LoRA fields that decide which layers hold which A/B shapes: a tfimm LoRA
# model's own layers fix them, so they cannot be chosen anew when it is converted.
