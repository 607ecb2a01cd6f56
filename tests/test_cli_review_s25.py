"""Review, session 25: usage errors of ``glu-probe spectrum``/``report`` and the example scripts
that were Python tracebacks, silently ignored flags, and a model without blocks reported as a
result. Every check here stops at argument or data checking: nothing trains."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from glu_probe.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_s25_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _usage_error(call, capsys) -> str:
    """``call()`` must stop with exit status 2 (argparse's usage error); returns stderr."""
    with pytest.raises(SystemExit) as stop:
        call()
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    return err


# ------------------------------------------------------------- glu-probe spectrum --hf-config

_GPT2 = [
    "spectrum", "--hf-config", "gpt2", "--set", "n_layer=1", "--set", "n_embd=32",
    "--set", "n_head=2", "--set", "vocab_size=64", "--batch-size", "2", "--seq-len", "8",
    "--method", "dense", "--device", "cpu", "--json",
]  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        # ValueError from the attention (raised twice before: a retry with AutoModel)
        ("n_head=3", "ValueError: `embed_dim` must be divisible by num_heads"),
        # huggingface_hub's strict-dataclass validation in AutoConfig.for_model (transformers
        # 5; 4.x fails later, building the model, with a message that names no field)
        ("n_embd=abc", "--hf-config 'gpt2': "),
        ("activation_function=foo", "KeyError: 'foo'"),
        # torch.randint(0, 0, ...) raised a RuntimeError
        ("vocab_size=0", "vocab_size must be >= 1, got 0"),
    ],
)
def test_hf_config_values_the_model_rejects_are_usage_errors(override, message, capsys):
    err = _usage_error(lambda: main([*_GPT2, "--set", override]), capsys)
    assert "glu-probe spectrum: error:" in err and message in err
    assert "Traceback" not in err
    if override != "vocab_size=0":
        assert "--hf-config 'gpt2': " in err


def test_hf_config_without_a_causal_lm_head_builds_the_bare_model(capsys):
    """The bare model (AutoModel) is kept for a config without a causal-LM class."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    assert CONFIG_MAPPING["distilbert"] not in MODEL_FOR_CAUSAL_LM_MAPPING
    argv = [
        "spectrum", "--hf-config", "distilbert", "--set", "n_layers=1", "--set", "dim=32",
        "--set", "n_heads=2", "--set", "hidden_dim=64", "--set", "vocab_size=64",
        "--batch-size", "2", "--seq-len", "4", "--method", "dense", "--device", "cpu", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["probe_shape"] == [2, 4] and info["n_rows"] == 8


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], "is not a JSON object (got list)"),
        ({"model_type": 3}, "'model_type' must be a string, got 3"),
        ({"model_type": ["gpt2"]}, "'model_type' must be a string, got ['gpt2']"),
    ],
)
def test_hf_config_json_of_the_wrong_shape(content, message, tmp_path: Path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(content))
    err = _usage_error(lambda: main(["spectrum", "--hf-config", str(cfg)]), capsys)
    assert message in err


# ------------------------------------------------------------------ glu-probe spectrum --timm

_VIT = [
    "spectrum", "--timm", "vit_tiny_patch16_224", "--set", "img_size=32", "--set", "depth=1",
    "--set", "embed_dim=32", "--set", "num_heads=2", "--set", "num_classes=3",
    "--batch-size", "2", "--device", "cpu", "--json",
]  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_heads=5", "AssertionError: dim should be divisible by num_heads"),
        ("patch_size=0", "ZeroDivisionError"),
        ("act_layer=foo", "KeyError: 'foo'"),
        ("no_such_kwarg=1", "TypeError: "),  # (the one case caught before)
    ],
)
def test_timm_overrides_the_model_rejects_are_usage_errors(override, message, capsys):
    err = _usage_error(lambda: main([*_VIT, "--set", override]), capsys)
    assert "timm model 'vit_tiny_patch16_224' rejected an override: " in err
    assert message in err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*_GPT2, "--set", "n_layer=-1"], "n_layer=-1: a layer count must be >= 1"),
        ([*_GPT2, "--set", "n_layer=0"], "n_layer=0: a layer count must be >= 1"),
        ([*_GPT2, "--set", "num_hidden_layers=0"], "num_hidden_layers=0: a layer count"),
        ([*_VIT, "--set", "depth=0"], "depth=0: a layer count must be >= 1"),
    ],
)
def test_a_layer_count_below_one_is_refused(argv, message, capsys):
    """n_layer=-1 built a model without blocks and reported its κ with exit status 0."""
    err = _usage_error(lambda: main(argv), capsys)
    assert message in err


# ---------------------------------------------------------------------------- glu-probe report


def _sub_run(model_loss):
    from glu_probe.report import Series, SubRun

    sub = SubRun("pair", Path("."))
    steps = np.arange(len(model_loss))
    sub.scalars["model/train_loss"] = Series(steps, np.asarray(model_loss, dtype=float))
    sub.scalars["baseline/train_loss"] = Series(steps, np.linspace(2.0, 1.0, len(model_loss)))
    return sub


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_report_with_a_side_whose_train_loss_is_never_finite(bad, tmp_path: Path, capsys):
    """find_crossings got an empty series ("series a is empty") from the NaN filter."""
    from torch.utils.tensorboard import SummaryWriter

    from glu_probe.report import RunData, crossing_steps, summarize

    assert crossing_steps(_sub_run([bad] * 10)) == ([], [])
    assert crossing_steps(_sub_run([2.0] + [bad] * 9)) == ([], [])  # one finite point
    rows = summarize(RunData(Path("."), {"pair": _sub_run([bad] * 10)}))
    assert [r["crossings"] for r in rows] == [[], []]
    assert rows[1]["train_loss"] == pytest.approx(1.0)
    # the command itself, on event files
    w = SummaryWriter(str(tmp_path / "run" / "pair"))
    for step in range(12):
        w.add_scalar("model/train_loss", bad, step)
        w.add_scalar("baseline/train_loss", 2.0 - 0.1 * step, step)
    w.close()
    png = tmp_path / "r.png"
    assert main(["report", str(tmp_path / "run"), "--out", str(png), "--json"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert '"crossings": []' in out


# ------------------------------------------------------------------ examples/deep_ntk_study.py


@pytest.fixture(scope="module")
def study():
    return _load("deep_ntk_study")


def _sizes(args) -> tuple:
    return (args.depths, args.widths, args.train_steps, args.probe_rows, args.batch_size,
            args.seq_len)  # fmt: skip


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], ([1, 2], [16], 3, 8, 8, 8)),
        (["--depths", "1", "2", "4", "8", "12"], ([1, 2, 4, 8, 12], [16], 3, 8, 8, 8)),
        (["--train-steps", "40", "--probe-rows", "32"], ([1, 2], [16], 40, 32, 8, 8)),
        (["--widths", "32", "64"], ([1, 2], [32, 64], 3, 8, 8, 8)),
        (["--seq-len", "16"], ([1, 2], [16], 3, 8, 8, 16)),
        (["--batch-size", "32"], ([1, 2], [16], 3, 8, 32, 8)),
    ],
)
def test_deep_study_quick_keeps_flags_given_at_their_normal_default(study, extra, expected):
    """--quick --depths 1 2 4 8 12 ran depths [1, 2]: a flag equal to its default was "not
    given"."""
    assert _sizes(study.parse_args(["--quick", "--families", "vit", *extra])) == expected


