"""How SM3's rule runs on each backend and device: the one seam for speed.

`sm3_tf.optimizer.SM3` hands each variable's step to `update`, which
chooses how to run it:

- `sparse`: a `tf.IndexedSlices` gradient (TensorFlow, e.g. an Embedding's)
  takes the exact sparse step, touched rows only (`sparse`).
- `native`: the CPU kernel, one pass over the gradient that writes the
  variable and its state in place, where `cpu_kernel` asks for it and it
  can run (a float32 matrix, `beta2 == 1`, inside an XLA program on a CPU).
- `portable`: the rule as `keras.ops` (`sm3_tf.rule`), everywhere else
  (in a whole step compiled as one, `portable.dense_update_in_step`).

On TensorFlow `tensorflow.run` places the chosen step: traced into the
enclosing XLA program, or else compiled as one XLA program per variable
(each replica's own under a `tf.distribute` strategy), or as plain ops
when executing eagerly.

A step's portable updates of matrices are chained (`Order`): each starts
once the one before it has written its results, last variable first (the
order in which backpropagation produces gradients), so that a compiled step
holds one matrix's temporary `nu` at a time instead of all of them at once.
Everything flows one way: the optimizer calls this package, which calls
the rule; nothing here reads or writes the optimizer.
"""

import contextlib
import dataclasses
from typing import Any, Optional, Tuple

import keras
from keras import ops


@dataclasses.dataclass(frozen=True)
class Settings:
    """SM3's hyperparameters, as a step needs them (hashable: a TensorFlow
    compiled update is traced once per settings, shape and dtype)."""
    momentum: float
    beta2: float
    epsilon: float
    cpu_kernel: Any  # "auto", True or False


@dataclasses.dataclass(frozen=True)
class Slots:
    """One model variable's state: `accumulators` (one vector per axis, or
    one tensor of the variable's shape for rank <= 1) and `momentum`."""
    accumulators: Tuple[Any, ...]
    momentum: Optional[Any]


class Order:
    """The order of one step's updates (module docstring).

    Each update on a device waits for the one before it there (`record`).
    The CPU kernel's, where it writes over its variable, also waits, inside
    a program compiled whole, for the gradient of the variable before its
    own in the model's order: backpropagation computes that one after its
    last read of this variable, and XLA would otherwise copy the variable
    for that read (measured: one copy of each weight of an MLP). Where it
    writes over the gradient it waits for nothing
    (`native.writes_over_gradient`).
    """

    def __init__(self, grads=()):
        self._last = {}
        self._grads = list(grads)

    def after(self, device, index=None):
        """The token an update on `device` (of the variable at `index`, if
        it is to wait for the gradient before it) waits for, or None."""
        waits = [self._last.get(device)]
        if index is not None and 0 < index <= len(self._grads):
            gradient = self._grads[index - 1]
            if gradient is not None:
                waits.append(token([getattr(gradient, "values", gradient)]))
        waits = [w for w in waits if w is not None]
        return None if not waits else token(waits)

    def record(self, device, token):
        if token is not None:
            self._last[device] = token


def gate(value, after):
    """`value`, computed only once `after` (a token) exists.

    A token is 0, -0 or NaN, never below 0, so the select always keeps
    `value`; no compiler can prove that, so the data dependency stays (XLA
    drops an `optimization_barrier` on CPU, and folds a comparison it can
    decide, such as one of `min(abs(x), 0)`, but not this).
    """
    if after is None:
        return value
    return ops.where(after < 0, 0.0, value)


def token(values):
    """A scalar that exists once every tensor in `values` does: 0, -0 or
    NaN (the sum of their first entries times 0, which XLA does not fold:
    `x * 0` is NaN for an infinite or NaN `x`)."""
    total = None
    for value in values:
        first = ops.cast(ops.reshape(value, (-1,))[0], "float32") * 0.0
        total = first if total is None else total + first
    return total


def update(settings, gradient, variable, slots, learning_rate, order=None,
           index=None):
    """One SM3 step of `variable` and its `slots`, on the best path there is.

    Args:
        settings: `Settings`.
        gradient: dense, or a `tf.IndexedSlices` over axis 0 (TensorFlow).
        variable: the model variable (a Keras variable, or the local
            `tf.Variable` of one replica inside a strategy's update).
        slots: `Slots` of `variable` (Keras variables).
        learning_rate: this step's learning rate, a scalar tensor.
        order: the step's `Order`, or None.
        index: `variable`'s position in the model's variables (`Order`).
    """
    from sm3_tf.kernels import native
    from sm3_tf.kernels import portable

    run = _run_here
    if keras.backend.backend() == "tensorflow":
        from sm3_tf.kernels import sparse
        from sm3_tf.kernels import tensorflow

        if sparse.takes_sparse_step(settings, gradient, variable):
            sparse.update(settings, gradient, variable, slots, learning_rate)
            return
        gradient = sparse.densified(gradient)
        run = tensorflow.run
    if settings.cpu_kernel and native.applies(settings, gradient, variable):
        # Written over the variable, it waits for backpropagation's last
        # read of it (`Order`); over the gradient, for nothing.
        run(native.dense_update, settings, gradient, variable, slots,
            learning_rate, order,
            None if native.writes_over_gradient(gradient) else index)
    else:
        run(portable.dense_update_in_step if computed_here(gradient)
            else portable.dense_update, settings, gradient, variable, slots,
            learning_rate, order)


def computed_here(gradient):
    """Whether the XLA program being traced computed `gradient` (a whole
    training step compiled as one), rather than was given it."""
    if keras.backend.backend() == "tensorflow":
        from sm3_tf.kernels import tensorflow

        return (tensorflow.in_xla_program()
                and tensorflow.computed_in_graph(gradient))
    if keras.backend.backend() == "jax":
        from sm3_tf import _compat

        return _compat.jax_computed_in_trace(gradient)
    return False


def _run_here(step, settings, gradient, variable, slots, learning_rate,
              order, index=None):
    """Runs `step` as it is (JAX and PyTorch: `jax.jit` compiles the whole
    step where Keras does), ordered after the step's previous update."""
    after = order.after("", index) if order is not None else None
    done = step(settings, gradient, variable, slots, learning_rate, after)
    if order is not None:
        order.record("", done)


def is_sparse(gradient):
    """Whether `gradient` is a `tf.IndexedSlices` (TensorFlow's sparse rows)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(gradient, tf.IndexedSlices)


def checked(grads, variables):
    """A context for a step that refuses gradients its variables cannot
    take, before anything is written (TensorFlow: sparse rows outside their
    variable, `sparse.rows_checked`)."""
    if keras.backend.backend() == "tensorflow":
        from sm3_tf.kernels import sparse

        return sparse.rows_checked(zip(grads, variables))
    return contextlib.nullcontext()


def placed_beside(variable):
    """A context in which a new optimizer variable is placed where Keras
    places the slots of `variable` (TensorFlow: colocated with it)."""
    if keras.backend.backend() == "tensorflow":
        from sm3_tf.kernels import tensorflow

        return tensorflow.placed_beside(variable)
    return contextlib.nullcontext()
