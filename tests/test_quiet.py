"""Nothing prints what is not the user's business (issue: noise that is not the user's)."""

import importlib.util
import logging

import numpy as np
import pytest

import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.errors import MissingDependencyError
from lora_ckpt.state.fingerprint import base_fingerprint


def test_fingerprinting_many_models_warns_of_no_retracing(caplog):
    # One compiled sampler per model, each traced once: TensorFlow's heuristic
    # used to call that retracing after five models.
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for i in range(8):
            variables = {f"v{j}": tf.Variable(np.full([3 + j], i, "float32")) for j in range(3)}
            base_fingerprint(variables, [])
    assert [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()] == []


def test_other_functions_retracing_still_warn(caplog):
    # The filter is for lora_ckpt's own per-model functions only.
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for i in range(8):
            tf.function(lambda x: x + 1)(tf.constant(float(i)))
    assert any("retracing" in r.getMessage() for r in caplog.records)


def test_pretrained_without_timm_logs_nothing_before_its_error(caplog):
    if importlib.util.find_spec("timm") and importlib.util.find_spec("torch"):
        pytest.skip("timm and torch are installed here")
    with caplog.at_level(logging.DEBUG), pytest.raises(MissingDependencyError, match="timm"):
        lora_ckpt.create_model("convnext_tiny", pretrained=True)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


_RESTORE = """
import numpy as np, sys
import lora_ckpt
from lora_ckpt import tf
from lora_ckpt.state import AdapterCheckpointManager, restore_training_checkpoint
from tests.helpers.save_loop import build_model

def compiled():
    model = build_model(width=8, rank=2)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss="mse")
    return model

trained = compiled()
trained.fit(np.ones((4, 8), "float32"), np.zeros((4, 8), "float32"), verbose=0)
AdapterCheckpointManager(trained, sys.argv[1]).save(1)
assert restore_training_checkpoint(compiled(), sys.argv[1]) == 1  # no slots yet
"""


@pytest.mark.slow
def test_restoring_a_training_checkpoint_warns_of_no_unrestored_values(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # TensorFlow warns when the process ends, as the restore status is collected.
    result = subprocess.run(
        [sys.executable, "-c", _RESTORE, str(tmp_path / "ckpt")],
        cwd=root,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unrestored" not in result.stderr and "could not be found" not in result.stderr
