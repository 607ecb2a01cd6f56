"""Findings of the session-24 review of PairedModule and the monitors under real Trainer
configurations (each test fails on the code before it)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_paired import _data, _solo, _trainer
from torch import nn
from torch.utils.data import DataLoader

from glu_probe.callbacks import GeneralizationGapMonitor, NTKSpectrumMonitor, PairedModule
from glu_probe.ntk import ntk_spectrum


def _pair(**kw) -> PairedModule:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.manual_seed(2)
    baseline = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    return PairedModule(model, baseline, **kw)


def test_a_second_fit_steps_its_epoch_schedulers_at_every_epoch(tmp_path):
    """The step of the last epoch-scheduler step was kept across fits: a second fit (fresh
    schedulers) skipped its first epoch's step (lr 0.05 instead of 0.025)."""
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    pair = _pair(
        optimizer=torch.optim.SGD, lr=0.1, lr_scheduler=sched, lr_scheduler_interval="epoch"
    )
    loader = DataLoader(_data(32), batch_size=8)  # 4 batches an epoch
    _trainer(tmp_path, max_epochs=1).fit(pair, loader)
    second = _trainer(tmp_path, max_epochs=2)
    second.fit(pair, loader)
    assert [o.param_groups[0]["lr"] for o in second.optimizers] == [0.025, 0.025]
    assert [s.scheduler.last_epoch for s in second.lr_scheduler_configs] == [2, 2]


def test_schedulers_of_an_overridden_configure_optimizers_are_pointed_out(tmp_path):
    class Overridden(PairedModule):
        def configure_optimizers(self):
            opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (self.model, self.baseline)]
            return opts, [torch.optim.lr_scheduler.StepLR(o, 1, 0.5) for o in opts]

    torch.manual_seed(1)
    pair = Overridden(nn.Linear(8, 3), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="does not step"):
        _trainer(tmp_path, max_steps=2).fit(pair, DataLoader(_data(16), batch_size=8))


def test_a_model_changing_its_input_in_place_leaves_the_baseline_its_own(tmp_path):
    """The baseline trained on inputs the model's nn.ReLU(inplace=True) had changed (max
    parameter difference 0.058 against the baseline trained alone)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.manual_seed(2)
    baseline = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    torch.manual_seed(2)
    alone = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    loader = DataLoader(_data(32), batch_size=8)
    pair = PairedModule(model, baseline, lr=1e-2, baseline_seed=0)
    _trainer(tmp_path, max_steps=4).fit(pair, loader)
    _solo(alone, loader, 4, seed=0)
    for p, q in zip(pair.baseline.parameters(), alone.parameters(), strict=True):
        assert torch.equal(p, q)


class _InPlaceScaling(nn.Module):
    """A model that normalises its input in place (x /= 2), then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x.div_(2.0)
        return self.fc(x)


def test_the_gap_monitor_keeps_its_training_subset_unchanged(tmp_path):
    """A model that changes its input in place changed the kept subset at each evaluation
    (x halved once more each validation): the train side drifted from one validation to the
    next with unchanged weights."""
    import lightning.pytorch as pl

    class Frozen(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = _InPlaceScaling()

        def forward(self, x):
            return self.net(x)

        def loss_fn(self, preds, target):
            return F.cross_entropy(preds, target)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss_fn(self(x), y) * 0.0  # weights stay as they are

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = _data(16)
    gap = GeneralizationGapMonitor(train_subset_size=8)
    _trainer(tmp_path, max_epochs=3, callbacks=[gap]).fit(
        Frozen(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)
    )
    trains = [h["gap/train/loss"] for h in gap.history]
    assert len(trains) == 3 and trains[0] == trains[1] == trains[2]
    x, y = data.tensors
    net = _InPlaceScaling()
    net.load_state_dict(Frozen().net.state_dict())
    idx = gap._order if gap._order is not None else range(8)
    want = F.cross_entropy(net(x[sorted(idx)].clone()), y[sorted(idx)]).item()
    assert trains[0] == pytest.approx(want, rel=1e-6)


def _dropout_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.Linear(16, 4)
    ).train()


