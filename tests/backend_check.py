"""Run as a script under KERAS_BACKEND=<name>: SM3 on that backend.

Prints one JSON line with:
- `max_diff`: the largest difference from the NumPy reference after three
  steps (a rank-3 variable, a scalar, and a 300 x 256 matrix), with SM3's
  default `cpu_kernel` ("auto": the CPU kernel where it runs, on JAX);
- `kernel_bit_exact`, `kernel_calls`, `kernel_over_gradient` (JAX):
  whether `cpu_kernel=True` gives the reference's numbers bit for bit, how
  many kernel calls the compiled step makes, and whether it writes the
  weight over the gradient; `computed_gradient`: the same where the step
  computes the gradient (absent where the kernel is unavailable);
- `nan_entries`: which entries of a (3, 4) kernel are non-finite after a
  step whose gradient has one NaN, and after one more finite step;
- `losses`: `fit`'s first and last loss;
- on PyTorch, `float64_bf16_momentum`: a float64 variable after one step
  with bfloat16 momentum, at the tie that shows how it was rounded;
- `cpu_kernel_error`: the error for `cpu_kernel=True` where it cannot be;
- on JAX, `step_bytes`: the compiled `stateless_apply` step's temporary
  bytes over the matrix's bytes, for each path (`memory_analysis`);
- on JAX with two devices (XLA_FLAGS=--xla_force_host_platform_device_count=2),
  `layouts`: the sharding of a Dense kernel's slots under a Keras
  `ModelParallel` distribution that shards the kernel's columns.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402

from numpy_reference import SM3Reference  # noqa: E402
from sm3_tf import SM3  # noqa: E402


def reference_diff(cpu_kernel):
    rng = np.random.default_rng(0)
    opt = SM3(learning_rate=0.25, momentum=0.9, epsilon=0.0,
              cpu_kernel=cpu_kernel)
    shapes = [(3, 4, 2), (), (300, 256)]
    inits = [rng.normal(size=s).astype("float32") for s in shapes]
    variables = [keras.Variable(v) for v in inits]
    refs = [SM3Reference(v, 0.25, 0.9, 1.0, 0.0) for v in inits]
    for _ in range(3):
        grads = [rng.normal(size=s).astype("float32") for s in shapes]
        opt.apply_gradients(zip([keras.ops.convert_to_tensor(g)
                                 for g in grads], variables))
        for ref, g in zip(refs, grads):
            ref.step(g)
    return max(float(np.abs(keras.ops.convert_to_numpy(v) - r.var).max())
               for v, r in zip(variables, refs))


def nan_entries():
    var = keras.Variable(np.zeros((3, 4), np.float32))
    opt = SM3(learning_rate=0.25, momentum=0.0)
    grad = np.ones((3, 4), np.float32)
    grad[1, 2] = np.nan
    seen = []
    for g in (grad, np.ones((3, 4), np.float32)):
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), var)])
        value = keras.ops.convert_to_numpy(var)
        seen.append(np.argwhere(~np.isfinite(value)).tolist())
    return seen


def jax_step(shape, computed=False, **kwargs):
    """`(temporary bytes / the matrix's bytes, kernel calls, whether the
    variable ends as the reference's bit for bit, whether the kernel
    writes it over the gradient)` of a jitted `stateless_apply` step with
    the state donated, given the gradient (`computed`: the step computes
    it, `jax.grad` of `sum(w * g)`, exactly `g`)."""
    import jax

    var = keras.Variable(np.ones(shape, np.float32))
    opt = SM3(0.25, momentum=0.0, epsilon=0.0, **kwargs)
    opt.build([var])

    def apply(trainable, state, grads):
        if computed:
            grads = jax.grad(lambda w: jax.numpy.sum(w[0] * grads[0]))(
                trainable)
        return opt.stateless_apply(state, grads, trainable)

    step = jax.jit(apply, donate_argnums=(0, 1))
    trainable, state = [var.value], [v.value for v in opt.variables]
    grads = [jax.numpy.full(shape, 0.5, np.float32)]
    compiled = step.lower(trainable, state, grads).compile()
    calls = [line for line in compiled.as_text().splitlines()
             if 'custom_call_target="sm3_tf_step"' in line]
    over_gradient = any("output_to_operand_aliasing={{0}: (0, {})" in line
                        for line in calls)
    temp = compiled.memory_analysis().temp_size_in_bytes
    rng = np.random.default_rng(1)
    ref = SM3Reference(np.ones(shape, np.float32), 0.25, 0.0, 1.0, 0.0)
    for _ in range(3):
        g = rng.normal(size=shape).astype(np.float32)
        trainable, state = step(trainable, state, [g])
        ref.step(g)
    exact = bool(np.array_equal(np.asarray(trainable[0]), ref.var))
    return temp / (np.prod(shape) * 4), len(calls), exact, over_gradient


def slot_layouts():
    """Under a Keras distribution that shards a Dense kernel's axis 1 over
    a "model" mesh axis, the axes each of its slots is sharded along."""
    import jax

    mesh = keras.distribution.DeviceMesh((2,), ["model"], jax.devices()[:2])
    layouts = keras.distribution.LayoutMap(mesh)
    layouts[".*kernel"] = (None, "model")
    distribution = keras.distribution.ModelParallel(
        layout_map=layouts, batch_dim_name="model")
    with distribution.scope():
        layer = keras.layers.Dense(4, name="dense")
        layer.build((None, 6))
        opt = SM3()
        opt.build([layer.kernel, layer.bias])
    return {v.name: list(v.value.sharding.spec) for v in opt.variables[2:]}


def float64_variable_with_bfloat16_momentum():
    """A float64 variable's value after one step whose bfloat16 momentum is
    the tie that tells rounding through float32 (1.5, the spec) from
    rounding directly (about 1.496): tests/sm3_spec_test.py's case."""
    var = keras.Variable(np.full((2, 2), 2.0), dtype="float64")
    opt = SM3(learning_rate=1.0, momentum=0.5 - 2**-9 - 2**-31, epsilon=0.0,
              momentum_dtype="bfloat16")
    opt.apply_gradients([(keras.ops.ones((2, 2), dtype="float64"), var)])
    return keras.ops.convert_to_numpy(var).tolist()


