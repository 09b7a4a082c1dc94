import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt._tf import tf

# A ConvNeXt small enough to build in well under a second: two stages of one
# block each, 32x32 inputs, 5 classes. Layer scale starts at 1 as in a trained
# model: tfimm's 1e-6 makes each block the identity and starves LoRA of gradient.
TINY_CONVNEXT = dict(
    embed_dim=(8, 16), nb_blocks=(1, 1), input_size=(32, 32), nb_classes=5, init_scale=1.0
)


def randomize_lora(model_or_layer, seed=0, scale=0.1):
    """Gives every LoRA B (and A) non-zero values, so merge and round-trip
    checks cannot pass because the update is zero."""
    rng = np.random.default_rng(seed)
    layers = (
        [model_or_layer]
        if lora_ckpt.is_lora_layer(model_or_layer)
        else [layer for _, layer in lora_ckpt.lora_layers(model_or_layer)]
    )
    for layer in layers:
        for var in (layer.kernel_lora_a, layer.kernel_lora_b):
            var.assign(rng.normal(0, scale, var.shape).astype(var.dtype.as_numpy_dtype))


def snapshot(variables):
    return [v.numpy().copy() for v in variables]


@pytest.fixture
def tiny_convnext():
    """A fresh tiny LoRA ConvNeXt (rank 2) per test."""
    tf.keras.utils.set_random_seed(0)
    return lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)


@pytest.fixture
def images():
    return np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype("float32")
