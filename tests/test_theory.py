"""glu_probe.theory against direct computation: autograd, explicit formulas, Monte Carlo."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from glu_probe import theory as th
from glu_probe.theory import (
    Bounds,
    crossing_experiment,
    empirical_ntk,
    expected_loss_curve,
    expected_ntk,
    format_crossing_table,
    format_theory_table,
    gaussian_inputs,
    linearized_train,
    mean_crossings,
    nngp_kernel,
    paper_coefficients,
    paper_condition_number,
    paper_kernel,
    paper_lambda_max,
    paper_lambda_min,
    predict_crossing,
    theory_table,
    theory_verdicts,
    train_two_layer,
    two_layer,
)

PI = math.pi
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def autograd_ntk(model: torch.nn.Module, X: torch.Tensor, names: list[str] | None = None):
    """K = J J^T with J from torch.autograd.functional.jacobian over the flattened parameters."""
    named = {k: v.detach().clone() for k, v in model.named_parameters()}
    names = list(named) if names is None else names
    shapes = [named[k].shape for k in names]
    sizes = [named[k].numel() for k in names]
    flat0 = torch.cat([named[k].reshape(-1) for k in names])

    def f(flat: torch.Tensor) -> torch.Tensor:
        params = dict(named)
        for k, s, chunk in zip(names, shapes, torch.split(flat, sizes), strict=True):
            params[k] = chunk.reshape(s)
        return torch.func.functional_call(model, params, (X,)).reshape(-1)

    J = torch.autograd.functional.jacobian(f, flat0)
    return J @ J.T


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


def test_two_layer_forward_is_the_paper_model_without_width_scaling():
    X = gaussian_inputs(5, 4, seed=1)
    for kind, act in (("relu", torch.relu), ("gelu", torch.nn.functional.gelu)):
        m = two_layer(kind, 4, 7, seed=0, dtype=torch.float64)
        assert m.U is None
        expect = act(X @ m.W.weight.T) @ m.V.weight.T
        torch.testing.assert_close(m(X), expect, rtol=0, atol=1e-14)
    g = two_layer("reglu", 4, 7, seed=0, dtype=torch.float64)
    assert g.U is not None
    expect = (torch.relu(X @ g.W.weight.T) * (X @ g.U.weight.T)) @ g.V.weight.T
    torch.testing.assert_close(g(X), expect, rtol=0, atol=1e-14)
    b = two_layer("bilinear", 4, 7, seed=0, dtype=torch.float64)
    assert b.U is not None
    torch.testing.assert_close(
        b(X), ((X @ b.W.weight.T) * (X @ b.U.weight.T)) @ b.V.weight.T, rtol=0, atol=1e-14
    )


def test_two_layer_init_variances_match_the_paper():
    d, m = 50, 4000
    model = two_layer("reglu", d, m, seed=3, dtype=torch.float64)
    assert model.U is not None
    for w, var in ((model.W.weight, 1 / d), (model.U.weight, 1 / d), (model.V.weight, 1 / m)):
        N = w.numel()
        # sample variance of N Gaussians: relative standard error sqrt(2/N); allow 5 of them
        assert abs(float(w.detach().var()) / var - 1) < 5 * math.sqrt(2 / N)
        assert abs(float(w.detach().mean())) < 5 * math.sqrt(var / N)


def test_two_layer_seeding_and_rng_isolation():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = two_layer("swiglu", 3, 5, seed=9)
    assert torch.equal(torch.get_rng_state(), state)
    b = two_layer("swiglu", 3, 5, generator=torch.Generator().manual_seed(9))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = two_layer("relu", 3, 5, bias=True, out=2, seed=1)
    assert c.W.bias is not None and torch.count_nonzero(c.W.bias) == 0
    assert c.V.weight.shape == (2, 5)


def test_two_layer_bad_input():
    with pytest.raises(ValueError, match="unknown kind 'tanh'"):
        two_layer("tanh", 3, 4)
    with pytest.raises(ValueError, match="d must be a positive integer"):
        two_layer("relu", 0, 4)
    with pytest.raises(ValueError, match="either generator or seed"):
        two_layer("relu", 3, 4, seed=1, generator=torch.Generator())


# ------------------------------------------------------------------------------------------------
# empirical NTK: exact, against autograd
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", th.KINDS)
@pytest.mark.parametrize(("bias", "out"), [(False, 1), (True, 3)])
def test_empirical_ntk_equals_autograd_jacobian(kind, bias, out):
    d, m, n = 5, 9, 6
    model = two_layer(kind, d, m, out=out, bias=bias, seed=2, dtype=torch.float64)
    with torch.no_grad():  # non-zero biases so their gradients are exercised too
        for p in model.parameters():
            p.add_(
                0.1
                * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype)
            )
    X = gaussian_inputs(n, d, seed=4)
    K_ref = autograd_ntk(model, X)
    K = empirical_ntk(model, X, output="full")
    assert K.dtype == torch.float64 and K.shape == (n * out, n * out)
    torch.testing.assert_close(K, K_ref, rtol=0, atol=1e-10 * float(K_ref.abs().max()))
    # pNTK: kernel of sum_o z_o / sqrt(out)
    Kp = empirical_ntk(model, X)
    Kp_ref = K_ref.reshape(n, out, n, out).sum(dim=(1, 3)) / out
    torch.testing.assert_close(Kp, Kp_ref, rtol=0, atol=1e-10 * float(Kp_ref.abs().max()))


def test_empirical_ntk_parameter_subsets():
    model = two_layer("geglu", 4, 6, bias=True, seed=0, dtype=torch.float64)
    X = gaussian_inputs(5, 4, seed=1)
    for names in (["V.weight"], ["W.weight", "W.bias"], ["U.weight", "V.bias"]):
        K = empirical_ntk(model, X, params=names)
        torch.testing.assert_close(K, autograd_ntk(model, X, names), rtol=0, atol=1e-12)
    model.V.weight.requires_grad_(False)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    torch.testing.assert_close(
        empirical_ntk(model, X), autograd_ntk(model, X, names), rtol=0, atol=1e-12
    )


def test_empirical_ntk_bad_input():
    model = two_layer("relu", 4, 6, seed=0)
    X = gaussian_inputs(5, 4)
    with pytest.raises(TypeError, match="two_layer"):
        empirical_ntk(torch.nn.Linear(4, 1), X)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expects d=4"):
        empirical_ntk(model, gaussian_inputs(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        empirical_ntk(model, X[0])
    with pytest.raises(ValueError, match="unknown parameter names"):
        empirical_ntk(model, X, params=["U.weight"])
    with pytest.raises(ValueError, match="output must be"):
        empirical_ntk(model, X, output="diag")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------------


def test_paper_coefficients_literal_values():
    # d=4, m=8: alpha = 1/4 + 8/16, beta = 8/(8 pi), gamma = alpha - 1/pi
    a, b, c = paper_coefficients("relu", 4, 8)
    assert (a, b, c) == pytest.approx((0.75, 1 / PI, 0.75 - 1 / PI), rel=1e-15)
    # alpha~ = 8/64 + 1/8, beta~ = 1/(8 pi) + 8/(32 pi), gamma~ = 1/8 - 1/(8 pi) + 8/64 - 8/(32 pi)
    a, b, c = paper_coefficients("reglu", 4, 8)
    assert (a, b, c) == pytest.approx((0.25, 3 / (8 * PI), 0.25 - 3 / (8 * PI)), rel=1e-15)
    with pytest.raises(ValueError, match="closed forms exist only for 'relu' and 'reglu'"):
        paper_coefficients("swiglu", 4, 8)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        paper_coefficients("relu", 4, 0)


def test_paper_kernel_matches_eq_14_15_entry_by_entry():
    d, m, n = 6, 40, 7
    X = gaussian_inputs(n, d, seed=11)
    Kr = paper_kernel("relu", X, m)
    Kg = paper_kernel("reglu", X, m)
    rows = X.tolist()
    for i in range(n):
        for j in range(n):
            xi, xj = rows[i], rows[j]
            ni = math.sqrt(sum(v * v for v in xi))
            nj = math.sqrt(sum(v * v for v in xj))
            rho = sum(a * b for a, b in zip(xi, xj, strict=True)) / (ni * nj)
            if i == j:  # eq. (14)/(15), diagonal
                er = (m / (2 * d) + 0.5) * ni**2
                eg = (m / (2 * d**2) + 1 / d) * ni**4
            else:  # eq. (14) without its rho^2 term (as the paper does); eq. (15) in full
                er = (m / (2 * PI * d) + (0.25 + m / (4 * d)) * rho) * ni * nj
                eg = (
                    (
                        (1 / (2 * PI * d) + m / (2 * PI * d**2)) * rho
                        + (1 / (2 * d) + m / (4 * d**2)) * rho**2
                    )
                    * ni**2
                    * nj**2
                )
            assert float(Kr[i, j]) == pytest.approx(er, rel=1e-12, abs=1e-12)
            assert float(Kg[i, j]) == pytest.approx(eg, rel=1e-12, abs=1e-12)
    assert Kr.dtype == torch.float64
    with pytest.raises(ValueError, match="2-D"):
        paper_kernel("relu", torch.ones(3), m)


def test_closed_form_eigenvalue_formulas_literal():
    d, m, n = 10, 100, 40
    assert paper_lambda_max("relu", d, m, n) == pytest.approx(
        m / (2 * PI) * n + d / 2 + (PI - 1) * m / (2 * PI)
    )
    lo, hi = paper_lambda_max("reglu", d, m, n)
    assert lo == pytest.approx((m / (4 * d) + 0.5) * n + m / 2 - m / (2 * PI) + d - d / (2 * PI))
    assert hi == pytest.approx(
        (m / (4 * d) + m / (2 * PI * d) + 0.5 + 1 / (2 * PI)) * n + m / 2 + d
    )
    # n > d: s = 0; n > d²/2: s~ = 0
    n_big = 60
    assert paper_lambda_min("relu", d, m, n_big) == pytest.approx((m + d) / 4 - m / (2 * PI))
    assert paper_lambda_min("reglu", d, m, n_big) == pytest.approx(
        (m + 2 * d) / 4 - (m + d) / (2 * PI)
    )
    # n > d but n < d²/2: s = 0, s~ = 1 - sqrt(2n)/d
    st = 1 - math.sqrt(2 * n) / d
    assert paper_lambda_min("reglu", d, m, n) == pytest.approx(
        (m + 2 * d) / 4 * (st * st + 1) - (m + d) / (2 * PI)
    )
    # n < d: s = 1 - sqrt(n/d), s~ = max(0, 1 - sqrt(2n)/d)
    d2, n2 = 100, 8
    s, st = 1 - math.sqrt(n2 / d2), 1 - math.sqrt(2 * n2) / d2
    assert paper_lambda_min("relu", d2, m, n2) == pytest.approx(
        (m + d2) / 4 * (s * s + 1) - m / (2 * PI)
    )
    assert paper_lambda_min("reglu", d2, m, n2) == pytest.approx(
        (m + 2 * d2) / 4 * (st * st + 1) + (m + d2) / (2 * PI) * (s * s - 1)
    )
    kr = paper_condition_number("relu", d, m, n)
    assert kr == pytest.approx(
        paper_lambda_max("relu", d, m, n) / paper_lambda_min("relu", d, m, n)
    )
    kg = paper_condition_number("reglu", d, m, n)
    assert isinstance(kg, Bounds)
    lmin = paper_lambda_min("reglu", d, m, n)
    assert kg == pytest.approx((lo / lmin, hi / lmin))
    assert kg.contains(kg.mid)


def test_relu_lambda_max_formula_within_few_percent_at_large_width():
    d, m, n = 20, 2000, 200
    X = gaussian_inputs(n, d, seed=0)
    K = empirical_ntk(two_layer("relu", d, m, seed=1, dtype=torch.float64), X)
    measured = float(torch.linalg.eigvalsh(K)[-1])
    formula = paper_lambda_max("relu", d, m, n)
    assert isinstance(formula, float)
    assert abs(formula - measured) / measured < 0.03


def test_reglu_lambda_max_bounds_bracket_their_kernel_when_n_exceeds_d():
    d, m, n = 20, 2000, 200
    X = gaussian_inputs(n, d, seed=0)
    lo, hi = paper_lambda_max("reglu", d, m, n)
    lam_kernel = float(torch.linalg.eigvalsh(paper_kernel("reglu", X, m))[-1])
    assert lo <= lam_kernel <= hi
    K = empirical_ntk(two_layer("reglu", d, m, seed=1, dtype=torch.float64), X)
    assert lo <= float(torch.linalg.eigvalsh(K)[-1]) <= hi


# ------------------------------------------------------------------------------------------------
# infinite-width kernel: law of large numbers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["relu", "reglu", "gelu", "swiglu", "bilinear"])
def test_expected_ntk_matches_monte_carlo(kind):
    d, m, n, S = 4, 32, 5, 300
    X = gaussian_inputs(n, d, seed=3)
    g = torch.Generator().manual_seed(100)
    samples = torch.stack([empirical_ntk(two_layer(kind, d, m, generator=g), X) for _ in range(S)])
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(S)
    E = expected_ntk(kind, X, m)
    # 5 standard errors per entry (plus float32-parameter round-off)
    assert bool(((mean - E).abs() <= 5 * se + 1e-5 * E.abs().max()).all()), (mean - E) / se


@pytest.mark.parametrize("kind", ["relu", "geglu"])
def test_nngp_kernel_matches_monte_carlo(kind):
    # E[z(x_i) z(x_j)] = sum_k E[V_k^2] E[h_k(x_i) h_k(x_j)] = E_unit[h(x_i) h(x_j)]: average over
    # the units of one very wide network (i.i.d. units), tolerance 5 standard errors
    d, n, M = 4, 5, 200_000
    X = gaussian_inputs(n, d, seed=3)
    model = two_layer(kind, d, M, seed=8, dtype=torch.float64)
    with torch.no_grad():
        h = model.hidden(X)  # (n, M)
    prods = h[:, None, :] * h[None, :, :]
    mean, se = prods.mean(-1), prods.std(-1) / math.sqrt(M)
    C = nngp_kernel(kind, X)
    assert bool(((mean - C).abs() <= 5 * se + 1e-12).all()), (mean - C) / se


def test_expected_ntk_quadrature_converged_and_bad_input():
    # automatic trapezoid rule vs a much finer one: converged to float64 round-off
    X = gaussian_inputs(6, 3, seed=0) * 1.5
    for kind in ("swiglu", "geglu", "glu", "gelu", "silu"):
        a = expected_ntk(kind, X, 10)
        b = expected_ntk(kind, X, 10, quad_nodes=241)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
    # the arc-cosine closed form agrees with the same quadrature applied to ReLU (kinks make the
    # quadrature converge only algebraically, hence the looser tolerance)
    k1, k0 = th._gaussian_moments("relu", X, None)
    z, w = th._trapezoid_nodes(1.0, 1201)
    s = X.norm(dim=1) / math.sqrt(3)
    rho = float(X[0] @ X[1] / (X[0].norm() * X[1].norm()))
    u, v = s[0] * z[:, None], s[1] * (rho * z[:, None] + math.sqrt(1 - rho**2) * z[None, :])
    ww = torch.outer(w, w)
    assert float((torch.relu(u) * torch.relu(v) * ww).sum()) == pytest.approx(
        float(k1[0, 1]), rel=1e-4
    )
    # degree 0: Sheppard's formula P(u > 0, v > 0) = 1/4 + arcsin(rho) / (2 pi)
    assert float(k0[0, 1]) == pytest.approx(0.25 + math.asin(rho) / (2 * PI), rel=1e-14)
    with pytest.raises(ValueError, match="unknown kind"):
        expected_ntk("elu", X, 10)
    with pytest.raises(ValueError, match="quad_nodes must be a positive integer"):
        expected_ntk("gelu", X, 10, quad_nodes=0)


# ------------------------------------------------------------------------------------------------
# Prop. 4.1 dynamics
# ------------------------------------------------------------------------------------------------


def _random_psd(n: int, seed: int) -> torch.Tensor:
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return A @ A.T / n + 0.05 * torch.eye(n, dtype=torch.float64)


def test_expected_loss_curve_equals_matrix_powers():
    n, steps = 6, 5
    K = _random_psd(n, 0)
    C = _random_psd(n, 1)
    Y = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eta = 0.9 / float(torch.linalg.eigvalsh(K)[-1])
    I = torch.eye(n, dtype=torch.float64)
    A = I - eta * K
    paper = expected_loss_curve(K, Y, eta, steps)
    custom = expected_loss_curve(K, Y, eta, steps, init_cov=C, reduction="mean")
    zero = expected_loss_curve(K, Y, eta, steps, init_cov=None)
    assert paper.shape == (steps + 1,)
    for k in range(steps + 1):
        P = torch.linalg.matrix_power(A, 2 * k)
        assert float(paper[k]) == pytest.approx(float(torch.trace(P @ K) + Y @ P @ Y), rel=1e-10)
        assert float(custom[k]) == pytest.approx(
            float(torch.trace(P @ C) + Y @ P @ Y) / n, rel=1e-10
        )
        assert float(zero[k]) == pytest.approx(float(Y @ P @ Y), rel=1e-10)
    # several target columns: the trace term counts once per column
    Y2 = torch.stack([Y, 2 * Y], 1)
    two = expected_loss_curve(K, Y2, eta, 2)
    P = torch.linalg.matrix_power(A, 2)
    assert float(two[1]) == pytest.approx(float(2 * torch.trace(P @ K) + 5 * Y @ P @ Y), rel=1e-10)


def test_expected_loss_curve_long_horizon_is_stable():
    K = torch.diag(torch.tensor([1.0, 1e-3, 0.0], dtype=torch.float64))
    Y = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    curve = expected_loss_curve(K, Y, 1.0, 100_000, init_cov=None)
    assert torch.isfinite(curve).all()
    assert float(curve[0]) == 3.0
    # direction 1 is killed at k >= 1, direction 3 (lambda = 0) never decays
    assert float(curve[100_000]) == pytest.approx(1 + (1 - 1e-3) ** 200_000, rel=1e-9)


def test_linearized_train_matches_iteration_and_real_gd_in_the_lazy_regime():
    d, m, n = 8, 4000, 12
    X = gaussian_inputs(n, d, seed=5)
    Y = torch.randn(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = two_layer("reglu", d, m, seed=7, dtype=torch.float64)
    K = empirical_ntk(model, X)
    eta = 0.5 / float(torch.linalg.eigvalsh(K)[-1])
    with torch.no_grad():
        f0 = model(X)[:, 0]
    lin = linearized_train(K, Y, eta, 30, f0=f0)
    r = f0 - Y
    I = torch.eye(n, dtype=torch.float64)
    for k in range(31):
        assert float(lin[k]) == pytest.approx(float(r @ r), rel=1e-10)
        r = (I - eta * K) @ r
    real = train_two_layer(model, X, Y, eta, 30)
    # same step size and loss normalisation: real GD follows the linearised curve (lazy regime)
    torch.testing.assert_close(real, lin, rtol=2e-2, atol=0)
    lin_mean = linearized_train(K, Y, eta, 3, reduction="mean")
    assert float(lin_mean[0]) == pytest.approx(float(Y @ Y) / n)


def test_train_two_layer_first_step_is_the_kernel_step():
    # one step with a tiny eta: ||f_1 - Y||^2 = ||(I - eta K)(f_0 - Y)||^2 + O(eta^2 * ...)
    d, m, n = 6, 50, 10
    X = gaussian_inputs(n, d, seed=1)
    Y = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = two_layer("relu", d, m, seed=3, dtype=torch.float64)
    K = empirical_ntk(model, X)
    with torch.no_grad():
        f0 = model(X)[:, 0]
    eta = 1e-4 / float(torch.linalg.eigvalsh(K)[-1])
    real = train_two_layer(model, X, Y, eta, 1)
    lin = linearized_train(K, Y, eta, 1, f0=f0)
    drop_real, drop_lin = float(real[0] - real[1]), float(lin[0] - lin[1])
    assert drop_real == pytest.approx(drop_lin, rel=1e-3)


def test_predict_crossing_on_a_constructed_pair():
    # K_a = diag(1.5, 0.1), K_b = 0.2 I, Y = (1, 1), eta = 1, f_0 = 0:
    # L_a(k) = 0.25^k + 0.81^k, L_b(k) = 2 * 0.64^k -> a ahead at k=1,2, b ahead from k=3 on
    Ka = torch.diag(torch.tensor([1.5, 0.1], dtype=torch.float64))
    Kb = 0.2 * torch.eye(2, dtype=torch.float64)
    Y = torch.ones(2, dtype=torch.float64)
    La = [0.25**k + 0.81**k for k in range(50)]
    Lb = [2 * 0.64**k for k in range(50)]
    assert (
        Lb[1] > La[1] and Lb[2] > La[2] and all(b < a for a, b in zip(La[3:], Lb[3:], strict=True))
    )
    assert predict_crossing(Ka, Kb, Y, 1.0, 49, init_cov_a=None, init_cov_b=None) == 3
    # too short a horizon, and the reverse order (b never overtakes): no crossing
    assert predict_crossing(Ka, Kb, Y, 1.0, 2, init_cov_a=None, init_cov_b=None) is None
    assert predict_crossing(Kb, Ka, Y, 1.0, 49, init_cov_a=None, init_cov_b=None) is None
    # paper's default C = K: weights lambda_i + (v_i^T Y)^2, checked by brute force
    La = [2.5 * 0.25**k + 1.1 * 0.81**k for k in range(200)]
    Lb = [2 * 1.2 * 0.64**k for k in range(200)]
    expect = next(
        k for k in range(1, 200) if all(b < a for a, b in zip(La[k:], Lb[k:], strict=True))
    )
    assert predict_crossing(Ka, Kb, Y, 1.0, 199) == expect


def test_dynamics_bad_input():
    K = _random_psd(4, 0)
    Y = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="not symmetric"):
        expected_loss_curve(K + torch.triu(torch.ones(4, 4)), Y, 0.1, 3)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        expected_loss_curve(-K, Y, 0.1, 3)
    with pytest.raises(ValueError, match="Y must have shape"):
        expected_loss_curve(K, torch.ones(3), 0.1, 3)
    with pytest.raises(ValueError, match="eta must be a positive"):
        linearized_train(K, Y, -1.0, 3)
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        expected_loss_curve(K, Y, 0.1, -2)
    with pytest.warns(RuntimeWarning, match="diverges"):
        expected_loss_curve(K, Y, 10.0 / float(torch.linalg.eigvalsh(K)[-1]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        predict_crossing(K, _random_psd(3, 1), Y, 0.1, 3)
    with pytest.raises(ValueError, match="init_cov must be"):
        expected_loss_curve(K, Y, 0.1, 3, init_cov="nngp")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# reproduction table and example
# ------------------------------------------------------------------------------------------------


def test_theory_table_rows_are_consistent():
    rows = theory_table(6, [40], [8, 30], seed=1)
    assert [(r["kind"], r["n"]) for r in rows] == [
        ("relu", 8),
        ("reglu", 8),
        ("relu", 30),
        ("reglu", 30),
    ]
    for r in rows:
        assert r["emp_kappa"] == pytest.approx(r["emp_lambda_max"] / r["emp_lambda_min"])
        assert r["cf_lambda_min"] == pytest.approx(paper_lambda_min(r["kind"], 6, 40, r["n"]))
        # the documented stream of X: SeedSequence(seed, spawn_key=(1, 0, d, n)), 32 bits
        ss = np.random.SeedSequence(1, spawn_key=(1, 0, 6, r["n"]))
        X = gaussian_inputs(r["n"], 6, seed=int(ss.generate_state(1, np.uint32)[0]))
        lam = torch.linalg.eigvalsh(paper_kernel(r["kind"], X, 40))
        assert r["ker_lambda_max"] == pytest.approx(float(lam[-1]))
        assert r["ker_lambda_min"] == pytest.approx(float(lam[0]))
    text = format_theory_table(rows)
    assert "λmax emp" in text and "reglu" in text
    md = format_theory_table(rows, markdown=True)
    assert md.count("\n| ") == len(rows) + 1
    verdicts = theory_verdicts(rows)
    assert any(v.startswith("ReLU lambda_max formula") for v in verdicts)
    assert any("kappa(ReGLU) < kappa(ReLU)" in v for v in verdicts)
    with pytest.raises(ValueError, match="positive integer"):
        theory_table([0], 10, 10)
    with pytest.raises(ValueError, match="closed forms exist only"):
        theory_table(4, 10, 10, kinds=("swiglu",))


def _record_streams(monkeypatch) -> list[tuple[str, int]]:
    """Make theory's input, target and network draws log ``(role, seed)`` (then draw as usual)."""
    log: list[tuple[str, int]] = []

    def wrap(name: str, role: str):
        orig = getattr(th, name)

        def f(*args, **kw):
            assert kw.get("seed") is not None, f"{name} called without a seed"
            log.append((role(args) if callable(role) else role, int(kw["seed"])))
            return orig(*args, **kw)

        monkeypatch.setattr(th, name, f)

    wrap("gaussian_inputs", "inputs")
    wrap("make_target", "target")
    wrap("two_layer", lambda args: f"network {args[0]}")
    return log


