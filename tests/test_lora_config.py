"""lora_ckpt.LoraConfig and get_lora_model: PEFT's typed config and get_peft_model,
and modules_to_save for any layer of a tfimm model."""

import dataclasses

import numpy as np
import pytest
import tfimm

import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.errors import LoRAConfigError
from lora_ckpt.traversal import named_variables

from .conftest import TINY_CONVNEXT, TINY_VIT


def test_every_field_has_help_text_and_peft_defaults():
    fields = {f.name: f for f in dataclasses.fields(lora_ckpt.LoraConfig)}
    assert {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_dora"} <= set(fields)
    assert {"use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"} <= set(fields)
    assert "init_lora_weights" in fields
    assert all(f.metadata.get("help") for f in fields.values())
    config = lora_ckpt.LoraConfig()
    assert (config.r, config.lora_alpha, config.bias, config.init_lora_weights) == (
        8,
        8,
        "none",
        True,
    )


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"r": 0}, "r must be an integer"),
        ({"r": 2.5}, "r must be an integer"),
        ({"lora_alpha": -1}, "lora_alpha must be a positive"),
        ({"lora_dropout": 1.5}, "lora_dropout must be in [0, 1)"),
        ({"bias": "some"}, "bias must be one of"),
        ({"target_modules": 5}, "target_modules must be a list"),
        ({"modules_to_save": "head"}, "modules_to_save must be a list"),
        ({"rank_pattern": {"fc1": 0}}, "rank_pattern['fc1']"),
        ({"use_dora": "yes"}, "use_dora must be True or False"),
        ({"init_lora_weights": "pissa"}, "changes the base model's weights"),
        ({"target_modules": "all-linear"}, "list the modules"),
    ],
)
def test_invalid_fields_raise_plain_messages(fields, words):
    with pytest.raises(LoRAConfigError) as caught:
        lora_ckpt.LoraConfig(**fields)
    assert words in str(caught.value)


def test_get_lora_model_on_a_tfimm_vit_uses_timm_module_names():
    base = tfimm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    config = lora_ckpt.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["qkv", "fc2"],
        rank_pattern={"blocks.1.attn.qkv": 2},
        modules_to_save=["head", "norm"],  # 'norm': the final norm, not blocks' norm1/norm2
        bias="lora_only",
        use_rslora=True,
    )
    model = lora_ckpt.get_lora_model(base, config)
    layers = dict(lora_ckpt.lora_layers(model))
    assert sorted(layers) == sorted(
        f"blocks/{b}/{m}" for b in (0, 1) for m in ("attn/qkv", "mlp/fc2")
    )
    assert layers["blocks/1/attn/qkv"].lora_rank == 2 and layers["blocks/0/attn/qkv"].lora_rank == 4
    assert layers["blocks/0/mlp/fc2"].scaling == 8 / 2  # rsLoRA: alpha / sqrt(4)
    keys = {
        k for k, v in named_variables(model).items() if any(v is w for w in model.trainable_weights)
    }
    expected = {f"{p}/{w}" for p in layers for w in ("kernel_lora_a", "kernel_lora_b", "bias")}
    expected |= {"head/kernel", "head/bias", "norm/gamma", "norm/beta"}
    assert keys == expected


@pytest.mark.slow  # trains an epoch
def test_modules_to_save_trains_and_saves_any_layer_of_a_tfimm_model(tmp_path):
    model = lora_ckpt.create_model(
        "convnext_tiny", lora_rank=2, lora_trainable_layers=["stem_norm"], **TINY_CONVNEXT
    )
    trainable = {id(v) for v in model.trainable_weights}
    variables = named_variables(model)
    assert id(variables["stem_norm/gamma"]) in trainable and id(variables["fc/kernel"]) in trainable
    assert id(variables["stem_conv/kernel"]) not in trainable
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    model.compile(
        optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    before = variables["stem_norm/gamma"].numpy().copy()
    model.fit(x, np.arange(8) % 4, epochs=1, verbose=0)
    assert not np.array_equal(before, variables["stem_norm/gamma"].numpy())
    path = lora_ckpt.save_lora_state(model, str(tmp_path / "a"))
    config = lora_ckpt.read_lora_state(path).config
    assert set(config.saved.extra_layers) == {"stem_norm", "fc"}
    assert config.variables["stem_norm/gamma"].kind == "extra"

    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    peft_style = lora_ckpt.get_lora_model(
        regular, lora_ckpt.LoraConfig(target_modules=["fc1"], modules_to_save=["stem.1"])
    )
    assert peft_style.lora_trainable_layers() == ["stem_norm"]  # the head trains only if named


def test_modules_to_save_patterns_must_name_a_layer():
    with pytest.raises(LoRAConfigError, match="lora_trainable_layers entry"):
        lora_ckpt.create_model("convnext_tiny", lora_trainable_layers=["nothing"], **TINY_CONVNEXT)
    regular = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    with pytest.raises(LoRAConfigError, match="names no module"):
        lora_ckpt.get_lora_model(
            regular, lora_ckpt.LoraConfig(target_modules=["fc1"], modules_to_save=["x"])
        )
    with pytest.raises(LoRAConfigError, match="matches no LoRA-capable module"):
        lora_ckpt.get_lora_model(regular, lora_ckpt.LoraConfig(target_modules=["qkv"]))


def test_get_lora_model_on_a_functional_model_uses_layer_paths():
    inputs = tf.keras.Input((6,))
    hidden = tf.keras.layers.Dense(8, name="hidden")(inputs)
    outputs = tf.keras.layers.Dense(3, name="out")(hidden)
    model = tf.keras.Model(inputs, outputs)
    lora_model = lora_ckpt.get_lora_model(
        model, lora_ckpt.LoraConfig(r=2, target_modules=["hidden"], modules_to_save=["out"])
    )
    assert [path for path, _ in lora_ckpt.lora_layers(lora_model)] == ["hidden"]
    names = {v.name for v in lora_model.trainable_weights}
    assert any("out" in n and "kernel" in n for n in names)
    x = np.ones((2, 6), "float32")
    np.testing.assert_allclose(lora_model(x).numpy(), model(x).numpy(), rtol=1e-6)
