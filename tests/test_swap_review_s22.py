"""Session 22: a failed swap leaves the model as it was; unknown block keywords are refused."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

import glu_probe
import glu_probe.swap.core as core
from glu_probe.swap import MLPAdapter, register_adapter, registered_adapters, swap_mlp
from glu_probe.swap.core import unregister_adapter


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=3, num_heads=2
    )


def _structure(model: nn.Module) -> list[tuple[str, int, type]]:
    return [(n, id(m), type(m)) for n, m in model.named_modules()]


class _FailingInstall(MLPAdapter):
    """Delegates to the built-in adapter of a block, but its install fails on the third block
    (user code: a registered adapter's install may raise part way through a swap)."""

    name = "failing"

    def __init__(self, inner: MLPAdapter) -> None:
        self.inner, self.calls = inner, 0

    def matches(self, module: nn.Module) -> bool:
        return self.inner.matches(module)

    def describe(self, module: nn.Module):  # type: ignore[no-untyped-def]
        return self.inner.describe(module)

    def install(self, root: nn.Module, path: str, old: nn.Module, new: nn.Module) -> None:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("install failed")
        self.inner.install(root, path, old, new)


def _swap_failing_at_the_third_install(model: VisionTransformer) -> _FailingInstall:
    """Swap ``model`` to SwiGLU through a registered adapter whose third install fails; the
    error must be the install's own."""
    inner = next(a for a in registered_adapters() if a.matches(model.blocks[0].mlp))
    adapter = register_adapter(_FailingInstall(inner))
    try:
        with pytest.raises(RuntimeError, match="install failed"):
            swap_mlp(model, "swiglu", multiple_of=2)
    finally:
        unregister_adapter(adapter)
    assert isinstance(adapter, _FailingInstall)
    return adapter


def test_failed_install_restores_every_block() -> None:
    model = _vit()
    x = torch.randn(2, 1, 8, 8)
    before, out = _structure(model), model(x)
    adapter = _swap_failing_at_the_third_install(model)
    assert adapter.calls == 3  # two blocks had been installed when it failed
    assert _structure(model) == before  # (before: blocks 0 and 1 stayed SwiGLU)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    assert swap_mlp(model, "swiglu", multiple_of=2).entries  # and a later swap works


def test_failed_config_update_restores_blocks_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    before, cfg = _structure(model), dict(vars(config))

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("config update failed")

    monkeypatch.setattr(core, "_record_at_root", boom)  # after every config was written
    with pytest.raises(RuntimeError, match="config update failed"):
        swap_mlp(model, "swiglu", multiple_of=2)
    assert _structure(model) == before
    assert vars(config) == cfg  # n_inner, activation_function, no glu_probe_swap record
    assert not hasattr(config, core.RECORD_ATTR)


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"multple_of": 4}, "'multple_of' -> 'multiple_of'?"),  # swap_mlp's own keyword, misspelt
        ({"pakced": False}, "'pakced' -> 'packed'?"),  # a block keyword, misspelt
        ({"approximate": "tanh"}, "a 'swiglu' block takes"),  # another variant's setting
    ],
)
def test_swap_refuses_keywords_nothing_takes(kwargs: dict[str, object], hint: str) -> None:
    """They had been dropped with one warning per block, and the swap went ahead (a misspelt
    multiple_of swapped with the default alignment)."""
    model = _vit()
    before = _structure(model)
    with pytest.raises(TypeError, match=r"swap_mlp: .*unexpected keyword") as err:
        swap_mlp(model, "swiglu", multiple_of=2, **kwargs)
    assert hint in str(err.value)
    assert _structure(model) == before


