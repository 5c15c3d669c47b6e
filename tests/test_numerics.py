"""The library never returns a silently wrong number: bad arguments are refused with a clear
ValueError, extreme magnitudes (1e±38 in float32, 1e±306 in float64) give the right answer or
an explicit error/warning, never a silent nan/inf; plus hypothesis properties over float ranges
for from_two_batches, smoothing.interval, recommend and critical.effective_noise_scale, and
pins of three bug classes (the expanded-percentile factor of the branched interval, a held-out
batch disjoint from the forks' training examples, ties going to the smaller batch)."""

import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from gns import critical, estimate, finder, recommend, scaling, smoothing, tradeoff

PROPS = settings(max_examples=40, deadline=None, derandomize=True)  # the same cases in CI
TIMES = {b: 0.01 + 0.001 * b for b in (16, 32, 64, 128, 256)}


def rec(b_noise=400.0, times=TIMES, **kw):
    kw = {"max_batch_size": 256, "base_lr": 0.1, "base_batch_size": 32, **kw}
    return recommend.recommend(b_noise, times, **kw)


# ---------------------------------------------------------------------------------------------
# recommend: no truncated batch, no nan/negative/infinite times or prices, ties to the smaller.


@pytest.mark.parametrize(
    "kw",
    [
        {"times": {3.5: 0.01, 16: 0.02}},
        {"times": ([3.5, 16], [0.01, 0.02])},
        {"base_batch_size": 3.5},
        {"base_batch_size": True},
        {"candidates": [16, 3.5]},
        {"candidates": [16, float("nan")]},
        {"candidates": [16, 0]},
    ],
)
def test_recommend_refuses_a_fractional_batch_instead_of_truncating_it(kw):
    with pytest.raises(ValueError, match="whole number of examples"):
        rec(**kw)


def test_recommend_accepts_whole_floats_as_their_int():
    as_floats = rec(times={float(b): v for b, v in TIMES.items()}, base_batch_size=32.0)
    assert as_floats.table == rec().table and as_floats.batch_size == rec().batch_size


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"s_min": math.nan}, "s_min"),
        ({"s_min": -100.0}, "s_min"),
        ({"s_min": 0.0}, "s_min"),
        ({"s_min": math.inf}, "s_min"),
        ({"price_per_hour": math.inf}, "price_per_hour"),
        ({"price_per_hour": math.nan}, "price_per_hour"),
        ({"price_per_hour": -2.0}, "price_per_hour"),
        ({"near_optimal_tolerance": math.nan}, "near_optimal_tolerance"),
        ({"near_optimal_tolerance": -0.1}, "near_optimal_tolerance"),
    ],
)
def test_recommend_refuses_non_finite_or_negative_times_and_prices(kw, name):
    with pytest.raises(ValueError, match=f"{name} must be a finite"):
        rec(**kw)


def test_ties_go_to_the_smaller_batch():
    # N = 32: (1 + 32/32)·3.0 = (1 + 32/64)·4.0 = 6.0 exactly, in either order of the dict.
    for times in ({32: 3.0, 64: 4.0}, {64: 4.0, 32: 3.0}):
        r = rec(32.0, times, max_batch_size=64, candidates=[32, 64])
        assert r.table[0]["relative_time"] == r.table[1]["relative_time"] == 1.0
        assert r.time_optimal == r.cost_optimal == r.batch_size == 32
    # No noise (N <= 0) and equal step times: steps do not depend on B, the smaller wins.
    r = rec(0.0, {16: 0.5, 32: 0.5, 64: 0.5}, max_batch_size=64, candidates=[64, 16, 32])
    assert r.batch_size == 16 and r.near_optimal_range == (16, 64)


def test_huge_noise_scale_ranks_like_an_infinite_one_without_overflow():
    slow = {b: 2.0 + 0.01 * b for b in (16, 32, 64)}  # (1 + 1e308/B)·t(B) would overflow
    huge = rec(1e308, slow, max_batch_size=64, base_batch_size=16)
    assert huge.batch_size == rec(math.inf, slow, max_batch_size=64, base_batch_size=16).batch_size
    assert all(math.isfinite(row["relative_time"]) for row in huge.table)
    # lr = base_lr·(1 + N/B_0)/(1 + N/B) -> base_lr·B/B_0 as N -> inf; eps_max would overflow.
    lr, _ = scaling.learning_rate("sgd", 10.0, 1, 2, 1e308)
    assert lr == pytest.approx(20.0, rel=1e-12)
    with pytest.raises(ValueError, match="overflows float64"):
        scaling.learning_rate("sgd", 1e308, 1, 4, math.inf)


