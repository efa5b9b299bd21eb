"""Variable sets of well-known models, as shapes (for benchmarks and reports).

Shapes only: a 340 M-parameter model is described without allocating it.
ResNet-50 comes from `keras.applications` (built once, ~100 MB).
"""

import math


def resnet50():
    import keras

    model = keras.applications.ResNet50(weights=None)
    return [(v.path, tuple(v.shape)) for v in model.trainable_variables]


def transformer(d=1024, ff=4096, layers=6, vocab=32000):
    """Vaswani et al.'s Transformer: shared embedding, `layers`+`layers`."""
    def attention(prefix):
        return [(f"{prefix}/{w}/kernel", (d, d)) for w in "qkvo"] + [
            (f"{prefix}/{w}/bias", (d,)) for w in "qkvo"]

    def feed_forward(prefix):
        return [(f"{prefix}/ff1/kernel", (d, ff)), (f"{prefix}/ff1/bias", (ff,)),
                (f"{prefix}/ff2/kernel", (ff, d)), (f"{prefix}/ff2/bias", (d,))]

    def norm(prefix):
        return [(f"{prefix}/gamma", (d,)), (f"{prefix}/beta", (d,))]

    shapes = [("shared_embedding/embeddings", (vocab, d))]
    for i in range(layers):
        p = f"encoder/layer_{i}"
        shapes += attention(p + "/self_attention") + norm(p + "/norm1")
        shapes += feed_forward(p) + norm(p + "/norm2")
    for i in range(layers):
        p = f"decoder/layer_{i}"
        shapes += attention(p + "/self_attention") + norm(p + "/norm1")
        shapes += attention(p + "/cross_attention") + norm(p + "/norm2")
        shapes += feed_forward(p) + norm(p + "/norm3")
    return shapes + norm("encoder/final_norm") + norm("decoder/final_norm")


def transformer_big():
    return transformer(d=1024, ff=4096, layers=6, vocab=32000)


def transformer_base():
    return transformer(d=512, ff=2048, layers=6, vocab=32000)


def transformer_small():
    """The variables of `bench_step.py --fit`'s Transformer (d 256)."""
    return transformer(d=256, ff=1024, layers=2, vocab=8000)


def bert_large(d=1024, ff=4096, layers=24, vocab=30522, positions=512):
    shapes = [("embeddings/word_embeddings", (vocab, d)),
              ("embeddings/position_embeddings", (positions, d)),
              ("embeddings/token_type_embeddings", (2, d)),
              ("embeddings/norm/gamma", (d,)), ("embeddings/norm/beta", (d,))]
    for i in range(layers):
        p = f"encoder/layer_{i}"
        shapes += [(f"{p}/attention/{w}/kernel", (d, d)) for w in "qkvo"]
        shapes += [(f"{p}/attention/{w}/bias", (d,)) for w in "qkvo"]
        shapes += [(f"{p}/norm1/gamma", (d,)), (f"{p}/norm1/beta", (d,)),
                   (f"{p}/ff1/kernel", (d, ff)), (f"{p}/ff1/bias", (ff,)),
                   (f"{p}/ff2/kernel", (ff, d)), (f"{p}/ff2/bias", (d,)),
                   (f"{p}/norm2/gamma", (d,)), (f"{p}/norm2/beta", (d,))]
    return shapes + [("pooler/kernel", (d, d)), ("pooler/bias", (d,))]


def mlp(widths=(784, 4096, 4096, 4096, 10)):
    """A feed-forward net: dense kernels and biases only."""
    shapes = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        shapes += [(f"dense_{i}/kernel", (a, b)), (f"dense_{i}/bias", (b,))]
    return shapes


MODELS = {
    "resnet50": resnet50,
    "transformer_big": transformer_big,
    "transformer_base": transformer_base,
    "transformer_small": transformer_small,
    "bert_large": bert_large,
    "mlp": mlp,
}


def parameter_count(named_shapes):
    return sum(math.prod(shape) for _, shape in named_shapes)
