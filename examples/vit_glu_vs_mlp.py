"""ViT: GELU MLP vs a parameter-matched SwiGLU, over several seeds (the paper's ViT experiment).

For each seed a timm ``VisionTransformer`` (the baseline, GELU ``Mlp`` blocks) and a copy whose
MLPs are swapped to a parameter-matched gated variant (``--variant``, default SwiGLU; every other
parameter identical at init) are trained side by side on identical batches
(:class:`glu_probe.callbacks.PairedModule`) with the NTK, generalization-gap and loss-crossing
monitors. The script then reports, as mean ± std over seeds: the NTK condition number at init and
at the end, the first step at which the GLU model's training loss overtakes the baseline's, the
final train/validation losses and the clean generalization gap (the validation loss minus
the loss on a fixed training subset, both in eval mode; not the difference of the two loss
columns, whose train loss is the last training minibatch's, in train mode).

Data: CIFAR-10 from a local ``cifar-10-batches-py`` folder (``--cifar-root``; never downloaded),
else scikit-learn's digits (8x8, resized to 16x16).

Sizes:
  --size quick   tiny (CI / a laptop: seconds per seed)
  --size cpu     the demo size (default: a few minutes per seed on CPU)
  --size paper   ViT-Tiny-like (embed 192, depth 6 (12 with --depth), 3 heads) for a GPU

Examples::

    python examples/vit_glu_vs_mlp.py --size quick --seeds 0 1
    python examples/vit_glu_vs_mlp.py --size paper --cifar-root ~/data --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glu_probe.data import cifar10_dataset, digits_dataset
from glu_probe.demo import (
    PairSettings,
    add_example_arguments,
    check_example_arguments,
    example_settings,
    free_run_name,
    run_example,
)
from glu_probe.models import vit_pair

SIZES: dict[str, tuple[dict[str, Any], PairSettings]] = {
    "quick": (
        {"embed_dim": 32, "depth": 1, "num_heads": 2},
        PairSettings(
            steps=16, batch_size=32, lr=1e-3, optimizer="adamw", val_every=8, val_batches=2,
            ntk_every=8, probe_size=16, gap_subset=64,
        ),
    ),
    "cpu": (
        {"embed_dim": 64, "depth": 2, "num_heads": 4},
        PairSettings(
            steps=600, batch_size=64, lr=1e-3, optimizer="adamw", val_every=50, val_batches=8,
            ntk_every=24, probe_size=32, gap_subset=448,
        ),
    ),
    "paper": (
        {"embed_dim": 192, "depth": 6, "num_heads": 3},
        PairSettings(
            steps=6000, batch_size=128, lr=5e-4, optimizer="adamw", val_every=500,
            val_batches=20, ntk_every=240, probe_size=64, gap_subset=2048,
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
        run_name_help="run folder (default: vit-<size>-<data>, -N appended when that is used)",
    )
    p.add_argument("--cifar-root", default=None, help="folder holding cifar-10-batches-py")
    p.add_argument(
        "--no-verify-md5",
        action="store_true",
        help="skip torchvision's md5 check of the CIFAR-10 files (a re-packed or subsampled copy)",
    )
    p.add_argument("--train-limit", type=int, default=None, help="use the first N train images")
    p.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    return p


def parse_args(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    p = parser if parser is not None else build_parser()
    args = check_example_arguments(p, p.parse_args(argv))
    if args.depth is not None and args.depth < 1:
        p.error(f"--depth must be >= 1, got {args.depth}")
    if args.cifar_root is not None and not Path(args.cifar_root).is_dir():
        p.error(f"--cifar-root {args.cifar_root!r} is not a directory")
    if args.train_limit is not None and args.train_limit < 1:
        p.error(f"--train-limit must be >= 1, got {args.train_limit}")
    if args.train_limit is not None and args.cifar_root is None:
        # (it was silently ignored on digits: review, session 25)
        p.error("--train-limit needs --cifar-root (it limits the CIFAR-10 training images)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = build_parser()
    args = parse_args(argv, p)
    vit_kw, settings = SIZES[args.size]
    vit_kw = dict(vit_kw)
    if args.depth is not None:
        vit_kw["depth"] = args.depth
    settings = example_settings(settings, args)
    if args.cifar_root:
        data_name = "cifar10"
        check = not args.no_verify_md5
        try:  # (a missing or corrupted CIFAR-10 was a traceback: review, session 25)
            train = cifar10_dataset(
                args.cifar_root, "train", limit=args.train_limit, verify_md5=check
            )
            val = cifar10_dataset(args.cifar_root, "test", verify_md5=check)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
            p.error(f"--cifar-root {args.cifar_root!r}: {err}")
        vit_kw.update(img_size=32, patch_size=4, in_chans=3, num_classes=10)
    else:
        data_name = "digits"
        train = digits_dataset("train", image_size=16, seed=0)
        val = digits_dataset("val", image_size=16, seed=0)
        vit_kw.update(img_size=16, patch_size=4, in_chans=1, num_classes=10)
    return run_example(
        args,
        title="ViT",
        data_name=data_name,
        build=lambda seed: vit_pair(args.variant, seed=seed, **vit_kw),
        train=train,
        val=val,
        settings=settings,
        run_name=args.run_name or free_run_name(args.out, f"vit-{args.size}-{data_name}"),
        config={"vit": vit_kw},
    )


if __name__ == "__main__":
    main(sys.argv[1:])
