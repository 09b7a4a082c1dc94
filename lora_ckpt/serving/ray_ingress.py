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

Endpoints are those of :mod:`lora_ckpt.serving.app`, plus ``GET /replicas``
(each live replica: id, pid, node, resident adapters, loads and requests per
adapter). Predictions carry the header ``x-lora-replica`` (the replica that
answered). ``GET /adapters`` lists the union of what the replicas hold, and
``"replicas"``: each replica's resident adapters.
"""

import asyncio
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    generate_latest,
)
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .http_common import (
    RequestMetrics,
    adapter_name,
    answer,
    error_parts,
    error_response,
    predict_image,
    service_app,
    tfs_instances,
    tfs_metadata,
    tfs_status,
)
from .inputs import HTTPError, read_body
from .orders import RELOAD, UNLOAD
from .pool import OFF
from .store import store_adapters

REPLICA_HEADER = "x-lora-replica"
RETRIES = 4
"""Attempts of one call when its replica dies under it."""


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


@serve.ingress()
class LoRAIngress:
    """The HTTP front of the Ray Serve application.

    Args:
        store: The adapter store (for ``GET /adapters``).
        replica: A handle to the ``AdapterReplica`` deployment.
        directory: A handle to the ``ReplicaDirectory`` deployment.
        limits: ``max_body_bytes``, ``max_pixels``, ``request_timeout``,
            ``max_instances``, ``top_k``, ``call_timeout`` (seconds a call to a
            replica may take, loads included).
    """

    def __init__(self, store: str, replica, directory, limits: dict):
        self.store = store
        self.replica = replica
        self.directory = directory
        self.limits = dict(limits)
        self._input_shape = None
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry)
        self.retries = Counter(
            "lora_replica_retries",
            "Calls sent again after their replica died",
            registry=self.registry,
        )

    # ---- calls to replicas ----------------------------------------------------------------

    async def call(self, method: str, *args, model: str | None = None):
        """Calls ``method`` on a replica (one holding adapter ``model``, if any),
        again on another if the replica dies; error answers become HTTPError."""
        handle = self.replica
        if model and model != OFF:
            handle = handle.options(multiplexed_model_id=model)
        timeout = self.limits["call_timeout"]
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

    async def input_shape(self) -> list:
        if self._input_shape is None:
            self._input_shape = (await self.call("info"))["input_shape"]
        return self._input_shape

    async def replicas(self) -> list[dict]:
        return await self.directory.replicas.remote()

    async def broadcast(self, kind: str, name: str, version: str | None = None) -> dict:
        """Leaves an order for every replica and waits until each live one has
        carried it out, or ``call_timeout`` has passed.

        Returns:
            ``{"done": [replica, ...], "pending": [...]}``.
        """
        seq = await self.directory.order.remote(kind, name, version)
        deadline = time.monotonic() + self.limits["call_timeout"]
        while True:
            progress = await self.directory.progress.remote(seq)
            if not progress["pending"] or time.monotonic() > deadline:
                return progress
            await asyncio.sleep(0.2)

    # ---- the ASGI app ---------------------------------------------------------------------

    def __serve_build_asgi_app__(self):
        return build_ingress_app(self)


async def _result(response):
    return await response


def build_ingress_app(ingress: LoRAIngress) -> Starlette:
    """The Starlette app of the ingress (the routes of the single-process app)."""
    limits = ingress.limits

    def handle(endpoint):
        async def wrapped(request: Request):
            try:
                return await endpoint(request)
            except RayTaskError as exc:  # a replica's bug: its log has the traceback
                return error_response(500, "InternalError", f"A replica failed: {exc!s:.300}")
            except Exception as exc:
                parts = error_parts(exc)
                if parts is None:
                    raise
                return error_response(*parts)

        return wrapped

    async def body_of(request) -> bytes:
        return await read_body(request, limits["max_body_bytes"], limits["request_timeout"])

    async def observed(name: str, work):
        # A name becomes a label only once a replica served it.
        return await ingress.requests.observed(name, work, lambda _, status: status == "ok")

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def ready(request):
        replicas = await ingress.replicas()
        if not replicas:
            return JSONResponse(
                {"ready": False, "reason": "no replica has loaded the base model yet"},
                status_code=503,
            )
        return JSONResponse(
            {
                "ready": True,
                "replicas": len(replicas),
                "resident": sorted({n for r in replicas for n in r["resident"]}),
                "failed": sorted({n for r in replicas for n in r["failed"]}),
            }
        )

    async def adapters(request):
        replicas = await ingress.replicas()
        store = await asyncio.to_thread(store_adapters, ingress.store)
        failed = {}
        for replica in replicas:
            failed.update(replica["failed"])
        return JSONResponse(
            {
                "resident": sorted({n for r in replicas for n in r["resident"]}),
                "store": store,
                "failed": dict(sorted(failed.items())),
                "active": OFF,
                "merged": None,
                "capacity": replicas[0]["capacity"] if replicas else None,
                "replicas": {r["replica"]: r["resident"] for r in replicas},
            }
        )

    async def replicas_endpoint(request):
        return JSONResponse({"replicas": await ingress.replicas()})

    async def load_adapter(request):
        name = adapter_name(request)
        result = await ingress.call("load", name, model=name)
        # Ray routed the load to one replica; the others holding it follow.
        result["replicas"] = await ingress.broadcast(RELOAD, name, result.pop("version"))
        return JSONResponse(result)

    async def unload_adapter(request):
        name = adapter_name(request)
        holders = [r["replica"] for r in await ingress.replicas() if name in r["resident"]]
        if not holders:
            raise HTTPError(
                404, "AdapterNotLoadedError", f"Adapter {name!r} is not resident on any replica."
            )
        progress = await ingress.broadcast(UNLOAD, name)
        return JSONResponse({"unloaded": name, "from": holders, "replicas": progress})

    async def predict(request):
        name = adapter_name(request)
        shape = await ingress.input_shape()
        body = await body_of(request)
        image = await predict_image(request, body, shape, limits["max_pixels"])
        result = await observed(name, ingress.call("predict", name, image[None], model=name))
        return JSONResponse(
            answer(name, result["rows"][0], result["labels"], limits["top_k"]),
            headers={REPLICA_HEADER: result["replica"]},
        )

    async def tfs_predict(request):
        name = adapter_name(request)
        shape = await ingress.input_shape()
        images = await tfs_instances(
            await body_of(request), shape, limits["max_pixels"], limits["max_instances"]
        )
        result = await observed(name, ingress.call("predict", name, images, model=name))
        return JSONResponse(
            {"predictions": [row.tolist() for row in result["rows"]]},
            headers={REPLICA_HEADER: result["replica"]},
        )

    async def known_adapter(name: str) -> None:
        if name == OFF:
            return
        if name not in await asyncio.to_thread(store_adapters, ingress.store):
            raise HTTPError(404, "AdapterNotFound", f"No adapter {name!r} in the store.")

    async def tfs_status_endpoint(request):
        name = adapter_name(request)
        await known_adapter(name)
        failed = {}
        for replica in await ingress.replicas():
            failed.update(replica["failed"])
        return JSONResponse(tfs_status(failed.get(name)))

    async def tfs_metadata_endpoint(request):
        name = adapter_name(request)
        await known_adapter(name)
        meta = await ingress.call("metadata", name, model=name)
        return JSONResponse(
            tfs_metadata(name, meta["input_shape"], meta["classes"], meta["labels"])
        )

    async def metrics_endpoint(request):
        lines = [generate_latest(ingress.registry).decode()]
        replicas = await ingress.replicas()
        # Per replica and adapter: which replica loaded (and served) which adapter.
        for metric, key, text in (
            ("lora_replica_adapter_loads", "loads", "Adapter loads per replica"),
            ("lora_replica_requests", "requests", "Requests served per replica and adapter"),
        ):
            lines.append(f"# HELP {metric} {text}\n# TYPE {metric} gauge\n")
            for replica in replicas:
                for name, count in sorted(replica[key].items()):
                    lines.append(
                        f'{metric}{{replica="{_escape(replica["replica"])}",'
                        f'adapter="{_escape(name)}"}} {count}\n'
                    )
        lines.append("# HELP lora_replicas Live replicas\n# TYPE lora_replicas gauge\n")
        lines.append(f"lora_replicas {len(replicas)}\n")
        return Response("".join(lines), media_type=CONTENT_TYPE_LATEST)

    endpoints = {
        "health": health,
        "ready": ready,
        "adapters": adapters,
        "load_adapter": load_adapter,
        "unload_adapter": unload_adapter,
        "predict": predict,
        "tfs_predict": tfs_predict,
        "tfs_metadata": tfs_metadata_endpoint,
        "tfs_status": tfs_status_endpoint,
        "metrics": metrics_endpoint,
    }
    return service_app(handle, endpoints, (Route("/replicas", handle(replicas_endpoint)),))
