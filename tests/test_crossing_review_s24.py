"""Findings of the session-24 review of loss-crossing detection (each test fails on the code
before it)."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_callbacks_crossing import _csv_rows, _loader, _trainer

from glu_probe.callbacks.crossing import LossCrossingMonitor
from glu_probe.crossing import MODEL_OVERTAKES, CrossingDetector, find_crossings


@pytest.mark.parametrize(
    ("name", "phase"),
    [
        ("val_loss", "val"),
        ("eval_loss", "val"),  # Hugging Face's name: was "train", compared 5 steps late
        ("Val/loss", "val"),
        ("loss/valid", "val"),
        ("validation_loss", "val"),
        ("train_loss", "train"),
        ("train/value_loss", "train"),  # an RL critic's training loss
        ("interval_loss", "train"),
    ],
)
def test_the_default_phase_reads_validation_words_in_the_name(name, phase):
    assert LossCrossingMonitor(baseline=[1.0, 2.0], monitor=name).phase == phase


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_an_in_memory_baseline_with_a_non_finite_step_is_refused(bad):
    """A NaN step passed the increasing-steps check and silently disabled every comparison
    after it; an inf step made up values."""
    with pytest.raises(MisconfigurationException, match="non-finite steps"):
        LossCrossingMonitor(baseline=[(0, 1.0), (bad, 2.0), (2, 3.0)])


class _ValLogged(pl.LightningModule):
    """Logs a prescribed ``val_loss`` at each validation (and trains a dummy weight)."""

    def __init__(self, values: np.ndarray) -> None:
        super().__init__()
        self.values = values
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w**2).sum() + batch.sum() * 0

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", float(self.values[self.global_step]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_delta_is_logged_at_every_validation_with_phase_val(tmp_path):
    """With phase="val" there is one update a validation; counted in log_every_n_steps (50)
    updates, crossing/delta had a point at the first validation and at crossings only."""
    n_epochs, per_epoch = 12, 10
    values = 1.0 + 0.3 * np.sin(np.arange(n_epochs * per_epoch + 1) / 15.0)
    monitor = LossCrossingMonitor(
        baseline=list(np.ones(values.size)), monitor="val_loss", smoothing=0.0, patience=1
    )
    logger = CSVLogger(str(tmp_path), name="m")
    _trainer(
        tmp_path,
        logger=logger,
        log_every_n_steps=50,
        max_epochs=n_epochs,
        limit_val_batches=1,
        callbacks=[monitor],
        num_sanity_val_steps=0,
    ).fit(_ValLogged(values), _loader(per_epoch), _loader(2))
    rows = _csv_rows(logger)
    val_steps = sorted(int(r["step"]) for r in rows if r.get("val_loss"))
    delta_steps = sorted(int(r["step"]) for r in rows if r.get("crossing/delta"))
    assert monitor.detector.n_updates == n_epochs == len(val_steps)
    assert delta_steps == val_steps
    for r in rows:
        if r.get("crossing/delta"):  # the unsmoothed difference to the baseline of ones
            step = int(r["step"])
            want = np.float32(values[step + 1]) - 1.0  # (logged after the step's update)
            assert float(r["crossing/delta"]) == pytest.approx(want, abs=1e-6)


def test_find_crossings_warns_when_too_few_steps_for_two_regimes():
    """A crossing needs 2·patience aligned updates; 6..9 at patience 5 gave [] silently."""
    steps = list(range(9))
    a = [2.0 - 0.2 * s for s in steps]
    with pytest.warns(UserWarning, match="a crossing two regimes"):
        assert find_crossings(steps, a, steps, [1.0] * 9, smoothing=0.0, patience=5) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (c,) = find_crossings(  # (five ahead, the tie at 5, five behind)
            list(range(11)),
            [2.0 - 0.2 * s for s in range(11)],
            list(range(11)),
            [1.0] * 11,
            smoothing=0.0,
            patience=5,
            hysteresis=0.0,
        )
        assert c.step == 5 and c.direction == MODEL_OVERTAKES


@pytest.mark.parametrize("zeros", [1, 3])
def test_an_exact_zero_difference_dates_the_crossing(zeros):
    """a = 10 − t against b = 5 is 0 at t* = 5: step = ⌈t*⌉ = 5 as documented (was 6); a run
    of exact zeros dates it from its first."""
    steps = list(range(20))
    a = [10.0 - t if t <= 5 else (5.0 if t < 5 + zeros else 10.0 - t + (zeros - 1)) for t in steps]
    (c,) = find_crossings(steps, a, steps, [5.0] * 20, smoothing=0.0, patience=3, hysteresis=0.0)
    assert c.step == 5 and c.direction == MODEL_OVERTAKES


def test_a_zero_inside_one_sign_does_not_move_the_crossing():
    det = CrossingDetector(smoothing=0.0, patience=2, hysteresis=0.0)
    diffs = [1.0, 1.0, 0.0, 1.0, 1.0, -1.0, -1.0, -1.0]  # the zero at 2 is no sign change
    for t, d in enumerate(diffs):
        det.update(t, 5.0 + d, 5.0)
    (c,) = det.crossings
    assert c.step == 5


def test_the_zero_run_is_saved_and_restored():
    det = CrossingDetector(smoothing=0.0, patience=2, hysteresis=0.0)
    for t, d in enumerate([1.0, 1.0, 1.0, 0.0]):
        det.update(t, 5.0 + d, 5.0)
    state = det.state_dict()
    resumed = CrossingDetector(smoothing=0.0, patience=2, hysteresis=0.0)
    resumed.load_state_dict(state)
    old = dict(state)
    del old["zero_since"]  # a checkpoint written before session 24
    CrossingDetector(smoothing=0.0, patience=2, hysteresis=0.0).load_state_dict(old)
    for t, d in enumerate([-1.0, -1.0], start=4):
        det.update(t, 5.0 + d, 5.0)
        resumed.update(t, 5.0 + d, 5.0)
    assert [c.step for c in resumed.crossings] == [c.step for c in det.crossings] == [3]
