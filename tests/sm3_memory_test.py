"""sm3_tf.memory: counts from shapes equal what built optimizers hold."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from sm3_tf import SM3
from sm3_tf import memory

BUILT = {
    "sm3": lambda: SM3(momentum=0.9),
    "sm3_no_momentum": lambda: SM3(momentum=0.0),
    "adam": lambda: keras.optimizers.Adam(),
    "adagrad": lambda: keras.optimizers.Adagrad(),
    "sgd_momentum": lambda: keras.optimizers.SGD(momentum=0.9),
    "sgd": lambda: keras.optimizers.SGD(),
    "adafactor_keras": lambda: keras.optimizers.Adafactor(),
}


def _model():
    return keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(30, 8),
        keras.layers.Conv1D(4, 3),
        keras.layers.LayerNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
    ])


@pytest.mark.parametrize("name", sorted(BUILT))
def test_counts_from_shapes_equal_built_optimizer(name):
    model = _model()
    optimizer = BUILT[name]()
    optimizer.build(model.trainable_variables)
    report = memory.state_report(model.trainable_variables, [name])
    assert (report["optimizers"][name]["state_bytes"]
            == memory.optimizer_state_bytes(optimizer))


def test_kinds_and_sm3_savings():
    model = _model()
    report = memory.state_report(model.trainable_variables)
    kinds = report["parameters"]["by_kind"]
    assert kinds["embedding"] == 30 * 8 * 4
    assert kinds["conv_kernel"] == 3 * 8 * 4 * 4
    assert kinds["dense_kernel"] == 16 * 5 * 4
    assert kinds["vector"] == (4 + 4 + 4 + 5) * 4
    sm3 = report["optimizers"]["sm3_no_momentum"]
    assert sm3["state_by_kind"]["embedding"] == (30 + 8) * 4
    assert sm3["state_by_kind"]["vector"] == kinds["vector"]
    params = report["parameters"]["bytes"]
    adam = report["optimizers"]["adam"]["state_bytes"]
    assert adam == 2 * params
    assert report["optimizers"]["sm3"]["state_bytes"] == params + sm3[
        "state_bytes"]
    assert report["optimizers"]["adafactor_keras"]["state_bytes"] > params


def test_half_precision_variables_keep_float32_statistics():
    var = ("w", (64, 32), "bfloat16")
    report = memory.state_report([var], ["sm3", "adam"])
    assert report["optimizers"]["sm3"]["state_bytes"] == (64 + 32) * 4 + (
        64 * 32 * 2)
    built = SM3()
    built.build([keras.Variable(np.zeros((64, 32)), dtype="bfloat16")])
    assert memory.optimizer_state_bytes(built) == report["optimizers"]["sm3"][
        "state_bytes"]


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="rmsprop"):
        memory.state_report([("w", (2, 2), "float32")], ["rmsprop"])
