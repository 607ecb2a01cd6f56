"""NTKOperator: K V against an explicit float64 J Jᵀ; chunking, linearisation, gloo shards."""

from __future__ import annotations

import copy
import datetime
import gc
import math
import os
import sys
import time
import warnings
import weakref
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TORCH_VERSION, NoForwardADNet, SquareNoJvp
from torch import nn

from glu_probe.ntk import NTKOperator, ntk_spectrum

torch.set_num_threads(1)


def explicit_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Independent truth: float64 reverse-mode Jacobian of the pNTK rows, then J Jᵀ."""
    m = copy.deepcopy(model).double().eval()
    names = [n for n, _ in m.named_parameters()]
    ps = tuple(p.detach() for p in m.parameters())

    def f(*theta):
        y = torch.func.functional_call(m, dict(zip(names, theta, strict=True)), (x.double(),))
        return y.sum(-1) / math.sqrt(y.shape[-1])

    J = torch.autograd.functional.jacobian(f, ps)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1)
    return J @ J.T


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 3))


@pytest.fixture(scope="module")
def problem():
    model = make_net()
    x = torch.randn(20, 6)
    return model, x, explicit_ntk(model, x)


def test_matvec_float64_matches_explicit_kernel(problem):
    model, x, K = problem
    op = NTKOperator(model, x, dtype=torch.float64)
    V = torch.randn(20, 5, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
    assert op.n == 20 and op.n_matvecs == 5
    v = torch.randn(20, dtype=torch.float64)
    torch.testing.assert_close(op @ v, K @ v, rtol=1e-12, atol=1e-12)
    assert op.n_matvecs == 6


def test_matvec_float32_default_accuracy(problem):
    model, x, K = problem
    op = NTKOperator(model, x)
    V = torch.randn(20, 3, dtype=torch.float64)
    out = op.matvec(V)
    assert out.dtype == torch.float32
    err = (out.double() - K @ V).norm() / (K @ V).norm()
    assert err < 1e-5


_PRECISION_SCRIPT = """
import sys, torch
from torch import nn
import glu_probe.ntk as ntk
from glu_probe.ntk.functional import _precision_knobs

setup = sys.argv[1]
if setup == "medium":
    torch.set_float32_matmul_precision("medium")
elif setup == "new-api":
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.fp32_precision = "tf32"
elif setup == "legacy":
    torch.backends.cuda.matmul.allow_tf32 = True

seen = []

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        seen.append(tuple(o.fp32_precision for o in _precision_knobs()))
        return self.b(torch.tanh(self.a(x)))

def state():
    try:  # raises where the backends' settings differ (the new-api setup, before and after)
        overall = torch.get_float32_matmul_precision()
    except RuntimeError:
        overall = "mixed"
    knobs = tuple(o.fp32_precision for o in _precision_knobs())
    return knobs, torch.backends.fp32_precision, overall

torch.manual_seed(0)
before = state()
net, x = Net(), torch.randn(6, 4)
ntk.ntk_spectrum(net, x, method="lanczos", tol=1e-6)
ntk.ntk_spectrum(net, x, method="dense")
assert state() == before, (state(), before)
assert seen and all(set(s) == {"ieee"} for s in seen), seen
if setup == "legacy":
    assert torch.backends.cuda.matmul.allow_tf32 is True
