"""A queue per key, taken round-robin: the batcher's waiting requests.

Requests wait in one FIFO per adapter; a batch is filled by taking one
request from each adapter with requests waiting, in turn, starting after the
adapter the previous batch ended with. A flood on one adapter then costs the
other adapters at most their share of a batch, never a place behind the
whole flood (one FIFO for every adapter let one hot adapter starve the rest).

Plain Python (no TensorFlow, no asyncio): the batcher's thread takes batches,
the event loops put requests; one lock and one condition.
"""

import collections
import threading
import time
from collections.abc import Hashable

__all__ = ["FairQueue"]


class FairQueue:
    """FIFOs keyed by adapter, drained round-robin into batches.

    Every method is thread-safe.
    """

    def __init__(self):
        self._queues: dict[Hashable, collections.deque] = {}
        self._ring: collections.deque = collections.deque()  # keys with items, next first
        self._size = 0
        self._cond = threading.Condition(threading.Lock())

    def put(self, key: Hashable, item) -> None:
        """Appends ``item`` to ``key``'s FIFO (a new key joins the end of the turn)."""
        with self._cond:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = collections.deque()
                self._ring.append(key)
            queue.append(item)
            self._size += 1
            self._cond.notify()

    def depth(self) -> int:
        """Items waiting, over every key."""
        with self._cond:
            return self._size

    def depths(self) -> dict:
        """Items waiting per key (keys with none left out)."""
        with self._cond:
            return {key: len(queue) for key, queue in self._queues.items()}

    def take(self, max_items: int, max_wait: float, timeout: float | None = None) -> list:
        """A batch of up to ``max_items`` items, filled round-robin over the keys.

        Waits (up to ``timeout`` seconds, for ever if ``None``) for a first
        item, then up to ``max_wait`` more seconds for ``max_items`` items in
        all, then takes one item per key in turn. The key after the last one
        taken from comes first next time.

        Args:
            max_items: The largest batch (>= 1).
            max_wait: Seconds the first item waits for company (>= 0).
            timeout: Seconds to wait for a first item.

        Returns:
            The items, oldest first within each key; ``[]`` past ``timeout``.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._size > 0, timeout):
                return []
            deadline = time.monotonic() + max_wait
            while self._size < max_items:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            return self._take_round_robin(max_items)

    def _take_round_robin(self, max_items: int) -> list:
        batch = []
        while self._ring and len(batch) < max_items:
            key = self._ring.popleft()
            queue = self._queues[key]
            batch.append(queue.popleft())
            if queue:
                self._ring.append(key)  # its next item waits for everyone else's turn
            else:
                del self._queues[key]
        self._size -= len(batch)
        return batch
