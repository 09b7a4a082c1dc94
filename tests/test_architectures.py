"""Every supported architecture through one harness, on small configs; real
parameter counts for the full ViT-Tiny, Swin-Tiny and ResNet-50 (slow lane)."""

import numpy as np
import pytest
import tfimm

import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.errors import (
    LayerNotFoundError,
    LoRAConfigError,
    UnregisteredArchitectureError,
    UnsupportedLayerError,
)
from lora_ckpt.synthetic import make_task_dataset
from lora_ckpt.traversal import named_variables

from .conftest import (
    TINY_CONVNEXT,
    TINY_VIT,
    compile_for_task,
    count,
    fold_lora_into,
    randomize_lora,
    snapshot,
)

# zero_init_last_bn=False: a zero BatchNorm scale (tfimm's untrained init)
# would cut every residual branch off from the gradient.
SMALL_RESNET = dict(
    input_size=(32, 32), nb_blocks=(1, 1, 1, 1), stem_width=8, nb_classes=4, zero_init_last_bn=False
)
# name, tfimm model, small config (4 classes, no stochastic depth)
SMALL = {
    "convnext": ("convnext_tiny", TINY_CONVNEXT),
    "vit": ("vit_tiny_patch16_224", TINY_VIT),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(
            input_size=(56, 56),
            embed_dim=8,
            nb_blocks=(2, 2),
            nb_heads=(2, 2),
            nb_classes=4,
            drop_path_rate=0.0,
        ),
    ),
    "resnet_basic": ("resnet18", dict(SMALL_RESNET, nb_channels=(8, 8, 16, 16))),
    "resnet_bottleneck": ("resnet50", dict(SMALL_RESNET, nb_channels=(4, 4, 8, 8))),
    "mixer": (
        "mixer_s32_224",
        dict(input_size=(32, 32), patch_size=8, embed_dim=16, nb_blocks=2, nb_classes=4),
    ),
}


def inputs_for(config, n=4, seed=0):
    size = config["input_size"][0]
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype("float32")


def regular_model(key):
    name, config = SMALL[key]
    tf.keras.utils.set_random_seed(0)
    return tfimm.create_model(name, **config), config


# Every architecture in the fast lane but the basic-block ResNet (the
# bottleneck one has the same LoRA layers, and 1x1 convolutions besides).
# ConvNeXt and ViT in the fast lane; the others (and every family's own
# round trip, tests/test_families.py) in the slow lane.
@pytest.mark.parametrize(
    "key",
    [k if k in ("convnext", "vit") else pytest.param(k, marks=pytest.mark.slow) for k in SMALL],
)
def test_conversion_merge_and_round_trip_agree_with_numpy(key):
    regular, config = regular_model(key)
    x = inputs_for(config)
    base_out = regular(x).numpy()
    lora = lora_ckpt.convert_to_lora_model(regular, lora_rank=2)
    assert lora_ckpt.lora_layers(lora)
    np.testing.assert_array_equal(lora(x).numpy(), base_out)  # B starts at zero

    randomize_lora(lora, scale=0.3)
    lora_out = lora(x).numpy()
    assert not np.allclose(lora_out, base_out, atol=1e-3)
    kernels = [layer.kernel for _, layer in lora_ckpt.lora_layers(lora)]
    before = snapshot(kernels)
    lora_ckpt.merge_lora_weights(lora)
    merged_out = lora(x).numpy()
    lora_ckpt.unmerge_lora_weights(lora)
    for var, kernel in zip(kernels, before, strict=True):
        np.testing.assert_array_equal(var.numpy(), kernel, err_msg=var.name)
    back = lora_ckpt.convert_to_regular_model(lora)
    assert type(back) is type(regular) and not lora_ckpt.lora_layers(back)

    # The independent computation: W + scaling * A @ B folded in by numpy.
    fold_lora_into(regular, lora)
    expected = regular(x).numpy()
    for name, out in (("lora", lora_out), ("merged", merged_out), ("back", back(x).numpy())):
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("key", SMALL)
def test_training_changes_only_lora_then_merge_save_load(key, tmp_path):
    regular, config = regular_model(key)
    lora = lora_ckpt.convert_to_lora_model(regular, lora_rank=2, lora_train_bias="lora_only")
    trained = {id(v) for v in lora.trainable_weights}
    frozen = [v for v in named_variables(lora).values() if id(v) not in trained]
    frozen_before = [v.numpy().copy() for v in frozen]
    size = config["input_size"][0]
    x, y = make_task_dataset("quadrant", 32, image_size=size, seed=0)
    compile_for_task(lora).fit(x, y, batch_size=16, epochs=2, verbose=0)

    for var, before in zip(frozen, frozen_before, strict=True):
        np.testing.assert_array_equal(var.numpy(), before, err_msg=var.name)
    changed = [v for v in lora.trainable_weights if "kernel_lora_b" in v.name]
    assert changed and all(np.abs(v.numpy()).max() > 0 for v in changed)

    unmerged = lora(x).numpy()
    lora_ckpt.merge_lora_weights(lora)
    np.testing.assert_allclose(lora(x).numpy(), unmerged, rtol=1e-5, atol=1e-5)
    lora_ckpt.unmerge_lora_weights(lora)

    lora_ckpt.save_lora_state(lora, str(tmp_path / "adapter"))
    fresh = lora_ckpt.convert_to_lora_model(regular, lora_rank=2, lora_train_bias="lora_only")
    lora_ckpt.load_lora_state(fresh, str(tmp_path / "adapter"))
    np.testing.assert_array_equal(fresh(x).numpy(), unmerged)


