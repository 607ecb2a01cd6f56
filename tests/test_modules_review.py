"""Regressions of the GLU blocks found by an independent review: the fused (feature-major) path
under forward-mode AD, autocast with float64 blocks, batched gradients, its output layout;
state-dict conversion shape checks; activation closed forms in fp16; argument checks. The fused
path is the default only for 16-bit CUDA compute: ``fused=True`` runs the same code on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from glu_probe import GEGLU, MLP, SwiGLU, make_mlp
from glu_probe.activation_math import act, act_grad
from glu_probe.convert import convert_mlp_state_dict

torch.set_num_threads(1)


def _pair(cls=SwiGLU, **kw):
    torch.manual_seed(0)
    plain = cls(6, 5, 3, fused=False, **kw).double()
    fused = cls(6, 5, 3, fused=True, **kw).double()
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def test_reverse_over_forward_gradients_match_the_plain_block():
    """d/dθ ‖J_x v‖² with dual tensors (a Jacobian-norm penalty): the fused Function's jvp built
    the tangent from saved intermediates, so W1[0,0]'s gradient was -0.073 instead of -0.179."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 6, dtype=torch.float64)
    grads = []
    for block in _pair():
        with fwAD.dual_level():
            y = block(fwAD.make_dual(x, v))
            loss = fwAD.unpack_dual(y).tangent.pow(2).sum()
        grads.append(torch.autograd.grad(loss, [x, *block.parameters()], allow_unused=True))
    for a, b in zip(*grads, strict=True):  # fc2.bias does not enter the tangent: None on both
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert grads[1][0].abs().sum() > 0  # the input's gradient is not lost


@pytest.mark.parametrize("how", ["is_grads_batched", "vectorized_jacobian"])
def test_batched_gradients_through_the_fused_path(how):
    plain, fused = _pair()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    out = []
    for block in (plain, fused):
        if how == "is_grads_batched":
            y = block(x)
            eye = torch.eye(y.numel(), dtype=y.dtype).reshape(-1, *y.shape)
            out.append(torch.autograd.grad(y, x, eye, is_grads_batched=True)[0])
        else:
            out.append(torch.autograd.functional.jacobian(block, x, vectorize=True))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_output_is_contiguous(bias):
    plain, fused = _pair(bias=bias)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    y = fused(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y.view(2, -1), plain(x).view(2, -1), rtol=1e-12, atol=1e-12)


def test_float64_block_under_autocast_stays_float64():
    """Autocast never narrows float64; the fused path cast every operand to bf16 (error 2.5e-3)."""
    plain, fused = _pair()
    x = torch.randn(3, 6, dtype=torch.float64)
    want = plain(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gelu_tanh_derivative_has_no_overflow_in_fp16():
    t = torch.tensor([-1000.0, -50.0, -3.0, 0.0, 2.0, 50.0, 1000.0])
    ref = act_grad("gelu_tanh", t.double())
    half = act_grad("gelu_tanh", t.half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.double(), ref, rtol=2e-3, atol=2e-3)
    # and the closed form is GELU-tanh's derivative (autograd, float64)
    u = torch.linspace(-12, 12, 97, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(nn.functional.gelu(u, approximate="tanh").sum(), u)
    torch.testing.assert_close(act_grad("gelu_tanh", u.detach()), d, rtol=1e-12, atol=1e-12)


def test_unknown_activation_name_is_an_error():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        act("swish", torch.zeros(2))
    with pytest.raises(ValueError, match="unknown activation"):
        act_grad("SiLU", torch.zeros(2))


def test_conversion_checks_bias_shapes_and_gate_order_scope():
    sd = {
        "gate_proj.weight": torch.randn(5, 6),
        "up_proj.weight": torch.randn(5, 6),
        "down_proj.weight": torch.randn(6, 5),
        "gate_proj.bias": torch.arange(7.0),
        "up_proj.bias": torch.arange(3.0),
    }
    with pytest.raises(ValueError, match=r"gate_proj.bias \(7,\) does not match the 5 rows"):
        convert_mlp_state_dict(sd, "hf_llama", "glu_probe")
    ok = {k: v for k, v in sd.items() if not k.endswith("bias")}
    bad_down = {**ok, "down_proj.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"down_proj.bias \(4,\) does not match the 6 rows"):
        convert_mlp_state_dict(bad_down, "hf_llama", "glu_probe")
    with pytest.raises(ValueError, match="src_gate_first applies to packed layouts only"):
        convert_mlp_state_dict(ok, "hf_llama", "glu_probe", src_gate_first=False)


def test_argument_checks():
    block = SwiGLU(np.int64(8), np.int64(16))  # widths read from a config as numpy ints
    assert block.fc1.out_features == 32
    with pytest.raises(TypeError, match="not an activation function"):
        MLP(4, 8, act_layer=torch.relu)
    with pytest.raises(TypeError, match="fixes the activation"):
        make_mlp("swiglu", 4, 8, act_layer=nn.GELU)
    tanh = make_mlp("gelu", 4, 8, approximate="tanh")
    assert isinstance(tanh.act, nn.GELU) and tanh.act.approximate == "tanh"
    assert make_mlp("geglu", 4, 8, approximate="tanh").act.approximate == "tanh"
    assert isinstance(GEGLU(4, 8), GEGLU)
