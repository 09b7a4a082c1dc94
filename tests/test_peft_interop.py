"""PEFT adapters in and out: files built from PEFT's format specification.

PEFT's ``save_pretrained`` writes ``adapter_config.json`` (LoraConfig's
fields) and ``adapter_model.safetensors`` with keys
``base_model.model.<timm module>.lora_A.weight`` ``[r, in]`` (Conv2d
``[r, in, kh, kw]``), ``.lora_B.weight`` ``[out, r]`` (Conv2d
``[out, r, 1, 1]``), DoRA's ``.lora_magnitude_vector`` (``[out]``, Conv2d
``[1, out, 1, 1]``), ``<module>.base_layer.bias`` for adapted layers' biases
and ``modules_to_save`` parameters under their own names. The tests write such
files with the safetensors library and compare what lora_ckpt computes with
them against a numpy fold ``W + s * B @ A`` into timm's layout of the base.
"""

import json
import math
import os
import pickle

import numpy as np
import pytest
import tfimm
from safetensors.numpy import load_file, save_file

import lora_ckpt
from lora_ckpt.errors import AdapterMismatchError, CorruptAdapterError, LoRAConfigError
from lora_ckpt.traversal import named_variables

from .conftest import TINY_CONVNEXT, TINY_VIT

P = "base_model.model."
# Which tfimm variable holds each timm module's weight (tfimm's layer names).
VIT_KERNELS = {
    "patch_embed.proj": "patch_embed/projection/kernel",
    **{
        f"blocks.{b}.{m}": f"blocks/{b}/{m.replace('.', '/')}/kernel"
        for b in (0, 1)
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    },
}
CONVNEXT_KERNELS = {
    "stem.0": "stem_conv/kernel",
    "stages.1.downsample.1": "stages/1/downsample_conv/kernel",
    **{
        f"stages.{s}.blocks.0.mlp.{fc}": f"stages/{s}/blocks/0/mlp/{fc}/kernel"
        for s in (0, 1)
        for fc in ("fc1", "fc2")
    },
}


def peft_config(**fields) -> dict:
    """adapter_config.json as PEFT's LoraConfig.to_dict writes it (defaults filled)."""
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": "timm/test",
        "revision": None, "inference_mode": True, "r": 8, "lora_alpha": 8, "lora_dropout": 0.1,
        "target_modules": None, "exclude_modules": None, "fan_in_fan_out": False,
        "bias": "none", "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "use_dora": False, "lora_bias": False, "peft_version": "0.17.0",
    }  # fmt: skip
    config.update(fields)
    return config


def write_peft(directory, config: dict, tensors: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as handle:
        json.dump(config, handle)
    return str(directory)


def lora_tensors(rng, module: str, kernel_shape, rank: int, dora: bool) -> dict:
    """PEFT's tensors of one module, from the tfimm kernel's shape."""
    if len(kernel_shape) == 2:
        fan_in, out = kernel_shape
        a, b = (rank, fan_in), (out, rank)
    else:
        kh, kw, fan_in, out = kernel_shape
        a, b = (rank, fan_in, kh, kw), (out, rank, 1, 1)
    tensors = {
        f"{P}{module}.lora_A.weight": rng.normal(0, 0.3, a).astype("float32"),
        f"{P}{module}.lora_B.weight": rng.normal(0, 0.3, b).astype("float32"),
    }
    if dora:
        shape = (out,) if len(kernel_shape) == 2 else (1, out, 1, 1)
        tensors[f"{P}{module}.lora_magnitude_vector"] = rng.uniform(0.5, 2, shape).astype("float32")
    return tensors


def numpy_fold(base, kernels: dict, tensors: dict, scalings: dict, full: dict):
    """A regular copy of ``base`` with every update folded in, in numpy (timm's layout)."""
    folded = tfimm.create_model(base.cfg.name, **_config(base))
    folded(folded.dummy_inputs)
    folded.set_weights(base.get_weights())
    variables = named_variables(folded)
    for module, key in kernels.items():
        kernel = variables[key].numpy().astype(np.float64)
        # timm's layout: Linear [out, in], Conv2d [out, in, kh, kw].
        w = kernel.T if kernel.ndim == 2 else np.transpose(kernel, (3, 2, 0, 1))
        a = tensors[f"{P}{module}.lora_A.weight"].astype(np.float64)
        b = tensors[f"{P}{module}.lora_B.weight"].astype(np.float64)
        delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)
        w = w + scalings[module] * delta
        magnitude = tensors.get(f"{P}{module}.lora_magnitude_vector")
        if magnitude is not None:  # DoRA: per output row of W
            norm = np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(axis=1))
            w = w * (magnitude.reshape(-1) / norm).reshape((-1,) + (1,) * (w.ndim - 1))
        kernel = w.T if w.ndim == 2 else np.transpose(w, (2, 3, 1, 0))
        variables[key].assign(kernel.astype("float32"))
    for key, value in full.items():
        variables[key].assign(value.T if value.ndim == 2 else value)
    return folded