def test_layer_groups_choose_the_layers():
    name, config = SMALL["vit"]
    both = lora_ckpt.create_model(name, lora_rank=2, **config)
    attention = lora_ckpt.create_model(
        name, lora_rank=2, lora_layer_groups=("attention",), **config
    )
    mlp = lora_ckpt.create_model(name, lora_rank=2, lora_layer_groups=("mlp",), **config)
    paths = lambda m: [p for p, _ in lora_ckpt.lora_layers(m)]  # noqa: E731
    assert paths(attention) == [
        "blocks/0/attn/qkv",
        "blocks/0/attn/proj",
        "blocks/1/attn/qkv",
        "blocks/1/attn/proj",
    ]
    assert paths(mlp) == [
        "blocks/0/mlp/fc1",
        "blocks/0/mlp/fc2",
        "blocks/1/mlp/fc1",
        "blocks/1/mlp/fc2",
    ]
    assert sorted(paths(both)) == sorted(paths(attention) + paths(mlp))
    with pytest.raises(
        LoRAConfigError, match=r"choose one or more of \['attention', 'head', 'mlp'\]"
    ):
        lora_ckpt.create_model(name, lora_layer_groups=("ffn",), **config)

    resnet, config = SMALL["resnet_bottleneck"]
    only_3x3 = lora_ckpt.create_model(resnet, lora_rank=2, lora_layer_groups=("conv2",), **config)
    assert [type(layer).__name__ for _, layer in lora_ckpt.lora_layers(only_3x3)] == [
        "LoRAConv2D"
    ] * 4
    assert all(layer.kernel_size == (3, 3) for _, layer in lora_ckpt.lora_layers(only_3x3))


@pytest.mark.slow
def test_vit_tiny_rank4_parameter_counts():
    model = lora_ckpt.create_model("vit_tiny_patch16_224", lora_rank=4, lora_train_classifier=False)
    d, hidden, blocks, r, tokens = 192, 768, 12, 4, 14 * 14 + 1
    block = (
        (2 * d)
        + (d * 3 * d + 3 * d)
        + (d * d + d)
        + (2 * d)
        + (d * hidden + hidden)
        + (hidden * d + d)
    )
    base = (16 * 16 * 3 * d + d) + d + tokens * d + blocks * block + 2 * d + (d * 1000 + 1000)
    lora = blocks * r * ((d + 3 * d) + (d + d) + (d + hidden) + (hidden + d))  # qkv, proj, fc1, fc2
    assert base == 5_717_416
    assert model.count_params() == base + lora
    assert count(model.trainable_weights) == lora == 147_456


