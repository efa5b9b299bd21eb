"""Throwaway Bazel smoke test: one SM3 step on a 2x3 variable."""

import os
import sys

import numpy as np


def test_one_sm3_step():
    import keras
    import sm3_tf

    print("python:", sys.executable, "sm3_tf from:", sm3_tf.__file__)
    assert "runfiles" in sm3_tf.__file__ or os.environ.get("SMOKE_ALLOW_SRC")
    var = keras.Variable(np.ones((2, 3), dtype="float32"))
    grad = np.full((2, 3), 0.5, dtype="float32")
    opt = sm3_tf.SM3(learning_rate=0.1)
    opt.apply_gradients([(keras.ops.convert_to_tensor(grad), var)])
    value = keras.ops.convert_to_numpy(var)
    assert value.shape == (2, 3)
    assert np.all(value < 1.0), value
    if os.environ.get("SMOKE_FAIL"):
        assert False, "SMOKE_FAIL set: deliberate failure"
