"""Model-level API: factory, parameter counts, training, conversion, merging."""

import inspect
import re

import numpy as np
import pytest
import tfimm

import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.architectures import LoRAConvNeXt, LoRAConvNeXtConfig
from lora_ckpt.errors import (
    LayerNotFoundError,
    LoRAConfigError,
    MergeStateError,
    UnknownModelError,
    UnregisteredArchitectureError,
)
from lora_ckpt.synthetic import make_task_dataset
from lora_ckpt.traversal import named_variables

from .conftest import (
    TINY_CONVNEXT,
    compile_for_task,
    count,
    fold_lora_into,
    randomize_lora,
    snapshot,
)


def summary_counts(model):
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    return tuple(
        int(re.search(rf"{label} params: ([\d,]+)", text).group(1).replace(",", ""))
        for label in ("Total", "Trainable", "Non-trainable")
    )


@pytest.mark.slow
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
CLASSES = TINY_CONVNEXT["nb_classes"]
assert TINY_CONVNEXT["embed_dim"] == (8, 16) and TINY_CONVNEXT["nb_blocks"] == (1, 1)
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
    + CLASSES  # head norm beta, head fc bias
)
HEAD = 16 * CLASSES + CLASSES


@pytest.mark.parametrize(
    "train_bias, train_classifier, expected",
    [
        ("none", False, LORA),
        ("lora_only", False, LORA + LORA_BIASES),
        ("all", False, LORA + ALL_BIASES),
        ("none", True, LORA + HEAD),
        ("all", True, LORA + ALL_BIASES + HEAD - CLASSES),  # head bias counted once
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


def two_eager_steps(model, x, y):
    """What fit does (two batches), without tracing a graph: fast."""
    optimizer = tf.keras.optimizers.Adam(1e-2)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Two steps: LoRA A gets no gradient while B is still zero.
    for xb, yb in ((x[:16], y[:16]), (x[16:], y[16:])):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))


@pytest.mark.parametrize(
    "train_bias, train_classifier, how",
    [
        ("all", True, "eager"),  # the fast lane: the mode that trains the most kinds
        *(
            pytest.param(bias, classifier, how, marks=pytest.mark.slow)
            for bias, classifier in [("none", True), ("lora_only", False), ("all", True)]
            for how in ("eager", "fit")
            if (bias, how) != ("all", "eager")
        ),
    ],
)
def test_training_changes_only_lora_and_asked_weights(train_bias, train_classifier, how):
    tf.keras.utils.set_random_seed(0)
    model = lora_ckpt.create_model(
        "convnext_tiny",
        lora_rank=2,
        lora_train_bias=train_bias,
        lora_train_classifier=train_classifier,
        **TINY_CONVNEXT,
    )
    x, y = make_task_dataset("quadrant", 32, seed=0)
    trained = list(model.trainable_weights)
    frozen = _frozen_and_trained(model)
    trained_before, frozen_before = snapshot(trained), snapshot(frozen)
    if how == "fit":
        compile_for_task(model).fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    else:
        two_eager_steps(model, x, y)

    for var, before in zip(frozen, frozen_before, strict=True):
        np.testing.assert_array_equal(var.numpy(), before, err_msg=var.name)
    for var, before in zip(trained, trained_before, strict=True):
        assert not np.array_equal(var.numpy(), before), f"{var.name} did not change"
    names = [v.name for v in trained]
    assert any("head/fc/kernel" in n for n in names) == train_classifier
    assert any("conv_dw/bias" in n for n in names) == (train_bias == "all")
    assert any("fc1/bias" in n for n in names) == (train_bias != "none")


@pytest.mark.slow
def test_fit_reduces_the_loss():
    tf.keras.utils.set_random_seed(0)
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=4, **TINY_CONVNEXT)
    x, y = make_task_dataset("quadrant", 128, seed=0)
    history = compile_for_task(model).fit(x, y, batch_size=32, epochs=8, verbose=0).history["loss"]
    assert history[-1] < 0.8 * history[0], history


def test_convert_to_lora_and_back(images):
    tf.keras.utils.set_random_seed(0)
    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    expected = regular(images).numpy()
    lora = lora_ckpt.convert_to_lora_model(regular, lora_rank=3, lora_alpha=6.0)
    assert type(lora) is LoRAConvNeXt and lora.cfg.lora_rank == 3
    np.testing.assert_array_equal(lora(images).numpy(), expected)  # B starts at zero

    randomize_lora(lora)
    lora_out = lora(images).numpy()
    kernels = snapshot(v for v in lora.weights if "kernel" in v.name)
    back = lora_ckpt.convert_to_regular_model(lora)
    assert type(back) is tfimm.architectures.ConvNeXt
    np.testing.assert_allclose(back(images).numpy(), lora_out, rtol=1e-5, atol=1e-5)
    assert not np.allclose(back(images).numpy(), expected, atol=1e-4)
    # Independently: the regular model with W + scaling * A @ B folded in by numpy.
    fold_lora_into(regular, lora)
    np.testing.assert_allclose(back(images).numpy(), regular(images).numpy(), rtol=1e-5, atol=1e-5)
    for var, before in zip((v for v in lora.weights if "kernel" in v.name), kernels, strict=True):
        np.testing.assert_array_equal(var.numpy(), before)  # the LoRA model is untouched
    assert not any(layer.merged for _, layer in lora_ckpt.lora_layers(lora))


