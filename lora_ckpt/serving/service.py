"""The state behind the HTTP service: a pool over a store, with bad adapters isolated.

The service is ready (:attr:`ServiceState.ready`) once the base model is
loaded, its graphs have run once (warm) and the adapters named by ``--pin``
and ``--preload`` are loaded; a base or a named adapter that cannot be
loaded is fatal (:attr:`ServiceState.error`: ``serve`` exits with it).
Pinned adapters are held in their slots for good, so they are never
evicted. An object store that cannot be reached answers 503 (the load
failed; retry) or 504 (past ``load_timeout``), never 400, and no answer
carries a server path. Adapters load on
their own worker threads with a time limit, so a slow or broken adapter
never holds up requests for resident ones; an adapter that fails to load is
remembered with its reason (until its file changes) and answers 422, while
every other adapter and ``off`` keep serving. Each resident adapter
remembers the SHA-256 of the config it was loaded from, so a reload picks
up a store copy that changed and requests never see a half-written one.
"""

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
import time

import numpy as np

from ..errors import (
    AdapterError,
    AdapterMismatchError,
    AdapterNotFoundError,
    AdapterNotLoadedError,
    LoRAError,
    StoreError,
)
from ..state import read_lora_state
from .batching import MicroBatcher
from .inflight import LoadsInFlight
from .inputs import HTTPError
from .metrics import ServiceTally
from .options import ServiceOptions
from .orders import UNLOAD, Order
from .pool import OFF, AdapterPool
from .public import PathScrubber
from .store import (
    adapter_config_bytes,
    adapter_path,
    build_base_model,
    store_adapters,
    validate_adapter_name,
)

__all__ = ["AdapterFailedError", "ServiceState"]


log = logging.getLogger("lora_ckpt.serving")


class AdapterFailedError(AdapterMismatchError):
    """An adapter of the store failed to load; the reason is kept until its file changes."""


