"""sm3_tf.memory: counted state equals what built optimizers hold, and
what a compiled step holds, from XLA's buffer assignment."""

import importlib.util
import json
import os
import subprocess
import sys

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


# ------------------------------------------- what a compiled step holds

_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "step_memory_check.py")


# XLA:CPU's schedulers: its default runs independent work breadth first
# (for concurrency); the other keeps the fewest bytes alive.
MEMORY_OPTIMIZED = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _step_memory(backend, *args, xla_flags=""):
    """tests/step_memory_check.py's figures, in a fresh process (XLA reads
    its flags once, at a process's first compilation)."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=xla_flags)
    root = os.path.dirname(os.path.dirname(_CHECK))
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, _CHECK, *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_compiled_step_holds_what_sgd_holds_plus_the_accumulators(backend):
    # From XLA's buffer assignment, exact: where the CPU kernel runs, SM3's
    # step holds SGD's (momentum 0) or SGD with momentum's (momentum 0.9;
    # half the momentum's bytes in bfloat16) plus its accumulators, plus
    # under 1% of the parameters. The portable step (what GPUs and TPUs
    # run) holds one variable's `nu` more, the largest, never all of them
    # at once: its updates are chained. TensorFlow without whole-step XLA
    # runs one compiled program per variable: each holds at most its own.
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install jax)")
    r = _step_memory(backend)
    params, state, largest = r["parameters"], r["accumulators"], r["largest"]
    steps = r["steps"]
    sgd, sgd_momentum = steps["sgd"]["total"], steps["sgd_momentum"]["total"]
    assert sgd == pytest.approx(2 * params, rel=1e-3)  # variables, grads
    slack = 0.01 * params
    portable = {"sm3_portable": sgd,
                "sm3_portable_momentum": sgd_momentum,
                "sm3_portable_bf16_momentum": sgd + params / 2}
    for name, base in portable.items():
        assert steps[name]["total"] <= base + state + largest + slack, name
        assert steps[name]["total"] >= base + state, name
        if backend == "tensorflow":
            assert steps[name]["largest_temporary"] <= largest + slack, name
    if r["kernel_unavailable"] is not None:
        pytest.skip(f"CPU kernel unavailable: {r['kernel_unavailable']}")
    kernel = {"sm3_kernel": sgd, "sm3_kernel_momentum": sgd_momentum,
              "sm3_kernel_bf16_momentum": sgd + params / 2}
    for name, base in kernel.items():
        assert steps[name]["total"] <= base + state + slack, name
        if backend == "tensorflow":
            assert steps[name]["largest_temporary"] <= slack, name


def _skip_without(backend):
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install jax)")


def _each_holds_at_most(r, path, extra=0):
    """Each SM3 step on `path` ("kernel" or "portable") holds at most
    SGD's bytes (momentum 0), SGD with momentum's (0.9; half the momentum's
    bytes in bfloat16), plus the accumulators, `extra` bytes and 1% of the
    parameters."""
    if path == "kernel" and r["kernel_unavailable"] is not None:
        pytest.skip(f"CPU kernel unavailable: {r['kernel_unavailable']}")
    params, steps = r["parameters"], r["steps"]
    sgd, sgd_momentum = steps["sgd"]["total"], steps["sgd_momentum"]["total"]
    bases = {f"sm3_{path}": sgd, f"sm3_{path}_momentum": sgd_momentum,
             f"sm3_{path}_bf16_momentum": sgd + params / 2}
    for name, base in bases.items():
        assert steps[name]["total"] <= (
            base + r["accumulators"] + extra + 0.01 * params), (name, steps)


WHOLE_STEP = {
    "kernel": ("--whole_step", "--optimizers=sgd,sgd_momentum,sm3_kernel,"
               "sm3_kernel_momentum,sm3_kernel_bf16_momentum"),
    "portable": ("--whole_step", "--optimizers=sgd,sgd_momentum,sm3_portable,"
                 "sm3_portable_momentum,sm3_portable_bf16_momentum"),
}


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.parametrize("path", ["kernel", "portable"])
def test_a_whole_training_step_holds_what_sgds_holds(backend, path):
    # The whole compiled step of a 6 x Dense(512) MLP (forward, backward,
    # update), XLA:CPU's default scheduler. The kernel writes each new
    # weight over its gradient, so it waits for nothing and holds SGD's
    # bytes (written over the weight, it held 2 weights more). The
    # portable step holds one weight's `nu` more: its update computes `nu`
    # again rather than read it back, so it follows its gradient as SGD's
    # does (an update that reads it back holds 1-2 gradients more:
    # TensorFlow 1.69x the parameters' bytes where the bound is 1.38x).
    _skip_without(backend)
    r = _step_memory(backend, *WHOLE_STEP[path])
    _each_holds_at_most(r, path, extra=r["largest"] if path == "portable"
                        else 0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_under_the_memory_optimized_scheduler_too(backend):
    # XLA:CPU's memory-optimized scheduler: the kernel writes over the
    # weight once backpropagation has read it, and still holds SGD's bytes;
    # the portable step (chained) one weight's `nu` more, never two.
    _skip_without(backend)
    r = _step_memory(backend, "--whole_step", xla_flags=MEMORY_OPTIMIZED)
    _each_holds_at_most(r, "portable", extra=r["largest"])
    _each_holds_at_most(r, "kernel")
