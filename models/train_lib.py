"""Flags, their validation, and the run they describe: the body of scripts/train.py.

Kept here, apart from the thin driver, so tests can run a configuration
in-process: `run(parse_flags(["--model=resnet", ...]))`.
"""

import dataclasses
import math
import os
import time
from typing import Optional

from absl import flags
from absl import logging

from models.common import distribute
from models.common import optimizers

MODELS = ("resnet", "transformer")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

# Defaults that depend on the model and the data set: what a flag left unset
# (None, or -1 for the warm-up) becomes. The offline defaults (digits,
# pydoc_reverse) finish in a few minutes on 2 CPU cores.
DEFAULT_DATASET = {"resnet": "digits", "transformer": "pydoc_reverse"}
DEFAULTS = {
    "digits": dict(train_steps=600, batch_size=64, resnet_depth=18,
                   resnet_width=32, label_smoothing=0.0),
    "cifar10": dict(train_steps=40_000, batch_size=128, resnet_depth=18,
                    resnet_width=64, label_smoothing=0.0),
    "imagenet2012": dict(train_steps=112_590, batch_size=1024, resnet_depth=50,
                         resnet_width=64, label_smoothing=0.1),
    "pydoc_reverse": dict(train_steps=2000, batch_size=64, transformer_size="small",
                          vocab_size=1000, max_length=24, label_smoothing=0.1),
    "wmt14_en_de": dict(train_steps=100_000, batch_size=512, transformer_size="base",
                        vocab_size=32_000, max_length=64, label_smoothing=0.1),
    "wmt14_en_fr": dict(train_steps=100_000, batch_size=512, transformer_size="base",
                        vocab_size=32_000, max_length=64, label_smoothing=0.1),
}
# Peak learning rates per optimizer; SM3's were tuned on the offline tasks.
DEFAULT_LEARNING_RATE = {
    ("resnet", "sm3"): 0.1, ("transformer", "sm3"): 0.3,
    ("resnet", "adam"): 1e-3, ("transformer", "adam"): 5e-4,
    ("resnet", "adagrad"): 0.1, ("transformer", "adagrad"): 0.1,
    ("resnet", "adafactor"): 1e-3, ("transformer", "adafactor"): 1e-3,
    ("resnet", "sgd"): 0.1, ("transformer", "sgd"): 0.5,
}


