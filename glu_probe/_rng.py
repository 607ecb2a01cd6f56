"""Seeded blocks that leave every random generator as they found it.

``torch.manual_seed`` inside ``torch.random.fork_rng(devices=[])`` (the usual idiom for "seed
this block only") reseeds every CUDA generator too, and restores none of them: on a machine
with a GPU it resets the user's CUDA stream (dropout masks, ``torch.randn(device="cuda")``),
and before CUDA is initialised it queues that reseed for later
(``torch.cuda._lazy_seed_tracker``). :func:`seeded` seeds only the generators it restores.

:func:`stream_seed` derives one seed per random stream from a user's seed, so that no two
draws share a stream (``seed`` and ``seed + 1`` did: one seed's target was the next seed's
inputs, and the demo's two-layer ReLU weights were its training inputs). Spawn keys in use,
(user, role, ...): ``(0, ...)`` ``theory.crossing_experiment``, ``(1, ...)``
``theory.theory_table``, ``(2, ...)`` ``models`` (two-layer networks, the swapped MLPs of the
ViT / GPT-2 pairs and of ``examples/deep_ntk_study.py``), ``(3, ...)``
``data.two_layer_regression``, ``(4, ...)`` ``cli`` (``glu-probe spectrum``'s probe inputs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["seeded", "stream_seed"]


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


def stream_seed(seed: int, *stream: int) -> int:
    """The torch seed of the random stream ``stream`` (non-negative ints) under base ``seed``.

    It is the first 32-bit word of ``numpy.random.SeedSequence(seed, spawn_key=stream)``: the
    child that nested ``SeedSequence(seed).spawn(...)`` calls reach (``spawn_key=(i, j)`` is
    ``.spawn(i + 1)[i].spawn(j + 1)[j]``). SeedSequence hashes the seed and the key together, so
    distinct ``(seed, stream)`` pairs get unrelated seeds; arithmetic offsets such as
    ``seed + 1`` made one seed's target stream the next seed's input stream. 32 bits because a
    torch CPU generator uses only the low 32 bits of its seed (``manual_seed(s)`` and
    ``manual_seed(s + 2**32)`` draw the same numbers); two given streams thus coincide with
    probability 2**-32 (tests check seeds 0-3 of every user).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    ss = np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in stream))
    return int(ss.generate_state(1, np.uint32)[0])
