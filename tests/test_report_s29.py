"""Review, session 29: the report's and the demo's verdicts, against hand-made event files.

Each test writes TensorBoard events with known values (``torch.utils.tensorboard``) and checks
what :mod:`glu_probe.report` and :func:`glu_probe.demo.observations` make of them against
numbers computed here with numpy.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import glu_probe
from glu_probe.demo import observations
from glu_probe.report import (
    aggregate_seeds,
    format_seed_table,
    load_run,
    make_console,
    render_table,
    summarize,
)

torch.set_num_threads(1)

#: The checkout of the glu_probe under test (its docs describe that code).
ROOT = Path(glu_probe.__file__).resolve().parents[1]
BETA = 0.9


def _ema_at_end(x: np.ndarray, beta: float = BETA) -> float:
    """The debiased EMA after the last value, as the weighted mean it is:
    Σ_j (1 − β) β^(k−j) x_j / (1 − β^k) (written out, not the recursion)."""
    k = len(x)
    w = (1.0 - beta) * beta ** np.arange(k - 1, -1, -1, dtype=np.float64)
    return float((w * x).sum() / (1.0 - beta**k))


def _f32(x: np.ndarray) -> np.ndarray:
    """What a float32 scalar event holds."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def _write_pair(
    folder: Path,
    a: np.ndarray,
    b: np.ndarray,
    *,
    steps_a: np.ndarray | None = None,
    steps_b: np.ndarray | None = None,
    meta: dict | None = None,
) -> None:
    w = SummaryWriter(str(folder))
    steps_a = np.arange(len(a)) if steps_a is None else steps_a
    steps_b = np.arange(len(b)) if steps_b is None else steps_b
    for s, v in zip(steps_a, a, strict=True):
        w.add_scalar("model/train_loss", float(v), int(s))
    for s, v in zip(steps_b, b, strict=True):
        w.add_scalar("baseline/train_loss", float(v), int(s))
    w.close()
    labels = {"labels": {"model": "GLU", "baseline": "MLP"}}
    (folder / "pair.json").write_text(json.dumps({**labels, **(meta or {})}))


# --------------------------------------------------------------------------------------------
# 1. "lower" comes from the smoothed losses, not the last minibatch
# --------------------------------------------------------------------------------------------


def test_final_train_loss_verdict_uses_the_smoothed_losses(tmp_path: Path):
    """GLU is below the baseline on every step after ~50 but the last, where one unlucky
    minibatch puts it above: the verdict is the smoothed one (GLU), as the crossing says."""
    t = np.arange(300)
    base = 2 * np.exp(-t / 80) + 0.5
    glu = base + 0.2 * np.tanh((50 - t) / 10)
    glu[-1] = base[-1] + 0.01
    _write_pair(tmp_path / "pair", glu, base)
    rows = summarize(load_run(tmp_path))
    m, b = (next(r for r in rows if r["side"] == side) for side in ("model", "baseline"))
    want_m, want_b = _ema_at_end(_f32(glu)), _ema_at_end(_f32(base))
    assert want_m < want_b and glu[-1] > base[-1]  # the premise: the two disagree
    assert m["compare_step"] == b["compare_step"] == 299
    assert m["train_smoothed"] == pytest.approx(want_m, rel=1e-9)
    assert b["train_smoothed"] == pytest.approx(want_b, rel=1e-9)
    assert m["train_loss"] == pytest.approx(glu[-1], rel=1e-6)  # the table's column: unchanged
    (line,) = observations(rows)
    assert "GLU overtook MLP" in line
    assert (
        f"Final train loss, smoothed (the crossing detector's EMA, β = 0.9) at step 299: "
        f"GLU {want_m:.4g} vs MLP {want_b:.4g} (lower: GLU); "
        f"last logged batch {_f32(glu)[-1]:.4g} vs {_f32(base)[-1]:.4g}." in line
    )
    assert "(lower: MLP)" not in line


# --------------------------------------------------------------------------------------------
# 2. the documented crossing step is the last sign change before confirmation
# --------------------------------------------------------------------------------------------


