"""combine_adapters: a new adapter from a weighted combination of saved ones.

PEFT's ``add_weighted_adapter``, done on the files: the inputs' configs are
read and checked against each other first, then their tensors are read with
the hardened reader (:func:`lora_ckpt.state.read_lora_state`), combined in
float64 numpy and written as an ordinary adapter directory through the same
atomic writer as :func:`lora_ckpt.state.save_lora_state`, so every loader
(``load_lora_state``, ``read_lora_state``, ``inspect_adapter``,
``AdapterPool.load``) accepts it unchanged. No model is built.

Adapter ``i`` changes the kernel of each of its LoRA layers by
``delta_i = scaling_i * A_i @ B_i`` (for a Conv2D, ``A_i[kh, kw, in, r]``
contracted on its last axis with ``B_i[r, out]``). A layer that an adapter
does not hold is a zero update there. Every combined layer is written with
``alpha = rank``, so its scaling is exactly 1.0 (plain LoRA, never rsLoRA):
the weights and the inputs' scalings are folded into the factors.
"""

import dataclasses
import datetime
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .._tf import tf
from ..errors import (
    AdapterExistsError,
    AdapterMismatchError,
    BaseModelMismatchError,
    LoRAConfigError,
)
from ..storage import is_url
from ..version import __version__
from .atomic import check_writable
from .files import MAX_CONFIG_BYTES
from .format import (
    CHECKPOINT_PREFIX,
    MAX_JSON_DEPTH,
    MAX_RANK,
    AdapterConfig,
    FileRecord,
    LayerRecord,
    VariableRecord,
    checkpoint_files,
    json_depth,
)
from .load import AdapterState, read_config, read_lora_state
from .save import commit_adapter

log = logging.getLogger("lora_ckpt.combine")

METHODS = ("cat", "linear", "svd")
"""The ways :func:`combine_adapters` combines adapters."""

COMBINED_KEY = "combined"
"""The metadata key under which a combined adapter records how it was made."""

MAX_INPUTS = 1024
"""The most adapters one :func:`combine_adapters` call combines."""

_A, _B, _MAGNITUDE = "kernel_lora_a", "kernel_lora_b", "lora_magnitude"


@dataclass
class _Term:
    """One input adapter's factors of one layer, as float64 matrices."""

    weight: float
    scaling: float
    a: np.ndarray  # [prod(kernel dims but the last), rank]
    b: np.ndarray  # [rank, out]
    source: str

    @property
    def rank(self) -> int:
        return self.b.shape[0]


@dataclass
class _Layer:
    """What the inputs hold for one LoRA layer path."""

    type: str
    kernel_shape: tuple[int, ...]  # A's shape without the rank axis
    out: int
    terms: list[_Term] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return math.prod(self.kernel_shape)

    @property
    def rank_sum(self) -> int:
        return sum(t.rank for t in self.terms)