def _stream(seed: int) -> tuple[float, ...]:
    """The first draws of the torch stream a seed starts (a CPU generator keeps 32 bits)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(16, generator=g, dtype=torch.float64).tolist())


def test_crossing_experiment_streams_are_distinct_across_seeds_and_roles(monkeypatch):
    """Inputs, target and each network get their own stream for every seed. Before, seed s drew
    its target with seed s + 1, the stream of seed s + 1's inputs, so seed averages (mean_crossings,
    the example's --seeds) mixed correlated runs."""
    log = _record_streams(monkeypatch)
    seeds = range(4)
    for s in seeds:
        crossing_experiment(3, 4, 5, seed=s, steps=1)
    roles = ["inputs", "target", "network relu", "network reglu"]
    assert [r for r, _ in log] == roles * len(seeds)
    streams = {}
    for (role, seed), s in zip(log, [s for s in seeds for _ in roles], strict=True):
        streams.setdefault(_stream(seed), []).append((s, role))
    shared = [v for v in streams.values() if len(v) > 1]
    assert not shared, f"(seed, role) pairs drawing from the same stream: {shared}"
    # the documented scheme: SeedSequence(seed) spawn keys (0, role[, i]), one 32-bit word
    target_of_0 = np.random.SeedSequence(0).spawn(1)[0].spawn(2)[1]
    assert log[1][1] == int(target_of_0.generate_state(1, np.uint32)[0])
    # same seed, same streams (also with another eta_scale: step sizes are compared on one draw)
    seed2 = log[2 * len(roles) : 3 * len(roles)]
    log.clear()
    crossing_experiment(3, 4, 5, seed=2, steps=1, eta_scale=0.5)
    assert log == seed2
    with pytest.raises(ValueError, match="non-negative integer"):
        crossing_experiment(3, 4, 5, seed=-1, steps=1)


