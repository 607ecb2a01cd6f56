"""Offline datasets for the demo and the examples.

Everything here works without a network:

* :func:`digits_dataset`: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
  resized to ``image_size`` and standardised with the *training* split's mean and std.
* :func:`text_corpus`: a byte-level language-modelling dataset of fixed-length windows cut from a
  folder of text files. The default folder is the Python standard library's own source tree
  (``sysconfig.get_paths()["stdlib"]``), which every Python installation has.
* :func:`cifar10_dataset`: CIFAR-10 through torchvision, for users who have the
  ``cifar-10-batches-py`` folder locally (``download=False``; a clear error if it is missing).
* :func:`hf_text_dataset`: a Hugging Face ``datasets`` dataset saved with ``save_to_disk``, turned
  into the same byte-level windows (optional import).

All splits are deterministic: the same arguments give the same tensors, in the same order.
"""

from __future__ import annotations

import numbers
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from glu_probe._rng import stream_seed

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "ByteWindowDataset",
    "cifar10_dataset",
    "digits_dataset",
    "hf_text_dataset",
    "lm_probe_batch",
    "read_text_files",
    "stdlib_source_dir",
    "text_corpus",
    "two_layer_regression",
]

_SPLITS = ("train", "val", "all")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _check_split(split: str, allowed: Sequence[str] = _SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def digits_dataset(
    split: str = "train",
    *,
    image_size: int = 16,
    val_fraction: float = 0.25,
    seed: int = 0,
    flatten: bool = False,
) -> TensorDataset:
    """scikit-learn's digits as a ``TensorDataset`` of ``(image, label)``.

    The 8x8 images (pixel values 0..16) are resized to ``image_size x image_size`` with bilinear
    interpolation (``image_size=8`` keeps them as they are), then standardised as
    ``(x - mean) / std`` with the scalar mean and std of the *training* split, so that ``train``
    and ``val`` share one transform. The split is a fixed permutation drawn from
    ``numpy.random.RandomState(seed)``: the first ``round(n * (1 - val_fraction))`` images are the
    training split, the rest validation.

    Args:
        split: ``"train"``, ``"val"`` or ``"all"``.
        image_size: side of the returned images (>= 8).
        val_fraction: fraction of images held out for validation; one that rounds to an empty
            training or validation split is refused.
        seed: seed of the split permutation.
        flatten: return images as vectors of ``image_size**2`` values instead of ``(1, H, W)``.

    Returns:
        ``TensorDataset(images float32 (N, 1, S, S) or (N, S*S), labels int64 (N,))``.
    """
    _check_split(split)
    _check_fraction(val_fraction)
    if int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "digits_dataset needs scikit-learn: pip install 'glu-probe[data]'"
        ) from err

    bunch = load_digits()
    images = torch.as_tensor(np.asarray(bunch.images), dtype=torch.float32).unsqueeze(1)
    labels = torch.as_tensor(np.asarray(bunch.target), dtype=torch.int64)
    if int(image_size) != 8:
        images = torch.nn.functional.interpolate(
            images, size=(int(image_size), int(image_size)), mode="bilinear", align_corners=False
        )
    n = images.shape[0]
    n_train = round(n * (1.0 - float(val_fraction)))
    if not 0 < n_train < n:
        raise ValueError(
            f"val_fraction={val_fraction!r} leaves {n_train} training and {n - n_train} "
            f"validation images (of {n}); both splits must be non-empty"
        )
    perm = torch.as_tensor(np.random.RandomState(seed).permutation(n))
    train_idx, val_idx = perm[:n_train], perm[n_train:]
    train_images = images[train_idx]
    mean, std = train_images.mean(), train_images.std()
    idx = {"train": train_idx, "val": val_idx, "all": perm}[split]
    x = (images[idx] - mean) / std
    if flatten:
        x = x.flatten(1)
    return TensorDataset(x.contiguous(), labels[idx].contiguous())


# --------------------------------------------------------------------------------------------
# byte-level text
# --------------------------------------------------------------------------------------------


