"""Empirical NTK spectrum engine: exact where affordable, matrix-free where not, certified.

K = J Jᵀ with J the Jacobian of the probe rows (``"pntk"``, ``"full"`` or a callable) with respect
to the selected trainable parameters. See ``docs/ntk.md`` for the math and the error bounds.
"""

from .dense import Float64UnavailableError, ntk_matrix
from .density import effective_rank, spectral_density
from .functional import ProbeFunction
from .operator import MatrixFreeUnavailableError, NTKOperator
from .spectrum import NTKRankWarning, NTKSpectrum, WarmStart, ntk_spectrum

__all__ = [
    "Float64UnavailableError",
    "MatrixFreeUnavailableError",
    "NTKOperator",
    "NTKRankWarning",
    "NTKSpectrum",
    "ProbeFunction",
    "WarmStart",
    "effective_rank",
    "ntk_matrix",
    "ntk_spectrum",
    "spectral_density",
]
