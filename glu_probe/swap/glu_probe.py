"""Adapter for glu-probe's own :class:`~glu_probe.modules.MLP` / ``GatedMLP`` blocks.

It makes swaps go both ways and chain: a model swapped to ``"swiglu"`` can be swapped back to
``"gelu"`` (or on to ``"reglu"``) with the same call.
"""

from __future__ import annotations

from torch import nn

from glu_probe.modules import MLP, GatedMLP
from glu_probe.swap.base import MLPAdapter, MLPSpec, spec_from_glu_probe

__all__ = ["GluProbeAdapter"]


class GluProbeAdapter(MLPAdapter):
    """Matches :class:`~glu_probe.modules.MLP` and :class:`~glu_probe.modules.GatedMLP`
    (and their subclasses ``GLU``, ``Bilinear``, ``ReGLU``, ``GEGLU``, ``SwiGLU``)."""

    name = "glu_probe"

    def matches(self, module: nn.Module) -> bool:
        # (a subclass with its own forward is not swapped as the block it extends: see
        # TimmMlpAdapter.matches)
        return isinstance(module, MLP | GatedMLP) and type(module).forward in (
            MLP.forward,
            GatedMLP.forward,
        )

    def resembles(self, module: nn.Module) -> bool:
        return isinstance(module, MLP | GatedMLP)

    def describe(self, module: nn.Module) -> MLPSpec:
        return spec_from_glu_probe(module, f"glu_probe.{type(module).__name__}")
