"""The arithmetic of :func:`lora_ckpt.state.combine_adapters`: pure numpy.

Kept apart from the checks and the file handling so it can be read, tested
and reasoned about on its own: nothing here imports TensorFlow or touches
storage. Everything is computed in float64 and cast to the adapter's dtype
only at the end, refusing values the cast would turn infinite.

Adapter ``i`` changes the kernel of each of its LoRA layers by
``delta_i = s_i * A_i @ B_i`` (``s_i`` its recorded scaling; a Conv2D ``A_i``
is viewed as ``[kh * kw * in, r]``). :class:`LayerTerms` holds, for one layer,
every input's ``(w_i, s_i, A_i, B_i)``; the ``*_factors`` functions turn them
into one pair ``(A, B)`` whose scaling is 1. Biases and extra layers are
whole values, not updates: :class:`FullValue` combines them.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import LoRAConfigError

__all__ = [
    "FullValue",
    "LayerTerms",
    "METHODS",
    "Term",
    "cat_factors",
    "combine_layer",
    "linear_factors",
    "relative_error",
    "svd_factors",
]


METHODS = ("cat", "linear", "svd")
"""The ways :func:`lora_ckpt.state.combine_adapters` combines adapters."""


@dataclass
class Term:
    """One input adapter's factors of one layer, as float64 matrices.

    Attributes:
        weight: The input's weight ``w_i``.
        scaling: Its recorded scaling ``s_i`` (rsLoRA's ``alpha / sqrt(r)`` included).
        a: ``[prod(kernel dims but the last), rank]``.
        b: ``[rank, out]``.
        source: The input's path, for messages.
    """

    weight: float
    scaling: float
    a: np.ndarray
    b: np.ndarray
    source: str

    @property
    def rank(self) -> int:
        """The input's rank at this layer."""
        return self.b.shape[0]


@dataclass
class LayerTerms:
    """What the inputs hold for one LoRA layer path.

    Attributes:
        type: The LoRA layer class name (``"LoRADense"``, ``"LoRAConv2D"``).
        kernel_shape: A's shape without the rank axis.
        out: B's output width.
        terms: One :class:`Term` per input that holds the layer.
    """

    type: str
    kernel_shape: tuple[int, ...]
    out: int
    terms: list[Term] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """The rows of the update viewed as a matrix: ``prod(kernel_shape)``."""
        return math.prod(self.kernel_shape)


def combine_layer(
    layer: LayerTerms, method: str, rank: int | None, dtype: np.dtype, path: str
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The combined factors of one layer, in the adapter's dtype and shapes.

    Args:
        layer: The inputs' terms of the layer.
        method: One of :data:`METHODS`.
        rank: The rank to truncate to (``"svd"`` only).
        dtype: The dtype to write the factors in.
        path: The layer's path, for messages.

    Returns:
        ``(A, B, error)``: ``A`` in the kernel's shape with the rank last,
        ``B`` as ``[rank, out]``, and for ``"svd"`` the relative error of the
        factors as written (:func:`relative_error`), else ``None``.

    Raises:
        LoRAConfigError: If the factors overflow ``dtype`` (or float64).
    """
    # Overflow shows as inf/nan in the result and is refused by _cast_finite with
    # a message; numpy's warnings on the way there would only be noise.
    with np.errstate(over="ignore", invalid="ignore"):
        if method == "cat":
            a, b = cat_factors(layer)
        elif method == "linear":
            a, b = linear_factors(layer)
        elif method == "svd":
            a, b = svd_factors(layer, rank, path)
        else:
            raise LoRAConfigError(
                f"Unknown combination method {method!r}; choose one of {METHODS}."
            )
        a = _cast_finite(a.reshape(*layer.kernel_shape, a.shape[1]), dtype, f"layer {path}")
        b = _cast_finite(b, dtype, f"layer {path}")
        error = None
        if method == "svd":
            error = relative_error(layer, a.reshape(-1, a.shape[-1]), b, path)
    return a, b, error


def cat_factors(layer: LayerTerms) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ranks: ``A = [A_1 .. A_n]``, ``B = [w_1 s_1 B_1; ..]``, exactly
    the weighted sum of the updates.

    Args:
        layer: The inputs' terms.

    Returns:
        ``(A [rows, sum r_i], B [sum r_i, out])`` in float64.
    """
    a = np.concatenate([t.a for t in layer.terms], axis=1)
    b = np.concatenate([t.weight * t.scaling * t.b for t in layer.terms], axis=0)
    return a, b


def linear_factors(layer: LayerTerms) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's linear combination: ``A = sum c_i A_i``, ``B = sum sign(w_i) c_i B_i``
    with ``c_i = sqrt(|w_i| s_i)`` (equal ranks; its product holds cross terms).

    Args:
        layer: The inputs' terms, all of one rank.

    Returns:
        ``(A [rows, r], B [r, out])`` in float64.
    """
    coefficients = _coefficients(layer)
    a = sum(c * t.a for c, t in zip(coefficients, layer.terms, strict=True))
    b = sum(
        math.copysign(c, t.weight) * t.b for c, t in zip(coefficients, layer.terms, strict=True)
    )
    return a, b


def svd_factors(layer: LayerTerms, rank: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The weighted sum of updates truncated to ``rank`` by SVD, never formed.

    With the stacked factors ``P`` and ``Q`` (``P @ Q`` the sum), the SVD is
    that of the small core ``Rp @ Rq^T`` of the QRs of ``P`` and ``Q^T``, so
    memory and time follow the inputs' size, not ``rows * out``. The rank is
    ``min(rank, sum of the ranks, rows, out)``: a rank the sum cannot have is
    not padded with zero factors.

    Args:
        layer: The inputs' terms.
        rank: The largest rank to keep.
        path: The layer's path, for messages.

    Returns:
        ``(A = U_k sqrt(S_k), B = sqrt(S_k) V_k^T)`` in float64.

    Raises:
        LoRAConfigError: If the core overflows float64.
    """
    p, q = _stacked(layer)
    keep = min(rank, p.shape[1], layer.rows, layer.out)
    qp, core, qq = _small_product(p, q, path)
    u, s, vt = np.linalg.svd(core)
    root = np.sqrt(s[:keep])
    return (qp @ u[:, :keep]) * root, root[:, None] * (vt[:keep] @ qq.T)


def relative_error(layer: LayerTerms, a: np.ndarray, b: np.ndarray, path: str) -> float:
    """``||D - A @ B||_F / ||D||_F`` in float64, ``D`` the weighted sum of updates.

    Computed from factors: ``D - A @ B = [P, A] @ [Q; -B]``, whose norm is that
    of the small core of its two stacked factors' QRs.

    Args:
        layer: The inputs' terms (``D``).
        a: ``[rows, k]``, as written (so the rounding to its dtype is included).
        b: ``[k, out]``, as written.
        path: The layer's path, for messages.

    Returns:
        The relative error; 0.0 for a zero sum.

    Raises:
        LoRAConfigError: If a core overflows float64.
    """
    p, q = _stacked(layer)
    a, b = a.astype(np.float64), b.astype(np.float64)
    norm = np.linalg.norm(_small_product(p, q, path)[1])
    if norm == 0:
        return 0.0
    residual = _small_product(np.concatenate([p, a], axis=1), np.concatenate([q, -b]), path)[1]
    return float(np.linalg.norm(residual) / norm)


@dataclass
class FullValue:
    """A bias or extra-layer variable across the inputs, combined as they are read.

    A whole value replaces the base's, so there is no update to add: when
    every input holds the same bytes, that value is kept as it is; when they
    differ, the result is their weighted sum ``sum_i w_i v_i`` (an average
    when the weights add up to 1), computed in float64.

    Attributes:
        key: The variable key, for messages.
        first: The first input's value, kept to compare the others with.
        total: ``sum_i w_i v_i`` of the values added so far, in float64.
        identical: Whether every value added so far has ``first``'s bytes.
    """

    key: str
    first: np.ndarray
    total: np.ndarray
    identical: bool = True

    @classmethod
    def start(cls, key: str, weight: float, value: np.ndarray) -> "FullValue":
        """The first input's value.

        Args:
            key: The variable key.
            weight: The first input's weight.
            value: Its value.

        Returns:
            The new :class:`FullValue`.
        """
        return cls(key, value, weight * value.astype(np.float64))

    def add(self, weight: float, value: np.ndarray, source: str) -> None:
        """Adds one more input's value.

        Args:
            weight: The input's weight.
            value: Its value, of the first's shape and dtype (checked on the configs).
            source: The input's path, for messages.

        Raises:
            LoRAConfigError: If the values differ and are not floating point
                (no weighted sum of them exists in their dtype).
        """
        if self.identical and value.tobytes() != self.first.tobytes():
            self.identical = False
            if self.first.dtype.kind != "f":
                raise LoRAConfigError(
                    f"{self.key} ({self.first.dtype.name}) differs between the inputs (first in "
                    f"{source}) and is not floating point, so it has no weighted sum; combine "
                    "adapters whose non-float variables are identical."
                )
        self.total += weight * value.astype(np.float64)

    def combined(self) -> np.ndarray:
        """The value to write: the shared value, or the weighted sum in the inputs' dtype.

        Returns:
            The array, of the inputs' shape and dtype.

        Raises:
            LoRAConfigError: If the weighted sum overflows the dtype.
        """
        if self.identical:
            return self.first
        with np.errstate(over="ignore", invalid="ignore"):
            return _cast_finite(self.total, self.first.dtype, self.key)


# ---- internals ---------------------------------------------------------------------------


def _coefficients(layer: LayerTerms) -> list[float]:
    # The weight is split evenly between A and B (c_i on each) to keep both in range.
    return [math.sqrt(abs(t.weight) * t.scaling) for t in layer.terms]


def _stacked(layer: LayerTerms) -> tuple[np.ndarray, np.ndarray]:
    """``P [rows, R]`` and ``Q [R, out]`` with ``P @ Q`` the weighted sum."""
    coefficients = _coefficients(layer)
    p = np.concatenate([c * t.a for c, t in zip(coefficients, layer.terms, strict=True)], axis=1)
    q = np.concatenate(
        [math.copysign(c, t.weight) * t.b for c, t in zip(coefficients, layer.terms, strict=True)],
        axis=0,
    )
    return p, q


def _small_product(p: np.ndarray, q: np.ndarray, path: str):
    """``P @ Q = Qp (Rp Rq^T) Qq^T``: the two orthonormal factors and the small core."""
    qp, rp = np.linalg.qr(p)  # reduced: rp is [min(rows, R), R]
    qq, rq = np.linalg.qr(q.T)  # rq is [min(out, R), R]
    core = rp @ rq.T
    if not np.isfinite(core).all():
        raise _overflow(f"layer {path}", "float64")
    return qp, core, qq


def _overflow(what: str, dtype: str) -> LoRAConfigError:
    return LoRAConfigError(
        f"The combined values of {what} do not fit {dtype} (they overflow); use smaller weights."
    )


def _cast_finite(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    cast = values.astype(dtype)
    if not np.isfinite(cast).all():
        raise _overflow(what, np.dtype(dtype).name)
    return cast