def test_table_values_beyond_float64_are_warned_about():
    r = rec(s_min=1e300, price_per_hour=1e300)
    assert all(row["cost_to_target"] == math.inf for row in r.table)
    assert any("beyond the float64 range" in w and "cost_to_target" in w for w in r.warnings)
    assert not any("float64" in w for w in rec(s_min=1e3, price_per_hour=2.0).warnings)


@PROPS
@given(
    n=st.floats(1e-300, 1e300),
    a=st.floats(1e-6, 1e3),
    c=st.floats(1e-9, 1e-2),
    k=st.integers(-30, 30),
)
def test_recommend_is_finite_and_picks_the_minimum_of_its_own_table(n, a, c, k):
    """Property over magnitudes: t(B) = a + c·B (scaled by 2^k) and any noise scale give a
    finite table whose pick is the smallest batch among its minima."""
    times = {b: (a + c * b) * 2.0**k for b in (1, 4, 16, 64, 256)}
    r = rec(n, times, max_batch_size=256, base_batch_size=16)
    rel = [row["relative_time"] for row in r.table]
    assert all(math.isfinite(x) and x >= 1.0 for x in rel)
    assert r.batch_size == min(row["batch_size"] for row in r.table if row["relative_time"] == 1.0)
    assert math.isfinite(r.learning_rate) and r.learning_rate > 0


# ---------------------------------------------------------------------------------------------
# smoothing: float state only; intervals contain their estimate; scale-free means.


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, "int64"])
def test_ema_refuses_a_non_float_dtype(dtype):
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        smoothing.ema(dtype=dtype)


def test_interval_refuses_a_block_of_the_whole_series_and_too_few_resamples():
    rng = np.random.default_rng(0)
    g, t = 1.0 + rng.normal(size=20), 50.0 + 10 * rng.normal(size=20)
    with pytest.raises(ValueError, match=r"block_size must be an int in \[1, n - 1 = 19\]"):
        smoothing.interval(g, t, block_size=20)
    for resamples, confidence in ((1, 0.9), (19, 0.9), (199, 0.99)):
        with pytest.raises(ValueError, match="num_resamples must be an int >="):
            smoothing.interval(g, t, num_resamples=resamples, confidence=confidence)
    res = smoothing.interval(g, t, block_size=19, num_resamples=20)
    assert res.low <= res.estimate <= res.high and res.block_size == 19


def test_interval_of_a_constant_series_contains_its_estimate():
    # Every resample's ratio is the estimate up to rounding of the block sums.
    g, t = np.full(30, 0.1), np.full(30, 0.7)
    for block in (1, 3, 29):
        res = smoothing.interval(g, t, block_size=block, num_resamples=200)
        assert res.low <= res.estimate <= res.high
        assert res.estimate == pytest.approx(7.0, rel=1e-14)


@pytest.mark.parametrize("scale", [1e-300, 1e-38, 1e38, 1e300, 1e306])
def test_interval_is_scale_free_up_to_the_float64_limits(scale):
    rng = np.random.default_rng(1)
    g, t = 1.0 + rng.normal(size=64), 50.0 + 10 * rng.normal(size=64)
    ref = smoothing.interval(g, t, num_resamples=200)
    for block in (None, 1):
        got = smoothing.interval(g * scale, t * scale, block_size=block, num_resamples=200)
        want = smoothing.interval(g, t, block_size=block, num_resamples=200)
        np.testing.assert_allclose([got.estimate, got.low, got.high],
                                   [want.estimate, want.low, want.high], rtol=1e-12)  # fmt: skip
    assert math.isfinite(ref.estimate)


finite_series = st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=40)


