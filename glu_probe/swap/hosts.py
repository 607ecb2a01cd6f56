"""Where a block lives: the Hugging Face configs and host models above it, and paths relative
to them.

Shared by the initialisation (whose rules apply), the config record and update (which config
describes a block) and the rollback snapshot (which configs to save), so it sits below all of
them.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _hf_config(model: nn.Module) -> Any:
    try:
        config = getattr(model, "config", None)
    except Exception:  # a ``config`` property that fails (not loaded yet): no config to use
        return None
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        return config
    return None


def _holds_config(model: nn.Module) -> bool:
    """``model.config`` is its own (an instance or class attribute), not read through a
    forwarding ``__getattr__``."""
    return "config" in vars(model) or any("config" in vars(k) for k in type(model).__mro__)


def _is_pretrained(model: nn.Module) -> bool:
    return _hf_config(model) is not None and any(
        c.__name__ == "PreTrainedModel" for c in type(model).__mro__
    )


def _ancestors(root: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the modules above ``path``, nearest first, ``root`` (``""``) last."""
    parts = path.split(".") if path else []
    return [
        (".".join(parts[:k]), root.get_submodule(".".join(parts[:k])))
        for k in range(len(parts) - 1, -1, -1)
    ]


def config_owner(root: nn.Module, path: str) -> tuple[str, nn.Module, Any] | None:
    """The Hugging Face config that describes the block at ``path``, ``(owner path, owner,
    config)``, ``owner`` the outermost ``PreTrainedModel`` holding that config object (the
    outermost module holding it where none is a ``PreTrainedModel``); ``None`` if none.

    It is the config of the outermost model above the block that holds one (a wrapped model's
    own config: a ``LightningModule`` holding a ``GPT2LMHeadModel``; T5's root config, not the
    private copies its stacks hold), except where the nearest one is a sub-config of it (a
    composite model's ``text_config`` / ``vision_config``, as in LLaVA): then that sub-config.
    A wrapper that only forwards attribute reads to the model it wraps (``torch.compile``'s
    ``OptimizedModule``, FSDP) does not hold the config: the record's paths are the model's,
    which is what gets saved (review, session 25: they began with ``_orig_mod.``). Nor does a
    wrapper that exposes its model's config as its own (``self.config = net.config``, common in
    a ``LightningModule``): the model under it that is a ``PreTrainedModel`` owns it. Nor,
    likewise, does a wrapper that is no ``PreTrainedModel`` holding a copy of its model's config
    (``self.config = copy.deepcopy(net.config)``): where a ``PreTrainedModel`` under it holds a
    config of the same class, that model's config owns the blocks under it, as it is the one
    saved (the record went on the wrapper's copy with paths beginning ``net.``, and the saved
    config had none; re-review, session 27)."""
    holders = [
        (p, m, c)
        for p, m in reversed(_ancestors(root, path))
        if (c := _hf_config(m)) and _holds_config(m)
    ]
    if not holders:
        return None
    if not _is_pretrained(holders[0][1]):
        inner = next((k for k, (_, m, _c) in enumerate(holders) if _is_pretrained(m)), None)
        if inner is not None and type(holders[inner][2]) is type(holders[0][2]):
            # (the same object is handled below: the wrapper exposes the model's own config)
            holders = holders[inner:] if holders[inner][2] is not holders[0][2] else holders
    outer, near = holders[0][2], holders[-1][2]
    config = near if any(v is near for v in vars(outer).values()) else outer
    owner = _saved_holder([(p, m) for p, m, c in holders if c is config])
    return owner[0], owner[1], config


def _saved_holder(holders: list[tuple[str, nn.Module]]) -> tuple[str, nn.Module]:
    """Of the modules holding one config object (``(path, module)``, outermost first), the one
    that gets saved: the outermost ``PreTrainedModel`` (``GPT2LMHeadModel``, not the
    ``GPT2Model`` it holds, which shares the config), else the outermost. A wrapper holding the
    same object (``self.config = net.config``) took over the record, whose paths then began
    with ``net.``: the recipe on the saved ``net`` neither excluded nor found them (re-review,
    session 27)."""
    return next(((p, m) for p, m in holders if _is_pretrained(m)), holders[0])


def _under(path: str, owner_path: str) -> bool:
    """Whether ``path`` is at or below ``owner_path`` (``""``: the root, which holds all)."""
    return not owner_path or path == owner_path or path.startswith(owner_path + ".")


def _relative(path: str, owner_path: str) -> str:
    """``path`` relative to ``owner_path`` (a path at or below it)."""
    return path[len(owner_path) + 1 :] if owner_path else path
