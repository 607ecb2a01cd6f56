"""The report reads back exactly what was written to TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from glu_probe.crossing import find_crossings
from glu_probe.report import crossing_steps, load_run, plot_report, render_table, summarize

STEPS = np.arange(0, 60)
# model starts worse and overtakes the baseline around step 20
MODEL_LOSS = 2.0 * np.exp(-STEPS / 10.0) + 0.05
BASE_LOSS = 1.2 * np.exp(-STEPS / 25.0) + 0.2


def _write_paired(root: Path) -> dict[str, list[float]]:
    w = SummaryWriter(str(root / "pairA" / "version_0"))
    for s in STEPS:
        w.add_scalar("model/train_loss", MODEL_LOSS[s], int(s))
        w.add_scalar("baseline/train_loss", BASE_LOSS[s], int(s))
    kappas = {"model": [50.0, 40.0, 30.0], "baseline": [500.0, 450.0, 420.0]}
    for i, s in enumerate((0, 20, 59)):
        w.add_scalar("ntk/model/condition_number", kappas["model"][i], s)
        w.add_scalar("ntk/baseline/condition_number", kappas["baseline"][i], s)
        rng = np.random.default_rng(i)
        w.add_histogram("ntk/model/log10_spectrum", rng.normal(0, 1, 64), s)
        w.add_histogram("ntk/baseline/log10_spectrum", rng.normal(1, 2, 64), s)
    for s, (mv, bv) in ((29, (0.4, 0.5)), (59, (0.3, 0.45))):
        w.add_scalar("model/val_loss", mv, s)
        w.add_scalar("baseline/val_loss", bv, s)
        w.add_scalar("gap/model/loss", mv - MODEL_LOSS[s], s)
        w.add_scalar("gap/baseline/loss", bv - BASE_LOSS[s], s)
    w.add_scalar("crossing/delta", 0.1, 10)
    w.add_scalar("crossing/event", 1.0, 27)
    w.close()
    (root / "pairA" / "version_0" / "pair.json").write_text(
        json.dumps({"labels": {"model": "SwiGLU", "baseline": "GELU MLP"}})
    )
    return kappas


def _write_single(root: Path) -> None:
    w = SummaryWriter(str(root / "nested" / "plain"))
    for s, v in enumerate([1.0, 0.8, 0.7]):
        w.add_scalar("train_loss", v, s)
    w.add_scalar("val_loss", 0.9, 2)
    w.add_scalar("ntk/condition_number", 12.5, 0)
    w.add_scalar("ntk/condition_number", 7.5, 2)
    w.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    _write_paired(tmp_path)
    _write_single(tmp_path)
    return tmp_path


def test_load_run_reads_every_scalar_and_histogram(run_dir: Path):
    run = load_run(run_dir)
    assert set(run.subruns) == {"pairA", "nested/plain"}
    sub = run.subruns["pairA"]
    np.testing.assert_array_equal(sub.scalars["model/train_loss"].steps, STEPS)
    np.testing.assert_allclose(sub.scalars["model/train_loss"].values, MODEL_LOSS, rtol=1e-6)
    np.testing.assert_allclose(sub.scalars["baseline/train_loss"].values, BASE_LOSS, rtol=1e-6)
    hist = sub.histograms["ntk/model/log10_spectrum"]
    assert [h.step for h in hist] == [0, 20, 59]
    values = np.random.default_rng(0).normal(0, 1, 64)
    assert hist[0].num == 64 and hist[0].counts.sum() == 64
    assert hist[0].min == pytest.approx(values.min()) and hist[0].max == pytest.approx(values.max())
    assert sub.labels == {"model": "SwiGLU", "baseline": "GELU MLP"}


def test_summarize_numbers_equal_written_values(run_dir: Path):
    rows = {(r["run"], r["side"]): r for r in summarize(load_run(run_dir))}
    m, b = rows[("pairA", "model")], rows[("pairA", "baseline")]
    assert m["label"] == "SwiGLU" and b["label"] == "GELU MLP"
    assert m["kappa_init"] == 50.0 and m["kappa_end"] == 30.0
    assert b["kappa_init"] == 500.0 and b["kappa_end"] == 420.0
    assert m["train_loss"] == pytest.approx(MODEL_LOSS[-1], rel=1e-6)
    assert b["train_loss"] == pytest.approx(BASE_LOSS[-1], rel=1e-6)
    assert m["val_loss"] == pytest.approx(0.3) and b["val_loss"] == pytest.approx(0.45)
    assert m["gap"] == pytest.approx(0.3 - MODEL_LOSS[-1], rel=1e-5)
    assert m["steps"] == 59
    # the detected marker is read back; the estimated step is find_crossings on the losses
    assert m["crossings_detected"] == [(27, 1.0)]
    expected = find_crossings(STEPS, MODEL_LOSS, STEPS, BASE_LOSS)
    assert m["crossings"] == [(c.step, float(c.event)) for c in expected]
    assert len(expected) == 1 and expected[0].direction == "model overtakes baseline"
    true_cross = STEPS[np.argmax(MODEL_LOSS < BASE_LOSS)]
    assert true_cross <= m["crossings"][0][0] <= true_cross + 12  # smoothing lag ≤ β/(1−β)+Δ

    p = rows[("nested/plain", "")]
    assert p["kappa_init"] == 12.5 and p["kappa_end"] == 7.5
    assert p["train_loss"] == pytest.approx(0.7) and p["val_loss"] == pytest.approx(0.9)
    assert p["gap"] == pytest.approx(0.2)  # val − train when no gap tag was logged
    assert p["crossings"] == [] and p["crossings_detected"] == []


def test_render_table_shows_the_values(run_dir: Path):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_table(summarize(load_run(run_dir))))
    text = console.export_text()
    for needle in ("SwiGLU", "GELU MLP", "50", "420", "27", "12.5", "7.5", "nested/plain"):
        assert needle in text


def test_plot_report_writes_png(run_dir: Path, tmp_path: Path):
    out = plot_report(load_run(run_dir), tmp_path / "fig" / "report.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_version_folders_are_kept_apart(tmp_path: Path):
    for v in (0, 1):
        w = SummaryWriter(str(tmp_path / "exp" / f"version_{v}"))
        w.add_scalar("train_loss", float(v), 0)
        w.close()
    run = load_run(tmp_path)
    assert set(run.subruns) == {"exp/version_0", "exp/version_1"}
    rows = summarize(run)
    assert sorted(r["train_loss"] for r in rows) == [0.0, 1.0]
    assert all(math.isnan(r["kappa_init"]) for r in rows)


def test_load_run_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        load_run(tmp_path)


def test_crossing_steps_without_losses_uses_logged_markers(tmp_path: Path):
    w = SummaryWriter(str(tmp_path))
    w.add_scalar("crossing/event", -1.0, 5)
    w.add_scalar("crossing/event", 1.0, 9)
    w.close()
    sub = next(iter(load_run(tmp_path).subruns.values()))
    assert crossing_steps(sub) == ([(5, -1.0), (9, 1.0)], [(5, -1.0), (9, 1.0)])


def test_subruns_are_listed_in_the_order_they_started(tmp_path: Path):
    """Not alphabetically: the demo writes two_layer, vit, gpt2 in that order."""
    import time

    for name in ("two_layer", "vit", "gpt2"):
        w = SummaryWriter(str(tmp_path / name))
        w.add_scalar("model/train_loss", 1.0, 0)
        w.close()
        time.sleep(1.1)  # event file names carry the creation time in whole seconds
    assert list(load_run(tmp_path).subruns) == ["two_layer", "vit", "gpt2"]


def test_seed_table_rounds_mean_and_std_alike():
    from glu_probe.report import format_seed_table

    row = dict(
        label="SwiGLU", side="model", n_seeds=3, seeds_with_crossing=2,
        kappa_init_mean=2.4e7, kappa_init_std=3.1e6, kappa_end_mean=512.3, kappa_end_std=40.2,
        crossing_mean=109.3, crossing_std=12.4, train_loss_mean=2.311, train_loss_std=0.009932,
        val_loss_mean=2.4, val_loss_std=0.0, gap_mean=0.105, gap_std=0.0123,
    )  # fmt: skip
    line = format_seed_table([row]).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:] == [
        "2.40e+07 ± 3.1e+06", "512 ± 40", "109 ± 12 (2/3 seeds)", "2.3110 ± 0.0099",
        "2.4 ± 0", "+0.105 ± 0.012",
    ]  # fmt: skip


@pytest.mark.parametrize("with_meta", [True, False])
def test_custom_paired_prefixes(tmp_path: Path, with_meta: bool):
    """PairedModule(model_prefix="glu", baseline_prefix="relu"): two rows with their values, not
    one empty "(single)" row; the order comes from pair.json, else alphabetical with a warning."""
    w = SummaryWriter(str(tmp_path / "run"))
    for step in range(30):
        w.add_scalar("relu/train_loss", 1.0 - 0.01 * step, step)
        w.add_scalar("glu/train_loss", 1.2 - 0.03 * step, step)
    w.add_scalar("ntk/glu/condition_number", 40.0, 0)
    w.add_scalar("ntk/relu/condition_number", 90.0, 0)
    w.close()
    if with_meta:
        meta = {"model_prefix": "relu", "baseline_prefix": "glu"}  # deliberately not alphabetical
        (tmp_path / "run" / "pair.json").write_text(json.dumps(meta))
        rows = summarize(load_run(tmp_path))
        model, baseline = "relu", "glu"
    else:
        with pytest.warns(UserWarning, match="'glu' is taken as the model"):
            rows = summarize(load_run(tmp_path))
        model, baseline = "glu", "relu"
    assert [(r["side"], r["label"]) for r in rows] == [("model", model), ("baseline", baseline)]
    by = {r["label"]: r for r in rows}
    assert by["glu"]["kappa_init"] == 40.0 and by["relu"]["kappa_init"] == 90.0
    assert by["glu"]["train_loss"] == pytest.approx(1.2 - 0.03 * 29)
    # glu falls below relu at t = 10 exactly (1.2 - 0.3 = 1.0 - 0.1): a crossing either way round
    assert len(rows[0]["crossings"]) == 1
    assert rows[0]["crossings"][0][1] == (1.0 if model == "glu" else -1.0)


def test_unpaired_runs_with_namespaced_tags_are_not_paired(tmp_path: Path):
    """Two task heads, or train/ and val/ namespaces, are not a model/baseline pair."""
    for name, tags in {
        "tasks": ["task_a/train_loss", "task_b/train_loss"],
        "spaces": ["train/train_loss", "val/val_loss"],
    }.items():
        w = SummaryWriter(str(tmp_path / name))
        for tag in tags:
            w.add_scalar(tag, 1.0, 0)
        w.close()
    rows = summarize(load_run(tmp_path))
    assert [r["side"] for r in rows] == ["", ""]
