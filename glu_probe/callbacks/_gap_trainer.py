"""What :class:`~glu_probe.callbacks.gap.GeneralizationGapMonitor` reads from, or sets on, the
Trainer around its evaluations: the validation precision context, eval mode with every
sub-module's flag given back, the ``VALIDATING`` stage for the training subset's transfer hooks,
a batch moved and cast as Lightning's loops do, the DDP check that every rank validates, and the
logged values of logged mode (the pending per-epoch ones included). Kept apart from the monitor
because each depends on Lightning's behaviour (and, for a few, its internals), not on the
monitor's state.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from glu_probe.ntk.functional import _logging_off, _logging_on


def _precision_context(trainer: pl.Trainer | None) -> AbstractContextManager[Any]:
    """The Trainer's validation precision context (autocast under ``"bf16-mixed"``/``"16-mixed"``).

    Lightning runs ``validation_step`` inside it, and a PairedModule's val side comes from there,
    so both sides of the gap are evaluated under it: otherwise a mixed-precision run would compare
    an autocast val loss with a float32 train loss, and the rounding difference (1e-5 to 1e-3 of
    the loss) would show up as a generalization gap.
    """
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    if plugin is None:
        return nullcontext()
    return plugin.val_step_context()


@contextmanager
def _eval_flags(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode, every sub-module's ``training`` flag given back afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def _eval_no_grad(module: nn.Module) -> Iterator[None]:
    with _eval_flags(module), torch.no_grad():
        yield


#: ``nn.Module``'s own attributes: a metric's restore leaves them (the training flags are
#: ``_eval_flags``' to give back; parameters, buffers, children and hooks are not its state).
_MODULE_KEYS = frozenset(vars(nn.Module()))


def _metric_types() -> tuple[type, ...]:
    """torchmetrics' ``Metric`` and ``MetricCollection`` (``()`` without torchmetrics)."""
    try:
        from torchmetrics import Metric, MetricCollection
    except ImportError:  # pragma: no cover (a Lightning dependency)
        return ()
    return (Metric, MetricCollection)


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain data (numbers, strings, and containers of them)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(map(_plain, value))
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


