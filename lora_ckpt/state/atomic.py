"""Atomic replacement of an adapter directory (orbax's protocol, no machinery).

A save never leaves a moment in which neither the old nor the new adapter
can be read:

- On a local file system the new adapter is written into a sibling
  ``NAME.tmp-<id>`` and committed by renaming directories: ``NAME`` ->
  ``NAME.old-<id>``, ``NAME.tmp-<id>`` -> ``NAME``, then the old one is
  deleted. Between the two renames (or after a crash there) readers find the
  complete old version in ``NAME.old-<id>``
  (:func:`lora_ckpt.state.files.resolve_adapter`).
- On file systems without directory renames (``ram://``, ``gs://``,
  ``s3://``) the checkpoint is written under a fresh prefix
  (``adapter-<id>.*``) beside the old files, and the commit is the one write
  of ``adapter_config.json`` that points at it: before it readers see the
  old adapter, after it the new one. The old files are deleted last.

Leftovers of a killed save (work directories, unreferenced checkpoint files)
are never read as adapters; the next save of that name removes them, and so
does :func:`collect_garbage` (``lora-ckpt gc``). One writer per adapter path
at a time.
"""

import os
import re
import uuid
import warnings
from collections.abc import Callable

from .._tf import tf
from ..errors import AdapterExistsError, AdapterNotFoundError, LoRAConfigError, LoRAError
from .files import is_local, resolve_adapter
from .format import CHECKPOINT_PREFIX, CONFIG_FILE
from .load import read_config

_gfile = tf.io.gfile
_CHECKPOINT_FILE = re.compile(r"adapter(-[0-9a-f]{8,32})?\.(index|data-00000-of-00001)")


def is_adapter_file(name: str) -> bool:
    """Whether ``name`` is a file an adapter directory may hold."""
    return name == CONFIG_FILE or bool(_CHECKPOINT_FILE.fullmatch(name))


def _children(path: str) -> list[str]:
    """Names inside directory ``path``.

    TensorFlow's RAM file system also lists siblings that merely start with
    the same name (``NAME.tmp-<id>`` shows up as ``.tmp-<id>`` in ``NAME``):
    off local disks only names that exist inside ``path`` count.
    """
    names = [n.rstrip("/") for n in _gfile.listdir(path)]
    if is_local(path):
        return names
    return [n for n in names if _gfile.exists(f"{path}/{n}")]


def _clean_up(action: Callable, target: str) -> None:
    """Removes a leftover after the commit; a failure does not undo the save."""
    try:
        action(target)
    except (OSError, tf.errors.OpError) as exc:
        warnings.warn(
            f"The adapter was saved, but removing {target} failed ({exc}); "
            "`lora-ckpt gc` removes it later.",
            stacklevel=4,
        )


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


def _siblings(path: str, marker: str) -> list[str]:
    parent, name = os.path.split(path)
    if not _gfile.isdir(parent or "."):
        return []
    prefix = f"{name}{marker}"
    return [
        f"{parent}/{n.rstrip('/')}" if parent else n.rstrip("/")
        for n in _gfile.listdir(parent or ".")
        if n.startswith(prefix)
    ]


def _recover_and_clean(path: str, keep: str = "") -> list[str]:
    """Puts back a complete previous version a killed save left in ``path.old-*``
    and removes the other work directories of ``path``. Returns what it touched."""
    touched = []
    if is_local(path) and not _gfile.exists(f"{path}/{CONFIG_FILE}"):
        current = resolve_adapter_or_none(path)
        if current is not None and current != path:
            if os.path.lexists(path):
                _remove(path)  # an uncommitted directory in the way
            os.rename(current, path)
            touched.append(current)
    for work in _siblings(path, ".tmp-") + _siblings(path, ".old-"):
        if work != keep:
            _remove(work)
            touched.append(work)
    return touched


def _remove(path: str) -> None:
    """Removes a leftover: a symlink (or file) itself, never what it points to."""
    if is_local(path) and (os.path.islink(path) or not os.path.isdir(path)):
        os.unlink(path)  # rmtree would follow a link into another adapter
    else:
        _gfile.rmtree(path)


def resolve_adapter_or_none(path: str) -> str | None:
    """:func:`resolve_adapter`, or ``None`` where there is no committed adapter."""
    try:
        return resolve_adapter(path)
    except AdapterNotFoundError:
        return None


def _commit_local(tmp: str, path: str) -> None:
    _fsync_tree(tmp)
    old = None
    if _gfile.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))  # the commit, made durable
    if old is not None:
        _clean_up(_remove, old)


