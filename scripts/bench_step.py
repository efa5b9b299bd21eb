"""Times one optimizer step (`apply_gradients`) for SM3 and Keras's optimizers.

    python scripts/bench_step.py [--models resnet50,transformer_big]
        [--xla both|on|off] [--rounds 7] [--sparse] [--peak_memory] [--fit]
    python scripts/bench_step.py --breakdown --no_dense [--models ...]
    python scripts/bench_step.py --cap_dims 4 --xla on
    python scripts/bench_step.py --mirrored [--rounds 7]

For each variable set (ResNet-50's, Transformer-Big's) and each optimizer,
one `apply_gradients` inside a `tf.function` (with and without XLA) is timed.
Rounds are interleaved (every optimizer once per round, in a rotating order)
so that machine noise hits all alike, and the median is reported, with ratios
of SM3 against SGD, SGD+momentum and Adam measured in the same process.
`sm3` is `SM3()` as users get it (its CPU kernel where it can run, the first
line printed says whether it does here), `sm3_portable` is
`SM3(cpu_kernel=False)`: the rule as `keras.ops`, compiled by XLA.

`--sparse`: a 1,000,000 x 64 embedding, a batch touching 4,096 rows (with
repeats), SM3 without momentum: the sparse step against the dense step on the
same gradient (SM3's default, and its portable path).

`--fit`: `model.fit` steps per second of a small Transformer (d 256, 2+2
layers, vocab 8000), SM3 (default and portable) against Adam, epochs
interleaved, with and without `jit_compile` (`--xla`): what SM3, and its
CPU kernel, cost in a whole training step.

`--breakdown --no_dense`: where SM3's portable step goes. It is timed whole
and doing one part only, beside SGD, SGD+momentum and SM3's CPU kernel:
the update (read the accumulators and the gradient, compute `nu`, write the
variable and momentum; the new accumulators are not written, so XLA drops
the row and column maxima) or the statistics (the accumulators' new values,
the maxima of `nu`; the variable and momentum are not written).

`--cap_dims N`: the dense tables on the same variable sets with every axis
cut to at most N entries: the same number of variables, kernels and launches
with almost no data to move, so the step time is the step's fixed cost per
kernel (what a step over tiny tensors costs), apart from its memory traffic.

`--peak_memory`: for each optimizer, in fresh processes, how far five steps
raise the peak resident memory (Linux's VmHWM, reset through
/proc/self/clear_refs once the variable, gradient and optimizer state exist),
minus how far plain SGD's steps raise it: the temporaries the update
allocates beyond SGD's, compared with the variable's own size.

`--mirrored` (on its own): TensorFlow's `MirroredStrategy` over 2 logical CPU
devices (gradients reduced with `ReductionToOneDevice`), a plain
`tf.function` (no whole-step XLA) running `strategy.run` of a replica step
that calls `apply_gradients` with that replica's gradients, over 6 matrices
of 2048 x 2048 and 6 vectors of 2048 (`--mirrored_size` changes 2048);
optimizers SGD, SGD+momentum, Adam, SM3, SM3 portable and SM3 without
momentum unless `--optimizers` names others.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

import sm3_tf  # noqa: E402
from sm3_tf import kernels  # noqa: E402
from sm3_tf import rule  # noqa: E402
from sm3_tf.kernels import native  # noqa: E402
from sm3_tf.kernels import portable  # noqa: E402
from sm3_tf.kernels import tensorflow as tf_kernels  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import model_shapes  # noqa: E402


class _NoRetracingWarning(logging.Filter):
    """Drops TensorFlow's warning that a step function "triggered
    tf.function retracing": every optimizer gets its own `tf.function` of
    the same Python code, traced once, on purpose."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


tf.get_logger().addFilter(_NoRetracingWarning())

OPTIMIZERS = {name: (lambda name=name: harness.build_optimizer(name))
              for name in harness.OPTIMIZER_NAMES}
MIRRORED_OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "sm3", "sm3_portable",
                       "sm3_no_momentum")


# ------------------------------------------------------------ variable sets

VARIABLE_SETS = {
    name: (lambda fn=fn: [shape for _, shape in fn()])
    for name, fn in model_shapes.MODELS.items()
}


