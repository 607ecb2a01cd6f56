"""State-dict conversion between gated-MLP layouts: glu-probe, Hugging Face LLaMA, timm.

Every layout stores the same three projections of ``y = W2 (act(Wg x + bg) ⊙ (Wu x + bu)) + b2``
(weights in ``nn.Linear`` layout, ``(out, in)``):

================================  ===========================================================
layout                            keys
================================  ===========================================================
``"glu_probe"`` (packed)          ``fc1.weight`` = ``[Wg; Wu]`` rows (``GatedMLP.GATE_FIRST``),
                                  ``fc1.bias``, ``fc2.weight``, ``fc2.bias``, ``norm.*``
``"glu_probe_unpacked"``          ``fc1_g.*`` (gate), ``fc1_x.*`` (up), ``fc2.*``, ``norm.*``
``"timm_swiglu"``                 same keys as ``glu_probe_unpacked`` (timm ``SwiGLU``)
``"timm_swiglu_packed"``          ``fc1.weight`` = ``[Wg; Wu]`` (timm ``SwiGLUPacked``,
                                  ``gate_last=False``), ``fc2.*``, ``norm.*``
``"timm_glu"``                    ``fc1.weight`` = ``[Wu; Wg]`` (timm ``GluMlp`` default,
                                  ``gate_last=True``), ``fc2.*``, ``norm.*``
``"hf_llama"``                    ``gate_proj.*``, ``up_proj.*``, ``down_proj.*`` (no norm)
================================  ===========================================================

Conversions only move and (un)pack tensors, so round trips are bit-exact. ``prefix`` selects one
block inside a whole-model state dict (e.g. ``"model.layers.0.mlp."``); keys outside the prefix
pass through unchanged. Missing keys, unexpected keys under the prefix, and inconsistent shapes
raise ``KeyError`` / ``ValueError`` naming the offending keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LAYOUTS",
    "convert_mlp_state_dict",
    "from_hf_llama",
    "from_timm_swiglu",
    "to_hf_llama",
    "to_timm_swiglu",
]

LAYOUTS = (
    "glu_probe",
    "glu_probe_unpacked",
    "timm_swiglu",
    "timm_swiglu_packed",
    "timm_glu",
    "hf_llama",
)

# (gate, up, down) key stems per unpacked layout.
_UNPACKED = {
    "glu_probe_unpacked": ("fc1_g", "fc1_x", "fc2"),
    "timm_swiglu": ("fc1_g", "fc1_x", "fc2"),
    "hf_llama": ("gate_proj", "up_proj", "down_proj"),
}
# Packed layouts: gate-first flag.
_PACKED = {"glu_probe": True, "timm_swiglu_packed": True, "timm_glu": False}


@dataclass
class _Canonical:
    gate_w: Tensor
    up_w: Tensor
    down_w: Tensor
    gate_b: Tensor | None
    up_b: Tensor | None
    down_b: Tensor | None
    norm: dict[str, Tensor]


def _check_layout(name: str) -> str:
    if name not in LAYOUTS:
        raise ValueError(f"unknown state-dict layout {name!r}; expected one of {list(LAYOUTS)}")
    return name


def _take(sd: dict[str, Tensor], key: str, required: bool = True) -> Tensor | None:
    if key in sd:
        return sd.pop(key)
    if required:
        raise KeyError(f"missing key {key!r} (keys not yet read: {sorted(sd)})")
    return None


def _parse(sd: dict[str, Tensor], layout: str, gate_first: bool | None) -> _Canonical:
    norm = {k: sd.pop(k) for k in [k for k in sd if k.startswith("norm.")]}
    for key, t in sd.items():  # layer weights are matrices (or 1x1 conv kernels), biases vectors
        if key.endswith(".weight") and t.ndim not in (2, 4):
            raise ValueError(f"{key} has shape {tuple(t.shape)}: a layer weight has 2 (or 4) dims")
        if key.endswith(".bias") and t.ndim != 1:
            raise ValueError(f"{key} has shape {tuple(t.shape)}: a bias has 1 dim")
    if layout in _UNPACKED:
        g, u, d = _UNPACKED[layout]
        gate_w = _take(sd, f"{g}.weight")
        up_w = _take(sd, f"{u}.weight")
        gate_b, up_b = _take(sd, f"{g}.bias", False), _take(sd, f"{u}.bias", False)
        assert gate_w is not None and up_w is not None
        if gate_w.shape != up_w.shape:
            raise ValueError(
                f"gate weight {tuple(gate_w.shape)} and up weight {tuple(up_w.shape)} differ"
            )
        if (gate_b is None) != (up_b is None):
            raise ValueError(f"only one of {g}.bias / {u}.bias is present")
        for name, bias in ((g, gate_b), (u, up_b)):
            if bias is not None and tuple(bias.shape) != (gate_w.shape[0],):
                raise ValueError(
                    f"{name}.bias {tuple(bias.shape)} does not match the {gate_w.shape[0]} rows "
                    f"of {name}.weight"
                )
    else:
        first = _PACKED[layout] if gate_first is None else gate_first
        d = "fc2"
        w = _take(sd, "fc1.weight")
        b = _take(sd, "fc1.bias", False)
        assert w is not None
        if w.shape[0] % 2:
            raise ValueError(f"packed fc1.weight has an odd number of rows {w.shape[0]}")
        wa, wb = w.chunk(2, 0)
        gate_w, up_w = (wa, wb) if first else (wb, wa)
        gate_b = up_b = None
        if b is not None:
            if b.shape[0] != w.shape[0]:
                raise ValueError(f"fc1.bias {tuple(b.shape)} does not match fc1.weight rows")
            ba, bb = b.chunk(2, 0)
            gate_b, up_b = (ba, bb) if first else (bb, ba)
    down_w = _take(sd, f"{d}.weight")
    down_b = _take(sd, f"{d}.bias", False)
    assert down_w is not None
    if down_b is not None and tuple(down_b.shape) != (down_w.shape[0],):
        raise ValueError(
            f"{d}.bias {tuple(down_b.shape)} does not match the {down_w.shape[0]} rows of "
            f"{d}.weight"
        )
    if sd:
        raise KeyError(f"unexpected keys for layout {layout!r}: {sorted(sd)}")
    if down_w.shape[1] != gate_w.shape[0]:
        raise ValueError(
            f"down projection {tuple(down_w.shape)} does not take the gated width {gate_w.shape[0]}"
        )
    dtypes = {str(t.dtype) for t in (gate_w, up_w, down_w, gate_b, up_b, down_b) if t is not None}
    if len(dtypes) > 1:  # (packing would promote them silently)
        raise ValueError(f"the block's tensors have different dtypes {sorted(dtypes)}")
    return _Canonical(gate_w, up_w, down_w, gate_b, up_b, down_b, norm)


def _emit(c: _Canonical, layout: str, gate_first: bool | None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if layout == "hf_llama" and any(t.ndim != 2 for t in (c.gate_w, c.up_w, c.down_w)):
        raise ValueError(
            "the block's projections are not 2-D Linear weights (a use_conv block's are "
            f"{tuple(c.gate_w.shape)}): LlamaMLP holds nn.Linear layers"
        )
    if layout in _UNPACKED:
        g, u, d = _UNPACKED[layout]
        out[f"{g}.weight"] = c.gate_w.clone()
        if c.gate_b is not None:
            out[f"{g}.bias"] = c.gate_b.clone()
        out[f"{u}.weight"] = c.up_w.clone()
        if c.up_b is not None:
            out[f"{u}.bias"] = c.up_b.clone()
    else:
        first = _PACKED[layout] if gate_first is None else gate_first
        d = "fc2"
        pair = (c.gate_w, c.up_w) if first else (c.up_w, c.gate_w)
        out["fc1.weight"] = torch.cat(pair, 0)
        if c.gate_b is not None and c.up_b is not None:
            bpair = (c.gate_b, c.up_b) if first else (c.up_b, c.gate_b)
            out["fc1.bias"] = torch.cat(bpair, 0)
    out[f"{d}.weight"] = c.down_w.clone()
    if c.down_b is not None:
        out[f"{d}.bias"] = c.down_b.clone()
    if c.norm:
        if layout == "hf_llama":
            raise ValueError(
                f"the block has an inner norm ({sorted(c.norm)}) that LlamaMLP cannot hold"
            )
        out.update({k: v.clone() for k, v in c.norm.items()})
    return out


def convert_mlp_state_dict(
    state_dict: Mapping[str, Tensor],
    src: str,
    dst: str,
    *,
    prefix: str = "",
    src_gate_first: bool | None = None,
    dst_gate_first: bool | None = None,
) -> dict[str, Tensor]:
    """Convert one gated-MLP block's state dict from layout ``src`` to ``dst`` (see
    :data:`LAYOUTS` and the module docstring).

    ``src_gate_first`` / ``dst_gate_first`` override the gate/up row order of a packed layout
    (default: the layout's own, ``[gate; up]`` except ``timm_glu``).
    """
    _check_layout(src)
    _check_layout(dst)
    for side, layout, order in (("src", src, src_gate_first), ("dst", dst, dst_gate_first)):
        if order is not None and layout in _UNPACKED:
            raise ValueError(
                f"{side}_gate_first applies to packed layouts only; {layout!r} keeps the gate and "
                "up projections in separate tensors"
            )
    if prefix and not prefix.endswith("."):
        dotted = prefix + "."
        if any(k.startswith(dotted) for k in state_dict):
            # "layers.1.mlp" would also take "layers.10.mlp..." and leave a leading dot
            raise KeyError(
                f"prefix {prefix!r} names a module: end it with a dot ({dotted!r}), so that it "
                "takes that block's keys only"
            )
    block = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not block:
        raise KeyError(f"no keys start with prefix {prefix!r}")
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    converted = _emit(_parse(block, src, src_gate_first), dst, dst_gate_first)
    rest.update({prefix + k: v for k, v in converted.items()})
    return rest


def to_hf_llama(
    state_dict: Mapping[str, Tensor], *, prefix: str = "", packed: bool = True
) -> dict[str, Tensor]:
    """glu-probe ``GatedMLP`` state dict (packed or not) -> ``LlamaMLP`` keys."""
    src = "glu_probe" if packed else "glu_probe_unpacked"
    return convert_mlp_state_dict(state_dict, src, "hf_llama", prefix=prefix)


def from_hf_llama(
    state_dict: Mapping[str, Tensor], *, prefix: str = "", packed: bool = True
) -> dict[str, Tensor]:
    """``LlamaMLP`` state dict -> glu-probe ``GatedMLP`` (``packed`` selects the layout)."""
    dst = "glu_probe" if packed else "glu_probe_unpacked"
    return convert_mlp_state_dict(state_dict, "hf_llama", dst, prefix=prefix)


def to_timm_swiglu(
    state_dict: Mapping[str, Tensor], *, prefix: str = "", packed: bool = True
) -> dict[str, Tensor]:
    """glu-probe ``GatedMLP`` state dict (packed or not) -> timm ``SwiGLU`` keys."""
    src = "glu_probe" if packed else "glu_probe_unpacked"
    return convert_mlp_state_dict(state_dict, src, "timm_swiglu", prefix=prefix)


def from_timm_swiglu(
    state_dict: Mapping[str, Tensor], *, prefix: str = "", packed: bool = True
) -> dict[str, Tensor]:
    """timm ``SwiGLU`` state dict -> glu-probe ``GatedMLP`` (``packed`` selects the layout)."""
    dst = "glu_probe" if packed else "glu_probe_unpacked"
    return convert_mlp_state_dict(state_dict, "timm_swiglu", dst, prefix=prefix)