def _config(model) -> dict:
    return {k: v for k, v in TINY_VIT.items()} if "vit" in model.cfg.name else dict(TINY_CONVNEXT)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    model = tfimm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    model(model.dummy_inputs)
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0, 0.2, w.shape).astype("float32") for w in model.get_weights()])
    weights = str(tmp_path_factory.mktemp("vit") / "base.h5")
    model.save_weights(weights)
    return model, weights


def vit_peft(rng, dora=True, rslora=True):
    """A PEFT adapter of the ViT: qkv/proj/fc1/fc2 and the patch embedding (``proj``
    matches both ``attn.proj`` and ``patch_embed.proj``, as in PEFT), fc1 at rank 2,
    fc2 at alpha 3, and a new head in modules_to_save."""
    config = peft_config(
        r=4, lora_alpha=8, target_modules=["qkv", "proj", "fc1", "fc2"],
        rank_pattern={"fc1": 2}, alpha_pattern={"mlp.fc2": 3}, modules_to_save=["head"],
        use_dora=dora, use_rslora=rslora,
    )  # fmt: skip
    shapes = {"patch_embed.proj": (8, 8, 3, 16)}
    for b in (0, 1):
        shapes.update({f"blocks.{b}.attn.qkv": (16, 48), f"blocks.{b}.attn.proj": (16, 16)})
        shapes.update({f"blocks.{b}.mlp.fc1": (16, 64), f"blocks.{b}.mlp.fc2": (64, 16)})
    tensors, scalings = {}, {}
    for module, shape in shapes.items():
        rank = 2 if module.endswith("fc1") else 4
        alpha = 3 if module.endswith("fc2") else 8
        tensors.update(lora_tensors(rng, module, shape, rank, dora))
        scalings[module] = alpha / math.sqrt(rank) if rslora else alpha / rank
    head = rng.normal(0, 0.3, (4, 16)).astype("float32")  # timm's Linear [out, in]
    tensors.update(
        {f"{P}head.weight": head, f"{P}head.bias": rng.normal(0, 0.3, 4).astype("float32")}
    )
    full = {"head/kernel": head, "head/bias": tensors[f"{P}head.bias"]}
    return config, tensors, scalings, full


def _imported_vit(vit, tmp_path):
    base, _ = vit
    config, tensors, scalings, full = vit_peft(np.random.default_rng(2))
    peft_dir = write_peft(tmp_path / "peft", config, tensors)
    out = lora_ckpt.import_peft(peft_dir, base, str(tmp_path / "ours"), labels=list("abcd"))
    x = np.random.default_rng(3).normal(size=(3, 32, 32, 3)).astype("float32")
    expected = numpy_fold(base, VIT_KERNELS, tensors, scalings, full)(x).numpy()
    return out, x, expected


