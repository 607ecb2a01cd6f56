"""Findings of the session-24 review of PairedModule and the monitors under real Trainer
configurations (each test fails on the code before it)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, MutableMapping

import pytest
import torch
import torch.nn.functional as F
from conftest import LIGHTNING_VERSION
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_paired import _data, _solo, _trainer
from torch import nn
from torch.utils.data import DataLoader

from glu_probe.callbacks import (
    GeneralizationGapMonitor,
    LossCrossingMonitor,
    NTKSpectrumMonitor,
    PairedModule,
)
from glu_probe.ntk import ntk_matrix


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
def test_train_mode_dropout_with_batchnorm_gives_one_networks_kernel(output):
    """BatchNorm couples the samples, so K comes from products over the whole batch; with
    active dropout a vmapped block of columns crashed with vmap's randomness error ("full").
    Column by column every product draws the same masks: K is the Gram matrix of one
    network's Jacobian (the same matrix as single-column products, and PSD)."""
    from glu_probe.ntk import NTKOperator

    model = _dropout_bn().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        K = ntk_matrix(model, x, eval_mode=False, output=output)
        op = NTKOperator(model, x, eval_mode=False, output=output)
        eye = torch.eye(K.shape[0], dtype=torch.float64)
        columns = torch.cat([op.matvec(eye[:, i : i + 1]) for i in range(K.shape[0])], dim=1)
    torch.testing.assert_close(columns, columns.T, rtol=0, atol=1e-12 * K.abs().max())
    torch.testing.assert_close(K, columns, rtol=1e-12, atol=1e-12 * K.abs().max())
    assert torch.linalg.eigvalsh(K)[0] > -1e-10 * K.abs().max()
    assert K.shape[0] == (8 if output == "pntk" else 32)


def test_the_monitor_probes_train_mode_dropout_with_batchnorm(tmp_path):
    """NTKSpectrumMonitor(eval_mode=False, method="dense") ended the fit at the first probe."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _dropout_bn()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, eval_mode=False, method="dense", output="full"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(
            Module(), DataLoader(_data(16, d=6), batch_size=8)
        )
    assert len(monitor.history) == 3
    assert all(math.isfinite(h["ntk/condition_number"]) for h in monitor.history)


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


def _two_optimizers():
    """A manual-optimization module that steps two optimizers a batch (global_step + 2)."""
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

    return TwoOptimizers()


def test_the_automatic_cadence_counts_batches_under_manual_optimization(tmp_path):
    """Two optimizers stepped a batch: max_steps=100 is 50 batches, and the cadence from
    max_steps // 20 gave 11 probes."""

    monitor = NTKSpectrumMonitor(probe_size=8)
    trainer = _trainer(tmp_path, max_steps=100, callbacks=[monitor])
    trainer.fit(_two_optimizers(), DataLoader(_clf_data(400, 0), batch_size=4))
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


# ---------------------------------------------------------------- re-review of the fixes
class _ReadOnly(Mapping):
    def __init__(self, d) -> None:
        self._d = dict(d)

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


class _Mutable(MutableMapping):
    """A mutable mapping without ``__copy__``: ``copy.copy`` shares its storage."""

    def __init__(self, d=()) -> None:
        self._d = dict(d)

    def __getitem__(self, k):
        return self._d[k]

    def __setitem__(self, k, v) -> None:
        self._d[k] = v

    def __delitem__(self, k) -> None:
        del self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


