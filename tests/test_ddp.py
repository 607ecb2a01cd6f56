"""NTKSpectrumMonitor under DDP on CPU (gloo, 2 processes).

Single process: batches of 8. DDP: batches of 4 per rank with Lightning's DistributedSampler
(no shuffle), so step k sees the same 8 samples and the averaged gradient equals the
single-process one up to float rounding. The probes must then agree, be logged once (one CSV row
per probe), and the sharded probe (each rank holds half of the probe batch, Jᵀv all-reduced) must
equal the unsharded one.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics import MeanAbsoluteError

from glu_probe.callbacks.gap import GeneralizationGapMonitor
from glu_probe.callbacks.ntk import NTKSpectrumMonitor

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)"
)

METRICS = ("lambda_max", "lambda_min", "condition_number", "effective_rank")


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


class DumpHistory(pl.Callback):
    """Save every rank's monitor histories (the launcher returns no callback state)."""

    def __init__(self, path: Path, monitors: list[Any]) -> None:
        self.path = path
        self.monitors = monitors

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(
            [m.history for m in self.monitors], self.path / f"history_rank{trainer.global_rank}.pt"
        )


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(32, 5, generator=g), torch.randn(32, 3, generator=g))


class Data(pl.LightningDataModule):
    """Unshuffled DistributedSampler under DDP (Lightning's automatic one always shuffles)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def val_dataloader(self) -> DataLoader:
        # 13 samples: under DDP rank 1's shard ends with one padding sample (a repeat of
        # sample 0) that DistributedSampler adds so that both ranks have 7.
        g = torch.Generator().manual_seed(1)
        ds = TensorDataset(torch.randn(13, 5, generator=g), torch.randn(13, 3, generator=g))
        trainer = self.trainer
        assert trainer is not None
        if trainer.world_size == 1:
            return DataLoader(ds, batch_size=4)
        sampler: DistributedSampler[Any] = DistributedSampler(
            ds, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )
        return DataLoader(ds, batch_size=4, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        ds = data()
        trainer = self.trainer
        assert trainer is not None
        if trainer.world_size == 1:
            return DataLoader(ds, batch_size=self.batch_size)
        sampler: DistributedSampler[Any] = DistributedSampler(
            ds, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)


def nan_probe() -> tuple[torch.Tensor, torch.Tensor]:
    """A probe whose second shard (rank 1's last 6 of 13 samples) gives NaN outputs."""
    x = data().tensors[0][:13].clone()
    x[7:] = float("nan")
    return x, torch.zeros(13, 3)


def monitors() -> list[NTKSpectrumMonitor]:
    # 13 probe samples: the sharded monitor splits them unevenly (7 + 6). Float64 products:
    # sharding changes only the summation order of the all-reduced Jᵀv, a change float64 keeps
    # at ~ε₆₄·κ; in float32 the two runs' λ_min may differ by up to ε₃₂·κ (κ ≈ 1.4e4 here: about
    # 1e-3, the size of the reported rounding bound), which would hide a real sharding error.
    kw: dict[str, Any] = {"every_n_steps": 2, "probe_size": 13, "method": "lanczos"}
    return [
        NTKSpectrumMonitor(prefix="ntk", dtype=torch.float64, **kw),
        NTKSpectrumMonitor(prefix="ntks", dtype=torch.float64, shard_probe=True, **kw),
        # Only rank 1's shard is non-finite: every rank must skip together (no rank left
        # waiting in a collective), and training goes on.
        NTKSpectrumMonitor(every_n_steps=2, probe=nan_probe(), prefix="nan", shard_probe=True),
    ]


def fit(tmp: Path, devices: int, batch_size: int) -> list[list[list[dict[str, Any]]]]:
    """Per rank, per monitor (plain, sharded, NaN probe, generalization gap): the history."""
    torch.manual_seed(0)
    model = Net()
    gap = GeneralizationGapMonitor(
        loss_fn=nn.functional.mse_loss, metrics={"mae": MeanAbsoluteError()}
    )
    mons = [*monitors(), gap]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        max_steps=4,
        logger=CSVLogger(tmp, name="csv"),
        callbacks=[*mons, DumpHistory(tmp, mons)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=Data(batch_size))
    return [torch.load(tmp / f"history_rank{r}.pt") for r in range(devices)]


def test_ddp_equals_single_process_logged_once_and_sharded_equals_unsharded(tmp_path):
    torch.set_num_threads(1)
    single = fit(tmp_path / "single", devices=1, batch_size=8)[0]
    ranks = fit(tmp_path / "ddp", devices=2, batch_size=4)

    # Every rank holds the same (broadcast / all-reduced) history.
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0, equal_nan=True)
    plain, sharded, nan, gap = ranks[0]
    assert nan == [] and single[2] == []
    # The gap monitor (one validation, at the end of the epoch): the val side covers each of
    # the 13 samples once, as one process does, the padding sample of rank 1 left out (it
    # moved the val loss by 3.9% before), and the training subset is sized to 13 on both.
    assert [h["step"] for h in gap] == [h["step"] for h in single[3]]
    assert len(gap) == 1
    for key in ("gap/loss", "gap/train/loss", "gap/val/loss", "gap/mae", "gap/val/mae"):
        assert gap[0][key] == pytest.approx(single[3][0][key], rel=1e-5, abs=1e-7), key
    assert [h["step"] for h in plain] == [h["step"] for h in sharded] == [0, 2, 4]

    for ref, got, got_sh in zip(single[0], plain, sharded, strict=True):
        for name in METRICS:
            # DDP vs one process: the trained parameters differ by the rounding of the averaged
            # gradients (float32 training), which moves λ_min by about √κ·ε₃₂ relative.
            assert got[f"ntk/{name}"] == pytest.approx(ref[f"ntk/{name}"], rel=1e-4), name
            # Sharded vs unsharded: the same parameters, only the summation order differs.
            assert got_sh[f"ntks/{name}"] == pytest.approx(got[f"ntk/{name}"], rel=1e-8), name

    # Logged once: one CSV row per probe and monitor, only rank 0 writes.
    csv_files = list((tmp_path / "ddp").rglob("metrics.csv"))
    assert len(csv_files) == 1
    with open(csv_files[0]) as fh:
        rows = list(csv.DictReader(fh))
    for prefix, hist in (("ntk", plain), ("ntks", sharded)):
        logged = [r for r in rows if r.get(f"{prefix}/lambda_max")]
        assert [int(r["step"]) for r in logged] == [0, 2, 4]
        for r, h in zip(logged, hist, strict=True):
            assert float(r[f"{prefix}/lambda_max"]) == pytest.approx(h[f"{prefix}/lambda_max"])
    assert not any(r.get("nan/lambda_max") for r in rows)


