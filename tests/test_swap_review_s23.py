"""Session 23: module keywords of a swap are kept in the config record and replayed by the
reload recipe (docs/modules.md)."""

from __future__ import annotations

import warnings

import pytest
import torch

from glu_probe import swap_mlp

transformers = pytest.importorskip("transformers")

from test_swap_review_s22 import _gpt2, _llama, _reload, _same_logits  # noqa: E402


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
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        swap_mlp(model, "swiglu")  # replaces every block: the record describes all of them
    assert not [r for r in rec if "other module keywords" in str(r.message)]
    assert [r for r in rec if "weights are dropped" in str(r.message)]  # (a re-swap)
    assert "module_kwargs" not in model.config.glu_probe_swap


def test_same_keywords_are_quiet_and_json_safe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _gpt2()
    swap_mlp(model, "swiglu", fused=False, packed=True)
    record = model.config.glu_probe_swap
    assert record["module_kwargs"] == {"fused": False}  # (packed=True: the default)
    model.save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert config.glu_probe_swap["module_kwargs"] == {"fused": False}
    rebuilt = transformers.AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_mlp(rebuilt, "swiglu", **config.glu_probe_swap["module_kwargs"])
    assert torch.equal(
        torch.tensor(sorted(p.numel() for p in rebuilt.parameters())),
        torch.tensor(sorted(p.numel() for p in model.parameters())),
    )


# ---- small items left alone in session 22 -------------------------------------------------------
def test_effective_rank_with_an_underflowing_ratio_is_finite() -> None:
    """[1e20, 1e-310]: the small one scaled by the largest underflows to 0, and 0·log 0 was NaN."""
    from glu_probe.ntk import effective_rank

    assert effective_rank(torch.tensor([1e20, 1e-310], dtype=torch.float64)) == 1.0
    lam = torch.tensor([1.0, 1.0, 1e-320], dtype=torch.float64)
    assert effective_rank(lam) == pytest.approx(2.0, rel=1e-15)


def test_demo_seed_check_takes_numpy_integers() -> None:
    np = pytest.importorskip("numpy")
    from glu_probe.demo import _check_seed

    got = _check_seed(np.int64(7))
    assert got == 7 and type(got) is int
    for bad in (np.float64(7.0), True, -1, 2**32, np.int64(-3)):
        with pytest.raises(ValueError, match="seed must be an integer"):
            _check_seed(bad)