def stdlib_source_dir() -> Path:
    """The Python standard library's source directory (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn"}
#: Files of the standard library's folder written for one installation, not part of the
#: library's source: ``_sysconfigdata_*.py`` (the build configuration, holding the install
#: prefix about 80 times; it sat at byte 450,416 of the demo's 1 MB corpus, so the GPT-2 pair's
#: numbers depended on where Python was installed: review, session 26), the ``config-*``
#: folder's ``python-config.py``, and site hooks a distribution may add (Debian's symlinked
#: ``sitecustomize.py``). Skipped in the default stdlib corpus only.
_INSTALL_SPECIFIC = ("_sysconfigdata", "sitecustomize.py", "usercustomize.py")


def _as_suffixes(suffixes: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``suffixes`` as a tuple; one string is one suffix (``tuple(".py")`` was ``(".", "p",
    "y")``, which read every file ending in a dot, ``p`` or ``y``: review, session 26)."""
    if suffixes is None:
        return None
    return (suffixes,) if isinstance(suffixes, str) else tuple(suffixes)


def _iter_files(
    root: Path, suffixes: str | Sequence[str] | None, stdlib: bool = False
) -> Iterable[Path]:
    # os.walk with sorted names: a deterministic order that does not depend on the file system.
    wanted = _as_suffixes(suffixes)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_DIRS
            and not d.startswith(".")
            and not (stdlib and d.startswith("config-"))
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if wanted is not None and not name.endswith(wanted):
                continue
            if stdlib and name.startswith(_INSTALL_SPECIFIC):
                continue
            yield Path(dirpath) / name


_SCAN_CHUNK = 1 << 20


def _read_text_prefix(file: Path, limit: int | None) -> bytes | None:
    """The first ``limit`` bytes of ``file`` (all of it for ``None``); ``None`` for a file that is
    empty, cannot be read, or holds a NUL byte anywhere, also past ``limit`` (a binary file)."""
    try:
        with open(file, "rb") as f:
            data = f.read() if limit is None else f.read(limit)
            if not data or b"\x00" in data:
                return None
            if limit is not None and len(data) == limit:
                # More may follow: scan it for a NUL byte without keeping it.
                while chunk := f.read(_SCAN_CHUNK):
                    if b"\x00" in chunk:
                        return None
    except OSError:
        return None
    return data


