"""Closed forms of the gate activations and their derivatives, φ(t) and φ'(t).

Shared by :mod:`glu_probe.theory` (the empirical NTK of the paper's two-layer nets, built without
autograd) and :mod:`glu_probe.gated_product` (the forward-mode rule of the fused gated MLP).
Names: ``"relu"``, ``"sigmoid"``, ``"silu"``, ``"gelu"`` (exact, erf), ``"gelu_tanh"``; any other
name is the identity (the bilinear gate). ``relu'(0) = 0``, torch's convention.
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
    return t


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
        th = torch.tanh(_TANH_C * (t + 0.044715 * t**3))
        return 0.5 * (1 + th) + 0.5 * t * (1 - th * th) * _TANH_C * (1 + 3 * 0.044715 * t * t)
    return torch.ones_like(t)
