"""Runs SM3's dense update under XLA on TensorFlow, even in an uncompiled step.

Without XLA, TensorFlow runs the dense rule as a dozen separate kernels, each
reading and writing a full-size temporary, and its reductions over leading
axes are slow: SM3's step measured 4x SGD-with-momentum that way. Compiled,
the rule becomes a few fused loops (see docs/performance.md). So the update
of each variable runs in a `tf.function(jit_compile=True)`:

- inside a plain `tf.function` or eagerly, it becomes one XLA launch per
  variable of rank >= 2, and one for all scalars and vectors of a dtype
  (`vector_update`);
- inside a step that is already compiled (`jit_compile=True`, TPUs), the
  rule is traced straight into the enclosing XLA program: a nested compiled
  function there would pass the variables by copy (measured: three extra
  variable-sized buffers per step).

Under a strategy with several replicas the variables are distributed values
that a nested function cannot take as arguments, so there the rule runs as
plain TensorFlow ops (still exact; only slower without XLA).
"""

import math

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util


def _local(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


# Variables with at least this many entries (1 MiB in float32) have their
# compiled updates ordered one after another.
ORDERED_MIN_SIZE = 1 << 18


def _single_replica():
    return tf.distribute.get_strategy().num_replicas_in_sync == 1


def can_compile_updates():
    """Whether an update traced now can be compiled: inside an XLA program,
    or elsewhere with one replica (module docstring)."""
    return in_xla_program() or _single_replica()


def in_xla_program():
    """Whether the op being traced is part of an XLA-compiled function."""
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def wait_for_all_gradients(optimizer, gradients):
    """Makes this step's compiled updates start once every gradient exists.

    Keras passes a step's gradients through one IdentityN (its all-reduce,
    even with a single replica), which would make every update wait for all
    of them, but Grappler removes it before the step runs: TensorFlow then
    starts each compiled update as soon as its own gradient exists, in the
    middle of backpropagation. There, on 2 cores, the updates slowed the rest
    of the step by more than they saved: a small Transformer's training step
    took 3-7 ms longer (of 270-300) than with every update waiting for the
    last gradient (scripts/bench_step.py --fit, docs/performance.md). So
    `SM3.apply` groups the gradients and each compiled update waits for the
    group. Nothing changes eagerly, inside an XLA program (one program,
    scheduled by XLA), with several replicas (no compiled updates there) or
    where TensorFlow sees a GPU: the slowdown is the CPU's cores contended
    for, and on a GPU an early update may fill a gap in its stream instead
    (not measured: no GPU was at hand).
    """
    ready = None
    if (not tf.executing_eagerly() and not in_xla_program()
            and _single_replica()
            and not tf.config.list_logical_devices("GPU")):
        tensors = []
        for gradient in gradients:
            if isinstance(gradient, tf.IndexedSlices):
                tensors += [gradient.values, gradient.indices]
            elif tf.is_tensor(gradient):
                tensors.append(gradient)
        if tensors:
            ready = tf.group(*tensors)
    object.__setattr__(optimizer, "_sm3_gradients_ready", ready)


def _update_in_xla(optimizer, gradient, variable, accumulator, momentum,
                   learning_rate):
    """The dense step traced into an XLA program: the CPU kernel where
    `SM3(cpu_kernel=True)` asks for it and it applies, else the rule."""
    if optimizer.cpu_kernel:
        from sm3_tf import cpu_kernel

        if cpu_kernel.applies(optimizer, gradient, variable):
            cpu_kernel.dense_update(optimizer, gradient, variable,
                                    accumulator, momentum, learning_rate)
            return
    optimizer._dense_update(gradient, variable, accumulator, momentum,
                            learning_rate)


def vector_update(optimizer, distribution, accumulator, items,
                  learning_rate):
    """One step of the scalars and vectors that share `accumulator`, together
    (`items` as `SM3._step_vectors` takes them): one compiled update where
    it can be (`cpu_kernel`'s vectors call where it applies, else the rule),
    else plain ops, under `distribution` as Keras updates a variable."""
    rest = [item[1:] for item in items]

    def update(_, gradients, learning_rate):
        grouped = [(gradient,) + other
                   for gradient, other in zip(gradients, rest)]
        if not can_compile_updates():
            optimizer._step_vectors(accumulator, grouped, learning_rate)
            return
        _run_compiled(optimizer, "_sm3_compiled_vector_update",
                      _vectors_in_xla, (accumulator, grouped, learning_rate),
                      large=False)

    distribution.extended.update(
        _local(accumulator), update, args=([item[0] for item in items],
                                   learning_rate),
        group=False)


def _vectors_in_xla(optimizer, accumulator, items, learning_rate):
    if optimizer.cpu_kernel:
        from sm3_tf import cpu_kernel

        if cpu_kernel.applies_to_vectors(optimizer, accumulator, items):
            cpu_kernel.vector_update(optimizer, accumulator, items,
                                     learning_rate)
            return
    optimizer._step_vectors(accumulator, items, learning_rate)


def sparse_update(optimizer, gradient, variable, accumulator,
                  learning_rate):
    """The CPU kernel's sparse step (`cpu_kernel.sparse_update`), compiled
    with XLA: one launch where TensorFlow ran some twenty small ops."""
    _run_compiled(
        optimizer, "_sm3_compiled_sparse_update", _sparse_in_xla,
        (gradient.indices, tf.cast(gradient.values, tf.float32), variable,
         accumulator, learning_rate), large=False)


def _sparse_in_xla(optimizer, indices, values, variable, accumulator,
                   learning_rate):
    from sm3_tf import cpu_kernel

    cpu_kernel.sparse_update(optimizer, indices, values, variable,
                             accumulator, learning_rate)


def dense_update(optimizer, gradient, variable, accumulator, momentum,
                 learning_rate):
    """`optimizer._dense_update(...)`, compiled with XLA where it can be."""
    if not can_compile_updates():
        optimizer._dense_update(gradient, variable, accumulator, momentum,
                                learning_rate)
        return
    _run_compiled(
        optimizer, "_sm3_compiled_dense_update", _update_in_xla,
        (gradient, variable, accumulator, momentum, learning_rate),
        large=math.prod(variable.shape) >= ORDERED_MIN_SIZE)


def _run_compiled(optimizer, name, update, args, large):
    """`update(optimizer, *args)` as it belongs in the step being traced.

    Inside an XLA program, traced straight into it; elsewhere, as a
    `tf.function(jit_compile=True)` kept on the optimizer as `name`, its
    variables passed by reference (`_local`).
    """
    if in_xla_program():
        update(optimizer, *args)
        return
    compiled = getattr(optimizer, name, None)
    if compiled is None:
        def compiled_update(*args):
            update(optimizer, *args)
            return tf.constant(0)

        compiled = tf.function(compiled_update, jit_compile=True,
                               autograph=False)
        # Not an attribute Keras should track: a plain object.__setattr__.
        object.__setattr__(optimizer, name, compiled)
    # TensorFlow runs independent ops concurrently, and each compiled update
    # holds temporaries while it runs (a quarter of the variable with folded
    # reductions): in a traced step, the updates of large variables run one
    # after another, so that one variable's temporaries are live at a time
    # (ResNet-50 without momentum: 157 MiB above SGD, 292 unordered). Small
    # ones stay concurrent (ordering all of ResNet-50's 214 updates cost a
    # third of the step's time).
    graph = tf.compat.v1.get_default_graph()
    previous = optimizer.__dict__.get("_sm3_previous_update")
    ready = optimizer.__dict__.get("_sm3_gradients_ready")
    after = []
    if not tf.executing_eagerly():
        # `ready` and `previous` may come from another trace (a function
        # traced earlier, or a branch of a `cond`): only ops of this graph
        # can order this update.
        if ready is not None and ready.graph is graph:
            after.append(ready)
        if large and previous is not None and previous.graph is graph:
            after.append(previous)
    with tf.control_dependencies(after):
        done = compiled(*tf.nest.map_structure(_local, args))
    if large and not tf.executing_eagerly():
        object.__setattr__(optimizer, "_sm3_previous_update", done)