def read_text_files(
    path: str | os.PathLike[str],
    *,
    suffixes: str | Sequence[str] | None = None,
    max_bytes: int | None = 4_000_000,
) -> bytes:
    """Concatenate the text files under ``path`` (a folder or one file) into one byte string.

    Files are visited in sorted order (directories ``site-packages``, ``__pycache__`` and hidden
    ones are skipped; in the standard library's folder, also the files one installation writes
    there: ``_sysconfigdata_*.py``, ``config-*/``, ``sitecustomize.py``). Empty or unreadable
    files and files containing a NUL byte anywhere are skipped (the latter as binary), and each
    file not ending in a newline is followed by one.
    Reading stops once ``max_bytes`` bytes have been collected (the result is cut at exactly
    ``max_bytes``); ``None`` reads everything.

    Memory stays near ``max_bytes`` whatever the file sizes: at most the remaining budget is read
    from each file, and the rest of the file in which the cut falls is only scanned for a NUL
    byte, in 1 MiB chunks that are not kept.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"text corpus path {str(root)!r} does not exist")
    if max_bytes is not None and int(max_bytes) <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    budget = None if max_bytes is None else int(max_bytes)
    stdlib = not root.is_file() and root.resolve() == stdlib_source_dir().resolve()
    files = [root] if root.is_file() else list(_iter_files(root, suffixes, stdlib=stdlib))
    chunks: list[bytes] = []
    total = 0
    for file in files:
        data = _read_text_prefix(file, None if budget is None else budget - total)
        if data is None:
            continue
        chunks.append(data)
        total += len(data)
        if budget is not None and total >= budget:
            break  # the cut falls inside or at the end of this file: no separator
        if not data.endswith(b"\n"):
            chunks.append(b"\n")
            total += 1
            if budget is not None and total >= budget:
                break
    blob = b"".join(chunks)
    if not blob:
        what = f" with suffixes {_as_suffixes(suffixes)}" if suffixes else ""
        raise ValueError(f"no readable text files{what} under {str(root)!r}")
    return blob


class ByteWindowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Next-byte prediction windows over a byte string.

    Item ``i`` is ``(x, y)`` with ``x = data[s : s + seq_len]`` and ``y = data[s + 1 : s + seq_len
    + 1]`` as int64 tensors of byte values (0..255), where ``s = i * stride``. The vocabulary is the
    256 byte values, so no tokenizer is needed.
    """

    vocab_size = 256

    def __init__(self, data: bytes | torch.Tensor, seq_len: int, stride: int | None = None):
        if int(seq_len) < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        stride = int(seq_len) if stride is None else int(stride)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if isinstance(data, torch.Tensor):
            tokens = data.to(torch.int64).flatten()
        elif len(data) == 0:  # (torch.frombuffer refuses an empty buffer with its own text)
            tokens = torch.zeros(0, dtype=torch.int64)
        else:
            tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        if tokens.numel() < int(seq_len) + 1:
            raise ValueError(
                f"text of {tokens.numel()} bytes is too short for one window of seq_len={seq_len} "
                "(needs seq_len + 1 bytes); give more text or a smaller seq_len"
            )
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.stride = stride

    def __len__(self) -> int:
        return (self.tokens.numel() - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        s = index * self.stride
        return self.tokens[s : s + self.seq_len], self.tokens[s + 1 : s + self.seq_len + 1]


def _split_bytes(blob: bytes, split: str, val_fraction: float) -> bytes:
    # A contiguous tail split: windows of the two splits never share bytes.
    _check_split(split)
    _check_fraction(val_fraction)
    cut = round(len(blob) * (1.0 - float(val_fraction)))
    return {"train": blob[:cut], "val": blob[cut:], "all": blob}[split]


def text_corpus(
    path: str | os.PathLike[str] | None = None,
    *,
    split: str = "train",
    seq_len: int = 64,
    stride: int | None = None,
    val_fraction: float = 0.1,
    max_bytes: int | None = 2_000_000,
    suffixes: str | Sequence[str] | None = None,
) -> ByteWindowDataset:
    """A byte-level language-modelling dataset from a folder of text files.

    The files under ``path`` are read in sorted order (see :func:`read_text_files`), capped at
    ``max_bytes`` bytes, and cut into a contiguous training part (the first
    ``1 - val_fraction`` of the bytes) and validation part (the rest). Each part becomes a
    :class:`ByteWindowDataset` of windows of ``seq_len`` bytes, ``stride`` apart (default:
    non-overlapping).

    Args:
        path: a folder (or one file) of text. ``None`` uses the Python standard library's source
            files (``*.py`` under ``sysconfig.get_paths()["stdlib"]``, without the files written
            for one installation, such as ``_sysconfigdata_*.py``: the corpus depends on the
            Python version, not on where it is installed).
        split: ``"train"``, ``"val"`` or ``"all"``.
        seq_len: window length in bytes.
        stride: distance between window starts (default ``seq_len``).
        val_fraction: fraction of the bytes held out for validation (the tail).
        max_bytes: cap on the number of bytes read (``None``: no cap).
        suffixes: only files whose names end with one of these (one string: that suffix;
            default: ``(".py",)`` for the standard library, every file otherwise).
    """
    if path is None:
        path = stdlib_source_dir()
        suffixes = (".py",) if suffixes is None else suffixes
    blob = read_text_files(path, suffixes=suffixes, max_bytes=max_bytes)
    part = _split_bytes(blob, split, val_fraction)
    return ByteWindowDataset(part, seq_len=seq_len, stride=stride)


def hf_text_dataset(
    path: str | os.PathLike[str],
    *,
    split: str = "train",
    hf_split: str | None = None,
    text_field: str = "text",
    seq_len: int = 64,
    stride: int | None = None,
    val_fraction: float = 0.1,
    max_bytes: int | None = 2_000_000,
) -> ByteWindowDataset:
    """Byte-level windows from a Hugging Face ``datasets`` dataset saved locally.

    ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
    (loaded with ``datasets.load_from_disk``; nothing is downloaded). The ``text_field`` column is
    UTF-8 encoded, rows are joined with newlines and capped at ``max_bytes``, then windowed
    exactly as in :func:`text_corpus`. Which rows make up ``split``:

    * a ``Dataset``: its bytes are split as in :func:`text_corpus`: ``"train"`` is the first
      ``1 - val_fraction`` of them, ``"val"`` the tail, ``"all"`` everything.
    * a ``DatasetDict`` with ``hf_split`` given: that one split, divided the same way.
    * a ``DatasetDict`` without ``hf_split``: it must have a ``"train"`` split (otherwise a
      ``ValueError`` lists its splits; name one with ``hf_split``). If it also has a
      ``"validation"`` split (only that name: not ``"valid"``, ``"val"`` or ``"test"``),
      ``"val"`` is the whole ``validation`` split and ``"train"`` and ``"all"`` are the whole
      ``train`` split (``val_fraction`` is not used); otherwise ``train`` is divided as a
      ``Dataset`` is.

    ``max_bytes`` (positive, or ``None`` for no cap) caps the bytes read from the chosen split.
    """
    _check_split(split)
    _check_fraction(val_fraction)
    if max_bytes is not None and int(max_bytes) <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"Hugging Face dataset folder {str(root)!r} does not exist")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "hf_text_dataset needs the Hugging Face `datasets` package (the [data] extra: "
            "pip install 'glu-probe[data]'); "
            "or pass a plain folder of text files to text_corpus()"
        ) from err
    loaded: Any = datasets.load_from_disk(str(root))
    own_val = False  # the DatasetDict's own validation split serves split="val"
    if isinstance(loaded, dict):  # a DatasetDict (a dict subclass)
        keys = list(loaded.keys())
        if not keys:
            raise ValueError(f"the DatasetDict at {str(root)!r} has no splits")
        if hf_split is not None:
            if hf_split not in keys:
                raise ValueError(f"hf_split {hf_split!r} not in the saved splits {keys}")
            loaded = loaded[hf_split]
        elif "train" not in keys:
            raise ValueError(
                f"the DatasetDict at {str(root)!r} has no 'train' split (its splits: {keys}); "
                "pass hf_split=<name> to use one of them"
            )
        else:
            own_val = "validation" in keys
            loaded = loaded["validation" if own_val and split == "val" else "train"]
    blob = _hf_text_bytes(loaded, text_field, max_bytes)
    part = blob if own_val else _split_bytes(blob, split, val_fraction)
    return ByteWindowDataset(part, seq_len=seq_len, stride=stride)


