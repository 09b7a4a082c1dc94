"""Who may call the service, and how much: API keys, tenants and quotas.

Plain Python (no TensorFlow, no web framework): the HTTP app
(:mod:`lora_ckpt.serving.http_app`) asks this module who a request's key
belongs to and whether it may go on, and answers the refusals it raises
(:class:`Refusal`) with their status.

The operator's key file (``lora-ckpt serve --auth FILE``) is JSON::

    {"keys": [{"sha256": "<hex SHA-256 of the key>", "tenant": "acme",
               "adapters": ["color", "acme-*"], "admin": false,
               "rate": 20, "burst": 40, "concurrency": 8}]}

Only digests are stored; a presented key is hashed and compared with every
digest in constant time (:func:`hmac.compare_digest`, no early exit). Neither
a key nor its digest is ever logged or put in an answer: the tenant is.

- No key, or a wrong one: 401.
- An adapter outside the key's globs (:func:`fnmatch.fnmatchcase`; ``off``,
  the base alone, is a name like any other) does not exist for that key:
  the app answers 404, as for a name not in the store.
- Admin routes need ``"admin": true``: else 403.
- ``rate`` requests per second with bursts of ``burst`` (a token bucket), and
  ``concurrency`` requests at once: over either, 429 with ``Retry-After``
  (the seconds until the bucket holds a token again). Absent: unlimited.

The file is read again on SIGHUP, and when its modification time or size
changes (checked at most once a second: a Ray ingress gets no signal); a file
that no longer parses keeps the previous keys, and the error is logged.
"""

import dataclasses
import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable

from ..errors import LoRAConfigError
from .quotas import OverQuota, Quotas

__all__ = [
    "Gate",
    "Key",
    "KeyFile",
    "KeyTable",
    "Refusal",
    "is_loopback",
    "key_digest",
    "parse_keys",
    "presented_key",
]


log = logging.getLogger("lora_ckpt.serving")

MAX_KEY_FILE_BYTES = 1 << 20
"""A key file larger than this is refused (it is read on every change)."""
MAX_KEY_CHARS = 512
"""A presented key longer than this is refused unhashed."""
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"sha256", "tenant", "adapters", "admin", "rate", "burst", "concurrency"}


class Refusal(Exception):
    """A request refused before it reaches its route.

    Attributes:
        status: 401, 403 or 429.
        kind: The error type of the answer (``Unauthorized``, ...).
        message: What to do about it (never the key or its digest).
        retry_after: Whole seconds for ``Retry-After`` (429 only), else ``None``.
    """

    def __init__(self, status: int, kind: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.retry_after = status, kind, message, retry_after

    @property
    def headers(self) -> dict[str, str]:
        """The answer's headers: ``Retry-After`` for 429, ``WWW-Authenticate`` for 401."""
        if self.status == 401:
            return {"www-authenticate": 'Bearer realm="lora-ckpt"'}
        if self.retry_after is not None:
            return {"retry-after": str(self.retry_after)}
        return {}


@dataclasses.dataclass(frozen=True)
class Key:
    """One entry of the key file (its digest stays out of ``repr``).

    Attributes:
        digest: The SHA-256 of the key (32 bytes).
        tenant: Who the key belongs to (logged, shown in answers).
        adapters: Globs of the adapter names the key may see.
        admin: Whether it may load, reload and unload adapters, and read metrics.
        rate: Requests per second (refilled continuously), or ``None``: unlimited.
        burst: Requests at once from a full bucket.
        concurrency: Requests in flight at once, or ``None``: unlimited.
    """

    digest: bytes = dataclasses.field(repr=False)
    tenant: str
    adapters: tuple[str, ...]
    admin: bool = False
    rate: float | None = None
    burst: int = 1
    concurrency: int | None = None

    def allows(self, name: str) -> bool:
        """Whether adapter ``name`` exists for this key (it matches a glob)."""
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.adapters)


