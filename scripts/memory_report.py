"""Optimizer memory: counted state per optimizer, and measured training peaks.

    python scripts/memory_report.py --model=transformer_big [--json]
    python scripts/memory_report.py --model=resnet50 --measure [--batch_size=8]

Counting (default): from the model's variable shapes (`sm3_tf.memory`), the
state bytes each optimizer keeps, in total, per kind of variable (embeddings,
dense kernels, conv kernels, vectors) and as a share of the parameters.

`--measure`: trains the real model per optimizer, each in its own fresh
process, and reads Linux's resident-memory counters. After `--steps` steps
(tracing and compiling done) freed memory is handed back (`malloc_trim`), the
peak counter (VmHWM) is reset, and `--steps` more steps run: that peak is the
steady working set, which holds the optimizer's state *and* the temporaries
its update keeps (TensorFlow's allocator reuses them from step to step). The
figure reported is that working set above plain SGD's (same model, data and
batch); the first steps' peak, which also counts the compilers' memory, is
shown beside it. Each measurement is repeated (`--repeats`), interleaved, and
the spread shown.

With `--measure`, the activation memory per example is measured too (SGD at
two batch sizes), and the largest batch each optimizer leaves room for in
`--budget_gib` is computed: (budget - SGD's fixed memory - the optimizer's
extra) / activation bytes per example.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import harness  # noqa: E402
import model_shapes  # noqa: E402

MiB = 2**20
MEASURABLE = ("resnet50", "transformer_base", "transformer_big", "mlp")


def count(model, optimizers):
    from sm3_tf import memory

    named = model_shapes.MODELS[model]()
    variables = [(name, shape, "float32") for name, shape in named]
    return memory.state_report(variables, optimizers)


def print_counts(model, report):
    params = report["parameters"]
    print(f"{model}: {params['count'] / 1e6:.1f} M parameters, "
          f"{params['bytes'] / MiB:.1f} MiB (float32)")
    kinds = sorted(params["by_kind"])
    header = f"{'optimizer':36s} {'state MiB':>10s} {'x params':>9s}  " + "  ".join(
        f"{k:>14s}" for k in kinds)
    print(header)
    print(f"{'(parameters)':36s} {params['bytes'] / MiB:10.1f} {1.0:9.3f}  "
          + "  ".join(f"{params['by_kind'][k] / MiB:14.2f}" for k in kinds))
    for name, row in report["optimizers"].items():
        print(f"{row['label']:36s} {row['state_bytes'] / MiB:10.2f} "
              f"{row['ratio_to_parameters']:9.4f}  "
              + "  ".join(f"{row['state_by_kind'].get(k, 0) / MiB:14.3f}"
                          for k in kinds))


# ------------------------------------------------------------------ measuring


def _model_and_batch(model, batch_size):
    import keras
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    if model == "resnet50":
        net = keras.applications.ResNet50(weights=None)
        x = tf.constant(rng.random((batch_size, 224, 224, 3), np.float32))
        y = tf.constant(rng.integers(0, 1000, batch_size))
        loss = keras.losses.SparseCategoricalCrossentropy()
        return net, lambda: loss(y, net(x, training=True))
    if model == "mlp":
        widths = (784, 4096, 4096, 4096, 10)
        net = keras.Sequential([keras.Input((widths[0],))] + [
            keras.layers.Dense(w, activation="relu") for w in widths[1:-1]
        ] + [keras.layers.Dense(widths[-1])])
        x = tf.constant(rng.random((batch_size, widths[0]), np.float32))
        y = tf.constant(rng.integers(0, 10, batch_size))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return net, lambda: loss(y, net(x, training=True))
    from models.transformer import model as transformer

    config = {"transformer_base": "base", "transformer_big": "big"}[model]
    vocab, length = 32000, 64
    net = transformer.Transformer(transformer.CONFIGS[config], vocab, length)
    src = tf.constant(rng.integers(1, vocab, (batch_size, length)), tf.int32)
    tgt = tf.constant(rng.integers(1, vocab, (batch_size, length)), tf.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return net, lambda: loss(tgt, net((src, transformer.shift_right(tgt)),
                                      training=True))


def measure_child(model, optimizer_name, batch_size, steps, jit_compile):
    """In a fresh process: train `steps` steps, print the peak RSS in bytes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    net, loss_fn = _model_and_batch(model, batch_size)
    # memory_report names Keras's Adafactor as sm3_tf.memory does.
    optimizer = harness.build_optimizer(
        {"adafactor_keras": "adafactor"}.get(optimizer_name, optimizer_name),
        learning_rate=1e-3)

    @tf.function(jit_compile=jit_compile)
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return loss

    for _ in range(steps):
        train_step().numpy()
    peak = harness.status_kib("VmHWM") * 1024
    # The steady working set: what the process holds once tracing and
    # compiling are over and freed memory is handed back (the first steps'
    # peak also counts the compilers' own memory), then the peak of more
    # steps on top of it.
    harness.reset_peak_rss(release_free_memory=True)
    for _ in range(steps):
        train_step().numpy()
    print(json.dumps({"peak_bytes": peak,
                      "steady_bytes": harness.status_kib("VmHWM") * 1024}))


