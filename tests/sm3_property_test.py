"""Property tests: the optimizer against the NumPy reference of the spec."""

import contextlib
import os
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sm3_tf import SM3
from sm3_tf import rule

from numpy_reference import SM3Reference

TOLERANCE = {"float32": dict(rtol=2e-5, atol=1e-6),
             "float64": dict(rtol=1e-12, atol=1e-14)}

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=5).map(tuple)


@st.composite
def problems(draw):
    shape = draw(shapes)
    dtype = draw(st.sampled_from(["float32", "float64"]))
    steps = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    grads = []
    for _ in range(steps):
        kind = draw(st.sampled_from(["normal", "normal", "zero", "sparse"]))
        g = rng.normal(size=shape).astype(dtype)
        if kind == "zero":
            g = np.zeros(shape, dtype)
        elif kind == "sparse":  # many exact zeros: nu == 0 entries
            g = np.where(rng.random(shape) < 0.7, 0, g).astype(dtype)
        grads.append(g)
    return dict(
        shape=shape,
        dtype=dtype,
        var=rng.normal(size=shape).astype(dtype),
        grads=grads,
        momentum=draw(st.sampled_from([0.0, 0.9, 0.5])),
        beta2=draw(st.sampled_from([1.0, 0.99, 0.5])),
        epsilon=draw(st.sampled_from([0.0, 1e-30, 1e-3])),
        # SM3's default takes the CPU kernel for float32 with beta2 = 1
        # where it can run (tests/sm3_cpu_kernel_test.py holds it to the
        # bit); False keeps the portable path.
        cpu_kernel=draw(st.sampled_from([False, "auto"])),
    )


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_optimizer_matches_numpy_reference(p):
    lr = 0.25  # exactly representable: Keras keeps it in a float32 variable
    opt = SM3(learning_rate=lr, momentum=p["momentum"], beta2=p["beta2"],
              epsilon=p["epsilon"], cpu_kernel=p["cpu_kernel"])
    var = keras.Variable(p["var"], dtype=p["dtype"])
    ref = SM3Reference(p["var"], lr, p["momentum"], p["beta2"], p["epsilon"])
    for g in p["grads"]:
        opt.apply_gradients([(tf.constant(g), var)])
        ref.step(g)
        np.testing.assert_allclose(var.numpy(), ref.var, **TOLERANCE[p["dtype"]])
        got = [a.numpy() for a in opt.accumulators_for(var)]
        if var.shape and 0 not in var.shape:
            assert len(got) == len(ref.acc)
            for a, b in zip(got, ref.acc):
                np.testing.assert_allclose(a, b, **TOLERANCE[p["dtype"]])
    assert np.all(np.isfinite(var.numpy()))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=6).map(tuple),
       st.integers(0, 2**31 - 1))
def test_fewer_pass_reduction_equals_direct_reduction_bit_for_bit(shape, seed):
    x = np.abs(np.random.default_rng(seed).normal(size=shape)).astype(np.float32)
    got = rule.max_over_all_axes_but_each(tf.constant(x))
    axes = range(len(shape))
    for i, g in zip(axes, got):
        want = x.max(axis=tuple(a for a in axes if a != i))
        np.testing.assert_array_equal(np.asarray(g), want)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_accumulators_never_decrease_with_running_sum(p):
    opt = SM3(momentum=0.0, beta2=1.0, cpu_kernel=p["cpu_kernel"])
    var = keras.Variable(p["var"], dtype=p["dtype"])
    before = None
    for g in p["grads"]:
        opt.apply_gradients([(tf.constant(g), var)])
        now = [a.numpy().copy() for a in opt.accumulators_for(var)]
        if before is not None:
            for a, b in zip(now, before):
                assert np.all(a >= b)
        before = now


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(2, 9), min_size=2, max_size=3).map(tuple),
       st.sampled_from(["float32", "float64"]), st.sampled_from([1.0, 0.99]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_every_accumulator_holds_the_same_maximum(shape, dtype, beta2, folded,
                                                  seed):
    # Each accumulator is a maximum of the same `nu` over all axes but its
    # own, so all of them share nu's overall maximum, bit for bit, if the row
    # and the column passes compute `nu` alike; the sparse rule's exactness
    # rests on it (spec). They did not when XLA fused `prev + g * g` into a
    # multiply-add in one pass and not in the other (rule._rounded): the
    # maxima differed in a quarter of the steps on a 4 x 7 matrix.
    rng = np.random.default_rng(seed)
    opt = SM3(momentum=0.0, beta2=beta2, cpu_kernel=False)  # XLA's passes
    var = keras.Variable(rng.normal(size=shape).astype(dtype), dtype=dtype)
    with _fold_every_size() if folded else contextlib.nullcontext():
        for _ in range(3):
            grad = rng.normal(size=shape).astype(dtype)
            opt.apply_gradients([(tf.constant(grad), var)])
            maxima = {a.numpy().max() for a in opt.accumulators_for(var)}
            assert len(maxima) == 1, (shape, maxima)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=2, max_size=4).map(tuple),
       st.integers(2, 9), st.booleans(), st.sampled_from([1, 2, 3, 16]),
       st.integers(0, 2**31 - 1))