@PROPS
@given(
    g=finite_series,
    t_scale=st.floats(0.01, 100.0),
    k_g=st.integers(-500, 500),
    k_t=st.integers(-500, 500),
    block=st.one_of(st.none(), st.integers(1, 2)),
)
def test_interval_contains_its_estimate_and_scales_exactly(g, t_scale, k_g, k_t, block):
    """Property: the interval contains the estimate; multiplying g_sq by 2^k_g and trace_cov by
    2^k_t (up to 1e±150) multiplies estimate and ends by 2^(k_t - k_g) (up to 1e±300)."""
    g = np.asarray(g)
    t = t_scale * (1.0 + np.abs(g))
    res = smoothing.interval(g, t, block_size=block, num_resamples=40)
    assert res.low <= res.estimate <= res.high
    cg, ct = math.ldexp(1.0, k_g), math.ldexp(1.0, k_t)
    scaled = smoothing.interval(g * cg, t * ct, block_size=block, num_resamples=40)
    factor = math.ldexp(1.0, k_t - k_g)
    got = np.array([scaled.estimate, scaled.low, scaled.high])
    want = np.array([res.estimate, res.low, res.high]) * factor
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert not np.isnan(got).any()


# ---------------------------------------------------------------------------------------------
# from_two_batches: sizes checked; host numbers in float64; overflow raises.


@pytest.mark.parametrize(
    "sizes", [(1, math.inf), (math.nan, 4), (1, math.nan), (2, 2), (4, 2), (0, 4), (True, 4)]
)
def test_from_two_batches_refuses_invalid_sizes(sizes):
    with pytest.raises(ValueError, match="small_size"):
        estimate.from_two_batches(3.0, 1.5, *sizes)


@pytest.mark.parametrize("scale", [1e-300, 1e-38, 1.0, 1e38, 1e300])
def test_from_two_batches_host_numbers_are_exact_at_every_magnitude(scale):
    s = estimate.from_two_batches(3.0 * scale, 1.5 * scale, 1, 4)
    assert float(s.b_simple) == pytest.approx(2.0, rel=1e-12)
    assert float(s.g_sq) == pytest.approx(scale, rel=1e-12)
    assert float(s.trace_cov) == pytest.approx(2.0 * scale, rel=1e-12)


def test_from_two_batches_overflow_of_float64_raises_and_nonfinite_norms_are_reported():
    with pytest.raises(ValueError, match="overflow float64"):
        estimate.from_two_batches(1e308, 6e307, 8, 16)  # tr(Σ) = 16·4e307 > 1.8e308
    diverged = estimate.from_two_batches(math.nan, 1.0, 1, 4)  # a diverged step: reported
    assert math.isnan(float(diverged.b_simple))
    s32 = estimate.from_two_batches(jnp.float32(3e38), jnp.float32(1.5e38), 1, 4)
    assert s32.g_sq.dtype == jnp.float32 and float(s32.b_simple) == pytest.approx(2.0, rel=1e-6)


@PROPS
@given(
    small=st.floats(0, 1e300, allow_subnormal=False),  # squared norms (negative: refused)
    big=st.floats(0, 1e300, allow_subnormal=False),
    b=st.integers(1, 64),
    extra=st.integers(1, 4096),
    k=st.integers(-60, 60),
)
def test_from_two_batches_matches_exact_arithmetic(small, big, b, extra, k):
    """Property: finite host norms give the exact-rational formulas (to float64 rounding of the
    scale) or a ValueError for a true overflow; scaling both norms by 2^k scales g_sq and
    trace_cov by 2^k and leaves b_simple unchanged."""
    big_b = b + extra
    exact_g = (Fraction(big_b) * Fraction(big) - Fraction(b) * Fraction(small)) / (big_b - b)
    exact_t = (Fraction(small) - Fraction(big)) / (Fraction(1, b) - Fraction(1, big_b))
    try:
        s = estimate.from_two_batches(small, big, b, big_b)
    except ValueError as e:
        assert "overflow float64" in str(e)
        assert max(abs(exact_g), abs(exact_t)) > Fraction(np.finfo(np.float64).max)
        return
    tol = 1e-12 * max(abs(small), abs(big)) * big_b
    assert abs(Fraction(float(s.g_sq)) - exact_g) <= Fraction(tol)
    assert abs(Fraction(float(s.trace_cov)) - exact_t) <= Fraction(tol * b)
    c = math.ldexp(1.0, k)
    if max(abs(small), abs(big)) * c < 1e300 and (small, big) != (0.0, 0.0):  # no overflow
        scaled = estimate.from_two_batches(small * c, big * c, b, big_b)
        assert float(scaled.g_sq) == float(s.g_sq) * c
        assert float(scaled.trace_cov) == float(s.trace_cov) * c
        assert float(scaled.b_simple) == float(s.b_simple) or math.isnan(float(s.b_simple))


