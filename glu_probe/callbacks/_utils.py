"""Shared helpers for the glu-probe Lightning callbacks.

Kept tiny on purpose: skip rules, config checks, rank-zero logging through the Trainer's loggers,
and access to the TensorBoard ``SummaryWriter`` objects of whatever TensorBoard loggers the user
attached.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

__all__ = [
    "check_positive_int",
    "check_prefix",
    "check_unique_prefix",
    "configured_optimizers",
    "generator_states_restored",
    "is_fresh_fit",
    "is_quiet_run",
    "loader_batches",
    "log_metrics",
    "logger_step",
    "logger_step_advances",
    "logs_this_step",
    "rank_zero_batches",
    "sampler_indices",
    "stable_repr",
    "step_metrics",
    "tensorboard_writers",
]


def check_positive_int(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    """MisconfigurationException unless ``value`` is an int >= 1 (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise MisconfigurationException(
            f"{owner}: `{name}` must be a positive int{extra}, got {value!r}."
        )


def check_bool(owner: str, **flags: Any) -> None:
    """MisconfigurationException unless every flag is a bool: ``strict='false'`` was taken as
    true and silently did the opposite of what was meant (review, session 24)."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise MisconfigurationException(
                f"{owner}: `{name}` must be True or False, got {value!r}."
            )


def check_prefix(owner: str, prefix: Any) -> None:
    """MisconfigurationException unless ``prefix`` is a non-empty name without a trailing /."""
    if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
        raise MisconfigurationException(
            f"{owner}: `prefix` must be a non-empty name without a trailing '/', got {prefix!r}."
        )


def check_name(owner: str, arg: str, value: Any, allow_none: bool = False) -> None:
    """MisconfigurationException unless ``value`` is a non-empty string (or ``None`` where
    allowed): a metric name, a dict key or a prefix given as another type failed only at first
    use, or never (a metric that is "not logged (yet)" for the whole run; review, session 20)."""
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value:
        raise MisconfigurationException(
            f"{owner}: `{arg}` must be a non-empty string"
            + (" or None" if allow_none else "")
            + f", got {value!r}."
        )


def check_unique_prefix(trainer: pl.Trainer, callback: Any) -> None:
    """MisconfigurationException if another callback of the same class logs under the same
    ``prefix``: the two series would be interleaved into one TensorBoard/CSV series."""
    same = [
        cb
        for cb in trainer.callbacks  # type: ignore[attr-defined]
        if cb is not callback and type(cb) is type(callback) and cb.prefix == callback.prefix
    ]
    if same:
        raise MisconfigurationException(
            f"{len(same) + 1} {type(callback).__name__} callbacks in this Trainer log under the "
            f"same prefix {callback.prefix!r}, so their series would be merged into one; give "
            f"each its own `prefix=` (e.g. prefix='{callback.prefix}_2')."
        )


def is_fresh_fit(trainer: pl.Trainer) -> bool:
    """True at ``setup(stage="fit")`` of a run that starts at step 0.

    A callback instance reused for a second, independent ``fit`` (a new Trainer) resets its
    per-run state there. A resumed run also starts at step 0 at ``setup``: Lightning restores
    the checkpoint (``load_state_dict``) after it, so the restored state wins. A ``fit`` that
    continues on the same Trainer (``global_step > 0``) keeps the state.
    """
    return int(trainer.global_step) == 0


def stable_repr(obj: Any) -> str:
    """``repr(obj)``, but a function or callable object by its qualified name, never by its
    memory address: part of a ``state_key``, which must be the same in a resumed process."""
    if callable(obj) and not isinstance(obj, type):
        target = obj if hasattr(obj, "__qualname__") else type(obj)
        return f"<callable {getattr(target, '__module__', '?')}.{target.__qualname__}>"
    return repr(obj)


def is_quiet_run(trainer: pl.Trainer) -> bool:
    """True where a monitor must do nothing: the sanity check and ``fast_dev_run``."""
    return bool(trainer.sanity_checking or getattr(trainer, "fast_dev_run", False))


def items_are_batches(loader: Any) -> bool:
    """Whether a loader yields its dataset's items as batches: a ``DataLoader(batch_size=None)``
    (automatic batching off, no ``batch_sampler``) hands out ``collate_fn(dataset[i])``
    (``default_convert`` by default), so each item of a map-style dataset is already a batch,
    not one sample."""
    return (
        isinstance(loader, DataLoader)
        and loader.batch_size is None
        and loader.batch_sampler is None
    )


def sampler_indices(loader: Any) -> list[int] | None:
    """The dataset indices a loader's sampler restricts itself to, read without iterating it
    (no RNG is drawn): ``SubsetRandomSampler.indices`` or any sampler with an ``indices``
    sequence of ints, also inside the ``DistributedSamplerWrapper`` Lightning puts around a
    custom sampler under DDP and in a ``BatchSampler``. ``None`` where the sampler has no such
    set (a sequential or random sampler over the whole dataset, a weighted sampler)."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is not None and getattr(batch_sampler, "sampler", None) is not None:
        sampler = batch_sampler.sampler
    for candidate in (sampler, getattr(getattr(sampler, "dataset", None), "_sampler", None)):
        indices: Any = getattr(candidate, "indices", None)
        # A sequence or an array only: reading a one-shot iterator would empty the sampler.
        if not (isinstance(indices, (Sequence, torch.Tensor)) or hasattr(indices, "__array__")):
            continue
        if indices is None or isinstance(indices, (str, bytes)):
            continue
        try:
            out = [int(i) for i in indices]
        except (TypeError, ValueError):
            continue
        if out:
            return out
    return None


def rank_zero_batches(trainer: pl.Trainer, obj: Any) -> Any:
    """``obj`` (batches drawn from an iterable dataset) as rank 0 drew it, on every rank: such a
    dataset may split its stream by rank, while a probe or a training subset must be the same
    everywhere (review, session 18). Moved through the CPU (a pickled CUDA tensor would arrive
    on rank 0's device); a single process gets ``obj`` back as it is."""
    if trainer.world_size <= 1:
        return obj
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return trainer.strategy.broadcast(move_data_to_device(obj, "cpu"), src=0)


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the loggers write this training step's ``self.log`` values, asked inside
    ``on_train_batch_end`` (Lightning writes them right after that hook, by the rule of its
    logger connector: every ``log_every_n_steps`` steps, at a stop and under ``fast_dev_run``).
    There is no public accessor; where the internals differ, ``True`` (every step)."""
    connector = getattr(trainer, "_logger_connector", None)
    try:
        flag = bool(connector.should_update_logs) if connector is not None else True
    except Exception:  # (other Lightning versions, loops this rule does not know)
        return True
    return flag or bool(getattr(trainer, "fast_dev_run", False))


def logger_step(trainer: pl.Trainer) -> int:
    """The step at which ``LightningModule.log`` values are written (first training batch: 0).

    This is ``fit_loop.epoch_loop._batches_that_stepped``, the counter Lightning's own
    ``LearningRateMonitor`` logs at; there is no public accessor. ``trainer.global_step`` is one
    ahead of it inside ``on_train_batch_end``, so callbacks that want their points to sit on the
    same x as the loss curves use this. After a resume from a checkpoint saved at validation
    end, Lightning 2.6 restores it one higher than the uninterrupted run has it (every series,
    the user's own included, sits one step later from there); it is returned as it is.
    """
    loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(loop, "epoch_loop", None)
    step = getattr(epoch_loop, "_batches_that_stepped", None)
    return int(step) if step is not None else int(trainer.global_step)


def logger_step_advances(trainer: pl.Trainer) -> bool | None:
    """Whether Lightning advances its logger step (:func:`logger_step`) after the batch in
    progress, asked inside ``on_train_batch_end``: by its own rule, after every batch that is not
    an accumulation micro-batch (under manual optimization after every batch, stepping or not).
    There is no public accessor; ``None`` where the internals differ (the caller then takes
    whether ``global_step`` advanced)."""
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    should_accumulate = getattr(epoch_loop, "_should_accumulate", None)
    if not callable(should_accumulate):
        return None
    try:
        return not bool(should_accumulate())
    except Exception:  # (other Lightning versions, loops this rule does not know)
        return None


def configured_optimizers(trainer: pl.Trainer) -> list[Any]:
    """``trainer.optimizers`` without Lightning's placeholder for a ``configure_optimizers`` that
    returns ``None`` (``_MockOptimizer``, shown as "No Optimizer"; it holds no parameters):
    empty where the module configured none."""
    placeholders: tuple[type, ...] = ()
    try:
        from lightning.pytorch.core.optimizer import _MockOptimizer

        placeholders = (_MockOptimizer,)
    except ImportError:  # (private: moved or renamed in other Lightning versions)
        pass
    return [
        opt
        for opt in getattr(trainer, "optimizers", None) or []
        if not isinstance(opt, placeholders) and type(opt).__name__ != "_MockOptimizer"
    ]


def step_metrics(trainer: pl.Trainer, after_batch: bool = False) -> Mapping[str, Any]:
    """``trainer.callback_metrics`` during a training step, without reading anything back.

    Lightning builds ``callback_metrics`` together with the progress-bar dict, and converts
    every ``prog_bar=True`` value with ``Tensor.item()`` on each access. On a GPU each of those
    is a device sync, so a per-step hook that reads ``callback_metrics`` syncs every step
    wherever the progress bar does not already (bar disabled, or ``refresh_rate`` > 1). Lightning
    has no public accessor for the callback part alone. This helper builds that part from the
    trainer's result collection, as ``_ResultCollection.metrics(on_step=True)`` does (the
    latest on-step value of every metric, under its plain and its ``_step`` name, over the
    values already collected). Outside a training step, or where those internals differ (other
    Lightning versions), it returns ``trainer.callback_metrics``.

    ``after_batch``: read the training epoch's results from a hook after the batch (the next
    batch's start, a validation start, the training epoch's end, before Lightning resets them),
    where ``trainer._results`` may be validation's."""
    connector = getattr(trainer, "_logger_connector", None)
    results = getattr(trainer, "_results", None)
    if after_batch:
        results = getattr(
            getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_results", None
        )
    try:
        if connector is None or results is None or not results.training:
            return trainer.callback_metrics
        if connector._first_loop_iter is None and not after_batch:  # outside the epoch
            return trainer.callback_metrics
        out = dict(connector._callback_metrics)
        for _, metric in results.valid_items():
            value = metric._forward_cache if metric.meta.on_step else None
            if not isinstance(value, torch.Tensor):
                continue
            name, forked = results._forked_name(metric, True)
            out[name] = out[forked] = value
        return out
    except (AttributeError, TypeError):
        return trainer.callback_metrics


