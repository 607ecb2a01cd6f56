"""A packed gated MLP computed feature-major, so that every elementwise kernel runs contiguous.

A packed gated block computes ``gu = x W1ᵀ`` with ``W1 = [Wg; Wu]`` (one matmul) and splits it
into the gate ``g`` and the up projection ``u``. Token-major (``gu`` of shape ``(N, 2h)``), both
halves are strided views: CUDA's vectorised elementwise kernels need contiguous operands, so
``act(g)``, ``act(g) ⊙ u`` and their backward kernels fall back to the strided kernel, and the
backward of the split is a ``cat``. On an H100 in bf16 that made the packed block 3–15% slower
than timm's ``SwiGLU`` / HF's ``LlamaMLP`` (two separate matmuls whose outputs are contiguous);
the per-kernel profile is in ``benchmarks/RESULTS_mlp.md``. The feature-major block below was
3–8% faster than both there, but 1.4–1.5x slower in fp32 at width 256, so
:class:`~glu_probe.modules.GatedMLP` uses it by default only for 16-bit compute on CUDA.

:func:`fused_gated_mlp` computes the same block **feature-major**: ``Pᵀ = W1 xᵀ`` is
``(2h, N)``, so ``gᵀ`` and ``uᵀ`` are its two contiguous row blocks, ``hᵀ = act(gᵀ) ⊙ uᵀ`` is
contiguous, and ``y = h W2ᵀ`` reads ``hᵀ`` as a transposed GEMM operand (no copy). The backward
(an :class:`torch.autograd.Function`, written by hand because autograd of the token-major
expression is what is slow) forms ``∂L/∂hᵀ = W2ᵀ (∂L/∂y)ᵀ`` directly in the same layout and writes
``∂L/∂gᵀ = ∂L/∂hᵀ ⊙ uᵀ ⊙ act'(gᵀ)`` and ``∂L/∂uᵀ = ∂L/∂hᵀ ⊙ act(gᵀ)`` into the two halves of one
buffer with ATen's fused ``*_backward`` kernels, so there is no ``cat``. Same GEMMs as the
unfused block (one packed matmul for the gate and up projections, forward and backward), the
same saved tensors as timm's ``SwiGLU`` where all its weights train (``x``, ``Pᵀ`` =
``[g; u]``, ``act(g)``, ``hᵀ``; keeping ``act(g)`` instead of recomputing it in the backward was
33 µs of 1.15 ms faster per step on an H200 at dim 768, bf16), plus, for 16-bit blocks whose
``W1`` and bias both train, the augmented input of :func:`_packed_preactivation`
(``N × (in + 8)``; 26 MB at 16384 tokens × 768, 8–9% of the block's saved activations). In
16-bit, the packed bias enters the GEMM's float32 accumulation (one rounding, as in the
token-major ``F.linear``; see :func:`_packed_preactivation`), and an output layer with a bias
is the token-major block's own ``F.linear`` on the transposed view of ``hᵀ``.

Split layout. With a bias in 16 bits the feature-major block needs the augmented operands
above (a copy of ``x`` that scales with N·in while the GEMMs scale with N·in·h), and its packed
pre-activation GEMM with inner dimension ``in + 8`` is a shape cuBLAS tiles less well than two
half-size GEMMs. On an H200 (bf16, 16384 tokens, ``benchmarks/ab_mlp_bias.py``,
``RESULTS_mlp.md`` "session 17") it was 1.01–1.30x timm's ``SwiGLU`` at width 768 from run to
run (median 1.16x), while two token-major GEMMs on the packed weight's row blocks (bias in the
GEMM epilogue, contiguous ``(N, h)`` halves, :class:`_SplitFusedGatedMLP`) were 0.96–1.05x at
widths 768–1536 (median 1.02x at 768); at 2048 the feature-major block was the faster (0.95x
against 1.02–1.03x). So
:func:`fused_gated_mlp` splits 16-bit blocks with a bias and fewer than
:data:`SPLIT_BELOW_IN_FEATURES` input features. The split path's forward values and roundings
are the token-major block's own (``F.linear`` with its bias), its parameter gradients the same
GEMMs and reductions per half. Its input gradient ``dx = dg Wg + du Wu`` is one rounding more
than the packed block's single GEMM (the second GEMM accumulates onto the first one's 16-bit
result): about 5% more RMS error in bf16 and fp16 on the CPU, and less than timm's ``SwiGLU`` /
HF's ``LlamaMLP`` in a 16-bit model, whose autograd rounds both products and their sum
(``tests/test_gated_product.py``). Under autocast a non-leaf input is cast once per timm
``Linear``, so timm's halves meet in float32: there the split layout's input gradient is about
2% less accurate than timm's (relative RMS 5.61e-3 against 5.48e-3, bf16 on the CPU; review,
session 23), not more.

Host-bound steps. Where a block's GEMMs are small, the step's wall time is the host's time to
issue its kernels, not the device's (H200, bf16 with biases, 16384 tokens × 512 features: 0.6 ms
of device time under 1.2–1.8 ms of host time per step; ``RESULTS_mlp.md``, "host time vs device
time"), and the hand-written backward above, Python code run by the autograd engine, costs host
time that autograd's own C++ backward does not. There the split layout runs as
``"split-autograd"``: the same two token-major GEMMs on ``w1``'s row blocks, written as
differentiable ops (timm's ``SwiGLU`` expression on views of the packed weight), so the backward
is autograd's: timm's kernels plus one ``cat`` per packed parameter (the backward of ``chunk``),
and in 16 bits timm's values and gradients bit for bit (``tests/test_gated_product.py``), under
autocast too: there autocast casts ``x`` once per GEMM, as for timm's two ``Linear`` layers.
``layout="auto"`` takes it for split blocks whose work ``N·in·h`` (one projection's
multiply-adds) is below :data:`SPLIT_AUTOGRAD_BELOW_MACS` (2·10¹⁰: 16384 tokens × 512 × 1368
below, × 768 × 2048 above, the widths where the hand-written split layout was measured at
1.17x and 0.997x timm's ``SwiGLU`` on an H200). On the 2-core CPU box (1 thread, bf16, 8 tokens
× 16 features, a step that is all host time; 2026-11-28, ``RESULTS_mlp.md``, "session 21") the
module's forward and backward took 343–348 µs this way, with the module's per-call checks
trimmed, against 395–427 µs before (timm's ``SwiGLU``: 330–357 µs, HF's ``LlamaMLP``:
309–313 µs). Not yet measured on a GPU.

Scope, so that nothing else changes (:meth:`glu_probe.modules.GatedMLP.forward` checks it):

* gate activations with a closed-form ATen backward: exact ``nn.SiLU``, ``nn.Sigmoid``,
  ``nn.ReLU``, ``nn.GELU`` (exact or tanh) and ``nn.Identity`` (not subclasses, whose forward may
  differ); plain ``nn.Linear`` projections without hooks; no ``norm`` and no active ``drop1``;
* not under torch.func transforms: the NTK engine's ``vmap``/``jvp``/``vjp`` see the plain
  module, exactly the same ops as before; not under ``torch.compile``/``torch.export``/
  ``torch.jit.trace`` either (Dynamo cannot trace a Function with a custom ``jvp``).
  Under an open dual level (forward-mode AD with dual tensors) :func:`fused_gated_mlp` computes
  the plain expression too, so that the tangents are differentiable in turn; the Functions'
  own ``jvp`` (from saved intermediates) is there for a dual level that check misses. A
  backward with ``create_graph=True`` differentiates the plain expression (double backward
  works);
* autocast: the inputs are cast to the autocast dtype, as ``F.linear`` would cast them, before
  the Function (autograd sees the casts, so the gradients come back in the inputs' dtypes); the
  ``"split-autograd"`` layout has no Function: its packed ``w1`` and ``b1`` are cast before they
  are split and autocast casts ``x`` for each of its GEMMs, as for timm's two ``Linear`` layers
  (a non-leaf ``x`` is then kept cast twice, as timm keeps it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activation_math import act as _act
from .activation_math import act_grad as _act_derivative

__all__ = [
    "SPLIT_AUTOGRAD_BELOW_MACS",
    "SPLIT_BELOW_IN_FEATURES",
    "fused_gate_kind",
    "fused_gated_mlp",
]

_aten = torch.ops.aten

#: ``layout="auto"`` runs 16-bit blocks with a bias and fewer input features than this split
#: (token-major, two GEMMs); see the module docstring, "Split layout".
SPLIT_BELOW_IN_FEATURES = 2048

#: ``layout="auto"`` runs those split blocks as ``"split-autograd"`` (the same two GEMMs,
#: differentiated by autograd: no Python backward) when one projection's work ``N·in·h`` is below
#: this many multiply-adds: there the step is bound by host time, not by the device (module
#: docstring, "Host-bound steps").
SPLIT_AUTOGRAD_BELOW_MACS = 2 * 10**10


def fused_gate_kind(act: nn.Module) -> str | None:
    """The fused path's key of an activation module, or ``None`` (plain path)."""
    t = type(act)
    if t is nn.SiLU:
        return "silu"
    if t is nn.Sigmoid:
        return "sigmoid"
    if t is nn.ReLU:
        return "relu"
    if t is nn.Identity:
        return "identity"
    if t is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return None


