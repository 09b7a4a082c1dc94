"""The one interface to where bytes live (orbax's storage seam, without its machinery).

A :class:`Store` reads, writes, lists and removes files at paths of one
scheme, and commits a directory atomically through :class:`AtomicDirectory`
(orbax's ``TemporaryPath``: ``begin``/``write``/``finalize``/``abort``). Each
backend chooses how: a local disk renames directories, an object store writes
a marker file last. Nothing above this package asks which scheme a path has.

Storage knows nothing of adapters: files are bytes with a name, a size and,
when the caller knows it, a SHA-256. What reads are refused for (a symlink, a
file larger than asked for, one that changed while read) is an
:class:`UnsafeFileError`; the layer above says what it means for its files.
"""

import abc
import dataclasses
import hashlib
import uuid

__all__ = [
    "AtomicDirectory",
    "Entry",
    "Store",
    "UnsafeFileError",
    "WORK_MARKERS",
    "check_digest",
    "is_work_name",
    "new_tag",
]


WORK_MARKERS = (".tmp-", ".old-")
"""Infixes of an atomic write's work directories: never a directory of their own."""


class UnsafeFileError(Exception):
    """A file a store refuses to read: not a regular file, larger than the
    limit asked for, changed while it was read, or not what its hash says."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One name in a directory listing.

    Attributes:
        kind: ``"file"`` (a regular file or object), ``"dir"``, or ``"other"``
            (a symlink, device, FIFO: never read).
        size: The file's size in bytes (``None`` for directories).
    """

    kind: str
    size: int | None = None


def new_tag() -> str:
    """A fresh random tag for work names (``NAME.tmp-<tag>``, ``adapter-<tag>``)."""
    return uuid.uuid4().hex[:16]


def is_work_name(name: str) -> bool:
    """Whether ``name`` is an atomic write's temporary or previous version."""
    return any(marker in name for marker in WORK_MARKERS)


def check_digest(data: bytes, size: int, sha256: str, where: str) -> bytes:
    """Returns ``data`` if it has ``size`` bytes and SHA-256 ``sha256``.

    Raises:
        UnsafeFileError: If it has not.
    """
    if len(data) != size:
        raise UnsafeFileError(
            f"{where} has {'more than ' if len(data) > size else ''}{len(data)} bytes, "
            f"{size} were expected: the file is truncated or was replaced."
        )
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UnsafeFileError(f"{where} does not match its recorded SHA-256: it is corrupted.")
    return data


class AtomicDirectory(abc.ABC):
    """Writes a directory that readers see whole or not at all.

    ``begin`` lists what the directory holds now (one listing), ``write`` adds
    files, ``finalize(data)`` commits by writing the marker file last and
    removes what the previous version held and the new one does not; ``abort``
    removes what was written. Names given to ``write`` should come from
    :meth:`fresh_name`, so that an object store never overwrites a file the
    committed version still uses.
    """

    def __init__(self, store: "Store", path: str, marker: str):
        self.store = store
        self.path = path
        self.marker = marker
        self.tag = new_tag()
        self.written: list[str] = []
        self.existing: dict[str, Entry] = {}  # what begin() listed

    @abc.abstractmethod
    def begin(self) -> dict[str, Entry]:
        """Prepares the write; returns the entries the directory holds now.

        Raises:
            UnsafeFileError: If the path is a symlink or not a directory.
        """

    def fresh_name(self, stem: str) -> str:
        """A file-name stem no committed version uses (``stem`` where a commit
        replaces the whole directory)."""
        return f"{stem}-{self.tag}"

    @abc.abstractmethod
    def write(self, name: str, data: bytes) -> None:
        """Writes one file of the new version."""

    @abc.abstractmethod
    def finalize(self, data: bytes) -> list[str]:
        """Commits: the marker file (``data``) is written last. Returns leftovers
        it could not remove (the commit stands)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Removes what this write wrote; the committed version is untouched."""


class Store(abc.ABC):
    """Files at paths of one URL scheme. Paths are full paths or URLs."""

    @abc.abstractmethod
    def join(self, path: str, *parts: str) -> str:
        """``path/part/...`` in this store's spelling."""

    @abc.abstractmethod
    def read(self, path: str, limit: int) -> bytes:
        """The bytes of a regular file, refused past ``limit`` bytes before they are read.

        Raises:
            FileNotFoundError: If there is no such file.
            UnsafeFileError: If it is not a regular file or is larger than ``limit``.
            StoreError: If the store cannot be reached.
        """

    def read_verified(self, path: str, size: int, sha256: str) -> bytes:
        """The bytes of a file whose size and SHA-256 are known: read once, hashed once.

        Raises:
            FileNotFoundError, UnsafeFileError, StoreError: As :meth:`read`,
                and UnsafeFileError if the bytes are not the ones expected.
        """
        return check_digest(self.read(path, size), size, sha256, path)

    @abc.abstractmethod
    def write(self, path: str, data: bytes) -> None:
        """Writes (or replaces) one file in one step, creating parent directories."""

    @abc.abstractmethod
    def listdir(self, path: str) -> dict[str, Entry]:
        """The names directly inside ``path`` (empty if it does not exist).

        Raises:
            UnsafeFileError: If ``path`` is a symlink or not a directory.
            StoreError: If the store cannot be reached.
        """

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a file or directory is at ``path``."""

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Removes a file or a directory tree (missing is fine; links are never followed)."""

    def remove_file(self, path: str) -> None:
        """Removes one file known to be a file (missing is fine); on an object
        store one DELETE, where :meth:`remove` must first list a prefix."""
        self.remove(path)

    @abc.abstractmethod
    def atomic_directory(self, path: str, marker: str) -> AtomicDirectory:
        """The atomic commit this backend uses for a directory at ``path``,
        committed by writing its file ``marker`` last.

        Raises:
            UnsafeFileError: If ``path`` is a symbolic link.
        """

    def committed(self, path: str, marker: str) -> str | None:
        """Where the committed directory at ``path`` is read from, or ``None``.

        A directory is committed once its ``marker`` file exists. A backend
        whose commit has an intermediate state (a local disk between two
        renames) returns the complete previous version then.
        """
        return path if self.exists(self.join(path, marker)) else None

    def clean_leftovers(self, path: str, marker: str) -> list[str]:
        """Removes what killed atomic writes of ``path`` left (putting back a
        complete previous version where the new one never committed); returns
        what it touched."""
        return []

    @abc.abstractmethod
    def local_file(self, path: str, max_bytes: int) -> str:
        """A local file path holding the bytes at ``path`` (a download into the
        cache for a remote store), for readers that need a file (HDF5).

        Raises:
            FileNotFoundError: If there is no such file.
            StoreError: If it is larger than ``max_bytes`` or the store cannot be reached.
        """
