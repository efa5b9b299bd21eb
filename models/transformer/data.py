"""Translation inputs: the offline pydoc_data reversal task and WMT'14 via tfds.

Offline task (`pydoc_reverse`): runs of 3 to 10 words from the English
sentences in CPython's `pydoc_data.topics` (the help() texts that ship with
Python), each "translated" into the same words in reverse order. It is deterministic and real text, so
a model that learns it scores a high BLEU and one that does not scores low.

Text becomes ids with one sentencepiece model for both languages (ids: 0 pad,
1 end of sentence, 2 unknown), trained on the training data and cached in a
`vocab/` folder of `--model_dir`; a rerun reads it back.

Every batch is a dict of int32 `source` and `target` [b, max_length], padded
to max_length so shapes are static (XLA, TPU).
"""

import io
import os
import re
import tempfile

import numpy as np
import tensorflow as tf

from models.common import datasets
from models.transformer.model import EOS_ID, PAD_ID

DATASETS = ("pydoc_reverse", "wmt14_en_de", "wmt14_en_fr")
_TFDS = {"wmt14_en_de": ("wmt14_translate/de-en", "de"),
         "wmt14_en_fr": ("wmt14_translate/fr-en", "fr")}
_PYDOC_TEST_SENTENCES = 400
_MIN_WORDS = 3
_MAX_WORDS = 10


# ---------------------------------------------------------------- pydoc_data


def pydoc_sentences_by_topic():
    """{topic: [sentence as a list of words]} from CPython's pydoc_data.topics.

    Plain ASCII paragraphs only (no interactive-session examples), markup
    characters removed, split after '.', '!' and '?'.
    """
    from pydoc_data.topics import topics
    result = {}
    for name in sorted(topics):
        sentences = []
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            if not paragraph.isascii() or ">>>" in paragraph or re.search(
                    r"[*=~-]{5}", paragraph):
                continue
            text = " ".join(paragraph.replace("*", "").replace('"', "").split())
            sentences += [s.split() for s in re.split(r"(?<=[.!?])\s+", text)
                          if len(s.split()) >= _MIN_WORDS]
        result[name] = sentences
    return result


def reverse_words(sentence):
    """The task's deterministic "translation": the words in reverse order."""
    return " ".join(reversed(sentence.split()))


def pydoc_pairs():
    """(train pairs, test pairs), lists of (source, target) strings.

    Every eighth sentence is held out, so test sentences are ones the model
    never saw. Training uses a window of 3 to 10 words starting at every
    word of a sentence (about 40k pairs: enough variety to learn the rule
    rather than the sentences); the test set, 400 word runs of 4 to 10
    non-overlapping words.
    """
    by_topic = pydoc_sentences_by_topic()
    train, test = [], []
    sentences = [words for name in sorted(by_topic) for words in by_topic[name]]
    for index, words in enumerate(sentences):
        if index % 8 == 7:
            for start in range(0, len(words), _MAX_WORDS):
                run = words[start:start + _MAX_WORDS]
                if len(run) >= 4:
                    test.append(" ".join(run))
        else:
            for start in range(len(words)):
                length = 3 + (start + len(words)) % (_MAX_WORDS - 2)
                run = words[start:start + length]
                if len(run) >= 3:
                    train.append(" ".join(run))
    rng = np.random.default_rng(0)
    train = [train[i] for i in rng.permutation(len(train))]
    test = sorted(set(test))
    test = [test[i] for i in rng.permutation(len(test))[:_PYDOC_TEST_SENTENCES]]
    return ([(s, reverse_words(s)) for s in train],
            [(s, reverse_words(s)) for s in test])


# ---------------------------------------------------------------- vocabulary


def build_vocabulary(texts_fn, vocab_size, path, is_chief=True):
    """Loads the sentencepiece model at `path`, training it from `texts_fn()`
    (a list of strings) first when it does not exist. Returns a `sentencepiece.SentencePieceProcessor`.

    Only the chief writes the file (atomically); other workers train the same
    model in memory (one thread, fixed order: deterministic).
    """
    import sentencepiece as spm
    if tf.io.gfile.exists(path):
        return spm.SentencePieceProcessor(
            model_proto=tf.io.gfile.GFile(path, "rb").read())
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts_fn()), model_writer=proto,
        vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    if is_chief:
        tf.io.gfile.makedirs(os.path.dirname(path))
        with tempfile.NamedTemporaryFile(
                dir=os.path.dirname(path), delete=False) as f:
            f.write(proto.getvalue())
        os.replace(f.name, path)
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def encode(processor, text, max_length):
    """Ids of `text` plus EOS_ID, or None when longer than max_length."""
    ids = processor.encode(text) + [EOS_ID]
    return ids if len(ids) <= max_length else None


