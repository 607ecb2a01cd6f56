"""The public API promised by the issues resolves from the top-level package."""

from __future__ import annotations

import glu_probe
import glu_probe.callbacks
import glu_probe.ntk


def test_every_exported_name_resolves():
    for module in (glu_probe, glu_probe.callbacks, glu_probe.ntk):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], f"{module.__name__} exports missing names: {missing}"


def test_issue_named_entry_points_are_exported():
    names = {
        "MLP", "GatedMLP", "GLU", "Bilinear", "ReGLU", "GEGLU", "SwiGLU",
        "gated_hidden_features", "swap_mlp", "register_adapter", "SwapReport",
        "ntk_spectrum", "ntk_matrix", "NTKOperator", "NTKSpectrum",
        "NTKSpectrumMonitor", "GeneralizationGapMonitor", "LossCrossingMonitor", "PairedModule",
        "find_crossings",
    }  # fmt: skip
    assert names <= set(glu_probe.__all__)
    assert glu_probe.ntk_spectrum is glu_probe.ntk.ntk_spectrum
    assert glu_probe.NTKSpectrumMonitor is glu_probe.callbacks.NTKSpectrumMonitor


def test_extension_and_warning_types_are_exported():
    """What ``register_adapter`` needs and the warnings to filter resolve from the top level."""
    import glu_probe.swap

    for name in ("MLPAdapter", "MLPSpec", "SwapEntry"):
        assert name in glu_probe.__all__
        assert getattr(glu_probe, name) is getattr(glu_probe.swap, name)
    assert glu_probe.NTKProbeWarning is glu_probe.callbacks.NTKProbeWarning
    assert glu_probe.NTKRankWarning is glu_probe.ntk.NTKRankWarning
    # (raised where no matrix-free product is right: callers catch it to take the dense path)
    assert issubclass(glu_probe.ntk.MatrixFreeUnavailableError, NotImplementedError)
    assert {"NTKProbeWarning", "NTKRankWarning"} <= set(glu_probe.__all__)
