"""The glu-probe callbacks configured from a LightningCLI YAML file (jsonargparse)."""

from __future__ import annotations

import importlib
import textwrap
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks.ntk import NTKSpectrumMonitor

pytest.importorskip("jsonargparse")


class CLIModel(pl.LightningModule):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CLIData(pl.LightningDataModule):
    def __init__(self, n: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ds = TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=8)


NTK_YAML = """
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: glu_probe.callbacks.ntk.NTKSpectrumMonitor
      init_args:
        every_n_steps: 2
        probe_size: 10
        output: full
        method: dense
        dtype: float64
        log_figure: false
        shard_probe: true
        target_probes: 30
        prefix: ntk_full
        spectrum_kwargs:
          tol: 1.0e-05
          max_matvecs: 40
"""


def _cli(tmp_path: Any, yaml: str) -> LightningCLI:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(textwrap.dedent(yaml))
    return LightningCLI(
        CLIModel,
        CLIData,
        args=["--config", str(cfg)],
        run=False,
        save_config_callback=None,
    )


def test_ntk_monitor_from_yaml(tmp_path):
    cli = _cli(tmp_path, NTK_YAML)
    callbacks: list[Any] = cli.trainer.callbacks  # type: ignore[attr-defined]
    mons = [c for c in callbacks if isinstance(c, NTKSpectrumMonitor)]
    assert len(mons) == 1
    mon = mons[0]
    assert mon.every_n_steps == 2
    assert mon.probe_size == 10
    assert mon.output == "full"
    assert mon.method == "dense"
    assert mon.dtype is torch.float64
    assert mon.log_figure is False and mon.log_histogram is True
    assert mon.shard_probe is True
    assert mon.target_probes == 30
    assert mon.prefix == "ntk_full"
    assert mon.spectrum_kwargs == {
        "tol": 1e-5,
        "max_matvecs": 40,
        "slq_probes": 4,
    }  # memory_budget: resolved per probe from the model (floor + 256 MiB), not stored
    # The configured run works end to end: probes at 0, 2, 4 with 10 samples x 2 outputs.
    cli.trainer.fit(cli.model, cli.datamodule)
    assert [h["step"] for h in mon.history] == [0, 2, 4]
    assert all(h["ntk_full/lambda_max"] > 0 for h in mon.history)


def test_bad_yaml_value_is_refused(tmp_path):
    bad = NTK_YAML.replace("every_n_steps: 2", "every_n_steps: 0")
    # jsonargparse reports the callback's own MisconfigurationException message.
    with pytest.raises(ValueError, match=r"`every_n_steps` must be a positive int or None, got 0"):
        _cli(tmp_path, bad)


