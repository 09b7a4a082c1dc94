"""LoRA variant of tfimm's Swin Transformer."""

from dataclasses import dataclass

from tfimm.architectures.swin import SwinTransformer, SwinTransformerConfig

from ..registry import register_lora_architecture
from .base import LoRAConfigFields, LoRAModelMixin, lora_serializable

__all__ = ["LoRASwinTransformer", "LoRASwinTransformerConfig"]


@dataclass
class LoRASwinTransformerConfig(SwinTransformerConfig, LoRAConfigFields):
    """``SwinTransformerConfig`` plus the LoRA fields of :class:`LoRAConfigFields`."""

    lora_layer_groups: tuple[str, ...] = ("attention", "mlp")


@lora_serializable
@register_lora_architecture(base_cls=SwinTransformer)
class LoRASwinTransformer(LoRAModelMixin, SwinTransformer):
    """Swin with LoRA. Groups: ``attention`` (window attention ``attn.qkv``,
    ``attn.proj``) and ``mlp`` (``mlp.fc1``, ``mlp.fc2``) of every block."""

    cfg_class = LoRASwinTransformerConfig
    LAYER_GROUPS = {"attention": ("attn.qkv", "attn.proj"), "mlp": ("mlp.fc1", "mlp.fc2")}
    MODEL_LAYER_GROUPS = {"head": ("head",)}

    def __init__(self, cfg: LoRASwinTransformerConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.apply_lora()

    def lora_blocks(self):
        return [block for stage in self.stages for block in stage.blocks]
