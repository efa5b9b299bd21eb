"""SM3-II as pure functions of tensors (`keras.ops`: any backend, any device).

A variable of rank >= 2 keeps one accumulator vector per axis; a step is

    prev  = min over i of acc_i, laid along axis i
    nu    = prev + g**2                 (beta2 < 1: beta2 * prev + (1 - beta2) * g**2)
    acc_i = max of nu over every axis but i
    u     = g / sqrt(nu + epsilon), and 0 where nu == 0
    m     = momentum * m + (1 - momentum) * u      (no momentum: m = u)
    var   = var - learning_rate * m

A scalar or vector keeps a full accumulator: prev = acc, acc = nu (Adagrad).
docs/spec.md states the rule and its choices; nothing here reads or writes
state, and how a device runs it fast is `sm3_tf.kernels`' business.
"""

import math

from keras import ops


def squared(grad):
    """`g**2`, where a NaN counts as `+inf`.

    Backends disagree on a NaN inside a max (NumPy keeps it, XLA:CPU's
    reductions drop it), so a NaN gradient entry enters the statistics as
    +inf on every backend: its accumulators become +inf and its update
    NaN (NaN / inf, and inf / inf for an infinite entry), which the
    parameter then shows.
    """
    square = ops.square(grad)
    return ops.where(ops.isnan(square), float("inf"), _rounded(square))


def second_moment(prev, grad, beta2):
    """`nu`: the running sum (`beta2 == 1`) or a moving average of `g**2`."""
    if beta2 == 1.0:
        return prev + squared(grad)
    return _rounded(beta2 * prev) + _rounded((1.0 - beta2) * squared(grad))


def _rounded(product):
    """`product` (>= 0), rounded before anything is added: XLA fuses a
    product and an addition into one multiply-add in some passes over `nu`
    and not in others, which then disagree in the last bit; not over a max."""
    return ops.maximum(product, 0.0)


def preconditioned(grad, nu, epsilon):
    """`g / sqrt(nu + epsilon)`, 0 where `nu == 0` (so `epsilon` may be 0);
    a NaN or infinite `nu` gives a NaN update, not 0."""
    return ops.where(nu == 0, 0.0, grad / ops.sqrt(nu + epsilon))


def velocity(momentum_value, update, momentum):
    """The momentum's new value: an exponential moving average of updates."""
    return momentum * momentum_value + (1.0 - momentum) * update


def split_axes(shape):
    """Where the axes of `shape` are cut into the (rows, cols) view that the
    maxima take two passes over, whatever the rank: the cut that leaves the
    two reduced vectors shortest ((3, 3, 512, 256) as (4608, 256)). An
    unknown leading size (a sparse step's rows) is cut after axis 0."""
    sizes = [2**31 if d is None else d for d in shape]
    return min(range(1, len(shape)),
               key=lambda k: math.prod(sizes[:k]) + math.prod(sizes[k:]))


def estimate(accumulators, shape):
    """`prev` over the (rows, cols) view of `shape`: min of the axes' vectors."""
    split = split_axes(shape)
    rows = _laid_min(accumulators[:split])
    cols = _laid_min(accumulators[split:])
    return ops.minimum(ops.reshape(rows, (-1, 1)), ops.reshape(cols, (1, -1)))


def axis_maxima(nu, shape):
    """`[max of nu over every axis but i]` for `nu` in the view of `shape`."""
    split = split_axes(shape)
    rows = ops.reshape(_max(nu, (1,)), (-1,) + tuple(shape[1:split]))
    cols = ops.reshape(_max(nu, (0,)), tuple(shape[split:]))
    return _each_axis_max(rows) + _each_axis_max(cols)


def dense_step(grad, accumulators, beta2, epsilon):
    """`(u, new accumulators)` for `grad` (in the compute dtype) and the
    accumulators' values: one vector per axis, or for rank <= 1 one tensor
    of the variable's shape."""
    shape = tuple(grad.shape)
    if len(shape) <= 1:
        nu = second_moment(accumulators[0], grad, beta2)
        return preconditioned(grad, nu, epsilon), [nu]
    matrix, nu = _matrix_second_moment(grad, accumulators, beta2)
    update = ops.reshape(preconditioned(matrix, nu, epsilon), shape)
    return update, axis_maxima(nu, shape)


def matrix_update(grad, accumulators, beta2, epsilon):
    """`u` alone, for `grad` of rank >= 2: `dense_step`'s first half."""
    matrix, nu = _matrix_second_moment(grad, accumulators, beta2)
    return ops.reshape(preconditioned(matrix, nu, epsilon), tuple(grad.shape))


def matrix_statistics(grad, accumulators, beta2):
    """The new accumulators alone, for `grad` of rank >= 2: `dense_step`'s
    second half."""
    _, nu = _matrix_second_moment(grad, accumulators, beta2)
    return axis_maxima(nu, tuple(grad.shape))


def _matrix_second_moment(grad, accumulators, beta2):
    """`(grad, nu)` in the (rows, cols) view of `grad`'s shape."""
    prev = estimate(accumulators, tuple(grad.shape))
    matrix = ops.reshape(grad, tuple(prev.shape))
    return matrix, second_moment(prev, matrix, beta2)


def _laid_min(vectors):
    """min over `vectors` laid along the axes of their outer product, flat."""
    rank = len(vectors)
    result = None
    for axis, vector in enumerate(vectors):
        laid = ops.reshape(vector, [-1 if i == axis else 1 for i in range(rank)])
        result = laid if result is None else ops.minimum(result, laid)
    return ops.reshape(result, (-1,))


def _each_axis_max(x):
    """The per-axis maxima of a small tensor (itself when it is a vector)."""
    rank = len(x.shape)
    if rank == 1:
        return [x]
    return [_max(x, tuple(a for a in range(rank) if a != i)) for i in range(rank)]


def _max(x, axis):
    if all(x.shape):  # `initial` costs XLA a kernel of its own
        return ops.max(x, axis=axis)
    return ops.max(x, axis=axis, initial=0.0)  # an empty or unknown length

