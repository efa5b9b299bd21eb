"""Times one optimizer step on Keras's JAX backend: SM3 against Keras's optimizers.

    python scripts/bench_step_jax.py [--models resnet50,transformer_big]
        [--rounds 7] [--optimizers sgd,...] [--cap_dims N] [--json FILE]

The JAX twin of `bench_step.py`'s dense tables: the same variable sets and
optimizers, each step one `optimizer.stateless_apply` under `jax.jit`, with
the variables and the optimizer state donated (updated in place, as
TensorFlow updates its variables), rounds interleaved, medians and SM3's
ratios printed. JAX always compiles with XLA, so the ratios are set against
the XLA targets. `sm3` is `SM3()` as users get it: on JAX's CPU its CPU
kernel (`sm3_tf.kernels.native`, through `jax.ffi`; the first line printed
says whether it runs here), elsewhere its portable path; `sm3_portable` is
`SM3(cpu_kernel=False)`, the rule as `keras.ops`, so both paths are timed.
It runs on JAX's default device: a GPU where JAX has one
(`JAX_PLATFORMS=cpu` forces the CPU); there `sm3` takes the portable path
too, and the table shows how XLA:GPU runs SM3's rule (docs/performance.md).

The script sets `KERAS_BACKEND=jax` unless it is set; set to another
backend, it stops with an error.
"""

import argparse
import functools
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import model_shapes  # noqa: E402


def kernel_unavailable():
    """None where `SM3()` takes its CPU kernel here, else why not."""
    if jax.default_backend() != "cpu":
        return (f"JAX runs on {jax.default_backend()} (the kernel is for "
                "CPUs)")
    from sm3_tf.kernels import native

    return native.build("jax")


def make_values(shapes, seed=0):
    """`harness.draw_problem`'s values, and its gradients on JAX's device."""
    values, grads = harness.draw_problem(shapes, seed)
    return values, [jax.numpy.asarray(g) for g in grads]


def step_function(optimizer, values, grads):
    """A step that applies `grads` once; returns the new state to wait on.

    Each optimizer gets its own copy of the variables: their buffers are
    donated to the compiled step, so no two optimizers may share them.
    """
    variables = [keras.Variable(v) for v in values]
    optimizer.build(variables)
    state = ([v.value for v in variables],
             [v.value for v in optimizer.variables])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def apply(trainable, optimizer_state, grads):
        return optimizer.stateless_apply(optimizer_state, grads, trainable)

    def step():
        nonlocal state
        state = apply(state[0], state[1], grads)
        return state

    return step


def bench(models, rounds, optimizers, cap_dims=None):
    results = {}
    device = jax.devices()[0]
    for model in models:
        shapes = [shape for _, shape in model_shapes.MODELS[model]()]
        if cap_dims:
            shapes = harness.cap_shapes(shapes, cap_dims)
            model = f"{model} (every axis cut to <= {cap_dims})"
        params = sum(int(np.prod(s)) for s in shapes)
        print(f"\n== {model}: {len(shapes)} variables, {params / 1e6:.4g} M "
              f"parameters, on {device.platform} ({device.device_kind})",
              flush=True)
        values, grads = make_values(shapes)
        steps = {}
        for name in optimizers:
            start = time.perf_counter()
            steps[name] = step_function(harness.build_optimizer(name),
                                        values, grads)
            jax.block_until_ready(steps[name]())  # trace and compile
            print(f"  compiled {name} in {time.perf_counter() - start:.1f} s",
                  flush=True)
        med = harness.time_interleaved(steps, rounds, jax.block_until_ready)
        label = f"{model}, Keras JAX backend, XLA on {device.platform}"
        harness.report_ratios(label, med, True, targets=not cap_dims)
        results[label] = med
        del steps
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,transformer_big",
                        help="variable sets, comma-separated, from: "
                        + ", ".join(model_shapes.MODELS)
                        + " (default: %(default)s)")
    parser.add_argument("--optimizers",
                        default=",".join(harness.OPTIMIZER_NAMES),
                        help="comma-separated (default: all of %(default)s)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds; the median is reported")
    parser.add_argument("--cap_dims", type=int,
                        help="cut every axis to at most this many entries: "
                        "the step's fixed cost per kernel, without the data")
    parser.add_argument("--json", help="write all medians to this file")
    args = parser.parse_args()
    if keras.backend.backend() != "jax":
        parser.error("this script times Keras's JAX backend, but "
                     f"KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}: "
                     "unset it or set it to jax (bench_step.py times "
                     "TensorFlow)")
    if args.rounds < 1:
        parser.error(f"--rounds: must be >= 1, got {args.rounds}")
    if args.cap_dims is not None and args.cap_dims < 1:
        parser.error(f"--cap_dims: must be >= 1, got {args.cap_dims}")
    optimizers = [o for o in args.optimizers.split(",") if o]
    harness.check_names(parser, "--optimizers", optimizers,
                        harness.OPTIMIZER_NAMES)
    models = [m for m in args.models.split(",") if m]
    harness.check_names(parser, "--models", models, model_shapes.MODELS)
    harness.say_sm3_path(kernel_unavailable())
    results = bench(models, args.rounds, optimizers, args.cap_dims)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
