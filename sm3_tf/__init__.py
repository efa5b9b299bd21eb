"""SM3: memory-efficient adaptive optimization for Keras 3 and TensorFlow.

`sm3_tf.SM3` is a `keras.optimizers.Optimizer`:

    model.compile(optimizer=sm3_tf.SM3(learning_rate=0.1), ...)
"""

from sm3_tf import memory
from sm3_tf import schedules
from sm3_tf.optimizer import SM3
from sm3_tf.schedules import QuadraticWarmup

__version__ = "0.3.0"

__all__ = ["SM3", "QuadraticWarmup", "memory", "schedules", "__version__"]
