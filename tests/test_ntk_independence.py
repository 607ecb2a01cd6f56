"""Probes whose samples are not independent (review, session 18).

The dense path's row and structured strategies differentiate each sample alone (``vmap`` over
samples of a one-sample batch), and chunked products evaluate parts of the batch. Both equal
the batch's Jacobian only where a sample's rows do not depend on the other samples. Before
session 18 a model that centres its hidden units on the batch mean got κ 5.2× too large from
``method="auto"``, with ``converged=True`` and no warning, while Lanczos was right; train-mode
``BatchNorm1d`` crashed the dense path; and a constant input whose leading dimension equals the
batch size was split per sample by the dense path but not by the products. The validating
forward pass now also evaluates the first sample alone and compares its rows.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from glu_probe.ntk import ntk_matrix, ntk_spectrum
from glu_probe.ntk.functional import ProbeFunction


def _truth(model: nn.Module, args: tuple) -> torch.Tensor:
    """K of the *whole batch's* pNTK rows: float64 reverse-mode Jacobian of the batch map."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ps = tuple(p.detach().double() for n, p in model.named_parameters() if p.requires_grad)
    m = model.double()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)

    def f(*theta: torch.Tensor) -> torch.Tensor:
        y = torch.func.functional_call(m, dict(zip(names, theta, strict=True)), args)
        return y.reshape(y.shape[0], -1).sum(-1) / math.sqrt(y[0].numel())

    J = torch.autograd.functional.jacobian(f, ps)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1)
    return J @ J.T


class Centred(nn.Module):
    """Hidden units centred on the batch mean: a sample's output depends on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True) + 0.5 * h)


class Scaled(nn.Module):
    """A per-feature constant whose length happens to equal the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x * scale)))


