"""Sparse gradients (tf.IndexedSlices) give the parameters of the dense rule."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from sm3_tf import SM3
from sm3_tf.kernels import native
from sm3_tf.kernels import sparse

from numpy_reference import SM3Reference, dense_from_slices


def _pair(shape, momentum, beta2=1.0, seed=0, **kwargs):
    init = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    make = lambda: (SM3(learning_rate=0.5, momentum=momentum, beta2=beta2,  # noqa: E731
                        epsilon=0.0, **kwargs),
                    keras.Variable(init))
    return make(), make(), init


def _stepper(opt, var, densify, mode):
    """Applies `IndexedSlices(values, indices)` (or its dense form) to `var`."""
    dense_shape = tf.constant(var.shape, tf.int64)

    def apply(indices, values):
        g = tf.IndexedSlices(values, indices, dense_shape)
        if densify:
            g = tf.convert_to_tensor(g)
        opt.apply_gradients([(g, var)])

    return tf.function(apply, jit_compile=True) if mode == "xla" else apply


def _check_steps(shape, steps, momentum, mode, beta2=1.0, **kwargs):
    """`steps`: list of (indices, values) pairs. Sparse, dense, NumPy agree.
    `kwargs` go to SM3 (`cpu_kernel`, `momentum_dtype`)."""
    (s_opt, s_var), (d_opt, d_var), init = _pair(shape, momentum, beta2,
                                                 **kwargs)
    ref = SM3Reference(init, 0.5, momentum, beta2, 0.0,
                       kwargs.get("momentum_dtype"))
    sparse_apply = _stepper(s_opt, s_var, False, mode)
    dense_apply = _stepper(d_opt, d_var, True, mode)
    for indices, values in steps:
        indices = tf.constant(indices, tf.int32)
        values = tf.constant(values, tf.float32)
        sparse_apply(indices, values)
        dense_apply(indices, values)
        ref.step(dense_from_slices(indices.numpy(), values.numpy(), shape[0]))
        np.testing.assert_allclose(s_var.numpy(), d_var.numpy(),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(s_var.numpy(), ref.var, rtol=1e-5,
                                   atol=1e-6)
        for a, b in zip(s_opt.accumulators_for(s_var),
                        d_opt.accumulators_for(d_var)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    return s_var.numpy(), init


MODES = ["eager", "xla"]


# The CPU kernel takes the sparse step without momentum where it can run;
# `cpu_kernel=False` keeps TensorFlow's ops (tests/sm3_native_test.py holds
# the kernel's to the bit).
PATHS = [False, "auto"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("cpu_kernel", PATHS)
def test_keras_scenario_5x3x2_indices_0_2_4_five_steps(mode, momentum,
                                                       cpu_kernel):
    rng = np.random.default_rng(1)
    steps = [([0, 2, 4], rng.normal(size=(3, 3, 2))) for _ in range(5)]
    _check_steps((5, 3, 2), steps, momentum, mode, cpu_kernel=cpu_kernel)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_momentum_sparse_equals_dense(mode):
    rng = np.random.default_rng(8)
    steps = [([0, 2, 2], rng.normal(size=(3, 3, 2))) for _ in range(4)]
    _check_steps((5, 3, 2), steps, 0.9, mode, momentum_dtype="bfloat16")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("cpu_kernel", PATHS)
def test_duplicate_indices_are_summed_before_squaring(mode, momentum,
                                                      cpu_kernel):
    rng = np.random.default_rng(2)
    steps = [([3, 1, 3, 3, 0], rng.normal(size=(5, 4))),
             ([1, 1], rng.normal(size=(2, 4))),
             ([5, 0, 5], rng.normal(size=(3, 4)))]
    _check_steps((6, 4), steps, momentum, mode, cpu_kernel=cpu_kernel)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_empty_slice_and_slices_that_sum_to_zero(mode, momentum):
    rng = np.random.default_rng(3)
    g = rng.normal(size=(1, 3)).astype(np.float32)
    steps = [([0, 2], rng.normal(size=(2, 3))),
             (np.zeros([0], np.int32), np.zeros((0, 3))),   # empty slice
             ([1, 1, 2], np.concatenate([g, -g, g])),      # row 1 sums to 0
             ([2], rng.normal(size=(1, 3)))]
    _check_steps((4, 3), steps, momentum, mode)


@pytest.mark.parametrize("mode", MODES)
def test_rank_one_variable_gathered_by_index(mode):
    rng = np.random.default_rng(4)
    steps = [([0, 3, 3], rng.normal(size=(3,))), ([1], rng.normal(size=(1,)))]
    _check_steps((5,), steps, 0.9, mode)
    _check_steps((5,), steps, 0.0, mode)


@pytest.mark.parametrize("mode", MODES)
def test_beta2_below_one_densifies_and_matches(mode):
    rng = np.random.default_rng(5)
    steps = [([0, 2, 2], rng.normal(size=(3, 3))) for _ in range(3)]
    _check_steps((4, 3), steps, 0.9, mode, beta2=0.9)


def test_momentum_zero_moves_only_touched_rows():
    rng = np.random.default_rng(6)
    steps = [([1, 3], rng.normal(size=(2, 2, 3))) for _ in range(3)]
    final, init = _check_steps((6, 2, 3), steps, 0.0, "eager")
    untouched = [0, 2, 4, 5]
    np.testing.assert_array_equal(final[untouched], init[untouched])
    assert np.all(final[[1, 3]] != init[[1, 3]])


def test_momentum_zero_step_never_writes_the_whole_variable():
    # The step's graph updates the variable only through a scatter.
    opt = SM3(momentum=0.0)
    var = keras.Variable(np.ones((1000, 8), np.float32))
    opt.build([var])

    @tf.function
    def step(indices, values):
        opt.apply_gradients([(tf.IndexedSlices(values, indices,
                                               tf.constant([1000, 8])), var)])

    graph = step.get_concrete_function(
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None, 8], tf.float32)).graph
    op_types = set()
    for op in graph.get_operations():
        op_types.add(op.type)
        for fn in graph._functions.values():
            op_types.update(o.type for o in fn.graph.get_operations())
    assert "ResourceScatterSub" in op_types
    assert "AssignSubVariableOp" not in op_types
    # Uncompiled, the step works on the distinct rows (`sparse.distinct_rows`).
    assert "Unique" in op_types


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(1, 4), max_size=2),
       st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.9]),
       st.sampled_from(MODES), st.sampled_from(PATHS))
def test_sparse_equals_dense_on_random_problems(rows, tail, seed, momentum,
                                                mode, cpu_kernel):
    rng = np.random.default_rng(seed)
    shape = (rows,) + tuple(tail)
    steps = []
    for _ in range(3):
        n = int(rng.integers(0, 2 * rows + 1))
        steps.append((rng.integers(0, rows, size=n),
                      rng.normal(size=(n,) + tuple(tail))))
    _check_steps(shape, steps, momentum, mode, cpu_kernel=cpu_kernel)


def test_sum_repeated_rows_static_shape():
    summed, first = sparse.sum_repeated_rows(
        tf.constant([2, 0, 2, 1, 2]),
        tf.constant([[1.0], [2.0], [3.0], [4.0], [5.0]]))
    np.testing.assert_array_equal(summed.numpy().ravel(), [9, 2, 9, 4, 9])
    np.testing.assert_array_equal(first.numpy(), [1, 1, 0, 1, 0])


def test_distinct_rows_sums_each_index_once():
    rows, sums = sparse.distinct_rows(
        tf.constant([2, 0, 2, 1, 2]),
        tf.constant([[1.0], [2.0], [3.0], [4.0], [5.0]]))
    np.testing.assert_array_equal(rows.numpy(), [2, 0, 1])
    np.testing.assert_array_equal(sums.numpy().ravel(), [9, 2, 4])


def test_embedding_model_fit_sparse_matches_dense_gradient():
    # An Embedding produces IndexedSlices; SM3 on it equals SM3 on the dense
    # gradient of the same model.
    def train(densify):
        keras.utils.set_random_seed(0)
        emb = keras.layers.Embedding(50, 4)
        dense = keras.layers.Dense(1)
        model = keras.Sequential([keras.Input((3,), dtype="int32"), emb,
                                  keras.layers.Flatten(), dense])
        opt = SM3(learning_rate=0.1, momentum=0.9)
        x = tf.constant(np.random.default_rng(0).integers(0, 10, (16, 3)))
        y = tf.ones((16, 1))
        for _ in range(4):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x) - y) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            assert isinstance(grads[0], tf.IndexedSlices)
            if densify:
                grads = [tf.convert_to_tensor(g) for g in grads]
            opt.apply_gradients(zip(grads, model.trainable_variables))
        return [v.numpy() for v in model.trainable_variables]

    for a, b in zip(train(False), train(True)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode, error", [
    ("eager", ValueError), ("function", tf.errors.InvalidArgumentError),
    ("xla", None)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("cpu_kernel", PATHS)
def test_rows_outside_the_variable_are_refused_before_anything_is_written(
        mode, error, momentum, cpu_kernel):
    # Eagerly a ValueError, in a tf.function TensorFlow's error, both naming
    # the variable, and nothing written, Keras's iteration count included.
    # An XLA program cannot raise: the step leaves the variable and its
    # state as they were (Keras still counts the iteration), or the CPU
    # kernel's call raises TensorFlow's error there.
    opt = SM3(learning_rate=0.5, momentum=momentum, cpu_kernel=cpu_kernel)
    var = keras.Variable(np.ones((5, 4), np.float32), name="table")
    opt.build([var])
    _stepper(opt, var, False, "eager")(tf.constant([0, 1]), tf.ones((2, 4)))
    state = [v.numpy().copy() for v in [var, *opt.variables]]

    def step(indices, values):
        opt.apply_gradients([(tf.IndexedSlices(values, indices,
                                               tf.constant([5, 4])), var)])

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    kernel = (cpu_kernel and momentum == 0 and mode == "xla"
              and native.build("tensorflow") is None)
    raised = error or (tf.errors.InvalidArgumentError if kernel else None)
    args = (tf.constant([1, 5]), tf.ones((2, 4)))
    if raised is None:
        step(*args)
    else:
        with pytest.raises(raised, match="table|outside the variable"):
            step(*args)
    written = [var, *opt.variables]
    if raised is None:  # XLA: the step's own state, not Keras's count
        state, written = state[:1] + state[3:], written[:1] + written[3:]
    for before, after in zip(state, written, strict=True):
        np.testing.assert_array_equal(after.numpy(), before)
