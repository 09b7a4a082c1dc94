"""Tensor helpers the LoRA layers and their serving paths share."""

import numpy as np

from .._tf import tf

__all__ = ["column_norm", "dora_scale", "kernel_fingerprint", "matmul_last_axis"]


def matmul_last_axis(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """Contracts the last axis of ``x`` with the first axis of the matrix ``w``.

    Args:
        x: A tensor ``[..., n]`` (a kernel ``[kh, kw, in, R]`` too).
        w: A matrix ``[n, m]``.

    Returns:
        ``[..., m]``, with ``x``'s static leading shape.
    """
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


def dora_scale(magnitude: tf.Tensor, updated_kernel: tf.Tensor) -> tf.Tensor:
    """DoRA's per-output factor ``magnitude / ||W0 + scaling * A @ B||``.

    A column of norm zero has no direction to scale: its factor is 0 (the
    column computes 0 either way), never NaN.

    Args:
        magnitude: ``[out]``.
        updated_kernel: ``W0 + scaling * A @ B``, ``[..., out]``.

    Returns:
        ``[out]``.
    """
    return tf.math.divide_no_nan(magnitude, column_norm(updated_kernel))


def kernel_fingerprint(kernel: tf.Variable) -> bytes:
    """The bits of a kernel's first output column.

    Weights loaded over the kernel change them (a load replaces every value).
    Read through a numpy view of the variable's buffer, with no TensorFlow op
    of its own: a check beside every merge and unmerge must cost next to nothing.

    Args:
        kernel: A kernel variable (read eagerly).

    Returns:
        The raw bytes of ``kernel[..., :1]``.
    """
    return np.asarray(kernel.value())[..., :1].tobytes()
