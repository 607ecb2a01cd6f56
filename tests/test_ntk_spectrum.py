"""ntk_spectrum accuracy against dense float64 truth (explicit reverse-mode Jacobian, eigh).

Targets (issue 3): exact path κ rel. error <= 1e-6; iterative path λ_max rel. error <= 1e-4 within
30 products, λ_min and κ rel. error <= 1e-3 once converged; on two-layer ReLU/ReGLU nets, a tiny
timm ViT and a tiny HF GPT-2 (token ids), each with and without a GLU MLP.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import tiny_bert_classifier
from torch import nn

from glu_probe.ntk import NTKOperator, NTKRankWarning, NTKSpectrum, ntk_matrix, ntk_spectrum
from glu_probe.ntk.dense import jacobian_rounding_estimate, jacobian_rows
from glu_probe.ntk.functional import ProbeFunction, probe_copy_bytes
from glu_probe.ntk.spectrum import AUTO_DENSE_MAX_ROWS

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- truth
def pntk_rows(out) -> torch.Tensor:
    y = out if isinstance(out, torch.Tensor) else out["logits"]
    return (y.sum(-1) / math.sqrt(y.shape[-1])).reshape(-1)


def true_eigenvalues(model: nn.Module, inputs) -> torch.Tensor:
    """Ascending float64 eigenvalues of J Jᵀ, J from torch.autograd.functional.jacobian."""
    m = copy.deepcopy(model).double().eval()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    ps = tuple(p.detach() for _, p in m.named_parameters() if p.requires_grad)
    call = ((), inputs) if isinstance(inputs, dict) else ((inputs.double(),), {})

    def f(*theta):
        return pntk_rows(torch.func.functional_call(m, dict(zip(names, theta, strict=True)), *call))

    J = torch.autograd.functional.jacobian(f, ps)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1)
    return torch.linalg.eigvalsh(J @ J.T)


def rel(a: float, b: float) -> float:
    return abs(a / b - 1.0)


# ----------------------------------------------------------------------------- models
class TwoLayer(nn.Module):
    """The paper's nets: z = V φ(W x) (ReLU) and z = V (φ(W x) ⊙ U x) (ReGLU)."""

    def __init__(self, d: int, m: int, glu: bool) -> None:
        super().__init__()
        self.W = nn.Linear(d, m, bias=False)
        self.U = nn.Linear(d, m, bias=False) if glu else None
        self.V = nn.Linear(m, 1, bias=False)

    def forward(self, x):
        h = torch.relu(self.W(x))
        return self.V(h * self.U(x) if self.U is not None else h)


def two_layer(glu: bool, n: int = 256):
    torch.manual_seed(0)
    x = torch.randn(n, 16)
    return TwoLayer(16, 64, glu), x / x.norm(dim=1, keepdim=True)


def vit(glu: bool):
    import timm
    from timm.layers import SwiGLU

    torch.manual_seed(0)
    kw = dict(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=4)
    if glu:
        kw.update(mlp_layer=SwiGLU, act_layer=nn.SiLU)
    model = timm.models.vision_transformer.VisionTransformer(**kw)
    return model, torch.randn(40, 3, 8, 8)


