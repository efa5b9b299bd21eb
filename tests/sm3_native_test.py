"""The CPU kernel (`sm3_tf.kernels.native`) against the NumPy reference.

The kernel rounds as NumPy does (no fused multiply-adds), so its results are
the reference's bit for bit. Tests that run it are skipped, with the reason,
where it cannot be built (no C++ compiler, no XLA FFI headers): SM3 then
takes its portable path, which the other test files cover. The build's own
behaviour (said once, failures and timeouts fall back) is tested with a
stand-in compiler wherever this runs.
"""

import logging
import os
import stat

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sm3_tf import SM3
from sm3_tf.kernels import Settings
from sm3_tf.kernels import native

from numpy_reference import SM3Reference, dense_from_slices

_REASON = native.build("tensorflow")
needs_kernel = pytest.mark.skipif(
    _REASON is not None, reason=f"CPU kernel unavailable: {_REASON}")

LR = 0.25  # exactly representable in the float32 learning-rate variable


def _step_function(opt, var, mode):
    """One `apply_gradients` in a `tf.function`, compiled by XLA or not
    (each variable's update compiled on its own then)."""
    @tf.function(jit_compile=mode == "xla")
    def step(g):
        opt.apply_gradients([(g, var)])

    return step


def _gradient(draw, rng, shape):
    """A normal gradient, all zeros, or mostly exact zeros (nu == 0 entries
    get u = 0)."""
    kind = draw(st.sampled_from(["normal", "normal", "zero", "sparse"]))
    g = rng.normal(size=shape).astype(np.float32)
    if kind == "zero":
        return np.zeros(shape, np.float32)
    if kind == "sparse":
        return np.where(rng.random(shape) < 0.7, 0, g).astype(np.float32)
    return g


