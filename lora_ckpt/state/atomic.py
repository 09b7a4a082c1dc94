"""Atomic replacement of an adapter directory (orbax's protocol, no machinery).

A save writes the whole adapter into a temporary sibling ``NAME.tmp-<id>``
and then commits it:

- on a local file system by renaming directories: ``NAME`` -> ``NAME.old-<id>``,
  ``NAME.tmp-<id>`` -> ``NAME``, then deleting the old one;
- on file systems without directory renames (``ram://``, ``gs://``,
  ``s3://``) file by file, with ``adapter_config.json`` as the commit marker:
  the old config is deleted first, the data files are moved in, the new
  config is moved in last.

A reader refuses a directory without ``adapter_config.json``, and the config
records the size and SHA-256 of every checkpoint file, so a save killed at any
point leaves either the previous complete adapter or no loadable adapter,
never a mix. One writer per adapter path at a time.
"""

import os
import uuid
from collections.abc import Callable

from .._tf import tf
from ..errors import AdapterExistsError
from .format import CONFIG_FILE

_gfile = tf.io.gfile


def is_local(path: str) -> bool:
    """Whether ``path`` is a plain local path (no ``scheme://``)."""
    return "://" not in path


def _fsync_tree(directory: str) -> None:
    # Survive a power loss too, not only a killed process: flush the files,
    # then the directory entries.
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_local(tmp: str, path: str) -> None:
    _fsync_tree(tmp)
    old = None
    if _gfile.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        _gfile.rmtree(old)


def _commit_by_files(tmp: str, path: str) -> None:
    config = f"{path}/{CONFIG_FILE}"
    if _gfile.exists(config):
        _gfile.remove(config)  # the old adapter is uncommitted from here on
    _gfile.makedirs(path)
    names = sorted(_gfile.listdir(tmp))
    for name in names:
        if name != CONFIG_FILE:
            _gfile.rename(f"{tmp}/{name}", f"{path}/{name}", overwrite=True)
    _gfile.rename(f"{tmp}/{CONFIG_FILE}", config, overwrite=True)
    _gfile.rmtree(tmp)


def check_writable(path: str, overwrite: bool, known_files) -> None:
    """Refuses to replace an adapter unless asked, and never clobbers foreign files.

    Args:
        path: The adapter directory.
        overwrite: Whether an existing adapter may be replaced.
        known_files: File names an adapter directory may hold.

    Raises:
        AdapterExistsError: If ``path`` holds an adapter and ``overwrite`` is
            false, or holds files that are not an adapter's.
    """
    if not _gfile.exists(path):
        return
    if not _gfile.isdir(path):
        raise AdapterExistsError(f"{path} exists and is not a directory; choose another path.")
    names = set(_gfile.listdir(path))
    foreign = sorted(n.rstrip("/") for n in names if n.rstrip("/") not in known_files)
    if foreign:
        raise AdapterExistsError(
            f"{path} holds files that are not part of an adapter ({foreign[:5]}); "
            "refusing to replace it. Choose an empty or new directory."
        )
    if CONFIG_FILE in names and not overwrite:
        raise AdapterExistsError(
            f"An adapter already exists at {path}; pass overwrite=True to replace it."
        )


def write_directory_atomically(path: str, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_dir)`` to fill a temporary sibling, then commits it to ``path``.

    Args:
        path: The final directory.
        write: Writes every file of the directory into the given directory,
            ``adapter_config.json`` included.

    Raises:
        Whatever ``write`` raises; the temporary directory is removed and
        ``path`` is untouched then.
    """
    path = path.rstrip("/")
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    parent = os.path.dirname(path)
    if parent:
        _gfile.makedirs(parent)
    _gfile.makedirs(tmp)
    try:
        write(tmp)
        (_commit_local if is_local(path) else _commit_by_files)(tmp, path)
    except BaseException:
        if _gfile.exists(tmp):
            _gfile.rmtree(tmp)
        raise
