"""The spec's numbers, the worked example, arguments, config and state layout."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

import sm3_tf
from sm3_tf import SM3

from numpy_reference import SM3Reference


def _run(opt, variables, grads, steps):
    history = []
    for _ in range(steps):
        opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))
        history.append([v.numpy().copy() for v in variables])
    return history


def test_spec_table_two_steps():
    opt = SM3(learning_rate=0.1, momentum=0.9, epsilon=0.0)
    scalar = keras.Variable(0.5)
    vector = keras.Variable([0.5, 0.3])
    matrix = keras.Variable([[0.5, 0.5], [0.5, 0.5]])
    grads = [np.float32(0.1), np.float32([0.1, 0.1]),
             np.float32([[0.1, 0.05], [0.03, 0.02]])]
    (s1, v1, m1), (s2, v2, m2) = _run(opt, [scalar, vector, matrix], grads, 2)
    # After step 1.
    np.testing.assert_allclose(s1, 0.49, rtol=1e-6)
    np.testing.assert_allclose(v1, [0.49, 0.29], rtol=1e-6)
    np.testing.assert_allclose(m1, np.full((2, 2), 0.49), rtol=1e-6)
    # After step 2.
    np.testing.assert_allclose(s2, 0.4739289322, rtol=1e-6)
    np.testing.assert_allclose(opt.momentum_for(scalar).numpy(), 0.1607106781,
                               rtol=1e-6)
    np.testing.assert_allclose(v2, [0.4739289322, 0.2739289322], rtol=1e-6)
    np.testing.assert_allclose(
        m2, [[0.4739289322, 0.4739289322], [0.4739289322, 0.4754529980]],
        rtol=1e-6)
    acc0, acc1 = opt.accumulators_for(matrix)
    np.testing.assert_allclose(acc0.numpy(), [0.02, 0.0018], rtol=1e-6)
    np.testing.assert_allclose(acc1.numpy(), [0.02, 0.005], rtol=1e-6)


def test_spec_table_matrix_accumulators_after_one_step():
    opt = SM3(learning_rate=0.1, momentum=0.9, epsilon=0.0)
    matrix = keras.Variable([[0.5, 0.5], [0.5, 0.5]])
    _run(opt, [matrix], [np.float32([[0.1, 0.05], [0.03, 0.02]])], 1)
    acc0, acc1 = opt.accumulators_for(matrix)
    np.testing.assert_allclose(acc0.numpy(), [0.01, 0.0009], rtol=1e-6)
    np.testing.assert_allclose(acc1.numpy(), [0.01, 0.0025], rtol=1e-6)


def test_worked_example():
    opt = SM3(learning_rate=1.0, momentum=0.0, epsilon=0.0)
    var = keras.Variable(np.zeros((2, 2), np.float32))
    _run(opt, [var], [np.float32([[1, 2], [3, 4]])], 1)
    np.testing.assert_allclose(var.numpy(), -np.ones((2, 2)), rtol=1e-7)
    acc0, acc1 = opt.accumulators_for(var)
    np.testing.assert_array_equal(acc0.numpy(), [4, 16])
    np.testing.assert_array_equal(acc1.numpy(), [9, 16])
    _run(opt, [var], [np.float32([[1, 0], [0, 1]])], 1)
    u = np.float32([[1 / np.sqrt(5), 0], [0, 1 / np.sqrt(17)]])
    np.testing.assert_allclose(var.numpy(), -1 - u, rtol=1e-6)
    acc0, acc1 = opt.accumulators_for(var)  # values: read them again
    np.testing.assert_array_equal(acc0.numpy(), [5, 17])
    np.testing.assert_array_equal(acc1.numpy(), [9, 17])
    assert opt.momentum_for(var) is None


def test_sm3_differs_from_adagrad_where_the_spec_says():
    # Entry [1, 1]: nu = min(0.0009, 0.0025) + 0.0004, not 0.0004 + 0.0004.
    g = np.float32([[0.1, 0.05], [0.03, 0.02]])
    sm3 = SM3(learning_rate=0.1, momentum=0.0, epsilon=0.0)
    ada = keras.optimizers.Adagrad(learning_rate=0.1,
                                   initial_accumulator_value=0.0, epsilon=0.0)
    a = keras.Variable(np.zeros((2, 2), np.float32))
    b = keras.Variable(np.zeros((2, 2), np.float32))
    _run(sm3, [a], [g], 2)
    _run(ada, [b], [g], 2)
    diff = np.abs(a.numpy() - b.numpy())
    assert diff[1, 1] > 1e-3
    np.testing.assert_allclose(diff[0, 0], 0.0, atol=1e-7)
    nu = 0.0009 + 0.0004
    np.testing.assert_allclose(a.numpy()[1, 1],
                               -0.1 - 0.1 * 0.02 / np.sqrt(nu), rtol=1e-5)


def test_zero_gradient_with_zero_statistics_gives_zero_update_and_no_nan():
    opt = SM3(learning_rate=0.1, momentum=0.5, epsilon=0.0)
    var = keras.Variable(np.ones((3, 2), np.float32))
    _run(opt, [var], [np.zeros((3, 2), np.float32)], 2)
    np.testing.assert_array_equal(var.numpy(), np.ones((3, 2)))


def test_zero_size_variable_is_left_alone():
    opt = SM3()
    empty = keras.Variable(np.zeros((0, 3), np.float32))
    other = keras.Variable(np.ones((2,), np.float32))
    _run(opt, [empty, other], [np.zeros((0, 3), np.float32),
                               np.ones((2,), np.float32)], 2)
    assert empty.shape == (0, 3)
    assert opt.accumulators_for(empty) == ()
    assert opt.momentum_for(empty) is None
    assert np.all(other.numpy() < 1)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"beta2": 0.0}, "beta2"),
        ({"beta2": 1.5}, "beta2"),
        ({"epsilon": -1e-8}, "epsilon"),
        ({"momentum": "0.9"}, "momentum"),
        ({"cpu_kernel": "yes"}, "cpu_kernel"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": float("inf")}, "learning_rate"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"momentum": float("nan")}, "momentum"),
        ({"momentum_dtype": "float16"}, "momentum_dtype"),
        ({"momentum_dtype": "int8"}, "momentum_dtype"),
    ],
)
def test_bad_arguments_name_the_argument_and_range(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as err:
        SM3(**kwargs)
    assert "[" in str(err.value) or "(" in str(err.value)


def test_boundary_arguments_are_accepted():
    SM3(learning_rate=0.0, momentum=0.0, beta2=1.0, epsilon=0.0)
    SM3(momentum=0.999, beta2=1e-3)
    SM3(learning_rate=np.float32(0.5), momentum_dtype="bfloat16")


def test_variable_of_unknown_shape_gets_a_clear_error():
    var = tf.Variable(np.zeros((2, 3), np.float32),
                      shape=tf.TensorShape(None), name="mystery")
    opt = SM3()
    with pytest.raises(ValueError, match="mystery.*fully known shape|fully "
                       "known shape.*mystery"):
        opt.build([var])


def test_config_round_trip_keeps_every_argument():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, 100, 0.5)
    opt = SM3(learning_rate=schedule, momentum=0.5, beta2=0.99, epsilon=1e-8,
              weight_decay=0.01, clipnorm=1.0, use_ema=True,
              ema_momentum=0.9, ema_overwrite_frequency=3,
              loss_scale_factor=2.0, gradient_accumulation_steps=2,
              momentum_dtype="bfloat16", cpu_kernel=True, name="my_sm3")
    config = opt.get_config()
    serialized = json.dumps(keras.optimizers.serialize(opt))
    assert json.loads(serialized)["registered_name"] == "sm3_tf>SM3"
    again = SM3.from_config(opt.get_config())
    restored = keras.optimizers.deserialize(json.loads(serialized))
    assert isinstance(restored, SM3)
    for copy in (again, restored):
        copied = copy.get_config()
        copied.pop("learning_rate")
        assert isinstance(copy._learning_rate,
                          keras.optimizers.schedules.ExponentialDecay)
        assert copy._learning_rate.get_config() == schedule.get_config()
        assert copied == {k: v for k, v in config.items()
                          if k != "learning_rate"}
    for key in ("momentum", "beta2", "epsilon", "weight_decay", "clipnorm",
                "use_ema", "ema_momentum", "ema_overwrite_frequency",
                "loss_scale_factor", "gradient_accumulation_steps",
                "momentum_dtype", "cpu_kernel", "name"):
        assert config[key] == getattr(opt, key), key
        assert getattr(restored, key) == getattr(opt, key), key
    assert (restored.momentum, restored.beta2, restored.epsilon) == (
        0.5, 0.99, 1e-8)


def test_defaults_are_the_spec_defaults():
    config = SM3().get_config()
    assert config["learning_rate"] == pytest.approx(0.1)
    assert config["momentum"] == 0.9
    assert config["beta2"] == 1.0
    assert config["epsilon"] == 1e-30
    assert config["cpu_kernel"] == "auto"
    assert config["momentum_dtype"] is None
    assert config["name"] == "sm3"


def test_state_is_one_slot_per_dimension_named_after_its_variable():
    # The design's layout: per model variable, in order, one accumulator
    # per axis (rank >= 2) or one of its shape (rank <= 1), then momentum.
    layer = keras.layers.Dense(3, name="dense")
    layer.build((None, 4))
    conv = keras.Variable(np.zeros((4, 3, 2), np.float32), name="conv")
    scale = keras.Variable(np.float32(0.0), name="scale")
    variables = [layer.kernel, layer.bias, conv, scale]
    opt = SM3(momentum=0.9)
    opt.build(variables)
    got = [(v.name, tuple(v.shape)) for v in opt.variables]
    assert got == [
        ("iteration", ()), ("learning_rate", ()),
        ("dense_kernel_accumulator_0", (4,)),
        ("dense_kernel_accumulator_1", (3,)),
        ("dense_kernel_momentum", (4, 3)),
        ("dense_bias_accumulator", (3,)),
        ("dense_bias_momentum", (3,)),
        ("conv_accumulator_0", (4,)), ("conv_accumulator_1", (3,)),
        ("conv_accumulator_2", (2,)), ("conv_momentum", (4, 3, 2)),
        ("scale_accumulator", ()), ("scale_momentum", ()),
    ]
    assert opt.accumulators_for(conv) == tuple(opt.variables[7:10])
    assert opt.momentum_for(conv) is opt.variables[10]
    # Nothing is shared between model variables.
    owned = [id(v) for var in variables for v in (
        *opt.accumulators_for(var), opt.momentum_for(var))]
    assert len(owned) == len(set(owned)) == len(opt.variables) - 2
    no_momentum = SM3(momentum=0.0)
    no_momentum.build(variables)
    assert not any("momentum" in v.name for v in no_momentum.variables)
    assert all(no_momentum.momentum_for(v) is None for v in variables)


@pytest.mark.parametrize("momentum_dtype, stored", [
    (None, "float32"), ("float32", "float32"), ("bfloat16", "bfloat16")])
def test_momentum_dtype_stores_the_momentum_in_it(momentum_dtype, stored):
    var = keras.Variable(np.ones((3, 2), np.float32))
    opt = SM3(momentum_dtype=momentum_dtype)
    opt.build([var])
    assert opt.momentum_for(var).dtype == stored
    assert all(a.dtype == "float32" for a in opt.accumulators_for(var))


def test_sm3_state_is_tiny_next_to_the_variable():
    var = keras.Variable(np.zeros((512, 256), np.float32))
    opt = SM3(momentum=0.0)
    opt.build([var])
    state = sum(int(np.prod(a.shape)) for a in opt.accumulators_for(var))
    assert state == 512 + 256


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_keeps_float32_statistics_and_no_nan(dtype):
    # 1e-4 squared underflows float16 and epsilon 1e-30 is 0 in float16:
    # computed in float16 the update would be 0 or NaN.
    var = keras.Variable(np.ones((3, 2), np.float32), dtype=dtype)
    opt = SM3(learning_rate=0.01, momentum=0.9)
    grad = tf.cast(tf.fill((3, 2), 1e-4), dtype)
    for _ in range(3):
        opt.apply_gradients([(grad, var)])
    assert all(a.dtype == "float32" for a in opt.accumulators_for(var))
    assert opt.momentum_for(var).dtype == dtype
    values = np.asarray(tf.cast(var.value, tf.float32))
    assert np.all(np.isfinite(values))
    ref = SM3Reference(np.ones((3, 2), np.float32), 0.01, 0.9)
    for _ in range(3):
        ref.step(np.full((3, 2), 1e-4, np.float32))
    np.testing.assert_allclose(values, ref.var, rtol=1e-2)
    assert np.all(values < 1.0)


def test_float64_computes_in_float64():
    var = keras.Variable(np.full((2, 3), 0.5), dtype="float64")
    opt = SM3(learning_rate=0.1, momentum=0.9, epsilon=0.0)
    # Keras keeps the learning rate in a float32 variable: use that value.
    ref = SM3Reference(np.full((2, 3), 0.5), float(np.float32(0.1)), 0.9,
                       epsilon=0.0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        g = rng.normal(size=(2, 3))
        opt.apply_gradients([(tf.constant(g), var)])
        ref.step(g)
    assert all(a.dtype == "float64" for a in opt.accumulators_for(var))
    np.testing.assert_allclose(var.numpy(), ref.var, rtol=1e-14)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_bfloat16_momentum_of_a_float64_variable_rounds_through_float32(
        jit_compile):
    # m = 1 - momentum = 0.5 + 2^-9 + 2^-31: rounded to float32 it is the tie
    # 0.5 + 2^-9, which bfloat16 rounds to even, 0.5; rounded once,
    # directly, it would be 0.5 + 2^-8. TensorFlow and XLA round through
    # float32, and so does the spec (docs/spec.md).
    momentum = 0.5 - 2**-9 - 2**-31
    var = keras.Variable(np.full((2, 2), 2.0), dtype="float64")
    opt = SM3(learning_rate=1.0, momentum=momentum, epsilon=0.0,
              momentum_dtype="bfloat16")
    opt.build([var])
    step = tf.function(lambda g: opt.apply_gradients([(g, var)]),
                       jit_compile=jit_compile)
    step(tf.ones((2, 2), tf.float64))  # u = 1, so m = 1 - momentum
    np.testing.assert_array_equal(var.numpy(), np.full((2, 2), 1.5))
    ref = SM3Reference(np.full((2, 2), 2.0), 1.0, momentum, epsilon=0.0,
                       momentum_dtype="bfloat16")
    ref.step(np.ones((2, 2)))
    np.testing.assert_array_equal(ref.var, var.numpy())


def test_package_exports():
    assert sm3_tf.SM3 is SM3
    assert sm3_tf.QuadraticWarmup is sm3_tf.schedules.QuadraticWarmup


def test_quadratic_warmup_schedule_and_cooldown():
    schedule = sm3_tf.QuadraticWarmup(0.4, warmup_steps=10, total_steps=100,
                                      cooldown_steps=20)
    got = [float(schedule(s)) for s in (0, 5, 10, 50, 80, 90, 100)]
    np.testing.assert_allclose(got, [0.0, 0.1, 0.4, 0.4, 0.4, 0.2, 0.0],
                               rtol=1e-6, atol=1e-7)
    again = sm3_tf.QuadraticWarmup.from_config(schedule.get_config())
    assert again.get_config() == schedule.get_config()
    plain = sm3_tf.QuadraticWarmup(0.4, warmup_steps=0)
    assert float(plain(0)) == pytest.approx(0.4)
    opt = SM3(learning_rate=schedule)
    restored = keras.optimizers.deserialize(
        json.loads(json.dumps(keras.optimizers.serialize(opt))))
    assert isinstance(restored._learning_rate, sm3_tf.QuadraticWarmup)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(learning_rate=-1.0, warmup_steps=1), "learning_rate"),
    (dict(learning_rate=0.1, warmup_steps=-1), "warmup_steps"),
    (dict(learning_rate=0.1, warmup_steps=5, cooldown_steps=10), "total_steps"),
])
def test_quadratic_warmup_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        sm3_tf.QuadraticWarmup(**kwargs)