def test_make_mlp_refuses_unknown_keywords_and_keeps_known_ones() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['approximate'\]"):
        glu_probe.make_mlp("swiglu", 4, 8, approximate="tanh")
    with pytest.raises(TypeError, match="'drp' -> 'drop'"):
        glu_probe.make_mlp("relu", 4, 8, drp=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert glu_probe.make_mlp("geglu", 4, 8, approximate="tanh").act.approximate == "tanh"
        assert glu_probe.make_mlp("gelu", 4, 8, approximate="tanh").act.approximate == "tanh"
        assert not glu_probe.make_mlp("swiglu", 4, 8, packed=False, bias=False).packed


# ---- include / exclude ----------------------------------------------------------------------
def test_exclude_and_include_pick_blocks_by_path() -> None:
    model = _vit()
    first = model.blocks[2].mlp
    report = swap_mlp(model, "swiglu", multiple_of=2, exclude=r"blocks\.2\.mlp")
    assert report.paths == ["blocks.0.mlp", "blocks.1.mlp"]
    assert report.excluded == ["blocks.2.mlp"] and model.blocks[2].mlp is first
    assert "left unchanged (include/exclude): blocks.2.mlp" in report.to_markdown()
    model = _vit()
    report = swap_mlp(model, "swiglu", multiple_of=2, include=["blocks.1.mlp"])  # a plain path
    assert report.paths == ["blocks.1.mlp"]
    assert [type(b.mlp).__name__ for b in model.blocks] == ["Mlp", "SwiGLU", "Mlp"]
    model = _vit()
    report = swap_mlp(
        model, "swiglu", multiple_of=2, include=lambda path, m: path != "blocks.0.mlp"
    )
    assert report.paths == ["blocks.1.mlp", "blocks.2.mlp"]


def test_bad_include_exclude_are_refused_before_any_change() -> None:
    model = _vit()
    before = _structure(model)
    with pytest.raises(ValueError, match="leave none of the 3 recognised"):
        swap_mlp(model, "swiglu", exclude=r"blocks\.\d\.mlp")
    with pytest.raises(ValueError, match="not a regular expression"):
        swap_mlp(model, "swiglu", include="blocks[")
    with pytest.raises(TypeError, match="include must be"):
        swap_mlp(model, "swiglu", include=3)  # type: ignore[arg-type]
    assert _structure(model) == before
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) \['block\.0\.mlp'\] match no"):
        report = swap_mlp(model, "swiglu", multiple_of=2, exclude="block.0.mlp")  # typo
    assert len(report.paths) == 3


def test_a_shared_block_is_included_or_excluded_whole() -> None:
    model = _vit()
    model.blocks[1].mlp = model.blocks[0].mlp
    with pytest.raises(ValueError, match="one module shared by these paths"):
        swap_mlp(model, "swiglu", multiple_of=2, exclude=r"blocks\.1\.mlp")


def test_partial_hf_swap_keeps_the_config_and_reloads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The config keeps describing the excluded blocks, quietly; its record names them, and the
    documented reload recipe with ``exclude=record["excluded"]`` gives identical logits."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    config = transformers.GPT2Config(
        n_embd=16, n_layer=4, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "config key not updated" warning for the asked-for part
        report = swap_mlp(model, "swiglu", multiple_of=2, exclude=r"transformer\.h\.[23]\.mlp")
    assert config.n_inner is None and config.activation_function == "gelu_new"
    assert set(report.config_skipped) == {"n_inner", "activation_function"}
    assert config.glu_probe_swap["excluded"] == ["transformer.h.2.mlp", "transformer.h.3.mlp"]
    model.save_pretrained(tmp_path)
    saved = transformers.AutoConfig.from_pretrained(tmp_path)
    rebuilt = transformers.AutoModelForCausalLM.from_config(saved)
    swap_mlp(rebuilt, saved.glu_probe_swap["variant"], exclude=saved.glu_probe_swap["excluded"])
    state = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    x = torch.randint(0, 32, (2, 8))
    torch.testing.assert_close(rebuilt.eval()(x).logits, model.eval()(x).logits, rtol=0, atol=0)


