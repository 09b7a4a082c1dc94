"""The one way every loader reads an adapter's files: bounded, confined, hashed once.

An adapter directory is hostile until proven otherwise. A file it names is
read only if it is a plain name inside the directory and a regular file (no
``..``, no absolute path, no symlink, device or FIFO), only up to the size its
config declares, and only once: the bytes that are hashed are the bytes that
are parsed (:func:`checkpoint_reader` hands TensorFlow a private in-memory
copy, never the path again).

A save replaces a local adapter by renaming directories; if a reader comes
between the two renames (or after a crash there), :func:`resolve_adapter`
finds the complete previous version in its ``NAME.old-*`` sibling.
"""

import contextlib
import hashlib
import os
import stat
import uuid

from .._tf import tf
from ..errors import AdapterNotFoundError, CorruptAdapterError
from .format import CONFIG_FILE, FileRecord

MAX_CONFIG_BYTES = 16 << 20
"""The largest ``adapter_config.json`` a loader reads (a ViT-L config is ~1 MiB)."""

WORK_MARKERS = (".tmp-", ".old-")
"""Infixes of a save's work directories: never an adapter of their own."""

_gfile = tf.io.gfile


OBJECT_STORE_SCHEMES = ("s3://",)
"""URLs read through fsspec/s3fs and a local cache (lora_ckpt.state.object_store)."""


def is_object_store(path) -> bool:
    """Whether ``path`` is an object-storage URL (``s3://bucket/key``)."""
    return isinstance(path, str) and path.startswith(OBJECT_STORE_SCHEMES)


def is_local(path: str) -> bool:
    """Whether ``path`` is a plain local path (no ``scheme://``)."""
    return "://" not in path


def is_work_directory(name: str) -> bool:
    """Whether a directory name is a save's temporary or previous version."""
    return any(marker in name for marker in WORK_MARKERS)


def check_file_name(name: str, where: str) -> str:
    """Refuses a file name that is not a plain name inside the adapter directory."""
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


def _committed(path: str) -> bool:
    with contextlib.suppress(tf.errors.OpError, OSError):
        return _gfile.exists(f"{path}/{CONFIG_FILE}")
    return False


def _previous_version(candidate: str) -> bool:
    """Whether ``candidate`` is a complete adapter a save's rename left: a real
    directory (never a symlink to some other adapter) holding a committed config."""
    try:
        if not stat.S_ISDIR(os.lstat(candidate).st_mode):
            return False
    except OSError:
        return False
    return _committed(candidate)


def resolve_adapter(path: str) -> str:
    """The directory to read the adapter at ``path`` from.

    ``path`` itself if it holds a committed adapter; else, on a local disk,
    the previous version a save left in ``path.old-*`` when it was killed
    between its two renames.

    Raises:
        AdapterNotFoundError: If neither holds a committed adapter.
    """
    path = str(path).rstrip("/")
    if _committed(path):
        return path
    if is_local(path):
        parent, name = os.path.split(os.path.abspath(path))
        olds = []
        with contextlib.suppress(OSError):
            olds = sorted(n for n in os.listdir(parent) if n.startswith(f"{name}.old-"))
        for old in olds:
            if _previous_version(os.path.join(parent, old)):
                return os.path.join(parent, old)
    if not _gfile.exists(path):
        raise AdapterNotFoundError(f"No adapter at {path}: the directory does not exist.")
    raise AdapterNotFoundError(
        f"{path} has no {CONFIG_FILE}: it is not an adapter, or its save was "
        "interrupted before it committed."
    )


