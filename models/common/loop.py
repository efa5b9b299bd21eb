"""The one custom training loop every trainer shares.

Model-agnostic: it takes a *task*, an object with

    name                                   str, for messages
    build_model()                          a built keras.Model
    train_dataset(global_batch, ctx,       tf.data.Dataset of per-replica
                  start_step)              batches, repeating forever, from
                                           the batch of step `start_step`
    eval_dataset(global_batch, ctx)        finite per-replica batches, or None
    per_example_loss(model, batch)         float32 [batch] training losses
    eval_outputs(model, batch)             dict of tensors, batch-major
    eval_metrics(outputs)                  dict of floats from the numpy
                                           concatenation of every eval_outputs
    quality_line(metrics)                  one human sentence on the result

Why a custom loop and not `model.fit`: Keras 3's fit fails under
MultiWorkerMirroredStrategy (keras-team/keras#20585), and TPUs want several
steps per host call. So `strategy.run` runs inside a `tf.function` that loops
`steps_per_loop` times over a `distribute_datasets_from_function` iterator;
each replica scales its loss by the global batch, so the summed gradients
across replicas are the gradient of the global mean.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import time

import numpy as np
import tensorflow as tf
from absl import logging

from models.common import distribute
from models.common import optimizers as optimizers_lib


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stopped."""


class _Preempted(Exception):
    """Raised by the preemption handler's exit function, after it saved."""


@dataclasses.dataclass
class LoopConfig:
    model_dir: str
    train_steps: int
    global_batch_size: int
    steps_per_loop: int = 100
    checkpoint_every: int = 1000   # steps; a checkpoint also ends every run
    keep_checkpoints: int = 3
    eval_every: int = 0            # steps; 0: only at the end
    eval_steps: int = 0            # batches per evaluation; 0: the whole split
    final_eval: bool = True
    jit_compile: bool = False


