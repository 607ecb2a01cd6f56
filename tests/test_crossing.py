"""Crossing detector: closed-form crossing steps, no false alarms, streaming == offline, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from glu_probe.crossing import (
    BASELINE_OVERTAKES,
    MODEL_OVERTAKES,
    Crossing,
    CrossingDetector,
    find_crossings,
)

# a(t) = A e^{-α t} starts above b(t) = B e^{-β t} and falls faster: one crossing at
# t* = ln(A/B) / (α − β).
A, ALPHA, B, BETA = 2.0, 0.02, 1.0, 0.01
T_STAR = math.log(A / B) / (ALPHA - BETA)  # 69.31...


def _curves(n: int = 200, noise: float = 0.0, seed: int = 0):
    t = np.arange(n, dtype=np.float64)
    rng = np.random.default_rng(seed)
    a = A * np.exp(-ALPHA * t) + noise * rng.standard_normal(n)
    b = B * np.exp(-BETA * t) + noise * rng.standard_normal(n)
    return t, a, b


def _smoothed_crossing(beta: float) -> float:
    """Zero of the EMA-smoothed difference, in closed form.

    For x_k = C e^{-c k} the EMA m_k = Σ_{j≤k} (1−β) β^{k−j} x_j tends to g(c) x_k with
    g(c) = (1 − β) / (1 − β e^{c}) (the transient (β e^c)^k is < 3e-3 at k = 70 for β = 0.9), so the
    smoothed curves cross where A g(α) e^{−α t} = B g(β_b) e^{−β_b t}.
    """

    def g(c: float) -> float:
        return (1 - beta) / (1 - beta * math.exp(c))

    return math.log(A * g(ALPHA) / (B * g(BETA))) / (ALPHA - BETA)


def test_noiseless_unsmoothed_crossing_is_the_first_step_after_t_star():
    t, a, b = _curves()
    (c,) = find_crossings(t, a, t, b, smoothing=0.0, patience=3, hysteresis=0.01)
    assert c.direction == MODEL_OVERTAKES and c.event == 1
    assert c.step == math.ceil(T_STAR) == 70
    # detection: (patience) updates beyond the band after the sign change
    band_exit = next(s for s in range(70, 200) if (b[s] - a[s]) > 0.01 * (a[s] + b[s]) / 2)
    assert c.detected_step == band_exit + 3 - 1
    assert c.delta < 0 and c.smoothed_a == pytest.approx(a[c.detected_step])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_smoothed_crossing_matches_closed_form(seed):
    t, a, b = _curves(noise=0.003, seed=seed)
    (c,) = find_crossings(t, a, t, b, smoothing=0.9, patience=5, hysteresis=0.01)
    expected = _smoothed_crossing(0.9)  # 79.9: t* plus the smoothing lag
    assert expected == pytest.approx(T_STAR + 10.6, abs=0.1)
    assert abs(c.step - expected) <= 2.0
    assert c.detected_step >= c.step + 4
    assert c.direction == MODEL_OVERTAKES


def test_way_back_is_reported_as_baseline_overtakes():
    t, a, b = _curves(noise=0.003)
    (c,) = find_crossings(t, b, t, a, smoothing=0.9, patience=5)
    assert c.direction == BASELINE_OVERTAKES and c.event == -1 and c.delta > 0
    assert abs(c.step - _smoothed_crossing(0.9)) <= 2.0
    # two crossings: model ahead, then behind again
    steps = np.arange(300)
    m = np.where(steps < 100, 1.0, np.where(steps < 200, 0.8, 1.2))
    base = np.ones(300)
    found = find_crossings(steps, m, steps, base, smoothing=0.0, patience=4, hysteresis=0.05)
    # steps < 100 lie inside the band (no side); from 100 the model is ahead, which establishes the
    # first regime (not a crossing: nothing was crossed); at 200 it falls behind: one crossing
    assert [(x.step, x.direction) for x in found] == [(200, BASELINE_OVERTAKES)]


def test_no_false_crossing_on_noise_around_equal_curves():
    n, sigma = 3000, 0.01
    rng = np.random.default_rng(0)
    t = np.arange(n)
    a = 1.0 + sigma * rng.standard_normal(n)
    b = 1.0 + sigma * rng.standard_normal(n)
    # smoothed difference std: σ √2 √((1−β)/(1+β)) = 0.00324 for β = 0.9; band 0.02 = 6.2 std
    assert find_crossings(t, a, t, b, smoothing=0.9, patience=5, hysteresis=0.02) == []
    # the same data without smoothing/hysteresis/patience crosses hundreds of times
    raw = find_crossings(t, a, t, b, smoothing=0.0, patience=1, hysteresis=0.0)
    assert len(raw) > 500


def test_alignment_interpolates_b_onto_a_steps():
    t, a, b = _curves(n=200)
    tb = t[::3]  # the baseline was logged every 3 steps, and starts later
    tb, bb = tb[2:], b[::3][2:]
    (c,) = find_crossings(t, a, tb, bb, smoothing=0.0, patience=3)
    assert c.step == 70  # linear interpolation error ~1e-4, far below the gap at step 70
    # a's steps before b's first step are not compared
    det = CrossingDetector(smoothing=0.0, patience=3)
    for s in range(6, 200):
        det.update(s, a[s], float(np.interp(s, tb, bb)))
    assert det.crossings == [c]


def test_streaming_equals_offline_and_state_round_trip():
    t, a, b = _curves(n=400, noise=0.01, seed=4)
    b = b + 0.05 * np.sin(t / 15.0)  # several crossings
    kw = dict(smoothing=0.8, patience=3, hysteresis=0.005)
    offline = find_crossings(t, a, t, b, **kw)
    assert len(offline) >= 3
    det = CrossingDetector(**kw)
    streamed = [det.update(int(s), x, y) for s, x, y in zip(t, a, b, strict=True)]
    assert [c for c in streamed if c is not None] == offline == det.crossings

    first = CrossingDetector(**kw)
    for s in range(150):
        first.update(s, a[s], b[s])
    saved = json.loads(json.dumps(first.state_dict()))  # plain values survive JSON
    resumed = CrossingDetector(**kw)
    resumed.load_state_dict(saved)
    for s in range(150, 400):
        resumed.update(s, a[s], b[s])
    assert resumed.crossings == offline
    assert resumed.smoothed_a == det.smoothed_a and resumed.smoothed_b == det.smoothed_b
    assert resumed.state_dict() == det.state_dict()

    with pytest.raises(ValueError, match="parameters differ"):
        CrossingDetector(smoothing=0.5).load_state_dict(saved)


def test_debiased_ema_has_no_startup_bias():
    det = CrossingDetector(smoothing=0.99)
    det.update(0, 3.0, 2.0)
    assert det.smoothed_a == pytest.approx(3.0) and det.smoothed_b == pytest.approx(2.0)
    det.update(1, 1.0, 2.0)
    # weighted mean with weights β, 1: (0.99·3 + 1)/(1.99)
    assert det.smoothed_a == pytest.approx((0.99 * 3 + 1) / 1.99)


def test_nonfinite_and_bad_input():
    det = CrossingDetector()
    assert det.update(0, float("nan"), 1.0) is None and det.n_nonfinite == 1
    # the skipped update takes its step (session 21: the same step was accepted again after it)
    assert det.n_updates == 0 and det.last_step == 0
    det.update(3, 1.0, 1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        det.update(3, 1.0, 1.0)
    with pytest.raises(ValueError, match="smoothing"):
        CrossingDetector(smoothing=1.0)
    with pytest.raises(ValueError, match="patience"):
        CrossingDetector(patience=0)
    with pytest.raises(ValueError, match="hysteresis"):
        CrossingDetector(hysteresis=-0.1)
    with pytest.raises(ValueError, match="abs_hysteresis"):
        CrossingDetector(abs_hysteresis=float("inf"))
    with pytest.raises(ValueError, match="differ in length"):
        find_crossings([0, 1], [1.0], [0, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        find_crossings([0, 1], [1.0, float("nan")], [0, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        find_crossings([0, 0], [1.0, 1.0], [0, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match="integers"):
        find_crossings([0, 0.5], [1.0, 1.0], [0, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        find_crossings([], [], [0, 1], [1.0, 2.0])


def test_crossing_dict_round_trip():
    c = Crossing(5, MODEL_OVERTAKES, -0.1, 0.9, 1.0, 9)
    assert Crossing.from_dict(json.loads(json.dumps(c.to_dict()))) == c
