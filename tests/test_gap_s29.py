"""Session 29 review regressions of the GeneralizationGapMonitor: its own evaluations (the
clean training-subset and validation passes, and the train-start checks) must not log through
the user's ``self.log``. Before the fix a ``compute_loss`` that logs ``train_loss`` put the
validation loss into ``callback_metrics["train_loss"]`` and into the CSV's ``train_loss``
column at every validation."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks import GeneralizationGapMonitor

torch.set_num_threads(1)


class _Logs(pl.LightningModule):
    """Logs from its loss hook (``train_loss``) and, optionally, from forward (``act_mean``)."""

    def __init__(self, log_in_forward: bool) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.log_in_forward = log_in_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        if self.log_in_forward and self._trainer is not None:
            self.log("act_mean", h.detach().abs().mean())
        return self.l2(h)

    def compute_loss(self, batch):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def training_step(self, batch, i):
        return self.compute_loss(batch)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: Path, tag: str, callbacks: list, log_in_forward: bool):
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    train = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(X[:16], Y[:16]), batch_size=8)
    model = _Logs(log_in_forward)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path / tag, name=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        val_check_interval=4,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train, val)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return model, trainer, rows, params


def _column(rows: list[dict], key: str) -> list[tuple[str, str]]:
    return [(r["step"], r[key]) for r in rows if r.get(key)]


@pytest.mark.parametrize(
    "log_in_forward, monitor_kw",
    [
        (False, {}),  # the module's compute_loss: its self.log("train_loss")
        (True, {"loss_fn": F.cross_entropy}),  # forward's self.log("act_mean") + a loss_fn
    ],
)
def test_gap_evaluations_do_not_log_under_the_users_keys(tmp_path, log_in_forward, monitor_kw):
    _, t0, rows0, p0 = _fit(tmp_path, "base", [], log_in_forward)
    monitor = GeneralizationGapMonitor(**monitor_kw)
    m1, t1, rows1, p1 = _fit(tmp_path, "gap", [monitor], log_in_forward)
    assert torch.equal(p0, p1)
    for key in ("train_loss", "val_loss") + (("act_mean",) if log_in_forward else ()):
        # the user's series, step for step, exactly as without the monitor
        assert _column(rows1, key) == _column(rows0, key), key
        assert float(t1.callback_metrics[key]) == float(t0.callback_metrics[key]), key
    # the monitor did log its gap, from its own evaluation
    assert "gap/loss" in t1.callback_metrics
    gap = float(t1.callback_metrics["gap/loss"])
    val, train = (float(t1.callback_metrics[f"gap/{s}/loss"]) for s in ("val", "train"))
    assert gap == pytest.approx(val - train, rel=1e-12, abs=1e-12)
    # log/log_dict given back: no instance attribute left behind
    assert "log" not in m1.__dict__ and "log_dict" not in m1.__dict__


def test_logging_silenced_restores_an_instance_override():
    from glu_probe.callbacks._gap_trainer import _logging_silenced

    m = _Logs(False)
    calls: list = []
    m.log = lambda *a, **k: calls.append(a)  # the user's own instance attribute
    own = m.__dict__["log"]
    with _logging_silenced(m):
        m.log("x", 1.0)
        m.log_dict({"y": 2.0})
    assert calls == [] and m.__dict__["log"] is own and "log_dict" not in m.__dict__
    m.log("z", 3.0)
    assert calls == [("z", 3.0)]


class _ShiftsOnTransfer(pl.LightningModule):
    """Computes on its inputs in ``on_after_batch_transfer`` (a shift): under ``"bf16-true"``
    the result depends on whether the inputs were cast to bfloat16 before or after it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x + 1e-3, y

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def compute_loss(self, batch):
        # (the inputs' own mean square, in float32: sensitive to one bfloat16 rounding of them)
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y) + x.float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_training_subset_goes_through_the_loops_order_of_cast_and_hooks():
    """The training subset is the validation batch itself: with Lightning's order (cast, then
    the transfer hooks) both sides see the same inputs and the gap is exactly 0. Before the fix
    the cast came after ``on_after_batch_transfer``: the shift was added in float32 and rounded
    once, not added to bfloat16 inputs, and the gap was not 0."""
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(16, 5, generator=g) * 3, torch.randint(0, 3, (16,), generator=g)
    data = TensorDataset(X, Y)
    monitor = GeneralizationGapMonitor(train_subset=[(X, Y)])
    trainer = pl.Trainer(
        max_steps=1,
        precision="bf16-true",
        callbacks=[monitor],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            _ShiftsOnTransfer(),
            DataLoader(data, batch_size=16),
            DataLoader(data, batch_size=16),
        )
    train = float(trainer.callback_metrics["gap/train/loss"])
    val = float(trainer.callback_metrics["gap/val/loss"])
    assert train == val
    assert float(trainer.callback_metrics["gap/loss"]) == 0.0
