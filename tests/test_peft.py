"""PEFT's everyday tools: DoRA, rsLoRA, rank/alpha patterns, lora_disabled,
from_adapter, unload, print_trainable_parameters, initializers.

Each is checked against an independent numpy computation where one applies.
"""

import json
import os

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.errors import (
    BaseModelMismatchError,
    LayerNotFoundError,
    LoRAConfigError,
    MergeStateError,
)
from lora_ckpt.layers import LoRAConv2D, LoRADense, convert_to_lora_layer

from .conftest import TINY_CONVNEXT, compile_for_task, count, randomize_lora


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")


def _numpy_dora_dense(x, w0, bias, a, b, magnitude, scaling):
    updated = w0.astype("float64") + scaling * a.astype("float64") @ b.astype("float64")
    norm = np.linalg.norm(updated, axis=0)
    return x.astype("float64") @ (updated * magnitude / norm) + bias


def _dora_layer(layer, rng):
    for var in (layer.kernel_lora_a, layer.kernel_lora_b):
        var.assign(rng.normal(0, 0.5, var.shape).astype("float32"))
    layer.lora_magnitude.assign(rng.uniform(0.5, 2.0, layer.lora_magnitude.shape).astype("float32"))
    return layer


# ---- DoRA ----


def test_dora_dense_forward_matches_numpy_and_starts_at_the_base():
    rng = np.random.default_rng(0)
    base = tf.keras.layers.Dense(6)
    base.build((None, 5))
    x = rng.normal(size=(4, 5)).astype("float32")
    layer = convert_to_lora_layer(base, lora_rank=2, lora_alpha=3.0, lora_use_dora=True)
    np.testing.assert_allclose(layer(x).numpy(), base(x).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        layer.lora_magnitude.numpy(), np.linalg.norm(base.kernel.numpy(), axis=0), rtol=1e-6
    )
    _dora_layer(layer, rng)
    expected = _numpy_dora_dense(
        x,
        base.kernel.numpy(),
        base.bias.numpy(),
        layer.kernel_lora_a.numpy(),
        layer.kernel_lora_b.numpy(),
        layer.lora_magnitude.numpy(),
        1.5,
    )
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_dora_conv_forward_matches_its_merged_kernel_in_numpy():
    rng = np.random.default_rng(1)
    base = tf.keras.layers.Conv2D(4, 3, padding="same")
    base.build((None, 6, 6, 3))
    layer = _dora_layer(convert_to_lora_layer(base, lora_rank=2, lora_use_dora=True), rng)
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    w0, a, b = (
        v.numpy().astype("float64") for v in (base.kernel, layer.kernel_lora_a, layer.kernel_lora_b)
    )
    updated = w0 + 0.5 * np.einsum("hwir,ro->hwio", a, b)
    norm = np.sqrt((updated**2).sum(axis=(0, 1, 2)))
    kernel = (updated * layer.lora_magnitude.numpy() / norm).astype("float32")
    expected = tf.nn.conv2d(x, kernel, 1, "SAME") + base.bias
    np.testing.assert_allclose(layer(x).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def _dora_dense(rng, inputs: int, units: int):
    """A built Dense and its rank-2 DoRA layer with random A, B and magnitude."""
    base = tf.keras.layers.Dense(units)
    base.build((None, inputs))
    return base, _dora_layer(convert_to_lora_layer(base, lora_rank=2, lora_use_dora=True), rng)


def test_dora_gradients_reach_magnitude_a_and_b_exactly():
    rng = np.random.default_rng(2)
    base, layer = _dora_dense(rng, 4, 3)
    x = rng.normal(size=(5, 4)).astype("float32")
    weights = [layer.kernel_lora_a, layer.kernel_lora_b, layer.lora_magnitude]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) ** 2)
    grads = tape.gradient(loss, weights)
    # Central differences in float64 on the numpy forward: the norm is not
    # detached (PEFT detaches it), so the gradient is the exact one.
    values = [w.numpy().astype("float64") for w in weights]

    def f(a, b, m):
        y = _numpy_dora_dense(x, base.kernel.numpy(), base.bias.numpy(), a, b, m, 0.5)
        return (y**2).sum()

    for i, grad in enumerate(grads):
        assert grad is not None and np.abs(grad.numpy()).max() > 0
        numeric = np.zeros_like(values[i])
        for index in np.ndindex(values[i].shape):
            plus = [v.copy() for v in values]
            minus = [v.copy() for v in values]
            plus[i][index] += 1e-6
            minus[i][index] -= 1e-6
            numeric[index] = (f(*plus) - f(*minus)) / 2e-6
        np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-3, atol=1e-3)


