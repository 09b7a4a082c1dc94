"""AdapterPool with PEFT's LoRA variants: DoRA adapters (a per-slot output scale
computed at load), rsLoRA scaling and per-layer ranks, served on one plain
LoRA base per request and in mixed batches, merged and unmerged, and the fit
check that accepts them in a pool and explains them outside one."""

import hashlib

import numpy as np
import pytest
import tfimm

import lora_ckpt
from lora_ckpt import AdapterPool, load_lora_state, read_lora_state, save_lora_state, tf
from lora_ckpt.errors import AdapterMismatchError, LoRAError
from lora_ckpt.layers import LORA_LAYER_ARGS, LoRAConv2D, LoRADense, convert_to_lora_layer
from lora_ckpt.serving.slots import LoRASlots
from lora_ckpt.state import ModelSignature, check_fit, read_config
from lora_ckpt.state.fit import SlotLimits
from lora_ckpt.state.format import (
    CHECKPOINT_PREFIX,
    CHECKPOINT_ROOT,
    CONFIG_FILE,
    FileRecord,
    VariableRecord,
    checkpoint_files,
    nest_variables,
)

from . import numpy_reference as ref
from .conftest import TINY_CONVNEXT, emptied

MAX_RANK = 6
TOL = dict(rtol=1e-5, atol=1e-5)


# ---- building LoRA variants -------------------------------------------------------------


def _owner(model, path):
    owner = model
    for part in path.split("/")[:-1]:
        owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
    return owner


def replace_lora_layers(model, paths, **settings):
    """Rebuilds the LoRA layers at ``paths`` with other LoRA ``settings`` (DoRA
    on some layers only, say), keeping their kernels and biases."""
    for path, layer in lora_ckpt.lora_layers(model):
        if path not in paths:
            continue
        config = {k: v for k, v in layer.get_config().items() if k not in LORA_LAYER_ARGS}
        base = type(layer).base_layer_class.from_config(config)
        base.build((None, layer.kernel.shape[0]))
        base.set_weights([layer.kernel.numpy(), layer.bias.numpy()])
        new = convert_to_lora_layer(base, lora_freeze_base=True, **settings)
        setattr(_owner(model, path), path.rsplit("/", 1)[-1], new)
    return model


def randomize(model, seed):
    """Non-zero A, B, LoRA biases and DoRA magnitudes (around the column norms)."""
    rng = np.random.default_rng(seed)
    for _, layer in lora_ckpt.lora_layers(model):
        for var in (layer.kernel_lora_a, layer.kernel_lora_b, layer.bias):
            var.assign(rng.normal(0, 0.3, var.shape).astype("float32"))
        if layer.lora_magnitude is not None:
            factor = rng.uniform(0.5, 1.5, layer.lora_magnitude.shape)
            layer.lora_magnitude.assign((layer.lora_magnitude.numpy() * factor).astype("float32"))


def convnext(base_file, **lora):
    model = lora_ckpt.create_model(
        "convnext_tiny",
        lora_train_bias="lora_only",
        lora_train_classifier=False,
        **{"lora_rank": 2, **lora},
        **TINY_CONVNEXT,
    )
    lora_ckpt.load_base_weights(model, base_file)
    return model


def dora_on_fc1_only(base_file):
    """DoRA and rsLoRA at rank 5 on the fc1 layers, plain rank-1 LoRA on fc2:
    one adapter that mixes kinds per layer (as a user's own conversion may)."""
    model = convnext(base_file, lora_rank=1)
    fc1 = [path for path, _ in lora_ckpt.lora_layers(model) if path.endswith("fc1")]
    return replace_lora_layers(
        model, fc1, lora_rank=5, lora_alpha=2.0, lora_use_dora=True, lora_use_rslora=True
    )


# The create_model arguments of each adapter's model.
CONVNEXT_ADAPTERS = {
    "dora": dict(lora_rank=3, lora_alpha=2.0, lora_use_dora=True),
    "rslora": dict(lora_rank=4, lora_alpha=4.0, lora_use_rslora=True),
    "pattern": dict(lora_rank=6, lora_rank_pattern={"fc1": 2}, lora_alpha_pattern={"fc1": 3.0}),
    "plain": dict(lora_rank=2, lora_alpha=2.0),
}


