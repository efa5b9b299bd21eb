"""The portable step: SM3's rule as `keras.ops`, on any backend and device."""

from keras import ops

from sm3_tf import rule
from sm3_tf.kernels import gate
from sm3_tf.kernels import token


def dense_update(settings, gradient, variable, slots, learning_rate,
                 after=None):
    """One dense step of `variable` and its `slots` (`sm3_tf.kernels.Slots`).

    The statistics are computed in the accumulators' dtype (float32 for a
    half-precision variable). A matrix's step holds `nu`, a temporary of its
    size: it waits for `after` (the step's previous such update) and
    returns its own token. A vector's is small and takes no part in that
    order (returns None): ordered too, its tiny steps kept an MLP's whole
    training step from freeing each gradient early (XLA:CPU held 5 more
    weights' worth at once).
    """
    accumulators = [ops.convert_to_tensor(a) for a in slots.accumulators]
    matrix = len(accumulators) > 1 or len(variable.shape) > 1
    if matrix:
        accumulators[0] = gate(accumulators[0], after)
    compute_dtype = accumulators[0].dtype
    update, new_accumulators = rule.dense_step(
        ops.cast(gradient, compute_dtype), accumulators, settings.beta2,
        settings.epsilon)
    for slot, value in zip(slots.accumulators, new_accumulators):
        slot.assign(value)
    written = apply_update(settings, variable, slots.momentum, update,
                           learning_rate)
    return token(new_accumulators + written) if matrix else None


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
        written.append(ops.cast(rule.velocity(
            ops.cast(momentum, compute_dtype), update, settings.momentum),
            momentum.dtype))
        momentum.assign(written[-1])
        step = ops.cast(written[-1], compute_dtype)
    rate = ops.cast(learning_rate, compute_dtype)
    value = ops.convert_to_tensor(variable)
    written.append(value - ops.cast(rate * step, value.dtype))
    variable.assign(written[-1])
    return written
