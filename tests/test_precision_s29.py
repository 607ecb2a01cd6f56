"""Session 29 review regressions: the precision of the exact path's bounds and of the NTK
monitor's probe batch.

1. The dense path with float32 Jacobian rows traced the precision of the model's forward pass on
   its float64 probe. Autocast never narrows float64, so a model that runs part of its forward
   under ``torch.autocast("cpu", dtype=torch.bfloat16)`` looked float32-exact there, while its
   float32 rows did run in bfloat16: λ_max was 18x, λ_min 24x outside the reported residuals.
2. Under ``Trainer(precision="bf16-true")`` the monitor probed the float32 inputs, not the
   bfloat16 inputs the precision plugin hands the model in training.

Ground truth: K = J Jᵀ of a float64 copy of the model (autocast leaves float64 alone, so this is
the model's formula in exact arithmetic), J row by row from ``torch.func.jacrev``, its spectrum
from a dense ``eigvalsh``.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks.ntk import NTKSpectrumMonitor
from glu_probe.ntk import NTKRankWarning, ntk_spectrum
from glu_probe.ntk.dense import jacobian_rounding_estimate

torch.set_num_threads(1)


def truth(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Eigenvalues of the pNTK (rows: outputs summed over the last dimension / √O) of a float64
    copy of ``model`` at ``inputs`` (a tensor, or a dict of keyword arguments; floating tensors
    widened to float64, integer ones kept), in eval mode."""
    net = copy.deepcopy(model).double().eval()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = tuple(p.detach() for n, p in net.named_parameters() if p.requires_grad)
    buffers = dict(net.named_buffers())

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t

    def rows(*ps: torch.Tensor) -> torch.Tensor:
        state = {**buffers, **dict(zip(names, ps, strict=True))}
        if isinstance(inputs, dict):
            kwargs = {k: wide(v) for k, v in inputs.items()}
            out = torch.func.functional_call(net, state, (), kwargs)
        else:
            out = torch.func.functional_call(net, state, (wide(inputs),))
        return out.sum(-1) / math.sqrt(out.shape[-1])

    jac = torch.func.jacrev(rows, argnums=tuple(range(len(params))))(*params)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    return torch.linalg.eigvalsh(J @ J.T)


class AutocastInside(pl.LightningModule):
    """Computes its hidden layers under a CPU bfloat16 autocast of its own, whatever the probe's
    or the Trainer's precision."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.b(torch.tanh(self.a(x)))
        return self.c(torch.tanh(h.to(self.c.weight.dtype)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y.float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Plain(AutocastInside):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TokenNet(pl.LightningModule):
    """Integer token ids beside a floating per-token weight (a dict batch with labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 8), nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.emb(input_ids) * weight.unsqueeze(-1))
        return self.head(h.mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch["weight"])
        return nn.functional.mse_loss(out.float(), batch["labels"].float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Snapshots(pl.Callback):
    """Deep copies of the module at train start (step 0) and after every optimizer step."""

    def __init__(self) -> None:
        self.states: dict[int, nn.Module] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states[0] = copy.deepcopy(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any
    ) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module)


def fit(model: pl.LightningModule, data: Any, callbacks: list[Any], **kw: Any) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kw,
    )
    with warnings.catch_warnings():
        # (bfloat16 rounding makes K numerically rank deficient: expected, and not tested here)
        warnings.simplefilter("ignore", NTKRankWarning)
        trainer.fit(model, data)


def xy(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 16, generator=g), torch.randn(n, 3, generator=g))


# ---------------------------------------------------------------- 1. float32 rows, autocast inside
def test_float32_rows_of_a_model_autocasting_inside_carry_its_bfloat16_rounding():
    torch.manual_seed(0)
    model, x = AutocastInside(), torch.randn(24, 16)
    ev = truth(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NTKRankWarning)
        res = ntk_spectrum(model, x, method="dense", jacobian_dtype=torch.float32)
    assert res.precision == "mixed"
    # the errors (4.7e-3 and 2.3e-4 at this seed) were 18x and 24x the residuals
    assert abs(res.lambda_max - float(ev[-1])) <= res.residual_max
    assert abs(res.lambda_min - float(ev[0])) <= res.residual_min
    # the residuals carry bfloat16 rounding of the rows: 2·√λ·δ + δ² + n·ε₆₄·λ_max, δ the
    # rounding estimate of bfloat16 rows
    delta = jacobian_rounding_estimate(float(res.eigenvalues.sum()), torch.bfloat16)
    s64 = 24 * torch.finfo(torch.float64).eps * res.lambda_max
    expected = 2 * math.sqrt(res.lambda_max) * delta + delta * delta + s64
    assert res.residual_max == pytest.approx(expected, rel=1e-9)
    # float64 rows are still float64-exact (autocast leaves float64 alone)
    exact = ntk_spectrum(model, x, method="dense")
    assert exact.precision == "float64"
    assert exact.lambda_max == pytest.approx(float(ev[-1]), rel=1e-12)
    assert exact.residual_max < 1e-10


