"""glu_probe.swap: swaps on tiny offline timm ViT, GPT-2, LLaMA and BERT hosts, both ways."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import load_dense
from torch import nn

from glu_probe.modules import MLP, GatedMLP, SwiGLU, mlp_num_params
from glu_probe.swap import (
    MLPAdapter,
    MLPSpec,
    ResidualNormMLP,
    UnsupportedModelError,
    register_adapter,
    swap_mlp,
    unregister_adapter,
)

torch.set_num_threads(1)
timm_vit = pytest.importorskip("timm.models.vision_transformer")
timm_layers = pytest.importorskip("timm.layers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:swap_mlp. multiple_of=8 gives width")

VOCAB = 64


def vit(mlp_layer: Any = None, **kw: Any) -> Any:
    extra = {"mlp_layer": mlp_layer} if mlp_layer is not None else {}
    return timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, **extra, **kw
    )


def gpt2_config(**kw: Any) -> Any:
    args: dict[str, Any] = {"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": VOCAB}
    args.update(n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**{**args, **kw})


def llama_config() -> Any:
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
    )


def bert_config() -> Any:
    return transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )


HOSTS: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]] = {
    "gpt2": (gpt2_config, lambda c: transformers.GPT2LMHeadModel(c)),
    "llama": (llama_config, lambda c: transformers.LlamaForCausalLM(c)),
    "bert": (bert_config, lambda c: transformers.BertForMaskedLM(c)),
}


def hf_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def vit_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)


def _inputs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "vit":
        return torch.randn(4, 3, 32, 32, generator=g)
    return torch.randint(0, VOCAB, (2, 12), generator=g)


def _train(model: nn.Module, loss_fn: Callable, x: torch.Tensor, steps: int = 4) -> list[float]:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, x)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    return losses


def _check_trains(model: nn.Module, loss_fn: Callable, x: torch.Tensor) -> None:
    new = [p for n, p in model.named_parameters() if ".mlp." in n or ".output.mlp." in n]
    assert new, "no swapped parameters found"
    losses = _train(model, loss_fn, x)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new)


def _check_report(report: Any, n_blocks: int, gated: bool, bias: bool = True) -> None:
    assert len(report.entries) == n_blocks
    for e in report.entries:
        assert abs(e.rel_diff) <= 0.01, e
        assert e.params_after == mlp_num_params(64, e.hidden_features, 64, bias, gated=gated)
    assert report.params_before == sum(e.params_before for e in report.entries)


# ------------------------------------------------------------------------------- timm


@pytest.mark.parametrize(
    ("mlp_layer", "first", "back"),
    [
        (None, "swiglu", "gelu"),
        (timm_layers.SwiGLUPacked, "gelu", "reglu"),
        (timm_layers.SwiGLU, "relu", "geglu"),
        (timm_layers.GluMlp, "silu", "glu"),
    ],
)
def test_timm_vit_swap_both_ways(mlp_layer: Any, first: str, back: str) -> None:
    torch.manual_seed(0)
    model = vit(mlp_layer)
    before = sum(p.numel() for p in model.parameters())
    gated_first = first in ("glu", "bilinear", "reglu", "geglu", "swiglu")
    report = swap_mlp(model, first)
    assert report.paths == ["blocks.0.mlp", "blocks.1.mlp"]
    _check_report(report, 2, gated_first)
    assert isinstance(model.blocks[0].mlp, GatedMLP if gated_first else MLP)
    assert abs(sum(p.numel() for p in model.parameters()) - before) <= 0.01 * before
    report2 = swap_mlp(model, back)
    _check_report(report2, 2, not gated_first)
    x = _inputs("vit")
    assert model(x).shape == (4, 10)
    _check_trains(model, vit_loss, x)


def test_timm_init_conventions_and_attributes() -> None:
    torch.manual_seed(0)
    model = vit(drop_rate=0.0, proj_drop_rate=0.1).double().eval()
    swap_mlp(model, "gelu", match="width", multiple_of=1)  # Mlp -> our MLP, same width
    mlp = model.blocks[1].mlp
    assert isinstance(mlp, MLP) and mlp.hidden_features == 256
    assert mlp.fc1.weight.dtype == torch.float64 and not mlp.training
    assert mlp.drop2.p == 0.1
    w = mlp.fc1.weight
    # timm's trunc_normal_(std=.02) truncates at +-2 (absolute), i.e. effectively N(0, .02^2)
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    assert w.mean().abs().item() < 0.002
    assert mlp.fc1.bias is not None and not mlp.fc1.bias.any()
    swap_mlp(model, "swiglu")  # timm's ViT init calls init_weights(): gate ~0, bias 1
    g, b = model.blocks[0].mlp.gate_params()
    assert g.abs().max() < 1e-4 and torch.all(b == 1)
    swap_mlp(model, "relu", init="default")
    assert model.blocks[0].mlp.fc1.weight.std().item() > 0.03  # nn.Linear default, fan_in 64


def test_timm_fix_init_rescales_fc2() -> None:
    torch.manual_seed(0)
    model = vit(fix_init=True)
    swap_mlp(model, "swiglu", match="width", multiple_of=1)
    s0 = model.blocks[0].mlp.fc2.weight.std().item()
    s1 = model.blocks[1].mlp.fc2.weight.std().item()
    assert s0 / s1 == pytest.approx(math.sqrt(2), rel=0.1)


def test_timm_round_trip_state_dict() -> None:
    torch.manual_seed(0)
    a = vit()
    swap_mlp(a, "swiglu")
    b = vit()
    swap_mlp(b, "swiglu")
    b.load_state_dict(a.state_dict())  # strict
    x = _inputs("vit")
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize(
    ("host", "first", "back"),
    [("gpt2", "swiglu", "gelu"), ("llama", "gelu", "swiglu"), ("bert", "reglu", "relu")],
)
def test_hf_swap_both_ways_and_train(host: str, first: str, back: str) -> None:
    torch.manual_seed(0)
    make_config, build = HOSTS[host]
    model = build(make_config())
    gated_first = first in ("reglu", "swiglu")
    report = swap_mlp(model, first)
    _check_report(report, 2, gated_first, bias=host != "llama")
    report2 = swap_mlp(model, back)
    _check_report(report2, 2, not gated_first, bias=host != "llama")
    ids = _inputs("hf")
    assert model(input_ids=ids).logits.shape == (2, 12, VOCAB)
    _check_trains(model, hf_loss, ids)


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("rebuild_from", ["original_config", "swapped_config"])
def test_hf_round_trip_state_dict(host: str, rebuild_from: str) -> None:
    torch.manual_seed(0)
    make_config, build = HOSTS[host]
    config = make_config()
    original = copy.deepcopy(config)
    variant = "gelu" if host == "llama" else "swiglu"
    a = build(config)
    swap_mlp(a, variant)
    fresh = build(
        copy.deepcopy(original) if rebuild_from == "original_config" else copy.deepcopy(a.config)
    )
    swap_mlp(fresh, variant)
    missing, unexpected = fresh.load_state_dict(a.state_dict(), strict=True)
    assert not missing and not unexpected
    ids = _inputs("hf")
    a.eval(), fresh.eval()
    torch.testing.assert_close(a(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=0, atol=0)


def test_gpt2_conventions_and_config() -> None:
    torch.manual_seed(0)
    config = gpt2_config(resid_pdrop=0.05, n_layer=8, n_embd=128, n_head=2)
    model = transformers.GPT2LMHeadModel(config).double()
    report = swap_mlp(model, "swiglu", multiple_of=8)
    mlp = model.transformer.h[3].mlp
    assert isinstance(mlp, SwiGLU) and mlp.fc1.weight.dtype == torch.float64
    assert mlp.training and mlp.drop2.p == 0.05 and mlp.drop1.p == 0.0
    r = config.initializer_range
    assert mlp.fc1.weight.std().item() == pytest.approx(r, rel=0.05)
    assert mlp.fc2.weight.std().item() == pytest.approx(r / math.sqrt(2 * 8), rel=0.05)
    assert mlp.fc1.bias is not None and not mlp.fc1.bias.any()
    h = report.entries[0].hidden_features
    assert h % 8 == 0 and report.entries[0].multiple_of == 8
    assert config.n_inner == h and config.activation_function == "silu"
    assert report.config_updates["n_inner"] == (None, h)
    assert config.glu_probe_swap["variant"] == "swiglu"
    model.transformer.h[0].mlp.requires_grad_(False)
    swap_mlp(model, "gelu")
    assert not any(p.requires_grad for p in model.transformer.h[0].mlp.parameters())
    assert all(p.requires_grad for p in model.transformer.h[1].mlp.parameters())
    # the swapped config is still a valid GPT-2 config
    transformers.GPT2LMHeadModel(copy.deepcopy(config))


def test_llama_structural_copies_and_config() -> None:
    torch.manual_seed(0)
    config = llama_config()
    model = transformers.LlamaForCausalLM(config)

    class MyMLP(nn.Module):  # a "copy" with another class name, e.g. MistralMLP
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(64, 172, bias=False)
            self.up_proj = nn.Linear(64, 172, bias=False)
            self.down_proj = nn.Linear(172, 64, bias=False)
            self.act_fn = nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    model.model.layers[1].mlp = MyMLP()
    report = swap_mlp(model, "swiglu", match="width")
    assert [e.source for e in report.entries] == ["LlamaMLP", "MyMLP"]
    assert all(e.params_after == e.params_before for e in report.entries)
    assert config.intermediate_size == 172 and config.hidden_act == "silu"
    w = model.model.layers[0].mlp.fc1.weight
    assert w.std().item() == pytest.approx(config.initializer_range, rel=0.05)
    swap_mlp(model, "relu")
    assert (
        config.hidden_act == "relu"
        and config.intermediate_size == model.model.layers[0].mlp.hidden_features
    )


def test_bert_keeps_residual_and_layernorm() -> None:
    torch.manual_seed(0)
    config = bert_config()
    model = transformers.BertModel(config).double().eval()
    layer: Any = model.encoder.layer[0]
    ln: Any = layer.output.LayerNorm
    ln_w = ln.weight.clone()
    # equivalent GELU MLP at the same width reproduces the original layer exactly
    inter, out = layer.intermediate, layer.output
    a = torch.randn(2, 5, 64, dtype=torch.float64)
    expected = out(inter(a), a)
    d1, d2 = inter.dense.weight.clone(), out.dense.weight.clone()
    b1, b2 = inter.dense.bias.clone(), out.dense.bias.clone()
    report = swap_mlp(model, "gelu", match="width")
    assert report.paths == ["encoder.layer.0", "encoder.layer.1"]
    assert isinstance(layer.intermediate, nn.Identity) and isinstance(layer.output, ResidualNormMLP)
    assert torch.equal(ln.weight, ln_w)
    assert layer.output.LayerNorm is ln
    mlp: Any = layer.output.mlp
    assert mlp.drop2.p == config.hidden_dropout_prob and not mlp.training
    load_dense(mlp, d1, b1, d2, b2)
    torch.testing.assert_close(
        layer.output(layer.intermediate(a), a), expected, rtol=1e-12, atol=1e-12
    )
    assert "encoder.layer.0.output.LayerNorm.weight" in model.state_dict()
    assert config.hidden_act == "gelu"  # the MLM head's activation is left alone


# ------------------------------------------------------------------------------- errors


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Linear(64, 256)
        self.w_out = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(torch.relu(self.w_in(x)))


def test_unsupported_and_partial_models() -> None:
    with pytest.raises(UnsupportedModelError, match=r"no recognised MLP block .*register_adapter"):
        swap_mlp(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), "swiglu")
    model = vit()
    model.blocks[1].mlp = Custom()
    ref = model.blocks[0].mlp
    with pytest.raises(
        UnsupportedModelError,
        match=r"only partly recognised.*blocks\.1\.mlp \(Custom\).*register_adapter",
    ):
        swap_mlp(model, "swiglu")
    assert model.blocks[0].mlp is ref  # nothing swapped
    with pytest.warns(UserWarning, match="only partly recognised"):
        report = swap_mlp(model, "swiglu", strict=False)
    assert report.paths == ["blocks.0.mlp"] and report.unrecognised == ["blocks.1.mlp (Custom)"]
    # gMLP's block (timm GatedMlp with a spatial gating unit) is no MLP block of ours ...
    from timm.models.mlp_mixer import SpatialGatingUnit

    sgu = functools.partial(SpatialGatingUnit, seq_len=17)  # 4x4 patches + class token
    gmlp = vit(functools.partial(timm_layers.GatedMlp, gate_layer=sgu))
    with pytest.raises(UnsupportedModelError, match=r"GatedMlp"):
        swap_mlp(gmlp, "swiglu")
    # ... but without its gate (gate_layer=None: nn.Identity) it computes fc2(act(fc1 x)),
    # which the structural adapter checks and swaps.
    plain = vit(timm_layers.GatedMlp)
    report = swap_mlp(plain, "swiglu")
    assert [e.adapter for e in report.entries] == ["structural"] * 2
    assert report.entries[0].source == "GatedMlp (dense)"
    with pytest.raises(UnsupportedModelError, match="the model itself is an MLP block"):
        swap_mlp(nn.Sequential(SwiGLU(4, 4))[0], "gelu")


def test_mixture_of_experts_with_a_llama_shared_expert_is_not_swapped_silently() -> None:
    """Qwen2-MoE's block holds a LlamaMLP-shaped shared expert beside routed experts and a
    router: swapping the shared expert alone would be a silent partial swap."""
    if not hasattr(transformers, "Qwen2MoeForCausalLM"):
        pytest.skip("transformers without Qwen2-MoE")
    config = transformers.Qwen2MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    model = transformers.Qwen2MoeForCausalLM(config)
    shared = model.model.layers[0].mlp.shared_expert
    # transformers 4.x keeps the routed experts as a ModuleList of MLPs, which are recognised
    # (the router's gate is what is left outside); 5.x fuses them into one Qwen2MoeExperts
    # (whose weights are then left outside as well)
    per_expert = isinstance(model.model.layers[0].mlp.experts, nn.ModuleList)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outside = r"gate\.weight, " + ("shared_expert_gate" if per_expert else r"experts\.gate_up_proj")
    recognised = "".join(f"experts\\.{e}, " for e in range(4)) if per_expert else ""
    with pytest.raises(
        UnsupportedModelError,
        match=r"only partly recognised.*layers\.0\.mlp \(Qwen2MoeSparseMoeBlock, whose weights "
        rf"{outside}.* outside the recognised block\(s\) {recognised}shared_expert;"
        r".*register_adapter",
    ):
        swap_mlp(model, "gelu")
    assert model.model.layers[0].mlp.shared_expert is shared  # nothing swapped
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.warns(UserWarning, match="only partly recognised"):
        report = swap_mlp(model, "gelu", strict=False)
    experts = [f"experts.{e}" for e in range(4)] if per_expert else []
    assert report.paths == [
        f"model.layers.{i}.mlp.{name}" for i in range(2) for name in [*experts, "shared_expert"]
    ]
    listed = " ".join(report.unrecognised)
    for i in range(2):
        assert f"model.layers.{i}.mlp (Qwen2MoeSparseMoeBlock" in listed
        assert (f"model.layers.{i}.mlp.experts (Qwen2MoeExperts)" in listed) != per_expert


def test_wrapper_with_only_a_norm_around_a_recognised_block_is_fine() -> None:
    """An MLP-named wrapper whose own parameters are vectors (a norm) is not a partial swap."""

    class FeedForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.mlp = timm_layers.Mlp(64, 256)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.norm(x))

    host = nn.Sequential(nn.Linear(8, 64), FeedForward(), FeedForward())
    report = swap_mlp(host, "swiglu")
    assert report.paths == ["1.mlp", "2.mlp"] and report.unrecognised == []
    assert isinstance(host[1].mlp, GatedMLP)


def test_classifier_heads_are_not_mlp_blocks() -> None:
    """timm ConvNeXt's ``NormMlpClassifierHead`` has "Mlp" in its name but is the head."""
    convnext = pytest.importorskip("timm.models.convnext")
    torch.manual_seed(0)
    model = convnext.ConvNeXt(
        depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10, head_hidden_size=24
    )
    report = swap_mlp(model, "swiglu")
    assert report.paths == [f"stages.{i}.blocks.0.mlp" for i in range(4)]
    assert report.unrecognised == [] and type(model.head).__name__ == "NormMlpClassifierHead"
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert model.stages[3].blocks[0].mlp.fc1.weight.grad is not None


