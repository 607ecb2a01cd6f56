"""The glu-probe command line: help, argument errors, and each command against direct calls."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from glu_probe._rng import stream_seed
from glu_probe.cli import build_parser, main


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


# ----------------------------------------------------------------------------------- help


def test_console_script_help_lists_every_command():
    res = subprocess.run(
        [sys.executable, "-m", "glu_probe.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0
    for cmd in ("demo", "report", "theory", "spectrum"):
        assert cmd in res.stdout


@pytest.mark.parametrize(
    ("cmd", "options"),
    [
        ("demo", ["--out", "--run-name", "--quick", "--data", "--device", "--seed", "--pairs"]),
        ("report", ["RUN_DIR", "--out", "--json"]),
        ("theory", ["--d", "--m", "--n", "--seed", "--markdown"]),
        (
            "spectrum",
            ["--timm", "--hf-config", "--set", "--swap", "--batch-size", "--method", "--output"],
        ),
    ],
)
def test_subcommand_help_documents_options(cmd, options, capsys):
    code, out, _ = _exit_code([cmd, "--help"], capsys)
    assert code == 0
    for opt in options:
        assert opt in out


def test_no_command_is_an_error(capsys):
    code, _, err = _exit_code([], capsys)
    assert code == 2 and "required" in err


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["theory", "--d", "0", "--m", "8", "--n", "10"], "expected a positive integer, got 0"),
        (["theory", "--d", "x", "--m", "8", "--n", "10"], "expected a positive integer, got 'x'"),
        (["theory", "--m", "8", "--n", "10"], "the following arguments are required: --d"),
        (["demo", "--pairs", "resnet"], "unknown pair(s) ['resnet']"),
        (["demo", "--data", "/no/such/folder"], "--data '/no/such/folder' does not exist"),
        (["demo", "--seed", "-1"], "--seed must lie in [0, 2**32), got -1"),
        (["demo", "--pairs", "vit", "vit"], "--pairs lists a pair twice"),
        (["demo", "--bogus"], "glu-probe demo: error: unrecognized arguments: --bogus"),
        (["demo", "--run-name", "a/b"], "--run-name must be a plain folder name"),
        (["demo", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["demo", "--max-minutes", "-1"], "expected a positive finite number"),
        (["spectrum"], "one of the arguments --timm --hf-config is required"),
        (["spectrum", "--timm", "vit_tiny_patch16_22"], "did you mean vit_tiny_patch16_224"),
        (["spectrum", "--hf-config", "gpt3"], "unknown Hugging Face model type 'gpt3'"),
        (["spectrum", "--timm", "vit_tiny_patch16_224", "--set", "depth"], "expected KEY=VALUE"),
        (["spectrum", "--timm", "vit_tiny_patch16_224", "--swap", "mish"], "invalid choice"),
        (["spectrum", "--hf-config", "/no/such/config.json"], "does not exist"),
    ],
)
def test_argument_errors_are_clear(argv, message, capsys):
    code, _, err = _exit_code(argv, capsys)
    assert code == 2
    assert message in err


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["demo", "--pairs", "resnet"], "glu-probe demo: error: unknown pair(s)"),
        (["report", "/no/such/run"], "glu-probe report: error: RUN_DIR '/no/such/run'"),
        (["spectrum", "--hf-config", "gpt3"], "glu-probe spectrum: error: unknown Hugging Face"),
    ],
)
def test_error_messages_name_the_subcommand_once(argv, prefix, capsys):
    code, _, err = _exit_code(argv, capsys)
    assert code == 2 and prefix in err
    assert f"error: {argv[0]}:" not in err


_TINY_VIT = [
    "spectrum", "--timm", "vit_tiny_patch16_224", "--set", "img_size=32", "--set", "depth=1",
    "--set", "embed_dim=32", "--set", "num_heads=2", "--set", "num_classes=3",
    "--batch-size", "2", "--device", "cpu", "--json",
]  # fmt: skip


def test_spectrum_img_size_mismatch_is_a_usage_error(capsys):
    """A fixed-size timm model and another --img-size: exit 2 with the fix, not a traceback."""
    code, _, err = _exit_code([*_TINY_VIT, "--img-size", "48"], capsys)
    assert code == 2
    assert "--img-size 48 does not match the model's img_size 32" in err
    assert "--set img_size=48" in err
    # any other input the model rejects (here: a side not divisible by the patch size)
    argv = [*_TINY_VIT, "--set", "dynamic_img_size=true", "--img-size", "40"]
    code, _, err = _exit_code(argv, capsys)
    assert code == 2 and "the model rejected the probe batch of shape (2, 3, 40, 40)" in err
    # the documented fix works
    assert main([*_TINY_VIT, "--set", "img_size=48", "--img-size", "48"]) == 0
    assert json.loads(capsys.readouterr().out)["probe_shape"] == [2, 3, 48, 48]


_TINY_GPT2 = [
    "spectrum", "--hf-config", "gpt2", "--set", "n_embd=32", "--set", "n_head=2",
    "--set", "vocab_size=64", "--set", "n_positions=16", "--seq-len", "4", "--batch-size", "2",
    "--method", "dense", "--device", "cpu", "--json",
]  # fmt: skip


def test_spectrum_refuses_unknown_hf_config_keys(tmp_path: Path, capsys):
    """A typo (n_layers for n_layer) would be ignored by the config: refused, nearest keys named."""
    code, _, err = _exit_code([*_TINY_GPT2, "--set", "n_layers=1"], capsys)
    assert code == 2
    assert "--set n_layers: GPT2Config has no attribute 'n_layers'" in err
    assert "did you mean n_layer" in err
    # aliases (attribute_map), init keywords and load-time keywords are accepted
    ok = [*_TINY_GPT2, "--set", "num_hidden_layers=1", "--set", "attn_implementation=eager"]
    assert main(ok) == 0
    assert json.loads(capsys.readouterr().out)["n_rows"] == 8
    # a key of the given config.json is accepted even if the default config lacks it
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "my_extra": 1, "n_layer": 1}))
    argv = ["spectrum", "--hf-config", str(cfg), *_TINY_GPT2[3:], "--set", "my_extra=2"]
    assert main(argv) == 0
    capsys.readouterr()


def test_hf_special_token_ids_outside_a_smaller_vocab_become_none(capsys):
    """gpt2's default bos/eos id 50256 lies outside ``--set vocab_size=64`` (transformers warned
    on every docs example): such defaults become None with a note; explicit ones are kept."""
    import argparse

    from glu_probe.cli import _build_hf

    parser = argparse.ArgumentParser()
    tiny = {"n_embd": 32, "n_head": 2, "n_layer": 1, "vocab_size": 64, "n_positions": 16}
    model = _build_hf("gpt2", dict(tiny), parser)
    assert model.config.bos_token_id is None and model.config.eos_token_id is None
    err = capsys.readouterr().err
    assert "the default bos_token_id=50256 lies outside vocab_size=64; set to None" in err
    kept = _build_hf("gpt2", {**tiny, "eos_token_id": 3}, parser)
    assert kept.config.eos_token_id == 3 and kept.config.bos_token_id is None
    assert "eos_token_id" not in capsys.readouterr().err
    full = _build_hf("gpt2", {**tiny, "vocab_size": 50257}, parser)  # inside: untouched
    assert full.config.bos_token_id == 50256 and capsys.readouterr().err == ""


def test_report_on_missing_or_empty_run_dir(tmp_path: Path, capsys):
    code, _, err = _exit_code(["report", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist or is not a directory" in err
    code, _, err = _exit_code(["report", str(tmp_path)], capsys)
    assert code == 2 and "no TensorBoard event files" in err


def test_hf_config_json_without_model_type(tmp_path: Path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"n_layer": 1}))
    code, _, err = _exit_code(["spectrum", "--hf-config", str(cfg)], capsys)
    assert code == 2 and "has no 'model_type' entry" in err


# ----------------------------------------------------------------------------------- commands


def test_theory_prints_the_theory_table(capsys):
    from glu_probe.theory import format_theory_table, theory_table

    assert main(["theory", "--d", "5", "--m", "16", "--n", "12", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_theory_table(theory_table(5, 16, 12, 3)).strip()


def test_report_command_prints_values_and_writes_png(tmp_path: Path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "run" / "pair"))
    for s, (a, b) in enumerate([(1.0, 0.9), (0.6, 0.7), (0.4, 0.6)]):
        w.add_scalar("model/train_loss", a, s)
        w.add_scalar("baseline/train_loss", b, s)
    w.add_scalar("ntk/model/condition_number", 123.0, 0)
    w.add_scalar("ntk/baseline/condition_number", 4567.0, 0)
    w.close()
    png = tmp_path / "r.png"
    assert main(["report", str(tmp_path / "run"), "--out", str(png), "--json"]) == 0
    out = capsys.readouterr().out
    assert "123" in out and "4.57e+03" in out
    rows = json.loads(out[out.index("[\n") :])
    assert {r["side"] for r in rows} == {"model", "baseline"}
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_json_is_strict_with_an_infinite_condition_number(tmp_path: Path, capsys):
    """κ = ∞ (a singular K) was written as a bare Infinity, which strict JSON readers reject;
    the table shows "inf"."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "run" / "pair"))
    for s, (a, b) in enumerate([(1.0, 0.9), (0.6, 0.7)]):
        w.add_scalar("model/train_loss", a, s)
        w.add_scalar("baseline/train_loss", b, s)
    w.add_scalar("ntk/model/condition_number", float("inf"), 0)
    w.add_scalar("ntk/baseline/condition_number", 50.0, 0)
    w.close()
    png = tmp_path / "r.png"
    assert main(["report", str(tmp_path / "run"), "--out", str(png), "--json"]) == 0
    out = capsys.readouterr().out
    assert "inf" in out

    def refuse(name: str) -> None:
        raise ValueError(f"non-strict JSON constant {name}")

    rows = json.loads(out[out.index("[\n") :], parse_constant=refuse)
    model = next(r for r in rows if r["side"] == "model")
    assert model["kappa_init"] is None


