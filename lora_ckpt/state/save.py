"""save_lora_state: write a model's adapter variables as an adapter directory."""

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Iterable

import numpy as np

from .._tf import tf
from ..errors import AdapterNotFoundError, CorruptAdapterError, LoRAConfigError
from ..selection import StateSelection, select_state
from ..version import __version__
from .atomic import begin_write, commit_files
from .checkpoint_bytes import checkpoint_bytes
from .combine_checks import check_json
from .files import MAX_CONFIG_BYTES
from .fingerprint import base_fingerprint
from .fit import model_identity
from .format import (
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    MAX_JSON_DEPTH,
    MAX_SAVE_VERSION,
    AdapterConfig,
    FileRecord,
    LayerRecord,
    SavedRecord,
    VariableRecord,
    checkpoint_files,
    json_depth,
)
from .load import read_config

__all__ = ["save_lora_state", "write_lora_state"]


def _build_config(model, selection: StateSelection, metadata: dict) -> AdapterConfig:
    """The adapter config for a selection (without the checkpoint file records)."""
    fingerprint = base_fingerprint(selection.model_variables, selection.variables)
    return AdapterConfig(
        base_model=model_identity(model, fingerprint),
        saved=SavedRecord(
            lora=True, bias=selection.bias, extra_layers=tuple(selection.extra_layers)
        ),
        layers={path: LayerRecord(**info) for path, info in selection.layers.items()},
        variables={
            key: VariableRecord(tuple(var.shape), var.dtype.name, selection.kinds[key])
            for key, var in selection.variables.items()
        },
        metadata=metadata,
        library_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _output_width(model) -> int | None:
    cfg = getattr(model, "cfg", None)
    if isinstance(getattr(cfg, "nb_classes", None), int):
        return cfg.nb_classes
    try:
        shape = model.output_shape
    except (AttributeError, RuntimeError):
        return None
    return int(shape[-1]) if isinstance(shape, tuple) and shape and shape[-1] else None


def save_lora_state(
    model: tf.keras.Model,
    path: str,
    *,
    include_bias: str | None = None,
    extra_layers: Iterable[str] | None = None,
    metadata: dict | None = None,
    labels=None,
    overwrite: bool = False,
) -> str:
    """Saves only a model's adapter variables, atomically, as a directory.

    Writes every LoRA ``A``/``B``, the biases of ``include_bias`` and all
    variables of ``extra_layers`` with ``tf.train.Checkpoint``, plus
    ``adapter_config.json``. Frozen base weights are never written; the
    config holds a fingerprint of them instead.

    Args:
        model: A built model with LoRA layers (not merged).
        path: The adapter directory or URL: local, or any store of
            :mod:`lora_ckpt.storage` (``s3://``, ``gs://``, ``az://``,
            ``memory://``), committed atomically either way.
        include_bias: ``"none"``, ``"lora_only"`` or ``"all"``; defaults to
            the model's ``lora_train_bias``.
        extra_layers: Layers saved in full, by path, name or glob pattern
            (a classifier head, BatchNorm layers whose moving statistics
            fine-tuning changed); defaults to the layers the architecture
            trains in full (its classifier, if ``lora_train_classifier``).
        metadata: JSON-serialisable dict stored in the config (task name,
            metrics, ...).
        labels: Class names, one per output of the model (stored as
            ``metadata["labels"]``; the HTTP service answers with them).
        overwrite: Replace an existing adapter at ``path``.

    Returns:
        ``path``.

    Raises:
        AdapterExistsError: If an adapter exists at ``path`` and not
            ``overwrite``, or ``path`` holds other files.
        LayerNotFoundError: If the model has no LoRA layers or an
            ``extra_layers`` pattern matches nothing.
        MergeStateError: If the model is merged.
        LoRAConfigError: For a bad bias mode or non-JSON metadata.
        StoreError: For a store that cannot be reached.
    """
    path = str(path).rstrip("/")
    metadata = dict(metadata or {})
    if labels is not None:
        labels = list(labels)
        if not all(isinstance(label, str) for label in labels):
            raise LoRAConfigError(f"labels must be strings, got {labels[:5]!r}.")
        width = _output_width(model)
        if width is not None and len(labels) != width:
            raise LoRAConfigError(
                f"{len(labels)} labels for a model with {width} outputs; give one per class."
            )
        metadata["labels"] = labels
    try:
        json.dumps(metadata)
    except TypeError as exc:
        raise LoRAConfigError(f"metadata must be JSON-serialisable: {exc}.") from exc
    selection = select_state(model, include_bias, extra_layers)
    config = _build_config(model, selection, metadata)
    return _commit_adapter(path, config, selection.variables, overwrite)


def _commit_adapter(path: str, config: AdapterConfig, variables: dict, overwrite: bool) -> str:
    """Writes ``variables`` and their config as the adapter at ``path``, atomically.

    The one write path of ``save_lora_state`` and ``write_lora_state``: the
    checkpoint is made in memory, its file records and prefix go into the
    config, the config is checked as every reader will check it, then the
    files go straight to the store and the config is written last (the
    commit). Nothing is written if a check fails.

    Args:
        path: The adapter directory or URL (any store).
        config: Its config; ``files``, ``checkpoint_prefix`` and
            ``format_version`` are set here.
        variables: Variable key -> ``tf.Variable``, the keys of ``config.variables``.
        overwrite: Replace an existing adapter at ``path``.

    Returns:
        ``path``.

    Raises:
        AdapterExistsError: If an adapter is at ``path`` and not ``overwrite``.
        LoRAConfigError: If the config contradicts itself (nothing is committed).
        StoreError: For a store that cannot be reached.
    """
    atomic = begin_write(path, overwrite)
    try:
        config.version = _next_version(path, atomic)
        prefix = atomic.fresh_name(CHECKPOINT_PREFIX)
        files = checkpoint_bytes(variables, prefix)
        config.checkpoint_prefix = prefix
        config.files = {
            name: FileRecord(size=len(data), sha256=hashlib.sha256(data).hexdigest())
            for name, data in files.items()
        }
        config.format_version = config.needed_version  # the version to_json writes
        text = _checked_json(config, path)
    except BaseException:
        atomic.abort()
        raise
    commit_files(atomic, files, text.encode("utf-8"))
    return path


def _next_version(path: str, atomic) -> int:
    """One more than the committed adapter's save counter, or 1 for a first save
    (or one over an adapter whose config no longer reads)."""
    if CONFIG_FILE not in atomic.existing:
        return 1
    try:
        return min(read_config(path)[1].version + 1, MAX_SAVE_VERSION)
    except (CorruptAdapterError, AdapterNotFoundError):
        return 1


def _checked_json(config: AdapterConfig, path: str) -> str:
    """The config's JSON, refused unless every reader would accept it."""
    text = config.to_json()
    size = len(text.encode("utf-8"))
    if size > MAX_CONFIG_BYTES:
        raise LoRAConfigError(
            f"The adapter's config would be {size} bytes, over the {MAX_CONFIG_BYTES}-byte "
            "limit readers enforce; keep metadata small."
        )
    try:
        AdapterConfig.from_json(text, path)
    except CorruptAdapterError as exc:
        raise LoRAConfigError(f"The adapter to write would not read back: {exc}") from exc
    return text


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
        path: The adapter directory or URL (any store).
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
        StoreError: For a store that cannot be reached.
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
    check_json(config.metadata, "metadata")
    _check_readable(config)
    variables = {key: tf.Variable(tensors[key], trainable=False) for key in config.variables}
    return _commit_adapter(path, config, variables, overwrite)


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
