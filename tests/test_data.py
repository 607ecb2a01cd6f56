"""Offline datasets: shapes, determinism, splits and error messages against direct computation."""

from __future__ import annotations

import pickle
import sys
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from glu_probe.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ByteWindowDataset,
    cifar10_dataset,
    digits_dataset,
    hf_text_dataset,
    read_text_files,
    stdlib_source_dir,
    text_corpus,
    two_layer_regression,
)

# ----------------------------------------------------------------------------------- digits


def test_digits_split_matches_direct_permutation_and_standardisation():
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1)
    perm = np.random.RandomState(3).permutation(len(images))
    n_train = round(len(images) * 0.75)
    train_raw = images[perm[:n_train]]
    mean, std = train_raw.mean(), train_raw.std()

    train = digits_dataset("train", image_size=8, seed=3)
    val = digits_dataset("val", image_size=8, seed=3)
    assert len(train) + len(val) == 1797 and len(train) == n_train
    torch.testing.assert_close(train.tensors[0], (train_raw - mean) / std)
    torch.testing.assert_close(val.tensors[0], (images[perm[n_train:]] - mean) / std)
    assert torch.equal(train.tensors[1], torch.as_tensor(raw.target[perm[:n_train]]))
    # the training split is standardised exactly
    assert abs(float(train.tensors[0].mean())) < 1e-5
    assert abs(float(train.tensors[0].std()) - 1.0) < 1e-5


def test_digits_resize_shapes_determinism_and_seeds():
    a = digits_dataset("train", image_size=16, seed=0)
    b = digits_dataset("train", image_size=16, seed=0)
    c = digits_dataset("train", image_size=16, seed=1)
    x, y = a.tensors
    assert x.shape == (1348, 1, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert torch.equal(x, b.tensors[0]) and torch.equal(y, b.tensors[1])
    assert not torch.equal(y, c.tensors[1])
    flat = digits_dataset("val", image_size=16, flatten=True)
    assert flat.tensors[0].shape == (449, 256)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "test"}, "split must be one of"),
        ({"image_size": 4}, "image_size must be >= 8"),
        ({"val_fraction": 1.0}, r"val_fraction must lie in \(0, 1\)"),
    ],
)
def test_digits_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits_dataset(**kwargs)


@pytest.mark.parametrize("val_fraction", [1e-4, 0.9999])
def test_digits_refuses_a_val_fraction_that_empties_a_split(val_fraction):
    n_train = round(1797 * (1 - val_fraction))  # 1797 and 0 train images
    sizes = rf"leaves {n_train} training and {1797 - n_train} validation images \(of 1797\)"
    for split in ("train", "val", "all"):
        with pytest.raises(ValueError, match=sizes):
            digits_dataset(split, image_size=8, val_fraction=val_fraction)
    # the smallest fraction that still leaves one validation image is accepted
    assert len(digits_dataset("val", image_size=8, val_fraction=1 / 1797)) == 1


# ----------------------------------------------------------------------------------- text


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_bytes(b"hello world\n")
    (tmp_path / "b" / "c.txt").write_bytes(b"second file, no newline")
    (tmp_path / "b" / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden.txt").write_bytes(b"never read")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.txt").write_bytes(b"never read either")
    return tmp_path


def test_read_text_files_order_skips_and_cap(text_dir: Path):
    blob = read_text_files(text_dir, max_bytes=None)
    assert blob == b"hello world\nsecond file, no newline\n"
    assert read_text_files(text_dir, max_bytes=7) == b"hello w"
    assert read_text_files(text_dir, suffixes=(".txt",), max_bytes=None) == blob
    assert read_text_files(text_dir / "a.txt") == b"hello world\n"


def test_byte_windows_equal_direct_slices():
    data = bytes(range(50))
    ds = ByteWindowDataset(data, seq_len=8, stride=5)
    assert len(ds) == (50 - 8 - 1) // 5 + 1
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.tolist() == list(data[5 * i : 5 * i + 8])
        assert y.tolist() == list(data[5 * i + 1 : 5 * i + 9])
        assert x.dtype == torch.int64
    last_x, _ = ds[-1]
    assert last_x.tolist() == list(data[5 * (len(ds) - 1) : 5 * (len(ds) - 1) + 8])
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    with pytest.raises(ValueError, match="too short"):
        ByteWindowDataset(b"abc", seq_len=3)


