"""ResNet v1.5 (He et al. 2016, with the stride on the 3x3 convolution), in Keras 3.

v1.5 differs from the paper's v1 only where a bottleneck block downsamples:
the stride sits on the 3x3 convolution instead of the first 1x1, as in the
reference implementations of tensorflow/models and torchvision.
"""

import keras
from keras import layers

# Blocks per stage, and whether the blocks are bottlenecks (1x1-3x3-1x1).
DEPTHS = {
    10: ((1, 1, 1, 1), False),  # not in the paper: the tiny configuration
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}

_BN = dict(momentum=0.9, epsilon=1e-5)


def _bn(name, sync, **kwargs):
    return layers.BatchNormalization(name=name, synchronized=sync, **_BN, **kwargs)


def _conv(filters, kernel, stride, name):
    return layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=name)


def _block(x, filters, stride, bottleneck, name, sync):
    """One residual block; `filters` is the block's inner width."""
    out_filters = filters * 4 if bottleneck else filters
    shortcut = x
    if stride != 1 or x.shape[-1] != out_filters:
        shortcut = _conv(out_filters, 1, stride, f"{name}_proj")(x)
        shortcut = _bn(f"{name}_proj_bn", sync)(shortcut)
    if bottleneck:
        y = _conv(filters, 1, 1, f"{name}_conv1")(x)
        y = _bn(f"{name}_bn1", sync)(y)
        y = layers.ReLU()(y)
        y = _conv(filters, 3, stride, f"{name}_conv2")(y)  # v1.5: stride here
        y = _bn(f"{name}_bn2", sync)(y)
        y = layers.ReLU()(y)
        y = _conv(out_filters, 1, 1, f"{name}_conv3")(y)
    else:
        y = _conv(filters, 3, stride, f"{name}_conv1")(x)
        y = _bn(f"{name}_bn1", sync)(y)
        y = layers.ReLU()(y)
        y = _conv(filters, 3, 1, f"{name}_conv2")(y)
    # Zero-initialized last BN: every block starts as the identity, which
    # makes large-batch training stable (Goyal et al. 2017).
    y = _bn(f"{name}_bn_last", sync, gamma_initializer="zeros")(y)
    return layers.ReLU()(layers.Add()([shortcut, y]))


def build_resnet(depth, num_classes, image_shape, width=64, small_images=False,
                 sync_batch_norm=False):
    """A ResNet v1.5 classifier returning float32 logits.

    Args:
        depth: one of DEPTHS (18, 34, 50, 101, 152; 10 for tests).
        num_classes: output classes.
        image_shape: (height, width, channels).
        width: the first stage's width (64 in the paper); stages double it.
        small_images: a 3x3 stride-1 stem without max-pooling, for images of
            32 pixels or fewer (CIFAR, digits), instead of the 7x7 stride-2
            stem and max-pool that ImageNet's 224 pixels call for.
        sync_batch_norm: batch statistics over the global batch (an
            all-reduce per layer). Keras 3 keeps a replica's moving averages
            local (aggregation "none"), so without it the replicas' (and
            workers') moving statistics drift apart.
    """
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}; got {depth}.")
    blocks, bottleneck = DEPTHS[depth]
    inputs = keras.Input(image_shape, name="image")
    if small_images:
        x = _conv(width, 3, 1, "stem_conv")(inputs)
    else:
        x = _conv(width, 7, 2, "stem_conv")(inputs)
    x = _bn("stem_bn", sync_batch_norm)(x)
    x = layers.ReLU()(x)
    if not small_images:
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    for stage, count in enumerate(blocks):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            x = _block(x, width * 2**stage, stride, bottleneck,
                       f"stage{stage + 1}_block{index + 1}", sync_batch_norm)
    x = layers.GlobalAveragePooling2D()(x)
    # float32 logits even under a mixed-precision policy, for a stable softmax.
    logits = layers.Dense(num_classes, dtype="float32", name="logits",
                          kernel_initializer=keras.initializers.RandomNormal(
                              stddev=0.01))(x)
    return keras.Model(inputs, logits, name=f"resnet{depth}_v1_5")