def _assert_equals_reference(opt, var, ref):
    """The variable, its accumulators and its momentum: the reference's,
    bit for bit."""
    for got, want in zip(opt.accumulators_for(var), ref.acc, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(var.numpy(), ref.var)
    momentum = opt.momentum_for(var)
    if momentum is not None:
        np.testing.assert_array_equal(
            np.asarray(momentum.numpy(), np.float32),
            np.asarray(ref.m, np.float32))


@st.composite
def problems(draw):
    rank = draw(st.integers(2, 4))
    # Widths around 16 (the kernel's lane count) and tails of every length.
    shape = tuple(draw(st.integers(1, 40)) for _ in range(rank))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    grads = [_gradient(draw, rng, shape)
             for _ in range(draw(st.integers(1, 3)))]
    momentum = draw(st.sampled_from([0.0, 0.9, 0.5]))
    return dict(shape=shape, var=rng.normal(size=shape).astype(np.float32),
                grads=grads, momentum=momentum,
                momentum_dtype=draw(st.sampled_from([None, "bfloat16"])),
                epsilon=draw(st.sampled_from([0.0, 1e-30, 1e-3])),
                mode=draw(st.sampled_from(["xla", "function"])))


@needs_kernel
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_kernel_equals_the_numpy_reference_bit_for_bit(p):
    opt = SM3(LR, momentum=p["momentum"], epsilon=p["epsilon"],
              momentum_dtype=p["momentum_dtype"], cpu_kernel=True)
    var = keras.Variable(p["var"])
    opt.build([var])
    step = _step_function(opt, var, p["mode"])
    ref = SM3Reference(p["var"], LR, p["momentum"], 1.0, p["epsilon"],
                       p["momentum_dtype"])
    for g in p["grads"]:
        step(g)
        ref.step(g)
        _assert_equals_reference(opt, var, ref)


def _custom_calls(hlo, target):
    return [line for line in hlo.splitlines()
            if f'custom_call_target="{target}"' in line]


@needs_kernel
@pytest.mark.parametrize("momentum, momentum_dtype, aliases", [
    (0.0, None, "{{0}: (1, {}), {1}: (3, {}), {2}: (4, {})}"),
    (0.9, None, "{{0}: (1, {}), {1}: (3, {}), {2}: (4, {}), {3}: (5, {})}"),
    (0.9, "bfloat16",
     "{{0}: (1, {}), {1}: (3, {}), {2}: (4, {}), {3}: (5, {})}"),
])
def test_compiled_step_runs_the_kernel_in_place(momentum, momentum_dtype,
                                                aliases):
    var = keras.Variable(np.ones((64, 48), np.float32))
    opt = SM3(LR, momentum=momentum, momentum_dtype=momentum_dtype)
    opt.build([var])
    step = _step_function(opt, var, "xla")
    g = tf.ones((64, 48))
    hlo = step.experimental_get_compiler_ir(g)(stage="optimized_hlo")
    calls = _custom_calls(hlo, "sm3_tf_step")
    assert len(calls) == 1
    # Every result is written over its operand, declared to XLA, so it
    # neither copies them nor lets anything read the old values after.
    # Operands (g, w, lr, acc_0, acc_1[, m]), results (w', acc'...[, m']).
    assert f"output_to_operand_aliasing={aliases}" in calls[0]
    assert not any(" copy(" in line for line in hlo.splitlines())
    if momentum_dtype == "bfloat16":
        assert "bf16[64,48]" in calls[0]


@needs_kernel
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_gradient_the_step_computes_is_written_over(momentum):
    # In a whole training step the gradient is computed in the program and
    # read by nothing after the kernel, which writes the new weight over it
    # and so waits for nothing (under XLA:CPU's default scheduler that
    # holds SGD's bytes: tests/sm3_memory_test.py). The numbers are the
    # reference's, bit for bit.
    if not native._breadth_first_schedule():
        pytest.skip("XLA_FLAGS chose XLA:CPU's memory-optimized scheduler, "
                    "where the kernel writes over the weight")
    rng = np.random.default_rng(0)
    start = rng.normal(size=(64, 48)).astype(np.float32)
    var = keras.Variable(start)
    opt = SM3(LR, momentum=momentum, cpu_kernel=True)
    opt.build([var])

    @tf.function(jit_compile=True)
    def step(target):
        with tf.GradientTape() as tape:
            loss = 0.5 * tf.reduce_sum(tf.square(var - target))
        opt.apply_gradients([(tape.gradient(loss, var), var)])

    targets = [rng.normal(size=(64, 48)).astype(np.float32) for _ in range(3)]
    hlo = step.experimental_get_compiler_ir(targets[0])(stage="optimized_hlo")
    calls = _custom_calls(hlo, "sm3_tf_step")
    assert len(calls) == 1
    # Operands (g, w, lr, acc_0, acc_1[, m]): w' over g. (XLA then copies
    # w' into the variable's buffer, as it copies weights for SGD's step:
    # the bytes a whole step holds are tests/sm3_memory_test.py's.)
    assert "output_to_operand_aliasing={{0}: (0, {})" in calls[0]
    ref = SM3Reference(start, LR, momentum, 1.0, 1e-30)
    for target in targets:
        gradient = ref.var - target  # exact: (w - t) times powers of two
        step(target)
        ref.step(gradient)
        _assert_equals_reference(opt, var, ref)


@st.composite
def sparse_problems(draw):
    # An embedding-like variable (rank 2 or 3), batches of ids with repeats
    # (and an empty one), momentum 0: the kernel's sparse step.
    shape = (draw(st.integers(1, 12)),) + tuple(
        draw(st.integers(1, 40)) for _ in range(draw(st.integers(1, 2))))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 10))
        ids = rng.integers(0, shape[0], n).astype(np.int32)
        values = rng.normal(size=(n,) + shape[1:]).astype(np.float32)
        if draw(st.booleans()):  # exact zeros: nu == 0 entries get u = 0
            values[rng.random(values.shape) < 0.5] = 0
        steps.append((ids, values))
    return dict(shape=shape, var=rng.normal(size=shape).astype(np.float32),
                steps=steps, mode=draw(st.sampled_from(["function", "xla"])),
                epsilon=draw(st.sampled_from([0.0, 1e-30, 1e-3])))


