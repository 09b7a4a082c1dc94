"""Summaries of adapters on disk, for listings and the CLI."""

from .._tf import tf
from ..errors import AdapterNotFoundError, LoRAError
from .files import is_object_store, is_work_directory
from .format import CONFIG_FILE
from .load import read_config


def inspect_adapter(path: str) -> dict:
    """Summarises an adapter from its config, without reading its tensors.

    Args:
        path: The adapter directory.

    Returns:
        A dict with ``path``, ``format_version``, ``library_version``,
        ``created``, ``architecture``, ``base_fingerprint``, ``ranks`` (layer
        path -> rank), ``saved``, ``variables`` (key -> shape, dtype, kind),
        ``num_parameters``, ``size_bytes`` and ``metadata``.

    Raises:
        AdapterNotFoundError, CorruptAdapterError, AdapterVersionError: As
            :func:`read_config`.
    """
    if is_object_store(path):
        from .object_store import inspect_remote_adapter  # it inspects through here

        return inspect_remote_adapter(path)
    path = str(path).rstrip("/")
    _, config = read_config(path)
    document = config.to_dict()
    return {
        "path": path,
        "format_version": config.format_version,
        "library_version": config.library_version,
        "created": config.created,
        "architecture": config.base_model.lora_architecture,
        "base_architecture": config.base_model.architecture,
        "base_fingerprint": config.base_model.fingerprint,
        "ranks": {name: layer.rank for name, layer in config.layers.items()},
        "saved": document["saved"],
        "variables": document["variables"],
        "num_parameters": config.num_parameters,
        "size_bytes": sum(f.size for f in config.files.values()) + config.json_bytes,
        "metadata": config.metadata,
    }


def list_adapters(directory: str) -> list[dict]:
    """Summarises every adapter directly inside ``directory``.

    Directories that are not adapters, or whose save never committed, are
    left out, and so are a save's work directories (``*.tmp-*``,
    ``*.old-*``). A broken adapter is listed with its ``error`` instead of
    failing the whole listing.

    Args:
        directory: A store of adapters, one subdirectory each.

    Returns:
        One :func:`inspect_adapter` summary per adapter (with ``name``), or
        ``{"name", "path", "error"}`` for a broken one, sorted by name.
    """
    if is_object_store(directory):
        from .object_store import list_remote_adapters

        return list_remote_adapters(directory)
    directory = str(directory).rstrip("/")
    if not tf.io.gfile.isdir(directory):
        return []
    summaries = []
    names = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(directory))
    # A save killed between its renames leaves NAME.old-*: NAME is still there.
    recoverable = {n.split(".old-")[0] for n in names if ".old-" in n}
    for name in sorted({n for n in names if not is_work_directory(n)} | recoverable):
        path = f"{directory}/{name}"
        try:
            if name not in recoverable and not tf.io.gfile.exists(f"{path}/{CONFIG_FILE}"):
                continue
            summary = inspect_adapter(path)
        except AdapterNotFoundError:
            continue  # a NAME.old-* leftover with no committed adapter to recover
        except LoRAError as exc:
            summary = {"path": path, "error": str(exc)}
        except tf.errors.OpError as exc:
            summary = {"path": path, "error": exc.message}
        summaries.append(dict(summary, name=name))
    return summaries
