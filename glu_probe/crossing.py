"""Noise-robust detection of loss-curve crossings, offline and streaming.

Two runs are compared: series ``a`` (the *model*, e.g. a GLU network) and series ``b`` (the
*baseline*, e.g. its non-gated counterpart). A crossing is a persistent change of the sign of
``a − b``: ``a`` going below ``b`` is reported as ``"model overtakes baseline"``, ``a`` going back
above ``b`` as ``"baseline overtakes model"``.

The algorithm (identical in :class:`CrossingDetector` and :func:`find_crossings`)
--------------------------------------------------------------------------------
For every update ``k = 1, 2, ...`` with raw losses ``a_k, b_k`` at step ``s_k``:

1. **Smoothing.** Both losses are smoothed with an exponential moving average of decay
   ``β = smoothing`` (``0 ≤ β < 1``), debiased as in Adam::

       m_k = β m_{k-1} + (1 − β) x_k,   m_0 = 0,   x̂_k = m_k / (1 − β^k)

   ``x̂_k`` is the weighted mean ``Σ_j (1 − β) β^{k−j} x_j / (1 − β^k)`` of all values seen, so
   there is no start-up bias towards 0. For independent noise of standard deviation σ on a
   stationary series the smoothed value has standard deviation
   ``σ √((1 − β)/(1 + β))`` (≈ 0.23 σ for β = 0.9) once ``k ≫ 1/(1 − β)``. The price is a lag:
   on a locally linear trend the smoothed curve trails the raw one by ``β/(1 − β)`` updates
   (9 updates for β = 0.9), which shifts the detected crossing step by the same amount.
   ``smoothing=0`` disables smoothing (no lag, no noise reduction).

2. **Hysteresis band.** With the smoothed difference ``d_k = â_k − b̂_k`` and the band half-width
   ``h_k = max(abs_hysteresis, hysteresis · (|â_k| + |b̂_k|)/2)``, the update *votes*
   ``+1`` if ``d_k > h_k`` (model worse), ``−1`` if ``d_k < −h_k`` (model better) and ``0``
   (abstains) inside the band.

3. **Patience.** The detector holds a *regime* ``r ∈ {−1, 0, +1}`` (0 = not yet established). A vote
   ``v ≠ 0`` that differs from ``r`` must be repeated by ``patience`` consecutive updates; any
   abstention or opposite vote resets the count. When the count reaches ``patience`` the regime
   becomes ``v``. If the old regime was ``±1`` this is a **crossing**; the first regime
   (from 0) is not a crossing, it only records which curve is ahead. So a crossing needs the
   smoothed difference to stay beyond the band on one side for ``patience`` updates (the first
   regime) and then beyond the band on the other side for ``patience`` updates. A lead shorter
   than ``patience`` updates is treated as noise: a crossing after it is not reported (with
   ``b`` interpolated onto ``a``'s steps in :func:`find_crossings`, updates are ``a``'s logged
   steps: a coarsely logged ``a`` gives fewer of them; lower ``patience`` or log more often to
   resolve an early, short lead).

4. **Reported step.** ``Crossing.step`` is the first step at which ``d`` took the new sign and
   kept it until detection (the zero-crossing of the smoothed difference, on the logged step grid;
   where ``d`` is exactly 0 at steps right before it took the new sign, the first of those);
   ``Crossing.detected_step`` is the step at which the patience ran out. For a clean crossing of
   slope ``c = d'(t)`` at ``t*`` with step spacing Δ: ``step − t* ∈ [0, Δ)`` without smoothing
   and ``≈ Δ·β/(1 − β)`` with smoothing, and ``detected_step ≥ step + (patience − 1)·Δ``
   (plus the time ``h/|c|`` the difference needs to leave the band).

False alarms: with noise only (equal underlying curves), a false crossing needs the smoothed
difference to leave the band twice, with opposite signs, each time for ``patience`` updates. With
the band at ``z`` standard deviations of the smoothed difference, each excursion has probability
of order ``Φ(−z)`` per update; ``z ≥ 5`` makes false crossings practically impossible.

Non-finite losses (NaN/inf) are ignored by the streaming detector (counted in
``n_nonfinite``); the offline function rejects them.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ._warnings import external_stacklevel

__all__ = [
    "BASELINE_OVERTAKES",
    "MODEL_OVERTAKES",
    "Crossing",
    "CrossingDetector",
    "find_crossings",
]

MODEL_OVERTAKES = "model overtakes baseline"
BASELINE_OVERTAKES = "baseline overtakes model"


@dataclass(frozen=True)
class Crossing:
    """One confirmed crossing of the smoothed loss curves.

    Attributes:
        step: first step of the new sign of the smoothed difference ``d = â − b̂`` (the estimated
            crossing step, lagged by the smoothing, see the module docstring).
        direction: ``"model overtakes baseline"`` (``a`` went below ``b``) or
            ``"baseline overtakes model"`` (``a`` went back above ``b``).
        delta: smoothed difference ``â − b̂`` at detection.
        smoothed_a: smoothed model loss ``â`` at detection.
        smoothed_b: smoothed baseline loss ``b̂`` at detection.
        detected_step: step at which the crossing was confirmed (``patience`` updates beyond band).
    """

    step: int
    direction: str
    delta: float
    smoothed_a: float
    smoothed_b: float
    detected_step: int

    @property
    def event(self) -> int:
        """``+1`` for ``"model overtakes baseline"``, ``-1`` for the way back."""
        return 1 if self.direction == MODEL_OVERTAKES else -1

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain (JSON-safe) dict; :meth:`from_dict` restores it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Crossing:
        """The :class:`Crossing` of a :meth:`to_dict` result."""
        return cls(
            step=int(d["step"]),
            direction=str(d["direction"]),
            delta=float(d["delta"]),
            smoothed_a=float(d["smoothed_a"]),
            smoothed_b=float(d["smoothed_b"]),
            detected_step=int(d["detected_step"]),
        )


def _real(x: Any) -> bool:
    """A real number, numpy scalars included (``np.float32(0.9)``), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_params(
    smoothing: float, patience: int, hysteresis: float, abs_hysteresis: float
) -> None:
    if not (_real(smoothing) and 0.0 <= smoothing < 1.0):
        raise ValueError(f"smoothing must be a float in [0, 1), got {smoothing!r}")
    if not (isinstance(patience, numbers.Integral) and not isinstance(patience, bool)) or (
        patience < 1
    ):
        raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
    if not (_real(hysteresis) and math.isfinite(hysteresis) and hysteresis >= 0):
        raise ValueError(f"hysteresis must be a finite float >= 0, got {hysteresis!r}")
    if not (_real(abs_hysteresis) and math.isfinite(abs_hysteresis) and abs_hysteresis >= 0):
        raise ValueError(f"abs_hysteresis must be a finite float >= 0, got {abs_hysteresis!r}")


