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
TensorFlow's headers and registers the kernel with XLA:CPU in this process.
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

# "matrices": one kernel call per matrix, vectors as sm3_tf does them;
# "all": vectors through a kernel call too.
MODES = ("matrices", "all")
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

    library = os.path.join(build, "xla_ffi.so")
    tf_dir = os.path.dirname(tf.__file__)
    compile_cpp([*CXXFLAGS, "-shared", "-fPIC",
                 *tf.sysconfig.get_compile_flags(), "-o", library,
                 os.path.join(HERE, "xla_ffi.cc"), f"-L{tf_dir}",
                 "-l:libtensorflow_cc.so.2", "-l:libtensorflow_framework.so.2"],
                "xla_ffi.cc")
    ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)  # registers the handlers

    def ffi_call(target, operands, result_shapes, aliases, **attributes):
        """`operands` through the FFI handler `target`, results written over
        the operands that `aliases` (result index: operand index) names."""
        def tensor_type(shape):
            return "tensor<" + "".join(f"{d}x" for d in shape) + "f32>"

        operand_types = [tensor_type(x.shape) for x in operands]
        result_types = ", ".join(tensor_type(x) for x in result_shapes)
        n = len(result_shapes)
        module = (
            f"module @{target} {{\n  func.func public @main("
            + ", ".join(f"%a{i}: {t}" for i, t in enumerate(operand_types))
            + f") -> ({result_types}) {{\n    %0:{n} = stablehlo.custom_call "
            f"@{target}("
            + ", ".join(f"%a{i}" for i in range(len(operands)))
            + ") {api_version = 4 : i32, backend_config = {"
            + ", ".join(f"{k} = {v:.9e} : f32" for k, v in attributes.items())
            + "}, output_operand_aliases = ["
            + ", ".join(
                "#stablehlo.output_operand_alias<output_tuple_indices = "
                f"[{r}], operand_index = {o}, operand_tuple_indices = []>"
                for r, o in aliases.items())
            + f"]}} : ({', '.join(operand_types)}) -> ({result_types})\n"
            "    return " + ", ".join(f"%0#{i}" for i in range(n))
            + f" : {result_types}\n  }}\n}}\n")
        return xla.call_module(
            operands, version=xla.call_module_maximum_supported_version(),
            module=module.encode(), Tout=[tf.float32] * n, Sout=result_shapes,
            platforms=("CPU",))

    class FusedSM3(sm3_tf.SM3):
        """SM3 whose matrices (and, with `vectors`, vectors too) take one
        kernel call each, updating their variables in place."""

        def __init__(self, vectors, **kwargs):
            super().__init__(**kwargs)
            self.vectors = vectors

        def _dense_update(self, gradient, variable, accumulators, momentum,
                          learning_rate):
            shape = tuple(variable.shape)
            lr = tf.cast(learning_rate, tf.float32)
            m = [] if momentum is None else [tf.convert_to_tensor(momentum)]
            attributes = dict(mu=self.momentum, eps=self.epsilon)
            if len(shape) <= 1:
                if not self.vectors:
                    return super()._dense_update(
                        gradient, variable, accumulators, momentum,
                        learning_rate)
                n = max(1, int(np.prod(shape)))
                flat = [tf.reshape(x, [n]) for x in
                        [gradient, tf.convert_to_tensor(variable),
                         tf.convert_to_tensor(accumulators[0])] + m]
                results = ffi_call(
                    "sm3_vector", flat[:3] + [lr] + flat[3:],
                    [(n,)] * (2 + len(m)),
                    {0: 1, 1: 2, **({2: 4} if m else {})}, **attributes)
                self.assign(accumulators[0], tf.reshape(results[1], shape))
                self.assign(variable, tf.reshape(results[0], shape))
                if m:
                    self.assign(momentum, tf.reshape(results[2], shape))
                return
            split = rule.split_axes(shape)
            rows, cols = rule.matrix_shape(shape, split)
            accs = [tf.convert_to_tensor(a) for a in accumulators]
            operands = [
                tf.reshape(gradient, [rows, cols]),
                tf.reshape(tf.convert_to_tensor(variable), [rows, cols]),
                tf.reshape(rule.min_of_accumulators(accs[:split]), [rows]),
                tf.reshape(rule.min_of_accumulators(accs[split:]), [cols]),
                lr] + [tf.reshape(x, [rows, cols]) for x in m]
            results = ffi_call(
                "sm3_matrix", operands,
                [(rows, cols), (rows,), (cols,)] + [(rows, cols)] * len(m),
                {0: 1, **({3: 5} if m else {})}, **attributes)
            maxima = (
                rule._max_over_each_axis(
                    tf.reshape(results[1], shape[:split]))
                + rule._max_over_each_axis(
                    tf.reshape(results[2], shape[split:])))
            for acc, value in zip(accumulators, maxima):
                self.assign(acc, value)
            self.assign(variable, tf.reshape(results[0], shape))
            if m:
                self.assign(momentum, tf.reshape(results[3], shape))

    lr = 1e-4
    builders = {name: bench_step.OPTIMIZERS[name] for name in
                ("sgd", "sgd_momentum", "adam", "sm3", "sm3_no_momentum")}
    for mode in MODES:
        for momentum in (0.9, 0.0):
            name = f"{mode}{' m0' if momentum == 0 else ''}"
            builders[name] = (lambda mode=mode, momentum=momentum:
                              FusedSM3(mode == "all", learning_rate=lr,
                                       momentum=momentum))

    for model in models:
        shapes = bench_step.VARIABLE_SETS[model]()
        print(f"\n== {model}: {len(shapes)} variables, XLA", flush=True)
        # The custom call computes what SM3 computes: 3 steps of each.
        for momentum in ((0.9, 0.0) if check else ()):
            for mode in MODES:
                v1, grads = bench_step.make_problem(shapes)
                v2, _ = bench_step.make_problem(shapes)
                o1 = sm3_tf.SM3(lr, momentum=momentum)
                o2 = FusedSM3(mode == "all", learning_rate=lr,
                              momentum=momentum)
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
                      f"{mode}: largest "
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
        for a, b in (("sm3", "sgd_momentum"), ("sm3", "adam"),
                     ("sm3_no_momentum", "sgd"),
                     *[(f"{mode}{m0}", base) for mode in MODES
                       for m0, base in (("", "sgd_momentum"), ("", "adam"),
                                        (" m0", "sgd"))]):
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
