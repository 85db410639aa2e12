"""Engine tests run their tiny models on one thread: on a shared 2-core machine, multi-threaded
kernels on tensors this small mostly wait for each other."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
