"""SM3's dense step of a rank >= 2 variable as one hand-written pass (XLA:CPU).

The rule's statistics are a maximum over every row and every column of
`nu`. XLA:CPU reads the gradient three times for that (the update and one
pass per reduction: it does not fuse a row and a column reduction with an
elementwise loop), which keeps a compiled step at 1.5-2x SGD with momentum
(docs/performance.md). `native/sm3_kernel.h` does the update and both maxima
in one AVX-512 pass; `native/sm3_xla_cpu.cc` makes it an XLA FFI handler
that runs on XLA's own threads, and `dense_update` calls it inside the
compiled step through `XlaCallModule`, declaring that it writes the
variable, its accumulator and its momentum in place. A step's vectors
(biases, normalization parameters: two small XLA loops each otherwise) go
together through one more call, `vector_update`, with the one
`vector_accumulator` they share; an embedding's sparse step without
momentum is one call too, `sparse_update` (some twenty small TensorFlow
ops otherwise).

`SM3()` takes it where it can run (`cpu_kernel="auto"`, the default). At
first use the handler is compiled with the C++ compiler (`$CXX`, else
`g++`) against TensorFlow's own headers into a cache (`$SM3_TF_CACHE`, else
`~/.cache/sm3_tf`), then loaded. Where that cannot be done (no AVX-512F, no
compiler, a GPU or TPU in the process), SM3 says why once (a warning if
`cpu_kernel=True` asked for it) and takes its portable path; where the rule
differs from what the kernel does (`beta2 < 1`, dtypes other than float32),
that variable (or group of vectors) takes the portable path. Either way the
numbers are SM3's: the kernel rounds as the NumPy reference does.
"""

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import tensorflow as tf

from sm3_tf import rule

_NATIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
_SOURCES = ("sm3_kernel.h", "sm3_xla_cpu.cc")
_NATIVE_VERSION = 7  # sm3_tf_native_version() of a current build
_FLAGS = ("-O3", "-mavx512f", "-ffp-contract=off", "-fno-math-errno",
          "-std=c++17", "-shared", "-fPIC")

_lock = threading.Lock()
_libraries = []
_loaded = None  # None: not tried yet; True; or the reason it is unavailable
_warned = False


def unavailable_reason():
    """None if the kernel is loaded (building it on first use), else why not."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                _load()
                _loaded = True
            except _Unavailable as e:
                _loaded = str(e)
        return None if _loaded is True else _loaded


class _Unavailable(Exception):
    pass


def _cpu_has_avx512f():
    if platform.system() != "Linux" or platform.machine() not in (
            "x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def _load():
    if not _cpu_has_avx512f():
        raise _Unavailable("this CPU has no AVX-512F (or is not x86-64 Linux)")
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise _Unavailable(
            f"no C++ compiler ({os.environ.get('CXX', 'g++')!r}) on PATH")
    tf_dir = os.path.dirname(tf.__file__)
    if not os.path.isdir(os.path.join(tf_dir, "include", "xla", "ffi")):
        raise _Unavailable(f"TensorFlow at {tf_dir} ships no XLA FFI headers")
    compile_flags = tf.sysconfig.get_compile_flags()
    link_flags = [f"-L{tf_dir}", "-l:libtensorflow_cc.so.2",
                  "-l:libtensorflow_framework.so.2"]
    key = hashlib.sha256()
    for name in _SOURCES:
        with open(os.path.join(_NATIVE, name), "rb") as f:
            key.update(f.read())
    key.update(" ".join([tf.__version__, compiler, *_FLAGS, *compile_flags,
                         *link_flags]).encode())
    cache = os.environ.get("SM3_TF_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sm3_tf")
    library = os.path.join(cache, f"sm3_xla_cpu-{key.hexdigest()[:16]}.so")
    if not os.path.exists(library):
        # Built beside its final name and renamed into place: processes
        # that build at once (workers of one job) each load a whole file.
        try:
            os.makedirs(cache, exist_ok=True)
            fd, partial = tempfile.mkstemp(suffix=".so", dir=cache)
        except OSError as e:
            raise _Unavailable(
                f"cannot write the kernel's cache {cache} ({e}); set "
                "SM3_TF_CACHE to a writable directory") from e
        os.close(fd)
        logging.getLogger("sm3_tf").info(
            "SM3: building the CPU kernel (once, about 10 s) into %s",
            library)
        try:
            result = subprocess.run(
                [compiler, *_FLAGS, *compile_flags, "-o", partial,
                 os.path.join(_NATIVE, "sm3_xla_cpu.cc"), *link_flags],
                capture_output=True, text=True)
            if result.returncode != 0:
                raise _Unavailable(
                    f"building {library} failed:\n{result.stderr[-2000:]}")
            os.replace(partial, library)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    try:
        # Loading registers the handler with XLA (a static initializer).
        native = ctypes.CDLL(library)
    except OSError as e:
        raise _Unavailable(f"loading {library} failed: {e}") from e
    if native.sm3_tf_native_version() != _NATIVE_VERSION:
        raise _Unavailable(f"{library} is a stale build; delete it")
    _libraries.append(native)  # kept for the life of the process


def _rule_fits(optimizer, gradient, variable):
    """The rule and dtypes the kernels compute: SM3's running sum, float32."""
    shape = tuple(variable.shape)
    return (optimizer.cpu_kernel and optimizer.beta2 == 1.0
            and None not in shape and math.prod(shape) > 0
            and variable.dtype == "float32" and gradient.dtype == tf.float32)


