"""Loading tfds data sets offline, and sharding them across input pipelines.

`tfds.load` of a data set that is not prepared retries the network for minutes
before failing; this module never lets it download, and turns the missing data
into one clear error that says how to prepare it.
"""

import tensorflow as tf


class DatasetNotPreparedError(RuntimeError):
    """A tfds data set is not prepared in the data directory."""


def _how_to_prepare(name):
    manual = ""
    if name.startswith("imagenet2012"):
        manual = (" ImageNet cannot be downloaded by tfds: put ILSVRC2012_img_"
                  "train.tar and ILSVRC2012_img_val.tar in DIR/downloads/manual "
                  "first.")
    return (f"Prepare it on a machine with network access with "
            f"`tfds build {name} --data_dir=DIR`, then pass --data_dir=DIR "
            f"(or set TFDS_DATA_DIR).{manual}")


def load_tfds_split(name, split, data_dir=None, shuffle_files=False, seed=None,
                    skip_decoding=False):
    """`tfds.load(name, split=split)` without any download.

    `skip_decoding` leaves images encoded (decode them after any skip).

    Raises:
        DatasetNotPreparedError: at once, when the data is not in `data_dir`.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - message for users
        raise ImportError(
            "The tfds data sets need tensorflow-datasets: "
            "pip install 'sm3_tf[trainers]'") from err
    read_config = tfds.ReadConfig(shuffle_seed=seed) if shuffle_files else None
    decoders = {"image": tfds.decode.SkipDecoding()} if skip_decoding else None
    try:
        return tfds.load(name, split=split, data_dir=data_dir, download=False,
                         shuffle_files=shuffle_files, read_config=read_config,
                         decoders=decoders)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError) as err:
        where = data_dir or "tfds's default data directory (~/tensorflow_datasets)"
        raise DatasetNotPreparedError(
            f"Data set {name!r} (split {split!r}) is not prepared in {where}. "
            f"{_how_to_prepare(name)} (tfds said: {err})") from err


def shard_for_pipeline(dataset, input_context):
    """Gives each input pipeline (one per worker) a disjoint share of the data."""
    if input_context and input_context.num_input_pipelines > 1:
        return dataset.shard(input_context.num_input_pipelines,
                             input_context.input_pipeline_id)
    return dataset


def per_replica_batch_size(global_batch_size, input_context):
    if input_context is None:
        return global_batch_size
    return input_context.get_per_replica_batch_size(global_batch_size)


def finish_training_dataset(dataset):
    """Prefetch; deterministic order even with parallel maps (for restarts)."""
    options = tf.data.Options()
    options.deterministic = True
    # Auto-sharding would shard again what shard_for_pipeline already split.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def skip_consumed(dataset, start_step, global_batch_size, input_context):
    """Skips the examples this pipeline fed to the first `start_step` steps.

    Each step takes global_batch_size / num_input_pipelines examples from
    every pipeline (its replicas' per-replica batches), so on an infinite,
    deterministic stream of examples this puts a resumed run where a straight
    run would be. Skip before any expensive map: skipped elements are still
    produced by the ops upstream.
    """
    if not start_step:
        return dataset
    pipelines = input_context.num_input_pipelines if input_context else 1
    return dataset.skip(start_step * (global_batch_size // pipelines))
