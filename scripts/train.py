"""Trains a reference model (ResNet or Transformer) with SM3 or another optimizer.

    python scripts/train.py                         # ResNet on digits, SM3, offline
    python scripts/train.py --model=transformer     # pydoc_data reversal task, BLEU
    python scripts/train.py --model=resnet --dataset=imagenet2012 \\
        --data_dir=gs://BUCKET/tfds --strategy=tpu --tpu=NAME --model_dir=gs://...

Flags: `python scripts/train.py --helpfull`; models/README.md explains them.
Exit status: 0 done (or preempted after saving), 1 bad flags, 2 missing data,
3 non-finite loss.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Runs from a checkout without installation: the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from models import train_lib  # noqa: E402

train_lib.define_flags()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    try:
        config = train_lib.config_from_flags(FLAGS)
    except flags.ValidationError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 1

    from models.common import datasets, loop  # after flags: imports TensorFlow

    try:
        result = train_lib.run(config)
    except flags.ValidationError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 1
    except datasets.DatasetNotPreparedError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    except loop.NonFiniteLossError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 3
    minutes, seconds = divmod(int(round(result["wall_seconds"])), 60)
    if result["preempted"]:
        print(f"Preempted at step {result['step']}; checkpoint saved in "
              f"{config.model_dir}. Rerun the same command to resume.")
        return 0
    line = f"Done: {result['task'].name} with {config.optimizer}, step {result['step']}"
    if "eval_seconds" in result:
        line += ": " + result["task"].quality_line(result)
    print(f"{line} ({minutes}m{seconds:02d}s on this run).", flush=True)
    print(f"Final weights sha256 {result['weights_sha256']}", flush=True)
    return 0


if __name__ == "__main__":
    app.run(main)
