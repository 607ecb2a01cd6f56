"""NTK engine regressions found by an independent review: shared submodules, aliased gradients
of one-sample chunks, warm-start convergence, one-ended Lanczos, rounding of float32 products,
inference mode, float64-only models, argument checks, train-mode layers. Every number is checked
against a dense float64 eigendecomposition of J Jᵀ built here with torch.func."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from glu_probe.ntk import NTKOperator, ntk_matrix, ntk_spectrum

torch.set_num_threads(1)


def _truth(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (float64, ascending) of the pNTK of ``model`` on ``x``."""
    m = copy.deepcopy(model).double().eval()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}

    def rows(theta: dict) -> torch.Tensor:
        out = torch.func.functional_call(m, theta, (x.double(),))
        return out.reshape(out.shape[0], -1).sum(1) / math.sqrt(out[0].numel())

    jac = torch.func.jacrev(rows)(params)
    J = torch.cat([jac[n].reshape(x.shape[0], -1) for n in names], 1)
    return torch.linalg.eigvalsh(J @ J.T)


def _kappa(ev: torch.Tensor) -> float:
    return float(ev[-1] / ev[0])


class SharedBlocks(nn.Module):
    """One block registered under several names (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        blk = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.inp = nn.Linear(5, 8)
        self.layers = nn.ModuleList([blk] * 3)
        self.alias = blk
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_shared_submodules_are_left_untouched_and_every_call_is_exact():
    net = SharedBlocks()
    x = torch.randn(12, 5)
    before = {n: p for n, p in net.named_parameters(remove_duplicate=False)}
    truth = _kappa(_truth(net, x))
    for kw in (dict(method="lanczos"), dict(method="dense"), dict(method="dense")):
        s = ntk_spectrum(net, x, **kw)  # type: ignore[arg-type]
        after = dict(net.named_parameters(remove_duplicate=False))
        assert after.keys() == before.keys()
        assert all(after[n] is p and isinstance(p, nn.Parameter) for n, p in before.items())
        assert all(p.dtype == torch.float32 for p in after.values())
        # float32 Lanczos products resolve λ_min to about ε₃₂·κ (κ ≈ 5e5 here)
        rtol = 1e-8 if kw["method"] == "dense" else 10 * 1.2e-7 * truth
        assert s.condition_number == pytest.approx(truth, rel=rtol)
    net(x).sum().backward()  # still the user's own graph: gradients reach the parameters
    assert net.layers[0][0].weight.grad is not None


class TwoBiases(nn.Module):
    """Two bias-like parameters whose gradients autograd may return in one storage."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(4, 16)
        self.b1 = nn.Parameter(torch.zeros(1, 16))
        self.b2 = nn.Parameter(torch.zeros(1, 16))
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x) + self.b1.expand(x.shape[0], -1) + self.b2))


@pytest.mark.parametrize("model", ["two_biases", "timm_vit"])
def test_one_sample_chunks_give_the_exact_operator(model):
    if model == "timm_vit":
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        net: nn.Module = timm.models.vision_transformer.VisionTransformer(
            img_size=8, patch_size=4, in_chans=1, num_classes=2, embed_dim=16, depth=1,
            num_heads=2, mlp_ratio=2.0,
        )  # fmt: skip
        x = torch.randn(5, 1, 8, 8)
    else:
        net, x = TwoBiases(), torch.randn(6, 4)
    dense = ntk_matrix(net, x).double()
    for chunk in (1, 2):
        op = NTKOperator(net, x, dtype=torch.float64, chunk_size=chunk)
        K = op.matvec(torch.eye(op.n, dtype=torch.float64))
        assert torch.allclose(K, dense, rtol=1e-10, atol=1e-10 * float(dense.abs().max()))


def test_warm_start_is_not_declared_converged_from_its_start_block():
    """A warm start of the previous call's Ritz vectors after a small weight change: the start
    block alone once claimed convergence with a λ_min error of 1.6e-3 (tol 1e-4)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    x = torch.randn(200, 10, dtype=torch.float64)
    prev = ntk_spectrum(net, x, method="lanczos", dtype=torch.float64, max_matvecs=800)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in net.parameters():
            p.add_(1.9e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ev = _truth(net, x)
    s = ntk_spectrum(
        net, x, method="lanczos", dtype=torch.float64, warm_start=prev, max_matvecs=800
    )
    assert s.converged
    assert abs(s.lambda_min - float(ev[0])) <= 2e-4 * float(ev[0])
    assert abs(s.condition_number - _kappa(ev)) <= 2e-4 * _kappa(ev)


def test_one_ended_lanczos_reports_the_other_end_as_unknown():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(120, 10)
    ev = _truth(net, x)
    top = ntk_spectrum(net, x, method="lanczos", which="largest", max_matvecs=40)
    assert top.converged and top.lambda_max == pytest.approx(float(ev[-1]), rel=1e-4)
    assert math.isnan(top.lambda_min) and math.isnan(top.condition_number)
    assert top.lambda_min_upper >= float(ev[0])
    assert top.condition_number_lower <= _kappa(ev)
    bottom = ntk_spectrum(net, x, method="lanczos", which="smallest", dtype=torch.float64)
    assert math.isnan(bottom.lambda_max) and math.isnan(bottom.condition_number)
    assert bottom.lambda_min == pytest.approx(float(ev[0]), rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_lanczos_bounds_hold_for_the_exact_kernel(seed):
    """θ_min + s bounds λ_min and (θ_max − s)/(θ_min + s) bounds κ although the float32
    products are rounded (without the allowance s they missed by ~1e-7·λ_max)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 3))
    x = torch.randn(1 + 20 * seed, 6)
    ev = _truth(net, x)
    for kw in (dict(max_matvecs=8), dict(max_matvecs=400)):
        s = ntk_spectrum(net, x, method="lanczos", **kw)  # type: ignore[arg-type]
        assert s.lambda_min_upper >= float(ev[0])
        assert s.condition_number_lower <= _kappa(ev)


