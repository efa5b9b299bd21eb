"""The portable step: SM3's rule as `keras.ops`, on any backend and device."""

import keras
from keras import ops

from sm3_tf import rule
from sm3_tf.kernels import gate
from sm3_tf.kernels import token


def dense_update(settings, gradient, variable, slots, learning_rate,
                 after=None):
    """One dense step of `variable` and its `slots` (`sm3_tf.kernels.Slots`),
    for a gradient the program was given (an `apply_gradients` step on its
    own, or eagerly): `u` from the one `nu` the statistics write out.

    The statistics are computed in the accumulators' dtype (float32 for a
    half-precision variable). A matrix's step holds `nu`, a temporary of
    its size: it waits for `after` (the step's previous such update) and
    returns its own token. A vector's is small and takes no part in that
    order (returns None): ordered too, its tiny steps kept an MLP's whole
    training step from freeing each gradient early (XLA:CPU held 5 more
    weights' worth at once).
    """
    matrix = _is_matrix(variable)
    accumulators, grad = _read(gradient, slots)
    if matrix:
        accumulators[0] = gate(accumulators[0], after)
    update, new_accumulators = rule.dense_step(
        grad, accumulators, settings.beta2, settings.epsilon)
    for slot, value in zip(slots.accumulators, new_accumulators):
        slot.assign(value)
    written = apply_update(settings, variable, slots.momentum, update,
                           learning_rate)
    return token(new_accumulators + written) if matrix else None


def dense_update_in_step(settings, gradient, variable, slots, learning_rate,
                         after=None):
    """`dense_update` for a gradient the program computed (a whole training
    step): a matrix's update computes `nu` again inside its own pass.

    An update that reads the written-out `nu` runs two passes after its
    gradient where SGD's runs one, and XLA:CPU's default scheduler, which
    runs a program level by level, computes the next gradient first, into
    a buffer of its own (one to two weights' worth more than SGD's whole
    step; docs/memory.md). Each half waits for `after` through a different
    accumulator, so that XLA cannot merge them back into one `nu`; the new
    accumulators are written once the update has read the old ones, else
    XLA copies each of them first. (Given its gradient, the update gains
    nothing from this and runs up to 13% slower: `dense_update`.)
    """
    if not _is_matrix(variable):
        return dense_update(settings, gradient, variable, slots,
                            learning_rate, after)
    accumulators, grad = _read(gradient, slots)
    update = rule.matrix_update(
        grad, accumulators[:-1] + [gate(accumulators[-1], after)],
        settings.beta2, settings.epsilon)
    new_accumulators = rule.matrix_statistics(
        grad, [gate(accumulators[0], after)] + accumulators[1:],
        settings.beta2)
    written = apply_update(settings, variable, slots.momentum, update,
                           learning_rate)
    read = token(written)
    for slot, value in zip(slots.accumulators, new_accumulators):
        slot.assign(gate(value, read))
    return token(new_accumulators + written)


def _is_matrix(variable):
    """Whether `variable` keeps one accumulator per axis (rank >= 2)."""
    return len(variable.shape) > 1


def _read(gradient, slots):
    """The accumulators' values, and the gradient in their dtype."""
    accumulators = [ops.convert_to_tensor(a) for a in slots.accumulators]
    return accumulators, ops.cast(gradient, accumulators[0].dtype)


def apply_update(settings, variable, momentum, update, learning_rate):
    """`m = velocity(m, u)` (if any), then `var -= learning_rate * m`.

    Arithmetic in `update`'s dtype; `m` and the variable are stored in
    their own, and the variable steps by `m` as stored (a bfloat16 `m`
    rounded: so the step reads the new `m`, and XLA need not keep the old
    one beside it). Returns the values written.
    """
    compute_dtype = update.dtype
    step = update
    written = []
    if momentum is not None:
        written.append(_stored(rule.velocity(
            ops.cast(momentum, compute_dtype), update, settings.momentum),
            momentum.dtype))
        momentum.assign(written[-1])
        step = ops.cast(written[-1], compute_dtype)
    rate = ops.cast(learning_rate, compute_dtype)
    value = ops.convert_to_tensor(variable)
    written.append(value - ops.cast(rate * step, value.dtype))
    variable.assign(written[-1])
    return written


def _stored(value, dtype):
    """`value` cast to `dtype`; a float64 value rounded to float32 first
    where `dtype` has 16 bits, as TensorFlow's and XLA's casts do
    (docs/spec.md), so that every backend stores the same bits."""
    if (keras.backend.standardize_dtype(value.dtype) == "float64"
            and keras.backend.standardize_dtype(dtype) in ("bfloat16",
                                                           "float16")):
        value = ops.cast(value, "float32")
    return ops.cast(value, dtype)
