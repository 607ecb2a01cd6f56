"""Demo data and CLI, session 26 review: the default stdlib corpus held a file written for one
installation (``_sysconfigdata_*.py``, with the install prefix), so the GPT-2 pair's numbers
depended on where Python was installed; one suffix string was split into characters; a
``--run-name`` naming a file gave a traceback; a pair cut by ``--max-minutes`` showed its last
logged step in the table's steps column."""

from __future__ import annotations

import json
import sys
import tempfile

import pytest
import torch

import glu_probe.data as gdata
from glu_probe import cli
from glu_probe.data import read_text_files, stdlib_source_dir, text_corpus

torch.set_num_threads(1)


def _tree(root):
    files = {
        "a.py": "print('a')\n",
        "_sysconfigdata__linux_x86_64-linux-gnu.py": "build_time_vars = {'prefix': '/opt/py'}\n",
        "config-3.11-x86_64-linux-gnu/python-config.py": "prefix = '/opt/py'\n",
        "sitecustomize.py": "import os\n",
        "usercustomize.py": "import sys\n",
        "b.npy": "not python\n",
        "pkg/z.py": "z = 1\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def test_the_stdlib_corpus_skips_files_written_for_one_installation(tmp_path, monkeypatch):
    files = _tree(tmp_path)
    monkeypatch.setattr(gdata, "stdlib_source_dir", lambda: tmp_path)
    blob = read_text_files(tmp_path, suffixes=(".py",))
    assert blob == (files["a.py"] + files["pkg/z.py"]).encode()
    corpus = text_corpus(None, split="all", seq_len=4)
    assert bytes(corpus.tokens.tolist()) == blob
    # any other folder keeps every .py file
    other = tmp_path / "copy"
    _tree(other)
    assert read_text_files(other, suffixes=(".py",)).count(b"/opt/py") == 2


def test_the_real_stdlib_corpus_does_not_hold_the_install_prefix():
    blob = read_text_files(stdlib_source_dir(), suffixes=(".py",), max_bytes=1_000_000)
    assert b"build_time_vars" not in blob
    assert sys.base_prefix.encode() not in blob


def test_one_suffix_string_is_one_suffix(tmp_path):
    _tree(tmp_path)
    got = read_text_files(tmp_path / "pkg", suffixes=".py")
    assert got == b"z = 1\n"
    # b.npy ends in "y": tuple(".py") matched it
    assert b"not python" not in read_text_files(tmp_path, suffixes=".py")


def test_run_name_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--quick", "--out", str(tmp_path), "--run-name", "taken"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is a file, not a folder" in err


def test_the_steps_column_of_a_pair_cut_short_is_the_steps_done():
    from glu_probe.demo import run_demo

    out = tempfile.mkdtemp()
    res = run_demo(
        out,
        "cut",
        quick=True,
        device="cpu",
        seed=0,
        progress=False,
        max_minutes=1e-4,
        pairs=("two_layer",),
    )
    meta = json.loads(next(res.run_dir.rglob("pair.json")).read_text())
    assert meta["stopped_early"] and meta["steps_done"] < meta["settings"]["steps"]
    assert {row["steps"] for row in res.rows} == {meta["steps_done"]}


def test_pair_json_records_a_data_fingerprint():
    from torch.utils.data import TensorDataset

    from glu_probe.data import ByteWindowDataset
    from glu_probe.demo import data_fingerprint

    a = ByteWindowDataset(b"abcdefgh" * 4, seq_len=4)
    b = ByteWindowDataset(b"abcdefgh" * 4, seq_len=4)
    c = ByteWindowDataset(b"abcdefgX" * 4, seq_len=4)
    t = TensorDataset(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 2]))
    fa, fb, fc = data_fingerprint(a, t), data_fingerprint(b, t), data_fingerprint(c, t)
    assert fa == fb and fa["train"] != fc["train"] and fa["val"] == fc["val"]
    assert fa["python"] == sys.version.split()[0]
    assert fa["train"]["numel"] == 32 and fa["val"]["numel"] == 9
