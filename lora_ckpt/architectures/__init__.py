"""Registered LoRA variants of tfimm architectures, one module each."""

from . import families  # noqa: F401  (CaiT, EfficientNet, PVT, VGG, ...)
from .convnext import LoRAConvNeXt, LoRAConvNeXtConfig  # noqa: F401
from .mlp_mixer import LoRAMLPMixer, LoRAMLPMixerConfig  # noqa: F401
from .resnet import LoRAResNet, LoRAResNetConfig  # noqa: F401
from .swin import LoRASwinTransformer, LoRASwinTransformerConfig  # noqa: F401
from .vit import LoRAViT, LoRAViTConfig  # noqa: F401
