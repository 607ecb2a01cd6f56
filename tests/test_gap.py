"""GeneralizationGapMonitor: numbers against an independent recomputation, in real Trainer runs."""

from __future__ import annotations

import copy
import csv
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from glu_probe.callbacks import gap as gap_mod
from glu_probe.callbacks.gap import GeneralizationGapMonitor
from glu_probe.callbacks.paired import PairedModule

torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
    )


class Classifier(pl.LightningModule):
    """Uses the ``loss_fn`` attribute contract."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = _net(seed)
        self.loss_fn = F.cross_entropy

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


TRAIN, VAL = _data(48, 0), _data(30, 1)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
        max_epochs=2,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def _loaders(shuffle: bool = True):
    return DataLoader(TRAIN, batch_size=8, shuffle=shuffle), DataLoader(VAL, batch_size=8)


def _last_row(logger: CSVLogger, key: str) -> dict[str, str]:
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r for r in rows if r.get(key)][-1]


def _subset(n: int, k: int, seed: int = 0):
    """The documented subset rule, recomputed: sorted randperm(n, seed)[:k]."""
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return TRAIN.tensors[0][idx], TRAIN.tensors[1][idx]


def _mean_ce_and_acc(net: nn.Module, x, y) -> tuple[float, float]:
    net.eval()
    with torch.no_grad():
        logits = net(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


@pytest.mark.parametrize("lazy", [False, True], ids=["read-per-batch", "queued-on-device"])
def test_clean_gap_equals_independent_recomputation(tmp_path, monkeypatch, lazy):
    # lazy: the accelerator path (sums queued as float64 tensors, read once), forced on CPU
    monkeypatch.setattr(gap_mod, "_reads_lazily", lambda loss, target: lazy)
    mon = GeneralizationGapMonitor(
        train_subset_size=20, metrics={"acc": MulticlassAccuracy(num_classes=3, average="micro")}
    )
    logger = CSVLogger(str(tmp_path))
    module = Classifier()
    train, val = _loaders()
    _trainer(tmp_path, logger=logger, callbacks=[mon]).fit(module, train, val)
    assert len(mon.history) == 2  # one per validation
    # the last validation ran after the last optimizer step: final weights are those measured
    tr_loss, tr_acc = _mean_ce_and_acc(module.net, *_subset(48, 20))
    va_loss, va_acc = _mean_ce_and_acc(module.net, *VAL.tensors)
    row = _last_row(logger, "gap/loss")
    assert float(row["gap/loss"]) == pytest.approx(va_loss - tr_loss, rel=1e-5, abs=1e-6)
    assert float(row["gap/train/loss"]) == pytest.approx(tr_loss, rel=1e-5)
    assert float(row["gap/val/loss"]) == pytest.approx(va_loss, rel=1e-5)
    assert float(row["gap/acc"]) == pytest.approx(va_acc - tr_acc, abs=1e-6)
    # the clean val loss agrees with the module's own logged val loss (same eval, same data)
    assert float(_last_row(logger, "val_loss")["val_loss"]) == pytest.approx(va_loss, rel=1e-5)
    assert module.training  # flags restored


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_true_precision_casts_the_subset_like_the_loops(tmp_path, precision):
    """(Session 19.) Under ``"64-true"`` / ``"bf16-true"`` the weights are float64 / bf16 and
    Lightning's loops cast each batch's floating tensors to match (the precision plugin's
    ``convert_input``). The monitor's own training subset was moved but not cast, so the first
    validation crashed the fit ("mat1 and mat2 must have the same dtype"); now it is cast like
    the loops' batches, and the gap matches an independent recomputation in that dtype."""
    mon = GeneralizationGapMonitor(train_subset_size=20)
    logger = CSVLogger(str(tmp_path))
    module = Classifier()
    _trainer(tmp_path, logger=logger, callbacks=[mon], precision=precision).fit(module, *_loaders())
    dtype = torch.float64 if precision == "64-true" else torch.bfloat16
    assert next(module.parameters()).dtype == dtype
    x, y = _subset(48, 20)
    tr_loss, _ = _mean_ce_and_acc(module.net, x.to(dtype), y)
    va_loss, _ = _mean_ce_and_acc(module.net, VAL.tensors[0].to(dtype), VAL.tensors[1])
    # bf16: losses of batches of 8 against one batch of all samples, each rounded to 8 bits
    rel = 1e-9 if dtype == torch.float64 else 2e-2
    assert mon.history[-1]["gap/train/loss"] == pytest.approx(tr_loss, rel=rel)
    assert mon.history[-1]["gap/val/loss"] == pytest.approx(va_loss, rel=rel)
    logged = float(_last_row(logger, "val_loss")["val_loss"])
    assert mon.history[-1]["gap/val/loss"] == pytest.approx(logged, rel=rel)


