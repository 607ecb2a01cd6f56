"""Loss-crossing monitor, session 26 review: a loss logged in an ``on_train_batch_end`` hook
(read one step late before), and baselines given as bfloat16 tensors or as tensors that
require grad (raw torch/numpy errors before)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from glu_probe.callbacks import LossCrossingMonitor
from glu_probe.crossing import find_crossings

torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available.*")
N = 60


class HookLogged(pl.LightningModule):
    """Logs ``values[step]`` as ``train_loss`` from ``on_train_batch_end`` (or, with
    ``where="callback"``, lets a callback listed after the monitor log it)."""

    def __init__(self, values, where: str = "module", val_every: int | None = None):
        super().__init__()
        self.values, self.where = values, where
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w**2).sum() + batch.sum() * 0

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", batch.sum() * 0 + 1.0)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.where == "module":
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            self.log("train_loss", float(self.values[step]), on_step=True, on_epoch=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LogsInHook(Callback):
    def __init__(self, values):
        self.values = values

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        pl_module.log("train_loss", float(self.values[step]), on_step=True, on_epoch=False)


class Spy(LossCrossingMonitor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fed: list[tuple[int, float, float]] = []

    def _feed(self, trainer, pl_module, step, a, b):
        self.fed.append((step, a, b))
        super()._feed(trainer, pl_module, step, a, b)


def _fit(tmp_path, module, callbacks, **kw):
    args = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        max_epochs=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        logger=CSVLogger(str(tmp_path), name="m"),
        callbacks=callbacks,
    )
    args.update(kw)
    trainer = pl.Trainer(**args)
    loader = DataLoader(torch.zeros(N // 2, 1), batch_size=1)
    trainer.fit(module, loader, DataLoader(torch.zeros(2, 1), batch_size=1))
    return trainer


def _logged(tmp_path) -> list[tuple[int, float]]:
    path = next(Path(tmp_path).rglob("metrics.csv"))
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]


@pytest.mark.parametrize("where", ["module", "callback"])
@pytest.mark.parametrize("val_check_interval", [None, 7])
def test_a_loss_logged_in_on_train_batch_end_is_paired_with_its_own_step(
    tmp_path, where, val_check_interval
):
    """Every step's value is ``step`` itself and the baseline is the same list: each pair must
    be (t, t, t). Read in the monitor's own hook, the pairs were (t, t - 1, t) and the final
    delta -1 (review, session 26). Validation inside the epoch and the epoch's last batch are
    the other hooks the read is deferred to."""
    values = np.arange(N, dtype=np.float64)
    mon = Spy(baseline=list(values), monitor="train_loss")
    callbacks: list[Callback] = [mon] + ([LogsInHook(values)] if where == "callback" else [])
    kw = {} if val_check_interval is None else {"val_check_interval": val_check_interval}
    _fit(tmp_path, HookLogged(values, where=where), callbacks, **kw)
    assert [s for s, _, _ in mon.fed] == list(range(N))
    assert all(a == s and b == s for s, a, b in mon.fed), mon.fed[:5]
    assert mon.detector.delta == 0.0
    assert _logged(tmp_path) == [(s, float(s)) for s in range(N)]


def test_online_equals_offline_for_a_loss_logged_in_the_batch_end_hook(tmp_path):
    """A noisy run compared with its own recorded log never crosses it; the monitor found 21
    crossings when it read the previous step's value (review, session 26)."""
    rng = np.random.default_rng(0)
    values = np.exp(-0.03 * np.arange(N)) + 0.05 * rng.standard_normal(N)
    first = tmp_path / "first"
    _fit(first, HookLogged(values), [])
    logged = _logged(first)
    steps, losses = zip(*logged, strict=True)
    mon = Spy(baseline=list(map(list, logged)), monitor="train_loss", smoothing=0.0, patience=2)
    _fit(tmp_path / "second", HookLogged(values), [mon])
    offline = find_crossings(steps, losses, steps, losses, smoothing=0.0, patience=2)
    assert offline == [] and mon.crossings == []
    assert [(s, a) for s, a, _ in mon.fed] == [(s, float(v)) for s, v in logged]


def test_bfloat16_and_requires_grad_series():
    a = torch.linspace(3.0, 0.0, 20)
    b = torch.linspace(2.0, 1.0, 20)
    steps = list(range(a.numel()))
    kw = dict(smoothing=0.0, patience=2)
    want = find_crossings(steps, a.bfloat16().double(), steps, b.bfloat16().double(), **kw)
    assert len(want) == 1, "the fixture must cross once"
    got = find_crossings(steps, a.bfloat16(), steps, b.bfloat16(), **kw)
    assert got == want
    grads = [t.clone().requires_grad_() for t in b.bfloat16().double()]
    got = find_crossings(steps, a.bfloat16().double().requires_grad_(), steps, grads, **kw)
    assert got == want


@pytest.mark.parametrize(
    "baseline",
    [
        torch.linspace(2, 1, 8, dtype=torch.bfloat16),
        [t.requires_grad_() for t in torch.linspace(2, 1, 8)],
        torch.linspace(2, 1, 8).requires_grad_(),
    ],
    ids=["bf16", "list-of-grad-tensors", "grad-tensor"],
)
def test_monitor_accepts_bf16_and_grad_tensor_baselines(baseline):
    mon = LossCrossingMonitor(baseline=baseline)
    steps, values = mon._series
    ref = torch.stack(list(baseline)) if isinstance(baseline, list) else baseline
    np.testing.assert_array_equal(steps, np.arange(8.0))
    np.testing.assert_array_equal(values, ref.detach().double().numpy())


def test_a_baseline_of_non_numbers_is_a_misconfiguration():
    with pytest.raises(MisconfigurationException, match="in-memory baseline"):
        LossCrossingMonitor(baseline=[torch.zeros(2), torch.zeros(3)])