class GatedGPT2MLP(nn.Module):
    """ReGLU MLP for a GPT-2 block, built by hand: c_proj(relu(x W_g) ⊙ (x W_u))."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, h)
        self.up = nn.Linear(d, h)
        self.c_proj = nn.Linear(h, d)

    def forward(self, x):
        return self.c_proj(torch.relu(self.gate(x)) * self.up(x))


def gpt2(glu: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=32,
        n_positions=8,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    if glu:
        for block in model.transformer.h:
            block.mlp = GatedGPT2MLP(16, 32)
    ids = torch.randint(0, 32, (5, 8))
    ids[:, 0] = torch.arange(5)  # equal prefixes would give equal rows (causal): K singular
    return model, {"input_ids": ids}


MODELS = {
    "relu": lambda: two_layer(False),
    "reglu": lambda: two_layer(True),
    "vit": lambda: vit(False),
    "vit-swiglu": lambda: vit(True),
    "gpt2": lambda: gpt2(False),
    "gpt2-reglu": lambda: gpt2(True),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    model, inputs = MODELS[request.param]()
    return request.param, model, inputs, true_eigenvalues(model, inputs)


# ----------------------------------------------------------------------------- accuracy
def test_dense_path_exact(case):
    name, model, inputs, ev = case
    s = ntk_spectrum(model, inputs, method="dense")
    kappa = float(ev[-1] / ev[0])
    assert s.method == "dense" and s.converged and s.n_rows == ev.numel()
    assert rel(s.condition_number, kappa) <= 1e-6, name
    assert rel(s.lambda_max, float(ev[-1])) <= 1e-10
    torch.testing.assert_close(s.eigenvalues, ev, rtol=0, atol=1e-10 * float(ev[-1]))
    # the float64 rounding allowance n·ε·λ_max, in the residuals and the bounds
    allowance = ev.numel() * torch.finfo(torch.float64).eps * s.lambda_max
    assert s.residual_max == s.residual_min == pytest.approx(allowance, rel=1e-12)
    assert s.lambda_min_upper == s.lambda_min + s.residual_min >= float(ev[0])
    assert s.condition_number_lower <= kappa <= s.condition_number * (1 + 1e-6)
    assert s.numerical_rank == ev.numel()
    p = ev / ev.sum()
    assert s.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)


def test_dense_vectors_are_the_extreme_eigenvectors_on_request():
    """Default: eigenvalues only (eigvalsh), no vectors. dense_vectors=True: the same
    eigenvalues plus the extreme eigenvectors (largest, smallest, ...), checked as
    ‖K v − λ v‖ ≤ 1e-10·λ_max against an explicit float64 J Jᵀ, and usable as a warm start."""
    model, inputs = two_layer(True)
    ev = true_eigenvalues(model, inputs)
    plain = ntk_spectrum(model, inputs, method="dense")
    assert plain.ritz_vectors is None
    s = ntk_spectrum(model, inputs, method="dense", dense_vectors=True, block_size=3)
    torch.testing.assert_close(s.eigenvalues, plain.eigenvalues, rtol=0, atol=1e-12 * float(ev[-1]))
    j = _jacobian(model, inputs, torch.float64)
    K = j @ j.T
    V = s.ritz_vectors
    assert V is not None and V.shape == (ev.numel(), 6)
    lams = torch.stack([ev[-1], ev[0], ev[-2], ev[1], ev[-3], ev[2]])
    resid = (K @ V.double() - V.double() * lams).norm(dim=0)
    assert float(resid.max()) <= 1e-10 * float(ev[-1])
    warm = ntk_spectrum(model, inputs, method="lanczos", dtype=torch.float64, warm_start=s)
    cold = ntk_spectrum(model, inputs, method="lanczos", dtype=torch.float64)
    assert warm.n_matvecs < cold.n_matvecs
    with pytest.raises(ValueError, match="dense_vectors"):
        ntk_spectrum(model, inputs, method="dense", dense_vectors="yes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- mixed precision
def _jacobian(model: nn.Module, inputs, dtype: torch.dtype) -> torch.Tensor:
    probe = ProbeFunction(model, inputs, dtype=dtype)
    with probe.session():
        parts = jacobian_rows(probe)(0, probe.batch_size)
    return torch.cat([j.reshape(probe.n_rows, -1) for j in parts], dim=1).double()


def test_rounding_estimate_covers_the_float32_jacobian_error(case):
    """The premise of the mixed path: ‖J₃₂ − J₆₄‖ ≤ 16·u₃₂·‖J‖_F, measured on every model."""
    name, model, inputs, _ = case
    j64 = _jacobian(model, inputs, torch.float64)
    j32 = _jacobian(model, inputs, torch.float32)
    err_f = float((j32 - j64).norm())
    estimate = jacobian_rounding_estimate(float((j64 * j64).sum()), torch.float32)
    assert 0.0 < err_f <= estimate, name
    assert float(torch.linalg.matrix_norm(j32 - j64, ord=2)) <= err_f
    # the mixed K of the row strategy is the exact Gram matrix of the float32 rows (float32
    # products are exact in float64), not a float32 GEMM; a budget for one panel computes the
    # same rows in one call
    kw = dict(jacobian_dtype=torch.float32, memory_budget=2**30)
    K = ntk_matrix(model, inputs, strategy="jacobian", **kw)
    torch.testing.assert_close(K, j32 @ j32.T, rtol=1e-12, atol=1e-12 * float(K.diag().max()))
    # The structured strategy's K is the exact Gram of rows J̃ expanded from float32 factors:
    # ‖J̃ − J‖ is within the same estimate, so ‖K̃ − K‖₂ ≤ 2‖J‖₂·δ + δ².
    try:
        Ks = ntk_matrix(model, inputs, strategy="structured", **kw)
    except ValueError as err:  # GPT-2: no Linear layer whose factors beat its rows
        assert name.startswith("gpt2") and "does not apply" in str(err), name
        return
    norm_j = float(torch.linalg.matrix_norm(j64, ord=2))
    gap = float(torch.linalg.matrix_norm(Ks - j64 @ j64.T, ord=2))
    assert gap <= 2 * norm_j * estimate + estimate**2, name


def test_mixed_precision_dense_path_within_its_rounding_bound(case):
    """float32 Jacobian, float64 K and eigh: every eigenvalue within 2√θ·δ + δ² of the truth."""
    name, model, inputs, ev = case
    s = ntk_spectrum(model, inputs, method="dense", jacobian_dtype=torch.float32)
    assert s.method == "dense" and s.precision == "mixed" and s.converged
    theta = s.eigenvalues
    assert theta is not None
    delta = jacobian_rounding_estimate(float(theta.sum()), torch.float32)
    bound = 2.0 * theta.clamp_min(0.0).sqrt() * delta + delta**2
    assert bool(((theta - ev).abs() <= bound).all()), name
    # (plus the float64 rounding allowance of K's assembly and eigh, n·ε₆₄·λ_max)
    s64 = theta.numel() * torch.finfo(torch.float64).eps * float(theta[-1])
    assert s.residual_max == pytest.approx(float(bound[-1]) + s64, rel=1e-6)
    assert s.residual_min == pytest.approx(float(bound[0]) + s64, rel=1e-6)
    kappa = float(ev[-1] / ev[0])
    assert s.lambda_min_upper >= float(ev[0]) and s.condition_number_lower <= kappa
    # the bound is loose (E is not aligned with the extreme singular vectors): the error itself
    # stays small even for the ViT's κ ≈ 1e6
    assert rel(s.condition_number, kappa) <= 1e-4, name
    assert s.numerical_rank == ev.numel()


def test_mixed_path_keeps_float32_rows_in_the_panel_where_float64_rows_do_not_fit():
    """One sample, 16 output rows, a budget below its float64 rows but above its float32 rows
    plus the widened Gram chunks: the Jacobian strategy still runs (float32 panel, widened a
    chunk at a time), and K is exactly the float64 Gram matrix of the float32 rows."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(32, 64), nn.Tanh()]
    for _ in range(5):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(64, 16))
    x = torch.randn(1, 32)
    rows = {}
    for dt in (torch.float32, torch.float64):
        probe = ProbeFunction(model, x, output="full", dtype=dt)
        with probe.session():
            parts = jacobian_rows(probe)(0, 1)
        rows[dt] = torch.cat([j.reshape(16, -1) for j in parts], dim=1).double()
    p = sum(q.numel() for q in model.parameters())
    # (+ the probe's float64 and float32 copies of the parameters and inputs)
    budget = 2_800_000 + (p + x.numel()) * (8 + 4)
    assert 16 * p * 8 + 16 * 16 * 8 + p * 8 > budget  # float64 rows do not fit
    with pytest.raises(ValueError, match="too small for the Jacobian strategy"):
        ntk_matrix(model, x, output="full", strategy="jacobian", memory_budget=budget)
    K = ntk_matrix(
        model,
        x,
        output="full",
        strategy="jacobian",
        memory_budget=budget,
        jacobian_dtype=torch.float32,
    )
    j32 = rows[torch.float32]
    torch.testing.assert_close(K, j32 @ j32.T, rtol=1e-13, atol=1e-13 * float(K.diag().max()))
    s = ntk_spectrum(
        model, x, output="full", method="dense", memory_budget=budget, jacobian_dtype=torch.float32
    )
    assert s.precision == "mixed"
    truth = torch.linalg.eigvalsh(rows[torch.float64] @ rows[torch.float64].T)
    assert rel(s.condition_number, float(truth[-1] / truth[0])) <= 1e-5


