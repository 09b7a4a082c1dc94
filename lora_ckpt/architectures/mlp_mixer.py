"""LoRA variant of tfimm's MLP-Mixer class: Mixer, ResMLP and gMLP blocks."""

from dataclasses import dataclass

from tfimm.architectures.mlp_mixer import MLPMixer, MLPMixerConfig

from ..registry import register_lora_architecture
from .base import BuildTimeLoRAMixin, LoRAConfigFields, lora_serializable

__all__ = ["LoRAMLPMixer", "LoRAMLPMixerConfig"]


@dataclass
class LoRAMLPMixerConfig(MLPMixerConfig, LoRAConfigFields):
    """``MLPMixerConfig`` plus the LoRA fields of :class:`LoRAConfigFields`."""

    lora_layer_groups: tuple[str, ...] = ("token_mixing", "channel_mixing")


@lora_serializable
@register_lora_architecture(base_cls=MLPMixer)
class LoRAMLPMixer(BuildTimeLoRAMixin, MLPMixer):
    """MLP-Mixer with LoRA. Groups: ``token_mixing`` (Mixer's ``mlp_tokens``,
    ResMLP's ``linear_tokens``, gMLP's spatial gate ``mlp_channels.gate.proj``,
    which exists once the model is built) and ``channel_mixing``
    (``mlp_channels.fc1/fc2``) of every block."""

    cfg_class = LoRAMLPMixerConfig
    GROUP_PATTERNS = {
        "token_mixing": (
            "blocks/*/mlp_tokens/fc1",
            "blocks/*/mlp_tokens/fc2",
            "blocks/*/linear_tokens",
            "blocks/*/mlp_channels/gate/proj",
        ),
        "channel_mixing": ("blocks/*/mlp_channels/fc1", "blocks/*/mlp_channels/fc2"),
        "head": ("head",),
    }
