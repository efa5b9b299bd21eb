"""What the benchmark and memory scripts share: the optimizers, by name, and
Linux's memory counters."""

import ctypes


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
        "sm3": lambda: sm3_tf.SM3(learning_rate, momentum=0.9),
        "sm3_no_momentum": lambda: sm3_tf.SM3(learning_rate, momentum=0.0),
    }
    if name not in builders:
        raise ValueError(f"unknown optimizer {name!r}; known: "
                         f"{', '.join(builders)}")
    return builders[name]()


OPTIMIZER_NAMES = ("sgd", "sgd_momentum", "adagrad", "adam", "adafactor",
                   "sm3", "sm3_no_momentum")


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
