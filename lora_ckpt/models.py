"""Model-level LoRA API: the factory, conversion both ways, merging.

The names and signatures are those of ``tfimm.architectures.lora``, so code
written against it works after changing the import.
"""

import dataclasses
import difflib
import warnings

import tfimm
from tfimm.models import model_class, model_config, transfer_weights

from ._tf import tf
from .errors import (
    LayerNotFoundError,
    LoRAConfigError,
    MergeStateError,
    UnknownModelError,
)
from .graph_models import convert_graph_model, graph_model_to_regular, is_graph_model
from .layers import LORA_WEIGHT_NAMES, is_lora_layer, supported_layer_types
from .registry import (
    is_lora_architecture,
    lora_architecture,
    lora_base_architecture,
    lora_config,
    registered_architectures,
)
from .traversal import named_layers

# tfimm's LoRAConvNeXtConfig spells this field `lora_train_classifer`.
_DEPRECATED_KWARGS = {"lora_train_classifer": "lora_train_classifier"}


def _normalize_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for old, new in _DEPRECATED_KWARGS.items():
        if old in kwargs:
            warnings.warn(
                f"`{old}` is tfimm's misspelling; use `{new}`.", DeprecationWarning, stacklevel=3
            )
            kwargs.setdefault(new, kwargs.pop(old))
    return kwargs


def _config_with_overrides(cfg_cls, base: dict, overrides: dict, model_desc: str):
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise LoRAConfigError(
            f"Unknown config field(s) {unknown} for {model_desc}. Valid fields: {sorted(fields)}."
        )
    values = {k: v for k, v in base.items() if k in fields}
    values.update(overrides)
    return cfg_cls(**values)


def _build(model: tf.keras.Model) -> tf.keras.Model:
    if not model.built:
        model(model.dummy_inputs)
    return model


def _transfer(src: tf.keras.Model, dst: tf.keras.Model) -> None:
    # tfimm's transfer_weights appends to the list it is given: pass a copy.
    transfer_weights(src_model=src, dst_model=dst, weights_to_ignore=list(LORA_WEIGHT_NAMES))


def create_model(
    model_name: str,
    pretrained: bool = False,
    model_path: str = "",
    **kwargs,
) -> tf.keras.Model:
    """Creates a LoRA model from a tfimm model name.

    Without weights to load, the LoRA model is built directly; with
    ``pretrained`` or ``model_path`` the regular model is loaded by tfimm and
    converted with :func:`convert_to_lora_model`.

    Args:
        model_name: A tfimm model name, e.g. ``"convnext_tiny"``.
        pretrained: Load tfimm's pretrained weights (from its cache or the
            network).
        model_path: Path of a saved regular model to load; takes precedence
            over ``pretrained``.
        **kwargs: LoRA fields (``lora_rank``, ``lora_alpha``, ``lora_dropout``,
            ``lora_train_bias``, ``lora_train_classifier``) and overrides of the
            model config (``nb_classes``, ``embed_dim``, ...).

    Returns:
        The built LoRA model.

    Raises:
        UnknownModelError: If tfimm does not know ``model_name``.
        UnregisteredArchitectureError: If the architecture has no LoRA variant.
        LoRAConfigError: For unknown config fields or invalid LoRA values.
    """
    if not tfimm.models.is_model(model_name):
        close = difflib.get_close_matches(model_name, tfimm.list_models(), n=5)
        raise UnknownModelError(
            f"Unknown model '{model_name}'. Close matches: {close}. "
            "See tfimm.list_models() for all names."
        )
    cls = model_class(model_name)
    lora_cls = lora_architecture(cls)
    kwargs = _normalize_kwargs(kwargs)
    if pretrained or model_path:
        lora_kwargs = {k: v for k, v in kwargs.items() if k.startswith("lora_")}
        full_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("lora_")}
        full_model = tfimm.create_model(
            model_name, pretrained=pretrained, model_path=model_path, **full_kwargs
        )
        return convert_to_lora_model(full_model, **lora_kwargs)

    base_cfg = dataclasses.asdict(model_config(model_name))
    cfg = _config_with_overrides(lora_config(cls), base_cfg, kwargs, model_name)
    return _build(lora_cls(cfg=cfg))


