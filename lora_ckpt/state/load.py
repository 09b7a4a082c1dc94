"""read_lora_state and load_lora_state: validate everything, then assign."""

from dataclasses import dataclass, field

import numpy as np

from .._tf import tf
from ..errors import (
    AdapterMismatchError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    CorruptAdapterError,
)
from .format import CHECKPOINT_ROOT, CONFIG_FILE, checkpoint_key, parse_config
from .save import file_record, model_identity
from .selection import base_fingerprint, select_state

_gfile = tf.io.gfile


@dataclass
class AdapterState:
    """An adapter read from disk, with no model involved.

    Attributes:
        path: Where it was read from.
        config: The parsed ``adapter_config.json``.
        tensors: ``variable key -> numpy array``.
    """

    path: str
    config: dict
    tensors: dict[str, np.ndarray]

    @property
    def rank(self) -> int:
        """The largest LoRA rank of any layer."""
        return max(layer["rank"] for layer in self.config["layers"].values())

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the base weights it was trained on."""
        return self.config["base_model"]["fingerprint"]


@dataclass
class LoadReport:
    """What a load did.

    Attributes:
        loaded: Keys of the variables assigned.
        missing: LoRA variables of the model that the adapter lacks (left as
            they were).
        unexpected: Adapter variables the model has no place for (skipped).
        mismatched: Adapter variables whose shape, dtype or scaling differ
            from the model's (skipped), with the reason.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether every adapter variable was loaded and none was missing."""
        return not (self.missing or self.unexpected or self.mismatched)


