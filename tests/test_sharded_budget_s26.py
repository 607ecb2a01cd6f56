"""A ``memory_budget`` under a sharded probe (review, session 26): every rank decides alike.

Each rank plans its Lanczos memory on its own probe shard. At a budget between what the larger
and the smaller shard need, one rank used to refuse (or shrink its Krylov basis, or give up
spanning the whole space) while the other went on into the operator's collectives: the refusing
rank raised, the other died with gloo's "Connection closed by peer" (another backend hangs), or
their Lanczos runs went out of step. Now every rank raises the same ``ValueError`` (the monitor:
the same MisconfigurationException, or the same fallback to the engine's default budget), or
every rank runs the same plan and gets the exact eigenvalues of the whole probe's K.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from glu_probe.callbacks.ntk import DEFAULT_SLQ_PROBES, NTKSpectrumMonitor
from glu_probe.ntk import ProbeFunction, ntk_spectrum
from glu_probe.ntk import spectrum as spectrum_mod
from glu_probe.ntk.functional import least_memory_budget

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)"
)

STEPS = 10  # slq_steps (the engine's default)
MAX_MATVECS = 400  # the engine's default


def _net(width: int = 5) -> nn.Module:
    """The monitor's model (``width=5``: the DDP tests' net); the engine's checks take a wider
    one (``width=32``), whose K is well conditioned (κ ≈ 16 for the 39 "full" rows) so that
    a small thick-restarted basis converges λ_min in a few hundred products."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 2 * width + 6), nn.Tanh(), nn.Linear(2 * width + 6, 3))


def _inputs(width: int = 5) -> torch.Tensor:
    return torch.randn(13, width, generator=torch.Generator().manual_seed(0))


WIDE = 32


def _shards(x: torch.Tensor) -> list[torch.Tensor]:
    return [x[:7], x[7:]]  # uneven (the monitor's array_split of 13 samples on 2 ranks)


def _plans(
    model: nn.Module, shard: torch.Tensor, budget: int, output: str, block: int, slq: int, n: int
) -> tuple[tuple[int, Any, int] | None, tuple[int, Any, int] | None]:
    """One rank's own (full-span plan or None, thick-restart plan or None where refused), as
    the engine computes them on its shard alone (``n``: all ranks' rows)."""
    probe = ProbeFunction(model, shard, output=output, dtype=torch.float64)

    def plan(width: int, s: int) -> tuple[int, Any, int] | None:
        try:
            return spectrum_mod._budgeted_products(
                probe, n, width, block, min(max(MAX_MATVECS, width), n), None, budget, s, STEPS
            )
        except ValueError:
            return None

    span = None
    if slq > 0 and n <= min(2 * slq * STEPS, MAX_MATVECS):
        span = plan(spectrum_mod._full_span_block(probe, n, block), 0)
        span = span if span is not None and span[2] >= n else None
    return span, plan(block, slq)


def _least(predicate: Any, lo: int = 1, hi: int = 1 << 24) -> int:
    """The smallest budget in (lo, hi] where ``predicate`` holds (it holds from there on)."""
    assert not predicate(lo) and predicate(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if predicate(mid) else (mid, hi)
    return hi


def _boundary(case: str, model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, Any]]:
    """(a budget at which the two shards' own decisions differ, the ntk_spectrum arguments)."""
    big, small = _shards(x)
    if case == "copies":  # refuse_small_budget: the 7-sample shard's copies do not fit
        budget = least_memory_budget(model, big, None, torch.float64) - 1
        assert least_memory_budget(model, small, None, torch.float64) <= budget
        return budget, {"output": "pntk", "slq_probes": 0}
    if case == "refused":  # the thick-restart plan: refused on rank 0 only
        kw = {"output": "pntk", "block_size": 4, "slq_probes": 0}

        def fits(s: torch.Tensor) -> Any:
            return lambda b: _plans(model, s, b, "pntk", 4, 0, 13)[1] is not None

        budget = _least(fits(small))
        assert not fits(big)(budget)
        return budget, kw
    if case == "basis":  # both fit, rank 0 with a smaller Krylov basis than rank 1 (n = 39)
        kw = {"output": "full", "block_size": 2, "slq_probes": 0}

        def basis(s: torch.Tensor, b: int) -> int:
            plan = _plans(model, s, b, "full", 2, 0, 39)[1]
            return -1 if plan is None else plan[2]

        budget = _least(lambda b: basis(small, b) >= 11)
        assert 0 < basis(big, budget) < 11
        return budget, kw
    assert case == "span"  # rank 1 spans the whole space, rank 0 cannot (thick restart + SLQ)
    kw = {"output": "full", "block_size": 2, "slq_probes": 2}
    budget = _least(lambda b: _plans(model, small, b, "full", 2, 2, 39)[0] is not None)
    span, fallback = _plans(model, big, budget, "full", 2, 2, 39)
    assert span is None and fallback is not None
    return budget, kw


