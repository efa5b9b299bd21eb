"""Reference trainers for `sm3_tf`: ResNet and Transformer on any tf.distribute strategy.

`scripts/train.py` is the driver; `models/common/loop.py` the one training loop;
each model directory holds a model, its data and a task that bundles them.
"""
