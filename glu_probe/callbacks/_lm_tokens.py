"""A causal language model's token layout, as the monitor reads it: whether a module holds a
Hugging Face causal LM whose loss shifts its labels, whether a target is such labels (integer
``(B, T)``, the shape of the batch's token ids), and the next-token shift that gives ``loss_fn``
and the metrics logits ``(B, T-1, V)`` and labels ``(B, T-1)`` on every route (a
``PairedModule``'s flattened ones given back their batch dimension). Kept apart from the monitor
because it is one separate job, the token layout, that takes batches and tensors only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from glu_probe.callbacks.paired import PairedModule, _split_batch


def _int_tokens(target: Any) -> bool:
    """Whether ``target`` has the layout of token labels: ``(batch, tokens)`` class indices,
    ``tokens > 1`` (a classifier's ``(batch, 1)`` target is not: re-review, session 23)."""
    return (
        isinstance(target, torch.Tensor)
        and target.dim() == 2
        and target.shape[1] > 1
        and not target.is_floating_point()
        and not target.is_complex()
    )


def _token_ids(batch: Any) -> Any:
    """The batch's token ids, where its layout shows them: ``batch["input_ids"]``, the inputs
    of an ``(inputs, target)`` batch, or their ``"input_ids"`` where the inputs are a mapping
    (``({"input_ids", "attention_mask"}, labels)``: missed before, so these batches went
    unshifted; re-review, session 28). ``None`` elsewhere."""
    if isinstance(batch, Mapping):
        return batch.get("input_ids")
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        return first.get("input_ids") if isinstance(first, Mapping) else first
    return None


def _token_labels(batch: Any, target: Any) -> bool:
    """Whether ``target`` is a language model's next-token labels: ``(batch, tokens)`` class
    indices of the shape of the batch's token ids (see :func:`_token_ids`), Hugging Face's
    ``labels=input_ids`` convention; not a classifier's ``(batch, 1)`` or multi-label targets
    (re-review, session 23: a ``(B, 1)`` target of a module that also held a causal LM was
    shifted to no terms at all)."""
    if not _int_tokens(target):
        return False
    ids = _token_ids(batch)
    return (
        isinstance(ids, torch.Tensor)
        and not ids.is_floating_point()
        and tuple(ids.shape) == tuple(target.shape)
    )


def _other_ids(batch: Any, target: torch.Tensor) -> list[torch.Tensor]:
    """Integer tensors of ``target``'s shape among the batch's (or its inputs') entries other
    than ``input_ids`` and the labels (``decoder_input_ids``, ...)."""
    entries: Any = batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Mapping):
        entries = batch[0]
    if not isinstance(entries, Mapping):
        return []
    return [
        v
        for k, v in entries.items()
        if k != "input_ids"
        and isinstance(v, torch.Tensor)
        and v is not target
        and not v.is_floating_point()
        and not v.is_complex()
        and v.dtype != torch.bool
        and tuple(v.shape) == tuple(target.shape)
    ]


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _shift_tokens(preds: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits ``(B, T, V)`` and labels ``(B, T)`` after the next-token shift, as
    the monitor's ``loss_fn`` and metrics get them: logits ``(B, T-1, V)`` of positions
    ``0..T-2`` (a view) and labels ``(B, T-1)`` of tokens ``1..T-1``, the pairs the model's
    own loss averages. Logits of another layout are refused: unshifted, every position would
    be scored against its own token."""
    if not (
        isinstance(preds, torch.Tensor)
        and preds.dim() == 3
        and tuple(preds.shape[:2]) == tuple(target.shape)
    ):
        raise MisconfigurationException(
            f"GeneralizationGapMonitor: the module is a causal language model (its loss "
            f"shifts the labels), so the predictions given to loss_fn and metrics are shifted "
            f"too, which needs logits (B, T, V) for labels (B, T); got {_shape(preds)} for "
            f"{_shape(target)}. Pass causal_lm=False if the labels are already shifted."
        )
    return preds[:, :-1], target[:, 1:]


def _paired_tokens(pl_module: PairedModule, batch: Any, preds: Any, target: Any) -> tuple[Any, Any]:
    """A ``PairedModule(causal_lm=True)``'s ``evaluate`` predictions and labels in the format
    the monitor's metrics get from a module of one's own: ``evaluate`` gives them shifted and
    flattened, ``(B·(T-1), V)`` / ``(B·(T-1),)`` as its ``loss_fn`` takes them, and they are
    given back their batch dimension, ``(B, T-1, V)`` / ``(B, T-1)`` (a view). The flat ones
    crashed ``torchmetrics.text.Perplexity``, and a metric written for one route broke on the
    other (review, session 28). Anything else is returned as it is."""
    if not (
        pl_module.causal_lm
        and isinstance(preds, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and preds.dim() == 2
        and target.dim() == 1
    ):
        return preds, target
    try:
        _, labels = _split_batch(batch, pl_module.labels_key)
    except ValueError:
        return preds, target
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return preds, target
    b, t = int(labels.shape[0]), int(labels.shape[1]) - 1
    if preds.shape[0] != b * t or target.shape[0] != b * t:
        return preds, target
    return preds.reshape(b, t, preds.shape[-1]), target.reshape(b, t)


#: Hugging Face model classes whose loss shifts ``labels`` for next-token prediction beside the
#: ``...ForCausalLM`` ones (``XLNetLMHeadModel``, ``XLMWithLMHeadModel`` and
#: ``FlaubertWithLMHeadModel`` do not shift, and are left out).
_SHIFTING_LM_HEADS = frozenset(
    {
        "BertLMHeadModel",
        "BlipTextLMHeadModel",
        "CTRLLMHeadModel",
        "GPT2LMHeadModel",
        "OpenAIGPTLMHeadModel",
    }
)


def _holds_causal_lm(module: nn.Module) -> bool:
    """Whether ``module`` holds a Hugging Face causal language model whose loss shifts its
    labels: a ``...ForCausalLM`` or a class of :data:`_SHIFTING_LM_HEADS`, not inside another
    Hugging Face model (an ``EncoderDecoderModel`` with a GPT-2 decoder computes its own loss,
    unshifted; re-review, session 23)."""

    def hf(m: nn.Module) -> bool:
        return any(c.__name__ == "PreTrainedModel" for c in type(m).__mro__)

    outer: list[str] = []  # paths of the outermost Hugging Face models (pre-order walk)
    for path, m in module.named_modules():
        if not hf(m) or any(p == "" or path.startswith(p + ".") for p in outer):
            continue
        outer.append(path)
        name = type(m).__name__
        if name.endswith("ForCausalLM") or name in _SHIFTING_LM_HEADS:
            return True
    return False