def test_block_shared_by_several_parents_stays_shared() -> None:
    """Weights shared across layers (one MLP object under two blocks) stay shared: one
    replacement installed at both paths, counted once in the totals."""

    class Block(nn.Module):
        def __init__(self, mlp: nn.Module) -> None:
            super().__init__()
            self.norm, self.mlp = nn.LayerNorm(64), mlp

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.norm(x))

    torch.manual_seed(0)
    shared = timm_layers.Mlp(64, 256)
    host = nn.Sequential(Block(shared), Block(shared), Block(timm_layers.Mlp(64, 256)))
    report = swap_mlp(host, "swiglu")
    assert report.paths == ["0.mlp", "1.mlp", "2.mlp"]
    assert host[0].mlp is host[1].mlp and host[2].mlp is not host[0].mlp
    assert [e.shared_with for e in report.entries] == [None, "0.mlp", None]
    one = report.entries[0]
    assert report.params_before == 2 * mlp_num_params(64, 256, 64, True, gated=False)
    assert report.params_after == 2 * one.params_after
    unique = {id(p): p.numel() for b in host for p in b.mlp.parameters()}
    assert sum(unique.values()) == report.params_after
    assert "| 1.mlp | shares 0.mlp |" in report.to_markdown()
    x = torch.randn(2, 5, 64)
    host(x).sum().backward()
    assert host[0].mlp.fc1.weight.grad is host[1].mlp.fc1.weight.grad


