"""The slot storage of every layer an adapter pool drives, taken as one.

A pool gives each LoRA layer of its model a :class:`LoRASlots` and each layer
an adapter may carry in full (a classifier head, norm statistics) a
:class:`FullLayerSlots`. :class:`PoolLayers` builds them, checks an adapter
against them (the partial-state subsystem's one fit check, and the base
fingerprint), turns an adapter into one slot's flat values, and folds a slot
into the base kernels and back (merge/unmerge).

While an adapter is merged, the LoRA layers' kernels hold ``(W0 + delta) * g``
and their biases the adapter's. Whatever an adapter loaded meanwhile needs
from the base reads the copies kept of it instead: its base fingerprint (from
the layers' pristine kernels and the biases kept at merge), and DoRA's output
scale (:meth:`LoRASlots.output_scale` reads the layer's ``base_kernel()``).
"""

import dataclasses

import numpy as np

from .._tf import tf
from ..errors import LayerNotFoundError, LoRAConfigError, MergeStateError
from ..models import lora_layers
from ..selection import classifier_paths, lora_settings, match_layers
from ..state import AdapterState, ModelSignature, check_base, check_fit
from ..state.fit import SlotLimits
from ..traversal import named_layers
from .full_slots import FullLayerSlots
from .routing import Routing
from .slot_record import SlotRecord
from .slot_writer import SlotContents, SlotWriter
from .slots import LoRASlots

__all__ = ["PoolLayers"]


