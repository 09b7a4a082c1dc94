"""Summaries of adapters in a store, for listings and the CLI (no TensorFlow)."""

from ..errors import AdapterNotFoundError, LoRAError, StoreError
from ..storage import UnsafeFileError, open_store
from .files import check_file_sizes, is_work_directory, read_config_bytes, read_verified
from .format import AdapterConfig
from .layout import adapters_root

__all__ = ["adapters_root", "inspect_adapter", "list_adapters"]


def inspect_adapter(path: str, *, verify: bool = False) -> dict:
    """Summarises an adapter from its config, without reading its tensors.

    The checkpoint files are always checked to be regular files of the sizes
    the config records (one listing); with ``verify`` they are read and their
    SHA-256 checked too.

    Args:
        path: The adapter directory or URL.
        verify: Also read every checkpoint file and check its SHA-256.

    Returns:
        A dict with ``path``, ``format_version``, ``library_version``,
        ``created``, ``architecture``, ``base_architecture``,
        ``base_fingerprint``, ``ranks`` (layer path -> rank), ``layers``
        (layer path -> ``{"type", "rank", "alpha", "scaling"}``, and
        ``"dora"``/``"rslora": True`` where used), ``saved``,
        ``variables`` (key -> shape, dtype, kind), ``num_parameters``,
        ``size_bytes``, ``config_sha256``, ``version`` (the save counter)
        and ``metadata``.

    Raises:
        AdapterNotFoundError: If there is no committed adapter at ``path``.
        CorruptAdapterError, AdapterVersionError: If the config is invalid, or
            a checkpoint file is missing, odd, of another size (or, with
            ``verify``, another SHA-256).
        StoreError: If the store cannot be reached.
    """
    store, path = open_store(path)
    directory, raw = read_config_bytes(store, path)
    config = AdapterConfig.from_json(raw, path)
    check_file_sizes(store, directory, config.files)
    if verify:
        for name, record in config.files.items():
            read_verified(store, directory, name, record)
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
        "layers": document["layers"],
        "saved": document["saved"],
        "variables": document["variables"],
        "num_parameters": config.num_parameters,
        "size_bytes": sum(f.size for f in config.files.values()) + config.json_bytes,
        "config_sha256": config.json_sha256,
        "version": config.version,
        "metadata": config.metadata,
    }


def list_adapters(directory: str, *, verify: bool = False) -> list[dict]:
    """Summarises every adapter directly inside ``directory``.

    Directories that are not adapters, or whose save never committed, are
    left out, and so are a save's work directories (``*.tmp-*``,
    ``*.old-*``). A broken adapter (a bad config, a truncated or missing
    file) is listed with its ``error`` instead of failing the whole listing.

    Args:
        directory: A directory of adapters, one subdirectory each (any store).
        verify: Also check every file's SHA-256 (reads every byte).

    Returns:
        One :func:`inspect_adapter` summary per adapter (with ``name``), or
        ``{"name", "path", "error"}`` for a broken one, sorted by name.

    Raises:
        StoreError: If the store cannot be reached.
    """
    store, directory = open_store(directory)
    try:
        entries = store.listdir(directory)
    except UnsafeFileError:
        return []
    # A local save killed between its renames leaves only NAME.old-*: NAME is still there.
    recoverable = {n.split(".old-")[0] for n in entries if ".old-" in n}
    names = {n for n, e in entries.items() if e.kind == "dir" and not is_work_directory(n)}
    summaries = []
    for name in sorted(names | recoverable):
        path = store.join(directory, name)
        try:
            summary = inspect_adapter(path, verify=verify)
        except AdapterNotFoundError:
            continue  # not an adapter, or a leftover with nothing committed to recover
        except StoreError:
            raise  # the store, not this adapter
        except LoRAError as exc:
            summary = {"path": path, "error": str(exc)}
        summaries.append(dict(summary, name=name))
    return summaries
