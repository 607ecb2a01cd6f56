"""Review session 28: the NTK probe on wrapped, quantisation-aware and sparse models.

QAT observers that update their buffers without a version bump (the probe's copies drifted),
``sparse=True`` embeddings (torch.func refused their sparse gradients), DataParallel /
DistributedDataParallel (probed through ``.module``), TorchScript and ``torch.export`` modules
(clear errors), and the ``nn.MultiheadAttention`` fast path (no forward-mode AD: every product
fell back to reverse mode). Truth: per-row reverse-mode Jacobians of a deep copy (float64 where
the model runs in it), ``K = J Jᵀ`` and ``eigvalsh``."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from glu_probe.ntk import NTKOperator, ntk_matrix, ntk_spectrum
from glu_probe.ntk import functional as functional_mod
from glu_probe.ntk.functional import ProbeFunction

torch.set_num_threads(1)


def pntk_rows(out: torch.Tensor) -> torch.Tensor:
    """The probe's default rows: Σ_o f_o / √O per sample (per token for a (B, T, O) output)."""
    return (out.sum(-1) / math.sqrt(out.shape[-1])).reshape(-1)


def truth_kernel(
    model: nn.Module,
    call: Callable[[nn.Module], torch.Tensor],
    dtype: torch.dtype = torch.float64,
    params: Callable[[nn.Module], list[nn.Parameter]] | None = None,
) -> torch.Tensor:
    """K = J Jᵀ (float64) of the pNTK rows of an eval-mode deep copy in ``dtype``, J from
    per-row reverse-mode gradients (sparse gradients made dense)."""
    m = copy.deepcopy(model).to(dtype).eval()
    ps = params(m) if params else [p for p in m.parameters() if p.requires_grad]
    rows = pntk_rows(call(m))
    J = []
    for r in rows:
        grads = torch.autograd.grad(r, ps, retain_graph=True)
        J.append(torch.cat([(g.to_dense() if g.is_sparse else g).reshape(-1) for g in grads]))
    Jm = torch.stack(J).double()
    return Jm @ Jm.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def caught(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in rec]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


# ------------------------------------------------- 1. QAT observers mutate without a version bump


class QatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import torch.ao.quantization as tq

        self.q = tq.QuantStub()
        self.a = nn.Linear(5, 16)
        self.r = nn.ReLU()
        self.b = nn.Linear(16, 3)
        self.dq = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dq(self.b(self.r(self.a(self.q(x)))))


@pytest.fixture
def qat_model() -> tuple[nn.Module, torch.Tensor]:
    """The default fbgemm QAT model (FusedMovingAvgObsFakeQuantize), calibrated on x: the
    model's own forward on x is then a fixed point of its observers."""
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = QatNet()
        m.qconfig = tq.get_default_qat_qconfig("fbgemm")
        m.train()
        tq.prepare_qat(m, inplace=True)
    x = torch.randn(8, 5)
    m(x)
    m(x)
    m.eval()
    return m, x


def test_qat_observer_buffers_do_not_drift_into_k(qat_model):
    m, x = qat_model
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    # (fake-quantisation has no float64 kernel: float32 reverse mode on a copy of the model)
    Kt = truth_kernel(m, lambda d: d(x), dtype=torch.float32)
    ev = torch.linalg.eigvalsh(Kt)
    probe = ProbeFunction(m, x, dtype=torch.float32)
    assert probe._clone_buffers  # (the value check saw the observers' updates)
    with probe.session(), torch.no_grad():
        rows = probe(probe.params)
    ref = pntk_rows(copy.deepcopy(m)(x)).detach()
    assert torch.equal(rows, ref)  # (was 3.5e-2 off)
    K = ntk_matrix(m, x, dtype=torch.float32, strategy="operator")
    assert rel(K, Kt) < 1e-5  # (was 0.19)
    spec = ntk_spectrum(m, x, method="lanczos")
    assert spec.converged
    assert abs(spec.lambda_max / ev[-1].item() - 1) < 1e-5  # (was 3.1e-3 with converged=True)
    assert abs(spec.lambda_min / ev[0].item() - 1) < 1e-4
    for n, b in m.named_buffers():  # the model's own observers are untouched
        assert torch.equal(b, buffers[n]), n


