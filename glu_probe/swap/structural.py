"""Adapter for MLP blocks recognised by their structure and checked by their output.

Most Hugging Face families outside GPT-2, LLaMA and BERT write their MLP as a small module of
``nn.Linear`` layers and an activation: ``ViTMLP``, ``CLIPMLP``, ``SiglipMLP``, ``Dinov2MLP``,
``PhiMLP``, ``GPTNeoXMLP`` (Pythia), ``GPTJMLP``, ``CodeGenMLP``, ``GPTBigCodeMLP``,
``Starcoder2MLP``, ``NemotronMLP``, ``PersimmonMLP`` and DistilBERT's ``FFN`` (dense);
``Phi3MLP``, ``GlmMLP`` and ``ModernBertMLP`` (one packed gate/up projection); ``Lfm2MLP`` and
``Dinov2SwiGLUFFN`` (separate gate and up projections under other names). Rather than one adapter
per class, this one accepts a block when

* its class name says MLP/FFN (the rule by which :func:`~glu_probe.swap.swap_mlp` calls a module
  "MLP-like"; classifier and prediction heads excluded), it holds no parameter of its own, and
  its children are 2 or 3 plain ``nn.Linear`` layers, at most one parameter-free activation
  module, dropouts and ``nn.Identity`` placeholders; and
* its ``forward`` on a random input equals one of these forms computed with its own layers (the
  same operations, so up to a few roundings):

  ==========  =====================================================================
  dense       ``y = D_o(fc2(D_h(act(fc1 x))))``
  packed      ``y = D_o(fc2(D_h(act(g) ⊙ u)))``, ``(g, u)`` the two halves of ``fc1 x``
              (either order)
  split       ``y = D_o(fc2(D_h(act(fc_g x) ⊙ fc_u x)))``
  ==========  =====================================================================

  where ``D_h``/``D_o`` are dropouts before/after ``fc2``. Which layer plays which role, the
  order of the packed halves and, for a block that calls its activation functionally
  (``F.silu`` in ``Lfm2MLP``), the activation are all settled by that check; the dropouts'
  places by a second check in training mode, where both sides draw the same masks from the same
  random stream only if the dropouts sit in the same places. A block whose forward needs more
  than the hidden states (MPT's and BLOOM's take the residual too), returns a tuple, or computes
  anything else fails the check and is reported as an unrecognised MLP block: never swapped on a
  guess.

The check runs one forward pass per candidate block on a ``(2, 3, in_features)`` input, under a
forked RNG (the global random streams are untouched) and ``torch.no_grad``; the block's
``training`` flags are restored. Blocks on the ``meta`` device cannot be checked and are not
recognised.

Host config: the width key (``intermediate_size``, ``n_inner``, ``hidden_dim``, ``ffn_dim`` or
``d_ff``) is updated only where its value is the blocks' width (Dinov2 derives its width from
``mlp_ratio``; LFM2 scales ``intermediate_size`` by 2/3). The activation key is left alone,
since families share it with other heads (DistilBERT's ``activation`` also drives its MLM head);
the ``glu_probe_swap`` record that :func:`~glu_probe.swap.swap_mlp` writes holds the variant.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glu_probe.modules import activation_name
from glu_probe.swap.core import (
    _CANDIDATE_CLASS,
    MLPAdapter,
    MLPSpec,
    UnsupportedModelError,
    _is_head,
)

__all__ = ["StructuralMLPAdapter"]

#: Config fields that may hold an MLP's hidden width, asked in this order.
WIDTH_KEYS = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "d_ff")

#: Activations tried, in this order, for a block without an activation module.
_FUNCTIONAL_ACTS: tuple[tuple[str, Any], ...] = (
    ("silu", F.silu),
    ("gelu", F.gelu),
    ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
    ("relu", F.relu),
    ("sigmoid", torch.sigmoid),
    ("identity", lambda t: t),
)


@dataclass
class _Form:
    kind: str  # "dense" | "packed" | "split"
    fc1: nn.Linear  # dense: the hidden layer; packed: gate and up; split: the gate
    fc2: nn.Linear
    up: nn.Linear | None  # split only
    gate_first: bool  # packed only
    act: Any  # the activation module, or a function
    act_name: str
    drop: tuple[float, float]  # (before fc2, after fc2)


def _plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _parts(module: nn.Module) -> tuple[list[nn.Linear], list[nn.Module], list[float]] | None:
    """(linears, activation modules, dropout probabilities) of a candidate, or ``None``."""
    if not _CANDIDATE_CLASS.search(type(module).__name__) or _is_head(module):
        return None
    if any(True for _ in module.parameters(recurse=False)):
        return None
    linears: list[nn.Linear] = []
    acts: list[nn.Module] = []
    drops: list[float] = []
    for child in module.children():
        if _plain_linear(child):
            assert isinstance(child, nn.Linear)
            linears.append(child)
        elif isinstance(child, nn.Dropout):
            drops.append(float(child.p))
        elif isinstance(child, nn.Identity):
            continue  # a disabled norm or dropout slot
        elif not any(True for _ in child.parameters()) and not any(True for _ in child.children()):
            acts.append(child)
        else:
            return None
    # A dropout rate kept as a float and applied with F.dropout (Starcoder2's residual_dropout).
    for name, value in vars(module).items():
        if "drop" in name.lower() and isinstance(value, float) and 0.0 < value < 1.0:
            drops.append(value)
    if len(linears) not in (2, 3) or len(acts) > 1:
        return None
    return linears, acts, drops


def _layouts(linears: list[nn.Linear]) -> list[tuple[str, nn.Linear, nn.Linear, nn.Linear | None]]:
    """Every role assignment the shapes allow: (kind, fc1 or gate, fc2, up)."""
    out: list[tuple[str, nn.Linear, nn.Linear, nn.Linear | None]] = []
    if len(linears) == 2:
        for a, b in (linears, linears[::-1]):
            if a.out_features == b.in_features:
                out.append(("dense", a, b, None))
            elif a.out_features == 2 * b.in_features:
                out.append(("packed", a, b, None))
        return out
    for k, down in enumerate(linears):
        g, u = (lin for j, lin in enumerate(linears) if j != k)
        for gate, up in ((g, u), (u, g)):
            same = gate.in_features == up.in_features and gate.out_features == up.out_features
            if same and gate.out_features == down.in_features:
                out.append(("split", gate, down, up))
    return out


def _run(form: _Form, x: Tensor, drop: tuple[float, float], training: bool) -> Tensor:
    h = form.fc1(x)
    if form.kind == "packed":
        a, b = h.chunk(2, dim=-1)
        g, u = (a, b) if form.gate_first else (b, a)
        h = form.act(g) * u
    elif form.kind == "split":
        assert form.up is not None
        h = form.act(h) * form.up(x)
    else:
        h = form.act(h)
    h = F.dropout(h, drop[0], training) if drop[0] > 0 else h
    y = form.fc2(h)
    return F.dropout(y, drop[1], training) if drop[1] > 0 else y


def _close(ref: Any, got: Tensor) -> bool:
    if not isinstance(ref, Tensor) or ref.shape != got.shape or ref.dtype != got.dtype:
        return False
    if not (torch.isfinite(ref).all() and torch.isfinite(got).all()):
        return False
    eps = torch.finfo(ref.dtype).eps
    scale = float(ref.abs().max()) + float(got.abs().max())
    # The same operations, possibly fused differently: a few roundings of the largest entries.
    return float((ref - got).abs().max()) <= 64 * eps * max(scale, torch.finfo(ref.dtype).tiny)


class _TrainingFlags:
    """Put ``module`` in ``mode`` and restore every submodule's own flag afterwards."""

    def __init__(self, module: nn.Module, mode: bool) -> None:
        self.module, self.mode = module, mode
        self.flags = [(m, m.training) for m in module.modules()]

    def __enter__(self) -> None:
        self.module.train(self.mode)

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag


