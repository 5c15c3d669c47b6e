"""Tests for gns.finder: find_batch_size on plain JAX and Flax Linen (tiny budgets), its
measurements against independent recomputations, the basis order, and its error messages."""

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gns import critical, estimate, finder, ghost, scaling, smoothing

D = 8


def linreg_loss(w, batch):
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


_X = np.random.default_rng(0).normal(size=(4096, D)).astype(np.float32)
_Y = _X.sum(1) + np.random.default_rng(1).normal(size=4096).astype(np.float32)


def linreg_batches(size, index):
    """Examples [index*size, (index+1)*size) of a fixed stream: y = x·1 + N(0, 1)."""
    sl = slice(index * size, (index + 1) * size)
    return {"x": _X[sl], "y": _Y[sl]}


def strict(d):
    return json.loads(json.dumps(d, allow_nan=False))


@pytest.fixture(scope="module")
def plain_result():
    return finder.find_batch_size(
        linreg_loss, jnp.zeros(D), optax.sgd(0.05), linreg_batches, ref_batch_size=16,
        pilot_steps=24, candidates=(8, 16, 32), timing_rounds=2, optimizer_name="sgd",
        learning_rate=0.05, progress=False,
    )  # fmt: skip


def test_plain_jax_result_keys_basis_and_strict_json(plain_result):
    res = plain_result
    d = strict(res.to_dict())
    assert {"batch_size", "basis", "recommendation", "noise_scale", "critical_batch", "pilot",
            "memory", "timing", "throughput", "device", "settings"} <= set(d)  # fmt: skip
    assert d["basis"] == res.recommendation.basis in finder.BASIS_ORDER
    assert d["recommendation"]["evidence"][res.basis]["ratio_to_basis"] == 1.0
    # Branching is off by default at this budget, and says so.
    assert d["critical_batch"] is None and "branched=True" in res.basis_note
    # The pick is one of the candidates (timed, or accumulation of the largest that fits);
    # a timed size the timing pruned is not one.
    cands = {r["batch_size"] for r in res.recommendation.table}
    pruned = {b for b, t in res.timing.timings.items() if t.pruned}
    assert res.batch_size in cands and set(res.timing.timings) - pruned <= cands
    assert not pruned & cands
    assert len(d["pilot"]) == 24 and [r["step"] for r in d["pilot"]] == list(range(1, 25))
    assert [set(r) >= {"step", "b_simple", "low", "high"} for r in d["noise_scale"]["trajectory"]]
    assert len(d["noise_scale"]["trajectory"]) == 3


def test_plain_jax_measurements_match_independent_computations(plain_result):
    res = plain_result
    # The first pilot row is estimate.per_example on batch 0 at the initial parameters.
    stats, _ = jax.jit(functools.partial(estimate.per_example, linreg_loss))(
        jnp.zeros(D), linreg_batches(16, 0)
    )
    row = res.pilot_rows[0]
    np.testing.assert_allclose([row["g_sq"], row["trace_cov"]],
                               [float(stats.g_sq), float(stats.trace_cov)], rtol=1e-5)  # fmt: skip
    g = [r["g_sq"] for r in res.pilot_rows]
    t = [r["trace_cov"] for r in res.pilot_rows]
    assert res.b_simple.estimate == pytest.approx(smoothing.interval(g, t).estimate)
    traj = critical.trajectory_from_metrics(res.pilot_rows, 3)
    np.testing.assert_allclose(res.trajectory.b_noise, traj.b_noise)
    eff = critical.effective_noise_scale(
        traj.delta_steps, traj.b_noise, 16, low=traj.low, high=traj.high
    )
    assert res.effective_noise_scale.value == pytest.approx(eff.value)
    if res.basis == "trajectory":
        assert res.recommendation.b_noise == pytest.approx(eff.value)
    # The recommended learning rate follows the SGD rule from the given rate at B_ref.
    assert res.recommendation.learning_rate == pytest.approx(
        0.05
        * (1 + res.recommendation.b_noise / 16)
        / (1 + res.recommendation.b_noise / res.batch_size)
    )


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(16)(x)))[:, 0]


def test_linen_model_with_branching_and_an_iterator_factory(tmp_path):
    model = MLP()
    params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, D)))  # one program

    def loss_fn(p, batch):
        return jnp.mean((model.apply(p, batch["x"]) - batch["y"]) ** 2)

    def stream(size):  # the iterator-factory form
        i = 0
        while True:
            yield linreg_batches(size, i)
            i += 1

    calls = []
    res = finder.find_batch_size(
        loss_fn, params, optax.adam(1e-2), stream, ref_batch_size=8, pilot_steps=12,
        num_stretches=2, branched=True, branch_points=2, branch_exponents=(-1, 0, 1),
        branch_steps=2, candidates=(8, 16), timing_rounds=2, progress=lambda *c: calls.append(c),
    )  # fmt: skip
    d = strict(res.to_dict())
    assert d["settings"]["branched"] and d["settings"]["branch_checkpoint_steps"] == [3, 9]
    rows = d["critical_batch"]["checkpoints"]
    assert [r["step"] for r in rows] == [3, 9]
    assert all({"b_crit", "low", "high", "resolved"} <= set(r) for r in rows)
    assert {"value", "low", "high", "basis"} <= set(d["critical_batch"]["effective"])
    assert "branched" in res.recommendation.evidence
    # Branched is the basis only when at least 2 checkpoints are resolved; else it says why.
    n_resolved = sum(r["resolved"] for r in rows)
    assert (res.basis == "branched") == (n_resolved >= 2)
    if res.basis != "branched":
        assert "branched not used" in res.basis_note
    # An unresolved checkpoint says so, in its row and in the warnings (with the fallback).
    assert all(r["status"] == ("resolved" if r["resolved"] else "unresolved") for r in rows)
    unresolved = [w for w in res.warnings if "unresolved at pilot step" in w]
    assert bool(unresolved) == (n_resolved < 2 or n_resolved < len(rows))
    if res.basis != "branched":
        assert "basis falls back to " + res.basis in unresolved[0]
    # The forks follow the run's rule (Adam, read from its state: square root).
    assert res.settings["lr_rule"] == res.settings["branch_lr_rule"] == "sqrt"
    assert d["critical_batch"]["points"][0]["lr_multipliers"] == pytest.approx(
        [math.sqrt(0.5), 1.0, math.sqrt(2.0)]
    )
    # Adam's first moment averages ~10 steps: 2-step forks are warned about, once.
    short = [w for w in res.warnings if w.startswith("forks of 2 steps with momentum 0.9")]
    assert len(short) == 1 and "at least 3/(1-momentum) = 30 steps" in short[0]
    assert {c[0] for c in calls} >= {"pilot", "branched", "memory", "timing"}
    assert res.batch_size in {r["batch_size"] for r in res.recommendation.table}
    noise_fig, throughput_fig = res.plot()
    measured = [ln for ln in noise_fig.axes[0].get_lines() if ln.get_label() == "per-step"]
    assert len(measured) == 1 and len(measured[0].get_xdata()) > 0
    assert throughput_fig.axes[0].get_xlabel() == "batch size"


