"""LoRA layers: drop-in subclasses of Keras' ``Dense`` and ``Conv2D``.

Each layer computes ``base(x) + scaling * B(A(dropout(x)))`` before bias and
activation, with ``scaling = lora_alpha / lora_rank`` (rsLoRA:
``lora_alpha / sqrt(lora_rank)``) and ``B`` initialised to zero, so a fresh
LoRA layer computes exactly what its base layer computes. With DoRA the sum is
multiplied per output channel by ``magnitude / ||W0 + scaling * A @ B||``
(the column norm over every kernel axis but the last), with the magnitude
trainable and initialised to the base kernel's column norms.

The low-rank update is a separate branch of the forward pass, never written
into the kernel inside ``call``: gradients reach ``kernel_lora_a`` and
``kernel_lora_b``, and concurrent calls never see a half-updated kernel.
Merging folds the update into the kernel for inference; it is computed from a
pristine copy of the base kernel, so unmerging restores it bit for bit.

As in tfimm, a freshly constructed LoRA layer freezes nothing: all its
variables are trainable. Converting a model (``create_model``,
``convert_to_lora_model``) freezes the base, which sets ``lora_freeze_base``.

Merged and enabled state live in a small variable that checkpoints save
(``save_weights``, ``model.save``, ``tf.train.Checkpoint``) but that is not
one of the layer's Keras weights (parameter counts stay tfimm's): a merged or
disabled model saved and reloaded computes what it computed before.
"""

import contextlib
import math
import numbers

import numpy as np

from ._tf import require_tf_keras, tf
from .errors import LoRAConfigError, MergeStateError, UnsupportedLayerError

try:  # Keras 2 has no public way to tell a SavedModel export's traces from training.
    from tf_keras.src.saving.legacy.saved_model.utils import (
        in_tf_saved_model_scope as _saving_saved_model,
    )
except ImportError:  # pragma: no cover - other tf_keras layouts

    def _saving_saved_model() -> bool:
        return False


LORA_STATE_NAME = "lora_state"
"""The checkpoint name of a LoRA layer's ``[merged, enabled]`` state variable."""

LORA_WEIGHT_NAMES = ["kernel_lora_a", "kernel_lora_b", "lora_magnitude", LORA_STATE_NAME]
"""
Patterns that match the LoRA weights, so they can be left out of weight
transfers between a model and its LoRA variant (tfimm's ``transfer_weights``).
"""

LORA_INITIALIZERS = ("gaussian", "kaiming_uniform")
"""PEFT's names for ``A``'s initialisation, accepted besides Keras initializers."""


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's ``alpha / rank``, or rsLoRA's ``alpha / sqrt(rank)``, as a Python float.

    Adapter configs record this value and loaders compare it exactly, so every
    place computes it with this one function.
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def resolve_lora_initializer(spec, rank: int) -> tf.keras.initializers.Initializer:
    """The Keras initializer for ``A`` from a Keras spec or one of PEFT's names.

    Args:
        spec: A Keras initializer (object, name or config), ``"gaussian"``
            (normal with standard deviation ``1 / rank``, PEFT's ``"gaussian"``)
            or ``"kaiming_uniform"`` (PEFT's default for ``A``: uniform within
            ``1 / sqrt(fan_in)``).
        rank: The LoRA rank.

    Returns:
        The initializer.

    Raises:
        LoRAConfigError: If Keras does not know ``spec``.
    """
    if spec == "gaussian":
        return tf.keras.initializers.RandomNormal(stddev=1.0 / rank)
    if spec in ("kaiming_uniform", "kaiming"):
        # torch's kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + 5) * fan_in)).
        return tf.keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")
    try:
        initializer = tf.keras.initializers.get(spec)
        # A bad config fails here, not at build; a copy is called, since Keras
        # initializers remember their first call.
        if isinstance(initializer, tf.keras.initializers.Initializer):
            probe = initializer.__class__.from_config(initializer.get_config())
            probe(shape=(1, 1), dtype=tf.float32)
        return initializer
    except (ValueError, TypeError) as exc:
        raise LoRAConfigError(
            f"lora_initializer {spec!r:.80} is not a usable initializer ({exc!s:.80}): use a "
            f"Keras initializer or one of {list(LORA_INITIALIZERS)}."
        ) from exc


MAX_LORA_RANK = 1 << 16
"""The largest rank a layer (or an adapter file) may have."""


