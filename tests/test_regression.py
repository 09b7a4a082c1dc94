"""Adapters written by earlier versions (tests/regression/) read by today's code.

Each fixture is an adapter directory committed with the tensors it holds and
the outputs its model computed before it was saved (see
tests/regression/make_fixtures.py). Today's readers, loaders and pool must
give exactly those: a change to the format made to writer and reader alike
fails here. The fixtures are read-only: every test works on a copy.
"""

import glob
import json
import os
import shutil

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import AdapterPool

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regression")
FIXTURES = sorted(os.path.dirname(p) for p in glob.glob(f"{HERE}/*/*/fixture.json"))
IDS = [os.path.relpath(p, HERE) for p in FIXTURES]


def assert_outputs(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(params=FIXTURES, ids=IDS, scope="module")
def fixture(request, tmp_path_factory):
    """One fixture, its adapter copied to a temporary directory."""
    directory = request.param
    with open(os.path.join(directory, "fixture.json")) as handle:
        record = json.load(handle)
    copy = tmp_path_factory.mktemp("regression") / "adapter"
    shutil.copytree(os.path.join(directory, "adapter"), copy)
    with np.load(os.path.join(directory, "tensors.npz")) as tensors:
        record["tensors"] = dict(tensors)
    record.update(
        name=os.path.relpath(directory, HERE),
        adapter=str(copy),
        base_weights=os.path.normpath(os.path.join(directory, record["base_weights"])),
        x=np.load(os.path.normpath(os.path.join(directory, record["input"]))),
        expected=np.load(os.path.join(directory, "expected.npy")),
    )
    return record


def test_there_are_fixtures_of_both_format_versions_and_they_stay_small():
    versions = set()
    for directory in FIXTURES:
        with open(os.path.join(directory, "fixture.json")) as handle:
            versions.add(json.load(handle)["format_version"])
    assert versions >= {1, 2}
    size = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(HERE) for f in files
    )
    assert size < 1_000_000


def test_inspect_reports_the_recorded_format_version(fixture):
    summary = lora_ckpt.inspect_adapter(fixture["adapter"])
    assert summary["format_version"] == fixture["format_version"]
    assert summary["library_version"] == fixture["library_version"]
    assert summary["saved"]["extra_layers"] == fixture["extra_layers"]
    labels = fixture["save_kwargs"].get("labels")
    if labels is not None:
        assert summary["metadata"]["labels"] == labels


def test_read_gives_the_recorded_tensors(fixture):
    state = lora_ckpt.read_lora_state(fixture["adapter"])
    assert state.config.format_version == fixture["format_version"]
    assert sorted(state.tensors) == sorted(fixture["tensors"])
    for key, expected in fixture["tensors"].items():
        assert state.tensors[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(state.tensors[key], expected, err_msg=key)


def fresh_model(fixture, **overrides):
    """The fixture's model rebuilt from its recorded settings, with the base
    weights loaded (a head the adapter carries is left to the adapter)."""
    kwargs = dict(fixture["create_model_kwargs"], **overrides)
    model = lora_ckpt.create_model(fixture["model_name"], **kwargs)
    lora_ckpt.load_base_weights(model, fixture["base_weights"], skip=fixture["extra_layers"])
    return model


def test_load_into_a_fresh_model_gives_the_expected_outputs(fixture):
    model = fresh_model(fixture)
    report = lora_ckpt.load_lora_state(model, fixture["adapter"])
    assert sorted(report.loaded) == sorted(fixture["tensors"])
    assert_outputs(model(fixture["x"], training=False).numpy(), fixture["expected"])


def test_from_adapter_gives_the_expected_outputs(fixture):
    model = lora_ckpt.from_adapter(fixture["adapter"], base_weights=fixture["base_weights"])
    assert_outputs(model(fixture["x"], training=False).numpy(), fixture["expected"])


def test_a_pool_on_a_plain_base_serves_the_expected_outputs(fixture):
    kwargs = fixture["create_model_kwargs"]
    if kwargs.get("lora_train_bias") == "all":
        pytest.skip("a pool keeps per-adapter biases of LoRA and full layers only")
    # A plain LoRA model of a larger rank: no DoRA, rsLoRA, patterns or biases of its own.
    model = lora_ckpt.create_model(
        fixture["model_name"],
        lora_rank=4,
        lora_train_classifier=bool(fixture["extra_layers"]),
        lora_train_bias=kwargs.get("lora_train_bias", "none"),
        **fixture["base_model_kwargs"],
    )
    lora_ckpt.load_base_weights(model, fixture["base_weights"])
    pool = AdapterPool(model, capacity=2, max_rank=4)
    pool.load("regression", fixture["adapter"])
    out = pool.predict(fixture["x"], adapter="regression")
    assert out.shape == fixture["expected"].shape
    assert_outputs(out, fixture["expected"])
    assert_outputs(pool.predict(fixture["x"], adapters=["regression"] * 4), fixture["expected"])
