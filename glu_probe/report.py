"""Summary table and report figure from the TensorBoard event files of a run.

Works on any run that used the glu-probe callbacks, with or without :class:`PairedModule`:

* :func:`load_run` finds every directory under ``run_dir`` that holds ``events.out.tfevents.*``
  files (a *sub-run*: e.g. ``runs/demo/vit/version_0``) and reads all its scalars and histograms
  with TensorBoard's own ``EventAccumulator`` (no sampling: ``size_guidance`` 0 keeps every event).
  A run resumed into the same folder writes a second event file, and the crashed run's events
  from the restart step on are orphans, dropped (with a warning naming the file and the step).
  Where the resumed run wrote TensorBoard's restart marker (a ``SessionLog.START`` event at
  its step) that step is exact, as in TensorBoard. Lightning and torch's ``SummaryWriter``
  write none, and the restart step is then taken to be the first training step of a later
  ``fit``'s file (written after the earlier one's last event): an orphan between the
  checkpoint's step and that first logged step (a crossing the crashed run confirmed there)
  is kept. Files of ``validate()``/``test()`` calls (one step) neither restart a run nor are
  dropped, and a file that would be dropped whole is kept, with a warning (the writers' clocks,
  which order the files, are then in doubt).
* :func:`summarize` turns each sub-run into table rows, one per trained network (``model`` and
  ``baseline`` of a paired run, or the single network of a plain run): the NTK condition number
  κ = λ_max/λ_min at the first and last probe, the loss-crossing steps, and the last logged
  train loss (the last logged batch; where it ended non-finite, the step from which; and the
  two sides' smoothed train losses at their last common step, the crossing detector's EMA),
  validation loss and the generalization gap: the
  ``GeneralizationGapMonitor``'s clean gap (validation minus a training subset, both evaluated in
  eval mode), which is not the difference of the two loss columns (the train column is one
  training batch in train mode); val − train of those columns only when no gap was logged.
* :func:`render_table` prints the rows with rich; :func:`plot_report` draws loss curves,
  condition-number curves and eigenvalue distributions (the ``ntk/.../log10_spectrum`` histograms
  at the first and last probe) with matplotlib's Agg backend.

Tag conventions read (the first one present wins): ``ntk/<side>/condition_number`` or
``ntk/condition_number``; ``<side>/train_loss`` (also ``_epoch``/``_step`` suffixes) or
``train_loss``; ``<side>/val_loss`` or ``val_loss``; ``gap/<side>/loss``, ``<side>/gap/loss`` or
``gap/loss``; ``crossing/event`` (one event per crossing, value +1 when the model overtakes the
baseline and -1 back). A ``pair.json`` file in a sub-run (written by ``glu-probe demo``) gives
display labels for ``model`` and ``baseline``.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._warnings import external_stacklevel

__all__ = [
    "HistogramSnapshot",
    "RunData",
    "Series",
    "SubRun",
    "aggregate_seeds",
    "crossing_steps",
    "figure_path",
    "format_seed_table",
    "load_run",
    "make_console",
    "plot_report",
    "render_table",
    "summarize",
]

_EVENT_FILE = re.compile(r"events\.out\.tfevents\.")
_VERSION = re.compile(r"version_\d+$")


@dataclass
class Series:
    """One scalar tag: ``steps`` and ``values`` (sorted by step; last write wins per step)."""

    steps: np.ndarray
    values: np.ndarray

    @property
    def last(self) -> float:
        """The value at the last step (``nan`` for an empty series)."""
        return float(self.values[-1]) if len(self.values) else math.nan

    @property
    def first(self) -> float:
        """The value at the first step (``nan`` for an empty series)."""
        return float(self.values[0]) if len(self.values) else math.nan

    @property
    def last_step(self) -> int | None:
        """The last step logged (``None`` for an empty series)."""
        return int(self.steps[-1]) if len(self.steps) else None

    @property
    def last_finite_step(self) -> int | None:
        """The last step with a finite value (``None`` when there is none)."""
        ok = np.flatnonzero(np.isfinite(self.values))
        return int(self.steps[ok[-1]]) if len(ok) else None

    @property
    def nonfinite_from(self) -> int | None:
        """The first step of the non-finite (NaN/inf) values the series ends with: where a
        network diverged for good; ``None`` when the last value is finite (or there is none)."""
        if not len(self.values) or math.isfinite(self.values[-1]):
            return None
        ok = np.flatnonzero(np.isfinite(self.values))
        return int(self.steps[ok[-1] + 1]) if len(ok) else int(self.steps[0])


@dataclass
class HistogramSnapshot:
    """One histogram event: bucket right edges ``limits`` and ``counts``, plus ``min``/``max``."""

    step: int
    limits: np.ndarray
    counts: np.ndarray
    min: float
    max: float
    num: float


@dataclass
class SubRun:
    """The events of one directory: ``scalars[tag]`` and ``histograms[tag]`` (sorted by step)."""

    name: str
    path: Path
    scalars: dict[str, Series] = field(default_factory=dict)
    histograms: dict[str, list[HistogramSnapshot]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    #: Tag prefix of each side of a paired run: ``PairedModule``'s ``model_prefix`` and
    #: ``baseline_prefix`` (``pair.json``, else found in the tags; default model / baseline).
    prefixes: dict[str, str] = field(default_factory=dict)
    #: Training steps done (``pair.json``'s ``steps_done``; ``None`` without one).
    steps_done: int | None = None
    #: Whether the warning that one side of the pair logged nothing was given (once a sub-run).
    warned_one_side: bool = field(default=False, repr=False)


@dataclass
class RunData:
    """All sub-runs found under ``root``, keyed by their display name."""

    root: Path
    subruns: dict[str, SubRun]


def _event_dirs(root: Path) -> list[Path]:
    """Directories holding event files, in the order their runs started (the creation time in
    the first event file's name, ``events.out.tfevents.<unix time>.<host>...``; then the path):
    the demo's own order (two-layer, ViT, GPT-2), not the alphabet's."""
    started: dict[Path, tuple[float, str]] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        stamps = []
        for f in filenames:
            if _EVENT_FILE.match(f):
                parts = f.split(".")
                stamps.append(float(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0.0)
        if stamps:
            started[Path(dirpath)] = (min(stamps), dirpath)
    return sorted(started, key=started.__getitem__)


def _display_names(root: Path, dirs: Sequence[Path]) -> dict[Path, str]:
    names: dict[Path, str] = {}
    for d in dirs:
        rel = d.relative_to(root).as_posix()
        parent = d.parent
        siblings = [x for x in dirs if x.parent == parent and _VERSION.match(x.name)]
        if _VERSION.match(d.name) and len(siblings) == 1:
            # (the root itself may be a version folder: its parent is outside the root, and
            # relative_to raised; review, session 22)
            inside = parent != root and parent.is_relative_to(root)
            rel = parent.relative_to(root).as_posix() if inside else d.name
        names[d] = "." if rel in ("", ".") else rel
    # Two folders under one name lost one of them without a word (a folder with event files
    # of its own and a lone version_0 child, a root named version_0 with a child version_0;
    # reviews, session 24): those keep their paths under the root.
    uses = Counter(names.values())
    for d in dirs:
        if uses[names[d]] > 1:
            rel = d.relative_to(root).as_posix()
            names[d] = "." if rel in ("", ".") else rel
    return names


#: Scalars that do not tell where a run (re)started: Lightning's ``TensorBoardLogger`` logs
#: ``hp_metric`` at step 0 in every run, a resumed one included.
_NOT_RESTART = {"hp_metric"}

#: Tags only a fit writes: a train loss or metric (``train_loss``, ``model/train_loss_step``,
#: ``train/acc``, ``gap/train/loss``) and the training-time monitors' series (loss crossings,
#: NTK probes).
_TRAIN_TAG = re.compile(r"(?:^|/)train[_/]|^(?:crossing|ntk)/")

#: Tags glu-probe's monitors log at the global step, without Lightning's ``epoch``.
_MONITOR_TAG = re.compile(r"^(?:crossing|ntk|gap)/")


@dataclass
class _EventFile:
    """The scalars and histograms of one event file ``name``: the wall time of its first event
    (``started``); the first and last wall times of its data other than :data:`_NOT_RESTART`
    (``nan`` where it holds none); its first training step (``first_step``; ``None`` where it
    has none) and whether it was written by a fit (``trains``, see :func:`_read_event_file`);
    and the steps of its TensorBoard restart markers (``restarts``: ``SessionLog.START``)."""

    name: str
    scalars: dict[str, list[tuple[int, float]]]
    histograms: dict[str, list[HistogramSnapshot]]
    started: float = math.inf
    first_wall: float = math.nan
    last_wall: float = math.nan
    first_step: int | None = None
    trains: bool = False
    restarts: list[int] = field(default_factory=list)


def _accumulator(path: Path) -> tuple[Any, list[tuple[int, float]]]:
    """TensorBoard's ``EventAccumulator`` for one file, keeping every event (``size_guidance``
    0; the default reservoir-samples long runs), and the ``(step, wall time)`` of the
    ``SessionLog.START`` events it met: the accumulator acts on them (it purges the file's own
    earlier events at or after that step) but does not hand them out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.proto import event_pb2

    starts: list[tuple[int, float]] = []

    class _Accumulator(EventAccumulator):
        def _ProcessEvent(self, event: Any) -> None:  # (TensorBoard's hook: every event)
            if (
                event.HasField("session_log")
                and event.session_log.status == event_pb2.SessionLog.START
            ):
                starts.append((int(event.step), float(event.wall_time)))
            super()._ProcessEvent(event)

    acc = _Accumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc, starts


