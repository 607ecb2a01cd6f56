"""Reload recipe of docs/modules.md on hosts whose config holds two FFN widths and no width key
that ``swap_mlp`` writes (BART, Whisper with ``encoder_ffn_dim != decoder_ffn_dim``; review,
session 26): the record gives each block's width, so a chain's state dict loads into a model
rebuilt from the updated config and gives the same logits."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from glu_probe.swap import swap_mlp  # noqa: E402

torch.set_num_threads(1)


def _bart(decoder_ffn_dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BartConfig(
        d_model=64,
        encoder_ffn_dim=256,
        decoder_ffn_dim=decoder_ffn_dim,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return transformers.BartForConditionalGeneration(config).eval()


def _whisper(decoder_ffn_dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        d_model=64,
        encoder_ffn_dim=256,
        decoder_ffn_dim=decoder_ffn_dim,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        vocab_size=100,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return transformers.WhisperForConditionalGeneration(config).eval()


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    decoder_input_ids = torch.randint(3, 100, (2, 5), generator=g)
    if isinstance(model, transformers.WhisperForConditionalGeneration):
        features = torch.randn(2, 8, 32, generator=g)  # 2 * max_source_positions frames
        return {"input_features": features, "decoder_input_ids": decoder_input_ids}
    return {
        "input_ids": torch.randint(3, 100, (2, 7), generator=g),
        "decoder_input_ids": decoder_input_ids,
    }


def _reload(model: torch.nn.Module, tmp_path) -> torch.nn.Module:
    """The documented recipe, with the config through a JSON round trip (save_pretrained)."""
    model.config.save_pretrained(tmp_path)
    config = type(model.config).from_pretrained(tmp_path)
    rebuilt = type(model)(config).eval()
    record = config.glu_probe_swap
    assert "mixed" not in record
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuild is quiet
        swap_mlp(
            rebuilt,
            record["variant"],
            match=record["match"],
            exclude=record.get("excluded"),
            strict=record.get("strict", True),
            **record.get("module_kwargs", {}),
        )
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    return rebuilt


def _widths(model: torch.nn.Module) -> dict[str, int]:
    return {
        name: m.hidden_features
        for name, m in model.named_modules()
        if isinstance(getattr(m, "hidden_features", None), int)
    }


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(model)).logits


@pytest.mark.parametrize("make", [_bart, _whisper])
@pytest.mark.parametrize("decoder_ffn_dim", [128, 256])
def test_chain_reloads_with_two_ffn_widths(make, decoder_ffn_dim, tmp_path):
    model = make(decoder_ffn_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the record describes the model
        swap_mlp(model, "swiglu", match="width")
        swap_mlp(model, "gelu")
    # swiglu keeps the widths (256, d); gelu matches the parameters, biases included:
    # 194 h = 129 h' (3 * 64 h + 2 h = 2 * 64 h' + h'): 256 -> 385.0 and 128 -> 192.5, aligned
    # to multiples of 8: 384 and 192
    enc, dec = "model.encoder.layers.0.fc1", "model.decoder.layers.0.fc1"
    assert _widths(model) == {enc: 384, dec: decoder_ffn_dim * 3 // 2}
    rebuilt = _reload(model, tmp_path)
    assert _widths(rebuilt) == _widths(model)
    assert torch.equal(_logits(rebuilt), _logits(model))
    record = model.config.glu_probe_swap
    if decoder_ffn_dim == 256:
        # one width: the record says it as before, with no per-block entries
        assert record["hidden"] == 384 and record["native_hidden"] == 256
        assert "widths" not in record
    else:
        assert record["hidden"] is None
        assert record["widths"] == {
            "model.encoder.layers.0": [256, 384],
            "model.decoder.layers.0": [128, 192],
        }


def test_three_step_chain_and_partial_swaps_reload(tmp_path):
    # swiglu by parameters (256 -> 170, 128 -> 85 at multiple_of=1), gelu back, swiglu by width:
    # each block's native width is carried through the records.
    model = _bart(128)
    swap_mlp(model, "swiglu", multiple_of=1)
    swap_mlp(model, "gelu", hidden_features=200)
    swap_mlp(model, "swiglu", match="width")
    rebuilt = _reload(model, tmp_path / "chain")
    assert set(_widths(rebuilt).values()) == {200}
    assert torch.equal(_logits(rebuilt), _logits(model))
    record = model.config.glu_probe_swap
    assert record["hidden"] == 200 and record["native_hidden"] is None
    assert record["widths"] == {
        "model.encoder.layers.0": [256, 200],
        "model.decoder.layers.0": [128, 200],
    }

    # encoder, then decoder, in two partial swaps of one variant: one record describes both
    # (it was "mixed" for the widths alone: 170 vs 85)
    model = _bart(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (multiple_of relaxed for the parameter match)
        swap_mlp(model, "swiglu", include=r".*encoder.*")
        swap_mlp(model, "swiglu", include=r".*decoder.*")
    rebuilt = _reload(model, tmp_path / "partial")  # (refuses a "mixed" record)
    assert torch.equal(_logits(rebuilt), _logits(model))
    record = model.config.glu_probe_swap
    assert "excluded" not in record
    assert record["widths"] == {
        "model.encoder.layers.0": [256, 170],
        "model.decoder.layers.0": [128, 85],
    }


def test_other_variant_left_is_still_mixed():
    # per-block widths describe blocks of the record's variant only
    model = _bart(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swap_mlp(model, "swiglu", include=r".*encoder.*")
    with pytest.warns(UserWarning, match="more than one kind"):
        swap_mlp(model, "silu", include=r".*decoder.*", match="width")
    record = model.config.glu_probe_swap
    assert record["mixed"] == {"model.encoder.layers.0": "swiglu (width 170)"}


# --- re-review, session 26: partial swaps, native widths carried, per-block alignments -------


def _bart2() -> torch.nn.Module:
    """BART with two encoder and two decoder layers (encoder_ffn_dim 256, decoder 128)."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        d_model=64,
        encoder_ffn_dim=256,
        decoder_ffn_dim=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=32,
    )
    return transformers.BartForConditionalGeneration(config).eval()


