"""``GeneralizationGapMonitor``: val − train loss (and metrics), measured the same way on both.

What is computed
----------------
At the end of every validation run during ``fit`` it logs

* ``gap/loss`` = L_val − L_train,
* ``gap/<name>`` = M_val − M_train for each torchmetrics metric ``name`` the user names,
* the two sides, ``gap/train/loss``, ``gap/val/loss``, ``gap/train/<name>``, ``gap/val/<name>``
  (``log_components=True``).

Clean mode (default)
--------------------
Both sides come from a *clean* evaluation: the network in eval mode, under ``torch.no_grad``
and the Trainer's validation precision context (autocast under ``precision="bf16-mixed"``, as for
Lightning's own ``validation_step``), with the same loss function and the same aggregation. L is
the mean of the per-batch losses weighted by the number of loss terms in each batch (the samples,
or the non-ignored tokens for class targets ``-100``), which is exactly the dataset mean for
per-term mean losses. Metrics
accumulate with torchmetrics' own ``update``/``compute`` on two private copies of each metric.

* **Train side:** a training subset fixed once: ``train_subset_size`` samples (default: as many
  as the validation run evaluates, at most 256, fixed at the first validation) at the first
  indices of a permutation drawn by a ``torch.Generator`` seeded with ``seed`` from a map-style
  training dataset (in dataset order) or, where the loader's sampler has an index set
  (``SubsetRandomSampler.indices``: a train/val split of one dataset), from those indices,
  collated with the loader's ``collate_fn`` in batches of its ``batch_size`` (no sampler is
  iterated, so training order and RNG are unchanged and every DDP rank holds the same subset).
  With ``DataLoader(batch_size=None)`` each dataset item is a whole batch: whole items are taken
  in the seeded order until ``train_subset_size`` samples are reached (cut, as for an iterable
  loader, by whole batches at the first validation). For
  an ``IterableDataset`` the first batches of a fresh loader iterator (under ``isolate_rng``).
  ``train_subset=`` (a list of batches) overrides. The batches go through the module's
  batch-transfer hooks once and stay on the device. They are evaluated at the start of each
  validation run's first batch (``on_validation_batch_start``), after every callback's
  ``on_validation_epoch_start``: with a weight-averaging callback (Lightning's
  ``EMAWeightAveraging`` / ``WeightAveraging``, which swap the averaged weights in there and back
  at ``on_validation_epoch_end``) both sides see the averaged network, whatever the callbacks'
  order (the train side was evaluated at ``on_validation_end``, after the swap back: the raw
  weights against the val side's averaged ones; review, session 26).
* **Val side:** the batches of the (first) validation loader that Lightning runs anyway,
  evaluated again in ``on_validation_batch_end`` by the same function (``val_batches`` caps how
  many), so no second pass over the validation data is needed. For a
  :class:`~glu_probe.callbacks.PairedModule` not even that: its ``validation_step`` returns what
  :meth:`~glu_probe.callbacks.PairedModule.evaluate` gave for both members, and the monitor
  adds those (same function, same eval mode and ``no_grad``) instead of running the batch again.
  Under DDP the val sums are all-reduced (each rank holds its shard); metrics sync themselves.

The loss function (contract)
----------------------------
For each batch the monitor needs ``(loss, preds, target)``:

1. :class:`~glu_probe.callbacks.PairedModule`: its ``evaluate(batch, which)`` for *both* members;
   the names then become ``gap/<model_prefix>/loss``, ``gap/<baseline_prefix>/loss``,
   ``gap/<prefix>/<name>`` (and ``gap/<prefix>/train/...`` components), so the dashboard puts
   model and baseline on one chart.
2. else ``loss_fn(preds, target)`` given to the monitor, with ``preds`` the predictions of
   ``pl_module(inputs)``;
3. else the module's own ``compute_loss(batch) -> Tensor`` (an extra forward feeds metrics);
4. else the module's ``loss_fn(preds, target)`` attribute.

Batches are ``(inputs, target)`` or dicts with ``labels_key``; outputs a tensor, a tuple (first
element) or an object with ``.logits`` (as in PairedModule). With a ``compute_loss(batch)`` hook
and no metrics the batch is passed whole and never split (any format; each batch then weighs its
number of samples). Anything the chosen route cannot split: MisconfigurationException at train
start (checked on the first training-subset batch), not at the first validation.

A causal language model's predictions reach ``loss_fn`` and the metrics *shifted*, in one format
on every route (a module holding a Hugging Face causal LM, see ``causal_lm``, and
``PairedModule(causal_lm=True)``): logits ``(B, T-1, V)`` of positions ``0..T-2`` and labels
``(B, T-1)`` of tokens ``1..T-1`` (``-100``: ignored), the pairs the model's own loss averages.
``torchmetrics.text.Perplexity(ignore_index=-100)`` takes them as they are; a loss or metric that
wants the classes on dimension 1 takes ``p.transpose(1, 2)`` (``F.cross_entropy(p.transpose(1,
2), t)``; ``torchmetrics.wrappers.LambdaInputTransformer(MulticlassAccuracy(num_classes=V,
ignore_index=-100), transform_pred=lambda p: p.transpose(1, 2))`` for token accuracy). They got
the unshifted ``(B, T, V)`` / ``(B, T)`` (a Perplexity gap of the wrong sign) and, from a
PairedModule, its flattened ``(N, V)`` / ``(N,)`` (Perplexity crashed; review, session 28).
The module's own loss (``compute_loss``, its ``loss_fn`` attribute, ``PairedModule.evaluate``)
is computed as before. ``loss_fn`` and each metric's ``update`` are run once at train start on
the first training-subset batch (a PairedModule's metrics where ``causal_lm=True``): one that
fails there is refused with a MisconfigurationException that shows the shapes, not at the first
validation after the training steps before it. A ``loss_fn`` that shifts by itself (``p[:, :-1]``,
``t[:, 1:]``: the only way to get next-token numbers before session 28) would now score every
position against the token two ahead; on that batch it is compared with the module's own loss
(``compute_loss(batch)``, else the output's ``.loss`` when called with ``labels``; not a
``loss_fn`` attribute, which may be a flat criterion applied after a shift of the module's
own): equal to ``loss_fn`` on the unshifted predictions and not on the shifted ones, it is
refused; equal to neither, a warning says ``gap/loss`` is not the model's own loss (within
rounding: 1e-4 relative, two epsilons of a 16-bit type in the logits or losses; a model that
scores both shifts alike at train start is not told apart). A *metric* that shifts by itself
cannot be checked that way: remove its shift. Which labels are shifted: with ``causal_lm=None``
those of the shape of the batch's integer token ids (``batch["input_ids"]``, the inputs of an
``(inputs, labels)`` batch, or their ``"input_ids"``), which must follow Hugging Face's
``labels=input_ids`` convention (equal wherever not ``-100``; checked on the first subset batch,
as is that integer ``(B, T)`` labels have such ids: labels shifted in the data, or a batch that
names its tokens otherwise, are refused at train start, asking for ``causal_lm=False`` or
``True``); with ``causal_lm=True`` every integer ``(B, T)`` target. Each batch is weighed by the
non-ignored labels after the shift on every route and layout.

Several monitors in one Trainer (e.g. clean and logged side by side) need distinct ``prefix``
values (default ``"gap"``: ``gap/loss``, ...).

Logged mode
-----------
``mode="logged"`` does no evaluation: it reads ``val_key`` and ``train_key`` (tried as given, then
with ``_epoch`` and ``_step`` suffixes) from ``trainer.callback_metrics`` at validation end, and for
metrics the pairs ``{name: (train_key, val_key)}`` (or names ``n`` meaning ``train_n``/``val_n``).
Cheap, but the two sides are whatever was logged: usually the last step's (or previous epoch's)
training loss in train mode with dropout, against a full-val-set mean in eval mode. Lightning does
not restore ``callback_metrics`` from a checkpoint, so the monitor saves the training-side values
the next validation would read (``on_save_checkpoint``) and a resumed run uses them until the keys
are logged again: a training loss logged per epoch is then not missing at the resumed run's first
validation (its gap point was dropped; review, session 26). A checkpoint saved at the validation of
an epoch's last batch (Lightning's default with ``val_check_interval<1``, or
``ModelCheckpoint(save_on_train_epoch_end=False)``) saves that epoch's per-epoch means, which its
end hands to the next validation, and the end of that epoch that Lightning replays on resume,
before any training batch, is not taken for a real one: the resumed series equals the
uninterrupted run's (the resume raised "not logged", and the train side of the resumed epoch was
the previous epoch's; re-review, session 26). Logged mode works under any strategy.

Inference mode
--------------
``Trainer(inference_mode=True)`` (the default) puts ``trainer.validate()``/``test()`` under
``torch.inference_mode()``; the validation that runs *inside* ``fit`` is always under
``torch.no_grad`` (Lightning builds that loop with ``inference_mode=False``). The monitor measures
during ``fit`` only, so it works with either setting, including a loss hook that re-enables
autograd itself (``with torch.enable_grad(): ...``, e.g. a gradient penalty). A stand-alone
``trainer.validate()`` has no training subset: the monitor skips it with a warning saying so. If an
evaluation ever runs under inference mode and the loss hook needs autograd (which inference mode
cannot give back), a MisconfigurationException says to use ``Trainer(inference_mode=False)``.

Zero interference
-----------------
Evaluations run under ``isolate_rng``, in eval mode with every submodule's train/eval flag
restored afterwards, under ``no_grad`` (``.grad`` untouched), on the unwrapped module (no DDP
reducer involvement). The sanity check, ``fast_dev_run`` and ``trainer.validate`` are skipped.
That unwrapped module must hold the whole network on every rank: clean mode refuses FSDP,
DeepSpeed and model-parallel strategies at setup (use ``mode="logged"`` there).

Checkpoints
-----------
The history is saved, and a fingerprint of what decides the training side (mode, subset size,
seed, explicit subset, loss route, and the subset's samples once fixed): resuming with another
one warns that the restored series continues on another subset (it was silent). Checkpoints
without a fingerprint load as before.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DistributedSampler, IterableDataset

from glu_probe.callbacks._gap_checks import (
    _check_own_shift,
    _check_token_labels,
    _one_number,
    _refused,
)
from glu_probe.callbacks._gap_loaders import (
    _first_loader,
    _first_samples,
    _loader_batch_size,
    _n_samples,
    _real_samples,
    _unsized_loader_samples,
)
from glu_probe.callbacks._gap_trainer import (
    _as_trained,
    _as_validating,
    _check_every_rank_validates,
    _eval_no_grad,
    _find_logged,
    _pending_epoch_metrics,
    _precision_context,
    _user_state_kept,
)
from glu_probe.callbacks._lm_tokens import (
    _holds_causal_lm,
    _int_tokens,
    _paired_tokens,
    _shape,
    _shift_tokens,
    _token_labels,
)
from glu_probe.callbacks._utils import (
    check_bool,
    check_name,
    check_positive_int,
    check_prefix,
    check_unique_prefix,
    is_fresh_fit,
    is_quiet_run,
    items_are_batches,
    loader_batches,
    log_metrics,
    logger_step,
    rank_zero_batches,
    sampler_indices,
    stable_repr,
)
from glu_probe.callbacks.paired import (
    EVAL_OUTPUTS_KEY,
    PairedModule,
    _call,
    _copy_tensors,
    _logits,
    _n_items,
    _split_batch,
)

__all__ = ["GeneralizationGapMonitor"]

_RESERVED = {"loss", "train", "val"}
#: Largest automatic training subset (``train_subset_size=None``), in samples.
AUTO_SUBSET_MAX = 256
#: Strategies that shard the parameters (matched by class name along the MRO, as
#: NTKSpectrumMonitor's): the clean evaluation calls the unwrapped module, which needs them whole.
_SHARDING_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLAFSDP")

# The helpers with a job of their own live beside this module: _gap_loaders (loader and batch
# sizes), _gap_trainer (the Trainer around an evaluation), _lm_tokens (a causal LM's token
# layout), _gap_checks (the train-start checks). The accumulator stays here: tests force its
# accelerator path by patching ``gap._reads_lazily``, which ``_Side.add`` looks up in this module.


class _Side:
    """Accumulates one side (train or val) of one evaluated network."""

    def __init__(self, metrics: Mapping[str, Any], device: torch.device, sync: bool) -> None:
        self.metrics = {}
        for name, metric in metrics.items():
            clone = copy.deepcopy(metric).to(device)
            if not sync:
                clone.sync_on_compute = False  # identical data on every rank: nothing to gather
            self.metrics[name] = clone
        self.device = device
        self.reset()

    def reset(self) -> None:
        self._loss_sum = 0.0
        self._count = 0.0
        self._skipped = 0.0  # batches with a non-finite loss, left out
        # [loss·n, n] per batch, float64 on an accelerator, read back once (a per-batch read is
        # a device sync that stalls the launch queue).
        self._queued: list[torch.Tensor] = []
        for m in self.metrics.values():
            m.reset()

    def add(self, loss: torch.Tensor, preds: Any, target: Any, count: int | None = None) -> None:
        """Add one batch; ``count``: its number of loss terms where there is no target (a
        ``compute_loss(batch)`` hook on a batch the monitor does not split)."""
        if _reads_lazily(loss, target):
            n = (
                _n_items_lazy(target, loss.device)
                if count is None
                else torch.tensor(float(count), dtype=torch.float64, device=loss.device)
            )
            term = loss.detach().double().reshape(()) * n
            # A batch with a non-finite loss is left out, and counted: one NaN batch made the
            # whole side NaN, and the gap vanished from the logs without a word (review,
            # session 24). A batch with no loss terms (NaN·0) adds nothing and is not counted.
            finite, has_terms = torch.isfinite(term), n > 0
            kept, zero = finite & has_terms, torch.zeros_like(term)
            skipped = (~finite & has_terms).double()
            self._queued.append(
                torch.stack([torch.where(kept, term, zero), torch.where(kept, n, zero), skipped])
            )
        else:
            k = _n_items(target) if count is None else count
            value = float(loss)
            if k and not math.isfinite(value):
                self._skipped += 1  # (its metrics still update below, as on an accelerator)
            elif k:  # (a batch with no loss terms adds nothing: its NaN mean made the sum NaN)
                self._loss_sum += value * k
                self._count += k
        for m in self.metrics.values():
            m.update(preds, target)

    def _settle(self) -> None:
        if self._queued:
            total = torch.stack(self._queued).sum(0).tolist()  # one read
            self._queued = []
            self._loss_sum += total[0]
            self._count += total[1]
            self._skipped += total[2]

    @property
    def loss_sum(self) -> float:
        """Σ over batches of (batch loss × loss terms in the batch)."""
        self._settle()
        return self._loss_sum

    @property
    def count(self) -> float:
        """Σ over batches of the loss terms (samples, or non-ignored tokens)."""
        self._settle()
        return self._count

    @property
    def skipped(self) -> float:
        """Batches left out for a non-finite loss."""
        self._settle()
        return self._skipped


def _scalar_metric(name: str, value: Any) -> float:
    """A metric's computed value as a float; a clear error for one that is not a scalar (a
    per-class ``average=None`` accuracy crashed the fit with "only one element tensors can be
    converted"; review, session 24)."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise MisconfigurationException(
            f"GeneralizationGapMonitor: metric {name!r} computes a tensor of shape "
            f"{tuple(value.shape)}; the gap needs one number (e.g. average='macro' or "
            "'micro' instead of average=None / 'none')"
        )
    return float(value)


