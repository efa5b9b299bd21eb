"""Run as a script (KERAS_BACKEND=tensorflow or jax), in a fresh process:
what a compiled optimizer step holds, from XLA's buffer assignment.

Steps `apply_gradients` over four matrices of different sizes and two
vectors, for SGD, SGD with momentum and SM3 on each of its paths, and prints
one JSON line: `parameters` (bytes), `accumulators` (SM3's, bytes),
`largest` (the largest variable's bytes) and, per optimizer, the program's
`total` and `temporary` bytes (TensorFlow also: the largest temporary of
the per-variable programs a step that XLA does not compile launches).

With `--whole_step`: the same for the whole training step (forward,
backward, update) of an MLP whose parameters dominate its memory.
`--optimizers=a,b`: only those of `OPTIMIZERS`.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from sm3_tf import memory  # noqa: E402

if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
    memory.start_tf_xla_dump()  # before anything is compiled

import keras  # noqa: E402
import numpy as np  # noqa: E402

from sm3_tf import SM3  # noqa: E402

SHAPES = [(512, 384), (256, 512), (3, 3, 64, 64), (1024, 96), (384,), (96,)]

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "sm3_kernel": lambda: SM3(momentum=0.0, cpu_kernel=True),
    "sm3_kernel_momentum": lambda: SM3(momentum=0.9, cpu_kernel=True),
    "sm3_kernel_bf16_momentum": lambda: SM3(
        momentum=0.9, momentum_dtype="bfloat16", cpu_kernel=True),
    "sm3_portable": lambda: SM3(momentum=0.0, cpu_kernel=False),
    "sm3_portable_momentum": lambda: SM3(momentum=0.9, cpu_kernel=False),
    "sm3_portable_bf16_momentum": lambda: SM3(
        momentum=0.9, momentum_dtype="bfloat16", cpu_kernel=False),
}


def tensorflow_step(optimizer, compiled):
    import tensorflow as tf

    variables = [keras.Variable(np.ones(s, np.float32)) for s in SHAPES]
    optimizer.build(variables)
    grads = [tf.ones(s) for s in SHAPES]

    @tf.function(jit_compile=compiled)
    def step(grads):
        optimizer.apply_gradients(zip(grads, variables))

    return memory.tf_step_bytes(step, grads)


def jax_step(optimizer):
    import jax

    variables = [keras.Variable(np.ones(s, np.float32)) for s in SHAPES]
    optimizer.build(variables)
    step = jax.jit(lambda trainable, state, grads: optimizer.stateless_apply(
        state, grads, trainable), donate_argnums=(0, 1))
    spec = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype)  # noqa: E731
    return memory.jax_step_bytes(
        step, [spec(v) for v in variables],
        [spec(v) for v in optimizer.variables],
        [jax.ShapeDtypeStruct(s, np.float32) for s in SHAPES])


WIDTH, LAYERS, BATCH = 512, 6, 8  # --whole_step's MLP


def _mlp():
    return keras.Sequential(
        [keras.Input((WIDTH,))]
        + [keras.layers.Dense(WIDTH, activation="relu")
           for _ in range(LAYERS - 1)] + [keras.layers.Dense(WIDTH)])


def _loss(y, logits):
    return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
        y, logits, from_logits=True))


def tensorflow_whole_step(optimizer):
    import tensorflow as tf

    model = _mlp()
    variables = model.trainable_variables
    optimizer.build(variables)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = _loss(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables),
                                      variables))
        return loss

    return memory.tf_step_bytes(step, tf.TensorSpec((BATCH, WIDTH)),
                                tf.TensorSpec((BATCH,), tf.int32))


def jax_whole_step(optimizer):
    import jax

    model = _mlp()
    optimizer.build(model.trainable_variables)

    def step(trainable, state, x, y):
        def loss(trainable):
            logits, _ = model.stateless_call(trainable, [], x, training=True)
            return _loss(y, logits)

        value, grads = jax.value_and_grad(loss)(trainable)
        trainable, state = optimizer.stateless_apply(state, grads, trainable)
        return value, trainable, state

    spec = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype)  # noqa: E731
    return memory.jax_step_bytes(
        jax.jit(step, donate_argnums=(0, 1)),
        [spec(v) for v in model.trainable_variables],
        [spec(v) for v in optimizer.variables],
        jax.ShapeDtypeStruct((BATCH, WIDTH), np.float32),
        jax.ShapeDtypeStruct((BATCH,), np.int32))


def main():
    from sm3_tf.kernels import native

    whole = "--whole_step" in sys.argv[1:]
    backend = keras.backend.backend()
    kernel = native.build(backend)
    shapes = ([(WIDTH, WIDTH), (WIDTH,)] * LAYERS) if whole else SHAPES
    result = {
        "backend": backend, "kernel_unavailable": kernel,
        "parameters": sum(int(np.prod(s)) * 4 for s in shapes),
        "accumulators": sum(
            (sum(s) if len(s) > 1 else int(np.prod(s))) * 4 for s in shapes),
        "largest": max(int(np.prod(s)) * 4 for s in shapes),
        "steps": {}}
    chosen = [a.split("=", 1)[1].split(",") for a in sys.argv[1:]
              if a.startswith("--optimizers=")]
    for name, make in OPTIMIZERS.items():
        if ("kernel" in name and kernel is not None) or (
                chosen and name not in chosen[-1]):
            continue
        if whole:
            result["steps"][name] = (tensorflow_whole_step if backend ==
                                     "tensorflow" else jax_whole_step)(make())
        elif backend == "tensorflow":
            result["steps"][name] = tensorflow_step(make(), True)
            launched = tensorflow_step(make(), False) if name.startswith(
                "sm3") else {}
            result["steps"][name].update(launched)
        else:
            result["steps"][name] = jax_step(make())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