def validate_lora_args(lora_rank, lora_alpha, lora_dropout=0.0) -> None:
    """Checks LoRA hyper-parameters and raises a clear error for bad ones.

    Args:
        lora_rank: Rank of the update; an integer from 1 to :data:`MAX_LORA_RANK`.
        lora_alpha: Scale numerator; a positive number whose scaling is
            finite in float32.
        lora_dropout: Dropout rate on the LoRA branch input, in ``[0, 1)``.

    Raises:
        LoRAConfigError: If any argument is out of range or of the wrong type.
    """
    if (
        isinstance(lora_rank, bool)
        or not isinstance(lora_rank, numbers.Integral)
        or not 0 < lora_rank <= MAX_LORA_RANK
    ):
        raise LoRAConfigError(
            f"lora_rank must be a positive integer (at most {MAX_LORA_RANK}), got "
            f"{lora_rank!r:.40}. Typical values are 1 to 64."
        )
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise LoRAConfigError(f"lora_alpha must be a number, got {lora_alpha!r:.40}.")
    try:
        scaling = lora_scaling(float(lora_alpha), int(lora_rank))
    except OverflowError:
        scaling = math.inf
    if not lora_alpha > 0 or not scaling <= FLOAT32_MAX:
        raise LoRAConfigError(
            f"lora_alpha must be positive, and alpha / rank finite in float32, got "
            f"{lora_alpha!r:.40}; the update is scaled by lora_alpha / lora_rank."
        )
    if (
        isinstance(lora_dropout, bool)
        or not isinstance(lora_dropout, numbers.Real)
        or not 0.0 <= lora_dropout < 1.0
    ):
        raise LoRAConfigError(f"lora_dropout must be a rate in [0, 1), got {lora_dropout!r:.40}.")


FLOAT32_MAX = 3.4028234663852886e38


def _flag(value, name: str) -> bool:
    # bool("no") is True: a flag must be a real boolean.
    if not isinstance(value, (bool, np.bool_)):
        raise LoRAConfigError(f"{name} must be True or False, got {value!r:.40}.")
    return bool(value)


