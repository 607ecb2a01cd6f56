"""CUDA checks (skipped without a GPU): the same numbers on the device as dense float64 truth.

Run on a CUDA machine with ``pytest -m gpu`` (``benchmarks/gpu_check.sh`` does so).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import NoForwardADNet, fused_layout, ran_fused

import glu_probe
from glu_probe import gated_product
from glu_probe.ntk import ntk_spectrum
from glu_probe.theory import empirical_ntk, two_layer

pytestmark = pytest.mark.gpu


def _truth(model, X):
    evals = torch.linalg.eigvalsh(empirical_ntk(model.cpu(), X.cpu().double()))
    return float(evals[-1]), float(evals[0])


@pytest.mark.parametrize("kind", ["relu", "reglu"])
@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_ntk_spectrum_on_cuda_matches_float64_truth(kind, method):
    torch.manual_seed(0)
    model = two_layer(kind, 8, 64, seed=0)
    X = torch.randn(48, 8)
    lam_max, lam_min = _truth(copy.deepcopy(model), X)
    spec = ntk_spectrum(
        model.cuda(), X.cuda(), method=method, dtype=torch.float64, tol=1e-8, max_matvecs=400
    )
    assert spec.lambda_max == pytest.approx(lam_max, rel=1e-6)
    assert spec.lambda_min == pytest.approx(lam_min, rel=1e-4)
    assert spec.converged
    assert next(model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("kind", ["relu", "reglu"])
def test_mixed_precision_dense_path_on_cuda_within_its_bound(kind):
    """float32 Jacobian rows on the GPU, float64 K and eigh. The user has TF32 on (the torch
    >= 2.9 way, as Hugging Face ``TrainingArguments(tf32=True)`` does): the probe runs in IEEE
    float32 anyway (TF32 would break the bound) and leaves the setting as it was (it raised
    before 2026-11-28)."""
    torch.manual_seed(0)
    model = two_layer(kind, 8, 64, seed=0)
    X = torch.randn(48, 8)
    lam_max, lam_min = _truth(copy.deepcopy(model), X)
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        spec = ntk_spectrum(model.cuda(), X.cuda(), method="dense", jacobian_dtype=torch.float32)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert spec.precision == "mixed"
    assert abs(spec.lambda_max - lam_max) <= spec.residual_max
    assert abs(spec.lambda_min - lam_min) <= spec.residual_min


@pytest.mark.parametrize("variant", ["swiglu", "geglu", "reglu"])
def test_gated_block_on_cuda_matches_cpu(variant):
    torch.manual_seed(0)
    block = glu_probe.make_mlp(variant, 32, 48)
    x = torch.randn(4, 10, 32)
    ref = block(x)
    out = copy.deepcopy(block).cuda()(x.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["feature", "split", "split-autograd"])
@pytest.mark.parametrize("batch", [8, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["swiglu", "geglu", "reglu", "glu"])
def test_fused_packed_path_on_cuda_is_as_accurate_as_the_plain_path(
    variant, dtype, batch, layout, monkeypatch
):
    """Feature-major (fused=True) and token-major (fused=False) gradients against float64 truth
    of the same weights: the fused path's error is at most twice the plain path's (+ a floor).
    At 264 and 16,500 tokens: in 16 bits the fused path's bias gradient comes out of the dW1
    GEMM (since 2026-11-28), whose long inner dimension cuBLAS may split.

    (A direct fused-vs-plain comparison at a fixed 2e-2 tolerance failed for ReGLU in bf16 on an
    H100 on 2026-11-27, and this version failed for ReGLU in bf16 on an H200 the same day: 8x the
    plain path's error. Cause: the bias was added after the product was rounded to bf16 (a
    column-broadcast addmm); now it is inside the GEMM's accumulation. Passed on an H100 and an
    H200 on 2026-11-28 at 264 tokens in float32 and bf16.) Both layouts of the fused block:
    16-bit blocks with a bias and fewer than SPLIT_BELOW_IN_FEATURES inputs run ``split`` by
    default (token-major, two GEMMs; differentiated by autograd, ``split-autograd``, below
    SPLIT_AUTOGRAD_BELOW_MACS, as these); ``feature`` forces the feature-major block.
    """
    if layout == "feature":
        monkeypatch.setattr(gated_product, "SPLIT_BELOW_IN_FEATURES", 0)
    elif dtype == torch.float32:
        pytest.skip("float32 runs the feature-major block whatever the width")
    if layout == "split":
        monkeypatch.setattr(gated_product, "SPLIT_AUTOGRAD_BELOW_MACS", 0)
    torch.manual_seed(0)
    fused = glu_probe.make_mlp(variant, 64, 96, fused=True).to("cuda", dtype)
    plain = copy.deepcopy(fused)
    plain.fused = False
    truth = copy.deepcopy(fused).double()
    truth.fused = False
    x = torch.randn(batch, 33, 64, device="cuda", dtype=dtype)
    grads = []
    for m, xin in ((fused, x), (plain, x), (truth, x.double())):
        y = m(xin)
        fused_ran = ran_fused(y)
        assert fused_ran == (m is fused)
        y.double().square().sum().backward()
        grads.append([p.grad.double() for p in m.parameters()])
        if m is fused:  # the layout asked for
            assert fused_layout(y) == layout
        if m is fused:  # contiguous gradients (torch.autograd.grad and hooks hand them out)
            assert all(p.grad.is_contiguous() for p in m.parameters())
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    for (n, _), gf, gp, gt in zip(fused.named_parameters(), *grads, strict=True):
        scale = gt.abs().max()
        err_f = float((gf - gt).abs().max() / scale)
        err_p = float((gp - gt).abs().max() / scale)
        assert err_f <= 2 * err_p + floor, (n, err_f, err_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_policy_on_cuda(dtype):
    """fused=None: the fused path for bf16 weights and under bf16 autocast (the split layout at
    this width, biases on), the token-major expression in fp32."""
    m = glu_probe.SwiGLU(64, 96).to("cuda", dtype)
    x = torch.randn(4, 64, device="cuda", dtype=dtype, requires_grad=True)
    y = m(x)
    assert ran_fused(y) == (dtype == torch.bfloat16)
    if dtype == torch.float32:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        assert ran_fused(y) and y.dtype == torch.bfloat16


def test_swap_keeps_cuda_device_and_dtype():
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=4, num_classes=10
    ).to("cuda", torch.bfloat16)
    report = glu_probe.swap_mlp(vit, "swiglu")
    assert abs(report.rel_diff) <= 0.01
    p = next(vit.blocks[0].mlp.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16


def test_demo_uses_the_gpu_by_default(tmp_path):
    """`glu-probe demo` with no --device trains on the GPU when one is present (issue #5)."""
    import json

    from glu_probe.demo import run_demo

    res = run_demo(
        out_dir=tmp_path, run_name="gpu", quick=True, pairs=["two_layer"], progress=False
    )
    metas = [json.loads(p.read_text()) for p in (tmp_path / "gpu").rglob("pair.json")]
    assert metas and all(m["accelerator"] == "gpu" for m in metas)
    assert res.rows and all(r["kappa_init"] > 1.0 for r in res.rows)


@pytest.mark.parametrize("jacobian_dtype", [torch.float64, torch.float32])
def test_structured_strategy_on_cuda_matches_the_row_strategy(jacobian_dtype):
    """The structured exact path (Kronecker factors of the Linear layers) on the GPU: the same
    K as the row strategy, on a timm ViT with T = 17 tokens per layer and a T = 1 head."""
    timm = pytest.importorskip("timm")
    from glu_probe.ntk import ntk_matrix

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=4
    ).cuda()
    x = torch.randn(16, 3, 16, 16, device="cuda")
    kw = dict(output="full", dtype=torch.float64, jacobian_dtype=jacobian_dtype)
    rows = ntk_matrix(vit, x, strategy="jacobian", **kw)
    K = ntk_matrix(vit, x, strategy="structured", **kw)
    assert K.device.type == "cuda"
    tol = 1e-10 if jacobian_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(K, rows, rtol=tol, atol=tol * float(rows.diag().max()))