def test_symmetric_gram_panel_and_mixed_path_at_512_rows():
    """Mixed and float64 dense paths agree on a 512-row K built from one-triangle panels."""
    torch.manual_seed(0)
    model, x = two_layer(False, n=512)
    j64 = _jacobian(model, x, torch.float64)
    big = 2**30  # one panel of 256 samples: the symmetric (three-block) Gram
    torch.testing.assert_close(ntk_matrix(model, x, memory_budget=big), j64 @ j64.T)
    s = ntk_spectrum(model, x, method="dense", memory_budget=big, jacobian_dtype=torch.float32)
    ev = torch.linalg.eigvalsh(j64 @ j64.T)
    assert rel(s.condition_number, float(ev[-1] / ev[0])) <= 1e-6


# ----------------------------------------------------------------------------- HF masks
def _bert():
    torch.manual_seed(0)
    model = tiny_bert_classifier(vocab_size=50).eval()
    ids = torch.randint(0, 50, (6, 8), generator=torch.Generator().manual_seed(1))
    return model, ids


def _batch_truth(model: nn.Module, batch: dict) -> torch.Tensor:
    """K from the Jacobian of the whole batch (no per-sample vmap), float64."""
    m = copy.deepcopy(model).double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    ps = tuple(p.detach() for _, p in m.named_parameters() if p.requires_grad)

    def f(*theta):
        out = torch.func.functional_call(m, dict(zip(names, theta, strict=True)), (), batch)
        return pntk_rows(out)

    J = torch.autograd.functional.jacobian(f, ps)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1)
    return J @ J.T


def test_hf_attention_mask_all_ones_is_vmapped_as_a_constant():
    """HF checks masks with data-dependent .all(): an all-ones mask is passed unbatched, so the
    per-sample vmap works (no fallback warning) and K is that of the unmasked batch."""
    model, ids = _bert()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        K = ntk_matrix(model, batch, strategy="jacobian", memory_budget=2**26)
    torch.testing.assert_close(K, _batch_truth(model, batch), rtol=1e-10, atol=1e-12)
    plain = ntk_matrix(model, {"input_ids": ids}, strategy="jacobian", memory_budget=2**26)
    torch.testing.assert_close(K, plain, rtol=1e-12, atol=0.0)


def test_hf_padding_mask_falls_back_to_groups_of_equal_masks():
    """Padded samples: the masks differ and vmap over them fails inside HF; within groups of
    samples with equal masks the mask is a constant and vmap works (here: 3 groups)."""
    model, ids = _bert()
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the grouping is silent: as fast
        K = ntk_matrix(model, batch, strategy="jacobian", memory_budget=2**26)
    torch.testing.assert_close(K, _batch_truth(model, batch), rtol=1e-10, atol=1e-12)
    # the path taken is the grouped one: per-sample vmap over the whole block fails
    from glu_probe.ntk.dense import _mask_groups

    probe = ProbeFunction(model, batch)
    assert [g.tolist() for g in _mask_groups(probe, 0, 6)] == [[0, 2, 4], [1], [3, 5]]