def define_flags(flag_values=flags.FLAGS):
    """Defines the driver's flags on `flag_values`."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum("model", "resnet", MODELS, "Which model to train.", **fv)
    flags.DEFINE_string(
        "dataset", None,
        "resnet: digits (offline, default), cifar10, imagenet2012; transformer: "
        "pydoc_reverse (offline, default), wmt14_en_de, wmt14_en_fr.", **fv)
    flags.DEFINE_string("data_dir", None, "tfds data directory (prepared data).", **fv)
    flags.DEFINE_string(
        "model_dir", None,
        "Checkpoints, metrics.jsonl, TensorBoard events, the vocabulary. A rerun "
        "with the same directory resumes. Default: /tmp/sm3_tf_runs/MODEL_DATASET_OPTIMIZER.",
        **fv)
    flags.DEFINE_enum("optimizer", "sm3", optimizers.OPTIMIZERS, "Optimizer.", **fv)
    flags.DEFINE_float("learning_rate", None,
                       "Peak learning rate. Default: per model and optimizer.", **fv)
    flags.DEFINE_float("momentum", 0.9, "SM3's (and SGD's) momentum, in [0, 1).", **fv)
    flags.DEFINE_float("beta2", 1.0, "SM3's beta2, in (0, 1]; 1 is the running sum.", **fv)
    flags.DEFINE_float("epsilon", 1e-30, "SM3's epsilon, >= 0.", **fv)
    flags.DEFINE_boolean(
        "sm3_cpu_kernel", None,
        "SM3's cpu_kernel: each float32 matrix's step as one native pass on "
        "the CPU (built once per machine). Unset: SM3's \"auto\", "
        "the kernel wherever it can run; --sm3_cpu_kernel asks for it (a "
        "warning where it cannot run); --nosm3_cpu_kernel keeps SM3's "
        "portable path.", **fv)
    flags.DEFINE_enum(
        "sm3_momentum_dtype", None, ("float32", "bfloat16"),
        "SM3's momentum_dtype: the dtype its momentum is stored in (its "
        "arithmetic is float32 either way; bfloat16 halves SM3's state). "
        "Unset: the variable's dtype.", **fv)
    flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (Keras's), >= 0.", **fv)
    flags.DEFINE_float("clipnorm", 0.0, "Clip each gradient to this norm; 0: off.", **fv)
    flags.DEFINE_integer(
        "warmup_steps", -1,
        "Warm-up steps: quadratic for SM3 (sm3_tf.QuadraticWarmup), linear "
        "before a cosine decay (Keras CosineDecay) for the others. "
        "-1: 5% of --train_steps.", **fv)
    flags.DEFINE_integer("cooldown_steps", 0,
                         "SM3 only: linear cool-down to 0 over the last steps.", **fv)
    flags.DEFINE_enum("strategy", None, distribute.STRATEGIES,
                      "tf.distribute strategy. Default: tpu with --tpu, mirrored "
                      "with several GPUs, else one_device.", **fv)
    flags.DEFINE_string("tpu", None,
                        "TPU address for TPUClusterResolver (name, grpc://ip:port, "
                        "or 'local'); resolved only with --strategy=tpu.", **fv)
    flags.DEFINE_integer("cpu_devices", 1,
                         "Split the CPU into this many logical devices (to try "
                         "--strategy=mirrored without GPUs).", lower_bound=1, **fv)
    flags.DEFINE_integer("train_steps", None, "Total training steps. Default: per data set.", **fv)
    flags.DEFINE_integer("batch_size", None, "Global batch size. Default: per data set.", **fv)
    flags.DEFINE_integer("steps_per_loop", 50,
                         "Steps per host call (one tf.function); also the logging period.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("eval_every", 0,
                         "Evaluate every this many steps; 0: only at the end.",
                         lower_bound=0, **fv)
    flags.DEFINE_integer("eval_steps", 0,
                         "Batches per evaluation; 0: the whole evaluation split.",
                         lower_bound=0, **fv)
    flags.DEFINE_boolean("final_eval", True, "Evaluate at the end of training.", **fv)
    flags.DEFINE_integer("checkpoint_every", 500, "Save a checkpoint every this many steps.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints to keep.", lower_bound=1, **fv)
    flags.DEFINE_enum("mixed_precision", "float32", PRECISIONS,
                      "Keras dtype policy; mixed_float16 adds loss scaling.", **fv)
    flags.DEFINE_boolean("jit_compile", False,
                         "Compile the training step with XLA (one device or TPU).", **fv)
    flags.DEFINE_integer("seed", 0, "Seed for initialization and data order.", **fv)
    flags.DEFINE_boolean("deterministic", False,
                         "Deterministic TF ops (tf.config.experimental."
                         "enable_op_determinism): bit-identical reruns.", **fv)
    # ResNet.
    flags.DEFINE_integer("resnet_depth", None,
                         "18, 34, 50, 101 or 152 (10: tiny, for tests). Default: per "
                         "data set (imagenet2012: 50).", **fv)
    flags.DEFINE_integer("resnet_width", None, "First stage's width (64 in the paper).",
                         **fv)
    flags.DEFINE_integer("image_size", 0, "Image side; 0: the data set's own.",
                         lower_bound=0, **fv)
    flags.DEFINE_float("label_smoothing", None, "Label smoothing, in [0, 1).", **fv)
    # Transformer.
    flags.DEFINE_enum("transformer_size", None, ("tiny", "small", "base", "big"),
                      "Transformer configuration (base and big: Vaswani et al.).", **fv)
    flags.DEFINE_integer("vocab_size", None, "Sentencepiece vocabulary size.", **fv)
    flags.DEFINE_integer("max_length", None, "Maximum tokens per sentence.", **fv)
    flags.DEFINE_integer("beam_size", 4, "Beams for evaluation; 1: greedy decoding.",
                         lower_bound=1, **fv)


def parse_flags(argv):
    """A fresh FlagValues parsed from `argv` (without the program name)."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    flag_values(["train.py"] + list(argv))
    return flag_values


@dataclasses.dataclass
class RunConfig:
    """Every flag value after defaults and validation."""
    model: str
    dataset: str
    data_dir: str
    model_dir: str
    optimizer: str
    learning_rate: float
    momentum: float
    beta2: float
    epsilon: float
    sm3_cpu_kernel: Optional[bool]
    sm3_momentum_dtype: Optional[str]
    weight_decay: float
    clipnorm: float
    warmup_steps: int
    cooldown_steps: int
    strategy: str
    tpu: str
    cpu_devices: int
    train_steps: int
    batch_size: int
    steps_per_loop: int
    eval_every: int
    eval_steps: int
    final_eval: bool
    checkpoint_every: int
    keep_checkpoints: int
    mixed_precision: str
    jit_compile: bool
    seed: int
    deterministic: bool
    resnet_depth: int
    resnet_width: int
    image_size: int
    label_smoothing: float
    transformer_size: str
    vocab_size: int
    max_length: int
    beam_size: int


