"""The monitor's train-start checks of what its loss route gives on the first training-subset
batch, and the errors they raise: the refusal of a ``loss_fn`` or metric that fails there (with
a causal language model's shifted format spelled out), a ``loss_fn`` that shifts a causal LM's
labels itself (compared with the module's own loss, within rounding), and next-token labels the
monitor would misread (not Hugging Face's ``labels=input_ids``). Kept apart from the monitor so
that its class holds the hooks: each check takes the values it needs from the monitor as
arguments.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from glu_probe.callbacks._lm_tokens import _int_tokens, _other_ids, _shape, _token_ids
from glu_probe.callbacks.paired import PairedModule, _copy_tensors, _split_batch


def _rounding_rtol(*values: Any) -> float:
    """Relative tolerance between two computations of one loss on one batch (the same logits,
    other arithmetic: ``F.cross_entropy`` against Hugging Face's float32 loss): ``1e-4`` where
    every floating tensor among ``values`` has 32 bits or more (rounding there is ~1e-7), two
    machine epsilons of the narrowest type otherwise (bfloat16: 1.6e-2, float16: 2e-3): a loss
    returned in 16 bits is rounded to half an epsilon, and a loss computed from 16-bit logits
    (``precision="bf16-mixed"``) in 16 bits by one side only differs by about that much."""
    narrow = [
        torch.finfo(v.dtype).eps
        for v in values
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.element_size() < 4
    ]
    return 2 * max(narrow) if narrow else 1e-4


def _one_number(value: Any) -> bool:
    """Whether a loss is one number (what the sums take), read without a device sync."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _refused(what: str, preds: Any, target: Any, err: Any, lm: bool) -> Exception:
    """The MisconfigurationException of ``GeneralizationGapMonitor._check_outputs``; ``lm``:
    the predictions are a causal language model's (the format is then spelled out)."""
    why = f"{type(err).__name__}: {err}" if isinstance(err, BaseException) else str(err)
    why = why.rstrip(". ")
    hint = (
        " These are a causal language model's next-token predictions, shifted: logits "
        "(B, T-1, V) of positions 0..T-2 and labels (B, T-1) of tokens 1..T-1 (-100: "
        "ignored). torchmetrics.text.Perplexity(ignore_index=-100) takes them as they are; "
        "a loss or metric that wants the classes on dimension 1 or flat (N, V) / (N,) "
        "inputs needs them rearranged, e.g. F.cross_entropy(p.transpose(1, 2), t) or "
        "torchmetrics.wrappers.LambdaInputTransformer(MulticlassAccuracy(..., "
        "ignore_index=-100), transform_pred=lambda p: p.transpose(1, 2))."
        if isinstance(preds, torch.Tensor)
        and preds.dim() == 3
        and isinstance(target, torch.Tensor)
        and target.dim() == 2
        and lm
        else ""
    )
    return MisconfigurationException(
        f"GeneralizationGapMonitor: {what} fails on the first training-subset batch, "
        f"checked at train start: preds {_shape(preds)}, target {_shape(target)}: "
        f"{why}.{hint}"
    )


def _check_own_shift(
    pl_module: pl.LightningModule,
    batch: Any,
    loss_fn: Callable[[Any, Any], Any],
    shifted: Any,
    preds: torch.Tensor,
    target: torch.Tensor,
    labels_key: str,
) -> None:
    """Refuse a ``loss_fn`` that shifts a causal LM's labels itself, now that the monitor
    shifts them (session 28): given the shifted ``(B, T-1, V)`` / ``(B, T-1)`` it scored
    every position against the token two ahead, silently (``gap/loss`` 0.0894 for 0.1130;
    re-review, session 28). On the first training-subset batch (``preds``/``target``
    unshifted, ``shifted``: ``loss_fn`` on the shifted ones) the module's own loss
    (:func:`_own_loss`) is compared with ``loss_fn`` both ways: equal to ``loss_fn`` on the
    unshifted predictions and not on the shifted ones, within rounding
    (:func:`_rounding_rtol`), it is refused with a MisconfigurationException; equal to
    neither, a warning says that ``gap/loss`` is not the model's own loss. Nothing is said
    where there is no own loss to compare with, or where both agree with it (an untrained
    model may score the two shifts alike). Metrics cannot be checked this way.
    ``labels_key``: the monitor's (the batch's inputs for :func:`_own_loss`)."""
    own = _own_loss(pl_module, batch, target, labels_key)
    if own is None or not _one_number(shifted):
        return
    value, source = own
    try:
        unshifted = loss_fn(preds, target)
    except torch.OutOfMemoryError:
        raise
    except Exception:
        unshifted = None  # (it takes the shifted layout only: no shift of its own)
    if not _one_number(unshifted):
        unshifted = None
    rtol = _rounding_rtol(preds, value, shifted, unshifted)
    own_v, shifted_v = float(value), float(shifted)
    unshifted_v = float(unshifted) if unshifted is not None else math.nan
    if not (math.isfinite(own_v) and math.isfinite(shifted_v)):
        return
    tol = rtol * max(abs(own_v), 1e-2)
    if abs(shifted_v - own_v) <= tol:
        return
    if abs(unshifted_v - own_v) <= tol:  # (False for NaN)
        raise MisconfigurationException(
            "GeneralizationGapMonitor: loss_fn shifts the labels itself, and the monitor "
            "shifts them too: on the first training-subset batch (checked at train start) "
            f"the module's own loss ({source}) is {own_v:.6g}, loss_fn on the unshifted "
            f"predictions gives {unshifted_v:.6g}, on the shifted ones {shifted_v:.6g}. "
            "The monitor gives a causal language model's loss_fn and metrics the "
            "predictions already shifted, logits (B, T-1, V) of positions 0..T-2 and "
            "labels (B, T-1) of tokens 1..T-1, so a shift of one's own (p[:, :-1], "
            "t[:, 1:]) scores every position against the token two ahead. Remove it, e.g. "
            "loss_fn=lambda p, t: F.cross_entropy(p.transpose(1, 2), t, ignore_index=-100), "
            "and from any metric that shifts too (metrics cannot be checked this way)."
        )
    rank_zero_warn(
        f"GeneralizationGapMonitor: on the first training-subset batch loss_fn gives "
        f"{shifted_v:.6g} where the module's own loss ({source}) gives {own_v:.6g} (beyond "
        f"rounding, rtol {rtol:.2g}): gap/loss is not the model's own loss. Fine if that "
        "is meant (another loss than the training one); if loss_fn shifts the labels "
        "itself, remove that shift: the monitor gives a causal language model's loss_fn "
        "and metrics the predictions already shifted, logits (B, T-1, V) and labels "
        "(B, T-1)."
    )


def _own_loss(
    pl_module: pl.LightningModule, batch: Any, target: Any, labels_key: str
) -> tuple[Any, str] | None:
    """The module's own loss on ``batch`` and where it comes from, the first of these that
    gives one number: its ``compute_loss(batch)`` (or the ``"loss"`` / first entry of a
    mapping or sequence it returns), the ``.loss`` of its output when called with the
    inputs and ``labels=target`` (a Hugging Face model's, whose loss shifts). ``None`` where
    none does (a failure there is not the monitor's to report: the comparison is left out).
    Not the module's ``loss_fn`` attribute: it takes the outputs as the module gives them,
    a flat criterion on unshifted predictions equals a correct user ``loss_fn`` there, and
    a correct one was refused as self-shifting (re-review, session 28). ``labels_key``: the
    monitor's (the inputs are the batch less its labels)."""

    def hf_loss() -> Any:
        inputs, _ = _split_batch(_copy_tensors(batch), labels_key)
        args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
        if "labels" in kwargs:
            return None
        kwargs["labels"] = target
        inspect.signature(pl_module.forward).bind(*args, **kwargs)  # (TypeError: skipped)
        out = pl_module(*args, **kwargs)
        return out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)

    compute = getattr(pl_module, "compute_loss", None)
    sources: list[tuple[str, Callable[[], Any]]] = []
    if callable(compute):
        sources.append(("compute_loss(batch)", lambda: compute(_copy_tensors(batch))))
    sources.append(("the output's .loss with labels", hf_loss))
    for source, get in sources:
        try:
            value = get()
        except torch.OutOfMemoryError:
            raise
        except Exception:
            continue
        if isinstance(value, Mapping):  # (a dict holding the loss, as HF outputs do)
            value = value.get("loss")
        elif isinstance(value, (tuple, list)) and value:
            value = value[0]
        if value is not None and _one_number(value):
            return value, source
    return None