def test_deep_study_normal_sizes_and_help(study, capsys):
    args = study.parse_args(["--families", "vit"])
    assert _sizes(args) == ([1, 2, 4, 8, 12], [32, 64], 40, 32, 32, 16)
    assert args.probe_at == [0, 10, 40]
    with pytest.raises(SystemExit):
        study.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 1 2 4 8 12; with --quick: 1 2)" in out
    assert "(default: 40; with --quick: 3)" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--batch-size", "-4"], "--batch-size must be >= 1, got -4"),
        (["--probe-rows", "0"], "--probe-rows must be >= 1, got 0"),
        (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
        (["--lr", "0"], "--lr must be a positive finite number, got 0.0"),
        (["--lr=-1e-3"], "--lr must be a positive finite number, got -0.001"),
        (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
        (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
        # 4096 // 8 = 512 probe sequences: lm_probe_batch takes at most 256
        (["--probe-rows", "4096"], "asks for 512 probe sequences"),
        # 200 sequences of 16 bytes: the stdlib corpus has fewer distinct first bytes (94 here)
        (
            ["--probe-rows", "3200", "--seq-len", "16"],
            "windows with distinct first bytes, need 200",
        ),
        (["--batch-size", "100000"], "--batch-size 100000 exceeds the"),
    ],
)
def test_deep_study_refuses_sizes_that_fail_mid_run(study, extra, message, capsys):
    argv = ["--quick", "--families", "gpt2", *extra]
    err = _usage_error(lambda: study.parse_args(argv), capsys)
    assert message in err


def test_deep_study_vit_batch_and_probe_fit_the_digits(study, capsys):
    """A batch larger than the 1348 training digits never yielded one (an endless loop)."""
    err = _usage_error(
        lambda: study.parse_args(["--families", "vit", "--batch-size", "2000"]), capsys
    )
    assert "--batch-size 2000 exceeds the 1348 digits training images" in err
    err = _usage_error(
        lambda: study.parse_args(["--families", "vit", "--probe-rows", "2000"]), capsys
    )
    assert "--probe-rows 2000 exceeds the 1348 digits training images" in err


# ------------------------------------------------------------ examples/*_glu_vs_mlp.py


def _fake_cifar(root: Path) -> Path:
    """CIFAR-10's file layout with 10 random images per batch (its md5 check fails)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.randint(0, 256, (10, 3072)).astype(np.uint8),
            "labels": list(rng.randint(0, 10, 10)),
            "batch_label": name,
        }
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


def test_vit_example_cifar_problems_are_usage_errors(tmp_path: Path, capsys):
    vit = _load("vit_glu_vs_mlp")
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--quick", "--seeds", "0", "--out", str(out), "--cifar-root"]
    err = _usage_error(lambda: vit.main([*argv, str(empty)]), capsys)
    assert f"--cifar-root {str(empty)!r}: no CIFAR-10 at" in err
    fake = _fake_cifar(tmp_path / "fake")
    err = _usage_error(lambda: vit.main([*argv, str(fake)]), capsys)
    assert "md5 check of the batch files failed" in err and "--no-verify-md5" in err
    assert not out.exists() or not any(out.iterdir())  # no run folder claimed


def test_vit_example_train_limit_needs_cifar_root(capsys):
    vit = _load("vit_glu_vs_mlp")
    err = _usage_error(lambda: vit.parse_args(["--quick", "--train-limit", "5"]), capsys)
    assert "--train-limit needs --cifar-root" in err


@pytest.mark.parametrize("example", ["vit_glu_vs_mlp", "gpt2_glu_vs_mlp"])
def test_example_seeds_must_be_distinct(example, capsys):
    """--seeds 0 0 passed the checks and failed in fit_seeds, after the data was read."""
    mod = _load(example)
    err = _usage_error(lambda: mod.parse_args(["--quick", "--seeds", "0", "1", "0"]), capsys)
    assert "--seeds must be distinct, got [0, 1, 0]" in err


def test_check_example_arguments_refuses_repeated_seeds():
    import argparse

    from glu_probe.demo import add_example_arguments, check_example_arguments

    parser = argparse.ArgumentParser()
    add_example_arguments(parser, ["quick"], "run name")
    with pytest.raises(SystemExit) as stop:
        check_example_arguments(parser, parser.parse_args(["--seeds", "3", "3"]))
    assert stop.value.code == 2
    args = check_example_arguments(parser, parser.parse_args(["--seeds", "3", "4"]))
    assert args.seeds == [3, 4]


def test_gpt2_example_data_problems_are_usage_errors(tmp_path: Path, capsys):
    gpt = _load("gpt2_glu_vs_mlp")
    out = tmp_path / "out"
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcd\n")
    argv = ["--quick", "--seeds", "0", "--out", str(out)]
    err = _usage_error(lambda: gpt.main([*argv, "--data", str(tiny)]), capsys)
    assert f"--data {str(tiny)!r}: text of " in err and "is too short" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _usage_error(lambda: gpt.main([*argv, "--hf-dataset", str(empty)]), capsys)
    assert f"--hf-dataset {str(empty)!r}: " in err
    assert not out.exists() or not any(out.iterdir())  # no run folder claimed


def test_a_layer_count_below_one_in_a_config_file_is_refused(tmp_path: Path, capsys):
    """(Re-review.) Only --set values were checked: a config.json with n_layer 0 ran."""
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {"model_type": "gpt2", "n_layer": 0, "n_embd": 32, "n_head": 2, "vocab_size": 64}
        )
    )
    argv = ["spectrum", "--hf-config", str(cfg), "--batch-size", "2", "--seq-len", "8"]
    err = _usage_error(lambda: main(argv), capsys)
    assert "n_layer=0: a layer count must be >= 1" in err
