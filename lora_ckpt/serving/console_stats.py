"""Recent prediction requests per adapter, for the console's service view.

Plain Python (no TensorFlow, no numpy): the app's request metrics
(:class:`~.http_common.RequestMetrics`) record each prediction's latency
here as they count it for Prometheus, and ``GET /console/stats`` summarises
the last minute (requests per second, p50 and p99 latency per adapter) and
the last minutes in buckets (for the console's plot).

Memory is bounded whatever the traffic: a ring of ``buckets`` time buckets
of ``bucket_seconds`` each; per bucket and adapter, a count, an error count
and at most ``samples`` latencies (a uniform reservoir sample beyond that,
so the percentiles stay those of the bucket's requests); at most
``max_adapters`` names per bucket (the rest are counted under ``_other``).
"""

import math
import random
import threading
from collections import deque

__all__ = ["OTHER", "RecentRequests", "percentile"]


OTHER = "_other"
"""Where requests of names beyond ``max_adapters`` in one bucket are counted."""


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` by linear interpolation between
    the closest ranks (numpy's default method), or ``None`` for no values.

    Args:
        values: The sample.
        q: The percentile, 0 to 100.

    Returns:
        The percentile, or ``None`` if ``values`` is empty.
    """
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class _Cell:
    """One adapter's requests in one time bucket."""

    __slots__ = ("count", "errors", "latencies")

    def __init__(self):
        self.count = 0
        self.errors = 0
        self.latencies: list[float] = []  # milliseconds, at most `samples`


class RecentRequests:
    """A ring of time buckets of prediction requests per adapter.

    Thread-safe: the app records from the event loop, tests from anywhere.

    Args:
        bucket_seconds: The width of one bucket.
        buckets: How many buckets are kept (the history is
            ``bucket_seconds * buckets`` long).
        samples: Latencies kept per bucket and adapter.
        max_adapters: Names kept per bucket.
        seed: Seed of the reservoir sampling (tests).
    """

    def __init__(
        self,
        bucket_seconds: float = 5.0,
        buckets: int = 60,
        samples: int = 256,
        max_adapters: int = 256,
        seed: int | None = None,
    ):
        if bucket_seconds <= 0 or buckets < 1 or samples < 1 or max_adapters < 1:
            raise ValueError("bucket_seconds, buckets, samples and max_adapters must be positive")
        self.bucket_seconds = float(bucket_seconds)
        self.samples = samples
        self.max_adapters = max_adapters
        self._ring: deque[tuple[int, dict[str, _Cell]]] = deque(maxlen=buckets)
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def _index(self, now: float) -> int:
        return math.floor(now / self.bucket_seconds)

    def add(self, name: str, ok: bool, seconds: float, now: float) -> None:
        """Records one request.

        Args:
            name: The adapter it was counted under.
            ok: Whether it was answered without error.
            seconds: Its latency.
            now: When it ended (a monotonic clock, the same for every call).
        """
        index = self._index(now)
        with self._lock:
            ring = self._ring
            if not ring or ring[-1][0] < index:
                # One bucket per interval, empty ones included: a bucket is found by arithmetic.
                first = max(ring[-1][0] + 1 if ring else index, index - ring.maxlen + 1)
                ring.extend((i, {}) for i in range(first, index + 1))
            back = ring[-1][0] - index  # > 0: recorded after a later request was (threads)
            if back >= len(ring):
                return  # older than the history
            cells = ring[-1 - back][1]
            if name not in cells and len(cells) >= self.max_adapters:
                name = OTHER
            cell = cells.get(name)
            if cell is None:
                cell = cells[name] = _Cell()
            cell.count += 1
            cell.errors += 0 if ok else 1
            milliseconds = seconds * 1000.0
            if len(cell.latencies) < self.samples:
                cell.latencies.append(milliseconds)
            else:  # reservoir sampling: every request of the bucket equally likely kept
                slot = self._random.randrange(cell.count)
                if slot < self.samples:
                    cell.latencies[slot] = milliseconds

    def summary(self, now: float, window: float = 60.0, include=None) -> dict:
        """The last ``window`` seconds per adapter, and the history per bucket.

        Args:
            now: The time (the clock :meth:`add` was given).
            window: The seconds the per-adapter figures cover (whole buckets:
                the current one and those before it that fit).
            include: ``include(name)`` says whether an adapter counts (a
                tenant sees only its own, totals included); default all.

        Returns:
            ``{"window_seconds", "bucket_seconds", "adapters": {name:
            {"requests", "errors", "rps", "p50_ms", "p99_ms"}}, "history":
            [{"age_seconds", "requests", "errors", "rps", "p50_ms", "p99_ms",
            "adapters": {name: requests}}]}``, the history oldest first and
            with a bucket for every interval, empty ones included (ages are
            of each bucket's start, from ``now``).
        """
        current = self._index(now)
        length = self._ring.maxlen
        in_window = max(1, min(length, math.ceil(window / self.bucket_seconds)))
        with self._lock:
            by_index = dict(self._ring)
            history, totals = [], {}
            for index in range(current - length + 1, current + 1):
                cells = by_index.get(index, {})
                if include is not None:
                    cells = {name: cell for name, cell in cells.items() if include(name)}
                history.append(self._bucket(index, cells, now))
                if index > current - in_window:
                    for name, cell in cells.items():
                        total = totals.setdefault(name, _Cell())
                        total.count += cell.count
                        total.errors += cell.errors
                        total.latencies.extend(cell.latencies)
        # The current bucket is partly over: rates are over the time that passed.
        elapsed = (in_window - 1) * self.bucket_seconds + (now - current * self.bucket_seconds)
        adapters = {
            name: {
                "requests": cell.count,
                "errors": cell.errors,
                "rps": cell.count / max(elapsed, 1e-9),
                "p50_ms": percentile(cell.latencies, 50),
                "p99_ms": percentile(cell.latencies, 99),
            }
            for name, cell in sorted(totals.items())
        }
        return {
            "window_seconds": in_window * self.bucket_seconds,
            "bucket_seconds": self.bucket_seconds,
            "adapters": adapters,
            "history": history,
        }

    def _bucket(self, index: int, cells: dict[str, _Cell], now: float) -> dict:
        start = index * self.bucket_seconds
        span = min(self.bucket_seconds, max(now - start, 1e-9))
        latencies = [ms for cell in cells.values() for ms in cell.latencies]
        requests = sum(cell.count for cell in cells.values())
        return {
            "age_seconds": now - start,
            "requests": requests,
            "errors": sum(cell.errors for cell in cells.values()),
            "rps": requests / span,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "adapters": {name: cell.count for name, cell in sorted(cells.items())},
        }
