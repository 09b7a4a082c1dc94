"""save_lora_state: write a model's adapter variables as an adapter directory."""

import datetime
import json
from collections.abc import Iterable

from .._tf import tf
from ..errors import CorruptAdapterError, LoRAConfigError
from ..selection import StateSelection, select_state
from ..version import __version__
from . import object_store
from .atomic import check_writable, write_directory_atomically
from .files import MAX_CONFIG_BYTES, file_record
from .fingerprint import base_fingerprint
from .fit import model_identity
from .format import (
    CHECKPOINT_ROOT,
    CONFIG_FILE,
    AdapterConfig,
    LayerRecord,
    SavedRecord,
    VariableRecord,
    checkpoint_files,
    nest_variables,
)


def build_config(model, selection: StateSelection, metadata: dict) -> AdapterConfig:
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
        path: The adapter directory (local, ``ram://``, ``gs://``, ...) or an
            object-storage URL (``s3://bucket/...``, through s3fs: see
            :mod:`lora_ckpt.state.object_store`), committed by one config write.
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
        StoreError: For an ``s3://`` path the object store cannot be reached at.
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
    config = build_config(model, selection, metadata)
    return commit_adapter(path, config, selection.variables, overwrite)


def commit_adapter(path: str, config: AdapterConfig, variables: dict, overwrite: bool) -> str:
    """Writes ``variables`` and their config as the adapter at ``path``, atomically.

    The one write path of ``save_lora_state`` and ``write_lora_state``: the
    checkpoint first, its file records and prefix into the config, the config
    checked against itself, then written last (the commit).

    Args:
        path: The adapter directory, or an object-storage URL.
        config: Its config; ``files``, ``checkpoint_prefix`` and
            ``format_version`` are set here.
        variables: Variable key -> ``tf.Variable``, the keys of ``config.variables``.
        overwrite: Replace an existing adapter at ``path``.

    Returns:
        ``path``.

    Raises:
        AdapterExistsError: If an adapter is at ``path`` and not ``overwrite``.
        LoRAConfigError: If the config contradicts itself (nothing is committed).
        StoreError: For an object store that cannot be reached.
    """
    remote = object_store.is_object_store(path)
    (object_store.check_writable if remote else check_writable)(path, overwrite)
    checkpoint = tf.train.Checkpoint(**{CHECKPOINT_ROOT: nest_variables(variables)})

    def write(directory: str, prefix: str) -> None:
        checkpoint.write(f"{directory}/{prefix}")
        config.checkpoint_prefix = prefix
        config.files = {
            name: file_record(f"{directory}/{name}") for name in checkpoint_files(prefix)
        }
        config.format_version = config.needed_version  # the version to_json writes
        text = config.to_json()
        # Exactly what every reader will check: nothing is committed that no
        # loader accepts (an error here removes the temporary directory).
        if len(text.encode("utf-8")) > MAX_CONFIG_BYTES:
            raise LoRAConfigError(
                f"The adapter's config would be {len(text.encode('utf-8'))} bytes, over the "
                f"{MAX_CONFIG_BYTES}-byte limit readers enforce; keep metadata small."
            )
        try:
            AdapterConfig.from_json(text, path)
        except CorruptAdapterError as exc:
            raise LoRAConfigError(f"The adapter to write would not read back: {exc}") from exc
        with tf.io.gfile.GFile(f"{directory}/{CONFIG_FILE}", "w") as handle:
            handle.write(text)

    if remote:
        # Saved locally the normal way, then uploaded: data first, the config last.
        object_store.save_via_local(
            path, lambda local: write_directory_atomically(local, write), overwrite
        )
    else:
        write_directory_atomically(path, write)
    return path
