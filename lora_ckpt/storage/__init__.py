"""Where bytes live: one interface, and :func:`open_store`, the only place a URL
scheme is looked at.

- A plain path (or ``file://``): :class:`LocalStore` (no symlinks followed,
  regular files only, fsync, commit by directory rename).
- Any other URL, through fsspec: ``s3://`` (s3fs), ``gs://`` (gcsfs),
  ``az://`` (adlfs), ``memory://`` (fsspec's in-process store, for tests),
  committed by writing a marker file last, and read through a
  :class:`VerifiedCache` on local disk.

This package imports neither TensorFlow nor numpy.
"""

import functools

from .base import WORK_MARKERS, AtomicDirectory, Entry, Store, UnsafeFileError, is_work_name
from .cache import CACHE_ENV, VerifiedCache, cache_root
from .local import LocalStore
from .remote import FsspecStore

__all__ = [
    "CACHE_ENV",
    "WORK_MARKERS",
    "AtomicDirectory",
    "Entry",
    "FsspecStore",
    "LocalStore",
    "Store",
    "UnsafeFileError",
    "VerifiedCache",
    "cache_root",
    "is_url",
    "is_work_name",
    "open_store",
]


def _scheme(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else ""


def is_url(path) -> bool:
    """Whether ``path`` names a remote or in-memory store (``scheme://...``) rather than a
    local path."""
    return _scheme(str(path)) not in ("", "file")


@functools.cache
def _store(scheme: str) -> Store:
    if scheme in ("", "file"):
        return LocalStore()
    return VerifiedCache(FsspecStore(scheme))


def open_store(path) -> tuple[Store, str]:
    """The store that holds ``path``, and ``path`` in that store's spelling.

    Args:
        path: A local path, ``file://`` path, or URL (``s3://bucket/key``,
            ``gs://``, ``az://``, ``memory://``).

    Returns:
        ``(store, path)``: the path without a trailing slash (``file://``
        removed).

    Raises:
        MissingDependencyError: If the scheme's fsspec backend (s3fs, gcsfs,
            adlfs) is not installed.
        StoreError: For a scheme fsspec does not know.
    """
    text = str(path)
    scheme = _scheme(text)
    if scheme == "file":
        text = text[len("file://") :]
    stripped = text.rstrip("/") or text
    return _store(scheme), stripped
