"""Review, session 29: the NTK monitor after a resume from a validation-end checkpoint,
parameters that no optimizer holds, and a PairedModule's filter errors.

* Lightning 2.6 restores its logger step one too high after a resume from a checkpoint saved at
  validation end (ModelCheckpoint's place where there is a validation loader). The monitor,
  counting its cadence on that step, probed the checkpoint's weights a second time and every
  later probe one optimizer step early: its probes must sit at the global steps of the
  uninterrupted run, with its κ values, none twice.
* A module replaced after ``configure_optimizers`` (a swap in ``on_fit_start``) is trained by
  no optimizer: the monitor says so, once.
* A PairedModule ``params=`` filter that selects nothing in one member names that member.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks.ntk import NTKProbeWarning, NTKSpectrumMonitor
from glu_probe.callbacks.paired import PairedModule

torch.set_num_threads(1)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def _kappa64(net: nn.Module, x: torch.Tensor) -> float:
    """κ of the pNTK (Σ_o f_o/√O per sample) over every trainable parameter: the float64
    Jacobian row by row, K = J Jᵀ and eigvalsh (independent of the engine)."""
    import copy

    net = copy.deepcopy(net).double().eval()
    params = [p for p in net.parameters() if p.requires_grad]
    out = net(x.double())
    g = out.sum(-1) / out.shape[-1] ** 0.5
    rows = []
    for r in range(g.numel()):
        grads = torch.autograd.grad(g[r], params, retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in grads]))
    jac = torch.stack(rows)
    ev = torch.linalg.eigvalsh(jac @ jac.T)
    return float(ev[-1] / ev[0])


# ------------------------------------------------------------------ 1. resume at validation end
class Net(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


class Recording(NTKSpectrumMonitor):
    """The monitor, with the global step of each probe it makes."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.probe_globals: list[int] = []

    def _probe_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int):
        self.probe_globals.append(int(trainer.global_step))
        return super()._probe_and_log(trainer, pl_module, step)


class Crash(RuntimeError):
    pass


class Spy(pl.Callback):
    """Crashes at global step ``crash_at``; records the logger step of the first batch, and the
    weights at global step ``keep_at``."""

    def __init__(self, crash_at: int | None = None, keep_at: int | None = None) -> None:
        self.crash_at, self.keep_at = crash_at, keep_at
        self.first: tuple[int, int] | None = None
        self.kept: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.first is None:
            steps = trainer.fit_loop.epoch_loop._batches_that_stepped
            self.first = (int(trainer.global_step), int(steps))
        if trainer.global_step == self.crash_at:
            raise Crash("the process dies")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.keep_at:
            self.kept = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(32, 5, generator=g), torch.randn(32, 2, generator=g))


def _fit(tmp: Path, every: int, case: str, extra: list[Any], seed: int = 0, ckpt: Any = None):
    """16 steps (4 epochs), with or without a validation loader, under ``max_steps`` or
    ``max_epochs`` (``case``)."""
    val = case.startswith("val")
    length = {"max_steps": 16} if case.endswith("max_steps") else {"max_epochs": 4}
    monitor = Recording(
        every_n_steps=every,
        probe_size=8,
        dtype=torch.float64,
        log_histogram=False,
        log_figure=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        **length,
        logger=False,
        callbacks=[monitor, *extra],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp),
    )
    ds = _data()
    loaders = [DataLoader(ds, batch_size=8)]
    if val:
        loaders.append(DataLoader(ds, batch_size=16))
    with contextlib.suppress(Crash):
        trainer.fit(Net(seed), *loaders, ckpt_path=ckpt)
    return monitor


# (a validation-less run under max_steps is not among them: Lightning 2.6 replays a training
# batch after a resume from its training-epoch-end checkpoint, so its weights differ anyway)
@pytest.mark.parametrize("case", ["val-max_steps", "val-max_epochs", "noval-max_epochs"])
@pytest.mark.parametrize("every", [1, 3])
def test_a_resume_probes_the_global_steps_of_the_uninterrupted_run(tmp_path, every, case):
    full_spy = Spy(keep_at=15)
    full = _fit(tmp_path / "a", every, case, [full_spy])
    expected = list(range(0, 17, every))
    assert full.probe_globals == expected
    assert [h["step"] for h in full.history] == expected  # (no resume: steps are global steps)
    # the uninterrupted series itself: κ at global step 15 against a float64 Jacobian
    net = Net(0)
    assert full_spy.kept is not None
    net.load_state_dict(full_spy.kept)
    x = _data().tensors[0][:8]
    at15 = next(h for h in full.history if h["step"] == 15)
    assert at15["ntk/condition_number"] == pytest.approx(_kappa64(net, x), rel=1e-9)

    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1)
    crashed = _fit(tmp_path / "b", every, case, [ck, Spy(crash_at=10)])
    assert crashed.probe_globals == list(range(0, 11, every))
    ckpt = tmp_path / "ck" / "epoch=1-step=8.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ck").iterdir())

    # a fresh module (other weights) and monitor: everything from the checkpoint
    spy = Spy()
    resumed = _fit(tmp_path / "c", every, case, [spy], seed=123, ckpt=ckpt)
    assert spy.first is not None and spy.first[0] == 8
    # Lightning's logger step at the first resumed batch: one too high after a validation-end
    # checkpoint of a max_steps run (Lightning 2.6), right otherwise
    shift = spy.first[1] - 8
    assert shift == (1 if case == "val-max_steps" else 0)
    # the probes after the resume: the uninterrupted run's global steps (the checkpoint's
    # weights, probed before the crash, not again), the same count and the same κ values
    after = [s for s in expected if s > 8]
    assert resumed.probe_globals == after
    assert len(resumed.history) == len(full.history)
    kappas = [h["ntk/condition_number"] for h in resumed.history]
    assert len(set(kappas)) == len(kappas)  # no κ twice
    for h_full, h_res in zip(full.history, resumed.history, strict=True):
        assert h_res["ntk/condition_number"] == pytest.approx(
            h_full["ntk/condition_number"], rel=1e-9
        )
        assert h_res["ntk/lambda_max"] == pytest.approx(h_full["ntk/lambda_max"], rel=1e-9)
    # logged at Lightning's logger step, on the x of the user's own (shifted) series
    steps = [h["step"] for h in resumed.history]
    assert steps == [s for s in expected if s <= 8] + [s + shift for s in after]