def key_digest(key: str) -> bytes:
    """The SHA-256 of ``key`` (UTF-8), as the key file stores it (in hex)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(document) -> list[Key]:
    """The keys of a key file's parsed JSON.

    Args:
        document: ``{"keys": [...]}`` (see the module docstring).

    Returns:
        The keys, in the file's order.

    Raises:
        LoRAConfigError: Naming the entry (``keys[2]``) and field that is wrong;
            never quoting a digest.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise LoRAConfigError('A key file is {"keys": [{"sha256": ..., "tenant": ...}, ...]}.')
    if set(document) != {"keys"}:
        raise LoRAConfigError(f"A key file has one field, 'keys'; got {sorted(document)}.")
    keys, seen = [], set()
    for index, entry in enumerate(document["keys"]):
        key = _parse_entry(entry, f"keys[{index}]")
        if key.digest in seen:
            raise LoRAConfigError(f"keys[{index}] repeats the digest of an earlier key.")
        seen.add(key.digest)
        keys.append(key)
    return keys


def _parse_entry(entry, where: str) -> Key:
    if not isinstance(entry, dict):
        raise LoRAConfigError(f"{where} must be a JSON object.")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise LoRAConfigError(
            f"{where} has unknown fields {sorted(unknown)}; known: {sorted(_FIELDS)}."
        )
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
        raise LoRAConfigError(
            f"{where}.sha256 must be 64 hex digits: the SHA-256 of the key "
            '(python3 -c "import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())" KEY).'
        )
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not tenant or len(tenant) > 128:
        raise LoRAConfigError(f"{where}.tenant must be a non-empty string (up to 128 characters).")
    globs = entry.get("adapters")
    if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
        raise LoRAConfigError(
            f'{where}.adapters must be a list of name globs (["color", "acme-*"]).'
        )
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise LoRAConfigError(f"{where}.admin must be true or false.")
    rate = entry.get("rate")
    if rate is not None and not (_number(rate) and 0 < rate < math.inf):
        raise LoRAConfigError(f"{where}.rate must be a number of requests per second > 0.")
    burst = entry.get("burst")
    if burst is not None and not (_integer(burst) and burst >= 1):
        raise LoRAConfigError(f"{where}.burst must be an integer >= 1.")
    if burst is not None and rate is None:
        raise LoRAConfigError(f"{where}.burst needs a rate.")
    concurrency = entry.get("concurrency")
    if concurrency is not None and not (_integer(concurrency) and concurrency >= 1):
        raise LoRAConfigError(f"{where}.concurrency must be an integer >= 1.")
    return Key(
        digest=bytes.fromhex(digest),
        tenant=tenant,
        adapters=tuple(globs),
        admin=admin,
        rate=float(rate) if rate is not None else None,
        # Without a burst, a second's worth of requests (at least one) at once.
        burst=burst if burst is not None else max(1, math.ceil(rate or 1)),
        concurrency=concurrency,
    )


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class KeyTable:
    """The keys of one version of the key file.

    Args:
        keys: As :func:`parse_keys` returns them.
    """

    def __init__(self, keys: list[Key]):
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, presented: str) -> Key | None:
        """The key whose digest is that of ``presented``, or ``None``.

        Every digest is compared, in constant time each, whichever matches:
        the time taken says nothing about which digest is close.
        """
        digest = key_digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The key a request presents: ``Authorization: Bearer KEY``, else ``x-api-key: KEY``.

    Returns:
        The key, or ``None`` if the request presents none.
    """
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    return None


class KeyFile:
    """The key file, read at start and again when it changes or on SIGHUP.

    Args:
        path: The key file (JSON, see the module docstring).
        clock: Seconds, monotonic (injectable for tests).

    Raises:
        LoRAConfigError: If the file cannot be read or is not a key file (at start).
    """

    CHECK_EVERY = 1.0
    """Seconds between two looks at the file's modification time."""

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic):
        self.path, self.clock = path, clock
        self._stamp = self._file_stamp()
        self.table = KeyTable(self._read())
        self._checked = clock()
        self._hangup = False
        log.info("API keys: %d, tenants %s", len(self.table), self.tenants())

    def tenants(self) -> list[str]:
        """The tenants of the current keys, sorted."""
        return sorted({key.tenant for key in self.table.keys})

    def _file_stamp(self):
        try:
            info = os.stat(self.path)
        except OSError as exc:
            raise LoRAConfigError(
                f"Cannot read the key file {self.path}: {exc.strerror}."
            ) from None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def _read(self) -> list[Key]:
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise LoRAConfigError(
                f"Cannot read the key file {self.path}: {exc.strerror}."
            ) from None
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise LoRAConfigError(
                f"The key file {self.path} is larger than {MAX_KEY_FILE_BYTES} bytes."
            )
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):
            raise LoRAConfigError(f"The key file {self.path} is not valid JSON.") from None
        try:
            return parse_keys(document)
        except LoRAConfigError as exc:
            raise LoRAConfigError(f"The key file {self.path}: {exc}") from None

    def reload(self) -> bool:
        """Reads the file again; on failure keeps the current keys and logs why.

        Returns:
            Whether the keys were replaced.
        """
        try:
            self._stamp = self._file_stamp()
            table = KeyTable(self._read())
        except LoRAConfigError as exc:
            log.error("the key file was not reloaded, the previous keys stay: %s", exc)
            return False
        self.table = table
        log.warning("API keys reloaded: %d, tenants %s", len(table), self.tenants())
        return True

    def current(self) -> KeyTable:
        """The keys, read again first after a SIGHUP or a change of the file."""
        now = self.clock()
        if self._hangup:
            self._hangup = False
            self._checked = now
            self.reload()
        elif now - self._checked >= self.CHECK_EVERY:
            self._checked = now
            try:
                changed = self._file_stamp() != self._stamp
            except LoRAConfigError:
                changed = True  # gone or unreadable: reload() logs it and keeps the keys
            if changed:
                self.reload()
        return self.table

    def reload_on_sighup(self) -> bool:
        """Makes SIGHUP reload the file (at the next request; the handler only
        sets a flag). Only the main thread can install a handler.

        Returns:
            Whether the handler was installed.
        """
        if threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "SIGHUP"
        ):
            return False

        def hangup(signum, frame):
            self._hangup = True

        signal.signal(signal.SIGHUP, hangup)
        return True


