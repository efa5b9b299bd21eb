"""Counting optimizer state: how many bytes each optimizer keeps, and where.

Works on any built Keras optimizer (SM3, Adam, Adagrad, SGD, Adafactor, ...):
the optimizer's own variables are the state, apart from its step counter and
learning rate, which every optimizer has.
"""

import collections

import keras
import numpy as np

_BOOKKEEPING = ("iteration", "learning_rate")


def variable_bytes(variable):
    """Bytes held by one variable (its shape times its dtype's size)."""
    size = int(np.prod(variable.shape)) if len(variable.shape) else 1
    itemsize = np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize
    return size * itemsize


def optimizer_state_bytes(optimizer):
    """Bytes of optimizer state in a built optimizer (slots, not bookkeeping)."""
    return sum(
        variable_bytes(v)
        for v in optimizer.variables
        if v.name not in _BOOKKEEPING
    )


def variable_kind(variable):
    """A coarse kind for reports: embedding, conv_kernel, dense_kernel, vector."""
    name = (getattr(variable, "path", None) or variable.name).lower()
    rank = len(variable.shape)
    if rank <= 1:
        return "vector" if rank == 1 else "scalar"
    if "embedding" in name:
        return "embedding"
    if rank >= 3 and ("conv" in name or rank == 4):
        return "conv_kernel"
    return "dense_kernel"


def parameter_bytes(variables):
    return sum(variable_bytes(v) for v in variables)


def bytes_by_kind(variables):
    """`{kind: parameter bytes}` over `variables`."""
    totals = collections.Counter()
    for v in variables:
        totals[variable_kind(v)] += variable_bytes(v)
    return dict(totals)