# ---- review D (session 23): a float64 model probed in float32 ---------------------------------
class _Centred(torch.nn.Module):
    """A float64 model whose inputs (1e4 + 1e-2·N(0, 1)) lose 5% of their spread in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((4,), 1e4, dtype=torch.float64))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) * 100.0)


def _centred() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from glu_probe.ntk import ntk_matrix

    torch.manual_seed(0)
    model = _Centred().double()
    x = 1e4 + 1e-2 * torch.randn(16, 4, dtype=torch.float64)
    ev = torch.linalg.eigvalsh(ntk_matrix(model, x, dtype=torch.float64))
    return model, x, ev


def test_a_float64_model_is_probed_in_float64_by_default() -> None:
    """Before: float32 Lanczos products (the default) rounded the model's inputs, λ_max was 80x
    outside its residual and κ 6.6% off, converged, with no warning."""
    from glu_probe.ntk import ntk_spectrum

    model, x, ev = _centred()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = ntk_spectrum(model, x, method="lanczos")
    assert s.precision == "float64" and s.converged
    assert abs(s.lambda_max - float(ev[-1])) <= s.residual_max + 1e-12 * float(ev[-1])
    assert abs(s.condition_number / float(ev[-1] / ev[0]) - 1) < 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "lanczos", "dtype": torch.float32},
        {"method": "dense", "jacobian_dtype": torch.float32},
    ],
)
def test_a_float64_model_probed_in_float32_on_request_warns(kwargs: dict[str, object]) -> None:
    from glu_probe.ntk import ntk_spectrum

    model, x, _ = _centred()
    with pytest.warns(
        UserWarning, match="holds float64 parameters or buffers but .* rounded"
    ) as rec:
        ntk_spectrum(model, x, **kwargs)
    assert any(r.filename == __file__ for r in rec)  # points at the caller


def test_a_float32_model_keeps_float32_products_quietly() -> None:
    from glu_probe.ntk import ntk_spectrum

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = ntk_spectrum(model, torch.randn(12, 4), method="lanczos")
    assert s.precision == "float32"
    assert not [r for r in rec if "holds float64" in str(r.message)]


def test_the_monitor_probes_a_float64_model_in_float64_by_default() -> None:
    from glu_probe.callbacks import NTKSpectrumMonitor

    wide, narrow = _Centred().double(), torch.nn.Linear(3, 2)
    monitor = NTKSpectrumMonitor()
    assert monitor._dtype_for(wide) == torch.float64
    assert monitor._dtype_for(narrow) == torch.float32
    assert NTKSpectrumMonitor(dtype="float32")._dtype_for(wide) == torch.float32


# ---- review C (session 23) ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["parametrize", "weight_norm"])
def test_a_parametrized_gpt2_layer_is_refused_for_its_parametrization(how: str) -> None:
    """Its class becomes ``ParametrizedConv1D``, which the GPT-2 adapter did not match: the block
    was refused as unrecognised, with advice to write an adapter."""
    from torch.nn.utils import parametrize

    from glu_probe.swap import UnsupportedModelError

    model = _gpt2()
    if how == "parametrize":

        class Scale(torch.nn.Module):
            def forward(self, w: torch.Tensor) -> torch.Tensor:
                return w * 2

        parametrize.register_parametrization(model.transformer.h[1].mlp.c_fc, "weight", Scale())
    else:
        torch.nn.utils.parametrizations.weight_norm(model.transformer.h[1].mlp.c_proj)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"adapter 'hf_gpt2': it has parametrizations"):
        swap_mlp(model, "swiglu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_hook_on_a_kept_bert_layernorm_does_not_see_the_form_check() -> None:
    model = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            vocab_size=40,
        )
    )  # fmt: skip
    calls: list[tuple[int, ...]] = []
    norm = model.encoder.layer[0].output.LayerNorm
    handle = norm.register_forward_hook(lambda m, a, o: calls.append(tuple(o.shape)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swap_mlp(model, "swiglu")
    assert calls == []  # was two calls on (2, 3, 32) random tensors
    assert model.encoder.layer[0].output.LayerNorm is norm
    model(torch.randint(0, 40, (1, 5)))
    assert calls == [(1, 5, 32)]  # the hook survives and still fires
    handle.remove()
    model(torch.randint(0, 40, (1, 5)))
    assert len(calls) == 1


def test_a_same_kind_swap_warns_that_it_drops_the_weights() -> None:
    model = _llama()
    with pytest.warns(UserWarning, match=r"3 block\(s\) already are what this swap builds"):
        swap_mlp(model, "swiglu")
    with pytest.warns(UserWarning, match="their weights are dropped"):
        swap_mlp(model, "swiglu")  # a re-swap of glu_probe blocks re-initialises them too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_mlp(model, "gelu", match="width")  # another kind: quiet


def test_a_refused_keyword_comes_before_any_width_warning() -> None:
    from glu_probe.swap import swap_mlp as swap

    for kwargs in ({"multple_of": 4}, {"bias": False}):
        model = _gpt2()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            with pytest.raises(TypeError):
                swap(model, "swiglu", **kwargs)
        assert [str(r.message) for r in rec] == []


# ---- re-review (session 23) of the fixes above --------------------------------------------------
class _MixedPrecision(torch.nn.Module):
    """A float64 first layer (fed inputs 1e4 + 1e-2·N(0, 1)) before a float32 head."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((4,), 1e4, dtype=torch.float64))
        self.a = torch.nn.Linear(4, 32).double()
        self.b = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a((x - self.mean) * 100.0).float())


