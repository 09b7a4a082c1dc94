"""LoRA variant of tfimm's ConvNeXt: LoRA on the two layers of every MLP block."""
from dataclasses import dataclass

from tfimm.architectures.convnext import ConvNeXt, ConvNeXtConfig
from tfimm.models import keras_serializable

from ..layers import convert_to_lora_layer
from ..registry import register_lora_architecture
from .base import LoRAConfigFields, LoRAModelMixin

__all__ = ["LoRAConvNeXt", "LoRAConvNeXtConfig"]


@dataclass
class LoRAConvNeXtConfig(ConvNeXtConfig, LoRAConfigFields):
    """``ConvNeXtConfig`` plus the LoRA fields of :class:`LoRAConfigFields`."""


@keras_serializable
@register_lora_architecture(base_cls=ConvNeXt)
class LoRAConvNeXt(LoRAModelMixin, ConvNeXt):
    """ConvNeXt whose MLP ``fc1``/``fc2`` (Dense, or 1x1 Conv2D with
    ``conv_mlp_block``) are LoRA layers."""

    cfg_class = LoRAConvNeXtConfig

    def __init__(self, cfg: LoRAConvNeXtConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        lora_kwargs = self._lora_kwargs()
        for stage in self.stages:
            for block in stage.blocks:
                block.mlp.fc1 = convert_to_lora_layer(block.mlp.fc1, **lora_kwargs)
                block.mlp.fc2 = convert_to_lora_layer(block.mlp.fc2, **lora_kwargs)
