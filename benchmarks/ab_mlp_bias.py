"""Layouts of biased 16-bit gated blocks across widths: the measurement behind
``gated_product.SPLIT_BELOW_IN_FEATURES`` (issue #2).

On an H200 (2026-11-28, ``RESULTS_mlp.md``, "session 16") the feature-major block with biases
was 1.00–1.04x timm's ``SwiGLU`` at dim 768 but 0.95x at dim 2048, and in session 17
1.01–1.30x at 768 (median 1.16), while two token-major GEMMs on the packed weight's row blocks
(a prototype in this script at first, ``_SplitFusedGatedMLP`` in the library now) were
0.96–1.05x at 768–1536 (median 1.02x at 768) and 1.02–1.03x at 2048. This script times, on
identical weights, in bf16 with biases:

* ``default``: ``glu_probe.SwiGLU`` as it runs on CUDA (the layout its width selects);
* ``feature``: the same block forced feature-major (``SPLIT_BELOW_IN_FEATURES = 0``);
* ``split``: the same block forced split (two token-major GEMMs, hand-written backward);
* ``split-autograd``: the same two GEMMs differentiated by autograd (the default below
  ``gated_product.SPLIT_AUTOGRAD_BELOW_MACS`` of work, where steps are host-bound);
* anchors: ``SwiGLU(packed=False)`` (autograd of two ``nn.Linear``), timm ``SwiGLU``, HF
  ``LlamaMLP``.

``default`` and the forced layout it equals are two measurements of one code path: their
difference is the run's noise. Usage (GPU)::

    python benchmarks/ab_mlp_bias.py [--dims 512 768 1024 1536 2048] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mlp import _competitors, _step

from glu_probe import gated_product

_DEFAULT = (gated_product.SPLIT_BELOW_IN_FEATURES, gated_product.SPLIT_AUTOGRAD_BELOW_MACS)
# (SPLIT_BELOW_IN_FEATURES, SPLIT_AUTOGRAD_BELOW_MACS) that make layout="auto" run each layout
_THRESHOLD = {
    "default": _DEFAULT,
    "feature": (0, _DEFAULT[1]),
    "split": (1 << 30, 0),
    "split-autograd": (1 << 30, 1 << 62),
}


def _set_thresholds(thresholds: tuple[int, int]) -> None:
    gated_product.SPLIT_BELOW_IN_FEATURES, gated_product.SPLIT_AUTOGRAD_BELOW_MACS = thresholds


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
        "| dim | hidden | default | feature | split | split-autograd | packed=False | "
        "timm.SwiGLU | hf.LlamaMLP |"
    )
    print("|---:|---:|---|---|---|---|---|---:|---:|")
    for dim in args.dims:
        hidden = 8 * round(8 * dim / 3 / 8)
        torch.manual_seed(0)
        blocks = _competitors(dim, hidden, dev, dtype, bias=True)
        ours = blocks["glu_probe.SwiGLU"]
        ours.fused = True  # the default's own path on CUDA; forced so that the CPU runs it too
        x = torch.randn(args.tokens, dim, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(args.tokens, dim, device=dev, dtype=dtype)
        cands: dict[str, tuple[tuple[int, int], nn.Module]] = {
            k: (threshold, ours) for k, threshold in _THRESHOLD.items()
        }
        cands["packed=False"] = (_DEFAULT, blocks["glu_probe.SwiGLU(packed=False)"])
        anchors = [k for k in ("timm.SwiGLU", "hf.LlamaMLP") if k in blocks]
        for k in anchors:
            cands[k] = (_DEFAULT, blocks[k])
        # same function: outputs and input gradients agree with the default's (bf16 tolerance)
        ref: tuple[Tensor, Tensor] | None = None
        for threshold, block in cands.values():
            _set_thresholds(threshold)
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
            for key, (threshold, block) in cands.items():
                _set_thresholds(threshold)
                fn = _step(block, x, dy)
                for _ in range(3):
                    fn()
                timer = benchmark.Timer("fn()", globals={"fn": fn})
                times[key] = min(
                    times[key], timer.blocked_autorange(min_run_time=args.min_run_time).median
                )
        _set_thresholds(_DEFAULT)

        def cell(key: str, times: dict[str, float] = times, anchors: list[str] = anchors) -> str:
            t = times[key]
            rel = " / ".join(f"{t / times[a]:.3f}" for a in anchors)
            return f"{t * 1e3:.3f} ({rel})"

        print(
            f"| {dim} | {hidden} | {cell('default')} | {cell('feature')} | {cell('split')} | "
            f"{cell('split-autograd')} | {cell('packed=False')} | "
            + " | ".join(f"{times[a] * 1e3:.3f}" for a in anchors)
            + " |"
        )


if __name__ == "__main__":
    main()