class PoolLayers:
    """Per-slot storage of one model's LoRA layers and full layers.

    Args:
        model: A built, unmerged LoRA model.
        capacity: Number of adapter slots (slot 0, the base, comes on top).
        max_rank: The largest adapter rank; ``None``: the model's largest.
        max_classes: The widest classifier head; ``None``: the model's own.
        full_layers: Layers (paths, names or globs) an adapter may carry in
            full; ``None``: the layers the model trains in full.

    Attributes:
        routing: The pool's routing: which slots serve the layers called inside it.
        lora: LoRA layer path -> :class:`LoRASlots`.
        full: Full layer path -> :class:`FullLayerSlots`.
        max_rank, max_classes: As resolved from the arguments.
        base_record: What slot 0 (and every free slot) holds.
        slot_variables: Every variable a slot write changes.
        cleared: The contents of a cleared slot.
        write: ``write(slot, contents)``: writes one slot of every layer.

    Raises:
        LayerNotFoundError: If the model has no LoRA layers, or a
            ``full_layers`` pattern matches nothing.
        LoRAConfigError: For a capacity, max_rank or max_classes below 1, a
            full layer of an unsupported type, variables of several dtypes,
            or a head wider than ``max_classes``.
    """

    def __init__(self, model, capacity, max_rank, max_classes, full_layers):
        layers = dict(lora_layers(model))
        if not layers:
            raise LayerNotFoundError(
                f"Model '{model.name}' has no LoRA layers; an AdapterPool needs a LoRA model."
            )
        max_rank = max_rank or max(layer.lora_rank for layer in layers.values())
        for name, value in (("capacity", capacity), ("max_rank", max_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LoRAConfigError(f"{name} must be a positive integer, got {value!r}.")
        self.max_rank = max_rank
        self.routing = routing = Routing()
        self.signature = ModelSignature.of(model)
        self._fingerprints: dict = {}  # check_base's cache: one per set of variables left out
        self._merged_biases: dict | None = None  # path -> its base bias, while merged
        slots = capacity + 1
        self.lora = {p: LoRASlots(layer, slots, max_rank, routing) for p, layer in layers.items()}
        patterns = lora_settings(model).trainable_layers if full_layers is None else full_layers
        full_paths = match_layers(model, patterns, what="full_layers entry")
        heads = set(classifier_paths(model)) & set(full_paths)
        by_path = {p: layer for p, layer in named_layers(model) if p in full_paths}
        self.max_classes = _head_width(by_path, heads, max_classes)
        self.full = {
            path: FullLayerSlots(
                by_path[path], slots, routing, self.max_classes if path in heads else None
            )
            for path in full_paths
        }
        self._limits = SlotLimits(
            max_rank, {p: (self.max_classes if p in heads else None) for p in full_paths}
        )
        self.heads = sorted(heads)
        self.base_record = SlotRecord(classes=int(by_path[self.heads[0]].units) if heads else None)
        self.slot_variables = [v for s in self._all() for v in s.slot_variables]
        if len({v.dtype for v in self.slot_variables if v.dtype.is_floating}) != 1:
            raise LoRAConfigError(
                "The LoRA layers and full layers of this model keep variables of several "
                "dtypes; a pool needs one."
            )
        self.cleared = self.values_of(None)
        self.write = SlotWriter(
            list(self.lora.values()), list(self.full.values()), max_rank, self._dtype
        )

    @property
    def _dtype(self):
        return self.lora[next(iter(self.lora))].dtype

    def _all(self) -> list:
        return [*self.lora.values(), *self.full.values()]

    def detach(self) -> None:
        """Gives every layer back its plain forward pass."""
        for slots in self._all():
            slots.detach()

    # ---- adapters ---------------------------------------------------------------------

    def prepare(self, state: AdapterState, base: bool):
        """Checks an adapter against these slots and the base; computes its slot.

        Works while an adapter is merged too (see the module's docstring);
        the caller keeps merge and unmerge out meanwhile.

        Args:
            state: The adapter, as :func:`read_lora_state` returned it.
            base: Whether to check the base fingerprint.

        Returns:
            The slot's flat values (see :meth:`values_of`) and its :class:`SlotRecord`.

        Raises:
            AdapterMismatchError: As :meth:`check_fit` and :meth:`values_of`.
            BaseModelMismatchError, MergeStateError: As :meth:`check_base`.
            LoRAConfigError: As :meth:`check_fit`.
        """
        self.check_fit(state)
        if base:
            self.check_base(state)
        values = self.values_of(state)
        scaled = any(g is not None for _, _, g, _ in values.lora)
        return values, dataclasses.replace(self.record_of(state), scaled=scaled)

    def check_fit(self, state: AdapterState) -> None:
        """Refuses an adapter these slots cannot hold.

        Raises:
            AdapterMismatchError: As :func:`check_fit` in slot mode.
            LoRAConfigError: A head saved with variables of several widths.
        """
        check_fit(self.signature, state.config, state.path, slots=self._limits)
        for path in self.heads:
            widths = {v.shape[-1] for k, v in state.tensors.items() if k.startswith(path + "/")}
            if len(widths) > 1:
                raise LoRAConfigError(
                    f"The adapter at {state.path} has head {path} with variables of widths "
                    f"{sorted(widths)}; save the whole head."
                )

    def check_base(self, state: AdapterState) -> None:
        """Refuses an adapter trained on other base weights, also while merged.

        Raises:
            BaseModelMismatchError: If the base fingerprints differ.
            MergeStateError: While merged, if a merged kernel is not among the model's
                variables under its layer's path (not seen in any model so far).
        """
        signature = self.signature
        if self._merged_biases is not None:
            # The kernels hold W0 + delta: fingerprint the base they were merged from.
            signature = dataclasses.replace(signature, variables=self._base_variables())
        # Fingerprints computed either way are the base's, so they share one cache.
        check_base(signature, state.config, state.path, cache=self._fingerprints)

    def _base_variables(self) -> dict:
        """The model's variables, with each merged kernel and bias replaced by its base."""
        variables = dict(self.signature.variables)
        base = {f"{path}/kernel": slots.base_kernel() for path, slots in self.lora.items()}
        base.update((f"{path}/bias", bias) for path, bias in self._merged_biases.items())
        if not base.keys() <= variables.keys():  # a new key would change the fingerprint
            raise MergeStateError(
                f"The merged kernels of this model are not keyed as {sorted(base)[0]!r}; "
                "unmerge before loading with the base check."
            )
        return {**variables, **base}

    def values_of(self, state: AdapterState | None) -> SlotContents:
        """One slot's contents for an adapter (``None``: a cleared slot).

        Raises:
            AdapterMismatchError: A DoRA update whose output scale is not finite.
        """
        tensors = state.tensors if state is not None else {}
        lora = []
        for path, slots in self.lora.items():
            a, b = tensors.get(f"{path}/kernel_lora_a"), tensors.get(f"{path}/kernel_lora_b")
            # The recorded scaling: alpha / rank, or rsLoRA's alpha / sqrt(rank).
            scale = state.config.layers[path].scaling if a is not None else 0.0
            magnitude = tensors.get(f"{path}/lora_magnitude")  # DoRA layers only
            lora.append(slots.slot_values(a, b, scale, tensors.get(f"{path}/bias"), magnitude))
        full = []
        for path, slots in self.full.items():
            prefix = f"{path}/"
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            full += slots.slot_values(own)
        dtype = self._dtype.as_numpy_dtype
        flat = np.concatenate([np.ravel(v) for v in full]) if full else np.zeros([0])
        return SlotContents(lora, flat.astype(dtype, copy=False))

    def record_of(self, state: AdapterState) -> SlotRecord:
        """What a slot holding this adapter records beside its weights."""
        classes = self.base_record.classes
        if self.heads:
            kernel = state.tensors.get(f"{self.heads[0]}/kernel")
            classes = int(kernel.shape[-1]) if kernel is not None else classes
        return SlotRecord(classes, state.config.json_sha256, state.config.metadata)

    # ---- merged mode ------------------------------------------------------------------

    def merge(self, slot: int) -> None:
        """Folds one slot into every LoRA layer's kernel and bias.

        Each kernel becomes ``(W0 + scale * A @ B) * g``, computed from the
        kept base by the layer, so :meth:`unmerge` restores it bit for bit.
        """
        # The layers keep their pristine biases privately; the base check needs them.
        self._merged_biases = {
            path: tf.identity(slots.layer.bias)
            for path, slots in self.lora.items()
            if slots.layer.use_bias
        }
        for slots in self.lora.values():
            layer = slots.layer
            slot_id = tf.constant(slot, tf.int32)
            layer.merge_update(
                slots.delta(slot_id), bias=slots.bias_of(slot_id), output_scale=slots.g_of(slot_id)
            )
        self.routing.merged_slot.assign(slot)

    def unmerge(self) -> None:
        """Restores every LoRA layer's base kernel and bias bit for bit."""
        for slots in self.lora.values():
            slots.layer.unmerge_weights()
        self.routing.merged_slot.assign(0)
        self._merged_biases = None


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
