"""Findings of the session-27 review of glu_probe.theory (review C), each against an independent
computation: a per-row autograd Jacobian NTK in float64, explicit curve pairs, hand-written
formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glu_probe import theory as th
from glu_probe._rng import stream_seed
from glu_probe.theory import (
    crossing_experiment,
    crossing_hypotheses,
    expected_loss_curve,
    expected_ntk,
    format_theory_table,
    gaussian_inputs,
    linearized_train,
    make_target,
    paper_coefficients,
    paper_kernel,
    paper_lambda_min,
    predict_crossing,
    theory_table,
    theory_verdicts,
    two_layer,
)

torch.set_num_threads(1)
PI = math.pi
EPS = float(np.finfo(np.float64).eps)


def jacobian_ntk(model: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    """J Jᵀ with J built row by row by autograd (float64), independent of empirical_ntk."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(X.shape[0]):
        out = model(X[i : i + 1]).sum()
        grads = torch.autograd.grad(out, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows).to(torch.float64)
    return J @ J.T


# ---------------------------------------------------------------------------------------------
# 1. crossing_experiment(kinds=("reglu", "relu")): the hypotheses with the kernels swapped
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kinds", [("reglu", "relu"), ("relu", "reglu")])
def test_crossing_hypotheses_use_the_relu_kernel_as_K_a_in_either_order(kinds):
    d, m, n, seed = 6, 40, 30, 2
    r = crossing_experiment(d, m, n, seed=seed, steps=3, kinds=kinds)
    # rebuild the run's draws from its documented streams, kernels by autograd
    X = gaussian_inputs(n, d, seed=stream_seed(seed, 0, 0))
    Y = make_target(X, "teacher", seed=stream_seed(seed, 0, 1))
    K = {
        k: jacobian_ntk(two_layer(k, d, m, seed=stream_seed(seed, 0, 2, i), dtype=torch.float64), X)
        for i, k in enumerate(kinds)
    }
    q = float(Y @ (K["relu"] - K["reglu"]) @ Y)
    assert abs(q) > 1.0  # a sign to get right
    h = r["hypotheses"]
    assert h["quadratic_form"] == pytest.approx(q, rel=1e-10)
    assert h["sign_ok"] == (q >= 0) and h["n"] == n and h["d"] == d


# ---------------------------------------------------------------------------------------------
# 2. a shared start is not "b behind a"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expect"),
    [
        ([5.0, 4.0, 3.0, 2.0], [5.0, 3.0, 2.0, 1.0], None),  # tie, then b below: no crossing
        ([5.0, 5.0, 3.0, 2.0], [5.0, 5.0, 2.0, 1.0], None),  # two leading ties
        ([5.0, 4.0, 3.0, 2.0], [5.0, 4.5, 2.9, 1.0], 2),  # tie, b above at 1, below from 2
        ([5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 5.0, 3.0, 1.5, 0.5], 3),  # above, tie, below from 3
        ([5.0, 4.0, 3.0], [6.0, 3.0, 2.0], 1),  # b above at the start: a crossing at 1
        ([5.0, 4.0, 0.0, 0.0], [5.0, 3.0, 0.0, 0.0], None),  # tie, below, equal tail
        ([5.0, 4.0, 0.0, 0.0], [5.0, 4.5, 0.0, 0.0], None),  # b never below before the tail
    ],
)
def test_crossing_step_needs_b_strictly_behind_before(a, b, expect):
    assert th._crossing_step(torch.tensor(a), torch.tensor(b)) == expect


