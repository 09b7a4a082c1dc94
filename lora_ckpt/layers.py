"""LoRA layers: drop-in subclasses of Keras' ``Dense`` and ``Conv2D``.

Each layer computes ``base(x) + scaling * B(A(dropout(x)))`` before bias and
activation, with ``scaling = lora_alpha / lora_rank`` and ``B`` initialised to
zero, so a fresh LoRA layer computes exactly what its base layer computes.

The low-rank update is a separate branch of the forward pass, never written
into the kernel inside ``call``: gradients reach ``kernel_lora_a`` and
``kernel_lora_b``, and concurrent calls never see a half-updated kernel.
Merging folds ``scaling * A @ B`` into the kernel for inference; it is computed
from a pristine copy of the base kernel, so unmerging restores it bit for bit.
"""

from ._tf import tf
from .errors import LoRAConfigError, MergeStateError, UnsupportedLayerError

LORA_WEIGHT_NAMES = ["kernel_lora_a", "kernel_lora_b"]
"""
Patterns that match the LoRA weights, so they can be left out of weight
transfers between a model and its LoRA variant (tfimm's ``transfer_weights``).
"""


def validate_lora_args(lora_rank, lora_alpha, lora_dropout=0.0) -> None:
    """Checks LoRA hyper-parameters and raises a clear error for bad ones.

    Args:
        lora_rank: Rank of the update; a positive integer.
        lora_alpha: Scale numerator; a positive number.
        lora_dropout: Dropout rate on the LoRA branch input, in ``[0, 1)``.

    Raises:
        LoRAConfigError: If any argument is out of range or of the wrong type.
    """
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
        raise LoRAConfigError(
            f"lora_rank must be a positive integer, got {lora_rank!r}. Typical values are 1 to 64."
        )
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise LoRAConfigError(f"lora_alpha must be a number, got {lora_alpha!r}.")
    if lora_alpha <= 0:
        raise LoRAConfigError(
            f"lora_alpha must be positive, got {lora_alpha!r}; the update is scaled "
            "by lora_alpha / lora_rank."
        )
    if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise LoRAConfigError(f"lora_dropout must be a rate in [0, 1), got {lora_dropout!r}.")