def test_queued_sums_count_non_ignored_tokens(monkeypatch):
    """The on-device accumulation weighs each batch's mean loss by its non-ignored tokens
    (class targets -100), exactly as the per-batch read does."""
    side_read = gap_mod._Side({}, torch.device("cpu"), sync=False)
    side_queued = gap_mod._Side({}, torch.device("cpu"), sync=False)
    gen = torch.Generator().manual_seed(0)
    total, terms = 0.0, 0
    for _ in range(3):
        logits = torch.randn(4, 7, 5, generator=gen)
        target = torch.randint(0, 5, (4, 7), generator=gen)
        target[torch.rand(4, 7, generator=gen) < 0.3] = -100
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        side_read.add(loss, logits, target)
        monkeypatch.setattr(gap_mod, "_reads_lazily", lambda loss, target: True)
        side_queued.add(loss, logits, target)
        monkeypatch.undo()
        keep = target != -100
        total += float(F.cross_entropy(logits[keep].double(), target[keep], reduction="sum"))
        terms += int(keep.sum())
    assert side_queued._queued and side_queued.count == terms == side_read.count
    assert not side_queued._queued  # read once, on first access
    assert side_queued.loss_sum == pytest.approx(side_read.loss_sum, rel=1e-12)
    assert side_queued.loss_sum / terms == pytest.approx(total / terms, rel=1e-6)


@pytest.mark.parametrize(
    ("limit_val", "val_batches", "expected"),
    [(2, None, 12), (None, None, 30), (None, 1, 6), (1.0, None, 30)],
)
def test_automatic_subset_matches_the_validation_size(tmp_path, limit_val, val_batches, expected):
    """train_subset_size=None: as many training samples as the validation run evaluates (val
    batches of 6, capped by limit_val_batches / val_batches; at most AUTO_SUBSET_MAX), drawn
    by the documented rule (sorted seeded randperm prefix), and the gap is computed on them."""
    mon = GeneralizationGapMonitor(val_batches=val_batches)
    logger = CSVLogger(str(tmp_path))
    module = Classifier()
    kw = {} if limit_val is None else {"limit_val_batches": limit_val}
    train, val = DataLoader(TRAIN, batch_size=8, shuffle=True), DataLoader(VAL, batch_size=6)
    _trainer(tmp_path, logger=logger, callbacks=[mon], max_epochs=1, **kw).fit(module, train, val)
    assert sum(gap_mod._n_samples(b) for b in mon._batches) == expected
    tr_loss, _ = _mean_ce_and_acc(module.net, *_subset(48, expected))
    assert float(_last_row(logger, "gap/loss")["gap/train/loss"]) == pytest.approx(
        tr_loss, rel=1e-5
    )


def test_automatic_subset_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(gap_mod, "AUTO_SUBSET_MAX", 10)
    mon = GeneralizationGapMonitor()
    module = Classifier()
    train, val = _loaders()
    _trainer(tmp_path, callbacks=[mon], max_epochs=1).fit(module, train, val)
    assert sum(gap_mod._n_samples(b) for b in mon._batches) == 10


def test_automatic_subset_of_an_iterable_loader(tmp_path):
    """An IterableDataset: the first batches of a fresh iterator, cut to the val size."""
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(TRAIN.tensors[0], TRAIN.tensors[1], strict=True))

    mon = GeneralizationGapMonitor()
    module = Classifier()
    train = DataLoader(Stream(), batch_size=4)
    val = DataLoader(VAL, batch_size=6)
    trainer = _trainer(
        tmp_path, callbacks=[mon], max_steps=6, val_check_interval=3, limit_val_batches=2
    )
    trainer.fit(module, train, val)
    assert len(mon.history) == 2
    assert [gap_mod._n_samples(b) for b in mon._batches] == [4, 4, 4]  # >= 12 samples


