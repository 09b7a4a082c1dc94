"""Adapters in S3-compatible object storage, through fsspec/s3fs.

TensorFlow 2.21 no longer reads ``s3://`` itself, so object storage is
reached with s3fs (the optional ``scale`` extra) and configured the standard
AWS way: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an
S3-compatible server, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or
any other botocore credential source) and ``AWS_DEFAULT_REGION``.

Reading: an adapter is downloaded into a local cache directory named by the
SHA-256 of its ``adapter_config.json`` (``LORA_CKPT_CACHE_DIR``, default
``~/.cache/lora_ckpt``), each file bounded by the size its config declares
and checked against its SHA-256 before it is kept; then the one hardened
loader (:func:`lora_ckpt.state.read_lora_state`) reads the local copy, so
every rule for local adapters applies to downloaded bytes. A config that is
already cached costs one small GET (the config itself) and no download.

Writing: S3 has no directory rename, so a save commits the object-store
way: the checkpoint goes under a fresh prefix ``adapter-<hex>`` beside the old
files, then ``adapter_config.json``, which points at it, is written in one PUT
(the commit: before it readers see the old adapter, after it the new one),
and the old files are deleted last. A reader that read the old config just
before the commit and finds its files gone reads the new config and retries.
"""

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable

from ..errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    CorruptAdapterError,
    LoRAError,
    StoreError,
)
from .atomic import is_adapter_file
from .files import (
    MAX_CONFIG_BYTES,
    check_file_name,
    is_object_store,
    is_work_directory,
    read_verified,
)
from .format import CONFIG_FILE, AdapterConfig, checkpoint_files
from .load import AdapterState, read_config, read_lora_state

log = logging.getLogger("lora_ckpt.object_store")

"""URL schemes served from object storage."""

CACHE_ENV = "LORA_CKPT_CACHE_DIR"
CACHE_MAX_ENV = "LORA_CKPT_CACHE_MAX_BYTES"
DEFAULT_CACHE_MAX_BYTES = 20 << 30
MAX_ADAPTER_BYTES = 4 << 30
"""The largest adapter (all its files) a download accepts."""
MAX_BASE_BYTES = 64 << 30
"""The largest base weights file a download accepts."""
RECENT_SECONDS = 120.0
"""Cache entries used this recently are never evicted (a reader may hold them)."""

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _MissingFile(Exception):
    """A checkpoint object named by the config is gone (maybe replaced by a newer save)."""


def join(url: str, *parts: str) -> str:
    """``url/part/...`` without doubled slashes."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem():
    """The s3fs file system configured from the standard AWS environment variables.

    Returns:
        An ``s3fs.S3FileSystem`` (fsspec caches instances per configuration).

    Raises:
        StoreError: If s3fs is not installed.
    """
    try:
        import s3fs
    except ImportError:
        raise StoreError(
            "s3:// stores need s3fs: install the scale extra with "
            "`pip install 'lora_ckpt[scale]'` (or `pip install s3fs`)."
        ) from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Listings are not cached: a store changes under a long-running server.
    return s3fs.S3FileSystem(endpoint_url=endpoint or None, use_listings_cache=False)


@contextlib.contextmanager
def _remote(url: str):
    """Turns the object store's failures (network, credentials, permissions) into StoreError."""
    try:
        yield
    except (FileNotFoundError, LoRAError, _MissingFile):
        raise
    except Exception as exc:
        if not _is_remote_failure(exc):
            raise
        raise StoreError(
            f"Cannot reach {url}: {type(exc).__name__}: {exc}. Check AWS_ENDPOINT_URL, "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and the bucket name."
        ) from exc


def _is_remote_failure(exc: Exception) -> bool:
    if isinstance(exc, (OSError, ValueError)):
        return True
    try:
        import botocore.exceptions
    except ImportError:  # pragma: no cover - s3fs depends on botocore
        return False
    return isinstance(exc, (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError))


def _get_prefix(url: str, size: int) -> bytes:
    """The first ``size`` bytes of an object, in one ranged GET (the whole object
    if it is shorter)."""
    fs = filesystem()
    try:
        return fs.cat_file(url, start=0, end=size)
    except OSError as exc:
        # S3 answers "range not satisfiable" for any range of an empty object.
        if exc.errno == errno.EINVAL and fs.info(url).get("size") == 0:
            return b""
        raise


