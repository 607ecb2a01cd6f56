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
  same operations, so up to a few roundings), or, for a ``forward(hidden_states, residual)``
  (MPT, BLOOM), one of them plus the residual (the new block is then wrapped in
  :class:`ResidualAddMLP`):

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
  random stream only if the dropouts sit in the same places. A block whose forward needs other
  arguments, returns a tuple, or computes anything else fails the check and is reported as an
  unrecognised MLP block: never swapped on a guess.

The check calls the block's ``forward`` through ``torch.func.functional_call`` with fresh
weights (float32, on the CPU, from a private generator) on a ``(2, 3, in_features)`` input, and
computes each candidate form from the same weights. Fresh weights make it independent of the
block's own: a zero-initialised output layer would make every form agree, bf16 roundings are a
few percent of the output (too coarse to tell GELU from SiLU), and ``meta``-device weights have
no values at all (a model built on ``meta`` swaps too). It runs under a forked CPU RNG (the
global random streams are untouched) and restores the block's ``training`` flags. Its verdict,
a recipe by child names, depends only on the block's structure (class, children and their
shapes and settings, dropout rates, plain instance settings), so it is computed once per
structure and cached: one check for all the layers of a model. Forward hooks registered on
the block (or its layers) see those calls, with the random input and the fresh weights.

Host config: the width key (``intermediate_size``, ``n_inner``, ``hidden_dim``, ``ffn_dim`` or
``d_ff``) is updated only where its value is the blocks' width (Dinov2 derives its width from
``mlp_ratio``; LFM2 scales ``intermediate_size`` by 2/3). The activation key is left alone,
since families share it with other heads (DistilBERT's ``activation`` also drives its MLM head);
the ``glu_probe_swap`` record that :func:`~glu_probe.swap.swap_mlp` writes holds the variant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glu_probe._rng import seeded
from glu_probe._settings import plain_settings
from glu_probe.modules import activation_name
from glu_probe.swap.base import MLPAdapter, MLPSpec, UnsupportedModelError
from glu_probe.swap.guards import _HOOK_DICTS, hooked_modules
from glu_probe.swap.select import _CANDIDATE_CLASS, _is_head

__all__ = ["StructuralMLPAdapter"]

#: Config fields that may hold an MLP's hidden width, asked in this order.
WIDTH_KEYS = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "d_ff")

#: Activations tried, in this order, for a block without an activation module (one that calls
#: e.g. ``F.silu`` in its ``forward``); the modules compute the same functions.
_FUNCTIONAL_ACTS: tuple[tuple[str, nn.Module], ...] = (
    ("silu", nn.SiLU()),
    ("gelu", nn.GELU()),
    ("gelu_tanh", nn.GELU(approximate="tanh")),
    ("relu", nn.ReLU()),
    ("sigmoid", nn.Sigmoid()),
    ("identity", nn.Identity()),
)


def fresh_linear(lin: nn.Linear, gen: torch.Generator, prefix: str) -> dict[str, Tensor]:
    """Fresh float32 CPU weights for ``lin`` under ``<prefix>.weight`` / ``<prefix>.bias``, for
    the adapters' checks: N(0, 1/fan_in) weights, N(0, 0.1²) biases."""
    w = torch.randn(lin.out_features, lin.in_features, generator=gen)
    out = {f"{prefix}.weight": w / math.sqrt(lin.in_features)}
    if lin.bias is not None:
        out[f"{prefix}.bias"] = 0.1 * torch.randn(lin.out_features, generator=gen)
    return out


def width_key(model: nn.Module) -> str | None:
    """The first of :data:`WIDTH_KEYS` that the model's config holds as an int (the adapters
    using it set ``width_key_must_match``, so it is written only where it is the width)."""
    config = getattr(model, "config", None)
    for key in WIDTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return key
    return None


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
    residual: bool = False  # forward(hidden_states, residual) -> block(hidden_states) + residual