def _read_event_file(path: Path) -> _EventFile:
    """One event file's events, and what tells whether it is a fit (re)started at a step.

    Lightning writes one event file per Trainer call (``validate``, ``fit``, ``test``: each
    opens the logger's writer anew). Every ``self.log`` it writes at the global step comes
    with an ``epoch`` scalar at that step; a ``validate``/``test`` call logs at one global step
    (its epoch-end values and ``epoch``), and its ``on_step=True`` values (``val_loss_step``)
    at its own batch index, not at a global step. So in a Lightning file (one with ``epoch``)
    the training steps are those of ``epoch``, of the monitors' own tags and of the
    histograms, and a file is a fit's where it has two or more of them or a tag only a fit
    writes (:data:`_TRAIN_TAG`; a fit that crashed after one log). Elsewhere (a plain
    ``SummaryWriter``) every step but :data:`_NOT_RESTART`'s counts."""
    acc, starts = _accumulator(path)
    tags = acc.Tags()
    out = _EventFile(name=path.name, scalars={}, histograms={})
    out.restarts = [step for step, _ in starts]
    walls = [wall for _, wall in starts]
    steps: list[int] = []
    for tag in tags.get("scalars", []):
        events = acc.Scalars(tag)
        out.scalars[tag] = [(int(ev.step), float(ev.value)) for ev in events]
        out.started = min([out.started] + [float(ev.wall_time) for ev in events])
        if tag not in _NOT_RESTART:
            walls += [float(ev.wall_time) for ev in events]
    for tag in tags.get("histograms", []):
        snaps = []
        for hev in acc.Histograms(tag):
            h = hev.histogram_value
            snaps.append(
                HistogramSnapshot(
                    step=int(hev.step),
                    limits=np.asarray(h.bucket_limit, dtype=np.float64),
                    counts=np.asarray(h.bucket, dtype=np.float64),
                    min=float(h.min),
                    max=float(h.max),
                    num=float(h.num),
                )
            )
            walls.append(float(hev.wall_time))
            steps.append(int(hev.step))
        out.histograms[tag] = snaps
    prefix = _lightning_prefix(out.scalars)
    lightning = prefix is not None

    def bare(tag: str) -> str:  # (a TensorBoardLogger(prefix="p") writes "p-epoch", ...)
        return tag[len(prefix) :] if prefix and tag.startswith(prefix) else tag

    for tag, pairs in out.scalars.items():
        name = bare(tag)
        if name not in _NOT_RESTART and (
            not lightning or name == "epoch" or _MONITOR_TAG.match(name)
        ):
            steps += [step for step, _ in pairs]
    if walls:
        out.first_wall, out.last_wall = min(walls), max(walls)
        out.started = min(out.started, out.first_wall)
    if steps:
        out.first_step = min(steps)
    names = {bare(t) for t in set(out.scalars) | set(out.histograms)}
    out.trains = len(set(steps)) >= 2 or any(_TRAIN_TAG.search(t) for t in names)
    return out


