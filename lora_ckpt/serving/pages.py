"""Which rows of a layer's growable page stack each slot owns, in plain Python.

A pool stores a LoRA layer's resident adapters as pages (S-LoRA's unified
paging): page ``p`` holds one rank component, column ``p`` of ``A`` and row
``p`` of ``scale * B``, so an adapter of rank ``r`` in that layer owns exactly
``r`` pages wherever they lie, and its memory is its own tensors' bytes
whatever the pool's ``max_rank``. DoRA output scales and per-adapter biases
live in row stacks of their own, one row per adapter that has them.

A :class:`RowAllocator` keeps the free list of one stack and decides when it
grows: row 0 is reserved (the zero page that pads a mixed batch, or the
default row: ones, the base bias), a stack grows by a quarter (at least what
the load needs, at most ``limit`` rows), so the rows allocated stay within
1.25x of the most ever resident, plus the reserved row. Rows freed by an
unload go back to the free list and are reused before the stack grows; a
stack never shrinks.
"""

import math

__all__ = ["RowAllocator"]


class RowAllocator:
    """Free rows of one growable stack, and the rows each slot owns.

    Args:
        limit: The most rows the stack may ever need (row 0 included).
        start: Rows allocated at first (row 0 included), at least 1.

    Attributes:
        size: Rows allocated now (the stack's leading dimension).
    """

    GROWTH = 1.25

    def __init__(self, limit: int, start: int = 1):
        if limit < 1 or not 1 <= start <= limit:
            raise ValueError(f"Need 1 <= start <= limit, got start={start}, limit={limit}.")
        self.limit = limit
        self.size = start
        self._free = list(range(start - 1, 0, -1))  # pop() hands out the lowest row first
        self._owned: dict[int, list[int]] = {}

    def rows_of(self, slot: int) -> list[int]:
        """The rows ``slot`` owns, in the order they were given (empty if none)."""
        return list(self._owned.get(slot, ()))

    @property
    def used(self) -> int:
        """Rows owned by slots (row 0 not counted)."""
        return sum(len(rows) for rows in self._owned.values())

    def assign(self, slot: int, count: int) -> tuple[list[int], int | None]:
        """Gives ``slot`` ``count`` rows, after freeing those it owned.

        Args:
            slot: The pool slot.
            count: Rows it needs now (0: it owns none any more).

        Returns:
            Its rows, and the stack's new size if it must grow first (else ``None``).

        Raises:
            ValueError: If the stack would exceed ``limit`` (a caller's bug:
                the limit is what every slot at its largest needs).
        """
        self.release(slot)
        if count == 0:
            return [], None
        grown = None
        if count > len(self._free):
            needed = self.size + count - len(self._free)
            grown = min(self.limit, max(needed, math.ceil(self.size * self.GROWTH)))
            if grown < needed:
                raise ValueError(f"{needed} rows needed; the stack is limited to {self.limit}.")
            self._free = list(range(grown - 1, self.size - 1, -1)) + self._free
            self.size = grown
        rows = [self._free.pop() for _ in range(count)]
        self._owned[slot] = rows
        return rows, grown

    def release(self, slot: int) -> None:
        """Frees the rows ``slot`` owns (none: nothing happens)."""
        rows = self._owned.pop(slot, [])
        self._free.extend(sorted(rows, reverse=True))
