"""tfimm's own usage runs unchanged, and no Keras path silently corrupts weights."""

import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import tfimm

import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.errors import (
    KerasObjectError,
    LoRAConfigError,
    MergeStateError,
    MissingDependencyError,
    UnregisteredArchitectureError,
    UnsupportedLayerError,
)
from lora_ckpt.layers import LoRAConv2D, LoRADense
from lora_ckpt.traversal import named_variables

from .conftest import TINY_CONVNEXT, compile_for_task, count, fold_lora_into, randomize_lora


@pytest.fixture
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")


def _sequential(layer_cls):
    return tf.keras.Sequential(
        [tf.keras.Input((5,)), layer_cls(4, lora_rank=2), layer_cls(3, lora_rank=2)]
    )


# ---- layers and registry as tfimm users write them ----


def test_a_fresh_lora_layer_freezes_nothing_as_in_tfimm():
    from tfimm.architectures import lora as tfimm_lora  # the reference behaviour

    ours, theirs = _sequential(LoRADense), _sequential(tfimm_lora.LoRADense)
    assert count(ours.trainable_weights) == count(theirs.trainable_weights) == 71
    assert count(ours.non_trainable_weights) == count(theirs.non_trainable_weights) == 0
    assert [v.name.split("/")[-1] for v in ours.layers[0].trainable_weights] == [
        "kernel:0",
        "bias:0",
        "kernel_lora_a:0",
        "kernel_lora_b:0",
    ]
    # tfimm's lora_trainable_weights: A and B, plus the biases with "lora_only".
    lora_only = sum(
        count([layer.kernel_lora_a, layer.kernel_lora_b, layer.bias]) for layer in ours.layers
    )
    assert count(lora_ckpt.lora_trainable_weights(ours, "lora_only")) == lora_only
    assert count(lora_ckpt.lora_trainable_weights(ours)) == lora_only - 4 - 3
    total = count(ours.weights)
    assert count(lora_ckpt.lora_non_trainable_weights(ours)) == total - (lora_only - 7)


def test_positional_arguments_follow_keras_order():
    dense = LoRADense(16, "relu", False, lora_rank=2)
    assert dense.activation is tf.keras.activations.relu and not dense.use_bias
    conv = LoRAConv2D(4, 3, 2, "same", lora_rank=2)
    assert conv.strides == (2, 2) and conv.padding == "same" and conv.kernel_size == (3, 3)
    assert conv.lora_rank == 2


def test_registered_class_with_cfg_class_none_takes_the_base_config(images):
    convnext = tfimm.architectures.ConvNeXt

    class PlainLoRAConvNeXt(convnext):
        cfg_class = None

        def __init__(self, cfg, **kwargs):
            super().__init__(cfg, **kwargs)
            for stage in self.stages:
                for block in stage.blocks:
                    block.mlp.fc1 = lora_ckpt.convert_to_lora_layer(block.mlp.fc1, lora_rank=2)

    # It replaces LoRAConvNeXt (the conftest fixture puts it back afterwards).
    with pytest.warns(UserWarning, match="already registered"):
        lora_ckpt.register_lora_architecture(PlainLoRAConvNeXt)

    assert lora_ckpt.lora_config(convnext) is None
    model = lora_ckpt.create_model("convnext_tiny", **TINY_CONVNEXT)
    assert type(model) is PlainLoRAConvNeXt
    assert len(lora_ckpt.lora_layers(model)) == 2
    # The registry gave the class LoRA's trainable weights: only A and B train,
    # so fit trains exactly what an adapter of it saves.
    expected = lora_ckpt.lora_trainable_weights(model)
    assert [id(v) for v in model.trainable_weights] == [id(v) for v in expected]
    assert count(model.trainable_weights) == (8 * 2 + 2 * 32) + (16 * 2 + 2 * 64)


