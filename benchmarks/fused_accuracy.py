"""Gradient accuracy of the fused (feature-major or split) and plain (token-major) gated MLP.

For each variant, dtype and seed: the largest gradient error of each parameter, relative to
the largest |gradient|, against float64 truth of the same weights and inputs (the check of
``tests/test_gpu.py::test_fused_packed_path_on_cuda_is_as_accurate_as_the_plain_path``), with
cuBLAS's reduced-precision bf16/fp16 reductions allowed (torch's default) and disallowed, and
the number of ReLU-gate sign flips (pre-activations whose sign differs from the truth's);
and where the two paths' intermediates part: the packed pre-activations (feature-major
``addmm`` with a column bias vs token-major ``F.linear``) and the block output, each against
float64, with the gate's sign flips.

    python benchmarks/fused_accuracy.py --device cuda [--layouts feature split split-autograd]

``--layouts``: the fused block's layouts to check (``gated_product.fused_gated_mlp``): at the
64 input features and the few tokens here a biased 16-bit block runs ``split-autograd`` by
default; ``split`` forces the hand-written backward of the same GEMMs
(``SPLIT_AUTOGRAD_BELOW_MACS = 0``), ``feature`` the feature-major block
(``SPLIT_BELOW_IN_FEATURES = 0``). The pre-activation row of both split layouts is their
``F.linear`` of each half of the packed weight.

(On an H200, 2026-11-27, computing the fused backward's weight gradients by a swapped GEMM, a
float32-output GEMM or a float32 GEMM of upcast operands left every error unchanged, so the
difference is not in those GEMMs; see benchmarks/RESULTS_mlp.md.)
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import glu_probe
from glu_probe import gated_product


def errors(
    variant: str, dtype: torch.dtype, seed: int, device: str, batch: int = 8, layout: str = "split"
) -> dict[str, object]:
    gated_product.SPLIT_BELOW_IN_FEATURES = 0 if layout == "feature" else 1 << 30
    gated_product.SPLIT_AUTOGRAD_BELOW_MACS = 0 if layout == "split" else 1 << 62
    torch.manual_seed(seed)
    fused = glu_probe.make_mlp(variant, 64, 96, fused=True).to(device, dtype)
    plain = copy.deepcopy(fused)
    plain.fused = False
    truth = copy.deepcopy(fused).double()
    truth.fused = False
    x = torch.randn(batch, 33, 64, device=device, dtype=dtype)
    grads = []
    gates = []
    for m, xin in ((fused, x), (plain, x), (truth, x.double())):
        xin = xin.detach().requires_grad_()
        y = m(xin)
        y.double().square().sum().backward()
        assert xin.grad is not None
        grads.append([p.grad.double() for p in m.parameters()] + [xin.grad.double()])
        with torch.no_grad():
            gates.append(torch.nn.functional.linear(xin, m.fc1.weight, m.fc1.bias)[..., :96])
    flips = int((gates[0].double().sign() != gates[2].sign()).sum())
    out: dict[str, object] = {"flips(plain-rounded gate)": flips}
    with torch.no_grad():  # the forward intermediates of both paths against float64
        w1, b1 = fused.fc1.weight, fused.fc1.bias
        x2 = x.reshape(-1, 64)
        exact = F.linear(x2.double(), w1.double(), b1.double())
        token_major = F.linear(x2, w1, b1).double()
        if layout == "feature":
            feature_major = gated_product._packed_preactivation(w1, x2, b1)[0].t().double()
        else:  # the split layouts' two GEMMs on the packed weight's row blocks
            halves = zip(w1.chunk(2), b1.chunk(2), strict=True)
            feature_major = torch.cat([F.linear(x2, w, b) for w, b in halves], -1).double()
        scale = exact.abs().max()
        out["pre-activation err (fused, plain)"] = (
            round(float((feature_major - exact).abs().max() / scale), 5),
            round(float((token_major - exact).abs().max() / scale), 5),
        )
        out["gate flips (fused, plain)"] = (
            int((feature_major[:, :96].sign() != exact[:, :96].sign()).sum()),
            int((token_major[:, :96].sign() != exact[:, :96].sign()).sum()),
        )
        y_t = truth(x.double())
        out["output err (fused, plain)"] = tuple(
            round(float((m(x).double() - y_t).abs().max() / y_t.abs().max()), 5)
            for m in (fused, plain)
        )
    names = [name for name, _ in fused.named_parameters()] + ["x (input)"]
    for name, gf, gp, gt in zip(names, *grads, strict=True):
        scale = gt.abs().max()
        out[name] = (
            round(float((gf - gt).abs().max() / scale), 5),
            round(float((gp - gt).abs().max() / scale), 5),
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument(
        "--batch",
        type=int,
        default=8,
        help="sequences of 33 tokens (8: 264 tokens; 500: 16,500, where cuBLAS may split the "
        "weight-gradient GEMMs' long inner dimension, the bias gradient's included)",
    )
    layouts = ["feature", "split", "split-autograd"]
    ap.add_argument("--layouts", nargs="+", default=layouts, choices=layouts)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"dtype {args.dtype}, {args.batch * 33} tokens")
    flag = torch.backends.cuda.matmul
    print("param: (fused error, plain error), relative to max |grad|")
    for reduced in (True, False):
        flag.allow_bf16_reduced_precision_reduction = reduced
        flag.allow_fp16_reduced_precision_reduction = reduced
        print(f"## reduced-precision reductions allowed: {reduced}")
        for layout in args.layouts:
            for variant in ("reglu", "swiglu"):
                for seed in range(args.seeds):
                    e = errors(variant, dtype, seed, args.device, args.batch, layout)
                    print(layout, variant, seed, e)


if __name__ == "__main__":
    main()
