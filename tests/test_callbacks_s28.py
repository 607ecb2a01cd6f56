"""Session 28 review: the NTK and crossing monitors beside Lightning's own callbacks
(``EarlyStopping``, ``ModelCheckpoint``, ``ModelPruning``, ``BackboneFinetuning``). Each test
failed on the code before its fix."""

from __future__ import annotations

import csv
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    EarlyStopping,
    ModelCheckpoint,
    ModelPruning,
)
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks import LossCrossingMonitor, NTKSpectrumMonitor, PairedModule
from glu_probe.callbacks.ntk import NTKProbeWarning

torch.set_num_threads(1)

QUIET = {"log_histogram": False, "log_figure": False}


def _data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g))


def _loader(n: int = 32, seed: int = 0) -> DataLoader:
    return DataLoader(_data(n, seed), batch_size=8)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class FT(Net):
    """``backbone`` / ``head`` for BackboneFinetuning (its optimizer takes trainable ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 4)
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _trainer(tmp_path: Path | None = None, **kw: Any) -> pl.Trainer:
    base: dict[str, Any] = {
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "deterministic": True,
        "num_sanity_val_steps": 0,
    }
    if tmp_path is not None:
        base["logger"] = CSVLogger(tmp_path, name="csv")
        base["log_every_n_steps"] = 1
    return pl.Trainer(**{**base, **kw})


def _csv(trainer: pl.Trainer, key: str) -> dict[int, float]:
    """``{step: value}`` of a CSVLogger column."""
    path = Path(trainer.logger.log_dir) / "metrics.csv"  # type: ignore[union-attr]
    with path.open() as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def _dense_kappa(module: nn.Module, x: torch.Tensor) -> float:
    """κ of the pNTK (rows Σ_o f_o/√O) from an explicit float64 per-row Jacobian."""
    import copy

    net = copy.deepcopy(module).double().eval()
    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = net(x[i : i + 1].double())
        g = out.sum() / math.sqrt(out.shape[-1])
        rows.append(torch.cat([d.flatten() for d in torch.autograd.grad(g, params)]))
    jac = torch.stack(rows)
    eig = torch.linalg.eigvalsh(jac @ jac.T)
    return float(eig[-1] / eig[0])


class Seen(pl.Callback):
    """What ``callback_metrics`` holds for ``key`` at each validation end."""

    def __init__(self, key: str, optional: bool = False) -> None:
        self.key = key
        self.optional = optional
        self.values: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.optional and self.key not in trainer.callback_metrics:
            return
        value = trainer.callback_metrics[self.key]
        assert isinstance(value, torch.Tensor) and value.ndim == 0
        self.values.append((trainer.global_step, float(value)))


# ------------------------------------------------------------------ 1: monitorable metrics
def test_ntk_metrics_reach_early_stopping_and_model_checkpoint(tmp_path: Path) -> None:
    # "Early stopping conditioned on metric `ntk/condition_number` which is not available".
    pl.seed_everything(0)
    key = "ntk/condition_number"
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, dtype=torch.float64, **QUIET)
    stop = EarlyStopping(monitor=key, mode="min", patience=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor=key, mode="min", save_top_k=1)
    seen = Seen(key)
    trainer = _trainer(
        tmp_path, callbacks=[mon, stop, seen, ckpt], max_epochs=6, enable_checkpointing=True
    )
    model = Net()
    trainer.fit(model, _loader(), _loader(16, 1))
    logged = _csv(trainer, key)
    assert (
        sorted(logged) == [h["step"] for h in mon.history] == list(range(trainer.global_step + 1))
    )
    # each validation (after the epoch's 4 steps) sees the κ logged at that step
    assert seen.values and all(v == pytest.approx(logged[s], rel=1e-6) for s, v in seen.values)
    kappas = [v for _, v in seen.values]
    worse = [i for i in range(1, len(kappas)) if kappas[i] >= min(kappas[:i])]
    assert len(kappas) == (worse[0] + 1 if worse else 6)  # patience 0: stopped there
    assert ckpt.best_model_score is not None
    assert float(ckpt.best_model_score) == pytest.approx(min(kappas), rel=1e-6)
    # and the value is the NTK's: the last probe saw the final weights
    truth = _dense_kappa(model, _data()[:8][0])
    assert float(trainer.callback_metrics[key]) == pytest.approx(truth, rel=1e-6)
    for name in ("lambda_max", "lambda_min", "log10_condition_number", "residual_max"):
        assert float(trainer.callback_metrics[f"ntk/{name}"]) == pytest.approx(
            _csv(trainer, f"ntk/{name}")[trainer.global_step], rel=1e-6
        )


def test_paired_ntk_metrics_are_monitorable_by_their_prefixed_names(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = PairedModule(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)),
        nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4)),
        lr=1e-2,
    )
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=8, dtype=torch.float64, **QUIET)
    cks = {
        side: ModelCheckpoint(
            dirpath=tmp_path / side, monitor=f"ntk/{side}/condition_number", mode="max"
        )
        for side in ("model", "baseline")
    }
    trainer = _trainer(
        tmp_path, callbacks=[mon, *cks.values()], max_epochs=2, enable_checkpointing=True
    )
    trainer.fit(model, _loader(), _loader(16, 1))
    for side, ck in cks.items():
        logged = _csv(trainer, f"ntk/{side}/condition_number")
        # validations at steps 4 and 8, each after a probe at that step
        assert ck.best_model_score is not None
        assert float(ck.best_model_score) == pytest.approx(max(logged[4], logged[8]), rel=1e-6)
        truth = _dense_kappa(getattr(model, side), _data()[:8][0])
        assert logged[8] == pytest.approx(truth, rel=1e-7)


def test_resumed_run_holds_the_last_probe_until_the_next(tmp_path: Path) -> None:
    # Lightning starts a resumed fit with empty callback_metrics: a validation before the
    # resumed run's first probe must see the checkpoint's last κ, as the uninterrupted run does.
    key = "ntk/condition_number"

    def run(epochs: int, ckpt_path: Any = None) -> tuple[Seen, NTKSpectrumMonitor]:
        pl.seed_everything(0)
        mon = NTKSpectrumMonitor(every_n_steps=12, probe_size=8, dtype=torch.float64, **QUIET)
        seen = Seen(key)
        ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
        trainer = _trainer(
            callbacks=[mon, EarlyStopping(monitor=key, patience=99), seen, ck],
            max_epochs=epochs,
            enable_checkpointing=True,
        )
        trainer.fit(Net(), _loader(), _loader(16, 1), ckpt_path=ckpt_path)
        return seen, mon

    whole, mon = run(4)
    assert [h["step"] for h in mon.history] == [0, 12]
    k0, k12 = (h[key] for h in mon.history)
    assert whole.values == [
        (4, pytest.approx(k0)),
        (8, pytest.approx(k0)),
        (12, pytest.approx(k12)),
        (16, pytest.approx(k12)),
    ]
    resumed, _ = run(4, tmp_path / "ck" / "epoch=0-step=4.ckpt")
    assert resumed.values == whole.values[1:]


def test_crossing_delta_reaches_early_stopping_and_model_checkpoint(tmp_path: Path) -> None:
    pl.seed_everything(0)
    baseline = [1.6 - 0.02 * i for i in range(40)]
    cross = LossCrossingMonitor(baseline=baseline, monitor="train_loss", smoothing=0.5)
    seen = Seen("crossing/delta")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="crossing/delta", mode="min")
    trainer = _trainer(
        tmp_path,
        callbacks=[cross, EarlyStopping(monitor="crossing/delta", patience=99), seen, ckpt],
        max_epochs=3,
        enable_checkpointing=True,
    )
    trainer.fit(Net(), _loader(), _loader(16, 1))
    # independent truth: the debiased EMA (β = 0.5) of the logged train_loss - baseline
    loss = _csv(trainer, "train_loss")
    ema_a = ema_b = 0.0
    delta = {}
    for k, step in enumerate(sorted(loss), start=1):
        ema_a = 0.5 * ema_a + 0.5 * loss[step]
        ema_b = 0.5 * ema_b + 0.5 * baseline[step]
        delta[step] = (ema_a - ema_b) / (1 - 0.5**k)
    logged = _csv(trainer, "crossing/delta")
    assert logged == pytest.approx(delta, rel=1e-9)
    # validations after steps 3, 7, 11 (global_step 4, 8, 12)
    assert [s for s, _ in seen.values] == [4, 8, 12]
    assert all(v == pytest.approx(delta[s - 1], rel=1e-6) for s, v in seen.values)
    assert ckpt.best_model_score is not None
    assert float(ckpt.best_model_score) == pytest.approx(min(v for _, v in seen.values))


def test_resumed_crossing_monitor_holds_the_last_delta_until_the_next(tmp_path: Path) -> None:
    # Compared at the logged steps (7, 15) only: the validation at step 12 of a run resumed at 8
    # saw no delta, where the uninterrupted run holds step 7's.
    def run(ckpt_path: Any = None) -> Seen:
        pl.seed_everything(0)
        cross = LossCrossingMonitor(baseline=[1.5] * 40, monitor="train_loss", smoothing=0.5)
        seen = Seen("crossing/delta", optional=True)
        ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
        trainer = _trainer(
            callbacks=[cross, seen, ck],
            max_epochs=4,
            log_every_n_steps=8,
            enable_checkpointing=True,
        )
        trainer.fit(Net(), _loader(), _loader(16, 1), ckpt_path=ckpt_path)
        assert cross.detector.n_updates == 2
        return seen

    whole = run()
    assert [s for s, _ in whole.values] == [8, 12, 16]
    assert whole.values[0][1] == whole.values[1][1] != whole.values[2][1]
    assert run(tmp_path / "ck" / "epoch=1-step=8.ckpt").values == whole.values[1:]


# ------------------------------------------------------------------ 2: a filter that stops matching
class Freeze(pl.Callback):
    """Freeze ``net.0`` during epoch 1 (as a finetuning schedule might), unfreeze at epoch 2."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for p in pl_module.net[0].parameters():
            p.requires_grad_(trainer.current_epoch != 1)