@pytest.mark.parametrize(("eval_batch_size", "n_batches"), [(None, 2), (24, 1), (5, 5)])
def test_training_subset_eval_batch_size(tmp_path, eval_batch_size, n_batches):
    """Train batches of 4, val batches of 16: by default the 24-sample subset is evaluated in
    batches of 16 (the larger loader batch size), or as asked; the gap is the same."""
    calls: list[int] = []

    class Counting(Classifier):
        def forward(self, x):
            if not self.training:
                calls.append(x.shape[0])
            return super().forward(x)

    mon = GeneralizationGapMonitor(train_subset_size=24, eval_batch_size=eval_batch_size)
    module = Counting()
    train, val = DataLoader(TRAIN, batch_size=4), DataLoader(VAL, batch_size=16)
    _trainer(tmp_path, callbacks=[mon], max_epochs=1).fit(module, train, val)
    # the subset at the first validation batch's start (under the weights validation runs with:
    # an EMA callback swaps them in at the epoch start), then each val batch twice (Lightning's
    # step, then the monitor's re-evaluation)
    assert calls[n_batches:] == [16, 16, 14, 14]
    assert sum(calls[:n_batches]) == 24
    tr_loss, _ = _mean_ce_and_acc(module.net, *_subset(48, 24))
    va_loss, _ = _mean_ce_and_acc(module.net, *VAL.tensors)
    assert mon.history[-1]["gap/loss"] == pytest.approx(va_loss - tr_loss, rel=1e-5, abs=1e-6)


def test_zero_interference_and_flags(tmp_path):
    finals = []
    for callbacks in ([], [GeneralizationGapMonitor(train_subset_size=16)]):
        module = Classifier()
        train, val = _loaders(shuffle=True)
        torch.manual_seed(0)
        _trainer(tmp_path, callbacks=callbacks).fit(module, train, val)
        finals.append(copy.deepcopy(module.state_dict()))  # includes BatchNorm running stats
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k
    # direct check: grads, RNG and per-module flags are untouched by an evaluation
    module = Classifier()
    mon = GeneralizationGapMonitor()
    mon._sides = {"": {"train": _SideProbe(), "val": _SideProbe()}}
    module.train()
    module.net[3].eval()  # a deliberately mixed state
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.5)
    batch = next(iter(DataLoader(TRAIN, batch_size=8)))
    before_rng = torch.get_rng_state()
    mon._evaluate(module, [batch], "train")
    assert torch.equal(torch.get_rng_state(), before_rng)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in module.parameters())
    assert [m.training for m in module.net] == [True, True, True, False, True]


class _SideProbe:
    def add(self, loss, preds, target):
        assert not torch.is_grad_enabled() and not preds.requires_grad


def test_paired_module_measures_model_and_baseline(tmp_path):
    paired = PairedModule(_net(1), _net(2), optimizer="sgd", lr=0.1)
    mon = GeneralizationGapMonitor(train_subset_size=24, val_batches=2)
    logger = CSVLogger(str(tmp_path))
    train, val = _loaders()
    _trainer(tmp_path, logger=logger, callbacks=[mon], max_epochs=1).fit(paired, train, val)
    row = _last_row(logger, "gap/model/loss")
    x_val, y_val = VAL.tensors[0][:16], VAL.tensors[1][:16]  # val_batches=2 of size 8
    for prefix, net in (("model", paired.model), ("baseline", paired.baseline)):
        tr, _ = _mean_ce_and_acc(net, *_subset(48, 24))
        va, _ = _mean_ce_and_acc(net, x_val, y_val)
        assert float(row[f"gap/{prefix}/loss"]) == pytest.approx(va - tr, rel=1e-5, abs=1e-6)
    assert "gap/loss" not in row or row["gap/loss"] == ""