def exists(url: str) -> bool:
    """Whether an object (or a prefix holding objects) exists at ``url``."""
    with _remote(url):
        return filesystem().exists(url)


def read_object(url: str, limit: int) -> bytes:
    """The bytes of one object, refused past ``limit`` bytes before any is read.

    Raises:
        FileNotFoundError: If there is no such object.
        StoreError: If it is larger than ``limit`` or the store cannot be reached.
    """
    with _remote(url):
        # One ranged GET: never more than limit + 1 bytes travel, whatever the object's size.
        data = _get_prefix(url, limit + 1)
    if len(data) > limit:
        raise StoreError(f"{url} has more than the {limit} bytes expected; refusing to read it.")
    return data


def write_object(url: str, data: bytes) -> None:
    """Writes one object in one PUT (object stores replace an object atomically)."""
    with _remote(url):
        filesystem().pipe_file(url, data)


def upload_file(local: str, url: str) -> None:
    """Copies a local file to ``url``."""
    with _remote(url):
        filesystem().put_file(local, url)


def remove_object(url: str) -> None:
    """Deletes one object (missing is fine)."""
    with _remote(url), contextlib.suppress(FileNotFoundError):
        filesystem().rm_file(url)


def list_tree(url: str) -> list[str]:
    """Paths of every object under ``url``, relative to it, in one recursive listing."""
    fs = filesystem()
    root = url.rstrip("/").split("://", 1)[1]
    with _remote(url):
        keys = fs.find(url.rstrip("/"))
    return sorted(k[len(root) + 1 :] for k in keys if k.startswith(root + "/"))


def list_directories(url: str) -> dict[str, list[str]]:
    """``name -> file names`` of the directories directly under ``url`` (one listing)."""
    tree: dict[str, list[str]] = {}
    for relative in list_tree(url):
        parts = relative.split("/")
        if len(parts) == 2:
            tree.setdefault(parts[0], []).append(parts[1])
    return tree


def adapters_root(url: str) -> str:
    """``url/adapters`` if ``url`` is a store (it has one), else ``url`` itself:
    a store or a directory of adapters, as the CLI takes on disk."""
    url = url.rstrip("/")
    return join(url, "adapters") if exists(join(url, "adapters")) else url


# ---- reading adapters ----------------------------------------------------------------