def test_iterator_factory_serves_the_same_stream_as_indices():
    get = finder.as_batch_fn(lambda size: (linreg_batches(size, i) for i in range(100)))
    for size, index in ((4, 2), (4, 0), (8, 3)):
        np.testing.assert_array_equal(get(size, index)["x"], linreg_batches(size, index)["x"])
    sampler = finder.as_batch_fn(lambda size: {"x": _X[:size], "y": _Y[:size]})  # one batch
    with pytest.raises(ValueError, match=r"batch_fn\(8\) returned a dict, not an iterator"):
        sampler(8, 0)


def test_choose_basis_prefers_branched_then_trajectory_then_b_simple():
    def eff(value, basis):
        return critical.EffectiveNoiseScale(value, value / 2, value * 2, 1.0, value, 2, 0, basis,
                                            "n", np.ones(2), 0.9)  # fmt: skip

    single = (100.0, 80.0, 130.0)
    traj, br = eff(200.0, "trajectory"), eff(400.0, "branched")
    basis, value, ev, note = finder.choose_basis(single, traj, br)
    assert (basis, value[0], set(ev)) == ("branched", 400.0, {"b_simple", "trajectory", "branched"})
    basis, value, _, note = finder.choose_basis(
        single, traj, eff(400.0, "branched_single_checkpoint")
    )
    assert (basis, value[0]) == ("trajectory", 200.0) and "branched not used" in note
    basis, value, _, note = finder.choose_basis(single, eff(200.0, "single_point"))
    assert (basis, value[0]) == ("b_simple", 100.0) and "trajectory not used" in note
    with pytest.raises(ValueError, match="no noise scale was measured"):
        finder.choose_basis((math.nan, math.nan, math.nan))


def _find(loss_fn=linreg_loss, batch_fn=linreg_batches, optimizer=None, **kw):
    kw = {"ref_batch_size": 8, "pilot_steps": 6, "candidates": (8,), "progress": False} | kw
    optimizer = optax.sgd(0.01) if optimizer is None else optimizer
    return finder.find_batch_size(loss_fn, jnp.zeros(D), optimizer, batch_fn, **kw)


def test_the_per_example_path_is_chosen_for_the_pilot_s_length(monkeypatch):
    """find_batch_size asks gns.ghost.select for the pilot's path with the pilot's steps as
    its uses (timing candidates only where that can pay over the pilot)."""
    asked, select = [], ghost.select
    monkeypatch.setattr(ghost, "select", lambda *a, **k: asked.append(k) or select(*a, **k))
    _find(pilot_steps=5)
    assert asked[0]["uses"] == 5 and all(k.get("uses") in (5, None) for k in asked)


def test_batch_fn_of_the_wrong_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_fn\(8, 0\) returned a batch of 4 examples, not 8"):
        _find(batch_fn=lambda size, index: linreg_batches(4, index))


def test_non_scalar_loss_is_a_clear_error():
    def per_example_loss(w, batch):
        return (batch["x"] @ w - batch["y"]) ** 2

    with pytest.raises(ValueError, match=r"must return a scalar .*got \(8,\).*\.mean\(\)"):
        _find(loss_fn=per_example_loss)
    with_aux = lambda w, b: (linreg_loss(w, b), 0.0)  # the estimators' has_aux form
    with pytest.raises(ValueError, match=r"got tuple: .*loss_fn\(params, batch\)\[0\]"):
        estimate.hessian_aware(with_aux, jnp.zeros(D), linreg_batches(8, 0), linreg_batches(8, 1))


@pytest.mark.parametrize(
    "kw, message",
    [({"pilot_steps": 1}, "pilot_steps=1"), ({"max_seconds": 0.0}, "max_seconds=0.0"),
     ({"max_seconds": 1e-9}, "the pilot ran 1 step")],
)  # fmt: skip
def test_a_budget_too_small_to_measure_anything_is_a_clear_error(kw, message):
    with pytest.raises(ValueError, match="budget is too small to measure anything") as err:
        _find(**kw)
    assert message in str(err.value)


def test_power_of_two_candidates():
    assert finder.power_of_two_candidates(3, 40) == [4, 8, 16, 32]
    assert finder.power_of_two_candidates(5, 6) == [8]
    assert finder.power_of_two_candidates(16, 20, unit=100) == [100]  # at least one, rounded up
    assert finder.power_of_two_candidates(16, 512, unit=3) == [24, 48, 96, 192, 384]


def test_nnx_model_through_split_and_merge():
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(D, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 1, rngs=nnx.Rngs(1))
    )
    graphdef, state = nnx.split(model)

    def loss_fn(state, batch):
        return jnp.mean((nnx.merge(graphdef, state)(batch["x"])[:, 0] - batch["y"]) ** 2)

    res = finder.find_batch_size(
        loss_fn, state, optax.sgd(0.01), linreg_batches, ref_batch_size=8, pilot_steps=8,
        num_stretches=2, candidates=(8, 16), timing_rounds=2, progress=False,
    )  # fmt: skip
    stats, _ = jax.jit(functools.partial(estimate.per_example, loss_fn, method="vmap"))(
        state, linreg_batches(8, 0)
    )
    assert res.pilot_rows[0]["g_sq"] == pytest.approx(float(stats.g_sq), rel=1e-5)
    assert res.basis in finder.BASIS_ORDER and len(res.trajectory.b_noise) == 2
    assert res.batch_size in {r["batch_size"] for r in res.recommendation.table}


