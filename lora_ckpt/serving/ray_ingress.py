"""The Ray Serve ingress: the single-process service's HTTP API in front of
:class:`~lora_ckpt.serving.ray_replica.AdapterReplica` replicas.

Requests are parsed here exactly as the single-process app parses them
(:mod:`lora_ckpt.serving.http_common`, :mod:`lora_ckpt.serving.inputs`) and
forwarded with ``handle.options(multiplexed_model_id=name)``, so Ray's router
picks a replica that holds the adapter. A call that dies with its replica
(killed, its node lost) is sent again, to another replica, a few times: a
prediction has no side effect, so a retry cannot do harm.

``POST /adapters/{name}`` (reload) and ``DELETE /adapters/{name}`` reach
every replica: the first reloads as the router picks it, then an order in
the replica directory (:mod:`lora_ckpt.serving.orders`) makes every other
replica that holds the adapter follow, and the answer waits (up to
``call_timeout``) until each live replica has, listing them in
``"replicas": {"done", "pending"}``.

The routes are those of :mod:`lora_ckpt.serving.http_app` (the app is built
there, over :class:`IngressBackend`), plus ``GET /replicas``
(each live replica: id, pid, node, resident adapters, loads and requests per
adapter). Predictions carry the header ``x-lora-replica`` (the replica that
answered). ``GET /adapters`` lists the union of what the replicas hold, and
``"replicas"``: each replica's resident adapters.
"""

import asyncio
import time

import numpy as np
from prometheus_client import Counter
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from .backend import Prediction, ServiceBackend
from .http_app import build_app
from .inputs import HTTPError
from .logs import AccessLog
from .metrics import SnapshotCollector, add_default_collectors
from .options import ServiceOptions
from .orders import RELOAD, UNLOAD
from .pool import OFF
from .store import store_adapters

__all__ = ["IngressBackend", "LoRAIngress"]


REPLICA_HEADER = "x-lora-replica"
RETRIES = 4
"""Attempts of one call when its replica dies under it."""


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


async def _result(response):
    return await response


