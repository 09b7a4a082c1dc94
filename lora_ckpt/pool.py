"""AdapterPool: many adapters resident on one base model, hot-swapped per request.

Every LoRA layer of the model gets slot storage for ``capacity`` adapters
(plus slot 0, "off"). Loading an adapter validates it through the
partial-state subsystem and writes one slot; switching between resident
adapters is an index change; a batch may mix adapters, each sample routed to
its slot inside one compiled forward pass whose only extra input is the slot
ids, so loading, evicting and switching never retrace it. ``merge`` folds one
adapter into the base kernels for zero-overhead inference and ``unmerge``
restores them bit for bit.

Thread safety: any number of threads may call ``predict`` while others load,
unload or evict. A slot becomes visible to requests only once completely
written, and a slot in use by a request is never overwritten or evicted;
``merge``/``unmerge`` wait for running requests and hold new ones meanwhile.
"""

import contextlib
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._tf import tf
from .errors import (
    AdapterMismatchError,
    AdapterNotLoadedError,
    LayerNotFoundError,
    LoRAConfigError,
    MergeStateError,
    PoolFullError,
)
from .models import lora_layers
from .selection import KIND_BIAS, KIND_LORA
from .slots import BASE_ONLY, lora_routing
from .state import AdapterState, ModelSignature, check_base, check_fit, read_lora_state

OFF = "off"
"""The adapter name that computes the base model (LoRA off)."""


