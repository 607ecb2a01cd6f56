"""The packed gated product ``act(g) ⊙ u`` with a copy-free backward.

A packed gated block computes ``gu = x W1ᵀ`` with ``W1 = [Wg; Wu]`` (one matmul) and splits
``gu`` into the gate ``g`` and the up projection ``u`` along the feature dimension. Written with
``chunk``, autograd's backward of the split is a ``cat`` of the two gradient halves: an extra
read and write of the (tokens, 2·hidden) gradient that unpacked blocks (timm ``SwiGLU``, HF
``LlamaMLP``) never do. In bf16 on a GPU the matmuls are fast enough that this memory traffic
shows (5–18% of forward+backward on an H200, ``benchmarks/RESULTS_mlp.md``).

:func:`packed_gated_product` is an :class:`torch.autograd.Function` whose backward writes
``∂L/∂g = ∂L/∂y ⊙ u ⊙ act'(g)`` and ``∂L/∂u = ∂L/∂y ⊙ act(g)`` straight into the two halves of
one buffer with the fused ``*_backward`` kernels of ATen, and which saves only ``gu`` (the plain
path also keeps ``act(g)``). Written by hand because no library op fuses a split with a
gated product's backward; torch.compile would, but it is not what a user's eager run uses.

Scope, so that nothing else changes:

* the gate activations with a closed-form ATen backward: ``nn.SiLU``, ``nn.Sigmoid``,
  ``nn.ReLU``, ``nn.GELU`` (exact or tanh) and ``nn.Identity`` (exact types, not subclasses,
  whose ``forward`` may differ); any other activation takes the plain ``chunk`` path;
* eager autograd only: under torch.func transforms (the NTK engine's ``vmap``/``jvp``/``vjp``)
  the plain path runs, so the engine differentiates exactly the same ops as before. Forward-mode
  AD with dual tensors is supported through :meth:`_PackedGatedProduct.jvp`, and a backward run
  with ``create_graph=True`` uses differentiable ops (double backward works).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fused_gate_kind", "packed_gated_product"]

_aten = torch.ops.aten


def fused_gate_kind(act: nn.Module) -> str | None:
    """The fused-backward key of an activation module, or ``None`` for the plain path."""
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


def _act(kind: str, g: Tensor) -> Tensor:
    if kind == "silu":
        return F.silu(g)
    if kind == "sigmoid":
        return torch.sigmoid(g)
    if kind == "relu":
        return F.relu(g)
    if kind == "gelu":
        return F.gelu(g)
    if kind == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    return g


def _act_derivative(kind: str, g: Tensor) -> Tensor:
    """``act'(g)`` in plain (differentiable) ops, for forward-mode AD."""
    if kind == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if kind == "sigmoid":
        s = torch.sigmoid(g)
        return s * (1 - s)
    if kind == "relu":
        return (g > 0).to(g.dtype)
    if kind == "gelu":  # Φ(g) + g·φ(g)
        return 0.5 * (1 + torch.erf(g * math.sqrt(0.5))) + g * torch.exp(-0.5 * g * g) / math.sqrt(
            2 * math.pi
        )
    if kind == "gelu_tanh":  # d/dg of 0.5·g·(1 + tanh(c·(g + 0.044715·g³)))
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (g + 0.044715 * g**3))
        return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * c * (1 + 3 * 0.044715 * g * g)
    return torch.ones_like(g)


def _act_backward_into(kind: str, grad: Tensor, g: Tensor, out: Tensor) -> None:
    """``out ← grad ⊙ act'(g)`` without a temporary (ATen ``out=`` overloads)."""
    if kind == "silu":
        _aten.silu_backward.grad_input(grad, g, grad_input=out)
    elif kind == "sigmoid":
        _aten.sigmoid_backward.grad_input(grad, torch.sigmoid(g), grad_input=out)
    elif kind == "relu":
        # threshold_backward has an out= overload too: zero where g <= 0.
        _aten.threshold_backward.grad_input(grad, g, 0, grad_input=out)
    elif kind in ("gelu", "gelu_tanh"):
        approx = "tanh" if kind == "gelu_tanh" else "none"
        _aten.gelu_backward.grad_input(grad, g, approximate=approx, grad_input=out)
    else:
        out.copy_(grad)


def _plain(gu: Tensor, kind: str, dim: int, gate_first: bool) -> Tensor:
    g, u = _halves(gu, dim, gate_first)
    return _act(kind, g) * u


def _halves(t: Tensor, dim: int, gate_first: bool) -> tuple[Tensor, Tensor]:
    a, b = t.chunk(2, dim=dim)
    return (a, b) if gate_first else (b, a)


class _PackedGatedProduct(torch.autograd.Function):
    """``y = act(g) ⊙ u`` for ``(g, u) = split(gu)``; see the module docstring."""

    @staticmethod
    def forward(gu: Tensor, kind: str, dim: int, gate_first: bool) -> Tensor:  # type: ignore[override]
        return _plain(gu, kind, dim, gate_first)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        gu, kind, dim, gate_first = inputs
        ctx.kind, ctx.dim, ctx.gate_first = kind, dim, gate_first
        ctx.save_for_backward(gu)
        ctx.save_for_forward(gu)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        (gu,) = ctx.saved_tensors
        kind, dim, gate_first = ctx.kind, ctx.dim, ctx.gate_first
        g, u = _halves(gu, dim, gate_first)
        if torch.is_grad_enabled():
            # create_graph=True: autograd of the plain expression, so that the result is itself
            # differentiable (ATen's fused *_backward kernels have no derivatives of their own).
            (dgu,) = torch.autograd.grad(
                _plain(gu, kind, dim, gate_first), gu, grad, create_graph=True
            )
            return dgu, None, None, None
        out = torch.empty_like(gu, dtype=torch.promote_types(gu.dtype, grad.dtype))
        og, ou = _halves(out, dim, gate_first)
        torch.mul(grad, _act(kind, g), out=ou)
        _act_backward_into(kind, grad * u, g, og)
        return out, None, None, None

    @staticmethod
    def jvp(ctx: Any, t_gu: Tensor, *_: Any) -> Tensor:
        (gu,) = ctx.saved_tensors
        g, u = _halves(gu, ctx.dim, ctx.gate_first)
        tg, tu = _halves(t_gu, ctx.dim, ctx.gate_first)
        return _act_derivative(ctx.kind, g) * tg * u + _act(ctx.kind, g) * tu


def packed_gated_product(
    gu: Tensor, act: nn.Module, dim: int = -1, gate_first: bool = True
) -> Tensor:
    """``act(g) ⊙ u`` where ``gu`` holds ``[g; u]`` (``gate_first``) or ``[u; g]`` along ``dim``.

    Same values and gradients as ``g, u = gu.chunk(2, dim); act(g) * u``; the backward writes the
    packed gradient into one buffer instead of concatenating two (see the module docstring for
    when the fused path applies; otherwise this *is* the plain expression).
    """
    kind = fused_gate_kind(act)
    if (
        kind is None
        or not (torch.is_grad_enabled() and gu.requires_grad)
        or torch._C._are_functorch_transforms_active()
    ):
        g, u = _halves(gu, dim, gate_first)
        return act(g) * u
    out: Tensor = _PackedGatedProduct.apply(gu, kind, dim, gate_first)
    return out