def _worker(rank: int, init_file: str, out: str, budget: int, kw: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=20),
    )
    result: dict[str, Any]
    try:
        model = _net(WIDE).double()
        shard = _shards(_inputs(WIDE).double())[rank]
        s = ntk_spectrum(
            model,
            shard,
            method="lanczos",
            dtype=torch.float64,
            tol=1e-8,
            memory_budget=budget,
            process_group=dist.group.WORLD,
            **kw,
        )
        result = {"ok": (s.lambda_max, s.lambda_min, s.n_rows, s.effective_rank_method)}
    except Exception as err:
        result = {"error": (type(err).__name__, str(err))}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    # (the old code's desynchronised ranks fail here: the results above tell)
    with contextlib.suppress(Exception):
        dist.barrier()  # (neither rank tears gloo down while its peer may still use it)
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # (see tests/test_ntk_operator.py: gloo's threads at interpreter exit)


def _dense_reference(output: str) -> torch.Tensor:
    """Every eigenvalue of the whole probe's K = J Jᵀ in float64 (rows: each sample's outputs
    for "full", their sum over √3 for "pntk"), from an explicit per-row Jacobian."""
    model = _net(WIDE).double()
    x = _inputs(WIDE).double()
    params = dict(model.named_parameters())

    def rows(p: dict[str, torch.Tensor]) -> torch.Tensor:
        y = torch.func.functional_call(model, p, (x,))
        return y.reshape(-1) if output == "full" else y.sum(-1) / 3**0.5

    jac = torch.func.jacrev(rows)(params)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1)
    return torch.linalg.eigvalsh((J @ J.T).detach())


@pytest.mark.parametrize("case", ["copies", "refused", "basis", "span"])
def test_sharded_budget_at_a_boundary_is_one_decision(tmp_path: Path, case: str) -> None:
    """Two gloo ranks with uneven shards (7 + 6 samples) at a budget where the shards' own
    plans differ: both raise the same ValueError, or both run one plan and get K's extreme
    eigenvalues (dense float64 reference) with identical results; no rank dies in gloo."""
    budget, kw = _boundary(case, _net(WIDE).double(), _inputs(WIDE).double())
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path), budget, kw),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    if case in ("copies", "refused"):
        assert all("error" in g for g in got), got
        (kind0, text0), (kind1, text1) = got[0]["error"], got[1]["error"]
        assert kind0 == kind1 == "ValueError", got
        assert text0 == text1, got
        assert text0.startswith(f"memory_budget={budget} bytes"), text0
        assert "rank 0's probe shard" in text0, text0
        return
    assert all("ok" in g for g in got), got
    assert got[0]["ok"] == got[1]["ok"], got  # one Lanczos iteration on both ranks
    lam_max, lam_min, n_rows, _ = got[0]["ok"]
    ref = _dense_reference(kw["output"])
    assert n_rows == ref.numel() == 39
    assert lam_max == pytest.approx(float(ref[-1]), rel=1e-9)
    assert lam_min == pytest.approx(float(ref[0]), rel=1e-7)
    if case == "span":  # rank 0's shard cannot span the whole space: neither rank does
        assert got[0]["ok"][3] != "exact", got


# ------------------------------------------------------------------------------ the monitor
class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordingMonitor(NTKSpectrumMonitor):
    """The monitor, recording the exception each rank's probe stopped with in a file (the
    launcher reports one rank's error only, and runs no ``on_exception`` in its workers)."""

    path: Path

    def _probe_and_log(self, trainer: pl.Trainer, pl_module: Any, step: int) -> None:
        try:
            super()._probe_and_log(trainer, pl_module, step)
        except BaseException as err:
            torch.save(
                {"error": (type(err).__name__, str(err))},
                self.path / f"rank{trainer.global_rank}.pt",
            )
            # The launcher stops the other ranks once one has failed: wait for them to record
            # theirs (the old code's broken group fails here, within the collective timeout).
            with contextlib.suppress(Exception):
                dist.barrier()
            raise


