"""NTKSpectrumMonitor with real Trainers on tiny models.

Ground truth: the NTK K = J Jᵀ of the same module on the same probe, with J from
``torch.autograd.functional.jacobian`` in float64 at the parameters of the probed step, and its
spectrum from a dense ``torch.linalg.eigvalsh``.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_bert_classifier
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import glu_probe.ntk
from glu_probe.callbacks.ntk import NTKProbeWarning, NTKSpectrumMonitor

torch.set_num_threads(1)

METRICS = (
    "lambda_max",
    "lambda_min",
    "condition_number",
    "effective_rank",
    "residual_max",
    "residual_min",
)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE, in float32 where the Trainer runs in 16 bits ("bf16-true"): torch < 2.6 has no CPU
    kernel of ``mse_loss`` for bfloat16 (added in pytorch PR #139959). Only the loss widens; the
    forward, the weights and what the monitor probes stay those of the precision trained in."""
    if out.dtype in (torch.bfloat16, torch.float16):
        out, target = out.float(), target.float()
    return nn.functional.mse_loss(out, target)


class TinyNet(pl.LightningModule):
    def __init__(self, d_in: int = 5, hidden: int = 8, d_out: int = 3, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = mse(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", mse(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoForward(TinyNet):
    forward = pl.LightningModule.forward  # type: ignore[assignment]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return mse(self.net(x), y)


class Snapshots(pl.Callback):
    """Parameters at train start (step 0) and after every optimizer step."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def _take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states[trainer.global_step] = {
            k: v.detach().clone() for k, v in pl_module.state_dict().items()
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any
    ) -> None:
        self._take(trainer, pl_module)


def make_data(n: int = 32, d_in: int = 5, d_out: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g))


def loader(ds: TensorDataset, shuffle: bool = False, batch_size: int = 8) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def trainer(**kw: Any) -> pl.Trainer:
    base: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    base.update(kw)
    return pl.Trainer(**base)


def dense_spectrum(module: nn.Module, x: torch.Tensor, output: str = "pntk") -> torch.Tensor:
    """Independent truth: eigvalsh of J Jᵀ in float64, J from autograd.functional.jacobian."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = tuple(p.detach().double() for n, p in module.named_parameters() if p.requires_grad)
    buffers = {n: b.double() for n, b in module.named_buffers()}
    was_training = module.training
    module.eval()

    def rows(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(
            module, {**buffers, **dict(zip(names, ps, strict=True))}, (x.double(),)
        )
        if output == "pntk":
            return out.sum(-1) / math.sqrt(out.shape[-1])
        return out.reshape(-1)

    jac = torch.autograd.functional.jacobian(rows, params)
    module.train(was_training)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    return torch.linalg.eigvalsh(J @ J.T)


def truth_at(state: dict[str, torch.Tensor], x: torch.Tensor, output: str = "pntk") -> torch.Tensor:
    net = TinyNet()
    net.load_state_dict(state)
    return dense_spectrum(net, x, output).double()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------- correctness
@pytest.mark.parametrize(
    ("output", "dtype", "method", "rtol"),
    [
        ("pntk", torch.float64, "dense", 1e-9),
        ("full", torch.float64, "dense", 1e-9),
        ("pntk", torch.float32, "auto", 1e-4),
    ],
)
def test_logged_values_equal_dense_eigh(tmp_path, output, dtype, method, rtol):
    torch.manual_seed(0)
    ds = make_data()
    model = TinyNet()
    snaps = Snapshots()
    mon = NTKSpectrumMonitor(
        every_n_steps=2, probe_size=12, output=output, dtype=dtype, method=method
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer(max_steps=5, callbacks=[mon, snaps], logger=logger).fit(model, loader(ds))

    x = ds.tensors[0][:12]
    rows = [r for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("ntk/lambda_max")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert [h["step"] for h in mon.history] == [0, 2, 4]
    for row, hist in zip(rows, mon.history, strict=True):
        ev = truth_at(snaps.states[hist["step"]], x, output)
        lmax, lmin = float(ev[-1]), float(ev[0])
        for source in (hist, {k: float(v) for k, v in row.items() if v}):
            assert source["ntk/lambda_max"] == pytest.approx(lmax, rel=rtol)
            assert source["ntk/lambda_min"] == pytest.approx(lmin, rel=10 * rtol)
            assert source["ntk/condition_number"] == pytest.approx(lmax / lmin, rel=10 * rtol)
            assert source["ntk/residual_max"] >= 0.0
            assert source["ntk/residual_min"] >= 0.0
        n_rows = ev.numel()
        assert 1.0 <= hist["ntk/effective_rank"] <= n_rows + 1e-9
        expected_er = float(glu_probe.ntk.effective_rank(ev))
        assert hist["ntk/effective_rank"] == pytest.approx(expected_er, rel=max(rtol, 1e-6))


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_true_precision_runs_probe_the_weights_as_trained(precision):
    """(Session 19.) Under ``"bf16-true"`` / ``"64-true"`` the weights are bf16 / float64: the
    probe (float32 by default) measures exactly those weights, widened, against float64 truth."""
    torch.manual_seed(0)
    ds = make_data()
    model, snaps = TinyNet(), Snapshots()
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=12, method="dense")
    trainer(max_steps=3, callbacks=[mon, snaps], precision=precision).fit(model, loader(ds))
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float64
    assert next(model.parameters()).dtype == dtype and [h["step"] for h in mon.history] == [0, 2]
    # the inputs as the precision plugin hands them to the model (bfloat16 under "bf16-true")
    x = ds.tensors[0][:12].to(dtype)
    for hist in mon.history:
        ev = truth_at(snaps.states[hist["step"]], x)
        assert hist["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-5)
        assert hist["ntk/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-4)


class WideNet(TinyNet):
    """16.8M float32 parameters: the probe's own copies (parameters and four parameter-sized
    vectors) exceed 256 MiB."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 4096), nn.Tanh(), nn.Linear(4096, 4096), nn.Tanh(), nn.Linear(4096, 3)
        )


def test_default_budget_grows_with_the_model():
    """The monitor's default memory_budget is the probe's own floor plus 256 MiB of workspace.
    A fixed 256 MiB (the default until 2026-11-28) refused every model above ~13M float32
    parameters with a ValueError at train start (a GPT-2-small pair on an H100)."""
    torch.manual_seed(0)
    ds = make_data(n=8)
    snaps = Snapshots()
    model = WideNet()
    assert sum(p.numel() for p in model.parameters()) * 4 * 5 > 2**28
    budgets = []
    engine = glu_probe.ntk.ntk_spectrum

    def recorded(*args, **kwargs):
        budgets.append(kwargs["memory_budget"])
        return engine(*args, **kwargs)

    for method in ("auto", "lanczos"):
        budgets.clear()
        mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=4, method=method)
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
            mp.setattr(glu_probe.ntk, "ntk_spectrum", recorded)
            warnings.simplefilter("error", NTKProbeWarning)  # no fallback to an unbounded probe
            trainer(max_steps=1, callbacks=[mon, snaps]).fit(model, loader(ds, batch_size=4))
        # the default was accepted as it is (the first version counted the float32 probe alone:
        # refused above ~11M parameters, then probed under half the free memory)
        assert len(budgets) == 2 and None not in budgets and not mon._unbudgeted
        assert [h["step"] for h in mon.history] == [0, 1]
        model.load_state_dict(snaps.states[0])  # the second fit starts where the first did
    net = WideNet()
    net.load_state_dict(snaps.states[0])
    ev = dense_spectrum(net, ds.tensors[0][:4]).double()
    assert mon.history[0]["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-5)
    assert mon.history[0]["ntk/lambda_min"] == pytest.approx(float(ev[0]), rel=1e-4)


def test_given_budget_too_small_is_a_misconfiguration_and_default_falls_back(monkeypatch):
    """A memory_budget the user gives is a cap: too small for the model, the first probe raises
    a MisconfigurationException that says so (training never starts). The default never
    refuses: where its workspace is too small (here forced to 1 byte), the probe runs under the
    engine's own default instead, and logs the true spectrum."""
    ds = make_data()
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=12, spectrum_kwargs={"memory_budget": 64})
    with pytest.raises(MisconfigurationException, match=r"spectrum_kwargs.*memory_budget=64"):
        trainer(max_steps=2, callbacks=[mon]).fit(TinyNet(), loader(ds))

    import glu_probe.callbacks.ntk as ntk_callback

    monkeypatch.setattr(ntk_callback, "DEFAULT_MEMORY_BUDGET", 1)
    torch.manual_seed(0)
    snaps = Snapshots()
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=12, method="dense")
    least = {}
    real = ntk_callback.NTKSpectrumMonitor._default_budget

    def spy(self, target, group=None):
        least["budget"] = real(self, target, group)
        return least["budget"]

    monkeypatch.setattr(ntk_callback.NTKSpectrumMonitor, "_default_budget", spy)
    budgets: list[Any] = []
    engine = glu_probe.ntk.ntk_spectrum

    def recorded(*args, **kwargs):
        budgets.append(kwargs["memory_budget"])
        return engine(*args, **kwargs)

    monkeypatch.setattr(glu_probe.ntk, "ntk_spectrum", recorded)
    with pytest.warns(NTKProbeWarning, match="default memory_budget .* too small"):
        trainer(max_steps=3, callbacks=[mon, snaps]).fit(TinyNet(), loader(ds))
    # refused once, then the engine's default, also at the next probe (no refused attempt each)
    assert budgets == [least["budget"], None, None]
    from glu_probe.ntk.functional import least_memory_budget, planned_copy_bytes

    assert (
        least["budget"]
        == 1
        + least_memory_budget(  # method="dense": the float64 probe
            TinyNet(), ds.tensors[0][:12], None, torch.float64
        )
        + planned_copy_bytes(TinyNet(), ds.tensors[0][:12], None, torch.float32)[0]
    )
    ev = truth_at(snaps.states[0], ds.tensors[0][:12])
    assert mon.history[0]["ntk/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-4)


def test_default_exact_path_is_mixed_precision_within_its_logged_bound():
    """dtype=float32 (default): float32 Jacobian rows, K in float64; truth within the residuals."""
    torch.manual_seed(0)
    ds = make_data()
    snaps = Snapshots()
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=12, method="dense")
    trainer(max_steps=3, callbacks=[mon, snaps]).fit(TinyNet(), loader(ds))
    assert [h["step"] for h in mon.history] == [0, 2]
    x = ds.tensors[0][:12]
    for hist in mon.history:
        ev = truth_at(snaps.states[hist["step"]], x)
        assert hist["ntk/residual_max"] > 0.0 and hist["ntk/residual_min"] > 0.0
        assert abs(hist["ntk/lambda_max"] - float(ev[-1])) <= hist["ntk/residual_max"]
        assert abs(hist["ntk/lambda_min"] - float(ev[0])) <= hist["ntk/residual_min"]
        assert hist["ntk/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_mixed_and_half_precision_training(precision):
    """The probe runs outside the Trainer's autocast and on float64 copies of bf16 weights: the
    logged spectrum is that of the weights as they are, in float64."""
    torch.manual_seed(0)
    ds = make_data()
    snaps = Snapshots()
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=12, dtype=torch.float64, method="dense")
    model = TinyNet()
    trainer(max_steps=3, callbacks=[mon, snaps], precision=precision).fit(model, loader(ds))
    assert [h["step"] for h in mon.history] == [0, 2]
    if precision == "bf16-true":
        assert next(model.parameters()).dtype == torch.bfloat16
    x = ds.tensors[0][:12]
    if precision == "bf16-true":
        # the inputs the model trains on: the precision plugin casts them to bfloat16
        x = x.to(torch.bfloat16)
    for hist in mon.history:
        state = {k: v.double() for k, v in snaps.states[hist["step"]].items()}
        ev = truth_at(state, x)
        assert hist["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)
        assert hist["ntk/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-8)


def test_engine_warnings_are_relayed_once_per_fit():
    """A rank-deficient probe warns at every probe inside the engine (the text changes with λ_min);
    the monitor shows it once per fit, on rank zero, with its category."""
    from glu_probe.ntk import NTKRankWarning

    torch.manual_seed(0)
    ds = make_data(n=32, d_in=2, d_out=1)
    model = TinyNet(d_in=2, hidden=2, d_out=1)  # 9 parameters, 24 rows: rank <= 9
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=24, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=3, callbacks=[mon]).fit(model, loader(ds))
    assert len(mon.history) == 4
    rank = [w for w in caught if issubclass(w.category, NTKRankWarning)]
    assert len(rank) == 1, [str(w.message) for w in rank]
    assert "shown once per fit" in str(rank[0].message)
    assert "near-null space" in str(rank[0].message)


def test_probe_in_eval_mode_with_dropout_and_user_probe():
    """Dropout is off inside the probe (eval mode); a user probe batch is used as given."""
    torch.manual_seed(1)
    ds = make_data()
    model = TinyNet(dropout=0.5)
    snaps = Snapshots()
    probe = (torch.randn(7, 5), torch.zeros(7, 3))
    mon = NTKSpectrumMonitor(every_n_steps=3, probe=probe, dtype=torch.float64, method="dense")
    trainer(max_steps=3, callbacks=[mon, snaps]).fit(model, loader(ds, shuffle=True))
    assert [h["step"] for h in mon.history] == [0, 3]
    for hist in mon.history:
        net = TinyNet(dropout=0.5)
        net.load_state_dict(snaps.states[hist["step"]])
        ev = dense_spectrum(net, probe[0])
        assert hist["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)
        assert hist["ntk/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-8)
    assert model.training  # flags restored after the probes


def test_dict_batches_and_probe_inputs():
    class DictNet(TinyNet):
        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.net(features)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.mse_loss(self(batch["features"]), batch["labels"])

    ds = make_data()
    items = [{"features": x, "labels": y} for x, y in zip(*ds.tensors, strict=True)]
    dl: DataLoader[Any] = DataLoader(items, batch_size=8)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = DictNet()
    mon = NTKSpectrumMonitor(every_n_steps=10, probe_size=6, dtype=torch.float64)
    trainer(max_steps=1, callbacks=[mon]).fit(model, dl)
    # The dict minus its label key is passed as keyword arguments: model(features=x).
    assert mon.history[0]["ntk/lambda_max"] > 0

    torch.manual_seed(0)
    plain = TinyNet()
    init = {k: v.clone() for k, v in plain.state_dict().items()}
    mon2 = NTKSpectrumMonitor(
        every_n_steps=10, probe_size=6, dtype=torch.float64, probe_inputs=lambda b: b[0][:4]
    )
    trainer(max_steps=1, callbacks=[mon2]).fit(plain, loader(ds))
    ev = truth_at(init, ds.tensors[0][:4])
    assert mon2.history[0]["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)


# ---------------------------------------------------------------------------- cadence
def test_cadence_fixed_and_accumulation():
    ds = make_data()
    mon = NTKSpectrumMonitor(every_n_steps=3, probe_size=4)
    trainer(max_steps=10, callbacks=[mon]).fit(TinyNet(), loader(ds))
    assert [h["step"] for h in mon.history] == [0, 3, 6, 9]

    # Optimizer steps, not batches: 8 batches with accumulate_grad_batches=2 = 4 steps.
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=4)
    trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[mon]).fit(TinyNet(), loader(ds))
    assert [h["step"] for h in mon.history] == [0, 2, 4]


class TwoOptimizers(TinyNet):
    """Manual optimization, two optimizers stepped each batch (a GAN's pattern): global_step
    advances by two per batch, the logged losses by one."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            loss = nn.functional.mse_loss(self(x), y)
            self.manual_backward(loss)
            opt.step()
        self.log("train_loss", loss)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        first, second = self.net[0].parameters(), self.net[3].parameters()
        return [torch.optim.SGD(first, lr=0.1), torch.optim.SGD(second, lr=0.1)]


def test_cadence_under_manual_optimization_with_two_optimizers(tmp_path):
    # A review found every_n_steps=3 probing every 6 optimizer steps (multiples of 3 skipped
    # by a global_step advancing by 2) at x = global_step, twice the loss curves' x.
    ds = make_data()
    snaps = Snapshots()
    mon = NTKSpectrumMonitor(every_n_steps=3, probe_size=6, dtype=torch.float64)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(max_epochs=3, logger=logger, log_every_n_steps=1, callbacks=[mon, snaps]).fit(
        TwoOptimizers(), loader(ds)
    )  # 12 batches, 24 optimizer steps
    assert [h["step"] for h in mon.history] == [0, 3, 6, 9, 12]
    rows = read_csv(Path(logger.log_dir) / "metrics.csv")
    loss_steps = sorted({int(r["step"]) for r in rows if r.get("train_loss")})
    ntk_steps = sorted({int(r["step"]) for r in rows if r.get("ntk/condition_number")})
    assert loss_steps == list(range(12)) and ntk_steps == [0, 3, 6, 9, 12]
    # the probe at x = k measures the parameters after k batches (global_step 2k)
    x = ds.tensors[0][:6]
    for h in mon.history[1:]:
        eig = truth_at(snaps.states[2 * h["step"]], x)
        assert h["ntk/lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-9)


def test_eval_mode_false_with_batchnorm():
    # eval_mode=False on a BatchNorm model crashed at train start: the monitor counted rows on
    # one sample, which BatchNorm in training mode rejects.
    class BN(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=6, eval_mode=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the engine warns that BatchNorm couples the samples)
        trainer(max_steps=4, callbacks=[mon]).fit(BN(), loader(make_data()))
    assert [h["step"] for h in mon.history] == [0, 2, 4]
    assert all(math.isfinite(h["ntk/lambda_max"]) for h in mon.history)


def test_auto_cadence_gives_at_least_20_probes():
    ds = make_data()
    mon = NTKSpectrumMonitor(probe_size=4)
    trainer(max_epochs=25, callbacks=[mon]).fit(TinyNet(), loader(ds))  # 100 steps
    assert mon.every_n_steps is None and mon.target_probes == 20
    assert mon._resolved_every == 100 // 20 == 5
    steps = [h["step"] for h in mon.history]
    assert steps == list(range(0, 101, 5))
    assert len(steps) == 21 >= 20  # the floor, plus the probe at step 0
    # a length that is not a multiple of the target still gets at least 20
    mon = NTKSpectrumMonitor(probe_size=4)
    trainer(max_epochs=13, callbacks=[mon]).fit(TinyNet(), loader(ds))  # 52 steps
    assert mon._resolved_every == 2 and len(mon.history) == 27 >= 20


def test_skips_sanity_check_and_fast_dev_run(monkeypatch):
    real = glu_probe.ntk.ntk_spectrum
    calls: list[tuple[bool, int]] = []
    t = trainer(max_steps=2, num_sanity_val_steps=2, limit_val_batches=1, val_check_interval=1)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append((t.sanity_checking, t.global_step))
        return real(*args, **kwargs)

    monkeypatch.setattr(glu_probe.ntk, "ntk_spectrum", spy)
    ds = make_data()
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=4)
    t.callbacks.append(mon)  # type: ignore[attr-defined]
    t.fit(TinyNet(), loader(ds), loader(ds))
    assert calls == [(False, 0), (False, 1), (False, 2)]

    calls.clear()
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=4)
    trainer(fast_dev_run=True, callbacks=[mon]).fit(TinyNet(), loader(ds), loader(ds))
    assert calls == []
    assert mon.history == []


def test_warm_start_from_previous_ritz_vectors(monkeypatch):
    real = glu_probe.ntk.ntk_spectrum
    seen: list[Any] = []
    returned: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("warm_start"))
        res = real(*args, **kwargs)
        returned.append(res)
        return res

    monkeypatch.setattr(glu_probe.ntk, "ntk_spectrum", spy)
    ds = make_data(n=64)
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=24, method="lanczos")
    trainer(max_steps=2, callbacks=[mon]).fit(TinyNet(), loader(ds))
    assert seen[0] is None
    assert returned[0].ritz_vectors is not None
    for prev, cur in zip(returned[:-1], seen[1:], strict=True):
        # the previous Ritz vectors, with the eigenvalues they came from (session 20)
        assert isinstance(cur, glu_probe.ntk.WarmStart)
        torch.testing.assert_close(cur.vectors.cpu(), prev.ritz_vectors.cpu())
        assert (cur.lambda_max, cur.lambda_min) == (prev.lambda_max, prev.lambda_min)
    assert set(mon.state_dict()["warm_start"]) == {""}


def lanczos_monitor(spectrum_kwargs: dict[str, Any]) -> NTKSpectrumMonitor:
    """Iterative path on all 96 probe rows (no max_rows cap), float64."""
    return NTKSpectrumMonitor(
        every_n_steps=2,
        probe_size=96,
        max_rows=None,
        method="lanczos",
        dtype=torch.float64,
        spectrum_kwargs=spectrum_kwargs,
    )


def test_iterative_path_logs_an_slq_effective_rank():
    """Lanczos path (λ_max only, so far from the whole space): the logged effective rank is the
    deflated-SLQ estimate, within 10% of the float64 truth at the probed parameters; with
    ``slq_probes=0`` it is not logged at all (never a NaN series)."""
    torch.manual_seed(0)
    ds = make_data(n=96)
    snaps = Snapshots()
    kw = {"which": "largest", "block_size": 2}
    mon = lanczos_monitor(kw)
    model = TinyNet(hidden=64)
    trainer(max_steps=2, callbacks=[mon, snaps]).fit(model, loader(ds))
    x = ds.tensors[0]
    for hist in mon.history:
        net = TinyNet(hidden=64)
        net.load_state_dict(snaps.states[hist["step"]])
        truth = float(glu_probe.ntk.effective_rank(dense_spectrum(net, x)))
        assert hist["ntk/effective_rank"] == pytest.approx(truth, rel=0.10)
    off = lanczos_monitor({**kw, "slq_probes": 0})
    trainer(max_steps=1, callbacks=[off]).fit(TinyNet(hidden=64), loader(ds))
    assert "ntk/effective_rank" not in off.history[0]
    assert "ntk/lambda_max" in off.history[0]


# ---------------------------------------------------------------------------- loggers
def test_tensorboard_scalars_histograms_and_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ds = make_data()
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=8, dtype=torch.float64)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(max_steps=4, callbacks=[mon], logger=logger).fit(TinyNet(), loader(ds))
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0}).Reload()
    tags = acc.Tags()
    for name in METRICS:
        events = acc.Scalars(f"ntk/{name}")
        assert [e.step for e in events] == [0, 2, 4]
        for e, h in zip(events, mon.history, strict=True):
            assert e.value == pytest.approx(h[f"ntk/{name}"], rel=1e-6)
    kappa = [e.value for e in acc.Scalars("ntk/condition_number")]
    log_kappa = [e.value for e in acc.Scalars("ntk/log10_condition_number")]
    assert log_kappa == pytest.approx([math.log10(k) for k in kappa], rel=1e-6)
    assert "ntk/spectrum" in tags["histograms"]
    assert "ntk/log10_spectrum" in tags["histograms"]
    hist = acc.Histograms("ntk/spectrum")
    assert [h.step for h in hist] == [0, 2, 4]
    assert hist[0].histogram_value.num == 8  # one entry per eigenvalue (8 pNTK rows)
    assert hist[0].histogram_value.max == pytest.approx(mon.history[0]["ntk/lambda_max"])
    # The figure: first and last probe (rendering costs more than these probes).
    assert [i.step for i in acc.Images("ntk/spectrum_figure")] == [0, 4]


def test_csv_several_loggers_and_no_logger(tmp_path):
    ds = make_data()
    tb = TensorBoardLogger(tmp_path, name="tb")
    cs = CSVLogger(tmp_path, name="csv")
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=8, log_figure=False)
    trainer(max_steps=4, callbacks=[mon], logger=[tb, cs]).fit(TinyNet(), loader(ds))
    rows = [r for r in read_csv(Path(cs.log_dir) / "metrics.csv") if r.get("ntk/lambda_max")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for r, h in zip(rows, mon.history, strict=True):
        assert float(r["ntk/condition_number"]) == pytest.approx(h["ntk/condition_number"])
    assert list(Path(tb.log_dir).glob("events.out.tfevents.*"))

    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=8)
    trainer(max_steps=4, callbacks=[mon], logger=False).fit(TinyNet(), loader(ds))
    assert [h["step"] for h in mon.history] == [0, 2, 4]


# ---------------------------------------------------------------------------- misconfiguration
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"probe_size": 0}, "probe_size"),
        ({"output": "logits"}, "output"),
        ({"method": "eigsh"}, "method"),
        ({"target_probes": 0}, "target_probes"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"probe_inputs": 3}, "probe_inputs"),
        ({"module": ""}, "module"),
        ({"dtype": torch.float16}, "dtype"),
        ({"dtype": "float77"}, "dtype"),
        ({"prefix": "ntk/"}, "prefix"),
        ({"figure_every": 0}, "figure_every"),
        ({"max_rows": 0}, "max_rows"),
        ({"spectrum_kwargs": {"tool": 1e-3}}, "'tool', which is not an argument of ntk_spectrum"),
        ({"spectrum_kwargs": {"dtype": torch.float64}}, "argument of NTKSpectrumMonitor"),
        ({"spectrum_kwargs": [("tol", 1e-3)]}, "must be a mapping"),
        # values too, not only names (they would otherwise fail at every probe)
        ({"spectrum_kwargs": {"tol": -1.0}}, "`spectrum_kwargs`: tol must be a relative accuracy"),
        ({"spectrum_kwargs": {"memory_budget": 0}}, "`spectrum_kwargs`: memory_budget must be"),
        ({"spectrum_kwargs": {"which": "top"}}, "`spectrum_kwargs`: which must be"),
        ({"spectrum_kwargs": {"slq_probes": -2}}, "`spectrum_kwargs`: slq_probes must be"),
        ({"spectrum_kwargs": {"dense_vectors": 1}}, "`spectrum_kwargs`: dense_vectors must be"),
        ({"params": 42}, "params must be None, a name or regular expression"),
        ({"params": "re:fc("}, "not a valid regular expression"),
    ],
)
def test_bad_config_raises_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        NTKSpectrumMonitor(**kwargs)


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_parameter_strategies_refused(name):
    fake_strategy = type(name, (), {})()
    fake = SimpleNamespace(strategy=fake_strategy)
    with pytest.raises(MisconfigurationException, match=f"{name}.*strategy='ddp'"):
        NTKSpectrumMonitor().setup(fake, TinyNet(), "fit")  # type: ignore[arg-type]


def test_real_fsdp_strategy_object_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    fake = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match="FSDPStrategy"):
        NTKSpectrumMonitor().setup(fake, TinyNet(), "fit")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_fsdp_trainer_refused_at_setup():
    mon = NTKSpectrumMonitor(every_n_steps=1)
    t = trainer(max_steps=1, callbacks=[mon], accelerator="cuda", strategy="fsdp")
    with pytest.raises(MisconfigurationException, match="FSDPStrategy"):
        t.fit(TinyNet(), loader(make_data()))


class DictBatches(TinyNet):
    """Trains on ``{"image", "label"}`` batches while ``forward`` takes ``x``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.mse_loss(self(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss


def test_dict_batch_keys_that_are_not_forward_arguments_get_a_hint():
    """(New-user review, session 18.) The monitor calls the model with a dict batch's entries
    as keyword arguments: ``{"image", "label"}`` for ``forward(x)`` failed at train start with
    a bare TypeError that did not mention the monitor or ``probe_inputs=``."""
    ds = make_data()
    samples = [{"image": x, "label": y} for x, y in zip(*ds.tensors, strict=True)]
    loader_ = torch.utils.data.DataLoader(samples, batch_size=8)
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=6)
    with pytest.raises(MisconfigurationException, match=r"model\(\*\*batch\).*probe_inputs="):
        trainer(max_steps=1, callbacks=[mon]).fit(DictBatches(), loader_)
    ok = NTKSpectrumMonitor(every_n_steps=1, probe_size=6, probe_inputs=lambda b: b["image"])
    trainer(max_steps=1, callbacks=[ok]).fit(DictBatches(), loader_)
    assert ok.history


def test_sub_module_params_get_distinct_checkpoint_keys():
    """(Second review, session 18.) ``params=<sub-module>`` was keyed by its class alone, so two
    monitors of different Linear layers shared a checkpoint key (a resume could restore the
    other K's history). The key now names the sub-module's path in the probed module."""
    keys = []
    for k in (0, 3):
        model = TinyNet()
        mon = NTKSpectrumMonitor(every_n_steps=1, params=model.net[k], probe_size=6)
        trainer(max_steps=1, callbacks=[mon]).fit(model, loader(make_data()))
        assert mon.history
        keys.append(mon.state_key)
    assert keys[0] != keys[1] and "net.0" in keys[0] and "net.3" in keys[1]


def test_lanczos_with_train_mode_dropout_is_refused_at_setup():
    """(Review, session 18.) ``eval_mode=False, method="lanczos"`` on a model with active
    dropout ended ``fit`` at the first probe with a plain ``ValueError``; it is a configuration
    error, found at setup."""
    model = TinyNet(dropout=0.2)
    mon = NTKSpectrumMonitor(every_n_steps=1, eval_mode=False, method="lanczos")
    with pytest.raises(MisconfigurationException, match=r"dropout.*eval_mode=True"):
        trainer(max_steps=1, callbacks=[mon]).fit(model, loader(make_data()))
    model.net[2].p = 0.0  # inactive dropout: fine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer(max_steps=1, callbacks=[mon]).fit(model, loader(make_data()))
    assert mon.history


def test_module_without_forward_and_bad_module_path():
    ds = make_data()
    with pytest.raises(MisconfigurationException, match=r"forward.*module="):
        trainer(max_steps=1, callbacks=[NTKSpectrumMonitor()]).fit(NoForward(), loader(ds))
    with pytest.raises(MisconfigurationException, match="no attribute path 'body'"):
        trainer(max_steps=1, callbacks=[NTKSpectrumMonitor(module="body")]).fit(
            NoForward(), loader(ds)
        )
    # module="net" probes the submodule: same function as forward here.
    torch.manual_seed(0)
    model = NoForward()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    mon = NTKSpectrumMonitor(module="net", every_n_steps=5, probe_size=6, dtype=torch.float64)
    trainer(max_steps=1, callbacks=[mon]).fit(model, loader(ds))
    ev = truth_at(init, ds.tensors[0][:6])
    assert mon.history[0]["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)


# ---------------------------------------------------------------------------- failure containment
def _run_with(monkeypatch, fake: Any, **mon_kw: Any) -> tuple[NTKSpectrumMonitor, TinyNet]:
    monkeypatch.setattr(glu_probe.ntk, "ntk_spectrum", fake)
    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, **mon_kw)
    model = TinyNet()
    trainer(max_steps=3, callbacks=[mon]).fit(model, loader(make_data()))
    return mon, model


def _real_cpu_oom() -> RuntimeError:
    """What the CPU allocator really raises for a refused allocation (no memory is used)."""
    try:
        torch.empty(2**45)
    except RuntimeError as err:
        return err
    raise AssertionError("a 128 TiB allocation succeeded")


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory."),
        RuntimeError("DefaultCPUAllocator: out of memory"),
        _real_cpu_oom(),  # (review, session 18: "can't allocate memory" ended the fit)
    ],
)
def test_oom_halves_chunk_once_then_skips(monkeypatch, error):
    chunks: list[Any] = []

    def always_oom(*args: Any, **kwargs: Any) -> Any:
        chunks.append(kwargs.get("chunk_size"))
        raise error

    with pytest.warns(NTKProbeWarning, match="out of memory.*chunk_size=4.*training continues"):
        mon, _ = _run_with(monkeypatch, always_oom)
    assert mon.history == []
    assert chunks == [None, 4] * 4  # steps 0..3: first try, then half of the 8-sample probe


def test_oom_retry_succeeds(monkeypatch):
    real = glu_probe.ntk.ntk_spectrum
    chunks: list[Any] = []

    def oom_first(*args: Any, **kwargs: Any) -> Any:
        chunks.append(kwargs.get("chunk_size"))
        if len(chunks) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real(*args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("error", NTKProbeWarning)
        mon, _ = _run_with(monkeypatch, oom_first, chunk_size=6)
    assert chunks[:3] == [6, 3, 6]
    assert [h["step"] for h in mon.history] == [0, 1, 2, 3]


def test_nan_skips_with_warning_and_strict_raises(monkeypatch):
    real = glu_probe.ntk.ntk_spectrum

    def nan_model_output(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("the model output has 3 NaN/Inf value(s) on the probe batch")

    with pytest.warns(NTKProbeWarning, match="non-finite"):
        mon, _ = _run_with(monkeypatch, nan_model_output)
    assert mon.history == []

    def nan_eigenvalue(*args: Any, **kwargs: Any) -> Any:
        res = real(*args, **kwargs)
        res.lambda_min = float("nan")
        if hasattr(res, "as_dict"):
            d = res.as_dict()
            res.as_dict = lambda: {**d, "lambda_min": float("nan")}  # type: ignore[method-assign]
        return res

    with pytest.warns(NTKProbeWarning, match="non-finite eigenvalues"):
        mon, _ = _run_with(monkeypatch, nan_eigenvalue)
    assert mon.history == []

    with pytest.raises(ValueError, match="NaN/Inf"):
        _run_with(monkeypatch, nan_model_output, strict=True)
    with pytest.raises(FloatingPointError, match="non-finite eigenvalues"):
        _run_with(monkeypatch, nan_eigenvalue, strict=True)

    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        _run_with(monkeypatch, oom, strict=True)


def test_real_nan_output_is_contained():
    """A model whose output is NaN on the probe (not in training): warn, skip, keep training."""
    ds = make_data()
    probe = (torch.full((4, 5), float("nan")), torch.zeros(4, 3))
    mon = NTKSpectrumMonitor(every_n_steps=1, probe=probe)
    model = TinyNet()
    with pytest.warns(NTKProbeWarning, match="non-finite"):
        trainer(max_steps=2, callbacks=[mon]).fit(model, loader(ds))
    assert mon.history == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_other_errors_propagate(monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        _run_with(monkeypatch, broken)


# ---------------------------------------------------------------------------- paired module
def test_paired_module_probes_model_and_baseline():
    paired_mod = pytest.importorskip("glu_probe.callbacks.paired")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    baseline = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    init_m = [p.detach().clone() for p in model.parameters()]
    init_b = [p.detach().clone() for p in baseline.parameters()]
    paired = paired_mod.PairedModule(model, baseline, loss_fn=nn.functional.mse_loss)
    mon = NTKSpectrumMonitor(every_n_steps=10, probe_size=6, dtype=torch.float64)
    trainer(max_steps=1, callbacks=[mon]).fit(paired, loader(make_data()))
    h = mon.history[0]
    x = make_data().tensors[0][:6]
    for tag, init in (("model", init_m), ("baseline", init_b)):
        clone = nn.Sequential(
            nn.Linear(5, 8), nn.Tanh() if tag == "model" else nn.ReLU(), nn.Linear(8, 3)
        )
        with torch.no_grad():
            for p, q in zip(clone.parameters(), init, strict=True):
                p.copy_(q)
        ev = dense_spectrum(clone, x)
        assert h[f"ntk/{tag}/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)
        assert h[f"ntk/{tag}/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-8)
    assert "ntk/lambda_max" not in h


class TokenLM(pl.LightningModule):
    """(B, T) token ids -> (B, T, V) logits: the pNTK has one row per token."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_max_rows_caps_token_probes(caplog):
    ids = torch.randint(0, 11, (24, 8), generator=torch.Generator().manual_seed(0))
    dl = DataLoader(TensorDataset(ids), batch_size=6)
    torch.manual_seed(0)
    model = TokenLM()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    mon = NTKSpectrumMonitor(every_n_steps=5, probe_size=10, max_rows=20, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(max_steps=1, callbacks=[mon]).fit(model, dl)
    assert mon._n_probe == 2  # 20 rows // 8 tokens per sequence
    assert "probing 2 of 10 samples" in caplog.text  # the cap is said, not silent
    ref = TokenLM()
    ref.load_state_dict(init)
    names = [n for n, _ in ref.named_parameters()]
    params = tuple(p.detach().double() for p in ref.parameters())

    def rows(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(
            ref.double(), dict(zip(names, ps, strict=True)), (ids[:2],)
        )
        return (out.sum(-1) / math.sqrt(out.shape[-1])).reshape(-1)

    jac = torch.autograd.functional.jacobian(rows, params)
    J = torch.cat([j.reshape(16, -1) for j in jac], dim=1)
    ev = torch.linalg.eigvalsh(J @ J.T)
    assert mon.history[0]["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)
    assert mon.history[0]["ntk/lambda_min"] == pytest.approx(float(ev[0]), rel=1e-7)


class CausalLM(pl.LightningModule):
    """A tiny HF GPT-2 on dict batches (input_ids, attention_mask): causal, one row per token."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=13, n_positions=32, n_embd=8, n_layer=1, n_head=2)
        self.lm = GPT2LMHeadModel(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])[:, :-1]
        target = batch["input_ids"][:, 1:]
        return nn.functional.cross_entropy(logits.reshape(-1, 13), target.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ProbeShapes(pl.Callback):
    """Shapes of a monitor's probe inputs while training (the monitor frees them at train end)."""

    def __init__(self, mon: NTKSpectrumMonitor) -> None:
        self.mon, self.shapes = mon, {}

    def on_train_batch_end(self, *args: Any) -> None:
        inputs = self.mon._inputs
        items = inputs.items() if isinstance(inputs, dict) else [("x", inputs)]
        self.shapes = {k: tuple(v.shape) for k, v in items}


@pytest.mark.filterwarnings("error:per-sample vmap")  # one sample: no vmap over samples
def test_long_sequence_is_cut_to_max_rows_tokens(caplog):
    """One 32-token sequence, max_rows=12: the probe is its first 12 tokens, and for a causal LM
    its K is the leading 12 x 12 block of the whole sequence's K (float64 truth)."""
    g = torch.Generator().manual_seed(0)
    items = [
        {"input_ids": torch.randint(0, 13, (32,), generator=g), "attention_mask": torch.ones(32)}
        for _ in range(4)
    ]
    dl: DataLoader[Any] = DataLoader(items, batch_size=2)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = CausalLM()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    mon = NTKSpectrumMonitor(
        every_n_steps=5, probe_size=4, max_rows=12, dtype=torch.float64, method="dense"
    )
    shapes = ProbeShapes(mon)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(max_steps=1, callbacks=[mon, shapes]).fit(model, dl)
    assert "probing the first 12 of 32 tokens" in caplog.text
    assert shapes.shapes == {"input_ids": (1, 12), "attention_mask": (1, 12)}

    ref = CausalLM()
    ref.load_state_dict(init)
    ref = ref.double().eval()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = tuple(p.detach() for n, p in ref.named_parameters() if p.requires_grad)
    ids, mask = items[0]["input_ids"][None], items[0]["attention_mask"][None].double()

    def rows(*ps: torch.Tensor) -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = torch.func.functional_call(ref, dict(zip(names, ps, strict=True)), (ids, mask))
        return (out.sum(-1) / math.sqrt(out.shape[-1])).reshape(-1)

    jac = torch.autograd.functional.jacobian(rows, params)
    J = torch.cat([j.reshape(32, -1) for j in jac], dim=1)
    ev = torch.linalg.eigvalsh((J @ J.T)[:12, :12])  # the leading block of the 32-token K
    assert mon.history[0]["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)
    assert mon.history[0]["ntk/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-7)


class PaddedClassifier(pl.LightningModule):
    """A tiny HF BERT classifier on padded dict batches (input_ids, attention_mask, labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert_classifier(vocab_size=40)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _pad(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    T = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = b["input_ids"]
        mask[i, : len(b["input_ids"])] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([b["y"] for b in batch]),
    }


def test_hf_classifier_with_padded_batches():
    """Padded masks make HF's per-sample vmap fail; the probe groups samples by mask, warns
    about nothing, and logs the float64 truth of the whole padded batch."""
    g = torch.Generator().manual_seed(0)
    items = [
        {
            "input_ids": torch.randint(1, 40, (int(torch.randint(3, 9, (1,), generator=g)),)),
            "y": int(torch.randint(0, 3, (1,), generator=g)),
        }
        for _ in range(24)
    ]
    torch.manual_seed(0)
    model = PaddedClassifier()
    init = copy.deepcopy(model.bert).double().eval()
    mon = NTKSpectrumMonitor(every_n_steps=5, probe_size=12, dtype=torch.float64, method="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer(max_steps=1, callbacks=[mon]).fit(
            model, DataLoader(items, batch_size=6, collate_fn=_pad)
        )
    probe = _pad(items[:12])
    assert len({tuple(m.tolist()) for m in probe["attention_mask"]}) > 1  # really padded
    names = [n for n, _ in init.named_parameters()]
    params = tuple(p.detach() for p in init.parameters())

    def rows(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(
            init,
            dict(zip(names, ps, strict=True)),
            (),
            {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]},
        ).logits
        return out.sum(-1) / math.sqrt(out.shape[-1])

    jac = torch.autograd.functional.jacobian(rows, params)
    J = torch.cat([j.reshape(12, -1) for j in jac], dim=1)
    ev = torch.linalg.eigvalsh(J @ J.T)
    assert mon.history[0]["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)
    assert mon.history[0]["ntk/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-6)


class FixedLengthLM(TokenLM):
    """Learned positions of a fixed length: a shorter input fails, so the sequence stays whole."""

    def __init__(self, length: int = 8) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(length, 6))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids) + self.pos))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return self(ids).square().mean()


def test_sequence_that_cannot_be_cut_stays_whole():
    ids = torch.randint(0, 11, (6, 8), generator=torch.Generator().manual_seed(0))
    mon = NTKSpectrumMonitor(every_n_steps=5, probe_size=4, max_rows=5, dtype=torch.float64)
    shapes = ProbeShapes(mon)
    fit = trainer(max_steps=1, callbacks=[mon, shapes])
    # the true size of K is said (until 2026-11-28 only "probing 1 of 4 samples to keep K at
    # most max_rows=5 rows" was, while K kept its 8 rows: 1,048,576 for output="full" on an LM)
    with pytest.warns(NTKProbeWarning, match="gives 8 rows of K .* so K has 8 rows"):
        fit.fit(FixedLengthLM(), DataLoader(TensorDataset(ids)))
    assert shapes.shapes == {"x": (1, 8)} and mon.history[0]["ntk/lambda_max"] > 0


def test_full_output_rows_beyond_max_rows_are_announced():
    """output="full" of a 3-output net with max_rows=2: a sample has 3 rows that no cut can
    reduce; the probe keeps one sample and warns that K has 3 rows."""
    ds = make_data()
    mon = NTKSpectrumMonitor(every_n_steps=5, probe_size=8, max_rows=2, output="full")
    with pytest.warns(NTKProbeWarning, match="gives 3 rows of K"):
        trainer(max_steps=1, callbacks=[mon]).fit(TinyNet(), loader(ds))
    assert mon._n_probe == 1


class Stream(torch.utils.data.IterableDataset):
    """An iterable dataset whose order depends on the global RNG (as a shuffling stream would)."""

    def __init__(self, ds: TensorDataset) -> None:
        self.ds = ds

    def __iter__(self) -> Any:
        order = torch.randperm(len(self.ds))
        for i in order.tolist():
            yield self.ds[i]


def test_iterable_dataset_probe_leaves_training_unchanged():
    ds = make_data()

    class RngAtStart(pl.Callback):
        state: torch.Tensor

        def on_train_start(self, *args: Any) -> None:
            self.state = torch.get_rng_state()

    at_start = RngAtStart()

    def fit(with_monitor: bool) -> tuple[TinyNet, NTKSpectrumMonitor | None, torch.Tensor]:
        pl.seed_everything(3, verbose=False)
        model = TinyNet()
        mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=10, dtype=torch.float64)
        cbs: list[pl.Callback] = [at_start, mon] if with_monitor else []
        trainer(max_steps=4, callbacks=cbs).fit(model, DataLoader(Stream(ds), batch_size=8))
        return model, (mon if with_monitor else None), torch.get_rng_state()

    ref, _, rng_ref = fit(False)
    got, mon, rng_got = fit(True)
    for p, q in zip(ref.parameters(), got.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(rng_ref, rng_got)
    assert mon is not None and [h["step"] for h in mon.history] == [0, 2, 4]
    # The probe: the first 10 samples of a fresh loader iterator, drawn with the RNG state of
    # train start (and restored afterwards).
    pl.seed_everything(3, verbose=False)
    init = TinyNet().state_dict()
    torch.set_rng_state(at_start.state)
    it = iter(DataLoader(Stream(ds), batch_size=8))
    x = torch.cat([next(it)[0], next(it)[0]])[:10]
    ev = truth_at(init, x)
    assert mon.history[0]["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)


def test_figure_every(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = NTKSpectrumMonitor(every_n_steps=1, probe_size=6, figure_every=3, log_histogram=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(max_steps=7, callbacks=[mon], logger=logger).fit(TinyNet(), loader(make_data()))
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert [i.step for i in acc.Images("ntk/spectrum_figure")] == [0, 3, 6, 7]  # + the last
    assert "ntk/spectrum" not in acc.Tags()["histograms"]


def test_iterative_path_writes_slq_histogram_and_figure(tmp_path):
    """Iterative path: TensorBoard gets the SLQ estimate of the log10 spectrum (bucket counts add
    up to about n, the size of K) and a density figure, at the first and the last probe."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    ds = make_data(n=96)
    mon = lanczos_monitor({"which": "largest", "block_size": 2})
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(max_steps=4, callbacks=[mon], logger=logger).fit(TinyNet(hidden=64), loader(ds))
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0}).Reload()
    hist = acc.Histograms("ntk/log10_spectrum")
    assert [h.step for h in hist] == [0, 2, 4]
    for h in hist:
        counts = sum(h.histogram_value.bucket)
        assert counts == pytest.approx(96, rel=0.02)  # n·Σ weights over positive nodes
    assert "ntk/spectrum" not in acc.Tags()["histograms"]  # no exact eigenvalues to show
    assert [e.step for e in acc.Images("ntk/spectrum_figure")] == [0, 4]


def test_singular_probe_logs_an_infinite_condition_number():
    """More probe rows than parameters: K is singular, and the dense path now reports κ = ∞ (it
    reported λ_max over the rounding noise of λ_min); the monitor logs it as such, and the
    report shows "inf"."""
    from glu_probe.report import _fmt

    ds = make_data(n=64, d_in=5, d_out=3)
    mon = NTKSpectrumMonitor(every_n_steps=2, probe_size=64, max_rows=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the engine's rank warning)
        trainer(max_steps=2, callbacks=[mon]).fit(TinyNet(hidden=2), loader(ds))
    assert [h["step"] for h in mon.history] == [0, 2]
    assert all(h["ntk/condition_number"] == math.inf for h in mon.history)
    assert all(h["ntk/lambda_max"] > 0 for h in mon.history)
    assert _fmt(math.inf, ".3g") == "inf" and _fmt(math.nan) == "-"