class ResidualAddMLP(nn.Module):
    """``forward(hidden_states, residual) = mlp(hidden_states) + residual``.

    Stands in for MLPs whose ``forward`` takes the residual too and adds it (MPT's ``MptMLP``,
    BLOOM's ``BloomMLP``: ``dropout(down(act(up x))) + residual``); the dropout is ``mlp``'s
    output dropout, drawn before the addition as there."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, hidden_states: Tensor, residual: Tensor) -> Tensor:
        return self.mlp(hidden_states) + residual


def _plain_linear(m: Any) -> bool:
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


@dataclass(frozen=True)
class _Recipe:
    """A form by child names: what the check found, independent of the instance's weights."""

    kind: str
    fc1: str
    fc2: str
    up: str | None
    gate_first: bool
    act: str | None  # child name of the activation module; None: functional
    act_name: str
    drop: tuple[float, float]
    residual: bool = False


def _apply(
    recipe: _Recipe, tensors: dict[str, Tensor], act: Any, x: Tensor, training: bool
) -> Tensor:
    """The recipe's formula with the given weights (``<child>.weight`` / ``<child>.bias``)."""

    def lin(name: str, t: Tensor) -> Tensor:
        return F.linear(t, tensors[f"{name}.weight"], tensors.get(f"{name}.bias"))

    h = lin(recipe.fc1, x)
    if recipe.kind == "packed":
        a, b = h.chunk(2, dim=-1)
        g, u = (a, b) if recipe.gate_first else (b, a)
        h = act(g) * u
    elif recipe.kind == "split":
        assert recipe.up is not None
        h = act(h) * lin(recipe.up, x)
    else:
        h = act(h)
    drop = recipe.drop
    h = F.dropout(h, drop[0], training) if drop[0] > 0 else h
    y = lin(recipe.fc2, h)
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


class _CheckRun:
    """For a form check's run of ``module`` on random inputs: put it in ``mode`` and restore
    every submodule's own flag afterwards; with ``silence_hooks``, the hooks of every submodule
    are silenced meanwhile (the dicts emptied and refilled in place: their handles stay valid).

    Silenced where the swap keeps some of the modules run (BERT's output LayerNorm, an
    encoder-decoder layer's norms): a forward hook there fired twice per swap on the check's
    random tensors, which an activation-recording hook then kept (review, session 23). Hooks on
    modules the swap takes out refuse the block anyway. Not silenced in the structural check,
    whose blocks are taken out whole: a hooked block must fail that check (its cached verdict
    and its reduced copy would not carry the hook)."""

    def __init__(self, module: nn.Module, mode: bool, silence_hooks: bool = False) -> None:
        self.module, self.mode, self.silence = module, mode, silence_hooks
        self.flags = [(m, m.training) for m in module.modules()]
        self.hooks: list[tuple[dict[Any, Any], dict[Any, Any]]] = []

    def __enter__(self) -> None:
        self.module.train(self.mode)
        for m in self.module.modules() if self.silence else ():
            for name in _HOOK_DICTS:
                hooks = getattr(m, name, None)
                if isinstance(hooks, dict) and hooks:
                    self.hooks.append((hooks, dict(hooks)))
                    hooks.clear()

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag
        for hooks, saved in self.hooks:
            hooks.update(saved)
        self.hooks.clear()


#: Recipes found per block structure (class, children, dropout rates): blocks of one model share
#: their forward code, so the check runs once per structure, not once per block.
_RECIPES: dict[tuple[Any, ...], _Recipe | None] = {}


def _structure(module: nn.Module, drops: list[float]) -> tuple[Any, ...]:
    """What the check's verdict depends on: the class (its forward code), the children (kind,
    settings, parameter shapes), the dropout rates and the instance's plain settings."""
    children = tuple(
        (
            name,
            "Linear" if isinstance(child, nn.Linear) else repr(child),
            tuple(tuple(p.shape) for p in child.parameters()),
        )
        for name, child in module.named_children()
    )
    # Hooks change what a block computes: a hooked block is checked on its own (by the hooks'
    # identities), never given the verdict of an unhooked one of the same structure.
    hooks = tuple(
        id(h)
        for m in module.modules()
        for d in (m._forward_hooks, m._forward_pre_hooks)
        for h in d.values()
    )
    return (type(module), children, tuple(drops), plain_settings(module), hooks, _instance(module))


