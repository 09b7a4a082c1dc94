"""The service's one HTTP API, over a :class:`~.backend.ServiceBackend`.

The single-process service and the Ray Serve ingress serve exactly these
routes, parse requests and answer errors the same way, whichever process
runs the model:

- ``GET /health``: the process is up.
- ``GET /ready``: 200 once a base model is loaded, 503 before (with why).
- ``GET /adapters``: resident, store and failed adapters (with reasons).
- ``POST /adapters/{name}``: load an adapter of the store, or reload it if
  the store's copy changed. ``DELETE /adapters/{name}``: unload it.
- ``POST /predict/{name}``: one image through adapter ``name`` (``off`` for
  the base): JSON ``{"tensor": [...]}`` or ``{"image_base64": ...}``, or a
  multipart upload with field ``image``. Answers ``{"adapter", "logits",
  "class", "label", "top_k": [{"class", "label", "probability"}]}``.
- ``POST /v1/models/{name}:predict``, ``GET /v1/models/{name}``,
  ``GET /v1/models/{name}/metadata``: TF Serving's REST predict, status and
  metadata.
- ``GET /metrics``: Prometheus text format.
- The console (:mod:`.console_routes`): ``GET /`` and its files,
  ``GET /adapters/{name}/info``, ``GET /console/stats``, ``GET /whoami``.
- What the backend adds (:meth:`~.backend.ServiceBackend.extra_endpoints`).

Errors are ``{"error": {"type", "message"}}`` with the status of
:func:`~.http_common.status_of` (unknown routes and methods too).
"""

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .backend import ServiceBackend
from .console_routes import console_routes
from .http_common import (
    adapter_name,
    answer,
    error_response,
    predict_image,
    tfs_instances,
    tfs_metadata,
    tfs_status,
)
from .inputs import HTTPError, read_body
from .pool import OFF


def build_app(backend: ServiceBackend) -> Starlette:
    """The service's Starlette app over ``backend``.

    Args:
        backend: What runs the model (its ``options`` give the request limits).

    Returns:
        The Starlette application (``app.state.backend`` is ``backend``).
    """
    endpoints = _Endpoints(backend)

    def route(path: str, endpoint, methods=("GET",)) -> Route:
        return Route(path, endpoints.answering_errors(endpoint), methods=list(methods))

    routes = [
        route("/health", endpoints.health),
        route("/ready", endpoints.ready),
        route("/adapters", endpoints.adapters),
        route("/adapters/{name}", endpoints.load, ["POST"]),
        route("/adapters/{name}", endpoints.unload, ["DELETE"]),
        route("/predict/{name}", endpoints.predict, ["POST"]),
        route("/v1/models/{name}:predict", endpoints.tfs_predict, ["POST"]),
        route("/v1/models/{name}/metadata", endpoints.tfs_metadata),
        route("/v1/models/{name}", endpoints.tfs_status),
        route("/metrics", endpoints.metrics),
    ]
    routes += console_routes(backend, route)  # GET /: the console (see console_routes)
    for path, extra in backend.extra_endpoints().items():
        routes.append(route(path, _json_endpoint(extra)))

    async def http_exception(request, exc):  # unknown routes and methods, as JSON too
        return error_response(exc.status_code, "HTTPError", str(exc.detail))

    app = Starlette(routes=routes, exception_handlers={StarletteHTTPException: http_exception})
    app.state.backend = backend
    return app


def _json_endpoint(produce):
    async def endpoint(request: Request):
        return JSONResponse(await produce())

    return endpoint


class _Endpoints:
    """The routes' coroutines, each over the one backend."""

    def __init__(self, backend: ServiceBackend):
        self.backend = backend
        self.options = backend.options

    def answering_errors(self, endpoint):
        """``endpoint`` with its errors answered as JSON (see the backend's ``error_parts``)."""

        async def wrapped(request: Request):
            try:
                return await endpoint(request)
            except Exception as exc:
                parts = self.backend.error_parts(exc)
                if parts is None:
                    raise  # a bug: the server's 500, with the traceback in its log
                return error_response(*parts)

        return wrapped

    async def _body(self, request: Request) -> bytes:
        return await read_body(request, self.options.max_body_bytes, self.options.request_timeout)

    async def _observed(self, name: str, work):
        return await self.backend.requests.observed(name, work, self.backend.counts_as_known)

    async def _require_known(self, name: str) -> None:
        """404 unless ``name`` is ``off``, resident or in the store (503 before ready)."""
        resident = await self.backend.resident()  # first: not ready is 503, even for off
        if name == OFF or name in resident or name in await self.backend.store_names():
            return
        raise HTTPError(404, "AdapterNotFound", f"No adapter {name!r} in the store.")

    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def ready(self, request):
        body = await self.backend.readiness()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def adapters(self, request):
        return JSONResponse(await self.backend.describe())

    async def load(self, request):
        return JSONResponse(await self.backend.load(adapter_name(request)))

    async def unload(self, request):
        return JSONResponse(await self.backend.unload(adapter_name(request)))

    async def predict(self, request):
        name = adapter_name(request)
        shape = await self.backend.input_shape()  # 503 before the body is read
        body = await self._body(request)
        image = await predict_image(request, body, shape, self.options.max_pixels)
        result = await self._observed(name, self.backend.predict(name, image[None]))
        return JSONResponse(
            answer(name, result.rows[0], result.labels, self.options.top_k),
            headers=result.headers,
        )

    async def tfs_predict(self, request):
        name = adapter_name(request)
        shape = await self.backend.input_shape()
        body = await self._body(request)
        options = self.options
        images = await tfs_instances(body, shape, options.max_pixels, options.max_instances)
        result = await self._observed(name, self.backend.predict(name, images))
        return JSONResponse(
            {"predictions": [row.tolist() for row in result.rows]}, headers=result.headers
        )

    async def tfs_status(self, request):
        name = adapter_name(request)
        await self._require_known(name)
        return JSONResponse(tfs_status(await self.backend.failure(name)))

    async def tfs_metadata(self, request):
        name = adapter_name(request)
        await self._require_known(name)
        meta = await self.backend.adapter_metadata(name)
        return JSONResponse(
            tfs_metadata(name, meta["input_shape"], meta["classes"], meta["labels"])
        )

    async def metrics(self, request):
        extra = await self.backend.metrics_text()  # first: it refreshes the gauges
        text = generate_latest(self.backend.registry).decode() + extra
        return Response(text, media_type=CONTENT_TYPE_LATEST)
