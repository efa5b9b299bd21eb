"""SM3: memory-efficient adaptive optimization for Keras 3 and TensorFlow.

`sm3_tf.SM3` is a `keras.optimizers.Optimizer`:

    model.compile(optimizer=sm3_tf.SM3(learning_rate=0.1), ...)
"""

from sm3_tf.optimizer import SM3

__version__ = "0.1.0"

__all__ = ["SM3", "__version__"]