def test_value_check_is_once_per_probe_not_per_product(monkeypatch):
    """An ordinary model with buffers (eval BatchNorm) keeps sharing its copies across passes,
    and the value comparison runs at the probe's construction only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    net[1].running_mean.normal_()
    net.eval()
    x = torch.randn(6, 5)
    calls = []
    real = functional_mod._same_values
    monkeypatch.setattr(functional_mod, "_same_values", lambda a, b: calls.append(1) or real(a, b))
    op = NTKOperator(net, x, dtype=torch.float64)
    built = len(calls)
    assert 0 < built <= len(list(net.buffers()))
    assert not op.probe._clone_buffers
    V = torch.randn(op.probe.n_rows, 3, dtype=torch.float64)
    KV = op.matvec(V)
    assert len(calls) == built  # no comparison per product
    Kt = truth_kernel(net, lambda d: d(x.double()))
    torch.testing.assert_close(KV, Kt @ V, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- 2. sparse=True embeddings

IDS = torch.tensor([[1, 2, 3, 4], [3, 5, 4, 5], [6, 7, 8, 9]])


class Emb(nn.Module):
    def __init__(self, bag: bool) -> None:
        super().__init__()
        self.e: nn.Module = (
            nn.EmbeddingBag(10, 4, mode="mean", sparse=True)
            if bag
            else nn.Embedding(10, 4, sparse=True)
        )
        self.bag = bag
        self.l = nn.Linear(4, 3)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.e(i))
        return self.l(h if self.bag else h.mean(1))


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
def test_sparse_embedding_probed_with_dense_gradients(bag):
    torch.manual_seed(0)
    m = Emb(bag)
    Kt = truth_kernel(m, lambda d: d(IDS))
    ev = torch.linalg.eigvalsh(Kt)
    K = ntk_matrix(m, IDS, dtype=torch.float64)  # (raised "aten::view ... SparseCPU")
    assert rel(K, Kt) < 1e-12
    assert m.e.sparse is True
    dense = ntk_spectrum(m, IDS, method="dense")
    assert abs(dense.condition_number / (ev[-1] / ev[0]).item() - 1) < 1e-8
    if not bag:  # (EmbeddingBag has neither forward-mode AD nor a double backward: no Lanczos)
        lz = ntk_spectrum(m, IDS, method="lanczos")
        assert abs(lz.lambda_max / ev[-1].item() - 1) < 1e-5
    assert m.e.sparse is True
    # training with a sparse optimizer still works after the probe
    opt = torch.optim.SparseAdam(list(m.e.parameters()), lr=0.1)
    before = m.e.weight.detach().clone()
    m.train()
    m(IDS).square().sum().backward()
    assert m.e.weight.grad is not None and m.e.weight.grad.is_sparse
    opt.step()
    assert not torch.equal(m.e.weight.detach(), before)


def test_sparse_flag_restored_when_the_probe_fails():
    class Fails(Emb):
        def forward(self, i: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    m = Fails(False)
    with pytest.raises(RuntimeError, match="boom"):
        ProbeFunction(m, IDS)
    assert m.e.sparse is True


# ---------------------------------------------------------------- 3. wrappers


def test_data_parallel_probes_its_module():
    torch.manual_seed(0)
    net = mlp()
    x = torch.randn(6, 5)
    dp = nn.DataParallel(net)
    Kt = truth_kernel(net, lambda d: d(x.double()))
    K = ntk_matrix(dp, x, dtype=torch.float64)  # (raised torch's "stateless API" error)
    assert rel(K, Kt) < 1e-12
    ev = torch.linalg.eigvalsh(Kt)
    s = ntk_spectrum(dp, x, method="lanczos")
    assert abs(s.lambda_max / ev[-1].item() - 1) < 1e-6
    # a filter names the wrapper's parameters, as the user sees them
    Kt0 = truth_kernel(net, lambda d: d(x.double()), params=lambda d: [d[0].weight])
    for params in (["module.0.weight"], "module.0.weight", lambda n, p: n == "module.0.weight"):
        K0 = ntk_matrix(dp, x, params=params, dtype=torch.float64)
        assert rel(K0, Kt0) < 1e-12
    assert ProbeFunction(dp, x, params=["module.0.weight"]).names == ("0.weight",)
    with pytest.raises(ValueError, match=r"module\.0"):
        ntk_matrix(dp, x, params=["0.nope"])


def test_distributed_data_parallel_probes_its_module(tmp_path):
    """DDP (one gloo rank, in a fresh process: the process group is global) is probed through
    its module (its forward may sync buffers, a collective, at every probe pass), with the
    same K."""
    script = textwrap.dedent(
        f"""
        import os, sys, torch, torch.distributed as dist
        from torch import nn
        from glu_probe.ntk import ntk_matrix
        from glu_probe.ntk.functional import ProbeFunction
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="file://{tmp_path}/init", rank=0,
                                world_size=1)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
        x = torch.randn(6, 5)
        K0 = ntk_matrix(net, x, dtype=torch.float64)
        ddp = nn.parallel.DistributedDataParallel(net)
        K = ntk_matrix(ddp, x, dtype=torch.float64)
        print("REL", float((K - K0).norm() / K0.norm()))
        probe = ProbeFunction(ddp, x, params="module.2")
        print("RUNS", probe.model is net, probe.names == ("2.weight", "2.bias"))
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = [t for t in done.stdout.splitlines() if t.startswith("REL")][-1]
    assert float(line.split()[1]) < 1e-12
    assert "RUNS True True" in done.stdout  # (the wrapped module itself, by its own names)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_refused_clearly(how):
    torch.manual_seed(0)
    net = mlp()
    x = torch.randn(6, 5)
    scripted = torch.jit.script(net) if how == "script" else torch.jit.trace(net, x)
    for fn in (lambda: ntk_matrix(scripted, x), lambda: ntk_spectrum(scripted, x)):
        with pytest.raises(ValueError, match=r"TorchScript module .*original nn\.Module"):
            fn()