_MODEL_FLAGS = {
    "resnet": ("resnet_depth", "resnet_width", "image_size"),
    "transformer": ("transformer_size", "vocab_size", "max_length", "beam_size"),
}


def _bad(flag, message):
    return flags.ValidationError(f"--{flag}: {message}")


def config_from_flags(fv):
    """Fills in the defaults and validates; raises flags.ValidationError naming the flag."""
    from models.resnet import data as resnet_data
    from models.resnet import model as resnet_model
    from models.transformer import data as transformer_data

    other_model = {"resnet": "transformer", "transformer": "resnet"}[fv.model]
    for name in _MODEL_FLAGS[other_model]:
        if fv[name].present:
            raise _bad(name, f"applies to --model={other_model}, not "
                       f"--model={fv.model}.")
    dataset = fv.dataset or DEFAULT_DATASET[fv.model]
    allowed = resnet_data.DATASETS if fv.model == "resnet" else transformer_data.DATASETS
    if dataset not in allowed:
        raise _bad("dataset", f"must be one of {', '.join(allowed)} for "
                   f"--model={fv.model}; got {dataset!r}.")
    defaults = DEFAULTS[dataset]
    values = {name: fv[name].value for name in fv}
    values = {k: v for k, v in values.items() if k in RunConfig.__dataclass_fields__}
    values["dataset"] = dataset
    for name, default in defaults.items():
        if values.get(name) is None:
            values[name] = default
    for name in ("resnet_depth", "resnet_width", "transformer_size", "vocab_size",
                 "max_length"):
        values.setdefault(name, None)
    if values["learning_rate"] is None:
        values["learning_rate"] = DEFAULT_LEARNING_RATE[(fv.model, fv.optimizer)]
    if values["model_dir"] is None:
        values["model_dir"] = os.path.join(
            "/tmp/sm3_tf_runs", f"{fv.model}_{dataset}_{fv.optimizer}")
    config = RunConfig(**values)

    for name in ("train_steps", "batch_size"):
        if getattr(config, name) < 1:
            raise _bad(name, f"must be >= 1; got {getattr(config, name)}.")
    if not config.learning_rate > 0 or not math.isfinite(config.learning_rate):
        raise _bad("learning_rate", f"must be a finite number > 0; got {config.learning_rate}.")
    if not 0 <= config.momentum < 1:
        raise _bad("momentum", f"must be in [0, 1); got {config.momentum}.")
    if not 0 < config.beta2 <= 1:
        raise _bad("beta2", f"must be in (0, 1]; got {config.beta2}.")
    if config.epsilon < 0:
        raise _bad("epsilon", f"must be >= 0; got {config.epsilon}.")
    if config.weight_decay < 0:
        raise _bad("weight_decay", f"must be >= 0; got {config.weight_decay}.")
    if config.clipnorm < 0:
        raise _bad("clipnorm", f"must be >= 0 (0: off); got {config.clipnorm}.")
    if config.warmup_steps == -1:
        config.warmup_steps = int(0.05 * config.train_steps)
    if not 0 <= config.warmup_steps <= config.train_steps:
        raise _bad("warmup_steps", f"must be in [0, --train_steps={config.train_steps}] "
                   f"(or -1 for 5%); got {config.warmup_steps}.")
    if config.cooldown_steps < 0:
        raise _bad("cooldown_steps", f"must be >= 0; got {config.cooldown_steps}.")
    if config.cooldown_steps and config.optimizer != "sm3":
        raise _bad("cooldown_steps", "is SM3's schedule; the other optimizers "
                   "decay with a cosine. Leave it 0 with "
                   f"--optimizer={config.optimizer}.")
    for name in ("sm3_cpu_kernel", "sm3_momentum_dtype"):
        if getattr(config, name) is not None and config.optimizer != "sm3":
            raise _bad(name, "is an SM3 argument; drop it with "
                       f"--optimizer={config.optimizer}.")
    if config.sm3_momentum_dtype is not None and config.momentum == 0:
        raise _bad("sm3_momentum_dtype", "stores SM3's momentum, and "
                   "--momentum=0 keeps none; drop one of them.")
    if config.warmup_steps + config.cooldown_steps > config.train_steps:
        raise _bad("cooldown_steps", "warm-up plus cool-down must fit in "
                   f"--train_steps={config.train_steps}.")
    if not 0 <= config.label_smoothing < 1:
        raise _bad("label_smoothing", f"must be in [0, 1); got {config.label_smoothing}.")
    if config.tpu and config.strategy not in (None, "tpu"):
        raise _bad("tpu", f"is only used with --strategy=tpu, not --strategy={config.strategy}.")
    if config.strategy is None:
        config.strategy = distribute.default_strategy_name(config.tpu)
    if config.model == "resnet":
        if config.resnet_depth not in resnet_model.DEPTHS:
            raise _bad("resnet_depth", f"must be one of {sorted(resnet_model.DEPTHS)}; "
                       f"got {config.resnet_depth}.")
        if config.resnet_width < 1:
            raise _bad("resnet_width", f"must be >= 1; got {config.resnet_width}.")
    else:
        if config.vocab_size < 16:
            raise _bad("vocab_size", f"must be >= 16; got {config.vocab_size}.")
        if config.max_length < 2:
            raise _bad("max_length", f"must be >= 2; got {config.max_length}.")
    if config.jit_compile and config.strategy in ("mirrored", "multi_worker_mirrored"):
        # TPUStrategy compiles on its own; XLA with several CPU replicas fails.
        import tensorflow as tf
        if not tf.config.list_physical_devices("GPU"):
            raise _bad("jit_compile", f"needs --strategy=one_device (or tpu) on "
                       f"CPUs; got --strategy={config.strategy}.")
    return config


