"""Seeded blocks that leave every random generator as they found it.

``torch.manual_seed`` inside ``torch.random.fork_rng(devices=[])`` (the usual idiom for "seed
this block only") reseeds every CUDA generator too, and restores none of them: on a machine
with a GPU it resets the user's CUDA stream (dropout masks, ``torch.randn(device="cuda")``),
and before CUDA is initialised it queues that reseed for later
(``torch.cuda._lazy_seed_tracker``). :func:`seeded` seeds only the generators it restores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["seeded"]


@contextmanager
def seeded(seed: int, devices: Iterable[torch.device] = ()) -> Iterator[None]:
    """Run the block with the global CPU generator, and the default generators of the CUDA
    ``devices`` named (those the block draws on), seeded with ``seed``; every one of them is
    restored afterwards, and no other generator is touched."""
    cuda = sorted(
        {
            d.index if d.index is not None else torch.cuda.current_device()
            for d in map(torch.device, devices)
            if d.type == "cuda"
        }
    )
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
