"""Attribute glu-probe's warnings to the user's line, not to the package's internals.

A fixed ``stacklevel`` is right for one call path only: the same warning is reached from
``ntk_spectrum`` directly, through ``allows_autograd``'s wrapper, from the callbacks, or from a
helper two calls deep, and a fixed count pointed into ``spectrum.py`` on most of them. Python
3.12's ``warnings.warn(skip_file_prefixes=...)`` does what :func:`external_stacklevel` does,
but the package supports Python 3.10, hence this small frame walk.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

import torch.utils._contextlib as _torch_contextlib

__all__ = ["external_stacklevel"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: Decorator frames that sit between the package's own frames (``torch.no_grad()`` used as a
#: decorator, ``contextlib.contextmanager``): skipped like the package's.
_WRAPPER_FILES = frozenset(
    os.path.abspath(f) for f in (_torch_contextlib.__file__, contextlib.__file__) if f
)


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or path in _WRAPPER_FILES


def external_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the calling frame that attributes the
    warning to the first frame outside glu-probe (and outside the decorator wrappers it uses).

    Evaluate it in the ``warnings.warn(...)`` call itself. Where every frame is the package's
    (``python -m glu_probe.cli``), the warning stays where it is raised (``stacklevel=1``).
    """
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 1
