"""Session 25 review of the NTK engine's inputs and outputs (Hugging Face encoder-decoders, one
-sample probes) and of ``method="auto"`` under a memory budget: each test failed on the code
before its fix. References: float64 ``torch.func.jacrev`` Jacobians, K = J Jᵀ, ``eigvalsh``."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

from glu_probe.callbacks import NTKSpectrumMonitor
from glu_probe.ntk import ntk_spectrum

transformers = pytest.importorskip("transformers")


def _reference_kernel(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """K of the per-token pNTK rows of the logits (sum over the vocabulary / sqrt(V)), from a
    float64 jacrev Jacobian."""
    m = copy.deepcopy(model).double().eval()
    params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}

    def rows(p: dict[str, torch.Tensor]) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            y = functional_call(m, p, (), dict(inputs)).logits
        return (y.sum(-1) / math.sqrt(y.shape[-1])).reshape(-1)

    jac = jacrev(rows)(params)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], 1)
    return J @ J.T


def _reference_eigs(model: nn.Module, inputs: dict[str, torch.Tensor], keep: Any = None) -> Any:
    K = _reference_kernel(model, inputs)
    if keep is not None:
        idx = keep.reshape(-1).nonzero().squeeze(1)
        K = K[idx][:, idx]
    return torch.linalg.eigvalsh(K)


class _Items(Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class _Seq2Seq(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kw: Any) -> Any:
        return self.model(**kw)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def _bart() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


def _labelled(n: int = 8, src: int = 6, tgt: int = 5) -> list[dict[str, torch.Tensor]]:
    """Source with padding on odd samples, labels with -100 padding on even ones."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 50, (src,), generator=g)
        mask = torch.ones(src, dtype=torch.long)
        if i % 2:
            mask[4:], ids[4:] = 0, 1
        labels = torch.randint(3, 50, (tgt,), generator=g)
        if i % 2 == 0:
            labels[3:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _first_probe(model: nn.Module, items: list[dict[str, torch.Tensor]], **kw: Any) -> Any:
    monitor = NTKSpectrumMonitor(
        every_n_steps=100, method="dense", log_histogram=False, log_figure=False, probe_size=2,
        dtype=torch.float64, **kw,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(_Seq2Seq(model), DataLoader(_Items(items), batch_size=2))
    return monitor


@pytest.mark.parametrize("make", [_t5, _bart], ids=["t5", "bart"])
def test_monitor_probes_an_encoder_decoder_on_the_function_it_trains(make: Any) -> None:
    # labels were stripped: T5 failed at setup ("exactly one of input_ids or inputs_embeds"),
    # BART was probed on decoder inputs made from the shifted input_ids (lambda_max 74.85 for
    # 78.19) with its padded decoder rows kept.
    items = _labelled()
    model = make()
    init = copy.deepcopy(model)
    h = _first_probe(model, items).history[0]
    batch = {k: torch.stack([d[k] for d in items[:2]]) for k in items[0]}
    ev = _reference_eigs(init, batch, keep=batch["labels"] != -100)
    assert h["ntk/lambda_max"] == pytest.approx(ev[-1].item(), rel=1e-9)
    assert h["ntk/condition_number"] == pytest.approx((ev[-1] / ev[0]).item(), rel=1e-7)


def test_monitor_cuts_only_the_decoder_of_an_encoder_decoder() -> None:
    # The token cut took every tensor of the decoder's length: here the source too (both 6),
    # giving kappa 11.56 for the leading block's 6.10.
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(8):
        labels = torch.randint(3, 50, (6,), generator=g)
        items.append(
            {
                "input_ids": torch.randint(3, 50, (6,), generator=g),
                "attention_mask": torch.ones(6, dtype=torch.long),
                "labels": labels,
                "decoder_input_ids": torch.cat([torch.tensor([0]), labels[:-1]]),
            }
        )
    model = _t5()
    init = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = _first_probe(model, items, max_rows=4)
    assert monitor._probe_shapes == [[1, 6], [1, 6], [1, 4], [1, 4]]  # source whole
    one = {k: torch.stack([items[0][k]]) for k in ("input_ids", "attention_mask")}
    one["decoder_input_ids"] = torch.stack([items[0]["decoder_input_ids"]])
    K = _reference_kernel(init, one)  # 6 decoder rows; the causal decoder's leading block:
    lead = torch.linalg.eigvalsh(K[:4, :4])
    assert K.shape == (6, 6)
    h = monitor.history[0]
    assert h["ntk/condition_number"] == pytest.approx((lead[-1] / lead[0]).item(), rel=1e-7)


class _AuxFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.net(x)
        return y.sum(-1), y


@pytest.mark.parametrize("n", [1, 2])
def test_first_of_several_outputs_warns_for_any_batch_size(n: int) -> None:
    # Only the two-sample independence check warned: a one-sample probe (the monitor's usual
    # one for long sequences) was probed on the first tensor without a word.
    with pytest.warns(RuntimeWarning, match=rf"holds 2 tensors.*shape \({n},\) for {n} sample"):
        ntk_spectrum(_AuxFirst(), torch.randn(n, 4), method="dense")


def test_auto_takes_lanczos_where_the_budget_cannot_hold_the_dense_path() -> None:
    # auto's estimate accepted a budget that the dense path refused ("use method='lanczos'").
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)
    )
    x = torch.randn(1024, 64)
    budget = 12 * 2**20
    with pytest.raises(ValueError, match="cannot hold"):
        ntk_spectrum(model, x, method="dense", memory_budget=budget)
    auto = ntk_spectrum(model, x, method="auto", memory_budget=budget, which="largest")
    lanczos = ntk_spectrum(model, x, method="lanczos", memory_budget=budget, which="largest")
    assert auto.method == "lanczos"
    assert auto.lambda_max == pytest.approx(lanczos.lambda_max, rel=1e-6)