def test_crossing_step_is_the_last_sign_change_before_confirmation_as_documented(tmp_path: Path):
    """A near tie that wobbles: the smoothed difference dips below 0 briefly (too briefly for the
    patience) before the lasting lead; the reported step is the last zero-crossing, and both
    docs say so (they said "the first step at which ... changes sign")."""
    n = 120
    t = np.arange(n, dtype=np.float64)
    base = np.full(n, 1.0)
    d = np.full(n, 0.05)  # model worse first (a regime of +1)
    # a short lead: the EMA turns negative after 7 updates and never leaves the 1 % band
    d[40:48] = -0.05
    d[60:] = -0.05  # the lasting lead
    glu = base + d
    _write_pair(tmp_path / "pair", glu, base)
    rows = summarize(load_run(tmp_path))
    # the truth: sign changes of the numpy EMA difference
    ema_d = np.array([_ema_at_end(_f32(glu)[: k + 1]) - 1.0 for k in range(n)])
    neg = ema_d < 0
    starts = [int(t[k]) for k in range(1, n) if neg[k] and not neg[k - 1]]
    assert len(starts) == 2 and starts[0] < starts[1]  # first dip, then the lasting one
    assert rows[0]["crossings"] == [(starts[1], 1.0)]
    demo, repro = (
        " ".join((ROOT / "docs" / f).read_text(encoding="utf-8").split())
        for f in ("demo.md", "reproduction.md")
    )
    assert "the first step at which the smoothed difference of the two train losses" not in demo
    assert "first step at which the GLU model's smoothed training loss goes below" not in repro
    assert "its *last* sign change before the confirmation, not the first" in demo
    assert "the *last* sign change of the smoothed difference before the confirmation" in repro
    for text in (demo, repro):  # the GPT-2 demo's case (the reviewer's gpt_sign.py)
        assert "first turns negative at step 183" in text and "316" in text


# --------------------------------------------------------------------------------------------
# 3. a resumed run's orphans are dropped
# --------------------------------------------------------------------------------------------


def test_resumed_run_drops_the_crashed_runs_orphan_events(tmp_path: Path):
    """Run 1 logs steps 0..150 (a crossing confirmed at 130, κ probes at 0, 60, 120, 150), then
    crashes; run 2 resumes from step 100 into the same folder (crossing at 160, κ at 100, 180).
    Kept: run 1 below step 100, run 2 from 100 on (TensorBoard's restart purge)."""
    folder = tmp_path / "pair"
    t = np.arange(200)
    base = 2 * np.exp(-t / 60) + 0.1
    a1 = base + 0.3 * np.tanh((115 - t) / 10)
    a2 = base + 0.3 * np.tanh((145 - t) / 10)
    w = SummaryWriter(str(folder))
    for s in range(151):
        w.add_scalar("model/train_loss", a1[s], s)
        w.add_scalar("baseline/train_loss", base[s], s)
    for s in (0, 60, 120, 150):
        w.add_scalar("ntk/model/condition_number", 1000.0 + s, s)
        w.add_histogram("ntk/model/log10_spectrum", np.arange(8.0) + s, s)
    w.add_scalar("crossing/event", 1.0, 130)
    w.close()
    time.sleep(0.05)
    w = SummaryWriter(str(folder))
    for s in range(100, 200):
        w.add_scalar("model/train_loss", a2[s], s)
        w.add_scalar("baseline/train_loss", base[s], s)
    for s in (100, 180):
        w.add_scalar("ntk/model/condition_number", 2000.0 + s, s)
        w.add_histogram("ntk/model/log10_spectrum", np.arange(8.0) + s, s)
    w.add_scalar("crossing/event", 1.0, 160)
    w.close()
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    sub = load_run(tmp_path).subruns["pair"]
    loss = sub.scalars["model/train_loss"]
    np.testing.assert_array_equal(loss.steps, t)
    np.testing.assert_allclose(loss.values, np.concatenate([a1[:100], a2[100:]]), rtol=1e-6)
    kappa = sub.scalars["ntk/model/condition_number"]
    assert kappa.steps.tolist() == [0, 60, 100, 180]
    np.testing.assert_allclose(kappa.values, [1000.0, 1060.0, 2100.0, 2180.0])
    assert [h.step for h in sub.histograms["ntk/model/log10_spectrum"]] == [0, 60, 100, 180]
    event = sub.scalars["crossing/event"]
    assert event.steps.tolist() == [160] and event.values.tolist() == [1.0]
    (row, _) = summarize(load_run(tmp_path))
    assert row["crossings_detected"] == [(160, 1.0)]
    assert [d for _, d in row["crossings"]] == [1.0]  # one overtake, not two the same way
    assert row["kappa_end"] == pytest.approx(2180.0)