def test_the_caller_s_candidates_and_bounds_bound_the_pick():
    # One candidate: the pick is at both ends, said, and nothing past it is timed or picked.
    res = _find(pilot_steps=8, timing_rounds=2)
    assert res.extended_to is None and sorted(res.timing.timings) == [8] and res.batch_size == 8
    assert res.recommendation.at_range_end is not None
    res = _find(pilot_steps=8, timing_rounds=2, candidates=None, max_batch_size=4)
    assert max(res.timing.timings) <= 4 and res.batch_size <= 4
    assert all(r["batch_size"] <= 4 for r in res.recommendation.table)  # no accumulation past it


def test_a_stream_too_short_is_named_before_the_pilot_and_without_forks_is_enough():
    def short(size, index):  # 64 examples, no wrapping around
        if (index + 1) * size > 64:
            raise IndexError("end of data")
        return linreg_batches(size, index)

    done = []
    with pytest.raises(ValueError, match=r"\(IndexError: end of data\), where examples up to"):
        _find(batch_fn=short, branched=True, progress=lambda phase, d, t: done.append(d))
    assert not any(done)  # the forks' held-out batch is read before the pilot's first step
    res = _find(batch_fn=short, branched=False)  # the pilot's 6 steps of 8 fit in 64
    assert res.state.examples_seen == 48