@pytest.mark.parametrize("family", ["megatron_bert", "esm"])
def test_pre_layernorm_bert_variants_compute_the_same(family: str) -> None:
    """MegatronBERT and ESM normalise before `intermediate` and only add the residual in
    `output` (ESM calls a functional gelu): checked, rewired with an identity norm, and with the
    old weights copied into a same-width GELU block they give the original hidden states."""
    torch.manual_seed(0)
    common: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 256,
        "max_position_embeddings": 32,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if family == "esm":
        if not hasattr(transformers, "EsmModel"):
            pytest.skip("transformers without ESM")
        config = transformers.EsmConfig(vocab_size=33, pad_token_id=1, mask_token_id=32, **common)
        model = transformers.EsmModel(config, add_pooling_layer=False)
    else:
        if not hasattr(transformers, "MegatronBertModel"):
            pytest.skip("transformers without MegatronBERT")
        config = transformers.MegatronBertConfig(vocab_size=VOCAB, **common)
        model = transformers.MegatronBertModel(config, add_pooling_layer=False)
    original = copy.deepcopy(model)
    layers = list(model.encoder.layer)
    weights = [
        tuple(
            t.detach().clone()
            for t in (
                ly.intermediate.dense.weight,
                ly.intermediate.dense.bias,
                ly.output.dense.weight,
                ly.output.dense.bias,
            )
        )
        for ly in layers
    ]
    report = swap_mlp(model, "gelu", match="width")
    assert all(e.source.endswith("(intermediate+output, pre-LN)") for e in report.entries)
    assert all(e.source_activation == "gelu" for e in report.entries)
    for ly, tensors in zip(layers, weights, strict=True):
        assert isinstance(ly.output, ResidualNormMLP)
        assert isinstance(ly.output.LayerNorm, nn.Identity)
        load_dense(ly.output.mlp, *tensors)
    ids = torch.randint(4, 30, (2, 10))
    model.eval(), original.eval()
    torch.testing.assert_close(
        model(input_ids=ids).last_hidden_state,
        original(input_ids=ids).last_hidden_state,
        rtol=1e-5,
        atol=1e-5,
    )
    swap_mlp(model, "swiglu")
    model(input_ids=ids).last_hidden_state.sum().backward()


