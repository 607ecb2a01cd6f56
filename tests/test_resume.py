"""Crash and resume: a run restarted from a mid-run checkpoint logs the same series.

Run A trains 16 steps uninterrupted. Run B is the same run, checkpointed at each epoch end, and
crashes at step 10. Run C is a fresh process-like restart (new module with other initial weights,
new callbacks with empty state) resumed from B's checkpoint at step 8. The NTK series (Lanczos,
warm-started from the previous probe's Ritz vectors, which must therefore come back from the
checkpoint) and the crossing history of C must equal A's.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import LIGHTNING_VERSION
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks.crossing import LossCrossingMonitor
from glu_probe.callbacks.ntk import NTKSpectrumMonitor

torch.set_num_threads(1)

# Baseline losses alternating far above / far below this run's loss (~1): a crossing every few
# steps, on both sides of the resume point.
BASELINE = ([10.0] * 3 + [0.0] * 3) * 3


class Net(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class SimulatedCrash(RuntimeError):
    pass


class Crash(pl.Callback):
    def __init__(self) -> None:
        self.monitor: NTKSpectrumMonitor | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        callbacks: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]
        self.monitor = next(c for c in callbacks if isinstance(c, NTKSpectrumMonitor))
        if trainer.global_step == 10:
            raise SimulatedCrash("the process dies at step 10")


def data_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(32, 5, generator=g), torch.randn(32, 2, generator=g))
    return DataLoader(ds, batch_size=8)


def monitors() -> tuple[NTKSpectrumMonitor, LossCrossingMonitor]:
    return (
        NTKSpectrumMonitor(
            every_n_steps=3,
            probe_size=20,
            method="lanczos",
            spectrum_kwargs={"block_size": 2, "max_matvecs": 60},
        ),
        LossCrossingMonitor(baseline=BASELINE, monitor="train_loss", smoothing=0.0, patience=1),
    )


def run(tmp: Path, name: str, extra: list[pl.Callback], seed: int = 0, ckpt: Path | None = None):
    ntk, crossing = monitors()
    logger = CSVLogger(tmp, name=name)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=4,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[ntk, crossing, *extra],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(seed), data_loader(), ckpt_path=ckpt)
    return ntk, crossing, Path(logger.log_dir) / "metrics.csv"


def ntk_rows(path: Path) -> dict[int, dict[str, float]]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {
        int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("ntk/") and v}
        for r in rows
        if r.get("ntk/lambda_max")
    }


def test_crash_and_resume_logs_the_same_series(tmp_path):
    ntk_a, cross_a, csv_a = run(tmp_path, "a", [])
    assert [h["step"] for h in ntk_a.history] == [0, 3, 6, 9, 12, 15]
    assert len(cross_a.crossings) >= 2

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    crash = Crash()
    with pytest.raises(SimulatedCrash):
        run(tmp_path, "b", [ckpt_cb, crash])
    assert crash.monitor is not None
    assert [h["step"] for h in crash.monitor.history] == [0, 3, 6, 9]  # died at step 10
    ckpt = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("NTKSpectrumMonitor"))
    assert saved["last_probe_step"] == 6 and set(saved["warm_start"]) == {""}

    # A different initial model and fresh callbacks: everything must come from the checkpoint.
    ntk_c, cross_c, csv_c = run(tmp_path, "c", [], seed=123, ckpt=ckpt)

    assert [h["step"] for h in ntk_c.history] == [0, 3, 6, 9, 12, 15]
    for ha, hc in zip(ntk_a.history, ntk_c.history, strict=True):
        assert ha.keys() == hc.keys()
        for k in ha:
            assert hc[k] == pytest.approx(ha[k], rel=1e-12, nan_ok=True), (ha["step"], k)
    # What the resumed run itself logged (steps after 8) equals the uninterrupted log.
    logged_a, logged_c = ntk_rows(csv_a), ntk_rows(csv_c)
    assert sorted(logged_c) == [9, 12, 15]
    for step, row in logged_c.items():
        assert row.keys() == logged_a[step].keys()
        for k, v in row.items():
            assert v == pytest.approx(logged_a[step][k], rel=1e-6, nan_ok=True)

    assert cross_c.crossings == cross_a.crossings
    assert any(c.step > 8 for c in cross_a.crossings)


def test_resume_with_changed_settings_warns_and_goes_on(tmp_path):
    """Resuming with another crossing patience, or another probe, is told (a warning) instead
    of aborting the fit (the crossing detector raised a raw ValueError) or silently mixing
    two probes' series and warm-starting from vectors of another K."""
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    run(tmp_path, "a", [ckpt_cb])
    ckpt = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"

    def resumed(ntk: NTKSpectrumMonitor, crossing: LossCrossingMonitor) -> None:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=3,
            logger=False,
            callbacks=[ntk, crossing],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Net(0), data_loader(), ckpt_path=ckpt)

    ntk, crossing = monitors()
    changed = LossCrossingMonitor(
        baseline=BASELINE, monitor="train_loss", smoothing=0.0, patience=3
    )
    with pytest.warns(UserWarning, match="resuming with detector settings"):
        resumed(ntk, changed)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    before = next(v for k, v in saved.items() if k.startswith("LossCrossingMonitor"))
    n_saved = len(before["detector"]["crossings"])
    assert changed.detector.patience == 3 and len(changed.crossings) >= n_saved
    assert [c.to_dict() for c in changed.crossings[:n_saved]] == before["detector"]["crossings"]

    other_probe = NTKSpectrumMonitor(
        every_n_steps=3,
        probe_size=12,  # the checkpoint's probe had 20 samples
        method="lanczos",
        spectrum_kwargs={"block_size": 2, "max_matvecs": 60},
    )
    _, crossing = monitors()
    with pytest.warns(UserWarning, match=r"probe batch \(input shapes \[\[12, 5\]\]\) differs"):
        resumed(other_probe, crossing)
    assert [h["step"] for h in other_probe.history] == [0, 3, 6, 9, 12]
    assert other_probe._ritz[""].shape[0] == 12  # its own K's vectors (the saved had 20 rows)
    assert all(h["ntk/lambda_max"] > 0 for h in other_probe.history[-2:])

    # another cadence is told too (it changed silently; review, session 20)
    faster = NTKSpectrumMonitor(
        every_n_steps=2,
        probe_size=20,
        method="lanczos",
        spectrum_kwargs={"block_size": 2, "max_matvecs": 60},
    )
    _, crossing = monitors()
    with pytest.warns(UserWarning, match="every_n_steps=2, the checkpoint's run probed every 3"):
        resumed(faster, crossing)
    assert [h["step"] for h in faster.history] == [0, 3, 6, 8, 10, 12]