def _lightning_prefix(scalars: Mapping[str, Any]) -> str | None:
    """The tag prefix of a Lightning ``TensorBoardLogger`` file (``""``; ``"p-"`` for
    ``prefix="p"``, Lightning joining with ``-``), found from its ``epoch`` scalar; ``None``
    where the file has none (not Lightning's), or several candidates. A prefixed logger's file
    was read as a plain writer's, whose every step counts: its ``on_step`` validation values at
    batch indices 0, 1, ... made a resumed fit look restarted at 0 (third re-review, session
    29)."""
    if "epoch" in scalars:
        return ""
    found = {tag[: -len("epoch")] for tag in scalars if tag.endswith("-epoch")}
    return found.pop() if len(found) == 1 else None


def _restart_cutoffs(
    files: Sequence[_EventFile],
) -> tuple[list[float], list[tuple[str, int, int]]]:
    """For each file (in the order they were written), the step from which its events are
    orphans of a crashed run, and the files whose purge was refused as ``(file, its first
    step, the cutoff)``.

    * A ``SessionLog.START`` marker at step s in a later file is TensorBoard's own restart
      record: every event of an earlier file at step ≥ s is an orphan (EventAccumulator's
      ``_CheckForRestartAndMaybePurge``, across the files of a folder). Exact.
    * Without one, the restart step is never recorded (Lightning and torch's SummaryWriter
      write no marker), and the first training step of a later fit that began after this
      file's last event stands for it (a run resumed from an earlier checkpoint into the same
      folder). Only fits count, both ways: a ``validate()``/``test()`` call (one step) is no
      restart, and its values are no crashed run's (a validation at step 0 before ``fit`` was
      dropped as the fit started at 0; re-review, session 29). A later file that overlaps it in
      time is another writer of the same run, not a restart. The first logged step can trail
      the checkpoint's: an orphan between the two (a crossing the crashed run confirmed at 27,
      a resume from 25 that first logs at 29) is kept.
    * A guessed cutoff at or below the file's own first step would drop the whole file: the
      order of the files (the writers' clocks) is then what is in doubt (a resumed run on a
      host whose clock is behind sorts first), so nothing of it is dropped and the later
      writes win per step, as without the purge; the caller warns.
    """
    cutoffs: list[float] = []
    refused: list[tuple[str, int, int]] = []
    for i, f in enumerate(files):
        later = files[i + 1 :]
        marked = [s for g in later for s in g.restarts]
        guessed = [
            g.first_step
            for g in later
            if not g.restarts
            and g.trains
            and g.first_step is not None
            and g.first_wall >= f.last_wall
        ]
        if not f.trains or f.first_step is None:
            guessed = []
        elif guessed and min(guessed) <= f.first_step:
            refused.append((f.name, f.first_step, min(guessed)))
            guessed = []
        cutoffs.append(float(min(marked + guessed)) if marked or guessed else math.inf)
    return cutoffs, refused


