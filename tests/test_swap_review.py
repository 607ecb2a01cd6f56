"""glu_probe.swap: regressions from the review of swap_mlp (silent wrong swaps).

Each test failed before its fix: blocks with more than an MLP taken as one (LLaMA-shaped and
BERT-shaped), config keys shared with non-MLP modules, wrapped / composite hosts, init
conventions, parameter-level ties, errors from ``describe`` and the placeholders' training flags.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glu_probe.modules import MLP, GatedMLP
from glu_probe.swap import UnsupportedModelError, swap_mlp

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings(
    "ignore:swap_mlp. multiple_of=8 gives width",
    "ignore:swap_mlp. config key",
    "ignore:swap_mlp. no width matches",
)


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _hf(name: str) -> Any:
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers without {name}")
    return cls


# --------------------------------------------------------------------- finding 1: LLaMA adapter


class _LlamaLike(nn.Module):
    """``down(act(gate x) * up x)``, optionally with more (the variants below)."""

    def __init__(self, d: int = 32, h: int = 48) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _SubNormMLP(_LlamaLike):  # BitNet: an RMSNorm between the product and down_proj
    def __init__(self) -> None:
        super().__init__()
        self.ffn_sub_norm = nn.RMSNorm(48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ffn_sub_norm(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class _ScaledMLP(_LlamaLike):  # Falcon-H1: gate / down multipliers
    def __init__(self, gate: float = 2.0, down: float = 0.5) -> None:
        super().__init__()
        self.gate_multiplier, self.down_multiplier = gate, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up_proj(x) * self.act_fn(self.gate_proj(x) * self.gate_multiplier)
        return self.down_proj(y) * self.down_multiplier


class _PatchMerger(_LlamaLike):  # GLM-4V: proj -> LayerNorm -> GELU -> SwiGLU
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32, bias=False)
        self.post_projection_norm = nn.LayerNorm(32)
        self.act1 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.act1(self.post_projection_norm(self.proj(x))))


class _DropoutMLP(_LlamaLike):  # GTE: dropout on the gated product
    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class _ResidualDropoutMLP(_LlamaLike):  # Seed-OSS: F.dropout(p=residual_dropout) after down_proj
    def __init__(self) -> None:
        super().__init__()
        self.residual_dropout = 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(super().forward(x), self.residual_dropout, self.training)


class _Host(nn.Module):
    def __init__(self, block: nn.Module, name: str = "mlp") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.add_module(name, block)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + getattr(self, self.name)(self.norm(x))


@pytest.mark.parametrize(
    ("block", "name", "params"),
    [
        (_SubNormMLP, "mlp", 3 * 32 * 48 + 48),
        (_ScaledMLP, "feed_forward", 3 * 32 * 48),
        (_PatchMerger, "merger", 3 * 32 * 48 + 32 * 32 + 2 * 32),
    ],
)
def test_llama_shaped_blocks_computing_more_are_refused(
    block: type[nn.Module], name: str, params: int
) -> None:
    model = _Host(block(), name)
    n0 = _n(model)
    assert _n(getattr(model, name)) == params
    with pytest.raises(
        UnsupportedModelError, match=rf"{name} \({block.__name__}\).*register_adapter"
    ):
        swap_mlp(model, "gelu")
    assert _n(model) == n0 and type(getattr(model, name)) is block  # untouched
    with pytest.raises(UnsupportedModelError, match=rf"no recognised MLP block.*{name}"):
        swap_mlp(_Host(block(), name), "gelu", strict=False)  # nothing else to swap


def test_llama_shaped_block_with_unit_multipliers_is_swapped_and_counted_whole() -> None:
    model = _Host(_ScaledMLP(1.0, 1.0), "feed_forward")
    report = swap_mlp(model, "swiglu")
    (entry,) = report.entries
    assert entry.adapter == "hf_llama" and entry.params_before == 3 * 32 * 48 == 4608
    assert isinstance(model.feed_forward, GatedMLP) and entry.params_after == 4608


@pytest.mark.parametrize(
    ("block", "drop"), [(_DropoutMLP, (0.3, 0.0)), (_ResidualDropoutMLP, (0.0, 0.3))]
)
def test_llama_shaped_blocks_with_dropout_keep_it(block: type[nn.Module], drop: Any) -> None:
    model = _Host(block())
    report = swap_mlp(model, "gelu")
    (entry,) = report.entries
    assert entry.adapter == "structural" and entry.params_before == 4608
    assert isinstance(model.mlp, MLP) and (model.mlp.drop1.p, model.mlp.drop2.p) == drop


def test_hf_bitnet_and_falcon_h1_are_refused_gte_keeps_its_dropout() -> None:
    k = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    k.update(num_key_value_heads=4, vocab_size=64, intermediate_size=176)
    bitnet = _hf("BitNetForCausalLM")(_hf("BitNetConfig")(**k))
    n0 = _n(bitnet)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp \(BitNetMLP\)"):
        swap_mlp(bitnet, "swiglu")
    assert _n(bitnet) == n0
    gte = _hf("GteModel")(_hf("GteConfig")(**k, hidden_dropout_prob=0.3))
    report = swap_mlp(gte, "gelu")
    assert {e.adapter for e in report.entries} == {"structural"}
    (block,) = [m for m in gte.modules() if isinstance(m, MLP)]
    assert (block.drop1.p, block.drop2.p) == (0.3, 0.0)


# --------------------------------------------------------------------- finding 2: BERT post-LN


class _Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(32, 64)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class _Output(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(64, 32)
        self.LayerNorm = nn.LayerNorm(32)
        self.dropout = nn.Dropout(0.1)

    def forward(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + r)


class _AdapterOutput(_Output):  # X-MOD: per-language adapters, forward takes lang_ids
    def __init__(self) -> None:
        super().__init__()
        self.adapter = nn.Linear(32, 32)

    def forward(self, h: torch.Tensor, r: torch.Tensor, lang: Any = None) -> torch.Tensor:
        y = super().forward(h, r)
        return y + self.adapter(y)


class _NormFirstOutput(_Output):  # residual added after the LayerNorm: not BERT's form
    def forward(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h))) + r


class _Layer(nn.Module):
    def __init__(self, output: type[nn.Module]) -> None:
        super().__init__()
        self.intermediate = _Intermediate()
        self.output = output()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)


class _TwoLayers(nn.Module):
    def __init__(self, second: type[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(_Output), _Layer(second)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("second", [_AdapterOutput, _NormFirstOutput])
def test_bert_post_ln_layers_computing_more_are_refused(second: type[nn.Module]) -> None:
    model = _TwoLayers(second)
    n0 = _n(model)
    with pytest.raises(UnsupportedModelError, match=r"layers\.1 \(_Layer.*register_adapter"):
        swap_mlp(model, "swiglu")
    assert _n(model) == n0 and isinstance(model.layers[0].output, _Output)
    with pytest.warns(UserWarning, match=r"layers\.1"):
        report = swap_mlp(model, "swiglu", strict=False)
    assert report.paths == ["layers.0"] and report.unrecognised[0].startswith("layers.1 (_Layer")
    assert isinstance(model.layers[1].output, second)  # left alone, still runs
    assert model(torch.randn(2, 3, 32)).shape == (2, 3, 32)


def test_hf_xmod_is_refused() -> None:
    config = _hf("XmodConfig")(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=64,
        max_position_embeddings=64,
        pad_token_id=1,
        languages=("en_XX", "de_DE"),
        default_language="en_XX",
    )
    model = _hf("XmodForMaskedLM")(config)
    n0 = _n(model)
    with pytest.raises(UnsupportedModelError, match=r"roberta\.encoder\.layer\.0.*adapter_modules"):
        swap_mlp(model, "swiglu")
    assert _n(model) == n0


# ----------------------------------------------------------- finding 3: shared activation key


def test_activation_key_read_by_a_non_mlp_module_is_left_alone() -> None:
    config = _hf("NomicBertConfig")(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=176,
        vocab_size=64,
        hidden_act="silu",
    )
    model = _hf("NomicBertForMaskedLM")(config)
    with pytest.warns(UserWarning, match="hidden_act.*transform_act_fn"):
        report = swap_mlp(model, "gelu")
    h = report.entries[0].hidden_features
    assert h == 264 and config.intermediate_size == 264 and config.hidden_act == "silu"
    assert report.config_updates["intermediate_size"] == (176, 264)
    assert "hidden_act" not in report.config_updates and "hidden_act" in report.config_skipped
    assert config.glu_probe_swap["act_key"] is None
    # A model rebuilt from the config and swapped the same way computes the same.
    model.eval()
    rebuilt = _hf("NomicBertForMaskedLM")(copy.deepcopy(config)).eval()
    swap_mlp(rebuilt, "gelu")
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, rebuilt(input_ids=ids).logits)


def _tiny_llama() -> nn.Module:
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=64,
        )
    )


def _tiny_bert() -> nn.Module:
    return transformers.BertModel(
        transformers.BertConfig(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
            vocab_size=64,
        )
    )  # fmt: skip


def test_activation_key_only_the_mlps_read_is_updated() -> None:
    report = swap_mlp(_tiny_llama(), "gelu")
    assert report.config_updates["hidden_act"] == ("silu", "gelu") and report.config_skipped == {}


# ----------------------------------------------------- findings 4 and 5: wrapped / composite


class _Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def test_wrapped_hf_model_gets_its_config_updated_and_its_init() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    wrapper = _Wrapper(transformers.GPT2LMHeadModel(config))
    report = swap_mlp(wrapper, "gelu", hidden_features=1024)
    assert report.config_updates["net.config.n_inner"] == (None, 1024)
    assert report.config_updates["net.config.activation_function"] == ("gelu_new", "gelu")
    assert config.n_inner == 1024 and config.activation_function == "gelu"
    block = wrapper.net.transformer.h[0].mlp
    assert isinstance(block, MLP) and torch.all(block.fc1.bias == 0)
    assert abs(block.fc1.weight.std().item() - 0.02) < 0.002  # N(0, 0.02²), not nn.Linear's
    assert abs(block.fc2.weight.std().item() - 0.02 / math.sqrt(4)) < 0.001  # GPT-2's c_proj


def test_wrapped_timm_model_gets_its_init() -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    wrapper = _Wrapper(vit)
    swap_mlp(wrapper, "relu", hidden_features=1024)
    block = vit.blocks[0].mlp
    assert torch.all(block.fc2.bias == 0) and torch.all(block.fc1.bias == 0)
    assert abs(block.fc1.weight.std().item() - 0.02) < 0.002


def test_composite_model_updates_each_sub_config() -> None:
    text = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=80,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    config = _hf("LlavaConfig")(text_config=text, vision_config=vision, image_token_id=70)
    model = _hf("LlavaForConditionalGeneration")(config)
    report = swap_mlp(model, "gelu")
    assert model.config.text_config.intermediate_size == 264
    assert model.config.text_config.hidden_act == "gelu"
    key = "model.language_model.config."
    assert report.config_updates[key + "intermediate_size"] == (176, 264)
    assert report.config_updates[key + "glu_probe_swap"][1]["hidden"] == 264
    assert model.config.vision_config.glu_probe_swap["hidden"] == 256  # same family: same width


# ------------------------------------------------------------------- finding 6: init conventions


def test_clip_model_mlps_get_clips_own_init() -> None:
    torch.manual_seed(0)
    d, layers = 64, 2
    sub = {"hidden_size": d, "intermediate_size": 1024, "num_hidden_layers": layers}
    sub["num_attention_heads"] = 4
    config = transformers.CLIPConfig(text_config=sub, vision_config={**sub, "image_size": 32})
    model = transformers.CLIPModel(config)
    swap_mlp(model, "gelu")
    for tower in (model.text_model, model.vision_model):
        block = tower.encoder.layers[0].mlp
        assert isinstance(block, MLP)
        assert math.isclose(block.fc1.weight.std().item(), (2 * d) ** -0.5, rel_tol=0.03)
        want_fc2 = d**-0.5 * (2 * layers) ** -0.5
        assert math.isclose(block.fc2.weight.std().item(), want_fc2, rel_tol=0.03)
        assert torch.all(block.fc1.bias == 0)


def test_timm_convnext_conv_mlp_and_mixer_get_their_family_init() -> None:
    from timm.models.convnext import ConvNeXt
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    convnext = ConvNeXt(depths=(1, 1, 1, 1), dims=(64, 64, 64, 64), conv_mlp=True, num_classes=4)
    swap_mlp(convnext, "gelu", hidden_features=1024)
    block = convnext.stages[0].blocks[0].mlp
    assert isinstance(block.fc1, nn.Conv2d) and torch.all(block.fc1.bias == 0)
    assert math.isclose(block.fc1.weight.std().item(), 0.02, rel_tol=0.05)
    mixer = MlpMixer(num_classes=4, img_size=32, patch_size=8, num_blocks=1, embed_dim=64)
    swap_mlp(mixer, "gelu", hidden_features=1024)
    fc1 = mixer.blocks[0].mlp_channels.fc1
    xavier = math.sqrt(2.0 / (fc1.in_features + fc1.out_features))
    assert math.isclose(fc1.weight.std().item(), xavier, rel_tol=0.05)
    assert 0 < fc1.bias.abs().max().item() < 1e-4  # N(0, 1e-6²) biases in Mixer's MLPs


# --------------------------------------------------------------- finding 7: parameter-level ties


def test_parameters_tied_between_distinct_blocks_are_refused() -> None:
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    vit.blocks[1].mlp.fc1.weight = vit.blocks[0].mlp.fc1.weight
    n0 = _n(vit)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.mlp\.fc1\.weight.*blocks\.1"):
        swap_mlp(vit, "swiglu")
    assert _n(vit) == n0 and vit.blocks[1].mlp.fc1.weight is vit.blocks[0].mlp.fc1.weight
    # Tied to a non-MLP module: refused too.
    host = _Host(_LlamaLike())
    host.extra = nn.Linear(32, 48, bias=False)
    host.extra.weight = host.mlp.gate_proj.weight
    with pytest.raises(UnsupportedModelError, match=r"extra\.weight"):
        swap_mlp(host, "gelu")


# ------------------------------------------------------ finding 8: errors raised from describe


def test_describe_errors_name_the_path_and_strict_false_skips_the_block() -> None:
    class _NoNorm(_Output):
        def __init__(self) -> None:
            super().__init__()
            del self.LayerNorm, self.dropout

        def forward(self, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return self.dense(h) + r

    model = _TwoLayers(_NoNorm)
    with pytest.raises(UnsupportedModelError, match=r"layers\.1 \(_Layer.*register_adapter"):
        swap_mlp(model, "gelu")
    with pytest.warns(UserWarning, match=r"layers\.1 \(_Layer.*register_adapter"):
        report = swap_mlp(model, "gelu", strict=False)
    assert report.paths == ["layers.0"] and len(report.unrecognised) == 1
    assert report.entries[0].params_before == 2 * 32 * 64 + 64 + 32


# -------------------------------------------------------- finding 9: placeholders' training flag


def test_placeholders_take_the_training_flag_of_what_they_replace() -> None:
    bert = _tiny_bert().eval()
    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=128,
            vocab_size=64,
            word_embed_proj_dim=64,
        )
    ).eval()
    for model in (bert, opt):
        swap_mlp(model, "swiglu")
        assert [n for n, m in model.named_modules() if m.training] == []


# =====================================================================================
# Second review (after 502079a): init preempted by T5's rule, aliases refused as ties, the
# LLaMA check's full-size allocation, EVA / BEiT init, stand-ins sharing hook dicts, and the
# shared-key check that silently did not run.
# =====================================================================================


def _std(t: torch.Tensor) -> float:
    return t.detach().float().std().item()


# ---------------------------------------------- 2nd review, finding 1: host init before T5's rule


@pytest.mark.parametrize("init_range", [0.05, 1e-10])
@pytest.mark.parametrize("variant", ["gelu", "swiglu"])
def test_pix2struct_vision_mlp_gets_its_hosts_init_not_t5s(init_range: float, variant: str) -> None:
    """Pix2Struct's vision MLP has T5's wi_0/wi_1/wo names but its host initialises it with
    N(0, initializer_range²); T5's N(0, 1/fan_in) rule (0.088 / 0.036 here) must not preempt."""
    config = _hf("Pix2StructVisionConfig")(
        hidden_size=128,
        patch_embed_hidden_size=128,
        d_ff=512,
        d_kv=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        initializer_range=init_range,
        initializer_factor=1.0,
    )
    torch.manual_seed(0)
    model = _hf("Pix2StructVisionModel")(config)
    own = model.encoder.layer[0].mlp
    own_in, own_out = _std(torch.cat([own.wi_0.weight, own.wi_1.weight])), _std(own.wo.weight)
    assert math.isclose(own_in, init_range, rel_tol=0.03)  # what the host gives its own MLP
    assert math.isclose(own_out, init_range, rel_tol=0.03)
    report = swap_mlp(model, variant)
    assert report.entries[0].hidden_features == (768 if variant == "gelu" else 512)
    for k in range(2):
        block = model.encoder.layer[k].mlp
        fc1 = block.fc1.weight
        assert math.isclose(_std(fc1), own_in, rel_tol=0.03)
        assert math.isclose(_std(block.fc2.weight), own_out, rel_tol=0.03)
        assert torch.all(block.fc2.bias == 0) if block.fc2.bias is not None else True


