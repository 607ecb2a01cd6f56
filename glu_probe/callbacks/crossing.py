"""``LossCrossingMonitor``: when does the model's loss curve cross its baseline's?

The monitor feeds pairs ``(this run's loss, baseline loss)`` at each logging step to a streaming
:class:`glu_probe.crossing.CrossingDetector` (EMA smoothing + hysteresis band + patience; the math
and its guarantees are in :mod:`glu_probe.crossing`), so its crossings are exactly those that
:func:`glu_probe.crossing.find_crossings` finds offline on the same series.

Baselines
---------
``baseline=`` is one of

* ``"paired"``: a baseline trained in the same process on identical batches by
  :class:`~glu_probe.callbacks.PairedModule`. The monitor reads ``<model_prefix>/<monitor>`` and
  ``<baseline_prefix>/<monitor>`` from ``trainer.callback_metrics`` (prefixes from the module;
  ``model_key``/``baseline_key`` override the names, which also makes ``"paired"`` work with any
  module that logs two such metrics).
* a path to a previous run's **TensorBoard log directory** (or one event file); the scalar tag
  ``baseline_key`` (default: ``monitor``) is read with tensorboard's ``EventAccumulator``. A
  directory without event files of its own is searched recursively and must then hold exactly one
  directory with event files (e.g. ``lightning_logs`` with a single ``version_0``).
* a path to a **CSVLogger ``metrics.csv``**; the column ``baseline_key`` (default: ``monitor``)
  against the ``step`` column, empty cells skipped.
* a **sequence in memory**: losses (step ``i`` for the i-th value) or ``(step, loss)`` pairs.

Recorded baselines are linearly interpolated at this run's steps; steps outside the baseline's
step range are not compared (no extrapolation). Steps are the *logger* steps (those in the
TensorBoard/CSV files: the first training batch is step 0), so a recorded run and a live run line
up. A baseline of another run (recorded or in memory) is compared, with ``phase="train"``, only at
the steps this run's loggers write (every ``log_every_n_steps``, Lightning's rule): the pairs fed
to the detector are then exactly the logged series, so :func:`~glu_probe.crossing.find_crossings`
on this run's log and the baseline gives the same crossings, and a run compared with its own
recorded log never crosses it. (Comparing every batch's noisy loss with a baseline logged every 50
steps found crossings of a run with its own log: review, session 18.) ``"paired"`` compares
every training batch: both curves are there at every step; offline, the same crossings need
``log_every_n_steps=1``. With ``phase="train"`` a step's *last* training batch counts: under
``accumulate_grad_batches=k`` the k micro-batches of one optimizer step share a logger step, and
the logger writes the last one's loss, so that is the value compared (with a recorded baseline of
the same run, delta is then exactly 0). With ``phase="val"`` a step's first validation counts.

Outputs
-------
Names below are for the default ``prefix="crossing"``; several monitors in one Trainer (e.g. one
per baseline) need distinct prefixes.

* ``crossing/delta`` = smoothed (this run − baseline), every ``log_every_n_steps`` updates and at
  each crossing; ``crossing/event`` = +1 (model overtakes baseline) or −1 (baseline overtakes
  model) at each crossing's detection step, through all of the Trainer's loggers on rank zero;
  ``crossing/delta`` is also put in ``trainer.callback_metrics`` after every update (on every
  rank, and restored on resume), so ``EarlyStopping`` / ``ModelCheckpoint`` can monitor it;
* a TensorBoard text entry (tag ``crossing``) per crossing, on every TensorBoardLogger;
* ``on_crossing(trainer, pl_module, crossing)``, an optional user hook, called on every rank;
* ``crossings``: the list of :class:`~glu_probe.crossing.Crossing` so far.

Which loss: ``monitor`` is looked up in ``trainer.callback_metrics`` (``monitor``, then
``monitor + "_step"``). With ``phase="train"`` (default unless a part of the name starts with
``val`` or ``eval``, not ``value``) it is
read after every training batch; with ``phase="val"`` at the end of every validation run.
A loss logged in an ``on_train_batch_end`` hook (the LightningModule's, which Lightning calls
after every callback's, or a callback's) is read at the next hook instead (the next batch's
start, a validation start or the epoch's end), still paired with its own step: read in the
monitor's own ``on_train_batch_end`` it held the previous step's value. A checkpoint saved in
that step's ``on_train_batch_end`` (``ModelCheckpoint(every_n_train_steps=...)``) is written
before such a loss exists, so a run resumed from it does not compare that one step.

Reading a loss that lives on a GPU is a device synchronisation: done after every batch it keeps
the host from queueing the next step while the GPU finishes this one (on an H200 with a
GPT-2-small pair at 0.1 s per step the difference was within a 200-step run's noise; it grows as
steps get shorter and the host's share larger). So with
``phase="train"`` the values are *collected* after every batch (one tiny on-device ``stack``,
no sync) and *read* every ``read_every`` batches in one transfer (default: every batch for CPU
values, every ``log_every_n_steps`` batches for accelerator tensors), and before every
validation, checkpoint and the end of each training epoch and of training. The detector sees the
same ``(step, loss, baseline)`` sequence either way, so the crossings, their steps and the steps
the metrics are logged at are unchanged; only ``on_crossing``, the text entry and the delta in
``trainer.callback_metrics`` come up to ``read_every − 1`` batches later in wall time. A fit in
which another callback monitors ``crossing/delta`` (its ``monitor``: ``ModelCheckpoint``,
``EarlyStopping``) reads after every batch whatever ``read_every`` says, so that a checkpoint
every n training steps is ranked by the current delta: one host read, a device synchronisation,
per step, the cost that ``read_every`` exists to spare.

Under DDP, log the monitored loss with ``sync_dist=True`` (PairedModule does) so that every rank
feeds its detector the same values; metrics and text are written once (rank zero), the hook runs
on every rank.

The detector state (smoothing, regime, crossings) is saved in checkpoints, so a resumed run
reports the same crossings as an uninterrupted one. The sanity check and ``fast_dev_run`` are
skipped.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from glu_probe.callbacks._utils import (
    check_name,
    check_positive_int,
    check_prefix,
    check_unique_prefix,
    is_fresh_fit,
    is_quiet_run,
    log_metrics,
    logged_on_step,
    logger_step,
    logs_this_step,
    step_metrics,
    tensorboard_writers,
)
from glu_probe.crossing import Crossing, CrossingDetector, float64_array

__all__ = ["LossCrossingMonitor", "load_baseline_series"]

CrossingHook = Callable[[pl.Trainer, pl.LightningModule, Crossing], Any]
# Sequences first: jsonargparse (LightningCLI) tries a union's members in order, and ``str`` would
# swallow a YAML list as its text.
BaselineSpec = Sequence[float] | Sequence[tuple[float, float]] | str | os.PathLike[str]
_EVENT_GLOB = "events.out.tfevents.*"


def _stack_scalars(values: Sequence[Any]) -> torch.Tensor:
    """Logged scalars (tensors on one device, or numbers) as one 1-D tensor on that device,
    without reading them back: an on-device ``stack`` (a single tiny kernel, no sync)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    devices = {t.device for t in tensors}
    if len(tensors) == len(values) and len(devices) == 1:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        if not dtype.is_floating_point:
            dtype = torch.float64
        return torch.stack([t.detach().reshape(()).to(dtype) for t in tensors])
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _clean_series(steps: Any, values: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, de-duplicated (last value per step wins), finite series."""
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = np.isfinite(s) & np.isfinite(v)
    s, v = s[keep], v[keep]
    if s.size == 0:
        raise MisconfigurationException(f"LossCrossingMonitor: {what} holds no finite values")
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    last = np.append(s[1:] != s[:-1], True)  # last occurrence of each step
    return s[last], v[last]


def _tensorboard_dir(path: Path) -> Path:
    if path.is_file():
        return path
    if any(path.glob(_EVENT_GLOB)):
        return path
    dirs = sorted({p.parent for p in path.rglob(_EVENT_GLOB)})
    if not dirs:
        raise MisconfigurationException(
            f"LossCrossingMonitor: no TensorBoard event files under {str(path)!r}"
        )
    if len(dirs) > 1:
        listed = ", ".join(str(d) for d in dirs[:6])
        raise MisconfigurationException(
            f"LossCrossingMonitor: {str(path)!r} holds several runs ({listed}); "
            "pass the one directory of the baseline run"
        )
    return dirs[0]


def _load_tensorboard(path: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(_tensorboard_dir(path)), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if tag not in tags:
        raise MisconfigurationException(
            f"LossCrossingMonitor: TensorBoard run {str(path)!r} has no scalar tag {tag!r}; "
            f"available: {sorted(tags)}"
        )
    events = acc.Scalars(tag)
    return _clean_series(
        [e.step for e in events], [e.value for e in events], f"tag {tag!r} of {str(path)!r}"
    )


def _load_csv(path: Path, column: str) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "step" not in fields or column not in fields:
            missing = [c for c in ("step", column) if c not in fields]
            raise MisconfigurationException(
                f"LossCrossingMonitor: {str(path)!r} has no column(s) {missing}; columns: {fields}"
            )
        steps, values = [], []
        for line, row in enumerate(reader, start=2):
            if row.get(column) not in (None, "") and row.get("step") not in (None, ""):
                try:
                    step, value = float(row["step"]), float(row[column])
                except ValueError as err:
                    raise MisconfigurationException(
                        f"LossCrossingMonitor: line {line} of {str(path)!r} holds a value that is "
                        f"not a number in 'step' or {column!r} ({err})"
                    ) from None
                steps.append(step)
                values.append(value)
    return _clean_series(steps, values, f"column {column!r} of {str(path)!r}")


def _accumulates(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Several training batches per optimizer (and logger) step: ``accumulate_grad_batches``."""
    k = getattr(trainer, "accumulate_grad_batches", 1)
    return bool(getattr(pl_module, "automatic_optimization", True)) and isinstance(k, int) and k > 1


def _step_complete(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether the current training batch ends its optimizer step: always without gradient
    accumulation; with it, the batch that steps (Lightning's ``_should_accumulate``, no public
    accessor). The step's entry was closed only when the next step's first batch came, so a
    callback monitoring ``crossing/delta`` at a step checkpoint or validation saw the previous
    step's delta (re-review, session 28)."""
    if not _accumulates(trainer, pl_module):
        return True
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    should_accumulate = getattr(epoch_loop, "_should_accumulate", None)
    if should_accumulate is None:  # (closed by the next step's batch, as before)
        return False
    return not bool(should_accumulate())


def _sequence_label(series: tuple[np.ndarray, np.ndarray] | None) -> str:
    """``<sequence …>`` with a digest of the values: part of the ``state_key``, so it must tell
    two in-memory baselines apart and be the same in a resumed process."""
    if series is None:
        return "<sequence>"
    digest = hashlib.sha1(np.ascontiguousarray(np.stack(series)).tobytes()).hexdigest()[:12]
    return f"<sequence {digest}>"


def _names_validation(name: str) -> bool:
    """Whether a metric name is a validation metric: one of its parts (split at non-letters and
    at camelCase humps, any case) starts with ``val`` or ``eval`` but not ``value``:
    ``val_loss``, ``eval_loss`` (HF's name), ``Val/loss``, ``valLoss``, ``valloss``,
    ``validation_loss``; not ``train_loss``, ``value_loss`` (an RL critic's training loss),
    ``interval_loss``. Names starting with ``val`` or after a separator were taken before, so
    ``eval_loss`` was compared at the training steps, 5 steps late (review, session 24)."""
    humps = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    parts = re.split(r"[^a-z]+", humps.lower())
    return any(re.match(r"e?val(?!ue)", part) for part in parts)


def _load_sequence(seq: Any) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = float64_array(seq)
    except (TypeError, ValueError, RuntimeError) as err:
        raise MisconfigurationException(
            "LossCrossingMonitor: an in-memory baseline must be a sequence of losses or of "
            f"(step, loss) pairs ({err})"
        ) from err
    if arr.ndim == 1:
        steps, values = np.arange(arr.size, dtype=np.float64), arr
    elif arr.ndim == 2 and arr.shape[1] == 2:
        steps, values = arr[:, 0], arr[:, 1]
    else:
        raise MisconfigurationException(
            "LossCrossingMonitor: an in-memory baseline must be a sequence of losses or of "
            f"(step, loss) pairs; got an array of shape {arr.shape}"
        )
    if arr.size == 0:
        raise MisconfigurationException("LossCrossingMonitor: the in-memory baseline is empty")
    if not np.all(np.isfinite(values)):
        raise MisconfigurationException(
            "LossCrossingMonitor: the in-memory baseline contains non-finite losses"
        )
    if not np.all(np.isfinite(steps)):
        # np.diff of a NaN step is no "<= 0": such a baseline was taken, and every comparison
        # after the NaN was skipped without a word (an inf step made up values; review, s24)
        raise MisconfigurationException(
            "LossCrossingMonitor: the in-memory baseline contains non-finite steps"
        )
    if np.any(np.diff(steps) <= 0):
        raise MisconfigurationException(
            "LossCrossingMonitor: the in-memory baseline's steps must be strictly increasing"
        )
    return steps, values


def load_baseline_series(baseline: BaselineSpec, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, losses)`` of a recorded baseline: TB directory/event file, ``.csv``, or sequence.

    Raises:
        MisconfigurationException: missing file, unknown kind, missing tag/column, bad values.
    """
    if isinstance(baseline, (str, os.PathLike)):
        path = Path(baseline)
        if not path.exists():
            raise MisconfigurationException(
                f"LossCrossingMonitor: baseline path {str(path)!r} does not exist"
            )
        if path.is_file() and path.suffix.lower() == ".csv":
            return _load_csv(path, key)
        if path.is_dir() or path.name.startswith("events.out.tfevents"):
            return _load_tensorboard(path, key)
        raise MisconfigurationException(
            f"LossCrossingMonitor: unknown baseline kind for {str(path)!r}: expected 'paired', a "
            "TensorBoard log directory or event file, a CSVLogger metrics.csv, or a sequence"
        )
    return _load_sequence(baseline)


class LossCrossingMonitor(Callback):
    """Detect when this run's loss crosses a baseline's (see the module docstring).

    Args:
        baseline: ``"paired"``, a TensorBoard log dir / event file, a ``metrics.csv`` path, or a
            sequence of losses / ``(step, loss)`` pairs.
        monitor: the loss name of this run (``trainer.callback_metrics`` key, without prefix for
            ``"paired"``).
        baseline_key: the baseline's tag (TB), column (CSV) or metric (paired); default
            ``monitor`` (TB/CSV) or ``<baseline_prefix>/<monitor>`` (paired).
        model_key: this run's metric name; default ``monitor`` or ``<model_prefix>/<monitor>``.
        smoothing: the detector's ``smoothing`` (:class:`glu_probe.crossing.CrossingDetector`).
        patience: the detector's ``patience`` (:class:`glu_probe.crossing.CrossingDetector`).
        hysteresis: the detector's ``hysteresis`` (:class:`glu_probe.crossing.CrossingDetector`).
        abs_hysteresis: the detector's ``abs_hysteresis`` (see ``CrossingDetector``).
        on_crossing: ``hook(trainer, pl_module, crossing)`` called at each crossing.
        log_every_n_steps: cadence of ``crossing/delta`` in updates (default: the Trainer's;
            every update with ``phase="val"`` (one a validation) and for a baseline of
            another run with ``phase="train"``, whose updates already come at the loggers'
            cadence).
        phase: ``"train"`` (after each training batch) or ``"val"`` (after each validation);
            default from the name: ``"val"`` if one of its parts (split at non-letters and
            camelCase humps, any case) starts with ``val`` or ``eval`` but not ``value``
            (``val_loss``, ``eval_loss``, ``Val/loss``, ``valLoss``; not ``value_loss``).
        read_every: with ``phase="train"``, read the collected losses back to the host every
            this many batches (default: 1 for CPU values, ``log_every_n_steps`` for accelerator
            tensors; see the module docstring). Detection results do not depend on it. A fit
            where another callback monitors ``<prefix>/delta`` reads every batch.
        prefix: tag prefix of the logged metrics and text (``"crossing"``: ``crossing/delta``,
            ``crossing/event``); monitors of one Trainer need distinct prefixes.

    One instance can serve several independent ``fit`` runs: a fit that starts at step 0
    without a checkpoint starts with a fresh detector.
    """

    def __init__(
        self,
        baseline: BaselineSpec = "paired",
        monitor: str = "train_loss",
        baseline_key: str | None = None,
        *,
        model_key: str | None = None,
        smoothing: float = 0.9,
        patience: int = 5,
        hysteresis: float = 0.01,
        abs_hysteresis: float = 0.0,
        on_crossing: CrossingHook | None = None,
        log_every_n_steps: int | None = None,
        phase: str | None = None,
        read_every: int | None = None,
        prefix: str = "crossing",
    ) -> None:
        super().__init__()
        check_prefix("LossCrossingMonitor", prefix)
        if not isinstance(monitor, str) or not monitor:
            raise MisconfigurationException(
                f"LossCrossingMonitor: monitor must be a metric name, got {monitor!r}"
            )
        try:
            self.detector = CrossingDetector(
                smoothing=smoothing,
                patience=patience,
                hysteresis=hysteresis,
                abs_hysteresis=abs_hysteresis,
            )
        except ValueError as err:
            raise MisconfigurationException(f"LossCrossingMonitor: {err}") from err
        if on_crossing is not None and not callable(on_crossing):
            raise MisconfigurationException("LossCrossingMonitor: on_crossing must be callable")
        check_positive_int(
            "LossCrossingMonitor", "log_every_n_steps", log_every_n_steps, allow_none=True
        )
        check_positive_int("LossCrossingMonitor", "read_every", read_every, allow_none=True)
        if phase is None:
            phase = "val" if _names_validation(monitor) else "train"
        if phase not in ("train", "val"):
            raise MisconfigurationException(
                f"LossCrossingMonitor: phase must be 'train' or 'val', got {phase!r}"
            )
        check_name("LossCrossingMonitor", "model_key", model_key, allow_none=True)
        check_name("LossCrossingMonitor", "baseline_key", baseline_key, allow_none=True)
        self.monitor = monitor
        self.model_key = model_key
        self.baseline_key = baseline_key
        self.on_crossing = on_crossing
        self.log_every_n_steps = log_every_n_steps
        self.phase = phase
        self.read_every = read_every
        self.prefix = prefix
        # (step, values) collected on the device, not yet read (phase="train"); values is a
        # tensor [a] or [a, b] (b of a recorded baseline is a float kept beside it).
        self._pending: list[tuple[int, Any, float | None]] = []
        # The latest step's entry, replaced by each later batch of the same step (gradient
        # accumulation: the logger writes the step's last micro-batch) until a new step begins.
        self._current: tuple[int, Any, float | None] | None = None
        # (logger step, whether the loggers write it) of a batch whose loss is logged after
        # the monitor's on_train_batch_end: read at the next hook (see the module docstring)
        self._deferred: tuple[int, bool, bool] | None = None
        self._host: tuple[pl.Trainer, pl.LightningModule] | None = None
        self._series: tuple[np.ndarray, np.ndarray] | None = None
        if isinstance(baseline, str) and baseline == "paired":
            self.kind = "paired"
        else:
            self.kind = "recorded"
            self._series = load_baseline_series(baseline, baseline_key or monitor)
        self.baseline = (
            baseline if isinstance(baseline, (str, os.PathLike)) else _sequence_label(self._series)
        )
        self._keys: tuple[str, str | None] | None = None
        self._warned: set[str] = set()
        self._last_read: list[torch.Tensor] = []  # the tensors read at the last step
        # logged_on_step's verdict per key, once the key is logged (fixed for a fit: not
        # re-derived from Lightning's results at every step)
        self._on_step: dict[str, bool] = {}
        # Whether another callback of this fit monitors crossing/delta (set at setup): the
        # collected losses are then read back after every batch, whatever read_every says.
        self._read_each = False

    # ------------------------------------------------------------------ state
    @property
    def crossings(self) -> list[Crossing]:
        """The crossings detected so far (restored on resume)."""
        return list(self.detector.crossings)

    @property
    def state_key(self) -> str:
        """The checkpoint key: the monitored name, the baseline as given (a recorded one by its
        path) and a non-default prefix. A checkpoint that holds no state under this key (the
        same baseline given as ``./base.csv`` or by an absolute path) is searched for this
        monitor's state by :meth:`on_load_checkpoint`."""
        return self._state_key_with(str(self.baseline))

    def _state_key_with(self, baseline: str) -> str:
        key: dict[str, Any] = {"monitor": self.monitor, "baseline": baseline}
        if self.prefix != "crossing":  # the default keeps the key of earlier checkpoints
            key["prefix"] = self.prefix
        return self._generate_state_key(**key)

    def _identity(self) -> str:
        """The baseline by its content: ``"paired"`` or a digest of its series."""
        return "paired" if self._series is None else _sequence_label(self._series)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Where the checkpoint holds no state under :attr:`state_key` (the baseline's path was
        spelled another way: ``./base.csv``, an absolute path, another working directory), take
        this monitor's state from the ``LossCrossingMonitor`` entry with the same monitored name
        and prefix: the one saved for a baseline of the same content, else the only such entry
        (a baseline that also grew since; the warning says so). The crossings and the detector
        were lost on such a resume (review, session 18). Nothing is taken where the choice is
        ambiguous."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # (Lightning restores it)
        head = type(self).__qualname__
        mine = {"monitor": self.monitor}
        if self.prefix != "crossing":
            mine["prefix"] = self.prefix
        found: list[tuple[str, dict[str, Any]]] = []
        for key, state in states.items():
            if not (isinstance(key, str) and key.startswith(head + "{")):
                continue
            try:
                fields = ast.literal_eval(key[len(head) :])
            except (ValueError, SyntaxError):
                continue
            if (
                isinstance(fields, dict)
                and {k: v for k, v in fields.items() if k != "baseline"} == mine
            ):
                found.append((key, state))
        same = [f for f in found if f[1].get("baseline_digest") == self._identity()]
        chosen = same if same else (found if len(found) == 1 else [])
        if len(chosen) != 1:
            if found:
                rank_zero_warn(
                    f"LossCrossingMonitor: the checkpoint holds no state under {self.state_key!r}, "
                    f"and {len(found)} other entries for {self.monitor!r} do not tell which is "
                    "this monitor's: its crossings start afresh"
                )
            return
        key, state = chosen[0]
        self.load_state_dict(state)
        changed = state.get("baseline_digest") not in (None, self._identity())
        rank_zero_warn(
            f"LossCrossingMonitor: restored the state saved under {key!r} (the baseline is now "
            f"given as {str(self.baseline)!r}"
            + ("; its content differs from the checkpoint's" if changed else "")
            + "); Lightning's 'Please add the following callbacks' warning about that key "
            "can be ignored"
        )

    def state_dict(self) -> dict[str, Any]:
        self._flush()  # a checkpoint holds every completed step seen so far ...
        state: dict[str, Any] = {
            "detector": self.detector.state_dict(),
            "baseline_digest": self._identity(),
        }
        if self._current is not None:
            # ... and the step in progress, not closed: under gradient accumulation a
            # checkpoint between two micro-batches would otherwise feed the detector this
            # micro-batch's loss instead of the step's last (the one the logger writes).
            step, values, recorded = self._current
            state["current"] = (step, values.detach().cpu().tolist(), recorded)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["detector"]
        mine = self.detector.params
        if dict(saved["params"]) != mine:
            rank_zero_warn(
                f"LossCrossingMonitor: resuming with detector settings {mine} where the "
                f"checkpoint used {dict(saved['params'])}: the saved smoothed losses and "
                "crossings are kept, and later steps use the new settings"
            )
        self.detector.load_state_dict(saved, strict=False)
        current = state_dict.get("current")  # (absent from older checkpoints)
        self._current = (
            None
            if current is None
            else (int(current[0]), torch.tensor(current[1], dtype=torch.float64), current[2])
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_unique_prefix(trainer, self)
            self._on_step = {}
            if is_fresh_fit(trainer):  # a resumed run's checkpoint is restored after setup
                self.detector.reset()
                self._pending, self._current = [], None
                self._warned = set()
                self._last_read = []
            self._deferred = None
            # A callback that monitors crossing/delta (ModelCheckpoint(every_n_train_steps=...),
            # EarlyStopping) reads it after this one at a batch end: with values read back every
            # read_every batches it ranked checkpoints by a stale delta (re-review, session 28).
            # Such a fit reads every batch (one host read per step, the cost read_every spares).
            key = f"{self.prefix}/delta"
            others = [cb for cb in trainer.callbacks if cb is not self]  # type: ignore[attr-defined]
            self._read_each = any(getattr(cb, "monitor", None) == key for cb in others)
        if self.kind == "paired":
            from glu_probe.callbacks.paired import PairedModule

            if isinstance(pl_module, PairedModule):
                mk = self.model_key or f"{pl_module.model_prefix}/{self.monitor}"
                bk = self.baseline_key or f"{pl_module.baseline_prefix}/{self.monitor}"
            elif self.model_key is not None and self.baseline_key is not None:
                mk, bk = self.model_key, self.baseline_key
            else:
                raise MisconfigurationException(
                    "LossCrossingMonitor(baseline='paired') needs a PairedModule, or model_key "
                    f"and baseline_key naming two logged metrics (got {type(pl_module).__name__})"
                )
            self._keys = (mk, bk)
        else:
            self._keys = (self.model_key or self.monitor, None)
        self._host = (trainer, pl_module)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.phase == "train" and not is_quiet_run(trainer):
            self._read_deferred(trainer, pl_module)
            if self._logged_later(trainer):
                self._deferred = (
                    logger_step(trainer),
                    logs_this_step(trainer),
                    _step_complete(trainer, pl_module),
                )
            else:
                self._collect(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed fit starts with empty callback_metrics (Lightning does not restore them);
        # the uninterrupted run holds the last delta there until the next update.
        if not is_quiet_run(trainer) and self.detector.n_updates:
            self._publish(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._read_deferred(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_deferred(trainer, pl_module)
        # Read before EarlyStopping / ModelCheckpoint check crossing/delta here (Lightning calls
        # them after the other callbacks and the module): they saw a delta up to read_every - 1
        # steps old (re-review, session 28). The epoch's last batch ends its optimizer step.
        self._flush(current=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_deferred(trainer, pl_module)
        self._flush()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase == "val" and not is_quiet_run(trainer) and trainer.state.fn == "fit":
            self._update(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_deferred(trainer, pl_module)
        self._flush(current=True)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        try:  # keep what was queued before the failure; never mask the original exception
            self._deferred = None  # (its hook may not have run: its value is not this step's)
            self._flush(current=True)
        except Exception as err:
            rank_zero_warn(f"LossCrossingMonitor: could not read the queued losses: {err}")

    # ------------------------------------------------------------------ internals
    def _lookup(self, metrics: Mapping[str, Any], key: str) -> Any:
        """The logged value (tensor or number, not read back), or None with a one-time warning."""
        for k in (key, f"{key}_step"):
            if k in metrics:
                return metrics[k]
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(
                f"LossCrossingMonitor: metric {key!r} is not logged (yet); logged: "
                f"{sorted(metrics)}"
            )
        return None

    def _not_logged_now(self, a: Any, b: Any) -> bool:
        """Whether this step logged no new value: Lightning keeps the last on-step value until
        the key is logged again, a new tensor each time. A loss logged every k-th step was
        compared at every step with its last value, k-1 stale pairs out of k (re-review,
        session 20). Such steps are skipped."""
        current = [v for v in (a, b) if isinstance(v, torch.Tensor)]
        stale = bool(current) and all(any(v is seen for seen in self._last_read) for v in current)
        self._last_read = current
        return stale

    def _epoch_only(self, trainer: pl.Trainer) -> bool:
        """A monitored key logged once per epoch (``on_step=False``): during a step its value is
        the previous epoch's mean, and comparing it at every step fed the detector stale
        values at steps the logger never wrote (review, session 20). Such steps are skipped,
        with a one-time warning."""
        keys = [k for k in self._keys or () if k is not None]
        for k in keys:
            if k not in self._on_step:
                verdict = logged_on_step(trainer, k)
                if verdict is not None:
                    self._on_step[k] = verdict
        stale = [k for k in keys if self._on_step.get(k) is False]
        if stale and "epoch-only" not in self._warned:
            self._warned.add("epoch-only")
            rank_zero_warn(
                f"LossCrossingMonitor: {stale} is logged once per epoch (on_step=False, or the "
                "'_epoch' name of an on_step and on_epoch metric): its value during a step is "
                "the previous epoch's, so the steps are not compared. "
                "Log it with self.log(..., on_step=True) for per-step crossings"
            )
        return bool(stale)

    def _baseline_at(self, step: int) -> float | None:
        assert self._series is not None
        steps, values = self._series
        if step < steps[0] or step > steps[-1]:
            if "range" not in self._warned and step > steps[-1]:
                self._warned.add("range")
                rank_zero_warn(
                    f"LossCrossingMonitor: the baseline ends at step {int(steps[-1])}; later "
                    "steps are not compared"
                )
            return None
        return float(np.interp(float(step), steps, values))

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read this step's pair now (``phase="val"``: once per validation)."""
        self._collect(trainer, pl_module, read_now=True)
        self._flush(current=True)

    def _logged_later(self, trainer: pl.Trainer) -> bool:
        """Whether a monitored key is (or may be) logged after this ``on_train_batch_end``: in an
        ``on_train_batch_end`` hook, or not logged yet this epoch (the first batch of a key
        logged there). Where Lightning's internals differ: ``False`` (read now, as before)."""
        keys = [k for k in self._keys or () if k is not None]
        results = getattr(trainer, "_results", None)
        try:
            if results is None or not results.training:
                return False
            hooks: dict[str, str] = {}
            for _, metric in results.valid_items():
                for name in (metric.meta.name, *results._forked_name(metric, True)):
                    hooks[name] = metric.meta.fx
        except (AttributeError, TypeError):
            return False
        found = [hooks.get(k, hooks.get(f"{k}_step")) for k in keys]
        return any(fx is None or fx == "on_train_batch_end" for fx in found)

    def _read_deferred(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the deferred batch's loss (logged after the monitor's on_train_batch_end)."""
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            self._collect(trainer, pl_module, deferred=deferred)

    def _collect(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        read_now: bool = False,
        deferred: tuple[int, bool, bool] | None = None,
    ) -> None:
        """Queue this step's ``(loss, baseline)`` as it is (no device sync), and read the queue
        back every ``read_every`` steps (see the module docstring). A later batch of the same
        logger step replaces the step's entry (gradient accumulation: the last micro-batch is
        the one the logger writes). ``deferred``: the (step, logged) of a batch whose loss
        was logged after the monitor's ``on_train_batch_end``, read at a later hook, and
        whether that batch ended its optimizer step."""
        if self._keys is None:
            self.setup(trainer, pl_module, "fit")
        assert self._keys is not None
        self._host = (trainer, pl_module)
        if (
            self.kind == "recorded"
            and not read_now
            and int(getattr(trainer, "log_every_n_steps", 1))  # (0: nothing logged: every step)
            and not (deferred[1] if deferred is not None else logs_this_step(trainer))
        ):
            return  # (a recorded baseline: compared at the logged steps only)
        step = deferred[0] if deferred is not None else logger_step(trainer)
        same_step = self._current is not None and self._current[0] == step
        if not same_step:
            last = self._current[0] if self._current is not None else None
            if last is None:
                last = self._pending[-1][0] if self._pending else self.detector.last_step
            if last is not None and step <= last:
                return
        if self.phase == "train" and not read_now and self._epoch_only(trainer):
            return
        # One lookup per step, without Lightning's .item() of every progress-bar metric
        logged = step_metrics(trainer, after_batch=deferred is not None)
        a = self._lookup(logged, self._keys[0])
        if a is None:
            return
        recorded: float | None = None
        b = None
        if self.kind == "paired":
            assert self._keys[1] is not None
            b = self._lookup(logged, self._keys[1])
            if b is None:
                return
        if self.phase == "train" and not read_now and self._not_logged_now(a, b):
            return
        if self.kind == "paired":
            values = _stack_scalars([a, b])
        else:
            recorded = self._baseline_at(step)
            if recorded is None:
                return
            values = _stack_scalars([a])
        if self._current is not None and not same_step:
            self._pending.append(self._current)
        self._current = (step, values, recorded)
        complete = deferred[2] if deferred is not None else _step_complete(trainer, pl_module)
        if complete:  # (the batch that ran the optimizer step: its logged loss is the step's)
            self._pending.append(self._current)
            self._current = None
        every = self.read_every
        if self._read_each:  # (crossing/delta is monitored: see setup)
            every = 1
        elif every is None:
            every = 1 if values.device.type == "cpu" else self._delta_every(trainer)
        if read_now or len(self._pending) >= every:
            self._flush()

    def _flush(self, current: bool = False) -> None:
        """Read the queued pairs back in one transfer and feed them to the detector in order;
        with ``current``, the latest step's entry too (its step is then closed)."""
        if current and self._current is not None:
            self._pending.append(self._current)
            self._current = None
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        assert self._host is not None
        trainer, pl_module = self._host
        try:
            rows = torch.stack([v for _, v, _ in pending]).cpu().tolist()
        except RuntimeError:  # mixed devices or dtypes across steps: one read each
            rows = [v.cpu().tolist() for _, v, _ in pending]
        for (step, _, recorded), row in zip(pending, rows, strict=True):
            self._feed(trainer, pl_module, step, row[0], row[1] if recorded is None else recorded)

    def _delta_every(self, trainer: pl.Trainer) -> int:
        if self.log_every_n_steps:
            return self.log_every_n_steps
        if self.kind == "recorded" and self.phase == "train":
            return 1  # its updates already come at the loggers' cadence
        if self.phase == "val":
            # one update per validation, already sparser than any logging cadence: counted in
            # log_every_n_steps updates, the delta chart had a point every 50 validations
            # (review, session 24)
            return 1
        return max(1, int(getattr(trainer, "log_every_n_steps", 50)))

    def _feed(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, a: float, b: float
    ) -> None:
        skipped = self.detector.n_nonfinite
        crossing = self.detector.update(step, a, b)
        if self.detector.n_nonfinite != skipped:  # non-finite loss: ignored by the detector
            return
        self._publish(trainer)
        metrics: dict[str, float] = {}
        if (self.detector.n_updates - 1) % self._delta_every(trainer) == 0 or crossing is not None:
            metrics[f"{self.prefix}/delta"] = self.detector.delta
        if crossing is not None:
            metrics[f"{self.prefix}/event"] = float(crossing.event)
        log_metrics(trainer, metrics, step=step)
        if crossing is not None:
            self._announce(trainer, pl_module, crossing)

    def _publish(self, trainer: pl.Trainer) -> None:
        """Put the current smoothed delta in ``trainer.callback_metrics`` (every rank), after
        every update as Lightning does for a metric logged on step whatever the loggers'
        cadence, so that ``EarlyStopping`` / ``ModelCheckpoint(monitor="crossing/delta")`` can
        use it: they said it was not available (review, session 28)."""
        delta = self.detector.delta
        if not np.isfinite(delta):
            return  # (before the first update)
        # Into the connector's dict itself where it has one: the callback_metrics property
        # calls .item() on every progress-bar metric, a device sync per metric.
        connector = getattr(trainer, "_logger_connector", None)
        target = getattr(connector, "_callback_metrics", None)
        if not isinstance(target, dict):
            target = trainer.callback_metrics
        target[f"{self.prefix}/delta"] = torch.tensor(float(delta))

    def _announce(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, crossing: Crossing
    ) -> None:
        text = (
            f"**{crossing.direction}** at step {crossing.step} (confirmed at step "
            f"{crossing.detected_step}): smoothed {self.monitor} model "
            f"{crossing.smoothed_a:.6g} vs baseline {crossing.smoothed_b:.6g}, "
            f"delta {crossing.delta:+.4g}"
        )
        for writer in tensorboard_writers(trainer):
            writer.add_text(self.prefix, text, global_step=crossing.detected_step)
        if self.on_crossing is not None:
            self.on_crossing(trainer, pl_module, crossing)
