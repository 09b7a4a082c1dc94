"""tf.train.Checkpoint files as bytes: written and parsed in TensorFlow's
private in-memory file system, never on the store.

Reading from bytes means TensorFlow parses exactly the bytes that were
hashed (never the path again, which a writer could have replaced); writing
to bytes lets every store commit them its own way (:mod:`lora_ckpt.storage`).
"""

import contextlib
import uuid

from .._tf import tf
from ..errors import CorruptAdapterError
from .format import CHECKPOINT_ROOT, checkpoint_files, nest_variables

__all__ = ["checkpoint_bytes", "checkpoint_reader"]


_gfile = tf.io.gfile


@contextlib.contextmanager
def _scratch():
    directory = f"ram://lora_ckpt/{uuid.uuid4().hex}"
    _gfile.makedirs(directory)
    try:
        yield directory
    finally:
        with contextlib.suppress(tf.errors.OpError):
            _gfile.rmtree(directory)


def checkpoint_bytes(variables: dict, prefix: str) -> dict[str, bytes]:
    """Writes variables as a checkpoint under ``prefix``; returns its files' bytes.

    Args:
        variables: Variable key (``layer/path/name``) -> ``tf.Variable``.
        prefix: The checkpoint prefix (file names are ``prefix.index`` and
            ``prefix.data-00000-of-00001``).

    Returns:
        File name -> bytes.
    """
    checkpoint = tf.train.Checkpoint(**{CHECKPOINT_ROOT: nest_variables(variables)})
    with _scratch() as directory:
        checkpoint.write(f"{directory}/{prefix}")
        files = {}
        for name in checkpoint_files(prefix):
            with _gfile.GFile(f"{directory}/{name}", "rb") as handle:
                files[name] = handle.read()
    return files


@contextlib.contextmanager
def checkpoint_reader(files: dict[str, bytes], prefix: str):
    """A ``tf.train`` checkpoint reader over verified bytes, not over the store.

    Args:
        files: File name -> bytes, already verified.
        prefix: The checkpoint prefix among the names.

    Yields:
        A checkpoint reader.

    Raises:
        CorruptAdapterError: If TensorFlow cannot parse the checkpoint.
    """
    with _scratch() as directory:
        for name, data in files.items():
            with _gfile.GFile(f"{directory}/{name}", "wb") as handle:
                handle.write(data)
        try:
            reader = tf.compat.v1.train.NewCheckpointReader(f"{directory}/{prefix}")
        # TensorFlow's status codes arrive as OpError, RuntimeError, ValueError
        # (INVALID_ARGUMENT) or a bare IndexError (OUT_OF_RANGE, from a damaged index).
        except (tf.errors.OpError, RuntimeError, ValueError, IndexError) as exc:
            raise CorruptAdapterError(
                f"The checkpoint cannot be parsed: {type(exc).__name__} {exc!s:.300}"
            ) from exc
        yield reader
