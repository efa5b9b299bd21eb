"""The same SM3 class on Keras's other backends (dense rule via keras.ops)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     "backend_check.py")


def _run(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    root = os.path.dirname(os.path.dirname(CHECK))
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# JAX compiles the step with XLA, which on CPU runs the folded reductions
# faster (reducing each fold in two: rule.fold_max); eager PyTorch would copy
# every slice, so it reduces directly.
@pytest.mark.parametrize("backend, module, blocks, split_folds",
                         [("torch", "torch", 1, False),
                          ("jax", "jax", 8, True)])
def test_dense_rule_and_fit_on_backend(backend, module, blocks,
                                       split_folds):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install "
                    f"{'torch==2.13.0' if module == 'torch' else 'jax'})")
    result = _run(backend)
    assert result["backend"] == backend
    assert result["max_diff"] < 1e-5
    assert result["blocks"] == blocks
    assert result["split_fold_reductions"] == split_folds
    assert "cpu_kernel" in result["cpu_kernel_error"]
    assert backend in result["cpu_kernel_error"]
    if backend == "jax":
        # The folds stay in XLA's own loop: the step's temporaries are the
        # two folded tensors (1/8 of the matrix each). Reduced whole,
        # jaxlib's XLA wrote every slice out (twice the matrix), allocated
        # and page-faulted anew at each step. Beside the folds, at most an
        # accumulator-sized buffer (1024 + 512 entries: the new per-axis
        # maxima, packed end to end into the accumulator after).
        assert result["step_temp_fraction"] <= 0.25 + (1024 + 512) / (
            1024 * 512)
    assert result["losses"][-1] < result["losses"][0]
