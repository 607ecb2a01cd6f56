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


# --------------------------------------------------------------------------------------------
# Re-review, session 29: the monitor's evaluations left the user's torchmetrics state updated
# --------------------------------------------------------------------------------------------


class _Metered(pl.LightningModule):
    """The usual pattern: the loss hook updates torchmetrics metrics by calling them and logs
    them per epoch (an accuracy, and a MetricCollection whose precision and recall share one
    compute group's states)."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics import MetricCollection
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassPrecision,
            MulticlassRecall,
        )

        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.train_acc = MulticlassAccuracy(num_classes=3)
        self.train_pr = MetricCollection(
            {"train_prec": MulticlassPrecision(num_classes=3), "train_rec": MulticlassRecall(3)}
        )

    def forward(self, x):
        return self.net(x)

    def compute_loss(self, batch):
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self.train_pr(logits, y)
        self.log_dict(self.train_pr, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)

    def training_step(self, batch, i):
        return self.compute_loss(batch)

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _metered_fit(tmp_path: Path, tag: str, callbacks: list):
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    Xv, Yv = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    model = _Metered()
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path / tag, name=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        val_check_interval=4,  # (mid-epoch: the metrics hold half an epoch at each validation)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            model,
            DataLoader(TensorDataset(X, Y), batch_size=8),
            DataLoader(TensorDataset(Xv, Yv), batch_size=16),
        )
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return model, trainer, rows, params


def test_gap_evaluations_leave_the_users_torchmetrics_state_alone(tmp_path):
    """Per-epoch ``train_acc``/``train_prec``/``train_rec`` logged from the loss hook are the
    run without the monitor's, exactly (the monitor's training-subset and validation batches
    went into them: 0.3249 for 0.3421); the weights are bit-identical."""
    _, t0, rows0, p0 = _metered_fit(tmp_path, "base", [])
    _, t1, rows1, p1 = _metered_fit(tmp_path, "gap", [GeneralizationGapMonitor()])
    assert torch.equal(p0, p1)
    assert "gap/loss" in t1.callback_metrics  # (the monitor did evaluate)
    for key in ("train_acc", "train_prec", "train_rec"):
        base = [(r["epoch"], r[key]) for r in rows0 if r.get(key)]
        assert len(base) == 2, key
        assert [(r["epoch"], r[key]) for r in rows1 if r.get(key)] == base, key
        assert float(t1.callback_metrics[key]) == float(t0.callback_metrics[key]), key


def _metric_zoo():
    """Metrics of every kind of state: tensor sums, a compute group sharing state objects, a
    list (cat) state, and a metric that updates its full state in ``forward``."""
    from torchmetrics import MeanMetric, Metric, MetricCollection
    from torchmetrics.aggregation import CatMetric
    from torchmetrics.classification import MulticlassPrecision, MulticlassRecall

    class _FullState(Metric):
        full_state_update = True

        def __init__(self) -> None:
            super().__init__()
            self.add_state("total", torch.zeros(2), dist_reduce_fx="sum")

        def update(self, x: torch.Tensor) -> None:
            self.total += torch.stack([x.sum(), (x * x).sum()])  # (in place)

        def compute(self) -> torch.Tensor:
            return self.total.clone()

    class _Holder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.mean = MeanMetric()
            self.cat = CatMetric()
            self.full = _FullState()
            self.pr = MetricCollection(
                {"p": MulticlassPrecision(num_classes=3), "r": MulticlassRecall(num_classes=3)}
            )
            self.inner = nn.ModuleDict({"m": MeanMetric()})

        def feed(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.mean(x)
            self.cat(x)
            self.full(x)
            self.pr.update(torch.stack([x, -x, x * x], dim=1), y)  # (compute groups: update)
            self.inner["m"].update(2 * x)

        def results(self) -> list[torch.Tensor]:
            out = [self.mean.compute(), self.cat.compute(), self.full.compute()]
            out += [v for _, v in sorted(self.pr.compute().items())]
            return [*out, self.inner["m"].compute()]

    return _Holder()


@pytest.mark.parametrize("inference", [False, True])
def test_user_state_kept_gives_every_metric_its_state_back(inference):
    """Against a twin that never saw the monitor's batches (a deep copy fed the same user
    batches): after ``_user_state_kept`` the metrics compute, and go on accumulating, exactly as
    the twin's. Under inference mode (Lightning's validation) the states given back still take
    the next training step's in-place updates."""
    import copy

    from glu_probe.callbacks._gap_trainer import _logging_silenced, _user_state_kept

    assert _logging_silenced is _user_state_kept  # (the former name still imports)
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(6)
    ]
    m = _metric_zoo()
    for x, y in batches[:2]:
        m.feed(x, y)
    twin = copy.deepcopy(m)
    kept_state = m.mean.mean_value
    mode = torch.inference_mode() if inference else torch.no_grad()
    with mode, _user_state_kept(m):
        for x, y in batches[2:4]:  # the monitor's evaluations
            m.feed(x * 10, y)
        m.mean.compute()
    assert m.mean.mean_value is kept_state  # (not changed in place: the object itself is back)
    # the compute group still shares its states (precision's and recall's are one object; a
    # compute(), or coll["p"], copies them until the next update)
    for coll in (m.pr, twin.pr):
        p, r = coll._modules["p"], coll._modules["r"]
        assert all(getattr(p, s) is getattr(r, s) for s in p._defaults)
    for a, b in zip(m.results(), twin.results(), strict=True):
        assert torch.equal(a, b)
    for x, y in batches[4:]:  # the user's next steps, outside any mode
        m.feed(x, y)
        twin.feed(x, y)
    for a, b in zip(m.results(), twin.results(), strict=True):
        assert torch.equal(a, b)
    # a DDP sync (a world of one: the gather returns the rank's own state) after the restore
    for metric in (m.mean, m.cat, m.full):
        metric.sync(dist_sync_fn=lambda t, group=None: [t], distributed_available=lambda: True)
        assert metric._is_synced
        metric.unsync()
    for a, b in zip(m.results(), twin.results(), strict=True):
        assert torch.equal(a, b)
    assert m.full._update_count == twin.full._update_count == 4
