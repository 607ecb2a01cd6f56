"""LossCrossingMonitor in real Trainer runs: paired, TensorBoard, CSV and in-memory baselines."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from glu_probe.callbacks.crossing import LossCrossingMonitor
from glu_probe.callbacks.paired import PairedModule
from glu_probe.crossing import BASELINE_OVERTAKES, MODEL_OVERTAKES, find_crossings

torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")

N = 120
T = np.arange(N, dtype=np.float64)
# a(t) = 2 e^{-0.04 t}, b(t) = e^{-0.02 t}: crossing at t* = ln 2 / 0.02 = 34.66
CURVE_A = 2.0 * np.exp(-0.04 * T)
CURVE_B = np.exp(-0.02 * T)
# self.log stores float32 tensors, and the loggers write float32 values
F32 = lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)  # noqa: E731
KW = dict(smoothing=0.0, patience=3, hysteresis=0.01)  # unsmoothed: step = ceil(t*) = 35


class Synthetic(pl.LightningModule):
    """Logs a prescribed ``train_loss`` at each logger step (and trains a dummy weight)."""

    def __init__(self, values: np.ndarray, name: str = "train_loss") -> None:
        super().__init__()
        self.values = values
        self.name = name
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        t = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.log(self.name, float(self.values[t]), on_step=True, on_epoch=False)
        return (self.w**2).sum() + batch.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = N) -> DataLoader:
    return DataLoader(torch.zeros(n, 1), batch_size=1)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        log_every_n_steps=1,
        max_epochs=1,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_sequence_baseline_gives_the_analytic_crossing_and_outputs(tmp_path):
    seen = []
    mon = LossCrossingMonitor(
        baseline=list(CURVE_B), on_crossing=lambda tr, m, c: seen.append((tr.global_step, c)), **KW
    )
    logger = CSVLogger(str(tmp_path), name="model")
    _trainer(tmp_path, logger=logger, callbacks=[mon]).fit(Synthetic(CURVE_A), _loader())
    (c,) = mon.crossings
    assert c.step == math.ceil(math.log(2.0) / 0.02) == 35
    assert c.direction == MODEL_OVERTAKES
    assert mon.crossings == find_crossings(T, F32(CURVE_A), T, CURVE_B, **KW)
    assert seen == [(c.detected_step + 1, c)]  # hook called once, right after that batch
    rows = _csv_rows(logger)
    events = [(int(r["step"]), float(r["crossing/event"])) for r in rows if r["crossing/event"]]
    assert events == [(c.detected_step, 1.0)]
    deltas = {int(r["step"]): float(r["crossing/delta"]) for r in rows if r["crossing/delta"]}
    assert len(deltas) == N  # log_every_n_steps=1: every update
    assert deltas[50] == pytest.approx(CURVE_A[50] - CURVE_B[50], rel=1e-5)


@pytest.mark.parametrize("kind", ["tensorboard", "csv"])
def test_recorded_baseline_run_gives_the_known_crossing(tmp_path, kind):
    # 1) the baseline run, logged by Lightning itself
    if kind == "tensorboard":
        base_logger: pl.loggers.Logger = TensorBoardLogger(str(tmp_path), name="base")
    else:
        base_logger = CSVLogger(str(tmp_path), name="base")
    _trainer(tmp_path, logger=base_logger).fit(Synthetic(CURVE_B), _loader())
    base_logger.save()
    assert base_logger.log_dir is not None
    source = (
        Path(base_logger.log_dir).parent  # the run root: one version dir inside, found by search
        if kind == "tensorboard"
        else Path(base_logger.log_dir) / "metrics.csv"
    )
    # 2) the model run, compared with the recorded baseline; the smoothed default detector
    mon = LossCrossingMonitor(baseline=source, monitor="train_loss", smoothing=0.5, patience=3)
    tb = TensorBoardLogger(str(tmp_path), name="model")
    _trainer(tmp_path, logger=tb, callbacks=[mon]).fit(Synthetic(CURVE_A), _loader())
    expected = find_crossings(T, F32(CURVE_A), T, F32(CURVE_B), smoothing=0.5, patience=3)
    assert mon.crossings == expected and len(expected) == 1
    # closed form for the smoothed zero: A g(α) e^{−αt} = B g(β) e^{−βt}, g(c) = .5/(1 − .5 e^c)
    g = lambda c: 0.5 / (1 - 0.5 * math.exp(c))  # noqa: E731
    t_s = math.log(2.0 * g(0.04) / g(0.02)) / 0.02
    assert expected[0].step == math.ceil(t_s)
    # the TensorBoard text entry, read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb.experiment.flush()
    acc = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("crossing")]
    assert texts, acc.Tags()
    (ev,) = acc.Tensors(texts[0])
    assert ev.step == expected[0].detected_step
    assert MODEL_OVERTAKES in ev.tensor_proto.string_val[0].decode()


def _logged(logger: CSVLogger, name: str = "train_loss") -> tuple[list[int], list[float]]:
    rows = [r for r in _csv_rows(logger) if r.get(name)]
    return [int(r["step"]) for r in rows], [float(r[name]) for r in rows]


def test_a_recorded_baseline_is_compared_at_the_logged_steps(tmp_path):
    """(Review, session 18.) At ``log_every_n_steps=5`` the monitor compared every batch's
    noisy loss with a baseline recorded every 5 steps (interpolated in between): a run compared
    with its own log "crossed" it again and again, and no offline ``find_crossings`` on the
    logged series could reproduce what it reported. Now it compares at the logged steps only:
    no crossing of a run with its own log, and online == offline on the logs."""
    rng = np.random.default_rng(0)
    noisy_b = CURVE_B + 0.03 * rng.standard_normal(N)
    noisy_a = CURVE_A + 0.03 * rng.standard_normal(N)
    kw = dict(smoothing=0.0, patience=2, hysteresis=0.0)
    base = CSVLogger(str(tmp_path), name="base")
    _trainer(tmp_path, logger=base, log_every_n_steps=5).fit(Synthetic(noisy_b), _loader())
    base_steps, base_loss = _logged(base)
    assert base_steps == list(range(4, N, 5))
    source = Path(base.log_dir) / "metrics.csv"
    # the same run against its own log
    same = LossCrossingMonitor(baseline=source, **kw)
    _trainer(tmp_path, log_every_n_steps=5, callbacks=[same]).fit(Synthetic(noisy_b), _loader())
    assert same.crossings == []  # (the old code found crossings here)
    assert same.detector.n_updates == len(base_steps)
    # another run: its logged series against the baseline's, offline, gives the same crossings
    other = LossCrossingMonitor(baseline=source, **kw)
    model_log = CSVLogger(str(tmp_path), name="model")
    _trainer(tmp_path, logger=model_log, log_every_n_steps=5, callbacks=[other]).fit(
        Synthetic(noisy_a), _loader()
    )
    steps, loss = _logged(model_log)
    offline = find_crossings(steps, loss, base_steps, base_loss, **kw)
    assert other.crossings == offline and len(offline) >= 1
    deltas = [int(r["step"]) for r in _csv_rows(model_log) if r.get("crossing/delta")]
    assert deltas == steps  # one delta per update, at the logged steps


def test_a_baseline_is_compared_every_step_where_nothing_is_logged(tmp_path):
    """(Second review, session 18.) ``Trainer(log_every_n_steps=0)`` logs nothing, and the
    logged-steps rule then fed the detector nothing at all, silently: with no logged series to
    agree with, every step is compared (as before)."""
    mon = LossCrossingMonitor(baseline=list(CURVE_B), **KW)
    _trainer(tmp_path, log_every_n_steps=0, callbacks=[mon]).fit(Synthetic(CURVE_A), _loader())
    assert mon.detector.n_updates == N
    assert mon.crossings == find_crossings(T, F32(CURVE_A), T, CURVE_B, **KW)


def _linear_pair(w0: float, scale: float) -> nn.Module:
    """f(x) = w·s·x: with x = 1, y = 0, MSE and SGD(η) the loss is (w0 s)² (1 − 2ηs²)^{2t}."""
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(w0)
    return nn.Sequential(lin, _Scale(scale))


class _Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def test_paired_baseline_matches_the_closed_form(tmp_path):
    eta = 0.005
    model = _linear_pair(1.0, math.sqrt(2.0))  # loss 2 · 0.9604^t
    baseline = _linear_pair(1.0, 1.0)  # loss 1 · 0.9801^t
    module = PairedModule(model, baseline, loss_fn=nn.functional.mse_loss, optimizer="sgd", lr=eta)
    data = DataLoader(list(zip(torch.ones(80, 1), torch.zeros(80, 1), strict=True)), batch_size=1)
    mon = LossCrossingMonitor("paired", smoothing=0.0, patience=3)
    logger = CSVLogger(str(tmp_path))
    _trainer(tmp_path, logger=logger, callbacks=[mon]).fit(module, data)
    t_star = math.log(2.0) / math.log((1 - 2 * eta) ** 2 / (1 - 4 * eta) ** 2)  # 34.13
    (c,) = mon.crossings
    assert c.step == math.ceil(t_star) and c.direction == MODEL_OVERTAKES
    rows = _csv_rows(logger)
    steps = [int(r["step"]) for r in rows if r["model/train_loss"]]
    la = [float(r["model/train_loss"]) for r in rows if r["model/train_loss"]]
    lb = [float(r["baseline/train_loss"]) for r in rows if r["baseline/train_loss"]]
    assert la[10] == pytest.approx(2 * 0.9604**10, rel=1e-4)
    assert mon.crossings == find_crossings(steps, la, steps, lb, smoothing=0.0, patience=3)


def test_resume_gives_the_same_crossings(tmp_path):
    # b crosses a twice (down, then up again): a sine bump on the baseline
    b = 1.0 + 0.3 * np.sin(T / 12.0)
    a = np.ones(N)
    kw = dict(smoothing=0.5, patience=2, hysteresis=0.02)
    full = LossCrossingMonitor(baseline=list(b), **kw)
    _trainer(tmp_path, max_epochs=3, callbacks=[full]).fit(Synthetic(a), _loader(40))
    assert [c.direction for c in full.crossings][:2] == [BASELINE_OVERTAKES, MODEL_OVERTAKES]

    first = LossCrossingMonitor(baseline=list(b), **kw)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    _trainer(tmp_path, max_epochs=1, callbacks=[first, ckpt], enable_checkpointing=True).fit(
        Synthetic(a), _loader(40)
    )
    resumed = LossCrossingMonitor(baseline=list(b), **kw)
    _trainer(tmp_path, max_epochs=3, callbacks=[resumed]).fit(
        Synthetic(a), _loader(40), ckpt_path=str(tmp_path / "ck" / "last.ckpt")
    )
    assert resumed.crossings == full.crossings
    assert resumed.detector.state_dict() == full.detector.state_dict()


def test_resume_finds_a_recorded_baseline_spelled_another_way(tmp_path, monkeypatch):
    """(Review, session 18.) The checkpoint key holds the baseline's path as typed: resuming
    with ``./metrics.csv`` or an absolute path instead of ``metrics.csv`` lost the crossings and
    the detector state, with only Lightning's generic warning. The monitor now finds its state
    under the other spelling (same monitored name and prefix, same baseline content). A key by
    content instead (tried first) lost the state when the baseline file grew before the resume:
    the path as typed stays the key, so that case resumes too."""
    b = 1.0 + 0.3 * np.sin(T / 12.0)
    base = CSVLogger(str(tmp_path), name="base")
    _trainer(tmp_path, logger=base, max_epochs=3).fit(Synthetic(b), _loader(40))
    base.save()
    monkeypatch.chdir(Path(base.log_dir))
    a = np.ones(N)
    kw = dict(smoothing=0.5, patience=2, hysteresis=0.02)
    full = LossCrossingMonitor(baseline="metrics.csv", **kw)
    _trainer(tmp_path, max_epochs=3, callbacks=[full]).fit(Synthetic(a), _loader(40))
    assert len(full.crossings) >= 2
    first = LossCrossingMonitor(baseline="metrics.csv", **kw)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    _trainer(tmp_path, max_epochs=1, callbacks=[first, ckpt], enable_checkpointing=True).fit(
        Synthetic(a), _loader(40)
    )
    path = str(tmp_path / "ck" / "last.ckpt")
    for spelled in ("./metrics.csv", str(Path("metrics.csv").resolve())):
        resumed = LossCrossingMonitor(baseline=spelled, **kw)
        assert resumed.state_key != first.state_key
        with pytest.warns(UserWarning, match="restored the state saved under"):
            _trainer(tmp_path, max_epochs=3, callbacks=[resumed]).fit(
                Synthetic(a), _loader(40), ckpt_path=path
            )
        assert resumed.crossings == full.crossings
        assert resumed.detector.state_dict() == full.detector.state_dict()
    # the baseline file grows (its run went on) between the checkpoint and the resume
    with open("metrics.csv", newline="") as fh:
        header = next(csv.reader(fh))
    with open("metrics.csv", "a", newline="") as fh:
        csv.DictWriter(fh, header).writerow({"step": 3 * 40 + 5, "train_loss": 1.0})
    resumed = LossCrossingMonitor(baseline="metrics.csv", **kw)
    assert resumed._identity() != first._identity()  # (the content changed, the key did not)
    _trainer(tmp_path, max_epochs=3, callbacks=[resumed]).fit(
        Synthetic(a), _loader(40), ckpt_path=path
    )
    assert resumed.detector.n_updates == full.detector.n_updates
    # grown *and* spelled another way: the one entry of that name is taken, and said so
    resumed = LossCrossingMonitor(baseline="./metrics.csv", **kw)
    with pytest.warns(UserWarning, match="content differs"):
        _trainer(tmp_path, max_epochs=3, callbacks=[resumed]).fit(
            Synthetic(a), _loader(40), ckpt_path=path
        )
    assert resumed.detector.n_updates == full.detector.n_updates


def test_batched_reads_change_no_result(tmp_path):
    """read_every=k (what an accelerator gets by default: one device->host read per k batches)
    gives the same crossings, logged deltas and events, at the same steps, as reading after
    every batch; the queue never holds k values, and a checkpoint taken mid-queue holds every
    step seen (so resuming from it gives the same crossings)."""
    b = 1.0 + 0.3 * np.sin(T / 12.0)
    a = np.ones(N)
    kw = dict(smoothing=0.5, patience=2, hysteresis=0.02)
    logs = {}
    mons = {}

    class QueueProbe(pl.Callback):
        def __init__(self, mon: LossCrossingMonitor, k: int) -> None:
            self.mon, self.k, self.lengths = mon, k, []

        def on_train_batch_end(self, trainer, *args):
            self.lengths.append(len(self.mon._pending))
            assert len(self.mon._pending) < self.k

    for k in (1, 7):
        mon = LossCrossingMonitor(baseline=list(b), read_every=k, **kw)
        probe = QueueProbe(mon, k)
        logger = CSVLogger(str(tmp_path), name=f"k{k}")
        _trainer(tmp_path, logger=logger, callbacks=[mon, probe]).fit(Synthetic(a), _loader())
        rows = _csv_rows(logger)
        logs[k] = [(r["step"], r["crossing/delta"], r["crossing/event"]) for r in rows]
        mons[k] = mon
        assert mon._pending == []
        assert max(probe.lengths) == k - 1  # k = 7: the reads were batched
    assert len(mons[1].crossings) >= 2
    assert mons[7].crossings == mons[1].crossings
    assert mons[7].detector.state_dict() == mons[1].detector.state_dict()
    assert sorted(logs[7]) == sorted(logs[1])

    # a checkpoint at every 10th batch, i.e. with 3 pairs queued (read_every=7)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=10, save_top_k=-1)
    first = LossCrossingMonitor(baseline=list(b), read_every=7, **kw)
    _trainer(tmp_path, max_steps=60, callbacks=[first, ckpt], enable_checkpointing=True).fit(
        Synthetic(a), _loader()
    )
    path = next((tmp_path / "ck").glob("*step=50.ckpt"))
    state = torch.load(path, weights_only=False)["callbacks"]
    (saved,) = [v for key, v in state.items() if key.startswith("LossCrossingMonitor")]
    assert saved["detector"]["last_step"] == 49  # steps 0..49 all read before saving
    resumed = LossCrossingMonitor(baseline=list(b), read_every=7, **kw)
    _trainer(tmp_path, callbacks=[resumed]).fit(Synthetic(a), _loader(), ckpt_path=str(path))
    assert resumed.crossings == mons[1].crossings


def test_queued_losses_are_read_when_training_fails(tmp_path):
    """A run that dies mid-queue still feeds the detector every step it logged."""

    class Failing(Synthetic):
        def training_step(self, batch, batch_idx):
            if batch_idx == 40:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    mon = LossCrossingMonitor(baseline=list(CURVE_B), read_every=7, **KW)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, callbacks=[mon]).fit(Failing(CURVE_A), _loader())
    assert mon._pending == [] and mon.detector.last_step == 39
    assert mon.crossings == find_crossings(T[:40], F32(CURVE_A[:40]), T, CURVE_B, **KW)


def test_queued_device_scalars_are_stacked_without_reading():
    from glu_probe.callbacks.crossing import _stack_scalars

    v = _stack_scalars([torch.tensor(1.5, dtype=torch.bfloat16), torch.tensor(2.25)])
    assert v.dtype == torch.float32 and v.tolist() == [1.5, 2.25]
    assert _stack_scalars([torch.tensor(3), 0.5]).tolist() == [3.0, 0.5]


def test_quiet_on_fast_dev_run_and_sanity_check(tmp_path):
    mon = LossCrossingMonitor(baseline=list(CURVE_B), **KW)
    _trainer(tmp_path, fast_dev_run=3, callbacks=[mon]).fit(Synthetic(CURVE_A), _loader())
    assert mon.detector.n_updates == 0

    class WithVal(Synthetic):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", 1.0 + batch.sum())

    mon = LossCrossingMonitor(baseline=[1.0] * N, monitor="val_loss", **KW)
    assert mon.phase == "val"
    trainer = _trainer(
        tmp_path, callbacks=[mon], num_sanity_val_steps=2, limit_train_batches=10,
        limit_val_batches=2, max_epochs=2,
    )  # fmt: skip
    trainer.fit(WithVal(CURVE_A), _loader(), _loader(4))
    assert mon.detector.n_updates == 2  # one per epoch's validation, none for the sanity check


def test_bad_config(tmp_path):
    with pytest.raises(MisconfigurationException, match="does not exist"):
        LossCrossingMonitor(baseline=str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("1\n")
    with pytest.raises(MisconfigurationException, match="unknown baseline kind"):
        LossCrossingMonitor(baseline=tmp_path / "x.txt")
    with pytest.raises(MisconfigurationException, match="patience"):
        LossCrossingMonitor(baseline=[1.0, 2.0], patience=-1)
    with pytest.raises(MisconfigurationException, match="smoothing"):
        LossCrossingMonitor(baseline=[1.0, 2.0], smoothing=1.5)
    with pytest.raises(MisconfigurationException, match="strictly increasing"):
        LossCrossingMonitor(baseline=[(0, 1.0), (0, 2.0)])
    with pytest.raises(MisconfigurationException, match="shape"):
        LossCrossingMonitor(baseline=np.ones((3, 3)))
    with pytest.raises(MisconfigurationException, match="phase"):
        LossCrossingMonitor(baseline=[1.0], phase="test")
    (tmp_path / "m.csv").write_text("step,loss\n0,1.0\n")
    with pytest.raises(MisconfigurationException, match=r"no column\(s\) \['train_loss'\]"):
        LossCrossingMonitor(baseline=tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("step,train_loss\n0,1.0\n1,n/a\n")  # (was a raw ValueError)
    with pytest.raises(MisconfigurationException, match=r"line 3 .* not a number"):
        LossCrossingMonitor(baseline=tmp_path / "n.csv")
    with pytest.raises(MisconfigurationException, match="no TensorBoard event files"):
        LossCrossingMonitor(baseline=tmp_path)
    with pytest.raises(MisconfigurationException, match="needs a PairedModule"):
        _trainer(tmp_path, callbacks=[LossCrossingMonitor("paired")]).fit(
            Synthetic(CURVE_A), _loader(4)
        )


def test_configurable_from_lightningcli_yaml(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    from glu_probe.callbacks.dashboard import TensorBoardDashboard
    from glu_probe.callbacks.gap import GeneralizationGapMonitor

    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        """
