"""One torch thread for a test module: tiny tensors gain nothing from more, a busy machine loses
much to oversubscription (7-10x measured here), and a bit-exact repeat needs one fixed count."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
