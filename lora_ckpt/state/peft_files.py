"""PEFT's adapter files: ``adapter_config.json`` and ``adapter_model.safetensors``.

What ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained``
reads. Tensors go through the ``safetensors`` library (its numpy API), never
through pickle: a directory that holds only ``adapter_model.bin`` (PyTorch's
pickle format, which runs code when it is loaded) is refused. Every read is
bounded in size and goes through :mod:`lora_ckpt.storage`.
"""

import json
import struct

import numpy as np

from ..errors import AdapterExistsError, AdapterNotFoundError, CorruptAdapterError, StoreError
from ..storage import UnsafeFileError, open_store
from .files import MAX_CONFIG_BYTES
from .format import MAX_JSON_DEPTH, json_depth

__all__ = ["METADATA_KEY", "read_peft_adapter", "write_peft_adapter"]


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
MAX_WEIGHTS_BYTES = 8 << 30
"""The largest ``adapter_model.safetensors`` read (a rank-256 LoRA of a ViT-H is ~1 GiB)."""
METADATA_KEY = "lora_ckpt.metadata"
"""The safetensors header entry where an exported adapter keeps its lora_ckpt
metadata (labels, ...); PEFT ignores header entries it does not know."""

_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def read_peft_adapter(path: str) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """Reads a PEFT adapter directory.

    Args:
        path: The directory (or URL) ``save_pretrained`` wrote.

    Returns:
        ``(config, tensors, header metadata)``: the parsed
        ``adapter_config.json``, every tensor as a float32 numpy array
        (float16 and bfloat16 widen exactly), and the safetensors header's
        ``__metadata__``.

    Raises:
        AdapterNotFoundError: If there is no ``adapter_config.json``.
        CorruptAdapterError: If the config is not a JSON object, the weights
            are only pickled (``adapter_model.bin``), missing, not safetensors,
            of a dtype that is not a float, or float64 values float32 cannot hold.
        StoreError: If the store cannot be reached.
    """
    store, path = open_store(path)
    raw_config = _read(store, store.join(path, PEFT_CONFIG), MAX_CONFIG_BYTES, path)
    if raw_config is None:
        raise AdapterNotFoundError(f"{path} holds no PEFT {PEFT_CONFIG}.")
    try:
        config = json.loads(raw_config.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CorruptAdapterError(f"{path}/{PEFT_CONFIG} is not UTF-8 JSON: {exc!s:.200}") from exc
    if not isinstance(config, dict) or json_depth(config) > MAX_JSON_DEPTH:
        raise CorruptAdapterError(f"{path}/{PEFT_CONFIG} is not a PEFT config (a JSON object).")
    raw = _read(store, store.join(path, PEFT_WEIGHTS), MAX_WEIGHTS_BYTES, path)
    if raw is None:
        if store.exists(store.join(path, PEFT_PICKLE)):
            raise CorruptAdapterError(
                f"{path} holds its weights only as {PEFT_PICKLE}, PyTorch's pickle format: "
                "loading a pickle runs whatever code it holds, so lora_ckpt never does. Where "
                "you trust the file, save it again as safetensors (PEFT's save_pretrained "
                f"writes {PEFT_WEIGHTS} by default) and import that."
            )
        raise CorruptAdapterError(f"{path} has no {PEFT_WEIGHTS}.")
    tensors, metadata = _load_safetensors(raw, f"{path}/{PEFT_WEIGHTS}")
    return config, tensors, metadata


def _read(store, file: str, limit: int, where: str) -> bytes | None:
    try:
        return store.read(file, limit)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except UnsafeFileError as exc:
        raise CorruptAdapterError(f"{where}: {exc}") from None


def _load_safetensors(raw: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, float32 out.

    The safetensors library parses and validates the file; it has no numpy
    bfloat16, so a BF16 tensor is read as the int16 of its bits (the header
    rewritten, offsets unchanged) and widened to float32 here, exactly.
    """
    from safetensors.numpy import load

    header, data = _split_header(raw, where)
    bf16 = set()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in _FLOAT_DTYPES:
            raise CorruptAdapterError(
                f"{where}: tensor {name!r} is {dtype!r}; LoRA weights are floats "
                f"({', '.join(_FLOAT_DTYPES)})."
            )
        if dtype == "BF16":
            entry["dtype"] = "I16"
            bf16.add(name)
    if bf16:
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        raw = struct.pack("<Q", len(text)) + text + data
    try:
        loaded = load(raw)
    except Exception as exc:  # the library's own SafetensorError, or what numpy raises
        raise CorruptAdapterError(f"{where} is not a valid safetensors file: {exc!s:.200}") from exc
    tensors = {}
    for name, array in loaded.items():
        if name in bf16:
            array = (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        widened = np.asarray(array, dtype=np.float32)
        if array.dtype == np.float64 and not np.array_equal(widened, array):
            raise CorruptAdapterError(
                f"{where}: float64 tensor {name!r} holds values float32 cannot represent "
                "exactly; save the adapter in float32."
            )
        if not np.isfinite(widened).all():
            raise CorruptAdapterError(f"{where}: tensor {name!r} holds NaN or infinite values.")
        tensors[name] = widened
    metadata = header.get("__metadata__") or {}
    return tensors, metadata if isinstance(metadata, dict) else {}


def _split_header(raw: bytes, where: str) -> tuple[dict, bytes]:
    if len(raw) < 8:
        raise CorruptAdapterError(f"{where} is too short to be a safetensors file.")
    (size,) = struct.unpack("<Q", raw[:8])
    if size > min(len(raw) - 8, 100 << 20):
        raise CorruptAdapterError(f"{where} declares a {size}-byte header; it is not safetensors.")
    try:
        header = json.loads(raw[8 : 8 + size].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CorruptAdapterError(f"{where} has no valid safetensors header: {exc!s:.200}") from exc
    if not isinstance(header, dict) or json_depth(header) > 4:
        raise CorruptAdapterError(f"{where} has no valid safetensors header.")
    return header, raw[8 + size :]


def write_peft_adapter(
    path: str,
    config: dict,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str],
    overwrite: bool = False,
) -> str:
    """Writes a PEFT adapter directory: the weights, then the config.

    Args:
        path: The directory (or URL).
        config: ``adapter_config.json``'s content.
        tensors: Key -> array (written as they are).
        metadata: String entries for the safetensors header (``format: pt``
            is added, as PEFT writes it).
        overwrite: Replace an adapter already there.

    Returns:
        ``path``.

    Raises:
        AdapterExistsError: If ``path`` holds a PEFT adapter and not ``overwrite``.
        StoreError: If the store cannot be reached.
    """
    from safetensors.numpy import save

    store, path = open_store(path)
    if store.exists(store.join(path, PEFT_CONFIG)) and not overwrite:
        raise AdapterExistsError(
            f"{path} already holds a PEFT adapter; pass overwrite=True to replace it."
        )
    blob = save(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        metadata={"format": "pt", **metadata},
    )
    try:
        store.write(store.join(path, PEFT_WEIGHTS), blob)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        store.write(store.join(path, PEFT_CONFIG), text.encode("utf-8"))  # last: the adapter exists
    except OSError as exc:
        raise StoreError(f"Cannot write the PEFT adapter {path}: {exc}") from exc
    return path