def test_theory_table_streams_are_distinct_across_seeds_and_settings(monkeypatch):
    """Before, X used seed * 1_000_003 + 7919 d + n and the networks seed * 1_000_003 + 31 m + j:
    at d=1, m=258, n=79 both are 7998, so the ReLU network's W was X itself; and a seed's X
    could be the next seed's network (7919 d + n - 31 m - j = 1_000_003, e.g. d=127, m=200,
    n=490)."""
    log = _record_streams(monkeypatch)
    for seed in range(4):
        theory_table(1, [258, 259], [79, 80], seed)
    theory_table(127, 200, 490, 0)
    theory_table(127, 200, 490, 1)
    by_stream: dict[tuple[float, ...], set[int]] = {}
    for i, (_, seed) in enumerate(log):
        by_stream.setdefault(_stream(seed), set()).add(i)
    # X is shared by the kinds and the m's of one (d, n): one call of gaussian_inputs per (d, n)
    assert all(len(v) == 1 for v in by_stream.values()), "two draws share a stream"
    assert len(log) == 4 * (2 + 2 * 2 * 2) + 2 * (1 + 2)
    with pytest.raises(ValueError, match="non-negative integer"):
        theory_table(3, 4, 5, -1)


def test_example_refuses_a_negative_seed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["two_layer_ntk.py", "--quick", "--seed", "-1"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "examples" / "two_layer_ntk.py"), run_name="__main__")
    assert exc.value.code == 2 and "--seed must be a non-negative" in capsys.readouterr().err