def _instance(module: nn.Module) -> tuple[Any, ...]:
    """What else of the block and its modules a forward may read: private plain attributes
    (``self._scale``), callables held as attributes (``self.act_fn = F.silu``, a lambda, a
    ``forward`` replaced on the instance: by identity) and the blocks' own buffer values (a
    scale buffer). A block of the same class and shapes otherwise got an earlier block's
    verdict, even within one swap: a scaled block swapped as a plain one, a SiLU block reported
    as GELU (review, session 25). Buffer values enter by digest; callables by themselves (the
    key holds them, so no other object can take their id)."""
    out: list[Any] = []
    for name, m in module.named_modules():
        own: list[tuple[Any, ...]] = []
        for k, v in vars(m).items():
            if k == "training" or (k.startswith("_") and isinstance(v, dict)):
                continue  # (nn.Module's own registries; the training flag)
            if type(v) in (bool, int, float, str, type(None)):
                own.append((k, v))
            elif callable(v) and not isinstance(v, (nn.Module, type)):
                # the function itself, not its id: held by the key, its id cannot be reused by
                # another callable while the verdict is cached (unhashable ones: no sharing)
                fn = getattr(v, "__func__", v)
                try:
                    hash(fn)
                except TypeError:
                    fn = object()
                own.append((k, "callable", fn))
        for k, b in m._buffers.items():
            if b is None or b.is_meta:
                own.append((k, None if b is None else ("meta", b)))  # (held: no id reuse)
            else:  # (the values by digest: hashable, NaN-safe, any size)
                raw = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                digest = hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest()
                own.append((k, "buffer", str(b.dtype), tuple(b.shape), digest))
        out.append((name, tuple(sorted(own, key=lambda kv: str(kv[0])))))
    return tuple(out)


def _analyse(module: nn.Module) -> _Form | None:
    """The block's form, checked against its own forward pass, or ``None``.

    The check runs the block's ``forward`` with fresh weights (``torch.func.functional_call``:
    float32, on the CPU, drawn from a private generator) and compares it with each candidate
    form computed from the same weights. Fresh weights make the check independent of the
    block's own: a zero-initialised output layer would make every form agree, bf16 roundings
    are a few percent of the output (too coarse to tell GELU from SiLU), and weights on the
    ``meta`` device have no values at all. The verdict holds for every block of the same
    structure and is cached."""
    parts = _parts(module)
    if parts is None:
        return None
    linears, acts, drops = parts
    if not all(p.dtype.is_floating_point for p in module.parameters()):
        return None
    key = _structure(module, drops)
    if key not in _RECIPES:
        if len(_RECIPES) >= 256:
            _RECIPES.clear()
        _RECIPES[key] = _checked_recipe(module, linears, acts, drops)
    recipe = _RECIPES[key]
    if recipe is None:
        return None
    own = dict(module.named_children())
    functional = dict(_FUNCTIONAL_ACTS)
    up = own[recipe.up] if recipe.up is not None else None
    return _Form(
        recipe.kind,
        own[recipe.fc1],  # type: ignore[arg-type]
        own[recipe.fc2],  # type: ignore[arg-type]
        up,  # type: ignore[arg-type]
        recipe.gate_first,
        own[recipe.act] if recipe.act is not None else functional[recipe.act_name],
        recipe.act_name,
        recipe.drop,
        recipe.residual,
    )


def _has_hooks(module: nn.Module) -> bool:
    """Whether the block or any module in it has hooks (forward, pre-forward or backward)."""
    return bool(hooked_modules(module))


def _checked_recipe(
    module: nn.Module, linears: list[nn.Linear], acts: list[nn.Module], drops: list[float]
) -> _Recipe | None:
    """:func:`_check` of the block itself where it is small (at most :data:`_FULL_CHECK_MAX`
    weight elements: a forward that branches on its real widths is checked as it will run),
    else of a reduced copy (:func:`_tiny_widths`, :func:`_reduced_copy`: milliseconds and no
    real allocation for a 70B-sized block on ``meta``), and of the block itself only where the
    copy fails (a forward that reads widths from elsewhere, e.g. its config). The recipe names
    children, so the copy's verdict holds for the block."""
    # (a block with hooks is checked itself: the copy would not carry them)
    if not _has_hooks(module) and sum(lin.weight.numel() for lin in linears) > _FULL_CHECK_MAX:
        names = {id(child): name for name, child in module.named_children()}
        tiny = _tiny_widths(linears)
        reduced = (
            _reduced_copy(module, tuple(names[id(lin)] for lin in linears), tiny)
            if tiny is not None
            else None
        )
        if reduced is not None:
            own = dict(reduced.named_children())
            small = [own[names[id(lin)]] for lin in linears]
            recipe = _check(reduced, small, acts, drops)  # type: ignore[arg-type]
            if recipe is not None:
                return recipe
    return _check(module, linears, acts, drops)


