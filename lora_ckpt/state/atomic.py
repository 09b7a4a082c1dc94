"""Atomic replacement of an adapter (orbax's protocol), on any store.

A save never leaves a moment in which neither the old nor the new adapter
can be read. How a store commits is its own business
(:meth:`lora_ckpt.storage.Store.atomic_directory`): a local disk renames a
complete temporary sibling into place; an object store writes the checkpoint
under fresh names and commits with the one write of ``adapter_config.json``
that names them. This module adds the adapter's rules: refuse to replace an
adapter unless asked, never clobber foreign files, and collect what killed
saves left (``lora-ckpt gc``). One writer per adapter path at a time.
"""

import warnings

from ..errors import AdapterExistsError, LoRAConfigError, LoRAError
from ..storage import AtomicDirectory, UnsafeFileError, open_store
from .files import is_adapter_file, read_config_bytes
from .format import CONFIG_FILE, AdapterConfig

__all__ = ["begin_write", "check_writable", "collect_garbage", "commit_files"]


def begin_write(path: str, overwrite: bool) -> AtomicDirectory:
    """Starts the atomic write of the adapter at ``path``, after the checks of a save.

    Args:
        path: The adapter directory or URL.
        overwrite: Whether an existing adapter may be replaced.

    Returns:
        The begun :class:`AtomicDirectory`: ``write`` the checkpoint files
        (named with ``fresh_name``), then ``finalize`` with the config's bytes,
        or ``abort``.

    Raises:
        AdapterExistsError: If ``path`` holds an adapter and ``overwrite`` is
            false, holds files that are not an adapter's, or is not a directory.
        LoRAConfigError: If ``path`` is a symbolic link, or is named like a
            save's work directory (``*.tmp-*``, ``*.old-*``), which saves and
            ``lora-ckpt gc`` remove.
        StoreError: If the store cannot be reached.
    """
    store, path = open_store(path)
    name = path.rsplit("/", 1)[-1]
    if ".tmp-" in name or ".old-" in name:
        raise LoRAConfigError(
            f"{path} is named like a save's work directory (.tmp-/.old-), which the next "
            "save or `lora-ckpt gc` removes; choose another name."
        )
    try:
        atomic = store.atomic_directory(path, CONFIG_FILE)
    except UnsafeFileError as exc:
        raise LoRAConfigError(str(exc)) from None
    try:
        entries = atomic.begin()  # the one listing of a save
    except UnsafeFileError:
        raise AdapterExistsError(
            f"{path} exists and is not a directory; choose another path."
        ) from None
    try:
        if CONFIG_FILE in entries and not overwrite:
            raise AdapterExistsError(
                f"An adapter already exists at {path}; pass overwrite=True to replace it."
            )
        foreign = sorted(n for n in entries if not is_adapter_file(n))
        if foreign:
            raise AdapterExistsError(
                f"{path} holds files that are not part of an adapter ({foreign[:5]}); "
                "refusing to replace it. Choose an empty or new directory."
            )
    except BaseException:
        atomic.abort()
        raise
    return atomic


def check_writable(path: str, overwrite: bool) -> None:
    """The checks of :func:`begin_write`, for a caller that writes much later
    (it refuses before doing expensive work). Raises as :func:`begin_write`."""
    begin_write(path, overwrite).abort()


def commit_files(atomic: AtomicDirectory, files: dict[str, bytes], config: bytes) -> None:
    """Writes the checkpoint files, then commits with the config (written last).

    A failure before the commit removes what was written; the committed
    adapter (if any) is untouched. Leftovers a committed save could not
    remove are warned about, not raised: the save stands.
    """
    try:
        for name, data in files.items():
            atomic.write(name, data)
        leftovers = atomic.finalize(config)
    except BaseException:
        atomic.abort()
        raise
    if leftovers:
        warnings.warn(
            f"The adapter was saved, but removing {leftovers[:3]} failed; "
            "`lora-ckpt gc` removes them later.",
            stacklevel=3,
        )


def collect_garbage(directory: str) -> list[str]:
    """Cleans what killed saves left in a directory of adapters.

    Puts back complete previous versions whose replacement never committed,
    removes ``*.tmp-*``/``*.old-*`` work directories and checkpoint files no
    committed config refers to.

    Args:
        directory: A directory of adapters (a store's ``adapters/``), any store.

    Returns:
        The paths removed or recovered.

    Raises:
        StoreError: If the store cannot be reached.
    """
    store, directory = open_store(directory)
    try:
        names = store.listdir(directory)
    except UnsafeFileError:
        return []
    bases = {name.split(".tmp-")[0].split(".old-")[0] for name in names}
    touched = []
    for name in sorted(bases):
        path = store.join(directory, name)
        touched += store.clean_leftovers(path, CONFIG_FILE)
        try:
            at, raw = read_config_bytes(store, path)
            config = AdapterConfig.from_json(raw, path)
            entries = store.listdir(at)
        except (LoRAError, UnsafeFileError):
            continue  # not an adapter; a broken one is the user's to inspect and delete
        for file_name, entry in entries.items():
            if (
                entry.kind == "file"
                and is_adapter_file(file_name)
                and file_name != CONFIG_FILE
                and file_name not in config.files
            ):
                store.remove_file(store.join(at, file_name))
                touched.append(store.join(at, file_name))
    return touched
