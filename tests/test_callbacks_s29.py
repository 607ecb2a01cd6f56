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

Re-review, session 29:

* ``configure_optimizers`` returning None leaves Lightning's placeholder optimizer in
  ``trainer.optimizers``: not an optimizer that fails to hold the parameters.
* A PairedModule's list of names that one member lacks, or a sub-module of the other member,
  names that member in its own words; a complex parameter keeps the engine's error.
* A checkpoint written before session 29 (no saved count), resumed from validation end, probes
  the uninterrupted run's global steps.
* A fit whose ``global_step`` never advances (parameters updated by hand) warns once.
"""

from __future__ import annotations

import contextlib
import copy
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


# ------------------------------------------------------------------ re-review, session 29
# 1. configure_optimizers returning None: Lightning's placeholder optimizer is no optimizer
class HandSGD(pl.LightningModule):
    """``configure_optimizers`` returns None; under manual optimization the parameters are
    updated by hand (``p -= lr * p.grad``), under automatic optimization not at all."""

    def __init__(self, manual: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.automatic_optimization:
            return loss
        self.manual_backward(loss)
        with torch.no_grad():
            for p in self.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        return None

    def configure_optimizers(self) -> None:
        return None


def _hand_fit(
    module: pl.LightningModule,
    n: int = 16,
    extra: list[Any] | None = None,
    sink: list[Any] | None = None,
):
    """Two epochs of ``n`` samples in batches of 8, probed every step; ``sink`` receives the
    list of the warnings caught (filled as they come)."""
    monitor = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, dtype=torch.float64, log_histogram=False, log_figure=False
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        callbacks=[monitor, *(extra or [])],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g))
    start = copy.deepcopy(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sink is not None:
            sink.append(caught)
        trainer.fit(module, DataLoader(ds, batch_size=8))
    return monitor, trainer, caught, start, ds.tensors[0][:8]


def _texts(caught: list[Any], needle: str) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, NTKProbeWarning) and needle in str(w.message)
    ]


def test_a_module_without_optimizers_is_not_told_that_no_optimizer_holds_its_parameters():
    # manual optimization, updated by hand: it trains, and no optimizer is expected to hold it
    module = HandSGD(manual=True)
    monitor, trainer, caught, start, x = _hand_fit(module)
    assert repr(trainer.optimizers) == "[No Optimizer]"  # (Lightning's placeholder)
    assert _texts(caught, "none of the trainer's optimizers") == []
    assert not torch.equal(module.net[0].weight, start.net[0].weight)
    # the fit-start probe, of the initial weights (float64 Jacobian)
    assert [h["step"] for h in monitor.history] == [0]
    assert monitor.history[0]["ntk/condition_number"] == pytest.approx(_kappa64(start, x), rel=1e-9)

    # automatic optimization, nothing to step: Lightning warns, the monitor adds no claim of a
    # module replaced after configure_optimizers
    module = HandSGD(manual=False)
    monitor, trainer, caught, start, x = _hand_fit(module)
    assert any("returned `None`" in str(w.message) for w in caught)
    assert _texts(caught, "configure_optimizers (e.g. swap_mlp") == []
    assert _texts(caught, "none of the trainer's optimizers") == []
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3, 4]
    assert torch.equal(module.net[0].weight, start.net[0].weight)  # (nothing trained)
    kappa = _kappa64(start, x)
    for h in monitor.history:
        assert h["ntk/condition_number"] == pytest.approx(kappa, rel=1e-9)


def test_the_placeholder_optimizer_is_dropped_by_class_name_too():
    from types import SimpleNamespace

    from glu_probe.callbacks._utils import configured_optimizers

    class _MockOptimizer:  # (another Lightning version's placeholder, by its name)
        def __init__(self) -> None:
            self.param_groups: list[Any] = []

    from lightning.pytorch.core.optimizer import _MockOptimizer as Lightnings

    assert configured_optimizers(SimpleNamespace(optimizers=[Lightnings()])) == []  # type: ignore[arg-type]
    real = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    trainer: Any = SimpleNamespace(optimizers=[_MockOptimizer(), real])
    assert configured_optimizers(trainer) == [real]
    assert configured_optimizers(SimpleNamespace(optimizers=None)) == []  # type: ignore[arg-type]


# 2. a PairedModule's filter errors: each names the member, in its own words
def _paired_error(model: nn.Module, baseline: nn.Module, params: Any) -> ValueError:
    with pytest.raises(ValueError) as info:
        _paired_fit(model, baseline, params)
    return info.value


def test_a_list_of_names_that_one_member_lacks_names_that_member():
    # the model lacks 'ffn.weight' (it finds 'mlp.weight'): named, not "selects nothing"
    text = str(_paired_error(Block("mlp", 0), Block("ffn", 1), ["mlp.weight", "ffn.weight"]))
    assert "names parameters that are not in the PairedModule's model (Block)" in text
    assert "not found among the model's trainable parameters: ['ffn.weight']" in text
    assert "selects nothing" not in text
    # names of the model only: the baseline lacks them, the model holds 1 of them
    text = str(_paired_error(Block("mlp", 0), Block("ffn", 1), ["mlp.weight"]))
    assert "names parameters that are not in the PairedModule's baseline (Block" in text
    assert "the filter selects 1 parameter tensor(s) of its model" in text
    assert "not found among the baseline's trainable parameters: ['mlp.weight']" in text
    assert "selects nothing" not in text and "callable (name, p)" in text


def test_a_sub_module_of_one_member_names_the_other():
    model = Block("mlp", 0)
    text = str(_paired_error(model, Block("mlp", 1), model.mlp))
    assert "params=<module model.mlp> is not a sub-module of the PairedModule's baseline" in text
    assert "the filter selects 2 parameter tensor(s) of its model" in text
    assert "holds none of the baseline's parameters" in text
    assert "the model's" not in text and "selects nothing" not in text


def test_a_complex_parameter_keeps_the_engines_error():
    from glu_probe.ntk.functional import select_parameters

    baseline = Block("mlp", 1)
    baseline.phase = nn.Parameter(torch.randn(8, dtype=torch.complex64))
    with pytest.raises(ValueError) as engine:
        select_parameters(baseline, None)
    err = _paired_error(Block("mlp", 0), baseline, None)
    assert type(err) is ValueError
    assert str(err) == str(engine.value)
    assert str(err).startswith("complex parameters are not supported by the NTK probe: ['phase']")


# 3. a checkpoint written before session 29 (no saved count), resumed from validation end
@pytest.mark.parametrize("every", [1, 2])
def test_an_older_checkpoint_resumes_to_the_uninterrupted_runs_probes(tmp_path, every):
    full = _fit(tmp_path / "a", every, "val-max_steps", [])
    expected = list(range(0, 17, every))
    assert full.probe_globals == expected
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1)
    _fit(tmp_path / "b", every, "val-max_steps", [ck, Spy(crash_at=10)])
    state = torch.load(tmp_path / "ck" / "epoch=1-step=8.ckpt", weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("Recording")]
    for name in ("last_probe_global_step", "last_probe_count", "step_anchor"):
        del state["callbacks"][key][name]  # (as a checkpoint of an older version has it)
    old = tmp_path / "old.ckpt"
    torch.save(state, old)

    spy = Spy()
    resumed = _fit(tmp_path / "c", every, "val-max_steps", [spy], seed=123, ckpt=old)
    assert spy.first == (8, 9)  # (Lightning's logger step one too high: the shift)
    assert resumed.probe_globals == [s for s in expected if s > 8]  # (not 8 again, none early)
    assert len(resumed.history) == len(full.history)
    for h_full, h_res in zip(full.history, resumed.history, strict=True):
        assert h_res["ntk/condition_number"] == pytest.approx(
            h_full["ntk/condition_number"], rel=1e-9
        )


@pytest.mark.parametrize(
    ("global_step", "logged", "automatic", "offset"),
    [
        (8, 9, True, -1),  # validation-end checkpoint (Lightning 2.6): logger step one high
        (3, 2, True, 1),  # batch-end checkpoint (Lightning 2.4): one low
        (8, 8, True, 0),  # no shift
        (50, 100, True, 0),  # an optimizer_step that skips steps: not a shift
        (16, 9, False, 0),  # manual optimization (two optimizers): global_step counts both
    ],
)
def test_without_a_saved_count_the_shift_is_read_off_the_two_counters(
    global_step, logged, automatic, offset
):
    from types import SimpleNamespace

    monitor = NTKSpectrumMonitor(every_n_steps=2)
    monitor.load_state_dict({"every_n_steps": 2, "last_probe_step": 8, "history": []})
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=logged))
    trainer: Any = SimpleNamespace(global_step=global_step, fit_loop=loop)
    module: Any = SimpleNamespace(automatic_optimization=automatic)
    assert monitor._count_offset(trainer, module) == offset


# 4. global_step never advances: the cadence never comes round, and that is said once
def test_a_fit_whose_global_step_never_advances_warns_once():
    module = HandSGD(manual=True)
    monitor, trainer, caught, _, _ = _hand_fit(module)
    texts = _texts(caught, "global_step has not advanced")
    assert len(texts) == 1, texts
    assert "in the 4 training batch(es) of this fit" in texts[0]
    assert "configure_optimizers" in texts[0]
    assert trainer.global_step == 0 and len(monitor.history) == 1

    # a long fit is told before its end: at the 100th such batch (of 120)
    seen: list[int] = []
    sink: list[Any] = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            seen.append(len(_texts(sink[0], "global_step has not advanced")))

    _, _, caught, _, _ = _hand_fit(HandSGD(manual=True), n=8 * 60, extra=[Count()], sink=sink)
    texts = _texts(caught, "global_step has not advanced")
    assert len(texts) == 1 and "in the 100 training batch(es)" in texts[0]
    assert len(seen) == 120 and seen[98] == 0 and seen[99] == 1 and seen[-1] == 1


class WithSGD(HandSGD):
    """The same module with an SGD optimizer from configure_optimizers (stepped by Lightning,
    or by hand under manual optimization)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.automatic_optimization:
            return loss
        opt: Any = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:  # type: ignore[override]
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("manual", [False, True])
def test_a_normal_fit_is_not_told_that_global_step_never_advances(manual):
    module = WithSGD(manual=manual)
    monitor, trainer, caught, start, x = _hand_fit(module)
    assert _texts(caught, "global_step has not advanced") == []
    assert _texts(caught, "none of the trainer's optimizers") == []
    assert trainer.global_step == 4
    assert [h["step"] for h in monitor.history] == [0, 1, 2, 3, 4]
    assert not torch.equal(module.net[0].weight, start.net[0].weight)
    # the last probe: the trained weights (float64 Jacobian)
    assert monitor.history[-1]["ntk/condition_number"] == pytest.approx(
        _kappa64(module, x), rel=1e-9
    )


def test_long_gradient_accumulation_is_not_told_that_global_step_never_advances():
    """``accumulate_grad_batches=200`` leaves ``global_step`` where it was for 199 batches and
    then steps: the mid-fit warning (at batch 100) told such a run that no optimizer stepped
    and that it would be probed once (third re-review, session 29). It now fires mid-fit only
    where no optimizer is configured; the probes follow the two optimizer steps."""

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(400, 5, generator=g), torch.randn(400, 2, generator=g))
    monitor = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=8, dtype=torch.float64, log_histogram=False, log_figure=False
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=200,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Net(), DataLoader(ds, batch_size=1))
    assert trainer.global_step == 2
    assert [h["step"] for h in monitor.history] == [0, 1, 2]
    assert _texts(caught, "global_step has not advanced") == []
