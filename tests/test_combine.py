"""combine_adapters: cat, linear and svd against numpy, the loaders' acceptance,
the refusals, and the ``lora-ckpt combine`` command."""

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import time
import tracemalloc

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import load_base_weights, load_lora_state, read_lora_state, save_lora_state, tf
from lora_ckpt.cli import main as cli_main
from lora_ckpt.errors import (
    AdapterExistsError,
    AdapterMismatchError,
    BaseModelMismatchError,
    LoRAConfigError,
)
from lora_ckpt.state import combine as combine_module
from lora_ckpt.state.combine import MAX_INPUTS, combine_adapters, write_lora_state
from lora_ckpt.state.format import MAX_RANK, LayerRecord, VariableRecord
from lora_ckpt.traversal import named_variables

from .conftest import TINY_CONVNEXT, randomize_lora

# ---- independent numpy computations ----------------------------------------------------


def update(state, layer) -> np.ndarray:
    """``scaling * A @ B`` of one layer of a read adapter, float64, in the kernel's shape."""
    a = state.tensors[f"{layer}/kernel_lora_a"].astype(np.float64)
    b = state.tensors[f"{layer}/kernel_lora_b"].astype(np.float64)
    return state.config.layers[layer].scaling * np.tensordot(a, b, axes=1)


def weighted_sum(states, weights) -> dict[str, np.ndarray]:
    """``sum_i w_i delta_i`` per layer; a layer an adapter lacks adds nothing."""
    total = {}
    for state, weight in zip(states, weights, strict=True):
        for layer in state.config.layers:
            total[layer] = total.get(layer, 0.0) + weight * update(state, layer)
    return total


def product(state, layer) -> np.ndarray:
    """``A @ B`` of a written layer (its scaling is 1), float64."""
    a = state.tensors[f"{layer}/kernel_lora_a"].astype(np.float64)
    return np.tensordot(a, state.tensors[f"{layer}/kernel_lora_b"].astype(np.float64), axes=1)


# ---- adapters of one tiny base ------------------------------------------------------------


def lora_convnext(base_path=None, **lora_kwargs):
    model = lora_ckpt.create_model(
        "convnext_tiny", **dict(dict(lora_rank=2), **lora_kwargs), **TINY_CONVNEXT
    )
    if base_path is not None:
        load_base_weights(model, base_path)
    return model


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """A 'pretrained' regular tiny ConvNeXt saved as HDF5."""
    import tfimm

    tf.keras.utils.set_random_seed(42)
    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    rng = np.random.default_rng(0)
    for var in regular.weights:
        var.assign(var + rng.normal(0, 0.02, var.shape).astype("float32"))
    path = str(tmp_path_factory.mktemp("base") / "base.h5")
    regular.save_weights(path)
    return path


@pytest.fixture(scope="module")
def adapters(base_file, tmp_path_factory):
    """Adapters of the one base (and one of another base), by name -> path.

    c1, c2: rank 2 on the MLPs with the (untouched, so identical) head saved in full.
    c3: like them, with a head fine-tuned differently.
    a: rank 2 on the MLPs, no head. b: rank 3 on the MLPs and on the head.
    other_base: rank 2 on the MLPs of a model with other base weights.
    """
    root = tmp_path_factory.mktemp("adapters")
    paths = {}

    def save(model, name, seed):
        randomize_lora(model, seed=seed)
        paths[name] = save_lora_state(model, str(root / name))

    with_head = lora_convnext(base_file)
    save(with_head, "c1", 1)
    save(with_head, "c2", 2)
    with_head.fc.kernel.assign_add(tf.fill(with_head.fc.kernel.shape, 0.01))
    save(with_head, "c3", 3)
    save(lora_convnext(base_file, lora_train_classifier=False), "a", 4)
    b = lora_convnext(
        base_file, lora_rank=3, lora_layer_groups=("mlp", "head"), lora_train_classifier=False
    )
    save(b, "b", 5)
    tf.keras.utils.set_random_seed(9)
    save(lora_convnext(lora_train_classifier=False), "other_base", 6)
    return paths


def read(*paths):
    return [read_lora_state(p) for p in paths]


# ---- cat --------------------------------------------------------------------------------


def test_cat_is_the_weighted_sum_of_updates(adapters, tmp_path):
    weights = [0.7, -1.3]
    out = combine_adapters([adapters["a"], adapters["b"]], weights, str(tmp_path / "cat"))
    assert out == str(tmp_path / "cat")
    inputs, combined = read(adapters["a"], adapters["b"]), read_lora_state(out)
    expected = weighted_sum(inputs, weights)
    # The head has LoRA in b only; the MLP layers have rank 2 in a and 3 in b.
    assert set(combined.config.layers) == set(expected)
    assert combined.config.layers["fc"].rank == 3
    for layer, want in expected.items():
        record = combined.config.layers[layer]
        if layer != "fc":
            assert record.rank == 5
        assert (record.alpha, record.scaling) == (float(record.rank), 1.0)
        np.testing.assert_allclose(product(combined, layer), want, rtol=1e-6, atol=1e-7)
    assert {v.kind for v in combined.config.variables.values()} == {"lora"}
    assert combined.config.base_model == inputs[0].config.base_model
    record = combined.config.metadata["combined"]
    assert record["method"] == "cat" and record["weights"] == weights
    assert record["sources"] == [adapters["a"], adapters["b"]]
    with open(os.path.join(out, "adapter_config.json")) as handle:
        assert json.load(handle)["format_version"] == 1  # plain LoRA: readable by v1 readers
    assert lora_ckpt.inspect_adapter(out)["ranks"]["fc"] == 3