def test_a_checkpoint_of_an_older_version_still_loads():
    """A checkpoint without the session-29 keys: the cadence counts on the saved logger step."""
    monitor = NTKSpectrumMonitor(every_n_steps=3)
    monitor.load_state_dict({"every_n_steps": 3, "last_probe_step": 6, "history": []})
    assert monitor.last_probe_step == 6
    assert monitor._last_probe_count == 6
    assert monitor._last_probe_global is None and monitor._step_anchor is None
    state = monitor.state_dict()
    assert state["last_probe_count"] == 6 and state["step_anchor"] is None


# ------------------------------------------------------------------ 2. no optimizer holds them
class Swapped(pl.LightningModule):
    """``net.mlp`` replaced in the hook named ``where`` (or never)."""

    def __init__(self, where: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.where = where
        self.net = nn.ModuleDict({"inp": nn.Linear(4, 8), "mlp": nn.Linear(8, 8)})
        self.head = nn.Linear(8, 2)

    def _swap(self, hook: str) -> None:
        if self.where == hook and not isinstance(self.net["mlp"], nn.Sequential):
            torch.manual_seed(1)
            self.net["mlp"] = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 8))

    def configure_model(self) -> None:
        self._swap("configure_model")

    def on_fit_start(self) -> None:
        self._swap("on_fit_start")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.net["mlp"](torch.tanh(self.net["inp"](x)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _swap_fit(where: str | None) -> tuple[Swapped, NTKSpectrumMonitor, list[str], dict]:
    module = Swapped(where)
    monitor = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, dtype=torch.float64, log_histogram=False, log_figure=False
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g))
    start: dict[str, torch.Tensor] = {}

    class Keep(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            start.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer.callbacks.append(Keep())  # type: ignore[attr-defined]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(ds, batch_size=8))
    texts = [
        str(w.message)
        for w in caught
        if issubclass(w.category, NTKProbeWarning)
        and "none of the trainer's optimizers" in str(w.message)
    ]
    return module, monitor, texts, start


def test_a_module_swapped_after_the_optimizer_exists_is_named_once():
    module, monitor, texts, start = _swap_fit("on_fit_start")
    assert len(monitor.history) == 5
    assert len(texts) == 1, texts
    assert "4 of the 8 parameter tensor(s)" in texts[0]
    assert "net.mlp.0.weight" in texts[0] and "and 1 more" in texts[0]
    assert "configure_model" in texts[0] and "on_fit_start" in texts[0]
    # what the warning says: the new block never trained, the others did
    assert torch.equal(module.net["mlp"][0].weight, start["net.mlp.0.weight"])
    assert not torch.equal(module.head.weight, start["head.weight"])
    # and it is still probed: K over every parameter, the new block's included (float64 truth)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))[:8]
    assert monitor.history[-1]["ntk/condition_number"] == pytest.approx(
        _kappa64(module, x), rel=1e-9
    )


@pytest.mark.parametrize("where", [None, "configure_model"])
def test_a_normal_fit_or_a_swap_in_configure_model_does_not_warn(where):
    module, monitor, texts, start = _swap_fit(where)
    assert texts == []
    assert len(monitor.history) == 5
    name, weight = next(iter(module.net["mlp"].named_parameters()))
    assert not torch.equal(weight, start[f"net.mlp.{name}"])  # (it trains)


# ------------------------------------------------------------------ PairedModule members
class Block(nn.Module):
    def __init__(self, name: str, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, 8)
        self.add_module(name, nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)
        self.hidden_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(getattr(self, self.hidden_name)(torch.tanh(self.inp(x)))))


def _paired_fit(model: nn.Module, baseline: nn.Module, params: Any, steps: int = 2):
    monitor = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, params=params, log_histogram=False, log_figure=False
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PairedModule(model, baseline, lr=1e-2), DataLoader(ds, batch_size=8))
    return monitor, caught


def test_a_paired_module_with_one_optimizer_per_member_does_not_warn():
    monitor, caught = _paired_fit(Block("mlp", 0), Block("mlp", 1), None)
    assert not [w for w in caught if "none of the trainer's optimizers" in str(w.message)]
    assert len(monitor.history) == 3 and "ntk/baseline/condition_number" in monitor.history[0]


@pytest.mark.parametrize("unmatched", ["baseline", "model"])
def test_a_paired_filter_that_selects_nothing_in_one_member_names_it(unmatched):
    model = Block("ffn" if unmatched == "model" else "mlp", 0)
    baseline = Block("ffn" if unmatched == "baseline" else "mlp", 1)
    with pytest.raises(ValueError) as info:
        _paired_fit(model, baseline, "mlp")
    text = str(info.value)
    other = "model" if unmatched == "baseline" else "baseline"
    assert f"params='mlp' selects nothing in the PairedModule's {unmatched} (Block" in text
    assert f"selects 2 parameter tensor(s) of its {other}" in text
    assert "callable (name, p)" in text and "re:" in text
