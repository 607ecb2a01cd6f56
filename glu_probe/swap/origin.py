"""Parameter-free copies of a host's own blocks.

A block a swap built keeps a meta-device copy of the host's own block it replaced
(:data:`ORIGIN_ATTR`): a later swap of the same place initialises by the host's rules for that
block, and the config record tells blocks a swap built from the host's own. Host initialisation
runs the host's ``_init_weights`` on a stand-in of the source block. Both are shells
(:func:`_shell`): the source's class and settings with fresh hook dicts, so that nothing of the
live model is touched.
"""

from __future__ import annotations

import torch
from torch import nn

#: ``nn.Module``'s own bookkeeping containers (hooks, the non-persistent buffer set, ...), by
#: attribute name and type: a stand-in gets fresh empty ones, never the live module's.
_MODULE_CONTAINERS: dict[str, type] = {
    k: type(v) for k, v in vars(nn.Module()).items() if isinstance(v, dict | set)
}


def _shell(source: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A module of ``source``'s class and instance settings (``__init__`` not run) whose
    children are ``children``, with no parameters or buffers of its own and fresh, empty hook
    dicts and non-persistent buffer set: whatever is registered on it stays off ``source``.
    Other attributes (e.g. a ``config``) are shared by reference, read-only by convention."""
    shell = object.__new__(type(source))
    state = shell.__dict__
    state.update(source.__dict__)
    state.update({k: t() for k, t in _MODULE_CONTAINERS.items()})
    state["_is_full_backward_hook"] = None
    state["_modules"] = dict(children)
    return shell


#: Instance attribute (in ``__dict__``, not a registered sub-module) of a block a swap built:
#: a parameter-free, meta-device copy of the *first* block swapped out at its place (the
#: host's own class and layer names), which a later swap of the same place initialises from.
ORIGIN_ATTR = "_glu_probe_origin"


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (class, instance settings, children) whose parameters and buffers
    are meta tensors of the same shapes and dtypes, with fresh hook dicts: no storage, nothing
    shared with the live module but read-only attributes (a ``config``)."""
    children = {k: None if c is None else _meta_copy(c) for k, c in module._modules.items()}
    dup = _shell(module, children)  # type: ignore[arg-type]
    dup.__dict__.pop(ORIGIN_ATTR, None)
    for k, v in module._parameters.items():
        dup._parameters[k] = (
            None if v is None else nn.Parameter(torch.empty_like(v, device="meta"), v.requires_grad)
        )
    for k, b in module._buffers.items():
        dup._buffers[k] = None if b is None else torch.empty_like(b, device="meta")
    dup._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
    return dup


def _origin_of(block: nn.Module) -> nn.Module:
    """The block a swap's initialisation reads the host's rules from: for a block an earlier
    swap built, the copy of the host's own block it replaced (:data:`ORIGIN_ATTR`), else the
    block itself."""
    origin = block.__dict__.get(ORIGIN_ATTR)
    return origin if isinstance(origin, nn.Module) else block


def _stand_in(source: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A shallow stand-in for ``source`` (same class and instance settings) whose parameterised
    children are ``children`` only (:func:`_shell`): the host's ``_init_weights`` sees the new
    layers under the source's names, and nothing of the live model is touched."""
    kept = {
        n: c
        for n, c in source.named_children()
        if not any(True for _ in c.parameters()) and not any(True for _ in c.buffers())
    }
    return _shell(source, {**kept, **children})


def _built_by_swap(block: nn.Module) -> nn.Module | None:
    """The block an earlier swap built at this place (in ``block`` itself or, for a layer an
    adapter rewired in place, BERT's or OPT's, inside it), or ``None`` for a host's own block."""
    for m in block.modules():
        if ORIGIN_ATTR in vars(m):
            return m
    return None
