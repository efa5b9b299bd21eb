"""Test set-up shared by every test file (pytest loads it first)."""

import os

# Quiet TensorFlow's start-up chatter; tests print what matters.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

# Two logical CPU devices, so MirroredStrategy has two replicas. This must
# happen before TensorFlow initializes its devices, hence here, at collection.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # already initialized by an earlier import
    pass
