"""glu_probe.swap: regressions from the review of swap_mlp (silent wrong swaps).

Each test failed before its fix: blocks with more than an MLP taken as one (LLaMA-shaped and
BERT-shaped), config keys shared with non-MLP modules, wrapped / composite hosts, init
conventions, parameter-level ties, errors from ``describe`` and the placeholders' training flags.
"""

from __future__ import annotations

import copy
import math
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


def test_activation_key_only_the_mlps_read_is_updated() -> None:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    report = swap_mlp(transformers.LlamaForCausalLM(config), "gelu")
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
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=64,
        )
    ).eval()
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
