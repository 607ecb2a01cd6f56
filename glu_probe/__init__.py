"""glu-probe: why does your gated-MLP model train the way it does?

Built on "The Devil is in the Condition Numbers: Why is GLU Better than non-GLU Structure?".

* Blocks (:mod:`glu_probe.modules`): ``MLP`` and the GLU family ``GatedMLP``, ``GLU``,
  ``Bilinear``, ``ReGLU``, ``GEGLU``, ``SwiGLU`` computing y = W2 (act(x Wg) ⊙ (x Wu)).
* Swap (:mod:`glu_probe.swap`): ``swap_mlp(model, variant)`` for timm and Hugging Face hosts;
  ``register_adapter`` with an ``MLPAdapter`` (describing blocks as ``MLPSpec``) for others.
* NTK engine (:mod:`glu_probe.ntk`): ``ntk_spectrum`` of K = J Jᵀ on a probe batch, exact or
  matrix-free, with certified bounds.
* Callbacks (:mod:`glu_probe.callbacks`): ``NTKSpectrumMonitor``, ``GeneralizationGapMonitor``,
  ``LossCrossingMonitor``, ``PairedModule``, ``TensorBoardDashboard``.
* Offline crossing detection (:mod:`glu_probe.crossing`) and the paper's closed forms
  (:mod:`glu_probe.theory`).
"""

from glu_probe.callbacks import (
    GeneralizationGapMonitor,
    LossCrossingMonitor,
    NTKProbeWarning,
    NTKSpectrumMonitor,
    PairedModule,
    TensorBoardDashboard,
)
from glu_probe.convert import (
    convert_mlp_state_dict,
    from_hf_llama,
    from_timm_swiglu,
    to_hf_llama,
    to_timm_swiglu,
)
from glu_probe.crossing import Crossing, CrossingDetector, find_crossings
from glu_probe.modules import (
    GEGLU,
    GLU,
    MLP,
    VARIANTS,
    Bilinear,
    GatedMLP,
    ReGLU,
    SwiGLU,
    dense_hidden_features,
    gated_hidden_features,
    make_mlp,
)
from glu_probe.ntk import (
    NTKOperator,
    NTKRankWarning,
    NTKSpectrum,
    effective_rank,
    ntk_matrix,
    ntk_spectrum,
    spectral_density,
)
from glu_probe.swap import (
    MLPAdapter,
    MLPSpec,
    SwapEntry,
    SwapReport,
    UnsupportedModelError,
    register_adapter,
    swap_mlp,
)

__version__ = "0.1.0"

__all__ = [
    "GEGLU",
    "GLU",
    "MLP",
    "VARIANTS",
    "Bilinear",
    "Crossing",
    "CrossingDetector",
    "GatedMLP",
    "GeneralizationGapMonitor",
    "LossCrossingMonitor",
    "MLPAdapter",
    "MLPSpec",
    "NTKOperator",
    "NTKProbeWarning",
    "NTKRankWarning",
    "NTKSpectrum",
    "NTKSpectrumMonitor",
    "PairedModule",
    "ReGLU",
    "SwapEntry",
    "SwapReport",
    "SwiGLU",
    "TensorBoardDashboard",
    "UnsupportedModelError",
    "__version__",
    "convert_mlp_state_dict",
    "dense_hidden_features",
    "effective_rank",
    "find_crossings",
    "from_hf_llama",
    "from_timm_swiglu",
    "gated_hidden_features",
    "make_mlp",
    "ntk_matrix",
    "ntk_spectrum",
    "register_adapter",
    "spectral_density",
    "swap_mlp",
    "to_hf_llama",
    "to_timm_swiglu",
]
