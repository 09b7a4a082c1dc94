"""What every registered LoRA architecture shares: its LoRA config fields and
the ``trainable_weights`` override that makes ``model.fit`` train only LoRA."""
from dataclasses import dataclass
from typing import List

from .._tf import tf
from ..models import lora_non_trainable_weights, lora_trainable_weights, validate_lora_config
from ..traversal import named_layers


@dataclass
class LoRAConfigFields:
    """LoRA fields added to an architecture's config dataclass.

    Attributes:
        lora_rank: Rank of every LoRA update.
        lora_alpha: Updates are scaled by ``lora_alpha / lora_rank``.
        lora_dropout: Dropout on the LoRA branch input during training.
        lora_train_bias: ``"none"``, ``"lora_only"`` or ``"all"``.
        lora_train_classifier: Whether the classifier head is trained in full.
    """

    lora_rank: int = 4
    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    lora_train_bias: str = "none"
    lora_train_classifier: bool = True


class LoRAModelMixin:
    """Mixed into a LoRA architecture (before its base class).

    ``trainable_weights``/``non_trainable_weights`` follow the config, so
    Keras' ``fit``, ``summary`` and optimizers see only what LoRA trains.
    """

    def _lora_kwargs(self) -> dict:
        validate_lora_config(self.cfg)
        return {
            "lora_rank": self.cfg.lora_rank,
            "lora_alpha": self.cfg.lora_alpha,
            "lora_dropout": self.cfg.lora_dropout,
        }

    def lora_trainable_layers(self) -> List[str]:
        """Paths of the layers trained in full: the classifier, if asked for."""
        if not self.cfg.lora_train_classifier:
            return []
        classifier = getattr(self.cfg, "classifier", None)
        names = [classifier] if isinstance(classifier, str) else list(classifier or [])
        existing = {path for path, _ in named_layers(self)}
        # A model built with nb_classes=0 has no classifier layer to train.
        return [name for name in names if name in existing]

    @property
    def trainable_weights(self) -> List[tf.Variable]:
        return lora_trainable_weights(
            self, self.cfg.lora_train_bias, self.lora_trainable_layers()
        )

    @property
    def non_trainable_weights(self) -> List[tf.Variable]:
        return lora_non_trainable_weights(
            self, self.cfg.lora_train_bias, self.lora_trainable_layers()
        )
