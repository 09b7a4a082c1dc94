"""LoRA variants of the other tfimm families, from one table of layer groups.

Each entry names a family's groups as globs over layer paths (``fnmatch``:
``*`` also crosses ``/``), its default groups, and whether its layers exist
only once the model is built. A LoRA class and its config dataclass are made
from the entry and registered like the hand-written ones, so
``create_model``, ``convert_to_lora_model``, adapters and pools treat every
family alike. tfimm's ``PadConv2D`` (EfficientNet's convolutions with
PyTorch-style padding) gets a LoRA class here too.

Layers left out on purpose: depthwise and grouped convolutions (no low-rank
structure LoRA can use), ``StdConv2D`` (ResNetV2/BiT: the kernel is
standardised inside ``call``, so ``W0 + A @ B`` would not be what it uses),
and stems inside nested Sequential models.
"""

from dataclasses import field, make_dataclass

from tfimm.architectures.cait import CaiT
from tfimm.architectures.convmixer import ConvMixer
from tfimm.architectures.efficientnet import EfficientNet
from tfimm.architectures.pit import PoolingVisionTransformer
from tfimm.architectures.poolformer import PoolFormer
from tfimm.architectures.pvt import PyramidVisionTransformer
from tfimm.architectures.pvt_v2 import PyramidVisionTransformerV2
from tfimm.architectures.resnetv2 import ResNetV2
from tfimm.architectures.vgg import VGG
from tfimm.layers.conv import PadConv2D

from ..layers import LoRAConv2D, LoRALayerMixin, register_lora_layer
from ..registry import register_lora_architecture
from .base import BuildTimeLoRAMixin, LoRAConfigFields, LoRAModelMixin, lora_serializable


class LoRAPadConv2D(LoRAConv2D, PadConv2D):
    """LoRA version of tfimm's ``PadConv2D``: the symmetric padding is applied
    before both the base convolution and ``A``, so the update stays the
    convolution with ``A @ B``."""

    base_layer_class = PadConv2D

    def adopt_base_layer(self, layer) -> None:
        # PadConv2D's config says padding="valid"; its padding layer is not in it.
        self.pad = layer.pad

    def call(self, inputs, training=None):
        if self.pad is not None:
            inputs = self.pad(inputs)
        return LoRALayerMixin.call(self, inputs, training)


register_lora_layer(PadConv2D, LoRAPadConv2D)

_ATTENTION = ("blocks/*/attn/qkv", "blocks/*/attn/proj")
_MLP = ("blocks/*/mlp/fc1", "blocks/*/mlp/fc2")
_PVT = {
    "attention": ("blocks/*/attn/q", "blocks/*/attn/kv", "blocks/*/attn/proj"),
    "sr": ("blocks/*/attn/sr",),
    "mlp": _MLP,
    "patch_embed": ("patch_embed/*/projection",),
    "head": ("head",),
}

#: family -> (base class, {group: globs}, default groups, layers made in build)
FAMILIES = {
    "CaiT": (
        CaiT,
        {
            "attention": (
                *_ATTENTION,
                "block_token_only/*/attn/q",
                "block_token_only/*/attn/k",
                "block_token_only/*/attn/v",
                "block_token_only/*/attn/proj",
            ),
            "talking_heads": ("blocks/*/attn/proj_l", "blocks/*/attn/proj_w"),
            "mlp": (*_MLP, "block_token_only/*/mlp/fc1", "block_token_only/*/mlp/fc2"),
            "head": ("head",),
        },
        ("attention", "mlp"),
        False,
    ),
    "ConvMixer": (ConvMixer, {"conv": ("blocks/*/conv2",), "head": ("head",)}, ("conv",), False),
    "EfficientNet": (
        EfficientNet,
        {
            "conv": ("blocks/*/conv_pw", "blocks/*/conv_pwl", "blocks/*/conv_exp", "blocks/*/conv"),
            "se": ("blocks/*/se/conv_reduce", "blocks/*/se/conv_expand"),
            "conv_head": ("conv_head",),
            "head": ("classifier",),
        },
        ("conv",),
        True,
    ),
    "PoolingVisionTransformer": (
        PoolingVisionTransformer,
        {
            "attention": _ATTENTION,
            "mlp": _MLP,
            "pool": ("blocks/*/pool/fc",),
            "head": ("head", "head_dist"),
        },
        ("attention", "mlp"),
        False,
    ),
    "PoolFormer": (
        PoolFormer,
        {"mlp": _MLP, "downsample": ("blocks/*/downsample/projection",), "head": ("head",)},
        ("mlp",),
        False,
    ),
    "PyramidVisionTransformer": (
        PyramidVisionTransformer,
        _PVT,
        ("attention", "mlp"),
        True,
    ),
    "PyramidVisionTransformerV2": (
        PyramidVisionTransformerV2,
        _PVT,
        ("attention", "mlp"),
        False,
    ),
    "ResNetV2": (ResNetV2, {"head": ("head/fc",)}, ("head",), False),
    "VGG": (
        VGG,
        {"conv": ("blocks/*",), "mlp": ("pre_logits/fc1", "pre_logits/fc2"), "head": ("head/fc",)},
        ("conv", "mlp"),
        False,
    ),
}


def _make_architecture(family: str, base_cls: type, groups: dict, default: tuple, deferred: bool):
    cfg_cls = make_dataclass(
        f"LoRA{family}Config",
        [("lora_layer_groups", tuple, field(default=default))],
        bases=(base_cls.cfg_class, LoRAConfigFields),
    )
    cfg_cls.__module__ = __name__
    cfg_cls.__doc__ = f"``{base_cls.cfg_class.__name__}`` plus the LoRA fields."

    def __init__(self, cfg, **kwargs):
        super(lora_cls, self).__init__(cfg, **kwargs)
        if not deferred:
            self.apply_lora()

    lora_cls = type(
        f"LoRA{family}",
        (BuildTimeLoRAMixin if deferred else LoRAModelMixin, base_cls),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__doc__": f"{family} with LoRA. Groups: {', '.join(groups)}.",
            "cfg_class": cfg_cls,
            "GROUP_PATTERNS": groups,
        },
    )
    lora_serializable(register_lora_architecture(lora_cls, base_cls=base_cls))
    return lora_cls, cfg_cls


for _family, _entry in FAMILIES.items():
    _cls, _cfg = _make_architecture(_family, *_entry)
    globals()[_cls.__name__] = _cls
    globals()[_cfg.__name__] = _cfg

__all__ = ["FAMILIES", "LoRAPadConv2D"] + [f"LoRA{f}{s}" for f in FAMILIES for s in ("", "Config")]
