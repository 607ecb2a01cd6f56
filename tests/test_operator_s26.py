"""NTKOperator consistency (review, session 26): forward-mode JVPs against reverse-mode VJPs
on models that use ``torch.no_grad()`` or gradient hooks inside forward, and custom autograd
Functions without a vmap rule. Truth: float64 per-row Jacobians from ``torch.autograd``
(reverse mode, as in training) and ``eigvalsh(J Jᵀ)``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from glu_probe.ntk import NTKOperator, ntk_matrix, ntk_spectrum

torch.set_num_threads(1)

MISMATCH = "forward-mode and reverse-mode derivatives of this model disagree"
NO_VMAP = "one column at a time"


class NoGradScale(nn.Module):
    """A stop-gradient normaliser: a parameter-dependent scale computed under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = self.a(x).norm(dim=-1, keepdim=True)
        return self.b(torch.tanh(self.a(x)) / scale)


class GradScale(nn.Module):
    """A gradient-scaling layer: a hook halves the gradient through the hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if h.requires_grad:
            h.register_hook(lambda g: 0.5 * g)
        return self.b(h)


class TanhNoVmap(torch.autograd.Function):
    """The torch.func form (setup_context + backward), without vmap or jvp."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class NoVmapNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(TanhNoVmap.apply(self.a(x)))