def test_two_writers_at_once_are_not_a_restart(tmp_path: Path):
    """Two writers open together in one folder (overlapping in time, both from step 0): every
    event of both is kept."""
    folder = tmp_path / "run"
    w1, w2 = SummaryWriter(str(folder)), SummaryWriter(str(folder))
    for s in range(20):
        w1.add_scalar("train_loss", 1.0 / (s + 1), s)
        w2.add_scalar("extra/metric", float(s), s)
    w1.close()
    w2.close()
    sub = load_run(tmp_path).subruns["run"]
    assert sub.scalars["train_loss"].steps.tolist() == list(range(20))
    assert sub.scalars["extra/metric"].steps.tolist() == list(range(20))


# --------------------------------------------------------------------------------------------
# 4. pair.json names both sides, the logs hold one
# --------------------------------------------------------------------------------------------


def test_pair_json_with_one_side_logged_reports_that_side_and_warns(tmp_path: Path):
    folder = tmp_path / "pair"
    w = SummaryWriter(str(folder))
    loss = 2 * np.exp(-np.arange(100) / 30)
    for s in range(100):
        w.add_scalar("model/train_loss", loss[s], s)
    for s in (0, 50, 99):
        w.add_scalar("ntk/model/condition_number", 1e3 + s, s)
    w.add_scalar("model/val_loss", 0.3, 99)
    w.add_scalar("gap/model/loss", 0.05, 99)
    w.close()
    meta = {
        "labels": {"model": "GLU", "baseline": "MLP"},
        "model_prefix": "model",
        "baseline_prefix": "baseline",
        "steps_done": 100,
    }
    (folder / "pair.json").write_text(json.dumps(meta))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = load_run(tmp_path)
        rows = summarize(run)
        render_table(rows)
    said = [str(x.message) for x in caught if "logs no 'baseline'" in str(x.message)]
    assert len(said) == 1, [str(x.message) for x in caught]
    (row,) = rows
    assert (row["side"], row["label"]) == ("model", "GLU")
    assert row["train_loss"] == pytest.approx(loss[-1], rel=1e-6)
    assert row["kappa_init"] == pytest.approx(1e3) and row["kappa_end"] == pytest.approx(1099.0)
    assert row["val_loss"] == pytest.approx(0.3) and row["gap"] == pytest.approx(0.05)
    assert row["steps"] == 100


# --------------------------------------------------------------------------------------------
# 5. a diverged side, and sides of different lengths
# --------------------------------------------------------------------------------------------


def test_diverged_side_is_named_with_the_step_it_diverged(tmp_path: Path):
    t = np.arange(200)
    base = 2 * np.exp(-t / 60) + 0.1
    glu = base - 0.05
    glu[150:] = np.nan
    _write_pair(tmp_path / "pair", glu, base)
    rows = summarize(load_run(tmp_path))
    m, b = rows
    assert (m["diverged_step"], m["train_finite_step"], m["train_step"]) == (150, 149, 199)
    assert (b["diverged_step"], b["train_finite_step"], b["train_step"]) == (None, 199, 199)
    # compared where both are finite: the last step before the divergence
    assert m["compare_step"] == 149
    assert m["train_smoothed"] == pytest.approx(_ema_at_end(_f32(glu[:150])), rel=1e-9)
    assert b["train_smoothed"] == pytest.approx(_ema_at_end(_f32(base[:150])), rel=1e-9)
    (line,) = observations(rows)
    assert "GLU diverged (non-finite train loss from step 150)." in line
    assert "at step 149: GLU" in line and "(lower: GLU)" in line
    console = make_console(200)
    with console.capture() as cap:
        console.print(render_table(rows))
    assert "non-finite from 150" in cap.get()


def test_a_loss_that_recovers_is_not_diverged(tmp_path: Path):
    t = np.arange(60)
    glu = 1.0 / (t + 1.0)
    glu[10] = np.inf  # one bad batch, then finite again
    _write_pair(tmp_path / "pair", glu, 1.2 / (t + 1.0))
    m, _ = summarize(load_run(tmp_path))
    assert m["diverged_step"] is None and m["train_finite_step"] == 59