# ---- review C (session 22): the record after chained / wrapped / partial swaps -------------------
def _gpt2(n_layer: int = 3) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=16, n_layer=n_layer, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _reload(model: nn.Module, path, warn: bool = False) -> nn.Module:  # type: ignore[no-untyped-def]
    """docs/modules.md's reload recipe, word for word (save, rebuild from the saved config,
    swap as the record says, load the state dict); ``warn``: warnings may be given."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model.save_pretrained(path)
    config = transformers.AutoConfig.from_pretrained(path)
    rebuilt = transformers.AutoModelForCausalLM.from_config(config)
    record = config.glu_probe_swap
    assert "mixed" not in record
    with warnings.catch_warnings():
        warnings.simplefilter("default" if warn else "error")
        swap_mlp(
            rebuilt,
            record["variant"],
            match=record["match"],
            exclude=record.get("excluded"),
            **record.get("module_kwargs", {}),
        )
    state = safetensors_torch.load_file(f"{path}/model.safetensors")
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return rebuilt


def _same_logits(a: nn.Module, b: nn.Module) -> None:
    x = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x).logits, b.eval()(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("build", "variant", "steps", "excluded"),
    [
        # one layer at a time (the record listed the first swap's block as left out)
        (_llama, "gelu", [r".*layers\.1\.mlp", r".*layers\.2\.mlp"], ["model.layers.0.mlp"]),
        (_gpt2, "swiglu", [r".*h\.1\.mlp", r".*h\.2\.mlp"], ["transformer.h.0.mlp"]),
        # finishing the job: nothing of the host's own is left
        (_llama, "gelu", [r".*layers\.[12]\.mlp", r".*layers\.0\.mlp"], None),
    ],
)
def test_chained_partial_swaps_record_the_hosts_own_blocks_and_reload(  # type: ignore[no-untyped-def]
    build, variant, steps, excluded, tmp_path
) -> None:
    """The second swap's record listed every block it did not choose, the first swap's glu_probe
    blocks included, so the recipe left them as the host's own: missing and unexpected keys."""
    model = build()
    for pattern in steps:
        swap_mlp(model, variant, multiple_of=2, include=pattern)
    assert model.config.glu_probe_swap.get("excluded") == excluded
    assert "mixed" not in model.config.glu_probe_swap
    _same_logits(_reload(model, tmp_path), model)


def test_blocks_skipped_by_strict_false_are_recorded_as_the_hosts_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _llama()
    handle = model.model.layers[2].mlp.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="cannot be swapped"):
        swap_mlp(model, "gelu", multiple_of=2, strict=False, exclude=r"model\.layers\.0\.mlp")
    handle.remove()
    record = model.config.glu_probe_swap
    assert record["excluded"] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    _same_logits(_reload(model, tmp_path), model)


def test_a_model_of_two_variants_is_marked_mixed_and_the_recipe_warns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _gpt2()
    swap_mlp(model, "swiglu", multiple_of=2, exclude=r"transformer\.h\.0\.mlp")
    width = model.transformer.h[1].mlp.hidden_features
    with pytest.warns(UserWarning, match="more than one kind") as caught:
        swap_mlp(model, "gelu", include=r"transformer\.h\.0\.mlp")
    assert "transformer.h.1.mlp: swiglu" in str(caught[0].message)
    record = model.config.glu_probe_swap
    assert record["variant"] == "gelu" and "excluded" not in record
    assert record["mixed"] == {f"transformer.h.{i}.mlp": f"swiglu (width {width})" for i in (1, 2)}
    # the recipe does not rebuild it silently: swap_mlp says the record is marked mixed
    model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    rebuilt = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match='record is marked "mixed"'):
        swap_mlp(rebuilt, config.glu_probe_swap["variant"])


class _Wrapper(nn.Module):
    """Stands in for a LightningModule holding a Hugging Face model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def test_a_wrapped_models_record_has_paths_of_the_model_that_owns_the_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _gpt2()
    report = swap_mlp(_Wrapper(model), "swiglu", multiple_of=2, exclude=r".*h\.0\.mlp")
    assert report.excluded == ["net.transformer.h.0.mlp"]  # (the report: the wrapper's paths)
    assert model.config.glu_probe_swap["excluded"] == ["transformer.h.0.mlp"]
    _same_logits(_reload(model, tmp_path), model)


def test_a_chain_ending_with_match_width_reloads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The recipe passes the record's match, and a match="width" swap of a host whose width key
    is not written (a partial swap) takes the chain's width from the record."""
    model = _gpt2()
    swap_mlp(model, "swiglu", multiple_of=2, exclude=r"transformer\.h\.0\.mlp")
    swap_mlp(model, "gelu", match="width", exclude=r"transformer\.h\.0\.mlp")
    assert model.config.glu_probe_swap["match"] == "width"
    assert model.config.glu_probe_swap["width_key"] is None
    _same_logits(_reload(model, tmp_path), model)