print("ok", before)
"""


@pytest.mark.parametrize("setup", ["default", "medium", "new-api", "legacy"])
def test_float32_precision_settings_ieee_inside_and_restored(setup):
    """The probe runs its float32 products in IEEE float32 (no TF32, no bf16 oneDNN matmuls)
    and gives every precision setting back. It saved and restored the legacy ``allow_tf32``
    flags until 2026-11-28: after the torch >= 2.9 ``fp32_precision`` API had been used (or
    Hugging Face ``TrainingArguments(tf32=...)``) every probe raised, and after
    ``set_float32_matmul_precision("medium")`` one probe left ``get_float32_matmul_precision()``
    raising for the rest of the process. One fresh interpreter per setup (the state is global).
    """
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: the legacy flags are the only settings")
    res = subprocess.run(
        [sys.executable, "-c", _PRECISION_SCRIPT, setup], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok")


@pytest.mark.parametrize("chunk_size", [1, 7, 20])
def test_chunked_equals_unchunked(problem, chunk_size):
    model, x, K = problem
    op = NTKOperator(model, x, dtype=torch.float64, chunk_size=chunk_size)
    V = torch.randn(20, 4, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-12, atol=1e-12)


def test_linearised_jvp_matches_and_switches(problem):
    model, x, K = problem
    V = torch.randn(20, 2, dtype=torch.float64)
    traced = NTKOperator(model, x, dtype=torch.float64, linearize=True)
    torch.testing.assert_close(traced.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
    auto = NTKOperator(model, x, dtype=torch.float64)
    for _ in range(NTKOperator.LINEARIZE_AFTER + 1):
        out = auto.matvec(V)
    assert auto._traced  # switched to the traced JVP for the long run
    torch.testing.assert_close(out, K @ V, rtol=1e-12, atol=1e-12)


def test_matvec_shape_error(problem):
    model, x, _ = problem
    with pytest.raises(ValueError, match="expects 20 rows"):
        NTKOperator(model, x).matvec(torch.randn(19, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        NTKOperator(model, x, chunk_size=0)


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    # A short timeout: a rank that fails leaves its peer waiting in a collective for this long
    # (the default is 30 minutes), and the test then reports the failing rank's error.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        _check_sharded_operator(rank)
        gc.collect()  # no tensor of the checks is left for gloo's threads to free at exit
        # Neither rank tears gloo down while its peer may still use the connection: a rank
        # that destroyed the group (and exited) mid-exchange once aborted the other in CI
        # ("terminate called without an active exception", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Success: leave without interpreter finalisation, where gloo's worker threads may still
    # free tensors that hold Python references and abort the process (SIGABRT; see
    # pytorch/pytorch#179291). A failure above raises instead and is reported by mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check_sharded_operator(rank: int) -> None:
    """Rank-sharded products and Lanczos equal the single-process ones on the whole probe."""
    model = make_net()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    shard = x[:13] if rank == 0 else x[13:]  # unequal shards
    full = NTKOperator(model, x, dtype=torch.float64)
    op = NTKOperator(model, shard, dtype=torch.float64, process_group=dist.group.WORLD)
    assert op.n == 20
    V = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(op.matvec(V), full.matvec(V), rtol=1e-12, atol=1e-12)
    ref = ntk_spectrum(model, x, method="dense")
    s = ntk_spectrum(
        model, shard, method="lanczos", dtype=torch.float64, process_group=dist.group.WORLD
    )
    assert s.n_rows == 20 and s.converged
    assert abs(s.lambda_max / ref.lambda_max - 1) < 1e-8
    assert abs(s.condition_number / ref.condition_number - 1) < 1e-6
    # Full span (slq_probes > 0, n = 20 <= 2·2·10) with a different free memory on each rank:
    # the ranks agree on one block width (the narrowest), else their collectives would not pair.
    from glu_probe.ntk import spectrum as spectrum_mod

    column = sum(p.numel() for p in model.parameters()) * 8
    fits = 16 if rank == 0 else 5
    spectrum_mod._available_bytes = lambda device: 8 * fits * column  # type: ignore[assignment]
    widths: list[int] = []
    matvec = NTKOperator.matvec

    def counting(self, V):
        widths.append(V.shape[1])
        return matvec(self, V)

    NTKOperator.matvec = counting  # type: ignore[method-assign]
    full_span = ntk_spectrum(
        model,
        shard,
        method="lanczos",
        dtype=torch.float64,
        slq_probes=2,
        slq_steps=10,
        process_group=dist.group.WORLD,
    )
    assert widths == [5, 5, 5, 5], widths
    assert full_span.effective_rank_method == "exact" and full_span.eigenvalues is not None
    torch.testing.assert_close(
        full_span.eigenvalues.sort().values, ref.eigenvalues.sort().values, rtol=1e-9, atol=1e-12
    )
    NTKOperator.matvec = matvec  # type: ignore[method-assign]
    # A shard that fails its probe check on one rank only (non-finite outputs): every rank
    # raises at once; the healthy one used to wait in the operator's all-gather until the
    # collective timeout (30 minutes by default with gloo).
    bad = shard.clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    t0 = time.perf_counter()
    for build in (
        lambda: NTKOperator(model, bad, process_group=dist.group.WORLD),
        lambda: ntk_spectrum(model, bad, method="lanczos", process_group=dist.group.WORLD),
    ):
        with pytest.raises((ValueError, RuntimeError)) as info:
            build()
        want = "NaN/Inf" if rank == 1 else "another rank failed"
        assert want in str(info.value), str(info.value)
    assert time.perf_counter() - t0 < 30
    # (Review, session 18.) A probe whose samples are not independent cannot be sharded: rank
    # 0 (3 samples) finds it, rank 1 (1 sample: nothing to compare) does not. Rank 0's refusal
    # was rank-local and rank 1 waited in the all-gather until the timeout; now both raise.
    torch.manual_seed(0)
    centred = nn.Sequential(nn.Linear(6, 8), _Centre(), nn.Tanh(), nn.Linear(8, 1)).double()
    part = torch.randn(3 if rank == 0 else 1, 6, dtype=torch.float64)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises((ValueError, RuntimeError)) as info:
            ntk_spectrum(centred, part, method="lanczos", process_group=dist.group.WORLD)
    want = "sharded across ranks" if rank == 0 else "another rank failed"
    assert want in str(info.value), str(info.value)
    assert time.perf_counter() - t0 < 30


class _Centre(nn.Module):
    """Hidden units centred on the batch mean: couples the samples."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h - h.mean(0, keepdim=True)


