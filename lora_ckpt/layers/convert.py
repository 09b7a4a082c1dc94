"""Which Keras layer classes have a LoRA class, and turning a layer into its LoRA version."""

import contextlib

from .._tf import require_tf_keras, tf
from ..errors import LoRAConfigError, UnsupportedLayerError
from .args import LORA_LAYER_ARGS
from .conv import LoRAConv2D
from .dense import LoRADense

__all__ = [
    "convert_to_lora_layer",
    "describe_unsupported",
    "has_kernel",
    "has_lora_counterpart",
    "is_lora_layer",
    "register_lora_layer",
    "supported_layer_types",
]


# Arguments whose objects are taken over as they are: a custom initializer
# (tfimm's FanoutInitializer) need not be known to Keras' deserialisation.
_OBJECT_ARGUMENTS = (
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)

_LORA_LAYER_CLASSES = {
    tf.keras.layers.Dense: LoRADense,
    tf.keras.layers.Conv2D: LoRAConv2D,
}


def register_lora_layer(base_cls: type, lora_cls: type) -> None:
    """Makes :func:`convert_to_lora_layer` turn layers of exactly ``base_cls`` into ``lora_cls``.

    Args:
        base_cls: A Keras layer class (for example tfimm's ``PadConv2D``).
        lora_cls: Its LoRA class: a subclass of it with
            :class:`~lora_ckpt.layers.LoRALayerMixin`.
    """
    _LORA_LAYER_CLASSES[base_cls] = lora_cls


def has_lora_counterpart(layer) -> bool:
    """Whether :func:`convert_to_lora_layer` converts ``layer`` (its exact type, groups=1)."""
    return type(layer) in _LORA_LAYER_CLASSES and getattr(layer, "groups", 1) == 1


# Layers with a kernel that LoRA might be asked to adapt: what a layer group
# or pattern may name, whether or not it has a LoRA version.
_KERNEL_LAYERS = (
    tf.keras.layers.Dense,
    tf.keras.layers.Conv1D,
    tf.keras.layers.Conv2D,
    tf.keras.layers.Conv3D,
    tf.keras.layers.DepthwiseConv2D,
    tf.keras.layers.SeparableConv2D,
)


def has_kernel(layer) -> bool:
    """Whether ``layer`` is a Dense or convolution layer, with or without a LoRA version."""
    return isinstance(layer, _KERNEL_LAYERS) or type(layer) in _LORA_LAYER_CLASSES


def describe_unsupported(layer) -> str:
    """Why :func:`convert_to_lora_layer` refuses ``layer``, in a few words for messages."""
    groups = getattr(layer, "groups", 1)
    if type(layer) in _LORA_LAYER_CLASSES and groups != 1:
        return f"{type(layer).__name__}, groups={groups}"
    return type(layer).__name__


def supported_layer_types() -> list[str]:
    """Names of the Keras layer classes that :func:`convert_to_lora_layer` takes."""
    return [cls.__name__ for cls in _LORA_LAYER_CLASSES]


def convert_to_lora_layer(layer: tf.keras.layers.Layer, **kwargs) -> tf.keras.layers.Layer:
    """Creates the LoRA counterpart of a ``Dense`` or ``Conv2D`` layer.

    The new layer has the same config (and name). If ``layer`` is built, the
    new layer is built too and takes over its kernel and bias.

    Args:
        layer: The layer to convert; its exact type must be supported
            (subclasses such as ``DepthwiseConv2D`` have other semantics).
        **kwargs: LoRA arguments (:data:`LORA_LAYER_ARGS`): ``lora_rank``,
            ``lora_alpha``, ``lora_use_dora``, ``lora_freeze_base``, ...

    Returns:
        The LoRA layer.

    Raises:
        UnsupportedLayerError: If the layer type has no LoRA counterpart.
        LoRAConfigError: For invalid LoRA arguments.
    """
    require_tf_keras(layer, "convert_to_lora_layer")
    lora_cls = _LORA_LAYER_CLASSES.get(type(layer))
    if lora_cls is None:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' of type {type(layer).__name__} has no LoRA "
            f"counterpart; supported types are {supported_layer_types()}."
        )
    unknown = sorted(set(kwargs) - set(LORA_LAYER_ARGS))
    if unknown:
        raise LoRAConfigError(
            f"convert_to_lora_layer takes only lora_* arguments {list(LORA_LAYER_ARGS)}, "
            f"got {unknown}."
        )
    config = layer.get_config()
    for name in _OBJECT_ARGUMENTS:
        if name in config and hasattr(layer, name):
            config[name] = getattr(layer, name)
    lora_layer = lora_cls(**config, **kwargs)
    lora_layer.adopt_base_layer(layer)
    if layer.built:
        kernel_in = layer.kernel.shape[-2]
        dense = issubclass(lora_cls, LoRADense)
        input_shape = (None, kernel_in) if dense else (None, None, None, kernel_in)
        # Built in the base kernel's name scope, its variables are named as the
        # base layer's were (weight files and tfimm's transfer_weights key by it).
        scope, _, _ = layer.kernel.name.rpartition("/")
        with tf.name_scope(scope + "/") if scope else contextlib.nullcontext():
            lora_layer.build(input_shape)
        lora_layer.kernel.assign(layer.kernel)
        if layer.use_bias:
            lora_layer.bias.assign(layer.bias)
        lora_layer.reset_lora_magnitude()
    return lora_layer


def is_lora_layer(layer) -> bool:
    """Whether ``layer`` is a LoRA layer (has ``kernel_lora_a``/``_b``)."""
    return bool(getattr(layer, "is_lora_layer", False))
