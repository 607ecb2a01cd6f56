"""glu_probe.swap.LayerFFNAdapter: feed-forward layers kept on the transformer layer itself
(OPT, BART family, ...), rewired and checked against the unmodified model."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from conftest import load_dense
from torch import nn

from glu_probe.modules import MLP, GatedMLP
from glu_probe.swap import UnsupportedModelError, swap_mlp

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:swap_mlp. multiple_of=8 gives width")

VOCAB = 64


def opt_config(**kw: Any) -> Any:
    args: dict[str, Any] = {
        "hidden_size": 64,
        "ffn_dim": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "word_embed_proj_dim": 64,
        "pad_token_id": 1,
    }
    return transformers.OPTConfig(**{**args, **kw})


def bart_config(**kw: Any) -> Any:
    args: dict[str, Any] = {
        "d_model": 64,
        "encoder_ffn_dim": 256,
        "decoder_ffn_dim": 256,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "pad_token_id": 1,
        "decoder_start_token_id": 2,
    }
    return transformers.BartConfig(**{**args, **kw})


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MLP | GatedMLP)]


def _copy_into(model: nn.Module, weights: dict[str, tuple[torch.Tensor, ...]]) -> None:
    """Copy each layer's original fc1/fc2 weights into its new (same-width) block."""
    for path, tensors in weights.items():
        load_dense(model.get_submodule(path).fc1, *tensors)


def _fc_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    out = {}
    for path, m in model.named_modules():
        fc1, fc2 = getattr(m, "fc1", None), getattr(m, "fc2", None)
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
            tensors = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
            out[path] = tuple(t.detach().clone() for t in tensors)
    return out