def convert_to_lora_model(model: tf.keras.Model, **kwargs) -> tf.keras.Model:
    """Creates the LoRA version of a model and transfers all its weights.

    A model of a registered architecture (tfimm's ConvNeXt, ViT, ...) becomes
    its LoRA class; a functional or Sequential Keras model gets LoRA on the
    layers that ``target_layers`` names (see :func:`lora_ckpt.graph_models.convert_graph_model`).

    Args:
        model: A registered architecture, or a functional/Sequential model.
        **kwargs: LoRA fields (``lora_rank``, ``lora_alpha``, ...); for a
            registered architecture also config overrides such as
            ``nb_classes`` (a classifier of another size keeps its fresh
            initialisation); for a functional/Sequential model
            ``target_layers`` (names or glob patterns, required) and
            ``lora_trainable_layers``.

    Returns:
        The built LoRA model; its LoRA ``B`` weights are zero, so it computes
        what ``model`` computes.

    Raises:
        UnregisteredArchitectureError: If the model is neither registered
            nor functional/Sequential.
        LayerNotFoundError: If a ``target_layers`` pattern matches nothing.
        LoRAConfigError: For unknown config fields or invalid LoRA values.
    """
    target_layers = kwargs.pop("target_layers", None)
    if is_graph_model(model) and not is_lora_architecture(type(model)):
        if target_layers is None:
            raise LoRAConfigError(
                f"Choose the layers of this {type(model).__name__} model that get LoRA "
                "with target_layers=[names or glob patterns], e.g. target_layers=['*conv*']."
            )
        return convert_graph_model(model, target_layers, **kwargs)
    if target_layers is not None:
        raise LoRAConfigError(
            f"{type(model).__name__} is a registered architecture: choose its LoRA layers "
            "with lora_layer_groups, not target_layers."
        )
    lora_cls = lora_architecture(type(model))
    kwargs = _normalize_kwargs(kwargs)
    cfg = _config_with_overrides(
        lora_config(type(model)), dataclasses.asdict(model.cfg), kwargs, lora_cls.__name__
    )
    lora_model = _build(lora_cls(cfg=cfg))
    _transfer(_build(model), lora_model)
    return lora_model


def convert_to_regular_model(model: tf.keras.Model) -> tf.keras.Model:
    """Converts a LoRA model into its regular architecture, updates folded in.

    The LoRA model itself is left as it was (layers merged for the transfer
    are unmerged afterwards, bit for bit).

    Args:
        model: An instance of a registered LoRA architecture, or a
            functional/Sequential model with LoRA layers.

    Returns:
        A built regular model computing what ``model`` computes with LoRA
        enabled.

    Raises:
        UnregisteredArchitectureError: If the class is not a LoRA variant.
    """
    if is_graph_model(model) and not is_lora_architecture(type(model)):
        return graph_model_to_regular(model)
    base_cls = lora_base_architecture(type(model))
    base_cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items() if not k.startswith("lora_")}
    base_cfg = _config_with_overrides(base_cls.cfg_class, base_cfg, {}, base_cls.__name__)
    base_model = _build(base_cls(cfg=base_cfg))

    to_merge = [layer for _, layer in lora_layers(model) if not layer.merged]
    try:
        for layer in to_merge:
            layer.merge_weights()
        _transfer(model, base_model)
    finally:
        for layer in to_merge:
            if layer.merged:
                layer.unmerge_weights()
    return base_model


def lora_layers(model: tf.keras.layers.Layer) -> list[tuple[str, tf.keras.layers.Layer]]:
    """Returns ``(path, layer)`` for every LoRA layer of a model, in order."""
    return [(path, layer) for path, layer in named_layers(model) if is_lora_layer(layer)]


