"""combine_adapters: a new adapter from a weighted combination of saved ones.

PEFT's ``add_weighted_adapter``, done on the files: the inputs' configs are
read and checked against each other first (:mod:`.combine_checks`), then
their tensors are read one input at a time with the hardened reader
(:func:`lora_ckpt.state.read_lora_state`), combined in float64 numpy
(:mod:`.combine_factors`) and written as an ordinary adapter directory
through the same atomic commit as :func:`lora_ckpt.state.save_lora_state`,
so every loader (``load_lora_state``, ``read_lora_state``,
``inspect_adapter``, ``AdapterPool.load``) accepts it unchanged. No model is
built.

This module is the orchestration; every call into storage is in one small
private function of it (``_check_output_writable``, ``_read_input_config``,
``_read_input``, ``_same_adapter``, and ``write_lora_state``'s section).
"""

import datetime
import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from ..errors import AdapterExistsError
from ..storage import is_url
from ..version import __version__
from .atomic import check_writable
from .combine_checks import (
    A_KEY,
    B_KEY,
    COMBINED_KEY,
    MAX_INPUTS,
    Input,
    check_arguments,
    check_configs,
    check_user_metadata,
    full_keys,
    lora_dtype,
)
from .combine_factors import METHODS, FullValue, LayerTerms, Term, combine_layer
from .format import (
    AdapterConfig,
    LayerRecord,
    VariableRecord,
)
from .load import AdapterState, read_config, read_lora_state
from .save import write_lora_state

__all__ = ["COMBINED_KEY", "MAX_INPUTS", "METHODS", "combine_adapters", "write_lora_state"]

log = logging.getLogger("lora_ckpt.combine")


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

    Adapter ``i`` changes the kernel of each of its LoRA layers by
    ``delta_i = s_i * A_i @ B_i`` (``s_i`` its recorded scaling, including
    rsLoRA's ``alpha / sqrt(rank)``; for a Conv2D, ``A_i[kh, kw, in, r]``
    contracted on its last axis with ``B_i[r, out]``). A layer that an
    adapter does not hold is a zero update there. Every combined layer is
    written with ``alpha = rank``, so its scaling is exactly 1.0 (plain
    LoRA, never rsLoRA): the weights and the inputs' scalings are folded into
    the factors. Methods (``w_i`` the weights):

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

    Biases and full (extra) layers, such as a classifier head trained in
    full, are whole values that replace the base's, not updates. For every
    method, a value every input holds byte for byte is written as it is; a
    value that differs between inputs is written as the weighted sum
    ``sum_i w_i v_i`` of the inputs' values (computed in float64): an
    average when the weights add up to 1, scaled by their sum otherwise
    (logged as a warning). ``metadata["combined"]["summed_values"]`` lists
    the variables written as such sums. Values whose shapes differ (heads
    for different numbers of classes) are refused, and so is a bias or
    extra layer that only some inputs saved (the others use the base's,
    which a combination without the base cannot know). The base model
    record, bias mode and extra layers are the inputs' (which must agree);
    the labels are kept when every input has the same
    ``metadata["labels"]``. Everything is computed in float64 and written in
    the inputs' dtype.

    Every check the configs alone allow (input count, models, base
    fingerprints, DoRA, dtypes, saved variables and their shapes, layer
    shapes, ranks, metadata) is made after reading only the inputs' configs,
    before any tensor is read; the inputs are then read one at a time, and
    the checks are made again for an input whose config changed meanwhile.

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
            linearly), inputs of different dtypes, biases or extra layers
            saved by some inputs only, unequal ranks of a layer for
            ``"linear"``, a ``"cat"`` rank above ``MAX_RANK``, metadata that
            is not JSON or would make the config unreadable, or factors or
            summed values that overflow the dtype.
        AdapterMismatchError: If the inputs were saved from different
            architectures or base configurations, a layer's shapes differ,
            or a bias or extra layer has different shapes in two inputs.
        BaseModelMismatchError: If their base weights differ (fingerprints).
        AdapterExistsError: If ``out_path`` holds an adapter (or is one of
            the inputs) and not ``overwrite``, or holds foreign files.
        AdapterNotFoundError, CorruptAdapterError, AdapterVersionError: For
            an input that :func:`read_lora_state` refuses.
        StoreError: For an ``s3://`` path the object store cannot be reached at.
    """
    paths, weights, rank = check_arguments(paths, weights, method, rank)
    out_path = str(out_path).rstrip("/")
    metadata = check_user_metadata(metadata)
    for source in paths:
        if _same_adapter(source, out_path) and not overwrite:
            raise AdapterExistsError(
                f"The output {out_path} is one of the inputs; pass overwrite=True to replace "
                "it with the combination, or choose another path."
            )
    _check_output_writable(out_path, overwrite)

    # The configs first: everything they can refuse is refused before a tensor is read.
    inputs = [(path, _read_input_config(path)) for path in paths]
    check_configs(inputs, method)
    layers, full, dtype = _read_inputs(inputs, weights, method)
    configs = [config for _, config in inputs]

    tensors, records, errors = _combine_layers(layers, method, rank, dtype)
    del layers
    values, summed = _full_values(full, weights, out_path)
    del full

    combined = {
        "method": method,
        "sources": list(paths),
        "source_config_sha256": [c.json_sha256 for c in configs],
        "weights": list(weights),
        "rank": None,
        "summed_values": summed,
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
    config = _output_config(configs, records, tensors, values, metadata, combined)
    return write_lora_state(out_path, config, {**values, **tensors}, overwrite=overwrite)


def _full_values(
    full: dict[str, FullValue], weights: list[float], out_path: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The whole values to write, and the keys of those written as weighted sums."""
    values = {key: value.combined() for key, value in full.items()}
    summed = [key for key, value in full.items() if not value.identical]
    total = sum(weights)
    if summed and not math.isclose(total, 1.0):
        # Not refused: task arithmetic uses such weights on purpose. But a head
        # scaled by, say, 2 is rarely what was meant, so it is said.
        log.warning(
            "%s: the weights add up to %g, not 1, so the %d bias/extra variable(s) that "
            "differ between the inputs (%s, ...) are scaled by %g rather than averaged",
            out_path,
            total,
            len(summed),
            summed[0],
            total,
        )
    return values, summed