def kernel_unavailable():
    """None where `SM3()` takes its CPU kernel in this process, else why not
    (`sm3_tf.kernels.native`; the physical devices are listed, so that the
    logical ones are still unset for `--mirrored`)."""
    if (tf.config.list_physical_devices("GPU")
            or tf.config.list_physical_devices("TPU")):
        return "the process has a GPU or TPU (the kernel is for CPUs)"
    return native.build("tensorflow")


def make_problem(shapes, seed=0):
    values, grads = harness.draw_problem(shapes, seed)
    return ([keras.Variable(v, name=f"v{i}") for i, v in enumerate(values)],
            [tf.constant(g) for g in grads])


def _wait(result):
    """Blocks until a step's result (its iteration counter) is computed."""
    result.numpy()


def step_function(optimizer, variables, grads, jit_compile):
    optimizer.build(variables)

    @tf.function(jit_compile=jit_compile)
    def step():
        optimizer.apply(grads, variables)
        return optimizer.iterations

    return step


def bench_dense(models, xla_modes, rounds, optimizers, cap_dims=None):
    results = {}
    for model in models:
        shapes = VARIABLE_SETS[model]()
        if cap_dims:
            shapes = harness.cap_shapes(shapes, cap_dims)
            model = f"{model} (every axis cut to <= {cap_dims})"
        params = sum(int(np.prod(s)) for s in shapes)
        print(f"\n== {model}: {len(shapes)} variables, {params / 1e6:.4g} M "
              "parameters", flush=True)
        variables, grads = make_problem(shapes)
        for jit in xla_modes:
            label = f"{model}, {'XLA' if jit else 'no XLA'}"
            steps = {}
            for name in optimizers:
                start = time.perf_counter()
                steps[name] = step_function(OPTIMIZERS[name](), variables,
                                            grads, jit)
                steps[name]().numpy()  # trace and compile
                print(f"  compiled {name} in "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
            med = harness.time_interleaved(steps, rounds, _wait)
            harness.report_ratios(label, med, jit, targets=not cap_dims)
            results[label] = med
            del steps
    return results


def _statistics(settings, gradient, slots, after):
    """`rule.dense_step` as `portable.dense_update` computes it."""
    accumulators = [ops.convert_to_tensor(a) for a in slots.accumulators]
    accumulators[0] = kernels.gate(accumulators[0], after)
    return rule.dense_step(ops.cast(gradient, accumulators[0].dtype),
                           accumulators, settings.beta2, settings.epsilon)


def update_only(settings, gradient, variable, slots, learning_rate,
                after=None):
    """`portable.dense_update` but for writing the new accumulators."""
    update, _ = _statistics(settings, gradient, slots, after)
    return kernels.token(portable.apply_update(
        settings, variable, slots.momentum, update, learning_rate))


def statistics_only(settings, gradient, variable, slots, learning_rate,
                    after=None):
    """`portable.dense_update` but for writing the variable and momentum."""
    _, accumulators = _statistics(settings, gradient, slots, after)
    for slot, value in zip(slots.accumulators, accumulators):
        slot.assign(value)
    return kernels.token(accumulators)


class SM3Part(sm3_tf.SM3):
    """SM3's portable step doing one part only (`--breakdown`): each
    variable's step is `update_only` or `statistics_only` instead of
    `portable.dense_update`, placed and chained as SM3 places and chains
    that (`sm3_tf.kernels.tensorflow.run`)."""

    def __init__(self, part, **kwargs):
        super().__init__(cpu_kernel=False, **kwargs)
        self.part_step = {"update": update_only,
                          "statistics": statistics_only}[part]

    def update_step(self, gradient, variable, learning_rate):
        accumulators = self.accumulators_for(variable)
        if accumulators:
            # `_settings` and `_order`: SM3's own, so the step is chained
            # exactly as the whole step is.
            tf_kernels.run(self.part_step, self._settings, gradient, variable,
                           kernels.Slots(accumulators,
                                         self.momentum_for(variable)),
                           learning_rate, self._order)


def bench_breakdown(models, xla_modes, rounds):
    results = {}
    for model in models:
        variables, grads = make_problem(VARIABLE_SETS[model]())
        for jit in xla_modes:
            steps = {name: step_function(OPTIMIZERS[name](), variables,
                                         grads, jit)
                     for name in ("sgd", "sgd_momentum", "sm3_no_momentum",
                                  "sm3", "sm3_portable_no_momentum",
                                  "sm3_portable")}
            for momentum in (0.0, 0.9):
                suffix = "" if momentum else "_no_momentum"
                for part in ("update", "statistics"):
                    steps[f"sm3_portable{suffix} {part} only"] = step_function(
                        SM3Part(part, learning_rate=1e-4, momentum=momentum),
                        variables, grads, jit)
            med = harness.time_interleaved(steps, rounds, _wait)
            label = f"{model}, {'XLA' if jit else 'no XLA'}"
            harness.print_medians(
                f"{label}: where SM3's step goes, median ms", med)
            results[label] = med
            del steps
    return results


def _apply_fn(optimizer, variable, grad):
    def step():
        optimizer.apply([grad], [variable])
        return optimizer.iterations

    return step


def bench_sparse(rounds, rows=1_000_000, dim=64, touched=4096):
    rng = np.random.default_rng(0)
    # Zipf-like ids: many repeats, as real token batches have.
    ids = np.minimum(rng.zipf(1.2, size=touched) - 1, rows - 1).astype(np.int32)
    values = tf.constant(rng.standard_normal((touched, dim), dtype=np.float32))
    slices = tf.IndexedSlices(values, tf.constant(ids),
                              tf.constant([rows, dim]))
    dense = tf.convert_to_tensor(slices)
    print(f"\n== sparse: embedding {rows} x {dim}, {touched} ids, "
          f"{len(np.unique(ids))} distinct", flush=True)
    results = {}
    for jit in (False, True):
        steps = {}
        for kind, grad, kernel in (("sparse", slices, "auto"),
                                   ("dense", dense, "auto"),
                                   ("dense_portable", dense, False)):
            var = keras.Variable(np.zeros((rows, dim), np.float32))
            opt = sm3_tf.SM3(1e-3, momentum=0.0, cpu_kernel=kernel)
            opt.build([var])

            steps[kind] = tf.function(_apply_fn(opt, var, grad),
                                      jit_compile=jit)
        med = harness.time_interleaved(steps, rounds, _wait)
        label = f"sparse, {'XLA' if jit else 'no XLA'}"
        print(f"{label}: sparse {1000 * med['sparse']:.2f} ms, dense "
              f"{1000 * med['dense']:.2f} ms (portable path "
              f"{1000 * med['dense_portable']:.2f}), ratio "
              f"{med['sparse'] / med['dense']:.3f}x (target <= 0.1; "
              f"{med['sparse'] / med['dense_portable']:.3f}x the portable)")
        results[label] = med
    return results


# ------------------------------------------------------------ model.fit


def bench_fit(rounds, jit_modes, steps_per_round=20, batch_size=32,
              length=32, vocab=8000, model_name="transformer"):
    """`model.fit` steps/s: SM3 (its default, and its portable path) against
    Adam; each epoch is `steps_per_round` steps. `model_name`: a small
    Transformer (activations dominate), or "mlp", 8 Dense layers of 2048 at
    batch 8 (the parameters dominate: the optimizer's share is largest)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    from models.transformer import model as transformer

    rng = np.random.default_rng(0)
    if model_name == "mlp":
        batch_size, width = 8, 2048
        x = rng.normal(size=(batch_size * steps_per_round, width))
        data = tf.data.Dataset.from_tensor_slices(
            (x.astype("float32"), x.astype("float32"))).batch(
                batch_size, drop_remainder=True).cache()

        def make_model():
            return keras.Sequential(
                [keras.Input((width,))]
                + [keras.layers.Dense(width, activation="tanh")
                   for _ in range(8)])

        loss = "mse"
    else:
        params = transformer.TransformerParams(
            d_model=256, d_ff=1024, num_heads=4, num_layers=2, dropout=0.0)
        src = rng.integers(2, vocab, (batch_size * steps_per_round, length))
        tgt = rng.integers(2, vocab, (batch_size * steps_per_round, length))
        data = tf.data.Dataset.from_tensor_slices(
            ((src.astype("int32"), transformer.shift_right(tgt).numpy()),
             tgt.astype("int32"))).batch(batch_size,
                                         drop_remainder=True).cache()

        def make_model():
            return transformer.Transformer(params, vocab, length)

        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # With tf.data's autotuning on, destroying the iterator at the end of
    # some `fit` calls waited until about 10 s after the call began (seen
    # with TF 2.21 on this machine, Adam and SGD alike): epochs measured at
    # exactly 1.96 steps/s or at the true rate, at random. Off, every epoch
    # runs at the step rate; there is nothing here for it to tune.
    options = tf.data.Options()
    options.autotune.enabled = False
    data = data.with_options(options)
    results = {}
    for jit in jit_modes:
        models = {}
        for name in ("sm3", "sm3_portable", "adam"):
            keras.utils.set_random_seed(0)
            model = make_model()
            model.compile(optimizer=OPTIMIZERS[name](), loss=loss,
                          jit_compile=jit)
            model.fit(data, epochs=1, verbose=0)  # trace and compile
            models[name] = model
        times = {name: [] for name in models}
        for r in range(rounds):
            names = list(models)
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                models[name].fit(data, epochs=1, verbose=0)
                times[name].append(time.perf_counter() - start)
        rate = {name: steps_per_round / statistics.median(t)
                for name, t in times.items()}
        best = {name: steps_per_round / min(t) for name, t in times.items()}
        described = ("MLP 8 x 2048, batch 8" if model_name == "mlp"
                     else "small Transformer")
        label = f"fit, {described}, {'XLA' if jit else 'no XLA'}"
        print(f"\n{label}: steps/s, median (best) of {rounds} epochs:",
              ", ".join(f"{name} {rate[name]:.2f} ({best[name]:.2f})"
                        for name in models), flush=True)
        for name in ("sm3", "sm3_portable"):
            print(f"  {name} / adam: {rate[name] / rate['adam']:.2f} "
                  f"({best[name] / best['adam']:.2f}) (target >= 1)",
                  flush=True)
        print(f"  sm3 / sm3_portable: "
              f"{rate['sm3'] / rate['sm3_portable']:.2f} "
              f"({best['sm3'] / best['sm3_portable']:.2f}) (what the CPU "
              "kernel brings to a fit step; 1.00 where sm3 runs portably)",
              flush=True)
        results[label] = {"median": rate, "best": best}
    return results


# ------------------------------------------------------------ mirrored


def split_cpu(devices=2):
    """Splits the CPU into `devices` logical devices: before TensorFlow
    initializes its devices (anything that runs an op does)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * devices)


