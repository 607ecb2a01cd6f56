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
