"""Adapter for Hugging Face ``LlamaMLP`` and its copies (Mistral, Qwen2, Gemma, ...).

Recognised by structure, not class name: a module with ``gate_proj``, ``up_proj`` and
``down_proj`` ``nn.Linear`` children and an ``act_fn``, computing
``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. Its ``intermediate_size`` is the gated width.
New blocks get weights N(0, initializer_range²) and zero biases (``PreTrainedModel``'s init);
the config's ``intermediate_size`` and ``hidden_act`` (or ``hidden_activation``) are updated.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from glu_probe.modules import activation_name
from glu_probe.swap.core import MLPAdapter, MLPSpec, UnsupportedModelError

__all__ = ["LlamaMLPAdapter"]


class LlamaMLPAdapter(MLPAdapter):
    """Matches modules with ``gate_proj``/``up_proj``/``down_proj`` ``nn.Linear`` children."""

    name = "hf_llama"

    def matches(self, module: nn.Module) -> bool:
        return all(
            isinstance(getattr(module, n, None), nn.Linear)
            for n in ("gate_proj", "up_proj", "down_proj")
        )

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
            num_params=sum(p.numel() for p in (g.weight, u.weight, d.weight))
            + sum(b.numel() for b in (g.bias, u.bias, d.bias) if b is not None),
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
