"""Tests for gns.finder: find_batch_size on plain JAX and Flax Linen (tiny budgets), its
measurements against independent recomputations, the basis order, and its error messages."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gns import critical, estimate, finder, smoothing

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
    # The pick is one of the candidates (timed, or accumulation of the largest that fits).
    cands = {r["batch_size"] for r in res.recommendation.table}
    assert res.batch_size in cands and set(res.timing.timings) <= cands
    assert len(d["pilot"]) == 24 and [r["step"] for r in d["pilot"]] == list(range(1, 25))
    assert [set(r) >= {"step", "b_simple", "low", "high"} for r in d["noise_scale"]["trajectory"]]
    assert len(d["noise_scale"]["trajectory"]) == 3


def test_plain_jax_measurements_match_independent_computations(plain_result):
    res = plain_result
    # The first pilot row is estimate.per_example on batch 0 at the initial parameters.
    stats, _ = estimate.per_example(linreg_loss, jnp.zeros(D), linreg_batches(16, 0))
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
    params = model.init(jax.random.key(1), jnp.zeros((1, D)))

    def loss_fn(p, batch):
        return jnp.mean((model.apply(p, batch["x"]) - batch["y"]) ** 2)

    def stream(size):  # the iterator-factory form
        i = 0
        while True:
            yield linreg_batches(size, i)
            i += 1

    res = finder.find_batch_size(
        loss_fn, params, optax.adam(1e-2), stream, ref_batch_size=8, pilot_steps=12,
        num_stretches=2, branched=True, branch_points=2, branch_exponents=(-1, 0, 1),
        branch_steps=2, candidates=(8, 16), timing_rounds=2, progress=False,
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
    assert res.batch_size in {r["batch_size"] for r in res.recommendation.table}
    noise_fig, throughput_fig = res.plot()
    measured = [ln for ln in noise_fig.axes[0].get_lines() if ln.get_label() == "per-step"]
    assert len(measured) == 1 and len(measured[0].get_xdata()) > 0
    assert throughput_fig.axes[0].get_xlabel() == "batch size"


def test_iterator_factory_serves_the_same_stream_as_indices():
    get = finder.as_batch_fn(lambda size: (linreg_batches(size, i) for i in range(100)))
    for size, index in ((4, 2), (4, 0), (8, 3)):
        np.testing.assert_array_equal(get(size, index)["x"], linreg_batches(size, index)["x"])


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


def _find(loss_fn=linreg_loss, batch_fn=linreg_batches, **kw):
    kw = {"ref_batch_size": 8, "pilot_steps": 6, "candidates": (8,), "progress": False} | kw
    return finder.find_batch_size(loss_fn, jnp.zeros(D), optax.sgd(0.01), batch_fn, **kw)


def test_batch_fn_of_the_wrong_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_fn\(8, 0\) returned a batch of 4 examples, not 8"):
        _find(batch_fn=lambda size, index: linreg_batches(4, index))


def test_non_scalar_loss_is_a_clear_error():
    def per_example_loss(w, batch):
        return (batch["x"] @ w - batch["y"]) ** 2

    with pytest.raises(ValueError, match=r"must return a scalar .*got \(8,\).*\.mean\(\)"):
        _find(loss_fn=per_example_loss)


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
    stats, _ = estimate.per_example(loss_fn, state, linreg_batches(8, 0), method="vmap")
    assert res.pilot_rows[0]["g_sq"] == pytest.approx(float(stats.g_sq), rel=1e-5)
    assert res.basis in finder.BASIS_ORDER and len(res.trajectory.b_noise) == 2
    assert res.batch_size in {r["batch_size"] for r in res.recommendation.table}


def test_a_pick_at_an_end_of_the_timed_range_extends_it_once():
    # One candidate: the pick is at both ends; the range is extended once, to half of it.
    res = _find(pilot_steps=8, timing_rounds=2)
    assert res.extended_to == 4 and sorted(res.timing.timings) == [4, 8]
    assert res.to_dict()["extended_to"] == 4
    if res.batch_size == 4:  # at the end again: said, not extended a second time
        assert res.recommendation.at_range_end == "smallest"


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
