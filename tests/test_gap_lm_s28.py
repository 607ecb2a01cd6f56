"""Session 28 review: what ``GeneralizationGapMonitor`` gives its ``loss_fn`` and metrics for a
causal language model. Both routes (a module of one's own holding a Hugging Face causal LM, and
``PairedModule(causal_lm=True)``) give them the shifted predictions, logits ``(B, T-1, V)`` and
labels ``(B, T-1)``; they got the unshifted ``(B, T, V)`` / ``(B, T)`` (a Perplexity gap of the
wrong sign) and the flattened ``(N, V)`` / ``(N,)`` (Perplexity crashed). A loss or metric that
does not take them is refused at train start, not after the training steps before the first
validation. Each test failed on the code before the fix; the truth is computed by hand in
float64 on the same samples and weights."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity
from torchmetrics.wrappers import LambdaInputTransformer

from glu_probe.callbacks import GeneralizationGapMonitor, PairedModule

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

VOCAB, T = 32, 8  # (T - 1 != VOCAB: a metric reading dimension 1 as the classes is refused)


def _gpt2(seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=T, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _items(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Padded sequences of 3..8 tokens (padding labelled -100): unequal token counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        mask = (torch.arange(T) < 3 + k % 6).long()
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class LM(pl.LightningModule):
    """A module of one's own: the HF loss through ``compute_loss`` (the monitor's default)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _gpt2(0)

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.net(**inputs)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(**batch).loss

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        return self.compute_loss(batch)

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        self.log("val_loss", self.compute_loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _paired() -> PairedModule:
    return PairedModule(_gpt2(0), _gpt2(1), optimizer="sgd", lr=0.5, causal_lm=True)


def _token_acc() -> LambdaInputTransformer:
    """Token accuracy: MulticlassAccuracy wants the classes on dimension 1."""
    return LambdaInputTransformer(
        MulticlassAccuracy(num_classes=VOCAB, ignore_index=-100, average="micro"),
        transform_pred=lambda p: p.transpose(1, 2),
    )


def _fit(module: pl.LightningModule, gap: GeneralizationGapMonitor, steps: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, val_check_interval=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[gap], accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, DataLoader(_items(12, 0), batch_size=4), _val_loader())
    return trainer


def _val_loader() -> DataLoader:
    return DataLoader(_items(10, 1), batch_size=5)


def _subset() -> list[dict[str, torch.Tensor]]:
    items = _items(9, 2)
    return [DataLoader(items, batch_size=3).collate_fn(items[i : i + 3]) for i in range(0, 9, 3)]


def _by_hand(net: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-mean next-token cross-entropy (float64), its exp, and token accuracy over the
    non-ignored labels 1..T-1 of every sequence of ``batches``."""
    nll = count = correct = 0.0
    net.eval()
    with torch.no_grad():
        for b in batches:
            out = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            logits, labels = out.logits[:, :-1].double(), b["labels"][:, 1:]
            keep = labels != -100
            logp = logits.log_softmax(-1)[keep]
            nll -= float(logp.gather(1, labels[keep][:, None]).sum())
            count += float(keep.sum())
            correct += float((logits.argmax(-1)[keep] == labels[keep]).sum())
    return {"loss": nll / count, "ppl": math.exp(nll / count), "acc": correct / count}


def _check_side(history: dict[str, float], pre: str, net: Any) -> None:
    train, val = _by_hand(net, _subset()), _by_hand(net, list(_val_loader()))
    # the default loss (the module's own) is what it was: the shifted token mean
    assert history[f"{pre}train/loss"] == pytest.approx(train["loss"], rel=1e-6)
    assert history[f"{pre}val/loss"] == pytest.approx(val["loss"], rel=1e-6)
    assert history[f"{pre}train/ppl"] == pytest.approx(train["ppl"], rel=1e-5)
    assert history[f"{pre}val/ppl"] == pytest.approx(val["ppl"], rel=1e-5)
    assert history[f"{pre}ppl"] == pytest.approx(val["ppl"] - train["ppl"], abs=1e-4 * val["ppl"])
    # (torchmetrics divides in float32; the counts differ by 1/n >= 1/40)
    assert history[f"{pre}train/acc"] == pytest.approx(train["acc"], abs=1e-6)
    assert history[f"{pre}val/acc"] == pytest.approx(val["acc"], abs=1e-6)
    assert history[f"{pre}acc"] == pytest.approx(val["acc"] - train["acc"], abs=1e-6)


def test_perplexity_and_token_accuracy_gaps_of_an_own_causal_lm_module() -> None:
    """Before: Perplexity got the unshifted logits (a gap of the wrong sign in the review)."""
    gap = GeneralizationGapMonitor(
        metrics={"ppl": Perplexity(ignore_index=-100), "acc": _token_acc()},
        train_subset=_subset(),
    )
    module = LM()
    _fit(module, gap)
    _check_side(gap.history[-1], "gap/", module.net)


def test_perplexity_and_token_accuracy_gaps_of_a_causal_lm_paired_module() -> None:
    """Before: the metrics got evaluate's flattened (N, V) / (N,): Perplexity crashed."""
    gap = GeneralizationGapMonitor(
        metrics={"ppl": Perplexity(ignore_index=-100), "acc": _token_acc()},
        train_subset=_subset(),
    )
    module = _paired()
    _fit(module, gap)
    for tag, net in (("model", module.model), ("baseline", module.baseline)):
        _check_side(gap.history[-1], f"gap/{tag}/", net)


def test_a_loss_fn_gets_the_shifted_predictions() -> None:
    """Before: a flattening loss_fn scored every position against its own token."""

    def flat_ce(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(preds.flatten(0, 1), target.flatten(), ignore_index=-100)

    class NoHook(LM):
        compute_loss = None  # type: ignore[assignment]

        def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
            return self.net(**batch).loss

        def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
            pass

    gap = GeneralizationGapMonitor(loss_fn=flat_ce, train_subset=_subset())
    module = NoHook()
    _fit(module, gap)
    train, val = _by_hand(module.net, _subset()), _by_hand(module.net, list(_val_loader()))
    h = gap.history[-1]
    assert h["gap/train/loss"] == pytest.approx(train["loss"], rel=1e-6)
    assert h["gap/val/loss"] == pytest.approx(val["loss"], rel=1e-6)
    assert h["gap/loss"] == pytest.approx(val["loss"] - train["loss"], abs=1e-6)


def _per_token_ce(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(preds.transpose(1, 2), target, reduction="none")


# (A PairedModule's loss is its own: the monitor's loss_fn is not used there.)
@pytest.mark.parametrize(
    "route, case",
    [("own", "accuracy"), ("paired", "accuracy"), ("own", "cross_entropy"), ("own", "per_token")],
)
def test_a_loss_or_metric_that_does_not_take_the_format_is_refused_at_train_start(
    route: str, case: str
) -> None:
    """Before: a RuntimeError / ValueError at the first validation, after the training steps
    before it (a per-token loss: "only one element tensors can be converted")."""
    kwargs: dict[str, Any] = {
        "accuracy": {"metrics": {"acc": MulticlassAccuracy(num_classes=VOCAB, ignore_index=-100)}},
        "cross_entropy": {"loss_fn": F.cross_entropy},
        "per_token": {"loss_fn": _per_token_ce},
    }[case]
    what = "metric 'acc'" if case == "accuracy" else "loss_fn"
    module = LM() if route == "own" else _paired()
    before = copy.deepcopy(module.state_dict())
    gap = GeneralizationGapMonitor(train_subset=_subset(), **kwargs)
    trainer = None
    with pytest.raises(MisconfigurationException, match=r"checked at train start") as info:
        trainer = pl.Trainer(
            max_steps=2, val_check_interval=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[gap], accelerator="cpu",
        )  # fmt: skip
        trainer.fit(module, DataLoader(_items(12, 0), batch_size=4), _val_loader())
    message = str(info.value)
    assert message.startswith(f"GeneralizationGapMonitor: {what} fails")
    assert "(B, T-1, V)" in message and f"preds (3, {T - 1}, {VOCAB})" in message
    assert trainer is not None and trainer.global_step == 0
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("route", ["own", "paired"])
def test_the_train_start_check_leaves_training_bit_identical(route: str) -> None:
    """The check's forward (dropout on: any RNG draw would change the masks) changes nothing."""

    def run(with_gap: bool) -> dict[str, torch.Tensor]:
        pl.seed_everything(0)
        module = LM() if route == "own" else _paired()
        for net in module.modules():
            if isinstance(net, torch.nn.Dropout):
                net.p = 0.3
        gap = GeneralizationGapMonitor(metrics={"ppl": Perplexity(ignore_index=-100)})
        trainer = pl.Trainer(
            max_steps=4, val_check_interval=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[gap] if with_gap else [], accelerator="cpu",
        )  # fmt: skip
        train = DataLoader(_items(12, 0), batch_size=4, shuffle=True)
        trainer.fit(module, train, _val_loader())
        if with_gap:  # (validated at step 2, trained on after it)
            assert len(gap.history) == 1 and trainer.global_step == 4
        return module.state_dict()

    a, b = run(False), run(True)
    assert all(torch.equal(v, b[k]) for k, v in a.items())
