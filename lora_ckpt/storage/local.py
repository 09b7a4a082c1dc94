"""Local files: no symlink followed, regular files only, commit by directory rename.

A commit writes ``NAME.tmp-<tag>``, flushes it (fsync), renames ``NAME`` ->
``NAME.old-<tag>`` and ``NAME.tmp-<tag>`` -> ``NAME``, flushes the parent, then
removes the old version. Between the two renames (or after a crash there)
:meth:`LocalStore.committed` finds the complete old version in
``NAME.old-<tag>``; the next write of ``NAME`` puts it back or removes it.
"""

import contextlib
import os
import shutil
import stat
import warnings

from .base import AtomicDirectory, Entry, Store, UnsafeFileError, new_tag

__all__ = ["LocalStore"]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


class _RenameCommit(AtomicDirectory):
    """orbax's rename commit: a temporary sibling, made durable, renamed into place."""

    def begin(self) -> dict[str, Entry]:
        self.store.clean_leftovers(self.path, self.marker)
        entries = self.existing = self.store.listdir(self.path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self.tmp = f"{self.path}.tmp-{self.tag}"
        os.mkdir(self.tmp)
        return entries

    def fresh_name(self, stem: str) -> str:
        return stem  # the whole directory is replaced: names never clash

    def write(self, name: str, data: bytes) -> None:
        with open(os.path.join(self.tmp, name), "xb") as handle:
            handle.write(data)
            handle.flush()
            # Survive a power loss too, not only a killed process.
            os.fsync(handle.fileno())
        self.written.append(name)

    def finalize(self, data: bytes) -> list[str]:
        self.write(self.marker, data)
        _fsync_dir(self.tmp)
        old = None
        if os.path.lexists(self.path):
            old = f"{self.path}.old-{self.tag}"
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))  # the commit, made durable
        if old is None:
            return []
        try:
            # The marker first: a reader never takes a half-removed old version
            # for a committed one.
            self.store.remove(os.path.join(old, self.marker))
            self.store.remove(old)
        except OSError as exc:
            warnings.warn(
                f"The directory was committed, but removing {old} failed ({exc}); "
                "the next write (or `lora-ckpt gc`) removes it.",
                stacklevel=3,
            )
            return [old]
        return []

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.store.remove(self.tmp)


class LocalStore(Store):
    """Plain paths on a local disk."""

    def join(self, path: str, *parts: str) -> str:
        return os.path.join(path, *parts)

    def read(self, path: str, limit: int) -> bytes:
        info = os.lstat(path)  # FileNotFoundError for a missing file, as documented
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(
                f"{path} is not a regular file (a symlink, directory, device or FIFO); "
                "only plain files are read."
            )
        if info.st_size > limit:
            raise UnsafeFileError(
                f"{path} has {info.st_size} bytes, more than the {limit} expected."
            )
        try:
            # O_NOFOLLOW and O_NONBLOCK: a file swapped for a symlink or FIFO after
            # the lstat above is refused instead of followed or waited on.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise UnsafeFileError(f"Cannot open {path}: {exc}.") from exc
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
                raise UnsafeFileError(f"{path} changed into something else while it was opened.")
            # Never ask for more than the file holds: ``limit`` may come from a
            # hostile config and be any integer (read(10**30) overflows).
            data = handle.read(info.st_size + 1)
        if len(data) != info.st_size:
            raise UnsafeFileError(
                f"{path} changed while it was read ({info.st_size} bytes, then {len(data)})."
            )
        return data

    def write(self, path: str, data: bytes) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{new_tag()}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)  # readers see the old file or the new one
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def listdir(self, path: str) -> dict[str, Entry]:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return {}
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeFileError(f"{path} is a symbolic link; links are not followed.")
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafeFileError(f"{path} is not a directory.")
        entries = {}
        with os.scandir(path) as scan:
            for item in scan:
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    mode = item.stat(follow_symlinks=False)
                    kind = _kind(mode.st_mode)
                    entries[item.name] = Entry(kind, mode.st_size if kind == "file" else None)
        return entries

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def remove(self, path: str) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path)  # rmtree unlinks links inside, never follows them
        else:
            os.unlink(path)  # a link itself, never what it points to

    def atomic_directory(self, path: str, marker: str) -> AtomicDirectory:
        if os.path.islink(path):
            raise UnsafeFileError(
                f"{path} is a symbolic link; write to the directory it points to, or another "
                "path (replacing the link would leave its target behind, half-owned)."
            )
        return _RenameCommit(self, path, marker)

    def _previous_versions(self, path: str) -> list[str]:
        parent, name = os.path.split(os.path.abspath(path))
        with contextlib.suppress(OSError):
            return sorted(
                os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(f"{name}.old-")
            )
        return []

    def committed(self, path: str, marker: str) -> str | None:
        if os.path.lexists(os.path.join(path, marker)):
            return path
        for old in self._previous_versions(path):
            # A real directory (never a link to another one) with its marker.
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(old).st_mode) and os.path.lexists(
                    os.path.join(old, marker)
                ):
                    return old
        return None

    def clean_leftovers(self, path: str, marker: str) -> list[str]:
        touched = []
        if not os.path.lexists(os.path.join(path, marker)):
            current = self.committed(path, marker)
            if current is not None and current != path:
                self.remove(path)  # an uncommitted directory in the way
                os.rename(current, path)
                touched.append(current)
        parent, name = os.path.split(os.path.abspath(path))
        with contextlib.suppress(OSError):
            for other in sorted(os.listdir(parent)):
                if other.startswith((f"{name}.tmp-", f"{name}.old-")):
                    self.remove(os.path.join(parent, other))
                    touched.append(os.path.join(os.path.dirname(path), other))
        return touched

    def local_file(self, path: str, max_bytes: int) -> str:
        return path