def test_dora_merge_is_exact_and_unmerge_bitwise():
    rng = np.random.default_rng(3)
    _, layer = _dora_dense(rng, 5, 6)
    x = rng.normal(size=(4, 5)).astype("float32")
    kernel = layer.kernel.numpy()
    expected = layer(x).numpy()
    layer.merge_weights()
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    layer.unmerge_weights()
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    np.testing.assert_array_equal(layer(x).numpy(), expected)


@pytest.mark.slow
def test_dora_model_trains_with_fit_and_round_trips_bitwise(tmp_path, images):
    model = lora_ckpt.create_model(
        "convnext_tiny", lora_rank=2, lora_use_dora=True, **TINY_CONVNEXT
    )
    magnitudes = [layer.lora_magnitude.numpy() for _, layer in lora_ckpt.lora_layers(model)]
    compile_for_task(model).fit(images, np.array([0, 1]), epochs=2, verbose=0)
    after = [layer.lora_magnitude.numpy() for _, layer in lora_ckpt.lora_layers(model)]
    assert any(not np.array_equal(m0, m1) for m0, m1 in zip(magnitudes, after, strict=True))
    expected = model(images).numpy()
    lora_ckpt.save_lora_state(model, str(tmp_path / "dora"))
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert config["format_version"] == 2
    assert all(layer["dora"] for layer in config["layers"].values())
    fresh = lora_ckpt.create_model(
        "convnext_tiny", lora_rank=2, lora_use_dora=True, **TINY_CONVNEXT
    )
    # The trained model's base; the adapter brings the rest.
    for src, dst in zip(model.weights, fresh.weights, strict=True):
        if src.name.rsplit("/", 1)[-1].split(":")[0] not in lora_ckpt.LORA_WEIGHT_NAMES:
            dst.assign(src)
    lora_ckpt.load_lora_state(fresh, str(tmp_path / "dora"))
    np.testing.assert_array_equal(fresh(images).numpy(), expected)


# ---- rsLoRA, patterns, initializers ----


def test_rslora_scales_by_alpha_over_sqrt_rank(tmp_path):
    rng = np.random.default_rng(4)
    base = tf.keras.layers.Dense(6)
    base.build((None, 5))
    layer = convert_to_lora_layer(base, lora_rank=4, lora_alpha=8.0, lora_use_rslora=True)
    assert layer.scaling == 8.0 / 2.0
    randomize_lora(layer)
    x = rng.normal(size=(3, 5)).astype("float32")
    a, b = layer.kernel_lora_a.numpy(), layer.kernel_lora_b.numpy()
    expected = x @ base.kernel.numpy() + 4.0 * (x @ a) @ b + base.bias.numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    model = lora_ckpt.create_model(
        "convnext_tiny", lora_rank=4, lora_alpha=8.0, lora_use_rslora=True, **TINY_CONVNEXT
    )
    lora_ckpt.save_lora_state(model, str(tmp_path / "rs"))
    record = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())["layers"]
    assert {(r["rslora"], r["scaling"]) for r in record.values()} == {(True, 4.0)}


@pytest.mark.slow
def test_rank_and_alpha_patterns_give_the_asked_ranks_and_round_trip(tmp_path, images):
    kwargs = dict(
        lora_rank=2,
        lora_rank_pattern={"stages/1/*": 6, "*fc2": 3},
        lora_alpha_pattern={"*fc1": 4.0},
        **TINY_CONVNEXT,
    )
    model = lora_ckpt.create_model("convnext_tiny", **kwargs)
    got = {
        path: (layer.lora_rank, layer.lora_alpha) for path, layer in lora_ckpt.lora_layers(model)
    }
    assert got == {
        "stages/0/blocks/0/mlp/fc1": (2, 4.0),
        "stages/0/blocks/0/mlp/fc2": (3, 1.0),
        "stages/1/blocks/0/mlp/fc1": (6, 4.0),  # the first matching pattern wins
        "stages/1/blocks/0/mlp/fc2": (6, 1.0),
    }
    randomize_lora(model)
    expected = model(images).numpy()
    lora_ckpt.save_lora_state(model, str(tmp_path / "p"))
    ranks = lora_ckpt.inspect_adapter(str(tmp_path / "p"))["ranks"]
    assert ranks == {path: rank for path, (rank, _) in got.items()}
    fresh = lora_ckpt.create_model("convnext_tiny", **kwargs)
    fresh.set_weights(model.get_weights())
    for _, layer in lora_ckpt.lora_layers(fresh):
        layer.kernel_lora_b.assign(tf.zeros_like(layer.kernel_lora_b))
    lora_ckpt.load_lora_state(fresh, str(tmp_path / "p"))
    np.testing.assert_array_equal(fresh(images).numpy(), expected)
    with pytest.raises(LayerNotFoundError, match="lora_rank_pattern key"):
        lora_ckpt.create_model("convnext_tiny", lora_rank_pattern={"*nope*": 2}, **TINY_CONVNEXT)


