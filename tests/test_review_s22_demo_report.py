"""Session 22: a review of the main job (demo, examples' helpers, report, CLI)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from glu_probe.cli import main
from glu_probe.demo import (
    check_text_data,
    default_settings,
    fit_seeds,
    free_run_name,
    refuse_used_folder,
    run_demo,
)
from glu_probe.report import load_run, summarize
from glu_probe.theory import theory_table


def _exit_code(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


# ---- report ------------------------------------------------------------------------------
def test_report_on_a_version_folder_itself(tmp_path: Path) -> None:
    """The folder Lightning prints (``.../version_0``) raised "is not in the subpath"."""
    w = SummaryWriter(str(tmp_path / "exp" / "version_0"))
    for s, v in enumerate([1.0, 0.5]):
        w.add_scalar("train_loss", v, s)
    w.close()
    run = load_run(tmp_path / "exp" / "version_0")
    (row,) = summarize(run)
    assert row["train_loss"] == 0.5


def test_an_unpaired_run_with_a_model_namespaced_tag_keeps_its_values(tmp_path: Path) -> None:
    """A user's ``model/grad_norm`` made the run a one-sided pair whose values were all '-'."""
    w = SummaryWriter(str(tmp_path / "plainrun"))
    for s in range(10):
        w.add_scalar("train_loss", 1.0 / (s + 1), s)
        w.add_scalar("model/grad_norm", 0.5, s)
    w.add_scalar("val_loss", 0.3, 9)
    w.add_scalar("ntk/condition_number", 100.0, 0)
    w.add_scalar("ntk/condition_number", 90.0, 9)
    w.close()
    (row,) = summarize(load_run(tmp_path))
    assert row["side"] in ("", None) or row["side"] not in ("model", "baseline")
    assert row["train_loss"] == pytest.approx(0.1)
    assert row["val_loss"] == pytest.approx(0.3)
    assert (row["kappa_init"], row["kappa_end"]) == (100.0, 90.0)


# ---- runs never write into a used folder -------------------------------------------------
def test_run_demo_refuses_a_used_run_folder_before_training(tmp_path: Path) -> None:
    """A second run under the same name had reported the first run's last steps."""
    (tmp_path / "again" / "two_layer").mkdir(parents=True)
    (tmp_path / "again" / "two_layer" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        run_demo(tmp_path, "again", quick=True, pairs=("two_layer",), progress=False)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["two_layer"]


def test_fit_seeds_refuses_any_used_seed_folder_before_training(tmp_path: Path) -> None:
    (tmp_path / "ex" / "seed_1").mkdir(parents=True)
    (tmp_path / "ex" / "seed_1" / "events.out.tfevents.1.x").write_text("")

    def build(seed: int) -> object:
        raise AssertionError("nothing may be built or trained")

    with pytest.raises(FileExistsError, match="seed_1"):
        fit_seeds(build, [], [], default_settings(True)["two_layer"], seeds=[0, 1],
                  save_dir=tmp_path, name="ex", progress=False)  # fmt: skip
    assert not (tmp_path / "ex" / "seed_0").exists()


def test_free_run_name_and_refuse_used_folder(tmp_path: Path) -> None:
    assert free_run_name(tmp_path, "vit-quick-digits") == "vit-quick-digits"
    (tmp_path / "vit-quick-digits").mkdir()
    assert free_run_name(tmp_path, "vit-quick-digits") == "vit-quick-digits"  # empty: free
    (tmp_path / "vit-quick-digits" / "results.json").write_text("{}")
    (tmp_path / "vit-quick-digits-2").mkdir()
    (tmp_path / "vit-quick-digits-2" / "x").write_text("")
    assert free_run_name(tmp_path, "vit-quick-digits") == "vit-quick-digits-3"
    refuse_used_folder(tmp_path / "missing")
    with pytest.raises(FileExistsError):
        refuse_used_folder(tmp_path / "vit-quick-digits")


# ---- the GPT-2 corpus is checked before any pair trains ----------------------------------
@pytest.fixture
def one_byte_corpus(tmp_path: Path) -> Path:
    d = tmp_path / "txt"
    d.mkdir()
    (d / "b.txt").write_text("b" * 20_000)  # every window starts with the same byte
    return d


def test_a_corpus_without_a_probe_batch_fails_before_training(
    tmp_path: Path, one_byte_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match="distinct first bytes"):
        check_text_data(one_byte_corpus, default_settings(False)["gpt2"])
    with pytest.raises(ValueError, match="distinct first bytes"):
        run_demo(tmp_path / "out", "r", data=one_byte_corpus, progress=False)
    assert not (tmp_path / "out" / "r" / "two_layer").exists()  # nothing trained first
    code, err = _exit_code(
        ["demo", "--data", str(one_byte_corpus), "--out", str(tmp_path / "o2")], capsys
    )
    assert code == 2 and "distinct first bytes" in err


# ---- argument bounds -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--seed", "4294967296"], "--seed must lie in [0, 2**32)"),
        (["demo", "--max-minutes", "inf"], "expected a positive finite number, got inf"),
    ],
)
def test_cli_bounds_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _exit_code(argv, capsys)
    assert code == 2 and message in err


def test_run_demo_checks_seed_threads_and_max_minutes(tmp_path: Path) -> None:
    for kw, msg in (
        ({"seed": 2**32}, "seed must be an integer"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"max_minutes": math.inf}, "positive finite number"),
    ):
        with pytest.raises(ValueError, match=msg):
            run_demo(tmp_path, "x", quick=True, pairs=("two_layer",), progress=False, **kw)


def test_theory_table_of_a_zero_kernel_is_not_a_division_by_zero() -> None:
    """d = m = n = 1: a dead ReLU unit gives K = 0 (ZeroDivisionError before)."""
    rows = theory_table(1, 1, 1)
    relu = next(r for r in rows if r["kind"] == "relu")
    assert relu["emp_lambda_max"] == 0.0 and relu["err_lambda_max"] == math.inf
    assert all(isinstance(r["cf_kappa"], float) for r in rows)


def test_vit_example_refuses_a_non_positive_train_limit(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "vit_glu_vs_mlp.py"
    spec = importlib.util.spec_from_file_location("vit_example_s22", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exc:
        module.parse_args(["--train-limit", "0"])
    assert exc.value.code == 2 and "--train-limit must be >= 1" in capsys.readouterr().err


def test_runs_started_together_claim_a_folder_once(tmp_path: Path) -> None:
    """Two runs started together on one folder both found it empty and wrote side by side
    (re-review, session 22): the claim is atomic, so exactly one of them gets it."""
    import threading

    from glu_probe.demo import RUN_CLAIM, claim_run_folder

    target, outcomes = tmp_path / "race", []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        try:
            claim_run_folder(target)
            outcomes.append("ok")
        except FileExistsError:
            outcomes.append("refused")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["refused"] * 7
    assert (target / RUN_CLAIM).exists()
    with pytest.raises(FileExistsError, match="not empty"):
        run_demo(tmp_path, "race", quick=True, pairs=("two_layer",), progress=False)


def test_fit_seeds_refuses_repeated_seeds_before_training(tmp_path: Path) -> None:
    def build(seed: int) -> object:
        raise AssertionError("nothing may be built or trained")

    with pytest.raises(ValueError, match="seeds must be distinct"):
        fit_seeds(build, [], [], default_settings(True)["two_layer"], seeds=[0, 0],
                  save_dir=tmp_path, name="ex", progress=False)  # fmt: skip
