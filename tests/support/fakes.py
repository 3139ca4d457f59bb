"""Fakes for the service tests: the reference MNIST CNN behind a gate the test controls.

``factory:tests.support.fakes:gated_mnist`` builds a model whose forward waits until
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


def slow_server_env(tmp_path, forward_s: float, **settings: str) -> dict[str, str]:
    """Environment of a real ``gga-serve`` with :func:`slow_mnist` (the bundled weights and detector),
    one row per batch and the device rule (no startup measurement), plus ``settings``."""
    from service.settings import DEFAULT_MODEL_DIR

    env = dict(GGA_ARTIFACT_DIR=str(tmp_path / "a"), GGA_STRATEGY="device", GGA_LOG_LEVEL="warning",
               GGA_MODEL="factory:tests.support.fakes:slow_mnist",
               GGA_MODEL_WEIGHTS=str(DEFAULT_MODEL_DIR / "model.safetensors"),
               GGA_TEST_FORWARD_S=str(forward_s), GGA_MAX_BATCH_ROWS="1")
    return {**env, **settings}