class Record(pl.Callback):
    """Each rank's monitor history and final parameters, where the fit completes."""

    def __init__(self, path: Path, monitor: NTKSpectrumMonitor) -> None:
        self.path, self.monitor = path, monitor

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        params = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        torch.save(
            {
                "history": self.monitor.history,
                "params": params,
                "fallback": self.monitor._unbudgeted,
            },
            self.path / f"rank{trainer.global_rank}.pt",
        )


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    return _inputs(), torch.zeros(13, 3)


def _fit(tmp: Path, monitor: RecordingMonitor) -> list[dict[str, Any]]:
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    tmp.mkdir(parents=True, exist_ok=True)
    monitor.path = tmp
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 5, generator=g), torch.randn(32, 3, generator=g))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="fork", timeout=datetime.timedelta(seconds=20)),
        max_steps=2,
        logger=False,
        callbacks=[monitor, Record(tmp, monitor)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with contextlib.suppress(Exception):  # (each rank's outcome is in its file)
        trainer.fit(Net(), DataLoader(data, batch_size=4))
    files = [tmp / f"rank{r}.pt" for r in range(2)]
    return [torch.load(f) if f.exists() else {"error": ("nothing recorded", "")} for f in files]


def _monitor_boundary() -> int:
    """A budget the monitor's probe (13 samples, float64 products, slq_probes=4: full span
    where it fits) plans on rank 1's shard and refuses on rank 0's."""
    model, (x, _) = _net(), _probe()
    big, small = _shards(x)
    slq = DEFAULT_SLQ_PROBES

    def fits(s: torch.Tensor) -> Any:
        return lambda b: any(p is not None for p in _plans(model, s, b, "pntk", 4, slq, 13))

    budget = _least(fits(small))
    assert not fits(big)(budget)
    return budget


def _monitor(**kw: Any) -> RecordingMonitor:
    return RecordingMonitor(
        every_n_steps=2, probe=_probe(), shard_probe=True, dtype=torch.float64, **kw
    )


@pytest.mark.parametrize("strict", [False, True])
def test_monitor_given_budget_refused_on_one_shard_raises_on_every_rank(
    tmp_path: Path, strict: bool
) -> None:
    """A given ``memory_budget`` that one rank's shard cannot hold: the documented
    MisconfigurationException, with the same text, on every rank (strict or not: a
    configuration error, not a skipped probe), instead of one rank's exception and the
    other's gloo "Connection closed by peer"."""
    budget = _monitor_boundary()
    mon = _monitor(strict=strict, spectrum_kwargs={"memory_budget": budget})
    got = _fit(tmp_path, mon)
    assert all("error" in g for g in got), got
    (kind0, text0), (kind1, text1) = got[0]["error"], got[1]["error"]
    assert kind0 == kind1 == MisconfigurationException.__name__, got
    assert text0 == text1, got
    assert f"memory_budget={budget} bytes" in text0


def test_monitor_default_budget_refused_on_one_shard_falls_back_on_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitor's own default budget refused on one rank's shard only: every rank falls
    back to the engine's default together (one Lanczos run on both, no gloo error), and the
    probes give the whole probe's exact eigenvalues (dense float64 reference)."""
    budget = _monitor_boundary()
    monkeypatch.setattr(NTKSpectrumMonitor, "_default_budget", lambda self, *a: budget)
    got = _fit(tmp_path, _monitor())
    assert all("history" in g for g in got), got
    assert got[0]["fallback"] == got[1]["fallback"] == {""}  # (the engine's default budget)
    assert got[0]["history"] == got[1]["history"]
    history = got[0]["history"]
    assert [h["step"] for h in history] == [0, 2]
    # The last probe ran on the final parameters (max_steps=2): check it against dense K.
    model = _net().double()
    model.load_state_dict({k: v.double() for k, v in got[0]["params"].items()})
    x = _inputs().double()
    params = dict(model.named_parameters())
    jac = torch.func.jacrev(
        lambda p: torch.func.functional_call(model, p, (x,)).sum(-1) / 3**0.5  # (pntk rows)
    )(params)
    J = torch.cat([j.reshape(13, -1) for j in jac.values()], dim=1)
    ref = torch.linalg.eigvalsh((J @ J.T).detach())
    assert history[-1]["ntk/lambda_max"] == pytest.approx(float(ref[-1]), rel=1e-9)
    assert history[-1]["ntk/lambda_min"] == pytest.approx(float(ref[0]), rel=1e-7)
