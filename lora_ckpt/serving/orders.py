"""Orders every replica carries out on its own pool: reload an adapter whose
store copy changed, or unload one.

Ray routes a request to one replica, so ``POST``/``DELETE /adapters/{name}``
reach one replica; the others would go on serving the old version. The
ingress therefore also leaves an order in the replica directory, and each
replica picks up the orders it has not carried out with its heartbeat. Only
the newest order per adapter is kept (an older one is superseded by it), so
the log is bounded by the number of adapters, and a replica that starts
later carries out each at most once.

Plain Python (no Ray, no TensorFlow): the directory keeps an
:class:`OrderLog`; replicas read it through :meth:`OrderLog.since`.
"""

import uuid
from dataclasses import asdict, dataclass

__all__ = ["Order", "OrderLog", "RELOAD", "UNLOAD"]


RELOAD = "reload"
UNLOAD = "unload"


@dataclass(frozen=True)
class Order:
    """One order: ``kind`` (``"reload"`` or ``"unload"``) of adapter ``name``.

    ``version`` is the SHA-256 of the ``adapter_config.json`` the first
    replica reloaded: a replica that already holds it has nothing to do.
    """

    seq: int
    kind: str
    name: str
    version: str | None = None


class OrderLog:
    """The directory's orders, numbered from 1 within one ``epoch``.

    The epoch changes when the directory starts again (its log is gone), so a
    replica that carried out orders of an earlier epoch starts over.
    """

    def __init__(self):
        self.epoch = uuid.uuid4().hex
        self._seq = 0
        self._newest: dict[str, Order] = {}

    @property
    def seq(self) -> int:
        """The number of the newest order (0 before the first)."""
        return self._seq

    def add(self, kind: str, name: str, version: str | None = None) -> int:
        """Records an order (superseding any older one for ``name``).

        Args:
            kind: ``"reload"`` or ``"unload"``.
            name: The adapter.
            version: For a reload, the config SHA-256 replicas must end up with.

        Returns:
            The order's number.

        Raises:
            ValueError: For another kind.
        """
        if kind not in (RELOAD, UNLOAD):
            raise ValueError(f"An order is {RELOAD!r} or {UNLOAD!r}, not {kind!r}.")
        self._seq += 1
        self._newest[name] = Order(self._seq, kind, name, version)
        return self._seq

    def since(self, epoch: str | None, seq: int) -> dict:
        """What a replica that carried out orders up to ``seq`` of ``epoch`` has
        left to do: ``{"epoch", "orders": [order as a dict, ...]}`` oldest first
        (every order, if ``epoch`` is not this log's)."""
        done = seq if epoch == self.epoch else 0
        orders = sorted((o for o in self._newest.values() if o.seq > done), key=lambda o: o.seq)
        return {"epoch": self.epoch, "orders": [asdict(o) for o in orders]}
