"""The bookkeeping of an adapter pool's slots, in plain Python.

A pool keeps ``capacity`` adapters resident; every LoRA layer stores them in
slots ``1..capacity`` beside slot 0, :data:`OFF` (the base model, always
present). This table decides which slot holds what; the TensorFlow side only
writes or zeroes the slot it is told to. Every slot ``1..capacity`` is in
exactly one state:

``free``
    Empty (zeroed); :meth:`SlotTable.reserve` takes these first.
``loading``
    Reserved by a load in progress. Requests cannot see it, so they never
    read half-written weights; :meth:`~SlotTable.commit` makes it ``live``,
    :meth:`~SlotTable.abort` makes it ``dirty``.
``live``
    Holds an adapter under its name; requests reference it while they run.
``retired``
    Replaced by a reload of its name, or unloaded, while requests still use
    it: they finish with the weights they started with, new requests cannot
    see it. Its last release makes it ``dirty``.
``dirty``
    Unused but still holding old weights, which must not leak into a later
    adapter of lower rank: :meth:`~SlotTable.take_dirty` hands it to the
    TensorFlow side to zero (``clearing``), :meth:`~SlotTable.cleared` frees
    it. A load may take a dirty slot directly: it overwrites it anyway.
``clearing``
    Being zeroed; nobody else may touch it.

The merged adapter is pinned: its slot cannot be evicted, overwritten or
unloaded until unpinned, and reloading its name is refused rather than
retiring the slot whose weights sit in the base kernels (the old inline
bookkeeping did that and lost a slot per merge cycle).
"""

import contextlib
import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import AdapterNotLoadedError, LoRAConfigError, MergeStateError, PoolFullError

__all__ = ["Reservation", "SlotTable"]


OFF = "off"
FREE, LOADING, LIVE, RETIRED, DIRTY, CLEARING = (
    "free",
    "loading",
    "live",
    "retired",
    "dirty",
    "clearing",
)
STATES = (FREE, LOADING, LIVE, RETIRED, DIRTY, CLEARING)


@dataclass(frozen=True)
class Reservation:
    """A slot reserved for a load; ``evicted`` names the adapter it displaced."""

    slot: int
    evicted: str | None = None