def _t5(feed_forward_proj: str, d_ff: int = 512) -> Any:
    return transformers.T5Config(
        d_model=128,
        d_ff=d_ff,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        d_kv=32,
        vocab_size=64,
        feed_forward_proj=feed_forward_proj,
        initializer_factor=0.5,
        decoder_start_token_id=0,
        pad_token_id=0,
    )


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])  # T5 v1.0, v1.1
@pytest.mark.parametrize("variant", ["gelu", "swiglu"])
def test_t5_blocks_get_t5s_own_init_weights_at_the_new_width(
    feed_forward_proj: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """T5's _init_weights itself (on a stand-in of the source block, with d_ff reading the new
    width) gives wi N(0, 0.5²/128) and wo N(0, 0.5²/new width): what a T5 rebuilt from the
    updated config gives its own blocks. Without a usable _init_weights, T5's formula."""
    seen: list[str] = []
    t5_init = transformers.T5PreTrainedModel._init_weights

    def spy(self: Any, module: nn.Module) -> None:
        # real init calls only: before transformers 5, post_init also runs _init_weights on the
        # meta-device rebuild that reads the model's shared keys (no storage, nothing drawn)
        if not any(p.is_meta for p in module.parameters()):
            seen.append(type(module).__name__)
        t5_init(self, module)

    monkeypatch.setattr(transformers.T5PreTrainedModel, "_init_weights", spy)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(_t5(feed_forward_proj))
    before = copy.deepcopy(model)
    seen.clear()
    report = swap_mlp(model, variant)
    hidden = report.entries[0].hidden_features
    # (the stacks' private config copies follow the root's since session 18)
    assert model.config.d_ff == model.encoder.config.d_ff == model.decoder.config.d_ff == hidden
    want_cls = "T5DenseActDense" if feed_forward_proj == "relu" else "T5DenseGatedActDense"
    n_in = 2 if hasattr(model.encoder.block[0].layer[1].DenseReluDense, "fc1_g") else 1
    assert seen.count(want_cls) == 4 * n_in  # one stand-in per block and new input layer
    torch.manual_seed(1)
    rebuilt = transformers.T5ForConditionalGeneration(model.config)  # d_ff = new width
    ref = rebuilt.encoder.block[0].layer[1].DenseReluDense
    ref_in = ref.wi if hasattr(ref, "wi") else ref.wi_0
    assert math.isclose(_std(ref_in.weight), 0.5 / math.sqrt(128), rel_tol=0.03)
    assert math.isclose(_std(ref.wo.weight), 0.5 / math.sqrt(hidden), rel_tol=0.05)
    for stack in (model.encoder, model.decoder):
        block = stack.block[1].layer[-1].DenseReluDense
        fc1 = block.fc1 if hasattr(block, "fc1") else block.fc1_g
        assert math.isclose(_std(fc1.weight), _std(ref_in.weight), rel_tol=0.05)
        assert math.isclose(_std(block.fc2.weight), _std(ref.wo.weight), rel_tol=0.05)

    def broken(self: Any, module: nn.Module) -> None:
        raise RuntimeError("no usable _init_weights")

    monkeypatch.setattr(transformers.T5PreTrainedModel, "_init_weights", broken)
    torch.manual_seed(0)
    swap_mlp(before, variant)  # the fallback: T5's formula, same numbers
    block = before.encoder.block[1].layer[1].DenseReluDense
    fc1 = block.fc1 if hasattr(block, "fc1") else block.fc1_g
    assert math.isclose(_std(fc1.weight), 0.5 / math.sqrt(128), rel_tol=0.05)
    assert math.isclose(_std(block.fc2.weight), 0.5 / math.sqrt(hidden), rel_tol=0.05)


# ------------------------------------------- 2nd review, finding 2: aliases are not ties


class _Alias(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.backbone = net  # the same model under a second name (EMA, back-compat)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids).logits


def test_model_registered_under_two_names_swaps_as_one() -> None:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0
    )
    config.eos_token_id = 0
    model = _Alias(transformers.GPT2LMHeadModel(config))
    n0 = _n(model)
    report = swap_mlp(model, "swiglu")
    assert report.paths == ["net.transformer.h.0.mlp", "net.transformer.h.1.mlp"]
    # GPT2MLP 64->256->64: 33088 parameters; SwiGLU width 170: 64·340+340 + 170·64+64 = 33044.
    assert [(e.params_before, e.params_after) for e in report.entries] == [(33088, 33044)] * 2
    assert _n(model) - n0 == report.params_after - report.params_before == -88
    for k in range(2):
        assert model.backbone.transformer.h[k].mlp is model.net.transformer.h[k].mlp
        assert isinstance(model.backbone.transformer.h[k].mlp, GatedMLP)
    assert report.config_updates["net.config.n_inner"] == (None, 170)
    assert model(torch.randint(0, 100, (1, 5))).shape == (1, 5, 100)


def test_block_under_two_attribute_names_is_replaced_under_both() -> None:
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    for blk in vit.blocks:
        blk.ffn = blk.mlp  # registered twice on its parent: named_children finds it once
    n0 = _n(vit)
    report = swap_mlp(vit, "gelu", hidden_features=128)
    assert report.paths == ["blocks.0.mlp", "blocks.1.mlp"]
    for blk in vit.blocks:
        assert isinstance(blk.mlp, MLP) and blk.ffn is blk.mlp
    # timm Mlp 64->256->64 (33088) -> 64->128->64 (16576), twice.
    assert _n(vit) - n0 == report.params_after - report.params_before == 2 * (16576 - 33088)


def test_ties_between_distinct_blocks_are_still_refused_and_strict_false_skips_them() -> None:
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2)
    vit.alias = vit.blocks  # an alias does not hide the real tie below
    vit.blocks[1].mlp.fc1.weight = vit.blocks[0].mlp.fc1.weight
    n0 = _n(vit)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.mlp\.fc1\.weight.*blocks\.1"):
        swap_mlp(vit, "gelu")
    assert _n(vit) == n0
    with pytest.warns(UserWarning, match=r"2 block\(s\) matched by an adapter cannot be swapped"):
        report = swap_mlp(vit, "gelu", hidden_features=128, strict=False)
    assert report.paths == ["blocks.2.mlp"] and len(report.unrecognised) == 2
    assert vit.blocks[1].mlp.fc1.weight is vit.blocks[0].mlp.fc1.weight  # still tied
    assert _n(vit) - n0 == 16576 - 33088


