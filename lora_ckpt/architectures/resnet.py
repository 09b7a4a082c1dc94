"""LoRA variant of tfimm's ResNet (ResNet, ResNet-D, ...): Conv2D LoRA in the
residual blocks."""

from dataclasses import dataclass

from tfimm.architectures.resnet import ResNet, ResNetConfig

from .._tf import tf
from ..registry import register_lora_architecture
from .base import LoRAConfigFields, LoRAModelMixin, lora_serializable

__all__ = ["LoRAResNet", "LoRAResNetConfig"]


@dataclass
class LoRAResNetConfig(ResNetConfig, LoRAConfigFields):
    """``ResNetConfig`` plus the LoRA fields of :class:`LoRAConfigFields`.

    Attributes:
        lora_freeze_batchnorm: Run every BatchNorm layer in inference mode,
            so fine-tuning leaves the base's moving statistics as they are
            (otherwise name the BatchNorm layers in ``extra_layers`` when
            saving the adapter).
    """

    lora_layer_groups: tuple[str, ...] = ("conv1", "conv2", "conv3")
    lora_freeze_batchnorm: bool = True


@lora_serializable
@register_lora_architecture(base_cls=ResNet)
class LoRAResNet(LoRAModelMixin, ResNet):
    """ResNet with LoRA. Groups, per residual block: ``conv1`` (1x1 reduce, or
    the first 3x3 of a basic block), ``conv2`` (3x3), ``conv3`` (1x1 expand,
    bottleneck blocks only).

    ResNeXt-style blocks (``cardinality > 1``) have grouped 3x3 convolutions,
    which LoRA does not adapt: the default groups leave them out with a
    warning, and ``lora_layer_groups=("conv2",)`` alone is refused."""

    cfg_class = LoRAResNetConfig
    LAYER_GROUPS = {"conv1": ("conv1",), "conv2": ("conv2",), "conv3": ("conv3",)}
    MODEL_LAYER_GROUPS = {"head": ("head.fc",)}

    def __init__(self, cfg: LoRAResNetConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.apply_lora()
        if cfg.lora_freeze_batchnorm:
            for layer in self.submodules:
                if isinstance(layer, tf.keras.layers.BatchNormalization):
                    layer.trainable = False

    def lora_blocks(self):
        return list(self.blocks)

    def block_layer_paths(self, block, groups):
        # Basic blocks have no conv3, so the default groups fit both kinds.
        return [path for path in super().block_layer_paths(block, groups) if hasattr(block, path)]