def test_theory_table_prints_an_undefined_kappa_error_as_nan():
    """A singular NTK (d = m = 1: rank 2 or 3 of 30) has lambda_min <= 0 up to rounding, so its
    kappa is inf and the formula's kappa error NaN (finite against infinite); it was printed
    "inf", like the lambda_min error, which is infinite."""
    rows = theory_table(1, 1, 30, 0)

    def cells(rs: list[dict]) -> list[dict[str, str]]:
        lines = format_theory_table(rs, markdown=True).splitlines()
        cols = lines[2].strip("| ").split(" | ")
        return [dict(zip(cols, ln.strip("| ").split(" | "), strict=True)) for ln in lines[4:]]

    for r, c in zip(rows, cells(rows), strict=True):
        assert r["emp_lambda_min"] <= 0 and r["emp_kappa"] == math.inf
        assert math.isnan(r["err_kappa"]) and r["err_lambda_min"] == math.inf
        assert (c["κ emp"], c["λmin err"], c["κ err"]) == ("inf", "inf", "nan")
    # the formatter on its own: nan, +inf and -inf stay apart
    row = dict(rows[0], err_lambda_max=-math.inf, err_lambda_min=math.inf, err_kappa=math.nan)
    (c,) = cells([row])
    assert (c["λmax err"], c["λmin err"], c["κ err"]) == ("-inf", "inf", "nan")
    assert "nan" in format_theory_table([row])  # the rich table too


