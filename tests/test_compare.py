"""Tests of the compare and tradeoff modes (experiments/compare.py, gns/plots.py): the
pure budget logic on fake timings, and both modes end to end on the smoke config with
synthetic data."""

import json
import math
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import cifar10 as cifar10_config
from experiments import cifar10, compare, runlog, sweep
from experiments.cli import UserError

# ---------------------------------------------------------------------------------------------
# plan_runs: who gets which budget.


def test_plan_baseline_first_gets_the_configured_budget_and_no_target():
    (plan,) = compare.plan_runs(300.0)
    assert (plan["role"], plan["budget_s"], plan["target_accuracy"]) == ("baseline", 300.0, None)


def test_plan_recommended_gets_the_baselines_time_to_best_and_its_best_as_target():
    baseline = {"time_to_best_s": 250.0, "best_test_accuracy": 0.7, "wall_time_s": 300.0}
    plans = compare.plan_runs(300.0, baseline)
    assert [p["role"] for p in plans] == ["baseline", "recommended"]
    assert plans[1]["budget_s"] == 250.0
    assert plans[1]["target_accuracy"] == 0.7


def test_plan_baseline_again_gets_the_recommended_time_to_target():
    baseline = {"time_to_best_s": 250.0, "best_test_accuracy": 0.7, "wall_time_s": 300.0}
    rec = {"time_to_target_s": 90.0, "wall_time_s": 90.5}
    plans = compare.plan_runs(300.0, baseline, rec)
    assert [p["role"] for p in plans] == list(compare.ROLES)
    assert plans[2]["budget_s"] == 90.0
    assert plans[2]["target_accuracy"] == 0.7
    assert plans[2]["budget_from"] == "the recommended run's time to target"


def test_plan_fallbacks_when_a_time_is_missing():
    # The recommended run never reached the target: the baseline gets its whole time.
    baseline = {"time_to_best_s": 250.0, "best_test_accuracy": 0.7, "wall_time_s": 300.0}
    plans = compare.plan_runs(300.0, baseline, {"time_to_target_s": None, "wall_time_s": 251.0})
    assert plans[2]["budget_s"] == 251.0 and "never reached" in plans[2]["budget_from"]
    # The baseline has no time to best (never evaluated): the recommended gets its whole time.
    plans = compare.plan_runs(
        300.0, {"time_to_best_s": None, "best_test_accuracy": None, "wall_time_s": 301.0}
    )
    assert plans[1]["budget_s"] == 301.0 and plans[1]["target_accuracy"] is None


@pytest.mark.parametrize("bad", [0.0, -5.0, None, "60"])
def test_plan_rejects_a_bad_budget_naming_the_field(bad):
    with pytest.raises(ValueError, match="baseline_budget_s"):
        compare.plan_runs(bad)


@settings(max_examples=50, deadline=None)
@given(
    t_best=st.floats(0.1, 1e4),
    slack=st.floats(0.0, 1e3),
    frac=st.one_of(st.none(), st.floats(0.01, 1.0)),
)
def test_plan_budgets_never_exceed_the_previous_runs_time(t_best, slack, frac):
    """Each run's budget is a time the previous run actually used: (b) <= (a)'s training time,
    and (c) <= (b)'s training time."""
    wall_a = t_best + slack
    baseline = {"time_to_best_s": t_best, "best_test_accuracy": 0.5, "wall_time_s": wall_a}
    plans = compare.plan_runs(wall_a, baseline)
    wall_b = plans[1]["budget_s"]
    rec = {"time_to_target_s": None if frac is None else frac * wall_b, "wall_time_s": wall_b}
    plans = compare.plan_runs(wall_a, baseline, rec)
    assert plans[1]["budget_s"] <= wall_a
    assert 0 < plans[2]["budget_s"] <= wall_b


# ---------------------------------------------------------------------------------------------
# check_recommendation: the tradeoff mode's verdict.


def _pt(b, device, wall):
    return {
        "batch_size": b,
        "reached": device is not None,
        "device_time_to_target_s": device,
        "time_to_target_s": wall,
    }


