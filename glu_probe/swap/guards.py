"""Safety checks around one replacement.

Refuse a block whose hooks, parametrizations or tied weights the new block would lose; carry its
frozen flags and dropout modes over; warn about mixed dtypes and same-kind re-swaps; and the
snapshot that puts the model back if installing fails. Each check is a small rule with its own
history, kept out of the driver's flow.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from glu_probe.modules import activation_name

from .._warnings import external_stacklevel
from .base import MLPAdapter, MLPSpec, UnsupportedModelError
from .hosts import _hf_config
from .weight_init import _source_roles


def _keep_dropout_modes(path: str, old: nn.Module, new: nn.Module, adapter: MLPAdapter) -> None:
    """Carry dropout modes that differ from the block's own: a model in training mode whose
    dropouts the user put in eval mode (switched off) kept them off only until the swap, whose
    ``new.train(old.training)`` turned the new block's back on (review, session 25). A dropout
    takes the mode of the source's one of the same name (timm's ``drop1`` / ``drop2``), else
    the source dropouts' common mode; modes that differ with no such match get a warning."""
    kinds = (nn.modules.dropout._DropoutNd,)
    dropped = {id(m) for m in adapter.dropped_modules(old)}
    sources = {n: m for n, m in old.named_modules() if isinstance(m, kinds) and id(m) in dropped}
    modes = {m.training for m in sources.values()}
    if not sources or modes == {old.training}:
        return  # new.train(old.training) already gave every dropout its mode
    unmatched = []
    for name, m in new.named_modules():
        if not isinstance(m, kinds):
            continue
        src = sources.get(name)
        if src is not None:
            m.train(src.training)
        elif len(modes) == 1:
            m.train(next(iter(modes)))
        else:
            unmatched.append(name)
    if unmatched:
        warnings.warn(
            f"swap_mlp: {path}'s dropouts are in different modes "
            f"({', '.join(f'{n}: {m.training}' for n, m in sources.items())}); the new "
            f"block's {unmatched} are in the block's mode (training={old.training}): set "
            "their modes again if needed",
            stacklevel=external_stacklevel(),
        )


def _keep_frozen(path: str, old: nn.Module, new: nn.Module, adapter: MLPAdapter) -> None:
    """Carry the source block's frozen state (``requires_grad``) to ``new``: a frozen block
    stays frozen; a partly frozen one (BitFit: biases train, weights do not) keeps its flags per
    layer role, input layers to ``fc1``/``fc1_g``/``fc1_x``, output layer to ``fc2``, weight to
    weight and bias to bias. Only the fully frozen case was kept before session 18: a partly
    frozen block came back fully trainable, silently (review). Where the roles cannot be mapped
    (a rewired block, input layers frozen differently from each other), flags uniform per kind
    (every weight frozen, every bias trained) still carry over; otherwise a warning says that
    the new block trains every parameter."""
    flags = [p.requires_grad for p in adapter.source_parameters(old)]
    if all(flags):
        return
    if not any(flags):
        new.requires_grad_(False)  # a frozen block stays frozen
        return
    roles = _source_roles(old)
    inputs = [m for n, m in new.named_children() if n in ("fc1", "fc1_g", "fc1_x")]
    output = getattr(new, "fc2", None)
    if roles is not None and inputs and isinstance(output, nn.Module):
        ins, out = roles
        plan: list[tuple[list[nn.Module], str, bool]] = []
        for names, targets in ((ins, inputs), ((out,), [output])):
            for kind in ("weight", "bias"):
                seen = {
                    t.requires_grad
                    for n in names
                    if isinstance(t := getattr(getattr(old, n, None), kind, None), torch.Tensor)
                }
                if seen:
                    plan.append(
                        (targets, kind, seen.pop()) if len(seen) == 1 else ([], kind, False)
                    )
        if plan and all(targets for targets, _, _ in plan):
            for targets, kind, flag in plan:
                for module in targets:
                    param = getattr(module, kind, None)
                    if isinstance(param, nn.Parameter):
                        param.requires_grad_(flag)
            return
    # No layer roles (a rewired block such as BERT's, a block with a norm inside), or input
    # layers frozen differently: the flags may still be uniform per kind (BitFit freezes every
    # weight and trains every bias), and then weights follow weights, biases biases.
    own = {id(p) for p in adapter.source_parameters(old)}
    kinds: dict[str, set[bool]] = {}
    for name, p in old.named_parameters():
        if id(p) in own:
            kinds.setdefault(name.rsplit(".", 1)[-1], set()).add(p.requires_grad)
    if kinds and all(len(v) == 1 for v in kinds.values()):
        for name, p in new.named_parameters():
            kind = name.rsplit(".", 1)[-1]
            if kind in kinds:
                p.requires_grad_(next(iter(kinds[kind])))
        return
    warnings.warn(
        f"swap_mlp: the block at {path or '<root>'} is partly frozen ({sum(flags)} of "
        f"{len(flags)} parameter tensors train) in a way that does not map onto the new "
        "block's layers; the new block trains all its parameters",
        UserWarning,
        stacklevel=external_stacklevel(),
    )