class _Branchy(nn.Module):
    """Data-dependent control flow on the input itself: no vmap over samples at all."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        scale = 2.0 if float(x.sum()) > 0 else 0.5
        return self.lin(x * scale)


def test_data_dependent_model_falls_back_to_one_sample_at_a_time():
    torch.manual_seed(0)
    model, x = _Branchy(), torch.randn(6, 4)
    with pytest.warns(RuntimeWarning, match="falling back to jacrev one sample at a time") as rec:
        K = ntk_matrix(model, x, strategy="jacobian", memory_budget=2**26)
    fallbacks = [str(w.message) for w in rec if "falling back" in str(w.message)]
    assert len(fallbacks) == 1 and fallbacks[0].startswith("vmap(jacrev) within groups")
    # truth: each sample's gradient row by plain autograd, float64
    ref = copy.deepcopy(model).double()
    grads = []
    for xi in x.double():
        out = pntk_rows(ref(xi[None])).sum()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, ref.parameters())]))
    J = torch.stack(grads)
    torch.testing.assert_close(K, J @ J.T, rtol=1e-10, atol=1e-12)


def test_mixed_request_with_operator_strategy_is_float64(monkeypatch):
    """When no Jacobian rows fit the budget, K comes from float64 products: precision float64.
    (The structured strategy is switched off: its factors would fit this budget.)"""
    import glu_probe.ntk.structured as structured

    monkeypatch.setattr(structured, "structured_ntk", lambda *a, **k: None)
    model, x = two_layer(True, n=64)
    p = sum(q.numel() for q in model.parameters())
    # K + 5 rows (a 3-sample panel is < 1/8 of the rows) + the probe's float64 and float32
    # copies of its parameters, buffers and inputs
    probe = ProbeFunction(model, x, dtype=torch.float64)
    copies = probe_copy_bytes(probe) + probe_copy_bytes(probe, 4)
    eigh = (64 * 64 + 8 * 64) * 8  # the eigendecomposition's copy of K, reserved
    budget = 64 * 64 * 8 + 5 * p * 8 + copies + eigh
    s = ntk_spectrum(model, x, method="dense", memory_budget=budget, jacobian_dtype=torch.float32)
    assert s.precision == "float64" and s.residual_min <= 64 * 2.3e-16 * s.lambda_max
    ev = true_eigenvalues(model, x)
    assert rel(s.condition_number, float(ev[-1] / ev[0])) <= 1e-9


def test_bad_jacobian_dtype():
    model, x = two_layer(False, n=8)
    with pytest.raises(ValueError, match="jacobian_dtype"):
        ntk_spectrum(model, x, jacobian_dtype=torch.float16)
    with pytest.raises(ValueError, match="jacobian_dtype"):
        ntk_matrix(model, x, jacobian_dtype=torch.int64)


def test_lanczos_lambda_max_within_30_matvecs(case):
    name, model, inputs, ev = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # λ_min is not asked to converge here
        s = ntk_spectrum(model, inputs, method="lanczos", which="largest", max_matvecs=30)
    assert s.n_matvecs <= 30
    assert rel(s.lambda_max, float(ev[-1])) <= 1e-4, name
    assert s.lambda_max <= float(ev[-1]) * (1 + 1e-6)  # interlacing: θ_max <= λ_max


def test_lanczos_lambda_min_and_kappa_once_converged(case):
    name, model, inputs, ev = case
    # float64 products: the ViTs have κ ≈ 1e5-1e6, beyond what float32 products resolve to 1e-3
    s = ntk_spectrum(model, inputs, method="lanczos", dtype=torch.float64, max_matvecs=400)
    assert s.converged, name
    kappa = float(ev[-1] / ev[0])
    assert rel(s.lambda_min, float(ev[0])) <= 1e-3, name
    assert rel(s.condition_number, kappa) <= 1e-3, name
    assert s.residual_min <= 1e-3 * s.lambda_max


@pytest.mark.parametrize("glu", [False, True])
def test_lanczos_float32_two_layer_nets(glu):
    """The paper's nets in the default float32, with fewer products than rows."""
    model, x = two_layer(glu)
    ev = true_eigenvalues(model, x)
    s = ntk_spectrum(model, x, method="lanczos", max_matvecs=400)
    assert s.converged and s.n_matvecs < x.shape[0]
    assert rel(s.lambda_min, float(ev[0])) <= 1e-3
    assert rel(s.condition_number, float(ev[-1] / ev[0])) <= 1e-3


def test_float32_precision_floor_is_flagged():
    """κ ≈ 1e7: float32 products cannot resolve λ_min; the result says so instead of lying."""
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    model = TwoLayer(6, 48, False)
    x = x / x.norm(dim=1, keepdim=True)
    ev = true_eigenvalues(model, x)
    with pytest.warns(RuntimeWarning) as record:
        s = ntk_spectrum(model, x, method="lanczos", max_matvecs=400)
    assert any("float64" in str(w.message) for w in record)
    assert s.lambda_min_upper >= float(ev[0]) * (1 - 1e-6)  # still a valid upper bound
    assert s.condition_number == math.inf or s.condition_number <= float(ev[-1] / ev[0]) * 1.01


