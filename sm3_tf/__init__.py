"""SM3: memory-efficient adaptive optimization for Keras 3.

`sm3_tf.SM3` is a `keras.optimizers.Optimizer`, on any Keras backend:

    model.compile(optimizer=sm3_tf.SM3(learning_rate=0.1), ...)
"""

try:
    import keras  # noqa: F401
except ModuleNotFoundError as error:
    if error.name != "tensorflow":
        raise
    raise ImportError(
        "sm3_tf needs a Keras backend, and Keras's default backend is "
        "TensorFlow, which is not installed. Install it (pip install "
        "'sm3_tf[tensorflow]', or 'sm3_tf[tensorflow-cpu]' for the CPU-only "
        "build), or use another backend: KERAS_BACKEND=jax (pip install "
        "'sm3_tf[jax]') or KERAS_BACKEND=torch.") from error

from sm3_tf import memory  # noqa: E402
from sm3_tf import schedules  # noqa: E402
from sm3_tf.optimizer import SM3  # noqa: E402
from sm3_tf.schedules import QuadraticWarmup  # noqa: E402

__version__ = "1.0.0"

__all__ = ["SM3", "QuadraticWarmup", "memory", "schedules", "__version__"]