def matmul_last_axis(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """Contracts the last axis of ``x`` with the first axis of the matrix ``w``."""
    rank = x.shape.rank
    if rank == 2:
        return tf.matmul(x, w)
    y = tf.tensordot(x, w, [[rank - 1], [0]])
    # tensordot loses the static batch shape in graph mode; Keras wants it.
    y.set_shape(x.shape[:-1].concatenate(w.shape[-1:]))
    return y


class LoRALayerMixin:
    """What every LoRA layer shares: weights, scaling, merge state, config.

    A subclass calls :meth:`_init_lora` in ``__init__`` and
    :meth:`_build_lora` in ``build`` and implements :meth:`base_op`; the
    forward pass ``base_op(x, W) + scaling * base_op(x, A) @ B`` is here.
    """

    is_lora_layer: bool = True

    def _init_lora(self, lora_rank, lora_alpha, lora_dropout, lora_initializer, lora_regularizer):
        validate_lora_args(lora_rank, lora_alpha, lora_dropout)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_initializer = tf.keras.initializers.get(lora_initializer)
        self.lora_regularizer = tf.keras.regularizers.get(lora_regularizer)
        self.lora_enabled = True
        # Whether Keras sees the bias as trainable (next to A and B).
        self.lora_bias_trainable = False
        self.kernel_lora_a = None
        self.kernel_lora_b = None
        # The one serving hook: a callable ``hook(layer, x)`` that returns the
        # pre-activation output (bias included) or None for the plain forward.
        # Set by a serving pool on its own layers; this module never imports it.
        self.lora_hook = None
        self._pristine_kernel = None
        self._pristine_bias = None

    @property
    def scaling(self) -> float:
        """The factor ``lora_alpha / lora_rank`` applied to ``B(A(x))``."""
        return self.lora_alpha / self.lora_rank

    @property
    def merged(self) -> bool:
        """Whether the LoRA update is currently folded into the kernel."""
        return self._pristine_kernel is not None

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

    def lora_branch_active(self) -> bool:
        """Whether ``call`` adds the low-rank branch (enabled and not merged)."""
        return self.lora_enabled and not self.merged

    def lora_delta(self) -> tf.Tensor:
        """The update ``scaling * A @ B``, in the shape of the kernel."""
        delta = matmul_last_axis(self.kernel_lora_a, self.kernel_lora_b)
        return tf.cast(self.scaling, delta.dtype) * delta

    def _dropout_lora_input(self, x, training):
        if training and self.lora_dropout > 0.0:
            return tf.nn.dropout(x, rate=self.lora_dropout)
        return x

    def merge_weights(self) -> None:
        """Folds the LoRA update into the kernel: ``W = W0 + scaling * A @ B``.

        While merged, ``call`` uses the kernel alone, so inference costs what
        the base layer costs. The LoRA weights are not trained while merged.

        Raises:
            MergeStateError: If the layer is already merged.
        """
        self.merge_update(self.lora_delta())

    def merge_update(self, delta: tf.Tensor, bias=None) -> None:
        """Assigns ``kernel = W0 + delta`` (and ``bias``, if given) from kept copies.

        Args:
            delta: An update in the shape of the kernel.
            bias: A bias to use while merged, or ``None`` to keep the base bias.

        Raises:
            MergeStateError: If the layer is already merged.
        """
        if self.merged:
            raise MergeStateError(
                f"Layer '{self.name}' is already merged; call unmerge_weights() "
                "before merging again."
            )
        pristine = tf.identity(self.kernel)
        self.kernel.assign(pristine + tf.cast(delta, pristine.dtype))
        if bias is not None:
            self._pristine_bias = tf.identity(self.bias)
            self.bias.assign(bias)
        self._pristine_kernel = pristine

    def unmerge_weights(self) -> None:
        """Restores the base kernel exactly as it was before :meth:`merge_weights`.

        Raises:
            MergeStateError: If the layer is not merged.
        """
        if not self.merged:
            raise MergeStateError(
                f"Layer '{self.name}' is not merged; there is nothing to unmerge."
            )
        self.kernel.assign(self._pristine_kernel)
        if self._pristine_bias is not None:
            self.bias.assign(self._pristine_bias)
        self._pristine_kernel = None
        self._pristine_bias = None

    def lora_trainable_weights(self, train_bias: bool) -> list[tf.Variable]:
        """The weights LoRA training updates in this layer.

        Args:
            train_bias: Whether to include the layer's bias.

        Returns:
            ``[kernel_lora_a, kernel_lora_b]``, plus the bias if asked for and
            the layer has one.
        """
        weights = [self.kernel_lora_a, self.kernel_lora_b]
        if train_bias and self.use_bias:
            weights.append(self.bias)
        return weights

    # Keras decides trainability per layer, LoRA per variable: the kernel of a
    # LoRA layer is frozen, A and B train. Overriding these properties makes
    # Keras' own `fit`, `summary` and optimizers see exactly that, in any
    # model (subclassed, functional, Sequential).
    @property
    def trainable_weights(self):
        if not self.trainable or self.kernel_lora_a is None:
            return super().trainable_weights
        return self.lora_trainable_weights(self.lora_bias_trainable)

    @property
    def non_trainable_weights(self):
        trainable = {id(v) for v in self.trainable_weights}
        return [v for v in self.weights if id(v) not in trainable]

    @property
    def weights(self):
        # Keras' order (kernel, bias, A, B), whatever is trainable.
        return super().trainable_weights + super().non_trainable_weights

    def base_op(self, x, kernel):
        """The base layer's linear map (matmul or convolution) with ``kernel``."""
        raise NotImplementedError

    def call(self, inputs, training=None):
        x = tf.cast(inputs, self.compute_dtype)
        outputs = self.lora_hook(self, x) if self.lora_hook is not None else None
        if outputs is None:
            outputs = self.base_op(x, self.kernel)
            if self.lora_branch_active():
                z = self.base_op(self._dropout_lora_input(x, training), self.kernel_lora_a)
                outputs += matmul_last_axis(z, self.scaling * self.kernel_lora_b)
            if self.use_bias:
                outputs = tf.nn.bias_add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "lora_initializer": tf.keras.initializers.serialize(self.lora_initializer),
                "lora_regularizer": tf.keras.regularizers.serialize(self.lora_regularizer),
            }
        )
        return config


