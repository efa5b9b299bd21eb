"""SM3's momentum stored in bfloat16 against float32, on the trainers' offline jobs.

    python scripts/momentum_dtype_study.py [--seeds 0,1,2] [--models resnet,transformer]
        [--out /tmp/momentum_dtype_study] [--resnet_flags="--train_steps=200"]
        [--transformer_flags="--train_steps=600"]

Runs `scripts/train.py` (the reference trainers, their offline defaults:
ResNet-18 on digits, the small Transformer on pydoc_reverse) once per
model, seed and `--sm3_momentum_dtype` (float32, bfloat16), each in its own
process, and prints the final quality (top-1 accuracy, BLEU) per run, with
each dtype's mean and its seed-to-seed spread (max - min). bfloat16 keeps
SM3's momentum, its only per-parameter state, in half the bytes; the
question is whether the quality stays within float32's own spread.
`--resnet_flags` / `--transformer_flags` pass more flags to each run of that
model (shorter runs, another width); both dtypes get the same.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("float32", "bfloat16")
METRIC = {"resnet": "eval_accuracy", "transformer": "eval_bleu"}


def run_one(model, seed, dtype, out, extra_flags):
    model_dir = os.path.join(out, f"{model}_{dtype}_seed{seed}")
    command = [sys.executable, os.path.join(HERE, "train.py"),
               f"--model={model}", f"--seed={seed}",
               f"--sm3_momentum_dtype={dtype}", f"--model_dir={model_dir}",
               *extra_flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return last[METRIC[model]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default="resnet,transformer")
    parser.add_argument("--out", default="/tmp/momentum_dtype_study")
    parser.add_argument("--json", help="also write the results to this file")
    for model in METRIC:
        parser.add_argument(f"--{model}_flags", default="",
                            help=f"more scripts/train.py flags for {model}")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds must be integers separated by commas; got "
                     f"{args.seeds!r}")
    models = [m for m in args.models.split(",") if m]
    for model in models:
        if model not in METRIC:
            parser.error(f"--models: {model!r} is not one of "
                         f"{', '.join(METRIC)}")
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for model in models:
        for seed in seeds:
            for dtype in DTYPES:  # interleaved: drift hits both alike
                score = run_one(model, seed, dtype, args.out, shlex.split(
                    getattr(args, f"{model}_flags")))
                results.setdefault(model, {}).setdefault(dtype, []).append(
                    score)
                print(f"{model} seed {seed} {dtype}: {METRIC[model]} "
                      f"{score:.4f}", flush=True)
    print()
    for model, by_dtype in results.items():
        print(f"{model} ({METRIC[model]}, seeds {args.seeds}):")
        for dtype, scores in by_dtype.items():
            print(f"  {dtype:9s} " + " ".join(f"{s:.4f}" for s in scores)
                  + f"   mean {statistics.mean(scores):.4f}, spread "
                  f"{max(scores) - min(scores):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
