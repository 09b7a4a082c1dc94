"""The partial-state subsystem: save, load, validation, base files, resume."""

import json
import os
import shutil

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import (
    load_base_weights,
    load_lora_state,
    read_lora_state,
    save_lora_state,
    tf,
)
from lora_ckpt.errors import (
    AdapterExistsError,
    AdapterMismatchError,
    AdapterNotFoundError,
    AdapterVersionError,
    BaseModelMismatchError,
    BaseWeightsError,
    CorruptAdapterError,
    LayerNotFoundError,
    LoRAConfigError,
    MergeStateError,
    TrainingCheckpointError,
)
from lora_ckpt.state import (
    AdapterCheckpoint,
    AdapterCheckpointManager,
    restore_training_checkpoint,
)
from lora_ckpt.synthetic import make_task_dataset
from lora_ckpt.traversal import named_variables

from .conftest import TINY_CONVNEXT, compile_for_task, count, randomize_lora

# The suite's tiny ConvNeXt has no stochastic depth: a resumed run repeats
# a straight one bit for bit.
TASK = TINY_CONVNEXT


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    """A 'pretrained' regular ConvNeXt saved as HDF5 and as a TF checkpoint."""
    import tfimm

    tf.keras.utils.set_random_seed(42)
    regular = tfimm.create_model("convnext_tiny", **TASK)
    rng = np.random.default_rng(0)
    for var in regular.weights:  # not the initialisation any fresh model has
        var.assign(var + rng.normal(0, 0.02, var.shape).astype("float32"))
    directory = tmp_path_factory.mktemp("base")
    regular.save_weights(str(directory / "base.h5"))
    regular.save_weights(str(directory / "ckpt" / "base"))
    return {"h5": str(directory / "base.h5"), "tf": str(directory / "ckpt" / "base")}


def lora_model_on_base(base_path, **lora_kwargs):
    model = lora_ckpt.create_model(
        "convnext_tiny", **dict(dict(lora_rank=2), **lora_kwargs), **TASK
    )
    load_base_weights(model, base_path)
    return model


def train(model, epochs=1, callbacks=(), initial_epoch=0, seed=0):
    x, y = make_task_dataset("quadrant", 64, seed=seed)
    if model.optimizer is None:
        compile_for_task(model)
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
    return model


def fine_tune(model, seed=0):
    """Stands in for training (fit is slow): moves every trainable weight, and
    only those, by random steps. Returns the keys of the moved weights."""
    rng = np.random.default_rng(seed)
    trainable = {id(v) for v in model.trainable_weights}
    moved = []
    for key, var in named_variables(model).items():
        if id(var) in trainable:
            var.assign(var + rng.normal(0, 0.1, var.shape).astype("float32"))
            moved.append(key)
    return sorted(moved)


def all_values(model):
    return {k: v.numpy().copy() for k, v in named_variables(model).items()}


def assert_unchanged(model, before):
    after = all_values(model)
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def fine_tuned_model(base_path):
    tf.keras.utils.set_random_seed(0)
    model = lora_model_on_base(base_path)
    fine_tune(model)
    return model


@pytest.fixture(scope="module")
def adapter_template(base_files, tmp_path_factory):
    """A LoRA ConvNeXt fine-tuned on the base and its adapter (with head), made once."""
    model = fine_tuned_model(base_files["h5"])
    return model, save_lora_state(model, str(tmp_path_factory.mktemp("template") / "adapter"))


@pytest.fixture
def trained_adapter(adapter_template, tmp_path):
    """The template's model, which a test must not change (use own_trained_adapter
    for that), and a fresh copy of its adapter, which a test may break."""
    model, template = adapter_template
    path = str(tmp_path / "adapter")
    shutil.copytree(template, path)
    return model, path


@pytest.fixture
def own_trained_adapter(base_files, tmp_path):
    """A fine-tuned model of the test's own, and its adapter."""
    model = fine_tuned_model(base_files["h5"])
    return model, save_lora_state(model, str(tmp_path / "adapter"))


@pytest.fixture(scope="module")
def refusing_target(base_files):
    """A LoRA model on the base with LoRA weights of its own: every refused load
    must leave all its variables as they are (each test checks)."""
    target = lora_model_on_base(base_files["h5"])
    randomize_lora(target, seed=7)
    return target


