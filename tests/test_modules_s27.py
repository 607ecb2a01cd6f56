"""Findings of the session-27 review of the blocks (each test fails on the code before it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glu_probe import SwiGLU, activation_math
from glu_probe.activation_math import act


def test_align_to_takes_numpy_integers_as_timm_does():
    """timm's SwiGLU rounds with np.int64(8); ours refused it (widths already took numpy ints)."""
    assert SwiGLU(8, 10, align_to=np.int64(8)).hidden_features == 16
    assert SwiGLU(8, 10, align_to=np.int32(0)).hidden_features == 10
    for bad in (True, -8, 8.0, "8"):
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            SwiGLU(8, 10, align_to=bad)


def test_activation_names_follow_the_docstring():
    """The module docstring said any unknown name is the identity; it raises (documented now)."""
    t = torch.linspace(-2, 2, 5)
    assert torch.equal(act("identity", t), t)
    with pytest.raises(ValueError, match="unknown activation"):
        act("bilinear", t)
    assert "any other name raises" in (activation_math.__doc__ or "")
