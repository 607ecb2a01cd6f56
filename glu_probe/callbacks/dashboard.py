"""TensorBoard dashboard: model and baseline on the same charts (custom-scalars layout).

TensorBoard's *Custom Scalars* plugin draws one chart per entry of a layout; a ``Multiline``
chart overlays every scalar tag matching any of its regular expressions. The default layout
(category ``"glu-probe: model vs baseline"``) has the charts

==========================  ===============================================================
chart                       tags (for the default prefixes ``model`` / ``baseline``)
==========================  ===============================================================
train loss                  ``model/train_loss``, ``baseline/train_loss`` (and ``train_loss``
                            of an unpaired run)
val loss                    ``model/val_loss``, ``baseline/val_loss`` (and ``val_loss``;
                            with several loaders ``.../val_loss/dataloader_idx_k``)
NTK condition number        ``ntk/model/condition_number``, ``ntk/baseline/condition_number``
                            (and ``ntk/condition_number`` of an unpaired run)
NTK condition number        the same tags' ``log10_condition_number`` (κ spans decades)
(log10)
generalization gap          ``gap/model/loss``, ``gap/baseline/loss`` (and ``gap/loss``)
loss crossing               ``crossing/delta``, ``crossing/event``
==========================  ===============================================================

so every metric that :class:`PairedModule`, :class:`NTKSpectrumMonitor`,
:class:`GeneralizationGapMonitor` and :class:`LossCrossingMonitor` log lands next to its
counterpart. ``pairs=`` adds charts or replaces default ones (same title) with explicit tags.

Charts of the NTK, gap and crossing series match the prefixes of the Trainer's monitors (their
``prefix=``), so several monitors of one kind share a chart. A ``TensorBoardLogger(prefix=...)``
writes every tag as ``<prefix>-<tag>``: its layout's patterns carry that prefix too.

The layout is a run-level setting: it is written once per writer (a second call on the same
writer does nothing) and only on rank zero; a run resumed into the same log directory writes it
again, which TensorBoard reads as one layout.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from glu_probe.callbacks._utils import (
    check_bool,
    check_name,
    is_quiet_run,
    tensorboard_targets,
)

__all__ = ["DEFAULT_CATEGORY", "TensorBoardDashboard", "default_layout", "write_dashboard_layout"]

DEFAULT_CATEGORY = "glu-probe: model vs baseline"
Layout = dict[str, dict[str, list[Any]]]

# Writers that already hold a layout; the layout is a once-per-run setting.
_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()


def default_layout(
    model_prefix: str = "model",
    baseline_prefix: str = "baseline",
    *,
    ntk_prefixes: Sequence[str] = ("ntk",),
    gap_prefixes: Sequence[str] = ("gap",),
    crossing_prefixes: Sequence[str] = ("crossing",),
) -> Layout:
    """The default custom-scalars layout (see the module docstring). ``*_prefixes``: the tag
    prefixes of the monitors whose series the charts draw (several monitors of one kind, with
    their own ``prefix=``, share a chart)."""
    m, b = re.escape(model_prefix), re.escape(baseline_prefix)
    both = f"({m}|{b})"

    def any_of(prefixes: Sequence[str]) -> str:
        if isinstance(prefixes, str):  # one prefix, not its characters
            prefixes = [prefixes]
        return "(" + "|".join(re.escape(p) for p in dict.fromkeys(prefixes)) + ")"

    ntk, gap, cross = any_of(ntk_prefixes), any_of(gap_prefixes), any_of(crossing_prefixes)
    return {
        DEFAULT_CATEGORY: {
            "train loss": ["Multiline", [f"^({both}/)?train_loss$"]],
            # (several validation loaders: Lightning's /dataloader_idx_k suffix; the chart was
            # empty with two; review, session 24)
            "val loss": ["Multiline", [f"^({both}/)?val_loss(/dataloader_idx_\\d+)?$"]],
            "NTK condition number": [
                "Multiline",
                [f"^{ntk}/({both}/)?condition_number$"],
            ],
            "NTK condition number (log10)": [
                "Multiline",
                [f"^{ntk}/({both}/)?log10_condition_number$"],
            ],
            "generalization gap": ["Multiline", [f"^{gap}/({both}/)?loss$"]],
            "loss crossing": ["Multiline", [f"^{cross}/delta$", f"^{cross}/event$"]],
        }
    }


def _build_layout(
    charts: Mapping[str, Sequence[str]] | None,
    model_prefix: str,
    baseline_prefix: str,
    include_defaults: bool,
    monitor_prefixes: Mapping[str, Sequence[str]] | None = None,
) -> Layout:
    layout = (
        default_layout(model_prefix, baseline_prefix, **(monitor_prefixes or {}))
        if include_defaults
        else {}
    )
    if charts:
        category = layout.setdefault(DEFAULT_CATEGORY, {})
        for title, tags in charts.items():
            if isinstance(tags, str) or not isinstance(tags, Sequence) or not tags:
                raise MisconfigurationException(
                    f"dashboard chart {title!r}: give a non-empty list of scalar tags, got {tags!r}"
                )
            category[str(title)] = ["Multiline", [f"^{re.escape(str(t))}$" for t in tags]]
    if not layout or not any(layout.values()):
        raise MisconfigurationException("the dashboard layout is empty: no charts to write")
    return layout


def write_dashboard_layout(
    writer_or_trainer: Any,
    *,
    pairs: Mapping[str, Sequence[str]] | None = None,
    model_prefix: str = "model",
    baseline_prefix: str = "baseline",
    include_defaults: bool = True,
    monitor_prefixes: Mapping[str, Sequence[str]] | None = None,
) -> Layout:
    """Write the custom-scalars layout to a ``SummaryWriter`` or to each TensorBoard logger.

    Args:
        writer_or_trainer: a ``SummaryWriter`` (anything with ``add_custom_scalars``) or a
            ``Trainer`` (its TensorBoardLoggers' writers, rank zero only; none: nothing written).
        pairs: extra charts ``{title: [tag, tag, ...]}`` of exact scalar tags drawn together,
            e.g. ``{"accuracy": ["model/val_acc", "baseline/val_acc"]}``; a default chart of the
            same title is replaced.
        model_prefix: the PairedModule's model prefix used in the default charts.
        baseline_prefix: the PairedModule's baseline prefix used in the default charts.
        include_defaults: start from :func:`default_layout` (else only ``pairs``).
        monitor_prefixes: ``{"ntk_prefixes": [...], "gap_prefixes": [...],
            "crossing_prefixes": [...]}`` for :func:`default_layout` (the Trainer's monitors'
            own prefixes where a ``TensorBoardDashboard`` writes it).

    Returns:
        The layout written (``{category: {title: ["Multiline", [regex, ...]]}}``).
    """
    layout = _build_layout(pairs, model_prefix, baseline_prefix, include_defaults, monitor_prefixes)
    if isinstance(writer_or_trainer, pl.Trainer):
        # (a logger made with prefix="exp" writes exp-model/train_loss: every chart matched
        # nothing before its tag prefix was put into the patterns; review, session 24)
        targets = list(tensorboard_targets(writer_or_trainer))
    elif callable(getattr(writer_or_trainer, "add_custom_scalars", None)):
        targets = [(writer_or_trainer, "")]
    else:
        raise TypeError(
            "write_dashboard_layout needs a lightning Trainer or a SummaryWriter, "
            f"got {type(writer_or_trainer).__name__}"
        )
    for writer, tag_prefix in targets:
        if writer in _WRITTEN:
            continue
        writer.add_custom_scalars(_with_tag_prefix(layout, tag_prefix))
        writer.flush()
        _WRITTEN.add(writer)
    return layout


def _with_tag_prefix(layout: Layout, tag_prefix: str) -> Layout:
    """``layout`` with every pattern anchored after ``tag_prefix`` (``^x`` -> ``^<prefix>x``)."""
    if not tag_prefix:
        return layout
    head = "^" + re.escape(tag_prefix)

    def anchored(p: str) -> str:  # (a pair given with the prefix already: kept as it is)
        return head + p[1:] if p.startswith("^") and not p.startswith(head) else p

    return {
        category: {
            title: [kind, [anchored(p) for p in patterns]]
            for title, (kind, patterns) in charts.items()
        }
        for category, charts in layout.items()
    }


class TensorBoardDashboard(Callback):
    """Write the model-vs-baseline custom-scalars layout at fit start (rank zero, once).

    Args: as :func:`write_dashboard_layout`; the prefixes default to the PairedModule's own.
    """

    def __init__(
        self,
        pairs: Mapping[str, Sequence[str]] | None = None,
        model_prefix: str | None = None,
        baseline_prefix: str | None = None,
        include_defaults: bool = True,
    ) -> None:
        super().__init__()
        check_name("TensorBoardDashboard", "model_prefix", model_prefix, allow_none=True)
        check_name("TensorBoardDashboard", "baseline_prefix", baseline_prefix, allow_none=True)
        for arg, value in (("model_prefix", model_prefix), ("baseline_prefix", baseline_prefix)):
            if value is not None and "/" in value:  # (as PairedModule refuses: no chart matched)
                raise MisconfigurationException(
                    f"TensorBoardDashboard: `{arg}` must not contain '/', got {value!r}."
                )
        check_bool("TensorBoardDashboard", include_defaults=include_defaults)
        if pairs is not None and not isinstance(pairs, Mapping):
            raise MisconfigurationException(
                "TensorBoardDashboard: `pairs` must be a mapping {title: [tag, ...]}, got "
                f"{pairs!r}."
            )
        # validate now (MisconfigurationException at construction), write at fit start
        _build_layout(pairs, model_prefix or "model", baseline_prefix or "baseline",
                      include_defaults)  # fmt: skip
        self.pairs = dict(pairs) if pairs else None
        self.model_prefix = model_prefix
        self.baseline_prefix = baseline_prefix
        self.include_defaults = include_defaults
        self.layout: Layout | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_quiet_run(trainer):
            return
        mp = str(self.model_prefix or getattr(pl_module, "model_prefix", "model"))
        bp = str(self.baseline_prefix or getattr(pl_module, "baseline_prefix", "baseline"))
        self.layout = write_dashboard_layout(
            trainer,
            pairs=self.pairs,
            model_prefix=mp,
            baseline_prefix=bp,
            include_defaults=self.include_defaults,
            monitor_prefixes=_monitor_prefixes(trainer),
        )


def _monitor_prefixes(trainer: pl.Trainer) -> dict[str, list[str]]:
    """The tag prefixes of the Trainer's glu-probe monitors (their own ``prefix=``; the
    defaults where there is none): the charts drew only the default prefixes before, so the
    series of a second monitor (``prefix="ntk_mlp"``) reached no chart (review, session 18)."""
    from glu_probe.callbacks.crossing import LossCrossingMonitor
    from glu_probe.callbacks.gap import GeneralizationGapMonitor
    from glu_probe.callbacks.ntk import NTKSpectrumMonitor

    kinds = {
        "ntk_prefixes": (NTKSpectrumMonitor, "ntk"),
        "gap_prefixes": (GeneralizationGapMonitor, "gap"),
        "crossing_prefixes": (LossCrossingMonitor, "crossing"),
    }
    callbacks = list(getattr(trainer, "callbacks", []))
    out: dict[str, list[str]] = {}
    for key, (cls, default) in kinds.items():
        found = [str(getattr(c, "prefix", default)) for c in callbacks if isinstance(c, cls)]
        out[key] = found or [default]
    return out
