"""The GPU benchmark scripts run on the CPU at toy sizes, and ``gpu_check.sh`` names only steps
it defines.

A device lease is 15 minutes; on 2026-11-28 one of its calls was lost to a benchmark script that
an API change had broken (``fused_accuracy.py``, after ``_packed_preactivation`` began to return
a pair). These smoke runs catch that here. They check that each script runs and prints its
table, not its timings.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(*args: str, timeout: int = 240) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_mlp_runs_with_biases_and_profiles():
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    out = _run(
        "benchmarks/bench_mlp.py",
        *("--device", "cpu", "--tokens", "64", "--dims", "16", "--rounds", "1"),
        *("--min-run-time", "0.01", "--bias", "--profile", "--dtype", "bfloat16"),
    )
    rows = [line for line in out.splitlines() if line.startswith("| 64 | 16 |")]
    assert {r.split("|")[5].strip() for r in rows} >= {"timm.SwiGLU", "hf.LlamaMLP"}
    assert out.count("#### profile:") == 4 and "bias=True" in out


def test_ab_mlp_bias_runs_and_its_candidates_agree():
    """The script itself asserts that every candidate computes the default's output and input
    gradient (bf16 tolerance); here, that it gets through a width and prints its row."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    out = _run(
        "benchmarks/ab_mlp_bias.py",
        *("--device", "cpu", "--tokens", "64", "--dims", "16", "--rounds", "1"),
        *("--min-run-time", "0.01"),
    )
    (row,) = [line for line in out.splitlines() if line.startswith("| 16 | 40 |")]
    assert len(row.strip("|").split("|")) == 9


def test_fused_accuracy_runs_and_both_paths_are_as_accurate():
    out = _run(
        "benchmarks/fused_accuracy.py",
        *("--device", "cpu", "--seeds", "1", "--batch", "1", "--dtype", "float16"),
    )
    rows = [line for line in out.splitlines() if line.startswith(("feature", "split"))]
    assert len(rows) == 12  # 3 layouts x 2 variants x reduced-precision reductions on/off
    for row in rows:
        errors = ast.literal_eval(row.split(" ", 3)[3])
        for key in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "x (input)"):
            fused, plain = errors[key]
            assert fused <= 2 * plain + 1e-3, (key, fused, plain)


def test_profile_probe_runs():
    out = _run("benchmarks/profile_probe.py", "--model", "two_layer", "--repeats", "1")
    assert "method dense" in out and "Self CPU time total" in out


def test_gpu_check_defines_every_default_step_and_its_scripts_exist():
    text = (BENCH / "gpu_check.sh").read_text()
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    defaults = re.search(r"steps=\$\{\*:-([^}]*)\}", text)
    assert defaults is not None
    arms = set(re.findall(r"^\s+([a-z0-9_]+)\) ", text, flags=re.M))
    assert set(defaults.group(1).split()) <= arms
    for script in re.findall(r"python3 (benchmarks/[a-z_0-9]+\.py)", text):
        assert (ROOT / script).is_file(), script


def test_bench_ntk_accuracy_section_runs_and_meets_its_targets():
    """Section 1 on the CPU (the GPU runs it in ``gpu_check.sh``): every dense κ within 1e-6 of
    the float64 truth, and every Lanczos λ_max within 1e-4 in at most 30 products."""
    out = _run("benchmarks/bench_ntk.py", "--device", "cpu", "--sections", "1")
    table = out[out.index("## 1.") :].split("\n\n")[1].splitlines()
    rows = table[2:]  # below the header and the |---| line
    assert len(rows) == 6 and all(r.startswith("| ") for r in rows)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) <= 1e-6, row
        lmax_err, products = re.match(r"([0-9.e+-]+) \((\d+)\)", cells[4]).groups()
        assert float(lmax_err) <= 1e-4 and int(products) <= 30, row