class LoRADense(LoRALayerMixin, tf.keras.layers.Dense):
    """LoRA version of ``tf.keras.layers.Dense``.

    Args:
        units: As for ``Dense``.
        lora_rank: Rank ``R`` of the update ``A[in, R] @ B[R, units]``.
        lora_alpha: The update is scaled by ``lora_alpha / lora_rank``.
        lora_dropout: Dropout rate applied to the input of the LoRA branch
            during training.
        lora_initializer: Initializer of ``A`` (``B`` starts at zero).
        lora_regularizer: Regularizer of ``A`` and ``B``.
        **kwargs: Every other ``Dense`` argument.

    Raises:
        LoRAConfigError: For an invalid rank, alpha or dropout.
    """

    base_layer_class = tf.keras.layers.Dense

    def __init__(
        self,
        units,
        lora_rank: int = 4,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        lora_initializer="glorot_uniform",
        lora_regularizer=None,
        **kwargs,
    ):
        super().__init__(units=units, **kwargs)
        self._init_lora(lora_rank, lora_alpha, lora_dropout, lora_initializer, lora_regularizer)

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
        filters, kernel_size: As for ``Conv2D``.
        lora_rank, lora_alpha, lora_dropout, lora_initializer,
        lora_regularizer: As for :class:`LoRADense`.
        **kwargs: Every other ``Conv2D`` argument.

    Raises:
        LoRAConfigError: For an invalid rank, alpha or dropout.
        UnsupportedLayerError: For grouped convolutions or channels_first.
    """

    base_layer_class = tf.keras.layers.Conv2D

    def __init__(
        self,
        filters,
        kernel_size,
        lora_rank: int = 4,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        lora_initializer="glorot_uniform",
        lora_regularizer=None,
        **kwargs,
    ):
        super().__init__(filters=filters, kernel_size=kernel_size, **kwargs)
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
        self._init_lora(lora_rank, lora_alpha, lora_dropout, lora_initializer, lora_regularizer)

    def build(self, input_shape):
        super().build(input_shape)
        kh, kw, in_channels, _ = self.kernel.shape
        self._build_lora((kh, kw, in_channels, self.lora_rank), self.filters)

    def base_op(self, x, kernel):
        """The layer's convolution with its strides, padding and dilation."""
        return self.convolution_op(x, kernel)


_LORA_LAYER_CLASSES = {
    tf.keras.layers.Dense: LoRADense,
    tf.keras.layers.Conv2D: LoRAConv2D,
}


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
        **kwargs: LoRA arguments: ``lora_rank``, ``lora_alpha``,
            ``lora_dropout``, ``lora_initializer``, ``lora_regularizer``.

    Returns:
        The LoRA layer.

    Raises:
        UnsupportedLayerError: If the layer type has no LoRA counterpart.
        LoRAConfigError: For invalid LoRA arguments.
    """
    lora_cls = _LORA_LAYER_CLASSES.get(type(layer))
    if lora_cls is None:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' of type {type(layer).__name__} has no LoRA "
            f"counterpart; supported types are {supported_layer_types()}."
        )
    unknown = sorted(k for k in kwargs if not k.startswith("lora_"))
    if unknown:
        raise LoRAConfigError(f"convert_to_lora_layer takes only lora_* arguments, got {unknown}.")
    lora_layer = lora_cls(**layer.get_config(), **kwargs)
    if layer.built:
        kernel_in = layer.kernel.shape[-2]
        input_shape = (None, kernel_in) if lora_cls is LoRADense else (None, None, None, kernel_in)
        lora_layer.build(input_shape)
        lora_layer.kernel.assign(layer.kernel)
        if layer.use_bias:
            lora_layer.bias.assign(layer.bias)
    return lora_layer


def is_lora_layer(layer) -> bool:
    """Whether ``layer`` is a LoRA layer (has ``kernel_lora_a``/``_b``)."""
    return bool(getattr(layer, "is_lora_layer", False))


__all__ = [
    "LORA_WEIGHT_NAMES",
    "LoRAConv2D",
    "LoRADense",
    "LoRALayerMixin",
    "convert_to_lora_layer",
    "is_lora_layer",
    "supported_layer_types",
    "validate_lora_args",
]
