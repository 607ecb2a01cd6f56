"""Shared helpers for the glu-probe Lightning callbacks.

Kept tiny on purpose: skip rules, config checks, rank-zero logging through the Trainer's loggers,
and access to the TensorBoard ``SummaryWriter`` objects of whatever TensorBoard loggers the user
attached.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = [
    "check_positive_int",
    "is_quiet_run",
    "log_metrics",
    "logger_step",
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


def is_quiet_run(trainer: pl.Trainer) -> bool:
    """True where a monitor must do nothing: the sanity check and ``fast_dev_run``."""
    return bool(trainer.sanity_checking or getattr(trainer, "fast_dev_run", False))


def logger_step(trainer: pl.Trainer) -> int:
    """The step at which ``LightningModule.log`` values are written (first training batch: 0).

    This is ``fit_loop.epoch_loop._batches_that_stepped``, the counter Lightning's own
    ``LearningRateMonitor`` logs at; there is no public accessor. ``trainer.global_step`` is one
    ahead of it inside ``on_train_batch_end``, so callbacks that want their points to sit on the
    same x as the loss curves use this.
    """
    loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(loop, "epoch_loop", None)
    step = getattr(epoch_loop, "_batches_that_stepped", None)
    return int(step) if step is not None else int(trainer.global_step)


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


def tensorboard_writers(trainer: pl.Trainer) -> Iterator[Any]:
    """Yield the ``SummaryWriter`` of each ``TensorBoardLogger`` on rank zero (none elsewhere)."""
    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            yield logger.experiment