def test_a_filter_that_stops_matching_skips_probes_with_one_warning() -> None:
    # The selection raised ValueError out of on_train_batch_end: the fit died at step 5.
    pl.seed_everything(0)
    mon = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, params="net.0", dtype=torch.float64, **QUIET
    )
    trainer = _trainer(callbacks=[Freeze(), mon], max_epochs=3)
    model = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader())
    assert trainer.global_step == 12
    # epoch 1's batch ends (steps 5-8) are skipped; epoch 2 probes again (the same set)
    assert [h["step"] for h in mon.history] == [0, 1, 2, 3, 4, 9, 10, 11, 12]
    ours = [str(w.message) for w in caught if issubclass(w.category, NTKProbeWarning)]
    assert len(ours) == 1, ours
    assert "params='net.0'" in ours[0] and "at step 5" in ours[0]
    assert "renamed or frozen" in ours[0] and "skipped" in ours[0]
    # the probes after it measure the model: the last one saw the final weights
    # (only net.0 is probed)
    import copy

    head_frozen = copy.deepcopy(model)
    for p in head_frozen.net[2].parameters():
        p.requires_grad_(False)
    truth = _dense_kappa(head_frozen, _data()[:8][0])
    assert mon.history[-1]["ntk/condition_number"] == pytest.approx(truth, rel=1e-7)