def _fresh_width(variant: str, path: str, **kwargs) -> tuple[int, int]:
    """(width, alignment) a swap of the block at ``path`` alone gives in a fresh model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = swap_mlp(_bart2(), variant, include=[path], **kwargs).entries[0]
    return entry.hidden_features, entry.multiple_of


def _swiglu_params(h: int) -> int:
    # packed up/gate layer 64 -> 2h with bias, down h -> 64 with bias
    return 64 * 2 * h + 2 * h + h * 64 + 64


def _fc_params(h: int) -> int:
    return 64 * h + h + h * 64 + 64


@pytest.mark.parametrize("match", ["width", "params"])
def test_a_partial_swap_of_a_host_block_gets_its_own_width(match, tmp_path):
    """Encoder layer 0, decoder layer 0, then encoder layer 1, one at a time: the last got the
    decoder's width (128 with match="width", 85 by parameters: -50%) from the record of the
    second swap, silently, and that record contradicted itself (hidden 85, native 256)."""
    model = _bart2()
    paths = ["model.encoder.layers.0", "model.decoder.layers.0", "model.encoder.layers.1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (multiple_of relaxed for the parameter match)
        reports = [swap_mlp(model, "swiglu", match=match, include=[p]) for p in paths]
    last = reports[2].entries[0]
    assert last.source_hidden == 256
    if match == "width":
        assert last.hidden_features == 256
    else:
        # the width a swap of that block alone gives: 3 * 64 h + 3 h + 64 = 33088 at h = 170
        assert (
            (last.hidden_features, last.multiple_of)
            == _fresh_width("swiglu", paths[2])
            == (
                170,
                2,
            )
        )
        assert last.params_after == _swiglu_params(170)
        assert last.params_before == _fc_params(256) == 33088
        assert abs(last.rel_diff) < 0.01
    assert (
        _widths(model)["model.encoder.layers.1.fc1"] == _widths(model)["model.encoder.layers.0.fc1"]
    )
    record = model.config.glu_probe_swap
    width = 256 if match == "width" else 170
    dec = 128 if match == "width" else 85
    assert record["widths"] == {
        "model.encoder.layers.0": [256, width],
        "model.decoder.layers.0": [128, dec],
        "model.encoder.layers.1": [256, width],
    }
    # one width does not describe these blocks: the record says so, not the last swap's
    assert record["hidden"] is None and record["native_hidden"] is None
    assert record["excluded"] == ["model.decoder.layers.1"]
    rebuilt = _reload(model, tmp_path)
    assert _widths(rebuilt) == _widths(model)
    assert torch.equal(_logits(rebuilt), _logits(model))


def test_a_partial_swap_does_not_take_a_width_given_by_hidden_features():
    # the record's width for blocks of native width 256 was given (100), not matched: a later
    # match="params" swap of another such block matches its own parameters
    model = _bart2()
    swap_mlp(model, "swiglu", include=["model.encoder.layers.0"], hidden_features=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = swap_mlp(model, "swiglu", include=["model.encoder.layers.1"]).entries[0]
    assert (entry.hidden_features, entry.multiple_of) == (170, 2)
    assert abs(entry.rel_diff) < 0.01


def test_a_later_partial_swap_takes_the_width_matched_for_its_native_width():
    # one width per native width, whatever this call's multiple_of (docs): 170 made with 2
    model = _bart2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swap_mlp(model, "swiglu", include=[r"model\.(en|de)coder\.layers\.0"])
    entry = swap_mlp(model, "swiglu", include=["model.encoder.layers.1"], multiple_of=1).entries[0]
    assert (entry.hidden_features, entry.multiple_of) == (170, 2)
    entry = swap_mlp(model, "swiglu", include=["model.decoder.layers.1"], multiple_of=4).entries[0]
    assert (entry.hidden_features, entry.multiple_of) == (85, 1)


@pytest.mark.parametrize(
    "steps, expected",
    [
        # swiglu everywhere, gelu on the encoder, gelu on the decoder by width: the decoder's
        # native width (128) was lost, the last record (not "mixed") had no entry for it, and
        # the recipe rebuilt it at 128 (load failed)
        (
            [
                ("swiglu", {}),
                ("gelu", {"include": r".*encoder.*"}),
                ("gelu", {"include": r".*decoder.*", "match": "width"}),
            ],
            {"model.encoder.layers.0": [256, 256], "model.decoder.layers.0": [128, 85]},
        ),
        # geglu decoder, swiglu encoder at 100, geglu decoder, geglu encoder: the encoder's
        # native width was recorded as the decoder's (128)
        (
            [
                ("geglu", {"include": r".*decoder.*"}),
                ("swiglu", {"include": r".*encoder.*", "hidden_features": 100}),
                ("geglu", {"include": r".*decoder.*"}),
                ("geglu", {"include": r".*encoder.*"}),
            ],
            {"model.encoder.layers.0": [256, 100], "model.decoder.layers.0": [128, 85]},
        ),
        # swiglu, geglu on the encoder by width (the decoder "mixed"), swiglu by width: the
        # decoder's native width was dropped with the "mixed" record
        (
            [
                ("swiglu", {}),
                ("geglu", {"include": r".*encoder.*", "match": "width"}),
                ("swiglu", {"match": "width"}),
            ],
            {"model.encoder.layers.0": [256, 170], "model.decoder.layers.0": [128, 85]},
        ),
    ],
)
def test_chains_keep_each_blocks_native_width(steps, expected, tmp_path):
    model = _bart(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant, kwargs in steps:
            swap_mlp(model, variant, **kwargs)
    record = model.config.glu_probe_swap
    assert "mixed" not in record
    assert record["widths"] == expected
    enc, dec = (expected[f"model.{p}.layers.0"][1] for p in ("encoder", "decoder"))
    assert _widths(model) == {"model.encoder.layers.0.fc1": enc, "model.decoder.layers.0.fc1": dec}
    rebuilt = _reload(model, tmp_path)
    assert _widths(rebuilt) == _widths(model)
    assert torch.equal(_logits(rebuilt), _logits(model))


def test_a_block_of_unknown_native_width_is_marked_mixed():
    # a record that does not describe a block an earlier swap built (here: its entry removed)
    model = _bart(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swap_mlp(model, "swiglu")
    del model.config.glu_probe_swap["widths"]["model.decoder.layers.0"]
    with pytest.warns(UserWarning, match="does not say the width"):
        swap_mlp(model, "gelu")
    record = model.config.glu_probe_swap
    assert record["mixed"] == {"model.decoder.layers.0": "gelu (width 128, native width unknown)"}
    assert record["widths"] == {"model.encoder.layers.0": [256, 256]}


def test_the_recipe_reports_the_alignment_each_width_was_made_with(tmp_path):
    # encoder by parameters at multiple_of 2 (8 relaxed), decoder at 1: the record's one
    # multiple_of was None, and the recipe's swap said 1 for both
    model = _bart(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = swap_mlp(model, "swiglu", include=r".*encoder.*")
        second = swap_mlp(model, "swiglu", include=r".*decoder.*")
    assert first.entries[0].multiple_of == 2 and second.entries[0].multiple_of == 1
    record = model.config.glu_probe_swap
    assert record["multiple_of"] is None
    assert record["alignments"] == {"model.encoder.layers.0": 2, "model.decoder.layers.0": 1}
    model.config.save_pretrained(tmp_path)
    config = type(model.config).from_pretrained(tmp_path)
    rebuilt = type(model)(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = swap_mlp(rebuilt, "swiglu", match=config.glu_probe_swap["match"])
    assert {e.path: (e.hidden_features, e.multiple_of) for e in report.entries} == {
        "model.encoder.layers.0": (170, 2),
        "model.decoder.layers.0": (85, 1),
    }


_CHAIN_BLOCKS = [f"model.{p}.layers.{i}" for p in ("encoder", "decoder") for i in (0, 1)]


def _random_chain(seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    steps = []
    for _ in range(rng.randint(2, 4)):
        kwargs: dict = {"variant": rng.choice(["gelu", "swiglu", "geglu", "silu"])}
        if rng.random() < 0.6:
            kwargs["include"] = rng.sample(_CHAIN_BLOCKS, rng.randint(1, 3))
        kwargs["match"] = rng.choice(["params", "params", "width"])
        kwargs["multiple_of"] = rng.choice([1, 8, 64])
        if rng.random() < 0.15:
            kwargs["hidden_features"] = rng.choice([96, 100, 200])
        steps.append(kwargs)
    return steps


@pytest.mark.parametrize("seed", range(12))
def test_random_chains_reload_or_are_marked_mixed(seed, tmp_path):
    """Every chain of partial swaps either reloads with the recipe (identical logits) or has a
    record marked "mixed" (the recipe refuses it); each block gets its own width."""
    model = _bart2()
    for kwargs in _random_chain(seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = swap_mlp(model, **kwargs)
        for e in report.entries:
            if "hidden_features" in kwargs:
                assert e.hidden_features == kwargs["hidden_features"]
            elif kwargs["match"] == "width":
                assert e.hidden_features == e.source_hidden, (kwargs, e)
            else:
                assert abs(e.rel_diff) <= 0.01, (kwargs, e)
    if "mixed" in model.config.glu_probe_swap:
        return
    rebuilt = _reload(model, tmp_path)
    assert _widths(rebuilt) == _widths(model)
    assert torch.equal(_logits(rebuilt), _logits(model))


# --- third round, session 26: alignments of re-swapped and "mixed" blocks --------------------


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def _recipe_entries(model: torch.nn.Module, tmp_path) -> dict[str, tuple[int, int]]:
    """(width, alignment) per block of the reload recipe's swap of a model rebuilt from the
    saved config (its state dict loaded, the logits checked against ``model``'s)."""
    model.config.save_pretrained(tmp_path)
    config = type(model.config).from_pretrained(tmp_path)
    rebuilt = type(model)(config).eval()
    record = config.glu_probe_swap
    assert "mixed" not in record
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = swap_mlp(
            rebuilt, record["variant"], match=record["match"], exclude=record.get("excluded")
        )
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    if isinstance(model, transformers.GPT2LMHeadModel):
        ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(rebuilt(ids).logits, model(ids).logits)
    else:
        assert torch.equal(_logits(rebuilt), _logits(model))
    return {e.path: (e.hidden_features, e.multiple_of) for e in report.entries}


@pytest.mark.parametrize("make", [_gpt2, lambda: _bart(128)])
def test_a_same_variant_reswap_keeps_the_alignment_of_its_width(make, tmp_path):
    # GPT-2 / BART encoder: 64 -> 256 -> 64 with biases, 2*64*256 + 256 + 64 = 33088 params;
    # swiglu 195 h + 64: h = 169.4, multiple of 64 -> 192. BART decoder (128): 16576 params,
    # h = 84.7 -> 64. The re-swap said (192, 1) and recorded multiple_of 1 (re-review).
    model = make()
    expected = {
        e.path: (192 if e.source_hidden == 256 else 64, 64)
        for e in swap_mlp(model, "swiglu", multiple_of=64, tolerance=None).entries
    }
    assert set(expected.values()) <= {(192, 64), (64, 64)}
    with pytest.warns(UserWarning, match="already are what this swap builds"):
        report = swap_mlp(model, "swiglu", multiple_of=64, tolerance=None)
    assert {e.path: (e.hidden_features, e.multiple_of) for e in report.entries} == expected
    assert model.config.glu_probe_swap["multiple_of"] == 64
    assert _recipe_entries(model, tmp_path) == expected


def test_the_alignment_of_a_block_listed_mixed_is_carried(tmp_path):
    # encoder 256 -> 170 (multiple_of 8 relaxed to 2: 195 h + 64 = 33088 at h = 169.4),
    # decoder 128 -> 85 (at 1); the decoder to gelu and back lists the encoder "mixed" in
    # between: its alignment was dropped, and the recipe said (170, 1) (re-review)
    model = _bart(128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = swap_mlp(model, "swiglu")
        swap_mlp(model, "gelu", include=r".*decoder.*")
        assert model.config.glu_probe_swap["alignments"]["model.encoder.layers.0"] == 2
        swap_mlp(model, "swiglu", include=r".*decoder.*")
    expected = {"model.encoder.layers.0": (170, 2), "model.decoder.layers.0": (85, 1)}
    assert {e.path: (e.hidden_features, e.multiple_of) for e in first.entries} == expected
    assert model.config.glu_probe_swap["alignments"] == {
        "model.encoder.layers.0": 2,
        "model.decoder.layers.0": 1,
    }
    assert _recipe_entries(model, tmp_path) == expected
    # and a later partial swap of the same native width takes 170 with its alignment 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _bart2()
        swap_mlp(model, "swiglu", include="model.encoder.layers.0")
        swap_mlp(model, "gelu", include=r"model\.decoder.*")
        swap_mlp(model, "swiglu", include=r"model\.decoder.*")
        late = swap_mlp(model, "swiglu", include="model.encoder.layers.1", multiple_of=1)
    assert [(e.hidden_features, e.multiple_of) for e in late.entries] == [(170, 2)]


def _clip() -> torch.nn.Module:
    torch.manual_seed(0)
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return transformers.CLIPModel(config).eval()


def _clip_logits(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits_per_image


@pytest.mark.parametrize("first", [None, "swiglu"])
def test_a_composite_model_swapped_through_a_wrapper_gets_its_top_record(first, tmp_path):
    # CLIP in a wrapper module: the top config's record was not written (the recipe's
    # config.glu_probe_swap raised AttributeError), or, after a swiglu swap of the model
    # itself, still said swiglu after geglu through the wrapper: the recipe rebuilt swiglu
    # blocks, the state dict loaded with no missing key, and the logits were wrong (re-review)
    direct = _clip()
    model = _clip()
    wrapper = torch.nn.Module()
    wrapper.net = model
    if first is not None:
        swap_mlp(model, first, match="width")
    swap_mlp(direct, "geglu", match="width")
    swap_mlp(wrapper, "geglu", match="width")
    record = model.config.glu_probe_swap
    assert record == direct.config.glu_probe_swap
    assert record["variant"] == "geglu" and record["sub_configs"] == ["text_model", "vision_model"]
    model.config.save_pretrained(tmp_path)
    config = type(model.config).from_pretrained(tmp_path)
    rebuilt = type(model)(config).eval()
    saved = config.glu_probe_swap
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_mlp(rebuilt, saved["variant"], match=saved["match"], exclude=saved.get("excluded"))
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    assert torch.equal(_clip_logits(rebuilt), _clip_logits(model))
