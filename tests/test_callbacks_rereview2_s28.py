"""Second re-review of session 28's callback fixes (each test fails on the code before it).

* A run resumed inside a freeze episode counted its probe rows over every parameter, taking in
  one the ``params=`` filter leaves out (a complex gain the probe refuses): the resumed fit died
  at train start where the uninterrupted one skipped its probes.
* Under ``accumulate_grad_batches``, a callback monitoring ``crossing/delta`` saw the previous
  optimizer step's delta (the step was closed only when the next step's first batch came).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks import NTKSpectrumMonitor

torch.set_num_threads(1)


class _Complex(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
        self.gain = nn.Parameter(torch.ones(4, dtype=torch.cfloat))  # outside the filter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.gain.abs()

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class _Episode(Callback):
    """``net.0`` frozen from global step 6 on (checkpointed, re-applied at fit start)."""

    def __init__(self) -> None:
        self.frozen = False

    def state_dict(self):
        return {"frozen": self.frozen}

    def load_state_dict(self, state) -> None:
        self.frozen = state["frozen"]

    def _apply(self, module) -> None:
        for p in module.net[0].parameters():
            p.requires_grad_(not self.frozen)

    def on_fit_start(self, trainer, module) -> None:
        self._apply(module)

    def on_train_batch_end(self, trainer, module, *_) -> None:
        if trainer.global_step >= 6 and not self.frozen:
            self.frozen = True
            self._apply(module)


def _fit(root: Path, ckpt_path: Path | None = None) -> tuple[pl.Trainer, NTKSpectrumMonitor]:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g))
    monitor = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, params="net.0", log_histogram=False, log_figure=False
    )
    trainer = pl.Trainer(
        max_epochs=4,
        logger=False,
        callbacks=[_Episode(), monitor, ModelCheckpoint(dirpath=root, save_top_k=-1)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Complex(), DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer, monitor


def test_resume_in_a_freeze_episode_counts_rows_over_the_filtered_parameters(tmp_path):
    trainer, monitor = _fit(tmp_path / "a")
    assert trainer.global_step == 16
    steps = [h["step"] for h in monitor.history]
    assert steps == [0, 1, 2, 3, 4, 5]
    resumed, again = _fit(tmp_path / "b", ckpt_path=tmp_path / "a" / "epoch=1-step=8.ckpt")
    assert resumed.global_step == 16
    assert [h["step"] for h in again.history] == steps
    assert [h["ntk/condition_number"] for h in again.history] == pytest.approx(
        [h["ntk/condition_number"] for h in monitor.history], rel=1e-9
    )
    assert all(p.requires_grad for p in resumed.lightning_module.net[2].parameters())


_BASE = [1.6 - 0.02 * i for i in range(200)]


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))

    def training_step(self, batch, _):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class _Seen(Callback):
    def __init__(self) -> None:
        self.values: list[tuple[int, float | None]] = []

    def on_validation_end(self, trainer, module) -> None:
        v = trainer.callback_metrics.get("crossing/delta")
        self.values.append((trainer.global_step, None if v is None else float(v)))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_monitored_crossing_delta_is_the_last_completed_steps_under_accumulation(
    tmp_path, accumulate
):
    import csv

    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger

    from glu_probe.callbacks import LossCrossingMonitor

    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 6, generator=g), torch.randint(0, 4, (96,), generator=g))
    seen = _Seen()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=1,
        callbacks=[
            LossCrossingMonitor(baseline=_BASE, monitor="train_loss", smoothing=0.5),
            seen,
            EarlyStopping(monitor="crossing/delta", mode="min", patience=100),
        ],
        accumulate_grad_batches=accumulate,
        val_check_interval=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    trainer.fit(_Classifier(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=32))
    with (Path(trainer.logger.log_dir) / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss")]
    loss = {int(r["step"]): float(r["train_loss"]) for r in rows}
    # the debiased EMA (β = 0.5) of this run's loss minus the baseline's, per logged step
    ea = eb = 0.0
    truth = {}
    for k, step in enumerate(sorted(loss), 1):
        ea, eb = 0.5 * ea + 0.5 * loss[step], 0.5 * eb + 0.5 * _BASE[step]
        truth[step] = (ea - eb) / (1 - 0.5**k)
    assert len(seen.values) == 3
    for global_step, value in seen.values:  # the last completed optimizer step's delta
        assert value == pytest.approx(truth[global_step - 1], rel=1e-5)
