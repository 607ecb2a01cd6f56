"""Session 23: module keywords of a swap are kept in the config record and replayed by the
reload recipe (docs/modules.md)."""

from __future__ import annotations

import warnings

import pytest
import torch

from glu_probe import swap_mlp

transformers = pytest.importorskip("transformers")

from tests.test_swap_review_s22 import _gpt2, _reload, _same_logits  # noqa: E402


@pytest.mark.parametrize(
    ("variant", "kwargs"),
    [
        ("geglu", {"approximate": "tanh"}),
        ("swiglu", {"packed": False}),
        ("gelu", {"approximate": "tanh"}),
    ],
)
def test_module_keywords_are_recorded_and_the_recipe_replays_them(  # type: ignore[no-untyped-def]
    tmp_path, variant: str, kwargs: dict[str, object]
) -> None:
    model = _gpt2()
    if variant == "gelu":  # gated -> non-gated with a keyword of the baseline
        swap_mlp(model, "swiglu")
    swap_mlp(model, variant, **kwargs)
    assert model.config.glu_probe_swap["module_kwargs"] == kwargs
    _same_logits(model, _reload(model, tmp_path))


def test_the_recipe_without_the_keywords_warns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Before: a geglu swap with approximate="tanh" reloaded with exact-GELU blocks, the weights
    loaded and the logits differed, without a word."""
    model = _gpt2()
    swap_mlp(model, "geglu", approximate="tanh")
    model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    rebuilt = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match=r"other module keywords \(approximate='tanh' in the"):
        swap_mlp(rebuilt, config.glu_probe_swap["variant"])


def test_a_partial_swap_after_another_with_other_keywords_warns() -> None:
    model = _gpt2()
    swap_mlp(model, "swiglu", include="transformer.h.0.mlp", packed=False)
    with pytest.warns(UserWarning, match=r"packed=False in the record only"):
        swap_mlp(model, "swiglu", include="transformer.h.1.mlp")
    assert "module_kwargs" not in model.config.glu_probe_swap  # describes the last swap


def test_a_reswap_of_swapped_blocks_with_other_keywords_is_quiet() -> None:
    model = _gpt2()
    swap_mlp(model, "swiglu", packed=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_mlp(model, "swiglu")  # replaces every block: the record describes all of them
    assert "module_kwargs" not in model.config.glu_probe_swap


def test_same_keywords_are_quiet_and_json_safe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _gpt2()
    swap_mlp(model, "swiglu", fused=False, packed=True)
    record = model.config.glu_probe_swap
    assert record["module_kwargs"] == {"fused": False, "packed": True}
    model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.glu_probe_swap["module_kwargs"] == {"fused": False, "packed": True}
    rebuilt = transformers.AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_mlp(rebuilt, "swiglu", **config.glu_probe_swap["module_kwargs"])
    assert torch.equal(
        torch.tensor(sorted(p.numel() for p in rebuilt.parameters())),
        torch.tensor(sorted(p.numel() for p in model.parameters())),
    )
