import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Remote stores' verified cache: the tests' own, never the user's ~/.cache.
os.environ.setdefault(
    "LORA_CKPT_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "lora_ckpt-test-cache"),
)

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import registry, tf
from lora_ckpt.traversal import named_variables

# The one tiny ConvNeXt of the suite: two stages of one block each, 32x32
# inputs, 4 classes (the synthetic tasks' classes); builds in well under a
# second. Layer scale starts at 1 as in a trained model: tfimm's 1e-6 makes
# each block the identity and starves LoRA of gradient. No stochastic depth:
# its random draws come from TensorFlow's global RNG, which no checkpoint
# holds, so training would not repeat bit for bit.
TINY_CONVNEXT = dict(
    embed_dim=(8, 16),
    nb_blocks=(1, 1),
    input_size=(32, 32),
    nb_classes=4,
    init_scale=1.0,
    drop_path_rate=0.0,
)
# The one tiny ViT: 16 patches of 8x8, two blocks of width 16.
TINY_VIT = dict(
    input_size=(32, 32), patch_size=8, embed_dim=16, nb_blocks=2, nb_heads=2, nb_classes=4
)


def count(variables) -> int:
    """How many numbers the variables hold."""
    return int(sum(np.prod(v.shape) for v in variables))


def compile_for_task(model, learning_rate=1e-2):
    """Compiles for the synthetic classification tasks (integer labels, logits out)."""
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def randomize_lora(model_or_layer, seed=0, scale=0.1):
    """Gives every LoRA B (and A) non-zero values, so merge and round-trip
    checks cannot pass because the update is zero."""
    rng = np.random.default_rng(seed)
    layers = (
        [model_or_layer]
        if lora_ckpt.is_lora_layer(model_or_layer)
        else [layer for _, layer in lora_ckpt.lora_layers(model_or_layer)]
    )
    assert layers, "no LoRA layers to randomize"
    for layer in layers:
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            var.assign(rng.normal(0, scale, var.shape).astype(var.dtype.as_numpy_dtype))
        if layer.lora_magnitude is not None:  # DoRA: move it off the base's column norms
            noise = rng.uniform(0.5, 1.5, layer.lora_magnitude.shape)
            layer.lora_magnitude.assign(layer.lora_magnitude * noise.astype("float32"))


def lora_delta(layer) -> np.ndarray:
    """``scaling * A @ B`` in the kernel's shape, computed in numpy (float64),
    independently of the layer's own merge."""
    a = layer.kernel_lora_a.numpy().astype(np.float64)
    b = layer.kernel_lora_b.numpy().astype(np.float64)
    return layer.scaling * np.tensordot(a, b, axes=1)


def fold_lora_into(regular, lora_model):
    """Sets each kernel of ``regular`` to ``W + scaling * A @ B`` of the LoRA
    layer at the same path in ``lora_model``, in numpy: the merged model,
    computed without lora_ckpt's merge."""
    regular_vars = named_variables(regular)
    layers = lora_ckpt.lora_layers(lora_model)
    assert layers, "no LoRA layers to fold"
    for path, layer in layers:
        kernel = regular_vars[f"{path}/kernel"]
        merged = layer.kernel.numpy().astype(np.float64) + lora_delta(layer)
        kernel.assign(merged.astype(kernel.dtype.as_numpy_dtype))


def snapshot(variables):
    return [v.numpy().copy() for v in variables]


def _registry_tables():
    return (
        registry._lora_model_class,
        registry._lora_model_base_class,
        registry._lora_model_config,
    )


@pytest.fixture(autouse=True)
def restore_lora_registry():
    """Undoes what a test registers: the LoRA architecture registry is global."""
    saved = [dict(table) for table in _registry_tables()]
    yield
    for table, before in zip(_registry_tables(), saved, strict=True):
        table.clear()
        table.update(before)


@pytest.fixture
def tiny_convnext():
    """A fresh tiny LoRA ConvNeXt (rank 2) per test."""
    tf.keras.utils.set_random_seed(0)
    return lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)


@pytest.fixture
def images():
    return np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype("float32")


def emptied(pool):
    """A shared pool back to its start: nothing merged, nothing resident, "off" active."""
    if pool.merged is not None:
        pool.unmerge()
    for name in pool.names():
        pool.unload(name)
    assert pool.names() == [] and pool.active == "off"
    return pool
