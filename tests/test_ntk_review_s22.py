"""Session 22: a review of the dense path's numerical rank and bounds with float32 rows."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from glu_probe.ntk import ntk_spectrum


class _FuncMLP(torch.nn.Module):
    """Raw parameters and ``F.linear``: the structured strategy cannot take it, so the dense
    path makes Jacobian rows, in panels (at most half of the samples each) and streamed blocks."""

    def __init__(self, d: int, m: int, o: int) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(m, d) / d**0.5)
        self.b1 = torch.nn.Parameter(torch.zeros(m))
        self.w2 = torch.nn.Parameter(torch.randn(o, m) / m**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """The review's setting (the CI box has 2 cores; rounding of a vmapped call depends on its
    batch under either count, measured at 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _true_eigvals(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m.named_parameters()}

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(m, p, (x.double(),))
        return out.sum(-1) / math.sqrt(out.shape[-1])  # pNTK

    J = torch.cat([j.reshape(x.shape[0], -1) for j in jacrev(f)(params).values()], 1)
    return torch.linalg.eigvalsh(J @ J.T)


@pytest.mark.parametrize("seed", range(4))
def test_float32_rows_keep_an_exactly_singular_k_singular(seed: int) -> None:
    """A duplicated sample makes K exactly singular. With float32 rows a sample's rows were
    made in two different vmapped calls (its panel's and a streamed block's), which round
    differently, so K was no Gram matrix: 4 of 6 seeds reported full rank and a finite κ
    (1e9-8e9), the others a negative λ_min 87x beyond its residual."""
    torch.manual_seed(seed)
    model, x = _FuncMLP(16, 128, 3), torch.randn(128, 16)
    x[-1] = x[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ntk_spectrum(model, x, method="dense", jacobian_dtype=torch.float32)
    assert s.numerical_rank == 127
    assert s.condition_number == math.inf


@pytest.mark.parametrize("seed", range(3))
def test_float32_rows_lambda_min_error_within_its_residual(seed: int) -> None:
    """A near-duplicate sample (κ ~ 1e8-1e9): the reported λ_min lies within ``residual_min``
    of the float64 truth (it was 1.5-536x beyond it, and κ 35% off or infinite)."""
    torch.manual_seed(seed)
    model, x = _FuncMLP(16, 128, 3), torch.randn(128, 16)
    x[-1] = x[0] + 1e-3 * torch.randn(16)
    truth = _true_eigvals(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ntk_spectrum(model, x, method="dense", jacobian_dtype=torch.float32)
    assert abs(s.lambda_min - float(truth[0])) <= s.residual_min
    assert s.condition_number_lower <= float(truth[-1] / truth[0]) <= s.condition_number * 1.001
