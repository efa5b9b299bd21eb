"""Counting optimizer state: how many bytes each optimizer keeps, and where.

Two ways to count, which the tests hold equal:

- `optimizer_state_bytes(optimizer)` measures a *built* Keras optimizer: the
  bytes of its own variables, less the step counter and learning rate that
  every optimizer has.
- `state_report(variables, optimizers)` counts from shapes alone, per
  variable and per kind of variable, for the optimizers in `STATE_RULES`,
  without allocating anything (so a 340 M-parameter model costs nothing).

Kinds: `embedding`, `conv_kernel`, `dense_kernel` (any other rank >= 2
tensor), `vector` (rank 1) and `scalar`.
"""

import collections
import math

import keras
import numpy as np

_BOOKKEEPING = ("iteration", "learning_rate")
_HALF = ("float16", "bfloat16")


def _itemsize(dtype):
    return np.dtype(keras.backend.standardize_dtype(dtype)).itemsize


def _numel(shape):
    return math.prod(int(d) for d in shape)


def variable_bytes(variable):
    """Bytes held by one variable (its shape times its dtype's size)."""
    return _numel(variable.shape) * _itemsize(variable.dtype)


def parameter_bytes(variables):
    return sum(variable_bytes(v) for v in variables)


def optimizer_state_bytes(optimizer):
    """Bytes of optimizer state in a built optimizer (slots, not bookkeeping)."""
    return sum(
        variable_bytes(v)
        for v in optimizer.variables
        if v.name not in _BOOKKEEPING
    )


def variable_kind(name, shape):
    """`embedding`, `conv_kernel`, `dense_kernel`, `vector` or `scalar`."""
    name = name.lower()
    if len(shape) == 0:
        return "scalar"
    if len(shape) == 1:
        return "vector"
    if "embed" in name:
        return "embedding"
    if len(shape) >= 3 and ("conv" in name or len(shape) == 4):
        return "conv_kernel"
    return "dense_kernel"


# Numbers of state values an optimizer keeps for a variable of a shape.
# (accumulator-like values, momentum-like values): the first kind is kept
# in float32 for half-precision variables by SM3; both are in the variable's
# dtype for Keras's optimizers.
def _sm3_accumulators(shape):
    if len(shape) <= 1:
        return _numel(shape)
    return 0 if 0 in shape else sum(shape)


def _adafactor_factored(shape):
    if len(shape) < 2:
        return _numel(shape)
    return _numel(shape[:-1]) + _numel(shape[:-2]) * shape[-1]


STATE_RULES = {
    "sm3": lambda s: (_sm3_accumulators(s), _numel(s)),
    "sm3_no_momentum": lambda s: (_sm3_accumulators(s), 0),
    "adam": lambda s: (0, 2 * _numel(s)),
    "adagrad": lambda s: (0, _numel(s)),
    "sgd_momentum": lambda s: (0, _numel(s)),
    "sgd": lambda s: (0, 0),
    # Keras's Adafactor factors the last two axes *and* keeps a full-size
    # "velocity" slot for every variable: no saving over Adagrad. For rank
    # < 2 it also makes two placeholder scalars.
    "adafactor_keras": lambda s: (
        (_adafactor_factored(s) if len(s) >= 2 else 2), _numel(s)
    ),
    # Adafactor as Shazeer & Stern run it for big models: factored second
    # moment, no first moment (beta1 = 0).
    "adafactor_factored": lambda s: (_adafactor_factored(s), 0),
}

OPTIMIZER_LABELS = {
    "sm3": "SM3 (momentum 0.9)",
    "sm3_no_momentum": "SM3 (momentum 0)",
    "adam": "Adam",
    "adagrad": "Adagrad",
    "sgd_momentum": "SGD + momentum",
    "sgd": "SGD",
    "adafactor_keras": "Adafactor (Keras, with velocity)",
    "adafactor_factored": "Adafactor (factored, no momentum)",
}


def state_bytes_for(shape, dtype, optimizer):
    """Bytes of `optimizer`'s state for one variable of `shape` and `dtype`."""
    if optimizer not in STATE_RULES:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; known: {sorted(STATE_RULES)}")
    shape = tuple(int(d) for d in shape)
    statistics, slots = STATE_RULES[optimizer](shape)
    itemsize = _itemsize(dtype)
    stat_itemsize = 4 if (optimizer.startswith("sm3")
                          and keras.backend.standardize_dtype(dtype) in _HALF
                          ) else itemsize
    return statistics * stat_itemsize + slots * itemsize


def _describe(variable):
    """`(name, shape, dtype, kind)` of a variable or a `(name, shape, dtype)`."""
    if isinstance(variable, tuple):
        name, shape, dtype = variable
    else:
        name = getattr(variable, "path", None) or variable.name
        shape, dtype = variable.shape, variable.dtype
    shape = tuple(int(d) for d in shape)
    return name, shape, dtype, variable_kind(name, shape)


def state_report(variables, optimizers=tuple(STATE_RULES)):
    """Per-optimizer state bytes, per variable and per kind, from shapes.

    Args:
      variables: Keras/TF variables, or `(name, shape, dtype)` tuples.
      optimizers: names from `STATE_RULES`.

    Returns:
      A dict with `parameters` (bytes, by kind and in total) and, for each
      optimizer, `state_bytes`, `state_by_kind`, `ratio_to_parameters` and
      `per_variable` (a list of `{name, shape, kind, state_bytes}`).
    """
    described = [_describe(v) for v in variables]
    param_by_kind = collections.Counter()
    for _, shape, dtype, kind in described:
        param_by_kind[kind] += _numel(shape) * _itemsize(dtype)
    total_params = sum(param_by_kind.values())
    report = {
        "parameters": {
            "bytes": total_params,
            "count": sum(_numel(shape) for _, shape, _, _ in described),
            "by_kind": dict(param_by_kind),
        },
        "optimizers": {},
    }
    for opt in optimizers:
        per_variable = []
        by_kind = collections.Counter()
        for name, shape, dtype, kind in described:
            state = state_bytes_for(shape, dtype, opt)
            by_kind[kind] += state
            per_variable.append({"name": name, "shape": list(shape),
                                 "kind": kind, "state_bytes": state})
        total = sum(by_kind.values())
        report["optimizers"][opt] = {
            "label": OPTIMIZER_LABELS[opt],
            "state_bytes": total,
            "state_by_kind": dict(by_kind),
            "ratio_to_parameters": total / total_params if total_params else 0,
            "per_variable": per_variable,
        }
    return report

