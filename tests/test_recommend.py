"""Tests for gns.recommend: analytic optima, memory limit and accumulation, cost, LR rules."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gns import common, hardware, recommend, scaling

POW2 = [2**i for i in range(3, 13)]  # 8 .. 4096


def linear_times(a, b, batches=POW2):
    """t(B) = a + b·B: a fixed per-step overhead plus a per-example cost."""
    return {B: a + b * B for B in batches}


def brute_force_best(n, t, batches):
    """Independent computation: argmin over batches of (1 + n/B)·t(B), smallest on ties."""
    vals = [(1 + n / B) * t[B] for B in batches]
    return batches[int(np.argmin(vals))]


@pytest.mark.parametrize("a, b, n", [(0.01, 1e-4, 1000.0), (0.05, 1e-4, 300.0), (1e-3, 1e-3, 50.0)])
def test_time_optimum_is_the_analytic_one_on_a_fine_grid(a, b, n):
    # (1 + N/B)(a + bB) is minimal at B* = sqrt(aN/b); with every integer a candidate, the
    # recommendation must land next to it.
    b_star = math.sqrt(a * n / b)
    grid = list(range(1, 4 * int(b_star) + 10))
    times = linear_times(a, b, grid)
    r = recommend.recommend(
        n, times, max_batch_size=max(grid), base_lr=0.1, base_batch_size=1, candidates=grid
    )
    assert abs(r.batch_size - b_star) <= 1.0, (r.batch_size, b_star)
    assert r.accumulation_steps == 1


@settings(max_examples=30, deadline=None)
@given(log_a=st.floats(-6, 0), log_b=st.floats(-7, -2), log_n=st.floats(0, 4))
def test_time_optimum_matches_brute_force_among_powers_of_two(log_a, log_b, log_n):
    a, b, n = 10**log_a, 10**log_b, 10**log_n
    times = linear_times(a, b)
    r = recommend.recommend(
        n, times, max_batch_size=4096, base_lr=0.1, base_batch_size=32, candidates=POW2
    )
    assert r.batch_size == brute_force_best(n, times, POW2)
    # The continuous optimum sqrt(aN/b) lies within a factor 2 of the best power of two
    # (when it is inside the candidate range).
    b_star = math.sqrt(a * n / b)
    if POW2[0] <= b_star <= POW2[-1]:
        assert b_star / 2 <= r.batch_size <= 2 * b_star


def test_memory_limit_is_respected_and_accumulation_used_above_it():
    a, b, n = 0.01, 1e-5, 10_000.0  # B* = sqrt(0.01 * 1e4 / 1e-5) = 3162
    times = linear_times(a, b, [8, 16, 32, 64, 128, 256])  # only these fit
    r = recommend.recommend(
        n, times, max_batch_size=256, base_lr=0.1, base_batch_size=32, candidates=POW2
    )
    # Accumulation never shortens the time to target, so the largest batch that fits wins.
    assert r.batch_size == 256 and r.accumulation_steps == 1
    rows = {row["batch_size"]: row for row in r.table}
    for B in (512, 1024, 4096):
        k = B // 256
        assert not rows[B]["fits"]
        assert rows[B]["accumulation_steps"] == k
        assert rows[B]["micro_batch_size"] == 256
        assert rows[B]["step_time_s"] == pytest.approx(k * times[256])
        assert rows[B]["relative_time"] > 1.0
    # The unconstrained optimum (3162) would have been picked without the limit.
    r_free = recommend.recommend(
        n, linear_times(a, b), max_batch_size=4096, base_lr=0.1, base_batch_size=32, candidates=POW2
    )
    assert r_free.batch_size == brute_force_best(n, linear_times(a, b), POW2) == 4096
    # When only batches above the limit are allowed, the answer is accumulation.
    r_acc = recommend.recommend(
        n, times, max_batch_size=256, base_lr=0.1, base_batch_size=32, candidates=[512, 1024]
    )
    assert r_acc.batch_size == 512
    assert r_acc.accumulation_steps == 2 and r_acc.micro_batch_size == 256
    assert "accumulation" in r_acc.reason


def test_accumulated_step_time_uneven_division():
    # B = 600 with max 256: k = 3 microbatches of 200, timed by log-log interpolation.
    t, k, micro = hardware.accumulated_step_time({128: 0.1, 256: 0.4}, 600, 256)
    assert (k, micro) == (3, 200)
    expected = math.exp(
        np.interp(math.log(200), [math.log(128), math.log(256)], [math.log(0.1), math.log(0.4)])
    )
    assert t == pytest.approx(3 * expected)


def test_accumulated_step_time_trains_exactly_the_batch():
    # ceil(301/100) = 4 microbatches would be 4 x 76 = 304 examples; 301 = 7 x 43.
    for b, fits in ((301, 100), (160, 64), (1031, 512), (512, 128), (96, 128)):
        _, k, micro = hardware.accumulated_step_time({32: 0.1, 64: 0.2}, b, fits)
        assert k * micro == b and micro <= fits
        assert not any(b % j == 0 and b // j <= fits for j in range(1, k))  # the fewest steps
    with pytest.raises(ValueError, match="whole number"):
        hardware.accumulated_step_time({32: 0.1}, 3.5, 100)


def test_cost_optimum_fixed_devices_equals_time_optimum_and_scale_out_differs():
    a, b, n = 0.01, 1e-4, 1000.0
    times = linear_times(a, b)
    r = recommend.recommend(
        n,
        times,
        max_batch_size=4096,
        base_lr=0.1,
        base_batch_size=32,
        candidates=POW2,
        price_per_hour=3.0,
        num_devices=8,
    )
    # (1 + B/N)·t(B)/B·E_min == S_min·(1 + N/B)·t(B): on a fixed device set they coincide.
    assert r.cost_optimal == r.time_optimal == brute_force_best(n, times, POW2)
    costs = [row["cost_per_s_min"] for row in r.table]
    expected = [8 * 3.0 / 3600 * (1 + n / B) * times[B] for B in POW2]
    np.testing.assert_allclose(costs, expected, rtol=1e-12)
    # Data parallel at 8 examples per device with perfect scaling (t constant): time falls
    # with B (largest batch), compute (1 + N/B)·(B/8)·t ∝ B + N grows (smallest batch).
    flat = {B: 0.02 for B in POW2}
    r = recommend.recommend(
        n,
        flat,
        max_batch_size=4096,
        base_lr=0.1,
        base_batch_size=32,
        candidates=POW2,
        num_devices=lambda B: B / 8,
        objective="cost",
    )
    assert r.time_optimal == 4096
    assert r.cost_optimal == r.batch_size == 8
    assert "fastest is batch 4096" in r.reason


def test_absolute_time_to_target_with_s_min():
    times = linear_times(0.01, 1e-4)
    r = recommend.recommend(
        1000.0,
        times,
        max_batch_size=4096,
        base_lr=0.1,
        base_batch_size=32,
        s_min=250.0,
        candidates=POW2,
    )
    for row in r.table:
        B = row["batch_size"]
        assert row["time_to_target_s"] == pytest.approx(250.0 * (1 + 1000.0 / B) * times[B])


def test_speedup_and_near_optimal_range():
    times = linear_times(0.01, 1e-4)
    n = 1000.0
    r = recommend.recommend(
        n, times, max_batch_size=4096, base_lr=0.1, base_batch_size=32, candidates=POW2
    )
    T = {B: (1 + n / B) * times[B] for B in POW2}
    best = min(T.values())
    assert r.predicted_speedup_vs_baseline == pytest.approx(T[32] / best)
    near = [B for B in POW2 if T[B] <= 1.1 * best]
    assert r.near_optimal_range == (min(near), max(near))
    assert r.near_optimal_range[0] <= r.batch_size <= r.near_optimal_range[1]


def test_interval_ends_move_the_recommendation_monotonically():
    times = linear_times(0.01, 1e-4)
    r = recommend.recommend(
        1000.0,
        times,
        max_batch_size=4096,
        base_lr=0.1,
        base_batch_size=32,
        candidates=POW2,
        b_noise_interval=(100.0, 10_000.0),
    )
    lo, hi = r.batch_size_under_interval
    assert lo == brute_force_best(100.0, times, POW2)
    assert hi == brute_force_best(10_000.0, times, POW2)
    assert lo <= r.batch_size <= hi and lo < hi


def test_sgd_lr_rule_closed_form_and_limits():
    n, base_lr, base_b = 500.0, 0.1, 64
    eps_max = base_lr * (1 + n / base_b)
    for B in (16, 64, 512, 8192):
        lr, rule = scaling.learning_rate("sgd", base_lr, base_b, B, n)
        assert lr == pytest.approx(eps_max / (1 + n / B))
        assert "eps_opt" in rule
    lr, _ = scaling.learning_rate("sgd", base_lr, base_b, base_b, n)
    assert lr == pytest.approx(base_lr)  # the tuned point is reproduced
    # Far above the noise scale the rate saturates at eps_max; infinite noise: linear scaling.
    lr, _ = scaling.learning_rate("momentum", base_lr, base_b, 1e9, n)
    assert lr == pytest.approx(eps_max, rel=1e-6)
    lr, rule = scaling.learning_rate("sgd", base_lr, base_b, 256, math.inf)
    assert lr == pytest.approx(0.4) and "linear" in rule


@pytest.mark.parametrize("opt", ["adam", "adamw", "lamb"])
def test_adaptive_lr_rule_is_square_root_and_says_heuristic(opt):
    lr, rule = scaling.learning_rate(opt, 2e-3, 64, 256, 500.0)
    assert lr == pytest.approx(4e-3)
    assert "heuristic" in rule and "square-root" in rule
    times = linear_times(0.01, 1e-4)
    r = recommend.recommend(
        500.0,
        times,
        max_batch_size=4096,
        base_lr=2e-3,
        base_batch_size=64,
        optimizer=opt,
        candidates=POW2,
    )
    assert r.learning_rate == pytest.approx(2e-3 * math.sqrt(r.batch_size / 64))
    assert "heuristic" in r.lr_rule


def test_infinite_noise_scale_picks_best_throughput():
    # Throughput (B/t) peaks at 128 (as on the 2-core CPU): with S ∝ 1/B that batch wins.
    times = {32: 0.0156, 64: 0.0238, 128: 0.0527 * 0.9, 256: 0.134, 512: 0.351}
    r = recommend.recommend(math.inf, times, max_batch_size=512, base_lr=0.1, base_batch_size=32)
    best = max(times, key=lambda B: B / times[B])
    assert r.batch_size == best == 128
    assert "not resolved" in r.reason


def test_non_positive_noise_scale_is_no_noise():
    times = linear_times(0.01, 1e-4)
    r = recommend.recommend(
        -3.0, times, max_batch_size=4096, base_lr=0.1, base_batch_size=32, candidates=POW2
    )
    assert r.batch_size == min(POW2)  # steps do not depend on B: the fastest step wins
    assert "not positive" in r.reason and "pool more batches" in r.reason
    assert r.learning_rate == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"b_noise": math.nan}, "nan"),
        ({"optimizer": "rmsprop"}, "optimizer must be an optimizer name"),
        ({"step_time": {}}, "empty"),
        ({"step_time": {64: -1.0}}, "finite positive"),
        ({"max_batch_size": 16}, "no batch size at or below max_batch_size=16"),
        ({"b_noise_interval": (500.0, 100.0)}, "low <= b_noise <= high"),
        ({"b_noise_interval": (5.0, 10.0)}, r"low <= b_noise <= high.*b_noise=100"),
        ({"b_noise_interval": (5.0, 10.0, 500.0)}, "two numbers"),
        ({"base_lr": "0.1"}, "base_lr must be a finite positive number"),
        ({"base_lr": None}, "base_lr must be a finite positive number"),
        ({"b_noise": np.array([100.0, 200.0])}, "b_noise must be a number"),
        ({"evidence": {"b_simple": "big"}}, r"evidence\['b_simple'\] must be a number"),
        ({"objective": "energy"}, "objective"),
        ({"step_time": {64: None}}, "finite positive seconds"),
        ({"step_time_range": [(0.05, 0.2)]}, r"step_time_range must be \{batch_size"),
        ({"step_time_range": {64: 0.1}}, r"step_time_range\[64\] must be \(low, high\)"),
        ({"num_devices": None}, "num_devices must be a positive number of devices"),
        ({"candidates": 64}, "candidates must be a list of batch sizes"),
        ({"near_optimal_tolerance": None}, "near_optimal_tolerance must be a finite fraction"),
        ({"evidence": [("b_simple", 100.0)]}, r"evidence must be \{name"),
    ],
)
def test_recommend_refuses_bad_input(kwargs, match):
    args = dict(
        b_noise=100.0,
        step_time={64: 0.1, 128: 0.2},
        max_batch_size=128,
        base_lr=0.1,
        base_batch_size=64,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        recommend.recommend(args.pop("b_noise"), args.pop("step_time"), **args)


def test_to_dict_is_json_ready():
    import json

    r = recommend.recommend(
        100.0,
        {64: 0.1, 128: 0.15},
        max_batch_size=128,
        base_lr=0.1,
        base_batch_size=64,
        b_noise_interval=(50.0, math.inf),
    )
    d = json.loads(json.dumps(r.to_dict()))
    assert d["batch_size"] == r.batch_size and d["reason"] == r.reason
    assert len(d["table"]) == len(r.table)


# ---------------------------------------------------------------------------------------------
# Degenerate noise scales (issue 10).


def test_minus_infinity_is_a_degenerate_negative_estimate_not_plus_infinity():
    times = linear_times(0.01, 1e-4)
    kw = dict(max_batch_size=4096, base_lr=0.1, base_batch_size=32, candidates=POW2)
    r = recommend.recommend(-math.inf, times, **kw)
    plus = recommend.recommend(math.inf, times, **kw)
    assert r.noise_scale_status == "non-positive" and plus.noise_scale_status == "infinite"
    assert r.batch_size == min(POW2) != plus.batch_size  # no noise: the fastest step wins
    assert "negative" in r.reason and "degenerate" in r.reason and "not resolved" not in r.reason
    assert r.learning_rate == pytest.approx(0.1)  # kept, not linearly scaled as for +inf
    lr, rule = scaling.learning_rate("sgd", 0.1, 32, 256, -math.inf)
    assert lr == 0.1 and "not positive" in rule


def test_rule_names_pick_their_rule_in_words():
    # lr(B)/lr(B_0) closed forms at B/B_0 = 4, and the rule said in words.
    for name, factor, word in [
        ("linear", 4.0, "linear"),
        ("seesaw", 0.5, "seesaw"),
        ("constant", 1.0, "constant"),
        ("sqrt", 2.0, "square-root"),
    ]:
        lr, rule = scaling.learning_rate(name, 0.1, 32, 128, 500.0)
        assert lr == pytest.approx(0.1 * factor, rel=1e-15) and word in rule
    # The recommendation takes a rule name for its learning rate too.
    r = recommend.recommend(
        500.0, linear_times(0.01, 1e-4), max_batch_size=4096, base_lr=0.1, base_batch_size=32,
        optimizer="seesaw", candidates=POW2,
    )  # fmt: skip
    assert r.learning_rate == pytest.approx(0.1 * math.sqrt(32 / r.batch_size))


def test_nan_noise_scale_never_gives_a_nan_learning_rate():
    for opt in ("sgd", "momentum", "lars"):
        with pytest.raises(ValueError, match="b_noise is nan"):
            scaling.learning_rate(opt, 0.1, 32, 256, math.nan)
    lr, _ = scaling.learning_rate("adam", 0.1, 32, 128, math.nan)  # rule ignores it
    assert lr == pytest.approx(0.2)
    with pytest.raises(ValueError, match="finite and positive"):
        scaling.learning_rate("sgd", math.nan, 32, 128, 100.0)


# ---------------------------------------------------------------------------------------------
# Uncertainty, range ends, monotonicity, basis and evidence (issue 11).


def brute_force_plausible(times, ranges, n_lo, n_hi, batches):
    """Candidate i is plausible if, at its own low time against every other's high time, it
    is the argmin for some N on a fine grid of [n_lo, n_hi]."""
    out = set()
    for n in np.geomspace(n_lo, n_hi, 4001):
        for i, B in enumerate(batches):
            vals = [(1 + n / c) * (ranges[c][0] if c == B else ranges[c][1]) for c in batches]
            if int(np.argmin(vals)) == i:
                out.add(B)
    return out


def test_plausible_set_from_both_uncertainties_matches_brute_force():
    batches = [8, 16, 32, 64, 128, 256]
    times = linear_times(0.01, 1e-4, batches)
    ranges = {B: (0.9 * t, 1.15 * t) for B, t in times.items()}
    kw = dict(max_batch_size=256, base_lr=0.1, base_batch_size=32, candidates=batches)
    exact = recommend.recommend(300.0, times, **kw)
    assert exact.plausible_batch_sizes == (exact.batch_size,)  # no uncertainty given
    noise_only = recommend.recommend(300.0, times, b_noise_interval=(100.0, 1000.0), **kw)
    both = recommend.recommend(
        300.0, times, b_noise_interval=(100.0, 1000.0), step_time_range=ranges, **kw
    )
    exact_ranges = {B: (t, t) for B, t in times.items()}
    assert set(noise_only.plausible_batch_sizes) == brute_force_plausible(
        times, exact_ranges, 100.0, 1000.0, batches
    )
    assert set(both.plausible_batch_sizes) == brute_force_plausible(
        times, ranges, 100.0, 1000.0, batches
    )
    # More uncertainty never narrows the set; both ends under the interval are in it.
    assert set(noise_only.plausible_batch_sizes) < set(both.plausible_batch_sizes)
    assert set(noise_only.batch_size_under_interval) <= set(noise_only.plausible_batch_sizes)
    assert both.batch_size_range == (
        min(both.plausible_batch_sizes),
        max(both.plausible_batch_sizes),
    )
    assert [row["plausible"] for row in both.table] == [
        B in both.plausible_batch_sizes for B in batches
    ]
    assert "can be the best" in both.reason


def test_an_accumulated_batch_is_never_plausible_beside_its_microbatch():
    # 512 and 1024 run as 2 and 4 steps of 256: one draw of t(256) times all three, so over
    # any noise scale and any draw they lose to 256 (drawn apart, 512 and 1024 looked plausible).
    times = {64: 0.074, 128: 0.138, 256: 0.27}
    ranges = {64: (0.07, 0.08), 128: (0.13, 0.15), 256: (0.2, 0.35)}
    r = recommend.recommend(
        5000.0, times, max_batch_size=256, base_lr=0.1, base_batch_size=64,
        step_time_range=ranges, b_noise_interval=(2000.0, 20000.0),
    )  # fmt: skip
    assert r.plausible_batch_sizes == tuple(
        sorted(brute_force_plausible(times, ranges, 2000.0, 20000.0, [64, 128, 256]))
    )


def test_pick_at_an_end_of_the_timed_range_is_flagged_with_the_batch_to_time_next():
    kw = dict(base_lr=0.1, base_batch_size=64)
    timed = [64, 128, 256]
    # B* = sqrt(a·N/b): 10 (below the range), 2000 (above), 141 (inside).
    low = recommend.recommend(10.0, linear_times(0.01, 1e-3, timed), max_batch_size=256, **kw)
    assert (low.batch_size, low.at_range_end, low.extend_range_to) == (64, "smallest", 32)
    high = recommend.recommend(4000.0, linear_times(0.01, 1e-5, timed), max_batch_size=1024, **kw)
    assert (high.batch_size, high.at_range_end, high.extend_range_to) == (256, "largest", 512)
    assert any("large end" in w for w in high.warnings) and "large end" in high.reason
    mid = recommend.recommend(200.0, linear_times(0.01, 1e-4, timed), max_batch_size=256, **kw)
    assert (mid.batch_size, mid.at_range_end, mid.extend_range_to) == (128, None, None)
    assert mid.warnings == ()


def test_step_times_falling_with_the_batch_warn():
    times = {8: 0.012, 16: 0.010, 32: 0.02, 64: 0.04}
    r = recommend.recommend(50.0, times, max_batch_size=64, base_lr=0.1, base_batch_size=16)
    (w,) = [w for w in r.warnings if "falls with the batch" in w]
    assert "t(8)" in w and "t(16)" in w and "beyond the timing spreads" in w
    # Within the spreads: the timing's noise (the plausible range carries it), not warned.
    r = recommend.recommend(
        50.0,
        times,
        max_batch_size=64,
        base_lr=0.1,
        base_batch_size=16,
        step_time_range={8: (0.009, 0.013), 16: (0.009, 0.011)},
    )
    assert not any("falls with the batch" in w for w in r.warnings)


def test_basis_and_evidence_with_ratios():
    times = linear_times(0.01, 1e-4)
    kw = dict(max_batch_size=4096, base_lr=0.1, base_batch_size=32, candidates=POW2)
    evidence = {"b_simple": 183.0, "trajectory": (250.0, 200.0, 310.0), "branched": 364.0}
    r = recommend.recommend(364.0, times, basis="branched", evidence=evidence, **kw)
    assert r.basis == "branched" and "Basis: branched" in r.reason
    assert set(r.evidence) == {"b_simple", "trajectory", "branched"}
    assert r.evidence["b_simple"]["ratio_to_basis"] == pytest.approx(183.0 / 364.0)
    assert r.evidence["trajectory"] == {
        "value": 250.0,
        "low": 200.0,
        "high": 310.0,
        "ratio_to_basis": pytest.approx(250.0 / 364.0),
    }
    assert r.evidence["branched"]["ratio_to_basis"] == 1.0
    # The basis joins the evidence when it is not in it; a mismatch is a caller's bug.
    r = recommend.recommend(183.0, times, b_noise_interval=(150.0, 220.0), **kw)
    assert r.evidence == {
        "b_simple": {"value": 183.0, "low": 150.0, "high": 220.0, "ratio_to_basis": 1.0}
    }
    with pytest.raises(ValueError, match="basis must be the value"):
        recommend.recommend(200.0, times, basis="branched", evidence=evidence, **kw)
    with pytest.raises(ValueError, match="basis must be a non-empty string"):
        recommend.recommend(200.0, times, basis="", **kw)


def test_a_batch_size_timed_twice_is_named():
    """Duplicate batch sizes in a step-time table were overwritten by the last one."""
    with pytest.raises(ValueError, match=r"batch sizes \[32\] twice"):
        common.check_step_times(([32, 32, 64], [0.1, 0.5, 0.2]), 256)


def test_the_speedup_names_a_reference_batch_that_was_not_timed():
    times = {64: 0.02, 128: 0.03, 256: 0.05}
    kw = dict(max_batch_size=256, base_lr=0.1)
    timed = recommend.recommend(500.0, times, base_batch_size=64, **kw)
    assert "Predicted speedup over batch 64: " in timed.reason
    untimed = recommend.recommend(500.0, times, base_batch_size=32, **kw)
    assert "over batch 32 (not timed: its step time estimated from the timed sizes): " in (
        untimed.reason
    )