def test_paired_validation_batches_are_not_evaluated_twice(tmp_path, monkeypatch):
    """The monitor reads the val side from PairedModule.validation_step's outputs: per
    validation, evaluate() runs once per member per val batch (Lightning's own pass) plus the
    training subset, and the gaps equal those of the re-evaluating path exactly."""
    import glu_probe.callbacks.gap as gap_mod

    def fit(reuse: bool) -> tuple[list[dict], list[str]]:
        if not reuse:
            monkeypatch.setattr(gap_mod, "_paired_evaluations", lambda *a: None)
        calls: list[str] = []
        paired = PairedModule(_net(1), _net(2), optimizer="sgd", lr=0.1)
        real = paired.evaluate

        def counting(batch, which="model"):
            calls.append("train" if paired.training else "eval")
            return real(batch, which)

        paired.evaluate = counting  # type: ignore[method-assign]
        acc = MulticlassAccuracy(num_classes=3, average="micro")
        mon = GeneralizationGapMonitor(train_subset_size=24, metrics={"acc": acc})
        train, val = _loaders(shuffle=False)
        _trainer(tmp_path, callbacks=[mon], max_epochs=1).fit(paired, train, val)
        monkeypatch.undo()
        return mon.history, calls

    hist, calls = fit(reuse=True)
    ref_hist, ref_calls = fit(reuse=False)
    assert hist == ref_hist  # same numbers, bit for bit
    val_batches, subset_batches, members = 4, 3, 2  # 30 val samples / 8; 24 subset / 8
    assert calls.count("eval") == members * (val_batches + subset_batches)
    assert ref_calls.count("eval") == members * (2 * val_batches + subset_batches)


@pytest.mark.parametrize("paired", [False, True], ids=["module", "paired"])
def test_mixed_precision_training_gap_is_measured_under_one_precision(tmp_path, paired):
    """Under precision="bf16-mixed" both sides are evaluated under the Trainer's autocast, as
    its own validation_step is: with the training set as the validation set the gap is exactly
    0, and the clean val loss equals the module's own logged val loss."""
    module: pl.LightningModule = (
        PairedModule(_net(1), _net(2), optimizer="sgd", lr=0.1) if paired else Classifier()
    )
    mon = GeneralizationGapMonitor(train_subset_size=len(TRAIN))  # all of it, in order
    logger = CSVLogger(str(tmp_path))
    same = DataLoader(TRAIN, batch_size=8)
    trainer = _trainer(
        tmp_path, logger=logger, callbacks=[mon], max_epochs=1, precision="bf16-mixed"
    )
    trainer.fit(module, DataLoader(TRAIN, batch_size=8, shuffle=True), same)
    tags = ("model", "baseline") if paired else ("",)
    for tag in tags:
        prefix = f"gap/{tag}/" if tag else "gap/"
        assert mon.history[-1][f"{prefix}loss"] == 0.0, tag
    if not paired:
        logged = float(_last_row(logger, "val_loss")["val_loss"])
        assert mon.history[-1]["gap/val/loss"] == pytest.approx(logged, rel=1e-6)
        # and it is the autocast loss, which differs from a float32 evaluation
        net = module.net.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            auto = float(F.cross_entropy(net(TRAIN.tensors[0]).float(), TRAIN.tensors[1]))
        f32, _ = _mean_ce_and_acc(net, *TRAIN.tensors)
        assert logged == pytest.approx(auto, rel=2e-3) and abs(auto - f32) > 1e-5


def test_logged_mode_reads_callback_metrics(tmp_path):
    mon = GeneralizationGapMonitor(mode="logged")
    module = Classifier()
    train, val = _loaders()
    trainer = _trainer(tmp_path, callbacks=[mon], max_epochs=1)
    trainer.fit(module, train, val)
    (entry,) = mon.history
    cm = trainer.callback_metrics
    assert entry["gap/loss"] == pytest.approx(float(cm["val_loss"]) - float(cm["train_loss"]))
    # A name not logged (yet) is said once and left out; the fit goes on (session 24: a
    # training loss logged per epoch exists only from the first epoch end on, and its absence
    # at an earlier validation ended the fit with a MisconfigurationException).
    mon = GeneralizationGapMonitor(mode="logged", metrics=["acc"])
    with pytest.warns(UserWarning, match=r"'train_acc' is not logged \(yet\)"):
        _trainer(tmp_path, callbacks=[mon], max_epochs=1).fit(Classifier(), *_loaders())
    (entry,) = mon.history
    assert "gap/loss" in entry and "gap/acc" not in entry


