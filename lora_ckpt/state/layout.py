"""Where things are in an adapter store (no TensorFlow: the CLI lists and
inspects stores without it).

::

    STORE/
      base.json        {"model": tfimm name, "config": overrides, "lora": LoRA fields}
      base.h5          the base weights (a regular model's save_weights)
      adapters/NAME/   one adapter directory each
"""

import os
import re

from ..errors import LoRAConfigError, StoreError
from ..storage import UnsafeFileError, is_url, is_work_name, open_store

__all__ = [
    "ADAPTERS",
    "BASE_CONFIG",
    "BASE_WEIGHTS",
    "DEFAULT_STORE",
    "adapter_path",
    "adapters_root",
    "is_adapter_name",
    "resolve_adapter_ref",
    "validate_adapter_name",
]


DEFAULT_STORE = "lora_ckpt_store"
"""The store the demo writes and the commands use when none is named."""
BASE_CONFIG = "base.json"
BASE_WEIGHTS = "base.h5"
ADAPTERS = "adapters"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_adapter_name(name) -> bool:
    """Whether ``name`` is a safe adapter name (see :func:`validate_adapter_name`)."""
    return (
        isinstance(name, str)
        and bool(_NAME.fullmatch(name))
        and ".." not in name
        and not is_work_name(name)
    )


def validate_adapter_name(name: str) -> str:
    """Returns ``name`` if it is a safe adapter name, else raises.

    Names are 1-64 letters, digits, ``_``, ``.`` or ``-``, starting with a
    letter or digit: never a path, so a request cannot reach outside the store.

    Raises:
        LoRAConfigError: For any other name.
    """
    if not is_adapter_name(name):
        raise LoRAConfigError(
            f"Invalid adapter name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit."
        )
    return name


def adapter_path(store: str, name: str) -> str:
    """The directory (or URL) of adapter ``name`` in ``store`` (the name is validated)."""
    backend, store = open_store(store)
    return backend.join(store, ADAPTERS, validate_adapter_name(name))


def resolve_adapter_ref(ref: str, store: str) -> str:
    """An adapter given as a directory, a URL, or a name in ``store``.

    Args:
        ref: An adapter directory, an adapter URL, or the name of an adapter
            of ``store``.
        store: The store names are looked up in.

    Returns:
        The adapter's directory or URL.

    Raises:
        LoRAConfigError: If ``ref`` is neither a path nor a valid name.

    A bare word is a directory if one of that name is in the working directory,
    else an adapter of ``store``.
    """
    if is_url(ref) or "/" in ref or os.sep in ref or os.path.isdir(ref):
        return ref
    return adapter_path(store, ref)


def adapters_root(path: str) -> str:
    """``path/adapters`` if ``path`` is a store (it has one), else ``path`` itself:
    a store or a directory of adapters, as the CLI takes them.

    Raises:
        StoreError: If ``path`` does not exist or the store cannot be reached.
    """
    store, path = open_store(path)
    try:
        entries = store.listdir(path)
    except UnsafeFileError:
        raise StoreError(f"{path} is not a directory of adapters or a store.") from None
    if not entries and not store.exists(path):
        raise StoreError(f"{path} is not a directory of adapters or a store.")
    entry = entries.get(ADAPTERS)
    return store.join(path, ADAPTERS) if entry is not None and entry.kind == "dir" else path
