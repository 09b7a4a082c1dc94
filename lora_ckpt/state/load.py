"""read_lora_state and load_lora_state: validate everything, then assign."""

from dataclasses import dataclass

import numpy as np

from .._tf import tf
from ..errors import AdapterNotFoundError, CorruptAdapterError
from . import fit
from .files import file_record
from .fit import LoadReport, ModelSignature, check_fit
from .format import CHECKPOINT_ROOT, CONFIG_FILE, AdapterConfig, checkpoint_key

_gfile = tf.io.gfile


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


def read_config(path: str) -> AdapterConfig:
    """Reads and validates an adapter's ``adapter_config.json``.

    Args:
        path: The adapter directory.

    Returns:
        The config.

    Raises:
        AdapterNotFoundError: If the directory or its config is missing.
        CorruptAdapterError, AdapterVersionError: If the config is invalid.
    """
    path = str(path).rstrip("/")
    if not _gfile.exists(path):
        raise AdapterNotFoundError(f"No adapter at {path}: the directory does not exist.")
    config_path = f"{path}/{CONFIG_FILE}"
    if not _gfile.exists(config_path):
        raise AdapterNotFoundError(
            f"{path} has no {CONFIG_FILE}: it is not an adapter, or its save was "
            "interrupted before it committed."
        )
    with _gfile.GFile(config_path, "rb") as handle:
        return AdapterConfig.from_json(handle.read(), path)


def _check_files(path: str, config: AdapterConfig) -> None:
    for name, expected in config.files.items():
        file_path = f"{path}/{name}"
        if not _gfile.exists(file_path):
            raise CorruptAdapterError(f"{path} is missing its checkpoint file {name}.")
        actual = file_record(file_path)
        if actual.size != expected.size:
            raise CorruptAdapterError(
                f"{file_path} has {actual.size} bytes, the config says "
                f"{expected.size}: the file is truncated or was replaced."
            )
        if actual.sha256 != expected.sha256:
            raise CorruptAdapterError(
                f"{file_path} does not match the SHA-256 in its config: the file is corrupted."
            )


def read_lora_state(path: str) -> AdapterState:
    """Reads an adapter into numpy arrays, with no model built.

    Every check that needs no model is done: config schema and version,
    presence, size and SHA-256 of each checkpoint file, agreement of the
    checkpoint's variables, shapes and dtypes with the config, and finite
    values.

    Args:
        path: The adapter directory.

    Returns:
        The :class:`AdapterState`.

    Raises:
        AdapterNotFoundError: If there is no committed adapter at ``path``.
        CorruptAdapterError: If a file is missing, truncated or altered, the
            checkpoint disagrees with the config, or a tensor holds NaN/Inf.
        AdapterVersionError: For an unknown format version.
    """
    path = str(path).rstrip("/")
    config = read_config(path)
    _check_files(path, config)
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(f"{path}/{config.checkpoint_prefix}")
    except (tf.errors.OpError, RuntimeError) as exc:
        raise CorruptAdapterError(f"Cannot read the checkpoint of {path}: {exc}") from exc
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
        if tensor.dtype.kind in "fc" and not np.isfinite(tensor).all():
            raise CorruptAdapterError(
                f"{path}: variable {key} holds NaN or infinite values; the adapter is "
                "unusable (retrain it, or save it again from a healthy model)."
            )
        tensors[key] = tensor
    return AdapterState(path=path, config=config, tensors=tensors)


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
    state = read_lora_state(path)
    signature = ModelSignature.of(model)
    report = check_fit(signature, state.config, state.path, strict=strict)
    if check_base:
        fit.check_base(signature, state.config, state.path)
    for key in report.loaded:
        signature.variables[key].assign(state.tensors[key])
    return report
