"""Findings of the session-24 reviews of the blocks' signatures and of the timm init of
swapped blocks (each test fails on the code before it)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from glu_probe import GLU, MLP, GatedMLP, SwiGLU, swap_mlp

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("cls", [GatedMLP, SwiGLU, GLU])
def test_a_gated_block_takes_use_conv_eighth_and_the_rest_by_keyword(cls):
    """timm's GluMlp takes use_conv eighth; ours took packed there: GatedMLP(..., drop, True)
    built a linear, packed block without a word."""
    block = cls(8, 6, 4, nn.SiLU, None, True, 0.0, True)
    assert block.use_conv and isinstance(block.fc1, nn.Conv2d)
    with pytest.raises(TypeError):
        cls(8, 6, 4, nn.SiLU, None, True, 0.0, False, True)  # packed is keyword-only


def test_a_positional_call_in_timm_swiglus_order_fails_loudly():
    """timm's SwiGLU takes align_to eighth: SwiGLU(..., 0.0, 8) read as packed=8 before."""
    with pytest.raises(TypeError, match="use_conv must be a bool"):
        SwiGLU(8, 6, 4, nn.SiLU, None, True, 0.0, 8)
    assert SwiGLU(8, 6, 4, align_to=8).hidden_features == 8


def test_mlp_takes_timms_positional_device_and_dtype():
    """timm's Mlp has device, dtype after use_conv; ours had init there (a device was called)."""
    block = MLP(8, 6, 4, nn.GELU, None, True, 0.0, False, "cpu", torch.float64)
    assert block.fc1.weight.dtype == torch.float64


@pytest.mark.parametrize("packed", [True, False])
def test_a_conv_block_takes_unbatched_and_vmapped_inputs(packed):
    """The packed conv block split dim 1 (H of an unbatched (C, H, W) input) in two."""
    torch.manual_seed(0)
    block = SwiGLU(6, 5, 3, use_conv=True, packed=packed).double()
    x = torch.randn(4, 6, 3, 7, dtype=torch.float64)
    g, u = block.gate_params(), block.up_params()
    conv = nn.functional.conv2d
    h = nn.functional.silu(conv(x, g[0], g[1])) * conv(x, u[0], u[1])
    want = conv(h, block.fc2.weight, block.fc2.bias)
    torch.testing.assert_close(block(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block(x[1]), want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.vmap(block)(x), want, rtol=1e-12, atol=1e-12)


def _std_and_bias(layer: nn.Module) -> tuple[float, float]:
    return float(layer.weight.std()), float(layer.bias.abs().max())


def test_a_conv_mlp_host_outside_convnext_gets_timms_init():
    """FocalNet's Mlp(use_conv=True): the ViT init drew Linear layers only, and the swapped
    blocks' 1x1 convs kept torch's default (std 0.05-0.10, biases up to 0.18)."""
    from timm.models.focalnet import FocalNet

    torch.manual_seed(0)
    host = FocalNet(depths=(1, 1, 1, 1), embed_dim=32, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swap_mlp(host, "gelu")
    mlp = host.layers[0].blocks[0].mlp
    for layer in (mlp.fc1, mlp.fc2):
        std, bias = _std_and_bias(layer)
        assert isinstance(layer, nn.Conv2d)
        assert std == pytest.approx(0.02, rel=0.1) and bias == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swap_mlp(host, "swiglu")
    mlp = host.layers[0].blocks[0].mlp
    up_w, up_b = mlp.up_params()
    gate_w, gate_b = mlp.gate_params()
    assert float(up_w.std()) == pytest.approx(0.02, rel=0.1) and float(up_b.abs().max()) == 0
    assert float(gate_w.std()) < 1e-5 and torch.all(gate_b == 1)  # timm SwiGLU's gate rule
    assert _std_and_bias(mlp.fc2)[0] == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("conv_mlp", [True, False])
def test_a_features_only_backbone_gets_its_familys_init(conv_mlp):
    """timm.create_model(..., features_only=True) wraps the stages in a FeatureListNet (no
    forward_features): its swapped blocks got the ViT rules (gate 1e-6 / 1, default convs)
    instead of ConvNeXt's trunc_normal(0.02) / zero bias."""
    stats = []
    for features_only in (False, True):
        torch.manual_seed(0)
        kw = {"features_only": True} if features_only else {}
        host = timm.create_model("convnext_atto", depths=(1, 1, 1, 1), conv_mlp=conv_mlp, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            swap_mlp(host, "swiglu")
        mlp = (host.stages_0 if features_only else host.stages[0]).blocks[0].mlp
        gate_w, gate_b = mlp.gate_params()
        stats.append((float(gate_w.std()), float(gate_b.abs().max()), *_std_and_bias(mlp.fc2)))
    plain, wrapped = stats
    assert plain[0] == pytest.approx(0.02, rel=0.1) and plain[1] == 0.0 and plain[3] == 0.0
    assert wrapped == pytest.approx(plain, rel=0.1, abs=1e-12)
