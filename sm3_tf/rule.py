"""The SM3-II update rule as pure functions of tensors (`keras.ops`, any backend).

The optimizer in `sm3_tf.optimizer` owns the variables and calls these; the
sparse path in `sm3_tf.sparse` reuses them on the touched rows. Nothing here
reads or writes state, so the math can be read in one screen:

        prev  = min_i acc_i broadcast along axis i       (rank <= 1: prev = acc)
        nu    = prev + g * g                             (beta2 < 1: EMA of g * g)
        acc_i = max of nu over every axis but i          (rank <= 1: acc = nu)
        u     = g * rsqrt(nu + epsilon) where nu > 0, else 0
"""

from keras import ops


def broadcast_shape(rank, axis, size):
    """Shape that lays a vector of length `size` along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis] = size
    return shape


def min_of_accumulators(accumulators, leading=None):
    """The SM3 estimate `prev`: elementwise min of the per-axis accumulators.

    Args:
        accumulators: one vector per axis, `accumulators[i]` of length `d_i`.
        leading: optional tensor of shape `(n,)` that replaces
            `accumulators[0]` (the sparse path passes the touched rows' values).

    Returns:
        A tensor of shape `(d_0, ..., d_k)` (or `(n, d_1, ..., d_k)`).
    """
    vectors = list(accumulators)
    if leading is not None:
        vectors[0] = leading
    rank = len(vectors)
    prev = None
    for axis, vector in enumerate(vectors):
        size = vector.shape[0]
        laid = ops.reshape(
            vector, broadcast_shape(rank, axis, -1 if size is None else size)
        )
        prev = laid if prev is None else ops.minimum(prev, laid)
    return prev


def max_over_all_axes_but_each(x):
    """`[max of x over every axis but i for i in range(rank)]`, for `x >= 0`.

    Reducing each axis separately reads the whole tensor once per axis.
    Instead the axes are split into a leading and a trailing group: one pass
    reduces the trailing group (leaving a tensor over the leading axes), one
    pass the leading group, and each group recurses on its much smaller
    tensor. The split is placed where the two small tensors are smallest, so
    a (1, 1, 1024, 2048) kernel splits as (1, 1, 1024) | (2048), not as
    (1, 1) | (1024, 2048), which would leave a full-size tensor to recurse on.
    Any rank costs two full passes. `max` is exact and associative, so the
    result is bit-identical to the direct reduction.

    The reductions start from 0 (`nu` is never negative), so an empty `x`
    (a sparse step that touches no row) reduces to 0 instead of failing.
    """
    shape = tuple(x.shape)
    rank = len(shape)
    if rank == 1:
        return [x]
    split = min(
        range(1, rank),
        key=lambda k: _size(shape[:k]) + _size(shape[k:]),
    )
    leading = _max(x, axis=tuple(range(split, rank)))
    trailing = _max(x, axis=tuple(range(split)))
    return max_over_all_axes_but_each(leading) + max_over_all_axes_but_each(
        trailing
    )


def _size(dims):
    size = 1
    for d in dims:
        size *= d if d is not None else 2**31  # unknown rows: a large size
    return size


def _max(x, axis):
    return ops.max(x, axis=axis, initial=0.0)


def second_moment(prev, grad, beta2):
    """`nu`: the running sum (beta2 == 1) or moving average of squared gradients."""
    if beta2 == 1.0:
        return prev + ops.square(grad)
    return beta2 * prev + (1.0 - beta2) * ops.square(grad)


def preconditioned(grad, nu, epsilon):
    """`g / sqrt(nu + epsilon)`, and 0 where `nu == 0` so that epsilon may be 0."""
    positive = nu > 0
    safe_nu = ops.where(positive, nu + epsilon, ops.ones_like(nu))
    return ops.where(positive, grad * ops.rsqrt(safe_nu), ops.zeros_like(grad))


def dense_step(grad, accumulators, beta2, epsilon):
    """One dense SM3 step on the accumulators.

    Args:
        grad: the gradient, already in the compute dtype.
        accumulators: for rank <= 1 a one-element list with the full accumulator;
            for rank >= 2 one vector per axis. Values, not variables.
        beta2: 1.0 for the running sum, < 1 for an exponential moving average.
        epsilon: added to `nu` inside the square root.

    Returns:
        `(update, new_accumulators)` with `update` shaped like `grad`.
    """
    if len(grad.shape) <= 1:
        nu = second_moment(accumulators[0], grad, beta2)
        return preconditioned(grad, nu, epsilon), [nu]
    prev = min_of_accumulators(accumulators)
    nu = second_moment(prev, grad, beta2)
    return (
        preconditioned(grad, nu, epsilon),
        max_over_all_axes_but_each(_nu_for_reductions(accumulators, grad, beta2)),
    )


def _nu_for_reductions(accumulators, grad, beta2):
    """`nu` again, as `min_i(second_moment(acc_i, g))`, for the reductions.

    Rounding is monotone, so `min_i fl(a_i + c) == fl(min_i a_i + c)`: this is
    bit-identical to `nu`. It is written differently on purpose: XLA on CPU
    cannot fuse a reduction with its producer, so the reductions need `nu` in
    memory; if the update shared that expression it would read it back too,
    where recomputing it from the gradient costs one pass less.
    """
    rank = len(grad.shape)
    nu = None
    for axis, acc in enumerate(accumulators):
        laid = ops.reshape(acc, broadcast_shape(rank, axis, acc.shape[0]))
        term = second_moment(laid, grad, beta2)
        nu = term if nu is None else ops.minimum(nu, term)
    return nu
