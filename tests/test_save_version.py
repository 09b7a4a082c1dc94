"""Every save records a save counter: 1 at a new path, one more per overwrite
(TF Serving's model version for the service's /v1/models/NAME/versions/N)."""

import json
import os
import uuid

import pytest

import lora_ckpt
from lora_ckpt.errors import CorruptAdapterError

from .helpers.save_loop import build_model, fill_version

REGRESSION = os.path.join(os.path.dirname(__file__), "regression", "0.1.0")


@pytest.mark.parametrize("store", ["local", "memory"])
def test_each_overwrite_counts_one_more(store, tmp_path):
    path = (
        str(tmp_path / "adapter")
        if store == "local"
        else f"memory://versions-{uuid.uuid4().hex[:8]}/adapter"
    )
    model = build_model(width=8, rank=2)
    for expected in (1, 2, 3):
        fill_version(model, expected)
        lora_ckpt.save_lora_state(model, path, overwrite=True)
        assert lora_ckpt.read_lora_state(path).config.version == expected
        assert lora_ckpt.inspect_adapter(path)["version"] == expected
    other = (
        str(tmp_path / "other")
        if store == "local"
        else f"memory://versions-{uuid.uuid4().hex[:8]}/other"
    )
    lora_ckpt.save_lora_state(model, other)
    assert lora_ckpt.read_lora_state(other).config.version == 1


def test_configs_written_before_the_counter_read_as_version_one():
    fixture = os.path.join(REGRESSION, "v1_convnext_lora_head_labels", "adapter")
    with open(os.path.join(fixture, "adapter_config.json")) as handle:
        assert "version" not in json.load(handle)
    assert lora_ckpt.inspect_adapter(fixture)["version"] == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_a_bad_counter_is_refused(bad, tmp_path):
    model = build_model(width=8, rank=2)
    path = lora_ckpt.save_lora_state(model, str(tmp_path / "adapter"))
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path) as handle:
        document = json.load(handle)
    document["version"] = bad
    with open(config_path, "w") as handle:
        json.dump(document, handle)
    with pytest.raises(CorruptAdapterError, match="version"):
        lora_ckpt.read_lora_state(path)
