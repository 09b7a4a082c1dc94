"""An adapter store: one base model and its adapters in one directory.

::

    STORE/
      base.json        {"model": tfimm name, "config": overrides, "lora": LoRA fields}
      base.h5          the base weights (a regular model's save_weights)
      adapters/NAME/   one adapter directory each (see lora_ckpt.state)

The demo writes a store; ``lora-ckpt serve`` and ``export`` read one. A store
may live in S3-compatible object storage (``s3://bucket/prefix``, same
layout): adapters and ``base.h5`` are then read through the local cache of
:mod:`lora_ckpt.state.object_store`, and :func:`upload_store` copies a local
store there.
"""

import dataclasses
import json
import os
import re
import tempfile

from tfimm.models import model_config

from .._tf import tf
from ..errors import BaseWeightsError, LoRAConfigError, StoreError
from ..models import create_model
from ..selection import classifier_paths
from ..state import load_base_weights, object_store
from ..state.files import MAX_CONFIG_BYTES, is_work_directory, read_bounded, resolve_adapter
from ..state.format import CONFIG_FILE
from ..state.object_store import is_object_store

BASE_CONFIG = "base.json"
BASE_WEIGHTS = "base.h5"
ADAPTERS = "adapters"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_BASE_CONFIG_BYTES = 1 << 20


def validate_adapter_name(name: str) -> str:
    """Returns ``name`` if it is a safe adapter name, else raises.

    Names are 1-64 letters, digits, ``_``, ``.`` or ``-``, starting with a
    letter or digit: never a path, so a request cannot reach outside the store.

    Raises:
        LoRAConfigError: For any other name.
    """
    if (
        not isinstance(name, str)
        or not _NAME.fullmatch(name)
        or ".." in name
        or is_work_directory(name)
    ):
        raise LoRAConfigError(
            f"Invalid adapter name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit."
        )
    return name


def _join(store: str, *parts: str) -> str:
    return (
        object_store.join(store, *parts) if is_object_store(store) else os.path.join(store, *parts)
    )


def adapter_path(store: str, name: str) -> str:
    """The directory (or URL) of adapter ``name`` in ``store`` (the name is validated)."""
    return _join(store, ADAPTERS, validate_adapter_name(name))


def adapter_config_bytes(store: str, name: str) -> bytes:
    """The bytes of adapter ``name``'s committed ``adapter_config.json`` (bounded).

    Their SHA-256 is the adapter's version: a service compares it with the
    version it loaded to pick up a new save.

    Raises:
        AdapterNotFoundError: If the store has no such committed adapter.
        CorruptAdapterError: If the config cannot be read.
        StoreError: If an object store cannot be reached.
    """
    path = adapter_path(store, name)
    if is_object_store(path):
        return object_store.read_adapter_config(path)
    return read_bounded(resolve_adapter(path), CONFIG_FILE, MAX_CONFIG_BYTES)


def store_adapters(store: str) -> list[str]:
    """Names of the committed adapters in ``store``, sorted.

    Raises:
        StoreError: If an object store cannot be reached.
    """
    if is_object_store(store):
        tree = object_store.list_directories(_join(store, ADAPTERS))
        return sorted(
            name
            for name, files in tree.items()
            if _NAME.fullmatch(name) and not is_work_directory(name) and CONFIG_FILE in files
        )
    root = os.path.join(store, ADAPTERS)
    if not tf.io.gfile.isdir(root):
        return []
    return sorted(
        name.rstrip("/")
        for name in tf.io.gfile.listdir(root)
        if _NAME.fullmatch(name.rstrip("/"))
        and not is_work_directory(name.rstrip("/"))
        and tf.io.gfile.exists(os.path.join(root, name, CONFIG_FILE))
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
        StoreError: If an object store cannot be reached.
    """
    if is_object_store(store):
        with tempfile.TemporaryDirectory(prefix="lora_ckpt-base-") as tmp:
            write_base(tmp, model_name, config, lora, regular_model)
            for name in (BASE_WEIGHTS, BASE_CONFIG):  # base.json last: the store exists
                object_store.upload_file(os.path.join(tmp, name), _join(store, name))
        return
    tf.io.gfile.makedirs(os.path.join(store, ADAPTERS))
    regular_model.save_weights(os.path.join(store, BASE_WEIGHTS))
    with tf.io.gfile.GFile(os.path.join(store, BASE_CONFIG), "w") as handle:
        json.dump({"model": model_name, "config": config, "lora": lora}, handle, indent=2)


def read_base_config(store: str) -> dict:
    """The parsed ``base.json`` of a store.

    Raises:
        StoreError: If the store has no ``base.json`` (or it is not JSON).
    """
    path = _join(store, BASE_CONFIG)
    missing = StoreError(
        f"{store} is not an adapter store (no {BASE_CONFIG}); run `lora-ckpt demo` "
        "to create one (and lora_ckpt.serving.store.upload_store to copy it to object "
        "storage), or pass --model and --base-weights."
    )
    if is_object_store(path):
        try:
            text = object_store.read_object(path, MAX_BASE_CONFIG_BYTES)
        except FileNotFoundError:
            raise missing from None
    else:
        if not tf.io.gfile.exists(path):
            raise missing
        with tf.io.gfile.GFile(path, "rb") as handle:
            text = handle.read()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StoreError(f"{path} is not valid JSON: {exc}.") from None


def _has_base_config(store: str) -> bool:
    path = _join(store, BASE_CONFIG)
    return object_store.exists(path) if is_object_store(path) else tf.io.gfile.exists(path)


def _local_base_weights(path: str) -> str | None:
    """A local path to load base weights from (downloaded to the cache for a URL),
    or ``None`` if there are none."""
    if is_object_store(path):
        try:
            return object_store.fetch_file(path)
        except FileNotFoundError:
            return None
    if tf.io.gfile.exists(path) or tf.io.gfile.exists(path + ".index"):
        return path
    return None


def store_base_weights(store: str, base_weights: str | None = None) -> str | None:
    """A local path of a store's base weights (``base_weights`` if given), or ``None``.

    Args:
        store: The store directory or URL.
        base_weights: Another base weights file or URL to use.

    Returns:
        A local file or checkpoint prefix (an object store's is downloaded into
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


def upload_store(local: str, url: str, overwrite: bool = False) -> list[str]:
    """Copies a local store to object storage: ``base.h5``, then each adapter
    (committed atomically, see :func:`lora_ckpt.state.object_store.upload_adapter`),
    then ``base.json`` (which makes the prefix a store).

    Args:
        local: A local store directory.
        url: Its destination, e.g. ``s3://bucket/store``.
        overwrite: Replace adapters that already exist at ``url``.

    Returns:
        The names of the adapters uploaded.

    Raises:
        StoreError: If ``local`` is not a store, or the object store cannot be reached.
        AdapterExistsError: If an adapter exists at ``url`` and not ``overwrite``.
        CorruptAdapterError: If a local adapter fails its checks (nothing of it is uploaded).
    """
    if not os.path.isfile(os.path.join(local, BASE_CONFIG)):
        raise StoreError(f"{local} is not an adapter store (no {BASE_CONFIG}).")
    if os.path.isfile(os.path.join(local, BASE_WEIGHTS)):
        object_store.upload_file(os.path.join(local, BASE_WEIGHTS), _join(url, BASE_WEIGHTS))
    names = store_adapters(local)
    for name in names:
        object_store.upload_adapter(
            adapter_path(local, name), adapter_path(url, name), overwrite=overwrite
        )
    object_store.upload_file(os.path.join(local, BASE_CONFIG), _join(url, BASE_CONFIG))
    return names
