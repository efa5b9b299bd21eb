"""The Transformer of Vaswani et al. (2017) in Keras 3, with greedy and beam decoding.

One shared sub-word vocabulary: the source embedding, the target embedding
and the output projection are the same matrix, as in the paper. Layer
normalization comes before each sub-layer (pre-norm, as in tensorflow/models'
official Transformer), which trains without the paper's long warm-up.

Token ids: 0 is padding and also the decoder's start token, 1 is end of
sentence (the sentencepiece vocabulary is built with those ids).
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers

PAD_ID = 0
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class TransformerParams:
    d_model: int
    d_ff: int
    num_heads: int
    num_layers: int
    dropout: float


CONFIGS = {
    "tiny": TransformerParams(d_model=32, d_ff=64, num_heads=2, num_layers=1, dropout=0.0),
    "small": TransformerParams(d_model=64, d_ff=256, num_heads=4, num_layers=2, dropout=0.1),
    "base": TransformerParams(d_model=512, d_ff=2048, num_heads=8, num_layers=6, dropout=0.1),
    "big": TransformerParams(d_model=1024, d_ff=4096, num_heads=16, num_layers=6, dropout=0.3),
}


def positional_encoding(length, depth):
    """The paper's sinusoids, [length, depth] float32."""
    positions = np.arange(length)[:, None]
    rates = 1.0 / np.power(10000.0, (2 * (np.arange(depth) // 2)) / depth)
    angles = positions * rates[None, :]
    encoding = np.zeros((length, depth), np.float32)
    encoding[:, 0::2] = np.sin(angles[:, 0::2])
    encoding[:, 1::2] = np.cos(angles[:, 1::2])
    return encoding


class _FeedForward(layers.Layer):
    def __init__(self, params, **kwargs):
        super().__init__(**kwargs)
        self.norm = layers.LayerNormalization(epsilon=1e-6)
        self.inner = layers.Dense(params.d_ff, activation="relu")
        self.outer = layers.Dense(params.d_model)
        self.dropout = layers.Dropout(params.dropout)

    def call(self, x, training=False):
        y = self.outer(self.dropout(self.inner(self.norm(x)), training=training))
        return x + self.dropout(y, training=training)


class _Attention(layers.Layer):
    """Pre-norm multi-head attention with a residual connection."""

    def __init__(self, params, **kwargs):
        super().__init__(**kwargs)
        self.norm = layers.LayerNormalization(epsilon=1e-6)
        self.attention = layers.MultiHeadAttention(
            params.num_heads, params.d_model // params.num_heads,
            dropout=params.dropout)
        self.dropout = layers.Dropout(params.dropout)

    # `attention_mask`, not `mask`: Keras gives a `mask` argument its own
    # meaning (propagated Keras masks).
    def call(self, x, context=None, attention_mask=None, causal=False,
             training=False):
        y = self.norm(x)
        context = y if context is None else context
        y = self.attention(y, context, attention_mask=attention_mask,
                           use_causal_mask=causal, training=training)
        return x + self.dropout(y, training=training)


class Transformer(keras.Model):
    """Encoder-decoder Transformer: `model((source, decoder_input))` -> logits.

    source, decoder_input: int32 [batch, length]; the decoder input is the
    target shifted right by one with PAD_ID (= start) in front. Logits are
    float32 [batch, target_length, vocab_size] under any precision policy.
    """

    def __init__(self, params, vocab_size, max_length, **kwargs):
        super().__init__(**kwargs)
        self.params = params
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.embedding = layers.Embedding(
            vocab_size, params.d_model, name="shared_embedding",
            embeddings_initializer=keras.initializers.RandomNormal(
                stddev=params.d_model**-0.5))
        self.positions = tf.constant(positional_encoding(max_length + 1, params.d_model))
        self.input_dropout = layers.Dropout(params.dropout)
        self.encoder_self = [_Attention(params, name=f"encoder{i}_self")
                             for i in range(params.num_layers)]
        self.encoder_ffn = [_FeedForward(params, name=f"encoder{i}_ffn")
                            for i in range(params.num_layers)]
        self.decoder_self = [_Attention(params, name=f"decoder{i}_self")
                             for i in range(params.num_layers)]
        self.decoder_cross = [_Attention(params, name=f"decoder{i}_cross")
                              for i in range(params.num_layers)]
        self.decoder_ffn = [_FeedForward(params, name=f"decoder{i}_ffn")
                            for i in range(params.num_layers)]
        self.encoder_norm = layers.LayerNormalization(epsilon=1e-6)
        self.decoder_norm = layers.LayerNormalization(epsilon=1e-6)

    def _embed(self, ids, training):
        x = self.embedding(ids) * math.sqrt(self.params.d_model)
        length = tf.shape(ids)[1]
        x = x + tf.cast(self.positions[:length], x.dtype)[None]
        return self.input_dropout(x, training=training)

    def encode(self, source, training=False):
        """Returns (encoder output, source attention mask [b, 1, s])."""
        mask = tf.not_equal(source, PAD_ID)[:, None, :]
        x = self._embed(source, training)
        for attention, ffn in zip(self.encoder_self, self.encoder_ffn):
            x = attention(x, attention_mask=mask, training=training)
            x = ffn(x, training=training)
        return self.encoder_norm(x), mask

    def decode(self, decoder_input, encoded, source_mask, training=False):
        """Float32 logits [b, t, vocab] for every decoder position."""
        x = self._embed(decoder_input, training)
        for self_attention, cross, ffn in zip(
                self.decoder_self, self.decoder_cross, self.decoder_ffn):
            x = self_attention(x, causal=True, training=training)
            x = cross(x, context=encoded, attention_mask=source_mask,
                      training=training)
            x = ffn(x, training=training)
        x = self.decoder_norm(x)
        # The output projection is the embedding matrix (shared weights).
        weights = tf.cast(self.embedding.embeddings, x.dtype)
        logits = tf.einsum("btd,vd->btv", x, weights)
        return tf.cast(logits, tf.float32)

    def call(self, inputs, training=False):
        source, decoder_input = inputs
        encoded, mask = self.encode(source, training=training)
        return self.decode(decoder_input, encoded, mask, training=training)


def shift_right(targets):
    """Decoder input for teacher forcing: PAD_ID (the start token), then targets[:-1]."""
    return tf.pad(targets, [[0, 0], [1, 0]], constant_values=PAD_ID)[:, :-1]


@tf.function
def greedy_decode(model, source, max_length):
    """Argmax decoding; int32 [b, max_length], PAD_ID after the first EOS_ID.

    No key/value cache: each step reruns the decoder over a fixed-length
    buffer, so every shape is static (what XLA and TPUs need) at the cost of
    quadratic work in `max_length`, which is small for these models.
    """
    encoded, mask = model.encode(source, training=False)
    batch = tf.shape(source)[0]
    tokens = tf.zeros([batch, max_length + 1], tf.int32)  # column 0: start
    finished = tf.zeros([batch], tf.bool)
    for t in tf.range(max_length):
        logits = model.decode(tokens[:, :max_length], encoded, mask)
        next_id = tf.argmax(tf.gather(logits, t, axis=1), axis=-1,
                            output_type=tf.int32)
        next_id = tf.where(finished, PAD_ID, next_id)
        tokens += next_id[:, None] * tf.one_hot(t + 1, max_length + 1, dtype=tf.int32)
        finished = finished | tf.equal(next_id, EOS_ID)
    return tokens[:, 1:]


@tf.function
def beam_search_decode(model, source, max_length, beam_size=4, alpha=0.6):
    """Beam search with the GNMT length penalty ((5 + len) / 6) ** alpha.

    Returns int32 [b, max_length], the best beam per sentence. A beam that
    emitted EOS_ID can only be extended by PAD_ID at no cost, so finished
    hypotheses keep competing with the live ones. Static shapes throughout.
    """
    encoded, mask = model.encode(source, training=False)
    batch = tf.shape(source)[0]
    vocab = model.vocab_size
    # Every beam of a sentence shares its encoder output: tile along batch.
    encoded = tf.repeat(encoded, beam_size, axis=0)
    mask = tf.repeat(mask, beam_size, axis=0)
    tokens = tf.zeros([batch, beam_size, max_length + 1], tf.int32)
    # Only the first beam is live at the start, or all beams would be equal.
    scores = tf.tile(tf.constant([[0.0] + [-1e9] * (beam_size - 1)]), [batch, 1])
    finished = tf.zeros([batch, beam_size], tf.bool)
    pad_only = tf.one_hot(PAD_ID, vocab, on_value=0.0, off_value=-1e9)
    for t in tf.range(max_length):
        flat = tf.reshape(tokens, [batch * beam_size, max_length + 1])
        logits = model.decode(flat[:, :max_length], encoded, mask)
        log_probs = tf.nn.log_softmax(tf.gather(logits, t, axis=1))
        log_probs = tf.reshape(log_probs, [batch, beam_size, vocab])
        log_probs = tf.where(finished[..., None], pad_only, log_probs)
        candidates = tf.reshape(scores[..., None] + log_probs,
                                [batch, beam_size * vocab])
        scores, index = tf.math.top_k(candidates, k=beam_size)
        parent = index // vocab
        next_id = index % vocab
        tokens = tf.gather(tokens, parent, batch_dims=1)
        finished = tf.gather(finished, parent, batch_dims=1)
        tokens += next_id[..., None] * tf.one_hot(t + 1, max_length + 1, dtype=tf.int32)
        finished = finished | tf.equal(next_id, EOS_ID)
    lengths = tf.reduce_sum(tf.cast(tf.not_equal(tokens[..., 1:], PAD_ID), tf.float32), -1)
    penalty = tf.pow((5.0 + lengths) / 6.0, alpha)
    best = tf.argmax(scores / penalty, axis=-1, output_type=tf.int32)
    return tf.gather(tokens, best, batch_dims=1)[:, 1:]