@pytest.mark.slow
def test_cat_adapter_loads_and_the_model_equals_the_folded_base(
    adapters, base_file, tmp_path, images
):
    import tfimm

    weights = [0.5, 0.25]
    out = combine_adapters([adapters["c1"], adapters["c2"]], weights, str(tmp_path / "cat"))
    inputs = read(adapters["c1"], adapters["c2"])
    combined = read_lora_state(out)
    # The identical full head is copied byte for byte.
    for key in ("fc/kernel", "fc/bias"):
        assert combined.config.variables[key].kind == "extra"
        assert combined.tensors[key].tobytes() == inputs[0].tensors[key].tobytes()

    model = lora_convnext(base_file, lora_rank=4, lora_alpha=4.0)
    report = load_lora_state(model, out)
    assert report.complete

    folded = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    folded.load_weights(base_file)
    variables = named_variables(folded)
    for layer, delta in weighted_sum(inputs, weights).items():
        kernel = variables[f"{layer}/kernel"]
        kernel.assign((kernel.numpy().astype(np.float64) + delta).astype("float32"))
    np.testing.assert_allclose(model(images).numpy(), folded(images).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_pool_serves_a_cat_adapter_of_mixed_ranks(adapters, base_file, tmp_path, images):
    import tfimm

    weights = [0.7, -1.3]
    paths = [adapters["a"], adapters["b"]]
    out = combine_adapters(paths, weights, str(tmp_path / "cat"))  # ranks 5, head 3
    served = lora_convnext(
        base_file, lora_rank=5, lora_layer_groups=("mlp", "head"), lora_train_classifier=False
    )
    pool = lora_ckpt.AdapterPool(served, capacity=1)
    pool.load("mix", out)

    folded = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    folded.load_weights(base_file)
    variables = named_variables(folded)
    for layer, delta in weighted_sum(read(*paths), weights).items():
        kernel = variables[f"{layer}/kernel"]
        kernel.assign((kernel.numpy().astype(np.float64) + delta).astype("float32"))
    np.testing.assert_allclose(
        pool.predict(images, adapter="mix"), folded(images).numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_cat_of_conv_layers_loads_and_equals_the_folded_kernel(tmp_path):
    def build(rank, lora=True):
        tf.keras.utils.set_random_seed(3)
        inputs = tf.keras.Input((8, 8, 3))
        if lora:
            conv = lora_ckpt.LoRAConv2D(6, 3, lora_rank=rank, lora_alpha=rank, name="conv")
        else:
            conv = tf.keras.layers.Conv2D(6, 3, name="conv")
        return tf.keras.Model(inputs, conv(inputs))

    base = build(2)
    first, second = build(2), build(3)
    for model, seed in ((first, 1), (second, 2)):
        model.get_layer("conv").kernel.assign(base.get_layer("conv").kernel)
        randomize_lora(model, seed=seed)
    paths = [save_lora_state(m, str(tmp_path / n)) for m, n in ((first, "r2"), (second, "r3"))]
    weights = [0.6, -0.9]
    out = combine_adapters(paths, weights, str(tmp_path / "cat"))
    combined = read_lora_state(out)
    assert combined.tensors["conv/kernel_lora_a"].shape == (3, 3, 3, 5)
    delta = weighted_sum(read(*paths), weights)["conv"]
    np.testing.assert_allclose(product(combined, "conv"), delta, rtol=1e-6, atol=1e-7)

    target = build(5)
    target.get_layer("conv").kernel.assign(base.get_layer("conv").kernel)
    load_lora_state(target, out)
    folded = build(0, lora=False)
    folded.get_layer("conv").kernel.assign(
        base.get_layer("conv").kernel.numpy().astype(np.float64) + delta
    )
    folded.get_layer("conv").bias.assign(base.get_layer("conv").bias)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(target(x).numpy(), folded(x).numpy(), rtol=1e-5, atol=1e-5)

    svd = read_lora_state(combine_adapters(paths, weights, str(tmp_path / "svd"), "svd", 2))
    assert svd.tensors["conv/kernel_lora_a"].shape == (3, 3, 3, 2)
    flat = delta.reshape(-1, 6)
    residual = flat - product(svd, "conv").reshape(-1, 6)
    reported = svd.config.metadata["combined"]["svd_relative_error"]["conv"]
    assert reported == pytest.approx(np.linalg.norm(residual) / np.linalg.norm(flat), rel=1e-9)


def test_one_adapter_with_weight_one_is_a_copy_of_its_update(adapters, tmp_path, images):
    out = combine_adapters([adapters["c1"]], [1.0], str(tmp_path / "copy"))
    original, copy = read(adapters["c1"], out)
    for layer in original.config.layers:
        np.testing.assert_allclose(
            product(copy, layer), update(original, layer), rtol=1e-6, atol=1e-8
        )


def test_rslora_inputs_are_combined_with_their_recorded_scaling(adapters, tmp_path):
    # rsLoRA layers are not built by the layers yet: the adapter's config is
    # edited to say rsLoRA (scaling alpha/sqrt(rank)), which the reader accepts.
    path = str(tmp_path / "rslora")
    shutil.copytree(adapters["a"], path)
    with open(os.path.join(path, "adapter_config.json")) as handle:
        config = json.load(handle)
    config["format_version"] = 2
    for record in config["layers"].values():
        record["rslora"] = True
        record["scaling"] = record["alpha"] / math.sqrt(record["rank"])
    with open(os.path.join(path, "adapter_config.json"), "w") as handle:
        json.dump(config, handle)
    rslora = read_lora_state(path)
    assert all(layer.rslora for layer in rslora.config.layers.values())

    out = read_lora_state(combine_adapters([path], [2.0], str(tmp_path / "cat")))
    for layer in rslora.config.layers:
        assert not out.config.layers[layer].rslora
        np.testing.assert_allclose(
            product(out, layer), 2.0 * update(rslora, layer), rtol=1e-6, atol=1e-8
        )


# ---- biases and heads (trained in full) ---------------------------------------------------


@pytest.fixture(scope="module")
def trained_heads(base_file, tmp_path_factory):
    """Two adapters that train the LoRA layers' biases and the head in full (the
    demo's settings), each with its own biases and head: name -> path."""
    root = tmp_path_factory.mktemp("trained_heads")
    paths = {}
    for name, seed in (("h1", 21), ("h2", 22)):
        model = lora_convnext(base_file, lora_train_bias="lora_only")
        randomize_lora(model, seed=seed)
        rng = np.random.default_rng(seed)
        for layer in [layer for _, layer in lora_ckpt.lora_layers(model)] + [model.fc]:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))
        model.fc.kernel.assign_add(rng.normal(0, 0.1, model.fc.kernel.shape).astype("float32"))
        paths[name] = save_lora_state(model, str(root / name))
    return paths


