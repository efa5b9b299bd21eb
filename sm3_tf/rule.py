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


def max_over_all_axes_but_each(x, blocks=1):
    """`[max of x over every axis but i for i in range(rank)]`, for `x >= 0`.

    Reducing each axis separately reads the whole tensor once per axis.
    Instead the axes are split into a leading and a trailing group: one pass
    reduces the trailing group (leaving a tensor over the leading axes), one
    pass the leading group, and each small tensor is then reduced once per
    axis. The split is placed where the two small tensors are smallest, so
    a (1, 1, 1024, 2048) kernel splits as (1, 1, 1024) | (2048), not as
    (1, 1) | (1024, 2048), which would leave a full-size tensor behind.
    Any rank costs two full passes. `max` is exact and associative, so the
    result is bit-identical to the direct reduction.

    Args:
        x: a tensor with no negative entries.
        blocks: when > 1 (and `x` is large, with a known shape), each full
            pass is written as the elementwise max of `blocks` slices
            (`fold_max`), then a reduction of a tensor `blocks` times
            smaller. Same result; on XLA:CPU it is faster, because XLA fuses
            the slices with the expression that produces `x` into one
            vectorized loop, where it writes a reduction's input to memory
            first (docs/performance.md).

    An empty `x` (a sparse step that touches no row) reduces to 0.
    """
    shape = tuple(x.shape)
    rank = len(shape)
    if rank == 1:
        return [x]
    split = min(
        range(1, rank),
        key=lambda k: _size(shape[:k]) + _size(shape[k:]),
    )
    if blocks > 1 and None not in shape and _size(shape) >= FOLD_MIN_SIZE:
        matrix = ops.reshape(x, (_size(shape[:split]), _size(shape[split:])))
        leading = ops.reshape(
            _max(fold_max(matrix, 1, blocks), axis=(1,)), shape[:split]
        )
        trailing = ops.reshape(
            _max(fold_max(matrix, 0, blocks), axis=(0,)), shape[split:]
        )
    else:
        leading = _max(x, axis=tuple(range(split, rank)))
        trailing = _max(x, axis=tuple(range(split)))
    return _max_over_each_axis(leading) + _max_over_each_axis(trailing)


# Tensors smaller than this are reduced directly: folding them saves less
# memory traffic than the extra kernel launch costs (about 10 us on XLA:CPU).
FOLD_MIN_SIZE = 1 << 16


def _max_over_each_axis(x):
    """The per-axis maxima of a small tensor: one reduction per axis."""
    rank = len(x.shape)
    if rank == 1:
        return [x]
    return [
        _max(x, axis=tuple(a for a in range(rank) if a != axis))
        for axis in range(rank)
    ]


def fold_max(x, axis, blocks):
    """Elementwise max of `blocks` slices of a 2-D `x` along `axis`.

    The slices have length `ceil(n / blocks)` and cover the axis; the last
    one is moved back to end at `n`, so it may overlap its neighbour. `max`
    is idempotent: overlap leaves the result exact. An axis shorter than
    `2 * blocks` is returned unchanged.
    """
    n = x.shape[axis]
    if n < 2 * blocks:
        return x
    length = -(-n // blocks)
    starts = sorted({min(i * length, n - length) for i in range(blocks)})
    folded = None
    for start in starts:
        begin = [0, 0]
        begin[axis] = start
        size = list(x.shape)
        size[axis] = length
        part = ops.slice(x, begin, size)
        folded = part if folded is None else ops.maximum(folded, part)
    return folded


def _size(dims):
    size = 1
    for d in dims:
        size *= d if d is not None else 2**31  # unknown rows: a large size
    return size


def _max(x, axis):
    if all(x.shape):  # `initial` costs XLA a kernel of its own
        return ops.max(x, axis=axis)
    return ops.max(x, axis=axis, initial=0.0)  # empty or unknown length


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


def dense_step(grad, accumulators, beta2, epsilon, blocks=1):
    """One dense SM3 step on the accumulators.

    Args:
        grad: the gradient, already in the compute dtype.
        accumulators: for rank <= 1 a one-element list with the full accumulator;
            for rank >= 2 one vector per axis. Values, not variables.
        beta2: 1.0 for the running sum, < 1 for an exponential moving average.
        epsilon: added to `nu` inside the square root.
        blocks: how `max_over_all_axes_but_each` writes its passes (exact
            either way; a speed choice per backend and device).

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
        max_over_all_axes_but_each(
            _nu_for_reductions(accumulators, grad, beta2), blocks
        ),
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