def _analyse(module: nn.Module) -> _Form | None:
    """The block's form, checked against its own forward pass, or ``None``.

    16-bit blocks are checked on a float32 copy: in bf16 a few roundings of the output are
    a few percent of it, too coarse to tell two activations apart. The form found on the copy
    is mapped back to the block's own layers (same child names)."""
    parts = _parts(module)
    if parts is None:
        return None
    p = parts[0][0].weight
    if p.device.type == "meta" or not p.dtype.is_floating_point:
        return None
    if torch.finfo(p.dtype).bits >= 32:
        return _analyse_checked(module, parts)
    try:
        wide = copy.deepcopy(module).float()
    except Exception:  # not copyable: no check in 16 bits, no swap on a guess
        return None
    wide_parts = _parts(wide)
    form = _analyse_checked(wide, wide_parts) if wide_parts is not None else None
    if form is None:
        return None
    names = {id(child): name for name, child in wide.named_children()}
    own = dict(module.named_children())
    form.fc1 = own[names[id(form.fc1)]]  # type: ignore[assignment]
    form.fc2 = own[names[id(form.fc2)]]  # type: ignore[assignment]
    if form.up is not None:
        form.up = own[names[id(form.up)]]  # type: ignore[assignment]
    if isinstance(form.act, nn.Module) and id(form.act) in names:
        form.act = own[names[id(form.act)]]
    return form