def _kappa(K: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(K)
    return float(ev[-1] / ev[0])


def test_batch_coupled_model_gets_the_batch_kernel_on_every_path() -> None:
    torch.manual_seed(0)
    model = Centred().double()
    x = torch.randn(10, 3, dtype=torch.float64)
    truth = _truth(model, (x,))
    want = _kappa(truth)
    for method in ("auto", "dense"):
        with pytest.warns(RuntimeWarning, match="samples are not independent"):
            res = ntk_spectrum(model, x, method=method, dtype=torch.float64)
        assert res.method == "dense"
        assert math.isclose(res.condition_number, want, rel_tol=1e-9)  # was 5.2x too large
    res = ntk_spectrum(model, x, method="lanczos", dtype=torch.float64)
    assert math.isclose(res.condition_number, want, rel_tol=1e-8)
    with pytest.warns(RuntimeWarning, match="samples are not independent"):
        K = ntk_matrix(model, x)
    torch.testing.assert_close(K, truth, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ntk_matrix(model, x, strategy="operator"), truth)
    for strategy in ("jacobian", "structured"):
        with pytest.raises(ValueError, match="differentiates each sample alone"):
            ntk_matrix(model, x, strategy=strategy)
    # products over parts of the batch would not be the batch's: refused, with the reason
    with pytest.raises(ValueError, match=r"cannot be split into chunks of 4 samples.*independent"):
        ntk_spectrum(model, x, method="lanczos", chunk_size=4)


def test_train_mode_batchnorm_with_eval_mode_false_runs_on_the_dense_path() -> None:
    """One sample alone cannot go through a train-mode BatchNorm1d (PyTorch raises "Expected
    more than 1 value per channel"): the dense path raised that error; it now uses products
    over the whole batch and agrees with Lanczos and the batch truth."""
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    bn = bn.double().train()
    x = torch.randn(6, 4, dtype=torch.float64)
    truth = _truth(bn, (x,))  # (train mode: batch statistics)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        probe = ProbeFunction(bn, x, eval_mode=False)
        assert probe.per_sample_why is not None and "one sample alone" in probe.per_sample_why
        K = ntk_matrix(bn, x, eval_mode=False)
        dense = ntk_spectrum(bn, x, eval_mode=False, method="dense", dtype=torch.float64)
        lanczos = ntk_spectrum(bn, x, eval_mode=False, method="lanczos", dtype=torch.float64)
    torch.testing.assert_close(K, truth, rtol=1e-9, atol=1e-12)
    assert math.isclose(dense.lambda_max, lanczos.lambda_max, rel_tol=1e-9)
    assert math.isclose(dense.lambda_max, float(torch.linalg.eigvalsh(truth)[-1]), rel_tol=1e-9)
    assert bn.training  # flags restored


def test_constant_with_the_batch_size_as_leading_dimension_is_one_kernel() -> None:
    """The dense path split ``scale`` (4 features, 4 samples) per sample: κ 26.0 against the
    truth's 13.2 and the unchunked products'. Now it is detected and every path agrees."""
    torch.manual_seed(0)
    model = Scaled().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    want = _kappa(_truth(model, (x, scale)))
    with pytest.warns(RuntimeWarning, match="leading dimension equals the batch size"):
        dense = ntk_spectrum(model, (x, scale), method="dense")
    lanczos = ntk_spectrum(model, (x, scale), method="lanczos", dtype=torch.float64)
    assert math.isclose(dense.condition_number, want, rel_tol=1e-9)
    assert math.isclose(lanczos.condition_number, want, rel_tol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_independent_samples_are_not_flagged(dtype: torch.dtype) -> None:
    """No false alarm where the kernels for one sample round differently from the batch's
    (float32 GEMMs of 1 row vs 64), on a timm ViT and a GPT-2 with a padded batch."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2
    ).eval()
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    ).eval()
    ids = torch.randint(0, 64, (6, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # the first sample is padded
    probes = [
        (vit, torch.randn(64, 3, 16, 16)),
        (gpt2, {"input_ids": ids, "attention_mask": mask}),
        (nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 2)).train(), None),
    ]
    for model, inputs in probes:
        if inputs is None:  # active dropout, eval_mode=False: random passes, not compared
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                probe = ProbeFunction(model, torch.randn(8, 5), dtype=dtype, eval_mode=False)
        else:
            probe = ProbeFunction(model.to(dtype), inputs, dtype=dtype)
        assert probe.per_sample_why is None
        assert len(probe.sample_ranges(2)) > 1  # chunking stays allowed


class CumSum(nn.Module):
    """Each sample sees the earlier ones: the first sample alone is unchanged, the last not."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x).cumsum(0)))


class BatchStd(nn.Module):
    """Standardised on the batch: one sample alone gives NaN (the std of one value)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.tanh((h - h.mean(0)) / (h.std(0) + 1e-5)))


@pytest.mark.parametrize("cls", [CumSum, BatchStd])
def test_coupling_the_first_sample_does_not_show_is_found(cls: type[nn.Module]) -> None:
    """(Second review, session 18.) Checking the first sample alone missed a cumulative sum
    over the batch (κ 53 against the batch's 686, no warning) and a batch standardisation
    whose one-sample pass is NaN (then "the NTK has NaN/Inf entries"). The last sample is
    checked too, and a sample that is not finite alone counts as coupled."""
    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    truth = _truth(model, (x,))
    with pytest.warns(RuntimeWarning, match="samples are not independent"):
        K = ntk_matrix(model, x)
    torch.testing.assert_close(K, truth, rtol=1e-9, atol=1e-12)


def test_rows_that_sum_to_rounding_noise_are_not_flagged() -> None:
    """(Second review, session 18.) A feature extractor ending in a LayerNorm (timm models with
    ``num_classes=0``) has pNTK rows Σ_o f_o/√O at rounding level, and the kernels for one
    sample round differently from the batch's: the check compared those noise levels and
    flagged independent models (a 9x slower dense path, chunking refused). The scale is now
    that of the summed outputs."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    for name, kw, dtype in [
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8), torch.float64),
        ("convnext_atto", {}, torch.float32),
    ]:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()
        probe = ProbeFunction(model, x, dtype=dtype)
        assert probe.per_sample_why is None, (name, probe.per_sample_why)


def test_train_mode_batchnorm_beside_active_dropout_still_runs() -> None:
    """(Second review, session 18.) With active dropout (``eval_mode=False``) the check was
    skipped entirely, so train-mode BatchNorm1d beside it still crashed the dense path with
    "Expected more than 1 value per channel". Whether a sample runs alone is still checked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 1))
    model = model.double().train()
    x = torch.randn(6, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        probe = ProbeFunction(model, x, eval_mode=False)
        assert probe.per_sample_why is not None and "one sample alone" in probe.per_sample_why
        K = ntk_matrix(model, x, eval_mode=False)  # (random: one dropout mask per pass)
    assert K.shape == (6, 6) and bool(torch.isfinite(K).all())