def _run_child(model, optimizer, batch_size, steps, jit_compile):
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_child",
         f"--model={model}", f"--_optimizer={optimizer}",
         f"--batch_size={batch_size}", f"--steps={steps}",
         f"--jit_compile={jit_compile}"],
        capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {optimizer} on {model} failed:\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(model, optimizers, batch_size, steps, repeats, budget_gib,
            jit_compile):
    names = ["sgd"] + [o for o in optimizers if o != "sgd"]
    runs = {name: [] for name in names}
    for r in range(repeats):
        for name in names:  # interleaved: drift hits every optimizer alike
            runs[name].append(_run_child(model, name, batch_size, steps,
                                         jit_compile))
            print(f"  measured {name} (repeat {r + 1}/{repeats}): "
                  f"{runs[name][-1]['steady_bytes'] / MiB:.0f} MiB steady, "
                  f"{runs[name][-1]['peak_bytes'] / MiB:.0f} MiB first-steps "
                  "peak", flush=True)
    small = max(1, batch_size // 2)
    sgd_small = [_run_child(model, "sgd", small, steps, jit_compile)[
        "steady_bytes"]
                 for _ in range(repeats)]
    base = min(r["steady_bytes"] for r in runs["sgd"])
    base_peak = min(r["peak_bytes"] for r in runs["sgd"])
    per_example = ((base - min(sgd_small)) / (batch_size - small)
                   if batch_size > small else None)
    if per_example is not None and per_example <= 0:
        per_example = None  # lost in the noise: no batch estimate
    fixed = base - (per_example or 0) * batch_size
    result = {"batch_size": batch_size, "steps": steps,
              "jit_compile": jit_compile,
              "sgd_steady_bytes": base, "sgd_peak_bytes": base_peak,
              "activation_bytes_per_example": per_example,
              "budget_bytes": budget_gib * 2**30, "optimizers": {}}
    for name in names:
        steady = [r["steady_bytes"] - base for r in runs[name]]
        row = {"extra_steady_bytes": min(steady),
               "spread_bytes": max(steady) - min(steady),
               "extra_first_steps_peak_bytes":
                   min(r["peak_bytes"] for r in runs[name]) - base_peak}
        if per_example:
            room = budget_gib * 2**30 - fixed - max(row["extra_steady_bytes"], 0)
            row["largest_batch"] = int(room // per_example)
        result["optimizers"][name] = row
    return result


def print_measured(model, counted, measured):
    print(f"\n{model}: measured memory above plain SGD, batch "
          f"{measured['batch_size']}, jit_compile={measured['jit_compile']}; "
          "SGD's steady working set "
          f"{measured['sgd_steady_bytes'] / MiB:.0f} MiB")
    per_example = measured["activation_bytes_per_example"]
    if per_example:
        print(f"activations: {per_example / MiB:.1f} MiB per example; "
              f"largest batch in {measured['budget_bytes'] / 2**30:.0f} GiB")
    print(f"{'optimizer':36s} {'steady MiB':>11s} {'spread':>7s} "
          f"{'1st-steps peak':>15s} {'counted state':>14s} "
          f"{'largest batch':>14s}")
    for name, row in measured["optimizers"].items():
        state = counted["optimizers"].get(name, {}).get("state_bytes", 0)
        label = counted["optimizers"].get(name, {}).get("label", name)
        print(f"{label:36s} {row['extra_steady_bytes'] / MiB:11.1f} "
              f"{row['spread_bytes'] / MiB:7.1f} "
              f"{row['extra_first_steps_peak_bytes'] / MiB:15.1f} "
              f"{state / MiB:14.1f} {row.get('largest_batch', '-'):>14}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="transformer_big",
                        help=f"one of {', '.join(model_shapes.MODELS)}")
    parser.add_argument("--optimizers",
                        default="sm3,sm3_no_momentum,adam,adagrad,"
                                "sgd_momentum,adafactor_keras,"
                                "adafactor_factored")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON")
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget_gib", type=float, default=16.0)
    parser.add_argument("--jit_compile", choices=("true", "false"),
                        default="false",
                        help="compile each training step whole with XLA")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_optimizer", help=argparse.SUPPRESS)
    args = parser.parse_args()

    harness.check_names(parser, "--model", [args.model], model_shapes.MODELS)
    if args._child:
        measure_child(args.model, args._optimizer, args.batch_size,
                      args.steps, args.jit_compile == "true")
        return
    from sm3_tf import memory

    optimizers = [o for o in args.optimizers.split(",") if o]
    harness.check_names(parser, "--optimizers", optimizers,
                        memory.STATE_RULES)
    for flag in ("batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    counted = count(args.model, optimizers)
    output = {"model": args.model, "counted": counted}
    if not args.json:
        print_counts(args.model, counted)
    if args.measure:
        if args.model not in MEASURABLE:
            parser.error(f"--measure supports --model in {MEASURABLE}")
        measurable = [o for o in optimizers if o != "adafactor_factored"]
        output["measured"] = measure(args.model, measurable, args.batch_size,
                                     args.steps, args.repeats, args.budget_gib,
                                     args.jit_compile)
        if not args.json:
            print_measured(args.model, counted, output["measured"])
    if args.json:
        for row in counted["optimizers"].values():
            row.pop("per_variable")
        print(json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
