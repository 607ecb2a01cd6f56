"""Zero interference: training with every glu-probe callback is bit-identical to training without.

CPU, deterministic algorithms, dropout in the networks (any RNG drift changes the masks) and a
shuffling train loader (any draw from the global generator changes the batch order). The monitors
probe at every step and evaluate at every validation, so a single stray random draw, ``.grad``
write, train/eval flag or buffer update would show in the final parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks.crossing import LossCrossingMonitor
from glu_probe.callbacks.dashboard import TensorBoardDashboard
from glu_probe.callbacks.gap import GeneralizationGapMonitor
from glu_probe.callbacks.ntk import NTKSpectrumMonitor
from glu_probe.callbacks.paired import PairedModule


def net(act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), act(), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.Linear(16, 4)
    )


class Plain(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = net(nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g))


@contextmanager
def deterministic() -> Iterator[None]:
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def callbacks(paired: bool) -> list[pl.Callback]:
    return [
        NTKSpectrumMonitor(every_n_steps=1, probe_size=12),
        GeneralizationGapMonitor(
            train_subset_size=16, loss_fn=None if paired else nn.functional.cross_entropy
        ),
        LossCrossingMonitor(
            baseline="paired" if paired else [2.0, 1.5, 1.0, 0.5, 0.2, 0.1, 0.05, 0.01] * 4,
            monitor="train_loss",
        ),
        TensorBoardDashboard(),
    ]


def fit(tmp: Path, module: pl.LightningModule, cbs: list[pl.Callback]) -> pl.Trainer:
    """Two epochs of 32 shuffled samples, validation every 2 steps, deterministic, TensorBoard."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        val_check_interval=2,
        logger=TensorBoardLogger(tmp, name="tb"),
        callbacks=cbs,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    train_dl = DataLoader(data(32), batch_size=8, shuffle=True)
    val_dl = DataLoader(data(16), batch_size=8)
    with deterministic():
        trainer.fit(module, train_dl, val_dl)
    return trainer


def train(tmp: Path, paired: bool, with_callbacks: bool) -> tuple[pl.LightningModule, Any]:
    pl.seed_everything(7, workers=True)
    if paired:
        module: pl.LightningModule = PairedModule(net(nn.ReLU), net(nn.GELU), lr=1e-2)
    else:
        module = Plain()
    trainer = fit(tmp, module, callbacks(paired) if with_callbacks else [])
    return module, (torch.get_rng_state(), trainer)


@pytest.mark.parametrize("paired", [False, True], ids=["plain", "paired"])
def test_all_callbacks_leave_training_bit_identical(tmp_path, paired):
    torch.set_num_threads(1)
    ref, (rng_ref, _) = train(tmp_path / "without", paired, with_callbacks=False)
    got, (rng_got, trainer) = train(tmp_path / "with", paired, with_callbacks=True)

    ref_state, got_state = ref.state_dict(), got.state_dict()
    assert ref_state.keys() == got_state.keys()
    for name, value in ref_state.items():  # parameters and BatchNorm buffers
        assert torch.equal(value, got_state[name]), name
    for (name, p), q in zip(ref.named_parameters(), got.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
        else:
            assert q.grad is not None and torch.equal(p.grad, q.grad), name
    assert ref.training == got.training
    assert torch.equal(rng_ref, rng_got)  # the global RNG ends in the same state

    # The monitors really ran (otherwise the test would prove nothing).
    ntk = next(c for c in trainer.callbacks if isinstance(c, NTKSpectrumMonitor))
    assert [h["step"] for h in ntk.history] == list(range(0, 9))


class Augmented(Plain):
    """Draws random numbers in its batch-transfer hook (GPU-side augmentation, as in
    Lightning's docs): the monitors run the hooks on their own batches too, which must not
    shift the run's RNG (a review measured 5.8e-2 and 1.9e-2 parameter drift before)."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return x + 0.1 * torch.randn_like(x), y


def train_augmented(tmp: Path, cbs: list[pl.Callback]) -> tuple[pl.LightningModule, torch.Tensor]:
    pl.seed_everything(7, workers=True)
    module = Augmented()
    fit(tmp, module, cbs)
    return module, torch.get_rng_state()


@pytest.mark.parametrize("which", ["ntk", "gap"])
def test_random_transfer_hooks_leave_training_bit_identical(tmp_path, which):
    torch.set_num_threads(1)
    ref, rng_ref = train_augmented(tmp_path / "without", [])
    if which == "ntk":
        cb: pl.Callback = NTKSpectrumMonitor(every_n_steps=1, probe_size=12)
    else:  # the automatic subset size: the subset is re-batched at the first validation
        cb = GeneralizationGapMonitor(loss_fn=nn.functional.cross_entropy)
    got, rng_got = train_augmented(tmp_path / "with", [cb])
    for name, value in ref.state_dict().items():
        assert torch.equal(value, got.state_dict()[name]), name
    assert torch.equal(rng_ref, rng_got)
    assert cb.history  # it ran
