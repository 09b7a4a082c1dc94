"""``lora-ckpt --help`` and the listing of a local store start without
TensorFlow (or the web framework): the command imports what a command needs
when it runs.

The CLI's own part is checked with the package's ``__init__`` stubbed out
(it imports TensorFlow until it is made lazy); the whole command is checked
as users run it, expected to fail until ``lora_ckpt/__init__`` and the state
readers import TensorFlow lazily."""

import json
import os
import subprocess
import sys

import pytest

import lora_ckpt

HEAVY = ("tensorflow", "tfimm", "starlette", "uvicorn", "prometheus_client", "PIL", "ray")
PACKAGE = os.path.dirname(lora_ckpt.__file__)


def _run(argv: list[str], stub_package: bool) -> dict:
    """Runs ``lora-ckpt *argv`` in a fresh interpreter; what it imported."""
    stub = (
        "import types; pkg = types.ModuleType('lora_ckpt'); pkg.__path__ = [sys.argv[1]]; "
        "sys.modules['lora_ckpt'] = pkg; "
        if stub_package
        else ""
    )
    code = (
        f"import json, runpy, sys; {stub}"
        "argv = json.loads(sys.argv[2]); sys.argv = ['lora-ckpt', *argv]; code = None\n"
        "try:\n    runpy.run_module('lora_ckpt.cli', run_name='__main__')\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, PACKAGE, json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "argv", [["--help"], *([command, "--help"] for command in ("serve", "list", "export", "demo"))]
)
def test_the_cli_itself_imports_nothing_heavy_for_help(argv):
    outcome = _run(argv, stub_package=True)
    assert outcome == {"code": 0, "heavy": []}


def test_help_does_not_import_tensorflow():
    outcome = _run(["--help"], stub_package=False)
    assert outcome == {"code": 0, "heavy": []}


def test_listing_a_local_store_does_not_import_tensorflow(tmp_path):
    from tests.helpers.scale import make_tiny_store

    store = str(tmp_path / "store")
    make_tiny_store(store, ["a0"])
    outcome = _run(["list", store, "--json"], stub_package=False)
    assert outcome["heavy"] == [] and outcome["code"] in (0, None)