# -------------------------------- 2nd review, finding 3: the LLaMA check allocates nothing big


def test_llama_check_runs_on_a_tiny_copy(
    monkeypatch: pytest.MonkeyPatch, fresh_weight_shapes: list[tuple[int, int]]
) -> None:
    from glu_probe.swap import structural

    shapes = fresh_weight_shapes
    monkeypatch.setattr(structural, "_SPLIT_VERDICTS", {})
    config = transformers.LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=2,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    report = swap_mlp(model, "gelu")
    assert [e.adapter for e in report.entries] == ["hf_llama"] * 2
    assert shapes == [(16, 8), (16, 8), (8, 16)]  # one check, on the reduced copy
    # The reduced copy still tells a block that computes more: multipliers ≠ 1, on meta, big.
    with torch.device("meta"):
        scaled = _ScaledMLP()
        scaled.gate_proj = nn.Linear(8192, 28672, bias=False)
        scaled.up_proj = nn.Linear(8192, 28672, bias=False)
        scaled.down_proj = nn.Linear(28672, 8192, bias=False)
    assert not structural.verify_split_gated(scaled, "gate_proj", "up_proj", "down_proj", "act_fn")
    assert max(o * i for o, i in shapes) == 16 * 8


def test_llama_check_maps_width_settings_of_the_block() -> None:
    """A forward that reads its stored widths (``view(-1, self.hidden_size)``) still passes."""
    from glu_probe.swap.structural import verify_split_gated

    class _Viewing(_LlamaLike):
        def __init__(self) -> None:
            super().__init__(d=4096, h=11008)
            self.hidden_size, self.intermediate_size = 4096, 11008

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
            return self.down_proj(h.view(-1, self.intermediate_size)).view(*x.shape[:-1], -1)

    with torch.device("meta"):
        block = _Viewing()
    assert verify_split_gated(block, "gate_proj", "up_proj", "down_proj", "act_fn")