class _NeedsBoth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if extra is None:
            raise ValueError("You must specify extra")  # as T5 without decoder inputs
        return self.net(x + extra)


class _DictModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = _NeedsBoth()

    def forward(self, **kw: Any) -> Any:
        return self.model(**kw)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(batch["x"], batch["extra"]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_model_value_error_at_probe_setup_gets_the_probe_inputs_hint() -> None:
    # A model's ValueError on the extracted inputs ended the fit with the bare error.
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    items = [{"x": torch.randn(4), "labels": torch.randn(4)} for _ in range(4)]
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
        callbacks=[NTKSpectrumMonitor(log_histogram=False, log_figure=False)],
    )  # fmt: skip
    with pytest.raises(MisconfigurationException, match=r"You must specify extra.*probe_inputs="):
        trainer.fit(_DictModule(), DataLoader(_Items(items), batch_size=2))


def test_auto_with_dense_vectors_is_monotone_in_the_budget() -> None:
    # (Re-reviews.) Below auto's estimate it took Lanczos, between the estimate and the dense
    # path's own count it raised, above it ran dense: a larger budget must not turn a result
    # into an error. Lanczos carries its Ritz vectors.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(200, 8)
    methods = []
    for budget in (200_000, 700_000, 3_000_000):  # (n = 200: the middle one raised)
        s = ntk_spectrum(
            model, x, method="auto", memory_budget=budget, dense_vectors=True, max_matvecs=40
        )
        methods.append(s.method)
    assert methods[0] == "lanczos" and methods[-1] == "dense"
    assert methods == sorted(methods, key=["lanczos", "dense"].index)


def test_auto_fallback_warns_of_the_dtype_it_uses_only() -> None:
    # (Re-review.) The dense path's jacobian_dtype warning came before its budget refusal, so a
    # run auto moved to Lanczos warned of a jacobian_dtype it never used.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)).double()
    x = torch.randn(1024, 64, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = ntk_spectrum(
            model, x, method="auto", memory_budget=12 * 2**20, dtype=torch.float32,
            jacobian_dtype=torch.float32, which="largest",
        )  # fmt: skip
    assert s.method == "lanczos"
    texts = [str(w.message) for w in caught]
    assert not any("jacobian_dtype" in t for t in texts), texts
    assert any("ntk_spectrum: dtype" in t for t in texts), texts


def test_a_probe_is_a_snapshot_and_refuses_a_recast_after_the_model_changed() -> None:
    # (Cache review.) astype re-read the live model: after an optimizer step K came at the new
    # weights or the old by jacobian_dtype alone (0.59 relative apart).
    from glu_probe.ntk import NTKOperator, ntk_matrix
    from glu_probe.ntk.functional import ProbeFunction

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(6, 4)
    probe = ProbeFunction(m, x, dtype=torch.float32)
    before = ntk_matrix(m, x, dtype=torch.float64)
    # unchanged model: the probe re-casts, and dtype is honoured with probe= (it was ignored)
    K = ntk_matrix(None, None, probe=probe, dtype=torch.float64)
    assert K.dtype == torch.float64
    torch.testing.assert_close(K, before, rtol=1e-6, atol=0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)  # an optimizer step
    with pytest.raises(ValueError, match="changed since this probe was built"):
        ntk_matrix(None, None, probe=probe, dtype=torch.float64)
    with pytest.raises(ValueError, match="changed since this probe was built"):
        ntk_matrix(None, None, probe=probe, jacobian_dtype=torch.float64)
    op = NTKOperator(None, None, probe=probe)  # products in the probe's own dtype: the snapshot
    snapshot = op.matvec(torch.eye(6)).double()
    torch.testing.assert_close(snapshot, before, rtol=1e-5, atol=1e-6)


class _Switchable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.low = nn.Linear(4, 32), nn.Linear(32, 1), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.low:
            h = h.float()
        return self.b(torch.tanh(h).to(x.dtype))


def test_forward_rounding_memo_follows_the_models_settings() -> None:
    # (Cache review.) The memo kept a float64 verdict after the forward switched to a float32
    # cast through an attribute: the bounds were 1e9 too small and the warning went missing.
    torch.manual_seed(0)
    m = _Switchable().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    first = ntk_spectrum(m, x, method="dense")
    m.low = True
    with pytest.warns(RuntimeWarning, match="float32"):
        second = ntk_spectrum(m, x, method="dense")
    assert second.residual_max > 1e4 * first.residual_max
    m.low = False
    exact = ntk_spectrum(m, x, method="dense")
    assert abs(exact.lambda_max - second.lambda_max) <= second.residual_max


class _NanTableLazyCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("table", torch.tensor([float("nan"), 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "cache"):
            self.register_buffer("cache", torch.ones(1))  # registered on the first call
        return self.lin(x) * self.cache


def test_snapshot_check_tolerates_nan_buffers_and_buffers_added_by_forward() -> None:
    # (Re-review.) A buffer registered by the first forward broke the fast check, and the NaN
    # buffer then compared unequal to itself: a false "changed since this probe was built".
    torch.manual_seed(0)
    model, x = _NanTableLazyCache(), torch.randn(5, 4)
    s = ntk_spectrum(model, x, dtype=torch.float32, jacobian_dtype=torch.float32, method="dense")
    want = ntk_spectrum(model, x, method="dense")  # (float64 rows: no re-cast)
    assert s.lambda_max == pytest.approx(want.lambda_max, rel=1e-5)