def _hf_text_bytes(dataset: Any, text_field: str, max_bytes: int | None) -> bytes:
    # The rows' UTF-8 text, each followed by a newline, cut at max_bytes.
    columns = list(getattr(dataset, "column_names", []) or [])
    if columns and text_field not in columns:
        raise ValueError(f"text_field {text_field!r} not in the dataset's columns {columns}")
    chunks: list[bytes] = []
    total = 0
    for row in dataset:
        if text_field not in row:
            raise ValueError(f"text_field {text_field!r} not in the dataset row keys {sorted(row)}")
        text = row[text_field]
        if not isinstance(text, str):
            raise TypeError(f"column {text_field!r} must hold strings, got {type(text).__name__}")
        chunk = text.encode("utf-8") + b"\n"
        chunks.append(chunk)
        total += len(chunk)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)
    if max_bytes is not None:
        blob = blob[: int(max_bytes)]
    return blob


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


def cifar10_dataset(
    root: str | os.PathLike[str],
    split: str = "train",
    *,
    normalize: bool = True,
    limit: int | None = None,
    verify_md5: bool = True,
) -> TensorDataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder, as a ``TensorDataset``.

    Parsing is torchvision's (``torchvision.datasets.CIFAR10(root, download=False)``); the uint8
    HWC images are turned into float32 ``(N, 3, 32, 32)`` tensors in [0, 1], standardised per
    channel with the usual CIFAR-10 mean/std when ``normalize``. ``split`` is ``"train"`` (the
    50000 training images) or ``"val"``/``"test"`` (the 10000 test images). ``limit`` (a
    positive int, or ``None`` for all) keeps the first ``limit`` images. ``verify_md5=False``
    skips torchvision's checksum test of the batch files (for re-packed or subsampled copies in
    the same format). Either way every batch file of both splits and ``batches.meta`` must exist;
    a missing one is named in the ``FileNotFoundError``.
    """
    _check_split(split, ("train", "val", "test"))
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or int(limit) < 1
    ):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    folder = Path(root)
    base = folder / "cifar-10-batches-py"
    if not base.is_dir():
        raise FileNotFoundError(
            f"no CIFAR-10 at {str(folder)!r}: expected the folder "
            f"{str(base)!r} (extract cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html there; glu-probe never downloads)"
        )
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "cifar10_dataset needs torchvision: pip install 'glu-probe[timm]'"
        ) from err

    expected = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list]
    missing = [n for n in [*expected, CIFAR10.meta["filename"]] if not (base / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 under {str(folder)!r} is incomplete: {str(base)!r} lacks "
            f"{', '.join(missing)} (torchvision's CIFAR10 needs all of {', '.join(expected)} and "
            f"{CIFAR10.meta['filename']})"
        )

    cls: Any = CIFAR10
    if not verify_md5:

        class _UncheckedCIFAR10(CIFAR10):  # type: ignore[misc]
            # Same parser, existence checks instead of torchvision's md5 checks.
            def _check_integrity(self) -> bool:
                base = Path(self.root) / self.base_folder
                return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

            def _load_meta(self) -> None:
                import pickle

                with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                    meta = pickle.load(f, encoding="latin1")
                self.classes = meta[self.meta["key"]]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        cls = _UncheckedCIFAR10
    try:
        ds = cls(str(folder), train=(split == "train"), download=False)
    except RuntimeError as err:
        if not verify_md5:  # pragma: no cover - the files exist, checked above
            raise FileNotFoundError(f"CIFAR-10 under {str(folder)!r}: {err}") from err
        # (torchvision's own text, "You can use download=True", is left out: glu-probe never
        # downloads; review, session 24)
        raise FileNotFoundError(
            f"CIFAR-10 under {str(folder)!r} is missing files or corrupted: torchvision's md5 "
            "check of the batch files failed; pass verify_md5=False (examples: "
            "--no-verify-md5) for a re-packed or subsampled copy"
        ) from None
    data = np.asarray(ds.data)
    targets = np.asarray(ds.targets)
    if limit is not None:
        data, targets = data[: int(limit)], targets[: int(limit)]
    x = torch.as_tensor(data).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return TensorDataset(x.contiguous(), torch.as_tensor(targets, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# the paper's two-layer regression task
# --------------------------------------------------------------------------------------------


def two_layer_regression(
    split: str = "train",
    *,
    d: int = 16,
    n_train: int = 512,
    n_val: int = 512,
    target: str = "teacher",
    seed: int = 0,
) -> TensorDataset:
    """The paper's NTK-setting regression data: x ~ N(0, I_d), a scalar target per sample.

    ``n_train + n_val`` inputs and the target each come from their own stream of ``seed``
    (:func:`glu_probe._rng.stream_seed` keys ``(3, 0)`` and ``(3, 1)``, unrelated to the
    networks of :func:`glu_probe.models.two_layer_pair` and to other seeds); the target is
    :func:`glu_probe.theory.make_target` of all the inputs (``"teacher"``: a random tanh network
    plus x_1 x_2, or ``"random"`` labels), standardised jointly, then the first ``n_train`` rows
    are the training split and the rest validation. Targets have shape ``(N, 1)`` to match the
    ``out=1`` two-layer networks.
    """
    from glu_probe.theory import make_target

    _check_split(split)
    if int(d) < 1 or int(n_train) < 1 or int(n_val) < 1:
        raise ValueError(f"d, n_train and n_val must be positive, got {d}, {n_train}, {n_val}")
    g = torch.Generator().manual_seed(stream_seed(seed, 3, 0))
    X = torch.randn(int(n_train) + int(n_val), int(d), generator=g, dtype=torch.float64)
    y = make_target(X, target, seed=stream_seed(seed, 3, 1))  # type: ignore[arg-type]
    X32, y32 = X.to(torch.float32), y.to(torch.float32).unsqueeze(1)
    sl = {"train": slice(0, n_train), "val": slice(n_train, None), "all": slice(None)}[split]
    return TensorDataset(X32[sl].contiguous(), y32[sl].contiguous())


def lm_probe_batch(dataset: ByteWindowDataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` windows of ``dataset`` with pairwise distinct first bytes, as one ``(x, y)`` batch.

    Why: in a causal LM the output at position t depends on tokens 0..t only, so two probe
    sequences that share a prefix give *identical* pNTK rows for every position of the shared
    prefix, and K = J Jᵀ is then exactly singular (κ infinite). With distinct first bytes no two
    prefixes coincide, so no rows are duplicated by construction. Windows are taken in dataset
    order (deterministic); at most 256 distinct first bytes exist.
    """
    if not 1 <= int(n) <= 256:
        raise ValueError(f"n must lie in [1, 256] (one window per distinct first byte), got {n}")
    seen: set[int] = set()
    xs, ys = [], []
    for i in range(len(dataset)):
        x, y = dataset[i]
        first = int(x[0])
        if first in seen:
            continue
        seen.add(first)
        xs.append(x)
        ys.append(y)
        if len(xs) == int(n):
            return torch.stack(xs), torch.stack(ys)
    raise ValueError(f"the dataset has only {len(xs)} windows with distinct first bytes, need {n}")
