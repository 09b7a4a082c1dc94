"""Compiled functions over a fixed set of variables, kept for reuse.

Reading or assigning a model's variables one eager op at a time costs tens
of microseconds per variable (a convnext_tiny has ~180); one ``tf.function``
over the whole set costs one call. The functions hold their variables, so
only a few are kept (most recently used first).
"""

import collections
from collections.abc import Callable

import numpy as np

from .._tf import own_function, tf

__all__ = ["assign_all", "compiled"]


_KEPT = 16
_FUNCTIONS: collections.OrderedDict = collections.OrderedDict()


def compiled(kind: str, variables: list, build: Callable[[list], Callable]) -> Callable:
    """The compiled function ``build(variables)`` for this kind and variable set.

    Args:
        kind: What the function does (part of the cache key).
        variables: The variables it reads or writes, in order.
        build: Returns the Python function to compile.

    Returns:
        A ``tf.function``, built once per kind and variable set.
    """
    key = (kind, *(id(v) for v in variables))
    function = _FUNCTIONS.pop(key, None)
    if function is None:
        function = tf.function(own_function(build(variables)), autograph=False)
    _FUNCTIONS[key] = function
    while len(_FUNCTIONS) > _KEPT:
        _FUNCTIONS.popitem(last=False)
    return function


def _assigner(variables: list) -> Callable:
    sizes = [v.shape.num_elements() for v in variables]

    def assign(flat):
        for variable, part in zip(variables, tf.split(flat, sizes), strict=True):
            variable.assign(tf.reshape(part, variable.shape))

    return assign


def assign_all(variables: list, values: list) -> None:
    """Assigns ``values`` to ``variables`` in one compiled call.

    The values travel as one flat array: a function input per variable would
    cost more to convert than the assignments themselves.
    """
    if not variables:
        return
    dtypes = {v.dtype for v in variables}
    if len(dtypes) != 1:  # rare (an int variable among the floats): one op each
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
        return
    flat = np.concatenate([np.ravel(value) for value in values])
    compiled("assign", variables, _assigner)(flat.astype(dtypes.pop().as_numpy_dtype, copy=False))
