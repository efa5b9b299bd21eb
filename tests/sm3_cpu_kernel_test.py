"""`SM3(cpu_kernel=True)`: the hand-written CPU pass against the spec's reference.

Skipped, with the reason, where the kernel cannot be built or run (no
AVX-512F, no C++ compiler): SM3 then takes its portable path, which the
other test files cover.
"""

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sm3_tf import SM3
from sm3_tf import cpu_kernel

from numpy_reference import SM3Reference, dense_from_slices

_REASON = cpu_kernel.unavailable_reason()
pytestmark = pytest.mark.skipif(
    _REASON is not None, reason=f"CPU kernel unavailable: {_REASON}")

LR = 0.25  # exactly representable in the float32 learning-rate variable


def _step_function(opt, var, mode):
    """One `apply_gradients`: eagerly, in a `tf.function`, or under XLA."""
    if mode == "eager":
        return lambda g: opt.apply_gradients([(tf.constant(g), var)])

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


def _settings(draw):
    return dict(momentum=draw(st.sampled_from([0.0, 0.9, 0.5])),
                epsilon=draw(st.sampled_from([0.0, 1e-30, 1e-3])),
                mode=draw(st.sampled_from(["xla", "function", "eager"])))


def _assert_follows_reference(opt, var, ref, momentum):
    """The kernel rounds nu as NumPy does and max is exact: the
    accumulators are the reference's, bit for bit. Without momentum so is
    the variable: g / sqrt(nu + eps), then var - lr * u, each rounded once,
    as NumPy rounds them (the fused multiply-add rounds lr * u and the
    subtraction once: equal where lr * u is exact, lr = 1/4). With it, the
    momentum's mu * m + (1 - mu) * u is one fused multiply-add: within a
    unit or two in the last place of the reference."""
    for got, want in zip(opt.accumulators_for(var), ref.acc, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
    if momentum == 0:
        np.testing.assert_array_equal(var.numpy(), ref.var)
    else:
        np.testing.assert_allclose(var.numpy(), ref.var, rtol=1e-6,
                                   atol=1e-6)


@st.composite
def problems(draw):
    rank = draw(st.integers(2, 4))
    # Widths around 16 (the kernel's lane count) and tails of every length.
    shape = tuple(draw(st.integers(1, 40)) for _ in range(rank))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    grads = [_gradient(draw, rng, shape)
             for _ in range(draw(st.integers(1, 3)))]
    return dict(shape=shape, var=rng.normal(size=shape).astype(np.float32),
                grads=grads, **_settings(draw))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_kernel_follows_the_numpy_reference(p):
    opt = SM3(LR, momentum=p["momentum"], epsilon=p["epsilon"],
              cpu_kernel=True)
    var = keras.Variable(p["var"])
    opt.build([var])
    step = _step_function(opt, var, p["mode"])
    ref = SM3Reference(p["var"], LR, p["momentum"], 1.0, p["epsilon"])
    for g in p["grads"]:
        step(g)
        ref.step(g)
        _assert_follows_reference(opt, var, ref, p["momentum"])


@st.composite
def vector_problems(draw):
    # Rank 0 and 1 (each entry its own accumulator), widths around 16 and
    # tails of every length; several per step, stepped in one call, each
    # step a subset of them (the others' part of the shared accumulator
    # must stay as it is).
    shapes = draw(st.lists(
        st.one_of(st.just(()), st.tuples(st.integers(1, 40))),
        min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        chosen = sorted(draw(st.sets(st.integers(0, len(shapes) - 1),
                                     min_size=1)))
        steps.append([(i, _gradient(draw, rng, shapes[i])) for i in chosen])
    return dict(
        shapes=shapes,
        values=[rng.normal(size=s).astype(np.float32) for s in shapes],
        steps=steps, **_settings(draw))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(vector_problems())
def test_vectors_follow_the_numpy_reference(p):
    opt = SM3(LR, momentum=p["momentum"], epsilon=p["epsilon"],
              cpu_kernel=True)
    variables = [keras.Variable(v) for v in p["values"]]
    opt.build(variables)
    refs = [SM3Reference(v, LR, p["momentum"], 1.0, p["epsilon"])
            for v in p["values"]]

    def step(chosen, grads):
        opt.apply_gradients(zip(grads, [variables[i] for i in chosen]))

    if p["mode"] != "eager":
        step = tf.function(step, jit_compile=p["mode"] == "xla")
    for grads in p["steps"]:
        step(tuple(i for i, _ in grads), [tf.constant(g) for _, g in grads])
        for i, g in grads:
            refs[i].step(g)
        for var, ref in zip(variables, refs):
            _assert_follows_reference(opt, var, ref, p["momentum"])


def test_compiled_step_steps_all_vectors_in_one_call_in_place():
    shapes = [(64, 48), (48,), (7,), ()]
    variables = [keras.Variable(np.ones(s, np.float32)) for s in shapes]
    opt = SM3(LR, cpu_kernel=True)
    opt.build(variables)

    @tf.function(jit_compile=True)
    def step(grads):
        opt.apply_gradients(zip(grads, variables))

    grads = [tf.ones(s) for s in shapes]
    hlo = step.experimental_get_compiler_ir(grads)(stage="optimized_hlo")
    lines = hlo.splitlines()
    matrix = [x for x in lines if 'custom_call_target="sm3_tf_step"' in x]
    vectors = [x for x in lines if 'custom_call_target="sm3_tf_vectors"' in x]
    assert len(matrix) == 1 and len(vectors) == 1
    # Operands (lr, the shared accumulator, then g, w, m per vector),
    # results (acc', then w', m' per vector), each over its operand.
    aliases = ", ".join(["{0}: (1, {})"] + [
        f"{{{1 + 2 * v + i}}}: ({3 + 3 * v + i}, {{}})"
        for v in range(3) for i in range(2)])
    assert f"output_to_operand_aliasing={{{aliases}}}" in vectors[0]
    assert "offsets = array<i64: 0, 48, 55>" in vectors[0]
    assert not any(" copy(" in x for x in lines)
    step(grads)
    for variable, shape in zip(variables[1:], shapes[1:]):
        ref = SM3Reference(np.ones(shape, np.float32), LR, 0.9, 1.0, 1e-30)
        ref.step(np.ones(shape, np.float32))
        np.testing.assert_allclose(variable.numpy(), ref.var, rtol=1e-6)
        np.testing.assert_array_equal(opt.accumulators_for(variable)[0],
                                      ref.acc[0])


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
                steps=steps, mode=draw(st.sampled_from(["eager", "xla"])),
                epsilon=draw(st.sampled_from([0.0, 1e-30, 1e-3])))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(sparse_problems())
def test_sparse_kernel_follows_the_numpy_reference(p):
    shape = p["shape"]
    opt = SM3(LR, momentum=0.0, epsilon=p["epsilon"], cpu_kernel=True)
    var = keras.Variable(p["var"])
    opt.build([var])

    def step(ids, values):
        opt.apply_gradients([(tf.IndexedSlices(
            values, ids, tf.constant(shape, tf.int64)), var)])

    if p["mode"] == "xla":
        step = tf.function(step, jit_compile=True)
    ref = SM3Reference(p["var"], LR, 0.0, 1.0, p["epsilon"])
    for ids, values in p["steps"]:
        step(tf.constant(ids), tf.constant(values))
        ref.step(dense_from_slices(ids, values, shape[0]))
        # Repeated rows summed in order, as NumPy sums them: the same
        # numbers, bit for bit, as the dense kernel's.
        _assert_follows_reference(opt, var, ref, 0.0)


def test_sparse_kernel_shares_many_rows_among_threads_like_the_reference():
    # 3,000 ids over 2,000 rows of 64: about 1,500 distinct rows, in chunks
    # of 1,024 rows shared among XLA's threads (each with its own column
    # maxima); the same numbers as the reference, bit for bit.
    rng = np.random.default_rng(5)
    init = rng.normal(size=(2000, 64)).astype(np.float32)
    var = keras.Variable(init)
    opt = SM3(LR, momentum=0.0, cpu_kernel=True)
    opt.build([var])
    ref = SM3Reference(init, LR, 0.0, 1.0, 1e-30)
    for _ in range(2):
        ids = rng.integers(0, 2000, 3000).astype(np.int32)
        values = rng.normal(size=(3000, 64)).astype(np.float32)
        opt.apply_gradients([(tf.IndexedSlices(
            tf.constant(values), tf.constant(ids), tf.constant([2000, 64])),
            var)])
        ref.step(dense_from_slices(ids, values, 2000))
    assert len(np.unique(ids)) > 1024
    _assert_follows_reference(opt, var, ref, 0.0)


@pytest.mark.parametrize("momentum, calls", [(0.0, 1), (0.9, 0)])
def test_sparse_step_is_one_call_in_place_without_momentum(momentum, calls):
    var = keras.Variable(np.ones((1000, 16), np.float32))
    opt = SM3(LR, momentum=momentum)
    opt.build([var])

    @tf.function(jit_compile=True)
    def step(ids, values):
        opt.apply_gradients([(tf.IndexedSlices(
            values, ids, tf.constant([1000, 16], tf.int64)), var)])

    args = (tf.constant([3, 7, 3], tf.int32), tf.ones((3, 16)))
    hlo = step.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
    sparse = [x for x in hlo.splitlines()
              if 'custom_call_target="sm3_tf_sparse"' in x]
    assert len(sparse) == calls
    if calls:
        # Operands (ids, values, w, lr, acc), results (w', acc').
        assert ("output_to_operand_aliasing={{0}: (2, {}), {1}: (4, {})}"
                in sparse[0])
        assert not any(" copy(" in x for x in hlo.splitlines())
    step(*args)
    assert np.all(var.numpy()[[0, 1, 2, 4]] == 1.0)
    assert np.all(var.numpy()[[3, 7]] < 1.0)


def test_sparse_kernel_names_an_index_outside_the_rows():
    var = keras.Variable(np.ones((5, 4), np.float32))
    opt = SM3(LR, momentum=0.0, cpu_kernel=True)
    opt.build([var])
    before = opt.accumulator_for(var).numpy().copy()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="index is outside the variable's rows"):
        opt.apply_gradients([(tf.IndexedSlices(
            tf.ones((2, 4)), tf.constant([1, 5]), tf.constant([5, 4])), var)])
    np.testing.assert_array_equal(var.numpy(), np.ones((5, 4)))
    np.testing.assert_array_equal(opt.accumulator_for(var).numpy(), before)


def test_compiled_step_runs_the_kernel_in_place():
    var = keras.Variable(np.ones((64, 48), np.float32))
    opt = SM3(LR, cpu_kernel=True)
    opt.build([var])

    @tf.function(jit_compile=True)
    def step(g):
        opt.apply_gradients([(g, var)])

    g = tf.ones((64, 48))
    hlo = step.experimental_get_compiler_ir(g)(stage="optimized_hlo")
    calls = [line for line in hlo.splitlines()
             if 'custom_call_target="sm3_tf_step"' in line]
    assert len(calls) == 1
    # Every result is written in place, declared to XLA, so it neither
    # copies them nor lets anything read the old values after. Operands
    # (g, w, lr, acc, m), results (w', acc', m').
    assert ("output_to_operand_aliasing={{0}: (1, {}), {1}: (3, {}), "
            "{2}: (4, {})}") in calls[0]
    assert not any(" copy(" in line for line in hlo.splitlines())


@pytest.mark.parametrize("case", [
    "beta2", "half_vector", "float64", "float64_vector", "disabled"])
def test_other_variables_take_the_portable_path(case):
    shape = (5,) if case.endswith("vector") else (6, 7)
    dtype = {"half_vector": "float16"}.get(case, "float64" if case.startswith(
        "float64") else "float32")
    var = keras.Variable(np.ones(shape, dtype), dtype=dtype)
    opt = SM3(LR, beta2=0.99 if case == "beta2" else 1.0,
              cpu_kernel=case != "disabled")
    opt.build([var])

    @tf.function(jit_compile=True)
    def step(g):
        opt.apply_gradients([(g, var)])

    g = tf.ones(shape, dtype)
    hlo = step.experimental_get_compiler_ir(g)(stage="optimized_hlo")
    assert "sm3_tf_step" not in hlo and "sm3_tf_vectors" not in hlo
    step(g)
    # float16 variables keep float32 statistics: the reference in float32,
    # the variable rounded to float16 (10 bits).
    ref_dtype = "float32" if dtype == "float16" else dtype
    ref = SM3Reference(np.ones(shape, ref_dtype), LR, 0.9,
                       0.99 if case == "beta2" else 1.0, 1e-30)
    ref.step(np.ones(shape, ref_dtype))
    np.testing.assert_allclose(var.numpy().astype(ref_dtype), ref.var,
                               rtol=1e-6 if dtype != "float16" else 1e-3)


def test_fit_trains_the_same_with_and_without_the_kernel():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    weights = {}
    for enabled in (False, True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((12,)), keras.layers.Dense(20, activation="relu"),
            keras.layers.Dense(3)])
        model.compile(optimizer=SM3(0.05, cpu_kernel=enabled),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True), jit_compile=True)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights[enabled] = [w.numpy() for w in model.weights]
    for a, b in zip(weights[False], weights[True]):
        # Same rule; the portable path's g * rsqrt(nu) and the kernel's
        # g / sqrt(nu) may differ in the last bit, 8 steps on.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["gradient_accumulation", "two_replicas"])
