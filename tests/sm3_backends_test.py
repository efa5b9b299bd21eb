"""The same SM3 class on Keras's JAX and PyTorch backends (`keras.ops`)."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     "backend_check.py")


@functools.lru_cache(maxsize=None)  # one subprocess per backend
def _run(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if backend == "jax":  # two CPU devices, for a distribution's layouts
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_force_host_platform_device_count=2")
    root = os.path.dirname(os.path.dirname(CHECK))
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, CHECK], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend, module", [("torch", "torch"),
                                             ("jax", "jax")])
def test_rule_nan_and_fit_on_backend(backend, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install "
                    f"{'torch==2.13.0' if module == 'torch' else 'jax'})")
    result = _run(backend)
    assert result["backend"] == backend
    assert result["max_diff"] < 1e-5
    # The NaN entry's parameter turns NaN at once; the next step spreads it
    # to nothing else (its accumulators are +inf: the others go on).
    assert result["nan_entries"] == [[[1, 2]], [[1, 2]]]
    assert result["losses"][-1] < result["losses"][0]
    if backend == "torch":
        assert "cpu_kernel" in result["cpu_kernel_error"]
        assert "torch" in result["cpu_kernel_error"]
        # A float64 value's bfloat16 momentum is rounded through float32,
        # as on TensorFlow (tests/sm3_spec_test.py): 1.5, not 1.496.
        assert result["float64_bf16_momentum"] == [[1.5, 1.5], [1.5, 1.5]]
    else:
        assert result["cpu_kernel_error"] is None


def test_jax_kernel_equals_reference_and_holds_no_temporaries():
    # Keras-JAX on CPU calls the same XLA FFI handler as TensorFlow: one
    # call, in place, the reference's numbers bit for bit, and no
    # temporary beyond a few bytes, where the portable step holds `nu`
    # (the matrix's size) while XLA reduces it.
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install jax)")
    result = _run("jax")
    assert result["step_bytes"]["portable"] <= 1.0 + 1e-3
    if result["kernel_unavailable"] is not None:
        pytest.skip(f"CPU kernel unavailable: {result['kernel_unavailable']}")
    assert result["kernel_calls"] == 1
    assert result["kernel_bit_exact"]
    assert result["step_bytes"]["kernel"] < 0.01
    # Given the gradient, the kernel writes over the weight (writing over
    # a gradient the step was given would copy it); where the step
    # computes it, over the gradient, with the same numbers.
    assert not result["kernel_over_gradient"]
    assert result["computed_gradient"] == {
        "calls": 1, "bit_exact": True, "over_gradient": True}


def test_jax_slots_take_their_variable_s_layout_under_a_distribution():
    # Keras places a slot made from a reference variable with its layout;
    # SM3's per-dimension accumulators take the layout of their own axis.
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install jax)")
    layouts = _run("jax")["layouts"]
    assert layouts == {
        "dense_kernel_accumulator_0": [None],
        "dense_kernel_accumulator_1": ["model"],
        "dense_kernel_momentum": [None, "model"],
        "dense_bias_accumulator": [None],
        "dense_bias_momentum": [None],
    }