def test_predict_crossing_from_a_shared_start_is_none():
    # K_b = 1.5 K_a, f_0 = 0: both curves start at |Y|^2 = 5, b decays faster along every
    # eigendirection, so it is never behind: L(k) = sum_i (1 - eta lambda_i)^(2k)
    lam = torch.tensor([1.0, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    Ka, Kb = torch.diag(lam), torch.diag(1.5 * lam)
    Y = torch.ones(5, dtype=torch.float64)
    La = [float(((1 - 0.5 * lam) ** (2 * k)).sum()) for k in range(41)]
    Lb = [float(((1 - 0.75 * lam) ** (2 * k)).sum()) for k in range(41)]
    assert La[0] == Lb[0] == 5.0 and all(b < a for a, b in zip(La[1:], Lb[1:], strict=True))
    assert predict_crossing(Ka, Kb, Y, 0.5, 40, init_cov_a=None, init_cov_b=None) is None
    # the same pair from a common f_0 (linearised dynamics): one start, no crossing
    f0 = torch.full((5,), 0.3, dtype=torch.float64)
    la = linearized_train(Ka, Y, 0.5, 40, f0=f0)
    lb = linearized_train(Kb, Y, 0.5, 40, f0=f0)
    assert float(la[0]) == float(lb[0]) == pytest.approx(5 * 0.7**2)
    assert th._crossing_step(la, lb) is None


# ---------------------------------------------------------------------------------------------
# 3. / 4. theory_table: a signed ReGLU lambda_max error, an infinite lambda_min error at rounding
# ---------------------------------------------------------------------------------------------


def _reglu_bounds(d: int, m: int, n: int) -> tuple[float, float]:
    lo = (m / (4 * d) + 0.5) * n + m / 2 - m / (2 * PI) + d - d / (2 * PI)
    hi = (m / (4 * d) + m / (2 * PI * d) + 0.5 + 1 / (2 * PI)) * n + m / 2 + d
    return lo, hi


def _table_ntk(kind: str, j: int, d: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    X = gaussian_inputs(n, d, seed=stream_seed(seed, 1, 0, d, n))
    net = two_layer(kind, d, m, seed=stream_seed(seed, 1, 1, j, d, m, n), dtype=torch.float64)
    return jacobian_ntk(net, X)


def _cells(rows: list[dict]) -> list[dict[str, str]]:
    lines = format_theory_table(rows, markdown=True).splitlines()
    cols = lines[2].strip("| ").split(" | ")
    return [dict(zip(cols, ln.strip("| ").split(" | "), strict=True)) for ln in lines[4:]]


def test_reglu_lambda_max_error_is_signed_like_relu():
    d, n = 10, 20
    rows = theory_table(d, [200, 4], n, 0)
    for r, c in zip(rows, _cells(rows), strict=True):
        if r["kind"] != "reglu":
            continue
        m = r["m"]
        emp = float(torch.linalg.eigvalsh(_table_ntk("reglu", 1, d, m, n))[-1])
        lo, hi = _reglu_bounds(d, m, n)
        assert emp > hi > lo  # the measured value is above the upper bound in both settings
        expect = (hi - emp) / emp  # (nearer bound − emp) / emp: negative, as ReLU's would be
        assert expect < -0.4
        assert r["err_lambda_max"] == pytest.approx(expect, rel=1e-9)
        assert c["λmax err"] == f"{100 * expect:+.1f}%"
        assert not r["lambda_max_in_bounds"]


def test_reglu_lambda_max_error_below_the_lower_bound_is_positive(monkeypatch):
    """A kernel scaled down 100x puts lambda_max below the lower bound: (lo − emp) / emp > 0."""
    real = th.empirical_ntk
    monkeypatch.setattr(th, "empirical_ntk", lambda model, X: 0.01 * real(model, X))
    d, m, n = 10, 200, 20
    (r,) = theory_table(d, m, n, 0, kinds=("reglu",))
    emp = 0.01 * float(torch.linalg.eigvalsh(_table_ntk("reglu", 0, d, m, n))[-1])
    lo, _ = _reglu_bounds(d, m, n)
    assert emp < lo
    assert r["err_lambda_max"] == pytest.approx((lo - emp) / emp, rel=1e-9)


def test_lambda_min_error_is_inf_where_lambda_min_is_zero_to_rounding():
    # d=10, m=4, n=20: the 4-unit ReLU network's NTK is singular, but its lambda_min came out
    # +2.7e-32 > 0 (kappa inf), and the lambda_min error was +1e34 %
    d, m, n = 10, 4, 20
    rows = theory_table(d, [4, 200], n, 0, kinds=("relu",))
    singular, regular = rows
    lam = torch.linalg.eigvalsh(_table_ntk("relu", 0, d, m, n))
    assert float(lam[0]) <= float(lam[-1]) * n * EPS  # zero to rounding (independent)
    # (here +2.7e-32 > 0, for which the old code gave a finite error; LAPACK builds differ in
    # its sign: torch 2.4 gives -2.2e-15, inf before and after)
    assert singular["emp_kappa"] == math.inf
    assert singular["err_lambda_min"] == math.inf
    assert math.isnan(singular["err_kappa"])
    assert _cells([singular])[0]["λmin err"] == "inf"
    (line,) = [ln for ln in theory_verdicts([singular]) if "ReLU lambda_min" in ln]
    assert "error inf .. inf" in line
    # a regular kernel: (formula − emp) / emp with the hand-written formula
    lam = torch.linalg.eigvalsh(_table_ntk("relu", 0, d, 200, n))
    s = max(0.0, 1 - math.sqrt(n / d))
    cf = (200 + d) / 4 * (s * s + 1) - 200 / (2 * PI)
    emp = float(lam[0])
    assert emp > float(lam[-1]) * n * EPS
    assert regular["err_lambda_min"] == pytest.approx((cf - emp) / emp, rel=1e-8)


# ---------------------------------------------------------------------------------------------
# 5. crossing_hypotheses validates Y and d
# ---------------------------------------------------------------------------------------------


def test_crossing_hypotheses_validates_y_and_d():
    n = 6
    Ka = torch.eye(n, dtype=torch.float64) + 0.5
    Kb = torch.eye(n, dtype=torch.float64)
    y = torch.arange(n, dtype=torch.float64)
    with pytest.raises(ValueError, match="Y must have shape"):
        crossing_hypotheses(Ka, Kb, y.reshape(3, 2), 10)  # 6 numbers, but 3 samples
    with pytest.raises(ValueError, match="one output column"):
        crossing_hypotheses(Ka, Kb, torch.stack([y, y], 1), 10)
    with pytest.raises(ValueError, match="NaN or Inf"):
        crossing_hypotheses(Ka, Kb, torch.full((n,), math.nan), 10)
    for bad_d in (0, -3, 7.9, True, "10"):
        with pytest.raises(ValueError, match="d must be a positive integer"):
            crossing_hypotheses(Ka, Kb, y, bad_d)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ in shape"):
        crossing_hypotheses(Ka, torch.eye(5, dtype=torch.float64), y, 10)
    # Yᵀ(K_a − K_b)Y = 0.5 (Σy)² = 112.5, as (n,), (n, 1) and a numpy d
    for Y in (y, y[:, None], y.numpy()):
        h = crossing_hypotheses(Ka, Kb, Y, np.int64(10))
        assert h["quadratic_form"] == pytest.approx(0.5 * 15.0**2, rel=1e-14)
        assert h["d"] == 10 and h["n"] == n and h["sign_ok"] and h["d_ok"] and not h["n_ok"]


# ---------------------------------------------------------------------------------------------
# 6. linearized_train: f0 and Y of different shapes
# ---------------------------------------------------------------------------------------------


def test_linearized_train_refuses_f0_and_y_of_different_shapes():
    n = 4
    K = torch.eye(n, dtype=torch.float64)
    Y = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    f0_2 = torch.tensor([[0.5, -7.0]] * n, dtype=torch.float64)
    with pytest.raises(ValueError, match="f0 and Y must have the same shape"):
        linearized_train(K, Y, 0.1, 1, f0=f0_2)
    with pytest.raises(ValueError, match="f0 and Y must have the same shape"):
        linearized_train(K, torch.stack([Y, -Y], 1), 0.1, 1, f0=f0_2[:, 0])
    # (n,) against (n, 1) is the same single output: |(1 - 0.1)^k (f0 - Y)|^2
    f0 = torch.full((n,), 0.5, dtype=torch.float64)
    r2 = float(((f0 - Y) ** 2).sum())
    for ff, yy in ((f0, Y[:, None]), (f0[:, None], Y)):
        got = linearized_train(K, yy, 0.1, 2, f0=ff)
        torch.testing.assert_close(
            got, torch.tensor([r2, 0.81 * r2, 0.81**2 * r2], dtype=torch.float64)
        )


# ---------------------------------------------------------------------------------------------
# 7. expected_loss_curve: init_cov must be a covariance
# ---------------------------------------------------------------------------------------------


def test_expected_loss_curve_refuses_a_non_psd_init_cov():
    n = 4
    K = torch.eye(n, dtype=torch.float64)
    Y = torch.ones(n, dtype=torch.float64)
    with pytest.raises(ValueError, match="init_cov is not positive semi-definite"):
        expected_loss_curve(K, Y, 0.1, 2, init_cov=-10 * torch.eye(n, dtype=torch.float64))
    indefinite = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.01], dtype=torch.float64))
    with pytest.raises(ValueError, match="init_cov is not positive semi-definite"):
        predict_crossing(K, 2 * K, Y, 0.1, 2, init_cov_a=indefinite)
    # a rank-one covariance (singular, PSD) is a covariance: Tr[(0.9)^(2k) v vᵀ] + 0.81^k |Y|^2
    v = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=torch.float64)
    got = expected_loss_curve(K, Y, 0.1, 2, init_cov=torch.outer(v, v))
    expect = torch.tensor([0.81**k * (14.0 + 4.0) for k in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got, expect)


# ---------------------------------------------------------------------------------------------
# 8. / 9. the documented orders and ranges (docs/theory.md, paper_lambda_min)
# ---------------------------------------------------------------------------------------------


def test_paper_kernels_off_diagonal_error_orders():
    """Off the diagonal the ReLU paper kernel differs from the infinite-width one by O(ρ²) (eq. 10
    drops eq. 14's ρ² term), the ReGLU one by O(ρ³) (eq. 11 keeps it)."""
    d, m = 8, 400
    e1 = torch.zeros(d, dtype=torch.float64)
    e2 = torch.zeros(d, dtype=torch.float64)
    e1[0], e2[1] = 1.0, 1.0
    ratios: dict[str, list[float]] = {"relu": [], "reglu": []}
    for rho in (0.1, 0.05, 0.025):
        X = math.sqrt(d) * torch.stack([e1, rho * e1 + math.sqrt(1 - rho**2) * e2])
        for kind, p in (("relu", 2), ("reglu", 3)):
            diff = float(paper_kernel(kind, X, m)[0, 1] - expected_ntk(kind, X, m)[0, 1])
            ratios[kind].append(diff / rho**p)
    # halving ρ leaves diff / ρ^p about constant (and nonzero): the order is exactly p
    for kind, rs in ratios.items():
        assert all(abs(r) > 1.0 for r in rs), kind
        assert max(rs) / min(rs) == pytest.approx(1.0, abs=0.05), (kind, rs)
    # the ReLU ρ² coefficient is eq. 14's dropped term: (1/(2π) + m/(4πd)) · d
    assert ratios["relu"][-1] == pytest.approx(-(1 / (2 * PI) + m / (4 * PI * d)) * d, rel=0.02)


def test_other_reading_of_s_tilde_ranges_as_documented():
    """paper_lambda_min: 1 − √(2n/d) is 24–65% below the proof kernel's λ_min for d ∈ {100, 300},
    22–23% and 7–8% below at d = 10, n = 20 and 40, and equal to 1 − √(2n)/d's value (both 0)
    for n ≥ 50 at d = 10."""
    other_err: dict[tuple[int, int, int], float] = {}
    ours_err: dict[tuple[int, int, int], float] = {}
    for d in (10, 100, 300):
        for n in (20, 40, 200, 800):
            X = gaussian_inputs(n, d, seed=5)
            G = X @ X.T
            s = max(0.0, 1 - math.sqrt(n / d))
            so = max(0.0, 1 - math.sqrt(2 * n / d))
            for m in (200, 2000):
                a, b, c = paper_coefficients("reglu", d, m)
                K = a * G * G + b * d * G + c * d * d * torch.eye(n, dtype=torch.float64)
                truth = float(torch.linalg.eigvalsh(K)[0])
                other = (m + 2 * d) / 4 * (so**2 + 1) + (m + d) / (2 * PI) * (s * s - 1)
                other_err[d, m, n] = other / truth - 1
                ours_err[d, m, n] = paper_lambda_min("reglu", d, m, n) / truth - 1
    big = [e for (d, _, _), e in other_err.items() if d >= 100]
    assert -0.65 <= min(big) < -0.64 and -0.25 < max(big) <= -0.24
    big_ours = [e for (d, _, _), e in ours_err.items() if d >= 100]
    assert min(big_ours) > 0.025 and max(big_ours) < 0.305
    for m in (200, 2000):
        assert -0.235 < other_err[10, m, 20] < -0.215
        assert -0.08 < other_err[10, m, 40] < -0.07
        assert abs(ours_err[10, m, 20]) < 0.055 and abs(ours_err[10, m, 40]) < 0.055
        for n in (200, 800):
            assert other_err[10, m, n] == ours_err[10, m, n]


# --- re-review of the fixes (session 27) ------------------------------------------------------


def _rotated_pair(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    K_a = Q @ torch.diag(lam) @ Q.T
    return K_a, 1.5 * K_a  # b decays faster at every step >= 1: never behind


def test_curves_from_one_start_begin_level_and_do_not_cross():
    """A shared start (f0 = 0, one C, one f0) is level at step 0, not 1 ulp apart through each
    kernel's eigenbasis: b below from step 1 on was a crossing at step 1 in ~40 % of draws."""
    for seed in range(40):
        K_a, K_b = _rotated_pair(seed)
        g = torch.Generator().manual_seed(1000 + seed)
        Y = torch.randn(12, generator=g, dtype=torch.float64)
        C = torch.eye(12, dtype=torch.float64) * 0.3
        for cov in (None, C):
            la = expected_loss_curve(K_a, Y, 0.5, 20, init_cov=cov)
            lb = expected_loss_curve(K_b, Y, 0.5, 20, init_cov=cov)
            assert float(la[0]) == float(lb[0])
            start = float(Y @ Y) + (0.0 if cov is None else float(C.trace()))
            assert float(la[0]) == pytest.approx(start, rel=1e-15)
            assert bool((lb[1:] < la[1:]).all())
            assert predict_crossing(K_a, K_b, Y, 0.5, 20, init_cov_a=cov, init_cov_b=cov) is None
        f0 = torch.randn(12, generator=g, dtype=torch.float64)
        ta = linearized_train(K_a, Y, 0.5, 20, f0=f0)
        tb = linearized_train(K_b, Y, 0.5, 20, f0=f0)
        assert float(ta[0]) == float(tb[0]) == pytest.approx(float(((f0 - Y) ** 2).sum()))
        assert th._crossing_step(ta, tb) is None


def test_float32_covariance_psd_to_its_rounding_is_accepted():
    """C = FᵀF/S from 2 float32 outputs (rank 2, n = 6): eigenvalues down to −7e-9·λmax, which
    the float64 tolerance 1e-9·n refused; a truly indefinite float32 matrix is still refused."""
    K = torch.eye(6, dtype=torch.float64)
    Y = torch.ones(6, dtype=torch.float64)
    refused_before = 0
    for seed in range(20):
        F = torch.randn(2, 6, generator=torch.Generator().manual_seed(seed)).float()
        C = (F.T @ F) / 2
        lam = torch.linalg.eigvalsh(C.double())
        refused_before += float(lam.min()) < -1e-9 * float(lam.abs().max()) * 6
        curve = expected_loss_curve(K, Y, 0.5, 3, init_cov=C)
        # K = I, eta = 0.5: every mode decays by (1 - 0.5)^2 per step
        start = float(Y @ Y) + float(C.double().trace())
        truth = start * 0.25 ** torch.arange(4, dtype=torch.float64)
        torch.testing.assert_close(curve, truth, rtol=1e-12, atol=0)
    assert refused_before > 0  # the case the old tolerance refused occurs in these draws
    with pytest.raises(ValueError, match="not positive semi-definite"):
        expected_loss_curve(K, Y, 0.5, 3, init_cov=-torch.eye(6))


def test_numpy_d_gives_python_bools_and_ints():
    """A numpy d made d_ok an np.bool_, which strict JSON wrote as the string "False"."""
    import json

    from glu_probe._json import dumps

    K = torch.eye(4, dtype=torch.float64)
    out = crossing_hypotheses(K, 0.5 * K, torch.ones(4), d=np.int64(3))
    assert type(out["d_ok"]) is bool and out["d_ok"] is False
    assert json.loads(dumps(out))["d_ok"] is False
