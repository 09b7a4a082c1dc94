"""Models built by tfimm's own LoRA module (``tfimm.architectures.lora``):
converted to lora_ckpt's classes with their Dense LoRA weights carried over,
or refused with what to do."""

import dataclasses
import sys

from . import architectures  # noqa: F401  (registers the LoRA classes this factory builds)
from ._tf import tf
from .errors import (
    LoRAConfigError,
    LoRAError,
    MergeStateError,
    UnregisteredArchitectureError,
)
from .layers import is_lora_layer

# tfimm's LoRAConvNeXtConfig spells this field `lora_train_classifer`.
from .model_build import (
    build,
    config_with_overrides,
    lora_cfg_class,
    normalize_kwargs,
    reset_magnitudes,
    transfer,
)
from .registry import (
    lora_architecture,
)
from .traversal import named_layers

__all__ = ["convert_tfimm_lora_model"]


_FIXED_BY_TFIMM_LAYERS = (
    "lora_rank",
    "lora_alpha",
    "lora_layer_groups",
    "lora_target_layers",
    "lora_rank_pattern",
    "lora_alpha_pattern",
    "lora_use_dora",
    "lora_use_rslora",
    "target_layers",
)


def _tfimm_base_architecture(model_cls: type) -> type:
    """The base class that tfimm's own LoRA registry gives a tfimm LoRA class."""
    # Nothing can be an instance of a class registered there unless the module
    # was imported, so it is not imported here.
    tfimm_lora = sys.modules.get("tfimm.architectures.lora")
    try:
        return tfimm_lora.lora_base_architecture(model_cls)
    except (AttributeError, ValueError):  # no module, or a class it does not know
        raise UnregisteredArchitectureError(
            f"{model_cls.__name__} holds LoRA layers of another library but is not a LoRA "
            "architecture registered with tfimm.architectures.lora, so lora_ckpt cannot tell "
            "its base architecture. Merge its updates with that library and convert the "
            "regular model, or give lora_ckpt.convert_to_lora_model a regular model."
        ) from None


def convert_tfimm_lora_model(model, foreign: list[tuple], kwargs: dict) -> tf.keras.Model:
    """:func:`convert_to_lora_model` for a model built by ``tfimm.architectures.lora``.

    Its base weights move by path as for any conversion; LoRA goes on exactly
    the layers that have it in ``model`` (``lora_target_layers``), with their
    ranks and alphas, and their ``A``/``B`` are copied as they are.
    """
    for path, layer in foreign:
        if not isinstance(layer, tf.keras.layers.Dense):
            raise LoRAConfigError(
                f"Layer '{path}' is tfimm's {type(layer).__name__}: its update has a "
                "low-rank factor per kernel position, which no lora_ckpt layer holds "
                "exactly. Merge it with tfimm "
                "(tfimm.architectures.lora.convert_to_regular_model) and convert the regular "
                "model with lora_ckpt.convert_to_lora_model."
            )
        if layer.merged:
            raise MergeStateError(
                f"tfimm LoRA layer '{path}' is merged, so its kernel is not the base "
                "kernel; call its unmerge_weights() (on every merged layer) first."
            )
    kwargs = normalize_kwargs(kwargs)
    chosen = sorted(set(kwargs) & set(_FIXED_BY_TFIMM_LAYERS))
    if chosen:
        raise LoRAConfigError(
            f"{chosen} cannot be chosen when converting a tfimm LoRA model: its LoRA layers, "
            "ranks and alphas are carried over as they are. Convert without them, or "
            "convert its regular model (tfimm's convert_to_regular_model) instead."
        )
    base_cls = _tfimm_base_architecture(type(model))
    lora_cls = lora_architecture(base_cls)
    cfg = model.cfg
    rank = int(getattr(cfg, "lora_rank", foreign[0][1].lora_rank))
    alpha = float(getattr(cfg, "lora_alpha", foreign[0][1].lora_alpha))
    derived = {
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_target_layers": tuple(path for path, _ in foreign),
        # Exact paths as patterns: each matches its own layer only.
        "lora_rank_pattern": {p: int(x.lora_rank) for p, x in foreign if x.lora_rank != rank},
        "lora_alpha_pattern": {p: float(x.lora_alpha) for p, x in foreign if x.lora_alpha != alpha},
        "lora_train_bias": getattr(cfg, "lora_train_bias", "none"),
        # tfimm's config spells it `lora_train_classifer`.
        "lora_train_classifier": bool(getattr(cfg, "lora_train_classifer", True)),
    }
    base_fields = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("lora_")}
    lora_cfg = config_with_overrides(
        lora_cfg_class(base_cls), base_fields, {**derived, **kwargs}, lora_cls.__name__
    )
    lora_model = build(lora_cls(cfg=lora_cfg))
    transfer(build(model), lora_model)
    ours = dict(named_layers(lora_model))
    for path, theirs in foreign:
        layer = ours.get(path)
        if not is_lora_layer(layer) or layer.kernel_lora_a.shape != theirs.kernel_lora_a.shape:
            raise LoRAError(  # a registered class that ignores lora_target_layers
                f"{lora_cls.__name__} did not put a LoRA layer of the same shape at '{path}', "
                f"where the tfimm model has one; it cannot carry the weights over."
            )
        layer.kernel_lora_a.assign(theirs.kernel_lora_a)
        layer.kernel_lora_b.assign(theirs.kernel_lora_b)
    reset_magnitudes(lora_model)
    return lora_model