def _same_kind(spec: MLPSpec, new: nn.Module, hidden: int) -> bool:
    """Whether the block built for ``spec`` computes the function class the replaced block had:
    same gating, activation and width (a same-variant swap, which only re-initialises)."""
    act = getattr(new, "act", None)
    try:
        name = activation_name(act) if isinstance(act, nn.Module) else None
    except Exception:
        return False
    return (
        name is not None
        and name == spec.activation
        and bool(getattr(new, "gated", False)) == bool(spec.gated)
        and hidden == spec.hidden_features
    )


class _Snapshot:
    """The attributes of every module of a model and of every Hugging Face config it holds
    (sub-configs included), to put back after a failed swap. Shallow: each module's class
    (a parametrization changes it), its attributes and the contents of every dict or set it
    holds (children, parameters, buffers, hook dicts, the non-persistent buffer set) are
    restored, and the configs' values; tensors are not copied (the swap changes none in
    place)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: list[tuple[nn.Module, type, dict[str, Any], dict[str, Any]]] = []
        for m in model.modules():
            attrs = dict(vars(m))
            contents = {
                k: dict(v) if isinstance(v, dict) else set(v)
                for k, v in attrs.items()
                if isinstance(v, dict | set)
            }
            self.modules.append((m, type(m), attrs, contents))
        configs: dict[int, Any] = {}
        todo = [c for m in model.modules() if (c := _hf_config(m)) is not None]
        while todo:
            c = todo.pop()
            if id(c) in configs:
                continue
            configs[id(c)] = c
            todo.extend(
                v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")
            )
        self.configs = [(c, dict(vars(c))) for c in configs.values()]

    def restore(self) -> None:
        """Put everything back. Only containers whose contents changed are rewritten (a dict
        subclass may refuse ``update``: diffusers' ``FrozenDict``, which every diffusers model
        holds, made the rollback itself fail, hiding the swap's error and restoring nothing;
        re-review, session 22), and one that cannot be is left with a warning while the rest,
        configs included, is still restored."""
        failed: list[str] = []
        for m, cls, attrs, contents in self.modules:
            for key, saved in contents.items():
                now = attrs[key]
                if _same_contents(now, saved):
                    continue
                try:
                    now.clear()
                    now.update(saved)
                except Exception as err:
                    failed.append(f"{type(m).__name__}.{key} ({type(err).__name__}: {err})")
            if type(m) is not cls:
                m.__class__ = cls
            vars(m).clear()
            vars(m).update(attrs)
        for c, attrs in self.configs:
            vars(c).clear()
            vars(c).update(attrs)
        if failed:
            warnings.warn(
                "swap_mlp: rolling back the failed swap could not restore "
                + ", ".join(failed[:4])
                + (", ..." if len(failed) > 4 else ""),
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )


def _same_contents(now: Any, saved: Any) -> bool:
    """Whether a dict holds the same keys bound to the same objects (identity: values may be
    tensors), or a set the same members, as its snapshot."""
    if isinstance(saved, set):
        return bool(now == saved)
    return bool(now.keys() == saved.keys() and all(now[k] is v for k, v in saved.items()))


#: The hook registries of ``nn.Module`` (the new block would not carry them).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _has_own_hooks(module: nn.Module) -> bool:
    return any(getattr(module, d, None) for d in _HOOK_DICTS)


def hooked_modules(module: nn.Module) -> list[str]:
    """Names (``""``: the block itself) of the modules in ``module`` with forward, pre-forward
    or backward hooks: a swap builds a new block, which would not carry them."""
    return [name for name, m in module.named_modules() if _has_own_hooks(m)]


def _warn_mixed_dtypes(path: str, old: nn.Module, new: nn.Module, adapter: MLPAdapter) -> None:
    """Warn where the replaced block's floating parameters have several dtypes (T5 keeps
    ``wo`` in float32 in a 16-bit model, ``_keep_in_fp32_modules``): the new block has one."""
    olds = {p.dtype for p in adapter.source_parameters(old) if p.is_floating_point()}
    if len(olds) > 1:
        news = {p.dtype for p in new.parameters() if p.is_floating_point()}
        warnings.warn(
            f"swap_mlp: the block at {path} holds parameters in several dtypes "
            f"({', '.join(sorted(str(d) for d in olds))}); the new block holds "
            f"{', '.join(sorted(str(d) for d in news))} (a layer the host kept in float32, such "
            "as T5's wo, is not kept so): cast the new block's layers if the model needs it",
            UserWarning,
            stacklevel=external_stacklevel(),
        )


def _check_hooks(module: nn.Module, adapter: MLPAdapter) -> None:
    """Refuse a block with hooks or parametrizations on a module the swap takes out: the new
    block would not carry them (and a parametrization's tensors would count as parameters)."""
    from torch.nn.utils import parametrize

    dropped = {id(m) for m in adapter.dropped_modules(module)}
    checks = (
        (
            parametrize.is_parametrized,
            "parametrizations ({where}: weight_norm, spectral_norm, ...), which the new block "
            "would not carry (and whose extra tensors would be counted as its parameters): "
            "remove them (torch.nn.utils.parametrize.remove_parametrizations), swap, then "
            "register them on the new block's layers",
        ),
        (
            _has_own_hooks,
            "hooks ({where}), which the new block would not carry (a swap that dropped them "
            "would change what the model computes or records): remove them (handle.remove()), "
            "swap, then register them on the new block at this path",
        ),
    )
    for found, message in checks:
        names = [n for n, m in module.named_modules() if id(m) in dropped and found(m)]
        if names:
            where = ", ".join(repr(n) if n else "the block itself" for n in names[:4])
            raise UnsupportedModelError("it has " + message.format(where=where))


def _check_tied(
    path: str,
    block: nn.Module,
    adapter: MLPAdapter,
    paths: list[str],
    param_names: dict[int, list[str]],
) -> None:
    """Refuse a block whose replaced parameters are also used outside it (module docstring).

    ``paths`` are all the paths of the block module, aliases included: a name reaching a
    parameter through any of them is the block's own."""
    for q in adapter.source_parameters(block):
        names = param_names.get(id(q), [])
        inside = [n for n in names if any(n.startswith(p + ".") for p in paths)]
        outside = [n for n in names if n not in inside]
        if outside:
            shown = ", ".join(outside[:3]) + (", ..." if len(outside) > 3 else "")
            raise UnsupportedModelError(
                f"the parameter {inside[0] if inside else '?'} of the MLP block at {path} "
                f"({type(block).__name__}) is also {shown}: weights tied between distinct "
                "blocks (or to a non-MLP module) would be silently untied by a swap, and its "
                "parameter count would be wrong. Untie them first, or share the whole block "
                "module (which is kept shared)"
            )
