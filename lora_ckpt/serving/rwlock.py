"""A readers-writer lock: many requests at once, or one merge/unmerge alone.

Plain Python. Requests read the base kernels; ``merge``/``unmerge`` rewrite
them, so they wait for running requests and hold new ones meanwhile. A
waiting writer blocks new readers, so a steady stream of requests cannot
starve a merge.
"""

import contextlib
import threading

__all__ = ["ReadWriteLock"]


class ReadWriteLock:
    """Many readers (requests) or one writer (merge/unmerge)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def reading(self):
        """Holds the lock shared for the block: waits while a writer holds or awaits it."""
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        """Holds the lock alone for the block: waits for the running readers to finish."""
        with self._cond:
            while self._writer:
                self._cond.wait()
            # Claimed before the readers drain: new readers wait from here on.
            self._writer = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
