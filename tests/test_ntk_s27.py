"""NTK engine fixes of re-review s27-A: the reverse-mode fallback checked before use (a
``@once_differentiable`` backward), the precision trace of a model that does not run on one
sample (train-mode BatchNorm), and module backward hooks refused with a clear error. Truth:
float64 per-row Jacobians from ``torch.autograd`` (reverse mode, as in training) and
``eigvalsh(J Jᵀ)``."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from glu_probe.ntk import NTKOperator, ntk_matrix, ntk_spectrum
from glu_probe.ntk import spectrum as spectrum_mod
from glu_probe.ntk.dense import activation_elements, forward_rounding_dtype
from glu_probe.ntk.functional import FloatTrace, ProbeFunction

torch.set_num_threads(1)

MISMATCH = "forward-mode and reverse-mode derivatives of this model disagree"


def training_kernel(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """K = J Jᵀ of the flattened outputs, J from per-row reverse-mode gradients."""
    params = list(model.parameters())
    out = model(x).reshape(-1)
    rows = []
    for o in out:
        grads = torch.autograd.grad(o, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows).double()
    return J @ J.T


def caught(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in rec]


# ---------------------------------------------------------------- 1. the fallback is checked


class TanhNoJvp(torch.autograd.Function):
    """tanh with a non-differentiable backward and no forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class TanhBadJvp(TanhNoJvp):
    """... with a forward-mode rule 5% off its backward (the adjointness check trips)."""

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return 1.05 * t * (1 - y * y)


class TanhGoodJvp(TanhBadJvp):
    """... with a forward-mode rule that agrees with its backward: no fallback needed."""

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class FnNet(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fn.apply(self.a(x)))


