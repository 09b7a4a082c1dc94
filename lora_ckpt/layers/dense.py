"""LoRADense: the LoRA version of Keras' ``Dense``."""

from .._tf import tf
from .args import LORA_LAYER_ARGS
from .mixin import LoRALayerMixin
from .ops import matmul_last_axis

__all__ = ["LoRADense"]


class LoRADense(LoRALayerMixin, tf.keras.layers.Dense):
    """LoRA version of ``tf.keras.layers.Dense``.

    Positional arguments are ``Dense``'s, in Keras' order
    (``LoRADense(16, "relu")``); the LoRA arguments are keywords.

    Args:
        units, *args: As for ``Dense``.
        lora_rank: Rank ``R`` of the update ``A[in, R] @ B[R, units]``.
        lora_alpha: The update is scaled by ``lora_alpha / lora_rank``.
        lora_dropout: Dropout rate applied to the input of the LoRA branch
            during training.
        lora_initializer: Initializer of ``A`` (``B`` starts at zero): a Keras
            initializer, ``"gaussian"`` or ``"kaiming_uniform"`` (PEFT's).
        lora_regularizer: Regularizer of ``A`` and ``B``.
        lora_use_dora: DoRA: a trainable magnitude per output channel.
        lora_use_rslora: rsLoRA: scale by ``lora_alpha / sqrt(lora_rank)``.
        lora_freeze_base: Report only the LoRA weights (and the bias, with
            ``lora_bias_trainable``) as trainable; model conversion sets it.
        lora_bias_trainable: With ``lora_freeze_base``, the bias trains too.
        lora_enabled: Whether the update is applied.
        **kwargs: Every other ``Dense`` argument.

    Raises:
        LoRAConfigError: For an invalid rank, alpha, dropout or initializer.
    """

    base_layer_class = tf.keras.layers.Dense

    def __init__(self, units, *args, **kwargs):
        lora_kwargs = {k: kwargs.pop(k) for k in LORA_LAYER_ARGS if k in kwargs}
        super().__init__(units, *args, **kwargs)
        self._init_lora(**lora_kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_lora((self.kernel.shape[0], self.lora_rank), self.units)

    def base_op(self, x, kernel):
        """The layer's linear map: ``x @ kernel`` over the last axis."""
        return matmul_last_axis(x, kernel)
