"""NTK spectrum driver: exact (dense eigh) where affordable, block Lanczos where not.

``ntk_spectrum`` returns an :class:`NTKSpectrum` with the extreme eigenvalues of the empirical
NTK K = J Jᵀ, the condition number κ = λ_max/λ_min and what is known about their error:

* ``method="dense"``: K is assembled in float64 under a memory budget (:func:`ntk_matrix`) and
  ``torch.linalg.eigh`` gives every eigenvalue to within ≈ n·ε₆₄·λ_max (backward stability and
  Weyl's inequality), so κ is exact to ≈ n·ε₆₄·κ relative error. The residuals hold that
  allowance n·ε₆₄·λ_max (an estimate of the rounding, not a certificate), and so do
  ``lambda_min_upper`` and ``condition_number_lower``; a warning says where ε₆₄·κ > 1e-6.
  With ``jacobian_dtype=torch.float32`` (mixed precision) the Jacobian rows come from float32
  backward passes and K is still accumulated and eigendecomposed in float64; the rounding E of J
  moves every singular value by at most ‖E‖₂ (Weyl), so each eigenvalue θ of the computed K lies
  within r = 2·√θ·δ + δ² of the exact one, where δ estimates ‖E‖₂
  (:func:`~glu_probe.ntk.dense.jacobian_rounding_estimate`: 16·u₃₂·√tr K). The residual fields
  then hold r: an error bound under that rounding estimate, not a certificate. The relative error
  of λ_min grows like √κ (float32 products would give ε₃₂·κ).
* ``method="lanczos"``: block Lanczos (:func:`~glu_probe.ntk.krylov.block_lanczos`) on the
  matrix-free :class:`NTKOperator`. For a Ritz pair (θ, x) with residual r = ‖Kx − θx‖ there is an
  eigenvalue of K in [θ − r, θ + r]. Cauchy interlacing gives θ_max ≤ λ_max and λ_min ≤ θ_min
  always, for the operator as evaluated. The products themselves are rounded (float32 by
  default), so the bounds on K add an allowance s = 16·√n·ε·θ_max (an estimate of the products'
  rounding): ``lambda_min_upper = θ_min + s`` bounds λ_min from above and
  ``condition_number_lower = (θ_max − s)/(θ_min + s)`` bounds κ from below, converged or not.
  (Without s, float32 products missed by up to ~1e-7·λ_max.) ``converged`` is true only when the
  ends asked for (``which``) meet ``tol`` (see ``block_lanczos``); otherwise a warning says so and
  ``condition_number`` is only an estimate. With ``which="largest"`` (``"smallest"``) the other
  end is not estimated: ``lambda_min`` (``lambda_max``) and ``condition_number`` are ``nan``.
* ``method="auto"``: dense when n ≤ :data:`AUTO_DENSE_MAX_ROWS` and K fits the memory budget,
  and also above that where the matrix-free products cannot be formed for the model
  (:class:`~glu_probe.ntk.operator.MatrixFreeUnavailableError`) and K fits.
  The dense path costs n per-sample backward passes plus an n²·P/2 GEMM and an n³ eigh, which
  beats the tens to hundreds of full-batch products Lanczos needs for λ_min of an ill-conditioned
  K up to about a thousand rows.

Effective rank: exact (from every eigenvalue) on the dense path and when Lanczos spans the whole
space. Otherwise Lanczos knows only a few eigenvalues, and ``slq_probes > 0`` estimates it by
stochastic Lanczos quadrature (:func:`~glu_probe.ntk.density.slq_density`, ``slq_probes``
Rademacher probes × ``slq_steps`` steps, one block product per step): an estimate whose error is
the Hutchinson sampling error, not a bound. ``slq_probes = 0`` (default) leaves it ``nan``.

Numerical rank: the number of eigenvalues above λ_max·n·ε₆₄ on the dense path (the standard
``matrix_rank`` tolerance), and above λ_max·√n·ε, the products' rounding level that also stops
the iteration at a numerically zero λ_min, on a Lanczos run whose basis spans the whole space.
A smaller rank (a near-null space) raises a :class:`NTKRankWarning`; negative eigenvalues
(rounding of a PSD K) are reported as computed, never clamped, and κ is then ``inf``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._warnings import external_stacklevel
from .dense import (
    DenseBudgetError,
    Float64UnavailableError,
    _assemble,
    _available_bytes,
    _budget,
    checked_budget,
    forward_rounding_dtype,
    forward_traced,
    jacobian_rounding_estimate,
    raise_float64_unavailable,
)
from .density import effective_rank as _effective_rank
from .density import slq_density, slq_effective_rank
from .functional import (
    OutputSpec,
    ParamFilter,
    ProbeFunction,
    allows_autograd,
    default_probe_dtype,
    probe_copy_bytes,
    refuse_small_budget,
    warn_narrowed,
)
from .krylov import (
    LOOSEST_TOL,
    LanczosResult,
    _error_bounds,
    block_lanczos,
    check_tol,
    condition_number_bound,
    default_max_basis,
    least_matvecs,
    rounding_allowance,
)
from .operator import MatrixFreeUnavailableError, NTKOperator, agreed, is_out_of_memory

__all__ = [
    "AUTO_DENSE_MAX_ROWS",
    "FULL_SPAN_BLOCK",
    "FULL_SPAN_BLOCK_CUDA",
    "NTKRankWarning",
    "NTKSpectrum",
    "WarmStart",
    "ntk_spectrum",
]


class WarmStart(NamedTuple):
    """Lanczos start vectors with the extreme eigenvalues of the probe they came from: what a
    previous :class:`NTKSpectrum` carries for ``warm_start=``, in a form a callback can keep in
    a checkpoint. With the values, a run whose end moved by more than ``WARM_CONFIRM_FACTOR``
    from them is confirmed from a random start (see ``docs/ntk.md``, warm starts); a bare
    tensor of vectors is not checked."""

    vectors: Tensor
    lambda_max: float
    lambda_min: float


AUTO_DENSE_MAX_ROWS = 1024
"""``method="auto"`` uses the exact dense path up to this many rows (if K fits the budget)."""

#: Widest block product when Lanczos spans the whole space (see :func:`_full_span_block`).
FULL_SPAN_BLOCK = 16
#: The same on a CUDA device, where a wider vmapped product still gains (fewer launches).
FULL_SPAN_BLOCK_CUDA = 64


class NTKRankWarning(RuntimeWarning):
    """K has a near-null space (numerical rank < n) or λ_min is numerically zero."""


@dataclass
class NTKSpectrum:
    """Extreme eigenvalues, condition number and error information of an empirical NTK.

    Attributes:
        lambda_max: largest eigenvalue (Lanczos: θ_max, a lower bound on λ_max up to the
            products' rounding; ``nan`` with ``which="smallest"``).
        lambda_min: smallest eigenvalue (Lanczos: θ_min, an upper bound on λ_min up to the
            products' rounding; ``nan`` with ``which="largest"``). Never clamped: it can be ≤ 0
            for a numerically singular K.
        condition_number: λ_max/λ_min; ``inf`` when λ_min ≤ 0 or is numerically zero.
        eigenvalues: all eigenvalues, ascending, float64 (dense path), else ``None``.
        residual_max, residual_min: an eigenvalue lies within that distance of each reported
            value. Lanczos: the Ritz residual norm ‖Kx − θx‖ plus the products' rounding
            allowance s = 16·√n·ε·θ_max. Dense path: the rounding allowance n·ε₆₄·λ_max of K's
            assembly and eigh, plus (mixed precision) the rows' rounding bound 2·√θ·δ + δ²
            (see the module docstring). Both allowances are estimates, not certificates.
        converged: the ends asked for (``which``) met the tolerance (always true for the dense
            path).
        numerical_rank: number of eigenvalues above λ_max·n·ε₆₄ (dense path) or λ_max·√n·ε
            (Lanczos when the Krylov space covers the whole space), else ``None``.
        effective_rank: exp of the Shannon entropy of λ/Σλ (Roy & Vetterli 2007): exact from
            every eigenvalue (dense path), an SLQ estimate on the Lanczos path when
            ``slq_probes > 0`` (see ``effective_rank_method``), else ``nan``.
        n_rows: n, the size of K.
        n_matvecs: products with K (a block of k columns counts k); 0 for the dense Jacobian path.
        wall_time: seconds, probe construction included.
        method: ``"dense"`` or ``"lanczos"``.
        ritz_vectors: (n, m) vectors of the extreme eigenvalues, largest and smallest
            alternating; pass the result as ``warm_start=`` of the next call. ``None`` on the
            dense path unless ``dense_vectors=True`` (eigenvalues alone cost less).
        lambda_min_upper: upper bound on λ_min: θ_min + s on the Lanczos path (interlacing,
            certified for the evaluated products; s = 16·√n·ε·θ_max estimates their rounding);
            λ_min + residual_min on the dense path, under its rounding estimate.
        condition_number_lower: lower bound on κ: (θ_max − s)/(θ_min + s) on the Lanczos path;
            (λ_max − residual_max)/(λ_min + residual_min) on the dense path, under its
            rounding estimate.
        precision: the arithmetic: ``"float64"`` (dense), ``"mixed"`` (dense with a float32
            Jacobian and a float64 K) or the dtype of the Lanczos products (``"float32"``).
        effective_rank_method: ``"exact"``, ``"slq"`` (a stochastic estimate) or ``"none"``.
        density_nodes, density_weights: SLQ quadrature nodes and weights of the spectral
            measure (Lanczos path with ``slq_probes > 0``; the weights sum to about 1, see
            :func:`~glu_probe.ntk.density.slq_density`), for
            :func:`~glu_probe.ntk.density.spectral_density` with ``weights=``; else ``None``.
    """

    lambda_max: float
    lambda_min: float
    condition_number: float
    eigenvalues: Tensor | None
    residual_max: float
    residual_min: float
    converged: bool
    numerical_rank: int | None
    effective_rank: float
    n_rows: int
    n_matvecs: int
    wall_time: float
    method: str
    ritz_vectors: Tensor | None
    lambda_min_upper: float
    condition_number_lower: float
    effective_rank_method: str = "exact"
    density_nodes: Tensor | None = None
    density_weights: Tensor | None = None
    precision: str = "float64"

    def as_dict(self) -> dict[str, float]:
        """Every scalar field as a float (bools as 0/1, a missing rank as ``nan``), for logging."""
        out: dict[str, float] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _NON_SCALAR:
                continue
            out[f.name] = math.nan if v is None else float(v)
        return out


_NON_SCALAR = (
    "eigenvalues",
    "ritz_vectors",
    "method",
    "effective_rank_method",
    "density_nodes",
    "density_weights",
    "precision",
)


def _alternate_ends(vectors: Tensor, values: Tensor, k: int) -> Tensor:
    """Columns ordered largest, smallest, 2nd largest, 2nd smallest, ... (at most k)."""
    m = values.numel()
    order: list[int] = []
    lo, hi = 0, m - 1
    while lo <= hi and len(order) < k:
        order.append(hi)
        if lo != hi and len(order) < k:
            order.append(lo)
        lo, hi = lo + 1, hi - 1
    return vectors[:, order]


def _warm_vectors(warm_start: Any, n: int, block_size: int) -> Tensor | None:
    if warm_start is None:
        return None
    if isinstance(warm_start, NTKSpectrum):
        v = warm_start.ritz_vectors
    elif isinstance(warm_start, WarmStart):
        v = warm_start.vectors
    else:
        v = warm_start
    if v is None:
        return None
    if not isinstance(v, Tensor) or v.shape[0] != n:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        warnings.warn(
            f"warm_start ignored: its vectors have shape {shape}, but K has {n} rows "
            "(the probe batch changed size)",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )
        return None
    v = v.reshape(n, -1)[:, : min(block_size, n)]
    if not bool(torch.isfinite(v).all()):
        warnings.warn(
            "warm_start ignored: its vectors contain NaN or Inf (a previous probe that failed?); "
            "starting from random vectors",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )
        return None
    return v


def _converged_top(res: Any, tol: float) -> tuple[Tensor, Tensor] | None:
    """The Ritz pairs with error bound ≤ tol·θ_max (converged), largest first, for SLQ deflation.

    The bound here is the residual, refined to r²/δ where r ≤ √tol·|θ|: the deflation only
    shapes an estimate, and the stricter guard of the convergence flags
    (:data:`~glu_probe.ntk.krylov.TRUST_EXPONENT`) would deflate fewer pairs (effective rank
    14% off instead of 2% on a 96-row ReLU kernel)."""
    theta = res.ritz_values
    if theta.numel() == 0:
        return None
    bound = _error_bounds(theta, res.residual_norms, tol, refine=True, trust_exponent=0.5)
    top = float(theta.max())
    order = torch.argsort(theta, descending=True)
    keep = [int(i) for i in order if theta[i] > 0 and bound[i] <= tol * top]
    if not keep:
        return None
    return theta[keep], res.ritz_vectors[:, keep]


def _zero_kernel_error() -> ValueError:
    return ValueError(
        "the NTK is identically zero (K == 0): the probe outputs do not depend on the selected "
        "parameters; check the params= filter and the output= choice"
    )


#: ``check_spectrum_arguments``' default ``method``: the path is not known yet (the
#: monitor checks its ``spectrum_kwargs`` at construction and owns ``method`` itself).
_ANY_PATH: Any = object()


def check_spectrum_arguments(
    *,
    method: Any = _ANY_PATH,
    which: Any = "both",
    tol: Any = 1e-4,
    max_matvecs: Any = 400,
    block_size: Any = 4,
    chunk_size: Any = None,
    memory_budget: Any = None,
    warm_start: Any = None,
    slq_probes: Any = 0,
    slq_steps: Any = 10,
    jacobian_dtype: Any = torch.float64,
    dense_vectors: Any = False,
    drop_padding: Any = True,
    rows_unknown: bool = False,
) -> None:
    """ValueError for a bad :func:`ntk_spectrum` setting, whichever path would use it (the dense
    path ignores the Lanczos settings, but a typo there is still a typo). Needs no model: the
    monitor checks its ``spectrum_kwargs`` with it at construction.

    ``rows_unknown`` (the monitor's check at construction, before its probe exists): a
    ``max_matvecs`` below two Lanczos blocks (``2·block_size``) is refused for
    ``method="lanczos"`` and where ``method`` is not given, with the value as passed; the
    solver refuses it for every K above that size
    (:func:`~glu_probe.ntk.krylov.least_matvecs`). Otherwise the rows decide: ``ntk_spectrum``
    leaves it to the solver, which needs ``min(n, 2·block_size)`` (a 3-row probe runs on 3);
    ``method="auto"`` and ``"dense"`` accept it where the dense path is taken, which does not
    use it."""

    def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            none = " or None" if allow_none else ""
            raise ValueError(f"{name} must be a positive int{none}, got {value!r}")

    any_path = method is _ANY_PATH
    if not any_path and method not in ("auto", "dense", "lanczos"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lanczos', got {method!r}")
    for name, value, low in (("slq_probes", slq_probes, 0), ("slq_steps", slq_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if jacobian_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"jacobian_dtype must be torch.float32 or torch.float64, got {jacobian_dtype!r}"
        )
    if not isinstance(dense_vectors, bool):
        raise ValueError(f"dense_vectors must be a bool, got {dense_vectors!r}")
    if not isinstance(drop_padding, bool):
        raise ValueError(f"drop_padding must be a bool, got {drop_padding!r}")
    if which not in ("both", "largest", "smallest"):
        raise ValueError(f"which must be 'both', 'largest' or 'smallest', got {which!r}")
    check_tol(tol)
    positive_int("max_matvecs", max_matvecs)
    positive_int("block_size", block_size)
    least = least_matvecs(block_size)
    if rows_unknown and (any_path or method == "lanczos") and max_matvecs < least:
        raise ValueError(
            f"max_matvecs must be at least two Lanczos blocks (2·block_size = {least}), got "
            f"{max_matvecs}: nothing converges on the start block alone; raise max_matvecs or "
            "lower block_size"
        )
    positive_int("chunk_size", chunk_size, allow_none=True)
    if memory_budget is not None:
        checked_budget(memory_budget)  # any positive, finite number of bytes, as ntk_matrix
    if warm_start is not None and not isinstance(warm_start, (NTKSpectrum, WarmStart, Tensor)):
        raise ValueError(
            "warm_start must be a previous NTKSpectrum, a WarmStart or an (n, k) tensor of start "
            f"vectors, got {type(warm_start).__name__}"
        )


def _rank_warning(
    rank: int,
    n: int,
    lam_min: float,
    tol: float,
    mixed: bool = False,
    products: torch.dtype = torch.float64,
    what: str | None = None,
) -> None:
    what = what or (
        "max(λ_max·n·eps, δ²), δ the float32 Jacobian's rounding estimate"
        if mixed
        else "λ_max·n·eps"
    )
    hint = ""
    if mixed:
        hint = (
            "; jacobian_dtype=torch.float64 (the monitor's dtype=torch.float64) resolves "
            "smaller eigenvalues"
        )
    elif products != torch.float64:
        hint = f"; products in {products}: dtype=torch.float64 resolves smaller eigenvalues"
    warnings.warn(
        f"K has a near-null space at this precision: numerical rank {rank} of {n} (tolerance "
        f"{what} = {tol:.3e}, λ_min = {lam_min:.3e}); λ_min and κ are then dominated by "
        "rounding (the reported κ is not accurate, possibly infinite). Fewer rows "
        f"(smaller probe batch, output='pntk') or more parameters make K full rank{hint}",
        NTKRankWarning,
        stacklevel=external_stacklevel(),
    )


@allows_autograd
def ntk_spectrum(
    model: nn.Module,
    inputs: Any,
    *,
    output: OutputSpec = "pntk",
    method: str = "auto",
    params: ParamFilter = None,
    dtype: torch.dtype | None = None,
    tol: float = 1e-4,
    max_matvecs: int = 400,
    block_size: int = 4,
    which: str = "both",
    warm_start: NTKSpectrum | Tensor | None = None,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
    eval_mode: bool = True,
    process_group: Any = None,
    generator: torch.Generator | None = None,
    slq_probes: int = 0,
    slq_steps: int = 10,
    jacobian_dtype: torch.dtype = torch.float64,
    dense_vectors: bool = False,
    drop_padding: bool = True,
) -> NTKSpectrum:
    """Extreme eigenvalues and condition number of the empirical NTK of ``model`` on ``inputs``.

    K = J Jᵀ (n × n), J the Jacobian of the n probe rows (``output``) with respect to the selected
    trainable parameters. The dense path gives every eigenvalue of K to float64 rounding
    (float64 rows) or within a rounding bound (float32 rows). The Lanczos path gives Ritz values
    θ with residuals r = ‖Kx − θx‖: an eigenvalue of K lies in [θ − r, θ + r], and interlacing
    makes θ_max ≤ λ_max and λ_min ≤ θ_min, converged or not (``lambda_min_upper``,
    ``condition_number_lower``: certified for the evaluated products, widened by an estimate of
    their rounding). The module docstring has the details;
    :class:`NTKSpectrum` lists what is returned.

    Args:
        model: any ``nn.Module``; its state (training flags, RNG, ``.grad``) is left untouched.
        inputs: probe batch: tensor, tuple or dict (HF batch); integer token ids are fine.
        output: ``"pntk"`` (one row per sample/token), ``"full"`` (every output) or a callable.
        method: ``"auto"``, ``"dense"`` (exact, float64 eigh) or ``"lanczos"`` (matrix-free).
        params: parameter filter: names, dotted-component strings, regular expressions
            (``re.Pattern`` or ``"re:..."``) or a callable (see
            :func:`~glu_probe.ntk.functional.select_parameters`).
        dtype: precision of the Lanczos products (TF32 off): ``None`` (default) is float32, or
            float64 for a float64 model (:func:`~glu_probe.ntk.functional.default_probe_dtype`:
            a float32 probe would round its parameters and inputs, which no residual covers).
            The dense path accumulates K and runs ``eigh`` in float64 whatever ``dtype`` is.
        jacobian_dtype: precision of the dense path's Jacobian rows. ``torch.float64`` (default)
            is exact to ≈ n·ε₆₄·κ. ``torch.float32`` is the mixed-precision mode (K and ``eigh``
            stay float64): about half the cost (0.5–0.7× on the demo ViT and GPT-2 on CPU), every
            eigenvalue within the reported residual 2·√λ·δ + δ², δ =
            :func:`~glu_probe.ntk.dense.jacobian_rounding_estimate` (a rounding estimate, not a
            certificate), and the relative error of λ_min grows like √κ (κ errors measured
            8e-9 … 2.2e-6 at κ ≤ 8e5 on the demo models' 64-row probes, 1e-5 at κ ≈ 2.4e7).
        tol: relative accuracy of the Lanczos extreme eigenvalues (a ``tol`` above
            ``krylov.LOOSEST_TOL = 1e-2`` is tested as 1e-2: looser residual tests certified a
            neighbour of λ_min as λ_min).
        max_matvecs: budget of single-vector products for Lanczos.
        block_size: Lanczos block size.
        which: Lanczos ends that must converge: ``"both"``, ``"largest"`` (λ_max only: cheap,
            λ_min then is an upper bound only) or ``"smallest"``.
        warm_start: a previous :class:`NTKSpectrum` (or a :class:`WarmStart`, or an (n, k)
            tensor) whose Ritz vectors start the Lanczos iteration; ignored with a warning if
            n changed, and without one for a dense result, which carries no vectors unless
            ``dense_vectors=True``.
        memory_budget: bytes of tensors the call holds at once. Dense path: K, its live
            Jacobian blocks or factors, workspaces and the probe's copies (as for
            :func:`~glu_probe.ntk.ntk_matrix`), and the eigendecomposition's copy of K (and
            eigenvectors). Lanczos path: the Krylov basis, the block products' vectors and
            activations (the probe batch is chunked to fit). ``None``: the defaults of each.
        chunk_size: samples per chunk in the matrix-free products (bounds activation memory).
        eval_mode: run BatchNorm/dropout in eval mode (default).
        process_group: distributed group; each rank passes its own probe shard (Lanczos only)
            and the same arguments otherwise. A ``memory_budget`` is checked against every
            rank's shard, and the ranks agree on one plan (basis size, block width, spanning
            the whole space or not); where any rank's shard does not fit, every rank raises
            the same ``ValueError``.
        generator: random source of the Lanczos start (default: fixed seed, global RNG untouched).
        slq_probes: Lanczos path only: estimate the effective rank and the spectral density by
            stochastic Lanczos quadrature with this many Rademacher probes (0: skip, the
            default). Costs ``slq_probes·slq_steps`` single-vector products in ``slq_steps``
            block products. The probes come from a fixed seed, so successive calls (a training
            run's probes) use the same vectors and their estimates vary smoothly. With
            ``which="both"`` and ``n <= min(2·slq_probes·slq_steps, max_matvecs)``, Lanczos
            instead spans the whole space (``n`` products, about the cost of converging λ_min
            plus the quadrature): every eigenvalue, and the effective rank, exact.
        slq_steps: Lanczos steps per SLQ probe (the quadrature is exact for polynomials of
            degree < 2·slq_steps).
        dense_vectors: dense path only: also return the extreme eigenvectors as
            ``ritz_vectors`` (for a later ``warm_start``), with ``eigh`` instead of
            ``eigvalsh``. Off by default: the eigenvalues alone take 0.5–0.6× the time at
            n = 512 on CPU, and a dense result rarely warm-starts anything (the next probe of
            the same size is dense again).
        drop_padding: leave out the rows of padded tokens: with ``output="pntk"`` on a
            sequence output and a dict batch whose ``attention_mask`` ``(batch, tokens)`` has
            zeros, K is the principal submatrix of the real tokens' rows (both paths; exact:
            the same products, restricted), ``n_rows`` counts those. A padded position is seen
            by no loss, and its rows changed κ severalfold (a review's GPT-2: 300 with them,
            121 without). ``False`` keeps every row. Not applied to a sharded probe
            (``process_group``), which keeps every row with a warning.

    Raises:
        ValueError: bad arguments, empty batch, no trainable parameters, NaN/Inf outputs, or
            outputs that do not depend on the parameters (K == 0).
        MatrixFreeUnavailableError: (a ``NotImplementedError``) the Lanczos path cannot form
            J·u correctly for the model (see :class:`~glu_probe.ntk.NTKOperator`), and the
            dense path was not asked for (``method="auto"`` falls back to it with a
            ``RuntimeWarning`` where K fits the budget and the samples are independent).
    """
    t0 = time.perf_counter()
    check_spectrum_arguments(
        method=method,
        which=which,
        tol=tol,
        max_matvecs=max_matvecs,
        block_size=block_size,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        warm_start=warm_start,
        slq_probes=slq_probes,
        slq_steps=slq_steps,
        jacobian_dtype=jacobian_dtype,
        dense_vectors=dense_vectors,
        drop_padding=drop_padding,
    )
    if dtype is None:
        dtype = default_probe_dtype(model, params)
    if method == "dense" and process_group is not None:
        raise ValueError("method='dense' does not support process_group; use method='lanczos'")
    if memory_budget is not None:
        memory_budget = checked_budget(memory_budget)
    # The dense path runs in float64 whatever `dtype` is: validate the probe there too (a
    # float64 model may be finite only in float64).
    first = torch.float64 if method == "dense" else dtype
    if memory_budget is not None:
        refusal: ValueError | None = None
        try:
            refuse_small_budget(memory_budget, model, inputs, params, first)
        except ValueError as err:
            if process_group is None:
                raise
            refusal = err
        if process_group is not None:
            # Each rank checks its own shard: every rank refuses together, or none does (a
            # lone refusal left the other ranks in the next collective; review, session 26).
            home = next((q.device for q in model.parameters()), torch.device("cpu"))
            first_refusing = _refusing_rank(refusal, process_group, home)
            _refuse_together(refusal, first_refusing, process_group, home)

    def build(probe_dtype: torch.dtype) -> ProbeFunction:
        return ProbeFunction(
            model,
            inputs,
            output=output,
            params=params,
            dtype=probe_dtype,
            eval_mode=eval_mode,
            memory_budget=memory_budget,
        )

    wide: ProbeFunction | None = None  # `auto`: finite only in float64 (see below)
    try:
        probe = agreed(lambda: build(first), process_group, model)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        if first == dtype:
            raise
        # no float64 kernel for some op: the dense path falls back to float32 rows itself
        try:
            probe = build(dtype)
        except Exception:
            raise err from None
    except ValueError as err:
        # `auto` validates in `dtype` before it knows its method; outputs that overflow there
        # may be finite in float64, where the dense path runs (review, session 18: a float64
        # model refused by `auto` and accepted by method="dense").
        if method != "auto" or first == torch.float64 or process_group is not None:
            raise
        if "NaN/Inf" not in str(err):
            raise
        try:
            wide = build(torch.float64)
        except Exception:
            raise err from None
        probe = wide
    n = probe.n_rows
    if wide is not None:
        if n > AUTO_DENSE_MAX_ROWS or _budget(probe, 8, memory_budget) < n * n * 8:
            raise ValueError(
                f"the model's outputs are not finite in {dtype} on the probe batch (they are in "
                "float64), and the probe is too large for the float64 dense path; pass "
                "dtype=torch.float64"
            )
        method = "dense"
    auto = method == "auto"
    if method == "auto":
        method = "lanczos"
        if process_group is None and n <= AUTO_DENSE_MAX_ROWS:
            budget = _budget(probe, 8, memory_budget)
            if budget >= n * n * 8 + 4 * probe.n_params * 8:
                method = "dense"
    # (The dense path's narrowing warning comes once it has accepted the budget: a run that
    # auto then moves to Lanczos warned of a jacobian_dtype it never used.)
    if method != "dense":
        warn_narrowed(model, probe.dtype, "ntk_spectrum: dtype")
    keep = probe.padding_keep() if drop_padding else None
    if keep is not None and process_group is not None:
        warnings.warn(
            "ntk_spectrum: the probe has padded tokens (attention_mask 0), whose rows a sharded "
            "probe keeps in K; pass a probe without padding to leave them out",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
        keep = None
    if method == "dense":
        try:
            result = _dense(
                probe, memory_budget, block_size, t0, jacobian_dtype, dense_vectors, keep
            )
            warn_narrowed(model, jacobian_dtype, "ntk_spectrum: jacobian_dtype")
            return result
        except Float64UnavailableError as err:
            # (no float64 kernel, and the float32-rows fallback failed too: the iterative
            # path's float32 products still run; a QAT model's fake-quantize ops on coupled
            # samples, session 29)
            if not auto:
                raise
            warnings.warn(
                f"ntk_spectrum: {str(err)[:400]} — method='auto' takes the iterative path "
                "(method='lanczos') instead",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )
            method = "lanczos"
            auto = False
        except DenseBudgetError:
            # auto's estimate (K and four parameter vectors) is below the dense path's floor
            # (K's eigendecomposition beside K, one product's activations, the probe's copies):
            # a budget it accepted was refused with "use method='lanczos'", where Lanczos fits
            # (review, session 25). The refusal comes before any work.
            if not auto:
                raise
            method = "lanczos"  # (with dense_vectors too, as below auto's estimate: the
            # Lanczos result carries its Ritz vectors)
            warn_narrowed(model, probe.dtype, "ntk_spectrum: dtype")
            auto = False  # (the dense path was refused: no way back to it below)
    try:
        return _lanczos(
            probe,
            keep=keep,
            tol=tol,
            max_matvecs=max_matvecs,
            block_size=block_size,
            which=which,
            warm_start=warm_start,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            process_group=process_group,
            generator=generator,
            slq_probes=slq_probes,
            slq_steps=slq_steps,
            t0=t0,
        )
    except MatrixFreeUnavailableError as err:
        # `auto` took Lanczos for a probe above AUTO_DENSE_MAX_ROWS (a speed rule), but its
        # products cannot be formed correctly for this model (review, session 27: a
        # @once_differentiable Function): the dense path needs first-order reverse mode only,
        # and is taken where K fits the budget and the samples are independent (per-sample
        # rows; a coupled batch's dense K comes from the same products). Otherwise the error.
        if (
            not auto
            or process_group is not None
            or probe.per_sample_why is not None
            or _budget(probe, 8, memory_budget) < n * n * 8 + 4 * probe.n_params * 8
        ):
            raise
        warnings.warn(
            f"ntk_spectrum: {str(err).splitlines()[0][:300]} — method='auto' computes K densely "
            "instead (method='dense': per-sample reverse-mode Jacobian rows)",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )
        try:
            result = _dense(
                probe, memory_budget, block_size, t0, jacobian_dtype, dense_vectors, keep
            )
        except DenseBudgetError:
            raise err from None
        warn_narrowed(model, jacobian_dtype, "ntk_spectrum: jacobian_dtype")
        return result


def _no_double_backward(err: BaseException) -> bool:
    """A missing derivative of a *backward* op (``_embedding_bag_backward``,
    ``aten::_ctc_loss_backward``): second order only, so the dense path still works. A missing
    first-order derivative (``igamma: input``) is left as raised: the dense path fails too."""
    text = str(err)
    return "derivative for" in text and "_backward" in text


#: A warm-started Lanczos end that moved by more than this factor from the warm start's value
#: is confirmed from a cold start (:func:`_warm_start_moved`).
WARM_CONFIRM_FACTOR = 2.0


def _warm_start_moved(warm_start: Any, res: LanczosResult, which: str) -> bool:
    """Whether a converged warm-started run must be confirmed from a random start.

    A Krylov method cannot certify that no eigenvalue lies beyond its extreme Ritz values; a
    random start makes a miss improbable, since every eigenvector then has a share of the start.
    A warm start of the previous probe's Ritz vectors gives that up for speed: where those
    vectors are still eigenvectors of the new K (to rounding) their Ritz pairs converge at once,
    and the run can stop before the random refill shows what lies beyond. Review, session 20:
    a two-expert model whose second probe only rescaled one expert (K block diagonal, the same
    eigenvectors) stopped with ``converged=True`` and λ_min 88-542x too large in 6 of 6 seeds.
    The previous values are the warm start's evidence that nothing lies beyond: where an end
    moved by more than :data:`WARM_CONFIRM_FACTOR`, the kernel changed too much for that
    evidence, and the run is repeated from a random start (its products counted too). A raw
    tensor warm start carries no previous values and is not checked (a :class:`WarmStart`
    carries them: the NTK monitor's warm starts).
    """
    if not isinstance(warm_start, (NTKSpectrum, WarmStart)) or not res.converged:
        return False
    pairs = []
    if which in ("both", "largest"):
        pairs.append((warm_start.lambda_max, res.lambda_max))
    if which in ("both", "smallest"):
        pairs.append((warm_start.lambda_min, res.lambda_min))
    # λ at the products' rounding level (a near-null space, κ = inf) is noise, not a position
    # to compare: every float32 warm start of a rank-deficient K was re-run cold (review,
    # session 20)
    floor = (
        abs(res.lambda_max) * res.ritz_vectors.shape[0] * torch.finfo(res.ritz_vectors.dtype).eps
    )
    for before, now in pairs:
        if not (math.isfinite(before) and before > 0.0 and math.isfinite(now)):
            continue
        if min(abs(before), abs(now)) <= floor:
            continue
        if now <= 0.0 or not 1.0 / WARM_CONFIRM_FACTOR <= now / before <= WARM_CONFIRM_FACTOR:
            return True
    return False


def _overflow_hint(dtype: torch.dtype) -> str:
    """The overflow half of a non-finite Lanczos product's message (review, session 20: K of
    ~1e41 from outputs of ~1e20 was blamed on an undefined derivative, and K of ~1e36 gave an
    internal "residual_norms must be finite" error)."""
    top = torch.finfo(dtype).max
    return (
        f"K's entries may overflow {str(dtype).removeprefix('torch.')} (above {top:.1e}; they "
        "grow as the outputs' scale squared), "
        + (
            "pass dtype=torch.float64 (the dense path, method='dense', also works in float64), "
            if dtype != torch.float64
            else "rescale the outputs, "
        )
    )


def _dense(
    probe: ProbeFunction,
    memory_budget: int | None,
    block_size: int,
    t0: float,
    jacobian_dtype: torch.dtype = torch.float64,
    vectors: bool = False,
    keep: Tensor | None = None,
) -> NTKSpectrum:
    probe = probe.astype(torch.float64)
    if memory_budget is not None:
        # The eigendecomposition beside K: its copy of K (and the eigenvectors with their
        # LAPACK workspace, about 2n² more), reserved out of the budget.
        n = probe.n_rows
        reserve = (3 if vectors else 1) * n * n * 8 + 8 * n * 8
        if memory_budget <= reserve:
            raise DenseBudgetError(
                f"memory_budget={memory_budget} bytes cannot hold K's eigendecomposition "
                f"({reserve} bytes for n = {n} rows) beside K; raise it, or use "
                "method='lanczos' (matrix-free)"
            )
        memory_budget -= reserve
    else:
        reserve = 0
    # rows_dtype is float64 when no Jacobian rows fit: the operator strategy's products run in
    # float64 whatever jacobian_dtype asks, and K is then float64-exact.
    try:
        K, rows_dtype = _assemble(probe, memory_budget, "auto", jacobian_dtype, reserve)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        # Some kernels have no float64 version (the grouped GEMM of transformers' fused
        # mixture-of-experts layers, some fused or quantised ops). float64 rows are only the
        # default: the mixed-precision path (float32 rows, float64 K, rounding bound in the
        # residuals) still gives every eigenvalue, so it is taken instead, with a warning. If
        # float32 fails as well, the float64 error is the one raised.
        if jacobian_dtype != torch.float64 or is_out_of_memory(err):
            raise
        try:
            K, rows_dtype = _assemble(probe, memory_budget, "auto", torch.float32, reserve)
        except Exception as err32:
            raise_float64_unavailable(
                err, err32, "method='lanczos' (float32 products, its own bounds)"
            )
        warnings.warn(
            f"ntk_spectrum: the model does not run in float64 ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); the dense path used float32 Jacobian rows "
            "(mixed precision: K and eigh in float64, the rows' rounding bound is in the "
            "residuals). Pass jacobian_dtype=torch.float32 to choose this and silence the warning",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )
    if keep is not None:  # the real tokens' principal submatrix (drop_padding)
        idx = keep.nonzero().squeeze(1).to(K.device)
        K = K.index_select(0, idx).index_select(1, idx)
    n = K.shape[0]
    # The rows' rounding: their dtype's, or coarser where the model casts inside its forward
    # (LLaMA-family norms in float32): then even float64 rows carry float32 rounding.
    internal = _internal_rounding(probe, warn=rows_dtype == torch.float64)
    if rows_dtype != torch.float64:
        # The rows ran on a rows_dtype copy, traced as such: autocast never narrows float64, so
        # the float64 probe's trace missed a model's own bfloat16 autocast that its float32
        # rows did run under (review, session 29: λ_max 18x outside the residual).
        rows_internal = forward_rounding_dtype(probe.astype(rows_dtype, check=False))
        internal = max(internal, rows_internal, key=lambda d: torch.finfo(d).eps)
    rounding_dtype = max(rows_dtype, internal, key=lambda d: torch.finfo(d).eps)
    mixed = rounding_dtype != torch.float64
    # ‖E‖₂ estimate of the Jacobian's rounding (0: float64 rows, K exact up to n·ε₆₄·λ_max).
    delta = jacobian_rounding_estimate(float(K.trace()), rounding_dtype) if mixed else 0.0
    evecs: Tensor | None = None
    if vectors:
        evals, evecs = torch.linalg.eigh(K)
    else:
        evals = torch.linalg.eigvalsh(K)
    evals = evals.cpu()
    lam_max, lam_min = float(evals[-1]), float(evals[0])
    if lam_max <= 0.0:
        raise _zero_kernel_error()

    def rounding(theta: float) -> float:  # Weyl on σ = √θ: |λ − θ| ≤ 2√θ·δ + δ²
        return 2.0 * math.sqrt(max(theta, 0.0)) * delta + delta * delta

    # float64 rounding of K's assembly and of eigh: every eigenvalue within ≈ n·ε₆₄·λ_max of
    # K's (backward stability and Weyl): in the residuals and the bounds, so that at κ ≳ 1e13
    # lambda_min_upper and condition_number_lower stay bounds (they were λ_min and κ).
    eps64 = torch.finfo(torch.float64).eps
    s64 = n * eps64 * lam_max
    res_max, res_min = rounding(lam_max) + s64, rounding(lam_min) + s64
    rank_tol = max(s64, delta * delta)
    rank = int((evals > rank_tol).sum())
    if rank < n:
        _rank_warning(rank, n, lam_min, rank_tol, mixed=mixed)
    # λ_min at or below the rounding level (numerical rank < n) is numerically zero: κ = ∞, as
    # documented and as on the Lanczos path (it was λ_max/λ_min of rounding noise, e.g. 2.7e17)
    kappa = lam_max / lam_min if lam_min > 0.0 and rank == n else math.inf
    if rank == n and eps64 * kappa > 1e-6:
        warnings.warn(
            f"K is ill-conditioned at float64: eps·κ = {eps64 * kappa:.1e} > 1e-6, so λ_min and "
            "κ may carry a relative error of that order (up to n·eps·κ = "
            f"{n * eps64 * kappa:.1e}); condition_number_lower = (λ_max − r)/(λ_min + r) with "
            "r = n·eps·λ_max bounds κ from below",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )
    upper = lam_min + res_min
    kappa_lower = (lam_max - res_max) / upper if upper > 0.0 else math.inf
    return NTKSpectrum(
        lambda_max=lam_max,
        lambda_min=lam_min,
        condition_number=kappa,
        eigenvalues=evals,
        residual_max=res_max,
        residual_min=res_min,
        converged=True,
        numerical_rank=rank,
        effective_rank=float(_effective_rank(evals)),
        n_rows=n,
        n_matvecs=0,
        wall_time=time.perf_counter() - t0,
        method="dense",
        ritz_vectors=(
            None if evecs is None else _alternate_ends(evecs, evals, max(2 * block_size, 2))
        ),
        lambda_min_upper=upper,
        condition_number_lower=min(kappa_lower, kappa),
        precision="mixed" if mixed else "float64",
    )


def _internal_rounding(probe: ProbeFunction, warn: bool = True) -> torch.dtype:
    """:func:`~glu_probe.ntk.dense.forward_rounding_dtype` (``probe.dtype``, or coarser where
    the model casts inside its forward), with a warning where that makes a float64 probe less
    than float64."""
    internal = forward_rounding_dtype(probe)
    if warn and internal != probe.dtype and probe.dtype == torch.float64:
        if not forward_traced(probe):
            warnings.warn(
                "the precision the model's forward pass computes in could not be traced (it "
                "ran neither on one sample nor on the whole batch under the trace): the "
                f"float64 probe is taken to be exact only to {internal} rounding, the narrowest "
                "arithmetic a float64 forward is known to cast to, and the residuals and "
                "bounds carry that rounding (precision='mixed')",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )
        else:
            warnings.warn(
                f"the model computes part of its forward pass in {internal} whatever the "
                "probe's dtype (a cast inside it, e.g. Hugging Face LLaMA-family RMSNorm, "
                f"rotary embedding or softmax): the float64 probe is exact only to {internal} "
                "rounding, and the residuals and bounds carry that rounding (precision='mixed')",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )
    return internal


def _full_span_block(probe: ProbeFunction, n: int, block_size: int) -> int:
    """Block width of a Lanczos run that spans the whole space.

    Spanning costs ``n`` single-vector products whatever the width, so wider blocks change only
    how many (vmapped) block products carry them: fewer calls, less per-call dispatch overhead.
    Measured on CPU (GPT-2 of 0.1–3.2M parameters, 64 rows, full span): 16 columns per product
    took 0.5–0.8× the time of 4; 64 columns was slower again (each column holds a
    parameter-sized VJP output, so memory traffic grows). On an H200 (GPT-2-small, 64 rows)
    16 columns took 0.30× the time of 4, and wider blocks are measured in
    ``benchmarks/RESULTS_ntk.md`` §7. Hence up to :data:`FULL_SPAN_BLOCK` columns
    (:data:`FULL_SPAN_BLOCK_CUDA` on CUDA), never fewer than ``block_size``, and only as many
    as keep the block's VJP outputs (``width · n_params`` numbers) within 1/8 of the device's
    free memory.
    """
    per_column = probe.n_params * torch.finfo(probe.dtype).bits // 8
    fits = _available_bytes(probe.device) // 8 // max(per_column, 1)
    cap = FULL_SPAN_BLOCK_CUDA if probe.device.type == "cuda" else FULL_SPAN_BLOCK
    return max(block_size, min(n, cap, fits))


def _budgeted_products(
    probe: ProbeFunction,
    n: int,
    width: int,
    block_size: int,
    basis_vectors: int,
    chunk_size: int | None,
    budget: int,
    slq_probes: int = 0,
    slq_steps: int = 0,
) -> tuple[int, int | None, int]:
    """(block width, samples per chunk of the probe batch, Krylov basis columns kept) of the
    Lanczos path within ``budget`` bytes of tensors (``n``: the rows of K, all ranks' when
    sharded).

    Counted, beside the probe's copies of its parameters, buffers and inputs, in each of two
    phases that do not overlap:

    * **Lanczos**: twice the Krylov bookkeeping (the solver's orthogonalisation and restart
      temporaries measured up to 1.3× the single count): a basis of ``cap`` columns (``Q``,
      ``K Q`` and their restart copies: 4·n·cap numbers; the projected matrix and its
      eigendecomposition: 3·cap²; a block's vectors: 4·n·width) and one block product of
      ``width`` columns;
    * **SLQ** (``slq_probes > 0``, where the Krylov space does not span everything): the Ritz
      vectors and the deflation basis (2·n·cap), the quadrature's basis of ``slq_probes ×
      slq_steps`` columns twice (measured peak 1.2–1.65× one basis, its product included),
      its block's vectors (4·n·probes) and one block product of ``slq_probes`` columns.

    A block product costs, per column, about four parameter-sized vectors (Jᵀ U, the JVP
    tangents, their workspace) and two n-vectors, and per column and per sample of a chunk the
    product's activations and backward intermediates (about one activation set each, twice:
    VJP and JVP; see :func:`~glu_probe.ntk.dense.activation_elements`). The basis shrinks first
    (to four blocks; a thick restart keeps the wanted Ritz vectors), then a full-span block
    narrows (down to ``block_size``), then the batch is chunked (chunked products recompute
    their forward pass). ``ValueError`` where not even one sample's product fits beside the
    smallest basis.
    """
    from .dense import activation_elements

    item = torch.finfo(probe.dtype).bits // 8
    p = probe.n_params
    copies = probe_copy_bytes(probe)
    per_col = (4 * p + 2 * n) * item
    act = activation_elements(probe) * item
    steps = min(slq_steps, n)
    slq_basis = slq_probes * steps

    def krylov(cap: int, w: int) -> int:
        return 2 * (4 * n * cap + 3 * cap * cap + 4 * n * w) * item

    def room(cap: int, w: int) -> int:
        return budget - copies - krylov(cap, w) - w * per_col

    def slq_room(cap: int) -> int:
        held = 2 * n * cap + 2 * n * slq_basis + 4 * n * slq_probes + slq_probes * steps**2
        return budget - copies - held * item - slq_probes * per_col

    def one(w: int) -> int:  # one sample's activations in a product of w columns
        return 2 * (w + 1) * act

    def fits(cap: int, w: int, samples: int) -> bool:
        if room(cap, w) < one(w) * samples:
            return False
        return not slq_probes or slq_room(cap) >= one(slq_probes) * min(samples, probe.batch_size)

    cap = max(1, basis_vectors)
    least = min(cap, 4 * block_size)
    while cap > least and not fits(cap, block_size, 1):
        cap = max(least, cap * 3 // 4)
    while width > block_size and not fits(cap, width, probe.batch_size):
        width = max(block_size, width // 2)
    if not fits(cap, width, 1):
        if room(cap, width) < one(width):
            raise ValueError(
                f"memory_budget={budget} bytes cannot hold one Lanczos product of {width} "
                f"vectors: the probe's copies ({copies} bytes), the smallest Krylov basis "
                f"({krylov(cap, width)}), {width} columns of four parameter-sized vectors and "
                f"two n-vectors each ({width * per_col}) "
                f"and one sample's activations ({one(width)}); raise it, or lower block_size"
            )
        raise ValueError(
            f"memory_budget={budget} bytes cannot hold the spectral density's quadrature "
            f"(slq_probes={slq_probes}, slq_steps={slq_steps}) beside the probe's copies: "
            f"{budget - slq_room(cap) + one(slq_probes)} bytes are needed; raise it, or lower "
            "slq_probes / slq_steps"
        )
    if not act:
        return width, chunk_size, cap
    samples = room(cap, width) // one(width)
    if slq_probes:
        samples = min(samples, slq_room(cap) // one(slq_probes))
    if samples >= probe.batch_size:
        return width, chunk_size, cap
    samples = max(1, int(samples))
    return width, (samples if chunk_size is None else min(chunk_size, samples)), cap


_Plan = tuple[int, int | None, int]
"""(block width, samples per chunk, Krylov basis columns) of :func:`_budgeted_products`."""


def _local_plans(
    probe: ProbeFunction,
    n: int,
    span_width: int | None,
    block_size: int,
    max_matvecs: int,
    chunk_size: int | None,
    budget: int,
    slq_probes: int,
    slq_steps: int,
) -> tuple[_Plan | None, _Plan | ValueError]:
    """This rank's Lanczos plans within ``budget`` (:func:`_budgeted_products`): the plan that
    spans the whole space in blocks of up to ``span_width`` columns (``None`` where no full
    span is asked for, or it does not fit: its basis would be thick-restarted), and the plan of
    a thick-restarted run with the SLQ estimate, or the ``ValueError`` that refuses it.

    Spanning the whole space makes every eigenvalue exact and SLQ never runs: its basis is
    reserved only where the whole space does not fit. Both plans are returned (they are
    arithmetic only) so that the ranks of a sharded probe agree on one in a single all-reduce
    (:func:`_agreed_plan`).
    """

    def plan(width: int, slq: int) -> _Plan:
        return _budgeted_products(
            probe,
            n,
            width,
            block_size,
            min(max(max_matvecs, width), n),
            chunk_size,
            budget,
            slq,
            slq_steps,
        )

    spanning: _Plan | None = None
    if span_width is not None:
        try:
            spanning = plan(span_width, 0)
        except ValueError:
            spanning = None
        if spanning is not None and spanning[2] < n:
            spanning = None
    fallback: _Plan | ValueError
    try:
        fallback = plan(block_size, slq_probes)
    except ValueError as err:
        fallback = err
    return spanning, fallback


def _agreed_plan(
    spanning: _Plan | None,
    fallback: _Plan | ValueError,
    process_group: Any,
    device: torch.device,
) -> tuple[bool, _Plan]:
    """(whether to span the whole space, the plan) that every rank of ``process_group`` runs,
    from each rank's :func:`_local_plans`.

    Every product of a sharded probe is a collective, so the ranks must run the same Lanczos
    iteration: one plan for all, though each rank's shard (and free memory) differs. The whole
    space is spanned only where it fits on every rank; the block width and the basis are the
    smallest of the ranks' (smaller ones hold less, so every rank's own plan still fits); and
    a refusal on any rank raises the same ``ValueError`` on every rank (review, session 26:
    one rank refused and the others waited in the next collective, or died with gloo's
    "Connection closed by peer"). The samples per chunk stay each rank's own (its products'
    activations are local). One all-reduce, and a broadcast of the refusal's text where one
    is refused; nothing without a group.
    """
    if process_group is None:
        if spanning is not None:
            return True, spanning
        if isinstance(fallback, ValueError):
            raise fallback
        return False, fallback
    import torch.distributed as dist

    device = _collective_device(process_group, device)
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    refusal = fallback if isinstance(fallback, ValueError) else None
    big = torch.iinfo(torch.int64).max
    # All MIN-reduced: spanning everywhere, the fallback everywhere, the first refusing rank
    # (world where none), then the widths and bases (big where this rank has no such plan).
    stats = torch.tensor(
        [
            int(spanning is not None),
            int(refusal is None),
            world if refusal is None else rank,
            big if spanning is None else spanning[0],
            big if spanning is None else spanning[2],
            big if isinstance(fallback, ValueError) else fallback[2],
        ],
        dtype=torch.int64,
        device=device,
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MIN, group=process_group)
    span_all, fallback_all, first, width, span_basis, basis = (int(v) for v in stats.tolist())
    if span_all:
        assert spanning is not None
        return True, (width, spanning[1], span_basis)
    if not fallback_all:
        _refuse_together(refusal, first, process_group, device)
    assert not isinstance(fallback, ValueError)
    return False, (fallback[0], fallback[1], basis)


def _collective_device(process_group: Any, device: torch.device) -> torch.device:
    """Where a small control tensor of ``process_group``'s collectives lives: the CPU for
    gloo, else ``device``."""
    import torch.distributed as dist

    return torch.device("cpu") if dist.get_backend(process_group) == "gloo" else device


def _refusing_rank(err: BaseException | None, process_group: Any, device: torch.device) -> int:
    """The lowest rank of ``process_group`` whose ``err`` is set (one MIN all-reduce), or the
    group's size where none is."""
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    first = torch.tensor(
        [dist.get_rank(process_group) if err is not None else world],
        dtype=torch.int64,
        device=_collective_device(process_group, device),
    )
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=process_group)
    return int(first.item())