@pytest.mark.parametrize("output", ["pntk", "full"])
def test_train_mode_dropout_with_batchnorm_has_no_one_kernel(output):
    """BatchNorm couples the samples (products over the whole batch) and each product drew new
    dropout masks: vmap's randomness error ("full"), or a matrix whose columns came from
    different networks without a word ("pntk", column by column)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="draws random numbers"):
            ntk_spectrum(_dropout_bn(), torch.randn(8, 6), eval_mode=False, output=output)


def test_the_monitor_refuses_train_mode_dropout_with_batchnorm_at_setup(tmp_path):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _dropout_bn()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x[:, :6]), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, eval_mode=False, method="dense")
    with pytest.raises(MisconfigurationException, match="dropout and BatchNorm"):
        _trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(
            Module(), DataLoader(_data(16), batch_size=8)
        )


# ---------------------------------------------------------------- second round (G, H)
def _clf_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.utils.data.TensorDataset(x, y)


def _clf_module(train_on_epoch: bool = False, augment: bool = False):
    import lightning.pytorch as pl

    class Clf(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
            self.loss_fn = F.cross_entropy

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.loss_fn(self(x), y)
            self.log("train_loss", loss, on_step=not train_on_epoch, on_epoch=train_on_epoch)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", self.loss_fn(self(x), y))

        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            if augment and self.trainer.training:  # a train-time augmentation
                x = x + 3.0 * torch.randn_like(x)
            return x, y

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Clf()


def _subset_loss(net: nn.Module, data, n: int, k: int) -> float:
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].sort().values
    x, y = (t[idx] for t in data.tensors)
    net.eval()
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


@pytest.mark.parametrize("eval_batch_size", [None, 4])
def test_the_training_subset_is_transferred_as_a_validation_batch(tmp_path, eval_batch_size):
    """An augmentation under `if self.trainer.training` in on_after_batch_transfer was baked
    into the subset at train start, and undone only where the subset was rebatched: 1.0988
    with eval_batch_size=None, 0.9939 (the clean subset's loss) with 4."""
    train, val = _clf_data(48, 0), _clf_data(16, 1)
    gap = GeneralizationGapMonitor(train_subset_size=16, eval_batch_size=eval_batch_size)
    module = _clf_module(augment=True)
    _trainer(tmp_path, max_epochs=1, callbacks=[gap]).fit(
        module, DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=8)
    )
    want = _subset_loss(module.net, train, 48, 16)
    assert gap.history[-1]["gap/train/loss"] == pytest.approx(want, rel=1e-6)


def test_a_non_finite_validation_batch_is_left_out_with_a_warning(tmp_path):
    """One NaN sample made the val side NaN: gap/loss vanished from history without a word."""
    train, val = _clf_data(48, 0), _clf_data(16, 1)
    val.tensors[0][13, 0] = float("nan")  # batch 3 of 4
    gap = GeneralizationGapMonitor(train_subset_size=16)
    module = _clf_module()
    with pytest.warns(RuntimeWarning, match="1 batch.*non-finite loss"):
        _trainer(tmp_path, max_epochs=1, callbacks=[gap]).fit(
            module, DataLoader(train, batch_size=8), DataLoader(val, batch_size=4)
        )
    x, y = val.tensors
    module.net.eval()
    with torch.no_grad():
        want_val = float(F.cross_entropy(module.net(x[:12]), y[:12]))
    (entry,) = gap.history
    assert entry["gap/val/loss"] == pytest.approx(want_val, rel=1e-6)
    assert entry["gap/loss"] == entry["gap/val/loss"] - entry["gap/train/loss"]


def test_logged_mode_waits_for_a_training_loss_logged_per_epoch(tmp_path):
    """The first validation within the first epoch found no train_loss_epoch yet and ended the
    fit with a MisconfigurationException."""
    train, val = _clf_data(48, 0), _clf_data(16, 1)
    gap = GeneralizationGapMonitor(mode="logged", train_key="train_loss", val_key="val_loss")
    with pytest.warns(UserWarning, match="not logged \\(yet\\)"):
        trainer = _trainer(tmp_path, max_epochs=2, val_check_interval=3, callbacks=[gap])
        trainer.fit(
            _clf_module(train_on_epoch=True),
            DataLoader(train, batch_size=8),
            DataLoader(val, batch_size=8),
        )
    assert gap.history and all("gap/loss" in h for h in gap.history)
    assert min(h["step"] for h in gap.history) >= 6  # from the first epoch end on


