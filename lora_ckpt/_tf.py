"""The one place that imports TensorFlow, with the Keras 2 API enforced.

tfimm and this package are written against ``tf.keras`` as Keras 2 (the
``tf_keras`` package). TensorFlow 2.16+ picks Keras 3 unless
``TF_USE_LEGACY_KERAS=1`` is set *before* TensorFlow is first imported, so
every module of the package imports ``tf`` from here.
"""

import os
import sys

from .errors import KerasObjectError, KerasVersionError

_ENV_BEFORE = os.environ.get("TF_USE_LEGACY_KERAS")
if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def _restore_environment() -> None:
    # lora_ckpt could not come up: leave the user's process as it found it.
    if _ENV_BEFORE is None:
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    else:
        os.environ["TF_USE_LEGACY_KERAS"] = _ENV_BEFORE


try:
    import tensorflow as tf
except BaseException:
    _restore_environment()
    raise


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


try:
    _check_keras_2()
except KerasVersionError:
    _restore_environment()
    raise


def require_tf_keras(obj, what: str = "lora_ckpt") -> None:
    """Refuses Keras 3 layers and models with a clear error.

    Args:
        obj: What a caller passed as a model or layer.
        what: The function it was passed to, for the message.

    Raises:
        KerasObjectError: If ``obj`` is a Keras 3 object.
    """
    if isinstance(obj, tf.keras.layers.Layer):
        return
    if any(cls.__module__.split(".")[0] == "keras" for cls in type(obj).__mro__):
        raise KerasObjectError(
            f"{what} got a Keras 3 {type(obj).__name__}; lora_ckpt works with tf_keras "
            "(Keras 2) models such as tfimm's. Build the model with `lora_ckpt.tf.keras` "
            "(or `import tf_keras`), not `import keras`."
        )


__all__ = ["require_tf_keras", "tf"]
