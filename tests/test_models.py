"""Model-level API: factory, parameter counts, training, conversion, merging."""

import inspect
import re

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt._tf import tf
from lora_ckpt.synthetic import make_task_dataset
from lora_ckpt.traversal import named_variables

from .conftest import TINY_CONVNEXT, randomize_lora, snapshot


def count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def summary_counts(model):
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    return tuple(
        int(re.search(rf"{label} params: ([\d,]+)", text).group(1).replace(",", ""))
        for label in ("Total", "Trainable", "Non-trainable")
    )


def test_convnext_tiny_parameter_counts_match_tfimm_readme():
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, lora_train_classifier=False)
    assert summary_counts(model) == (28_721_608, 132_480, 28_589_128)
    # By hand: fc1 (d -> 4d) and fc2 (4d -> d) of each block add
    # 2 * (d*r + r*4d) = 10*d*r LoRA weights; blocks (3, 3, 9, 3) of dims
    # (96, 192, 384, 768).
    lora_params = sum(
        n * 10 * d * 2 for n, d in zip((3, 3, 9, 3), (96, 192, 384, 768), strict=True)
    )
    assert lora_params == 132_480
    assert count(model.trainable_weights) == lora_params


# The tiny ConvNeXt, by hand (rank r = 2, dims d = 8 then 16, one block each):
R = 2
LORA = sum(10 * d * R for d in (8, 16))  # fc1 + fc2 A and B: 160 + 320
LORA_BIASES = sum(4 * d + d for d in (8, 16))  # fc1 bias 4d + fc2 bias d
ALL_BIASES = (
    8
    + 8  # stem conv bias, stem norm beta
    + 7 * 8  # block 0: conv_dw bias d, norm beta d, fc1 bias 4d, fc2 bias d
    + 8
    + 16  # downsample norm beta (8 channels in), downsample conv bias
    + 7 * 16  # block 1
    + 16
    + 5  # head norm beta, head fc bias
)
HEAD = 16 * 5 + 5


@pytest.mark.parametrize(
    "train_bias, train_classifier, expected",
    [
        ("none", False, LORA),
        ("lora_only", False, LORA + LORA_BIASES),
        ("all", False, LORA + ALL_BIASES),
        ("none", True, LORA + HEAD),
        ("all", True, LORA + ALL_BIASES + HEAD - 5),  # head bias counted once
    ],
)
def test_train_bias_options_give_hand_computed_counts(train_bias, train_classifier, expected):
    model = lora_ckpt.create_model(
        "convnext_tiny",
        lora_rank=R,
        lora_train_bias=train_bias,
        lora_train_classifier=train_classifier,
        **TINY_CONVNEXT,
    )
    total = count(named_variables(model).values())
    assert count(model.trainable_weights) == expected
    assert count(model.non_trainable_weights) == total - expected
    assert model.count_params() == total
    ids = [id(v) for v in model.trainable_weights + model.non_trainable_weights]
    assert len(ids) == len(set(ids)) == len(named_variables(model))


def _frozen_and_trained(model):
    trained = {id(v) for v in model.trainable_weights}
    return [v for v in named_variables(model).values() if id(v) not in trained]


@pytest.mark.parametrize(
    "train_bias, train_classifier", [("none", True), ("lora_only", False), ("all", True)]
)
def test_fit_trains_only_lora_and_asked_weights(train_bias, train_classifier):
    tf.keras.utils.set_random_seed(0)
    model = lora_ckpt.create_model(
        "convnext_tiny",
        lora_rank=2,
        lora_train_bias=train_bias,
        lora_train_classifier=train_classifier,
        **dict(TINY_CONVNEXT, nb_classes=4),
    )
    x, y = make_task_dataset("quadrant", 32, seed=0)
    trained = list(model.trainable_weights)
    frozen = _frozen_and_trained(model)
    trained_before, frozen_before = snapshot(trained), snapshot(frozen)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-2),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)

    for var, before in zip(frozen, frozen_before, strict=True):
        np.testing.assert_array_equal(var.numpy(), before, err_msg=var.name)
    for var, before in zip(trained, trained_before, strict=True):
        assert not np.array_equal(var.numpy(), before), f"{var.name} did not change"
    names = [v.name for v in trained]
    assert any("head/fc/kernel" in n for n in names) == train_classifier
    assert any("conv_dw/bias" in n for n in names) == (train_bias == "all")
    assert any("fc1/bias" in n for n in names) == (train_bias != "none")


def test_fit_reduces_the_loss():
    tf.keras.utils.set_random_seed(0)
    model = lora_ckpt.create_model(
        "convnext_tiny", lora_rank=4, **dict(TINY_CONVNEXT, nb_classes=4)
    )
    x, y = make_task_dataset("quadrant", 128, seed=0)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-2),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0).history["loss"]
    assert history[-1] < 0.8 * history[0], history


