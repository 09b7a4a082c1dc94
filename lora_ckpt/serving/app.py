"""The HTTP service: predictions per adapter, adapter management, health,
readiness and Prometheus metrics, on Starlette (served by uvicorn).

Endpoints (JSON unless noted):

- ``GET /health``: the process is up.
- ``GET /ready``: 200 once the base model and the preloaded adapters are in
  memory, 503 before.
- ``GET /adapters``: resident adapters, adapters in the store.
- ``POST /adapters/{name}``: load an adapter of the store into the pool.
- ``DELETE /adapters/{name}``: unload it.
- ``POST /predict/{name}``: one image through adapter ``name`` (``off`` for the
  base): JSON ``{"tensor": [...]}`` (the model's input, with or without the
  batch axis) or ``{"image_base64": "<PNG/JPEG>"}``, or a multipart upload
  with field ``image``. Images are resized to the model's input and mapped to
  ``pixel / 127.5 - 1``. Answers ``{"adapter", "logits", "class"}``.
- ``GET /metrics``: Prometheus text format.

Errors are ``{"error": {"type", "message"}}`` with status 400 (bad input),
404 (unknown adapter), 413 (too large), 422 (an adapter in the store that does
not fit), 503 (not ready, or every slot busy).
"""

import asyncio
import base64
import binascii
import json
import threading
import time

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._tf import tf
from ..errors import (
    AdapterError,
    AdapterMismatchError,
    AdapterNotFoundError,
    AdapterNotLoadedError,
    LoRAConfigError,
    LoRAError,
    MergeStateError,
    PoolFullError,
)
from .batching import MicroBatcher
from .pool import OFF, AdapterPool
from .store import adapter_path, build_base_model, store_adapters, validate_adapter_name


class HTTPError(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


_STATUS = [  # most specific first
    (AdapterNotLoadedError, 404),
    (AdapterNotFoundError, 404),
    (PoolFullError, 503),
    (LoRAConfigError, 400),
    (MergeStateError, 409),
    (AdapterMismatchError, 422),
    (AdapterError, 422),
    (LoRAError, 400),
]


def _error_response(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lora_requests", "Prediction requests", ["adapter", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "lora_request_latency_seconds",
            "Prediction latency",
            ["adapter"],
            registry=self.registry,
        )
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
        self.resident = Gauge(
            "lora_resident_adapters", "Adapters resident in the pool", registry=self.registry
        )


class ServiceState:
    """The pool and its helpers, built in the background at start-up."""

    def __init__(
        self,
        store: str,
        model_name: str | None,
        base_weights: str | None,
        capacity: int,
        max_rank: int | None,
        preload: bool,
        max_batch: int,
        max_wait: float,
        startup_delay: float,
    ):
        self.store = store
        self.pool: AdapterPool | None = None
        self.batcher: MicroBatcher | None = None
        self.error: str | None = None
        self.metrics = _Metrics()
        self._load_lock = threading.Lock()
        self._args = (
            model_name,
            base_weights,
            capacity,
            max_rank,
            preload,
            max_batch,
            max_wait,
            startup_delay,
        )
        threading.Thread(target=self._start, name="lora-ckpt-startup", daemon=True).start()

    def _start(self) -> None:
        model_name, base_weights, capacity, max_rank, preload, max_batch, max_wait, delay = (
            self._args
        )
        try:
            time.sleep(delay)
            model, _ = build_base_model(self.store, model_name, base_weights)
            pool = AdapterPool(model, capacity=capacity, max_rank=max_rank)
            if preload:
                for name in store_adapters(self.store)[:capacity]:
                    pool.load(name, adapter_path(self.store, name))
            self.batcher = MicroBatcher(
                pool, max_batch, max_wait, on_batch=self.metrics.batch_size.observe
            )
            self.pool = pool
        except Exception as exc:  # reported by /ready
            self.error = f"{type(exc).__name__}: {exc}"

    def require_pool(self) -> AdapterPool:
        if self.pool is None:
            reason = self.error or "the base model and adapters are still loading"
            raise HTTPError(503, "NotReady", f"The service is not ready: {reason}.")
        return self.pool

    def ensure_resident(self, name: str) -> None:
        """Loads adapter ``name`` from the store unless it is resident."""
        pool = self.require_pool()
        if name == OFF or name in pool.names():
            return
        path = adapter_path(self.store, validate_adapter_name(name))
        if name not in store_adapters(self.store):
            raise HTTPError(
                404,
                "AdapterNotFound",
                f"No adapter {name!r} in the store; available: {store_adapters(self.store)}.",
            )
        with self._load_lock:  # one load per name at a time
            if name not in pool.names():
                pool.load(name, path)

    def refresh_gauges(self) -> None:
        if self.pool is not None:
            self.metrics.loads.set(self.pool.stats["loads"])
            self.metrics.evictions.set(self.pool.stats["evictions"])
            self.metrics.resident.set(len(self.pool.names()))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(
            413, "TooLarge", f"The request body is {declared} bytes; the limit is {limit}."
        )
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, "TooLarge", f"The request body exceeds {limit} bytes.")
    return body


