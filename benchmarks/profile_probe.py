"""Where one NTK monitor probe's time goes (torch.profiler), for the bench's models.

Trains a ``PairedModule`` for one step with ``NTKSpectrumMonitor()`` at its defaults, records
the ``ntk_spectrum`` calls the monitor makes (its arguments as they are), then re-runs each
call: once as a warm-up, ``--repeats`` times timed (CUDA-synchronised), once under
``torch.profiler``. Prints the wall time of each call and the top operators by device time
and by host self time. A diagnostic, not a benchmark with a target.

    python benchmarks/profile_probe.py --model gpt2_small --device cuda
    python benchmarks/profile_probe.py --model vit --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit", help="two_layer, vit, gpt2 or gpt2_small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=25, help="rows of each profiler table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import lightning.pytorch as pl
    from bench_callbacks import build
    from lightning.fabric.utilities.apply_func import move_data_to_device

    import glu_probe.ntk as gntk
    from glu_probe.callbacks.ntk import NTKSpectrumMonitor
    from glu_probe.demo import pair_run

    pl.seed_everything(0, verbose=False)
    s, pair, train, val, loss_fn = build(args.model, args.device, 1)
    s = replace(s, steps=1)
    module, train_dl, val_dl, trainer_kwargs = pair_run(pair, train, val, s, loss_fn=loss_fn)
    calls: list[tuple[Any, Any, dict[str, Any]]] = []
    plain = gntk.ntk_spectrum

    def record(model: Any, inputs: Any, **kwargs: Any) -> Any:
        calls.append((model, inputs, dict(kwargs)))
        return plain(model, inputs, **kwargs)

    gntk.ntk_spectrum = record  # type: ignore[assignment]
    trainer_kwargs.update(
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cuda" if args.device == "cuda" else "cpu",
            callbacks=[NTKSpectrumMonitor()],
            default_root_dir=root,
            **trainer_kwargs,
        )
        trainer.fit(module, train_dl, val_dl)
    gntk.ntk_spectrum = plain  # type: ignore[assignment]
    cuda = args.device == "cuda"
    # Lightning moves the module back to the CPU at the end of fit: back to the device
    device = torch.device(args.device)
    module.to(device)
    calls = [(model, move_data_to_device(inputs, device), kw) for model, inputs, kw in calls]
    assert all(next(m.parameters()).device.type == device.type for m, _, _ in calls)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    from torch.profiler import ProfilerActivity, profile

    for i, (model, inputs, kwargs) in enumerate(calls):
        shown = {k: v for k, v in kwargs.items() if k not in ("warm_start", "params")}
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"## call {i}: {type(model).__name__}, {n_params} parameters, {shown}")
        spec = plain(model, inputs, **kwargs)
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            spec = plain(model, inputs, **kwargs)
            sync()
            times.append(time.perf_counter() - t0)
        print(
            f"method {spec.method}, precision {spec.precision}, "
            f"wall {min(times) * 1e3:.1f} ms (best of {args.repeats})"
        )
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            plain(model, inputs, **kwargs)
            sync()
        table = prof.key_averages()
        if cuda:
            print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows))
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
