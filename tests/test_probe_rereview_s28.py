"""Re-review of session 28's probe changes (each test fails on the code before its fix).

* The buffer-value check added for QAT observers called ``torch.equal`` on every buffer: a
  sparse (COO/CSR), meta or nested buffer made every probe fail.
* The probe signature was memoised per probe instance: a probe reused after a module attribute
  switched the forward to ``torch.cdist`` (a wrong vmap batching rule in torch 2.14) kept the
  verdict "batched rows agree", and K was 20 % off.
* The pruning alias took any ``x_orig`` parameter beside an ``x_mask`` buffer, not only torch
  pruning's.

Truth: an explicit float64 per-row Jacobian (``torch.autograd.grad`` per output scalar).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from packaging.version import Version
from torch import nn
from torch.nn.utils import prune

from glu_probe.ntk import ntk_matrix, ntk_spectrum
from glu_probe.ntk.functional import ProbeFunction, select_parameters

torch.set_num_threads(1)


def _truth(model: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    ps = [p for p in model.parameters() if p.requires_grad]
    out = model(x) if rows is None else rows
    out = out.reshape(-1)
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(r, ps, retain_graph=True)])
            for r in out
        ]
    )
    return J @ J.T


class _GCN(nn.Module):
    """A graph net whose normalised adjacency (nodes = the probe batch) is a sparse buffer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        src = torch.arange(n)
        dst = (src + 1) % n
        i = torch.cat(
            [torch.stack([src, dst]), torch.stack([dst, src]), torch.stack([src, src])], 1
        )
        adj = torch.sparse_coo_tensor(i, torch.full((3 * n,), 1 / 3), (n, n)).coalesce()
        self.register_buffer("adj", adj)
        self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.adj, self.l2(torch.tanh(torch.sparse.mm(self.adj, self.l1(x)))))


def _gcn_truth(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """K of the pNTK rows (Σ_o f_o / √O) in float64."""
    ref = copy.deepcopy(model).double()
    ref.adj = ref.adj.double()
    out = ref(x.double())
    return _truth(ref, x, rows=out.sum(-1) / out.shape[-1] ** 0.5)


@pytest.mark.skipif(
    Version(torch.__version__.split("+")[0]) < Version("2.5"),
    reason="torch 2.4's forward-mode rule of torch.sparse.mm fails on a sparse first argument "
    "(the probe's JVPs: the code before session 28 failed there too)",
)
def test_a_sparse_buffer_does_not_break_the_probe():
    torch.manual_seed(0)
    model = _GCN(5).eval()
    x = torch.randn(5, 4)
    K_true = _gcn_truth(model, x)
    K = ntk_matrix(model, x, dtype=torch.float64)
    torch.testing.assert_close(K, K_true, rtol=1e-10, atol=1e-12)
    ev = torch.linalg.eigvalsh(K_true)
    s = ntk_spectrum(model, x, method="dense")
    assert s.condition_number == pytest.approx(float(ev[-1] / ev[0]), rel=1e-6)
    assert model.adj.layout == torch.sparse_coo


@pytest.mark.parametrize("kind", ["meta", "nested", "sparse_csr", "complex_nan"])
def test_buffers_without_comparable_values_do_not_break_the_probe(kind):
    buffer = {
        "meta": lambda: torch.empty(3, device="meta"),
        "nested": lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
        "sparse_csr": lambda: torch.eye(3).to_sparse_csr(),
        "complex_nan": lambda: torch.tensor([complex(float("nan"), 0), 1j]),
    }[kind]()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double().eval()
    model.register_buffer("extra", buffer)
    x = torch.randn(5, 3, dtype=torch.float64)
    probe = ProbeFunction(model, x, output="full", dtype=torch.float64)
    assert not probe._clone_buffers  # (a NaN in a complex buffer is no change either)
    K = ntk_matrix(None, None, probe=probe)
    torch.testing.assert_close(K, _truth(model, x), rtol=1e-10, atol=1e-12)


class _RBF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.centers = nn.Parameter(torch.randn(5, 16))
        self.w = nn.Parameter(torch.randn(5, 2))
        self.use_cdist = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.use_cdist:
            d = torch.cdist(h, self.centers)
        else:
            d = (h.unsqueeze(1) - self.centers).pow(2).sum(-1).sqrt()
        return d @ self.w


def test_a_reused_probe_sees_a_changed_module_attribute():
    torch.manual_seed(0)
    model, x = _RBF().double(), torch.randn(9, 4, dtype=torch.float64)
    probe = ProbeFunction(model, x, output="full", dtype=torch.float64)
    K1 = ntk_matrix(None, None, probe=probe, strategy="jacobian")
    torch.testing.assert_close(K1, _truth(model, x), rtol=1e-10, atol=1e-12)
    model.use_cdist = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the batching-rule warning of torch versions with it)
        K2 = ntk_matrix(None, None, probe=probe, strategy="jacobian")
    torch.testing.assert_close(K2, _truth(model, x), rtol=1e-10, atol=1e-12)


def test_the_prune_alias_needs_torch_pruning():
    m = nn.Sequential(nn.Module())
    m[0].scale = nn.Parameter(torch.ones(3))
    m[0].scale_orig = nn.Parameter(torch.ones(3))
    m[0].register_buffer("scale_mask", torch.ones(3))
    assert list(select_parameters(m, ["0.scale"])) == ["0.scale"]
    assert list(select_parameters(m, "0.scale")) == ["0.scale"]
    # torch pruning (also twice: a PruningContainer) keeps the alias
    net = nn.Sequential(nn.Linear(3, 4))
    prune.l1_unstructured(net[0], "weight", amount=0.25)
    prune.random_unstructured(net[0], "weight", amount=0.25)
    assert list(select_parameters(net, "0.weight")) == ["0.weight_orig"]