# Each bias mode and each base file format in the fast lane; the rest of the
# matrix in the slow lane.
@pytest.mark.parametrize(
    "train_bias, base_format",
    [
        ("none", "h5"),
        ("lora_only", "tf"),
        ("all", "h5"),
        pytest.param("none", "tf", marks=pytest.mark.slow),
        pytest.param("lora_only", "h5", marks=pytest.mark.slow),
        pytest.param("all", "tf", marks=pytest.mark.slow),
    ],
)
def test_round_trip_onto_a_fresh_model_from_the_base_file(
    base_files, tmp_path, images, train_bias, base_format
):
    model = lora_model_on_base(base_files["h5"], lora_train_bias=train_bias)
    moved = fine_tune(model)
    expected = model(images).numpy()
    save_lora_state(model, str(tmp_path / "a"))

    fresh = lora_model_on_base(base_files[base_format], lora_train_bias=train_bias)
    assert not np.array_equal(fresh(images).numpy(), expected)
    report = load_lora_state(fresh, str(tmp_path / "a"))
    assert report.complete and sorted(report.loaded) == moved
    np.testing.assert_array_equal(fresh(images).numpy(), expected)


def test_checkpoint_holds_only_lora_and_asked_variables(base_files, tmp_path):
    model = lora_model_on_base(base_files["h5"], lora_train_bias="lora_only")
    save_lora_state(model, str(tmp_path / "a"))
    stored = {name for name, _ in tf.train.list_variables(str(tmp_path / "a" / "adapter"))}
    stored.discard("_CHECKPOINTABLE_OBJECT_GRAPH")
    expected = {"lora/fc/kernel", "lora/fc/bias"}  # the head is the attribute `fc`
    for path, _ in lora_ckpt.lora_layers(model):
        expected |= {
            f"lora/{path}/kernel_lora_a",
            f"lora/{path}/kernel_lora_b",
            f"lora/{path}/bias",
        }
    assert stored == {f"{k}/.ATTRIBUTES/VARIABLE_VALUE" for k in expected}
    assert sorted(os.listdir(tmp_path / "a")) == [
        "adapter.data-00000-of-00001",
        "adapter.index",
        "adapter_config.json",
    ]

    save_lora_state(model, str(tmp_path / "b"), include_bias="none", extra_layers=[])
    stored = {name for name, _ in tf.train.list_variables(str(tmp_path / "b" / "adapter"))}
    assert all("kernel_lora_" in name for name in stored - {"_CHECKPOINTABLE_OBJECT_GRAPH"})
    params = sum(
        np.prod(s)
        for n, s in tf.train.list_variables(str(tmp_path / "b" / "adapter"))
        if n != "_CHECKPOINTABLE_OBJECT_GRAPH"
    )
    assert params == count(
        var
        for _, layer in lora_ckpt.lora_layers(model)
        for var in (layer.kernel_lora_a, layer.kernel_lora_b)
    )


def test_config_records_identity_and_variables(trained_adapter):
    model, path = trained_adapter
    with open(os.path.join(path, "adapter_config.json")) as handle:
        config = json.load(handle)
    # Without DoRA or rsLoRA layers an adapter stays readable by version-1 readers.
    assert config["format_version"] == 1
    assert config["base_model"]["architecture"] == "tfimm.architectures.convnext.ConvNeXt"
    assert config["base_model"]["config"]["embed_dim"] == [8, 16]
    assert config["base_model"]["fingerprint"].startswith("sampled-blake2b:")
    assert config["saved"] == {"lora": True, "bias": "none", "extra_layers": ["fc"]}
    layer = config["layers"]["stages/0/blocks/0/mlp/fc1"]
    assert (layer["rank"], layer["alpha"], layer["scaling"]) == (2, 1.0, 0.5)
    var = config["variables"]["stages/0/blocks/0/mlp/fc1/kernel_lora_a"]
    assert var == {"shape": [8, 2], "dtype": "float32", "kind": "lora"}
    assert config["variables"]["fc/kernel"]["kind"] == "extra"
    for name, record in config["checkpoint"]["files"].items():
        assert os.path.getsize(os.path.join(path, name)) == record["size"]


def test_read_lora_state_needs_no_model(trained_adapter):
    model, path = trained_adapter
    state = read_lora_state(path)
    model_vars = named_variables(model)
    assert set(state.tensors) == set(state.config.variables)
    for key, record in state.config.variables.items():
        assert (record.shape, record.dtype) == (tuple(model_vars[key].shape), "float32"), key
    assert state.config.layers["stages/0/blocks/0/mlp/fc1"].rank == 2
    for key, value in state.tensors.items():
        np.testing.assert_array_equal(value, model_vars[key].numpy())
    assert state.rank == 2