def mirrored_step(strategy, optimizer, variables, grads):
    """A step that applies each replica's `grads` (a per-replica tuple) with
    `apply_gradients` (which sums them across replicas), in a plain
    `tf.function`: no whole-step XLA."""

    def replica_step(replica_grads):
        optimizer.apply_gradients(zip(replica_grads, variables))

    @tf.function
    def step(grads):
        strategy.run(replica_step, args=(grads,))
        return tf.identity(optimizer.iterations)

    return lambda: step(grads)


def bench_mirrored(rounds, optimizers, size=2048, replicas=2):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < replicas:
        raise RuntimeError(
            f"--mirrored needs {replicas} logical CPU devices, TensorFlow "
            f"has {devices}: it initialized its devices before split_cpu")
    strategy = tf.distribute.MirroredStrategy(
        devices[:replicas],
        cross_device_ops=tf.distribute.ReductionToOneDevice())
    shapes = [(size, size)] * 6 + [(size,)] * 6
    values, _ = harness.draw_problem(shapes, seed=0)
    replica_grads = [harness.draw_problem(shapes, seed=1 + r)[1]
                     for r in range(replicas)]
    with strategy.scope():
        variables = [keras.Variable(v, name=f"v{i}")
                     for i, v in enumerate(values)]
    # Each replica's gradients made on its own device.
    grads = strategy.experimental_distribute_values_from_function(
        lambda context: tuple(tf.constant(g) for g in replica_grads[
            context.replica_id_in_sync_group]))
    params = sum(int(np.prod(s)) for s in shapes)
    label = (f"mirrored, {replicas} CPU replicas, 6 x ({size}, {size}) + "
             f"6 x ({size},), tf.function without XLA")
    print(f"\n== {label}: {params / 1e6:.4g} M parameters per replica",
          flush=True)
    steps = {}
    for name in optimizers:
        start = time.perf_counter()
        with strategy.scope():
            optimizer = OPTIMIZERS[name]()
            optimizer.build(variables)
        steps[name] = mirrored_step(strategy, optimizer, variables, grads)
        steps[name]().numpy()  # trace and compile
        print(f"  compiled {name} in {time.perf_counter() - start:.1f} s",
              flush=True)
    med = harness.time_interleaved(steps, rounds, _wait)
    harness.print_medians(f"{label}: median step time (ms)", med)
    for a, b in (("sm3", "adam"), ("sm3", "sgd_momentum"),
                 ("sm3_portable", "adam"), ("sm3_portable", "sgd_momentum"),
                 ("sm3_no_momentum", "sgd")):
        if a in med and b in med:
            # Issue 17 item 7: SM3 at or under Adam (at the full size).
            target = ("  (target <= 1)" if b == "adam" and size == 2048
                      else "")
            print(f"  {a} / {b}: {med[a] / med[b]:.2f}x{target}")
    return {label: med}


