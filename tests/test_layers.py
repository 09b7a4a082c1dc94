"""LoRA layers against numpy, merge exactness, gradients, config, errors."""

from dataclasses import dataclass, field

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import LoRAConv2D, LoRADense, tf
from lora_ckpt.errors import LoRAConfigError, MergeStateError, UnsupportedLayerError

from . import numpy_reference as ref
from .conftest import randomize_lora


@dataclass
class Case:
    """One layer configuration of the test matrix, with its tolerances."""

    name: str
    kind: str  # "dense" or "conv"
    input_shape: tuple
    layer_args: dict
    rank: int = 2
    dtype: str = "float32"
    ref_tol: float = 1e-5  # numpy reference, relative to max |y|
    merge_tol: float = 1e-5  # merged vs unmerged, relative to max |y|
    conv_args: dict = field(default_factory=dict)


CASES = [
    Case("dense-2d-r1", "dense", (5, 7), {"units": 6}, rank=1),
    Case("dense-2d-r2", "dense", (5, 7), {"units": 6, "activation": "relu"}),
    Case("dense-3d-r3", "dense", (2, 5, 7), {"units": 6}, rank=3),
    Case("dense-4d-r2-nobias", "dense", (2, 3, 4, 7), {"units": 6, "use_bias": False}),
    Case(
        "dense-2d-r4-f64",
        "dense",
        (5, 7),
        {"units": 6},
        rank=4,
        dtype="float64",
        ref_tol=1e-12,
        merge_tol=1e-12,
    ),
    Case("conv-k1", "conv", (2, 6, 6, 3), {"filters": 4, "kernel_size": 1}),
    Case(
        "conv-k3-same",
        "conv",
        (2, 7, 7, 3),
        {"filters": 4, "kernel_size": 3, "padding": "same"},
        rank=3,
        conv_args={"padding": "same"},
    ),
    Case(
        "conv-k3-s2-valid",
        "conv",
        (2, 9, 9, 3),
        {"filters": 5, "kernel_size": 3, "strides": 2},
        conv_args={"strides": (2, 2)},
    ),
    Case(
        "conv-k5x3-s2-same",
        "conv",
        (2, 9, 8, 3),
        {"filters": 4, "kernel_size": (5, 3), "strides": 2, "padding": "same"},
        rank=1,
        conv_args={"strides": (2, 2), "padding": "same"},
    ),
    Case(
        "conv-k3-d2-same",
        "conv",
        (2, 9, 9, 2),
        {"filters": 4, "kernel_size": 3, "dilation_rate": 2, "padding": "same"},
        conv_args={"dilation": (2, 2), "padding": "same"},
    ),
    Case(
        "conv-k4-s4-f64",
        "conv",
        (2, 8, 8, 3),
        {"filters": 4, "kernel_size": 4, "strides": 4},
        rank=4,
        dtype="float64",
        ref_tol=1e-12,
        merge_tol=1e-12,
        conv_args={"strides": (4, 4)},
    ),
]


def build_layer(case: Case, seed=0):
    tf.keras.utils.set_random_seed(seed)
    cls = LoRADense if case.kind == "dense" else LoRAConv2D
    layer = cls(**case.layer_args, lora_rank=case.rank, lora_alpha=2.0, dtype=case.dtype)
    layer.build((None,) + case.input_shape[1:])
    randomize_lora(layer, seed=seed, scale=0.3)
    if layer.use_bias:
        layer.bias.assign(np.random.default_rng(seed + 1).normal(size=layer.bias.shape))
    x = np.random.default_rng(seed + 2).normal(size=case.input_shape).astype(case.dtype)
    return layer, x


def reference_output(layer, case, x):
    args = dict(
        kernel=layer.kernel.numpy(),
        a=layer.kernel_lora_a.numpy(),
        b=layer.kernel_lora_b.numpy(),
        scaling=layer.scaling,
        bias=layer.bias.numpy() if layer.use_bias else None,
    )
    y = (
        ref.lora_dense(x, **args)
        if case.kind == "dense"
        else ref.lora_conv2d(x, **args, **case.conv_args)
    )
    return np.maximum(y, 0) if case.layer_args.get("activation") == "relu" else y


def assert_close(actual, expected, rel_tol):
    scale = max(np.abs(expected).max(), 1e-12)
    err = np.abs(np.asarray(actual, dtype=np.float64) - expected).max() / scale
    assert err <= rel_tol, f"relative error {err:.3g} > {rel_tol:g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_output_matches_numpy(case):
    layer, x = build_layer(case)
    assert_close(layer(x).numpy(), reference_output(layer, case, x), case.ref_tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_merged_output_matches_unmerged(case):
    layer, x = build_layer(case)
    unmerged = layer(x).numpy()
    layer.merge_weights()
    assert layer.merged
    assert_close(layer(x).numpy(), unmerged, case.merge_tol)
    # Merged means the kernel alone computes the output: a plain layer with
    # the merged kernel agrees.
    plain_cls = tf.keras.layers.Dense if case.kind == "dense" else tf.keras.layers.Conv2D
    plain = plain_cls(**case.layer_args, dtype=case.dtype)
    plain.build((None,) + case.input_shape[1:])
    plain.set_weights(layer.get_weights()[: len(plain.weights)])
    np.testing.assert_array_equal(plain(x).numpy(), layer(x).numpy())


@pytest.mark.parametrize("case", [CASES[1], CASES[7]], ids=lambda c: c.name)
def test_unmerge_restores_kernel_bitwise_after_100_cycles(case):
    layer, x = build_layer(case)
    original = layer.kernel.numpy().copy()
    for _ in range(100):
        layer.merge_weights()
        layer.unmerge_weights()
    np.testing.assert_array_equal(layer.kernel.numpy(), original)
    assert not layer.merged


@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=lambda c: c.name)
def test_disabled_layer_equals_base_layer(case):
    layer, x = build_layer(case)
    plain_cls = tf.keras.layers.Dense if case.kind == "dense" else tf.keras.layers.Conv2D
    plain = plain_cls(**case.layer_args, dtype=case.dtype)
    plain.build((None,) + case.input_shape[1:])
    plain.set_weights(layer.get_weights()[: len(plain.weights)])
    assert not np.array_equal(layer(x).numpy(), plain(x).numpy())
    layer.lora_enabled = False
    np.testing.assert_array_equal(layer(x).numpy(), plain(x).numpy())


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6], CASES[7]], ids=lambda c: c.name)
def test_gradients_reach_lora_weights(case):
    layer, x = build_layer(case)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    grads = tape.gradient(loss, [layer.kernel_lora_a, layer.kernel_lora_b])
    for var, grad in zip([layer.kernel_lora_a, layer.kernel_lora_b], grads, strict=True):
        assert grad is not None, f"no gradient for {var.name}"
        assert np.abs(grad.numpy()).max() > 0


