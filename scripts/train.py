"""Trains a reference model (ResNet or Transformer) with SM3 or another optimizer.

    python scripts/train.py                         # ResNet on digits, SM3, offline
    python scripts/train.py --model=transformer     # pydoc_data reversal task, BLEU
    python scripts/train.py --model=resnet --dataset=imagenet2012 \\
        --data_dir=gs://BUCKET/tfds --strategy=tpu --tpu=NAME --model_dir=gs://...

Flags: `python scripts/train.py --helpfull`; models/README.md explains them.
Exit status: 0 done (or preempted after saving), 1 bad flags, 2 missing data,
3 non-finite loss.
"""

import logging as py_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on by itself only on some x86 CPUs
# (AVX-512 and newer); on others (AVX2, e.g. AMD EPYC) convolutions run
# several times slower without them (the default digits job on a 2-core
# EPYC: about 130 against 550 ms a step). A TF_ENABLE_ONEDNN_OPTS already
# set is kept. With --deterministic they stay off: a run
# resumed after `kill -9` ended with other weights than a straight one with
# them on (op determinism does not cover them), and bit for bit with them
# off. The variable must be set before TensorFlow is imported, so before
# absl parses the flags.
def _asks_for_determinism(argv):
    asked = False
    for arg in argv[1:]:
        if arg == "--deterministic":
            asked = True
        elif arg.startswith("--deterministic="):
            asked = arg.split("=", 1)[1].lower() in ("true", "1", "t", "yes")
        elif arg == "--nodeterministic":
            asked = False
    return asked


os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS",
                      "0" if _asks_for_determinism(sys.argv) else "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Runs from a checkout without installation: the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from models import train_lib  # noqa: E402

train_lib.define_flags()
FLAGS = flags.FLAGS


def _log_each_line_once():
    """Sends TensorFlow's Python log records through absl's handler only.

    Importing TensorFlow (here through models.train_lib, before app.run)
    sets up its "tensorflow" logger while the root logger has no handler
    yet, and then that logger gets a stderr handler of its own
    (tf_logging.get_logger). app.run() puts absl's handler on the root
    logger and removes stderr handlers from the root logger only, so every
    TensorFlow line came out twice: `INFO:tensorflow:...` from TensorFlow's
    handler, then in absl's format by propagation. Without TensorFlow's
    handler each line comes out once, in absl's format like the rest.
    """
    tf_logger = py_logging.getLogger("tensorflow")
    for handler in list(tf_logger.handlers):
        if (type(handler) is py_logging.StreamHandler
                and handler.stream in (sys.stderr, sys.stdout)):
            tf_logger.removeHandler(handler)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    _log_each_line_once()
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
    if result["start_step"] >= config.train_steps:
        print(f"Nothing was trained: {config.model_dir} already holds step "
              f"{result['start_step']}. Pass another --model_dir (or delete "
              "that one) to train from scratch.", flush=True)
    print(f"Final weights sha256 {result['weights_sha256']}", flush=True)
    return 0


if __name__ == "__main__":
    app.run(main)
