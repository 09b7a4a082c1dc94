"""LoRA variant of tfimm's ConvNeXt: LoRA on the two layers of every MLP block
(Dense, or 1x1 Conv2D with ``conv_mlp_block``), as in tfimm's LoRA module."""

from dataclasses import dataclass

from tfimm.architectures.convnext import ConvNeXt, ConvNeXtConfig

from ..registry import register_lora_architecture
from .base import LoRAConfigFields, LoRAModelMixin, lora_serializable

__all__ = ["LoRAConvNeXt", "LoRAConvNeXtConfig"]


@dataclass
class LoRAConvNeXtConfig(ConvNeXtConfig, LoRAConfigFields):
    """``ConvNeXtConfig`` plus the LoRA fields of :class:`LoRAConfigFields`."""

    lora_layer_groups: tuple[str, ...] = ("mlp",)


@lora_serializable
@register_lora_architecture(base_cls=ConvNeXt)
class LoRAConvNeXt(LoRAModelMixin, ConvNeXt):
    """ConvNeXt with LoRA. Groups: ``mlp`` (``mlp.fc1``, ``mlp.fc2``)."""

    cfg_class = LoRAConvNeXtConfig
    LAYER_GROUPS = {"mlp": ("mlp.fc1", "mlp.fc2")}
    MODEL_LAYER_GROUPS = {"head": ("fc",)}

    def __init__(self, cfg: LoRAConvNeXtConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.apply_lora()

    def lora_blocks(self):
        return [block for stage in self.stages for block in stage.blocks]
