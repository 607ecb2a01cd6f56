"""Shared pytest configuration: headless plotting, quiet Lightning, GPU marker handling."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


def _major_minor(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string (``"2.4.1+cu121"``, ``"2.10.0a0"``)."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


TORCH_VERSION = _major_minor(torch.__version__)
"""torch's ``(major, minor)``, for tests that guard on behaviour a torch release changed."""


def _lightning_version() -> tuple[int, int]:
    import lightning

    return _major_minor(lightning.__version__)


LIGHTNING_VERSION = _lightning_version()
"""lightning's ``(major, minor)``, likewise."""


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """Tests must not leak global torch settings (default dtype, grad mode) into each other."""
    dtype = torch.get_default_dtype()
    grad = torch.is_grad_enabled()
    yield
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


def _splits_a_leaf(node: object) -> bool:
    """Whether an autograd ``Split*Backward`` node splits a leaf (``w1.chunk(2)``; under autocast
    through the cast of the leaf), not an activation (the plain path's ``fc1(x).chunk(2)``)."""
    for nxt, _ in node.next_functions:  # type: ignore[attr-defined]
        while nxt is not None and type(nxt).__name__ == "ToCopyBackward0":
            nxt = nxt.next_functions[0][0]
        if nxt is not None and type(nxt).__name__ == "AccumulateGrad":
            return True
    return False


def fused_layout(out: torch.Tensor) -> str | None:
    """Which layout of the fused packed gated MLP computed ``out``: ``"feature"`` or ``"split"``
    (its Function's node, or a reshape of it for inputs with more than two dimensions),
    ``"split-autograd"`` (autograd splits the packed weight ``w1`` itself, which needs a
    trainable ``w1``), or ``None`` (the plain path)."""
    fn = out.grad_fn
    for _ in range(2):
        name = type(fn).__name__ if fn is not None else ""
        if "SplitFusedGatedMLP" in name:
            return "split"
        if "FusedGatedMLP" in name:
            return "feature"
        fn = fn.next_functions[0][0] if fn is not None and fn.next_functions else None
    seen, todo = set(), [out.grad_fn]
    while todo and len(seen) < 64:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("Split") and _splits_a_leaf(node):
            return "split-autograd"
        todo.extend(n for n, _ in node.next_functions)
    return None


def ran_fused(out: torch.Tensor) -> bool:
    """Whether ``out`` came from the fused packed gated MLP, in any layout."""
    return fused_layout(out) is not None


def tiny_bert_classifier(vocab_size: int) -> torch.nn.Module:
    """A one-layer HF BERT sequence classifier (hidden 16, 3 labels) built from a config."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def load_dense(block: torch.nn.Module, w1, b1, w2, b2) -> None:
    """Copy an old feed-forward layer's weights (``fc1 = (w1, b1)``, ``fc2 = (w2, b2)``, biases
    may be ``None``) into a same-width glu-probe block, for equivalence checks of a swap."""
    with torch.no_grad():
        for lin, w, b in ((block.fc1, w1, b1), (block.fc2, w2, b2)):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)


class SquareNoJvp(torch.autograd.Function):
    """x², with a backward but no ``jvp``: forward-mode AD raises NotImplementedError."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class NoForwardADNet(torch.nn.Module):
    """``b(square(tanh(a x)))`` with :class:`SquareNoJvp`: a model without forward-mode AD."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(SquareNoJvp.apply(torch.tanh(self.a(x))))


@pytest.fixture
def fresh_weight_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(out, in) of every fresh weight the swap adapters' forward checks draw
    (``glu_probe.swap.structural.fresh_linear``), in order."""
    from glu_probe.swap import structural

    shapes: list[tuple[int, int]] = []
    fresh = structural.fresh_linear

    def spy(lin: torch.nn.Linear, gen: torch.Generator, prefix: str) -> dict[str, torch.Tensor]:
        shapes.append((lin.out_features, lin.in_features))
        return fresh(lin, gen, prefix)

    monkeypatch.setattr(structural, "fresh_linear", spy)
    return shapes
