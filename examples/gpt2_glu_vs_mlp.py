"""GPT-2: GELU MLP vs a parameter-matched SwiGLU, over several seeds (the paper's GPT-2 experiment).

For each seed a Hugging Face ``GPT2LMHeadModel`` built from a ``GPT2Config`` (the baseline, GELU
MLP) and a copy whose MLPs are swapped to a parameter-matched gated variant (``--variant``, default
SwiGLU; every other parameter identical at init) are trained side by side as byte-level language
models on identical batches (:class:`glu_probe.callbacks.PairedModule`) with the NTK,
generalization-gap and loss-crossing monitors. The script reports, as mean ± std over seeds: the
NTK condition number at init and at the end, the first step at which the GLU model's training loss
overtakes the baseline's, the final train/validation losses (nats per byte) and the gap.

Data (offline): a folder of text files (``--data``), a Hugging Face dataset saved with
``save_to_disk`` (``--hf-dataset``), or by default the Python standard library's source files. The
last 10% of the bytes are the validation split. A ``--hf-dataset`` DatasetDict must have a
``train`` split; if it has a ``validation`` split, that split is the validation data and the whole
``train`` split is trained on.

Sizes:
  --size quick   tiny (CI: seconds per seed)
  --size cpu     the demo size (default: a few minutes per seed on CPU)
  --size paper   GPT-2 small (n_embd 768, 12 layers, 12 heads, 256-byte context) for a GPU

Examples::

    python examples/gpt2_glu_vs_mlp.py --size quick --seeds 0 1
    python examples/gpt2_glu_vs_mlp.py --size paper --data ~/corpus --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glu_probe.data import hf_text_dataset, lm_probe_batch, text_corpus
from glu_probe.demo import (
    PairSettings,
    add_example_arguments,
    check_example_arguments,
    example_settings,
    free_run_name,
    run_example,
)
from glu_probe.models import gpt2_pair

SIZES: dict[str, tuple[dict[str, Any], int, int, PairSettings]] = {
    # (GPT2Config overrides, seq_len, max_bytes, settings)
    "quick": (
        {"n_embd": 32, "n_layer": 1, "n_head": 2}, 32, 200_000,
        PairSettings(
            steps=16, batch_size=8, lr=1e-3, optimizer="adamw", val_every=8, val_batches=2,
            ntk_every=8, probe_size=1, gap_subset=16,
        ),
    ),
    "cpu": (
        {"n_embd": 64, "n_layer": 2, "n_head": 4}, 64, 1_000_000,
        PairSettings(
            steps=600, batch_size=16, lr=1e-3, optimizer="adamw", val_every=50, val_batches=8,
            ntk_every=24, probe_size=4, gap_subset=128,
        ),
    ),
    "paper": (
        {"n_embd": 768, "n_layer": 12, "n_head": 12}, 256, 50_000_000,
        PairSettings(
            steps=10000, batch_size=32, lr=3e-4, optimizer="adamw", val_every=500,
            val_batches=50, ntk_every=400, probe_size=2, gap_subset=512,
        ),
    ),
}  # fmt: skip


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where the text already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=_HelpFormatter,
    )
    add_example_arguments(
        p,
        list(SIZES),
        run_name_help="run folder (default: gpt2-<size>, or gpt2-<size>-N when that is used)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="folder of text files (default: Python stdlib)")
    src.add_argument("--hf-dataset", default=None, help="a datasets.save_to_disk folder")
    p.add_argument("--text-field", default="text", help="text column of --hf-dataset")
    p.add_argument("--max-bytes", type=int, default=None, help="override the corpus byte cap")
    p.add_argument("--n-layer", type=int, default=None, help="override the number of blocks")
    return p


def parse_args(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    p = parser if parser is not None else build_parser()
    args = check_example_arguments(p, p.parse_args(argv))
    if args.n_layer is not None and args.n_layer < 1:
        p.error(f"--n-layer must be >= 1, got {args.n_layer}")
    if args.max_bytes is not None and args.max_bytes <= 0:
        p.error(f"--max-bytes must be positive, got {args.max_bytes}")
    for flag in ("data", "hf_dataset"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            p.error(f"--{flag.replace('_', '-')} {value!r} does not exist")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = build_parser()
    args = parse_args(argv, p)
    cfg, seq_len, max_bytes, settings = SIZES[args.size]
    cfg = dict(cfg)
    if args.n_layer is not None:
        cfg["n_layer"] = args.n_layer
    max_bytes = max_bytes if args.max_bytes is None else args.max_bytes
    settings = example_settings(settings, args)
    # Read the data and take the probe batch now, before any run folder is claimed: a text too
    # short for one window, or a folder that is no saved dataset, was a traceback (review,
    # session 25)
    flag, value = ("--hf-dataset", args.hf_dataset) if args.hf_dataset else ("--data", args.data)
    try:
        if args.hf_dataset:
            data_name = f"hf:{args.hf_dataset}"
            kw: dict[str, Any] = {"seq_len": seq_len, "max_bytes": max_bytes}
            hf_kw = {"text_field": args.text_field, **kw}
            train = hf_text_dataset(args.hf_dataset, split="train", **hf_kw)
            val = hf_text_dataset(args.hf_dataset, split="val", **hf_kw)
        else:
            data_name = args.data or "python-stdlib"
            train = text_corpus(args.data, split="train", seq_len=seq_len, max_bytes=max_bytes)
            val = text_corpus(args.data, split="val", seq_len=seq_len, max_bytes=max_bytes)
        lm_probe_batch(train, settings.probe_size)
    except (OSError, ValueError, TypeError) as err:
        p.error(f"{flag} {value!r}: {err}" if value is not None else str(err))
    return run_example(
        args,
        title="GPT-2",
        data_name=data_name,
        build=lambda seed: gpt2_pair(args.variant, seed=seed, n_positions=seq_len, **cfg),
        train=train,
        val=val,
        settings=settings,
        run_name=args.run_name or free_run_name(args.out, f"gpt2-{args.size}"),
        config={"gpt2": {**cfg, "n_positions": seq_len}},
        extra={"train_bytes": int(train.tokens.numel())},
    )


if __name__ == "__main__":
    main(sys.argv[1:])