def _output_config(
    configs: list[AdapterConfig],
    records: dict[str, LayerRecord],
    tensors: dict[str, np.ndarray],
    values: dict[str, np.ndarray],
    metadata: dict,
    combined: dict,
) -> AdapterConfig:
    """The new adapter's config: the inputs' base and saved records, the new layers."""
    out_metadata = {}
    labels = [c.metadata.get("labels") for c in configs]
    if labels[0] is not None and all(label == labels[0] for label in labels):
        out_metadata["labels"] = labels[0]
    out_metadata.update(metadata)
    out_metadata[COMBINED_KEY] = combined

    first = configs[0]
    # Whole values keep their records: check_configs made shape, dtype and kind agree.
    variables = {key: first.variables[key] for key in values}
    variables.update(
        {key: VariableRecord(tuple(t.shape), t.dtype.name, "lora") for key, t in tensors.items()}
    )
    return AdapterConfig(
        base_model=first.base_model,
        saved=first.saved,
        layers=records,
        variables=variables,
        metadata=out_metadata,
        library_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _read_inputs(inputs: list[Input], weights: list[float], method: str):
    """Reads the inputs one at a time, keeping only their float64 factors and the
    running weighted sums of their whole values.

    ``inputs`` holds the configs the checks passed; an input whose config read
    with its tensors is another (it was replaced meanwhile) takes its place, and
    all the checks are made again.

    Returns:
        ``(layers, full, dtype)``: the layers' terms, the whole values (key ->
        :class:`FullValue`), and the LoRA tensors' dtype.
    """
    layers: dict[str, LayerTerms] = {}
    full: dict[str, FullValue] = {}
    for i, ((path, config), weight) in enumerate(zip(inputs, weights, strict=True)):
        state = _read_input(path)
        if state.config.json_sha256 != config.json_sha256:
            inputs[i] = (path, state.config)
            check_configs(inputs, method)
        for key in full_keys(state.config):
            value = state.tensors[key]
            if i == 0:
                full[key] = FullValue.start(key, weight, value)
            else:
                full[key].add(weight, value, state.path)
        _add_terms(layers, state, weight)
    return layers, full, np.dtype(lora_dtype(inputs))


def _add_terms(layers: dict[str, LayerTerms], state: AdapterState, weight: float) -> None:
    """Each of an input's layers as float64 factors (shapes agree: check_configs)."""
    for path, record in state.config.layers.items():
        a = state.tensors[f"{path}/{A_KEY}"]
        b = state.tensors[f"{path}/{B_KEY}"]
        layer = layers.setdefault(path, LayerTerms(record.type, a.shape[:-1], b.shape[1]))
        term = Term(
            weight=weight,
            scaling=record.scaling,
            a=a.astype(np.float64).reshape(-1, record.rank),
            b=b.astype(np.float64),
            source=state.path,
        )
        layer.terms.append(term)


def _combine_layers(layers: dict[str, LayerTerms], method: str, rank: int | None, dtype):
    """The new factors and layer records, and for svd each layer's relative error."""
    tensors, records, errors = {}, {}, {}
    for path, layer in layers.items():
        a, b, error = combine_layer(layer, method, rank, dtype, path)
        if error is not None:
            errors[path] = error
        r = b.shape[0]
        # alpha = rank: scaling is exactly 1.0, which the loader's exact check accepts.
        records[path] = LayerRecord(type=layer.type, rank=r, alpha=float(r), scaling=float(r) / r)
        tensors[f"{path}/{A_KEY}"], tensors[f"{path}/{B_KEY}"] = a, b
    return tensors, records, errors


# ---- storage: the calls the storage rewrite swaps ------------------------------------


def _same_adapter(a: str, b: str) -> bool:
    """Whether two paths name one adapter (the output must not silently be an input)."""
    if not is_url(a) and not is_url(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def _check_output_writable(path: str, overwrite: bool) -> None:
    """Refuses an output a commit would refuse, before any input is read."""
    check_writable(path, overwrite)


def _read_input_config(path: str) -> AdapterConfig:
    """An input's config alone, validated as the full read validates it."""
    return read_config(path)[1]


def _read_input(path: str) -> AdapterState:
    """An input's config and tensors, through the hardened reader."""
    # Looked up in this module's namespace at call time: tests replace it.
    return read_lora_state(path)
