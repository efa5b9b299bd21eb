"""sm3_tf's CPU kernel alone, against SGD, SGD+momentum and Adam loops.

`SM3()` runs `sm3_tf/kernels/native/sm3_kernel.h` inside the XLA program
where it can (`scripts/bench_step.py` times that against Keras's
optimizers). This times the same kernel outside any framework, beside SGD,
SGD with momentum and Adam written the same way in C++ (one loop per tensor,
all OpenMP threads), over the variables of ResNet-50 and Transformer-Big as
sm3_tf sees them (its matrix views): how close a single pass over the
gradient comes to the memory-traffic floor, with no framework costs.

  python scripts/fused_step/fused_step.py [--models resnet50] [--rounds 9]

Needs g++ with OpenMP. Built as sm3_tf builds the kernel (-march=native,
-ffp-contract=off): the kernel's vectors are whatever this CPU has
(AVX-512, AVX2, NEON).
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # scripts/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

import model_shapes  # noqa: E402

# sm3_tf.kernels.native's flags for the kernel, and OpenMP.
CXXFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
            "-Wno-psabi", "-fopenmp", "-std=c++17"]


def matrix_views(shapes):
    """`(rows, cols)` per variable as sm3_tf sees it (`rule.split_axes`);
    cols 0 for a vector."""
    from sm3_tf import rule

    views = []
    for shape in shapes:
        if len(shape) <= 1:
            views.append((int(shape[0]) if shape else 1, 0))
        else:
            split = rule.split_axes(shape)
            views.append((math.prod(shape[:split]), math.prod(shape[split:])))
    return views


def run_bound(models, rounds, build):
    binary = os.path.join(build, "bound")
    try:
        subprocess.run(["g++", *CXXFLAGS, "-o", binary,
                        os.path.join(HERE, "bound.cc")],
                       check=True, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit("fused_step: g++ not found")
    except subprocess.CalledProcessError as e:
        sys.exit(f"fused_step: building bound.cc failed:\n{e.stderr}")
    for model in models:
        views = matrix_views([s for _, s in model_shapes.MODELS[model]()])
        path = os.path.join(build, f"{model}.txt")
        with open(path, "w") as f:
            f.writelines(f"{r} {c}\n" for r, c in views)
        print(f"\n== {model}: {len(views)} tensors, C++ loops, "
              f"{os.cpu_count()} threads, median ms of {rounds} rounds",
              flush=True)
        subprocess.run([binary, path, str(rounds)], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,transformer_big",
                        help="variable sets, comma-separated, from: "
                        + ", ".join(model_shapes.MODELS)
                        + " (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=9,
                        help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: must be >= 1, got {args.rounds}")
    models = [m for m in args.models.split(",") if m]
    for model in models:
        if model not in model_shapes.MODELS:
            parser.error(f"--models: unknown {model!r}; choose from "
                         f"{', '.join(model_shapes.MODELS)}")
    with tempfile.TemporaryDirectory() as build:
        run_bound(models, args.rounds, build)


if __name__ == "__main__":
    main()
