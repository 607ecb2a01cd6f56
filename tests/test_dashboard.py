"""TensorBoard dashboard: the custom-scalars layout, read back from the event file of a real run."""

from __future__ import annotations

import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from tensorboard.util import tensor_util
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from glu_probe.callbacks.crossing import LossCrossingMonitor
from glu_probe.callbacks.dashboard import (
    DEFAULT_CATEGORY,
    TensorBoardDashboard,
    default_layout,
    write_dashboard_layout,
)
from glu_probe.callbacks.gap import GeneralizationGapMonitor
from glu_probe.callbacks.paired import PairedModule

torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def _read_layout(logdir: str) -> tuple[layout_pb2.Layout, list[str], int]:
    acc = EventAccumulator(logdir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    raw = tensor_util.make_ndarray(events[0].tensor_proto)
    layout = layout_pb2.Layout.FromString(raw.item() if raw.shape == () else raw[0])
    return layout, acc.Tags()["scalars"], len(events)


def _charts(layout: layout_pb2.Layout) -> dict[str, list[str]]:
    (cat,) = layout.category
    assert cat.title == DEFAULT_CATEGORY
    return {c.title: list(c.multiline.tag) for c in cat.chart}


def _matching(regexes: list[str], tags: list[str]) -> set[str]:
    # TensorBoard's custom-scalars plugin selects tags with re.compile(regex).match(tag)
    return {t for t in tags if any(re.compile(r).match(t) for r in regexes)}


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_layout_read_back_from_a_real_run_puts_model_and_baseline_together(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = (x[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=8)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    tb = TensorBoardLogger(str(tmp_path), name="run")
    dash = TensorBoardDashboard(pairs={"first layer": ["model/w", "baseline/w"]})
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
        logger=[tb, CSVLogger(str(tmp_path))],
        callbacks=[dash, GeneralizationGapMonitor(train_subset_size=8),
                   LossCrossingMonitor("paired", patience=2)],
    )  # fmt: skip
    trainer.fit(PairedModule(_net(0), _net(1)), train, val)
    write_dashboard_layout(trainer)  # a second call on the same writer writes nothing
    tb.experiment.flush()
    layout, scalar_tags, n_layouts = _read_layout(tb.log_dir)
    assert n_layouts == 1
    charts = _charts(layout)
    assert dash.layout is not None and _charts_from_dict(dash.layout) == charts
    assert _matching(charts["train loss"], scalar_tags) == {
        "model/train_loss", "baseline/train_loss",
    }  # fmt: skip
    assert _matching(charts["val loss"], scalar_tags) == {"model/val_loss", "baseline/val_loss"}
    assert _matching(charts["generalization gap"], scalar_tags) == {
        "gap/model/loss", "gap/baseline/loss",
    }  # fmt: skip
    assert _matching(charts["loss crossing"], scalar_tags) == {"crossing/delta"}
    # the NTK monitor's paired names (and the unpaired one), and nothing else
    ntk_tags = ["ntk/model/condition_number", "ntk/baseline/condition_number",
                "ntk/condition_number", "ntk/model/lambda_max", "model/train_loss"]  # fmt: skip
    assert _matching(charts["NTK condition number"], ntk_tags) == set(ntk_tags[:3])
    assert charts["first layer"] == ["^model/w$", "^baseline/w$"]


def test_charts_follow_the_monitors_prefixes(tmp_path):
    """(Review, session 18.) The charts matched only the default ``ntk/``, ``gap/`` and
    ``crossing/`` tags, so the series of a monitor with its own ``prefix=`` (a second NTK
    monitor of the MLP blocks, say) reached no chart. They now match the Trainer's monitors'
    prefixes, read back from the event file against the scalar tags actually logged."""
    from glu_probe.callbacks import NTKSpectrumMonitor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = (x[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x, y), batch_size=8)
    val = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    tb = TensorBoardLogger(str(tmp_path), name="run")
    monitors = [
        NTKSpectrumMonitor(every_n_steps=4, probe_size=8, log_figure=False),
        NTKSpectrumMonitor(every_n_steps=4, probe_size=8, log_figure=False, prefix="ntk_last",
                           params="2"),
        GeneralizationGapMonitor(train_subset_size=8, prefix="gap_small"),
        LossCrossingMonitor("paired", patience=2, prefix="cross_b"),
    ]  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1, logger=tb,
        callbacks=[TensorBoardDashboard(), *monitors],
    )  # fmt: skip
    trainer.fit(PairedModule(_net(0), _net(1)), train, val)
    tb.experiment.flush()
    layout, scalar_tags, _ = _read_layout(tb.log_dir)
    charts = _charts(layout)
    kappa = _matching(charts["NTK condition number"], scalar_tags)
    assert kappa == {f"{p}/{m}/condition_number" for p in ("ntk", "ntk_last") for m in
                     ("model", "baseline")}  # fmt: skip
    assert _matching(charts["generalization gap"], scalar_tags) == {
        "gap_small/model/loss", "gap_small/baseline/loss",
    }  # fmt: skip
    assert _matching(charts["loss crossing"], scalar_tags) == {"cross_b/delta"}


def _charts_from_dict(layout: dict) -> dict[str, list[str]]:
    return {title: spec[1] for title, spec in layout[DEFAULT_CATEGORY].items()}


def test_writer_api_prefixes_and_errors(tmp_path):
    writer = SummaryWriter(str(tmp_path / "w"))
    layout = write_dashboard_layout(writer, model_prefix="glu", baseline_prefix="relu+1")
    writer.close()
    charts = _charts(_read_layout(str(tmp_path / "w"))[0])
    assert charts == _charts_from_dict(layout)
    assert _matching(
        charts["train loss"], ["glu/train_loss", "relu+1/train_loss", "relu1/train_loss"]
    ) == {
        "glu/train_loss",
        "relu+1/train_loss",
    }  # fmt: skip  (the prefix is escaped: '+' is literal)
    # replace a default chart, or write only the user's charts
    only = write_dashboard_layout(
        SummaryWriter(str(tmp_path / "o")), pairs={"val loss": ["a/v", "b/v"]},
        include_defaults=False,
    )  # fmt: skip
    assert only == {DEFAULT_CATEGORY: {"val loss": ["Multiline", ["^a/v$", "^b/v$"]]}}
    assert default_layout()[DEFAULT_CATEGORY].keys() >= {"train loss", "generalization gap"}
    with pytest.raises(TypeError, match="Trainer or a SummaryWriter"):
        write_dashboard_layout(object())
    with pytest.raises(MisconfigurationException, match="non-empty list"):
        TensorBoardDashboard(pairs={"x": "model/w"})
    with pytest.raises(MisconfigurationException, match="empty"):
        TensorBoardDashboard(include_defaults=False)


def test_no_tensorboard_logger_writes_nothing(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", logger=CSVLogger(str(tmp_path)), max_steps=1,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)  # fmt: skip
    dash = TensorBoardDashboard()
    data = DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), 2)
    trainer.callbacks.append(dash)
    trainer.fit(PairedModule(_net(0), _net(1)), data)
    assert dash.layout is not None  # built, but there was no writer to receive it
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
