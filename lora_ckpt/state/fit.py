"""The one check of whether an adapter fits a model, used by every loader.

``load_lora_state`` and the ``AdapterPool`` both ask :func:`check_fit`: same
architecture and base configuration, every LoRA layer present with the
shapes, dtype and scaling the model needs, nothing the model cannot hold;
:func:`check_base` then compares base-weight fingerprints. Nothing here
assigns a variable: this is the dry run that comes before any change.
"""

import dataclasses
import json
import math
import weakref
from dataclasses import dataclass, field

from .._tf import tf
from ..errors import AdapterMismatchError, BaseModelMismatchError, MergeStateError
from ..models import lora_layers
from ..registry import is_lora_architecture, lora_base_architecture
from ..selection import KIND_LORA, select_state
from .fingerprint import base_fingerprint
from .format import AdapterConfig, BaseModelRecord

__all__ = [
    "LoadReport",
    "ModelSignature",
    "SlotLimits",
    "check_base",
    "check_fit",
    "model_identity",
    "qualified_name",
]


MAGNITUDE = "lora_magnitude"
"""The name of a DoRA layer's magnitude variable (one per output)."""


def qualified_name(cls: type) -> str:
    """``module.ClassName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def model_identity(model, fingerprint: str = "") -> BaseModelRecord:
    """The architecture and base config an adapter records and checks.

    For a registered LoRA architecture this is its base class and config
    without the ``lora_*`` fields (and without ``name``/``url``, which do not
    change the weights); for any other model its class and no config.
    """
    cls = type(model)
    base_cls = lora_base_architecture(cls) if is_lora_architecture(cls) else cls
    cfg = getattr(model, "cfg", None)
    config = None
    if dataclasses.is_dataclass(cfg):
        config = {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if not k.startswith("lora_") and k not in ("name", "url")
        }
        config = json.loads(json.dumps(config))  # tuples -> lists, as read back
    return BaseModelRecord(qualified_name(base_cls), qualified_name(cls), config, fingerprint)


@dataclass
class LoadReport:
    """What a load did (or would do).

    Attributes:
        loaded: Keys of the variables assigned.
        missing: LoRA variables of the model that the adapter lacks (left as
            they were).
        unexpected: Adapter variables the model has no place for (skipped).
        mismatched: Adapter variables whose shape, dtype or scaling differ
            from the model's (skipped), with the reason.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every adapter variable was loaded and none was missing."""
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """The first few problems, as one sentence."""
        parts = [f"missing from the adapter: {self.missing[:5]}"] if self.missing else []
        parts += [f"not in the model: {self.unexpected[:5]}"] if self.unexpected else []
        parts += [f"{k}: {why}" for k, why in list(self.mismatched.items())[:5]]
        return "; ".join(parts)


@dataclass(frozen=True)
class SlotLimits:
    """What a serving pool's slots can hold, for :func:`check_fit`.

    Attributes:
        max_rank: The largest LoRA rank; smaller ranks are padded.
        full_layers: Paths of layers a slot can hold in full -> the largest
            output width (a classifier head's classes), or ``None`` where the
            shapes must be the model's own.
        width_fields: Config fields that only set those widths (tfimm's
            ``nb_classes``); they may differ when the adapter carries its head.
    """

    max_rank: int
    full_layers: dict = field(default_factory=dict)
    width_fields: tuple = ("nb_classes",)


@dataclass
class ModelSignature:
    """What an adapter is checked against, computed once per model.

    Attributes:
        identity: Architecture and base config.
        variables: ``key -> variable`` of the whole model.
        lora_layers: LoRA layer path -> ``{"type", "rank", "alpha", "scaling",
            "dora", "rslora"}``.
        lora_keys: Keys of the LoRA A/B variables (and DoRA magnitudes).
    """

    identity: BaseModelRecord
    variables: dict[str, tf.Variable]
    lora_layers: dict[str, dict]
    lora_keys: list[str]
    layer_objects: list = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, model) -> "ModelSignature":
        """The signature of a built, unmerged LoRA model.

        The layer tree is walked once per model (a built model's layers do
        not change); the merge state is checked on every call.

        Raises:
            LayerNotFoundError: If the model has no LoRA layers.
            MergeStateError: If it is merged.
        """
        signature = _SIGNATURES.get(model)
        if signature is None:
            selection = select_state(model, include_bias="none", extra_layers=[])
            signature = cls(
                identity=model_identity(model),
                variables=selection.model_variables,
                lora_layers=selection.layers,
                lora_keys=selection.lora_keys(),
                layer_objects=[layer for _, layer in lora_layers(model)],
            )
            _SIGNATURES[model] = signature
        merged = [layer.name for layer in signature.layer_objects if layer.merged]
        if merged:
            raise MergeStateError(
                f"LoRA layer '{merged[0]}' is merged; call unmerge_lora_weights(model) "
                "before saving or loading adapter state."
            )
        return signature


_SIGNATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _check_identity(
    ours: BaseModelRecord, theirs: BaseModelRecord, path: str, ignore: tuple = ()
) -> None:
    if ours.architecture != theirs.architecture:
        raise AdapterMismatchError(
            f"The adapter at {path} was trained on a {theirs.architecture} model; "
            f"this model is a {ours.architecture}."
        )
    theirs_config = theirs.config or {}
    differing = sorted(
        k
        for k in set(ours.config or {}) | set(theirs_config)
        if k not in ignore and (ours.config or {}).get(k) != theirs_config.get(k)
    )
    if ours.config is not None and (differing or theirs.config is None):
        details = ", ".join(
            f"{k}: adapter {theirs_config.get(k)!r} vs model {ours.config.get(k)!r}"
            for k in differing[:5]
        )
        raise AdapterMismatchError(
            f"The adapter at {path} was trained on another configuration of "
            f"{ours.architecture} ({details or 'the adapter records no configuration'})."
        )


def check_fit(
    signature: ModelSignature,
    config: AdapterConfig,
    path: str,
    *,
    strict: bool = True,
    slots: SlotLimits | None = None,
) -> LoadReport:
    """Checks whether an adapter fits a model, assigning nothing.

    Args:
        signature: The model's :class:`ModelSignature`.
        config: The adapter's config (its tensors agree with it: the reader
            checked that).
        path: The adapter's path, for messages.
        strict: Raise for any missing, unexpected or mismatched variable.
        slots: ``None``: the adapter must fit the model's own variables (its
            rank, scaling and shapes; DoRA layers where the model's are DoRA).
            :class:`SlotLimits`: it must fit a pool's slots: any rank up to
            ``max_rank`` with its own scaling (LoRA or rsLoRA), DoRA or plain
            LoRA on any subset of the LoRA layers (a DoRA magnitude has one
            value per output of its layer, in the layer's dtype), full layers
            only where the pool keeps them, a head up to its width.

    Returns:
        The :class:`LoadReport` of what would load.

    Raises:
        AdapterMismatchError: For another architecture or configuration, an
            adapter whose records contradict its tensors, and with ``strict``
            for any missing, unexpected or mismatched variable.
    """
    full = slots.full_layers if slots is not None else {}
    carries_head = any(
        key.rsplit("/", 1)[0] in full and full[key.rsplit("/", 1)[0]] for key in config.variables
    )
    ignore = slots.width_fields if slots is not None and carries_head else ()
    _check_identity(signature.identity, config.base_model, path, ignore)
    report = LoadReport()
    lora_keys = set(signature.lora_keys)
    for key, record in config.variables.items():
        var = signature.variables.get(key)
        layer_path = key.rsplit("/", 1)[0]
        lora = record.kind == KIND_LORA
        if slots is not None and var is None and lora and _is_magnitude(key, signature):
            # A pool serves DoRA on plain LoRA layers: the magnitude becomes a
            # per-slot output scale, one per output of the layer.
            reason = _magnitude_mismatch(signature, layer_path, record)
            if reason:
                report.mismatched[key] = reason
            else:
                report.loaded.append(key)
            continue
        if var is None or lora != (key in lora_keys):
            report.unexpected.append(key)
            continue
        lora_bias = layer_path in signature.lora_layers and key.endswith("/bias")
        if slots is not None and not lora and not lora_bias and layer_path not in full:
            report.mismatched[key] = (
                "a pool keeps per-adapter copies only of LoRA layers and of the layers "
                f"{sorted(full)} (AdapterPool(full_layers=...))"
            )
            continue
        reason = _shape_mismatch(tuple(var.shape), record.shape, key, slots, full.get(layer_path))
        if reason or var.dtype.name != record.dtype:
            report.mismatched[key] = (
                f"adapter {record.dtype}{list(record.shape)} vs model "
                f"{var.dtype.name}{list(var.shape)}{reason}"
            )
            continue
        report.loaded.append(key)
    if slots is None:
        for layer_path, layer in config.layers.items():
            ours = signature.lora_layers.get(layer_path)
            if ours is None:
                continue
            reasons = []
            if bool(ours.get("dora", False)) != layer.dora:
                reasons.append(_dora_mismatch(layer.dora))
            if not math.isclose(ours["scaling"], layer.scaling):
                reasons.append(
                    f"LoRA scaling adapter {layer.scaling} ({_scaling_rule(layer.rslora)}) vs "
                    f"model {ours['scaling']} ({_scaling_rule(ours.get('rslora', False))})"
                )
            if reasons:
                report.mismatched[layer_path] = "; ".join(reasons)
        report.missing = [k for k in signature.lora_keys if k not in config.variables]
    if strict and not report.complete:
        raise AdapterMismatchError(
            f"The adapter at {path} does not fit this model: {report.problems()}. "
            "Pass strict=False to load what fits."
        )
    return report


