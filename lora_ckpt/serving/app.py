"""The single-process HTTP service: the app of :mod:`lora_ckpt.serving.http_app`
over a :class:`~lora_ckpt.serving.service.ServiceState` in this process
(Starlette, served by uvicorn).

The routes, statuses and bodies are documented in :mod:`.http_app`; this
module adds what only this process has: the pool's gauges and batch sizes in
``GET /metrics``, and ``merge`` state in ``GET /adapters``.
"""

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette

from .backend import Prediction, ServiceBackend
from .http_app import build_app
from .options import ServiceOptions
from .pool import OFF
from .service import ServiceState


class _PoolMetrics:
    """The pool's metrics; :class:`ServiceState` observes batch sizes and
    load failures into them, :meth:`refresh` reads the rest from the pool."""

    def __init__(self, registry):
        self.batch_size = Histogram(
            "lora_batch_size",
            "Samples per pool batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=registry,
        )
        self.loads = Gauge("lora_adapter_loads", "Adapters loaded into the pool", registry=registry)
        self.evictions = Gauge(
            "lora_adapter_evictions", "Adapters evicted from the pool", registry=registry
        )
        self.resident = Gauge("lora_resident_adapters", "Adapters resident", registry=registry)
        self.failed = Gauge(
            "lora_failed_adapters", "Store adapters that failed to load", registry=registry
        )
        self.load_failures = Counter(
            "lora_adapter_load_failures", "Failed adapter loads", registry=registry
        )

    def refresh(self, state: ServiceState) -> None:
        if state.pool is not None:
            stats = state.pool.stats
            self.loads.set(stats["loads"])
            self.evictions.set(stats["evictions"])
            self.resident.set(len(state.pool.names()))
        self.failed.set(len(state.failed))


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
        self._metrics = _PoolMetrics(self.registry)
        self.state = ServiceState(store, options, metrics=self._metrics)

    async def readiness(self) -> dict:
        state = self.state
        if state.pool is None:
            return {"ready": False, "reason": state.error or "loading the base model"}
        return {"ready": True, "resident": state.pool.names(), "failed": sorted(state.failed)}

    async def describe(self) -> dict:
        return await self.state.describe()

    async def load(self, name: str) -> dict:
        outcome = await self.state.ensure_resident(name, reload=True)
        self._metrics.refresh(self.state)
        return {"adapter": name, "outcome": outcome, "resident": self.state.pool.names()}

    async def unload(self, name: str) -> dict:
        pool = self.state.require_pool()
        pool.unload(name)
        self._metrics.refresh(self.state)
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
        }

    async def metrics_text(self) -> str:
        self._metrics.refresh(self.state)
        return ""

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
        ``app.state.backend`` its backend).

    Raises:
        LoRAConfigError: For a bad option.
        TypeError: For a keyword that is not an option.
    """
    options = (options or ServiceOptions()).replace(**changes)
    backend = InProcessBackend(store, options)
    app = build_app(backend)
    app.state.service = backend.state
    return app