model:
  class_path: glu_probe.callbacks.paired.PairedModule
  init_args:
    model: {class_path: torch.nn.Linear, init_args: {in_features: 4, out_features: 2}}
    baseline: {class_path: torch.nn.Linear, init_args: {in_features: 4, out_features: 2}}
    optimizer: sgd
    lr: 0.1
    model_prefix: glu
trainer:
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: glu_probe.callbacks.crossing.LossCrossingMonitor
      init_args: {baseline: paired, monitor: train_loss, patience: 3, smoothing: 0.5}
    - class_path: glu_probe.callbacks.gap.GeneralizationGapMonitor
      init_args:
        train_subset_size: 32
        metrics:
          acc:
            class_path: torchmetrics.classification.MulticlassAccuracy
            init_args: {num_classes: 2}
    - class_path: glu_probe.callbacks.dashboard.TensorBoardDashboard
      init_args: {pairs: {acc: [glu/val_acc, baseline/val_acc]}}
"""
    )
    cli = LightningCLI(
        pl.LightningModule,
        subclass_mode_model=True,
        run=False,
        args=["--config", str(cfg)],
        save_config_callback=None,
    )
    assert isinstance(cli.model, PairedModule) and cli.model.model_prefix == "glu"
    by_type = {type(cb): cb for cb in cli.trainer.callbacks}
    cross = by_type[LossCrossingMonitor]
    assert cross.kind == "paired" and cross.detector.patience == 3
    assert cross.detector.smoothing == 0.5
    gap = by_type[GeneralizationGapMonitor]
    assert type(gap.metrics["acc"]).__name__ == "MulticlassAccuracy"
    assert by_type[TensorBoardDashboard].pairs == {"acc": ["glu/val_acc", "baseline/val_acc"]}


def test_per_step_read_makes_no_host_reads_with_progress_bar_metrics(tmp_path, monkeypatch):
    """Lightning's ``trainer.callback_metrics`` calls ``Tensor.item()`` on every ``prog_bar``
    metric at each access (a device sync per metric on a GPU). The monitor's per-step hook read
    it until 2026-11-28: 16 ``.item()`` calls over 8 steps with two progress-bar metrics (review
    of the CUDA paths). It now reads the step's values without them, and those values are the
    ones ``callback_metrics`` holds (same keys, same tensors)."""
    from glu_probe.callbacks._utils import step_metrics

    class Bar(Synthetic):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("lr_x", torch.tensor(0.5) + batch_idx, prog_bar=True)
            self.log("acc", torch.tensor(0.25), prog_bar=True, on_step=True, on_epoch=True)
            self.log("ep_only", torch.tensor(1.0), on_step=False, on_epoch=True)
            return out

    mon = LossCrossingMonitor(baseline=list(CURVE_B), read_every=10**6, **KW)
    reads = {"in_hook": 0}
    real_item = torch.Tensor.item
    hook = LossCrossingMonitor.on_train_batch_end
    inside = {"on": False}

    def counting_item(self):
        if inside["on"]:
            reads["in_hook"] += 1
        return real_item(self)

    def timed_hook(self, *args, **kwargs):
        inside["on"] = True
        try:
            return hook(self, *args, **kwargs)
        finally:
            inside["on"] = False

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(LossCrossingMonitor, "on_train_batch_end", timed_hook)
    seen = []

    class Compare(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            ours = dict(step_metrics(trainer))
            theirs = dict(trainer.callback_metrics)
            seen.append(set(ours) == set(theirs))
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    trainer = _trainer(tmp_path, max_steps=8, callbacks=[mon, Compare()])
    trainer.fit(Bar(CURVE_A), _loader())
    assert reads["in_hook"] == 0
    assert seen == [True] * 8
    assert mon.detector.last_step == 7  # every step was still read (at fit end)


def _feeding_monitor(fed: list[int]) -> LossCrossingMonitor:
    """A monitor against ``CURVE_B`` that appends each step it feeds to its detector."""

    class Spy(LossCrossingMonitor):
        def _feed(self, trainer, pl_module, step, a, b):
            fed.append(step)
            super()._feed(trainer, pl_module, step, a, b)

    return Spy(baseline=list(CURVE_B), **KW)


class _EpochLogged(Synthetic):
    """``train_loss`` logged once per epoch (``on_step=False, on_epoch=True``)."""

    def training_step(self, batch, batch_idx):
        t = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.log(self.name, float(self.values[t]), on_step=False, on_epoch=True)
        return (self.w**2).sum() + batch.sum() * 0


def test_a_loss_logged_once_per_epoch_is_not_compared_at_every_step(tmp_path):
    """With ``on_step=False`` the value the monitor read during a step was the previous
    epoch's mean: it fed the detector 12 stale pairs at steps the logger never wrote (review,
    session 20). Such a key is now skipped with one warning that says how to log it."""
    fed: list[int] = []
    mon = _feeding_monitor(fed)
    with pytest.warns(UserWarning, match=r"once per epoch \(on_step=False.*on_step=True"):
        _trainer(tmp_path, max_epochs=3, callbacks=[mon]).fit(
            _EpochLogged(np.concatenate([CURVE_A] * 3)), _loader(20)
        )
    assert fed == [] and mon.crossings == []


class _EveryFifth(Synthetic):
    """``train_loss`` logged on step, but only every fifth step."""

    def training_step(self, batch, batch_idx):
        t = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        if t % 5 == 0:
            self.log(self.name, float(self.values[t]), on_step=True, on_epoch=False)
        return (self.w**2).sum() + batch.sum() * 0


def test_a_loss_logged_every_kth_step_is_compared_at_those_steps_only(tmp_path):
    """Lightning keeps the last on-step value until the key is logged again: the detector got
    4 stale pairs out of 5 (re-review, session 20). Only the steps that logged are compared,
    so the online crossings equal the offline detector's on the logged series."""
    fed: list[int] = []
    mon = _feeding_monitor(fed)
    _trainer(tmp_path, callbacks=[mon]).fit(_EveryFifth(CURVE_A), _loader())
    steps = [t for t in range(N) if t % 5 == 0]
    assert fed == steps
    assert mon.crossings == find_crossings(steps, F32(CURVE_A[steps]), T, CURVE_B, **KW)