def test_a_filter_that_stops_matching_raises_with_strict() -> None:
    pl.seed_everything(0)
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, params="net.0", strict=True, **QUIET)
    trainer = _trainer(callbacks=[Freeze(), mon], max_epochs=3)
    with pytest.raises(ValueError, match="no trainable parameters selected"):
        trainer.fit(Net(), _loader())
    assert trainer.global_step == 5


@pytest.mark.parametrize("params", ["net.0.weight", ["net.0.weight", "net.2.weight"], "re:weight$"])
def test_model_pruning_with_a_name_filter_no_longer_ends_the_fit(params: Any) -> None:
    # ModelPruning renames net.0.weight to net.0.weight_orig at the first epoch end.
    pl.seed_everything(0)
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, params=params, **QUIET)
    prune = ModelPruning("l1_unstructured", amount=0.3, verbose=0)
    trainer = _trainer(callbacks=[prune, mon], max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NTKProbeWarning)
        trainer.fit(Net(), _loader())
    assert trainer.global_step == 12
    steps = [h["step"] for h in mon.history]
    assert steps[:5] == [0, 1, 2, 3, 4]  # (later ones: whether the engine maps `_orig` names)


def test_a_filter_that_never_matched_is_still_a_configuration_error() -> None:
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, params="nope", **QUIET)
    with pytest.raises(ValueError, match="no trainable parameters selected"):
        _trainer(callbacks=[mon], max_epochs=1).fit(Net(), _loader())