def test_crossing_monitor_reads_cuda_losses_in_batches(tmp_path):
    """Losses logged on the GPU are read at the logged steps only, one read each (no sync per
    batch; a recorded baseline is compared at the logged steps since session 18, so nothing is
    queued between them), and the crossings are exactly those of the offline detector on the
    logged series."""
    import numpy as np
    from lightning.pytorch.callbacks import Callback
    from test_callbacks_crossing import CURVE_A, CURVE_B, F32, KW, Synthetic, T, _loader, _trainer

    from glu_probe.callbacks.crossing import LossCrossingMonitor
    from glu_probe.crossing import find_crossings

    queued: list[int] = []
    mon = LossCrossingMonitor(baseline=list(CURVE_B), **KW)

    class Probe(Callback):
        def on_train_batch_end(self, *args):
            queued.append(len(mon._pending))

    trainer = _trainer(tmp_path, accelerator="cuda", log_every_n_steps=10, callbacks=[mon, Probe()])
    trainer.fit(Synthetic(CURVE_A), _loader())
    logged = np.arange(9, len(T), 10)  # the steps log_every_n_steps=10 writes
    assert max(queued) == 0 and mon._pending == [] and mon.detector.n_updates == len(logged)
    offline = find_crossings(T[logged], F32(CURVE_A)[logged], T, np.asarray(CURVE_B), **KW)
    assert mon.crossings == offline


