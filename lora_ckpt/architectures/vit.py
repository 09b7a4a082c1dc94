"""LoRA variant of tfimm's Vision Transformer (ViT, DeiT)."""

from dataclasses import dataclass

from tfimm.architectures.vit import ViT, ViTConfig

from ..registry import register_lora_architecture
from .base import LoRAConfigFields, LoRAModelMixin, lora_serializable

__all__ = ["LoRAViT", "LoRAViTConfig"]


@dataclass
class LoRAViTConfig(ViTConfig, LoRAConfigFields):
    """``ViTConfig`` plus the LoRA fields of :class:`LoRAConfigFields`."""

    lora_layer_groups: tuple[str, ...] = ("attention", "mlp")


@lora_serializable
@register_lora_architecture(base_cls=ViT)
class LoRAViT(LoRAModelMixin, ViT):
    """ViT with LoRA. Groups: ``attention`` (``attn.qkv``, ``attn.proj``) and
    ``mlp`` (``mlp.fc1``, ``mlp.fc2``) of every transformer block."""

    cfg_class = LoRAViTConfig
    LAYER_GROUPS = {"attention": ("attn.qkv", "attn.proj"), "mlp": ("mlp.fc1", "mlp.fc2")}
    MODEL_LAYER_GROUPS = {"head": ("head",)}

    def __init__(self, cfg: LoRAViTConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.apply_lora()

    def lora_blocks(self):
        return list(self.blocks)
