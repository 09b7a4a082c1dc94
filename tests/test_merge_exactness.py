"""Merging, conversion back and a pool's answer compute what the unmerged LoRA model computes.

Checked on every tfimm family, with non-zero LoRA weights, in float64.

Why float64: untrained tfimm models at their default configuration can be
chaotic. A fresh MobileNetV2 (``mobilenet_v2_050``; BatchNorm statistics at
their initial 0 and 1, activations growing to ~100) amplifies a relative
change of 1e-7 in its input about 1e8 times: its *base* logits move by ~0.6
(out of ~4) when the input moves by one float32 rounding step. A merged
kernel ``W0 + s * A @ B`` rounds differently from ``conv(x, W0) + s *
conv(x, A) @ B``, so in float32 such a model's merged output differs by the
same ~0.6 however correct the merge is; in float64 it agrees to ~3e-8. A
structural mistake (a padding the merged kernel misses, an op the merge
ignores) changes outputs by the size of the update in either precision, so
float64 keeps every such check and loses only the rounding noise.
"""

import contextlib
import dataclasses

import numpy as np
import pytest
import tfimm
from tfimm.models import model_class, model_config

import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.traversal import named_variables

RTOL = 1e-5  # relative to the largest output of the unmerged model

# One name per family; each family's own default configuration. Fully
# convolutional families run on 64x64 inputs (no layer depends on the size);
# families with position embeddings or fixed-size heads keep their own size.
FAMILY_NAMES = {
    "cait_xxs24_224": {},
    "convmixer_768_32": {"input_size": (64, 64)},
    "convnext_tiny": {"input_size": (64, 64)},
    "deit_tiny_patch16_224": {},
    "resnet18": {"input_size": (64, 64)},
    "mobilenet_v2_050": {"input_size": (64, 64)},
    "efficientnet_b0": {"input_size": (64, 64)},
    "gmlp_ti16_224": {},
    "resmlp_12_224": {},
    "pit_ti_224": {},
    "poolformer_s12": {"input_size": (64, 64)},
    "pvt_tiny": {},
    "pvt_v2_b0": {"input_size": (64, 64)},
    "resnetv2_50x1_bit_distilled": {"input_size": (64, 64)},
    "swin_tiny_patch4_window7_224": {},
    "vgg11": {},
}


@contextlib.contextmanager
def float64():
    """Builds and runs Keras layers in float64 inside the block."""
    before = tf.keras.backend.floatx()
    tf.keras.backend.set_floatx("float64")
    try:
        yield
    finally:
        tf.keras.backend.set_floatx(before)


def wake_up_scales(model) -> None:
    """Sets untrained residual scales to 1: ConvNeXt's and CaiT's layer scale
    (1e-6, 1e-5), ResMLP's and PoolFormer's, ResNet's zero-initialised last
    BatchNorm. They would hide the LoRA update, and the checks would pass
    because the update changes nothing."""
    for path, var in named_variables(model).items():
        name = path.rsplit("/", 1)[-1]
        if not any(key in name for key in ("gamma", "scale", "ls")):
            continue
        values = var.numpy()
        if values.size and np.all(np.abs(values) <= 1e-4):
            var.assign(np.ones_like(values))


def randomize(model, seed=0, scale=0.05) -> None:
    rng = np.random.default_rng(seed)
    for _, layer in lora_ckpt.lora_layers(model):
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            var.assign(rng.normal(0, scale, var.shape).astype(var.dtype.as_numpy_dtype))


def assert_same_answer(actual, expected, what):
    error = np.abs(actual - expected).max()
    bound = RTOL * np.abs(expected).max()
    assert error <= bound, f"{what}: off by {error:.3g}, more than {bound:.3g}"


def check_every_way_to_answer(base, x, tmp_path, **lora_kwargs):
    """Unmerged LoRA model vs merge, convert back and a pool (unmerged, merged)."""
    lora = lora_ckpt.convert_to_lora_model(base, lora_rank=2, **lora_kwargs)
    assert lora_ckpt.lora_layers(lora)
    base_out = base(x).numpy()
    randomize(lora)
    expected = lora(x).numpy()
    effect = np.abs(expected - base_out).max()
    # The update must show, or every comparison below would pass trivially.
    assert effect > 100 * RTOL * np.abs(expected).max(), f"the update changes little: {effect}"

    lora_ckpt.merge_lora_weights(lora)
    assert_same_answer(lora(x).numpy(), expected, "merge_lora_weights")
    lora_ckpt.unmerge_lora_weights(lora)
    assert_same_answer(lora_ckpt.convert_to_regular_model(lora)(x).numpy(), expected, "regular")

    lora_ckpt.save_lora_state(lora, str(tmp_path / "adapter"))
    served = lora_ckpt.convert_to_lora_model(base, lora_rank=2, **lora_kwargs)
    pool = lora_ckpt.AdapterPool(served, capacity=1)
    pool.load("a", str(tmp_path / "adapter"))
    assert_same_answer(pool.predict(x, adapter="a"), expected, "pool")
    pool.merge("a")
    assert_same_answer(pool.predict(x, adapter="a"), expected, "pool, merged")
    pool.unmerge()


def test_every_family_has_a_name_here():
    families = {model_class(name).__name__ for name in tfimm.list_models()}
    assert families == {model_class(name).__name__ for name in FAMILY_NAMES}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILY_NAMES))
def test_default_configuration_merges_exactly(name, tmp_path):
    with float64():
        tf.keras.utils.set_random_seed(0)
        base = tfimm.create_model(name, nb_classes=3, **FAMILY_NAMES[name])
        wake_up_scales(base)
        x = np.random.default_rng(1).uniform(-1, 1, (1, *base.cfg.input_size, 3))
        check_every_way_to_answer(base, x, tmp_path)


# Reduced MobileNetV2 and EfficientNet, with LoRA also on the 3x3 stride-2
# stem: tfimm's PadConv2D pads before convolving (symmetric padding in
# MobileNetV2, TF "same" in EfficientNet), and the LoRA branch and the
# merged kernel must see the same padding.
REDUCED_PADDED = {
    "mobilenet_v2_050": dict(
        architecture=(("ds_r1_k3_s1_c16",), ("ir_r1_k3_s2_e6_c24",), ("ir_r1_k5_s2_e6_c32",)),
        nb_features=32,
    ),
    "efficientnet_b0": dict(
        architecture=(("ds_r1_k3_s1_e1_c16_se0.25",), ("ir_r1_k5_s2_e6_c24_se0.25",)),
        nb_features=32,
    ),
}


@pytest.mark.parametrize(
    "name",
    # One in the fast lane catches a padding mismatch; the other runs with the slow lane.
    [n if n.startswith("mobilenet") else pytest.param(n, marks=pytest.mark.slow)
     for n in sorted(REDUCED_PADDED)],
)  # fmt: skip
def test_padded_convolutions_merge_exactly(name, tmp_path):
    with float64():
        tf.keras.utils.set_random_seed(0)
        cfg = dataclasses.replace(
            model_config(name), nb_classes=3, input_size=(33, 33), **REDUCED_PADDED[name]
        )
        base = model_class(name)(cfg=cfg)
        base(base.dummy_inputs)
        x = np.random.default_rng(1).uniform(-1, 1, (2, 33, 33, 3))
        targets = ("conv_stem", "conv_head", "blocks/*/conv_pw", "blocks/*/conv_pwl")
        check_every_way_to_answer(base, x, tmp_path, lora_target_layers=targets)
