"""Trains a small ConvNet on scikit-learn's digits with SM3 (no download).

    python scripts/quickstart.py [--epochs 15]

Prints the loss each epoch, test accuracy, and how much memory SM3's state
takes next to the parameters and next to Adam's.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sm3_tf  # noqa: E402
from sm3_tf import memory  # noqa: E402


def load_digits():
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:  # pragma: no cover - message for users
        raise SystemExit(
            "scripts/quickstart.py needs scikit-learn for its offline digits "
            "data: pip install 'sm3_tf[examples]'") from err
    digits = sklearn_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def build_model():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--learning_rate", type=float, default=0.1)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if not args.learning_rate >= 0:
        parser.error(f"--learning_rate must be >= 0, got {args.learning_rate}")

    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = load_digits()
    model = build_model()
    model.compile(
        optimizer=sm3_tf.SM3(learning_rate=args.learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(f"digits: {len(x_train)} train / {len(x_test)} test 8x8 images")
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=2,
              validation_data=(x_test, y_test))
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)

    params = memory.parameter_bytes(model.trainable_variables)
    sm3_state = memory.optimizer_state_bytes(model.optimizer)
    accumulators = sm3_state - params  # the momentum slot is one per param
    adam = keras.optimizers.Adam()
    adam.build(model.trainable_variables)
    adam_state = memory.optimizer_state_bytes(adam)
    print(f"test accuracy: {accuracy:.4f}")
    print(f"parameters:              {params / 1024:9.1f} KiB")
    print(f"SM3 accumulators:        {accumulators / 1024:9.1f} KiB "
          f"({100 * accumulators / params:.2f}% of the parameters)")
    print(f"SM3 state with momentum: {sm3_state / 1024:9.1f} KiB")
    print(f"Adam state:              {adam_state / 1024:9.1f} KiB")


if __name__ == "__main__":
    main()
