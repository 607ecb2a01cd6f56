"""``PairedModule``: train a model and its baseline side by side on identical batches.

One LightningModule holds two networks, ``model`` (e.g. a GLU variant) and ``baseline`` (e.g. its
non-gated counterpart), each with its own optimizer (and optional LR scheduler). Every training
batch is fed to both; the two losses are logged under distinct prefixes so that
:class:`~glu_probe.callbacks.LossCrossingMonitor` (``baseline="paired"``), the gap and NTK monitors
and the TensorBoard dashboard can put them side by side.

What holds (and is tested)
--------------------------
* **Identical batches.** Both networks see exactly the same batch (same values, same order);
  the baseline gets its own copy of the tensors, so a model that changes its input in place (a
  first ``nn.ReLU(inplace=True)``) does not change the baseline's.
* **The model trains as if alone.** With manual optimization the step is::

      loss_m = loss_fn(model(x), y)                       # global torch RNG (dropout, ...)
      loss_b = loss_fn(baseline(x), y)                    # private baseline RNG stream
      manual_backward(loss_m + loss_b)                    # one backward, one DDP reduction
      opt_model.step(); opt_baseline.step()

  The networks share no parameters, so ∂(loss_m + loss_b)/∂θ_model = ∂loss_m/∂θ_model exactly
  (the sum node passes its unit seed gradient through unchanged), and the baseline's forward runs
  under ``torch.random.fork_rng`` with its own generator state. The global RNG stream is therefore
  consumed by the model exactly as in a run without the baseline: on CPU the model's parameters are
  **bit-identical** to training it alone with the same seed, optimizer and batches.
* **The baseline has an independent RNG stream,** seeded with ``baseline_seed`` (default:
  ``torch.initial_seed() + 1`` at fit start, so ``seed_everything`` makes it reproducible) and
  saved in checkpoints. Its trajectory does not depend on what it is paired with. It equals a solo
  run of the baseline bit for bit when the baseline draws no random numbers (no dropout); with
  dropout, it equals a solo run whose dropout masks come from a generator seeded with
  ``baseline_seed`` (statistically equivalent, not the same masks as a solo run seeded otherwise).
* **One global step per batch.** ``trainer.global_step`` counts paired updates: the model's
  optimizer steps through its ``LightningOptimizer`` (which advances the step counter) and the
  baseline's through ``trainer.strategy.optimizer_step`` (same precision plugin and hooks, no
  counter), so ``max_steps`` and every step-based cadence mean the same as for one model.
* **Gradient clipping** (``gradient_clip_val``; Lightning's ``Trainer(gradient_clip_val=...)`` is
  refused under manual optimization) happens in ``on_before_optimizer_step``, i.e. after AMP
  unscaling and per optimizer, so each network is clipped exactly as if trained alone.
* **LR schedulers** are stepped by the module (manual optimization does not step them):
  every batch (``lr_scheduler_interval="step"``) or every epoch (``"epoch"``);
  ``ReduceLROnPlateau`` is stepped at epoch end with ``<prefix>/<lr_scheduler_monitor>``.
* fp16 mixed precision with a GradScaler is refused: one scaler shared by two optimizers would
  rescale between the two steps. Use ``precision="bf16-mixed"`` or full precision.
  ``Trainer(accumulate_grad_batches>1)`` is refused by Lightning under manual optimization.

Known limit: under DDP, Lightning's manual optimization turns off DDP's per-forward broadcast
of buffers (``broadcast_buffers``), so train-mode BatchNorm's running statistics are each rank's
own (the parameters stay identical on every rank, as in a solo DDP run): evaluation in eval mode
then differs slightly between ranks and from a solo DDP run, which copies rank 0's statistics at
each forward. ``Trainer(sync_batchnorm=True)`` (statistics over all ranks, the same everywhere)
avoids it.

Batches and losses
------------------
A batch is ``(x, y)`` (``x`` is passed to the network as its one argument) or a dict with an
HF-style ``labels`` entry (``labels_key``); the dict minus the labels is passed as keyword
arguments. Outputs may be a tensor, a tuple/list (first element), or an object/dict with
``.logits``. With ``causal_lm=True`` the logits ``(B, T, V)`` and labels ``(B, T)`` are shifted
(position t predicts label t+1) and flattened, as in HF's causal-LM loss. Higher-rank logits with
one-dimension-lower targets are flattened to ``(N, V)`` / ``(N,)``. The default loss is
cross-entropy with ``ignore_index=-100``; ``loss_fn(preds, target)`` replaces it.

Logged metrics (names ``<model_prefix>/...`` and ``<baseline_prefix>/...``)
---------------------------------------------------------------------------
``train_loss`` (on_step), ``val_loss`` and ``test_loss`` (on_epoch), all with ``sync_dist``
(mean over ranks; a no-op on one process).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from glu_probe.callbacks._utils import check_bool, check_name

__all__ = ["EVAL_OUTPUTS_KEY", "PairedModule"]

#: Key of the dict that ``PairedModule.validation_step``/``test_step`` return: ``{prefix: (loss,
#: preds, target)}`` of both members, exactly what :meth:`PairedModule.evaluate` gave, so that
#: :class:`~glu_probe.callbacks.GeneralizationGapMonitor` reads the validation side from
#: ``outputs`` instead of running every validation batch through both networks a second time.
EVAL_OUTPUTS_KEY = "glu_probe_evaluations"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: A scheduler per optimizer, Lightning's ``LRSchedulerCallable``: jsonargparse (LightningCLI)
#: builds it from ``class_path: torch.optim.lr_scheduler.StepLR`` and ``init_args``.
LRSchedulerFactory = Callable[
    [torch.optim.Optimizer],
    torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau,
]
OptimizerSpec = str | type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer]

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


# ------------------------------------------------------------------------ batch protocol helpers
# Shared with GeneralizationGapMonitor so that both measure losses the same way.


def _split_batch(batch: Any, labels_key: str = "labels") -> tuple[Any, Any]:
    """``(inputs, target)`` of an ``(x, y)`` tuple or of a dict with a labels entry."""
    if isinstance(batch, Mapping):
        if labels_key not in batch:
            raise ValueError(
                f"dict batch has no {labels_key!r} entry (keys: {sorted(batch)}); "
                "set labels_key to the name of the targets"
            )
        return {k: v for k, v in batch.items() if k != labels_key}, batch[labels_key]
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(
                f"tuple/list batches must be (inputs, target); got {len(batch)} elements"
            )
        return batch[0], batch[1]
    raise ValueError(
        f"unsupported batch type {type(batch).__name__}: use (inputs, target) or a dict with labels"
    )


def _call(module: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return module(**inputs)
    return module(inputs)


def _logits(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output (tensor, ``.logits``, dict, or tuple's first)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find the predictions in a model output of type {type(output).__name__}: "
        "return a tensor, a tuple (predictions first), or an object with .logits"
    )


def _prepare(
    logits: torch.Tensor, target: torch.Tensor, causal_lm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift (causal LM) and flatten sequence predictions to ``(N, V)`` and ``(N,)``."""
    if causal_lm:
        if logits.dim() != 3 or target.dim() != 2:
            raise ValueError(
                "causal_lm=True expects logits (B, T, V) and labels (B, T); got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}"
            )
        logits = logits[:, :-1, :]
        target = target[:, 1:]
    if logits.dim() > 2 and target.dim() == logits.dim() - 1:
        logits = logits.reshape(-1, logits.shape[-1])
        target = target.reshape(-1)
    return logits, target


