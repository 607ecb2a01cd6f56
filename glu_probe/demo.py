"""The main job: ``glu-probe demo``, three paired GLU vs non-GLU training runs.

Pairs (each trained as one :class:`~glu_probe.callbacks.PairedModule`: the GLU *model* and the
non-GLU *baseline* see identical batches, each with its own optimizer):

1. ``two_layer``: the paper's two-layer ReLU vs ReGLU networks in the NTK setting (x ~ N(0, I_d),
   W, U ~ N(0, 1/d), V ~ N(0, 1/m), no 1/√m factor), full-batch gradient descent with the *same*
   step size for both, squared loss on a standardised teacher target
   (:func:`glu_probe.data.two_layer_regression`). The NTK is probed on the whole training set.
2. ``vit``: a tiny timm ViT (GELU MLP) vs a parameter-matched SwiGLU, on scikit-learn's digits.
3. ``gpt2``: a tiny HF GPT-2 (GELU MLP) vs a parameter-matched SwiGLU, a byte-level language model
   on a real text corpus (default: the Python standard library's source files).

Every pair gets :class:`~glu_probe.callbacks.NTKSpectrumMonitor`,
:class:`~glu_probe.callbacks.GeneralizationGapMonitor`,
:class:`~glu_probe.callbacks.LossCrossingMonitor` (``baseline="paired"``) and the TensorBoard
dashboard, and logs with a ``TensorBoardLogger`` to ``<out_dir>/<run_name>/<pair>``. At the end the
job prints a summary table (κ at init and end, crossing steps, final losses and gaps), a plain
statement of what was observed, writes ``<out_dir>/<run_name>/report.png``
(:func:`glu_probe.report.plot_report`) and prints the ``tensorboard --logdir`` command.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import _json as strict_json

__all__ = [
    "PAIRS",
    "DemoResult",
    "PairSettings",
    "check_text_data",
    "claim_run_folder",
    "default_settings",
    "fit_pair",
    "fit_seeds",
    "free_run_name",
    "observations",
    "pair_run",
    "refuse_used_folder",
    "resolve_accelerator",
    "run_demo",
]

#: The pairs of the demo, in the order they run.
PAIRS = ("two_layer", "vit", "gpt2")


@dataclass(frozen=True)
class PairSettings:
    """Training settings of one demo pair.

    ``steps`` optimizer steps (one per batch, both networks), validation every ``val_every``
    steps on at most ``val_batches`` batches, an NTK probe every ``ntk_every`` steps on
    ``probe_size`` training samples (for GPT-2, sequences: the pNTK has one row per token).
    """

    steps: int
    batch_size: int
    lr: float
    optimizer: str
    val_every: int
    val_batches: int
    ntk_every: int
    probe_size: int
    gap_subset: int
    options: dict[str, Any] = field(default_factory=dict)


def default_settings(quick: bool = False) -> dict[str, PairSettings]:
    """The demo's settings per pair (``quick``: the reduced CI size).

    Two-layer: d = 16, m = 256, n = 512 (the paper's regime n > d, n ≥ 300), full-batch SGD with
    η = 0.015 for both networks (below 2/λ_max of the ReLU NTK of the mean loss, so both are
    stable). ViT: embed 64, depth 2, 4 heads, 16x16 digits in 4x4 patches, AdamW 1e-3. GPT-2:
    n_embd 64, 2 layers, 4 heads, 64-byte windows, AdamW 1e-3.
    """
    if quick:
        return {
            "two_layer": PairSettings(
                steps=80,
                batch_size=256,
                lr=0.015,
                optimizer="sgd",
                val_every=10,
                val_batches=1,
                ntk_every=10,
                probe_size=96,
                gap_subset=256,
                options={"d": 16, "m": 128, "n_train": 256, "n_val": 256},
            ),
            "vit": PairSettings(
                steps=30,
                batch_size=32,
                lr=1e-3,
                optimizer="adamw",
                val_every=10,
                val_batches=2,
                ntk_every=10,
                probe_size=16,
                gap_subset=64,
                options={"embed_dim": 32, "depth": 1, "num_heads": 2},
            ),
            "gpt2": PairSettings(
                steps=30,
                batch_size=8,
                lr=1e-3,
                optimizer="adamw",
                val_every=10,
                val_batches=2,
                ntk_every=10,
                probe_size=1,
                gap_subset=16,
                options={
                    "seq_len": 32,
                    "n_embd": 32,
                    "n_layer": 1,
                    "n_head": 2,
                    "max_bytes": 200_000,
                },
            ),
        }
    return {
        "two_layer": PairSettings(
            steps=300,
            batch_size=512,
            lr=0.015,
            optimizer="sgd",
            val_every=20,
            val_batches=1,
            ntk_every=12,
            probe_size=512,
            gap_subset=512,
            options={"d": 16, "m": 256, "n_train": 512, "n_val": 512},
        ),
        "vit": PairSettings(
            steps=500,
            batch_size=64,
            lr=1e-3,
            optimizer="adamw",
            val_every=50,
            val_batches=8,
            ntk_every=20,
            probe_size=32,
            gap_subset=448,
            options={"embed_dim": 64, "depth": 2, "num_heads": 4},
        ),
        "gpt2": PairSettings(
            steps=500,
            batch_size=16,
            lr=1e-3,
            optimizer="adamw",
            val_every=50,
            val_batches=8,
            ntk_every=20,
            probe_size=2,
            gap_subset=128,
            options={
                "seq_len": 64,
                "n_embd": 64,
                "n_layer": 2,
                "n_head": 4,
                "max_bytes": 1_000_000,
            },
        ),
    }


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: where, the summary rows, observations and timings."""

    run_dir: Path
    report_png: Path
    rows: list[dict[str, Any]]
    observations: list[str]
    seconds: dict[str, float]
    tensorboard_command: str


# --------------------------------------------------------------------------------------------
# building one pair
# --------------------------------------------------------------------------------------------


def _regression_loss(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Squared loss, mean over samples: L = (1/n) Σ (z(x_i) − y_i)², the paper's objective.
    return F.mse_loss(preds.float(), target.float())


def build_pair(
    name: str, s: PairSettings, seed: int = 0, data: str | None = None
) -> tuple[Any, Dataset[Any], Dataset[Any], Callable[..., torch.Tensor] | None]:
    """``(ModelPair, train_dataset, val_dataset, loss_fn)`` of the demo pair ``name``.

    ``s`` gives the sizes (``s.options``); ``data`` is a folder of text files for ``"gpt2"``
    (default: the Python standard library). :func:`run_demo` and
    ``benchmarks/bench_callbacks.py`` build their pairs with it.
    """
    from glu_probe import data as gdata
    from glu_probe import models

    o = dict(s.options)
    if name == "two_layer":
        pair = models.two_layer_pair(o["d"], o["m"], seed=seed)
        kw = {"d": o["d"], "n_train": o["n_train"], "n_val": o["n_val"], "seed": seed}
        train = gdata.two_layer_regression("train", **kw)
        val = gdata.two_layer_regression("val", **kw)
        return pair, train, val, _regression_loss
    if name == "vit":
        pair = models.vit_pair(
            "swiglu",
            seed=seed,
            img_size=16,
            patch_size=4,
            in_chans=1,
            num_classes=10,
            embed_dim=o["embed_dim"],
            depth=o["depth"],
            num_heads=o["num_heads"],
        )
        train = gdata.digits_dataset("train", image_size=16, seed=seed)
        val = gdata.digits_dataset("val", image_size=16, seed=seed)
        return pair, train, val, None
    if name == "gpt2":
        pair = models.gpt2_pair(
            "swiglu",
            seed=seed,
            n_positions=o["seq_len"],
            n_embd=o["n_embd"],
            n_layer=o["n_layer"],
            n_head=o["n_head"],
        )
        kw2: dict[str, Any] = {"seq_len": o["seq_len"], "max_bytes": o["max_bytes"]}
        text_train = gdata.text_corpus(data, split="train", **kw2)
        text_val = gdata.text_corpus(data, split="val", **kw2)
        return pair, text_train, text_val, None
    raise ValueError(f"unknown demo pair {name!r}; choose from {PAIRS}")


def data_fingerprint(train: Dataset[Any], val: Dataset[Any]) -> dict[str, Any]:
    """SHA-256 of the training and validation data, with their sizes and the Python version:
    written into ``pair.json`` so that two runs can tell whether they trained on the same bytes
    (the default GPT-2 corpus is the running Python's standard library, which differs between
    Python versions). Datasets other than byte windows and tensor datasets get ``None``."""
    from torch.utils.data import TensorDataset

    from glu_probe.data import ByteWindowDataset

    def tensors(ds: Dataset[Any]) -> tuple[torch.Tensor, ...] | None:
        if isinstance(ds, ByteWindowDataset):
            return (ds.tokens,)
        if isinstance(ds, TensorDataset):
            return tuple(ds.tensors)
        return None

    out: dict[str, Any] = {"python": platform.python_version()}
    for split, ds in (("train", train), ("val", val)):
        parts = tensors(ds)
        if parts is None:
            out[split] = None
            continue
        digest = hashlib.sha256()
        for t in parts:
            digest.update(str((tuple(t.shape), str(t.dtype))).encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        out[split] = {"sha256": digest.hexdigest(), "numel": int(sum(t.numel() for t in parts))}
    return out


def check_text_data(data: str | Path | None, s: PairSettings) -> None:
    """Read the GPT-2 pair's corpus (``data``, default the Python stdlib sources) as
    :func:`build_pair` will, and take its probe batch, so that a corpus that cannot serve (too
    short, unreadable, fewer distinct first bytes than ``s.probe_size``) fails before any pair
    trains (it had failed after the two-layer and ViT pairs: review, session 22). Raises
    ``ValueError`` / ``OSError``."""
    from glu_probe.data import lm_probe_batch, text_corpus

    o = s.options
    for split in ("train", "val"):
        corpus = text_corpus(data, split=split, seq_len=o["seq_len"], max_bytes=o["max_bytes"])
        if split == "train":
            lm_probe_batch(corpus, s.probe_size)


def _used(folder: Path) -> bool:
    """Whether ``folder`` exists and holds anything (a run's files, or another run's claim)."""
    return folder.is_dir() and any(folder.iterdir())


def refuse_used_folder(path: str | Path, what: str = "run folder") -> None:
    """``FileExistsError`` if ``path`` exists and is not empty: TensorBoard would add a run's
    event files beside the old ones, and :func:`glu_probe.report.load_run` would then report a
    mix of both runs (a re-run of an example under its default name reported the first run's
    last steps: review, session 22)."""
    p = Path(path)
    if _used(p):
        raise FileExistsError(
            f"{what} {str(p)!r} exists and is not empty: its event files would mix with this "
            "run's; use another run name or remove it"
        )


#: The file a run writes first into its folder, atomically (``open(..., "x")``): of two runs
#: started together on one folder, one gets it and the other stops before writing anything.
RUN_CLAIM = ".glu-probe-run"


def claim_run_folder(path: str | Path, what: str = "run folder") -> None:
    """:func:`refuse_used_folder`, then claim ``path`` for this run by creating
    :data:`RUN_CLAIM` in it exclusively: two runs started together had both found the folder
    empty and written their event files side by side (a parallel seed sweep under one name, or
    two default names stamped in the same second; re-review, session 22)."""
    p = Path(path)
    refuse_used_folder(p, what)
    p.mkdir(parents=True, exist_ok=True)
    try:
        with open(p / RUN_CLAIM, "x", encoding="utf-8") as f:
            f.write(f"pid {os.getpid()}\n")
    except FileExistsError:
        raise FileExistsError(
            f"{what} {str(p)!r} was claimed by another run started at the same time; use another "
            "run name"
        ) from None


def free_run_name(out_dir: str | Path, base: str) -> str:
    """``base`` if ``<out_dir>/<base>`` is free (missing or empty), else the first free
    ``base-2``, ``base-3``, ...: the examples' default run names, so that a re-run does not
    write into (and report) an earlier run's folder."""
    name, k = base, 1
    while _used(Path(out_dir) / name):
        k += 1
        name = f"{base}-{k}"
    return name


def _check_seed(seed: object) -> int:
    """``seed`` as a Python int: any integer (``numpy.int64`` from a sweep too) in [0, 2**32)."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, numbers.Integral)
        or not 0 <= int(seed) < 2**32
    ):
        # (Lightning's seed_everything takes 32-bit seeds; 2**32 raised inside it)
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def _callbacks(s: PairSettings, progress: bool, probe: Any = None) -> list[Any]:
    from glu_probe.callbacks.crossing import LossCrossingMonitor
    from glu_probe.callbacks.dashboard import TensorBoardDashboard
    from glu_probe.callbacks.gap import GeneralizationGapMonitor
    from glu_probe.callbacks.ntk import NTKSpectrumMonitor

    cbs: list[Any] = [
        # max_rows=None: the probe sizes above are chosen per pair (the whole training set for
        # the two-layer nets, as in the paper's kernel), not capped by the monitor's default.
        NTKSpectrumMonitor(
            every_n_steps=s.ntk_every,
            probe=probe,
            probe_size=s.probe_size,
            max_rows=None,
            method="dense",
        ),
        GeneralizationGapMonitor(train_subset_size=s.gap_subset),
        LossCrossingMonitor(baseline="paired", monitor="train_loss"),
        TensorBoardDashboard(),
    ]
    if progress:
        try:
            from lightning.pytorch.callbacks import RichProgressBar

            cbs.append(RichProgressBar(leave=True))
        except (ImportError, ModuleNotFoundError):  # rich missing: Lightning's tqdm bar
            pass
    return cbs


def _max_time(minutes: float | None) -> Any:
    # Lightning's max_time takes a dict of timedelta fields (or "DD:HH:MM:SS"); float minutes ok.
    return {"seconds": float(minutes) * 60.0} if minutes else None


def pair_run(
    pair: Any,
    train: Dataset[Any],
    val: Dataset[Any],
    s: PairSettings,
    *,
    loss_fn: Callable[..., torch.Tensor] | None,
    seed: int = 0,
) -> tuple[Any, DataLoader[Any], DataLoader[Any], dict[str, Any]]:
    """What a demo run of ``pair`` is made of: ``(module, train_loader, val_loader, trainer_kw)``.

    The :class:`~glu_probe.callbacks.PairedModule` (AdamW without weight decay, or SGD), a
    shuffled train loader whose order comes from a generator seeded with ``seed``, the val loader
    (batches of at least 64) and the ``Trainer`` keywords of the cadence in ``s`` (steps,
    validation interval and batches, one device, no checkpoints). :func:`fit_pair` and
    ``benchmarks/bench_callbacks.py`` build their runs from it.
    """
    from glu_probe.callbacks.paired import PairedModule

    module = PairedModule(
        pair.model,
        pair.baseline,
        loss_fn=loss_fn,
        optimizer=s.optimizer,
        lr=s.lr,
        optimizer_kwargs={"weight_decay": 0.0} if s.optimizer == "adamw" else {},
    )
    train_loader = DataLoader(
        train,
        batch_size=min(s.batch_size, len(train)),  # type: ignore[arg-type]
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = DataLoader(val, batch_size=max(s.batch_size, 64), shuffle=False)
    trainer_kwargs = {
        "max_steps": s.steps,
        "devices": 1,
        "val_check_interval": s.val_every,
        "check_val_every_n_epoch": None,
        "limit_val_batches": s.val_batches,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    return module, train_loader, val_loader, trainer_kwargs


def fit_pair(
    pair: Any,
    train: Dataset[Any],
    val: Dataset[Any],
    s: PairSettings,
    *,
    loss_fn: Callable[..., torch.Tensor] | None,
    save_dir: str | Path,
    name: str,
    version: str,
    seed: int = 0,
    accelerator: str = "cpu",
    progress: bool = True,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """Train one :class:`~glu_probe.models.ModelPair` as a :class:`PairedModule` with all monitors.

    Logs go to ``<save_dir>/<name>/<version>`` (a ``TensorBoardLogger``), where a ``pair.json``
    with the labels, parameter counts and settings is written too (read by
    :func:`glu_probe.report.load_run`). The batch order comes from a generator seeded with
    ``seed``. Returns that metadata (with ``seconds`` of training and ``steps_done``).
    """
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from glu_probe.data import ByteWindowDataset, lm_probe_batch

    seed = _check_seed(seed)
    claim_run_folder(Path(save_dir) / name / version)
    module, train_loader, val_loader, trainer_kwargs = pair_run(
        pair, train, val, s, loss_fn=loss_fn, seed=seed
    )
    probe = None
    if isinstance(train, ByteWindowDataset):
        # Distinct first bytes: shared prefixes would duplicate pNTK rows (K exactly singular).
        probe = lm_probe_batch(train, s.probe_size)
    logger = TensorBoardLogger(save_dir=str(save_dir), name=name, version=version)
    trainer = pl.Trainer(
        accelerator=accelerator,
        logger=logger,
        callbacks=_callbacks(s, progress, probe),
        enable_progress_bar=progress,
        max_time=_max_time(max_minutes),
        **trainer_kwargs,
    )
    t0 = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    seconds = time.perf_counter() - t0
    m_params, b_params = pair.n_params
    meta = {
        "pair": pair.name,
        "labels": {"model": pair.model_label, "baseline": pair.baseline_label},
        "model_prefix": module.model_prefix,
        "baseline_prefix": module.baseline_prefix,
        "task": pair.task,
        "params": {"model": m_params, "baseline": b_params},
        "settings": asdict(s),
        "seed": seed,
        "steps_done": int(trainer.global_step),
        "stopped_early": trainer.global_step < s.steps,
        "data": data_fingerprint(train, val),
        "seconds": seconds,
        "accelerator": accelerator,
    }
    out = Path(logger.log_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pair.json").write_text(strict_json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def fit_seeds(
    build: Callable[[int], Any],
    train: Dataset[Any],
    val: Dataset[Any],
    s: PairSettings,
    *,
    seeds: Sequence[int],
    save_dir: str | Path,
    name: str,
    accelerator: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`fit_pair` once per seed (``build(seed)`` makes the pair), then mean ± std.

    Each seed logs to ``<save_dir>/<name>/seed_<seed>``. Returns ``metas`` (one per seed), the
    summary ``rows`` of those seeds, their ``aggregate`` over seeds and the rendered ``table``.
    """
    import lightning.pytorch as pl

    from glu_probe.report import aggregate_seeds, format_seed_table, load_run, summarize

    seeds = [_check_seed(seed) for seed in seeds]  # all before the first trains
    if len(set(seeds)) < len(seeds):  # (the second run of a seed found its folder used)
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    for seed in seeds:
        refuse_used_folder(Path(save_dir) / name / f"seed_{seed}")
    metas = []
    for seed in seeds:
        pl.seed_everything(seed, workers=True, verbose=False)
        metas.append(
            fit_pair(
                build(seed), train, val, s, loss_fn=None, save_dir=save_dir, name=name,
                version=f"seed_{seed}", seed=seed, accelerator=accelerator, progress=progress,
            )
        )  # fmt: skip
    versions = {f"seed_{seed}" for seed in seeds}
    rows = [r for r in summarize(load_run(Path(save_dir) / name)) if r["run"] in versions]
    agg = aggregate_seeds(rows)
    return {"metas": metas, "rows": rows, "aggregate": agg, "table": format_seed_table(agg)}


def add_example_arguments(parser: Any, sizes: Sequence[str], run_name_help: str) -> None:
    """The command-line options the per-model examples share (``examples/*_glu_vs_mlp.py``):
    ``--size``/``--quick``, ``--seeds``, ``--variant``, ``--steps``, ``--lr``, ``--device``,
    ``--out``, ``--run-name``, ``--no-progress`` and ``--threads``; the example adds its own data
    options. :func:`check_example_arguments` finishes them after parsing."""
    p = parser
    p.add_argument("--size", choices=sorted(sizes), default="cpu", help="model/training size")
    p.add_argument("--quick", action="store_true", help="same as --size quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    p.add_argument("--variant", default="swiglu", help="gated MLP variant of the model")
    p.add_argument("--steps", type=int, default=None, help="override the optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="override the learning rate")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: GPU when present"
    )
    p.add_argument("--out", default="runs/examples", help="TensorBoard root")
    p.add_argument("--run-name", default=None, help=run_name_help)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")


def check_example_arguments(parser: Any, args: Any) -> Any:
    """``--quick`` means ``--size quick``; ``--steps`` and ``--threads`` must be positive,
    ``--lr`` positive and finite, the seeds non-negative and distinct and ``--variant`` a gated
    variant (``parser.error``, exit status 2, before any run folder is claimed)."""
    from glu_probe.modules import GATED_VARIANTS

    if args.quick:
        args.size = "quick"
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        # (-0.001 crashed after the run folder was claimed, and 0 was read as "not given")
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if any(s < 0 for s in args.seeds):
        parser.error(f"--seeds must be >= 0, got {args.seeds}")
    if len(set(args.seeds)) < len(args.seeds):  # (fit_seeds raised late: review, session 25)
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if args.variant not in GATED_VARIANTS:
        parser.error(f"--variant must be one of {sorted(GATED_VARIANTS)}, got {args.variant!r}")
    return args


def _cadence(steps: int, every: int, default_steps: int) -> int:
    """``every`` rescaled from a run of ``default_steps`` to one of ``steps`` (the same number
    of validations / probes), moved down to a divisor of ``steps`` where one lies within a
    factor two, so that the last one falls on the last step."""
    scaled = max(1, round(every * steps / default_steps))
    for d in range(scaled, max(1, scaled // 2) - 1, -1):
        if steps % d == 0:
            return d
    return scaled


def example_settings(settings: PairSettings, args: Any) -> PairSettings:
    """``settings`` with the examples' ``--steps`` and ``--lr`` overrides. With ``--steps``, the
    validation and NTK cadences are rescaled (:func:`_cadence`): kept as they were, ``--steps
    12`` validated and probed last at step 8, and the table's "κ end" and final losses were
    those of step 8 (review, session 24). A cadence that cannot land on the last step is said
    so."""
    lr = settings.lr if args.lr is None else args.lr
    if args.steps is None or args.steps == settings.steps:
        return replace(settings, lr=lr)
    steps = args.steps
    val_every = _cadence(steps, settings.val_every, settings.steps)
    ntk_every = _cadence(steps, settings.ntk_every, settings.steps)
    for what, every in (("validation", val_every), ("NTK probe", ntk_every)):
        if steps % every:
            print(
                f"note: --steps {steps}: the last {what} is at step {steps - steps % every} "
                f"(every {every} steps), not at the last step"
            )
    return replace(settings, steps=steps, lr=lr, val_every=val_every, ntk_every=ntk_every)


def run_example(
    args: Any,
    *,
    title: str,
    data_name: str,
    build: Callable[[int], Any],
    train: Dataset[Any],
    val: Dataset[Any],
    settings: PairSettings,
    run_name: str,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The shared body of the per-model examples: :func:`fit_seeds` over ``args.seeds``, the
    printed mean ± std table, and ``<out>/<run_name>/results.json`` (returned as a dict).

    ``config`` (the model's own sizes, e.g. ``{"vit": {...}}``) and ``extra`` go into the results
    next to the data name, size, settings, seeds, rows, aggregate, wall times and parameters.
    """
    accelerator = resolve_accelerator(args.device)
    if accelerator == "cpu":
        torch.set_num_threads(args.threads)  # tiny models: extra threads only spin-wait
    out = Path(args.out)
    fit = fit_seeds(
        build,
        train,
        val,
        settings,
        seeds=args.seeds,
        save_dir=out,
        name=run_name,
        accelerator=accelerator,
        progress=not args.no_progress,
    )
    metas, rows, agg, table = fit["metas"], fit["rows"], fit["aggregate"], fit["table"]
    print(
        f"\n{title} ({data_name}, size {args.size}, {len(args.seeds)} seeds): {metas[0]['params']}"
    )
    print(table)
    result = {
        "data": data_name,
        "size": args.size,
        **config,
        "settings": settings.__dict__,
        "seeds": list(args.seeds),
        **(extra or {}),
        "rows": rows,
        "aggregate": agg,
        "seconds": [m["seconds"] for m in metas],
        "params": metas[0]["params"],
        "table": table,
    }
    path = out / run_name / "results.json"
    path.write_text(strict_json.dumps(result, indent=2))
    print(f"results: {path}")
    print(f"TensorBoard: tensorboard --logdir {out / run_name}")
    return result


def _train_pair(
    name: str,
    s: PairSettings,
    *,
    run_root: Path,
    run_name: str,
    seed: int,
    data: str | None,
    accelerator: str,
    progress: bool,
    max_minutes: float | None,
) -> dict[str, Any]:
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    pair, train, val, loss_fn = build_pair(name, s, seed, data)
    return fit_pair(
        pair,
        train,
        val,
        s,
        loss_fn=loss_fn,
        save_dir=run_root,
        name=run_name,
        version=name,
        seed=seed,
        accelerator=accelerator,
        progress=progress,
        max_minutes=max_minutes,
    )


# --------------------------------------------------------------------------------------------
# observations
# --------------------------------------------------------------------------------------------


def observations(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Plain-language statements of what the summary rows show (nothing is assumed).

    For each pair: which network had the smaller NTK condition number at init and at the end,
    which one led early and whether (and where) the GLU model overtook the baseline, a network
    whose train loss ended non-finite (and from which step), the final train losses (which is
    lower is decided on the smoothed losses at the last step both have, see
    :func:`_train_loss_text`) and the generalization gaps.
    """
    by_run: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(r["run"], {})[r["side"]] = r
    lines = []
    for run, sides in by_run.items():
        m, b = sides.get("model"), sides.get("baseline")
        if m is None or b is None:
            continue
        ml, bl = m["label"], b["label"]
        parts = [f"{run}:"]
        if _finite(m["kappa_init"], b["kappa_init"]):
            smaller = ml if m["kappa_init"] < b["kappa_init"] else bl
            parts.append(
                f"κ at init: {ml} {m['kappa_init']:.3g} vs {bl} {b['kappa_init']:.3g} "
                f"(smaller: {smaller});"
            )
        if _finite(m["kappa_end"], b["kappa_end"]):
            smaller = ml if m["kappa_end"] < b["kappa_end"] else bl
            parts.append(f"at the end {m['kappa_end']:.3g} vs {b['kappa_end']:.3g} ({smaller}).")
        events = [
            f"{ml} overtook {bl} at step {st}" if d > 0 else f"{bl} overtook {ml} at step {st}"
            for st, d in m["crossings"]
        ]
        if not events:
            parts.append("No loss crossing was detected.")
        elif len(events) <= 4:
            parts.append("Crossings: " + "; ".join(events) + ".")
        else:
            parts.append(
                f"{len(events)} crossings (the curves stay close): "
                + "; ".join(events[:2])
                + f"; ... last: {events[-1]}."
            )
        for r in (m, b):
            if r.get("diverged_step") is not None:
                parts.append(
                    f"{r['label']} diverged (non-finite train loss from step {r['diverged_step']})."
                )
        train_text = _train_loss_text(m, b)
        if train_text:
            parts.append(train_text)
        if _finite(m["gap"], b["gap"]):
            parts.append(
                f"Clean gap (val − train subset, both in eval mode): {ml} {m['gap']:+.4g} vs "
                f"{bl} {b['gap']:+.4g}."
            )
        lines.append(" ".join(parts))
    return lines


def _lower(ml: str, x: float, bl: str, y: float) -> str:
    return ml if x < y else (bl if y < x else "neither, equal")


def _train_loss_text(m: dict[str, Any], b: dict[str, Any]) -> str:
    """The train losses of a pair's two rows, compared at one step.

    Which one is lower comes from the smoothed losses at the last step both sides have
    (``compare_step``, ``train_smoothed`` of :func:`glu_probe.report.summarize`: the crossing
    detector's EMA), not from one minibatch each, which could contradict the crossings (session
    29: "SwiGLU overtook GELU MLP at step 316" and "lower: GELU MLP" from the last batch, with
    SwiGLU lower on 46 of the last 50). The last logged values follow as numbers only, with their
    steps where they differ. Rows without the smoothed values (older summaries) are compared on
    the last logged values, where both are at the same step, and say so.
    """
    ml, bl = m["label"], b["label"]
    x, y = m["train_loss"], b["train_loss"]
    sx, sy = m.get("train_step"), b.get("train_step")
    step, mx, my = m.get("compare_step"), m.get("train_smoothed"), b.get("train_smoothed")
    if not _finite(x, y):
        raw = ""
    elif sx != sy:
        raw = f"{ml} {x:.4g} (step {sx}) vs {bl} {y:.4g} (step {sy})"
    else:
        raw = f"{x:.4g} vs {y:.4g}" + (f" (step {sx})" if sx not in (None, step) else "")
    if step is not None and mx is not None and my is not None and _finite(mx, my):
        text = (
            f"Final train loss, smoothed (the crossing detector's EMA, β = 0.9) at step {step}: "
            f"{ml} {mx:.4g} vs {bl} {my:.4g} (lower: {_lower(ml, mx, bl, my)})"
        )
        return text + (f"; last logged batch {raw}." if raw else ".")
    if "train_smoothed" not in m and raw and sx == sy:
        return (
            f"Final train loss, last logged batch: {ml} {x:.4g} vs {bl} {y:.4g} "
            f"(lower: {_lower(ml, x, bl, y)})."
        )
    if raw:
        return f"Last logged train loss {raw} (no common step with finite losses: not compared)."
    return ""


def _finite(*xs: Any) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------


def resolve_accelerator(device: str) -> str:
    """Lightning accelerator for ``device``: ``"auto"`` picks the GPU when one is present."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but no CUDA device is available")
        return "gpu"
    if device == "cpu":
        return "cpu"
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def run_demo(
    out_dir: str | Path = "runs",
    run_name: str | None = None,
    *,
    quick: bool = False,
    data: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    max_minutes: float | None = None,
    pairs: Sequence[str] = PAIRS,
    progress: bool = True,
    console: Any = None,
    settings: dict[str, PairSettings] | None = None,
    threads: int | None = 1,
) -> DemoResult:
    """Train the demo pairs, then print the summary, write the report and return the result.

    Args:
        out_dir: TensorBoard root; the run goes to ``<out_dir>/<run_name>/<pair>``.
        run_name: default ``demo-<timestamp>`` (``demo-quick-<timestamp>`` with ``quick``).
        quick: the reduced CI size (well under a minute of training on one CPU core).
        data: a folder of text files for the GPT-2 pair (default: the Python stdlib sources).
        device: ``"auto"`` (GPU when present), ``"cpu"`` or ``"cuda"``.
        seed: seed of data splits, initialisation and batch order.
        max_minutes: wall-time cap *per pair* (Lightning ``max_time``); a capped pair is marked
            ``stopped_early`` in its ``pair.json`` and the observations say so.
        pairs: which pairs to run (subset of :data:`PAIRS`).
        progress: show progress bars (rich).
        console: a ``rich.console.Console`` for the output (default: a new one).
        settings: override :func:`default_settings` per pair.
        threads: CPU threads for torch (``torch.set_num_threads``); default 1: the demo models
            are too small to gain from intra-op threads, and on a busy machine extra threads
            spin-wait (measured: a 0.7 s NTK probe took 17 s with 2 threads on a loaded 2-core
            box). ``None`` leaves torch's setting alone.
    """
    from glu_probe.report import load_run, make_console, plot_report, render_table, summarize

    unknown = [p for p in pairs if p not in PAIRS]
    if unknown or not pairs:
        raise ValueError(f"pairs must be a non-empty subset of {PAIRS}, got {list(pairs)}")
    if data is not None and not Path(data).exists():
        raise FileNotFoundError(f"--data folder {str(data)!r} does not exist")
    if max_minutes is not None and not 0 < max_minutes < math.inf:
        raise ValueError(f"max_minutes must be a positive finite number, got {max_minutes}")
    seed = _check_seed(seed)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    accelerator = resolve_accelerator(device)
    console = console or make_console()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    default_name = not run_name
    run_name = run_name or (f"demo-quick-{stamp}" if quick else f"demo-{stamp}")
    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise ValueError(f"run_name must be a plain folder name, got {run_name!r}")
    run_root = Path(out_dir)
    run_dir = run_root / run_name
    if not default_name:  # (early, before the corpus is read; claimed just before training)
        refuse_used_folder(run_dir)
    cfg = default_settings(quick)
    if settings:
        cfg.update(settings)
    if "gpt2" in pairs:
        check_text_data(data, cfg["gpt2"])
    for k in range(2, 1000):  # claim it (a default name stamped in the same second: -2, -3, ...)
        try:
            claim_run_folder(run_dir)
            break
        except FileExistsError:
            if not default_name:
                raise
            run_name = f"{run_name.rsplit(stamp, 1)[0]}{stamp}-{k}"
            run_dir = run_root / run_name
    else:
        raise FileExistsError(f"no free run folder for {run_name!r} under {str(run_root)!r}")
    if accelerator == "cpu" and threads is not None:
        torch.set_num_threads(int(threads))

    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    metas = {}
    for name in pairs:
        console.rule(f"[bold]{name}[/bold]")
        metas[name] = _train_pair(
            name,
            replace(cfg[name]),
            run_root=run_root,
            run_name=run_name,
            seed=seed,
            data=str(data) if data is not None else None,
            accelerator=accelerator,
            progress=progress,
            max_minutes=max_minutes,
        )
        seconds[name] = metas[name]["seconds"]

    run = load_run(run_dir)
    order = {name: i for i, name in enumerate(PAIRS)}
    rows = sorted(summarize(run), key=lambda r: order.get(r["run"], len(order)))
    console.print(render_table(rows, title=f"glu-probe demo: {run_name}"))
    notes = observations(rows)
    for name, meta in metas.items():
        if meta["stopped_early"]:
            notes.append(
                f"{name}: stopped early at step {meta['steps_done']} of "
                f"{meta['settings']['steps']} (max_minutes={max_minutes})."
            )
    console.print("[bold]What this run shows[/bold]")
    for line in notes:
        console.print(f"  {line}", markup=False, highlight=False)
    run.subruns = dict(sorted(run.subruns.items(), key=lambda kv: order.get(kv[0], len(order))))
    png = plot_report(run, run_dir / "report.png")
    seconds["total"] = time.perf_counter() - t_all
    cmd = f"tensorboard --logdir {run_dir}"
    console.print(f"Report figure: {png}")
    console.print(f"Training time: {seconds['total']:.0f} s ({accelerator})")
    console.print(f"TensorBoard:   [bold]{cmd}[/bold]")
    summary = {"rows": rows, "observations": notes, "seconds": seconds, "pairs": metas}
    (run_dir / "summary.json").write_text(strict_json.dumps(summary, indent=2))
    return DemoResult(
        run_dir=run_dir,
        report_png=png,
        rows=rows,
        observations=notes,
        seconds=seconds,
        tensorboard_command=cmd,
    )
