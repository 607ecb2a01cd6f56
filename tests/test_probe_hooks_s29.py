"""Review session 29: the model's own Python side effects during the NTK probe.

* A LightningModule whose forward calls ``self.log``: the probe's passes log nothing (the
  logged tensor escaped from vmap into Lightning's results and ended the fit).
* User forward hooks that only watch (activation collectors) stay out of the probe's
  transformed passes (they kept vmap's batched tensors, and the user's ``torch.stack`` failed);
  hooks that change the function (a returned value, an in-place change) stay in, and every hook
  registry is put back exactly.
* ``eval_mode=False`` with active dropout / stochastic depth: the dense path's K is J Jᵀ of one
  draw (it recomputed a sample's rows with new masks for another panel: K not PSD).
* The structured strategy's taps run before the user's output hooks (exact K, no fallback).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor

from glu_probe.ntk import ntk_matrix, ntk_spectrum

torch.set_num_threads(1)


def truth_K(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """pNTK K = J Jᵀ of a float64 copy (its hooks copied with it), one reverse pass per row."""
    m = copy.deepcopy(model).double().eval()
    ps = [p for p in m.parameters() if p.requires_grad]
    out = m(x.double())
    rows = out.reshape(out.shape[0], -1).sum(-1) / out[0].numel() ** 0.5
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(rows[i], ps, retain_graph=True)])
            for i in range(rows.numel())
        ]
    )
    return J @ J.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )


# ----------------------------------------------------------------- self.log inside forward
def _lightning_module_class():
    pl = pytest.importorskip("lightning.pytorch")
    import torch.nn.functional as F

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.l1(x))
            if self._trainer is not None:
                self.log("act_mean", h.detach().abs().mean())
            return self.l2(h)

        def training_step(self, batch, i):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return LM


def test_forward_logging_module_probed_directly_logs_nothing_and_K_is_exact():
    LM = _lightning_module_class()

    class Recording(LM):
        def __init__(self) -> None:
            super().__init__()
            self.logged: list[object] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.l1(x))
            self.log("act_mean", h.detach().abs().mean())
            self.log_dict({"act_max": h.detach().abs().max()})
            return self.l2(h)

        def log(self, name, value, *args, **kwargs):  # (what Lightning would store)
            self.logged.append(value)

    torch.manual_seed(0)
    lm = Recording()
    own_log_dict = lambda *a, **k: lm.logged.append("own")  # noqa: E731 (an instance's own)
    vars(lm)["log_dict"] = own_log_dict
    x = torch.randn(7, 6)
    T = truth_K(lm, x)
    lm.logged.clear()
    K = ntk_matrix(lm, x)
    assert rel(K, T) < 1e-12
    for method in ("dense", "lanczos"):
        s = ntk_spectrum(lm, x, method=method, dtype=torch.float64)
        ev = torch.linalg.eigvalsh(T)
        assert abs(s.lambda_max - float(ev[-1])) <= 1e-8 * float(ev[-1])
        assert abs(s.lambda_min - float(ev[0])) <= 1e-6 * float(ev[-1])
    assert lm.logged == []  # the probe's passes never log
    assert "log" not in vars(lm) and vars(lm)["log_dict"] is own_log_dict  # put back exactly
    lm(x)
    assert len(lm.logged) == 2  # the user's own forward logs as before


def test_fit_with_forward_logging_and_ntk_monitor_matches_the_run_without():
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from glu_probe.callbacks import NTKSpectrumMonitor

    LM = _lightning_module_class()

    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        X, Y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        dl = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True)
        m = LM()
        tr = pl.Trainer(
            max_epochs=2,
            callbacks=callbacks,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            deterministic=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.fit(m, dl)
        params = torch.cat([p.detach().flatten() for p in m.parameters()])
        return params, {k: float(v) for k, v in tr.callback_metrics.items()}

    p0, m0 = run([])
    p1, m1 = run([NTKSpectrumMonitor(every_n_steps=2)])
    assert any(k.startswith("ntk/") for k in m1)  # the monitor did probe
    assert torch.equal(p0, p1)
    assert m1["act_mean"] == m0["act_mean"] and m1["train_loss"] == m0["train_loss"]


# ----------------------------------------------------------------- forward hooks
def _snapshot(model: nn.Module) -> list[list[tuple[object, object]]]:
    g = nn.modules.module
    dicts = [
        g._global_forward_hooks,
        g._global_forward_pre_hooks,
        g._global_forward_hooks_with_kwargs,
        g._global_forward_hooks_always_called,
    ]
    for m in model.modules():
        dicts += [
            m._forward_hooks,
            m._forward_pre_hooks,
            m._forward_hooks_with_kwargs,
            m._forward_hooks_always_called,
            m._forward_pre_hooks_with_kwargs,
        ]
    return [list(d.items()) for d in dicts]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y)
        and all(k1 == k2 and v1 is v2 for (k1, v1), (k2, v2) in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def _plain(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and not is_functorch_wrapped_tensor(t)


class Hooked:
    """An MLP with a module collector, a with_kwargs/always_call collector and a global
    collector (they only watch), an output-scaling hook, a hook that halves its output in place
    and returns None, and a pre-hook that doubles the input (part of the function)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = m = mlp()
        self.acts: list[torch.Tensor] = []
        self.kw: list[torch.Tensor] = []
        self.glob: list[torch.Tensor] = []

        def halve(mod, args, out):
            out.mul_(0.5)

        def kw_collector(mod, args, kwargs, out):
            self.kw.append(out.detach().sum())

        def global_collector(mod, args, out):
            if mod is m[3]:
                self.glob.append(out.detach().abs().mean())

        self.handles = [
            m[1].register_forward_hook(lambda mod, a, o: self.acts.append(o.detach().abs().mean())),
            m[3].register_forward_hook(kw_collector, with_kwargs=True, always_call=True),
            m[2].register_forward_hook(lambda mod, a, o: 3.0 * o),
            m[4].register_forward_hook(halve),
            m[0].register_forward_pre_hook(lambda mod, a: (2.0 * a[0],)),
            nn.modules.module.register_module_forward_hook(global_collector),
        ]

    def clear(self) -> None:
        self.acts.clear()
        self.kw.clear()
        self.glob.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_watching_hooks_see_plain_tensors_only_and_K_is_the_hooked_function():
    h = Hooked()
    x = torch.randn(10, 6)
    try:
        T = truth_K(h.model, x)  # (the copy's hooks: scale, in-place halving, doubled input)
        with torch.no_grad():
            lin = h.model[0]  # (called directly, its pre-hook would double x again)
            stat = float(
                torch.tanh(nn.functional.linear(2.0 * x, lin.weight, lin.bias)).abs().mean()
            )
        ev = torch.linalg.eigvalsh(T)
        before = _snapshot(h.model)
        for method in ("dense", "lanczos"):
            h.clear()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                s = ntk_spectrum(h.model, x, method=method, dtype=torch.float64)
            # the in-place hook stays in (part of the function), and the user hears that it
            # sees the transforms' tensors
            assert any("in place" in str(i.message) for i in w)
            assert abs(s.lambda_max - float(ev[-1])) <= 1e-8 * float(ev[-1])
            assert abs(s.lambda_min - float(ev[0])) <= 1e-6 * float(ev[-1])
            for seen in (h.acts, h.kw, h.glob):
                assert 1 <= len(seen) <= 2, (method, len(seen))  # the validating pass only
                assert all(_plain(t) and t.dtype == torch.float64 for t in seen)
                torch.stack(seen)  # usable
            # the collector saw the plain forward of the probe batch
            assert all(abs(float(t) - stat) <= 1e-6 * stat for t in h.acts)
            assert _same(_snapshot(h.model), before)
        h.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for strategy in ("auto", "jacobian", "structured", "operator"):
                K = ntk_matrix(h.model, x, strategy=strategy)
                assert rel(K, T) < 1e-12, strategy
        assert all(_plain(t) for t in h.acts + h.kw + h.glob)
        assert _same(_snapshot(h.model), before)
    finally:
        h.remove()


