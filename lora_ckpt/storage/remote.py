"""Every other URL through fsspec: ``s3://`` (s3fs), ``gs://`` (gcsfs), ``az://``
(adlfs), ``memory://`` (fsspec's own, for tests).

Object stores have no directory rename, so a directory is committed the
object-store way: new files go under fresh names beside the old ones, then
the marker file that names them is written in one PUT (the commit: before it
readers see the old version, after it the new one), and the old files are
deleted last. An object PUT replaces an object whole, so every read sees one
version of each file.

``s3://`` is configured the standard AWS way: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for an S3-compatible server, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or any other botocore credential source) and
``AWS_DEFAULT_REGION``. Requests time out (``LORA_CKPT_STORE_TIMEOUT``
seconds, default 10) and are retried once, so an unreachable store is a
:class:`StoreError` within seconds, not minutes.
"""

import contextlib
import errno
import os

from ..errors import LoRAError, MissingDependencyError, StoreError
from .base import AtomicDirectory, Entry, Store, UnsafeFileError

__all__ = ["FsspecStore"]


TIMEOUT_ENV = "LORA_CKPT_STORE_TIMEOUT"

_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
"""The pip package that serves each scheme (the error for a missing one names it)."""


def _timeout() -> float:
    try:
        return max(1.0, float(os.environ.get(TIMEOUT_ENV, "10")))
    except ValueError:
        return 10.0


def _filesystem_class(protocol: str):
    import fsspec

    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError:
        package = _PACKAGES.get(protocol, f"the fsspec backend for {protocol}://")
        raise MissingDependencyError(
            f"{protocol}:// stores need {package}: `pip install {package}`"
            + (" (or `pip install 'lora_ckpt[scale]'`)." if protocol == "s3" else ".")
        ) from None
    except ValueError:
        raise StoreError(f"{protocol}:// is not a known storage scheme.") from None


def _filesystem(cls, protocol: str):
    """An fsspec file system configured for a long-running reader (fsspec keeps
    one instance per configuration, so this is cheap after the first call)."""
    if protocol == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        timeout = _timeout()
        fs = cls(
            endpoint_url=endpoint or None,
            # A store changes under a long-running server: no listing cache.
            use_listings_cache=False,
            config_kwargs={
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": {"max_attempts": 1, "mode": "standard"},
            },
        )
        fs.retries = 2  # s3fs's own retry loop (5 by default, with back-off)
        return fs
    return cls() if protocol == "memory" else cls(use_listings_cache=False)


def _is_remote_failure(exc: Exception) -> bool:
    if isinstance(exc, (OSError, ValueError, TimeoutError)):
        return True
    try:
        import botocore.exceptions
    except ImportError:
        return False
    return isinstance(exc, (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError))


@contextlib.contextmanager
def _remote(url: str):
    """Turns a store's failures (network, credentials, permissions) into StoreError."""
    try:
        yield
    except (FileNotFoundError, LoRAError, UnsafeFileError):
        raise
    except Exception as exc:
        if not _is_remote_failure(exc):
            raise
        hint = (
            " Check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_DEFAULT_REGION and the bucket name."
            if url.startswith("s3://")
            else ""
        )
        raise StoreError(f"Cannot reach {url}: {type(exc).__name__}: {exc}.{hint}") from exc


class _MarkerCommit(AtomicDirectory):
    """The object-store commit: fresh names, then one PUT of the marker, then clean-up."""

    def begin(self) -> dict[str, Entry]:
        self.existing = self.store.listdir(self.path)  # the one listing of a write
        return self.existing

    def write(self, name: str, data: bytes) -> None:
        self.store.write(self.store.join(self.path, name), data)
        self.written.append(name)

    def finalize(self, data: bytes) -> list[str]:
        self.store.write(self.store.join(self.path, self.marker), data)  # the commit
        leftovers = []
        for name, entry in self.existing.items():
            if entry.kind == "file" and name != self.marker and name not in self.written:
                try:
                    self.store.remove_file(self.store.join(self.path, name))
                except (OSError, StoreError):
                    leftovers.append(self.store.join(self.path, name))
        return leftovers

    def abort(self) -> None:
        for name in self.written:
            with contextlib.suppress(OSError, StoreError):
                self.store.remove_file(self.store.join(self.path, name))