def _reads_lazily(loss: Any, target: Any) -> bool:
    """Queue this batch on the device (an accelerator; MPS has no float64) instead of reading."""
    return (
        isinstance(loss, torch.Tensor)
        and loss.device.type not in ("cpu", "mps")
        and (not isinstance(target, torch.Tensor) or target.device == loss.device)
    )


def _n_items_lazy(target: Any, device: torch.device) -> torch.Tensor:
    """:func:`_n_items` as a float64 tensor on ``device`` (the target's), never read back."""
    if isinstance(target, torch.Tensor) and target.dim() > 0 and not target.is_floating_point():
        return (target != -100).sum().double()
    return torch.tensor(float(_n_items(target)), dtype=torch.float64, device=device)


def _paired_evaluations(
    pl_module: pl.LightningModule, outputs: Any, sides: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """``{tag: (loss, preds, target)}`` from a PairedModule's validation_step, if it has them.

    They come from :meth:`PairedModule.evaluate` in Lightning's validation loop (eval mode, no
    grad), the very function the clean evaluation would call, so reusing them changes no number
    and saves a second forward pass of both networks per validation batch.
    """
    if not isinstance(pl_module, PairedModule) or not isinstance(outputs, Mapping):
        return None
    found = outputs.get(EVAL_OUTPUTS_KEY)
    if not isinstance(found, Mapping) or not all(
        isinstance(found.get(tag), tuple) and len(found[tag]) == 3 for tag in sides
    ):
        return None
    return found


class GeneralizationGapMonitor(Callback):
    """Log ``gap/loss`` = val − train loss and ``gap/<metric>`` at each validation end.

    Args:
        train_subset_size: number of training samples evaluated (clean mode). ``None``
            (default): as many as the validation run evaluates (evaluated val batches × the
            val loader's batch size, read at the first validation), at most
            :data:`AUTO_SUBSET_MAX` (256): both sides then carry the same sampling noise, and
            the train side never costs more than the validation Lightning runs anyway.
        metrics: clean mode: ``{name: torchmetrics.Metric}``, updated with ``(preds, target)``
            (a causal LM's shifted: see the module docstring); logged mode: ``{name:
            (train_key, val_key)}`` or a list of names ``n`` (keys ``train_n``, ``val_n``).
        mode: ``"clean"`` (default) or ``"logged"``.
        train_key: logged-mode name of the training loss.
        val_key: logged-mode name of the validation loss.
        loss_fn: ``loss_fn(preds, target)`` (a causal LM's shifted, as the metrics get them;
            one that shifts again is refused at train start where the module's own loss shows
            it); see the module docstring for the lookup order and the format.
        val_batches: at most this many validation batches are evaluated (``None``: all); under
            DDP per rank, like Lightning's ``limit_val_batches``. (Unlike Lightning's own
            ``val_loss``, the val side leaves out the samples a ``DistributedSampler`` repeats
            to pad the last shard, where the batch's layout shows its samples.)
        train_subset: explicit training batches instead of drawing a subset.
        seed: seed of the subset indices.
        labels_key: the targets' key in dict batches.
        log_components: also log both sides (``gap/train/...``, ``gap/val/...``).
        eval_batch_size: batch size of the training-subset evaluation. ``None`` (default): the
            larger of the train and the (first) validation loader's batch sizes, read at the
            first validation, so the subset is evaluated in batches no larger than ones the run
            already fits on the device (eval runs without gradients), and small training batches
            (a language model's 8 sequences) do not cost dozens of small forward passes.
        prefix: name prefix of the logged metrics (``"gap"``: ``gap/loss``, ...); monitors of
            one Trainer need distinct prefixes.
        causal_lm: weigh each batch by its non-ignored labels after the next-token shift
            (``labels[..., 1:]``), the terms a causal language model's loss averages (Hugging
            Face's ``*ForCausalLM`` shift ``labels=input_ids`` inside). ``None`` (default):
            when the module's outermost Hugging Face model is a ``...ForCausalLM`` or an LM head
            whose loss shifts (GPT-2's, BERT's, ...; not XLNet's, XLM's, nor an
            ``EncoderDecoderModel``) and the targets have the shape of the batch's integer
            token ids (``batch["input_ids"]``, ``batch[0]`` or ``batch[0]["input_ids"]``); the
            first subset batch's labels must then equal those ids wherever not ``-100``, and
            integer ``(B, T)`` labels must have such ids, else a MisconfigurationException at
            train start. ``True``: every integer ``(B, T)`` target (no check); ``False``: none
            (labels already shifted in the data). ``loss_fn`` and the metrics then get the
            shifted predictions, logits ``(B, T-1, V)`` and labels ``(B, T-1)``. (A
            ``PairedModule`` shifts, or not, by its own ``causal_lm``; its metrics get the same
            format.)

    One instance can serve several independent ``fit`` runs: a fit that starts at step 0
    without a checkpoint starts with an empty history.
    """

    def __init__(
        self,
        train_subset_size: int | None = None,
        metrics: Mapping[str, Any] | Sequence[str] | None = None,
        mode: str = "clean",
        train_key: str = "train_loss",
        val_key: str = "val_loss",
        *,
        # (nn.Module first: a YAML class_path such as torch.nn.MSELoss; session 24)
        loss_fn: nn.Module | Callable[[Any, Any], torch.Tensor] | None = None,
        val_batches: int | None = None,
        train_subset: Sequence[Any] | None = None,
        seed: int = 0,
        labels_key: str = "labels",
        log_components: bool = True,
        eval_batch_size: int | None = None,
        prefix: str = "gap",
        causal_lm: bool | None = None,
    ) -> None:
        super().__init__()
        check_prefix("GeneralizationGapMonitor", prefix)
        if causal_lm is not None and not isinstance(causal_lm, bool):
            raise MisconfigurationException(
                "GeneralizationGapMonitor: causal_lm must be True, False or None, got "
                f"{causal_lm!r}"
            )
        self.causal_lm = causal_lm
        self._shifted = False  # resolved at setup (causal_lm, or the module's own kind)
        if mode not in ("clean", "logged"):
            raise MisconfigurationException(
                f"GeneralizationGapMonitor: mode must be 'clean' or 'logged', got {mode!r}"
            )
        owner = "GeneralizationGapMonitor"
        check_positive_int(owner, "train_subset_size", train_subset_size, allow_none=True)
        check_positive_int(owner, "val_batches", val_batches, allow_none=True)
        check_positive_int(owner, "eval_batch_size", eval_batch_size, allow_none=True)
        if loss_fn is not None and not callable(loss_fn):
            raise MisconfigurationException("GeneralizationGapMonitor: loss_fn must be callable")
        if train_subset is not None and (
            isinstance(train_subset, (str, bytes, torch.Tensor))
            or not isinstance(train_subset, Sequence)  # (an int crashed with a TypeError)
            or len(train_subset) == 0
        ):
            raise MisconfigurationException(
                "GeneralizationGapMonitor: train_subset must be a non-empty list of batches"
            )
        self.mode = mode
        self.metric_pairs: dict[str, tuple[str, str]] = {}
        self.metrics: dict[str, Any] = {}
        if mode == "clean":
            self.metrics = self._check_clean_metrics(metrics)
        else:
            self.metric_pairs = self._check_logged_metrics(metrics)
        for arg, value in (("train_key", train_key), ("val_key", val_key)):
            check_name("GeneralizationGapMonitor", arg, value)
        check_name("GeneralizationGapMonitor", "labels_key", labels_key)
        self.train_subset_size = train_subset_size
        self.train_key = train_key
        self.val_key = val_key
        self.loss_fn = loss_fn
        self.val_batches = val_batches
        self.eval_batch_size = eval_batch_size
        # Map-style subset: its samples and the train loader's collate_fn / batch size, to be
        # batched at the eval batch size at the first validation (val loaders exist only then).
        self._items: list[Any] | None = None
        self._order: list[int] = []  # the items' dataset indices (a seeded permutation prefix)
        self._collate: Callable[[list[Any]], Any] | None = None
        self._train_bs = 1
        self._sized = False  # the subset's final size is fixed at the first validation
        self.train_subset = list(train_subset) if train_subset is not None else None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MisconfigurationException(
                f"GeneralizationGapMonitor: `seed` must be an int, got {seed!r}"
            )
        self.seed = seed
        self.labels_key = labels_key
        check_bool("GeneralizationGapMonitor", log_components=log_components)
        self.log_components = bool(log_components)
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self._batches: list[Any] | None = None
        self._sides: dict[str, dict[str, _Side]] = {}
        self._active = False
        self._warned_validate = False
        self._warned_layout = False
        self._warned_missing: set[str] = set()
        self._epoch_ended = False  # a training epoch of this fit has ended (logged mode)
        self._trained = False  # this fit has run a training batch (see on_train_epoch_end)
        self._train_done = False  # this validation run's training subset is evaluated
        # logged mode: training-side values a checkpoint brought, used until logged again
        self._restored_logged: dict[str, float] = {}
        self._fingerprint: dict[str, Any] | None = None  # this fit's (see _subset_fingerprint)
        self._saved_fingerprint: dict[str, Any] | None = None  # a resumed checkpoint's

    # ------------------------------------------------------------------ config checks
    @staticmethod
    def _check_name(name: Any) -> str:
        if not isinstance(name, str) or not name or "/" in name or name in _RESERVED:
            raise MisconfigurationException(
                f"GeneralizationGapMonitor: metric name {name!r} must be a non-empty string "
                f"without '/' and not one of {sorted(_RESERVED)}"
            )
        return name

    def _check_clean_metrics(self, metrics: Any) -> dict[str, Any]:
        if metrics is None:
            return {}
        if not isinstance(metrics, Mapping):
            raise MisconfigurationException(
                "GeneralizationGapMonitor(mode='clean'): metrics must be a mapping "
                "{name: torchmetrics.Metric}"
            )
        from torchmetrics import Metric

        out = {}
        for name, metric in metrics.items():
            if not isinstance(metric, Metric):
                raise MisconfigurationException(
                    f"GeneralizationGapMonitor(mode='clean'): metric {name!r} is a "
                    f"{type(metric).__name__}, not a torchmetrics.Metric"
                )
            if getattr(metric, "average", "macro") in (None, "none") or (
                getattr(metric, "multidim_average", "global") == "samplewise"
            ):
                raise MisconfigurationException(
                    f"GeneralizationGapMonitor(mode='clean'): metric {name!r} computes one "
                    "value per class or per sample (average=None / 'none', or "
                    "multidim_average='samplewise'); the gap needs one number: use "
                    "average='macro' or 'micro'"
                )
            out[self._check_name(name)] = metric
        return out

    def _check_logged_metrics(self, metrics: Any) -> dict[str, tuple[str, str]]:
        if metrics is None:
            return {}
        if isinstance(metrics, Mapping):
            pairs = {}
            for name, keys in metrics.items():
                if (
                    not isinstance(keys, (tuple, list))
                    or len(keys) != 2
                    or not all(isinstance(k, str) for k in keys)
                ):
                    raise MisconfigurationException(
                        f"GeneralizationGapMonitor(mode='logged'): metric {name!r} must map to "
                        f"a pair (train_key, val_key), got {keys!r}"
                    )
                pairs[self._check_name(name)] = (keys[0], keys[1])
            return pairs
        if isinstance(metrics, str) or not isinstance(metrics, Sequence):
            raise MisconfigurationException(
                "GeneralizationGapMonitor(mode='logged'): metrics must be a list of names or a "
                "mapping {name: (train_key, val_key)}"
            )
        return {self._check_name(n): (f"train_{n}", f"val_{n}") for n in metrics}

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        if self.prefix == "gap":  # the default keeps the key of earlier checkpoints
            return super().state_key
        return self._generate_state_key(prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        """The history and the fingerprint of the training side (``subset``); in logged mode a
        checkpoint also gets ``logged_train`` (see :meth:`on_save_checkpoint`)."""
        return {
            "history": [dict(h) for h in self.history],
            "subset": dict(self._fingerprint) if self._fingerprint is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        saved = state_dict.get("subset")  # (absent before session 26: nothing to compare)
        self._saved_fingerprint = dict(saved) if isinstance(saved, Mapping) else None
        logged = state_dict.get("logged_train") or {}
        self._restored_logged = {str(k): float(v) for k, v in logged.items()}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Logged mode: save the training-side values the next validation would read.

        Lightning does not restore ``trainer.callback_metrics``: a training loss logged per epoch
        was missing at a resumed run's first validation, and its gap point was dropped (review,
        session 26). They are read here, at the save, so that values the module logs in its own
        ``on_train_epoch_end`` (after the callbacks' hook, before ModelCheckpoint's) are in.
        A save after the epoch's last training batch but before its end (at the validation
        that batch runs: ModelCheckpoint's default with ``val_check_interval<1``, or
        ``save_on_train_epoch_end=False``) takes the epoch's pending per-epoch means instead,
        which that epoch's end puts in ``callback_metrics`` for the next validation (see
        :func:`_pending_epoch_metrics`).
        """
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if self.mode != "logged" or not isinstance(state, dict):
            return
        values = dict(self._restored_logged)  # (a resumed run's, not logged again yet)
        pending = _pending_epoch_metrics(trainer)
        for key in self._train_keys(pl_module):
            found = _find_logged(pending, key)
            if found is None:
                found = _find_logged(trainer.callback_metrics, key)
            if found is not None:
                values[key] = found
        state["logged_train"] = values

    def _train_keys(self, pl_module: pl.LightningModule) -> list[str]:
        """Logged mode: the training-side keys :meth:`_logged` reads."""
        keys = [self.train_key, *(tk for tk, _ in self.metric_pairs.values())]
        return [f"{tag}/{k}" if tag else k for tag in self._tags(pl_module) for k in keys]

    def _subset_fingerprint(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What decides the training side, JSON-able: saved with the history, compared when a
        run resumes (``samples`` is added once the subset's size is fixed)."""
        if self.mode == "logged":
            return {"mode": "logged", "train_key": self.train_key, "val_key": self.val_key}
        given = self.train_subset is not None
        if isinstance(pl_module, PairedModule):
            route = "PairedModule.evaluate"
        elif self.loss_fn is not None:
            route = f"loss_fn={stable_repr(self.loss_fn)}"
        elif callable(getattr(pl_module, "compute_loss", None)):
            route = "compute_loss"
        else:
            route = f"module.loss_fn={stable_repr(getattr(pl_module, 'loss_fn', None))}"
        return {
            "mode": "clean",
            "train_subset_size": self.train_subset_size,
            "seed": None if given else self.seed,
            "train_subset": len(self.train_subset) if self.train_subset is not None else None,
            "loss": route,
            "causal_lm": bool(self._shifted),
        }

    def _check_resumed(self, keys: Sequence[str]) -> None:
        """Warn once where a resumed checkpoint's fingerprint differs from this run's in
        ``keys`` (a key either lacks is not compared)."""
        saved, now = self._saved_fingerprint, self._fingerprint
        if saved is None or now is None:
            return
        changed = [k for k in keys if k in saved and k in now and saved[k] != now[k]]
        if not changed:
            return
        self._saved_fingerprint = None  # (one warning per resume)
        ours = ", ".join(f"{k}={now[k]!r}" for k in changed)
        theirs = ", ".join(f"{k}={saved[k]!r}" for k in changed)
        rank_zero_warn(
            f"GeneralizationGapMonitor: the training side ({ours}) differs from the resumed "
            f"checkpoint's ({theirs}): the restored history was measured on another subset or "
            "loss, so the logged train side (and the gap) changes here"
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.mode == "clean":
            names = [c.__name__ for c in type(getattr(trainer, "strategy", None)).__mro__]
            if any(t.lower() in n.lower() for n in names for t in _SHARDING_STRATEGIES):
                raise MisconfigurationException(
                    f"GeneralizationGapMonitor(mode='clean') does not support the {names[0]} "
                    "strategy: it shards the parameters, and the clean evaluation calls the "
                    "unwrapped module on each rank, which needs the whole model there. Use "
                    "mode='logged' (it only reads logged metrics and works under any strategy), "
                    "or strategy='ddp'."
                )
        self._warned_missing = set()
        self._epoch_ended = False
        self._trained = False
        # (a resumed run's checkpoint is restored after setup and sets these again)
        self._restored_logged = {}
        self._saved_fingerprint = None
        self._fingerprint = None
        check_unique_prefix(trainer, self)
        if is_fresh_fit(trainer):
            self.history = []
        self._shifted = (
            self.causal_lm
            if self.causal_lm is not None
            else not isinstance(pl_module, PairedModule) and _holds_causal_lm(pl_module)
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fingerprint = self._subset_fingerprint(pl_module)
        # (the checkpoint is restored by now; the subset's size is compared once it is fixed)
        self._check_resumed([k for k in self._fingerprint if k != "samples"])
        if self.mode != "clean" or is_quiet_run(trainer):
            return
        self._check_contract(pl_module)
        if getattr(trainer, "world_size", 1) > 1:
            _check_every_rank_validates(trainer)
        include_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._items = None  # set by _draw for a map-style subset
        self._sized = self.train_subset is not None
        with isolate_rng(include_cuda=include_cuda), _as_validating(trainer, pl_module):
            batches = self.train_subset if self.train_subset is not None else self._draw(trainer)
            self._batches = [_as_trained(trainer, b) for b in batches]
        if self._batches:
            self._check_batch(pl_module, self._batches[0])
            with _user_state_kept(pl_module):
                _check_token_labels(
                    pl_module,
                    self._batches[0],
                    causal_lm=self.causal_lm,
                    shifts=self._shifted,
                    labels_key=self.labels_key,
                )
        if self._sized:  # an explicit subset: its size is known now
            self._note_samples()
        device = pl_module.device
        self._sides = {
            tag: {
                "train": _Side(self.metrics, device, sync=False),
                "val": _Side(self.metrics, device, sync=True),
            }
            for tag in self._tags(pl_module)
        }
        if self._batches:
            self._check_outputs(trainer, pl_module, self._batches[0])

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._trained = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._trained:
            # Lightning's replay of the end of the epoch a resumed checkpoint was saved in
            # (saved at the validation of its last batch), before any training batch: no
            # per-epoch metric is logged yet. Taking it for an epoch end raised "not logged"
            # at the next validation and dropped the restored values (re-review, session 26).
            return
        self._epoch_ended = True  # (per-epoch training metrics exist from here on)
        # A resumed run's training keys are logged again by now (per step, or at this epoch's
        # end): a key still missing at a later validation is not logged at all, as in a run
        # that did not resume, and is not given a stale value.
        self._restored_logged = {}

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" and not self._warned_validate:
            self._warned_validate = True
            loop = trainer.validate_loop if trainer.state.fn == "validate" else trainer.test_loop
            inference = bool(getattr(loop, "inference_mode", False))
            mode = " (under inference mode)" if inference else ""
            rank_zero_warn(
                f"GeneralizationGapMonitor: skipping trainer.validate(){mode}: the gap is measured "
                "during fit only, against the training subset fixed at train start"
            )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = (
            self.mode == "clean"
            and not is_quiet_run(trainer)
            and trainer.state.fn == "fit"
            and self._batches is not None
        )
        if self._active and not self._sized:
            self._sized = True
            self._rebatch(trainer, self._final_size(trainer))
            self._note_samples()
        if self._active:
            self._train_done = False
            for sides in self._sides.values():
                sides["train"].reset()
                sides["val"].reset()

    def _note_samples(self) -> None:
        """Add the fixed subset's size to the fingerprint, and compare it with a resumed
        checkpoint's (an automatic size follows the validation run, which may have changed)."""
        if self._fingerprint is None or self._batches is None:
            return
        self._fingerprint["samples"] = sum(_n_samples(b) for b in self._batches)
        self._check_resumed(["samples"])
        self._saved_fingerprint = None  # (everything compared)

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Evaluate the training subset at the first batch of the validation run (of any
        loader): after every callback's ``on_validation_epoch_start``, with the weights the
        validation batches see (an EMA callback's swapped-in average, in either order of the
        callbacks). Lightning runs no validation hook for a run without batches."""
        if not self._active or self._train_done:
            return
        self._train_done = True
        assert self._batches is not None
        self._evaluate(pl_module, self._batches, "train", trainer)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        if self.val_batches is not None and batch_idx >= self.val_batches:
            return
        # Under DDP the last batches of a rank may hold DistributedSampler padding (repeated
        # samples, so that every rank has as many): they are left out, so the val side covers
        # each sample once, as a single process does (13 samples on 2 ranks: 3.9% off before).
        loader = _first_loader(trainer.val_dataloaders)
        real = _real_samples(loader)
        bs = getattr(loader, "batch_size", None)
        if real is not None and bs:
            keep = real - batch_idx * bs
            if keep <= 0:
                return  # all of this batch is padding
            # (the batch's samples: the sampler's, not dim 0 of a tensor, which may be time)
            shard = len(loader.sampler)  # type: ignore[arg-type,union-attr]
            n_batch = min(bs, shard - batch_idx * bs)
            if keep < n_batch:
                first = _first_samples(batch, n_batch, keep)
                if first is not None:
                    self._evaluate(pl_module, [first], "val", trainer)
                    return
                if not self._warned_layout:
                    self._warned_layout = True
                    rank_zero_warn(
                        "GeneralizationGapMonitor: the last validation batch of a rank holds "
                        f"{n_batch - keep} DistributedSampler padding sample(s), and its layout "
                        f"does not show which entries are samples (not every tensor has {n_batch} "
                        "rows in dim 0): it is evaluated whole, so the padding counts, as in "
                        "Lightning's own val_loss"
                    )
        reused = _paired_evaluations(pl_module, outputs, self._sides)
        if reused is not None:  # the PairedModule's own validation_step results, no 2nd pass
            assert isinstance(pl_module, PairedModule)
            for tag, sides in self._sides.items():
                loss, preds, target = reused[tag]
                sides["val"].add(loss, *_paired_tokens(pl_module, batch, preds, target))
            return
        self._evaluate(pl_module, [batch], "val", trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_quiet_run(trainer) or trainer.state.fn != "fit":
            return
        if self.mode == "logged":
            metrics = self._logged(trainer, pl_module)
        else:
            if not self._active:
                return
            self._active = False
            # (the train side was evaluated at the first validation batch, with the weights
            # the val side saw: see on_validation_batch_start)
            metrics = self._clean_metrics(trainer)
        step = logger_step(trainer)
        if not metrics and self.mode == "logged":
            return  # (a key not logged yet: warned in _lookup)
        if not metrics:
            # Non-finite losses are left out of the sums; with none left there is no gap. It
            # was skipped without a word, and history got an entry of the step alone (review,
            # session 20).
            rank_zero_warn(
                f"GeneralizationGapMonitor: no finite loss on the training subset or the "
                f"validation batches at step {step} (NaN or Inf outputs in eval mode?); no gap "
                "is logged for this validation",
                category=RuntimeWarning,
            )
            return
        self.history.append({"step": float(step), **metrics})
        log_metrics(trainer, metrics, step=step)
        # Also in trainer.callback_metrics, on every rank: EarlyStopping / ModelCheckpoint
        # (monitor="gap/loss") read them there; they said the metric was not available
        # (review, session 25). ModelCheckpoint runs last; an EarlyStopping checking at
        # validation end must come after this monitor in the callbacks list.
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})

    # ------------------------------------------------------------------ clean evaluation
    def _tags(self, pl_module: pl.LightningModule) -> list[str]:
        if isinstance(pl_module, PairedModule):
            return [pl_module.model_prefix, pl_module.baseline_prefix]
        return [""]

    def _check_contract(self, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, PairedModule) or self.loss_fn is not None:
            return
        if callable(getattr(pl_module, "compute_loss", None)):
            return
        if callable(getattr(pl_module, "loss_fn", None)):
            return
        raise MisconfigurationException(
            f"GeneralizationGapMonitor cannot find the loss of {type(pl_module).__name__}: pass "
            "loss_fn=..., or give the module a compute_loss(batch) method or a loss_fn(preds, "
            "target) attribute, or use mode='logged'"
        )

    def _splits(self, pl_module: pl.LightningModule) -> bool:
        """Whether the loss route needs ``(inputs, target)`` out of each batch."""
        if isinstance(pl_module, PairedModule):
            return False  # PairedModule.evaluate takes the batch as it trains on it
        if self.loss_fn is None and callable(getattr(pl_module, "compute_loss", None)):
            return bool(self.metrics)  # the hook takes the whole batch; metrics need a target
        return True

    def _check_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """MisconfigurationException at train start for a batch the chosen route cannot split."""
        if not self._splits(pl_module):
            return
        try:
            inputs, _ = _split_batch(batch, self.labels_key)
        except ValueError as err:
            raise MisconfigurationException(
                f"GeneralizationGapMonitor: {err}. The clean evaluation needs (inputs, target) "
                "batches or dicts with `labels_key`; with other batches give the module a "
                "compute_loss(batch) hook (and no metrics), pass train_subset=[...] in that "
                "format, or use mode='logged'."
            ) from err
        if isinstance(pl_module, PairedModule):
            return  # (its members are called by PairedModule.evaluate)
        hook = callable(getattr(pl_module, "compute_loss", None))
        if hook and self.loss_fn is None and not self.metrics:
            return  # compute_loss(batch) alone: forward is not called
        # The module is called as forward(**inputs) (a dict) or forward(inputs): a forward that
        # takes the batch whole failed at the first validation, after training steps had run,
        # with the module's own TypeError (review, session 20). Its signature is checked here.
        try:
            sig = inspect.signature(pl_module.forward)
            if isinstance(inputs, Mapping):
                sig.bind(**inputs)
            else:
                sig.bind(inputs)
        except (TypeError, ValueError) as err:
            if isinstance(err, ValueError):  # (no signature to read: not checked)
                return
            shown = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise MisconfigurationException(
                f"GeneralizationGapMonitor: the clean evaluation calls the module with the "
                f"batch's inputs ({shown}, the target split off), but "
                f"{type(pl_module).__name__}.forward{sig} does not take them ({err}). Give the "
                "module a compute_loss(batch) hook (and no metrics), or use mode='logged'."
            ) from err

    def _check_outputs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any
    ) -> None:
        """Run the monitor's ``loss_fn`` and each metric's ``update`` once on (a copy of) the
        first training-subset batch, as the evaluation will, and refuse what fails with a
        MisconfigurationException at train start: a loss or metric that does not take the
        predictions' format (a causal LM's shifted ``(B, T-1, V)`` logits) crashed the fit at
        the first validation, after the training steps before it (review, session 28). One
        forward per network, as an evaluation: eval mode, ``no_grad``, RNG isolated, the
        training-side metric copies reset afterwards, so training is unchanged. A
        PairedModule is checked where ``causal_lm=True`` (its metrics then get the monitor's
        layout, not ``evaluate``'s; see :func:`_paired_tokens`). Where a causal LM's
        predictions reach ``loss_fn`` shifted, its value is compared with the module's own
        loss (:func:`_check_own_shift`)."""
        paired = isinstance(pl_module, PairedModule)
        loss_fn = None if paired else self.loss_fn
        if loss_fn is None and not self.metrics:
            return  # (the module's own loss: its training runs it)
        lm = self._shifted or (paired and bool(getattr(pl_module, "causal_lm", False)))
        if paired and not lm:
            # Its metrics get what evaluate() gives its loss_fn, unchanged: checked by the
            # first validation, as before (each evaluate() call is one forward of a member).
            return
        include_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        with (
            isolate_rng(include_cuda=include_cuda),
            _as_validating(trainer, pl_module),
            torch.no_grad(),
            _precision_context(trainer),
            _user_state_kept(pl_module),
        ):
            for tag, sides in self._sides.items():
                route = self._route_outputs(pl_module, _copy_tensors(batch), tag)
                loss, preds, target, _ = self._shift(*route)
                if loss is None and loss_fn is not None:
                    try:
                        loss = loss_fn(preds, target)
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as err:
                        raise _refused("loss_fn", preds, target, err, lm) from err
                    if not _one_number(loss):
                        raise _refused(
                            "loss_fn",
                            preds,
                            target,
                            f"it returns {_shape(loss)}, not one number (a mean loss)",
                            lm,
                        )
                    if route[3]:  # shifted here: a loss_fn that shifts too is refused
                        _check_own_shift(
                            pl_module, batch, loss_fn, loss, route[1], route[2], self.labels_key
                        )
                for name, metric in sides["train"].metrics.items():
                    try:
                        metric.update(preds, target)
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as err:
                        raise _refused(f"metric {name!r}", preds, target, err, lm) from err
                    finally:
                        metric.reset()

    def _final_size(self, trainer: pl.Trainer) -> int:
        """The subset's size: ``train_subset_size``, or (``None``) the number of samples the
        validation run evaluates, at most :data:`AUTO_SUBSET_MAX`."""
        if self.train_subset_size is not None:
            return self.train_subset_size
        total = self._validation_samples(trainer)
        if getattr(trainer, "world_size", 1) > 1 and not isinstance(
            getattr(_first_loader(trainer.val_dataloaders), "sampler", None), DistributedSampler
        ):
            # Shards of the user's own making (no DistributedSampler): the val sums are
            # all-reduced over every rank's shard, so the subset (identical on every rank) is
            # sized to their total. Each rank sized it to its own shard before: 7 and 6 of 13
            # samples, two different subsets and a gap of the wrong sign (review, session 23).
            # Every rank that validates reaches this all-reduce (its own count may be unknown:
            # inf); a rank with no validation loader at all does not validate (known limit).
            count = torch.tensor(
                [math.inf if total is None else float(total)],
                dtype=torch.float64,
                device=trainer.strategy.root_device,
            )
            reduced = float(trainer.strategy.reduce(count, reduce_op="sum"))
            total = int(reduced) if math.isfinite(reduced) else None
        return AUTO_SUBSET_MAX if total is None else max(1, min(AUTO_SUBSET_MAX, total))

    def _validation_samples(self, trainer: pl.Trainer) -> int | None:
        """The samples the validation run evaluates (``None``: unknown), before the cap."""
        n_batches = (getattr(trainer, "num_val_batches", None) or [math.inf])[0]
        if self.val_batches is not None:
            n_batches = min(n_batches, self.val_batches)
        val = _first_loader(trainer.val_dataloaders)
        bs = val.batch_size if val is not None else None
        if not math.isfinite(n_batches) or n_batches <= 0:
            return None
        if not bs and val is not None:
            # No batch_size on the loader: a custom batch_sampler (its batches of indices are
            # counted, no data loaded), or items that are batches (the first item's size per
            # batch). Both fell back to AUTO_SUBSET_MAX (200 samples against a validation of
            # 20; review, session 24).
            return _unsized_loader_samples(val, int(n_batches))
        if not bs:
            return None
        # Under DDP every rank evaluates its own shard of the validation set (a
        # DistributedSampler), and the val sums are all-reduced: the validation run covers
        # num_replicas times this rank's batches, and the (identical on every rank) training
        # subset is sized to that.
        # Each sample counts once: a rank's DistributedSampler padding is not evaluated (see
        # on_validation_batch_end), nor is the rounding of a last, partial batch.
        per_rank = int(n_batches) * bs
        sampler = getattr(val, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            replicas = int(sampler.num_replicas)
            if sampler.drop_last:  # every rank the same share, the rest dropped
                return replicas * min(per_rank, len(sampler))
            if _real_samples(val) is None:  # a dataset without a length
                return per_rank * replicas
            return sum(min(per_rank, _real_samples(val, r) or 0) for r in range(replicas))
        try:  # the samples the loader yields (a subset sampler's, else the dataset's)
            return min(per_rank, len(sampler if sampler is not None else val.dataset))  # type: ignore[arg-type,union-attr]
        except TypeError:  # an iterable dataset without a length
            return per_rank

    def _rebatch(self, trainer: pl.Trainer, size: int) -> None:
        """At the first validation: cut the drawn subset to ``size`` samples and batch it at
        the eval batch size."""
        items, collate, self._items = self._items, self._collate, None  # consumed
        if items is None or collate is None:  # batches of an iterable loader
            if self._batches is not None:
                kept, got = [], 0
                for b in self._batches:
                    if got >= size:
                        break
                    kept.append(b)
                    got += _n_samples(b)
                self._batches = kept
            return
        # the first `size` of the seeded permutation, in dataset order (the documented rule)
        keep = sorted(range(min(size, len(items))), key=self._order.__getitem__)
        cut = len(keep) < len(items)
        items = [items[j] for j in keep]
        bs = self.eval_batch_size
        if bs is None:
            val = _first_loader(trainer.val_dataloaders)
            bs = max(self._train_bs, _loader_batch_size(val) or 1)
        if bs == self._train_bs and not cut:
            return
        batches = [collate(items[j : j + bs]) for j in range(0, len(items), bs)]
        # (the module's transfer hooks may draw random numbers: isolated, as at train start)
        include_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        with isolate_rng(include_cuda=include_cuda):
            self._batches = [_as_trained(trainer, b) for b in batches]

    def _draw(self, trainer: pl.Trainer) -> list[Any]:
        """The largest subset this run may evaluate (cut at the first validation)."""
        loader = _first_loader(trainer.train_dataloader)
        if loader is None:
            raise MisconfigurationException(
                "GeneralizationGapMonitor found no train DataLoader to draw its subset from; "
                "pass train_subset=[batches]"
            )
        dataset = loader.dataset
        # (a custom batch_sampler: the loader's batch_size is None; 64 was taken, and the
        # subset was evaluated in batches far larger than the run's; review, session 24)
        bs = _loader_batch_size(loader) or 64
        want = self.train_subset_size or AUTO_SUBSET_MAX
        if (
            not isinstance(dataset, IterableDataset)
            and hasattr(dataset, "__len__")
            and hasattr(dataset, "__getitem__")
        ):
            # A sampler with an index set (SubsetRandomSampler: a train/val split of one
            # dataset) restricts the draw to its samples; before session 18 the whole dataset
            # was drawn from, validation samples included (review: 23 of 64, gap 41% low).
            pool = sampler_indices(loader)
            n = len(pool) if pool is not None else len(dataset)  # type: ignore[arg-type]
            gen = torch.Generator().manual_seed(self.seed)
            if items_are_batches(loader):
                # batch_size=None: each item is a whole batch; seeded whole items until `want`
                # samples (kept as batches, cut like an iterable loader's at the validation)
                whole: list[Any] = []
                got = 0
                for i in torch.randperm(n, generator=gen).tolist():
                    if got >= want:
                        break
                    whole.append(loader.collate_fn(dataset[pool[i] if pool is not None else i]))
                    got += _n_samples(whole[-1])
                return whole
            k = min(want, n)
            order = torch.randperm(n, generator=gen)[:k].tolist()
            if pool is not None:
                order = [pool[i] for i in order]
            items = [dataset[i] for i in order]  # permutation order: any prefix is the rule
            self._items, self._order = items, order
            self._collate, self._train_bs = loader.collate_fn, bs
            ranked = [items[j] for j in sorted(range(k), key=order.__getitem__)]
            return [loader.collate_fn(ranked[j : j + bs]) for j in range(0, k, bs)]
        batches, got = [], 0
        with loader_batches(loader) as it:  # (a loader's own generator seeds its workers)
            for batch in it:
                batches.append(batch)
                got += _n_samples(batch)
                if got >= want:
                    break
        if not batches:
            raise MisconfigurationException("GeneralizationGapMonitor: the train loader is empty")
        return rank_zero_batches(trainer, batches)  # (every rank's subset, as for a map-style one)

    def _batch_outputs(self, pl_module: pl.LightningModule, batch: Any, tag: str) -> tuple:
        """``(loss, preds, target)``; target ``None`` for a batch passed whole to
        ``compute_loss`` (see :meth:`_splits`). ``preds``/``target`` are what the metrics get
        (see :meth:`_predictions`)."""
        return self._weighed_outputs(pl_module, batch, tag)[:3]

    def _weighed_outputs(self, pl_module: pl.LightningModule, batch: Any, tag: str) -> tuple:
        """``(loss, preds, target, terms)``: :meth:`_batch_outputs` and the batch's number of
        loss terms where the target does not show it (``None``: the target's own count). A
        causal LM's labels left unshifted (no metric reads the predictions) count the tokens
        after the shift, ``labels[..., 1:]``, which the model's loss averages (review, session
        23); a whole batch without a target counts its samples."""
        loss, preds, target, unshifted = self._predictions(pl_module, batch, tag)
        if loss is None:  # the monitor's own loss_fn, on what the metrics get
            assert self.loss_fn is not None
            loss = self.loss_fn(preds, target)
        if target is None:
            return loss, preds, target, _n_samples(batch)
        return loss, preds, target, _n_items(target[..., 1:]) if unshifted else None

    def _next_token(self, batch: Any, target: Any) -> bool:
        """Whether ``target`` holds a causal LM's labels that the monitor shifts (a module of
        one's own; a PairedModule shifts by itself): with an explicit ``causal_lm=True``
        every integer ``(B, T)`` target (a model of one's own whose batch names its tokens
        otherwise, ``{"tokens", "labels"}``, went unshifted; re-review, session 28); detected
        (``causal_lm=None``), labels of the shape of the batch's token ids
        (:func:`_token_labels`)."""
        if not self._shifted:
            return False
        return _int_tokens(target) if self.causal_lm else _token_labels(batch, target)

    def _route_outputs(self, pl_module: pl.LightningModule, batch: Any, tag: str) -> tuple:
        """``(loss, preds, target, next_token)`` as the loss route gives them, before the
        shift: ``loss`` ``None`` where the monitor's ``loss_fn`` is still to be applied,
        ``preds`` ``None`` where nothing reads them, ``next_token`` whether ``target`` holds
        labels to shift (:meth:`_next_token`; ``False`` for a PairedModule, whose ``evaluate``
        shifts). The module's own loss (``compute_loss``, its ``loss_fn`` attribute,
        ``PairedModule.evaluate``) gets the batch and its outputs unshifted."""
        if isinstance(pl_module, PairedModule):
            loss, preds, target = pl_module.evaluate(batch, tag)
            return (loss, *_paired_tokens(pl_module, batch, preds, target), False)
        if not self._splits(pl_module):
            # The hook takes the batch whole; a target, where the batch has one, still weighs
            # the batch by its loss terms (non-ignored tokens), else its samples count.
            try:
                _, target = _split_batch(batch, self.labels_key)
            except ValueError:
                target = None
            loss = pl_module.compute_loss(batch)  # type: ignore[operator]
            return loss, None, target, target is not None and self._next_token(batch, target)
        inputs, target = _split_batch(batch, self.labels_key)
        next_token = self._next_token(batch, target)
        if self.loss_fn is not None:
            return None, _logits(_call(pl_module, inputs)), target, next_token
        compute = getattr(pl_module, "compute_loss", None)
        if callable(compute):
            loss = compute(batch)
            if not self.metrics:
                return loss, None, target, next_token
            return loss, _logits(_call(pl_module, inputs)), target, next_token
        preds = _logits(_call(pl_module, inputs))
        module_loss: Any = pl_module.loss_fn
        # (the module's own contract: its raw outputs)
        return module_loss(preds, target), preds, target, next_token

    def _predictions(self, pl_module: pl.LightningModule, batch: Any, tag: str) -> tuple:
        """``(loss, preds, target, unshifted)`` with ``loss`` ``None`` where the monitor's
        ``loss_fn`` is still to be applied to ``(preds, target)``. For a causal language model
        (:meth:`_next_token`) ``preds``/``target`` are shifted, logits ``(B, T-1, V)`` and
        labels ``(B, T-1)``, on every route (see :func:`_shift_tokens`,
        :func:`_paired_tokens`) where ``loss_fn`` or a metric reads them; the unshifted ones
        reached the user's loss_fn and metrics, a PairedModule's flattened ones its metrics (a
        Perplexity gap of the wrong sign; review, session 28). ``unshifted``: the target holds
        next-token labels left unshifted (nothing reads the predictions)."""
        return self._shift(*self._route_outputs(pl_module, batch, tag))

    def _shift(self, loss: Any, preds: Any, target: Any, next_token: bool) -> tuple:
        """:meth:`_route_outputs`' outputs as :meth:`_predictions` gives them."""
        if next_token and preds is not None and (loss is None or self.metrics):
            return (loss, *_shift_tokens(preds, target), False)
        return loss, preds, target, next_token

    def _evaluate(
        self,
        pl_module: pl.LightningModule,
        batches: Sequence[Any],
        side: str,
        trainer: pl.Trainer | None = None,
    ) -> None:
        include_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        with (
            isolate_rng(include_cuda=include_cuda),
            _eval_no_grad(pl_module),
            _precision_context(trainer),
            _user_state_kept(pl_module),
        ):
            tags = list(self._sides.items())
            for kept in batches:
                for i, (tag, sides) in enumerate(tags):
                    # Each evaluation gets its own copy of the tensors: a model that changes its
                    # input in place changed the kept training subset for every later
                    # validation, and a paired baseline's inputs (review, session 24). The
                    # last evaluation of a validation batch, which nothing reuses, takes it.
                    last_use = side == "val" and i == len(tags) - 1
                    batch = kept if last_use else _copy_tensors(kept)
                    try:
                        loss, preds, target, terms = self._weighed_outputs(pl_module, batch, tag)
                    except RuntimeError as err:
                        if torch.is_inference_mode_enabled() and (
                            "inference" in str(err).lower() or "grad" in str(err).lower()
                        ):
                            raise MisconfigurationException(
                                "GeneralizationGapMonitor: the loss function needs autograd, "
                                "which Trainer(inference_mode=True) disables during validation; "
                                f"use Trainer(inference_mode=False). Original error: {err}"
                            ) from err
                        raise
                    if terms is None:  # the target's own count
                        sides[side].add(loss, preds, target)
                    else:
                        sides[side].add(loss, preds, target, terms)

    def _clean_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        out: dict[str, float] = {}
        for tag, sides in self._sides.items():
            prefix = f"{self.prefix}/{tag}/" if tag else f"{self.prefix}/"
            tr, va = sides["train"], sides["val"]
            # val batches are this rank's shard: sum over ranks (a no-op on one process)
            totals = torch.tensor([va.loss_sum, float(va.count), va.skipped], dtype=torch.float64)
            totals = trainer.strategy.reduce(
                totals.to(trainer.strategy.root_device), reduce_op="sum"
            )
            val_sum, val_count = float(totals[0]), float(totals[1])
            for side, skipped in (("training subset", tr.skipped), ("validation", totals[2])):
                if skipped:
                    rank_zero_warn(
                        f"GeneralizationGapMonitor: {int(skipped)} batch(es) of the {side} "
                        f"side{' of ' + tag if tag else ''} had a non-finite loss (NaN or Inf "
                        f"in eval mode) and are left out of the gap at step "
                        f"{logger_step(trainer)}",
                        category=RuntimeWarning,
                    )
            if val_count == 0 or tr.count == 0:
                continue
            train_loss = tr.loss_sum / tr.count
            val_loss = val_sum / val_count
            out[f"{prefix}loss"] = val_loss - train_loss
            if self.log_components:
                out[f"{prefix}train/loss"] = train_loss
                out[f"{prefix}val/loss"] = val_loss
            for name in self.metrics:
                m_tr = _scalar_metric(name, tr.metrics[name].compute())
                m_va = _scalar_metric(name, va.metrics[name].compute())
                out[f"{prefix}{name}"] = m_va - m_tr
                if self.log_components:
                    out[f"{prefix}train/{name}"] = m_tr
                    out[f"{prefix}val/{name}"] = m_va
        return {k: v for k, v in out.items() if math.isfinite(v)}

    # ------------------------------------------------------------------ logged mode
    def _lookup(self, trainer: pl.Trainer, key: str) -> float | None:
        """The logged value of ``key`` (or its ``_epoch`` / ``_step`` forms); ``None``, with a
        warning the first time, where it is not logged (yet): a training loss logged per epoch
        exists only from the first epoch end, and its absence at a validation within the first
        epoch ended the fit with a MisconfigurationException (review, session 24)."""
        metrics = trainer.callback_metrics
        found = _find_logged(metrics, key)
        if found is not None:
            self._restored_logged.pop(key, None)  # (logged again: the checkpoint's is stale)
            return found
        if key in self._restored_logged:  # a resumed run, before the key is logged again
            return self._restored_logged[key]
        if self._epoch_ended:
            # Every per-epoch metric exists from the first epoch end on: still missing at a
            # validation of a later epoch, the name is not logged at all (a typo); it was a
            # MisconfigurationException at the first validation before session 24.
            raise MisconfigurationException(
                f"GeneralizationGapMonitor(mode='logged'): {key!r} is not logged (still missing "
                f"in epoch {trainer.current_epoch}); logged metrics: {sorted(metrics)}"
            )
        if key not in self._warned_missing:
            self._warned_missing.add(key)
            rank_zero_warn(
                f"GeneralizationGapMonitor(mode='logged'): {key!r} is not logged (yet) at step "
                f"{logger_step(trainer)}, so no gap is logged for this validation (a metric "
                f"logged per epoch appears from the first epoch end on); logged metrics: "
                f"{sorted(metrics)}"
            )
        return None

    def _logged(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        out: dict[str, float] = {}
        pairs = {"loss": (self.train_key, self.val_key), **self.metric_pairs}
        for tag in self._tags(pl_module):
            prefix = f"{self.prefix}/{tag}/" if tag else f"{self.prefix}/"
            for name, (tk, vk) in pairs.items():
                if tag:
                    tk, vk = f"{tag}/{tk}", f"{tag}/{vk}"
                tr, va = self._lookup(trainer, tk), self._lookup(trainer, vk)
                if tr is None or va is None:
                    continue
                out[f"{prefix}{name}"] = va - tr
                if self.log_components:
                    out[f"{prefix}train/{name}"] = tr
                    out[f"{prefix}val/{name}"] = va
        return out
