"""Session 25 review findings: each test failed on the code before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glu_probe.modules import (
    dense_hidden_features,
    gated_hidden_features,
    make_mlp,
    mlp_num_params,
)
from glu_probe.ntk import ntk_matrix, ntk_spectrum


@pytest.mark.parametrize(
    ("d_in", "hidden", "multiple_of"),
    [(3, 100_000_000_000_000_001, 1), (1, 2**60, 1), (5, 3 * 2**58 + 7, 8)],
)
def test_widths_above_2_pow_53_are_the_closest(d_in: int, hidden: int, multiple_of: int) -> None:
    # A float quotient lost the nearest width above 2**53 (count error 33 vs 0 for the first).
    target = mlp_num_params(d_in, hidden, gated=False)
    h = gated_hidden_features(d_in, hidden, multiple_of=multiple_of)
    assert h % multiple_of == 0
    err = abs(mlp_num_params(d_in, h, gated=True) - target)
    for other in (h - multiple_of, h + multiple_of):  # the count is linear in h
        assert err <= abs(mlp_num_params(d_in, other, gated=True) - target)
    back = dense_hidden_features(d_in, h)
    err_back = abs(mlp_num_params(d_in, back, gated=False) - mlp_num_params(d_in, h, gated=True))
    for other in (back - 1, back + 1):
        assert err_back <= abs(
            mlp_num_params(d_in, other, gated=False) - mlp_num_params(d_in, h, gated=True)
        )


def test_make_mlp_gelu_refuses_a_bad_approximate_at_construction() -> None:
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        make_mlp("gelu", 8, 16, approximate="bogus")
    block = make_mlp("gelu", 8, 16, approximate="tanh")
    x = torch.randn(3, 8)
    ref = block.fc2(nn.functional.gelu(block.fc1(x), approximate="tanh"))
    torch.testing.assert_close(block(x), ref)


class _ComplexWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, dtype=torch.cdouble))
        self.v = nn.Parameter(torch.randn(8, 3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.w.dtype) @ self.w).abs() + x @ self.v


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_complex_parameters_are_refused_not_cast(method: str) -> None:
    # They were cast to real (imaginary parts dropped): kappa 66.8 for a true 24.6, converged.
    torch.manual_seed(0)
    model, x = _ComplexWeight(), torch.randn(6, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"complex parameters are not supported.*'w'"):
        ntk_spectrum(model, x, method=method, output="full")
    # leaving them out with params= works, and gives the real part's kernel exactly
    k = ntk_matrix(model, x, output="full", params=["v"], dtype=torch.float64)
    xx = x @ x.T
    torch.testing.assert_close(k, torch.kron(xx, torch.eye(3, dtype=torch.float64)))


def test_complex_rows_get_a_clear_error() -> None:
    class ComplexOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.polar(self.lin(x), x[:, :3])

    with pytest.raises(ValueError, match="probe rows are complex"):
        ntk_spectrum(ComplexOut(), torch.randn(5, 4), output="full")


def test_closest_width_takes_numpy_and_tensor_targets() -> None:
    # (Re-review.) Fraction() refused np.float32 and 0-d tensors, which worked before.
    import numpy as np

    from glu_probe.modules import closest_width

    want = closest_width(1000.0, 3, 4, 1)
    assert want == 332
    for target in (np.float32(1000.0), np.float64(1000.0), np.int64(1000), torch.tensor(1000.0)):
        assert closest_width(target, 3, 4, 1) == want


# ---------------------------------------------------------------------- theory (review s25)


def _paper_setting() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    from glu_probe.theory import gaussian_inputs, make_target, paper_kernel

    X = gaussian_inputs(20, 100, seed=0)
    Y = make_target(X, seed=1)
    Ka, Kb = paper_kernel("relu", X, 2000), paper_kernel("reglu", X, 2000)
    return Ka, Kb, Y, 1.0 / float(torch.linalg.eigvalsh(Ka)[-1])


def test_a_crossing_survives_a_horizon_past_the_underflow() -> None:
    # Both curves reach 0.0 by step 10,000: "b < a up to the last step" failed there, and the
    # crossing at step 4 came back as None.
    from glu_probe.theory import expected_loss_curve, predict_crossing

    Ka, Kb, Y, eta = _paper_setting()
    assert float(expected_loss_curve(Ka, Y, eta, 30_000)[-1]) == 0.0
    assert float(expected_loss_curve(Kb, Y, eta, 30_000)[-1]) == 0.0
    for steps in (100, 3000, 10_000, 30_000):
        assert predict_crossing(Ka, Kb, Y, eta, steps) == 4, steps


def test_theory_refuses_non_finite_targets_bad_eta_and_reduction() -> None:
    import numpy as np

    from glu_probe.theory import (
        expected_loss_curve,
        linearized_train,
        predict_crossing,
        train_two_layer,
        two_layer,
    )

    Ka, Kb, Y, eta = _paper_setting()
    bad = Y.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="Y has NaN or Inf"):
        predict_crossing(Ka, Kb, bad, eta, 50)  # was None: "no crossing"
    with pytest.raises(ValueError, match="Y has NaN or Inf"):
        linearized_train(Ka, bad, eta, 5)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        expected_loss_curve(Ka, Y, eta, 5, reduction="avg")  # type: ignore[arg-type]
    for bad_eta in (True, "0.5", np.complex128(0.1 + 1j), torch.tensor([0.1]), np.array([0.1])):
        with pytest.raises(ValueError, match="eta must be a positive finite number"):
            expected_loss_curve(Ka, Y, bad_eta, 5)  # type: ignore[arg-type]
    # numpy and 0-d tensor scalars are numbers (they were refused)
    want = expected_loss_curve(Ka, Y, eta, 5)
    for e in (np.float32(eta), np.float64(eta), torch.tensor(eta, dtype=torch.float64)):
        got = expected_loss_curve(Ka, Y, e, 5)  # type: ignore[arg-type]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    net = two_layer("relu", 4, 16, seed=0, dtype=torch.float64)
    X = torch.randn(6, 4, dtype=torch.float64)
    Xbad = X.clone()
    Xbad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="X has NaN or Inf"):
        train_two_layer(net, Xbad, torch.randn(6, dtype=torch.float64), 1e-2, 2)
    with pytest.raises(ValueError, match="reduction must be"):
        train_two_layer(net, X, torch.randn(6), 1e-2, 2, reduction="avg")  # type: ignore[arg-type]


def test_rounding_level_lambda_min_gives_infinite_kappa() -> None:
    from glu_probe.theory import _extremes

    K = torch.diag(torch.tensor([1e-16 * 4.0, 1.0, 2.0], dtype=torch.float64))
    assert _extremes(K)[2] == float("inf")  # was 5e15
    K = torch.diag(torch.tensor([1e-9, 1.0, 2.0], dtype=torch.float64))
    assert _extremes(K)[2] == pytest.approx(2e9)


def test_crossing_experiment_and_mean_crossings_keep_settings_apart() -> None:
    from glu_probe.theory import crossing_experiment, mean_crossings

    with pytest.raises(ValueError, match="two different kinds"):
        crossing_experiment(5, 50, 10, seed=0, steps=5, kinds=("relu", "relu"))
    runs = [
        crossing_experiment(5, 50, 10, seed=s, steps=5, target=t, keep_curves=6)
        for s, t in ((0, "teacher"), (1, "random"))
    ]
    rows = mean_crossings(runs)
    assert sorted((r["target"], r["seeds"]) for r in rows) == [("random", 1), ("teacher", 1)]
    with pytest.raises(ValueError, match="repeat a seed"):
        mean_crossings([runs[0], runs[0]])


def test_closest_width_returns_a_python_int_for_numpy_integer_targets() -> None:
    import decimal
    import json

    import numpy as np

    from glu_probe.modules import closest_width

    for target in (np.int64(1000), np.int32(1000), decimal.Decimal(1000), 1000):
        got = closest_width(target, 3, 4, 1)
        assert type(got) is int and got == 332
        json.dumps(got)


def test_eta_is_a_real_scalar_and_crossing_experiment_keeps_it_a_float() -> None:
    # (Re-review.) Bool tensors/arrays, numpy strings and timedeltas slipped through or raised
    # TypeError; Decimal was refused; crossing_experiment returned a tensor eta (no JSON).
    import decimal
    import fractions
    import json

    import numpy as np

    from glu_probe.theory import _check_eta, crossing_experiment

    good = [0.1, np.float32(0.1), np.int64(1), fractions.Fraction(1, 10), decimal.Decimal("0.1")]
    good += [torch.tensor(0.1), np.array(0.1)]
    for eta in good:
        assert _check_eta(eta) == pytest.approx(float(eta), rel=1e-6)
    bad = [torch.tensor(True), np.array(True), np.array("0.1"), np.array("0.1", dtype=object)]
    bad += [np.timedelta64(1, "s"), 10**400, torch.tensor(0.1, device="meta"), [0.1]]
    for eta in bad:
        with pytest.raises(ValueError, match="eta must be a positive finite number"):
            _check_eta(eta)
    r = crossing_experiment(3, 4, 6, steps=3, eta=torch.tensor(0.01))
    assert type(r["eta"]) is float and type(r["eta_lambda_max"]) is float
    json.dumps({k: r[k] for k in ("eta", "eta_lambda_max")})
    with pytest.raises(ValueError, match="eta_scale must be a positive finite number"):
        crossing_experiment(3, 4, 6, steps=3, eta_scale=-1.0)