# ------------------------------------------------------------------ 3: the probed set changes
def _ft_run(
    ckpt_dir: Path, epochs: int = 2, ckpt_path: Any = None
) -> tuple[NTKSpectrumMonitor, list[str]]:
    pl.seed_everything(0)
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, **QUIET)
    ck = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
    trainer = _trainer(
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), mon, ck],
        max_epochs=epochs,
        enable_checkpointing=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(FT(), _loader(24), ckpt_path=ckpt_path)
    changed = [
        str(w.message)
        for w in caught
        if issubclass(w.category, NTKProbeWarning) and "parameters probed" in str(w.message)
    ]
    return mon, changed


def test_backbone_finetuning_changing_the_probed_set_warns_once(tmp_path: Path) -> None:
    # κ went 2832 -> 381 at step 4 (head only -> the whole net) without a word.
    mon, changed = _ft_run(tmp_path / "ck")
    assert [h["step"] for h in mon.history] == [0, 1, 2, 3, 4, 5, 6]
    assert len(changed) == 1, changed
    assert "changed at step 4" in changed[0]
    assert "4 tensor(s) added" in changed[0] and "0 removed" in changed[0]
    assert "6 now" in changed[0] and "'backbone.0.weight'" in changed[0]
    assert sorted(mon.state_dict()["probed_params"][""]) == sorted(
        n for n, _ in FT().named_parameters()
    )


def test_an_unchanged_probed_set_does_not_warn() -> None:
    pl.seed_everything(0)
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, **QUIET)
    prune = ModelPruning("l1_unstructured", amount=0.3, verbose=0)  # renames, adds nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(callbacks=[prune, mon], max_epochs=2).fit(Net(), _loader())
    assert [h["step"] for h in mon.history] == list(range(9))
    assert not [w for w in caught if issubclass(w.category, NTKProbeWarning)]


def test_a_resumed_run_warns_at_the_same_step(tmp_path: Path) -> None:
    _, whole = _ft_run(tmp_path / "a")
    # resumed from the end of epoch 0 (step 3, head only): the change is at step 4 again
    mon, resumed = _ft_run(tmp_path / "b", ckpt_path=tmp_path / "a" / "epoch=0-step=3.ckpt")
    assert [h["step"] for h in mon.history] == [0, 1, 2, 3, 4, 5, 6]
    assert resumed == whole and len(resumed) == 1


def test_a_checkpoint_without_the_probed_names_still_loads(tmp_path: Path) -> None:
    _ft_run(tmp_path / "a")
    path = tmp_path / "a" / "epoch=0-step=3.ckpt"
    ckpt = torch.load(path, weights_only=False)
    states = [v for k, v in ckpt["callbacks"].items() if k.startswith("NTKSpectrumMonitor")]
    assert len(states) == 1 and "probed_params" in states[0]
    del states[0]["probed_params"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    mon, changed = _ft_run(tmp_path / "b", ckpt_path=tmp_path / "old.ckpt")
    assert [h["step"] for h in mon.history] == [0, 1, 2, 3, 4, 5, 6]
    assert changed == []  # (nothing saved to compare step 4 with)


# ------------------------------------------------------------------ DDP: every rank holds them
class _Dump(pl.Callback):
    def __init__(self, path: Path, mon: NTKSpectrumMonitor) -> None:
        self.path, self.mon = path, mon

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "ntk/" in k}
        state = (metrics, self.mon.history, self.mon.state_dict()["probed_params"])
        torch.save(state, self.path / f"rank{trainer.global_rank}.pt")


@pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform == "win32", reason="needs gloo"
)
def test_ddp_every_rank_holds_the_metrics_and_the_probed_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    key = "ntk/condition_number"
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=8, dtype=torch.float64, **QUIET)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=2,
        logger=False,
        callbacks=[mon, EarlyStopping(monitor=key, patience=99), _Dump(tmp_path, mon)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Net(), _loader(), _loader(16, 1))
    (m0, h0, n0), (m1, h1, n1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert m0 == m1 and h0 == h1 and n0 == n1
    assert [h["step"] for h in h0] == [0, 2, 4]  # 2 steps per epoch and rank
    assert m0[key] == pytest.approx(h0[-1][key], rel=1e-6)
    assert sorted(n0[""]) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]


