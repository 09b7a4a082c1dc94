"""read_lora_state and load_lora_state: validate everything, then assign.

One read path for every store: the config, then each checkpoint file it
names (one read each, hashed once), then the checkpoint parsed from those
bytes. A save may replace the adapter while it is read; a file that is then
gone or different, with a config that changed meanwhile, means "read the new
version", and the read starts over: a reader sees the old adapter or the new
one, never an error for a save that committed.
"""

from dataclasses import dataclass

import numpy as np

from .._tf import tf
from ..errors import CorruptAdapterError, StoreError
from ..storage import UnsafeFileError, open_store
from . import fit
from .checkpoint_bytes import checkpoint_reader
from .compiled import assign_all
from .files import MAX_CONFIG_BYTES, read_config_bytes, read_verified
from .fit import LoadReport, ModelSignature, check_fit
from .format import CHECKPOINT_ROOT, CONFIG_FILE, AdapterConfig, checkpoint_key

__all__ = [
    "AdapterState",
    "load_adapter_state",
    "load_lora_state",
    "read_config",
    "read_lora_state",
]


_ATTEMPTS = 5
"""Reads tried while saves keep replacing the adapter under the reader."""


@dataclass
class AdapterState:
    """An adapter read from disk, with no model involved.

    Attributes:
        path: Where it was read from.
        config: The parsed ``adapter_config.json``.
        tensors: ``variable key -> numpy array``, every one finite.
    """

    path: str
    config: AdapterConfig
    tensors: dict[str, np.ndarray]

    @property
    def rank(self) -> int:
        """The largest LoRA rank of any layer."""
        return self.config.rank

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the base weights it was trained on."""
        return self.config.base_model.fingerprint


def read_config(path: str) -> tuple[str, AdapterConfig]:
    """Reads and validates an adapter's ``adapter_config.json``.

    Args:
        path: The adapter directory or URL.

    Returns:
        ``(directory, config)``: the directory it was read from (``path``, or
        the complete previous version a killed save left beside it) and the
        config.

    Raises:
        AdapterNotFoundError: If there is no committed adapter at ``path``.
        CorruptAdapterError, AdapterVersionError: If the config is invalid.
        StoreError: If the store cannot be reached.
    """
    store, path = open_store(path)
    directory, raw = read_config_bytes(store, path)
    return directory, AdapterConfig.from_json(raw, path)


def read_lora_state(path: str) -> AdapterState:
    """Reads an adapter into numpy arrays, with no model built.

    Every check that needs no model is done: config schema, ranges and
    consistency, each checkpoint file a regular file inside the directory of
    the recorded size and SHA-256 (read once: the hashed bytes are the parsed
    bytes), the checkpoint's variables, shapes and dtypes those of the
    config, and finite values.

    Args:
        path: The adapter directory or URL (any store: local, ``memory://``,
            ``s3://``, ``gs://``, ``az://``; remote files are kept in the
            verified local cache).

    Returns:
        The :class:`AdapterState`.

    Raises:
        AdapterNotFoundError: If there is no committed adapter at ``path``.
        CorruptAdapterError: If a file is missing, odd, truncated or altered,
            the checkpoint disagrees with the config, or a tensor holds NaN/Inf.
        AdapterVersionError: For an unknown format version.
        StoreError: If the store cannot be reached.
    """
    store, path = open_store(path)
    for attempt in range(_ATTEMPTS):
        directory, raw = read_config_bytes(store, path)
        config = AdapterConfig.from_json(raw, path)
        try:
            files = {
                name: read_verified(store, directory, name, record)
                for name, record in config.files.items()
            }
        except CorruptAdapterError:
            if attempt + 1 < _ATTEMPTS and _replaced(store, path, directory, raw):
                continue  # a save committed meanwhile: read its version
            raise
        with checkpoint_reader(files, config.checkpoint_prefix) as reader:
            try:
                return AdapterState(path, config, _read_tensors(reader, config, path))
            except (tf.errors.OpError, RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise CorruptAdapterError(
                    f"The checkpoint of {path} cannot be read: {exc!s:.300}"
                ) from exc
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _replaced(store, path: str, directory: str, raw: bytes) -> bool:
    """Whether the version read from ``directory`` is no longer the committed one:
    a save renamed it away, is removing it (a previous version beside ``path``),
    or committed another version into it."""
    if directory != path:
        return True
    try:
        return store.read(store.join(directory, CONFIG_FILE), MAX_CONFIG_BYTES) != raw
    except FileNotFoundError:
        return True
    except (OSError, UnsafeFileError, StoreError):
        return False


def _read_tensors(reader, config: AdapterConfig, path: str) -> dict[str, np.ndarray]:
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    stored = {k for k in shapes if k.startswith(CHECKPOINT_ROOT + "/")}
    expected_keys = {checkpoint_key(k) for k in config.variables}
    if stored != expected_keys:
        extra = sorted(stored - expected_keys)[:3]
        lacking = sorted(expected_keys - stored)[:3]
        raise CorruptAdapterError(
            f"The checkpoint of {path} does not hold the variables its config lists "
            f"(not in config: {extra}; not in checkpoint: {lacking})."
        )
    tensors = {}
    for key, record in config.variables.items():
        ckpt_key = checkpoint_key(key)
        if tuple(shapes[ckpt_key]) != record.shape or dtypes[ckpt_key].name != record.dtype:
            raise CorruptAdapterError(
                f"{path}: variable {key} is stored as {dtypes[ckpt_key].name}"
                f"{shapes[ckpt_key]}, the config says {record.dtype}{list(record.shape)}."
            )
        tensor = reader.get_tensor(ckpt_key)
        if tensor.shape != record.shape or tensor.dtype.name != record.dtype:
            raise CorruptAdapterError(f"{path}: variable {key} does not hold what its index says.")
        if tensor.dtype.kind in "fc" and not np.isfinite(tensor).all():
            raise CorruptAdapterError(
                f"{path}: variable {key} holds NaN or infinite values; the adapter is "
                "unusable (retrain it, or save it again from a healthy model)."
            )
        tensors[key] = tensor
    return tensors


def load_lora_state(
    model, path: str, *, strict: bool = True, check_base: bool = True
) -> LoadReport:
    """Loads an adapter into a model, validating all of it before assigning any of it.

    Args:
        model: A built LoRA model of the architecture the adapter was saved
            from (not merged).
        path: The adapter directory.
        strict: With ``True``, any missing, unexpected or mismatched variable
            is an error; with ``False`` what fits is loaded and the rest is
            reported.
        check_base: Refuse a model whose base weights are not those the
            adapter was trained on.

    Returns:
        A :class:`LoadReport`.

    Raises:
        AdapterNotFoundError: No committed adapter at ``path``.
        CorruptAdapterError: Missing, truncated or altered files, NaN/Inf.
        AdapterVersionError: Unknown format version.
        AdapterMismatchError: Another architecture, configuration, layer set,
            shape or rank.
        BaseModelMismatchError: Other base weights (unless ``check_base`` is
            false).
        MergeStateError: The model is merged.

    On any error the model is left exactly as it was.
    """
    return load_adapter_state(model, read_lora_state(path), strict=strict, check_base=check_base)


def load_adapter_state(
    model, state: AdapterState, *, strict: bool = True, check_base: bool = True
) -> LoadReport:
    """:func:`load_lora_state` for an adapter already read by :func:`read_lora_state`.

    Args:
        model: As for :func:`load_lora_state`.
        state: The adapter, read (and checked) once.
        strict, check_base: As for :func:`load_lora_state`.

    Returns:
        A :class:`LoadReport`.

    Raises:
        AdapterMismatchError, BaseModelMismatchError, MergeStateError: As
            :func:`load_lora_state`; the model is left as it was.
    """
    signature = ModelSignature.of(model)
    report = check_fit(signature, state.config, state.path, strict=strict)
    if check_base:
        fit.check_base(signature, state.config, state.path)
    assign_all(
        [signature.variables[k] for k in report.loaded], [state.tensors[k] for k in report.loaded]
    )
    return report