def _sparse_step(opt, var, shape, mode):
    @tf.function(jit_compile=mode == "xla")
    def step(ids, values):
        opt.apply_gradients([(tf.IndexedSlices(
            values, ids, tf.constant(shape, tf.int64)), var)])

    return step


@needs_kernel
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(sparse_problems())
def test_sparse_kernel_equals_the_numpy_reference_bit_for_bit(p):
    shape = p["shape"]
    opt = SM3(LR, momentum=0.0, epsilon=p["epsilon"], cpu_kernel=True)
    var = keras.Variable(p["var"])
    opt.build([var])
    step = _sparse_step(opt, var, shape, p["mode"])
    ref = SM3Reference(p["var"], LR, 0.0, 1.0, p["epsilon"])
    for ids, values in p["steps"]:
        step(tf.constant(ids), tf.constant(values))
        # Repeated rows summed in order, as NumPy sums them.
        ref.step(dense_from_slices(ids, values, shape[0]))
        _assert_equals_reference(opt, var, ref)


@needs_kernel
def test_sparse_kernel_shares_many_rows_among_threads_like_the_reference():
    # 3,000 ids over 2,000 rows of 64: about 1,500 distinct rows, in chunks
    # of 1,024 rows shared among XLA's threads (each with its own column
    # maxima); the same numbers as the reference, bit for bit.
    rng = np.random.default_rng(5)
    init = rng.normal(size=(2000, 64)).astype(np.float32)
    var = keras.Variable(init)
    opt = SM3(LR, momentum=0.0, cpu_kernel=True)
    opt.build([var])
    step = _sparse_step(opt, var, (2000, 64), "xla")
    ref = SM3Reference(init, LR, 0.0, 1.0, 1e-30)
    for _ in range(2):
        ids = rng.integers(0, 2000, 3000).astype(np.int32)
        values = rng.normal(size=(3000, 64)).astype(np.float32)
        step(tf.constant(ids), tf.constant(values))
        ref.step(dense_from_slices(ids, values, 2000))
    assert len(np.unique(ids)) > 1024
    _assert_equals_reference(opt, var, ref)


@needs_kernel
@pytest.mark.parametrize("momentum, calls", [(0.0, 1), (0.9, 0)])
def test_sparse_step_is_one_call_in_place_without_momentum(momentum, calls):
    var = keras.Variable(np.ones((1000, 16), np.float32))
    opt = SM3(LR, momentum=momentum)
    opt.build([var])
    step = _sparse_step(opt, var, (1000, 16), "xla")
    args = (tf.constant([3, 7, 3], tf.int32), tf.ones((3, 16)))
    hlo = step.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
    sparse = _custom_calls(hlo, "sm3_tf_sparse")
    assert len(sparse) == calls
    if calls:
        # Operands (ids, values, w, lr, acc_0, acc_1), results (w', acc'...).
        assert ("output_to_operand_aliasing={{0}: (2, {}), {1}: (4, {}), "
                "{2}: (5, {})}" in sparse[0])
        assert not any(" copy(" in x for x in hlo.splitlines())
    step(*args)
    assert np.all(var.numpy()[[0, 1, 2, 4]] == 1.0)
    assert np.all(var.numpy()[[3, 7]] < 1.0)


@needs_kernel
@pytest.mark.parametrize("case", [
    "beta2", "half", "float64", "vector", "disabled"])