def _pntk_condition_number(model, x):
    """Independent ground truth: J by torch.func.jacrev of g = Σ_o f_o/√O, float64 eigvalsh."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def g(p, xi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return out.reshape(-1, out.shape[-1]).sum(-1) / out.shape[-1] ** 0.5

    model.eval()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        jac = torch.vmap(torch.func.jacrev(g), in_dims=(None, 0))(params, x)
    J = torch.cat([j.reshape(j.shape[0] * j.shape[1], -1) for j in jac.values()], dim=1).double()
    ev = torch.linalg.eigvalsh(J @ J.T)
    return float(ev[-1] / ev[0]), float(ev[-1]), float(ev[0])


def test_spectrum_timm_matches_direct_ntk(capsys):
    import timm

    argv = [
        "spectrum", "--timm", "vit_tiny_patch16_224", "--set", "img_size=16",
        "--set", "patch_size=8", "--set", "depth=1", "--set", "embed_dim=32",
        "--set", "num_heads=2", "--set", "num_classes=5", "--batch-size", "6",
        "--method", "dense", "--device", "cpu", "--seed", "4", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    torch.manual_seed(4)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
        embed_dim=32, num_heads=2, num_classes=5,
    )  # fmt: skip
    # the CLI's probe stream (4, 0) of --seed 4 (it was seed + 1 = 5, the next seed's init)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(stream_seed(4, 4, 0)))
    kappa, lmax, lmin = _pntk_condition_number(model, x)
    assert info["probe_shape"] == [6, 3, 16, 16] and info["n_rows"] == 6
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["lambda_max"] == pytest.approx(lmax, rel=1e-4)
    assert info["lambda_min"] == pytest.approx(lmin, rel=1e-3)
    assert info["condition_number"] == pytest.approx(kappa, rel=1e-3)
    assert info["effective_rank_method"] == "exact" and 1.0 <= info["effective_rank"] <= 6.0
    assert info["precision"] == "float64"
    assert 0.0 < info["residual_min"] <= info["n_rows"] * 2.3e-16 * info["lambda_max"]

    # --jacobian-dtype float32: the mixed-precision exact path (engine accuracy against float64
    # truth is tested in test_ntk_spectrum.py); here the wiring and the printed bound
    assert main([*argv, "--jacobian-dtype", "float32"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert mixed["precision"] == "mixed" and mixed["residual_min"] > 0.0
    assert abs(mixed["lambda_min"] - lmin) <= mixed["residual_min"] + 1e-12 * lmax
    assert abs(mixed["lambda_max"] - lmax) <= mixed["residual_max"] + 1e-12 * lmax


def test_spectrum_hf_gpt2_with_swap(capsys):
    argv = [
        "spectrum", "--hf-config", "gpt2", "--set", "n_layer=1", "--set", "n_embd=32",
        "--set", "n_head=2", "--set", "vocab_size=64", "--set", "n_positions=16",
        "--seq-len", "4", "--batch-size", "2", "--swap", "swiglu", "--method", "dense",
        "--device", "cpu", "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_rows"] == 8 and info["method"] == "dense"
    assert abs(info["parameters"] - info["parameters_before_swap"]) <= 0.01 * info["parameters"]
    assert info["condition_number"] == pytest.approx(info["lambda_max"] / info["lambda_min"])
    code, _, err = _exit_code([*argv[:-1], "--seq-len", "32"], capsys)
    assert code == 2 and "exceeds the model's 16 positions" in err


def test_parser_is_reusable():
    parser = build_parser()
    args = parser.parse_args(["demo", "--quick", "--seed", "3"])
    assert args.quick and args.seed == 3 and args.out == "runs" and args.device == "auto"


def test_spectrum_table_output(capsys):
    """Without --json: a rich table with κ and the effective rank (iterative path: SLQ)."""
    argv = [
        "spectrum", "--hf-config", "gpt2", "--set", "n_layer=1", "--set", "n_embd=32",
        "--set", "n_head=2", "--set", "vocab_size=64", "--set", "n_positions=16",
        "--seq-len", "8", "--batch-size", "2", "--method", "lanczos", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "NTK spectrum at init" in out and "κ = λ_max/λ_min" in out
    assert "effective rank" in out and ("(slq)" in out or "(exact)" in out)


def test_spectrum_table_names_the_rounding_bound_on_the_dense_path(capsys):
    """No Ritz pair on the exact path: its float64 rounding allowance, not a "Ritz residual"."""
    argv = [a for a in _TINY_GPT2 if a != "--json"]
    assert main([*argv, "--set", "n_layer=1"]) == 0
    out = capsys.readouterr().out
    assert "(rounding bound)" in out and "Ritz residual" not in out
    assert main([*argv, "--set", "n_layer=1", "--jacobian-dtype", "float32"]) == 0
    assert "(rounding bound)" in capsys.readouterr().out


def test_spectrum_says_when_lambda_min_is_rounding_noise(capsys):
    """A rank-deficient K (128 pNTK rows of a tiny GPT-2): λ_min was labelled "exact" and κ
    printed as 2.7e17; the table and the JSON now say that λ_min is numerically zero and κ
    infinite (JSON null, strict JSON). --seed 1: two of its eight probe sequences share their
    first token (a duplicated row of K; --seed 0's probe has none since the probe got its own
    random stream)."""
    argv = [
        "spectrum", "--hf-config", "gpt2", "--set", "n_layer=1", "--set", "n_embd=32",
        "--set", "n_head=2", "--set", "vocab_size=64", "--batch-size", "8", "--seq-len", "16",
        "--device", "cpu", "--seed", "1",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "numerically zero at float64 (rank 127 of 128)" in out
        assert "inf (K is singular at this precision" in out
        assert main([*argv, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # (strict: no bare Infinity / NaN)
    assert info["condition_number"] is None and info["lambda_min_resolved"] is False
    assert info["numerical_rank"] == 127 and info["condition_number_lower"] > 1e10


def test_demo_refuses_what_would_fail_or_mix_before_training(tmp_path, capsys):
    """Checked before any pair trains (a bad --data was found after two pairs had trained; a
    reused run folder mixed two runs' event files in the report)."""
    used = tmp_path / "runs" / "mine"
    used.mkdir(parents=True)
    (used / "events.out.tfevents.1").write_bytes(b"x")
    afile = tmp_path / "afile"
    afile.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a\n")
    cases = [
        (["--out", str(tmp_path / "runs"), "--run-name", "mine"], "exists and is not empty"),
        (["--out", str(afile)], "cannot be used as a folder"),
        (["--data", str(empty)], "no readable text files"),
        (["--data", str(tiny)], "too short for one window"),
    ]
    for extra, message in cases:
        code, _, err = _exit_code(["demo", "--quick", *extra], capsys)
        assert code == 2 and message in err, (extra, err)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mine"]


def test_report_refuses_an_unwritable_figure_path(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = _exit_code(["report", str(run), "--out", str(afile / "r.png")], capsys)
    assert code == 2 and "not a writable file path" in err
    # a folder that does not exist yet is created (as before the check): no refusal for it
    code, _, err = _exit_code(
        ["report", str(run), "--out", str(tmp_path / "new" / "r.png")], capsys
    )
    assert "not a writable file path" not in err and (tmp_path / "new").is_dir()


def test_set_keys_a_config_consumes_in_another_form_are_accepted():
    """transformers 5 moves ``rope_theta`` into ``rope_parameters``: a valid key, not a typo."""
    import argparse

    from transformers import GPT2Config, LlamaConfig

    from glu_probe.cli import _check_config_keys

    parser = argparse.ArgumentParser()
    _check_config_keys(LlamaConfig, LlamaConfig(), {"rope_theta": 5000.0}, set(), parser)
    with pytest.raises(SystemExit):
        _check_config_keys(GPT2Config, GPT2Config(), {"n_layers": 1}, set(), parser)


def test_strict_json_writes_null_for_non_finite_floats():
    """What glu-probe writes (demo summaries, examples' results, ``--json``) is strict JSON:
    NaN and ±inf become null at any depth, tuples become lists, other objects their str."""
    import json
    import math

    import numpy as np

    from glu_probe import _json

    value = {
        "kappa": math.inf,
        "gap": float("nan"),
        "rows": [(1, -math.inf), {"x": np.float64("nan"), "y": 2.5}],
        "path": Path("/tmp/x"),
    }
    text = _json.dumps(value)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"constant {c} written"))
    assert back == {
        "kappa": None,
        "gap": None,
        "rows": [[1, None], {"x": None, "y": 2.5}],
        "path": "/tmp/x",
    }
    assert _json.strict((math.nan, 1.0)) == [None, 1.0]