def test_text_corpus_contiguous_split(text_dir: Path):
    blob = read_text_files(text_dir, max_bytes=None)
    cut = round(len(blob) * 0.75)
    train = text_corpus(text_dir, split="train", seq_len=4, val_fraction=0.25, max_bytes=None)
    val = text_corpus(text_dir, split="val", seq_len=4, val_fraction=0.25, max_bytes=None)
    assert bytes(train.tokens.tolist()) == blob[:cut]
    assert bytes(val.tokens.tolist()) == blob[cut:]
    x, y = train[1]
    assert bytes(x.tolist()) == blob[4:8] and bytes(y.tolist()) == blob[5:9]


def test_text_corpus_default_is_stdlib_sources():
    ds = text_corpus(seq_len=32, max_bytes=20_000, split="all")
    first = sorted(p for p in stdlib_source_dir().glob("*.py") if not p.name.startswith("."))[0]
    assert ds.tokens.numel() == 20_000
    head = first.read_bytes()[:32]
    assert bytes(ds[0][0].tolist()) == head


def test_text_corpus_bad_input(tmp_path: Path, text_dir: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable text files"):
        text_corpus(tmp_path / "empty")
    with pytest.raises(ValueError, match="split must be one of"):
        text_corpus(text_dir, split="test")
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        text_corpus(text_dir, max_bytes=0)


def _read_text_files_before(path: Path, suffixes=None, max_bytes=None) -> bytes:
    """read_text_files as it was (whole files read, joined, then cut): the reference output."""
    from glu_probe.data import _iter_files

    files = [path] if path.is_file() else list(_iter_files(path, suffixes))
    chunks: list[bytes] = []
    total = 0
    for file in files:
        data = file.read_bytes()
        if not data or b"\x00" in data:
            continue
        chunks.append(data if data.endswith(b"\n") else data + b"\n")
        total += len(chunks[-1])
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)
    return blob if max_bytes is None else blob[:max_bytes]


