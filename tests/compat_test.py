"""The private Keras, TensorFlow and JAX symbols sm3_tf needs exist here."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util

from sm3_tf import _compat


def test_every_private_symbol_sm3_tf_uses_is_there():
    packages = [p for p in ("keras", "tensorflow", "jax")
                if importlib.util.find_spec(p) is not None]
    missing = _compat.missing(packages)
    assert not missing, (
        "This Keras / TensorFlow / JAX lacks private symbols that sm3_tf uses "
        f"(listed in sm3_tf/_compat.py): {', '.join(missing)}. Pin the "
        "versions in constraints.txt, or find the symbol's new home.")


def test_a_missing_symbol_is_named():
    saved = _compat.PRIVATE_SYMBOLS
    try:
        _compat.PRIVATE_SYMBOLS = saved + (
            ("keras", "keras.optimizers.Optimizer._no_such_method"),
            ("keras", "keras.no_such_module.thing"))
        assert _compat.missing(["keras"]) == [
            "keras.optimizers.Optimizer._no_such_method",
            "keras.no_such_module.thing"]
    finally:
        _compat.PRIVATE_SYMBOLS = saved