def test_sides_of_different_lengths_are_compared_at_a_common_step(tmp_path: Path):
    """Model 200 steps, baseline 100: compared at step 99 (the old sentence compared the model's
    step 199 with the baseline's step 99), and the last batches name their steps."""
    t = np.arange(200)
    base = 2 * np.exp(-t / 60) + 0.1
    glu = base - 0.05
    _write_pair(tmp_path / "pair", glu, base[:100])
    rows = summarize(load_run(tmp_path))
    m, b = rows
    assert (m["train_step"], b["train_step"]) == (199, 99)
    assert m["compare_step"] == b["compare_step"] == 99
    want_m, want_b = _ema_at_end(_f32(glu[:100])), _ema_at_end(_f32(base[:100]))
    assert m["train_smoothed"] == pytest.approx(want_m, rel=1e-9)
    assert b["train_smoothed"] == pytest.approx(want_b, rel=1e-9)
    (line,) = observations(rows)
    assert f"at step 99: GLU {want_m:.4g} vs MLP {want_b:.4g} (lower: GLU)" in line
    last = f"GLU {_f32(glu)[-1]:.4g} (step 199) vs MLP {_f32(base)[99]:.4g} (step 99)"
    assert f"last logged batch {last}." in line


# --------------------------------------------------------------------------------------------
# 6. no "± 0" for a single value
# --------------------------------------------------------------------------------------------


def _seed_row(side: str, k0: float, tl: float, crossings: list) -> dict:
    return {
        "side": side, "label": side, "kappa_init": k0, "kappa_end": k0 / 10, "train_loss": tl,
        "val_loss": tl + 0.1, "gap": 0.1, "crossings": crossings,
    }  # fmt: skip


