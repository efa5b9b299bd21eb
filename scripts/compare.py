"""SM3 against Adam, Adagrad, Adafactor and SGD+momentum, each with an LR sweep.

    python scripts/compare.py --model=resnet --out=/tmp/compare_resnet
    python scripts/compare.py --model=transformer --out=/tmp/compare_tf
    python scripts/compare.py --model=mlp --out=/tmp/compare_mlp

Same model, data and steps for every optimizer; each optimizer runs at its
default peak learning rate times each of `--lr_factors`, in its own process:

- resnet, transformer: the reference trainer (`scripts/train.py`) on its
  offline default data (digits; the pydoc_reverse translation task) unless
  `--dataset` / `--data_dir` say otherwise;
- mlp: a feed-forward net (two hidden layers of 512) on flattened digits.

Writes `OUT/results.json` (per optimizer: best learning rate, final and best
loss, quality metric, step time, optimizer-state bytes), `OUT/results.md`
(the same as a Markdown table), `OUT/loss_curves.png` (each optimizer at its
best rate) and `OUT/lr_sweep.png` (final loss against learning rate).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import harness  # scripts/, beside this file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

OPTIMIZERS = ("sm3", "adam", "adagrad", "adafactor", "sgd")
LABELS = {"sm3": "SM3", "adam": "Adam", "adagrad": "Adagrad",
          "adafactor": "Adafactor (Keras)", "sgd": "SGD + momentum"}
# sm3_tf.memory names of what each trainer optimizer keeps.
STATE_RULE = {"sm3": "sm3", "adam": "adam", "adagrad": "adagrad",
              "adafactor": "adafactor_keras", "sgd": "sgd_momentum"}
QUALITY = {"resnet": "eval_accuracy", "transformer": "eval_bleu",
           "mlp": "eval_accuracy"}
DEFAULT_STEPS = {"resnet": 200, "transformer": 300, "mlp": 300}
MLP_LEARNING_RATE = {"sm3": 0.1, "adam": 1e-3, "adagrad": 0.1,
                     "adafactor": 1e-3, "sgd": 0.1}


def default_learning_rate(model, optimizer):
    if model == "mlp":
        return MLP_LEARNING_RATE[optimizer]
    from models import train_lib

    return train_lib.DEFAULT_LEARNING_RATE[(model, optimizer)]


# ------------------------------------------------------------ one run


def run_trainer(args, optimizer, lr, run_dir):
    cmd = [sys.executable, os.path.join(HERE, "train.py"),
           f"--model={args.model}", f"--optimizer={optimizer}",
           f"--learning_rate={lr}", f"--train_steps={args.train_steps}",
           f"--model_dir={run_dir}", f"--steps_per_loop={args.log_every}",
           f"--seed={args.seed}", "--checkpoint_every=1000000"]
    if args.model == "transformer":
        cmd.append("--beam_size=1")
    if args.dataset:
        cmd.append(f"--dataset={args.dataset}")
    if args.data_dir:
        cmd.append(f"--data_dir={args.data_dir}")
    return _run(cmd, args)


def _run(cmd, args):
    """Runs one training process; returns None, or what went wrong."""
    if args.batch_size:
        cmd = cmd + [f"--batch_size={args.batch_size}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"
    return None


def run_mlp_child(args):
    """Trains the feed-forward net; writes metrics.jsonl like the trainer."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    from sklearn.datasets import load_digits

    from models.common import optimizers as trainer_optimizers

    keras.utils.set_random_seed(args.seed)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10),
    ])
    optimizer = trainer_optimizers.build_optimizer(
        args._optimizer, args._lr, args.train_steps,
        warmup_steps=int(0.05 * args.train_steps))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), metrics=["accuracy"])
    batch = args.batch_size or 64
    rng = np.random.default_rng(args.seed)
    os.makedirs(args._run_dir, exist_ok=True)
    with open(os.path.join(args._run_dir, "metrics.jsonl"), "w") as log:
        step, losses, start = 0, [], time.perf_counter()
        while step < args.train_steps:
            idx = rng.integers(0, split, batch)
            losses.append(float(model.train_on_batch(x[idx], y[idx])[0]))
            step += 1
            if step % args.log_every == 0 or step == args.train_steps:
                elapsed = time.perf_counter() - start
                row = {"step": step, "loss": float(np.mean(losses)),
                       "step_time_ms": 1000 * elapsed / len(losses)}
                if step == args.train_steps:
                    _, accuracy = model.evaluate(x[split:], y[split:],
                                                 verbose=0)
                    row["eval_accuracy"] = float(accuracy)
                log.write(json.dumps(row) + "\n")
                losses, start = [], time.perf_counter()
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    with open(os.path.join(args._run_dir, "shapes.json"), "w") as f:
        json.dump(shapes, f)


