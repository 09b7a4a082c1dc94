"""The write of one pool slot into every layer's storage: one compiled call.

A load's values are planned in Python first (each layer takes the pages and
rows the adapter needs, growing its stacks if they are short), then written
by one traced function whose inputs are the slot, one int vector (each LoRA
layer's rank, row numbers and pages) and one flat float vector: one graph for
every adapter, whatever its ranks (an input per array would cost more than
the writes). Writes are serialised by a lock: a stack that grows is copied,
and a write meanwhile would be lost.
"""

import dataclasses
import threading

import numpy as np

from .._tf import tf


@dataclasses.dataclass(frozen=True)
class SlotContents:
    """What one slot holds: each LoRA layer's ``slot_values`` (``None``: not
    adapted) in the pool's layer order, and the full layers' values, flat."""

    lora: list
    full: np.ndarray


class SlotWriter:
    """Writes slots of one pool's LoRA layers and full layers.

    Args:
        lora: The pool's :class:`~.slots.LoRASlots`, in order.
        full: The pool's :class:`~.full_slots.FullLayerSlots`, in order.
        max_rank: The pool's largest rank.
        dtype: The dtype of the slot values.
    """

    def __init__(self, lora: list, full: list, max_rank: int, dtype):
        self._lora, self._max_rank = lora, max_rank
        self._full = [v for slots in full for v in slots.slot_variables]
        self._lock = threading.Lock()
        spec = [
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], dtype),
        ]
        self._write = tf.function(self._write_slot, input_signature=spec, autograph=False)

    def __call__(self, slot: int, contents: SlotContents) -> None:
        """Writes ``contents`` into ``slot`` of every layer (freeing what it held).

        Args:
            slot: The slot index.
            contents: Its values (:meth:`PoolLayers.values_of`).
        """
        with self._lock:
            ints, floats = [], []
            for slots, values in zip(self._lora, contents.lora, strict=True):
                row, parts = slots.plan(slot, values)
                ints.append(row)
                floats += parts
            floats.append(contents.full)
            dtype = contents.full.dtype
            flat = np.concatenate([np.asarray(f, dtype) for f in floats])
            self._write(tf.constant(slot, tf.int32), np.concatenate(ints), flat)

    def _write_slot(self, slot, ints, flat):
        rows = tf.reshape(ints, [len(self._lora), 3 + self._max_rank])
        sizes = [slots.flat_size(rows[i]) for i, slots in enumerate(self._lora)]
        sizes += [v.shape[1:].num_elements() for v in self._full]
        parts = tf.split(flat, tf.stack(sizes), num=len(sizes))
        for i, slots in enumerate(self._lora):
            slots.write(slot, rows[i], parts[i])
        for variable, part in zip(self._full, parts[len(self._lora) :], strict=True):
            variable[slot].assign(tf.reshape(part, variable.shape[1:]))
