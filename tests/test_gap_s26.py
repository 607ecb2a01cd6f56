"""GeneralizationGapMonitor, review of session 26: weight averaging (EMA), logged-mode resume,
a changed training subset on resume, sharding strategies."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import LIGHTNING_VERSION
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks.gap import GeneralizationGapMonitor

torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


TRAIN, VAL = _data(48, 0), _data(30, 1)


class Net(pl.LightningModule):
    """A classifier with dropout (eval mode matters), no BatchNorm (no buffers to average)."""

    def __init__(self, dropout: float = 0.3, epoch_loss: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))
        self.loss_fn = F.cross_entropy
        self.epoch_loss = epoch_loss
        self.losses: list[float] = []  # every training batch's loss

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.losses.append(float(loss))
        if self.epoch_loss:
            self.log("train_loss", loss, on_step=False, on_epoch=True)
        else:
            self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


def _trainer(root: Path, **kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
        max_epochs=3,
        default_root_dir=str(root),
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def _loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(TRAIN, batch_size=16), DataLoader(VAL, batch_size=10)


def _ce(module: Net, params: dict[str, torch.Tensor], data: TensorDataset) -> float:
    """Mean cross-entropy of ``module``'s network with ``params``, float64, eval mode."""
    net = copy.deepcopy(module.net).double().eval()
    x, y = data.tensors
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(net, params, (x.double(),)), y))


