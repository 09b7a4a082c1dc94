"""How a request's slot ids reach one pool's layers, and the grouping of a
mixed batch by slot.

Requests reach the slots through the pool's :class:`Routing`: a scalar slot
id (the whole batch uses one adapter) or a vector (one slot per sample) that
the pool's compiled forward takes as an input, so nothing retraces when
adapters load, evict or switch. A routing value set by one pool reaches only
that pool's layers; outside its routing the layers behave as plain layers.
"""

import contextlib
import contextvars
import itertools

from .._tf import tf

__all__ = ["Routing", "grouped_by_slot", "per_sample"]


BASE_ONLY = object()
"""Routing value that makes every layer of the pool compute its base layer alone."""

_ids = itertools.count()


class Routing:
    """The slot routing of one pool: a context variable no other pool reads."""

    def __init__(self):
        self._var = contextvars.ContextVar(f"lora_slot_routing_{next(_ids)}", default=None)
        # The slot whose full layers (heads, norms) serve while LoRA is merged.
        self.merged_slot = tf.Variable(0, trainable=False)

    @contextlib.contextmanager
    def route(self, slot_ids):
        """Routes this pool's layers called inside the block.

        Args:
            slot_ids: An int32 tensor (a scalar slot for the whole batch, or
                ``[batch]`` slots), or :data:`BASE_ONLY`.
        """
        token = self._var.set(slot_ids)
        try:
            yield
        finally:
            self._var.reset(token)

    def current(self):
        """The routing value in force, or ``None`` outside :meth:`route`."""
        return self._var.get()


def per_sample(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Reshapes ``values[batch, n]`` to broadcast against ``like[batch, ..., n]``.

    Args:
        values: One row per sample.
        like: The tensor the rows multiply or add to.

    Returns:
        ``values`` with singleton axes between the batch and the last axis.
    """
    extra = like.shape.rank - values.shape.rank
    shape = tf.concat([tf.shape(values)[:1], tf.ones([extra], tf.int32), tf.shape(values)[1:]], 0)
    return tf.reshape(values, shape)


def grouped_by_slot(x: tf.Tensor, slot_ids: tf.Tensor, branch, out: tf.Tensor) -> tf.Tensor:
    """Adds ``branch(samples, slot)`` to ``out`` once per distinct slot of the batch.

    Args:
        x: The layer input ``[batch, ...]``.
        slot_ids: ``[batch]`` slot per sample.
        branch: ``(x_of_group, slot) -> update`` for the samples of one slot.
        out: The base output ``[batch, ..., out]``; the updates are added to it.

    Returns:
        ``out`` plus each sample's update.
    """
    slots, group = tf.unique(slot_ids)
    updates = tf.TensorArray(out.dtype, size=tf.size(slots), infer_shape=False)
    positions = tf.TensorArray(tf.int32, size=tf.size(slots), infer_shape=False)

    def body(i, updates, positions):
        members = tf.cast(tf.where(tf.equal(group, i))[:, 0], tf.int32)
        update = branch(tf.gather(x, members), slots[i])
        return i + 1, updates.write(i, update), positions.write(i, members)

    _, updates, positions = tf.while_loop(
        lambda i, *_: i < tf.size(slots), body, [tf.constant(0), updates, positions]
    )
    # Undo the grouping: position p of the concatenation holds sample order[p].
    order = positions.concat()
    update = tf.gather(updates.concat(), tf.math.invert_permutation(order))
    return out + tf.reshape(update, tf.shape(out))
