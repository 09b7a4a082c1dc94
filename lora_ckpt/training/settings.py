"""What one training run is asked to do: a typed, validated record (plain Python).

The fields carry their help text (the CLI's flags are built from them), are
checked in ``__post_init__`` with messages that say what to do, and the
whole record is JSON for the adapter's training metadata, the report, a
``--tasks`` file and the resume check.
"""

import dataclasses
import math

from ..errors import LoRAConfigError

__all__ = ["DEFAULT_MAX_PIXELS", "TrainSettings"]


DEFAULT_MAX_PIXELS = 4096 * 4096
"""The service's default ``--max-pixels``: a training image larger than this is refused."""


def _field(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class TrainSettings:
    """How an adapter is trained (LoRA fields left ``None`` come from the store's ``base.json``)."""

    epochs: int = _field(10, "training epochs (the best one by validation loss is kept)")
    batch_size: int = _field(32, "images per training step")
    # The demo's adapter rate: LoRA factors and a fresh head, trained with Adam.
    learning_rate: float = _field(1e-2, "Adam's learning rate")
    rank: int | None = _field(None, "LoRA rank (default: the store's)")
    alpha: float | None = _field(None, "LoRA alpha, scaling = alpha / rank (default: the store's)")
    dora: bool = _field(False, "train a DoRA adapter (a magnitude per output channel)")
    targets: list[str] | None = _field(
        None,
        "layer groups (mlp, attention, ...) or layer paths/globs to adapt (default: the store's)",
    )
    val_split: float = _field(
        0.1, "fraction of each class held out for validation when no --val-data is given"
    )
    patience: int | None = _field(
        None, "stop after this many epochs without a better validation loss (default: never)"
    )
    seed: int = _field(0, "seed of the initialisation, the split and the shuffling")
    strict: bool = _field(False, "refuse unreadable or non-image files instead of skipping them")
    max_pixels: int = _field(DEFAULT_MAX_PIXELS, "refuse images with more pixels than this")

    def __post_init__(self):
        def whole(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LoRAConfigError(f"{name} must be a whole number >= {low}, got {value!r}.")

        whole("epochs", 1)
        whole("batch_size", 1)
        whole("seed", 0)
        whole("max_pixels", 1)
        if self.rank is not None:
            whole("rank", 1)
        if self.patience is not None:
            whole("patience", 1)
        for name in ("learning_rate", "alpha"):
            value = getattr(self, name)
            if value is None and name == "alpha":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise LoRAConfigError(f"{name} must be a positive number, got {value!r}.")
        if not isinstance(self.val_split, (int, float)) or not 0 < self.val_split < 1:
            raise LoRAConfigError(
                f"val_split must be between 0 and 1 (e.g. 0.1), got {self.val_split!r}; "
                "or give validation folders (--val-data)."
            )
        if self.targets is not None:
            if isinstance(self.targets, str) or not all(
                isinstance(t, str) and t for t in self.targets
            ):
                raise LoRAConfigError(f"targets must be a list of names, got {self.targets!r}.")
            self.targets = list(self.targets)
            if not self.targets:
                raise LoRAConfigError("targets must name at least one layer group or layer.")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainSettings":
        """Settings from a mapping (a ``--tasks`` entry), unknown keys refused.

        Raises:
            LoRAConfigError: For an unknown key or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise LoRAConfigError(f"Unknown training settings {unknown}; known: {sorted(names)}.")
        return cls(**values)

    def to_dict(self) -> dict:
        """The settings as JSON-ready values."""
        return dataclasses.asdict(self)

    def lora_overrides(self, groups: set[str]) -> dict:
        """The ``create_model`` LoRA fields these settings change.

        Args:
            groups: The architecture's layer group names: targets that are all
                group names become ``lora_layer_groups``, others
                ``lora_target_layers`` (paths, names or globs).
        """
        fields = {}
        if self.rank is not None:
            fields["lora_rank"] = self.rank
        if self.alpha is not None:
            fields["lora_alpha"] = float(self.alpha)
        if self.dora:
            fields["lora_use_dora"] = True
        if self.targets is not None:
            if set(self.targets) <= groups:
                fields["lora_layer_groups"] = tuple(self.targets)
            else:
                fields["lora_target_layers"] = tuple(self.targets)
        # The head has the task's own width: trained in full and saved with the adapter.
        fields["lora_train_classifier"] = True
        return fields
