"""AdapterPool: many adapters resident on one base model, hot-swapped per request.

The pool is a thin front over two parts: the :class:`SlotTable` (plain
Python: which adapter is in which slot, references, LRU, merge pin) and the
per-layer slot storage (:mod:`lora_ckpt.serving.slots`). Loading validates an
adapter through the partial-state subsystem's one fit check and writes one
slot; switching is an index change; a batch may mix adapters, each sample
routed to its slot inside one compiled forward pass whose only extra input is
the slot ids, so loading, evicting and switching never retrace it. ``merge``
folds one adapter into the base kernels and ``unmerge`` restores them bit for
bit.

Adapters may differ in rank (up to ``max_rank``, per layer: a rank pattern
pads each layer on its own), in scaling (LoRA's ``alpha / rank`` or rsLoRA's
``alpha / sqrt(rank)``, as each layer recorded it), in method (DoRA adapters
serve on the pool's plain LoRA layers: their per-output scale is computed
once at load), in which LoRA layers they adapt, and in the layers they carry
in full (``full_layers``: by default the layers the model trains in full,
such as its classifier). A classifier head may have its own number of classes
(up to ``max_classes``): ``predict(x, adapter=name)`` returns that adapter's
classes; a mixed batch returns the widest adapter's width with each row
padded by ``-inf`` past its own classes, so argmax and softmax stay right.

Thread safety: any number of threads may call ``predict`` while others load,
unload or evict. A slot becomes visible only once completely written, a slot
in use is never overwritten or evicted, a freed slot is cleared before reuse;
``merge``/``unmerge`` wait for running requests and hold new ones meanwhile.
"""

import contextlib
import threading

import numpy as np

from .._tf import tf
from ..errors import LayerNotFoundError, LoRAConfigError, MergeStateError
from ..models import lora_layers
from ..selection import classifier_paths, lora_settings, match_layers
from ..state import AdapterState, ModelSignature, check_base, check_fit, read_lora_state
from ..state.fit import SlotLimits
from ..traversal import named_layers
from .slot_table import OFF, SlotTable
from .slots import BASE_ONLY, FullLayerSlots, LoRASlots, Routing


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