def _is_magnitude(key: str, signature: ModelSignature) -> bool:
    """Whether ``key`` is a DoRA magnitude of one of the model's LoRA layers."""
    layer_path, _, name = key.rpartition("/")
    return name == MAGNITUDE and layer_path in signature.lora_layers


def _magnitude_mismatch(signature: ModelSignature, layer_path: str, record) -> str:
    """Why a DoRA magnitude does not fit a pool's plain LoRA layer (``""`` if it does)."""
    b = signature.variables[f"{layer_path}/kernel_lora_b"]
    expected = (int(b.shape[-1]),)
    if record.shape != expected or record.dtype != b.dtype.name:
        return (
            f"DoRA magnitude {record.dtype}{list(record.shape)} vs the layer's "
            f"{b.dtype.name}{list(expected)} (one per output of the layer)"
        )
    return ""


def _dora_mismatch(adapter_dora: bool) -> str:
    if adapter_dora:
        return (
            "the adapter's layer is DoRA (it has a lora_magnitude) and the model's is plain "
            "LoRA: build the model with lora_use_dora=True, or serve it with an AdapterPool"
        )
    return (
        "the adapter's layer is plain LoRA and the model's is DoRA (lora_use_dora=True): "
        "build the model without DoRA"
    )


def _scaling_rule(rslora: bool) -> str:
    return "rsLoRA alpha/sqrt(rank)" if rslora else "alpha/rank"


def _shape_mismatch(ours: tuple, theirs: tuple, key: str, slots, width) -> str:
    """Why a stored shape does not fit (``""`` if it does)."""
    if slots is None:
        return "" if ours == theirs else " (shapes differ)"
    if len(ours) != len(theirs):
        return " (ranks of the arrays differ)"
    if key.endswith(("kernel_lora_a", "kernel_lora_b")):
        axis = len(ours) - 1 if key.endswith("kernel_lora_a") else 0
        if theirs[axis] > slots.max_rank:
            return f" (LoRA rank {theirs[axis]} is above the pool's max_rank={slots.max_rank})"
    elif width is not None and ours:
        axis = len(ours) - 1
        if theirs[axis] > width:
            return f" (width {theirs[axis]} is above the pool's max_classes={width})"
    else:
        return "" if ours == theirs else " (shapes differ)"
    same = all(x == y for i, (x, y) in enumerate(zip(ours, theirs, strict=True)) if i != axis)
    return "" if same else " (shapes differ)"


def check_base(signature: ModelSignature, config: AdapterConfig, path: str, cache=None) -> None:
    """Refuses an adapter trained on other base weights than the model has.

    Args:
        signature: The model's signature.
        config: The adapter's config.
        path: The adapter's path, for messages.
        cache: A dict to keep fingerprints in between calls (a pool's), keyed
            by the set of variables left out.

    Raises:
        BaseModelMismatchError: If the fingerprints differ.
    """
    excluded = frozenset(config.variables) | frozenset(signature.lora_keys)
    cache = {} if cache is None else cache
    if excluded not in cache:
        cache[excluded] = base_fingerprint(signature.variables, excluded)
    ours = cache[excluded]
    if ours != config.base_model.fingerprint:
        raise BaseModelMismatchError(
            f"The adapter at {path} was trained on other base weights "
            f"({config.base_model.fingerprint}) than this model has ({ours}). Load the base "
            "it was trained on, or pass check_base=False to load it anyway. (If "
            "fine-tuning changed state outside the adapter, such as BatchNorm "
            "statistics, save it with extra_layers.)"
        )
