"""Sizes and samples of data loaders and batches, for the monitor's training subset and its
validation side: the first loader of a collection, a loader's batch size and the samples of its
first batches read without iterating a sampler, a batch's number of samples, its first samples,
and the real (not ``DistributedSampler`` padding) samples of a rank's shard. Kept apart from the
monitor because none of it depends on the monitor's state: each takes a loader or a batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from glu_probe.callbacks._utils import items_are_batches


def _first_loader(loaders: Any) -> DataLoader | None:
    if isinstance(loaders, DataLoader):
        return loaders
    values = loaders.values() if isinstance(loaders, Mapping) else loaders
    if isinstance(values, (list, tuple)) or isinstance(loaders, Mapping):
        for v in values:
            found = _first_loader(v)
            if found is not None:
                return found
    return None


def _loader_batch_size(loader: Any) -> int | None:
    """The batch size a loader yields: ``batch_size``, else its ``batch_sampler``'s
    (``BatchSampler.batch_size``; a custom batch sampler: its mean batch, the samples over its
    length), else ``None``. Nothing is drawn from a sampler: a bucketing sampler may shuffle
    with a generator of its own, which iterating would advance (review, session 24)."""
    bs = getattr(loader, "batch_size", None)
    if bs:
        return int(bs)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None:
        return None
    bs = getattr(batch_sampler, "batch_size", None)
    if isinstance(bs, int) and bs > 0:
        return bs
    shape = _batch_sampler_shape(loader)
    return math.ceil(shape[0] / shape[1]) if shape else None


def _length(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def _batch_sampler_shape(loader: Any) -> tuple[int, int] | None:
    """``(samples, batches)`` of one pass of a loader's batch sampler (samples: its sampler's
    length, else the dataset's), read without iterating; ``None`` where either is unknown."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if batch_sampler is None:
        return None
    inner = getattr(batch_sampler, "sampler", None)
    samples = _length(inner) if inner is not None else None
    if samples is None:
        samples = _length(getattr(loader, "dataset", None))
    batches = _length(batch_sampler)
    return (samples, batches) if samples and batches else None


def _unsized_loader_samples(loader: Any, n_batches: int) -> int | None:
    """The samples in the first ``n_batches`` batches of a loader without ``batch_size``:
    a batch sampler's samples (all of them where the run evaluates every batch, else its mean
    batch times ``n_batches``), or for items that are batches the first item's size per batch.
    Nothing is drawn from a sampler (see :func:`_loader_batch_size`)."""
    try:
        if getattr(loader, "batch_sampler", None) is not None:
            shape = _batch_sampler_shape(loader)
            if shape is None:
                return None
            samples, batches = shape
            if n_batches >= batches:
                return samples
            return min(samples, n_batches * math.ceil(samples / batches))
        if items_are_batches(loader):
            dataset = loader.dataset
            n_items = min(n_batches, len(dataset))
            return n_items * _n_samples(loader.collate_fn(dataset[0])) if n_items else None
    except (TypeError, IndexError, KeyError, NotImplementedError):
        return None
    return None


def _n_samples(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            return _n_samples(v)
    if isinstance(batch, (tuple, list)) and batch:
        return _n_samples(batch[0])
    return 1


def _first_samples(batch: Any, n: int, keep: int) -> Any:
    """The first ``keep`` of the ``n`` samples of a batch, or ``None`` where its layout does not
    show which entries are samples: every tensor must have ``n`` rows in dim 0 (0-dim ones are
    kept), and a list or tuple of ``n`` plain values (strings, ids) is a per-sample list.
    Sequence-first tensors (time in dim 0) give ``None``, and the caller keeps the batch whole."""
    ok = True

    def cut(x: Any) -> Any:
        nonlocal ok
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                return x
            if x.shape[0] != n:
                ok = False
                return x
            return x[:keep]
        if isinstance(x, Mapping):
            return type(x)({k: cut(v) for k, v in x.items()})  # type: ignore[call-arg]
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
            return type(x)(*(cut(v) for v in x))
        if isinstance(x, (list, tuple)):
            plain = all(isinstance(v, (str, bytes, int, float, bool)) for v in x)
            if plain and len(x) == n:
                return type(x)(x[:keep])
            return type(x)(cut(v) for v in x)
        return x

    out = cut(batch)
    return out if ok else None


def _real_samples(loader: Any, rank: int | None = None) -> int | None:
    """Samples of a rank's shard that are not padding, or ``None`` where every sample counts.

    ``DistributedSampler(drop_last=False)`` pads the index list to a multiple of the world size
    by repeating its first indices; rank r's j-th sample sits at position r + j·W of that
    list, so it is padding exactly when r + j·W ≥ N: rank r holds ⌈(N − r)/W⌉ real samples,
    then padding (shuffled or not). ``rank``: another rank's count (default: the sampler's).
    """
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    try:
        n = len(sampler.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None
    r = sampler.rank if rank is None else rank
    return max(0, -(-(n - r) // sampler.num_replicas))
