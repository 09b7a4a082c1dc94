"""from_adapter's size check: by arithmetic on the config, before anything is
built, and a refused call leaves the process as it was (issue 21, item 3)."""

import dataclasses
import json
import time

import numpy as np
import pytest
import tfimm
from tfimm.models import model_config

import lora_ckpt
from lora_ckpt.errors import CorruptAdapterError
from lora_ckpt.state.adapter_model import estimate_parameters

from .conftest import TINY_CONVNEXT, TINY_VIT, count


@pytest.fixture
def saved(tmp_path):
    """A tiny ConvNeXt adapter and its base weights; ``edit(**config)`` rewrites
    the adapter's recorded base config."""
    lora_ckpt.tf.keras.utils.set_random_seed(0)
    model = lora_ckpt.create_model("convnext_tiny", lora_rank=2, **TINY_CONVNEXT)
    path, base = str(tmp_path / "a"), str(tmp_path / "base.h5")
    lora_ckpt.save_lora_state(model, path)
    lora_ckpt.convert_to_regular_model(model, merge=False).save_weights(base)
    config_file = tmp_path / "a" / "adapter_config.json"
    good = json.loads(config_file.read_text())

    def edit(**changes):
        document = json.loads(json.dumps(good))
        document["base_model"]["config"].update(changes)
        config_file.write_text(json.dumps(document))

    return model, path, base, edit


def test_a_refused_config_leaves_models_of_its_class_working(saved, images):
    model, path, base, edit = saved
    expected = model(images).numpy()
    edit(nb_classes=10**6)  # 16 million parameters: more than the base weights file holds
    with pytest.raises(CorruptAdapterError, match="parameters"):
        lora_ckpt.from_adapter(path, base_weights=base)
    np.testing.assert_array_equal(model(images).numpy(), expected)
    np.testing.assert_array_equal(model.predict(images, verbose=0), expected)
    # The adapter itself still rebuilds once its config is right again.
    edit()
    rebuilt = lora_ckpt.from_adapter(path, base_weights=base)
    np.testing.assert_allclose(rebuilt(images).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model(images).numpy(), expected)


def test_a_config_of_43_billion_parameters_is_refused_by_arithmetic(saved):
    _, path, base, edit = saved
    edit(embed_dim=[8, 2_300], nb_blocks=[1, 1_000])  # about 43e9 parameters if built
    for kwargs in (dict(base_weights=base), dict(check_base=False)):
        start = time.monotonic()
        with pytest.raises(CorruptAdapterError, match="about 4[2-4],"):
            lora_ckpt.from_adapter(path, **kwargs)
        assert time.monotonic() - start < 5.0  # a bound, not a benchmark: 16 s before


def test_a_small_max_parameters_is_refused_before_building(saved):
    _, path, _, _ = saved
    with pytest.raises(CorruptAdapterError, match="more than 1,000"):
        lora_ckpt.from_adapter(path, check_base=False, max_parameters=1_000)


def test_every_tfimm_config_at_its_defaults_is_estimated_under_the_default_limit():
    limit = 2_000_000_000
    names = tfimm.list_models()
    assert len(names) == 282
    for name in names:
        config = dataclasses.asdict(model_config(name))
        estimate = estimate_parameters(type(model_config(name)), config)
        assert estimate is not None, name
        assert 1_000_000 < estimate < limit, (name, estimate)


@pytest.mark.parametrize(
    "name, config",
    [
        ("convnext_tiny", TINY_CONVNEXT),
        ("vit_tiny_patch16_224", TINY_VIT),
        ("swin_tiny_patch4_window7_224", dict(embed_dim=8, nb_blocks=(1, 1), nb_heads=(1, 2))),
        ("resnet18", dict(nb_classes=10)),
        ("resnet50", dict(nb_classes=10)),
        ("efficientnet_b0", dict(nb_classes=10)),
        ("pvt_v2_b0", dict(nb_classes=10)),
        ("mixer_s32_224", dict(nb_classes=10)),
        ("vgg11", dict(nb_classes=10, nb_features=64)),
    ],
)
def test_the_estimate_bounds_the_real_count_and_stays_near_it(name, config):
    model = tfimm.create_model(name, **config)
    real = count(model.weights)
    cfg = model.cfg
    estimate = estimate_parameters(type(cfg), dataclasses.asdict(cfg))
    assert real <= estimate <= 3 * real, (real, estimate)