def test_float32_rows_of_a_plain_model_keep_float32_rounding():
    """No autocast inside: the residuals stay those of float32 rows (not widened)."""
    torch.manual_seed(0)
    model, x = Plain(), torch.randn(24, 16)
    ev = truth(model, x)
    res = ntk_spectrum(model, x, method="dense", jacobian_dtype=torch.float32)
    assert res.precision == "mixed"
    delta = jacobian_rounding_estimate(float(res.eigenvalues.sum()), torch.float32)
    s64 = 24 * torch.finfo(torch.float64).eps * res.lambda_max
    expected = 2 * math.sqrt(res.lambda_max) * delta + delta * delta + s64
    assert res.residual_max == pytest.approx(expected, rel=1e-9)
    assert abs(res.lambda_max - float(ev[-1])) <= res.residual_max
    assert abs(res.lambda_min - float(ev[0])) <= res.residual_min


def test_monitor_residuals_cover_a_model_autocasting_inside():
    """The monitor's default for a float32 model is float32 rows: every logged probe was outside
    its residuals."""
    torch.manual_seed(0)
    ds = xy()
    probe = ds.tensors[0][:20]
    model, snaps = AutocastInside(), Snapshots()
    mon = NTKSpectrumMonitor(
        every_n_steps=2, probe=probe, method="dense", log_histogram=False, log_figure=False
    )
    fit(model, DataLoader(ds, batch_size=16), [snaps, mon], max_steps=2)
    assert [h["step"] for h in mon.history] == [0, 2]
    for hist in mon.history:
        ev = truth(snaps.states[hist["step"]], probe)
        assert abs(hist["ntk/lambda_max"] - float(ev[-1])) <= hist["ntk/residual_max"]
        assert abs(hist["ntk/lambda_min"] - float(ev[0])) <= hist["ntk/residual_min"]