@pytest.mark.slow
def test_swin_tiny_rank4_parameter_counts():
    model = lora_ckpt.create_model(
        "swin_tiny_patch4_window7_224", lora_rank=4, lora_train_classifier=False
    )
    dims, depths, heads, r, window = (96, 192, 384, 768), (2, 2, 6, 2), (3, 6, 12, 24), 4, 7

    def block(d, h):
        return (
            2 * d
            + (d * 3 * d + 3 * d)
            + (2 * window - 1) ** 2 * h
            + (d * d + d)
            + 2 * d
            + (d * 4 * d + 4 * d)
            + (4 * d * d + d)
        )

    base = 4 * 4 * 3 * 96 + 96 + 2 * 96  # patch embedding conv and its norm
    for i, (d, depth, h) in enumerate(zip(dims, depths, heads, strict=True)):
        base += depth * block(d, h)
        if i < 3:
            base += 2 * (4 * d) + 4 * d * 2 * d  # patch merging: norm, reduction
    base += 2 * 768 + 768 * 1000 + 1000  # final norm, head
    lora = sum(
        depth * r * (4 * d + 2 * d + 5 * d + 5 * d) for d, depth in zip(dims, depths, strict=True)
    )
    trainable = count(model.trainable_weights)
    assert trainable == lora == 282_624
    # Swin also holds non-trainable buffers (relative position index, masks):
    buffers = count(v for v in named_variables(model).values() if not v.trainable)
    assert model.count_params() - buffers == base + lora


@pytest.mark.slow
def test_resnet50_rank4_parameter_counts():
    model = lora_ckpt.create_model("resnet50", lora_rank=4, lora_train_classifier=False)
    r, widths, depths = 4, (64, 128, 256, 512), (3, 4, 6, 3)
    base = 7 * 7 * 3 * 64 + 4 * 64  # stem conv (no bias) and BatchNorm (4 per channel)
    lora = 0
    c_in = 64
    for w, depth in zip(widths, depths, strict=True):
        for i in range(depth):
            base += c_in * w + 4 * w + 9 * w * w + 4 * w + w * 4 * w + 4 * 4 * w
            if i == 0:
                base += c_in * 4 * w + 4 * 4 * w  # downsample conv and BatchNorm
            lora += r * (c_in + w) + r * (9 * w + w) + r * (w + 4 * w)  # conv1, conv2, conv3
            c_in = 4 * w
    base += 2048 * 1000 + 1000
    # timm's 25,557,032 plus the BatchNorm moving statistics Keras counts too.
    assert base == 25_557_032 + 2 * 26_560
    assert model.count_params() == base + lora
    assert count(model.trainable_weights) == lora == 294_144


def test_resnet_batchnorm_is_frozen_by_default():
    name, config = SMALL["resnet_basic"]
    model = lora_ckpt.create_model(name, lora_rank=2, **config)
    bns = [m for m in model.submodules if isinstance(m, tf.keras.layers.BatchNormalization)]
    assert bns and not any(bn.trainable for bn in bns)
    free = lora_ckpt.create_model(name, lora_rank=2, lora_freeze_batchnorm=False, **config)
    assert all(
        m.trainable for m in free.submodules if isinstance(m, tf.keras.layers.BatchNormalization)
    )


def test_supported_architectures_lists_groups():
    supported = lora_ckpt.supported_architectures()
    for base in ("ConvNeXt", "ViT", "SwinTransformer", "ResNet", "MLPMixer", "EfficientNet"):
        assert supported[base]["layer_groups"], base
    assert supported["ViT"]["default_groups"] == ["attention", "mlp"]
    assert supported["functional/Sequential"]["layer_types"] == ["Dense", "Conv2D", "PadConv2D"]


def test_unsupported_architecture_lists_what_is_available():
    class Custom(tf.keras.Model):
        def call(self, x):
            return x

    with pytest.raises(UnregisteredArchitectureError, match="Registered architectures"):
        lora_ckpt.convert_to_lora_model(Custom())


# --- functional and Sequential models -------------------------------------


@pytest.fixture(scope="module")
def mobilenet():
    tf.keras.utils.set_random_seed(0)
    return tf.keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=4, alpha=0.35, classifier_activation=None
    )