def test_a_batch_sampler_loader_sets_the_evaluation_batch_size(tmp_path):
    """A custom batch_sampler leaves the loader's batch_size None: 64 was taken, and the
    subset was evaluated in one batch of 40 where the run's batches hold 4."""
    from torch.utils.data import BatchSampler, RandomSampler

    train, val = _clf_data(40, 0), _clf_data(16, 1)
    gap = GeneralizationGapMonitor(train_subset_size=40)
    sampler = BatchSampler(RandomSampler(train), 4, drop_last=False)
    _trainer(tmp_path, max_steps=5, val_check_interval=5, callbacks=[gap]).fit(
        _clf_module(), DataLoader(train, batch_sampler=sampler), DataLoader(val, batch_size=4)
    )
    assert [len(b[0]) for b in gap._batches] == [4] * 10


@pytest.mark.parametrize("kind", ["batch_sampler", "items_are_batches"])
def test_the_automatic_subset_matches_a_validation_without_batch_size(tmp_path, kind):
    """A validation loader without batch_size fell back to 200 samples against 20 validated."""
    from torch.utils.data import BatchSampler, SequentialSampler

    train, val = _clf_data(200, 0), _clf_data(20, 1)
    if kind == "batch_sampler":
        loader = DataLoader(val, batch_sampler=BatchSampler(SequentialSampler(val), 8, False))
    else:

        class Batches(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return 4

            def __getitem__(self, i):
                return val.tensors[0][5 * i : 5 * i + 5], val.tensors[1][5 * i : 5 * i + 5]

        loader = DataLoader(Batches(), batch_size=None)
    gap = GeneralizationGapMonitor()
    module = _clf_module()
    _trainer(tmp_path, max_steps=3, val_check_interval=3, callbacks=[gap]).fit(
        module, DataLoader(train, batch_size=8), loader
    )
    assert sum(len(b[0]) for b in gap._batches) == 20
    want = _subset_loss(module.net, train, 200, 20)
    assert gap.history[-1]["gap/train/loss"] == pytest.approx(want, rel=1e-6)


def test_a_per_class_metric_is_refused_at_construction():
    from torchmetrics.classification import MulticlassAccuracy

    with pytest.raises(MisconfigurationException, match="one value per class"):
        GeneralizationGapMonitor(metrics={"acc": MulticlassAccuracy(3, average=None)})
    GeneralizationGapMonitor(metrics={"acc": MulticlassAccuracy(3)})  # (macro: one number)


def test_the_automatic_cadence_counts_batches_under_manual_optimization(tmp_path):
    """Two optimizers stepped a batch: max_steps=100 is 50 batches, and the cadence from
    max_steps // 20 gave 11 probes."""
    import lightning.pytorch as pl

    class TwoOptimizers(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            return self.a(x) + self.b(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
            for opt in self.optimizers():
                opt.step()

        def configure_optimizers(self):
            return [torch.optim.SGD(m.parameters(), lr=0.1) for m in (self.a, self.b)]

    monitor = NTKSpectrumMonitor(probe_size=8)
    trainer = _trainer(tmp_path, max_steps=100, callbacks=[monitor])
    trainer.fit(TwoOptimizers(), DataLoader(_clf_data(400, 0), batch_size=4))
    assert trainer.global_step == 100
    assert len(monitor.history) >= 21


def test_a_paired_modules_labels_key_is_left_out_of_the_probe(tmp_path):
    """labels_key="answer" ended the fit at train start: model(**batch) got the targets."""

    class Net(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x)

    class Dicts(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.data = _clf_data(16, 0)

        def __len__(self) -> int:
            return 16

        def __getitem__(self, i):
            x, y = self.data[i]
            return {"x": x, "answer": y}

    monitor = NTKSpectrumMonitor(every_n_steps=1, probe_size=4)
    pair = PairedModule(Net(1), Net(2), labels_key="answer", lr=0.1)
    _trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(
        pair, DataLoader(Dicts(), batch_size=4)
    )
    assert len(monitor.history) == 3
    assert {"ntk/model/condition_number", "ntk/baseline/condition_number"} <= set(
        monitor.history[0]
    )


def test_the_spectrum_figure_shows_the_logged_kappa():
    """A numerically singular K (a tiny negative λ_min) read κ = -2.7e16 in the legend."""
    from glu_probe.callbacks.ntk import _spectrum_figure

    eig = torch.tensor([-5e-16, 1e-3, 1.0], dtype=torch.float64)
    legend = _spectrum_figure({"": eig}, 0).axes[0].get_legend().get_texts()[0].get_text()
    assert "κ=inf" in legend and "1 ≤ 0 not drawn" in legend
    legend = _spectrum_figure({"": eig}, 0, {"": float("inf")}).axes[0].get_legend().get_texts()
    assert "κ=inf" in legend[0].get_text()
