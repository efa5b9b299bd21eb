"""The CPU kernel: each float32 matrix's dense step as one native pass, in place.

XLA computes SM3's row and column maxima in passes of their own over `nu`,
which it writes out between them: a variable-sized temporary and three reads
of the gradient. `native/sm3_kernel.h` does the update and both maxima in one
pass and holds nothing of the variable's size; `native/sm3_xla_ffi.cc` makes
it an XLA FFI handler that runs on XLA's own threads. Inside a compiled step
it is a custom call that writes its results over its operands (the
accumulators and the momentum, float32 or bfloat16, over their own; the
variable over the gradient where the step computed it, else over the
variable: `writes_over_gradient`): on TensorFlow through `XlaCallModule`,
on JAX through `jax.ffi`. An embedding's sparse step without momentum is
one more handler (TensorFlow only).

It is built once per machine with the C++ compiler (`$CXX`, else `g++`),
for this CPU (`-march=native`), against the XLA FFI headers that TensorFlow
or jaxlib ship, into `$SM3_TF_CACHE` (else `~/.cache/sm3_tf`): `build()`
does it ahead of time (`python -m sm3_tf.kernels.native`); otherwise the
first step that can use it does, and says so. Where it cannot be built or
run (no compiler, a GPU or TPU in the process, a build that fails or takes
longer than `BUILD_TIMEOUT_S`), SM3 says why once and takes its portable
path: the same rule, the same numbers to rounding.
"""

import ctypes
import hashlib
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time

import keras
import numpy as np

from sm3_tf import _compat
from sm3_tf import rule
from sm3_tf.kernels import computed_here
from sm3_tf.kernels import gate

_NATIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
_SOURCES = ("sm3_kernel.h", "sm3_xla_ffi.cc")
_NATIVE_VERSION = 10  # sm3_tf_native_version() of a current build
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
          "-Wno-psabi", "-std=c++17", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 300
_MOMENTUM_CODES = {None: 0, "float32": 1, "bfloat16": 2}

_log = logging.getLogger("sm3_tf")
_lock = threading.Lock()
_state = {}  # flavor -> the loaded library, or why it is unavailable (str)
_said = set()  # the reasons said already
_failures = set()  # the reasons that are failed builds or loads
_registered = set()  # the flavors whose XLA has the handlers (once a process)


class Unavailable(Exception):
    """The kernel cannot be built or loaded here; the message says why.
    `failed`: a build or load went wrong (not merely a machine without the
    kernel's needs), which is always said as a warning."""

    def __init__(self, reason, failed=False):
        super().__init__(reason)
        self.failed = failed


def build(flavor=None):
    """Builds (or finds in the cache) and loads the kernel for `flavor`
    ("tensorflow" or "jax"; default: Keras's backend). Returns None, or why
    it is unavailable."""
    flavor = flavor or keras.backend.backend()
    with _lock:
        if flavor not in _state:
            try:
                _state[flavor] = _load(flavor)
            except Unavailable as e:
                _state[flavor] = str(e)
                if e.failed:
                    _failures.add(str(e))
        loaded = _state[flavor]
    return loaded if isinstance(loaded, str) else None


def applies(settings, gradient, variable):
    """Whether `variable`'s dense step, traced now, runs as the kernel: a
    float32 matrix with the running sum, inside a compiled program on a CPU
    where the kernel can run."""
    shape = tuple(variable.shape)
    if not (len(shape) >= 2 and None not in shape and math.prod(shape) > 0
            and settings.beta2 == 1.0
            and keras.backend.standardize_dtype(variable.dtype) == "float32"
            and keras.backend.standardize_dtype(gradient.dtype) == "float32"):
        return False
    return _can_run(settings)


def applies_to_sparse(settings, indices, values, variable):
    """Whether a sparse step without momentum (indices and their slices of
    `variable`, rank >= 2) runs as the kernel: float32, a batch of known
    size, inside a compiled program (TensorFlow) on a CPU."""
    import tensorflow as tf

    return (len(variable.shape) >= 2 and indices.shape.rank == 1
            and indices.shape[0] is not None and settings.beta2 == 1.0
            and variable.dtype == tf.float32 and values.dtype == tf.float32
            and _can_run(settings))


def _can_run(settings):
    reason = _unavailable_here()
    if reason is None:
        return True
    if reason is not _EAGER:
        _say_once(settings, reason)
    return False


_EAGER = "executing eagerly"


