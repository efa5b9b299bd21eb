"""Where an XLA-compiled optimizer step spends its time, kernel by kernel.

    python scripts/profile_step.py [--models resnet50] \
        [--optimizers sgd_momentum,sm3] [--steps 20] [--top 15]

For each variable set and optimizer, one `apply_gradients` is compiled with
XLA (as `bench_step.py --xla on` times it) and run `--steps` times under
`tf.profiler`, with XLA:CPU told to record every kernel it launches
(`--xla_cpu_enable_xprof_traceme`). Printed per step: the thread time of
each kind of kernel (HLO fusions named alike, e.g. every
`slice_maximum_fusion.N`), then the costliest kernels with their output and
input shapes, and how many kernels the optimized program has.

Read it for proportions, not for sums: XLA:CPU runs independent kernels side
by side on the 2 cores and splits large loops across them, so the thread
times add up to more than the step's wall time (`bench_step.py` measures
that). SM3's CPU kernel (`sm3` where it runs; `sm3_portable` never) is one
`custom-call` kernel per matrix: its time is the calling thread's, from the
call's start to its end, and the work it hands to XLA's other threads is
not counted again.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

# XLA reads its flags once, when TensorFlow loads it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402
import harness  # noqa: E402

# Ops of the optimized program that launch nothing.
_NOT_KERNELS = ("parameter", "get-tuple-element", "tuple", "bitcast",
                "constant")


def kernel_shapes(hlo_text):
    """`{instruction name: (output shape, [operand shapes])}` of the entry
    computation of an optimized HLO module, and its number of kernels."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    shapes, operands, kernels = {}, {}, 0
    for line in entry.splitlines()[1:]:
        # A shape is an array's (no spaces) or a tuple's (the CPU kernel's
        # custom call returns the variable and its state).
        match = re.match(r"\s*(?:ROOT )?%(\S+) = (\((?:[^()]|\([^()]*\))*\)"
                         r"|\S+) ([\w-]+)\((.*?)\)", line)
        if not match:
            continue
        name, shape, opcode, args = match.groups()
        shapes[name] = shape
        operands[name] = re.findall(r"%([\w.-]+)", args)
        kernels += opcode not in _NOT_KERNELS
    table = {name: (shape, [shapes.get(o, "?") for o in operands[name]])
             for name, shape in shapes.items()}
    return table, kernels


def thread_times(logdir, steps):
    """`{event name: microseconds per step}` summed over every thread."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"),
                     recursive=True)[0]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                totals[name] += event.duration_ps / 1e6 / steps
    return totals


def profile(name, variables, grads, steps, top):
    step = bench_step.step_function(harness.build_optimizer(name), variables,
                                    grads, jit_compile=True)
    for _ in range(3):  # compile, then warm up
        step().numpy()
    table, kernels = kernel_shapes(
        step.experimental_get_compiler_ir()(stage="optimized_hlo"))
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            step().numpy()
        tf.profiler.experimental.stop()
        totals = thread_times(logdir, steps)
    launched = {k: v for k, v in totals.items() if k in table}
    by_kind, count = collections.Counter(), collections.Counter()
    for kernel, us in launched.items():
        kind = re.sub(r"\.\d+$", "", kernel)
        by_kind[kind] += us
        count[kind] += 1
    print(f"\n{name}: {kernels} kernels in the optimized program; thread "
          f"time per step {sum(launched.values()) / 1e3:.2f} ms in all",
          flush=True)
    for kind, us in by_kind.most_common():
        print(f"  {us / 1e3:8.2f} ms  x{count[kind]:<4d} {kind}")
    print(f"  the {top} costliest kernels (us, output <- inputs):")
    for kernel, us in sorted(launched.items(), key=lambda kv: -kv[1])[:top]:
        out, ins = table[kernel]
        print(f"  {us:8.1f}  {kernel:30s} {out} <- {', '.join(ins[:3])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--optimizers", default="sgd_momentum,sm3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    optimizers = [o for o in args.optimizers.split(",") if o]
    harness.check_names(parser, "--models", models, bench_step.VARIABLE_SETS)
    harness.check_names(parser, "--optimizers", optimizers,
                        bench_step.OPTIMIZERS)
    if args.steps < 1:
        parser.error(f"--steps: must be >= 1, got {args.steps}")
    if args.top < 0:
        parser.error(f"--top: must be >= 0, got {args.top}")
    for model in models:
        shapes = bench_step.VARIABLE_SETS[model]()
        print(f"== {model}: {len(shapes)} variables", flush=True)
        variables, grads = bench_step.make_problem(shapes)
        for name in optimizers:
            profile(name, variables, grads, args.steps, args.top)


if __name__ == "__main__":
    main()
