"""LoRA methods as small strategy objects (PEFT's ``LoraVariant``).

A LoRA layer picks its variant once, when it is created; its forward pass,
merge and weight lists ask the variant and never which method it is. A
variant is stateless (its weights live on the layer, under the names adapter
files use), so one instance serves every layer.

- :data:`PLAIN_LORA`: ``W0 + scaling * A @ B``.
- :data:`DORA`: DoRA, the same times ``magnitude / ||W0 + scaling * A @ B||``
  per output channel (column norms over every kernel axis but the last),
  with ``magnitude`` trainable and initialised to the base kernel's norms.

rsLoRA changes only the scaling (:func:`lora_ckpt.layers.lora_scaling`), so
it is a flag of either variant, not a variant of its own.
"""

from .._tf import tf
from .names import LORA_MAGNITUDE_NAME
from .ops import column_norm, dora_scale

__all__ = ["DORA", "DoRAVariant", "LoRAVariant", "PLAIN_LORA", "lora_variant"]


class LoRAVariant:
    """Plain LoRA; the base class of every variant.

    Each method takes the layer (a :class:`~lora_ckpt.layers.LoRALayerMixin`)
    whose ``kernel_lora_a``/``kernel_lora_b``, ``scaling`` and ``lora_delta()``
    it reads.
    """

    name = "lora"

    def build(self, layer, out_dim: int) -> None:
        """Creates the variant's own weights on ``layer`` (none for plain LoRA)."""

    def extra_trainable_weights(self, layer) -> list:
        """Weights the variant trains besides ``A`` and ``B``."""
        return []

    def reset(self, layer) -> None:
        """Makes a fresh variant weight fit the layer's current base kernel."""

    def output_scale(self, layer, kernel) -> tf.Tensor:
        """The per-output factor applied to ``base + update`` (1 for plain LoRA).

        Args:
            layer: The LoRA layer.
            kernel: The base kernel ``W0``.
        """
        return tf.ones(kernel.shape[-1:], kernel.dtype)

    def adapter_output_scale(self, base_kernel, delta, magnitude=None) -> tf.Tensor:
        """The per-output factor of an adapter's update outside any layer (what a
        pool keeps per slot): 1 for plain LoRA.

        Args:
            base_kernel: ``W0``.
            delta: The adapter's ``scaling * A @ B``, in the kernel's shape.
            magnitude: The adapter's DoRA magnitude (unused by plain LoRA).
        """
        return tf.ones(base_kernel.shape[-1:], base_kernel.dtype)

    def forward(self, layer, x, outputs, training) -> tf.Tensor:
        """The pre-bias output: the base output ``outputs`` plus the update.

        Args:
            layer: The LoRA layer.
            x: The layer input (in the compute dtype).
            outputs: ``base_op(x, W0)``.
            training: Keras' training flag (LoRA dropout acts only then).
        """
        return outputs + layer.lora_update(x, training)

    def merged_kernel(self, layer, base) -> tf.Tensor:
        """The kernel that computes :meth:`forward` alone: ``W0 + scaling * A @ B``.

        Args:
            layer: The LoRA layer.
            base: The base kernel ``W0`` (a tensor).
        """
        return base + tf.cast(layer.lora_delta(), base.dtype)


class DoRAVariant(LoRAVariant):
    """DoRA: a trainable magnitude per output channel rescales ``W0 + scaling * A @ B``."""

    name = "dora"

    def build(self, layer, out_dim: int) -> None:
        """Creates ``lora_magnitude[out]``, initialised to the kernel's column norms."""
        layer.lora_magnitude = layer.add_weight(
            LORA_MAGNITUDE_NAME,
            shape=(out_dim,),
            initializer=lambda shape, dtype=None: column_norm(layer.kernel),
            dtype=layer.dtype,
            trainable=True,
        )

    def extra_trainable_weights(self, layer) -> list:
        """``[lora_magnitude]``."""
        return [layer.lora_magnitude]

    def reset(self, layer) -> None:
        """Sets the magnitude to the kernel's column norms: the layer computes its base again."""
        layer.lora_magnitude.assign(column_norm(layer.kernel))

    def output_scale(self, layer, kernel) -> tf.Tensor:
        """``magnitude / ||W0 + scaling * A @ B||`` per output."""
        updated = tf.convert_to_tensor(kernel) + tf.cast(layer.lora_delta(), kernel.dtype)
        return dora_scale(tf.convert_to_tensor(layer.lora_magnitude), updated)

    def adapter_output_scale(self, base_kernel, delta, magnitude=None) -> tf.Tensor:
        """``magnitude / ||W0 + delta||`` per output."""
        base_kernel = tf.convert_to_tensor(base_kernel)
        updated = base_kernel + tf.cast(delta, base_kernel.dtype)
        return dora_scale(tf.cast(magnitude, base_kernel.dtype), updated)

    def forward(self, layer, x, outputs, training) -> tf.Tensor:
        """``(base + update) * output_scale``: DoRA's scale is linear in the output,
        so it applies after the two convolutions (or matmuls)."""
        outputs = super().forward(layer, x, outputs, training)
        return outputs * tf.cast(self.output_scale(layer, layer.kernel), outputs.dtype)

    def merged_kernel(self, layer, base) -> tf.Tensor:
        """``(W0 + scaling * A @ B) * output_scale``, each column rescaled."""
        updated = super().merged_kernel(layer, base)
        return updated * dora_scale(tf.convert_to_tensor(layer.lora_magnitude), updated)


PLAIN_LORA = LoRAVariant()
"""The plain LoRA variant."""

DORA = DoRAVariant()
"""The DoRA variant."""


def lora_variant(use_dora: bool) -> LoRAVariant:
    """The variant a layer with ``lora_use_dora=use_dora`` uses.

    Args:
        use_dora: The layer's ``lora_use_dora``.

    Returns:
        :data:`DORA` or :data:`PLAIN_LORA`.
    """
    return DORA if use_dora else PLAIN_LORA
