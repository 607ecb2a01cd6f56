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
