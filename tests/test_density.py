"""Spectral density, effective rank and SLQ (glu_probe.ntk.density) against exact spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glu_probe.ntk.density import (
    effective_rank,
    slq_density,
    slq_effective_rank,
    slq_trace,
    spectral_density,
)

torch.set_num_threads(1)


def spd(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=torch.float64))
    return (u * lam) @ u.T


# ---------------------------------------------------------------- effective rank
def test_effective_rank_closed_forms():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(3.5 * torch.ones(12)) == pytest.approx(12.0)  # scale invariant
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)  # rank one
    # two eigenvalues a, b: p = a/(a+b), erank = exp(-p log p - (1-p) log(1-p))
    a, b = 3.0, 1.0
    p = a / (a + b)
    expected = math.exp(-p * math.log(p) - (1 - p) * math.log(1 - p))
    assert effective_rank(torch.tensor([a, b])) == pytest.approx(expected, rel=1e-12)
    # zeros and rounding negatives of a PSD kernel carry no mass
    assert effective_rank(torch.tensor([a, b, 0.0, -1e-12])) == pytest.approx(expected, rel=1e-12)


def test_effective_rank_bounds():
    lam = torch.arange(1, 101, dtype=torch.float64) ** -1.5
    e = effective_rank(lam)
    assert 1.0 < e < 100.0


def test_effective_rank_bad_input():
    with pytest.raises(ValueError, match="empty"):
        effective_rank(torch.tensor([]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        effective_rank(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="at least one positive eigenvalue"):
        effective_rank(torch.zeros(4))


# ---------------------------------------------------------------- histogram
def test_spectral_density_matches_numpy_and_integrates_to_one():
    lam = torch.logspace(-4, 0, 257, dtype=torch.float64)
    edges, dens = spectral_density(lam, bins=16)
    ref, ref_edges = np.histogram(np.log10(lam.numpy()), bins=16, density=True)
    np.testing.assert_allclose(edges.numpy(), ref_edges, rtol=1e-12)
    np.testing.assert_allclose(dens.numpy(), ref, rtol=1e-12)
    assert float((dens * edges.diff()).sum()) == pytest.approx(1.0)
    edges_lin, dens_lin = spectral_density(lam, bins=8, log=False)
    ref_lin, _ = np.histogram(lam.numpy(), bins=8, density=True)
    np.testing.assert_allclose(dens_lin.numpy(), ref_lin, rtol=1e-12)
    assert float(edges_lin[0]) == pytest.approx(1e-4)


def test_spectral_density_weights_and_constant_spectrum():
    lam = torch.tensor([1.0, 10.0, 100.0])
    w = torch.tensor([0.5, 0.25, 0.25])
    edges, dens = spectral_density(lam, bins=2, weights=w, range=(0.0, 2.0))
    torch.testing.assert_close(dens, torch.tensor([0.5, 0.5], dtype=torch.float64))
    edges, dens = spectral_density(torch.full((5,), 2.0), bins=4)
    assert float((dens * edges.diff()).sum()) == pytest.approx(1.0)


def test_spectral_density_non_positive_warns_with_count():
    lam = torch.tensor([1.0, 0.1, 0.0, -1e-9])
    with pytest.warns(UserWarning, match="leaves out 2 non-positive"):
        edges, dens = spectral_density(lam, bins=3)
    assert float((dens * edges.diff()).sum()) == pytest.approx(1.0)


def test_spectral_density_bad_input():
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        spectral_density(torch.ones(3), bins=0)
    with pytest.raises(ValueError, match="needs positive eigenvalues"):
        spectral_density(torch.zeros(3))
    with pytest.raises(ValueError, match="weights has shape"):
        spectral_density(torch.ones(3), weights=torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        spectral_density(torch.ones(2), weights=torch.tensor([1.0, -1.0]))


# ---------------------------------------------------------------- SLQ
def _rademacher(n: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, p), generator=g, dtype=torch.float64) * 2 - 1


def test_slq_reproduces_probe_moments_exactly():
    """Gauss quadrature with m nodes is exact for degree <= 2m-1: Σ τ θ^j = vᵀ K^j v."""
    lam = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    k = spd(lam, seed=2)
    v = _rademacher(200, 6, seed=3)
    nodes, weights = slq_density(lambda x: k @ x, 200, n_steps=5, probes=v, dtype=torch.float64)
    assert nodes.shape == weights.shape == (30,)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    vn = v / v.norm(dim=0)
    kj = vn.clone()
    for j in range(10):
        exact = float((vn * kj).sum(0).mean())
        assert float((weights * nodes**j).sum()) == pytest.approx(exact, rel=1e-10)
        kj = k @ kj


def test_slq_with_all_unit_probes_is_exact():
    """Probes e_1..e_n and n steps: Σ w f(θ) = tr f(K)/n for every f."""
    n = 24
    lam = torch.logspace(-3, 1, n, dtype=torch.float64)
    k = spd(lam, seed=4)
    nodes, weights = slq_density(
        lambda x: k @ x,
        n,
        n_steps=n,
        probes=torch.eye(n, dtype=torch.float64),
        dtype=torch.float64,
    )
    assert slq_trace(nodes, weights, n) == pytest.approx(float(lam.sum()), rel=1e-10)
    assert slq_trace(nodes, weights, n, fn=torch.square) == pytest.approx(
        float(lam.square().sum()), rel=1e-10
    )
    assert slq_effective_rank(nodes, weights, n) == pytest.approx(effective_rank(lam), rel=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slq_trace_and_effective_rank_estimates(dtype):
    n = 400
    lam = torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 9 + 1
    k = spd(lam, seed=6)
    kd = k.to(dtype)
    nodes, weights = slq_density(lambda x: kd @ x, n, n_probes=16, n_steps=30, dtype=dtype)
    tr = float(lam.sum())
    # Hutchinson std for Rademacher probes: sqrt(2/p · Σ_{i≠j} K_ij²)
    off = float(k.square().sum() - k.diagonal().square().sum())
    std = math.sqrt(2.0 / 16 * off)
    est = slq_trace(nodes, weights, n)
    assert abs(est - tr) <= 4 * std
    assert abs(est - tr) / tr <= 0.03
    assert slq_effective_rank(nodes, weights, n) == pytest.approx(effective_rank(lam), rel=0.03)


def test_slq_density_matches_exact_cdf():
    n = 400
    lam = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0
    k = spd(lam, seed=7)
    nodes, weights = slq_density(lambda x: k @ x, n, n_probes=16, n_steps=40, dtype=torch.float64)
    t = torch.logspace(-3, 0, 200, dtype=torch.float64)
    cdf_true = (lam[None, :] <= t[:, None]).double().mean(1)
    cdf_slq = ((nodes[None, :] <= t[:, None]).double() * weights[None, :]).sum(1)
    assert float((cdf_true - cdf_slq).abs().max()) <= 0.1  # Kolmogorov distance
    # and the SLQ histogram (log10 bins) is close to the exact one in total variation
    rng = (-3.0, 0.0)
    e1, d1 = spectral_density(lam, bins=6, range=rng)
    _, d2 = spectral_density(nodes.clamp_min(1e-3), bins=6, weights=weights, range=rng)
    assert 0.5 * float(((d1 - d2).abs() * e1.diff()).sum()) <= 0.1


def test_slq_breakdown_on_low_rank():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(50, 3, generator=g, dtype=torch.float64)
    k = a @ a.T  # rank 3: each Krylov space is invariant after <= 4 steps
    v = _rademacher(50, 4, seed=9)
    nodes, weights = slq_density(lambda x: k @ x, 50, n_steps=20, probes=v, dtype=torch.float64)
    assert bool(torch.isfinite(nodes).all()) and bool(torch.isfinite(weights).all())
    assert nodes.numel() <= 4 * 6  # stopped at breakdown (4 steps, or 5 on rounding noise)
    vn = v / v.norm(dim=0)
    for j in range(1, 8):  # quadrature is exact for every degree after breakdown
        exact = float((vn * (torch.linalg.matrix_power(k, j) @ vn)).sum(0).mean())
        assert float((weights * nodes**j).sum()) == pytest.approx(exact, rel=1e-8)


def test_slq_global_rng_untouched_and_deterministic():
    k = spd(torch.linspace(1, 2, 30), seed=10)
    state = torch.random.get_rng_state()
    a = slq_density(lambda x: k.float() @ x, 30, n_steps=5)
    b = slq_density(lambda x: k.float() @ x, 30, n_steps=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_slq_bad_input():
    with pytest.raises(ValueError, match="n must be a positive integer"):
        slq_density(lambda x: x, 0)
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        slq_density(lambda x: x, 5, n_steps=0)
    with pytest.raises(ValueError, match="n_probes must be a positive integer"):
        slq_density(lambda x: x, 5, n_probes=0)
    with pytest.raises(ValueError, match="probes must have shape"):
        slq_density(lambda x: x, 5, probes=torch.ones(4, 2))
    with pytest.raises(ValueError, match="probes must be finite and non-zero"):
        slq_density(lambda x: x, 5, probes=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="matvec must map"):
        slq_density(lambda x: x[:-1], 5)
    with pytest.raises(ValueError, match="matvec returned NaN or Inf"):
        slq_density(lambda x: x * float("nan"), 5)
    with pytest.raises(ValueError, match=r"dtype must be torch\.float32 or torch\.float64"):
        slq_density(lambda x: x, 5, dtype=torch.float16)
    with pytest.raises(ValueError, match="same length"):
        slq_trace(torch.ones(3), torch.ones(2), 5)
    with pytest.raises(ValueError, match="positive quadrature nodes"):
        slq_effective_rank(torch.zeros(3), torch.ones(3) / 3, 5)


# ---------------------------------------------------------------- SLQ with deflation
def test_slq_deflated_with_all_unit_probes_is_exact():
    """Deflating exact top pairs and sampling the rest with e_1..e_n gives tr f(K) exactly."""
    n, k_top = 20, 3
    lam = torch.logspace(-2, 1, n, dtype=torch.float64)
    lam[-1] = 1e3  # a dominant spike, as in a ReLU NTK
    g = torch.Generator().manual_seed(11)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = (u * lam) @ u.T
    nodes, weights = slq_density(
        lambda x: k @ x,
        n,
        n_steps=n,
        probes=torch.eye(n, dtype=torch.float64),
        dtype=torch.float64,
        deflate=(lam[-k_top:], u[:, -k_top:]),
    )
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-10)
    assert slq_trace(nodes, weights, n) == pytest.approx(float(lam.sum()), rel=1e-10)
    f = lambda t: t * t.clamp_min(1e-300).log()  # noqa: E731
    assert slq_trace(nodes, weights, n, fn=f) == pytest.approx(float(f(lam).sum()), rel=1e-9)
    assert slq_effective_rank(nodes, weights, n) == pytest.approx(effective_rank(lam), rel=1e-9)


def test_slq_deflation_removes_the_spike_variance():
    """With a rank-one spike, 4 Rademacher probes are far off; deflating the spike fixes it.

    Unbiasedness of the deflated estimator: the mean over many probes matches tr K to within
    4 standard errors of that mean.
    """
    n = 200
    lam = torch.rand(n, generator=torch.Generator().manual_seed(12), dtype=torch.float64) + 0.5
    g = torch.Generator().manual_seed(13)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spike = torch.randn(n, generator=g, dtype=torch.float64).abs() + 1.0  # like β r rᵀ
    spike /= spike.norm()
    k = (u * lam) @ u.T + 500.0 * torch.outer(spike, spike)
    ev, vec = torch.linalg.eigh(k)
    truth = effective_rank(ev)
    errs_plain, errs_defl, traces = [], [], []
    for seed in range(20):
        kw = {"n_probes": 4, "n_steps": 20, "dtype": torch.float64}
        gen = torch.Generator().manual_seed(100 + seed)
        a = slq_density(lambda x: k @ x, n, generator=gen, **kw)
        gen = torch.Generator().manual_seed(100 + seed)
        b = slq_density(lambda x: k @ x, n, generator=gen, deflate=(ev[-1:], vec[:, -1:]), **kw)
        errs_plain.append(abs(slq_effective_rank(*a, n) / truth - 1))
        errs_defl.append(abs(slq_effective_rank(*b, n) / truth - 1))
        traces.append(slq_trace(*b, n))
    assert max(errs_defl) < 0.05 < float(np.median(errs_plain))
    t = np.array(traces)
    assert abs(t.mean() - float(ev.sum())) <= 4 * t.std(ddof=1) / math.sqrt(len(t)) + 1e-9


def test_slq_deflate_bad_input():
    k = torch.eye(5, dtype=torch.float64)
    mv = lambda x: k @ x  # noqa: E731
    with pytest.raises(ValueError, match="pair"):
        slq_density(mv, 5, deflate=torch.ones(5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        slq_density(mv, 5, deflate=(torch.ones(2), torch.ones(4, 2)))
    with pytest.raises(ValueError, match="finite"):
        slq_density(mv, 5, deflate=(torch.tensor([float("nan")]), torch.ones(5, 1)))
    with pytest.raises(ValueError, match="linearly dependent"):
        slq_density(mv, 5, deflate=(torch.ones(2), torch.ones(5, 2)))
    with pytest.raises(ValueError, match="deflated subspace"):
        e1 = torch.eye(5, dtype=torch.float64)[:, :1]
        slq_density(mv, 5, probes=e1, deflate=(torch.ones(1), e1))
