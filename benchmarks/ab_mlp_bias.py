"""Candidate layouts for biased 16-bit gated blocks: a pending decision (issue #2).

On an H200 (2026-11-28, ``RESULTS_mlp.md``, "session 16") the default feature-major block with
biases was 1.00–1.04x timm's ``SwiGLU`` at dim 768 but 0.95x at dim 2048, while two token-major
GEMMs (``SwiGLU(packed=False)``) were 0.98–0.99x at 768 and 0.99x at 2048. The default's extra
costs at 768 were a packed pre-activation GEMM slower than two half-size ones (171 µs against
2 x 74 µs: cuBLAS picks another tile for the packed shape) and the augmented copy of ``x``,
which scales with N·in where the GEMMs scale with N·in·h. This script times, on identical
weights, across widths, in bf16 with biases:

* ``default``: ``glu_probe.SwiGLU`` (feature-major, bias in the augmented GEMM);
* ``split``: the same, its pre-activation computed by two GEMMs, one per half of ``Pᵀ``;
* ``two_gemm``: token-major gate and up GEMMs on the packed weight's row blocks (bias in the
  GEMM epilogue, contiguous outputs), with one hand-written backward that writes both halves of
  ``dW1`` into one buffer (no slice-backward zeros);
* anchors: ``SwiGLU(packed=False)``, timm ``SwiGLU``, HF ``LlamaMLP``.

The width where ``two_gemm`` stops beating ``default`` would set the policy; nothing here is
library code. Usage (GPU)::

    python benchmarks/ab_mlp_bias.py [--dims 512 768 1024 1536 2048] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mlp import _competitors, _step

from glu_probe import gated_product

_default_pre = gated_product._packed_preactivation


def _split_pre(w1: Tensor, x: Tensor, b1: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``_packed_preactivation`` with the augmented GEMM split into its two row halves."""
    if b1 is None or x.dtype not in (torch.bfloat16, torch.float16):
        return _default_pre(w1, x, b1)
    wa, xa = gated_product._augmented_operands(w1, x, b1)
    h = w1.shape[0] // 2
    pt = x.new_empty(2 * h, x.shape[0])
    torch.mm(wa[:h], xa.t(), out=pt[:h])
    torch.mm(wa[h:], xa.t(), out=pt[h:])
    return pt, xa


class _TwoGemm(torch.autograd.Function):
    """SwiGLU with gate and up as two token-major GEMMs on the packed ``W1``'s row blocks."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:  # type: ignore[override]
        h = w1.shape[0] // 2
        g = F.linear(x, w1[:h], b1[:h])
        u = F.linear(x, w1[h:], b1[h:])
        ag = F.silu(g)
        hh = ag * u
        ctx.save_for_backward(x, w1, w2, g, u, ag, hh)
        return F.linear(hh, w2, b2)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        x, w1, w2, g, u, ag, hh = ctx.saved_tensors
        h = g.shape[1]
        dh = dy @ w2
        dw2, db2 = dy.t() @ hh, dy.sum(0)
        du = dh * ag
        dg = torch.ops.aten.silu_backward(dh * u, g)
        dw1 = torch.empty_like(w1)
        torch.mm(dg.t(), x, out=dw1[:h])
        torch.mm(du.t(), x, out=dw1[h:])
        db1 = torch.cat((dg.sum(0), du.sum(0)))
        dx = torch.addmm(dg @ w1[:h], du, w1[h:])
        return dx, dw1, db1, dw2, db2


class TwoGemmSwiGLU(nn.Module):
    """A view of a packed ``glu_probe.SwiGLU``'s parameters run by :class:`_TwoGemm`."""

    def __init__(self, packed: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = packed.fc1, packed.fc2

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = _TwoGemm.apply(
            x.reshape(-1, shape[-1]), self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        )
        return y.reshape(*shape[:-1], y.shape[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768, 1024, 1536, 2048])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args(argv)
    dev, dtype = args.device, torch.bfloat16
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu"
    print(f"# biased bf16 gated blocks, {args.tokens} tokens, {name}, torch {torch.__version__}")
    print(f"best of {args.rounds} interleaved rounds of medians (ms; ratio to timm / HF)\n")
    print(
        "| dim | hidden | default | split | two_gemm | packed=False | timm.SwiGLU | hf.LlamaMLP |"
    )
    print("|---:|---:|---|---|---|---|---:|---:|")
    for dim in args.dims:
        hidden = 8 * round(8 * dim / 3 / 8)
        torch.manual_seed(0)
        blocks = _competitors(dim, hidden, dev, dtype, bias=True)
        ours = blocks["glu_probe.SwiGLU"]
        ours.fused = True  # the default's own path on CUDA; forced so that the CPU runs it too
        x = torch.randn(args.tokens, dim, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(args.tokens, dim, device=dev, dtype=dtype)
        two = TwoGemmSwiGLU(ours)
        cands: dict[str, tuple[Any, nn.Module]] = {
            "default": (_default_pre, ours),
            "split": (_split_pre, ours),
            "two_gemm": (None, two),
            "packed=False": (None, blocks["glu_probe.SwiGLU(packed=False)"]),
        }
        anchors = [k for k in ("timm.SwiGLU", "hf.LlamaMLP") if k in blocks]
        for k in anchors:
            cands[k] = (None, blocks[k])
        # same function: outputs and input gradients agree with the default's (bf16 tolerance)
        ref: tuple[Tensor, Tensor] | None = None
        for pre, block in cands.values():
            gated_product._packed_preactivation = pre or _default_pre
            x.grad = None
            y = block(x)
            y.backward(dy)
            assert x.grad is not None
            if ref is None:
                ref = (y.detach(), x.grad.clone())
            else:
                torch.testing.assert_close(y.detach(), ref[0], rtol=1e-1, atol=1e-1)
                torch.testing.assert_close(x.grad, ref[1], rtol=1e-1, atol=1e-1)
        times = dict.fromkeys(cands, float("inf"))
        for _ in range(args.rounds):
            for key, (pre, block) in cands.items():
                gated_product._packed_preactivation = pre or _default_pre
                fn = _step(block, x, dy)
                for _ in range(3):
                    fn()
                timer = benchmark.Timer("fn()", globals={"fn": fn})
                times[key] = min(
                    times[key], timer.blocked_autorange(min_run_time=args.min_run_time).median
                )
        gated_product._packed_preactivation = _default_pre

        def cell(key: str, times: dict[str, float] = times, anchors: list[str] = anchors) -> str:
            t = times[key]
            rel = " / ".join(f"{t / times[a]:.3f}" for a in anchors)
            return f"{t * 1e3:.3f} ({rel})"

        print(
            f"| {dim} | {hidden} | {cell('default')} | {cell('split')} | {cell('two_gemm')} | "
            f"{cell('packed=False')} | "
            + " | ".join(f"{times[a] * 1e3:.3f}" for a in anchors)
            + " |"
        )


if __name__ == "__main__":
    main()
