"""Optimizer memory: the state each optimizer keeps, and what a step holds.

Two ways to count state, which the tests hold equal:

- `optimizer_state_bytes(optimizer)` measures a *built* Keras optimizer: the
  bytes of its own variables, less the step counter and learning rate that
  every optimizer has.
- `state_report(variables, optimizers)` counts from shapes alone, per
  variable and per kind of variable, for the optimizers in `STATE_RULES`,
  without allocating anything (so a 340 M-parameter model costs nothing).

Kinds: `embedding`, `conv_kernel`, `dense_kernel` (any other rank >= 2
tensor), `vector` (rank 1) and `scalar`.

What a compiled step holds at once (state, inputs, outputs and every
temporary) is XLA's buffer assignment, exact and the same on any machine:
`jax_step_bytes` (Keras's JAX backend) and `tf_step_bytes` (TensorFlow,
from XLA's dump: `start_tf_xla_dump` first, in a fresh process).
"""

import collections
import glob
import math
import os
import re
import tempfile

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



# ------------------------------------------------- what a compiled step holds


def jax_step_bytes(jitted, *args):
    """What the jitted function `jitted` holds while it runs on `args`
    (arrays or `jax.ShapeDtypeStruct`s: nothing is allocated).

    Returns a dict: `total` (arguments + outputs - the outputs written over
    donated arguments + temporaries), `temporary`, `arguments`, `outputs`,
    `aliased`, in bytes, from XLA's buffer assignment (`memory_analysis`).
    """
    analysis = jitted.lower(*args).compile().memory_analysis()
    figures = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporary": analysis.temp_size_in_bytes,
    }
    figures["total"] = (figures["arguments"] + figures["outputs"]
                        - figures["aliased"] + figures["temporary"])
    return figures


def start_tf_xla_dump(directory=None):
    """Makes TensorFlow's XLA write each program's buffer assignment to
    `directory` (default: a new temporary one), which `tf_step_bytes` reads.

    XLA reads its flags once, at the process's first compilation: call this
    before anything is compiled with XLA (a fresh process). Returns the
    directory.
    """
    directory = directory or tempfile.mkdtemp(prefix="sm3_tf_xla_")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_dump_to={directory}".strip()
    return directory


def tf_step_bytes(function, *args):
    """What XLA assigns to the compiled program(s) of `function` on `args`.

    `function` is a `tf.function`. Compiled whole (`jit_compile=True`), its
    program's bytes are returned, as `jax_step_bytes` returns them:
    `total` (variables and inputs included) and `temporary`. Otherwise the
    step runs once, and the programs it launches (SM3's per-variable
    compiled updates) are read: `largest_temporary`, the most temporary
    bytes any of them holds, and `launched`, how many there were.

    Needs `start_tf_xla_dump` before the process's first XLA compilation.
    """
    directory = _xla_dump_directory()
    pattern = os.path.join(directory, "*memory-usage-report.txt")
    before = set(glob.glob(pattern))
    whole = bool(getattr(function, "_jit_compile", None))
    if whole:
        function.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
    else:
        function(*args)
    programs = [_program_bytes(path)
                for path in sorted(set(glob.glob(pattern)) - before)]
    if not programs:
        raise RuntimeError(
            "XLA compiled nothing new for this step: already compiled, or "
            "XLA's flags were read before start_tf_xla_dump")
    if whole:
        return max(programs, key=lambda p: p["total"])
    return {"largest_temporary": max(p["temporary"] for p in programs),
            "launched": len(programs)}


def _xla_dump_directory():
    found = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    if not found:
        raise RuntimeError(
            "call sm3_tf.memory.start_tf_xla_dump() before TensorFlow "
            "compiles anything with XLA (in a fresh process)")
    return found.group(1)


def _program_bytes(report):
    """`{"total", "temporary"}` of one dumped program: its memory report's
    total, less its parameters' buffers (from its buffer assignment)."""
    with open(report) as f:
        total = int(re.search(r"Total bytes used: (\d+)", f.read()).group(1))
    assignment = report.replace("memory-usage-report.txt",
                                "buffer-assignment.txt")
    parameters = 0
    with open(assignment) as f:
        for line in f:
            found = re.match(r"allocation \d+: size (\d+), parameter ", line)
            if found:
                parameters += int(found.group(1))
    return {"total": total, "temporary": total - parameters}