def test_find_batch_size_is_a_lazy_attribute_of_the_package():
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import gns  # noqa: PLC0415
    from gns import BatchSizeResult, find_batch_size  # noqa: PLC0415

    assert find_batch_size is gns.find_batch_size is finder.find_batch_size
    assert BatchSizeResult is finder.BatchSizeResult and "find_batch_size" in dir(gns)
    with pytest.raises(AttributeError, match="no attribute 'find_batch_sizes'"):
        gns.find_batch_sizes  # noqa: B018
    # `import gns` alone imports no JAX; the attribute imports gns.finder on first use.
    code = (
        "import sys, gns\nassert 'jax' not in sys.modules and 'gns.finder' not in sys.modules\n"
        "from gns import find_batch_size\nassert find_batch_size.__module__ == 'gns.finder'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(gns.__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


# ---------------------------------------------------------------------------------------------
# The pilot is the start of the run; arguments are checked first; progress, budget, warnings.


def test_the_pilot_state_is_handed_back_and_training_continues_from_it(plain_result):
    res = plain_result
    assert (res.state.step, res.state.examples_seen) == (24, 24 * 16)
    sgd = jax.jit(lambda w, batch, lr: w - lr * jax.grad(linreg_loss)(w, batch))
    w = jnp.zeros(D)  # the pilot recomputed as plain SGD: per-example grads average to grad
    for i in range(24):
        w = sgd(w, linreg_batches(16, i), 0.05)
    np.testing.assert_allclose(res.state.params, w, rtol=2e-5, atol=1e-6)
    assert res.to_dict()["state"] == {"step": 24, "examples_seen": 384}
    # Continue at batch 32 with the recommended rate: the stream goes on at example 384.
    opt = optax.sgd(res.recommendation.learning_rate)
    state, losses = finder.continue_training(
        linreg_loss, opt, linreg_batches, res.state, 3, batch_size=32
    )
    want = res.state.params
    for i in range(12, 15):
        want = sgd(want, linreg_batches(32, i), res.recommendation.learning_rate)
    np.testing.assert_allclose(state.params, want, rtol=2e-5, atol=1e-6)
    assert (state.step, state.examples_seen) == (27, 15 * 32) and losses.shape == (3,)
    assert losses[0] == pytest.approx(float(linreg_loss(res.state.params, linreg_batches(32, 12))))
    # Accumulating 2 micro-batches of 16 is the same step.
    acc, _ = finder.continue_training(
        linreg_loss, opt, linreg_batches, res.state, 3, batch_size=32, accumulation_steps=2
    )
    np.testing.assert_allclose(acc.params, state.params, rtol=1e-5, atol=1e-6)
    # From the result itself: its state at its recommended batch and accumulation.
    rec = res.recommendation
    a, _ = finder.continue_training(linreg_loss, opt, linreg_batches, res, 2)
    b, _ = finder.continue_training(linreg_loss, opt, linreg_batches, res.state, 2,
                                    batch_size=rec.batch_size,
                                    accumulation_steps=rec.accumulation_steps)  # fmt: skip
    np.testing.assert_array_equal(a.params, b.params)
    hits = finder._plain_step.cache_info().hits  # training on in chunks reuses the jitted step
    finder.continue_training(linreg_loss, opt, linreg_batches, a, 1, batch_size=rec.batch_size,
                             accumulation_steps=rec.accumulation_steps)  # fmt: skip
    assert finder._plain_step.cache_info().hits == hits + 1
    assert (
        a.examples_seen == b.examples_seen == math.ceil(384 / rec.batch_size + 2) * rec.batch_size
    )
    # Another batch than the pick's: one micro-batch unless asked (not the pick's split).
    split = dataclasses.replace(res, recommendation=dataclasses.replace(rec, accumulation_steps=3))
    other, _ = finder.continue_training(linreg_loss, opt, linreg_batches, split, 3, batch_size=32)
    np.testing.assert_array_equal(other.params, state.params)
    with pytest.raises(ValueError, match="accumulation_steps must be an int >= 1, got 0"):
        finder.continue_training(linreg_loss, opt, linreg_batches, res, 1, accumulation_steps=0)


def test_continue_training_trains_at_the_new_rate_of_an_injected_optimizer():
    """optax.inject_hyperparams keeps the rate in the state: the new optimizer's rate is used,
    not the pilot's; another optimizer's state, or a negative step count, is an error."""
    w0 = jnp.zeros(D)
    inject = optax.inject_hyperparams(optax.sgd)
    start = finder.TrainState(w0, inject(learning_rate=0.01).init(w0), 0, 0)
    state, _ = finder.continue_training(
        linreg_loss, inject(learning_rate=0.5), linreg_batches, start, 1, batch_size=8
    )
    want = w0 - 0.5 * jax.grad(linreg_loss)(w0, linreg_batches(8, 0))
    np.testing.assert_allclose(state.params, want, rtol=1e-6)
    assert float(state.opt_state.hyperparams["learning_rate"]) == 0.5
    with pytest.raises(ValueError, match="another structure"):
        finder.continue_training(linreg_loss, optax.adam(0.1), linreg_batches, start, 1,
                                 batch_size=8)  # fmt: skip
    with pytest.raises(ValueError, match="num_steps must be an int >= 0"):
        finder.continue_training(linreg_loss, inject(learning_rate=0.5), linreg_batches, start,
                                 -3, batch_size=8)  # fmt: skip
    # find_batch_size reads the rate such a state holds, and a learning_rate against it is named.
    res = _find(optimizer=inject(learning_rate=0.01))
    assert res.batch_size == 8 and res.recommendation.learning_rate == pytest.approx(0.01)
    with pytest.raises(ValueError, match="learning_rate=0.5, but the optimizer's state holds 0.01"):
        _find(optimizer=inject(learning_rate=0.01), learning_rate=0.5)
    # A run's state, fine-tuned on at another rate: the pilot trains at the optimizer's.
    res = _find(optimizer=inject(learning_rate=0.002), opt_state=start.opt_state)
    assert float(res.state.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.002)
    assert res.recommendation.learning_rate == pytest.approx(0.002)
    w = w0
    for i in range(6):  # the pilot's 6 steps at 0.002, by hand
        w = w - 0.002 * jax.grad(linreg_loss)(w, linreg_batches(8, i))
    np.testing.assert_allclose(res.state.params, w, rtol=1e-5)


def test_a_pilot_that_diverges_stops_there_and_one_whose_loss_rises_is_warned_about():
    done = []
    with pytest.raises(ValueError, match=r"the pilot \(batch 8\) diverged: (its training loss "
                       r"was (nan|inf) at step \d+|the median of its training loss)"):  # fmt: skip
        finder.find_batch_size(
            linreg_loss, jnp.zeros(D), optax.sgd(1e4), linreg_batches, ref_batch_size=8,
            pilot_steps=40, candidates=(8,), progress=lambda phase, d, t: done.append(d),
        )  # fmt: skip
    assert max(done) < 40  # it stopped at the first non-finite loss, not at the pilot's end

    # A median blown up by divergence_factor is divergence too; one hard batch is not, nor a
    # first loss of 0 a scale; a rise below the factor is warned about.
    def steps(values):
        return list(enumerate(values, start=1))

    easy_then_spike = [1.0, 0.9, 1.1, 1.0, 0.95, 0.9, 50.0, 0.8, 0.9, 0.85]
    assert finder.divergence(steps(easy_then_spike), 10.0) is None
    blown = [1.0] * 5 + [1.0, 30.0, 40.0, 50.0, 60.0]
    assert "over steps 6-10 was 40, over 10 times the 1 of its first 5" in finder.divergence(
        steps(blown), 10.0
    )
    assert finder.divergence(steps(blown), 100.0) is None
    assert finder.divergence(steps(blown), None) is None
    assert finder.divergence(steps([0.0] * 5 + [1.0] * 5), 10.0) is None
    assert "at the initial parameters" in finder.divergence([(1, math.nan)], None)
    assert "at step 3; lower the learning rate" in finder.divergence(steps([1, 2, math.inf]), None)
    rows = [{"step": s, "train_loss": v} for s, v in steps([2, 1, 2, 2, 2, 3, 4, 4, 4, 4])]
    assert (
        "rose from 2 (the median of its first 5 measured steps) to 4"
        in (finder.pilot_warnings(rows)[0])
    )
    falling = [{"step": s, "train_loss": 10.0 - s} for s in range(1, 11)]
    assert finder.pilot_warnings(falling) == []


@pytest.mark.filterwarnings("ignore:gns per-example norms by jax.vmap")  # and says so first
def test_a_loss_that_no_parameter_reaches_is_named():
    with pytest.raises(ValueError, match="the gradient was zero at every measured step"):
        _find(loss_fn=lambda w, batch: jnp.mean(batch["y"] ** 2) + 0.0 * jnp.sum(w))


def test_the_pilot_rows_hold_the_training_loss_of_each_measured_step(plain_result):
    row = plain_result.pilot_rows[0]
    want = float(linreg_loss(jnp.zeros(D), linreg_batches(16, 0)))
    assert row["step"] == 1 and row["train_loss"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "kw, message",
    [({"optimizer_name": "adamx"}, "optimizer_name must be an optimizer name"),
     ({"lr_rule": "cosine"}, "lr_rule must be one of"),
     ({"branch_lr_rule": "cosine"}, "branch_lr_rule must be one of"),
     ({"learning_rate": -1.0}, "learning_rate must be a finite positive number"),
     ({"budget_s": 0.0}, "budget_s must be a finite positive"),
     ({"divergence_factor": 1.0}, "divergence_factor must be a number > 1"),
     ({"budget_fraction": 0.1}, "budget_fraction needs run_steps"),
     ({"objective": "money"}, "objective must be 'time' or 'cost'"),
     ({"progress": True}, "gns draws nothing itself"),
     ({"branch_exponents": (0,)}, "branch_exponents must be at least 2"),
     ({"candidates": None, "min_batch_size": 16, "max_batch_size": 4},
      "min_batch_size=16 > max_batch_size=4: swap them"),
     ({"ref_batch_size": 3, "num_microbatches": 3}, r"an even ref_batch_size, or branched=False"),
     ({"optimizer": "adam"}, r"optimizer must be an optax.GradientTransformation .* 'adam'"),
     ({"optimizer": optax.MultiSteps(optax.sgd(0.01), 4)}, "pass the inner optimizer"),
     ({"optimizer": optax.chain(optax.apply_every(4), optax.sgd(0.01))},
      "pass the inner optimizer"),
     ({"optimizer": optax.inject_hyperparams(optax.adam)(
         learning_rate=optax.linear_schedule(0.0, 1e-2, 10))},
      "follows a schedule .* pass learning_rate= the schedule's peak"),
     ({"optimizer": optax.inject_hyperparams(optax.adam)(learning_rate=0.0)},
      "holds learning rate 0 .* pass a positive rate"),
     ({"batch_fn": lambda size, index: {"x": _X[:size, : 4 + (size == 8)], "y": _Y[:size]}},
      r"batch_fn\(8, 0\) and batch_fn\(4, 1\) differ")],
)  # fmt: skip
def test_every_argument_is_checked_before_any_work(kw, message):
    calls = []
    batch_fn = kw.pop("batch_fn", linreg_batches)

    def counting(size, index):
        calls.append(size)
        return batch_fn(size, index)

    with pytest.raises(ValueError, match=message):
        _find(batch_fn=counting, **kw)
    assert len(calls) <= 2  # the two batches of the check; no pilot step ran


def test_momentum_is_read_from_the_state_and_short_forks_are_named():
    w = jnp.zeros(3)
    cases = [
        (optax.sgd(0.1), False),
        (optax.sgd(0.1, momentum=0.9), True),
        (optax.adam(1e-3), True),
        (optax.chain(optax.clip(1.0), optax.sgd(0.1)), False),
        (optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5), True),
    ]
    for opt, has in cases:
        assert scaling.has_momentum(opt.init(w)) == has, opt
    # 3/(1-β) steps: 30 at 0.9, 300 at 0.99; none without momentum.
    assert scaling.short_fork_warning(29, 0.9) and scaling.short_fork_warning(30, 0.9) is None
    assert "= 300 steps" in scaling.short_fork_warning(299, 0.99)
    assert scaling.short_fork_warning(300, 0.99) is None
    assert scaling.short_fork_warning(1, 0.0) is None


