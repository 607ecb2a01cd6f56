"""Adapter for Hugging Face ``LlamaMLP`` and its copies (Mistral, Qwen2, Gemma, ...).

Recognised by structure, not class name, and checked: a module whose children are exactly
``gate_proj``, ``up_proj``, ``down_proj`` (``nn.Linear``) and a parameter-free ``act_fn``, with no
parameter of its own, and whose ``forward`` is checked with fresh weights (eval and training mode,
:func:`~glu_probe.swap.structural.verify_split_gated`) to be exactly
``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. The check runs on a reduced copy of the block
(same classes and activation module, widths 8/16/12) once per structure, so its cost does not
depend on the model's size or device (a LLaMA-70B shape on ``meta`` allocates nothing real).
Blocks with more (BitNet's sub-norm, GLM-4V's patch merger, Falcon-H1's multipliers, a dropout
as in GTE or Seed-OSS) are declined here: the structural adapter takes those it can reproduce
(with the dropout in its place), and the driver reports the rest (they still *look* like this
block: :meth:`LlamaMLPAdapter.resembles`).
Its ``intermediate_size`` is the gated width.
New blocks get the host's init (:func:`~glu_probe.swap.host_init`); the config's
``intermediate_size`` and ``hidden_act`` (or ``hidden_activation``) are updated, the activation
key only where no other module of a rebuilt model reads it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from glu_probe.modules import activation_name
from glu_probe.swap.base import MLPAdapter, MLPSpec, UnsupportedModelError
from glu_probe.swap.structural import verify_split_gated

_NAMES = ("gate_proj", "up_proj", "down_proj")

__all__ = ["LlamaMLPAdapter"]


class LlamaMLPAdapter(MLPAdapter):
    """Matches modules with ``gate_proj``/``up_proj``/``down_proj`` ``nn.Linear`` children."""

    name = "hf_llama"
    # Qwen2-MoE's shared experts (width shared_expert_intermediate_size) wrote their new width
    # to intermediate_size, the routed experts' width, under strict=False (review, session 20):
    # the config key is written only where it is these blocks' width.
    width_key_must_match = True

    def resembles(self, module: nn.Module) -> bool:
        return all(isinstance(getattr(module, n, None), nn.Linear) for n in _NAMES)

    def matches(self, module: nn.Module) -> bool:
        if not self.resembles(module):
            return False
        children = dict(module.named_children())
        if set(children) != {*_NAMES, "act_fn"}:
            return False  # e.g. a dropout (structural adapter) or a norm (BitNet): not ours
        if any(True for _ in module.parameters(recurse=False)):
            return False
        if any(True for _ in children["act_fn"].parameters()):
            return False
        return verify_split_gated(module, "gate_proj", "up_proj", "down_proj", "act_fn")

    def describe(self, module: Any) -> MLPSpec:
        g, u, d = module.gate_proj, module.up_proj, module.down_proj
        assert isinstance(g, nn.Linear) and isinstance(u, nn.Linear) and isinstance(d, nn.Linear)
        act = getattr(module, "act_fn", None)
        cls = type(module).__name__
        if not isinstance(act, nn.Module):
            raise UnsupportedModelError(
                f"{cls} has gate_proj/up_proj/down_proj but no `act_fn` module as LlamaMLP has"
            )
        if g.weight.shape != u.weight.shape or d.in_features != g.out_features:
            raise UnsupportedModelError(
                f"{cls}: inconsistent shapes gate {tuple(g.weight.shape)}, up "
                f"{tuple(u.weight.shape)}, down {tuple(d.weight.shape)}"
            )
        if (g.bias is None) != (u.bias is None):
            raise UnsupportedModelError(f"{cls}: gate_proj and up_proj disagree on bias")
        return MLPSpec(
            in_features=g.in_features,
            hidden_features=g.out_features,
            out_features=d.out_features,
            gated=True,
            activation=activation_name(act),
            num_params=sum(p.numel() for p in module.parameters()),
            bias=(g.bias is not None, d.bias is not None),
            drop=(0.0, 0.0),
            kind=cls,
            device=g.weight.device,
            dtype=g.weight.dtype,
        )

    def config_keys(self, model: nn.Module) -> tuple[str | None, str | None]:
        config = getattr(model, "config", None)
        act_key = next((k for k in ("hidden_act", "hidden_activation") if hasattr(config, k)), None)
        return ("intermediate_size" if hasattr(config, "intermediate_size") else None), act_key