def test_crossing_experiment_linear_prediction_matches_real_training():
    r = crossing_experiment(20, 200, 80, seed=0, steps=150, keep_curves=5)
    assert r["eta_lambda_max"] == pytest.approx(1.0)
    assert r["crossing_observed"] is not None
    assert abs(r["crossing_linear"] - r["crossing_observed"]) <= 1
    assert set(r["curves"]) == {"paper", "measured", "nngp", "linear", "observed"}
    assert len(r["curve_steps"]) == 5
    assert "observed" in format_crossing_table([r])


def test_mean_crossings_averages_curves_over_seeds():
    runs = [
        crossing_experiment(6, 60, 20, seed=s, steps=40, keep_curves=41, target="random")
        for s in range(2)
    ]
    (row,) = mean_crossings(runs)
    assert row["seeds"] == 2 and row["steps"] == 40
    for name in ("paper", "observed"):
        ca = torch.tensor([r["curves"][name]["relu"] for r in runs]).mean(0)
        cb = torch.tensor([r["curves"][name]["reglu"] for r in runs]).mean(0)
        # independent re-derivation of "first step from which b stays below a"
        below = (cb < ca).tolist()
        expect = None
        if below[-1]:
            k = len(below) - 1
            while k > 0 and below[k - 1]:
                k -= 1
            expect = k if k > 0 else None
        assert row[f"crossing_{name}"] == expect
    assert "seeds" in format_crossing_table([row])
    with pytest.raises(ValueError, match="keep_curves=steps"):
        mean_crossings([crossing_experiment(6, 60, 20, steps=10, keep_curves=5)])


