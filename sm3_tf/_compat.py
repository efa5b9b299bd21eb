"""Private Keras, TensorFlow and JAX symbols sm3_tf uses: all of them, here.

Each has no public equivalent. `missing()` lists the ones an installed
version lacks; `tests/compat_test.py` fails naming them, so an upgrade that
drops one is caught by the tests rather than by a user.

- `keras.optimizers.Optimizer._get_variable_index(variable)`: the index of
  a model variable in the optimizer's list, which also resolves a
  `tf.distribute` replica's local copy to its variable. Keras's own
  optimizers (Adam, Adagrad, ...) find their slots with it.
- `tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext(graph)`:
  whether the graph being traced is compiled by XLA. SM3 traces its update
  into an enclosing XLA program, and compiles it on its own elsewhere.
- `tensorflow.compiler.tf2xla.python.xla.call_module`: the `XlaCallModule`
  op (not in `tf.raw_ops`), which calls the CPU kernel's XLA FFI handler
  from a TensorFlow step (`sm3_tf.kernels.native`).
- `xla::ffi::GetXlaFfiApi()` in TensorFlow's `libtensorflow_cc.so.2`: the
  XLA FFI API of the XLA inside TensorFlow, with which the CPU kernel's
  handlers are registered (TensorFlow has no Python call for it).
- `jax._src.interpreters.partial_eval.DynamicJaxprTracer.parent`: the
  operation that computed a value of the function `jax.jit` traces (None
  for its arguments). The CPU kernel writes its results over a gradient
  the step computed, not over one it was given (`sm3_tf.kernels.native`);
  without it, it writes over the variable, as it did before.

And one difference between supported Keras versions, read once:
`ADD_VARIABLE_TAKES_LAYOUT`, whether `Optimizer.add_variable` places a
variable by `layout` under a Keras distribution (3.9 and later).
"""

import ctypes
import inspect
import os

import keras

PRIVATE_SYMBOLS = (
    ("keras", "keras.optimizers.Optimizer._get_variable_index"),
    ("tensorflow",
     "tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext"),
    ("tensorflow", "tensorflow.compiler.tf2xla.python.xla.call_module"),
    ("tensorflow", "libtensorflow_cc.so.2:xla::ffi::GetXlaFfiApi"),
    ("jax", "jax._src.interpreters.partial_eval.DynamicJaxprTracer.parent"),
)
_GET_XLA_FFI_API = "_ZN3xla3ffi12GetXlaFfiApiEv"  # xla::ffi::GetXlaFfiApi()

ADD_VARIABLE_TAKES_LAYOUT = "layout" in inspect.signature(
    keras.optimizers.Optimizer.add_variable).parameters


def variable_index(optimizer, variable):
    """The position of `variable` (or a replica's copy of it) in the list
    of variables `optimizer` was built with."""
    return optimizer._get_variable_index(variable)


def tf_in_xla_context():
    """Whether the TensorFlow graph being traced is compiled by XLA."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


def tf_xla_call_module(args, module, version, Tout, Sout, platforms):
    """TensorFlow's `XlaCallModule` op: a serialized StableHLO `module`."""
    from tensorflow.compiler.tf2xla.python import xla

    return xla.call_module(args, version=version, module=module, Tout=Tout,
                           Sout=Sout, platforms=platforms)


def tf_xla_ffi_api():
    """The address of the `XLA_FFI_Api` of the XLA inside TensorFlow."""
    import tensorflow as tf

    library = ctypes.CDLL(os.path.join(os.path.dirname(tf.__file__),
                                       "libtensorflow_cc.so.2"))
    get_api = getattr(library, _GET_XLA_FFI_API)
    get_api.restype = ctypes.c_void_p
    return get_api()


def jax_computed_in_trace(value):
    """Whether `value` is a value of the function `jax.jit` is tracing that
    one of its operations computed (not an argument or a constant); False
    where this JAX does not say."""
    try:
        from jax._src.interpreters import partial_eval
    except ImportError:
        return False
    tracer = getattr(partial_eval, "DynamicJaxprTracer", None)
    return (tracer is not None and isinstance(value, tracer)
            and getattr(value, "parent", None) is not None)


def missing(packages=("keras", "tensorflow", "jax")):
    """The symbols of `PRIVATE_SYMBOLS` (of `packages`) that the installed
    versions lack, as dotted names."""
    import importlib

    absent = []
    for package, dotted in PRIVATE_SYMBOLS:
        if package not in packages:
            continue
        if dotted.startswith("libtensorflow_cc"):
            try:
                tf_xla_ffi_api()
            except (OSError, AttributeError):
                absent.append(dotted)
            continue
        parts = dotted.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                value = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for name in parts[split:]:
                    value = getattr(value, name)
            except AttributeError:
                absent.append(dotted)
            break
        else:
            absent.append(dotted)
    return absent
