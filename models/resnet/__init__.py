"""ResNet v1.5 image classification (digits, CIFAR-10, ImageNet)."""
