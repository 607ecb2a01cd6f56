"""CUDA checks (skipped without a GPU): the same numbers on the device as dense float64 truth.

Run on a CUDA machine with ``pytest -m gpu`` (``benchmarks/gpu_check.sh`` does so).
"""

from __future__ import annotations

import copy

import pytest
import torch

import glu_probe
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
    """float32 Jacobian rows on the GPU (TF32 off inside the probe), float64 K and eigh."""
    torch.manual_seed(0)
    model = two_layer(kind, 8, 64, seed=0)
    X = torch.randn(48, 8)
    lam_max, lam_min = _truth(copy.deepcopy(model), X)
    spec = ntk_spectrum(model.cuda(), X.cuda(), method="dense", jacobian_dtype=torch.float32)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["swiglu", "geglu", "reglu", "glu"])
def test_fused_packed_backward_on_cuda_matches_the_plain_path(variant, dtype):
    """The feature-major fused path (default) gives autograd's gradients of the chunk path."""
    torch.manual_seed(0)
    fused = glu_probe.make_mlp(variant, 64, 96).to("cuda", dtype)
    plain = copy.deepcopy(fused)
    plain.fused = False
    x = torch.randn(8, 33, 64, device="cuda", dtype=dtype)
    for m in (fused, plain):
        m(x).float().square().sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for (n, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        scale = q.grad.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(p.grad.float() / scale, q.grad.float() / scale, **tol, msg=n)


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
