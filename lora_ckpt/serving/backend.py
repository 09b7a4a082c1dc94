"""What the HTTP front end asks of whatever runs the model.

:func:`lora_ckpt.serving.http_app.build_app` builds the service's one HTTP
API over a :class:`ServiceBackend`; the single-process service
(:class:`lora_ckpt.serving.app.InProcessBackend`, over a
:class:`~lora_ckpt.serving.service.ServiceState`) and the Ray Serve ingress
(:class:`lora_ckpt.serving.ray_ingress.IngressBackend`, over replicas)
implement it. Routes, request parsing, error answers and request metrics
live in the app; a backend answers in plain data.
"""

import abc
import asyncio
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry

from .adapter_info import adapter_info
from .http_common import RequestMetrics, error_parts
from .inputs import HTTPError
from .options import ServiceOptions

__all__ = ["Prediction", "ServiceBackend"]


@dataclass(frozen=True)
class Prediction:
    """What a backend answers for a batch of samples through one adapter.

    Attributes:
        rows: One output (logits) per sample, in their order.
        labels: The adapter's class names, if its metadata has them.
        headers: Extra response headers (e.g. the Ray replica that answered).
    """

    rows: list[np.ndarray]
    labels: list[str] | None
    headers: dict[str, str] | None = None


class ServiceBackend(abc.ABC):
    """The operations behind the service's routes.

    Errors a request can cause are raised as :class:`~.inputs.HTTPError` or
    :class:`~lora_ckpt.errors.LoRAError`; the app answers them as JSON with
    the status :meth:`error_parts` gives.

    Args:
        options: The service's options (the app reads its request limits here).

    Attributes:
        options: As given.
        registry: The Prometheus registry ``GET /metrics`` shows; subclasses
            add their own metrics to it.
        requests: Prediction requests and latency per adapter (the app counts them).
        store: The adapter store's path or URL, if the backend reads one
            (:meth:`adapter_info` reads adapters' configs there).
    """

    store: str | None = None

    def __init__(self, options: ServiceOptions):
        self.options = options
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry)

    @abc.abstractmethod
    async def readiness(self) -> dict:
        """``GET /ready``'s body: ``{"ready": True, ...}`` (200) or
        ``{"ready": False, "reason": ...}`` (503)."""

    @abc.abstractmethod
    async def describe(self) -> dict:
        """``GET /adapters``'s body: resident, store and failed adapters."""

    @abc.abstractmethod
    async def load(self, name: str) -> dict:
        """Loads adapter ``name``, or reloads it if the store's copy changed.

        Returns:
            ``POST /adapters/{name}``'s body (``"adapter"``, ``"outcome"``, ...).
        """

    @abc.abstractmethod
    async def unload(self, name: str) -> dict:
        """Unloads adapter ``name``.

        Returns:
            ``DELETE /adapters/{name}``'s body (``"unloaded"``, ...).
        """

    @abc.abstractmethod
    async def input_shape(self) -> tuple:
        """The model's input shape, without the batch axis.

        Raises:
            HTTPError: 503 while the base model is not loaded.
        """

    @abc.abstractmethod
    async def predict(self, name: str, images: np.ndarray) -> Prediction:
        """Outputs of ``images`` (a batch) through adapter ``name``, loaded first if need be."""

    @abc.abstractmethod
    async def resident(self) -> list[str]:
        """Names of the adapters resident (anywhere), sorted.

        Raises:
            HTTPError: 503 while the base model is not loaded.
        """

    @abc.abstractmethod
    async def store_names(self) -> list[str]:
        """Names of the store's committed adapters, sorted (listed off the event loop)."""

    @abc.abstractmethod
    async def failure(self, name: str) -> str | None:
        """Why adapter ``name`` failed to load, or ``None`` if it did not."""

    @abc.abstractmethod
    async def adapter_metadata(self, name: str) -> dict:
        """``{"input_shape", "classes", "labels"}`` of adapter ``name`` (loaded first)."""

    @abc.abstractmethod
    async def metrics_text(self) -> str:
        """Brings the registry's gauges up to date; returns exposition text to
        append after the registry's own (``""`` if none)."""

    @abc.abstractmethod
    def counts_as_known(self, name: str, status: str) -> bool:
        """Whether a request for ``name`` that ended with ``status`` (``"ok"``
        or ``"error"``) is counted under its own name: names from requests
        must not grow the metric series without bound."""

    def error_parts(self, exc: Exception) -> tuple[int, str, str] | None:
        """``(status, type, message)`` of an error raised by an endpoint, or
        ``None`` for a bug (then the server answers 500)."""
        return error_parts(exc)

    async def adapter_info(self, name: str) -> dict:
        """``GET /adapters/{name}/info``'s body: what adapter ``name``'s config
        says (:func:`~.adapter_info.adapter_info`), read from :attr:`store`
        on a worker thread, without loading the adapter.

        Raises:
            HTTPError: 404 if this backend reads no store.
            AdapterNotFoundError: If the store has no adapter ``name`` (404).
            CorruptAdapterError, AdapterVersionError: For a broken adapter
                (422, with what is wrong).
        """
        if self.store is None:
            raise HTTPError(404, "AdapterNotFound", f"No adapter {name!r} in the store.")
        return await asyncio.to_thread(adapter_info, self.store, name)

    def extra_endpoints(self) -> dict:
        """More ``GET`` routes: path -> coroutine function returning a JSON body."""
        return {}
