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

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import AdapterVersionError, CorruptAdapterError
from ..scaling import FLOAT32_MAX, MAX_LORA_RANK, lora_scaling

# fmt: off
__all__ = [  # grouped by kind, so the module stays under 500 lines
    "AdapterConfig", "BaseModelRecord", "FileRecord", "LayerRecord", "SavedRecord",
    "VariableRecord",
    "CHECKPOINT_PREFIX", "CHECKPOINT_ROOT", "CONFIG_FILE", "FORMAT_VERSION", "MAX_JSON_DEPTH",
    "MAX_RANK", "MAX_SAVE_VERSION",
    "checkpoint_files", "checkpoint_key", "json_depth", "nest_variables",
]
# fmt: on


FORMAT_NAME = "lora_ckpt.adapter"
FORMAT_VERSION = 2
# Version 1 has no DoRA or rsLoRA layers; adapters without them are still
# written as version 1, so older readers keep reading them.
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "adapter_config.json"
CHECKPOINT_PREFIX = "adapter"
CHECKPOINT_ROOT = "lora"
_KEY_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# A save on a file system without directory renames writes a fresh prefix
# ("adapter-<hex>") beside the old files, then swaps the config.
_PREFIX = re.compile(r"adapter(-[0-9a-f]{8,32})?")

VARIABLE_KINDS = ("lora", "bias", "extra")  # lora_ckpt.selection's KIND_*
BIAS_MODES = ("none", "lora_only", "all")
DTYPE_SIZES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
MAX_RANK = MAX_LORA_RANK
MAX_JSON_DEPTH = 32
MAX_SAVE_VERSION = 1 << 62
"""The largest save counter a config may hold (JSON readers agree on it exactly)."""


def checkpoint_files(prefix: str) -> tuple[str, str]:
    """The two files ``tf.train.Checkpoint.write`` makes for ``prefix``."""
    return f"{prefix}.index", f"{prefix}.data-00000-of-00001"


def json_depth(document) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return deepest


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
        try:
            return float(value)
        except OverflowError:  # an integer literal beyond any float, such as 10**400
            raise CorruptAdapterError(
                f"{self.where}.{name} is out of range, got {str(value)[:20]}... "
                f"({len(str(value))} digits)."
            ) from None


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
    """One LoRA layer of the adapter.

    Attributes:
        type: The LoRA layer class name.
        rank: Its rank.
        alpha: Its alpha.
        scaling: ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).
        dora: Whether the layer is DoRA (a ``lora_magnitude`` per output).
        rslora: Whether the scaling is rsLoRA's ``alpha / sqrt(rank)``.
    """

    type: str
    rank: int
    alpha: float
    scaling: float
    dora: bool = False
    rslora: bool = False

    def expected_scaling(self) -> float:
        """The scaling a layer of this rank, alpha and rsLoRA flag computes."""
        return lora_scaling(self.alpha, self.rank, self.rslora)

    def to_dict(self) -> dict:
        """The JSON record; version-1 fields only unless DoRA/rsLoRA is used."""
        record = {"type": self.type, "rank": self.rank, "alpha": self.alpha}
        record["scaling"] = self.scaling
        record.update({k: True for k in ("dora", "rslora") if getattr(self, k)})
        return record


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
        version: The save counter: 1 for the first save at a path, one more
            for each overwrite (TF Serving's model version; configs written
            before it was recorded read as 1).
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
    version: int = 1
    json_bytes: int = field(default=0, compare=False)  # the file's size, when read
    json_sha256: str = field(default="", compare=False)  # and its SHA-256: the version

    @property
    def needed_version(self) -> int:
        """The oldest format version that holds this adapter."""
        return 2 if any(r.dora or r.rslora for r in self.layers.values()) else 1

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
            "format_version": self.needed_version,
            "library_version": self.library_version,
            "created": self.created,
            "version": self.version,
            "base_model": asdict(self.base_model),
            "saved": {**asdict(self.saved), "extra_layers": list(self.saved.extra_layers)},
            "layers": {path: layer.to_dict() for path, layer in self.layers.items()},
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
            if isinstance(text, bytes):
                text = text.decode("utf-8")  # strict: one bad byte is a corrupt file
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise CorruptAdapterError(f"{where} is not valid UTF-8 JSON: {exc!s:.200}.") from exc
        if json_depth(document) > MAX_JSON_DEPTH:
            raise CorruptAdapterError(
                f"{where} is nested deeper than {MAX_JSON_DEPTH} levels; it is not an adapter config."
            )
        if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
            raise CorruptAdapterError(
                f"{where} is not a lora_ckpt adapter config (format field is not {FORMAT_NAME!r})."
            )
        top = _Fields(document, "config")
        version = top.get("format_version", int)
        if version not in READABLE_VERSIONS:
            hint = "Upgrade lora_ckpt to load it." if version > FORMAT_VERSION else "Re-save it."
            raise AdapterVersionError(
                f"{path} uses adapter format version {version}; this lora_ckpt reads versions "
                f"{list(READABLE_VERSIONS)}. {hint}"
            )
        base = _Fields(top.get("base_model", dict), "config.base_model")
        saved = _Fields(top.get("saved", dict), "config.saved")
        checkpoint = _Fields(top.get("checkpoint", dict), "config.checkpoint")
        files = _records(checkpoint.get("files", dict), "config.checkpoint.files", _file)
        if not files:
            raise CorruptAdapterError(f"{where}: config.checkpoint.files is empty.")
        config = cls(
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
            version=_save_version(top.get("version", int, optional=True)),
        )
        if not 1 <= config.version <= MAX_SAVE_VERSION:
            raise CorruptAdapterError(
                f"{where}: version must be from 1 to {MAX_SAVE_VERSION}, got {config.version}."
            )
        config.check_consistency(where)
        raw = text.encode("utf-8")
        config.json_bytes, config.json_sha256 = len(raw), hashlib.sha256(raw).hexdigest()
        return config

    def check_consistency(self, where: str = "config") -> None:
        """Cross-checks the fields against each other.

        Raises:
            CorruptAdapterError: If the config contradicts itself: ranks that
                are not the tensors' shapes, a scaling that is not
                ``alpha / rank``, unknown kinds, dtypes or bias modes, files
                that are not the checkpoint's, tensors larger than the data.
        """
        bad = _inconsistency(self)
        if bad:
            raise CorruptAdapterError(f"{where} contradicts itself: {bad}.")