def test_check_recommendation_ranks_by_device_time_on_fake_timings():
    # Batch 64's wall clock was the fastest (a quiet moment), its steps x t(B) is not.
    points = [_pt(16, 30.0, 31.0), _pt(32, 20.0, 26.0), _pt(64, 25.0, 19.0), _pt(128, None, None)]
    c = compare.check_recommendation(points, 64, b_simple=100.0, b_crit=40.0)
    assert (c["best_batch_size"], c["best_device_time_to_target_s"]) == (32, 20.0)
    assert c["time_ratio"] == pytest.approx(25.0 / 20.0)
    assert c["wall_time_ratio"] == 1.0
    assert (c["rank"], c["num_reached"], c["num_trained"]) == (2, 3, 4)
    assert [r["batch_size"] for r in c["ranking"]] == [32, 64, 16]
    assert c["b_crit_over_b_simple"] == pytest.approx(0.4)
    best = compare.check_recommendation(points, 32, b_simple=100.0, b_crit=None)
    assert (best["time_ratio"], best["rank"], best["b_crit_over_b_simple"]) == (1.0, 1, None)
    assert best["wall_time_ratio"] == pytest.approx(26.0 / 19.0)
    missed = compare.check_recommendation(points, 128, b_simple=100.0, b_crit=40.0)
    assert missed["time_ratio"] is None and missed["best_batch_size"] == 32
    noisy = compare.check_recommendation(points, 32, b_simple=math.inf, b_crit=40.0)
    assert noisy["b_crit_over_b_simple"] is None
    with pytest.raises(ValueError, match="recommended_batch_size=8"):
        compare.check_recommendation(points, 8, b_simple=100.0, b_crit=40.0)


def test_compare_config_mistake_is_a_user_error_naming_the_field(tmp_path):
    c = smoke_config("tradeoff")
    c.compare.tradeoff.batch_sizes = (16, 0)
    with pytest.raises(UserError, match="compare.tradeoff.batch_sizes|tradeoff.batch_sizes"):
        cifar10.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------
# Both modes end to end on the smoke config (synthetic data, budgets of a few seconds).


def smoke_config(mode):
    c = cifar10_config.get_config("smoke")
    c.mode = mode
    c.data.source = "synthetic"
    c.data.synthetic.image_size = 16
    c.data.num_train = 512
    c.data.num_test = 256
    c.compare.baseline_budget_s = 2.0
    c.compare.tradeoff.max_wall_time_s = 2.0
    return c


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    import jax

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {k: getattr(jax.config, k) for k in keys}
    workdir = str(tmp_path_factory.mktemp("compare"))
    summary = cifar10.run(smoke_config("compare"), workdir)
    yield workdir, summary
    for k, v in old.items():  # run_sweep set a process-wide cache in workdir: undo it
        jax.config.update(k, v)


def _num(cell):
    return None if cell == "-" else float(cell.rstrip("%"))


@pytest.mark.timeout(120)
def test_compare_mode_summary_budgets_and_table(compare_run):
    workdir, s = compare_run
    assert s["mode"] == "compare"
    assert os.path.exists(os.path.join(workdir, compare.SUMMARY_FILE))
    assert os.path.exists(os.path.join(workdir, "compare.png"))
    rec = s["recommendation"]
    assert rec["batch_size"] >= 1 and rec["learning_rate"] > 0
    a, b, c = s["runs"]
    assert [r["role"] for r in s["runs"]] == list(compare.ROLES)
    for r in s["runs"]:
        for key in (
            "batch_size",
            "learning_rate",
            "wall_time_s",
            "epochs",
            "train_accuracy",
            "test_accuracy",
            "time_to_target_s",
        ):
            assert key in r, (r["role"], key)
        assert r["wall_time_s"] > 0 and r["epochs"] > 0
        assert 0 <= r["train_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1
        if r["time_to_target_s"] is not None:
            assert 0 < r["time_to_target_s"] <= r["wall_time_s"]
        if r["stop_reason"] == "max_wall_time_s":  # stops on the step that used the budget
            assert r["wall_time_s"] >= r["budget_s"]
    assert (a["batch_size"], b["batch_size"], c["batch_size"]) == (
        32,
        rec["batch_size"],
        32,
    )  # smoke baseline = config.batch_size
    assert (a["learning_rate"], b["learning_rate"]) == (3e-3, rec["learning_rate"])
    # The budgets as plan_runs defines them, from the runs' own timings.
    assert a["budget_s"] == 2.0 and a["time_to_target_s"] == a["time_to_best_s"]
    assert b["budget_s"] == a["time_to_best_s"] <= a["wall_time_s"]
    assert b["target_accuracy"] == c["target_accuracy"] == a["best_test_accuracy"]
    assert c["budget_s"] == (b["time_to_target_s"] or b["wall_time_s"])
    # The table: one row per run with its numbers.
    table = compare.report(s)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:5]}
    assert set(rows) == set(compare.ROLES)
    for r in s["runs"]:
        cells = rows[r["role"]]
        assert int(cells[1]) == r["batch_size"]
        assert float(cells[2]) == pytest.approx(r["learning_rate"], rel=1e-2)
        assert _num(cells[3]) == pytest.approx(r["wall_time_s"], abs=0.051)
        assert _num(cells[5]) == pytest.approx(100 * r["train_accuracy"], abs=0.051)
        assert _num(cells[6]) == pytest.approx(100 * r["test_accuracy"], abs=0.051)
        t = r["time_to_target_s"]
        assert _num(cells[7]) == (None if t is None else pytest.approx(t, abs=0.051))


