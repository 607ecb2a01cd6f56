"""Strict JSON for what glu-probe writes: non-finite floats become ``null``.

Python's :mod:`json` writes ``NaN`` and ``Infinity`` by default, which is not JSON: browsers'
``JSON.parse``, ``jq`` and most other readers reject the file. κ is infinite for a singular K
and a gap or a crossing step may be unknown, so every file and every ``--json`` output goes
through :func:`dumps`.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "strict"]


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) as ``None``, through dicts, lists and
    tuples (tuples become lists, as :mod:`json` writes them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """:func:`json.dumps` of :func:`strict` ``(value)``, refusing any non-finite float left
    (``allow_nan=False``); other objects as ``str`` unless ``default`` is given."""
    kwargs.setdefault("default", str)
    return json.dumps(strict(value), allow_nan=False, **kwargs)