def _unavailable_here():
    """None if the kernel can run in the step being traced, else why not."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.executing_eagerly():
            return _EAGER  # TensorFlow's eager steps run no XLA
        if (tf.config.list_logical_devices("GPU")
                or tf.config.list_logical_devices("TPU")):
            return "the process has a GPU or TPU (the kernel is for CPUs)"
    elif backend == "jax":
        import jax

        if jax.default_backend() != "cpu":
            return f"JAX runs on {jax.default_backend()} (the kernel is for CPUs)"
    else:
        return f"Keras's {backend} backend (the kernel is for TensorFlow and JAX)"
    return build(backend)


def _say_once(settings, reason):
    """Why the kernel is not used, once per reason: a warning where
    `cpu_kernel=True` asked for it or its build failed, else (`"auto"` on a
    machine it is not for) INFO."""
    warn = settings.cpu_kernel is True or reason in _failures
    if (warn, reason) in _said:
        return
    _said.add((warn, reason))
    _log.log(logging.WARNING if warn else logging.INFO,
             "SM3(cpu_kernel=%r): the CPU kernel is not used, SM3 takes its "
             "portable path: %s", settings.cpu_kernel, reason)


# ---------------------------------------------------------------- the steps


def writes_over_gradient(gradient):
    """Whether the kernel writes the variable's new value over `gradient`
    rather than over the variable, which is what holds least where XLA:CPU
    schedules breadth first (its default) and the program being traced
    computed the gradient (a whole training step).

    Over the variable, the kernel must wait for backpropagation's last read
    of it (else XLA copies the variable); a breadth-first schedule computes
    the next two gradients meanwhile and holds them (an MLP's step: SGD's
    bytes + 2 weights'). Over the gradient it waits for nothing, and the
    step holds SGD's bytes. XLA:CPU's memory-optimized scheduler instead
    holds least with the variable written over (over the gradient: up to
    2 weights more). A gradient the program was given (an apply step on its
    own) is never written over: XLA would copy it first.
    """
    return _breadth_first_schedule() and computed_here(gradient)


def _breadth_first_schedule():
    """Whether XLA:CPU schedules the program breadth first: its default
    ("concurrency optimized") scheduler, unless `XLA_FLAGS` chooses another
    (`--xla_cpu_scheduler_type`, or
    `--xla_cpu_enable_concurrency_optimized_scheduler=false`)."""
    flags = os.environ.get("XLA_FLAGS", "")
    kind = re.findall(r"--xla_cpu_scheduler_type=(\w+)", flags)
    if kind and not re.search("CONCURRENCY|DEFAULT", kind[-1].upper()):
        return False
    enabled = re.findall(
        r"--xla_cpu_enable_concurrency_optimized_scheduler=(\w+)", flags)
    return not enabled or enabled[-1].lower() not in ("false", "0")


def dense_update(settings, gradient, variable, slots, learning_rate,
                 after=None):
    """One dense step of a float32 `variable` of rank >= 2, as the kernel,
    once `after` exists (`sm3_tf.kernels.Order`). It holds no temporaries:
    nothing for later updates to wait for (returns None)."""
    shape = tuple(variable.shape)
    momentum = slots.momentum
    momentum_dtype = (None if momentum is None else
                      keras.backend.standardize_dtype(momentum.dtype))
    # In their own shapes: the handler sees row-major buffers, and a
    # reshape of an operand written in place may make XLA copy it.
    read = keras.ops.convert_to_tensor
    operands = [gradient, read(variable),
                gate(keras.ops.cast(learning_rate, "float32"), after)]
    operands += [read(a) for a in slots.accumulators]
    if momentum is not None:
        operands.append(read(momentum))
    # Each result over an operand: the variable's over the gradient or the
    # variable (`writes_over_gradient`; the kernel reads each entry of both
    # before writing it), each accumulator over its own (read whole before
    # any is written), the momentum over its own.
    aliases = [0 if writes_over_gradient(gradient) else 1] + [
        3 + a for a in range(len(shape))] + (
        [] if momentum is None else [3 + len(shape)])
    attributes = dict(dims=(shape, "i64 array"),
                      lead=(rule.split_axes(shape), "i64"),
                      momentum=(_MOMENTUM_CODES[momentum_dtype], "i64"),
                      mu=(settings.momentum, "f32"),
                      one_minus_mu=(1.0 - settings.momentum, "f32"),
                      eps=(settings.epsilon, "f32"))
    values = _call("sm3_tf_step", operands, aliases, attributes)
    variable.assign(values[0])
    for accumulator, value in zip(slots.accumulators, values[1:]):
        accumulator.assign(value)
    if momentum is not None:
        momentum.assign(values[-1])
    return None


def sparse_update(settings, gradient, variable, slots, learning_rate,
                  after=None):
    """An embedding's sparse step without momentum as one call
    (TensorFlow, in XLA): only the rows in `gradient.indices` (repeats
    allowed) are read and written."""
    import tensorflow as tf

    shape = tuple(variable.shape)
    cols = math.prod(shape[1:])
    operands = [tf.cast(gradient.indices, tf.int32),
                tf.reshape(gradient.values, [-1, cols]),
                tf.reshape(tf.convert_to_tensor(variable), [shape[0], cols]),
                tf.cast(learning_rate, tf.float32)]
    operands += [tf.convert_to_tensor(a) for a in slots.accumulators]
    aliases = [2] + [4 + a for a in range(len(shape))]
    values = _call("sm3_tf_sparse", operands, aliases,
                   dict(dims=(shape, "i64 array"),
                        eps=(settings.epsilon, "f32")))
    variable.assign(tf.reshape(values[0], shape))
    for accumulator, value in zip(slots.accumulators, values[1:]):
        accumulator.assign(value)
    return None


def _call(target, operands, aliases, attributes):
    """The handler `target` on `operands`; result r is written over operand
    `aliases[r]`, so no variable is copied. `attributes` maps a name to
    `(value, "i64", "f32" or "i64 array")`."""
    if keras.backend.backend() == "jax":
        return _call_jax(target, operands, aliases, attributes)
    return _call_tensorflow(target, operands, aliases, attributes)


def _call_jax(target, operands, aliases, attributes):
    import jax

    kinds = {"i64": np.int64, "f32": np.float32,
             "i64 array": lambda v: np.asarray(v, np.int64)}
    results = [jax.ShapeDtypeStruct(operands[o].shape, operands[o].dtype)
               for o in aliases]
    call = jax.ffi.ffi_call(
        target, results,
        input_output_aliases={o: r for r, o in enumerate(aliases)})
    return call(*operands, **{name: kinds[kind](value)
                              for name, (value, kind) in attributes.items()})


# The StableHLO serialization version of the custom-call module.
XLA_CALL_MODULE_VERSION = 9


def _call_tensorflow(target, operands, aliases, attributes):
    types = [_tensor_type(o.shape, o.dtype) for o in operands]
    result_types = ", ".join(types[o] for o in aliases)
    config = ", ".join(_attribute(name, value, kind)
                       for name, (value, kind) in attributes.items())
    alias_text = ", ".join(
        "#stablehlo.output_operand_alias<output_tuple_indices = "
        f"[{r}], operand_index = {o}, operand_tuple_indices = []>"
        for r, o in enumerate(aliases))
    n = len(aliases)
    module = (
        "module @sm3_tf {\n  func.func public @main("
        + ", ".join(f"%a{i}: {t}" for i, t in enumerate(types))
        + f") -> ({result_types}) {{\n    %0:{n} = stablehlo.custom_call "
        f"@{target}(" + ", ".join(f"%a{i}" for i in range(len(types)))
        + f") {{api_version = 4 : i32, backend_config = {{{config}}}, "
        f"output_operand_aliases = [{alias_text}]}} : "
        f"({', '.join(types)}) -> ({result_types})\n"
        "    return " + ", ".join(f"%0#{i}" for i in range(n))
        + f" : {result_types}\n  }}\n}}\n")
    return _compat.tf_xla_call_module(
        operands, module.encode(), XLA_CALL_MODULE_VERSION,
        Tout=[operands[o].dtype for o in aliases],
        Sout=[operands[o].shape for o in aliases], platforms=("CPU",))


def _tensor_type(shape, dtype):
    element = {"float32": "f32", "bfloat16": "bf16", "int32": "i32"}[
        keras.backend.standardize_dtype(dtype)]
    return "tensor<" + "".join(f"{d}x" for d in shape) + element + ">"


def _attribute(name, value, kind):
    """One entry of a custom call's `backend_config`, in MLIR syntax."""
    if kind == "i64 array":
        return f"{name} = array<i64: {', '.join(map(str, value))}>"
    if kind == "i64":
        return f"{name} = {value} : i64"
    return f"{name} = {value:.9e} : f32"


# ---------------------------------------------------------------- building


def _load(flavor):
    """The library for `flavor`, built if the cache lacks it, loaded and
    registered with XLA."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise Unavailable(
            f"no C++ compiler ({os.environ.get('CXX', 'g++')!r}) on PATH")
    flags, version = _flavor_flags(flavor)
    key = hashlib.sha256()
    for name in _SOURCES:
        with open(os.path.join(_NATIVE, name), "rb") as f:
            key.update(f.read())
    key.update(" ".join([compiler, *_FLAGS, *flags, version, _cpu()]
                        ).encode())
    cache = os.environ.get("SM3_TF_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sm3_tf")
    prefix = f"sm3_xla_ffi-{flavor}-"
    library = os.path.join(cache, f"{prefix}{key.hexdigest()[:16]}.so")
    if not os.path.exists(library):
        _compile(compiler, flags, cache, library)
        _remove_stale(cache, prefix, library)
    try:
        native = ctypes.CDLL(library)
    except OSError as e:
        raise Unavailable(f"loading {library} failed: {e}", True) from e
    if native.sm3_tf_native_version() != _NATIVE_VERSION:
        raise Unavailable(f"{library} is a stale build; delete it", True)
    if flavor in _registered:
        return native  # an XLA keeps the first registration of a name
    if flavor == "tensorflow":
        try:
            api = _compat.tf_xla_ffi_api()
        except (OSError, AttributeError) as e:
            raise Unavailable(f"TensorFlow exports no XLA FFI API: {e}") from e
        if native.sm3_tf_register(ctypes.c_void_p(api)) != 0:
            raise Unavailable("TensorFlow's XLA refused the handlers", True)
    else:
        import jax

        for target, handler in (("sm3_tf_step", native.Sm3StepHandler),
                                ("sm3_tf_sparse", native.Sm3SparseHandler)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler),
                                        platform="cpu")
    _registered.add(flavor)
    return native  # kept for the life of the process


def _flavor_flags(flavor):
    """`(compile flags, version)` for the XLA inside `flavor`: its FFI
    headers; nothing is linked (the handlers are registered at load)."""
    if flavor == "tensorflow":
        import tensorflow as tf

        include = os.path.join(os.path.dirname(tf.__file__), "include")
        version = tf.__version__
    elif flavor == "jax":
        import jax
        import jaxlib

        include, version = jax.ffi.include_dir(), jaxlib.__version__
    else:
        raise Unavailable(f"no kernel for Keras's {flavor} backend")
    if not os.path.exists(os.path.join(include, "xla", "ffi", "api",
                                       "ffi.h")):
        raise Unavailable(f"{flavor} {version} ships no XLA FFI headers "
                          f"under {include}")
    return [f"-I{include}"], f"{flavor} {version}"


def _cpu():
    """What `-march=native` builds for: the CPU's name and features."""
    described = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            described += "".join(line for line in f
                                 if line.startswith(("flags", "Features")))
    except OSError:
        pass
    return described


def _compile(compiler, flags, cache, library):
    """Compiles the handlers into `library`, saying so at WARNING level
    (a first step otherwise stalls for no visible reason)."""
    try:
        os.makedirs(cache, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=cache)
    except OSError as e:
        raise Unavailable(f"cannot write the kernel's cache {cache} ({e}); "
                          "set SM3_TF_CACHE to a writable directory") from e
    os.close(fd)
    _log.warning("SM3: building its CPU kernel for this machine, once (about "
                 "10 s), into %s. `python -m sm3_tf.kernels.native` "
                 "builds it ahead of time; SM3(cpu_kernel=False) never does.",
                 cache)
    start = time.monotonic()
    try:
        # Built beside its final name and renamed into place: processes
        # that build at once (workers of one job) each load a whole file.
        result = subprocess.run(
            [compiler, *_FLAGS, *flags, "-o", partial,
             os.path.join(_NATIVE, "sm3_xla_ffi.cc")],
            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise Unavailable(
                f"building it failed:\n{result.stderr[-2000:]}", True)
        os.replace(partial, library)
    except subprocess.TimeoutExpired as e:
        raise Unavailable(
            f"building it took longer than {BUILD_TIMEOUT_S} s", True) from e
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    _log.warning("SM3: CPU kernel built in %.0f s.", time.monotonic() - start)


def _remove_stale(cache, prefix, library):
    """Deletes this flavor's other builds (older sources, versions or
    flags): a process that has one loaded keeps its mapping."""
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        if name.startswith(prefix) and name.endswith(".so") and (
                path != library):
            try:
                os.remove(path)
            except OSError:
                pass


if __name__ == "__main__":
    import sys

    flavors = sys.argv[1:] or [keras.backend.backend()]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = {flavor: build(flavor) for flavor in flavors}
    for flavor, reason in failed.items():
        print(f"{flavor}: " + ("ready" if reason is None else
                               f"unavailable: {reason}"))
    sys.exit(1 if any(failed.values()) else 0)
