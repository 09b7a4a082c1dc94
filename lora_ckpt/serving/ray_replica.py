"""The Ray Serve replica: one base model, one AdapterPool and its dynamic
batcher, adapters multiplexed by name; and the directory the replicas report to.

Each :class:`AdapterReplica` is the single-process service's
:class:`~lora_ckpt.serving.service.ServiceState` (pool, batcher, time-limited
loads, failed adapters remembered, reload by config SHA-256) inside a Ray
Serve replica. Its ``@serve.multiplexed`` loader is keyed by adapter name, so
Ray's router, not our code, sends a request for an adapter to a replica that
already holds it; when Ray's per-replica LRU drops an adapter, the object it
cached unloads it from the pool, so what the router believes a replica holds
is what its pool holds. Mixed-adapter batching stays inside each replica.

Methods answer plain data (never raise for a request's own mistakes) so the
ingress can turn every outcome into the same HTTP answer the single-process
service gives: ``{"error": [status, type, message]}`` or the result.
"""

import asyncio
import collections
import logging
import os
import socket
import time

import numpy as np
from ray import serve

from ..errors import LoRAError, StoreError
from .http_common import error_parts
from .logs import configure_logging
from .metrics import service_snapshot
from .options import ServiceOptions
from .orders import Order, OrderLog
from .pool import OFF
from .service import ServiceState
from .store import validate_adapter_name

__all__ = ["AdapterReplica", "ReplicaDirectory"]


log = logging.getLogger("lora_ckpt.serving")

HEARTBEAT_SECONDS = 1.0
"""How often a replica reports its adapters and counters to the directory."""
STALE_AFTER_SECONDS = 4.0
"""A replica not heard from for this long is left out of ``/replicas`` (dead or gone)."""


class _Resident:
    """What Ray's multiplexer caches for one adapter of one replica.

    Ray calls ``__del__`` when its LRU drops the adapter; the pool's copy goes
    with it. Python may call ``__del__`` again when the object is collected,
    hence the flag: a later load of the same name must not be undone.
    """

    def __init__(self, state: ServiceState, name: str):
        self._state, self.name, self._released = state, name, False

    def __del__(self):
        if self._released:
            return
        self._released = True
        pool = self._state.pool
        if self.name in self._state.pinned:
            return  # --pin: held for good, whatever Ray's LRU drops
        if pool is not None and self.name in pool.names():
            try:
                pool.unload(self.name)
            except LoRAError:
                pass  # merged, or unloaded meanwhile: the pool's LRU takes over