class GradPenalty(Classifier):
    """A loss hook that needs autograd even when called under no_grad."""

    def compute_loss(self, batch):
        x, y = batch
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)
            loss = F.cross_entropy(self(x), y)
            (g,) = torch.autograd.grad(loss, x)
        return loss.detach() + g.pow(2).sum().detach()


def test_inference_mode(tmp_path):
    train, val = _loaders()
    # fit's validation runs under no_grad even with inference_mode=True (the default), so a loss
    # hook that re-enables autograd works there
    for inference_mode in (False, True):
        mon = GeneralizationGapMonitor(train_subset_size=8)
        trainer = _trainer(tmp_path, callbacks=[mon], max_epochs=1, inference_mode=inference_mode)
        trainer.fit(GradPenalty(), train, val)
        assert "gap/loss" in mon.history[0]
    # a stand-alone validate (inference mode) is skipped with a clear message
    with pytest.warns(UserWarning, match=r"skipping trainer.validate\(\) \(under inference mode\)"):
        trainer.validate(trainer.lightning_module, val, verbose=False)
    assert len(mon.history) == 1
    # and a hook that needs autograd under inference mode gets told what to do
    module = GradPenalty()
    mon = GeneralizationGapMonitor()
    mon._sides = {"": {"train": _SideProbe(), "val": _SideProbe()}}
    with (
        torch.inference_mode(),
        pytest.raises(MisconfigurationException, match="inference_mode=False"),
    ):
        mon._evaluate(module, [(TRAIN.tensors[0][:4], TRAIN.tensors[1][:4])], "val")


def test_quiet_runs_and_bad_config(tmp_path):
    mon = GeneralizationGapMonitor(train_subset_size=8)
    _trainer(tmp_path, callbacks=[mon], fast_dev_run=2).fit(Classifier(), *_loaders())
    assert mon.history == []
    mon = GeneralizationGapMonitor(train_subset_size=8)
    trainer = _trainer(tmp_path, callbacks=[mon], num_sanity_val_steps=2, max_epochs=1)
    trainer.fit(Classifier(), *_loaders())
    assert len(mon.history) == 1  # the sanity check did not count

    with pytest.raises(MisconfigurationException, match="mode must be"):
        GeneralizationGapMonitor(mode="fast")
    with pytest.raises(MisconfigurationException, match="train_subset_size"):
        GeneralizationGapMonitor(train_subset_size=0)
    with pytest.raises(MisconfigurationException, match="val_batches"):
        GeneralizationGapMonitor(val_batches=-2)
    with pytest.raises(MisconfigurationException, match="eval_batch_size"):
        GeneralizationGapMonitor(eval_batch_size=0)
    for seed in ("a", 1.5, True):  # (int("a") raised a plain ValueError)
        with pytest.raises(MisconfigurationException, match="`seed` must be an int"):
            GeneralizationGapMonitor(seed=seed)
    with pytest.raises(MisconfigurationException, match=r"not a torchmetrics\.Metric"):
        GeneralizationGapMonitor(metrics={"acc": lambda p, t: 0.0})
    with pytest.raises(MisconfigurationException, match="metric name 'loss'"):
        GeneralizationGapMonitor(metrics={"loss": MulticlassAccuracy(num_classes=3)})
    with pytest.raises(MisconfigurationException, match="pair"):
        GeneralizationGapMonitor(mode="logged", metrics={"acc": "val_acc"})

    class NoLoss(Classifier):
        def __init__(self):
            super().__init__()
            del self.loss_fn

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            pass

    with pytest.raises(MisconfigurationException, match="cannot find the loss"):
        _trainer(tmp_path, callbacks=[GeneralizationGapMonitor()], max_epochs=1).fit(
            NoLoss(), *_loaders()
        )