@pytest.mark.parametrize("params", [None, "b"])
def test_a_model_with_float64_parts_warns_that_the_probe_rounds_them(params: str | None) -> None:
    """Before: no word, with λ_max 390x (230x with params="b") outside its residual. Such a
    model casts between its parts, so the probe (one dtype) stays float32 and says so."""
    from glu_probe.ntk import ntk_spectrum

    torch.manual_seed(0)
    model = _MixedPrecision()
    x = 1e4 + 1e-2 * torch.randn(16, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="holds float64 parameters or buffers .* where the model"):
        s = ntk_spectrum(model, x, method="lanczos", params=params)
    assert s.precision == "float32"


def test_the_operator_warns_when_asked_for_float32_on_a_float64_model() -> None:
    from glu_probe.ntk import NTKOperator

    model, x, _ = _centred()
    with pytest.warns(UserWarning, match="NTKOperator: dtype=torch.float32 probes it") as rec:
        op = NTKOperator(model, x, dtype=torch.float32)
    assert any(r.filename == __file__ for r in rec)
    assert op.dtype == torch.float32
    assert NTKOperator(model, x).dtype == torch.float64


def test_other_conv1d_subclasses_stay_unmatched() -> None:
    """The parametrized-layer fix matched every Conv1D subclass: one with its own forward, or
    LoRA-like extra parameters, was swapped (its behaviour and parameters lost)."""
    from transformers.pytorch_utils import Conv1D

    from glu_probe.swap import UnsupportedModelError

    class Doubled(Conv1D):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = _gpt2()
    old = model.transformer.h[1].mlp.c_fc
    new = Doubled(old.nf, old.nx)
    new.load_state_dict(old.state_dict())
    model.transformer.h[1].mlp.c_fc = new
    with pytest.raises(UnsupportedModelError, match="only partly recognised"):
        swap_mlp(model, "swiglu")


def test_a_partial_swap_after_another_warns_that_it_drops_same_kind_weights() -> None:
    model = _llama()
    with pytest.warns(UserWarning, match="their weights are dropped"):
        swap_mlp(model, "swiglu", exclude=["model.layers.1.mlp"])
    with pytest.warns(UserWarning, match=r"1 block\(s\) already are .*model.layers.1.mlp"):
        swap_mlp(model, "swiglu", include=["model.layers.1.mlp"])


def test_a_chain_of_two_layouts_is_marked_mixed() -> None:
    """packed=False then the packed default: other state-dict keys, so the record (one kind)
    does not describe the first; it was not marked and the recipe's load failed."""
    model = _gpt2()
    swap_mlp(model, "swiglu", include="transformer.h.0.mlp", packed=False)
    with pytest.warns(UserWarning, match="more than one kind"):
        swap_mlp(model, "swiglu", include="transformer.h.1.mlp")
    assert "transformer.h.0.mlp" in model.config.glu_probe_swap["mixed"]


def test_a_keyword_at_its_default_is_not_recorded_and_does_not_warn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _gpt2()
    swap_mlp(model, "swiglu", include="transformer.h.0.mlp", packed=True)
    assert "module_kwargs" not in model.config.glu_probe_swap
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        swap_mlp(model, "swiglu", include="transformer.h.1.mlp")
    assert not [r for r in rec if "module keywords" in str(r.message)]
    model = _gpt2()
    swap_mlp(model, "geglu", approximate="none", fused=None)
    assert "module_kwargs" not in model.config.glu_probe_swap
    _same_logits(model, _reload(model, tmp_path))


# ---- review F (session 23): activation checkpointing in the probed model ------------------------
def test_a_timm_vit_with_grad_checkpointing_is_probed_as_without() -> None:
    """Before: torch.func's "don't yet support saved tensor hooks" ended the fit at the first
    probe."""
    timm = pytest.importorskip("timm")
    from glu_probe.ntk import ntk_spectrum

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2
    )
    x = torch.randn(6, 1, 8, 8)
    plain = ntk_spectrum(vit, x, method="dense")
    vit.set_grad_checkpointing(True)
    got = ntk_spectrum(vit, x, method="dense")
    assert vit.grad_checkpointing is True  # given back
    assert got.condition_number == pytest.approx(plain.condition_number, rel=1e-12)