def test_seed_table_shows_no_spread_for_a_single_value():
    rows = [
        _seed_row("model", 1.6e7, 0.11, [(164, 1.0)]),
        _seed_row("model", 1.5e7, 0.12, []),
        _seed_row("model", 1.7e7, 0.10, [(40, -1.0)]),
    ]
    (agg,) = aggregate_seeds(rows)
    assert agg["seeds_with_crossing"] == 1 and agg["crossing_mean"] == 164.0
    assert math.isnan(agg["crossing_std"])  # undefined for one value (ddof=1)
    assert agg["train_loss_std"] == pytest.approx(np.std([0.11, 0.12, 0.10], ddof=1))
    line = format_seed_table([agg]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == "164 (1/3 seeds)"
    assert cells[5] == "0.110 ± 0.010"
    # one seed: every cell is the value alone
    (one,) = aggregate_seeds([_seed_row("model", 1.6e7, 0.11, [(164, 1.0)])])
    assert all(math.isnan(one[f"{k}_std"]) for k in ("kappa_init", "train_loss", "crossing"))
    cells = [c.strip() for c in format_seed_table([one]).splitlines()[-1].strip("|").split("|")]
    assert cells[2:] == ["1.6e+07", "1.6e+06", "164 (1/1 seeds)", "0.11", "0.21", "+0.1000"]
    assert not re.search(r"± 0\b", format_seed_table([one]))


def test_identical_seeds_print_the_value_and_no_round_off_spread():
    """Three identical float64 values: the float64 mean 0.10000000000000002 with a round-off
    std of 1.7e-17 was printed to 18 decimals; now the value itself, ``± 0``."""
    rows = [
        {
            "side": "model",
            "label": "SwiGLU",
            "kappa_init": 1e3,
            "kappa_end": 1e3,
            "train_loss": 0.1,
            "val_loss": 0.1,
            "gap": 0.1,
            "crossings": [],
        }
        for _ in range(3)
    ]
    agg = aggregate_seeds(rows)
    assert agg[0]["train_loss_mean"] == 0.1 and agg[0]["train_loss_std"] == 0.0
    table = format_seed_table(agg)
    assert "| 0.1 ± 0 | 0.1 ± 0 | +0.1000 ± 0 |" in table


# --------------------------------------------------------------------------------------------
# Re-review, session 29: the restart purge
# --------------------------------------------------------------------------------------------


def _purge_warnings(caught) -> list[str]:
    return [str(x.message) for x in caught if "dropped as orphans" in str(x.message)]


class _Logged:
    """A tiny LightningModule (made lazily: Lightning imports only where a test trains)."""

    @staticmethod
    def make(spike_at: int | None = None):
        import lightning.pytorch as pl
        from torch import nn

        class _M(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.lin = nn.Linear(4, 1)
                self.spike_at = spike_at

            def training_step(self, batch, i):
                x, y = batch
                loss = ((self.lin(x) - y) ** 2).mean()
                self.log("train_loss", loss)
                if self.global_step == self.spike_at:
                    self.log("spike", 1.0)  # (the crashed run's only)
                return loss

            def validation_step(self, batch, i):
                x, y = batch
                loss = ((self.lin(x) - y) ** 2).mean()
                self.log("val_loss", loss)
                self.log("val_batch", loss, on_step=True, on_epoch=False)  # (at its batch index)

            def test_step(self, batch, i):
                x, y = batch
                self.log("test_loss", ((self.lin(x) - y) ** 2).mean())

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

        return _M()


def _loaders():
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(1, keepdim=True)
    return (
        DataLoader(TensorDataset(x, y), batch_size=8),
        DataLoader(TensorDataset(x, y), batch_size=16),
    )


def _trainer(root: Path, max_steps: int, callbacks=(), prefix: str = ""):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    return pl.Trainer(
        max_steps=max_steps,
        logger=TensorBoardLogger(str(root), name="r", version="v", prefix=prefix),
        callbacks=list(callbacks),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )


class _Values:
    """Lightning's own values of a key after each validation / test (not read from the logs)."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        outer = self
        self.seen: list[float] = []

        class _CB(pl.Callback):
            def on_validation_end(self, trainer, pl_module):
                outer.seen.append(float(trainer.callback_metrics["val_loss"]))

        self.callback = _CB()


def test_validate_and_test_calls_are_no_restart_and_not_purged(tmp_path: Path):
    """``validate()`` before ``fit``, ``test()`` after it, then the fit continued from its
    checkpoint, one logger folder (four event files): every validation's ``val_loss`` and the
    test's value are reported. Before the fix the validate call's step-0 value was dropped as an
    orphan of the fit starting at 0, and the continued fit's ``val_batch`` (logged at its
    validation batch index, 0..3) made it 'restart' at step 0 and purge the first fit."""
    train, val = _loaders()
    torch.manual_seed(0)
    model = _Logged.make()
    values = _Values()
    t1 = _trainer(tmp_path, 16, [values.callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1.validate(model, val, verbose=False)
        t1.fit(model, train, val)
        t1.test(model, val, verbose=False)
        test_value = float(t1.callback_metrics["test_loss"])
        t1.save_checkpoint(tmp_path / "c.ckpt")
        t2 = _trainer(tmp_path, 24, [values.callback])
        t2.fit(model, train, val, ckpt_path=str(tmp_path / "c.ckpt"))
    folder = tmp_path / "r" / "v"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 4
    assert len(values.seen) >= 4  # validate, two in the first fit, the continued fit's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sub = load_run(tmp_path).subruns["r/v"]
    assert _purge_warnings(caught) == []
    got = sub.scalars["val_loss"]
    assert got.steps[0] == 0
    np.testing.assert_array_equal(got.values, _f32(np.array(values.seen)))
    assert sub.scalars["test_loss"].values.tolist() == [float(np.float32(test_value))]
    steps = sub.scalars["train_loss"].steps.tolist()
    assert steps[:16] == list(range(16)) and steps[-1] >= 23  # both fits, nothing dropped


@pytest.mark.parametrize("prefix", ["", "p"])
def test_crashed_lightning_fit_resumed_drops_its_orphans(tmp_path: Path, prefix: str):
    """A fit crashes at step 12 after a checkpoint at step 8 and logged ``spike`` at 10; the run
    resumed from step 8 (same folder) logs its validation's ``val_batch`` at batch indices 0..3:
    the restart is its first training step (8; 7 under Lightning 2.4, which logs the batch
    that made the checkpoint again), not 0. The crashed run's ``spike`` and its ``train_loss``
    from there on are dropped, with one warning naming its file and that step. Also under a
    ``TensorBoardLogger(prefix="p")`` (tags ``p-epoch``, ``p-train_loss``, ...), whose file was
    read as a plain writer's: the orphans were kept and the clocks blamed (third re-review)."""
    tag = (lambda name: f"{prefix}-{name}") if prefix else (lambda name: name)
    import lightning.pytorch as pl

    class _Crash(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 8:
                trainer.save_checkpoint(tmp_path / "c.ckpt")
            if trainer.global_step == 12:
                raise RuntimeError("crash")

    train, val = _loaders()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="crash"):
            _trainer(tmp_path, 30, [_Crash()], prefix).fit(_Logged.make(spike_at=10), train, val)
        time.sleep(0.05)
        torch.manual_seed(1)  # (other weights: the resumed run's values are told apart)
        resumed = _Logged.make()
        _trainer(tmp_path, 24, prefix=prefix).fit(
            resumed, train, val, ckpt_path=str(tmp_path / "c.ckpt")
        )
    files = sorted((tmp_path / "r" / "v").glob("events.out.tfevents.*"))
    assert len(files) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    per_file = {}
    for f in files:  # each file as written, read on its own (the truth to compare with)
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        tags = acc.Tags()["scalars"]
        per_file[f.name] = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags}
    crashed, resumed_file = (per_file[f.name] for f in files)
    restart = min(resumed_file[tag("train_loss")])
    assert 10 in crashed[tag("spike")] and max(crashed[tag("train_loss")]) >= 10
    assert min(resumed_file[tag("val_batch")]) == 0 and 7 <= restart <= 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sub = load_run(tmp_path).subruns["r/v"]
    # (the report drops a logger prefix every tag has: the tags as logged)
    assert "spike" not in sub.scalars and tag("spike") not in sub.scalars
    loss = sub.scalars["train_loss"]
    expected = {s: v for s, v in crashed[tag("train_loss")].items() if s < restart}
    expected.update(resumed_file[tag("train_loss")])
    assert loss.steps.tolist() == sorted(expected)
    np.testing.assert_array_equal(loss.values, [expected[s] for s in sorted(expected)])
    (said,) = _purge_warnings(caught)
    assert files[0].name in said and f"step >= {restart})" in said


