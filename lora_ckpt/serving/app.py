"""The single-process HTTP service: the app of :mod:`lora_ckpt.serving.http_app`
over a :class:`~lora_ckpt.serving.service.ServiceState` in this process
(Starlette, served by uvicorn).

The routes, statuses and bodies are documented in :mod:`.http_app`; this
module adds what only this process has: the pool's metrics (:mod:`.metrics`,
the names Ray mode shows too) and the process collectors in ``GET /metrics``,
``merge`` state in ``GET /adapters``, readiness that waits for warm graphs
and named adapters and turns 503 while draining, error messages without
server paths, and the access log with request ids (:mod:`.logs`).
"""

import numpy as np
from starlette.applications import Starlette

from .backend import Prediction, ServiceBackend
from .http_app import build_app
from .inputs import HTTPError
from .logs import AccessLog
from .metrics import SnapshotCollector, add_default_collectors, service_snapshot
from .options import ServiceOptions
from .pool import OFF
from .service import ServiceState

__all__ = ["InProcessBackend", "create_app"]


class InProcessBackend(ServiceBackend):
    """The service's backend in this process: one :class:`ServiceState`
    (pool, batcher, loads), started in the background.

    Args:
        store: The adapter store (see :mod:`lora_ckpt.serving.store`).
        options: The service's options.

    Attributes:
        state: The :class:`ServiceState`.
    """

    def __init__(self, store: str, options: ServiceOptions):
        super().__init__(options)
        self.store = store  # GET /adapters/{name}/info reads configs there
        self.state = ServiceState(store, options)
        add_default_collectors(self.registry)
        self.registry.register(SnapshotCollector(lambda: [service_snapshot(self.state)]))

    async def readiness(self) -> dict:
        state = self.state
        if state.draining:
            return {"ready": False, "reason": "shutting down: draining requests"}
        if state.error is not None:
            return {"ready": False, "reason": state.scrub(state.error)}
        if not state.ready:
            reason = "loading the base model" if state.pool is None else "loading adapters"
            return {"ready": False, "reason": reason}
        return {
            "ready": True,
            "resident": state.pool.names(),
            "pinned": sorted(state.pinned),
            "failed": sorted(state.failed),
        }

    async def describe(self) -> dict:
        return await self.state.describe()

    async def load(self, name: str) -> dict:
        outcome = await self.state.ensure_resident(name, reload=True)
        return {"adapter": name, "outcome": outcome, "resident": self.state.pool.names()}

    async def unload(self, name: str) -> dict:
        pool = self.state.require_pool()
        if name in self.state.pinned:
            raise HTTPError(409, "Pinned", f"Adapter {name!r} is pinned (--pin): it stays.")
        pool.unload(name)
        return {"unloaded": name, "resident": pool.names()}

    async def input_shape(self) -> tuple:
        return self.state.require_pool().input_shape

    async def predict(self, name: str, images: np.ndarray) -> Prediction:
        rows = await self.state.predict(name, images)
        return Prediction(rows, self.state.labels.get(name))

    async def resident(self) -> list[str]:
        return self.state.require_pool().names()

    async def store_names(self) -> list[str]:
        return await self.state.store_names()

    async def failure(self, name: str) -> str | None:
        failed = self.state.failed.get(name)
        return failed[1] if failed is not None else None

    async def adapter_metadata(self, name: str) -> dict:
        pool = self.state.require_pool()
        if name != OFF:
            await self.state.ensure_resident(name)
        return {
            "input_shape": pool.input_shape,
            "classes": pool.classes(name),
            "labels": self.state.labels.get(name),
            # TF Serving's model version: the adapter's save counter.
            "version": self.state.save_versions.get(name, 1),
        }

    async def metrics_text(self) -> str:
        return ""  # the collectors read the state at each scrape

    def error_parts(self, exc: Exception) -> tuple[int, str, str] | None:
        parts = super().error_parts(exc)
        if parts is None:
            return None
        status, kind, message = parts
        return status, kind, self.state.scrub(message)

    def counts_as_known(self, name: str, status: str) -> bool:
        pool = self.state.pool
        return name == OFF or (pool is not None and name in pool.names())


def create_app(store: str, options: ServiceOptions | None = None, **changes) -> Starlette:
    """The single-process service's ASGI app; the base model and pool are
    built in the background (``GET /ready`` says when they are).

    Args:
        store: The adapter store (see :mod:`lora_ckpt.serving.store`).
        options: The service's options (default: :class:`ServiceOptions`'s defaults).
        **changes: Fields of ``options`` to change (``capacity=2``, ...).

    Returns:
        The Starlette application (``app.state.service`` is its ServiceState,
        ``app.state.backend`` its backend), with the access log (:class:`.logs.AccessLog`).

    Raises:
        LoRAConfigError: For a bad option.
        TypeError: For a keyword that is not an option.
    """
    options = (options or ServiceOptions()).replace(**changes)
    backend = InProcessBackend(store, options)
    app = build_app(backend)
    app.add_middleware(AccessLog)
    app.state.service = backend.state
    return app
