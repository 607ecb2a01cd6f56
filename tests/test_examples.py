"""The ViT, GPT-2 and deep-NTK examples at --quick size, checked against their own event files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _last(path: Path, tag: str) -> float:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return float(acc.Scalars(tag)[-1].value)


def _check_seed_aggregate(result: dict, run_dir: Path, seeds: list[int]) -> None:
    """mean ± std over seeds equal numpy on the values read straight from each seed's events."""
    agg = {a["side"]: a for a in result["aggregate"]}
    assert set(agg) == {"model", "baseline"}
    for side in ("model", "baseline"):
        a = agg[side]
        assert a["n_seeds"] == len(seeds)
        for key, tag in (("train_loss", f"{side}/train_loss"), ("gap", f"gap/{side}/loss")):
            vals = np.array([_last(run_dir / f"seed_{s}", tag) for s in seeds])
            assert a[f"{key}_mean"] == pytest.approx(vals.mean(), rel=1e-6)
            assert a[f"{key}_std"] == pytest.approx(vals.std(ddof=1), rel=1e-5, abs=1e-9)
    assert "±" in result["table"] and "seeds)" in result["table"]


@pytest.mark.slow
def test_vit_example_quick(tmp_path: Path):
    mod = _load("vit_glu_vs_mlp")
    res = mod.main(["--quick", "--seeds", "0", "1", "--out", str(tmp_path), "--no-progress"])
    run_dir = tmp_path / "vit-quick-digits"
    assert res["data"] == "digits" and (run_dir / "results.json").is_file()
    json.loads(  # strict JSON: no bare NaN / Infinity (until 2026-11-28)
        (run_dir / "results.json").read_text(),
        parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"),
    )
    m, b = res["params"]["model"], res["params"]["baseline"]
    assert abs(m - b) / b < 0.01  # parameter-matched swap
    _check_seed_aggregate(res, run_dir, [0, 1])


@pytest.mark.slow
def test_gpt2_example_quick_on_a_text_folder(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (ROOT / "glu_probe" / "crossing.py").read_text(encoding="utf-8")
    (corpus / "a.txt").write_text(text * 3, encoding="utf-8")
    mod = _load("gpt2_glu_vs_mlp")
    res = mod.main(
        ["--quick", "--seeds", "0", "1", "--data", str(corpus), "--out", str(tmp_path),
         "--no-progress"]
    )  # fmt: skip
    run_dir = tmp_path / "gpt2-quick"
    data = (text * 3).encode()
    data += b"" if data.endswith(b"\n") else b"\n"  # read_text_files ends each file with one
    assert res["train_bytes"] == round(len(data) * 0.9)
    _check_seed_aggregate(res, run_dir, [0, 1])


def test_example_argument_errors(tmp_path: Path, capsys):
    vit = _load("vit_glu_vs_mlp")
    with pytest.raises(SystemExit):
        vit.parse_args(["--cifar-root", str(tmp_path / "none")])
    assert "is not a directory" in capsys.readouterr().err
    # (raw tracebacks before: a ValueError for the variant, a RuntimeError for the threads)
    for argv, message in (
        (["--variant", "foo"], "--variant must be one of"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--seeds", "-1"], "--seeds must be >= 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            vit.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    gpt = _load("gpt2_glu_vs_mlp")
    with pytest.raises(SystemExit):
        gpt.parse_args(["--data", str(tmp_path / "none")])
    assert "does not exist" in capsys.readouterr().err
    deep = _load("deep_ntk_study")
    with pytest.raises(SystemExit):
        deep.parse_args(["--train-steps", "4", "--probe-at", "9"])
    assert "--probe-at steps must lie in" in capsys.readouterr().err


@pytest.mark.slow
def test_deep_ntk_study_quick(tmp_path: Path):
    mod = _load("deep_ntk_study")
    res = mod.main(["--quick", "--out", str(tmp_path)])
    recs = res["records"]
    # families x widths x depths x seeds x variants x probe steps
    assert len(recs) == 2 * 1 * 2 * 1 * 2 * 2
    assert (tmp_path / "deep_ntk.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(  # strict JSON: no bare NaN / Infinity (until 2026-11-28)
        (tmp_path / "deep_ntk.json").read_text(),
        parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"),
    )
    assert len(saved["records"]) == len(recs)
    assert "| gpt2 | 16 | 2 |" in (tmp_path / "deep_ntk.md").read_text()
    # one κ at init against an independent dense NTK (torch.func Jacobian, float64 eigvalsh)
    args = mod.parse_args(["--quick"])
    host = mod.build_host("vit", 2, 16, 0, args.seq_len)
    model = mod.variant_of(host, "swiglu", 0)
    probe = mod.Task("vit", args).probe
    params = {k: v.detach() for k, v in model.named_parameters()}

    def g(p, xi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return out.sum(-1) / out.shape[-1] ** 0.5

    model.eval()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        jac = torch.vmap(torch.func.jacrev(g), in_dims=(None, 0))(params, probe)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1).double()
    ev = torch.linalg.eigvalsh(J @ J.T)
    (rec,) = [
        r for r in recs
        if (r["family"], r["depth"], r["variant"], r["step"]) == ("vit", 2, "swiglu", 0)
    ]  # fmt: skip
    assert rec["kappa"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-3)
    assert rec["n_rows"] == probe.shape[0]
