"""Quotas per API key: a token bucket (``rate`` requests a second, bursts of
``burst``) and a count of requests in flight (``concurrency``).

Plain Python, with an injectable clock; :mod:`lora_ckpt.serving.auth` turns
:class:`OverQuota` into a 429 with ``Retry-After``.
"""

import math
import threading
import time
from collections.abc import Callable

__all__ = ["OverQuota", "Quotas", "TokenBucket"]


class OverQuota(Exception):
    """A key is over its rate or concurrency.

    Attributes:
        message: What happened, naming the tenant (never the key).
        retry_after: Whole seconds until a retry can succeed: when the bucket
            holds a token again (at least 1).
    """

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` held; a request takes one.

    Args:
        rate: Tokens per second.
        burst: The bucket's size (it starts full).
        now: The clock's reading at creation.
    """

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> float:
        """Takes a token if there is one.

        Returns:
            0.0 if a token was taken, else the seconds until one will be there.
        """
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Quotas:
    """Each key's token bucket and requests in flight, by digest (so they
    outlive a reload of the key file that keeps the key).

    Args:
        clock: Seconds, monotonic (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[bytes, TokenBucket] = {}
        self._in_flight: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def admit(self, key) -> "_Admission":
        """Admits one request of ``key``; release it by leaving the returned context.

        Args:
            key: An :class:`~.auth.Key` (its ``digest``, ``tenant``, ``rate``,
                ``burst`` and ``concurrency``).

        Raises:
            OverQuota: Over the key's rate or concurrency.
        """
        with self._lock:
            in_flight = self._in_flight.get(key.digest, 0)
            if key.concurrency is not None and in_flight >= key.concurrency:
                raise OverQuota(
                    f"Tenant {key.tenant!r} has {in_flight} requests in flight, its limit; "
                    "retry when one has finished.",
                    retry_after=1,
                )
            if key.rate is not None:
                wait = self._bucket(key).take(self.clock())
                if wait > 0:
                    seconds = max(1, math.ceil(wait))
                    raise OverQuota(
                        f"Tenant {key.tenant!r} is over its rate of {key.rate:g} requests per "
                        f"second (bursts of {key.burst}); retry in {seconds} s.",
                        retry_after=seconds,
                    )
            self._in_flight[key.digest] = in_flight + 1
        return _Admission(self, key.digest)

    def _bucket(self, key) -> TokenBucket:
        bucket = self._buckets.get(key.digest)
        if bucket is None or (bucket.rate, bucket.burst) != (key.rate, key.burst):
            # A new key, or its quota changed in the file: a fresh, full bucket.
            bucket = self._buckets[key.digest] = TokenBucket(key.rate, key.burst, self.clock())
        return bucket

    def in_flight(self, key) -> int:
        """Requests of ``key`` admitted and not yet released."""
        with self._lock:
            return self._in_flight.get(key.digest, 0)

    def _release(self, digest: bytes) -> None:
        with self._lock:
            left = self._in_flight.get(digest, 0) - 1
            if left > 0:
                self._in_flight[digest] = left
            else:
                self._in_flight.pop(digest, None)


class _Admission:
    """One admitted request: leaving the context releases its place."""

    def __init__(self, quotas: Quotas, digest: bytes):
        self._quotas, self._digest, self._open = quotas, digest, True

    def __enter__(self) -> "_Admission":
        return self

    def __exit__(self, *exc) -> None:
        if self._open:
            self._open = False
            self._quotas._release(self._digest)