# ----------------------------------------------------------------------------- honesty
def ill_conditioned():
    torch.manual_seed(1)
    x = torch.randn(96, 4)
    x = x / x.norm(dim=1, keepdim=True)
    return TwoLayer(4, 64, False), x


def test_unconverged_lambda_min_is_reported_with_certified_bounds():
    model, x = ill_conditioned()
    ev = true_eigenvalues(model, x)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        s = ntk_spectrum(model, x, method="lanczos", max_matvecs=12, block_size=4)
    assert not s.converged and s.n_matvecs <= 12
    assert s.lambda_min_upper >= float(ev[0])  # θ_min >= λ_min always
    assert s.condition_number_lower <= float(ev[-1] / ev[0])  # certified lower bound on κ
    assert s.residual_min > 0


def test_warm_start_needs_fewer_products():
    model, x = two_layer(True)
    cold = ntk_spectrum(model, x, method="lanczos")
    warm = ntk_spectrum(model, x, method="lanczos", warm_start=cold)
    assert cold.converged and warm.converged
    assert warm.n_matvecs < cold.n_matvecs
    assert rel(warm.condition_number, cold.condition_number) < 1e-3
    with pytest.warns(RuntimeWarning, match="warm_start ignored"):
        ntk_spectrum(model, x[:10], method="lanczos", warm_start=cold)


def test_near_null_space_is_flagged_not_clamped():
    torch.manual_seed(0)
    model = TwoLayer(3, 5, False)  # P = 20 parameters, 40 rows: rank <= 20
    x = torch.randn(40, 3)
    ev = true_eigenvalues(model, x)
    with pytest.warns(NTKRankWarning, match="near-null space"):
        s = ntk_spectrum(model, x, method="dense")
    tol = float(ev[-1]) * 40 * torch.finfo(torch.float64).eps
    assert s.numerical_rank == int((ev > tol).sum()) <= 20
    assert s.lambda_min == float(s.eigenvalues[0])  # as computed, not clamped to 0
    assert abs(s.lambda_min) < tol
    assert s.condition_number == math.inf or s.condition_number > 1e10


def test_mixed_precision_rank_uses_the_rounding_tolerance():
    """Mixed path: eigenvalues below δ² (singular values below the rounding estimate) do not
    count towards the rank, and the warning points to float64 rows."""
    torch.manual_seed(0)
    model = TwoLayer(3, 5, False)  # P = 20, 40 rows: rank <= 20
    x = torch.randn(40, 3)
    ev = true_eigenvalues(model, x)
    with pytest.warns(NTKRankWarning, match="jacobian_dtype=torch.float64"):
        s = ntk_spectrum(model, x, method="dense", jacobian_dtype=torch.float32)
    assert s.eigenvalues is not None
    delta = jacobian_rounding_estimate(float(s.eigenvalues.sum()), torch.float32)
    assert s.numerical_rank == int((s.eigenvalues > delta**2).sum())
    assert s.numerical_rank == int((ev > delta**2).sum()) <= 20


def test_lanczos_flags_numerically_zero_lambda_min():
    torch.manual_seed(0)
    model = TwoLayer(3, 5, False)
    x = torch.randn(40, 3)
    with pytest.warns(NTKRankWarning):
        s = ntk_spectrum(model, x, method="lanczos", dtype=torch.float64, max_matvecs=60)
    assert s.condition_number == math.inf


def test_auto_method_choice():
    model, x = two_layer(False)
    assert ntk_spectrum(model, x).method == "dense"
    # a budget that cannot hold K (and one product) forces the matrix-free path, which keeps
    # to it (a short Krylov basis here); one that cannot hold even that is a clear error
    p = sum(q.numel() for q in model.parameters())
    budget = 256 * 256 * 8 + 4 * p * 8 - 1
    s = ntk_spectrum(model, x, memory_budget=budget, max_matvecs=40)
    assert s.method == "lanczos"
    with pytest.raises(ValueError, match=r"the probe's copies .* take 20736 bytes"):
        ntk_spectrum(model, x, memory_budget=1000)  # (refused before anything is copied)
    with pytest.raises(ValueError, match="cannot hold one Lanczos product"):
        ntk_spectrum(model, x, memory_budget=40_000)
    assert AUTO_DENSE_MAX_ROWS >= 512


def test_float_memory_budget_accepted_like_ntk_matrix():
    # ntk_matrix took 2e6-style budgets while ntk_spectrum refused them: both take any
    # positive, finite number of bytes now, and a float budget acts as its int part
    model, x = two_layer(False)
    a = ntk_spectrum(model, x, memory_budget=4e6, jacobian_dtype=torch.float32)
    b = ntk_spectrum(model, x, memory_budget=4_000_000, jacobian_dtype=torch.float32)
    assert a.method == b.method == "dense"
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=0)
    for bad in (0, -5.0, float("inf"), float("nan"), True, "4e6"):
        with pytest.raises(ValueError, match="memory_budget must be a positive, finite number"):
            ntk_spectrum(model, x, memory_budget=bad)