def _format_seconds(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _to_numpy(value):
    value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return value.item() if np.ndim(value) == 0 else value


class _MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars."""

    def __init__(self, model_dir, is_chief):
        self.is_chief = is_chief
        if is_chief:
            self._path = os.path.join(model_dir, "metrics.jsonl")
            self._writer = tf.summary.create_file_writer(model_dir)
        else:
            self._path = None
            self._writer = tf.summary.create_noop_writer()

    def write(self, record):
        if not self.is_chief:
            return
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")
        with self._writer.as_default(step=record["step"]):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tf.summary.scalar(key, value)
        self._writer.flush()

    def close(self):
        self._writer.close()


def train(task, strategy, optimizer_fn, config):
    """Trains (resuming from `config.model_dir`), evaluates; returns the metrics.

    `optimizer_fn()` builds the optimizer; it is called under the strategy's
    scope. Returns a dict with `step`, `start_step` (the checkpoint's it
    resumed from, 0 for a fresh run), `loss` (of the last loop, None when
    nothing was left to train), the last evaluation's metrics and
    `preempted` (True when SIGTERM stopped the run after saving).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the checkpoints
            on disk are the ones from before, all finite.
    """
    model_dir = config.model_dir
    task_id, is_chief = distribute.worker_info(strategy)
    tf.io.gfile.makedirs(model_dir)
    global_batch = config.global_batch_size

    with strategy.scope():
        model = task.build_model()
        optimizer = optimizer_fn()
        # Built here, not lazily in the first step: the loop below is a
        # tf.function, and Keras saves optimizer variables by position.
        optimizer.build(model.trainable_variables)
        step = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="global_step",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)

    # Non-chief workers of a multi-worker run must write their (identical)
    # copy of a checkpoint somewhere else; they read the chief's.
    write_dir = model_dir if is_chief else os.path.join(
        model_dir, "tmp_worker", str(task_id))
    if not is_chief and tf.io.gfile.exists(write_dir):
        tf.io.gfile.rmtree(write_dir)

    def exit_after_preemption_save():
        raise _Preempted()

    # It restores the latest checkpoint in model_dir (every worker reads the
    # chief's), watches for SIGTERM, and saves at the next loop boundary.
    # It replaces the SIGTERM handler; the old one comes back at the end, for
    # callers (tests) that run the loop in-process.
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    try:
        preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
            getattr(strategy, "cluster_resolver", None), checkpoint,
            checkpoint_dir=model_dir,
            termination_config=tf.distribute.experimental.TerminationConfig(
                exit_fn=exit_after_preemption_save))
    except ValueError as e:  # a variable's shape differs: nothing is written
        signal.signal(signal.SIGTERM, sigterm_handler)
        latest = tf.train.latest_checkpoint(model_dir)
        if latest is None:
            raise
        raise ValueError(
            f"--model_dir={model_dir}: its checkpoint {latest} does not fit "
            f"this model and optimizer ({e}). It was written with other "
            "flags (model size, optimizer, --momentum, --sm3_momentum_dtype) "
            "or by sm3_tf before 1.0, which laid out SM3's accumulators "
            "otherwise. Resume with the flags it was written with, or start "
            "in a new --model_dir.") from e
    start_step = int(step.numpy())
    if start_step:
        logging.info("Resumed %s from %s at step %d.", task.name,
                     tf.train.latest_checkpoint(model_dir), start_step)

    # TF 2.21 cannot checkpoint a distributed iterator, so the data position
    # is the step: every training pipeline is a deterministic function of the
    # seed, and it skips the examples that `start_step` steps consumed, so a
    # resumed run reads the batches a straight run would have read next.
    train_dataset = strategy.distribute_datasets_from_function(
        lambda ctx: task.train_dataset(global_batch, ctx, start_step))
    train_iterator = iter(train_dataset)
    manager = tf.train.CheckpointManager(
        checkpoint, write_dir, max_to_keep=config.keep_checkpoints)

    def replica_step(batch):
        with tf.GradientTape() as tape:
            per_example = task.per_example_loss(model, batch, training=True)
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=global_batch)
            scaled = (optimizer.scale_loss(loss)
                      if hasattr(optimizer, "scale_loss") else loss)
        variables = model.trainable_variables
        gradients = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(gradients, variables))
        return loss

    if config.jit_compile:
        replica_step = tf.function(replica_step, jit_compile=True)

    @tf.function
    def train_loop(iterator, num_steps):
        total = tf.constant(0.0, tf.float32)
        for _ in tf.range(num_steps):
            per_replica = strategy.run(replica_step, args=(next(iterator),))
            total += strategy.reduce(
                tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            step.assign_add(1)
        return total / tf.cast(num_steps, tf.float32)

    eval_fn = _make_evaluator(task, strategy, model, global_batch, config)
    log = _MetricsLog(model_dir, is_chief)
    result = {"step": start_step, "start_step": start_step, "loss": None,
              "preempted": False}
    current = start_step
    run_start = time.time()
    try:
        while current < config.train_steps:
            # Loops end on multiples of steps_per_loop, so evaluations,
            # checkpoints and logs fall on the same steps after a restart.
            boundary = (current // config.steps_per_loop + 1) * config.steps_per_loop
            num_steps = min(boundary, config.train_steps) - current
            loop_start = time.time()
            loss = float(train_loop(train_iterator,
                                    tf.constant(num_steps, tf.int32)))
            loop_seconds = time.time() - loop_start
            current = int(step.numpy())
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"{task.name}: the training loss is {loss} at step "
                    f"{current} (mean of steps {current - num_steps + 1}-"
                    f"{current}). Stopped without saving; the last good "
                    f"checkpoint is {tf.train.latest_checkpoint(model_dir)}. "
                    "Try a lower --learning_rate or a longer --warmup_steps.")
            steps_per_sec = num_steps / loop_seconds
            eta = (config.train_steps - current) / steps_per_sec
            record = {
                "step": current,
                "loss": loss,
                "learning_rate": optimizers_lib.current_learning_rate(optimizer),
                "steps_per_sec": steps_per_sec,
                "examples_per_sec": steps_per_sec * global_batch,
                "step_time_ms": 1000.0 / steps_per_sec,
            }
            logging.info(
                "%s step %d/%d  loss %.4f  %.2f steps/s  %.0f examples/s  "
                "ETA %s", task.name, current, config.train_steps, loss,
                steps_per_sec, steps_per_sec * global_batch,
                _format_seconds(eta))
            last = current >= config.train_steps
            if ((last and config.final_eval) or
                    (config.eval_every and current % config.eval_every == 0)):
                record.update(eval_fn(current))
            log.write(record)
            result.update(record)
            if last or current % config.checkpoint_every == 0:
                # The loss is measured before each step's update: the last
                # update may still have made the weights non-finite.
                if not all_finite(model.trainable_variables):
                    raise NonFiniteLossError(
                        f"{task.name}: the weights became NaN or infinite by "
                        f"step {current} (last loss {loss}). Stopped without "
                        "saving; the last good checkpoint is "
                        f"{tf.train.latest_checkpoint(model_dir)}. Try a lower "
                        "--learning_rate or a longer --warmup_steps.")
                manager.save(checkpoint_number=current)
            preemption.save_checkpoint_if_preempted(checkpoint_number=current)
        if start_step >= config.train_steps:
            logging.info("%s: already trained to step %d (>= --train_steps=%d);"
                         " nothing to train.", task.name, start_step,
                         config.train_steps)
            if config.final_eval:
                result.update(eval_fn(start_step))
    except _Preempted:
        logging.warning("%s: SIGTERM received; saved a checkpoint at step %d in "
                        "%s and stopped. Rerun the same command to resume.",
                        task.name, int(step.numpy()), model_dir)
        result["preempted"] = True
        result["step"] = int(step.numpy())
    finally:
        log.close()
        if sigterm_handler is not None:
            signal.signal(signal.SIGTERM, sigterm_handler)
        if not is_chief and os.path.isdir(os.path.dirname(write_dir)):
            shutil.rmtree(os.path.dirname(write_dir), ignore_errors=True)
    result["train_seconds"] = time.time() - run_start
    result["model"] = model
    result["weights_sha256"] = weights_digest(model)
    return result


def all_finite(variables):
    return all(bool(np.all(np.isfinite(v.numpy()))) for v in variables)


def weights_digest(model):
    """SHA-256 of every model weight's bytes: equal digests, equal models.

    Lets separate processes (workers, a resumed run and a straight one)
    compare their final weights exactly.
    """
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def _make_evaluator(task, strategy, model, global_batch, config):
    """A function step -> eval metrics (prefixed `eval_`), logging them."""

    def replica_eval(batch):
        if distribute.is_tpu(strategy):  # static shapes, never empty
            return task.eval_outputs(model, batch)
        # The last global batch may leave a replica with 0 examples, which
        # some Keras layers cannot take: append one zero example and drop
        # its outputs.
        size = tf.shape(tf.nest.flatten(batch)[0])[0]
        padded = tf.nest.map_structure(
            lambda x: tf.pad(x, [[0, 1]] + [[0, 0]] * (x.shape.rank - 1))
            if x.shape.rank else x, batch)
        outputs = task.eval_outputs(model, padded)
        return {k: v[:size] for k, v in outputs.items()}

    @tf.function
    def eval_batch(batch):
        outputs = strategy.run(replica_eval, args=(batch,))
        # All-gather: every worker sees the whole evaluation's outputs.
        return {k: strategy.gather(v, axis=0) for k, v in outputs.items()}

    def evaluate(current_step):
        dataset = strategy.distribute_datasets_from_function(
            lambda ctx: task.eval_dataset(global_batch, ctx))
        start = time.time()
        gathered = {}
        for index, batch in enumerate(dataset):
            if config.eval_steps and index >= config.eval_steps:
                break
            for key, value in eval_batch(batch).items():
                gathered.setdefault(key, []).append(value.numpy())
        outputs = {k: np.concatenate(v, axis=0) for k, v in gathered.items()}
        metrics = {f"eval_{k}": float(v)
                   for k, v in task.eval_metrics(outputs).items()}
        metrics["eval_seconds"] = time.time() - start
        logging.info("%s eval at step %d: %s", task.name, current_step,
                     "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    return evaluate