class HookNet(nn.Module):
    """A gradient hook inside forward: forward mode disagrees, the fallback is right."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if h.requires_grad:
            h.register_hook(lambda g: 0.5 * g)
        return self.b(h)


def _fn_case(fn: type[torch.autograd.Function]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model, x = FnNet(fn).double(), torch.randn(7, 4, dtype=torch.float64)
    return model, x, training_kernel(model, x)


@pytest.mark.parametrize("fn", [TanhNoJvp, TanhBadJvp])
def test_unverifiable_fallback_refuses_matrix_free_products(
    fn: type[torch.autograd.Function],
) -> None:
    # Before: the double backward silently dropped the Function's path; K·I was 31% off and
    # Lanczos gave λ_max 17.05 for 23.57 with converged=True.
    model, x, K = _fn_case(fn)
    ev = torch.linalg.eigvalsh(K)
    op = NTKOperator(model, x, output="full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match="once_differentiable"):
            op.matvec(torch.eye(op.n, dtype=torch.float64))
        with pytest.raises(NotImplementedError, match="method='dense'"):
            ntk_spectrum(model, x, output="full", method="lanczos")
        with pytest.raises(NotImplementedError, match="once_differentiable"):
            ntk_matrix(model, x, output="full", strategy="operator")
    assert op.fallback_mismatch is not None and op.fallback_mismatch > 0.1
    with pytest.raises(NotImplementedError, match="once_differentiable"):
        op.matvec(torch.eye(op.n, dtype=torch.float64))  # (every later product too)
    # float32: the check is repeated in float64, where a dropped path stays
    op32 = NTKOperator(model, x, output="full", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match="in float64 too"):
            op32.matvec(torch.eye(op32.n))
    # the dense path (first-order reverse-mode rows) is right
    dense, _ = caught(lambda: ntk_spectrum(model, x, output="full", method="dense"))
    assert abs(dense.lambda_max - float(ev[-1])) <= 1e-10 * float(ev[-1])
    assert abs(dense.lambda_min - float(ev[0])) <= 1e-10 * float(ev[-1])


def test_auto_takes_the_dense_path_where_products_cannot_be_formed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `auto` past its dense row limit runs Lanczos; where the products cannot be formed it
    # falls back to the dense path (K fits), with a warning, instead of wrong values.
    model, x, K = _fn_case(TanhNoJvp)
    ev = torch.linalg.eigvalsh(K)
    monkeypatch.setattr(spectrum_mod, "AUTO_DENSE_MAX_ROWS", 4)
    spec, ws = caught(lambda: ntk_spectrum(model, x, output="full"))
    assert spec.method == "dense"
    assert any("computes K densely" in w for w in ws)
    assert abs(spec.lambda_max - float(ev[-1])) <= 1e-10 * float(ev[-1])
    assert abs(spec.lambda_min - float(ev[0])) <= 1e-10 * float(ev[-1])


def test_verified_fallback_and_forward_mode_still_serve_products() -> None:
    # Controls: a gradient hook (forward mode disagrees, the fallback passes its check and is
    # used) and a Function with a correct jvp (forward mode passes, no fallback).
    torch.manual_seed(0)
    hook, x = HookNet().double(), torch.randn(7, 4, dtype=torch.float64)
    for model, fallback in ((hook, True), (_fn_case(TanhGoodJvp)[0], False)):
        K = training_kernel(model, x)
        op = NTKOperator(model, x, output="full")
        KI, ws = caught(lambda op=op: op.matvec(torch.eye(op.n, dtype=torch.float64)))
        assert float((KI - K).abs().max()) <= 1e-10 * float(K.abs().max())
        assert any(MISMATCH in w for w in ws) == fallback
        assert (op.fallback_mismatch is not None) == fallback
        if fallback:
            assert op.fallback_mismatch is not None and op.fallback_mismatch < 1e-12
        ev = torch.linalg.eigvalsh(K)
        lan, _ = caught(lambda m=model: ntk_spectrum(m, x, output="full", method="lanczos"))
        assert abs(lan.lambda_max - float(ev[-1])) <= 1e-8 * float(ev[-1])
        assert abs(lan.lambda_min - float(ev[0])) <= 1e-8 * float(ev[-1])


# ---------------------------------------------------------------- 2. the precision trace


class F32Inside(nn.Module):
    """Train-mode BatchNorm (needs two samples) and a float32 section inside (``cast``)."""

    def __init__(self, cast: bool = True) -> None:
        super().__init__()
        self.cast = cast
        self.a, self.bn, self.b = nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.a(x))
        f = h.float() if self.cast else h
        f = torch.softmax(f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6), -1)
        return self.b(10 * f.to(h.dtype))


def _f32(cast: bool) -> nn.Module:
    torch.manual_seed(0)
    return F32Inside(cast).double()


def test_train_mode_batchnorm_probe_sees_the_float32_inside() -> None:
    # Before: the one-sample trace failed (BatchNorm in train mode), was read as "float64
    # throughout", and the dense result claimed precision='float64' with residuals ~1e-12
    # against errors of 2e-8 (λ_min) and 6e-7 (λ_max), without the cast warning.
    torch.manual_seed(1)
    x = torch.randn(20, 8, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(training_kernel(_f32(False), x))  # float64 throughout
    spec, ws = caught(
        lambda: ntk_spectrum(_f32(True), x, method="dense", eval_mode=False, output="full")
    )
    assert spec.precision == "mixed"
    assert any("computes part of its forward pass in torch.float32" in w for w in ws)
    assert abs(spec.lambda_min - float(ev[0])) <= spec.residual_min
    assert abs(spec.lambda_max - float(ev[-1])) <= spec.residual_max
    # the adjointness check uses float32's tolerance: no false alarm
    op = NTKOperator(_f32(True), x, dtype=torch.float64, eval_mode=False, output="full")
    _, ws = caught(lambda: op.matvec(torch.randn(op.n, 2, dtype=torch.float64)))
    assert not any(MISMATCH in w for w in ws)


class AutocastBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Linear(16, 64), nn.BatchNorm1d(64)
        self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.b(torch.tanh(self.a(x)))
        return self.c(torch.tanh(self.bn(h.float())))


def test_trace_verdict_does_not_depend_on_call_history() -> None:
    # Before: a fresh train-mode probe saw float32 (false alarm, reverse-mode products), the
    # same probe after an eval_mode=True one reused its bfloat16 verdict (memo key lacked
    # eval_mode).
    torch.manual_seed(0)
    x = torch.randn(16, 16)
    for history in (False, True):
        torch.manual_seed(0)
        model = AutocastBN()
        if history:
            caught(lambda m=model: NTKOperator(m, x).matvec(torch.randn(16, 2)))
        op, _ = caught(lambda m=model: NTKOperator(m, x, eval_mode=False))
        assert forward_rounding_dtype(op.probe) == torch.bfloat16
        _, ws = caught(lambda op=op: op.matvec(torch.randn(op.n, 2)))
        assert op._forward_ad and not any(MISMATCH in w for w in ws)
    # the activation estimate of the coupled batch is its whole-batch trace per sample (it was
    # 0: no memory counted for the forward passes at all), so a pass over the batch counts at
    # least what that pass allocates
    torch.manual_seed(0)
    train, _ = caught(lambda: ProbeFunction(AutocastBN(), x, eval_mode=False))
    trace = FloatTrace()
    with train.session(), torch.no_grad(), trace:
        train(train.params)
    assert trace.elements > 0
    assert trace.elements <= activation_elements(train) * 16 < trace.elements + 16


class NoTrace(nn.Module):
    """A forward that refuses to run under a dispatch mode (the trace): nothing is known."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is not None:
            raise RuntimeError("no tracing")
        return self.b(torch.tanh(self.a(x)))


