"""AdapterPool: many adapters resident on one base model, hot-swapped per request.

The pool is a thin front over its parts, each in a module of its own:

- :class:`~.pool_layers.PoolLayers`: the per-layer paged slot storage
  (:mod:`~.slots`, :mod:`~.pages`), the checks an adapter passes before it is written (the
  partial-state subsystem's one fit check, the base fingerprint), and the
  folding of a slot into the base kernels (merge/unmerge);
- :class:`~.residents.Residents`: the :class:`~.slot_table.SlotTable` (plain
  Python: which adapter is in which slot, references, LRU, merge pin), one
  :class:`~.slot_record.SlotRecord` per slot (classes, version, metadata) and
  the writes that fill and clear slots;
- :class:`~.graphs.ServingGraphs`: the compiled forward passes, whose only
  extra input is the slot ids, so loading, evicting and switching never
  retrace them; :class:`~.slot_writer.SlotWriter` the compiled slot write;
- :class:`~.rwlock.ReadWriteLock`: requests and loads read the base kernels,
  ``merge``/``unmerge`` rewrite them (``unmerge`` restores them bit for bit).

Adapters may differ in rank (up to ``max_rank``, per layer: a rank pattern
too). Each is stored as pages, one per rank component (S-LoRA's unified
paging), so its memory is its own tensors' bytes and its compute its own rank,
whatever ``max_rank``: a pool built for rank 64 serves rank-4 adapters at
rank-4 cost (a mixed batch gathers up to the largest rank in it). They may
differ in scaling (LoRA's ``alpha / rank`` or rsLoRA's ``alpha / sqrt(rank)``,
as each layer recorded it), in method (DoRA adapters
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

import numpy as np

from .._tf import tf
from ..errors import LoRAConfigError, MergeStateError
from ..state import AdapterState, read_lora_state
from .graphs import ServingGraphs
from .pool_layers import PoolLayers
from .residents import Residents
from .rwlock import ReadWriteLock
from .slot_table import OFF as OFF  # the service imports it from here

__all__ = ["AdapterPool"]


class AdapterPool:
    """Up to ``capacity`` adapters resident on one LoRA model.

    Args:
        model: A built LoRA model (a registered architecture, a converted functional or
            Sequential model, ...). The pool drives it from now on: its own LoRA weights are
            not used while the pool routes requests.
        capacity: How many adapters can be resident at once.
        max_rank: The largest adapter rank the pool accepts; an adapter takes the memory
            and compute of its own rank. Defaults to the model's largest LoRA rank.
        max_classes: The widest classifier head an adapter may carry. Defaults to the
            model's own number of classes.
        full_layers: Layers (paths, names or globs) an adapter may carry in full, served per
            request: ``Dense``, ``BatchNormalization`` or ``LayerNormalization``. Defaults
            to the layers the model trains in full (its classifier with
            ``lora_train_classifier=True``).
        check_base: Refuse adapters trained on other base weights.
        load_timeout: Seconds a load waits for a slot when every slot is in use by running
            requests, before :class:`PoolFullError`.

    Raises:
        LayerNotFoundError: If the model has no LoRA layers, or a ``full_layers`` pattern
            matches nothing.
        LoRAConfigError: For a capacity, max_rank or max_classes below 1, a full layer of an
            unsupported type, or a head wider than ``max_classes``.
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
        layers = PoolLayers(model, capacity, max_rank, max_classes, full_layers)
        self.model, self.capacity, self.check_base = model, capacity, check_base
        self.max_rank, self.max_classes = layers.max_rank, layers.max_classes
        self.load_timeout = load_timeout
        self._layers, self._rw = layers, ReadWriteLock()
        self._graphs = ServingGraphs(model, layers.routing)
        self._slots = Residents(capacity, layers.write, layers.cleared, layers.base_record)
        self.input_shape, self.dtype = self._graphs.input_shape, self._graphs.dtype
        self.output_width = self._graphs.output_width
        # The slot table and per-layer storage under the names tests and benchmarks read.
        self._table, self._lora, self._full = self._slots.table, layers.lora, layers.full

    @property
    def trace_count(self) -> int:
        """How often a serving graph with slots was traced: 3 from construction on,
        5 once an adapter with output scales (DoRA) has loaded; requests never trace."""
        return self._graphs.trace_count

    @property
    def _classes(self) -> list:
        return [record.classes for record in self._slots.records]

    def close(self) -> None:
        """Detaches the pool from the model: its layers compute as plain layers again."""
        self._layers.detach()

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
        return self._slots.stats

    def classes(self, name: str) -> int:
        """Number of classes (outputs) adapter ``name`` predicts.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        return self._slots.record(name).classes or self.output_width

    def version(self, name: str) -> str | None:
        """The SHA-256 of the ``adapter_config.json`` adapter ``name`` was loaded
        from: a service compares it with the store's to reload changed adapters.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        return self._slots.record(name).version

    def metadata(self, name: str) -> dict:
        """The user metadata (labels, ...) of the ``adapter_config.json`` adapter
        ``name`` was loaded from.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        return self._slots.record(name).metadata

    def activate(self, name: str) -> None:
        """Makes a resident adapter the default of ``predict``: an index change.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
        """
        self._table.activate(name)

    def load(self, name: str, path: str) -> int:
        """Reads an adapter into a slot: :func:`read_lora_state`, then :meth:`load_state`.

        Args:
            name: The name requests use; any string but ``"off"``.
            path: The adapter directory or URL.

        Returns:
            The slot index.

        Raises:
            As :func:`read_lora_state` and :meth:`load_state`.
        """
        self._table.check_name(name)
        return self.load_state(name, read_lora_state(path))

    def load_state(self, name: str, state: AdapterState) -> int:
        """Writes an adapter already read (and checked) by :func:`read_lora_state` into a
        slot (evicting the least recently used idle adapter if the pool is full).

        Loading a name that is resident replaces it: requests already running
        finish with the old weights, later ones see the new ones.

        Args:
            name: The name requests use; any string but ``"off"``.
            state: The adapter, as :func:`read_lora_state` returned it.

        Returns:
            The slot index.

        Raises:
            LoRAConfigError: For an invalid name.
            AdapterMismatchError: Another architecture, a rank above ``max_rank``,
                a head wider than ``max_classes``, layers the pool does not keep
                per slot, or a DoRA magnitude of the wrong shape.
            BaseModelMismatchError: Trained on other base weights.
            MergeStateError: ``name`` is the merged adapter (unmerge first; see :meth:`merge`).
            PoolFullError: Every slot is in use by running requests.
        """
        self._table.check_name(name)
        with self._rw.reading():  # no merge or unmerge changes the kernels meanwhile
            values, record = self._layers.prepare(state, self.check_base)
        return self._slots.put(name, values, record, self.load_timeout)

    def unload(self, name: str) -> None:
        """Removes a resident adapter; requests using it finish first.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
            MergeStateError: If it is merged.
            LoRAConfigError: For ``"off"``.
        """
        self._slots.remove(name)

    def using(self, names):
        """A context manager that holds the slots of ``names`` for a request and yields
        their ids (int32): they are neither evicted nor overwritten until the block ends.

        Raises:
            AdapterNotLoadedError: If a name is not resident.
        """
        return self._slots.using(names)

    def predict(self, x, adapter: str | None = None, adapters=None) -> np.ndarray:
        """Runs the model on a batch, each sample with its adapter.

        Args:
            x: A batch ``[n, *input_shape]``.
            adapter: One adapter for the whole batch (default: the active one).
            adapters: One adapter name per sample, for a mixed batch.

        Returns:
            The model's outputs as a numpy array. With per-adapter heads: ``[n, classes of
            the adapter]`` for one adapter, and ``[n, widest adapter's classes]`` for a
            mixed batch, each row ``-inf`` past its own adapter's classes.

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
        x = self._graphs.check_batch(x)
        names = _names_per_sample(len(x), adapter, adapters, self.active)
        with self.using(names) as slot_ids, self._rw.reading():
            merged = self.merged
            _refuse_while_merged(merged, names)
            records = [self._slots.records[s] for s in slot_ids]
            outputs = self._graphs.forward(
                x, slot_ids, merged=merged is not None, scaled=any(r.scaled for r in records)
            )
            classes = [record.classes for record in records]
        self._slots.served(len(x))
        return outputs.numpy(), classes

    def merge(self, name: str) -> None:
        """Folds one resident adapter into the base kernels (and biases): for each LoRA
        layer ``(W0 + scale * A @ B) * g`` (``g``: DoRA's output scale, 1 for plain LoRA).

        Until :meth:`unmerge`, requests for ``name`` run the plain base graph with no LoRA
        branch; requests for any other adapter (``"off"`` too) raise MergeStateError, as
        the slot graphs would add their updates to ``name``'s. Loads go on: another
        adapter loads into a free (or evicted) slot, which the merge does not touch,
        checked against the base ``name`` was merged into (base fingerprint, DoRA scale),
        and serves once unmerged. Reloading ``name`` itself is refused.

        Raises:
            AdapterNotLoadedError: If ``name`` is not resident.
            MergeStateError: If an adapter is already merged.
        """
        with self._rw.writing():
            self._layers.merge(self._table.pin(name))

    def unmerge(self) -> None:
        """Restores the base kernels bit for bit.

        Raises:
            MergeStateError: If no adapter is merged.
        """
        with self._rw.writing():
            if self.merged is None:
                raise MergeStateError("No adapter is merged; there is nothing to unmerge.")
            self._layers.unmerge()
            self._table.unpin()
        self._slots.clear_freed()


def _names_per_sample(n: int, adapter, adapters, active: str) -> list[str]:
    """The adapter of each of ``n`` samples, from ``predict``'s arguments."""
    if adapters is not None and adapter is not None:
        raise LoRAConfigError(
            "Pass either adapter (one for the batch) or adapters (one per sample)."
        )
    if adapters is None:
        return [adapter or active] * n
    names = list(adapters)
    if len(names) != n:
        raise LoRAConfigError(
            f"adapters names {len(names)} adapters for a batch of {n} samples; "
            "give one adapter name per sample."
        )
    return names


def _refuse_while_merged(merged: str | None, names: list[str]) -> None:
    """Refuses a request for any adapter but the merged one while one is merged."""
    if merged is not None and set(names) != {merged}:
        raise MergeStateError(
            f"Adapter {merged!r} is merged into the base kernels; requests for "
            f"{sorted(set(names) - {merged})} must wait for pool.unmerge()."
        )


def _mask_classes(outputs: np.ndarray, classes: list) -> np.ndarray:
    """Cuts outputs to the widest adapter's classes, ``-inf`` past each row's own."""
    if classes[0] is None or outputs.ndim != 2:
        return outputs
    widest = max(classes)
    outputs = outputs[:, :widest].copy()
    for row, n in enumerate(classes):
        outputs[row, n:] = -np.inf
    return outputs
