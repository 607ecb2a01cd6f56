"""Session 25 review of the swap: each test failed on the code before its fix."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from glu_probe.swap import swap_mlp
from glu_probe.swap.core import UnsupportedModelError, register_adapter, unregister_adapter
from glu_probe.swap.hf_bert import BertLayerAdapter

transformers = pytest.importorskip("transformers")


def _quiet_swap(model: nn.Module, variant: str, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return swap_mlp(model, variant, **kw)


def _recipe(model: nn.Module, record: dict[str, Any]) -> None:
    """docs/modules.md's reload swap, word for word."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swap_mlp(
            model,
            record["variant"],
            match=record["match"],
            exclude=record.get("excluded"),
            strict=record.get("strict", True),
            **record.get("module_kwargs", {}),
        )


def _same_logits(a: nn.Module, b: nn.Module, vocab: int = 64) -> None:
    x = torch.randint(0, vocab, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x).logits, b.eval()(x).logits, rtol=0, atol=0)


def test_strict_false_moe_swap_reloads_with_the_recipe() -> None:
    # A MoE wrapper around a swapped shared expert stayed unrecognised: the recipe's strict
    # swap of the rebuilt model raised "only partly recognised".
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=176, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[0], max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    report = _quiet_swap(model, "gelu", strict=False)
    assert "model.layers.1.mlp.shared_expert" in report.paths
    record = model.config.glu_probe_swap
    # (transformers 4.x holds the routed experts as MLP blocks, swapped too: then nothing is
    # left unrecognised; 5.x fuses them into one module, which the MoE wrapper keeps)
    assert record.get("strict", True) is (not report.unrecognised)
    if tuple(int(v) for v in transformers.__version__.split(".")[:1]) >= (5,):
        assert record["strict"] is False
    saved = transformers.Qwen2MoeConfig.from_dict(model.config.to_dict())
    rebuilt = transformers.AutoModelForCausalLM.from_config(saved)
    _recipe(rebuilt, saved.glu_probe_swap)
    rebuilt.load_state_dict(model.state_dict())
    _same_logits(model, rebuilt)
    # a strict swap (nothing left unrecognised) records nothing of the kind
    plain = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2))
    _quiet_swap(plain, "swiglu")
    assert "strict" not in plain.config.glu_probe_swap


def test_swap_through_a_torch_compile_wrapper_records_the_models_paths() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    _quiet_swap(torch.compile(model), "swiglu", exclude=r".*h\.1\.mlp")
    record = model.config.glu_probe_swap
    assert record["excluded"] == ["transformer.h.1.mlp"]  # was "_orig_mod.transformer.h.1.mlp"
    saved = transformers.GPT2Config.from_dict(model.config.to_dict())
    rebuilt = transformers.GPT2LMHeadModel(saved)
    _recipe(rebuilt, saved.glu_probe_swap)
    rebuilt.load_state_dict(model.state_dict())
    _same_logits(model, rebuilt)


@pytest.mark.parametrize("variant", ["glu", "bilinear", "swiglu"])
def test_openai_gpt_activation_key_only_takes_values_its_class_builds(variant: str) -> None:
    # "sigmoid" / "linear" were written to afn: the saved config could not be built at all.
    torch.manual_seed(0)
    config = transformers.OpenAIGPTConfig(
        vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32
    )
    model = transformers.OpenAIGPTLMHeadModel(config)
    report = _quiet_swap(model, variant)
    saved = transformers.OpenAIGPTConfig.from_dict(model.config.to_dict())
    if variant == "swiglu":
        assert saved.afn == "silu"  # a value OpenAI GPT takes is still written
    else:
        assert saved.afn == "gelu"
        assert "cannot be built with afn=" in report.config_skipped["afn"]
    assert not report.config_unchecked
    rebuilt = transformers.OpenAIGPTLMHeadModel(saved)
    _recipe(rebuilt, saved.glu_probe_swap)
    rebuilt.load_state_dict(model.state_dict())
    _same_logits(model, rebuilt)


def _lilt() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LiltConfig(
        vocab_size=64, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LiltModel(config)


def test_a_layer_with_a_second_feed_forward_is_refused_not_half_swapped() -> None:
    # LiLT's layout feed-forward was left, silently, and resized by intermediate_size on reload.
    model = _lilt()
    with pytest.raises(UnsupportedModelError, match=r"another feed-forward part.*layout_inter"):
        swap_mlp(model, "swiglu")
    assert type(model.encoder.layer[0].intermediate).__name__ == "LiltIntermediate"


class _TextFFNOnly(BertLayerAdapter):
    """A user's adapter that swaps LiLT's text feed-forward alone (hides the layout one from
    the built-in check)."""

    name = "lilt_text_ffn"

    def describe(self, module: Any) -> Any:
        hidden = {n: module._modules.pop(n) for n in ("layout_intermediate", "layout_output")}
        try:
            return super().describe(module)
        finally:
            module._modules.update(hidden)


def test_shared_key_check_sees_the_rest_of_a_layer_rewired_in_place() -> None:
    # The check masked the whole layer: intermediate_size (which also sizes LiLT's layout
    # feed-forward) was written, and the checkpoint no longer loaded into a rebuilt model.
    adapter = register_adapter(_TextFFNOnly())
    try:
        model = _lilt()
        report = _quiet_swap(model, "swiglu")
        assert report.paths == ["encoder.layer.0", "encoder.layer.1"]
        assert "intermediate_size" not in report.config_updates
        assert "layout_intermediate" in report.config_skipped["intermediate_size"]
        saved = transformers.LiltConfig.from_dict(model.config.to_dict())
        rebuilt = transformers.LiltModel(saved)
        _recipe(rebuilt, saved.glu_probe_swap)
        rebuilt.load_state_dict(model.state_dict())
        x = torch.randint(0, 64, (2, 8))
        with torch.no_grad():
            torch.testing.assert_close(
                model.eval()(x).last_hidden_state, rebuilt.eval()(x).last_hidden_state
            )
    finally:
        unregister_adapter(adapter)


def test_dropouts_switched_off_stay_off_after_the_swap() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.5, attn_pdrop=0.0
    )  # (attention dropout runs inside SDPA, on the attention module's own flag)
    model = transformers.GPT2LMHeadModel(config).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # the user's switch: deterministic training
    _quiet_swap(model, "swiglu")
    block = model.transformer.h[0].mlp
    assert block.training and block.drop2.p == 0.5
    assert not any(m.training for m in block.modules() if isinstance(m, nn.Dropout))
    x = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)