@pytest.fixture(scope="module")
def peft(tmp_path_factory):
    """Five adapters of different kinds on one tiny ConvNeXt base, with the
    outputs of the models they were saved from."""
    directory = tmp_path_factory.mktemp("peft")
    tf.keras.utils.set_random_seed(11)
    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    base_file = str(directory / "base.h5")
    regular.save_weights(base_file)
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype("float32")
    paths, reference = {}, {"off": regular(x).numpy()}
    models = {name: convnext(base_file, **lora) for name, lora in CONVNEXT_ADAPTERS.items()}
    models["dora_fc1"] = dora_on_fc1_only(base_file)
    for i, (name, model) in enumerate(models.items()):
        randomize(model, seed=i)
        paths[name] = save_lora_state(model, str(directory / name))
        reference[name] = model(x).numpy()
    return {"base": base_file, "paths": paths, "reference": reference, "x": x, "dir": directory}


@pytest.fixture(scope="module")
def shared_pool(peft):
    return AdapterPool(convnext(peft["base"], lora_rank=MAX_RANK), capacity=4, max_rank=MAX_RANK)


@pytest.fixture
def pool(shared_pool):
    """The module's pool, emptied."""
    return emptied(shared_pool)


def slot_snapshot(pool):
    return [v.numpy().copy() for v in pool._layers.slot_variables]


# ---- the Done-when ------------------------------------------------------------------


@pytest.mark.slow
def test_mixed_batch_of_dora_rslora_and_rank_pattern_adapters_equals_their_models(pool, peft):
    x, reference = peft["x"], peft["reference"]
    adapters = ["dora", "rslora", "pattern", "dora_fc1"]
    kinds = {  # per layer: (rank, DoRA, rsLoRA), as the adapters recorded them
        name: {
            (r.rank, r.dora, r.rslora) for r in read_config(peft["paths"][name])[1].layers.values()
        }
        for name in adapters
    }
    assert kinds == {
        "dora": {(3, True, False)},
        "rslora": {(4, False, True)},
        "pattern": {(2, False, False), (6, False, False)},
        "dora_fc1": {(5, True, True), (1, False, False)},
    }
    for name in adapters:
        pool.load(name, peft["paths"][name])
    names = ["dora", "rslora", "pattern", "off", "dora_fc1", "dora"]
    mixed = pool.predict(x, adapters=names)
    for i, name in enumerate(names):
        np.testing.assert_allclose(mixed[i], reference[name][i], **TOL, err_msg=name)
    for name in adapters:  # per request: a batch, and a single sample
        np.testing.assert_allclose(pool.predict(x, adapter=name), reference[name], **TOL)
        np.testing.assert_allclose(pool.predict(x[2:3], adapter=name), reference[name][2:3], **TOL)
    # DoRA changes the output: the scale is applied, not ignored.
    assert not np.allclose(reference["dora"], reference["off"], **TOL)
    assert pool.trace_count == 3  # DoRA adapters load without retracing


@pytest.mark.slow
def test_dora_merge_gives_the_same_outputs_and_unmerge_restores_bitwise(pool, peft):
    x = peft["x"]
    pool.load("dora", peft["paths"]["dora"])
    pool.load("rslora", peft["paths"]["rslora"])
    layers = [layer for _, layer in lora_ckpt.lora_layers(pool.model)]
    kernels = [layer.kernel.numpy().copy() for layer in layers]
    biases = [layer.bias.numpy().copy() for layer in layers]
    unmerged = pool.predict(x, adapter="dora")
    for _ in range(2):
        pool.merge("dora")
        assert all(
            not np.array_equal(layer.kernel.numpy(), kernel)
            for layer, kernel in zip(layers, kernels, strict=True)
        )
        merged = pool.predict(x, adapter="dora")
        np.testing.assert_allclose(merged, peft["reference"]["dora"], **TOL)
        np.testing.assert_allclose(merged, unmerged, **TOL)
        pool.unmerge()
        for layer, kernel, bias in zip(layers, kernels, biases, strict=True):
            np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
            np.testing.assert_array_equal(layer.bias.numpy(), bias)
        np.testing.assert_array_equal(pool.predict(x, adapter="dora"), unmerged)
    np.testing.assert_allclose(
        pool.predict(x, adapter="rslora"), peft["reference"]["rslora"], **TOL
    )


