"""Size and SHA-256 records of an adapter's checkpoint files."""

import hashlib

from .._tf import tf
from .format import FileRecord


def file_record(path: str) -> FileRecord:
    """Size and SHA-256 of a file, as recorded in the adapter config."""
    digest = hashlib.sha256()
    size = 0
    with tf.io.gfile.GFile(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return FileRecord(size=size, sha256=digest.hexdigest())
