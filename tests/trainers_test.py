"""Reference trainers (models/, scripts/train.py), in-process: flags, data, models.

Every run here is tiny (a few steps of a tiny configuration); the runs that
need their own process (multi-worker, kill -9, SIGTERM) are in
trainers_distributed_test.py.
"""

import json
import math
import os
import time

import keras
import numpy as np
import pytest
import sacrebleu
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

from models import train_lib
from models.common import datasets
from models.common import loop
from models.common import optimizers
from models.transformer import data as transformer_data
from models.transformer import model as transformer_model

TINY_RESNET = ["--model=resnet", "--resnet_depth=10", "--resnet_width=4"]
TINY_TRANSFORMER = ["--model=transformer", "--transformer_size=tiny",
                    "--vocab_size=64", "--max_length=16", "--beam_size=2"]


def run(model_dir, *argv):
    config = train_lib.config_from_flags(
        train_lib.parse_flags([f"--model_dir={model_dir}", *argv]))
    return train_lib.run(config)


def read_metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------ flags


@pytest.mark.parametrize("argv, flag", [
    (["--learning_rate=-1"], "learning_rate"),
    (["--momentum=1"], "momentum"),
    (["--beta2=0"], "beta2"),
    (["--train_steps=0"], "train_steps"),
    (["--warmup_steps=10", "--train_steps=5"], "warmup_steps"),
    (["--optimizer=adam", "--cooldown_steps=3"], "cooldown_steps"),
    (["--optimizer=adam", "--sm3_cpu_kernel"], "sm3_cpu_kernel"),
    (["--optimizer=adam", "--nosm3_cpu_kernel"], "sm3_cpu_kernel"),
    (["--optimizer=sgd", "--sm3_momentum_dtype=bfloat16"],
     "sm3_momentum_dtype"),
    (["--momentum=0", "--sm3_momentum_dtype=bfloat16"], "sm3_momentum_dtype"),
    (["--dataset=wmt14_en_de"], "dataset"),
    (["--model=transformer", "--dataset=digits"], "dataset"),
    (["--resnet_depth=20"], "resnet_depth"),
    (["--tpu=grpc://10.0.0.1:8470", "--strategy=mirrored"], "tpu"),
    (["--jit_compile", "--strategy=mirrored"], "jit_compile"),
    (["--label_smoothing=1.5"], "label_smoothing"),
    (["--beam_size=2"], "beam_size"),  # a Transformer flag on the ResNet
    (["--model=transformer", "--resnet_depth=18"], "resnet_depth"),
])
def test_bad_flag_value_names_the_flag(argv, flag):
    with pytest.raises(flags.ValidationError, match=f"--{flag}"):
        train_lib.config_from_flags(train_lib.parse_flags(argv))


@pytest.mark.parametrize("argv, flag", [
    (["--optimizer=lamb"], "optimizer"),
    (["--strategy=parameter_server"], "strategy"),
    (["--mixed_precision=float16"], "mixed_precision"),
    (["--sm3_momentum_dtype=float16"], "sm3_momentum_dtype"),
    (["--steps_per_loop=0"], "steps_per_loop"),
])
def test_absl_rejects_bad_enums_and_bounds_naming_the_flag(argv, flag):
    with pytest.raises(flags.IllegalFlagValueError, match=flag):
        train_lib.parse_flags(argv)


def test_defaults_are_the_offline_jobs():
    resnet = train_lib.config_from_flags(train_lib.parse_flags([]))
    assert (resnet.model, resnet.dataset, resnet.optimizer) == ("resnet", "digits", "sm3")
    assert resnet.strategy == "one_device"  # no GPU, no --tpu
    assert resnet.warmup_steps == int(0.05 * resnet.train_steps)
    transformer = train_lib.config_from_flags(
        train_lib.parse_flags(["--model=transformer"]))
    assert transformer.dataset == "pydoc_reverse"


@pytest.mark.parametrize("argv, cpu_kernel", [
    ([], "auto"), (["--sm3_cpu_kernel"], True),
    (["--nosm3_cpu_kernel"], False)])
