"""The learning-rate schedule of the published SM3 recipes, as a Keras schedule."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="sm3_tf")
class QuadraticWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """`lr * min(1, step / warmup_steps) ** 2`, then an optional linear cool-down.

    SM3's running sum already shrinks the step, so no decay is needed; the
    published recipes warm up quadratically over about 5% of training and
    optionally cool down linearly to 0 over the last 10% (or average the
    weights with `use_ema` instead).

    Args:
        learning_rate: the peak learning rate, a float > 0.
        warmup_steps: int >= 0; 0 means no warm-up.
        total_steps: int, needed only with a cool-down: the step at which the
            rate reaches 0.
        cooldown_steps: int >= 0; the linear cool-down's length, ending at
            `total_steps`. 0 (default) keeps the peak rate after warm-up.
    """

    def __init__(self, learning_rate, warmup_steps, total_steps=None,
                 cooldown_steps=0, name="quadratic_warmup"):
        if not isinstance(learning_rate, (int, float)) or learning_rate <= 0:
            raise ValueError(
                f"QuadraticWarmup `learning_rate` must be a number > 0; "
                f"received {learning_rate!r}.")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(
                f"QuadraticWarmup `warmup_steps` must be an int >= 0; "
                f"received {warmup_steps!r}.")
        if int(cooldown_steps) != cooldown_steps or cooldown_steps < 0:
            raise ValueError(
                f"QuadraticWarmup `cooldown_steps` must be an int >= 0; "
                f"received {cooldown_steps!r}.")
        if cooldown_steps and (total_steps is None
                               or total_steps < warmup_steps + cooldown_steps):
            raise ValueError(
                "QuadraticWarmup with `cooldown_steps` needs `total_steps` >= "
                f"warmup_steps + cooldown_steps; received total_steps="
                f"{total_steps!r}, warmup_steps={warmup_steps}, "
                f"cooldown_steps={cooldown_steps}.")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.cooldown_steps = int(cooldown_steps)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rate = ops.convert_to_tensor(self.learning_rate, "float32")
        if self.warmup_steps > 0:
            rate = rate * ops.square(
                ops.minimum(1.0, step / float(self.warmup_steps)))
        if self.cooldown_steps > 0:
            start = float(self.total_steps - self.cooldown_steps)
            left = (float(self.total_steps) - step) / float(self.cooldown_steps)
            rate = rate * ops.where(step > start, ops.clip(left, 0.0, 1.0), 1.0)
        return rate

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "cooldown_steps": self.cooldown_steps,
            "name": self.name,
        }