def test_dense_lora_b_gradient_matches_numpy():
    case = CASES[0]
    layer, x = build_layer(case)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
    grad_b = tape.gradient(loss, layer.kernel_lora_b).numpy()
    # d sum(y) / dB = scaling * (x A)^T 1
    expected = layer.scaling * (x @ layer.kernel_lora_a.numpy()).T @ np.ones((x.shape[0], 6))
    np.testing.assert_allclose(grad_b, expected, rtol=1e-5)


def test_fresh_lora_layer_computes_the_base_layer_exactly():
    dense = tf.keras.layers.Dense(6)
    x = np.random.default_rng(0).normal(size=(3, 5, 7)).astype("float32")
    expected = dense(x).numpy()
    lora = lora_ckpt.convert_to_lora_layer(dense, lora_rank=3)
    np.testing.assert_array_equal(lora.kernel.numpy(), dense.kernel.numpy())
    np.testing.assert_array_equal(lora(x).numpy(), expected)


def test_dropout_only_acts_in_training():
    layer = LoRADense(6, lora_rank=2, lora_dropout=0.5)
    x = np.ones((8, 7), "float32")
    layer.build(x.shape)
    randomize_lora(layer, scale=1.0)
    inference = layer(x).numpy()
    np.testing.assert_array_equal(layer(x, training=False).numpy(), inference)
    assert not np.allclose(layer(x, training=True).numpy(), inference)


@pytest.mark.parametrize("case", [CASES[2], CASES[8]], ids=lambda c: c.name)
def test_config_round_trip(case):
    layer, x = build_layer(case)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (case.rank, 2.0)
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    clone.build((None,) + case.input_shape[1:])
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x).numpy(), layer(x).numpy())


def test_lora_layer_in_a_saved_keras_model_reloads(tmp_path):
    inputs = tf.keras.Input((7,))
    model = tf.keras.Model(inputs, LoRADense(3, lora_rank=2, name="fc")(inputs))
    randomize_lora(model)
    x = np.random.default_rng(0).normal(size=(2, 7)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = tf.keras.models.load_model(
        tmp_path / "m.keras", custom_objects={"LoRADense": LoRADense}
    )
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lora_rank": 0}, "lora_rank must be a positive integer"),
        ({"lora_rank": -2}, "lora_rank must be a positive integer"),
        ({"lora_rank": 2.5}, "lora_rank must be a positive integer"),
        ({"lora_rank": 10**9}, "at most 65536"),
        ({"lora_alpha": 1e300}, "finite in float32"),
        ({"lora_alpha": 10**400}, "finite in float32"),
        ({"lora_use_dora": "no"}, "lora_use_dora must be True or False"),
        ({"lora_alpha": 0}, "lora_alpha must be positive"),
        ({"lora_alpha": "big"}, "lora_alpha must be a number"),
        ({"lora_dropout": 1.0}, "lora_dropout must be a rate"),
    ],
)
def test_invalid_lora_arguments_raise(kwargs, match):
    with pytest.raises(LoRAConfigError, match=match):
        LoRADense(4, **kwargs)
    with pytest.raises(LoRAConfigError, match=match):
        LoRAConv2D(4, 3, **kwargs)


def test_unsupported_convolutions_raise():
    with pytest.raises(UnsupportedLayerError, match="grouped"):
        LoRAConv2D(4, 3, groups=2)
    with pytest.raises(UnsupportedLayerError, match="channels_last"):
        LoRAConv2D(4, 3, data_format="channels_first")
    for layer in (tf.keras.layers.DepthwiseConv2D(3), tf.keras.layers.LSTM(3)):
        with pytest.raises(UnsupportedLayerError, match="supported types are"):
            lora_ckpt.convert_to_lora_layer(layer)
    with pytest.raises(LoRAConfigError, match="only lora_"):
        lora_ckpt.convert_to_lora_layer(tf.keras.layers.Dense(3), units=4)


def test_merge_state_errors():
    layer, _ = build_layer(CASES[0])
    original = layer.kernel.numpy().copy()
    with pytest.raises(MergeStateError, match="not merged"):
        layer.unmerge_weights()
    np.testing.assert_array_equal(layer.kernel.numpy(), original)
    layer.merge_weights()
    merged = layer.kernel.numpy().copy()
    with pytest.raises(MergeStateError, match="already merged"):
        layer.merge_weights()
    np.testing.assert_array_equal(layer.kernel.numpy(), merged)  # not merged twice
    layer.unmerge_weights()
    np.testing.assert_array_equal(layer.kernel.numpy(), original)
