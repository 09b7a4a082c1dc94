"""One load per adapter name at a time: requests for a name that is already
loading wait for that load instead of starting another.

Plain Python (no TensorFlow): the service's loads run on an executor, and
this table only decides which load a request waits for.
"""

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable

__all__ = ["LoadsInFlight"]


class LoadsInFlight:
    """The running load of each name, on ``executor``.

    Args:
        executor: Runs the loads (a ``concurrent.futures.Executor``).
    """

    def __init__(self, executor: concurrent.futures.Executor):
        self._executor = executor
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    async def run(self, name: str, load: Callable, *args, again: bool = False):
        """The outcome of ``name``'s load: the running one, or ``load(*args)``
        started now on the executor.

        A caller that stops waiting (a timeout, a cancelled request) leaves
        the load running for everyone else waiting for it.

        Args:
            name: The adapter the load is for.
            load: What to run if no load of ``name`` is running.
            *args: Its arguments.
            again: Start a new load, after the running one if there is one: a
                reload must read the store after it was asked for, so an
                earlier load still running cannot answer it.

        Returns:
            What ``load`` returned.

        Raises:
            Whatever ``load`` raised.
        """
        while True:
            future, started = self.submit(name, load, *args, again=again)
            if started or not again:
                return await asyncio.shield(asyncio.wrap_future(future))
            with contextlib.suppress(Exception):  # its outcome is not this caller's
                await asyncio.shield(asyncio.wrap_future(future))

    def submit(
        self, name: str, load: Callable, *args, again: bool = False
    ) -> tuple[concurrent.futures.Future, bool]:
        """The future of ``name``'s load, and whether it was started by this call.

        A load is started if none of ``name`` is running, or if ``again`` and
        the last one has finished.
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
        return future, started

    def running(self) -> list[str]:
        """Names with a load not yet forgotten, sorted."""
        with self._lock:
            return sorted(self._futures)

    def _forget(self, name: str, future: concurrent.futures.Future) -> None:
        with self._lock:
            if self._futures.get(name) is future:
                del self._futures[name]
