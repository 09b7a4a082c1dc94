"""The fingerprint that identifies a model's base weights in an adapter config."""

import hashlib
from collections.abc import Iterable

import numpy as np

from .._tf import tf
from .compiled import compiled

__all__ = ["base_fingerprint"]


FINGERPRINT_SAMPLES = 4096
"""Values per variable a base fingerprint reads (all values of smaller ones)."""


def _sampler(variables: list):
    steps = [max(1, -(-v.shape.num_elements() // FINGERPRINT_SAMPLES)) for v in variables]

    def sample():
        return [tf.reshape(v, [-1])[::step] for v, step in zip(variables, steps, strict=True)]

    return sample


def _samples(variables: list) -> list[np.ndarray]:
    """Every k-th value of each variable (k = ceil(size / 4096)), in one compiled call."""
    return [t.numpy() for t in compiled("sample", variables, _sampler)()] if variables else []


def base_fingerprint(model_variables: dict[str, tf.Variable], exclude: Iterable[str]) -> str:
    """A digest that identifies the base weights: every variable not in ``exclude``.

    It covers each variable's key, shape and dtype, and a fixed sample of its
    values: all of them up to 4096, else every k-th value (4096 in all).
    Another training run or checkpoint of the base changes nearly every
    value, so it changes the fingerprint; a few hand-edited values may not.
    Reading a sample keeps a load fast on a large base (a full hash of
    convnext_tiny's 110 MB took longer than loading the whole model).

    Args:
        model_variables: ``key -> variable`` of the whole model.
        exclude: Keys left out (the adapter's own variables, which a load
            overwrites).

    Returns:
        ``"sampled-blake2b:<hex>"``.
    """
    excluded = set(exclude)
    keys = [key for key in sorted(model_variables) if key not in excluded]
    variables = [model_variables[key] for key in keys]
    digest = hashlib.blake2b(digest_size=20)
    for key, variable, sample in zip(keys, variables, _samples(variables), strict=True):
        digest.update(f"{key}|{variable.dtype.name}|{variable.shape.as_list()}|".encode())
        digest.update(np.ascontiguousarray(sample).data)
    return "sampled-blake2b:" + digest.hexdigest()
