"""The checks of :func:`lora_ckpt.state.combine_adapters` that need no tensor.

Its arguments, the user's metadata, and every refusal the inputs' configs
alone can tell (one base model, no DoRA, the same saved variables of one
shape and dtype, layer shapes, ranks): made before any tensor is read, so a
combination that cannot work costs the configs' reads only (40000 inputs
were once all read, 25 s and 1.4 GB, before their rank sum was refused).
Nothing here reads or writes storage.
"""

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import AdapterMismatchError, BaseModelMismatchError, LoRAConfigError
from .combine_factors import METHODS
from .files import MAX_CONFIG_BYTES
from .format import MAX_JSON_DEPTH, MAX_RANK, AdapterConfig, json_depth

__all__ = [
    "A_KEY",
    "B_KEY",
    "COMBINED_KEY",
    "Input",
    "MAX_INPUTS",
    "check_arguments",
    "check_configs",
    "check_json",
    "check_user_metadata",
    "full_keys",
    "lora_dtype",
]


COMBINED_KEY = "combined"
"""The metadata key under which a combined adapter records how it was made."""

MAX_INPUTS = 1024
"""The most adapters one :func:`~lora_ckpt.state.combine_adapters` call combines."""

A_KEY, B_KEY, MAGNITUDE_KEY = "kernel_lora_a", "kernel_lora_b", "lora_magnitude"
"""The names of a LoRA layer's variables in an adapter's variable keys."""

Input = tuple[str, AdapterConfig]
"""An input adapter as the checks see it: its path and its config."""


# ---- arguments ------------------------------------------------------------------------


def check_arguments(paths, weights, method: str, rank) -> tuple[list[str], list[float], int | None]:
    """Checks and normalises ``combine_adapters``' arguments.

    Args:
        paths: A sequence of adapter paths (not a single path).
        weights: One finite number per path.
        method: One of :data:`~lora_ckpt.state.combine_factors.METHODS`.
        rank: A positive integer up to ``MAX_RANK`` for ``"svd"``, else ``None``.

    Returns:
        ``(paths, weights, rank)``: the paths as strings without a trailing
        ``/``, the weights as floats, the rank as an ``int`` (or ``None``).

    Raises:
        LoRAConfigError: For any argument outside the above.
    """
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
    return paths, _check_weights(weights, len(paths)), _check_rank(rank, method)