def test_llama_7b_shape_on_meta_swaps_fast_without_allocating() -> None:
    """Peak RSS and time of the swap alone, in a fresh process: its VmHWM (peak resident set of
    its own address space; ``ru_maxrss`` would carry the parent's peak over ``exec``). Before
    the fix: +700 MiB and 2.5-4 s for this shape (+3.6 GiB and 14-29 s for 70B)."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux)")
    script = """
import time, warnings, torch, transformers
from glu_probe.swap import swap_mlp
warnings.simplefilter("ignore")
def hwm():
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, vocab_size=32000)
with torch.device("meta"):
    m = transformers.LlamaForCausalLM(cfg)
torch.randn(4)
r0 = hwm()
t = time.perf_counter()
rep = swap_mlp(m, "gelu")
dt = time.perf_counter() - t
assert len(rep.entries) == 32 and {p.device.type for p in m.parameters()} == {"meta"}
print(dt, hwm() - r0)
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seconds, extra_mib = map(float, out.stdout.split()[-2:])
    assert seconds < 5.0
    assert extra_mib < 100.0


# ----------------------------------------------------- 2nd review, finding 4: EVA / BEiT init


@pytest.mark.parametrize("variant", ["gelu", "swiglu"])
@pytest.mark.parametrize("family", ["eva_swiglu", "eva_mlp", "beit"])
def test_eva_and_beit_blocks_get_their_hosts_init_and_depth_rescale(
    family: str, variant: str
) -> None:
    if family == "beit":
        from timm.models.beit import Beit

        def build() -> nn.Module:
            return Beit(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
    else:
        from timm.models.eva import Eva

        def build() -> nn.Module:
            kw = {"swiglu_mlp": True, "mlp_ratio": 8 / 3} if family == "eva_swiglu" else {}
            return Eva(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, **kw)

    torch.manual_seed(0)
    model: Any = build()
    own = [_std(b.mlp.fc2.weight) for b in model.blocks]
    for k, s in enumerate(own):  # what the host gives its own fc2: 0.02 / sqrt(2(k+1))
        assert math.isclose(s, 0.02 / math.sqrt(2 * (k + 1)), rel_tol=0.05)
    own_gate = getattr(model.blocks[0].mlp, "fc1_g", None)
    if own_gate is not None:  # EVA's own SwiGLU gate: trunc_normal(0.02), zero bias
        assert math.isclose(_std(own_gate.weight), 0.02, rel_tol=0.05)
        assert torch.all(own_gate.bias == 0)
    torch.manual_seed(1)
    swap_mlp(model, variant, hidden_features=256, packed=False) if variant == "swiglu" else (
        swap_mlp(model, variant, hidden_features=256)
    )
    for k, block in enumerate(model.blocks):
        new = block.mlp
        assert math.isclose(_std(new.fc2.weight), own[k], rel_tol=0.05)
        assert torch.all(new.fc2.bias == 0)
        first = new.fc1_g if variant == "swiglu" else new.fc1
        assert math.isclose(_std(first.weight), 0.02, rel_tol=0.05)  # not timm SwiGLU's 1e-6
        assert torch.all(first.bias == 0)  # not timm SwiGLU's gate bias 1


# --------------------------------------- 2nd review, finding 5: stand-ins own their hook dicts


def test_stand_in_gets_fresh_hook_dicts_and_buffer_set() -> None:
    from glu_probe.swap.core import _stand_in

    source = _LlamaLike()
    source.register_forward_hook(lambda *a: None)
    source.register_buffer("scale", torch.ones(1), persistent=False)
    state = {k: (type(v), len(v)) for k, v in vars(source).items() if isinstance(v, dict | set)}
    new_in, new_out = nn.Linear(32, 64), nn.Linear(64, 32)
    stand = _stand_in(source, {"gate_proj": new_in, "up_proj": new_in, "down_proj": new_out})
    assert type(stand) is _LlamaLike and stand.act_fn is source.act_fn
    assert dict(stand.named_parameters()).keys() == {
        "gate_proj.weight",
        "gate_proj.bias",
        "down_proj.weight",
        "down_proj.bias",
    }
    assert len(stand._forward_hooks) == 0 and stand._non_persistent_buffers_set == set()
    # What a host's _init_weights might do to its argument stays on the stand-in.
    stand.register_forward_hook(lambda *a: None)
    stand.register_forward_pre_hook(lambda *a: None)
    stand.register_buffer("extra", torch.zeros(1), persistent=False)
    after = {k: (type(v), len(v)) for k, v in vars(source).items() if isinstance(v, dict | set)}
    assert after == state and "extra" not in source._buffers
    assert all(
        vars(stand)[k] is not v for k, v in vars(source).items() if isinstance(v, dict | set)
    )


# --------------------------------------- 2nd review, finding 6: an unchecked config is named


class _ConfigWrapper(nn.Module):
    """Exposes its model's config itself, holding only the model's layers: no PreTrainedModel
    at or above the config's owner path. (It held the whole model until session 27: the model,
    a PreTrainedModel holding the same config object, now owns the config, so the shared-key
    check runs there.)"""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.layers = net.model.layers
        self.config = net.config


def test_config_written_without_the_shared_key_check_is_reported() -> None:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    plain = swap_mlp(transformers.LlamaForCausalLM(copy.deepcopy(config)), "gelu")
    assert plain.config_unchecked == {} and plain.config_skipped == {}
    wrapped = _ConfigWrapper(transformers.LlamaForCausalLM(config))
    report = swap_mlp(wrapped, "gelu")
    assert report.config_updates["intermediate_size"] == (176, 264)  # still written
    assert report.config_updates["hidden_act"] == ("silu", "gelu")
    assert list(report.config_unchecked) == ["config"]
    assert "no Hugging Face PreTrainedModel" in report.config_unchecked["config"]
    assert "config updated without the shared-key check" in report.to_markdown()


def test_llama_blocks_with_hooks_or_width_branches_are_refused():
    """The block's forward is checked at its real widths when small, and hooks (which the new
    block would not carry) make it unrecognised: both were silently swapped by the reduced-copy
    check."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    from glu_probe.swap import UnsupportedModelError, swap_mlp

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip

    class Branch(LlamaMLP):
        def forward(self, x):
            out = super().forward(x)
            return out * 0.5 if self.intermediate_size >= 64 else out

    hooked = LlamaForCausalLM(cfg)
    hooked.model.layers[0].mlp.register_forward_hook(lambda m, a, o: o * 2)
    branched = LlamaForCausalLM(cfg)
    branched.model.layers[0].mlp = Branch(cfg)
    for model in (hooked, branched):
        with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.mlp"):
            swap_mlp(model, "gelu")
    plain = LlamaForCausalLM(cfg)
    assert swap_mlp(plain, "gelu").paths == ["model.layers.0.mlp"]


@pytest.mark.parametrize("host", ["gpt2", "timm"])
@pytest.mark.parametrize("kind", ["forward", "observer", "pre", "backward", "layer"])
def test_hooked_blocks_are_refused_by_every_adapter(host: str, kind: str) -> None:
    """GPT-2's and timm's adapters swapped a hooked block and dropped its hook (a hook that
    zeroed the output was lost without a word) where the LLaMA, structural and BERT adapters
    refuse: every adapter now refuses a block with hooks of any kind, naming them, and
    changes nothing."""
    if host == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model: nn.Module = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4))
        block, path = model.transformer.h[1].mlp, "transformer.h.1.mlp"
    else:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(img_size=16, patch_size=8, embed_dim=64, depth=2, num_heads=4)
        block, path = model.blocks[1].mlp, "blocks.1.mlp"
    layer = next(m for m in block.children() if isinstance(m, nn.Module))
    seen: list[int] = []
    if kind == "forward":
        block.register_forward_hook(lambda m, a, o: o * 0)
    elif kind == "observer":
        block.register_forward_hook(lambda m, a, o: seen.append(1))
    elif kind == "pre":
        block.register_forward_pre_hook(lambda m, a: None)
    elif kind == "backward":
        block.register_full_backward_hook(lambda m, gi, go: None)
    else:
        layer.register_forward_hook(lambda m, a, o: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=rf"{re.escape(path)}.*has hooks"):
        swap_mlp(model, "swiglu")
    assert model.get_submodule(path) is block  # nothing swapped (all or nothing)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    report = swap_mlp(model, "swiglu", strict=False)  # the others still can be
    assert path not in report.paths and len(report.paths) == 1


def test_refusal_names_linear_subclasses() -> None:
    """Falcon's MLP was refused without a reason: its layers are FalconLinear, nn.Linear
    subclasses with their own forward, which no built-in adapter takes as plain layers."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    model = FalconForCausalLM(cfg)
    with pytest.raises(UnsupportedModelError, match=r"whose layers are FalconLinear: nn\.Linear"):
        swap_mlp(model, "swiglu")


def test_bert_keeps_hooks_on_what_its_swap_keeps() -> None:
    """transformers 5 leaves output-capturing hooks on BertLayer and BertSelfAttention after a
    forward with output_hidden_states=True; the BERT swap rewires the layer in place and keeps
    both, so it must not refuse (it did, for a while, on 2026-11-27). A hook on the replaced
    intermediate layer is still refused."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(cfg)
    ids = torch.randint(0, 64, (1, 8))
    model(ids, output_hidden_states=True)
    layer = model.encoder.layer[0]
    captured = dict(layer._forward_hooks)  # (transformers' own capture hook, where it has one)
    report = swap_mlp(model, "swiglu")
    assert len(report.paths) == 2 and layer._forward_hooks == captured  # kept with the layer
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    other = BertModel(cfg)
    other.encoder.layer[1].intermediate.register_forward_hook(lambda m, a, o: o * 2)
    with pytest.raises(UnsupportedModelError, match=r"has hooks \('intermediate'"):
        swap_mlp(other, "swiglu")
    if not captured:  # the rest ran; the point of the test needs transformers' capture hooks
        pytest.skip(
            "this transformers leaves no output-capturing hook on BertLayer (recent 5.x does;"
            " 5.0 and 4.x do not)"
        )


def test_a_second_swap_of_a_place_keeps_the_hosts_init_rules() -> None:
    """(Review, session 17.) swiglu then back to gelu: the second swap replaces a glu-probe
    block, and initialised it with the host's generic rule (T5: N(0, initializer_factor²) =
    N(0, 1), ~30x too large; GPT-2: no depth scaling of the output layer). The host's own
    block, kept as a meta-device copy on the new block (no storage, not a sub-module),
    decides the rules at every later swap of that place."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.swap.core import ORIGIN_ATTR

    torch.manual_seed(0)
    d, factor = 128, 0.5
    cfg = _t5("relu", d_ff=1024)
    t5 = transformers.T5ForConditionalGeneration(cfg)
    for variant in ("swiglu", "gelu", "reglu"):
        report = swap_mlp(t5, variant)
        block = t5.encoder.block[0].layer[1].DenseReluDense
        width = report.entries[0].hidden_features
        # factor/√d_model and factor/√d_ff (the new width)
        assert abs(float(block.fc1.weight.std()) * d**0.5 / factor - 1) < 0.05, variant
        assert abs(float(block.fc2.weight.std()) * width**0.5 / factor - 1) < 0.05, variant
        origin = block.__dict__[ORIGIN_ATTR]
        assert type(origin).__name__.startswith("T5Dense")
        assert all(p.is_meta for p in origin.parameters())
    assert not any("origin" in k for k in t5.state_dict())  # not a sub-module
    assert not any(p.is_meta for p in t5.parameters())

    gpt = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=256, n_layer=8, n_head=4, vocab_size=64, n_positions=32)
    )
    rule = 0.02 / (2 * 8) ** 0.5
    for variant in ("swiglu", "gelu"):
        swap_mlp(gpt, variant)
        std = float(gpt.transformer.h[0].mlp.fc2.weight.std())
        assert abs(std / rule - 1) < 0.1, (variant, std)
    copy.deepcopy(gpt)(torch.randint(0, 64, (2, 8))).logits.sum().backward()


