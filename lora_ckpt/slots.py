"""Slot storage for serving many adapters on one LoRA layer, and batch routing.

A layer with slots holds ``K`` adapters side by side: ``A[K, ..., R]``,
``B[K, R, out]``, a scaling and a bias per slot, smaller ranks zero-padded to
``R`` (the padding contributes exact zeros). Slot 0 is "off": zero update,
base bias. A forward pass routes samples to slots through a slot-id tensor
that the caller puts in context while the model's graph is traced::

    with lora_routing(slot_ids):      # a tensor, e.g. a tf.function input
        y = model(x)

A scalar id sends the whole batch to one slot; a vector ``[batch]`` gives
each sample its own.

so the compiled function takes the ids as an input and nothing retraces when
adapters are loaded or switched. ``lora_routing(BASE_ONLY)`` skips every LoRA
branch (for merged kernels). Outside a routing context layers behave as
plain LoRA layers. The slot variables are not Keras weights: they never show
up in ``model.weights``, parameter counts or checkpoints.
"""

import contextlib
import contextvars

import numpy as np

from ._tf import tf

BASE_ONLY = object()
"""Routing value that makes every LoRA layer compute its base layer alone."""

_ROUTING: contextvars.ContextVar = contextvars.ContextVar("lora_routing", default=None)


@contextlib.contextmanager
def lora_routing(slot_ids):
    """Routes the LoRA layers called inside to per-sample slots.

    Args:
        slot_ids: An int32 tensor: a scalar slot for the whole batch, or
            ``[batch]`` slot indices; or :data:`BASE_ONLY`.
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
    new_shape = tf.concat(
        [tf.shape(values)[:1], tf.ones([extra], tf.int32), tf.shape(values)[1:]], 0
    )
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
            if layer.use_bias
            else None
        )

    def padded(self, a: np.ndarray, b: np.ndarray):
        """An adapter's ``A[..., r]`` and ``B[r, out]`` zero-padded to ``max_rank``.

        The padding is exact: padded columns of ``A`` and rows of ``B`` are
        zero, so they add exact zeros to the update.
        """
        rank = a.shape[-1]
        a_padded = np.zeros([*self.a_shape, self.max_rank], self.a.dtype.as_numpy_dtype)
        a_padded[..., :rank] = a
        b_padded = np.zeros([self.max_rank, self.out_dim], self.b.dtype.as_numpy_dtype)
        b_padded[:rank] = b
        return a_padded, b_padded

    def assign(self, slot, a_padded, b_padded, scale, bias) -> None:
        """Writes one adapter into ``slot`` (graph-friendly; see :meth:`padded`).

        Args:
            slot: The slot index (never 0, which stays "off").
            a_padded, b_padded: From :meth:`padded`.
            scale: The adapter's ``alpha / rank`` for this layer.
            bias: The adapter's bias (the base bias if it has none); ignored
                for a layer without bias.
        """
        self.a[slot].assign(a_padded)
        self.b[slot].assign(b_padded)
        self.scale[slot].assign(scale)
        if self.bias is not None:
            self.bias[slot].assign(bias)

    def delta(self, slot: int) -> tf.Tensor:
        """``scale * A @ B`` of one slot, in the shape of the kernel."""
        a = self.a[slot]
        # Scaling B (R x out) costs less than scaling the kernel-sized delta.
        return tf.tensordot(a, self.scale[slot] * self.b[slot], [[a.shape.rank - 1], [0]])

    def a_all(self) -> tf.Tensor:
        """Every slot's ``A`` side by side: ``[*a_shape, num_slots * max_rank]``."""
        ndim = len(self.a_shape) + 2
        a = tf.transpose(self.a, list(range(1, ndim - 1)) + [0, ndim - 1])
        return tf.reshape(a, [*self.a_shape, self.num_slots * self.max_rank])

    def b_all_scaled(self) -> tf.Tensor:
        """Every slot's ``scale * B`` stacked: ``[num_slots * max_rank, out]``."""
        b = self.b * self.scale[:, None, None]
        return tf.reshape(b, [self.num_slots * self.max_rank, self.out_dim])

    def deltas(self, slot_ids: tf.Tensor) -> tf.Tensor:
        """Each sample's ``scale * A @ B``: ``[batch, in, out]`` (Dense slots)."""
        b = tf.gather(self.b, slot_ids) * tf.gather(self.scale, slot_ids)[:, None, None]
        return tf.matmul(tf.gather(self.a, slot_ids), b)

    def slot_mask(self, slot_ids: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
        """1 on each sample's own ``max_rank`` channels of ``a_all``'s output, else 0."""
        one_hot = tf.one_hot(slot_ids, self.num_slots, dtype=self.a.dtype)
        return _broadcast_per_sample(tf.repeat(one_hot, self.max_rank, axis=1), like)

    def bias_of(self, slot) -> tf.Tensor:
        """One slot's bias (``0`` for a layer without bias)."""
        return self.bias[slot] if self.bias is not None else tf.constant(0, self.a.dtype)

    def bias_for(self, slot_ids: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
        """Each sample's bias, shaped to add to an output like ``like``."""
        if self.bias is None:
            return tf.constant(0, self.a.dtype)
        return _broadcast_per_sample(tf.gather(self.bias, slot_ids), like)
