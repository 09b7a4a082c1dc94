"""A verified local cache in front of a remote store.

Files whose size and SHA-256 the caller knows (an adapter's checkpoint
files, named by its config) are content-addressed: ``CACHE/blobs/<sha256>``.
A hit is read from disk and hashed again (a copy changed on disk is
downloaded again); a miss is one ranged GET, hashed once, then kept. A new
save of an adapter has new hashes, so an entry never goes stale. Whole files
for readers that need a path (a store's ``base.h5``) are kept under
``CACHE/files/<key>/`` keyed by URL, size and ETag.

``LORA_CKPT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lora_ckpt`` or
``~/.cache/lora_ckpt``) is the root; ``LORA_CKPT_CACHE_MAX_BYTES`` (default
20 GiB) bounds it, least recently used entries going first.
"""

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time

from ..errors import StoreError
from .base import AtomicDirectory, Entry, Store, UnsafeFileError, check_digest, new_tag
from .local import LocalStore
from .remote import FsspecStore, _remote

__all__ = ["CACHE_ENV", "VerifiedCache", "cache_root"]


log = logging.getLogger("lora_ckpt.storage")

CACHE_ENV = "LORA_CKPT_CACHE_DIR"
CACHE_MAX_ENV = "LORA_CKPT_CACHE_MAX_BYTES"
DEFAULT_CACHE_MAX_BYTES = 20 << 30
_SHA256 = re.compile(r"[0-9a-f]{64}")
RECENT_SECONDS = 120.0
"""Entries used this recently are never evicted (a reader may hold them)."""

_local = LocalStore()


def cache_root() -> str:
    """``$LORA_CKPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lora_ckpt`` (``~/.cache/lora_ckpt``)."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lora_ckpt")


def _cache_limit() -> int:
    value = os.environ.get(CACHE_MAX_ENV, "")
    return int(value) if value.isdigit() else DEFAULT_CACHE_MAX_BYTES


def _publish(data: bytes, target: str) -> None:
    """Writes ``target`` whole or not at all (another process may win the race)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{new_tag()}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class VerifiedCache(Store):
    """A remote store whose verified reads and whole-file downloads are kept on disk."""

    def __init__(self, remote: FsspecStore, root: str | None = None):
        self.remote = remote
        self._root = root

    @property
    def root(self) -> str:
        """The cache directory (read from the environment when first needed)."""
        return self._root or cache_root()

    def join(self, path: str, *parts: str) -> str:
        return self.remote.join(path, *parts)

    def read(self, path: str, limit: int) -> bytes:
        return self.remote.read(path, limit)

    def read_verified(self, path: str, size: int, sha256: str) -> bytes:
        if not _SHA256.fullmatch(sha256):  # it becomes a file name below
            raise UnsafeFileError(f"{path}: {sha256!r:.80} is not a SHA-256 hex digest.")
        blob = os.path.join(self.root, "blobs", sha256)
        with contextlib.suppress(FileNotFoundError, UnsafeFileError):
            data = check_digest(_local.read(blob, size), size, sha256, blob)
            with contextlib.suppress(OSError):
                os.utime(blob)  # the LRU clock
            return data
        data = self.remote.read_verified(path, size, sha256)  # one GET, hashed once
        try:
            _publish(data, blob)
            self._trim(keep=blob)
        except OSError as exc:  # a full or read-only cache costs speed, not the read
            log.warning("cannot keep %s in the cache %s: %s", path, self.root, exc)
        return data

    def write(self, path: str, data: bytes) -> None:
        self.remote.write(path, data)

    def listdir(self, path: str) -> dict[str, Entry]:
        return self.remote.listdir(path)

    def exists(self, path: str) -> bool:
        return self.remote.exists(path)

    def remove(self, path: str) -> None:
        self.remote.remove(path)

    def remove_file(self, path: str) -> None:
        self.remote.remove_file(path)

    def atomic_directory(self, path: str, marker: str) -> AtomicDirectory:
        return self.remote.atomic_directory(path, marker)

    def committed(self, path: str, marker: str) -> str | None:
        return self.remote.committed(path, marker)

    def local_file(self, path: str, max_bytes: int) -> str:
        size, version = self.remote.stat(path)
        if size > max_bytes:
            raise StoreError(f"{path} has {size} bytes, more than the {max_bytes} accepted.")
        key = hashlib.sha256(f"{path}\0{size}\0{version}".encode()).hexdigest()
        target = os.path.join(self.root, "files", key, path.rsplit("/", 1)[-1] or "object")
        if os.path.isfile(target) and os.path.getsize(target) == size:
            os.utime(os.path.dirname(target))
            return target
        os.makedirs(os.path.dirname(target), exist_ok=True)
        work = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
        try:
            staged = os.path.join(work, "object")
            with _remote(path):
                self.remote.fs.get_file(path, staged)
            if os.path.getsize(staged) != size:
                raise StoreError(f"{path} changed while it was downloaded; retry.")
            os.replace(staged, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target

    def _trim(self, keep: str) -> None:
        """Removes least recently used blobs while the cache is over its limit."""
        limit = _cache_limit()
        root = os.path.join(self.root, "blobs")
        entries = []
        with contextlib.suppress(OSError), os.scandir(root) as scan:
            for entry in scan:
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    entries.append((info.st_mtime, entry.path, info.st_size))
        total = sum(size for _, _, size in entries)
        if total <= limit:
            return
        now = time.time()
        for mtime, path, size in sorted(entries):
            if total <= limit:
                return
            if path == keep or now - mtime < RECENT_SECONDS:
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)
                total -= size
        if total > limit:
            log.warning("the cache %s holds %d bytes, over its %d limit", root, total, limit)
