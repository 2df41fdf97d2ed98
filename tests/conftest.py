"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier stalls on shared 2-core machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
