"""The write of one pool slot into every layer's storage: one compiled call.

A load's values are planned in Python first (each layer takes the pages and
rows the adapter needs, growing its stacks if they are short), then written
by one traced function whose inputs are the slot, one int vector (each LoRA
layer's rank, row numbers and pages) and one flat float vector: one graph for
every adapter, whatever its ranks (an input per array would cost more than
the writes). Plans are serialised by a lock; writes run concurrently (each
into pages no one else holds), but a stack that grows is copied, and a write
meanwhile would be lost: growth holds a readers-writer lock alone, writes
hold it shared.
"""

import dataclasses
import threading

import numpy as np

from .._tf import tf
from .rwlock import ReadWriteLock
from .slots import LoRASlots

__all__ = ["SlotContents", "SlotWriter"]


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
        self._lora, self._max_rank, self._dtype = lora, max_rank, dtype
        self._full = [v for slots in full for v in slots.slot_variables]
        self._plan_lock, self._grow_lock = threading.Lock(), ReadWriteLock()
        spec = [
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], dtype),
        ]
        self._write = tf.function(self._write_slot, input_signature=spec, autograph=False)
        # Traced at the first write (a pool that never loads never traces it) and
        # then called directly: a load skips matching its inputs against the signature.
        self._concrete = None
        self._trace_lock = threading.Lock()

    def __call__(self, slot: int, contents: SlotContents) -> None:
        """Writes ``contents`` into ``slot`` of every layer (freeing what it held).

        Args:
            slot: The slot index.
            contents: Its values (:meth:`PoolLayers.values_of`).
        """
        ints, floats, growths = [], [], []
        with self._plan_lock:
            for slots, values in zip(self._lora, contents.lora, strict=True):
                row, parts, grow = slots.plan(slot, values)
                ints.append(row)
                floats += parts
                growths += grow
            if growths:
                with self._grow_lock.writing():
                    for variable, size in growths:
                        LoRASlots.grow(variable, size)
        floats.append(contents.full)
        dtype = contents.full.dtype
        flat = np.concatenate([np.asarray(f, dtype) for f in floats])
        with self._grow_lock.reading():
            self._traced()(
                tf.constant(slot, tf.int32),
                tf.constant(np.concatenate(ints)),
                tf.constant(flat, self._dtype),
            )

    def _traced(self):
        if self._concrete is None:
            with self._trace_lock:
                if self._concrete is None:
                    self._concrete = self._write.get_concrete_function()
        return self._concrete

    def _write_slot(self, slot, ints, flat):
        rows = tf.reshape(ints, [len(self._lora), 3 + self._max_rank])
        sizes = [slots.flat_size(rows[i]) for i, slots in enumerate(self._lora)]
        sizes += [v.shape[1:].num_elements() for v in self._full]
        parts = tf.split(flat, tf.stack(sizes), num=len(sizes))
        for i, slots in enumerate(self._lora):
            slots.write(slot, rows[i], parts[i])
        for variable, part in zip(self._full, parts[len(self._lora) :], strict=True):
            variable[slot].assign(tf.reshape(part, variable.shape[1:]))
