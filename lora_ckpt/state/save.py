"""save_lora_state: write a model's adapter variables as an adapter directory."""

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Iterable

from .._tf import tf
from ..errors import LoRAConfigError
from ..registry import is_lora_architecture, lora_base_architecture
from ..version import __version__
from .atomic import check_writable, write_directory_atomically
from .format import (
    CHECKPOINT_PREFIX,
    CHECKPOINT_ROOT,
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    nest_variables,
)
from .selection import StateSelection, base_fingerprint, select_state

ADAPTER_FILES = {
    CONFIG_FILE,
    f"{CHECKPOINT_PREFIX}.index",
    f"{CHECKPOINT_PREFIX}.data-00000-of-00001",
}


def qualified_name(cls: type) -> str:
    """``module.ClassName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def model_identity(model) -> dict:
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
    return {
        "architecture": qualified_name(base_cls),
        "lora_architecture": qualified_name(cls),
        "config": config,
    }


def file_record(path: str) -> dict:
    """Size and SHA-256 of a file, as recorded in the adapter config."""
    digest = hashlib.sha256()
    size = 0
    with tf.io.gfile.GFile(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def build_config(model, selection: StateSelection, metadata: dict) -> dict:
    """The adapter config for a selection (without the checkpoint file records)."""
    identity = model_identity(model)
    identity["fingerprint"] = base_fingerprint(selection.model_variables, selection.variables)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": identity,
        "saved": {"lora": True, "bias": selection.bias, "extra_layers": selection.extra_layers},
        "layers": selection.layers,
        "variables": {
            key: {
                "shape": list(var.shape),
                "dtype": var.dtype.name,
                "kind": selection.kinds[key],
            }
            for key, var in selection.variables.items()
        },
        "checkpoint": {"prefix": CHECKPOINT_PREFIX, "files": {}},
        "metadata": metadata,
    }


def save_lora_state(
    model: tf.keras.Model,
    path: str,
    *,
    include_bias: str | None = None,
    extra_layers: Iterable[str] | None = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> str:
    """Saves only a model's adapter variables, atomically, as a directory.

    Writes every LoRA ``A``/``B``, the biases of ``include_bias`` and all
    variables of ``extra_layers`` with ``tf.train.Checkpoint``, plus
    ``adapter_config.json``. Frozen base weights are never written; the
    config holds a fingerprint of them instead.

    Args:
        model: A built model with LoRA layers (not merged).
        path: The adapter directory (local, ``ram://``, ``gs://``, ...).
        include_bias: ``"none"``, ``"lora_only"`` or ``"all"``; defaults to
            the model's ``lora_train_bias``.
        extra_layers: Layers saved in full, by path, name or glob pattern
            (a classifier head, BatchNorm layers whose moving statistics
            fine-tuning changed); defaults to the layers the architecture
            trains in full (its classifier, if ``lora_train_classifier``).
        metadata: JSON-serialisable dict stored in the config (task name,
            metrics, ...).
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
    """
    path = str(path).rstrip("/")
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except TypeError as exc:
        raise LoRAConfigError(f"metadata must be JSON-serialisable: {exc}.") from exc
    selection = select_state(model, include_bias, extra_layers)
    check_writable(path, overwrite, ADAPTER_FILES)
    config = build_config(model, selection, metadata)
    checkpoint = tf.train.Checkpoint(**{CHECKPOINT_ROOT: nest_variables(selection.variables)})

    def write(directory: str) -> None:
        checkpoint.write(f"{directory}/{CHECKPOINT_PREFIX}")
        files = config["checkpoint"]["files"]
        for name in sorted(tf.io.gfile.listdir(directory)):
            files[name] = file_record(f"{directory}/{name}")
        with tf.io.gfile.GFile(f"{directory}/{CONFIG_FILE}", "w") as handle:
            handle.write(json.dumps(config, indent=2, sort_keys=False) + "\n")

    write_directory_atomically(path, write)
    return path
