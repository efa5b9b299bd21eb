"""The translation task: Transformer, vocabulary, label-smoothed loss, BLEU."""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from models.transformer import data
from models.transformer import model as model_lib


@dataclasses.dataclass
class TransformerConfig:
    dataset: str = "pydoc_reverse"
    data_dir: str = None
    model_dir: str = "/tmp/sm3_transformer"
    size: str = "base"            # tiny, small, base, big
    vocab_size: int = 32000
    max_length: int = 64          # tokens, source and target, with EOS
    label_smoothing: float = 0.1
    beam_size: int = 4            # 1: greedy decoding
    length_penalty: float = 0.6
    vocab_sentences: int = 200_000  # WMT sentences (each side) for the vocabulary
    is_chief: bool = True
    seed: int = 0


class TranslationTask:
    """Bundles the Transformer, its input pipelines, the loss and BLEU."""

    def __init__(self, config):
        if config.dataset not in data.DATASETS:
            raise ValueError(f"--dataset for the Transformer must be one of "
                             f"{', '.join(data.DATASETS)}; got {config.dataset!r}.")
        if config.size not in model_lib.CONFIGS:
            raise ValueError(f"--transformer_size must be one of "
                             f"{', '.join(model_lib.CONFIGS)}; got {config.size!r}.")
        self.config = config
        self.params = model_lib.CONFIGS[config.size]
        self.name = f"transformer_{config.size}/{config.dataset}"
        vocab_path = os.path.join(
            config.model_dir, "vocab",
            f"{config.dataset}_spm{config.vocab_size}.model")
        if config.dataset == "pydoc_reverse":
            train_pairs, test_pairs = data.pydoc_pairs()
            self.processor = data.build_vocabulary(
                lambda: [s for pair in train_pairs for s in pair],
                config.vocab_size, vocab_path, config.is_chief)
            self._train_arrays = data.encode_pairs(
                self.processor, train_pairs, config.max_length)
            self._test_arrays = data.encode_pairs(
                self.processor, test_pairs, config.max_length)
        else:
            self.processor = data.build_vocabulary(
                self._wmt_vocabulary_texts, config.vocab_size, vocab_path,
                config.is_chief)
        # sentencepiece may stop below the asked size on little text.
        self.vocab_size = self.processor.get_piece_size()

    def _wmt_vocabulary_texts(self):
        pairs = data.wmt_text_pairs(self.config.dataset, "train",
                                    self.config.data_dir,
                                    limit=self.config.vocab_sentences)
        return [text.decode("utf-8") for pair in pairs.as_numpy_iterator()
                for text in pair]

    def build_model(self):
        model = model_lib.Transformer(self.params, self.vocab_size,
                                      self.config.max_length)
        dummy = tf.zeros([1, self.config.max_length], tf.int32)
        model((dummy, dummy))
        return model

    def train_dataset(self, global_batch_size, input_context, start_step=0):
        if self.config.dataset == "pydoc_reverse":
            return data.arrays_dataset(*self._train_arrays, global_batch_size,
                                       input_context, train=True,
                                       start_step=start_step, seed=self.config.seed)
        return data.wmt_dataset(self.config.dataset, self.processor, "train",
                                self.config.data_dir, self.config.max_length,
                                global_batch_size, input_context, train=True,
                                start_step=start_step, seed=self.config.seed)

    def eval_dataset(self, global_batch_size, input_context):
        if self.config.dataset == "pydoc_reverse":
            return data.arrays_dataset(*self._test_arrays, global_batch_size,
                                       input_context, train=False)
        # newstest2014 is tfds's "test" split of wmt14_translate.
        return data.wmt_dataset(self.config.dataset, self.processor, "test",
                                self.config.data_dir, self.config.max_length,
                                global_batch_size, input_context, train=False)

    def per_example_loss(self, model, batch, training=True):
        """Label-smoothed cross-entropy, the mean over each sentence's tokens."""
        targets = batch["target"]
        logits = model((batch["source"], model_lib.shift_right(targets)),
                       training=training)
        smoothing = self.config.label_smoothing
        vocab = self.vocab_size
        labels = tf.one_hot(targets, vocab, on_value=1.0 - smoothing,
                            off_value=smoothing / (vocab - 1))
        token_loss = tf.nn.softmax_cross_entropy_with_logits(labels, logits)
        weights = tf.cast(tf.not_equal(targets, model_lib.PAD_ID), tf.float32)
        return (tf.reduce_sum(token_loss * weights, axis=-1)
                / tf.maximum(tf.reduce_sum(weights, axis=-1), 1.0))

    def eval_outputs(self, model, batch):
        if self.config.beam_size > 1:
            decoded = model_lib.beam_search_decode(
                model, batch["source"], self.config.max_length,
                self.config.beam_size, self.config.length_penalty)
        else:
            decoded = model_lib.greedy_decode(model, batch["source"],
                                              self.config.max_length)
        return {"decoded": decoded, "reference": batch["target"]}

    def detokenize(self, ids):
        ids = [int(i) for i in ids]
        if model_lib.EOS_ID in ids:
            ids = ids[:ids.index(model_lib.EOS_ID)]
        return self.processor.decode([i for i in ids if i != model_lib.PAD_ID])

    def eval_metrics(self, outputs):
        import sacrebleu
        hypotheses = [self.detokenize(row) for row in outputs["decoded"]]
        references = [self.detokenize(row) for row in outputs["reference"]]
        if not hypotheses:
            return {"bleu": 0.0, "sentences": 0.0, "exact_match": 0.0}
        bleu = sacrebleu.corpus_bleu(hypotheses, [references])
        exact = np.mean([h == r for h, r in zip(hypotheses, references)])
        return {"bleu": bleu.score, "sentences": float(len(hypotheses)),
                "exact_match": float(exact)}

    def quality_line(self, metrics):
        decoding = (f"beam search ({self.config.beam_size} beams)"
                    if self.config.beam_size > 1 else "greedy decoding")
        return (f"BLEU {metrics['eval_bleu']:.2f} (sacrebleu, {decoding}) on "
                f"{int(metrics['eval_sentences'])} held-out {self.config.dataset} "
                f"sentences; {100 * metrics['eval_exact_match']:.1f}% exactly right")
