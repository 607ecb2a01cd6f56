"""Forward+backward speed of glu_probe.SwiGLU vs timm's SwiGLU / SwiGLUPacked and HF LlamaMLP.

Usage::

    python benchmarks/bench_mlp.py [--device cpu|cuda] [--tokens 4096] [--dims 256 512 768]
        [--dtype float32|bfloat16|float16] [--autocast bfloat16] [--bias] [--threads N]
        [--write benchmarks/RESULTS_mlp.md]

Every block gets the same shapes (``in = out = dim``, gated width ``hidden = round(8·dim/3)``
to a multiple of 8, bias off as in LLaMA unless ``--bias``, timm's default) and identical
weights. One step is ``y = block(x); y.backward(dy)`` with ``x.requires_grad=True``; each is
timed with ``torch.utils.benchmark.Timer.blocked_autorange`` and the table reports the median
time and the ratio ``ours / theirs`` (<= 1.0 means glu-probe is no slower).
``glu_probe.SwiGLU`` is the default (``fused=None``: the feature-major fused path for 16-bit
compute on CUDA, the token-major ``chunk`` expression otherwise); ``fused=True`` /
``fused=False`` force either packed path (``glu_probe.gated_product``).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.utils import benchmark

from glu_probe.modules import SwiGLU

OURS = (
    "glu_probe.SwiGLU",
    "glu_probe.SwiGLU(packed=False)",
    "glu_probe.SwiGLU(fused=True)",
    "glu_probe.SwiGLU(fused=False)",
)


def _competitors(
    dim: int, hidden: int, device: str, dtype: torch.dtype, bias: bool = False
) -> dict[str, nn.Module]:
    """Every block with the same weights (and biases, with ``bias=True``)."""
    ours = SwiGLU(dim, hidden, bias=bias)
    wg, wu = (t.detach().clone() for t in ours.fc1.weight.chunk(2, 0))
    bg, bu = (t.detach().clone() for t in ours.fc1.bias.chunk(2, 0)) if bias else (None, None)
    b2 = ours.fc2.bias.detach().clone() if bias else None

    def copy_into(gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        gate.weight.data.copy_(wg)
        up.weight.data.copy_(wu)
        down.weight.data.copy_(ours.fc2.weight)
        if bias:
            gate.bias.data.copy_(bg)
            up.bias.data.copy_(bu)
            down.bias.data.copy_(b2)

    unpacked = SwiGLU(dim, hidden, bias=bias, packed=False)
    copy_into(unpacked.fc1_g, unpacked.fc1_x, unpacked.fc2)
    blocks: dict[str, nn.Module] = {OURS[0]: ours, OURS[1]: unpacked}
    for name, fused in ((OURS[2], True), (OURS[3], False)):  # both packed paths, forced
        blocks[name] = SwiGLU(dim, hidden, bias=bias, fused=fused)
        blocks[name].load_state_dict(ours.state_dict())
    try:
        from timm.layers import SwiGLU as TimmSwiGLU
        from timm.layers import SwiGLUPacked

        t = TimmSwiGLU(dim, hidden, bias=bias)
        copy_into(t.fc1_g, t.fc1_x, t.fc2)
        blocks["timm.SwiGLU"] = t
        tp = SwiGLUPacked(dim, 2 * hidden, bias=bias)
        tp.fc1.weight.data.copy_(ours.fc1.weight)
        tp.fc2.weight.data.copy_(ours.fc2.weight)
        if bias:
            tp.fc1.bias.data.copy_(ours.fc1.bias)
            tp.fc2.bias.data.copy_(ours.fc2.bias)
        blocks["timm.SwiGLUPacked"] = tp
    except ImportError:
        print("timm not installed: skipping timm blocks", file=sys.stderr)
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        cfg = LlamaConfig(  # one head: the MLP ignores it, and any width divides by it
            hidden_size=dim,
            intermediate_size=hidden,
            hidden_act="silu",
            mlp_bias=bias,
            num_attention_heads=1,
            num_key_value_heads=1,
        )
        m = LlamaMLP(cfg)
        copy_into(m.gate_proj, m.up_proj, m.down_proj)
        blocks["hf.LlamaMLP"] = m
    except ImportError:
        print("transformers not installed: skipping LlamaMLP", file=sys.stderr)
    return {k: v.to(device=device, dtype=dtype) for k, v in blocks.items()}


def _step(
    block: nn.Module, x: torch.Tensor, dy: torch.Tensor, autocast: torch.dtype | None = None
) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        for p in block.parameters():
            p.grad = None
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            y = block(x)
        y.backward(dy.to(y.dtype))

    return run


def bench(
    tokens: int,
    dims: list[int],
    device: str,
    dtype: torch.dtype,
    min_run_time: float,
    rounds: int = 3,
    autocast: torch.dtype | None = None,
    bias: bool = False,
) -> list[dict[str, float | int | str]]:
    rows: list[dict[str, float | int | str]] = []
    for dim in dims:
        hidden = 8 * round(8 * dim / 3 / 8)
        torch.manual_seed(0)
        blocks = _competitors(dim, hidden, device, dtype, bias)
        x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, dim, device=device, dtype=dtype)
        low = autocast is not None or dtype != torch.float32
        tol = 1e-1 if low else 1e-3
        ref_grad: torch.Tensor | None = None
        for block in blocks.values():
            # same function: equal outputs and equal input gradients (backward of the same dy)
            x.grad = None
            with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
                y = block(x)
            y.backward(dy.to(y.dtype))
            assert x.grad is not None
            if ref_grad is None:
                ref, ref_grad = y.detach(), x.grad.clone()
                continue
            torch.testing.assert_close(y.detach(), ref, rtol=tol, atol=tol)
            torch.testing.assert_close(x.grad, ref_grad, rtol=tol, atol=tol)
        x.grad = None
        for block in blocks.values():
            block.zero_grad(set_to_none=True)
        fns = {}
        for name, block in blocks.items():
            fns[name] = _step(block, x, dy, autocast)
            for _ in range(3):
                fns[name]()
        # Interleave the competitors over `rounds` rounds and keep each one's best median, so
        # that load from other processes affects all of them alike.
        times: dict[str, float] = dict.fromkeys(fns, float("inf"))
        for _ in range(rounds):
            for name, fn in fns.items():
                timer = benchmark.Timer(
                    stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                )
                t = timer.blocked_autorange(min_run_time=min_run_time).median
                times[name] = min(times[name], t)
        for mine in OURS:
            for name, t in times.items():
                if name in OURS:
                    continue
                rows.append(
                    {
                        "tokens": tokens,
                        "dim": dim,
                        "hidden": hidden,
                        "ours": mine,
                        "vs": name,
                        "ours_ms": times[mine] * 1e3,
                        "theirs_ms": t * 1e3,
                        "ratio": times[mine] / t,
                    }
                )
    return rows


def profile(
    tokens: int, dim: int, device: str, dtype: torch.dtype, names: list[str], bias: bool = False
) -> str:
    """Per-kernel self time of 10 forward+backward steps of each named block (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    hidden = 8 * round(8 * dim / 3 / 8)
    torch.manual_seed(0)
    blocks = _competitors(dim, hidden, device, dtype, bias)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, dim, device=device, dtype=dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    out = []
    for name in names:
        if name not in blocks:
            continue
        step = _step(blocks[name], x, dy)
        for _ in range(3):
            step()
        with torch_profile(activities=acts) as prof:
            for _ in range(10):
                step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        out.append(f"#### profile: {name}, tokens={tokens}, dim={dim}, bias={bias}, 10 steps\n")
        out.append(prof.key_averages().table(sort_by=key, row_limit=14))
    return "\n".join(out)


def to_markdown(rows: list[dict[str, float | int | str]], header: str) -> str:
    lines = [
        header,
        "",
        "| tokens | dim | hidden | ours | vs | ours (ms) | theirs (ms) | ratio ours/theirs |",
        "|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['dim']} | {r['hidden']} | {r['ours']} | {r['vs']} | "
            f"{r['ours_ms']:.2f} | {r['theirs_ms']:.2f} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512, 768])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    parser.add_argument("--write", default=None, help="also write the markdown table to this file")
    parser.add_argument(
        "--autocast",
        default=None,
        choices=["bfloat16", "float16"],
        help="run each step under torch.autocast of this dtype (weights stay in --dtype), as "
        "Lightning's precision='bf16-mixed' does",
    )
    parser.add_argument(
        "--bias",
        action="store_true",
        help="blocks with biases (timm's default) instead of the LLaMA convention (none)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler kernel tables (first dim) for ours, unfused, timm SwiGLU",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    autocast = getattr(torch, args.autocast) if args.autocast else None
    rows = bench(
        args.tokens,
        args.dims,
        args.device,
        dtype,
        args.min_run_time,
        args.rounds,
        autocast,
        args.bias,
    )
    amp = f", autocast={args.autocast}" if args.autocast else ""
    amp += ", bias=True" if args.bias else ""
    header = (
        f"### MLP forward+backward, device={args.device} ({dev_name}), dtype={args.dtype}{amp}, "
        f"threads={torch.get_num_threads()}, torch {torch.__version__}; best of {args.rounds} "
        "interleaved rounds of median times"
    )
    table = to_markdown(rows, header)
    print(table)
    if args.write:
        with open(args.write, "w") as f:
            f.write(table)
    if args.profile:
        names = [OURS[2], OURS[3], OURS[1], "timm.SwiGLU"]
        print(profile(args.tokens, args.dims[0], args.device, dtype, names, args.bias))


if __name__ == "__main__":
    main()
