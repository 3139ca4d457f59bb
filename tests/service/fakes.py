"""Fakes for the service tests: the reference MNIST CNN behind a gate the test controls.

``factory:tests.service.fakes:gated_mnist`` builds a model whose forward waits until
``GATE`` is set, so a test can hold the compute worker (or a fit job) busy at will.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from detectors.zoo import MnistCNN

GATE = threading.Event()
GATE.set()
ENTERED = threading.Event()
FORWARDS: list[tuple[str, int]] = []  # (thread name, batch rows) of every forward, for tests to inspect


class GatedMnist(MnistCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FORWARDS.append((threading.current_thread().name, len(x)))
        ENTERED.set()
        if not GATE.wait(timeout=30):
            raise RuntimeError("test gate was never opened")
        return super().forward(x)


def gated_mnist() -> GatedMnist:
    return GatedMnist()


class SlowMnist(MnistCNN):
    """Each forward takes GGA_TEST_FORWARD_S seconds more (for real-server tests in another process)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return super().forward(x)


def slow_mnist() -> SlowMnist:
    return SlowMnist(float(os.environ.get("GGA_TEST_FORWARD_S", "0")))
