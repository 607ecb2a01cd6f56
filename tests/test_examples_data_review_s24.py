"""Findings of the session-24 review of the examples, the demo's shared options and the data
loaders (each test fails on the code before it)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from glu_probe.data import ByteWindowDataset
from glu_probe.demo import (
    PairSettings,
    _cadence,
    add_example_arguments,
    check_example_arguments,
    example_settings,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"_ex_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lr", ["-0.001", "0", "nan"])
def test_a_bad_learning_rate_is_a_usage_error(lr):
    """-0.001 crashed after the run folder was claimed; 0 was read as "not given"."""
    parser = argparse.ArgumentParser()
    add_example_arguments(parser, ["quick"], "run name")
    with pytest.raises(SystemExit) as stop:
        check_example_arguments(parser, parser.parse_args(["--lr", lr]))
    assert stop.value.code == 2


def _settings(steps: int = 40, val_every: int = 10, ntk_every: int = 10) -> PairSettings:
    return PairSettings(
        steps=steps,
        batch_size=8,
        lr=1e-3,
        optimizer="adamw",
        val_every=val_every,
        val_batches=2,
        ntk_every=ntk_every,
        probe_size=8,
        gap_subset=16,
    )


def test_steps_rescale_the_cadences_to_land_on_the_last_step():
    """--steps 12 kept every 10 (8 in the reviewer's size): the last probe and validation, and
    so the table's κ end and final losses, were those of an earlier step."""
    new = example_settings(_settings(), SimpleNamespace(steps=12, lr=None))
    assert (new.steps, new.val_every, new.ntk_every) == (12, 3, 3)
    assert 12 % new.val_every == 0 and 12 % new.ntk_every == 0
    assert example_settings(_settings(), SimpleNamespace(steps=None, lr=0.5)).lr == 0.5
    same = example_settings(_settings(), SimpleNamespace(steps=None, lr=None))
    assert same == _settings()
    for steps in (1, 7, 13, 100, 997):
        every = _cadence(steps, 10, 40)
        assert every >= 1
        assert steps % every == 0 or every == max(1, round(10 * steps / 40))


def test_deep_study_refuses_widths_its_heads_do_not_divide(capsys):
    """56 passed the multiple-of-8 check and crashed in timm (3 heads of 18.7 channels)."""
    study = _example("deep_ntk_study")
    with pytest.raises(SystemExit) as stop:
        study.parse_args(["--widths", "56", "--depths", "1", "--train-steps", "0"])
    assert stop.value.code == 2 and "divisible by its head count" in capsys.readouterr().err
    for ok in (8, 16, 32, 48, 64):
        assert ok % study._heads(ok) == 0
        study.parse_args(["--widths", str(ok), "--depths", "1", "--train-steps", "0"])


@pytest.mark.parametrize("data", [b"", bytearray()])
def test_empty_text_gets_the_librarys_own_error(data):
    with pytest.raises(ValueError, match="text of 0 bytes is too short"):
        ByteWindowDataset(data, 4)


def test_the_vit_example_offers_the_md5_switch_its_error_names():
    vit = _example("vit_glu_vs_mlp")
    args = vit.parse_args(["--quick", "--no-verify-md5"])
    assert args.no_verify_md5
    with pytest.raises(SystemExit):
        vit.parse_args(["--quick", "--depth", "0"])


def test_deep_study_arguments_are_checked_before_any_work(capsys):
    study = _example("deep_ntk_study")
    for bad in (["--glu", "foo"], ["--dense", "swiglu"], ["--seeds", "-1"]):
        with pytest.raises(SystemExit) as stop:
            study.parse_args(["--quick", *bad])
        assert stop.value.code == 2
    args = study.parse_args(["--quick", "--train-steps", "2", "--probe-at", "0", "0", "2"])
    assert args.probe_at == [0, 2]  # (a repeated step crashed the progress line)
    assert study.parse_args(["--quick", "--glu", "SwiGLU"]).glu == "swiglu"  # (as swap_mlp)


def test_deep_study_table_keeps_a_singular_seed():
    """A seed with κ = inf was dropped from the geometric mean: the table showed the other
    seeds' κ (50) and a ratio of 0.5 where the GLU's κ is infinite."""
    study = _example("deep_ntk_study")
    args = study.parse_args(["--quick", "--train-steps", "0", "--probe-at", "0"])
    rec = {"family": "gpt2", "width": 16, "depth": 1, "step": 0}
    records = [
        {**rec, "seed": 0, "variant": args.dense, "kappa": 100.0},
        {**rec, "seed": 1, "variant": args.dense, "kappa": 100.0},
        {**rec, "seed": 0, "variant": args.glu, "kappa": 50.0},
        {**rec, "seed": 1, "variant": args.glu, "kappa": float("inf")},
    ]
    row = study.table(records, args).splitlines()[-1]
    assert "| inf |" in row and "| 0.5 |" not in row


def test_spectrum_seed_is_a_usage_error(capsys):
    from glu_probe.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["spectrum", "--hf-config", "gpt2", "--seed", "-1"])
    assert stop.value.code == 2 and "--seed must lie in" in capsys.readouterr().err