@pytest.mark.timeout(120)
def test_tradeoff_mode_reuses_the_measurements_and_checks_the_recommendation(compare_run, tmp_path):
    src, cmp_summary = compare_run
    workdir = str(tmp_path / "tradeoff")
    # Same config apart from the mode: the measurements of the compare run are reused.
    shutil.copytree(os.path.join(src, "sweep"), os.path.join(workdir, "sweep"))
    s = cifar10.run(smoke_config("tradeoff"), workdir)
    assert s["mode"] == "tradeoff"
    assert s["recommendation"]["batch_size"] == cmp_summary["recommendation"]["batch_size"]
    assert s["measurement_time_s"] < 1.0  # nothing measured again
    rec_b = s["recommendation"]["batch_size"]
    batches = [p["batch_size"] for p in s["points"]]
    assert batches == sorted({16, 32, rec_b})
    with open(os.path.join(workdir, compare.SUMMARY_FILE)) as f:  # strict: no NaN/Infinity
        written = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"not strict: {c}"))
    assert written == runlog.to_strict_json(s)
    # t(B) of every trained batch comes from the one timing table of the measurements.
    table = runlog.read_json(os.path.join(workdir, "sweep", sweep.SWEEP_FILE))["throughput"]
    t_b = {r["batch_size"]: r["step_time_s"] for r in table if r["fits"]}
    for p in s["points"]:
        assert p["reached"] == (p["time_to_target_s"] is not None)
        assert p["step_time_s"] == t_b[p["batch_size"]]
        if p["reached"]:
            assert 0 < p["time_to_target_s"] <= p["wall_time_s"]
            assert p["device_time_to_target_s"] == pytest.approx(p["steps"] * p["step_time_s"])
    # The verdict, recomputed independently from the points: device time ranks.
    reached = {p["batch_size"]: p["device_time_to_target_s"] for p in s["points"] if p["reached"]}
    ch = s["check"]
    if rec_b in reached:
        assert ch["time_ratio"] == pytest.approx(reached[rec_b] / min(reached.values()))
        assert ch["time_ratio"] >= 1.0
    else:
        assert ch["time_ratio"] is None
    b_crit = s["tradeoff"]["b_crit"]
    if b_crit is not None:
        assert ch["b_crit_over_b_simple"] == pytest.approx(b_crit / s["noise_scale"]["b_simple"])
    table = compare.report(s)
    lines = table.splitlines()
    for p in s["points"]:
        row = next(ln for ln in lines if ln.split() and ln.split()[0] == str(p["batch_size"]))
        t = p["time_to_target_s"]
        cell = row.split()[3]
        assert (cell == "-") if t is None else math.isclose(float(cell), t, abs_tol=0.051)
    assert "<- recommended" in next(ln for ln in lines if ln.split()[:1] == [str(rec_b)])
