"""Dynamic batching: concurrent requests, whatever their adapters, run as one
mixed batch through the pool.

Requests wait in a queue per adapter and batches are filled round-robin over
the adapters (:class:`~.fair_queue.FairQueue`): a flood on one adapter cannot
starve the others."""

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import LoRAConfigError
from .fair_queue import FairQueue
from .pool import AdapterPool

__all__ = ["MicroBatcher"]


log = logging.getLogger("lora_ckpt.serving")


@dataclass
class _Request:
    image: np.ndarray
    adapter: str
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class MicroBatcher:
    """Collects requests for up to ``max_wait`` seconds (or ``max_batch``
    requests) and answers them with one ``pool.predict(..., adapters=...)``.

    Args:
        pool: The pool that runs the batches.
        max_batch: The largest batch.
        max_wait: How long the first request of a batch waits for company.
        on_batch: Called with the batch size after each batch (metrics).
        fair: A queue per adapter, batches filled round-robin (default); ``False``
            is one FIFO for every adapter (the benchmark's reference).

    Raises:
        LoRAConfigError: For a bad ``max_batch`` or ``max_wait``.
    """

    def __init__(
        self,
        pool: AdapterPool,
        max_batch: int = 8,
        max_wait: float = 0.005,
        on_batch=None,
        fair: bool = True,
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise LoRAConfigError(f"max_batch must be a positive integer, got {max_batch!r}.")
        if not (isinstance(max_wait, int | float) and 0 <= max_wait < float("inf")):
            raise LoRAConfigError(f"max_wait must be a finite number >= 0, got {max_wait!r}.")
        self.pool = pool
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.on_batch = on_batch
        self._fair = fair
        self._queue = FairQueue()
        self._thread = threading.Thread(target=self._run, name="lora-ckpt-batcher", daemon=True)
        self._thread.start()

    async def predict(self, image: np.ndarray, adapter: str) -> np.ndarray:
        """The pool's output for one image with one adapter (its own classes)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(adapter if self._fair else None, _Request(image, adapter, future, loop))
        return await future

    def depth(self) -> int:
        """Requests waiting for a batch (the queue-depth gauge)."""
        return self._queue.depth()

    async def predict_many(self, images: np.ndarray, adapter: str) -> list[np.ndarray]:
        """Outputs for several images: each rides the batcher like a request of its own."""
        return list(await asyncio.gather(*(self.predict(image, adapter) for image in images)))

    def _take_batch(self) -> list[_Request]:
        return self._queue.take(self.max_batch, self.max_wait)

    def _run(self) -> None:
        # Nothing may end this thread: every later request would wait forever.
        while True:
            batch = self._take_batch()
            try:
                results = self._results(batch)
            except Exception as exc:  # a bug, not a request's fault: fail this batch only
                log.exception("the batcher failed a batch of %d", len(batch))
                results = [(request, None, exc) for request in batch]
            for request, output, error in results:
                with contextlib.suppress(RuntimeError):  # the request's event loop closed
                    request.loop.call_soon_threadsafe(_settle, request.future, output, error)
            if self.on_batch is not None:
                try:
                    self.on_batch(len(batch))
                except Exception:
                    log.exception("the batch callback failed")

    def _results(self, batch):
        try:
            outputs = self.pool.predict_rows(
                np.stack([r.image for r in batch]), [r.adapter for r in batch]
            )
            return [(r, outputs[i], None) for i, r in enumerate(batch)]
        except Exception as exc:  # one bad request must not fail the others
            return self._one_by_one(batch) if len(batch) > 1 else [(batch[0], None, exc)]

    def _one_by_one(self, batch):
        results = []
        for request in batch:
            try:
                results.append(
                    (
                        request,
                        self.pool.predict_rows(request.image[None], [request.adapter])[0],
                        None,
                    )
                )
            except Exception as exc:
                results.append((request, None, exc))
        return results


def _settle(future: asyncio.Future, output, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(output)
