"""A weight pruned by ``torch.nn.utils.prune`` (Lightning's ``ModelPruning``) answers to its
unpruned name in ``params=`` filters (review s28-B: the monitor's name filter matched nothing
after the first pruning). Truth: an explicit float64 Jacobian with respect to ``weight_orig``."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.func import jacrev
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from glu_probe.callbacks import NTKSpectrumMonitor
from glu_probe.ntk import ntk_matrix
from glu_probe.ntk.functional import select_parameters

torch.set_num_threads(1)


def _pruned_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    return net


@pytest.mark.parametrize(
    "flt", ["0.weight", ["0.weight"], "re:^0\\.weight$", lambda n, p: n == "0.weight"]
)
def test_the_unpruned_name_selects_weight_orig(flt):
    net = _pruned_net()
    assert list(select_parameters(net, flt)) == ["0.weight_orig"]


def test_k_of_a_pruned_weight_against_an_explicit_jacobian():
    net = _pruned_net()
    x = torch.randn(7, 5)
    K = ntk_matrix(net, x, output="full", params="0.weight", dtype=torch.float64)
    # (a pruned module cannot be deep-copied: its ``weight`` is not a leaf) the formula itself
    l0, l2 = net[0], net[2]
    mask, b0 = l0.weight_mask.double(), l0.bias.detach().double()
    w2, b2 = l2.weight.detach().double(), l2.bias.detach().double()

    def f(w: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.double() @ (w * mask).T + b0) @ w2.T + b2

    J = jacrev(f)(l0.weight_orig.detach().double()).reshape(7 * 3, -1)
    # the masked entries have zero gradient: J = J_weight ⊙ mask
    assert torch.count_nonzero(J[:, mask.flatten() == 0]) == 0
    torch.testing.assert_close(K, J @ J.T, rtol=1e-12, atol=1e-12)


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_monitor_keeps_probing_a_pruned_weight_by_its_name(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    monitor = NTKSpectrumMonitor(every_n_steps=1, probe_size=8, params="net.0.weight")
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, ModelPruning("l1_unstructured", amount=0.3, verbose=0)],
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_Net(), DataLoader(data, batch_size=8))
    assert [h["step"] for h in monitor.history] == list(range(13))
    skipped = [w for w in caught if "selects nothing" in str(w.message) or "skip" in str(w.message)]
    assert not skipped, [str(w.message) for w in skipped]