def test_the_learning_rate_rule_is_read_from_the_optimizer_or_asked_for():
    w = jnp.zeros(3)
    for opt, rule in [(optax.sgd(0.1), "sgd"), (optax.sgd(0.1, momentum=0.9), "sgd"),
                      (optax.adam(1e-3), "sqrt"), (optax.adamw(1e-3), "sqrt"),
                      (optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), "sqrt"),
                      (optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), "sgd"),
                      (optax.inject_hyperparams(optax.sgd)(optax.linear_schedule(0.1, 0.0, 9)),
                       "sgd"),
                      (optax.apply_if_finite(optax.adam(1e-3), 5), "sqrt"),  # a wrapper
                      (optax.adafactor(1e-3), None)]:  # fmt: skip
        assert scaling.infer_rule(opt.init(w)) == rule
    parts = optax.multi_transform(
        {"a": optax.adam(1e-3), "s": optax.sgd(0.1)}, {"x": "a", "y": "s"}
    )
    assert scaling.infer_rule(parts.init({"x": w, "y": w})) is None  # rules of their own
    mask = lambda x_part: {"x": x_part, "y": not x_part}
    mixed = optax.chain(
        optax.masked(optax.adam(1e-3), mask(True)), optax.masked(optax.sgd(0.1), mask(False))
    )
    same = optax.chain(
        optax.masked(optax.adam(1e-3), mask(True)), optax.masked(optax.adamw(1e-3), mask(False))
    )
    assert scaling.infer_rule(mixed.init({"x": w, "y": w})) is None
    assert scaling.infer_rule(same.init({"x": w, "y": w})) == "sqrt"
    # Plain SGD and a sign update have the same (empty) state: the rule is a guess there.
    sign = optax.chain(optax.scale_by_sign(), optax.scale(-0.1))
    assert scaling.is_stateless(sign.init(w)) and scaling.is_stateless(optax.sgd(0.1).init(w))
    assert not scaling.is_stateless(optax.sgd(0.1, momentum=0.9).init(w))
    res = _find(optimizer=sign)  # the rate not given, nor in the state: a relative rate
    assert any("rule 'sgd' is assumed" in x for x in res.warnings)
    assert any(x.startswith("learning_rate") and "is relative" in x for x in res.warnings)
    res = _find(optimizer=optax.sgd(0.01, momentum=0.9), learning_rate=0.01)
    assert not any("assumed" in x or "is relative" in x for x in res.warnings)
    # A schedule built into the optimizer: the relative rate is said to be the schedule's.
    res = _find(optimizer=optax.sgd(optax.linear_schedule(0.01, 0.0, 1000), momentum=0.9))
    assert any("is relative: 1 is the schedule built into" in x for x in res.warnings)
    # An explicit rule or optimizer name wins over the state; an unreadable one is an error.
    assert finder.resolve_lr_rule("linear", None, optax.adam(1.0).init(w))[0] == "linear"
    assert finder.resolve_lr_rule(None, "momentum", optax.adam(1.0).init(w))[0] == "sgd"
    with pytest.raises(ValueError, match="cannot tell this optimizer's learning-rate rule"):
        finder.find_batch_size(linreg_loss, jnp.zeros(D), optax.adafactor(1e-3), linreg_batches)
    # The forks' rule is the run's (SGD here, read from the state), and the multipliers follow it.
    assert scaling.rule_for("adamw") == "sqrt" and scaling.rule_for("sgd") == "sgd"
    assert critical.lr_multipliers(32, [64], "sgd", 32.0) == pytest.approx(((1 + 1) / 1.5,))


def test_a_scheduled_injected_rate_is_scaled_from_the_peak_passed():
    sched = optax.warmup_cosine_decay_schedule(1e-4, 1e-2, 5, 100)  # step 0: 1e-4, peak 1e-2
    res = _find(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=sched),
                learning_rate=1e-2, lr_rule="sgd")  # fmt: skip
    assert res.settings["learning_rate"] == 1e-2
    b, n = res.batch_size, res.recommendation.b_noise
    assert res.recommendation.learning_rate == pytest.approx(
        scaling.learning_rate("sgd", 1e-2, 8, b, n)[0], rel=1e-6
    )


def test_a_loss_that_is_not_a_mean_over_examples_is_named(plain_result):
    x = jnp.arange(24.0).reshape(4, 6) / 10
    batch = {"x": x, "mask": (jnp.arange(6) < jnp.array([[1], [2], [6], [3]])).astype(float)}
    mean_of_tokens = lambda w, b: jnp.sum((b["x"] * w) ** 2 * b["mask"]) / jnp.sum(b["mask"])
    per_example = lambda w, b: jnp.mean(
        jnp.sum((b["x"] * w) ** 2 * b["mask"], 1) / b["mask"].sum(1)
    )
    assert "not of loss_fn" in finder.mean_loss_warning(mean_of_tokens, 1.0, batch)
    assert finder.mean_loss_warning(per_example, 1.0, batch) is None
    assert not any("one-example losses" in w for w in plain_result.warnings)


