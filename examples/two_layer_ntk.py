"""Reproduce the paper's two-layer NTK analysis and check it against measurement.

Part 1 -- spectrum: for every (d, m, n) of the grid and for the ReLU and ReGLU models, the extreme
eigenvalues and condition number of

* the exact empirical NTK of one network at the paper's initialisation,
* its infinite-width expectation (arc-cosine kernels),
* the paper's approximate kernel (eq. 10/11),
* the paper's closed forms (lambda_1, lambda_n theorems),

followed by plain-language verdicts on where the closed forms hold.

Part 2 -- Prop. 4.1: the loss-crossing step predicted from the kernels vs the crossing observed
when the same two networks are trained by full-batch gradient descent (same step size, same
loss normalisation) on a regression target.

Usage::

    python examples/two_layer_ntk.py --quick
    python examples/two_layer_ntk.py --d 10 100 --m 200 2000 --n 20 200 800 --out results.json

The functions used here live in :mod:`glu_probe.theory` (``glu-probe theory`` calls the same ones).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from glu_probe import _json as strict_json
from glu_probe.theory import (
    crossing_experiment,
    crossing_verdicts,
    format_crossing_table,
    format_theory_table,
    mean_crossings,
    theory_table,
    theory_verdicts,
)

DEFAULT = {"d": [10, 100], "m": [200, 2000], "n": [20, 200, 800]}
QUICK = {"d": [20], "m": [500, 2000], "n": [10, 200]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny grid and short training (<= 30 s)")
    p.add_argument("--d", type=int, nargs="+", help=f"input dimensions (default {DEFAULT['d']})")
    p.add_argument("--m", type=int, nargs="+", help=f"hidden widths (default {DEFAULT['m']})")
    p.add_argument("--n", type=int, nargs="+", help=f"sample counts (default {DEFAULT['n']})")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--out", type=str, default=None, help="write all results to this JSON file")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables (for docs)")
    g = p.add_argument_group("Prop. 4.1 loss crossing")
    g.add_argument("--no-crossing", action="store_true", help="skip the training part")
    g.add_argument(
        "--cross",
        type=int,
        nargs=3,
        metavar=("D", "M", "N"),
        action="append",
        default=None,
        help="a setting of the crossing runs, repeatable (default: 20 500 100 and 10 500 300)",
    )
    g.add_argument("--steps", type=int, default=None, help="GD steps (default 2000, quick 400)")
    g.add_argument(
        "--eta-scale",
        type=float,
        nargs="+",
        default=None,
        help="step sizes as eta * lambda_max (default 1.0 0.25; quick 1.0)",
    )
    g.add_argument("--seeds", type=int, default=None, help="seeds per step size (default 3)")
    g.add_argument("--target", choices=["teacher", "random"], default="teacher")
    args = p.parse_args(argv)
    for name in ("d", "m", "n"):
        vals = getattr(args, name) or (QUICK if args.quick else DEFAULT)[name]
        if any(v < 1 for v in vals):
            p.error(f"--{name} values must be positive integers, got {vals}")
        setattr(args, name, vals)
    args.cross = args.cross or ([[20, 200, 80]] if args.quick else [[20, 500, 100], [10, 500, 300]])
    args.steps = args.steps if args.steps is not None else (400 if args.quick else 2000)
    args.eta_scale = args.eta_scale or ([1.0] if args.quick else [1.0, 0.25])
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if args.seed < 0:
        p.error("--seed must be a non-negative integer (it seeds numpy SeedSequence streams)")
    if min(min(c) for c in args.cross) < 1 or args.steps < 1 or args.seeds < 1:
        p.error("--cross, --steps and --seeds must be positive")
    if any(not 0 < e < 2 for e in args.eta_scale):
        p.error("--eta-scale values must lie in (0, 2) (eta * lambda_max >= 2 diverges)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = theory_table(args.d, args.m, args.n, args.seed)
    print(format_theory_table(rows, markdown=args.markdown))
    print("Where the closed forms hold:")
    for line in theory_verdicts(rows):
        print("  -", line)
    result: dict[str, Any] = {"args": vars(args), "spectrum": rows}
    if not args.no_crossing:
        runs = [
            crossing_experiment(
                d,
                m,
                n,
                seed=args.seed + s,
                steps=args.steps,
                eta_scale=e,
                target=args.target,
                keep_curves=args.steps + 1,
            )
            for d, m, n in args.cross
            for e in args.eta_scale
            for s in range(args.seeds)
        ]
        print()
        print(format_crossing_table(runs, markdown=args.markdown))
        print("Prop. 4.1 predictions vs real training:")
        for line in crossing_verdicts(runs):
            print("  -", line)
        if args.seeds > 1:
            means = mean_crossings(runs)
            print()
            print("Crossings of the curves averaged over seeds (Prop. 4.1 is about E[L_k]):")
            print(format_crossing_table(means, markdown=args.markdown))
            result["crossing_mean"] = means
        for r in runs:  # keep the JSON small: 101 points per curve
            idx = [round(i * args.steps / 100) for i in range(101)]
            r["curve_steps"] = idx
            r["curves"] = {
                name: {k: [c[i] for i in idx] for k, c in pair.items()}
                for name, pair in r["curves"].items()
            }
        result["crossing"] = runs
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(strict_json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