def _check(
    module: nn.Module, linears: list[nn.Linear], acts: list[nn.Module], drops: list[float]
) -> _Recipe | None:
    names = {id(child): name for name, child in module.named_children()}
    layouts = _layouts(linears)
    if not layouts:
        return None
    acts_tried: list[tuple[str | None, str, Any]] = (
        [(names[id(acts[0])], activation_name(acts[0]), acts[0])]
        if acts
        else [(None, name, fn) for name, fn in _FUNCTIONAL_ACTS]
    )
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, Tensor] = {}
    for lin in linears:
        tensors.update(fresh_linear(lin, gen, names[id(lin)]))
    for name, buf in module.named_buffers():
        if buf.device.type == "meta":
            return None
        tensors[name] = buf.detach().to("cpu")
    inputs: dict[int, Tensor] = {}

    # Some MLPs take the residual as a second argument and add it (MPT, BLOOM). It is fed a
    # random tensor of the output's shape, so that the check sees whether it is simply added.
    residual: list[Tensor] = []

    def reference(x: Tensor, training: bool, seed: int) -> Any:
        with seeded(seed), torch.no_grad(), _CheckRun(module, training):  # CPU tensors
            if not residual:
                return torch.func.functional_call(module, tensors, (x,))
            return torch.func.functional_call(module, tensors, (x, residual[0]))

    def candidate(recipe: _Recipe, act: Any, x: Tensor, training: bool, seed: int) -> Tensor:
        with seeded(seed), torch.no_grad():  # CPU tensors only
            y = _apply(recipe, tensors, act, x, training)
            return y + residual[0] if recipe.residual else y

    found: tuple[_Recipe, Any] | None = None
    try:
        for kind, fc1, fc2, up in layouts:
            d_in = fc1.in_features
            if d_in not in inputs:
                inputs[d_in] = torch.randn(2, 3, d_in, generator=gen)
            x = inputs[d_in]
            residual.clear()
            try:
                ref = reference(x, False, 0)
            except TypeError:  # forward(hidden_states, residual)?
                residual.append(torch.randn(2, 3, fc2.out_features, generator=gen))
                ref = reference(x, False, 0)
            for gate_first in (True, False) if kind == "packed" else (True,):
                for act_child, act_name, act in acts_tried:
                    recipe = _Recipe(
                        kind,
                        names[id(fc1)],
                        names[id(fc2)],
                        names[id(up)] if up is not None else None,
                        gate_first,
                        act_child,
                        act_name,
                        (0.0, 0.0),
                        bool(residual),
                    )
                    if _close(ref, candidate(recipe, act, x, False, 0)):
                        found = recipe, act
                        break
                if found is not None:
                    break
            if found is not None:
                break
        if found is None:
            return None
        recipe, act = found
        live = [q for q in drops if q > 0]
        if not live:
            return recipe
        if len(live) > 2:
            return None
        x = inputs[next(lin for lin in linears if names[id(lin)] == recipe.fc1).in_features]
        ref = reference(x, True, 1)
        options = [(live[0], 0.0), (0.0, live[0])] if len(live) == 1 else [tuple(live)]
        if len(live) == 2:
            options.append((live[1], live[0]))
        for option in options:
            placed = dataclasses.replace(recipe, drop=(float(option[0]), float(option[1])))
            if _close(ref, candidate(placed, act, x, True, 1)):
                return placed
        return None
    except Exception:  # a forward that needs more than the hidden states, or fails otherwise
        return None


#: Verdicts of :func:`verify_split_gated` per block structure.
_SPLIT_VERDICTS: dict[tuple[Any, ...], bool] = {}

#: Widths of the reduced copy that :func:`verify_split_gated` runs, in the order in which the
#: block's distinct widths appear among (input, hidden, output).
_TINY_WIDTHS = (8, 16, 12)

#: Largest block (elements of its three weight matrices) that :func:`verify_split_gated` also
#: checks at full size when its reduced copy fails (a forward that depends on the real widths).
_FULL_CHECK_MAX = 1 << 22


