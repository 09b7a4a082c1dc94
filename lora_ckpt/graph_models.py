"""LoRA for any functional or Sequential Keras model, by layer-name pattern.

Like PEFT's ``target_modules``: the layers whose names match a pattern (and
whose type has a LoRA counterpart) become LoRA layers; every other layer is
frozen unless named in ``lora_trainable_layers``. The model is rebuilt with
``tf.keras.models.clone_model`` and keeps all its weights, so Keras' own
``fit`` trains exactly the LoRA weights (and the asked biases and layers).
"""

from collections.abc import Iterable

from ._tf import tf
from .errors import LoRAConfigError, UnregisteredArchitectureError
from .layers import LoRALayerMixin, convert_to_lora_layer, is_lora_layer, supported_layer_types
from .selection import LoRASettings, match_layers
from .traversal import variable_short_name

_LORA_KWARGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_initializer", "lora_regularizer")
_OPTIONS = ("lora_train_bias", "lora_trainable_layers")


def is_graph_model(model) -> bool:
    """Whether ``model`` is a functional or Sequential Keras model."""
    return isinstance(model, tf.keras.Model) and getattr(model, "_is_graph_network", False)


def _convertible(layer) -> bool:
    return (
        type(layer) in (tf.keras.layers.Dense, tf.keras.layers.Conv2D)
        and getattr(layer, "groups", 1) == 1
    )


def _copy_weights(src, dst) -> None:
    by_name = {variable_short_name(v): v for v in src.weights}
    for var in dst.weights:
        var.assign(by_name[variable_short_name(var)])


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
        target_layers: Layer names or ``fnmatch`` patterns (``"block_*_project"``,
            ``"Conv1"``); every pattern must match a Dense or Conv2D layer.
        **kwargs: ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
            ``lora_initializer``, ``lora_regularizer``; ``lora_train_bias``
            (``"none"`` or ``"lora_only"``) and ``lora_trainable_layers``
            (names or patterns of layers trained in full, e.g. the head).

    Returns:
        A new model of the same kind with LoRA layers, all weights copied.

    Raises:
        UnregisteredArchitectureError: If ``model`` is not functional/Sequential.
        LayerNotFoundError: If a pattern matches no convertible layer.
        LoRAConfigError: For unknown or invalid arguments.
    """
    _require_graph_model(model, "converted by target_layers")
    unknown = sorted(set(kwargs) - set(_LORA_KWARGS) - set(_OPTIONS))
    if unknown:
        raise LoRAConfigError(
            f"Unknown argument(s) {unknown} for converting a {type(model).__name__} model; "
            f"valid: {sorted(_LORA_KWARGS + _OPTIONS)}."
        )
    train_bias = kwargs.pop("lora_train_bias", "none")
    if train_bias not in ("none", "lora_only"):
        raise LoRAConfigError(
            f"lora_train_bias={train_bias!r} is not available for functional/Sequential "
            "models (frozen layers cannot train their bias alone in Keras); use 'none' or "
            "'lora_only', or train with lora_trainable_weights(model, 'all') in a custom loop."
        )
    trainable_patterns = list(kwargs.pop("lora_trainable_layers", []))
    patterns = [target_layers] if isinstance(target_layers, str) else list(target_layers)

    # In a functional/Sequential model a layer's path is its name.
    layers = [(layer.name, layer) for layer in model.layers]
    convertible = [(name, layer) for name, layer in layers if _convertible(layer)]
    targets = set(
        match_layers(
            model,
            patterns,
            convertible,
            f"target_layers pattern (over {'/'.join(supported_layer_types())} layers, groups=1)",
        )
    )
    trainable = set(
        match_layers(model, trainable_patterns, layers, "lora_trainable_layers pattern")
    )

    def clone(layer):
        if layer.name in targets:
            return convert_to_lora_layer(
                layer,
                lora_freeze_base=True,
                lora_bias_trainable=train_bias == "lora_only",
                **kwargs,
            )
        return layer.__class__.from_config(layer.get_config())

    converted = tf.keras.models.clone_model(model, clone_function=clone)
    for src, dst in zip(model.layers, converted.layers, strict=True):
        if not is_lora_layer(dst):
            dst.set_weights(src.get_weights())
        if not is_lora_layer(dst):
            # Frozen layers; a frozen BatchNorm also runs in inference mode,
            # so the base's moving statistics stay as they are.
            dst.trainable = dst.name in trainable
    converted.lora_settings = LoRASettings(train_bias, tuple(sorted(trainable)))
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

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, LoRALayerMixin):
            config = {k: v for k, v in config.items() if not k.startswith("lora_")}
            return layer.base_layer_class.from_config(config)
        return layer.__class__.from_config(config)

    regular = tf.keras.models.clone_model(model, clone_function=clone)
    for src, dst in zip(model.layers, regular.layers, strict=True):
        dst.trainable = True
        if is_lora_layer(src):
            _copy_weights(src, dst)
            if not src.merged:
                dst.kernel.assign(src.merged_kernel())
        else:
            dst.set_weights(src.get_weights())
    return regular