def main():
    result = {"backend": keras.backend.backend(),
              "max_diff": reference_diff("auto"),
              "nan_entries": nan_entries()}
    if keras.backend.backend() == "torch":  # JAX keeps float32 without x64
        result["float64_bf16_momentum"] = (
            float64_variable_with_bfloat16_momentum())
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=SM3(0.05), loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    history = model.fit(x, x.sum(1, keepdims=True), epochs=5, verbose=0)
    result["losses"] = history.history["loss"]
    try:
        SM3(cpu_kernel=True)
        result["cpu_kernel_error"] = None
    except ValueError as e:
        result["cpu_kernel_error"] = str(e)
    if keras.backend.backend() == "jax":
        from sm3_tf.kernels import native

        result["kernel_unavailable"] = native.build("jax")
        shape = (1024, 512)
        portable = jax_step(shape, cpu_kernel=False)[0]
        result["step_bytes"] = {"portable": portable}
        if result["kernel_unavailable"] is None:
            kernel, calls, exact, over = jax_step(shape, cpu_kernel=True)
            result["step_bytes"]["kernel"] = kernel
            result["kernel_calls"], result["kernel_bit_exact"] = calls, exact
            result["kernel_over_gradient"] = over
            _, calls, exact, over = jax_step(shape, computed=True,
                                             cpu_kernel=True)
            result["computed_gradient"] = {
                "calls": calls, "bit_exact": exact, "over_gradient": over}
        import jax

        if len(jax.devices()) >= 2:
            result["layouts"] = slot_layouts()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
