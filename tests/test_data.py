"""Offline datasets: shapes, determinism, splits and error messages against direct computation."""

from __future__ import annotations

import pickle
import sys
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


# ----------------------------------------------------------------------------------- two-layer


def test_two_layer_regression_splits_and_target():
    from glu_probe.theory import make_target

    train = two_layer_regression("train", d=5, n_train=40, n_val=24, seed=2)
    val = two_layer_regression("val", d=5, n_train=40, n_val=24, seed=2)
    X = torch.cat([train.tensors[0], val.tensors[0]]).double()
    y = torch.cat([train.tensors[1], val.tensors[1]]).squeeze(1).double()
    assert train.tensors[0].shape == (40, 5) and val.tensors[1].shape == (24, 1)
    g = torch.Generator().manual_seed(2)
    X_direct = torch.randn(64, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(X, X_direct.float().double())
    torch.testing.assert_close(y, make_target(X_direct, "teacher", seed=3).float().double())
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
