"""Findings of the session-21 review of the blocks (each test fails on the code before it)."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from conftest import ran_fused
from torch import nn

import glu_probe
from glu_probe import GatedMLP, SwiGLU


def test_monte_carlo_dropout_in_an_eval_model_drops_on_the_fused_path():
    """``model.eval()`` then the ``nn.Dropout`` modules back in training mode (MC dropout): the
    gate dropout is active, so the fused path (which would skip it) is not taken and the block
    draws the same masks as the plain path (it dropped nothing before: 0 spread over 8 passes)."""
    torch.manual_seed(0)
    fused = SwiGLU(16, 32, drop=(0.5, 0.0), fused=True).eval()
    plain = SwiGLU(16, 32, drop=(0.5, 0.0), fused=False).eval()
    plain.load_state_dict(fused.state_dict())
    for m in (fused, plain):
        m.drop1.train()
    x = torch.randn(4, 16)
    torch.manual_seed(1)
    outs = [fused(x) for _ in range(8)]
    torch.manual_seed(1)
    refs = [plain(x) for _ in range(8)]
    for a, b in zip(outs, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.stack(outs).std(0).max() > 1e-2
    fused.drop1.eval()
    assert ran_fused(fused(x))  # all dropout inactive again: fused


@pytest.mark.parametrize("kw", [{}, {"fused": True}, {"packed": False}, {"fused": False}])
def test_blocks_trace_symbolically(kw):
    """``torch.fx.symbolic_trace`` (timm's ``create_feature_extractor``) traces every gated
    block: the fused path's checks branched on the input, a Proxy there."""
    torch.manual_seed(0)
    m = SwiGLU(8, 12, **kw)
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(gm(x), m(x), rtol=1e-6, atol=1e-6)


def test_timm_feature_extractor_on_a_vit_with_our_swiglu():
    timm = pytest.importorskip("timm")
    from timm.models import create_feature_extractor

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_layer=SwiGLU
    ).eval()
    fx = create_feature_extractor(vit, return_nodes={"blocks.1.mlp.fc2": "mlp_out"})
    x = torch.randn(2, 3, 16, 16)
    seen = {}
    vit.blocks[1].mlp.fc2.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    vit(x)
    torch.testing.assert_close(fx(x)["mlp_out"], seen["o"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", [nn.SiLU, nn.ReLU, nn.Hardswish])
@pytest.mark.parametrize("fused", [None, False, True])
def test_in_place_gate_activation_on_the_packed_layout(act, fused):
    """``act_layer=partial(nn.SiLU, inplace=True)``: the packed block's plain path applied it to
    a view returned by ``chunk``, which autograd refuses (a RuntimeError on the CPU and in fp32,
    where the same model ran on CUDA bf16). Values and gradients equal the out-of-place
    block's."""
    torch.manual_seed(0)
    m = GatedMLP(8, 6, act_layer=partial(act, inplace=True), fused=fused)
    ref = GatedMLP(8, 6, act_layer=act, fused=False)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 8, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    tol = 1e-6 if fused else 0.0  # the fused (feature-major) block sums in another order
    y, yr = m(x), ref(xr)
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    y.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=tol, atol=tol)
    for p, q in zip(m.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol)


class _ReportsCuda(torch.Tensor):
    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def test_fused_default_with_a_wrapped_output_layer_keeps_the_plain_path():
    """``fused=None`` read ``fc2.weight`` before checking ``fc2``'s type: a wrapped output layer
    (no ``weight``) raised AttributeError on CUDA inputs; the plain path calls it."""
    m = SwiGLU(8, 12)
    m.fc2 = nn.Sequential(nn.Linear(12, 8))
    x = torch.randn(2, 8).as_subclass(_ReportsCuda)
    assert m._fused_pays(x) is False


@pytest.mark.parametrize("mode", ["jax", "moco", ""])
def test_swap_into_a_xavier_initialised_vit_draws_the_up_half_as_timm_swiglu(mode):
    """timm ViT ``weight_init="jax"`` / ``"moco"`` initialise Linear layers with xavier_uniform,
    whose scale depends on fan-out: the packed ``fc1`` (2h rows) gave the up half
    √((d+h)/(d+2h)) of timm ``SwiGLU``'s std (0.059 against 0.079 at d=64, h=256 in the
    review). After the swap the up half has the std of a separate ``Linear(d, h)``; the gate
    keeps timm SwiGLU's rule (N(0, 1e-6²), bias 1) and the default mode keeps trunc_normal(0.02)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    d = 64
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=d, depth=2, num_heads=2, weight_init=mode
    )
    glu_probe.swap_mlp(vit, "swiglu", match="width")
    block = vit.blocks[0].mlp
    h = block.hidden_features
    up_w, up_b = block.up_params()
    gate_w, gate_b = block.gate_params()
    std = float(up_w.detach().std())
    if mode:
        expected = (2.0 / (d + h)) ** 0.5  # xavier_uniform of a (h, d) Linear
        assert abs(std / expected - 1) < 0.03, (std, expected)
        assert float(gate_w.abs().max()) < 1e-4 and torch.all(gate_b == 1)
    else:
        assert abs(std / 0.02 - 1) < 0.05, std  # trunc_normal(0.02), as before
    if mode == "jax":
        assert 0 < float(up_b.abs().max()) < 1e-4  # N(0, 1e-6²) biases in blocks named *mlp*
    elif mode == "moco":
        assert torch.all(up_b == 0)


def test_make_mlp_gelu_with_the_default_approximation_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = glu_probe.make_mlp("gelu", 4, 8, approximate="none")
    assert isinstance(m.act, nn.GELU) and m.act.approximate == "none"