def _pad(rows, max_length):
    out = np.full((len(rows), max_length), PAD_ID, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def encode_pairs(processor, pairs, max_length):
    """Padded int32 arrays (source, target), dropping pairs that do not fit."""
    sources, targets = [], []
    for source, target in pairs:
        s, t = encode(processor, source, max_length), encode(processor, target, max_length)
        if s is not None and t is not None:
            sources.append(s)
            targets.append(t)
    return _pad(sources, max_length), _pad(targets, max_length)


# ---------------------------------------------------------------- pipelines


def _batch(dataset, global_batch_size, input_context, train):
    batch = datasets.per_replica_batch_size(global_batch_size, input_context)
    if train:
        return datasets.finish_training_dataset(
            dataset.batch(batch, drop_remainder=True))
    return dataset.batch(batch).prefetch(tf.data.AUTOTUNE)


def arrays_dataset(source, target, global_batch_size, input_context, train,
                   start_step=0, seed=0):
    """Batches of pre-encoded (source, target) arrays."""
    dataset = tf.data.Dataset.from_tensor_slices({"source": source, "target": target})
    dataset = datasets.shard_for_pipeline(dataset, input_context)
    if train:
        dataset = dataset.shuffle(len(source), seed=seed).repeat()
        dataset = datasets.skip_consumed(dataset, start_step, global_batch_size,
                                         input_context)
    return _batch(dataset, global_batch_size, input_context, train)


def wmt_text_pairs(name, split, data_dir, limit=None):
    """(english, foreign) byte-string pairs of a WMT'14 split, as a tf.data.Dataset."""
    tfds_name, foreign = _TFDS[name]
    dataset = datasets.load_tfds_split(tfds_name, split, data_dir)
    dataset = dataset.map(lambda ex: (ex["en"], ex[foreign]))
    return dataset.take(limit) if limit else dataset


def wmt_dataset(name, processor, split, data_dir, max_length, global_batch_size,
                input_context, train, start_step=0, seed=0):
    """Batches of a WMT'14 split, tokenized on the fly (English -> foreign)."""
    dataset = wmt_text_pairs(name, split, data_dir)
    dataset = datasets.shard_for_pipeline(dataset, input_context)

    def tokenize(source, target):
        s = processor.encode(source.decode("utf-8")) + [EOS_ID]
        t = processor.encode(target.decode("utf-8")) + [EOS_ID]
        return np.array(s, np.int32), np.array(t, np.int32)

    def to_ids(source, target):
        # stateful=False: the tokenizer is a pure function, and it keeps the
        # pipeline's iterator checkpointable.
        s, t = tf.numpy_function(tokenize, [source, target],
                                 [tf.int32, tf.int32], stateful=False)
        return tf.reshape(s, [-1]), tf.reshape(t, [-1])

    dataset = dataset.map(to_ids, num_parallel_calls=tf.data.AUTOTUNE)
    if train:
        dataset = dataset.filter(lambda s, t: tf.logical_and(
            tf.size(s) <= max_length, tf.size(t) <= max_length))
    else:  # evaluation keeps every sentence, cut to max_length
        dataset = dataset.map(lambda s, t: (s[:max_length], t[:max_length]))
    dataset = dataset.map(lambda s, t: {
        "source": tf.pad(s, [[0, max_length - tf.size(s)]]),
        "target": tf.pad(t, [[0, max_length - tf.size(t)]])})
    dataset = dataset.map(lambda ex: {k: tf.ensure_shape(v, [max_length])
                                      for k, v in ex.items()})
    if train:
        # Skipping after the length filter keeps the count of consumed
        # examples exact; the skipped sentences are still tokenized.
        dataset = dataset.shuffle(20_000, seed=seed).repeat()
        dataset = datasets.skip_consumed(dataset, start_step, global_batch_size,
                                         input_context)
    return _batch(dataset, global_batch_size, input_context, train)
