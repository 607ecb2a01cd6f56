"""Session 22: a failed swap leaves the model as it was; unknown block keywords are refused."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer
from torch import nn

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


def test_failed_install_restores_every_block() -> None:
    model = _vit()
    x = torch.randn(2, 1, 8, 8)
    before, out = _structure(model), model(x)
    inner = next(a for a in registered_adapters() if a.matches(model.blocks[0].mlp))
    adapter = register_adapter(_FailingInstall(inner))
    try:
        with pytest.raises(RuntimeError, match="install failed"):
            swap_mlp(model, "swiglu", multiple_of=2)
    finally:
        unregister_adapter(adapter)
    assert adapter.calls == 3  # two blocks had been installed when it failed
    assert _structure(model) == before  # (before: blocks 0 and 1 stayed SwiGLU)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    assert swap_mlp(model, "swiglu", multiple_of=2).entries  # and a later swap works


def test_failed_config_update_restores_blocks_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    before, cfg = _structure(model), dict(vars(config))

    def boom(*args: object) -> None:
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
