"""The paper's MNIST CNN (Schwinn et al. 2021, section 4.2.1).

Four 3x3 convolutions with 32, 64, 128 and 128 filters (ReLU after each, 2x2 max
pooling after the second and the fourth), then fully connected layers with 100 and
10 units. Input: float32 [B, 1, 28, 28] with pixels scaled to [0, 1] (no other
normalisation). Output: logits [B, 10].
"""

from __future__ import annotations

import torch
from torch import nn


class MnistCNN(nn.Module):
    input_shape = (1, 28, 28)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(128 * 4 * 4, 100)
        self.fc2 = nn.Linear(100, num_classes)
        # activation as a module (no parameters, the state dict is unchanged) so that
        # benchmarks.attacks.softplus_copy can swap it for a smooth one
        self.act = nn.ReLU()

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Activations of the 100-unit layer (after ReLU), [B, 100]."""
        return self.act(self.fc1(self.features(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.penultimate(x))