def test_gap_sums_queued_on_cuda_match_cpu():
    import torch.nn.functional as F

    from glu_probe.callbacks.gap import _Side

    gen = torch.Generator().manual_seed(0)
    sides = {d: _Side({}, torch.device(d), sync=False) for d in ("cpu", "cuda")}
    for _ in range(3):
        logits = torch.randn(4, 7, 5, generator=gen)
        target = torch.randint(0, 5, (4, 7), generator=gen)
        target[torch.rand(4, 7, generator=gen) < 0.3] = -100
        for d, side in sides.items():
            lg, tg = logits.to(d), target.to(d)
            side.add(F.cross_entropy(lg.flatten(0, 1), tg.flatten()), lg, tg)
    assert sides["cuda"]._queued  # not read back yet
    assert sides["cuda"].count == sides["cpu"].count
    assert sides["cuda"].loss_sum == pytest.approx(sides["cpu"].loss_sum, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_preactivation_on_cuda_is_rounded_once(dtype):
    """The feature-major pre-activation on the GPU: every entry within one 16-bit rounding of
    the exact value, including biases that nearly cancel the products (a column-broadcast
    addmm rounded the product first there: 8x the token-major block's gradient error)."""
    from test_gated_product import _rounded_once_error

    from glu_probe.gated_product import _packed_preactivation

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(264, 64, generator=gen).to(dtype)
    w1 = torch.randn(192, 64, generator=gen).to(dtype)
    b1 = (-(x[:1].float() @ w1.float().T)[0] * (1 + 1e-3 * torch.randn(192, generator=gen))).to(
        dtype
    )
    pt, _ = _packed_preactivation(w1.cuda(), x.cuda(), b1.cuda())
    assert _rounded_once_error(pt.cpu(), x, w1, b1) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_structural_swap_on_cuda(dtype):
    """The structural adapter's forward-pass check (float32 CPU copies) leaves the CUDA
    generator untouched (it reseeded it until 2026-11-28: failed on an H100), and the swap keeps
    device and dtype."""
    transformers = pytest.importorskip("transformers")
    config = transformers.PhiConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        pad_token_id=0,
    )
    model = transformers.PhiForCausalLM(config).to("cuda", dtype)
    from glu_probe.swap.structural import _analyse

    state = torch.cuda.get_rng_state()
    form = _analyse(model.model.layers[0].mlp)  # the check alone draws nothing
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert form is not None and form.kind == "dense" and form.act_name == "gelu_tanh"
    report = glu_probe.swap_mlp(model, "swiglu")
    assert [e.adapter for e in report.entries] == ["structural"] * 2
    mlp = model.model.layers[0].mlp
    assert mlp.fc1.weight.device.type == "cuda" and mlp.fc1.weight.dtype == dtype
    ids = torch.randint(1, 64, (2, 8), device="cuda")
    model(input_ids=ids).logits.float().sum().backward()
    assert mlp.fc1.weight.grad is not None


def test_products_without_forward_mode_ad_on_cuda():
    """J·u by the double VJP on the device, against the dense float64 kernel."""
    net = NoForwardADNet(seed=0).cuda()
    x = torch.randn(12, 6, device="cuda")
    dense = ntk_spectrum(net, x, method="dense", dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="VJP of u"):
        it = ntk_spectrum(net, x, method="lanczos", dtype=torch.float64, tol=1e-10)
    assert it.converged
    assert it.lambda_max == pytest.approx(dense.lambda_max, rel=1e-8)
    assert it.lambda_min == pytest.approx(dense.lambda_min, rel=1e-6)


