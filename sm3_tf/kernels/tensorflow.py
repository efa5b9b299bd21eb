"""Where a TensorFlow step runs SM3's dense update: inside XLA wherever it can.

Run as plain TensorFlow ops the rule is a dozen kernels, each writing a
variable-sized temporary (under `MirroredStrategy`, where sm3_tf 0.3 ran it
so, SM3's step took 2.2x Adam's); compiled, it is a few fused loops. So
`run` places each variable's update:

- inside an XLA program (a step compiled with `jit_compile=True`, TPUs): the
  update is traced into it (a nested compiled function there would pass the
  variables by copy);
- in a plain `tf.function` (`model.fit` without `jit_compile`, a custom
  loop): one compiled function per variable, called with the replica's own
  variables (under `MirroredStrategy` each replica updates its local copy,
  inside the strategy's per-device update);
- eagerly: as plain TensorFlow ops (compiling per variable shape would
  trace anew for every shape, and an eager loop is slow anyway).

TensorFlow prints four INFO lines the first time a process compiles with
XLA ("XLA service ... initialized", "Compiled cluster using XLA!", ...).
Keras's own optimizers cause them only where the user compiles the step, so
before SM3's first compiled update, XLA compiles one on a throwaway
variable with those lines silenced (`_start_xla_quietly`).
"""

import os
import sys

import keras
import tensorflow as tf

from sm3_tf import _compat
from sm3_tf.kernels import Slots


def in_xla_program():
    """Whether the op being traced is part of an XLA-compiled function."""
    return _compat.tf_in_xla_context()


def run(step, settings, gradient, variable, slots, learning_rate, order,
        index=None):
    """Runs `step(settings, gradient, variable, slots, learning_rate, after)`
    (`portable.dense_update`, `native.dense_update`, `native.sparse_update`)
    where it runs best (module docstring), after the previous update on the
    same device (and, given `index`, in an XLA program after the gradient
    before its variable's: `sm3_tf.kernels.Order`)."""
    variable = _tf_variable(variable)
    device = variable.device
    whole = in_xla_program()
    after = (order.after(device, index if whole else None)
             if order is not None and not tf.executing_eagerly() else None)
    if tf.executing_eagerly() or whole:
        done = step(settings, gradient, variable, slots, learning_rate, after)
    else:
        accumulators = tuple(_on_device_of(variable, a)
                             for a in slots.accumulators)
        momentum = (None if slots.momentum is None
                    else _on_device_of(variable, slots.momentum))
        _start_xla_quietly(settings)
        done = _compiled(step, settings, gradient, variable, accumulators,
                         momentum, tf.convert_to_tensor(learning_rate), after)
    if order is not None and not tf.executing_eagerly():
        order.record(device, done)


def computed_in_graph(tensor):
    """Whether the graph being traced computes `tensor`: not an argument of
    the function (a `Placeholder`), a variable's value or a constant, even
    through identities (Keras passes gradients through `IdentityN`)."""
    if tf.executing_eagerly() or not hasattr(tensor, "op"):
        return False
    while tensor.op.type in ("Identity", "IdentityN"):
        tensor = tensor.op.inputs[tensor.value_index]
    return tensor.op.type not in ("Placeholder", "ReadVariableOp", "Const")


def _update_in_xla(step, settings, gradient, variable, accumulators, momentum,
                   learning_rate, after):
    done = step(settings, gradient, variable, Slots(accumulators, momentum),
                learning_rate, after)
    # A compiled function must return a tensor for the next to wait for.
    return tf.zeros([]) if done is None else done


# One trace per step function, settings, shapes and dtypes; the variables are
# passed by reference (resource handles), so XLA updates them in place.
_compiled = tf.function(_update_in_xla, jit_compile=True, autograph=False)


_started = set()


def _start_xla_quietly(settings):
    """Runs SM3's portable update once, eagerly, compiled, on a throwaway
    variable, with the process's standard error (file descriptor 2, where
    TensorFlow's C++ logs go) pointed at /dev/null: TensorFlow says its
    once-a-process XLA lines then, and not when the first real step
    compiles."""
    from sm3_tf.kernels import portable

    if _started:
        return
    _started.add(True)
    step = portable.dense_update
    with tf.init_scope():
        variable = tf.Variable(tf.ones((2, 16)))
        slots = (tuple(tf.Variable(tf.zeros(d)) for d in (2, 16)),
                 tf.Variable(tf.zeros((2, 16))) if settings.momentum else None)
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 2)
                _compiled(step, settings, tf.ones((2, 16)), variable, *slots,
                          tf.constant(0.0), None)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _tf_variable(variable):
    """The `tf.Variable` (or distributed variable) behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def _on_device_of(variable, slot):
    """`slot`'s copy on `variable`'s device: the replica's own copy inside a
    strategy's per-device update, the slot itself with one replica."""
    copies = tf.distribute.get_strategy().experimental_local_results(
        _tf_variable(slot))
    for copy in copies:
        if copy.device == variable.device:
            return copy
    if len(copies) == 1:
        return copies[0]
    raise ValueError(
        f"SM3: no copy of optimizer variable {slot.path!r} on device "
        f"{variable.device!r}, where its model variable is.")


def placed_beside(variable):
    """A context in which a new slot variable is colocated with `variable`,
    as Keras places the slots it makes from a reference variable."""
    return tf.distribute.get_strategy().extended.colocate_vars_with(
        _tf_variable(variable))