def combine_adapters(
    paths: Sequence[str],
    weights: Sequence[float],
    out_path: str,
    method: str = "cat",
    rank: int | None = None,
    *,
    overwrite: bool = False,
    metadata: dict | None = None,
) -> str:
    """Writes a new adapter that combines saved adapters of one base model.

    Methods (``w_i`` the weights, ``s_i`` the recorded scalings, including
    rsLoRA's ``alpha / sqrt(rank)``):

    - ``"cat"``: concatenates the ranks: ``A = [A_1 .. A_n]``,
      ``B = [w_1 s_1 B_1; ..; w_n s_n B_n]``, rank ``sum r_i``. Its update
      is exactly the weighted sum of updates ``sum_i w_i delta_i``.
    - ``"linear"``: PEFT's linear combination of the factors, for inputs of
      equal rank at each layer: ``A = sum_i c_i A_i`` and
      ``B = sum_i sign(w_i) c_i B_i`` with ``c_i = sqrt(|w_i| s_i)``. Its
      update ``A @ B`` is NOT the weighted sum of updates: besides
      ``sum_i w_i delta_i`` it holds the cross terms
      ``c_i c_j sign(w_j) A_i B_j`` (i != j). It keeps the inputs' rank.
    - ``"svd"``: the weighted sum of updates per layer (viewed as
      ``[prod(kernel dims but the last), out]``), truncated by SVD:
      ``A = U_k sqrt(S_k)``, ``B = sqrt(S_k) V_k^T`` (a conv ``A`` reshaped
      back to ``[kh, kw, in, k]``). The sum is never formed: with the stacked
      factors ``P = [c_1 A_1 .. c_n A_n]`` and
      ``Q = [sign(w_1) c_1 B_1; ..]`` (so ``P @ Q`` is the sum), the SVD is
      that of the small core ``Rp @ Rq^T`` of the QRs of ``P`` and ``Q^T``,
      so memory and time follow the size of the inputs, not ``rows * out``.

    The rank of an svd layer: ``rank`` above the format's ``MAX_RANK`` is
    refused; below it, each layer gets ``k = min(rank, sum of the ranks the
    inputs hold at that layer, rows, out)``: a rank the sum cannot have is
    not padded with zero factors. ``metadata["combined"]["rank"]`` records
    the largest ``k`` written (the effective rank), ``["requested_rank"]``
    the ``rank`` asked for.

    Where the SVD error is reported: the relative Frobenius error of each
    layer, ``||D - A @ B||_F / ||D||_F`` with ``D`` the weighted sum and
    ``A``, ``B`` the factors as written (in the adapter's dtype, so the
    rounding to it is included), is stored in the new adapter's
    ``metadata["combined"]["svd_relative_error"]`` (layer path -> error),
    its maximum in ``metadata["combined"]["max_svd_relative_error"]``; the
    maximum is also logged (logger ``lora_ckpt.combine``, level INFO). It is
    computed from factors as well: ``D - A @ B = [P, A] @ [Q; -B]``, whose
    norm is that of the small product of the two stacked factors' QR ``R``s.
    ``metadata["combined"]`` records for every method the method, the source
    paths, the SHA-256 of their configs and the weights.

    Biases and full (extra) layers are values, not updates: they cannot be
    combined without the base, so they are copied when every input holds
    byte-identical ones, and refused otherwise. The base model record, bias
    mode and extra layers are the inputs' (which must agree); the labels are
    kept when every input has the same ``metadata["labels"]``. The factors are
    computed in float64 and written in the inputs' dtype.

    Every check the configs alone allow (input count, models, base
    fingerprints, DoRA, dtypes, saved variables, layer shapes, ranks,
    metadata) is made after reading only the inputs' configs, before any
    tensor is read; the checks are made again on the configs read with the
    tensors.

    Args:
        paths: The input adapters (directories, ``ram://`` or ``s3://`` URLs),
            at most :data:`MAX_INPUTS`.
        weights: One finite weight per input.
        out_path: The new adapter's directory or URL.
        method: ``"cat"``, ``"linear"`` or ``"svd"``.
        rank: The rank to truncate to; required for ``"svd"`` and only there.
        overwrite: Replace an adapter at ``out_path`` (also one of the inputs:
            they are read in full before anything is written).
        metadata: JSON-serialisable dict stored in the new config, beside
            ``"combined"`` (a reserved key) and the kept labels; it must
            leave the config readable (nested at most ``MAX_JSON_DEPTH``
            levels, at most 16 MiB).

    Returns:
        ``out_path``.

    Raises:
        LoRAConfigError: For an unknown method, no inputs or more than
            :data:`MAX_INPUTS`, a weight count unlike the input count,
            non-finite weights (or integers too large for a float), a
            missing or invalid ``rank`` for ``"svd"`` (or one given for
            another method), DoRA inputs (their magnitudes do not combine
            linearly), inputs of different dtypes, biases or extra layers that
            differ between inputs, unequal ranks of a layer for ``"linear"``,
            a ``"cat"`` rank above ``MAX_RANK``, metadata that is not JSON or
            would make the config unreadable, or factors that overflow the
            dtype.
        AdapterMismatchError: If the inputs were saved from different
            architectures or base configurations, or a layer's shapes differ.
        BaseModelMismatchError: If their base weights differ (fingerprints).
        AdapterExistsError: If ``out_path`` holds an adapter (or is one of
            the inputs) and not ``overwrite``, or holds foreign files.
        AdapterNotFoundError, CorruptAdapterError, AdapterVersionError: For
            an input that :func:`read_lora_state` refuses.
        StoreError: For an ``s3://`` path the object store cannot be reached at.
    """
    paths, weights, rank = _check_arguments(paths, weights, method, rank)
    out_path = str(out_path).rstrip("/")
    metadata = _user_metadata(metadata)
    for source in paths:
        if _same_location(source, out_path) and not overwrite:
            raise AdapterExistsError(
                f"The output {out_path} is one of the inputs; pass overwrite=True to replace "
                "it with the combination, or choose another path."
            )
    check_writable(out_path, overwrite)

    # The configs first: everything they can refuse is refused before a tensor is read.
    checked = [AdapterState(p, _read_config(p), {}) for p in paths]
    _check_configs(checked, method)
    layers, full, dtype = _read_inputs(checked, weights, method)
    configs = [state.config for state in checked]

    tensors, records, errors = _combine_layers(layers, method, rank, dtype)
    del layers
    combined = {
        "method": method,
        "sources": list(paths),
        "source_config_sha256": [c.json_sha256 for c in configs],
        "weights": list(weights),
        "rank": None,
    }
    if method == "svd":
        combined["rank"] = max(record.rank for record in records.values())
        combined["requested_rank"] = rank
        combined["svd_relative_error"] = errors
        combined["max_svd_relative_error"] = max(errors.values())
        log.info(
            "%s: rank-%d SVD of the weighted sum, max relative error %.3g (layer %s)",
            out_path,
            combined["rank"],
            combined["max_svd_relative_error"],
            max(errors, key=errors.get),
        )
    out_metadata = {}
    labels = [c.metadata.get("labels") for c in configs]
    if labels[0] is not None and all(label == labels[0] for label in labels):
        out_metadata["labels"] = labels[0]
    out_metadata.update(metadata)
    out_metadata[COMBINED_KEY] = combined

    first = configs[0]
    variables = {key: first.variables[key] for key in full}
    variables.update(
        {key: VariableRecord(tuple(t.shape), t.dtype.name, "lora") for key, t in tensors.items()}
    )
    config = AdapterConfig(
        base_model=first.base_model,
        saved=first.saved,
        layers=records,
        variables=variables,
        metadata=out_metadata,
        library_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return write_lora_state(out_path, config, {**full, **tensors}, overwrite=overwrite)


def write_lora_state(
    path: str, config: AdapterConfig, tensors: dict[str, np.ndarray], *, overwrite: bool = False
) -> str:
    """Writes an adapter from a config and numpy tensors: the inverse of
    :func:`lora_ckpt.state.read_lora_state`, with no model involved.

    The checkpoint is written as ``save_lora_state`` writes it, the file
    records (size, SHA-256) and prefix are filled in, and the whole config is
    checked for consistency before the atomic commit. A config that no
    loader would read back (nested deeper than ``MAX_JSON_DEPTH`` levels or
    larger than 16 MiB, through its metadata) is refused before anything is
    written.

    Args:
        path: The adapter directory (local, ``ram://``, ...) or an ``s3://`` URL.
        config: The config to write; its ``files``, ``checkpoint_prefix``
            and ``format_version`` are set here.
        tensors: Variable key -> array, exactly the keys, shapes and dtypes of
            ``config.variables``.
        overwrite: Replace an existing adapter at ``path``.

    Returns:
        ``path``.

    Raises:
        LoRAConfigError: If the tensors do not match the config, a tensor is
            not finite, the config contradicts itself, or its metadata is not
            JSON or makes the config unreadable.
        AdapterExistsError: If an adapter is at ``path`` and not
            ``overwrite``, or ``path`` holds other files.
        StoreError: For an ``s3://`` path the object store cannot be reached at.
    """
    path = str(path).rstrip("/")
    if set(tensors) != set(config.variables):
        raise LoRAConfigError(
            f"The tensors {sorted(set(tensors) ^ set(config.variables))[:3]} are not both in "
            "the config's variables and in the tensors given; give one tensor per variable."
        )
    for key, record in config.variables.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != record.shape or tensor.dtype.name != record.dtype:
            raise LoRAConfigError(
                f"Tensor {key} is {tensor.dtype.name}{list(tensor.shape)}, the config says "
                f"{record.dtype}{list(record.shape)}."
            )
        if tensor.dtype.kind in "fc" and not np.isfinite(tensor).all():
            raise LoRAConfigError(f"Tensor {key} holds NaN or infinite values; no loader reads it.")
    _check_json(config.metadata, "metadata")
    _check_readable(config)
    variables = {key: tf.Variable(tensors[key], trainable=False) for key in config.variables}
    return commit_adapter(path, config, variables, overwrite)


# ---- arguments ------------------------------------------------------------------------


def _check_arguments(paths, weights, method, rank) -> tuple[list[str], list[float], int | None]:
    if method not in METHODS:
        raise LoRAConfigError(f"Unknown combination method {method!r}; choose one of {METHODS}.")
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise LoRAConfigError(
            f"paths must be a list of adapter paths, got the single path {paths!r}; "
            "wrap it in a list."
        )
    paths = [str(p).rstrip("/") for p in paths]
    if not paths:
        raise LoRAConfigError("combine_adapters needs at least one adapter path.")
    if len(paths) > MAX_INPUTS:
        raise LoRAConfigError(
            f"{len(paths)} adapters to combine; combine_adapters takes at most {MAX_INPUTS} "
            "(combine them in groups, then combine the groups)."
        )
    try:
        weights = list(weights)
    except TypeError:
        raise LoRAConfigError(f"weights must be a list of numbers, got {weights!r}.") from None
    if len(weights) != len(paths):
        raise LoRAConfigError(
            f"{len(weights)} weights for {len(paths)} adapters; give one weight per adapter."
        )
    values = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
            raise LoRAConfigError(f"weights[{i}] must be a number, got {w!r}.")
        try:
            value = float(w)
        except OverflowError:  # a Python int beyond the float range
            value = math.inf
        if not math.isfinite(value):
            raise LoRAConfigError(f"weights[{i}] must be finite, got {w!r:.40}.")
        values.append(value)
    if method == "svd":
        if rank is None:
            raise LoRAConfigError("method='svd' needs rank, the rank to truncate the sum to.")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
            raise LoRAConfigError(f"rank must be a positive integer, got {rank!r}.")
        if rank > MAX_RANK:
            raise LoRAConfigError(f"rank {rank} is above the format's limit of {MAX_RANK}.")
        rank = int(rank)
    elif rank is not None:
        raise LoRAConfigError(
            f"rank applies only to method='svd'; method={method!r} sets the rank itself "
            "(cat: the sum of the ranks, linear: the inputs' rank). Leave rank out."
        )
    return paths, values, rank


def _user_metadata(metadata) -> dict:
    if metadata is not None and not isinstance(metadata, Mapping):
        raise LoRAConfigError(f"metadata must be a dict, got {type(metadata).__name__}.")
    metadata = dict(metadata or {})
    if COMBINED_KEY in metadata:
        raise LoRAConfigError(
            f"metadata[{COMBINED_KEY!r}] is where combine_adapters records how the adapter "
            "was made; use another key."
        )
    text = _check_json(metadata, "metadata")
    # The config holds the metadata one level down: {"metadata": {...}}.
    if 1 + json_depth(metadata) > MAX_JSON_DEPTH:
        raise LoRAConfigError(
            f"metadata is nested {json_depth(metadata)} levels deep; an adapter config may be "
            f"nested {MAX_JSON_DEPTH} levels, so metadata at most {MAX_JSON_DEPTH - 1}."
        )
    if len(text.encode("utf-8")) > MAX_CONFIG_BYTES:
        raise LoRAConfigError(
            f"metadata takes {len(text.encode('utf-8'))} bytes as JSON; an adapter config may "
            f"take {MAX_CONFIG_BYTES}. Keep large data out of the metadata."
        )
    return metadata


def _check_json(value, what: str) -> str:
    """``value`` as JSON text, refusing what is not JSON, cyclic or too deep to read back."""
    try:
        text = json.dumps(value)  # first: it refuses cycles, which json_depth would follow
    except RecursionError:
        text = None
    except (TypeError, ValueError) as exc:
        raise LoRAConfigError(f"{what} must be JSON-serialisable: {exc}.") from exc
    if text is None or json_depth(value) > MAX_JSON_DEPTH:
        raise LoRAConfigError(
            f"{what} is nested deeper than {MAX_JSON_DEPTH} levels; no loader reads it back."
        )
    return text


def _check_readable(config: AdapterConfig) -> None:
    """Refuses a config the loaders would refuse for its depth or size, before a write.

    Measured with the largest file records and checkpoint prefix a commit
    can fill in, so the config written is never larger than this one.
    """
    prefix = f"{CHECKPOINT_PREFIX}-{'f' * 32}"
    probe = dataclasses.replace(
        config,
        checkpoint_prefix=prefix,
        files={name: FileRecord(1 << 63, "f" * 64) for name in checkpoint_files(prefix)},
    )
    if json_depth(probe.to_dict()) > MAX_JSON_DEPTH:
        raise LoRAConfigError(
            f"The adapter config would be nested deeper than {MAX_JSON_DEPTH} levels (through "
            "its metadata); no loader would read it. Flatten the metadata."
        )
    size = len(probe.to_json().encode("utf-8"))
    if size > MAX_CONFIG_BYTES:
        raise LoRAConfigError(
            f"The adapter config would take {size} bytes, above the {MAX_CONFIG_BYTES} a "
            "loader reads; keep large data out of the metadata."
        )


def _same_location(a: str, b: str) -> bool:
    if not is_url(a) and not is_url(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def _read_config(path: str) -> AdapterConfig:
    """An input's config alone, validated as the full read validates it."""
    return read_config(path)[1]


# ---- checks across inputs (configs only) ---------------------------------------------


def _check_configs(states: list[AdapterState], method: str) -> None:
    """Every refusal the configs alone can tell; ``states`` may hold no tensors."""
    _check_same_model(states)
    _refuse_dora(states)
    _check_same_saved(states)
    _check_same_fingerprint(states)
    _check_dtypes(states)
    _check_full_records(states)
    _check_layers(states, method)


def _check_same_model(states: list[AdapterState]) -> None:
    first = states[0].config.base_model
    for state in states[1:]:
        base = state.config.base_model
        for name in ("architecture", "lora_architecture", "config"):
            if getattr(base, name) != getattr(first, name):
                theirs, ours = getattr(base, name), getattr(first, name)
                raise AdapterMismatchError(
                    f"{state.path} and {states[0].path} were saved from different models "
                    f"({name}: {theirs!r:.200} vs {ours!r:.200}); only adapters of one base "
                    "model can be combined."
                )


def _refuse_dora(states: list[AdapterState]) -> None:
    for state in states:
        dora = [path for path, layer in state.config.layers.items() if layer.dora]
        if dora:
            raise LoRAConfigError(
                f"{state.path} is a DoRA adapter (layer {dora[0]} has a {_MAGNITUDE}): "
                "DoRA normalises each output by its magnitude, so its updates do not add up "
                "linearly and cannot be combined. Merge it into a base instead."
            )


def _full_keys(state: AdapterState) -> set[str]:
    return {k for k, v in state.config.variables.items() if v.kind != "lora"}


def _lora_keys(state: AdapterState):
    return (k for k, v in state.config.variables.items() if v.kind == "lora")


def _check_same_saved(states: list[AdapterState]) -> None:
    first, keys = states[0], _full_keys(states[0])
    for state in states[1:]:
        other = _full_keys(state)
        if other != keys:
            key = sorted(other ^ keys)[0]
            holder, lacker = (state, first) if key in other else (first, state)
            kind = holder.config.variables[key].kind
            raise LoRAConfigError(
                f"{key} ({kind}) is saved in {holder.path} but not in {lacker.path}: biases "
                "and extra layers are whole values, not updates, and cannot be combined "
                "without the base model. Combine adapters saved with the same include_bias "
                "and extra_layers."
            )
        if state.config.saved != first.config.saved:
            raise LoRAConfigError(
                f"{state.path} was saved with {state.config.saved}, {first.path} with "
                f"{first.config.saved}; combine adapters saved with the same include_bias and "
                "extra_layers."
            )


def _check_same_fingerprint(states: list[AdapterState]) -> None:
    # Comparable only now: a fingerprint leaves out the adapter's own variables,
    # which _check_same_saved made the same set for all.
    first = states[0]
    for state in states[1:]:
        if state.fingerprint != first.fingerprint:
            raise BaseModelMismatchError(
                f"{state.path} was trained on other base weights ({state.fingerprint}) than "
                f"{first.path} ({first.fingerprint}); only adapters of one base model can be "
                "combined."
            )


def _check_dtypes(states: list[AdapterState]) -> None:
    holders: dict[str, str] = {}  # dtype -> the first input holding LoRA tensors of it
    for state in states:
        for key in _lora_keys(state):
            holders.setdefault(state.config.variables[key].dtype, state.path)
    if len(holders) != 1:
        raise LoRAConfigError(
            f"The inputs' LoRA tensors have different dtypes ({holders}); combine adapters "
            "of one dtype (save them again from models of one dtype)."
        )


def _differing_full(key: str, kind: str, first: str, other: str) -> LoRAConfigError:
    return LoRAConfigError(
        f"{key} ({kind}) differs between {first} and {other}: biases and extra layers are "
        "whole values, not updates, so no weighted combination of them is what the weights "
        "mean without the base. Combine adapters whose biases and extra layers are identical "
        "(for example trained with lora_train_bias='none' and lora_train_classifier=False)."
    )


def _check_full_records(states: list[AdapterState]) -> None:
    first = states[0]
    for key in sorted(_full_keys(first)):
        record = first.config.variables[key]
        for state in states[1:]:
            if state.config.variables[key] != record:
                raise _differing_full(key, record.kind, first.path, state.path)


def _check_layers(states: list[AdapterState], method: str) -> None:
    """Each layer one type and shape in all inputs, and the ranks the method can write."""
    shapes: dict[str, tuple] = {}  # layer -> (type, A's shape without rank, out, first holder)
    ranks: dict[str, list[tuple[str, int]]] = {}  # layer -> (input, rank) per input
    for state in states:
        for path, record in state.config.layers.items():
            a = state.config.variables[f"{path}/{_A}"].shape
            b = state.config.variables[f"{path}/{_B}"].shape
            ours = (record.type, tuple(a[:-1]), b[1])
            theirs = shapes.setdefault(path, (*ours, state.path))
            if ours != theirs[:3]:
                raise AdapterMismatchError(
                    f"Layer {path} is a {record.type} with A{list(a)}, B{list(b)} in "
                    f"{state.path}, but a {theirs[0]} with kernel {list(theirs[1])} and "
                    f"{theirs[2]} outputs in {theirs[3]}; the adapters do not belong to one "
                    "model."
                )
            ranks.setdefault(path, []).append((state.path, record.rank))
    for path, by_input in ranks.items():
        if method == "linear" and len({r for _, r in by_input}) > 1:
            raise LoRAConfigError(
                f"method='linear' needs one rank per layer, but layer {path} has ranks "
                f"{dict(by_input)}; use method='cat' (exact, ranks add up) or 'svd' (truncated "
                "to a rank you choose)."
            )
        total = sum(r for _, r in by_input)
        if method == "cat" and total > MAX_RANK:
            raise LoRAConfigError(
                f"Layer {path} would have rank {total}, above the format's limit of "
                f"{MAX_RANK}; combine fewer adapters, or use method='svd' with a smaller rank."
            )


# ---- the tensors ------------------------------------------------------------------------


def _read_inputs(checked: list[AdapterState], weights: list[float], method: str):
    """Reads the inputs one at a time, keeping only their float64 factors (and the
    first one's biases and extra layers, compared with every other's).

    ``checked`` holds the configs the checks passed; an input whose config read
    with its tensors is another (it was replaced meanwhile) takes its place, and
    all the checks are made again.

    Returns:
        ``(layers, full, dtype)``: the layers' terms, the variables to copy, and
        the LoRA tensors' dtype.
    """
    layers: dict[str, _Layer] = {}
    full: dict[str, np.ndarray] = {}
    dtype = None
    for i, (source, weight) in enumerate(zip(checked, weights, strict=True)):
        state = read_lora_state(source.path)
        if state.config.json_sha256 != source.config.json_sha256:
            checked[i] = AdapterState(source.path, state.config, {})
            _check_configs(checked, method)
        if i == 0:
            full = {key: state.tensors[key] for key in _full_keys_in_order(state)}
            dtype = state.tensors[next(_lora_keys(state))].dtype
        else:
            for key, data in full.items():
                if state.tensors[key].tobytes() != data.tobytes():
                    kind = state.config.variables[key].kind
                    raise _differing_full(key, kind, checked[0].path, state.path)
        _add_terms(layers, state, weight)
    return layers, full, dtype


def _full_keys_in_order(state: AdapterState) -> list[str]:
    return [k for k, v in state.config.variables.items() if v.kind != "lora"]


def _add_terms(layers: dict[str, _Layer], state: AdapterState, weight: float) -> None:
    """Each of an input's layers as float64 factors (shapes agree: _check_layers)."""
    for path, record in state.config.layers.items():
        a = state.tensors[f"{path}/{_A}"]
        b = state.tensors[f"{path}/{_B}"]
        layer = layers.setdefault(path, _Layer(record.type, a.shape[:-1], b.shape[1]))
        term = _Term(
            weight=weight,
            scaling=record.scaling,
            a=a.astype(np.float64).reshape(-1, record.rank),
            b=b.astype(np.float64),
            source=state.path,
        )
        layer.terms.append(term)


# ---- the methods ------------------------------------------------------------------------


def _combine_layers(layers: dict[str, _Layer], method: str, rank: int | None, dtype: np.dtype):
    """The new factors and layer records, and for svd each layer's relative error."""
    tensors, records, errors = {}, {}, {}
    for path, layer in layers.items():
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused by _cast
            if method == "cat":
                a, b = _cat(layer)
            elif method == "linear":
                a, b = _linear(layer)
            else:
                a, b = _svd(layer, rank, path)
            a = _cast(a.reshape(*layer.kernel_shape, a.shape[1]), dtype, path)
            b = _cast(b, dtype, path)
            if method == "svd":
                errors[path] = _relative_error(layer, a.reshape(-1, a.shape[-1]), b, path)
        r = b.shape[0]
        # alpha = rank: scaling is exactly 1.0, which the loader's exact check accepts.
        records[path] = LayerRecord(type=layer.type, rank=r, alpha=float(r), scaling=float(r) / r)
        tensors[f"{path}/{_A}"], tensors[f"{path}/{_B}"] = a, b
    return tensors, records, errors


def _cat(layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
    a = np.concatenate([t.a for t in layer.terms], axis=1)
    b = np.concatenate([t.weight * t.scaling * t.b for t in layer.terms], axis=0)
    return a, b


def _linear(layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
    coefficients = [math.sqrt(abs(t.weight) * t.scaling) for t in layer.terms]
    a = sum(c * t.a for c, t in zip(coefficients, layer.terms, strict=True))
    b = sum(
        math.copysign(c, t.weight) * t.b for c, t in zip(coefficients, layer.terms, strict=True)
    )
    return a, b


def _stacked(layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
    """``P [rows, R]`` and ``Q [R, out]`` with ``P @ Q`` the weighted sum, the weight
    split evenly between them (``c_i = sqrt(|w_i| s_i)``) to keep both in range."""
    coefficients = [math.sqrt(abs(t.weight) * t.scaling) for t in layer.terms]
    p = np.concatenate([c * t.a for c, t in zip(coefficients, layer.terms, strict=True)], axis=1)
    q = np.concatenate(
        [math.copysign(c, t.weight) * t.b for c, t in zip(coefficients, layer.terms, strict=True)],
        axis=0,
    )
    return p, q


def _small_product(p: np.ndarray, q: np.ndarray, path: str):
    """``P @ Q = Qp (Rp Rq^T) Qq^T``: the two orthonormal factors and the small core."""
    qp, rp = np.linalg.qr(p)  # reduced: rp is [min(rows, R), R]
    qq, rq = np.linalg.qr(q.T)  # rq is [min(out, R), R]
    core = rp @ rq.T
    if not np.isfinite(core).all():
        raise _overflow(path, "float64")
    return qp, core, qq


def _svd(layer: _Layer, rank: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    p, q = _stacked(layer)
    keep = min(rank, p.shape[1], layer.rows, layer.out)  # no padding beyond the sum's rank
    qp, core, qq = _small_product(p, q, path)
    u, s, vt = np.linalg.svd(core)
    root = np.sqrt(s[:keep])
    return (qp @ u[:, :keep]) * root, root[:, None] * (vt[:keep] @ qq.T)


def _overflow(path: str, dtype: str) -> LoRAConfigError:
    return LoRAConfigError(
        f"The combined factors of layer {path} do not fit {dtype} (they overflow); "
        "use smaller weights."
    )


def _cast(values: np.ndarray, dtype: np.dtype, path: str) -> np.ndarray:
    cast = values.astype(dtype)
    if not np.isfinite(cast).all():
        raise _overflow(path, dtype.name)
    return cast


def _relative_error(layer: _Layer, a: np.ndarray, b: np.ndarray, path: str) -> float:
    """``||D - A @ B||_F / ||D||_F`` in float64, of the factors as written, from factors:
    ``D - A @ B = [P, A] @ [Q; -B]``, of the norm of its small QR core."""
    p, q = _stacked(layer)
    a, b = a.astype(np.float64), b.astype(np.float64)
    norm = np.linalg.norm(_small_product(p, q, path)[1])
    if norm == 0:
        return 0.0
    residual = _small_product(np.concatenate([p, a], axis=1), np.concatenate([q, -b]), path)[1]
    return float(np.linalg.norm(residual) / norm)
