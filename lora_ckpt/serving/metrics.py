"""The service's Prometheus metrics, with one set of names in both modes.

A :class:`ServiceTally` (plain Python, picklable snapshots) counts what a
:class:`~.service.ServiceState` does: adapter loads and their latency, cache
hits and misses (a request whose adapter was resident, or had to be loaded),
batch sizes, load failures. :func:`service_snapshot` adds what the pool and
batcher know at the moment (loads, evictions, residents, pinned, queue
depth). :class:`SnapshotCollector` turns one snapshot (the single process) or
several (one per Ray replica, summed) into the same metric families, so
dashboards work unchanged in both modes:

- counters (``_total``): ``lora_adapter_loads_total``,
  ``lora_adapter_evictions_total``, ``lora_adapter_load_failures_total``,
  ``lora_adapter_cache_hits_total``, ``lora_adapter_cache_misses_total``;
- gauges: ``lora_resident_adapters``, ``lora_pinned_adapters``,
  ``lora_failed_adapters``, ``lora_queue_depth``, ``lora_ready``;
- histograms: ``lora_adapter_load_seconds``, ``lora_batch_size``.

:func:`add_default_collectors` adds prometheus_client's process, platform
and garbage-collector collectors to a registry.
"""

import bisect
import threading

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["ServiceTally", "SnapshotCollector", "add_default_collectors", "service_snapshot"]


LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
COUNTERS = {
    "loads": ("lora_adapter_loads", "Adapters loaded into a pool"),
    "evictions": ("lora_adapter_evictions", "Adapters evicted from a pool"),
    "load_failures": ("lora_adapter_load_failures", "Adapter loads that failed"),
    "cache_hits": ("lora_adapter_cache_hits", "Requests whose adapter was resident"),
    "cache_misses": ("lora_adapter_cache_misses", "Requests whose adapter had to be loaded"),
}
GAUGES = {
    "resident": ("lora_resident_adapters", "Adapters resident"),
    "pinned": ("lora_pinned_adapters", "Adapters pinned (never evicted)"),
    "failed": ("lora_failed_adapters", "Store adapters that failed to load"),
    "queue_depth": ("lora_queue_depth", "Requests waiting for a batch"),
    "ready": ("lora_ready", "1 once warm and ready (per replica in Ray mode, summed)"),
}
HISTOGRAMS = {
    "load_seconds": ("lora_adapter_load_seconds", "Seconds an adapter load took", LOAD_BUCKETS),
    "batch_size": ("lora_batch_size", "Samples per pool batch", BATCH_BUCKETS),
}


class _Histogram:
    """Bucket counts and a sum, plain Python."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


class ServiceTally:
    """What a service state counts as it runs; thread-safe, plain Python."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {"load_failures": 0, "cache_hits": 0, "cache_misses": 0}
        self._histograms = {key: _Histogram(bounds) for key, (_, _, bounds) in HISTOGRAMS.items()}

    def count(self, key: str, amount: int = 1) -> None:
        """Adds ``amount`` to counter ``key`` (``load_failures``, ``cache_hits``, ``cache_misses``)."""
        with self._lock:
            self._counts[key] += amount

    def observe(self, key: str, value: float) -> None:
        """Observes ``value`` into histogram ``key`` (``load_seconds``, ``batch_size``)."""
        with self._lock:
            self._histograms[key].observe(value)

    def snapshot(self) -> dict:
        """``{"counts": {...}, "histograms": {...}}``, plain data."""
        with self._lock:
            return {
                "counts": dict(self._counts),
                "histograms": {key: h.snapshot() for key, h in self._histograms.items()},
            }


def service_snapshot(state) -> dict:
    """Everything :class:`SnapshotCollector` shows, for one service state.

    Args:
        state: A :class:`~.service.ServiceState`.

    Returns:
        Plain data (sent from Ray replicas to the ingress as it is).
    """
    snapshot = state.tally.snapshot()
    pool, batcher = state.pool, state.batcher
    stats = pool.stats if pool is not None else {"loads": 0, "evictions": 0}
    snapshot["counts"].update(loads=stats["loads"], evictions=stats["evictions"])
    snapshot["gauges"] = {
        "resident": len(pool.names()) if pool is not None else 0,
        "pinned": len(state.pinned),
        "failed": len(state.failed),
        "queue_depth": batcher.depth() if batcher is not None else 0,
        "ready": 1 if state.ready else 0,
    }
    return snapshot


class SnapshotCollector:
    """A Prometheus collector over snapshots of :func:`service_snapshot`, summed.

    Args:
        snapshots: Called at each scrape; returns the snapshots to show (one
            per process that serves).
    """

    def __init__(self, snapshots):
        self._snapshots = snapshots

    def collect(self):
        """The metric families (see the module docstring)."""
        snapshots = [s for s in self._snapshots() if s]
        for key, (name, text) in COUNTERS.items():
            total = sum(s["counts"].get(key, 0) for s in snapshots)
            yield CounterMetricFamily(name, text, value=total)
        for key, (name, text) in GAUGES.items():
            yield GaugeMetricFamily(
                name, text, value=sum(s["gauges"].get(key, 0) for s in snapshots)
            )
        for key, (name, text, bounds) in HISTOGRAMS.items():
            counts, total = [0] * (len(bounds) + 1), 0.0
            for snapshot in snapshots:
                histogram = snapshot["histograms"].get(key)
                if histogram and tuple(histogram["bounds"]) == tuple(bounds):
                    counts = [a + b for a, b in zip(counts, histogram["counts"], strict=True)]
                    total += histogram["sum"]
            cumulative, buckets = 0, []
            for bound, count in zip([*map(_bound, bounds), "+Inf"], counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            yield HistogramMetricFamily(name, text, buckets=buckets, sum_value=total)


def _bound(value) -> str:
    return repr(float(value))


def add_default_collectors(registry) -> None:
    """Adds the process (CPU, memory, file descriptors), platform (Python
    version) and garbage-collector collectors to ``registry``.

    Args:
        registry: A ``prometheus_client.CollectorRegistry``.
    """
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