def test_albert_shared_layer_is_rewired_once_and_computes_the_same() -> None:
    """ALBERT: ffn / activation / ffn_output on the one layer that serves every depth."""
    torch.manual_seed(0)
    config = transformers.AlbertConfig(
        embedding_size=32,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.AlbertModel(config)
    original = copy.deepcopy(model)
    layer = model.encoder.albert_layer_groups[0].albert_layers[0]
    w = tuple(t.detach().clone() for t in (layer.ffn.weight, layer.ffn.bias))
    w += tuple(t.detach().clone() for t in (layer.ffn_output.weight, layer.ffn_output.bias))
    report = swap_mlp(model, "gelu", match="width")
    assert report.paths == ["encoder.albert_layer_groups.0.albert_layers.0"]
    assert report.entries[0].source == "AlbertLayer (ffn/ffn_output)"
    block = layer.ffn
    assert isinstance(block, MLP) and isinstance(layer.ffn_output, nn.Identity)
    load_dense(block, *w)
    block.act = nn.GELU(approximate="tanh")  # ALBERT's gelu_new
    ids = torch.randint(1, VOCAB, (2, 10))
    model.eval(), original.eval()
    torch.testing.assert_close(
        model(input_ids=ids).last_hidden_state,
        original(input_ids=ids).last_hidden_state,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("family", ["opt", "bart"])
def test_rewired_layer_computes_what_the_original_did(family: str) -> None:
    """Independent truth: the unmodified model. A same-width block with the layer's own weights
    gives identical logits in eval mode, and in training mode with the same seed (BART's
    activation dropout moved into the block draws the same masks)."""
    torch.manual_seed(0)
    if family == "opt":
        model = transformers.OPTForCausalLM(opt_config(dropout=0.0))
        act = "relu"
    else:
        model = transformers.BartForCausalLM(bart_config(activation_dropout=0.2, dropout=0.0))
        act = "gelu"
    original = copy.deepcopy(model)
    weights = _fc_weights(model)
    report = swap_mlp(model, act, match="width")
    assert [e.adapter for e in report.entries] == ["layer_ffn"] * 2
    assert all(e.source.endswith("(fc1/fc2)") and e.hidden_features == 256 for e in report.entries)
    _copy_into(model, weights)
    ids = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    for training in (False, True):
        model.train(training), original.train(training)
        torch.manual_seed(5)
        ref = original(input_ids=ids).logits
        torch.manual_seed(5)
        got = model(input_ids=ids).logits
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    if family == "bart":
        layer = model.model.decoder.layers[0]
        assert layer.activation_dropout == 0.0 and layer.fc1.drop1.p == 0.2
        assert isinstance(layer.fc2, nn.Identity) and isinstance(layer.activation_fn, nn.Identity)


def test_opt_swap_both_ways_trains_and_keeps_init_and_config() -> None:
    torch.manual_seed(0)
    config = opt_config(init_std=0.03)
    model = transformers.OPTForCausalLM(config)
    report = swap_mlp(model, "swiglu")
    assert all(abs(e.rel_diff) <= 0.01 for e in report.entries)
    h = report.entries[0].hidden_features
    assert config.ffn_dim == h and report.config_updates["ffn_dim"] == (256, h)
    block = model.model.decoder.layers[0].fc1
    assert isinstance(block, GatedMLP) and block.training
    assert block.fc1.weight.std().item() == pytest.approx(0.03, rel=0.05)  # OPT's init_std
    report2 = swap_mlp(model, "gelu")
    assert [e.adapter for e in report2.entries] == ["layer_ffn"] * 2
    assert all(abs(e.rel_diff) <= 0.01 for e in report2.entries)
    assert config.ffn_dim == report2.entries[0].hidden_features
    ids = torch.randint(2, VOCAB, (2, 12))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(b.fc1.weight.grad is not None for b in _blocks(model))


@pytest.mark.parametrize("rebuild_from", ["original_config", "swapped_config"])
def test_opt_round_trip_state_dict(rebuild_from: str) -> None:
    torch.manual_seed(0)
    config = opt_config()
    original = copy.deepcopy(config)
    a = transformers.OPTForCausalLM(config)
    swap_mlp(a, "swiglu")
    fresh = transformers.OPTForCausalLM(
        copy.deepcopy(original if rebuild_from == "original_config" else config)
    )
    swap_mlp(fresh, "swiglu")
    missing, unexpected = fresh.load_state_dict(a.state_dict(), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(2, VOCAB, (2, 8))
    a.eval(), fresh.eval()
    torch.testing.assert_close(a(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=0, atol=0)


def test_bart_encoder_and_decoder_widths_are_left_alone_in_the_config() -> None:
    config = bart_config()
    model = transformers.BartModel(config)
    report = swap_mlp(model, "swiglu")
    assert len(report.entries) == 4  # two encoder and two decoder layers
    assert "encoder_ffn_dim" not in report.config_updates and config.encoder_ffn_dim == 256
    ids = torch.randint(2, VOCAB, (2, 8))
    model(input_ids=ids, decoder_input_ids=ids).last_hidden_state.sum().backward()


class _Layer(nn.Module):
    """A layer with fc1 / activation_fn / fc2 of its own, using them as ``mode`` says."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2, self.activation_fn = nn.Linear(16, 32), nn.Linear(32, 16), nn.GELU()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.mode == "ffn":
            return x + self.fc2(self.activation_fn(self.fc1(h)))
        if self.mode == "gated":  # fc1 used twice: no fc2(act(fc1 x)) chain
            return x + self.fc2(self.activation_fn(self.fc1(h)) * self.fc1(h))
        return x + self.fc2(self.activation_fn(self.fc1(h)) + self.fc1(h))  # "skip"


def test_layers_that_use_fc1_and_fc2_otherwise_are_not_rewired() -> None:
    ok = nn.Sequential(_Layer("ffn"), _Layer("ffn"))
    report = swap_mlp(ok, "swiglu")
    assert report.paths == ["0", "1"] and isinstance(ok[0].fc1, GatedMLP)
    for mode in ("gated", "skip"):
        host = nn.Sequential(_Layer(mode), _Layer(mode))
        fc1 = host[0].fc1
        with pytest.raises(UnsupportedModelError, match="no recognised MLP block"):
            swap_mlp(host, "swiglu")
        assert host[0].fc1 is fc1 and isinstance(host[0].fc2, nn.Linear)  # restored by the check


@pytest.mark.parametrize(
    ("where", "kept"),
    [("", True), ("self_attn", True), ("final_layer_norm", True), ("fc1", False), ("fc2", False)],
)
def test_hooks_refuse_only_what_the_rewiring_drops(where: str, kept: bool) -> None:
    """The layer is rewired in place: hooks on the layer, its attention and its norms stay and
    still fire (transformers' own output-capturing hooks sit there after a forward with
    output_hidden_states=True; a first version of the hook check refused OPT then). Hooks on
    fc1 or fc2, which the swap takes out, are refused."""
    from glu_probe.swap import UnsupportedModelError

    torch.manual_seed(0)
    model = transformers.OPTModel(opt_config()).eval()
    path = "decoder.layers.0" + ("." + where if where else "")
    module = model.get_submodule(path)
    calls: list[int] = []
    module.register_forward_hook(lambda *a: calls.append(1))
    if not kept:
        with pytest.raises(UnsupportedModelError, match=rf"has hooks \('{where}'"):
            swap_mlp(model, "swiglu")
        return
    swap_mlp(model, "swiglu")
    model(input_ids=torch.randint(3, 50, (1, 5)))
    assert calls and any(m is module for m in model.modules())