def test_lora_initializer_choices():
    gaussian = LoRADense(64, lora_rank=8, lora_initializer="gaussian")
    gaussian.build((None, 4096))
    assert abs(np.std(gaussian.kernel_lora_a.numpy()) - 1 / 8) < 0.01
    kaiming = LoRAConv2D(4, 3, lora_rank=4, lora_initializer="kaiming_uniform")
    kaiming.build((None, 8, 8, 32))
    bound = 1 / np.sqrt(3 * 3 * 32)  # torch's kaiming_uniform_(a=sqrt(5)) bound
    values = kaiming.kernel_lora_a.numpy()
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
    assert (
        LoRADense.from_config(gaussian.get_config()).get_config()["lora_initializer"] == "gaussian"
    )
    model = lora_ckpt.create_model("convnext_tiny", lora_initializer="gaussian", **TINY_CONVNEXT)
    assert all(
        layer.get_config()["lora_initializer"] == "gaussian"
        for _, layer in lora_ckpt.lora_layers(model)
    )
    with pytest.raises(LoRAConfigError, match="lora_initializer"):
        LoRADense(4, lora_initializer="nope")


# ---- disable, unload, summary, from_adapter ----


def test_lora_disabled_runs_the_base_and_restores_even_after_an_error(images):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    randomize_lora(model)
    adapted = model(images).numpy()
    base = lora_ckpt.convert_to_regular_model(model, merge=False)(images).numpy()
    with lora_ckpt.lora_disabled(model):
        np.testing.assert_array_equal(model(images).numpy(), base)
    np.testing.assert_array_equal(model(images).numpy(), adapted)
    with pytest.raises(KeyError), lora_ckpt.lora_disabled(model):
        raise KeyError("a failure inside the block")
    assert all(layer.lora_enabled for _, layer in lora_ckpt.lora_layers(model))
    lora_ckpt.merge_lora_weights(model)
    with pytest.raises(MergeStateError), lora_ckpt.lora_disabled(model):
        pass


def test_unload_returns_the_base_without_the_update(images):
    tf.keras.utils.set_random_seed(0)
    regular = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    base_out = regular(images).numpy()  # B is zero: this is the base
    randomize_lora(regular)
    lora_ckpt.merge_lora_weights(regular)  # merged or not, unload gives the base
    unloaded = lora_ckpt.convert_to_regular_model(regular, merge=False)
    assert not lora_ckpt.lora_layers(unloaded)
    np.testing.assert_allclose(unloaded(images).numpy(), base_out, rtol=1e-6, atol=1e-6)
    assert all(layer.merged for _, layer in lora_ckpt.lora_layers(regular))


def test_print_trainable_parameters(capsys):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    lora_ckpt.print_trainable_parameters(model)
    trainable, total = count(model.trainable_weights), count(model.weights)
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}\n"
    )