def reverse_truth(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """K = J Jᵀ with J's rows from torch.autograd.grad, one output at a time (float64)."""
    params = list(model.parameters())
    out = model(x).reshape(-1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
        for o in out
    ]
    J = torch.stack(rows)
    return J @ J.T


def build(cls: type[nn.Module], n: int = 7) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = cls().double()
    return model, torch.randn(n, 4, dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("cls", [NoGradScale, GradScale])
@pytest.mark.parametrize(("linearize", "chunk_size"), [(False, None), (True, None), (None, 3)])
def test_operator_matches_reverse_mode_truth(cls, linearize, chunk_size):
    """K I from the operator (untraced, traced and chunked) is the reverse-mode K; the old
    products J_f J_rᵀ were 7-16% off and not symmetric."""
    model, x = build(cls)
    K = reverse_truth(model, x)
    op = NTKOperator(
        model, x, output="full", dtype=torch.float64, linearize=linearize, chunk_size=chunk_size
    )
    eye = torch.eye(op.n, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KI = op.matvec(eye)
    assert rel(KI, K) < 1e-10
    assert [w.category for w in caught if MISMATCH in str(w.message)] == [RuntimeWarning]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per operator
        assert rel(op.matvec(eye[:, :3]), K[:, :3]) < 1e-10
        assert rel(op.matvec(eye[:, 3]), K[:, 3]) < 1e-10


@pytest.mark.parametrize("cls", [NoGradScale, GradScale])
def test_lanczos_matches_reverse_mode_truth(cls):
    """Lanczos λ's equal eigvalsh of the reverse-mode K (before: λ_min = -0.018 against
    0.0061 and κ = inf for the no_grad model, λ_max 12% high for the hook model, converged)."""
    model, x = build(cls)
    ev = torch.linalg.eigvalsh(reverse_truth(model, x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = ntk_spectrum(model, x, output="full", method="lanczos", dtype=torch.float64)
        Kop = ntk_matrix(model, x, output="full", strategy="operator")
    assert s.converged
    assert s.lambda_max == pytest.approx(float(ev[-1]), rel=1e-8)
    assert s.lambda_min == pytest.approx(float(ev[0]), rel=1e-8)
    assert s.condition_number == pytest.approx(float(ev[-1] / ev[0]), rel=1e-8)
    assert s.lambda_min_upper >= float(ev[0]) * (1 - 1e-8)
    assert rel(Kop, reverse_truth(model, x)) < 1e-10
    said = [str(w.message) for w in caught if MISMATCH in str(w.message)]
    assert len(said) == 2 and all("no_grad" in m and "register_hook" in m for m in said)


def test_check_runs_once_per_operator(monkeypatch):
    """The adjointness check runs before the first product only (not per product, not after
    release or rechunk), and outside the products themselves."""
    model, x = build(GradScale)
    calls = []
    check = NTKOperator._check_adjoint

    def counting(self: NTKOperator) -> None:
        calls.append(self)
        check(self)

    monkeypatch.setattr(NTKOperator, "_check_adjoint", counting)
    op = NTKOperator(model, x, dtype=torch.float64, linearize=False)
    assert calls == []  # building the operator runs no pass
    V = torch.randn(op.n, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=MISMATCH):
        op.matvec(V)
    op.matvec(V)
    op.release()
    op.matvec(V)
    op.rechunk(2)
    op.matvec(V)
    assert calls == [op]


def _quiet(fn):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    bad = [str(w.message) for w in caught if MISMATCH in str(w.message)]
    assert not bad, bad
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ordinary_models_pass_the_check(dtype):
    """No false alarm in either precision: an MLP, a timm ViT and a Hugging Face GPT-2 (whose
    float32 forward/reverse rounding differences are ~1e-6 of ‖J‖, against √eps = 3.5e-4)."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 3))
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=4
    )
    cfg = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0
    )
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 32, (3, 8))
    cases = [(mlp, torch.randn(16, 8)), (vit, torch.randn(6, 3, 8, 8)), (gpt2, {"input_ids": ids})]
    for model, x in cases:
        op = NTKOperator(model, x, dtype=dtype)
        V = torch.randn(op.n, 2, dtype=dtype)
        _quiet(lambda op=op, V=V: op.matvec(V))
        assert op._forward_ad  # forward-mode products kept


class Float32Inside(nn.Module):
    """Normalises and softmaxes in float32 whatever the weights' dtype (as LLaMA's RMSNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        f = h.float()
        f = torch.softmax(f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6), -1)
        return self.b(10 * f.to(h.dtype))


def test_float64_probe_of_a_float32_forward_passes_the_check():
    """The tolerance follows the coarsest arithmetic of the forward: here the modes differ by
    3.4e-8 of ‖J‖, above float64's √eps (1.5e-8) but far below float32's."""
    torch.manual_seed(0)
    model, x = Float32Inside().double(), torch.randn(20, 8, dtype=torch.float64)
    op = NTKOperator(model, x, dtype=torch.float64)
    _quiet(lambda: op.matvec(torch.randn(op.n, 2, dtype=torch.float64)))
    assert op._forward_ad


def test_active_dropout_is_compared_with_itself():
    """eval_mode=False with dropout: the check's JVP and VJP draw the same mask, so random
    passes are not taken for a no_grad model (and the caller's RNG is untouched)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (eval_mode=False with dropout: K is random)
        op = NTKOperator(model, x, eval_mode=False)
    state = torch.get_rng_state()
    _quiet(lambda: op._check_adjoint())
    assert torch.equal(torch.get_rng_state(), state)
    assert op._forward_ad


def test_custom_function_without_vmap_rule_runs_by_columns():
    """Block products (k > 1) of a Function without vmap support run column by column, with
    one warning, and equal the truth (before: torch's "does not have vmap support" error)."""
    model, x = build(NoVmapNet, n=12)
    K = reverse_truth(model, x)
    ev = torch.linalg.eigvalsh(K)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = ntk_spectrum(model, x, method="lanczos", dtype=torch.float64)
    messages = [str(w.message) for w in caught]
    assert sum(NO_VMAP in m for m in messages) == 1, messages
    assert s.converged
    assert s.lambda_max == pytest.approx(float(ev[-1]), rel=1e-8)
    assert s.lambda_min == pytest.approx(float(ev[0]), rel=1e-8)
    op = NTKOperator(model, x, dtype=torch.float64)
    V = torch.randn(op.n, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = op.matvec(V)
    assert any(NO_VMAP in str(w.message) for w in caught)
    assert rel(out, K @ V) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per operator
        assert rel(op.matvec(V), K @ V) < 1e-10
