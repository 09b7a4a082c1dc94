"""The one place that imports TensorFlow, with the Keras 2 API enforced.

tfimm and this package are written against ``tf.keras`` as Keras 2 (the
``tf_keras`` package). TensorFlow 2.16+ picks Keras 3 unless
``TF_USE_LEGACY_KERAS=1`` is set *before* TensorFlow is first imported
(:mod:`lora_ckpt._keras_env` sets it), so every module of the package imports
``tf`` from here. ``import lora_ckpt`` does not import this module: the
first public name that needs TensorFlow does.
"""

import logging

from ._keras_env import prefer_keras_2, restore_environment
from .errors import KerasObjectError, MissingDependencyError

prefer_keras_2()  # already done by `import lora_ckpt`; again for a direct import of this module

try:
    import tensorflow as tf
except BaseException:
    restore_environment()
    raise


def _check_keras_2() -> None:
    try:
        import tf_keras  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "lora_ckpt needs the Keras 2 API from the `tf_keras` package, which is "
            "not installed. Install it with `pip install tf_keras`."
        ) from exc
    # Under Keras 3, tf.keras is `keras._tf_keras.keras`; under Keras 2 it is
    # a module of the tf_keras package.
    if not tf.keras.__name__.startswith("tf_keras"):
        version = getattr(tf.keras, "__version__", "3")
        raise MissingDependencyError(
            f"TensorFlow was imported with Keras {version} active, but lora_ckpt "
            "needs Keras 2 (tf_keras). Set the environment variable "
            "TF_USE_LEGACY_KERAS=1 before TensorFlow is imported, or import "
            "lora_ckpt before anything that imports TensorFlow."
        )


try:
    _check_keras_2()
except MissingDependencyError:
    restore_environment()
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


__all__ = ["own_function", "require_tf_keras", "tf"]


_OWN_QUALNAMES: set[str] = set()


class _OwnTracesFilter(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning for
    lora_ckpt's own functions: each is built for one variable set (a model, a
    pool) and traced once by design, which TensorFlow's heuristic mistakes for
    retracing when a process builds several. Warnings about any other
    function pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "tf.function retracing" not in message:
            return True
        if " of <lora_ckpt." in message:  # a bound method of one of our objects
            return False
        return not any(f"<function {name} at" in message for name in _OWN_QUALNAMES)


def own_function(function):
    """Marks ``function`` (about to be wrapped in ``tf.function``, once per model
    or pool) as lora_ckpt's own, so its tracing is not reported as retracing.

    Returns:
        ``function``.
    """
    _OWN_QUALNAMES.add(function.__qualname__)
    return function


logging.getLogger("tensorflow").addFilter(_OwnTracesFilter())
