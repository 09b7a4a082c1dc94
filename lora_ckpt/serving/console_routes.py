"""The console: a web page served by the service's own app (``GET /``).

Static files shipped in the package (``lora_ckpt/serving/console/``: HTML,
CSS and JavaScript, no build step, nothing loaded from elsewhere: the
Content-Security-Policy allows this origin only). The page uses the same
routes as any client (``/adapters``, ``/predict/{name}``, ``/ready``), and
three of its own, each a plain JSON route any client may use:

- ``GET /adapters/{name}/info``: what the adapter's config says (ranks,
  DoRA/rsLoRA, labels, size, format version, created, config SHA-256, the
  base it fits), without loading it (:meth:`~.backend.ServiceBackend.adapter_info`);
  422 with the reason for a broken adapter.
- ``GET /console/stats``: readiness, resident slots, loads, evictions,
  failed adapters, and requests per second and p50/p99 latency per adapter
  over the last minute and the last minutes (:mod:`.console_stats`).
- ``GET /whoami``: ``{"auth", "tenant", "admin"}`` of the request's key;
  ``{"auth": false, "tenant": null, "admin": true}`` on a service without
  keys (everyone may do everything there).

With keys (``--auth``), the app's key check runs before these JSON routes
(they are built with the app's own route factory), a tenant's key sees only
its adapters in them, and the static files are open: the page asks for a
key before it asks for anything else.
"""

import time
from importlib import resources

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from .backend import ServiceBackend
from .http_common import adapter_name
from .inputs import HTTPError
from .pool import OFF
from .store import adapter_path, is_adapter_name

__all__ = ["console_routes"]


MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
"""The console's files by suffix (``lora_ckpt/serving/console/``; any other file there is not served)."""

SECURITY_HEADERS = {
    # Only this origin: no script, style, font or image from anywhere else,
    # no inline script, no framing (the page sends keys).
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
STATS_WINDOW = 60.0
"""Seconds the per-adapter figures of ``GET /console/stats`` cover."""
_UNCOUNTED = ("_unknown", "_other")  # aggregate series, not adapters: only for admins


def console_routes(backend: ServiceBackend, route) -> list[Route]:
    """The console's routes, for :func:`~.http_app.build_app`.

    Args:
        backend: The service's backend.
        route: The app's route factory, ``route(path, endpoint)``: a GET route
            with the app's key check and JSON error answers (used for the
            JSON routes; the static files are plain routes, open to anyone).

    Returns:
        The routes: ``GET /`` (``index.html``), ``/console/FILE`` for each
        other file of the console (read once, here), ``/console/stats``,
        ``/whoami`` and ``/adapters/{name}/info``.

    Raises:
        FileNotFoundError: If the console's files are not installed with the package.
    """
    folder = resources.files("lora_ckpt.serving").joinpath("console")
    routes = [
        _FileRoute("/", _static(folder.joinpath("index.html").read_bytes(), MEDIA_TYPES[".html"]))
    ]
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.name != "index.html" and suffix in MEDIA_TYPES:
            content = _static(entry.read_bytes(), MEDIA_TYPES[suffix])
            routes.append(_FileRoute(f"/console/{entry.name}", content))
    endpoints = _ConsoleEndpoints(backend)
    return [
        *routes,
        route("/console/stats", endpoints.stats),
        route("/whoami", endpoints.whoami),
        route("/adapters/{name}/info", endpoints.info),
    ]


class _FileRoute(Route):
    """A GET route for a file; another method is an unknown route (404), as it
    was before the console: ``POST /predict/..`` (a client's ``..`` resolves
    to ``POST /``) stays a 404, not a 405."""

    def matches(self, scope):
        match, child = super().matches(scope)
        return (Match.NONE, {}) if match == Match.PARTIAL else (match, child)


def _static(content: bytes, media_type: str):
    async def endpoint(request: Request):
        return Response(content, media_type=media_type, headers=SECURITY_HEADERS)

    return endpoint


def _key(request: Request):
    """The request's key, as the app's key check left it, or ``None`` on a
    service without keys (401 if the service has keys but this request none:
    a route mounted without the check must not answer as if keys were off)."""
    key = getattr(request.state, "key", None)
    if key is None and getattr(request.app.state, "gate", None) is not None:
        raise HTTPError(401, "Unauthorized", "Send your key: Authorization: Bearer KEY.")
    return key


def _allows(key, name: str) -> bool:
    if key is None:
        return True
    return name not in _UNCOUNTED and key.allows(name)


async def _read_counters(backend: ServiceBackend) -> dict:
    """Adapter loads, evictions and load failures, as ``GET /metrics`` shows them.

    Read from the same exposition text (the registry after the backend's
    refresh, and the text it appends), so that the console and Prometheus
    agree, whatever the backend.

    Args:
        backend: The service's backend.

    Returns:
        ``{"loads", "evictions", "load_failures"}``, each a number or ``None``
        if the backend does not count it.
    """
    extra = await backend.metrics_text()  # first: it refreshes the gauges
    text = generate_latest(backend.registry).decode() + extra
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value

    def first(*names: str):
        return next((totals[name] for name in names if name in totals), None)

    # The same counters in one process and on Ray (summed over the replicas).
    return {
        "loads": first("lora_adapter_loads_total"),
        "evictions": first("lora_adapter_evictions_total"),
        "load_failures": first("lora_adapter_load_failures_total"),
    }


class _ConsoleEndpoints:
    """The console's JSON routes, over the one backend."""

    def __init__(self, backend: ServiceBackend):
        self.backend = backend

    def _redacted(self, name: str, reason: str) -> str:
        """``reason`` with the adapter's path in the store shown as its name."""
        if not self.backend.store or not is_adapter_name(name):
            return reason
        return reason.replace(adapter_path(self.backend.store, name), name)

    async def whoami(self, request: Request):
        key = _key(request)
        if key is None:
            return JSONResponse({"auth": False, "tenant": None, "admin": True})
        return JSONResponse({"auth": True, "tenant": key.tenant, "admin": bool(key.admin)})

    async def info(self, request: Request):
        name = adapter_name(request)
        if name == OFF or not _allows(_key(request), name):
            raise HTTPError(404, "AdapterNotFound", f"No adapter {name!r} in the store.")
        return JSONResponse(await self.backend.adapter_info(name))

    async def stats(self, request: Request):
        key = _key(request)
        admin = key is None or bool(key.admin)
        readiness = await self.backend.readiness()
        body = {
            "ready": bool(readiness.get("ready")),
            "reason": readiness.get("reason"),
            "time": time.time(),
            "tenant": None if key is None else key.tenant,
            **self.backend.requests.recent.summary(
                time.monotonic(), STATS_WINDOW, include=lambda name: _allows(key, name)
            ),
            "resident": [],
            "capacity": None,
            "failed": {},
            "loads": None,
            "evictions": None,
            "load_failures": None,
        }
        if body["ready"]:
            described = await self.backend.describe()
            body["resident"] = [n for n in described.get("resident", []) if _allows(key, n)]
            body["capacity"] = described.get("capacity")
            failed = described.get("failed") or {}
            body["failed"] = {
                n: self._redacted(n, str(r)) for n, r in failed.items() if _allows(key, n)
            }
            if admin:  # counts over every adapter: not a tenant's to see
                body.update(await _read_counters(self.backend))
        return JSONResponse(body)