def test_a_reused_recorded_width_reports_the_alignment_it_was_made_with() -> None:
    model = _gpt2()
    first = swap_mlp(model, "swiglu", include=r"transformer\.h\.1\.mlp", tolerance=None)
    second = swap_mlp(model, "swiglu", include=r"transformer\.h\.2\.mlp", multiple_of=1)
    # one width per config: the second swap keeps the first's width, and says how it was made
    assert second.entries[0].hidden_features == first.entries[0].hidden_features
    assert first.entries[0].multiple_of == 8 and second.entries[0].multiple_of == 8


class _ConfigHolder(nn.Module):
    """Exposes a Hugging Face config without being a PreTrainedModel: no rebuild check."""

    def __init__(self, config: transformers.LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList([LlamaMLP(config) for _ in range(3)])


def test_unchecked_config_keeps_the_keys_its_left_out_blocks_follow() -> None:
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2)
    model = _ConfigHolder(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = swap_mlp(model, "gelu", multiple_of=2, exclude=r"blocks\.0")
    assert (config.intermediate_size, config.hidden_act) == (32, "silu")
    assert set(report.config_skipped) == {"intermediate_size", "hidden_act"}
    assert "cannot be checked" in report.config_skipped["intermediate_size"]
    assert report.config_unchecked == {}  # nothing was written unchecked
    assert config.glu_probe_swap["excluded"] == ["blocks.0"]
    # without left-out blocks the keys are still written, unchecked, as before
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2)
    report = swap_mlp(_ConfigHolder(config), "gelu", multiple_of=2)
    assert config.hidden_act == "gelu" and "config" in report.config_unchecked


class _LazyConfig(nn.Module):
    @property
    def config(self) -> object:
        raise RuntimeError("config not loaded yet")


def test_a_module_whose_config_property_fails_does_not_break_a_swap() -> None:
    model = _vit()
    model.blocks[0].lazy = _LazyConfig()
    assert swap_mlp(model, "swiglu", multiple_of=2).paths == [f"blocks.{i}.mlp" for i in range(3)]


class _HookingInstall(_FailingInstall):
    """Its installs change a host module in place (a hook, a parametrization), then fail."""

    def __init__(self, inner: MLPAdapter, how: str) -> None:
        super().__init__(inner)
        self.how = how

    def install(self, root: nn.Module, path: str, old: nn.Module, new: nn.Module) -> None:
        norm = root.get_submodule(path.rpartition(".")[0]).norm2
        if self.how == "hook":
            norm.register_forward_pre_hook(lambda *args: None)
        else:
            nn.utils.parametrize.register_parametrization(norm, "weight", nn.Identity())
        super().install(root, path, old, new)


@pytest.mark.parametrize("how", ["hook", "parametrization"])
def test_failed_install_undoes_in_place_changes_of_host_modules(how: str) -> None:
    model = _vit()
    norm = model.blocks[0].norm2
    cls = type(norm)
    inner = next(a for a in registered_adapters() if a.matches(model.blocks[0].mlp))
    adapter = register_adapter(_HookingInstall(inner, how))
    try:
        with pytest.raises(RuntimeError, match="install failed"):
            swap_mlp(model, "swiglu", multiple_of=2)
    finally:
        unregister_adapter(adapter)
    assert not norm._forward_pre_hooks and type(norm) is cls
    assert (
        isinstance(norm._parameters["weight"], nn.Parameter)
        and "parametrizations" not in norm._modules
    )


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = glu_probe.make_mlp("gelu", 8, 32)


def _net(names: tuple[str, ...] = ("0", "1", "2")) -> nn.Module:
    net = nn.Module()
    net.layers = nn.ModuleDict({n: _Layer() for n in names})
    return net


