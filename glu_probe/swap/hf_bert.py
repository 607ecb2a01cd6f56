"""Adapter for Hugging Face BERT-family layers: ``BertIntermediate`` + ``BertOutput``.

A ``BertLayer`` computes its feed-forward part in two modules::

    h = act(intermediate.dense(a))                              # BertIntermediate
    y = output.LayerNorm(output.dropout(output.dense(h)) + a)   # BertOutput (residual + LN)

The adapter matches the *layer* (a module with both children) and rewires it so that
``intermediate`` is ``nn.Identity`` and ``output`` is a :class:`ResidualNormMLP` holding the whole
new MLP and the layer's own ``LayerNorm`` (same module, same state-dict key
``output.LayerNorm.*``): ``y = LayerNorm(mlp(a) + a)``, where ``mlp``'s output dropout is the
layer's ``hidden_dropout_prob``. The residual and the LayerNorm are thus unchanged.

Both halves are checked with fresh weights (eval and training mode) to compute exactly that
from ``(h, r)`` alone, and may hold no parameters besides ``dense`` and ``LayerNorm``: a layer
whose output holds more (X-MOD's per-language adapters, whose forward takes ``lang_ids``) is
refused with :class:`~glu_probe.swap.UnsupportedModelError`. Pre-LayerNorm variants
(MegatronBERT, ESM: the layer normalises before ``intermediate``, and ``output`` computes
``dropout(dense h) + r`` without a LayerNorm) are taken where the same check passes (ESM's
functional ``gelu`` is found by it); their ``ResidualNormMLP`` gets an identity norm.

Only ``intermediate_size`` of the host config is updated: BERT also uses ``hidden_act`` in its
MLM prediction head, so changing it would change that head in a rebuilt model (the MLP's
activation is recorded in the config's ``glu_probe_swap`` record instead).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glu_probe._rng import seeded
from glu_probe.modules import MLP, GatedMLP, activation_name
from glu_probe.swap.base import MLPAdapter, MLPSpec, UnsupportedModelError, spec_from_glu_probe

__all__ = ["BertLayerAdapter", "ResidualNormMLP"]


class ResidualNormMLP(nn.Module):
    """``forward(hidden_states, input_tensor) = LayerNorm(mlp(hidden_states) + input_tensor)``.

    Drop-in for ``BertOutput`` (same call signature) when ``BertIntermediate`` is an identity.
    """

    def __init__(self, mlp: nn.Module, layer_norm: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.mlp(hidden_states) + input_tensor)


def _checked_activation(inter: nn.Module, out: nn.Module, norm: nn.LayerNorm | None) -> Any:
    """The activation of a BERT layer's feed-forward halves, or ``None`` unless
    ``intermediate(x) = act(dense x)`` and ``output(h, r) = norm(dropout(dense h) + r)`` (post-LN,
    ``norm`` the output's ``LayerNorm``) or ``dropout(dense h) + r`` (pre-LN, ``norm`` ``None``),
    in eval and training mode, checked with fresh float32 CPU weights (as the structural adapter
    does). ``act`` is the intermediate's ``intermediate_act_fn``, or a functional one found by the
    check (ESM calls ``gelu``). Cached per structure."""
    from glu_probe.swap.structural import _structure

    key = (_structure(inter, []), _structure(out, []), norm is None)
    if key not in _VERDICTS:
        if len(_VERDICTS) >= 256:
            _VERDICTS.clear()
        _VERDICTS[key] = _check_halves(inter, out, norm)
    name = _VERDICTS[key]
    if name is None:
        return None
    own = _act_of(inter)
    if own is not None:
        return own
    from glu_probe.swap.structural import _FUNCTIONAL_ACTS

    return dict(_FUNCTIONAL_ACTS)[name]


#: Verdicts of :func:`_checked_activation`: the activation's name (``"own"`` for the
#: intermediate's module) or ``None``.
_VERDICTS: dict[tuple[Any, ...], str | None] = {}


def _check_halves(inter: nn.Module, out: nn.Module, norm: nn.LayerNorm | None) -> str | None:
    from glu_probe.swap.structural import _FUNCTIONAL_ACTS, _CheckRun, _close, fresh_linear

    d1, d2 = getattr(inter, "dense", None), getattr(out, "dense", None)
    drop = getattr(out, "dropout", None)
    if not isinstance(d1, nn.Linear) or not isinstance(d2, nn.Linear):
        return None
    if d1.out_features != d2.in_features or not isinstance(drop, nn.Dropout):
        return None
    gen = torch.Generator().manual_seed(0)
    t1, t2 = fresh_linear(d1, gen, "dense"), fresh_linear(d2, gen, "dense")
    if norm is not None:
        if norm.weight is not None:
            t2["LayerNorm.weight"] = 1.0 + 0.1 * torch.randn(norm.weight.shape, generator=gen)
        if norm.bias is not None:
            t2["LayerNorm.bias"] = 0.1 * torch.randn(norm.bias.shape, generator=gen)
    for mod, tensors in ((inter, t1), (out, t2)):
        for name, buf in mod.named_buffers():
            if buf.device.type == "meta":
                return None
            tensors[name] = buf.detach().to("cpu")
    x = torch.randn(2, 3, d1.in_features, generator=gen)
    h = torch.randn(2, 3, d2.in_features, generator=gen)
    r = torch.randn(2, 3, d2.out_features, generator=gen)
    own = _act_of(inter)
    candidates = [("own", own)] if own is not None else list(_FUNCTIONAL_ACTS)

    def want_out(training: bool) -> Tensor:
        y = F.dropout(F.linear(h, t2["dense.weight"], t2.get("dense.bias")), drop.p, training)
        y = y + r
        if norm is None:
            return y
        return F.layer_norm(
            y, norm.normalized_shape, t2.get("LayerNorm.weight"), t2.get("LayerNorm.bias"), norm.eps
        )

    try:
        found: str | None = None
        for training, seed in ((False, 0), (True, 1)):
            with seeded(seed), torch.no_grad():  # CPU tensors: the CUDA generators untouched
                with _CheckRun(out, training, silence_hooks=True):
                    got_out = torch.func.functional_call(out, t2, (h, r))
                torch.default_generator.manual_seed(seed)  # the same dropout mask again
                if not _close(got_out, want_out(training)):
                    return None
                with _CheckRun(inter, training, silence_hooks=True):
                    got = torch.func.functional_call(inter, t1, (x,))
                pre = F.linear(x, t1["dense.weight"], t1.get("dense.bias"))
                hits = [n for n, act in candidates if _close(got, act(pre))]
                if not hits or (found is not None and hits[0] != found):
                    return None
                found = hits[0]
        return found
    except Exception:  # other arguments (X-MOD's lang_ids), or fails otherwise
        return None


def _parameterised_extras(module: nn.Module, allowed: tuple[str, ...]) -> list[str]:
    """Children of ``module`` holding parameters, other than ``allowed``; own parameters."""
    extra = [n for n, _ in module.named_parameters(recurse=False)]
    for name, child in module.named_children():
        if name not in allowed and any(True for _ in child.parameters()):
            extra.append(name)
    return extra


def _act_of(intermediate: nn.Module) -> nn.Module | None:
    act = getattr(intermediate, "intermediate_act_fn", None)
    return act if isinstance(act, nn.Module) else None


class BertLayerAdapter(MLPAdapter):
    """Matches modules with ``intermediate`` and ``output`` children shaped like BERT's (or
    already rewired by this adapter)."""

    name = "hf_bert"

    def matches(self, module: nn.Module) -> bool:
        inter = getattr(module, "intermediate", None)
        out = getattr(module, "output", None)
        if isinstance(inter, nn.Identity) and isinstance(out, ResidualNormMLP):
            return True
        return isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(
            getattr(out, "dense", None), nn.Linear
        )

    def describe(self, module: Any) -> MLPSpec:
        inter, out = module.intermediate, module.output
        cls = type(module).__name__
        if isinstance(out, ResidualNormMLP):
            mlp = out.mlp
            if not isinstance(mlp, MLP | GatedMLP):
                raise UnsupportedModelError(f"{cls}.output.mlp is a {type(mlp).__name__}")
            return spec_from_glu_probe(mlp, f"{cls}(glu_probe.{type(mlp).__name__})")
        ln = getattr(out, "LayerNorm", None)
        drop = getattr(out, "dropout", None)
        act = _act_of(inter)
        extra = [f"intermediate.{n}" for n in _parameterised_extras(inter, ("dense",))] + [
            f"output.{n}" for n in _parameterised_extras(out, ("dense", "LayerNorm"))
        ]
        if extra:
            raise UnsupportedModelError(
                f"{cls} has intermediate.dense and output.dense like a BertLayer but also "
                f"parameters in {extra} (X-MOD's language adapters, MobileBERT's bottleneck, "
                "...), which a swap would drop"
            )
        # A second feed-forward part beside intermediate/output (LiLT's layout_intermediate /
        # layout_output): swapping the first alone was a silent partial swap, and the width
        # key written for it resized the second in a rebuilt model (review, session 25).
        second = [
            n
            for n, child in module.named_children()
            if n not in ("intermediate", "output")
            and isinstance(getattr(child, "dense", None), nn.Linear)
        ]
        if second:
            raise UnsupportedModelError(
                f"{cls} holds another feed-forward part ({', '.join(second)}) beside "
                "intermediate/output, which this adapter does not swap (LiLT's layout "
                "feed-forward); a swap of one of them would be a partial swap"
            )
        if isinstance(ln, nn.LayerNorm) and isinstance(drop, nn.Dropout):
            # Post-LayerNorm (BERT): `output` must compute LayerNorm(dropout(dense h) + r) on
            # (h, r) alone and `intermediate` act(dense x), checked with fresh weights.
            act = _checked_activation(inter, out, ln)
            if act is None:
                raise UnsupportedModelError(
                    f"{cls}: its intermediate/output do not compute act(dense x) and "
                    "LayerNorm(dropout(dense h) + r) from (h, r) alone (checked with fresh "
                    "weights); its feed-forward semantics are unknown"
                )
        elif not isinstance(ln, nn.LayerNorm) and isinstance(drop, nn.Dropout):
            # Pre-LayerNorm variants (MegatronBERT, ESM): the layer normalises before
            # `intermediate`, `output` only adds the residual. Taken only where both halves
            # are checked to compute exactly that.
            checked = _checked_activation(inter, out, None)
            if checked is not None:
                act, ln = checked, nn.Identity()
        # (a norm of another class is named as such: DeBERTa v1's DebertaLayerNorm was reported
        # as a missing output.LayerNorm; review, session 20)
        norm_what = (
            "output.LayerNorm"
            if ln is None
            else f"output.LayerNorm as a torch.nn.LayerNorm (it is a {type(ln).__name__})"
        )
        missing = [
            what
            for what, ok in (
                ("intermediate.intermediate_act_fn", act is not None),
                (norm_what, isinstance(ln, nn.LayerNorm | nn.Identity)),
                ("output.dropout", isinstance(drop, nn.Dropout)),
            )
            if not ok
        ]
        if missing:
            raise UnsupportedModelError(
                f"{cls} has intermediate.dense and output.dense like a BertLayer but lacks "
                f"{missing}; its residual/LayerNorm semantics are unknown"
            )
        d1, d2 = inter.dense, out.dense
        assert isinstance(d1, nn.Linear) and isinstance(d2, nn.Linear) and act is not None
        assert isinstance(drop, nn.Dropout)
        if d1.out_features != d2.in_features:
            raise UnsupportedModelError(
                f"{cls}: intermediate width {d1.out_features} != output in {d2.in_features}"
            )
        return MLPSpec(
            in_features=d1.in_features,
            hidden_features=d1.out_features,
            out_features=d2.out_features,
            gated=False,
            activation=activation_name(act),
            num_params=sum(p.numel() for p in (*d1.parameters(), *d2.parameters())),
            bias=(d1.bias is not None, d2.bias is not None),
            drop=(0.0, float(drop.p)),
            kind=f"{cls}(intermediate+output{', pre-LN' if isinstance(ln, nn.Identity) else ''})",
            device=d1.weight.device,
            dtype=d1.weight.dtype,
        )

    def install(self, root: nn.Module, path: str, old: Any, new: nn.Module) -> None:
        out = old.output
        # Pre-LayerNorm variants have none after the residual (their norm stays on the layer).
        layer_norm = getattr(out, "LayerNorm", None) or nn.Identity()
        assert isinstance(layer_norm, nn.Module)
        old.intermediate = nn.Identity().train(old.intermediate.training)
        old.output = ResidualNormMLP(new, layer_norm)
        old.output.train(out.training)

    def dropped_modules(self, module: nn.Module) -> list[nn.Module]:
        # install() keeps the layer, its attention and the output's LayerNorm
        keep = getattr(module.output, "LayerNorm", None)
        parts = [getattr(module, "intermediate", None), getattr(module, "output", None)]
        return [
            m
            for part in parts
            if isinstance(part, nn.Module)
            for m in part.modules()
            if m is not keep
        ]

    def source_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        out: Any = module.output
        if isinstance(out, ResidualNormMLP):
            return list(out.mlp.parameters())
        inter: Any = module.intermediate
        return [*inter.dense.parameters(), *out.dense.parameters()]

    def config_keys(self, model: nn.Module) -> tuple[str | None, str | None]:
        config = getattr(model, "config", None)
        return ("intermediate_size" if hasattr(config, "intermediate_size") else None), None