class FeatureTap(nn.Module):
    """A hook that returns None and changes nothing in place, but stores the backbone's
    activation where the forward reads it: part of the function, though it looks like a
    collector (taken out, the forward read the validating pass's stale tensor: K 11% off)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.feats: dict[str, torch.Tensor] = {}
        self.backbone[1].sink = self.feats  # (through the module: a deep copy keeps the link)
        self.backbone[1].register_forward_hook(lambda m, a, o: m.sink.__setitem__("l1", o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x) + self.feats["l1"])


def test_hook_feeding_the_forward_stays_in():
    torch.manual_seed(0)
    m = FeatureTap()
    x = torch.randn(5, 6)
    T = truth_K(m, x)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        K = ntk_matrix(m, x)
    assert rel(K, T) < 1e-12
    assert any("dependence on the parameters changed" in str(i.message) for i in w)


def test_hook_registries_are_put_back_when_the_probe_fails():
    h = Hooked()
    x = torch.randn(6, 6)

    def refuses_transforms(mod, args, out):  # part of the function; fails inside a transform
        if is_functorch_wrapped_tensor(out):
            raise RuntimeError("no transforms here")
        return out + 0.0

    handle = h.model[2].register_forward_hook(refuses_transforms)
    try:
        before = _snapshot(h.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="no transforms here"):
                ntk_matrix(h.model, x, strategy="jacobian")
        assert _same(_snapshot(h.model), before)
        assert all(_plain(t) for t in h.acts + h.kw + h.glob)
    finally:
        handle.remove()
        h.remove()


def test_collector_in_a_lightning_fit_with_the_monitor():
    pl = pytest.importorskip("lightning.pytorch")
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from glu_probe.callbacks import NTKSpectrumMonitor

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
            self.acts: list[torch.Tensor] = []
            self.net[1].register_forward_hook(
                lambda m, a, o: self.acts.append(o.detach().abs().mean())
            )

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def on_train_epoch_end(self):
            assert all(_plain(t) for t in self.acts)
            self.log("act_epoch", torch.stack(self.acts).mean())
            self.acts.clear()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for method in ("dense", "lanczos"):
        pl.seed_everything(0, verbose=False)
        dl = DataLoader(TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,))), batch_size=8)
        tr = pl.Trainer(
            max_epochs=1,
            callbacks=[NTKSpectrumMonitor(every_n_steps=2, method=method)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr.fit(LM(), dl)
        assert torch.isfinite(tr.callback_metrics["act_epoch"])
        assert "ntk/lambda_max" in tr.callback_metrics or any(
            k.startswith("ntk/") for k in tr.callback_metrics
        )


# ----------------------------------------------------------------- random forwards
class Res(nn.Module):
    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.a, self.f, self.o = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.dp = DropPath(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.o(h + self.dp(torch.tanh(self.f(h))))


def _random_cases():
    torch.manual_seed(0)
    cases = []
    with contextlib.suppress(ImportError):  # (timm's DropPath)
        cases.append(("droppath", Res().train(), torch.randn(8, 6)))
    cases.append(
        (
            "dropout-48",
            nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Dropout(0.5), nn.Linear(64, 3)).train(),
            torch.randn(48, 6),
        )
    )
    cases.append(
        (
            "dropout-small",
            nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).train(),
            torch.randn(8, 6),
        )
    )
    return cases


def one_draw_K(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """J Jᵀ of the draw that jacobian_rows documents: sample i alone, its random numbers from
    the global generator seeded with seed + i, in float64."""
    m = copy.deepcopy(model).double()
    ps = list(m.parameters())
    rows = []
    state = torch.get_rng_state()
    try:
        for i in range(x.shape[0]):
            torch.manual_seed(seed + i)
            out = m(x[i : i + 1].double())
            row = out.sum() / out.numel() ** 0.5
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(row, ps)]))
    finally:
        torch.set_rng_state(state)
    J = torch.stack(rows)
    return J @ J.T


def _next_seed() -> int:
    gen = torch.Generator()
    gen.set_state(torch.get_rng_state())
    return int(torch.randint(2**62, (1,), generator=gen))


@pytest.mark.parametrize(
    "name,model,x", _random_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_train_mode_dropout_dense_K_is_one_draws_gram(name, model, x):
    torch.manual_seed(123)
    T = one_draw_K(model, x, _next_seed())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for strategy, budget in (("auto", None), ("jacobian", None), ("jacobian", 2**18)):
            torch.manual_seed(123)
            K = ntk_matrix(model, x, eval_mode=False, strategy=strategy, memory_budget=budget)
            assert rel(K, T) < 1e-12, (strategy, budget)
            if budget is None and strategy == "jacobian":
                again = K
        torch.manual_seed(123)
        s = ntk_spectrum(model, x, method="dense", eval_mode=False, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(T)
    assert float(ev[0]) > 0
    assert abs(s.lambda_min - float(ev[0])) <= 1e-9 * float(ev[-1])
    assert abs(s.lambda_max - float(ev[-1])) <= 1e-9 * float(ev[-1])
    state = torch.get_rng_state()
    torch.manual_seed(123)
    assert torch.equal(ntk_matrix(model, x, eval_mode=False, strategy="jacobian"), again)
    torch.set_rng_state(state)


# ----------------------------------------------------------------- structured strategy
def test_structured_taps_run_before_the_users_output_hooks():
    torch.manual_seed(0)
    m = mlp()
    handles = [
        m[2].register_forward_hook(lambda mod, a, o: 3.0 * o),
        m[4].register_forward_pre_hook(lambda mod, a: (a[0] - 0.25,)),
    ]
    x = torch.randn(10, 6)
    try:
        T = truth_K(m, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback, no warning
            for strategy in ("structured", "auto"):
                assert rel(ntk_matrix(m, x, strategy=strategy), T) < 1e-12, strategy
    finally:
        for h in handles:
            h.remove()


def test_structured_declines_with_a_global_output_hook():
    torch.manual_seed(0)
    m = mlp()
    m[2].scaled = True  # (an attribute: the truth's copy is scaled too)
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, a, o: 3.0 * o if getattr(mod, "scaled", False) else None
    )
    x = torch.randn(10, 6)
    try:
        T = truth_K(m, x)
        with pytest.raises(ValueError, match="global forward hook"):
            ntk_matrix(m, x, strategy="structured")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert rel(ntk_matrix(m, x), T) < 1e-12
    finally:
        handle.remove()
