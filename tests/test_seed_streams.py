"""Session 22: the demo's random draws come from distinct streams.

Until then ``models.two_layer_pair(seed=s)`` drew the ReLU network from seed ``s`` and
``data.two_layer_regression(seed=s)`` its inputs from the same seed: the first layer's weights
were the training inputs scaled (W == X[:m] / 4 exactly), and the ReGLU network and the target
shared seed ``s + 1``. The ViT / GPT-2 pairs' swapped MLPs took seed ``s + 1``, the next seed's
host initialisation.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from glu_probe import models
from glu_probe._rng import stream_seed
from glu_probe.data import two_layer_regression
from glu_probe.models import two_layer_pair, vit_pair


def _rows_shared(a: torch.Tensor, b: torch.Tensor) -> int:
    """Rows of ``a`` proportional to a row of ``b`` (|cosine| > 0.999)."""
    a = torch.nn.functional.normalize(a.double().flatten(1), dim=1)
    b = torch.nn.functional.normalize(b.double().flatten(1), dim=1)
    return int(((a @ b.T).abs() > 0.999).any(dim=1).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_layer_weights_are_not_the_data(seed: int) -> None:
    pair = two_layer_pair(16, 256, seed=seed)
    data = [two_layer_regression("all", d=16, n_train=512, n_val=512, seed=s) for s in range(4)]
    for net in (pair.baseline, pair.model):
        for name, p in net.named_parameters():
            if p.ndim == 2 and p.shape[1] == 16:  # first-layer weights (W, and U of the gate)
                for ds in data:
                    assert _rows_shared(p.detach(), ds.tensors[0]) == 0, name


def test_two_layer_target_is_not_the_gate_and_seeds_differ() -> None:
    a, b = two_layer_pair(8, 32, seed=0), two_layer_pair(8, 32, seed=1)
    for (na, pa), (_, pb) in zip(
        a.model.named_parameters(), b.model.named_parameters(), strict=True
    ):
        assert not torch.equal(pa, pb), na
    # the ReGLU network shares the ReLU network's W and V, and only those
    shared = {k for k, v in a.model.state_dict().items() if k in a.baseline.state_dict()}
    for k in shared:
        assert torch.equal(a.model.state_dict()[k], a.baseline.state_dict()[k])


def test_swapped_mlp_init_is_not_the_next_seeds_host(monkeypatch: pytest.MonkeyPatch) -> None:
    used: dict[int, list[int]] = {}
    real = models.seeded

    def spy(seed: int, *args: object):  # type: ignore[no-untyped-def]
        used.setdefault(current, []).append(seed)
        return real(seed, *args)

    monkeypatch.setattr(models, "seeded", spy)
    for current in (0, 1, 2):
        vit_pair("swiglu", seed=current, embed_dim=16, depth=1, num_heads=2)
        models.gpt2_pair("swiglu", seed=current, n_embd=16, n_layer=1, n_head=2)
    assert all(len(v) == 4 for v in used.values())  # host and swapped MLPs, per pair
    assert not set(used[0]) & set(used[1]) and not set(used[1]) & set(used[2])


def test_stream_seeds_are_distinct_across_users_roles_and_seeds() -> None:
    keys = [(0, 0), (0, 1), (0, 2, 0), (0, 2, 1), (1, 0, 10, 20), (1, 1, 0, 10, 200, 20)]
    keys += [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1)]
    seeds = [stream_seed(s, *k) for s, k in itertools.product(range(4), keys)]
    assert len(set(seeds)) == len(seeds)
    assert not set(seeds) & set(range(100))  # nor the raw seeds the hosts are built with
    with pytest.raises(ValueError, match="non-negative integer"):
        stream_seed(-1, 0)