def logged_on_step(trainer: pl.Trainer, key: str) -> bool | None:
    """Whether ``key`` is logged with ``on_step=True`` in the running epoch's results: ``False``
    for a metric logged once per epoch (``self.log(..., on_step=False, on_epoch=True)``), whose
    value in ``callback_metrics`` during a step is the previous epoch's; ``None`` where it is not
    logged (yet) or Lightning's internals differ."""
    results = getattr(trainer, "_results", None)
    try:
        if results is None:
            return None
        for _, metric in results.valid_items():
            if key in (metric.meta.name, *results._forked_name(metric, True)):
                return bool(metric.meta.on_step)
            # its "_epoch" name (on_step=True, on_epoch=True): the previous epoch's mean during
            # a step, as for an epoch-only metric (review, session 20)
            both = metric.meta.on_step and metric.meta.on_epoch
            if both and key == results._forked_name(metric, False)[1]:
                return False
    except (AttributeError, TypeError):
        return None
    return None


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Send scalar ``metrics`` to every logger of ``trainer``, once (rank zero), at ``step``.

    Callbacks log outside ``LightningModule.log`` because probes run at points (e.g.
    ``on_train_batch_end`` every n steps, with our own step index) where ``self.log`` would
    aggregate across batches or be refused. Values are plain floats.
    """
    if not metrics:
        return
    step = trainer.global_step if step is None else int(step)
    _log_rank_zero(trainer, {k: float(v) for k, v in metrics.items()}, step)


@rank_zero_only
def _log_rank_zero(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def tensorboard_targets(trainer: pl.Trainer) -> Iterator[tuple[Any, str]]:
    """Yield ``(SummaryWriter, tag prefix)`` of each ``TensorBoardLogger`` on rank zero (none
    elsewhere): the tag prefix is what the logger puts before every scalar tag it writes
    (``"exp-"`` for ``prefix="exp"``, else ``""``)."""
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            prefix = str(getattr(logger, "_prefix", "") or "")
            join = str(getattr(logger, "LOGGER_JOIN_CHAR", "-"))
            yield logger.experiment, f"{prefix}{join}" if prefix else ""


def tensorboard_writers(trainer: pl.Trainer) -> Iterator[Any]:
    """Yield the ``SummaryWriter`` of each ``TensorBoardLogger`` on rank zero (none elsewhere)."""
    for writer, _ in tensorboard_targets(trainer):
        yield writer


def slice_batch(batch: Any, sl: slice) -> Any:
    """Slice every tensor of a (nested) batch along dim 0; other leaves are kept."""
    if isinstance(batch, torch.Tensor):
        return batch[sl] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, sl) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(slice_batch(v, sl) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, sl) for v in batch)
    return batch


@contextmanager
def loader_batches(loader: Any) -> Iterator[Iterator[Any]]:
    """An iterator over ``loader``'s batches that leaves the loader as it was (its private
    generators restored: :func:`generator_states_restored`; the caller isolates the global RNG).

    A ``persistent_workers`` ``DataLoader`` keeps one worker pool on itself, made when
    Lightning checks the loader at setup; iterating the loader resets that pool, and the
    workers' random state (an iterable dataset's augmentation) went on from where the callback
    left it: other batches from the second epoch on than without the callbacks (review, session
    25). Such a loader gets an iterator of its own here (its own workers, seeded from the
    global RNG as any new pool is), shut down afterwards. ``_get_iterator`` is private torch
    API, but the only way to a pool that is not the loader's.
    """
    with generator_states_restored(loader):
        if (
            isinstance(loader, torch.utils.data.DataLoader)
            and loader.persistent_workers
            and loader.num_workers > 0
        ):
            it = loader._get_iterator()
            try:
                yield it
            finally:
                shutdown = getattr(it, "_shutdown_workers", None)
                if callable(shutdown):
                    shutdown()
        else:
            yield iter(loader)


@contextmanager
def generator_states_restored(loader: Any) -> Iterator[None]:
    """Restore the private ``torch.Generator``s a loader/sampler may own (not covered by
    ``isolate_rng``, which handles the global generators only)."""
    gens: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            gens.append(g)
        inner = getattr(owner, "sampler", None)
        g2 = getattr(inner, "generator", None)
        if isinstance(g2, torch.Generator):
            gens.append(g2)
    states = [g.get_state() for g in gens]
    try:
        yield
    finally:
        for g, s in zip(gens, states, strict=True):
            g.set_state(s)