def _fit_sharded(tmp: Path, mons: list[NTKSpectrumMonitor]) -> list[list[list[dict[str, Any]]]]:
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=4,
        logger=False,
        callbacks=[*mons, DumpHistory(tmp, mons)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(Net(), datamodule=Data(4))
    return [torch.load(tmp / f"history_rank{r}.pt") for r in range(2)]


def test_sharded_probe_oom_on_one_rank_mid_iteration(tmp_path, monkeypatch):
    """Rank 1 runs out of memory in its 3rd local Jᵀv product, in the middle of a Lanczos run
    (``slq_probes=0``: the 13-row probe converges in 4-column blocks instead of being spanned
    in one 13-column product).

    Every rank must learn of it before the all-reduce (no rank left waiting, no later product
    paired with a stale one), halve the chunk together and redo the probe, so the series equals
    the undisturbed one. An OOM that persists after the halving raises on every rank with
    ``strict=True`` instead of hanging.
    """
    from glu_probe.ntk import operator as op_mod

    torch.set_num_threads(1)
    mon = lambda **kw: NTKSpectrumMonitor(  # noqa: E731
        every_n_steps=2,
        probe_size=13,
        method="lanczos",
        shard_probe=True,
        dtype=torch.float64,
        spectrum_kwargs={"slq_probes": 0},
        **kw,
    )
    clean = _fit_sharded(tmp_path / "clean", [mon()])

    real = op_mod.NTKOperator._local_vjp
    state = {"calls": 0, "persistent": False}

    def flaky(self, *args, **kwargs):
        if dist.get_rank() == 1 and self.process_group is not None:
            state["calls"] += 1
            if state["calls"] == 3 or (state["persistent"] and state["calls"] > 3):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. (injected on rank 1)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(op_mod.NTKOperator, "_local_vjp", flaky)
    hurt = _fit_sharded(tmp_path / "oom", [mon()])
    torch.testing.assert_close(hurt[0], hurt[1], rtol=0, atol=0)
    assert [h["step"] for h in hurt[0][0]] == [0, 2, 4]
    for ref, got in zip(clean[0][0], hurt[0][0], strict=True):
        for name in METRICS:
            assert got[f"ntk/{name}"] == pytest.approx(ref[f"ntk/{name}"], rel=1e-4), name

    # Forked ranks start from this process's state: calls == 0. A persistent OOM survives the
    # halved retry, and strict=True then raises on every rank (no rank hangs in a collective).
    state["persistent"] = True
    skipped = _fit_sharded(tmp_path / "skip", [mon()])  # not strict: skipped, training goes on
    assert skipped[0] == skipped[1] == [[]]
    with pytest.raises(Exception, match="out of memory"):
        _fit_sharded(tmp_path / "strict", [mon(strict=True)])


class RankStream(torch.utils.data.IterableDataset):
    """An iterable dataset that splits its stream by rank: each rank sees other samples."""

    def __iter__(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(16):
            yield torch.randn(5, generator=g), torch.randn(3, generator=g)


def _rank0_samples(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100)
    pairs = [(torch.randn(5, generator=g), torch.randn(3, generator=g)) for _ in range(n)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def test_iterable_data_split_by_rank_gives_every_rank_rank_zeros_probe(tmp_path):
    """(Review, session 18.) With an iterable dataset that splits its stream by rank, each rank
    drew its probe (and the gap monitor its training subset) from its own stream: a sharded
    probe mixed the ranks' data, and sharded and unsharded monitors disagreed at every probe.
    Rank 0's batches are now every rank's, as for a map-style dataset."""
    from glu_probe.ntk import ntk_spectrum

    kw: dict[str, Any] = {"every_n_steps": 2, "probe_size": 6, "method": "lanczos"}
    mons = [
        NTKSpectrumMonitor(prefix="ntk", dtype=torch.float64, **kw),
        NTKSpectrumMonitor(prefix="ntks", dtype=torch.float64, shard_probe=True, **kw),
        GeneralizationGapMonitor(loss_fn=nn.functional.mse_loss, train_subset_size=6),
    ]
    torch.manual_seed(0)
    init = Net()
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=2,
        logger=False,
        callbacks=[*mons, DumpHistory(tmp_path, mons)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=1,
        val_check_interval=2,
    )
    val = DataLoader(data(), batch_size=8)
    trainer.fit(
        Net(), train_dataloaders=DataLoader(RankStream(), batch_size=4), val_dataloaders=val
    )
    ranks = [torch.load(tmp_path / f"history_rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1]
    plain, sharded, gap = ranks[0]
    x0, _ = _rank0_samples(6)
    want = ntk_spectrum(init.net, x0, method="dense")
    assert plain[0]["ntk/lambda_max"] == pytest.approx(want.lambda_max, rel=1e-9)
    for a, b in zip(plain, sharded, strict=True):
        assert b["ntks/lambda_max"] == pytest.approx(a["ntk/lambda_max"], rel=1e-9)
        assert b["ntks/condition_number"] == pytest.approx(a["ntk/condition_number"], rel=1e-6)
    assert gap and all("gap/train/loss" in h for h in gap)


class _RankShards(pl.LightningDataModule):
    """Validation shards of the user's own making (no DistributedSampler): samples r, r + 2, ...
    of 13 on rank r, so rank 0 evaluates 7 and rank 1 six."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        ds = TensorDataset(torch.randn(13, 5, generator=g), torch.randn(13, 3, generator=g))
        trainer = self.trainer
        assert trainer is not None
        rank, world = trainer.global_rank, trainer.world_size
        return DataLoader(torch.utils.data.Subset(ds, range(rank, 13, world)), batch_size=3)


class _Frozen(Net):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights fixed: one exact truth


def test_user_shards_size_one_training_subset_for_every_rank(tmp_path):
    """(Review, session 23.) Without a DistributedSampler each rank sized the training subset
    to its own validation shard (7 and 6 of 13 samples): two different subsets, and a gap of
    the wrong sign against the one-process value. The shards' total (13) sizes it now."""
    histories = []
    for devices in (1, 2):
        torch.manual_seed(0)
        gap = GeneralizationGapMonitor(loss_fn=nn.functional.mse_loss)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp_fork" if devices > 1 else "auto",
            max_steps=2,
            val_check_interval=2,
            logger=False,
            callbacks=[gap, DumpHistory(tmp_path / str(devices), [gap])],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
        )
        (tmp_path / str(devices)).mkdir()
        trainer.fit(_Frozen(), datamodule=_RankShards())
        histories.append(
            [torch.load(tmp_path / str(devices) / f"history_rank{r}.pt")[0] for r in range(devices)]
        )
    (single,), (rank0, rank1) = histories
    assert rank0 == rank1
    for key in ("gap/loss", "gap/train/loss", "gap/val/loss"):
        assert rank0[-1][key] == pytest.approx(single[-1][key], rel=1e-6), key