def test_progress_covers_every_phase_and_seconds_add_up():
    calls = []
    res = _find(pilot_steps=6, candidates=(8, 16), timing_rounds=2, timing_cache=None,
                progress=lambda *c: calls.append(c))  # fmt: skip
    phases = [c[0] for c in calls]
    assert phases[0] == "pilot" and {"pilot", "memory", "timing"} <= set(phases)
    for phase in set(phases):  # each phase reaches its own total: no 98% then minutes of work
        done, total = [c[1:] for c in calls if c[0] == phase][-1]
        assert done == total
    assert [c[1] for c in calls if c[0] == "pilot"] == list(range(0, 7))  # 0: while compiling
    s = res.seconds
    assert {"path", "pilot", "noise", "branched", "memory", "timing", "decide", "total"} <= set(s)
    assert s["overhead"] == pytest.approx(s["total"] - s["pilot"])
    phases = ("path", "pilot", "noise", "branched", "memory", "timing", "decide")
    assert sum(s[k] for k in phases) <= s["total"]


def test_a_budget_bounds_the_timing_and_says_when_it_is_exceeded():
    res = _find(pilot_steps=6, candidates=(8, 16), timing_rounds=5, timing_cache=None,
                budget_s=1e-6)  # fmt: skip
    assert all(len(t.times_s) == 1 for t in res.timing.timings.values())  # one round, then stop
    assert any("over the budget of" in w for w in res.warnings) and res.budget_s == 1e-6
    assert strict(res.to_dict())["warnings"] == list(res.warnings)
    # A fraction of the planned run, timed by the pilot's steps after the first (compile).
    res = _find(pilot_steps=6, budget_fraction=0.5, run_steps=10**6, timing_cache=None)
    assert 0 < res.budget_s <= 0.5 * 10**6 * res.seconds["pilot"] / 5
    assert not any("over the budget" in w for w in res.warnings)


def test_the_planned_run_weighs_the_last_stretch_for_the_steps_after_the_pilot(plain_result):
    # The same pilot (deterministic) with run_steps: the last stretch's noise scale also
    # stands for every step from the pilot's end to run_steps (eq. 2.11 piecewise).
    res = finder.find_batch_size(
        linreg_loss, jnp.zeros(D), optax.sgd(0.05), linreg_batches, ref_batch_size=16,
        pilot_steps=24, candidates=(16,), timing_rounds=1, optimizer_name="sgd",
        learning_rate=0.05, run_steps=2400, progress=False,
    )  # fmt: skip
    assert res.pilot_rows == plain_result.pilot_rows
    traj = plain_result.trajectory
    delta = traj.delta_steps + np.eye(3)[2] * (2400 - 24)
    eff = critical.effective_noise_scale(delta, traj.b_noise, 16, low=traj.low, high=traj.high)
    assert res.effective_noise_scale.value == pytest.approx(eff.value)
    last, mean = traj.b_noise[-1], plain_result.effective_noise_scale.value
    assert abs(res.effective_noise_scale.value - last) < abs(mean - last)


def test_dominated_sizes_drop_exactly_what_loses_at_every_noise_scale():
    rng = np.random.default_rng(3)
    times = {b: list(rng.uniform(0.5, 1.5, 4) * (0.2 + b / 64)) for b in (8, 16, 32, 64, 256)}
    for objective in ("time", "cost"):
        pruned = finder.dominated_sizes((20.0, 90.0), objective)(times)

        def cost(b, n, t, objective=objective):
            return (1 + n / b) * t if objective == "time" else (1 + b / n) * t / b

        q = {b: np.quantile(t, [0.25, 0.75]) for b, t in times.items()}
        grid = np.linspace(20.0, 90.0, 201)
        brute = {b for b in q if any(all(cost(b, n, q[b][0]) > cost(c, n, q[c][1]) for n in grid)
                                     for c in q if c != b)}  # fmt: skip
        assert set(pruned) == brute and len(brute) < len(times)
    # 8 is faster at n = 20 (3.5 vs 3.825), 16 at n = 90 (11.26 vs 12.25): both stay.
    assert finder.dominated_sizes((20.0, 90.0))({8: [1.0], 16: [1.7]}) == {}
    assert finder.dominated_sizes((math.nan, 90.0))(times) == {}  # no interval: nothing pruned
    # A kept size (the reference batch, whose speedup is stated) is timed to the end.
    pruned = finder.dominated_sizes((20.0, 90.0))(times)
    b0 = min(pruned)
    kept = finder.dominated_sizes((20.0, 90.0), keep=(b0,))(times)
    assert kept == {b: why for b, why in pruned.items() if b != b0}