def read_adapter_config(url: str) -> bytes:
    """The bytes of an adapter's ``adapter_config.json`` in object storage (bounded).

    Raises:
        AdapterNotFoundError: If there is no committed adapter at ``url``.
        StoreError: If the config is larger than a config may be, or the store
            cannot be reached.
    """
    try:
        return read_object(join(url, CONFIG_FILE), MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise AdapterNotFoundError(
            f"{url} has no {CONFIG_FILE}: it is not an adapter, or its save was "
            "interrupted before it committed."
        ) from None


def cache_root(cache_dir: str | None = None) -> str:
    """The local cache directory: ``cache_dir``, ``$LORA_CKPT_CACHE_DIR`` or
    ``$XDG_CACHE_HOME/lora_ckpt`` (default ``~/.cache/lora_ckpt``)."""
    if cache_dir:
        return os.path.abspath(cache_dir)
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lora_ckpt")


def _cache_limit() -> int:
    value = os.environ.get(CACHE_MAX_ENV, "")
    return int(value) if value.isdigit() else DEFAULT_CACHE_MAX_BYTES


def _download_verified(url: str, record) -> bytes:
    with _remote(url):
        try:
            # A ranged GET: a larger object shows as one byte too many, not as a big read.
            data = _get_prefix(url, record.size + 1)
        except FileNotFoundError:
            raise _MissingFile(url) from None
    if len(data) != record.size:
        raise CorruptAdapterError(
            f"{url} has {'more than ' if len(data) > record.size else ''}{len(data)} bytes, "
            f"the config says {record.size}: the object is truncated or was replaced."
        )
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise CorruptAdapterError(
            f"{url} does not match the size and SHA-256 in its config: the object is corrupted."
        )
    return data


def _publish(tmp: str, target: str) -> None:
    """Moves a complete download into place; another process may have won the race."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not os.path.isfile(os.path.join(target, CONFIG_FILE)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_adapter(
    url: str,
    cache_dir: str | None = None,
    max_bytes: int = MAX_ADAPTER_BYTES,
    refresh: bool = False,
) -> str:
    """Downloads an adapter from object storage into the local cache (or finds it there).

    The cache entry is ``CACHE/adapters/<sha256 of adapter_config.json>/NAME``:
    a new save of the adapter has another config, so another entry, and an
    entry is never changed once written. Each checkpoint object is refused
    unless it has the size and SHA-256 its config declares; the caller reads
    the local copy with the hardened loader.

    Args:
        url: The adapter's URL (``s3://bucket/store/adapters/NAME``).
        cache_dir: The cache root (default :func:`cache_root`).
        max_bytes: The largest adapter accepted (all files together).
        refresh: Download again even if the config's entry exists.

    Returns:
        The local adapter directory.

    Raises:
        AdapterNotFoundError: If there is no committed adapter at ``url``.
        CorruptAdapterError: If the config is invalid or an object is missing,
            truncated or altered.
        StoreError: If the adapter is larger than ``max_bytes`` or the store
            cannot be reached.
    """
    url = url.rstrip("/")
    root = os.path.join(cache_root(cache_dir), "adapters")
    basename = url.rsplit("/", 1)[-1]
    name = basename if _SAFE_NAME.fullmatch(basename) and ".." not in basename else "adapter"
    for _ in range(3):  # a save may replace the adapter while it downloads
        config_bytes = read_adapter_config(url)
        digest = hashlib.sha256(config_bytes).hexdigest()
        target = os.path.join(root, digest, name)
        if not refresh and os.path.isfile(os.path.join(target, CONFIG_FILE)):
            os.utime(os.path.dirname(target))  # the LRU clock of the cache
            return target
        config = AdapterConfig.from_json(config_bytes, url)
        total = len(config_bytes) + sum(record.size for record in config.files.values())
        if total > max_bytes:
            raise StoreError(
                f"The adapter at {url} has {total} bytes, more than the {max_bytes} a "
                "download accepts; pass a larger max_bytes if it is expected."
            )
        try:
            files = {
                check_file_name(file_name, url): _download_verified(join(url, file_name), record)
                for file_name, record in config.files.items()
            }
        except _MissingFile as missing:
            if hashlib.sha256(read_adapter_config(url)).hexdigest() != digest:
                continue  # replaced while we read: take the new version
            raise CorruptAdapterError(f"{missing} is missing: the adapter is incomplete.") from None
        os.makedirs(root, exist_ok=True)
        work = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        try:
            staged = os.path.join(work, name)
            os.mkdir(staged)
            for file_name, data in {**files, CONFIG_FILE: config_bytes}.items():
                with open(os.path.join(staged, file_name), "wb") as handle:
                    handle.write(data)
            if refresh and os.path.isdir(target):
                shutil.rmtree(target, ignore_errors=True)
            _publish(staged, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _trim_cache(root, keep=os.path.dirname(target))
        return target
    raise StoreError(f"The adapter at {url} kept changing while it was downloaded; retry.")


def _directory_bytes(path: str) -> int:
    total = 0
    for parent, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def _trim_cache(root: str, keep: str) -> None:
    """Removes the least recently used entries while the cache is over its size limit."""
    limit = _cache_limit()
    entries = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".tmp-"):
                entries.append((entry.stat().st_mtime, entry.path, _directory_bytes(entry.path)))
    total = sum(size for _, _, size in entries)
    now = time.time()
    for mtime, path, size in sorted(entries):
        if total <= limit:
            return
        if path == keep or now - mtime < RECENT_SECONDS:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= size
    if total > limit:
        log.warning("the adapter cache %s holds %d bytes, over its %d limit", root, total, limit)


def read_adapter(path: str) -> AdapterState:
    """:func:`read_lora_state` for local directories and object-storage URLs alike.

    An object-storage adapter is fetched into the cache (:func:`fetch_adapter`)
    and read from there by the hardened loader; a cache copy that fails its
    checks is downloaded once more.

    Args:
        path: An adapter directory or URL.

    Returns:
        The :class:`AdapterState` (its ``path`` is ``path``).

    Raises:
        As :func:`read_lora_state` and :func:`fetch_adapter`.
    """
    if not is_object_store(path):
        return read_lora_state(path)
    local = fetch_adapter(path)
    try:
        state = read_lora_state(local)
    except CorruptAdapterError:
        # The local copy changed after it was verified (disk, a user): fetch it again.
        state = read_lora_state(fetch_adapter(path, refresh=True))
    return dataclasses.replace(state, path=str(path).rstrip("/"))


def localize(path: str) -> str:
    """A local directory holding the adapter at ``path`` (fetched if it is a URL)."""
    return fetch_adapter(path) if is_object_store(path) else path


def fetch_file(url: str, max_bytes: int = MAX_BASE_BYTES, cache_dir: str | None = None) -> str:
    """Downloads one file (a store's base weights) into the cache, once per version.

    The entry is keyed by the object's URL, size and ETag, so a replaced
    object is downloaded again.

    Args:
        url: The object's URL.
        max_bytes: The largest object accepted.
        cache_dir: The cache root (default :func:`cache_root`).

    Returns:
        The local file's path.

    Raises:
        FileNotFoundError: If there is no such object.
        StoreError: If it is larger than ``max_bytes`` or the store cannot be reached.
    """
    fs = filesystem()
    with _remote(url):
        info = fs.info(url)
    size = info.get("size")
    if not isinstance(size, int) or size > max_bytes:
        raise StoreError(f"{url} has {size} bytes, more than the {max_bytes} a download accepts.")
    key = hashlib.sha256(f"{url}\0{size}\0{info.get('ETag', '')}".encode()).hexdigest()
    root = os.path.join(cache_root(cache_dir), "files")
    target = os.path.join(root, key, url.rsplit("/", 1)[-1] or "object")
    if os.path.isfile(target) and os.path.getsize(target) == size:
        os.utime(os.path.dirname(target))
        return target
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        staged = os.path.join(work, os.path.basename(target))
        with _remote(url):
            fs.get_file(url, staged)
        if os.path.getsize(staged) != size:
            raise StoreError(f"{url} changed while it was downloaded; retry.")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# ---- writing adapters ----------------------------------------------------------------


def check_writable(url: str, overwrite: bool) -> None:
    """:func:`lora_ckpt.state.atomic.check_writable` for an object-storage URL.

    Raises:
        AdapterExistsError: If an adapter is there and ``overwrite`` is false,
            or the prefix holds objects that are not an adapter's.
        StoreError: If the store cannot be reached.
    """
    names = _adapter_objects(url)
    if CONFIG_FILE in names and not overwrite:
        raise AdapterExistsError(
            f"An adapter already exists at {url}; pass overwrite=True to replace it."
        )
    foreign = sorted(n for n in names if not is_adapter_file(n))
    if foreign:
        raise AdapterExistsError(
            f"{url} holds objects that are not part of an adapter ({foreign[:5]}); "
            "refusing to replace it. Choose another name."
        )


def _adapter_objects(url: str) -> list[str]:
    return list_tree(url)


def _commit_config(url: str, data: bytes) -> None:
    """The commit of a save: one PUT of the config that points at the new files."""
    write_object(join(url, CONFIG_FILE), data)


def upload_adapter(local: str, url: str, overwrite: bool = False) -> str:
    """Uploads a local adapter directory to object storage, committed atomically.

    The local adapter is verified first (the files its config lists, by size
    and SHA-256); its checkpoint is uploaded under a fresh prefix
    ``adapter-<hex>`` beside any old version, then the config (rewritten to
    name that prefix) is written in one PUT, and the old files are deleted.
    A failure before the config write leaves the old adapter whole.

    Args:
        local: A local adapter directory.
        url: Where it goes (``s3://bucket/store/adapters/NAME``).
        overwrite: Replace an adapter already at ``url``.

    Returns:
        ``url``.

    Raises:
        AdapterNotFoundError, CorruptAdapterError: If ``local`` is not a valid adapter.
        AdapterExistsError: As :func:`check_writable`.
        StoreError: If the store cannot be reached.
    """
    url = url.rstrip("/")
    directory, config = read_config(local)
    data = {name: read_verified(directory, name, record) for name, record in config.files.items()}
    check_writable(url, overwrite)
    old = [n for n in _adapter_objects(url) if is_adapter_file(n) and n != CONFIG_FILE]
    prefix = f"adapter-{uuid.uuid4().hex[:16]}"
    renamed = dict(
        zip(
            checkpoint_files(config.checkpoint_prefix),
            checkpoint_files(prefix),
            strict=True,
        )
    )
    # A checkpoint's index does not name its data file: renaming both keeps it valid.
    config.checkpoint_prefix = prefix
    config.files = {renamed[name]: record for name, record in config.files.items()}
    for name, payload in data.items():
        write_object(join(url, renamed[name]), payload)
    _commit_config(url, config.to_json().encode())
    for name in old:
        if name not in config.files:
            remove_object(join(url, name))
    return url


def save_via_local(url: str, write_local: Callable[[str], None], overwrite: bool) -> str:
    """Saves an adapter to object storage: ``write_local(dir)`` writes it into a
    local temporary directory with the normal (atomic, local) save, then
    :func:`upload_adapter` commits it.

    Returns:
        ``url``.
    """
    with tempfile.TemporaryDirectory(prefix="lora_ckpt-upload-") as tmp:
        local = os.path.join(tmp, "adapter")
        write_local(local)
        return upload_adapter(local, url, overwrite=overwrite)


def collect_garbage(adapters_url: str) -> list[str]:
    """Deletes checkpoint objects no committed config refers to (left by killed saves).

    Args:
        adapters_url: A directory of adapters in object storage (a store's ``adapters/``).

    Returns:
        The URLs removed.
    """
    removed = []
    for name, files in sorted(list_directories(adapters_url).items()):
        if CONFIG_FILE not in files:
            continue
        url = join(adapters_url, name)
        try:
            config = AdapterConfig.from_json(read_adapter_config(url), url)
        except (CorruptAdapterError, AdapterNotFoundError):
            continue  # a broken adapter is the user's to inspect and delete
        for file_name in files:
            if is_adapter_file(file_name) and file_name not in (CONFIG_FILE, *config.files):
                remove_object(join(url, file_name))
                removed.append(join(url, file_name))
    return removed


def inspect_remote_adapter(url: str) -> dict:
    """:func:`lora_ckpt.state.inspect_adapter` for an adapter in object storage
    (reads only its config).

    Raises:
        AdapterNotFoundError, CorruptAdapterError, AdapterVersionError: As
            :func:`inspect_adapter`.
    """
    from .inspect import inspect_adapter

    url = url.rstrip("/")
    config_bytes = read_adapter_config(url)
    with tempfile.TemporaryDirectory(prefix="lora_ckpt-inspect-") as tmp:
        # inspect_adapter reads the config only: give it these bytes, nothing else.
        local = os.path.join(tmp, "adapter")
        os.mkdir(local)
        with open(os.path.join(local, CONFIG_FILE), "wb") as handle:
            handle.write(config_bytes)
        summary = inspect_adapter(local)
    return dict(summary, path=url)


def list_remote_adapters(directory_url: str) -> list[dict]:
    """:func:`lora_ckpt.state.list_adapters` for a directory of adapters in object storage.

    Returns:
        One summary per committed adapter (with ``name``), or ``{"name",
        "path", "error"}`` for a broken one, sorted by name.
    """
    summaries = []
    for name, files in sorted(list_directories(directory_url).items()):
        if CONFIG_FILE not in files or is_work_directory(name):
            continue
        url = join(directory_url, name)
        try:
            summary = inspect_remote_adapter(url)
        except LoRAError as exc:
            summary = {"path": url, "error": str(exc)}
        summaries.append(dict(summary, name=name))
    return summaries