def test_sm3_cpu_kernel_flag_reaches_the_optimizer(argv, cpu_kernel):
    config = train_lib.config_from_flags(train_lib.parse_flags(argv))
    optimizer = train_lib.build_optimizer(config)
    assert optimizer.cpu_kernel == cpu_kernel
    assert type(optimizer.cpu_kernel) is type(cpu_kernel)


@pytest.mark.parametrize("argv, dtype", [
    ([], "float32"), (["--sm3_momentum_dtype=bfloat16"], "bfloat16"),
    (["--sm3_momentum_dtype=float32"], "float32")])
def test_sm3_momentum_dtype_flag_reaches_the_optimizer(argv, dtype):
    config = train_lib.config_from_flags(train_lib.parse_flags(argv))
    optimizer = train_lib.build_optimizer(config)
    variable = keras.Variable(np.ones([3, 2], np.float32))
    optimizer.build([variable])
    assert optimizer.momentum_for(variable).dtype == dtype


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_every_optimizer_takes_a_step_with_its_schedule(name):
    optimizer = optimizers.build_optimizer(
        name, 0.1, train_steps=10, warmup_steps=2,
        cooldown_steps=2 if name == "sm3" else 0)
    variable = keras.Variable(np.ones([3, 2], np.float32))
    # Every warm-up starts at a rate of 0: the first step changes nothing.
    optimizer.apply_gradients([(tf.ones([3, 2]), variable)])
    np.testing.assert_array_equal(variable.numpy(), 1.0)
    if name == "sm3":
        import sm3_tf
        assert isinstance(optimizer, sm3_tf.SM3)
        assert isinstance(optimizer._learning_rate, sm3_tf.QuadraticWarmup)
        # Quadratic warm-up: (1/2)**2 of the peak at step 1 of 2.
        assert optimizers.current_learning_rate(optimizer) == pytest.approx(0.025)
    else:
        assert optimizers.current_learning_rate(optimizer) == pytest.approx(0.05)
    optimizer.apply_gradients([(tf.ones([3, 2]), variable)])
    assert np.all(variable.numpy() < 1.0)


# ------------------------------------------------------------------ runs


