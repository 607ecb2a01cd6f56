"""A LightningModule whose forward takes the whole batch: the NTK monitor's error names the way
out (``module=``), found by a new user's review (session 28)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset

from glu_probe.callbacks import NTKSpectrumMonitor
from glu_probe.ntk import ntk_spectrum

torch.set_num_threads(1)


class _Dicts(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 5, generator=g)
        self.y = torch.randint(0, 3, (32,), generator=g)

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "labels": self.y[i]}


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)


class _WholeBatch(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Net()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # the whole batch
        return self.model(batch["features"])

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(monitor: NTKSpectrumMonitor) -> _WholeBatch:
    pl.seed_everything(0, verbose=False)
    module = _WholeBatch()
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(module, DataLoader(_Dicts(), batch_size=8))
    return module


def test_whole_batch_forward_error_names_module_and_module_works():
    with pytest.raises(MisconfigurationException, match=r"module='model'"):
        _fit(NTKSpectrumMonitor(every_n_steps=1, probe_size=8))
    monitor = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, module="model")
    module = _fit(monitor)
    assert [h["step"] for h in monitor.history] == [0, 1, 2]
    # the logged κ is the held network's on the probe (the loader's first 8 samples)
    truth = ntk_spectrum(module.model, _Dicts().x[:8], method="dense", dtype=torch.float64)
    assert monitor.history[-1]["ntk/condition_number"] == pytest.approx(
        truth.condition_number, rel=1e-5
    )
