"""The exact sparse SM3 step for `tf.IndexedSlices` gradients (TensorFlow only).

A sparse gradient touches rows `indices` of a variable of shape
`(d0, d1, ..., dk)`. The step equals the dense rule applied to the dense
gradient (docs/spec.md, "Sparse gradients"):

1. Slices of a repeated row are summed before anything is squared.
2. For touched rows: `nu = min(acc_0[row], acc_1, ..., acc_k) + g**2`.
3. `acc_0[row]` becomes the max of `nu` over the row (a scatter-max);
   untouched rows keep theirs, as the dense rule would.
4. `acc_i` (i >= 1) becomes `max(acc_i, max of nu over touched rows and the
   other axes)`.
5. momentum == 0: only the touched rows of the variable are read and written.
   momentum > 0: every row's momentum decays, so every row moves.

Inside an XLA program shapes must stay static, so there is no `tf.unique`:
repeated rows are found by sorting the `n` indices, and every slice of a
repeated row carries the row's summed gradient. Scatter-max is idempotent, so
the duplicates are scattered as they are; additive scatters use only each
row's first slice. Elsewhere the distinct rows are taken with `tf.unique`.
Where the CPU kernel runs, a float32 step without momentum is one native call
instead (`sm3_tf.kernels.native.sparse_update`).
"""

import keras
import tensorflow as tf

from sm3_tf import rule
from sm3_tf.kernels import native
from sm3_tf.kernels import tensorflow as tf_kernels


def takes_sparse_step(settings, gradient, variable):
    """Whether `gradient` takes this step: a `tf.IndexedSlices`, and the
    running sum (with `beta2 < 1` every row's statistics decay: the step is
    dense by nature)."""
    return (isinstance(gradient, tf.IndexedSlices) and settings.beta2 == 1.0
            and len(variable.shape) >= 1)