def _version(tensor: torch.Tensor) -> int | None:
    """``tensor``'s in-place version counter (``None`` for an inference tensor: none kept)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


@dataclass
class _KeptState:
    """A metric state as it was: the object (``value``), and what gives it back by value
    (``copy``: a tensor's clone, a list's items, another object's deep copy), with a tensor's
    version counter (``version``) that tells whether the object itself was changed in place."""

    value: Any
    copy: Any
    version: int | None = None


def _state_kept(value: Any, clones: dict[int, torch.Tensor]) -> _KeptState:
    if isinstance(value, torch.Tensor):
        # One clone per tensor (``clones``): a MetricCollection's compute group shares its first
        # member's state objects with the others, and a restored copy stays shared.
        # Outside inference mode (validation runs in it): a clone made there is an inference
        # tensor, and the next training step's in-place update of the state raised.
        if id(value) not in clones:
            with torch.inference_mode(False):
                clones[id(value)] = value.detach().clone()
        return _KeptState(value, clones[id(value)], _version(value))
    if isinstance(value, list):
        # A list state's tensors are kept as they are: torchmetrics appends to the list (in
        # place, in update) or puts a new one (reset, forward's merge, sync, moves) and never
        # writes into the tensors; cloning each of them (an epoch of predictions) at every
        # evaluation made a validation quadratic in the training epoch's length.
        return _KeptState(value, list(value))
    return _KeptState(value, copy.deepcopy(value))


def _state_back(kept: _KeptState) -> Any:
    """The state object to put back: the one it was where it was not changed in place (the
    usual case: ``forward``/``reset`` assign new states), else its copy by value."""
    value = kept.value
    if isinstance(value, torch.Tensor):
        unchanged = kept.version is not None and _version(value) == kept.version
        return value if unchanged else kept.copy
    if isinstance(value, list):
        if len(value) != len(kept.copy) or any(
            x is not y for x, y in zip(value, kept.copy, strict=True)
        ):
            value[:] = kept.copy  # (appended to in place: the same list, its items as they were)
        return value
    return kept.copy


def _metrics_kept(module: nn.Module) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """What to give back of every torchmetrics ``Metric`` / ``MetricCollection`` in ``module``'s
    tree (attributes, ``MetricCollection``/``ModuleDict`` members, wrappers' inner metrics):
    each one's attributes other than :data:`_MODULE_KEYS`, its states (``_defaults``' keys)
    kept by value (:func:`_state_kept`), plain containers deep-copied (a collection's compute
    ``_groups``, merged in place at its first update), the rest (``_update_count``,
    ``_computed``, ``_forward_cache``, the sync flags and ``_cache``, whatever a later
    torchmetrics adds) as they are: ``update``/``forward``/``sync`` assign those anew."""
    types = _metric_types()
    if not types:
        return []
    clones: dict[int, torch.Tensor] = {}
    kept = []
    for m in module.modules():
        if not isinstance(m, types):
            continue
        own = vars(m)
        states = set(getattr(m, "_defaults", {}))
        saved: dict[str, Any] = {}
        for name, value in own.items():
            if name in _MODULE_KEYS:
                continue
            if name in states:
                saved[name] = _state_kept(value, clones)
            elif isinstance(value, (list, dict, set)) and _plain(value):
                saved[name] = copy.deepcopy(value)
            else:
                saved[name] = value
        kept.append((own, saved))
    return kept


def _metrics_back(kept: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    # (An attribute first set during the evaluation stays: torchmetrics sets its own in
    # __init__, and deleting what something else added lazily could break it.)
    for own, saved in kept:
        for name, value in saved.items():
            # (written into the instance's dict: Metric.__setattr__ refuses some names)
            own[name] = _state_back(value) if isinstance(value, _KeptState) else value


@contextmanager
def _user_state_kept(module: nn.Module) -> Iterator[None]:
    """The user's logging and metric state untouched by what runs inside: every LightningModule
    in ``module``'s tree with ``log`` and ``log_dict`` that do nothing, given back exactly
    afterwards (an instance's own attribute put back, else removed), and every torchmetrics
    metric in the tree given back its state as it was (:func:`_metrics_kept`).

    The monitor's evaluations run the user's loss hook and forward inside Lightning's
    validation hooks: a ``self.log("train_loss", ...)`` there landed in validation's results
    under the user's own key (``callback_metrics["train_loss"]`` became the validation loss, a
    value in the CSV's ``train_loss`` column at every validation; review, session 29), and
    inside ``on_train_start``'s checks Lightning refuses logging altogether. A hook that calls
    ``self.train_acc(logits, y)`` then logs ``self.train_acc`` with ``on_epoch=True`` (the usual
    pattern) accumulated the monitor's training-subset and validation batches into the epoch's
    ``train_acc`` (0.3249 for 0.3421; re-review, session 29). The monitor's passes are not the
    user's steps, so nothing they run logs or counts. The states are restored by value on
    their own devices, with the metric's sync flags and cache: a later ``sync``/``compute``
    (DDP) sees the metric as before.
    """
    metrics = _metrics_kept(module)
    saved = _logging_off(list(module.modules()))  # (the NTK probe's own rule, shared)
    try:
        yield
    finally:
        _logging_on(saved)
        _metrics_back(metrics)


#: The former name (logging only), kept for callers that import it.
_logging_silenced = _user_state_kept


def _find_logged(metrics: Mapping[str, Any], key: str) -> float | None:
    """The logged value of ``key``, tried as given, then with ``_epoch`` and ``_step``."""
    for k in (key, f"{key}_epoch", f"{key}_step"):
        if k in metrics:
            return float(metrics[k])
    return None


def _pending_epoch_metrics(trainer: pl.Trainer) -> Mapping[str, Any]:
    """The training epoch's per-epoch values (its ``on_epoch=True`` logs, reduced now) where the
    epoch has run its last batch: during that batch's validation (or at its
    ``on_train_batch_end``) they are not in ``callback_metrics`` yet, which holds the previous
    epoch's there, and the epoch's end puts them in for the next validation. At the epoch's end
    they are what ``callback_metrics`` holds. ``{}`` elsewhere (a batch still to come:
    ``callback_metrics`` is what the next validation reads; after the epoch's end the collection
    is reset) and where Lightning's internals differ from 2.4-2.6's
    (``fit_loop.epoch_loop._results``, ``batch_progress.is_last_batch``)."""
    try:
        loop = trainer.fit_loop.epoch_loop
        if not loop.batch_progress.is_last_batch:
            return {}
        # Reducing here caches what Lightning's epoch end computes (no update remains before
        # it; an update clears the cache). A sync_dist value is all-reduced here, as there:
        # every rank runs on_save_checkpoint (Trainer.save_checkpoint dumps on all of them).
        pending = loop._results.metrics(on_step=False)["callback"]
    except (AttributeError, KeyError, TypeError):
        return {}
    return pending if isinstance(pending, Mapping) else {}


def _as_trained(trainer: pl.Trainer, batch: Any) -> Any:
    """``batch`` as Lightning's loops hand it to a step, in their order: converted by the
    precision plugin, then ``on_before_batch_transfer`` (the module's, or a datamodule's that
    overrides it), then moved by the strategy (the module's transfer hooks included). Under
    ``"bf16-true"``, ``"16-true"`` or ``"64-true"`` the plugin casts floating inputs to the
    parameters' dtype; without it the subset's float32 inputs met bf16/float64 weights and the
    fit crashed. ``on_before_batch_transfer`` was skipped before session 25 (the training side
    saw other inputs), and the cast came after the transfer hooks before session 29 (a hook
    computing on the inputs then rounded differently from the validation loop's)."""
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is not None:
        batch = plugin.convert_input(batch)
    batch = trainer.lightning_module._on_before_batch_transfer(batch, 0)
    return trainer.strategy.batch_to_device(batch)


def _check_every_rank_validates(trainer: pl.Trainer) -> None:
    """Refuse a DDP run where some ranks have validation batches and others none (a user's
    shards with ``allow_zero_length_dataloader_with_multiple_devices``): Lightning skips
    validation on the empty ranks, and the monitor's all-reduce of the validation sums waited
    for them until the process group timed out (30 min; review, session 25). Every rank is
    here. Without a sanity check the validation loader is set up here as Lightning does before
    its first validation (so a module's ``val_dataloader()`` is asked once more), then the loop
    is left as it was, for Lightning to set it up at its time; after the sanity check its batch
    counts are read as they are."""
    if not trainer.enable_validation:
        return  # (no validation at all: nothing to wait for, and no loader to ask for)
    loop = trainer.fit_loop.epoch_loop.val_loop
    # (A loader set up here and kept, with its reload epoch recorded, made check_val_every_n_
    # epoch + reload_dataloaders_every_n_epochs reload at other epochs; re-review, session 25.)
    if loop._combined_loader is None:
        epoch = loop._last_val_dl_reload_epoch
        loop.setup_data()
        loop._combined_loader = None
        loop._last_val_dl_reload_epoch = epoch
    has = float(sum(loop.max_batches) > 0)
    count = torch.tensor([has], dtype=torch.float64, device=trainer.strategy.root_device)
    ranks = int(float(trainer.strategy.reduce(count, reduce_op="sum")))
    if 0 < ranks < trainer.world_size:
        raise MisconfigurationException(
            f"GeneralizationGapMonitor: {trainer.world_size - ranks} of {trainer.world_size} "
            "ranks have no validation batches (this rank has "
            f"{'some' if has else 'none'}); Lightning skips their validation, and the "
            "monitor's all-reduce of the validation sums would wait for them forever. Give "
            "every rank validation batches (a DistributedSampler does), or use mode='logged'."
        )


@contextmanager
def _as_validating(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """The module in eval mode and the trainer's stage ``VALIDATING`` (as when Lightning moves a
    validation batch): the training subset goes through the transfer hooks as validation
    batches do, so that an augmentation under ``if self.trainer.training`` (or
    ``self.training``) is left out, whatever the batch sizes. It was applied at train start
    and undone only where the subset was rebatched at the first validation (gap/train/loss
    1.0988 or 0.9939 by eval_batch_size; review, session 24). Flags and stage restored."""
    from lightning.pytorch.trainer.states import RunningStage

    stage = trainer.state.stage
    with _eval_flags(pl_module):
        try:
            trainer.state.stage = RunningStage.VALIDATING
            yield
        finally:
            trainer.state.stage = stage