def test_unstable_step_times_warn_how_far_the_pick_could_move():
    from gns import hardware  # noqa: PLC0415

    def timing(b, med, spread):
        return hardware.BatchTiming(b, med, med * (1 - spread / 2), med * (1 + spread / 2),
                                    spread, (med,), 0, spread <= 0.1)  # fmt: skip

    table = hardware.TimingTable(
        {8: timing(8, 1.0, 0.02), 16: timing(16, 1.3, 0.6), 32: timing(32, 2.6, 0.02)}, 5, 0.1
    )
    kw = {"base_batch_size": 16, "optimizer": "adam"}
    rec = finder.decide("b_simple", (16.0, 12.0, 20.0), {}, table, 32, **kw)
    timing_only = finder.decide("b_simple", (16.0, math.nan, math.nan), {}, table, 32, **kw)
    (warning,) = finder._timing_warnings(table, rec, timing_only)
    moves = sorted(set(timing_only.plausible_batch_sizes) | {rec.batch_size})
    assert "B = [16]" in warning and "60%" in warning and f"any of {moves}" in warning
    assert len(moves) >= 2  # batch 16's quartiles reach below batch 8's time: the pick can move
    stable = hardware.TimingTable({8: timing(8, 1.0, 0.02)}, 5, 0.1)
    assert finder._timing_warnings(stable, rec, timing_only) == []
    # Unstable but far slower: the pick holds within every quartile, nothing to warn about.
    far = hardware.TimingTable(
        {8: timing(8, 1.0, 0.02), 16: timing(16, 4.0, 0.3), 32: timing(32, 8.0, 0.02)}, 5, 0.1
    )
    held = finder.decide("b_simple", (16.0, 12.0, 20.0), {}, far, 32, **kw)
    alone = finder.decide("b_simple", (16.0, math.nan, math.nan), {}, far, 32, **kw)
    assert alone.plausible_batch_sizes == (held.batch_size,)
    assert finder._timing_warnings(far, held, alone) == []
    # The run's rule names the recommended rate (gns.scaling), whichever it is.
    rules = {"linear": lambda b: b / 16, "seesaw": lambda b: math.sqrt(16 / b),
             "constant": lambda b: 1.0, "sqrt": lambda b: math.sqrt(b / 16)}  # fmt: skip
    for rule, mult in rules.items():
        r = finder.decide("b_simple", (16.0, 12.0, 20.0), {}, table, 32, base_batch_size=16,
                          base_lr=0.1, optimizer=rule)  # fmt: skip
        assert r.learning_rate == pytest.approx(0.1 * mult(r.batch_size)), rule


def test_a_pick_at_the_callers_limit_is_not_told_to_time_past_it():
    from gns import hardware  # noqa: PLC0415

    table = hardware.TimingTable(
        {b: hardware.BatchTiming(b, t, t, t, 0.0, (t,), 0, True) for b, t in
         ((8, 1.0), (16, 2.0), (32, 4.0))}, 5, 0.1)  # fmt: skip
    kw = {"base_batch_size": 16, "optimizer": "adam"}
    free = finder.decide("b_simple", (1.0, 0.5, 2.0), {}, table, 32, **kw)
    assert free.batch_size == 8 and free.extend_range_to == 4
    assert "time batch 4 and recommend again" in free.reason
    held = finder.decide("b_simple", (1.0, 0.5, 2.0), {}, table, 32, limits=(8, 64), **kw)
    assert held.batch_size == 8 and held.extend_range_to is None
    note = "The pick 8 is at the smallest batch size allowed here (8): batch 4 was not timed."
    assert note in held.reason and note in held.warnings
    assert not any("time batch 4" in w for w in (held.reason, *held.warnings))
    # Given candidates past the limits (a sweep's accumulated batches larger than the train
    # set) are not candidates either.
    big = finder.decide("b_simple", (1e4, 5e3, 2e4), {}, table, 32, candidates=[8, 16, 32, 64],
                        **kw)  # fmt: skip
    small = finder.decide("b_simple", (1e4, 5e3, 2e4), {}, table, 32, candidates=[8, 16, 32, 64],
                          limits=(1, 40), **kw)  # fmt: skip
    assert [r["batch_size"] for r in big.table] == [8, 16, 32, 64]
    assert [r["batch_size"] for r in small.table] == [8, 16, 32]


# The timing search: where it starts, how far it widens, what it never compiles.


def _fake_time_fn(step_time, fits=lambda b: True):
    """A ``time_fn`` of :func:`finder.pipeline` on the step-time curve ``step_time(B)``
    (exact, 3 rounds), recording what it was asked; sizes for which ``fits`` is false do not
    fit (left out of the table, the largest that fits below them)."""
    from gns import hardware  # noqa: PLC0415

    asked = []

    def time_fn(cands, interval, seconds_left):
        asked.append(sorted(cands))
        timed = {b: step_time(b) for b in cands if fits(b)}
        table = hardware.TimingTable(
            {b: hardware.BatchTiming(b, t, t, t, 0.0, (t,) * 3, 0, True)
             for b, t in timed.items()}, 3, 0.1)  # fmt: skip
        return max(timed), table, None

    return time_fn, asked


def _widen(step_time, cands, n=100.0, fits=lambda b: True, limits=(1, math.inf)):
    time_fn, asked = _fake_time_fn(step_time, fits)
    decide = lambda *a: finder.decide(*a, base_batch_size=64, optimizer="sgd", limits=limits)  # noqa: E731
    value = (n, 0.8 * n, 1.25 * n)
    rec, timed, extended, _ = finder._widen(
        time_fn, decide, cands, ("b_simple", value, {}), lambda: None, limits
    )
    return rec, timed, extended, asked


def _argmin(step_time, cands, n=100.0):
    return min(cands, key=lambda b: (1 + n / b) * step_time(b))


def test_timing_starts_at_the_noise_scale_and_widens_only_while_the_pick_is_at_an_end():
    assert finder.timing_start([8, 16, 32, 64, 128], (80.0, 125.0)) == [64, 128]
    assert finder.timing_start([8, 16, 32, 64, 128, 256], (80.0, 125.0)) == [64, 128, 256]
    assert finder.timing_start([8, 16, 32], (math.nan, math.nan)) == [8, 16, 32]
    assert finder.timing_start([8, 16, 32], (math.inf, math.inf)) == [8, 16, 32]
    assert finder.timing_start([8, 16, 32], (1e200, 1e300)) == [16, 32]  # no overflow
    cands = [8, 16, 32, 64, 128, 256, 512, 1024]
    # t(B) = 1 + B/400: the optimum sqrt(1·100·400) = 200 lies in the start's range: one
    # widening (to 512, the pick 256 sat at the top), then the pick is inside and it stops.
    cpu = lambda b: 1.0 + b / 400  # noqa: E731
    rec, timed, extended, asked = _widen(cpu, cands)
    assert asked == [[64, 128, 256], [64, 128, 256, 512]] and extended is None
    assert rec.batch_size == _argmin(cpu, cands) == 256 and rec.at_range_end is None
    # A large fixed cost per step (an accelerator): the optimum is far above the noise scale;
    # the search walks up one size at a time until the pick is inside, never below the start.
    gpu = lambda b: 10.0 + b / 400  # noqa: E731
    rec, _, _, asked = _widen(gpu, cands)
    assert [a[-1] for a in asked] == [256, 512, 1024] and min(asked[-1]) == 64
    assert rec.batch_size == _argmin(gpu, cands) == 512
    # Past the candidates once at most: the extension is said (extended_to); never past the
    # caller's limits.
    rec, timed, extended, asked = _widen(gpu, [64, 128, 256])
    assert extended == 512 and asked[-1] == [64, 128, 256, 512] and len(asked) == 2
    rec, timed, extended, asked = _widen(gpu, [64, 128, 256], limits=(64, 256))
    assert extended is None and asked == [[64, 128, 256]] and rec.batch_size == 256
    # A size that does not fit closes its side: 1024 is never asked for.
    rec, timed, _, asked = _widen(gpu, cands, fits=lambda b: b <= 256)
    assert asked[-1] == [64, 128, 256, 512] and 1024 not in sum(asked, [])
    assert max(timed[1].timings) == 256 and rec.batch_size >= 256