def test_example_quick_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "res.json"
    argv = ["two_layer_ntk.py", "--quick", "--m", "300", "--steps", "100", "--seeds", "2"]
    argv += ["--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "examples" / "two_layer_ntk.py"), run_name="__main__")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "Where the closed forms hold" in text and "Prop. 4.1 predictions" in text
    data = json.loads(out.read_text())
    assert len(data["spectrum"]) == 4 and len(data["crossing"]) == 2
    assert len(data["crossing_mean"]) == 1 and data["crossing_mean"][0]["seeds"] == 2


def test_relu_kernels_on_the_diagonal_are_exact():
    """ρ_ii = 1 exactly: arccos of a rounded 1 − 1 ulp lost ~8 digits (0.4999999976 for ½)."""
    from glu_probe.theory import _gaussian_moments

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 7, generator=g, dtype=torch.float64) * 3.3
    k1, k0 = _gaussian_moments("relu", X, None)
    sigma2 = (X * X).sum(1) / X.shape[1]
    torch.testing.assert_close(torch.diagonal(k0), torch.full((40,), 0.5, dtype=torch.float64),
                               rtol=0, atol=1e-15)  # fmt: skip
    torch.testing.assert_close(torch.diagonal(k1), sigma2 / 2, rtol=1e-15, atol=0)