def test_dense_memory_budget_strategies_agree():
    model, x = two_layer(True)
    ref = ntk_matrix(model, x, strategy="jacobian")
    p = sum(q.numel() for q in model.parameters())
    tight = 256 * 256 * 8 + 96 * p * 8  # K plus 96 Jacobian rows: panels of 48, blocks of 24
    torch.testing.assert_close(ntk_matrix(model, x, memory_budget=tight), ref)
    torch.testing.assert_close(ntk_matrix(model, x, strategy="operator"), ref)
    with pytest.raises(ValueError, match="memory_budget"):
        ntk_matrix(model, x, memory_budget=1000)


def test_as_dict_is_all_floats():
    model, x = two_layer(False)
    d = ntk_spectrum(model, x).as_dict()
    assert all(isinstance(v, float) for v in d.values())
    assert d["converged"] == 1.0 and d["n_rows"] == 256.0
    assert set(d) >= {"lambda_max", "lambda_min", "condition_number", "effective_rank"}
    assert isinstance(NTKSpectrum.__dataclass_fields__["ritz_vectors"], object)


def test_bad_method():
    model, x = two_layer(False)
    with pytest.raises(ValueError, match="method must be"):
        ntk_spectrum(model, x, method="eigsh")


@pytest.mark.parametrize("glu", [False, True], ids=["relu", "reglu"])
def test_lanczos_effective_rank_by_deflated_slq(glu):
    """Iterative path: SLQ (top Ritz pairs deflated) estimates the exact effective rank.

    The paper's ReLU NTK has a rank-one spike (β r rᵀ) that makes plain 4-probe Hutchinson
    estimates off by tens of percent; deflating the converged top Ritz pairs brings the fixed-seed
    estimate within 10% of the float64 truth.
    """
    from glu_probe.ntk.density import effective_rank

    model, x = two_layer(glu, n=128)
    truth = effective_rank(true_eigenvalues(model, x))
    s = ntk_spectrum(model, x, method="lanczos", which="largest", slq_probes=4, dtype=torch.float64)
    assert s.effective_rank_method == "slq"
    assert rel(s.effective_rank, truth) < 0.10
    assert s.density_nodes is not None and s.density_weights is not None
    assert float(s.density_weights.sum()) == pytest.approx(1.0, abs=0.05)
    again = ntk_spectrum(
        model, x, method="lanczos", which="largest", slq_probes=4, dtype=torch.float64
    )
    assert again.effective_rank == s.effective_rank  # fixed probes: a smooth series in a run
    plain = ntk_spectrum(model, x, method="lanczos", which="largest", dtype=torch.float64)
    assert math.isnan(plain.effective_rank) and plain.effective_rank_method == "none"
    assert plain.n_matvecs < s.n_matvecs  # SLQ products are counted
    dense = ntk_spectrum(model, x, method="dense")
    assert dense.effective_rank_method == "exact" and dense.density_nodes is None
    with pytest.raises(ValueError, match="slq_probes"):
        ntk_spectrum(model, x, slq_probes=-1)
    with pytest.raises(ValueError, match="slq_steps"):
        ntk_spectrum(model, x, slq_steps=0)


@pytest.mark.parametrize("glu", [False, True])
def test_small_probe_spans_the_whole_space_instead_of_slq(glu, monkeypatch):
    """which="both" with SLQ asked for and n <= 2·slq_probes·slq_steps: Lanczos spans the whole
    space (n products, not convergence + quadrature), so every eigenvalue matches float64 dense
    truth and the effective rank is exact; larger n keeps the SLQ estimate. The span is carried
    by blocks of FULL_SPAN_BLOCK columns, not block_size: 4 block products for n = 64."""
    from glu_probe.ntk import spectrum as spectrum_mod
    from glu_probe.ntk.density import effective_rank

    widths: list[int] = []
    matvec = NTKOperator.matvec

    def counting(self, V):
        widths.append(1 if V.ndim == 1 else V.shape[1])
        return matvec(self, V)

    monkeypatch.setattr(NTKOperator, "matvec", counting)
    model, x = two_layer(glu, n=64)
    truth = true_eigenvalues(model, x)
    s = ntk_spectrum(model, x, method="lanczos", slq_probes=4, slq_steps=10, dtype=torch.float64)
    assert s.effective_rank_method == "exact" and s.converged and s.n_matvecs <= 64 + 4
    assert spectrum_mod.FULL_SPAN_BLOCK == 16
    assert widths == [16, 16, 16, 16] and sum(widths) == s.n_matvecs
    assert s.eigenvalues is not None
    torch.testing.assert_close(
        s.eigenvalues.sort().values, truth.sort().values, rtol=1e-9, atol=1e-9 * float(truth[-1])
    )
    assert s.effective_rank == pytest.approx(float(effective_rank(truth)), rel=1e-9)
    assert rel(s.condition_number, float(truth[-1] / truth[0])) < 1e-8
    # beyond the threshold (n = 128 > 2·2·10): convergence, then the quadrature estimate
    model, x = two_layer(glu, n=128)
    est = ntk_spectrum(model, x, method="lanczos", slq_probes=2, slq_steps=10, dtype=torch.float64)
    assert est.effective_rank_method == "slq" and est.eigenvalues is None


