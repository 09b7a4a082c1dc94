"""Independent numpy implementations that the LoRA layers are checked against."""

import math

import numpy as np


def dense(x, kernel, bias=None):
    y = np.tensordot(x, kernel, axes=[[x.ndim - 1], [0]])
    return y if bias is None else y + bias


def _same_padding(size, kernel, stride, dilation):
    effective = (kernel - 1) * dilation + 1
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def conv2d(x, kernel, strides=(1, 1), padding="valid", dilation=(1, 1), bias=None):
    """NHWC convolution by explicit patch extraction (cross-correlation, as TF)."""
    kh, kw, _, out_channels = kernel.shape
    if padding == "same":
        ph = _same_padding(x.shape[1], kh, strides[0], dilation[0])
        pw = _same_padding(x.shape[2], kw, strides[1], dilation[1])
        x = np.pad(x, [(0, 0), ph, pw, (0, 0)])
    n, h, w, _ = x.shape
    out_h = (h - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (w - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    y = np.zeros((n, out_h, out_w, out_channels), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            rows = slice(
                i * dilation[0], i * dilation[0] + (out_h - 1) * strides[0] + 1, strides[0]
            )
            cols = slice(
                j * dilation[1], j * dilation[1] + (out_w - 1) * strides[1] + 1, strides[1]
            )
            y += np.tensordot(
                x[:, rows, cols, :].astype(np.float64), kernel[i, j].astype(np.float64), axes=1
            )
    return y if bias is None else y + bias


def lora_dense(x, kernel, a, b, scaling, bias=None):
    return dense(x, kernel, bias) + scaling * dense(dense(x, a), b)


def lora_conv2d(x, kernel, a, b, scaling, bias=None, **conv_args):
    return conv2d(x, kernel, bias=bias, **conv_args) + scaling * dense(conv2d(x, a, **conv_args), b)