@pytest.mark.slow
def test_mobilenetv2_converts_trains_and_round_trips(mobilenet, tmp_path):
    x, y = make_task_dataset("quadrant", 32, seed=0)
    expected = mobilenet(x).numpy()
    lora = lora_ckpt.convert_to_lora_model(
        mobilenet,
        target_layers=["block_*_project", "Conv_1"],
        lora_rank=4,
        lora_trainable_layers=["predictions"],
    )
    assert isinstance(lora, tf.keras.Model) and type(lora) is type(mobilenet)
    converted = [p for p, _ in lora_ckpt.lora_layers(lora)]
    assert "Conv_1" in converted and "block_16_project" in converted and len(converted) == 17
    np.testing.assert_array_equal(lora(x).numpy(), expected)

    names = sorted(v.name.split(":")[0] for v in lora.trainable_weights)
    assert all("kernel_lora_" in n or n.startswith("predictions/") for n in names)
    lora_count = count(
        var
        for _, layer in lora_ckpt.lora_layers(lora)
        for var in (layer.kernel_lora_a, layer.kernel_lora_b)
    )
    assert (
        count(lora.trainable_weights)
        == lora_count + 4 * int(lora.get_layer("predictions").kernel.shape[0]) + 4
    )

    frozen_before = {
        k: v.numpy().copy()
        for k, v in named_variables(lora).items()
        if "lora" not in k and not k.startswith("predictions")
    }
    compile_for_task(lora).fit(x, y, batch_size=16, epochs=2, verbose=0)
    after = named_variables(lora)
    for key, before in frozen_before.items():  # BatchNorm statistics included
        np.testing.assert_array_equal(after[key].numpy(), before, err_msg=key)
    trained = lora(x).numpy()
    assert not np.allclose(trained, expected)

    lora_ckpt.save_lora_state(lora, str(tmp_path / "adapter"))
    saved = lora_ckpt.inspect_adapter(str(tmp_path / "adapter"))
    assert saved["saved"]["extra_layers"] == ["predictions"]
    fresh = lora_ckpt.convert_to_lora_model(
        mobilenet,
        target_layers=["block_*_project", "Conv_1"],
        lora_rank=4,
        lora_trainable_layers=["predictions"],
    )
    lora_ckpt.load_lora_state(fresh, str(tmp_path / "adapter"))
    np.testing.assert_array_equal(fresh(x).numpy(), trained)

    regular = lora_ckpt.convert_to_regular_model(lora)
    assert not lora_ckpt.lora_layers(regular)
    np.testing.assert_allclose(regular(x).numpy(), trained, rtol=1e-4, atol=1e-4)


def test_sequential_model_conversion():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 3)),
            tf.keras.layers.Conv2D(4, 3, name="conv"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(3, name="fc"),
        ]
    )
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    lora = lora_ckpt.convert_to_lora_model(
        model, target_layers="*", lora_rank=2, lora_train_bias="lora_only"
    )
    assert isinstance(lora, tf.keras.Sequential)
    assert [type(layer).__name__ for layer in lora.layers] == ["LoRAConv2D", "Flatten", "LoRADense"]
    trained = {id(v) for v in lora.trainable_weights}
    assert sorted(k for k, v in named_variables(lora).items() if id(v) in trained) == [
        "conv/bias",
        "conv/kernel_lora_a",
        "conv/kernel_lora_b",
        "fc/bias",
        "fc/kernel_lora_a",
        "fc/kernel_lora_b",
    ]
    randomize_lora(lora)
    np.testing.assert_allclose(
        lora_ckpt.convert_to_regular_model(lora)(x).numpy(), lora(x).numpy(), rtol=1e-5, atol=1e-5
    )


def small_convnet():
    """MobileNetV2's layer kinds and names, in a few layers."""
    inputs = tf.keras.Input((16, 16, 3))
    h = tf.keras.layers.Conv2D(4, 3, strides=2, name="Conv1")(inputs)
    h = tf.keras.layers.DepthwiseConv2D(3, padding="same", name="block_1_depthwise")(h)
    h = tf.keras.layers.Conv2D(8, 1, name="Conv_1")(h)
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(4, name="predictions")(h))


def test_generic_conversion_errors():
    model = small_convnet()
    with pytest.raises(
        LayerNotFoundError, match=r"'attention_\*' matches no layer .*Candidates include: .*'Conv1'"
    ):
        lora_ckpt.convert_to_lora_model(model, target_layers=["attention_*"])
    with pytest.raises(UnsupportedLayerError, match="'block_1_depthwise' matches only layers"):
        lora_ckpt.convert_to_lora_model(model, target_layers=["block_1_depthwise"])
    with pytest.raises(LoRAConfigError, match="target_layers="):
        lora_ckpt.convert_to_lora_model(model)
    with pytest.raises(LoRAConfigError, match="lora_train_bias='all'"):
        lora_ckpt.convert_to_lora_model(model, target_layers=["Conv_1"], lora_train_bias="all")
    with pytest.raises(LoRAConfigError, match="Unknown argument"):
        lora_ckpt.convert_to_lora_model(model, target_layers=["Conv_1"], rank=2)
    regular, _ = regular_model("vit")
    with pytest.raises(LoRAConfigError, match="lora_layer_groups"):
        lora_ckpt.convert_to_lora_model(regular, target_layers=["*qkv*"])


