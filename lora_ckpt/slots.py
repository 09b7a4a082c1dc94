"""Slot storage for serving many adapters on one LoRA layer, and batch routing.

A layer with slots holds ``K`` adapters side by side: ``A[K, ..., R]``,
``B[K, R, out]``, a scaling and a bias per slot, smaller ranks zero-padded to
``R`` (the padding contributes exact zeros). Slot 0 is "off": zero update,
base bias. A forward pass routes each sample to its slot through a slot-id
tensor that the caller puts in context while the model's graph is traced::

    with lora_routing(slot_ids):      # a tensor, e.g. a tf.function input
        y = model(x)

so the compiled function takes the ids as an input and nothing retraces when
adapters are loaded or switched. ``lora_routing(BASE_ONLY)`` skips every LoRA
branch (for merged kernels). Outside a routing context layers behave as
plain LoRA layers. The slot variables are not Keras weights: they never show
up in ``model.weights``, parameter counts or checkpoints.
"""
import contextlib
import contextvars
from typing import Optional

import numpy as np

from ._tf import tf

BASE_ONLY = object()
"""Routing value that makes every LoRA layer compute its base layer alone."""

_ROUTING: contextvars.ContextVar = contextvars.ContextVar("lora_routing", default=None)


@contextlib.contextmanager
def lora_routing(slot_ids):
    """Routes the LoRA layers called inside to per-sample slots.

    Args:
        slot_ids: An int32 tensor ``[batch]`` of slot indices, or
            :data:`BASE_ONLY`.
    """
    token = _ROUTING.set(slot_ids)
    try:
        yield
    finally:
        _ROUTING.reset(token)


def current_routing():
    """The routing of the innermost :func:`lora_routing` context, or ``None``."""
    return _ROUTING.get()


def _broadcast_per_sample(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Reshapes ``values[batch, ...]`` to broadcast against ``like[batch, ..., n]``."""
    extra = like.shape.rank - values.shape.rank
    new_shape = tf.concat([tf.shape(values)[:1], tf.ones([extra], tf.int32), tf.shape(values)[1:]], 0)
    return tf.reshape(values, new_shape)


class SlotStorage:
    """The resident adapters of one LoRA layer.

    Args:
        layer: A built LoRA layer.
        num_slots: Number of slots, slot 0 included.
        max_rank: Rank every slot is padded to.
    """

    def __init__(self, layer, num_slots: int, max_rank: int):
        dtype = layer.kernel.dtype
        a_shape = list(layer.kernel_lora_a.shape[:-1])
        out_dim = int(layer.kernel.shape[-1])
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.a_shape = a_shape
        self.out_dim = out_dim
        self.a = tf.Variable(tf.zeros([num_slots, *a_shape, max_rank], dtype), trainable=False)
        self.b = tf.Variable(tf.zeros([num_slots, max_rank, out_dim], dtype), trainable=False)
        self.scale = tf.Variable(tf.zeros([num_slots], dtype), trainable=False)
        self.base_bias = layer.bias if layer.use_bias else None
        self.bias = (
            tf.Variable(tf.tile(layer.bias[None], [num_slots, 1]), trainable=False)
            if layer.use_bias else None
        )

    def write(self, slot: int, a: np.ndarray, b: np.ndarray, scale: float,
              bias: Optional[np.ndarray] = None) -> None:
        """Writes one adapter into ``slot``, zero-padding its rank to ``max_rank``.

        Args:
            slot: The slot index (not 0, which stays "off").
            a: ``A`` of shape ``[*a_shape, r]`` with ``r <= max_rank``.
            b: ``B`` of shape ``[r, out]``.
            scale: The adapter's ``alpha / rank`` for this layer.
            bias: The adapter's bias, or ``None`` for the base bias.
        """
        rank = a.shape[-1]
        a_padded = np.zeros([*self.a_shape, self.max_rank], a.dtype)
        a_padded[..., :rank] = a
        b_padded = np.zeros([self.max_rank, self.out_dim], b.dtype)
        b_padded[:rank] = b
        self.a[slot].assign(a_padded)
        self.b[slot].assign(b_padded)
        self.scale[slot].assign(scale)
        if self.bias is not None:
            self.bias[slot].assign(self.base_bias if bias is None else bias)

    def clear(self, slot: int) -> None:
        """Makes ``slot`` compute the base layer again."""
        self.scale[slot].assign(0.0)
        self.b[slot].assign(tf.zeros_like(self.b[slot]))
        if self.bias is not None:
            self.bias[slot].assign(self.base_bias)

    def delta(self, slot: int) -> tf.Tensor:
        """``scale * A @ B`` of one slot, in the shape of the kernel."""
        a = self.a[slot]
        delta = tf.tensordot(a, self.b[slot], [[a.shape.rank - 1], [0]])
        return self.scale[slot] * delta

    def branch(self, z: tf.Tensor, slot_ids: tf.Tensor) -> tf.Tensor:
        """``scale[i] * z[i] @ B[i]`` per sample, from the projections ``z[batch, ..., R]``."""
        y = tf.einsum("b...r,bro->b...o", z, tf.gather(self.b, slot_ids))
        return y * _broadcast_per_sample(tf.gather(self.scale, slot_ids), y)

    def bias_for(self, slot_ids: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
        """Each sample's bias, shaped to add to ``like``."""
        return _broadcast_per_sample(tf.gather(self.bias, slot_ids), like)
