"""Findings of the session-21 review of the offline crossing detector, the report and the
theory experiment (each test fails on the code before it)."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest

from glu_probe.crossing import CrossingDetector, find_crossings
from glu_probe.report import _fmt_crossings, _loss_candidates, aggregate_seeds, format_seed_table
from glu_probe.theory import crossing_experiment


def test_detector_steps_are_whole_numbers_and_skipped_updates_keep_their_step():
    det = CrossingDetector(patience=np.int64(2), smoothing=np.float32(0.5))  # numpy scalars
    assert det.patience == 2 and det.smoothing == 0.5
    with pytest.raises(ValueError, match="integer"):
        det.update(3.7, 1.0, 2.0)  # was truncated to step 3
    det.update(np.int64(3), 1.0, 2.0)
    det.update(4.0, math.nan, 2.0)  # skipped, but step 4 is taken
    with pytest.raises(ValueError, match="strictly increasing"):
        det.update(4, 1.0, 2.0)
    for bad in (True, "5", 0):
        with pytest.raises(ValueError, match="patience"):
            CrossingDetector(patience=bad)


def test_find_crossings_warns_when_the_series_barely_overlap():
    """Disjoint step ranges (or fewer aligned steps than a regime needs) gave [] silently."""
    with pytest.warns(UserWarning, match="within series b's steps"):
        assert find_crossings([0, 1, 2], [1.0, 1.0, 1.0], [10, 11], [2.0, 2.0]) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps = list(range(40))
        a = [2.0 if s < 20 else 0.5 for s in steps]
        (c,) = find_crossings(steps, a, steps, [1.0] * 40, smoothing=0.0, patience=3)
        assert c.step == 20


def test_report_reads_the_per_step_loss_and_shows_confirmed_crossings():
    """A loss logged ``on_step`` and ``on_epoch`` has ``_step`` and ``_epoch`` tags: the table's
    train loss is the last batch's (the docstring's), from the ``_step`` tag; and a crossing the
    monitor confirmed shows even where the logged curves give none (it said "none")."""
    assert _loss_candidates("model", "train")[:2] == ["model/train_loss", "model/train_loss_step"]
    text = _fmt_crossings([], [(85, 1.0)])
    assert "85" in text and "confirmed" in text and text != "none"
    assert _fmt_crossings([], []) == "none"


def test_seed_table_says_how_many_seeds_were_finite():
    def row(seed_loss: float, kappa: float) -> dict:
        return {
            "side": "model",
            "label": "model",
            "kappa_init": 5.0,
            "kappa_end": kappa,
            "train_loss": seed_loss,
            "val_loss": 0.1,
            "gap": 0.01,
            "crossings": [],
        }

    agg = aggregate_seeds([row(0.005, 5.0), row(0.0051, 5.0), row(math.nan, math.inf)])
    assert agg[0]["train_loss_n"] == 2 and agg[0]["kappa_end_n"] == 2
    table = format_seed_table(agg)
    assert table.count("(2/3 finite)") == 2  # train loss and κ end


def test_crossing_experiment_refuses_kinds_without_paper_kernels_before_training():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="paper's kernels"):
        crossing_experiment(10, 200, 60, kinds=("gelu", "swiglu"), steps=50)
    assert time.perf_counter() - t0 < 1.0


def test_re_review_steps_as_0d_tensors_and_the_validation_loss_epoch_tag():
    """A 0-d tensor or array step was accepted before session 21's whole-number check and is
    again; an infinite step is a clear ValueError (it was an OverflowError). The report reads
    a validation loss from its epoch tag first: a ``val_loss_step`` tag counts validation
    batches, not training steps (the re-review's gap came out −0.17 for +4.6)."""
    import torch

    det = CrossingDetector(patience=2)
    det.update(torch.tensor(3), 1.0, 2.0)
    det.update(np.array(4), 1.0, 2.0)
    assert det.last_step == 4
    with pytest.raises(ValueError, match="integer"):
        det.update(math.inf, 1.0, 2.0)
    assert _loss_candidates("", "val") == ["val_loss", "val_loss_epoch", "val_loss_step"]
    assert _loss_candidates("", "train") == ["train_loss", "train_loss_step", "train_loss_epoch"]
