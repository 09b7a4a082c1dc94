"""The HTTP service: predictions per adapter, TF Serving-compatible REST,
adapter management, health, readiness and Prometheus metrics, on Starlette
(served by uvicorn).

Endpoints (JSON unless noted):

- ``GET /health``: the process is up.
- ``GET /ready``: 200 once the base model is loaded, 503 before (with why).
- ``GET /adapters``: resident, store and failed adapters (with reasons).
- ``POST /adapters/{name}``: load an adapter of the store, or reload it if
  the store's copy changed.
- ``DELETE /adapters/{name}``: unload it.
- ``POST /predict/{name}``: one image through adapter ``name`` (``off`` for the
  base): JSON ``{"tensor": [...]}`` (the model's input, with or without the
  batch axis) or ``{"image_base64": "<PNG/JPEG>"}``, or a multipart upload
  with field ``image``. Images are resized to the model's input and mapped to
  ``pixel / 127.5 - 1``. Answers ``{"adapter", "logits", "class", "label",
  "top_k": [{"class", "label", "probability"}]}``.
- ``POST /v1/models/{name}:predict``: TF Serving's REST predict:
  ``{"instances": [tensor or {"b64": image}, ...]}`` -> ``{"predictions": [logits, ...]}``.
- ``GET /v1/models/{name}``, ``GET /v1/models/{name}/metadata``: TF
  Serving's status and metadata (input shape, dtype, classes, labels,
  preprocessing).
- ``GET /metrics``: Prometheus text format.

Errors are ``{"error": {"type", "message"}}`` with status 400 (bad input),
404 (unknown adapter), 408 (body too slow), 409 (merge state), 413 (body or
image too large), 422 (an adapter that failed to load, with the reason), 503
(not ready, or every slot busy past the queue timeout), 504 (a load past its
time limit).
"""

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

# Parsing, answers and error statuses are shared with the Ray Serve ingress.
from .http_common import (
    PREPROCESSING,  # noqa: F401  (where it was defined before)
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
from .pool import OFF
from .service import ServiceState


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry)
        self.batch_size = Histogram(
            "lora_batch_size",
            "Samples per pool batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=self.registry,
        )
        self.loads = Gauge(
            "lora_adapter_loads", "Adapters loaded into the pool", registry=self.registry
        )
        self.evictions = Gauge(
            "lora_adapter_evictions", "Adapters evicted from the pool", registry=self.registry
        )
        self.resident = Gauge("lora_resident_adapters", "Adapters resident", registry=self.registry)
        self.failed = Gauge(
            "lora_failed_adapters", "Store adapters that failed to load", registry=self.registry
        )
        self.load_failures = Counter(
            "lora_adapter_load_failures", "Failed adapter loads", registry=self.registry
        )

    def refresh(self, state: ServiceState) -> None:
        if state.pool is not None:
            stats = state.pool.stats
            self.loads.set(stats["loads"])
            self.evictions.set(stats["evictions"])
            self.resident.set(len(state.pool.names()))
        self.failed.set(len(state.failed))