def _save_version(value: int | None) -> int:
    # Configs written before the counter was recorded have none: their first version.
    return 1 if value is None else value


def _inconsistency(config: AdapterConfig) -> str:
    """The first way a config contradicts itself, or ``""``."""
    if not _PREFIX.fullmatch(config.checkpoint_prefix):
        return f"checkpoint.prefix {config.checkpoint_prefix!r} is not an adapter checkpoint"
    expected = set(checkpoint_files(config.checkpoint_prefix))
    if set(config.files) != expected:
        return f"checkpoint.files {sorted(config.files)[:3]} are not {sorted(expected)}"
    if not config.saved.lora or config.saved.bias not in BIAS_MODES:
        return f"saved {config.saved} is not a LoRA save with a known bias mode"
    if not config.base_model.fingerprint.startswith("sampled-blake2b:"):
        return "base_model.fingerprint is not a lora_ckpt fingerprint"
    if not config.layers:
        return "it lists no LoRA layer"
    data_bytes = config.files[checkpoint_files(config.checkpoint_prefix)[1]].size
    total = 0
    for key, record in config.variables.items():
        if record.kind not in VARIABLE_KINDS or record.dtype not in DTYPE_SIZES:
            return f"variable {key} has kind {record.kind!r} and dtype {record.dtype!r}"
        total += math.prod(record.shape) * DTYPE_SIZES[record.dtype]
        if total > data_bytes:
            return f"its variables need more than the {data_bytes} bytes of the data file"
    for layer_path, layer in config.layers.items():
        a = config.variables.get(f"{layer_path}/kernel_lora_a")
        b = config.variables.get(f"{layer_path}/kernel_lora_b")
        if a is None or b is None or a.kind != "lora" or b.kind != "lora":
            return f"LoRA layer {layer_path} lacks its kernel_lora_a/kernel_lora_b variables"
        if not 0 < layer.rank <= MAX_RANK or len(b.shape) != 2 or not a.shape:
            return f"layer {layer_path} has rank {layer.rank} and tensors A{list(a.shape)}, B{list(b.shape)}"
        if a.shape[-1] != layer.rank or b.shape[0] != layer.rank:
            return f"layer {layer_path} records rank {layer.rank}, its tensors are A{list(a.shape)}, B{list(b.shape)}"
        # Exactly: a save writes alpha / rank, and a pool serves the recorded scaling
        # (a tolerance would let an edited last digit change every output).
        if layer.scaling > FLOAT32_MAX:
            return f"layer {layer_path} records scaling {layer.scaling}, beyond float32"
        if layer.scaling != layer.expected_scaling():
            return f"layer {layer_path} records scaling {layer.scaling}, not {layer.expected_scaling()}"
        magnitude = config.variables.get(f"{layer_path}/lora_magnitude")
        if layer.dora != (magnitude is not None):
            return f"layer {layer_path} has dora={layer.dora} but {'no ' if magnitude is None else 'a '}lora_magnitude"
        if magnitude is not None and (magnitude.kind != "lora" or magnitude.shape != b.shape[1:]):
            return f"layer {layer_path} has a lora_magnitude of shape {list(magnitude.shape)}, not [{b.shape[1]}]"
        if (layer.dora or layer.rslora) and config.format_version < 2:
            return (
                f"layer {layer_path} uses DoRA/rsLoRA in a version-{config.format_version} config"
            )
    lora_layers = {key.rsplit("/", 1)[0] for key, v in config.variables.items() if v.kind == "lora"}
    if lora_layers - set(config.layers):
        return (
            f"LoRA variables of {sorted(lora_layers - set(config.layers))[:3]} have no layer record"
        )
    return ""


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
        alpha=fields.positive("alpha"),
        scaling=fields.positive("scaling"),
        dora=bool(fields.get("dora", bool, optional=True)),
        rslora=bool(fields.get("rslora", bool, optional=True)),
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


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _file(fields: _Fields) -> FileRecord:
    sha256 = fields.get("sha256", str)
    if not _SHA256.fullmatch(sha256):
        raise CorruptAdapterError(f"{fields.where}.sha256 is not 64 lowercase hex digits.")
    return FileRecord(size=fields.count("size"), sha256=sha256)
