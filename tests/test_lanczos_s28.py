"""Session 28 review of the Lanczos path: argument checks and certificates.

* ``max_matvecs`` below two blocks was accepted by ``check_spectrum_arguments`` (the monitor's
  construction check), then refused by the solver mid-run, quoting one block (4) instead of the
  value passed.
* A loose ``tol`` (0.1, 0.5) gave ``converged=True`` with λ_min 59% … 6.7x off: the residual
  certifies *an* eigenvalue near θ_min, not λ_min; the test now never takes ``tol`` above
  ``LOOSEST_TOL``.
* ``LanczosResult.condition_number_lower`` was θ_max/θ_min with no rounding allowance: 5x the
  true κ, or ``inf``, for a positive definite K with float32 products.

Truth: float64 ``eigvalsh`` of the explicit K (or of ``ntk_matrix`` in float64).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import glu_probe.ntk.krylov as krylov
import glu_probe.ntk.spectrum as spectrum_mod
from glu_probe.callbacks.ntk import NTKSpectrumMonitor
from glu_probe.ntk import ntk_matrix, ntk_spectrum
from glu_probe.ntk.krylov import LanczosResult, block_lanczos
from glu_probe.ntk.spectrum import check_spectrum_arguments

torch.set_num_threads(1)


def _spd(lam: torch.Tensor, seed: int) -> torch.Tensor:
    lam = lam.double()
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=torch.float64))
    return (u * lam) @ u.T


def _mlp_probe(rows: int = 40) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, torch.randn(rows, 6)


def _truth(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = ntk_matrix(model, x, dtype=torch.float64)
    return torch.linalg.eigvalsh(k.double())


# --------------------------------------------------------------------------------------------
# 1. max_matvecs below two blocks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_matvecs", [1, 2, 3, 7])
def test_check_refuses_max_matvecs_below_two_blocks_with_the_value_passed(max_matvecs):
    # rows_unknown: the monitor's check at construction (its probe does not exist yet)
    for kwargs in ({"method": "lanczos"}, {}):  # {}: method not given
        with pytest.raises(ValueError, match=rf"2·block_size = 8\), got {max_matvecs}:"):
            check_spectrum_arguments(max_matvecs=max_matvecs, rows_unknown=True, **kwargs)
    # the block_size given, not the default
    with pytest.raises(ValueError, match=r"2·block_size = 4\), got 3:"):
        check_spectrum_arguments(method="lanczos", max_matvecs=3, block_size=2, rows_unknown=True)
    check_spectrum_arguments(method="lanczos", max_matvecs=4, block_size=2, rows_unknown=True)
    check_spectrum_arguments(method="lanczos", max_matvecs=8, rows_unknown=True)
    # the dense path does not use it, and auto refuses it only where it takes Lanczos
    check_spectrum_arguments(method="dense", max_matvecs=max_matvecs, rows_unknown=True)
    check_spectrum_arguments(method="auto", max_matvecs=max_matvecs, rows_unknown=True)
    # with the rows known (ntk_spectrum), the solver decides: min(n, 2·block_size)
    check_spectrum_arguments(method="lanczos", max_matvecs=max_matvecs)


def test_ntk_spectrum_quotes_the_max_matvecs_passed():
    model, x = _mlp_probe()
    with pytest.raises(ValueError, match=r"got 3:"):
        ntk_spectrum(model, x, method="lanczos", max_matvecs=3)


def test_auto_with_a_small_max_matvecs_still_takes_the_dense_path(monkeypatch):
    """auto on a small probe goes dense, which never uses max_matvecs: still accepted, and
    exact. Where auto takes the Lanczos path, the solver refuses the value as passed (it was
    quoted as 4, one block)."""
    model, x = _mlp_probe()
    ev = _truth(model, x)
    s = ntk_spectrum(model, x, method="auto", max_matvecs=3)
    assert s.method == "dense"
    assert s.lambda_max == pytest.approx(float(ev[-1]), rel=1e-10)
    assert s.lambda_min == pytest.approx(float(ev[0]), rel=1e-8)
    monkeypatch.setattr(spectrum_mod, "AUTO_DENSE_MAX_ROWS", 8)  # auto now takes Lanczos
    with pytest.raises(ValueError, match=r"integer >= 8 .*, got 3:"):
        ntk_spectrum(model, x, method="auto", max_matvecs=3)


def test_a_small_problem_keeps_a_budget_of_all_its_rows():
    """n < 2·block_size: the solver needs all n rows, not two blocks."""
    k = _spd(torch.tensor([0.5, 1.0, 3.0]), 0)
    res = block_lanczos(lambda v: k.to(v.dtype) @ v, 3, max_matvecs=3, dtype=torch.float64)
    assert res.exact and res.n_matvecs == 3
    torch.testing.assert_close(res.ritz_values, torch.linalg.eigvalsh(k), rtol=1e-12, atol=1e-14)
    model, x = _mlp_probe(rows=3)
    ev = _truth(model, x)
    s = ntk_spectrum(model, x, method="lanczos", max_matvecs=8, dtype=torch.float64)
    assert s.converged and s.n_rows == 3
    assert s.lambda_min == pytest.approx(float(ev[0]), rel=1e-6)
    assert s.lambda_max == pytest.approx(float(ev[-1]), rel=1e-9)


def test_monitor_refuses_max_matvecs_below_two_blocks_at_construction():
    with pytest.raises(MisconfigurationException, match=r"spectrum_kwargs.*got 3:"):
        NTKSpectrumMonitor(
            every_n_steps=2,
            probe=torch.randn(16, 6),
            log_figure=False,
            log_histogram=False,
            method="lanczos",
            spectrum_kwargs={"max_matvecs": 3},
        )
    with pytest.raises(MisconfigurationException, match=r"2·block_size = 4\), got 3:"):
        NTKSpectrumMonitor(
            probe=torch.randn(16, 6),
            method="lanczos",
            spectrum_kwargs={"max_matvecs": 3, "block_size": 2},
        )
    NTKSpectrumMonitor(probe=torch.randn(16, 6), spectrum_kwargs={"max_matvecs": 8})
    # (re-review s28: the dense path never uses it; auto accepts it as ntk_spectrum does)
    for method in ("dense", "auto"):
        NTKSpectrumMonitor(
            probe=torch.randn(16, 6), method=method, spectrum_kwargs={"max_matvecs": 3}
        )
    NTKSpectrumMonitor(
        probe=torch.randn(16, 6), method="dense", spectrum_kwargs={"block_size": 300}
    )


def test_a_probe_of_fewer_rows_than_two_blocks_runs_on_its_rows():
    """Re-review s28: a 3-row probe with max_matvecs=3 was refused ("two blocks = 8"),
    though its first block spans K."""
    model, x = _mlp_probe(rows=3)
    ev = _truth(model, x)
    for which in ("both", "largest"):
        s = ntk_spectrum(
            model, x, method="lanczos", max_matvecs=3, dtype=torch.float64, which=which
        )
        assert s.lambda_max == pytest.approx(float(ev[-1]), rel=1e-9)
        if which == "both":
            assert s.converged and s.lambda_min == pytest.approx(float(ev[0]), rel=1e-6)


# --------------------------------------------------------------------------------------------
# 2. a loose tol: converged=True must not mean λ_min far outside tol
# --------------------------------------------------------------------------------------------
# (n, block_size, tol, spectrum seed, start seed): the review's repro (linspace(0.1, 3, n),
# 6.7x, 3.3x, 15% and 59% off with converged=True), and log-spaced spectra from its sweep at
# block sizes 2 and 4
REVIEW_CASES = [
    ("lin", 9, 2, 0.5, 1, 0),
    ("lin", 9, 1, 0.5, 1, 0),
    ("lin", 200, 1, 0.1, 0, 0),
    ("lin", 50, 1, 0.1, 2, 2),
    ("log4", 5, 2, 0.1, 4, 4),
    ("log2", 9, 2, 0.1, 2, 2),
    ("log4", 9, 2, 0.1, 2, 2),
]


def _spectrum(shape: str, n: int) -> torch.Tensor:
    if shape == "lin":
        return torch.linspace(0.1, 3, n, dtype=torch.float64)
    return torch.logspace(0, -int(shape[3:]), n, dtype=torch.float64)


@pytest.mark.parametrize(("shape", "n", "bs", "tol", "lam_seed", "seed"), REVIEW_CASES)
def test_a_loose_tol_does_not_certify_a_wrong_extreme(shape, n, bs, tol, lam_seed, seed):
    k = _spd(_spectrum(shape, n), lam_seed)
    ev = torch.linalg.eigvalsh(k)
    res = block_lanczos(
        lambda v: k @ v,
        n,
        block_size=bs,
        tol=tol,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(seed),
    )
    assert res.converged
    assert abs(res.lambda_min / float(ev[0]) - 1) <= tol
    assert abs(res.lambda_max / float(ev[-1]) - 1) <= tol
    assert abs(res.condition_number / float(ev[-1] / ev[0]) - 1) <= 2 * tol


def test_a_tol_above_the_cap_runs_as_the_cap():
    """tol above krylov.LOOSEST_TOL (1e-2) is tested as 1e-2: the same products and Ritz values."""
    k = _spd(_spectrum("lin", 50), 2)
    runs = [
        block_lanczos(
            lambda v: k @ v,
            50,
            block_size=1,
            tol=tol,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(2),
        )
        for tol in (1e-2, 0.1, 0.5)
    ]
    assert [r.n_matvecs for r in runs] == [runs[0].n_matvecs] * 3
    for r in runs[1:]:
        torch.testing.assert_close(r.ritz_values, runs[0].ritz_values, rtol=0, atol=0)
    assert [r.tol for r in runs] == [1e-2, 0.1, 0.5]  # (the tol asked for)
    assert krylov.LOOSEST_TOL == 1e-2


# --------------------------------------------------------------------------------------------
# 3. condition_number_lower with float32 products
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_condition_number_lower_bounds_kappa_with_float32_products(seed):
    """The review's K: one outlier 1e8, the rest in [0.5, 1] (κ = 2e8); θ_min is float32
    rounding noise, θ_max/θ_min gave 9.6e8, 1.2e9, inf."""
    n = 120
    lam = torch.cat([torch.tensor([1e8]), torch.linspace(1, 0.5, n - 1)]).double()
    k = _spd(lam, seed)
    ev = torch.linalg.eigvalsh(k)
    kappa = float(ev[-1] / ev[0])
    res = block_lanczos(
        lambda v: k.to(v.dtype) @ v, n, generator=torch.Generator().manual_seed(seed)
    )
    lower = res.condition_number_lower
    assert 1.0 <= lower <= kappa
    s = 16.0 * math.sqrt(n) * torch.finfo(torch.float32).eps * res.lambda_max
    assert lower == pytest.approx((res.lambda_max - s) / (res.lambda_min + s), rel=1e-12)
    assert res.eps == torch.finfo(torch.float32).eps
    assert res.rounding_allowance == pytest.approx(s, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_condition_number_lower_stays_close_on_a_well_conditioned_k(dtype):
    n = 60
    k = _spd(torch.linspace(1, 10, n), 5)
    ev = torch.linalg.eigvalsh(k)
    kappa = float(ev[-1] / ev[0])
    res = block_lanczos(lambda v: k.to(v.dtype) @ v, n, dtype=dtype)
    eps = torch.finfo(dtype).eps
    assert kappa * (1 - 1e3 * math.sqrt(n) * eps) <= res.condition_number_lower <= kappa


def test_condition_number_bound_is_inf_only_where_theta_min_plus_s_is_not_positive():
    assert krylov.condition_number_bound(4.0, -0.1, 0.2) == pytest.approx(3.8 / 0.1)
    assert krylov.condition_number_bound(4.0, -0.2, 0.2) == math.inf
    assert krylov.condition_number_bound(1.0, 1.0, 0.1) == 1.0  # κ >= 1
    assert krylov.rounding_allowance(100, 1e-7, -2.0) == pytest.approx(16 * 10 * 1e-7 * 2)
    # a result built by hand takes its products' eps from the Ritz vectors' dtype
    res = LanczosResult(
        ritz_values=torch.tensor([-1e-9, 2.0], dtype=torch.float64),
        ritz_vectors=torch.eye(4, 2),
        residual_norms=torch.zeros(2, dtype=torch.float64),
        error_bounds=torch.zeros(2, dtype=torch.float64),
        n_matvecs=4,
        converged_max=True,
        converged_min=True,
        lambda_min_is_zero=True,
        exact=False,
        which="both",
        n_restarts=0,
        n_random=0,
        tol=1e-4,
    )
    s = 16.0 * 2.0 * torch.finfo(torch.float32).eps * 2.0
    assert res.condition_number == math.inf
    assert res.condition_number_lower == pytest.approx((2.0 - s) / (s - 1e-9))


def test_ntk_spectrum_and_the_solver_share_the_allowance():
    """ntk_spectrum's condition_number_lower is the solver's rule at the products' eps (the
    model's own coarser eps where it casts): never above the solver's, and below κ."""
    model, x = _mlp_probe(rows=48)
    ev = _truth(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ntk_spectrum(model, x, method="lanczos", max_matvecs=48)
    slack = krylov.rounding_allowance(48, torch.finfo(torch.float32).eps, s.lambda_max)
    assert s.condition_number_lower == pytest.approx(
        krylov.condition_number_bound(s.lambda_max, s.lambda_min, slack), rel=1e-12
    )
    assert s.condition_number_lower <= float(ev[-1] / ev[0])


def test_a_tol_above_the_cap_is_the_cap_after_the_solver_too():
    """Re-review s28: the SLQ deflation and the non-convergence warning still took the user's
    tol (0.5) where the solver had tested 1e-2: the effective rank moved with a tol the
    solver ignored, and the warning quoted a tolerance the residuals were far inside."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 3))
    x = torch.randn(100, 6)
    runs = {}
    for tol in (1e-2, 0.5):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[tol] = ntk_spectrum(
                m,
                x,
                output="full",
                method="lanczos",
                tol=tol,
                slq_probes=4,
                max_matvecs=16,
                generator=torch.Generator().manual_seed(0),
            )
        texts = [str(w.message) for w in caught if "did not converge" in str(w.message)]
        if tol == 0.5 and texts:
            assert "tol=0.5, tested as 0.01" in texts[0]
    a, b = runs[1e-2], runs[0.5]
    assert a.lambda_max == b.lambda_max and a.n_matvecs == b.n_matvecs
    assert a.effective_rank == b.effective_rank