def test_kernel_steps_like_the_portable_path_in_other_apply_settings(case):
    # Gradient accumulation steps inside a `cond`: the vectors' call must
    # be made in its branch. Two replicas: no kernel (portable), same step.
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
        # Reduced on one device, not by collectives: collective instances
        # of two strategies in one process clash (the other tests' one).
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
        # Every variable, the biases too, was stepped.
        for before, after in zip(initial, weights[enabled]):
            assert not np.array_equal(before, after)
    for a, b in zip(weights[False], weights[True]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nan_gradient_reaches_both_accumulators_as_in_the_reference():
    # NumPy's max keeps NaN; so does the kernel, in the row and the column
    # accumulator alike. (The portable path under XLA:CPU kept it in the
    # column and dropped it from the row: its vectorized reductions.)
    g = np.ones((4, 20), np.float32)
    g[1, 17] = np.nan
    var = keras.Variable(np.zeros((4, 20), np.float32))
    opt = SM3(LR, momentum=0.0, cpu_kernel=True)
    opt.build([var])
    _step_function(opt, var, "xla")(g)
    ref = SM3Reference(np.zeros((4, 20), np.float32), LR, 0.0, 1.0, 1e-30)
    ref.step(g)
    for got, want in zip(opt.accumulators_for(var), ref.acc):
        np.testing.assert_array_equal(got.numpy(), want)  # NaN == NaN here
    assert np.isnan(opt.accumulators_for(var)[0].numpy()[1])


@pytest.mark.parametrize("asked, level", [(True, logging.WARNING),
                                          ("auto", logging.INFO)])
def test_unavailable_kernel_says_why_once_and_falls_back(
        monkeypatch, caplog, asked, level):
    # Asked for (True): a warning; SM3's default ("auto"): INFO, no warning.
    monkeypatch.setattr(cpu_kernel, "_loaded", "this CPU has no AVX-512F")
    monkeypatch.setattr(cpu_kernel, "_warned", False)
    var = keras.Variable(np.ones((6, 7), np.float32))
    opt = SM3(LR, cpu_kernel=asked)
    opt.build([var])
    with caplog.at_level(logging.INFO, logger="sm3_tf"):
        for _ in range(2):
            _step_function(opt, var, "eager")(np.ones((6, 7), np.float32))
    said = [r for r in caplog.records if "cpu_kernel" in r.getMessage()]
    assert len(said) == 1 and "AVX-512F" in said[0].getMessage()
    assert said[0].levelno == level
    ref = SM3Reference(np.ones((6, 7), np.float32), LR, 0.9, 1.0, 1e-30)
    for _ in range(2):
        ref.step(np.ones((6, 7), np.float32))
    np.testing.assert_allclose(var.numpy(), ref.var, rtol=1e-6)


@pytest.mark.parametrize("cpu_kernel_arg, calls", [
    ({}, 1), ({"cpu_kernel": "auto"}, 1), ({"cpu_kernel": False}, 0)])
def test_the_default_takes_the_kernel_where_it_can_run(cpu_kernel_arg, calls):
    var = keras.Variable(np.ones((64, 48), np.float32))
    opt = SM3(LR, **cpu_kernel_arg)
    opt.build([var])

    @tf.function(jit_compile=True)
    def step(g):
        opt.apply_gradients([(g, var)])

    hlo = step.experimental_get_compiler_ir(tf.ones((64, 48)))(
        stage="optimized_hlo")
    assert hlo.count('custom_call_target="sm3_tf_step"') == calls