def test_other_variables_take_the_portable_path(case):
    shape = (5,) if case == "vector" else (6, 7)
    dtype = {"half": "float16", "float64": "float64"}.get(case, "float32")
    var = keras.Variable(np.ones(shape, dtype), dtype=dtype)
    opt = SM3(LR, beta2=0.99 if case == "beta2" else 1.0,
              cpu_kernel=case != "disabled")
    opt.build([var])
    step = _step_function(opt, var, "xla")
    g = tf.ones(shape, dtype)
    hlo = step.experimental_get_compiler_ir(g)(stage="optimized_hlo")
    assert "sm3_tf_step" not in hlo
    step(g)
    # float16 variables keep float32 statistics: the reference in float32,
    # the variable rounded to float16 (10 bits).
    ref_dtype = "float32" if dtype == "float16" else dtype
    ref = SM3Reference(np.ones(shape, ref_dtype), LR, 0.9,
                       0.99 if case == "beta2" else 1.0, 1e-30)
    ref.step(np.ones(shape, ref_dtype))
    np.testing.assert_allclose(var.numpy().astype(ref_dtype), ref.var,
                               rtol=1e-6 if dtype != "float16" else 1e-3)


@needs_kernel
@pytest.mark.parametrize("case", ["xla", "gradient_accumulation",
                                  "two_replicas"])
def test_fit_trains_the_same_with_and_without_the_kernel(case):
    # Under a compiled step; with gradient accumulation (the step inside a
    # `cond`); with two replicas (each replica's compiled updates).
    cpus = tf.config.list_logical_devices("CPU")
    if case == "two_replicas" and len(cpus) < 2:
        pytest.skip("needs two logical CPUs, configured in conftest.py before "
                    "TensorFlow starts; another import initialized it first")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    y = rng.normal(size=(64, 3)).astype(np.float32)
    kwargs = ({"gradient_accumulation_steps": 2}
              if case == "gradient_accumulation" else {})
    weights = {}
    for enabled in (False, True):
        keras.utils.set_random_seed(0)
        scope = (tf.distribute.MirroredStrategy(
            [c.name for c in cpus[:2]],
            cross_device_ops=tf.distribute.ReductionToOneDevice()).scope()
            if case == "two_replicas" else tf.init_scope())
        with scope:
            model = keras.Sequential([
                keras.Input((12,)), keras.layers.Dense(20, activation="relu"),
                keras.layers.Dense(3)])
            model.compile(optimizer=SM3(0.05, cpu_kernel=enabled, **kwargs),
                          loss="mse", jit_compile=case != "two_replicas")
        initial = [w.numpy() for w in model.weights]
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights[enabled] = [w.numpy() for w in model.weights]
        for before, after in zip(initial, weights[enabled]):
            assert not np.array_equal(before, after)
    for a, b in zip(weights[False], weights[True]):
        # Same rule; XLA may round the portable path's nu with a fused
        # multiply-add where the kernel rounds twice, as NumPy does.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("cpu_kernel_arg, calls", [
    ({}, 1), ({"cpu_kernel": "auto"}, 1), ({"cpu_kernel": False}, 0)])
def test_the_default_takes_the_kernel_where_it_can_run(cpu_kernel_arg, calls):
    var = keras.Variable(np.ones((64, 48), np.float32))
    opt = SM3(LR, **cpu_kernel_arg)
    opt.build([var])
    step = _step_function(opt, var, "xla")
    hlo = step.experimental_get_compiler_ir(tf.ones((64, 48)))(
        stage="optimized_hlo")
    assert len(_custom_calls(hlo, "sm3_tf_step")) == calls