class IngressBackend(ServiceBackend):
    """The service's backend in the Ray ingress: calls to ``AdapterReplica``
    replicas (routed by adapter name) and the replica directory.

    Args:
        store: The adapter store (for ``GET /adapters``).
        replica: A handle to the ``AdapterReplica`` deployment.
        directory: A handle to the ``ReplicaDirectory`` deployment.
        options: The service's options (``call_timeout``: seconds a call to a
            replica may take, loads included).
    """

    def __init__(self, store: str, replica, directory, options: ServiceOptions):
        super().__init__(options)
        self.store = store
        self.replica = replica
        self.directory = directory
        self._input_shape = None
        self.retries = Counter(
            "lora_replica_retries",
            "Calls sent again after their replica died",
            registry=self.registry,
        )
        # The single process's metric names, from the replicas' snapshots.
        add_default_collectors(self.registry)
        self._snapshots: list = []
        self.registry.register(SnapshotCollector(lambda: self._snapshots))

    # ---- calls to replicas ----------------------------------------------------------------

    async def call(self, method: str, *args, model: str | None = None):
        """Calls ``method`` on a replica (one holding adapter ``model``, if any),
        again on another if the replica dies.

        Raises:
            HTTPError: The replica's error answer; 503 if no replica could
                answer; 504 past ``call_timeout``.
        """
        handle = self.replica
        if model and model != OFF:
            handle = handle.options(multiplexed_model_id=model)
        timeout = self.options.call_timeout
        for attempt in range(RETRIES):
            try:
                result = await asyncio.wait_for(
                    _result(getattr(handle, method).remote(*args)), timeout
                )
                break
            except RayActorError as exc:
                if attempt == RETRIES - 1:
                    raise HTTPError(
                        503, "ReplicaUnavailable", f"No replica could answer; retry later ({exc})."
                    ) from None
                self.retries.inc()
                await asyncio.sleep(0.5 * (attempt + 1))  # the router learns of the death
            except asyncio.TimeoutError:
                raise HTTPError(
                    504, "Timeout", f"A replica did not answer within {timeout:g} s."
                ) from None
        if isinstance(result, dict) and "error" in result:
            raise HTTPError(*result["error"])
        return result

    async def replicas(self) -> list[dict]:
        """The live replicas' latest reports (see ``ReplicaDirectory.replicas``)."""
        return await self.directory.replicas.remote()

    async def broadcast(self, kind: str, name: str, version: str | None = None) -> dict:
        """Leaves an order for every replica and waits until each live one has
        carried it out, or ``call_timeout`` has passed.

        Returns:
            ``{"done": [replica, ...], "pending": [...]}``.
        """
        seq = await self.directory.order.remote(kind, name, version)
        deadline = time.monotonic() + self.options.call_timeout
        while True:
            progress = await self.directory.progress.remote(seq)
            if not progress["pending"] or time.monotonic() > deadline:
                return progress
            await asyncio.sleep(0.2)

    # ---- the backend ----------------------------------------------------------------------

    async def readiness(self) -> dict:
        replicas = await self.replicas()
        if not replicas:
            return {"ready": False, "reason": "no replica has loaded the base model yet"}
        return {
            "ready": True,
            "replicas": len(replicas),
            "resident": _union(replicas, "resident"),
            "failed": _union(replicas, "failed"),
        }

    async def describe(self) -> dict:
        replicas = await self.replicas()
        store = await self.store_names()
        return {
            "resident": _union(replicas, "resident"),
            "store": store,
            "failed": dict(sorted(_failures(replicas).items())),
            "active": OFF,
            "merged": None,
            "capacity": replicas[0]["capacity"] if replicas else None,
            "replicas": {r["replica"]: r["resident"] for r in replicas},
        }

    async def load(self, name: str) -> dict:
        result = await self.call("load", name, model=name)
        # Ray routed the load to one replica; the others holding it follow.
        result["replicas"] = await self.broadcast(RELOAD, name, result.pop("version"))
        return result

    async def unload(self, name: str) -> dict:
        holders = [r["replica"] for r in await self.replicas() if name in r["resident"]]
        if not holders:
            raise HTTPError(
                404, "AdapterNotLoadedError", f"Adapter {name!r} is not resident on any replica."
            )
        progress = await self.broadcast(UNLOAD, name)
        return {"unloaded": name, "from": holders, "replicas": progress}

    async def input_shape(self) -> tuple:
        if self._input_shape is None:
            self._input_shape = tuple((await self.call("info"))["input_shape"])
        return self._input_shape

    async def predict(self, name: str, images: np.ndarray) -> Prediction:
        result = await self.call("predict", name, images, model=name)
        return Prediction(result["rows"], result["labels"], {REPLICA_HEADER: result["replica"]})

    async def resident(self) -> list[str]:
        return _union(await self.replicas(), "resident")

    async def store_names(self) -> list[str]:
        return await asyncio.to_thread(store_adapters, self.store)

    async def failure(self, name: str) -> str | None:
        return _failures(await self.replicas()).get(name)

    async def adapter_metadata(self, name: str) -> dict:
        return await self.call("metadata", name, model=name)

    async def metrics_text(self) -> str:
        replicas = await self.replicas()
        self._snapshots = [r["metrics"] for r in replicas if r.get("metrics")]
        lines = []
        # Per replica and adapter: which replica loaded (and served) which adapter.
        for metric, key, text in (
            ("lora_replica_adapter_loads", "loads", "Adapter loads per replica"),
            ("lora_replica_requests", "requests", "Requests served per replica and adapter"),
        ):
            lines.append(f"# HELP {metric} {text}\n# TYPE {metric} counter\n")
            for replica in replicas:
                for name, count in sorted(replica[key].items()):
                    lines.append(
                        f'{metric}_total{{replica="{_escape(replica["replica"])}",'
                        f'adapter="{_escape(name)}"}} {count}\n'
                    )
        lines.append("# HELP lora_replicas Live replicas\n# TYPE lora_replicas gauge\n")
        lines.append(f"lora_replicas {len(replicas)}\n")
        return "".join(lines)

    def counts_as_known(self, name: str, status: str) -> bool:
        return status == "ok"  # a name becomes a label only once a replica served it

    def error_parts(self, exc: Exception) -> tuple[int, str, str] | None:
        # First: a RayTaskError is also an instance of the error it wraps.
        if isinstance(exc, RayTaskError):  # a replica's bug: its log has the traceback
            return 500, "InternalError", f"A replica failed: {exc!s:.300}"
        return super().error_parts(exc)

    def extra_endpoints(self) -> dict:
        async def replicas() -> dict:
            return {"replicas": await self.replicas()}

        return {"/replicas": replicas}


def _union(replicas: list[dict], key: str) -> list[str]:
    return sorted({name for replica in replicas for name in replica[key]})


def _failures(replicas: list[dict]) -> dict[str, str]:
    failed = {}
    for replica in replicas:
        failed.update(replica["failed"])
    return failed


@serve.ingress()
class LoRAIngress:
    """The HTTP front of the Ray Serve application: the service's app over an
    :class:`IngressBackend`.

    Args:
        store: The adapter store (for ``GET /adapters``).
        replica: A handle to the ``AdapterReplica`` deployment.
        directory: A handle to the ``ReplicaDirectory`` deployment.
        options: The service's options.
    """

    def __init__(self, store: str, replica, directory, options: ServiceOptions):
        self.backend = IngressBackend(store, replica, directory, options)

    def __serve_build_asgi_app__(self):
        app = build_app(self.backend)
        app.add_middleware(AccessLog)  # one access line per request, as the single process
        return app
