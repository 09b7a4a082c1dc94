"""What every registered LoRA architecture shares.

An architecture module subclasses a tfimm model with :class:`LoRAModelMixin`,
names its *layer groups* (which layers of each block get LoRA, e.g.
``"attention"``: ``attn.qkv`` and ``attn.proj``) and lists its blocks. The
mixin converts the chosen groups, validates the LoRA config, and overrides
``trainable_weights`` so Keras' ``fit`` trains only what LoRA trains.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from .._tf import tf
from ..errors import LoRAConfigError
from ..layers import convert_to_lora_layer, validate_lora_args
from ..selection import (
    LoRASettings,
    check_train_bias,
    lora_non_trainable_weights,
    lora_trainable_weights,
)
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
        lora_layer_groups: Which layer groups get LoRA; each architecture
            defines its groups and their default. The ``head`` group gives the
            classifier LoRA instead of training it in full (what an
            AdapterPool can serve per request).
    """

    lora_rank: int = 4
    lora_alpha: float = 1.0
    lora_dropout: float = 0.0
    lora_train_bias: str = "none"
    lora_train_classifier: bool = True
    lora_layer_groups: tuple[str, ...] = ()


class LoRAModelMixin:
    """Mixed into a LoRA architecture, before its tfimm base class.

    Subclasses set :attr:`LAYER_GROUPS` and implement :meth:`lora_blocks`,
    then call :meth:`apply_lora` at the end of ``__init__``.
    """

    #: group name -> attribute paths, inside one block, of the layers to convert.
    LAYER_GROUPS: dict[str, tuple[str, ...]] = {}
    #: group name -> attribute paths, from the model, of layers outside the blocks.
    MODEL_LAYER_GROUPS: dict[str, tuple[str, ...]] = {}

    @classmethod
    def layer_groups(cls) -> dict[str, tuple[str, ...]]:
        """Every layer group the architecture offers, block and model level."""
        return {**cls.LAYER_GROUPS, **cls.MODEL_LAYER_GROUPS}

    def lora_blocks(self) -> Iterable[tf.keras.layers.Layer]:
        """The blocks whose group layers get LoRA."""
        raise NotImplementedError

    def block_layer_paths(self, block, groups: tuple[str, ...]) -> list[str]:
        """Attribute paths, inside ``block``, of the layers the groups convert."""
        return [path for group in groups for path in self.LAYER_GROUPS[group]]

    def apply_lora(self) -> None:
        """Replaces the layers of the configured groups with LoRA layers.

        Raises:
            LoRAConfigError: For invalid LoRA values or an unknown group.
            UnsupportedLayerError: If a group layer cannot be converted.
        """
        validate_lora_args(self.cfg.lora_rank, self.cfg.lora_alpha, self.cfg.lora_dropout)
        check_train_bias(self.cfg.lora_train_bias)
        groups = tuple(self.cfg.lora_layer_groups)
        unknown = [g for g in groups if g not in self.layer_groups()]
        if unknown or not groups:
            raise LoRAConfigError(
                f"lora_layer_groups {list(groups)} is invalid for {type(self).__name__}: "
                f"choose one or more of {sorted(self.layer_groups())}."
            )
        kwargs = {
            "lora_rank": self.cfg.lora_rank,
            "lora_alpha": self.cfg.lora_alpha,
            "lora_dropout": self.cfg.lora_dropout,
            "lora_freeze_base": True,
        }
        block_groups = tuple(g for g in groups if g in self.LAYER_GROUPS)
        targets = [
            (block, path)
            for block in self.lora_blocks()
            for path in self.block_layer_paths(block, block_groups)
        ]
        targets += [
            (self, path)
            for g in groups
            if g in self.MODEL_LAYER_GROUPS
            for path in self.MODEL_LAYER_GROUPS[g]
        ]
        for owner, attr_path in targets:
            *parents, attr = attr_path.split(".")
            for name in parents:
                owner = getattr(owner, name)
            setattr(owner, attr, convert_to_lora_layer(getattr(owner, attr), **kwargs))

    def lora_trainable_layers(self) -> list[str]:
        """Paths of the layers trained in full: the classifier, if asked for
        (and not given LoRA through the ``head`` layer group)."""
        if not self.cfg.lora_train_classifier or "head" in self.cfg.lora_layer_groups:
            return []
        classifier = getattr(self.cfg, "classifier", None)
        names = [classifier] if isinstance(classifier, str) else list(classifier or [])
        existing = {name for path, layer in named_layers(self) for name in (path, layer.name)}
        # A model built with nb_classes=0 has no classifier layer to train.
        return [name for name in names if name in existing]

    @property
    def lora_settings(self) -> LoRASettings:
        """Bias mode and fully trained layers, from the config."""
        return LoRASettings(self.cfg.lora_train_bias, tuple(self.lora_trainable_layers()))

    @property
    def trainable_weights(self) -> list[tf.Variable]:
        return lora_trainable_weights(self, self.cfg.lora_train_bias, self.lora_trainable_layers())

    @property
    def non_trainable_weights(self) -> list[tf.Variable]:
        return lora_non_trainable_weights(
            self, self.cfg.lora_train_bias, self.lora_trainable_layers()
        )