def weighted_values(states, weights) -> dict[str, np.ndarray]:
    """``sum_i w_i v_i`` in float64 of every bias and extra variable."""
    keys = [k for k, v in states[0].config.variables.items() if v.kind != "lora"]
    return {
        key: sum(
            w * s.tensors[key].astype(np.float64) for w, s in zip(weights, states, strict=True)
        )
        for key in keys
    }


@pytest.mark.parametrize("method, rank", [("cat", None), ("linear", None), ("svd", 4)])
def test_differing_biases_and_heads_are_combined_as_their_weighted_sum(
    trained_heads, tmp_path, method, rank
):
    weights = [0.3, 0.7]
    paths = [trained_heads["h1"], trained_heads["h2"]]
    inputs = read(*paths)
    out = combine_adapters(paths, weights, str(tmp_path / method), method, rank)
    combined = read_lora_state(out)
    expected = weighted_values(inputs, weights)
    kinds = {combined.config.variables[key].kind for key in expected}
    assert kinds == {"bias", "extra"} and "fc/kernel" in expected
    for key, want in expected.items():
        assert not np.array_equal(inputs[0].tensors[key], inputs[1].tensors[key]), key
        assert combined.tensors[key].dtype == np.float32
        np.testing.assert_allclose(combined.tensors[key], want, rtol=1e-6, atol=1e-7)
    assert combined.config.metadata["combined"]["summed_values"] == list(expected)
    assert combined.config.saved == inputs[0].config.saved


@pytest.mark.slow
def test_a_model_loaded_with_combined_biases_and_heads_equals_the_folded_base(
    trained_heads, base_file, tmp_path, images
):
    import tfimm

    weights = [0.3, 0.7]
    paths = [trained_heads["h1"], trained_heads["h2"]]
    out = combine_adapters(paths, weights, str(tmp_path / "cat"))
    model = lora_convnext(base_file, lora_rank=4, lora_alpha=4.0, lora_train_bias="lora_only")
    assert load_lora_state(model, out).complete

    # The base with every update folded into its kernel and every saved bias and
    # head replaced by the numpy weighted sum of the inputs' values.
    inputs = read(*paths)
    folded = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    folded.load_weights(base_file)
    variables = named_variables(folded)
    for layer, delta in weighted_sum(inputs, weights).items():
        kernel = variables[f"{layer}/kernel"]
        kernel.assign((kernel.numpy().astype(np.float64) + delta).astype("float32"))
    for key, value in weighted_values(inputs, weights).items():
        variables[key].assign(value.astype("float32"))
    np.testing.assert_allclose(model(images).numpy(), folded(images).numpy(), rtol=1e-5, atol=1e-5)