def test_called_under_inference_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(6, 8)
    want = _kappa(_truth(net, x))
    with torch.inference_mode():
        dense = ntk_spectrum(net, x)
        lanczos = ntk_spectrum(net, x, method="lanczos", dtype=torch.float64)
        K = ntk_matrix(net, x)
    assert dense.condition_number == pytest.approx(want, rel=1e-8)
    assert lanczos.condition_number == pytest.approx(want, rel=1e-4)
    assert not K.is_inference()


class Float64Only(nn.Module):
    """Finite in float64, overflowing in float32 (exp(100))."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x))) * torch.exp(torch.full_like(x[:, :1], 100.0))


def test_dense_path_validates_in_float64():
    net = Float64Only().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    s = ntk_spectrum(net, x, method="dense")
    assert s.condition_number == pytest.approx(_kappa(_truth(net, x)), rel=1e-8)


def test_bad_arguments_are_refused_on_every_path():
    net, x = nn.Linear(3, 1), torch.randn(4, 3)
    bad = [
        dict(which="bogus"),
        dict(tol=-1.0),
        dict(tol=float("nan")),
        dict(chunk_size=0),
        dict(max_matvecs=0),
        dict(block_size=0),
        dict(memory_budget=-5),
        dict(warm_start=[1, 2]),
    ]
    for kw in bad:
        for method in ("dense", "lanczos"):
            name = next(iter(kw))
            with pytest.raises(ValueError, match=name):
                ntk_spectrum(net, x, method=method, **kw)  # type: ignore[arg-type]


class KinkNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 4)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sqrt(torch.relu(self.fc(x))) + x.sum(1, keepdim=True))


def test_forward_mode_nan_names_the_derivative():
    net, x = KinkNet(), torch.randn(3, 2)
    ntk_spectrum(net, x, method="dense")  # reverse mode: finite
    with pytest.raises(ValueError, match=r"derivative is undefined.*method='dense'"):
        ntk_spectrum(net, x, method="lanczos")


def test_train_mode_layers_with_eval_mode_false_are_explained():
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).train()
    x = torch.randn(6, 4)
    with pytest.warns(RuntimeWarning, match="batch statistics couple the samples"):
        ntk_spectrum(bn, x, eval_mode=False, method="lanczos")
    drop = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="dropout in training mode"):
            ntk_spectrum(drop, x, eval_mode=False, method="lanczos")
    assert drop.training and drop[1].training  # flags restored


def test_full_span_lanczos_below_its_rank_tolerance_reports_kappa_inf() -> None:
    """(Review, session 18.) A float32 Lanczos run that spans the whole space counted a
    numerical rank below n and warned that κ was "dominated by rounding, possibly infinite",
    but reported a finite κ. As on the dense path and as documented, κ is now ∞ where the rank
    is short, with a finite lower bound; float64 products give the same rank.

    (Session 22: the tolerance is the products' rounding level λ_max·√n·ε, as for a run that
    stops early; with λ_max·n·ε this model's 128 samples counted rank 114 and κ = ∞, although
    the float32 run's λ_min was within 2e-4 of the float64 one. That case now gives the finite
    κ (with the eps·κ warning); a duplicated sample makes K really singular.)"""
    from glu_probe.ntk.spectrum import NTKRankWarning

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 1))
    x = torch.randn(128, 4)
    exact = ntk_spectrum(model, x, method="lanczos", dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="close to the rounding level"):
        res = ntk_spectrum(model, x, method="lanczos")
    assert res.numerical_rank == 128 and res.eigenvalues is not None
    assert abs(res.condition_number / exact.condition_number - 1) < 1e-3
    x = x[:32].clone()
    x[-1] = x[0]  # K exactly singular; 32 rows, which the basis spans
    with pytest.warns(NTKRankWarning, match="numerical rank"):
        res = ntk_spectrum(model, x, method="lanczos")
    assert res.eigenvalues is not None  # the whole space: every eigenvalue
    assert res.numerical_rank == 31
    assert res.condition_number == math.inf
    assert 1.0 <= res.condition_number_lower < math.inf


def test_auto_takes_the_float64_dense_path_for_outputs_that_overflow_float32() -> None:
    """(Review, session 18.) ``method="auto"`` validated the probe in float32 before choosing
    the float64 dense path, so a float64 model whose outputs overflow float32 (but not float64)
    was refused, while ``method="dense"`` accepted it."""

    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) * 1e40

    torch.manual_seed(0)
    model, x = Big().double(), torch.randn(4, 3)
    dense = ntk_spectrum(model, x, method="dense")
    auto = ntk_spectrum(model, x)
    assert auto.method == "dense"
    assert math.isclose(auto.condition_number, dense.condition_number, rel_tol=1e-12)
    with pytest.raises(ValueError, match="NaN/Inf"):  # Lanczos in float32: still refused
        ntk_spectrum(model, x, method="lanczos", dtype=torch.float32)
    # (session 23: a float64 model's Lanczos products are float64 by default)
    lanczos = ntk_spectrum(model, x, method="lanczos")
    assert lanczos.precision == "float64"
    assert math.isclose(lanczos.lambda_max, dense.lambda_max, rel_tol=1e-10)
