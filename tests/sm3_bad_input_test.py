"""Bad input is answered alike on every path, and nothing is said needlessly.

Paths: the CPU kernel (`cpu_kernel=True`, where it can be built), the
portable rule (`cpu_kernel=False`: what GPUs and TPUs run), eagerly, in a
`tf.function` (each variable's update compiled on its own) and compiled
whole with XLA. Keras's JAX and PyTorch backends: tests/sm3_backends_test.py.
"""

import logging
import os
import re
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from sm3_tf import SM3
from sm3_tf.kernels import native

from numpy_reference import SM3Reference

MODES = ["eager", "function", "xla"]
KERNEL = native.build("tensorflow")
PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(
    KERNEL is not None, reason=f"CPU kernel unavailable: {KERNEL}"))]


def _stepper(opt, variables, mode):
    def step(grads):
        opt.apply_gradients(zip(grads, variables))

    if mode == "eager":
        return step
    return tf.function(step, jit_compile=mode == "xla")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cpu_kernel", PATHS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_gradient_entry_shows_in_the_parameters_it_reaches(
        mode, cpu_kernel, momentum, bad):
    # As with Keras's optimizers, the entry's parameter turns non-finite at
    # once (where TerminateOnNaN and the trainers' NaN stop see it), never a
    # silent freeze. Its accumulators become +inf, so the other entries of
    # its row and column go on, finite; every path agrees, and with the
    # reference, on which entries.
    grad = np.ones((3, 4), np.float32)
    grad[1, 2] = bad
    bias_grad = np.ones(4, np.float32)
    bias_grad[3] = bad
    opt = SM3(learning_rate=0.25, momentum=momentum, cpu_kernel=cpu_kernel)
    kernel = keras.Variable(np.zeros((3, 4), np.float32))
    bias = keras.Variable(np.zeros(4, np.float32))
    opt.build([kernel, bias])
    step = _stepper(opt, [kernel, bias], mode)
    refs = [SM3Reference(np.zeros((3, 4), np.float32), 0.25, momentum),
            SM3Reference(np.zeros(4, np.float32), 0.25, momentum)]
    for grads in ([grad, bias_grad], [np.ones((3, 4), np.float32),
                                      np.ones(4, np.float32)]):
        step([tf.constant(g) for g in grads])
        for ref, g in zip(refs, grads):
            ref.step(g)
        assert np.argwhere(~np.isfinite(kernel.numpy())).tolist() == [[1, 2]]
        assert np.argwhere(~np.isfinite(bias.numpy())).tolist() == [[3]]
        for var, ref in zip((kernel, bias), refs):
            np.testing.assert_allclose(var.numpy(), ref.var, rtol=1e-6)
    row, col = opt.accumulators_for(kernel)
    assert row.numpy()[1] == col.numpy()[2] == np.inf
    assert np.isfinite(np.delete(row.numpy(), 1)).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cpu_kernel", PATHS)
@pytest.mark.parametrize("sparse", [False, True])
def test_a_gradient_of_another_shape_is_refused_naming_both(mode, cpu_kernel,
                                                            sparse):
    opt = SM3(cpu_kernel=cpu_kernel)
    var = keras.Variable(np.ones((3, 4), np.float32), name="weights")
    opt.build([var])
    state = [v.numpy().copy() for v in (var, *opt.variables)]
    if sparse:
        grad = tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 1]),
                                tf.constant([3, 3]))
        shapes = r"\(3, 4\).*\(3,\)"
    else:
        grad = tf.ones((4, 3))
        shapes = r"\(3, 4\).*\(4, 3\)"
    step = _stepper(opt, [var], mode)
    with pytest.raises(ValueError, match=rf"'weights'.*{shapes}"):
        step([grad])
    for before, after in zip(state, (var, *opt.variables)):
        np.testing.assert_array_equal(after.numpy(), before)


def test_an_eager_loop_over_many_shapes_warns_of_no_retracing(caplog):
    # SM3's eager steps are plain TensorFlow ops: nothing traced per shape,
    # so nothing that blames the user's loop for retracing.
    variables = [keras.Variable(np.ones((i + 2, 3), np.float32))
                 for i in range(8)]
    opt = SM3()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = tf.add_n([tf.reduce_sum(v * v) for v in variables])
            grads = tape.gradient(loss, variables)
            opt.apply_gradients(zip(grads, variables))
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]


_FIT = """
import numpy as np, keras, sm3_tf
optimizer = {optimizer}
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                          keras.layers.Dense(1)])
model.compile(optimizer=optimizer, loss="mse", jit_compile={jit_compile})
model.fit(np.ones((64, 8)), np.ones((64, 1)), epochs=2, verbose=0)
"""


# Timestamps, thread ids (padded to varying widths) and addresses: one "#"
# for each run of them.
_NUMBERS = re.compile(r"(0x[0-9a-f]+|[0-9][0-9:.]*)(\s+(0x[0-9a-f]+|[0-9][0-9:.]*))*")


def _lines(optimizer, jit_compile):
    """What `fit` prints in a fresh process, TensorFlow's INFO lines shown
    (as by default), without timestamps, thread ids and addresses, and
    without the CPU kernel's build lines ("SM3: ...", where this process
    builds it first: tests/sm3_native_test.py checks those)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run(
        [sys.executable, "-c", _FIT.format(optimizer=optimizer,
                                           jit_compile=jit_compile)],
        env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [_NUMBERS.sub("#", line)
            for line in (out.stdout + out.stderr).splitlines()
            if "SM3: " not in line]


# Under XLA SM3 compiles nothing of its own (the risky case is without), so
# that case is in the slow tier.
@pytest.mark.parametrize("jit_compile", [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_fit_says_nothing_that_keras_own_optimizers_do_not(jit_compile):
    # SM3's compiled updates start XLA quietly (sm3_tf.kernels.tensorflow);
    # under a compiled step both print TensorFlow's own XLA lines.
    assert (_lines("sm3_tf.SM3()", jit_compile)
            == _lines("keras.optimizers.Adam()", jit_compile))