@pytest.mark.slow
def test_default_resnet_on_digits_learns_with_sm3_and_logs(tmp_path):
    # The default job, shortened from 400 to 100 steps (README: the full one).
    result = run(tmp_path, "--train_steps=100")
    assert result["eval_accuracy"] >= 0.9, result
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [50, 100]
    assert records[-1]["loss"] < records[0]["loss"]
    for key in ("loss", "learning_rate", "steps_per_sec", "examples_per_sec",
                "step_time_ms"):
        assert math.isfinite(records[-1][key])
    assert records[-1]["eval_accuracy"] == result["eval_accuracy"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-100")
    # A rerun with a larger --train_steps resumes at the checkpoint.
    again = run(tmp_path, "--train_steps=102", "--steps_per_loop=2")
    assert [r["step"] for r in read_metrics(tmp_path)][-1] == 102
    assert (again["start_step"], again["step"]) == (100, 102)


@pytest.mark.slow
def test_transformer_learns_the_offline_reversal_task_with_sm3(tmp_path):
    # The default job's task and recipe (README: the small Transformer),
    # with the tiny Transformer for 400 steps and the default job's 100-step
    # warm-up (SM3 at 0.3 after a 20-step warm-up was still at loss 4.7 by
    # step 400), scored greedily on 128 held-out sentences. It reached BLEU
    # 23 and loss 2.6 from 5.9; an untrained model scores about 0.5 BLEU.
    result = run(tmp_path, "--model=transformer", "--transformer_size=tiny",
                 "--train_steps=400", "--warmup_steps=100",
                 "--steps_per_loop=100", "--beam_size=1", "--eval_steps=2")
    assert result["eval_sentences"] == 128
    assert result["eval_bleu"] >= 15, result
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("dataset, extra", [
    ("imagenet2012", ["--image_size=64"]),  # the ImageNet stem and crops
    ("cifar10", []),
])
@pytest.mark.slow
def test_resnet_trains_on_tfds_mock_data(tmp_path, dataset, extra):
    with tfds.testing.mock_data(num_examples=8):
        result = run(tmp_path, *TINY_RESNET, f"--dataset={dataset}",
                     "--data_dir=/nonexistent", "--train_steps=2",
                     "--batch_size=4", "--steps_per_loop=1", *extra)
    assert result["step"] == 2 and math.isfinite(result["loss"])
    assert result["eval_examples"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["wmt14_en_de", "wmt14_en_fr"])
def test_transformer_trains_on_tfds_mock_data_and_scores_bleu(tmp_path, dataset):
    with tfds.testing.mock_data(num_examples=8):
        result = run(tmp_path, *TINY_TRANSFORMER, f"--dataset={dataset}",
                     "--data_dir=/nonexistent", "--train_steps=2",
                     "--batch_size=4", "--steps_per_loop=1")
        # The final model's decoding of the test split, again, batch by batch
        # as the run decoded it, and the split's target sentences.
        task, model = result["task"], result["model"]
        decoded, reference = [], []
        for batch in task.eval_dataset(4, None):
            outputs = task.eval_outputs(model, batch)
            decoded += list(outputs["decoded"].numpy())
            reference += list(outputs["reference"].numpy())
        targets = [t.decode("utf-8") for _, t in tfds.as_numpy(
            transformer_data.wmt_text_pairs(dataset, "test", "/nonexistent"))]
    assert result["step"] == 2 and math.isfinite(result["loss"])
    assert result["eval_sentences"] == 8
    assert os.listdir(os.path.join(tmp_path, "vocab")) == [
        f"{dataset}_spm64.model"]
    hypotheses = [task.detokenize(ids) for ids in decoded]
    references = [task.detokenize(ids) for ids in reference]
    # It scored the test split's sentences, through the vocabulary and back
    # (sentencepiece folds runs of spaces).
    assert len(targets) == 8 and references == [" ".join(t.split()) for t in targets]
    # The BLEU and exact matches it reports (and logs) are sacrebleu's and
    # the fraction of those decodings. (tfds's mock sentences have 1 to 3
    # words, no 4-grams: their corpus BLEU is 0 whatever the decoding.)
    assert result["eval_bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=1e-9)
    assert result["eval_exact_match"] == pytest.approx(
        np.mean([h == r for h, r in zip(hypotheses, references)]))
    logged = read_metrics(tmp_path)[-1]
    assert logged["eval_bleu"] == result["eval_bleu"] and logged["step"] == 2
    # The scorer tells right from wrong: the 8 references as one sentence
    # scores 100 against itself and less with its words reversed.
    words = " ".join(references).split()

    def encode(text):  # a row as the model decodes it: EOS, then padding
        return np.array(task.processor.encode(text)
                        + [transformer_model.EOS_ID, transformer_model.PAD_ID])

    right = encode(" ".join(words))
    reversed_ = encode(" ".join(reversed(words)))
    perfect = task.eval_metrics({"decoded": right[None], "reference": right[None]})
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["exact_match"] == 1.0
    worse = task.eval_metrics({"decoded": reversed_[None], "reference": right[None]})
    assert worse["bleu"] == pytest.approx(sacrebleu.corpus_bleu(
        [" ".join(reversed(words))], [[" ".join(words)]]).score)
    assert worse["bleu"] < 100.0 and worse["exact_match"] == 0.0


def test_missing_dataset_fails_fast_naming_it_and_how_to_prepare(tmp_path):
    start = time.time()
    with pytest.raises(datasets.DatasetNotPreparedError) as error:
        run(tmp_path / "run", *TINY_RESNET, "--dataset=cifar10",
            f"--data_dir={tmp_path / 'empty'}", "--train_steps=2")
    # Long before tfds's minutes of retries. A minute, not seconds: on a
    # loaded CI machine the set-up inside it (flags, the strategy, tfds's
    # look-up of the data set) can take seconds that say nothing of tfds.
    assert time.time() - start < 60
    message = str(error.value)
    assert "'cifar10'" in message and "tfds build cifar10" in message
    assert "--data_dir" in message


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpu_devices(tmp_path):
    result = run(tmp_path, *TINY_RESNET, "--strategy=mirrored",
                 "--train_steps=4", "--batch_size=16", "--steps_per_loop=2")
    assert result["step"] == 4 and math.isfinite(result["loss"])
    # 360 test digits over 2 replicas with a last partial batch: all counted.
    assert result["eval_examples"] == 360
    kernel = result["model"].trainable_variables[0]
    replicas = kernel.value.values  # the Keras variable's tf.distribute one
    assert len(replicas) == 2
    np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())


@pytest.mark.slow
@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_transformer_on_the_offline_task_under_xla(tmp_path, cpu_kernel):
    # Both of SM3's paths under a compiled step (the default, "auto", takes
    # the kernel wherever it can run).
    from sm3_tf.kernels import native

    reason = native.build("tensorflow")
    if cpu_kernel and reason is not None:
        pytest.skip(f"CPU kernel unavailable: {reason}")
    result = run(tmp_path, "--model=transformer", "--transformer_size=tiny",
                 "--jit_compile", "--train_steps=4", "--batch_size=8",
                 "--steps_per_loop=2", "--eval_steps=1", "--beam_size=1",
                 "--sm3_cpu_kernel" if cpu_kernel else "--nosm3_cpu_kernel")
    assert result["step"] == 4 and math.isfinite(result["loss"])
    assert result["eval_sentences"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision(tmp_path, precision):
    result = run(tmp_path, *TINY_RESNET, f"--mixed_precision={precision}",
                 "--train_steps=2", "--batch_size=8", "--steps_per_loop=1",
                 "--eval_steps=1")
    assert math.isfinite(result["loss"])
    assert result["model"].layers[1].compute_dtype == precision.split("_")[1]


def test_checkpoint_of_another_optimizer_layout_fails_naming_model_dir(tmp_path):
    # SM3 without momentum keeps fewer variables: the checkpoint's do not
    # fit (as sm3_tf 0.1's per-axis accumulators do not fit 0.2's).
    common = [*TINY_RESNET, "--batch_size=8", "--steps_per_loop=1",
              "--final_eval=false"]
    run(tmp_path, *common, "--train_steps=2", "--checkpoint_every=1")
    latest = tf.train.latest_checkpoint(str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="--model_dir=.*new --model_dir"):
        run(tmp_path, *common, "--train_steps=4", "--momentum=0")
    assert tf.train.latest_checkpoint(str(tmp_path)) == latest
    assert sorted(os.listdir(tmp_path)) == files


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run(tmp_path, *TINY_RESNET, "--optimizer=sgd", "--train_steps=2",
        "--batch_size=8", "--steps_per_loop=1", "--final_eval=false")
    with pytest.raises(loop.NonFiniteLossError) as error:
        run(tmp_path, *TINY_RESNET, "--optimizer=sgd", "--learning_rate=1e30",
            "--warmup_steps=0", "--train_steps=20", "--batch_size=8",
            "--steps_per_loop=1", "--checkpoint_every=1")
    message = str(error.value)
    assert "NaN or infinite" in message or "loss is" in message
    bad_step = int(message.split(" step ")[1].split()[0].rstrip("."))
    good = tf.train.latest_checkpoint(str(tmp_path))
    assert f"the last good checkpoint is {good}." in message
    assert 2 <= int(good.rsplit("-", 1)[1]) < bad_step < 20
    reader = tf.train.load_checkpoint(good)
    for key in reader.get_variable_to_shape_map():
        value = reader.get_tensor(key)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), key


def test_beam_search_with_one_beam_is_greedy_decoding():
    tf.random.set_seed(1)
    model = transformer_model.Transformer(
        transformer_model.CONFIGS["tiny"], vocab_size=20, max_length=6)
    source = tf.constant([[5, 6, 7, 1, 0, 0], [3, 1, 0, 0, 0, 0]])
    model((source, source))
    greedy = transformer_model.greedy_decode(model, source, 6)
    beam = transformer_model.beam_search_decode(model, source, 6, beam_size=1)
    np.testing.assert_array_equal(greedy.numpy(), beam.numpy())
    wide = transformer_model.beam_search_decode(model, source, 6, beam_size=3)
    assert wide.shape == (2, 6)
    # After the end of sentence, only padding.
    for row in wide.numpy():
        ids = list(row)
        if transformer_model.EOS_ID in ids:
            assert not any(ids[ids.index(transformer_model.EOS_ID) + 1:])