def _read_dir(path: Path, name: str) -> SubRun:
    # One event file at a time: a run resumed into the same folder writes a new file from its
    # checkpoint's step on, and the crashed run's events at or after that step (a crossing it
    # confirmed, its κ probes) are orphans that no later write replaces. TensorBoard purges them
    # on a SessionLog START event (EventAccumulator's purge_orphaned_data) in the stream of the
    # folder's files; read one file at a time, the markers are applied here
    # (_restart_cutoffs), and so is a guess for runs that write none (torch's SummaryWriter
    # and Lightning write none). Files are ordered by their first event's wall time.
    files = sorted(
        (f for f in path.iterdir() if f.is_file() and _EVENT_FILE.match(f.name)),
        key=lambda f: f.name,
    )
    parsed = sorted(map(_read_event_file, files), key=lambda e: e.started)  # (stable: by name)
    cutoffs, refused = _restart_cutoffs(parsed)
    sub = SubRun(name=name, path=path)
    by_step: dict[str, dict[int, float]] = {}
    hist_by_step: dict[str, dict[int, HistogramSnapshot]] = {}
    purged: list[str] = []
    for event_file, cutoff in zip(parsed, cutoffs, strict=True):
        dropped = 0
        for tag, pairs in event_file.scalars.items():
            kept = by_step.setdefault(tag, {})
            for step, value in pairs:
                if step < cutoff:
                    kept[step] = value  # a rewritten step (resume) keeps the last
                else:
                    dropped += 1
        for tag, snaps in event_file.histograms.items():
            hkept = hist_by_step.setdefault(tag, {})
            for snap in snaps:
                if snap.step < cutoff:
                    hkept[snap.step] = snap
                else:
                    dropped += 1
        if dropped:
            total = sum(map(len, event_file.scalars.values())) + sum(
                map(len, event_file.histograms.values())
            )
            purged.append(
                f"{event_file.name}: {dropped} of {total} events at step >= {int(cutoff)}"
            )
    # Never silently: a purge hides data, and a wrong one (a misread restart) hides real data.
    if purged:
        warnings.warn(
            f"report: sub-run {name!r} holds the events of a run that was resumed into the "
            "same folder; the crashed run's events from the restart step on are dropped as "
            "orphans (" + "; ".join(purged) + ")",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
    if refused:
        shown = "; ".join(f"{n} (first step {s}, restart at {c})" for n, s, c in refused)
        warnings.warn(
            f"report: sub-run {name!r}: a later event file restarts at or before the first "
            f"step of an earlier one, which would drop that file whole: {shown}. The files' "
            "order (their writers' clocks) is in doubt, so none of it is dropped, and where two "
            "files log the same step the one whose events start later wins",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
    # (a tag whose every event was an orphan is not there: it would count as logged)
    for tag, kept in by_step.items():
        if kept:
            steps = np.array(sorted(kept), dtype=np.int64)
            values = np.array([kept[s] for s in steps], dtype=np.float64)
            sub.scalars[tag] = Series(steps, values)
    for tag, hkept in hist_by_step.items():
        if hkept:
            sub.histograms[tag] = [hkept[s] for s in sorted(hkept)]
    _strip_logger_prefix(sub)
    meta = path / "pair.json"
    if not meta.is_file():
        meta = path.parent / "pair.json"
    if meta.is_file():
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            sub.labels = {str(k): str(v) for k, v in data.get("labels", {}).items()}
            for side in ("model", "baseline"):
                if isinstance(data.get(f"{side}_prefix"), str):
                    sub.prefixes[side] = data[f"{side}_prefix"]
            done = data.get("steps_done")
            if isinstance(done, int) and not isinstance(done, bool) and done >= 0:
                sub.steps_done = done
        except (OSError, ValueError):
            sub.labels = {}
    return sub


def _strip_logger_prefix(sub: SubRun) -> None:
    """Drop a ``TensorBoardLogger(prefix="p")``'s ``p-`` from the sub-run's tags where every tag
    has it (``hp_metric`` aside): the summary looks tags up by their logged names
    (``model/train_loss``, ``ntk/...``), and a prefixed run's read as all ``nan`` with no word
    (third re-review, session 29). A folder mixing prefixed and other tags is left as it is."""
    prefix = _lightning_prefix(sub.scalars)
    if not prefix:
        return
    tags = [t for t in [*sub.scalars, *sub.histograms] if t not in _NOT_RESTART]
    if not all(t.startswith(prefix) for t in tags):
        return
    sub.scalars = {
        (t[len(prefix) :] if t.startswith(prefix) else t): v for t, v in sub.scalars.items()
    }
    sub.histograms = {
        (t[len(prefix) :] if t.startswith(prefix) else t): v for t, v in sub.histograms.items()
    }


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read every TensorBoard sub-run under ``run_dir``.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no event files.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist")
    dirs = _event_dirs(root)
    if not dirs:
        raise FileNotFoundError(
            f"no TensorBoard event files (events.out.tfevents.*) under {str(root)!r}; "
            "point at the folder a TensorBoardLogger wrote (e.g. runs/<run>)"
        )
    names = _display_names(root, dirs)
    return RunData(root=root, subruns={names[d]: _read_dir(d, names[d]) for d in dirs})


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


#: First tag components that are not a paired run's side (the monitors' own namespaces).
_NOT_SIDES = {"ntk", "gap", "crossing", "hp_metric", "epoch"}


def _side_prefix(sub: SubRun, side: str) -> str:
    """The tag prefix of ``side`` (``"model"``/``"baseline"``; ``""`` for an unpaired run)."""
    return sub.prefixes.get(side, side)


def _sides(sub: SubRun) -> list[str]:
    """``["model", "baseline"]`` for a paired sub-run (their tag prefixes in ``sub.prefixes``),
    ``[""]`` otherwise. Custom ``PairedModule`` prefixes come from ``pair.json``; without it two
    prefixes that both log a loss or a condition number are taken in alphabetical order, with a
    warning (crossing directions assume the first is the GLU model)."""
    tags = set(sub.scalars) | set(sub.histograms)

    def present(prefix: str) -> bool:
        # a side's own loss or its NTK monitor's series, not any tag under the prefix: an
        # unpaired run that logs "model/grad_norm" lost all its values to a one-sided "pair"
        # (review, session 22)
        side = re.compile(rf"{re.escape(prefix)}/(train|val)_loss(_step|_epoch)?")
        return any(side.fullmatch(t) for t in tags) or f"ntk/{prefix}/condition_number" in tags

    prefixes = [_side_prefix(sub, s) for s in ("model", "baseline")]
    if sub.prefixes and not any(present(p) for p in prefixes):
        # pair.json's prefixes name nothing logged (a renamed prefix, a pair.json copied from
        # another run): it showed as one "(single) nan" row without a word (re-review, session
        # 29). The tags are read as without its prefixes; its labels still name the sides.
        warnings.warn(
            f"report: sub-run {sub.name!r}: pair.json names the prefixes {prefixes}, but no "
            "loss or condition number is logged under either (e.g. "
            f"{prefixes[0]}/train_loss, ntk/{prefixes[0]}/condition_number); its prefixes "
            "are ignored and the sides found in the tags, as without a pair.json",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
        sub.prefixes = {}
        prefixes = [_side_prefix(sub, s) for s in ("model", "baseline")]
    if all(present(p) for p in prefixes) or (
        not sub.prefixes and any(present(p) for p in prefixes)
    ):
        return [s for s, p in zip(("model", "baseline"), prefixes, strict=True) if present(p)]
    if sub.prefixes and any(present(p) for p in prefixes):
        # pair.json names both sides but one logged nothing (a crash, a changed prefix): the
        # other is reported, as without pair.json; it showed as one "(single)" row of "-"
        # (review, session 29)
        kept = [s for s, p in zip(("model", "baseline"), prefixes, strict=True) if present(p)]
        if not sub.warned_one_side:
            sub.warned_one_side = True
            lost = next(p for p in prefixes if not present(p))
            warnings.warn(
                f"report: sub-run {sub.name!r} is a pair (pair.json) but logs no {lost!r} "
                f"losses or condition number ({lost}/train_loss, ntk/{lost}/...); only the "
                f"{_side_prefix(sub, kept[0])!r} side is reported",
                UserWarning,
                stacklevel=external_stacklevel(),
            )
        return kept
    # A paired run's sides each log <prefix>/train_loss, and the paired monitors name them
    # (crossing/*, gap/<prefix>/..., ntk/<prefix>/...): two task heads or two NTK monitors
    # with prefixes of their own do not make a pair.
    losses = {
        t.split("/")[0]
        for t in tags
        if re.fullmatch(r"[^/]+/train_loss(_step|_epoch)?", t) and t.split("/")[0] not in _NOT_SIDES
    }
    paired_monitors = any(t.startswith("crossing/") for t in tags)
    found = sorted(
        p
        for p in losses
        if paired_monitors or any(t.startswith((f"gap/{p}/", f"ntk/{p}/")) for t in tags)
    )
    if len(found) == 2 and not sub.prefixes:
        warnings.warn(
            f"report: sub-run {sub.name!r} logs the paired prefixes {found} and no pair.json "
            f"names them; {found[0]!r} is taken as the model (GLU) side, so crossing arrows "
            "assume that. Write model_prefix / baseline_prefix into its pair.json to fix the "
            "order",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
        sub.prefixes = {"model": found[0], "baseline": found[1]}
        return ["model", "baseline"]
    return [""]


def _pick(sub: SubRun, candidates: Sequence[str]) -> Series | None:
    for tag in candidates:
        if tag in sub.scalars and len(sub.scalars[tag].values):
            return sub.scalars[tag]
    return None


def _loss_candidates(side: str, kind: str) -> list[str]:
    base = f"{side}/{kind}_loss" if side else f"{kind}_loss"
    if kind == "train":
        # per step before per epoch: on the training-step axis, the grid crossings are read on
        return [base, f"{base}_step", f"{base}_epoch"]
    # validation: the epoch mean (a "_step" tag counts validation batches, not training steps)
    return [base, f"{base}_epoch", f"{base}_step"]


def _kappa_tag(side: str) -> list[str]:
    return [f"ntk/{side}/condition_number"] if side else ["ntk/condition_number"]


def _gap_tags(side: str) -> list[str]:
    return [f"gap/{side}/loss", f"{side}/gap/loss"] if side else ["gap/loss"]


def crossing_steps(sub: SubRun) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(estimated, detected)`` loss crossings of a paired sub-run, as ``(step, direction)``.

    ``direction`` is +1 when the model overtakes the baseline, -1 back. ``detected`` are the
    ``crossing/event`` markers of a :class:`~glu_probe.callbacks.LossCrossingMonitor` (logged at
    the step the crossing was *confirmed*, after its smoothing and patience). ``estimated`` are
    the crossing steps themselves (the step from which the smoothed difference kept the new sign
    until the crossing was confirmed: its last zero-crossing before confirmation, which trails
    the first one where near-tied noisy curves swap the lead back and forth before it):
    :func:`glu_probe.crossing.find_crossings`, the monitor's detector run offline with its default
    parameters, on the logged ``model/`` and ``baseline/`` train losses; when those are not both
    logged, the detection steps are used.
    """
    series = sub.scalars.get("crossing/event")
    detected: list[tuple[int, float]] = []
    if series is not None:
        pairs = zip(series.steps, series.values, strict=True)
        detected = [(int(s), float(v)) for s, v in pairs if v != 0]
    if _sides(sub) != ["model", "baseline"]:
        return list(detected), detected
    a = _pick(sub, _loss_candidates(_side_prefix(sub, "model"), "train"))
    b = _pick(sub, _loss_candidates(_side_prefix(sub, "baseline"), "train"))
    if a is None or b is None:
        return list(detected), detected
    from glu_probe.crossing import find_crossings

    ok_a, ok_b = np.isfinite(a.values), np.isfinite(b.values)
    # fewer than two finite points on a side (a short run, or a loss that is NaN/inf throughout):
    # no crossing here; the length was checked before the filter, and a side with no finite loss
    # raised "series a is empty" (review, session 25)
    if int(ok_a.sum()) < 2 or int(ok_b.sum()) < 2:
        return list(detected), detected
    with warnings.catch_warnings():
        # a short run simply has no crossing here (the table says "none")
        warnings.filterwarnings("ignore", message="find_crossings: only", category=UserWarning)
        found = find_crossings(a.steps[ok_a], a.values[ok_a], b.steps[ok_b], b.values[ok_b])
    return [(int(c.step), float(c.event)) for c in found], detected


def _smoothed_at_common_step(a: Series, b: Series) -> tuple[int, float, float] | None:
    """``(step, â, b̂)``: the smoothed train losses of model ``a`` and baseline ``b`` at the last
    step both have, as the crossing detector holds them there (``None`` without a common step).

    The values are those of :func:`crossing_steps`' detector: each side's finite losses, ``b``
    interpolated onto ``a``'s steps within ``b``'s step range (as
    :func:`~glu_probe.crossing.find_crossings` does), fed to a
    :class:`~glu_probe.crossing.CrossingDetector` with its default (and ``find_crossings``')
    smoothing, β = 0.9; so which side is lower agrees with the sign the crossings track.
    """
    from glu_probe.crossing import CrossingDetector

    ok_a, ok_b = np.isfinite(a.values), np.isfinite(b.values)
    sa, va, sb, vb = a.steps[ok_a], a.values[ok_a], b.steps[ok_b], b.values[ok_b]
    if not len(sa) or not len(sb):
        return None
    inside = (sa >= sb[0]) & (sa <= sb[-1])
    if not inside.any():
        return None
    detector = CrossingDetector()  # (its own EMA, not a copy of it)
    on_a = np.interp(sa[inside], sb, vb)
    for step, x, y in zip(sa[inside].tolist(), va[inside].tolist(), on_a.tolist(), strict=True):
        detector.update(int(step), x, y)
    assert detector.last_step is not None  # (one update at least)
    return detector.last_step, detector.smoothed_a, detector.smoothed_b


def summarize(run: RunData) -> list[dict[str, Any]]:
    """One row per trained network of every sub-run.

    Keys: ``run``, ``side`` (``model``/``baseline``/``""``), ``label``, ``kappa_init``,
    ``kappa_end`` (condition number at the first and last probe), ``steps`` (last logged step),
    ``train_loss`` (the last logged value, one minibatch), ``val_loss``, ``gap`` (last logged gap;
    val − train from the losses when no gap tag exists), ``crossings`` (list of
    ``(step, direction)``; on every row of a paired sub-run), and of the train loss:
    ``train_step`` (its last logged step), ``train_finite_step`` (its last step with a finite
    value), ``diverged_step`` (the first step of the non-finite values it ends with, ``None``
    when it ends finite; see :attr:`Series.nonfinite_from`), and on both rows of a pair
    ``compare_step`` and ``train_smoothed``: the last step both sides' finite train losses have
    and each side's smoothed loss there (the crossing detector's EMA, β = 0.9; see
    :func:`_smoothed_at_common_step`), which is how the two should be compared (``None`` and
    ``nan`` elsewhere). Missing values are ``nan``.
    """
    rows: list[dict[str, Any]] = []
    for name, sub in run.subruns.items():
        crossings, detected = crossing_steps(sub)
        sides = _sides(sub)
        smoothed: dict[str, float] = {}
        compare_step = None
        if sides == ["model", "baseline"]:
            a = _pick(sub, _loss_candidates(_side_prefix(sub, "model"), "train"))
            b = _pick(sub, _loss_candidates(_side_prefix(sub, "baseline"), "train"))
            common = _smoothed_at_common_step(a, b) if a is not None and b is not None else None
            if common is not None:
                compare_step, smoothed["model"], smoothed["baseline"] = common
        for side in sides:
            prefix = _side_prefix(sub, side)
            kappa = _pick(sub, _kappa_tag(prefix))
            train = _pick(sub, _loss_candidates(prefix, "train"))
            val = _pick(sub, _loss_candidates(prefix, "val"))
            gap_series = _pick(sub, _gap_tags(prefix))
            gap = gap_series.last if gap_series is not None else math.nan
            if gap_series is None and train is not None and val is not None:
                gap = val.last - train.last
            # the steps done where pair.json says (a pair cut by --max-minutes showed its last
            # logged step, one less, beside a note giving the steps done: review, session 26)
            last_steps = [s.steps[-1] for s in (train, val, kappa) if s is not None]
            if sub.steps_done is not None:
                last_steps = [sub.steps_done]
            rows.append(
                {
                    "run": name,
                    "side": side,
                    "label": sub.labels.get(side, prefix or "(single)"),
                    "kappa_init": kappa.first if kappa is not None else math.nan,
                    "kappa_end": kappa.last if kappa is not None else math.nan,
                    "steps": int(max(last_steps)) if last_steps else 0,
                    "train_loss": train.last if train is not None else math.nan,
                    "val_loss": val.last if val is not None else math.nan,
                    "gap": gap,
                    "crossings": crossings,
                    "crossings_detected": detected,
                    "train_step": train.last_step if train is not None else None,
                    "train_finite_step": train.last_finite_step if train is not None else None,
                    "diverged_step": train.nonfinite_from if train is not None else None,
                    "compare_step": compare_step,
                    "train_smoothed": smoothed.get(side, math.nan),
                }
            )
    return rows


def _fmt(x: Any, spec: str = ".4g") -> str:
    if isinstance(x, float) and x == math.inf:
        return "inf"  # (κ of a numerically singular K)
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _fmt_train(row: dict[str, Any]) -> str:
    """The last train loss; where the loss ended non-finite, from which step (it read "-")."""
    diverged = row.get("diverged_step")
    return f"non-finite from {diverged}" if diverged is not None else _fmt(row["train_loss"])


def _fmt_crossings(
    crossings: Sequence[tuple[int, float]], detected: Sequence[tuple[int, float]] = ()
) -> str:
    if not crossings and detected:  # the curves show none the detector confirmed: say so
        parts = [f"{s}{'↑' if d > 0 else '↓'}" for s, d in detected[:4]]
        more = " …" if len(detected) > 4 else ""
        return "confirmed " + ", ".join(parts) + more + " (none on the logged curves)"
    if not crossings:
        return "none"
    if list(crossings) == list(detected):  # no loss curves to estimate from: markers only
        parts = [f"{s}{'↑' if d > 0 else '↓'}" for s, d in detected[:4]]
        return "confirmed " + ", ".join(parts) + (" …" if len(detected) > 4 else "")
    parts = [f"{s}{'↑' if d > 0 else '↓'}" for s, d in crossings[:4]]
    text = ", ".join(parts) + (" …" if len(crossings) > 4 else "")
    if detected:
        more = " …" if len(detected) > 4 else ""
        text += " (confirmed " + ", ".join(str(s) for s, _ in detected[:4]) + more + ")"
    return text


def render_table(rows: Sequence[dict[str, Any]], title: str = "glu-probe summary") -> Any:
    """A ``rich.table.Table`` of :func:`summarize` rows (print it with ``rich.print``).

    Crossing steps (estimated, see :func:`crossing_steps`) carry an arrow: ↑ the GLU model
    overtakes the baseline, ↓ the baseline takes the lead back; the monitor's confirmation steps
    follow in parentheses.
    """
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col, justify in (
        ("run", "left"),
        ("network", "left"),
        ("κ init", "right"),
        ("κ end", "right"),
        ("crossing step(s)", "left"),
        ("train loss", "right"),
        ("val loss", "right"),
        ("gap (clean)", "right"),
        ("steps", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    previous = None
    for row in rows:
        first = row["run"] != previous
        previous = row["run"]
        table.add_row(
            row["run"] if first else "",
            str(row["label"]),
            _fmt(row["kappa_init"], ".3g"),
            _fmt(row["kappa_end"], ".3g"),
            _fmt_crossings(row["crossings"], row.get("crossings_detected", [])) if first else "",
            _fmt_train(row),
            _fmt(row["val_loss"]),
            _fmt(row["gap"], "+.4g"),
            str(row["steps"]),
        )
    return table


# --------------------------------------------------------------------------------------------
# figure
# --------------------------------------------------------------------------------------------


def _spectrum_tag(sub: SubRun, side: str) -> str | None:
    prefix = f"ntk/{side}/" if side else "ntk/"
    for name in ("log10_spectrum", "spectrum"):
        if prefix + name in sub.histograms and sub.histograms[prefix + name]:
            return prefix + name
    return None


def _plot_histogram(ax: Any, snap: HistogramSnapshot, label: str, color: str, ls: str) -> None:
    # TensorBoard buckets are given by right edges; the first left edge is the minimum.
    if snap.num <= 0 or len(snap.limits) == 0:
        return
    limits = np.clip(snap.limits, snap.min, snap.max)
    left = np.concatenate([[snap.min], limits[:-1]])
    mids = 0.5 * (left + limits)
    ax.step(mids, snap.counts / max(snap.num, 1.0), where="mid", color=color, ls=ls, label=label)


def _ema(values: np.ndarray, beta: float = 0.9) -> np.ndarray:
    # Debiased exponential moving average, the same smoothing as glu_probe.crossing's detector.
    out = np.empty(len(values))
    m = 0.0
    for k, v in enumerate(values, start=1):
        m = beta * m + (1.0 - beta) * float(v)
        out[k - 1] = m / (1.0 - beta**k)
    return out


def figure_path(path: str | os.PathLike[str]) -> Path:
    """The file :func:`plot_report` writes for ``path``: ``path`` itself, with ``.png`` added
    where it has no suffix (matplotlib adds it; the path returned and printed before was the
    one asked for, a file that did not exist; review, session 24).

    Raises:
        ValueError: a suffix matplotlib cannot write (``.txt``): checked before any work (it
            failed after the table was printed, with matplotlib's traceback).
    """
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(path)
    if not out.suffix:
        return out.with_name(out.name + ".png")
    kinds = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in kinds:
        raise ValueError(
            f"{str(out)!r}: matplotlib cannot write {out.suffix!r} files; use one of "
            + ", ".join(f".{k}" for k in sorted(kinds))
        )
    return out


def plot_report(run: RunData, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Write the report figure and return its path (:func:`figure_path`: PNG where ``path``
    has no suffix, else the format its suffix names).

    One row of three panels per sub-run: (1) train loss (faint: raw; solid: debiased EMA with
    β = 0.9, the crossing detector's smoothing) and validation loss (dashed) of each network
    against the step, with vertical lines at the logged crossings; (2) the NTK condition
    number κ (log scale); (3) the distribution of log10 NTK eigenvalues at the first (dashed) and
    last (solid) probe, from the monitors' histograms.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not run.subruns:
        raise ValueError("the run has no sub-runs to plot")
    out = figure_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(run.subruns)
    fig, axes = plt.subplots(n, 3, figsize=(15, 3.6 * n), squeeze=False)
    colors = {"model": "tab:red", "baseline": "tab:blue", "": "tab:green"}
    for i, (name, sub) in enumerate(run.subruns.items()):
        ax_loss, ax_kappa, ax_spec = axes[i]
        for side in _sides(sub):
            prefix = _side_prefix(sub, side)
            label = sub.labels.get(side, prefix or name)
            c = colors.get(side, "tab:gray")
            train = _pick(sub, _loss_candidates(prefix, "train"))
            val = _pick(sub, _loss_candidates(prefix, "val"))
            if train is not None:
                ax_loss.plot(train.steps, train.values, color=c, lw=0.6, alpha=0.25)
                ax_loss.plot(
                    train.steps, _ema(train.values), color=c, lw=1.4, label=f"{label} train (EMA)"
                )
            if val is not None:
                ax_loss.plot(
                    val.steps, val.values, color=c, ls="--", marker=".", label=f"{label} val"
                )
            kappa = _pick(sub, _kappa_tag(prefix))
            if kappa is not None:
                ax_kappa.plot(kappa.steps, kappa.values, color=c, marker=".", label=label)
            tag = _spectrum_tag(sub, prefix)
            if tag is not None:
                snaps = sub.histograms[tag]
                _plot_histogram(ax_spec, snaps[0], f"{label} step {snaps[0].step}", c, "--")
                if len(snaps) > 1:
                    _plot_histogram(ax_spec, snaps[-1], f"{label} step {snaps[-1].step}", c, "-")
                ax_spec.set_xlabel("log10 eigenvalue" if "log10" in tag else "eigenvalue")
        for step, direction in crossing_steps(sub)[0]:
            ax_loss.axvline(step, color="k" if direction > 0 else "0.6", lw=0.8, ls=":")
        ax_loss.set_title(f"{name}: loss (dotted lines: crossings)")
        ax_loss.set_xlabel("step")
        ax_loss.set_yscale("log")
        ax_kappa.set_title(f"{name}: NTK condition number κ")
        ax_kappa.set_xlabel("step")
        ax_kappa.set_yscale("log")
        ax_spec.set_title(f"{name}: NTK eigenvalue distribution")
        ax_spec.set_ylabel("fraction")
        for ax in (ax_loss, ax_kappa, ax_spec):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------------------------
# several seeds
# --------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    arr = np.asarray(finite)
    # one value has no sample std (ddof=1 divides by 0): undefined, not 0 ("164 ± 0" read as a
    # spread of zero over seeds; review, session 29)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
    if len(arr) > 1 and bool(np.all(arr == arr[0])):
        # identical seeds: the value itself, spread exactly 0 (the float64 mean of three 0.1s
        # is 0.10000000000000002 with a round-off std of 1.7e-17, which the table printed to
        # 18 decimals)
        return float(arr[0]), 0.0, len(arr)
    return float(arr.mean()), std, len(arr)


def aggregate_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± standard deviation over seeds of :func:`summarize` rows, per network.

    Rows are grouped by ``side`` (``model``/``baseline``/``""``); each group is one network
    trained with different seeds. For ``kappa_init``, ``kappa_end``, ``train_loss``,
    ``val_loss`` and ``gap`` the result holds ``<key>_mean``, ``<key>_std`` (sample standard
    deviation, ``ddof=1``; ``nan`` for one finite value, where it is undefined) over the finite
    values, and ``<key>_n``, how many
    seeds were finite (:func:`format_seed_table` shows "(2/3 finite)" where some were not).
    ``crossing`` is the first step at which the model overtakes the baseline (estimated, see
    :func:`crossing_steps`), averaged over the seeds that have one; ``seeds_with_crossing``
    counts them out of ``n_seeds``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["side"], []).append(r)
    out = []
    for side, group in groups.items():
        agg: dict[str, Any] = {"side": side, "label": group[0]["label"], "n_seeds": len(group)}
        for key in ("kappa_init", "kappa_end", "train_loss", "val_loss", "gap"):
            mean, std, n_finite = _mean_std([r[key] for r in group])
            agg[f"{key}_mean"], agg[f"{key}_std"] = mean, std
            agg[f"{key}_n"] = n_finite
        firsts = [next((s for s, d in r["crossings"] if d > 0), None) for r in group]
        steps = [float(s) for s in firsts if s is not None]
        mean, std, n = _mean_std(steps)
        agg.update(crossing_mean=mean, crossing_std=std, seeds_with_crossing=n)
        out.append(agg)
    return out


def format_seed_table(agg: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`aggregate_seeds` rows (mean ± std over seeds; the mean alone
    where one seed gave a value, e.g. "164 (1/3 seeds)": no std is defined)."""

    def mean_std(mean: float, std: float, spec: str) -> str:
        """``mean ± std``, both to the decimal of the std's second significant digit (2.311 ±
        0.0099 reads as 2.311 ± 0.0099, not 2.311 ± 0.009932); ``spec`` where std is 0, and
        the mean alone where it is undefined (``nan``: a single value)."""
        sign = "+" if spec.startswith("+") else ""
        if math.isnan(std):
            return f"{mean:{spec}}"
        if not (math.isfinite(std) and std > 0):
            return f"{mean:{spec}} ± 0"
        if abs(mean) >= 1e5 or 0 < abs(mean) < 1e-3:  # κ-sized or tiny: scientific
            digits = max(0, math.floor(math.log10(abs(mean))) - math.floor(math.log10(std)) + 1)
            return f"{mean:{sign}.{digits}e} ± {std:.1e}"
        d = max(0, 1 - math.floor(math.log10(std)))
        return f"{mean:{sign}.{d}f} ± {std:.{d}f}"

    def pm(row: dict[str, Any], key: str, spec: str = ".4g") -> str:
        """:func:`mean_std` of ``key``, "-" where no seed was finite, and how many were where
        some were not (a diverged or infinite seed)."""
        mean = row[f"{key}_mean"]
        if not math.isfinite(mean):
            return "-"
        text = mean_std(mean, row[f"{key}_std"], spec)
        n_finite = row.get(f"{key}_n", row["n_seeds"])
        if n_finite < row["n_seeds"] and key != "crossing":
            text += f" ({n_finite}/{row['n_seeds']} finite)"
        return text

    lines = [
        "| network | seeds | κ init | κ end | first crossing step (GLU overtakes) "
        "| train loss | val loss | clean gap (val − train subset, eval mode) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in agg:
        crossing = (
            f"{pm(r, 'crossing', '.0f')} ({r['seeds_with_crossing']}/{r['n_seeds']} seeds)"
            if r["side"] == "model"
            else ""
        )
        lines.append(
            f"| {r['label']} | {r['n_seeds']} | {pm(r, 'kappa_init', '.3g')} | "
            f"{pm(r, 'kappa_end', '.3g')} | {crossing} | {pm(r, 'train_loss')} | "
            f"{pm(r, 'val_loss')} | {pm(r, 'gap', '+.4f')} |"
        )
    return "\n".join(lines)


def make_console(width: int = 150) -> Any:
    """A ``rich.console.Console``; ``width`` columns when output is not a terminal (rich's
    fallback of 80 columns is too narrow for the summary table)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=width)