def _decode_image(data: bytes, shape) -> np.ndarray:
    try:
        image = tf.io.decode_image(data, channels=shape[-1], expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as exc:
        raise HTTPError(
            400, "BadImage", f"Cannot decode the image (PNG or JPEG expected): {exc}"
        ) from None
    image = tf.image.resize(tf.cast(image, tf.float32), shape[:2])
    return (image / 127.5 - 1.0).numpy()


def _parse_tensor(values, shape) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise HTTPError(400, "BadTensor", "'tensor' must be a nested list of numbers.") from None
    if array.shape == (1, *shape):
        array = array[0]
    if array.shape != tuple(shape):
        raise HTTPError(
            400, "BadTensor", f"'tensor' has shape {list(array.shape)}; expected {list(shape)}."
        )
    if not np.all(np.isfinite(array)):
        raise HTTPError(400, "BadTensor", "'tensor' holds NaN or infinite values.")
    return array


async def _read_input(request: Request, shape, limit: int) -> np.ndarray:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        if int(request.headers.get("content-length") or 0) > limit:
            raise HTTPError(413, "TooLarge", f"The upload exceeds {limit} bytes.")
        form = await request.form(max_part_size=limit)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPError(400, "BadRequest", "A multipart request needs a file field 'image'.")
        data = await upload.read()
        if len(data) > limit:
            raise HTTPError(413, "TooLarge", f"The image exceeds {limit} bytes.")
        return _decode_image(data, shape)
    body = await _read_body(request, limit)
    try:
        payload = json.loads(body)
    except ValueError:
        raise HTTPError(400, "BadJSON", "The body is not valid JSON.") from None
    if not isinstance(payload, dict) or not ({"tensor", "image_base64"} & set(payload)):
        raise HTTPError(400, "BadRequest", "Send {'tensor': [...]} or {'image_base64': '...'}.")
    if "tensor" in payload:
        return _parse_tensor(payload["tensor"], shape)
    try:
        data = base64.b64decode(payload["image_base64"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise HTTPError(400, "BadImage", "'image_base64' is not valid base64.") from None
    return _decode_image(data, shape)


def create_app(
    store: str,
    model_name: str | None = None,
    base_weights: str | None = None,
    capacity: int = 8,
    max_rank: int | None = None,
    preload: bool = True,
    max_body_bytes: int = 4 << 20,
    max_batch: int = 8,
    max_wait: float = 0.005,
    startup_delay: float = 0.0,
) -> Starlette:
    """Builds the ASGI app; the pool is built in the background.

    Args:
        store: The adapter store (see :mod:`lora_ckpt.serving.store`).
        model_name, base_weights: Override the store's base model.
        capacity, max_rank: Of the AdapterPool.
        preload: Load the store's adapters (up to ``capacity``) at start-up.
        max_body_bytes: Larger requests get 413.
        max_batch, max_wait: Dynamic batching.
        startup_delay: Seconds to wait before loading (to exercise readiness
            probes).

    Returns:
        The Starlette application.
    """
    state = ServiceState(
        store,
        model_name,
        base_weights,
        capacity,
        max_rank,
        preload,
        max_batch,
        max_wait,
        startup_delay,
    )

    def handle(endpoint):
        async def wrapped(request: Request):
            try:
                return await endpoint(request)
            except HTTPError as exc:
                return _error_response(exc.status, exc.kind, exc.message)
            except LoRAError as exc:
                status = next(code for cls, code in _STATUS if isinstance(exc, cls))
                return _error_response(status, type(exc).__name__, str(exc))

        return wrapped

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def ready(request):
        if state.pool is None:
            reason = state.error or "loading"
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return JSONResponse({"ready": True, "resident": state.pool.names()})

    async def adapters(request):
        pool = state.require_pool()
        return JSONResponse(
            {
                "resident": pool.names(),
                "store": store_adapters(state.store),
                "active": pool.active,
                "merged": pool.merged,
                "capacity": pool.capacity,
            }
        )

    async def load_adapter(request):
        name = validate_adapter_name(request.path_params["name"])
        state.require_pool()
        await asyncio.get_running_loop().run_in_executor(None, state.ensure_resident, name)
        state.refresh_gauges()
        return JSONResponse({"loaded": name, "resident": state.pool.names()})

    async def unload_adapter(request):
        name = validate_adapter_name(request.path_params["name"])
        state.require_pool().unload(name)
        state.refresh_gauges()
        return JSONResponse({"unloaded": name, "resident": state.pool.names()})

    async def predict(request):
        started = time.perf_counter()
        name = request.path_params["name"]
        status = "error"
        try:
            if name != OFF:
                validate_adapter_name(name)
            pool = state.require_pool()
            image = await _read_input(request, pool.input_shape, max_body_bytes)
            await asyncio.get_running_loop().run_in_executor(None, state.ensure_resident, name)
            for _ in range(3):  # evicted between the check and the batch: load again
                try:
                    logits = await state.batcher.predict(image, name)
                    break
                except AdapterNotLoadedError:
                    await asyncio.get_running_loop().run_in_executor(
                        None, state.ensure_resident, name
                    )
            else:
                raise HTTPError(503, "Busy", f"Adapter {name!r} keeps being evicted; retry later.")
            status = "ok"
            return JSONResponse(
                {"adapter": name, "logits": logits.tolist(), "class": int(np.argmax(logits))}
            )
        finally:
            # Label only known adapters: names from requests must not grow the series.
            known = name == OFF or (state.pool is not None and name in state.pool.names())
            label = name if known else "_unknown"
            state.metrics.requests.labels(adapter=label, status=status).inc()
            state.metrics.latency.labels(adapter=label).observe(time.perf_counter() - started)
            state.refresh_gauges()

    async def metrics(request):
        state.refresh_gauges()
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/health", handle(health)),
        Route("/ready", handle(ready)),
        Route("/adapters", handle(adapters)),
        Route("/adapters/{name}", handle(load_adapter), methods=["POST"]),
        Route("/adapters/{name}", handle(unload_adapter), methods=["DELETE"]),
        Route("/predict/{name}", handle(predict), methods=["POST"]),
        Route("/metrics", handle(metrics)),
    ]

    async def http_exception(request, exc):  # unknown routes and methods, as JSON too
        return _error_response(exc.status_code, "HTTPError", str(exc.detail))

    app = Starlette(routes=routes, exception_handlers={StarletteHTTPException: http_exception})
    app.state.service = state
    return app