def _act_backward(
    kind: str, grad: Tensor, g: Tensor, ag: Tensor, out: Tensor | None = None
) -> Tensor:
    """``grad ⊙ act'(g)`` with ATen's fused backward kernels, written into ``out`` (their
    ``out=`` overloads) or, with ``out=None``, out of place (under vmap, which has no batching
    rule for ``out=``). ``ag`` is ``act(g)``, saved by the forward (sigmoid's backward reads
    it)."""
    args: tuple[Any, ...]
    if kind == "silu":
        op, args = _aten.silu_backward, (grad, g)
    elif kind == "sigmoid":
        op, args = _aten.sigmoid_backward, (grad, ag)
    elif kind == "relu":
        op, args = _aten.threshold_backward, (grad, g, 0)
    elif kind in ("gelu", "gelu_tanh"):
        approx = "tanh" if kind == "gelu_tanh" else "none"
        if out is None:
            return _aten.gelu_backward(grad, g, approximate=approx)
        return _aten.gelu_backward.grad_input(grad, g, approximate=approx, grad_input=out)
    else:
        return grad.clone() if out is None else out.copy_(grad)
    return op(*args) if out is None else op.grad_input(*args, grad_input=out)


def _vmapped(t: Tensor) -> bool:
    """Under a vmap (torch.func, or autograd's ``is_grads_batched`` / vectorised jacobians,
    which batch the backward with the legacy batching rules)."""
    fn = torch._C._functorch
    return bool(
        torch._C._are_functorch_transforms_active()
        or fn.is_batchedtensor(t)
        or fn.is_legacy_batchedtensor(t)
    )


