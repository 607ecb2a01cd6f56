"""The README's Quickstart and CI stay in step: exactly two commands, and CI runs the test one."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_command():
    spec = importlib.util.spec_from_file_location(
        "readme_command", ROOT / ".ci" / "readme_command.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_command


def test_quickstart_has_exactly_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)
    assert len(blocks) == 2


def test_demo_command_installs_and_runs_the_main_job():
    cmd = _readme_command()("demo", ROOT / "README.md")
    assert "pip install" in cmd
    assert cmd.rstrip().endswith("glu-probe demo")


def test_tests_command_installs_dev_extras_and_runs_pytest():
    cmd = _readme_command()("tests", ROOT / "README.md")
    assert "pip install" in cmd and "[all,dev]" in cmd
    assert re.search(r"\bpytest\b", cmd)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "readme_command.py tests" in ci
    assert 'bash -c "$test_cmd"' in ci
    for check in ("ruff check", "ruff format --check", "mypy glu_probe", "mkdocs build --strict"):
        assert check in ci


def test_console_script_points_at_cli_main():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'glu-probe = "glu_probe.cli:main"' in pyproject


def test_readme_example_runs_and_logs_the_promised_metrics(tmp_path, monkeypatch):
    """The README's "In your own run" snippet runs as written and logs what it says."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- example:readme -->\s*```python\n(.*?)\n```", text, flags=re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.group(1), "README.md", "exec"), scope)
    metrics = scope["trainer"].callback_metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(tmp_path.glob("runs/**/events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    # the train losses reach TensorBoard too (log_every_n_steps=1 in a 40-step run)
    for tag in ("model/train_loss", "baseline/train_loss"):
        assert tag in tags, (tag, sorted(tags))
    for tag in ("ntk/model/condition_number", "ntk/baseline/condition_number", "crossing/delta"):
        assert tag in tags, (tag, sorted(tags))
    kappa = [e.value for e in acc.Scalars("ntk/model/condition_number")]
    assert len(kappa) >= 20 and all(k >= 1.0 for k in kappa)
    assert any(t.startswith("gap/") for t in tags)
    assert "model/train_loss" in metrics