def densified(gradient):
    """A dense gradient (a `tf.IndexedSlices` made dense, repeats summed)."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def rows_checked(grads_and_variables):
    """A context in which a step runs only if every sparse gradient names
    rows of its variable: a ValueError now when executing eagerly; in a
    `tf.function`, an InvalidArgumentError before anything in the context
    runs (Keras's iteration count included). Both name the variable. An XLA
    program cannot raise: there `update` makes such a step change nothing."""
    checks = []
    for gradient, variable in grads_and_variables:
        if not isinstance(gradient, tf.IndexedSlices):
            continue
        rows = int(variable.shape[0])
        indices = tf.cast(gradient.indices, tf.int32)
        inside = tf.reduce_all((indices >= 0) & (indices < rows))
        message = (f"SM3: a sparse gradient for variable {_name(variable)!r}"
                   f" of shape {tuple(variable.shape)} names rows outside "
                   f"[0, {rows}):")
        if tf.executing_eagerly():
            if not bool(inside):
                raise ValueError(
                    f"{message} {sorted(set(indices.numpy().tolist()))}.")
        elif not tf_kernels.in_xla_program():
            checks.append(tf.debugging.Assert(inside, [message, indices],
                                              summarize=64))
    return tf.control_dependencies(checks)


def update(settings, gradient, variable, slots, learning_rate):
    """One exact sparse step of `variable` and its `slots` (beta2 == 1)."""
    var = _tf(variable)
    indices = tf.cast(gradient.indices, tf.int32)
    values = tf.reshape(gradient.values, [-1] + var.shape.as_list()[1:])
    if slots.momentum is None and settings.cpu_kernel and (
            native.applies_to_sparse(settings, indices, values, variable)):
        tf_kernels.run(native.sparse_update, settings,
                       tf.IndexedSlices(values, indices), variable, slots,
                       learning_rate, None)
        return
    _sparse_step(settings, indices, values, var, slots, learning_rate)


def _sparse_step(settings, indices, values, var, slots, learning_rate):
    """The step as TensorFlow ops (module docstring)."""
    acc = _tf(slots.accumulators[0])
    tail = [tf.convert_to_tensor(_tf(a)) for a in slots.accumulators[1:]]
    compute_dtype = acc.dtype
    shape = var.shape.as_list()
    values = tf.cast(values, compute_dtype)
    if tf_kernels.in_xla_program():
        inside = tf.reduce_all((indices >= 0) & (indices < var.shape[0]))
        grad, first = sum_repeated_rows(indices, values)
        # No error can be raised here: a batch with rows outside the
        # variable changes nothing (zero gradient, no decay, no step).
        grad = grad * tf.cast(inside, compute_dtype)
    else:
        indices, grad = distinct_rows(indices, values)
        first = None
    if len(shape) == 1:
        nu = rule.second_moment(tf.gather(acc, indices), grad, 1.0)
        acc.scatter_max(tf.IndexedSlices(nu, indices))
        update = rule.preconditioned(grad, nu, settings.epsilon)
    else:
        view = (None,) + tuple(shape[1:])
        prev = rule.estimate([tf.gather(acc, indices)] + tail, view)
        nu = rule.second_moment(prev, tf.reshape(grad, tf.shape(prev)), 1.0)
        maxima = rule.axis_maxima(nu, view)
        acc.scatter_max(tf.IndexedSlices(maxima[0], indices))
        for accumulator, maximum in zip(slots.accumulators[1:], maxima[1:]):
            # An empty batch reduces to 0, which leaves the entry as it is.
            _tf(accumulator).assign(tf.maximum(
                tf.convert_to_tensor(_tf(accumulator)), maximum))
        update = tf.reshape(
            rule.preconditioned(tf.reshape(grad, tf.shape(prev)), nu,
                                settings.epsilon), tf.shape(grad))
    if first is not None:
        update = update * _along_rows(first, len(shape))
    rate = tf.cast(learning_rate, compute_dtype)
    if slots.momentum is None:
        var.scatter_sub(tf.IndexedSlices(tf.cast(rate * update, var.dtype),
                                         indices))
        return
    # Every row's momentum decays: a dense pass, rounded as the dense rule
    # rounds it (`mu * m + (1 - mu) * u`, in the compute dtype, stored, and
    # the variable stepped by `m` as stored).
    m = _tf(slots.momentum)
    old = tf.cast(m, compute_dtype)
    new = tf.tensor_scatter_nd_add(
        settings.momentum * old, indices[:, None],
        (1.0 - settings.momentum) * update)
    if first is not None:
        new = tf.where(inside, new, old)
        rate = rate * tf.cast(inside, compute_dtype)
    stored = tf.cast(new, m.dtype)
    m.assign(stored)
    var.assign_sub(tf.cast(rate * tf.cast(stored, compute_dtype), var.dtype))


def sum_repeated_rows(indices, values):
    """Sums the slices of repeated indices, keeping static shapes.

    Args:
      indices: int tensor of shape `(n,)`, may repeat.
      values: tensor of shape `(n, ...)`.

    Returns:
      `(summed, first)`: `summed[j]` is the sum of all slices whose index is
      `indices[j]` (so repeats carry the same value), and `first[j]` is 1.0
      for exactly one slice of each distinct index and 0.0 for the others.
    """
    n = tf.shape(indices)[0]
    order = tf.argsort(indices, stable=True)
    sorted_indices = tf.gather(indices, order)
    starts = tf.concat(
        [tf.ones([1], tf.bool)[:n], sorted_indices[1:] != sorted_indices[:-1]],
        axis=0)
    segment_of_sorted = tf.cumsum(tf.cast(starts, tf.int32)) - 1
    segment = tf.scatter_nd(order[:, None], segment_of_sorted, [n])
    first = tf.scatter_nd(order[:, None], tf.cast(starts, values.dtype), [n])
    sums = tf.math.unsorted_segment_sum(values, segment, num_segments=n)
    return tf.gather(sums, segment), first


def distinct_rows(indices, values):
    """`(rows, sums)`: each index once, with the sum of its slices (a
    dynamic shape: for steps that XLA does not compile)."""
    rows, segment = tf.unique(indices)
    sums = tf.math.unsorted_segment_sum(values, segment, tf.shape(rows)[0])
    return rows, sums


def _along_rows(vector, rank):
    """Lays an `(n,)` vector along axis 0 of a rank-`rank` tensor."""
    return tf.reshape(vector, [-1] + [1] * (rank - 1))


def _tf(variable):
    """The `tf.Variable` behind a Keras variable."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def _name(variable):
    return getattr(variable, "path", None) or variable.name