def test_inspect_and_list(trained_adapter, tmp_path):
    model, path = trained_adapter
    save_lora_state(model, str(tmp_path / "second"), metadata={"task": "quadrant"})
    os.makedirs(tmp_path / "not_an_adapter")
    summary = lora_ckpt.inspect_adapter(str(tmp_path / "second"))
    assert summary["metadata"] == {"task": "quadrant"}
    assert summary["num_parameters"] == count(model.trainable_weights)
    on_disk = sum(os.path.getsize(tmp_path / "second" / f) for f in os.listdir(tmp_path / "second"))
    assert summary["size_bytes"] == on_disk
    assert [s["name"] for s in lora_ckpt.list_adapters(str(tmp_path))] == ["adapter", "second"]


def test_memory_store_round_trip(trained_adapter, images, base_files):
    from lora_ckpt.storage import open_store

    model, _ = trained_adapter
    path = "memory://adapters/ram_test"
    save_lora_state(model, path)
    save_lora_state(model, path, overwrite=True)  # the by-file commit path
    fresh = lora_model_on_base(base_files["h5"])
    load_lora_state(fresh, path)
    np.testing.assert_array_equal(fresh(images).numpy(), model(images).numpy())
    store, _ = open_store(path)
    assert sorted(store.listdir("memory://adapters")) == ["ram_test"]  # no temp leftovers
    config = read_lora_state(path).config
    # The old version's files are gone: only the new config and its checkpoint remain.
    assert sorted(store.listdir(path)) == sorted(["adapter_config.json", *config.files])


def test_batchnorm_statistics_as_extra_layers(tmp_path):
    def build():
        tf.keras.utils.set_random_seed(3)
        inputs = tf.keras.Input((8, 8, 3))
        h = lora_ckpt.LoRAConv2D(6, 3, lora_rank=2, name="conv")(inputs)
        h = tf.keras.layers.BatchNormalization(name="bn")(h)
        outputs = tf.keras.layers.GlobalAveragePooling2D()(h)
        return tf.keras.Model(inputs, outputs)

    model = build()
    randomize_lora(model)
    x = np.random.default_rng(0).normal(2.0, 1.0, (16, 8, 8, 3)).astype("float32")
    model(x, training=True)  # moves the BatchNorm statistics
    save_lora_state(model, str(tmp_path / "with_bn"), extra_layers=["bn"])
    save_lora_state(model, str(tmp_path / "without_bn"))

    with_bn, without_bn = build(), build()
    load_lora_state(with_bn, str(tmp_path / "with_bn"))
    # The fresh statistics differ from those the adapter was trained with:
    # the fingerprint of the base notices.
    with pytest.raises(BaseModelMismatchError, match="extra_layers"):
        load_lora_state(without_bn, str(tmp_path / "without_bn"))
    load_lora_state(without_bn, str(tmp_path / "without_bn"), check_base=False)
    np.testing.assert_array_equal(with_bn(x).numpy(), model(x).numpy())
    assert not np.allclose(without_bn(x).numpy(), model(x).numpy())
    kinds = lora_ckpt.inspect_adapter(str(tmp_path / "with_bn"))["variables"]
    assert kinds["bn/moving_mean"]["kind"] == "extra"


