"""Adapter for Hugging Face GPT-2's ``GPT2MLP`` (and structural copies).

``GPT2MLP`` is ``dropout(c_proj(act(c_fc(x))))`` with ``transformers.pytorch_utils.Conv1D``
layers, whose weight is stored transposed, ``(in, out)``; so ``c_fc.weight.shape ==
(n_embd, n_inner)``. The replacement is a glu-probe block (``nn.Linear`` layout) with the
residual dropout ``resid_pdrop`` as its output dropout; new blocks get GPT-2's init (weights
N(0, initializer_range²), and the output projection the scaled std
``initializer_range / sqrt(2 · n_layer)``), see :func:`glu_probe.swap.host_init`.
The host config's ``n_inner`` and ``activation_function`` are updated (for gated variants the
latter names the gate activation).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from glu_probe.modules import activation_name
from glu_probe.swap.base import MLPAdapter, MLPSpec, UnsupportedModelError

__all__ = ["GPT2MLPAdapter"]


def _is_conv1d(module: object) -> bool:
    # A parametrized layer's class is torch's generated ``ParametrizedConv1D`` subclass, matched
    # so that the swap refuses it for its parametrization, not as an unrecognised block; other
    # subclasses of ``Conv1D`` (their own forward, extra parameters) stay unmatched (review,
    # session 23).
    cls = type(module)
    if isinstance(module, nn.Module) and is_parametrized(module) and len(cls.__bases__) == 1:
        cls = cls.__bases__[0]
    return cls.__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


class GPT2MLPAdapter(MLPAdapter):
    """Matches modules with ``c_fc`` and ``c_proj`` ``Conv1D`` children (``GPT2MLP``)."""

    name = "hf_gpt2"

    def matches(self, module: nn.Module) -> bool:
        return _is_conv1d(getattr(module, "c_fc", None)) and _is_conv1d(
            getattr(module, "c_proj", None)
        )

    def describe(self, module: Any) -> MLPSpec:
        c_fc, c_proj = module.c_fc, module.c_proj
        act = getattr(module, "act", None)
        drop = getattr(module, "dropout", None)
        if not isinstance(act, nn.Module) or not isinstance(drop, nn.Dropout):
            raise UnsupportedModelError(
                f"{type(module).__name__} has c_fc/c_proj Conv1D layers but no `act` module "
                "and `dropout` nn.Dropout as GPT2MLP has"
            )
        w_fc, w_proj = c_fc.weight, c_proj.weight  # Conv1D: (in, out)
        if w_fc.shape[1] != w_proj.shape[0]:
            raise UnsupportedModelError(
                f"{type(module).__name__}: c_fc out {w_fc.shape[1]} != c_proj in {w_proj.shape[0]}"
            )
        return MLPSpec(
            in_features=int(w_fc.shape[0]),
            hidden_features=int(w_fc.shape[1]),
            out_features=int(w_proj.shape[1]),
            gated=False,
            activation=activation_name(act),
            num_params=sum(p.numel() for p in module.parameters()),
            bias=(c_fc.bias is not None, c_proj.bias is not None),
            drop=(0.0, float(drop.p)),
            kind=type(module).__name__,
            device=w_fc.device,
            dtype=w_fc.dtype,
        )

    def config_keys(self, model: nn.Module) -> tuple[str | None, str | None]:
        config = getattr(model, "config", None)
        act_key = "activation_function" if hasattr(config, "activation_function") else None
        if act_key is None and hasattr(config, "afn"):  # OpenAI GPT-1
            act_key = "afn"
        return ("n_inner" if hasattr(config, "n_inner") else None), act_key