def test_cli_combines_adapters_that_train_biases_and_heads(trained_heads, tmp_path):
    # Issue 21, item 9: `lora-ckpt combine OUT color size --weights 0.5 0.5 --method
    # svd --rank 4` on the demo's adapters was refused with "bias differs".
    out = str(tmp_path / "svd")
    code, printed, err = _run(
        "combine", out, trained_heads["h1"], trained_heads["h2"], "--weights", "0.5", "0.5",
        "--method", "svd", "--rank", "4",
    )  # fmt: skip
    assert code == 0 and out in printed, err
    expected = weighted_values(read(trained_heads["h1"], trained_heads["h2"]), [0.5, 0.5])
    combined = read_lora_state(out)
    for key, want in expected.items():
        np.testing.assert_allclose(combined.tensors[key], want, rtol=1e-6, atol=1e-7)


# ---- linear -----------------------------------------------------------------------------


def test_linear_combines_the_factors_as_peft_does(adapters, tmp_path):
    weights = [0.8, -0.3]
    out = combine_adapters(
        [adapters["c1"], adapters["c2"]], weights, str(tmp_path / "lin"), "linear"
    )
    inputs, combined = read(adapters["c1"], adapters["c2"]), read_lora_state(out)
    sums = weighted_sum(inputs, weights)
    for layer in sums:
        a = sum(
            math.sqrt(abs(w) * s.config.layers[layer].scaling)
            * s.tensors[f"{layer}/kernel_lora_a"].astype(np.float64)
            for w, s in zip(weights, inputs, strict=True)
        )
        b = sum(
            math.copysign(math.sqrt(abs(w) * s.config.layers[layer].scaling), w)
            * s.tensors[f"{layer}/kernel_lora_b"].astype(np.float64)
            for w, s in zip(weights, inputs, strict=True)
        )
        assert combined.config.layers[layer].rank == 2
        assert combined.config.layers[layer].scaling == 1.0
        np.testing.assert_allclose(
            combined.tensors[f"{layer}/kernel_lora_a"], a, rtol=1e-6, atol=1e-8
        )
        np.testing.assert_allclose(
            combined.tensors[f"{layer}/kernel_lora_b"], b, rtol=1e-6, atol=1e-8
        )
        # The cross terms: linear is not the weighted sum of the updates.
        assert not np.allclose(product(combined, layer), sums[layer], atol=1e-4)


def test_linear_refuses_unequal_ranks(adapters, tmp_path, monkeypatch):
    with (
        tensors_unread(monkeypatch),
        pytest.raises(LoRAConfigError, match=r"stages/0/blocks/0/mlp/fc1 has ranks .*2.*3"),
    ):
        combine_adapters([adapters["a"], adapters["b"]], [1, 1], str(tmp_path / "x"), "linear")
    assert not os.path.exists(tmp_path / "x")


# ---- svd --------------------------------------------------------------------------------


def test_svd_reports_its_error_and_is_exact_at_full_rank(adapters, tmp_path, caplog):
    weights = [0.7, -1.3]
    paths = [adapters["a"], adapters["b"]]
    sums = weighted_sum(read(*paths), weights)

    with caplog.at_level("INFO", logger="lora_ckpt.combine"):
        low = read_lora_state(combine_adapters(paths, weights, str(tmp_path / "r1"), "svd", 1))
    record = low.config.metadata["combined"]
    assert set(record["svd_relative_error"]) == set(sums)
    for layer, want in sums.items():
        assert low.config.layers[layer].rank == 1
        flat = want.reshape(-1, want.shape[-1])
        residual = flat - product(low, layer).reshape(flat.shape)
        expected = np.linalg.norm(residual) / np.linalg.norm(flat)
        assert record["svd_relative_error"][layer] == pytest.approx(expected, rel=1e-9)
        assert 0.05 < expected < 1  # a rank-1 cut of a rank-5 sum loses something
    assert record["max_svd_relative_error"] == max(record["svd_relative_error"].values())
    assert f"{record['max_svd_relative_error']:.3g}" in caplog.text

    full = read_lora_state(combine_adapters(paths, weights, str(tmp_path / "r5"), "svd", 5))
    # The head has LoRA in b only (rank 3): its sum has rank 3, and no zero factors
    # pad it to 5; the MLP layers hold the sum's rank 5.
    assert full.config.layers["fc"].rank == 3
    assert full.config.layers["stages/0/blocks/0/mlp/fc1"].rank == 5
    record = full.config.metadata["combined"]
    assert (record["rank"], record["requested_rank"]) == (5, 5)
    assert record["max_svd_relative_error"] < 1e-6
    for layer, want in sums.items():
        np.testing.assert_allclose(product(full, layer), want, rtol=1e-6, atol=1e-7)
        # Even the tiny error of writing the factors in float32 is what numpy finds.
        flat = want.reshape(-1, want.shape[-1])
        residual = flat - product(full, layer).reshape(flat.shape)
        expected = np.linalg.norm(residual) / np.linalg.norm(flat)
        assert 0 < expected < 1e-6
        assert record["svd_relative_error"][layer] == pytest.approx(expected, rel=1e-3)