def test_read_text_files_output_equals_whole_file_reading_for_every_cap(tmp_path: Path):
    files = {
        "a.txt": b"first\n",
        "b.txt": b"no newline",
        "d.txt": b"\x00early binary",
        "e.txt": b"x",
        "f.txt": b"\n\n",
        "c/empty.txt": b"",
        "c/h.md": b"# markdown",
        "c/late_nul.txt": b"0123456789" * 3 + b"\x00 binary, seen only past any cut",
        "c/nl.txt": b"two\nlines\n",
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    whole = read_text_files(tmp_path, max_bytes=None)
    assert whole == b"first\nno newline\nx\n\n\n# markdown\ntwo\nlines\n"
    assert read_text_files(tmp_path, max_bytes=16) == b"first\nno newline"  # cut before a "\n"
    assert read_text_files(tmp_path, max_bytes=17) == b"first\nno newline\n"  # at a separator
    assert read_text_files(tmp_path, suffixes=(".txt",), max_bytes=25) == (
        b"first\nno newline\nx\n\n\ntwo\n"  # late_nul.txt skipped although its first bytes fit
    )
    for suffixes in (None, (".txt",), (".md",)):
        total = len(_read_text_files_before(tmp_path, suffixes))
        for cap in [None, *range(1, total + 3)]:
            expected = _read_text_files_before(tmp_path, suffixes, cap)
            assert read_text_files(tmp_path, suffixes=suffixes, max_bytes=cap) == expected, cap
    for name in ("a.txt", "b.txt", "c/nl.txt"):
        for cap in (None, 1, 5, 6, 9, 10, 11, 12):
            expected = _read_text_files_before(tmp_path / name, max_bytes=cap)
            assert read_text_files(tmp_path / name, max_bytes=cap) == expected, (name, cap)


def test_read_text_files_does_not_read_a_big_file_whole(tmp_path: Path):
    line = b"the quick brown fox jumps over the lazy dog\n"
    big = tmp_path / "a_big.txt"
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(line * (1 << 14))  # 48 x 704 KiB: a 33 MiB file
    size = big.stat().st_size
    (tmp_path / "b_small.txt").write_bytes(b"small file\n")

    def read_traced(**kwargs) -> tuple[bytes, int]:
        tracemalloc.start()
        try:
            blob = read_text_files(tmp_path, **kwargs)
            return blob, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    blob, peak = read_traced(max_bytes=1000)
    assert blob == (line * 23)[:1000]
    assert peak < 4 << 20 < size // 8  # reading the file whole peaks above its size
    # a NUL byte at the very end still makes the whole file binary, without reading it whole
    with open(big, "ab") as f:
        f.write(b"\x00")
    blob, peak = read_traced(max_bytes=1000)
    assert blob == b"small file\n"
    assert peak < 4 << 20


# ----------------------------------------------------------------------------------- HF datasets


def test_hf_text_dataset_without_datasets_package(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="Hugging Face `datasets` package"):
        hf_text_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_text_dataset(tmp_path / "nope")


def test_hf_text_dataset_reads_saved_dict(tmp_path: Path, monkeypatch):
    rows = [{"text": "alpha beta"}, {"text": "gamma"}]
    fake = types.ModuleType("datasets")
    seen = {}

    def load_from_disk(path):
        seen["path"] = path
        return {"validation": [{"text": "x"}], "train": rows}

    fake.load_from_disk = load_from_disk  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ds = hf_text_dataset(tmp_path, split="all", seq_len=4, max_bytes=None)
    assert seen["path"] == str(tmp_path)
    assert bytes(ds.tokens.tolist()) == b"alpha beta\ngamma\n"
    with pytest.raises(ValueError, match="not in the saved splits"):
        hf_text_dataset(tmp_path, hf_split="test")
    with pytest.raises(ValueError, match="text_field 'content' not in"):
        hf_text_dataset(tmp_path, text_field="content", split="all", seq_len=2)


def test_hf_text_dataset_real_save_to_disk_folders(tmp_path: Path):
    """The real ``datasets`` package (the ``[data]`` extra): a Dataset and a DatasetDict written
    with ``save_to_disk`` from the standard library's own source text, read back byte for byte."""
    import datasets  # the [data] extra; a missing install fails here, not silently skips

    sources = sorted(stdlib_source_dir().glob("*.py"))[:3]
    texts = [p.read_text(encoding="utf-8") for p in sources]
    expected = b"".join(t.encode("utf-8") + b"\n" for t in texts)

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"content": texts, "n": list(range(3))}).save_to_disk(str(single))
    ds = hf_text_dataset(single, split="all", text_field="content", seq_len=16, max_bytes=None)
    assert bytes(ds.tokens.tolist()) == expected
    # the same split rule as text_corpus: train + val are the whole blob, in order
    train = hf_text_dataset(single, split="train", text_field="content", seq_len=16, max_bytes=None)
    val = hf_text_dataset(single, split="val", text_field="content", seq_len=16, max_bytes=None)
    assert bytes(train.tokens.tolist()) + bytes(val.tokens.tolist()) == expected
    capped = hf_text_dataset(single, split="all", text_field="content", seq_len=16, max_bytes=100)
    assert bytes(capped.tokens.tolist()) == expected[:100]
    with pytest.raises(TypeError, match="column 'n' must hold strings"):
        hf_text_dataset(single, split="all", text_field="n", seq_len=2)
    with pytest.raises(ValueError, match="text_field 'text' not in the dataset's columns"):
        hf_text_dataset(single, split="all", seq_len=2)

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": ["held out"]}),
            "train": datasets.Dataset.from_dict({"text": texts}),
        }
    ).save_to_disk(str(both))
    assert bytes(hf_text_dataset(both, split="all", max_bytes=None).tokens.tolist()) == expected
    held = hf_text_dataset(both, split="all", hf_split="validation", seq_len=2, max_bytes=None)
    assert bytes(held.tokens.tolist()) == b"held out\n"
    with pytest.raises(ValueError, match="not in the saved splits"):
        hf_text_dataset(both, hf_split="test")