def _analyse_checked(
    module: nn.Module, parts: tuple[list[nn.Linear], list[nn.Module], list[float]]
) -> _Form | None:
    linears, acts, drops = parts
    p = linears[0].weight
    layouts = _layouts(linears)
    if not layouts:
        return None
    acts_tried: list[tuple[str, Any]] = (
        [(activation_name(acts[0]), acts[0])] if acts else list(_FUNCTIONAL_ACTS)
    )
    gen = torch.Generator(device=p.device).manual_seed(0)
    inputs: dict[int, Tensor] = {}
    devices = [p.device] if p.device.type == "cuda" else []

    def forward(x: Tensor, training: bool, seed: int, form: _Form | None = None) -> Any:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            if form is None:
                with _TrainingFlags(module, training):
                    return module(x)
            return _run(form, x, form.drop, training)

    found: _Form | None = None
    try:
        for kind, fc1, fc2, up in layouts:
            d_in = fc1.in_features
            if d_in not in inputs:
                inputs[d_in] = torch.randn(2, 3, d_in, generator=gen, device=p.device).to(p.dtype)
            x = inputs[d_in]
            ref = forward(x, False, 0)
            for gate_first in (True, False) if kind == "packed" else (True,):
                for name, act in acts_tried:
                    form = _Form(kind, fc1, fc2, up, gate_first, act, name, (0.0, 0.0))
                    if _close(ref, forward(x, False, 0, form)):
                        found = form
                        break
                if found is not None:
                    break
            if found is not None:
                break
        if found is None:
            return None
        live = [q for q in drops if q > 0]
        if len(live) > 2:
            return None
        if live:
            x = inputs[found.fc1.in_features]
            ref = forward(x, True, 1)
            options = [(live[0], 0.0), (0.0, live[0])] if len(live) == 1 else [tuple(live)]
            if len(live) == 2:
                options.append((live[1], live[0]))
            for option in options:
                found.drop = (float(option[0]), float(option[1]))
                if _close(ref, forward(x, True, 1, found)):
                    return found
            return None
    except Exception:  # a forward that needs more than the hidden states, or fails otherwise
        return None
    return found


class StructuralMLPAdapter(MLPAdapter):
    """Matches MLP-named blocks of plain ``nn.Linear`` layers whose forward pass is checked to be
    a dense, packed-gated or split-gated MLP (module docstring)."""

    name = "structural"

    #: The config's width key is updated only where it holds the swapped blocks' width.
    width_key_must_match = True

    def __init__(self) -> None:
        self._forms: weakref.WeakKeyDictionary[nn.Module, _Form] = weakref.WeakKeyDictionary()

    def matches(self, module: nn.Module) -> bool:
        form = _analyse(module)
        if form is None:
            return False
        self._forms[module] = form
        return True

    def describe(self, module: nn.Module) -> MLPSpec:
        form = self._forms.get(module) or _analyse(module)
        if form is None:
            raise UnsupportedModelError(
                f"{type(module).__name__} is no longer an MLP block of a recognised form"
            )
        fc1, fc2, up = form.fc1, form.fc2, form.up
        if up is not None and (fc1.bias is None) != (up.bias is None):
            raise UnsupportedModelError(
                f"{type(module).__name__}: the gate and up projections disagree on bias"
            )
        hidden = fc2.in_features
        gated = form.kind != "dense"
        return MLPSpec(
            in_features=fc1.in_features,
            hidden_features=hidden,
            out_features=fc2.out_features,
            gated=gated,
            activation=form.act_name,
            num_params=sum(q.numel() for q in module.parameters()),
            bias=(fc1.bias is not None, fc2.bias is not None),
            drop=form.drop,
            kind=f"{type(module).__name__} ({form.kind})",
            device=fc1.weight.device,
            dtype=fc1.weight.dtype,
        )

    def config_keys(self, model: nn.Module) -> tuple[str | None, str | None]:
        config = getattr(model, "config", None)
        for key in WIDTH_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return key, None
        return None, None