def verify_split_gated(module: nn.Module, gate: str, up: str, down: str, act: str) -> bool:
    """Whether ``module``'s forward is exactly ``down(act(gate x) * up x)`` (the children of
    these names), in eval *and* in training mode, checked like the structural adapter's forms:
    fresh float32 CPU weights (:func:`fresh_linear`) through ``torch.func.functional_call`` on a
    random ``(2, 3, in_features)`` input, under a forked CPU RNG, training flags restored. A block
    with anything else in its forward (a norm, scales, clamping, a dropout in training mode, other
    arguments) fails. The verdict depends only on the structure and is cached.

    The check runs on a reduced copy of the block (:func:`_reduced_split`: the same class,
    instance settings and activation module, ``Linear`` layers of the same classes and bias
    flags at widths 8/16/12, int settings equal to a width mapped with it), so its cost does not
    grow with the block: a LLaMA-70B-shaped model on ``meta`` is checked in milliseconds with no
    real allocation. A small block (at most :data:`_FULL_CHECK_MAX` weight elements) is
    checked itself, at its real widths, so a forward that branches on them is checked as it will
    run; only larger blocks rely on the reduced copy (a large block whose forward branches on
    its own width could pass it: the remaining risk of checking a model on ``meta`` in
    milliseconds). A block with forward hooks (on it or its layers) is not this form: the
    new block would not carry them."""
    own = dict(module.named_children())
    lins = [own.get(n) for n in (gate, up, down)]
    act_mod = own.get(act)
    if not all(isinstance(lin, nn.Linear) for lin in lins) or not isinstance(act_mod, nn.Module):
        return False
    if not all(p.dtype.is_floating_point for p in module.parameters()):
        return False
    # Hooks on the block or its layers change what it computes, and the new block would not
    # carry them: not this form (the reduced copy below would not see them either).
    if _has_hooks(module):
        return False
    key = ("split_gated", gate, up, down, act, *_structure(module, []))
    if key not in _SPLIT_VERDICTS:
        if len(_SPLIT_VERDICTS) >= 256:
            _SPLIT_VERDICTS.clear()
        names = (gate, up, down, act)
        g, u, d = lins
        assert isinstance(g, nn.Linear) and isinstance(u, nn.Linear) and isinstance(d, nn.Linear)
        reduced = _reduced_split(module, names)
        small = g.weight.numel() + u.weight.numel() + d.weight.numel() <= _FULL_CHECK_MAX
        if small:
            # Small enough to check itself: at its real widths, so a forward that branches on
            # them (x.shape[-1], self.intermediate_size) is checked as it will run.
            ok = _verify_split(module, names)
        else:
            ok = reduced is not None and _verify_split(reduced, names)
        _SPLIT_VERDICTS[key] = ok
    return _SPLIT_VERDICTS[key]


def _reduced_split(module: nn.Module, names: tuple[str, str, str, str]) -> nn.Module | None:
    """A copy of ``module`` at tiny widths for :func:`verify_split_gated`, or ``None`` where the
    block holds anything whose size cannot be reduced (a buffer, another child with weights)."""
    gate, up, down, _ = names
    children = dict(module.named_children())
    g, d = children.get(gate), children.get(down)
    if not isinstance(g, nn.Linear) or not isinstance(d, nn.Linear):
        return None
    tiny: dict[int, int] = {}
    for width, small in zip(
        (g.in_features, g.out_features, d.out_features), _TINY_WIDTHS, strict=True
    ):
        tiny.setdefault(width, small)
    return _reduced_copy(module, (gate, up, down), tiny)


#: Tiny widths for the structural check's reduced copy (:func:`_tiny_widths`): no two of them,
#: nor twice any of them, are in a ratio of 2, so the copy has exactly the real block's
#: doublings (a packed gate-and-up layer is twice the hidden width) and no others.
_TINY_BASES = (8, 12, 20, 28, 44, 52, 68, 76)


