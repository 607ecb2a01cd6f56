"""Shared pytest configuration: headless plotting, quiet Lightning, GPU marker handling."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """Tests must not leak global torch settings (default dtype, grad mode) into each other."""
    dtype = torch.get_default_dtype()
    grad = torch.is_grad_enabled()
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


def ran_fused(out: torch.Tensor) -> bool:
    """Whether ``out`` came from the fused packed gated MLP (its autograd node, or a reshape of
    it for inputs with more than two dimensions)."""
    fn = out.grad_fn
    for _ in range(2):
        if fn is None:
            return False
        if "FusedGatedMLP" in type(fn).__name__:
            return True
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return False