def run_mlp(args, optimizer, lr, run_dir):
    cmd = [sys.executable, os.path.abspath(__file__), "--model=mlp",
           "--_child", f"--_optimizer={optimizer}", f"--_lr={lr}",
           f"--_run_dir={run_dir}", f"--train_steps={args.train_steps}",
           f"--log_every={args.log_every}", f"--seed={args.seed}"]
    return _run(cmd, args)


def read_run(run_dir):
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rows.append(json.loads(line))
    return rows


def trainable_shapes(run_dir):
    """The trainable variables' shapes, from the run's checkpoint (trainer
    runs) or from shapes.json (mlp runs)."""
    path = os.path.join(run_dir, "shapes.json")
    if os.path.exists(path):
        with open(path) as f:
            return [tuple(s) for s in json.load(f)]
    import tensorflow as tf

    prefix = "optimizer/_trainable_variables/"
    found = []
    for name, shape in tf.train.list_variables(run_dir):
        if name.startswith(prefix):
            found.append((int(name[len(prefix):].split("/")[0]), tuple(shape)))
    return [shape for _, shape in sorted(found)]


# ------------------------------------------------------------ the sweep


def summarize(model, optimizer, runs, shapes):
    from sm3_tf import memory

    quality_key = QUALITY[model]
    finished = {lr: rows for lr, rows in runs.items() if rows}
    if not finished:
        return {"label": LABELS[optimizer], "error": "every run failed"}

    def final_loss(rows):
        loss = rows[-1]["loss"]
        return loss if math.isfinite(loss) else float("inf")

    best_lr = min(finished, key=lambda lr: final_loss(finished[lr]))
    rows = finished[best_lr]
    report = memory.state_report([(f"v{i}", s, "float32")
                                  for i, s in enumerate(shapes)],
                                 [STATE_RULE[optimizer]])
    step_times = [r["step_time_ms"] for r in rows[1:] if "step_time_ms" in r]
    return {
        "label": LABELS[optimizer],
        "best_learning_rate": best_lr,
        "final_loss": rows[-1]["loss"],
        "best_loss": min(r["loss"] for r in rows),
        "quality_metric": quality_key,
        "quality": rows[-1].get(quality_key),
        "step_time_ms": (sorted(step_times)[len(step_times) // 2]
                         if step_times else None),
        "state_bytes": report["optimizers"][STATE_RULE[optimizer]][
            "state_bytes"],
        "parameter_bytes": report["parameters"]["bytes"],
        "sweep": {str(lr): (final_loss(r) if r else None)
                  for lr, r in runs.items()},
        "curve": [[r["step"], r["loss"]] for r in rows],
    }


def write_outputs(args, results):
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"model": args.model, "train_steps": args.train_steps,
                   "lr_factors": args.lr_factors, "optimizers": results},
                  f, indent=2)
    lines = [f"| optimizer | best lr | final loss | best loss | "
             f"{QUALITY[args.model]} | step ms | state MiB |",
             "|---|---|---|---|---|---|---|"]
    for res in results.values():
        if "error" in res:
            lines.append(f"| {res['label']} | {res['error']} | | | | | |")
            continue
        quality = "-" if res["quality"] is None else f"{res['quality']:.4f}"
        step = "-" if res["step_time_ms"] is None else \
            f"{res['step_time_ms']:.1f}"
        lines.append(
            f"| {res['label']} | {res['best_learning_rate']:g} | "
            f"{res['final_loss']:.4f} | {res['best_loss']:.4f} | {quality} | "
            f"{step} | {res['state_bytes'] / 2**20:.3f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{args.model}, {args.train_steps} steps, learning rates = "
                f"default x {args.lr_factors}\n\n{table}\n")
    print("\n" + table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for res in results.values():
        if "curve" in res:
            steps, losses = zip(*res["curve"])
            ax.plot(steps, losses,
                    label=f"{res['label']} (lr {res['best_learning_rate']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{args.model}: each optimizer at its best learning rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss_curves.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for res in results.values():
        if "sweep" in res:
            points = sorted((float(lr), loss) for lr, loss in
                            res["sweep"].items() if loss is not None)
            ax.plot(*zip(*points), marker="o", label=res["label"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final training loss")
    ax.set_title(f"{args.model}: learning-rate sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "lr_sweep.png"), dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet", "transformer", "mlp"),
                        default="resnet")
    parser.add_argument("--out", default=None,
                        help="output folder (default /tmp/sm3_compare_MODEL)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--lr_factors", default="0.3,1,3",
                        help="multiples of each optimizer's default rate")
    parser.add_argument("--train_steps", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--log_every", type=int, default=25)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_optimizer", help=argparse.SUPPRESS)
    parser.add_argument("--_lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--_run_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.train_steps = args.train_steps or DEFAULT_STEPS[args.model]
    if args._child:
        run_mlp_child(args)
        return
    optimizers = [o for o in args.optimizers.split(",") if o]
    harness.check_names(parser, "--optimizers", optimizers, OPTIMIZERS)
    try:
        factors = [float(f) for f in args.lr_factors.split(",")]
    except ValueError:
        parser.error(f"--lr_factors must be numbers; got {args.lr_factors!r}")
    if any(not f > 0 for f in factors):
        parser.error(f"--lr_factors must be positive numbers; got "
                     f"{args.lr_factors!r}")
    if args.train_steps < args.log_every:
        parser.error(f"--train_steps ({args.train_steps}) must be at least "
                     f"--log_every ({args.log_every})")
    if args.model == "mlp" and (args.dataset or args.data_dir):
        parser.error("--model=mlp uses scikit-learn's digits; drop --dataset "
                     "and --data_dir")
    args.out = args.out or f"/tmp/sm3_compare_{args.model}"
    os.makedirs(args.out, exist_ok=True)

    total = len(optimizers) * len(factors)
    done, start = 0, time.time()
    results = {}
    for optimizer in optimizers:
        runs, shapes = {}, None
        for factor in factors:
            lr = float(f"{default_learning_rate(args.model, optimizer) * factor:.3g}")
            run_dir = os.path.join(args.out, "runs", f"{optimizer}_lr{lr:g}")
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                import shutil

                shutil.rmtree(run_dir)  # a fresh run, not a resumed one
            runner = run_mlp if args.model == "mlp" else run_trainer
            error = runner(args, optimizer, lr, run_dir)
            done += 1
            eta = (time.time() - start) / done * (total - done)
            if error:
                runs[lr] = None
                print(f"[{done}/{total}] {optimizer} lr={lr:g}: FAILED "
                      f"({error}); ETA {eta:.0f}s", flush=True)
                continue
            runs[lr] = read_run(run_dir)
            shapes = shapes or trainable_shapes(run_dir)
            last = runs[lr][-1]
            quality = last.get(QUALITY[args.model])
            print(f"[{done}/{total}] {optimizer} lr={lr:g}: final loss "
                  f"{last['loss']:.4f}"
                  + ("" if quality is None else
                     f", {QUALITY[args.model]} {quality:.4f}")
                  + f"; ETA {eta:.0f}s", flush=True)
        results[optimizer] = summarize(args.model, optimizer, runs,
                                       shapes or [])
    write_outputs(args, results)
    print(f"\nwrote {args.out}/results.json, results.md, loss_curves.png, "
          f"lr_sweep.png in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