def _start_marker(writer: SummaryWriter, step: int) -> None:
    """TensorBoard's restart record: a ``SessionLog.START`` event at ``step``."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer._get_file_writer().add_event(
        Event(step=step, session_log=SessionLog(status=SessionLog.START))
    )


@pytest.mark.parametrize("marker", [True, False])
def test_restart_marker_purges_from_its_step(tmp_path: Path, marker: bool):
    """Crashed run: train losses at 9, 19, 29 (``log_every_n_steps=10``) and a crossing it
    confirmed at 27; resumed from the step-25 checkpoint, first logging at 29. With the resumed
    run's ``SessionLog.START`` at 25 (as TensorBoard reads it) the crossing at 27 is an orphan
    and dropped. Without it the restart is taken at the first logged step, 29, and the crossing
    is kept (the documented limit)."""
    folder = tmp_path / "pair"
    w = SummaryWriter(str(folder))
    for s in (9, 19, 29):
        w.add_scalar("model/train_loss", 1.0 - s / 100, s)
    w.add_scalar("crossing/event", 1.0, 27)
    w.close()
    time.sleep(0.05)
    w = SummaryWriter(str(folder))
    if marker:
        _start_marker(w, 25)
    for s in range(29, 100, 10):
        w.add_scalar("model/train_loss", 2.0 - s / 100, s)
    w.close()
    crashed = sorted(folder.glob("events.out.tfevents.*"))[0].name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sub = load_run(tmp_path).subruns["pair"]
    loss = sub.scalars["model/train_loss"]
    assert loss.steps.tolist() == [9, 19, *range(29, 100, 10)]
    np.testing.assert_allclose(
        loss.values, _f32(np.array([0.91, 0.81] + [2.0 - s / 100 for s in range(29, 100, 10)]))
    )
    (said,) = _purge_warnings(caught)
    assert crashed in said
    if marker:
        assert "crossing/event" not in sub.scalars
        assert "2 of 4 events at step >= 25" in said
    else:
        assert sub.scalars["crossing/event"].steps.tolist() == [27]
        assert "1 of 4 events at step >= 29" in said


def test_two_restarts_warn_once_naming_both_files(tmp_path: Path):
    """Run A logs 0..49, crashes; B resumes from 30 (30..79), crashes; C resumes from 60. Kept:
    A below 30, B from 30 below 60, C from 60; one warning for the folder, naming A (at 30) and
    B (at 60)."""
    folder = tmp_path / "run"
    for k, (lo, hi) in enumerate([(0, 50), (30, 80), (60, 100)]):
        w = SummaryWriter(str(folder), filename_suffix=f".{k}")
        for s in range(lo, hi):
            w.add_scalar("train_loss", float(k), s)
        w.close()
        time.sleep(0.05)
    names = sorted(f.name for f in folder.glob("events.out.tfevents.*"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = load_run(tmp_path).subruns["run"].scalars["train_loss"]
    assert loss.steps.tolist() == list(range(100))
    assert loss.values.tolist() == [0.0] * 30 + [1.0] * 30 + [2.0] * 40
    (said,) = _purge_warnings(caught)
    a, b = (n for n in names if n.endswith((".0", ".1")))
    assert f"{a}: 20 of 50 events at step >= 30" in said
    assert f"{b}: 20 of 50 events at step >= 60" in said


def test_resume_from_a_host_with_a_slower_clock_is_not_purged_whole(tmp_path: Path):
    """Crash at 150, resume from 100 on a host whose clock is an hour behind: the resumed file
    sorts first, and the crashed run's start at 0 would drop it whole. Nothing is dropped, with
    a warning naming it; where both log a step the file whose events start later wins."""
    folder = tmp_path / "run"
    t0 = 1.8e9
    w = SummaryWriter(str(folder), filename_suffix=".a")
    for s in range(151):
        w.add_scalar("train_loss", 1.0, s, walltime=t0 + s)
    w.close()
    w = SummaryWriter(str(folder), filename_suffix=".b")
    for s in range(100, 200):
        w.add_scalar("train_loss", 2.0, s, walltime=t0 - 3600 + s)
    w.close()
    resumed = next(f.name for f in folder.glob("events.out.tfevents.*") if f.name.endswith(".b"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = load_run(tmp_path).subruns["run"].scalars["train_loss"]
    assert loss.steps.tolist() == list(range(200))
    assert loss.values.tolist() == [1.0] * 151 + [2.0] * 49
    said = [str(x.message) for x in caught if "would drop that file whole" in str(x.message)]
    assert len(said) == 1 and f"{resumed} (first step 100, restart at 0)" in said[0]
    assert _purge_warnings(caught) == []


def test_pair_json_whose_prefixes_match_nothing_falls_back_to_the_tags(tmp_path: Path):
    """pair.json names the prefixes glu/mlp; the logs hold model/ and baseline/. It gave one
    silent "(single) nan" row; now a warning, and the two sides found in the tags (with
    pair.json's labels)."""
    folder = tmp_path / "pair"
    a = 1.0 / (np.arange(60) + 1)
    _write_pair(folder, a, 1.2 * a)
    meta = {
        "labels": {"model": "GLU", "baseline": "MLP"},
        "model_prefix": "glu",
        "baseline_prefix": "mlp",
    }
    (folder / "pair.json").write_text(json.dumps(meta))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = summarize(load_run(tmp_path))
    said = [str(x.message) for x in caught if "pair.json names the prefixes" in str(x.message)]
    assert len(said) == 1 and "'glu'" in said[0] and "'mlp'" in said[0]
    assert [(r["side"], r["label"]) for r in rows] == [("model", "GLU"), ("baseline", "MLP")]
    assert rows[0]["train_loss"] == pytest.approx(float(_f32(a[-1:])[0]), rel=0, abs=0)
    assert rows[1]["train_loss"] == pytest.approx(float(_f32(1.2 * a[-1:])[0]), rel=0, abs=0)


def test_a_prefixed_loggers_run_is_summarized_like_an_unprefixed_one(tmp_path: Path):
    """``TensorBoardLogger(prefix="p")`` writes ``p-epoch``, ``p-train_loss``, ...: the summary
    looked the tags up by their logged names and gave ``nan`` for every cell, silently. The
    prefix is dropped where every tag has it: the same summary as the unprefixed run's."""
    train, val = _loaders()
    rows = {}
    for prefix in ("", "p"):
        root = tmp_path / (prefix or "none")
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trainer(root, 12, prefix=prefix).fit(_Logged.make(), train, val)
            (row,) = summarize(load_run(root))
        rows[prefix] = row
    assert math.isfinite(rows["p"]["train_loss"]) and math.isfinite(rows["p"]["val_loss"])
    for key in ("steps", "train_loss", "val_loss", "gap", "train_step"):
        assert rows["p"][key] == rows[""][key], key
