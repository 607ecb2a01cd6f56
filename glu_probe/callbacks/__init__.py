"""Lightning callbacks: NTK spectrum, generalization gap and loss crossings.

Add any of them to ``lightning.pytorch.Trainer(callbacks=[...])``; none changes training (RNG,
``.grad``, train/eval flags and the DDP reducer are left as found). See ``docs/callbacks.md``.
"""

from glu_probe.callbacks.crossing import LossCrossingMonitor, load_baseline_series
from glu_probe.callbacks.dashboard import (
    TensorBoardDashboard,
    default_layout,
    write_dashboard_layout,
)
from glu_probe.callbacks.gap import GeneralizationGapMonitor
from glu_probe.callbacks.ntk import NTKProbeWarning, NTKSpectrumMonitor
from glu_probe.callbacks.paired import PairedModule

__all__ = [
    "GeneralizationGapMonitor",
    "LossCrossingMonitor",
    "NTKProbeWarning",
    "NTKSpectrumMonitor",
    "PairedModule",
    "TensorBoardDashboard",
    "default_layout",
    "load_baseline_series",
    "write_dashboard_layout",
]