def _check_token_labels(
    pl_module: pl.LightningModule,
    batch: Any,
    *,
    causal_lm: bool | None,
    shifts: bool,
    labels_key: str,
) -> None:
    """Where the monitor detected a causal LM itself (``causal_lm=None``), refuse at train
    start a first training-subset batch whose labels it would misread: labels that do not
    follow Hugging Face's ``labels=input_ids`` convention (equal to ``input_ids`` wherever
    not ``-100``; labels already shifted in the data were shifted again, a perplexity
    12.5 % off), or integer ``(B, T)`` labels it would leave unshifted for want of integer
    token ids beside them (``{"tokens", "labels"}`` batches; re-review, session 28; labels
    of another shape than the ids are a classifier's, left unshifted). An explicit
    ``causal_lm`` is the user's word and is not checked; a PairedModule shifts by its own
    ``causal_lm``. ``causal_lm``, ``labels_key``: the monitor's arguments; ``shifts``: whether
    it shifts the module's labels (resolved at setup)."""
    if causal_lm is not None or not shifts or isinstance(pl_module, PairedModule):
        return
    try:
        _, target = _split_batch(batch, labels_key)
    except ValueError:
        return  # (a whole batch for compute_loss: weighed by its samples)
    if not _int_tokens(target):
        return  # (a classifier's target beside the LM: not shifted)
    choose = (
        "Pass causal_lm=False if the labels are already shifted in the data (or are not "
        "next-token labels), causal_lm=True if the model's loss shifts them (the monitor "
        "then shifts every integer (B, T) target)."
    )
    ids = _token_ids(batch)
    if not (isinstance(ids, torch.Tensor) and not ids.is_floating_point()):
        raise MisconfigurationException(
            "GeneralizationGapMonitor: the module holds a causal language model whose loss "
            f"shifts its labels, but the batch's integer labels {_shape(target)} have no "
            f"integer token ids beside them to be recognised by (found: "
            f"{'none' if ids is None else _shape(ids)}; "
            "looked for batch['input_ids'], the inputs of an (inputs, labels) batch, or "
            "their 'input_ids'), so they would go unshifted. " + choose
        )
    if tuple(ids.shape) != tuple(target.shape):
        return  # (not per-token labels of these ids: a multi-label target, not shifted)
    kept = target != -100
    differ = int((target[kept] != ids[kept]).sum())  # (one read, at train start)
    if differ and any(
        int((target[kept] != other[kept]).sum()) == 0 for other in _other_ids(batch, target)
    ):
        # The labels of another token input of the batch, a decoder's (a module of one's
        # own holding an encoder and a GPT-2 decoder: {input_ids: source, decoder_input_ids:
        # target, labels: target} was refused; re-review, session 28): they follow the
        # convention for that input, whose loss shifts them.
        differ = 0
    if differ:
        inner = kept[:, :-1]
        shifted = bool(inner.any() and (target[:, :-1] == ids[:, 1:])[inner].all())
        raise MisconfigurationException(
            "GeneralizationGapMonitor: the module holds a causal language model whose loss "
            "shifts labels=input_ids, but the first training-subset batch's labels differ "
            f"from its input_ids at {differ} of {int(kept.sum())} non-ignored positions"
            + (" (they equal the next token, input_ids[:, 1:]: shifted already)" if shifted else "")
            + "; shifted again, every position would be scored against the wrong token. "
            + choose
        )
