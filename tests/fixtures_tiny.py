"""Fixtures on tiny random models (dense base): fast, no quantization back-end needed."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_llama_pair


@pytest.fixture
def tiny_llama():
    """(original, fake-quantized) tiny random Llamas; fresh for every test."""
    return tiny_llama_pair()


@pytest.fixture(scope="session")
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 49152, (16, 64), generator=torch.Generator().manual_seed(0))