class _ReadWriteLock:
    """Many readers (requests) or one writer (merge/unmerge)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def reading(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _LayerUpdate:
    a: np.ndarray  # padded to max_rank
    b: np.ndarray  # padded to max_rank
    scale: np.ndarray
    bias: np.ndarray  # the base bias where the adapter has none; 0 without bias


class AdapterPool:
    """Up to ``capacity`` adapters resident on one LoRA model.

    Args:
        model: A built LoRA model (a registered architecture, a converted
            functional/Sequential model, ...). The pool drives it from now on:
            its own LoRA weights are not used while the pool routes requests.
        capacity: How many adapters can be resident at once.
        max_rank: The largest adapter rank the pool accepts; smaller ranks are
            zero-padded (exactly). Defaults to the model's largest LoRA rank.
        check_base: Refuse adapters trained on other base weights.

    Raises:
        LayerNotFoundError: If the model has no LoRA layers.
        LoRAConfigError: For a capacity or max_rank below 1.
    """

    def __init__(
        self,
        model: tf.keras.Model,
        capacity: int = 8,
        max_rank: int | None = None,
        check_base: bool = True,
    ):
        layers = lora_layers(model)
        if not layers:
            raise LayerNotFoundError(
                f"Model '{model.name}' has no LoRA layers; an AdapterPool needs a LoRA model."
            )
        max_rank = max_rank or max(layer.lora_rank for _, layer in layers)
        if (
            not isinstance(capacity, int)
            or capacity < 1
            or not isinstance(max_rank, int)
            or max_rank < 1
        ):
            raise LoRAConfigError(
                f"capacity and max_rank must be positive integers, got {capacity!r}, {max_rank!r}."
            )
        self.model = model
        self.capacity = capacity
        self.max_rank = max_rank
        self.check_base = check_base
        self._layers = dict(layers)
        for layer in self._layers.values():
            layer.enable_slots(capacity + 1, max_rank)
        self._base_biases = {
            path: layer.bias.numpy()
            if layer.use_bias
            else np.zeros((), layer.kernel.dtype.as_numpy_dtype)
            for path, layer in self._layers.items()
        }

        self._lock = threading.Lock()
        self._rw = _ReadWriteLock()
        self._slot_of: dict[str, int] = {OFF: 0}
        self._name_of: dict[int, str] = {0: OFF}
        self._refs = [0] * (capacity + 1)
        self._last_used = [0] * (capacity + 1)
        self._free = list(range(capacity, 0, -1))
        self._retired: set = set()
        self._tick = itertools.count(1)
        self._active = OFF
        self._merged: str | None = None
        self._merged_slot = 0
        self._fingerprints: dict[frozenset, str] = {}
        self._signature = ModelSignature.of(model)
        self.stats = {"loads": 0, "evictions": 0, "requests": 0, "samples": 0}
        self.trace_count = 0

        sample = model.dummy_inputs if hasattr(model, "dummy_inputs") else None
        input_shape = (
            tuple(sample.shape[1:]) if sample is not None else tuple(model.input_shape[1:])
        )
        self.input_shape = input_shape
        self.dtype = model.dtype or "float32"
        spec = tf.TensorSpec([None, *input_shape], self.dtype)
        # One graph per kind of request, each traced once, here.
        self._forward_one = tf.function(
            self._serve, input_signature=[spec, tf.TensorSpec([], tf.int32)]
        )
        self._forward_mixed = tf.function(
            self._serve, input_signature=[spec, tf.TensorSpec([None], tf.int32)]
        )
        self._forward_base = tf.function(self._serve_base, input_signature=[spec])
        self._write = tf.function(self._write_slot)
        self._forward_one(tf.zeros([1, *input_shape], self.dtype), tf.constant(0))
        self._forward_mixed(tf.zeros([1, *input_shape], self.dtype), tf.zeros([1], tf.int32))

    # ---- compiled forward passes -------------------------------------------

    def _serve(self, x, slot_ids):
        self.trace_count += 1  # runs only while tracing: 2 after construction
        with lora_routing(slot_ids):
            return self.model(x, training=False)

    def _serve_base(self, x):
        with lora_routing(BASE_ONLY):
            return self.model(x, training=False)

    def _write_slot(self, slot, updates):
        # One graph for all the layers' slot writes: a load is one call.
        for path, update in updates.items():
            self._layers[path].slots.assign(
                slot, update["a"], update["b"], update["scale"], update["bias"]
            )

    # ---- adapters ------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the resident adapters (``"off"`` not included), sorted."""
        with self._lock:
            return sorted(n for n in self._slot_of if n != OFF)

    @property
    def active(self) -> str:
        """The adapter ``predict`` uses when none is named."""
        return self._active

    @property
    def merged(self) -> str | None:
        """The adapter folded into the base kernels, or ``None``."""
        return self._merged

    def activate(self, name: str) -> None:
        """Makes a resident adapter the default of ``predict``: an index change.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        with self._lock:
            self._slot(name)
            self._active = name

    def _slot(self, name: str) -> int:
        slot = self._slot_of.get(name)
        if slot is None:
            raise AdapterNotLoadedError(
                f"Adapter {name!r} is not loaded in the pool; resident adapters: "
                f"{sorted(n for n in self._slot_of if n != OFF)}. Load it with pool.load(name, path)."
            )
        return slot

    def _check_base(self, state: AdapterState) -> None:
        with self._rw.reading():  # merged kernels are not the base
            if self._merged is not None:
                raise MergeStateError(
                    f"Adapter {self._merged!r} is merged; unmerge before loading adapters, "
                    "so the base weights can be checked."
                )
            check_base(self._signature, state.config, state.path, cache=self._fingerprints)

    def _prepare(self, state: AdapterState) -> dict[str, _LayerUpdate]:
        """Validates an adapter against the pool; returns what to write per layer."""
        config, path = state.config, state.path
        check_fit(self._signature, config, path, max_rank=self.max_rank)
        unsupported = [
            key
            for key, record in config.variables.items()
            if record.kind not in (KIND_LORA, KIND_BIAS)
            or (record.kind == KIND_BIAS and key.rsplit("/", 1)[0] not in self._layers)
        ]
        if unsupported:
            raise AdapterMismatchError(
                f"The adapter at {path} holds variables a pool cannot serve per request "
                f"({unsupported[:5]}): a pool serves LoRA weights and the biases of LoRA "
                "layers. Load it with load_lora_state on a model of its own."
            )
        updates = {}
        for layer_path, layer in self._layers.items():
            a = state.tensors[f"{layer_path}/kernel_lora_a"]
            b = state.tensors[f"{layer_path}/kernel_lora_b"]
            bias = state.tensors.get(f"{layer_path}/bias", self._base_biases[layer_path])
            updates[layer_path] = _LayerUpdate(
                *layer.slots.padded(a, b),
                np.asarray(config.layers[layer_path].scaling, a.dtype),
                bias,
            )
        if self.check_base:
            self._check_base(state)
        return updates

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        candidates = [
            slot
            for slot, name in self._name_of.items()
            if slot != 0 and self._refs[slot] == 0 and name != self._merged
        ]
        if not candidates:
            raise PoolFullError(
                f"All {self.capacity} slots of the pool hold adapters that running requests "
                "use; nothing can be evicted. Retry when requests finish, or raise capacity."
            )
        slot = min(candidates, key=lambda s: self._last_used[s])
        del self._slot_of[self._name_of.pop(slot)]
        self.stats["evictions"] += 1
        return slot

    def _retire(self, slot: int) -> None:
        self._name_of.pop(slot, None)
        if self._refs[slot] == 0:
            self._free.append(slot)
        else:
            self._retired.add(slot)  # freed by the last request using it

    def load(self, name: str, path: str) -> int:
        """Reads an adapter from disk into a free slot (evicting the least
        recently used idle adapter if the pool is full).

        Loading a name that is resident replaces it; requests already running
        finish with the old weights.

        Args:
            name: The name requests use; any string but ``"off"``.
            path: The adapter directory.

        Returns:
            The slot index.

        Raises:
            LoRAConfigError: For an invalid name.
            AdapterNotFoundError, CorruptAdapterError, AdapterVersionError:
                As :func:`read_lora_state`.
            AdapterMismatchError: Another architecture, layer set, shape, a
                rank above ``max_rank``, or full-layer variables.
            BaseModelMismatchError: Trained on other base weights.
            PoolFullError: Every slot is in use by running requests.
        """
        if not isinstance(name, str) or not name or name == OFF:
            raise LoRAConfigError(
                f"Adapter name must be a non-empty string other than {OFF!r}, got {name!r}."
            )
        updates = self._prepare(read_lora_state(path))
        with self._lock:
            slot = self._take_slot()
        try:
            self._write(tf.constant(slot, tf.int32), {path: vars(u) for path, u in updates.items()})
        except BaseException:
            with self._lock:
                self._free.append(slot)
            raise
        with self._lock:
            old = self._slot_of.get(name)
            self._slot_of[name] = slot
            self._name_of[slot] = name
            self._last_used[slot] = next(self._tick)
            if old is not None:
                self._retire(old)
            self.stats["loads"] += 1
        return slot

    def unload(self, name: str) -> None:
        """Removes a resident adapter; requests using it finish first.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
            MergeStateError: If it is merged, or ``name`` is ``"off"``.
        """
        with self._lock:
            if name == OFF or name == self._merged:
                raise MergeStateError(
                    f"Adapter {name!r} cannot be unloaded (it is 'off' or merged)."
                )
            slot = self._slot(name)
            del self._slot_of[name]
            self._retire(slot)
            if self._active == name:
                self._active = OFF

    # ---- requests --------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, names: Sequence[str]):
        """Holds the slots of ``names`` for a request: they are neither evicted
        nor overwritten until the block ends. Yields the slot ids (int32).

        Raises:
            AdapterNotLoadedError: If a name is not resident.
        """
        with self._lock:
            slots = [self._slot(name) for name in names]
            tick = next(self._tick)
            for slot in set(slots):
                self._refs[slot] += 1
                self._last_used[slot] = tick
        try:
            yield np.asarray(slots, np.int32)
        finally:
            with self._lock:
                for slot in set(slots):
                    self._refs[slot] -= 1
                    if self._refs[slot] == 0 and slot in self._retired:
                        self._retired.discard(slot)
                        self._free.append(slot)

    def predict(
        self, x, adapter: str | None = None, adapters: Sequence[str] | None = None
    ) -> np.ndarray:
        """Runs the model on a batch, each sample with its adapter.

        Args:
            x: A batch ``[n, *input_shape]``.
            adapter: One adapter for the whole batch (default: the active one).
            adapters: One adapter name per sample, for a mixed batch.

        Returns:
            The model's outputs as a numpy array.

        Raises:
            LoRAConfigError: For a wrong input shape or adapter list length.
            AdapterNotLoadedError: If a named adapter is not resident.
            MergeStateError: If another adapter than the requested one is merged.
        """
        x = np.asarray(x, dtype=self.dtype)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise LoRAConfigError(
                f"Expected a batch of shape [n, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}."
            )
        if len(x) == 0:
            raise LoRAConfigError("The batch is empty; send at least one sample.")
        if adapters is not None and adapter is not None:
            raise LoRAConfigError(
                "Pass either adapter (one for the batch) or adapters (one per sample)."
            )
        if adapters is None:
            names = [adapter or self._active] * len(x)
        else:
            names = list(adapters)
            if len(names) != len(x):
                raise LoRAConfigError(
                    f"adapters names {len(names)} adapters for a batch of {len(x)} samples; "
                    "give one adapter name per sample."
                )
        with self.using(names) as slot_ids, self._rw.reading():
            merged = self._merged
            if merged is not None:
                if set(names) != {merged}:
                    raise MergeStateError(
                        f"Adapter {merged!r} is merged into the base kernels; requests for "
                        f"{sorted(set(names) - {merged})} must wait for pool.unmerge()."
                    )
                outputs = self._forward_base(x)
            elif len(set(names)) == 1:
                outputs = self._forward_one(x, slot_ids[0])
            else:
                outputs = self._forward_mixed(x, slot_ids)
        with self._lock:
            self.stats["requests"] += 1
            self.stats["samples"] += len(x)
        return outputs.numpy()

    # ---- merged mode -----------------------------------------------------------

    def merge(self, name: str) -> None:
        """Folds one resident adapter into the base kernels (and biases).

        Until :meth:`unmerge`, requests for ``name`` run the plain base graph
        with no LoRA branch; requests for other adapters are refused.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
            MergeStateError: If an adapter is already merged.
        """
        with self._rw.writing():
            if self._merged is not None:
                raise MergeStateError(
                    f"Adapter {self._merged!r} is already merged; call pool.unmerge() first."
                )
            with self._lock:
                slot = self._slot(name)
                self._refs[slot] += 1  # pinned while merged
            for layer in self._layers.values():
                bias = layer.slots.bias[slot] if layer.use_bias else None
                layer.merge_update(layer.slots.delta(slot), bias=bias)
            self._merged = name
            self._merged_slot = slot

    def unmerge(self) -> None:
        """Restores the base kernels bit for bit.

        Raises:
            MergeStateError: If no adapter is merged.
        """
        with self._rw.writing():
            if self._merged is None:
                raise MergeStateError("No adapter is merged; there is nothing to unmerge.")
            for layer in self._layers.values():
                layer.unmerge_weights()
            with self._lock:
                self._refs[self._merged_slot] -= 1
            self._merged = None