class ServiceState:
    """The pool, its batcher and the store's adapters, built in the background.

    Args:
        store: The adapter store directory, or its ``s3://`` URL.
        options: The service's options; this uses the model (``model_name``,
            ``base_weights``), the pool's (``capacity``, ``max_rank``,
            ``max_classes``), ``preload`` (the store's first adapters, after
            the named ones), ``pin`` and ``preload_adapters``, batching
            (``max_batch``, ``max_wait``), ``queue_timeout`` (seconds a load
            waits for a slot when every slot is in use, before 503),
            ``load_timeout`` (seconds a load from the store may take before
            504) and ``startup_delay``.

    Attributes:
        ready: True once warm and the named adapters are loaded.
        error: Why the start failed (fatal), or ``None``.
        draining: Set on SIGTERM: ``/ready`` answers 503 from then on.
        tally: Counts and latencies for ``/metrics`` (:mod:`.metrics`).
        pinned: The pinned adapters' names.
    """

    def __init__(self, store: str, options: ServiceOptions | None = None):
        self.store = store
        self.options = options or ServiceOptions()
        self.pool: AdapterPool | None = None
        self.batcher: MicroBatcher | None = None
        self.error: str | None = None
        self.ready = False
        self.draining = False
        self.tally = ServiceTally()
        self.pinned: dict[str, object] = {}  # name -> the hold on its slot
        self.scrub = PathScrubber(store)
        self.failed: dict[str, tuple[str | None, str]] = {}  # name -> (config sha, reason)
        self.labels: dict[str, list[str] | None] = {}  # name -> class names
        self.save_versions: dict[str, int] = {}  # name -> its config's save counter
        self._loads = LoadsInFlight(
            concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lora-ckpt-load")
        )
        threading.Thread(target=self._start, name="lora-ckpt-startup", daemon=True).start()

    # ---- start-up -------------------------------------------------------------------

    def _start(self) -> None:
        options = self.options
        try:
            time.sleep(options.startup_delay)
            model, _ = build_base_model(self.store, options.model_name, options.base_weights)
            pool = AdapterPool(
                model,
                capacity=options.capacity,
                max_rank=options.max_rank,
                max_classes=options.max_classes,
                load_timeout=options.queue_timeout,
            )
            self.batcher = MicroBatcher(
                pool,
                options.max_batch,
                options.max_wait,
                lambda size: self.tally.observe("batch_size", size),
            )
            # Warm: the serving graph runs once before /ready says so.
            pool.predict_rows(np.zeros((1, *pool.input_shape), pool.dtype), [OFF])
            self.pool = pool
            log.info("base model loaded and warm")
        except Exception as exc:  # fatal: the base itself is broken
            self._fail_start("the base model failed to load", exc)
            return
        for name in options.startup_adapters:
            try:
                validate_adapter_name(name)
                future, _ = self._loads.submit(name, self._load, name)
                future.result()
                if name in options.pin:
                    self._pin(name)
            except Exception as exc:  # fatal: the operator named this adapter
                self._fail_start(f"adapter {name!r} (--pin/--preload) failed to load", exc)
                return
        self.ready = True
        log.info("ready")
        if options.preload:
            self._preload(options.capacity - len(options.startup_adapters))

    def _fail_start(self, what: str, exc: Exception) -> None:
        self.error = f"{what}: {type(exc).__name__}: {exc}"  # for the operator: paths kept
        log.error("%s", self.error)

    def _pin(self, name: str) -> None:
        """Holds ``name``'s slot for good (as a request does while it runs),
        releasing the hold on a slot it held before (a reload)."""
        hold = self.pool.using([name])
        hold.__enter__()
        old = self.pinned.pop(name, None)
        self.pinned[name] = hold
        if old is not None:
            old.__exit__(None, None, None)

    def _preload(self, count: int) -> None:
        """Loads the store's first ``count`` adapters, as requests would: a
        request for one of them meanwhile waits for the same load."""
        try:
            names = store_adapters(self.store)
        except Exception as exc:  # the service still serves: adapters load on request
            log.error("cannot list the store to preload adapters: %s", exc)
            return
        for name in [n for n in names if n not in self.options.startup_adapters][:count]:
            future, _ = self._loads.submit(name, self._load, name)
            try:
                future.result()
            except LoRAError:
                pass  # recorded in self.failed and logged by _load
            except Exception:
                log.exception("preloading adapter %s failed", name)

    def require_pool(self) -> AdapterPool:
        """The pool, or 503 while the base model is loading (or failed to).

        Raises:
            HTTPError: 503 before the pool is built.
        """
        if self.pool is None:
            reason = self.error or "the base model is still loading"
            raise HTTPError(503, "NotReady", f"The service is not ready: {reason}.")
        return self.pool

    # ---- loading ------------------------------------------------------------------------

    def _load(self, name: str, reload: bool = False) -> str:
        """Loads (or reloads) ``name`` from the store; runs on a loader thread.

        The adapter is read once (:func:`read_lora_state`) and that read is
        what the pool writes. Only to decide that nothing needs reading (a
        resident adapter whose store copy is unchanged, or a copy that already
        failed) is the config alone read first: one small read, no tensors.
        """
        pool = self.require_pool()
        version = None  # the store copy's config SHA-256, once known
        try:
            resident = name in pool.names()
            if resident and not reload:
                return "resident"
            failed = self.failed.get(name)
            if resident or failed is not None:
                version = self._store_version(name)
                if resident and pool.version(name) == version:
                    return "resident"
                if failed is not None and failed[0] == version:
                    raise AdapterFailedError(failed[1])
            # A failure below is remembered for that version even if the copy
            # read is newer: then the next request tries again, which is safe.
            started = time.perf_counter()
            state = read_lora_state(adapter_path(self.store, name))
            version = state.config.json_sha256
            if resident and pool.version(name) == version:
                return "resident"  # the store's copy changed back meanwhile
            pool.load_state(name, state)
            self.tally.observe("load_seconds", time.perf_counter() - started)
            if name in self.pinned:
                self._pin(name)  # the new slot is held; the old one retires and frees
            self.labels[name] = _labels(state.config.metadata)
            self.save_versions[name] = state.config.version
            self.failed.pop(name, None)
            log.info("adapter %s %s", name, "reloaded" if resident else "loaded")
            return "reloaded" if resident else "loaded"
        except AdapterNotFoundError:
            raise
        except LoRAError as exc:
            # A full pool or a merge in progress is the pool's state, not the adapter's.
            if isinstance(exc, AdapterError) and not isinstance(exc, AdapterFailedError):
                self._remember_failure(name, version, exc)
            raise

    def _store_version(self, name: str) -> str:
        """The SHA-256 of the store's ``adapter_config.json`` of ``name``: its version."""
        return hashlib.sha256(adapter_config_bytes(self.store, name)).hexdigest()

    def _remember_failure(self, name: str, version: str | None, exc: LoRAError) -> None:
        """Remembers why ``name`` failed, for the version that failed, so that
        it is not read again until the store's copy changes."""
        if version is None:
            # The read failed before its config was known (a truncated or
            # hostile file): the config alone says which copy that was. A
            # copy published in the instant between the two reads would be
            # taken for the failed one, until it changes again.
            try:
                version = self._store_version(name)
            except LoRAError:
                version = None  # unreadable: every request tries again
        self.failed[name] = (version, self.scrub(f"{type(exc).__name__}: {exc}"))
        log.warning("adapter %s failed to load: %s", name, exc)
        self.tally.count("load_failures")

    async def ensure_resident(self, name: str, reload: bool = False) -> str:
        """Makes ``name`` resident (loading it on a loader thread), within the time limit.

        Returns:
            ``"resident"``, ``"loaded"`` or ``"reloaded"``.

        Raises:
            HTTPError: 404 for a name not in the store, 503 for a store that
                cannot be reached, 504 past the time limit.
            LoRAError: As the load raises (422 for a bad adapter, 503 busy).
        """
        pool = self.require_pool()
        validate_adapter_name(name)
        if name == OFF or (not reload and name in pool.names()):
            self.tally.count("cache_hits")
            return "resident"
        if not reload:
            self.tally.count("cache_misses")
        # No listing of the store: reading the config says whether the adapter
        # exists, in one request to an object store, and names of unfinished
        # saves are not valid adapter names.
        try:
            return await asyncio.wait_for(
                self._loads.run(name, self._load, name, reload, again=reload),
                self.options.load_timeout,
            )
        except asyncio.TimeoutError:
            raise HTTPError(
                504,
                "LoadTimeout",
                f"Loading adapter {name!r} took longer than {self.options.load_timeout:g} s.",
            ) from None
        except AdapterNotFoundError:
            raise HTTPError(404, "AdapterNotFound", f"No adapter {name!r} in the store.") from None
        except StoreError as exc:
            raise self._unreachable(exc, f"load adapter {name!r}") from None

    def _unreachable(self, exc: StoreError, what: str) -> HTTPError:
        """503 for a store that failed a read: retryable, and without the
        store's address (the log has the details)."""
        log.warning("cannot %s: %s", what, exc)
        return HTTPError(
            503,
            "StoreUnavailable",
            f"Cannot {what}: the adapter store did not answer; retry later.",
        )

    async def predict(self, name: str, images: np.ndarray) -> list[np.ndarray]:
        """Outputs of ``images`` through adapter ``name`` (loaded first if need be),
        through the dynamic batcher.

        Raises:
            HTTPError: 404, 503 (an adapter evicted again and again), 504.
            LoRAError: As :meth:`ensure_resident`.
        """
        deadline = time.monotonic() + self.options.queue_timeout
        while True:
            await self.ensure_resident(name)
            try:
                # Holding the slot until answered: it cannot be evicted under the
                # request, and a load that needs a slot waits (queue timeout).
                with self.pool.using([name]):
                    return await self.batcher.predict_many(images, name)
            except AdapterNotLoadedError:
                # Evicted between its load and the hold: load it again, while
                # the request may still wait.
                if time.monotonic() > deadline:
                    raise HTTPError(
                        503, "Busy", f"Adapter {name!r} keeps being evicted; retry later."
                    ) from None

    async def carry_out(self, order: Order) -> str:
        """Carries out an order of the replica directory (see :mod:`.orders`) on
        this pool: another replica reloaded or unloaded the adapter, and this
        one follows if it holds the adapter.

        Args:
            order: The order.

        Returns:
            ``"reloaded"``, ``"unloaded"``, or ``"untouched"`` (not resident
            here, or already at the order's version).

        Raises:
            LoRAError, HTTPError: As :meth:`ensure_resident` for a reload that
                fails (the version already resident keeps serving), or as
                ``AdapterPool.unload`` (a merged adapter stays).
        """
        pool = self.require_pool()
        if order.name not in pool.names():
            return "untouched"
        if order.kind == UNLOAD:
            pool.unload(order.name)
            return "unloaded"
        if pool.version(order.name) == order.version:
            return "untouched"
        return await self.ensure_resident(order.name, reload=True)

    async def store_names(self) -> list[str]:
        """The store's adapters, listed on a worker thread: listing an object
        store (or a large directory) must not hold up the event loop, and every
        request with it.

        Raises:
            HTTPError: 503 if the store cannot be reached, 504 past ``load_timeout``.
        """
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(store_adapters, self.store), self.options.load_timeout
            )
        except asyncio.TimeoutError:
            raise HTTPError(
                504,
                "StoreTimeout",
                f"Listing the store took longer than {self.options.load_timeout:g} s.",
            ) from None
        except StoreError as exc:
            raise self._unreachable(exc, "list the adapter store") from None

    async def describe(self) -> dict:
        """Resident, store and failed adapters, for ``GET /adapters``."""
        pool = self.require_pool()
        return {
            "resident": pool.names(),
            "store": await self.store_names(),
            "failed": {name: reason for name, (_, reason) in sorted(self.failed.items())},
            "active": pool.active,
            "merged": pool.merged,
            "capacity": pool.capacity,
        }


def _labels(metadata: dict) -> list[str] | None:
    labels = metadata.get("labels")
    if isinstance(labels, list) and all(isinstance(label, str) for label in labels):
        return labels
    return None