def _read_local(file_path: str, limit: int) -> bytes:
    try:
        info = os.lstat(file_path)
    except FileNotFoundError:
        raise CorruptAdapterError(f"{file_path} is missing.") from None
    except OSError as exc:
        raise CorruptAdapterError(f"Cannot read {file_path}: {exc}.") from exc
    if not stat.S_ISREG(info.st_mode):
        raise CorruptAdapterError(
            f"{file_path} is not a regular file (a symlink, directory, device or FIFO); "
            "an adapter holds plain files only."
        )
    if info.st_size > limit:
        raise CorruptAdapterError(
            f"{file_path} has {info.st_size} bytes, more than the {limit} expected."
        )
    try:
        # O_NOFOLLOW and O_NONBLOCK: a file swapped for a symlink or FIFO after
        # the lstat above is refused instead of followed or waited on.
        fd = os.open(file_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise CorruptAdapterError(f"Cannot open {file_path}: {exc}.") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CorruptAdapterError(f"{file_path} is not a regular file.")
        if info.st_size > limit:
            raise CorruptAdapterError(
                f"{file_path} has {info.st_size} bytes, more than the {limit} expected."
            )
        # Never ask for more than the file holds: ``limit`` comes from the config
        # and may be any integer (read(10**12) allocates, read(10**30) overflows).
        data = handle.read(info.st_size + 1)
    return _same_size(file_path, data, info.st_size)


def _same_size(file_path: str, data: bytes, size: int) -> bytes:
    if len(data) != size:
        raise CorruptAdapterError(
            f"{file_path} changed while it was read ({size} bytes, then {len(data)}); "
            "read the adapter again once its writer is done."
        )
    return data


def _read_remote(file_path: str, limit: int) -> bytes:
    try:
        if _gfile.isdir(file_path):
            raise CorruptAdapterError(f"{file_path} is a directory, not a file.")
        size = _gfile.stat(file_path).length
        if size > limit:
            raise CorruptAdapterError(f"{file_path} is larger than the {limit} bytes expected.")
        with _gfile.GFile(file_path, "rb") as handle:
            data = handle.read(size + 1)  # never more than the file holds (see _read_local)
    except tf.errors.NotFoundError:
        raise CorruptAdapterError(f"{file_path} is missing.") from None
    except tf.errors.OpError as exc:
        raise CorruptAdapterError(f"Cannot read {file_path}: {exc.message}") from exc
    return _same_size(file_path, data, size)


def read_bounded(directory: str, name: str, limit: int) -> bytes:
    """Reads file ``name`` of an adapter directory, refusing anything odd.

    Args:
        directory: The adapter directory.
        name: A plain file name.
        limit: The most bytes the file may have.

    Returns:
        The file's bytes.

    Raises:
        CorruptAdapterError: For a name outside the directory, a missing file,
            a non-regular file, or one larger than ``limit``.
    """
    check_file_name(name, directory)
    file_path = f"{directory}/{name}"
    return _read_local(file_path, limit) if is_local(directory) else _read_remote(file_path, limit)


def read_verified(directory: str, name: str, expected: FileRecord) -> bytes:
    """Reads a checkpoint file and checks its size and SHA-256 against the config.

    Raises:
        CorruptAdapterError: If it is missing, odd, truncated or altered.
    """
    data = read_bounded(directory, name, expected.size)
    if len(data) != expected.size:
        raise CorruptAdapterError(
            f"{directory}/{name} has {len(data)} bytes, the config says {expected.size}: "
            "the file is truncated or was replaced."
        )
    if hashlib.sha256(data).hexdigest() != expected.sha256:
        raise CorruptAdapterError(
            f"{directory}/{name} does not match the SHA-256 in its config: the file is corrupted."
        )
    return data


def file_record(path: str) -> FileRecord:
    """Size and SHA-256 of a file, as recorded in the adapter config."""
    digest = hashlib.sha256()
    size = 0
    with _gfile.GFile(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(size=size, sha256=digest.hexdigest())


@contextlib.contextmanager
def checkpoint_reader(files: dict[str, bytes], prefix: str):
    """A ``tf.train`` checkpoint reader over verified bytes, not over the disk.

    Args:
        files: File name -> bytes, already verified.
        prefix: The checkpoint prefix among the names.

    Yields:
        A checkpoint reader.

    Raises:
        CorruptAdapterError: If TensorFlow cannot parse the checkpoint.
    """
    scratch = f"ram://lora_ckpt_read/{uuid.uuid4().hex}"
    try:
        _gfile.makedirs(scratch)
        for name, data in files.items():
            with _gfile.GFile(f"{scratch}/{name}", "wb") as handle:
                handle.write(data)
        try:
            reader = tf.compat.v1.train.NewCheckpointReader(f"{scratch}/{prefix}")
        # TensorFlow's status codes arrive as OpError, RuntimeError, ValueError
        # (INVALID_ARGUMENT) or a bare IndexError (OUT_OF_RANGE, from a damaged index).
        except (tf.errors.OpError, RuntimeError, ValueError, IndexError) as exc:
            raise CorruptAdapterError(
                f"The checkpoint cannot be parsed: {type(exc).__name__} {exc!s:.300}"
            ) from exc
        yield reader
    finally:
        with contextlib.suppress(tf.errors.OpError):
            _gfile.rmtree(scratch)