# ------------------------------------------------------------ the build


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no kernel loaded, for this test only."""
    monkeypatch.setenv("SM3_TF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_said", set())
    return tmp_path


def _stand_in_compiler(directory, body):
    """A `$CXX` that runs `body` (a shell script) instead of compiling."""
    path = directory / "fake-cxx"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _step_once(cpu_kernel):
    var = keras.Variable(np.ones((6, 7), np.float32))
    opt = SM3(LR, cpu_kernel=cpu_kernel)
    opt.build([var])
    _step_function(opt, var, "function")(tf.ones((6, 7)))
    ref = SM3Reference(np.ones((6, 7), np.float32), LR, 0.9, 1.0, 1e-30)
    ref.step(np.ones((6, 7), np.float32))
    np.testing.assert_allclose(var.numpy(), ref.var, rtol=1e-6)


@pytest.mark.parametrize("asked", [True, "auto"])
def test_a_failed_build_says_why_once_and_falls_back(
        fresh_build, monkeypatch, caplog, asked):
    monkeypatch.setenv("CXX", _stand_in_compiler(
        fresh_build, "echo 'no such header' >&2; exit 1"))
    with caplog.at_level(logging.INFO, logger="sm3_tf"):
        for _ in range(2):
            _step_once(asked)
    said = [r for r in caplog.records if "portable path" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert "no such header" in said[0].getMessage()
    assert said[0].levelno == logging.WARNING
    # The build itself is announced where users see it (WARNING), once.
    building = [r for r in caplog.records
                if "building its CPU kernel" in r.getMessage()]
    assert len(building) == 1 and building[0].levelno == logging.WARNING


def test_a_build_that_hangs_is_stopped_and_falls_back(
        fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CXX", _stand_in_compiler(fresh_build, "sleep 30"))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 1)
    with caplog.at_level(logging.INFO, logger="sm3_tf"):
        _step_once(True)
    said = [r.getMessage() for r in caplog.records
            if "portable path" in r.getMessage()]
    assert len(said) == 1 and "longer than 1 s" in said[0]
    assert os.listdir(fresh_build / "cache") == []  # nothing half-written


@needs_kernel
def test_a_build_replaces_older_ones_and_is_reused(fresh_build, caplog):
    cache = fresh_build / "cache"
    cache.mkdir()
    stale = cache / "sm3_xla_ffi-tensorflow-0123456789abcdef.so"
    stale.write_bytes(b"an older build")
    other = cache / "sm3_xla_ffi-jax-0123456789abcdef.so"
    other.write_bytes(b"another flavor's build")
    with caplog.at_level(logging.INFO, logger="sm3_tf"):
        assert native.build("tensorflow") is None
    built = sorted(os.listdir(cache))
    assert built == [other.name, [n for n in built if "tensorflow" in n][0]]
    assert not stale.exists()
    assert [r for r in caplog.records if "built in" in r.getMessage()]
    # Another process finds it in the cache: nothing is built or said.
    caplog.clear()
    native._state.clear()
    with caplog.at_level(logging.INFO, logger="sm3_tf"):
        assert native.build("tensorflow") is None
    assert not caplog.records


@pytest.mark.parametrize("asked, level", [(True, logging.WARNING),
                                          ("auto", logging.INFO)])
def test_a_machine_without_a_compiler_is_said_once_at_info_unless_asked(
        fresh_build, monkeypatch, caplog, asked, level):
    # No compiler (or a GPU in the process): the kernel is not for this
    # machine. SM3's default says so at INFO; asked for by name, a warning.
    monkeypatch.setenv("CXX", "no-such-compiler")
    with caplog.at_level(logging.INFO, logger="sm3_tf"):
        for _ in range(2):
            _step_once(asked)
    said = [r for r in caplog.records if "portable path" in r.getMessage()]
    assert len(said) == 1 and "no-such-compiler" in said[0].getMessage()
    assert said[0].levelno == level


def test_the_kernel_is_not_used_eagerly_and_says_nothing(caplog):
    # TensorFlow's eager steps run no XLA: the portable path, silently.
    var = keras.Variable(np.ones((6, 7), np.float32))
    opt = SM3(LR, cpu_kernel=True)
    with caplog.at_level(logging.INFO, logger="sm3_tf"):
        opt.apply_gradients([(tf.ones((6, 7)), var)])
    assert not caplog.records
    assert not native.applies(Settings(0.9, 1.0, 1e-30, True),
                              tf.ones((6, 7)), var)
