"""Every tfimm family gets LoRA: one reduced model of each, converted end to end."""

import dataclasses

import numpy as np
import pytest
import tfimm
from tfimm.models import model_class, model_config

import lora_ckpt
from lora_ckpt import tf

# The smallest name of each family, shrunk to build in well under a second. Layer
# scales that start near zero in untrained models (ConvNeXt, PoolFormer, ResMLP,
# ResNet's last BatchNorm) are set to 1 so that an update shows in the output.
REDUCED = {
    "cait_xxs24_224": dict(
        input_size=(32, 32), patch_size=8, embed_dim=16, nb_blocks=1, nb_heads=2
    ),
    "convmixer_768_32": dict(
        input_size=(32, 32), patch_size=(4, 4), embed_dim=16, depth=2, kernel_size=3
    ),
    # Layer scale starts at 1e-6 in an untrained ConvNeXt: it would hide the update.
    "convnext_tiny": dict(
        input_size=(32, 32), embed_dim=(8, 16, 24, 32), nb_blocks=(1, 1, 1, 1), init_scale=1.0
    ),
    "deit_tiny_patch16_224": dict(
        input_size=(32, 32), patch_size=8, embed_dim=16, nb_blocks=2, nb_heads=2
    ),
    "resnet18": dict(
        input_size=(32, 32),
        nb_blocks=(1, 1, 1, 1),
        nb_channels=(8, 16, 16, 16),
        zero_init_last_bn=False,
    ),
    "mobilenet_v2_050": dict(
        input_size=(32, 32),
        architecture=(("ds_r1_k3_s1_c16",), ("ir_r1_k3_s2_e6_c24",)),
        nb_features=32,
    ),
    "efficientnet_b0": dict(
        input_size=(32, 32),
        architecture=(("ds_r1_k3_s1_e1_c16_se0.25",), ("ir_r1_k3_s2_e6_c24_se0.25",)),
        nb_features=32,
    ),
    "gmlp_ti16_224": dict(input_size=(32, 32), patch_size=8, embed_dim=16, nb_blocks=2),
    "resmlp_12_224": dict(
        input_size=(32, 32), patch_size=8, embed_dim=16, nb_blocks=2, init_values=1.0
    ),
    "pit_ti_224": dict(
        input_size=(64, 64), embed_dim=(8, 16, 32), nb_blocks=(1, 1, 1), nb_heads=(1, 2, 4)
    ),
    "poolformer_s12": dict(
        input_size=(32, 32), embed_dim=(8, 16, 24, 32), nb_blocks=(1, 1, 1, 1), init_scale=1.0
    ),
    "pvt_tiny": dict(
        input_size=(64, 64),
        embed_dim=(8, 16, 24, 32),
        nb_blocks=(1, 1, 1, 1),
        nb_heads=(1, 1, 1, 1),
    ),
    "pvt_v2_b0": dict(
        input_size=(64, 64),
        embed_dim=(8, 16, 24, 32),
        nb_blocks=(1, 1, 1, 1),
        nb_heads=(1, 1, 1, 1),
    ),
    "resnetv2_50x1_bit_distilled": dict(
        input_size=(32, 32), nb_blocks=(1, 1), nb_channels=(128, 128), stem_width=32
    ),
    "swin_tiny_patch4_window7_224": dict(
        input_size=(32, 32), embed_dim=8, nb_blocks=(2, 2), nb_heads=(1, 1), window_size=2
    ),
    "vgg11": dict(input_size=(32, 32), layers=(8, "M", 16, "M"), nb_features=16),
}


def _base(name):
    tf.keras.utils.set_random_seed(0)
    cfg = dataclasses.replace(model_config(name), nb_classes=5, **REDUCED[name])
    model = model_class(name)(cfg=cfg)
    model(model.dummy_inputs)
    return model


def test_every_family_is_covered():
    families = {model_class(name).__name__ for name in tfimm.list_models()}
    tested = {model_class(name).__name__ for name in REDUCED}
    assert families == tested
    supported = lora_ckpt.supported_architectures()
    assert sorted(supported["model_names"]) == sorted(tfimm.list_models())
    assert len(supported["model_names"]) == 282


# Slow lane: test_architectures covers ConvNeXt and ViT in the fast lane.
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REDUCED))
def test_family_converts_trains_saves_and_converts_back(name, tmp_path):
    base = _base(name)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, *base.cfg.input_size, 3)).astype("float32")
    expected = base(images).numpy()

    lora = lora_ckpt.convert_to_lora_model(base, lora_rank=2)
    layers = lora_ckpt.lora_layers(lora)
    assert layers, f"{name}: no layer got LoRA"
    np.testing.assert_array_equal(lora(images).numpy(), expected)

    for _, layer in layers:
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            var.assign(rng.normal(0, 0.3, var.shape).astype("float32"))
    adapted = lora(images).numpy()
    assert np.abs(adapted - expected).max() > 1e-3, "random LoRA weights change nothing"

    lora_ckpt.save_lora_state(lora, str(tmp_path / "adapter"))
    fresh = lora_ckpt.convert_to_lora_model(base, lora_rank=2)
    lora_ckpt.load_lora_state(fresh, str(tmp_path / "adapter"))
    np.testing.assert_array_equal(fresh(images).numpy(), adapted)

    regular = lora_ckpt.convert_to_regular_model(lora)
    assert type(regular) is type(base)
    np.testing.assert_allclose(regular(images).numpy(), adapted, rtol=1e-5, atol=1e-5)
