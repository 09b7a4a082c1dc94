"""A LoRA layer's merge state and variant objects (lora_ckpt/layers/merge_state.py, variants.py)."""

import numpy as np
import pytest

from lora_ckpt import tf
from lora_ckpt.errors import MergeStateError
from lora_ckpt.layers import DORA, PLAIN_LORA, LoRADense


def _dense(**kwargs):
    tf.keras.utils.set_random_seed(0)
    layer = LoRADense(4, lora_rank=2, **kwargs)
    layer.build((None, 3))
    rng = np.random.default_rng(0)
    layer.kernel_lora_b.assign(rng.normal(size=layer.kernel_lora_b.shape).astype("float32"))
    return layer


def test_the_variant_is_chosen_once_at_creation():
    plain, dora = _dense(), _dense(lora_use_dora=True)
    assert plain.lora_variant is PLAIN_LORA and dora.lora_variant is DORA
    assert plain.lora_magnitude is None
    assert [v.name.split("/")[-1] for v in dora.lora_trainable_weights(False)] == [
        "kernel_lora_a:0",
        "kernel_lora_b:0",
        "lora_magnitude:0",
    ]
    np.testing.assert_array_equal(plain.dora_output_scale().numpy(), np.ones(4, "float32"))
    # DoRA's factor is magnitude / ||W0 + scaling * A @ B||, in numpy.
    w = dora.kernel.numpy().astype(np.float64)
    updated = w + dora.scaling * dora.kernel_lora_a.numpy() @ dora.kernel_lora_b.numpy()
    expected = np.linalg.norm(w, axis=0) / np.linalg.norm(updated, axis=0)
    np.testing.assert_allclose(dora.dora_output_scale().numpy(), expected, rtol=1e-5)
    # The same factor for an adapter's tensors outside the layer (a pool's slot).
    outside = DORA.adapter_output_scale(dora.kernel, dora.lora_delta(), dora.lora_magnitude)
    np.testing.assert_allclose(outside.numpy(), expected, rtol=1e-5)
    ones = PLAIN_LORA.adapter_output_scale(plain.kernel, plain.lora_delta())
    np.testing.assert_array_equal(ones.numpy(), np.ones(4, "float32"))


def test_asking_about_the_merge_state_changes_nothing():
    layer = _dense()
    base = layer.kernel.numpy().copy()
    layer.merge_weights()
    merged = layer.kernel.numpy().copy()

    layer.kernel.assign(np.zeros_like(merged))  # weights of another model loaded over it
    for _ in range(2):  # the same answer every time: no query forgets anything
        assert layer.merged and layer.lora_enabled
        with pytest.raises(MergeStateError, match="merged weights were loaded over it"):
            layer.base_kernel()

    layer.kernel.assign(merged)  # its own merged weights again: the kept base fits them
    layer.unmerge_weights()
    assert not layer.merged
    np.testing.assert_array_equal(layer.kernel.numpy(), base)


def test_the_state_variable_is_the_truth_after_a_restore():
    layer = _dense()
    layer._lora_state.assign([0, 0])  # what restoring a disabled model's checkpoint does
    assert not layer.lora_enabled and not layer.lora_branch_active()
    layer._lora_state.assign([1, 1])  # a merged model's checkpoint: its base is not known
    assert layer.merged
    with pytest.raises(MergeStateError, match="base is not known"):
        layer.unmerge_weights()