def test_full_span_block_width_respects_free_memory(monkeypatch):
    """The full-span block is widened only while its VJP outputs (width · n_params numbers) fit
    in 1/8 of the free memory, and never narrower than block_size."""
    from glu_probe.ntk import spectrum as spectrum_mod

    model, x = two_layer(False, n=64)
    probe = ProbeFunction(model, x, dtype=torch.float32)
    column = probe.n_params * 4
    monkeypatch.setattr(spectrum_mod, "_available_bytes", lambda device: 8 * 6 * column)
    assert spectrum_mod._full_span_block(probe, 64, 4) == 6
    assert spectrum_mod._full_span_block(probe, 64, 8) == 8
    monkeypatch.setattr(spectrum_mod, "_available_bytes", lambda device: 2**40)
    assert spectrum_mod._full_span_block(probe, 64, 4) == 16
    assert spectrum_mod._full_span_block(probe, 10, 4) == 10
    assert spectrum_mod._full_span_block(probe, 64, 32) == 32


def test_full_span_block_width_by_device_and_memory(monkeypatch):
    """16 columns on the CPU, FULL_SPAN_BLOCK_CUDA (64) on CUDA, never fewer than block_size,
    never more than n, and no wider than 1/8 of free memory holds the block's VJP outputs."""
    from types import SimpleNamespace

    from glu_probe.ntk import spectrum as spectrum_mod

    free = {"bytes": 2**40}
    monkeypatch.setattr(spectrum_mod, "_available_bytes", lambda device: free["bytes"])

    def width(device: str, n: int = 64, block: int = 4, params: int = 10**6) -> int:
        probe = SimpleNamespace(n_params=params, dtype=torch.float32, device=torch.device(device))
        return spectrum_mod._full_span_block(probe, n, block)  # type: ignore[arg-type]

    assert spectrum_mod.FULL_SPAN_BLOCK_CUDA == 64
    assert width("cpu") == 16 and width("cuda") == 64
    assert width("cuda", n=40) == 40 and width("cpu", n=8, block=4) == 8
    free["bytes"] = 8 * 20 * 4 * 10**6  # 1/8 of free memory holds 20 float32 columns
    assert width("cuda") == 20 and width("cpu") == 16
    free["bytes"] = 0
    assert width("cuda") == 4 and width("cuda", block=6) == 6


@pytest.mark.parametrize("chunk", [7, 64, 2**20])
def test_mixed_gram_packs_parameters_into_chunks_exactly(monkeypatch, chunk):
    """float32 rows of several parameters (sizes 1, 3, 50, 200), widened to float64 in column
    chunks that span parameter boundaries: the float64 Gram of the float32 rows, for A Aᵀ and
    for A Bᵀ with different row counts."""
    from glu_probe.ntk import dense

    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (3,), (5, 10), (200,)]
    a = tuple(torch.randn(5, *s, generator=gen) for s in shapes)
    b = tuple(torch.randn(3, *s, generator=gen) for s in shapes)
    flat_a = torch.cat([x.reshape(5, -1) for x in a], 1).double()
    flat_b = torch.cat([x.reshape(3, -1) for x in b], 1).double()
    for left, right, ref in ((a, a, flat_a @ flat_a.T), (a, b, flat_a @ flat_b.T)):
        # (the chunk passed explicitly: a monkeypatched module constant never reached the
        # default argument, so until 2026-11-28 every case here ran with 2**20)
        got = dense._gram(left, right, torch.float64, chunk_elements=chunk * 5)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-13)


def test_widening_chunk_is_larger_on_cuda_and_stays_within_the_budget():
    """A GPU runs each widening chunk as a GEMM and two copies of a few microseconds: 2**20
    numbers a chunk made a GPT-2-small probe 5,253 GEMMs and host-bound (350 ms for 132 ms of
    GPU time, H200). On CUDA the cap is 2**26, still at most 1/16 of what the budget leaves
    beside K; the CPU keeps 2**20."""
    from types import SimpleNamespace

    from glu_probe.ntk import dense

    def probe(device):
        return SimpleNamespace(n_rows=64, device=torch.device(device))

    big = 2**40
    assert dense._widen_chunk(probe("cuda"), 8, big) == 2**26
    assert dense._widen_chunk(probe("cpu"), 8, big) == 2**20
    k_bytes = 64 * 64 * 8
    budget = k_bytes + 16 * 8 * 3 * 2**20  # room for 3·2**20 numbers a side
    assert dense._widen_chunk(probe("cuda"), 8, budget) == 3 * 2**20
    assert dense._widen_chunk(probe("cpu"), 8, budget) == 2**20
    assert dense._widen_chunk(probe("cuda"), 8, k_bytes) == 64  # one column of every row


@pytest.mark.parametrize("kappa", [1e14, 1e18])
def test_dense_bounds_stay_bounds_near_float64_resolution(kappa):
    """K = X Xᵀ with designed singular values (a bias-free linear model, one output): at
    κ = 1e14 the float64 dense path was 2.5e-3 off with no warning, and lambda_min_upper and
    condition_number_lower were λ_min and κ themselves, on the wrong side of the truth. They
    now carry the allowance n·ε·λ_max, and a warning says where ε·κ > 1e-6."""
    n = 24
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, -0.5 * math.log10(kappa), n, dtype=torch.float64)
    X = U @ torch.diag(sigma) @ V.T
    model = nn.Linear(n, 1, bias=False).double()
    true = torch.linalg.svdvals(X).pow(2).flip(0)  # (ascending: accurate small eigenvalues)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = ntk_spectrum(model, X, method="dense", output="full")
    assert s.lambda_min_upper >= float(true[0])
    assert s.condition_number_lower <= float(true[-1] / true[0])
    assert abs(s.lambda_min - float(true[0])) <= s.residual_min
    messages = " ".join(str(w.message) for w in caught)
    assert "eps·κ" in messages or "near-null space" in messages


