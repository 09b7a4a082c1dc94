"""A LoRA layer's merge state: its flags, and the base it keeps while merged.

The flags ``[merged, enabled]`` live in a small int32 variable that
checkpoints save (``save_weights``, ``model.save``, ``tf.train.Checkpoint``)
but that is not one of the layer's Keras weights (parameter counts stay
tfimm's): a merged or disabled model saved and reloaded computes what it
computed before. A restore can change the variable behind the layer's back,
so the variable is the truth whenever it can be read; the Python copy of the
flags serves only where it cannot (before build, TF1-style graphs).

Merging keeps a copy of the base kernel (and bias) and a fingerprint of the
merged kernel. The copy is the base of what the layer holds only while the
layer is merged and the kernel still has that fingerprint: weights loaded
over a merged layer make it stale, and then the base is not known. Every
query here is a pure function of these facts; only :meth:`MergeState.merge`,
:meth:`MergeState.unmerge` and :meth:`MergeState.set_enabled` change anything.
"""

from dataclasses import dataclass

from .._tf import tf
from ..errors import MergeStateError
from .names import LORA_STATE_NAME
from .ops import kernel_fingerprint

__all__ = ["KeptBase", "MergeState"]


@dataclass(frozen=True)
class KeptBase:
    """What merging overwrote: the base kernel (and bias), and the merged kernel's fingerprint."""

    kernel: tf.Tensor
    bias: tf.Tensor | None
    merged_fingerprint: bytes


def _eager_here() -> bool:
    # Inside a tf.function trace the outer context is eager: variables can be read.
    with tf.init_scope():
        return tf.executing_eagerly()


class MergeState:
    """The merged/enabled flags of one LoRA layer and the base it kept when merging.

    Args:
        layer_name: The layer's name, for error messages.
        enabled: Whether the LoRA update starts enabled.
    """

    def __init__(self, layer_name: str, enabled: bool):
        self.layer_name = layer_name
        self.variable: tf.Variable | None = None
        self._merged = False  # used only where the variable cannot be read
        self._enabled = bool(enabled)
        self._kept: KeptBase | None = None

    def create_variable(self) -> tf.Variable:
        """Creates the checkpointed ``[merged, enabled]`` variable (at the layer's build).

        Returns:
            The variable; the layer tracks it under :data:`LORA_STATE_NAME`.
        """
        with tf.init_scope():
            self.variable = tf.Variable(
                [int(self._merged), int(self._enabled)],
                dtype=tf.int32,
                trainable=False,
                name=LORA_STATE_NAME,
            )
        return self.variable

    # ---- queries: no side effects --------------------------------------------

    def flags(self) -> tuple[bool, bool]:
        """``(merged, enabled)``, from the variable when it can be read.

        Raises:
            MergeStateError: If the variable holds anything but two 0/1 flags
                (a checkpoint lora_ckpt did not write).
        """
        if self.variable is None or not _eager_here():
            return self._merged, self._enabled
        with tf.init_scope():
            values = self.variable.numpy()
        if values.shape != (2,) or not set(values.tolist()) <= {0, 1}:
            raise MergeStateError(
                f"The saved LoRA state of layer '{self.layer_name}' is {values.tolist()!r:.60}, "
                "not two 0/1 flags (merged, enabled); the checkpoint was not written by lora_ckpt."
            )
        return bool(values[0]), bool(values[1])

    @property
    def merged(self) -> bool:
        """Whether the update is folded into the kernel."""
        return self.flags()[0]

    @property
    def enabled(self) -> bool:
        """Whether the update is applied."""
        return self.flags()[1]

    def kept_base(self, kernel: tf.Variable) -> KeptBase | None:
        """The kept base, if it is still the base of what ``kernel`` holds.

        ``None`` when the layer is not merged, was merged when its model was
        saved (no copy exists), or weights were loaded over the merged kernel
        since (its fingerprint changed).
        """
        if self._kept is None or not self.merged:
            return None
        if _eager_here() and self._kept.merged_fingerprint != kernel_fingerprint(kernel):
            return None
        return self._kept

    def base_known(self, kernel: tf.Variable) -> bool:
        """Whether the base kernel is known: the layer is unmerged, or merged with a valid copy."""
        return not self.merged or self.kept_base(kernel) is not None

    # ---- commands ------------------------------------------------------------

    def set_enabled(self, enabled: bool) -> None:
        """Switches the update on or off (the merged flag stays as it is)."""
        self._write(self.merged, bool(enabled))

    def merge(self, kernel: tf.Variable, new_kernel, bias: tf.Variable = None, new_bias=None):
        """Keeps the base, assigns the merged kernel (and bias) and sets the merged flag.

        Args:
            kernel: The layer's kernel variable, holding the base.
            new_kernel: The merged kernel.
            bias: The layer's bias variable, if ``new_bias`` is given.
            new_bias: A bias to use while merged, or ``None`` to keep the base bias.

        Raises:
            MergeStateError: If the layer is already merged.
        """
        self.require_unmerged()
        base_kernel = tf.identity(kernel)
        kernel.assign(new_kernel)
        base_bias = None
        if new_bias is not None:
            base_bias = tf.identity(bias)
            bias.assign(new_bias)
        self._kept = KeptBase(base_kernel, base_bias, kernel_fingerprint(kernel))
        self._write(True, self.enabled)

    def unmerge(self, kernel: tf.Variable, bias: tf.Variable = None) -> None:
        """Assigns the kept base back, bit for bit, and clears the merged flag.

        Raises:
            MergeStateError: If the layer is not merged, or its base is not known.
        """
        if not self.merged:
            raise MergeStateError(
                f"Layer '{self.layer_name}' is not merged; there is nothing to unmerge."
            )
        kept = self.kept_base(kernel)
        if kept is None:
            raise MergeStateError(
                f"Layer '{self.layer_name}' holds a merged kernel whose base is not known: it was "
                "merged when its model was saved (the save holds only the merged kernel), or "
                "merged weights were loaded over it. It cannot be unmerged. Load the model "
                "saved before merging (or load an adapter into its base) to train or swap "
                "adapters."
            )
        kernel.assign(kept.kernel)
        if kept.bias is not None:
            bias.assign(kept.bias)
        self._kept = None
        self._write(False, self.enabled)

    def require_unmerged(self) -> None:
        """Raises MergeStateError if the layer is merged (merging twice would fold the update twice)."""
        if self.merged:
            raise MergeStateError(
                f"Layer '{self.layer_name}' is already merged; call unmerge_weights() "
                "before merging again."
            )

    def require_base(self, kernel: tf.Variable) -> None:
        """Raises MergeStateError if the base kernel is not known (see :meth:`kept_base`)."""
        if not self.base_known(kernel):
            raise MergeStateError(
                f"Layer '{self.layer_name}' holds a merged kernel whose base is not known: it "
                "was merged when its model was saved, or merged weights were loaded over it."
            )

    def _write(self, merged: bool, enabled: bool) -> None:
        self._merged, self._enabled = merged, enabled
        if self.variable is not None:
            self.variable.assign([int(merged), int(enabled)])
