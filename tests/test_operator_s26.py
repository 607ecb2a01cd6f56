"""NTKOperator consistency (review, session 26): forward-mode JVPs against reverse-mode VJPs
on models that use ``torch.no_grad()`` or gradient hooks inside forward, and custom autograd
Functions without a vmap rule. Truth: float64 per-row Jacobians from ``torch.autograd``
(reverse mode, as in training) and ``eigvalsh(J Jᵀ)``."""

from __future__ import annotations

import contextlib
import sys
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


# ---------------------------------------------------------------- review, session 26 (second)
def rel_mismatch_truth(model: nn.Module, x: torch.Tensor) -> float:
    """‖J_f − J_r‖_F / ‖J‖_F from dense Jacobians: forward mode (jacfwd, which sees through
    no_grad and skips hooks) against reverse mode (one autograd.grad per output row)."""
    params = dict(model.named_parameters())
    jf = torch.func.jacfwd(lambda p: torch.func.functional_call(model, p, (x,)).reshape(-1))(params)
    Jf = torch.cat([j.reshape(j.shape[0], -1) for j in jf.values()], dim=1)
    out = model(x).reshape(-1)
    Jr = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(o, list(params.values()), retain_graph=True)
                ]
            )
            for o in out
        ]
    )
    return float(torch.linalg.norm(Jf - Jr).detach() / torch.linalg.norm(Jr).detach())


@pytest.mark.parametrize(
    ("cls", "dtype"),
    [
        (NoGradScale, torch.bfloat16),
        (GradScale, torch.bfloat16),
        (NoGradScale, torch.float16),
        (GradScale, torch.float16),
    ],
)
def test_coarse_dtypes_detect_the_mismatch(cls, dtype):
    """bfloat16 / float16 operators: the tolerance is 4·eps there (not √eps = 11 and 32 eps,
    which one random pair missed: K 6% and 12% off in bfloat16, 12% in float16), over 4
    pairs; K I then equals the reverse-mode truth up to the dtype's rounding."""
    torch.manual_seed(0)
    model, x = cls(), torch.randn(7, 4)
    K = reverse_truth(model.double(), x.double())
    op = NTKOperator(model.float(), x, output="full", dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KI = op.matvec(torch.eye(op.n, dtype=dtype)).double()
    assert [w.category for w in caught if MISMATCH in str(w.message)] == [RuntimeWarning]
    assert not op._forward_ad
    assert rel(KI, K) < 2e-2  # (bfloat16 rounding: 0.4-0.5%)


class AutocastHook(nn.Module):
    """bfloat16 autocast inside a float32 model, with a gradient-halving hook (review)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 32), nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.tanh(self.a(x))
            if h.requires_grad:
                h.register_hook(lambda g: 0.5 * g)
            return self.b(h).float()


@pytest.mark.parametrize("seed", [16, 33])
def test_autocast_mismatch_is_detected(seed):
    """A float32 probe of a bfloat16-autocast model with a hook: the seeds whose one random
    pair passed (K 4% off, Lanczos λ_max 2% high, converged) now switch to reverse mode; K and
    λ_max agree with the float64 accumulation of the same bfloat16 reverse-mode rows."""
    torch.manual_seed(seed)
    model, x = AutocastHook(), torch.randn(12, 4)
    params = list(model.parameters())
    out = model(x).reshape(-1)
    rows = [
        torch.cat(
            [g.reshape(-1).double() for g in torch.autograd.grad(o, params, retain_graph=True)]
        )
        for o in out
    ]
    J = torch.stack(rows)
    K = J @ J.T
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = NTKOperator(model, x, output="full")
        KI = op.matvec(torch.eye(op.n)).double()
        s = ntk_spectrum(model, x, output="full", method="lanczos")
    assert sum(MISMATCH in str(w.message) for w in caught) == 2
    assert rel(KI, K) < 1.5e-2  # (bfloat16 rounding alone: 0.3-0.5%)
    assert s.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(K)[-1]), rel=5e-3)


def test_coarse_dtypes_raise_no_false_alarm():
    """Ordinary models in bfloat16 and float16 pass the 4·eps tolerance (their forward and
    reverse modes differ by 0.2-1.9 eps of ‖J‖ over 4 pairs: MLPs, a 20-layer tanh net,
    saturated sigmoids, BatchNorm, GPT-2 and ViT up to 16 and 8 layers)."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    deep = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(16, 16), nn.Tanh())])
    sig = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4), nn.Sigmoid())
    with torch.no_grad():
        sig[2].weight.mul_(30)  # (saturated outputs)
    bn = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    bn(torch.randn(32, 8))  # (running statistics; probed in eval mode)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=4
    )
    cfg = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2, bos_token_id=0
    )
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0
    gpt2_in = {"input_ids": torch.randint(0, 32, (3, 8)), "attention_mask": mask}
    cases = [
        (deep, torch.randn(12, 16), torch.float16),
        (sig, torch.randn(12, 8), torch.bfloat16),
        (bn, torch.randn(12, 8), torch.float16),
        (vit, torch.randn(6, 3, 8, 8), torch.bfloat16),
        (gpt2, gpt2_in, torch.bfloat16),
        (AutocastHook().a, torch.randn(12, 4), torch.bfloat16),
    ]
    for model, x, dtype in cases:
        op = NTKOperator(model, x, output="full", dtype=dtype)
        _quiet(lambda op=op, dtype=dtype: op.matvec(torch.randn(op.n, 2, dtype=dtype)))
        assert op._forward_ad


class AutocastInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.b(torch.tanh(self.a(x)))
        return self.c(torch.tanh(h.float()))


