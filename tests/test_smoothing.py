"""Tests of gns.smoothing: the EMA tracker against a hand-written NumPy EMA, and the bootstrap
interval's coverage, block behaviour and conventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gns import estimate, smoothing


def numpy_ema(values, decay):
    """Textbook EMA with bias correction (Adam-style): m_t = acc_t / (1 - decay**t)."""
    acc, out = 0.0, []
    for t, x in enumerate(values, start=1):
        acc = decay * acc + (1 - decay) * x
        out.append(acc / (1 - decay**t))
    return np.array(out)


def stats(g_sq, trace_cov):
    return estimate.NoiseStats(jnp.asarray(g_sq), jnp.asarray(trace_cov), 1.0, 32.0)


def run_tracker(tracker, g_sq, trace_cov):
    """All intermediate states, by jax.lax.scan over the series (the update is jit-able)."""

    def step(state, s):
        state = tracker.update(s, state)
        return state, state

    xs = stats(jnp.asarray(g_sq, jnp.float32), jnp.asarray(trace_cov, jnp.float32))
    _, states = jax.jit(lambda xs: jax.lax.scan(step, tracker.init(), xs))(xs)
    return states


# ---------------------------------------------------------------------------------------------
# EMA tracker.


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.99])
def test_ema_equals_numpy_ema_with_bias_correction(decay):
    rng = np.random.default_rng(0)
    g_sq = 1.0 + rng.normal(size=40)  # sometimes negative, as single-step estimates are
    trace_cov = 30.0 + 5.0 * rng.normal(size=40)
    states = run_tracker(smoothing.ema(decay), g_sq, trace_cov)
    want_g, want_t = numpy_ema(g_sq, decay), numpy_ema(trace_cov, decay)
    np.testing.assert_allclose(states.g_sq, want_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(states.trace_cov, want_t, rtol=1e-5)
    np.testing.assert_allclose(states.weight, 1 - decay ** np.arange(1, 41), rtol=1e-6)
    # b_simple is the ratio of the smoothed values, not a smoothed ratio.
    want_b = np.where(want_g > 0, want_t / np.where(want_g > 0, want_g, 1), np.inf)
    finite = np.abs(want_g) > 1e-3
    np.testing.assert_allclose(states.b_simple[finite], want_b[finite], rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(states.count), np.arange(1, 41))


def test_constant_input_is_returned_exactly():
    tracker = smoothing.ema(0.999)
    state = tracker.init()
    for _ in range(5):
        state = jax.jit(tracker.update)(stats(0.3, 7.1), state)
        # Bias correction: exact from the first step on (no warm-up towards the value).
        assert float(state.g_sq) == np.float32(0.3)
        assert float(state.trace_cov) == np.float32(7.1)
    np.testing.assert_allclose(state.b_simple, 7.1 / 0.3, rtol=1e-6)


def test_nothing_to_read_before_the_first_update():
    state = smoothing.ema().init()
    assert int(state.count) == 0
    assert np.isnan(float(state.g_sq)) and np.isnan(float(state.trace_cov))
    assert np.isnan(float(state.b_simple))


def test_skips_and_counts_nonfinite_updates():
    rng = np.random.default_rng(1)
    g_sq = 1.0 + 0.3 * rng.normal(size=20)
    trace_cov = 10.0 + rng.normal(size=20)
    g_sq[[3, 11]] = np.nan
    trace_cov[[7]] = np.inf
    trace_cov[[15]] = -np.inf
    g_sq[[15]] = np.inf
    finite = np.isfinite(g_sq) & np.isfinite(trace_cov)
    states = run_tracker(smoothing.ema(0.8), g_sq, trace_cov)
    assert int(states.skipped[-1]) == 4 and int(states.count[-1]) == 16
    np.testing.assert_array_equal(np.asarray(states.skipped), np.cumsum(~finite))
    # The result is the EMA of the finite updates alone.
    np.testing.assert_allclose(states.g_sq[-1], numpy_ema(g_sq[finite], 0.8)[-1], rtol=1e-5)
    np.testing.assert_allclose(
        states.trace_cov[-1], numpy_ema(trace_cov[finite], 0.8)[-1], rtol=1e-5
    )
    # Without skipping, a NaN poisons the average for good and nothing is counted.
    unsafe = run_tracker(smoothing.ema(0.8, skip_nonfinite=False), g_sq, trace_cov)
    assert int(unsafe.skipped[-1]) == 0 and np.isnan(float(unsafe.b_simple[-1]))


def test_non_positive_smoothed_g_sq_reads_as_inf():
    states = run_tracker(smoothing.ema(0.5), [0.5, -2.0, 0.0], [3.0, 3.0, 3.0])
    assert float(states.b_simple[0]) == pytest.approx(6.0)
    assert float(states.g_sq[1]) < 0 and float(states.b_simple[1]) == np.inf


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5, True])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="decay"):
        smoothing.ema(decay)


def test_update_needs_scalar_statistics():
    tracker = smoothing.ema()
    with pytest.raises(ValueError, match="scalars"):
        tracker.update(stats(jnp.ones(3), jnp.ones(3)), tracker.init())


# ---------------------------------------------------------------------------------------------
# Interval.


def test_interval_covers_the_truth_at_about_the_nominal_rate():
    true_g, true_t = 1.0, 20.0
    covered = 0
    seeds = 100
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        g_sq = true_g + 2.0 * rng.normal(size=200)  # single steps often negative
        trace_cov = true_t + 5.0 * rng.normal(size=200) + 3.0 * (g_sq - true_g)
        res = smoothing.interval(g_sq, trace_cov, confidence=0.9, num_resamples=1000, seed=seed)
        covered += res.low <= true_t / true_g <= res.high
    # Nominal 0.9; binomial s.d. over 100 seeds is 0.03, so this band is about ±3.5 s.d.
    assert 0.79 <= covered / seeds <= 0.99, covered


def ar1(rng, n, phi):
    noise = rng.normal(size=n)
    out = np.empty(n)
    out[0] = noise[0] / np.sqrt(1 - phi**2)
    for i in range(1, n):
        out[i] = phi * out[i - 1] + noise[i]
    return out


def test_block_bootstrap_is_wider_than_iid_on_correlated_steps():
    rng = np.random.default_rng(0)
    n = 1000
    g_sq = 1.0 + 0.2 * ar1(rng, n, 0.9)
    trace_cov = 20.0 + 2.0 * ar1(rng, n, 0.9)
    iid = smoothing.interval(g_sq, trace_cov, block_size=1)
    block = smoothing.interval(g_sq, trace_cov)
    assert block.block_size == 10 and iid.block_size == 1
    assert block.estimate == iid.estimate
    # The variance of the mean of an AR(1) series is ~(1+phi)/(1-phi) = 19x the iid one.
    assert block.high - block.low > 2 * (iid.high - iid.low), (block, iid)


def test_interval_estimate_is_the_ratio_of_means_and_drops_nonfinite_rows():
    rng = np.random.default_rng(2)
    g_sq = 2.0 + rng.normal(size=50)
    trace_cov = 40.0 + rng.normal(size=50)
    g_sq[[5, 6]] = np.nan
    trace_cov[[9]] = np.inf
    res = smoothing.interval(g_sq, trace_cov)
    keep = np.isfinite(g_sq) & np.isfinite(trace_cov)
    assert (res.n, res.nonfinite_dropped) == (47, 3)
    assert res.estimate == pytest.approx(trace_cov[keep].mean() / g_sq[keep].mean(), rel=1e-12)
    assert res.low < res.estimate < res.high
    again = smoothing.interval(g_sq, trace_cov)
    assert again == res  # deterministic given the seed


def test_degenerate_series_give_infinite_estimate():
    # Mean g_sq exactly 0 and negative: the noise scale is not bounded by the data.
    for g_sq in ([1.0, -1.0, 0.5, -0.5], [0.1, -0.5, 0.2, -0.3]):
        res = smoothing.interval(g_sq, [5.0, 6.0, 7.0, 8.0])
        assert res.estimate == np.inf == float(estimate.simple_noise_scale(np.mean(g_sq), 6.5))
        assert res.high == np.inf and not np.isnan(res.low)
    # Some resamples with a non-positive mean: infinite upper end, finite lower end, no NaN.
    rng = np.random.default_rng(3)
    res = smoothing.interval(0.2 + rng.normal(size=30), 10 + rng.normal(size=30), block_size=1)
    assert res.high == np.inf and np.isfinite(res.low) and np.isfinite(res.estimate)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([1.0, 2.0, 3.0], [1.0, 2.0]), {}, "different lengths"),
        (([[1.0, 2.0]], [[1.0, 2.0]]), {}, "1-D"),
        (([1.0, np.nan, 2.0], [1.0, 1.0, np.nan]), {}, "at least 2 finite"),
        (([], []), {}, "at least 2 finite"),
        (([1.0, 2.0], [1.0, 2.0]), {"confidence": 1.0}, "confidence"),
        (([1.0, 2.0], [1.0, 2.0]), {"confidence": 0.0}, "confidence"),
        (([1.0, 2.0], [1.0, 2.0]), {"block_size": 3}, "block of all 2 rows resamples nothing"),
        (([1.0, 2.0], [1.0, 2.0]), {"block_size": 0}, r"got 0\.$"),
        (([1.0, 2.0], [1.0, 2.0]), {"num_resamples": 0}, "num_resamples"),
    ],
)
def test_interval_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        smoothing.interval(*args, **kwargs)


def test_finite_extremes_keep_the_average_finite():
    """Finite float32 inputs near 3e38 of opposite signs: the average stays finite (the step's
    difference overflowed, and the state was inf, then nan for good); decay 0 keeps the last."""
    for decay in (0.0, 0.5):
        tracker, state = smoothing.ema(decay), smoothing.ema(decay).init()
        for g in (3e38, -3e38, 1.0):
            state = tracker.update(stats(g, 1.0), state)
            assert np.isfinite(float(state.g_sq)) and int(state.skipped) == 0
        if decay == 0.0:
            assert float(state.g_sq) == 1.0