def _tiny_widths(linears: list[nn.Linear]) -> dict[int, int] | None:
    """A map of the layers' distinct widths to tiny ones that keeps every equality and every
    doubling among them (the relations the forms are told apart by, see :func:`_layouts`), or
    ``None`` where there are too many distinct widths."""
    widths = sorted({w for lin in linears for w in (lin.in_features, lin.out_features)})
    tiny: dict[int, int] = {}
    bases = iter(_TINY_BASES)
    for w in widths:
        if w % 2 == 0 and w // 2 in tiny:
            tiny[w] = 2 * tiny[w // 2]
            continue
        base = next(bases, None)
        if base is None:
            return None
        tiny[w] = base
    return tiny


def _reduced_copy(
    module: nn.Module, linear_names: tuple[str, ...], tiny: dict[int, int]
) -> nn.Module | None:
    """A copy of ``module`` (:func:`~glu_probe.swap.origin._shell`: same class and instance
    settings) whose ``Linear`` children ``linear_names`` are shells of the same classes and bias
    flags at the widths ``tiny`` maps theirs to, int settings equal to a width mapped with it
    (e.g. LlamaMLP's ``hidden_size``), every other child shared; ``None`` where the block holds
    anything whose size cannot be reduced (a buffer, another child with weights, a width that
    ``tiny`` does not map, a ``Linear`` subclass with more parameters)."""
    from glu_probe.swap.origin import _shell

    if any(True for _ in module.buffers()):
        return None
    children = dict(module.named_children())
    for name, child in children.items():
        if name not in linear_names and any(True for _ in child.parameters()):
            return None

    def reduced_linear(lin: nn.Linear) -> nn.Module:
        shell: Any = _shell(lin, {})
        n_in, n_out = tiny.get(lin.in_features), tiny.get(lin.out_features)
        if n_in is None or n_out is None:
            raise KeyError(lin)  # a width that is none of the block's: not our form
        shell.in_features, shell.out_features = n_in, n_out
        shell.register_parameter("weight", nn.Parameter(torch.empty(n_out, n_in)))
        bias = nn.Parameter(torch.empty(n_out)) if lin.bias is not None else None
        shell.register_parameter("bias", bias)
        if set(shell._parameters) != set(lin._parameters):
            raise KeyError(lin)  # a Linear subclass with more parameters
        return shell

    try:
        small_children = {
            n: reduced_linear(c) if n in linear_names else c  # type: ignore[arg-type]
            for n, c in children.items()
        }
    except KeyError:
        return None
    copy = _shell(module, small_children)
    for k, v in vars(module).items():
        if type(v) is int and v in tiny and not k.startswith("_"):
            copy.__dict__[k] = tiny[v]
    return copy


def _verify_split(module: nn.Module, names: tuple[str, str, str, str]) -> bool:
    gate, up, down, act_name = names
    own = dict(module.named_children())
    g, u, d = (own[n] for n in (gate, up, down))
    act = own[act_name]
    assert isinstance(g, nn.Linear) and isinstance(u, nn.Linear) and isinstance(d, nn.Linear)
    if g.in_features != u.in_features or g.out_features != u.out_features:
        return False
    if d.in_features != g.out_features:
        return False
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, Tensor] = {}
    for lin, name in zip((g, u, d), (gate, up, down), strict=True):
        tensors.update(fresh_linear(lin, gen, name))
    for name, buf in module.named_buffers():
        if buf.device.type == "meta":
            return False
        tensors[name] = buf.detach().to("cpu")
    recipe = _Recipe("split", gate, down, up, True, act_name, activation_name(act), (0.0, 0.0))
    x = torch.randn(2, 3, g.in_features, generator=gen)
    try:
        for training, seed in ((False, 0), (True, 1)):
            with seeded(seed), torch.no_grad(), _CheckRun(module, training):  # CPU only
                ref = torch.func.functional_call(module, tensors, (x,))
            with seeded(seed), torch.no_grad():  # CPU tensors only
                want = _apply(recipe, tensors, act, x, training)
            if not _close(ref, want):
                return False
    except Exception:  # needs other arguments, or fails otherwise
        return False
    return True


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

    def install(self, root: nn.Module, path: str, old: nn.Module, new: nn.Module) -> None:
        form = self._forms.get(old) or _analyse(old)
        if form is not None and form.residual:
            new = ResidualAddMLP(new).train(old.training)
        super().install(root, path, old, new)

    def config_keys(self, model: nn.Module) -> tuple[str | None, str | None]:
        return width_key(model), None