def test_a_hf_model_with_gradient_checkpointing_is_probed_and_keeps_its_hooks() -> None:
    """Before: transformers' make_inputs_require_grads hook called requires_grad_() inside the
    transform (a RuntimeError at the first probe)."""
    from glu_probe.ntk import ntk_spectrum

    model = _gpt2()
    x = torch.randint(0, 32, (3, 8))
    plain = ntk_spectrum(model, x, method="dense")
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()  # (the hook; transformers may register it already)
    emb = model.get_input_embeddings()
    seen: list[int] = []
    emb.register_forward_hook(lambda m, a, o: seen.append(1))  # after HF's: order kept
    before = list(emb._forward_hooks.items())
    flags = {
        n: m.gradient_checkpointing
        for n, m in model.named_modules()
        if hasattr(m, "gradient_checkpointing")
    }
    got = ntk_spectrum(model, x, method="dense")
    assert got.condition_number == pytest.approx(plain.condition_number, rel=1e-9)
    assert list(emb._forward_hooks.items()) == before
    assert flags == {
        n: m.gradient_checkpointing
        for n, m in model.named_modules()
        if hasattr(m, "gradient_checkpointing")
    }
    assert any(flags.values())
    model.train()
    model(x).logits.sum().backward()  # training with checkpointing still works
    assert seen


def test_an_unconditional_checkpoint_call_gets_a_clear_error() -> None:
    from torch.utils.checkpoint import checkpoint

    from glu_probe.ntk import ntk_spectrum

    class Always(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.fc, x, use_reentrant=False)

    with pytest.raises(RuntimeError, match=r"checkpointing .* make it conditional"):
        ntk_spectrum(Always(), torch.randn(4, 3), method="dense")