class _MlpHost(nn.Module):
    """A plain module holding a timm ``Mlp(32, 128)`` as ``mlp``."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _timm_mlp_host(timm: Any) -> nn.Module:
    return _MlpHost(timm.layers.Mlp(32, 128))


def test_a_parametrized_layer_is_refused_not_silently_dropped() -> None:
    """(Review, session 17.) ``nn.utils.parametrizations.weight_norm`` registers no hook: the
    swap dropped it silently and counted its ``original0`` / ``original1`` tensors as the
    block's parameters. Now refused like the hook-based ``weight_norm``; a block without it
    still swaps."""
    timm = pytest.importorskip("timm")

    m = _timm_mlp_host(timm)
    nn.utils.parametrizations.weight_norm(m.mlp.fc1)
    with pytest.raises(UnsupportedModelError, match="parametrizations"):
        swap_mlp(m, "gelu")
    assert nn.utils.parametrize.is_parametrized(m.mlp.fc1)  # left as it was
    nn.utils.parametrize.remove_parametrizations(m.mlp.fc1, "weight")
    assert swap_mlp(m, "gelu").entries[0].params_before == 32 * 128 + 128 + 128 * 32 + 32


def test_a_block_in_several_dtypes_gets_a_warning() -> None:
    """(Review, session 17.) A block whose layers have different dtypes (T5's ``wo`` kept in
    float32 in a 16-bit model) is rebuilt in one dtype: the swap says so."""
    timm = pytest.importorskip("timm")

    m = _timm_mlp_host(timm)
    m.mlp.fc1.to(torch.bfloat16)
    with pytest.warns(UserWarning, match="several dtypes"):
        swap_mlp(m, "swiglu")
    plain = _timm_mlp_host(timm)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*several dtypes")
        swap_mlp(plain, "swiglu")


def test_t5_stacks_private_config_copies_follow_the_swap() -> None:
    """(Session 18.) T5's encoder and decoder stacks each hold a deep copy of the root config;
    the swap updated only the root's ``d_ff``, so ``model.encoder.config.d_ff`` kept describing
    the blocks before the swap. The copies now follow, both ways, and the report names them."""
    model = transformers.T5ForConditionalGeneration(_t5("relu", d_ff=96))
    assert model.encoder.config is not model.config
    report = swap_mlp(model, "swiglu")
    hidden = report.entries[0].hidden_features
    assert hidden != 96
    for stack in ("encoder", "decoder"):
        assert getattr(model, stack).config.d_ff == hidden
        assert report.config_updates[f"{stack}.config.d_ff"] == (96, hidden)
    assert model.decoder.config.is_decoder and not model.encoder.config.is_decoder  # untouched
    back = swap_mlp(model, "relu")
    assert back.entries[0].hidden_features == 96
    assert model.config.d_ff == model.encoder.config.d_ff == model.decoder.config.d_ff == 96


def test_a_partly_frozen_block_keeps_its_flags_per_layer() -> None:
    """(Review, session 18.) A block whose weights are frozen while its biases train (BitFit)
    came back fully trainable after a swap, silently; the flags now follow the layer roles, and
    a swap back restores the original trainable count."""
    timm = pytest.importorskip("timm")

    m = _timm_mlp_host(timm)
    for layer in (m.mlp.fc1, m.mlp.fc2):
        layer.weight.requires_grad_(False)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    swap_mlp(m, "swiglu")
    flags = {n: p.requires_grad for n, p in m.mlp.named_parameters()}
    assert flags == {"fc1.weight": False, "fc1.bias": True, "fc2.weight": False, "fc2.bias": True}
    swap_mlp(m, "gelu")
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == trainable
    # BERT's rewired block has no layer roles, but BitFit flags are uniform per kind
    bert = _tiny_bert()
    for name, p in bert.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*partly frozen")
        swap_mlp(bert, "swiglu")
    swapped = [(n, p) for n, p in bert.named_parameters() if ".mlp." in n or "ffn" in n]
    assert swapped and all(p.requires_grad == n.endswith("bias") for n, p in swapped)
    # gate and up frozen differently: no role of the new packed fc1 fits, so a warning
    llama = _tiny_llama()
    mlp = llama.model.layers[0].mlp
    mlp.gate_proj.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="partly frozen"):
        swap_mlp(llama, "gelu")


def test_a_swap_under_inference_mode_leaves_a_trainable_model() -> None:
    """(Review, session 18.) Under ``torch.inference_mode()`` (a Lightning validation hook) the
    new blocks were built from inference tensors: the model could no longer be trained."""
    timm = pytest.importorskip("timm")

    m = _timm_mlp_host(timm)
    with torch.inference_mode():
        swap_mlp(m, "swiglu")
    assert not any(p.is_inference() for p in m.parameters())
    m(torch.randn(3, 32)).sum().backward()
    assert m.mlp.fc1.weight.grad is not None


def test_arguments_taken_from_the_source_block_are_refused_clearly() -> None:
    """(Review, session 18.) ``swap_mlp(m, "swiglu", bias=False)`` raised a raw "make_mlp() got
    multiple values for keyword argument 'bias'"; these arguments come from each source block."""
    timm = pytest.importorskip("timm")

    for key in ("bias", "drop", "dtype", "norm_layer"):
        with pytest.raises(TypeError, match=r"taken from each block being replaced"):
            swap_mlp(_timm_mlp_host(timm), "swiglu", **{key: None})


