"""Run as a script under KERAS_BACKEND=<name>: SM3's dense rule on that backend.

Prints one JSON line: the largest difference from the NumPy reference after
three steps (a rank-3 variable, a scalar, and a matrix large enough for the
folded reductions, its rows folded by runs: `rule.fold_runs`), how many
blocks the reductions use on this backend and whether they reduce each fold
in two, `fit`'s first and last loss, and on JAX the compiled step's temporary
memory as a fraction of the variable's size.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402

from numpy_reference import SM3Reference  # noqa: E402
from sm3_tf import SM3  # noqa: E402
from sm3_tf import optimizer as sm3_optimizer  # noqa: E402


def jax_step_temp_fraction(shape=(1024, 512)):
    """Temporary bytes of a compiled SM3 step (JAX) over the variable's bytes.

    A matrix large enough for the folded reductions; momentum 0, so the
    update itself needs no buffer beyond the variable's.
    """
    import jax

    var = keras.Variable(np.ones(shape, np.float32))
    opt = SM3(0.1, momentum=0.0)
    opt.build([var])
    step = jax.jit(lambda trainable, state, grads: opt.stateless_apply(
        state, grads, trainable))
    compiled = step.lower([var.value], [v.value for v in opt.variables],
                          [jax.numpy.ones(shape, np.float32)]).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return temp / (np.prod(shape) * 4)


def main():
    rng = np.random.default_rng(0)
    opt = SM3(learning_rate=0.25, momentum=0.9, epsilon=0.0)
    init = rng.normal(size=(3, 4, 2)).astype("float32")
    var = keras.Variable(init)
    scalar = keras.Variable(np.float32(0.5))
    ref = SM3Reference(init, 0.25, 0.9, 1.0, 0.0)
    ref_scalar = SM3Reference(np.float32(0.5), 0.25, 0.9, 1.0, 0.0)
    big_init = rng.normal(size=(300, 256)).astype("float32")  # folded
    big = keras.Variable(big_init)
    ref_big = SM3Reference(big_init, 0.25, 0.9, 1.0, 0.0)
    for _ in range(3):
        g = rng.normal(size=(3, 4, 2)).astype("float32")
        g_big = rng.normal(size=(300, 256)).astype("float32")
        opt.apply_gradients([
            (keras.ops.convert_to_tensor(g), var),
            (keras.ops.convert_to_tensor(np.float32(0.1)), scalar),
            (keras.ops.convert_to_tensor(g_big), big),
        ])
        ref.step(g)
        ref_scalar.step(np.float32(0.1))
        ref_big.step(g_big)
    diff = max(
        float(np.abs(keras.ops.convert_to_numpy(var) - ref.var).max()),
        float(np.abs(keras.ops.convert_to_numpy(scalar) - ref_scalar.var)),
        float(np.abs(keras.ops.convert_to_numpy(big) - ref_big.var).max()),
    )
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=SM3(0.05), loss="mse")
    x = rng.normal(size=(64, 4)).astype("float32")
    history = model.fit(x, x.sum(1, keepdims=True), epochs=5, verbose=0)
    result = {"backend": keras.backend.backend(), "max_diff": diff,
              "blocks": sm3_optimizer._reduction_blocks(big),
              "split_fold_reductions":
                  sm3_optimizer._split_fold_reductions(),
              "losses": history.history["loss"]}
    try:  # the CPU kernel is TensorFlow's: elsewhere a clear error
        SM3(cpu_kernel=True)
        result["cpu_kernel_error"] = None
    except ValueError as e:
        result["cpu_kernel_error"] = str(e)
    if keras.backend.backend() == "jax":
        result["step_temp_fraction"] = jax_step_temp_fraction()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