class _RawWeights(pl.Callback):
    """The network's parameters after every optimizer step (what the EMA averages)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = pl_module.net.named_parameters()
        self.steps.append({n: p.detach().double().clone() for n, p in params})


# ---------------------------------------------------------------- 1. weight averaging (EMA)
@pytest.mark.parametrize("gap_first", [True, False])
def test_both_sides_see_the_ema_weights(tmp_path, gap_first):
    """Under EMAWeightAveraging (averaged weights swapped in for validation) gap/train/loss is the
    training-subset loss of the EMA weights, as gap/val/loss is the val loss of them, in either
    order of the callbacks; the train side saw the raw weights before (session 26)."""
    callbacks_mod = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks_mod, "EMAWeightAveraging"):
        pytest.skip("this Lightning has no EMAWeightAveraging")
    decay = 0.5
    ema = callbacks_mod.EMAWeightAveraging(decay=decay)
    mon = GeneralizationGapMonitor(train_subset_size=len(TRAIN))  # the whole training set
    raw = _RawWeights()
    module = Net()
    callbacks = [mon, ema, raw] if gap_first else [ema, mon, raw]
    _trainer(tmp_path, callbacks=callbacks).fit(module, *_loaders())
    assert len(mon.history) == 3 and len(raw.steps) == 9  # 3 steps per epoch
    for i, entry in enumerate(mon.history):
        # the EMA after this epoch's steps: W_0 = first step's weights, then decay*W + (1-d)*w
        steps = raw.steps[: 3 * (i + 1)]
        avg = dict(steps[0])
        for w in steps[1:]:
            avg = {n: decay * avg[n] + (1 - decay) * w[n] for n in avg}
        ema_train, ema_val = _ce(module, avg, TRAIN), _ce(module, avg, VAL)
        raw_train = _ce(module, steps[-1], TRAIN)
        assert abs(raw_train - ema_train) > 1e-3  # (the two networks differ: a real check)
        assert entry["gap/train/loss"] == pytest.approx(ema_train, rel=1e-5, abs=1e-6)
        assert entry["gap/val/loss"] == pytest.approx(ema_val, rel=1e-5, abs=1e-6)
        assert entry["gap/loss"] == pytest.approx(ema_val - ema_train, rel=1e-4, abs=1e-5)


def test_ema_run_untouched_by_the_monitor(tmp_path):
    """With EMAWeightAveraging the monitor still changes no weight and no RNG draw, in either
    order (its evaluation now runs at the first validation batch)."""
    callbacks_mod = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks_mod, "EMAWeightAveraging"):
        pytest.skip("this Lightning has no EMAWeightAveraging")
    finals = []
    for order in ("none", "gap first", "ema first"):
        ema = callbacks_mod.EMAWeightAveraging(decay=0.5)
        mon = GeneralizationGapMonitor(train_subset_size=16)
        callbacks = {"none": [ema], "gap first": [mon, ema], "ema first": [ema, mon]}[order]
        train = DataLoader(TRAIN, batch_size=16, shuffle=True)
        module = Net()
        torch.manual_seed(1)
        _trainer(tmp_path, callbacks=callbacks).fit(module, train, DataLoader(VAL, batch_size=10))
        finals.append((copy.deepcopy(module.state_dict()), torch.get_rng_state()))
    for state, rng in finals[1:]:
        assert all(torch.equal(state[k], finals[0][0][k]) for k in state)
        assert torch.equal(rng, finals[0][1])


# ---------------------------------------------------------------- 2. logged mode, resumed
def _logged_run(root: Path, name: str, epochs: int, ckpt: str | None = None):
    mon = GeneralizationGapMonitor(mode="logged")
    ck = ModelCheckpoint(
        dirpath=root / f"ck_{name}", every_n_epochs=1, save_top_k=-1, filename="{epoch}"
    )
    trainer = _trainer(root, callbacks=[mon, ck], max_epochs=epochs, enable_checkpointing=True)
    module = Net(dropout=0.0, epoch_loss=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, *_loaders(), ckpt_path=ckpt)
    return mon, [str(w.message) for w in caught], module


def test_logged_epoch_loss_resume_keeps_every_point(tmp_path):
    """A training loss logged per epoch: the resumed run's gap series equals the uninterrupted
    run's. Lightning does not restore callback_metrics, and the resumed run's first validation
    was dropped with a "not logged (yet)" warning (session 26)."""
    full, _, _ = _logged_run(tmp_path, "full", 4)
    _logged_run(tmp_path, "half", 2)
    ckpt = str(tmp_path / "ck_half/epoch=1.ckpt")
    resumed, messages, _ = _logged_run(tmp_path, "resumed", 4, ckpt)
    # one point per epoch from the second on (the first validation has no epoch loss yet)
    assert [h["step"] for h in full.history] == [5.0, 8.0, 11.0]
    assert len(resumed.history) == len(full.history)
    for got, want in zip(resumed.history, full.history, strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
    assert not any("not logged" in m for m in messages)
    assert resumed._restored_logged == {}  # (logged again from the resumed epoch's end on)


def test_logged_values_are_in_the_checkpoint(tmp_path):
    """The checkpoint holds the training loss the next validation reads: epoch 1's mean."""
    mon, _, module = _logged_run(tmp_path, "one", 2)
    ckpt = torch.load(tmp_path / "ck_one/epoch=1.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "GeneralizationGapMonitor" in k]
    # epoch 1's train_loss: the mean of its 3 batch losses (batches of 16)
    assert len(module.losses) == 6
    epoch_1 = sum(module.losses[3:]) / 3
    assert state["logged_train"] == {"train_loss": pytest.approx(epoch_1, rel=1e-6)}
    fresh = GeneralizationGapMonitor(mode="logged")
    fresh.load_state_dict(state)
    assert fresh._restored_logged == state["logged_train"]
    # an old checkpoint without it (or the fingerprint) still loads
    old = GeneralizationGapMonitor(mode="logged")
    old.load_state_dict({"history": [dict(h) for h in mon.history]})
    assert old.history == mon.history and old._restored_logged == {}


# ---------------------------------------------------------------- 3. a changed subset on resume
def _clean_run(root: Path, name: str, epochs: int, mon, ckpt: str | None = None, **kw):
    ck = ModelCheckpoint(
        dirpath=root / f"ck_{name}", every_n_epochs=1, save_top_k=-1, filename="{epoch}"
    )
    trainer = _trainer(
        root, callbacks=[mon, ck], max_epochs=epochs, enable_checkpointing=True, **kw
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Net(), *_loaders(), ckpt_path=ckpt)
    return [str(w.message) for w in caught if "GeneralizationGapMonitor" in str(w.message)]


def test_resume_with_another_training_subset_warns(tmp_path):
    """Resuming with another train_subset_size / seed warns that the restored series continues
    on another subset; the same configuration, or a checkpoint from before the fingerprint,
    resumes without a word."""
    _clean_run(tmp_path, "a", 2, GeneralizationGapMonitor(train_subset_size=16))
    ckpt = str(tmp_path / "ck_a/epoch=1.ckpt")

    same = GeneralizationGapMonitor(train_subset_size=16)
    assert _clean_run(tmp_path, "same", 3, same, ckpt) == []
    assert len(same.history) == 3

    for kwargs, shown in (
        ({"train_subset_size": 4, "seed": 3}, "train_subset_size=4, seed=3"),
        ({"train_subset_size": 16, "seed": 1}, "seed=1"),
    ):
        messages = _clean_run(tmp_path, "other", 3, GeneralizationGapMonitor(**kwargs), ckpt)
        assert len(messages) == 1, messages
        assert f"training side ({shown}) differs from the resumed checkpoint's" in messages[0]

    # a checkpoint without the fingerprint (before session 26)
    old = torch.load(ckpt, weights_only=False)
    for key, state in old["callbacks"].items():
        if "GeneralizationGapMonitor" in key:
            del state["subset"]
    torch.save(old, tmp_path / "old.ckpt")
    mon = GeneralizationGapMonitor(train_subset_size=4, seed=3)
    assert _clean_run(tmp_path, "old", 3, mon, str(tmp_path / "old.ckpt")) == []
    assert len(mon.history) == 3


def test_resume_with_another_automatic_subset_size_warns(tmp_path):
    """An automatic subset is sized to the validation run: fewer validation batches on resume
    give a smaller subset, compared once it is fixed at the first validation."""
    _clean_run(tmp_path, "a", 2, GeneralizationGapMonitor())  # 30 validation samples
    ckpt = str(tmp_path / "ck_a/epoch=1.ckpt")
    assert _clean_run(tmp_path, "same", 3, GeneralizationGapMonitor(), ckpt) == []
    messages = _clean_run(
        tmp_path, "fewer", 3, GeneralizationGapMonitor(), ckpt, limit_val_batches=2
    )
    assert (
        len(messages) == 1
        and "(samples=20) differs" in messages[0]
        and "samples=30" in (messages[0])
    )


# ---------------------------------------------------------------- 4. sharding strategies
@pytest.mark.parametrize(
    "name", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy"]
)
def test_sharding_strategies_refused_in_clean_mode(name):
    strategy = type(name, (), {})()
    fake = SimpleNamespace(strategy=strategy, callbacks=[], global_step=0)
    with pytest.raises(MisconfigurationException, match=f"{name} strategy.*mode='logged'"):
        GeneralizationGapMonitor().setup(fake, Net(), "fit")  # type: ignore[arg-type]
    # logged mode only reads logged metrics: accepted
    mon = GeneralizationGapMonitor(mode="logged")
    fake.callbacks = [mon]
    mon.setup(fake, Net(), "fit")  # type: ignore[arg-type]


def test_sharding_strategy_subclass_and_real_object_refused():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    class MyShardedStrategy(FSDPStrategy):
        pass

    for strategy, name in ((FSDPStrategy(), "FSDPStrategy"), (MyShardedStrategy(), "MySharded")):
        fake = SimpleNamespace(strategy=strategy, callbacks=[], global_step=0)
        with pytest.raises(MisconfigurationException, match=name):
            GeneralizationGapMonitor().setup(fake, Net(), "fit")  # type: ignore[arg-type]
    # DDP holds the whole model on every rank: accepted
    mon = GeneralizationGapMonitor()
    fake = SimpleNamespace(strategy=DDPStrategy(), callbacks=[mon], global_step=0)
    mon.setup(fake, Net(), "fit")  # type: ignore[arg-type]


# ---------------------------------------------------------------- 5. logged mode, resumed from a
# checkpoint saved at the validation of an epoch's last batch (re-review, session 26)
TRAIN_64 = _data(64, 0)  # 4 batches of 16: val_check_interval=0.5 validates after batches 2, 4


def _vci_run(root: Path, name: str, epochs: int, vci: float, ckpt: str | None = None):
    """A logged-mode fit whose checkpoints are saved at validation end, before the epoch's end:
    Lightning's default checkpointing with val_check_interval=0.5, or ModelCheckpoint(
    save_on_train_epoch_end=False) with 1.0."""
    mon = GeneralizationGapMonitor(mode="logged")
    callbacks: list[pl.Callback] = [mon]
    if vci == 1.0:
        callbacks.append(
            ModelCheckpoint(
                dirpath=root / name / "checkpoints",
                save_top_k=-1,
                filename="{epoch}-{step}",
                save_on_train_epoch_end=False,
            )
        )
    trainer = _trainer(
        root / name,
        callbacks=callbacks,
        max_epochs=epochs,
        enable_checkpointing=True,
        val_check_interval=vci,
    )
    module = Net(dropout=0.0, epoch_loss=True)
    train = DataLoader(TRAIN_64, batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train, DataLoader(VAL, batch_size=10), ckpt_path=ckpt)
    return mon, [str(w.message) for w in caught], module


def _epoch_means(losses: list[float]) -> list[float]:
    """Each epoch's train_loss as Lightning reduces it: the mean of its 4 batch losses (equal
    batches), in float64."""
    t = torch.tensor(losses, dtype=torch.float64).reshape(-1, 4)
    return t.mean(dim=1).tolist()


@pytest.mark.parametrize("vci", [0.5, 1.0])
def test_logged_resume_from_a_validation_end_checkpoint(tmp_path, vci):
    """Resumed from the checkpoint saved at epoch 1's last validation (before its epoch end),
    the series equals the uninterrupted run's, which reads at each validation the previous
    epoch's mean. The resume crashed ("'train_loss' is not logged (still missing in epoch 2)":
    Lightning replays epoch 1's end before any training batch), and the checkpoint held epoch
    0's mean, so the resumed run's epoch-2 points had the wrong train side."""
    full, _, full_module = _vci_run(tmp_path, "full", 4, vci)
    _, _, half_module = _vci_run(tmp_path, "half", 2, vci)
    (ckpt,) = (tmp_path / "half" / "checkpoints").glob("epoch=1-step=8*.ckpt")
    resumed, messages, _ = _vci_run(tmp_path, "resumed", 4, vci, str(ckpt))

    # the truth: every point's train side is the mean of the last epoch that has ended
    means = _epoch_means(full_module.losses)
    assert len(means) == 4
    if vci == 0.5:  # steps 2, 4 of epochs 1-3 (epoch 0's points: no epoch loss yet)
        expected = [(5.0, means[0]), (7.0, means[0]), (9.0, means[1]), (11.0, means[1])]
        expected += [(13.0, means[2]), (15.0, means[2])]
    else:
        expected = [(7.0, means[0]), (11.0, means[1]), (15.0, means[2])]
    assert [h["step"] for h in full.history] == [s for s, _ in expected]
    for entry, (_, want) in zip(full.history, expected, strict=True):
        assert entry["gap/train/loss"] == pytest.approx(want, rel=1e-6)

    # the checkpoint holds what the next validation reads: epoch 1's mean (not epoch 0's)
    saved = torch.load(ckpt, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if "GeneralizationGapMonitor" in k]
    assert len(half_module.losses) == 8
    epoch_1 = _epoch_means(half_module.losses)[1]
    assert state["logged_train"] == {"train_loss": pytest.approx(epoch_1, rel=1e-6)}
    assert abs(epoch_1 - _epoch_means(half_module.losses)[0]) > 1e-2  # (a real check)

    series = list(resumed.history)
    n = 2 if vci == 0.5 else 1  # the points the checkpoint holds
    if len(series) == len(full.history) + 1 and series[n]["step"] == series[n - 1]["step"]:
        # Lightning 2.4 validates again at once on such a resume (Lightning issue #20277, over
        # part of the validation batches): a point of Lightning's, not in the uninterrupted run
        assert LIGHTNING_VERSION < (2, 6)
        del series[n]
    assert len(series) == len(full.history)
    for got, want in zip(series, full.history, strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
    assert not any("not logged" in m for m in messages), messages
    assert resumed._restored_logged == {}  # (logged again from the resumed epoch's end on)
