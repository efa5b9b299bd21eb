"""What the benchmark and memory scripts share: the optimizers by name,
interleaved timing and the targets' report, and Linux's memory counters.

Nothing here imports a framework at module level: `bench_step.py` runs it on
TensorFlow, `bench_step_jax.py` on Keras's JAX backend.
"""

import ctypes
import statistics
import time


def build_optimizer(name, learning_rate=1e-4):
    """A fresh optimizer: SM3 (momentum 0.9 or 0) or one of Keras's."""
    import keras

    import sm3_tf

    builders = {
        "sgd": lambda: keras.optimizers.SGD(learning_rate),
        "sgd_momentum": lambda: keras.optimizers.SGD(learning_rate,
                                                     momentum=0.9),
        "adagrad": lambda: keras.optimizers.Adagrad(learning_rate),
        "adam": lambda: keras.optimizers.Adam(learning_rate),
        "adafactor": lambda: keras.optimizers.Adafactor(learning_rate),
        # SM3 as users get it (cpu_kernel="auto"): its CPU kernel where it
        # can run (TensorFlow or JAX on a CPU), its portable path elsewhere.
        "sm3": lambda: sm3_tf.SM3(learning_rate, momentum=0.9),
        "sm3_no_momentum": lambda: sm3_tf.SM3(learning_rate, momentum=0.0),
        # The portable path (keras.ops) everywhere: cpu_kernel=False.
        "sm3_portable": lambda: sm3_tf.SM3(learning_rate, momentum=0.9,
                                           cpu_kernel=False),
        "sm3_portable_no_momentum": lambda: sm3_tf.SM3(
            learning_rate, momentum=0.0, cpu_kernel=False),
    }
    if name not in builders:
        raise ValueError(f"unknown optimizer {name!r}; known: "
                         f"{', '.join(builders)}")
    return builders[name]()


OPTIMIZER_NAMES = ("sgd", "sgd_momentum", "adagrad", "adam", "adafactor",
                   "sm3", "sm3_no_momentum", "sm3_portable",
                   "sm3_portable_no_momentum")


def say_sm3_path(reason):
    """Prints which path `SM3()` (`sm3`) takes here: its CPU kernel where
    `reason` (why the kernel is unavailable) is None."""
    print('SM3() here (cpu_kernel="auto"): '
          + ("its CPU kernel" if reason is None
             else f"its portable path ({reason})")
          + "; sm3_portable: cpu_kernel=False", flush=True)


def draw_problem(shapes, seed=0):
    """Initial values and gradients (float32 NumPy arrays) for `shapes`.

    Both benchmark scripts draw from here, so their tables time the same
    numbers.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    values, grads = [], []
    for shape in shapes:
        values.append(rng.standard_normal(shape, dtype=np.float32) * 0.05)
        grads.append(rng.standard_normal(shape, dtype=np.float32) * 1e-3)
    return values, grads


def check_names(parser, flag, names, known):
    """`parser.error` naming the first of `names` not in `known`."""
    for name in names:
        if name not in known:
            parser.error(f"{flag}: unknown {name!r}; choose from "
                         f"{', '.join(known)}")


def time_interleaved(steps, rounds, wait, warmup=2):
    """`{name: median seconds}` of `steps[name]()`, rounds interleaved.

    Each round runs every step once, in a rotating order, so that machine
    noise hits all alike. `wait(result)` blocks until a step's result is
    computed (TensorFlow: `.numpy()`; JAX: `jax.block_until_ready`).
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            wait(steps[name]())
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            wait(steps[name]())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# The targets: under a whole-step XLA program, and without XLA.
TARGETS = {
    True: [target for sm3 in ("sm3", "sm3_portable") for target in [
        (sm3, "sgd_momentum", 1.25), (sm3, "adam", 0.85),
        (f"{sm3}_no_momentum", "sgd", 1.5), (sm3, "adafactor", None)]],
    False: [target for sm3 in ("sm3", "sm3_portable") for target in [
        (sm3, "sgd_momentum", 1.5), (sm3, "adam", 0.85),
        (f"{sm3}_no_momentum", "sgd", None), (sm3, "adafactor", None)]],
}


def print_medians(heading, med):
    print(f"\n{heading}")
    width = max(len(name) for name in med) + 2
    for name, t in med.items():
        print(f"  {name:{width}s} {1000 * t:8.1f}")


def report_ratios(label, med, jit, targets=True):
    """The medians, then SM3's ratios (with the targets when `targets`)."""
    print_medians(f"{label}: median step time (ms)", med)
    for a, b, bound in TARGETS[jit]:
        if a in med and b in med:
            ratio = med[a] / med[b]
            # The targets are for the full-size variable sets.
            target = f"  (target <= {bound})" if bound and targets else ""
            print(f"  {a} / {b}: {ratio:.2f}x{target}")


def cap_shapes(shapes, cap_dims):
    """`shapes` with every axis cut to at most `cap_dims` entries (`--cap_dims`)."""
    return [tuple(min(d, cap_dims) for d in shape) for shape in shapes]


def status_kib(field):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss(release_free_memory=False):
    """Resets VmHWM to the current RSS; optionally returns freed heap first."""
    if release_free_memory:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