def _commit_by_files(tmp: str, path: str) -> None:
    _gfile.makedirs(path)
    old_files = [n for n in _children(path) if is_adapter_file(n) and n != CONFIG_FILE]
    for name in sorted(_children(tmp)):
        if name != CONFIG_FILE:  # fresh names: the old adapter stays whole
            _gfile.rename(f"{tmp}/{name}", f"{path}/{name}", overwrite=True)
    # The commit: one object replaced. Before it the old adapter, after it the new.
    _gfile.rename(f"{tmp}/{CONFIG_FILE}", f"{path}/{CONFIG_FILE}", overwrite=True)
    for name in old_files:
        _clean_up(_gfile.remove, f"{path}/{name}")
    _clean_up(_gfile.rmtree, tmp)


def check_writable(path: str, overwrite: bool) -> None:
    """Refuses to replace an adapter unless asked, and never clobbers foreign files.

    Args:
        path: The adapter directory.
        overwrite: Whether an existing adapter may be replaced.

    Raises:
        AdapterExistsError: If ``path`` holds an adapter and ``overwrite`` is
            false, or holds files that are not an adapter's.
        LoRAConfigError: If ``path`` is a symbolic link, or is named like a
            save's work directory (``*.tmp-*``, ``*.old-*``), which saves and
            ``lora-ckpt gc`` remove.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if ".tmp-" in name or ".old-" in name:
        raise LoRAConfigError(
            f"{path} is named like a save's work directory (.tmp-/.old-), which the next "
            "save or `lora-ckpt gc` removes; choose another name."
        )
    if is_local(path) and os.path.islink(path.rstrip("/")):
        raise LoRAConfigError(
            f"{path} is a symbolic link; save to the directory it points to, or another path "
            "(replacing the link would leave its target behind, half-owned)."
        )
    if resolve_adapter_or_none(path) is not None and not overwrite:
        raise AdapterExistsError(
            f"An adapter already exists at {path}; pass overwrite=True to replace it."
        )
    if not _gfile.exists(path):
        return
    if not _gfile.isdir(path):
        raise AdapterExistsError(f"{path} exists and is not a directory; choose another path.")
    foreign = sorted(n for n in _children(path) if not is_adapter_file(n))
    if foreign:
        raise AdapterExistsError(
            f"{path} holds files that are not part of an adapter ({foreign[:5]}); "
            "refusing to replace it. Choose an empty or new directory."
        )


def write_directory_atomically(path: str, write: Callable[[str, str], None]) -> None:
    """Calls ``write(tmp_dir, prefix)`` to fill a temporary sibling, then commits it.

    Args:
        path: The final directory.
        write: Writes the checkpoint under ``prefix`` and
            ``adapter_config.json`` into the given directory.

    Raises:
        Whatever ``write`` raises; the temporary directory is removed and
        ``path`` is untouched then.
    """
    path = path.rstrip("/")
    tag = uuid.uuid4().hex[:8]
    tmp = f"{path}.tmp-{tag}"
    parent = os.path.dirname(path)
    if parent:
        _gfile.makedirs(parent)
    _recover_and_clean(path)
    _gfile.makedirs(tmp)
    local = is_local(path)
    try:
        write(tmp, CHECKPOINT_PREFIX if local else f"{CHECKPOINT_PREFIX}-{tag}")
        (_commit_local if local else _commit_by_files)(tmp, path)
    except BaseException:
        if _gfile.exists(tmp):
            _gfile.rmtree(tmp)
        raise


def collect_garbage(directory: str) -> list[str]:
    """Cleans what killed saves left in a directory of adapters.

    Puts back complete previous versions whose replacement never committed,
    removes ``*.tmp-*``/``*.old-*`` work directories and checkpoint files no
    config refers to.

    Args:
        directory: A directory of adapters (a store's ``adapters/``).

    Returns:
        The paths removed or recovered.
    """
    directory = str(directory).rstrip("/")
    if not _gfile.isdir(directory):
        return []
    names = {n.rstrip("/") for n in _gfile.listdir(directory)}
    bases = {re.split(r"\.(tmp|old)-", n)[0] for n in names}
    touched = []
    for name in sorted(bases):
        path = f"{directory}/{name}"
        touched += _recover_and_clean(path)
        current = resolve_adapter_or_none(path)
        if current is None or not _gfile.isdir(path):
            continue
        try:
            _, config = read_config(path)
        except LoRAError:
            continue  # a broken adapter is the user's to inspect and delete
        for file_name in _children(path):
            if (
                is_adapter_file(file_name)
                and file_name != CONFIG_FILE
                and file_name not in config.files
            ):
                _gfile.remove(f"{path}/{file_name}")
                touched.append(f"{path}/{file_name}")
    return touched