@pytest.mark.slow
def test_user_registered_class_trains_what_its_adapter_saves(tmp_path, images):
    convnext = tfimm.architectures.ConvNeXt

    @dataclass
    class MyConfig(tfimm.architectures.ConvNeXtConfig):
        lora_rank: int = 2

    class MyLoRAConvNeXt(convnext):
        cfg_class = MyConfig

        def __init__(self, cfg, **kwargs):
            super().__init__(cfg, **kwargs)
            for stage in self.stages:
                for block in stage.blocks:
                    block.mlp.fc2 = lora_ckpt.convert_to_lora_layer(
                        block.mlp.fc2, lora_rank=cfg.lora_rank
                    )

    with pytest.warns(UserWarning, match="already registered"):
        lora_ckpt.register_lora_architecture(MyLoRAConvNeXt)
    model = compile_for_task(lora_ckpt.create_model("convnext_tiny", **TINY_CONVNEXT))
    before = {v.ref(): v.numpy() for v in model.weights}
    model.fit(images, np.array([0, 1]), epochs=1, verbose=0)
    changed = {v.ref() for v in model.weights if not np.array_equal(before[v.ref()], v.numpy())}
    lora_ckpt.save_lora_state(model, str(tmp_path / "a"))
    stored = set(lora_ckpt.read_lora_state(str(tmp_path / "a")).tensors)
    keys = {id(v): k for k, v in named_variables(model).items()}
    assert changed and {keys[id(r.deref())] for r in changed} <= stored


# ---- state that survives Keras saving ----


def _merged_tiny(images):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    randomize_lora(model)
    expected = model(images).numpy()
    lora_ckpt.merge_lora_weights(model)
    return model, expected


def test_merged_model_saved_with_save_weights_reloads_to_the_same_outputs(tmp_path, images):
    model, expected = _merged_tiny(images)
    model.save_weights(str(tmp_path / "ckpt"))
    fresh = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    fresh.load_weights(str(tmp_path / "ckpt"))
    np.testing.assert_allclose(fresh(images).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert all(layer.merged for _, layer in lora_ckpt.lora_layers(fresh))
    # The base kernel is not in the save: unmerging it is refused, not guessed.
    with pytest.raises(MergeStateError, match="was merged when its model was saved"):
        lora_ckpt.unmerge_lora_weights(fresh)


def test_merged_model_in_an_hdf5_file_is_refused_by_a_fresh_model(tmp_path, images):
    model, expected = _merged_tiny(images)
    model.save_weights(str(tmp_path / "w.h5"))
    fresh = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    with pytest.raises(ValueError):
        fresh.load_weights(str(tmp_path / "w.h5"))
    lora_ckpt.merge_lora_weights(fresh)  # a merged model takes it, and computes alike
    fresh.load_weights(str(tmp_path / "w.h5"))
    np.testing.assert_allclose(fresh(images).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Its pristine copy is of its own random base, not of the file's: unmerging
    # would give a third model, so it is refused.
    with pytest.raises(MergeStateError, match="merged weights were loaded over it"):
        lora_ckpt.unmerge_lora_weights(fresh)
    _, layer = lora_ckpt.lora_layers(fresh)[0]
    with pytest.raises(MergeStateError, match="merged weights were loaded over it"):
        layer.base_kernel()


def test_reloading_a_merged_models_own_weights_keeps_unmerge_exact(tmp_path):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    randomize_lora(model)
    base = {path: layer.kernel.numpy() for path, layer in lora_ckpt.lora_layers(model)}
    lora_ckpt.merge_lora_weights(model)
    model.save_weights(str(tmp_path / "w.h5"))
    model.load_weights(str(tmp_path / "w.h5"))  # the same bits: the copy is still its base
    lora_ckpt.unmerge_lora_weights(model)
    for path, layer in lora_ckpt.lora_layers(model):
        assert not layer.merged
        np.testing.assert_array_equal(layer.kernel.numpy(), base[path])


@pytest.mark.slow
def test_merged_and_disabled_models_survive_savedmodel_and_keras_files(tmp_path, images):
    model, expected = _merged_tiny(images)
    model.save(str(tmp_path / "saved_model"))
    model.save(str(tmp_path / "model.keras"))
    for path in ("saved_model", "model.keras"):
        loaded = tf.keras.models.load_model(str(tmp_path / path))
        np.testing.assert_allclose(loaded(images).numpy(), expected, rtol=1e-5, atol=1e-5)

    lora_ckpt.unmerge_lora_weights(model)
    lora_ckpt.set_lora_enabled(model, False)
    base = model(images).numpy()
    model.save(str(tmp_path / "disabled.keras"))
    loaded = tf.keras.models.load_model(str(tmp_path / "disabled.keras"))
    np.testing.assert_array_equal(loaded(images).numpy(), base)


def test_disabled_model_saved_with_save_weights_reloads_disabled(tmp_path, images):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    randomize_lora(model)
    lora_ckpt.set_lora_enabled(model, False)
    base = model(images).numpy()
    model.save_weights(str(tmp_path / "ckpt"))
    fresh = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    fresh.load_weights(str(tmp_path / "ckpt"))
    np.testing.assert_array_equal(fresh(images).numpy(), base)
    assert not any(layer.lora_enabled for _, layer in lora_ckpt.lora_layers(fresh))


def test_fit_on_a_merged_model_raises(images):
    model, _ = _merged_tiny(images)
    compile_for_task(model)
    with pytest.raises(MergeStateError, match="merged and cannot be trained"):
        model.fit(images, np.array([0, 1]), epochs=1, verbose=0)
    model.predict(images, verbose=0)  # inference on a merged model is what merging is for


def test_converting_a_lora_model_again_keeps_or_refuses(images):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    with pytest.raises(LoRAConfigError, match="already a LoRA model"):
        lora_ckpt.convert_to_lora_model(model, lora_rank=4)

    inputs = tf.keras.Input((5,))
    hidden = tf.keras.layers.Dense(6, name="fc1")(inputs)
    graph = tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="fc2")(hidden))
    once = lora_ckpt.convert_to_lora_model(graph, target_layers=["fc1"], lora_rank=2)
    randomize_lora(once)
    x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    expected = once(x).numpy()
    twice = lora_ckpt.convert_to_lora_model(once, target_layers=["fc2"], lora_rank=2)
    assert [p for p, _ in lora_ckpt.lora_layers(twice)] == ["fc1", "fc2"]
    np.testing.assert_array_equal(twice(x).numpy(), expected)  # fc1's LoRA weights kept