def _refuse_together(
    err: ValueError | None,
    first: int,
    process_group: Any,
    device: torch.device,
) -> None:
    """Raise rank ``first``'s budget refusal ``err`` on every rank of ``process_group`` (as
    found by :func:`_refusing_rank`; ``err`` is set on that rank), with the same text
    everywhere; nothing where ``first`` is the group's size (no rank refused).

    The text names the refusing rank and keeps the ``memory_budget=`` start by which callers
    (the monitor's fallback to the engine's default budget) recognise a refused budget, so
    that every rank takes the same branch. One broadcast of the text.
    """
    import torch.distributed as dist

    if first >= dist.get_world_size(process_group):
        return
    text: list[Any] = [str(err) if dist.get_rank(process_group) == first else None]
    dist.broadcast_object_list(
        text,
        src=dist.get_global_rank(process_group, first),
        group=process_group,
        device=_collective_device(process_group, device),
    )
    raise ValueError(
        f"{text[0]} (rank {first}'s probe shard; every rank of the process group refuses)"
    ) from err


def _lanczos(
    probe: ProbeFunction, *, chunk_size: int | None, process_group: Any, **rest: Any
) -> NTKSpectrum:
    """:func:`_lanczos_on` on a new operator, whose CUDA graph and linearisation are released
    when it returns, not at garbage collection."""
    op = NTKOperator(None, None, probe=probe, chunk_size=chunk_size, process_group=process_group)
    try:
        return _lanczos_on(op, probe, chunk_size=chunk_size, process_group=process_group, **rest)
    finally:
        op.release()