def _forget_compiled_functions(model) -> None:
    # Keras caches traced predict/train/test functions; a merge or an
    # enable/disable changes which ops `call` traces, so they must be rebuilt.
    for attr in ("predict_function", "train_function", "test_function"):
        if isinstance(model, tf.keras.Model) and getattr(model, attr, None) is not None:
            setattr(model, attr, None)


def _require_lora_layers(model):
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise LayerNotFoundError(
            f"Model '{model.name}' has no LoRA layers; convert it first with convert_to_lora_model."
        )
    return layers


def merge_lora_weights(model: tf.keras.layers.Layer) -> None:
    """Folds every LoRA update into its base kernel, in place.

    Args:
        model: A model with LoRA layers, none of them merged.

    Raises:
        MergeStateError: If any LoRA layer is already merged (nothing is
            changed then).
        LayerNotFoundError: If the model has no LoRA layers.
    """
    layers = _require_lora_layers(model)
    merged = [layer.name for layer in layers if layer.merged]
    if merged:
        raise MergeStateError(
            f"{len(merged)} LoRA layer(s) are already merged (e.g. '{merged[0]}'); "
            "call unmerge_lora_weights(model) before merging again."
        )
    for layer in layers:
        layer.merge_weights()
    _forget_compiled_functions(model)


merge_weights = merge_lora_weights
"""The name the tfimm LoRA README uses for :func:`merge_lora_weights`."""


def unmerge_lora_weights(model: tf.keras.layers.Layer) -> None:
    """Restores every merged LoRA layer's base kernel bit for bit.

    Args:
        model: A model whose LoRA layers were merged.

    Raises:
        MergeStateError: If no LoRA layer is merged.
        LayerNotFoundError: If the model has no LoRA layers.
    """
    layers = [layer for layer in _require_lora_layers(model) if layer.merged]
    if not layers:
        raise MergeStateError(
            f"No LoRA layer of model '{model.name}' is merged; nothing to unmerge."
        )
    for layer in layers:
        layer.unmerge_weights()
    _forget_compiled_functions(model)


def set_lora_enabled(model: tf.keras.layers.Layer, enabled: bool) -> None:
    """Switches the LoRA branch of every LoRA layer on or off.

    With LoRA disabled (and unmerged) the model computes its base model's
    output exactly.

    Args:
        model: A model with LoRA layers.
        enabled: ``True`` to add the LoRA updates, ``False`` to skip them.

    Raises:
        LayerNotFoundError: If the model has no LoRA layers.
    """
    for layer in _require_lora_layers(model):
        layer.lora_enabled = bool(enabled)
    _forget_compiled_functions(model)


def supported_architectures() -> dict:
    """What :func:`convert_to_lora_model` can convert, and which layers get LoRA.

    Returns:
        ``{base class name: {"base", "lora_class", "layer_groups",
        "default_groups"}}`` for every registered architecture, plus an entry
        ``"functional/Sequential"`` for generic Keras models.
    """
    result = {}
    for base_cls, lora_cls in registered_architectures().items():
        groups = lora_cls.layer_groups() if hasattr(lora_cls, "layer_groups") else {}
        default = getattr(lora_cls.cfg_class(), "lora_layer_groups", ()) if groups else ()
        result[base_cls.__name__] = {
            "base": f"{base_cls.__module__}.{base_cls.__qualname__}",
            "lora_class": f"{lora_cls.__module__}.{lora_cls.__qualname__}",
            "layer_groups": {name: list(paths) for name, paths in groups.items()},
            "default_groups": list(default),
        }
    result["functional/Sequential"] = {
        "base": "tf.keras.Model (functional or Sequential)",
        "lora_class": "the same kind of model, rebuilt",
        "layer_types": supported_layer_types(),
        "select_with": "target_layers=[layer names or glob patterns]",
    }
    return result
