"""Per-slot copies of the layers an adapter carries in full (PEFT's ``modules_to_save``).

A classifier head of its own width, norm statistics: a few small layers a
pool keeps whole per slot (``[slots, ...]`` stacks), beside the paged LoRA
storage of :mod:`~.slots`.
"""

import numpy as np

from .._tf import tf
from ..errors import LoRAConfigError
from ..layers import matmul_last_axis
from .routing import BASE_ONLY, Routing, per_sample

__all__ = ["FullLayerSlots"]


class FullLayerSlots:
    """Per-slot copies of a layer an adapter carries in full (PEFT's ``modules_to_save``).

    Supported: ``Dense`` (a classifier head may be narrower than
    ``max_width``: its output is zero-padded and the pool masks it),
    ``BatchNormalization`` and ``LayerNormalization`` (inference statistics
    and scale/offset). Slot 0 and every free slot hold the base layer's own
    weights.

    Args:
        layer: The built layer.
        num_slots: Number of slots, slot 0 included.
        routing: The pool's routing.
        max_width: Output width of each slot (a Dense head's ``max_classes``).

    Raises:
        LoRAConfigError: For another layer type.
    """

    SUPPORTED = ("Dense", "BatchNormalization", "LayerNormalization")

    def __init__(self, layer, num_slots: int, routing: Routing, max_width: int | None = None):
        kind = type(layer).__name__
        if not isinstance(
            layer,
            (
                tf.keras.layers.Dense,
                tf.keras.layers.BatchNormalization,
                tf.keras.layers.LayerNormalization,
            ),
        ) or getattr(layer, "is_lora_layer", False):
            raise LoRAConfigError(
                f"Layer '{layer.name}' ({kind}) cannot be served per slot; a pool serves "
                f"full layers of types {list(self.SUPPORTED)}."
            )
        self.layer, self.routing = layer, routing
        self.is_dense = isinstance(layer, tf.keras.layers.Dense)
        self.width = int(max_width or layer.units) if self.is_dense else None
        self.base = {self._name(v): v.numpy() for v in layer.weights}
        self.slots = {
            name: tf.Variable(np.repeat(self.pad(value)[None], num_slots, 0), trainable=False)
            for name, value in self.base.items()
        }
        self._plain_call = layer.call
        layer.call = self._call  # scoped: only this layer object, undone by detach()

    @staticmethod
    def _name(variable) -> str:
        return variable.name.rsplit("/", 1)[-1].split(":", 1)[0]

    def detach(self) -> None:
        """Gives the layer back its plain ``call``."""
        if self.layer.__dict__.get("call") == self._call:
            del self.layer.call

    def pad(self, value: np.ndarray) -> np.ndarray:
        """A variable's value padded on its output axis to the slot width."""
        if not self.is_dense or value.shape[-1] == self.width:
            return value
        padded = np.zeros([*value.shape[:-1], self.width], value.dtype)
        padded[..., : value.shape[-1]] = value
        return padded

    @property
    def slot_variables(self) -> list:
        """The stacked ``[slots, ...]`` variables, in the order of :meth:`slot_values`."""
        return list(self.slots.values())

    def slot_values(self, values: dict) -> list[np.ndarray]:
        """One slot's values: the adapter's where it has them (``name -> array``),
        else the base layer's, padded to the slot width."""
        return [self.pad(values.get(name, base)) for name, base in self.base.items()]

    def _call(self, inputs, *args, **kwargs):
        routing = self.routing.current()
        if routing is None:
            return self._plain_call(inputs, *args, **kwargs)
        if routing is BASE_ONLY:
            routing = self.routing.merged_slot
        x = tf.cast(inputs, self.layer.compute_dtype)
        pick = lambda name: tf.gather(self.slots[name], routing)  # noqa: E731
        if self.is_dense:
            kernel, layer = pick("kernel"), self.layer
            if routing.shape.rank == 0:
                y = matmul_last_axis(x, tf.cast(kernel, x.dtype))
            else:
                rows = tf.reshape(x, [tf.shape(x)[0], -1, layer.kernel.shape[0]])
                y = tf.matmul(rows, tf.cast(kernel, x.dtype))
                y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [self.width]], 0))
            if layer.use_bias:
                bias = tf.cast(pick("bias"), y.dtype)
                y += bias if routing.shape.rank == 0 else per_sample(bias, y)
            return layer.activation(y) if layer.activation is not None else y
        return self._normalize(x, pick, routing.shape.rank == 0)

    def _normalize(self, x, pick, uniform: bool):
        layer = self.layer
        x32 = tf.cast(x, tf.float32)  # statistics in float32, also under mixed precision
        shaped = (
            (lambda v: tf.cast(v, tf.float32))
            if uniform
            else (lambda v: per_sample(tf.cast(v, tf.float32), x32))
        )
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            mean, variance = shaped(pick("moving_mean")), shaped(pick("moving_variance"))
        else:
            axes = [a % x.shape.rank for a in layer.axis]
            mean, variance = tf.nn.moments(x32, axes, keepdims=True)
        y = (x32 - mean) * tf.math.rsqrt(variance + layer.epsilon)
        if layer.scale:
            y *= shaped(pick("gamma"))
        if layer.center:
            y += shaped(pick("beta"))
        return tf.cast(y, x.dtype)