class _InPlaceFirst(nn.Module):
    def __init__(self, seed: int, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.act = nn.ReLU(inplace=inplace)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(self.act(x))


class _Plain(nn.Module):
    """A linear layer alone (its output changes when its input was ReLU'd in place)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("kind", [_ReadOnly, _Mutable])
def test_mapping_batches_of_any_kind_train_and_keep_the_baseline_apart(tmp_path, kind):
    """The copy crashed read-only mappings ("does not support item assignment") and, for a
    mutable mapping without __copy__, wrote the clones into the caller's own storage (the
    baseline still saw the model's in-place ReLU: 0.112 off its solo run)."""
    torch.manual_seed(0)
    X, Y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def collate(items):
        return kind({"x": X[items], "labels": Y[items]})

    loader = DataLoader(list(range(16)), batch_size=4, collate_fn=collate)
    pair = PairedModule(_InPlaceFirst(1, True), _Plain(2), optimizer="sgd", lr=0.1)
    _trainer(tmp_path, max_steps=4).fit(pair, loader)
    solo = _Plain(2)
    opt = torch.optim.SGD(solo.parameters(), lr=0.1)
    for i, batch in enumerate(loader):
        if i == 4:
            break
        opt.zero_grad()
        F.cross_entropy(solo(batch["x"]), batch["labels"]).backward()
        opt.step()
    assert torch.equal(solo.lin.weight, pair.baseline.lin.weight)


def test_predict_gives_the_baseline_its_own_inputs():
    pair = PairedModule(_Plain(1), _InPlaceFirst(2, True))
    x = torch.randn(6, 4)
    out = pair.predict_step((x.clone(), torch.zeros(6, dtype=torch.long)), 0)
    torch.testing.assert_close(out["model"], pair.model(x.clone()), rtol=0, atol=0)


def test_a_batch_sampler_with_its_own_generator_is_not_drawn_from(tmp_path):
    """Learning the batch size by iterating a bucketing batch sampler advanced its private
    numpy generator: the run's batch order, and its parameters, changed (0.108)."""
    import lightning.pytorch as pl
    import numpy as np
    from torch.utils.data import Sampler

    class Buckets(Sampler):
        def __init__(self, n: int, bs: int) -> None:
            self.n, self.bs, self.rng = n, bs, np.random.default_rng(0)

        def __iter__(self):
            perm = self.rng.permutation(self.n)
            for i in range(0, self.n, self.bs):
                yield perm[i : i + self.bs].tolist()

        def __len__(self) -> int:
            return -(-self.n // self.bs)

    data = _clf_data(32, 0)

    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        module = _clf_module()
        _trainer(tmp_path, max_epochs=2, val_check_interval=4, callbacks=callbacks).fit(
            module,
            DataLoader(data, batch_sampler=Buckets(32, 4)),
            DataLoader(data, batch_sampler=Buckets(32, 8)),
        )
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    gap = GeneralizationGapMonitor(train_subset_size=8)
    assert torch.equal(run([]), run([gap]))
    # (evaluated at the larger of the two loaders' batch sizes, 4 and 8, read without drawing)
    assert [len(b[0]) for b in gap._batches] == [8]


def test_the_accelerator_path_counts_like_the_cpu_path(monkeypatch):
    """On an accelerator a batch with no loss terms (NaN·0) counted as skipped, and the
    non-finite batch still fed the metrics while the CPU path left them out."""
    from torchmetrics.classification import MulticlassAccuracy

    from glu_probe.callbacks import gap as gap_module

    batches = [
        (torch.tensor(0.5), torch.eye(3)[[0, 1]], torch.tensor([0, 1])),
        (torch.tensor(float("nan")), torch.eye(3)[[2, 2]], torch.tensor([0, 1])),
        (torch.tensor(float("nan")), torch.eye(3)[[0]], torch.tensor([-100])),  # no terms
    ]
    results = []
    for lazy in (False, True):
        monkeypatch.setattr(gap_module, "_reads_lazily", lambda loss, target, lazy=lazy: lazy)
        side = gap_module._Side({"acc": MulticlassAccuracy(3, ignore_index=-100)}, "cpu", False)
        for loss, preds, target in batches:
            side.add(loss, preds, target)
        acc = float(side.metrics["acc"].compute())
        results.append((side.loss_sum, side.count, side.skipped, acc))
    assert results[0] == results[1]
    assert results[0][:3] == (1.0, 2.0, 1.0)


def test_logged_mode_still_refuses_a_name_that_never_comes(tmp_path):
    """Missing keys became one warning for the whole run: a misspelt train_key logged no gap
    at any of 12 validations."""
    train, val = _clf_data(48, 0), _clf_data(16, 1)
    gap = GeneralizationGapMonitor(mode="logged", train_key="trian_loss", val_key="val_loss")
    trainer = _trainer(tmp_path, max_epochs=3, val_check_interval=3, callbacks=[gap])
    with (
        pytest.warns(UserWarning, match="not logged"),
        pytest.raises(MisconfigurationException, match="'trian_loss' is not logged"),
    ):
        trainer.fit(_clf_module(), DataLoader(train, batch_size=8), DataLoader(val, batch_size=8))
    assert trainer.current_epoch == 1  # (the first validation of the second epoch)


@pytest.mark.parametrize("name", ["valLoss", "valloss", "ValLoss", "evalLoss", "validLoss"])
def test_run_together_and_camel_case_validation_names(name):
    assert LossCrossingMonitor(baseline=[1.0, 2.0], monitor=name).phase == "val"


def test_a_resumed_manual_optimization_run_keeps_its_cadence_quietly(tmp_path):
    """The restored cadence was compared with max_steps // 20 before the recheck: a warning of
    a cadence change that the recheck then undid."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    loader = DataLoader(_clf_data(400, 0), batch_size=4)
    whole = NTKSpectrumMonitor(probe_size=8, target_probes=5)
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ck", filename="{step}", every_n_train_steps=10, save_top_k=-1
    )
    _trainer(tmp_path, max_steps=40, callbacks=[whole, ckpt], enable_checkpointing=True).fit(
        _two_optimizers(), loader
    )
    resumed = NTKSpectrumMonitor(probe_size=8, target_probes=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, max_steps=40, callbacks=[resumed], enable_checkpointing=False).fit(
            _two_optimizers(), loader, ckpt_path=str(tmp_path / "ck" / "step=20.ckpt")
        )
    assert not [w for w in caught if "cadence" in str(w.message)]
    # (Lightning 2.4 restores the logger step of such a checkpoint one short, for every logged
    # metric: 9 at global step 20 after 10 batches. Since session 29 the monitor counts its
    # cadence without that shift: it probes the uninterrupted run's global steps, as many
    # times, and logs them at Lightning's logger step, one short like the losses; before, it
    # probed one batch late in global steps and dropped the last probe)
    want = [h["step"] for h in whole.history]
    if LIGHTNING_VERSION < (2, 5):
        want = [s - 1 if s >= 10 else s for s in want]
    assert [h["step"] for h in resumed.history] == want


# ---------------------------------------------------------------- configuration and dashboard
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NTKSpectrumMonitor(eval_mode="no"), "eval_mode"),
        (lambda: NTKSpectrumMonitor(strict="false"), "strict"),
        (lambda: NTKSpectrumMonitor(shard_probe="no"), "shard_probe"),
        (lambda: NTKSpectrumMonitor(params=[]), "selects no parameter"),
        (lambda: GeneralizationGapMonitor(log_components="no"), "log_components"),
        (lambda: GeneralizationGapMonitor(train_subset=3), "train_subset"),
        (lambda: PairedModule(nn.Linear(2, 2), nn.Linear(2, 2), causal_lm="no"), "causal_lm"),
        (lambda: PairedModule(nn.Linear(2, 2), nn.Linear(2, 2), labels_key=""), "labels_key"),
    ],
)
def test_bad_values_are_refused_at_construction(make, match):
    """Strings were taken as true flags (strict='false' did the opposite of what was meant)."""
    with pytest.raises(MisconfigurationException, match=match):
        make()


def test_dashboard_arguments_are_checked():
    from glu_probe.callbacks import TensorBoardDashboard

    with pytest.raises(MisconfigurationException, match="must not contain '/'"):
        TensorBoardDashboard(model_prefix="a/")
    with pytest.raises(MisconfigurationException, match="pairs"):
        TensorBoardDashboard(pairs=[1])
    with pytest.raises(MisconfigurationException, match="include_defaults"):
        TensorBoardDashboard(include_defaults="yes")


def _layout_tags(log_dir) -> tuple[dict[str, list[str]], list[str]]:
    """The written layout's charts -> the logged scalar tags each matches."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    (event,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    charts = {}
    for category in layout.category:
        for chart in category.chart:
            patterns = chart.multiline.tag
            charts[chart.title] = [t for t in tags if any(re.search(p, t) for p in patterns)]
    return charts, tags


def _paired_dashboard_run(tmp_path, logger, n_val_loaders: int = 1) -> None:
    from glu_probe.callbacks import TensorBoardDashboard

    pair = PairedModule(nn.Linear(8, 3), nn.Linear(8, 3), lr=0.1)
    val = [DataLoader(_data(8), batch_size=4) for _ in range(n_val_loaders)]
    dashboard = TensorBoardDashboard()
    _trainer(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1, callbacks=[dashboard]).fit(
        pair, DataLoader(_data(16), batch_size=4), val if n_val_loaders > 1 else val[0]
    )


def test_the_val_chart_draws_several_validation_loaders(tmp_path):
    """Several loaders log .../val_loss/dataloader_idx_k: the chart matched none of them."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _paired_dashboard_run(tmp_path, logger, n_val_loaders=2)
    charts, _ = _layout_tags(logger.log_dir)
    assert sorted(charts["val loss"]) == sorted(
        f"{side}/val_loss/dataloader_idx_{k}" for side in ("model", "baseline") for k in (0, 1)
    )


def test_the_charts_follow_a_loggers_prefix(tmp_path):
    """TensorBoardLogger(prefix="exp") writes exp-model/train_loss: every chart was empty."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="tb", prefix="exp")
    _paired_dashboard_run(tmp_path, logger)
    charts, _ = _layout_tags(logger.log_dir)
    assert sorted(charts["train loss"]) == ["exp-baseline/train_loss", "exp-model/train_loss"]
    assert sorted(charts["val loss"]) == ["exp-baseline/val_loss", "exp-model/val_loss"]


def test_batch_copies_run_no_constructor_again_and_keep_defaultdicts():
    """dataclasses.replace ran __post_init__ again (a /255 applied twice) and reset init=False
    fields; a defaultdict could not be rebuilt and was shared with the model."""
    import collections
    import dataclasses

    from glu_probe.callbacks.paired import _copy_tensors

    @dataclasses.dataclass
    class Inputs:
        pixels: torch.Tensor
        mask: torch.Tensor | None = dataclasses.field(default=None, init=False)

        def __post_init__(self) -> None:
            self.pixels = self.pixels / 255

    batch = Inputs(torch.full((2, 3), 255.0))
    batch.mask = torch.ones(2, dtype=torch.bool)
    copied = _copy_tensors(batch)
    assert torch.equal(copied.pixels, batch.pixels) and copied.pixels is not batch.pixels
    assert copied.mask is not None and torch.equal(copied.mask, batch.mask)
    table = collections.defaultdict(list, {"x": torch.ones(2)})
    out = _copy_tensors(table)
    assert type(out) is collections.defaultdict and out.default_factory is list
    assert torch.equal(out["x"], table["x"]) and out["x"] is not table["x"]


def test_dashboard_pairs_given_with_the_loggers_prefix_still_match():
    from glu_probe.callbacks.dashboard import _with_tag_prefix

    layout = {"c": {"acc": ["Multiline", ["^model/acc$", "^exp\\-model/acc$"]]}}
    (patterns,) = [chart[1] for chart in _with_tag_prefix(layout, "exp-")["c"].values()]
    assert patterns == ["^exp\\-model/acc$", "^exp\\-model/acc$"]


def test_dataclass_copies_own_their_non_field_tensors():
    """A tensor made in __post_init__ (no field) stayed shared: a model that changed it in place
    changed the baseline's input (0.045 off its solo run)."""
    import dataclasses

    from glu_probe.callbacks.paired import _copy_tensors

    @dataclasses.dataclass
    class Inputs:
        x: torch.Tensor

        def __post_init__(self) -> None:
            self.scaled = self.x * 2

    batch = Inputs(torch.randn(3, 2))
    copied = _copy_tensors(batch)
    assert torch.equal(copied.scaled, batch.scaled) and copied.scaled is not batch.scaled
    batch.scaled.relu_()
    assert torch.equal(copied.scaled, batch.x * 2)


def test_stochastic_depth_with_lanczos_is_refused_at_setup(tmp_path):
    """timm's DropPath draws random numbers like dropout, but the setup check saw nn.Dropout
    only: eval_mode=False with method="lanczos" ended the fit at its first probe."""
    import lightning.pytorch as pl

    timm = pytest.importorskip("timm")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(6, 3)
            self.drop = timm.layers.DropPath(0.3)

        def forward(self, x):
            return self.drop(self.fc(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = NTKSpectrumMonitor(every_n_steps=1, probe_size=4, eval_mode=False, method="lanczos")
    with pytest.raises(MisconfigurationException, match="dropout"):
        _trainer(tmp_path, max_steps=1, callbacks=[monitor]).fit(
            Module(), DataLoader(_clf_data(8, 0), batch_size=4)
        )