def test_convert_to_lora_and_back(images):
    tf.keras.utils.set_random_seed(0)
    import tfimm

    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    expected = regular(images).numpy()
    lora = lora_ckpt.convert_to_lora_model(regular, lora_rank=3, lora_alpha=6.0)
    assert type(lora) is lora_ckpt.LoRAConvNeXt and lora.cfg.lora_rank == 3
    np.testing.assert_array_equal(lora(images).numpy(), expected)  # B starts at zero

    randomize_lora(lora)
    lora_out = lora(images).numpy()
    kernels = snapshot(v for v in lora.weights if "kernel" in v.name)
    back = lora_ckpt.convert_to_regular_model(lora)
    assert type(back) is tfimm.architectures.ConvNeXt
    np.testing.assert_allclose(back(images).numpy(), lora_out, rtol=1e-5, atol=1e-5)
    assert not np.allclose(back(images).numpy(), expected, atol=1e-4)
    for var, before in zip((v for v in lora.weights if "kernel" in v.name), kernels, strict=True):
        np.testing.assert_array_equal(var.numpy(), before)  # the LoRA model is untouched
    assert not any(layer.merged for _, layer in lora_ckpt.lora_layers(lora))


def test_convert_accepts_config_overrides():
    import tfimm

    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    lora = lora_ckpt.convert_to_lora_model(regular, lora_rank=2, nb_classes=7)
    assert lora.cfg.nb_classes == 7 and lora.fc.units == 7
    np.testing.assert_array_equal(lora.stem_conv.kernel.numpy(), regular.stem_conv.kernel.numpy())


def test_misspelt_tfimm_field_still_works():
    with pytest.warns(DeprecationWarning, match="lora_train_classifier"):
        model = lora_ckpt.create_model("convnext_tiny", lora_train_classifer=False, **TINY_CONVNEXT)
    assert model.cfg.lora_train_classifier is False


