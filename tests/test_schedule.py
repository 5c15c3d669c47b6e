"""Tests of gns.schedule: decisions on synthetic noise series against the closed form of the
objective ``(1 + N/B)·(a + b·B)``, hysteresis invariants (hypothesis), the learning-rate rules,
the memory limit, bad input, and jit against eager."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gns import schedule

# Step time t(B) = A + C·B: a fixed overhead plus a per-example cost. Then the score
# (1 + N/B)·t(B) of B and B' cross at N = C·B·B'/A, and the optimum is near sqrt(A·N/C).
A, C = 0.01, 0.001
CANDS = (8, 16, 32, 64, 128, 256, 512)
TIMES = {b: A + C * b for b in CANDS}
NO_FLOAT_EDGE = 1e-4  # premise: no noise value this close (relative) to a threshold


def score(n, b):
    return (1.0 + n / b) * (A + C * b)


def argmin_batch(n, cands=CANDS):
    return min(cands, key=lambda b: score(n, b))


def crossover(b1, b2, margin=0.0):
    """Noise scale above which b2 > b1 is predicted faster than b1 by ``margin``:
    (1 + N/b2)(A + C·b2) <= (1 - m)(1 + N/b1)(A + C·b1), linear in N (``inf``: never).
    For m = 0 it is C·b1·b2/A."""
    k = 1.0 - margin
    slope = k * (A + C * b1) / b1 - (A + C * b2) / b2  # > 0: b2 gains as N grows
    if slope <= 0:
        return math.inf
    return ((A + C * b2) - k * (A + C * b1)) / slope


def make(**kw):
    kw.setdefault("max_batch_size", 512)
    kw.setdefault("candidates", CANDS)
    return schedule.batch_size_schedule(TIMES, **kw)


def as_np(decisions):
    return jax.tree.map(np.asarray, decisions)


# ---------------------------------------------------------------------------------------------
# Decisions against the closed form.


def test_crossover_closed_form_matches_its_definition():
    for b1, b2 in zip(CANDS, CANDS[1:], strict=False):
        n = crossover(b1, b2)
        assert n == pytest.approx(C * b1 * b2 / A)
        assert score(n, b1) == pytest.approx(score(n, b2))
        n = crossover(b1, b2, 0.1)
        assert score(n, b2) == pytest.approx(0.9 * score(n, b1))


@pytest.mark.parametrize("noise", [3.0, 40.0, 300.0, 2000.0, 50000.0])
def test_constant_noise_keeps_the_optimal_batch(noise):
    best = argmin_batch(noise)
    sched = make(initial_batch_size=best, patience=1, margin=0.0, allow_shrink=True)
    decisions, final = schedule.simulate(sched, np.full(40, noise))
    d = as_np(decisions)
    assert np.all(d.batch_size == best)
    assert not d.changed.any() and int(final.num_changes) == 0
    assert set(d.reason.tolist()) == {schedule.KEPT_BEST}
    assert np.all(d.best_batch_size == best)


@pytest.mark.parametrize("start", [8, 512])
def test_constant_noise_from_elsewhere_changes_once_after_patience(start):
    noise, patience = 300.0, 4
    best = argmin_batch(noise)  # 64: sqrt(A·N/C) = 54.8
    assert best == 64
    sched = make(initial_batch_size=start, patience=patience, allow_shrink=True)
    d = as_np(schedule.simulate(sched, np.full(30, noise))[0])
    expected = np.where(np.arange(30) < patience - 1, start, best)
    np.testing.assert_array_equal(d.batch_size, expected)
    assert d.changed.sum() == 1
    assert d.reason[patience - 1] == (schedule.GREW if start < best else schedule.SHRANK)
    np.testing.assert_array_equal(d.reason[: patience - 1], schedule.KEPT_WAITING)
    np.testing.assert_array_equal(d.streak[: patience - 1], np.arange(1, patience))
    # The predicted gain is 1 - score(best)/score(start), from the closed form.
    assert d.predicted_gain[0] == pytest.approx(1 - score(noise, best) / score(noise, start))


def geometric_ramp(n0=4.0, ratio=1.02, steps=450):
    ramp = n0 * ratio ** np.arange(steps)
    return ramp


def assert_away_from(values, thresholds):
    for th in thresholds:
        assert np.min(np.abs(values / th - 1)) > NO_FLOAT_EDGE, "test premise: pick another ramp"


def test_ramp_without_hysteresis_follows_the_closed_form_argmin():
    ramp = geometric_ramp()
    crossings = [crossover(b1, b2) for b1, b2 in zip(CANDS, CANDS[1:], strict=False)]
    assert_away_from(ramp, crossings)
    sched = make(patience=1, margin=0.0)
    d = as_np(schedule.simulate(sched, ramp)[0])
    # Independently: the batch is B_i exactly while crossings[i-1] < N < crossings[i].
    expected = np.array(CANDS)[np.searchsorted(crossings, ramp)]
    np.testing.assert_array_equal(d.batch_size, expected)
    assert np.all(np.diff(d.batch_size) >= 0)
    assert sorted(set(d.batch_size.tolist())) == list(CANDS)  # the ramp crosses them all


def test_ramp_with_hysteresis_grows_at_the_predicted_points():
    margin, patience = 0.05, 4
    ramp = geometric_ramp()
    thresholds = [crossover(b1, b2, margin) for b1 in CANDS for b2 in CANDS if b2 > b1]
    assert_away_from(ramp, [t for t in thresholds if math.isfinite(t)])
    # Expected, from the closed form: from batch B, the first step at which some larger
    # candidate passes its margin threshold against B, plus patience - 1 (the streak must last
    # `patience` consecutive updates; on a rising ramp it does); the new batch is the closed-form
    # optimum at that step.
    expected_steps, expected_sizes, current, k = [], [], CANDS[0], 0
    while current < CANDS[-1]:
        th = min(crossover(current, b, margin) for b in CANDS if b > current)
        passed = np.flatnonzero(ramp[k:] >= th)
        if passed.size == 0 or k + passed[0] + patience - 1 >= len(ramp):
            break
        k += int(passed[0]) + patience - 1
        current = argmin_batch(ramp[k])
        expected_steps.append(k)
        expected_sizes.append(current)
        k += 1
    assert len(expected_steps) >= 3  # premise: the ramp makes several changes
    assert expected_sizes != sorted(set(CANDS))[1 : len(expected_sizes) + 1]  # one is a skip
    sched = make(patience=patience, margin=margin)
    d = as_np(schedule.simulate(sched, ramp)[0])
    changes = np.flatnonzero(d.changed)
    # (here: steps [78, 151, 233, 343] to [16, 32, 64, 256]; 128 never beats 64 by 5%)
    np.testing.assert_array_equal(changes, expected_steps)
    np.testing.assert_array_equal(d.batch_size[changes], expected_sizes)
    assert np.all(d.reason[changes] == schedule.GREW)
    assert np.all(np.diff(d.batch_size) >= 0)


def test_streak_counts_consecutive_updates_in_one_direction():
    # From 64: at N = 20000 a larger batch is >= 5% faster, at N = 2 a smaller one is.
    up, down = argmin_batch(20000.0), argmin_batch(2.0)
    assert score(20000.0, up) < 0.95 * score(20000.0, 64) and down == 8
    sched = make(initial_batch_size=64, patience=3, margin=0.05, allow_shrink=True)
    noise = [20000.0, 2.0, 20000.0, 20000.0, 20000.0, 2.0, 2.0, 2.0]
    d = as_np(schedule.simulate(sched, noise)[0])
    np.testing.assert_array_equal(d.streak, [1, 1, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(d.batch_size, [64] * 4 + [up] * 3 + [down])
    np.testing.assert_array_equal(np.flatnonzero(d.changed), [4, 7])


# ---------------------------------------------------------------------------------------------
# No flapping: hysteresis invariants over random noisy sequences (hypothesis).

FLAP = dict(patience=3, margin=0.2, allow_shrink=True)
FLAP_LEN = 48
_flap_scheds = {}


def flap_sched(initial):
    # Cached per initial batch: each schedule compiles its scan once for all examples.
    if initial not in _flap_scheds:
        _flap_scheds[initial] = make(initial_batch_size=initial, **FLAP)
    return _flap_scheds[initial]


log_noise_refs = st.floats(math.log(2.0), math.log(20000.0))
unit_series = st.lists(st.floats(-1.0, 1.0), min_size=FLAP_LEN, max_size=FLAP_LEN)


@settings(max_examples=40, deadline=None)
@given(log_ref=log_noise_refs, z=unit_series)
def test_noise_within_the_margin_band_never_moves_the_optimal_batch(log_ref, z):
    # log score ratios move by less than |Δ log N| (d/dlogN of log(1/N + 1/B) is in (-1, 0)),
    # so a noise scale within a factor 1/(1 - margin) of N_ref never makes another candidate
    # better than the batch optimal at N_ref by the margin: zero changes, whatever the patience.
    m = FLAP["margin"]
    n_ref = math.exp(log_ref)
    start = argmin_batch(n_ref)
    noise = n_ref * np.exp(0.95 * -math.log(1 - m) * np.asarray(z))
    d = as_np(schedule.simulate(flap_sched(start), noise)[0])
    assert not d.changed.any()
    assert np.all(d.batch_size == start)


@settings(max_examples=40, deadline=None)
@given(log_ref=log_noise_refs, z=unit_series, start=st.sampled_from(CANDS))
def test_noisy_constant_noise_visits_each_batch_at_most_once(log_ref, z, start):
    # With the noise within a total factor F, (1 - margin)·F < 1, each change lowers the log
    # score ratio (to any fixed candidate, at N_ref) by at least -log(1 - m) - log F > 0:
    # no candidate is visited twice, so at most len(CANDS) - 1 changes and no flapping.
    m = FLAP["margin"]
    half_width = 0.45 * -math.log(1 - m)  # F = exp(2·half_width) = (1 - m)^-0.9
    noise = math.exp(log_ref) * np.exp(half_width * np.asarray(z))
    d = as_np(schedule.simulate(flap_sched(start), noise)[0])
    visited = [start] + d.batch_size[d.changed].tolist()
    assert len(visited) == len(set(visited))
    # and the changes are at least `patience` updates apart (the streak restarts at 0).
    changes = np.flatnonzero(d.changed)
    assert np.all(np.diff(np.concatenate([[-1], changes])) >= FLAP["patience"])


special = st.sampled_from([math.nan, math.inf, -5.0, 0.0])
any_noise = st.one_of(st.floats(0.5, 1e5), special)


@settings(max_examples=40, deadline=None)
@given(noise=st.lists(any_noise, min_size=FLAP_LEN, max_size=FLAP_LEN))
def test_any_series_changes_at_most_every_patience_updates(noise):
    d = as_np(schedule.simulate(flap_sched(64), np.asarray(noise))[0])
    changes = np.flatnonzero(d.changed)
    assert np.all(np.diff(np.concatenate([[-1], changes])) >= FLAP["patience"])
    assert len(changes) <= FLAP_LEN // FLAP["patience"]
    bad = ~(np.isfinite(noise) & (np.asarray(noise) > 0))
    assert not d.changed[bad].any()  # a non-usable noise scale never changes the batch


_grow_only = make(initial_batch_size=64, patience=2, margin=0.05)


@settings(max_examples=30, deadline=None)
@given(noise=st.lists(any_noise, min_size=FLAP_LEN, max_size=FLAP_LEN))
def test_grow_only_schedule_never_shrinks(noise):
    d = as_np(schedule.simulate(_grow_only, np.asarray(noise))[0])
    assert np.all(np.diff(np.concatenate([[64], d.batch_size])) >= 0)
    # Where a smaller batch would have been better by the margin, the reason says so.
    small = np.asarray(noise) < 5.0
    usable = np.isfinite(noise) & (np.asarray(noise) > 0)
    no_shrink = d.reason == schedule.KEPT_NO_SHRINK
    assert np.all(d.best_batch_size[no_shrink] < d.batch_size[no_shrink])
    assert no_shrink[small & usable & (d.batch_size >= 64)].all()


@pytest.mark.parametrize("noise", [3e38, 1e30])
def test_a_huge_finite_noise_scale_never_shrinks_the_batch(noise):
    """(1 + noise/B)·t(B) beyond float32 made every score inf: argmin then chose the first
    candidate, a shrink the grow-only rule forbids, with a nan gain."""
    sched = schedule.batch_size_schedule(
        {b: 100.0 * b for b in (16, 32, 64)}, max_batch_size=64, initial_batch_size=32, patience=1
    )
    d, _ = sched.update(noise, sched.init())
    assert int(d.batch_size) == 32 and int(d.reason) != schedule.SHRANK
    assert "nan" not in sched.explain(d)


# ---------------------------------------------------------------------------------------------
# The learning-rate rule at every change.

BASE_B, BASE_LR = 32, 0.3


def expected_multiplier(rule, b, noise):
    """The closed forms of the rules, computed independently (float64)."""
    if rule == "linear":
        return b / BASE_B
    if rule == "sgd":  # McCandlish eq. 2.6: eps_max/(1 + N/B) over eps_max/(1 + N/B_0)
        return (1 + noise / BASE_B) / (1 + noise / b)
    if rule == "sqrt":
        return math.sqrt(b / BASE_B)
    if rule == "seesaw":
        return math.sqrt(BASE_B / b)
    return 1.0


@pytest.mark.parametrize("rule", schedule.LR_RULES)
def test_learning_rate_follows_the_rule_at_every_change(rule):
    ramp = geometric_ramp()
    sched = make(lr_rule=rule, base_batch_size=BASE_B, base_lr=BASE_LR, margin=0.0, patience=2)
    state = sched.init(noise=ramp[0])
    init = sched.current(state)
    assert float(init.lr_multiplier) == pytest.approx(expected_multiplier(rule, 8, ramp[0]))
    d = as_np(schedule.simulate(sched, ramp, state)[0])
    changes = np.flatnonzero(d.changed)
    assert len(changes) == len(CANDS) - 1
    for i in changes:
        b = int(d.batch_size[i])
        assert d.lr_multiplier[i] == pytest.approx(expected_multiplier(rule, b, ramp[i]), 1e-5)
        if rule == "seesaw":  # the paper's rule: batch x2 -> lr x 1/sqrt(2)
            ratio = d.lr_multiplier[i] / d.lr_multiplier[i - 1]
            assert ratio == pytest.approx(1 / math.sqrt(b / d.previous_batch_size[i]), 1e-5)
    # Held between changes, and learning_rate = base_lr · multiplier.
    seg = np.split(d.lr_multiplier, changes)
    assert all(np.all(s == s[0]) for s in seg)
    np.testing.assert_allclose(d.learning_rate, BASE_LR * d.lr_multiplier, rtol=1e-6)


def test_sgd_rule_needs_the_noise_scale_when_starting_off_the_base_batch():
    sched = make(lr_rule="sgd", base_batch_size=BASE_B)
    with pytest.raises(ValueError, match="init\\(noise=...\\)"):
        sched.init()
    for bad in (math.nan, 0.0, -3.0):  # e.g. a fresh EMA's b_simple: no rate to derive
        with pytest.raises(ValueError, match=f"init\\(noise={bad}\\).* must be > 0"):
            sched.init(noise=bad)
    assert float(make(lr_rule="sgd").current(make(lr_rule="sgd").init()).lr_multiplier) == 1.0


def test_lr_multiplier_sgd_limits():
    assert float(schedule.lr_multiplier("sgd", 256, 32, math.inf)) == pytest.approx(8.0)
    assert float(schedule.lr_multiplier("sgd", 256, 32, -1.0)) == 1.0
    with pytest.raises(ValueError, match="lr_rule must be one of"):
        schedule.lr_multiplier("cosine", 256, 32)


# ---------------------------------------------------------------------------------------------
# Memory limit: accumulation above it, or a clear error.


def test_candidates_above_the_limit_use_accumulation():
    sched = make(max_batch_size=128, initial_batch_size=512, allow_shrink=True, patience=1)
    rows = {r["batch_size"]: r for r in sched.table}
    assert rows[128]["fits"] and rows[128]["accumulation_steps"] == 1
    for b, k in ((256, 2), (512, 4)):
        assert not rows[b]["fits"]
        assert (rows[b]["accumulation_steps"], rows[b]["micro_batch_size"]) == (k, 128)
        assert rows[b]["step_time_s"] == pytest.approx(k * (A + C * 128))
    state = sched.init()
    first = sched.current(state)
    assert (int(first.batch_size), int(first.accumulation_steps)) == (512, 4)
    assert int(first.micro_batch_size) == 128
    assert "gradient accumulation" in sched.explain(first)
    # Accumulation k x 128 scores (1 + N/(128k))·k·t(128) = (k + N/128)·t(128): never better
    # than 128 itself. At N = 1000 the closed-form optimum is 128, 25% faster than 512.
    noise = 1000.0
    accumulated = {b: (1 + noise / b) * (b // 128) * (A + C * 128) for b in (256, 512)}
    assert min(accumulated.values()) > score(noise, 128) == min(score(noise, b) for b in CANDS)
    d = as_np(schedule.simulate(sched, np.full(3, noise), state)[0])
    assert d.batch_size[0] == 128 and d.reason[0] == schedule.SHRANK
    assert d.predicted_gain[0] == pytest.approx(1 - score(noise, 128) / accumulated[512], 1e-5)
    grow = make(max_batch_size=128)
    assert as_np(schedule.simulate(grow, np.full(20, 1e7))[0]).batch_size.max() == 128


def test_candidate_that_does_not_fit_without_accumulation_is_an_error():
    with pytest.raises(ValueError, match=r"\[256, 512\] do not fit.*accumulate=True"):
        make(max_batch_size=128, accumulate=False)
    sched = make(max_batch_size=128, accumulate=False, candidates=(32, 64, 128))
    assert all(r["accumulation_steps"] == 1 for r in sched.table)


def test_candidate_above_the_fit_runs_as_equal_microbatches_of_exactly_its_examples():
    # 160 with 64 fitting: not 3 x 54 (162 examples) but 4 x 40.
    row = make(max_batch_size=64, candidates=(32, 64, 160)).table[-1]
    assert (row["accumulation_steps"], row["micro_batch_size"]) == (4, 40)


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "candidates, match",
    [
        ((), "candidates is empty"),
        ((16, 8, 32), "strictly increasing"),
        ((16, 16, 32), "strictly increasing"),
        ((0, 8), "whole number of examples >= 1"),
        ((8, 12.5), "whole number"),
        ((True, 8), "whole number"),
    ],
)
def test_bad_candidates(candidates, match):
    with pytest.raises(ValueError, match=match):
        make(candidates=candidates)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(initial_batch_size=24), "not a candidate"),
        (dict(margin=1.0), "margin"),
        (dict(patience=0), "patience"),
        (dict(lr_rule="cosine"), "lr_rule"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(max_batch_size=4), "no batch size at or below max_batch_size=4"),
        (dict(base_lr=-1.0), "base_lr"),
        (dict(base_batch_size=math.inf), "base_batch_size must be a whole number"),
        (dict(base_batch_size=1.5), "base_batch_size must be a whole number"),
        (dict(base_batch_size="64"), "base_batch_size must be a whole number"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_numpy_scalars_are_numbers():
    ref = make(base_lr=0.1, base_batch_size=16)
    got = make(base_lr=np.float32(0.1), base_batch_size=np.int64(16))
    assert float(got.current(got.init()).learning_rate) == float(
        ref.current(ref.init()).learning_rate
    )


@pytest.mark.parametrize("times", [{}, {8: 0.0}, {8: math.nan}])
def test_bad_step_time(times):
    with pytest.raises(ValueError, match="step_time"):
        schedule.batch_size_schedule(times, max_batch_size=512)


_patience_3 = make(patience=3)
_patience_3_update = jax.jit(_patience_3.update)  # one program for every unusable value


@pytest.mark.parametrize(
    "bad, code, words",
    [
        (math.nan, schedule.KEPT_NAN, "noise scale is nan"),
        (math.inf, schedule.KEPT_INF, "+inf"),
        (-4.0, schedule.KEPT_NONPOSITIVE, "not positive"),
        (0.0, schedule.KEPT_NONPOSITIVE, "not positive"),
    ],
)
def test_unusable_noise_keeps_the_batch_and_says_why(bad, code, words):
    sched, update = _patience_3, _patience_3_update
    state = sched.init()
    for _ in range(2):  # two of three updates towards a change
        decision, state = update(1000.0, state)
    assert int(decision.reason) == schedule.KEPT_WAITING and int(decision.streak) == 2
    decision, state = update(bad, state)
    assert int(decision.batch_size) == 8 and not bool(decision.changed)
    assert int(decision.reason) == code and words in sched.explain(decision)
    assert int(decision.streak) == 0  # the streak restarts: it needs 3 consecutive updates
    for expected_streak in (1, 2):
        decision, state = update(1000.0, state)
        assert int(decision.streak) == expected_streak and int(decision.batch_size) == 8
    decision, state = update(1000.0, state)
    assert int(decision.batch_size) == argmin_batch(1000.0) and bool(decision.changed)


def test_noise_must_be_a_scalar():
    sched = make()
    with pytest.raises(ValueError, match="scalar"):
        sched.update(np.ones(3), sched.init())


# ---------------------------------------------------------------------------------------------
# jit and eager agree; helpers.


def test_jit_and_eager_give_the_same_decisions():
    sched = make(patience=2, margin=0.05, allow_shrink=True, lr_rule="sgd")
    noise = [5.0, 900.0, 900.0, math.nan, 900.0, 900.0, math.inf, 3.0, 3.0, 3.0, -1.0]
    noise += [20000.0] * 3 + [40.0, 40.0]
    jitted = as_np(schedule.simulate(sched, noise)[0])
    state, eager = sched.init(), []
    for x in noise:
        decision, state = sched.update(x, state)
        eager.append(decision)
    eager = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *eager)
    for name, a, b in zip(schedule.Decision._fields, jitted, eager, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=name)
    assert jitted.changed.sum() >= 3  # the series exercises grow, shrink and kept


def test_schedule_log_records_every_change_with_its_reason():
    sched = make(patience=1, margin=0.0)
    ramp = geometric_ramp(steps=200)
    d = schedule.simulate(sched, ramp)[0]
    log = schedule.ScheduleLog(sched)
    for i in range(len(ramp)):
        log.record(10 * i, jax.tree.map(lambda x, i=i: x[i], d))
    dn = as_np(d)
    changed = np.flatnonzero(dn.changed)
    assert [c["step"] for c in log.changes] == (10 * changed).tolist()
    for c, i in zip(log.changes, changed, strict=True):
        assert (c["old_batch_size"], c["new_batch_size"]) == (
            dn.previous_batch_size[i],
            dn.batch_size[i],
        )
        assert c["reason_name"] == "grew" and c["reason"].startswith(
            f"grew {c['old_batch_size']} -> {c['new_batch_size']}"
        )
    summary = log.summary()
    assert sum(summary["reason_counts"].values()) == len(ramp)
    assert summary["reason_counts"]["grew"] == len(changed)
    json.dumps(summary, allow_nan=False)  # JSON-ready (no nan here: the gains are finite)
    resumed = schedule.ScheduleLog(sched, summary["changes"], summary["reason_counts"])
    assert resumed.summary()["changes"] == summary["changes"]
    assert resumed.reason_counts == summary["reason_counts"]


def test_describe_initial_state_and_default_candidates():
    sched = schedule.batch_size_schedule({12: 0.01, 100: 0.05, 300: 0.2}, max_batch_size=300)
    assert [r["batch_size"] for r in sched.table] == [16, 32, 64, 128, 256]
    assert [r["measured"] for r in sched.table] == [False] * 5
    assert (
        sched.describe(sched.init())
        == "initial batch 16, lr x1 of the rate at batch 16 (sqrt rule)."
    )
    assert schedule.powers_of_two(12, 300) == (16, 32, 64, 128, 256)
    assert schedule.powers_of_two(1, 1) == (1,)
    assert schedule.powers_of_two(16, 1024, unit=3) == (24, 48, 96, 192, 384, 768)
    assert schedule.powers_of_two(16, 1024, unit=4) == schedule.powers_of_two(16, 1024)
