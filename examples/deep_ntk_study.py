"""Does GLU's smaller NTK condition number persist in deep residual networks?

The paper derives the smaller condition number of GLU for two-layer networks only. This study
measures it where the theory does not reach: pre-norm residual transformer blocks (timm ViT and
HF GPT-2), 1 to 12 blocks deep, at several widths, GLU (SwiGLU by default) vs non-GLU (GELU),
parameter-matched (:func:`glu_probe.swap.swap_mlp`, ``match="params"``), at init and after a few
AdamW steps on a real task (digits for the ViT, byte-level LM on the Python stdlib for GPT-2).

Measured quantity: the exact empirical pNTK (one row per image, or per token: g = Σ_o f_o/√O) on a
fixed probe batch, K = J Jᵀ over all trainable parameters, its extreme eigenvalues from a float64
``eigh`` (:func:`glu_probe.ntk.ntk_spectrum`, ``method="dense"``) and κ = λ_max/λ_min. Each
(family, width, depth, seed) builds one host; the GLU model is a deep copy with its MLPs swapped,
so attention, norms, embeddings and heads are identical at init. Both train on the same batches.

Outputs (in ``--out``): ``deep_ntk.json`` (every measurement), ``deep_ntk.md`` (a table of κ and of
the ratio κ_GLU/κ_dense, mean over seeds) and ``deep_ntk.png`` (κ against depth).

Examples::

    python examples/deep_ntk_study.py --quick
    python examples/deep_ntk_study.py --depths 1 2 4 8 12 --widths 32 64 --seeds 0 1
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glu_probe import _json as strict_json
from glu_probe._rng import seeded, stream_seed
from glu_probe.data import digits_dataset, lm_probe_batch, text_corpus
from glu_probe.models import CausalLMLogits, tiny_gpt2, tiny_vit
from glu_probe.modules import GATED_VARIANTS, VARIANTS
from glu_probe.ntk import ntk_spectrum
from glu_probe.swap import swap_mlp

FAMILIES = ("vit", "gpt2")

# The grid and training sizes: the full study, and --quick's tiny grid for CI. Either fills only
# the options not given on the command line (an option given at its normal default value, say
# --quick --depths 1 2 4 8 12, was once taken as not given; review, session 25).
NORMAL = {"depths": [1, 2, 4, 8, 12], "widths": [32, 64], "train_steps": 40, "probe_rows": 32,
          "batch_size": 32, "seq_len": 16}  # fmt: skip
QUICK = {"depths": [1, 2], "widths": [16], "train_steps": 3, "probe_rows": 8, "batch_size": 8,
         "seq_len": 8}  # fmt: skip


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where the text already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _sized(name: str) -> str:
    def show(v: Any) -> str:
        return " ".join(map(str, v)) if isinstance(v, list) else str(v)

    return f"(default: {show(NORMAL[name])}; with --quick: {show(QUICK[name])})"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        default=list(FAMILIES),
        help="host families: timm ViT blocks on digits, HF GPT-2 blocks on stdlib bytes",
    )
    p.add_argument(
        "--depths", type=int, nargs="+", default=None, help=f"residual blocks {_sized('depths')}"
    )
    p.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="embedding widths (ViT embed_dim / GPT-2 n_embd; one head per 16) " + _sized("widths"),
    )
    gated = sorted(GATED_VARIANTS)
    p.add_argument(
        "--glu", default="swiglu", type=str.lower, choices=gated, help="gated variant (swap target)"
    )
    p.add_argument(
        "--dense",
        default="gelu",
        type=str.lower,
        choices=sorted(set(VARIANTS) - GATED_VARIANTS),
        help="non-gated variant (gelu: the host's own MLP)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (init and batches)")
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help=f"AdamW steps after init {_sized('train_steps')}",
    )
    p.add_argument("--probe-at", type=int, nargs="+", default=None, help="steps to probe at")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"training batch (images/sequences) {_sized('batch_size')}",
    )
    p.add_argument(
        "--probe-rows",
        type=int,
        default=None,
        help="pNTK rows: images (ViT) or tokens (GPT-2, whole sequences: "
        f"max(1, probe_rows // seq_len) of them) {_sized('probe_rows')}",
    )
    p.add_argument("--seq-len", type=int, default=None, help=f"GPT-2 context {_sized('seq_len')}")
    p.add_argument("--quick", action="store_true", help="tiny grid for CI")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: GPU when present"
    )
    p.add_argument("--out", default="runs/examples/deep_ntk", help="output folder")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else NORMAL  # a tiny grid, except where a flag was given
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, copy.copy(value))
    for name in ("depths", "widths"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} must be positive")
    bad = [w for w in args.widths if w % _heads(w)]
    if bad:
        # (56 passed the old multiple-of-8 check and crashed in timm: 3 heads of 18.7;
        # review, session 24)
        p.error(
            f"--widths {bad}: a width must be divisible by its head count, one head per 16 "
            "channels (max(1, width // 16)): e.g. 8, 16, 32, 48, 64, 96, 128"
        )
    if args.train_steps < 0:
        p.error("--train-steps must be >= 0")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    # (0 or a negative value failed mid-run, or, --probe-rows 0 with gpt2, ran on one sequence;
    # review, session 25)
    for name in ("batch_size", "probe_rows", "seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive finite number, got {args.lr}")
    if any(s < 0 for s in args.seeds):
        p.error(f"--seeds must be >= 0, got {args.seeds}")
    if args.probe_at is None:
        args.probe_at = [0, args.train_steps // 4, args.train_steps]
    args.probe_at = sorted(set(args.probe_at))  # (a repeated step crashed the progress line)
    if any(s < 0 or s > args.train_steps for s in args.probe_at):
        p.error("--probe-at steps must lie in [0, --train-steps]")
    _check_data(p, args)
    return args


def _check_data(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The data of each family can serve ``--batch-size`` and ``--probe-rows`` (before anything
    trains): a batch larger than the training set never yielded one (an endless loop), a ViT probe
    larger than it was silently cut, and a GPT-2 probe needs one window per distinct first byte
    (:func:`glu_probe.data.lm_probe_batch`: at most 256, and only as many as the corpus has, 94
    for the stdlib at ``--seq-len 16``)."""
    if "vit" in args.families:
        n = len(digits_dataset("train", image_size=16, seed=0))
        if args.batch_size > n:
            p.error(f"--batch-size {args.batch_size} exceeds the {n} digits training images")
        if args.probe_rows > n:
            p.error(f"--probe-rows {args.probe_rows} exceeds the {n} digits training images")
    if "gpt2" in args.families:
        n_seq = _probe_sequences(args)
        if n_seq > 256:
            p.error(
                f"--probe-rows {args.probe_rows} at --seq-len {args.seq_len} asks for {n_seq} "
                "probe sequences; GPT-2 probe sequences need distinct first bytes (at most 256)"
            )
        corpus = text_corpus(None, split="train", seq_len=args.seq_len, max_bytes=_MAX_BYTES)
        if args.batch_size > len(corpus):
            p.error(
                f"--batch-size {args.batch_size} exceeds the {len(corpus)} training sequences "
                f"of {args.seq_len} bytes"
            )
        try:
            lm_probe_batch(corpus, n_seq)
        except ValueError as err:
            p.error(f"--probe-rows {args.probe_rows} at --seq-len {args.seq_len}: {err}")