def test_folded_reduction_equals_direct_reduction_bit_for_bit(
        shape, blocks, split_fold_reductions, run_width, seed):
    # Sizes that are not multiples of `blocks` make the last slice overlap;
    # narrow runs make small shapes take the row pass's `fold_runs` too.
    x = np.abs(np.random.default_rng(seed).normal(size=shape)).astype(np.float32)
    with _fold_every_size(), mock.patch.object(rule, "ROW_RUN_WIDTH",
                                               run_width):
        got = rule.max_over_all_axes_but_each(tf.constant(x), blocks,
                                              split_fold_reductions)
    axes = range(len(shape))
    assert len(got) == len(shape)
    for i, g in zip(axes, got):
        want = x.max(axis=tuple(a for a in axes if a != i))
        np.testing.assert_array_equal(np.asarray(g), want)


def test_fold_runs_folds_the_pieces_of_each_run():
    # 2 rows of 2 runs, each of 3 pieces of width 2: piece k of run r
    # holds r * 6 + k * 2 + (0, 1) (plus 100 on the second row).
    x = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)
    x[1] += 100
    folded = np.asarray(rule.fold_runs(tf.constant(x), 3, 2))
    assert folded.shape == (2, 2, 2)
    np.testing.assert_array_equal(folded[0], [[4, 5], [10, 11]])
    np.testing.assert_array_equal(folded.max(axis=(1, 2)), x.max(axis=1))
    scrambled = np.random.default_rng(0).permutation(x.ravel()).reshape(2, 12)
    np.testing.assert_array_equal(
        np.asarray(rule.fold_runs(tf.constant(scrambled), 3, 2)).max(
            axis=(1, 2)), scrambled.max(axis=1))


def test_row_pass_covers_the_columns_past_the_last_whole_run():
    # 2 runs of 3 pieces of width 2 (12 columns) and 5 columns more, where
    # every row's maximum lies: the last run is moved back to overlap.
    x = np.arange(4 * 17, dtype=np.float32).reshape(4, 17) % 12
    x[:, 12:] += 100 + np.arange(4 * 5, dtype=np.float32).reshape(4, 5)
    with _fold_every_size(), mock.patch.object(rule, "ROW_RUN_WIDTH", 2):
        row_max, col_max = rule.max_over_all_axes_but_each(
            tf.constant(x), blocks=3)
    np.testing.assert_array_equal(np.asarray(row_max), x.max(axis=1))
    np.testing.assert_array_equal(np.asarray(col_max), x.max(axis=0))


def test_fold_max_covers_the_axis_with_overlapping_slices():
    x = np.arange(17 * 3, dtype=np.float32).reshape(17, 3)
    folded = np.asarray(rule.fold_max(tf.constant(x), 0, 8))
    # ceil(17 / 8) = 3 rows per slice; starts 0, 3, ..., 12, then 14.
    assert folded.shape == (3, 3)
    np.testing.assert_array_equal(folded.max(axis=0), x.max(axis=0))
    np.testing.assert_array_equal(folded[-1], x[-1])  # last slice ends at 17
    short = np.ones((5, 3), np.float32)
    assert np.asarray(rule.fold_max(tf.constant(short), 0, 8)).shape == (5, 3)


def _fold_every_size():
    """Lowers `rule.FOLD_MIN_SIZE` so that small tensors take the fold path."""
    return mock.patch.object(rule, "FOLD_MIN_SIZE", 1)


