"""CIFAR ResNet-(6n+2) of He et al. (2016), shortcut option A.

Matches the layout of the pretrained CIFAR-10 checkpoints described in
``../shared/data/README.md`` (keys ``conv1``, ``bn1``, ``layer{1,2,3}.i``, ``linear``).
The network takes images already normalised with the ImageNet statistics unless it is
built with ``normalize=True``, in which case it takes [0, 1] RGB pixels [B, 3, 32, 32]
and normalises inside (a buffer-free fixed affine map, so the state dict is unchanged).
The ReLUs are ``nn.ReLU`` modules (no parameters, no state-dict keys), so that a copy
with smooth activations can be made by swapping modules (``benchmarks.attacks.softplus_copy``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Block(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.pad = (planes - in_planes) // 2 if (stride != 1 or in_planes != planes) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad is None:
            shortcut = x
        else:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    input_shape = (3, 32, 32)

    def __init__(self, n: int, num_classes: int = 10, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [_Block(in_planes, planes, stride)]
        blocks += [_Block(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return x
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features of the last stage, [B, 64]."""
        out = self.relu(self.bn1(self.conv1(self._prepare(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.penultimate(x))


def resnet20(num_classes: int = 10, normalize: bool = True) -> CifarResNet:
    return CifarResNet(3, num_classes, normalize)


def resnet56(num_classes: int = 10, normalize: bool = True) -> CifarResNet:
    return CifarResNet(9, num_classes, normalize)
