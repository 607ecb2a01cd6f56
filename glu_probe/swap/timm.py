"""Adapter for timm's MLP blocks: ``Mlp``, ``GluMlp`` / ``SwiGLUPacked`` and ``SwiGLU``.

These are the ``blocks[i].mlp`` of the VisionTransformer family (and of every timm model that
uses them). Notes on the source layouts:

* ``GluMlp(hidden_features=H)`` holds a *packed* ``fc1`` of ``H`` rows, so its gated width is
  ``H // 2``; ``gate_last=True`` (the default, sigmoid GLU) gates with the second half,
  ``SwiGLUPacked`` (``gate_last=False``) with the first.
* ``SwiGLU`` holds ``fc1_g`` (gate) and ``fc1_x`` (up).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from glu_probe.modules import activation_name
from glu_probe.swap.base import MLPAdapter, MLPSpec, UnsupportedModelError

__all__ = ["TimmMlpAdapter"]


def _timm_classes() -> tuple[type[nn.Module], ...]:
    try:
        from timm.layers import GluMlp, Mlp, SwiGLU
    except ImportError:  # timm is an optional dependency
        return ()
    return (Mlp, GluMlp, SwiGLU)


class TimmMlpAdapter(MLPAdapter):
    """Matches instances of ``timm.layers.Mlp``, ``GluMlp`` (incl. ``SwiGLUPacked``) and
    ``SwiGLU``."""

    name = "timm"

    def matches(self, module: nn.Module) -> bool:
        classes = _timm_classes()
        if not classes or not isinstance(module, classes):
            return False
        # A subclass with its own forward computes something else (x + gamma * mlp(x)): it was
        # swapped as a plain Mlp, its forward and extra parameters dropped without a word
        # (review, session 20). Such blocks are reported as unrecognised instead.
        return any(type(module).forward is c.forward for c in classes if isinstance(module, c))

    def resembles(self, module: nn.Module) -> bool:
        classes = _timm_classes()
        return bool(classes) and isinstance(module, classes)

    def describe(self, module: Any) -> MLPSpec:
        from timm.layers import GluMlp, SwiGLU

        fc2 = module.fc2
        if not isinstance(fc2, nn.Linear | nn.Conv2d):
            raise UnsupportedModelError(
                f"timm {type(module).__name__}: fc2 of type {type(fc2).__name__} is not supported"
            )
        if isinstance(module, SwiGLU):
            fc1 = module.fc1_g
            gated, hidden = True, module.fc1_g.out_features
            fc1_bias = module.fc1_g.bias is not None
            kind = "timm.SwiGLU"
        else:
            fc1 = module.fc1
            width = fc1.out_channels if isinstance(fc1, nn.Conv2d) else fc1.out_features
            gated = isinstance(module, GluMlp)
            if gated and width % 2:
                raise UnsupportedModelError(f"timm GluMlp with odd packed width {width}")
            hidden = width // 2 if gated else width
            fc1_bias = fc1.bias is not None
            if gated:
                kind = "timm.GluMlp" if module.gate_last else "timm.SwiGLUPacked"
            else:
                kind = "timm.Mlp"
        in_features = fc1.in_channels if isinstance(fc1, nn.Conv2d) else fc1.in_features
        out_features = fc2.out_channels if isinstance(fc2, nn.Conv2d) else fc2.out_features
        norm = None if isinstance(module.norm, nn.Identity) else module.norm
        p = fc2.weight
        return MLPSpec(
            in_features=int(in_features),
            hidden_features=int(hidden),
            out_features=int(out_features),
            gated=gated,
            activation=activation_name(module.act),
            num_params=sum(q.numel() for q in module.parameters()),
            bias=(fc1_bias, fc2.bias is not None),
            drop=(float(module.drop1.p), float(module.drop2.p)),
            norm=norm,
            use_conv=isinstance(fc1, nn.Conv2d),
            kind=kind,
            device=p.device,
            dtype=p.dtype,
        )