def _halves(t: Tensor, gate_first: bool, dim: int = 0) -> tuple[Tensor, Tensor]:
    """(gate, up) halves of a packed tensor along ``dim``: the row blocks of a feature-major
    ``(2h, N)`` tensor (``dim=0``) or the column halves of a token-major one (``dim=-1``)."""
    a, b = t.chunk(2, dim=dim)
    return (a, b) if gate_first else (b, a)


def _plain(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    kind: str,
    gate_first: bool,
) -> Tensor:
    """The token-major reference expression (what the unfused block computes)."""
    g, u = _halves(F.linear(x, w1, b1), gate_first, dim=-1)
    return F.linear(_act(kind, g) * u, w2, b2)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as autocast casts it: floating tensors except float64, which it never narrows."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    if _any_autocast is not None and not _any_autocast():
        return None  # one C call (0.4 µs here) instead of the device's type and its query
    dev = x.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except RuntimeError:  # a device type without autocast (meta): nothing to cast
        return None
    return torch.get_autocast_dtype(dev) if enabled else None


def _packed_preactivation(w1: Tensor, x: Tensor, b1: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(Pᵀ, xa)``: ``Pᵀ = W1 xᵀ + b1 1ᵀ``, ``(2h, N)``, rounded once, and the augmented input
    ``xa = [x | 1 | 0]`` it was computed from (``None`` where there is none).

    A column-broadcast bias in ``torch.addmm`` is added *after* the product is rounded to
    bf16/fp16 on CUDA (cuBLASLt's bias epilogue; pytorch/pytorch#180875), so 16-bit
    pre-activations were rounded twice: on an H200 the bf16 gradients of the block were up to 8x
    less accurate than the token-major block's (ReGLU: sign flips of near-zero gates), and the
    same two roundings emulated on the CPU reproduce those errors to three digits
    (``benchmarks/RESULTS_mlp.md``). Here the bias is one more term of the GEMM's float32
    accumulation instead: ``[W1 | b1 | 0] [x | 1 | 0]ᵀ`` with the inner dimension padded to a
    multiple of 8 (tensor-core alignment). Each augmented operand is one ``cat`` (one kernel:
    the first version's zero fill, slice copy and column fill were three), and only for 16-bit
    blocks with a bias; without a bias (the LLaMA / timm ``SwiGLU`` convention) it is a plain
    ``mm``. Float32 keeps ``addmm``. Where W1 and b1 both need gradients, the backward reuses
    ``xa``: ``dPᵀ xa = [dW1 | db1 | 0]`` gives the bias gradient inside the weight-gradient
    GEMM, where a separate ``dPᵀ 1`` reads all of ``dPᵀ`` once more (the size of the block's
    largest activation).
    """
    if b1 is None:
        return torch.mm(w1, x.t()), None
    if x.dtype not in (torch.bfloat16, torch.float16):
        return torch.addmm(b1.unsqueeze(1), w1, x.t()), None
    wa, xa = _augmented_operands(w1, x, b1)
    return torch.mm(wa, xa.t()), xa


def _augmented_operands(w1: Tensor, x: Tensor, b1: Tensor) -> tuple[Tensor, Tensor]:
    """``([W1 | b1 | 0], [x | 1 | 0])``, the inner dimension padded to a multiple of 8, each one
    ``cat`` (see :func:`_packed_preactivation`)."""
    n, k = x.shape
    pad = (k + 1 + 7) // 8 * 8 - k
    # [1, 0, …, 0] made on the device (no host-to-device copy; capturable in a CUDA graph)
    tail = torch.eye(1, pad, dtype=x.dtype, device=x.device)
    xa = torch.cat((x, tail.expand(n, pad)), dim=1)
    wa = torch.cat((w1, F.pad(b1.unsqueeze(1), (0, pad - 1))), dim=1)
    return wa, xa


class _FusedGatedMLP(torch.autograd.Function):
    """``y = W2 (act(g) ⊙ u) + b2``, ``[g; u] = W1 x + b1``, feature-major (module docstring).

    ``x`` is ``(N, in)``; every input is already in the compute dtype (:func:`fused_gated_mlp`
    casts under autocast, where autograd sees the casts).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        kind: str,
        gate_first: bool,
    ) -> Tensor:
        ctx.kind, ctx.gate_first = kind, gate_first
        pt, xa = _packed_preactivation(w1, x, b1)  # (2h, N): gate and up rows contiguous
        g, u = _halves(pt, gate_first)
        ag = _act(kind, g)
        ht = ag * u  # (h, N), contiguous
        # (N, out), contiguous (a residual add or a view of the output needs that), one GEMM on
        # the transposed operands; with a bias, F.linear on the view hᵀ (no copy) adds it as the
        # token-major block does (a column-broadcast addmm would round twice in 16 bits).
        y = torch.mm(ht.t(), w2.t()) if b2 is None else F.linear(ht.t(), w2, b2)
        # The inputs (a backward with create_graph differentiates through them) and the three
        # intermediates that timm's SwiGLU keeps as well. ``xa`` (16-bit with a bias) carries
        # the bias gradient into the dW1 GEMM, so it is kept only where W1 and b1 both need
        # gradients; ``x`` is kept as well, as the input a create_graph backward differentiates.
        need = ctx.needs_input_grad
        ctx.save_for_backward(x, w1, b1, w2, b2, pt, ht, xa if need[1] and need[2] else None, ag)
        ctx.save_for_forward(x, w1, b1, w2, b2, pt, ht)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w1, b1, w2, b2, pt, ht, xa, ag = ctx.saved_tensors
        kind, gate_first = ctx.kind, ctx.gate_first
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: autograd of the plain expression, so that the gradients are
            # themselves differentiable (ATen's fused *_backward kernels have no derivatives).
            return _double_backward(ctx, (x, w1, b1, w2, b2), dy)
        dy = dy.to(w2.dtype)
        dht = torch.mm(w2.t(), dy.t())  # (h, N), the layout of ht
        dw2 = torch.mm(dy.t(), ht.t()) if need[3] else None
        db2 = dy.sum(0) if b2 is not None and need[4] else None
        g, u = _halves(pt, gate_first)
        if _vmapped(dy):
            # vmapped backward (autograd.grad(is_grads_batched=True), vectorised jacobians):
            # no out= overloads under vmap, so the two halves are built out of place.
            dg = _act_backward(kind, dht * u, g, ag)
            du = dht * ag
            dpt = torch.cat((dg, du) if gate_first else (du, dg), dim=0)
        else:
            dpt = torch.empty_like(pt)
            dg, du = _halves(dpt, gate_first)
            torch.mul(dht, ag, out=du)
            _act_backward(kind, dht * u, g, ag, out=dg)
        dx = torch.mm(dpt.t(), w1) if need[0] else None
        dw1: Tensor | None
        db1: Tensor | None
        if xa is not None:  # saved only where W1 and b1 both need gradients
            # [dW1 | db1 | 0] in one GEMM (see _packed_preactivation), returned contiguous: as
            # torch.autograd.grad and gradient hooks hand them out, callers flatten them with
            # view(-1), and a strided view would keep the padded buffer alive. (AccumulateGrad
            # takes these copies over; it would otherwise copy the views itself.)
            k = x.shape[1]
            dwa = torch.mm(dpt, xa)
            dw1, db1 = dwa[:, :k].contiguous(), dwa[:, k].contiguous()
        else:
            dw1 = torch.mm(dpt, x) if need[1] else None
            db1 = dpt.sum(1) if b1 is not None and need[2] else None
        return dx, dw1, db1, dw2, db2, None, None

    @staticmethod
    def jvp(ctx: Any, tx: Any, tw1: Any, tb1: Any, tw2: Any, tb2: Any, *_: Any) -> Tensor:
        x, w1, _b1, w2, _b2, pt, ht = ctx.saved_tensors
        g, u = _halves(pt, ctx.gate_first)
        tpt = torch.zeros_like(pt)
        if tx is not None:
            tpt = tpt + torch.mm(w1, tx.t())
        if tw1 is not None:
            tpt = tpt + torch.mm(tw1, x.t())
        if tb1 is not None:
            tpt = tpt + tb1.unsqueeze(1)
        tg, tu = _halves(tpt, ctx.gate_first)
        tht = _act_derivative(ctx.kind, g) * tg * u + _act(ctx.kind, g) * tu
        ty = torch.mm(w2, tht)
        if tw2 is not None:
            ty = ty + torch.mm(tw2, ht)
        if tb2 is not None:
            ty = ty + tb2.unsqueeze(1)
        return ty.t()


class _SplitFusedGatedMLP(torch.autograd.Function):
    """The same block token-major, its gate and up projections two GEMMs on the row blocks of
    the packed ``W1`` (module docstring, "Split layout").

    ``g = x Wgᵀ + bg`` and ``u = x Wuᵀ + bu`` are each an ``F.linear`` (the bias in the GEMM's
    epilogue, as in timm's ``SwiGLU``), so both are contiguous ``(N, h)`` tensors and their
    rounding is the token-major block's. The backward writes ``dWg`` and ``dWu`` into the two
    row blocks of one ``(2h, in)`` buffer (autograd of the two slices would scatter each into a
    zero-filled ``(2h, in)`` tensor and add them) and ``dx = dg Wg + du Wu`` as one ``addmm``
    onto the first product (rounded to the compute dtype in between: one rounding more than a
    single GEMM over ``2h``, one fewer than autograd of two ``nn.Linear``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        kind: str,
        gate_first: bool,
    ) -> Tensor:
        ctx.kind, ctx.gate_first = kind, gate_first
        wg, wu = _halves(w1, gate_first)
        bg, bu = (None, None) if b1 is None else _halves(b1, gate_first)
        g = F.linear(x, wg, bg)  # (N, h), contiguous
        u = F.linear(x, wu, bu)
        ag = _act(kind, g)
        hh = ag * u
        ctx.save_for_backward(x, w1, b1, w2, b2, g, u, ag, hh)
        ctx.save_for_forward(x, w1, b1, w2, b2, g, u, ag, hh)
        return F.linear(hh, w2, b2)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w1, b1, w2, b2, g, u, ag, hh = ctx.saved_tensors
        kind, gate_first = ctx.kind, ctx.gate_first
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: see _FusedGatedMLP.backward
            return _double_backward(ctx, (x, w1, b1, w2, b2), dy)
        dy = dy.to(w2.dtype)
        dh = torch.mm(dy, w2)  # (N, h)
        dw2 = torch.mm(dy.t(), hh) if need[3] else None
        db2 = dy.sum(0) if b2 is not None and need[4] else None
        du = dh * ag
        dg = _act_backward(kind, dh * u, g, ag)
        wg, wu = _halves(w1, gate_first)
        dx = torch.addmm(torch.mm(dg, wg), du, wu) if need[0] else None
        first, second = (dg, du) if gate_first else (du, dg)
        dw1: Tensor | None = None
        db1: Tensor | None = None
        if _vmapped(dy):  # no out= overloads under vmap: the halves are joined out of place
            if need[1]:
                dw1 = torch.cat((torch.mm(first.t(), x), torch.mm(second.t(), x)), dim=0)
            if b1 is not None and need[2]:
                db1 = torch.cat((first.sum(0), second.sum(0)))
            return dx, dw1, db1, dw2, db2, None, None
        h = g.shape[1]
        if need[1]:
            dw1 = torch.empty_like(w1)
            torch.mm(first.t(), x, out=dw1[:h])
            torch.mm(second.t(), x, out=dw1[h:])
        if b1 is not None and need[2]:
            db1 = torch.empty_like(b1)
            torch.sum(first, 0, out=db1[:h])
            torch.sum(second, 0, out=db1[h:])
        return dx, dw1, db1, dw2, db2, None, None

    @staticmethod
    def jvp(ctx: Any, tx: Any, tw1: Any, tb1: Any, tw2: Any, tb2: Any, *_: Any) -> Tensor:
        x, w1, _b1, w2, _b2, g, u, ag, hh = ctx.saved_tensors
        tp = torch.zeros(g.shape[0], 2 * g.shape[1], dtype=g.dtype, device=g.device)
        if tx is not None:
            tp = tp + F.linear(tx, w1)
        if tw1 is not None:
            tp = tp + F.linear(x, tw1)
        if tb1 is not None:
            tp = tp + tb1
        tg, tu = _halves(tp, ctx.gate_first, dim=-1)
        th = _act_derivative(ctx.kind, g) * tg * u + ag * tu
        ty = F.linear(th, w2)
        if tw2 is not None:
            ty = ty + F.linear(hh, tw2)
        if tb2 is not None:
            ty = ty + tb2
        return ty


def _split_autograd(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    kind: str,
    gate_first: bool,
) -> Tensor:
    """The split layout's two token-major GEMMs on ``w1``'s row blocks, differentiated by
    autograd (``"split-autograd"``; module docstring, "Host-bound steps"): timm's ``SwiGLU``
    expression on views of the packed weight, whose two weight-gradient halves autograd joins
    with one ``cat`` (the backward of ``chunk``)."""
    wg, wu = _halves(w1, gate_first)
    bg, bu = (None, None) if b1 is None else _halves(b1, gate_first)
    return F.linear(_act(kind, F.linear(x, wg, bg)) * F.linear(x, wu, bu), w2, b2)


def _double_backward(ctx: Any, saved: tuple[Any, ...], dy: Tensor) -> tuple[Tensor | None, ...]:
    inputs = list(saved)
    idx = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        x, w1, b1, w2, b2 = saved
        y = _plain(x, w1, b1, w2, b2, ctx.kind, ctx.gate_first)
        grads = torch.autograd.grad(
            y, [inputs[i] for i in idx], dy.to(y.dtype), create_graph=True, allow_unused=True
        )
    out: list[Tensor | None] = [None] * 7
    for i, gr in zip(idx, grads, strict=True):
        out[i] = gr
    return tuple(out)


_LAYOUTS = ("auto", "feature", "split", "split-autograd")


def fused_gated_mlp(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    kind: str,
    gate_first: bool = True,
    layout: str = "auto",
) -> Tensor:
    """``F.linear(act(g) * u, w2, b2)`` with ``g, u`` the halves of ``F.linear(x, w1, b1)``.

    Same values (up to the order of floating-point sums) and gradients as the token-major
    expression, computed feature-major (see the module docstring). ``kind`` is a
    :func:`fused_gate_kind` key; ``gate_first`` says whether ``w1``'s first ``h`` rows are the
    gate. Under autocast the inputs are cast to the autocast dtype first, as ``F.linear``
    would cast them (autograd sees the casts, so gradients come back in the inputs' dtypes and
    only the cast copy of ``x`` is kept, as in the plain block), except on ``"split-autograd"``,
    which runs timm's ``SwiGLU`` casts (one cast of ``x`` per GEMM; the module docstring,
    "autocast"). Under torch.func transforms,
    ``torch.compile``/``torch.export`` and ``torch.jit.trace`` this is the plain expression.

    ``layout``: ``"feature"`` (feature-major, one packed GEMM), ``"split"`` (token-major, two
    GEMMs on ``w1``'s row blocks, a hand-written backward), ``"split-autograd"`` (the same
    GEMMs, differentiated by autograd) or ``"auto"``: split for a 16-bit compute dtype with a
    bias ``b1`` and fewer than :data:`SPLIT_BELOW_IN_FEATURES` input features (as
    ``"split-autograd"`` where ``N·in·h`` is below :data:`SPLIT_AUTOGRAD_BELOW_MACS`),
    feature-major otherwise (measured; module docstring, "Split layout" and "Host-bound steps").
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, _LAYOUTS))}; got {layout!r}")
    if (
        # is_compiling() first: torch 2.4's dynamo cannot trace the functorch query (fullgraph)
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch.jit.is_tracing()
        # A dual level is open (forward-mode AD with dual tensors): the plain expression, whose
        # tangents are differentiable in turn (reverse-over-forward: a Jacobian-norm penalty).
        # The Function's jvp builds the tangent from saved intermediates, constants to autograd.
        or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
    ):
        return _plain(x, w1, b1, w2, b2, kind, gate_first)
    cdt = _autocast_dtype(x)
    if layout == "auto":
        # the compute dtype: autocast's, except for float64, which it never narrows
        compute = cdt if cdt is not None and x.dtype != torch.float64 else x.dtype
        split = b1 is not None and compute in (torch.bfloat16, torch.float16)
        if not split or x.shape[-1] >= SPLIT_BELOW_IN_FEATURES:
            layout = "feature"
        elif x.numel() * (w1.shape[0] // 2) < SPLIT_AUTOGRAD_BELOW_MACS:
            layout = "split-autograd"
        else:
            layout = "split"
    if layout == "split-autograd":
        # Plain differentiable ops (any shape of x), under autocast with autocast's own casts:
        # one cast of x per GEMM as in timm's SwiGLU, whose two input-gradient halves then meet
        # in float32. A single cast of x before both summed them in the 16-bit dtype (review,
        # session 23: input gradient 5.6e-3 relative RMS error against timm's 5.3e-3, not bit
        # for bit). The packed w1 and b1 are cast before they are split, as timm's two weights
        # each are: the backward of the split (a cat) then runs in the autocast dtype (split
        # first, bf16 weights under fp16 autocast failed in autocast's dtype check).
        if cdt is not None:
            w1 = _autocast_cast(w1, cdt)
            b1 = None if b1 is None else _autocast_cast(b1, cdt)
        return _split_autograd(x, w1, b1, w2, b2, kind, gate_first)
    if cdt is not None:
        x, w1, w2 = _autocast_cast(x, cdt), _autocast_cast(w1, cdt), _autocast_cast(w2, cdt)
        b1 = None if b1 is None else _autocast_cast(b1, cdt)
        b2 = None if b2 is None else _autocast_cast(b2, cdt)
    fn = _SplitFusedGatedMLP if layout == "split" else _FusedGatedMLP
    shape = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    y: Tensor
    if cdt is None:  # no autocast to turn off (the context costs host time at every call)
        y = fn.apply(x2, w1, b1, w2, b2, kind, gate_first)
    else:
        with torch.autocast(x.device.type, enabled=False):
            y = fn.apply(x2, w1, b1, w2, b2, kind, gate_first)
    return y if x.dim() == 2 else y.reshape(*shape[:-1], y.shape[-1])