def _fit_recording_probes(tmp_path, monkeypatch, gap, probe_size, train, val):
    """Fit a Classifier for one epoch with ``gap`` and an NTK monitor of ``probe_size``; return
    the model and the NTK monitor's default probes as drawn from the loader."""
    from glu_probe.callbacks import NTKSpectrumMonitor

    ntk = NTKSpectrumMonitor(every_n_steps=1000, probe_size=probe_size, log_figure=False)
    probes: list = []
    plain = NTKSpectrumMonitor._probe_from_loader

    def spy(self, trainer):
        probes.append(plain(self, trainer))
        return probes[-1]

    monkeypatch.setattr(NTKSpectrumMonitor, "_probe_from_loader", spy)
    model = Classifier()
    _trainer(tmp_path, max_epochs=1, callbacks=[gap, ntk]).fit(model, train, val)
    return model, probes


def test_a_split_made_by_a_subset_sampler_keeps_the_subset_on_the_training_side(
    tmp_path, monkeypatch
):
    """(Review, session 18.) One dataset split into train/val by ``SubsetRandomSampler``s: the
    gap monitor drew its "training" subset from the whole dataset (validation samples included;
    23 of 64 in the review, gap 41% too small), and the NTK monitor's default probe took the
    dataset's first samples. Both now draw from the sampler's indices, and the clean training
    loss is that of training samples only."""
    from torch.utils.data import SubsetRandomSampler

    full = _data(80, 3)
    train_idx, val_idx = list(range(40, 80)), list(range(40))
    gen = torch.Generator().manual_seed(1)
    train = DataLoader(full, batch_size=8, sampler=SubsetRandomSampler(train_idx, generator=gen))
    val = DataLoader(full, batch_size=8, sampler=SubsetRandomSampler(val_idx))
    gap = GeneralizationGapMonitor(train_subset_size=16)
    model, probes = _fit_recording_probes(tmp_path, monkeypatch, gap, 6, train, val)
    drawn = sorted(gap._order)
    assert len(drawn) == 16 and all(i in train_idx for i in drawn)  # (the old code: 7 of 16 not)
    want = torch.randperm(40, generator=torch.Generator().manual_seed(gap.seed))[:16]
    assert drawn == sorted(train_idx[i] for i in want.tolist())  # the documented rule, on the pool
    loss, _ = _mean_ce_and_acc(model.net, *full[drawn])
    assert gap.history[-1]["gap/train/loss"] == pytest.approx(loss, rel=1e-5)
    assert torch.equal(probes[0][0], full.tensors[0][40:46])  # the sampler's first indices