def _available(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


@pytest.mark.skipif(
    not all(
        _available(m, n)
        for m, n in (
            ("glu_probe.callbacks.gap", "GeneralizationGapMonitor"),
            ("glu_probe.callbacks.crossing", "LossCrossingMonitor"),
            ("glu_probe.callbacks.dashboard", "TensorBoardDashboard"),
        )
    ),
    reason="the gap / crossing / dashboard callbacks are not available",
)
def test_all_callbacks_from_yaml(tmp_path):
    from glu_probe.callbacks.crossing import LossCrossingMonitor
    from glu_probe.callbacks.dashboard import TensorBoardDashboard
    from glu_probe.callbacks.gap import GeneralizationGapMonitor

    yaml = """
    trainer:
      accelerator: cpu
      max_steps: 2
      logger: false
      enable_checkpointing: false
      enable_progress_bar: false
      callbacks:
        - class_path: glu_probe.callbacks.ntk.NTKSpectrumMonitor
          init_args:
            probe_size: 16
        - class_path: glu_probe.callbacks.gap.GeneralizationGapMonitor
        - class_path: glu_probe.callbacks.crossing.LossCrossingMonitor
          init_args:
            baseline: [1.0, 0.9, 0.8]
            monitor: train_loss
        - class_path: glu_probe.callbacks.dashboard.TensorBoardDashboard
    """
    cli = _cli(tmp_path, yaml)
    callbacks: list[Any] = cli.trainer.callbacks  # type: ignore[attr-defined]
    by_type = {type(c): c for c in callbacks}
    ntk = by_type[NTKSpectrumMonitor]
    assert ntk.probe_size == 16 and ntk.every_n_steps is None and ntk.output == "pntk"
    assert GeneralizationGapMonitor in by_type
    assert TensorBoardDashboard in by_type
    crossing = by_type[LossCrossingMonitor]
    assert crossing.monitor == "train_loss"


class ClassData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        ds = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
        return DataLoader(ds, batch_size=8)


PAIRED_YAML = """
model:
  class_path: glu_probe.callbacks.PairedModule
  init_args:
    model:
      class_path: glu_probe.modules.SwiGLU
      init_args: {in_features: 4, hidden_features: 8, out_features: 3}
    baseline:
      class_path: glu_probe.modules.MLP
      init_args: {in_features: 4, hidden_features: 12, out_features: 3}
    optimizer: torch.optim.Adam
    lr: 0.05
    loss_fn:
      class_path: torch.nn.CrossEntropyLoss
      init_args: {label_smoothing: 0.1}
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.StepLR
      init_args: {step_size: 1, gamma: 0.5}
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
"""


def test_paired_module_from_yaml_with_classes(tmp_path):
    """(Review, session 18.) ``PairedModule``'s scheduler (``Callable[[Optimizer], Any]``) and
    loss (``Callable[[Tensor, Tensor], Tensor]``) could not be given as class paths, and
    ``optimizer: torch.optim.Adam`` was read as an unknown optimizer name. Lightning's
    ``LRSchedulerCallable`` convention, a module loss and dotted optimizer paths now parse."""
    cfg = tmp_path / "paired.yaml"
    cfg.write_text(textwrap.dedent(PAIRED_YAML))
    cli = LightningCLI(
        datamodule_class=ClassData,
        args=["--config", str(cfg)],
        run=False,
        save_config_callback=None,
        subclass_mode_model=True,
    )
    module = cli.model
    assert isinstance(module.loss_fn, nn.CrossEntropyLoss) and module.loss_fn.label_smoothing == 0.1
    cli.trainer.fit(module, cli.datamodule)
    for opt in module.optimizers():
        assert isinstance(opt.optimizer, torch.optim.Adam)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)  # stepped twice


def first_output_row(out: torch.Tensor) -> torch.Tensor:
    """An ``output=`` callable named by its dotted path in YAML."""
    return out[:, 0]


def test_callables_and_loss_modules_from_yaml(tmp_path):
    """(Session 24.) `output: <dotted path>` was read as the string it is (the union tried
    `str` first), and the gap monitor's `loss_fn` took no class_path (`torch.nn.MSELoss`)."""
    from glu_probe.callbacks.gap import GeneralizationGapMonitor

    cli = _cli(
        tmp_path,
        """
        trainer:
          accelerator: cpu
          max_steps: 2
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          enable_model_summary: false
          callbacks:
            - class_path: glu_probe.callbacks.ntk.NTKSpectrumMonitor
              init_args:
                output: test_lightning_cli.first_output_row
            - class_path: glu_probe.callbacks.gap.GeneralizationGapMonitor
              init_args:
                loss_fn:
                  class_path: torch.nn.MSELoss
        """,
    )
    callbacks: list[Any] = cli.trainer.callbacks  # type: ignore[attr-defined]
    (ntk,) = [c for c in callbacks if isinstance(c, NTKSpectrumMonitor)]
    (gap,) = [c for c in callbacks if isinstance(c, GeneralizationGapMonitor)]
    assert ntk.output is first_output_row
    assert isinstance(gap.loss_fn, nn.MSELoss)
