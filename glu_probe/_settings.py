"""The plain settings of a module: what the caches keyed on a model's structure also hold.

A forward may branch on a Python attribute (a repeat count, a ratio, an attention
implementation) that no parameter shape shows. Two caches key on these: the swap's verdicts
(:mod:`glu_probe.swap`) and the structured NTK's measured memory profiles
(:mod:`glu_probe.ntk.structured`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

_PLAIN = (bool, int, float, str, type(None))


def _plain_items(obj: Any, private: bool) -> tuple[tuple[str, Any], ...]:
    return tuple(
        sorted(
            (k, v)
            for k, v in vars(obj).items()
            if type(v) in _PLAIN and k != "training" and (private or not k.startswith("_"))
        )
    )


def plain_settings(module: nn.Module, held: bool = False) -> tuple[tuple[str, Any], ...]:
    """The module's public bool/int/float/str/None attributes (not the training flag), sorted by
    name. ``held``: also the plain attributes of the settings objects it holds (an HF
    ``config``, a dataclass or a namespace; private ones included there, since HF keeps the
    attention implementation in ``config._attn_implementation_internal``). The swap leaves them
    out: it rewrites the host's config itself, and its verdicts depend on the block's own
    settings."""
    out = list(_plain_items(module, private=False))
    if not held:
        return tuple(out)
    for k, v in vars(module).items():
        if (
            not isinstance(v, (Tensor, nn.Module, dict, list, tuple, set, type))
            and type(v) not in _PLAIN
            and hasattr(v, "__dict__")
            and not callable(v)
        ):
            out.append((k, _plain_items(v, private=True)))
    return tuple(sorted(out, key=lambda kv: kv[0]))