def test_partly_shaped_bert_layer_is_an_error_and_atomic() -> None:
    class Inter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(64, 256)
            self.intermediate_act_fn = nn.GELU()

    class Out(nn.Module):  # like HF ViTOutput: no LayerNorm
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(256, 64)
            self.dropout = nn.Dropout(0.0)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.intermediate, self.output = Inter(), Out()

    model: Any = nn.ModuleDict({"ok": nn.ModuleDict({"mlp": MLP(64, 256)}), "layer": Layer()})
    ok = model["ok"]["mlp"]
    with pytest.raises(UnsupportedModelError, match=r"lacks \['output.LayerNorm'\]"):
        swap_mlp(model, "swiglu")
    assert model["ok"]["mlp"] is ok


def test_register_adapter_for_custom_block() -> None:
    class CustomAdapter(MLPAdapter):
        name = "custom"

        def matches(self, module: nn.Module) -> bool:
            return isinstance(module, Custom)

        def describe(self, module: Any) -> MLPSpec:
            return MLPSpec(
                in_features=64,
                hidden_features=256,
                out_features=64,
                gated=False,
                activation="relu",
                num_params=sum(p.numel() for p in module.parameters()),
            )

    model = vit()
    model.blocks[1].mlp = Custom()
    adapter = register_adapter(CustomAdapter())
    try:
        report = swap_mlp(model, "swiglu")
    finally:
        unregister_adapter(adapter)
    assert [e.adapter for e in report.entries] == ["timm", "custom"]
    assert isinstance(model.blocks[1].mlp, SwiGLU)
    with pytest.raises(TypeError, match="expects an MLPAdapter instance"):
        register_adapter(CustomAdapter)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "err", "msg"),
    [
        ({"variant": "swish"}, ValueError, "unknown MLP variant 'swish'"),
        ({"variant": "swiglu", "match": "flops"}, ValueError, "match must be 'params' or 'width'"),
        ({"variant": "swiglu", "multiple_of": 0}, ValueError, "multiple_of must be a positive int"),
        (
            {"variant": "swiglu", "hidden_features": -4},
            ValueError,
            "hidden_features must be a positive int",
        ),
        ({"variant": "swiglu", "tolerance": 2.0}, ValueError, "tolerance"),
        ({"variant": "gelu", "act_layer": nn.ReLU}, TypeError, "fixes the activation"),
        ({"variant": "swiglu", "init": "xavier"}, ValueError, "init must be"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], err: type[Exception], msg: str) -> None:
    model = vit()
    with pytest.raises(err, match=msg):
        swap_mlp(model, **kwargs)


def test_multiple_of_fallback_warns_and_explicit_width() -> None:
    model = vit()
    with pytest.warns(UserWarning, match=r"multiple_of=8 gives width .* using multiple_of=2"):
        report = swap_mlp(model, "swiglu")
    assert report.entries[0].multiple_of == 2 and abs(report.rel_diff) <= 0.01
    report = swap_mlp(model, "gelu", hidden_features=100)
    assert model.blocks[0].mlp.hidden_features == 100 and report.entries[0].hidden_features == 100
    assert "blocks.0.mlp" in report.to_markdown()