# ----------------------------------------------------------- session 20: more HF architectures
def test_layers_whose_rewiring_check_fails_are_reported_not_left_dense():
    """LED's encoder layers need more than the hidden states in their forward, so the layer
    adapter's rewiring check declines them: only the decoder was swapped, with an empty
    ``report.unrecognised`` and no warning (review, session 20). They are now reported: a clear
    error naming them and ``register_adapter``."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.swap import UnsupportedModelError, swap_mlp

    cfg = transformers.LEDConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
        decoder_ffn_dim=256, max_encoder_position_embeddings=64,
        max_decoder_position_embeddings=64, attention_window=[4, 4],
    )  # fmt: skip
    model = transformers.LEDForConditionalGeneration(cfg)
    with pytest.raises(UnsupportedModelError, match=r"led\.encoder\.layers\.0.*register_adapter"):
        swap_mlp(model, "swiglu")


def test_a_width_matched_record_does_not_override_a_params_matched_swap():
    """A GPT-J config updated by a ``match="width"`` swap made a later ``match="params"`` swap
    of a model built from it keep the recorded width: +50% parameters, silently (review,
    session 20). The record is used only for a swap of the same match."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.swap import swap_mlp

    cfg = transformers.GPTJConfig(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64
    )
    first = transformers.GPTJForCausalLM(copy.deepcopy(cfg))
    swap_mlp(first, "swiglu", match="width")
    rebuilt = transformers.GPTJForCausalLM(copy.deepcopy(first.config))
    fresh = transformers.GPTJForCausalLM(copy.deepcopy(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (multiple_of notes)
        r_rebuilt = swap_mlp(rebuilt, "swiglu", match="params")
        r_fresh = swap_mlp(fresh, "swiglu", match="params")
    assert abs(r_rebuilt.rel_diff) <= 0.01
    assert r_rebuilt.entries[0].hidden_features == r_fresh.entries[0].hidden_features


def test_shared_experts_do_not_write_the_routed_experts_width_key():
    """Qwen2-MoE under ``strict=False``: only the shared experts (width
    ``shared_expert_intermediate_size``) are swapped, and their new width was written to
    ``intermediate_size``, a width these blocks never had (review, session 20)."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.swap import swap_mlp

    cfg = transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=256, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.Qwen2MoeForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = swap_mlp(model, "gelu", strict=False)
    # transformers 5 fuses the routed experts into one module (no MLP blocks: left alone);
    # transformers 4 holds them as Qwen2MoeMLP blocks, which are swapped too (each its width)
    fused = not isinstance(model.model.layers[0].mlp.experts, torch.nn.ModuleList)
    shared = [e for e in report.entries if "shared_expert" in e.path]
    assert len(shared) == 2
    assert len(report.entries) == (2 if fused else 2 + 2 * 4)
    assert model.config.intermediate_size == 256


def test_a_custom_norm_class_is_named_in_the_bert_adapters_error():
    """DeBERTa v1's output norm is a ``DebertaLayerNorm``, not ``nn.LayerNorm``; the error said
    the layer lacked ``output.LayerNorm`` (review, session 20). It now names the class."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.swap import UnsupportedModelError, swap_mlp

    if not hasattr(transformers, "DebertaModel"):
        pytest.skip("transformers without DeBERTa")
    cfg = transformers.DebertaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256,
    )  # fmt: skip
    model = transformers.DebertaModel(cfg)
    norm = type(model.encoder.layer[0].output.LayerNorm).__name__
    if norm == "LayerNorm":
        pytest.skip("this transformers' DeBERTa uses nn.LayerNorm")
    with pytest.raises(
        UnsupportedModelError, match=rf"as a torch\.nn\.LayerNorm \(it is a {norm}\)"
    ):
        swap_mlp(model, "swiglu")


def test_a_chain_on_a_host_without_a_width_key_reloads_into_a_rebuilt_model():
    """BART's config has no key the swap writes for the width: a chain that left the family
    and came back (``swiglu`` then ``gelu``: 512 -> 520 at d_model 128) ended elsewhere than
    the single ``gelu`` swap of a model rebuilt from the updated config (512), so the
    documented reload failed with a size mismatch (review, session 20). The recorded width is
    now used."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.swap import swap_mlp

    cfg = transformers.BartConfig(
        vocab_size=64, d_model=128, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=512,
        decoder_ffn_dim=512, max_position_embeddings=32,
    )  # fmt: skip
    chained = transformers.BartForConditionalGeneration(copy.deepcopy(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        swap_mlp(chained, "swiglu")
        last = swap_mlp(chained, "gelu")
        rebuilt = transformers.BartForConditionalGeneration(copy.deepcopy(chained.config))
        again = swap_mlp(rebuilt, "gelu")
    assert last.entries[0].hidden_features != 512  # (the chain moved the width)
    assert again.entries[0].hidden_features == last.entries[0].hidden_features
    rebuilt.load_state_dict(chained.state_dict())  # strict


def test_a_composite_model_gets_a_record_on_its_top_config(tmp_path):
    """CLIP's blocks belong to its text and vision sub-configs, which got the swap's record;
    the saved top config had none, so the documented reload (``config.glu_probe_swap``) raised
    an AttributeError (review, session 20). The top config now names the variant and the
    sub-configs, and the reload loads every key."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.swap import swap_mlp

    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    model = transformers.CLIPModel(copy.deepcopy(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = swap_mlp(model, "swiglu")
    record = model.config.glu_probe_swap
    assert record["variant"] == "swiglu" and record["hidden"] is None
    assert record["sub_configs"] == ["text_model", "vision_model"]
    assert "glu_probe_swap" in report.config_updates
    model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    rebuilt = transformers.CLIPModel(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        swap_mlp(rebuilt, config.glu_probe_swap["variant"])
    rebuilt.load_state_dict(model.state_dict())  # strict


# ------------------------------------------------------- session 20: more timm families
def _timm_vit(**kw: Any) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    defaults: dict[str, Any] = dict(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5
    )
    defaults.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**defaults).eval()


def test_blocks_holding_their_mlp_layers_are_reported():
    """timm's ParallelScalingBlock holds its MLP as ``mlp_out_proj`` (input fused into
    ``in_proj``): with a MAP attention pool the swap changed ``attn_pool.mlp`` alone and
    reported success, every block keeping its dense GELU MLP (review, session 20)."""
    timm = pytest.importorskip("timm")
    from glu_probe.swap import UnsupportedModelError, swap_mlp

    model = timm.create_model(
        "vit_base_patch16_xp_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
        num_heads=2, num_classes=5, global_pool="map",
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 \(ParallelScalingBlock\)"):
        swap_mlp(model, "swiglu", multiple_of=2)


def test_subclasses_with_their_own_forward_are_not_swapped_as_their_base():
    """A timm ``Mlp`` subclass computing ``x + gamma * mlp(x)``, or a glu_probe block
    subclass, was swapped as the plain block: its forward and ``gamma`` dropped, outputs 0.46
    off on a same-family swap (review, session 20). They are now unrecognised blocks."""
    timm = pytest.importorskip("timm")
    from glu_probe import SwiGLU
    from glu_probe.swap import UnsupportedModelError, swap_mlp

    class ScaledMlp(timm.layers.Mlp):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.gamma = nn.Parameter(torch.full((1,), 0.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.gamma * super().forward(x)

    class Doubled(SwiGLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    for layer, variant in ((ScaledMlp, "gelu"), (Doubled, "swiglu")):
        with pytest.raises(UnsupportedModelError, match=layer.__name__):
            swap_mlp(_timm_vit(mlp_layer=layer), variant)
    swap_mlp(_timm_vit(mlp_layer=SwiGLU), "gelu")  # (the classes themselves still swap)


@pytest.mark.parametrize("which", ["rms_eps", "rms_no_affine", "layernorm2d"])
def test_an_inner_norm_is_rebuilt_with_its_class_and_settings(which):
    """The MLP's inner norm was rebuilt as ``cls(width)``: timm ``RmsNorm(eps=1e-2)`` came
    back with eps 1e-6 (a same-weights same-family swap 0.10 off), ``affine=False`` affine (a
    state dict that no longer loads), and ``LayerNorm2d`` as a plain LayerNorm (a crash at the
    first forward; review, session 20). A same-family swap holding the source weights now
    gives the same outputs."""
    timm = pytest.importorskip("timm")
    from functools import partial

    from glu_probe.swap import swap_mlp

    torch.manual_seed(0)
    if which == "layernorm2d":
        mlp = timm.layers.Mlp(
            32, 128, act_layer=nn.GELU, norm_layer=timm.layers.LayerNorm2d, use_conv=True
        )
        model, x = nn.Sequential(mlp).eval(), torch.randn(2, 32, 4, 4)
    else:
        norm = partial(timm.layers.RmsNorm, eps=1e-2, affine=which == "rms_eps")
        model = _timm_vit(norm_layer=norm, scale_mlp_norm=True)
        x = torch.randn(2, 3, 32, 32)
    old = [m for m in model.modules() if isinstance(m, timm.layers.Mlp)]
    with torch.no_grad():
        for m in old:  # a non-trivial norm state
            for p in m.norm.parameters():
                p.add_(0.3 * torch.randn_like(p))
        y0 = model(x)
    swap_mlp(model, "gelu")
    new = [m for m in model.modules() if type(m).__name__ == "MLP"]
    assert len(new) == len(old)
    for a, b in zip(old, new, strict=True):
        assert type(b.norm) is type(a.norm) and b.norm.eps == a.norm.eps
        b.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=1e-5, atol=1e-6)


def test_a_width_changed_by_align_to_is_reported_and_told():
    """``swap_mlp(..., align_to=64)``: GatedMLP rounds the resolved width (170) up to 192, and
    the report said 170 for +12.8% parameters under match="params", silently (review, session
    20). The report now gives the built width, with a warning."""
    from glu_probe.swap import swap_mlp

    model = _timm_vit()
    with pytest.warns(UserWarning, match=r"blocks\.0\.mlp 170 -> 192.*no longer match"):
        report = swap_mlp(model, "swiglu", align_to=64)
    assert [e.hidden_features for e in report.entries] == [192, 192]
    assert model.blocks[0].mlp.hidden_features == 192


def test_timm_activation_classes_have_their_names():
    """``get_act_layer("gelu")`` is timm's own GELU class, reported as ``custom:GELU``."""
    timm = pytest.importorskip("timm")
    from glu_probe.modules import activation_name

    for name, expected in (("gelu", "gelu"), ("gelu_tanh", "gelu_tanh"), ("sigmoid", "sigmoid")):
        act = timm.layers.get_act_layer(name)()
        assert activation_name(act) == expected
        x = torch.randn(50)
        ref = {
            "gelu": F.gelu(x),
            "gelu_tanh": F.gelu(x, approximate="tanh"),
            "sigmoid": x.sigmoid(),
        }
        torch.testing.assert_close(act(x), ref[expected])


# ------------------------------------------- session 20: re-review of the fixes above
def test_a_recorded_width_is_not_applied_to_a_model_of_other_sizes():
    """The record's width was applied to any block of a host without a width key: a BART built
    from a copy of a swapped config with 256-wide FFNs got the width recorded for 32 (21
    instead of 168, 8x fewer parameters; re-review, session 20). It is applied only to the
    host's own block shape the record came from."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.swap import swap_mlp

    kw = dict(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    cfg = transformers.BartConfig(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        swap_mlp(transformers.BartForConditionalGeneration(cfg), "swiglu")
        wider = copy.deepcopy(cfg)
        wider.encoder_ffn_dim = wider.decoder_ffn_dim = 256
        report = swap_mlp(transformers.BartForConditionalGeneration(wider), "swiglu")
        fresh = swap_mlp(
            transformers.BartForConditionalGeneration(
                transformers.BartConfig(**{**kw, "encoder_ffn_dim": 256, "decoder_ffn_dim": 256})
            ),
            "swiglu",
        )
    assert [e.hidden_features for e in report.entries] == [e.hidden_features for e in fresh.entries]
    assert abs(report.rel_diff) <= 0.01


def test_a_per_layer_width_list_is_left_alone_not_a_crash():
    """Gemma 3n's ``intermediate_size`` is a per-layer list: the width-key check hashed it and
    raised a TypeError after the blocks were already replaced (re-review, session 20). The list
    is left alone and the swap completes."""
    transformers = pytest.importorskip("transformers")
    from glu_probe.swap import swap_mlp

    if not hasattr(transformers, "Gemma3nTextConfig"):
        pytest.skip("transformers without Gemma 3n")
    cfg = transformers.Gemma3nTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, vocab_size=64, vocab_size_per_layer_input=64,
        hidden_size_per_layer_input=4, laurel_rank=2, altup_num_inputs=2,
        num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"],
        activation_sparsity_pattern=[0.0, 0.0], sliding_window=8, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.Gemma3nForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = swap_mlp(model, "gelu", strict=False)
    assert report.entries and cfg.intermediate_size == [32, 32]
