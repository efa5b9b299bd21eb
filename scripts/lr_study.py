"""A learning-rate study for SM3: warm-up, cool-down, EMA, batch size.

    python scripts/lr_study.py --out=/tmp/sm3_lr_study [--epochs=6]

On the quickstart's ConvNet and scikit-learn's digits (offline), it measures:

1. warm-up length (0, 2, 5, 10, 20% of training) and shape (quadratic, the
   published recipe, against linear), at a fixed peak rate;
2. the end of training: constant rate, a linear cool-down to 0 over the last
   10%, Polyak averaging (`use_ema`, averaging over about the last 10%), and
   both;
3. batch size: the best peak rate of a sweep at batch 32, 128 and 512.

Each configuration trains with three seeds; the figure is the median test
loss and accuracy. Writes `OUT/lr_study.json`, `OUT/lr_study.md` and
`OUT/lr_study.png`.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import keras  # noqa: E402

import sm3_tf  # noqa: E402
from quickstart import build_model, load_digits  # noqa: E402


def linear_warmup(lr, warmup_steps):
    """Keras's CosineDecay with alpha=1 is a linear warm-up then a constant."""
    if warmup_steps == 0:
        return lr
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=1, alpha=1.0, warmup_target=lr,
        warmup_steps=warmup_steps)


def train(data, lr, batch_size, epochs, seed, warmup=0.05, shape="quadratic",
          cooldown=0.0, ema=False):
    (x_train, y_train), (x_test, y_test) = data
    steps = epochs * -(-len(x_train) // batch_size)
    warmup_steps = int(warmup * steps)
    if shape == "quadratic":
        cooldown_steps = int(cooldown * steps)
        schedule = sm3_tf.QuadraticWarmup(
            lr, warmup_steps=warmup_steps, total_steps=steps,
            cooldown_steps=cooldown_steps)
    else:
        schedule = linear_warmup(lr, warmup_steps)
    keras.utils.set_random_seed(seed)
    model = build_model()
    # The average's horizon is about the last 10% of training.
    ema_momentum = max(0.0, 1.0 - 10.0 / steps)
    model.compile(
        optimizer=sm3_tf.SM3(schedule, momentum=0.9, use_ema=ema,
                             ema_momentum=ema_momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    history = model.fit(x_train, y_train, batch_size=batch_size,
                        epochs=epochs, verbose=0)
    if ema:
        model.optimizer.finalize_variable_values(model.trainable_variables)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return {"test_loss": float(loss), "test_accuracy": float(accuracy),
            "train_loss": float(history.history["loss"][-1])}


def median_of_seeds(data, seeds, **kwargs):
    runs = [train(data, seed=s, **kwargs) for s in seeds]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/sm3_lr_study")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--learning_rate", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    for flag in ("epochs", "seeds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate: must be > 0, got {args.learning_rate}")
    os.makedirs(args.out, exist_ok=True)
    data = load_digits()
    seeds = list(range(args.seeds))
    common = dict(epochs=args.epochs)
    results = {"warmup": [], "ending": [], "batch": []}
    start = time.time()

    def log(section, row):
        results[section].append(row)
        print(f"[{time.time() - start:5.0f}s] {section}: "
              + ", ".join(f"{k}={v}" for k, v in row.items() if k != "metrics")
              + f" -> test loss {row['metrics']['test_loss']:.4f}, accuracy "
              f"{row['metrics']['test_accuracy']:.4f}", flush=True)

    for shape in ("quadratic", "linear"):
        for warmup in (0.0, 0.02, 0.05, 0.1, 0.2):
            metrics = median_of_seeds(data, seeds, lr=args.learning_rate,
                                      batch_size=64, warmup=warmup,
                                      shape=shape, **common)
            log("warmup", {"shape": shape, "warmup": warmup,
                           "metrics": metrics})
    for cooldown, ema in ((0.0, False), (0.1, False), (0.0, True),
                          (0.1, True)):
        metrics = median_of_seeds(data, seeds, lr=args.learning_rate,
                                  batch_size=64, cooldown=cooldown, ema=ema,
                                  **common)
        log("ending", {"cooldown": cooldown, "ema": ema, "metrics": metrics})
    for batch in (32, 128, 512):
        for lr in (0.03, 0.1, 0.3, 1.0):
            metrics = median_of_seeds(data, seeds, lr=lr, batch_size=batch,
                                      **common)
            log("batch", {"batch_size": batch, "learning_rate": lr,
                          "metrics": metrics})

    with open(os.path.join(args.out, "lr_study.json"), "w") as f:
        json.dump({"epochs": args.epochs, "seeds": args.seeds,
                   "peak_learning_rate": args.learning_rate, **results},
                  f, indent=2)
    lines = ["| study | setting | test loss | test accuracy |",
             "|---|---|---|---|"]
    for row in results["warmup"]:
        lines.append(f"| warm-up | {row['shape']}, {row['warmup']:.0%} | "
                     f"{row['metrics']['test_loss']:.4f} | "
                     f"{row['metrics']['test_accuracy']:.4f} |")
    for row in results["ending"]:
        name = {(0.0, False): "constant", (0.1, False): "cool-down 10%",
                (0.0, True): "EMA", (0.1, True): "cool-down + EMA"}[
                    (row["cooldown"], row["ema"])]
        lines.append(f"| ending | {name} | {row['metrics']['test_loss']:.4f}"
                     f" | {row['metrics']['test_accuracy']:.4f} |")
    best = {}
    for row in results["batch"]:
        b = row["batch_size"]
        if b not in best or row["metrics"]["test_loss"] < best[b]["metrics"][
                "test_loss"]:
            best[b] = row
    for b, row in sorted(best.items()):
        lines.append(f"| batch size | {b}: best lr {row['learning_rate']:g} | "
                     f"{row['metrics']['test_loss']:.4f} | "
                     f"{row['metrics']['test_accuracy']:.4f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "lr_study.md"), "w") as f:
        f.write(f"SM3 on digits, {args.epochs} epochs, median of "
                f"{args.seeds} seeds\n\n{table}\n")
    print("\n" + table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for shape in ("quadratic", "linear"):
        rows = [r for r in results["warmup"] if r["shape"] == shape]
        left.plot([100 * r["warmup"] for r in rows],
                  [r["metrics"]["test_loss"] for r in rows], marker="o",
                  label=f"{shape} warm-up")
    left.set_xlabel("warm-up, % of training")
    left.set_ylabel("test loss (median of seeds)")
    left.set_title("warm-up length and shape")
    left.legend()
    for b in sorted({r["batch_size"] for r in results["batch"]}):
        rows = [r for r in results["batch"] if r["batch_size"] == b]
        right.plot([r["learning_rate"] for r in rows],
                   [r["metrics"]["test_loss"] for r in rows], marker="o",
                   label=f"batch {b}")
    right.set_xscale("log")
    right.set_xlabel("peak learning rate")
    right.set_ylabel("test loss (median of seeds)")
    right.set_title("learning rate against batch size")
    right.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "lr_study.png"), dpi=120)
    print(f"\nwrote {args.out}/lr_study.json, lr_study.md, lr_study.png in "
          f"{time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
