"""LoRAConv2D: the LoRA version of Keras' ``Conv2D``."""

from .._tf import tf
from ..errors import UnsupportedLayerError
from .args import LORA_LAYER_ARGS
from .mixin import LoRALayerMixin

__all__ = ["LoRAConv2D"]


class LoRAConv2D(LoRALayerMixin, tf.keras.layers.Conv2D):
    """LoRA version of ``tf.keras.layers.Conv2D`` (channels_last, groups=1).

    ``A`` is a convolution ``[kh, kw, in, R]`` with the layer's own kernel
    size, strides, padding and dilation; ``B[R, filters]`` mixes its ``R``
    output channels. By linearity this equals a convolution with the kernel
    ``A @ B``, which is what merging folds in.

    Args:
        filters, kernel_size, *args: As for ``Conv2D``, in Keras' order.
        **kwargs: The LoRA arguments of :class:`~lora_ckpt.layers.LoRADense`,
            and every other ``Conv2D`` argument.

    Raises:
        LoRAConfigError: For an invalid rank, alpha, dropout or initializer.
        UnsupportedLayerError: For grouped convolutions or channels_first.
    """

    base_layer_class = tf.keras.layers.Conv2D

    def __init__(self, filters, kernel_size, *args, **kwargs):
        lora_kwargs = {k: kwargs.pop(k) for k in LORA_LAYER_ARGS if k in kwargs}
        super().__init__(filters, kernel_size, *args, **kwargs)
        if self.groups != 1:
            raise UnsupportedLayerError(
                f"LoRAConv2D does not support grouped convolutions (groups="
                f"{self.groups}); leave layer '{self.name}' out of the LoRA targets."
            )
        if self.data_format != "channels_last":
            raise UnsupportedLayerError(
                f"LoRAConv2D supports data_format='channels_last' only, got "
                f"{self.data_format!r} for layer '{self.name}'."
            )
        self._init_lora(**lora_kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        kh, kw, in_channels, _ = self.kernel.shape
        self._build_lora((kh, kw, in_channels, self.lora_rank), self.filters)

    def base_op(self, x, kernel):
        """The layer's convolution with its strides, padding and dilation."""
        return self.convolution_op(x, kernel)
