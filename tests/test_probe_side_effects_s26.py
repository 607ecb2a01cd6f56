"""Review session 26: a probe leaves no attribute behind in the model (a cache built in the
probe's dtype, a buffer registered in forward), and ntk_matrix on a model that casts its inputs
falls back to float32 rows as ntk_spectrum does."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from glu_probe.ntk import ntk_matrix, ntk_spectrum

torch.set_num_threads(1)


class SinPos(nn.Module):
    """A sinusoidal position table cached lazily in the activations' dtype (a common
    hand-written pattern) with the length it covers, and a scale buffer registered on the first
    call."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.table: torch.Tensor | None = None
        self.length = 0  # (a scalar that must go back with the table: no table of length 5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1]
        if self.length < T:
            self.length = T
            pos = torch.arange(T, dtype=h.dtype, device=h.device)[:, None]
            step = torch.arange(0, self.d, 2, dtype=h.dtype, device=h.device)
            freq = torch.exp(step * (-math.log(1e4) / self.d))
            self.table = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], -1)
        if "scale" not in self._buffers:
            self.register_buffer("scale", torch.full((), 0.5, dtype=h.dtype, device=h.device))
        return h + self.scale * self.table[:T]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.pos = SinPos(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.pos(self.inp(x))))


def _net() -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    return Net(), torch.randn(4, 5, 3)


def _attributes(model: nn.Module) -> list[tuple[str, dict[str, int], list[list[str]]]]:
    """Every module's attributes by identity, and its registries' keys."""
    return [
        (
            name,
            {k: id(v) for k, v in vars(m).items()},
            [list(m._parameters), list(m._buffers), list(m._modules)],
        )
        for name, m in model.named_modules()
    ]


def _truth(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of K = J Jᵀ (rows: every output) of a fresh float64 instance, from its
    per-row Jacobian."""
    fresh = Net().double()
    fresh.load_state_dict({k: v for k, v in state.items() if k != "pos.scale"}, strict=False)
    names = [n for n, _ in fresh.named_parameters()]

    def f(*params: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(fresh, dict(zip(names, params, strict=True)), (x,))
        return out.reshape(-1)

    jac = torch.autograd.functional.jacobian(f, tuple(p.detach() for p in fresh.parameters()))
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    return torch.linalg.eigvalsh(J @ J.T)


def _training_step(model: Net, x: torch.Tensor) -> None:
    model.zero_grad()
    model(x).square().mean().backward()
    assert model.inp.weight.grad is not None and model.inp.weight.grad.dtype == torch.float32
    assert model.pos.table is not None and model.pos.table.dtype == torch.float32


@pytest.mark.parametrize("method", ["dense", "auto", "lanczos"])
def test_spectrum_leaves_no_attribute_and_matches_float64_truth(method: str) -> None:
    model, x = _net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _attributes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ntk_spectrum(model, x, output="full", method=method)
    # no float64 table, no buffer registered by the probe's passes
    assert model.pos.table is None and model.pos.length == 0
    assert "scale" not in model.pos._buffers
    assert _attributes(model) == before
    ev = _truth(state, x.double())
    if method == "lanczos":  # float32 products: the extremes to their residuals
        assert s.lambda_max == pytest.approx(float(ev[-1]), rel=1e-4)
    else:
        # float64 rows from a float64 table: the validating float32 pass of `auto` left no
        # float32 table for them to reuse (it made the result 'mixed')
        assert s.precision == "float64"
        assert s.lambda_max == pytest.approx(float(ev[-1]), rel=1e-10)
        assert s.lambda_min == pytest.approx(float(ev[0]), rel=1e-7)
        assert s.condition_number == pytest.approx(float(ev[-1] / ev[0]), rel=1e-7)
    _training_step(model, x)


def test_matrix_leaves_no_attribute_and_matches_float64_truth() -> None:
    model, x = _net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _attributes(model)
    K = ntk_matrix(model, x, output="full")
    assert model.pos.table is None and "scale" not in model.pos._buffers
    assert _attributes(model) == before
    ev = torch.linalg.eigvalsh(K)
    truth = _truth(state, x.double())
    torch.testing.assert_close(ev, truth, rtol=1e-8, atol=1e-12 * float(truth[-1]))
    _training_step(model, x)


def test_probe_keeps_the_model_own_cache() -> None:
    """A cache that existed before the probe is the same object after it (restored by
    identity, not copied), and an attribute set by hand stays."""
    model, x = _net()
    model(x)
    table, scale = model.pos.table, model.pos.scale
    model.pos.note = "mine"
    ntk_spectrum(model, x, output="full", method="dense", jacobian_dtype=torch.float32)
    assert model.pos.table is table and model.pos.scale is scale and model.pos.note == "mine"
    assert table is not None and table.dtype == torch.float32
    _training_step(model, x)


class Counted(nn.Module):
    """Counts its forward calls, and caches nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.lin(x))


def test_a_forward_that_only_counts_keeps_its_count() -> None:
    """Plain scalars alone are not taken back (the passes did run; the operator tests count
    them across a call's passes)."""
    torch.manual_seed(0)
    model, x = Counted(), torch.randn(6, 3)
    params = dict(model.named_parameters())
    K = ntk_matrix(model, x, output="full")
    assert model.calls > 0
    assert dict(model.named_parameters()) == params and not list(model.buffers())
    J = torch.autograd.functional.jacobian(
        lambda w, b: torch.tanh(x.double() @ w.T + b).reshape(-1),
        (model.lin.weight.detach().double(), model.lin.bias.detach().double()),
    )
    J = torch.cat([j.reshape(12, -1) for j in J], dim=1)
    torch.testing.assert_close(K, J @ J.T, rtol=1e-10, atol=1e-12)


class Counts(nn.Module):
    """Integer counts cast with .float() inside the forward: it does not run in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.float())))


def test_matrix_of_a_casting_model_falls_back_to_float32_rows() -> None:
    torch.manual_seed(0)
    m, x = Counts(), torch.randint(0, 5, (9, 4))
    with pytest.warns(RuntimeWarning, match="ntk_matrix: the model does not run in float64"):
        K = ntk_matrix(m, x, output="full")
    assert K.dtype == torch.float64 and K.shape == (18, 18)
    # truth: float32 rows of the float32 model (the model's own arithmetic), Gram in float64
    names = [n for n, _ in m.named_parameters()]

    def f(*params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(m, dict(zip(names, params, strict=True)), (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(p.detach() for p in m.parameters()))
    J = torch.cat([j.reshape(18, -1) for j in jac], dim=1).double()
    torch.testing.assert_close(K, J @ J.T, rtol=1e-5, atol=1e-6)
    # chosen explicitly: no warning, the same K
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K32 = ntk_matrix(m, x, output="full", jacobian_dtype=torch.float32)
    torch.testing.assert_close(K32, K, rtol=0, atol=0)


def test_matrix_keeps_raising_where_float32_rows_cannot_help() -> None:
    """A float64 request that fails for another reason still raises the float64 error."""
    torch.manual_seed(0)
    m, x = Counts(), torch.randint(0, 5, (9, 4))
    with pytest.raises(RuntimeError, match="same dtype"):
        ntk_matrix(m, x, output="full", strategy="operator")