# ---------------------------------------------------------------------------------------------
# tradeoff.fit: equivariant to the units of B and S at any magnitude.


@pytest.mark.parametrize("cb, cs", [(1e-310, 1.0), (1e300, 1.0), (1.0, 1e300), (1e150, 1e150)])
def test_tradeoff_fit_is_equivariant_to_units_at_extreme_magnitudes(cb, cs):
    b, s = np.array([32.0, 64.0, 128.0, 256.0]), np.array([3000.0, 2000.0, 1500.0, 1250.0])
    ref = tradeoff.fit(b, s, num_bootstrap=40)
    got = tradeoff.fit(b * cb, s * cs, num_bootstrap=40)
    assert got.s_min == pytest.approx(ref.s_min * cs, rel=1e-9)
    assert got.b_crit == pytest.approx(ref.b_crit * cb, rel=1e-9)
    np.testing.assert_allclose(got.intervals["b_crit"], np.array(ref.intervals["b_crit"]) * cb,
                               rtol=1e-9)  # fmt: skip
    if math.isfinite(ref.e_min * cs * cb):
        assert got.e_min == pytest.approx(ref.e_min * cs * cb, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# critical.effective_noise_scale: no cancellation at B_noise/B_ref ~ 1e30, no overflow of ΔS·B.


def exact_effective(delta, b, ref):
    """E_min/S_min of the points in exact rational arithmetic."""
    r = Fraction(ref)
    pairs = [(Fraction(d), Fraction(x)) for d, x in zip(delta, b, strict=True)]
    s = sum(d * r / (r + x) for d, x in pairs)
    e = sum(d * r * x / (r + x) for d, x in pairs)
    return float(e / s)


@pytest.mark.parametrize(
    "delta, b, ref",
    [
        ([100.0, 100.0], [1e32, 3e32], 100.0),  # B_noise/B_ref = 1e30: 1 - frac rounds to 0
        ([100.0, 100.0], [100.0, 300.0], 1e-36),  # the same ratio from a tiny B_ref
        ([1e306, 1e306], [100.0, 300.0], 100.0),  # ΔS·B_ref overflows
        ([100.0, 100.0], [100.0, 300.0], 1e306),
    ],
)
def test_effective_noise_scale_is_right_at_extreme_ratios(delta, b, ref):
    res = critical.effective_noise_scale(delta, b, ref, num_resamples=200)
    assert res.value == pytest.approx(exact_effective(delta, b, ref), rel=1e-12)
    assert res.low <= res.value <= res.high
    if not (math.isfinite(res.s_min) and math.isfinite(res.e_min)):
        assert "beyond the float64 range" in res.note


def test_effective_noise_scale_refuses_too_few_resamples():
    with pytest.raises(ValueError, match="num_resamples must be an int >= 20"):
        critical.effective_noise_scale([100, 100], [100.0, 300.0], 100, num_resamples=1)


@PROPS
@given(
    delta=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=6),
    b_exp=st.lists(st.floats(-40, 40), min_size=6, max_size=6),
    ref=st.floats(1.0, 1e4),
    k=st.integers(-900, 900),
)
def test_effective_noise_scale_properties(delta, b_exp, ref, k):
    """Property: the value matches exact arithmetic at any B_noise/B_ref (1e±40), lies in its
    interval, does not change when every ΔS is multiplied by 2^k, and scales with B_ref and
    B_noise together."""
    b = [10.0**e * ref for e in b_exp[: len(delta)]]
    res = critical.effective_noise_scale(delta, b, ref, num_resamples=40)
    assert res.value == pytest.approx(exact_effective(delta, b, ref), rel=1e-9)
    assert res.low <= res.value <= res.high
    c = math.ldexp(1.0, k)
    stretched = critical.effective_noise_scale([d * c for d in delta], b, ref, num_resamples=40)
    assert stretched.value == res.value
    both = critical.effective_noise_scale(delta, [x * 4 for x in b], ref * 4, num_resamples=40)
    assert both.value == pytest.approx(4 * res.value, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The branched critical batch: the expanded-percentile factor, and a disjoint held-out batch.


@pytest.mark.parametrize("n", [2, 3, 4, 8, 30])
@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95])
def test_expanded_percentile_level_is_sqrt_n_over_n_minus_1_times_t(n, confidence):
    """Hesterberg's expanded percentile: read the bootstrap at the level α' whose normal
    quantile is sqrt(n/(n-1))·t_{n-1}(1 - α/2): wider than nominal, never narrower."""
    alpha = 1.0 - confidence
    expanded = critical._expanded_alpha(alpha, n)
    want_z = math.sqrt(n / (n - 1)) * scipy.stats.t(df=n - 1).isf(alpha / 2)
    assert scipy.stats.norm.isf(expanded / 2) == pytest.approx(want_z, rel=1e-9)
    assert expanded < alpha


