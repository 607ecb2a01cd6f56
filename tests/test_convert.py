"""glu_probe.convert: exact round trips and functional equivalence across layouts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from glu_probe.convert import (
    LAYOUTS,
    convert_mlp_state_dict,
    from_hf_llama,
    from_timm_swiglu,
    to_hf_llama,
    to_timm_swiglu,
)
from glu_probe.modules import GLU, SwiGLU

torch.set_num_threads(1)


def _x() -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hf_llama_both_ways_functional() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, hidden_act="silu", num_attention_heads=2
    )
    hf = LlamaMLP(cfg).double()
    ours = SwiGLU(16, 24, bias=False, dtype=torch.float64)
    ours.load_state_dict(from_hf_llama(hf.state_dict()))
    torch.testing.assert_close(ours(_x()), hf(_x()), rtol=1e-12, atol=1e-12)
    _same(to_hf_llama(ours.state_dict()), hf.state_dict())
    unpacked = SwiGLU(16, 24, bias=False, packed=False, dtype=torch.float64)
    unpacked.load_state_dict(from_hf_llama(hf.state_dict(), packed=False))
    torch.testing.assert_close(unpacked(_x()), hf(_x()), rtol=1e-12, atol=1e-12)
    _same(to_hf_llama(unpacked.state_dict(), packed=False), hf.state_dict())


@pytest.mark.parametrize("norm", [False, True])
def test_timm_swiglu_both_ways_functional(norm: bool) -> None:
    layers = pytest.importorskip("timm.layers")
    kw: dict[str, Any] = {"norm_layer": nn.LayerNorm} if norm else {}
    t = layers.SwiGLU(16, 24, **kw).double()
    nn.init.normal_(t.norm.weight) if norm else None
    ours = SwiGLU(16, 24, dtype=torch.float64, **kw)
    ours.load_state_dict(from_timm_swiglu(t.state_dict()))
    torch.testing.assert_close(ours(_x()), t(_x()), rtol=1e-12, atol=1e-12)
    _same(to_timm_swiglu(ours.state_dict()), t.state_dict())


@pytest.mark.parametrize("packed", [True, False])
def test_timm_swiglu_align_to(packed: bool) -> None:
    """``align_to`` rounds the gated width up as timm's SwiGLU does (EVA passes it): 100 -> 104
    with align_to=8; the same weights give the same function; a bad value is refused."""
    layers = pytest.importorskip("timm.layers")
    t = layers.SwiGLU(16, 100, align_to=8).double()
    ours = SwiGLU(16, 100, align_to=8, packed=packed, dtype=torch.float64)
    assert ours.hidden_features == t.fc1_g.out_features == 104
    ours.load_state_dict(from_timm_swiglu(t.state_dict(), packed=packed))
    torch.testing.assert_close(ours(_x()), t(_x()), rtol=1e-12, atol=1e-12)
    assert SwiGLU(16, 104, align_to=8).hidden_features == 104  # already aligned: unchanged
    assert SwiGLU(16, 100, align_to=0).hidden_features == 100
    for bad in (-8, 2.5, True, "8"):
        with pytest.raises(ValueError, match="align_to must be a non-negative int"):
            SwiGLU(16, 100, align_to=bad)


def test_timm_packed_layouts() -> None:
    layers = pytest.importorskip("timm.layers")
    packed = layers.SwiGLUPacked(16, 48).double()  # packed width 48 -> gated 24, gate first
    ours = SwiGLU(16, 24, dtype=torch.float64)
    ours.load_state_dict(
        convert_mlp_state_dict(packed.state_dict(), "timm_swiglu_packed", "glu_probe")
    )
    torch.testing.assert_close(ours(_x()), packed(_x()), rtol=1e-12, atol=1e-12)
    glu = layers.GluMlp(16, 48).double()  # sigmoid, gate_last=True: rows [up; gate]
    ours_glu = GLU(16, 24, dtype=torch.float64)
    ours_glu.load_state_dict(convert_mlp_state_dict(glu.state_dict(), "timm_glu", "glu_probe"))
    torch.testing.assert_close(ours_glu(_x()), glu(_x()), rtol=1e-12, atol=1e-12)
    # explicit order override equals the named layout
    _same(
        convert_mlp_state_dict(
            glu.state_dict(), "timm_swiglu_packed", "glu_probe", src_gate_first=False
        ),
        convert_mlp_state_dict(glu.state_dict(), "timm_glu", "glu_probe"),
    )


@pytest.mark.parametrize("src", LAYOUTS)
@pytest.mark.parametrize("dst", LAYOUTS)
def test_round_trip_all_pairs_exact(src: str, dst: str) -> None:
    base = SwiGLU(8, 6, 4).state_dict()  # glu_probe layout with biases
    sd = convert_mlp_state_dict(base, "glu_probe", src)
    there = convert_mlp_state_dict(sd, src, dst)
    _same(convert_mlp_state_dict(there, dst, src), sd)
    _same(
        convert_mlp_state_dict(convert_mlp_state_dict(sd, src, "glu_probe"), "glu_probe", src), sd
    )


def test_prefix_converts_one_block_only() -> None:
    blocks = {
        f"layers.{i}.mlp.{k}": v for i in range(2) for k, v in SwiGLU(8, 6).state_dict().items()
    }
    blocks["embed.weight"] = torch.ones(3)
    out = to_hf_llama(blocks, prefix="layers.1.mlp.")
    assert "layers.1.mlp.gate_proj.weight" in out and "layers.0.mlp.fc1.weight" in out
    assert torch.equal(out["embed.weight"], blocks["embed.weight"])
    assert torch.equal(out["layers.1.mlp.up_proj.weight"], blocks["layers.1.mlp.fc1.weight"][6:])
    # without the trailing dot the prefix would also take layers.10.mlp and leave ".weight"
    with pytest.raises(KeyError, match=r"end it with a dot \('layers\.1\.mlp\.'\)"):
        to_hf_llama(blocks, prefix="layers.1.mlp")


def test_mixed_dtypes_and_conv_weights_are_refused() -> None:
    hf = to_hf_llama(SwiGLU(8, 6).state_dict())
    hf["gate_proj.bias"], hf["up_proj.bias"] = torch.zeros(6, dtype=torch.float64), torch.zeros(6)
    with pytest.raises(ValueError, match=r"different dtypes \['torch.float32', 'torch.float64'\]"):
        from_hf_llama(hf)  # packing would have promoted the bias to float64 silently
    conv = SwiGLU(8, 6, use_conv=True).state_dict()
    with pytest.raises(ValueError, match="not 2-D Linear weights"):
        to_hf_llama(conv)


def test_errors() -> None:
    sd = SwiGLU(8, 6).state_dict()
    with pytest.raises(ValueError, match="unknown state-dict layout 'llama'"):
        convert_mlp_state_dict(sd, "glu_probe", "llama")
    with pytest.raises(KeyError, match=r"missing key 'gate_proj.weight'"):
        from_hf_llama(sd)
    with pytest.raises(KeyError, match=r"unexpected keys .*'extra'"):
        to_hf_llama({**sd, "extra": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"no keys start with prefix 'blocks.0.'"):
        to_hf_llama(sd, prefix="blocks.0.")
    bad = dict(sd)
    bad["fc1.weight"] = torch.zeros(13, 8)
    with pytest.raises(ValueError, match="odd number of rows 13"):
        to_hf_llama(bad)
    bad = dict(sd)
    bad["fc2.weight"] = torch.zeros(8, 5)
    with pytest.raises(ValueError, match="does not take the gated width 6"):
        to_hf_llama(bad)
    with pytest.raises(ValueError, match=r"inner norm .* that LlamaMLP cannot hold"):
        to_hf_llama(SwiGLU(8, 6, norm_layer=nn.LayerNorm).state_dict())
    hf = to_hf_llama(sd)
    hf["up_proj.weight"] = torch.zeros(5, 8)
    with pytest.raises(ValueError, match=r"gate weight \(6, 8\) and up weight \(5, 8\) differ"):
        from_hf_llama(hf)


@pytest.mark.parametrize(
    "key,tensor,layout",
    [
        ("fc1.weight", torch.zeros(12), "glu_probe"),  # a 1-D packed weight
        ("fc1.bias", torch.tensor(0.0), "glu_probe"),  # a 0-d bias
        ("fc2.weight", torch.zeros(6), "glu_probe"),  # a 1-D output weight
    ],
)
def test_malformed_weights_and_biases_are_refused_by_name(key, tensor, layout) -> None:
    """(Review, session 17.) A weight that is not a matrix (or a 1x1 conv kernel) or a bias
    that is not a vector raises a ValueError naming the key; they were accepted (1-D weights
    came out 1-D) or failed with a bare IndexError or a misleading message."""
    sd = SwiGLU(4, 6).state_dict()
    sd[key] = tensor
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_mlp_state_dict(sd, layout, "hf_llama")
    llama = {
        "gate_proj.weight": torch.zeros(6),
        "up_proj.weight": torch.zeros(6),
        "down_proj.weight": torch.zeros(4, 6),
    }
    with pytest.raises(ValueError, match=r"gate_proj\.weight"):
        from_hf_llama(llama)
