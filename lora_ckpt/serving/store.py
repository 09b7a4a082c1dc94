"""An adapter store: one base model and its adapters in one directory.

::

    STORE/
      base.json        {"model": tfimm name, "config": overrides, "lora": LoRA fields}
      base.h5          the base weights (a regular model's save_weights)
      adapters/NAME/   one adapter directory each (see lora_ckpt.state)

The demo writes a store; ``lora-ckpt serve`` and ``export`` read one. A store
may live in any store of :mod:`lora_ckpt.storage` (``s3://bucket/prefix``,
``gs://``, ``az://``, ``memory://``; same layout): a remote ``base.h5`` is
read through the verified local cache, and :func:`upload_store` copies a
local store there.
"""

import dataclasses
import json
import os
import tempfile

from tfimm.models import model_config

from ..errors import AdapterNotFoundError, BaseWeightsError, StoreError
from ..models import create_model
from ..selection import classifier_paths
from ..state import load_base_weights
from ..state.atomic import begin_write, commit_files
from ..state.files import read_config_bytes, read_verified
from ..state.format import CONFIG_FILE, AdapterConfig
from ..state.layout import (  # the store's layout, re-exported (in __all__)
    ADAPTERS,
    BASE_CONFIG,
    BASE_WEIGHTS,
    adapter_path,
    is_adapter_name,
    validate_adapter_name,
)
from ..storage import UnsafeFileError, open_store

__all__ = [
    "ADAPTERS",
    "BASE_CONFIG",
    "BASE_WEIGHTS",
    "adapter_config_bytes",
    "adapter_path",
    "build_base_model",
    "copy_adapter",
    "is_adapter_name",
    "read_base_config",
    "store_adapters",
    "store_base_weights",
    "upload_store",
    "validate_adapter_name",
    "write_base",
]


MAX_BASE_CONFIG_BYTES = 1 << 20
MAX_BASE_BYTES = 64 << 30
"""The largest base weights file read from a store."""


def _join(store: str, *parts: str) -> str:
    backend, store = open_store(store)
    return backend.join(store, *parts)


def adapter_config_bytes(store: str, name: str) -> bytes:
    """The bytes of adapter ``name``'s committed ``adapter_config.json`` (bounded).

    Their SHA-256 is the adapter's version: a service compares it with the
    version it loaded to pick up a new save.

    Raises:
        AdapterNotFoundError: If the store has no such committed adapter.
        CorruptAdapterError: If the config cannot be read.
        StoreError: If the store cannot be reached.
    """
    backend, path = open_store(adapter_path(store, name))
    return read_config_bytes(backend, path)[1]


def store_adapters(store: str) -> list[str]:
    """Names of the committed adapters in ``store``, sorted (one listing; on an
    object store a directory whose first save never committed is listed, and
    reading it says so).

    Raises:
        StoreError: If the store cannot be reached.
    """
    backend, store = open_store(store)
    root = backend.join(store, ADAPTERS)
    try:
        entries = backend.listdir(root)
    except UnsafeFileError:
        return []
    return sorted(
        name
        for name, entry in entries.items()
        if entry.kind == "dir"
        and is_adapter_name(name)
        # Costs nothing on an object store, which says so when the config is read.
        and backend.committed(backend.join(root, name), CONFIG_FILE) is not None
    )


def write_base(store: str, model_name: str, config: dict, lora: dict, regular_model) -> None:
    """Writes ``base.json`` and ``base.h5`` of a store.

    Args:
        store: The store directory (created if needed) or URL.
        model_name: The tfimm model name.
        config: Config overrides the base was built with (JSON-serialisable).
        lora: LoRA fields serving models get (``lora_layer_groups``, ...).
        regular_model: The trained regular base model.

    Raises:
        StoreError: If the store cannot be reached.
    """
    backend, store = open_store(store)
    with tempfile.TemporaryDirectory(prefix="lora_ckpt-base-") as tmp:
        # h5py writes a local file; the store gets its bytes.
        regular_model.save_weights(os.path.join(tmp, BASE_WEIGHTS))
        with open(os.path.join(tmp, BASE_WEIGHTS), "rb") as handle:
            weights = handle.read()
    backend.write(backend.join(store, BASE_WEIGHTS), weights)
    text = json.dumps({"model": model_name, "config": config, "lora": lora}, indent=2)
    backend.write(backend.join(store, BASE_CONFIG), text.encode())  # last: the store exists