def test_a_loader_without_automatic_batching_hands_out_batches_not_samples(tmp_path, monkeypatch):
    """``DataLoader(batch_size=None)`` over a dataset whose items are whole batches: the gap
    monitor's subset is made of seeded whole items and the NTK monitor's default probe of the
    first samples of the first items. Before, both collated *items* as if they were samples:
    the probe was a list of 20 batches (a crash naming the wrong cause) and the gap subset a
    list of 16 batches (refused as a 16-element batch)."""
    from torch.utils.data import BatchSampler, Dataset, SequentialSampler

    from glu_probe.callbacks._utils import items_are_batches

    full = _data(80, 3)
    x_all, y_all = full.tensors

    class Batches(Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            return x_all[8 * i : 8 * i + 8], y_all[8 * i : 8 * i + 8]

    gen = torch.Generator().manual_seed(1)
    train = DataLoader(Batches(), batch_size=None, shuffle=True, generator=gen)
    val = DataLoader(_data(24, 4), batch_size=8)
    assert items_are_batches(train) and not items_are_batches(val)
    assert not items_are_batches(
        DataLoader(full, batch_sampler=BatchSampler(SequentialSampler(full), 8, False))
    )  # a batch sampler: items are samples
    gap = GeneralizationGapMonitor(train_subset_size=16)
    model, probes = _fit_recording_probes(tmp_path, monkeypatch, gap, 20, train, val)
    assert torch.equal(probes[0][0], x_all[:20]) and torch.equal(probes[0][1], y_all[:20])
    items = torch.randperm(10, generator=torch.Generator().manual_seed(gap.seed))[:2].tolist()
    rows = torch.cat([torch.arange(8 * i, 8 * i + 8) for i in items])
    loss, _ = _mean_ce_and_acc(model.net, x_all[rows], y_all[rows])
    assert gap.history[-1]["gap/train/loss"] == pytest.approx(loss, rel=1e-5)


def test_sampler_indices_reads_sequences_only():
    """A sampler's ``indices`` is read only where it is a sequence or an array: a one-shot
    iterator would be emptied for the training loader (second review, session 18)."""
    from types import SimpleNamespace

    from torch.utils.data import BatchSampler, SubsetRandomSampler

    from glu_probe.callbacks._utils import sampler_indices

    assert sampler_indices(SimpleNamespace(sampler=SubsetRandomSampler([5, 3]))) == [5, 3]
    batched = BatchSampler(SubsetRandomSampler(torch.tensor([2, 4])), 2, False)
    assert sampler_indices(SimpleNamespace(sampler=None, batch_sampler=batched)) == [2, 4]
    once = SimpleNamespace(indices=iter([1, 2, 3]))
    assert sampler_indices(SimpleNamespace(sampler=once)) is None
    assert list(once.indices) == [1, 2, 3]  # not consumed
    assert sampler_indices(DataLoader(TRAIN, batch_size=4)) is None  # the whole dataset


class _EvalNaN(Classifier):
    """Outputs NaN in eval mode between steps 3 and 6 (training is unaffected)."""

    def forward(self, x):
        out = self.net(x)
        if not self.training and 3 <= self.global_step <= 6:
            out = out * float("nan")
        return out


def test_a_validation_without_finite_losses_warns_and_logs_no_gap(tmp_path):
    """Non-finite losses are left out of the sums; a validation with none left logged nothing,
    said nothing, and put an entry of the step alone into ``history`` (review, session 20). It
    now warns, and history holds only real gaps."""
    gap = GeneralizationGapMonitor(train_subset_size=16)
    train, val = _loaders(shuffle=False)
    with pytest.warns(RuntimeWarning, match="no finite loss .* at step [35]"):
        _trainer(
            tmp_path, max_epochs=None, max_steps=12, val_check_interval=2, callbacks=[gap]
        ).fit(_EvalNaN(), train, val)
    steps = [int(h["step"]) for h in gap.history]
    assert steps == [1, 7, 9, 11]
    assert all(math.isfinite(h["gap/loss"]) for h in gap.history)


class _DictForward(Classifier):
    """A module whose forward takes the whole dict batch."""

    def forward(self, batch):
        return self.net(batch["x"])

    def training_step(self, batch, batch_idx):
        return self.loss_fn(self(batch), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss_fn(self(batch), batch["labels"]))


def test_a_forward_that_takes_the_whole_batch_is_refused_at_train_start(tmp_path):
    """The clean evaluation calls ``forward(**inputs)``; a forward that takes the dict batch
    whole failed at the first validation with its own TypeError, after training steps (review,
    session 20). It is now refused at train start with what to do; a compute_loss(batch) hook
    makes it work."""

    def as_dicts(ds):
        x, y = ds.tensors
        return [{"x": x[i], "labels": y[i]} for i in range(len(x))]

    train = DataLoader(as_dicts(TRAIN), batch_size=8)
    val = DataLoader(as_dicts(VAL), batch_size=8)
    steps: list[int] = []

    class Counting(_DictForward):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    gap = GeneralizationGapMonitor(train_subset_size=16)
    with pytest.raises(MisconfigurationException, match=r"forward\(batch\).*compute_loss"):
        _trainer(tmp_path, max_steps=4, callbacks=[gap]).fit(Counting(), train, val)
    assert steps == []

    class WithHook(_DictForward):
        def compute_loss(self, batch):
            return self.loss_fn(self(batch), batch["labels"])

    gap = GeneralizationGapMonitor(train_subset_size=16)
    _trainer(tmp_path, max_steps=4, val_check_interval=2, callbacks=[gap]).fit(
        WithHook(), train, val
    )
    assert gap.history and all(math.isfinite(h["gap/loss"]) for h in gap.history)