def test_vit_import_computes_the_numpy_fold(vit, tmp_path):
    base, weights = vit
    out, x, expected = _imported_vit(vit, tmp_path)
    assert not np.allclose(expected, base(x).numpy(), atol=1e-2)  # the update is not nothing

    state = lora_ckpt.read_lora_state(out)
    assert state.config.layers["blocks/0/mlp/fc1"].rank == 2
    assert state.config.layers["blocks/1/mlp/fc2"].alpha == 3.0
    assert state.config.layers["patch_embed/projection"].dora
    assert state.config.saved.extra_layers == ("head",)
    assert state.config.metadata["labels"] == list("abcd")
    model = lora_ckpt.from_adapter(out, base_weights=weights)
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # the pool traces its serving graphs
def test_the_pool_serves_an_imported_dora_rslora_adapter(vit, tmp_path):
    base, _ = vit
    out, x, expected = _imported_vit(vit, tmp_path)
    pool_model = lora_ckpt.convert_to_lora_model(
        base,
        lora_target_layers=["patch_embed/projection", "*attn/qkv", "*attn/proj", "*fc1", "*fc2"],
        lora_rank=4,
    )
    pool = lora_ckpt.AdapterPool(pool_model, capacity=2, max_rank=4)
    pool.load("peft", out)
    np.testing.assert_allclose(pool.predict(x, adapter="peft"), expected, rtol=1e-5, atol=1e-5)


def test_convnext_import_with_conv_stem_downsample_regex_targets_and_lora_only_biases(tmp_path):
    base = tfimm.create_model("convnext_tiny", **TINY_CONVNEXT)
    base(base.dummy_inputs)
    rng = np.random.default_rng(4)
    shapes = {
        "stem.0": (4, 4, 3, 8),
        "stages.1.downsample.1": (2, 2, 8, 16),
        "stages.0.blocks.0.mlp.fc1": (8, 32),
        "stages.0.blocks.0.mlp.fc2": (32, 8),
        "stages.1.blocks.0.mlp.fc1": (16, 64),
        "stages.1.blocks.0.mlp.fc2": (64, 16),
    }
    config = peft_config(
        r=3, lora_alpha=6, target_modules=r".*(mlp\.fc\d|stem\.0|downsample\.1)",
        alpha_pattern={"stem.0": 1.5}, bias="lora_only",
    )  # fmt: skip
    tensors, scalings, full = {}, {}, {}
    for module, shape in shapes.items():
        tensors.update(lora_tensors(rng, module, shape, 3, dora=False))
        scalings[module] = (1.5 if module == "stem.0" else 6) / 3
        bias = rng.normal(0, 0.3, shape[-1]).astype("float16")  # widened exactly
        tensors[f"{P}{module}.base_layer.bias"] = bias
        full[CONVNEXT_KERNELS[module].replace("/kernel", "/bias")] = bias.astype("float32")
    peft_dir = write_peft(tmp_path / "peft", config, tensors)
    out = lora_ckpt.import_peft(peft_dir, base, str(tmp_path / "ours"))
    x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype("float32")
    expected = numpy_fold(base, CONVNEXT_KERNELS, tensors, scalings, full)(x).numpy()
    assert not np.allclose(expected, base(x).numpy(), atol=1e-2)  # the update is not nothing
    layers = lora_ckpt.read_lora_state(out).config.layers
    assert sorted(layers) == sorted(k.rsplit("/", 1)[0] for k in CONVNEXT_KERNELS.values())
    assert layers["stem_conv"].type == "LoRAConv2D" and layers["stem_conv"].scaling == 0.5
    model = lora_ckpt.convert_to_lora_model(
        base,
        lora_target_layers=list(layers),
        lora_rank=3,
        lora_alpha=6.0,
        lora_alpha_pattern={"stem_conv": 1.5},
        lora_train_bias="lora_only",
        lora_train_classifier=False,
    )
    assert lora_ckpt.load_lora_state(model, out).complete
    np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_export_writes_peft_keys_and_import_of_the_export_is_bitwise(vit, tmp_path):
    base, _ = vit
    config, tensors, _, _ = vit_peft(np.random.default_rng(6))
    ours = lora_ckpt.import_peft(
        write_peft(tmp_path / "peft", config, tensors), base, str(tmp_path / "a")
    )
    exported = lora_ckpt.export_peft(
        ours, str(tmp_path / "exported"), base_model_name_or_path="timm/x"
    )
    written = load_file(os.path.join(exported, "adapter_model.safetensors"))
    assert set(written) == set(tensors)  # PEFT's own keys, shapes and values
    for key, value in tensors.items():
        assert written[key].dtype == np.float32 and np.array_equal(written[key], value), key
    with open(os.path.join(exported, "adapter_config.json")) as handle:
        document = json.load(handle)
    assert document["peft_type"] == "LORA" and document["base_model_name_or_path"] == "timm/x"
    assert (
        document["use_dora"] and document["use_rslora"] and document["modules_to_save"] == ["head"]
    )
    assert document["r"] == 4 and document["lora_alpha"] == 8

    again = lora_ckpt.import_peft(exported, base, str(tmp_path / "b"))
    first, second = lora_ckpt.read_lora_state(ours), lora_ckpt.read_lora_state(again)
    assert list(first.tensors) == list(second.tensors)
    for key in first.tensors:
        assert first.tensors[key].tobytes() == second.tensors[key].tobytes(), key
    for part in ("layers", "variables", "saved", "base_model", "metadata"):
        assert getattr(first.config, part) == getattr(second.config, part), part


