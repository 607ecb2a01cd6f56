"""Findings of the session-24 review of the probe's model interface (each test fails on the
code before it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glu_probe.ntk import ntk_matrix


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 3)
        self.unused_head = nn.Linear(3, 2)

    def forward(self, x):
        return self.body(x)


def test_inputs_that_require_grad_do_not_pass_for_parameter_dependence():
    """An input with requires_grad made the rows depend on it: an unused head's K came back
    all zeros without the documented error."""
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(ValueError, match="do not depend on the selected parameters"):
        ntk_matrix(_Head(), x, params="unused_head", strategy="jacobian")


@pytest.mark.parametrize("strategy", ["jacobian", "structured", "operator"])
def test_k_holds_no_graph_to_an_input_that_requires_grad(strategy):
    model = _Head().double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    K = ntk_matrix(model, x, params="body", strategy=strategy)
    assert not K.requires_grad and K.grad_fn is None
    J = torch.func.jacrev(
        lambda w, b: (
            torch.func.functional_call(model, {"body.weight": w, "body.bias": b}, x)
            .sum(-1)
            .div(3**0.5)
        ),
        argnums=(0, 1),
    )(model.body.weight, model.body.bias)
    rows = torch.cat([j.reshape(5, -1) for j in J], dim=1).detach()
    torch.testing.assert_close(K, rows @ rows.T, rtol=1e-12, atol=1e-12)


def test_a_tokenizers_batch_encoding_is_split_per_sample():
    """HF's BatchEncoding (a UserDict) was one pytree leaf without a sample dimension: the
    jacobian strategy fell back to whole-batch rows with IndexError warnings, and the
    structured strategy refused it."""
    transformers = pytest.importorskip("transformers")
    import warnings

    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(11, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids) * attention_mask[..., None]
            return self.fc(h.mean(1))

    ids = torch.randint(0, 11, (4, 5))
    enc = transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones(4, 5)})
    plain = {"input_ids": ids, "attention_mask": torch.ones(4, 5)}
    model = Emb().double()
    want = ntk_matrix(model, plain, strategy="jacobian")
    for strategy in ("jacobian", "structured", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            K = ntk_matrix(model, enc, strategy=strategy)
        torch.testing.assert_close(K, want, rtol=1e-12, atol=1e-12)


def test_a_pntk_output_without_the_batch_first_says_so():
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).T  # (outputs, batch)

    with pytest.raises(ValueError, match="must hold the batch in dim 0"):
        ntk_matrix(Transposed(), torch.randn(5, 4))