def test_lanczos_residual_fields_cover_the_products_rounding():
    """float32 products: an eigenvalue lies within residual_max / residual_min of each reported
    end (a review found θ_max 1.03e-5 from λ_max against a residual of 1.025e-5: the products'
    rounding allowance is now in the residual fields, not only in the bounds)."""
    for seed in range(6):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 24), nn.SiLU(), nn.Linear(24, 2))
        x = torch.randn(48, 6)
        ev = true_eigenvalues(model, x)
        s = ntk_spectrum(model, x, method="lanczos", block_size=3, max_matvecs=48)
        assert abs(s.lambda_max - float(ev[-1])) <= s.residual_max, seed
        if s.converged:
            assert abs(s.lambda_min - float(ev[0])) <= s.residual_min, seed


def test_cuda_available_memory_counts_the_allocators_cache(monkeypatch):
    """On CUDA the memory a probe may take is the driver's free memory plus what PyTorch's
    caching allocator reserves but no tensor uses (after some training most of the card). Until
    2026-11-28 only the driver's figure counted: an 80 GB card with 60 GiB reserved and 10 GiB
    allocated gave 18 GiB instead of 68 GiB, and the chosen path depended on the cache (review
    of the CUDA paths; arithmetic, so checked on the CPU)."""
    from glu_probe.ntk.dense import _available_bytes

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (18 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    assert _available_bytes(torch.device("cuda", 0)) == 68 * gib


def test_models_that_cast_inside_their_forward_carry_that_rounding():
    """HF LLaMA computes its RMSNorm, rotary embedding and softmax in float32 whatever the
    weights' dtype, so a float64 probe is float64 only up to float32 rounding: K from
    reverse-mode rows and K from forward-mode products then differ at float32 level. The dense
    and Lanczos results say so (precision "mixed", a RuntimeWarning) and their residuals cover
    that difference; until 2026-11-28 they were labelled float64 with residuals about 800x too
    small (scale review). Models that compute in the probe's dtype keep float64 (GPT-2)."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.models import tiny_gpt2

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
    )
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 50, (1, 24))
    rows = torch.linalg.eigvalsh(ntk_matrix(model, ids, strategy="jacobian", dtype=torch.float64))
    ops = torch.linalg.eigvalsh(ntk_matrix(model, ids, strategy="operator", dtype=torch.float64))
    gap_min, gap_max = float(abs(rows[0] - ops[0])), float(abs(rows[-1] - ops[-1]))
    assert gap_max > 1e3 * 24 * torch.finfo(torch.float64).eps * float(rows[-1])  # not float64
    with pytest.warns(RuntimeWarning, match="computes part of its forward pass in torch.float32"):
        dense = ntk_spectrum(model, ids, method="dense")
    assert dense.precision == "mixed"
    assert gap_min <= dense.residual_min and gap_max <= dense.residual_max
    with pytest.warns(RuntimeWarning, match="computes part of its forward pass"):
        it = ntk_spectrum(model, ids, method="lanczos", dtype=torch.float64, tol=1e-10)
    assert it.precision == "mixed" and it.converged
    assert abs(it.lambda_min - float(rows[0])) <= it.residual_min
    clean = ntk_spectrum(tiny_gpt2(seed=0), torch.randint(0, 50, (1, 16)), method="dense")
    assert clean.precision == "float64"


@pytest.mark.parametrize("strategy", ["jacobian", "structured"])
def test_cuda_widening_cap_keeps_budgets_and_k(monkeypatch, strategy):
    """The CUDA cap on the widening chunk (2**26 numbers) forced on the CPU: the tensors of a
    mixed-precision probe stay within every budget of a ladder (an independent count of live
    tensor bytes), and K is the float64 truth to float32-row accuracy, as with the CPU cap."""
    import warnings

    from glu_probe.ntk import dense, ntk_matrix
    from glu_probe.ntk.functional import LiveTensorBytes

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 384), nn.Tanh(), nn.Linear(384, 384), nn.Tanh(), nn.Linear(384, 2)
    )
    x = torch.randn(48, 32)
    truth = ntk_matrix(model, x, output="full", dtype=torch.float64)
    monkeypatch.setattr(dense, "gram_chunk_elements", lambda device: 2**26)
    accepted = 0
    for budget in (2**22, 2**23, 2**25, 2**27):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with LiveTensorBytes() as live:
                    K = ntk_matrix(
                        model,
                        x,
                        output="full",
                        dtype=torch.float64,
                        jacobian_dtype=torch.float32,
                        memory_budget=budget,
                        strategy=strategy,
                    )
            except ValueError:
                continue
        accepted += 1
        assert live.peak <= budget, (budget, live.peak)
        rel = float((K - truth).abs().max() / truth.abs().max())
        assert rel < 1e-6
    assert accepted >= 2
