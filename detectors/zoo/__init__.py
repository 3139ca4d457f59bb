"""Built-in architectures (no weights inside; weights are loaded from safetensors)."""

from detectors.zoo.cifar_resnet import CifarResNet, resnet20, resnet56
from detectors.zoo.mnist_cnn import MnistCNN

ARCHITECTURES = {
    "mnist_cnn": MnistCNN,
    "cifar_resnet20": resnet20,
    "cifar_resnet56": resnet56,
}

__all__ = ["ARCHITECTURES", "CifarResNet", "MnistCNN", "resnet20", "resnet56"]
