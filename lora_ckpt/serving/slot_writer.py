"""The write of one pool slot into every layer's storage: one compiled call.

A load's values are planned in Python first (each layer takes the pages and
rows the adapter needs, growing its stacks if they are short), then written
by one traced function whose inputs are the slot, one flat float vector and
a few int vectors (each LoRA layer's rank, row numbers and pages; where each
part of the floats starts and which rows it goes to, computed here in
Python): one graph for every adapter, whatever its ranks (an input per array
would cost more than the writes), with one scatter per variable. Plans are
serialised by a lock; writes run concurrently (each into pages no one else
holds), but a stack that grows is copied, and a write meanwhile would be
lost: growth holds a readers-writer lock alone, writes hold it shared.
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
        self._full_sizes = [v.shape[1:].num_elements() for v in self._full]
        self._plan_lock, self._grow_lock = threading.Lock(), ReadWriteLock()
        ints = tf.TensorSpec([None], tf.int32)
        spec = [tf.TensorSpec([], tf.int32), ints, ints, ints, ints, tf.TensorSpec([None], dtype)]
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
        ints, floats, rows, growths = [], [], [], []
        with self._plan_lock:
            for slots, values in zip(self._lora, contents.lora, strict=True):
                row, parts, part_rows, grow = slots.plan(slot, values)
                ints.append(row)
                floats += parts
                rows += part_rows
                growths += grow
            if growths:
                with self._grow_lock.writing():
                    for variable, size in growths:
                        LoRASlots.grow(variable, size)
        sizes = [f.size for f in floats] + self._full_sizes
        floats.append(contents.full)
        dtype = contents.full.dtype
        flat = np.concatenate([np.asarray(f, dtype) for f in floats])
        with self._grow_lock.reading():
            self._traced()(
                tf.constant(slot, tf.int32),
                tf.constant(np.concatenate(ints)),
                tf.constant(sizes, tf.int32),
                tf.constant(np.concatenate([np.asarray(r, np.int32) for r in rows])),
                tf.constant([len(r) for r in rows], tf.int32),
                tf.constant(flat, self._dtype),
            )

    def _traced(self):
        if self._concrete is None:
            with self._trace_lock:
                if self._concrete is None:
                    self._concrete = self._write.get_concrete_function()
        return self._concrete

    def _write_slot(self, slot, ints, sizes, rows, row_sizes, flat):
        count, slot = len(self._lora), tf.reshape(slot, [1])
        tables = tf.unstack(tf.reshape(ints, [count, 1, 3 + self._max_rank]), num=count)
        parts = tf.split(flat, sizes, num=4 * count + len(self._full))
        rows = tf.split(rows, row_sizes, num=3 * count)
        for i, slots in enumerate(self._lora):
            slots.write(slot, tables[i], parts[4 * i : 4 * i + 4], rows[3 * i : 3 * i + 3])
        for variable, part in zip(self._full, parts[4 * count :], strict=True):
            shaped = tf.reshape(part, [1, *variable.shape[1:]])
            variable.scatter_update(tf.IndexedSlices(shaped, slot))
