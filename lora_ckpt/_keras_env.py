"""Asks for Keras 2 before TensorFlow comes up, without importing TensorFlow.

TensorFlow 2.16+ picks Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set
before it is first imported. ``import lora_ckpt`` no longer imports
TensorFlow (so the CLI starts fast), but a user may import TensorFlow
themselves right after it: the package sets the variable when it is
imported, as it did when it imported TensorFlow itself, and
:mod:`lora_ckpt._tf` restores the user's value if TensorFlow cannot come up
with Keras 2.
"""

import os
import sys

__all__ = ["prefer_keras_2", "restore_environment"]


_VARIABLE = "TF_USE_LEGACY_KERAS"
_UNSET = object()
_before = _UNSET  # the user's value, before lora_ckpt touched it


def prefer_keras_2() -> None:
    """Sets ``TF_USE_LEGACY_KERAS=1`` unless TensorFlow is already imported or
    the user set the variable; remembers the user's value the first time."""
    global _before
    if _before is _UNSET:
        _before = os.environ.get(_VARIABLE)
    if "tensorflow" not in sys.modules:
        os.environ.setdefault(_VARIABLE, "1")


def restore_environment() -> None:
    """Puts back the user's ``TF_USE_LEGACY_KERAS``: lora_ckpt could not come
    up, so the process is left as lora_ckpt found it."""
    if _before is _UNSET:
        return
    if _before is None:
        os.environ.pop(_VARIABLE, None)
    else:
        os.environ[_VARIABLE] = _before