def test_head_group_gives_the_classifier_lora_instead_of_full_training():
    name, config = SMALL["convnext"]
    model = lora_ckpt.create_model(
        name, lora_rank=2, lora_layer_groups=("mlp", "head"), lora_train_bias="lora_only", **config
    )
    assert isinstance(model.fc, lora_ckpt.LoRADense)
    trained = {id(v) for v in model.trainable_weights}
    assert id(model.fc.kernel) not in trained  # not trained in full
    assert {id(model.fc.kernel_lora_a), id(model.fc.kernel_lora_b), id(model.fc.bias)} <= trained
    assert "head" in lora_ckpt.supported_architectures()["ConvNeXt"]["layer_groups"]


# Slow lane: the fast lane loads base files in test_state (ConvNeXt, both formats).
@pytest.mark.slow
@pytest.mark.parametrize("key", SMALL)
def test_base_weights_file_loads_into_the_lora_model(key, tmp_path):
    regular, config = regular_model(key)
    rng = np.random.default_rng(0)
    for var in regular.weights:  # not what a fresh model starts with
        var.assign(var + rng.normal(0, 0.01, var.shape).astype(var.dtype.as_numpy_dtype))
    regular.save_weights(str(tmp_path / "base.h5"))
    regular.save_weights(str(tmp_path / "ckpt" / "base"))
    x = inputs_for(config)
    for path in (str(tmp_path / "base.h5"), str(tmp_path / "ckpt" / "base")):
        lora = lora_ckpt.create_model(SMALL[key][0], lora_rank=2, **config)
        lora_ckpt.load_base_weights(lora, path)
        np.testing.assert_array_equal(lora(x).numpy(), regular(x).numpy(), err_msg=path)


# A reduced SE-ResNeXt-26d: grouped 3x3 convolutions (cardinality 4) in every block.
SMALL_RESNEXT = dict(
    input_size=(32, 32),
    nb_blocks=(1, 1, 1, 1),
    nb_channels=(16, 16, 32, 32),
    cardinality=4,
    base_width=16,
    stem_width=8,
    nb_classes=4,
    zero_init_last_bn=False,
)


@pytest.mark.slow  # test_every_model_converts covers it across all 282 names
def test_resnext_converts_by_default_leaving_out_its_grouped_convolutions():
    tf.keras.utils.set_random_seed(0)
    regular = tfimm.create_model("seresnext26d_32x4d", **SMALL_RESNEXT)
    x = inputs_for(SMALL_RESNEXT)
    base_out = regular(x).numpy()
    with pytest.warns(UserWarning, match="no LoRA version") as caught:
        lora = lora_ckpt.convert_to_lora_model(regular, lora_rank=2)
    message = " ".join(str(w.message) for w in caught if "no LoRA version" in str(w.message))
    assert len([w for w in caught if "no LoRA version" in str(w.message)]) == 1  # one warning
    assert all(f"blocks/{i}/conv2 (Conv2D, groups=4)" in message for i in range(4))

    paths = [p for p, _ in lora_ckpt.lora_layers(lora)]
    assert paths == [f"blocks/{i}/conv{j}" for i in range(4) for j in (1, 3)]
    np.testing.assert_array_equal(lora(x).numpy(), base_out)
    randomize_lora(lora, scale=0.3)
    adapted = lora(x).numpy()
    assert not np.allclose(adapted, base_out, atol=1e-3)
    back = lora_ckpt.convert_to_regular_model(lora)
    np.testing.assert_allclose(back(x).numpy(), adapted, rtol=1e-4, atol=1e-4)

    # Groups that name only grouped convolutions are refused, as before.
    with pytest.raises(UnsupportedLayerError, match="groups=4"):
        lora_ckpt.convert_to_lora_model(regular, lora_layer_groups=("conv2",))
    with pytest.raises(UnsupportedLayerError, match="no\\s+low-rank|without a LoRA version"):
        lora_ckpt.create_model(
            "seresnext26d_32x4d", lora_target_layers=["blocks/0/conv2"], **SMALL_RESNEXT
        )