@st.composite
def foldable_problems(draw):
    rank = draw(st.integers(2, 4))
    high = {2: 60, 3: 30, 4: 18}[rank]
    shape = tuple(draw(st.lists(st.integers(1, high), min_size=rank,
                                max_size=rank)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    grads = [rng.normal(size=shape).astype(np.float32)
             for _ in range(draw(st.integers(1, 3)))]
    return dict(shape=shape, var=rng.normal(size=shape).astype(np.float32),
                grads=grads, momentum=draw(st.sampled_from([0.0, 0.9])))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(foldable_problems())
def test_optimizer_with_folded_reductions_matches_numpy_reference(p):
    # On CPU the TensorFlow path folds large tensors (sm3_tf.optimizer.
    # CPU_REDUCTION_BLOCKS); here every tensor does, compiled by XLA as in
    # a real step, and must still follow the reference.
    lr = 0.25
    with _fold_every_size():
        opt = SM3(learning_rate=lr, momentum=p["momentum"], cpu_kernel=False)
        var = keras.Variable(p["var"])
        ref = SM3Reference(p["var"], lr, p["momentum"], 1.0, 1e-30)
        for g in p["grads"]:
            opt.apply_gradients([(tf.constant(g), var)])
            ref.step(g)
            np.testing.assert_allclose(var.numpy(), ref.var,
                                       **TOLERANCE["float32"])
            for a, b in zip(opt.accumulators_for(var), ref.acc):
                np.testing.assert_allclose(a.numpy(), b,
                                           **TOLERANCE["float32"])


def test_a_variable_above_the_fold_threshold_matches_numpy_reference():
    # 300,000 entries >= rule.FOLD_MIN_SIZE; 500 columns are 3 runs of
    # 8 x 16 and 116 more (rule._row_maxima_folded).
    shape = (600, 500)
    assert np.prod(shape) >= rule.FOLD_MIN_SIZE
    rng = np.random.default_rng(7)
    init = rng.normal(size=shape).astype(np.float32)
    opt = SM3(learning_rate=0.25, cpu_kernel=False)
    var = keras.Variable(init)
    ref = SM3Reference(init, 0.25, 0.9, 1.0, 1e-30)
    for _ in range(3):
        g = rng.normal(size=shape).astype(np.float32)
        opt.apply_gradients([(tf.constant(g), var)])
        ref.step(g)
    # Like every compiled step here, to rounding: XLA may fuse prev + g * g
    # into one fused multiply-add, which rounds once where NumPy rounds twice.
    np.testing.assert_allclose(var.numpy(), ref.var, **TOLERANCE["float32"])
    for a, b in zip(opt.accumulators_for(var), ref.acc):
        np.testing.assert_allclose(a.numpy(), b, **TOLERANCE["float32"])


@st.composite
def model_problems(draw):
    """Several variables of ranks 0-3 and mixed dtypes (scalars and vectors
    share one accumulator per dtype), each step updating a subset of them,
    in any order."""
    count = draw(st.integers(1, 5))
    shapes = [draw(st.lists(st.integers(1, 5), max_size=3).map(tuple))
              for _ in range(count)]
    dtypes = [draw(st.sampled_from(["float32", "float64"]))
              for _ in range(count)]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        chosen = draw(st.permutations(range(count)).map(
            lambda order: order[:draw(st.integers(1, count))]))
        steps.append([(i, rng.normal(size=shapes[i]).astype(dtypes[i]))
                      for i in chosen])
    return dict(
        values=[rng.normal(size=s).astype(d) for s, d in zip(shapes, dtypes)],
        steps=steps,
        mode=draw(st.sampled_from(["eager", "function", "xla"])),
        momentum=draw(st.sampled_from([0.0, 0.9])),
        beta2=draw(st.sampled_from([1.0, 0.99])),
        cpu_kernel=draw(st.sampled_from([False, "auto"])),
    )


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(model_problems())
def test_several_variables_and_subsets_match_numpy_reference(p):
    lr = 0.25
    opt = SM3(learning_rate=lr, momentum=p["momentum"], beta2=p["beta2"],
              cpu_kernel=p["cpu_kernel"])
    variables = [keras.Variable(v, dtype=v.dtype) for v in p["values"]]
    opt.build(variables)
    refs = [SM3Reference(v, lr, p["momentum"], p["beta2"], 1e-30)
            for v in p["values"]]

    def apply(chosen, grads):
        opt.apply_gradients(zip(grads, [variables[i] for i in chosen]))

    if p["mode"] != "eager":
        apply = tf.function(apply, jit_compile=p["mode"] == "xla")
    for step in p["steps"]:
        chosen = tuple(i for i, _ in step)
        apply(chosen, [tf.constant(g) for _, g in step])
        for i, g in step:
            refs[i].step(g)
        for var, ref in zip(variables, refs):  # the others left as they were
            tolerance = TOLERANCE[ref.var.dtype.name]
            np.testing.assert_allclose(var.numpy(), ref.var, **tolerance)
            for a, b in zip(opt.accumulators_for(var), ref.acc, strict=True):
                np.testing.assert_allclose(a.numpy(), b, **tolerance)
