"""Tests for gns.tradeoff: steps_to_target on hand-made curves, the S(B) fit and its intervals."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gns import tradeoff

BATCHES = np.array([16, 32, 64, 128, 256, 512, 1024], dtype=float)


# ----------------------------------------------------------------------------- steps_to_target


def test_steps_to_target_first_crossing_accuracy():
    steps = [0, 100, 200, 300, 400]
    acc = [0.1, 0.45, 0.62, 0.58, 0.7]  # crosses 0.6 at 200, dips, crosses again
    assert tradeoff.steps_to_target(steps, acc, 0.6) == 200.0
    assert tradeoff.steps_to_target(steps, acc, 0.62) == 200.0  # >= counts as reached
    assert tradeoff.steps_to_target(steps, acc, 0.65) == 400.0


def test_steps_to_target_loss_lower_is_better():
    steps = [10, 20, 30, 40]
    loss = [2.3, 1.5, 1.1, 0.9]
    assert tradeoff.steps_to_target(steps, loss, 1.2, higher_is_better=False) == 30.0
    # A loss curve read as "higher is better" has reached 1.2 at the very first point.
    assert tradeoff.steps_to_target(steps, loss, 1.2) == 10.0


def test_steps_to_target_never_reached_and_empty_and_nan():
    assert tradeoff.steps_to_target([0, 1, 2], [0.1, 0.2, 0.3], 0.5) is None
    assert tradeoff.steps_to_target([], [], 0.5) is None
    # A diverged (nan) evaluation never counts as reaching the target.
    assert tradeoff.steps_to_target([0, 1, 2], [0.1, math.nan, 0.6], 0.5) == 2.0
    assert tradeoff.steps_to_target([0, 1], [math.nan, math.nan], 0.5) is None


def test_steps_to_target_smoothing_ignores_a_lucky_spike():
    steps = [0, 100, 200, 300, 400, 500]
    acc = [0.30, 0.52, 0.40, 0.48, 0.55, 0.56]  # one noisy eval at 100 crosses 0.5
    assert tradeoff.steps_to_target(steps, acc, 0.5) == 100.0
    # Trailing mean over 3 points: [.30, .41, .407, .467, .477, .53] -> first >= .5 at 500.
    assert tradeoff.steps_to_target(steps, acc, 0.5, smooth=3) == 500.0
    assert tradeoff.steps_to_target(steps, acc, 0.5, smooth=1) == 100.0


def test_steps_to_target_interpolation_is_linear_between_logged_points():
    steps = [0, 100, 200, 300]
    acc = [0.1, 0.4, 0.6, 0.7]
    assert tradeoff.steps_to_target(steps, acc, 0.5, interpolate=True) == pytest.approx(150.0)
    assert tradeoff.steps_to_target(steps, acc, 0.43, interpolate=True) == pytest.approx(115.0)
    # Reached at the first point: nothing to interpolate from.
    assert tradeoff.steps_to_target(steps, acc, 0.05, interpolate=True) == 0.0


def test_steps_to_target_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        tradeoff.steps_to_target([0, 1, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        tradeoff.steps_to_target([0, 2, 1], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match="smooth"):
        tradeoff.steps_to_target([0, 1], [0.1, 0.2], 0.5, smooth=0)
    with pytest.raises(ValueError, match="finite and strictly increasing"):
        tradeoff.steps_to_target([0, math.nan, 2], [0.1, 0.2, 0.3], 0.2)


def test_steps_to_target_a_non_finite_value_spoils_only_the_windows_that_hold_it():
    steps, acc = range(10), [0.1, 0.2, math.nan, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9]
    # Windows of 2: [.5, .6] -> .55, [.6, .7] -> .65 at step 5.
    assert tradeoff.steps_to_target(steps, acc, 0.6, smooth=2) == 5.0
    # inf is not a reached accuracy, and not a point to interpolate from.
    assert tradeoff.steps_to_target([0, 1, 2], [0.1, math.inf, 0.7], 0.5, interpolate=True) == 2.0


# ----------------------------------------------------------------------------- fit


@pytest.mark.parametrize(
    "s_min, e_min",
    [(1000.0, 64_000.0), (200.0, 200.0 * 3000), (5000.0, 5000.0 * 20.0)],
    ids=["b_crit_mid", "b_crit_above_range", "b_crit_below_range"],
)
def test_fit_recovers_noise_free_parameters_within_1_percent(s_min, e_min):
    steps = s_min + e_min / BATCHES
    f = tradeoff.fit(BATCHES, steps, num_bootstrap=0)
    assert f.s_min == pytest.approx(s_min, rel=1e-2)
    assert f.e_min == pytest.approx(e_min, rel=1e-2)
    assert f.b_crit == pytest.approx(e_min / s_min, rel=2e-2)
    assert f.intervals == {}
    np.testing.assert_allclose(tradeoff.predict_steps(f, BATCHES), steps, rtol=1e-6)
    np.testing.assert_allclose(tradeoff.predict_examples(f, BATCHES), BATCHES * steps, rtol=1e-6)


def test_fit_noisy_points_truth_inside_own_interval():
    s_min, e_min = 1000.0, 64_000.0
    rng = np.random.default_rng(1)
    b = np.repeat(BATCHES, 2)  # two seeds per batch size
    steps = (s_min + e_min / b) * np.exp(0.1 * rng.normal(size=b.size))  # 10% noise
    f = tradeoff.fit(b, steps, num_bootstrap=500, seed=0)
    for name, truth in (("s_min", s_min), ("e_min", e_min), ("b_crit", e_min / s_min)):
        lo, hi = f.intervals[name]
        assert lo < getattr(f, name) < hi, name
        assert lo < truth < hi, (name, lo, truth, hi)
    assert 0.03 < f.residual_std < 0.2  # the 10% noise shows up as the residual spread


def test_fit_interval_coverage_over_repeated_noisy_experiments():
    """Over 15 independent noisy data sets, the 90% interval of B_crit covers the truth mostly."""
    s_min, e_min = 500.0, 500.0 * 100
    rng = np.random.default_rng(7)
    hits = 0
    for i in range(15):
        steps = (s_min + e_min / BATCHES) * np.exp(0.1 * rng.normal(size=BATCHES.size))
        f = tradeoff.fit(BATCHES, steps, num_bootstrap=100, confidence=0.9, seed=i)
        lo, hi = f.intervals["b_crit"]
        hits += lo <= e_min / s_min <= hi
    # Binomial(15, 0.9) is >= 10 with probability 0.998; small-sample bootstraps undercover a
    # bit, and 100 resamples make the percentiles rough (12 of 15 here).
    assert hits >= 10, hits


def test_fit_pairs_bootstrap_also_brackets_the_truth():
    s_min, e_min = 1000.0, 64_000.0
    rng = np.random.default_rng(2)
    b = np.repeat(BATCHES, 3)
    steps = (s_min + e_min / b) * np.exp(0.05 * rng.normal(size=b.size))
    f = tradeoff.fit(b, steps, num_bootstrap=300, method="pairs", seed=0)
    lo, hi = f.intervals["b_crit"]
    assert lo < e_min / s_min < hi


def test_fit_plateau_does_not_break():
    # Steps no longer fall with the batch size: E_min -> 0, B_crit -> tiny, predictions flat.
    steps = np.full(BATCHES.shape, 800.0)
    f = tradeoff.fit(BATCHES, steps, num_bootstrap=50)
    assert all(math.isfinite(v) for v in (f.s_min, f.e_min, f.b_crit))
    assert f.s_min == pytest.approx(800.0, rel=1e-3)
    assert f.b_crit < 1e-3 * BATCHES.min()
    np.testing.assert_allclose(tradeoff.predict_steps(f, BATCHES), 800.0, rtol=1e-3)
    # Perfect scaling (steps halve with every doubling): S_min -> 0, B_crit far above the range.
    f = tradeoff.fit(BATCHES, 64_000.0 / BATCHES, num_bootstrap=50)
    assert f.b_crit > 1e3 * BATCHES.max()
    assert f.e_min == pytest.approx(64_000.0, rel=1e-3)
    # A plateau after a falling part: B_crit inside the measured range.
    steps = np.maximum(64_000.0 / BATCHES, 500.0)
    f = tradeoff.fit(BATCHES, steps, num_bootstrap=0)
    assert BATCHES.min() < f.b_crit < BATCHES.max()


@pytest.mark.parametrize(
    "batch_sizes, steps, match",
    [
        ([32, 64], [100, 50], "at least 3"),
        ([32, 64, 128], [100, 0, 30], "finite and positive"),
        ([32, 64, 128], [100, -5, 30], "finite and positive"),
        ([32, 64, 128], [100, math.nan, 30], "finite and positive"),
        ([32, 0, 128], [100, 50, 30], "batch_sizes must all be finite and positive"),
        ([64, 64, 64, 64], [100, 90, 110, 95], "2 distinct batch sizes"),
        ([32, 64, 128], [100, 50], "same length"),
    ],
)
def test_fit_refuses_bad_input_with_clear_message(batch_sizes, steps, match):
    with pytest.raises(ValueError, match=match):
        tradeoff.fit(batch_sizes, steps)


def test_fit_rejects_bad_options():
    b, s = [32, 64, 128], [100, 60, 40]
    with pytest.raises(ValueError, match="method"):
        tradeoff.fit(b, s, method="jackknife")
    with pytest.raises(ValueError, match="confidence"):
        tradeoff.fit(b, s, confidence=1.5)
    # One refit, or too few for each tail of the interval: a zero-width or min-max "interval".
    for n in (1, 5, True):
        with pytest.raises(ValueError, match="num_bootstrap"):
            tradeoff.fit(b, s, num_bootstrap=n)
    with pytest.raises(ValueError, match="1-D"):
        tradeoff.fit([[32, 64], [128, 256]], [[100, 60], [40, 30]])


@settings(max_examples=25, deadline=None)
@given(log_s_min=st.floats(2.0, 8.0), log_b_crit=st.floats(1.0, 9.0), scale=st.floats(0.01, 100.0))
def test_fit_is_equivariant_to_scaling_the_steps(log_s_min, log_b_crit, scale):
    """Multiplying every step count by c multiplies S_min and E_min by c, keeps B_crit."""
    s_min = math.exp(log_s_min)
    e_min = s_min * math.exp(log_b_crit)
    steps = (s_min + e_min / BATCHES) * np.exp(0.05 * np.sin(np.arange(BATCHES.size)))
    f1 = tradeoff.fit(BATCHES, steps, num_bootstrap=0)
    f2 = tradeoff.fit(BATCHES, scale * steps, num_bootstrap=0)
    assert f2.s_min == pytest.approx(scale * f1.s_min, rel=1e-4, abs=1e-6 * scale * steps.min())
    assert f2.e_min == pytest.approx(scale * f1.e_min, rel=1e-4, abs=1e-6 * scale * steps.min())
    np.testing.assert_allclose(
        tradeoff.predict_steps(f2, BATCHES), scale * tradeoff.predict_steps(f1, BATCHES), rtol=1e-5
    )


def test_fit_to_dict_is_json_ready():
    import json

    f = tradeoff.fit([32, 64, 128, 256], [3000, 2000, 1500, 1250], num_bootstrap=40)
    d = json.loads(json.dumps(f.to_dict()))
    assert d["points"] == [
        {"batch_size": 32.0, "steps": 3000.0},
        {"batch_size": 64.0, "steps": 2000.0},
        {"batch_size": 128.0, "steps": 1500.0},
        {"batch_size": 256.0, "steps": 1250.0},
    ]
    assert d["b_crit"] == pytest.approx(64.0, rel=1e-3)  # 3000 = S + E/32, 1250 = S + E/256
    assert set(d["intervals"]) == {"s_min", "e_min", "b_crit"}


def test_steps_that_rise_with_the_batch_are_not_fitted():
    """Steps to the target that grow with the batch contradict S(B) = S_min + E_min/B: refused
    (the fit gave B_crit ~ 1e-12 and no warning); a plateau (flat steps) is still fitted."""
    with pytest.raises(ValueError, match="do not fall with the batch size"):
        tradeoff.fit([32, 64, 128, 256, 512], [100, 200, 400, 800, 1600], num_bootstrap=0)
    flat = tradeoff.fit([32, 64, 128, 256, 512], [1000, 1100, 950, 1050, 1000], num_bootstrap=0)
    assert flat.s_min == pytest.approx(1000, rel=0.1)
