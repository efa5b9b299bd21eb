"""Image inputs: scikit-learn's digits (offline), CIFAR-10 and ImageNet via tfds.

Training batches repeat forever in a seeded, reproducible order; evaluation
batches cover the split once. Every function takes the global batch size and
the `tf.distribute.InputContext` and returns per-replica batches of
`(image float32 [b, h, w, c], label int32 [b])`.
"""

import numpy as np
import tensorflow as tf

from models.common import datasets

DATASETS = ("digits", "cifar10", "imagenet2012")
NUM_CLASSES = {"digits": 10, "cifar10": 10, "imagenet2012": 1000}
DEFAULT_IMAGE_SIZE = {"digits": 8, "cifar10": 32, "imagenet2012": 224}
_MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
_STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32) * 255.0
_CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32) * 255.0
_CIFAR_STDDEV = np.array([0.2470, 0.2435, 0.2616], np.float32) * 255.0


def load_digits_arrays():
    """scikit-learn's 1797 8x8 digits: 1437 train / 360 test, a fixed split."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(images))
    images, labels = images[order], labels[order]
    split = int(0.8 * len(images))
    return (images[:split], labels[:split]), (images[split:], labels[split:])



# ---------------------------------------------------------------- digits


def digits_train(global_batch_size, input_context, start_step=0, seed=0):
    (images, labels), _ = load_digits_arrays()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    dataset = datasets.shard_for_pipeline(dataset, input_context)
    dataset = dataset.shuffle(len(images), seed=seed).repeat()
    dataset = datasets.skip_consumed(dataset, start_step, global_batch_size,
                                     input_context)
    batch = datasets.per_replica_batch_size(global_batch_size, input_context)
    return datasets.finish_training_dataset(
        dataset.batch(batch, drop_remainder=True))


def digits_eval(global_batch_size, input_context):
    _, (images, labels) = load_digits_arrays()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    dataset = datasets.shard_for_pipeline(dataset, input_context)
    batch = datasets.per_replica_batch_size(global_batch_size, input_context)
    return dataset.batch(batch).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- tfds


def _normalize(image, mean, stddev):
    return (tf.cast(image, tf.float32) - mean) / stddev


def _random_resized_crop(image, size, seed):
    """Inception-style crop: 8-100% of the area, aspect ratio 3/4 to 4/3."""
    shape = tf.shape(image)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
    return tf.image.resize(image, [size, size], method="bilinear")


def _center_crop(image, size):
    """Resize the shorter side to size / 0.875, then crop the center."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / 0.875) / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, resized, method="bilinear")
    offset = (resized - size) // 2
    return tf.slice(image, [offset[0], offset[1], 0], [size, size, 3])


def _preprocess_imagenet_train(example, seed, image_size):
    # Per-example seeds from a stateless hash keep the augmentation
    # reproducible, so a resumed run sees the crops a straight run would.
    image = _random_resized_crop(example["image"], image_size, seed)
    image = tf.image.stateless_random_flip_left_right(image, seed + 1)
    return (_normalize(image, _MEAN_RGB, _STDDEV_RGB),
            tf.cast(example["label"], tf.int32))


def _preprocess_imagenet_eval(example, image_size):
    image = _center_crop(example["image"], image_size)
    return (_normalize(image, _MEAN_RGB, _STDDEV_RGB),
            tf.cast(example["label"], tf.int32))


def _preprocess_cifar_train(example, seed, image_size):
    image = tf.image.resize_with_crop_or_pad(
        example["image"], image_size + 8, image_size + 8)
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], seed)
    image = tf.image.stateless_random_flip_left_right(image, seed + 1)
    return (_normalize(image, _CIFAR_MEAN, _CIFAR_STDDEV),
            tf.cast(example["label"], tf.int32))


def _preprocess_cifar_eval(example, image_size):
    image = tf.image.resize_with_crop_or_pad(example["image"], image_size, image_size)
    return (_normalize(image, _CIFAR_MEAN, _CIFAR_STDDEV),
            tf.cast(example["label"], tf.int32))


def _decode(example):
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    return dict(example, image=image)


def tfds_train(name, global_batch_size, input_context, data_dir, image_size,
               start_step=0, seed=0):
    dataset = datasets.load_tfds_split(name, "train", data_dir,
                                       shuffle_files=True, seed=seed,
                                       skip_decoding=True)
    dataset = datasets.shard_for_pipeline(dataset, input_context)
    buffer = 10_000 if name == "imagenet2012" else 50_000
    dataset = dataset.shuffle(buffer, seed=seed).repeat()
    # Resuming skips still-encoded images; decoding comes after. A counter
    # gives every example its own augmentation seed, the same after a restart.
    first = datasets.skip_consumed(
        tf.data.Dataset.range(2**62), start_step, global_batch_size, input_context)
    dataset = datasets.skip_consumed(dataset, start_step, global_batch_size,
                                     input_context)
    dataset = tf.data.Dataset.zip((first, dataset))
    preprocess = (_preprocess_imagenet_train if name == "imagenet2012"
                  else _preprocess_cifar_train)

    def augment(index, example):
        seed_pair = tf.stack([tf.constant(seed, tf.int64), index])
        return preprocess(_decode(example), seed_pair, image_size)

    dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    batch = datasets.per_replica_batch_size(global_batch_size, input_context)
    return datasets.finish_training_dataset(
        dataset.batch(batch, drop_remainder=True))


def tfds_eval(name, global_batch_size, input_context, data_dir, image_size):
    split = "validation" if name == "imagenet2012" else "test"
    dataset = datasets.load_tfds_split(name, split, data_dir, skip_decoding=True)
    dataset = datasets.shard_for_pipeline(dataset, input_context)
    preprocess = (_preprocess_imagenet_eval if name == "imagenet2012"
                  else _preprocess_cifar_eval)
    dataset = dataset.map(lambda ex: preprocess(_decode(ex), image_size),
                          num_parallel_calls=tf.data.AUTOTUNE)
    batch = datasets.per_replica_batch_size(global_batch_size, input_context)
    return dataset.batch(batch).prefetch(tf.data.AUTOTUNE)