def test_exported_module_needs_eval_mode_false():
    torch.manual_seed(0)
    net = mlp()
    x = torch.randn(6, 5)
    exported = torch.export.export(net.eval(), (x,)).module()
    for fn in (lambda: ntk_matrix(exported, x), lambda: ntk_spectrum(exported, x)):
        # (raised "Calling train() is not supported yet." from the probe's own restore)
        with pytest.raises(ValueError, match="eval_mode=False"):
            fn()
    Kt = truth_kernel(net, lambda d: d(x.double()))
    K = ntk_matrix(exported, x, eval_mode=False, dtype=torch.float64)
    assert rel(K, Kt) < 1e-12


# ---------------------------------------------------------------- 4. the MHA fast path


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.o = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.enc(x))


@pytest.mark.parametrize("fastpath", [True, False])
def test_transformer_fast_path_off_inside_the_probe(fastpath):
    torch.manual_seed(0)
    m = Encoder().eval()
    x = torch.randn(2, 4, 8)
    Kt = truth_kernel(m, lambda d: d(x.double()))
    ev = torch.linalg.eigvalsh(Kt)
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        s, messages = caught(lambda: ntk_spectrum(m, x, method="lanczos", dtype=torch.float64))
        assert not [t for t in messages if "forward AD" in t]  # (every product fell back)
        assert torch.backends.mha.get_fastpath_enabled() is fastpath
        assert abs(s.lambda_max / ev[-1].item() - 1) < 1e-8
        assert abs(s.lambda_min / ev[0].item() - 1) < 1e-6
        K = ntk_matrix(m, x, dtype=torch.float64)
        assert rel(K, Kt) < 1e-12
        assert torch.backends.mha.get_fastpath_enabled() is fastpath
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def test_fast_path_setting_restored_on_error():
    class Fails(Encoder):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not torch.backends.mha.get_fastpath_enabled()
            raise RuntimeError("boom")

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ProbeFunction(Fails(), torch.randn(2, 4, 8))
        assert torch.backends.mha.get_fastpath_enabled() is True
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