# ---- Keras 3 and missing packages ----


def test_keras_3_objects_get_a_clear_error():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 is not installed")
    layer = keras3.layers.Dense(3)
    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2)])
    for call in (
        lambda: lora_ckpt.convert_to_lora_layer(layer),
        lambda: lora_ckpt.convert_to_lora_model(model, target_layers=["*"]),
        lambda: lora_ckpt.lora_trainable_weights(model),
        lambda: lora_ckpt.lora_layers(model),
    ):
        with pytest.raises(KerasObjectError, match="tf_keras"):
            call()


@pytest.mark.slow
def test_failed_import_leaves_the_environment_as_it_was():
    script = (
        "import os, sys\n"
        "os.environ.pop('TF_USE_LEGACY_KERAS', None)\n"
        "import tensorflow as tf\n"
        "tf.keras.layers  # Keras 3 comes up\n"
        "import lora_ckpt  # imports no TensorFlow: the first name that needs it fails\n"
        "try:\n"
        "    from lora_ckpt import tf\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, os.environ.get('TF_USE_LEGACY_KERAS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "MissingDependencyError None", out.stderr[-2000:]


def test_pretrained_without_timm_says_what_to_install(monkeypatch):
    def needs_timm(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'timm'", name="timm")

    monkeypatch.setattr(tfimm, "create_model", needs_timm)
    with pytest.raises(MissingDependencyError, match="pip install timm"):
        lora_ckpt.create_model("convnext_tiny", pretrained=True)


# ---- any subclassed model, nested functional models ----


class _Block(tf.keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fc1 = tf.keras.layers.Dense(8)
        self.fc2 = tf.keras.layers.Dense(6)

    def call(self, x):
        return self.fc2(tf.nn.relu(self.fc1(x)))


class _Net(tf.keras.Model):
    """A subclassed model with a nested functional backbone and a list of blocks."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        inputs = tf.keras.Input((5,))
        hidden = tf.keras.layers.Dense(6, name="inner_fc")(inputs)
        norm = tf.keras.layers.LayerNormalization(name="ln")(hidden)
        self.backbone = tf.keras.Model(inputs, norm, name="backbone")
        self.blocks = [_Block(), _Block()]
        self.head = tf.keras.layers.Dense(3)

    def call(self, x):
        x = self.backbone(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)

    def get_config(self):
        return {}


def test_generic_subclassed_conversion_reaches_nested_functional_models(tmp_path):
    tf.keras.utils.set_random_seed(0)
    net = _Net()
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    expected = net(x).numpy()
    kwargs = dict(
        target_layers=["blocks/*/fc*", "backbone/inner_fc"],
        lora_rank=2,
        lora_rank_pattern={"*fc2": 3},
        lora_trainable_layers=["head"],
    )
    lora = lora_ckpt.convert_to_lora_model(net, **kwargs)
    ranks = {path: layer.lora_rank for path, layer in lora_ckpt.lora_layers(lora)}
    assert ranks == {
        "backbone/inner_fc": 2,
        "blocks/0/fc1": 2,
        "blocks/0/fc2": 3,
        "blocks/1/fc1": 2,
        "blocks/1/fc2": 3,
    }
    np.testing.assert_array_equal(lora(x).numpy(), expected)
    trainable = {id(v) for v in lora.trainable_weights}
    assert trainable == {id(v) for v in lora_ckpt.lora_trainable_weights(lora, "none", ["head"])}

    randomize_lora(lora)
    adapted = lora(x).numpy()
    assert np.abs(adapted - expected).max() > 1e-3
    lora_ckpt.save_lora_state(lora, str(tmp_path / "a"))
    fresh = lora_ckpt.convert_to_lora_model(net, **kwargs)
    lora_ckpt.load_lora_state(fresh, str(tmp_path / "a"))
    np.testing.assert_array_equal(fresh(x).numpy(), adapted)
    regular = lora_ckpt.convert_to_regular_model(lora)
    assert type(regular) is _Net and not lora_ckpt.lora_layers(regular)
    np.testing.assert_allclose(regular(x).numpy(), adapted, rtol=1e-5, atol=1e-6)


def test_functional_model_nested_in_a_functional_model():
    inner_in = tf.keras.Input((5,))
    inner = tf.keras.Model(inner_in, tf.keras.layers.Dense(6, name="fc")(inner_in), name="inner")
    outer_in = tf.keras.Input((5,))
    outer = tf.keras.Model(outer_in, tf.keras.layers.Dense(2, name="out")(inner(outer_in)))
    x = np.random.default_rng(2).normal(size=(3, 5)).astype("float32")
    expected = outer(x).numpy()
    lora = lora_ckpt.convert_to_lora_model(outer, target_layers=["inner/fc", "out"], lora_rank=2)
    assert [p for p, _ in lora_ckpt.lora_layers(lora)] == ["inner/fc", "out"]
    np.testing.assert_array_equal(lora(x).numpy(), expected)
    randomize_lora(lora)
    np.testing.assert_allclose(
        lora_ckpt.convert_to_regular_model(lora)(x).numpy(), lora(x).numpy(), rtol=1e-5, atol=1e-6
    )


def test_a_tampered_lora_state_is_refused(tmp_path, images):
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    _, layer = lora_ckpt.lora_layers(model)[0]
    layer._lora_state.assign([2, 5])  # what a hand-made checkpoint could hold
    model.save_weights(str(tmp_path / "ckpt"))
    fresh = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    fresh.load_weights(str(tmp_path / "ckpt"))
    with pytest.raises(MergeStateError, match="not\\s+two 0/1 flags"):
        fresh(images)


def test_loading_weights_over_a_merged_model_is_seen_before_the_next_call(tmp_path, images):
    merged, expected = _merged_tiny(images)
    merged.save_weights(str(tmp_path / "merged"))
    fresh = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    fresh.load_weights(str(tmp_path / "merged"))
    # No call in between: the adapter loaders still see the restored merge.
    with pytest.raises(MergeStateError):
        lora_ckpt.save_lora_state(fresh, str(tmp_path / "a"))


class _Shared(tf.keras.Model):
    """One Dense held by two attributes and used at both."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d = tf.keras.layers.Dense(5)
        self.d2 = self.d
        self.out = tf.keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.d2(self.d(x)))

    def get_config(self):
        return {}


def test_a_layer_held_twice_gets_lora_at_both_places():
    net = _Shared()
    x = np.random.default_rng(3).normal(size=(2, 5)).astype("float32")
    net(x)
    lora = lora_ckpt.convert_to_lora_model(net, target_layers=["d"], lora_rank=2)
    assert lora.d is lora.d2 and lora_ckpt.is_lora_layer(lora.d)
    randomize_lora(lora)
    np.testing.assert_allclose(
        lora_ckpt.convert_to_regular_model(lora)(x).numpy(), lora(x).numpy(), rtol=1e-5, atol=1e-6
    )


def test_pattern_arguments_of_the_wrong_type_are_refused():
    with pytest.raises(LoRAConfigError, match="lora_rank_pattern must be a dict"):
        lora_ckpt.create_model("convnext_tiny", lora_rank_pattern="*fc1", **TINY_CONVNEXT)
    with pytest.raises(LoRAConfigError, match="must be strings"):
        lora_ckpt.create_model("convnext_tiny", lora_target_layers=[1], **TINY_CONVNEXT)
    model = lora_ckpt.create_model(
        "convnext_tiny", lora_target_layers="stages/0/blocks/0/mlp/fc1", **TINY_CONVNEXT
    )
    assert [p for p, _ in lora_ckpt.lora_layers(model)] == ["stages/0/blocks/0/mlp/fc1"]


def test_targeting_a_depthwise_convolution_says_why_it_is_refused():
    inputs = tf.keras.Input((8, 8, 3))
    hidden = tf.keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(4, 1, name="pw")(hidden))
    with pytest.raises(UnsupportedLayerError, match="dw \\(DepthwiseConv2D\\).*no\\s+low-rank"):
        lora_ckpt.convert_to_lora_model(model, target_layers=["dw"])
    assert lora_ckpt.lora_layers(lora_ckpt.convert_to_lora_model(model, target_layers=["*w"]))


# ---- a drop-in for tfimm.architectures.lora, and models it built ----

# What `tfimm/architectures/lora/__init__.py` (0.2.14) exports, spelled out so
# that a tfimm release that adds a name shows up in the test below.
TFIMM_LORA_NAMES = [
    "LORA_WEIGHT_NAMES",
    "LoRAConv2D",
    "LoRAConvNeXt",
    "LoRAConvNeXtConfig",
    "LoRADense",
    "convert_to_lora_layer",
    "convert_to_lora_model",
    "convert_to_regular_model",
    "create_model",
    "lora_architecture",
    "lora_base_architecture",
    "lora_config",
    "lora_non_trainable_weights",
    "lora_trainable_weights",
    "merge_lora_weights",
    "register_lora_architecture",
]


def test_every_name_tfimm_lora_exports_is_a_public_name_of_lora_ckpt():
    import types

    from tfimm.architectures import lora as tfimm_lora

    exported = sorted(
        name
        for name, value in vars(tfimm_lora).items()
        # Its submodules (convnext, factory, layers, registry) are not API.
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    )
    assert exported == TFIMM_LORA_NAMES
    for name in TFIMM_LORA_NAMES:
        assert name in lora_ckpt.__all__ and getattr(lora_ckpt, name) is not None, name
    # Same meaning as in tfimm: ours, not tfimm's classes.
    assert lora_ckpt.LoRAConvNeXt is lora_ckpt.lora_architecture(tfimm.architectures.ConvNeXt)
    assert lora_ckpt.LoRAConvNeXtConfig is lora_ckpt.LoRAConvNeXt.cfg_class


def _tfimm_lora_convnext(images, alpha=4.0):
    """A tiny LoRA ConvNeXt built by tfimm's own LoRA module, LoRA A/B random."""
    from tfimm.architectures import lora as tfimm_lora

    model = tfimm_lora.create_model("convnext_tiny", lora_rank=2, lora_alpha=alpha, **TINY_CONVNEXT)
    rng = np.random.default_rng(3)
    layers = [(p, x) for p, x in named_layers_of(model) if getattr(x, "is_lora_layer", False)]
    assert len(layers) == 4 and all(type(x) is tfimm_lora.LoRADense for _, x in layers)
    for _, layer in layers:
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            var.assign(rng.normal(0, 0.2, var.shape).astype("float32"))
    return model, layers


def named_layers_of(model):
    from lora_ckpt.traversal import named_layers

    return list(named_layers(model))


def test_a_tfimm_lora_model_converts_with_its_lora_weights_exactly(images):
    theirs, their_layers = _tfimm_lora_convnext(images)
    expected = theirs(images).numpy()  # tfimm's own forward, LoRA on

    ours = lora_ckpt.convert_to_lora_model(theirs)

    assert type(ours) is lora_ckpt.LoRAConvNeXt
    our_layers = lora_ckpt.lora_layers(ours)
    assert [p for p, _ in our_layers] == [p for p, _ in their_layers]
    for (_, mine), (_, other) in zip(our_layers, their_layers, strict=True):
        # Bit for bit, and the same update scale: alpha / rank = 4 / 2.
        np.testing.assert_array_equal(mine.kernel_lora_a.numpy(), other.kernel_lora_a.numpy())
        np.testing.assert_array_equal(mine.kernel_lora_b.numpy(), other.kernel_lora_b.numpy())
        np.testing.assert_array_equal(mine.kernel.numpy(), other.kernel.numpy())
        assert mine.scaling == other.scaling == 2.0
    assert ours.cfg.lora_train_classifier is theirs.cfg.lora_train_classifer
    np.testing.assert_allclose(ours(images).numpy(), expected, rtol=1e-5, atol=1e-5)

    # The update the carried weights make, folded into the base kernels in numpy.
    folded = lora_ckpt.convert_to_regular_model(ours, merge=False)
    fold_lora_into(folded, ours)
    np.testing.assert_allclose(folded(images).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_tfimm_lora_model_keeps_its_per_layer_ranks_and_takes_config_overrides(images):
    theirs, their_layers = _tfimm_lora_convnext(images, alpha=1.0)
    path, odd = their_layers[-1]
    # tfimm lets a layer have its own rank; rebuild one with rank 3, alpha 6.
    from tfimm.architectures import lora as tfimm_lora

    block = theirs.stages[1].blocks[0]
    assert path == "stages/1/blocks/0/mlp/fc2" and block.mlp.fc2 is odd
    block.mlp.fc2 = tfimm_lora.LoRADense(
        odd.units, lora_rank=3, lora_alpha=6.0, name=odd.name, kernel_initializer="ones"
    )
    block.mlp.fc2.build(odd.kernel.shape[:1])
    block.mlp.fc2.kernel_lora_b.assign(np.full((3, odd.units), 0.5, "float32"))
    expected = theirs(images).numpy()

    ours = lora_ckpt.convert_to_lora_model(theirs, lora_dropout=0.1)
    layer = dict(lora_ckpt.lora_layers(ours))[path]
    assert (layer.lora_rank, layer.lora_alpha, layer.scaling) == (3, 6.0, 2.0)
    assert ours.cfg.lora_dropout == 0.1
    np.testing.assert_array_equal(layer.kernel.numpy(), np.ones(layer.kernel.shape))
    np.testing.assert_allclose(ours(images).numpy(), expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(LoRAConfigError, match=r"\['lora_rank'\] cannot be chosen"):
        lora_ckpt.convert_to_lora_model(theirs, lora_rank=8)


def test_a_tfimm_lora_model_is_refused_where_lora_ckpt_would_misread_it(tmp_path, images):
    theirs, _ = _tfimm_lora_convnext(images)
    calls = {
        "save_lora_state": lambda: lora_ckpt.save_lora_state(theirs, str(tmp_path / "a")),
        "convert_to_regular_model": lambda: lora_ckpt.convert_to_regular_model(theirs),
        "merge_lora_weights": lambda: lora_ckpt.merge_lora_weights(theirs),
        "set_lora_enabled": lambda: lora_ckpt.set_lora_enabled(theirs, False),
        "lora_layers": lambda: lora_ckpt.lora_layers(theirs),
    }
    for name, call in calls.items():
        with pytest.raises(UnregisteredArchitectureError) as info:
            call()
        message = str(info.value)
        assert "lora_ckpt.convert_to_lora_model(model)" in message, name
        assert "stages/0/blocks/0/mlp/fc1" in message, name
        assert isinstance(info.value, ValueError)  # what tfimm callers catch
    assert not (tmp_path / "a").exists()
    # tfimm's weight selection is duck-typed and reads only A, B and biases.
    assert count(lora_ckpt.lora_trainable_weights(theirs)) == 2 * (8 * 2 + 2 * 32 + 16 * 2 + 2 * 64)


def test_tfimm_lora_models_that_cannot_be_carried_over_are_refused_by_name(images):
    from tfimm.architectures import lora as tfimm_lora

    theirs, layers = _tfimm_lora_convnext(images)
    layers[1][1].merge_weights()
    with pytest.raises(MergeStateError, match="'stages/0/blocks/0/mlp/fc2' is merged"):
        lora_ckpt.convert_to_lora_model(theirs)

    conv = tf.keras.Sequential(
        [tf.keras.Input((8, 8, 3)), tfimm_lora.LoRAConv2D(4, 3, lora_rank=2, name="c")]
    )
    with pytest.raises(UnsupportedLayerError, match="'c' is tfimm's LoRAConv2D.*per kernel"):
        lora_ckpt.convert_to_lora_model(conv)

    dense = tf.keras.Sequential([tf.keras.Input((5,)), tfimm_lora.LoRADense(3, name="d")])
    with pytest.raises(UnregisteredArchitectureError, match="cannot tell its base"):
        lora_ckpt.convert_to_lora_model(dense)
