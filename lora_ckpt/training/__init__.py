"""Training adapters from folders of labelled images (or tf.data datasets).

:func:`train_adapter` trains one adapter on a store's base and saves it with
its labels, training record and report; :func:`evaluate_adapter` measures
one; :mod:`~lora_ckpt.training.fanout` runs many, on Ray if asked. Names are
imported on first use (PEP 562): the CLI reads :class:`TrainSettings` to
build its flags without TensorFlow.
"""

from .._lazy import lazy_names

_EXPORTS = {
    "TrainSettings": "settings",
    "TrainResult": "train",
    "train_adapter": "train",
    "evaluate_adapter": "evaluate",
    "classification_report": "evaluate",
    "read_tasks": "fanout",
    "run_tasks": "fanout",
    "run_tasks_on_ray": "fanout",
    "summary_table": "fanout",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, globals(), _EXPORTS)
