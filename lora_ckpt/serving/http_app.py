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
- TF Serving's REST API (:mod:`.tfserving`, routes in :mod:`.http_tfserving`):
  ``POST /v1/models/{name}[/versions/{n}]:predict``, ``GET
  /v1/models/{name}[/versions/{n}][/metadata]``, and ``POST
  /v1/adapters:predict`` (several adapters, one input, one mixed batch).
- ``GET /metrics``: Prometheus text format.
- The console (:mod:`.console_routes`): ``GET /`` and its files,
  ``GET /adapters/{name}/info``, ``GET /console/stats``, ``GET /whoami``.
- What the backend adds (:meth:`~.backend.ServiceBackend.extra_endpoints`).

Errors are ``{"error": {"type", "message"}}`` with the status of
:func:`~.http_common.status_of` (unknown routes and methods too), and
``{"error": "<message>"}`` on ``/v1`` routes, as TF Serving answers; no
message shows a server path (:func:`~.http_common.redact_paths`).

With ``options.auth`` (a key file, :mod:`.auth`), every route but
``/health`` and ``/ready`` needs a key (401); load, reload, unload, the
backend's routes and ``/metrics`` (unless ``options.public_metrics``) need an
admin key (403); a key over its quota gets 429 with ``Retry-After``; an
adapter outside the key's globs is answered as one not in the store (404),
and ``GET /adapters`` lists only the key's adapters.
"""

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .auth import Gate, Key, KeyFile, Refusal
from .backend import ServiceBackend
from .console_routes import console_routes
from .http_common import (
    adapter_name,
    answer,
    error_response,
    not_in_store,
    predict_image,
    redact_paths,
    tfs_error_response,
    visible,
)
from .http_tfserving import TFServingEndpoints
from .inputs import read_body
from .pool import OFF
from .tfserving import TFServingRequestError

__all__ = ["build_app"]


OPEN, TENANT, ADMIN = "open", "tenant", "admin"
"""Who may call a route: anyone, any key, an admin key (with ``options.auth``)."""


def build_app(backend: ServiceBackend) -> Starlette:
    """The service's Starlette app over ``backend``.

    Args:
        backend: What runs the model (its ``options`` give the request limits,
            the key file and whether metrics are public).

    Returns:
        The Starlette application (``app.state.backend`` is ``backend``,
        ``app.state.gate`` the :class:`~.auth.Gate`, or ``None`` without keys).

    Raises:
        LoRAConfigError: If the key file cannot be read or is not a key file.
    """
    options = backend.options
    gate = None
    if getattr(options, "auth", None):
        keys = KeyFile(options.auth)
        keys.reload_on_sighup()
        gate = Gate(keys, public_metrics=getattr(options, "public_metrics", False))
    endpoints = _Endpoints(backend, gate is not None)
    tfs = TFServingEndpoints(backend, endpoints)

    def route(path: str, endpoint, methods=("GET",), access=TENANT) -> Route:
        wrapped = _answering(backend, gate, endpoint, access, path.startswith("/v1/"))
        return Route(path, wrapped, methods=list(methods))

    metrics_access = OPEN if gate is None or gate.public_metrics else ADMIN
    routes = [
        route("/health", endpoints.health, access=OPEN),
        route("/ready", endpoints.ready, access=OPEN),
        route("/adapters", endpoints.adapters),
        route("/adapters/{name}", endpoints.load, ["POST"], access=ADMIN),
        route("/adapters/{name}", endpoints.unload, ["DELETE"], access=ADMIN),
        route("/predict/{name}", endpoints.predict, ["POST"]),
        route("/v1/adapters:predict", tfs.mixed_predict, ["POST"]),
        # Versioned routes first: "{name}" matches no "/", but "{version}" of
        # the status route would swallow ":predict".
        route("/v1/models/{name}/versions/{version}:predict", tfs.predict, ["POST"]),
        route("/v1/models/{name}/versions/{version}/metadata", tfs.metadata),
        route("/v1/models/{name}/versions/{version}", tfs.status),
        route("/v1/models/{name}:predict", tfs.predict, ["POST"]),
        route("/v1/models/{name}/metadata", tfs.metadata),
        route("/v1/models/{name}", tfs.status),
        route("/metrics", endpoints.metrics, access=metrics_access),
    ]
    routes += console_routes(backend, route)  # GET /: the console (see console_routes)
    for path, extra in backend.extra_endpoints().items():
        routes.append(route(path, _json_endpoint(extra), access=ADMIN))

    async def http_exception(request, exc):  # unknown routes and methods, as JSON too
        if request.url.path.startswith("/v1/"):
            return tfs_error_response(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, "HTTPError", str(exc.detail))

    app = Starlette(routes=routes, exception_handlers={StarletteHTTPException: http_exception})
    app.state.backend = backend
    app.state.gate = gate
    return app


def _json_endpoint(produce):
    async def endpoint(request: Request):
        return JSONResponse(await produce())

    return endpoint


def _answering(backend: ServiceBackend, gate: Gate | None, endpoint, access: str, tfs: bool):
    """``endpoint`` behind the key check of ``access``, with its errors
    answered as JSON (TF Serving's ``{"error": msg}`` if ``tfs``)."""

    def respond(status: int, kind: str, message: str, headers=None):
        if tfs:
            return tfs_error_response(status, message, headers)
        return error_response(status, kind, message, headers)

    async def wrapped(request: Request):
        request.state.key = None
        try:
            if gate is None or access == OPEN:
                return await endpoint(request)
            key = gate.authenticate(
                request.headers.get("authorization"), request.headers.get("x-api-key")
            )
            request.state.key = key
            with gate.admit(key, admin=access == ADMIN):
                return await endpoint(request)
        except Refusal as exc:
            return respond(exc.status, exc.kind, exc.message, exc.headers)
        except TFServingRequestError as exc:
            return respond(exc.status, "BadRequest", exc.message)
        except Exception as exc:
            parts = backend.error_parts(exc)
            if parts is None:
                raise  # a bug: the server's 500, with the traceback in its log
            return respond(*parts)

    return wrapped


def _visible_names(key: Key, value):
    """``value`` (a list of names, or a dict keyed by name) with only ``key``'s adapters."""
    if value is None:
        return value
    if isinstance(value, list):
        return [name for name in value if isinstance(name, str) and key.allows(name)]
    if isinstance(value, dict):
        return {name: v for name, v in value.items() if key.allows(name)}
    return value


class _Endpoints:
    """The routes' coroutines, each over the one backend.

    Args:
        backend: The backend.
        keyed: Whether requests carry keys (then bodies that list adapters
            list only the key's, and ``/ready`` lists none).
    """

    def __init__(self, backend: ServiceBackend, keyed: bool):
        self.backend = backend
        self.options = backend.options
        self.keyed = keyed

    async def body(self, request: Request) -> bytes:
        """The request body, bounded in size and time."""
        return await read_body(request, self.options.max_body_bytes, self.options.request_timeout)

    async def observed(self, name: str, work):
        """Awaits ``work`` (a prediction with ``name``), counted in the request metrics."""
        return await self.backend.requests.observed(name, work, self.backend.counts_as_known)

    async def require_known(self, request: Request, name: str) -> None:
        """404 unless ``name`` is ``off``, resident or in the store, and the
        key may see it (503 before ready)."""
        visible(request, name)
        resident = await self.backend.resident()  # first: not ready is 503, even for off
        if name == OFF or name in resident or name in await self.backend.store_names():
            return
        raise not_in_store(name)

    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def ready(self, request):
        body = await self.backend.readiness()
        if self.keyed:  # open to anyone: no adapter names
            body = {k: v for k, v in body.items() if k not in ("resident", "failed")}
        if isinstance(body.get("reason"), str):
            body["reason"] = redact_paths(body["reason"])
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def adapters(self, request):
        body = await self.backend.describe()
        key: Key | None = request.state.key
        if key is not None:
            # A tenant is no operator: the reasons lose the server's paths. (Without
            # keys the service answers loopback, or --insecure, and shows them whole.)
            body["failed"] = {
                name: redact_paths(str(reason)) for name, reason in body.get("failed", {}).items()
            }
            for field in ("resident", "store", "failed"):
                body[field] = _visible_names(key, body.get(field))
            if isinstance(body.get("replicas"), dict):
                body["replicas"] = {r: _visible_names(key, v) for r, v in body["replicas"].items()}
            for name in ("active", "merged"):
                if isinstance(body.get(name), str) and not key.allows(body[name]):
                    body[name] = None
            body["tenant"], body["admin"] = key.tenant, key.admin
        return JSONResponse(body)

    async def load(self, request):
        name = visible(request, adapter_name(request))
        return JSONResponse(await self.backend.load(name))

    async def unload(self, request):
        name = visible(request, adapter_name(request))
        return JSONResponse(await self.backend.unload(name))

    async def predict(self, request):
        name = visible(request, adapter_name(request))
        shape = await self.backend.input_shape()  # 503 before the body is read
        body = await self.body(request)
        image = await predict_image(request, body, shape, self.options.max_pixels)
        result = await self.observed(name, self.backend.predict(name, image[None]))
        return JSONResponse(
            answer(name, result.rows[0], result.labels, self.options.top_k),
            headers=result.headers,
        )

    async def metrics(self, request):
        extra = await self.backend.metrics_text()  # first: it refreshes the gauges
        text = generate_latest(self.backend.registry).decode() + extra
        return Response(text, media_type=CONTENT_TYPE_LATEST)
