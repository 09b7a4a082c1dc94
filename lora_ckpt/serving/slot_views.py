"""One LoRA layer's paged slots read as dense per-slot stacks, for inspection.

Pages are how a pool stores adapters; a person (or a test) checking what a
slot holds thinks in per-slot arrays: ``a[slot]`` is the adapter's ``A``
zero-padded to ``max_rank``, ``b[slot]`` its ``scale * B``, ``g[slot]`` its
output scale, ``bias[slot]`` its bias. A :class:`SlotView` computes that from
the live variables each time it is read, also inside a ``tf.function`` (it
converts to a tensor), so it never goes stale. It is read-only.
"""

from .._tf import tf

__all__ = ["SlotView"]


PARTS = ("a", "b", "g", "bias")


class SlotView:
    """A dense, read-only ``[slots, ...]`` view of one part of a layer's slots.

    Args:
        slots: The layer's :class:`~.slots.LoRASlots`.
        part: ``"a"`` (``[slots, *fan_in, max_rank]``), ``"b"`` (``[slots,
            max_rank, out]``), ``"g"`` or ``"bias"`` (``[slots, out]``).
    """

    def __init__(self, slots, part: str):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}.")
        self._slots, self._part = slots, part

    def value(self) -> tf.Tensor:
        """The whole stack, read now."""
        s = self._slots
        if self._part == "g":
            return tf.gather(s.g_rows, s.g_index)
        if self._part == "bias":
            return tf.gather(s.bias_rows, s.bias_index)
        if self._part == "b":
            return tf.gather(s.b_pages, s.page_table)
        pages = tf.gather(s.a_pages, s.page_table)  # [slots, max_rank, *fan_in]
        rank = pages.shape.rank
        return tf.transpose(pages, [0, *range(2, rank), 1])

    @property
    def shape(self) -> tf.TensorShape:
        s = self._slots
        slots = s.ranks.shape[0]
        return tf.TensorShape(
            {
                "a": [slots, *s.a_shape, s.max_rank],
                "b": [slots, s.max_rank, s.out_dim],
            }.get(self._part, [slots, s.out_dim])
        )

    @property
    def dtype(self) -> tf.DType:
        return self._slots.dtype

    def numpy(self):
        """The whole stack as a numpy array."""
        return self.value().numpy()

    def __getitem__(self, index):
        return self.value()[index]

    def assign(self, value):
        """Refused: slots are written by loads only.

        Raises:
            TypeError: Always.
        """
        raise TypeError("A SlotView is read-only; load an adapter to change a slot.")


tf.register_tensor_conversion_function(
    SlotView, lambda view, dtype=None, name=None, as_ref=False: view.value()
)