# ---------------------------------------------------------------- 2. bf16-true probe inputs
@pytest.mark.parametrize("given", [False, True])
def test_bf16_true_monitor_probes_the_inputs_as_trained(given):
    """float64 probe: λ_max and κ of the bfloat16 weights at the bfloat16-rounded inputs, to
    float64 rounding (they were those at the float32 inputs, 8e-4 away at this seed)."""
    torch.manual_seed(0)
    ds = xy()
    model, snaps = Plain(), Snapshots()
    kw: dict[str, Any] = {"probe": ds.tensors[0][:20]} if given else {"probe_size": 20}
    mon = NTKSpectrumMonitor(
        every_n_steps=2,
        method="dense",
        dtype=torch.float64,
        log_histogram=False,
        log_figure=False,
        **kw,
    )
    fit(model, DataLoader(ds, batch_size=20), [snaps, mon], max_steps=1, precision="bf16-true")
    assert next(model.parameters()).dtype == torch.bfloat16
    hist = mon.history[0]
    x32 = ds.tensors[0][:20]
    ev = truth(snaps.states[0], x32.to(torch.bfloat16))
    assert hist["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)
    assert hist["ntk/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-8)
    # (the float32 inputs' spectrum is another one: the check above tells them apart)
    other = truth(snaps.states[0], x32)
    assert abs(float(other[-1]) - float(ev[-1])) > 1e-6 * float(ev[-1])


def test_bf16_true_monitor_default_dtype_within_residuals():
    """Default (float32 rows, mixed precision): within the logged residuals of the truth at the
    bfloat16 inputs (8.4e-4 from it against a residual of 1.8e-4 before)."""
    torch.manual_seed(0)
    ds = xy()
    model, snaps = Plain(), Snapshots()
    mon = NTKSpectrumMonitor(
        every_n_steps=2, probe_size=20, method="dense", log_histogram=False, log_figure=False
    )
    fit(model, DataLoader(ds, batch_size=20), [snaps, mon], max_steps=1, precision="bf16-true")
    hist = mon.history[0]
    ev = truth(snaps.states[0], ds.tensors[0][:20].to(torch.bfloat16))
    assert abs(hist["ntk/lambda_max"] - float(ev[-1])) <= hist["ntk/residual_max"]
    assert abs(hist["ntk/lambda_min"] - float(ev[0])) <= hist["ntk/residual_min"]


def test_bf16_true_token_ids_stay_integers():
    """The plugin's conversion casts floating tensors only: token ids stay int64 (an embedding
    refuses anything else), the floating per-token weights are probed as trained (bfloat16)."""
    g = torch.Generator().manual_seed(1)
    n, t = 24, 5
    batch = {
        "input_ids": torch.randint(0, 11, (n, t), generator=g),
        "weight": 0.5 + torch.rand(n, t, generator=g),
        "labels": torch.randn(n, 2, generator=g),
    }
    items = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    torch.manual_seed(0)
    model, snaps = TokenNet(), Snapshots()
    mon = NTKSpectrumMonitor(
        every_n_steps=2,
        probe_size=12,
        method="dense",
        dtype=torch.float64,
        log_histogram=False,
        log_figure=False,
    )
    dl: DataLoader[Any] = DataLoader(items, batch_size=12)  # type: ignore[arg-type]
    fit(model, dl, [snaps, mon], max_steps=1, precision="bf16-true")
    hist = mon.history[0]
    inputs = {"input_ids": batch["input_ids"][:12], "weight": batch["weight"][:12].bfloat16()}
    ev = truth(snaps.states[0], inputs)
    assert hist["ntk/lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-9)
    assert hist["ntk/condition_number"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-8)


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 8))
    return m, torch.randn(24, 16)


@pytest.mark.parametrize("method", ["lanczos", "dense"])
def test_probe_called_under_the_callers_autocast_is_float32(method):
    """Called inside the user's ``torch.autocast("cpu", bfloat16)`` (a ``training_step`` under
    ``"bf16-mixed"``, an autocast eval loop), the probe ran its products and the Krylov
    linear algebra in bfloat16: Lanczos crashed in its adjointness check ("expected scalar type
    BFloat16 but found Float") or gave κ 290 for 285.7. Now the caller's autocast is off for the
    whole call: the result is bit-identical to the call outside autocast and within its
    residuals of the float64 truth."""
    m, x = _mlp()
    ev = truth(m, x)
    kw: dict[str, Any] = {"method": method}
    if method == "dense":
        kw["jacobian_dtype"] = torch.float32
    outside = ntk_spectrum(m, x, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ntk_spectrum(m, x, **kw)
    assert inside.precision == outside.precision
    assert inside.lambda_max == outside.lambda_max
    assert inside.lambda_min == outside.lambda_min
    assert abs(inside.lambda_max - float(ev[-1])) <= inside.residual_max
    assert abs(inside.lambda_min - float(ev[0])) <= inside.residual_min


def test_probe_under_autocast_does_not_poison_later_probes():
    """The memoised forward trace was taken under the caller's autocast and keyed without it:
    every later probe of the model outside autocast reported bfloat16 rounding, κ = inf."""
    m, x = _mlp()
    fresh = ntk_spectrum(copy.deepcopy(m), x, method="lanczos")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ntk_spectrum(m, x, method="lanczos")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NTKRankWarning)
        after = ntk_spectrum(m, x, method="lanczos")
    assert after.precision == fresh.precision == "float32"
    assert after.condition_number == fresh.condition_number
    assert math.isfinite(after.condition_number)


def _qat_model() -> tuple[nn.Module, torch.Tensor]:
    """A QAT-prepared net: fake-quantize ops (float32 only) whose observers update their
    buffers in every forward, so the probe's samples are coupled (no per-sample rows)."""
    from torch.ao.quantization import DeQuantStub, QuantStub, get_default_qat_qconfig, prepare_qat

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.dq = QuantStub(), DeQuantStub()
            self.l1, self.act, self.l2 = nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dq(self.l2(self.act(self.l1(self.q(x)))))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Net()
        m.qconfig = get_default_qat_qconfig("fbgemm")
        m.train()
        prepare_qat(m, inplace=True)
        x = torch.randn(8, 4)
        m(x)
    return m, x


def _qat_truth(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """K = J Jᵀ of the pNTK rows from one float32 ``jacrev`` pass of a copy (its observers see
    the probe batch once, as each probe pass does from the saved buffers), in float64."""
    net = copy.deepcopy(m).eval()
    names = [n for n, p in net.named_parameters()]
    params = tuple(p.detach() for p in net.parameters())
    buffers = dict(net.named_buffers())

    def rows(*ps: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(
            net, {**buffers, **dict(zip(names, ps, strict=True))}, (x,)
        )
        return out.sum(-1) / math.sqrt(out.shape[-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jac = torch.func.jacrev(rows, argnums=tuple(range(len(params))))(*params)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1).double()
    return J @ J.T


def test_model_without_float64_kernels_on_coupled_samples():
    """A QAT model: the exact path's float64 products fail ("expected scalar type Float but
    found Double", torch's bare error before session 29, even with jacobian_dtype=float32),
    and coupled samples leave no float32-rows fallback. ``method="dense"`` and ``ntk_matrix``
    now say so and name the remedy; ``method="auto"`` takes the iterative path with a warning,
    within its residuals of K from an explicit float32 Jacobian."""
    from glu_probe.ntk import ntk_matrix
    from glu_probe.ntk.dense import Float64UnavailableError

    m, x = _qat_model()
    K = _qat_truth(m, x)
    ev = torch.linalg.eigvalsh(K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Float64UnavailableError, match="method='lanczos'"):
            ntk_spectrum(m, x, method="dense")
        with pytest.raises(RuntimeError, match=r"dtype=torch\.float32"):
            ntk_matrix(m, x)
        K32 = ntk_matrix(m, x, dtype=torch.float32)
    assert torch.allclose(K32.double(), K, rtol=1e-4, atol=1e-5 * float(ev[-1]))
    with pytest.warns(RuntimeWarning, match="takes the iterative path"):
        res = ntk_spectrum(m, x)
    assert res.method == "lanczos"
    assert abs(res.lambda_max - float(ev[-1])) <= res.residual_max
    assert abs(res.lambda_min - float(ev[0])) <= res.residual_min