def test_cuda_generators_are_accepted_where_a_generator_is():
    """slq_density and theory.two_layer draw on the generator's own device (a CUDA generator
    raised "Expected a 'cpu' device type for generator" until 2026-11-28); the same seed on
    either device gives a valid draw, and the SLQ weights still sum to one."""
    from glu_probe.ntk.density import slq_density

    gen = torch.Generator(device="cuda").manual_seed(0)
    A = torch.diag(torch.linspace(1.0, 10.0, 20, dtype=torch.float64))
    nodes, weights = slq_density(lambda v: A @ v, 20, generator=gen, dtype=torch.float64)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert nodes.min().item() >= 1.0 - 1e-8 and nodes.max().item() <= 10.0 + 1e-8
    net = two_layer("reglu", 4, 16, generator=torch.Generator(device="cuda").manual_seed(0))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def _graph_cases():
    from torch import nn

    from glu_probe.models import tiny_vit

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    return [
        ("mlp", mlp, torch.randn(96, 16)),
        ("vit", tiny_vit(embed_dim=32, depth=1, num_heads=2), torch.randn(12, 1, 16, 16)),
    ]


@pytest.mark.parametrize("linearize", [False, True])
@pytest.mark.parametrize("case", [0, 1])
def test_cuda_graph_products_equal_eager_products(case, linearize):
    """Products replayed from a CUDA graph (after two of a width) equal eager ones, and a
    graph leaves the caller's stream, the RNG, .grad and the allocator as they were."""
    import gc
    import weakref

    from glu_probe.ntk import NTKOperator

    _, model, x = _graph_cases()[case]
    model, x = model.cuda().eval(), x.cuda()
    eager = NTKOperator(model, x, cuda_graphs=False, linearize=linearize)
    graphed = NTKOperator(model, x, linearize=linearize)
    widths = [4, 4, 4, 4, 1, 1, 1]
    blocks = [torch.randn(eager.n, k).cuda() for k in widths]
    rng = torch.cuda.get_rng_state()
    stream = torch.cuda.current_stream()
    for V in blocks:
        want = eager.matvec(V)
        got = graphed.matvec(V)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # width 4 captured on call 2 and replayed on calls 3-4; call 5 (width 1) drops that graph,
    # width 1 is captured on call 6 and replayed on call 7: one graph at a time
    assert graphed.n_graph_replays == 3
    assert eager.n_graph_replays == 0
    assert torch.cuda.current_stream() == stream
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert model.training is False
    graph = weakref.ref(graphed._graph)
    graphed.release()
    assert graph() is None  # the graph (and its memory pool) freed without garbage collection
    del graphed
    gc.collect()


def test_lanczos_with_cuda_graphs_matches_float64_truth():
    """The forced Lanczos path replays its products from a graph, and still meets the
    accuracy targets against dense float64 truth (a timm ViT)."""
    from glu_probe.ntk import NTKOperator

    _, model, x = _graph_cases()[1]
    truth = ntk_spectrum(
        copy.deepcopy(model).double(), x.double(), method="dense", dtype=torch.float64
    )
    model, x = model.cuda().double(), x.cuda().double()
    replays = []
    real = NTKOperator._graph_product

    def spy(self, local, k):
        out = real(self, local, k)
        replays.append(self.n_graph_replays)
        return out

    NTKOperator._graph_product = spy
    try:
        spec = ntk_spectrum(model, x, method="lanczos", dtype=torch.float64, tol=1e-8)
    finally:
        NTKOperator._graph_product = real
    assert max(replays) >= 1
    assert spec.converged
    assert spec.lambda_max == pytest.approx(truth.lambda_max, rel=1e-8)
    assert spec.lambda_min == pytest.approx(truth.lambda_min, rel=1e-6)


def test_a_model_that_syncs_falls_back_to_eager_products():
    """A forward pass with a host sync cannot be captured: one RuntimeWarning, products stay
    exact, and the CUDA state (stream, later captures elsewhere) is sound."""
    from torch import nn

    from glu_probe.ntk import NTKOperator

    class Syncs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            torch.cuda.synchronize()
            return self.lin(x).tanh()

    torch.manual_seed(0)
    model, x = Syncs().cuda(), torch.randn(10, 6).cuda()
    eager = NTKOperator(model, x, cuda_graphs=False, dtype=torch.float64)
    op = NTKOperator(model, x, dtype=torch.float64)
    stream = torch.cuda.current_stream()
    V = torch.randn(10, 2, dtype=torch.float64).cuda()
    with pytest.warns(RuntimeWarning, match="CUDA graph failed"):
        for _ in range(4):
            torch.testing.assert_close(op.matvec(V), eager.matvec(V), rtol=1e-12, atol=1e-12)
    assert op.n_graph_replays == 0
    assert torch.cuda.current_stream() == stream
    # a later capture (another operator) still works
    _, mlp, xm = _graph_cases()[0]
    other = NTKOperator(mlp.cuda(), xm.cuda())
    Vm = torch.randn(96, 2).cuda()
    for _ in range(3):
        other.matvec(Vm)
    assert other.n_graph_replays == 1