# ------------------------------------------------------------------ re-review (round 2)
class Episode(pl.Callback):
    """Freeze ``net.0`` (a PairedModule side's ``0`` with ``side=``) for the global steps in
    ``[start, stop)``; resumable: the state is checkpointed and re-applied at fit start."""

    def __init__(self, start: int, stop: int = 10**9, side: str | None = None) -> None:
        self.start, self.stop, self.side = start, stop, side
        self.frozen = False

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = state_dict["frozen"]

    def _apply(self, pl_module: pl.LightningModule) -> None:
        layer = getattr(pl_module, self.side)[0] if self.side else pl_module.net[0]
        for p in layer.parameters():
            p.requires_grad_(not self.frozen)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        frozen = self.start <= trainer.global_step < self.stop
        if frozen != self.frozen:
            self.frozen = frozen
            self._apply(pl_module)


def _episode_fit(
    ckpt_dir: Path, epochs: int = 4, ckpt_path: Any = None, trainer: pl.Trainer | None = None
) -> tuple[NTKSpectrumMonitor, list[str], Net]:
    pl.seed_everything(0)
    mon = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, params="net.0", dtype=torch.float64, **QUIET
    )
    ck = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
    trainer = _trainer(
        callbacks=[Episode(6, 10), mon, ck], max_epochs=epochs, enable_checkpointing=True
    )
    model = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    assert trainer.global_step == 4 * epochs
    ours = [str(w.message) for w in caught if issubclass(w.category, NTKProbeWarning)]
    return mon, ours, model


def _head_frozen_kappa(model: Net) -> float:
    import copy

    net = copy.deepcopy(model)
    for p in net.net[2].parameters():
        p.requires_grad_(False)
    return _dense_kappa(net, _data()[:8][0])


def test_a_run_resumed_inside_a_freeze_episode_skips_as_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    # The resumed fit died at on_train_start: the probe's row count selected the parameters
    # with the filter, outside the containment (ValueError "no trainable parameters selected").
    whole, warned, _ = _episode_fit(tmp_path / "a")
    steps = [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16]
    assert [h["step"] for h in whole.history] == steps
    assert len(warned) == 1 and "at step 6" in warned[0]
    # (epoch 1 ends at step 8, net.0 frozen since step 6)
    resumed, warned, model = _episode_fit(
        tmp_path / "b", ckpt_path=tmp_path / "a/epoch=1-step=8.ckpt"
    )
    assert [h["step"] for h in resumed.history] == steps
    # (step 8 was the checkpoint's last, skipped, probe: the resumed run's first one is at 9)
    assert len(warned) == 1 and "at step 9" in warned[0] and "params='net.0'" in warned[0]
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert b["ntk/condition_number"] == pytest.approx(a["ntk/condition_number"], rel=1e-9)
    assert resumed.history[-1]["ntk/condition_number"] == pytest.approx(
        _head_frozen_kappa(model), rel=1e-7
    )
    # the probe batch is the uninterrupted run's (8 samples, the row count found without net.0)
    assert resumed.state_dict()["probe_shapes"] == whole.state_dict()["probe_shapes"] == [[8, 6]]


def test_a_fit_continued_inside_a_freeze_episode_skips_and_probes_again(tmp_path: Path) -> None:
    whole, _, _ = _episode_fit(tmp_path / "a")
    pl.seed_everything(0)
    mon = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, params="net.0", dtype=torch.float64, **QUIET
    )
    trainer = _trainer(callbacks=[Episode(6, 10), mon], max_epochs=2)
    model = Net()
    trainer.fit(model, _loader())  # ends at step 8, net.0 frozen
    trainer.fit_loop.max_epochs = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader())
    assert trainer.global_step == 16
    ours = [str(w.message) for w in caught if issubclass(w.category, NTKProbeWarning)]
    assert len(ours) == 1 and "at step 9" in ours[0]  # (8: the first fit's last, skipped)
    assert [h["step"] for h in mon.history] == [h["step"] for h in whole.history]
    assert mon.history[-1]["ntk/condition_number"] == pytest.approx(
        _head_frozen_kappa(model), rel=1e-7
    )


