"""The adapter directory format, and its config as a typed, validated record.

::

    NAME/
      adapter_config.json            what was saved, for which base (below)
      adapter.index                  tf.train.Checkpoint index
      adapter.data-00000-of-00001    tf.train.Checkpoint data

Checkpoint keys are ``lora/<layer path>/<variable>/.ATTRIBUTES/VARIABLE_VALUE``,
for example ``lora/stages/0/blocks/1/mlp/fc1/kernel_lora_a/...``: the path of
the layer in the model, never an index or a runtime adapter name.

:class:`AdapterConfig` is ``adapter_config.json`` as Python objects: every
reader goes through :meth:`AdapterConfig.from_json`, which checks the type of
every field, so no caller indexes raw JSON.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import AdapterVersionError, CorruptAdapterError

FORMAT_NAME = "lora_ckpt.adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
CHECKPOINT_PREFIX = "adapter"
CHECKPOINT_ROOT = "lora"
_KEY_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


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


class _Fields:
    """Typed access to one JSON object, raising CorruptAdapterError with its place."""

    def __init__(self, record: Any, where: str):
        if not isinstance(record, dict):
            raise CorruptAdapterError(
                f"{where} must be a JSON object, got {type(record).__name__}."
            )
        self.record, self.where = record, where

    def get(self, name: str, kind: type | tuple, optional: bool = False) -> Any:
        if name not in self.record:
            if optional:
                return None
            raise CorruptAdapterError(f"{self.where} lacks the field '{name}'.")
        value = self.record[name]
        if value is None and optional:
            return None
        # JSON has one number type; bool is an int to Python but never a number here.
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = getattr(kind, "__name__", None) or " or ".join(k.__name__ for k in kind)
            raise CorruptAdapterError(
                f"{self.where}.{name} must be {expected}, got {type(value).__name__} {value!r:.40}."
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise CorruptAdapterError(f"{self.where}.{name} must be finite, got {value!r}.")
        return value

    def count(self, name: str) -> int:
        value = self.get(name, int)
        if value < 0:
            raise CorruptAdapterError(f"{self.where}.{name} must not be negative, got {value}.")
        return value

    def positive(self, name: str) -> float:
        value = self.get(name, (int, float))
        if value <= 0:
            raise CorruptAdapterError(f"{self.where}.{name} must be positive, got {value}.")
        return value


@dataclass(frozen=True)
class BaseModelRecord:
    """The base model an adapter was trained on.

    Attributes:
        architecture: ``module.Class`` of the base model.
        lora_architecture: ``module.Class`` of the LoRA model it was saved from.
        config: The base config without LoRA fields (``None`` for models
            without a config dataclass).
        fingerprint: :func:`lora_ckpt.state.fingerprint.base_fingerprint`.
    """

    architecture: str
    lora_architecture: str
    config: dict | None
    fingerprint: str


@dataclass(frozen=True)
class SavedRecord:
    """What a save wrote besides the LoRA weights."""

    lora: bool
    bias: str
    extra_layers: tuple[str, ...]


@dataclass(frozen=True)
class LayerRecord:
    """One LoRA layer of the adapter: ``scaling == alpha / rank``."""

    type: str
    rank: int
    alpha: float
    scaling: float


@dataclass(frozen=True)
class VariableRecord:
    """One saved variable: its shape, dtype and kind (lora, bias or extra)."""

    shape: tuple[int, ...]
    dtype: str
    kind: str


@dataclass(frozen=True)
class FileRecord:
    """Size and SHA-256 of one checkpoint file."""

    size: int
    sha256: str


@dataclass
class AdapterConfig:
    """``adapter_config.json`` of one adapter.

    Attributes:
        base_model: The base it was trained on.
        saved: What was saved besides LoRA weights.
        layers: LoRA layer path -> :class:`LayerRecord`.
        variables: Variable key -> :class:`VariableRecord`.
        files: Checkpoint file name -> :class:`FileRecord`.
        metadata: The user's JSON metadata.
        library_version: The lora_ckpt version that wrote it.
        created: ISO-8601 time of the save.
        checkpoint_prefix: The checkpoint's file prefix inside the directory.
        format_version: The adapter format version.
    """

    base_model: BaseModelRecord
    saved: SavedRecord
    layers: dict[str, LayerRecord]
    variables: dict[str, VariableRecord]
    files: dict[str, FileRecord] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    library_version: str = ""
    created: str = ""
    checkpoint_prefix: str = CHECKPOINT_PREFIX
    format_version: int = FORMAT_VERSION

    @property
    def rank(self) -> int:
        """The largest LoRA rank of any layer."""
        return max(layer.rank for layer in self.layers.values())

    @property
    def num_parameters(self) -> int:
        """How many numbers the adapter's tensors hold."""
        return sum(math.prod(v.shape) for v in self.variables.values())

    def to_dict(self) -> dict:
        """The JSON document, in the field order of format version 1."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "library_version": self.library_version,
            "created": self.created,
            "base_model": asdict(self.base_model),
            "saved": {**asdict(self.saved), "extra_layers": list(self.saved.extra_layers)},
            "layers": {path: asdict(layer) for path, layer in self.layers.items()},
            "variables": {
                key: {"shape": list(v.shape), "dtype": v.dtype, "kind": v.kind}
                for key, v in self.variables.items()
            },
            "checkpoint": {
                "prefix": self.checkpoint_prefix,
                "files": {name: asdict(f) for name, f in self.files.items()},
            },
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        """``adapter_config.json``'s text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, path: str = "") -> "AdapterConfig":
        """Parses and validates ``adapter_config.json``.

        Args:
            text: The file's content.
            path: The adapter path, for messages.

        Returns:
            The config.

        Raises:
            CorruptAdapterError: If it is not JSON of the adapter schema.
            AdapterVersionError: If it was written in another format version.
        """
        where = f"{path}/{CONFIG_FILE}"
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CorruptAdapterError(f"{where} is not valid JSON: {exc}.") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
            raise CorruptAdapterError(
                f"{where} is not a lora_ckpt adapter config (format field is not {FORMAT_NAME!r})."
            )
        top = _Fields(document, "config")
        version = top.get("format_version", int)
        if version != FORMAT_VERSION:
            hint = "Upgrade lora_ckpt to load it." if version > FORMAT_VERSION else "Re-save it."
            raise AdapterVersionError(
                f"{path} uses adapter format version {version}; this lora_ckpt reads version "
                f"{FORMAT_VERSION}. {hint}"
            )
        base = _Fields(top.get("base_model", dict), "config.base_model")
        saved = _Fields(top.get("saved", dict), "config.saved")
        checkpoint = _Fields(top.get("checkpoint", dict), "config.checkpoint")
        files = _records(checkpoint.get("files", dict), "config.checkpoint.files", _file)
        if not files:
            raise CorruptAdapterError(f"{where}: config.checkpoint.files is empty.")
        return cls(
            base_model=BaseModelRecord(
                architecture=base.get("architecture", str),
                lora_architecture=base.get("lora_architecture", str),
                config=base.get("config", dict, optional=True),
                fingerprint=base.get("fingerprint", str),
            ),
            saved=SavedRecord(
                lora=saved.get("lora", bool),
                bias=saved.get("bias", str),
                extra_layers=tuple(_strings(saved.get("extra_layers", list), "extra_layers")),
            ),
            layers=_records(top.get("layers", dict), "config.layers", _layer),
            variables=_records(top.get("variables", dict), "config.variables", _variable),
            files=files,
            metadata=top.get("metadata", dict),
            library_version=top.get("library_version", str),
            created=top.get("created", str),
            checkpoint_prefix=checkpoint.get("prefix", str),
            format_version=version,
        )


def _strings(values: list, where: str) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise CorruptAdapterError(f"config.saved.{where} must be a list of strings.")
    return values


def _records(record: dict, where: str, parse) -> dict:
    return {name: parse(_Fields(value, f"{where}[{name!r}]")) for name, value in record.items()}


def _layer(fields: _Fields) -> LayerRecord:
    return LayerRecord(
        type=fields.get("type", str),
        rank=fields.count("rank"),
        alpha=float(fields.positive("alpha")),
        scaling=float(fields.positive("scaling")),
    )


def _variable(fields: _Fields) -> VariableRecord:
    shape = fields.get("shape", list)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CorruptAdapterError(
            f"{fields.where}.shape must be a list of sizes, got {shape!r:.60}."
        )
    return VariableRecord(
        shape=tuple(shape), dtype=fields.get("dtype", str), kind=fields.get("kind", str)
    )


def _file(fields: _Fields) -> FileRecord:
    return FileRecord(size=fields.count("size"), sha256=fields.get("sha256", str))