@pytest.mark.slow
def test_dora_output_scale_is_computed_from_the_base_kernel_while_merged(pool, peft):
    # Without the base check an adapter loads while another is merged: its DoRA
    # scale must come from the base kernel, not from the merged one.
    pool.load("rslora", peft["paths"]["rslora"])
    pool.merge("rslora")
    pool.check_base = False
    try:
        pool.load("dora", peft["paths"]["dora"])
    finally:
        pool.check_base = True
    pool.unmerge()
    np.testing.assert_allclose(
        pool.predict(peft["x"], adapter="dora"), peft["reference"]["dora"], **TOL
    )


def test_a_dora_adapter_loads_with_the_base_check_while_another_is_merged(pool, peft):
    # DoRA's magnitudes make its variable set new to the pool: its base
    # fingerprint is computed while merged, from the kept base kernels.
    pool.load("rslora", peft["paths"]["rslora"])
    pool.merge("rslora")
    merged = pool.predict(peft["x"], adapter="rslora")
    pool.load("dora", peft["paths"]["dora"])
    np.testing.assert_array_equal(pool.predict(peft["x"], adapter="rslora"), merged)
    pool.unmerge()
    np.testing.assert_allclose(
        pool.predict(peft["x"], adapter="dora"), peft["reference"]["dora"], **TOL
    )


@pytest.mark.slow
def test_a_freed_dora_slot_no_longer_scales(pool, peft):
    x, reference = peft["x"], peft["reference"]
    slot = pool.load("dora", peft["paths"]["dora"])
    g = {path: slots.g for path, slots in pool._lora.items()}
    assert any(not np.all(v[slot].numpy() == 1) for v in g.values())
    pool.unload("dora")
    assert all(np.all(v[slot].numpy() == 1) for v in g.values()), "a freed slot keeps its scale"

    # Evicted: the plain adapter that takes its slot computes its own model.
    assert pool.load("dora", peft["paths"]["dora"]) == slot
    for name in ["rslora", "pattern", "dora_fc1"]:  # capacity 4: now full, "dora" least used
        pool.load(name, peft["paths"][name])
    assert pool.load("plain", peft["paths"]["plain"]) == slot
    assert "dora" not in pool.names()
    assert all(np.all(v[slot].numpy() == 1) for v in g.values())
    np.testing.assert_allclose(pool.predict(x, adapter="plain"), reference["plain"], **TOL)
    mixed = pool.predict(x[:3], adapters=["plain", "dora_fc1", "plain"])
    np.testing.assert_allclose(mixed[[0, 2]], reference["plain"][[0, 2]], **TOL)
    np.testing.assert_allclose(mixed[1], reference["dora_fc1"][1], **TOL)


# ---- refused adapters ---------------------------------------------------------------------------


def file_record(path):
    """Size and SHA-256 of a file, as an adapter config records them (hashlib)."""
    with open(path, "rb") as handle:
        data = handle.read()
    return FileRecord(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def rewrite_adapter(source, target, edit):
    """Writes a copy of an adapter after ``edit(config, tensors)``, with valid
    file records: what a buggy or hostile writer could produce."""
    state = read_lora_state(source)
    config, tensors = state.config, dict(state.tensors)
    edit(config, tensors)
    tf.io.gfile.makedirs(target)
    variables = {k: tf.Variable(v) for k, v in tensors.items()}
    tf.train.Checkpoint(**{CHECKPOINT_ROOT: nest_variables(variables)}).write(
        f"{target}/{CHECKPOINT_PREFIX}"
    )
    config.checkpoint_prefix = CHECKPOINT_PREFIX
    config.files = {n: file_record(f"{target}/{n}") for n in checkpoint_files(CHECKPOINT_PREFIX)}
    with tf.io.gfile.GFile(f"{target}/{CONFIG_FILE}", "w") as handle:
        handle.write(config.to_json())
    return target


MAGNITUDE = "stages/1/blocks/0/mlp/fc2/lora_magnitude"


def _longer_magnitude(config, tensors):
    tensors[MAGNITUDE] = np.ones(tensors[MAGNITUDE].shape[0] + 1, "float32")
    config.variables[MAGNITUDE] = VariableRecord(tensors[MAGNITUDE].shape, "float32", "lora")


def _float16_magnitude(config, tensors):
    tensors[MAGNITUDE] = tensors[MAGNITUDE].astype("float16")
    config.variables[MAGNITUDE] = VariableRecord(tensors[MAGNITUDE].shape, "float16", "lora")


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, message",
    [
        (_longer_magnitude, "lora_magnitude of shape"),
        (_float16_magnitude, "DoRA magnitude float16"),
    ],
)
def test_a_dora_magnitude_that_does_not_fit_is_refused_and_the_pool_is_unchanged(
    pool, peft, tmp_path, edit, message
):
    pool.load("rslora", peft["paths"]["rslora"])
    expected = pool.predict(peft["x"], adapter="rslora")
    before = slot_snapshot(pool)
    bad = rewrite_adapter(peft["paths"]["dora"], str(tmp_path / "bad"), edit)
    with pytest.raises(LoRAError, match=message):
        pool.load("bad", bad)
    assert pool.names() == ["rslora"]
    for value, now in zip(before, slot_snapshot(pool), strict=True):
        np.testing.assert_array_equal(value, now)
    np.testing.assert_array_equal(pool.predict(peft["x"], adapter="rslora"), expected)