class Gate:
    """What the HTTP app asks of auth, per request.

    Args:
        keys: The key file.
        public_metrics: Whether ``GET /metrics`` is open to every key.
        clock: Seconds, monotonic (injectable for tests).
    """

    def __init__(self, keys: KeyFile, public_metrics: bool = False, clock=time.monotonic):
        self.keys = keys
        self.public_metrics = public_metrics
        self.quotas = Quotas(clock)

    def authenticate(self, authorization: str | None, api_key: str | None) -> Key:
        """The key of a request's headers.

        Raises:
            Refusal: 401 for no key or a wrong one.
        """
        presented = presented_key(authorization, api_key)
        if presented is None:
            raise Refusal(
                401,
                "Unauthorized",
                "Send an API key: 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
            )
        key = None if len(presented) > MAX_KEY_CHARS else self.keys.current().find(presented)
        if key is None:
            raise Refusal(401, "Unauthorized", "The API key is not valid.")
        return key

    def admit(self, key: Key, admin: bool):
        """Admits a request of ``key`` to a route (``admin``: an admin route).

        Returns:
            A context manager: leaving it releases the request's place.

        Raises:
            Refusal: 403 for an admin route and a key without admin; 429 over quota.
        """
        if admin and not key.admin:
            log.info("tenant %s refused an admin route", key.tenant)
            raise Refusal(
                403, "Forbidden", f"Tenant {key.tenant!r} may not do this: it needs an admin key."
            )
        try:
            return self.quotas.admit(key)
        except OverQuota as exc:
            log.info("tenant %s over its quota", key.tenant)
            raise Refusal(429, "TooManyRequests", exc.message, exc.retry_after) from None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface
