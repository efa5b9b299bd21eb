"""The SM3-II update rule as pure functions of tensors (`keras.ops`, any backend).

The optimizer in `sm3_tf.optimizer` owns the variables and calls these; the
sparse path in `sm3_tf.sparse` reuses them on the touched rows. Nothing here
reads or writes state, so the math can be read in one screen:

        prev  = min_i acc_i broadcast along axis i       (rank <= 1: prev = acc)
        nu    = prev + g * g                             (beta2 < 1: EMA of g * g)
        acc_i = max of nu over every axis but i          (rank <= 1: acc = nu)
        u     = g / sqrt(nu + epsilon) where nu > 0, else 0
"""

from keras import ops


def broadcast_shape(rank, axis, size):
    """Shape that lays a vector of length `size` along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis] = size
    return shape


def unpack(accumulator, shape):
    """The per-axis accumulators of a rank >= 2 variable of `shape`, from the
    one vector that stores them end to end (axis 0 first)."""
    if len(shape) <= 1:
        return [accumulator]
    starts = [sum(shape[:axis]) for axis in range(1, len(shape))]
    return ops.split(accumulator, starts)


def pack(accumulators, shape):
    """`unpack`'s inverse: the per-axis accumulators end to end."""
    if len(shape) <= 1:
        return accumulators[0]
    return ops.concatenate(accumulators)


def min_of_accumulators(accumulators):
    """The SM3 estimate `prev`: elementwise min of the per-axis accumulators.

    Args:
        accumulators: one vector per axis, `accumulators[i]` of length `d_i`
            (the sparse path passes the touched rows' entries as axis 0's).

    Returns:
        A tensor of shape `(d_0, ..., d_k)`.
    """
    vectors = list(accumulators)
    rank = len(vectors)
    prev = None
    for axis, vector in enumerate(vectors):
        size = vector.shape[0]
        laid = ops.reshape(
            vector, broadcast_shape(rank, axis, -1 if size is None else size)
        )
        prev = laid if prev is None else ops.minimum(prev, laid)
    return prev


def max_over_all_axes_but_each(x, blocks=1, split_fold_reductions=False):
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
            The row pass folds each row's runs of `blocks` pieces of
            `ROW_RUN_WIDTH` entries instead (`fold_runs`) where a row
            holds such a run; columns past the last whole run are folded
            as one more run that overlaps the one before.
        split_fold_reductions: with `blocks > 1`, reduce each folded
            tensor as two slices, its first row, column or run and the
            rest, and take the larger (`fold_max`'s note says why; the
            maxima are the same).

    An empty `x` (a sparse step that touches no row) reduces to 0.
    """
    shape = tuple(x.shape)
    rank = len(shape)
    if rank == 1:
        return [x]
    split = split_axes(shape)
    if None not in shape:
        matrix = ops.reshape(x, matrix_shape(shape, split))
        return _maxima_of_matrix(matrix, shape, split, blocks,
                                 split_fold_reductions)
    # The sparse path's touched rows, when their number is not static.
    leading = _max(x, axis=tuple(range(split, rank)))
    trailing = _max(x, axis=tuple(range(split)))
    return _max_over_each_axis(leading) + _max_over_each_axis(trailing)


def split_axes(shape):
    """Where to cut `shape` into leading | trailing axes for the two passes.

    The cut that leaves the two reduced tensors smallest: a (3, 3, 512, 256)
    kernel is seen as a (4608, 256) matrix, a (1, 1, 1024, 2048) one as
    (1024, 2048), never as (1, 2097152).
    """
    return min(
        range(1, len(shape)),
        key=lambda k: _size(shape[:k]) + _size(shape[k:]),
    )


def matrix_shape(shape, split):
    """`(rows, cols)`: `shape` seen as a matrix, cut at `split`."""
    return _size(shape[:split]), _size(shape[split:])


def _maxima_of_matrix(matrix, shape, split, blocks,
                      split_fold_reductions=False):
    """Per-axis maxima of a tensor of `shape`, given as its (rows, cols) view."""
    if _folds(shape, blocks):
        row_max = _row_maxima_folded(matrix, blocks, split_fold_reductions)
        col_max = _max_of_fold(fold_max(matrix, 0, blocks), 0, (0,),
                               split_fold_reductions)
    else:
        row_max = _max(matrix, axis=(1,))
        col_max = _max(matrix, axis=(0,))
    return _max_over_each_axis(
        ops.reshape(row_max, shape[:split])
    ) + _max_over_each_axis(ops.reshape(col_max, shape[split:]))


def _folds(shape, blocks):
    """Whether the maxima of a tensor of `shape` are folded (`fold_max`)."""
    return blocks > 1 and _size(shape) >= FOLD_MIN_SIZE


def _row_maxima_folded(matrix, blocks, split_fold_reductions):
    """Row maxima of a large matrix: folded along its runs where they fit."""
    rows, cols = matrix.shape
    run = blocks * ROW_RUN_WIDTH
    runs, remainder = divmod(cols, run)
    # Reduced in two (JAX), a fold of a single run is split across its
    # width, which XLA:CPU does not vectorize (twice as slow): slices then;
    # there the extra run for a remainder measured slower than slices too
    # (2048 x 1000 kernels: 15.1 ms against 13.1).
    if runs == 0 or (split_fold_reductions and (runs < 2 or remainder)):
        return _max_of_fold(fold_max(matrix, 1, blocks), 1, (1,),
                            split_fold_reductions)
    whole = matrix if not remainder else ops.slice(matrix, (0, 0),
                                                   (rows, runs * run))
    maxima = _max_of_fold(fold_runs(whole, blocks, ROW_RUN_WIDTH), 1, (1, 2),
                          split_fold_reductions)
    if remainder:
        # The columns past the last whole run: one more run, moved back to
        # end at `cols`, so it overlaps the run before it (`max` is
        # idempotent). Folding the rows by slices instead read each row in
        # `blocks` places at once: 2048 x 1000 kernels stepped 1.1-1.3x as
        # long (docs/performance.md).
        last = ops.slice(matrix, (0, cols - run), (rows, run))
        maxima = ops.maximum(
            maxima, _max(fold_runs(last, blocks, ROW_RUN_WIDTH), axis=(1, 2)))
    return maxima


def _max_of_fold(folded, split_axis, axes, split_fold_reductions):
    """`max(folded, axes)`; with `split_fold_reductions`, the larger of two
    reductions: of the first slice along `split_axis` and of the rest."""
    n = folded.shape[split_axis]
    if not split_fold_reductions or n < 2:
        return _max(folded, axis=axes)
    begin, size = [0] * len(folded.shape), list(folded.shape)
    size[split_axis] = 1
    first = ops.slice(folded, begin, size)
    begin[split_axis], size[split_axis] = 1, n - 1
    rest = ops.slice(folded, begin, size)
    return ops.maximum(_max(first, axis=axes), _max(rest, axis=axes))


# Tensors smaller than this (1 MiB of float32) are reduced directly. Below
# it, TensorFlow's XLA:CPU fused each fold into its reduction as one loop
# that it does not vectorize: 12 matrices of 256 x 256 stepped in 1.9 ms
# folded, 0.9 ms direct (Adam 0.9); at 2^18 entries the two paths tie,
# above it folding wins (docs/performance.md).
FOLD_MIN_SIZE = 1 << 18


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

    The point is that the compiler fuses the slices, their maxima and the
    expression that produces `x` into one loop that writes only the folded
    tensor. XLA:CPU as built into jaxlib (0.10) instead hands the maxima to
    the YNNPACK reduction fusion that follows, which takes its operands
    written out in full: every slice, twice `x` in all, in a temporary
    buffer that is allocated and page-faulted anew at each step. Reducing
    the folded tensor as two slices (`split_fold_reductions`) keeps the
    fold in XLA's own loop, since that fusion does not take a slice;
    TensorFlow's XLA fuses the fold without it and runs slower with it
    (docs/performance.md).
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


# The width, in entries, of the pieces `fold_runs` folds: a 64-byte cache
# line of float32.
ROW_RUN_WIDTH = 16


def fold_runs(x, blocks, width):
    """Elementwise max of the `blocks` consecutive `width`-wide pieces of each
    run of `blocks * width` entries along the rows of a 2-D `x`.

    Returns a `(rows, runs, width)` tensor with the same row maxima as `x`,
    `blocks` times smaller. `fold_max(x, 1, blocks)` folds the same amount,
    but reads each row in `blocks` places at once (slices `cols / blocks`
    apart); this fold reads the rows front to back, which XLA:CPU streams
    faster: on 24 matrices of 4096 x 1024, the row pass took 17 ms instead
    of 28, as long as the column pass (docs/performance.md). `cols` must be
    a multiple of `blocks * width`.
    """
    rows, cols = x.shape
    runs = cols // (blocks * width)
    pieces = ops.reshape(x, (rows, runs, blocks, width))
    folded = None
    for k in range(blocks):
        piece = ops.squeeze(
            ops.slice(pieces, (0, 0, k, 0), (rows, runs, 1, width)), axis=2)
        folded = piece if folded is None else ops.maximum(folded, piece)
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


def second_moment(prev, grad, beta2, rounded_products=False):
    """`nu`: the running sum (beta2 == 1) or moving average of squared gradients.

    With `rounded_products`, each product is rounded before it is added, as
    NumPy rounds it, in every compiled loop: see `_rounded`.
    """
    keep = _rounded if rounded_products else (lambda product: product)
    if beta2 == 1.0:
        return prev + keep(ops.square(grad))
    return keep(beta2 * prev) + keep((1.0 - beta2) * ops.square(grad))


def _rounded(product):
    """`product` itself (it is >= 0 or NaN), rounded before any addition.

    Otherwise a compiler may fuse the product and the addition that follows
    into one fused multiply-add, which rounds once instead of twice. XLA:CPU
    did so in some of a step's loops and not in others, so the row and the
    column passes over the same `nu` could round it differently in its last
    bit: the accumulators' maxima then disagreed (in a quarter of the steps
    on a 4 x 7 matrix) and an accumulator could shrink by one unit in the
    last place on a zero gradient. `maximum(x, 0)` keeps `x` (NaN stays NaN)
    and leaves no multiply for the addition to fuse with; `abs` would not do
    (LLVM drops `abs(g * g)` and fuses again).
    """
    return ops.maximum(product, 0.0)


def preconditioned(grad, nu, epsilon):
    """`g / sqrt(nu + epsilon)`, and 0 where `nu == 0` so that epsilon may be 0."""
    # Where nu == 0 with epsilon == 0 the division gives inf or NaN, in the
    # branch `where` does not take: one select suffices (a second one, to
    # keep that branch finite, cost XLA:CPU 4-10% of the update;
    # docs/performance.md). `g / sqrt` is the reference's form; XLA
    # rewrites it to `g * rsqrt`, as this was written before, so compiled
    # steps compute the same numbers as then. A scalar fill value, not
    # `zeros_like`: with full-size fills, compiling a TensorFlow step with
    # XLA left about 15 bytes per parameter more resident (ResNet-50;
    # docs/memory.md).
    return ops.where(nu > 0, grad / ops.sqrt(nu + epsilon), 0.0)


def dense_step(grad, accumulators, beta2, epsilon, blocks=1,
               split_fold_reductions=False):
    """One dense SM3 step on the accumulators.

    Args:
        grad: the gradient, already in the compute dtype.
        accumulators: for rank <= 1 a one-element list with the full accumulator;
            for rank >= 2 one vector per axis. Values, not variables.
        beta2: 1.0 for the running sum, < 1 for an exponential moving average.
        epsilon: added to `nu` inside the square root.
        blocks: how many slices the two reduction passes fold a large
            tensor into first (`fold_max`; exact either way, a speed choice
            per backend and device).
        split_fold_reductions: reduce each folded tensor as two slices
            (see `fold_max`; exact either way, a choice per backend).

    Returns:
        `(update, new_accumulators)` with `update` shaped like `grad`.
    """
    if len(grad.shape) <= 1:
        nu = second_moment(accumulators[0], grad, beta2)
        return preconditioned(grad, nu, epsilon), [nu]
    # The rule is elementwise but for the broadcasts: it is computed on the
    # (rows, cols) view of `grad` that the reductions use, with `prev` split
    # as min(row_prev, col_prev). min is associative, so this is the same
    # number, and compiled loops over a matrix need no index arithmetic to
    # lay each of 3 or 4 accumulators along its axis.
    shape = tuple(grad.shape)
    split = split_axes(shape)
    rows, cols = matrix_shape(shape, split)
    g = ops.reshape(grad, (rows, cols))
    row_prev = ops.reshape(min_of_accumulators(accumulators[:split]), (rows, 1))
    col_prev = ops.reshape(min_of_accumulators(accumulators[split:]), (1, cols))
    prev = ops.minimum(row_prev, col_prev)
    # The row and the column passes must round `nu` alike, or their maxima
    # may differ in the last bit (`_rounded`). A small tensor's `nu` is
    # computed once for the passes and the update; folded, each pass
    # computes it in a loop of its own, and the update keeps the form a
    # compiler may fuse (measured: docs/performance.md).
    nu = second_moment(prev, g, beta2, rounded_products=True)
    nu_of_update = (second_moment(prev, g, beta2)
                    if _folds(shape, blocks) else nu)
    return (
        ops.reshape(preconditioned(g, nu_of_update, epsilon), shape),
        _maxima_of_matrix(nu, shape, split, blocks, split_fold_reductions),
    )