@pytest.mark.slow
def test_from_adapter_reproduces_the_trained_model(tmp_path, images):
    kwargs = dict(lora_rank=2, lora_use_dora=True, lora_rank_pattern={"*fc2": 3}, **TINY_CONVNEXT)
    model = compile_for_task(lora_ckpt.create_model("convnext_tiny", **kwargs))
    model.fit(images, np.array([0, 1]), epochs=2, verbose=0)
    expected = model(images).numpy()
    lora_ckpt.save_lora_state(model, str(tmp_path / "adapter"))
    lora_ckpt.convert_to_regular_model(model, merge=False).save_weights(str(tmp_path / "base.h5"))

    rebuilt = lora_ckpt.from_adapter(
        str(tmp_path / "adapter"), base_weights=str(tmp_path / "base.h5")
    )
    assert type(rebuilt) is type(model)
    np.testing.assert_array_equal(rebuilt(images).numpy(), expected)
    ranks = {
        p: (layer.lora_rank, layer.lora_use_dora) for p, layer in lora_ckpt.lora_layers(rebuilt)
    }
    assert ranks == {p: (layer.lora_rank, True) for p, layer in lora_ckpt.lora_layers(model)}
    with pytest.raises(LoRAConfigError, match="base_weights"):
        lora_ckpt.from_adapter(str(tmp_path / "adapter"))
    other = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    other.weights[0].assign(other.weights[0] * 2.0)  # another base
    other.save_weights(str(tmp_path / "other.h5"))
    with pytest.raises(BaseModelMismatchError):
        lora_ckpt.from_adapter(str(tmp_path / "adapter"), base_weights=str(tmp_path / "other.h5"))
    assert os.path.isdir(tmp_path / "adapter")


def test_a_dora_model_given_new_base_weights_computes_that_base(tmp_path, images):
    model = lora_ckpt.create_model("convnext_tiny", lora_use_dora=True, **TINY_CONVNEXT)
    base = lora_ckpt.convert_to_regular_model(model, merge=False)
    for var in base.weights:
        var.assign(var * 1.5)  # another base than the one the magnitudes were taken from
    base.save_weights(str(tmp_path / "base.h5"))
    lora_ckpt.load_base_weights(model, str(tmp_path / "base.h5"))
    np.testing.assert_allclose(model(images).numpy(), base(images).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_merges_a_dora_rank_pattern_adapter_into_a_savedmodel(tmp_path, images):
    from lora_ckpt.cli import main

    kwargs = dict(lora_rank=2, lora_use_dora=True, lora_rank_pattern={"*fc1": 3}, **TINY_CONVNEXT)
    model = lora_ckpt.create_model("convnext_tiny", **kwargs)
    randomize_lora(model)
    expected = model(images).numpy()
    lora_ckpt.save_lora_state(model, str(tmp_path / "adapter"))
    lora_ckpt.convert_to_regular_model(model, merge=False).save_weights(str(tmp_path / "base.h5"))
    args = ["--store", str(tmp_path), "--base", str(tmp_path / "base.h5")]
    out = str(tmp_path / "exported")
    assert main(["export", *args, "--adapter", str(tmp_path / "adapter"), "--out", out]) == 0
    exported = tf.saved_model.load(out).signatures["serving_default"]
    logits = exported(images=tf.constant(images))["logits"].numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_dora_column_of_norm_zero_computes_zero_not_nan():
    layer = LoRADense(3, lora_rank=2, lora_use_dora=True, kernel_initializer="zeros")
    x = np.random.default_rng(5).normal(size=(2, 4)).astype("float32")
    np.testing.assert_array_equal(layer(x).numpy(), np.zeros((2, 3), "float32"))
    layer.merge_weights()
    assert np.isfinite(layer.kernel.numpy()).all()


@pytest.mark.slow
def test_from_adapter_refuses_a_hostile_base_config_before_allocating(tmp_path):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    lora_ckpt.save_lora_state(model, str(tmp_path / "a"))
    lora_ckpt.convert_to_regular_model(model).save_weights(str(tmp_path / "base.h5"))
    config_file = tmp_path / "a" / "adapter_config.json"
    good = json.loads(config_file.read_text())
    for edit, match in (
        ({"embed_dim": [100_000, 100_000]}, "parameters, more than"),  # tens of GB if built
        ({"embed_dim": "abc"}, "does not build|invalid"),
        ({"bogus_field": 1, "nb_blocks": [1.5, 1]}, "does not build|invalid"),
    ):
        document = json.loads(json.dumps(good))
        document["base_model"]["config"].update(edit)
        config_file.write_text(json.dumps(document))
        with pytest.raises(lora_ckpt.errors.CorruptAdapterError, match=match):
            lora_ckpt.from_adapter(str(tmp_path / "a"), base_weights=str(tmp_path / "base.h5"))
        with pytest.raises(lora_ckpt.errors.CorruptAdapterError, match=match):
            lora_ckpt.from_adapter(str(tmp_path / "a"), check_base=False, max_parameters=10**7)
