"""What every LoRA layer shares: its weights, forward pass, merge and persistence.

A layer computes ``base(x) + scaling * B(A(dropout(x)))`` before bias and
activation; how that sum is formed and folded into the kernel is its variant's
business (:mod:`lora_ckpt.layers.variants`), and whether it is folded in is
its merge state's (:mod:`lora_ckpt.layers.merge_state`).
"""

from .._tf import tf
from ..errors import MergeStateError
from .args import (
    LORA_INITIALIZERS,
    flag,
    lora_scaling,
    resolve_lora_initializer,
    validate_lora_args,
)
from .merge_state import MergeState
from .names import LORA_A_NAME, LORA_B_NAME, LORA_STATE_NAME
from .ops import matmul_last_axis
from .variants import lora_variant

__all__ = ["LoRALayerMixin"]


try:  # Keras 2 has no public way to tell a SavedModel export's traces from training.
    from tf_keras.src.saving.legacy.saved_model.utils import (
        in_tf_saved_model_scope as _saving_saved_model,
    )
except ImportError:  # pragma: no cover - other tf_keras layouts

    def _saving_saved_model() -> bool:
        return False


class LoRALayerMixin:
    """What every LoRA layer shares: weights, scaling, merge state, config.

    A subclass calls :meth:`_init_lora` in ``__init__`` and
    :meth:`_build_lora` in ``build`` and implements :meth:`base_op`; the
    forward pass ``base_op(x, W) + scaling * base_op(x, A) @ B`` is here.
    """

    is_lora_layer: bool = True

    def _init_lora(
        self,
        lora_rank=4,
        lora_alpha=1.0,
        lora_dropout=0.0,
        lora_initializer="glorot_uniform",
        lora_regularizer=None,
        lora_use_dora=False,
        lora_use_rslora=False,
        lora_freeze_base=False,
        lora_bias_trainable=False,
        lora_enabled=True,
    ):
        validate_lora_args(lora_rank, lora_alpha, lora_dropout)
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha) if not isinstance(lora_alpha, int) else lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.lora_use_dora = flag(lora_use_dora, "lora_use_dora")
        self.lora_use_rslora = flag(lora_use_rslora, "lora_use_rslora")
        # Chosen once: the forward pass, merge and weight lists never ask again.
        self.lora_variant = lora_variant(self.lora_use_dora)
        self._lora_initializer_spec = (
            lora_initializer if lora_initializer in LORA_INITIALIZERS else None
        )
        self.lora_initializer = resolve_lora_initializer(lora_initializer, lora_rank)
        self.lora_regularizer = tf.keras.regularizers.get(lora_regularizer)
        # Set by model conversion: the base kernel (and bias, unless
        # lora_bias_trainable) stop being trainable weights.
        self.lora_freeze_base = flag(lora_freeze_base, "lora_freeze_base")
        self.lora_bias_trainable = flag(lora_bias_trainable, "lora_bias_trainable")
        self.lora_merge_state = MergeState(self.name, flag(lora_enabled, "lora_enabled"))
        self.kernel_lora_a = None
        self.kernel_lora_b = None
        self.lora_magnitude = None  # DoRA's, created by its variant
        # The one serving hook: a callable ``hook(layer, x)`` that returns the
        # pre-activation output (bias included) or None for the plain forward.
        # Set by a serving pool on its own layers; this module never imports it.
        self.lora_hook = None

    def _build_lora(self, a_shape, out_dim):
        self.kernel_lora_a = self.add_weight(
            LORA_A_NAME,
            shape=a_shape,
            initializer=self.lora_initializer,
            regularizer=self.lora_regularizer,
            dtype=self.dtype,
            trainable=True,
        )
        self.kernel_lora_b = self.add_weight(
            LORA_B_NAME,
            shape=(self.lora_rank, out_dim),
            initializer=tf.keras.initializers.Zeros(),
            regularizer=self.lora_regularizer,
            dtype=self.dtype,
            trainable=True,
        )
        self.lora_variant.build(self, out_dim)
        # Tracked for checkpoints only: not a Keras weight, so parameter counts
        # and weight lists stay those of plain LoRA (and of tfimm).
        self._track_trackable(self.lora_merge_state.create_variable(), name=LORA_STATE_NAME)

    # ---- state ------------------------------------------------------------------

    @property
    def scaling(self) -> float:
        """The factor ``lora_alpha / lora_rank`` (rsLoRA: over ``sqrt(rank)``)."""
        return lora_scaling(self.lora_alpha, self.lora_rank, self.lora_use_rslora)

    @property
    def lora_enabled(self) -> bool:
        """Whether the LoRA update is applied (kept in the layer's saved state)."""
        return self.lora_merge_state.enabled

    @lora_enabled.setter
    def lora_enabled(self, value: bool) -> None:
        self.lora_merge_state.set_enabled(bool(value))

    @property
    def merged(self) -> bool:
        """Whether the LoRA update is currently folded into the kernel."""
        return self.lora_merge_state.merged

    @property
    def _lora_state(self):
        """The checkpointed ``[merged, enabled]`` variable (``None`` before build)."""
        return self.lora_merge_state.variable

    def lora_branch_active(self) -> bool:
        """Whether ``call`` adds the low-rank branch (enabled and not merged)."""
        merged, enabled = self.lora_merge_state.flags()
        return enabled and not merged

    # ---- the update -------------------------------------------------------------

    def base_kernel(self) -> tf.Tensor:
        """The base kernel ``W0``, also while the update is merged into the kernel.

        Raises:
            MergeStateError: If the layer was merged when its model was saved,
                or merged weights were loaded over it (the base kernel is not
                known then).
        """
        state = self.lora_merge_state
        state.require_base(self.kernel)
        kept = state.kept_base(self.kernel)
        return tf.convert_to_tensor(self.kernel if kept is None else kept.kernel)

    def lora_delta(self) -> tf.Tensor:
        """The update ``scaling * A @ B``, in the shape of the kernel."""
        delta = matmul_last_axis(self.kernel_lora_a, self.kernel_lora_b)
        return tf.cast(self.scaling, delta.dtype) * delta

    def lora_update(self, x, training=None) -> tf.Tensor:
        """The low-rank branch ``scaling * B(A(dropout(x)))``, in the output's shape."""
        z = self.base_op(self._dropout_lora_input(x, training), self.kernel_lora_a)
        return matmul_last_axis(z, self.scaling * self.kernel_lora_b)

    def dora_output_scale(self, kernel=None) -> tf.Tensor:
        """The per-output factor of the layer's variant: DoRA's
        ``magnitude / ||W0 + scaling * A @ B||``, ones for plain LoRA.

        Args:
            kernel: The base kernel ``W0``; the layer's own by default.
        """
        return self.lora_variant.output_scale(self, self.kernel if kernel is None else kernel)

    def merged_kernel(self) -> tf.Tensor:
        """The kernel with the update folded in: what merging assigns.

        ``W0 + scaling * A @ B``; with DoRA, that times its output scale.

        Raises:
            MergeStateError: If the base kernel is not known (see :meth:`base_kernel`).
        """
        return self.lora_variant.merged_kernel(self, self.base_kernel())

    def reset_lora_magnitude(self) -> None:
        """Sets a DoRA magnitude to the kernel's column norms, so the layer
        computes its base again (call after the base kernel was replaced)."""
        self.lora_variant.reset(self)

    def _dropout_lora_input(self, x, training):
        if training and self.lora_dropout > 0.0:
            return tf.nn.dropout(x, rate=self.lora_dropout)
        return x

    # ---- merging ----------------------------------------------------------------

    def merge_weights(self) -> None:
        """Folds the LoRA update into the kernel (:meth:`merged_kernel`).

        While merged, ``call`` uses the kernel alone, so inference costs what
        the base layer costs. A merged layer cannot be trained.

        Raises:
            MergeStateError: If the layer is already merged.
        """
        self.lora_merge_state.require_unmerged()
        self.lora_merge_state.merge(self.kernel, self.merged_kernel())

    def merge_update(self, delta: tf.Tensor, bias=None, output_scale=None) -> None:
        """Assigns ``kernel = (W0 + delta) * output_scale`` and ``bias`` from kept copies.

        Args:
            delta: An update in the shape of the kernel.
            bias: A bias to use while merged, or ``None`` to keep the base bias.
            output_scale: A per-output factor (DoRA), or ``None``.

        Raises:
            MergeStateError: If the layer is already merged.
        """
        self.lora_merge_state.require_unmerged()
        kernel = tf.convert_to_tensor(self.kernel) + tf.cast(delta, self.kernel.dtype)
        if output_scale is not None:
            kernel = kernel * tf.cast(output_scale, kernel.dtype)
        self.lora_merge_state.merge(
            self.kernel, kernel, self.bias if bias is not None else None, bias
        )

    def unmerge_weights(self) -> None:
        """Restores the base kernel exactly as it was before :meth:`merge_weights`.

        Raises:
            MergeStateError: If the layer is not merged, or was merged when
                its model was saved (the base kernel is not in that save).
        """
        self.lora_merge_state.unmerge(self.kernel, self.bias if self.use_bias else None)

    # ---- Keras weight lists -------------------------------------------------------

    def lora_trainable_weights(self, train_bias: bool) -> list[tf.Variable]:
        """The weights LoRA training updates in this layer.

        Args:
            train_bias: Whether to include the layer's bias.

        Returns:
            ``[kernel_lora_a, kernel_lora_b]`` (and DoRA's ``lora_magnitude``),
            plus the bias if asked for and the layer has one.
        """
        weights = [self.kernel_lora_a, self.kernel_lora_b]
        weights += self.lora_variant.extra_trainable_weights(self)
        if train_bias and self.use_bias:
            weights.append(self.bias)
        return weights

    # Keras decides trainability per layer, LoRA per variable: once a model
    # conversion froze the base, the kernel of a LoRA layer is frozen and A
    # and B train. Overriding these properties makes Keras' own `fit`,
    # `summary` and optimizers see exactly that, in any model.
    @property
    def trainable_weights(self):
        if not self.trainable or not self.lora_freeze_base or self.kernel_lora_a is None:
            return super().trainable_weights
        return self.lora_trainable_weights(self.lora_bias_trainable)

    @property
    def non_trainable_weights(self):
        trainable = {id(v) for v in self.trainable_weights}
        return [v for v in self.weights if id(v) not in trainable]

    @property
    def weights(self):
        # Keras' order (kernel, bias, A, B), whatever is trainable.
        weights = super().trainable_weights + super().non_trainable_weights
        # A merged or disabled layer lists its state too, so that HDF5 weight
        # files (which save exactly these lists) carry it; a fresh layer
        # then refuses such a file instead of silently applying LoRA twice.
        state = self.lora_merge_state
        if state.variable is not None:
            merged, enabled = state.flags()
            if merged or not enabled:
                weights.append(state.variable)
        return weights

    # ---- persistence --------------------------------------------------------------

    def save_own_variables(self, store):
        """Keras' ``.keras`` format: the layer's variables, then its LoRA state."""
        super().save_own_variables(store)
        if self._lora_state is not None:
            store[LORA_STATE_NAME] = self._lora_state.numpy()

    def load_own_variables(self, store):
        """Keras' ``.keras`` format: restores the variables and the LoRA state.

        Raises:
            MergeStateError: If the stored state is not two 0/1 flags.
        """
        stored = list(store.keys())  # an H5 entry: keys() is its only listing
        super().load_own_variables({k: store[k] for k in stored if k != LORA_STATE_NAME})
        if self._lora_state is not None and LORA_STATE_NAME in stored:
            self._lora_state.assign(store[LORA_STATE_NAME])
            self.lora_merge_state.flags()  # refuse a bad state now, not at the next call

    def get_config(self):
        config = super().get_config()
        initializer = self._lora_initializer_spec or tf.keras.initializers.serialize(
            self.lora_initializer
        )
        config.update(
            {
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "lora_initializer": initializer,
                "lora_regularizer": tf.keras.regularizers.serialize(self.lora_regularizer),
                "lora_use_dora": self.lora_use_dora,
                "lora_use_rslora": self.lora_use_rslora,
                "lora_freeze_base": self.lora_freeze_base,
                "lora_bias_trainable": self.lora_bias_trainable,
                "lora_enabled": self.lora_enabled,
            }
        )
        return config

    # ---- forward ------------------------------------------------------------------

    def base_op(self, x, kernel):
        """The base layer's linear map (matmul or convolution) with ``kernel``."""
        raise NotImplementedError

    def adopt_base_layer(self, layer) -> None:
        """Takes over what the base layer's config does not carry (none here)."""

    def call(self, inputs, training=None):
        merged, enabled = self.lora_merge_state.flags()
        if training and merged and self.trainable and not _saving_saved_model():
            raise MergeStateError(
                f"LoRA layer '{self.name}' is merged and cannot be trained (its update is "
                "folded into the frozen kernel); call unmerge_lora_weights(model) first."
            )
        x = tf.cast(inputs, self.compute_dtype)
        outputs = self.lora_hook(self, x) if self.lora_hook is not None else None
        if outputs is None:
            outputs = self.base_op(x, self.kernel)
            if enabled and not merged:
                outputs = self.lora_variant.forward(self, x, outputs, training)
            if self.use_bias:
                outputs = tf.nn.bias_add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs
