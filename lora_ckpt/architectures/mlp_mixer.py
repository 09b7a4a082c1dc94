"""LoRA variant of tfimm's MLP-Mixer (``mixer_block`` blocks)."""

from dataclasses import dataclass

from tfimm.architectures.mlp_mixer import MLPMixer, MLPMixerConfig
from tfimm.models import keras_serializable

from ..errors import UnsupportedLayerError
from ..registry import register_lora_architecture
from .base import LoRAConfigFields, LoRAModelMixin

__all__ = ["LoRAMLPMixer", "LoRAMLPMixerConfig"]


@dataclass
class LoRAMLPMixerConfig(MLPMixerConfig, LoRAConfigFields):
    """``MLPMixerConfig`` plus the LoRA fields of :class:`LoRAConfigFields`."""

    lora_layer_groups: tuple[str, ...] = ("token_mixing", "channel_mixing")


@keras_serializable
@register_lora_architecture(base_cls=MLPMixer)
class LoRAMLPMixer(LoRAModelMixin, MLPMixer):
    """MLP-Mixer with LoRA. Groups: ``token_mixing`` (``mlp_tokens.fc1/fc2``)
    and ``channel_mixing`` (``mlp_channels.fc1/fc2``) of every mixer block."""

    cfg_class = LoRAMLPMixerConfig
    LAYER_GROUPS = {
        "token_mixing": ("mlp_tokens.fc1", "mlp_tokens.fc2"),
        "channel_mixing": ("mlp_channels.fc1", "mlp_channels.fc2"),
    }
    MODEL_LAYER_GROUPS = {"head": ("head",)}

    def __init__(self, cfg: LoRAMLPMixerConfig, **kwargs):
        if cfg.block_layer != "mixer_block" or cfg.mlp_layer != "mlp":
            raise UnsupportedLayerError(
                f"LoRAMLPMixer supports block_layer='mixer_block' with mlp_layer='mlp', "
                f"got {cfg.block_layer!r} / {cfg.mlp_layer!r} (ResMLP and gMLP variants "
                "are not supported)."
            )
        super().__init__(cfg, **kwargs)
        self.apply_lora()

    def lora_blocks(self):
        return list(self.blocks)