class FsspecStore(Store):
    """Any fsspec URL; objects are files, ``/``-separated prefixes are directories."""

    def __init__(self, protocol: str):
        """Raises MissingDependencyError if the scheme's package is not installed."""
        self.protocol = protocol
        self._cls = _filesystem_class(protocol)

    @property
    def fs(self):
        """The fsspec file system, configured from the environment as it is now."""
        return _filesystem(self._cls, self.protocol)

    def join(self, path: str, *parts: str) -> str:
        return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])

    def _get_prefix(self, url: str, size: int) -> bytes:
        """The first ``size`` bytes of an object in one ranged GET (the whole
        object if it is shorter): never more travels, whatever its size."""
        try:
            return self.fs.cat_file(url, start=0, end=size)
        except FileNotFoundError:
            raise
        except OSError as exc:
            # S3 answers "range not satisfiable" for any range of an empty object.
            if exc.errno == errno.EINVAL and self.fs.info(url).get("size") == 0:
                return b""
            raise

    def read(self, path: str, limit: int) -> bytes:
        with _remote(path):
            data = self._get_prefix(path, limit + 1)
        if len(data) > limit:
            raise UnsafeFileError(f"{path} has more than the {limit} bytes expected.")
        return data

    def write(self, path: str, data: bytes) -> None:
        with _remote(path):
            self.fs.pipe_file(path, data)

    def listdir(self, path: str) -> dict[str, Entry]:
        root = self.fs._strip_protocol(path).rstrip("/")
        with _remote(path):
            found = self._list_recursive(path.rstrip("/"))
        entries = {}
        for item in found:
            name = item["name"]
            name = name.rstrip("/")
            if name == root:
                if item.get("type") == "file":
                    raise UnsafeFileError(f"{path} is a file, not a directory.")
                continue
            if not name.startswith(root + "/"):
                continue
            child, _, rest = name[len(root) + 1 :].partition("/")
            if rest or item.get("type") == "directory":
                entries[child] = Entry("dir")
            elif child not in entries:
                entries[child] = Entry("file", item.get("size"))
        return entries

    def _list_recursive(self, path: str) -> list[dict]:
        """Every object under ``path`` in one paged LIST. s3fs's public ``ls`` and
        ``find`` of a missing prefix also HEAD it and list its parent: three
        requests on every first save instead of one, so s3fs's listing itself
        (``_lsdir``, pinned with s3fs in setup.cfg) is called for ``s3://``."""
        fs = self.fs
        if self.protocol == "s3":
            from fsspec.asyn import sync

            return sync(fs.loop, fs._lsdir, path, delimiter="")
        return list(fs.find(path, detail=True, withdirs=True).values())

    def exists(self, path: str) -> bool:
        with _remote(path):
            return self.fs.exists(path)

    def remove(self, path: str) -> None:
        with _remote(path), contextlib.suppress(FileNotFoundError):
            if self.fs.isdir(path):
                self.fs.rm(path.rstrip("/"), recursive=True)
            else:
                self.fs.rm_file(path)

    def remove_file(self, path: str) -> None:
        with _remote(path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def atomic_directory(self, path: str, marker: str) -> AtomicDirectory:
        return _MarkerCommit(self, path, marker)

    def committed(self, path: str, marker: str) -> str | None:
        # No intermediate state to resolve: the marker is there or not.
        return path

    def clean_leftovers(self, path: str, marker: str) -> list[str]:
        return []  # the caller knows which files its committed marker names

    def stat(self, path: str) -> tuple[int, str]:
        """``(size, version)`` of an object: the version changes when it is replaced.

        Raises:
            FileNotFoundError: If there is no such object.
        """
        with _remote(path):
            info = self.fs.info(path)
        size = info.get("size")
        if not isinstance(size, int):
            raise FileNotFoundError(path)
        version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")
        return size, version

    def local_file(self, path: str, max_bytes: int) -> str:
        raise NotImplementedError("open_store() wraps this store in a VerifiedCache, which has it")