def test_float32_probe_of_autocast_model_raises_no_false_alarm():
    torch.manual_seed(0)
    op = NTKOperator(AutocastInside(), torch.randn(16, 16))
    _quiet(lambda: op.matvec(torch.randn(op.n, 4)))
    assert op._forward_ad


def test_estimate_and_pairs_do_not_depend_on_the_block_width():
    """``adjoint_mismatch`` estimates ‖J_f − J_r‖_F / ‖J‖_F (dense jacfwd against jacrev),
    from the same seeded pairs whether the first product is one column (pairs one at a time,
    no wider than the caller's products) or a block (pairs vmapped)."""
    model, x = build(GradScale)
    truth = rel_mismatch_truth(model, x)
    got = []
    for width in (1, 3, 4):
        op = NTKOperator(model, x, output="full", dtype=torch.float64)
        with pytest.warns(RuntimeWarning, match=MISMATCH):
            op.matvec(torch.randn(op.n, width, dtype=torch.float64))
        assert op.adjoint_mismatch is not None
        got.append(op.adjoint_mismatch)
    assert got[1] == pytest.approx(got[0], rel=1e-12) and got[2] == pytest.approx(got[0], rel=1e-12)
    assert truth / 3 < got[0] < 3 * truth


def test_failed_check_runs_again(monkeypatch):
    """A check that fails (out of memory, say) is not taken as passed: the next product checks
    again (before: it ran forward-mode products unchecked, K 7-16% off)."""
    model, x = build(GradScale)
    K = reverse_truth(model, x)
    real = torch.func.vjp
    calls = []

    def failing_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (a test's)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.func, "vjp", failing_once)
    op = NTKOperator(model, x, output="full", dtype=torch.float64, linearize=False)
    eye = torch.eye(op.n, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="out of memory"):
        op.matvec(eye)
    with pytest.warns(RuntimeWarning, match=MISMATCH):
        KI = op.matvec(eye)
    assert rel(KI, K) < 1e-10


class LayerNormCommonMode(nn.Module):
    """LayerNorm after a Linear whose rows share a large common vector: its centring cancels
    ~100x the signal, and float32's forward and reverse modes differ by 3% from rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 64)
        self.ln, self.c = nn.LayerNorm(64), nn.Linear(64, 3)
        with torch.no_grad():
            self.b.weight += 100.0 * torch.randn(1, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.ln(self.b(torch.tanh(self.a(x)))))


def test_rounding_mismatch_warning_names_rounding_and_float64():
    """Rounding alone can make the modes disagree; the warning says so and suggests float64,
    which passes the check (and reverse mode stays: harmless)."""
    torch.manual_seed(0)
    model, x = LayerNormCommonMode(), torch.randn(16, 16)
    op = NTKOperator(model, x)
    with pytest.warns(RuntimeWarning, match=MISMATCH) as caught:
        op.matvec(torch.randn(op.n, 2))
    text = " ".join(str(w.message) for w in caught)
    assert "rounding" in text and "dtype=torch.float64" in text
    assert not op._forward_ad
    op64 = NTKOperator(model.double(), x.double(), dtype=torch.float64)
    _quiet(lambda: op64.matvec(torch.randn(op64.n, 2, dtype=torch.float64)))
    assert op64._forward_ad


# ------------------------------------------------------------------ sharded: one verdict
class Gain(nn.Module):
    """A stop-gradient gain: s = t computed under no_grad multiplies x[:, 0]; the modes differ
    in the column of t by x[:, 0], so a shard whose x[:, 0] is tiny sees (almost) none."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)
        self.t = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            s = self.t * 1.0
        return self.b(torch.tanh(self.a(x))) + self.t * x[:, 1:2] + s * x[:, :1]


def _gain_problem() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = Gain().double(), torch.randn(6, 3, dtype=torch.float64)
    x[3:, 0] = 1e-9  # (rank 1's rows: a mismatch far below its own √eps)
    return model, x


def _gain_worker(rank: int, init_file: str, out: str) -> None:
    import datetime
    import os
    import sys
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=20),
    )
    try:
        model, x = _gain_problem()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shard = x[3 * rank : 3 * rank + 3]
            group = dist.group.WORLD
            op = NTKOperator(model, shard, dtype=torch.float64, process_group=group)
            KI = op.matvec(torch.eye(6, dtype=torch.float64))
        said = sum(MISMATCH in str(w.message) for w in caught)
        result = {
            "K": KI,
            "forward": op._forward_ad,
            "said": said,
            "est": getattr(op, "adjoint_mismatch", None),
        }
    except Exception as err:
        result = {"error": repr(err)}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    with contextlib.suppress(Exception):
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # (see tests/test_ntk_operator.py: gloo's threads at interpreter exit)


@pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform == "win32", reason="needs gloo"
)
def test_sharded_check_takes_one_verdict(tmp_path):
    """Two gloo ranks: the check's sums are all-reduced and decided once for the whole J. Rank
    1's rows alone pass (mismatch 1e-9 of its ‖J‖): before, rank 1 kept forward mode while rank
    0 switched, and K's rows of rank 1 were J_f J_rᵀ (off, not symmetric; 27% in the review's
    case); now both ranks warn and K is the float64 reverse-mode truth."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _gain_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all("error" not in g for g in got), got
    model, x = _gain_problem()
    K = reverse_truth(model, x)
    for g in got:
        assert not g["forward"] and g["said"] == 1
        assert rel(g["K"], K) < 1e-12
    assert got[0]["est"] == got[1]["est"]
