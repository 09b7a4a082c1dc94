"""The adapters resident in a pool: its slot table, each slot's record, and the
writes that fill and clear slots.

The :class:`SlotTable` decides which slot a load takes, which slots requests
hold and which ones must be cleared; :class:`Residents` carries those
decisions out on the TensorFlow side (through the pool's compiled slot
write, the only thing it needs from TensorFlow) and keeps the
:class:`SlotRecord` of each slot in step with its weights.
"""

import contextlib
import threading
from collections.abc import Callable

import numpy as np

from .slot_record import SlotRecord
from .slot_table import SlotTable

__all__ = ["Residents"]


class Residents:
    """A pool's slots: which adapter each holds, its record, and its weights.

    Args:
        capacity: Number of adapter slots (slot 0, the base, comes on top).
        write: ``write(slot, contents)``: writes one slot of every layer
            (and frees the pages and rows it held).
        cleared: The contents of a cleared slot.
        base_record: The record of slot 0 and of every free slot.

    Attributes:
        table: The slot table (bookkeeping only).
        records: One :class:`SlotRecord` per slot, slot 0 included.
    """

    def __init__(self, capacity: int, write: Callable, cleared, base_record: SlotRecord):
        self.table = SlotTable(capacity)
        self.records = [base_record] * (capacity + 1)
        self._write, self._cleared, self._base_record = write, cleared, base_record
        self._lock = threading.Lock()
        self._served = {"requests": 0, "samples": 0}

    def record(self, name: str) -> SlotRecord:
        """The record of resident adapter ``name``.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        return self.records[self.table.slot_of(name)]

    def put(self, name: str, values, record: SlotRecord, timeout: float) -> int:
        """Writes an adapter into a slot and makes it resident under ``name``.

        Args:
            name: The adapter's name (a resident one is replaced).
            values: The slot's contents.
            record: What the slot records beside its weights.
            timeout: Seconds to wait for a slot while every slot is in use.

        Returns:
            The slot index.

        Raises:
            PoolFullError: Every slot is in use by running requests.
            MergeStateError: ``name`` is the merged adapter.
        """
        slot = self.table.reserve(timeout=timeout).slot
        try:
            self._write(slot, values)
            # Before the commit: requests see the slot only once its record is there too.
            self.records[slot] = record
            self.table.commit(name, slot)
        except BaseException:
            self.table.abort(slot)
            self.clear_freed()
            raise
        self.clear_freed()
        return slot

    def remove(self, name: str) -> None:
        """Unloads ``name``; its slot is cleared once no request uses it.

        Raises:
            As :meth:`SlotTable.unload`.
        """
        self.table.unload(name)
        self.clear_freed()

    @contextlib.contextmanager
    def using(self, names):
        """Holds the slots of ``names`` for the block; yields their ids (int32).

        Raises:
            AdapterNotLoadedError: If a name is not resident.
        """
        slots = self.table.acquire(list(names))
        try:
            yield np.asarray(slots, np.int32)
        finally:
            self.table.release(slots)
            self.clear_freed()

    def clear_freed(self) -> None:
        """Clears the slots nobody uses any more (their pages return to the free
        lists), so no stale weights linger."""
        slots = self.table.take_dirty()
        if not slots:
            return
        try:
            for slot in slots:
                self._write(slot, self._cleared)
                self.records[slot] = self._base_record
        finally:
            self.table.cleared(slots)

    def served(self, samples: int) -> None:
        """Counts one request of ``samples`` samples."""
        with self._lock:
            self._served["requests"] += 1
            self._served["samples"] += samples

    @property
    def stats(self) -> dict:
        """Loads, evictions, requests and samples served so far."""
        with self._lock:
            return {**self.table.stats, **self._served}