def read_config(path: str) -> dict:
    """Reads and validates an adapter's ``adapter_config.json``.

    Args:
        path: The adapter directory.

    Returns:
        The config dict.

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
    with _gfile.GFile(config_path, "r") as handle:
        return parse_config(handle.read(), path)


def read_lora_state(path: str) -> AdapterState:
    """Reads an adapter into numpy arrays, with no model built.

    Every check that needs no model is done: config schema and version,
    presence, size and SHA-256 of each checkpoint file, and agreement of the
    checkpoint's variables, shapes and dtypes with the config.

    Args:
        path: The adapter directory.

    Returns:
        The :class:`AdapterState`.

    Raises:
        AdapterNotFoundError: If there is no committed adapter at ``path``.
        CorruptAdapterError: If a file is missing, truncated or altered, or
            the checkpoint disagrees with the config.
        AdapterVersionError: For an unknown format version.
    """
    path = str(path).rstrip("/")
    config = read_config(path)
    for name, expected in config["checkpoint"]["files"].items():
        file_path = f"{path}/{name}"
        if not _gfile.exists(file_path):
            raise CorruptAdapterError(f"{path} is missing its checkpoint file {name}.")
        actual = file_record(file_path)
        if actual["size"] != expected["size"]:
            raise CorruptAdapterError(
                f"{file_path} has {actual['size']} bytes, the config says "
                f"{expected['size']}: the file is truncated or was replaced."
            )
        if actual["sha256"] != expected["sha256"]:
            raise CorruptAdapterError(
                f"{file_path} does not match the SHA-256 in its config: the file is corrupted."
            )
    prefix = f"{path}/{config['checkpoint']['prefix']}"
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    except (tf.errors.OpError, RuntimeError) as exc:
        raise CorruptAdapterError(f"Cannot read the checkpoint of {path}: {exc}") from exc
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    stored = {k for k in shapes if k.startswith(CHECKPOINT_ROOT + "/")}
    expected_keys = {checkpoint_key(k) for k in config["variables"]}
    if stored != expected_keys:
        extra = sorted(stored - expected_keys)[:3]
        lacking = sorted(expected_keys - stored)[:3]
        raise CorruptAdapterError(
            f"The checkpoint of {path} does not hold the variables its config lists "
            f"(not in config: {extra}; not in checkpoint: {lacking})."
        )
    tensors = {}
    for key, record in config["variables"].items():
        ckpt_key = checkpoint_key(key)
        if list(shapes[ckpt_key]) != record["shape"] or dtypes[ckpt_key].name != record["dtype"]:
            raise CorruptAdapterError(
                f"{path}: variable {key} is stored as {dtypes[ckpt_key].name}"
                f"{shapes[ckpt_key]}, the config says {record['dtype']}{record['shape']}."
            )
        tensors[key] = reader.get_tensor(ckpt_key)
    return AdapterState(path=path, config=config, tensors=tensors)


def check_identity(model, config: dict, path: str) -> None:
    """Refuses an adapter config whose architecture or base config differ from the model's.

    Raises:
        AdapterMismatchError: With the differing fields.
    """
    ours = model_identity(model)
    theirs = config["base_model"]
    if ours["architecture"] != theirs["architecture"]:
        raise AdapterMismatchError(
            f"The adapter at {path} was trained on a {theirs['architecture']} model; "
            f"this model is a {ours['architecture']}."
        )
    if (
        ours["config"] is not None
        and theirs["config"] is not None
        and ours["config"] != theirs["config"]
    ):
        differing = sorted(
            k
            for k in set(ours["config"]) | set(theirs["config"])
            if ours["config"].get(k) != theirs["config"].get(k)
        )
        details = ", ".join(
            f"{k}: adapter {theirs['config'].get(k)!r} vs model {ours['config'].get(k)!r}"
            for k in differing[:5]
        )
        raise AdapterMismatchError(
            f"The adapter at {path} was trained on another configuration of "
            f"{ours['architecture']} ({details})."
        )


def plan_load(model, state: AdapterState, strict: bool = True, check_base: bool = True):
    """Checks an adapter against a model and returns what to assign.

    Nothing is assigned here: this is the dry run that a load (and a pool)
    does before it changes any variable.

    Args:
        model: The LoRA model to load into.
        state: The adapter, from :func:`read_lora_state`.
        strict: Refuse missing, unexpected or mismatched variables.
        check_base: Refuse a model whose base weights differ from the
            adapter's base fingerprint.

    Returns:
        ``(assignments, report)``: a list of ``(variable, array)`` and the
        :class:`LoadReport`.

    Raises:
        AdapterMismatchError: For another architecture or configuration, and
            with ``strict`` for any missing, unexpected or mismatched
            variable or a LoRA scaling that differs.
        BaseModelMismatchError: If ``check_base`` and the fingerprints differ.
        MergeStateError: If the model is merged.
    """
    config, path = state.config, state.path
    check_identity(model, config, path)
    selection = select_state(model, include_bias="none", extra_layers=[])
    model_vars = selection.model_variables
    report = LoadReport()
    assignments = []
    for key, value in state.tensors.items():
        var = model_vars.get(key)
        if var is None:
            report.unexpected.append(key)
            continue
        if tuple(var.shape) != value.shape or var.dtype.name != value.dtype.name:
            report.mismatched[key] = (
                f"adapter {value.dtype.name}{list(value.shape)} vs model "
                f"{var.dtype.name}{list(var.shape)}"
            )
            continue
        assignments.append((var, value))
        report.loaded.append(key)
    for layer_path, info in config["layers"].items():
        ours = selection.layers.get(layer_path)
        if ours is not None and not np.isclose(ours["scaling"], info["scaling"]):
            report.mismatched[layer_path] = (
                f"LoRA scaling (alpha/rank) adapter {info['scaling']} vs model {ours['scaling']}"
            )
    report.missing = [k for k in selection.lora_keys() if k not in state.tensors]

    if strict and not report.complete:
        problems = (
            ([f"missing from the adapter: {report.missing[:5]}"] if report.missing else [])
            + ([f"not in the model: {report.unexpected[:5]}"] if report.unexpected else [])
            + [f"{k}: {why}" for k, why in list(report.mismatched.items())[:5]]
        )
        raise AdapterMismatchError(
            f"The adapter at {path} does not fit this model: "
            + "; ".join(problems)
            + ". Pass strict=False to load what fits."
        )
    if check_base:
        ours = base_fingerprint(model_vars, set(state.tensors) | set(selection.lora_keys()))
        if ours != state.fingerprint:
            raise BaseModelMismatchError(
                f"The adapter at {path} was trained on other base weights "
                f"({state.fingerprint}) than this model has ({ours}). Load the base "
                "it was trained on, or pass check_base=False to load it anyway. (If "
                "fine-tuning changed state outside the adapter, such as BatchNorm "
                "statistics, save it with extra_layers.)"
            )
    return assignments, report


def assign_all(assignments) -> None:
    """Assigns ``(variable, value)`` pairs; the values are already validated."""
    for var, value in assignments:
        var.assign(value)


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
        CorruptAdapterError: Missing, truncated or altered files.
        AdapterVersionError: Unknown format version.
        AdapterMismatchError: Another architecture, configuration, layer set,
            shape or rank.
        BaseModelMismatchError: Other base weights (unless ``check_base`` is
            false).
        MergeStateError: The model is merged.

    On any error the model is left exactly as it was.
    """
    state = read_lora_state(path)
    assignments, report = plan_load(model, state, strict=strict, check_base=check_base)
    assign_all(assignments)
    return report
