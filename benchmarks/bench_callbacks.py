"""Training-time overhead of the glu-probe monitors at their default cadence.

Usage::

    python benchmarks/bench_callbacks.py [--device cpu|cuda] [--models two_layer vit gpt2]
        [--repeats 2] [--threads N] [--write benchmarks/RESULTS_callbacks.md]

For each demo-like pair (the settings of ``glu_probe.demo.default_settings()``: the paper's
two-layer ReLU/ReGLU regression, a tiny timm ViT on 16x16 digits, a tiny HF GPT-2 on 64-byte
windows; each trained as a :class:`~glu_probe.callbacks.PairedModule`) the same ``Trainer.fit``
is timed

* **without** callbacks, and
* **with** ``NTKSpectrumMonitor()`` (every argument at its default: automatic cadence
  ``max(1, steps // 25)``, ``probe_size=64``, ``output="pntk"``, ``method="auto"``),
  ``GeneralizationGapMonitor()``, ``LossCrossingMonitor(baseline="paired")`` and
  ``TensorBoardDashboard()``;

both with the same TensorBoardLogger, validation cadence and data order. Runs are interleaved
(without, with, without, with, ...) and the minimum wall time of each is kept, which is the
least noisy estimate on a shared machine. ``overhead = with / without − 1``; the target is
<= 5% with >= 20 probes per run. The NTK probe count and the mean time per probe are reported.

Because two wall times on a busy machine differ by more than 5% from noise alone, the table also
gives the NTK monitor's own time (timed inside the run, ``NTKSpectrumMonitor.probe_seconds``)
over the run without callbacks, and its projection to the full-length run:
``P · (s / probe) / (steps · s / step)`` with ``P = target_probes + 1`` probes (21 by default,
whatever the length). ``s / probe`` there is the NTK monitor's whole hook time per probe (every
hook it overrides, not only ``probe_seconds``), and ``s / step`` is the steady-state step time
of the run without callbacks: the time from the start of training batch ``k0`` (10% into the
run, at most 10) to the end of the last one, over the steps in between (validation that falls
in between included; Trainer setup, the sanity check and the first steps excluded), so that
fixed costs are not scaled with the run length. On CUDA every timed hook synchronises the device
first and last (bench side only), which would bias the wall time of the run it times (six syncs a
step that the run without does not pay): there the wall times come from runs with untimed hooks,
and the callbacks' own times from one extra timed run. ``--scale 0.25`` runs a quarter of the
demo's steps (still P probes, so the measured share is 4x the full-length one).

``--device cuda`` times a GPT-2-small-sized model (124M parameters: 12 layers, 12 heads,
n_embd 768, 1024 positions; 256-byte windows) for ``--gpu-steps`` steps instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

os.environ.setdefault("MPLBACKEND", "Agg")


def build(name: str, device: str, gpu_steps: int) -> tuple[Any, Any, Dataset, Dataset, Any]:
    """``(settings, pair, train, val, loss_fn)``: the demo's pairs (``glu_probe.demo.build_pair``)
    or, for ``gpt2_small``, a GPT-2-small-sized pair on 256-byte windows."""
    from glu_probe import data as gdata
    from glu_probe import models
    from glu_probe.demo import build_pair, default_settings

    if name == "gpt2_small":
        s = replace(
            default_settings()["gpt2"],
            steps=gpu_steps,
            batch_size=8,
            options={"seq_len": 256, "max_bytes": 4_000_000},
        )
        pair = models.gpt2_pair(
            "swiglu", seed=0, n_positions=1024, n_embd=768, n_layer=12, n_head=12
        )
        kw: dict[str, Any] = {"seq_len": 256, "max_bytes": 4_000_000}
        return s, pair, gdata.text_corpus(**kw), gdata.text_corpus(split="val", **kw), None
    settings = default_settings()
    if name not in settings:
        raise SystemExit(f"unknown model {name!r}")
    s = settings[name]
    return (s, *build_pair(name, s, seed=0))


def _default_probes() -> int:
    """Probes of the automatic cadence over a run: ``target_probes`` plus the one at step 0."""
    import inspect

    from glu_probe.callbacks.ntk import NTKSpectrumMonitor

    default = inspect.signature(NTKSpectrumMonitor).parameters["target_probes"].default
    return int(default) + 1


def _cuda_sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


class StepTimer:
    """Steady-state training step time: from the start of batch ``k0`` to the end of the last
    batch, over the steps in between (a Lightning callback; not itself timed). On CUDA it
    records events on the stream instead of synchronising each step (a per-step sync in both
    runs would hide the cost of a callback that adds one)."""

    def __init__(self, cuda: bool) -> None:
        import lightning.pytorch as pl

        self.cuda = cuda
        self.k0 = 0
        self.t0: float | None = None
        self.t_end: float | None = None
        self.n0 = 0
        self.n_end = 0
        self.events: tuple[Any, Any] | None = None
        if cuda:
            self.events = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
        timer = self

        class _CB(pl.Callback):
            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                steps = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else 0
                timer.k0 = min(10, max(1, steps // 10))

            def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
                if timer.t0 is None and trainer.global_step >= timer.k0:
                    if timer.events is not None:
                        timer.events[0].record()
                    timer.t0, timer.n0 = time.perf_counter(), trainer.global_step

            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                if timer.t0 is not None:
                    if timer.events is not None:
                        timer.events[1].record()  # re-recorded: the last batch's end counts
                    timer.t_end, timer.n_end = time.perf_counter(), trainer.global_step

        self.callback = _CB()

    def step_seconds(self) -> float | None:
        if self.t0 is None or self.t_end is None or self.n_end <= self.n0:
            return None
        if self.events is not None:
            torch.cuda.synchronize()
            seconds = self.events[0].elapsed_time(self.events[1]) / 1000.0
            return seconds / (self.n_end - self.n0)
        return (self.t_end - self.t0) / (self.n_end - self.n0)


def time_hooks(callbacks: list[Any], cuda: bool = False) -> dict[str, float]:
    """Wrap every Lightning hook each callback overrides; return {callback: seconds} (live).

    The callbacks' own time inside the run is a far less noisy overhead figure than the
    difference of two wall times on a shared machine (which drift by 20-40% between runs).
    """
    import lightning.pytorch as pl

    totals: dict[str, float] = {}
    hooks = [h for h in dir(pl.Callback) if h.startswith(("on_", "setup", "teardown"))]
    for cb in callbacks:
        name = type(cb).__name__
        totals[name] = 0.0
        for hook in hooks:
            if getattr(type(cb), hook) is getattr(pl.Callback, hook):
                continue  # not overridden: Lightning's no-op

            setattr(cb, hook, _timed(getattr(cb, hook), name, totals, cuda))
    return totals


_LAST_PRINT = [time.perf_counter()]
#: ``method/precision/products/seconds`` of every ntk_spectrum call of the run (see _record).
SPECTRA: list[str] = []


def _record(fn: Any) -> Any:
    """Wrap ``glu_probe.ntk.ntk_spectrum`` so that the running print says which path each probe
    took and how many products it needed (the monitor imports it at call time)."""

    def wrapped(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        s = fn(*args, **kw)
        dt = time.perf_counter() - t0
        SPECTRA.append(f"{s.method}/{s.precision}/{s.n_matvecs} products/{dt:.2f} s")
        return s

    return wrapped


def _timed(fn: Any, name: str, totals: dict[str, float], cuda: bool = False) -> Any:
    def wrapped(*args: Any, **kw: Any) -> Any:
        _cuda_sync(cuda)  # bill the training step's queued kernels to the step, not the hook
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            _cuda_sync(cuda)
            now = time.perf_counter()
            totals[name] += now - t0
            if now - _LAST_PRINT[0] > 10.0:  # running totals, so that a killed run still tells
                _LAST_PRINT[0] = now
                step = getattr(args[0], "global_step", "?") if args else "?"
                live = ", ".join(f"{k} {v:.1f} s" for k, v in totals.items())
                probes = getattr(getattr(fn, "__self__", None), "probe_seconds", None)
                if probes:
                    live += f"; {len(probes)} NTK probes, last {probes[-1]:.2f} s"
                if SPECTRA:
                    live += " (" + ", ".join(SPECTRA[-2:]) + ")"
                print(f"  [step {step}] callback time so far: {live}", flush=True)

    return wrapped


def fit_once(
    name: str,
    with_callbacks: bool,
    device: str,
    gpu_steps: int,
    root: Path,
    scale: float = 1.0,
    timed: bool = True,
) -> dict[str, Any]:
    """One fit of the demo pair ``name``; ``timed=False`` leaves the callbacks' hooks unwrapped
    (their own times come back as zeros), for a wall time without the timer's CUDA syncs."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from glu_probe.callbacks.crossing import LossCrossingMonitor
    from glu_probe.callbacks.dashboard import TensorBoardDashboard
    from glu_probe.callbacks.gap import GeneralizationGapMonitor
    from glu_probe.callbacks.ntk import NTKSpectrumMonitor
    from glu_probe.demo import pair_run

    pl.seed_everything(0, verbose=False)
    s, pair, train, val, loss_fn = build(name, device, gpu_steps)
    full_steps = s.steps
    s = replace(s, steps=max(25, round(s.steps * scale)))
    module, train_dl, val_dl, trainer_kwargs = pair_run(pair, train, val, s, loss_fn=loss_fn)
    ntk = NTKSpectrumMonitor()
    callbacks: list[Any] = (
        [
            ntk,
            GeneralizationGapMonitor(),
            LossCrossingMonitor(baseline="paired", monitor="train_loss"),
            TensorBoardDashboard(),
        ]
        if with_callbacks
        else []
    )
    hook_seconds = time_hooks(callbacks, cuda=device == "cuda") if timed else {}
    step_timer = StepTimer(cuda=device == "cuda")
    import glu_probe.ntk as gntk

    SPECTRA.clear()
    plain_spectrum = gntk.ntk_spectrum
    gntk.ntk_spectrum = _record(plain_spectrum)  # type: ignore[assignment]
    trainer = pl.Trainer(
        accelerator="cuda" if device == "cuda" else "cpu",
        logger=TensorBoardLogger(root, name=name, version="with" if with_callbacks else "without"),
        callbacks=[*callbacks, step_timer.callback],
        enable_progress_bar=False,
        **trainer_kwargs,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        trainer.fit(module, train_dl, val_dl)
    finally:
        gntk.ntk_spectrum = plain_spectrum  # type: ignore[assignment]
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "steps": trainer.global_step,
        "full_steps": full_steps,
        "probes": len(ntk.history),
        "every": ntk._resolved_every,
        "probe_rows": ntk._n_probe,
        "probe_total": sum(ntk.probe_seconds),
        "hooks": dict(hook_seconds),
        "probe_s": sum(ntk.probe_seconds) / max(1, len(ntk.probe_seconds)),
        # the NTK monitor's whole hook time per probe (break-even and projection use this)
        "ntk_hook_s": hook_seconds.get(type(ntk).__name__, 0.0) / max(1, len(ntk.history)),
        "timed": timed,
        "steady_step_s": step_timer.step_seconds(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gpu-steps", type=int, default=200)
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="CPU: run scale x the demo's steps (the cadence still gives the same probes)",
    )
    p.add_argument(
        "--typical-steps",
        type=int,
        default=10_000,
        help="GPU: run length of the projected NTK share (21 probes at the default cadence)",
    )
    p.add_argument("--write", type=Path, default=None, help="write the table (markdown) here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    models = args.models or (
        ["gpt2_small"] if args.device == "cuda" else ["two_layer", "vit", "gpt2"]
    )
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            if args.device == "cuda":
                # Untimed warm-up (cuBLAS handles, lazy kernel loading, allocator growth):
                # otherwise the first timed run, always "without", pays for it.
                fit_once(name, False, args.device, 20, Path(tmp) / "warmup", 1.0)
                torch.cuda.empty_cache()
            best: dict[bool, dict[str, Any]] = {}
            # On CUDA the hook timer syncs the device: wall times come from untimed runs.
            timed = args.device != "cuda"
            for repeat in range(args.repeats):
                order = (False, True) if repeat % 2 == 0 else (True, False)
                for with_cb in order:
                    r = fit_once(
                        name, with_cb, args.device, args.gpu_steps, Path(tmp), args.scale, timed
                    )
                    if args.device == "cuda":  # the next fit starts from the same allocator
                        torch.cuda.empty_cache()
                    if with_cb not in best or r["wall"] < best[with_cb]["wall"]:
                        best[with_cb] = r
                    print(f"{name:10s} with={with_cb!s:5s} wall={r['wall']:.2f}s", flush=True)
            w, wo = best[True], best[False]
            if not timed:  # one more run, hooks timed (its wall time is not used)
                t = fit_once(name, True, args.device, args.gpu_steps, Path(tmp), args.scale)
                torch.cuda.empty_cache()
                keys = ("probes", "every", "probe_s", "probe_total", "hooks", "ntk_hook_s")
                w = {**w, **{k: t[k] for k in keys}}
            rows.append(
                {
                    "model": name,
                    "steps": wo["steps"],
                    "without_s": wo["wall"],
                    "with_s": w["wall"],
                    "overhead": w["wall"] / wo["wall"] - 1.0,
                    "probes": w["probes"],
                    "every": w["every"],
                    "probe_s": w["probe_s"],
                    # The NTK monitor's own time (timed inside the run) over the run without
                    # callbacks: a less noisy figure than the difference of two wall times.
                    "ntk_share": w["probe_total"] / wo["wall"],
                    "hooks_share": sum(w["hooks"].values()) / wo["wall"],
                    "hooks": {k: v / wo["wall"] for k, v in w["hooks"].items()},
                    "ntk_hook_s": w["ntk_hook_s"],
                    # steady-state step time (fixed costs excluded); wall/steps as a fallback
                    "step_s": wo["steady_step_s"] or wo["wall"] / max(1, wo["steps"]),
                    "wall_step_s": wo["wall"] / max(1, wo["steps"]),
                    "full_steps": args.typical_steps if args.device == "cuda" else wo["full_steps"],
                }
            )
    header = (
        "| model | steps | without (s) | with (s) | overhead (all four) | NTK probes "
        "| every n steps | s / probe (model + baseline; probe only / whole NTK hooks) "
        "| NTK time / run time | steady step (wall / steps) "
        "| projected NTK share at full length (steps) | NTK share <= 5% from (steps) "
        "| all four callbacks' own time / run time |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        # Default cadence on the full-length run: target_probes + the one at step 0.
        n_probes = _default_probes()
        # The NTK monitor's whole hook time per probe, over steady-state training steps.
        projected = n_probes * r["ntk_hook_s"] / (r["full_steps"] * r["step_s"])
        # Shortest run whose default probes cost at most 5% of its training time.
        break_even = n_probes * r["ntk_hook_s"] / (0.05 * r["step_s"])
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['without_s']:.2f} | {r['with_s']:.2f} "
            f"| {100 * r['overhead']:+.1f}% | {r['probes']} | {r['every']} "
            f"| {r['probe_s']:.3f} / {r['ntk_hook_s']:.3f} "
            f"| {100 * r['ntk_share']:.1f}% "
            f"| {1e3 * r['step_s']:.1f} ms ({1e3 * r['wall_step_s']:.1f} ms) "
            f"| {100 * projected:.1f}% ({r['full_steps']}) "
            f"| {break_even:,.0f} | {100 * r['hooks_share']:.1f}% |"
        )
    lines.append("")
    lines.append("Callbacks' own time (all their hooks, timed inside the run) / run time without:")
    lines.append("")
    names = list(rows[0]["hooks"]) if rows else []
    lines.append("| model | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for r in rows:
        cells = " | ".join(f"{100 * r['hooks'][n]:.1f}%" for n in names)
        lines.append(f"| {r['model']} | {cells} |")
    env = (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
        + (
            f" ({torch.cuda.get_device_name(args.device)})"
            if args.device.startswith("cuda")
            else ""
        )
    )
    table = "\n".join(lines)
    print(env)
    print(table)
    if args.write:
        args.write.write_text(
            "# Monitor overhead (benchmarks/bench_callbacks.py)\n\n"
            f"`{' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}` on {env}.\n\n"
            + table
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