def run(config):
    """Trains and evaluates as `config` says; returns the loop's result dict.

    Raises DatasetNotPreparedError (missing tfds data) and NonFiniteLossError.
    """
    import keras
    import tensorflow as tf

    from models.common import loop

    if not distribute.split_cpu(config.cpu_devices):
        raise _bad("cpu_devices", "TensorFlow had already started; the CPU was "
                   "not split.")
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = distribute.get_strategy(config.strategy, config.tpu)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise _bad("batch_size", f"must be a multiple of the {replicas} replicas "
                   f"of --strategy={config.strategy}; got {config.batch_size}.")
    _, is_chief = distribute.worker_info(strategy)
    logging.info("Strategy %s with %d replicas; model_dir %s", config.strategy,
                 replicas, config.model_dir)

    keras.mixed_precision.set_global_policy(config.mixed_precision)
    try:
        task = build_task(config, is_chief)

        def optimizer_fn():
            return build_optimizer(config)

        loop_config = loop.LoopConfig(
            model_dir=config.model_dir, train_steps=config.train_steps,
            global_batch_size=config.batch_size,
            steps_per_loop=config.steps_per_loop,
            checkpoint_every=config.checkpoint_every,
            keep_checkpoints=config.keep_checkpoints,
            eval_every=config.eval_every, eval_steps=config.eval_steps,
            final_eval=config.final_eval, jit_compile=config.jit_compile)
        start = time.time()
        result = loop.train(task, strategy, optimizer_fn, loop_config)
        result["wall_seconds"] = time.time() - start
        result["task"] = task
        return result
    finally:
        keras.mixed_precision.set_global_policy("float32")


def build_optimizer(config):
    """The optimizer `config` asks for (`--optimizer` and its flags)."""
    return optimizers.build_optimizer(
        config.optimizer, config.learning_rate, config.train_steps,
        warmup_steps=config.warmup_steps,
        cooldown_steps=config.cooldown_steps, momentum=config.momentum,
        beta2=config.beta2, epsilon=config.epsilon,
        # Unset: SM3's own default.
        sm3_cpu_kernel=("auto" if config.sm3_cpu_kernel is None
                        else config.sm3_cpu_kernel),
        sm3_momentum_dtype=config.sm3_momentum_dtype,
        weight_decay=config.weight_decay, clipnorm=config.clipnorm,
        mixed_float16=config.mixed_precision == "mixed_float16")


def build_task(config, is_chief=True):
    if config.model == "resnet":
        from models.resnet import task as resnet_task
        return resnet_task.ImageClassificationTask(resnet_task.ResNetConfig(
            dataset=config.dataset, data_dir=config.data_dir,
            depth=config.resnet_depth, width=config.resnet_width,
            image_size=config.image_size,
            label_smoothing=config.label_smoothing, seed=config.seed))
    from models.transformer import task as transformer_task
    return transformer_task.TranslationTask(transformer_task.TransformerConfig(
        dataset=config.dataset, data_dir=config.data_dir,
        model_dir=config.model_dir, size=config.transformer_size,
        vocab_size=config.vocab_size, max_length=config.max_length,
        label_smoothing=config.label_smoothing, beam_size=config.beam_size,
        is_chief=is_chief, seed=config.seed))