class AdapterPool:
    """Up to ``capacity`` adapters resident on one LoRA model.

    Args:
        model: A built LoRA model (a registered architecture, a converted
            functional/Sequential model, ...). The pool drives it from now on:
            its own LoRA weights are not used while the pool routes requests.
        capacity: How many adapters can be resident at once.
        max_rank: The largest adapter rank the pool accepts; smaller ranks are
            zero-padded (exactly). Defaults to the model's largest LoRA rank.
        max_classes: The widest classifier head an adapter may carry.
            Defaults to the model's own number of classes.
        full_layers: Layers (paths, names or globs) an adapter may carry in
            full, served per request: ``Dense``, ``BatchNormalization`` or
            ``LayerNormalization``. Defaults to the layers the model trains in
            full (its classifier with ``lora_train_classifier=True``).
        check_base: Refuse adapters trained on other base weights.
        load_timeout: Seconds a load waits for a slot when every slot is in
            use by running requests, before :class:`PoolFullError`.

    Raises:
        LayerNotFoundError: If the model has no LoRA layers, or a
            ``full_layers`` pattern matches nothing.
        LoRAConfigError: For a capacity, max_rank or max_classes below 1, a
            full layer of an unsupported type, or a head wider than
            ``max_classes``.
    """

    def __init__(
        self,
        model: tf.keras.Model,
        capacity: int = 8,
        max_rank: int | None = None,
        max_classes: int | None = None,
        full_layers=None,
        check_base: bool = True,
        load_timeout: float = 0.0,
    ):
        layers = dict(lora_layers(model))
        if not layers:
            raise LayerNotFoundError(
                f"Model '{model.name}' has no LoRA layers; an AdapterPool needs a LoRA model."
            )
        max_rank = max_rank or max(layer.lora_rank for layer in layers.values())
        for name, value in (("capacity", capacity), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LoRAConfigError(f"{name} must be a positive integer, got {value!r}.")
        self.model = model
        self.capacity = capacity
        self.max_rank = max_rank
        self.check_base = check_base
        self.load_timeout = load_timeout
        self._table = SlotTable(capacity)
        self._rw = _ReadWriteLock()
        self._routing = Routing()
        self._signature = ModelSignature.of(model)
        self._fingerprints: dict = {}
        self._stats_lock = threading.Lock()
        self._requests = {"requests": 0, "samples": 0}
        self.trace_count = 0

        slots = capacity + 1
        self._lora = {
            p: LoRASlots(layer, slots, max_rank, self._routing) for p, layer in layers.items()
        }
        patterns = lora_settings(model).trainable_layers if full_layers is None else full_layers
        full_paths = match_layers(model, patterns, what="full_layers entry")
        heads = set(classifier_paths(model)) & set(full_paths)
        by_path = {p: layer for p, layer in named_layers(model) if p in full_paths}
        self.max_classes = self._head_width(by_path, heads, max_classes)
        self._full = {
            path: FullLayerSlots(
                by_path[path], slots, self._routing, self.max_classes if path in heads else None
            )
            for path in full_paths
        }
        self._limits = SlotLimits(
            max_rank, {p: (self.max_classes if p in heads else None) for p in full_paths}
        )
        self._heads = sorted(heads)
        own_classes = int(by_path[self._heads[0]].units) if heads else None
        self._classes = [own_classes] * slots  # each slot's number of classes
        self._versions: list = [None] * slots  # each slot's adapter_config.json SHA-256
        self._metadata: list = [{}] * slots  # and its user metadata
        self._slot_variables = [
            v
            for slots in (*self._lora.values(), *self._full.values())
            for v in slots.slot_variables
        ]
        if len({v.dtype for v in self._slot_variables}) != 1:
            raise LoRAConfigError(
                "The LoRA layers and full layers of this model keep variables of several "
                "dtypes; a pool needs one."
            )
        self._cleared = self._values_of(None)

        sample = getattr(model, "dummy_inputs", None)
        shape = tuple(sample.shape[1:]) if sample is not None else tuple(model.input_shape[1:])
        self.input_shape = shape
        self.dtype = model.dtype or "float32"  # the variables' dtype, also under mixed precision
        batch, single = (
            tf.TensorSpec([None, *shape], self.dtype),
            tf.TensorSpec([1, *shape], self.dtype),
        )
        scalar, vector = tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.int32)
        # One graph per kind of request, each traced once, here. Batch 1 has
        # its own graph so each layer can choose its cheapest path for it.
        self._forward_one = tf.function(self._serve, input_signature=[batch, scalar])
        self._forward_single = tf.function(self._serve, input_signature=[single, scalar])
        self._forward_mixed = tf.function(self._serve, input_signature=[batch, vector])
        self._forward_base = tf.function(self._serve_base, input_signature=[batch])
        self._write = tf.function(self._write_slot, autograph=False)
        zeros = np.zeros([1, *shape], self.dtype)
        self.output_width = int(self._forward_one(zeros, tf.constant(0)).shape[-1])
        self._forward_single(zeros, tf.constant(0))
        self._forward_mixed(zeros, tf.zeros([1], tf.int32))

    @staticmethod
    def _head_width(by_path, heads, max_classes) -> int | None:
        if not heads:
            return None
        widths = {int(by_path[p].units) for p in heads}
        width = max_classes if max_classes is not None else max(widths)
        if isinstance(width, bool) or not isinstance(width, int) or width < max(widths):
            raise LoRAConfigError(
                f"max_classes must be an integer of at least the model's own {max(widths)} "
                f"classes, got {max_classes!r}."
            )
        return width

    def close(self) -> None:
        """Detaches the pool from the model: its layers compute as plain layers again."""
        for slots in (*self._lora.values(), *self._full.values()):
            slots.detach()

    # ---- compiled functions ---------------------------------------------------------

    def _serve(self, x, slot_ids):
        self.trace_count += 1  # runs only while tracing: 3 after construction
        with self._routing.route(slot_ids):
            return self.model(x, training=False)

    def _serve_base(self, x):
        with self._routing.route(BASE_ONLY):
            return self.model(x, training=False)

    def _write_slot(self, slot, flat):
        # One graph and one flat input for every layer's slot write: a load is
        # one call (an input per array would cost more than the writes).
        sizes = [v.shape[1:].num_elements() for v in self._slot_variables]
        for variable, part in zip(self._slot_variables, tf.split(flat, sizes), strict=True):
            variable[slot].assign(tf.reshape(part, variable.shape[1:]))

    # ---- adapters ----------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the resident adapters (``"off"`` not included), sorted."""
        return self._table.names()

    @property
    def active(self) -> str:
        """The adapter ``predict`` uses when none is named."""
        return self._table.active

    @property
    def merged(self) -> str | None:
        """The adapter folded into the base kernels, or ``None``."""
        return self._table.merged

    @property
    def stats(self) -> dict:
        """Loads, evictions, requests and samples served so far."""
        with self._stats_lock:
            return {**self._table.stats, **self._requests}

    def classes(self, name: str) -> int:
        """Number of classes (outputs) adapter ``name`` predicts.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        return self._classes[self._table.slot_of(name)] or self.output_width

    def version(self, name: str) -> str | None:
        """The SHA-256 of the ``adapter_config.json`` adapter ``name`` was loaded
        from: a service compares it with the store's to reload changed adapters.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        return self._versions[self._table.slot_of(name)]

    def metadata(self, name: str) -> dict:
        """The user metadata (labels, ...) of the ``adapter_config.json`` adapter
        ``name`` was loaded from.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        return self._metadata[self._table.slot_of(name)]

    def activate(self, name: str) -> None:
        """Makes a resident adapter the default of ``predict``: an index change.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        self._table.activate(name)

    def _values_of(self, state: AdapterState | None) -> np.ndarray:
        """One slot's contents for an adapter (``None``: a cleared slot), flat."""
        tensors = state.tensors if state is not None else {}
        values = []
        for path, slots in self._lora.items():
            a, b = tensors.get(f"{path}/kernel_lora_a"), tensors.get(f"{path}/kernel_lora_b")
            # The recorded scaling: alpha / rank, or rsLoRA's alpha / sqrt(rank).
            scale = state.config.layers[path].scaling if a is not None else 0.0
            magnitude = tensors.get(f"{path}/lora_magnitude")  # DoRA layers only
            values += slots.slot_values(a, b, scale, tensors.get(f"{path}/bias"), magnitude)
        for path, slots in self._full.items():
            prefix = f"{path}/"
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            values += slots.slot_values(own)
        dtype = self._slot_variables[0].dtype.as_numpy_dtype
        return np.concatenate([np.ravel(v) for v in values]).astype(dtype, copy=False)

    def _classes_of(self, state: AdapterState) -> int | None:
        if not self._heads:
            return None
        kernel = state.tensors.get(f"{self._heads[0]}/kernel")
        return int(kernel.shape[-1]) if kernel is not None else self._classes[0]

    def _prepare(self, state: AdapterState) -> np.ndarray:
        """Validates an adapter against the pool; returns what to write into its slot."""
        check_fit(self._signature, state.config, state.path, slots=self._limits)
        for path in self._heads:
            widths = {v.shape[-1] for k, v in state.tensors.items() if k.startswith(path + "/")}
            if len(widths) > 1:
                raise LoRAConfigError(
                    f"The adapter at {state.path} has head {path} with variables of widths "
                    f"{sorted(widths)}; save the whole head."
                )
        with self._rw.reading():  # merged kernels are not the base
            if self.check_base:
                if self.merged is not None:
                    raise MergeStateError(
                        f"Adapter {self.merged!r} is merged; unmerge before loading adapters, "
                        "so the base weights can be checked."
                    )
                check_base(self._signature, state.config, state.path, cache=self._fingerprints)
            # DoRA output scales come from the base kernels: no merge may run meanwhile.
            return self._values_of(state)

    def load(self, name: str, path: str) -> int:
        """Reads an adapter from its store into a slot: :func:`read_lora_state`
        then :meth:`load_state`.

        Args:
            name: The name requests use; any string but ``"off"``.
            path: The adapter directory or URL.

        Returns:
            The slot index.

        Raises:
            As :func:`read_lora_state` and :meth:`load_state`.
        """
        self._check_name(name)
        return self.load_state(name, read_lora_state(path))

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or name == OFF:
            raise LoRAConfigError(
                f"Adapter name must be a non-empty string other than {OFF!r}, got {name!r}."
            )
        if name == self.merged:
            raise MergeStateError(
                f"Adapter {name!r} is merged; call unmerge() before reloading it."
            )

    def load_state(self, name: str, state: AdapterState) -> int:
        """Writes an adapter already read (and checked) by :func:`read_lora_state`
        into a slot (evicting the least recently used idle adapter if the pool
        is full).

        Loading a name that is resident replaces it: requests already running
        finish with the old weights, later ones see the new ones.

        Args:
            name: The name requests use; any string but ``"off"``.
            state: The adapter, as :func:`read_lora_state` returned it.

        Returns:
            The slot index.

        Raises:
            LoRAConfigError: For an invalid name.
            AdapterMismatchError: Another architecture, a rank above
                ``max_rank``, a head wider than ``max_classes``, layers the
                pool does not keep per slot, or a DoRA magnitude that is not
                one value per output of its layer.
            BaseModelMismatchError: Trained on other base weights.
            MergeStateError: ``name`` is the merged adapter (unmerge first).
            PoolFullError: Every slot is in use by running requests.
        """
        self._check_name(name)
        update = self._prepare(state)
        reservation = self._table.reserve(timeout=self.load_timeout)
        slot = reservation.slot
        try:
            self._write(tf.constant(slot, tf.int32), update)
            self._classes[slot] = self._classes_of(state)
            self._versions[slot] = state.config.json_sha256
            self._metadata[slot] = state.config.metadata
            self._table.commit(name, slot)
        except BaseException:
            self._table.abort(slot)
            self._clear_freed()
            raise
        self._clear_freed()
        return slot

    def unload(self, name: str) -> None:
        """Removes a resident adapter; requests using it finish first.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
            MergeStateError: If it is merged.
            LoRAConfigError: For ``"off"``.
        """
        self._table.unload(name)
        self._clear_freed()

    def _clear_freed(self) -> None:
        """Zeroes the slots nobody uses any more, so no stale weights linger."""
        slots = self._table.take_dirty()
        if not slots:
            return
        try:
            for slot in slots:
                self._write(tf.constant(slot, tf.int32), self._cleared)
                self._classes[slot] = self._classes[0]
        finally:
            self._table.cleared(slots)

    # ---- requests ----------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, names):
        """Holds the slots of ``names`` for a request: they are neither evicted
        nor overwritten until the block ends. Yields the slot ids (int32).

        Raises:
            AdapterNotLoadedError: If a name is not resident.
        """
        slots = self._table.acquire(list(names))
        try:
            yield np.asarray(slots, np.int32)
        finally:
            self._table.release(slots)
            self._clear_freed()

    def _check_batch(self, x) -> np.ndarray:
        try:
            x = np.asarray(x, dtype=self.dtype)
        except (TypeError, ValueError) as exc:
            raise LoRAConfigError(f"The input is not an array of numbers: {exc}.") from exc
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise LoRAConfigError(
                f"Expected a batch of shape [n, {', '.join(map(str, self.input_shape))}], "
                f"got {list(x.shape)}."
            )
        if len(x) == 0:
            raise LoRAConfigError("The batch is empty; send at least one sample.")
        if not np.isfinite(x).all():
            raise LoRAConfigError("The input holds NaN or infinite values.")
        return x

    def predict(self, x, adapter: str | None = None, adapters=None) -> np.ndarray:
        """Runs the model on a batch, each sample with its adapter.

        Args:
            x: A batch ``[n, *input_shape]``.
            adapter: One adapter for the whole batch (default: the active one).
            adapters: One adapter name per sample, for a mixed batch.

        Returns:
            The model's outputs as a numpy array. With per-adapter
            heads: ``[n, classes of the adapter]`` for one adapter, and
            ``[n, widest adapter's classes]`` for a mixed batch, each row
            ``-inf`` past its own adapter's classes.

        Raises:
            LoRAConfigError: For a wrong input shape, non-finite input, or an
                adapter list of the wrong length.
            AdapterNotLoadedError: If a named adapter is not resident.
            MergeStateError: If another adapter than the requested one is merged.
        """
        outputs, classes = self._run(x, adapter, adapters)
        return _mask_classes(outputs, classes)

    def predict_rows(self, x, adapters) -> list[np.ndarray]:
        """Like :meth:`predict` with one adapter per sample, each row cut to
        its own adapter's classes (no padding): what a service answers.

        Raises:
            As :meth:`predict`.
        """
        outputs, classes = self._run(x, None, adapters)
        return [row if n is None else row[:n] for row, n in zip(outputs, classes, strict=True)]

    def _run(self, x, adapter, adapters):
        x = self._check_batch(x)
        if adapters is not None and adapter is not None:
            raise LoRAConfigError(
                "Pass either adapter (one for the batch) or adapters (one per sample)."
            )
        if adapters is None:
            names = [adapter or self.active] * len(x)
        else:
            names = list(adapters)
            if len(names) != len(x):
                raise LoRAConfigError(
                    f"adapters names {len(names)} adapters for a batch of {len(x)} samples; "
                    "give one adapter name per sample."
                )
        with self.using(names) as slot_ids, self._rw.reading():
            merged = self.merged
            if merged is not None:
                if set(names) != {merged}:
                    raise MergeStateError(
                        f"Adapter {merged!r} is merged into the base kernels; requests for "
                        f"{sorted(set(names) - {merged})} must wait for pool.unmerge()."
                    )
                outputs = self._forward_base(x)
            elif len(set(names)) > 1:
                outputs = self._forward_mixed(x, slot_ids)
            elif len(x) == 1:
                outputs = self._forward_single(x, slot_ids[0])
            else:
                outputs = self._forward_one(x, slot_ids[0])
            classes = [self._classes[s] for s in slot_ids]
        with self._stats_lock:
            self._requests["requests"] += 1
            self._requests["samples"] += len(x)
        return outputs.numpy(), classes

    # ---- merged mode ---------------------------------------------------------------------

    def merge(self, name: str) -> None:
        """Folds one resident adapter into the base kernels (and biases): for
        each LoRA layer ``(W0 + scale * A @ B) * g`` (``g``: the DoRA output
        scale, 1 for plain LoRA, which multiplies exactly).

        Until :meth:`unmerge`, requests for ``name`` run the plain base graph
        with no LoRA branch; requests for other adapters are refused.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
            MergeStateError: If an adapter is already merged.
        """
        with self._rw.writing():
            slot = self._table.pin(name)
            for slots in self._lora.values():
                layer = slots.layer
                bias = slots.bias[slot] if layer.use_bias else None
                layer.merge_update(slots.delta(slot), bias=bias, output_scale=slots.g[slot])
            self._routing.merged_slot.assign(slot)

    def unmerge(self) -> None:
        """Restores the base kernels bit for bit.

        Raises:
            MergeStateError: If no adapter is merged.
        """
        with self._rw.writing():
            if self.merged is None:
                raise MergeStateError("No adapter is merged; there is nothing to unmerge.")
            for slots in self._lora.values():
                slots.layer.unmerge_weights()
            self._routing.merged_slot.assign(0)
            self._table.unpin()
        self._clear_freed()


def _mask_classes(outputs: np.ndarray, classes: list) -> np.ndarray:
    """Cuts outputs to the widest adapter's classes, ``-inf`` past each row's own."""
    if classes[0] is None or outputs.ndim != 2:
        return outputs
    widest = max(classes)
    outputs = outputs[:, :widest].copy()
    for row, n in enumerate(classes):
        outputs[row, n:] = -np.inf
    return outputs
