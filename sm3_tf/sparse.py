"""The exact sparse SM3 step for `tf.IndexedSlices` gradients (TensorFlow only).

A sparse gradient touches rows `indices` of a variable of shape
`(d0, d1, ..., dk)`. The step equals the dense rule applied to the dense
gradient (`../shared/docs/sm3-spec.md`, "Sparse gradients"):

1. Slices of a repeated row are summed before anything is squared.
2. For touched rows: `nu = min(acc_0[row], acc_1, ..., acc_k) + g * g`.
3. `acc_0[row]` becomes the max of `nu` over the row (a scatter-max);
   untouched rows keep theirs, as the dense rule would.
4. `acc_i` (i >= 1) becomes `max(acc_i, max of nu over touched rows and the
   other axes)`.
5. momentum == 0: only the touched rows of the variable are read and written.
   momentum > 0: every row's momentum decays, so every row moves.

Inside an XLA program (a step compiled with `jit_compile=True`, TPUs) shapes
must stay static, so there is no `tf.unique`: repeated rows are found by
sorting the `n` indices, and every slice of a repeated row carries the row's
summed gradient. Scatter-max is idempotent, so the duplicates are scattered as
they are; additive scatters use only each row's first slice. Elsewhere the
distinct rows are taken with `tf.unique` and every op works on those only:
with Zipf-like token ids (4,096 ids, 1,122 distinct), the uncompiled step
took 1.7-1.9 ms instead of 3.5-4.4 (docs/performance.md).

Where SM3 takes its CPU kernel (`cpu_kernel`), a float32 variable's step
without momentum is the kernel's `sparse_update` instead: the same rule in
one call (1.2-1.5 ms on that batch, against 2.0-2.6 here).
"""

import keras
import tensorflow as tf

from sm3_tf import rule
from sm3_tf import tf_compile


def is_sparse(gradient):
    return isinstance(gradient, tf.IndexedSlices)


def densify(gradient):
    """The dense gradient (duplicate rows summed, as `tf.IndexedSlices` means)."""
    return tf.convert_to_tensor(gradient)


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
        axis=0,
    )
    segment_of_sorted = tf.cumsum(tf.cast(starts, tf.int32)) - 1
    segment = tf.scatter_nd(order[:, None], segment_of_sorted, [n])
    first = tf.scatter_nd(order[:, None], tf.cast(starts, values.dtype), [n])
    sums = tf.math.unsorted_segment_sum(values, segment, num_segments=n)
    return tf.gather(sums, segment), first


def distinct_rows(indices, values):
    """`(rows, sums)`: each index once, with the sum of its slices.

    A dynamic shape: for steps that XLA does not compile.
    """
    rows, segment = tf.unique(indices)
    sums = tf.math.unsorted_segment_sum(values, segment, tf.shape(rows)[0])
    return rows, sums


def _broadcast_rows(vector, rank):
    """Lays a `(n,)` vector along axis 0 of a rank-`rank` tensor."""
    return tf.reshape(vector, [-1] + [1] * (rank - 1))


def sparse_step(optimizer, gradient, variable, accumulator, momentum,
                learning_rate, offset=0):
    """Applies one exact sparse SM3 step (beta2 == 1) to `variable`.

    Args:
      optimizer: the `SM3` instance (for its hyperparameters).
      gradient: a `tf.IndexedSlices` over axis 0 of `variable`.
      variable: the model variable (Keras or tf variable).
      accumulator: its accumulator variable, as `SM3.build` made it (rank
        >= 2: the per-axis vectors end to end, axis 0 first; rank 1: the
        `vector_accumulator` it shares, its entries from `offset` on).
      momentum: its momentum variable, or None.
      learning_rate: the current learning rate.
      offset: where a vector's entries start in `accumulator`.
    """
    if optimizer.cpu_kernel and tf_compile.can_compile_updates():
        from sm3_tf import cpu_kernel

        if cpu_kernel.applies_to_sparse(optimizer, gradient, variable,
                                        momentum):
            tf_compile.sparse_update(optimizer, gradient, variable,
                                     accumulator, learning_rate)
            return
    var = _tf_variable(variable)
    acc = _tf_variable(accumulator)
    compute_dtype = acc.dtype
    rank = len(var.shape)
    indices = tf.cast(gradient.indices, tf.int32)
    values = tf.cast(gradient.values, compute_dtype)
    values = tf.reshape(values, [-1] + var.shape.as_list()[1:])
    if tf_compile.in_xla_program():
        grad, first = sum_repeated_rows(indices, values)
    else:
        indices, grad = distinct_rows(indices, values)
        first = None

    if rank == 1:
        entries = indices + offset
        nu = rule.second_moment(tf.gather(acc, entries), grad, 1.0)
        acc.scatter_max(tf.IndexedSlices(nu, entries))
    else:
        # Axis 0's vector comes first in the accumulator: a row's entry is
        # at the row's index. The other axes' follow (the tail). Only those
        # entries are read: once a variable has been updated sparsely,
        # TensorFlow copies all of it on every dense read (copy-on-read
        # mode), here 4 MiB for 64 entries (measured: 0.25-0.6 ms of a 2 ms
        # step).
        shape = var.shape.as_list()
        tail = tf.range(shape[0], sum(shape))
        prev = rule.min_of_accumulators(
            [tf.gather(acc, indices)]
            + rule.unpack(tf.gather(acc, tail), shape[1:]))
        # Products rounded as in the dense rule, so that the passes over
        # `nu` agree to the bit (`rule._rounded`).
        nu = rule.second_moment(prev, grad, 1.0, rounded_products=True)
        maxima = rule.max_over_all_axes_but_each(nu)
        acc.scatter_max(tf.IndexedSlices(maxima[0], indices))
        # An empty slice reduces to 0, which leaves the entry unchanged.
        acc.scatter_max(tf.IndexedSlices(tf.concat(maxima[1:], 0), tail))
    update = rule.preconditioned(grad, nu, optimizer.epsilon)
    if first is not None:
        update = update * _broadcast_rows(first, rank)
    lr = tf.cast(learning_rate, compute_dtype)

    if momentum is None:
        var.scatter_sub(
            tf.IndexedSlices(tf.cast(lr * update, var.dtype), indices)
        )
        return
    m = _tf_variable(momentum)
    beta1 = optimizer.momentum
    m.assign(tf.cast(beta1 * tf.cast(m, compute_dtype), m.dtype))
    m.scatter_add(
        tf.IndexedSlices(tf.cast((1.0 - beta1) * update, m.dtype), indices)
    )
    var.assign_sub(tf.cast(lr * tf.cast(m, compute_dtype), var.dtype))


def _tf_variable(variable):
    """The `tf.Variable` behind a Keras variable."""
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable
