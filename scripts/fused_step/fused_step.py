"""What a single-pass SM3 kernel would give: an experiment, not the package.

SM3's statistics need, for every gradient entry, a row maximum and a column
maximum; XLA:CPU computes them in two reading passes beside the update
(docs/performance.md). `kernel.h` does the update and both maxima in one
pass (AVX-512, OpenMP). Two measurements, medians of interleaved rounds:

  python scripts/fused_step/fused_step.py            # C++ alone: the kernel
      # against SGD and SGD+momentum loops written the same way
  python scripts/fused_step/fused_step.py --xla      # the kernel as an XLA
      # custom call inside TensorFlow's compiled step, against Keras's
      # optimizers and sm3_tf.SM3 in the same process

Needs g++ with OpenMP and a CPU with AVX-512F. `--xla` compiles against
TensorFlow's headers; its in-place variant writes buffers XLA was not told
about (see xla_call.cc): a measurement, not something to train with.
"""

import argparse
import ctypes
import gc
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # scripts/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

import model_shapes  # noqa: E402

CXXFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
            "-fopenmp",
            "-std=c++17"]


def matrix_views(shapes):
    """`(rows, cols)` per variable as sm3_tf sees it; cols 0 for a vector."""
    from sm3_tf import rule

    views = []
    for shape in shapes:
        if len(shape) <= 1:
            views.append((int(shape[0]) if shape else 1, 0))
        else:
            views.append(rule.matrix_shape(shape, rule.split_axes(shape)))
    return views


def compile_cpp(args, what):
    try:
        subprocess.run(["g++", *args], check=True, capture_output=True,
                       text=True)
    except FileNotFoundError:
        sys.exit("fused_step: g++ not found")
    except subprocess.CalledProcessError as e:
        sys.exit(f"fused_step: building {what} failed:\n{e.stderr}")


def run_bound(models, rounds, build):
    binary = os.path.join(build, "bound")
    compile_cpp([*CXXFLAGS, "-o", binary, os.path.join(HERE, "bound.cc")],
                "bound.cc")
    for model in models:
        views = matrix_views([s for _, s in model_shapes.MODELS[model]()])
        path = os.path.join(build, f"{model}.txt")
        with open(path, "w") as f:
            f.writelines(f"{r} {c}\n" for r, c in views)
        print(f"\n== {model}: {len(views)} tensors, C++ loops, "
              f"{os.cpu_count()} threads, median ms of {rounds} rounds",
              flush=True)
        subprocess.run([binary, path, str(rounds)], check=True)


def run_xla(models, rounds, build, check=True):
    import numpy as np
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    import bench_step
    import harness
    import sm3_tf
    from sm3_tf import rule

    library = os.path.join(build, "xla_call.so")
    tf_dir = os.path.dirname(tf.__file__)
    compile_cpp([*CXXFLAGS, "-shared", "-fPIC",
                 *tf.sysconfig.get_compile_flags(), "-o", library,
                 os.path.join(HERE, "xla_call.cc"), f"-L{tf_dir}",
                 "-l:libtensorflow_cc.so.2", "-l:libtensorflow_framework.so.2"],
                "xla_call.cc")
    ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)  # registers the targets

    class FusedSM3(sm3_tf.SM3):
        """SM3 whose matrices take one custom call each (vectors as before)."""

        def __init__(self, in_place, **kwargs):
            super().__init__(**kwargs)
            self.in_place = in_place

        def _dense_update(self, gradient, variable, accumulators, momentum,
                          learning_rate):
            shape = tuple(variable.shape)
            if len(shape) < 2:
                return super()._dense_update(gradient, variable, accumulators,
                                             momentum, learning_rate)
            split = rule.split_axes(shape)
            rows, cols = rule.matrix_shape(shape, split)
            accs = [tf.convert_to_tensor(a) for a in accumulators]
            operands = [
                tf.reshape(gradient, [rows, cols]),
                tf.reshape(tf.convert_to_tensor(variable), [rows, cols]),
                tf.reshape(rule.min_of_accumulators(accs[:split]), [rows]),
                tf.reshape(rule.min_of_accumulators(accs[split:]), [cols]),
                tf.cast(learning_rate, tf.float32)]
            matrix = tf.TensorSpec([rows, cols], tf.float32)
            specs = [tf.TensorSpec([rows], tf.float32),
                     tf.TensorSpec([cols], tf.float32)]
            if not self.in_place:
                specs.insert(0, matrix)
            if momentum is not None:
                operands.append(tf.reshape(tf.convert_to_tensor(momentum),
                                           [rows, cols]))
                if not self.in_place:
                    specs.append(matrix)
            results = xla.custom_call_v2(
                "sm3_fused_step_" + ("in_place" if self.in_place else "copy"),
                operands, specs,
                backend_config=(f"{rows} {cols} {int(momentum is not None)} "
                                f"{self.momentum} {self.epsilon}"))
            first = 0 if self.in_place else 1
            maxima = (
                rule._max_over_each_axis(
                    tf.reshape(results[first], shape[:split]))
                + rule._max_over_each_axis(
                    tf.reshape(results[first + 1], shape[split:])))
            for acc, value in zip(accumulators, maxima):
                self.assign(acc, value)
            if not self.in_place:
                self.assign(variable, tf.reshape(results[0], shape))
                if momentum is not None:
                    self.assign(momentum, tf.reshape(results[3], shape))

    lr = 1e-4
    builders = {name: bench_step.OPTIMIZERS[name] for name in
                ("sgd", "sgd_momentum", "adam", "sm3", "sm3_no_momentum")}
    for in_place in (True, False):
        for momentum in (0.9, 0.0):
            name = (f"fused{'' if in_place else ' copy'}"
                    f"{' m0' if momentum == 0 else ''}")
            builders[name] = (lambda in_place=in_place, momentum=momentum:
                              FusedSM3(in_place, learning_rate=lr,
                                       momentum=momentum))

    for model in models:
        shapes = bench_step.VARIABLE_SETS[model]()
        print(f"\n== {model}: {len(shapes)} variables, XLA", flush=True)
        # The custom call computes what SM3 computes: 3 steps of each.
        for momentum in ((0.9, 0.0) if check else ()):
            for in_place in (True, False):
                v1, grads = bench_step.make_problem(shapes)
                v2, _ = bench_step.make_problem(shapes)
                o1 = sm3_tf.SM3(lr, momentum=momentum)
                o2 = FusedSM3(in_place, learning_rate=lr, momentum=momentum)
                s1 = bench_step.step_function(o1, v1, grads, True)
                s2 = bench_step.step_function(o2, v2, grads, True)
                for _ in range(3):
                    s1().numpy()
                    s2().numpy()
                dw = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                         for a, b in zip(v1, v2))
                ds = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                         for a, b in zip(o1.variables, o2.variables))
                print(f"  3 steps, momentum {momentum}, "
                      f"{'in place' if in_place else 'copy'}: largest "
                      f"difference from sm3_tf.SM3 in the variables {dw:.2g}, "
                      f"in the optimizer's state {ds:.2g}", flush=True)
                del v1, v2, grads, o1, o2, s1, s2  # Transformer-Big: 0.8 GB each
                gc.collect()
        variables, grads = bench_step.make_problem(shapes)
        steps = {}
        for name, build_optimizer in builders.items():
            steps[name] = bench_step.step_function(build_optimizer(),
                                                   variables, grads, True)
            steps[name]().numpy()
        med = harness.time_interleaved(steps, rounds, bench_step._wait)
        harness.print_medians(f"{model}, XLA: median step time (ms)", med)
        for a, b in (("sm3", "sgd_momentum"), ("fused", "sgd_momentum"),
                     ("fused", "adam"), ("fused copy", "sgd_momentum"),
                     ("sm3_no_momentum", "sgd"), ("fused m0", "sgd"),
                     ("fused copy m0", "sgd")):
            print(f"  {a} / {b}: {med[a] / med[b]:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,transformer_big")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--xla", action="store_true",
                        help="time the kernel as an XLA custom call inside "
                        "TensorFlow's compiled step")
    parser.add_argument("--no_check", action="store_true",
                        help="with --xla, skip comparing 3 steps with "
                        "sm3_tf.SM3 first (Transformer-Big's checks and "
                        "timings together need more than 24 GB)")
    args = parser.parse_args()
    models = args.models.split(",")
    for model in models:
        if model not in model_shapes.MODELS:
            parser.error(f"--models: unknown {model!r}; choose from "
                         f"{', '.join(model_shapes.MODELS)}")
    with tempfile.TemporaryDirectory() as build:
        if args.xla:
            run_xla(models, args.rounds, build, check=not args.no_check)
        else:
            run_bound(models, args.rounds, build)


if __name__ == "__main__":
    main()