def _default_loss(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored targets (``ignore_index=-100``, as HF).

    For classification: integer class targets, or class probabilities of the logits' shape
    (classes on dimension 1, as in ``torch.nn.functional.cross_entropy``). Float targets of
    another shape, or a one-class output (cross-entropy over one class is 0
    whatever the model does: a regression pair trained nothing, silently; review, session
    18), raise a ``ValueError`` that names ``loss_fn=``."""
    classes = preds.shape[1] if preds.dim() >= 2 else preds.shape[0]  # (torch's class dim)
    if classes == 1 or (target.is_floating_point() and target.shape != preds.shape):
        raise ValueError(
            f"PairedModule's default loss is cross-entropy, for classification (integer class "
            f"targets, or class probabilities shaped like the logits, classes on dimension 1); "
            f"got {'float' if target.is_floating_point() else 'integer'} targets "
            f"{tuple(target.shape)} for outputs {tuple(preds.shape)} ({classes} class(es)). "
            "Pass loss_fn=, e.g. torch.nn.functional.mse_loss for regression"
        )
    return F.cross_entropy(preds.float(), target, ignore_index=-100)


def _warn_unshifted(batch: Any, labels_key: str, logits: Any, module: nn.Module) -> None:
    """A dict batch whose labels are its ``input_ids`` (the Hugging Face causal-LM convention,
    where the model's own loss shifts them) with sequence logits and ``causal_lm=False``: the
    loss then asks each position to predict its own token. Said once (review, session 18)."""
    if not isinstance(batch, Mapping) or not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        return
    config = getattr(module, "config", None)
    if "decoder_input_ids" in batch or getattr(config, "is_encoder_decoder", False):
        return  # (an encoder-decoder's labels are the decoder's targets: already aligned)
    labels, ids = batch.get(labels_key), batch.get("input_ids")
    if (
        isinstance(labels, torch.Tensor)
        and isinstance(ids, torch.Tensor)
        and labels.shape == ids.shape
        and bool(torch.equal(labels, ids))
    ):
        rank_zero_warn(
            f"PairedModule: the batch's {labels_key!r} equal its 'input_ids' and the logits are "
            "per token, but causal_lm=False: each position is trained to predict its own token. "
            "For next-token prediction (Hugging Face's convention for labels=input_ids) pass "
            "causal_lm=True"
        )


def _copy_tensors(batch: Any) -> Any:
    """``batch`` with every tensor cloned, its containers rebuilt with their own type: tuples,
    named tuples, lists, dataclasses (a shallow copy, fields replaced: no ``__init__`` run
    again) and mappings (``dict``, ``OrderedDict``, ``defaultdict``, HF ``BatchEncoding``:
    ``type(m)(dict)``). A container that cannot be rebuilt that way (a
    read-only mapping whose constructor takes no dict) is kept as it is, shared, as before
    session 24: the copy protects against a model that changes its input in place, and must
    never make a batch the run accepts fail (a review found ``copy.copy`` plus item assignment
    crashing read-only mappings and writing into a custom mapping's shared storage)."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    try:
        if isinstance(batch, Mapping):
            items = {k: _copy_tensors(v) for k, v in batch.items()}
            rebuilt: Any = (
                type(batch)(batch.default_factory, items)
                if isinstance(batch, collections.defaultdict)
                else type(batch)(items)  # type: ignore[call-arg]
            )
            if rebuilt is not batch and all(rebuilt[k] is v for k, v in items.items()):
                return rebuilt
            return batch
        if isinstance(batch, tuple):
            values = [_copy_tensors(b) for b in batch]
            return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)
        if isinstance(batch, list):
            return type(batch)(_copy_tensors(b) for b in batch)
        if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
            # A shallow copy with every field replaced, init=False ones too: not
            # dataclasses.replace, which runs __init__ / __post_init__ again (a normalisation
            # there was applied twice to the baseline's copy; re-review, session 24).
            # Attributes that are no fields (a tensor made in __post_init__, a cached_property)
            # are copied too: the shallow copy shared them (re-review, session 24).
            shallow: Any = copy.copy(batch)
            names = {f.name for f in dataclasses.fields(batch)}
            names.update(getattr(batch, "__dict__", {}))
            for name in names:
                if hasattr(batch, name):
                    object.__setattr__(shallow, name, _copy_tensors(getattr(batch, name)))
            return shallow
    except Exception:  # a container we cannot rebuild: shared, as before
        return batch
    return batch


def _n_items(target: Any) -> int:
    """Number of loss terms of a prepared target (non-ignored tokens for class targets)."""
    if not isinstance(target, torch.Tensor) or target.dim() == 0:
        return 1
    if not target.is_floating_point():
        return int((target != -100).sum().item())
    return int(target.shape[0])


def _import_dotted(path: str) -> Any:
    """The object a dotted path names (``"torch.optim.Adam"``), or a
    MisconfigurationException."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise MisconfigurationException(
            f"PairedModule: optimizer {path!r} names nothing importable ({err})"
        ) from None


def _make_optimizer(
    spec: OptimizerSpec, params: Sequence[nn.Parameter], lr: float, kwargs: Mapping[str, Any]
) -> torch.optim.Optimizer:
    if isinstance(spec, str):
        spec = _OPTIMIZERS[spec.lower()]
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        cls: Any = spec  # concrete optimizers all take lr (the base class does not)
        return cast(torch.optim.Optimizer, cls(params, lr=lr, **kwargs))
    factory: Any = spec
    opt = factory(params)  # a factory: params -> Optimizer (lr and optimizer_kwargs not used)
    if not isinstance(opt, torch.optim.Optimizer):
        raise MisconfigurationException(
            f"PairedModule: the optimizer factory returned {type(opt).__name__}, "
            "not a torch.optim.Optimizer"
        )
    return opt


class PairedModule(pl.LightningModule):
    """Train ``model`` and ``baseline`` side by side on identical batches (see module docstring).

    Args:
        model: the network under study (logged under ``model_prefix``).
        baseline: the reference network (logged under ``baseline_prefix``).
        loss_fn: ``loss_fn(preds, target) -> scalar`` (a function or a module such as
            ``nn.CrossEntropyLoss()``); default: cross-entropy with ``ignore_index=-100``.
        optimizer: a name (``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"adagrad"``), an
            optimizer class or its dotted path (``"torch.optim.Adam"``; all built with ``lr``
            and ``optimizer_kwargs``), or a factory ``params -> Optimizer`` (called once per
            network; ``lr`` is then not used).
        lr: learning rate for a named optimizer or class.
        optimizer_kwargs: extra keyword arguments for a named optimizer or class.
        lr_scheduler: optional factory ``optimizer -> LRScheduler`` (one per network;
            Lightning's ``LRSchedulerCallable``, so a LightningCLI YAML gives it as
            ``class_path: torch.optim.lr_scheduler.StepLR`` with ``init_args``).
        lr_scheduler_interval: ``"step"`` or ``"epoch"``.
        lr_scheduler_monitor: metric (without prefix) for ``ReduceLROnPlateau``.
        gradient_clip_val: clip each network's gradients to this value (``None``: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        causal_lm: shift logits/labels for next-token prediction.
        labels_key: the targets' key in dict batches.
        model_prefix: metric name prefix of the model.
        baseline_prefix: metric name prefix of the baseline.
        baseline_seed: seed of the baseline's private RNG stream.
        sync_dist: average logged losses over DDP ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        baseline: nn.Module,
        *,
        loss_fn: nn.Module | LossFn | None = None,
        optimizer: OptimizerSpec = "adamw",
        lr: float = 1e-3,
        optimizer_kwargs: dict[str, Any] | None = None,
        lr_scheduler: LRSchedulerFactory | None = None,
        lr_scheduler_interval: str = "step",
        lr_scheduler_monitor: str = "val_loss",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        causal_lm: bool = False,
        labels_key: str = "labels",
        model_prefix: str = "model",
        baseline_prefix: str = "baseline",
        baseline_seed: int | None = None,
        sync_dist: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module) or not isinstance(baseline, nn.Module):
            raise MisconfigurationException(
                "PairedModule(model, baseline): both must be torch.nn.Module instances"
            )
        if model is baseline:
            raise MisconfigurationException(
                "PairedModule: model and baseline are the same object; pass two networks "
                "(e.g. copy.deepcopy(model))"
            )
        shared = {id(p) for p in model.parameters()} & {id(p) for p in baseline.parameters()}
        if shared:
            raise MisconfigurationException(
                f"PairedModule: model and baseline share {len(shared)} parameter tensor(s); "
                "they must be independent networks"
            )
        if isinstance(optimizer, str) and "." in optimizer:
            optimizer = _import_dotted(optimizer)  # "torch.optim.Adam" (a LightningCLI YAML)
        if isinstance(optimizer, str) and optimizer.lower() not in _OPTIMIZERS:
            raise MisconfigurationException(
                f"PairedModule: unknown optimizer {optimizer!r}; use one of "
                f"{sorted(_OPTIMIZERS)}, an optimizer class, or a factory params -> Optimizer"
            )
        if not isinstance(optimizer, str) and not callable(optimizer):
            raise MisconfigurationException(
                f"PairedModule: optimizer must be a name, a class or a callable, got {optimizer!r}"
            )
        if baseline_seed is not None:
            try:  # (any integer type, numpy's too; not a bool)
                if isinstance(baseline_seed, bool):
                    raise TypeError
                baseline_seed = operator.index(baseline_seed)
            except TypeError:
                raise MisconfigurationException(
                    f"PairedModule: baseline_seed must be an int or None, got {baseline_seed!r}"
                ) from None
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
            raise MisconfigurationException(
                f"PairedModule: lr must be a finite number > 0, got {lr!r}"
            )
        if optimizer_kwargs is not None and "lr" in optimizer_kwargs:
            raise MisconfigurationException(
                "PairedModule: give the learning rate as lr=, not in optimizer_kwargs"
            )
        opt_class = _OPTIMIZERS.get(optimizer.lower()) if isinstance(optimizer, str) else optimizer
        if optimizer_kwargs and isinstance(opt_class, type):
            # (a misspelt keyword failed only at fit start; review, session 20)
            try:
                inspect.signature(opt_class).bind([], lr=lr, **optimizer_kwargs)
            except (TypeError, ValueError) as err:
                raise MisconfigurationException(
                    f"PairedModule: optimizer_kwargs {sorted(optimizer_kwargs)} do not fit "
                    f"{opt_class.__name__}: {err}"
                ) from err
        if lr_scheduler_interval not in ("step", "epoch"):
            raise MisconfigurationException(
                "PairedModule: lr_scheduler_interval must be 'step' or 'epoch', "
                f"got {lr_scheduler_interval!r}"
            )
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise MisconfigurationException(
                "PairedModule: lr_scheduler must be a factory optimizer -> scheduler"
            )
        if gradient_clip_val is not None and (
            isinstance(gradient_clip_val, bool)
            or not isinstance(gradient_clip_val, (int, float))
            or not 0 < gradient_clip_val < math.inf
        ):
            raise MisconfigurationException(
                f"PairedModule: gradient_clip_val must be > 0 or None, got {gradient_clip_val!r}"
            )
        if gradient_clip_algorithm not in ("norm", "value"):
            raise MisconfigurationException(
                "PairedModule: gradient_clip_algorithm must be 'norm' or 'value', "
                f"got {gradient_clip_algorithm!r}"
            )
        for name, prefix in (("model_prefix", model_prefix), ("baseline_prefix", baseline_prefix)):
            if not prefix or "/" in prefix:
                raise MisconfigurationException(
                    f"PairedModule: {name} must be a non-empty name without '/', got {prefix!r}"
                )
        if model_prefix == "baseline" or baseline_prefix == "model":
            # Members are named by their prefix or by "model" / "baseline" (evaluate(batch,
            # which)): crossed names mixed the networks up (the model scored twice, or trained
            # with twice its gradient and the baseline never; review, session 25).
            raise MisconfigurationException(
                "PairedModule: model_prefix may not be 'baseline', nor baseline_prefix 'model' "
                f"(got {model_prefix!r}, {baseline_prefix!r}): each member is also known by "
                "its own name"
            )
        if model_prefix == baseline_prefix:
            raise MisconfigurationException(
                "PairedModule: model_prefix and baseline_prefix must differ"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise MisconfigurationException("PairedModule: loss_fn must be callable")
        check_bool("PairedModule", causal_lm=causal_lm, sync_dist=sync_dist)
        check_name("PairedModule", "labels_key", labels_key)  # ('' was taken)

        self.automatic_optimization = False
        self.model = model
        self.baseline = baseline
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else _default_loss
        self.optimizer_spec = optimizer
        self.lr = float(lr)
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.causal_lm = bool(causal_lm)
        self._checked_causal = False  # (the labels == input_ids check, once)
        self._stream_from_fit = False  # the baseline stream was started (or restored) by a fit
        self.labels_key = labels_key
        self.model_prefix = model_prefix
        self.baseline_prefix = baseline_prefix
        self.baseline_seed = baseline_seed
        self.sync_dist = bool(sync_dist)
        self._rng_cpu: torch.Tensor | None = None
        self._sched_step = -1  # optimizer step at which the epoch schedulers last stepped
        self._last_batch_step = -1  # the same, for those stepped on an epoch's last batch
        self._rng_cuda: torch.Tensor | None = None

    # ------------------------------------------------------------------ members
    def members(self) -> dict[str, nn.Module]:
        """``{model_prefix: model, baseline_prefix: baseline}``."""
        return {self.model_prefix: self.model, self.baseline_prefix: self.baseline}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The *model*'s forward (the baseline is reached through ``self.baseline``)."""
        return self.model(*args, **kwargs)

    def evaluate(self, batch: Any, which: str = "model") -> tuple[torch.Tensor, Any, Any]:
        """``(loss, preds, target)`` of one member on ``batch`` (``which``: member or prefix).

        ``preds``/``target`` are shifted and flattened as for the loss. The baseline runs on its
        private RNG stream. Used by training, validation and the generalization-gap monitor.
        """
        module = self._member(which)
        inputs, target = _split_batch(batch, self.labels_key)
        if module is self.baseline:
            # only training forwards advance the private stream (eval-mode draws, if any, come
            # from a throwaway copy), so evaluations never change the baseline's training
            with self._baseline_rng(persist=module.training):
                out = _call(module, inputs)
        else:
            out = _call(module, inputs)
        logits = _logits(out)
        if not self.causal_lm and not self._checked_causal:
            self._checked_causal = True
            _warn_unshifted(batch, self.labels_key, logits, module)
        preds, target = _prepare(logits, target, self.causal_lm)
        return self.loss_fn(preds, target), preds, target

    def compute_loss(self, batch: Any, which: str = "model") -> torch.Tensor:
        """The loss of one member on ``batch``."""
        return self.evaluate(batch, which)[0]

    def _member(self, which: str) -> nn.Module:
        if which in ("model", self.model_prefix):
            return self.model
        if which in ("baseline", self.baseline_prefix):
            return self.baseline
        raise ValueError(
            f"unknown member {which!r}; use 'model', 'baseline', {self.model_prefix!r} or "
            f"{self.baseline_prefix!r}"
        )

    # ------------------------------------------------------------------ baseline RNG stream
    def _stream_seed(self) -> int:
        if self.baseline_seed is not None:
            return int(self.baseline_seed)
        return (torch.initial_seed() + 1) % (2**63)

    def _init_baseline_rng(self) -> None:
        """Start the baseline's streams that do not exist yet. A checkpoint of a CPU run resumed
        on a GPU keeps its restored CPU stream and gets a fresh CUDA one (both were reset
        until 2026-11-28)."""
        seed = self._stream_seed()
        if self._rng_cpu is None:
            self._rng_cpu = torch.Generator().manual_seed(seed).get_state()
        if self.device.type == "cuda" and self._rng_cuda is None:
            self._rng_cuda = torch.Generator(device=self.device).manual_seed(seed).get_state()

    @contextmanager
    def _baseline_rng(self, persist: bool = True) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if self._rng_cpu is None or (cuda and self._rng_cuda is None):
            self._init_baseline_rng()
        rng_cpu, rng_cuda = self._rng_cpu, self._rng_cuda
        assert rng_cpu is not None
        devices = [self.device] if cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(rng_cpu)
            if cuda:
                assert rng_cuda is not None
                torch.cuda.set_rng_state(rng_cuda, self.device)
            yield
            if persist:
                self._rng_cpu = torch.get_rng_state()
                if cuda:
                    self._rng_cuda = torch.cuda.get_rng_state(self.device)

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self) -> Any:
        optimizers = [
            _make_optimizer(
                self.optimizer_spec, list(m.parameters()), self.lr, self.optimizer_kwargs
            )
            for m in (self.model, self.baseline)
        ]
        if self.lr_scheduler_factory is None:
            return optimizers
        schedulers = [self.lr_scheduler_factory(opt) for opt in optimizers]
        return optimizers, schedulers

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            raise MisconfigurationException(
                "PairedModule does not support fp16 mixed precision with a GradScaler (one scaler "
                "would be updated between the two optimizers' steps); use precision='bf16-mixed' "
                "or full precision"
            )

    def on_fit_start(self) -> None:
        trainer = self._trainer
        fresh = trainer is not None and trainer.global_step == 0 and trainer.ckpt_path is None
        if fresh and not self._stream_from_fit:
            # The stream starts with the first fit (the documented rule, so that
            # seed_everything before fit reproduces the baseline); an evaluation before it
            # (trainer.validate) had started it from the seed active then, and the fit kept
            # that stream (review, session 18). A later fit, and a resumed one, continue theirs.
            self._rng_cpu = self._rng_cuda = None
        if self._rng_cpu is None:
            self._init_baseline_rng()
        self._stream_from_fit = True
        if trainer is not None and trainer.ckpt_path is None:
            # A fit that restores nothing has fresh schedulers (configure_optimizers ran again):
            # the step of the last epoch-scheduler step, kept from an earlier fit (or from
            # load_from_checkpoint), skipped this fit's first epoch step (review, session 24).
            self._sched_step = -1
            self._last_batch_step = -1

    def on_train_start(self) -> None:
        configs = getattr(self.trainer, "lr_scheduler_configs", None) or []
        if self.lr_scheduler_factory is None and configs:
            rank_zero_warn(
                f"PairedModule: configure_optimizers returned {len(configs)} LR scheduler(s), "
                "which PairedModule does not step (manual optimization; it steps those of its "
                "lr_scheduler= argument). Pass lr_scheduler=<factory> (with "
                "lr_scheduler_interval / lr_scheduler_monitor), or step them in your own hooks"
            )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt_model, opt_baseline = cast(list[Any], self.optimizers())
        # The baseline gets its own copy: a model that changes its input in place (a first
        # nn.ReLU(inplace=True)) handed it modified inputs (review, session 24).
        theirs = _copy_tensors(batch)
        loss_m, _, _ = self.evaluate(batch, "model")
        loss_b, _, _ = self.evaluate(theirs, "baseline")
        opt_model.zero_grad()
        opt_baseline.zero_grad()
        # One backward of the sum: the networks share no parameters, so each gets exactly the
        # gradient of its own loss, and DDP's reducer sees one backward per forward.
        self.manual_backward(loss_m + loss_b)
        opt_model.step()  # advances trainer.global_step (once per batch)
        # The baseline's step goes through the same precision plugin and hooks, but not through
        # the LightningOptimizer, so it does not advance the global step a second time.
        self.trainer.strategy.optimizer_step(opt_baseline.optimizer, closure=_no_closure)
        if self.lr_scheduler_factory is not None and (
            self.lr_scheduler_interval == "step" or self._last_batch_of_epoch()
        ):
            # Epoch-interval schedulers step on the epoch's last batch, before
            # on_train_batch_end, where Lightning steps its own: stepped at the epoch end, a
            # checkpoint saved on that batch (every_n_train_steps) held them one step behind,
            # and a run resumed from it never made that step (review, session 25).
            self._step_schedulers(plateau=False)
            self._last_batch_step = self.global_step
        bs = self._batch_size(batch)
        self.log(
            f"{self.model_prefix}/train_loss", loss_m.detach(), on_step=True, on_epoch=False,
            batch_size=bs, sync_dist=self.sync_dist,
        )  # fmt: skip
        self.log(
            f"{self.baseline_prefix}/train_loss", loss_b.detach(), on_step=True, on_epoch=False,
            batch_size=bs, sync_dist=self.sync_dist,
        )  # fmt: skip
        return loss_m.detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called by the precision plugin after AMP unscaling and before each optimizer's step:
        # the one correct place to clip under manual optimization.
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def _last_batch_of_epoch(self, unknown: bool = False) -> bool:
        """Whether the epoch's batches are all ready (Lightning's own test for its epoch
        schedulers); ``unknown`` where the loop does not say."""
        loop = getattr(self.trainer, "fit_loop", None)
        ready = getattr(getattr(loop, "epoch_loop", None), "_num_ready_batches_reached", None)
        return bool(ready()) if callable(ready) else unknown

    def on_train_epoch_end(self) -> None:
        if self.lr_scheduler_factory is None:
            return
        # ReduceLROnPlateau steps here, after the validation it monitors (the other
        # epoch-interval schedulers stepped on the epoch's last batch, as Lightning's do).
        # Once per epoch of training: after restoring a checkpoint saved at an epoch end,
        # Lightning runs an epoch end again before any new batch (the restored schedulers
        # already stepped for that epoch; ReduceLROnPlateau's metric is not in checkpoints), so
        # the optimizer step of the last scheduler step is remembered, and checkpointed. A
        # checkpoint from the middle of an epoch steps at that epoch's end as usual. Only for a
        # completed epoch (max_steps may end one early), as Lightning's own update.
        if self.global_step == self._sched_step:
            return
        if not self._last_batch_of_epoch(unknown=True):
            return
        self._sched_step = self.global_step
        if self.lr_scheduler_interval == "epoch" and self._last_batch_step != self.global_step:
            # The epoch's last batch ran no training_step (on_train_batch_start returned -1,
            # or a None batch): Lightning still steps its epoch schedulers at the epoch end
            # (re-review, session 25).
            self._step_schedulers(plateau=False)
        self._step_schedulers(plateau=True)

    def _step_schedulers(self, plateau: bool) -> None:
        scheds = self.lr_schedulers()
        if scheds is None:
            return
        if not isinstance(scheds, list):
            scheds = [scheds]
        for prefix, sched in zip((self.model_prefix, self.baseline_prefix), scheds, strict=True):
            is_plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if is_plateau != plateau:
                continue
            if is_plateau:
                key = f"{prefix}/{self.lr_scheduler_monitor}"
                value = self.trainer.callback_metrics.get(key)
                if value is None:
                    raise MisconfigurationException(
                        f"PairedModule: ReduceLROnPlateau monitors {key!r}, which is not logged "
                        f"(available: {sorted(self.trainer.callback_metrics)})"
                    )
                sched.step(value)  # type: ignore[arg-type]
            else:
                sched.step()

    # (dataloader_idx: Lightning refuses several validation or test loaders without it; the
    # metrics of each loader are then logged with Lightning's "/dataloader_idx_k" suffix)
    def validation_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any]:
        return self._eval_step(batch, "val_loss")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._eval_step(batch, "test_loss")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Both members' outputs, ``{model_prefix: ..., baseline_prefix: ...}``, on the batch's
        inputs: an ``(inputs, target)`` pair or a dict with ``labels_key`` loses its target, any
        other batch is the inputs. (Lightning's default called ``forward`` on the whole batch,
        a TypeError for ``(x, y)`` batches; review, session 20.) The baseline runs on its private
        RNG stream, as in evaluation."""
        try:
            inputs, _ = _split_batch(batch, self.labels_key)
        except ValueError:
            inputs = batch
            if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
                inputs = inputs[0]  # DataLoader(TensorDataset(x)) gives [x]
        with self._baseline_rng(persist=False):  # (its own copy: see training_step)
            base = _call(self.baseline, _copy_tensors(inputs))
        return {self.model_prefix: _call(self.model, inputs), self.baseline_prefix: base}

    def _eval_step(self, batch: Any, name: str) -> dict[str, Any]:
        bs = self._batch_size(batch)
        results = {}
        theirs = _copy_tensors(batch)  # (as in training_step)
        for which, given in ((self.model_prefix, batch), (self.baseline_prefix, theirs)):
            results[which] = self.evaluate(given, which)
            self.log(
                f"{which}/{name}", results[which][0], on_step=False, on_epoch=True,
                batch_size=bs, sync_dist=self.sync_dist,
            )  # fmt: skip
        # Lightning hands this to on_validation_batch_end and drops it (nothing accumulates).
        return {EVAL_OUTPUTS_KEY: results}

    def _batch_size(self, batch: Any) -> int | None:
        try:
            _, target = _split_batch(batch, self.labels_key)
        except ValueError:
            return None
        return int(target.shape[0]) if isinstance(target, torch.Tensor) and target.dim() else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["paired_baseline_rng"] = {"cpu": self._rng_cpu, "cuda": self._rng_cuda}
        checkpoint["paired_scheduler_step"] = self._sched_step
        checkpoint["paired_last_batch_scheduler_step"] = self._last_batch_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("paired_baseline_rng")
        if state is not None:
            self._rng_cpu = state["cpu"]
            self._rng_cuda = state["cuda"]
        self._sched_step = int(checkpoint.get("paired_scheduler_step", -1))
        self._last_batch_step = int(checkpoint.get("paired_last_batch_scheduler_step", -1))


def _no_closure() -> None:
    return None