def test_untraceable_forward_is_assumed_float32_in_a_float64_probe() -> None:
    torch.manual_seed(0)
    model, x = NoTrace().double(), torch.randn(6, 4, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(training_kernel(model, x))
    spec, ws = caught(lambda: ntk_spectrum(model, x, method="dense", output="full"))
    assert spec.precision == "mixed"
    assert any("could not be traced" in w for w in ws)
    assert abs(spec.lambda_max - float(ev[-1])) <= spec.residual_max


# ---------------------------------------------------------------- 3. module backward hooks


class ActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(4, 16), nn.Linear(16, 2), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


@pytest.mark.parametrize("kind", ["full", "pre", "global"])
def test_module_backward_hooks_are_refused_clearly(kind: str) -> None:
    # Before: torch's "autograd.Function ... must override the setup_context staticmethod".
    torch.manual_seed(0)
    model, x = ActNet(), torch.randn(8, 4)
    handle = None
    if kind == "full":
        model.act.register_full_backward_hook(lambda m, gi, go: (0.5 * gi[0],))
    elif kind == "pre":
        model.act.register_full_backward_pre_hook(lambda m, go: (0.5 * go[0],))
    else:
        handle = nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    try:
        match = "'act'" if kind != "global" else "global module full backward hook"
        for call in (
            lambda: ntk_spectrum(model, x),
            lambda: ntk_matrix(model, x),
            # (at construction where the validating pass meets the hook, torch 2.14; at the
            # first product where it does not, torch 2.4)
            lambda: NTKOperator(model, x).matvec(torch.ones(8)),
        ):
            with pytest.raises(ValueError, match=match):
                call()
    finally:
        if handle is not None:
            handle.remove()
    # removed, the probe runs again
    if kind == "global":
        assert ntk_spectrum(model, x).lambda_max > 0


def test_old_style_backward_hook_still_probes_training_jacobian() -> None:
    # register_backward_hook (on the module's grad_fn) runs under torch.func: not refused,
    # and K is training's (the hook halves the gradient through the activation).
    torch.manual_seed(0)
    model, x = ActNet().double(), torch.randn(6, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch deprecates register_backward_hook)
        model.act.register_backward_hook(lambda m, gi, go: (0.5 * gi[0],))
        K = training_kernel(model, x)
        got = ntk_matrix(model, x, output="full")
    assert float((got - K).abs().max()) <= 1e-10 * float(K.abs().max())


def test_monitor_ends_the_fit_with_the_hook_message() -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from glu_probe.callbacks import NTKSpectrumMonitor

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ActNet()
            self.net.act.register_full_backward_hook(lambda m, gi, go: (0.5 * gi[0],))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            return self(batch[0]).square().mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[NTKSpectrumMonitor(every_n_steps=1)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="register_full_backward_hook"):
            trainer.fit(LM(), data)


# ------------------------------------------------- second round (re-review s27-rA)
# 1. A 16-bit probe of a model without float64 kernels: the fallback's check is repeated in
#    float32 (it was refused: a bfloat16 OLMoE's grouped_mm, mismatch 5e-2 from rounding alone).


class NoF64Tanh(torch.autograd.Function):
    """tanh without a forward-mode rule (the fallback is taken), twice differentiable, and
    without a float64 kernel (as ``grouped_mm``)."""

    generate_vmap_rule = True
    refused: tuple[torch.dtype, ...] = (torch.float64,)

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if x.dtype in NoF64Tanh.refused:
            raise RuntimeError(f"Expected a Float32, BFloat16 or Float16 tensor, got {x.dtype}")
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class Cancelling(nn.Module):
    """Two large branches that nearly cancel (frozen buffers): bfloat16 rounding of the
    products is ~30 eps relative, above the 4-eps tolerance; float32's is far below √eps."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.a = nn.Linear(8, 32)
        w = torch.randn(4, 32)
        self.register_buffer("p", 30 * w)
        self.register_buffer("q", 30 * w - torch.randn(4, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fn(self.a(x))
        return h @ self.p.T - h @ self.q.T


def _cancelling() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model, x = Cancelling(NoF64Tanh.apply), torch.randn(6, 8)
    torch.manual_seed(0)
    twin = Cancelling(torch.tanh).double()  # (same weights, float64 tanh: the truth)
    return model, x, training_kernel(twin, x.double())


def test_bf16_fallback_without_float64_kernels_is_checked_in_float32() -> None:
    model, x, K = _cancelling()
    op = NTKOperator(model, x, dtype=torch.bfloat16, output="full")
    KI, _ = caught(lambda: op.matvec(torch.eye(op.n, dtype=torch.bfloat16)))
    # rounding alone tripped the bfloat16 check (the model refuses float64); float32 cleared it
    assert op.fallback_mismatch is not None and op.fallback_mismatch > op._adjoint_tol()
    assert not op._forward_ad and op._refused is None
    err = float((KI.double() - K).abs().max() / K.abs().max())
    # (bfloat16 rounding: 6.4% here, the dense path's bfloat16 K 5.8%; a dropped path is O(1))
    assert err < 0.1
    ev = torch.linalg.eigvalsh(K)
    lan, _ = caught(lambda: ntk_spectrum(model, x, output="full", method="lanczos"))
    assert abs(lan.lambda_max - float(ev[-1])) <= 1e-5 * float(ev[-1])  # (float32 probe)


def test_unconfirmable_fallback_mismatch_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # No dtype wider than bfloat16 runs: the mismatch is neither confirmed nor cleared, and the
    # error says so instead of blaming a @once_differentiable backward.
    monkeypatch.setattr(NoF64Tanh, "refused", (torch.float64, torch.float32))
    model, x, _ = _cancelling()
    op = NTKOperator(model, x, dtype=torch.bfloat16, output="full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match="could not be confirmed in a wider dtype"):
            op.matvec(torch.eye(op.n, dtype=torch.bfloat16))
    assert "float64: RuntimeError; float32: RuntimeError" in str(op._refused)
    assert "An operation's backward is not differentiable" not in str(op._refused)


# 2. Module backward hooks the probe never meets are not refused (a frozen backbone).


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def test_backward_hook_on_a_part_the_probe_does_not_differentiate_is_allowed() -> None:
    torch.manual_seed(0)
    model, x = Backbone().double(), torch.randn(6, 4, dtype=torch.float64)
    model.backbone.register_full_backward_hook(lambda m, gi, go: None)  # (gradient logging)
    K = training_kernel(model.head, model.backbone(x).detach())  # (J of the head's params)
    got = ntk_matrix(model, x, output="full", params=model.head)
    assert float((got - K).abs().max()) <= 1e-12 * float(K.abs().max())
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    got = ntk_matrix(model, x, output="full")
    assert float((got - K).abs().max()) <= 1e-12 * float(K.abs().max())
    spec, _ = caught(lambda: ntk_spectrum(model, x, output="full", method="lanczos"))
    assert abs(spec.lambda_max - float(torch.linalg.eigvalsh(K)[-1])) <= 1e-8 * spec.lambda_max
    # a hook registered after the probe was built, which a pass meets: the same clear error
    op = NTKOperator(model, x, output="full", params=model.head)
    model.head.register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(ValueError, match="'backbone', 'head'"):
        op.matvec(torch.randn(op.n, 2, dtype=torch.float64))


# 3. A coupled batch whose products cannot be formed: the error does not advise the dense path.


class CoupledFn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(TanhNoJvp.apply(self.bn(self.a(x))))


def test_coupled_batch_refusal_points_to_eval_mode() -> None:
    torch.manual_seed(0)
    model, x = CoupledFn().double(), torch.randn(7, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in (
            lambda: ntk_spectrum(model, x, output="full", method="dense", eval_mode=False),
            lambda: ntk_matrix(model, x, output="full", eval_mode=False),
        ):
            with pytest.raises(NotImplementedError, match="No path can form K") as info:
                call()
            assert "Use ntk_spectrum(method='dense')" not in str(info.value)
            assert "eval_mode=True" in str(info.value)
    # and eval_mode=True works, with the dense path
    model.eval()
    ev = torch.linalg.eigvalsh(training_kernel(model, x))
    spec, _ = caught(lambda: ntk_spectrum(model, x, output="full", method="dense"))
    assert abs(spec.lambda_max - float(ev[-1])) <= 1e-10 * float(ev[-1])
    assert abs(spec.lambda_min - float(ev[0])) <= 1e-10 * float(ev[-1])


# 4. A wrong vmap batching rule (torch.cdist's backward, torch 2.14): the dense path's batched
#    rows are checked against an unbatched VJP once, and computed without vmap where they differ.


class RBF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.centers = nn.Parameter(torch.randn(5, 16))
        self.w = nn.Parameter(torch.randn(5, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(torch.tanh(self.a(x)), self.centers) @ self.w


def test_dense_rows_of_a_cdist_model_match_per_row_autograd() -> None:
    # Before: ntk_matrix(strategy='jacobian') 20% off; dense λ_min −3.8e-14 for 2.78e-2 with a
    # residual of 3.4e-12, precision float64.
    torch.manual_seed(0)
    model, x = RBF().double(), torch.randn(9, 4, dtype=torch.float64)
    K = training_kernel(model, x)
    ev = torch.linalg.eigvalsh(K)
    got, ws = caught(lambda: ntk_matrix(model, x, output="full", strategy="jacobian"))
    assert float((got - K).abs().max()) <= 1e-12 * float(K.abs().max())
    assert any("batching rule" in w for w in ws)
    spec, _ = caught(lambda: ntk_spectrum(model, x, output="full", method="dense"))
    assert abs(spec.lambda_max - float(ev[-1])) <= 1e-10 * float(ev[-1])
    assert abs(spec.lambda_min - float(ev[0])) <= max(spec.residual_min, 1e-10 * float(ev[-1]))
    assert float(ev[0]) > 1e-2  # (the truth is well away from 0)


def test_dense_row_check_does_not_take_float32_rounding_for_a_wrong_batching_rule():
    """12 residual Linear -> LayerNorm blocks with a pre-norm offset of 100: float32 rounding
    puts batched and unbatched rows 1.2e-3 apart (above √eps), both K equally far from float64
    truth. The check repeats itself in float64 before it sends every later probe of the model
    to one backward pass per row (re-review, session 27)."""
    from glu_probe.ntk import dense as D

    class _LayerNormNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                [nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)) for _ in range(12)]
            )
            self.out = nn.Linear(16, 3)
            with torch.no_grad():
                for i, b in enumerate(self.blocks):
                    b[0].weight.mul_(10.0 ** (i % 4 - 2))
                    b[0].bias.fill_(100.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                x = x + b(x)
            return self.out(x)

    torch.manual_seed(6)
    model, x = _LayerNormNet(), torch.randn(6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "batching rule is wrong" warning)
        K = ntk_matrix(model, x, output="full", strategy="jacobian", dtype=torch.float32)
    assert set(D._ROWS_VERIFIED[model].values()) == {1}
    truth = ntk_matrix(
        copy.deepcopy(model).double(), x.double(), output="full", strategy="jacobian"
    )
    err = float((K.double() - truth).abs().max() / truth.abs().max())
    assert err < 1e-2  # (float32 rounding of this ill-conditioned net: ~2e-3)