def test_dropout_modes_carry_by_name_and_mixed_ones_without_a_match_warn() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import Mlp

    class Host(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = Mlp(64, 256, drop=0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(x)

    host = Host().train()
    host.mlp.drop1.eval()  # the hidden dropout off, the output one on
    _quiet_swap(host, "swiglu")
    assert not host.mlp.drop1.training and host.mlp.drop2.training
    del timm

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.5)
    gpt = transformers.GPT2LMHeadModel(config).train()
    gpt.transformer.h[0].mlp.eval()  # the block off, its dropout with it: one mode, no warning
    gpt.transformer.h[0].mlp.dropout.train()  # the block off, its dropout on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*(mismatch|already are)")
        swap_mlp(gpt, "swiglu")
    block = gpt.transformer.h[0].mlp
    assert not block.training and block.drop1.training and block.drop2.training


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_timm_host_gets_timm_init_at_its_scale(dtype: torch.dtype) -> None:
    # trunc_normal_ drawn in 16 bits: std 0.036 / 0.097 for 0.02, values clamped at +-2.
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3
    ).to(dtype)
    _quiet_swap(vit, "gelu")
    w = vit.blocks[0].mlp.fc1.weight
    assert w.dtype == dtype
    assert abs(float(w.float().std()) - 0.02) < 0.001
    assert float(w.float().abs().max()) < 0.2
    assert isinstance(w, nn.Parameter) and w is vit.blocks[0].mlp.fc1.weight


def test_dropouts_switched_off_stay_off_through_installs_that_set_modes() -> None:
    # (Re-review.) BERT's install (and the structural adapter's residual wrapper) set their
    # wrapper's mode recursively, which turned the new block's dropouts back on.
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    bert = transformers.BertModel(config).train()
    for m in bert.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    _quiet_swap(bert, "swiglu")
    mlp = bert.encoder.layer[0].output.mlp
    assert mlp.training and not mlp.drop1.training and not mlp.drop2.training
    x = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(bert(x).last_hidden_state, bert(x).last_hidden_state, rtol=0, atol=0)

    class ResidualFFN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up_proj = nn.Linear(32, 128)
            self.act = nn.GELU()
            self.down_proj = nn.Linear(128, 32)
            self.dropout = nn.Dropout(0.5)

        def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return self.dropout(self.down_proj(self.act(self.up_proj(hidden_states)))) + residual

    class Host(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ffn = ResidualFFN()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ffn(x, x)

    host = Host().train()
    host.ffn.dropout.eval()
    _quiet_swap(host, "swiglu", strict=False)
    drops = [m for m in host.modules() if isinstance(m, nn.Dropout)]
    assert drops and not any(m.training for m in drops)


class _FooMLP(nn.Module):
    def __init__(self, act: Any = nn.functional.gelu, scale: float | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 64)
        self.act_fn = act
        self._scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self._scale is not None:
            h = h * self._scale
        return self.fc2(self.act_fn(h))


class _Stack(nn.Module):
    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def test_structural_verdicts_are_not_shared_across_instance_state() -> None:
    # (Cache review.) The verdict cache keyed on class, children and public settings: within
    # one swap, a scaled block got a plain block's verdict (swapped), a SiLU block held as an
    # attribute was reported as GELU.
    from glu_probe.swap import structural

    structural._RECIPES.clear()
    with pytest.raises(UnsupportedModelError, match=r"layers\.1 \(_FooMLP\)"):
        _quiet_swap(_Stack(_FooMLP(), _FooMLP(scale=2.0)), "swiglu")
    structural._RECIPES.clear()
    report = _quiet_swap(_Stack(_FooMLP(), _FooMLP(nn.functional.silu)), "swiglu")
    assert [e.source_activation for e in report.entries] == ["gelu", "silu"]


def test_structural_verdict_key_is_hashable_with_array_buffers() -> None:
    # (Re-review.) The buffer values went into the key as nested lists: TypeError.
    class BufferedMLP(_FooMLP):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.register_buffer("table", torch.full((2, 2), value))
            self.register_buffer("flag", torch.ones(3, dtype=torch.bool))

    report = _quiet_swap(_Stack(BufferedMLP(1.0), BufferedMLP(2.0)), "swiglu")
    assert report.paths == ["layers.0", "layers.1"]


def test_structural_verdicts_survive_reused_object_ids() -> None:
    # (Re-review.) Callables entered the key by id(): after a block was freed, another lambda
    # at the same address took its verdict (about half of them wrong).
    import gc

    from glu_probe.swap import structural

    structural._RECIPES.clear()
    wrong = 0
    for i in range(8):
        act = (lambda t: nn.functional.gelu(t)) if i % 2 else (lambda t: nn.functional.silu(t))
        form = structural._analyse(_FooMLP(act))
        assert form is not None
        wrong += form.act_name != ("gelu" if i % 2 else "silu")
        del act, form
        gc.collect()
    assert wrong == 0
