"""One load per adapter name at a time: requests for a name that is already
loading wait for that load instead of starting another.

Plain Python (no TensorFlow): the service's loads run on an executor, and
this table only decides which future a request waits for.
"""

import concurrent.futures
import threading
from collections.abc import Callable


class LoadsInFlight:
    """The running load of each name, on ``executor``.

    Args:
        executor: Runs the loads (a ``concurrent.futures.Executor``).
    """

    def __init__(self, executor: concurrent.futures.Executor):
        self._executor = executor
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    def submit(
        self, name: str, load: Callable, *args, again: bool = False
    ) -> concurrent.futures.Future:
        """The future of ``name``'s running load, or of ``load(*args)`` started now.

        Args:
            name: The adapter the load is for.
            load: What to run if no load of ``name`` is running.
            *args: Its arguments.
            again: Start a new load unless the running one is still running
                (a reload must not be answered by an earlier, finished load).

        Returns:
            The future to wait for.
        """
        with self._lock:
            future = self._futures.get(name)
            started = future is None or (again and future.done())
            if started:
                future = self._executor.submit(load, *args)
                self._futures[name] = future
        if started:
            # Outside the lock: a load that has already finished runs its
            # callback right here, in this thread, and the callback takes the lock.
            future.add_done_callback(lambda done: self._forget(name, done))
        return future

    def running(self) -> list[str]:
        """Names with a load not yet forgotten, sorted."""
        with self._lock:
            return sorted(self._futures)

    def _forget(self, name: str, future: concurrent.futures.Future) -> None:
        with self._lock:
            if self._futures.get(name) is future:
                del self._futures[name]