def test_a_pruned_size_is_never_the_pick():
    from gns import hardware  # noqa: PLC0415

    def timing(b, t, pruned=""):
        return hardware.BatchTiming(b, t, t, t, 0.0, (t,), 0, True, pruned=pruned)

    times = {32: 1.0, 64: 1.2, 128: 3.0}  # at n = 100, 64 wins by the medians
    for pruned in ("", "cannot win against B=32"):
        table = hardware.TimingTable(
            {b: timing(b, t, pruned if b == 64 else "") for b, t in times.items()}, 3, 0.1
        )
        rec = finder.decide("b_simple", (100.0, 80.0, 125.0), {}, table, 128,
                            base_batch_size=64, optimizer="sgd")  # fmt: skip
        assert (rec.batch_size == 64) == (not pruned)
        assert (64 in {r["batch_size"] for r in rec.table}) == (not pruned)


def test_each_candidate_is_compiled_once_for_its_memory_and_its_timing():
    from jax import monitoring  # noqa: PLC0415

    compiles, phase = [], ["before"]

    def listen(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(phase[0])

    params = jnp.zeros(D)
    jax.block_until_ready(jnp.ones(3) * 2)  # nothing compiles lazily in the measured part

    def progress(name, done, total):
        phase[0] = name

    monitoring.register_event_duration_secs_listener(listen)
    try:
        res = finder.find_batch_size(
            linreg_loss, params, optax.sgd(0.01), linreg_batches, ref_batch_size=8,
            pilot_steps=6, num_stretches=2, candidates=(4, 8, 16, 32, 64, 128, 256),
            timing_rounds=2, timing_cache=None, progress=progress,
        )  # fmt: skip
    finally:
        monitoring.unregister_event_duration_listener(listen)
    timed = set(res.timing.timings)
    searched = [p for p in compiles if p in ("memory", "timing")]
    # One compile per timed size (memory analysis, confirming run and timing share it),
    # none in the timing itself; the sizes the search never reached were never compiled.
    assert len(searched) == len(timed) and set(searched) == {"memory"}
    assert len(timed) < 7 and [r.batch_size for r in res.memory.records] == sorted(timed)
    assert res.batch_size not in {b for b, t in res.timing.timings.items() if t.pruned}


def test_a_size_added_while_widening_is_timed_with_the_unpruned_ones_compiling_nothing_again():
    from jax import monitoring  # noqa: PLC0415

    opt = optax.sgd(0.01)
    params = jnp.zeros(D)

    def train_step(p, o, batch):
        updates, o = opt.update(jax.grad(linreg_loss)(p, batch), o, p)
        return optax.apply_updates(p, updates), o

    checked = {"get": linreg_batches, "first": linreg_batches(8, 0), "progress": None, "ref": 8}
    a = {"memory_budget_bytes": 2**30, "timing_rounds": 2, "objective": "time",
         "timing_cache": None}  # fmt: skip
    seconds, compiles = {}, []

    def listen(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    time_fn = finder._time_fn(train_step, params, opt.init(params), checked, a, seconds)
    monitoring.register_event_duration_secs_listener(listen)
    try:
        _, first, _ = time_fn([8, 16], (math.nan, math.nan), None)  # no interval: no pruning
        _, wider, fit = time_fn([8, 16, 32], (math.nan, math.nan), None)
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert len(compiles) == 3 and [r.batch_size for r in fit.records] == [8, 16, 32]
    for b in (8, 16):  # timed again beside 32, under the same load; not "from an earlier call"
        assert wider.timings[b].times_s != first.timings[b].times_s
        assert not wider.timings[b].cached
    assert {"memory", "timing"} <= set(seconds)


def test_fork_steps_take_the_multiplier_at_run_time_with_the_baked_rates_numbers():
    """One compiled step per batch size serves every learning-rate multiplier, and each
    multiplier's trajectory is bitwise that of a step with the multiplier a constant."""
    opt, tracker = optax.adam(0.05), smoothing.ema()
    _, _, make_step = finder._make_steps(linreg_loss, opt, "per_example", 1, tracker)
    start = (jnp.zeros(D), opt.init(jnp.zeros(D)), tracker.init())
    for mult in (0.5, 1.0, 3.0):

        @jax.jit
        def baked(state, batch, mult=mult):  # the rate times the multiplier, a constant
            p, o, g = state
            updates, o = opt.update(jax.grad(linreg_loss)(p, batch), o, p)
            return optax.apply_updates(p, jax.tree.map(lambda u: mult * u, updates)), o, g

        a = b = start
        for i in range(4):
            a, b = make_step(16, mult)(a, linreg_batches(16, i)), baked(b, linreg_batches(16, i))
            np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        assert make_step(16, mult) is make_step(16, mult)
    assert make_step(16, 2.0).func._cache_size() == 1  # one executable for the 3 multipliers


def test_params_that_are_not_floats_are_named_before_any_work():
    params = {"w": jnp.zeros(D), "count": jnp.zeros((), jnp.uint32)}  # e.g. an nnx RngCount
    with pytest.raises(ValueError, match=r"params leaf count is uint32, not a float.*nnx.Param"):
        finder.find_batch_size(
            lambda p, batch: linreg_loss(p["w"], batch), params, optax.sgd(0.01), linreg_batches,
            ref_batch_size=8, pilot_steps=4, candidates=(8,), progress=False,
        )  # fmt: skip