def _available(optimizer):
    """Whether the kernels can run in this process; says why not once (a
    warning where `cpu_kernel=True` asked for them, else at INFO level)."""
    global _warned
    if (tf.config.list_logical_devices("GPU")
            or tf.config.list_logical_devices("TPU")):
        reason = "the process has a GPU or TPU (the kernel is for CPUs)"
    else:
        reason = unavailable_reason()
    if reason is not None:
        asked = optimizer.cpu_kernel is True
        if not _warned or (asked and _warned == "info"):
            _warned = "warning" if asked else "info"
            logging.getLogger("sm3_tf").log(
                logging.WARNING if asked else logging.INFO,
                "SM3(cpu_kernel=%r): the CPU kernel is unavailable, so SM3 "
                "takes its portable path: %s", optimizer.cpu_kernel, reason)
        return False
    return True


def applies(optimizer, gradient, variable):
    """Whether `variable`'s step, traced now, runs as the matrix kernel."""
    return (len(variable.shape) >= 2
            and _rule_fits(optimizer, gradient, variable)
            and _available(optimizer))


def applies_to_vectors(optimizer, accumulator, items):
    """Whether the scalars and vectors `items` (as `SM3._step_vectors` takes
    them) that share `accumulator` are stepped as `vector_update`."""
    return (accumulator.dtype == tf.float32
            and all(_rule_fits(optimizer, gradient, variable)
                    for gradient, variable, _, _ in items)
            and _available(optimizer))


def applies_to_sparse(optimizer, gradient, variable, momentum):
    """Whether `variable`'s sparse step (a `tf.IndexedSlices` gradient over
    its axis 0), traced now, runs as `sparse_update`: without momentum (with
    it every row's momentum decays: a dense pass), rank >= 2, a batch of
    known size."""
    return (momentum is None and len(variable.shape) >= 2
            and gradient.indices.shape.rank == 1
            and gradient.indices.shape[0] is not None
            and gradient.indices.dtype in (tf.int32, tf.int64)
            and _rule_fits(optimizer, gradient, variable)
            and _available(optimizer))


def sparse_update(optimizer, indices, values, variable, accumulator,
                  learning_rate):
    """An embedding's sparse step without momentum as one call, in XLA: only
    the rows in `indices` (repeats allowed) are read and written."""
    shape = tuple(variable.shape)
    cols = math.prod(shape[1:])
    n = int(indices.shape[0])
    matrix = _tensor_type((shape[0], cols))
    packed = _tensor_type((sum(shape),))
    operands = [
        tf.cast(indices, tf.int32),
        tf.reshape(values, [n, cols]),
        tf.reshape(tf.convert_to_tensor(variable), [shape[0], cols]),
        tf.cast(learning_rate, tf.float32),
        tf.convert_to_tensor(accumulator),
    ]
    operand_types = [f"tensor<{n}xi32>", _tensor_type((n, cols)), matrix,
                     _tensor_type(()), packed]
    new_variable, new_accumulator = _call(
        "sm3_tf_sparse", operands, operand_types, [(matrix, 2), (packed, 4)],
        {"dims": (shape, "i64 array"), "eps": (optimizer.epsilon, "f32")})
    optimizer.assign(accumulator, new_accumulator)
    optimizer.assign(variable, tf.reshape(new_variable, shape))


def dense_update(optimizer, gradient, variable, accumulator, momentum,
                 learning_rate):
    """One SM3 step of a `variable` of rank >= 2, as the kernel, in XLA."""
    shape = tuple(variable.shape)
    lead = rule.split_axes(shape)
    rows, cols = rule.matrix_shape(shape, lead)
    has_momentum = momentum is not None
    matrix = _tensor_type((rows, cols))
    packed = _tensor_type((sum(shape),))
    operands = [
        tf.reshape(gradient, [rows, cols]),
        tf.reshape(tf.convert_to_tensor(variable), [rows, cols]),
        tf.cast(learning_rate, tf.float32),
        tf.convert_to_tensor(accumulator),
    ] + ([tf.reshape(tf.convert_to_tensor(momentum), [rows, cols])]
         if has_momentum else [])
    operand_types = [matrix, matrix, _tensor_type(()), packed] + (
        [matrix] if has_momentum else [])
    # Each result over its operand: the variable, the accumulator (the
    # handler reads it whole before it writes any of it) and the momentum.
    results = [(matrix, 1), (packed, 3)] + (
        [(matrix, 4)] if has_momentum else [])
    values = _call(
        "sm3_tf_step", operands, operand_types, results,
        {"dims": (shape, "i64 array"), "lead": (lead, "i64"),
         "mu": (optimizer.momentum, "f32"),
         "eps": (optimizer.epsilon, "f32")})
    optimizer.assign(accumulator, values[1])
    optimizer.assign(variable, tf.reshape(values[0], shape))
    if has_momentum:
        optimizer.assign(momentum, tf.reshape(values[2], shape))


