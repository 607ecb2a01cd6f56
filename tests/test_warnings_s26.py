"""Warnings are attributed to the user's line, not to glu-probe's internals (session 26).

A fixed ``stacklevel`` pointed into ``spectrum.py`` for the rank and convergence warnings of
``ntk_spectrum`` (two and three calls deep, behind the ``allows_autograd`` wrapper).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import glu_probe
from glu_probe._warnings import external_stacklevel
from glu_probe.ntk import NTKRankWarning, ntk_spectrum


def _caught(fn, category=Warning):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    hits = [w for w in caught if issubclass(w.category, category)]
    assert hits, [str(w.message) for w in caught]
    return hits


def _assert_here(hits):
    for w in hits:
        assert w.filename == __file__, (w.filename, w.lineno, str(w.message)[:80])


def test_rank_warning_of_the_dense_path_points_at_the_caller():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    x = torch.randn(10, 2, dtype=torch.float64)  # 10 rows, 3 parameters: rank 3
    _assert_here(_caught(lambda: ntk_spectrum(model, x, method="dense"), NTKRankWarning))


def test_lanczos_warnings_point_at_the_caller():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    x = torch.randn(200, 8, dtype=torch.float64)

    def run():
        ntk_spectrum(model, x, method="lanczos", max_matvecs=8, block_size=2)

    hits = _caught(run, RuntimeWarning)
    assert any("did not converge" in str(w.message) for w in hits)
    _assert_here(hits)


def test_narrowed_dtype_warning_points_at_the_caller():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    hits = _caught(
        lambda: ntk_spectrum(model, x, method="lanczos", dtype=torch.float32), UserWarning
    )
    assert any("float64" in str(w.message) for w in hits)
    _assert_here([w for w in hits if "float64 parameters" in str(w.message)])


def test_block_keyword_warning_points_at_the_caller():
    hits = _caught(lambda: glu_probe.SwiGLU(8, 16, not_a_keyword=1), UserWarning)
    _assert_here(hits)


def test_external_stacklevel_counts_package_frames_only():
    # Called from outside the package, the warning stays in the calling frame.
    assert external_stacklevel() == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("here", UserWarning, stacklevel=external_stacklevel())
    assert caught[0].filename == __file__


@pytest.mark.parametrize("decorated", [False, True])
def test_decorator_frames_are_skipped(decorated):
    # torch.no_grad() as a decorator puts a torch frame between package frames and the caller.
    from glu_probe import _warnings

    def inner():
        warnings.warn("deep", UserWarning, stacklevel=external_stacklevel())

    fn = torch.no_grad()(inner) if decorated else inner
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    # `inner` lives in this test file, so it is the first external frame itself.
    assert caught[0].filename == __file__
    assert _warnings._internal(torch.utils._contextlib.__file__)


def test_monitor_relays_distinct_warnings_of_one_category_once_each():
    """Every warning of a probe is now attributed to the same external frame, so the monitor's
    once-per-fit deduplication keys on the text with its numbers masked, not on the site."""
    from glu_probe.callbacks import NTKSpectrumMonitor

    mon = NTKSpectrumMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, lam in ((0, 1e-9), (1, 2.5e-11)):
            with mon._relayed_warnings("model", step):
                for text in (f"λ_min = {lam:.3e} is small", "did not converge in 40 products"):
                    warnings.warn(text, RuntimeWarning, stacklevel=external_stacklevel())
    shown = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(shown) == 2, shown
    assert "λ_min = 1.000e-09" in shown[0] and "did not converge" in shown[1]