# ---- review F (session 23): the gap monitor's weights for a causal LM ---------------------------
def _lm_run(  # type: ignore[no-untyped-def]
    tmp_path, causal_lm: bool | None, net=None, last_one_label: bool = False
) -> tuple[list[float], list[float], list[float]]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from glu_probe.callbacks import GeneralizationGapMonitor

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net() if net is not None else _gpt2(2)

        def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.net(**batch).loss

        def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
            return self.compute_loss(batch)

        def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
            self.log("val_loss", self.compute_loss(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    items = []
    for k in range(12):  # padded sequences of 3..8 tokens: batches of unequal token counts
        ids = torch.randint(1, 32, (8,), generator=g)
        n = 3 + k % 6
        mask = (torch.arange(8) < n).long()
        labels = ids.masked_fill(mask == 0, -100)
        if last_one_label and k < 2:  # (the reversed val set's last batch: items 1 and 0)
            labels = labels.masked_fill(torch.arange(8) > 0, -100)
        items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    train = DataLoader(items, batch_size=4)
    val = DataLoader(items[::-1], batch_size=5)
    module, gap = LM(), GeneralizationGapMonitor(causal_lm=causal_lm, seed=0)
    pl.Trainer(
        max_steps=3, val_check_interval=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[gap],
    ).fit(module, train, val)  # fmt: skip
    module.eval()
    sums = {"shifted": [0.0, 0.0], "unshifted": [0.0, 0.0]}
    with torch.no_grad():
        for b in val:
            loss = float(module.compute_loss(b))
            if loss != loss:  # (no terms in the batch: HF's mean is NaN)
                continue
            for key, w in (
                ("shifted", (b["labels"][:, 1:] != -100).sum()),
                ("unshifted", (b["labels"] != -100).sum()),
            ):
                sums[key][0] += loss * float(w)
                sums[key][1] += float(w)
    return (
        [h["gap/val/loss"] for h in gap.history],
        [sums["shifted"][0] / sums["shifted"][1]],
        [sums["unshifted"][0] / sums["unshifted"][1]],
    )


def test_the_gap_of_a_causal_lm_is_a_mean_over_its_shifted_tokens(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Before: weighed by the unshifted labels, one token too many per sequence (a 1e-3 error
    on a 0.1 gap in the review's run)."""
    got, shifted, unshifted = _lm_run(tmp_path, None)
    assert got == pytest.approx(shifted, rel=1e-12) and got != pytest.approx(unshifted, rel=1e-6)
    got, shifted, unshifted = _lm_run(tmp_path, False)  # (labels shifted in the data)
    assert got == pytest.approx(unshifted, rel=1e-12)


def test_the_gap_monitor_refuses_a_non_bool_causal_lm() -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from glu_probe.callbacks import GeneralizationGapMonitor

    with pytest.raises(MisconfigurationException, match="causal_lm must be True, False or None"):
        GeneralizationGapMonitor(causal_lm="yes")  # type: ignore[arg-type]


def _xlnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.XLNetLMHeadModel(
        transformers.XLNetConfig(vocab_size=32, d_model=16, n_layer=1, n_head=2, d_inner=32)
    )


def test_the_gap_of_an_lm_whose_loss_does_not_shift_keeps_the_unshifted_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """XLNetLMHeadModel's loss does not shift: auto-detection by "LMHeadModel" weighed it by
    the shifted labels (re-review, session 23)."""
    got, shifted, unshifted = _lm_run(tmp_path, None, net=_xlnet)
    assert got == pytest.approx(unshifted, rel=1e-12) and got != pytest.approx(shifted, rel=1e-6)


def test_a_causal_lm_inside_an_encoder_decoder_is_not_taken_for_the_model() -> None:
    from glu_probe.callbacks.gap import _holds_causal_lm

    enc = transformers.BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=32,
    )
    dec = transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=32, add_cross_attention=True, is_decoder=True
    )
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    both = transformers.EncoderDecoderModel(config=config)
    assert not _holds_causal_lm(both) and _holds_causal_lm(both.decoder)
    assert _holds_causal_lm(torch.nn.ModuleDict({"lm": _gpt2(1), "head": torch.nn.Linear(2, 2)}))


def test_a_batch_with_no_terms_after_the_shift_adds_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """HF's mean over no terms is NaN: 0 x NaN made the whole validation side NaN (no gap)."""
    got, shifted, _ = _lm_run(tmp_path, None, last_one_label=True)
    assert got == pytest.approx(shifted, rel=1e-12)


def test_class_targets_of_a_module_holding_an_lm_are_not_shifted() -> None:
    from glu_probe.callbacks.gap import _token_labels

    ids = torch.randint(0, 32, (4, 8))
    assert _token_labels({"input_ids": ids, "labels": ids}, ids)
    assert not _token_labels({"input_ids": ids, "labels": ids[:, :1]}, ids[:, :1])  # (B, 1)
    assert not _token_labels((torch.randn(4, 8), ids), ids)  # float inputs: not token ids
    assert not _token_labels({"input_ids": ids}, torch.randint(0, 2, (4, 3)))  # multi-label


def test_a_one_shot_hook_removed_during_the_probe_stays_removed() -> None:
    from glu_probe.ntk import ntk_spectrum

    model = _gpt2()
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    emb = model.get_input_embeddings()
    calls: list[int] = []

    def once(m: torch.nn.Module, a: object, o: torch.Tensor) -> None:
        calls.append(1)
        handle.remove()

    hf_hooks = list(emb._forward_hooks.items())
    handle = emb.register_forward_hook(once)
    ntk_spectrum(model, torch.randint(0, 32, (2, 8)), method="dense")
    assert len(calls) == 1
    model.eval()(torch.randint(0, 32, (1, 8)))
    assert len(calls) == 1  # was revived by the restore, and fired again
    assert list(emb._forward_hooks.items()) == hf_hooks and hf_hooks


def test_the_operator_warns_by_default_on_a_model_of_float64_and_float32_parts() -> None:
    from glu_probe.ntk import NTKOperator

    with pytest.warns(UserWarning, match="holds float64 parameters or buffers") as rec:
        op = NTKOperator(_MixedPrecision(), 1e4 + torch.randn(4, 4, dtype=torch.float64))
    assert op.dtype == torch.float32 and any(r.filename == __file__ for r in rec)


# ---- review H (session 23): split-autograd under autocast ---------------------------------------
@pytest.mark.parametrize("layout", ["auto", "split-autograd"])
def test_split_autograd_under_autocast_is_timms_swiglu_bit_for_bit(layout: str) -> None:
    """A non-leaf input (what a norm layer hands the block) under CPU bf16 autocast: x was cast
    once for both GEMMs, so its two gradient halves were summed in bf16, where timm's two
    Linear layers each cast x and sum the halves in float32 (0 of 5 trials bit-equal before)."""
    timm_layers = pytest.importorskip("timm.layers")
    from glu_probe.convert import from_timm_swiglu
    from glu_probe.gated_product import fused_gated_mlp
    from glu_probe.modules import SwiGLU

    torch.manual_seed(0)
    t = timm_layers.SwiGLU(64, 128, bias=True)
    ours = SwiGLU(64, 128, fused=True)
    ours.load_state_dict(from_timm_swiglu(t.state_dict()))
    x0 = torch.randn(4, 16, 64, requires_grad=True)
    dy = torch.randn(4, 16, 64)
    outs = []
    for block in (ours, t):
        x0.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = x0 * 1.0  # (non-leaf)
            if block is ours and layout != "auto":
                f = ours.fc1
                y = fused_gated_mlp(
                    x, f.weight, f.bias, ours.fc2.weight, ours.fc2.bias, "silu", True, layout=layout
                )
            else:
                y = block(x)
        y.backward(dy.to(y.dtype))
        outs.append((y.detach(), x0.grad.clone()))
    assert outs[0][0].dtype == outs[1][0].dtype == torch.bfloat16
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(ours.fc1.weight.grad, torch.cat([t.fc1_g.weight.grad, t.fc1_x.weight.grad]))


@pytest.mark.parametrize(
    ("weights", "autocast"),
    [
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float16),
    ],
)
def test_split_autograd_with_16_bit_weights_under_the_other_16_bit_autocast(
    weights: torch.dtype, autocast: torch.dtype
) -> None:
    """bf16 weights under fp16 autocast, backward inside the autocast block: the packed weight
    was split before autocast cast it, and the split's backward (a cat of two bf16 halves) failed
    in autocast's dtype check (re-review, session 23); timm's SwiGLU runs, and so does this."""
    timm_layers = pytest.importorskip("timm.layers")
    from glu_probe.convert import from_timm_swiglu
    from glu_probe.modules import SwiGLU

    torch.manual_seed(0)
    t = timm_layers.SwiGLU(16, 24, bias=True).to(weights)
    ours = SwiGLU(16, 24, fused=True, dtype=weights)
    ours.load_state_dict(from_timm_swiglu(t.state_dict()))
    x0 = torch.randn(3, 5, 16, requires_grad=True)
    got = []
    for block in (ours, t):
        x0.grad = None
        with torch.autocast("cpu", dtype=autocast):
            y = block(x0 * 1.0)
            y.float().sum().backward()
        got.append((y.detach(), x0.grad.clone()))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    assert ours.fc1.weight.grad.dtype == weights
    assert torch.equal(ours.fc1.weight.grad, torch.cat([t.fc1_g.weight.grad, t.fc1_x.weight.grad]))


# ---- session 23: padded tokens' rows are left out of K -----------------------------------------
def _padded_gpt2_batch(side: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, 64, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    if side == "right":
        mask[1, 6:] = 0
    else:
        mask[1, :10] = 0
    return model, {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_tokens_rows_are_left_out_of_the_spectrum(side: str) -> None:
    """Before: the 10 padded tokens' rows were part of K (κ 300 instead of 121 with right
    padding, 462 instead of 85 with left padding)."""
    from glu_probe.ntk import ntk_matrix, ntk_spectrum

    model, batch = _padded_gpt2_batch(side)
    K = ntk_matrix(model, batch, dtype=torch.float64)  # every row (ntk_matrix keeps them)
    keep = batch["attention_mask"].reshape(-1).bool()
    truth = torch.linalg.eigvalsh(K[keep][:, keep])
    every = torch.linalg.eigvalsh(K)
    kappa = float(truth[-1] / truth[0])
    dense = ntk_spectrum(model, batch, method="dense")
    assert dense.n_rows == 22 and dense.eigenvalues is not None
    torch.testing.assert_close(dense.eigenvalues, truth, rtol=1e-9, atol=1e-12 * float(truth[-1]))
    lanczos = ntk_spectrum(model, batch, method="lanczos", dtype=torch.float64)
    assert lanczos.n_rows == 22 and lanczos.condition_number == pytest.approx(kappa, rel=1e-6)
    kept = ntk_spectrum(model, batch, method="dense", drop_padding=False)
    assert kept.n_rows == 32
    assert kept.condition_number == pytest.approx(float(every[-1] / every[0]), rel=1e-9)
    assert kept.condition_number > 2 * kappa  # what the padded rows did to κ


def test_drop_padding_leaves_unpadded_and_non_token_probes_alone() -> None:
    from glu_probe.ntk import ntk_spectrum

    model, batch = _padded_gpt2_batch("right")
    full = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    a = ntk_spectrum(model, full, method="dense")
    b = ntk_spectrum(model, full, method="dense", drop_padding=False)
    assert a.n_rows == b.n_rows == 32 and a.condition_number == b.condition_number
    # output="full": rows per token and vocabulary entry, kept whole (documented)
    assert ntk_spectrum(model, batch, method="dense", output="full").n_rows == 32 * 64
    with pytest.raises(ValueError, match="drop_padding must be a bool"):
        ntk_spectrum(model, batch, drop_padding="yes")  # type: ignore[arg-type]


def test_an_encoder_decoders_rows_follow_the_decoder_mask_not_the_encoders() -> None:
    """A T5 whose decoder length equals the encoder's: the encoder's padding dropped real
    decoder rows (re-review, session 23)."""
    from glu_probe.ntk import ntk_spectrum

    model = _t5()
    ids = torch.randint(1, 32, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    dec = torch.randint(1, 32, (2, 6))
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    assert ntk_spectrum(model, batch, method="dense").n_rows == 12  # no decoder row is padding
    dec_mask = torch.ones(2, 6, dtype=torch.long)
    dec_mask[0, 4:] = 0
    batch["decoder_attention_mask"] = dec_mask
    assert ntk_spectrum(model, batch, method="dense").n_rows == 10


def test_a_probe_of_padding_only_is_refused() -> None:
    from glu_probe.ntk import ntk_spectrum

    model, batch = _padded_gpt2_batch("right")
    only = {
        "input_ids": batch["input_ids"][1:, 8:],
        "attention_mask": batch["attention_mask"][1:, 8:],
    }
    with pytest.raises(ValueError, match="every token of the probe batch is padding"):
        ntk_spectrum(model, only, method="dense")
    assert ntk_spectrum(model, only, method="dense", drop_padding=False).n_rows == 8


def test_split_autograd_keeps_a_float64_bias_under_autocast() -> None:
    """The weight cast before the split turned a float64 b1 into None (re-review, session 23)."""
    from glu_probe.gated_product import _plain, fused_gated_mlp

    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64)
    w1 = torch.randn(12, 8, dtype=torch.float64)
    b1 = torch.full((12,), 5.0, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(8, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_gated_mlp(x, w1, b1, w2, None, "silu", True, layout="split-autograd")
    torch.testing.assert_close(y, _plain(x, w1, b1, w2, None, "silu", True), rtol=0, atol=1e-12)
    y.sum().backward()
    assert b1.grad is not None


def _t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=32,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config).eval()


def test_a_wrapped_encoder_decoder_fed_labels_masks_its_decoder_rows_by_the_labels() -> None:
    """A module holding a T5 (no config of its own) with labels instead of decoder_input_ids:
    the encoder's mask was applied to the decoder's rows (re-review, session 23)."""
    from glu_probe.ntk.functional import ProbeFunction

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t5 = _t5()

        def forward(self, **batch: torch.Tensor) -> torch.Tensor:
            return self.t5(**batch).logits

    ids = torch.randint(1, 32, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    labels = torch.randint(1, 32, (2, 6))
    labels[0, 4:] = -100
    probe = ProbeFunction(Wrapper(), {"input_ids": ids, "attention_mask": mask, "labels": labels})
    keep = probe.padding_keep()
    assert keep is not None and keep.tolist() == (labels != -100).reshape(-1).tolist()


def test_an_encoder_alone_is_masked_by_its_attention_mask() -> None:
    """BART's encoder shares the encoder-decoder config: the decoder rule (no decoder mask:
    keep every row) had kept its padded rows."""
    from glu_probe.ntk.functional import ProbeFunction

    config = transformers.BartConfig(
        vocab_size=32,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=16,
    )
    encoder = transformers.BartModel(config).get_encoder().eval()
    ids = torch.randint(3, 32, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 3:] = 0
    probe = ProbeFunction(encoder, {"input_ids": ids, "attention_mask": mask})
    keep = probe.padding_keep()
    assert keep is not None and int(keep.sum()) == 10


def _frozen_lm():  # type: ignore[no-untyped-def]
    """A LightningModule of a one-layer GPT-2 on dict batches, with a zero learning rate."""
    import lightning.pytorch as pl

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _gpt2(1)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.net(input_ids=input_ids, attention_mask=attention_mask).logits

        def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
            return self(**batch).float().pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return LM()


def _two_step_trainer(monitor: object):  # type: ignore[no-untyped-def]
    """A quiet two-step Trainer with ``monitor`` as its only callback."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )


def test_the_monitor_skips_a_probe_it_cut_to_padding_only() -> None:
    """Its max_rows cut keeps a sequence's first tokens: with left padding, all padding. The
    ValueError ended the fit at step 0; the probe is skipped with a warning now."""
    from torch.utils.data import DataLoader

    from glu_probe.callbacks import NTKSpectrumMonitor
    from glu_probe.callbacks.ntk import NTKProbeWarning

    ids = torch.randint(1, 32, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[:, :5] = 0  # left padding: the first 5 tokens of every sequence
    items = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask, strict=True)]
    monitor = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=1, max_rows=4, log_figure=False, log_histogram=False
    )
    trainer = _two_step_trainer(monitor)
    with pytest.warns(NTKProbeWarning, match="every token of the probe batch is padding"):
        trainer.fit(_frozen_lm(), DataLoader(items, batch_size=4))
    assert trainer.global_step == 2 and monitor.history == []


def test_an_encoder_run_alone_inside_a_wrapper_of_a_whole_t5_follows_its_attention_mask() -> None:
    """The wrapper holds the whole T5 but runs its encoder: taken for the decoder, its padded
    rows were kept, and labels all -100 raised (review, session 23)."""
    from glu_probe.ntk import ntk_spectrum

    class EncoderOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t5 = _t5()

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            labels: torch.Tensor | None = None,
        ) -> torch.Tensor:
            return self.t5.get_encoder()(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state

    ids = torch.randint(1, 32, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    model = EncoderOnly().eval()
    assert (
        ntk_spectrum(model, {"input_ids": ids, "attention_mask": mask}, method="dense").n_rows == 10
    )
    labels = torch.full((2, 6), -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert ntk_spectrum(model, batch, method="dense").n_rows == 10


def test_an_iterable_loader_of_batches_padded_to_different_lengths_probes_the_first() -> None:
    """Batches padded batch by batch (T = 6, then 8): joining them for the probe raised "Sizes
    of tensors must match" at train start (review, session 23)."""
    from torch.utils.data import DataLoader, IterableDataset

    from glu_probe.callbacks import NTKSpectrumMonitor

    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            g = torch.Generator().manual_seed(0)
            for t in (6, 8, 6, 8):
                ids = torch.randint(1, 32, (2, t), generator=g)
                yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    monitor = NTKSpectrumMonitor(
        every_n_steps=1, probe_size=4, max_rows=None, log_figure=False, log_histogram=False
    )
    trainer = _two_step_trainer(monitor)
    with pytest.warns(UserWarning, match="differ in shape beyond the batch dimension"):
        trainer.fit(_frozen_lm(), DataLoader(Stream(), batch_size=None))
    assert monitor.history  # probed, on the first batch's 2 sequences of 6 tokens:
    assert [2, 6] in monitor._probe_shapes
