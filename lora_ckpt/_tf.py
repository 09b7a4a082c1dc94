"""The one place that imports TensorFlow, with the Keras 2 API enforced.

tfimm and this package are written against ``tf.keras`` as Keras 2 (the
``tf_keras`` package). TensorFlow 2.16+ picks Keras 3 unless
``TF_USE_LEGACY_KERAS=1`` is set *before* TensorFlow is first imported, so
every module of the package imports ``tf`` from here.
"""

import os
import sys

from .errors import KerasVersionError

if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf


def _check_keras_2() -> None:
    try:
        import tf_keras  # noqa: F401
    except ImportError as exc:
        raise KerasVersionError(
            "lora_ckpt needs the Keras 2 API from the `tf_keras` package, which is "
            "not installed. Install it with `pip install tf_keras`."
        ) from exc
    # Under Keras 3, tf.keras is `keras._tf_keras.keras`; under Keras 2 it is
    # a module of the tf_keras package.
    if not tf.keras.__name__.startswith("tf_keras"):
        version = getattr(tf.keras, "__version__", "3")
        raise KerasVersionError(
            f"TensorFlow was imported with Keras {version} active, but lora_ckpt "
            "needs Keras 2 (tf_keras). Set the environment variable "
            "TF_USE_LEGACY_KERAS=1 before TensorFlow is imported, or import "
            "lora_ckpt before anything that imports TensorFlow."
        )


_check_keras_2()

__all__ = ["tf"]
