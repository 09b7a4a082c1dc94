"""The CLI over a store: adapters named or given by path, damaged files caught
without reading tensors, TF Serving versions that do not overwrite."""

import contextlib
import io
import json
import os

import pytest

from lora_ckpt.cli import main as cli_main
from lora_ckpt.serving.store import adapter_path

from .helpers.scale import make_tiny_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "store")
    return {"path": path, "names": make_tiny_store(path, names=("a0", "a1"))}


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_inspect_takes_a_name_with_store_or_a_path(store):
    by_name = run("inspect", "a0", "--store", store["path"], "--json")
    by_path = run("inspect", adapter_path(store["path"], "a0"), "--json")
    assert by_name[0] == by_path[0] == 0
    assert json.loads(by_name[1]) == json.loads(by_path[1])
    assert json.loads(by_name[1])["path"] == adapter_path(store["path"], "a0")


def test_a_truncated_adapter_is_caught_by_inspect_and_list(store, tmp_path):
    import shutil

    root = str(tmp_path / "adapters")
    shutil.copytree(os.path.join(store["path"], "adapters"), root)
    data = next(n for n in os.listdir(os.path.join(root, "a1")) if ".data-" in n)
    os.truncate(os.path.join(root, "a1", data), 100)
    code, _, err = run("inspect", os.path.join(root, "a1"))
    assert code == 1 and "100 bytes" in err
    code, out, _ = run("list", root, "--json")
    listed = {entry["name"]: entry for entry in json.loads(out)}
    assert code == 0 and "error" in listed["a1"] and "error" not in listed["a0"]


def test_verify_checks_every_hash(store, tmp_path):
    import shutil

    target = str(tmp_path / "a0")
    shutil.copytree(adapter_path(store["path"], "a0"), target)
    data = next(n for n in os.listdir(target) if ".data-" in n)
    with open(os.path.join(target, data), "r+b") as handle:  # same size, other bytes
        handle.seek(10)
        handle.write(b"\xff\xfe")
    assert run("inspect", target)[0] == 0  # sizes agree: only the hash can tell
    code, _, err = run("inspect", target, "--verify")
    assert code == 1 and "SHA-256" in err


@pytest.mark.slow
def test_tf_serving_export_twice_writes_versions_one_and_two(store, tmp_path):
    out = str(tmp_path / "serving")
    args = ["export", "--store", store["path"], "--adapter", "a0", "--out", out, "--tf-serving"]
    assert run(*args)[0] == 0
    assert run(*args)[0] == 0
    assert sorted(os.listdir(os.path.join(out, "a0"))) == ["1", "2"]
    code, _, err = run(*args, "--version", "2")
    assert code == 1 and "exists" in err


@pytest.mark.slow
def test_a_command_that_runs_tensorflow_prints_no_cuda_noise(store, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", "lora_ckpt.cli", "export", "--store", store["path"],
         "--adapter", "a0", "--out", str(tmp_path / "saved")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cuInit" not in result.stderr and "E0000" not in result.stderr