# ------------------------------------------------------------ peak memory


def peak_memory_child(name, shape, jit):
    """Runs in a fresh process: prints how far the steps raise the peak RSS.

    Measured from the moment the variable, its gradient and the optimizer's
    state exist (so the state itself is not counted) over five steps, the
    first of which also traces and compiles.
    """
    variables, grads = make_problem([shape])
    step = step_function(OPTIMIZERS[name](), variables, grads, jit)
    before = harness.status_kib("VmRSS")
    harness.reset_peak_rss()
    for _ in range(5):
        step().numpy()
    peak = harness.status_kib("VmHWM")
    print(json.dumps({"step_peak_bytes": (peak - before) * 1024}))


def bench_peak_memory(shape, xla_modes, optimizers, repeats=3):
    """Temporaries of each optimizer's step, above plain SGD's.

    Each measurement runs in a fresh process; SGD's own rise (tracing,
    compiling, the runtime's buffers) is the baseline subtracted, so what is
    left is what the optimizer's update allocates beyond SGD's.
    """
    var_bytes = int(np.prod(shape)) * 4
    print(f"\n== peak memory of the step on a {shape} variable "
          f"({var_bytes / 2**20:.0f} MiB): the rise of VmHWM over five steps "
          "(state already allocated), above SGD's rise; min of "
          f"{repeats} fresh processes, spread in brackets", flush=True)
    names = ["sgd"] + [n for n in optimizers if n != "sgd"]
    results = {}
    for jit in xla_modes:
        rises = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:
                out = subprocess.run(
                    [sys.executable, __file__, "--_peak_child", name,
                     "--_shape", ",".join(map(str, shape)),
                     "--xla", "on" if jit else "off"],
                    capture_output=True, text=True, check=True)
                rises[name].append(json.loads(
                    out.stdout.strip().splitlines()[-1])["step_peak_bytes"])
        base = min(rises["sgd"])
        for name in names:
            temp = min(rises[name]) - base
            spread = max(rises[name]) - min(rises[name])
            label = f"{name}, {'XLA' if jit else 'no XLA'}"
            print(f"  {label:28s} {temp / 2**20:8.1f} MiB "
                  f"({temp / var_bytes:5.2f}x the variable) "
                  f"[{spread / 2**20:.1f} MiB]", flush=True)
            results[label] = {"temporary_bytes": temp, "spread_bytes": spread,
                              "variable_bytes": var_bytes}
    return results


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Modes combine (the dense tables run unless --no_dense), but "
        "for --mirrored, which runs on its own.")
    parser.add_argument("--models",
                        help="variable sets, comma-separated, from: "
                        + ", ".join(VARIABLE_SETS)
                        + " (default: resnet50,transformer_big)")
    parser.add_argument("--optimizers",
                        help="comma-separated, from: " + ", ".join(OPTIMIZERS)
                        + " (default: all; with --mirrored: "
                        + ", ".join(MIRRORED_OPTIMIZERS) + ")")
    parser.add_argument("--xla", choices=["both", "on", "off"], default=None,
                        help="compile the step whole with XLA, or not, or "
                        "both (default both)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds; the median is reported")
    parser.add_argument("--sparse", action="store_true",
                        help="SM3's sparse step on a 1M x 64 embedding")
    parser.add_argument("--peak_memory", action="store_true",
                        help="the step's temporaries above SGD's, in fresh "
                        "processes")
    parser.add_argument("--fit", action="store_true",
                        help="model.fit steps/s on a small Transformer: "
                        "sm3, sm3_portable, adam")
    parser.add_argument("--fit_model", choices=("transformer", "mlp"),
                        default="transformer",
                        help="--fit's model: a small Transformer, or 8 Dense "
                        "layers of 2048 at batch 8 (parameters dominate)")
    parser.add_argument("--fit_steps", type=int,
                        help="--fit: steps per timed epoch (default 20)")
    parser.add_argument("--breakdown", action="store_true",
                        help="time SM3's update and statistics apart (with "
                        "--no_dense)")
    parser.add_argument("--no_dense", action="store_true",
                        help="skip the dense step-time tables")
    parser.add_argument("--cap_dims", type=int,
                        help="cut every axis to at most this many entries: "
                        "the step's fixed cost per kernel, without the data")
    parser.add_argument("--mirrored", action="store_true",
                        help="MirroredStrategy over 2 logical CPU devices, "
                        "plain tf.function (runs on its own)")
    parser.add_argument("--mirrored_size", type=int,
                        help="--mirrored: the matrices' and vectors' size "
                        "(default 2048)")
    parser.add_argument("--json", help="write all medians to this file")
    parser.add_argument("--_peak_child", help=argparse.SUPPRESS)
    parser.add_argument("--_shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: must be >= 1, got {args.rounds}")
    if args.mirrored:
        # Before anything initializes TensorFlow's devices.
        split_cpu()
        others = [flag for flag, given in (
            ("--sparse", args.sparse), ("--peak_memory", args.peak_memory),
            ("--fit", args.fit), ("--breakdown", args.breakdown),
            ("--cap_dims", args.cap_dims is not None),
            ("--xla", args.xla is not None),
            ("--models", args.models is not None)) if given]
        if others:
            parser.error(f"--mirrored runs on its own (2 logical CPU devices "
                         f"would change every other table); drop "
                         f"{', '.join(others)} or run them as another command")
        if args.mirrored_size is not None and args.mirrored_size < 1:
            parser.error(
                f"--mirrored_size: must be >= 1, got {args.mirrored_size}")
    elif args.mirrored_size is not None:
        parser.error("--mirrored_size applies to --mirrored only")
    xla_modes = {"both": [True, False], "on": [True], "off": [False]}[
        args.xla or "both"]
    optimizers = (args.optimizers.split(",") if args.optimizers else list(
        MIRRORED_OPTIMIZERS if args.mirrored else OPTIMIZERS))
    harness.check_names(parser, "--optimizers", optimizers, OPTIMIZERS)
    if args._peak_child:
        shape = tuple(int(s) for s in args._shape.split(","))
        peak_memory_child(args._peak_child, shape, xla_modes[0])
        return
    if args.breakdown and not args.no_dense:
        # Measured: deleting a variable set and its optimizers does not give
        # the memory back in this process, and the dense tables and the
        # breakdown together held more than 24 GiB on Transformer-Big.
        parser.error("--breakdown runs without the dense tables: add "
                     "--no_dense, or run it as its own command")
    if args.cap_dims is not None and args.cap_dims < 1:
        parser.error(f"--cap_dims: must be >= 1, got {args.cap_dims}")
    if args.cap_dims and args.no_dense:
        parser.error("--cap_dims applies to the dense tables, which "
                     "--no_dense skips")
    if args.fit_steps is not None and not args.fit:
        parser.error("--fit_steps applies to --fit only")
    if args.fit_steps is not None and args.fit_steps < 1:
        parser.error(f"--fit_steps: must be >= 1, got {args.fit_steps}")
    models = [m for m in (args.models or "resnet50,transformer_big"
                          ).split(",") if m]
    harness.check_names(parser, "--models", models, VARIABLE_SETS)
    harness.say_sm3_path(kernel_unavailable())
    results = {}
    if args.mirrored:
        results["mirrored"] = bench_mirrored(
            args.rounds, optimizers, args.mirrored_size or 2048)
    elif not args.no_dense:
        results["dense"] = bench_dense(models, xla_modes, args.rounds,
                                       optimizers, args.cap_dims)
    if args.breakdown:
        results["breakdown"] = bench_breakdown(models, xla_modes, args.rounds)
    if args.sparse:
        results["sparse"] = bench_sparse(args.rounds)
    if args.fit:
        results["fit"] = bench_fit(args.rounds, xla_modes,
                                   args.fit_steps or 20,
                                   model_name=args.fit_model)
    if args.peak_memory:
        results["peak_memory"] = bench_peak_memory((32000, 1024), xla_modes,
                                                   optimizers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