def create_app(
    store: str,
    model_name: str | None = None,
    base_weights: str | None = None,
    capacity: int = 8,
    max_rank: int | None = None,
    max_classes: int | None = None,
    preload: bool = True,
    max_body_bytes: int = 4 << 20,
    max_pixels: int = 4096 * 4096,
    request_timeout: float = 30.0,
    max_instances: int = 64,
    max_batch: int = 8,
    max_wait: float = 0.005,
    queue_timeout: float = 10.0,
    load_timeout: float = 30.0,
    top_k: int = 5,
    startup_delay: float = 0.0,
) -> Starlette:
    """Builds the ASGI app; the base model and pool are built in the background.

    Args:
        store: The adapter store (see :mod:`lora_ckpt.serving.store`).
        model_name, base_weights: Override the store's base model.
        capacity, max_rank, max_classes: Of the AdapterPool.
        preload: Load the store's adapters (up to ``capacity``) at start-up.
        max_body_bytes: Larger bodies get 413, also chunked and multipart ones.
        max_pixels: Larger images (by their header) get 413 before decoding.
        request_timeout: Seconds a body may take to arrive (408 past it).
        max_instances: Most samples in one TF Serving ``:predict`` request.
        max_batch, max_wait: Dynamic batching.
        queue_timeout: Seconds a request waits for a slot when all are busy.
        load_timeout: Seconds a load from the store may take.
        top_k: Classes with probabilities in each answer.
        startup_delay: Seconds to wait before loading (readiness probes).

    Returns:
        The Starlette application (``app.state.service`` is its ServiceState).
    """
    metrics = _Metrics()
    state = ServiceState(
        store,
        model_name=model_name,
        base_weights=base_weights,
        capacity=capacity,
        max_rank=max_rank,
        max_classes=max_classes,
        preload=preload,
        max_batch=max_batch,
        max_wait=max_wait,
        queue_timeout=queue_timeout,
        load_timeout=load_timeout,
        startup_delay=startup_delay,
        metrics=metrics,
    )

    def handle(endpoint):
        async def wrapped(request: Request):
            try:
                return await endpoint(request)
            except Exception as exc:
                parts = error_parts(exc)  # HTTPError and LoRAError: JSON with a status
                if parts is None:
                    raise
                return error_response(*parts)

        return wrapped

    async def body_of(request) -> bytes:
        return await read_body(request, max_body_bytes, request_timeout)

    def known(name: str, status: str) -> bool:
        return name == OFF or (state.pool is not None and name in state.pool.names())

    async def observed(name: str, work):
        return await metrics.requests.observed(name, work, known)

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def ready(request):
        if state.pool is None:
            reason = state.error or "loading the base model"
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return JSONResponse(
            {"ready": True, "resident": state.pool.names(), "failed": sorted(state.failed)}
        )

    async def adapters(request):
        return JSONResponse(await state.describe())

    async def load_adapter(request):
        name = adapter_name(request)
        outcome = await state.ensure_resident(name, reload=True)
        metrics.refresh(state)
        return JSONResponse({"adapter": name, "outcome": outcome, "resident": state.pool.names()})

    async def unload_adapter(request):
        name = adapter_name(request)
        state.require_pool().unload(name)
        metrics.refresh(state)
        return JSONResponse({"unloaded": name, "resident": state.pool.names()})

    async def predict(request):
        name = adapter_name(request)
        pool = state.require_pool()
        body = await body_of(request)
        image = await predict_image(request, body, pool.input_shape, max_pixels)
        (logits,) = await observed(name, state.predict(name, image[None]))
        return JSONResponse(answer(name, logits, state.labels.get(name), top_k))

    async def tfs_predict(request):
        name = adapter_name(request)
        pool = state.require_pool()
        body = await body_of(request)
        images = await tfs_instances(body, pool.input_shape, max_pixels, max_instances)
        rows = await observed(name, state.predict(name, images))
        return JSONResponse({"predictions": [row.tolist() for row in rows]})

    async def known_adapter(name: str) -> None:
        pool = state.require_pool()
        if name != OFF and name not in pool.names() and name not in await state.store_names():
            raise HTTPError(404, "AdapterNotFound", f"No adapter {name!r} in the store.")

    async def tfs_status_endpoint(request):
        name = adapter_name(request)
        await known_adapter(name)
        failed = state.failed.get(name)
        return JSONResponse(tfs_status(failed[1] if failed is not None else None))

    async def tfs_metadata_endpoint(request):
        name = adapter_name(request)
        await known_adapter(name)
        pool = state.pool
        if name != OFF:
            await state.ensure_resident(name)
        return JSONResponse(
            tfs_metadata(name, pool.input_shape, pool.classes(name), state.labels.get(name))
        )

    async def metrics_endpoint(request):
        metrics.refresh(state)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
    app = service_app(handle, endpoints)
    app.state.service = state
    return app
