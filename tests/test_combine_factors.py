"""The factor arithmetic of combine_adapters on its own: numpy in, numpy out,
checked against the dense updates numpy forms directly."""

import math

import numpy as np
import pytest

from lora_ckpt.errors import LoRAConfigError
from lora_ckpt.state.combine_factors import (
    FullValue,
    LayerTerms,
    Term,
    cat_factors,
    combine_layer,
    linear_factors,
    relative_error,
    svd_factors,
)


def layer_of(ranks, weights, scalings=None, rows=7, out=5, seed=0):
    rng = np.random.default_rng(seed)
    scalings = scalings or [1.0] * len(ranks)
    layer = LayerTerms("LoRADense", (rows,), out)
    for i, (r, w, s) in enumerate(zip(ranks, weights, scalings, strict=True)):
        a, b = rng.normal(size=(rows, r)), rng.normal(size=(r, out))
        layer.terms.append(Term(weight=w, scaling=s, a=a, b=b, source=f"in{i}"))
    return layer


def dense_sum(layer):
    return sum(t.weight * t.scaling * t.a @ t.b for t in layer.terms)


def test_cat_is_the_weighted_sum_and_the_ranks_add_up():
    layer = layer_of([2, 3], [0.7, -1.3], scalings=[2.0, 0.5])
    a, b = cat_factors(layer)
    assert a.shape == (7, 5) and b.shape == (5, 5)
    np.testing.assert_allclose(a @ b, dense_sum(layer), rtol=1e-12, atol=1e-12)


def test_linear_sums_the_factors_with_cross_terms():
    layer = layer_of([2, 2], [0.8, -0.3], scalings=[2.0, 1.0])
    a, b = linear_factors(layer)
    c = [math.sqrt(0.8 * 2.0), math.sqrt(0.3 * 1.0)]
    t0, t1 = layer.terms
    np.testing.assert_allclose(a, c[0] * t0.a + c[1] * t1.a, rtol=1e-12)
    np.testing.assert_allclose(b, c[0] * t0.b - c[1] * t1.b, rtol=1e-12)
    assert not np.allclose(a @ b, dense_sum(layer))


@pytest.mark.parametrize("rank", [1, 2, 3, 5, 50])
def test_svd_is_the_best_truncation_of_the_dense_sum(rank):
    layer = layer_of([2, 3], [0.7, -1.3])
    a, b = svd_factors(layer, rank, "x")
    dense = dense_sum(layer)
    keep = min(rank, 5)  # the sum has rank 5: nothing is padded beyond it
    assert a.shape == (7, keep) and b.shape == (keep, 5)
    u, s, vt = np.linalg.svd(dense)
    best = (u[:, :keep] * s[:keep]) @ vt[:keep]
    np.testing.assert_allclose(a @ b, best, rtol=1e-9, atol=1e-9)
    expected = np.linalg.norm(dense - a @ b) / np.linalg.norm(dense)
    assert relative_error(layer, a, b, "x") == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_combine_layer_reshapes_a_conv_kernel_and_casts():
    rng = np.random.default_rng(1)
    layer = LayerTerms("LoRAConv2D", (3, 3, 2), 4)
    for w in (0.5, 2.0):
        a, b = rng.normal(size=(18, 2)), rng.normal(size=(2, 4))
        layer.terms.append(Term(weight=w, scaling=1.0, a=a, b=b, source="in"))
    a, b, error = combine_layer(layer, "cat", None, np.dtype("float32"), "conv")
    assert a.shape == (3, 3, 2, 4) and a.dtype == np.float32 and error is None
    np.testing.assert_allclose(
        np.tensordot(a, b, axes=1).reshape(18, 4), dense_sum(layer), rtol=1e-5, atol=1e-5
    )
    _, _, error = combine_layer(layer, "svd", 2, np.dtype("float32"), "conv")
    assert 0 < error < 1


def test_factors_that_overflow_the_dtype_are_refused():
    layer = layer_of([1], [1e5])
    with pytest.raises(LoRAConfigError, match="layer big .*float16"):
        combine_layer(layer, "cat", None, np.dtype("float16"), "big")


def test_a_full_value_held_identically_is_kept_byte_for_byte():
    value = np.random.default_rng(2).normal(size=(3, 4)).astype("float32")
    full = FullValue.start("fc/kernel", 0.5, value)
    full.add(0.25, value.copy(), "in1")
    assert full.identical
    assert full.combined().tobytes() == value.tobytes()


def test_differing_full_values_are_their_weighted_sum_in_float64():
    rng = np.random.default_rng(3)
    values = [rng.normal(size=(4,)).astype("float32") for _ in range(3)]
    weights = [0.3, 0.7, -0.2]
    full = FullValue.start("fc/bias", weights[0], values[0])
    for w, v in zip(weights[1:], values[1:], strict=True):
        full.add(w, v, "in")
    want = sum(w * v.astype(np.float64) for w, v in zip(weights, values, strict=True))
    got = full.combined()
    assert not full.identical and got.dtype == np.float32
    np.testing.assert_allclose(got, want.astype("float32"), rtol=0, atol=0)


def test_differing_full_values_that_cannot_be_summed_are_refused():
    ints = FullValue.start("steps", 0.5, np.array([1, 2], "int64"))
    with pytest.raises(LoRAConfigError, match="steps .*not floating point"):
        ints.add(0.5, np.array([1, 3], "int64"), "in1")
    half = FullValue.start("fc/bias", 3e4, np.array([1.0], "float16"))
    half.add(3e4, np.array([2.0], "float16"), "in1")
    with pytest.raises(LoRAConfigError, match="fc/bias .*float16"):
        half.combined()