def test_crossing_hypotheses_closed_form():
    from glu_probe.theory import crossing_hypotheses

    n, beta = 6, 0.7
    Kb = torch.eye(n, dtype=torch.float64)
    Ka = Kb + beta * torch.ones(n, n, dtype=torch.float64)  # a rank-one β·1 1ᵀ term
    y = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25], dtype=torch.float64)
    h = crossing_hypotheses(Ka, Kb, y, d=4)
    assert h["quadratic_form"] == pytest.approx(beta * float(y.sum()) ** 2, rel=1e-14)
    assert h["sign_ok"] and not h["d_ok"] and not h["n_ok"] and not h["all_hold"]
    centred = crossing_hypotheses(Ka, Kb, y - y.mean(), d=5)
    assert centred["quadratic_form"] == pytest.approx(0.0, abs=1e-12) and centred["d_ok"]


@pytest.mark.parametrize(("d", "m", "n"), [(100, 2000, 200), (300, 200, 200), (100, 200, 40)])
def test_reglu_lambda_min_formula_tracks_the_proof_kernel(d, m, n):
    """The ReGLU closed form against the smallest eigenvalue of the kernel its proof bounds,
    ``α̃ G⊙G + β̃ d G + γ̃ d² I`` (``G = XXᵀ``, the norms replaced by ``d``), in float64: within
    35% with s̃ = 1 − √(2n)/d (the Marchenko–Pastur edge of G⊙G, d²/2 features; measured
    −5% … +30% over the docs' grid), and closer than the other reading of the paper's text,
    s̃ = 1 − √(2n/d), which gave 215.8 against 495 at (100, 2000, 200): −56%."""
    X = gaussian_inputs(n, d, seed=5)
    a, b, c = paper_coefficients("reglu", d, m)
    G = X @ X.T
    K = a * G * G + b * d * G + c * d * d * torch.eye(n, dtype=torch.float64)
    truth = float(torch.linalg.eigvalsh(K)[0])
    ours = paper_lambda_min("reglu", d, m, n)
    s = max(0.0, 1 - math.sqrt(n / d))
    st_other = max(0.0, 1 - math.sqrt(2 * n / d))
    other = (m + 2 * d) / 4 * (st_other**2 + 1) + (m + d) / (2 * PI) * (s * s - 1)
    assert abs(ours / truth - 1) < 0.35
    assert abs(ours - truth) < abs(other - truth)