@pytest.mark.slow
def test_resume_two_plus_two_epochs_equals_four(base_files, tmp_path):
    tf.keras.utils.set_random_seed(0)
    straight = train(lora_model_on_base(base_files["h5"]), epochs=4)

    tf.keras.utils.set_random_seed(0)
    first = lora_model_on_base(base_files["h5"])
    callback = AdapterCheckpoint(str(tmp_path / "ckpts"), max_to_keep=1)
    train(first, epochs=2, callbacks=[callback])
    assert len(callback.manager.checkpoints) == 1

    # A restart: a new model from the base file, a new optimizer.
    resumed = compile_for_task(lora_model_on_base(base_files["h5"]))
    epoch = restore_training_checkpoint(resumed, str(tmp_path / "ckpts"))
    assert epoch == 2
    train(resumed, epochs=4, initial_epoch=epoch)
    for a, b in zip(straight.trainable_weights, resumed.trainable_weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


# --- bad input: every failure raises its own error and leaves the model unchanged ---


def _break_missing_index(path):
    os.remove(os.path.join(path, "adapter.index"))


def _break_missing_data(path):
    os.remove(os.path.join(path, "adapter.data-00000-of-00001"))


def _break_truncated_data(path):
    data = os.path.join(path, "adapter.data-00000-of-00001")
    with open(data, "r+b") as handle:
        handle.truncate(os.path.getsize(data) // 2)


def _break_flipped_byte(path):
    data = os.path.join(path, "adapter.data-00000-of-00001")
    with open(data, "r+b") as handle:
        handle.seek(10)
        byte = handle.read(1)
        handle.seek(10)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _break_truncated_index(path):
    index = os.path.join(path, "adapter.index")
    with open(index, "r+b") as handle:
        handle.truncate(os.path.getsize(index) - 7)


def _break_json(path):
    with open(os.path.join(path, "adapter_config.json"), "a") as handle:
        handle.write("{not json")


def _edit_config(path, edit):
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    edit(config)
    with open(config_path, "w") as handle:
        json.dump(config, handle)


BROKEN_FILES = [
    ("missing directory", lambda p: shutil.rmtree(p), AdapterNotFoundError, "does not exist"),
    (
        "missing config",
        lambda p: os.remove(os.path.join(p, "adapter_config.json")),
        AdapterNotFoundError,
        "interrupted",
    ),
    (
        "missing index",
        _break_missing_index,
        CorruptAdapterError,
        r"adapter\.index is missing",
    ),
    (
        "missing data",
        _break_missing_data,
        CorruptAdapterError,
        r"adapter\.data-00000-of-00001 is missing",
    ),
    ("truncated data", _break_truncated_data, CorruptAdapterError, "truncated"),
    ("truncated index", _break_truncated_index, CorruptAdapterError, "truncated"),
    ("corrupted data", _break_flipped_byte, CorruptAdapterError, "SHA-256"),
    ("corrupted json", _break_json, CorruptAdapterError, "not valid UTF-8 JSON"),
    (
        "missing field",
        lambda p: _edit_config(p, lambda c: c.pop("variables")),
        CorruptAdapterError,
        "lacks the field 'variables'",
    ),
    (
        "future format",
        lambda p: _edit_config(p, lambda c: c.update(format_version=99)),
        AdapterVersionError,
        "Upgrade lora_ckpt",
    ),
    (
        "another architecture",
        lambda p: _edit_config(
            p, lambda c: c["base_model"].update(architecture="tfimm.architectures.vit.ViT")
        ),
        AdapterMismatchError,
        "trained on a tfimm.architectures.vit.ViT",
    ),
]


@pytest.mark.parametrize(
    "name, breaker, error, match", BROKEN_FILES, ids=[c[0] for c in BROKEN_FILES]
)
def test_broken_adapter_is_refused_and_model_unchanged(
    trained_adapter, refusing_target, name, breaker, error, match
):
    _, path = trained_adapter
    breaker(path)
    target = refusing_target
    before = all_values(target)
    with pytest.raises(error, match=match):
        load_lora_state(target, path)
    assert_unchanged(target, before)


@pytest.mark.parametrize(
    "name, target_kwargs, error, match",
    [
        (
            "rank mismatch",
            dict(lora_rank=3),
            AdapterMismatchError,
            r"float32\[8, 2\] vs model float32\[8, 3\]",
        ),
        (
            "other config",
            dict(nb_classes=6),
            AdapterMismatchError,
            "nb_classes: adapter 4 vs model 6",
        ),
        ("alpha mismatch", dict(lora_alpha=4.0), AdapterMismatchError, "scaling"),
    ],
)
def test_mismatched_model_is_refused_and_unchanged(
    trained_adapter, name, target_kwargs, error, match
):
    _, path = trained_adapter
    target = lora_ckpt.create_model(
        "convnext_tiny", **dict(dict(TASK, lora_rank=2), **target_kwargs)
    )
    before = all_values(target)
    with pytest.raises(error, match=match):
        load_lora_state(target, path)
    assert_unchanged(target, before)


def test_adapter_of_another_architecture(trained_adapter, tmp_path):
    model, convnext_adapter = trained_adapter
    functional = _functional(2)
    save_lora_state(functional, str(tmp_path / "functional"))
    for target, path in ((model, str(tmp_path / "functional")), (functional, convnext_adapter)):
        before = all_values(target)
        with pytest.raises(AdapterMismatchError, match="was trained on a"):
            load_lora_state(target, path)
        assert_unchanged(target, before)


def test_base_fingerprint_mismatch(trained_adapter, base_files, images):
    model, path = trained_adapter
    other_base = lora_ckpt.create_model(
        "convnext_tiny", lora_rank=2, **TASK
    )  # fresh init, not the base
    before = all_values(other_base)
    with pytest.raises(BaseModelMismatchError, match="other base weights"):
        load_lora_state(other_base, path)
    assert_unchanged(other_base, before)
    load_lora_state(other_base, path, check_base=False)  # the caller allows it
    lora = read_lora_state(path).tensors
    for key, var in named_variables(other_base).items():
        if key in lora:
            np.testing.assert_array_equal(var.numpy(), lora[key])


def _functional(n_lora_layers, rank=2):
    tf.keras.utils.set_random_seed(1)
    inputs = tf.keras.Input((6,))
    h = inputs
    for i in range(n_lora_layers):
        h = lora_ckpt.LoRADense(6, lora_rank=rank, name=f"fc{i}")(h)
    return tf.keras.Model(inputs, h)


def test_missing_and_unexpected_variables(tmp_path):
    small, large = _functional(2), _functional(3)
    randomize_lora(small)
    save_lora_state(small, str(tmp_path / "small"))
    save_lora_state(large, str(tmp_path / "large"))

    before = all_values(large)
    with pytest.raises(
        AdapterMismatchError, match=r"missing from the adapter: \['fc2/kernel_lora_a'"
    ):
        load_lora_state(large, str(tmp_path / "small"), check_base=False)
    assert_unchanged(large, before)
    with pytest.raises(AdapterMismatchError, match=r"not in the model: \['fc2/kernel_lora_a'"):
        load_lora_state(small, str(tmp_path / "large"), check_base=False)

    report = load_lora_state(large, str(tmp_path / "small"), strict=False, check_base=False)
    assert report.missing == ["fc2/kernel_lora_a", "fc2/kernel_lora_b"]
    assert sorted(report.loaded) == [
        "fc0/kernel_lora_a",
        "fc0/kernel_lora_b",
        "fc1/kernel_lora_a",
        "fc1/kernel_lora_b",
    ]
    np.testing.assert_array_equal(
        large.get_layer("fc1").kernel_lora_b.numpy(), small.get_layer("fc1").kernel_lora_b.numpy()
    )
    np.testing.assert_array_equal(
        large.get_layer("fc2").kernel_lora_b.numpy(), before["fc2/kernel_lora_b"]
    )


def test_save_refusals(own_trained_adapter, tmp_path):
    model, path = own_trained_adapter
    with pytest.raises(AdapterExistsError, match="overwrite=True"):
        save_lora_state(model, path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(AdapterExistsError, match="not part of an adapter"):
        save_lora_state(model, str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(LayerNotFoundError, match="matches no layer"):
        save_lora_state(model, str(tmp_path / "x"), extra_layers=["head/nope"])
    with pytest.raises(LoRAConfigError, match="JSON"):
        save_lora_state(model, str(tmp_path / "x"), metadata={"bad": object()})
    lora_ckpt.merge_weights(model)
    with pytest.raises(MergeStateError, match="unmerge"):
        save_lora_state(model, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_overwrite_replaces_and_leaves_no_temporaries(own_trained_adapter, tmp_path):
    model, path = own_trained_adapter
    randomize_lora(model, seed=5)
    save_lora_state(model, path, overwrite=True)
    state = read_lora_state(path)
    a = model.stages[0].blocks[0].mlp.fc1.kernel_lora_a.numpy()
    np.testing.assert_array_equal(state.tensors["stages/0/blocks/0/mlp/fc1/kernel_lora_a"], a)
    assert sorted(os.listdir(os.path.dirname(path))) == ["adapter"]


def test_base_weights_file_errors(tmp_path):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TASK)
    before = all_values(model)
    with pytest.raises(BaseWeightsError, match="does not exist"):
        load_base_weights(model, str(tmp_path / "nothing.h5"))
    with pytest.raises(BaseWeightsError, match="index is missing"):
        load_base_weights(model, str(tmp_path / "nothing"))
    import tfimm

    other = tfimm.create_model("convnext_tiny", **dict(TASK, embed_dim=(8, 24)))
    other.save_weights(str(tmp_path / "other.h5"))
    other.save_weights(str(tmp_path / "other"))
    for path, match in (
        (str(tmp_path / "other.h5"), "has shape"),
        (str(tmp_path / "other"), "do not match"),
    ):
        with pytest.raises(BaseWeightsError, match=match):
            load_base_weights(model, path)
    assert_unchanged(model, before)


def test_training_checkpoint_errors(tmp_path):
    model = compile_for_task(lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TASK))
    randomize_lora(model)
    before = all_values(model)
    assert restore_training_checkpoint(model, str(tmp_path / "none_yet")) == 0
    manager = AdapterCheckpointManager(model, str(tmp_path / "none_yet"))
    with pytest.raises(TrainingCheckpointError, match="No training checkpoint at"):
        manager.restore(str(tmp_path / "none_yet" / "ckpt-7"))
    assert_unchanged(model, before)
