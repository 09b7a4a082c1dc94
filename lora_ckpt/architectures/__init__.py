"""Registered LoRA variants of tfimm architectures, one module each."""
from .convnext import LoRAConvNeXt, LoRAConvNeXtConfig  # noqa: F401