class SlotTable:
    """Which adapter each slot of a pool holds, who uses it, and what to zero.

    Every method is atomic (one internal lock), so any number of threads may
    share a table.

    Args:
        capacity: Number of adapter slots, slot 0 ("off") not counted.

    Raises:
        LoRAConfigError: If ``capacity`` is not an int >= 1.
    """

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise LoRAConfigError(f"capacity must be an int >= 1, got {capacity!r}.")
        self.capacity = capacity
        self._cond = threading.Condition(threading.Lock())
        self._state = [LIVE] + [FREE] * capacity  # slot 0 is OFF, live forever
        self._name: list[str | None] = [OFF] + [None] * capacity  # kept while retired
        self._refs = [0] * (capacity + 1)
        self._last_used = [0] * (capacity + 1)
        self._slot_of: dict[str, int] = {}  # live adapters, OFF excluded
        self._tick = itertools.count(1)
        self._pinned: int | None = None
        self._active = OFF
        self._stats = {"loads": 0, "evictions": 0}

    # ---- lookups ---------------------------------------------------------------

    def names(self) -> list[str]:
        """Returns the resident adapters' names, sorted, ``"off"`` not included."""
        with self._cond:
            return sorted(self._slot_of)

    def __contains__(self, name: object) -> bool:
        with self._cond:
            return name == OFF or (isinstance(name, str) and name in self._slot_of)

    def slot_of(self, name: str) -> int:
        """Returns the slot of a resident adapter (0 for ``"off"``).

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        with self._cond:
            return self._lookup(name)

    def _lookup(self, name: str) -> int:
        if name == OFF:
            return 0
        slot = self._slot_of.get(name) if isinstance(name, str) else None
        if slot is None:
            raise AdapterNotLoadedError(
                f"Adapter {name!r} is not loaded in the pool; resident adapters: "
                f"{sorted(self._slot_of)}. Load it with pool.load(name, path)."
            )
        return slot

    @property
    def active(self) -> str:
        """The adapter requests use when they name none (default ``"off"``)."""
        with self._cond:
            return self._active

    def activate(self, name: str) -> None:
        """Makes ``name`` the default adapter.

        Raises:
            AdapterNotLoadedError: If ``name`` is neither resident nor ``"off"``.
        """
        with self._cond:
            self._lookup(name)
            self._active = name

    @property
    def merged(self) -> str | None:
        """The pinned (merged) adapter's name, or ``None``."""
        with self._cond:
            return None if self._pinned is None else self._name[self._pinned]

    @property
    def stats(self) -> dict[str, int]:
        """Counts of committed loads and of evictions (a copy)."""
        with self._cond:
            return dict(self._stats)

    def snapshot(self) -> dict:
        """Returns a copy of the whole table for tests and metrics: ``active``,
        ``merged``, ``stats`` and ``slots``, which maps each slot 1..capacity to
        its ``state``, ``name`` (``None`` unless live or retired) and ``refs``."""
        with self._cond:
            return {
                "active": self._active,
                "merged": None if self._pinned is None else self._name[self._pinned],
                "stats": dict(self._stats),
                "slots": {
                    s: {"state": self._state[s], "name": self._name[s], "refs": self._refs[s]}
                    for s in range(1, self.capacity + 1)
                },
            }

    # ---- requests --------------------------------------------------------------

    def acquire(self, names: Sequence[str]) -> list[int]:
        """References the slots of ``names`` so they are neither evicted nor
        overwritten until :meth:`release`.

        Args:
            names: Adapter names, ``"off"`` and duplicates allowed.

        Returns:
            The slot of each name, in order.

        Raises:
            AdapterNotLoadedError: If a name is not resident; nothing is acquired.
            LoRAConfigError: If ``names`` is a single string.
        """
        if isinstance(names, str):
            raise LoRAConfigError(f"acquire takes a sequence of names, got the string {names!r}.")
        with self._cond:
            slots = [self._lookup(name) for name in names]
            for slot in dict.fromkeys(slots):
                self._refs[slot] += 1
            for slot in slots:  # the last name touched is the most recently used
                self._last_used[slot] = next(self._tick)
            return slots

    def release(self, slots: Iterable[int]) -> None:
        """Drops the references :meth:`acquire` took (once per distinct slot).

        Raises:
            RuntimeError: If a slot has no reference to drop; nothing is released.
        """
        with self._cond:
            distinct = list(dict.fromkeys(slots))
            bad = [s for s in distinct if not self._valid(s) or self._refs[s] == 0]
            if bad:
                raise RuntimeError(f"Releasing slots {bad} that hold no reference.")
            for slot in distinct:
                self._refs[slot] -= 1
                if self._refs[slot] == 0 and self._state[slot] == RETIRED:
                    self._make_dirty(slot)
            self._cond.notify_all()  # an idle slot can be evicted now

    @contextlib.contextmanager
    def using(self, names: Sequence[str]) -> Iterator[list[int]]:
        """Acquires ``names`` for a block and releases them when it ends.

        Yields:
            The slot of each name, in order.
        """
        slots = self.acquire(names)
        try:
            yield slots
        finally:
            self.release(slots)

    # ---- loads -----------------------------------------------------------------

    def reserve(self, timeout: float = 0.0) -> Reservation:
        """Reserves a slot for a load: a free one, else a dirty one, else the
        least recently used idle adapter's (evicted).

        Args:
            timeout: Seconds to wait for a slot to become available.

        Returns:
            The reserved slot and the evicted adapter's name, if any.

        Raises:
            PoolFullError: If no slot became available within ``timeout``.
        """
        with self._cond:
            if not self._cond.wait_for(self._can_reserve, timeout=max(timeout, 0.0)):
                raise PoolFullError(
                    f"All {self.capacity} slots hold adapters that running requests use; "
                    "nothing can be evicted. Retry when requests finish, or raise capacity."
                )
            evicted = None
            slot = self._first(FREE) or self._first(DIRTY)
            if slot is None:
                slot = min(self._evictable(), key=self._last_used.__getitem__)
                evicted = self._name[slot]
                del self._slot_of[evicted]
                if self._active == evicted:
                    self._active = OFF
                self._stats["evictions"] += 1
            self._state[slot], self._name[slot] = LOADING, None
            return Reservation(slot, evicted)

    def _can_reserve(self) -> bool:
        return bool(self._first(FREE) or self._first(DIRTY) or self._evictable())

    def _first(self, state: str) -> int | None:
        return next((s for s in range(1, self.capacity + 1) if self._state[s] == state), None)

    def _evictable(self) -> list[int]:
        return [s for s in self._slot_of.values() if self._refs[s] == 0 and s != self._pinned]

    def check_name(self, name: str) -> None:
        """Refuses early a name :meth:`commit` would refuse, before a load reads anything.

        Raises:
            LoRAConfigError: If ``name`` is not a non-empty string other than ``"off"``.
            MergeStateError: If ``name`` is the merged adapter.
        """
        _check_name_type(name)
        with self._cond:
            self._refuse_merged(name)

    def _refuse_merged(self, name: str) -> None:
        slot = self._slot_of.get(name)
        if slot is not None and slot == self._pinned:
            raise MergeStateError(
                f"Adapter {name!r} is merged; call unmerge() before reloading it."
            )

    def commit(self, name: str, slot: int) -> None:
        """Publishes a written slot under ``name``. A resident adapter of that
        name is replaced; requests running on it finish with the old weights.

        Raises:
            LoRAConfigError: If ``name`` is not a non-empty string other than
                ``"off"``; the slot stays loading (abort it).
            MergeStateError: If ``name`` is merged; the slot stays loading.
            RuntimeError: If ``slot`` is not reserved.
        """
        _check_name_type(name)
        with self._cond:
            self._expect(slot, LOADING)
            self._refuse_merged(name)
            old = self._slot_of.get(name)
            if old is not None:
                self._retire(old)
            self._state[slot], self._name[slot] = LIVE, name
            self._slot_of[name] = slot
            self._last_used[slot] = next(self._tick)
            self._stats["loads"] += 1
            self._cond.notify_all()  # an idle adapter now: a waiting load may evict it

    def abort(self, slot: int) -> None:
        """Gives back a reserved slot; it may hold half-written weights, so it is dirty.

        Raises:
            RuntimeError: If ``slot`` is not reserved.
        """
        with self._cond:
            self._expect(slot, LOADING)
            self._make_dirty(slot)

    def unload(self, name: str) -> None:
        """Removes a resident adapter; requests using it finish first.

        Raises:
            LoRAConfigError: If ``name`` is ``"off"``.
            AdapterNotLoadedError: If ``name`` is not resident.
            MergeStateError: If ``name`` is merged.
        """
        if name == OFF:
            raise LoRAConfigError(f"{OFF!r} is the base model; it cannot be unloaded.")
        with self._cond:
            slot = self._lookup(name)
            if slot == self._pinned:
                raise MergeStateError(
                    f"Adapter {name!r} is merged; call unmerge() before unloading it."
                )
            self._retire(slot)
            if self._active == name:
                self._active = OFF

    def _retire(self, slot: int) -> None:
        del self._slot_of[self._name[slot]]
        if self._refs[slot]:
            self._state[slot] = RETIRED
        else:
            self._make_dirty(slot)

    def _make_dirty(self, slot: int) -> None:
        self._state[slot], self._name[slot] = DIRTY, None
        self._cond.notify_all()

    # ---- merge -----------------------------------------------------------------

    def pin(self, name: str) -> int:
        """Marks ``name`` as merged: its slot stays put until :meth:`unpin`.

        Returns:
            Its slot.

        Raises:
            LoRAConfigError: If ``name`` is ``"off"``.
            MergeStateError: If an adapter is already merged.
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        if name == OFF:
            raise LoRAConfigError(f"{OFF!r} is the base model; there is nothing to merge.")
        with self._cond:
            if self._pinned is not None:
                raise MergeStateError(
                    f"Adapter {self._name[self._pinned]!r} is already merged; call unmerge() first."
                )
            self._pinned = self._lookup(name)
            return self._pinned

    def unpin(self) -> str:
        """Ends the merge: the slot is an ordinary live slot again.

        Returns:
            The name that was merged.

        Raises:
            MergeStateError: If nothing is merged.
        """
        with self._cond:
            if self._pinned is None:
                raise MergeStateError("No adapter is merged; there is nothing to unmerge.")
            name, self._pinned = self._name[self._pinned], None
            self._cond.notify_all()
            return name

    # ---- zeroing ---------------------------------------------------------------

    def take_dirty(self) -> list[int]:
        """Hands the dirty slots to the caller to zero (they become ``clearing``).

        Returns:
            The slots to zero, ascending; then call :meth:`cleared` with them.
        """
        with self._cond:
            slots = [s for s in range(1, self.capacity + 1) if self._state[s] == DIRTY]
            for slot in slots:
                self._state[slot] = CLEARING
            return slots

    def cleared(self, slots: Iterable[int]) -> None:
        """Marks zeroed slots free.

        Raises:
            RuntimeError: If a slot is not clearing; nothing changes.
        """
        with self._cond:
            slots = list(slots)
            for slot in slots:
                self._expect(slot, CLEARING)
            for slot in slots:
                self._state[slot] = FREE
            self._cond.notify_all()

    # ---- checks ----------------------------------------------------------------

    def _valid(self, slot: object) -> bool:
        return isinstance(slot, int) and 0 <= slot <= self.capacity

    def _expect(self, slot: int, state: str) -> None:
        if not self._valid(slot) or slot == 0 or self._state[slot] != state:
            found = self._state[slot] if self._valid(slot) and slot else "not an adapter slot"
            raise RuntimeError(f"Slot {slot!r} is not {state} (it is {found}).")

    def check_invariants(self) -> None:
        """Asserts the table is consistent.

        Raises:
            AssertionError: Naming the first broken invariant.
        """
        with self._cond:
            live = {s: self._name[s] for s in range(1, self.capacity + 1) if self._state[s] == LIVE}
            for s in range(1, self.capacity + 1):
                state, refs, name = self._state[s], self._refs[s], self._name[s]
                assert state in STATES, f"slot {s} is in unknown state {state!r}"
                assert refs >= 0, f"slot {s} has {refs} references"
                if state in (FREE, LOADING, DIRTY, CLEARING):
                    assert refs == 0, f"{state} slot {s} has {refs} references"
                    assert name is None, f"{state} slot {s} still names {name!r}"
                if state == RETIRED:
                    assert refs > 0, f"retired slot {s} has no reference; it should be dirty"
                if state in (LIVE, RETIRED):
                    assert isinstance(name, str) and name and name != OFF, f"slot {s}: {name!r}"
            assert self._refs[0] >= 0, f"slot 0 has {self._refs[0]} references"
            assert self._state[0] == LIVE and self._name[0] == OFF, "slot 0 is not 'off'"
            assert len(set(live.values())) == len(live), f"live names repeat: {live}"
            assert self._slot_of == {n: s for s, n in live.items()}, (
                f"name -> slot {self._slot_of} does not match the live slots {live}"
            )
            assert self._pinned is None or self._pinned in live, (
                f"merged slot {self._pinned} is not live"
            )
            assert self._active == OFF or self._active in self._slot_of, (
                f"active adapter {self._active!r} is not resident"
            )


def _check_name_type(name: object) -> None:
    if not isinstance(name, str) or not name or name == OFF:
        raise LoRAConfigError(
            f"Adapter name must be a non-empty string other than {OFF!r}, got {name!r}."
        )