def test_process_group_gloo_two_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_traced_products_fold_activation_derivatives(problem):
    """The traced VJP and JVP equal autograd's, and no activation-derivative op is left to run
    per product (gelu_backward is decomposed and its φ'(x) folded into a constant)."""
    from glu_probe.ntk.operator import trace_linear_map

    model, x, K = problem
    op = NTKOperator(model, x, dtype=torch.float64, linearize=True)
    V = torch.randn(20, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
    vjp_fn, jvp_fn = op._cache[0]  # type: ignore[index]
    for fn in (vjp_fn, jvp_fn):
        assert hasattr(fn, "code")  # an FX graph module, not the autograd fallback
        # neither gelu nor gelu_backward runs per product
        assert "mm" in fn.code and "gelu" not in fn.code, fn.code
    probe = op.probe
    with probe.session():
        _, ref_vjp = torch.func.vjp(lambda *p: probe(p), *probe.params)
        u = torch.randn(20, dtype=torch.float64)
        traced = trace_linear_map(lambda a: ref_vjp(a), (u,))
        for a, b in zip(traced(u), ref_vjp(u), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_tracing_failure_falls_back_with_a_warning(problem, monkeypatch):
    import glu_probe.ntk.operator as op_mod

    def broken(fn, example):
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(op_mod, "trace_linear_map", broken)
    model, x, K = problem
    V = torch.randn(20, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="tracing the (JVP|VJP) failed"):
        op = NTKOperator(model, x, dtype=torch.float64, linearize=True)
        out = op.matvec(V)
    torch.testing.assert_close(out, K @ V, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("linearize", [False, True])
def test_products_without_forward_mode_ad_fall_back_to_double_vjp(linearize):
    """An op with no forward-mode derivative: J·u = VJP of u ↦ Jᵀu, exact to rounding."""
    model = NoForwardADNet(seed=3)
    x = torch.randn(12, 6)
    K = explicit_ntk(model, x)  # reverse mode only: independent of the fallback
    with pytest.raises(NotImplementedError, match="forward mode AD"):
        torch.func.jvp(SquareNoJvp.apply, (torch.ones(2),), (torch.ones(2),))
    op = NTKOperator(model, x, dtype=torch.float64, linearize=linearize)
    V = torch.randn(12, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="VJP of u ↦ Jᵀu"):
        out = op.matvec(V)
    torch.testing.assert_close(out, K @ V, rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per operator
        torch.testing.assert_close(op.matvec(V[:, :1]), K @ V[:, :1], rtol=1e-12, atol=1e-12)
    with pytest.warns(RuntimeWarning, match="VJP of u ↦ Jᵀu"):
        spec = ntk_spectrum(model, x, method="lanczos", dtype=torch.float64, tol=1e-10)
    truth = torch.linalg.eigvalsh(K)
    assert spec.converged
    assert spec.lambda_max == pytest.approx(float(truth[-1]), rel=1e-8)
    assert spec.lambda_min == pytest.approx(float(truth[0]), rel=1e-6)


class _Float32Only(nn.Module):
    """Refuses float64, as kernels without a float64 version do (grouped GEMMs of MoE layers)."""

    def __init__(self, refuse_float32: bool = False) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)
        self.refuse_float32 = refuse_float32
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # refuse_float32: after the probe's validating forward pass (the first call), so that
        # both Jacobian-row attempts fail.
        self.calls += 1
        if x.dtype == torch.float64 or (self.refuse_float32 and self.calls > 1):
            raise RuntimeError(f"no {x.dtype} kernel for this op")
        return self.b(torch.tanh(self.a(x)))


def test_dense_path_falls_back_to_float32_rows_when_the_model_refuses_float64():
    model = _Float32Only()
    x = torch.randn(10, 6)
    with pytest.warns(RuntimeWarning, match="does not run in float64.*float32 Jacobian rows"):
        spec = ntk_spectrum(model, x, method="dense")
    chosen = ntk_spectrum(model, x, method="dense", jacobian_dtype=torch.float32)
    assert spec.precision == chosen.precision == "mixed"
    torch.testing.assert_close(spec.eigenvalues, chosen.eigenvalues, rtol=0, atol=0)
    # Independent truth: the same network in float64 (the refusal lifted), reverse mode.
    same = nn.Sequential(copy.deepcopy(model.a), nn.Tanh(), copy.deepcopy(model.b))
    truth = torch.linalg.eigvalsh(explicit_ntk(same, x))
    assert spec.residual_min > 0 and spec.residual_max > 0  # the rows' rounding bound
    assert abs(spec.lambda_min - float(truth[0])) <= spec.residual_min
    assert abs(spec.lambda_max - float(truth[-1])) <= spec.residual_max
    torch.testing.assert_close(spec.eigenvalues, truth, rtol=1e-5, atol=1e-6 * float(truth[-1]))


def test_dense_path_raises_the_float64_error_when_float32_fails_too():
    model = _Float32Only()
    x = torch.randn(10, 6)
    probe_ok = ntk_spectrum(model, x, method="dense", jacobian_dtype=torch.float32)
    assert probe_ok.n_rows == 10
    model.refuse_float32, model.calls = True, 0
    with pytest.raises(RuntimeError, match=r"no torch\.float64 kernel"):
        ntk_spectrum(model, x, method="dense")


def test_forward_mode_decompositions_load_without_torchs_deprecation_warning():
    """torch >= 2.10 warns "torch.jit.script is deprecated" once per scripted forward-mode
    decomposition when the first JVP of a process loads them (18 times under an "always"
    filter); the NTK monitor relayed that as a probe warning. The operator loads them with that
    one message silenced. A fresh interpreter: the loading happens once per process."""
    import subprocess
    import sys

    script = (
        "import warnings, torch\n"
        "from torch import nn\n"
        "from glu_probe.ntk import ntk_spectrum\n"
        "net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    ntk_spectrum(net, torch.randn(5, 3), method='lanczos', tol=1e-6)\n"
        "print(sum('jit.script' in str(w.message) for w in seen))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "0"


def test_default_traces_only_when_enough_products_remain(problem):
    """Tracing costs 10–200 untraced products: with the caller's bound on the products still
    to come (``expected_products``), the default traces only where at least
    ``TRACE_MIN_REMAINING`` remain; without a bound it keeps the old rule."""
    model, x, K = problem
    V = torch.randn(20, 2, dtype=torch.float64)
    after = NTKOperator.LINEARIZE_AFTER
    for expected, traced in (
        (after + NTKOperator.TRACE_MIN_REMAINING - 1, False),
        (after + NTKOperator.TRACE_MIN_REMAINING, True),
        (None, True),
    ):
        op = NTKOperator(model, x, dtype=torch.float64)
        op.expected_products = expected
        for _ in range(after + 1):
            out = op.matvec(V)
        assert op._traced is traced, expected
        torch.testing.assert_close(out, K @ V, rtol=1e-12, atol=1e-12)


def test_forced_lanczos_on_a_small_kernel_does_not_trace(problem, monkeypatch):
    """A 20-row kernel spans its whole space in at most 21 single-column products: tracing
    (about a second on the ViT of benchmarks §4, where it was 70% of the forced Lanczos time)
    cannot pay for itself there. The result is still exact."""
    import glu_probe.ntk.operator as operator_module

    model, x, K = problem
    calls = []
    real = operator_module.trace_linear_map
    monkeypatch.setattr(
        operator_module, "trace_linear_map", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    spec = ntk_spectrum(model, x, method="lanczos", dtype=torch.float64, block_size=1)
    assert spec.n_matvecs > NTKOperator.LINEARIZE_AFTER  # the old rule traced here
    assert calls == []
    ev = torch.linalg.eigvalsh(K)
    assert spec.lambda_max == pytest.approx(float(ev[-1]), rel=1e-9)
    assert spec.lambda_min == pytest.approx(float(ev[0]), rel=1e-6)


class _FakeGraph:
    """Stands in for the CUDA graph on the CPU: 'captures' by keeping the function and
    'replays' by calling it (``mode``: "ok"; "raise" in the capture; "wrong" replays; "stale":
    replays return the capture's output whatever the input, as a graph does whose work ran
    outside the capture)."""

    mode = "ok"
    captured: ClassVar[list] = []
    attempts = 0
    alive: ClassVar[list] = []

    def __init__(self, key, fn, U):
        type(self).attempts += 1
        if self.mode == "raise":
            raise RuntimeError("operation not permitted when stream is capturing")
        self.key, self.fn = key, fn
        self.static_in = U.clone()
        self.static_out = fn(U)
        type(self).captured.append(key)
        type(self).alive.append(weakref.ref(self))

    def __call__(self, U):
        if self.mode == "stale":
            return self.static_out.clone()
        out = self.fn(U)
        return out + 1.0 if self.mode == "wrong" else out


@pytest.fixture
def fake_graphs(monkeypatch):
    import glu_probe.ntk.operator as operator_module

    _FakeGraph.captured, _FakeGraph.alive, _FakeGraph.attempts = [], [], 0
    _FakeGraph.mode = "ok"
    monkeypatch.setattr(operator_module, "_GraphedProduct", _FakeGraph)
    monkeypatch.setattr(operator_module, "_UNGRAPHABLE", weakref.WeakSet())
    monkeypatch.setattr(
        NTKOperator,
        "_graphs_wanted",
        lambda self: self.probe.model not in operator_module._UNGRAPHABLE,
    )
    monkeypatch.setattr(
        NTKOperator, "_on_own_stream", lambda self, local, k: self._graph_product(local, k)
    )
    return _FakeGraph


def test_graph_capture_logic_replays_after_two_products_per_width(problem, fake_graphs):
    model, x, K = problem
    op = NTKOperator(model, x, dtype=torch.float64, linearize=False)
    for k, replays in ((3, [0, 0, 1, 2, 3]), (1, [3, 3, 4])):
        for want in replays:
            V = torch.randn(20, k, dtype=torch.float64)
            torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
            assert op.n_graph_replays == want
    # one graph at a time: width 3, then width 1 (captured on its second product)
    assert fake_graphs.captured == [(3, False), (1, False)]
    assert op._graph is not None and op._graph.key == (1, False)
    assert op.n_matvecs == 5 * 3 + 3
    op.release()
    assert op._graph is None


@pytest.mark.parametrize("mode", ["raise", "wrong", "stale"])
def test_failed_or_wrong_capture_falls_back_to_eager_products(problem, fake_graphs, mode):
    """A capture that fails (a sync inside the model), a replay that disagrees with the eager
    product, or a graph whose output ignores its input (the check replays on a second block,
    not the capture's own: review 2026-11-28) drops graphs for good, with one RuntimeWarning;
    every product stays exact, and a later operator on the model does not try again."""
    model, x, K = problem
    fake_graphs.mode = mode
    op = NTKOperator(model, x, dtype=torch.float64, linearize=False)
    V = torch.randn(20, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="CUDA graph failed"):
        for _ in range(2):
            torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
    assert op.n_graph_replays == 0 and op._graph is None
    assert len(fake_graphs.captured) == (0 if mode == "raise" else 1)
    again = NTKOperator(model, x, dtype=torch.float64, linearize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            torch.testing.assert_close(again.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
    assert fake_graphs.attempts == 1


def test_alternating_widths_never_capture_and_a_new_width_drops_the_graph(problem, fake_graphs):
    """A capture needs GRAPH_AFTER products of one width in a row: widths 4 and 1 in turn
    captured on every switch before (24 products, 22 captures, 0 replays; review 2026-11-28).
    A product of another width drops the held graph before it runs, so two products'
    workspaces are never held at once."""
    model, x, K = problem
    op = NTKOperator(model, x, dtype=torch.float64, linearize=False)
    for i in range(12):
        V = torch.randn(20, 4 if i % 2 else 1, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
    assert fake_graphs.captured == [] and op.n_graph_replays == 0
    for _ in range(3):
        op.matvec(torch.randn(20, 3, dtype=torch.float64))
    assert op._graph is not None and op.n_graph_replays == 1
    op.matvec(torch.randn(20, 2, dtype=torch.float64))
    assert op._graph is None
    assert op.n_matvecs == 6 * 1 + 6 * 4 + 3 * 3 + 2


def test_rechunk_and_tracing_drop_or_rekey_the_graph(problem, fake_graphs):
    model, x, K = problem
    V = torch.randn(20, 2, dtype=torch.float64)
    op = NTKOperator(model, x, dtype=torch.float64, linearize=False)
    for _ in range(3):
        op.matvec(V)
    assert op._graph is not None
    op.rechunk(7)
    assert op._graph is None and op._cache is None
    torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
    auto = NTKOperator(model, x, dtype=torch.float64)  # traces after LINEARIZE_AFTER products
    for _ in range(NTKOperator.LINEARIZE_AFTER + 3):
        out = auto.matvec(V)
    assert auto._traced and auto._graph is not None and auto._graph.key == (2, True)
    torch.testing.assert_close(out, K @ V, rtol=1e-12, atol=1e-12)
    assert auto.n_matvecs == 2 * (NTKOperator.LINEARIZE_AFTER + 3)


def test_ntk_spectrum_frees_its_graph_before_returning(problem, fake_graphs):
    """The operator sits in a reference cycle (its cached maps refer to it): without an
    explicit release its CUDA graph (a product's workspace) lived on until the garbage
    collector ran (review 2026-11-28)."""
    import gc

    model, x, K = problem
    gc.disable()
    try:
        spec = ntk_spectrum(model, x, method="lanczos", dtype=torch.float64)
        assert fake_graphs.captured, "the Lanczos products should have been captured"
        assert all(ref() is None for ref in fake_graphs.alive)
    finally:
        gc.enable()
    ev = torch.linalg.eigvalsh(K)
    assert spec.lambda_max == pytest.approx(float(ev[-1]), rel=1e-9)


def test_expected_products_bounds_the_products_run(monkeypatch):
    """With thick restarts (a basis just under n) blocks get narrower and products more: the
    bound counted full-width blocks and was exceeded, 58 products against 50 (review
    2026-11-28). It is now an upper bound in every case tried."""
    from glu_probe.ntk import krylov, spectrum

    runs = []
    real = NTKOperator.matvec

    def spy(self, V):
        runs.append(self)
        return real(self, V)

    monkeypatch.setattr(NTKOperator, "matvec", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 1)).double()
    x = torch.randn(37, 5, dtype=torch.float64)
    for basis in (None, 36, 32, 12):
        if basis is not None:
            monkeypatch.setattr(
                spectrum, "default_max_basis", lambda n, b, d, m=basis: max(m, 4 * b)
            )
            monkeypatch.setattr(krylov, "default_max_basis", lambda n, b, d, m=basis: max(m, 4 * b))
        for block in (1, 3, 8):
            runs.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # (not converged in 400)
                ntk_spectrum(model, x, method="lanczos", dtype=torch.float64, block_size=block)
            op = runs[0]
            assert op._n_products <= op.expected_products, (basis, block)


def _tiny_vit() -> nn.Module:
    """A one-block timm ViT on 8x8 images (seeded), in eval mode; skips without timm."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=3, num_classes=3, embed_dim=16, depth=1, num_heads=2
    ).eval()


def _traced_pair(model: nn.Module, x: torch.Tensor, fuse: bool, monkeypatch) -> NTKOperator:
    """A float64 operator whose products are traced now, with or without the accumulation
    rewrites (``operator._fuse_accumulations``)."""
    import glu_probe.ntk.operator as operator_mod

    real = operator_mod._fuse_accumulations
    counts: list[int] = []
    monkeypatch.setattr(
        operator_mod,
        "_fuse_accumulations",
        (lambda gm: counts.append(real(gm)) or counts[-1]) if fuse else (lambda gm: 0),
    )
    op = NTKOperator(model, x, dtype=torch.float64, linearize=True)
    op.matvec(torch.randn(op.n, 1, dtype=torch.float64))  # traces here
    monkeypatch.setattr(operator_mod, "_fuse_accumulations", real)
    op.fused_counts = counts  # type: ignore[attr-defined]
    return op


def test_accumulation_rewrites_keep_the_products_of_a_vit_and_an_mlp(monkeypatch):
    """Sums of products in the traced JVP become addmm / addmm_ / baddbmm_ / addcmul_ (23 on
    this ViT: Linear biases and weight tangents, attention's two bmm, LayerNorm's muls). The
    products, one column and a vmapped block of three, equal the unrewritten trace's to float64
    rounding, and the MLP's equal the explicit float64 K."""
    vit = _tiny_vit()
    xv = torch.randn(3, 3, 8, 8)
    model, x, K = make_net(1), torch.randn(12, 6), None
    K = explicit_ntk(model, x)
    for net, inp in ((vit, xv), (model, x)):
        fused = _traced_pair(net, inp, True, monkeypatch)
        plain = _traced_pair(net, inp, False, monkeypatch)
        assert sum(fused.fused_counts) > 0
        for k in (1, 3):
            V = torch.randn(fused.n, k, dtype=torch.float64)
            ref = plain.matvec(V)
            torch.testing.assert_close(fused.matvec(V), ref, rtol=1e-12, atol=1e-12)
            if net is model:
                torch.testing.assert_close(fused.matvec(V), K @ V, rtol=1e-10, atol=1e-10)
    assert sum(_traced_pair(vit, xv, True, monkeypatch).fused_counts) >= 8


def test_accumulation_rewrites_are_out_of_place_and_vmap_cleanly(capfd):
    """Every rewrite is out of place (addmm / baddbmm / addcmul): inputs and shared results keep
    their values, and under vmap (the operator's block products) the graph runs the ops'
    batching rules: no per-column fallback and its "performance drop" warning, and a sum whose
    accumulator does not depend on the input still works (an in-place first version failed
    there). A bias added after a view that changes the last dimension is left alone. Every
    output keeps its value, called directly and under vmap, three times over."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from glu_probe.ntk.operator import _fuse_accumulations

    gen = torch.Generator().manual_seed(3)
    W = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    W2 = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    bias4 = torch.randn(4, generator=gen, dtype=torch.float64)
    bias8 = torch.randn(8, generator=gen, dtype=torch.float64)
    A = torch.randn(2, 8, 3, generator=gen, dtype=torch.float64)

    def fn(u: torch.Tensor):
        t = u @ W  # also returned
        s = t + u @ W2
        r = u + u @ W2  # the input accumulates
        q = (u @ W).view(6, 2, 4) + bias4  # the view changes the last dimension: left alone
        p = (u @ W) + (u @ W2)
        b = u @ W2 + bias8  # a bias vector
        w = (u @ W).view(2, 3, 8) + (u @ W2).view(2, 3, 8)  # through 3-D views
        c = (u @ W + bias8) + u @ W2  # chained
        z = torch.ones(6, 8, dtype=u.dtype) @ W + u @ W2  # accumulator independent of u
        m = torch.bmm(u.view(2, 3, 8), A) + torch.bmm(u.view(2, 3, 8) * 2, A)
        e = (u * t) + (u * 3.0)  # u * 3.0 accumulates u * t
        e2 = (u * t) + (t * t)
        d = s * 2
        return s, t, r, q, p, b, w, c, z, m, e, e2, d + d

    u = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    U = torch.randn(3, 6, 8, generator=gen, dtype=torch.float64)
    gm = make_fx(fn)(u)
    before = [o.clone() for o in fn(u)]
    before_v = [o.clone() for o in torch.vmap(fn)(U)]
    n = _fuse_accumulations(gm)
    targets = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
    assert not any(t.endswith("_.default") for t in targets), targets  # nothing in place
    assert targets.count("aten.baddbmm.default") == 1 and targets.count("aten.addcmul.default") == 2
    if TORCH_VERSION >= (2, 8):
        assert targets.count("aten.addmm.default") == 8  # s, r, p, b, w, c (two), z
        assert n == 11
    else:
        # torch < 2.8: make_fx leaves the get_attr nodes of captured constants (bias8) without
        # meta["val"], so the two bias-vector rewrites (b, c) are not made; the values below are
        # the same, only their fusion is lost
        assert targets.count("aten.addmm.default") >= 6 and n >= 9
    u_copy = u.clone()
    capfd.readouterr()
    for _ in range(3):  # repeated calls: nothing drifts
        after = gm(u)
        after_v = torch.vmap(gm)(U)
        assert torch.equal(u, u_copy)
        for a, b in zip(after, before, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
        for a, b in zip(after_v, before_v, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    assert "performance drop" not in capfd.readouterr().err


def test_in_place_copy_writes_only_into_its_own_temporaries():
    """The unbatched copy of a traced map (``operator._in_place_copy``) accumulates in place
    where the accumulator is a fresh temporary that only the accumulation reads, and nowhere
    else: not into the input, a result also returned, a view of a shared value, a bias vector
    or a folded constant. Three calls give the out-of-place map's outputs to float64 rounding,
    and the input, the returned values and the constants keep theirs (a wrong in-place write
    would drift from call to call)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from glu_probe.ntk.operator import _fuse_accumulations, _in_place_copy, trace_linear_map

    gen = torch.Generator().manual_seed(5)
    W, W2 = (torch.randn(8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    bias8 = torch.randn(8, generator=gen, dtype=torch.float64)
    A = torch.randn(2, 8, 3, generator=gen, dtype=torch.float64)

    def fn(u: torch.Tensor):
        t = u @ W  # also returned: its accumulation stays out of place
        s = t + u @ W2
        p = (u @ W) + (u @ W2)  # a fresh temporary: in place
        b = u @ W2 + bias8  # a bias vector: out of place
        h = u.view(2, 3, 8) * 2  # read twice below
        w = h + (u @ W2).view(2, 3, 8)  # accumulates into h, which m reads too: out of place
        m = torch.bmm(h, A) + torch.bmm(u.view(2, 3, 8), A)
        e = (u * 3.0) + (u * t)
        return s, t, p, b, w, m, e

    u = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    gm = make_fx(fn)(u)
    _fuse_accumulations(gm)
    single = _in_place_copy(gm)
    assert single is not None
    targets = [str(n.target) for n in single.graph.nodes if n.op == "call_function"]
    assert sum(t.endswith("_.default") for t in targets) >= 2, targets  # p, m or e at least
    ref = [o.clone() for o in gm(u)]
    u_copy = u.clone()
    for _ in range(3):
        got = single(u)
        assert torch.equal(u, u_copy)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    # a folded constant accumulator (C does not depend on the input) is never written
    C0, C1 = torch.randn(6, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    traced = trace_linear_map(lambda v: C0 @ C1 + v @ W, (u,))
    for _ in range(3):
        one = traced.unbatched(u) if hasattr(traced, "unbatched") else traced(u)
        torch.testing.assert_close(one, C0 @ C1 + u @ W, rtol=1e-13, atol=1e-13)


def test_single_column_products_run_the_in_place_copy():
    """A traced operator's single-column product runs each map's in-place copy, and its
    products equal the explicit K's over repeated calls (blocks of columns keep the vmapped
    out-of-place maps, compared in ``test_accumulation_rewrites_keep_the_products...``)."""
    vit = _tiny_vit()
    x = torch.randn(3, 3, 8, 8)
    K = explicit_ntk(vit, x)
    op = NTKOperator(vit, x, dtype=torch.float64, linearize=True)
    v = torch.randn(op.n, 1, dtype=torch.float64)
    first = op.matvec(v)
    assert hasattr(op._cache[0][1], "unbatched")  # the JVP has accumulations to do in place
    for out in [first] + [op.matvec(v) for _ in range(3)]:
        torch.testing.assert_close(out, K @ v, rtol=1e-10, atol=1e-10)
    V = torch.randn(op.n, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-10, atol=1e-10)


class _InplaceResidual(nn.Module):
    """An activation updated in place in the forward (``h += c``), as residual blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.c = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h += self.c
        return self.b(torch.relu(h))


def test_in_place_updates_in_the_forward_keep_products_right_over_repeated_calls():
    """A traced JVP of this model replayed ``h += c`` on the folded primal at every call, so the
    products drifted (relative errors 0.5, 1.0, 1.6, 2.1 over four calls; review, 2026-11-28),
    and the one-call check of the trace could not see it. The trace is now refused with a
    warning, and every product equals the untraced operator's and the explicit K's."""
    torch.manual_seed(0)
    model, x = _InplaceResidual(), torch.randn(4, 6)
    K = explicit_ntk(model, x)
    V = torch.randn(4, 2, dtype=torch.float64)
    op = NTKOperator(model, x, dtype=torch.float64, linearize=True)
    if TORCH_VERSION >= (2, 6):
        with pytest.warns(RuntimeWarning, match="mutates a constant in place"):
            first = op.matvec(V)
    else:
        # torch < 2.6: make_fx records ``copy_(addmm, add)`` into a tensor the trace recomputes
        # at every call, not a mutation of a folded constant: nothing to refuse, and the
        # products below are right over repeated calls all the same
        first = op.matvec(V)
    for out in [first] + [op.matvec(V) for _ in range(4)]:
        torch.testing.assert_close(out, K @ V, rtol=1e-10, atol=1e-10)


def test_cpu_block_products_time_both_ways_then_keep_the_faster(problem, monkeypatch):
    """On the CPU a traced operator times BLOCK_TRIALS products of a k > 1 block vmapped and
    as many column by column, then keeps the faster for that width (``block_mode``); every
    product, trial or not, is K V. Untraced maps, single columns and ``release`` leave it
    alone."""
    model, x, K = problem
    op = NTKOperator(model, x, dtype=torch.float64, linearize=True)
    calls: list[int] = []
    eager = NTKOperator._eager_product

    def spy(self, local, k, cached):
        calls.append(k)
        return eager(self, local, k, cached)

    monkeypatch.setattr(NTKOperator, "_eager_product", spy)
    clock = iter([0.0, 1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.5])  # vmap 1 s, columns 0.5 s
    monkeypatch.setattr("glu_probe.ntk.operator.time.perf_counter", lambda: next(clock))
    for i in range(2 * NTKOperator.BLOCK_TRIALS + 2):
        V = torch.randn(20, 4, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
        if i < 2 * NTKOperator.BLOCK_TRIALS - 1:
            assert 4 not in op.block_mode
    assert op.block_mode == {4: "columns"}
    # trials alternate vmap (one call with k=4) and columns (four calls with k=1); then columns
    assert calls == [4, 1, 1, 1, 1, 4, 1, 1, 1, 1] + [1] * 8
    op.matvec(torch.randn(20, 1, dtype=torch.float64))
    assert set(op.block_mode) == {4}  # single columns: nothing to choose
    op.release()
    assert op.block_mode == {}

    untraced = NTKOperator(model, x, dtype=torch.float64, linearize=False)
    for _ in range(2 * NTKOperator.BLOCK_TRIALS + 1):
        V = torch.randn(20, 4, dtype=torch.float64)
        torch.testing.assert_close(untraced.matvec(V), K @ V, rtol=1e-12, atol=1e-12)
    assert untraced.block_mode == {}
