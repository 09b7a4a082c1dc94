"""The adapter directory format and the validation of its config.

::

    NAME/
      adapter_config.json            what was saved, for which base (below)
      adapter.index                  tf.train.Checkpoint index
      adapter.data-00000-of-00001    tf.train.Checkpoint data

Checkpoint keys are ``lora/<layer path>/<variable>/.ATTRIBUTES/VARIABLE_VALUE``,
for example ``lora/stages/0/blocks/1/mlp/fc1/kernel_lora_a/...``: the path of
the layer in the model, never an index or a runtime adapter name.
"""

import json
from typing import Any

from ..errors import AdapterVersionError, CorruptAdapterError

FORMAT_NAME = "lora_ckpt.adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
CHECKPOINT_PREFIX = "adapter"
CHECKPOINT_ROOT = "lora"
_KEY_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"

# field -> expected type(s), for the top level and for each nested record.
_SCHEMA = {
    "format": str,
    "format_version": int,
    "library_version": str,
    "created": str,
    "base_model": dict,
    "saved": dict,
    "layers": dict,
    "variables": dict,
    "checkpoint": dict,
    "metadata": dict,
}
_BASE_SCHEMA = {
    "architecture": str,
    "lora_architecture": str,
    "config": (dict, type(None)),
    "fingerprint": str,
}
_SAVED_SCHEMA = {"lora": bool, "bias": str, "extra_layers": list}
_LAYER_SCHEMA = {"type": str, "rank": int, "alpha": (int, float), "scaling": (int, float)}
_VARIABLE_SCHEMA = {"shape": list, "dtype": str, "kind": str}
_FILE_SCHEMA = {"size": int, "sha256": str}


def checkpoint_key(key: str) -> str:
    """The tf.train.Checkpoint key under which adapter variable ``key`` is stored."""
    return f"{CHECKPOINT_ROOT}/{key}{_KEY_SUFFIX}"


def nest_variables(variables: dict[str, Any]) -> dict[str, Any]:
    """Turns ``{"a/b/c": v}`` into ``{"a": {"b": {"c": v}}}`` for tf.train.Checkpoint,
    whose nested dicts become the readable ``/``-separated keys."""
    root: dict[str, Any] = {}
    for key, value in variables.items():
        *parents, leaf = key.split("/")
        node = root
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return root


def _check_record(record, schema, where: str) -> None:
    if not isinstance(record, dict):
        raise CorruptAdapterError(f"{where} must be a JSON object, got {type(record).__name__}.")
    for name, expected in schema.items():
        if name not in record:
            raise CorruptAdapterError(f"{where} lacks the field '{name}'.")
        value = record[name]
        if isinstance(value, bool) and expected in (int, (int, float)):
            raise CorruptAdapterError(f"{where}.{name} must be a number, got {value!r}.")
        if not isinstance(value, expected):
            raise CorruptAdapterError(
                f"{where}.{name} has type {type(value).__name__}, expected "
                f"{getattr(expected, '__name__', expected)}."
            )


def parse_config(text: str, path: str) -> dict:
    """Parses and validates ``adapter_config.json``.

    Args:
        text: The file's content.
        path: The adapter path, for messages.

    Returns:
        The config dict.

    Raises:
        CorruptAdapterError: If it is not JSON or lacks a field.
        AdapterVersionError: If it was written by a newer format version.
    """
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise CorruptAdapterError(f"{path}/{CONFIG_FILE} is not valid JSON: {exc}.") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise CorruptAdapterError(
            f"{path}/{CONFIG_FILE} is not a lora_ckpt adapter config (format field "
            f"is not {FORMAT_NAME!r})."
        )
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CorruptAdapterError(f"{path}: format_version must be an integer, got {version!r}.")
    if version != FORMAT_VERSION:
        raise AdapterVersionError(
            f"{path} uses adapter format version {version}; this lora_ckpt reads version "
            f"{FORMAT_VERSION}. "
            + ("Upgrade lora_ckpt to load it." if version > FORMAT_VERSION else "Re-save it.")
        )
    _check_record(config, _SCHEMA, "config")
    _check_record(config["base_model"], _BASE_SCHEMA, "config.base_model")
    _check_record(config["saved"], _SAVED_SCHEMA, "config.saved")
    for name, record in config["layers"].items():
        _check_record(record, _LAYER_SCHEMA, f"config.layers[{name!r}]")
    for name, record in config["variables"].items():
        _check_record(record, _VARIABLE_SCHEMA, f"config.variables[{name!r}]")
    files = config["checkpoint"].get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptAdapterError(f"{path}: config.checkpoint.files is missing or empty.")
    for name, record in files.items():
        _check_record(record, _FILE_SCHEMA, f"config.checkpoint.files[{name!r}]")
    return config