@pytest.mark.slow
def test_check_fit_in_slot_mode_checks_the_magnitude_of_each_layer(shared_pool, peft):
    signature = ModelSignature.of(shared_pool.model)
    config = read_lora_state(peft["paths"]["dora"]).config
    report = check_fit(signature, config, "dora", slots=SlotLimits(MAX_RANK))
    assert MAGNITUDE in report.loaded and report.complete
    out = config.variables[MAGNITUDE].shape[0]
    config.variables[MAGNITUDE] = VariableRecord((out - 1,), "float32", "lora")
    with pytest.raises(
        AdapterMismatchError, match=rf"{MAGNITUDE}: DoRA magnitude float32\[{out - 1}\]"
    ):
        check_fit(signature, config, "dora", slots=SlotLimits(MAX_RANK))


@pytest.mark.slow
def test_outside_a_pool_dora_and_rslora_need_a_model_of_their_kind(peft):
    paths, x = peft["paths"], peft["x"]
    plain = convnext(peft["base"], lora_rank=3)
    with pytest.raises(AdapterMismatchError, match="is DoRA .* lora_use_dora=True"):
        load_lora_state(plain, paths["dora"])
    dora_model = convnext(peft["base"], **CONVNEXT_ADAPTERS["dora"])
    with pytest.raises(AdapterMismatchError, match="plain LoRA and the model's is DoRA"):
        load_lora_state(
            dora_model, rewrite_adapter(paths["plain"], str(peft["dir"] / "p3"), _rank3)
        )
    rank4_alpha4 = convnext(peft["base"], lora_rank=4, lora_alpha=4.0)
    with pytest.raises(AdapterMismatchError, match=r"rsLoRA alpha/sqrt\(rank\)\) vs model 1.0"):
        load_lora_state(rank4_alpha4, paths["rslora"])
    load_lora_state(dora_model, paths["dora"])
    np.testing.assert_allclose(dora_model(x).numpy(), peft["reference"]["dora"], **TOL)


def _rank3(config, tensors):
    """A plain rank-3, alpha-2 copy of the rank-2 plain adapter (zero-padded)."""
    for path, record in list(config.layers.items()):
        a, b = tensors[f"{path}/kernel_lora_a"], tensors[f"{path}/kernel_lora_b"]
        tensors[f"{path}/kernel_lora_a"] = np.concatenate([a, np.zeros_like(a[:, :1])], 1)
        tensors[f"{path}/kernel_lora_b"] = np.concatenate([b, np.zeros_like(b[:1])], 0)
        for key in (f"{path}/kernel_lora_a", f"{path}/kernel_lora_b"):
            config.variables[key] = VariableRecord(tensors[key].shape, "float32", "lora")
        config.layers[path] = type(record)(record.type, 3, 2.0, 2.0 / 3)


# ---- every forward path, Conv2D and Dense, against numpy ------------------------------------------


