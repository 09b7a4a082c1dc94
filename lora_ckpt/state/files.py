"""The one way every loader reads an adapter's files, from any store: bounded,
confined, hashed once.

An adapter directory is hostile until proven otherwise. A file it names is
read only if it is a plain name inside the directory and a regular file (no
``..``, no absolute path, no symlink, device or FIFO), only up to the size its
config declares, and only once: the bytes that are hashed are the bytes that
are parsed. Bytes move through :mod:`lora_ckpt.storage` only; this module
says what a refused read means for an adapter (:class:`CorruptAdapterError`).
No TensorFlow here: listings and inspections start without it.
"""

import re
import time

from ..errors import AdapterNotFoundError, CorruptAdapterError, StoreError
from ..storage import Store, UnsafeFileError, is_work_name
from .format import CONFIG_FILE, FileRecord

__all__ = [
    "MAX_CONFIG_BYTES",
    "check_file_sizes",
    "is_adapter_file",
    "is_work_directory",
    "read_config_bytes",
    "read_verified",
]


MAX_CONFIG_BYTES = 16 << 20
"""The largest ``adapter_config.json`` a loader reads (a ViT-L config is ~1 MiB)."""

_CHECKPOINT_FILE = re.compile(r"adapter(-[0-9a-f]{8,32})?\.(index|data-00000-of-00001)")


def is_work_directory(name: str) -> bool:
    """Whether a directory name is a save's temporary or previous version."""
    return is_work_name(name)


def is_adapter_file(name: str) -> bool:
    """Whether ``name`` is a file an adapter directory may hold."""
    return name == CONFIG_FILE or bool(_CHECKPOINT_FILE.fullmatch(name))


def _check_file_name(name: str, where: str) -> str:
    """Refuses a file name that is not a plain name inside the adapter directory.

    Raises:
        CorruptAdapterError: For ``..``, a path, an empty name or a NUL.
    """
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
    ):
        raise CorruptAdapterError(
            f"{where} names the file {name!r}, which is not a plain file name inside the "
            "adapter directory; the adapter was tampered with."
        )
    return name


_RESOLVE_ATTEMPTS = 5
"""Looks for the committed config while a local save's renames may be under way."""


def read_config_bytes(store: Store, path: str) -> tuple[str, bytes]:
    """The committed ``adapter_config.json`` of the adapter at ``path`` (bounded).

    A local save replaces ``NAME`` by two renames; a reader that looks between
    them, or whose directory is renamed away as it reads, looks again (a few
    times, a millisecond apart) before it says there is no adapter.

    Args:
        store: The store holding ``path`` (:func:`lora_ckpt.storage.open_store`).
        path: The adapter directory in that store.

    Returns:
        ``(directory, bytes)``: the directory the adapter is read from
        (``path``, or the complete previous version a killed local save left
        beside it) and the config's bytes.

    Raises:
        AdapterNotFoundError: If there is no committed adapter at ``path``.
        CorruptAdapterError: If the config is not a regular file or too large.
        StoreError: If the store cannot be reached.
    """
    for attempt in range(_RESOLVE_ATTEMPTS):
        directory = store.committed(path, CONFIG_FILE)
        if directory is not None:
            try:
                return directory, store.read(store.join(directory, CONFIG_FILE), MAX_CONFIG_BYTES)
            except FileNotFoundError:
                pass  # renamed away as it was read: look again
            except (UnsafeFileError, NotADirectoryError) as exc:
                raise CorruptAdapterError(f"{path}: {exc}") from None
            except StoreError:
                raise
            except OSError as exc:
                raise CorruptAdapterError(f"Cannot read the config of {path}: {exc}.") from exc
        # Committed a moment ago, or a directory is there: a save may be mid-way.
        if attempt + 1 == _RESOLVE_ATTEMPTS or (directory is None and not store.exists(path)):
            break
        time.sleep(0.001 * (attempt + 1))
    if not store.exists(path):
        raise AdapterNotFoundError(f"No adapter at {path}: the directory does not exist.")
    raise AdapterNotFoundError(
        f"{path} has no {CONFIG_FILE}: it is not an adapter, or its save was "
        "interrupted before it committed."
    )


def read_verified(store: Store, directory: str, name: str, expected: FileRecord) -> bytes:
    """Reads a checkpoint file and checks its size and SHA-256 against the config.

    Raises:
        CorruptAdapterError: If the name is not plain, or the file is missing,
            odd, truncated or altered.
        StoreError: If the store cannot be reached.
    """
    _check_file_name(name, directory)
    file_path = store.join(directory, name)
    try:
        return store.read_verified(file_path, expected.size, expected.sha256)
    except FileNotFoundError:
        raise CorruptAdapterError(f"{file_path} is missing.") from None
    except UnsafeFileError as exc:
        raise CorruptAdapterError(str(exc)) from None
    except StoreError:
        raise
    except OSError as exc:
        raise CorruptAdapterError(f"Cannot read {file_path}: {exc}.") from exc


def check_file_sizes(store: Store, directory: str, files: dict[str, FileRecord]) -> None:
    """Checks, from one listing, that each file the config names is a regular
    file of the recorded size (a truncated or swapped file is caught without
    reading it).

    Raises:
        CorruptAdapterError: For a missing, odd or wrongly sized file.
        StoreError: If the store cannot be reached.
    """
    try:
        entries = store.listdir(directory)
    except UnsafeFileError as exc:
        raise CorruptAdapterError(str(exc)) from None
    for name, record in files.items():
        _check_file_name(name, directory)
        entry = entries.get(name)
        if entry is None:
            raise CorruptAdapterError(f"{store.join(directory, name)} is missing.")
        if entry.kind != "file":
            raise CorruptAdapterError(
                f"{store.join(directory, name)} is not a regular file; an adapter holds "
                "plain files only."
            )
        if entry.size != record.size:
            raise CorruptAdapterError(
                f"{store.join(directory, name)} has {entry.size} bytes, the config says "
                f"{record.size}: the file is truncated or was replaced."
            )
