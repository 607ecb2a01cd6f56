"""Small demo hosts, built from configs (no pretrained weights, no network).

Each factory returns a :class:`ModelPair`: a GLU *model* and its non-GLU *baseline*, built from the
same seed so that every part they share (embeddings, attention, norms, heads, first-layer weights)
starts from identical values; only the MLP blocks differ.

* :func:`two_layer_pair`: the paper's two-layer networks in the NTK setting,
  z(x) = V φ(W x) (ReLU) and z(x) = V (φ(W x) ⊙ U x) (ReGLU), with W, U ~ N(0, 1/d) and
  V ~ N(0, 1/m) (:func:`glu_probe.theory.two_layer`); W and V are shared.
* :func:`vit_pair`: a tiny timm ``VisionTransformer`` with its GELU ``Mlp`` vs a parameter-matched
  SwiGLU (:func:`glu_probe.swap.swap_mlp`, ``match="params"``).
* :func:`gpt2_pair`: a tiny Hugging Face ``GPT2LMHeadModel`` (byte vocabulary) with its GELU MLP vs
  a parameter-matched SwiGLU; wrapped by :class:`CausalLMLogits` so that ``forward(input_ids)``
  returns the logits tensor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from glu_probe._rng import seeded, stream_seed

__all__ = [
    "CausalLMLogits",
    "ModelPair",
    "count_parameters",
    "gpt2_pair",
    "tiny_gpt2",
    "tiny_vit",
    "two_layer_pair",
    "vit_pair",
]


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter scalars of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@dataclass
class ModelPair:
    """A GLU model and its non-GLU baseline, ready for :class:`glu_probe.callbacks.PairedModule`.

    Attributes:
        name: short name of the pair (``"two_layer"``, ``"vit"``, ``"gpt2"``).
        task: ``"regression"`` (squared loss), ``"classification"`` or ``"lm"`` (next byte).
        model: the GLU network.
        baseline: the non-GLU network.
        model_label / baseline_label: human-readable names (e.g. ``"SwiGLU"``, ``"GELU MLP"``).
        swap_report: the :class:`glu_probe.swap.SwapReport` of the swap, when one was done.
        config: the keyword arguments the pair was built with.
    """

    name: str
    task: str
    model: nn.Module
    baseline: nn.Module
    model_label: str
    baseline_label: str
    swap_report: Any = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_params(self) -> tuple[int, int]:
        """Trainable parameter counts ``(model, baseline)``."""
        return count_parameters(self.model), count_parameters(self.baseline)


def _gated_variant(variant: str) -> None:
    gated = ("glu", "bilinear", "reglu", "geglu", "swiglu")
    if variant not in gated:
        raise ValueError(f"variant must be a gated MLP variant {gated}, got {variant!r}")


_LABELS = {
    "glu": "GLU",
    "bilinear": "Bilinear",
    "reglu": "ReGLU",
    "geglu": "GEGLU",
    "swiglu": "SwiGLU",
}


# --------------------------------------------------------------------------------------------
# two-layer networks (the paper's NTK setting)
# --------------------------------------------------------------------------------------------


def two_layer_pair(d: int = 16, m: int = 256, *, seed: int = 0) -> ModelPair:
    """The paper's two-layer ReGLU model and ReLU baseline with shared W and V.

    Both are built by :func:`glu_probe.theory.two_layer` (the global RNG untouched) from their
    own streams of ``seed`` (:func:`glu_probe._rng.stream_seed` keys ``(2, 0)`` and ``(2, 1)``;
    until session 22 they took ``seed`` and ``seed + 1``, the streams of
    :func:`glu_probe.data.two_layer_regression`'s inputs and target, so W was the training
    inputs scaled); the ReGLU network then receives the ReLU network's W and V, so the two
    differ only by the gate
    ``U x`` (z(x) = V (φ(W x) ⊙ U x) vs z(x) = V φ(W x)). Output: one scalar per sample.
    """
    from glu_probe.theory import two_layer

    if int(d) < 1 or int(m) < 1:
        raise ValueError(f"d and m must be positive, got d={d}, m={m}")
    baseline = two_layer("relu", int(d), int(m), seed=stream_seed(seed, 2, 0))
    model = two_layer("reglu", int(d), int(m), seed=stream_seed(seed, 2, 1))
    shared = {k: v for k, v in baseline.state_dict().items() if k in model.state_dict()}
    model.load_state_dict(shared, strict=False)
    return ModelPair(
        name="two_layer",
        task="regression",
        model=model,
        baseline=baseline,
        model_label="ReGLU",
        baseline_label="ReLU",
        config={"d": int(d), "m": int(m), "seed": seed},
    )


# --------------------------------------------------------------------------------------------
# timm ViT
# --------------------------------------------------------------------------------------------


def tiny_vit(
    *,
    img_size: int = 16,
    patch_size: int = 4,
    in_chans: int = 1,
    num_classes: int = 10,
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    seed: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """A tiny timm ``VisionTransformer`` (GELU ``Mlp`` blocks), initialised under ``seed``."""
    from timm.models.vision_transformer import VisionTransformer

    with seeded(seed):  # built on the CPU
        return VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            **kwargs,
        )


def _swapped_copy(host: nn.Module, variant: str, seed: int, multiple_of: int) -> tuple[Any, Any]:
    """Deep-copy ``host`` and swap its MLPs (fresh MLP init from stream ``(2, 2)`` of ``seed``:
    ``seed + 1`` was the next seed's host init)."""
    from glu_probe.swap import swap_mlp

    model = copy.deepcopy(host)
    with seeded(stream_seed(seed, 2, 2), {p.device for p in model.parameters()}):
        report = swap_mlp(model, variant, match="params", multiple_of=multiple_of)
    return model, report


def vit_pair(
    variant: str = "swiglu", *, seed: int = 0, multiple_of: int = 1, **vit_kwargs: Any
) -> ModelPair:
    """A tiny timm ViT (baseline, GELU MLP) and a copy with parameter-matched ``variant`` MLPs.

    The two share every non-MLP parameter exactly (the model is a deep copy of the baseline
    before :func:`glu_probe.swap.swap_mlp` replaces its MLP blocks). ``vit_kwargs`` go to
    :func:`tiny_vit` (e.g. ``img_size=32, in_chans=3, embed_dim=192, depth=6`` for CIFAR-10).
    """
    _gated_variant(variant)
    baseline = tiny_vit(seed=seed, **vit_kwargs)
    model, report = _swapped_copy(baseline, variant, seed, multiple_of)
    return ModelPair(
        name="vit",
        task="classification",
        model=model,
        baseline=baseline,
        model_label=_LABELS[variant],
        baseline_label="GELU MLP",
        swap_report=report,
        config={"variant": variant, "seed": seed, **vit_kwargs},
    )


# --------------------------------------------------------------------------------------------
# HF GPT-2
# --------------------------------------------------------------------------------------------


class CausalLMLogits(nn.Module):
    """Wrap a Hugging Face causal LM so that ``forward(input_ids) -> logits (B, T, V)``.

    The wrapped model stays reachable as ``.lm`` (its config as ``.config``); a plain tensor
    output keeps losses, the NTK probe and ``torch.func`` free of ``ModelOutput`` handling.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def config(self) -> Any:
        return getattr(self.lm, "config", None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def tiny_gpt2(
    *,
    vocab_size: int = 256,
    n_positions: int = 64,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    seed: int = 0,
    **config_kwargs: Any,
) -> nn.Module:
    """A tiny ``GPT2LMHeadModel`` from a ``GPT2Config`` (byte vocabulary by default), no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    defaults: dict[str, Any] = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    defaults.update(config_kwargs)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
        **defaults,
    )
    with seeded(seed):  # built on the CPU
        return GPT2LMHeadModel(config)


def gpt2_pair(
    variant: str = "swiglu", *, seed: int = 0, multiple_of: int = 1, **gpt2_kwargs: Any
) -> ModelPair:
    """A tiny GPT-2 (baseline, GELU MLP) and a copy with parameter-matched ``variant`` MLPs.

    Both are wrapped in :class:`CausalLMLogits`. The non-MLP parameters are identical at init
    (deep copy before :func:`glu_probe.swap.swap_mlp`). ``gpt2_kwargs`` go to :func:`tiny_gpt2`.
    """
    _gated_variant(variant)
    lm = tiny_gpt2(seed=seed, **gpt2_kwargs)
    swapped, report = _swapped_copy(lm, variant, seed, multiple_of)
    return ModelPair(
        name="gpt2",
        task="lm",
        model=CausalLMLogits(swapped),
        baseline=CausalLMLogits(lm),
        model_label=_LABELS[variant],
        baseline_label="GELU MLP",
        swap_report=report,
        config={"variant": variant, "seed": seed, **gpt2_kwargs},
    )
