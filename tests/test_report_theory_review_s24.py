"""Findings of the session-24 review of the report, the CLI and the theory experiment (each
test fails on the code before it)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from glu_probe.cli import main
from glu_probe.report import figure_path, load_run, summarize
from glu_probe.theory import crossing_experiment, gaussian_inputs, make_target


def _events(folder, value: float) -> None:
    writer = SummaryWriter(str(folder))
    for step in range(3):
        writer.add_scalar("train_loss", value, step)
    writer.close()


def test_a_run_folder_with_events_and_a_version_folder_keeps_both(tmp_path):
    """Both were named after the parent ("a"), and one run's rows replaced the other's."""
    _events(tmp_path / "a", 1.0)
    _events(tmp_path / "a" / "version_0", 9.0)
    run = load_run(tmp_path)
    assert sorted(run.subruns) == ["a", "a/version_0"]
    finals = {name: sub.scalars["train_loss"].values[-1] for name, sub in run.subruns.items()}
    assert finals == {"a": 1.0, "a/version_0": 9.0}
    assert len(summarize(run)) == 2


def test_figure_path_adds_png_and_refuses_unknown_formats(tmp_path):
    assert figure_path(tmp_path / "report") == tmp_path / "report.png"
    assert figure_path(tmp_path / "r.pdf") == tmp_path / "r.pdf"
    with pytest.raises(ValueError, match=r"cannot write '\.txt'"):
        figure_path(tmp_path / "r.txt")


def test_report_out_is_checked_first_and_printed_as_written(tmp_path, capsys):
    run = tmp_path / "run"
    _events(run, 1.0)
    with pytest.raises(SystemExit) as stop:  # a usage error, before the table
        main(["report", str(run), "--out", str(tmp_path / "report.txt")])
    assert stop.value.code == 2
    assert "matplotlib cannot write" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(tmp_path / "out" / "report")]) == 0
    written = tmp_path / "out" / "report.png"
    assert written.is_file() and str(written) in capsys.readouterr().out.replace("\n", "")


def test_one_sample_has_no_standardised_target():
    """n = 1 gave a NaN target, NaN losses and no crossing without a word."""
    with pytest.raises(ValueError, match="n >= 2"):
        make_target(gaussian_inputs(1, 3))
    with pytest.raises(ValueError, match="n >= 2"):
        crossing_experiment(3, 50, 1)


def test_a_zero_kernel_at_init_is_a_clear_error(monkeypatch):
    """Both NTKs 0 (every unit dead): eta = eta_scale / 0 was a bare ZeroDivisionError."""
    import glu_probe.theory as theory

    monkeypatch.setattr(theory, "empirical_ntk", lambda mod, X: torch.zeros(len(X), len(X)))
    with pytest.raises(ValueError, match="NTKs are 0 at init"):
        crossing_experiment(3, 4, 5, steps=5)


def test_a_version_folder_root_with_a_version_child_keeps_both(tmp_path):
    root = tmp_path / "version_0"
    _events(root, 3.0)
    _events(root / "version_0", 4.0)
    run = load_run(root)
    finals = {name: sub.scalars["train_loss"].values[-1] for name, sub in run.subruns.items()}
    assert finals == {".": 3.0, "version_0": 4.0}