def handmade(path, template, factors, metadata=None):
    """An adapter of ``template``'s base holding only ``factors`` (layer -> (A, B))."""
    layers, variables, tensors = {}, {}, {}
    for layer, (a, b) in factors.items():
        rank = b.shape[0]
        layers[layer] = LayerRecord("LoRADense", rank, float(rank), 1.0)
        for name, value in (("kernel_lora_a", a), ("kernel_lora_b", b)):
            variables[f"{layer}/{name}"] = VariableRecord(value.shape, value.dtype.name, "lora")
            tensors[f"{layer}/{name}"] = value
    config = dataclasses.replace(
        template.config, layers=layers, variables=variables, files={}, metadata=metadata or {}
    )
    return write_lora_state(path, config, tensors)


def test_svd_works_on_the_factors_never_on_the_full_update(adapters, tmp_path):
    # A rank-1 [20000, 20000] layer: 160 KB of factors, a 3.2 GB float64 update.
    n = 20000
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, 1)).astype("float32")
    b = rng.normal(size=(1, n)).astype("float32")
    template = read_lora_state(adapters["a"])
    wide = handmade(str(tmp_path / "wide"), template, {"wide": (a, b)})
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        started = time.perf_counter()
        out = combine_adapters([wide, wide], [0.5, 1.5], str(tmp_path / "svd"), "svd", 8)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20, f"peak {peak >> 20} MiB"
    assert seconds < 10
    combined = read_lora_state(out)
    # Rank 8 is clamped to the sum of the inputs' ranks, 1 + 1: nothing is padded.
    assert combined.config.layers["wide"].rank == 2
    assert combined.config.metadata["combined"]["rank"] == 2
    assert combined.config.metadata["combined"]["requested_rank"] == 8
    got_a = combined.tensors["wide/kernel_lora_a"].astype(np.float64)
    got_b = combined.tensors["wide/kernel_lora_b"].astype(np.float64)
    # A @ B = 2 a b (of rank 1), checked on the factors: the direction and the scale.
    direction = got_a[:, 0] / np.linalg.norm(got_a[:, 0])
    np.testing.assert_allclose(np.abs(direction), np.abs(a[:, 0]) / np.linalg.norm(a), atol=1e-6)
    scale = np.linalg.norm(got_a[:, 0]) * np.linalg.norm(got_b[0])
    assert scale == pytest.approx(2 * np.linalg.norm(a) * np.linalg.norm(b), rel=1e-5)
    assert np.linalg.norm(got_a[:, 1]) * np.linalg.norm(got_b[1]) < 1e-6 * scale
    assert combined.config.metadata["combined"]["max_svd_relative_error"] < 1e-6


def test_svd_rank_is_clamped_to_the_sum_of_the_ranks(adapters, tmp_path):
    paths = [adapters["a"], adapters["b"]]  # ranks 2 and 3; the head only in b
    out = combine_adapters(paths, [0.7, -1.3], str(tmp_path / "svd"), "svd", np.int64(3000))
    combined = read_lora_state(out)
    assert combined.config.layers["fc"].rank == 3
    assert combined.config.layers["stages/0/blocks/0/mlp/fc1"].rank == 5
    record = combined.config.metadata["combined"]
    assert (record["rank"], record["requested_rank"]) == (5, 3000)
    assert type(record["requested_rank"]) is int
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    assert size < 2 * sum(os.path.getsize(os.path.join(p, n)) for p in paths for n in os.listdir(p))
    # A numpy integer rank is used as the int it is (it once broke the metadata's JSON).
    small = combine_adapters(paths, [1, 1], str(tmp_path / "np"), "svd", np.int64(2))
    assert read_lora_state(small).config.metadata["combined"]["requested_rank"] == 2


# ---- refusals ---------------------------------------------------------------------------


