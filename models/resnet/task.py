"""The image-classification task: ResNet v1.5, its data, loss and top-1 accuracy."""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from models.resnet import data
from models.resnet import model as model_lib


@dataclasses.dataclass
class ResNetConfig:
    dataset: str = "digits"
    data_dir: str = None
    depth: int = 50
    width: int = 64
    image_size: int = 0        # 0: the data set's own (8, 32, 224)
    label_smoothing: float = 0.0
    seed: int = 0


class ImageClassificationTask:
    """Bundles the ResNet, its input pipelines, the loss and the metrics."""

    def __init__(self, config):
        if config.dataset not in data.DATASETS:
            raise ValueError(f"--dataset for the ResNet must be one of "
                             f"{', '.join(data.DATASETS)}; got {config.dataset!r}.")
        self.config = config
        self.image_size = config.image_size or data.DEFAULT_IMAGE_SIZE[config.dataset]
        self.num_classes = data.NUM_CLASSES[config.dataset]
        self.name = f"resnet{config.depth}/{config.dataset}"

    def build_model(self):
        channels = 1 if self.config.dataset == "digits" else 3
        return model_lib.build_resnet(
            self.config.depth, self.num_classes,
            (self.image_size, self.image_size, channels),
            width=self.config.width, small_images=self.image_size <= 32,
            # Called under the strategy's scope: it knows the replicas.
            sync_batch_norm=tf.distribute.get_strategy().num_replicas_in_sync > 1)

    def train_dataset(self, global_batch_size, input_context, start_step=0):
        if self.config.dataset == "digits":
            return data.digits_train(global_batch_size, input_context,
                                     start_step, seed=self.config.seed)
        return data.tfds_train(self.config.dataset, global_batch_size,
                               input_context, self.config.data_dir,
                               self.image_size, start_step, seed=self.config.seed)

    def eval_dataset(self, global_batch_size, input_context):
        if self.config.dataset == "digits":
            return data.digits_eval(global_batch_size, input_context)
        return data.tfds_eval(self.config.dataset, global_batch_size,
                              input_context, self.config.data_dir,
                              self.image_size)

    def per_example_loss(self, model, batch, training=True):
        images, labels = batch
        logits = model(images, training=training)
        onehot = tf.one_hot(labels, self.num_classes)
        return keras.losses.categorical_crossentropy(
            onehot, logits, from_logits=True,
            label_smoothing=self.config.label_smoothing)

    def eval_outputs(self, model, batch):
        images, labels = batch
        logits = model(images, training=False)
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return {"correct": tf.cast(tf.equal(predicted, labels), tf.float32)}

    def eval_metrics(self, outputs):
        correct = outputs["correct"]
        return {"accuracy": float(np.mean(correct)) if len(correct) else 0.0,
                "examples": float(len(correct))}

    def quality_line(self, metrics):
        return (f"top-1 accuracy {100 * metrics['eval_accuracy']:.2f}% on "
                f"{int(metrics['eval_examples'])} held-out {self.config.dataset} "
                "images")
