"""`import lora_ckpt` does not import TensorFlow; the first name that needs it does.

Each check runs in a fresh interpreter: this test process imported TensorFlow
long ago (conftest).
"""

import os
import pathlib
import subprocess
import sys

import pytest

import lora_ckpt

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_import_lora_ckpt_imports_no_tensorflow():
    _run(
        "import sys, lora_ckpt\n"
        "assert not hasattr(lora_ckpt, 'not_a_name')  # a miss imports nothing either\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow'\n"
        "assert 'tfimm' not in sys.modules, 'tfimm'\n"
        "assert 'numpy' not in sys.modules, 'numpy'\n"
    )


def test_errors_and_version_import_no_tensorflow():
    _run(
        "import sys\n"
        "import lora_ckpt.errors, lora_ckpt.version\n"
        "from lora_ckpt import LoRAError, __version__\n"
        "from lora_ckpt.errors import CorruptAdapterError, AdapterVersionError\n"
        "assert issubclass(CorruptAdapterError, LoRAError) and __version__\n"
        "assert 'tensorflow' not in sys.modules\n"
    )


def test_the_command_line_help_imports_no_tensorflow():
    # The CLI's other engineer makes its subcommands import lazily; --help
    # must not pay for TensorFlow through the package's __init__.
    _run(
        "import sys\n"
        "from lora_ckpt import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'tensorflow' not in sys.modules\n"
    )


@pytest.mark.slow
def test_import_lora_ckpt_asks_for_keras_2_before_tensorflow_comes_up():
    # A user may import TensorFlow right after lora_ckpt, as before. Slow lane:
    # it starts TensorFlow in a fresh process.
    _run(
        "import os, lora_ckpt\n"
        "assert os.environ['TF_USE_LEGACY_KERAS'] == '1'\n"
        "import tensorflow as tf\n"
        "assert tf.keras.__name__.startswith('tf_keras'), tf.keras.__name__\n"
    )


@pytest.mark.slow  # a fresh interpreter imports TensorFlow (about 9 s)
def test_first_use_of_a_model_name_imports_tensorflow_and_registers_the_architectures():
    # The one fast-lane test that starts TensorFlow and tfimm in a fresh process.
    out = _run(
        "import os, sys, lora_ckpt\n"
        "assert 'tensorflow' not in sys.modules\n"
        "assert os.environ['TF_USE_LEGACY_KERAS'] == '1'  # set before TensorFlow comes up\n"
        "create_model = lora_ckpt.create_model\n"
        "assert 'tensorflow' in sys.modules and 'lora_ckpt.architectures' in sys.modules\n"
        "model = create_model('convnext_tiny', lora_rank=2, embed_dim=(8, 16),\n"
        "                     nb_blocks=(1, 1), input_size=(32, 32), nb_classes=4)\n"
        "from lora_ckpt import tf\n"
        "assert tf.keras.__name__.startswith('tf_keras')\n"
        "print(type(model).__name__, len(lora_ckpt.lora_layers(model)))\n"
    )
    assert out.stdout.split() == ["LoRAConvNeXt", "4"]


def test_every_public_name_resolves_to_what_its_module_defines():
    assert set(lora_ckpt.__all__) == set(lora_ckpt._EXPORTS)
    assert set(lora_ckpt.__all__) <= set(dir(lora_ckpt))
    for name in lora_ckpt.__all__:
        module = __import__(f"lora_ckpt.{lora_ckpt._EXPORTS[name]}", fromlist=[name])
        assert getattr(lora_ckpt, name) is getattr(module, name), name


def test_submodules_are_attributes_and_unknown_names_are_attribute_errors():
    assert lora_ckpt.registry.lora_architecture is lora_ckpt.lora_architecture
    assert lora_ckpt.state.save_lora_state is lora_ckpt.save_lora_state
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lora_ckpt.not_a_name  # noqa: B018
    assert not hasattr(lora_ckpt, "not_a_name")