@pytest.mark.slow  # trains; the export round trip stays fast in the test above
def test_a_trained_adapter_exports_and_comes_back_bitwise(tmp_path):
    model = lora_ckpt.create_model(
        "convnext_tiny",
        lora_rank=4,
        lora_rank_pattern={"stages/1/*": 2},
        lora_alpha_pattern={"*fc2": 2.0},
        lora_train_bias="all",
        **TINY_CONVNEXT,
    )
    from .conftest import randomize_lora

    randomize_lora(model, seed=7)
    path = lora_ckpt.save_lora_state(model, str(tmp_path / "a"), labels=list("wxyz"))
    exported = lora_ckpt.export_peft(path, str(tmp_path / "peft"))
    regular = lora_ckpt.convert_to_regular_model(model, merge=False)
    back = lora_ckpt.import_peft(exported, regular, str(tmp_path / "b"))
    first, second = lora_ckpt.read_lora_state(path), lora_ckpt.read_lora_state(back)
    assert list(first.tensors) == list(second.tensors)
    for key in first.tensors:
        assert first.tensors[key].tobytes() == second.tensors[key].tobytes(), key
    for part in ("layers", "variables", "saved", "base_model", "metadata"):
        assert getattr(first.config, part) == getattr(second.config, part), part
    keys = load_file(os.path.join(exported, "adapter_model.safetensors"))
    assert f"{P}stages.0.blocks.0.mlp.fc1.base_layer.bias" in keys  # an adapted layer's bias
    assert f"{P}stem.1.bias" in keys and f"{P}head.fc.weight" in keys  # a norm's; the head


def _refused(vit, tmp_path, config, tensors, error, *words):
    base, _ = vit
    peft_dir = write_peft(tmp_path / "peft", config, tensors)
    with pytest.raises(error) as caught:
        lora_ckpt.import_peft(peft_dir, base, str(tmp_path / "ours"))
    for word in words:
        assert word in str(caught.value)
    assert not os.path.exists(tmp_path / "ours" / "adapter_config.json")


def _qkv(rank=4, **fields):
    rng = np.random.default_rng(8)
    tensors = {}
    for b in (0, 1):
        tensors.update(lora_tensors(rng, f"blocks.{b}.attn.qkv", (16, 48), rank, False))
    return peft_config(r=4, target_modules=["qkv"], **fields), tensors


def test_a_module_the_model_lacks_is_refused_by_name(vit, tmp_path):
    config, tensors = _qkv()
    tensors.update(lora_tensors(np.random.default_rng(0), "blocks.7.attn.qkv", (16, 48), 4, False))
    _refused(vit, tmp_path, config, tensors, AdapterMismatchError, "blocks.7.attn.qkv")


def test_shapes_that_disagree_are_refused_by_module(vit, tmp_path):
    config, tensors = _qkv()
    tensors[f"{P}blocks.1.attn.qkv.lora_A.weight"] = np.zeros((4, 17), "float32")
    _refused(vit, tmp_path, config, tensors, AdapterMismatchError, "blocks.1.attn.qkv", "[4, 17]")


