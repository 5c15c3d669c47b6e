"""Tests of gns.critical: the effective noise scale along the path against hand-computed weighted
means, and the branched critical batch on a noisy quadratic whose critical batch is known in
closed form."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gns import critical, smoothing

# ---------------------------------------------------------------------------------------------
# The effective noise scale along the path.


def test_effective_equals_hand_computed_weighted_mean():
    delta = np.array([100.0, 200.0, 400.0])
    b = np.array([20.0, 80.0, 320.0])
    ref = 40.0
    res = critical.effective_noise_scale(delta, b, ref, num_resamples=500)
    ds_min = delta / (1 + b / ref)  # 66.67, 66.67, 44.44
    expected = float((ds_min * b).sum() / ds_min.sum())
    assert res.value == pytest.approx(expected, rel=1e-12)
    assert res.s_min == pytest.approx(ds_min.sum(), rel=1e-12)
    assert res.e_min == pytest.approx((ds_min * b).sum(), rel=1e-12)
    np.testing.assert_allclose(res.weights, ds_min / ds_min.sum(), rtol=1e-12)
    assert (res.basis, res.num_points, res.num_dropped) == ("trajectory", 3, 0)
    # The late stretch has 4x the pilot steps of the first but less weight: its B_noise is large.
    assert res.weights[2] < res.weights[0]
    assert res.low <= res.value <= res.high
    # The plain step-weighted mean would be much larger: the ΔS_min weighting matters here.
    assert expected < float((delta * b).sum() / delta.sum())


def test_effective_on_constant_trajectory_is_the_constant():
    delta = [50, 150, 300, 500]
    res = critical.effective_noise_scale(delta, [123.0] * 4, 64, num_resamples=300)
    assert res.value == pytest.approx(123.0, rel=1e-12)
    # Points without their own intervals: every point-bootstrap resample is the constant.
    assert res.low == pytest.approx(123.0, rel=1e-12)
    assert res.high == pytest.approx(123.0, rel=1e-12)
    # S_min is the pilot's steps over (1 + B_noise/B_ref), E_min = S_min·B_noise.
    assert res.s_min == pytest.approx(1000 / (1 + 123 / 64))
    assert res.e_min == pytest.approx(res.s_min * 123.0)
    # With per-point intervals the interval widens and still contains the constant.
    wide = critical.effective_noise_scale(
        delta, [123.0] * 4, 64, low=[100.0] * 4, high=[150.0] * 4, num_resamples=2000
    )
    assert 100.0 < wide.low < 123.0 < wide.high < 150.0


def test_nonfinite_and_negative_points_are_dropped_and_counted():
    delta = [100, 100, 100, 100, 100]
    b = [50.0, float("nan"), -3.0, float("inf"), 150.0]
    res = critical.effective_noise_scale(delta, b, 50, num_resamples=200)
    clean = critical.effective_noise_scale([100, 100], [50.0, 150.0], 50, num_resamples=200)
    assert res.value == pytest.approx(clean.value, rel=1e-12)
    assert (res.num_points, res.num_dropped) == (2, 3)
    assert "dropped 3 of 5" in res.note and "[1, 2, 3]" in res.note
    assert res.weights[1] == res.weights[2] == res.weights[3] == 0.0
    assert res.weights.sum() == pytest.approx(1.0)


def test_single_point_falls_back_with_stated_basis():
    res = critical.effective_noise_scale(
        [100, 100], [float("nan"), 80.0], 32, low=[1.0, 60.0], high=[2.0, 110.0]
    )
    assert res.basis == critical.BASIS_SINGLE_POINT == "single_point"
    assert (res.value, res.low, res.high) == (80.0, 60.0, 110.0)
    assert (res.num_points, res.num_dropped) == (1, 1)
    assert "single point" in res.note


def test_no_usable_point_is_reported_not_raised():
    res = critical.effective_noise_scale([10, 10], [float("nan"), -1.0], 32)
    assert res.basis == "none" and math.isnan(res.value) and res.num_dropped == 2


def test_infinite_interval_end_takes_its_limit():
    # A point whose upper end is unresolved (inf) can push the interval up, never to nan.
    res = critical.effective_noise_scale(
        [100, 100], [40.0, 60.0], 32, low=[30.0, 0.0], high=[50.0, np.inf], num_resamples=500
    )
    assert np.isfinite(res.low) and res.low < res.value < res.high
    # The limit of one point at B_noise = inf: no ΔS_min, ΔS_ref·B_ref examples.
    s, e = critical._path_sums(np.array([100.0]), np.array([np.inf]), np.array([32.0]))
    assert (s[0], e[0]) == (0.0, 3200.0)


def test_effective_bad_input():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        critical.effective_noise_scale([], [], 32)
    with pytest.raises(ValueError, match="one length"):
        critical.effective_noise_scale([1, 2], [3.0], 32)
    with pytest.raises(ValueError, match="both low and high"):
        critical.effective_noise_scale([1, 2], [3.0, 4.0], 32, low=[1.0, 2.0])
    with pytest.raises(ValueError, match="ref_batch_size"):
        critical.effective_noise_scale([1, 2], [3.0, 4.0], 0)
    with pytest.raises(ValueError, match=r"low > high at indices \[1\]"):
        critical.effective_noise_scale([1, 2], [3.0, 4.0], 32, low=[1.0, 5.0], high=[4.0, 3.0])
    with pytest.raises(ValueError, match="point_confidence must be in"):
        critical.effective_noise_scale([1, 2], [3.0, 4.0], 32, point_confidence=1.5)
    with pytest.raises(ValueError, match="has no 'step'"):
        critical.trajectory_from_metrics([{"g_sq": 1.0, "trace_cov": 2.0}])


def test_stretch_lengths_midpoint_rule():
    np.testing.assert_allclose(critical.stretch_lengths([100, 300, 700], end=1000), [200, 300, 500])
    with pytest.raises(ValueError, match="increase strictly"):
        critical.stretch_lengths([300, 100])
    for kw in (dict(start=math.nan), dict(end=math.nan), dict(end=math.inf)):
        with pytest.raises(ValueError, match="increase strictly"):
            critical.stretch_lengths([100, 300], **kw)


def test_trajectory_from_metrics_pools_stretches_as_ratio_of_means():
    rng = np.random.default_rng(0)
    rows = []
    for s in range(1, 301):
        scale = 10.0 * (1 + (s > 100) + 3 * (s > 200))  # B_noise 10, 20, 50 by thirds
        g = 1.0 + 0.3 * rng.normal()
        rows.append({"step": s, "g_sq": g, "trace_cov": scale * (1.0 + 0.3 * rng.normal())})
    rows.append({"step": 150, "loss": 1.0})  # an eval row: not a measurement
    rows.append({"step": 151, "g_sq": None, "trace_cov": 5.0})  # non-finite: dropped
    traj = critical.trajectory_from_metrics(rows, 3, seed=3)
    np.testing.assert_allclose(traj.delta_steps, [100, 100, 100])
    np.testing.assert_array_equal(traj.num_rows, [100, 100, 100])
    # Each stretch equals gns.smoothing.interval on that stretch's rows (same seed convention).
    second = [r for r in rows if "g_sq" in r and 100 < r["step"] <= 200 and r["g_sq"] is not None]
    ref = smoothing.interval([r["g_sq"] for r in second], [r["trace_cov"] for r in second], seed=4)
    assert (traj.b_noise[1], traj.low[1], traj.high[1]) == (ref.estimate, ref.low, ref.high)
    assert traj.b_noise[0] < traj.b_noise[1] < traj.b_noise[2]
    # A stretch with fewer than 2 rows is nan, and effective_noise_scale drops it.
    short = critical.trajectory_from_metrics(rows[:150], 3, end_step=450)
    assert np.isnan(short.b_noise[1:]).all()
    eff = critical.effective_noise_scale(
        short.delta_steps, short.b_noise, 64, low=short.low, high=short.high
    )
    assert eff.basis == "single_point" and eff.num_dropped == 2
    with pytest.raises(ValueError, match="g_sq"):
        critical.trajectory_from_metrics([{"step": 1, "loss": 2.0}])
    rows_out = traj.rows()
    assert [r["step"] for r in rows_out] == [100.0, 200.0, 300.0]
    assert rows_out[1]["b_simple"] == ref.estimate and rows_out[1]["num_rows"] == 100
    as_dict = eff.to_dict()
    assert as_dict["basis"] == "single_point" and isinstance(as_dict["weights"], list)


# ---------------------------------------------------------------------------------------------
# The branched critical batch: the rule on exact ratios.


def test_fit_recovers_b_crit_from_exact_tradeoff_ratios():
    sizes = [8, 16, 32, 64, 128, 256]
    for b_crit in (20.0, 64.0, 300.0):
        ratios = [(b_crit + b) / (b_crit + sizes[0]) for b in sizes]
        fit = float(critical._fit_b_crit(sizes, np.array(ratios))[0])
        assert fit == pytest.approx(b_crit, rel=0.003)  # the grid step is 2^(1/256)
    assert math.isinf(critical._fit_b_crit(sizes, np.ones(6))[0])  # no slowdown at all


def test_examples_ratio_reads_the_ruler():
    n = 1000.0
    x = np.linspace(0, n, 11)
    y = 2.0 - x / n  # the smallest fork's loss falls linearly from 2 to 1
    final = np.array([1.0, 1.5, 1.75, 0.5, 2.5])
    r = critical._examples_ratio(x, y, final, n)
    # 1.5 reached at n/2 (ratio 2), 1.75 at n/4 (4); better than the ruler: 1; no progress: cap.
    np.testing.assert_allclose(r, [1.0, 2.0, 4.0, 1.0, n / x[1]])
    # A noisy ruler is read on its isotonic (non-increasing least-squares) fit, not on its
    # running minimum: [2, 1.6, 1.8, 1.2, 1] -> [2, 1.7, 1.7, 1.2, 1], so 1.55 is reached at
    # 2.3 (the running minimum [2, 1.6, 1.6, 1.2, 1] would say 2.125).
    noisy = np.array([2.0, 1.6, 1.8, 1.2, 1.0])
    np.testing.assert_allclose(critical._nonincreasing(noisy), [2.0, 1.7, 1.7, 1.2, 1.0])
    r = critical._examples_ratio(np.arange(5.0), noisy, np.array([1.0, 1.55]), 4.0)
    np.testing.assert_allclose(r, [1.0, 4.0 / 2.3])


# ---------------------------------------------------------------------------------------------
# A noisy quadratic with a known critical batch.
#
# L(θ) = h/2 |θ|², per-example gradient hθ + s·h|θ|·z_e with z_e ~ N(0, I_d) fixed per example:
# Σ = s²h²|θ|² I, so B_noise = tr(HΣ)/(GᵀHG) = s²·d at every θ (constant along the path, so
# forks of any length see one B_noise). SGD at lr η·ε_opt(B), ε_opt(B) = (1/h)/(1 + B_noise/B):
# E|θ'|² = |θ|² (1 − η(2−η)·B/(B + B_noise)), so the steps to a loss scale as 1 + B_noise/B
# (McCandlish's tradeoff, B_crit = B_noise) up to the per-step nonlinearity −log(1−x) ≈ x,
# below 1% for η = 0.01 at every forked batch.

D, S2, H, B_REF = 16, 4.0, 1.0, 32
B_NOISE = S2 * D  # 64
SIZES = [8, 16, 32, 64, 128, 256]  # B_REF·2^j, j = -2..3


def nqm(seed, eta=0.01):
    stream = np.random.default_rng(seed).standard_normal((8 * 4096, D)).astype(np.float32)

    def batch_fn(b, i):  # z_e of examples [i·b, (i+1)·b): one fixed stream
        return stream[i * b : (i + 1) * b]

    base_lr = eta / H * B_REF / (B_REF + B_NOISE)  # eta·ε_opt(B_REF)

    def make_step(b, m):
        tx = optax.sgd(base_lr * m)

        def step(state, z):
            params, opt = state
            g = H * params + math.sqrt(S2) * H * jnp.linalg.norm(params) * z.mean(0)
            updates, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, updates), opt

        return step

    def eval_fn(state):
        return 0.5 * H * jnp.sum(state[0] ** 2)

    params = jnp.ones(D)
    return (params, optax.sgd(1.0).init(params)), make_step, batch_fn, eval_fn


def test_branched_b_crit_on_noisy_quadratic_contains_the_truth():
    """Small steps: McCandlish's tradeoff is exact, B_crit = B_noise = 64.

    The learning rates follow ε_opt(B) ∝ 1/(1 + B_noise/B) with the true B_noise, as in
    McCandlish's setting; so this checks the measurement (shared data, forks, ruler, fit,
    interval), not that forks find a noise scale the rule does not know. Coverage of the 90%
    interval measured over seeds 10-49: see docs/critical-batch.md.
    """
    state, make_step, batch_fn, eval_fn = nqm(seed=0)
    mult = critical.lr_multipliers(B_REF, SIZES, "sgd", B_NOISE)
    res = critical.branched_critical_batch(
        state, make_step, batch_fn, eval_fn,
        ref_batch_size=B_REF, num_examples=4096, exponents=range(-2, 4), lr_multiplier=mult,
        num_repeats=8, pilot_examples=4096 * 100, seed=0,
    )  # fmt: skip
    assert res.batch_sizes == (8, 16, 32, 64, 128, 256)
    assert res.low <= res.b_crit <= res.high
    assert res.low <= B_NOISE <= res.high
    assert res.b_crit == pytest.approx(B_NOISE, rel=0.1)
    # The typical path of these small steps has B_crit 64.5: McCandlish's limit up to 1%.
    assert float(critical._fit_b_crit(SIZES, typical_ratios(0.01))[0]) == pytest.approx(64.5, 0.01)
    # Examples needed relative to the smallest batch: (1 + B/64)/(1 + 8/64), within noise.
    expected = [(B_NOISE + b) / (B_NOISE + 8) for b in res.batch_sizes]
    np.testing.assert_allclose(res.examples_ratio, expected, rtol=0.08)
    assert res.examples_forked == 4096 * 8 * 6 and res.cost_fraction == pytest.approx(0.48)
    assert res.resolved
    assert "bootstrap" in res.interval_method and "8 fork repeats" in res.interval_method
    # Merrill's rule at a 10% tolerance sits near δ/(1−δ)·B_crit, well below B_crit.
    assert 8 < res.b_tolerance < B_NOISE / 2


def typical_ratios(eta, num_samples=200_000):
    """E(B)/E(B_0) of the noisy quadratic's typical path, computed independently of gns.

    One step multiplies |θ|² by f = |(1−x)u − x·s·z̄|² with x = η·B/(B + B_noise), u a unit
    vector and z̄ ~ N(0, I/B): f = (1−x)² − 2(1−x)x·s·z₁/√B + x²s²(z₁² + χ²_{d−1})/B. A path's
    log loss falls by −E log f per step (law of large numbers), so the examples to a given loss
    scale as B / (−E log f), estimated here by Monte Carlo with antithetic z₁.
    """
    rng = np.random.default_rng(0)
    z1 = rng.standard_normal(num_samples)
    z1, chi = np.concatenate([z1, -z1]), np.tile(rng.chisquare(D - 1, num_samples), 2)
    b = np.array(SIZES, np.float64)[:, None]
    x, s = eta * b / (b + B_NOISE), math.sqrt(S2)
    f = (1 - x) ** 2 - 2 * (1 - x) * x * s * z1 / np.sqrt(b) + x**2 * S2 * (z1**2 + chi) / b
    per_step = -np.log(f).mean(1)
    return (b[:, 0] / per_step) / (b[0, 0] / per_step[0])


def test_branched_at_large_steps_matches_the_exact_quadratic():
    """Large steps: SGD at half its per-step optimal rate, η = 0.5.

    Then E|θ'|² = |θ|²·(1 − η(2−η)·B/(B + B_noise)) exactly, so the examples to a loss scale
    as B/(−log(1 − 0.75·B/(B + B_noise))): a flatter tradeoff than McCandlish's small-step
    1 + B/B_noise, fitted B_crit 112 instead of 64. The forks follow a typical path, whose
    log loss falls by −E log f per step instead (fitted B_crit 107.6, :func:`typical_ratios`);
    the interval must contain that value.
    """
    eta = 0.5
    b = np.array(SIZES, np.float64)
    per_step = -np.log1p(-eta * (2 - eta) * b / (b + B_NOISE))
    mean_path = (b / per_step) / (b[0] / per_step[0])
    assert float(critical._fit_b_crit(SIZES, mean_path)[0]) == pytest.approx(111.8, rel=0.01)
    truth = float(critical._fit_b_crit(SIZES, typical_ratios(eta))[0])
    assert truth == pytest.approx(107.6, rel=0.01)
    state, make_step, batch_fn, eval_fn = nqm(seed=0, eta=eta)
    res = critical.branched_critical_batch(
        state, make_step, batch_fn, eval_fn,
        ref_batch_size=B_REF, num_examples=1024, exponents=range(-2, 4),
        lr_multiplier=critical.lr_multipliers(B_REF, SIZES, "sgd", B_NOISE), num_repeats=8,
        num_ruler_points=64,
    )  # fmt: skip
    np.testing.assert_allclose(res.examples_ratio, typical_ratios(eta), rtol=0.1)
    assert res.low <= res.b_crit <= res.high and res.low <= truth <= res.high


# ---------------------------------------------------------------------------------------------
# Forks restore exactly and compile once per batch size.


def adam_problem():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2048, 4)).astype(np.float32)
    y = (x @ np.arange(1.0, 5.0) + 0.1 * rng.standard_normal(2048)).astype(np.float32)

    def batch_fn(b, i):  # examples [i·b, (i+1)·b) of the stream; the held-out batch is the end
        return x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    traces = []

    def make_step(b, m):
        tx = optax.adam(1e-2 * m)

        def step(state, batch):
            traces.append(b)
            params, opt = state
            grads = jax.grad(loss_fn)(params, batch)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        return step

    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    state = (params, optax.adam(1e-2).init(params))
    return state, make_step, batch_fn, loss_fn, traces


def test_fork_at_pilot_batch_reproduces_the_pilot_bitwise():
    state, make_step, batch_fn, _, _ = adam_problem()
    pilot_step = jax.jit(make_step(16, 1.0))
    for i in range(5):  # the pilot trains, then checkpoints (with Adam's moments) at step 5
        state = pilot_step(state, batch_fn(16, i))
    checkpoint = jax.tree.map(np.asarray, state)  # what orbax restores: host arrays
    checkpoint = jax.tree.map(jnp.asarray, checkpoint)
    pilot = state
    for i in range(5, 12):  # the pilot's next 7 steps
        pilot = pilot_step(pilot, batch_fn(16, i))
    forked, _ = critical.fork(checkpoint, jax.jit(make_step(16, 1.0)), batch_fn, 16, 7,
                              first_index=5)  # fmt: skip
    for a, b in zip(jax.tree.leaves(forked), jax.tree.leaves(pilot), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(forked[1][0].count) == 12  # Adam's step count came through the checkpoint


def test_branching_leaves_the_checkpoint_untouched_and_compiles_once_per_batch():
    state, make_step, batch_fn, loss_fn, traces = adam_problem()
    before = jax.tree.map(np.array, state)
    held_out = batch_fn(64, 31)  # examples 1984-2047: no fork reaches them
    res = critical.branched_critical_batch(
        state, make_step, batch_fn, jax.jit(lambda s: loss_fn(s[0], held_out)),
        ref_batch_size=16, num_examples=256, exponents=(-1, 0, 1), num_repeats=2,
        num_resamples=50,
    )  # fmt: skip
    assert sorted(traces) == [8, 16, 32]  # one trace (compile) per batch size, 2 repeats each
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert res.lr_multipliers == (1.0, 1.0, 1.0) and res.examples_forked == 256 * 2 * 3
    as_dict = res.to_dict()
    assert as_dict["batch_sizes"] == [8, 16, 32] and isinstance(as_dict["final_loss"], list)
    assert math.isnan(res.cost_fraction)  # no pilot_examples given


def test_per_example_eval_gives_a_held_out_bootstrap_with_one_repeat():
    state, make_step, batch_fn, _, _ = adam_problem()
    x, y = batch_fn(64, 31)
    per_example = jax.jit(lambda s: (x @ s[0]["w"] + s[0]["b"] - y) ** 2)
    res = critical.branched_critical_batch(
        state, make_step, batch_fn, per_example,
        ref_batch_size=16, num_examples=128, exponents=(0, 1), num_repeats=1,
        num_resamples=50,
    )  # fmt: skip
    assert "64 held-out examples" in res.interval_method and "repeats" not in res.interval_method
    assert res.low <= res.high
    scalar = critical.branched_critical_batch(
        state, make_step, batch_fn, jax.jit(lambda s: per_example(s).mean()),
        ref_batch_size=16, num_examples=128, exponents=(0, 1), num_repeats=1,
    )  # fmt: skip
    assert math.isnan(scalar.low) and scalar.interval_method.startswith("none")
    assert not scalar.resolved  # no interval: not usable as evidence
    assert scalar.b_crit == res.b_crit  # same forks, same mean losses


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("exponents", [(), (0,), (0, 2, 1), (1, 1)])
def test_bad_exponents(exponents):
    state, make_step, batch_fn, loss_fn, _ = adam_problem()
    with pytest.raises(ValueError, match="strictly increasing"):
        critical.branched_critical_batch(
            state, make_step, batch_fn, lambda s: 0.0,
            ref_batch_size=16, num_examples=512, exponents=exponents,
        )  # fmt: skip


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(confidence=math.nan), "confidence must be in"),
        (dict(confidence=1.0), "confidence must be in"),
        (dict(num_resamples=1), "num_resamples must be an int >= 20"),
        (
            dict(eval_fn=lambda s: jnp.array([1.0, jnp.nan])),
            "held-out loss of ckpt-3 is not finite",
        ),
    ],
)
def test_bad_interval_options_and_a_non_finite_start_loss_fail_before_any_fork(kw, match):
    state, _, batch_fn, _, _ = adam_problem()
    forked = []
    kw = dict(eval_fn=lambda s: 1.0, checkpoint_name="ckpt-3") | kw
    with pytest.raises(ValueError, match=match):
        critical.branched_critical_batch(
            state, lambda b, m: forked.append(b), batch_fn,
            ref_batch_size=16, num_examples=512, exponents=(0, 1), **kw,
        )  # fmt: skip
    assert forked == []


def test_examples_budget_smaller_than_the_largest_fork():
    state, make_step, batch_fn, _, _ = adam_problem()
    with pytest.raises(ValueError, match="multiple of the largest fork batch 64"):
        critical.branched_critical_batch(
            state, make_step, batch_fn, lambda s: 0.0,
            ref_batch_size=16, num_examples=32, exponents=(0, 1, 2),
        )  # fmt: skip
    with pytest.raises(ValueError, match="positive int"):
        critical.branched_critical_batch(
            state, make_step, batch_fn, lambda s: 0.0,
            ref_batch_size=3, num_examples=48, exponents=(-1, 0),
        )  # fmt: skip
    with pytest.raises(ValueError, match="one positive finite multiplier"):
        critical.branched_critical_batch(
            state, make_step, batch_fn, lambda s: 0.0,
            ref_batch_size=16, num_examples=64, exponents=(0, 1), lr_multiplier=[1.0],
        )  # fmt: skip


def test_checkpoint_with_another_structure_is_named():
    state, make_step, batch_fn, _, _ = adam_problem()
    # Restored without a target: the optimizer state comes back as plain dicts.
    as_dicts = (state[0], [{"mu": t.mu, "nu": t.nu, "count": t.count} for t in state[1][:1]])
    with pytest.raises(ValueError, match="ckpt/step_500 does not match the expected state"):
        critical.branched_critical_batch(
            as_dicts, make_step, batch_fn, lambda s: 0.0,
            ref_batch_size=16, num_examples=64, exponents=(0, 1),
            template=state, checkpoint_name="ckpt/step_500",
        )  # fmt: skip
    wrong_shape = ({"w": jnp.zeros(5), "b": jnp.zeros(())}, state[1])
    with pytest.raises(ValueError, match=r"ckpt.*\['w'\].*float32\[5\] vs float32\[4\]"):
        critical.check_state(wrong_shape, state, name="ckpt")


def test_step_that_changes_the_structure_is_named():
    state, _, batch_fn, _, _ = adam_problem()
    with pytest.raises(ValueError, match="returned a state of another structure"):
        critical.fork(state, lambda s, b: s[0], batch_fn, 16, 2)


# ---------------------------------------------------------------------------------------------
# Combining checkpoints along the path.


def fake_result(b_crit, low, high):
    return critical.BranchedCriticalBatch(
        b_crit, low, high, b_crit, (8, 16), (1.0, 1.0), 1.0, (0.5, 0.6), (1.0, 1.2), 64, 2, 256,
        float("nan"), 0.9, "", "", math.isfinite(b_crit),
    )  # fmt: skip


def test_effective_critical_batch_uses_the_same_weighting():
    results = [fake_result(30.0, 20.0, 40.0), fake_result(90.0, 70.0, 120.0)]
    delta = critical.stretch_lengths([100, 500], end=1000)  # 300, 700
    eff = critical.effective_critical_batch(results, delta, 64, seed=1)
    same = critical.effective_noise_scale(
        delta, [30.0, 90.0], 64, low=[20.0, 70.0], high=[40.0, 120.0], seed=1
    )
    assert (eff.value, eff.low, eff.high) == (same.value, same.low, same.high)
    assert eff.basis == critical.BASIS_BRANCHED == "branched" and eff.low < eff.value < eff.high
    # A checkpoint beyond the forked range (inf) is dropped and counted.
    one = critical.effective_critical_batch(
        [results[0], fake_result(math.inf, 300.0, math.inf)], delta, 64
    )
    assert one.basis == "branched_single_checkpoint" and one.num_dropped == 1
    unresolved = results[1]._replace(resolved=False)
    kept = critical.effective_critical_batch([results[0], unresolved], delta, 64, seed=1)
    assert kept.num_points == 2 and kept.value == eff.value
    cut = critical.effective_critical_batch(
        [results[0], unresolved], delta, 64, drop_unresolved=True
    )
    assert cut.num_points == 1 and cut.num_dropped == 1 and cut.value == 30.0
    with pytest.raises(ValueError, match="empty"):
        critical.effective_critical_batch([], [], 64)


def test_lr_multipliers_follow_the_configured_rule():
    got = critical.lr_multipliers(32, [16, 32, 128], "sgd", 64.0)
    want = [(1 + 64 / 32) / (1 + 64 / b) for b in (16, 32, 128)]  # McCandlish eq. 2.6
    assert got == pytest.approx(want, rel=1e-15) and got[1] == 1.0
    # An optimizer name is read as its rule; a huge noise scale is the linear limit.
    assert critical.lr_multipliers(32, [128], "adamw") == (2.0,)
    assert critical.lr_multipliers(32, [128], "momentum", 1e308) == pytest.approx((4.0,), 1e-15)


def test_docs_example_runs_as_printed(capsys):
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "critical-batch.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "from gns import critical" in b]  # section 4's example
    exec(compile(block, str(doc), "exec"), {})
    out = capsys.readouterr().out
    b_crit, low, high = (float(v) for v in re.findall(r"B_crit = (\S+) \[(\S+), (\S+)\]", out)[0])
    # Small steps with the McCandlish rule at b = 9: the forks return about the rule's value
    # (see the doc's "What the branched value measures").
    assert low <= b_crit <= high and 4 <= b_crit <= 16
    assert "forks cost 16% of the pilot" in out and "branched_single_checkpoint" in out


# ---------------------------------------------------------------------------------------------
# Diverged forks and unresolved checkpoints.


def test_a_diverged_fork_is_excluded_named_and_not_fitted():
    # SGD on the quadratic diverges at lr·H > 2: a 1000x multiplier at B = 64 (lr 3.3).
    state, make_step, batch_fn, eval_fn = nqm(seed=0)
    kw = dict(ref_batch_size=B_REF, num_examples=256, num_repeats=2, num_resamples=100, seed=0)
    res = critical.branched_critical_batch(
        state, make_step, batch_fn, eval_fn, exponents=(-2, -1, 0, 1),
        lr_multiplier=[0.25, 0.5, 1.0, 1000.0], **kw,
    )  # fmt: skip
    kept = critical.branched_critical_batch(
        state, make_step, batch_fn, eval_fn, exponents=(-2, -1, 0),
        lr_multiplier=[0.25, 0.5, 1.0], **kw,
    )  # fmt: skip
    assert [b for b, _ in res.excluded] == [64] and "above the checkpoint's" in res.excluded[0][1]
    assert "fork at B = 64 excluded" in res.note
    # Fitted on the forks that kept their loss below the checkpoint's, as if 64 was never forked.
    assert res.batch_sizes == kept.batch_sizes == (8, 16, 32)
    assert (res.b_crit, res.low, res.high) == (kept.b_crit, kept.low, kept.high)
    assert res.examples_ratio == kept.examples_ratio and res.resolved == kept.resolved
    assert res.examples_forked == 256 * 2 * 4  # the diverged fork's examples were spent
    assert res.to_dict()["excluded"][0][0] == 64


def test_a_diverged_smallest_fork_is_unresolved_and_says_so():
    state, make_step, batch_fn, eval_fn = nqm(seed=0)
    res = critical.branched_critical_batch(
        state, make_step, batch_fn, eval_fn, ref_batch_size=B_REF, num_examples=256,
        exponents=(-1, 0, 1), lr_multiplier=[1000.0, 1.0, 2.0], num_repeats=2, num_resamples=50,
    )  # fmt: skip
    assert not res.resolved and res.note.startswith("unresolved")
    assert [b for b, _ in res.excluded] == [16]
    # Every fork diverged: nothing to fit, nan (not a number that looks measured).
    res = critical.branched_critical_batch(
        state, make_step, batch_fn, eval_fn, ref_batch_size=B_REF, num_examples=256,
        exponents=(0, 1), lr_multiplier=[1000.0, 1000.0], num_repeats=2, num_resamples=50,
    )  # fmt: skip
    assert math.isnan(res.b_crit) and not res.resolved and "fewer than 2 forks" in res.note


def test_fork_exponents_and_the_sgd_rule_s_noise_scale_are_checked():
    """Exponents that are not ints are refused (0.9 was read as 0), and the 'sgd' rule's
    multipliers need a noise scale > 0 (nan gave 1)."""
    with pytest.raises(ValueError, match="strictly increasing ints"):
        critical._fork_sizes(64, (0.9, 1.9, 2.9), 10_000, 1)
    with pytest.raises(ValueError, match=r"b_noise=nan: the 'sgd' rule needs a noise scale > 0"):
        critical.lr_multipliers(64, [128], "sgd", float("nan"))
    assert critical.lr_multipliers(64, [128], "sgd") == (2.0,)  # inf: linear