class AdapterReplica:
    """One Ray Serve replica of the adapter service.

    Args:
        store: The adapter store (a directory every node can read, or ``s3://``).
        options: The service's options; ``capacity`` is also Ray's
            ``max_num_models_per_replica``. (A replica does not preload the
            store's first adapters: Ray's router decides which replica holds
            which adapter; ``--pin`` and ``--preload`` adapters are loaded in
            every replica, and pinned ones stay whatever Ray's LRU drops.)
        directory: A handle to the :class:`ReplicaDirectory` deployment.
        startup_timeout: Seconds the base model may take to load.

    Raises:
        StoreError: If the base model cannot be loaded (Ray Serve then reports
            the deployment as failed and retries the replica).
    """

    async def __init__(
        self,
        store: str,
        options: ServiceOptions,
        directory=None,
        startup_timeout: float = 600.0,
    ):
        self.store = store
        self.capacity = options.capacity
        configure_logging(options.log_level, options.log_format)
        self.state = ServiceState(store, options.replace(preload=False))
        deadline = time.monotonic() + startup_timeout
        # Warm, with the --pin/--preload adapters loaded, before Ray routes here.
        while not self.state.ready and self.state.error is None:
            if time.monotonic() > deadline:
                raise StoreError(f"The base model of {store} did not load in {startup_timeout} s.")
            await asyncio.sleep(0.05)
        if self.state.error is not None:
            raise StoreError(f"The base model of {store} failed to load: {self.state.error}")
        context = serve.get_replica_context()
        self.replica_id = getattr(context.replica_id, "unique_id", str(context.replica_id))
        self.pid = os.getpid()
        self.node = socket.gethostname()
        self.started = time.time()
        self.loads: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()
        self.applied: tuple[str | None, int] = (None, 0)  # the directory's (epoch, order)
        self._following: asyncio.Task | None = None

        async def load(name: str) -> _Resident:
            return await self._load(name)

        # Set up here, not as a decorated method: the limit is a constructor
        # argument. (A plain function: Ray keeps its LRU as an attribute of it.)
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=self.capacity)(load)
        self._directory = directory
        self._heartbeat = (
            asyncio.get_running_loop().create_task(self._report_forever()) if directory else None
        )
        log.info("replica %s (pid %d) ready", self.replica_id, self.pid)

    async def _load(self, name: str) -> _Resident:
        """Ray's multiplexed loader: makes ``name`` resident in this replica's pool."""
        await self.state.ensure_resident(name)
        self.loads[name] += 1
        return _Resident(self.state, name)

    async def _hold(self, name: str) -> None:
        """Routes through Ray's multiplexer (recording the adapter for the router),
        unless it is the base alone."""
        if name != OFF:
            # A name not in the store fails in the loader (404) and is not cached.
            await self._multiplexed(validate_adapter_name(name))

    async def _answer(self, work):
        try:
            return await work
        except Exception as exc:
            parts = error_parts(exc)
            if parts is None:
                raise
            status, kind, message = parts
            return {"error": [status, kind, self.state.scrub(message)], "replica": self.replica_id}

    # ---- what the ingress calls --------------------------------------------------------

    async def info(self) -> dict:
        """The base model's input shape and this replica's identity."""
        pool = self.state.pool
        return {
            "input_shape": list(pool.input_shape),
            "replica": self.replica_id,
            "pid": self.pid,
        }

    async def predict(self, name: str, images: np.ndarray) -> dict:
        """``{"rows": [logits, ...], "labels", "replica"}`` or ``{"error": [...]}``."""

        async def work():
            await self._hold(name)
            rows = await self.state.predict(name, images)
            self.requests[name] += 1
            return {
                "rows": [np.asarray(row) for row in rows],
                "labels": self.state.labels.get(name),
                # TF Serving's model version: the adapter's save counter.
                "version": self.state.save_versions.get(name, 1),
                "replica": self.replica_id,
            }

        return await self._answer(work())

    async def load(self, name: str) -> dict:
        """Loads ``name``, or reloads it if the store's copy changed."""

        async def work():
            await self._hold(name)
            outcome = await self.state.ensure_resident(name, reload=True)
            return {
                "adapter": name,
                "outcome": outcome,
                "version": self.state.pool.version(name),
                "resident": self.state.pool.names(),
                "replica": self.replica_id,
            }

        return await self._answer(work())

    async def metadata(self, name: str) -> dict:
        """Input shape, classes and labels of ``name`` (loaded first)."""

        async def work():
            await self._hold(name)
            if name != OFF:
                await self.state.ensure_resident(name)
            pool = self.state.pool
            return {
                "input_shape": list(pool.input_shape),
                "classes": pool.classes(name),
                "labels": self.state.labels.get(name),
            }

        return await self._answer(work())

    def stats(self) -> dict:
        """This replica's identity, adapters and counters."""
        pool = self.state.pool
        return {
            "replica": self.replica_id,
            "pid": self.pid,
            "node": self.node,
            "started": self.started,
            "resident": pool.names(),
            "versions": {name: pool.version(name) for name in pool.names()},
            "applied": list(self.applied),
            "capacity": self.capacity,
            "loads": dict(self.loads),
            "requests": dict(self.requests),
            "pool": pool.stats,
            "failed": {name: reason for name, (_, reason) in sorted(self.state.failed.items())},
            # The single process's metric names, summed over replicas by the
            # ingress (metrics.SnapshotCollector).
            "metrics": service_snapshot(self.state),
        }

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose base failed is replaced."""
        if self.state.error is not None:
            raise StoreError(self.state.error)

    async def _report_forever(self) -> None:
        warned = False
        while True:
            try:
                todo = await self._directory.report.remote(self.stats())
                warned = False
            except Exception as exc:  # the directory restarts: keep serving, report later
                if not warned:
                    log.warning("replica %s cannot report: %s", self.replica_id, exc)
                    warned = True
            else:
                # On a task of its own: a reload that takes a while must not
                # stop the reports (the directory would drop this replica).
                if todo["orders"] and (self._following is None or self._following.done()):
                    self._following = asyncio.get_running_loop().create_task(self._carry_out(todo))
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _carry_out(self, todo: dict) -> None:
        """Carries out the directory's orders this replica has not yet carried out."""
        for fields in todo["orders"]:
            order = Order(**fields)
            try:
                outcome = await self.state.carry_out(order)
            except Exception as exc:  # a failed reload is also remembered in state.failed
                outcome = f"failed: {type(exc).__name__}: {exc}"
            if outcome != "untouched":
                log.info("replica %s: %s %s: %s", self.replica_id, order.kind, order.name, outcome)
            # Done once tried: a failed reload is not tried again every second.
            self.applied = (todo["epoch"], order.seq)


class ReplicaDirectory:
    """Where every replica reports itself each second: ``/replicas`` and the
    per-replica metrics read it. A replica not heard from for a few seconds
    (killed, or replaced) drops out. It also keeps the orders every replica
    carries out (:mod:`lora_ckpt.serving.orders`), handed out with the
    answers to the reports."""

    def __init__(self):
        self._reports: dict[str, tuple[float, dict]] = {}
        self._orders = OrderLog()

    def report(self, stats: dict) -> dict:
        """Records one replica's latest stats.

        Returns:
            The orders it has yet to carry out: ``{"epoch", "orders"}``.
        """
        self._reports[stats["replica"]] = (time.monotonic(), stats)
        return self._orders.since(*stats["applied"])

    def replicas(self) -> list[dict]:
        """The live replicas' latest stats, by replica id."""
        now = time.monotonic()
        for replica, (seen, _) in list(self._reports.items()):
            if now - seen > STALE_AFTER_SECONDS:
                del self._reports[replica]
        return [stats for _, (_, stats) in sorted(self._reports.items())]

    def order(self, kind: str, name: str, version: str | None = None) -> int:
        """Leaves an order for every replica (see :meth:`OrderLog.add`); its number."""
        return self._orders.add(kind, name, version)

    def progress(self, seq: int) -> dict:
        """Which live replicas have reported carrying out order ``seq``:
        ``{"done": [replica, ...], "pending": [...]}``."""
        done, pending = [], []
        for stats in self.replicas():
            epoch, applied = stats["applied"]
            finished = epoch == self._orders.epoch and applied >= seq
            (done if finished else pending).append(stats["replica"])
        return {"done": done, "pending": pending}