def test_convert_accepts_config_overrides():
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
    with pytest.raises(MergeStateError, match="already merged"):
        lora_ckpt.merge_lora_weights(tiny_convnext)
    lora_ckpt.unmerge_lora_weights(tiny_convnext)
    for var, b in zip(kernels, before, strict=True):
        np.testing.assert_array_equal(var.numpy(), b)
    with pytest.raises(MergeStateError, match="nothing to unmerge"):
        lora_ckpt.unmerge_lora_weights(tiny_convnext)


def test_disabling_lora_gives_the_base_model(images):
    tf.keras.utils.set_random_seed(0)
    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    lora = lora_ckpt.convert_to_lora_model(regular, lora_rank=2)
    randomize_lora(lora)
    assert not np.allclose(lora.predict(images, verbose=0), regular(images).numpy(), atol=1e-4)
    lora_ckpt.set_lora_enabled(lora, False)
    # predict() was traced with LoRA on; disabling must not reuse that graph.
    np.testing.assert_array_equal(lora.predict(images, verbose=0), regular(images).numpy())


def test_tfimm_transfer_weights_interplay(images):
    """The tfimm README's functional-model recipe works with our layers."""
    from tfimm.models import transfer_weights

    tf.keras.utils.set_random_seed(0)
    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    lora = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    names = list(lora_ckpt.LORA_WEIGHT_NAMES)
    transfer_weights(regular, lora, weights_to_ignore=lora_ckpt.LORA_WEIGHT_NAMES)
    assert names == lora_ckpt.LORA_WEIGHT_NAMES  # tfimm appends to the list it is given
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
        # tfimm's parameters first, in its order; ours may add optional ones after.
        assert list(ours)[: len(theirs)] == list(theirs), name
        assert all(
            ours[p].default is not inspect.Parameter.empty for p in list(ours)[len(theirs) :]
        )
        for p in theirs:
            assert ours[p].kind == theirs[p].kind and ours[p].default == theirs[p].default, (
                name,
                p,
            )
    for cls in ("LoRADense", "LoRAConv2D"):
        assert hasattr(lora_ckpt, cls)
    assert lora_ckpt.lora_architecture(tfimm.architectures.ConvNeXt) is LoRAConvNeXt
    assert lora_ckpt.lora_config(tfimm.architectures.ConvNeXt) is LoRAConvNeXtConfig
    assert lora_ckpt.lora_base_architecture(LoRAConvNeXt) is tfimm.architectures.ConvNeXt
    # tfimm's two names first; DoRA's magnitude and the merged/enabled state follow.
    assert lora_ckpt.LORA_WEIGHT_NAMES[:2] == tfimm_lora.LORA_WEIGHT_NAMES
    assert lora_ckpt.LORA_WEIGHT_NAMES[2:] == ["lora_magnitude", "lora_state"]
    assert lora_ckpt.merge_weights is lora_ckpt.merge_lora_weights


def test_model_errors():
    with pytest.raises(UnknownModelError, match="convnext_tiny"):
        lora_ckpt.create_model("convnext_tinny")
    with pytest.raises(LoRAConfigError, match="lora_rank must be a positive integer"):
        lora_ckpt.create_model("convnext_tiny", lora_rank=0, **TINY_CONVNEXT)
    with pytest.raises(LoRAConfigError, match="Unknown config field"):
        lora_ckpt.create_model("convnext_tiny", lora_rnak=2, **TINY_CONVNEXT)
    with pytest.raises(LoRAConfigError, match="train_bias"):
        lora_ckpt.create_model("convnext_tiny", lora_train_bias="some", **TINY_CONVNEXT)
    with pytest.raises(UnregisteredArchitectureError, match="Registered architectures"):
        lora_ckpt.convert_to_lora_model(tf.keras.Sequential([tf.keras.layers.Dense(2)]))
    with pytest.raises(UnregisteredArchitectureError):
        lora_ckpt.convert_to_regular_model(tf.keras.Sequential([tf.keras.layers.Dense(2)]))
    model = lora_ckpt.create_model("convnext_tiny", **TINY_CONVNEXT)
    with pytest.raises(LayerNotFoundError, match="matches no layer"):
        lora_ckpt.lora_trainable_weights(model, trainable_layers=["head/fcc"])
    with pytest.raises(LayerNotFoundError, match="no LoRA layers"):
        lora_ckpt.merge_lora_weights(tf.keras.Sequential([tf.keras.layers.Dense(2)]))
    # tfimm raised ValueError for these: code that catches ValueError still does.
    for bad in (dict(model_name="convnext_tinny"), dict(model_name="convnext_tiny", lora_rank=0)):
        with pytest.raises(ValueError):
            lora_ckpt.create_model(**bad, **TINY_CONVNEXT)


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
    with pytest.raises(UnregisteredArchitectureError, match="not registered"):
        lora_ckpt.lora_base_architecture(Other)

    # Replacing a registered architecture warns, at the caller's line; the
    # conftest fixture puts LoRAConvNeXt back after this test.
    convnext = tfimm.architectures.ConvNeXt

    class Impostor(convnext):
        cfg_class = FlexConfig

    with pytest.warns(
        UserWarning, match="already registered a LoRA version LoRAConvNeXt"
    ) as record:
        register_lora_architecture(Impostor)
    assert record[0].filename == __file__
    assert lora_ckpt.lora_architecture(convnext) is Impostor
