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


def _linear_with_spectrum(eigs: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
    """A bias-free ``Linear(n, 1)`` and inputs X with X Xᵀ = K of eigenvalues ``eigs``."""
    g = torch.Generator().manual_seed(1)
    n = eigs.numel()
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    X = U @ torch.diag(eigs.sqrt()) @ V.T
    return torch.nn.Linear(n, 1, bias=False).double(), X


def test_a_lanczos_run_spanning_the_space_agrees_with_one_that_stops_early() -> None:
    """κ = 1.54e4, n = 600, float32 products: tol=1e-4 stops early with κ to 2e-5; tol=1e-6
    spans the whole space, whose rank tolerance was λ_max·n·ε₃₂ = 7.2e-5, above λ_min = 6.5e-5
    (which the products resolve), so it reported rank 599 and κ = inf."""
    n, lam_min = 600, 6.5e-5
    eigs = torch.cat([torch.tensor([lam_min, 1.0]), torch.linspace(0.1, 0.2, n - 2)]).double()
    model, X = _linear_with_spectrum(eigs)
    for tol in (1e-4, 1e-6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # eps·κ > 10·tol at tol=1e-6
            s = ntk_spectrum(model, X, method="lanczos", tol=tol, max_matvecs=n)
        assert s.converged
        assert s.numerical_rank in (None, n)
        assert abs(s.condition_number * lam_min - 1) < 1e-3


def test_a_bfloat16_rounding_model_keeps_a_rank_and_kappa_lower_at_least_one() -> None:
    """A model that rounds through bfloat16 inside: the rank tolerance n·ε_bf16·λ_max exceeded
    λ_max from n = 128 on (rank 0 beside a finite λ_max), and condition_number_lower was -0.43."""

    class HalfInside(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 64), torch.nn.Linear(64, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)).to(torch.bfloat16).to(x.dtype))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ntk_spectrum(HalfInside(), torch.randn(200, 8), method="lanczos")
    assert s.condition_number_lower >= 1.0
    assert s.numerical_rank is None or s.numerical_rank >= 1


def test_largest_only_says_nothing_about_lambda_min() -> None:
    """``which="largest"`` does not estimate λ_min: no rank warning claiming κ = inf beside a
    NaN κ (K = X Xᵀ ⊗ I_8 of rank 48 of 240, which the Krylov space spans)."""
    from glu_probe.ntk.spectrum import NTKRankWarning

    torch.manual_seed(0)
    model, x = torch.nn.Linear(6, 8, bias=False), torch.randn(30, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NTKRankWarning)
        s = ntk_spectrum(model, x, output="full", method="lanczos", which="largest")
    truth = torch.linalg.eigvalsh(x.double() @ x.double().T)[-1]
    assert math.isnan(s.condition_number) and abs(s.lambda_max / float(truth) - 1) < 1e-4


# ---- density: argument checks (review, session 22) -------------------------------------------
def test_density_refuses_bad_ranges_counts_and_deflations() -> None:
    from glu_probe.ntk.density import (
        effective_rank,
        slq_density,
        slq_effective_rank,
        slq_trace,
        spectral_density,
    )

    lam = torch.tensor([1.0, 2.0, 3.0])
    for bad in ((1.0, 0.0), (float("nan"), 1.0), (0.0, float("inf")), (1.0, 1.0)):
        with pytest.raises(ValueError, match="low < high"):
            spectral_density(lam, log=False, range=bad)
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        spectral_density(lam, bins=True)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return v

    for kw in ({"n_steps": True}, {"n_probes": True}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            slq_density(matvec, 10, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a positive integer"):
        slq_density(matvec, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zero or linearly dependent"):
        slq_density(matvec, 10, deflate=(torch.tensor([1.0]), torch.zeros(10, 1)))
    with pytest.raises(ValueError, match="11 pairs, more than n = 10"):
        slq_density(matvec, 10, deflate=(torch.ones(11), torch.randn(10, 11)))
    with pytest.raises(ValueError, match="non-negative"):
        slq_trace(torch.tensor([1.0, 2.0]), torch.tensor([1.5, -0.5]), 4)
    with pytest.raises(ValueError, match="non-negative"):
        slq_effective_rank(torch.tensor([1.0, 2.0]), torch.tensor([1.5, -0.5]), 4)
    # a spectrum whose sum overflows float64 still has its effective rank (3 equal values: 3)
    assert effective_rank(
        torch.tensor([1e308, 1e308, 1e308], dtype=torch.float64)
    ) == pytest.approx(3)
