"""The distribution strategy, chosen by name in one place.

This is the only module that resolves a TPU: the address in `--tpu` is looked
up only when the `tpu` strategy is asked for, so a bad or absent address never
slows down a CPU or GPU run.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored", "tpu")


def default_strategy_name(tpu_address=None):
    """`tpu` when an address is given, `mirrored` with several GPUs, else one device."""
    if tpu_address:
        return "tpu"
    # Physical, not logical: listing logical devices would start the runtime
    # and forbid a later --cpu_devices split.
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "one_device"


def split_cpu(num_devices):
    """Splits the host CPU into `num_devices` logical devices (before TF starts).

    Lets MirroredStrategy run several replicas on a machine without GPUs, to
    try distributed code. Returns False when TensorFlow has already
    initialized its devices and the split could not be made.
    """
    if num_devices <= 1:
        return True
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
        return True
    except RuntimeError:
        return len(tf.config.list_logical_devices("CPU")) >= num_devices


def get_strategy(name, tpu_address=None):
    """Returns the `tf.distribute.Strategy` called `name` (one of STRATEGIES).

    - one_device: the first GPU, else the CPU.
    - mirrored: every local GPU; without GPUs every logical CPU device.
    - multi_worker_mirrored: the cluster in the TF_CONFIG environment variable.
    - tpu: the TPU at `tpu_address` ("" or "local" for a TPU VM's own chips).
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"--strategy must be one of {', '.join(STRATEGIES)}; got {name!r}.")
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        # The default cross-device ops use NCCL, which has no CPU kernel.
        cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(
            devices, cross_device_ops=cross_device_ops)
    if name == "multi_worker_mirrored":
        if "TF_CONFIG" in os.environ:
            json.loads(os.environ["TF_CONFIG"])  # fail early on malformed JSON
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu="" if tpu_address in (None, "local") else tpu_address)
    if tpu_address not in (None, "", "local"):
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_tpu(strategy):
    return isinstance(strategy, tf.distribute.TPUStrategy)


def worker_info(strategy):
    """(task_id, is_chief) for this process; (0, True) on a single worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 0, True
    task_type = resolver.task_type if resolver else None
    task_id = resolver.task_id if resolver else 0
    if task_type in (None, "chief"):
        return task_id or 0, True
    cluster = resolver.cluster_spec().as_dict() if resolver else {}
    is_chief = task_type == "worker" and task_id == 0 and "chief" not in cluster
    return task_id, is_chief