@contextlib.contextmanager
def tensors_unread(monkeypatch):
    """Fails the test if combine_adapters reads an input's tensors: what the configs
    alone refuse is refused first (40000 inputs were once all read, 25 s and 1.4 GB,
    before their rank sum was refused)."""

    def refuse(path):
        raise AssertionError(f"the tensors of {path} were read before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr(combine_module, "read_lora_state", refuse)
        yield


def _edited_copy(source, target, edit):
    shutil.copytree(source, target)
    config_path = os.path.join(target, "adapter_config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    edit(config)
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    return str(target)


def test_adapters_of_other_bases_are_refused(adapters, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    with (
        tensors_unread(monkeypatch),
        pytest.raises(BaseModelMismatchError, match="other base weights"),
    ):
        combine_adapters([adapters["a"], adapters["other_base"]], [1, 1], out)

    def other_width(config):
        config["base_model"]["config"]["embed_dim"] = [8, 24]

    wider = _edited_copy(adapters["a"], tmp_path / "wider", other_width)
    with (
        tensors_unread(monkeypatch),
        pytest.raises(AdapterMismatchError, match="embed_dim|config") as caught,
    ):
        combine_adapters([adapters["a"], wider], [1, 1], out)
    assert not isinstance(caught.value, BaseModelMismatchError)
    assert not os.path.exists(out)


def test_dora_adapters_are_refused(adapters, tmp_path, monkeypatch):
    # DoRA layers are still being built (lora_ckpt.layers): this DoRA adapter is
    # made by hand, a copy of `a` whose first layer gets a lora_magnitude.
    state = read_lora_state(adapters["a"])
    config, tensors = state.config, dict(state.tensors)
    layer = sorted(config.layers)[0]
    record = config.layers[layer]
    config.layers[layer] = LayerRecord(
        record.type, record.rank, record.alpha, record.scaling, dora=True
    )
    out_width = tensors[f"{layer}/kernel_lora_b"].shape[1]
    tensors[f"{layer}/lora_magnitude"] = np.ones(out_width, "float32")
    config.variables[f"{layer}/lora_magnitude"] = VariableRecord((out_width,), "float32", "lora")
    dora = write_lora_state(str(tmp_path / "dora"), config, tensors)
    assert read_lora_state(dora).config.layers[layer].dora

    with tensors_unread(monkeypatch), pytest.raises(LoRAConfigError, match=f"DoRA.*{layer}"):
        combine_adapters([adapters["a"], dora], [1, 1], str(tmp_path / "out"))


def test_biases_and_extra_layers_saved_by_some_inputs_only_are_refused(
    adapters, tmp_path, monkeypatch
):
    # Where `a` saved no head, the base's head applies, which combine cannot read.
    out = str(tmp_path / "out")
    with (
        tensors_unread(monkeypatch),
        pytest.raises(LoRAConfigError, match="fc/.* is saved in .*c1 but not in .*a"),
    ):
        combine_adapters([adapters["a"], adapters["c1"]], [1, 1], out)
    assert not os.path.exists(out)


def test_a_differing_extra_layer_is_the_weighted_sum_and_an_identical_one_a_copy(
    adapters, tmp_path, caplog
):
    # c1 and c3 share fc/bias byte for byte; their fc/kernel differs.
    weights = [0.25, 1.5]
    with caplog.at_level("WARNING", logger="lora_ckpt.combine"):
        out = combine_adapters([adapters["c1"], adapters["c3"]], weights, str(tmp_path / "out"))
    # Weights adding up to 1.75 scale the summed head rather than average it: said.
    assert "add up to 1.75" in caplog.text and "fc/kernel" in caplog.text
    first, third = read(adapters["c1"], adapters["c3"])
    combined = read_lora_state(out)
    want = sum(
        w * s.tensors["fc/kernel"].astype(np.float64)
        for w, s in zip(weights, (first, third), strict=True)
    )
    np.testing.assert_allclose(combined.tensors["fc/kernel"], want, rtol=1e-6, atol=1e-7)
    assert combined.tensors["fc/bias"].tobytes() == first.tensors["fc/bias"].tobytes()
    assert combined.config.metadata["combined"]["summed_values"] == ["fc/kernel"]


def test_heads_of_different_widths_are_refused(adapters, tmp_path, monkeypatch):
    # Heads for 4 and 5 classes under one recorded base config: a model whose
    # config does not hold the head's width (any tf_keras model) can save such
    # adapters. Made here by hand from c1, its head one class wider.
    state = read_lora_state(adapters["c1"])
    config, tensors = state.config, dict(state.tensors)
    for key in ("fc/kernel", "fc/bias"):
        wider = np.concatenate([tensors[key], tensors[key][..., :1]], axis=-1)
        tensors[key] = wider
        config.variables[key] = VariableRecord(wider.shape, "float32", "extra")
    wide = write_lora_state(str(tmp_path / "wide"), config, tensors)
    out = str(tmp_path / "out")
    with (
        tensors_unread(monkeypatch),
        pytest.raises(
            AdapterMismatchError, match=r"fc/kernel \(extra\) is \[.*, 4\] in .*c1 but \[.*, 5\]"
        ),
    ):
        combine_adapters([adapters["c1"], wide], [0.5, 0.5], out)
    assert not os.path.exists(out)


def test_inputs_of_different_dtypes_are_refused(adapters, tmp_path, monkeypatch):
    state = read_lora_state(adapters["a"])
    config = state.config
    config.variables = {
        k: VariableRecord(v.shape, "float16", v.kind) for k, v in config.variables.items()
    }
    half = write_lora_state(
        str(tmp_path / "half"), config, {k: t.astype("float16") for k, t in state.tensors.items()}
    )
    with tensors_unread(monkeypatch), pytest.raises(LoRAConfigError, match="dtypes"):
        combine_adapters([adapters["a"], half], [1, 1], str(tmp_path / "out"))
    # One dtype in, the same dtype out.
    same = read_lora_state(combine_adapters([half, half], [0.5, 0.5], str(tmp_path / "h")))
    assert {v.dtype for v in same.config.variables.values()} == {"float16"}


def cyclic():
    document = {}
    document["self"] = document
    return document


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (([], []), {}, "at least one"),
        (("A", [1.0]), {}, "list of adapter paths"),
        ((["A", "B"], [1.0]), {}, "1 weights for 2 adapters"),
        ((["A"], [float("nan")]), {}, r"weights\[0\] must be finite"),
        ((["A"], [float("inf")]), {}, "finite"),
        ((["A"], [10**400]), {}, "finite"),  # an int beyond float: no raw OverflowError
        ((["A"] * (MAX_INPUTS + 1), [1.0] * (MAX_INPUTS + 1)), {}, f"at most {MAX_INPUTS}"),
        ((["A"], ["1"]), {}, "must be a number"),
        ((["A"], [1.0]), {"method": "sum"}, "Unknown combination method"),
        ((["A"], [1.0]), {"method": "svd"}, "needs rank"),
        ((["A"], [1.0]), {"method": "svd", "rank": 0}, "positive integer"),
        ((["A"], [1.0]), {"method": "svd", "rank": 2.5}, "positive integer"),
        ((["A"], [1.0]), {"method": "svd", "rank": MAX_RANK + 1}, "limit"),
        ((["A"], [1.0]), {"method": "cat", "rank": 4}, "only to method='svd'"),
        ((["A"], [1.0]), {"metadata": {"combined": 1}}, "combined"),
        ((["A"], [1.0]), {"metadata": {"x": object()}}, "JSON"),
        ((["A"], [1.0]), {"metadata": ["x"]}, "must be a dict"),
        ((["A"], [1.0]), {"metadata": cyclic()}, "JSON"),
        ((["A"], [1.0]), {"metadata": {"x": "y" * (16 << 20)}}, "bytes"),
    ],
)
def test_bad_arguments_are_refused(adapters, tmp_path, monkeypatch, args, kwargs, message):
    paths, weights = args
    paths = adapters["a"] if paths == "A" else [adapters["a"] for _ in paths]
    with tensors_unread(monkeypatch), pytest.raises(LoRAConfigError, match=message):
        combine_adapters(paths, weights, str(tmp_path / "out"), **kwargs)
    assert not os.path.exists(tmp_path / "out")


def test_a_cat_rank_above_the_format_limit_is_refused_from_the_configs(
    adapters, tmp_path, monkeypatch
):
    rank = MAX_RANK // 2 + 1
    template = read_lora_state(adapters["a"])
    factors = {"tall": (np.ones((1, rank), "float32"), np.ones((rank, 1), "float32"))}
    tall = handmade(str(tmp_path / "tall"), template, factors)
    with tensors_unread(monkeypatch), pytest.raises(LoRAConfigError, match=f"rank {2 * rank}"):
        combine_adapters([tall, tall], [1, 1], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_an_input_replaced_after_its_config_was_checked_is_checked_again(
    adapters, tmp_path, monkeypatch
):
    # Between the config-only checks and the full read, the second input's path
    # came to hold an adapter of another base.
    real = combine_module.read_lora_state
    second = str(shutil.copytree(adapters["a"], tmp_path / "second"))

    def replaced(path):
        state = real(adapters["other_base"] if path == second else path)
        return dataclasses.replace(state, path=path)

    monkeypatch.setattr(combine_module, "read_lora_state", replaced)
    with pytest.raises(BaseModelMismatchError, match="other base weights"):
        combine_adapters([adapters["a"], second], [1, 1], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def nested(levels, leaf=0):
    """A JSON value ``levels`` dicts deep around ``leaf``."""
    for _ in range(levels):
        leaf = {"k": leaf}
    return leaf


@pytest.mark.slow
def test_metadata_that_would_make_the_config_unreadable_is_refused(adapters, tmp_path):
    # The config holds metadata one level down, so metadata may nest 31 levels
    # (30 dicts and their leaf) for a config of 32, the readers' limit.
    existing = combine_adapters([adapters["a"]], [1.0], str(tmp_path / "out"))
    before = read_lora_state(existing).config.json_sha256
    deepest = combine_adapters(
        [adapters["a"]], [1.0], str(tmp_path / "deepest"), metadata={"x": nested(29)}
    )
    assert read_lora_state(deepest).config.metadata["x"] == nested(29)
    too_deep = {"x": nested(30)}
    with pytest.raises(LoRAConfigError, match="nested"):
        combine_adapters([adapters["a"]], [2.0], existing, overwrite=True, metadata=too_deep)
    # Small as JSON, above 16 MiB once indented in the config: refused before the write.
    wide = {"x": nested(25, [0] * 300_000)}
    with pytest.raises(LoRAConfigError, match="bytes"):
        combine_adapters([adapters["a"]], [2.0], existing, overwrite=True, metadata=wide)
    with pytest.raises(LoRAConfigError, match="nested"):
        combine_adapters([adapters["a"]], [2.0], existing, overwrite=True, metadata=nested(5000))
    # The adapter that was there is untouched, and no work directory is left beside it.
    assert read_lora_state(existing).config.json_sha256 == before
    assert sorted(os.listdir(tmp_path)) == ["deepest", "out"]


@pytest.mark.parametrize("name", ["out.tmp-1a2b3c4d", "out.old-1a2b3c4d", "x.tmp-y"])
def test_an_output_named_like_a_work_directory_is_refused(adapters, tmp_path, monkeypatch, name):
    # A save's NAME.tmp-* and NAME.old-* siblings are removed by the next save of
    # NAME and by `lora-ckpt gc`: an adapter written there would be lost.
    existing = combine_adapters([adapters["a"]], [1.0], str(tmp_path / "out"))
    with tensors_unread(monkeypatch), pytest.raises(LoRAConfigError, match="work directory"):
        combine_adapters([adapters["a"]], [2.0], str(tmp_path / name))
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert read_lora_state(existing).config.metadata["combined"]["weights"] == [1.0]


def test_existing_output_and_inputs_as_output(adapters, tmp_path):
    existing = str(tmp_path / "existing")
    combine_adapters([adapters["a"]], [1.0], existing)
    with pytest.raises(AdapterExistsError, match="already exists"):
        combine_adapters([adapters["a"]], [2.0], existing)
    combine_adapters([adapters["a"]], [2.0], existing, overwrite=True)
    assert read_lora_state(existing).config.metadata["combined"]["weights"] == [2.0]

    source = shutil.copytree(adapters["a"], tmp_path / "source")
    with pytest.raises(AdapterExistsError, match="one of the inputs"):
        combine_adapters([str(source), adapters["a"]], [1, 1], str(source) + "/")
    expected = weighted_sum(read(str(source), adapters["a"]), [0.5, 0.5])
    combine_adapters([str(source), adapters["a"]], [0.5, 0.5], str(source), overwrite=True)
    replaced = read_lora_state(str(source))
    for layer, want in expected.items():
        np.testing.assert_allclose(product(replaced, layer), want, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_labels_are_kept_when_all_inputs_agree_and_ram_paths_work(base_file, tmp_path):
    model = lora_convnext(base_file, lora_train_classifier=False)
    randomize_lora(model, seed=11)
    labels = ["a", "b", "c", "d"]
    first = save_lora_state(model, "memory://combine/first", labels=labels)
    second = save_lora_state(model, "memory://combine/second", labels=labels)
    other = save_lora_state(model, str(tmp_path / "other"), labels=list("wxyz"))
    out = combine_adapters([first, second], [1, 1], "memory://combine/out", metadata={"task": "t"})
    metadata = read_lora_state(out).config.metadata
    assert metadata["labels"] == labels and metadata["task"] == "t"
    out = combine_adapters([first, other], [1, 1], str(tmp_path / "mixed"))
    assert "labels" not in read_lora_state(out).config.metadata


# ---- the command ------------------------------------------------------------------------


def _run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_cli_combine(adapters, tmp_path):
    out = str(tmp_path / "svd")
    code, printed, _ = _run(
        "combine", out, adapters["c1"], adapters["c2"], "--weights", "0.5", "0.5",
        "--method", "svd", "--rank", "2",
    )  # fmt: skip
    assert code == 0 and out in printed
    error = read_lora_state(out).config.metadata["combined"]["max_svd_relative_error"]
    assert f"max relative error {error:.3g}" in printed

    code, printed, _ = _run("combine", str(tmp_path / "cat"), adapters["c1"], "--weights", "2")
    assert code == 0 and str(tmp_path / "cat") in printed

    code, _, err = _run(
        "combine", str(tmp_path / "bad"), adapters["a"], adapters["b"], "--weights", "1"
    )
    assert code == 1 and "1 weights for 2 adapters" in err
    code, _, err = _run(
        "combine", str(tmp_path / "bad"), adapters["a"], adapters["b"],
        "--weights", "1", "1", "--method", "linear",
    )  # fmt: skip
    assert code == 1 and "lora-ckpt combine:" in err and "ranks" in err
    assert not os.path.exists(tmp_path / "bad")


@pytest.mark.slow
def test_object_store_inputs_and_output(adapters, tmp_path, monkeypatch):
    pytest.importorskip("s3fs", reason="needs the scale extra: pip install 'lora_ckpt[scale]'")
    pytest.importorskip("moto", reason="needs the scale extra: pip install 'lora_ckpt[scale]'")
    from lora_ckpt.serving.store import copy_adapter
    from lora_ckpt.storage import CACHE_ENV

    from .helpers.scale import moto_s3

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with moto_s3():
        remote = "s3://lora/adapters/c1"
        copy_adapter(adapters["c1"], remote)
        out = combine_adapters([remote, adapters["c2"]], [0.5, 0.5], "s3://lora/adapters/sum")
        expected = weighted_sum(read(adapters["c1"], adapters["c2"]), [0.5, 0.5])
        combined = read_lora_state(out)
        for layer, want in expected.items():
            np.testing.assert_allclose(product(combined, layer), want, rtol=1e-6, atol=1e-8)
        with pytest.raises(AdapterExistsError):
            combine_adapters([remote], [1.0], out)