_TRAIN_ROWS = [f"train row {i}" for i in range(8)]
_VAL_ROWS = ["held out one", "held out two"]


def _lines(rows: list[str]) -> bytes:
    return b"".join(r.encode() + b"\n" for r in rows)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny ``save_to_disk`` folders: a Dataset, DatasetDicts with and without train/validation."""
    import datasets

    root = tmp_path_factory.mktemp("hf")
    train = datasets.Dataset.from_dict({"text": _TRAIN_ROWS})
    val = datasets.Dataset.from_dict({"text": _VAL_ROWS})
    test = datasets.Dataset.from_dict({"text": ["test row one", "test row two"]})
    train.save_to_disk(str(root / "plain"))
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(root / "train_val"))
    datasets.DatasetDict({"train": train}).save_to_disk(str(root / "train_only"))
    datasets.DatasetDict({"test": test, "validation": val}).save_to_disk(str(root / "no_train"))
    return root


@pytest.mark.parametrize("max_bytes", [0, -1])
def test_hf_text_dataset_refuses_a_non_positive_max_bytes(hf_folders: Path, max_bytes: int):
    with pytest.raises(ValueError, match="max_bytes must be positive or None"):
        hf_text_dataset(hf_folders / "plain", seq_len=4, max_bytes=max_bytes)


def test_gpt2_example_refuses_a_non_positive_max_bytes(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "gpt2_glu_vs_mlp.py"
    spec = importlib.util.spec_from_file_location("_gpt2_example_for_test_data", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for value in ("0", "-5"):
        with pytest.raises(SystemExit) as info:
            example.parse_args(["--max-bytes", value])
        assert info.value.code == 2
        assert f"--max-bytes must be positive, got {value}" in capsys.readouterr().err
    assert example.parse_args(["--max-bytes", "123"]).max_bytes == 123
    assert example.parse_args([]).max_bytes is None


def test_hf_dataset_dict_uses_its_own_validation_split(hf_folders: Path):
    train_bytes, val_bytes = _lines(_TRAIN_ROWS), _lines(_VAL_ROWS)
    cut = round(len(train_bytes) * 0.9)

    def read(folder: str, split: str, **kw) -> bytes:
        kw = {"seq_len": 4, "max_bytes": None, **kw}
        return bytes(hf_text_dataset(hf_folders / folder, split=split, **kw).tokens.tolist())

    # a saved "validation" split is the validation data; "train" and "all" are the whole train
    assert read("train_val", "val") == val_bytes
    assert read("train_val", "train") == train_bytes
    assert read("train_val", "all") == train_bytes
    assert read("train_val", "val", seq_len=2, max_bytes=5) == val_bytes[:5]  # capped as well
    # a named hf_split is one corpus, divided by val_fraction as before
    assert read("train_val", "val", hf_split="train") == train_bytes[cut:]
    assert read("train_val", "train", hf_split="validation", seq_len=2) == val_bytes[:23]
    # without a validation split: the tail of train, as for a plain Dataset
    assert read("train_only", "val") == read("plain", "val") == train_bytes[cut:]
    assert read("train_only", "train") == read("plain", "train") == train_bytes[:cut]


def test_hf_dataset_dict_without_train_split_needs_hf_split(hf_folders: Path):
    with pytest.raises(ValueError, match=r"has no 'train' split \(its splits: ") as info:
        hf_text_dataset(hf_folders / "no_train", seq_len=4)
    assert "'test'" in str(info.value) and "'validation'" in str(info.value)
    assert "hf_split" in str(info.value)
    ds = hf_text_dataset(hf_folders / "no_train", split="all", hf_split="test", seq_len=4)
    assert bytes(ds.tokens.tolist()) == b"test row one\ntest row two\n"


# ----------------------------------------------------------------------------------- CIFAR-10


def _fake_cifar(root: Path, n_per_batch: int = 4) -> dict[str, np.ndarray]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        arrays[name] = data
        arrays[name + "_labels"] = np.asarray(labels)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return arrays


def test_cifar10_from_fake_binary_folder(tmp_path: Path):
    arrays = _fake_cifar(tmp_path)
    train = cifar10_dataset(tmp_path, "train", verify_md5=False)
    test = cifar10_dataset(tmp_path, "test", verify_md5=False, normalize=False)
    x, y = train.tensors
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    raw = arrays["data_batch_1"][0].reshape(3, 32, 32).astype(np.float32) / 255.0
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CIFAR10_STD, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(x[0].numpy(), (raw - mean) / std, rtol=1e-6, atol=1e-6)
    assert y[:4].tolist() == arrays["data_batch_1_labels"].tolist()
    np.testing.assert_allclose(
        test.tensors[0][1].numpy(),
        arrays["test_batch"][1].reshape(3, 32, 32).astype(np.float32) / 255.0,
    )
    assert len(cifar10_dataset(tmp_path, "val", verify_md5=False, limit=3)) == 3


def test_cifar10_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 at"):
        cifar10_dataset(tmp_path)
    _fake_cifar(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing files or corrupted"):
        cifar10_dataset(tmp_path)  # md5 of the fake files does not match torchvision's
    with pytest.raises(ValueError, match="split must be one of"):
        cifar10_dataset(tmp_path, "all")


def test_cifar10_refuses_a_limit_that_is_not_a_positive_int(tmp_path: Path):
    _fake_cifar(tmp_path)
    for limit in (0, -3, 2.5, True, "3"):
        with pytest.raises(ValueError, match="limit must be a positive int or None"):
            cifar10_dataset(tmp_path, verify_md5=False, limit=limit)  # type: ignore[arg-type]
    assert len(cifar10_dataset(tmp_path, verify_md5=False, limit=np.int64(3))) == 3
    assert len(cifar10_dataset(tmp_path, verify_md5=False, limit=10**9)) == 20


@pytest.mark.parametrize("verify_md5", [False, True])
@pytest.mark.parametrize("missing", ["data_batch_5", "batches.meta"])
def test_cifar10_names_a_missing_file(tmp_path: Path, verify_md5: bool, missing: str):
    _fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"is incomplete: .* lacks {missing} \(") as info:
        cifar10_dataset(tmp_path, "test", verify_md5=verify_md5)
    assert "verify_md5" not in str(info.value)  # it would not help


# ----------------------------------------------------------------------------------- two-layer


def test_two_layer_regression_splits_and_target():
    from glu_probe._rng import stream_seed
    from glu_probe.theory import make_target

    train = two_layer_regression("train", d=5, n_train=40, n_val=24, seed=2)
    val = two_layer_regression("val", d=5, n_train=40, n_val=24, seed=2)
    X = torch.cat([train.tensors[0], val.tensors[0]]).double()
    y = torch.cat([train.tensors[1], val.tensors[1]]).squeeze(1).double()
    assert train.tensors[0].shape == (40, 5) and val.tensors[1].shape == (24, 1)
    g = torch.Generator().manual_seed(stream_seed(2, 3, 0))  # the documented input stream
    X_direct = torch.randn(64, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(X, X_direct.float().double())
    y_direct = make_target(X_direct, "teacher", seed=stream_seed(2, 3, 1))
    torch.testing.assert_close(y, y_direct.float().double())
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1) < 1e-5


def test_lm_probe_batch_has_distinct_first_bytes():
    from glu_probe.data import lm_probe_batch

    data = b"aaab" * 3 + b"xyzw" * 4
    ds = ByteWindowDataset(data, seq_len=4, stride=1)
    x, y = lm_probe_batch(ds, 3)
    firsts = x[:, 0].tolist()
    assert len(set(firsts)) == 3 and firsts == [ord("a"), ord("b"), ord("x")]
    # each row is the dataset window it came from (first occurrence, dataset order)
    starts = [data.index(bytes([f])) for f in firsts]
    for row, s in zip(x.tolist(), starts, strict=True):
        assert bytes(row) == data[s : s + 4]
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    with pytest.raises(ValueError, match="only 6 windows with distinct first bytes"):
        lm_probe_batch(ds, 7)
    with pytest.raises(ValueError, match=r"n must lie in \[1, 256\]"):
        lm_probe_batch(ds, 0)
