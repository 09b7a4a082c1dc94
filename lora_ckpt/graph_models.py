"""LoRA for any functional or Sequential Keras model, by layer-name pattern.

Like PEFT's ``target_modules``: the layers whose names match a pattern (and
whose type has a LoRA counterpart) become LoRA layers; every other layer is
frozen unless named in ``lora_trainable_layers``. The model is rebuilt with
``tf.keras.models.clone_model`` and keeps all its weights, so Keras' own
``fit`` trains exactly the LoRA weights (and the asked biases and layers).
"""

from collections.abc import Iterable

from ._tf import tf
from .errors import LoRAConfigError, UnregisteredArchitectureError, UnsupportedLayerError
from .layers import (
    LORA_LAYER_ARGS,
    LoRALayerMixin,
    convert_to_lora_layer,
    has_kernel,
    has_lora_counterpart,
    is_lora_layer,
    supported_layer_types,
)
from .selection import LoRASettings, layer_matches, match_layers
from .traversal import named_layers, variable_short_name

__all__ = [
    "check_conversion_arguments",
    "check_pattern_keys",
    "convert_graph_model",
    "convert_graph_targets",
    "convert_target_layer",
    "graph_model_to_regular",
    "is_convertible",
    "is_graph_model",
    "lora_layer_arguments",
    "match_targets",
]


# A conversion sets how layers freeze and start; these it takes from the caller.
_LORA_KWARGS = tuple(
    a
    for a in LORA_LAYER_ARGS
    if a not in ("lora_freeze_base", "lora_bias_trainable", "lora_enabled")
)
_PATTERNS = ("lora_rank_pattern", "lora_alpha_pattern")
_OPTIONS = ("lora_train_bias", "lora_trainable_layers", *_PATTERNS)


def lora_layer_arguments(path: str, layer, kwargs: dict) -> dict:
    """The LoRA arguments for one layer: ``kwargs`` with its rank and alpha
    taken from ``lora_rank_pattern``/``lora_alpha_pattern`` (first match wins)."""
    arguments = {k: v for k, v in kwargs.items() if k in _LORA_KWARGS}
    for name, field in (("lora_rank_pattern", "lora_rank"), ("lora_alpha_pattern", "lora_alpha")):
        for pattern, value in (kwargs.get(name) or {}).items():
            if layer_matches(path, layer, pattern):
                arguments[field] = value
                break
    return arguments


def check_pattern_keys(model, kwargs: dict, targets: list[tuple]) -> None:
    """Every ``lora_rank_pattern``/``lora_alpha_pattern`` key must name a target.

    Raises:
        LayerNotFoundError: For a key that matches none of ``targets``.
    """
    for name in _PATTERNS:
        patterns = kwargs.get(name) or {}
        if not isinstance(patterns, dict) or not all(isinstance(k, str) for k in patterns):
            raise LoRAConfigError(
                f"{name} must be a dict of layer path, name or glob -> value, got {patterns!r:.80}."
            )
        match_layers(model, list(patterns), targets, f"{name} key")


def check_conversion_arguments(model, kwargs: dict) -> str:
    """Validates generic conversion arguments and returns the bias mode.

    Raises:
        LoRAConfigError: For unknown arguments or a bias mode a frozen Keras
            layer cannot train.
    """
    unknown = sorted(set(kwargs) - set(_LORA_KWARGS) - set(_OPTIONS))
    if unknown:
        raise LoRAConfigError(
            f"Unknown argument(s) {unknown} for converting a {type(model).__name__} model; "
            f"valid: {sorted(_LORA_KWARGS + _OPTIONS)}."
        )
    train_bias = kwargs.get("lora_train_bias", "none")
    if train_bias not in ("none", "lora_only"):
        raise LoRAConfigError(
            f"lora_train_bias={train_bias!r} is not available for models converted by "
            "target_layers (frozen Keras layers cannot train their bias alone); use 'none' "
            "or 'lora_only', or train with lora_trainable_weights(model, 'all') in a custom loop."
        )
    return train_bias