_MAX_BYTES = 400_000  # the GPT-2 family's corpus: the first bytes of the stdlib sources


def _probe_sequences(args: argparse.Namespace) -> int:
    """GPT-2 probe sequences: whole sequences of ``--seq-len`` tokens, at least one."""
    return max(1, args.probe_rows // args.seq_len)


def _heads(width: int) -> int:
    return max(1, width // 16)


def build_host(family: str, depth: int, width: int, seed: int, seq_len: int) -> nn.Module:
    """The non-GLU host (native GELU MLP) of ``family`` at ``depth`` blocks and ``width``."""
    if family == "vit":
        return tiny_vit(
            img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=width, depth=depth,
            num_heads=_heads(width), seed=seed,
        )  # fmt: skip
    lm = tiny_gpt2(
        n_positions=seq_len, n_embd=width, n_layer=depth, n_head=_heads(width), seed=seed
    )
    return CausalLMLogits(lm)


def variant_of(host: nn.Module, variant: str, seed: int) -> nn.Module:
    """A deep copy of ``host`` with its MLPs swapped to ``variant`` (``gelu``: unchanged).

    The fresh MLPs draw from stream ``(2, 2)`` of ``seed``, as ``glu_probe.models`` pairs do
    (``seed + 1`` was the next seed's host init, and reseeded every CUDA generator)."""
    model = copy.deepcopy(host)
    if variant == "gelu":
        return model
    target = model.lm if isinstance(model, CausalLMLogits) else model
    with seeded(stream_seed(seed, 2, 2), {p.device for p in target.parameters()}):
        swap_mlp(target, variant, match="params", multiple_of=1)
    return model


class Task:
    """Batches and probe of one family: digits images or stdlib byte windows."""

    def __init__(self, family: str, args: argparse.Namespace):
        self.family = family
        if family == "vit":
            ds = digits_dataset("train", image_size=16, seed=0)
            self.x, self.y = ds.tensors
            self.probe = self.x[: args.probe_rows]
        else:
            corpus = text_corpus(None, split="train", seq_len=args.seq_len, max_bytes=_MAX_BYTES)
            n = len(corpus)
            self.x = torch.stack([corpus[i][0] for i in range(n)])
            self.y = torch.stack([corpus[i][1] for i in range(n)])
            n_seq = _probe_sequences(args)
            # distinct first bytes: shared prefixes would duplicate pNTK rows (singular K)
            self.probe = lm_probe_batch(corpus, n_seq)[0]
        self.batch_size = args.batch_size

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(len(self.x), generator=g)
            for i in range(0, len(perm) - self.batch_size + 1, self.batch_size):
                idx = perm[i : i + self.batch_size]
                yield self.x[idx], self.y[idx]

    @staticmethod
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def measure(
    model: nn.Module, task: Task, args: argparse.Namespace, seed: int, device: torch.device
) -> list[dict[str, Any]]:
    """κ of the pNTK at each ``--probe-at`` step of AdamW training (same batches per seed)."""
    model = model.to(device)
    probe = task.probe.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    batches = task.batches(seed)
    out: list[dict[str, Any]] = []
    losses: list[float] = []
    for step in range(args.train_steps + 1):
        if step in args.probe_at:
            spec = ntk_spectrum(model, probe, output="pntk", method="dense")
            out.append(
                {
                    "step": step,
                    "lambda_max": spec.lambda_max,
                    "lambda_min": spec.lambda_min,
                    "kappa": spec.condition_number,
                    "n_rows": spec.n_rows,
                    "loss": losses[-1] if losses else math.nan,
                }
            )
        if step == args.train_steps:
            break
        x, y = next(batches)
        model.train()
        loss = task.loss(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )  # fmt: skip
    records = []
    for family in args.families:
        task = Task(family, args)
        for width in args.widths:
            for depth in args.depths:
                for seed in args.seeds:
                    host = build_host(family, depth, width, seed, args.seq_len)
                    for variant in (args.dense, args.glu):
                        t0 = time.perf_counter()
                        model = variant_of(host, variant, seed)
                        n_params = sum(p.numel() for p in model.parameters())
                        for m in measure(model, task, args, seed, device):
                            records.append(
                                {
                                    "family": family, "width": width, "depth": depth,
                                    "seed": seed, "variant": variant, "params": n_params, **m,
                                }
                            )  # fmt: skip
                        dt = time.perf_counter() - t0
                        last = records[-1]
                        first = records[-len(args.probe_at)]
                        print(
                            f"{family:5s} w={width:4d} L={depth:2d} seed={seed} {variant:7s} "
                            f"params={n_params:9,d} κ(step {first['step']})={first['kappa']:.3g} "
                            f"κ(step {last['step']})={last['kappa']:.3g} ({dt:.1f}s)",
                            flush=True,
                        )
    return records


def table(records: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown: κ (geometric mean over seeds) per (family, width, depth), dense vs GLU."""

    def gmean(vals: list[Any]) -> float:
        # A seed whose K is singular (κ = inf, null in the JSON) makes the mean inf: dropped
        # before, it turned an infinite κ into the other seeds' (review, session 24).
        vals = [math.inf if v is None else float(v) for v in vals]
        if any(v == math.inf for v in vals):
            return math.inf
        vals = [v for v in vals if v > 0 and math.isfinite(v)]
        return float(np.exp(np.mean(np.log(vals)))) if vals else math.nan

    steps = args.probe_at
    head = ["family", "width", "depth"]
    for s in steps:
        head += [f"κ {args.dense} @{s}", f"κ {args.glu} @{s}", f"ratio @{s}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (3 * len(steps))]
    keys = sorted({(r["family"], r["width"], r["depth"]) for r in records})
    for fam, w, d in keys:
        cells = [fam, str(w), str(d)]
        for s in steps:
            sel = [
                r
                for r in records
                if (r["family"], r["width"], r["depth"], r["step"]) == (fam, w, d, s)
            ]
            kd = gmean([r["kappa"] for r in sel if r["variant"] == args.dense])
            kg = gmean([r["kappa"] for r in sel if r["variant"] == args.glu])
            cells += [f"{kd:.3g}", f"{kg:.3g}", f"{kg / kd:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(records: Sequence[dict[str, Any]], args: argparse.Namespace, path: Path) -> Path:
    """κ against depth: one panel per (family, probe step), a line per (variant, width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in args.families if any(r["family"] == f for r in records)]
    steps = args.probe_at
    fig, axes = plt.subplots(
        len(fams), len(steps), figsize=(4.2 * len(steps), 3.4 * len(fams)), squeeze=False
    )
    styles = {args.dense: ("tab:blue", "o"), args.glu: ("tab:red", "s")}
    for i, fam in enumerate(fams):
        for j, s in enumerate(steps):
            ax = axes[i][j]
            for variant, (color, marker) in styles.items():
                for k, w in enumerate(args.widths):
                    pts = []
                    for d in args.depths:
                        sel = [
                            r["kappa"] for r in records
                            if (r["family"], r["width"], r["depth"], r["step"], r["variant"])
                            == (fam, w, d, s, variant)
                        ]  # fmt: skip
                        if sel:
                            pts.append((d, float(np.exp(np.mean(np.log(sel))))))
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        alpha = 0.5 + 0.5 * k / max(1, len(args.widths) - 1)
                        ax.plot(
                            xs, ys, color=color, marker=marker, alpha=alpha,
                            ls="-" if k == len(args.widths) - 1 else "--", label=f"{variant} w={w}",
                        )  # fmt: skip
            ax.set_yscale("log")
            ax.set_xlabel("depth (blocks)")
            ax.set_ylabel("pNTK κ")
            ax.set_title(f"{fam}: step {s}" + (" (init)" if s == 0 else ""))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = run(args)
    md = table(records, args)
    png = figure(records, args, out / "deep_ntk.png")
    settings = {k: v for k, v in vars(args).items()}
    (out / "deep_ntk.json").write_text(
        strict_json.dumps({"settings": settings, "records": records}, indent=2)
    )
    (out / "deep_ntk.md").write_text(md + "\n")
    print(md)
    print(f"figure: {png}; table: {out / 'deep_ntk.md'}; {time.perf_counter() - t0:.0f} s")
    return {"records": records, "table": md, "figure": png}


if __name__ == "__main__":
    main(sys.argv[1:])