def _lanczos_on(
    op: NTKOperator,
    probe: ProbeFunction,
    *,
    tol: float,
    max_matvecs: int,
    block_size: int,
    which: str,
    warm_start: Any,
    chunk_size: int | None,
    process_group: Any,
    generator: torch.Generator | None,
    slq_probes: int,
    slq_steps: int,
    t0: float,
    memory_budget: int | None = None,
    keep: Tensor | None = None,
) -> NTKSpectrum:
    n = op.n  # (all ranks' rows when sharded)
    matvec: Callable[[Tensor], Tensor] = op.matvec
    if keep is not None:  # K's principal submatrix on the real tokens' rows (drop_padding)
        idx, n_all = keep.nonzero().squeeze(1).to(probe.device), n

        def matvec(v: Tensor) -> Tensor:
            full = v.new_zeros((n_all, *v.shape[1:]))
            full[idx] = v
            return op.matvec(full)[idx]

        n = idx.numel()
    # An effective rank is asked for (slq_probes > 0) with both ends: for a small K, spanning
    # the whole space costs n products, about what convergence of λ_min plus the SLQ
    # estimate's slq_probes·slq_steps products would cost, and gives every eigenvalue exactly
    # (an exact effective rank and κ, no quadrature). E.g. GPT-2-small at 64 rows: 64 products
    # instead of 48 + 40.
    full_span = (
        slq_probes > 0 and which == "both" and n <= min(2 * slq_probes * slq_steps, max_matvecs)
    )
    width = block_size
    if full_span:
        width = _full_span_block(probe, n, block_size)
    max_basis: int | None = None
    if memory_budget is not None:
        spanning, fallback = _local_plans(
            probe,
            n,
            width if full_span else None,
            block_size,
            max_matvecs,
            chunk_size,
            memory_budget,
            slq_probes,
            slq_steps,
        )
        full_span, (width, budget_chunk, max_basis) = _agreed_plan(
            spanning, fallback, process_group, probe.device
        )
        if budget_chunk != chunk_size or process_group is not None:
            # Each rank's own chunks (its activations are local), but a sharded operator's
            # rechunk agrees on the split with the other ranks (one all-reduce): every rank
            # calls it, or the one that did waited in a collective the others never ran
            # (uneven shards plan different chunks).
            op.rechunk(budget_chunk)
    elif full_span and process_group is not None:
        # Every rank must run the same block products (each is a collective), but free
        # memory differs between ranks: all take the narrowest width.
        import torch.distributed as dist

        agreed = torch.tensor([width], dtype=torch.int64, device=probe.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=process_group)
        width = int(agreed.item())
    v0 = _warm_vectors(warm_start, n, block_size)
    if v0 is not None:
        v0 = v0.to(device=probe.device, dtype=probe.dtype)
    # The products this call runs at most (the Krylov space stops at n columns unless thick
    # restarts keep it smaller; then max_matvecs columns stop it, in blocks that a restart may
    # make narrower, so up to one product per column; the SLQ estimate adds slq_steps blocks):
    # the operator traces its linear maps only where enough of them remain.
    span = max_matvecs
    if (max_basis if max_basis is not None else default_max_basis(n, width, probe.dtype)) >= n:
        products = -(-min(span, n + width) // width)
    else:
        products = span
    op.expected_products = products + (slq_steps if slq_probes > 0 else 0)

    def run(start: Tensor | None) -> LanczosResult:
        return block_lanczos(
            matvec,
            n,
            block_size=width,
            # as passed: the solver's refusal of a budget below two blocks quotes it (it was
            # raised to one block here, which the solver never accepts, and quoted as that)
            max_matvecs=max_matvecs,
            tol=tol,
            v0=start,
            dtype=probe.dtype,
            device=probe.device,
            generator=generator,
            which=which,  # type: ignore[arg-type]
            full_span=full_span,
            max_basis=max_basis,
        )

    try:
        res = run(v0)
        if v0 is not None and _warm_start_moved(warm_start, res, which):
            res = run(None)  # confirmed from a cold (random) start
    except RuntimeError as err:  # (NotImplementedError is one)
        if isinstance(err, MatrixFreeUnavailableError):
            raise  # (the operator's own message)
        if _no_double_backward(err):
            # No forward-mode AD and no double backward either (nn.EmbeddingBag, ctc_loss): J·u
            # cannot be formed as a JVP, nor as the VJP of u ↦ Jᵀu (review, session 20).
            raise MatrixFreeUnavailableError(
                f"the Lanczos path cannot form J·u for this model ({err}): an operation has "
                "neither a forward-mode derivative nor a double backward (e.g. "
                "nn.EmbeddingBag). method='dense' needs first-order reverse mode only"
            ) from err
        if "randomness" not in str(err):
            raise
        raise ValueError(
            "the model draws random numbers in the probe (dropout in training mode with "
            "eval_mode=False): K is then random, and the Lanczos path's vmapped products refuse "
            "it. Use eval_mode=True (dropout off), or method='dense' for one random draw"
        ) from err
    except ValueError as err:
        if "NaN or Inf" not in str(err) and "must be finite" not in str(err):
            raise
        # The probe outputs were checked finite, so a derivative is not: forward mode (the
        # JVP) gives 0/0 where a function has no derivative at the probe point; or K's
        # entries (|∇g|², up to the outputs' scale squared) overflow the products' dtype.
        if "must be finite" in str(err):  # finite products, overflowing Ritz algebra
            raise ValueError(
                "the Lanczos iteration's numbers are not finite: " + _overflow_hint(probe.dtype)
            ) from err
        raise ValueError(
            "NTK product returned NaN or Inf although the probe outputs are finite: "
            # (overflow is no explanation in float64; review, session 20)
            + (_overflow_hint(probe.dtype) + "or " if probe.dtype != torch.float64 else "")
            + "a derivative is undefined at this point (forward-mode AD gives NaN e.g. for "
            "sqrt(relu(z)) at z = 0, where reverse mode gives 0; method='dense' uses reverse "
            "mode only)"
        ) from err
    if not (math.isfinite(res.lambda_max) and math.isfinite(res.lambda_min)):
        raise ValueError(
            "the Lanczos iteration's Ritz values are not finite: " + _overflow_hint(probe.dtype)
        )
    theta = res.ritz_values
    if float(theta.abs().max()) == 0.0:
        raise _zero_kernel_error()
    numerical_rank: int | None = None
    eff_rank = math.nan
    eff_method = "none"
    nodes: Tensor | None = None
    weights: Tensor | None = None
    internal = _internal_rounding(probe)  # probe.dtype, or coarser where the model casts
    eps = torch.finfo(internal).eps
    # The rounding level of the products (the Lanczos stop's own "numerically zero" test,
    # krylov._converged_flags): eigenvalues below it are noise. It was λ_max·n·eps (the dense
    # eigh's matrix_rank tolerance) when the basis spans the whole space, √n times the early
    # stop's, so tol=1e-6 reported κ = inf where tol=1e-4 stopped early with κ to 6e-6; the
    # measured errors of such runs stay near eps·λ_max (review, session 22). With a model
    # that rounds in bfloat16, n·eps exceeded 1 from n = 128 on (rank 0 beside a finite λ_max).
    rank_tol = res.lambda_max * math.sqrt(n) * eps
    wants_min = which != "largest"  # (λ_min is not estimated for "largest": no word on it)
    if res.exact:
        numerical_rank = int((theta > rank_tol).sum())
        eff_rank = float(_effective_rank(theta))
        eff_method = "exact"
        if numerical_rank < n and wants_min:
            _rank_warning(
                numerical_rank,
                n,
                res.lambda_min,
                rank_tol,
                products=probe.dtype,
                what="λ_max·√n·eps, the products' rounding level",
            )
    if res.lambda_min_is_zero and not res.exact and wants_min:
        warnings.warn(
            f"λ_min is numerically zero (θ_min = {res.lambda_min:.3e}, residual "
            f"{res.residual_min:.3e}, products in {probe.dtype}): K has a near-null space and "
            "κ = inf; the numerical rank is unknown without the dense path (method='dense')"
            + ("; dtype=torch.float64 resolves smaller eigenvalues" if eps > 1e-10 else ""),
            NTKRankWarning,
            stacklevel=external_stacklevel(),
        )
    elif (
        which == "both"
        and res.condition_number * eps > 10 * tol
        and math.isfinite(res.condition_number)
        and (not res.exact or numerical_rank == n)
    ):
        warnings.warn(
            f"λ_min is close to the rounding level of {internal} products: eps·κ = "
            f"{res.condition_number * eps:.1e} > 10·tol, so λ_min and κ may carry a relative "
            "error of that order even though the iteration converged"
            + ("; pass dtype=torch.float64" if probe.dtype != torch.float64 else ""),
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )
    if slq_probes > 0 and not res.exact:
        # Fixed seed: the same probes every call, so a run's estimates vary smoothly (common
        # random numbers), and every rank of a sharded operator draws the same vectors.
        slq_gen = torch.Generator().manual_seed(0x51C)
        nodes, weights = slq_density(
            matvec,
            n,
            n_probes=slq_probes,
            n_steps=slq_steps,
            generator=slq_gen,
            dtype=probe.dtype,
            device=probe.device,
            deflate=_converged_top(res, min(tol, LOOSEST_TOL)),  # (the tol the solver tested)
        )
        eff_rank = slq_effective_rank(nodes, weights, n)
        eff_method = "slq"
    # Rounding of the evaluated products: the Ritz data are exact for the operator as computed,
    # whose products differ from K's by rounding; this estimate widens the certificates to K
    # (measured misses without it: up to ~1e-7·λ_max with float32 products).
    # (eps: the model's own rounding where it is coarser than the products', so the allowance
    # is at least the solver's, LanczosResult.condition_number_lower)
    slack = rounding_allowance(n, eps, res.lambda_max)
    lam_max, lam_min, kappa = res.lambda_max, res.lambda_min, res.condition_number
    upper = lam_min + slack
    kappa_lower = condition_number_bound(lam_max, lam_min, slack)
    if res.exact and numerical_rank is not None and numerical_rank < n:
        # λ_min at or below the products' rounding level is numerically zero: κ = ∞, as on the
        # dense path and as the rank warning says (it was kept finite here while the rank said
        # otherwise: review, session 18); condition_number_lower stays a bound.
        kappa = math.inf
    if which == "largest":  # λ_min is not estimated: θ_min only bounds it from above
        lam_min = kappa = math.nan
    elif which == "smallest":  # λ_max is not estimated: θ_max only bounds it from below
        lam_max = kappa = math.nan
    if not res.converged:
        ends = {"both": "λ_max and λ_min", "largest": "λ_max", "smallest": "λ_min"}[which]
        tested = f"tol={tol:g}"
        if tol > LOOSEST_TOL:  # (the solver tests the loosest: quote what was tested)
            tested = f"tol={tol:g}, tested as {LOOSEST_TOL:g}"
        warnings.warn(
            f"block Lanczos did not converge for {ends} within {res.n_matvecs} products "
            f"(residuals: max end {res.residual_max:.2e}, min end {res.residual_min:.2e}, "
            f"{tested}); condition_number is an estimate, condition_number_lower = "
            f"{kappa_lower:.4g} is a bound. Raise max_matvecs or use "
            "warm_start=",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )
    return NTKSpectrum(
        lambda_max=lam_max,
        lambda_min=lam_min,
        condition_number=kappa,
        eigenvalues=theta.clone() if res.exact else None,
        # (the products' rounding too: a float32 θ_max once missed λ_max by 1.03e-5 against a
        # residual of 1.025e-5)
        residual_max=res.residual_max + slack,
        residual_min=res.residual_min + slack,
        converged=bool(res.converged),
        numerical_rank=numerical_rank,
        effective_rank=eff_rank,
        n_rows=n,
        n_matvecs=op.n_matvecs,
        wall_time=time.perf_counter() - t0,
        method="lanczos",
        ritz_vectors=res.warm_start(max(2 * block_size, 2)),
        lambda_min_upper=upper,
        condition_number_lower=kappa_lower,
        effective_rank_method=eff_method,
        density_nodes=nodes,
        density_weights=weights,
        precision=("mixed" if internal != probe.dtype else str(probe.dtype).removeprefix("torch.")),
    )