def match_targets(model, target_layers, layers, argument: str = "target_layers") -> list[str]:
    """Paths of the convertible layers among ``layers`` that ``target_layers`` names.

    Args:
        model: The model (for messages).
        target_layers: Layer paths, names or globs (or one of them).
        layers: ``(path, layer)`` of the model.
        argument: What the caller calls ``target_layers``, for messages.

    Raises:
        LayerNotFoundError: If a pattern matches no layer.
        UnsupportedLayerError: If it matches only layers LoRA cannot adapt
            (depthwise or grouped convolutions, ...).
    """
    patterns = [target_layers] if isinstance(target_layers, str) else list(target_layers)
    convertible = [(path, layer) for path, layer in layers if is_convertible(layer)]
    what = f"{argument} pattern (over {'/'.join(supported_layer_types())} layers, groups=1)"
    for pattern in patterns:
        if isinstance(pattern, str) and not any(
            layer_matches(path, layer, pattern) for path, layer in convertible
        ):
            others = [
                f"{path} ({type(layer).__name__})"
                for path, layer in layers
                # An unbuilt layer has no weights yet: its kind says it has a kernel.
                if layer_matches(path, layer, pattern) and (layer.weights or has_kernel(layer))
            ]
            if others:
                # It names layers, just none that LoRA can adapt: say why.
                raise UnsupportedLayerError(
                    f"{argument} pattern {pattern!r} matches only layers without a LoRA "
                    f"version: {others[:5]}. Depthwise and grouped convolutions (and norms) have no "
                    f"low-rank update to add; LoRA adapts {supported_layer_types()} (groups=1)."
                )
    return match_layers(model, patterns, convertible, what)


def convert_target_layer(path: str, layer, kwargs: dict):
    """The frozen-base LoRA layer for one target of a generic conversion."""
    return convert_to_lora_layer(
        layer,
        lora_freeze_base=True,
        lora_bias_trainable=kwargs.get("lora_train_bias", "none") == "lora_only",
        **lora_layer_arguments(path, layer, kwargs),
    )


def _copy_layer_weights(src, dst) -> None:
    """Copies every variable of ``src`` into the same-named variable of ``dst``."""
    by_name = {variable_short_name(v): v for v in src.weights}
    for var in dst.weights:
        var.assign(by_name[variable_short_name(var)])


def is_graph_model(model) -> bool:
    """Whether ``model`` is a functional or Sequential Keras model."""
    return isinstance(model, tf.keras.Model) and getattr(model, "_is_graph_network", False)


def is_convertible(layer) -> bool:
    """Whether a layer can become a LoRA layer (exactly a type with a LoRA class, groups=1)."""
    return has_lora_counterpart(layer)


def _require_graph_model(model, what: str):
    if not is_graph_model(model):
        raise UnregisteredArchitectureError(
            f"{type(model).__name__} is neither a registered LoRA architecture nor a "
            f"functional/Sequential Keras model, so it cannot be {what}. See "
            "lora_ckpt.supported_architectures()."
        )


