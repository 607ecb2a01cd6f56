"""``NTKSpectrumMonitor``: the NTK condition number of the model, logged while it trains.

What is computed
----------------
Let f(θ; x) be the probed function (``pl_module(x)``, i.e. ``forward``, for a plain LightningModule;
``pl_module.model(x)`` and ``pl_module.baseline(x)`` for a :class:`PairedModule`; or the submodule
named by ``module=``), x_1..x_N a *fixed* probe batch and g the row map selected by ``output``
(``"pntk"``: g = Σ_o f_o/√O per sample or token; ``"full"``: every output scalar; or a callable).
With J = ∂g/∂θ over the trainable parameters (optionally filtered by ``params``), the empirical
NTK is K = J Jᵀ. Every ``every_n_steps`` optimizer steps (and at step 0) the monitor calls
:func:`glu_probe.ntk.ntk_spectrum` and logs

* ``ntk/lambda_max`` = λ_max(K), ``ntk/lambda_min`` = λ_min(K),
* ``ntk/condition_number`` = λ_max / λ_min, and ``ntk/log10_condition_number``,
* ``ntk/effective_rank``: the entropy effective rank of the spectrum, exact on the dense path; on
  the iterative path a stochastic Lanczos quadrature estimate (``slq_probes=4`` fixed
  Rademacher probes × 10 steps, the converged top Ritz pairs deflated; set
  ``spectrum_kwargs={"slq_probes": 0}`` to skip it, and it is then not logged),
* ``ntk/residual_max``, ``ntk/residual_min``: the Ritz residual norms ‖K v − θ v‖ of the extreme
  Ritz pairs. By the Bauer–Fike / Kahan bound for symmetric K, an eigenvalue of K lies within
  that distance of the reported value. On the exact (dense ``eigh``) path they are the rounding
  bounds 2·√λ·δ + δ² of the float32 Jacobian rows (default ``dtype``; see
  :func:`~glu_probe.ntk.ntk_spectrum`), and with ``dtype=torch.float64`` the float64 rounding
  allowance n·ε₆₄·λ_max alone (about 1e-13 of λ_max at 64 rows).

For a PairedModule the names are ``ntk/model/<name>`` and ``ntk/baseline/<name>`` (its
``model_prefix`` / ``baseline_prefix``). The values also go to ``trainer.callback_metrics`` (0-dim
tensors, on every rank), so ``EarlyStopping`` / ``ModelCheckpoint(monitor="ntk/condition_number")``
can use them: they hold the last probe's values until the next probe (a resumed run restores
them from its checkpoint's history). A skipped probe (see "Failure containment") leaves them as
they are, as Lightning keeps a metric that is not logged again: through a run of skipped probes
(a ``params`` filter whose parameters are frozen) ``EarlyStopping`` compares the last measured
value again at each check and may stop for "no improvement" in it; ``history[-1]["step"]`` is the
step it was measured at. ``EarlyStopping``'s default ``check_finite=True`` stops the fit at the
first κ = inf (a numerically singular K, a normal state: see "Probe batch") or NaN (the
``which="largest"`` of ``spectrum_kwargs`` leaves λ_min and κ NaN): pass ``check_finite=False``,
or monitor ``ntk/lambda_max``. On rank zero it
also writes TensorBoard histograms of the spectrum (``ntk/spectrum`` and ``ntk/log10_spectrum``, the
latter over the strictly positive eigenvalues only) and a matplotlib figure of the sorted
eigenvalues, when the engine returned the whole spectrum (exact path). On the iterative path
it writes the SLQ estimate instead: ``ntk/log10_spectrum`` with the expected number of
eigenvalues per bucket (n times the quadrature weight), and a figure of the estimated density
of log10 λ.

Probe batch
-----------
By default the probe is the first ``probe_size`` samples of the training *dataset* (of its
sampler's index set where it has one, as ``SubsetRandomSampler`` does), collated with the train
loader's ``collate_fn``. No sampler is iterated and neither is the loader, so the
training order and every RNG stay untouched, and every DDP rank (and a single-process run) sees the
same probe. With ``DataLoader(batch_size=None)`` (automatic batching off) each dataset item
is a whole batch: the probe is the first ``probe_size`` samples of the first items, in the same
order. For an ``IterableDataset`` a fresh iterator of the loader is drawn from instead, under
``isolate_rng`` and with any loader/sampler ``generator`` state restored afterwards. A user
``probe`` (a batch in the loader's format) is used as is. The default probe keeps at most
``max_rows`` (64) rows of K: a sequence model with one pNTK row per token keeps
``max(1, max_rows // seq_len)`` sequences, and a single sequence longer than ``max_rows`` tokens
is cut to its first ``max_rows`` tokens (every input tensor whose second dimension is the sequence
length; kept whole if the cut does not give ``max_rows`` rows). In a causal LM the rows of the
first t tokens do not depend on later tokens, so the cut probe's K is exactly the leading
``max_rows`` × ``max_rows`` block of the whole sequence's K. The cap also keeps K full rank:
rows from several sequences of a small LM easily make K numerically singular (κ = inf), and the
cost of the exact path grows linearly with the rows. The batch goes through the precision
plugin's ``convert_input`` (``"bf16-true"``, ``"16-true"``, ``"64-true"``: floating tensors in the
weights' dtype, integer ones as they are, the inputs the model trains on), then the module's
``on_before_batch_transfer`` / ``transfer_batch_to_device`` / ``on_after_batch_transfer`` hooks
(a datamodule's where it overrides them), as in Lightning's loops; then the model input is
extracted: ``x`` of
``(x, y, ...)``, a dict minus its label keys (``labels``, ``label``, ``targets``, ``target``,
``y``, and a PairedModule's ``labels_key``), a tensor as is; ``probe_inputs=callable(batch) ->
inputs`` overrides.

Cost
----
The defaults are chosen for a small, steady overhead: pNTK rows, at most 64 of them, the exact
path in mixed precision (float32 Jacobian rows, K and its ``eigh`` in float64: half the cost of
float64 rows, with the rounding bound logged as ``ntk/residual_min`` and ``ntk/residual_max``;
``dtype=torch.float64`` for float64 rows) with 256 MiB of workspace beyond what the probe
itself needs (``memory_budget``; on CUDA half the free memory, where more) so that K is
assembled from a few large Jacobian blocks, histograms at every probe and the PNG figure (about
0.1 s to render) at the first and the last probe only (``figure_every`` adds more).
``benchmarks/bench_callbacks.py`` measures the overhead.

Cadence
-------
``every_n_steps=None`` (the default) resolves at train start to
``max(1, trainer.estimated_stepping_batches // target_probes)`` with ``target_probes=20``, so a run
gets at least ``target_probes`` probes (plus the one at step 0: 21) however long it is: the
fewest the overhead target allows (at least 20 per run), since every probe costs a few training
steps (the default was 25 until 2026-11-27). A resumed run probes the weights of the same global
steps as the uninterrupted one, never twice at one global step, its points logged at
Lightning's logger step (one higher after a resume from a validation-end checkpoint, for every
series: :meth:`NTKSpectrumMonitor._count_offset`). The cadence counts optimizer steps
(``trainer.global_step``): a fit in which it never advances (manual optimization updating the
parameters by hand, no optimizer) is probed at its start only, and warned about once.

Zero interference
-----------------
A probe runs under ``isolate_rng`` (torch CPU/CUDA, numpy, python RNG restored), with the probed
modules in eval mode (their train/eval flags restored afterwards), through ``torch.func`` on
detached parameters (``.grad`` never written), on the *unwrapped* LightningModule (the DDP wrapper
and its reducer are never called).

Distributed
-----------
Under DDP the default is: rank 0 probes the full batch and broadcasts the result, so every rank
holds the same history and metrics are logged once. ``shard_probe=True`` gives each rank a
contiguous shard of the probe batch and the engine all-reduces Jᵀv over the world group, so the
probe scales with world size and every rank runs the same Krylov iteration. FSDP, DeepSpeed and
model-parallel strategies shard the parameters themselves and are refused at setup with a
MisconfigurationException.

Failure containment
-------------------
An out-of-memory error halves the chunk size once and retries; a second one warns and skips the
probe. Non-finite outputs or eigenvalues warn and skip. A ``params`` filter that selected
parameters at an earlier probe (or in the checkpoint of a resumed run) and selects none now
(frozen; a weight pruned by ``ModelPruning`` keeps its name) warns once and skips the probes until
it selects again; of a PairedModule only that side is skipped, the other one probed and logged.
``strict=True`` raises instead. A probed
parameter set that changes between probes (``BackboneFinetuning`` unfreezing a backbone: only
``requires_grad`` parameters are probed) warns at that step; the names are checkpointed.
Probed parameters that no optimizer of the Trainer holds (a module replaced after
``configure_optimizers``) warn once per fit; they stay in K.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from glu_probe.callbacks._utils import (
    check_bool,
    check_positive_int,
    check_prefix,
    check_unique_prefix,
    configured_optimizers,
    is_fresh_fit,
    is_quiet_run,
    items_are_batches,
    loader_batches,
    log_metrics,
    logger_step,
    logger_step_advances,
    rank_zero_batches,
    sampler_indices,
    slice_batch,
    stable_repr,
    tensorboard_writers,
)
from glu_probe.ntk.functional import (
    ProbePaddingError,
    ProbeSplitError,
    _active_dropout,
    _map_tensors,
    check_param_filter,
    pruned_names,
)
from glu_probe.ntk.operator import is_out_of_memory
from glu_probe.ntk.spectrum import WarmStart

__all__ = ["NTKProbeWarning", "NTKSpectrumMonitor"]

#: Metric names logged per probe target (prefixed with ``ntk/`` or ``ntk/<target>/``).
METRICS = (
    "lambda_max",
    "lambda_min",
    "condition_number",
    "effective_rank",
    "residual_max",
    "residual_min",
)

#: Default workspace (bytes) of a probe inside the monitor, on top of the least that the probe's
#: path holds (:meth:`NTKSpectrumMonitor._default_budget`: the dense path's float64 probe and
#: rows' copies, or the Lanczos path's block columns); on CUDA, half of the device's free memory
#: where that is more (the engine's own default without a budget).
DEFAULT_MEMORY_BUDGET = 2**28

#: Default ``slq_probes`` inside the monitor: the iterative path estimates the effective rank by
#: SLQ with this many probes (4 × 10 single-vector products, in 10 block products: the quadrature
#: of λ log λ converges in a few steps, and what is left is the sampling error).
DEFAULT_SLQ_PROBES = 4

#: Dict keys removed from a dict batch to obtain the model input.
LABEL_KEYS = ("labels", "label", "targets", "target", "y")

_METHODS = ("auto", "dense", "lanczos")
_OUTPUTS = ("pntk", "full")
#: Numbers in a relayed warning's text (masked when deduplicating warnings across probes).
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?\binf\b|\bnan\b")
_NONFINITE = re.compile(r"\bnan\b|\binf\b|non-finite|nonfinite", re.IGNORECASE)
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLAFSDP")


#: ntk_spectrum arguments the monitor sets itself (its own constructor arguments).
_MONITOR_OWNED = (
    "model",
    "inputs",
    "output",
    "method",
    "params",
    "dtype",
    "jacobian_dtype",
    "eval_mode",
    "warm_start",
    "process_group",
    "chunk_size",
)


def _checked_spectrum_kwargs(
    spectrum_kwargs: Mapping[str, Any] | None, method: str = "auto"
) -> dict[str, Any]:
    """``spectrum_kwargs`` as a dict, its names checked now instead of at the first probe."""
    import inspect

    from glu_probe.ntk import ntk_spectrum
    from glu_probe.ntk.spectrum import check_spectrum_arguments

    if spectrum_kwargs is None:
        return {}
    if not isinstance(spectrum_kwargs, Mapping):
        raise MisconfigurationException(
            f"`spectrum_kwargs` must be a mapping of ntk_spectrum arguments, got "
            f"{type(spectrum_kwargs).__name__}."
        )
    known = set(inspect.signature(ntk_spectrum).parameters)
    for key in spectrum_kwargs:
        if key in _MONITOR_OWNED:
            raise MisconfigurationException(
                f"`spectrum_kwargs` sets {key!r}, which is an argument of NTKSpectrumMonitor "
                "itself; pass it to the monitor directly."
            )
        if key not in known:
            raise MisconfigurationException(
                f"`spectrum_kwargs` has {key!r}, which is not an argument of ntk_spectrum "
                f"(known: {', '.join(sorted(known - set(_MONITOR_OWNED)))})."
            )
    checked = inspect.signature(check_spectrum_arguments).parameters
    try:  # the values too: a bad one would otherwise fail (or be skipped) at every probe
        # (the probe's rows are not known yet: a Lanczos budget below two blocks is refused
        # now, not at the first probe; auto and dense accept it, as ntk_spectrum does)
        check_spectrum_arguments(
            method=method,
            rows_unknown=True,
            **{k: v for k, v in spectrum_kwargs.items() if k in checked},
        )
    except ValueError as err:
        raise MisconfigurationException(f"`spectrum_kwargs`: {err}") from None
    return dict(spectrum_kwargs)


class NTKProbeWarning(UserWarning):
    """A probe was skipped (out of memory, non-finite values, a ``params=`` filter that stopped
    matching), or what it probes changed (the parameter set); training continues."""


class _ProbeFailure(Exception):
    """Internal: a contained failure (reason in ``args[0]``)."""


def _is_nonfinite_error(err: BaseException) -> bool:
    # The engine raises ValueError("... NaN/Inf value(s) ...") on non-finite model outputs.
    return isinstance(err, (ValueError, FloatingPointError)) and bool(_NONFINITE.search(str(err)))


def _batch_len(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = _batch_len(v)
            if n is not None:
                return n
        return None
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = _batch_len(v)
            if n is not None:
                return n
    return None


def _concat_batches(batches: Sequence[Any]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches)) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return type(first)({k: _concat_batches([b[k] for b in batches]) for k in first})  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat_batches([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_concat_batches([b[i] for b in batches]) for i in range(len(first)))
    return first


def _trailing_shapes(batch: Any) -> Any:
    """The shapes of a batch's tensors beyond their first (batch) dimension, as a nested tuple:
    batches that :func:`_concat_batches` can join have equal ones."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape[1:])
    if isinstance(batch, Mapping):
        return tuple((k, _trailing_shapes(v)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        if not any(isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in batch):
            return None  # (per-sample items, strings or ids: their length is the batch size)
        return tuple(_trailing_shapes(v) for v in batch)
    return None


def default_probe_inputs(
    batch: Any, labels_key: str | None = None, keep_labels: bool = False
) -> Any:
    """The model input of a training batch: ``x`` of ``(x, y, ...)``, a dict minus label keys
    (:data:`LABEL_KEYS` and ``labels_key``, a PairedModule's own). ``keep_labels``: a dict's
    ``labels`` stay, for an encoder-decoder model, whose decoder inputs come from them (and
    whose decoder rows they mask: ``docs/ntk.md``, "Padded tokens")."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return {
            k: v
            for k, v in batch.items()
            if (k not in LABEL_KEYS and k != labels_key) or (keep_labels and k == "labels")
        }
    if isinstance(batch, (list, tuple)) and len(batch) > 0:
        return batch[0]
    raise MisconfigurationException(
        "NTKSpectrumMonitor cannot find the model input in a batch of type "
        f"{type(batch).__name__}; pass `probe_inputs=callable(batch) -> inputs`."
    )


def _is_encoder_decoder(module: nn.Module) -> bool:
    """A Hugging Face encoder-decoder model (``config.is_encoder_decoder``) in ``module``."""
    return any(
        getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True
        for m in module.modules()
    )


def _unpruned_name(module: nn.Module, name: str) -> str:
    """``name`` of a parameter of ``module`` as it was before ``torch.nn.utils.prune``, which
    keeps a pruned ``weight`` (the same Parameter) as ``weight_orig`` beside a ``weight_mask``
    buffer: pruning renames a probed parameter, it neither adds nor removes one. The engine's
    rule (:func:`~glu_probe.ntk.functional.pruned_names`: torch pruning's own hooks)."""
    if not name.endswith("_orig"):
        return name
    path, _, leaf = name.rpartition(".")
    base = leaf[: -len("_orig")]
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        return name
    if base in pruned_names(owner):
        return f"{path}.{base}" if path else base
    return name


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by glu-probe's own code (its last frame), not by the model."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}glu_probe{os.sep}" in frames[-1].filename


@contextmanager
def _trainable(module: nn.Module, names: Sequence[str] | None) -> Iterator[None]:
    """The parameters of ``module`` named ``names`` (their names before pruning:
    :func:`_unpruned_name`) with ``requires_grad=True`` inside the block, the flags restored
    after (a probe of its copies, never a step, runs there). ``None``: nothing changed."""
    wanted = set(names or ())
    frozen = [
        p
        for n, p in module.named_parameters()
        if not p.requires_grad and p.is_floating_point() and _unpruned_name(module, n) in wanted
    ]
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@contextmanager
def _eval_mode(modules: Sequence[nn.Module], enabled: bool) -> Iterator[None]:
    flags = [(m, m.training) for root in modules for m in root.modules()] if enabled else []
    try:
        if enabled:
            for root in modules:
                root.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class NTKSpectrumMonitor(Callback):
    """Log the extreme eigenvalues and condition number of the empirical NTK during training.

    See the module docstring for the math, the probe batch, the cadence and the guarantees.

    Args:
        every_n_steps: probe every n training steps (and at step 0), on the x-axis of the
            logged losses: optimizer steps, or under manual optimization the batches in which
            an optimizer stepped (a two-optimizer step advances ``global_step`` by two).
            ``None``: automatic, ``max(1, estimated_stepping_batches // target_probes)``
            (under manual optimization with ``max_steps``, where a batch steps k optimizers
            and the run has ``max_steps / k`` batches: re-chosen from k after the first
            step).
        probe: a fixed probe batch in the training loader's format; default: the first
            ``probe_size`` samples of the training dataset.
        probe_size: number of samples of the default probe (ignored when ``probe`` is given).
        max_rows: cap on the rows of K of the default probe: fewer samples are kept when
            ``probe_size`` samples would give more rows (sequence models: one row per token under
            ``"pntk"``), and one sequence longer than ``max_rows`` tokens is cut to its first
            ``max_rows`` tokens. ``None``: no cap. Not applied to a user ``probe``.
        output: ``"pntk"``, ``"full"`` or a callable mapping the model output to rows.
        method: ``"auto"``, ``"dense"`` (exact) or ``"lanczos"`` (iterative, warm-started).
        params: parameter filter forwarded to the engine (names, dotted components, regex or
            predicate; :func:`~glu_probe.ntk.functional.select_parameters`).
        strict: raise instead of warning and skipping on OOM / non-finite values.
        log_histogram: write TensorBoard histograms of the spectrum (exact path: every
            eigenvalue; iterative path: the SLQ estimate of log10 λ).
        log_figure: write a matplotlib spectrum figure to TensorBoard (exact path: sorted
            eigenvalues; iterative path: the SLQ density of log10 λ).
        figure_every: ``None`` (default): draw the figure at the first and the last probe of
            the run; ``k``: also at every k-th probe. Rendering one PNG (~0.1 s) costs more
            than a small probe, so the default keeps it to two per run.
        shard_probe: under DDP, shard the probe across ranks with an all-reduced operator.
        probe_inputs: ``callable(batch) -> inputs`` that extracts the model input.
        module: attribute path of the submodule to probe (e.g. ``"net"``); default: the
            LightningModule itself, or ``model`` and ``baseline`` of a PairedModule.
        target_probes: probes per run targeted by the automatic cadence (>= 20 recommended).
        chunk_size: probe samples per chunk of the engine's matrix-free products (``None``:
            engine default).
        dtype: probe precision (``torch.float32`` or ``torch.float64``) of the derivatives:
            the iterative path's products, and the exact path's Jacobian rows
            (``jacobian_dtype`` of :func:`~glu_probe.ntk.ntk_spectrum`; K and its ``eigh`` are
            float64 either way). float32 is the mixed-precision exact path: 1.6× (ViT) to 2×
            (GPT-2) faster per probe on CPU, every eigenvalue within the logged residual (a
            rounding estimate), measured κ errors 1e-8 … 3e-6. float64 makes the exact path
            exact to ≈ n·ε₆₄·κ. ``None`` (default): float32, or float64 for a float64 model (a
            float32 probe would round its parameters and inputs, which no residual covers).
        eval_mode: run the probed modules in eval mode (dropout off, BatchNorm running stats).
        warm_start: warm-start the iterative path from the previous probe's Ritz vectors.
        spectrum_kwargs: extra keyword arguments for :func:`glu_probe.ntk.ntk_spectrum`
            (e.g. ``tol``, ``max_matvecs``, ``block_size``). ``memory_budget`` defaults to
            the least the probe's path holds (:meth:`_default_budget`) plus
            :data:`DEFAULT_MEMORY_BUDGET` (256 MiB; on CUDA, half the free device memory where
            that is more) here, so that the exact path assembles
            K from a few large Jacobian blocks instead of many small ones (about 10x faster on
            small probes than the engine's minimal-memory default) whatever the model's size;
            a given ``memory_budget`` is a cap (too small for the model: a
            MisconfigurationException at the first probe), and ``slq_probes`` to
            :data:`DEFAULT_SLQ_PROBES` (the effective rank on the iterative path).
        prefix: metric name prefix (``"ntk"``); change it to run several monitors side by side
            (e.g. one restricted to the MLP parameters). Monitors of one Trainer need distinct
            prefixes: the same prefix would merge their series (MisconfigurationException at
            setup; Lightning itself refuses two whose checkpoint ``state_key`` is the same).

    One instance can serve several independent ``fit`` runs: a fit that starts at step 0
    without a checkpoint starts from a clean state (cadence, history, warm start).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        probe: Any = None,
        probe_size: int = 64,
        max_rows: int | None = 64,
        # (Callable first: jsonargparse tries a union's types in order, and str took a
        # dotted path to a function as text; review, session 24)
        output: Callable[..., Any] | str = "pntk",
        method: str = "auto",
        params: Any = None,
        strict: bool = False,
        log_histogram: bool = True,
        log_figure: bool = True,
        figure_every: int | None = None,
        shard_probe: bool = False,
        probe_inputs: Callable[[Any], Any] | None = None,
        module: str | None = None,
        target_probes: int = 20,
        chunk_size: int | None = None,
        dtype: torch.dtype | str | None = None,
        eval_mode: bool = True,
        warm_start: bool = True,
        spectrum_kwargs: Mapping[str, Any] | None = None,
        prefix: str = "ntk",
    ) -> None:
        super().__init__()
        check_positive_int("NTKSpectrumMonitor", "every_n_steps", every_n_steps, allow_none=True)
        check_positive_int("NTKSpectrumMonitor", "probe_size", probe_size)
        check_positive_int("NTKSpectrumMonitor", "max_rows", max_rows, allow_none=True)
        check_positive_int("NTKSpectrumMonitor", "target_probes", target_probes)
        check_positive_int("NTKSpectrumMonitor", "chunk_size", chunk_size, allow_none=True)
        check_positive_int("NTKSpectrumMonitor", "figure_every", figure_every, allow_none=True)
        if not (callable(output) or output in _OUTPUTS):
            raise MisconfigurationException(
                f"`output` must be one of {_OUTPUTS} or a callable, got {output!r}."
            )
        if method not in _METHODS:
            raise MisconfigurationException(f"`method` must be one of {_METHODS}, got {method!r}.")
        if probe_inputs is not None and not callable(probe_inputs):
            raise MisconfigurationException("`probe_inputs` must be a callable(batch) -> inputs.")
        if module is not None and (not isinstance(module, str) or not module):
            raise MisconfigurationException(
                f"`module` must be an attribute path such as 'net', got {module!r}."
            )
        check_prefix("NTKSpectrumMonitor", prefix)
        check_bool(
            "NTKSpectrumMonitor",
            strict=strict,
            log_histogram=log_histogram,
            log_figure=log_figure,
            shard_probe=shard_probe,
            eval_mode=eval_mode,
            warm_start=warm_start,
        )
        if isinstance(dtype, str):
            resolved = getattr(torch, dtype.removeprefix("torch."), None)
            if not isinstance(resolved, torch.dtype):
                raise MisconfigurationException(f"`dtype` {dtype!r} is not a torch dtype.")
            dtype = resolved
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise MisconfigurationException(
                f"`dtype` must be torch.float32 or torch.float64, got {dtype}."
            )
        self.every_n_steps = every_n_steps
        self.probe = probe
        self.probe_size = probe_size
        self.max_rows = max_rows
        self.output = output
        self.method = method
        try:
            check_param_filter(params)
        except ValueError as err:
            raise MisconfigurationException(f"NTKSpectrumMonitor: {err}") from None
        self.params = params
        self._params_path: str | None = None  # a sub-module params= by its path (setup)
        self.strict = bool(strict)
        self.log_histogram = bool(log_histogram)
        self.log_figure = bool(log_figure)
        self.figure_every = figure_every
        self.shard_probe = bool(shard_probe)
        self.probe_inputs = probe_inputs
        self.module = module
        self.target_probes = target_probes
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.eval_mode = bool(eval_mode)
        self.warm_start = bool(warm_start)
        self.spectrum_kwargs = _checked_spectrum_kwargs(spectrum_kwargs, self.method)
        self.spectrum_kwargs.setdefault("slq_probes", DEFAULT_SLQ_PROBES)
        self.prefix = prefix

        # Run state (checkpointed).
        self._resolved_every: int | None = every_n_steps
        self.last_probe_step: int | None = None
        # trainer.global_step and the cadence count (below) of the last probe: a probe is never
        # repeated at one global step (the same weights).
        self._last_probe_global: int | None = None
        self._last_probe_count: int | None = None
        # (global_step, cadence count of the next batch) at the last batch end. The cadence
        # count is Lightning's logger step as an uninterrupted run has it: after a resume from
        # a checkpoint saved at validation end, Lightning restores its logger step one too high
        # (see _count_offset), and the probes counted on it fell on other global steps than
        # the uninterrupted run's, the checkpoint's weights probed twice (review, session 29).
        self._step_anchor: tuple[int, int] | None = None
        self._step_offset = 0  # cadence count minus Lightning's logger step, in this fit
        self.history: list[dict[str, Any]] = []
        self._ritz: dict[str, torch.Tensor] = {}
        self._ritz_values: dict[str, tuple[float, float]] = {}  # (λ_max, λ_min) of those
        # The parameter names each target's last selection gave (pruned ones by their names
        # before pruning): a later probe of another set warns that the series changes there.
        self._probed_names: dict[str, list[str]] = {}
        # Per-fit state.
        self._inputs: Any = None
        self._n_probe: int = 0
        #: Wall seconds of each probe of this process (all targets, logging included).
        self.probe_seconds: list[float] = []
        self._pending_figure: tuple[int, dict[str, Any], dict[str, float]] | None = None
        # Warning sites (category, file, line) already relayed in this fit.
        self._warned_sites: set[tuple[Any, str]] = set()
        self._global_step = 0  # trainer.global_step at the last batch end
        # trainer.global_step at the fit's start, the training batches since then while it has
        # not advanced, and whether that was warned about (see _warn_no_steps)
        self._fit_start_global = 0
        self._unstepped_batches = 0
        self._no_steps_warned = False
        self._start_probe = False  # the start probe is due at the next batch start
        # Shapes of the probe's input tensors (checkpointed: a resumed run with another probe
        # is told, and does not warm-start from vectors of another K).
        self._probe_shapes: list[list[int]] | None = None
        self._saved_probe_shapes: list[list[int]] | None = None
        self._restored_every: int | None = None  # an automatic cadence a checkpoint brought
        self._recheck_cadence = False  # (manual optimization: see on_train_start)
        self._pending_restored: int | None = None  # a restored cadence, compared then
        # Targets whose default budget the engine refused in this fit: they probe under the
        # engine's own default from then on (no refused attempt at every probe).
        self._unbudgeted: set[str] = set()
        # Targets whose params= selection stopped matching (warned once; skipped until it does)
        self._unmatched: set[str] = set()
        # Per fit: each target's probed names when last checked against the optimizers, and
        # the targets already warned about parameters that no optimizer holds.
        self._optim_checked: dict[str, set[str]] = {}
        self._optim_warned: set[str] = set()
        # The warning of the targets that the probe in progress skipped (see _compute)
        self._skip_note = ""

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        params = stable_repr(self.params)
        if isinstance(self.params, nn.Module):
            # a sub-module by its path in the probed module (set up at `setup`): two sub-modules
            # of one class must not share a key (review, session 18)
            params = f"<module {self._params_path or type(self.params).__qualname__}>"
        return self._generate_state_key(
            prefix=self.prefix,
            output=self.output if isinstance(self.output, str) else "callable",
            module=self.module,
            params=params,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "every_n_steps": self._resolved_every,
            "last_probe_step": self.last_probe_step,
            "last_probe_global_step": self._last_probe_global,
            "last_probe_count": self._last_probe_count,
            "step_anchor": None if self._step_anchor is None else list(self._step_anchor),
            "history": [dict(h) for h in self.history],
            "warm_start": {k: v.detach().cpu().clone() for k, v in self._ritz.items()},
            # (the eigenvalues the vectors came from: a resumed run checks its warm starts too)
            "warm_values": dict(self._ritz_values),
            "probe_shapes": self._probe_shapes,
            "probed_params": {k: list(v) for k, v in self._probed_names.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_every = state_dict.get("every_n_steps")
        if self.every_n_steps is None:
            self._resolved_every = saved_every
            self._restored_every = saved_every
        elif saved_every is not None and saved_every != self.every_n_steps:
            # (the cadence changed silently on such a resume; review, session 20)
            rank_zero_warn(
                f"NTKSpectrumMonitor: resumed with every_n_steps={self.every_n_steps}, the "
                f"checkpoint's run probed every {saved_every} steps: the logged series changes "
                "cadence here"
            )
        self.last_probe_step = state_dict.get("last_probe_step")
        # (absent before session 29: the cadence then counts on Lightning's logger step, the
        # last probe's count being its logged step, as it was)
        self._last_probe_global = state_dict.get("last_probe_global_step")
        self._last_probe_count = state_dict.get("last_probe_count", self.last_probe_step)
        anchor = state_dict.get("step_anchor")
        self._step_anchor = None if anchor is None else (int(anchor[0]), int(anchor[1]))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._ritz = dict(state_dict.get("warm_start", {}))
        self._ritz_values = dict(state_dict.get("warm_values", {}))  # (absent before session 20)
        self._saved_probe_shapes = state_dict.get("probe_shapes")  # (absent before 0.x)
        # (absent before session 28: the first probe then compares with nothing)
        saved_names = state_dict.get("probed_params") or {}
        self._probed_names = {k: list(v) for k, v in saved_names.items()}

    def _reset_run(self) -> None:
        """Forget a previous, independent fit's state (this instance is being reused)."""
        self._resolved_every = self.every_n_steps
        self._restored_every = None
        self.last_probe_step = None
        self._last_probe_global = None
        self._last_probe_count = None
        self._step_anchor = None
        self._step_offset = 0
        self.history = []
        self._ritz = {}
        self._ritz_values = {}
        self._probed_names = {}
        self.probe_seconds = []
        self._pending_figure = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # by class name along the MRO: a user subclass of FSDPStrategy shards parameters too
        names = [c.__name__ for c in type(trainer.strategy).__mro__]
        name = names[0]
        if any(tag.lower() in n.lower() for n in names for tag in _UNSUPPORTED_STRATEGIES):
            raise MisconfigurationException(
                f"NTKSpectrumMonitor does not support the {name} strategy: it shards the "
                "parameters, and the probe needs each rank to hold the whole model. Use "
                "strategy='ddp' (optionally with shard_probe=True) or remove the callback."
            )
        if self.shard_probe and self.method == "dense" and trainer.world_size > 1:
            raise MisconfigurationException(
                "NTKSpectrumMonitor(shard_probe=True, method='dense'): the dense path needs every "
                "row of J on one process; a sharded probe runs the all-reduced Lanczos operator. "
                "Use method='auto' or 'lanczos' with shard_probe=True, or shard_probe=False (rank "
                "zero computes the dense spectrum and shares it)."
            )
        check_unique_prefix(trainer, self)
        if isinstance(self.params, nn.Module):
            self._params_path = next(
                (n for n, m in pl_module.named_modules() if m is self.params), None
            )
        if is_fresh_fit(trainer):  # a resumed run's checkpoint is restored after setup
            self._reset_run()
        for tag, target in self._targets(pl_module).items():
            if (
                self.module is None
                and tag == ""
                and type(target).forward is pl.LightningModule.forward
            ):
                raise MisconfigurationException(
                    f"NTKSpectrumMonitor probes `{type(pl_module).__name__}.forward`, which is not "
                    "implemented. Implement `forward`, or pass `module='<submodule attribute>'`."
                )
            if not self.eval_mode and self.method == "lanczos" and _active_dropout(target):
                # (found at the first probe before, as a plain ValueError that ended the fit:
                # review, session 18)
                raise MisconfigurationException(
                    "NTKSpectrumMonitor(eval_mode=False, method='lanczos'): the model has dropout "
                    "in training mode, and the matrix-free products cannot draw random numbers "
                    "(vmap); use eval_mode=True (dropout off in the probe) or method='dense'"
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_quiet_run(trainer):
            return
        # Under manual optimization a batch may step several optimizers (global_step + k),
        # and max_steps counts those steps, while probes sit on the batches that stepped: an
        # automatic cadence from max_steps gave 20/k probes (11 with two optimizers; review,
        # session 24). It is re-chosen after the first stepping batch, which shows k.
        # (the run's length matters to the automatic cadence only)
        est = trainer.estimated_stepping_batches if self.every_n_steps is None else math.inf
        if est <= 0:
            # An iterable dataset under max_epochs alone: Lightning estimates max_steps, -1,
            # which passed as finite and probed every step (review, session 25).
            est = math.inf
        self._recheck_cadence = (
            self.every_n_steps is None
            and not pl_module.automatic_optimization
            and trainer.max_steps != -1
            and est >= trainer.max_steps
        )
        self._pending_restored = None
        if self._resolved_every is None:
            if not math.isfinite(est):
                why = "max_steps=-1 with an infinite loader"
                if trainer.max_steps == -1 and trainer.max_epochs in (-1, None):
                    # Trainer(max_time=...) alone sets max_epochs=-1 (review, session 20)
                    why = "neither max_steps nor max_epochs is set, e.g. Trainer(max_time=...)"
                raise MisconfigurationException(
                    "NTKSpectrumMonitor cannot choose an automatic cadence for a run of unknown "
                    f"length ({why}); pass `every_n_steps`."
                )
            self._resolved_every = max(1, int(est) // self.target_probes)
        elif self._restored_every is not None and self._recheck_cadence:
            # (compared after the first step, once k is known: compared here, it announced a
            # change of cadence that the recheck then undid; re-review, session 24)
            self._pending_restored = self._restored_every
        elif self._restored_every is not None:
            # An automatic cadence from a checkpoint is that of the first run's length: resumed
            # with another max_steps (30 -> 80 steps), the run kept probing every step, 4x the
            # probes the cadence targets, without a word (review, session 23). It is chosen
            # again for this run's length; the logged series changes cadence here.
            fresh = max(1, int(est) // self.target_probes) if math.isfinite(est) else None
            if fresh is not None and fresh != self._restored_every:
                self._warn_cadence_change(self._restored_every, fresh, int(est))
                self._resolved_every = fresh
        self._restored_every = None
        self._warned_sites = set()
        self._unbudgeted = set()
        self._unmatched = set()
        self._optim_checked = {}
        self._optim_warned = set()
        self._fit_start_global = int(trainer.global_step)
        self._unstepped_batches = 0
        self._no_steps_warned = False
        if self.history:
            # A resumed (or continued) fit: Lightning starts it with empty callback_metrics, and
            # the uninterrupted run holds the last probe's values there until the next probe;
            # each key's own last (a PairedModule side whose filter stopped matching is absent
            # from the later entries).
            last: dict[str, Any] = {}
            for entry in self.history:
                last.update((k, v) for k, v in entry.items() if k != "step")
            trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in last.items()})
        self._inputs = self._fix_probe(trainer, pl_module)
        shapes = self._probe_shapes
        saved, self._saved_probe_shapes = self._saved_probe_shapes, None
        if saved is not None and saved != shapes:
            rank_zero_warn(
                f"NTKSpectrumMonitor: the probe batch (input shapes {shapes}) differs from the "
                f"resumed checkpoint's ({saved}): the logged series changes probe here, and the "
                "saved warm start is dropped"
            )
            self._ritz = {}
            self._ritz_values = {}
        self._global_step = trainer.global_step
        # The start probe runs at the first batch's start, not here: on a resumed fit Lightning
        # advances its logger step for the restored checkpoint only when the epoch loop starts
        # (after this hook), so a probe here was written one step early (review, session 20:
        # the checkpoint's κ at step 7 where the uninterrupted run has it at 8). The parameters
        # are the same at both points.
        self._start_probe = True

    def _warn_cadence_change(self, restored: int, fresh: int, steps: int) -> None:
        rank_zero_warn(
            f"NTKSpectrumMonitor: the checkpoint's run probed every {restored} steps, chosen "
            f"for its length; this run has {steps} steps, so the automatic cadence is every "
            f"{fresh} steps from here (the logged series changes cadence at this step; pass "
            "every_n_steps to keep one)"
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start_probe:
            self._start_probe = False
            self._step_offset = self._count_offset(trainer, pl_module)
            if not is_quiet_run(trainer):
                step = logger_step(trainer)
                self._maybe_probe(trainer, pl_module, step, step + self._step_offset)

    def _count_offset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """The cadence count minus Lightning's logger step in this fit, at its first batch.

        Lightning 2.6 restores its logger step (``_batches_that_stepped``) one too high after a
        resume from a checkpoint saved at validation end (``ModelCheckpoint``'s place where
        there is a validation loader; seen in runs bounded by ``max_steps``; its issue #19367
        family): every series of the resumed run, the user's own ``self.log`` ones included,
        sits one step later than in the uninterrupted run. The cadence is counted without that
        shift, so that a resumed run probes the weights of the same global steps as the
        uninterrupted one (the checkpoint's weights were probed twice, and every later probe
        one optimizer step early). The count the next batch has was saved with its ``global_step``
        (``step_anchor``): where the restored ``global_step`` is that one, the difference to
        Lightning's logger step now is the shift (0 where Lightning has it right; it carries
        over later resumes).

        Without that state (a checkpoint written before session 29, a monitor new to the fit,
        a checkpoint taken in a batch before this monitor's hook ran), under automatic
        optimization, where Lightning's logger step equals ``global_step`` at a batch start of
        an uninterrupted run (gradient accumulation, ``max_epochs`` and ``max_steps`` alike), a
        logger step one off ``global_step`` is such a shift, and the offset is their difference:
        one above after a validation-end checkpoint, one below after a batch-end checkpoint
        under Lightning 2.4 (such an older checkpoint's last probe step is then a global step,
        as its run logged it). Anything else is taken as it is (0): manual optimization
        (``global_step`` counts each optimizer's steps; such an older checkpoint still gives
        probes one batch off where Lightning shifts), or an ``optimizer_step`` override that
        skips steps (the two then differ by the skipped ones).
        """
        anchor = self._step_anchor
        logged = logger_step(trainer)
        if anchor is not None and anchor[0] == int(trainer.global_step):
            return anchor[1] - logged
        shift = int(trainer.global_step) - logged
        if pl_module.automatic_optimization and abs(shift) == 1:
            # (an older checkpoint: Lightning's restore shift alone; re-review, session 29)
            return shift
        return 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if is_quiet_run(trainer) or self._inputs is None:
            return
        # Probes sit on the x-axis of the logged losses: Lightning's logger step, counted after
        # the batch's optimizer step (it is incremented after this hook, and only where an
        # optimizer stepped; global_step counts each optimizer of a manual multi-optimizer step).
        stepped = trainer.global_step != self._global_step
        advances = logger_step_advances(trainer)
        next_count = logger_step(trainer) + self._step_offset
        next_count += int(stepped if advances is None else advances)
        self._step_anchor = (int(trainer.global_step), next_count)  # (see _count_offset)
        if trainer.global_step == self._fit_start_global:
            self._unstepped_batches += 1
            # Mid-fit only where no optimizer is configured (the cause the warning names): a
            # large accumulate_grad_batches, or manual optimization stepping every k batches,
            # leaves global_step where it was for many batches and steps later (re-review,
            # session 29: warned at batch 100 of accumulate_grad_batches=200). At the fit's end
            # it warns where global_step never moved, whatever the optimizers.
            if self._unstepped_batches == max(
                100, 10 * (self._resolved_every or 1)
            ) and not configured_optimizers(trainer):
                self._warn_no_steps()
        if not stepped:
            return  # no optimizer stepped (gradient accumulation): the step has not ended
        per_batch = trainer.global_step - self._global_step
        self._global_step = trainer.global_step
        if self._recheck_cadence:
            self._recheck_cadence = False
            # (see on_train_start) the run has max_steps / k batches
            batches = math.ceil(trainer.max_steps / max(1, per_batch))
            fresh = max(1, batches // self.target_probes)
            restored, self._pending_restored = self._pending_restored, None
            if restored is not None and fresh != restored:
                self._warn_cadence_change(restored, fresh, batches)
            if per_batch > 1 or restored is not None:
                self._resolved_every = fresh
        # Logged at Lightning's logger step, shifted or not after a resume (see _count_offset):
        # the user's own series (and Lightning's LearningRateMonitor) are shifted alike, so the
        # probes keep their place among them on one chart; the cadence counts unshifted.
        step = logger_step(trainer) + 1
        self._maybe_probe(trainer, pl_module, step, step + self._step_offset)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._inputs = None  # release the probe batch (device memory)
        if self._unstepped_batches and trainer.global_step == self._fit_start_global:
            self._warn_no_steps()
        if self._pending_figure is not None:  # the last probe's spectrum figure
            step, spectra, kappas = self._pending_figure
            self._pending_figure = None
            writers = list(tensorboard_writers(trainer))
            if writers:
                self._draw(writers, spectra, step, kappas)

    def _warn_no_steps(self) -> None:
        """Warn once per fit (``NTKProbeWarning``) that ``trainer.global_step`` has not advanced
        in its training batches: at the fit's end, or, where no optimizer is configured, after
        ``max(100, 10 · every_n_steps)`` such batches. The cadence counts optimizer steps;
        manual optimization that updates the parameters by hand (no optimizer from
        ``configure_optimizers``) never advances it, and the monitor made its fit-start probe
        only, without a word (re-review, session 29)."""
        if self._no_steps_warned:
            return
        self._no_steps_warned = True
        rank_zero_warn(
            f"NTKSpectrumMonitor: trainer.global_step has not advanced in the "
            f"{self._unstepped_batches} training batch(es) of this fit (no optimizer stepped): "
            f"the probe cadence (every {self._resolved_every or 1} step(s)) counts optimizer "
            "steps, so the monitor probes at most once in this fit, at its start. Under manual "
            "optimization, update the parameters with an optimizer that configure_optimizers "
            "returns (self.optimizers() and its step(); an update by hand, p -= lr * p.grad, "
            "steps none).",
            category=NTKProbeWarning,
        )

    def _metric_prefix(self, tag: str) -> str:
        return f"{self.prefix}/" if tag == "" else f"{self.prefix}/{tag}/"

    # ------------------------------------------------------------------ probe batch
    def _targets(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        if self.module is not None:
            obj: Any = pl_module
            for part in self.module.split("."):
                if not hasattr(obj, part):
                    raise MisconfigurationException(
                        f"NTKSpectrumMonitor(module={self.module!r}): "
                        f"{type(pl_module).__name__} has no attribute path {self.module!r}."
                    )
                obj = getattr(obj, part)
            if not isinstance(obj, nn.Module):
                raise MisconfigurationException(
                    f"NTKSpectrumMonitor(module={self.module!r}) is a {type(obj).__name__}, "
                    "not an nn.Module."
                )
            return {"": obj}
        if _is_paired(pl_module):
            # {model_prefix: model, baseline_prefix: baseline}: names match the paired losses.
            paired: Any = pl_module
            return dict(paired.members())
        return {"": pl_module}

    def _fix_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Build the probe (model inputs on the module's device; this rank's shard if sharded)."""
        include_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        # The module's transfer hooks run here too: they may draw random numbers (GPU-side
        # augmentation in on_after_batch_transfer), which must not shift the run's RNG.
        with isolate_rng(include_cuda=include_cuda):
            batch = self.probe if self.probe is not None else self._probe_from_loader(trainer)
            n = _batch_len(batch)
            if n is None or n < 1:
                raise MisconfigurationException(
                    "NTKSpectrumMonitor: the probe batch is empty or has no tensor with a batch "
                    "dimension."
                )
            # As Lightning's loops call them: the precision plugin's conversion first (under
            # "bf16-true", "16-true" or "64-true" floating inputs are cast to the parameters'
            # dtype, integers left alone: the model trains on those values, and the probe had
            # taken the float32 ones; review, session 29), then a LightningDataModule's transfer
            # hooks, where it overrides them, in place of the module's (the probe had skipped
            # them; review, session 25).
            plugin = getattr(trainer, "precision_plugin", None)
            if plugin is not None:
                batch = plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, 0)
            batch = pl_module._apply_batch_transfer_handler(batch, pl_module.device, 0)
        # A PairedModule's dict batches lose its own labels_key too, as in its training step
        # (labels_key="answer" ended the fit at train start: model(**batch) got the targets;
        # review, session 24).
        labels_key = getattr(pl_module, "labels_key", None) if _is_paired(pl_module) else None
        # An encoder-decoder (T5, BART, Whisper) builds its decoder inputs from `labels`:
        # without them T5 failed at setup, and BART was probed on another function (decoder
        # inputs from the shifted input_ids) with its padded decoder rows kept (review,
        # session 25).
        enc_dec = isinstance(batch, Mapping) and any(
            _is_encoder_decoder(m) for m in self._targets(pl_module).values()
        )
        extract = self.probe_inputs or functools.partial(
            default_probe_inputs, labels_key=labels_key, keep_labels=enc_dec
        )
        inputs = extract(batch)
        n = _batch_len(inputs) or n
        if self.probe is None and self.max_rows is not None:
            requested = n
            try:
                per_sample = self._rows_per_sample(pl_module, inputs, include_cuda)
            except (TypeError, ValueError) as err:
                if isinstance(err, ValueError) and _raised_here(err):
                    raise  # (the engine's own message: NaN outputs, no dependence, ...)
                # A dict batch whose keys are not forward's arguments ({"image", "label"} for
                # forward(x)): the bare TypeError did not say where the call came from (review,
                # session 18).
                how = (
                    f"as model(**batch) with keys {sorted(inputs)} (label keys removed: "
                    f"{sorted({*LABEL_KEYS, *([labels_key] if labels_key else [])})})"
                    if isinstance(inputs, Mapping)
                    else "as model(*batch)"
                    if isinstance(inputs, (tuple, list))
                    else "as model(batch)"
                )
                raise MisconfigurationException(
                    f"NTKSpectrumMonitor: the probed module failed on the probe inputs, called "
                    f"{how} ({type(err).__name__}: {err}); pass probe_inputs=callable(batch) -> "
                    "the model's inputs (e.g. lambda b: b['image']), or probe= a batch"
                    + (
                        ""
                        if self.module is not None
                        else "; if the LightningModule's forward takes the whole batch (e.g. "
                        "forward(self, batch): return self.model(**batch)), probe the network "
                        "it holds: module='<attribute name>', e.g. module='model'"
                    )
                ) from err
            n = max(1, min(n, self.max_rows // max(1, per_sample)))
            inputs = slice_batch(inputs, slice(0, n))
            if per_sample > self.max_rows:
                shorter = self._cut_tokens(
                    pl_module, inputs, per_sample, include_cuda, decoder_only=enc_dec
                )
                if shorter is inputs:  # kept whole: say how large K is (it was unannounced)
                    rank_zero_warn(
                        f"NTKSpectrumMonitor: one probe sample gives {per_sample} rows of K "
                        f"with output={self.output!r}, more than max_rows={self.max_rows}, and "
                        "cannot be cut (only the pNTK rows of a token model are), so K has "
                        f"{per_sample} rows and each probe costs accordingly (output='full' "
                        "of a language model has sequence length x vocabulary rows). Use "
                        "output='pntk' or a callable that picks fewer rows, or pass "
                        "max_rows=None to silence this.",
                        category=NTKProbeWarning,
                    )
                inputs = shorter
            if n < requested and per_sample <= self.max_rows:
                rank_zero_info(
                    f"NTKSpectrumMonitor: probing {n} of {requested} samples to keep K at most "
                    f"max_rows={self.max_rows} rows; pass max_rows=None to probe all of them."
                )
        # the whole probe's shapes (the same on every rank, before sharding)
        shapes: list[list[int]] = []

        def note(t: torch.Tensor) -> torch.Tensor:
            shapes.append(list(t.shape))
            return t

        _map_tensors(inputs, note)
        self._probe_shapes = shapes
        world, rank = trainer.world_size, trainer.global_rank
        if self.shard_probe and world > 1:
            if n < world:
                cut = (
                    f" (after max_rows={self.max_rows} kept {n} of the batch's samples)"
                    if self.probe is None and self.max_rows is not None
                    else ""
                )
                raise MisconfigurationException(
                    f"NTKSpectrumMonitor(shard_probe=True): the probe has {n} samples{cut}, fewer "
                    f"than the {world} ranks; raise probe_size / max_rows or turn shard_probe off."
                )
            # Contiguous shards in rank order (np.array_split sizes): the engine's all-reduced
            # operator concatenates row blocks in rank order.
            base, extra = divmod(n, world)
            start = rank * base + min(rank, extra)
            stop = start + base + (1 if rank < extra else 0)
            inputs = slice_batch(inputs, slice(start, stop))
            n = stop - start
        self._n_probe = n
        return inputs

    def _rows_per_sample(self, pl_module: pl.LightningModule, inputs: Any, cuda: bool) -> int:
        """Rows of K per sample: one forward pass of one sample (the engine's own row count: per
        token for sequence outputs under ``"pntk"``, every output under ``"full"``). A ``params``
        filter that selects nothing now but did at an earlier probe (a resumed or continued fit
        during a freeze) counts over the parameters it selected then; its probes are skipped
        (:meth:`_select`)."""
        from glu_probe.ntk import ProbeFunction
        from glu_probe.ntk.functional import select_parameters

        targets = self._targets(pl_module)
        tag, target = next(iter(targets.items()))
        params: Any = self.params
        earlier: list[str] | None = None
        try:
            select_parameters(target, params)
        except ValueError as err:
            # A filter that selected at an earlier probe (a resumed or continued fit) and selects
            # nothing now (frozen) is ruled on by `_select` at the probes: skipped, with one
            # warning. The row count does not depend on the parameters: counted over those the
            # filter selected then, made trainable for the count (the resumed fit ended here,
            # where the uninterrupted one skipped probes; re-review, session 28). Not over every
            # parameter: that took in ones the filter leaves out, a complex one refused.
            earlier = self._probed_names.get(tag)
            if self.strict or not earlier:
                wrapped = self._member_error(targets, tag, err)  # (a PairedModule's member)
                if wrapped is err:
                    raise
                raise wrapped from err
            params = list(earlier)

        def rows(k: int) -> int:
            with (
                isolate_rng(include_cuda=cuda),
                torch.inference_mode(False),
                torch.enable_grad(),
                _trainable(target, earlier),
            ):
                probe = ProbeFunction(
                    target,
                    slice_batch(inputs, slice(0, k)),
                    output=self.output,
                    params=params,
                    eval_mode=self.eval_mode,
                )
            return probe.rows_per_sample

        try:
            return rows(1)
        except Exception:
            # eval_mode=False: BatchNorm in training mode rejects a batch of one sample
            if self.eval_mode or (_batch_len(inputs) or 0) < 2:
                raise
            return rows(2)

    def _cut_tokens(
        self,
        pl_module: pl.LightningModule,
        inputs: Any,
        seq_len: int,
        cuda: bool,
        decoder_only: bool = False,
    ) -> Any:
        """The first ``max_rows`` tokens of a sequence with more pNTK rows than ``max_rows``.

        Every input tensor whose second dimension is ``seq_len`` (ids, attention mask, position
        or token-type ids) is cut; of an encoder-decoder's dict (``decoder_only``) only the
        decoder's (``decoder_*`` and ``labels``: its rows), the source sequence staying whole
        (it was cut too where its length was the decoder's; review, session 25). The inputs are
        returned unchanged when that does not give exactly ``max_rows`` rows per sample (not a
        token model, or one that needs its length).
        """
        keep = self.max_rows
        assert keep is not None
        if self.output != "pntk":
            return inputs

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[:, :keep] if t.ndim >= 2 and t.shape[1] == seq_len else t

        if decoder_only and isinstance(inputs, Mapping):
            shorter = {
                k: _map_tensors(v, cut) if k.startswith("decoder_") or k == "labels" else v
                for k, v in inputs.items()
            }
        else:
            shorter = _map_tensors(inputs, cut)
        try:
            rows = self._rows_per_sample(pl_module, shorter, cuda)
        except Exception:  # the model rejects the shorter input: keep the whole sequence
            return inputs
        if rows != keep:
            return inputs
        rank_zero_info(
            f"NTKSpectrumMonitor: probing the first {keep} of {seq_len} tokens to keep K at most "
            f"max_rows={keep} rows (in a causal model: the leading block of the whole sequence's "
            "K); pass max_rows=None to probe all of them."
        )
        return shorter

    def _probe_from_loader(self, trainer: pl.Trainer) -> Any:
        loaders = trainer.train_dataloader
        loader = _first_loader(loaders)
        if loader is None:
            raise MisconfigurationException(
                "NTKSpectrumMonitor found no train DataLoader to draw its probe from; "
                "pass `probe=`."
            )
        dataset = getattr(loader, "dataset", None)
        collate = getattr(loader, "collate_fn", None)
        if (
            dataset is not None
            and not isinstance(dataset, IterableDataset)
            and hasattr(dataset, "__len__")
            and hasattr(dataset, "__getitem__")
            and collate is not None
        ):
            # (the first of a subset sampler's indices: the samples this loader trains on)
            pool = sampler_indices(loader)
            indices = pool if pool is not None else range(len(dataset))
            if items_are_batches(loader):  # batch_size=None: each item is a whole batch
                return self._first_samples(collate(dataset[i]) for i in indices)
            k = min(self.probe_size, len(indices))
            return collate([dataset[i] for i in indices[:k]])
        # Iterable dataset: take the first batches of a fresh iterator (RNG states restored).
        with loader_batches(loader) as it:
            batch = self._first_samples(it)
        # (rank 0's batch on every rank: a sharded probe takes its slice of one batch)
        return rank_zero_batches(trainer, batch)

    def _first_samples(self, batches: Iterator[Any]) -> Any:
        """The first ``probe_size`` samples of a stream of batches, as one batch. Batches of
        another shape than the first beyond the batch dimension (sequences padded batch by
        batch) cannot join it: the probe then holds the samples before the first such batch,
        with a warning (the concatenation failed at train start before; review, session 23)."""
        taken: list[Any] = []
        got = 0
        first: Any = None
        for b in batches:
            shapes = _trailing_shapes(b)
            if taken and shapes != first:
                rank_zero_warn(
                    f"NTKSpectrumMonitor: the training batches differ in shape beyond the batch "
                    f"dimension (e.g. sequences padded batch by batch: {first} then {shapes}); "
                    f"the probe holds the first batch's {got} samples of probe_size="
                    f"{self.probe_size}. Pass probe= (one batch) for a larger probe."
                )
                break
            first = shapes
            taken.append(b)
            got += _batch_len(b) or 0
            if got >= self.probe_size:
                break
        if not taken:
            raise MisconfigurationException("NTKSpectrumMonitor: the train dataloader is empty.")
        batch = _concat_batches(taken) if len(taken) > 1 else taken[0]
        return slice_batch(batch, slice(0, self.probe_size))

    # ------------------------------------------------------------------ probing
    def _maybe_probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, count: int
    ) -> None:
        """Probe, logged at ``step``, where the cadence count ``count`` (the logger step of an
        uninterrupted run: :meth:`_count_offset`) hits a multiple of the cadence, and never
        twice at one ``global_step`` (the same weights)."""
        global_step = int(trainer.global_step)
        if self._last_probe_global == global_step:
            return
        every = self._resolved_every or 1
        last = self._last_probe_count
        if last is not None and count // every <= last // every:
            return  # (a multiple of n crossed, not hit: the step may advance by more than one)
        self.last_probe_step = step
        self._last_probe_count = count
        self._last_probe_global = global_step
        t0 = time.perf_counter()
        try:
            self._probe_and_log(trainer, pl_module, step)
        finally:
            self.probe_seconds.append(time.perf_counter() - t0)

    def _probe_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        results = self._probe_all(trainer, pl_module, step)
        if not results:
            return
        entry: dict[str, Any] = {"step": step}
        metrics: dict[str, float] = {}
        for tag, res in results.items():
            prefix = self._metric_prefix(tag)
            for name in METRICS:
                if name == "effective_rank" and math.isnan(res[name]):
                    continue  # iterative path with slq_probes=0: unknown, not logged as NaN
                metrics[prefix + name] = float(res[name])
            # κ spans decades during training (1e7 at init to 1e3 later); its log10 keeps the
            # dashboard chart readable, since custom-scalars charts have no log axis setting.
            kappa = float(res["condition_number"])
            metrics[prefix + "log10_condition_number"] = (
                math.log10(kappa) if kappa > 0 else math.nan
            )
        entry.update(metrics)
        self.history.append(entry)
        log_metrics(trainer, metrics, step=step)
        # Also in trainer.callback_metrics, on every rank (each holds rank 0's broadcast result):
        # EarlyStopping / ModelCheckpoint(monitor="ntk/condition_number") read them there, and
        # said the metric was not available (review, session 28; gap/* since session 25).
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
        if self.log_histogram or self.log_figure:
            self._log_spectra(trainer, results, step)

    def _probe_all(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> dict[str, dict[str, Any]]:
        """Probe every target; under DDP without sharding rank 0 computes and broadcasts."""
        distributed = trainer.world_size > 1
        compute_here = self.shard_probe or not distributed or trainer.global_rank == 0
        payload: Any = None
        original: Exception | None = None
        if compute_here:
            try:
                payload = {"ok": self._compute(trainer, pl_module, step)}
                if self._skip_note:  # some targets skipped, the others probed
                    payload["skip"] = self._skip_note
            except _ProbeFailure as err:
                # (with the warning of targets skipped before the failing one, if any)
                payload = {"skip": " ".join(m for m in (self._skip_note, str(err)) if m)}
            except Exception as err:
                if not distributed or self.shard_probe:
                    raise
                # Tell the other ranks before raising, so that none waits in a collective.
                original = err
                payload = {"error": f"{type(err).__name__}: {err}"}
            # (every rank holds the selected names: its checkpoint state)
            payload["names"] = {k: list(v) for k, v in self._probed_names.items()}
        if distributed and not self.shard_probe:
            payload = trainer.strategy.broadcast(payload, src=0)
            self._probed_names = {k: list(v) for k, v in payload["names"].items()}
        if original is not None:
            raise original
        if "error" in payload:
            raise RuntimeError(f"NTKSpectrumMonitor probe failed on rank 0: {payload['error']}")
        if payload.get("skip"):  # ("": a skip already warned about)
            rank_zero_warn(payload["skip"], category=NTKProbeWarning)
        if "ok" not in payload:
            return {}
        results: dict[str, dict[str, Any]] = payload["ok"]
        for tag, res in results.items():
            ritz = res.pop("ritz_vectors", None)
            if self.warm_start and isinstance(ritz, torch.Tensor):
                self._ritz[tag] = ritz
                self._ritz_values[tag] = (float(res["lambda_max"]), float(res["lambda_min"]))
        return results

    @contextmanager
    def _relayed_warnings(self, name: str, step: int) -> Iterator[None]:
        """The warnings raised during a probe, relayed on rank zero, once per warning site per fit.

        A probe repeats every few steps, and warnings whose text carries numbers (the rank
        warning's λ_min, say) would otherwise be printed again at every probe, and by every rank
        that probes.
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                pending = list(caught)
        for w in pending:
            # Keyed on the category and the text with its numbers masked: warnings are
            # attributed to the user's frame (one site for every warning of a probe), and the
            # same warning repeats with other numbers (λ_min, step counts) at later probes.
            site = (w.category, _NUMBER.sub("#", str(w.message)))
            if site in self._warned_sites:
                continue
            self._warned_sites.add(site)
            rank_zero_warn(
                f"NTKSpectrumMonitor ({name}, step {step}): {w.message} "
                "(shown once per fit; later probes may repeat it silently)",
                category=w.category,
            )

    def _default_budget(self, target: nn.Module, group: Any = None) -> int:
        """``memory_budget`` of a probe of ``target`` unless ``spectrum_kwargs`` sets one: the
        least the probe needs plus :data:`DEFAULT_MEMORY_BUDGET` of workspace (on CUDA, half
        the device's free memory where that is more). A fixed 256 MiB, the default until
        2026-11-28, refused every model above about 13M float32 parameters (a GPT-2-small pair
        stopped at train start on an H100), since the probe's own copies exceed it. Under a
        sharded probe (``group``) every rank takes the smallest rank's budget."""
        from glu_probe.ntk.dense import _available_bytes
        from glu_probe.ntk.functional import least_memory_budget, planned_copy_bytes

        # What each path holds at least beside its workspace (activations excepted): the dense
        # path a float64 probe (its copies, four float64 parameter-sized vectors) and, for
        # narrower rows, the copies in that dtype; the Lanczos path the probe's copies and
        # block_size columns of four parameter-sized vectors. `auto` may take either. (The
        # first version counted the float32 probe alone: refused above ~11M parameters, then
        # probed under half the free memory, 11.6 GB for a 16M GPT-2; scale review.)
        inputs, params = self._inputs, self.params
        dense = least_memory_budget(target, inputs, params, torch.float64)
        dtype = self._dtype_for(target)
        copies, n_params, item = planned_copy_bytes(target, inputs, params, dtype)
        if dtype != torch.float64:
            dense += copies
        block = int(self.spectrum_kwargs.get("block_size", 4))
        lanczos = copies + 4 * block * n_params * item
        least = {"dense": dense, "lanczos": lanczos}.get(self.method, max(dense, lanczos))
        device = next(target.parameters()).device
        spare = _available_bytes(device) // 2 if device.type == "cuda" else 0
        budget = least + max(DEFAULT_MEMORY_BUDGET, spare)
        if group is not None:  # free memory differs between ranks; their plans must not
            agreed = torch.tensor([budget], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=group)
            budget = int(agreed.item())
        return budget

    def _dtype_for(self, target: nn.Module) -> torch.dtype:
        """The probe precision for ``target``: ``dtype``, or by default float32 (float64 for a
        float64 model: :func:`~glu_probe.ntk.functional.default_probe_dtype`)."""
        from glu_probe.ntk.functional import default_probe_dtype

        return self.dtype if self.dtype is not None else default_probe_dtype(target, self.params)

    def _compute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> dict[str, dict[str, Any]]:
        from glu_probe.ntk import ntk_spectrum  # lazy: keeps callback import light

        group = None
        if self.shard_probe and trainer.world_size > 1:
            group = torch.distributed.group.WORLD
        targets = self._targets(pl_module)
        out: dict[str, dict[str, Any]] = {}
        include_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        # The warnings of the targets whose filter selects nothing now ("": warned before)
        self._skip_note = ""
        for tag, target in targets.items():
            name = tag or type(pl_module).__name__
            # (first: the budget and dtype below select the parameters too, outside the
            # containment; a filter that pruning emptied ended the fit there; review, session 28)
            try:
                selected = self._select(target, tag, name, step, targets)
            except _ProbeFailure as err:
                # That target only: a PairedModule's other side is still selected (its set
                # change warned about), probed and logged (one side's filter stopping ended
                # both series; re-review, session 28).
                self._skip_note = " ".join(m for m in (self._skip_note, str(err)) if m)
                continue
            self._check_optimized(trainer, tag, name, selected)
            warm: Any = self._ritz.get(tag) if self.warm_start else None
            if warm is not None:
                warm = warm.to(pl_module.device)
                seen = self._ritz_values.get(tag)
                if seen is not None:  # (checked against them: see WarmStart)
                    warm = WarmStart(warm, *seen)
            kwargs: dict[str, Any] = dict(self.spectrum_kwargs)
            dtype = self._dtype_for(target)
            if "memory_budget" not in kwargs:
                fallback = tag in self._unbudgeted
                kwargs["memory_budget"] = None if fallback else self._default_budget(target, group)
            kwargs.update(
                output=self.output,
                method=self.method,
                params=self.params,
                dtype=dtype,
                jacobian_dtype=dtype,
                eval_mode=self.eval_mode,
                warm_start=warm,
                process_group=group,
            )
            if group is not None:
                self._check_shards(target, group, name, step, include_cuda)
            chunk = self.chunk_size
            halved = False
            while True:
                t0 = time.perf_counter()
                try:
                    with (
                        isolate_rng(include_cuda=include_cuda),
                        _eval_mode([target], self.eval_mode),
                        torch.inference_mode(False),
                        torch.enable_grad(),
                        self._relayed_warnings(name, step),
                    ):
                        spec = ntk_spectrum(target, self._inputs, chunk_size=chunk, **kwargs)
                except Exception as err:
                    # A sharded probe's budget refusal comes on every rank with the same text
                    # (the engine agrees on it before any product), so every rank raises here,
                    # or falls back below, together: one rank's lone refusal had left the
                    # others in the operator's collectives (review, session 26).
                    if isinstance(err, ValueError) and str(err).startswith("memory_budget"):
                        if "memory_budget" in self.spectrum_kwargs:
                            raise MisconfigurationException(
                                f"NTKSpectrumMonitor: probing {name}: `spectrum_kwargs` {err}"
                            ) from err
                        if kwargs["memory_budget"] is not None:
                            # the default workspace is too small for this model's activations:
                            # the engine's own default (half the free memory) instead
                            rank_zero_warn(
                                f"NTKSpectrumMonitor: probing {name}: the default memory_budget "
                                f"({kwargs['memory_budget']} bytes) is too small ({err}); this "
                                "fit probes it under the engine's default (half the free "
                                "memory) instead. Pass spectrum_kwargs={'memory_budget': ...} "
                                "to bound it.",
                                category=NTKProbeWarning,
                            )
                            kwargs["memory_budget"] = None
                            self._unbudgeted.add(tag)
                            continue
                    if is_out_of_memory(err):
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        if not halved:
                            halved = True
                            chunk = max(1, (chunk or self._n_probe) // 2)
                            continue
                        if self.strict:
                            raise
                        raise _ProbeFailure(
                            f"NTKSpectrumMonitor: out of memory probing {name} at step {step} "
                            f"(also with chunk_size={chunk}); probe skipped, training continues. "
                            "Lower `probe_size` or `chunk_size`."
                        ) from err
                    if halved and isinstance(err, ProbeSplitError):
                        # (the halved chunk after an OOM, on a probe that must stay whole)
                        if self.strict:
                            raise
                        raise _ProbeFailure(
                            f"NTKSpectrumMonitor: out of memory probing {name} at step {step}, "
                            f"and its batch cannot be split into chunks ({err}); probe skipped, "
                            "training continues. Lower `probe_size`."
                        ) from err
                    if _is_nonfinite_error(err):
                        if self.strict:
                            raise
                        raise _ProbeFailure(
                            f"NTKSpectrumMonitor: non-finite values probing {name} at step {step} "
                            f"({err}); probe skipped, training continues."
                        ) from err
                    if isinstance(err, ProbePaddingError):
                        # (its own probe cut can be all padding: a skipped probe, not a fit
                        # ended at step 0; re-review, session 23)
                        if self.strict:
                            raise
                        raise _ProbeFailure(
                            f"NTKSpectrumMonitor: probing {name} at step {step}: {err} (here: "
                            "spectrum_kwargs={'drop_padding': False}); probe skipped, training "
                            "continues."
                        ) from err
                    raise
                break
            values = spec.as_dict() if hasattr(spec, "as_dict") else {}
            res: dict[str, Any] = {}
            for key in METRICS:
                res[key] = float(values.get(key, getattr(spec, key)))
            # which="largest" / "smallest" (spectrum_kwargs) leave the other end NaN by design
            which = self.spectrum_kwargs.get("which", "both")
            ends = {"largest": ("lambda_max",), "smallest": ("lambda_min",)}.get(
                which, ("lambda_max", "lambda_min")
            )
            if not all(math.isfinite(res[k]) for k in ends):
                msg = (
                    f"NTKSpectrumMonitor: non-finite eigenvalues probing {name} at step {step} "
                    f"(lambda_max={res['lambda_max']}, lambda_min={res['lambda_min']})"
                )
                if self.strict:
                    raise FloatingPointError(msg)
                raise _ProbeFailure(msg + "; probe skipped, training continues.")
            eig = getattr(spec, "eigenvalues", None)
            res["eigenvalues"] = (
                eig.detach().double().cpu() if isinstance(eig, torch.Tensor) else None
            )
            nodes = getattr(spec, "density_nodes", None)
            weights = getattr(spec, "density_weights", None)
            res["density"] = (
                (nodes.detach().double().cpu(), weights.detach().double().cpu(), int(spec.n_rows))
                if isinstance(nodes, torch.Tensor) and isinstance(weights, torch.Tensor)
                else None
            )
            ritz = getattr(spec, "ritz_vectors", None)
            res["ritz_vectors"] = ritz.detach().cpu() if isinstance(ritz, torch.Tensor) else None
            res["wall_time"] = time.perf_counter() - t0
            out[tag] = res
        if not out:
            note, self._skip_note = self._skip_note, ""
            raise _ProbeFailure(note)
        return out  # (the skipped targets' warning, in _skip_note: by _probe_all, on rank zero)

    def _filter_text(self) -> str:
        """``params`` in a message (a sub-module by its path, not its multi-line repr)."""
        if isinstance(self.params, nn.Module):
            return f"<module {self._params_path or type(self.params).__qualname__}>"
        return stable_repr(self.params)

    def _select(
        self,
        target: nn.Module,
        tag: str,
        name: str,
        step: int,
        targets: Mapping[str, nn.Module] | None = None,
    ) -> dict[str, nn.Parameter]:
        """Select ``target``'s probed parameters (``params``) inside the probe's failure
        containment, and compare them with the previous probe's selection; returns them.

        A filter that selected parameters at an earlier probe and now selects none (or fails:
        they were frozen, or renamed; a weight pruned by ``ModelPruning`` keeps its name) skips
        this target's probe with one ``NTKProbeWarning`` (raises with ``strict=True``): raises
        :class:`_ProbeFailure`, and :meth:`_compute` still probes the other targets (a
        PairedModule's other side). Later probes skip it silently until it selects again. One
        that never selected is a configuration error and raises. Another set than the previous
        probe's (a backbone unfrozen by ``BackboneFinetuning``: only ``requires_grad`` parameters
        are probed) warns once per change, with the step and the numbers of tensors added and
        removed. ``targets``: every probed module (a PairedModule's members), for the message of
        a filter that selects nothing in one of them (:meth:`_member_error`).
        """
        from glu_probe.ntk.functional import select_parameters

        before = self._probed_names.get(tag)
        try:
            selected = select_parameters(target, self.params)
        except Exception as err:
            if before is None or self.strict:
                wrapped = self._member_error(targets, tag, err)
                if wrapped is err:
                    raise
                raise wrapped from err
            if tag in self._unmatched:
                raise _ProbeFailure("") from err
            self._unmatched.add(tag)
            raise _ProbeFailure(
                f"NTKSpectrumMonitor: the params={self._filter_text()} filter selected "
                f"{len(before)} parameter tensor(s) of {name} at an earlier probe and fails at "
                f"step {step} ({err}): parameters were renamed or frozen since. The probe of "
                f"{name} is skipped at this step, and at the next ones without a warning, until "
                f"the filter selects again (its {self._metric_prefix(tag)}* values in "
                "trainer.callback_metrics stay those of its last probe); training continues."
            ) from err
        self._unmatched.discard(tag)
        names = [_unpruned_name(target, n) for n in selected]
        self._probed_names[tag] = names
        if before is None or set(names) == set(before):
            return selected
        added = [n for n in names if n not in set(before)]
        removed = [n for n in before if n not in set(names)]
        rank_zero_warn(
            f"NTKSpectrumMonitor: the parameters probed in {name} changed at step {step}: "
            f"{len(added)} tensor(s) added {added[:3]}, {len(removed)} removed {removed[:3]}, "
            f"{len(names)} now (only parameters with requires_grad=True are probed: a callback "
            "such as BackboneFinetuning that freezes or unfreezes them changes K): the logged "
            "series changes parameter set here",
            category=NTKProbeWarning,
        )
        return selected

    def _member_error(
        self, targets: Mapping[str, nn.Module] | None, tag: str, err: BaseException
    ) -> BaseException:
        """The error of a ``params`` filter that fails in one member of a PairedModule, naming
        that member (the engine's own says "the model", whichever member it was; review,
        session 29) and the way to a filter that covers both naming schemes: a filter that
        selects nothing there, a list with names the member lacks (the others may be found),
        or a sub-module that is not the member's. ``err`` itself elsewhere: a plain module, or
        another error (a complex parameter, a malformed filter), whose text holds for either
        member (re-review, session 29: those were reported as selecting nothing)."""
        from glu_probe.ntk.functional import ParamSelectionError, select_parameters

        if not isinstance(err, ParamSelectionError) or targets is None or len(targets) < 2:
            return err
        roles = dict(zip(targets, ("model", "baseline"), strict=False))
        role = roles.get(tag, tag)
        text = str(err)
        # (select_parameters' texts say "the model" for the module it was given)
        if err.reason == "nothing":
            what = "selects nothing in the PairedModule's"
            why = text.replace("the model has no", f"the {role} has no", 1)
        elif err.reason == "names":
            what = "names parameters that are not in the PairedModule's"
            why = text.replace(
                "among the trainable parameters", f"among the {role}'s trainable parameters", 1
            )
        elif err.reason == "foreign" and isinstance(self.params, nn.Module):
            what = "is not a sub-module of the PairedModule's"
            why = (
                f"params= is a {type(self.params).__name__} that holds none of the {role}'s "
                "parameters (a sub-module belongs to one member)"
            )
        else:
            return err
        target = targets[tag]
        label = type(target).__name__ + ("" if tag == role else f", prefix {tag!r}")
        others = []
        for other, module in targets.items():
            if other == tag:
                continue
            try:
                n = len(select_parameters(module, self.params))
            except Exception:
                continue
            others.append(f"{n} parameter tensor(s) of its {roles.get(other, other)}")
        matched = f"; the filter selects {', '.join(others)}" if others else ""
        return ValueError(
            f"NTKSpectrumMonitor: params={self._filter_text()} {what} {role} ({label}{matched}): "
            f"{why}. The filter is applied to each member, and the two may name their layers "
            "differently (a swapped MLP's 'mlp' against BERT's 'intermediate.dense' and "
            "'output.dense', say): pass a callable (name, p) -> bool filter, or a regular "
            "expression that covers both naming schemes (params='re:...')."
        )

    def _check_optimized(
        self, trainer: pl.Trainer, tag: str, name: str, selected: Mapping[str, nn.Parameter]
    ) -> None:
        """Warn once per fit and target (``NTKProbeWarning``) where probed parameters are held
        by none of ``trainer.optimizers``' parameter groups (compared by identity), checked at
        the target's first probe of the fit and where its probed set changes. Such parameters
        never train: a module replaced after ``configure_optimizers`` (``swap_mlp`` in
        ``on_fit_start``) leaves the optimizer stepping the old, detached ones, and the κ
        series measured blocks that stayed at their initialization without a word (review,
        session 29). The probe is not changed: K still includes them. Nothing is checked
        without optimizers: a ``configure_optimizers`` that returns ``None`` (manual
        optimization updating the parameters by hand) leaves ``trainer.optimizers`` Lightning's
        placeholder, which holds no parameters and is not counted (it warned that every
        parameter was untrained; re-review, session 29)."""
        names = set(selected)
        if self._optim_checked.get(tag) == names:
            return
        self._optim_checked[tag] = names
        optimizers = configured_optimizers(trainer)
        if tag in self._optim_warned or not optimizers:
            return
        # (every optimizer: a PairedModule has one per member)
        held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        missing = [n for n, p in selected.items() if id(p) not in held]
        if not missing:
            return
        self._optim_warned.add(tag)
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        rank_zero_warn(
            f"NTKSpectrumMonitor: {len(missing)} of the {len(selected)} parameter tensor(s) "
            f"probed in {name} are held by none of the trainer's optimizers ({missing[:3]}"
            f"{more}): they are not trained by any optimizer. A module replaced after "
            "configure_optimizers (e.g. swap_mlp in on_fit_start or on_train_start) leaves the "
            "optimizer stepping the old, detached parameters: swap in __init__ or "
            "configure_model. The probe still includes them in K (the κ series then measures "
            "parameters that do not train).",
            category=NTKProbeWarning,
        )

    def _check_shards(
        self, target: nn.Module, group: Any, name: str, step: int, include_cuda: bool
    ) -> None:
        """Sharded probe: agree on every rank's shard being usable *before* any collective.

        A rank whose shard has non-finite outputs (or runs out of memory, or fails otherwise)
        would leave the others waiting in the operator's all-gather. One forward pass of the
        local shard (the engine's own check) and a MAX all-reduce of the verdict (0 ok,
        1 non-finite, 2 out of memory, 3 other); all ranks then skip (or raise) together.
        """
        from glu_probe.ntk import ProbeFunction

        reason = ""
        own: Exception | None = None
        code = 0
        try:
            with isolate_rng(include_cuda=include_cuda), torch.inference_mode(False):
                ProbeFunction(  # in the dtype the engine will use, so its own check agrees
                    target,
                    self._inputs,
                    output=self.output,
                    params=self.params,
                    dtype=self._dtype_for(target),
                    eval_mode=self.eval_mode,
                )
        except Exception as err:
            own, reason = err, str(err)
            code = 1 if _is_nonfinite_error(err) else 2 if is_out_of_memory(err) else 3
        device = next(target.parameters()).device
        flag = torch.tensor([code], device=device, dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        worst = int(flag.item())
        if worst == 0:
            return
        where = "this rank" if code else "another rank"
        if worst == 3:
            if own is not None and code == 3:
                raise own
            raise RuntimeError(
                f"NTKSpectrumMonitor: probing {name} at step {step} failed on another rank's "
                "probe shard (see its error)"
            )
        what = "non-finite values" if worst == 1 else "out of memory"
        msg = (
            f"NTKSpectrumMonitor: {what} probing {name} at step {step} on {where}'s probe shard"
            + (f" ({reason})" if reason else "")
        )
        if self.strict:
            raise (FloatingPointError(msg) if worst == 1 else RuntimeError(msg)) from own
        raise _ProbeFailure(msg + "; probe skipped on every rank, training continues.")

    # ------------------------------------------------------------------ TensorBoard extras
    def _log_spectra(
        self, trainer: pl.Trainer, results: Mapping[str, Mapping[str, Any]], step: int
    ) -> None:
        writers = list(tensorboard_writers(trainer))
        if not writers:
            return
        spectra: dict[str, Any] = {}
        for tag, res in results.items():
            eig = res.get("eigenvalues")
            if isinstance(eig, torch.Tensor) and eig.numel() > 0:
                spectra[tag] = eig  # exact: every eigenvalue
            elif res.get("density") is not None:
                spectra[tag] = res["density"]  # iterative path: SLQ (nodes, weights, n)
        if not spectra:
            return
        if self.log_histogram:
            for writer in writers:
                for tag, spec in spectra.items():
                    prefix = self._metric_prefix(tag)
                    if isinstance(spec, torch.Tensor):
                        writer.add_histogram(prefix + "spectrum", spec.numpy(), global_step=step)
                        pos = spec[spec > 0]
                        if pos.numel() > 0:
                            writer.add_histogram(
                                prefix + "log10_spectrum", pos.log10().numpy(), global_step=step
                            )
                    else:
                        _slq_histogram(writer, prefix + "log10_spectrum", *spec, step=step)
        if not self.log_figure:
            return
        # history already holds this probe: it is probe number len - 1 of the run.
        index = len(self.history) - 1
        every = self.figure_every
        # (the legend shows the logged κ: inf for a numerically singular K, where λ_max/λ_min
        # of a tiny negative λ_min read -2.7e16; review, session 24)
        kappas = {tag: float(res["condition_number"]) for tag, res in results.items()}
        if index == 0 or (every is not None and index % every == 0):
            self._draw(writers, spectra, step, kappas)
            self._pending_figure = None
        else:  # drawn at train end if it stays the last probe
            self._pending_figure = (step, dict(spectra), kappas)

    def _draw(
        self,
        writers: list[Any],
        spectra: Mapping[str, Any],
        step: int,
        kappas: Mapping[str, float] | None = None,
    ) -> None:
        if all(isinstance(v, torch.Tensor) for v in spectra.values()):
            fig = _spectrum_figure(spectra, step, kappas)
        else:
            fig = _density_figure(spectra, step)
        for writer in writers:
            writer.add_figure(f"{self.prefix}/spectrum_figure", fig, global_step=step, close=False)


def _slq_histogram(
    writer: Any, tag: str, nodes: torch.Tensor, weights: torch.Tensor, n: int, *, step: int
) -> None:
    """A TensorBoard histogram of log10 λ from SLQ quadrature (expected eigenvalue counts).

    Bucket counts are n·(quadrature weight in the bucket), the expected number of eigenvalues of
    the n x n kernel there; non-positive nodes (rounding) have no logarithm and are left out.
    """
    from glu_probe.ntk.density import spectral_density

    keep = nodes > 0
    if not bool(keep.any()):
        return
    x, w = nodes[keep].log10(), weights[keep]
    edges, dens = spectral_density(nodes[keep], weights=w, bins=30, log=True)
    counts = dens * edges.diff() * float(w.sum()) * n
    writer.add_histogram_raw(
        tag,
        min=float(x.min()),
        max=float(x.max()),
        num=float(counts.sum()),
        sum=float((w * x).sum() * n),
        sum_squares=float((w * x * x).sum() * n),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


def _density_figure(spectra: Mapping[str, Any], step: int) -> Any:
    """Spectral densities of log10 λ: exact eigenvalues, or SLQ estimates (iterative path)."""
    from matplotlib.figure import Figure

    from glu_probe.ntk.density import spectral_density

    fig = Figure(figsize=(5, 3.2), dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    for tag, spec in spectra.items():
        if isinstance(spec, torch.Tensor):
            vals, w, how = spec[spec > 0], None, "exact"
        else:
            nodes, weights, _ = spec
            vals, w, how = nodes[nodes > 0], weights[nodes > 0], "SLQ estimate"
        if vals.numel() == 0:
            continue
        edges, dens = spectral_density(vals, weights=w, bins=30, log=True)
        ax.stairs(dens.numpy(), edges.numpy(), label=f"{tag or 'model'} ({how})")
    return _finish(fig, ax, "log10 λ", "density", f"NTK spectral density, step {step}")


def _decade_label(value: float, _pos: Any = None) -> str:
    """``1e-3``-style label of a decade tick (plain text: mathtext's ``10^{-3}`` costs ~70 ms
    of parsing the first time a process draws one)."""
    return f"1e{round(math.log10(value))}" if value > 0 else ""


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str) -> Any:
    if ax.get_yscale() == "log":
        # Decade ticks only, labelled in plain text. A log axis's minor ticks are ~8 Line2D
        # artists per decade, and building them dominated the figure's cost (matplotlib 3.11,
        # 2-core box: 210-280 ms per figure with them and mathtext labels, 60-90 ms without).
        from matplotlib.ticker import FuncFormatter, NullLocator

        ax.yaxis.set_major_formatter(FuncFormatter(_decade_label))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    # Fixed margins for this figure size instead of tight_layout(), which costs an extra draw:
    # 40 ms per figure (180 ms for the first), against 60-70 ms for building and rendering the
    # figure without it; a two-layer demo step takes 7 ms.
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.15, top=0.9)
    return fig


def _spectrum_figure(
    spectra: Mapping[str, torch.Tensor], step: int, kappas: Mapping[str, float] | None = None
) -> Any:
    """Sorted eigenvalues on a log axis (non-positive ones are listed in the legend, not drawn);
    the legend gives each side's κ from ``kappas`` (the logged values), else λ_max/λ_min (inf
    where λ_min ≤ 0)."""
    # A bare Figure (no pyplot): no global figure registry, no backend switch in the user's process.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2), dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    for tag, eig in spectra.items():
        vals = torch.sort(eig, descending=True).values
        pos = vals[vals > 0]
        n_nonpos = int(vals.numel() - pos.numel())
        if kappas is not None and tag in kappas:
            kappa = kappas[tag]
        else:
            kappa = float(vals[0] / vals[-1]) if vals[-1] > 0 else float("inf")
        label = f"{tag or 'model'}: κ={kappa:.3g}"
        if n_nonpos:
            label += f" ({n_nonpos} ≤ 0 not drawn)"
        ax.semilogy(range(1, pos.numel() + 1), pos.numpy(), marker=".", lw=1, label=label)
    return _finish(fig, ax, "index i", "eigenvalue λ_i of K = J Jᵀ", f"NTK spectrum, step {step}")


def _is_paired(pl_module: pl.LightningModule) -> bool:
    try:
        from glu_probe.callbacks.paired import PairedModule
    except ImportError:  # the paired module is optional for this callback
        return False
    return isinstance(pl_module, PairedModule)


def _first_loader(loaders: Any) -> DataLoader | None:
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        for v in loaders.values():
            found = _first_loader(v)
            if found is not None:
                return found
    if isinstance(loaders, (list, tuple)):
        for v in loaders:
            found = _first_loader(v)
            if found is not None:
                return found
    return None