def test_a_rank_other_than_the_configs_is_refused(vit, tmp_path):
    config, tensors = _qkv(rank=2)
    _refused(vit, tmp_path, config, tensors, AdapterMismatchError, "blocks.0.attn.qkv")


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"fan_in_fan_out": True}, ["fan_in_fan_out"]),
        ({"init_lora_weights": "pissa"}, ["pissa", "path_initial_model_for_weight_conversion"]),
        ({"init_lora_weights": "pissa_niter_4"}, ["pissa_niter_4"]),
        ({"init_lora_weights": "olora"}, ["olora"]),
        ({"init_lora_weights": "corda"}, ["corda"]),
        ({"lora_bias": True}, ["lora_bias"]),
        ({"layers_to_transform": [0]}, ["layers_to_transform"]),
        ({"peft_type": "IA3"}, ["IA3"]),
        ({"target_modules": "all-linear"}, ["all-linear"]),
    ],
)
def test_options_that_cannot_map_exactly_are_refused(vit, tmp_path, fields, words):
    config, tensors = _qkv()
    config.update(fields)
    _refused(vit, tmp_path, config, tensors, LoRAConfigError, *words)


def test_a_converted_pissa_adapter_imports(vit, tmp_path):
    config, tensors = _qkv()  # save_pretrained's conversion writes init_lora_weights=True
    base, _ = vit
    lora_ckpt.import_peft(write_peft(tmp_path / "p", config, tensors), base, str(tmp_path / "o"))


def test_dora_flag_and_weights_must_agree(vit, tmp_path):
    config, tensors = _qkv(use_dora=True)
    _refused(vit, tmp_path, config, tensors, AdapterMismatchError, "lora_magnitude_vector")


def test_a_target_without_weights_and_weights_without_a_target_are_refused(vit, tmp_path):
    config, tensors = _qkv()
    del (
        tensors[f"{P}blocks.1.attn.qkv.lora_A.weight"],
        tensors[f"{P}blocks.1.attn.qkv.lora_B.weight"],
    )
    _refused(vit, tmp_path / "1", config, tensors, AdapterMismatchError, "blocks.1.attn.qkv")
    config, tensors = _qkv()
    tensors[f"{P}head.weight"] = np.zeros((4, 16), "float32")  # no modules_to_save names it
    _refused(vit, tmp_path / "2", config, tensors, AdapterMismatchError, "head.weight")


def test_a_pickled_adapter_is_refused_and_never_unpickled(vit, tmp_path):
    config, _ = _qkv()
    peft_dir = tmp_path / "peft"
    os.makedirs(peft_dir)
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (peft_dir / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CorruptAdapterError, match="pickle"):
        lora_ckpt.import_peft(str(peft_dir), vit[0], str(tmp_path / "ours"))
    assert not marker.exists()


@pytest.mark.slow  # the same calls as the fast tests, through the CLI
def test_cli_import_peft_and_export_peft(vit, tmp_path, capsys):
    from lora_ckpt.cli import main
    from lora_ckpt.serving.store import write_base

    base, _ = vit
    store = str(tmp_path / "store")
    write_base(store, "vit_tiny_patch16_224", dict(TINY_VIT), {}, base)
    config, tensors = _qkv()
    peft_dir = write_peft(tmp_path / "peft", config, tensors)
    assert main(["import-peft", peft_dir, "--store", store, "--name", "qkv"]) == 0
    assert main(["list", store]) == 0
    assert "qkv" in capsys.readouterr().out
    out = str(tmp_path / "exported")
    assert main(["export", "--store", store, "--adapter", "qkv", "--out", out, "--peft"]) == 0
    written = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert set(written) == set(tensors)
    assert all(np.array_equal(written[k], tensors[k]) for k in tensors)
    assert main(["import-peft", str(tmp_path / "nowhere"), "--store", store, "--name", "x"]) == 1


def test_a_new_head_of_another_width_comes_with_the_adapter(vit, tmp_path):
    base, weights = vit
    config, tensors = _qkv(modules_to_save=["head"])
    rng = np.random.default_rng(9)
    head = rng.normal(0, 0.3, (6, 16)).astype("float32")  # timm: num_classes=6
    tensors.update({f"{P}head.weight": head, f"{P}head.bias": np.zeros(6, "float32")})
    out = lora_ckpt.import_peft(
        write_peft(tmp_path / "peft", config, tensors), base, str(tmp_path / "o")
    )
    state = lora_ckpt.read_lora_state(out)
    assert state.config.base_model.config["nb_classes"] == 6
    np.testing.assert_array_equal(state.tensors["head/kernel"], head.T)
    model = lora_ckpt.from_adapter(out, base_weights=weights)
    assert model(np.zeros((1, 32, 32, 3), "float32")).shape == (1, 6)