def test_a_probe_at_the_start_of_a_resumed_fit_is_logged_at_the_checkpoint_step(tmp_path):
    """A monitor new to a resumed fit (or with another cadence) probes when the fit starts:
    that probe measures the checkpoint's parameters. It was written one step early (Lightning
    advances its logger step for the restored checkpoint only when the epoch loop starts,
    after ``on_train_start``): the checkpoint's κ after 8 steps at step 7 (review, session 20).
    It now sits at 8, where the uninterrupted run logged the same κ."""
    ntk_a, _, _ = run(tmp_path, "a", [])

    class MidEpochCrash(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 10:
                raise SimulatedCrash("the process dies at step 10")

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    with pytest.raises(SimulatedCrash):
        run(tmp_path, "b", [ckpt_cb, MidEpochCrash()])
    ckpt = tmp_path / "ck" / "epoch=1-step=8.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ck").iterdir())
    # the monitor is new to the resumed fit: no state of it in the checkpoint
    state = torch.load(ckpt, weights_only=False)
    state["callbacks"] = {
        k: v for k, v in state["callbacks"].items() if not k.startswith("NTKSpectrumMonitor")
    }
    ckpt = tmp_path / "without_monitor.ckpt"
    torch.save(state, ckpt)
    fresh = NTKSpectrumMonitor(every_n_steps=5, probe_size=20, dtype=torch.float64)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=4,
        logger=False,
        callbacks=[fresh],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(Warning):  # (Lightning: a mid-epoch checkpoint of a plain loader)
        trainer.fit(Net(123), data_loader(), ckpt_path=ckpt)
    first = fresh.history[0]
    # Lightning 2.4 restores its logger step one short after a checkpoint saved at a batch end
    # (_batches_that_stepped 7 for global_step 8; made consistent upstream in 2.5, PR 20379)
    # and logs its own first resumed loss at 7 too: the probe follows Lightning's counter.
    assert first["step"] == (8 if LIGHTNING_VERSION >= (2, 5) else 7)
    # its parameters are the checkpoint's: a float64 probe of them on the same 20 samples
    from glu_probe.ntk import ntk_spectrum

    model = Net(0)
    model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    x = torch.cat([b[0] for b in data_loader()])[:20]
    kappa = ntk_spectrum(model, x, dtype=torch.float64).condition_number
    assert first["ntk/condition_number"] == pytest.approx(kappa, rel=1e-9)
    assert ntk_a.history  # (the uninterrupted run, for the checkpoint)


def _auto_fit(tmp: Path, name: str, max_steps: int, ckpt: Path | None = None) -> NTKSpectrumMonitor:
    ntk = NTKSpectrumMonitor(probe_size=8, method="dense", log_histogram=False, log_figure=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=CSVLogger(tmp, name=name),
        callbacks=[ntk],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Net(0), data_loader(), ckpt_path=ckpt)
    if ckpt is None:
        trainer.save_checkpoint(tmp / f"{name}.ckpt")
    return ntk


def test_an_automatic_cadence_is_chosen_again_for_a_longer_resumed_run(tmp_path):
    """(Review, session 23.) A 20-step run resolves every 1 step; resumed to 80 steps it kept
    probing every step (61 more probes, the 80-step run's cadence gives 15), silently."""
    first = _auto_fit(tmp_path, "short", 20)
    assert first._resolved_every == 1
    with pytest.warns(UserWarning, match="automatic cadence is every 4 steps from here"):
        resumed = _auto_fit(tmp_path, "long", 80, ckpt=tmp_path / "short.ckpt")
    steps = [h["step"] for h in resumed.history]
    after = [s for s in steps if s > 20]
    assert after == list(range(24, 81, 4)), steps
    assert steps[: len(steps) - len(after)] == [h["step"] for h in first.history]


def test_an_automatic_cadence_resumed_with_the_same_length_is_kept_quietly(tmp_path):
    import warnings

    _auto_fit(tmp_path, "crash", 40)  # (a checkpoint at its end: a resume adds no steps)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        resumed = _auto_fit(tmp_path, "again", 40, ckpt=tmp_path / "crash.ckpt")
    assert not [r for r in rec if "cadence" in str(r.message)]
    assert resumed._resolved_every == 2
