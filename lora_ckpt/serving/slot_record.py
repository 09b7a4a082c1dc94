"""What a pool knows about the adapter in one slot, beside its weights.

Plain Python. A pool keeps one :class:`SlotRecord` per slot and replaces it
whole (one list assignment, atomic for concurrent readers) when a load writes
the slot, before the slot table makes the slot visible.
"""

from dataclasses import dataclass, field

__all__ = ["SlotRecord"]


@dataclass(frozen=True)
class SlotRecord:
    """One slot's adapter, as far as requests and the service need it.

    Attributes:
        classes: The width of the adapter's classifier head, or ``None`` for
            a pool without per-adapter heads (outputs keep the model's width).
        version: The SHA-256 of the ``adapter_config.json`` it was loaded
            from (``None`` for slot 0 and free slots).
        metadata: The user metadata of that config (labels, ...).
        scaled: Whether some layer of the adapter has an output scale (DoRA):
            batches for it alone run the pool's graphs with output scales.
    """

    classes: int | None = None
    version: str | None = None
    metadata: dict = field(default_factory=dict)
    scaled: bool = False