def vector_update(optimizer, accumulator, items, learning_rate):
    """One SM3 step of scalars and vectors in one call, in XLA.

    Args:
        optimizer: the SM3 optimizer.
        accumulator: the `vector_accumulator` they share.
        items: `(gradient, variable, offset, momentum)` per variable, its
            entries from `offset` on in `accumulator`; `momentum` None for
            all or for none.
        learning_rate: this step's learning rate.
    """
    has_momentum = items[0][3] is not None
    total = int(accumulator.shape[0])
    operands = [tf.cast(learning_rate, tf.float32),
                tf.convert_to_tensor(accumulator)]
    operand_types = [_tensor_type(()), _tensor_type((total,))]
    # The accumulator is written over its operand, whole: the entries of
    # variables not in `items` stay as they are.
    results = [(_tensor_type((total,)), 1)]
    offsets = []
    for gradient, variable, offset, momentum in items:
        if (momentum is not None) != has_momentum:
            raise ValueError("vector_update: momentum for some vectors only")
        size = math.prod(variable.shape)
        offsets.append(offset)
        state = [variable] + ([momentum] if has_momentum else [])
        first = len(operands)
        operands += [tf.reshape(gradient, [size])] + [
            tf.reshape(tf.convert_to_tensor(s), [size]) for s in state]
        operand_types += [_tensor_type((size,))] * (1 + len(state))
        results += [(_tensor_type((size,)), first + 1 + i)
                    for i in range(len(state))]
    values = iter(_call(
        "sm3_tf_vectors", operands, operand_types, results,
        {"offsets": (offsets, "i64 array"),
         "momentum": (int(has_momentum), "i64"),
         "mu": (optimizer.momentum, "f32"),
         "eps": (optimizer.epsilon, "f32")}))
    optimizer.assign(accumulator, next(values))
    for _, variable, _, momentum in items:
        shape = tuple(variable.shape)
        optimizer.assign(variable, tf.reshape(next(values), shape))
        if has_momentum:
            optimizer.assign(momentum, tf.reshape(next(values), shape))


def _tensor_type(shape):
    return "tensor<" + "".join(f"{d}x" for d in shape) + "f32>"


def _attribute(name, value, kind):
    """One entry of a custom call's `backend_config`, in MLIR syntax."""
    if kind == "i64 array":
        return f"{name} = array<i64: {', '.join(map(str, value))}>"
    if kind == "i64":
        return f"{name} = {value} : i64"
    return f"{name} = {value:.9e} : f32"


def _call(target, operands, operand_types, results, attributes):
    """The handler `target` on `operands` as a StableHLO module.

    `results` holds `(type, operand index)` per result: each is declared
    written over that operand (`output_operand_aliases`), so XLA updates
    the variables in place and copies none. `attributes` maps a name to
    `(value, "i64", "f32" or "i64 array")`.
    """
    from tensorflow.compiler.tf2xla.python import xla

    n = len(results)
    result_types = ", ".join(t for t, _ in results)
    config = ", ".join(_attribute(name, value, kind)
                       for name, (value, kind) in attributes.items())
    aliases = ", ".join(
        "#stablehlo.output_operand_alias<output_tuple_indices = "
        f"[{r}], operand_index = {o}, operand_tuple_indices = []>"
        for r, (_, o) in enumerate(results))
    module = (
        "module @sm3_tf {\n  func.func public @main("
        + ", ".join(f"%a{i}: {t}" for i, t in enumerate(operand_types))
        + f") -> ({result_types}) {{\n    %0:{n} = stablehlo.custom_call "
        f"@{target}("
        + ", ".join(f"%a{i}" for i in range(len(operand_types)))
        + f") {{api_version = 4 : i32, backend_config = {{{config}}}, "
        f"output_operand_aliases = [{aliases}]}} : "
        f"({', '.join(operand_types)}) -> ({result_types})\n"
        "    return " + ", ".join(f"%0#{i}" for i in range(n))
        + f" : {result_types}\n  }}\n}}\n")
    shapes = [tuple(operands[o].shape) for _, o in results]
    return xla.call_module(
        operands, version=xla.call_module_maximum_supported_version(),
        module=module.encode(), Tout=[tf.float32] * n, Sout=shapes,
        platforms=("CPU",))