def conv_net(settings):
    """Conv2D 3x3 stride 2, Conv2D 1x1 and Dense LoRA layers with ``settings(name)``,
    on a base of seeded initialisers (every variant shares it)."""
    init = lambda i: tf.keras.initializers.GlorotUniform(seed=i)  # noqa: E731
    bias = lambda i: tf.keras.initializers.RandomNormal(stddev=0.5, seed=10 + i)  # noqa: E731

    def args(name, i):
        return dict(
            name=name, kernel_initializer=init(i), bias_initializer=bias(i), **settings(name)
        )

    inputs = tf.keras.Input((8, 8, 3))
    h = LoRAConv2D(5, 3, strides=2, padding="same", **args("conv_a", 1))(inputs)
    h = tf.keras.layers.Activation("relu")(h)
    h = LoRAConv2D(6, 1, **args("conv_b", 2))(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    outputs = LoRADense(3, **args("fc", 3))(h)
    return tf.keras.Model(inputs, outputs)


CONV_ADAPTERS = {
    "dora": lambda n: dict(
        lora_rank={"conv_a": 1, "conv_b": 3, "fc": 2}[n],
        lora_alpha=2.0,
        lora_use_dora=n != "conv_b",
        lora_use_rslora=n == "conv_b",
    ),
    "plain": lambda n: dict(lora_rank=3, lora_alpha=1.5),
}


def numpy_forward(x, base, state):
    """The adapter's model in float64 numpy, from the base weights and the
    adapter's tensors: ``g * op(x, W0 + s A B) + bias`` with DoRA's
    ``g = magnitude / ||W0 + s A B||`` (column norms), ``g = 1`` without."""

    def layer(h, name, op):
        t = state.tensors
        record = state.config.layers[name]
        scaling = record.alpha / (np.sqrt(record.rank) if record.rslora else record.rank)
        w0 = base[f"{name}/kernel"].astype(np.float64)
        w = w0 + scaling * np.tensordot(t[f"{name}/kernel_lora_a"], t[f"{name}/kernel_lora_b"], 1)
        g = 1.0
        if record.dora:
            norms = np.sqrt((w**2).reshape(-1, w.shape[-1]).sum(0))
            g = t[f"{name}/lora_magnitude"] / norms
        return op(h, w) * g + t[f"{name}/bias"]

    h = layer(x, "conv_a", lambda h, w: ref.conv2d(h, w, strides=(2, 2), padding="same"))
    h = layer(np.maximum(h, 0), "conv_b", ref.conv2d)
    return layer(h.mean(axis=(1, 2)), "fc", ref.dense)


@pytest.mark.parametrize("updated_kernel", [True, False], ids=["kernel_path", "branch_path"])
def test_conv_and_dense_dora_on_every_forward_path_equal_numpy(
    tmp_path, monkeypatch, updated_kernel
):
    # Each layer chooses between an updated kernel and the LoRA branch by size;
    # forcing each choice while the pool traces covers both in every path.
    monkeypatch.setattr(LoRASlots, "_prefers_kernel", lambda self, x, samples: updated_kernel)
    x = np.random.default_rng(3).normal(size=(5, 8, 8, 3)).astype("float32")
    serving = conv_net(lambda n: dict(lora_rank=3))
    base = {k: v.numpy() for k, v in ModelSignature.of(serving).variables.items()}
    expected = {"off": serving(x).numpy()}
    for i, (name, settings) in enumerate(CONV_ADAPTERS.items()):
        model = conv_net(settings)
        randomize(model, seed=20 + i)
        save_lora_state(model, str(tmp_path / name), include_bias="lora_only")
        expected[name] = numpy_forward(x, base, read_lora_state(str(tmp_path / name)))
        np.testing.assert_allclose(model(x).numpy(), expected[name], **TOL)  # the layers agree
    pool = AdapterPool(serving, capacity=2)
    for name in CONV_ADAPTERS:
        pool.load(name, str(tmp_path / name))
        np.testing.assert_allclose(pool.predict(x, adapter=name), expected[name], **TOL)
        np.testing.assert_allclose(pool.predict(x[1:2], adapter=name), expected[name][1:2], **TOL)
    names = ["dora", "plain", "off", "dora", "plain"]
    mixed = pool.predict(x, adapters=names)
    for i, name in enumerate(names):
        np.testing.assert_allclose(mixed[i], expected[name][i], **TOL, err_msg=name)
    pool.merge("dora")
    np.testing.assert_allclose(pool.predict(x, adapter="dora"), expected["dora"], **TOL)
    pool.unmerge()