class CrossingDetector:
    """Streaming crossing detector: smoothing + hysteresis band + patience (see module docstring).

    Args:
        smoothing: EMA decay ``β`` in ``[0, 1)`` applied to both losses (debiased).
        patience: number of consecutive updates beyond the band needed to confirm a sign change.
        hysteresis: band half-width relative to the mean smoothed loss ``(|â| + |b̂|)/2``.
        abs_hysteresis: absolute lower bound of the band half-width.

    ``update`` must be called with strictly increasing steps. ``state_dict``/``load_state_dict``
    save and restore everything (plain Python values), so a resumed detector continues exactly
    as an uninterrupted one.
    """

    def __init__(
        self,
        *,
        smoothing: float = 0.9,
        patience: int = 5,
        hysteresis: float = 0.01,
        abs_hysteresis: float = 0.0,
    ) -> None:
        _check_params(smoothing, patience, hysteresis, abs_hysteresis)
        self.smoothing = float(smoothing)
        self.patience = int(patience)
        self.hysteresis = float(hysteresis)
        self.abs_hysteresis = float(abs_hysteresis)
        self.reset()

    def reset(self) -> None:
        """Forget all history (smoothing state, regime, crossings)."""
        self.n_updates = 0
        self.n_nonfinite = 0
        self._ema_a = 0.0
        self._ema_b = 0.0
        self._bias = 1.0  # β^k, so that 1 − β^k debiases the EMA
        self.regime = 0
        self._pending = 0
        self._count = 0
        self._sign = 0  # strict sign of the last non-zero smoothed difference
        self._sign_since: int | None = None  # first step of the current sign (see update)
        self._zero_since: int | None = None  # first step of a run of exact zeros, up to now
        self.last_step: int | None = None
        self.smoothed_a = math.nan
        self.smoothed_b = math.nan
        self.crossings: list[Crossing] = []

    @property
    def delta(self) -> float:
        """Current smoothed difference ``â − b̂`` (NaN before the first update)."""
        return self.smoothed_a - self.smoothed_b

    def update(self, step: int, loss_a: float, loss_b: float) -> Crossing | None:
        """Feed one pair of losses at ``step``; return the crossing confirmed now, if any."""
        if getattr(step, "ndim", None) == 0 and hasattr(step, "item"):
            step = step.item()  # a 0-d tensor or array
        if not _real(step) or not math.isfinite(step) or step != int(step):
            raise ValueError(f"step must be an integer (a training step), got {step!r}")
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"steps must be strictly increasing: got step {step} after {self.last_step}"
            )
        a, b = float(loss_a), float(loss_b)
        self.last_step = step  # a skipped (non-finite) update takes its step too
        if not (math.isfinite(a) and math.isfinite(b)):
            self.n_nonfinite += 1
            return None
        self.n_updates += 1
        beta = self.smoothing
        self._ema_a = beta * self._ema_a + (1.0 - beta) * a
        self._ema_b = beta * self._ema_b + (1.0 - beta) * b
        self._bias *= beta
        debias = 1.0 - self._bias
        self.smoothed_a = self._ema_a / debias
        self.smoothed_b = self._ema_b / debias
        d = self.smoothed_a - self.smoothed_b

        sign = (d > 0) - (d < 0)
        if sign == 0:
            if self._zero_since is None:
                self._zero_since = step
        else:
            if sign != self._sign:
                # A difference of exactly 0 at t* (float32 losses tie) is where the sign
                # changes: the new sign dates from the first zero before it, so step = ⌈t*⌉ as
                # documented (it was the first step after t*, one step late; review, s24).
                self._sign = sign
                self._sign_since = step if self._zero_since is None else self._zero_since
            self._zero_since = None

        band = max(
            self.abs_hysteresis,
            self.hysteresis * 0.5 * (abs(self.smoothed_a) + abs(self.smoothed_b)),
        )
        vote = 1 if d > band else (-1 if d < -band else 0)
        if vote == 0 or vote == self.regime:
            self._pending, self._count = 0, 0
            return None
        if vote == self._pending:
            self._count += 1
        else:
            self._pending, self._count = vote, 1
        if self._count < self.patience:
            return None

        old, self.regime = self.regime, vote
        self._pending, self._count = 0, 0
        if old == 0:
            return None
        assert self._sign_since is not None  # vote != 0 implies at least one signed update
        crossing = Crossing(
            step=self._sign_since,
            direction=MODEL_OVERTAKES if vote < 0 else BASELINE_OVERTAKES,
            delta=d,
            smoothed_a=self.smoothed_a,
            smoothed_b=self.smoothed_b,
            detected_step=step,
        )
        self.crossings.append(crossing)
        return crossing

    @property
    def params(self) -> dict[str, Any]:
        """The detector's settings, as its :meth:`state_dict` saves them."""
        return {
            "smoothing": self.smoothing,
            "patience": self.patience,
            "hysteresis": self.hysteresis,
            "abs_hysteresis": self.abs_hysteresis,
        }

    def state_dict(self) -> dict[str, Any]:
        """All state as plain Python values (checkpoint- and JSON-friendly)."""
        return {
            "params": self.params,
            "n_updates": self.n_updates,
            "n_nonfinite": self.n_nonfinite,
            "ema_a": self._ema_a,
            "ema_b": self._ema_b,
            "bias": self._bias,
            "regime": self.regime,
            "pending": self._pending,
            "count": self._count,
            "sign": self._sign,
            "sign_since": self._sign_since,
            "zero_since": self._zero_since,
            "last_step": self.last_step,
            "smoothed_a": self.smoothed_a,
            "smoothed_b": self.smoothed_b,
            "crossings": [c.to_dict() for c in self.crossings],
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a :meth:`state_dict`. ``strict``: the detector's parameters must match the
        saved ones (a ``ValueError`` otherwise); else this detector keeps its own and goes on
        from the saved smoothed losses, regime and crossings (later updates use the new
        parameters; a patience count in progress is capped at the new patience)."""
        params, mine = dict(state["params"]), self.params
        if params != mine and strict:
            raise ValueError(
                f"CrossingDetector parameters differ from the saved state: saved {params}, "
                f"this detector {mine}; construct it with the saved parameters to resume"
            )
        self.n_updates = int(state["n_updates"])
        self.n_nonfinite = int(state["n_nonfinite"])
        self._ema_a = float(state["ema_a"])
        self._ema_b = float(state["ema_b"])
        self._bias = float(state["bias"])
        self.regime = int(state["regime"])
        self._pending = int(state["pending"])
        self._count = min(int(state["count"]), self.patience - 1)
        self._sign = int(state["sign"])
        since = state["sign_since"]
        self._sign_since = None if since is None else int(since)
        zero = state.get("zero_since")  # (absent from checkpoints before session 24)
        self._zero_since = None if zero is None else int(zero)
        last = state["last_step"]
        self.last_step = None if last is None else int(last)
        self.smoothed_a = float(state["smoothed_a"])
        self.smoothed_b = float(state["smoothed_b"])
        self.crossings = [Crossing.from_dict(c) for c in state["crossings"]]


def float64_array(values: Any) -> np.ndarray:
    """``values`` (numbers, numpy arrays, tensors of any float dtype, or sequences holding
    tensors, e.g. losses appended during training) as a float64 numpy array. Tensors are
    detached and converted by torch: numpy knows no bfloat16 and refuses tensors that require
    grad (raw ``TypeError`` / ``RuntimeError`` before, review session 26)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    if isinstance(values, (list, tuple)) and any(
        isinstance(v, (torch.Tensor, list, tuple)) for v in values
    ):
        return np.asarray([float64_array(v) for v in values], dtype=np.float64)
    return np.asarray(values, dtype=np.float64)


def _as_series(name: str, steps: Sequence[float], losses: Sequence[float]) -> tuple[Any, Any]:
    s = float64_array(steps).reshape(-1)
    v = float64_array(losses).reshape(-1)
    if s.shape != v.shape:
        raise ValueError(f"steps_{name} and loss_{name} differ in length ({s.size} vs {v.size})")
    if s.size == 0:
        raise ValueError(f"series {name} is empty")
    if not np.all(np.isfinite(s)) or not np.all(np.isfinite(v)):
        raise ValueError(f"series {name} contains non-finite steps or losses; drop them first")
    if np.any(np.diff(s) <= 0):
        raise ValueError(f"steps_{name} must be strictly increasing")
    return s, v


def find_crossings(
    steps_a: Sequence[float],
    loss_a: Sequence[float],
    steps_b: Sequence[float],
    loss_b: Sequence[float],
    *,
    smoothing: float = 0.9,
    patience: int = 5,
    hysteresis: float = 0.01,
    abs_hysteresis: float = 0.0,
) -> list[Crossing]:
    """Find the crossings between loss series ``a`` (model) and ``b`` (baseline), offline.

    ``b`` is linearly interpolated onto the steps of ``a`` that lie within ``b``'s step range
    (no extrapolation); the aligned pairs are then fed, in step order, to a
    :class:`CrossingDetector` with the given parameters, so the result is exactly what the
    streaming detector (and :class:`~glu_probe.callbacks.LossCrossingMonitor`) reports for the
    same values. See the module docstring for the algorithm and its guarantees.

    Raises:
        ValueError: on mismatched lengths, empty series, non-finite values, non-increasing steps,
            or invalid detector parameters.
    """
    sa, va = _as_series("a", steps_a, loss_a)
    sb, vb = _as_series("b", steps_b, loss_b)
    if np.any(sa != np.round(sa)):
        raise ValueError("steps_a must be integers (training steps)")
    detector = CrossingDetector(
        smoothing=smoothing, patience=patience, hysteresis=hysteresis, abs_hysteresis=abs_hysteresis
    )
    inside = (sa >= sb[0]) & (sa <= sb[-1])
    sa, va = sa[inside], va[inside]
    if sa.size < 2 * patience:  # (patience + 1 before: 6..9 steps at patience 5 were silent)
        warnings.warn(
            f"find_crossings: only {sa.size} steps of series a lie within series b's steps "
            f"[{sb[0]:g}, {sb[-1]:g}]; a regime needs {patience} updates and a crossing two "
            "regimes, so none can be found (compare on overlapping, finer step grids, or lower "
            "patience)",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
    vb_on_a = np.interp(sa, sb, vb)
    for s, x, y in zip(sa.tolist(), va.tolist(), vb_on_a.tolist(), strict=True):
        detector.update(round(s), x, y)
    return list(detector.crossings)