def read_base_config(store: str) -> dict:
    """The parsed ``base.json`` of a store.

    Raises:
        StoreError: If the store has no ``base.json`` (or it is not JSON), or
            cannot be reached.
    """
    backend, store = open_store(store)
    path = backend.join(store, BASE_CONFIG)
    try:
        text = backend.read(path, MAX_BASE_CONFIG_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(
            f"{store} is not an adapter store (no {BASE_CONFIG}); run `lora-ckpt demo` "
            "to create one (and lora_ckpt.serving.store.upload_store to copy it to another "
            "store), or pass --model and --base-weights."
        ) from None
    except UnsafeFileError as exc:
        raise StoreError(f"{path} cannot be read: {exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{path} is not valid JSON: {exc}.") from None


def _has_base_config(store: str) -> bool:
    backend, store = open_store(store)
    return backend.exists(backend.join(store, BASE_CONFIG))


def _local_base_weights(path: str) -> str | None:
    """A local path to load base weights from (downloaded to the cache for a URL),
    or ``None`` if there are none."""
    backend, path = open_store(path)
    if not (backend.exists(path) or backend.exists(path + ".index")):
        return None
    try:
        return backend.local_file(path, MAX_BASE_BYTES)
    except FileNotFoundError:
        return None


def store_base_weights(store: str, base_weights: str | None = None) -> str | None:
    """A local path of a store's base weights (``base_weights`` if given), or ``None``.

    Args:
        store: The store directory or URL.
        base_weights: Another base weights file or URL to use.

    Returns:
        A local file or checkpoint prefix (a remote store's is downloaded into
        the cache once per version), or ``None`` if there is none.
    """
    return _local_base_weights(base_weights or _join(store, BASE_WEIGHTS))


def build_base_model(
    store: str,
    model_name: str | None = None,
    base_weights: str | None = None,
    overrides: dict | None = None,
):
    """Builds the LoRA model of a store with its base weights loaded.

    Args:
        store: The store directory or URL (``base.h5`` of an object store is
            downloaded into the local cache once per version).
        model_name: Overrides the store's model (then ``base.json`` is optional).
        base_weights: Overrides the store's ``base.h5``.
        overrides: Config fields to change (e.g. ``nb_classes`` for an
            adapter with a head of its own width: that head is then left out
            of the base weights).

    Returns:
        ``(model, base_config)``.

    Raises:
        StoreError: If the store has no ``base.json`` and no model is named.
        BaseWeightsError: If named base weights do not exist or do not fit.
    """
    if model_name is None or _has_base_config(store):
        base = read_base_config(store)
    else:
        base = {"model": model_name, "config": {}, "lora": {}}
    if model_name is not None:
        base["model"] = model_name
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in base["config"].items()}
    lora = {k: tuple(v) if isinstance(v, list) else v for k, v in base["lora"].items()}
    current = {**dataclasses.asdict(model_config(base["model"])), **config}
    changed = {k: v for k, v in (overrides or {}).items() if current.get(k) != v}
    model = create_model(base["model"], **{**config, **changed}, **lora)
    # A classifier of another width keeps its fresh weights (the adapter brings its own).
    skip = classifier_paths(model) if "nb_classes" in changed else None
    local = _local_base_weights(base_weights or _join(store, BASE_WEIGHTS))
    if local is not None:
        load_base_weights(model, local, skip=skip)
    elif base_weights is not None:
        raise BaseWeightsError(f"Base weights {base_weights} not found.")
    return model, base


def copy_adapter(source: str, target: str, overwrite: bool = False) -> str:
    """Copies an adapter between stores, verified and committed atomically.

    Each file is read once and checked against the source config's size and
    SHA-256, then written under the target's fresh names; the config, naming
    them, is written last.

    Args:
        source: The adapter's directory or URL.
        target: Where it goes.
        overwrite: Replace an adapter already at ``target``.

    Returns:
        ``target``.

    Raises:
        AdapterNotFoundError, CorruptAdapterError: If ``source`` is not a valid adapter.
        AdapterExistsError: If an adapter is at ``target`` and not ``overwrite``.
        StoreError: If a store cannot be reached.
    """
    backend, source = open_store(source)
    directory, raw = read_config_bytes(backend, source)
    config = AdapterConfig.from_json(raw, source)
    files = {name: read_verified(backend, directory, name, r) for name, r in config.files.items()}
    atomic = begin_write(target, overwrite)
    # A checkpoint's index does not name its data file: renaming both keeps it valid.
    prefix = atomic.fresh_name("adapter")
    renamed = {name: name.replace(config.checkpoint_prefix, prefix, 1) for name in files}
    config.checkpoint_prefix = prefix
    config.files = {renamed[name]: record for name, record in config.files.items()}
    commit_files(
        atomic, {renamed[name]: data for name, data in files.items()}, config.to_json().encode()
    )
    return target


def upload_store(local: str, url: str, overwrite: bool = False) -> list[str]:
    """Copies a store to another (a local store to object storage): ``base.h5``,
    then each adapter (:func:`copy_adapter`), then ``base.json`` (which makes
    the target a store).

    Args:
        local: A store directory or URL.
        url: Its destination, e.g. ``s3://bucket/store``.
        overwrite: Replace adapters that already exist at ``url``.

    Returns:
        The names of the adapters copied.

    Raises:
        StoreError: If ``local`` is not a store, or a store cannot be reached.
        AdapterExistsError: If an adapter exists at ``url`` and not ``overwrite``.
        CorruptAdapterError: If an adapter fails its checks (nothing of it is copied).
    """
    source, local = open_store(local)
    target, url = open_store(url)
    base_config = read_base_config(local)
    try:
        weights = source.read(source.join(local, BASE_WEIGHTS), MAX_BASE_BYTES)
    except FileNotFoundError:
        weights = None
    if weights is not None:
        target.write(target.join(url, BASE_WEIGHTS), weights)
    names = []
    for name in store_adapters(local):
        try:
            copy_adapter(adapter_path(local, name), adapter_path(url, name), overwrite=overwrite)
        except AdapterNotFoundError:
            continue  # a directory with no committed adapter
        names.append(name)
    text = json.dumps(base_config, indent=2).encode()
    target.write(target.join(url, BASE_CONFIG), text)
    return names
