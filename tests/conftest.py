"""Fixtures shared by every test folder (helpers live in tests/support/)."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file

from detectors.datasets import load_idx_split
from detectors.persist import load_detector
from detectors.zoo import MnistCNN
from service.settings import DEFAULT_MODEL_DIR
from tests.support.service import MNIST


@pytest.fixture(scope="session")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return load_idx_split(MNIST, "t10k")


@pytest.fixture(scope="session")
def reference():
    """The bundled detector (the composite preset), used directly (no service) as ground truth."""
    model = MnistCNN()
    model.load_state_dict(load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")))
    model.eval()
    return load_detector(DEFAULT_MODEL_DIR / "detector", model)