def matmul_last_axis(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """Contracts the last axis of ``x`` with the first axis of the matrix ``w``."""
    rank = x.shape.rank
    if rank == 2:
        return tf.matmul(x, w)
    y = tf.tensordot(x, w, [[rank - 1], [0]])
    # tensordot loses the static batch shape in graph mode; Keras wants it.
    y.set_shape(x.shape[:-1].concatenate(w.shape[-1:]))
    return y


def column_norm(kernel: tf.Tensor) -> tf.Tensor:
    """The norm of each output channel of a kernel: over every axis but the last."""
    axes = list(range(kernel.shape.rank - 1))
    return tf.sqrt(tf.reduce_sum(tf.square(kernel), axis=axes))


def kernel_fingerprint(kernel: tf.Variable) -> bytes:
    """The bits of a kernel's first output column: weights loaded over the
    kernel change them (a load replaces every value). Read through a numpy
    view of the variable's buffer, with no TensorFlow op of its own: a check
    beside every merge and unmerge must cost next to nothing."""
    return np.asarray(kernel.value())[..., :1].tobytes()


def dora_scale(magnitude: tf.Tensor, updated_kernel: tf.Tensor) -> tf.Tensor:
    """DoRA's per-output factor ``magnitude / ||W0 + scaling * A @ B||``.

    A column of norm zero has no direction to scale: its factor is 0 (the
    column computes 0 either way), never NaN.
    """
    return tf.math.divide_no_nan(magnitude, column_norm(updated_kernel))


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
        self.lora_use_dora = _flag(lora_use_dora, "lora_use_dora")
        self.lora_use_rslora = _flag(lora_use_rslora, "lora_use_rslora")
        self._lora_initializer_spec = (
            lora_initializer if lora_initializer in LORA_INITIALIZERS else None
        )
        self.lora_initializer = resolve_lora_initializer(lora_initializer, lora_rank)
        self.lora_regularizer = tf.keras.regularizers.get(lora_regularizer)
        # Set by model conversion: the base kernel (and bias, unless
        # lora_bias_trainable) stop being trainable weights.
        self.lora_freeze_base = _flag(lora_freeze_base, "lora_freeze_base")
        self.lora_bias_trainable = _flag(lora_bias_trainable, "lora_bias_trainable")
        self._lora_enabled = _flag(lora_enabled, "lora_enabled")
        self.kernel_lora_a = None
        self.kernel_lora_b = None
        self.lora_magnitude = None
        self._lora_state = None
        # The one serving hook: a callable ``hook(layer, x)`` that returns the
        # pre-activation output (bias included) or None for the plain forward.
        # Set by a serving pool on its own layers; this module never imports it.
        self.lora_hook = None
        self._pristine_kernel = None
        self._pristine_bias = None
        self._merged_bits = None  # kernel_fingerprint right after merging
        # Merged in a saved model that was reloaded: no pristine copy exists.
        self._merged_without_copy = False

    @property
    def scaling(self) -> float:
        """The factor ``lora_alpha / lora_rank`` (rsLoRA: over ``sqrt(rank)``)."""
        return lora_scaling(self.lora_alpha, self.lora_rank, self.lora_use_rslora)

    @property
    def lora_enabled(self) -> bool:
        """Whether the LoRA update is applied (kept in the layer's saved state)."""
        self._sync_lora_state()
        return self._lora_enabled

    @lora_enabled.setter
    def lora_enabled(self, value: bool) -> None:
        self._lora_enabled = bool(value)
        self._write_lora_state()

    @property
    def merged(self) -> bool:
        """Whether the LoRA update is currently folded into the kernel."""
        self._sync_lora_state()
        return self._merged_now()

    def _merged_now(self) -> bool:
        return self._pristine_kernel is not None or self._merged_without_copy

    def _build_lora(self, a_shape, out_dim):
        self.kernel_lora_a = self.add_weight(
            "kernel_lora_a",
            shape=a_shape,
            initializer=self.lora_initializer,
            regularizer=self.lora_regularizer,
            dtype=self.dtype,
            trainable=True,
        )
        self.kernel_lora_b = self.add_weight(
            "kernel_lora_b",
            shape=(self.lora_rank, out_dim),
            initializer=tf.keras.initializers.Zeros(),
            regularizer=self.lora_regularizer,
            dtype=self.dtype,
            trainable=True,
        )
        if self.lora_use_dora:
            self.lora_magnitude = self.add_weight(
                "lora_magnitude",
                shape=(out_dim,),
                initializer=lambda shape, dtype=None: column_norm(self.kernel),
                dtype=self.dtype,
                trainable=True,
            )
        # Tracked for checkpoints only: not a Keras weight, so parameter counts
        # and weight lists stay those of plain LoRA (and of tfimm).
        with tf.init_scope():
            state = tf.Variable(
                [int(self.merged), int(self._lora_enabled)],
                dtype=tf.int32,
                trainable=False,
                name=LORA_STATE_NAME,
            )
        object.__setattr__(self, "_lora_state", state)  # past Keras' weight tracking
        self._track_trackable(state, name=LORA_STATE_NAME)

    def base_kernel(self) -> tf.Tensor:
        """The base kernel ``W0``, also while the update is merged into the kernel.

        Raises:
            MergeStateError: If the layer was merged when its model was saved,
                or merged weights were loaded over it (the base kernel is not
                known then).
        """
        self._check_pristine()
        if self._pristine_kernel is not None:
            return tf.convert_to_tensor(self._pristine_kernel)
        if self._merged_without_copy:
            raise MergeStateError(
                f"Layer '{self.name}' holds a merged kernel whose base is not known: it was "
                "merged when its model was saved, or merged weights were loaded over it."
            )
        return tf.convert_to_tensor(self.kernel)

    def reset_lora_magnitude(self) -> None:
        """Sets a DoRA magnitude to the kernel's column norms, so the layer
        computes its base again (call after the base kernel was replaced)."""
        if self.lora_magnitude is not None:
            self.lora_magnitude.assign(column_norm(self.kernel))

    def _write_lora_state(self) -> None:
        if self._lora_state is not None:
            self._lora_state.assign([int(self._merged_now()), int(self._lora_enabled)])

    def _sync_lora_state(self) -> None:
        """Takes the merged/enabled state from the state variable, which a
        checkpoint restore may have changed behind the layer's back.

        Raises:
            MergeStateError: If the variable holds anything but two 0/1 flags
                (a checkpoint lora_ckpt did not write).
        """
        if self._lora_state is None:
            return
        with tf.init_scope():
            if not tf.executing_eagerly():
                return  # a TF1-style graph: nothing restored behind our back to read
            values = self._lora_state.numpy()
        if values.shape != (2,) or not set(values.tolist()) <= {0, 1}:
            raise MergeStateError(
                f"The saved LoRA state of layer '{self.name}' is {values.tolist()!r:.60}, not "
                "two 0/1 flags (merged, enabled); the checkpoint was not written by lora_ckpt."
            )
        merged, enabled = (bool(v) for v in values)
        self._lora_enabled = enabled
        if merged and not self._merged_now():
            self._merged_without_copy = True
        elif not merged and self._merged_now():
            # Unmerged weights were restored over a merged layer.
            self._pristine_kernel = self._pristine_bias = None
            self._merged_without_copy = False

    def _check_pristine(self) -> None:
        """Forgets the pristine copy if the kernel changed since merging
        (weights of another merged model loaded over this one): it is no longer
        the base of what the layer holds, and restoring it would corrupt."""
        if self._pristine_kernel is None:
            return
        with tf.init_scope():
            if not tf.executing_eagerly():
                return
            if self._merged_bits != kernel_fingerprint(self.kernel):
                self._pristine_kernel = self._pristine_bias = None
                self._merged_without_copy = True

    def lora_branch_active(self) -> bool:
        """Whether ``call`` adds the low-rank branch (enabled and not merged)."""
        return self.lora_enabled and not self.merged

    def lora_delta(self) -> tf.Tensor:
        """The update ``scaling * A @ B``, in the shape of the kernel."""
        delta = matmul_last_axis(self.kernel_lora_a, self.kernel_lora_b)
        return tf.cast(self.scaling, delta.dtype) * delta

    def dora_output_scale(self, kernel=None) -> tf.Tensor:
        """DoRA's per-output factor ``magnitude / ||W0 + scaling * A @ B||``.

        Args:
            kernel: The base kernel ``W0``; the layer's own by default.
        """
        kernel = self.kernel if kernel is None else kernel
        updated = tf.convert_to_tensor(kernel) + tf.cast(self.lora_delta(), kernel.dtype)
        return dora_scale(tf.convert_to_tensor(self.lora_magnitude), updated)

    def merged_kernel(self) -> tf.Tensor:
        """The kernel with the update folded in: what merging assigns.

        ``W0 + scaling * A @ B``; with DoRA, that times :meth:`dora_output_scale`.
        """
        base = self.base_kernel()
        updated = base + tf.cast(self.lora_delta(), base.dtype)
        if self.lora_use_dora:
            updated = updated * dora_scale(tf.convert_to_tensor(self.lora_magnitude), updated)
        return updated

    def _dropout_lora_input(self, x, training):
        if training and self.lora_dropout > 0.0:
            return tf.nn.dropout(x, rate=self.lora_dropout)
        return x

    def merge_weights(self) -> None:
        """Folds the LoRA update into the kernel (:meth:`merged_kernel`).

        While merged, ``call`` uses the kernel alone, so inference costs what
        the base layer costs. A merged layer cannot be trained.

        Raises:
            MergeStateError: If the layer is already merged.
        """
        self._require_unmerged()
        self._merge_kernel(self.merged_kernel())

    def merge_update(self, delta: tf.Tensor, bias=None, output_scale=None) -> None:
        """Assigns ``kernel = (W0 + delta) * output_scale`` and ``bias`` from kept copies.

        Args:
            delta: An update in the shape of the kernel.
            bias: A bias to use while merged, or ``None`` to keep the base bias.
            output_scale: A per-output factor (DoRA), or ``None``.

        Raises:
            MergeStateError: If the layer is already merged.
        """
        self._require_unmerged()
        kernel = tf.convert_to_tensor(self.kernel) + tf.cast(delta, self.kernel.dtype)
        if output_scale is not None:
            kernel = kernel * tf.cast(output_scale, kernel.dtype)
        self._merge_kernel(kernel, bias)

    def _require_unmerged(self) -> None:
        if self.merged:
            raise MergeStateError(
                f"Layer '{self.name}' is already merged; call unmerge_weights() "
                "before merging again."
            )

    def _merge_kernel(self, kernel, bias=None) -> None:
        pristine = tf.identity(self.kernel)
        self.kernel.assign(kernel)
        if bias is not None:
            self._pristine_bias = tf.identity(self.bias)
            self.bias.assign(bias)
        self._pristine_kernel = pristine
        self._merged_bits = kernel_fingerprint(self.kernel)
        self._write_lora_state()

    def unmerge_weights(self) -> None:
        """Restores the base kernel exactly as it was before :meth:`merge_weights`.

        Raises:
            MergeStateError: If the layer is not merged, or was merged when
                its model was saved (the base kernel is not in that save).
        """
        if not self.merged:
            raise MergeStateError(
                f"Layer '{self.name}' is not merged; there is nothing to unmerge."
            )
        self._check_pristine()
        if self._pristine_kernel is None:
            raise MergeStateError(
                f"Layer '{self.name}' holds a merged kernel whose base is not known: it was "
                "merged when its model was saved (the save holds only the merged kernel), or "
                "merged weights were loaded over it. It cannot be unmerged. Load the model "
                "saved before merging (or load an adapter into its base) to train or swap "
                "adapters."
            )
        self.kernel.assign(self._pristine_kernel)
        if self._pristine_bias is not None:
            self.bias.assign(self._pristine_bias)
        self._pristine_kernel = None
        self._pristine_bias = None
        self._write_lora_state()

    def lora_trainable_weights(self, train_bias: bool) -> list[tf.Variable]:
        """The weights LoRA training updates in this layer.

        Args:
            train_bias: Whether to include the layer's bias.

        Returns:
            ``[kernel_lora_a, kernel_lora_b]`` (and DoRA's ``lora_magnitude``),
            plus the bias if asked for and the layer has one.
        """
        weights = [self.kernel_lora_a, self.kernel_lora_b]
        if self.lora_magnitude is not None:
            weights.append(self.lora_magnitude)
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
        if self._lora_state is not None and (self.merged or not self.lora_enabled):
            weights.append(self._lora_state)
        return weights

    def save_own_variables(self, store):
        """Keras' ``.keras`` format: the layer's variables, then its LoRA state."""
        super().save_own_variables(store)
        if self._lora_state is not None:
            store[LORA_STATE_NAME] = self._lora_state.numpy()

    def load_own_variables(self, store):
        """Keras' ``.keras`` format: restores the variables and the LoRA state."""
        stored = list(store.keys())  # an H5 entry: keys() is its only listing
        super().load_own_variables({k: store[k] for k in stored if k != LORA_STATE_NAME})
        if self._lora_state is not None and LORA_STATE_NAME in stored:
            self._lora_state.assign(store[LORA_STATE_NAME])
            self._sync_lora_state()

    def base_op(self, x, kernel):
        """The base layer's linear map (matmul or convolution) with ``kernel``."""
        raise NotImplementedError

    def adopt_base_layer(self, layer) -> None:
        """Takes over what the base layer's config does not carry (none here)."""

    def call(self, inputs, training=None):
        self._sync_lora_state()
        if training and self._merged_now() and self.trainable and not _saving_saved_model():
            raise MergeStateError(
                f"LoRA layer '{self.name}' is merged and cannot be trained (its update is "
                "folded into the frozen kernel); call unmerge_lora_weights(model) first."
            )
        x = tf.cast(inputs, self.compute_dtype)
        outputs = self.lora_hook(self, x) if self.lora_hook is not None else None
        if outputs is None:
            outputs = self.base_op(x, self.kernel)
            if self._lora_enabled and not self._merged_now():  # synced above
                z = self.base_op(self._dropout_lora_input(x, training), self.kernel_lora_a)
                outputs += matmul_last_axis(z, self.scaling * self.kernel_lora_b)
                if self.lora_use_dora:
                    outputs *= tf.cast(self.dora_output_scale(), outputs.dtype)
            if self.use_bias:
                outputs = tf.nn.bias_add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

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


LORA_LAYER_ARGS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_initializer",
    "lora_regularizer",
    "lora_use_dora",
    "lora_use_rslora",
    "lora_freeze_base",
    "lora_bias_trainable",
    "lora_enabled",
)
"""Keyword arguments a LoRA layer takes besides those of its base layer."""


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