def linear_problem():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1024, 2)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0]) + 0.5 * rng.standard_normal(1024)).astype(np.float32)
    requests = []

    def batch_fn(size, index):
        requests.append((size, index))
        return x[index * size : (index + 1) * size], y[index * size : (index + 1) * size]

    def make_step(size, mult):
        def step(w, batch):
            xb, yb = batch
            return w - 0.05 * mult * xb.T @ (xb @ w - yb) / xb.shape[0]

        return step

    held_x, held_y = x[-64:], y[-64:]  # examples 960-1023

    def eval_fn(w):
        return (held_x @ w - held_y) ** 2  # per-example losses

    return jnp.zeros(2), make_step, batch_fn, eval_fn, requests


def examples_of(requests):
    return {e for size, index in requests for e in range(index * size, (index + 1) * size)}


def test_forks_train_on_exactly_their_documented_examples_and_the_interval_is_expanded(monkeypatch):
    w, make_step, batch_fn, eval_fn, requests = linear_problem()
    kw = dict(ref_batch_size=8, num_examples=64, exponents=(-1, 0, 1), num_repeats=4,
              num_resamples=100, jit=False)  # fmt: skip
    res = critical.branched_critical_batch(w, make_step, batch_fn, eval_fn, **kw)
    # The forks train on examples [0, num_repeats·N) and nothing else: a held-out batch taken
    # from index num_repeats·N on (here 960-1023) never overlaps them.
    assert examples_of(requests) == set(range(4 * 64))
    assert examples_of(requests).isdisjoint(range(960, 1024))
    # The expanded interval contains the nominal percentile interval of the same resamples.
    monkeypatch.setattr(critical, "_expanded_alpha", lambda alpha, n: alpha)
    nominal = critical.branched_critical_batch(w, make_step, batch_fn, eval_fn, **kw)
    assert nominal.b_crit == res.b_crit
    assert res.low <= nominal.low <= nominal.high <= res.high
    assert res.low <= res.b_crit <= res.high


def test_find_batch_size_takes_the_held_out_batch_outside_every_trained_example():
    x = np.random.default_rng(0).normal(size=(4096, 4)).astype(np.float32)
    y = x.sum(1)
    requests = []

    def batch_fn(size, index):
        requests.append((size, index))
        sl = slice(index * size, (index + 1) * size)
        return {"x": x[sl], "y": y[sl]}

    def loss_fn(w, batch):
        return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

    eval_size = 24  # no other request has this size
    finder.find_batch_size(
        loss_fn, jnp.zeros(4), optax.sgd(0.05), batch_fn, ref_batch_size=8, pilot_steps=4,
        num_stretches=2, branched=True, branch_points=1, branch_exponents=(0, 1),
        branch_steps=1, branch_repeats=2, eval_batch_size=eval_size, candidates=(8,),
        timing_rounds=1, progress=False,
    )  # fmt: skip
    held = examples_of([r for r in requests if r[0] == eval_size])
    trained = examples_of([r for r in requests if r[0] != eval_size])
    assert len(held) == eval_size and held.isdisjoint(trained)