def convert_graph_model(
    model: tf.keras.Model, target_layers: Iterable[str], **kwargs
) -> tf.keras.Model:
    """Converts the matching layers of a functional or Sequential model to LoRA.

    Args:
        model: A built functional or Sequential model.
        target_layers: Layer paths, names or ``fnmatch`` patterns
            (``"block_*_project"``, ``"backbone/conv1"`` inside a nested
            functional model); each must match a Dense or Conv2D layer. LoRA
            layers the model already has are kept, with their weights.
        **kwargs: ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
            ``lora_initializer``, ``lora_regularizer``, ``lora_use_dora``,
            ``lora_use_rslora``, ``lora_rank_pattern``, ``lora_alpha_pattern``;
            ``lora_train_bias`` (``"none"`` or ``"lora_only"``) and
            ``lora_trainable_layers`` (names or patterns of layers trained in
            full, e.g. the head).

    Returns:
        A new model of the same kind with LoRA layers, all weights copied.

    Raises:
        UnregisteredArchitectureError: If ``model`` is not functional/Sequential.
        LayerNotFoundError: If a pattern matches no convertible layer.
        LoRAConfigError: For unknown or invalid arguments.
    """
    _require_graph_model(model, "converted by target_layers")
    train_bias = check_conversion_arguments(model, kwargs)
    # Paths reach into nested functional models ("backbone/conv1").
    layers = list(named_layers(model))
    targets = match_targets(model, target_layers, layers)
    check_pattern_keys(model, kwargs, [(path, layer) for path, layer in layers if path in targets])
    trainable = match_layers(
        model, list(kwargs.get("lora_trainable_layers", [])), layers, "lora_trainable_layers entry"
    )
    converted = convert_graph_targets(model, targets, trainable, kwargs)
    converted.lora_settings = LoRASettings(train_bias, tuple(trainable))
    return converted


def convert_graph_targets(model, targets: list[str], trainable: list[str], kwargs: dict):
    """Clones a functional/Sequential model with LoRA at the exact layer paths ``targets``.

    Args:
        model: The functional or Sequential model.
        targets: Paths of convertible layers (nested models' layers included).
        trainable: Paths of the layers that stay trainable; others freeze.
        kwargs: Checked LoRA arguments, as :func:`convert_graph_model` takes them.

    Returns:
        The converted model, with every weight of ``model``.
    """

    def inside(path, prefix):
        return [p.split("/", 1)[1] for p in path if p.startswith(prefix + "/")]

    def clone(layer):
        if layer.name in targets:
            return convert_target_layer(layer.name, layer, kwargs)
        if is_graph_model(layer) and inside(targets, layer.name):
            return convert_graph_targets(
                layer, inside(targets, layer.name), inside(trainable, layer.name), kwargs
            )
        return layer.__class__.from_config(layer.get_config())

    converted = tf.keras.models.clone_model(model, clone_function=clone)
    for src, dst in zip(model.layers, converted.layers, strict=True):
        if src.name in targets or (is_graph_model(src) and inside(targets, src.name)):
            continue  # converted with its weights
        if is_lora_layer(src):
            _copy_layer_weights(src, dst)  # a LoRA layer stays one, with its weights
            continue
        dst.set_weights(src.get_weights())
        # Frozen layers; a frozen BatchNorm also runs in inference mode, so
        # the base's moving statistics stay as they are.
        dst.trainable = dst.name in trainable
    return converted


def graph_model_to_regular(model: tf.keras.Model) -> tf.keras.Model:
    """Rebuilds a functional/Sequential LoRA model with plain layers, updates folded in.

    Args:
        model: A functional or Sequential model with LoRA layers.

    Returns:
        A new model of the same kind whose LoRA layers are plain Dense/Conv2D
        layers with kernel ``W0 + scaling * A @ B``; all layers trainable.

    Raises:
        UnregisteredArchitectureError: If ``model`` is not functional/Sequential.
    """
    _require_graph_model(model, "converted back")

    def has_lora(layer):
        return is_graph_model(layer) and any(is_lora_layer(x) for _, x in named_layers(layer))

    def clone(layer):
        if has_lora(layer):
            return graph_model_to_regular(layer)  # a nested model, weights and all
        config = layer.get_config()
        if isinstance(layer, LoRALayerMixin):
            config = {k: v for k, v in config.items() if not k.startswith("lora_")}
            return layer.base_layer_class.from_config(config)
        return layer.__class__.from_config(config)

    regular = tf.keras.models.clone_model(model, clone_function=clone)
    for src, dst in zip(model.layers, regular.layers, strict=True):
        dst.trainable = True
        if has_lora(src):
            continue
        if is_lora_layer(src):
            _copy_layer_weights(src, dst)
            if not src.merged and src.lora_enabled:
                dst.kernel.assign(src.merged_kernel())
        else:
            dst.set_weights(src.get_weights())
    return regular