class LoRAConv2D(LoRALayerMixin, tf.keras.layers.Conv2D):
    """LoRA version of ``tf.keras.layers.Conv2D`` (channels_last, groups=1).

    ``A`` is a convolution ``[kh, kw, in, R]`` with the layer's own kernel
    size, strides, padding and dilation; ``B[R, filters]`` mixes its ``R``
    output channels. By linearity this equals a convolution with the kernel
    ``A @ B``, which is what merging folds in.

    Args:
        filters, kernel_size, *args: As for ``Conv2D``, in Keras' order.
        **kwargs: The LoRA arguments of :class:`LoRADense`, and every other
            ``Conv2D`` argument.

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


_OBJECT_ARGUMENTS = (
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)

_LORA_LAYER_CLASSES = {
    tf.keras.layers.Dense: LoRADense,
    tf.keras.layers.Conv2D: LoRAConv2D,
}


def register_lora_layer(base_cls: type, lora_cls: type) -> None:
    """Makes :func:`convert_to_lora_layer` turn layers of exactly ``base_cls`` into ``lora_cls``.

    Args:
        base_cls: A Keras layer class (for example tfimm's ``PadConv2D``).
        lora_cls: Its LoRA class: a subclass of it with :class:`LoRALayerMixin`.
    """
    _LORA_LAYER_CLASSES[base_cls] = lora_cls


def has_lora_counterpart(layer) -> bool:
    """Whether :func:`convert_to_lora_layer` converts ``layer`` (its exact type, groups=1)."""
    return type(layer) in _LORA_LAYER_CLASSES and getattr(layer, "groups", 1) == 1


def supported_layer_types() -> list[str]:
    """Names of the Keras layer classes that :func:`convert_to_lora_layer` takes."""
    return [cls.__name__ for cls in _LORA_LAYER_CLASSES]


def convert_to_lora_layer(layer: tf.keras.layers.Layer, **kwargs) -> tf.keras.layers.Layer:
    """Creates the LoRA counterpart of a ``Dense`` or ``Conv2D`` layer.

    The new layer has the same config (and name). If ``layer`` is built, the
    new layer is built too and takes over its kernel and bias.

    Args:
        layer: The layer to convert; its exact type must be supported
            (subclasses such as ``DepthwiseConv2D`` have other semantics).
        **kwargs: LoRA arguments (:data:`LORA_LAYER_ARGS`): ``lora_rank``,
            ``lora_alpha``, ``lora_use_dora``, ``lora_freeze_base``, ...

    Returns:
        The LoRA layer.

    Raises:
        UnsupportedLayerError: If the layer type has no LoRA counterpart.
        LoRAConfigError: For invalid LoRA arguments.
    """
    require_tf_keras(layer, "convert_to_lora_layer")
    lora_cls = _LORA_LAYER_CLASSES.get(type(layer))
    if lora_cls is None:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' of type {type(layer).__name__} has no LoRA "
            f"counterpart; supported types are {supported_layer_types()}."
        )
    unknown = sorted(set(kwargs) - set(LORA_LAYER_ARGS))
    if unknown:
        raise LoRAConfigError(
            f"convert_to_lora_layer takes only lora_* arguments {list(LORA_LAYER_ARGS)}, "
            f"got {unknown}."
        )
    config = layer.get_config()
    # The objects themselves: a custom initializer (tfimm's FanoutInitializer)
    # need not be known to Keras' deserialisation.
    for name in _OBJECT_ARGUMENTS:
        if name in config and hasattr(layer, name):
            config[name] = getattr(layer, name)
    lora_layer = lora_cls(**config, **kwargs)
    lora_layer.adopt_base_layer(layer)
    if layer.built:
        kernel_in = layer.kernel.shape[-2]
        input_shape = (None, kernel_in) if lora_cls is LoRADense else (None, None, None, kernel_in)
        # Built in the base kernel's name scope, its variables are named as the
        # base layer's were (weight files and tfimm's transfer_weights key by it).
        scope, _, _ = layer.kernel.name.rpartition("/")
        with tf.name_scope(scope + "/") if scope else contextlib.nullcontext():
            lora_layer.build(input_shape)
        lora_layer.kernel.assign(layer.kernel)
        if layer.use_bias:
            lora_layer.bias.assign(layer.bias)
        lora_layer.reset_lora_magnitude()
    return lora_layer


def is_lora_layer(layer) -> bool:
    """Whether ``layer`` is a LoRA layer (has ``kernel_lora_a``/``_b``)."""
    return bool(getattr(layer, "is_lora_layer", False))


__all__ = [
    "LORA_INITIALIZERS",
    "LORA_LAYER_ARGS",
    "LORA_STATE_NAME",
    "LORA_WEIGHT_NAMES",
    "MAX_LORA_RANK",
    "LoRAConv2D",
    "LoRADense",
    "LoRALayerMixin",
    "column_norm",
    "dora_scale",
    "convert_to_lora_layer",
    "has_lora_counterpart",
    "is_lora_layer",
    "lora_scaling",
    "register_lora_layer",
    "resolve_lora_initializer",
    "supported_layer_types",
    "validate_lora_args",
]