@pytest.mark.parametrize(
    "exclude",
    [
        re.compile(r"layers\.0\.mlp"),
        {r"layers\.0\.mlp"},
        (p for p in [r"layers\.0\.mlp"]),
        [re.compile(r"layers\.0\.mlp")],
    ],
    ids=["pattern", "set", "generator", "list-of-patterns"],
)
def test_include_exclude_take_compiled_patterns_and_any_iterable(exclude: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = swap_mlp(_net(), "swiglu", multiple_of=1, exclude=exclude)  # type: ignore[arg-type]
    assert report.excluded == ["layers.0.mlp"]


def test_a_plain_path_with_regex_characters_matches_itself() -> None:
    model = _net(("mlp(a)", "b+c"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = swap_mlp(model, "swiglu", multiple_of=1, exclude=["layers.mlp(a).mlp"])
    assert report.excluded == ["layers.mlp(a).mlp"] and report.paths == ["layers.b+c.mlp"]


def test_a_block_matches_under_each_name_its_parent_gives_it() -> None:
    model = _net()
    for layer in model.layers.values():
        layer.ffn = layer.mlp  # an alias
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = swap_mlp(model, "swiglu", multiple_of=1, exclude=r"layers\.0\.ffn")
    assert report.excluded == ["layers.0.mlp"]
    assert type(model.layers["0"].ffn).__name__ == "MLP"


def test_a_callable_that_matches_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="exclude callable .* matches no recognised MLP block"):
        report = swap_mlp(_net(), "swiglu", multiple_of=1, exclude=lambda path, m: False)
    assert report.excluded == []


def test_left_out_modules_no_adapter_recognises_do_not_make_strict_raise() -> None:
    model = _vit()

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(16, 16))

    model.blocks[0].mlp = Odd()
    with pytest.raises(core.UnsupportedModelError, match="only partly recognised"):
        swap_mlp(model, "swiglu", multiple_of=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = swap_mlp(model, "swiglu", multiple_of=2, exclude=r"blocks\.0\.mlp")
    assert report.paths == ["blocks.1.mlp", "blocks.2.mlp"] and report.unrecognised == []
    model = _vit()
    model.blocks[0].mlp = Odd()
    report = swap_mlp(model, "swiglu", multiple_of=2, include=r"blocks\.2\.mlp")
    assert report.paths == ["blocks.2.mlp"]


def test_the_unknown_keyword_error_lists_only_what_swap_mlp_passes_on() -> None:
    with pytest.raises(TypeError) as err:
        swap_mlp(_vit(), "swiglu", multiple_of=2, pakced=False)
    message = str(err.value)
    assert "takes ['align_to', 'fused', 'packed']" in message
    for refused in ("bias", "device", "drop", "dtype", "norm_layer", "use_conv", "init"):
        assert f"'{refused}'" not in message
    with pytest.raises(TypeError, match=r"'relu' block takes \[\]"):
        swap_mlp(_vit(), "relu", approximate="tanh")


# ---- re-review of the rework ------------------------------------------------------------------
def test_rollback_survives_a_dict_subclass_that_refuses_update() -> None:
    """diffusers models hold a ``FrozenDict`` (``update`` raises): the rollback failed on it,
    hid the swap's own error and restored nothing."""

    class FrozenDict(dict):  # type: ignore[type-arg]
        def update(self, *a: object, **k: object) -> None:
            raise Exception("You cannot use update on a FrozenDict")

    model = _vit()
    model._internal_dict = FrozenDict(a=1)  # type: ignore[assignment]
    before = _structure(model)
    _swap_failing_at_the_third_install(model)
    assert _structure(model) == before
    assert dict(model._internal_dict) == {"a": 1}


def test_config_key_warnings_point_at_the_caller() -> None:
    """NomicBERT's ``hidden_act`` is read outside the MLPs too: the "not updated" warning
    pointed into glu_probe/swap/core.py once the config update moved one frame deeper."""
    if not hasattr(transformers, "NomicBertConfig"):
        pytest.skip("transformers without NomicBertConfig")
    config = transformers.NomicBertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=176,
        vocab_size=64, hidden_act="silu",
    )  # fmt: skip
    model = transformers.NomicBertForMaskedLM(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        swap_mlp(model, "gelu")
    ours = [w for w in caught if "not updated" in str(w.message)]
    assert ours and all(w.filename == __file__ for w in ours), [w.filename for w in ours]
