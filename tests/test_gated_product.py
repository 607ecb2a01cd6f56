"""The packed gated product's copy-free backward against the plain ``chunk`` expression.

Ground truth: autograd of ``act(g) * u`` after ``chunk`` (float64), and finite-difference-free
checks through ``torch.autograd.gradcheck`` / ``gradgradcheck`` / forward-mode ``fwAD``.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from glu_probe.gated_product import _PackedGatedProduct, fused_gate_kind, packed_gated_product
from glu_probe.modules import GEGLU, GLU, Bilinear, GatedMLP, ReGLU, SwiGLU

ACTS = {
    "silu": nn.SiLU(),
    "sigmoid": nn.Sigmoid(),
    "relu": nn.ReLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "identity": nn.Identity(),
}


def _plain(gu: torch.Tensor, act: nn.Module, dim: int, gate_first: bool) -> torch.Tensor:
    a, b = gu.chunk(2, dim=dim)
    g, u = (a, b) if gate_first else (b, a)
    return act(g) * u


@pytest.mark.parametrize("kind", sorted(ACTS))
@pytest.mark.parametrize("dim,gate_first", [(-1, True), (-1, False), (1, True)])
def test_values_and_gradients_match_the_plain_expression(kind, dim, gate_first):
    torch.manual_seed(0)
    act = ACTS[kind]
    assert fused_gate_kind(act) == kind
    shape = (3, 8, 5, 4) if dim == 1 else (3, 5, 8)
    gu = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(_plain(gu, act, dim, gate_first))
    ref = _plain(gu, act, dim, gate_first)
    (g_ref,) = torch.autograd.grad(ref, gu, dy)
    out = packed_gated_product(gu, act, dim, gate_first)
    assert out.grad_fn is not None and "PackedGatedProduct" in type(out.grad_fn).__name__
    (g_out,) = torch.autograd.grad(out, gu, dy)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-14, atol=1e-14)
    assert g_out.is_contiguous() and g_out.shape == gu.shape


@pytest.mark.parametrize("kind", ["silu", "sigmoid", "gelu", "gelu_tanh", "identity"])
def test_gradcheck_gradgradcheck_and_forward_mode(kind):
    """Double backward (create_graph) and forward-mode AD against finite differences."""
    torch.manual_seed(1)
    gu = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def f(t: torch.Tensor) -> torch.Tensor:
        return _PackedGatedProduct.apply(t, kind, -1, True)

    assert torch.autograd.gradcheck(f, (gu,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (gu,))


def test_relu_forward_mode_and_double_backward_away_from_the_kink():
    gu = torch.randn(4, 6, dtype=torch.float64)
    gu = (gu.sign() * (gu.abs() + 0.1)).requires_grad_()  # no entry within 0.1 of the kink

    def f(t: torch.Tensor) -> torch.Tensor:
        return _PackedGatedProduct.apply(t, "relu", -1, True)

    assert torch.autograd.gradcheck(f, (gu,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (gu,))


def test_dual_tensor_jvp_matches_the_plain_expression():
    torch.manual_seed(2)
    gu = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randn_like(gu)
    act = nn.SiLU()
    with fwAD.dual_level():
        y = packed_gated_product(fwAD.make_dual(gu, t), act)
        tan = fwAD.unpack_dual(y).tangent
    _, ref = torch.func.jvp(lambda z: _plain(z, act, -1, True), (gu.detach(),), (t,))
    torch.testing.assert_close(tan, ref, rtol=1e-14, atol=1e-14)


def test_plain_path_outside_eager_training():
    """No grad, torch.func transforms and unknown activations run the plain ops."""
    gu = torch.randn(2, 8, requires_grad=True)
    with torch.no_grad():
        assert packed_gated_product(gu, nn.SiLU()).grad_fn is None
    seen: list[str] = []

    def f(t: torch.Tensor) -> torch.Tensor:
        y = packed_gated_product(t, nn.SiLU())
        seen.append(type(y.grad_fn).__name__ if y.grad_fn is not None else "none")
        return y

    torch.func.vmap(f)(gu)
    torch.func.jacrev(f)(gu[0])
    assert not any("PackedGatedProduct" in s for s in seen)

    class MySiLU(nn.SiLU):  # a subclass may override forward: never fused
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    assert fused_gate_kind(MySiLU()) is None
    y = packed_gated_product(gu, MySiLU())
    torch.testing.assert_close(y, _plain(gu, MySiLU(), -1, True))
    assert "PackedGatedProduct" not in type(y.grad_fn).__name__


@pytest.mark.parametrize("cls", [SwiGLU, GLU, ReGLU, Bilinear, GEGLU])
@pytest.mark.parametrize("use_conv", [False, True])
def test_fused_and_unfused_blocks_train_identically(cls, use_conv):
    """Same weights: the loss, every parameter gradient and one SGD step agree in float64."""
    torch.manual_seed(3)
    kw = dict(bias=True, use_conv=use_conv, dtype=torch.float64)
    fused = cls(6, 10, 5, **kw)
    plain = cls(6, 10, 5, fused=False, **kw)
    plain.load_state_dict(fused.state_dict())
    assert fused.fused and not plain.fused
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64) if use_conv else torch.randn(4, 7, 6)
    x = x.to(torch.float64)
    for m in (fused, plain):
        m.zero_grad()
        m(x).square().sum().backward()
    for (n, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=1e-13, msg=n)


def test_bfloat16_autocast_matches_the_plain_path():
    torch.manual_seed(4)
    fused, plain = SwiGLU(32, 48), SwiGLU(32, 48, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(16, 32)
    grads = []
    for m in (fused, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads.append(m.fc1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-2)


def test_custom_gate_activation_keeps_the_plain_path():
    m = GatedMLP(4, 6, act_layer=nn.Tanh)
    x = torch.randn(3, 4)
    y = m(x)
    y.sum().backward()
    g, u = m.fc1(x).chunk(2, -1)
    torch.testing.assert_close(y, m.fc2(torch.tanh(g) * u))