class Body(pl.LightningModule):
    """A probed ``body`` and a ``head`` that keeps training while the body is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.body(batch[0])), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class FreezeBody(pl.Callback):
    def __init__(self) -> None:
        self.frozen = False

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = state_dict["frozen"]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.body.requires_grad_(not self.frozen)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        if trainer.global_step == 6:
            self.frozen = True
            pl_module.body.requires_grad_(False)


def test_a_resumed_run_whose_probed_module_is_wholly_frozen_starts(tmp_path: Path) -> None:
    # Nothing of the probed module is trainable at train start: the row count needs no
    # trainable parameter (params=None fails there too), and the flags are left as they were.
    def run(ckpt_path: Any = None) -> tuple[NTKSpectrumMonitor, Body, list[str]]:
        pl.seed_everything(0)
        mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, module="body", **QUIET)
        ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
        trainer = _trainer(
            callbacks=[FreezeBody(), mon, ck], max_epochs=3, enable_checkpointing=True
        )
        model = Body()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, _loader(), ckpt_path=ckpt_path)
        assert trainer.global_step == 12
        return (
            mon,
            model,
            [str(w.message) for w in caught if issubclass(w.category, NTKProbeWarning)],
        )

    whole, _, _ = run()
    assert [h["step"] for h in whole.history] == [0, 1, 2, 3, 4, 5]
    mon, model, warned = run(tmp_path / "ck" / "epoch=1-step=8.ckpt")
    assert [h["step"] for h in mon.history] == [0, 1, 2, 3, 4, 5]
    assert len(warned) == 1 and "at step 9" in warned[0]
    assert not any(p.requires_grad for p in model.body.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert mon.state_dict()["probe_shapes"] == [[8, 6]]


def _paired() -> PairedModule:
    return PairedModule(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)),
        nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4)),
        lr=1e-2,
    )


class FreezeSides(pl.Callback):
    """At global step 2: freeze the whole layer ``0`` of ``sides``, and ``0.bias`` of
    ``bias_of``."""

    def __init__(self, sides: tuple[str, ...], bias_of: str | None = None) -> None:
        self.sides, self.bias_of = sides, bias_of

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        if trainer.global_step == 2:
            for side in self.sides:
                getattr(pl_module, side)[0].requires_grad_(False)
            if self.bias_of:
                getattr(pl_module, self.bias_of)[0].bias.requires_grad_(False)


def _paired_fit(
    callback: pl.Callback, **kw: Any
) -> tuple[NTKSpectrumMonitor, PairedModule, pl.Trainer, list[str]]:
    pl.seed_everything(0)
    model = _paired()
    mon = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, params="0", dtype=torch.float64, **QUIET
    )
    val, ckpt_path = kw.pop("val", None), kw.pop("ckpt_path", None)
    trainer = _trainer(callbacks=[callback, mon, *kw.pop("callbacks", [])], **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader(), val, ckpt_path=ckpt_path)
    ours = [str(w.message) for w in caught if issubclass(w.category, NTKProbeWarning)]
    return mon, model, trainer, ours


def _layer0_kappa(side: nn.Module) -> float:
    """κ with the trainable parameters of layer ``0`` alone probed (float64 truth)."""
    import copy

    net = copy.deepcopy(side)
    for p in net[2].parameters():
        p.requires_grad_(False)
    return _dense_kappa(net, _data()[:8][0])


def test_paired_one_side_filter_stopping_skips_that_side_only() -> None:
    # The model side's _ProbeFailure left the per-target loop: the baseline was not probed (nor
    # its set change noticed) from step 2 on.
    mon, model, trainer, warned = _paired_fit(
        FreezeSides(("model",), bias_of="baseline"), max_epochs=2
    )
    assert trainer.global_step == 8
    side_steps = {
        side: [h["step"] for h in mon.history if f"ntk/{side}/condition_number" in h]
        for side in ("model", "baseline")
    }
    assert side_steps == {"model": [0, 1], "baseline": list(range(9))}
    assert [h["step"] for h in mon.history] == list(range(9))
    filt = [w for w in warned if "filter" in w]
    changed = [w for w in warned if "parameters probed" in w]
    assert len(filt) == 1 and "of model" in filt[0] and "at step 2" in filt[0]
    assert "baseline" not in filt[0]
    assert "ntk/model/* values in trainer.callback_metrics stay" in filt[0]
    assert len(changed) == 1 and "in baseline changed at step 2" in changed[0]
    assert "0 tensor(s) added" in changed[0] and "1 removed ['0.bias']" in changed[0]
    # the baseline's series measures it (0.weight only from step 2): the final weights
    assert mon.history[-1]["ntk/baseline/condition_number"] == pytest.approx(
        _layer0_kappa(model.baseline), rel=1e-7
    )
    # the skipped side holds its last probe's value (documented), the other one the current
    cm = trainer.callback_metrics
    assert float(cm["ntk/model/condition_number"]) == pytest.approx(
        mon.history[1]["ntk/model/condition_number"], rel=1e-6
    )
    assert float(cm["ntk/baseline/condition_number"]) == pytest.approx(
        mon.history[-1]["ntk/baseline/condition_number"], rel=1e-6
    )


def test_paired_both_sides_stopping_at_once_are_named_in_one_warning() -> None:
    mon, _, trainer, warned = _paired_fit(FreezeSides(("model", "baseline")), max_epochs=2)
    assert trainer.global_step == 8
    assert [h["step"] for h in mon.history] == [0, 1]
    assert len(warned) == 1, warned
    assert "of model" in warned[0] and "of baseline" in warned[0] and "at step 2" in warned[0]


def test_a_resumed_paired_run_holds_the_skipped_sides_last_value(tmp_path: Path) -> None:
    # The restore took history[-1] alone: a side skipped since had no value in the resumed run.
    key = "ntk/model/condition_number"

    def run(ckpt_path: Any = None) -> list[tuple[int, float]]:
        seen = Seen(key, optional=True)
        ck = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
        _paired_fit(
            Episode(2, side="model"),
            max_epochs=3,
            callbacks=[seen, ck],
            enable_checkpointing=True,
            val=_loader(16, 1),
            ckpt_path=ckpt_path,
        )
        return seen.values

    whole = run()
    assert [s for s, _ in whole] == [4, 8, 12] and whole[0][1] == whole[1][1] == whole[2][1]
    assert run(tmp_path / "ck" / "epoch=0-step=4.ckpt") == whole[1:]


def test_model_pruning_keeps_the_kappa_that_early_stopping_sees_current() -> None:
    # With a name filter, pruning (weight -> weight_orig) skipped every later probe: EarlyStopping
    # compared the step-4 κ again and again. The filter now follows the pruned weight.
    pl.seed_everything(0)
    key = "ntk/condition_number"
    mon = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, params="net.0.weight", dtype=torch.float64, **QUIET
    )
    seen = Seen(key)
    prune = ModelPruning("l1_unstructured", amount=0.3, verbose=0)
    trainer = _trainer(callbacks=[prune, mon, seen], max_epochs=3)
    model = Net()
    trainer.fit(model, _loader(), _loader(16, 1))
    assert [h["step"] for h in mon.history] == list(range(13))
    by_step = {h["step"]: h[key] for h in mon.history}
    assert [s for s, _ in seen.values] == [4, 8, 12]
    assert all(v == pytest.approx(by_step[s], rel=1e-6) for s, v in seen.values)
    assert len({v for _, v in seen.values}) == 3


# ------------------------------------------------------------------ crossing/delta, read_every > 1
_BASE = [1.6 - 0.02 * i for i in range(100)]


def _delta_truth(trainer: pl.Trainer) -> dict[int, float]:
    """The debiased EMA (β = 0.5) of the logged train_loss minus the baseline, per step."""
    loss = _csv(trainer, "train_loss")
    ema_a = ema_b = 0.0
    out = {}
    for k, step in enumerate(sorted(loss), start=1):
        ema_a = 0.5 * ema_a + 0.5 * loss[step]
        ema_b = 0.5 * ema_b + 0.5 * _BASE[step]
        out[step] = (ema_a - ema_b) / (1 - 0.5**k)
    return out


class AtEpochEnd(pl.Callback):
    """``crossing/delta`` in callback_metrics at each train-epoch end (no ``monitor``)."""

    def __init__(self) -> None:
        self.values: list[tuple[int, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.values.append((trainer.global_step, float(trainer.callback_metrics["crossing/delta"])))


def test_crossing_delta_is_current_at_train_epoch_end_with_read_every(tmp_path: Path) -> None:
    # read_every=4, 6 batches an epoch: the epoch end saw the delta of step 3 (9, 15).
    pl.seed_everything(0)
    cross = LossCrossingMonitor(baseline=_BASE, monitor="train_loss", smoothing=0.5, read_every=4)
    seen = AtEpochEnd()
    trainer = _trainer(tmp_path, callbacks=[cross, seen], max_epochs=3)
    trainer.fit(Net(), DataLoader(_data(48), batch_size=8))
    truth = _delta_truth(trainer)
    assert sorted(truth) == list(range(18))
    assert [s for s, _ in seen.values] == [6, 12, 18]
    assert [v for _, v in seen.values] == pytest.approx([truth[s - 1] for s, _ in seen.values])


def _ranked_fit(tmp_path: Path, read_every: int) -> tuple[dict[int, float], float, int, Any]:
    pl.seed_everything(0)
    cross = LossCrossingMonitor(
        baseline=_BASE, monitor="train_loss", smoothing=0.5, read_every=read_every
    )
    ck = ModelCheckpoint(
        dirpath=tmp_path / f"ck{read_every}",
        monitor="crossing/delta",
        mode="min",
        save_top_k=-1,
        every_n_train_steps=5,
        filename="{step}",
    )
    stop = EarlyStopping(
        monitor="crossing/delta", mode="min", patience=1, check_on_train_epoch_end=True
    )
    trainer = _trainer(
        tmp_path / f"log{read_every}",
        callbacks=[cross, ck, stop],
        max_epochs=4,
        enable_checkpointing=True,
    )
    trainer.fit(Net(), DataLoader(_data(80), batch_size=8))
    scores = {int(Path(p).stem.split("=")[1]): float(v) for p, v in ck.best_k_models.items()}
    return scores, float(stop.best_score), stop.stopped_epoch, trainer


def test_monitored_crossing_delta_is_read_every_batch(tmp_path: Path) -> None:
    # ModelCheckpoint(every_n_train_steps=5) ranked the checkpoints by the delta of the last read
    # (steps 3, 7, 11, ... with read_every=4), not of the step it saved.
    scores, best, stopped, trainer = _ranked_fit(tmp_path, 4)
    truth = _delta_truth(trainer)
    # a checkpoint at global step s holds the delta of logger step s - 1
    assert sorted(scores) == [5, 10, 15, 20, 25, 30, 35, 40][: len(scores)] and len(scores) >= 2
    assert [scores[s] for s in sorted(scores)] == pytest.approx(
        [truth[s - 1] for s in sorted(scores)],
        rel=1e-6,  # (a float32 tensor there)
    )
    ref_scores, ref_best, ref_stopped, _ = _ranked_fit(tmp_path, 1)
    assert scores == ref_scores and best == ref_best and stopped == ref_stopped


class _DumpHistory(pl.Callback):
    def __init__(self, path: Path, mon: NTKSpectrumMonitor) -> None:
        self.path, self.mon = path, mon

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(self.mon.history, self.path / f"rank{trainer.global_rank}.pt")


@pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform == "win32", reason="needs gloo"
)
def test_ddp_paired_one_side_skipped_on_every_rank(tmp_path: Path) -> None:
    # rank 0 probes and broadcasts the other side's results with the skipped side's warning
    torch.manual_seed(0)
    model = _paired()
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, params="0", **QUIET)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork_find_unused_parameters_true",  # (a frozen layer: DDP is told)
        max_epochs=2,
        logger=False,
        callbacks=[FreezeSides(("model",)), mon, _DumpHistory(tmp_path, mon)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _loader())
    h0, h1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert h0 == h1
    assert [h["step"] for h in h0 if "ntk/model/condition_number" in h] == [0, 1]
    assert [h["step"] for h in h0 if "ntk/baseline/condition_number" in h] == [0, 1, 2, 3, 4]