def test_merge_unmerge_model(tiny_convnext, images):
    randomize_lora(tiny_convnext)
    kernels = [layer.kernel for _, layer in lora_ckpt.lora_layers(tiny_convnext)]
    before = snapshot(kernels)
    unmerged = tiny_convnext.predict(images, verbose=0)
    lora_ckpt.merge_weights(tiny_convnext)
    # predict() was traced unmerged; merging must not reuse that graph.
    np.testing.assert_allclose(
        tiny_convnext.predict(images, verbose=0), unmerged, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(lora_ckpt.MergeStateError, match="already merged"):
        lora_ckpt.merge_lora_weights(tiny_convnext)
    lora_ckpt.unmerge_lora_weights(tiny_convnext)
    for var, b in zip(kernels, before, strict=True):
        np.testing.assert_array_equal(var.numpy(), b)
    with pytest.raises(lora_ckpt.MergeStateError, match="nothing to unmerge"):
        lora_ckpt.unmerge_lora_weights(tiny_convnext)


def test_disabling_lora_gives_the_base_model(images):
    import tfimm

    tf.keras.utils.set_random_seed(0)
    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    lora = lora_ckpt.convert_to_lora_model(regular, lora_rank=2)
    randomize_lora(lora)
    assert not np.allclose(lora.predict(images, verbose=0), regular(images).numpy(), atol=1e-4)
    lora_ckpt.set_lora_enabled(lora, False)
    np.testing.assert_array_equal(
        lora.predict(images, verbose=0), regular.predict(images, verbose=0)
    )


def test_tfimm_transfer_weights_interplay(images):
    """The tfimm README's functional-model recipe works with our layers."""
    from tfimm.models import transfer_weights

    tf.keras.utils.set_random_seed(0)
    import tfimm

    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    lora = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    transfer_weights(regular, lora, weights_to_ignore=lora_ckpt.LORA_WEIGHT_NAMES)
    assert lora_ckpt.LORA_WEIGHT_NAMES == ["kernel_lora_a", "kernel_lora_b"]
    randomize_lora(lora)
    expected = lora(images).numpy()
    lora_ckpt.merge_weights(lora)
    transfer_weights(lora, regular)
    np.testing.assert_allclose(regular(images).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_trainable_weights_of_a_functional_model():
    inputs = tf.keras.Input((8, 8, 3))
    h = lora_ckpt.LoRAConv2D(4, 3, lora_rank=2, name="conv")(inputs)
    h = tf.keras.layers.BatchNormalization(name="bn")(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    outputs = tf.keras.layers.Dense(3, name="head")(h)
    model = tf.keras.Model(inputs, outputs)
    names = lambda ws: sorted(v.name.split(":")[0] for v in ws)  # noqa: E731
    assert names(lora_ckpt.lora_trainable_weights(model)) == [
        "conv/kernel_lora_a",
        "conv/kernel_lora_b",
    ]
    assert names(lora_ckpt.lora_trainable_weights(model, "all", ["head"])) == [
        "bn/beta",
        "conv/bias",
        "conv/kernel_lora_a",
        "conv/kernel_lora_b",
        "head/bias",
        "head/kernel",
    ]
    frozen = lora_ckpt.lora_non_trainable_weights(model, "lora_only")
    assert names(frozen) == [
        "bn/beta",
        "bn/gamma",
        "bn/moving_mean",
        "bn/moving_variance",
        "conv/kernel",
        "head/bias",
        "head/kernel",
    ]


def test_tfimm_api_names_and_signatures():
    """Code written against tfimm.architectures.lora works after changing the import."""
    from tfimm.architectures import lora as tfimm_lora  # only to read its signatures

    names = [
        "create_model",
        "convert_to_lora_model",
        "convert_to_regular_model",
        "merge_lora_weights",
        "lora_trainable_weights",
        "lora_non_trainable_weights",
        "convert_to_lora_layer",
        "register_lora_architecture",
        "lora_architecture",
        "lora_base_architecture",
        "lora_config",
    ]
    for name in names:
        ours = inspect.signature(getattr(lora_ckpt, name)).parameters
        theirs = inspect.signature(getattr(tfimm_lora, name)).parameters
        assert list(ours) == list(theirs), name
        for p in theirs:
            assert ours[p].kind == theirs[p].kind and ours[p].default == theirs[p].default, (
                name,
                p,
            )
    for cls in ("LoRADense", "LoRAConv2D", "LoRAConvNeXt", "LoRAConvNeXtConfig"):
        assert hasattr(lora_ckpt, cls)
    assert lora_ckpt.LORA_WEIGHT_NAMES == tfimm_lora.LORA_WEIGHT_NAMES
    assert lora_ckpt.merge_weights is lora_ckpt.merge_lora_weights


def test_model_errors():
    with pytest.raises(lora_ckpt.UnknownModelError, match="convnext_tiny"):
        lora_ckpt.create_model("convnext_tinny")
    with pytest.raises(lora_ckpt.LoRAConfigError, match="lora_rank must be a positive integer"):
        lora_ckpt.create_model("convnext_tiny", lora_rank=0, **TINY_CONVNEXT)
    with pytest.raises(lora_ckpt.LoRAConfigError, match="Unknown config field"):
        lora_ckpt.create_model("convnext_tiny", lora_rnak=2, **TINY_CONVNEXT)
    with pytest.raises(lora_ckpt.LoRAConfigError, match="train_bias"):
        lora_ckpt.create_model("convnext_tiny", lora_train_bias="some", **TINY_CONVNEXT)
    with pytest.raises(lora_ckpt.UnregisteredArchitectureError, match="Registered architectures"):
        lora_ckpt.convert_to_lora_model(tf.keras.Sequential([tf.keras.layers.Dense(2)]))
    with pytest.raises(lora_ckpt.UnregisteredArchitectureError):
        lora_ckpt.convert_to_regular_model(tf.keras.Sequential([tf.keras.layers.Dense(2)]))
    model = lora_ckpt.create_model("convnext_tiny", **TINY_CONVNEXT)
    with pytest.raises(lora_ckpt.LayerNotFoundError, match="match no layer"):
        lora_ckpt.lora_trainable_weights(model, trainable_layers=["head/fcc"])
    with pytest.raises(lora_ckpt.LayerNotFoundError, match="no LoRA layers"):
        lora_ckpt.merge_lora_weights(tf.keras.Sequential([tf.keras.layers.Dense(2)]))
    # tfimm raised ValueError for these; our errors still are ValueErrors.
    assert issubclass(lora_ckpt.UnknownModelError, ValueError)


def test_registry_explicit_and_self_registration():
    from dataclasses import dataclass

    from lora_ckpt.registry import register_lora_architecture

    @dataclass
    class FlexConfig:
        lora_rank: int = 0

    class Flex(tf.keras.Model):
        cfg_class = FlexConfig

    register_lora_architecture(Flex, base_cls=Flex)
    assert lora_ckpt.lora_architecture(Flex) is Flex
    assert lora_ckpt.lora_base_architecture(Flex) is Flex
    assert lora_ckpt.lora_config(Flex) is FlexConfig

    class Other(tf.keras.Model):
        pass

    @register_lora_architecture(base_cls=Other)
    class LoRAOther(tf.keras.Model):
        cfg_class = FlexConfig

    assert lora_ckpt.lora_architecture(Other) is LoRAOther
    with pytest.raises(lora_ckpt.UnregisteredArchitectureError, match="cfg_class"):
        register_lora_architecture(type("NoCfg", (tf.keras.Model,), {}))
    with pytest.raises(lora_ckpt.UnregisteredArchitectureError, match="not registered"):
        lora_ckpt.lora_base_architecture(Other)