def _check_weights(weights, count: int) -> list[float]:
    try:
        weights = list(weights)
    except TypeError:
        raise LoRAConfigError(f"weights must be a list of numbers, got {weights!r}.") from None
    if len(weights) != count:
        raise LoRAConfigError(
            f"{len(weights)} weights for {count} adapters; give one weight per adapter."
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
    return values


def _check_rank(rank, method: str) -> int | None:
    if method != "svd":
        if rank is not None:
            raise LoRAConfigError(
                f"rank applies only to method='svd'; method={method!r} sets the rank itself "
                "(cat: the sum of the ranks, linear: the inputs' rank). Leave rank out."
            )
        return None
    if rank is None:
        raise LoRAConfigError("method='svd' needs rank, the rank to truncate the sum to.")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise LoRAConfigError(f"rank must be a positive integer, got {rank!r}.")
    if rank > MAX_RANK:
        raise LoRAConfigError(f"rank {rank} is above the format's limit of {MAX_RANK}.")
    return int(rank)  # a numpy integer once broke the metadata's JSON


def check_user_metadata(metadata) -> dict:
    """Checks the metadata a caller asks to store in the combined adapter.

    Args:
        metadata: ``None`` or a JSON-serialisable mapping without the
            :data:`COMBINED_KEY` key.

    Returns:
        The metadata as a new dict (empty for ``None``).

    Raises:
        LoRAConfigError: If it is not a mapping, uses the reserved key, is not
            JSON, or is too deep or too large for a config a loader reads.
    """
    if metadata is not None and not isinstance(metadata, Mapping):
        raise LoRAConfigError(f"metadata must be a dict, got {type(metadata).__name__}.")
    metadata = dict(metadata or {})
    if COMBINED_KEY in metadata:
        raise LoRAConfigError(
            f"metadata[{COMBINED_KEY!r}] is where combine_adapters records how the adapter "
            "was made; use another key."
        )
    text = check_json(metadata, "metadata")
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


def check_json(value, what: str) -> str:
    """``value`` as JSON text, refusing what is not JSON, cyclic or too deep to read back.

    Args:
        value: The value to check.
        what: Its name, for messages.

    Returns:
        Its JSON text.

    Raises:
        LoRAConfigError: If it is not JSON-serialisable, is cyclic, or is
            nested deeper than ``MAX_JSON_DEPTH``.
    """
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


# ---- checks across inputs (configs only) ---------------------------------------------


def check_configs(inputs: Sequence[Input], method: str) -> None:
    """Every refusal the inputs' configs alone can tell.

    Args:
        inputs: ``(path, config)`` per input, in the order given.
        method: The combination method (its rank rules are checked).

    Raises:
        AdapterMismatchError: If the inputs were saved from different
            architectures or base configurations, a layer's type or shapes
            differ, or a bias or extra layer has different shapes.
        BaseModelMismatchError: If their base weights differ (fingerprints).
        LoRAConfigError: For DoRA inputs, biases or extra layers saved by
            some inputs only (or of different dtypes), LoRA tensors of
            different dtypes, unequal ranks of a layer for ``"linear"``, or a
            ``"cat"`` rank above ``MAX_RANK``.
    """
    _check_same_model(inputs)
    _refuse_dora(inputs)
    _check_same_saved(inputs)
    _check_same_fingerprint(inputs)
    _check_dtypes(inputs)
    _check_full_records(inputs)
    _check_layers(inputs, method)


def full_keys(config: AdapterConfig) -> list[str]:
    """The keys of an adapter's whole values (biases, extra layers), in config order.

    Args:
        config: The adapter's config.

    Returns:
        The keys of its variables whose kind is not ``"lora"``.
    """
    return [k for k, v in config.variables.items() if v.kind != "lora"]


def lora_dtype(inputs: Sequence[Input]) -> str:
    """The one dtype of the inputs' LoRA tensors (:func:`check_configs` made it one).

    Args:
        inputs: ``(path, config)`` per input.

    Returns:
        The dtype's name, such as ``"float32"``.
    """
    return next(config.variables[k].dtype for _, config in inputs for k in _lora_keys(config))


def _lora_keys(config: AdapterConfig) -> list[str]:
    return [k for k, v in config.variables.items() if v.kind == "lora"]


def _check_same_model(inputs: Sequence[Input]) -> None:
    first_path, first = inputs[0][0], inputs[0][1].base_model
    for path, config in inputs[1:]:
        base = config.base_model
        for name in ("architecture", "lora_architecture", "config"):
            if getattr(base, name) != getattr(first, name):
                theirs, ours = getattr(base, name), getattr(first, name)
                raise AdapterMismatchError(
                    f"{path} and {first_path} were saved from different models "
                    f"({name}: {theirs!r:.200} vs {ours!r:.200}); only adapters of one base "
                    "model can be combined."
                )


def _refuse_dora(inputs: Sequence[Input]) -> None:
    for path, config in inputs:
        dora = [layer for layer, record in config.layers.items() if record.dora]
        if dora:
            raise LoRAConfigError(
                f"{path} is a DoRA adapter (layer {dora[0]} has a {MAGNITUDE_KEY}): "
                "DoRA normalises each output by its magnitude, so its updates do not add up "
                "linearly and cannot be combined. Merge it into a base instead."
            )


def _check_same_saved(inputs: Sequence[Input]) -> None:
    (first_path, first), keys = inputs[0], set(full_keys(inputs[0][1]))
    for path, config in inputs[1:]:
        other = set(full_keys(config))
        if other != keys:
            # A value one input lacks is the base's there, which a combination
            # without the base cannot know.
            key = sorted(other ^ keys)[0]
            holder, lacker = (path, first_path) if key in other else (first_path, path)
            kind = (config if key in other else first).variables[key].kind
            raise LoRAConfigError(
                f"{key} ({kind}) is saved in {holder} but not in {lacker}: biases "
                "and extra layers are whole values, not updates, and cannot be combined "
                "without the base model. Combine adapters saved with the same include_bias "
                "and extra_layers."
            )
        if config.saved != first.saved:
            raise LoRAConfigError(
                f"{path} was saved with {config.saved}, {first_path} with {first.saved}; "
                "combine adapters saved with the same include_bias and extra_layers."
            )


def _check_same_fingerprint(inputs: Sequence[Input]) -> None:
    # Comparable only now: a fingerprint leaves out the adapter's own variables,
    # which _check_same_saved made the same set for all.
    first_path, first = inputs[0][0], inputs[0][1].base_model.fingerprint
    for path, config in inputs[1:]:
        fingerprint = config.base_model.fingerprint
        if fingerprint != first:
            raise BaseModelMismatchError(
                f"{path} was trained on other base weights ({fingerprint}) than "
                f"{first_path} ({first}); only adapters of one base model can be combined."
            )


def _check_dtypes(inputs: Sequence[Input]) -> None:
    holders: dict[str, str] = {}  # dtype -> the first input holding LoRA tensors of it
    for path, config in inputs:
        for key in _lora_keys(config):
            holders.setdefault(config.variables[key].dtype, path)
    if len(holders) != 1:
        raise LoRAConfigError(
            f"The inputs' LoRA tensors have different dtypes ({holders}); combine adapters "
            "of one dtype (save them again from models of one dtype)."
        )


def _check_full_records(inputs: Sequence[Input]) -> None:
    """Each whole value one shape, dtype and kind in every input: what a weighted
    sum of them needs (their values may differ; they are summed then)."""
    first_path, first = inputs[0]
    for key in full_keys(first):
        record = first.variables[key]
        for path, config in inputs[1:]:
            other = config.variables[key]
            if other.shape != record.shape:
                raise AdapterMismatchError(
                    f"{key} ({record.kind}) is {list(record.shape)} in {first_path} but "
                    f"{list(other.shape)} in {path}: values of different shapes (such as heads "
                    "for different numbers of classes) have no weighted sum. Combine adapters "
                    "whose biases and extra layers have one shape, or save them without that "
                    "layer (extra_layers / lora_train_classifier=False)."
                )
            if (other.dtype, other.kind) != (record.dtype, record.kind):
                raise LoRAConfigError(
                    f"{key} is a {record.dtype} {record.kind} in {first_path} but a "
                    f"{other.dtype} {other.kind} in {path}; combine adapters saved from models "
                    "of one dtype and with the same include_bias and extra_layers."
                )


def _check_layers(inputs: Sequence[Input], method: str) -> None:
    """Each layer one type and shape in all inputs, and the ranks the method can write."""
    shapes: dict[str, tuple] = {}  # layer -> (type, A's shape without rank, out, first holder)
    ranks: dict[str, list[tuple[str, int]]] = {}  # layer -> (input, rank) per input
    for source, config in inputs:
        for path, record in config.layers.items():
            a = config.variables[f"{path}/{A_KEY}"].shape
            b = config.variables[f"{path}/{B_KEY}"].shape
            ours = (record.type, tuple(a[:-1]), b[1])
            theirs = shapes.setdefault(path, (*ours, source))
            if ours != theirs[:3]:
                raise AdapterMismatchError(
                    f"Layer {path} is a {record.type} with A{list(a)}, B{list(b)} in "
                    f"{source}, but a {theirs[0]} with kernel {list(theirs[1])} and "
                    f"{theirs[2]} outputs in {theirs[3]}; the adapters do not belong to one "
                    "model."
                )
            ranks.setdefault(path, []).append((source, record.rank))
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
