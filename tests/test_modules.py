"""glu_probe.modules: numerics against direct float64 formulas, parameter matching, timm use."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glu_probe.modules import (
    GEGLU,
    GLU,
    MLP,
    VARIANTS,
    Bilinear,
    GatedMLP,
    ReGLU,
    SwiGLU,
    dense_hidden_features,
    gated_hidden_features,
    make_mlp,
    mlp_num_params,
)

torch.set_num_threads(1)

GATES = {
    "glu": torch.sigmoid,
    "bilinear": lambda t: t,
    "reglu": torch.relu,
    "geglu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
    "swiglu": lambda t: t * torch.sigmoid(t),
}
ACTS = {
    "relu": torch.relu,
    "gelu": GATES["geglu"],
    "silu": GATES["swiglu"],
}


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("variant", sorted(GATES))
@pytest.mark.parametrize("packed", [True, False])
def test_gated_variant_matches_formula(variant: str, packed: bool) -> None:
    torch.manual_seed(0)
    m: Any = make_mlp(variant, 5, 7, 3, packed=packed, dtype=torch.float64)
    x = _x(4, 6, 5)
    wg, bg = m.gate_params()
    wu, bu = m.up_params()
    expected = (GATES[variant](x @ wg.T + bg) * (x @ wu.T + bu)) @ m.fc2.weight.T + m.fc2.bias
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", sorted(ACTS))
def test_dense_variant_matches_formula(variant: str) -> None:
    m: Any = make_mlp(variant, 5, 7, 3, dtype=torch.float64)
    x = _x(4, 5)
    expected = ACTS[variant](x @ m.fc1.weight.T + m.fc1.bias) @ m.fc2.weight.T + m.fc2.bias
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)


def test_packed_layout_is_gate_first_and_matches_unpacked() -> None:
    assert GatedMLP.GATE_FIRST is True
    torch.manual_seed(0)
    p: Any = SwiGLU(6, 4, packed=True, dtype=torch.float64)
    u: Any = SwiGLU(6, 4, packed=False, dtype=torch.float64)
    with torch.no_grad():
        u.fc1_g.weight.copy_(p.fc1.weight[:4])
        u.fc1_x.weight.copy_(p.fc1.weight[4:])
        u.fc1_g.bias.copy_(p.fc1.bias[:4])
        u.fc1_x.bias.copy_(p.fc1.bias[4:])
        u.fc2.load_state_dict(p.fc2.state_dict())
    x = _x(3, 6)
    p.fused = False  # the token-major packed expression: bitwise the unpacked block
    torch.testing.assert_close(p(x), u(x), rtol=0, atol=0)
    p.fused = True  # feature-major (another GEMM order): equal up to float64 rounding
    torch.testing.assert_close(p(x), u(x), rtol=1e-14, atol=1e-15)
    assert p.gate_params()[0].data_ptr() == p.fc1.weight.data_ptr()  # a view, no copy


def test_geglu_tanh_and_gate_is_fixed() -> None:
    m = GEGLU(4, 3, approximate="tanh", act_layer=nn.ReLU)  # act_layer ignored
    assert isinstance(m.act, nn.GELU) and m.act.approximate == "tanh"
    for cls, act in (
        (GLU, nn.Sigmoid),
        (Bilinear, nn.Identity),
        (ReGLU, nn.ReLU),
        (SwiGLU, nn.SiLU),
    ):
        assert type(cls(4, 3, act_layer=nn.GELU).act) is act
    custom = GatedMLP(4, 3, act_layer="gelu_tanh")
    assert isinstance(custom.act, nn.GELU) and custom.act.approximate == "tanh"


def test_options_bias_drop_norm_conv() -> None:
    m: Any = SwiGLU(8, 6, 4, bias=(True, False), drop=(0.1, 0.2), norm_layer=nn.LayerNorm)
    assert m.fc1.bias is not None and m.fc2.bias is None
    assert (m.drop1.p, m.drop2.p) == (0.1, 0.2)
    assert isinstance(m.norm, nn.LayerNorm) and m.norm.normalized_shape == (6,)
    assert sum(p.numel() for p in m.parameters()) == 2 * 8 * 6 + 2 * 6 + 6 * 4 + 2 * 6
    conv: Any = SwiGLU(8, 6, use_conv=True, dtype=torch.float64)
    lin: Any = SwiGLU(8, 6, dtype=torch.float64)
    with torch.no_grad():
        lin.fc1.weight.copy_(conv.fc1.weight[:, :, 0, 0])
        lin.fc1.bias.copy_(conv.fc1.bias)
        lin.fc2.weight.copy_(conv.fc2.weight[:, :, 0, 0])
        lin.fc2.bias.copy_(conv.fc2.bias)
    x = _x(2, 8, 3, 3)
    torch.testing.assert_close(conv(x), lin(x.movedim(1, -1)).movedim(-1, 1))


def test_init_default_custom_and_init_weights() -> None:
    torch.manual_seed(0)
    m = SwiGLU(64, 48)
    bound = 1 / math.sqrt(64)  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert m.fc1.weight.abs().max() <= bound
    assert m.fc1.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    seen: list[tuple[int, ...]] = []

    def init(w: torch.Tensor, b: torch.Tensor | None) -> None:
        seen.append(tuple(w.shape))
        nn.init.constant_(w, 0.5)

    c = SwiGLU(4, 3, 2, init=init)
    assert seen == [(3, 4), (3, 4), (2, 3)]
    assert torch.all(c.fc1.weight == 0.5) and torch.all(c.fc2.weight == 0.5)
    m.init_weights()
    wg, bg = m.gate_params()
    assert wg.abs().max() < 1e-4 and bg is not None and bool((bg == 1).all())
    assert m.up_params()[0].abs().max() > 1e-3  # up untouched


def test_timm_vit_accepts_our_blocks() -> None:
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    for layer in (SwiGLU, GEGLU, MLP, GatedMLP):
        vit = timm_vit.VisionTransformer(
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=1,
            num_heads=2,
            num_classes=10,
            mlp_layer=layer,
        )
        mlp = vit.blocks[0].mlp
        assert isinstance(mlp, layer) and mlp.hidden_features == 256
        out = vit(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10)
    # timm's init calls our init_weights, as for its own SwiGLU.
    vit = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, mlp_layer=SwiGLU
    )
    assert torch.all(vit.blocks[0].mlp.gate_params()[1] == 1)


@pytest.mark.parametrize("bias", [True, False, (True, False)])
@pytest.mark.parametrize(
    ("d_in", "d_out", "hidden"), [(64, 64, 256), (48, 32, 200), (768, 768, 3072)]
)
def test_param_matching_closed_form(bias, d_in: int, d_out: int, hidden: int) -> None:
    b1, b2 = bias if isinstance(bias, tuple) else (bias, bias)
    dense = (d_in + d_out + b1) * hidden + b2 * d_out
    assert mlp_num_params(d_in, hidden, d_out, bias) == dense
    assert sum(p.numel() for p in MLP(d_in, hidden, d_out, bias=bias).parameters()) == dense
    for mult in (1, 8):
        h = gated_hidden_features(d_in, hidden, d_out, bias, multiple_of=mult)
        assert h % mult == 0
        gated = (2 * d_in + d_out + 2 * b1) * h + b2 * d_out
        assert sum(p.numel() for p in SwiGLU(d_in, h, d_out, bias=bias).parameters()) == gated
        # brute force: no multiple of `mult` is closer
        best = min(
            range(mult, 4 * hidden, mult),
            key=lambda k: abs(mlp_num_params(d_in, k, d_out, bias, gated=True) - dense),
        )
        assert abs(gated - dense) == abs(
            mlp_num_params(d_in, best, d_out, bias, gated=True) - dense
        )
        # inverse
        back = dense_hidden_features(d_in, h, d_out, bias, multiple_of=mult)
        target = mlp_num_params(d_in, h, d_out, bias, gated=True)
        best_d = min(
            range(mult, 4 * hidden, mult),
            key=lambda k: abs(mlp_num_params(d_in, k, d_out, bias) - target),
        )
        assert abs(mlp_num_params(d_in, back, d_out, bias) - target) == abs(
            mlp_num_params(d_in, best_d, d_out, bias) - target
        )
    # The 2/3 rule, exactly, without biases: 3h' = 2h.
    assert gated_hidden_features(96, 384, bias=False) == 256


def test_variants_table() -> None:
    assert set(VARIANTS) == {"glu", "bilinear", "reglu", "geglu", "swiglu", "relu", "gelu", "silu"}
    assert isinstance(make_mlp("GELU", 4, 8).act, nn.GELU)


def _ANY(value: Any) -> Any:  # hide deliberately wrong types from mypy
    return value


@pytest.mark.parametrize(
    ("call", "err", "msg"),
    [
        (lambda: SwiGLU(0), ValueError, "in_features must be a positive int"),
        (lambda: SwiGLU(4, -3), ValueError, "hidden_features must be a positive int"),
        (lambda: MLP(4, _ANY(2.5)), TypeError, "hidden_features must be a positive int"),
        (lambda: MLP(4, 8, act_layer="tanhh"), ValueError, "unknown activation 'tanhh'"),
        (lambda: MLP(4, 8, act_layer=3), TypeError, "act_layer must be"),
        (lambda: MLP(4, 8, drop=1.5), ValueError, "dropout probability"),
        (
            lambda: MLP(4, 8, bias=_ANY((True, True, False))),
            ValueError,
            "bias must be a scalar or a pair",
        ),
        (lambda: GEGLU(4, 8, approximate="fast"), ValueError, "approximate must be"),
        (lambda: make_mlp("swishglu", 4, 8), ValueError, "unknown MLP variant 'swishglu'"),
        (lambda: make_mlp("relu", 4, 8, act_layer=nn.GELU), TypeError, "fixes the activation"),
        (lambda: gated_hidden_features(64, 256, multiple_of=0), ValueError, "multiple_of"),
    ],
)
def test_bad_inputs(call, err, msg: str) -> None:
    with pytest.raises(err, match=msg):
        call()


def test_unknown_kwargs_warn() -> None:
    with pytest.warns(UserWarning, match=r"ignoring unsupported keyword arguments \['gate_last'\]"):
        SwiGLU(4, 4, gate_last=True)


def test_silu_gelu_formula_sanity() -> None:
    t = _x(10)
    torch.testing.assert_close(GATES["swiglu"](t), F.silu(t))
    torch.testing.assert_close(GATES["geglu"](t), F.gelu(t))
