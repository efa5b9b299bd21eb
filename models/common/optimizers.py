"""The optimizer and its learning-rate schedule, from the driver's flag values.

SM3 takes the published recipe's schedule, `sm3_tf.QuadraticWarmup` (quadratic
warm-up, optional linear cool-down): its running sum already shrinks the step,
so it needs no decay. The other optimizers take Keras's `CosineDecay` with its
linear warm-up, the usual recipe for them.
"""

import keras

import sm3_tf

OPTIMIZERS = ("sm3", "adam", "adagrad", "adafactor", "sgd")


def build_schedule(optimizer_name, learning_rate, train_steps, warmup_steps,
                   cooldown_steps=0):
    """A Keras LearningRateSchedule for `optimizer_name` (or a float)."""
    if optimizer_name == "sm3":
        if warmup_steps == 0 and cooldown_steps == 0:
            return learning_rate
        return sm3_tf.QuadraticWarmup(
            learning_rate, warmup_steps=warmup_steps,
            total_steps=train_steps if cooldown_steps else None,
            cooldown_steps=cooldown_steps)
    # CosineDecay ramps linearly from initial_learning_rate to warmup_target
    # over warmup_steps, then decays to alpha * warmup_target.
    decay_steps = max(1, train_steps - warmup_steps)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=decay_steps, alpha=0.0)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=decay_steps, alpha=0.0,
        warmup_target=learning_rate, warmup_steps=warmup_steps)


def build_optimizer(name, learning_rate, train_steps, warmup_steps=0,
                    cooldown_steps=0, momentum=0.9, beta2=1.0, epsilon=1e-30,
                    sm3_cpu_kernel="auto", sm3_momentum_dtype=None,
                    weight_decay=None, clipnorm=None, mixed_float16=False):
    """Returns the Keras optimizer `name` (one of OPTIMIZERS).

    `momentum`, `beta2`, `epsilon`, `sm3_cpu_kernel` (`cpu_kernel`) and
    `sm3_momentum_dtype` (`momentum_dtype`) are SM3's arguments (momentum
    is also SGD's); the other optimizers keep Keras's defaults for theirs.
    `mixed_float16` wraps the optimizer in a `LossScaleOptimizer`, which
    float16 gradients need to stay representable.
    """
    if name not in OPTIMIZERS:
        raise ValueError(
            f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}.")
    schedule = build_schedule(name, learning_rate, train_steps, warmup_steps,
                              cooldown_steps)
    common = dict(weight_decay=weight_decay or None, clipnorm=clipnorm or None)
    if name == "sm3":
        optimizer = sm3_tf.SM3(schedule, momentum=momentum, beta2=beta2,
                               epsilon=epsilon, cpu_kernel=sm3_cpu_kernel,
                               momentum_dtype=sm3_momentum_dtype, **common)
    elif name == "adam":
        optimizer = keras.optimizers.Adam(schedule, **common)
    elif name == "adagrad":
        optimizer = keras.optimizers.Adagrad(schedule, **common)
    elif name == "adafactor":
        optimizer = keras.optimizers.Adafactor(schedule, **common)
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=momentum, **common)
    if mixed_float16:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer):
    """The learning rate the optimizer uses at its current iteration, a float."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = inner.learning_rate
    return float(keras.ops.convert_to_numpy(rate))
