"""Closed forms of the gate activations and their derivatives, φ(t) and φ'(t).

Shared by :mod:`glu_probe.theory` (the empirical NTK of the paper's two-layer nets, built without
autograd) and :mod:`glu_probe.gated_product` (the forward-mode rule of the fused gated MLP).
Names: ``"relu"``, ``"sigmoid"``, ``"silu"``, ``"gelu"`` (exact, erf), ``"gelu_tanh"`` and
``"identity"`` (the bilinear gate); any other name raises ``ValueError``. ``relu'(0) = 0``,
torch's convention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["act", "act_grad"]

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)


#: Activation keys of :func:`act` / :func:`act_grad`.
KINDS = frozenset({"relu", "sigmoid", "silu", "gelu", "gelu_tanh", "identity"})
#: |t| beyond which tanh(c·(t + 0.044715·t³)) is ±1 in float64 (its argument exceeds 20).
_GELU_TANH_SATURATED = 10.0


def act(name: str, t: Tensor) -> Tensor:
    """φ(t)."""
    if name == "relu":
        return torch.relu(t)
    if name == "sigmoid":
        return torch.sigmoid(t)
    if name == "silu":
        return F.silu(t)
    if name == "gelu":
        return F.gelu(t)
    if name == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if name == "identity":
        return t
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(KINDS)}")


def act_grad(name: str, t: Tensor) -> Tensor:
    """φ'(t) in plain (differentiable) ops."""
    if name == "relu":
        return (t > 0).to(t.dtype)
    if name == "sigmoid":
        s = torch.sigmoid(t)
        return s * (1 - s)
    if name == "silu":
        s = torch.sigmoid(t)
        return s * (1 + t * (1 - s))
    if name == "gelu":  # Φ(t) + t·φ(t)
        return 0.5 * (1 + torch.erf(t / _SQRT2)) + t * torch.exp(-0.5 * t * t) * _INV_SQRT_2PI
    if name == "gelu_tanh":  # d/dt of 0.5·t·(1 + tanh(c·(t + 0.044715·t³)))
        # (1 − th²)·t·(1 + 3·0.044715·t²) is 0·inf = NaN once t³ overflows (fp16, |t| ≳ 40):
        # that factor is exactly 0 in any precision there (tanh saturates), so clamp t first.
        tc = t.clamp(-_GELU_TANH_SATURATED, _GELU_TANH_SATURATED)
        th = torch.tanh(_TANH_C * (tc + 0.044715 * tc**3))
        return 0.5 * (1 + th) + 0.5 * tc * (1 - th * th) * _TANH_C * (1 + 3 * 0.044715 * tc * tc)
    if name == "identity":
        return torch.ones_like(t)
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(KINDS)}")
