"""combine_adapters: a new adapter from a weighted combination of saved ones.

PEFT's ``add_weighted_adapter``, done on the files: the inputs are read with
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

import datetime
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .._tf import tf
from ..errors import (
    AdapterExistsError,
    AdapterMismatchError,
    BaseModelMismatchError,
    LoRAConfigError,
)
from ..version import __version__
from . import object_store
from .atomic import check_writable
from .files import is_local
from .format import (
    MAX_RANK,
    AdapterConfig,
    LayerRecord,
    VariableRecord,
)
from .load import AdapterState, read_lora_state
from .save import commit_adapter

log = logging.getLogger("lora_ckpt.combine")

METHODS = ("cat", "linear", "svd")
"""The ways :func:`combine_adapters` combines adapters."""

COMBINED_KEY = "combined"
"""The metadata key under which a combined adapter records how it was made."""

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

    def update(self) -> np.ndarray:
        """The weighted sum of the inputs' updates, ``[rows, out]`` in float64."""
        return sum(t.weight * t.scaling * (t.a @ t.b) for t in self.terms)


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
    - ``"svd"``: the weighted sum of updates per layer (float64, reshaped to
      ``[prod(kernel dims but the last), out]``), truncated by SVD to
      ``min(rank, rows, out)``: ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``
      (a conv ``A`` reshaped back to ``[kh, kw, in, r]``). Singular values
      beyond the sum's own rank are zero and written as zero factors, so every
      layer whose shape allows it has rank ``rank``.

    Where the SVD error is reported: the relative Frobenius error of each
    layer, ``||D - A @ B||_F / ||D||_F`` with ``D`` the weighted sum and
    ``A``, ``B`` the factors as written (in the adapter's dtype), is stored
    in the new adapter's ``metadata["combined"]["svd_relative_error"]``
    (layer path -> error), its maximum in
    ``metadata["combined"]["max_svd_relative_error"]``; the maximum is also
    logged (logger ``lora_ckpt.combine``, level INFO). ``metadata["combined"]``
    records for every method the method, the source paths, the SHA-256 of
    their configs, the weights and the rank asked for.

    Biases and full (extra) layers are values, not updates: they cannot be
    combined without the base, so they are copied when every input holds
    byte-identical ones, and refused otherwise. The base model record, bias
    mode and extra layers are the inputs' (which must agree); the labels are
    kept when every input has the same ``metadata["labels"]``. The factors are
    computed in float64 and written in the inputs' dtype.

    Args:
        paths: The input adapters (directories, ``ram://`` or ``s3://`` URLs).
        weights: One finite weight per input.
        out_path: The new adapter's directory or URL.
        method: ``"cat"``, ``"linear"`` or ``"svd"``.
        rank: The rank to truncate to; required for ``"svd"`` and only there.
        overwrite: Replace an adapter at ``out_path`` (also one of the inputs:
            they are read in full before anything is written).
        metadata: JSON-serialisable dict stored in the new config, beside
            ``"combined"`` (a reserved key) and the kept labels.

    Returns:
        ``out_path``.

    Raises:
        LoRAConfigError: For an unknown method, no inputs, a weight count
            unlike the input count, non-finite weights, a missing or invalid
            ``rank`` for ``"svd"`` (or one given for another method), DoRA
            inputs (their magnitudes do not combine linearly), inputs of
            different dtypes, biases or extra layers that differ between
            inputs, unequal ranks of a layer for ``"linear"``, non-JSON
            metadata, or factors that overflow the dtype.
        AdapterMismatchError: If the inputs were saved from different
            architectures or base configurations, or a layer's shapes differ.
        BaseModelMismatchError: If their base weights differ (fingerprints).
        AdapterExistsError: If ``out_path`` holds an adapter (or is one of
            the inputs) and not ``overwrite``, or holds foreign files.
        AdapterNotFoundError, CorruptAdapterError, AdapterVersionError: For
            an input that :func:`read_lora_state` refuses.
        StoreError: For an ``s3://`` path the object store cannot be reached at.
    """
    paths, weights = _check_arguments(paths, weights, method, rank)
    out_path = str(out_path).rstrip("/")
    metadata = _user_metadata(metadata)
    remote = object_store.is_object_store(out_path)
    for source in paths:
        if _same_location(source, out_path) and not overwrite:
            raise AdapterExistsError(
                f"The output {out_path} is one of the inputs; pass overwrite=True to replace "
                "it with the combination, or choose another path."
            )
    (object_store.check_writable if remote else check_writable)(out_path, overwrite)

    states = [read_lora_state(p) for p in paths]
    _check_same_model(states)
    _refuse_dora(states)
    _check_same_saved(states)
    _check_same_fingerprint(states)
    dtype = _lora_dtype(states)
    full = _full_variables(states)
    layers = _layers(states, weights)

    tensors, records, errors = _combine_layers(layers, method, rank, dtype)
    combined = {
        "method": method,
        "sources": list(paths),
        "source_config_sha256": [s.config.json_sha256 for s in states],
        "weights": list(weights),
        "rank": rank,
    }
    if method == "svd":
        combined["svd_relative_error"] = errors
        combined["max_svd_relative_error"] = max(errors.values())
        log.info(
            "%s: rank-%d SVD of the weighted sum, max relative error %.3g (layer %s)",
            out_path,
            rank,
            combined["max_svd_relative_error"],
            max(errors, key=errors.get),
        )
    out_metadata = {}
    labels = [s.config.metadata.get("labels") for s in states]
    if labels[0] is not None and all(label == labels[0] for label in labels):
        out_metadata["labels"] = labels[0]
    out_metadata.update(metadata)
    out_metadata[COMBINED_KEY] = combined

    first = states[0].config
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
    checked for consistency before the atomic commit.

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
            JSON.
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
    try:
        json.dumps(config.metadata)
    except (TypeError, ValueError) as exc:
        raise LoRAConfigError(f"metadata must be JSON-serialisable: {exc}.") from exc
    variables = {key: tf.Variable(tensors[key], trainable=False) for key in config.variables}
    return commit_adapter(path, config, variables, overwrite)


# ---- arguments ------------------------------------------------------------------------


def _check_arguments(paths, weights, method, rank) -> tuple[list[str], list[float]]:
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
    try:
        weights = list(weights)
    except TypeError:
        raise LoRAConfigError(f"weights must be a list of numbers, got {weights!r}.") from None
    if len(weights) != len(paths):
        raise LoRAConfigError(
            f"{len(weights)} weights for {len(paths)} adapters; give one weight per adapter."
        )
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
            raise LoRAConfigError(f"weights[{i}] must be a number, got {w!r}.")
        if not math.isfinite(w):
            raise LoRAConfigError(f"weights[{i}] must be finite, got {w!r}.")
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
    return paths, [float(w) for w in weights]


def _user_metadata(metadata) -> dict:
    metadata = dict(metadata or {})
    if COMBINED_KEY in metadata:
        raise LoRAConfigError(
            f"metadata[{COMBINED_KEY!r}] is where combine_adapters records how the adapter "
            "was made; use another key."
        )
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise LoRAConfigError(f"metadata must be JSON-serialisable: {exc}.") from exc
    return metadata


def _same_location(a: str, b: str) -> bool:
    if is_local(a) and is_local(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


# ---- checks across inputs -------------------------------------------------------------


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


def _lora_dtype(states: list[AdapterState]) -> np.dtype:
    holders: dict[str, str] = {}  # dtype -> the first input holding LoRA tensors of it
    for state in states:
        for record in state.config.variables.values():
            if record.kind == "lora":
                holders.setdefault(record.dtype, state.path)
    if len(holders) != 1:
        raise LoRAConfigError(
            f"The inputs' LoRA tensors have different dtypes ({holders}); combine adapters "
            "of one dtype (save them again from models of one dtype)."
        )
    state = states[0]
    key = next(k for k, v in state.config.variables.items() if v.kind == "lora")
    return state.tensors[key].dtype


def _full_variables(states: list[AdapterState]) -> dict[str, np.ndarray]:
    """The biases and extra layers, identical in every input, to copy."""
    first = states[0]
    for key in sorted(_full_keys(first)):
        record, data = first.config.variables[key], first.tensors[key]
        for state in states[1:]:
            if state.config.variables[key] != record or state.tensors[key].tobytes() != (
                data.tobytes()
            ):
                raise LoRAConfigError(
                    f"{key} ({record.kind}) differs between {first.path} and {state.path}: "
                    "biases and extra layers are whole values, not updates, so no weighted "
                    "combination of them is what the weights mean without the base. Combine "
                    "adapters whose biases and extra layers are identical (for example trained "
                    "with lora_train_bias='none' and lora_train_classifier=False)."
                )
    return {key: first.tensors[key] for key in first.config.variables if key in _full_keys(first)}


def _layers(states: list[AdapterState], weights: list[float]) -> dict[str, _Layer]:
    layers: dict[str, _Layer] = {}
    for state, weight in zip(states, weights, strict=True):
        for path, record in state.config.layers.items():
            a = state.tensors[f"{path}/{_A}"]
            b = state.tensors[f"{path}/{_B}"]
            layer = layers.setdefault(path, _Layer(record.type, a.shape[:-1], b.shape[1]))
            if (record.type, a.shape[:-1], b.shape[1]) != (
                layer.type,
                layer.kernel_shape,
                layer.out,
            ):
                raise AdapterMismatchError(
                    f"Layer {path} is a {record.type} with A{list(a.shape)}, B{list(b.shape)} "
                    f"in {state.path}, but a {layer.type} with kernel {list(layer.kernel_shape)} "
                    f"and {layer.out} outputs in {layer.terms[0].source}; the adapters do not "
                    "belong to one model."
                )
            term = _Term(
                weight=weight,
                scaling=record.scaling,
                a=a.astype(np.float64).reshape(-1, record.rank),
                b=b.astype(np.float64),
                source=state.path,
            )
            layer.terms.append(term)
    return layers


# ---- the methods ------------------------------------------------------------------------


def _combine_layers(layers: dict[str, _Layer], method: str, rank: int | None, dtype: np.dtype):
    """The new factors and layer records, and for svd each layer's relative error."""
    tensors, records, errors = {}, {}, {}
    for path, layer in layers.items():
        if method == "cat":
            a, b = _cat(layer)
        elif method == "linear":
            a, b = _linear(path, layer)
        else:
            a, b = _svd(layer, rank)
        a = _cast(a.reshape(*layer.kernel_shape, a.shape[1]), dtype, path)
        b = _cast(b, dtype, path)
        if method == "svd":
            errors[path] = _relative_error(layer.update(), a.reshape(-1, a.shape[-1]), b)
        r = b.shape[0]
        if r > MAX_RANK:
            raise LoRAConfigError(
                f"Layer {path} would have rank {r}, above the format's limit of {MAX_RANK}; "
                "combine fewer adapters, or use method='svd' with a smaller rank."
            )
        # alpha = rank: scaling is exactly 1.0, which the loader's exact check accepts.
        records[path] = LayerRecord(type=layer.type, rank=r, alpha=float(r), scaling=float(r) / r)
        tensors[f"{path}/{_A}"], tensors[f"{path}/{_B}"] = a, b
    return tensors, records, errors


def _cat(layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
    a = np.concatenate([t.a for t in layer.terms], axis=1)
    b = np.concatenate([t.weight * t.scaling * t.b for t in layer.terms], axis=0)
    return a, b


def _linear(path: str, layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
    ranks = {t.source: t.rank for t in layer.terms}
    if len(set(ranks.values())) > 1:
        raise LoRAConfigError(
            f"method='linear' needs one rank per layer, but layer {path} has ranks {ranks}; "
            "use method='cat' (exact, ranks add up) or 'svd' (truncated to a rank you choose)."
        )
    coefficients = [math.sqrt(abs(t.weight) * t.scaling) for t in layer.terms]
    a = sum(c * t.a for c, t in zip(coefficients, layer.terms, strict=True))
    b = sum(
        math.copysign(c, t.weight) * t.b for c, t in zip(coefficients, layer.terms, strict=True)
    )
    return a, b


def _svd(layer: _Layer, rank: int) -> tuple[np.ndarray, np.ndarray]:
    a_cat, b_cat = _cat(layer)  # a_cat @ b_cat is the weighted sum, of rank <= sum r_i
    rows, out = a_cat.shape[0], b_cat.shape[1]
    # The SVD of the small core of two QRs instead of the full [rows, out] matrix:
    # a_cat @ b_cat = qa (ra rb^T) qb^T.
    qa, ra = np.linalg.qr(a_cat)
    qb, rb = np.linalg.qr(b_cat.T)
    u, s, vt = np.linalg.svd(ra @ rb.T)
    target = min(rank, rows, out)
    keep = min(target, len(s))
    root = np.sqrt(s[:keep])
    a = np.zeros((rows, target))
    b = np.zeros((target, out))
    a[:, :keep] = (qa @ u[:, :keep]) * root
    b[:keep] = root[:, None] * (vt[:keep] @ qb.T)
    return a, b


def _cast(values: np.ndarray, dtype: np.dtype, path: str) -> np.ndarray:
    cast = values.astype(dtype)
    if not np.isfinite(cast).all():
        raise LoRAConfigError(
            f"The combined factors of layer {path} do not fit {dtype.name} (they overflow); "
            "use smaller weights."
        )
    return cast


def _relative_error(update: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """``||D - A @ B||_F / ||D||_F`` in float64, of the factors as written."""
    residual = update - a.astype(np.float64) @ b.astype(np.float64)
    norm = float(np.linalg.norm(update))
    return float(np.linalg.norm(residual)) / norm if norm > 0 else 0.0
