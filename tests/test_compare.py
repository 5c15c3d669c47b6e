"""Tests of the compare and tradeoff modes (experiments/compare.py, gns/plots.py): the smoothed
accuracy and the verdict on fake results, the recommendation check on fake timings, and both
modes on the smoke settings with a tiny MLP on synthetic data (the compare mode through
``make demo`` is in tests/test_demo.py)."""

import copy
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import cifar10 as cifar10_config
from experiments import adaptive, cifar10, compare, report, runlog, sweep, train
from experiments.cli import UserError
from gns import common, scaling

# ---------------------------------------------------------------------------------------------
# The smoothed target.


def test_trailing_means_need_a_full_window():
    acc = [0.2, 0.6, 0.4, 0.5, 0.7]
    assert compare.trailing_means(acc, 3) == pytest.approx([None, None, 0.4, 0.5, 0.5333333])
    assert compare.trailing_means(acc[:2], 3) == [None, None]
    with pytest.raises(ValueError, match="window=0"):
        compare.trailing_means(acc, 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30), st.integers(1, 5))
def test_trailing_means_are_the_means_of_each_full_window(acc, w):
    expected = [None] * (w - 1) + [np.mean(acc[j - w + 1 : j + 1]) for j in range(w - 1, len(acc))]
    got = compare.trailing_means(acc, w)
    assert [m is None for m in got] == [m is None for m in expected[: len(acc)]]
    assert [m for m in got if m is not None] == pytest.approx(
        [m for m in expected if m is not None]
    )


# ---------------------------------------------------------------------------------------------
# The verdict on fake results.


def _run(policy, seed, device, batch=32, best=0.6):
    return {
        "policy": policy,
        "batch_size": batch,
        "seed": seed,
        "reached": device is not None,
        "device_time_to_target_s": device,
        "time_to_target_s": None if device is None else 1.5 * device,
        "best_smoothed_accuracy": best,
    }


def test_verdict_names_the_winner_with_ratios_and_seed_ranges():
    runs = [
        *(_run("recommended", s, d, 32) for s, d in ((0, 20.0), (1, 22.0))),
        *(_run("default", s, d, 64) for s, d in ((0, 30.0), (1, 34.0))),
        *(_run("largest_fits", s, d, 512) for s, d in ((0, 80.0), (1, 100.0))),
    ]
    v = compare.verdict(runs, 0.55)
    assert v["fastest"] == "recommended" and v["tie"] == []
    assert v["ranking"] == ["recommended", "default", "largest_fits"]
    p = v["policies"]
    assert p["recommended"]["device_time_to_target_s"] == 21.0
    assert p["recommended"]["spread_s"] == 1.0 and p["default"]["spread_s"] == 2.0
    assert p["default"]["ratio"] == pytest.approx(32.0 / 21.0)
    assert p["default"]["ratio_range"] == pytest.approx([30 / 20, 34 / 22])  # paired by seed
    assert p["largest_fits"]["ratio"] == pytest.approx(90.0 / 21.0)
    assert p["default"]["time_to_target_s"] == pytest.approx(1.5 * 32.0)
    text = "\n".join(v["text"])
    assert "fastest to 55.0%: recommended (batch 32), 21.0 s" in text
    assert (
        "default (batch 64): 1.52x the fastest (paired by seed and timing round 1.50-1.55x)" in text
    )
    assert "verdict: recommended is the fastest." in text and "tie" not in text
    assert "first evaluation" not in text
    # A policy whose every run reached the target as soon as it could be seen is named.
    early = [r | {"at_first_evaluation": r["policy"] == "default"} for r in runs]
    assert "  default reached 55.0% at the first evaluation that could show it" in "\n".join(
        compare.verdict(early, 0.55)["text"]
    )
    # A schedule's runs are named by the batches they went through, first to last.
    grown = [r | {"final_batch_size": 256 if r["policy"] == "default" else r["batch_size"]}
             for r in runs]  # fmt: skip
    assert "  default (batch 64-256): 1.52x" in "\n".join(compare.verdict(grown, 0.55)["text"])
    # Against the default (batch 64): its mean over each policy's, and paired per seed.
    o = v["over_default"]
    assert set(o) == {"recommended", "largest_fits"}
    assert o["recommended"]["speedup"] == pytest.approx(32.0 / 21.0)
    assert o["recommended"]["paired_range"] == pytest.approx([30 / 20, 34 / 22])
    assert o["largest_fits"]["speedup"] == pytest.approx(32.0 / 90.0)
    assert (
        "default (batch 64)'s device time to 55.0% over each policy's: recommended 1.52x "
        "(paired 1.50-1.55x), largest_fits 0.36x" in text
    )


def test_verdict_says_tie_when_the_difference_is_inside_the_spread():
    # 21 +/- 1 against 23.5 +/- 2: a gap of 2.5 <= 3; a third policy just outside (gap 4 > 3.5).
    runs = [
        *(_run("recommended", s, d) for s, d in ((0, 20.0), (1, 22.0))),
        *(_run("adaptive", s, d) for s, d in ((0, 21.5), (1, 25.5))),
        *(_run("default", s, d) for s, d in ((0, 22.5), (1, 27.5))),
    ]
    v = compare.verdict(runs)
    assert v["fastest"] == "recommended"
    assert v["tie"] == ["recommended", "adaptive"]
    assert v["policies"]["adaptive"]["tie"] and not v["policies"]["default"]["tie"]
    assert not v["policies"]["recommended"]["tie"]
    assert "verdict: tie between recommended, adaptive" in v["text"][-1]
    # One seed: no spread, so only an exact equality is a tie.
    one = compare.verdict([_run("a", 0, 10.0), _run("b", 0, 10.0001)])
    assert one["tie"] == [] and one["fastest"] == "a"


def test_verdict_pairs_by_timing_round_a_flip_under_one_round_is_a_tie():
    # Seed ranges far apart (20-22 against 30-34), but under the second timing round the
    # machine was busy while timing batch 32: there the default (64) was as fast. A tie.
    runs = [
        *(_run("recommended", s, d, 32) for s, d in ((0, 20.0), (1, 22.0))),
        *(_run("default", s, d, 64) for s, d in ((0, 30.0), (1, 34.0))),
    ]
    for r, rounds in zip(runs, ([19, 21, 20], [21, 35, 22], [29, 31, 30], [33, 34, 35]),
                         strict=True):  # fmt: skip
        r["device_time_by_round"] = [float(x) for x in rounds]
    v = compare.verdict(runs)
    d = v["policies"]["default"]
    assert d["ratio_range"] == pytest.approx([34 / 35, 35 / 22])
    assert d["tie"] and v["tie"] == ["recommended", "default"]
    assert d["ratio"] == pytest.approx(32.0 / 21.0)  # the means still use the median table
    # Faster under every round of every seed: decisive.
    runs[1]["device_time_by_round"] = [21.0, 22.0, 22.5]
    v = compare.verdict(runs)
    assert v["tie"] == [] and v["policies"]["default"]["ratio_range"][0] > 1
    # Rounds that disagree with the medians (re-timed sizes: more rounds than the shared
    # ones): the range still holds the point ratio, the ratio of the mean device times.
    for r in runs:
        r["device_time_by_round"] = [10.0] * 3  # every round: a ratio of 1
    d = compare.verdict(runs)["policies"]["default"]
    assert d["ratio_range"][0] <= d["ratio"] <= d["ratio_range"][1]


def test_verdict_reports_a_policy_that_never_reached_the_target_with_its_best_accuracy():
    runs = [
        *(_run("recommended", s, d) for s, d in ((0, 20.0), (1, 22.0))),
        _run("largest_fits", 0, None, 512, best=0.512),
        _run("largest_fits", 1, 95.0, 512, best=0.56),  # one seed of two: not reached
    ]
    v = compare.verdict(runs, 0.55)
    lf = v["policies"]["largest_fits"]
    assert not lf["reached"] and lf["num_reached"] == 1 and lf["ratio"] is None
    # The best of the seed that missed (the one that reached had 56%).
    assert lf["best_smoothed_accuracy"] == 0.512 and lf["device_time_to_target_s"] is None
    assert v["ranking"] == ["recommended"]
    assert any(
        "largest_fits (batch 512): never reached 55.0% in 1 of 2 seed(s); best smoothed "
        "accuracy 51.2%" in line
        for line in v["text"]
    )
    none = compare.verdict([_run("default", 0, None, best=None)], 0.55)
    assert none["fastest"] is None and none["tie"] == [] and none["ranking"] == []
    assert v["over_default"] == {} and none["over_default"] == {}  # no default that reached
    assert none["text"][0].startswith("verdict: no policy reached 55.0%")
    assert "best smoothed accuracy -" in none["text"][1]


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


# ---------------------------------------------------------------------------------------------
# Config mistakes.


def smoke_config(mode):
    """The smoke settings on a tiny MLP over 8-pixel synthetic images (as tests/test_demo.py):
    the modes' bookkeeping does not depend on the model, and its steps compile in a fraction
    of the CNN's time. No plots of each training (tests/test_plots.py draws them); the modes'
    own plots are drawn. The tradeoff mode trains at 16, 32 and the recommended batch: a fit
    through 2 or 3 points, as the bookkeeping needs."""
    c = cifar10_config.get_config("smoke")
    c.plots = False
    c.mode = mode
    c.data.source = "synthetic"
    c.data.synthetic.image_size = 8
    c.model.update(name="mlp", widths=(16,))
    c.data.num_train = 512
    c.data.num_test = 256
    c.tradeoff.max_wall_time_s = 2.0
    c.tradeoff.batch_sizes = (16, 32)
    return c


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("tradeoff.batch_sizes", (16, 0), "config.tradeoff.batch_sizes"),
        ("compare.policies", ("default", "fastest"), "compare.policies"),
        ("compare.policies", ("default", "default"), "compare.policies"),
        ("compare.target_accuracy", 1.5, "compare.target_accuracy=1.5"),
        ("compare.target_window", 0, "compare.target_window=0"),
        ("compare.max_wall_time_s", -1.0, "compare.max_wall_time_s=-1.0"),
        ("compare.seeds", (), "compare.seeds"),
        ("gns_every", 0, "the batch-size schedule follows the measured noise scale"),
        ("adaptive.patience", 0, "adaptive.patience=0"),
    ],
)
def test_compare_config_mistake_is_a_user_error_naming_the_field(tmp_path, field, value, words):
    c = smoke_config("compare")
    c.update_from_flattened_dict({field: value})
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        cifar10.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_a_compare_workdir_that_cannot_be_resumed_stops_before_measuring(tmp_path):
    (tmp_path / "w" / "runs").mkdir(parents=True)
    (tmp_path / "w" / "config.json").write_text("")  # emptied: no way to check the runs
    with pytest.raises(UserError, match="cannot read .*config.json to check the runs"):
        cifar10.run(smoke_config("compare"), str(tmp_path / "w"))
    assert (tmp_path / "w" / "config.json").read_text() == ""  # stopped before rewriting it
    # Measured on another number of devices: stopped before the sweep measures again.
    config = smoke_config("compare")
    runlog.write_json(str(tmp_path / "w" / "config.json"), config.to_dict())
    (tmp_path / "w" / "sweep").mkdir()
    runlog.write_json(str(tmp_path / "w" / "sweep" / "sweep.json"), {"mesh": {"devices": 99}})
    with pytest.raises(UserError, match=r"other training fields: devices: 99 -> \d"):
        cifar10.run(config, str(tmp_path / "w"))
    assert os.listdir(tmp_path / "w" / "sweep") == ["sweep.json"]


def test_policies_are_checked_names():
    c = smoke_config("compare")
    c.compare.policies = ("tradeoff_best", "default")
    with pytest.raises(UserError, match="compare.policies"):
        train.validate_config(c)


# ---------------------------------------------------------------------------------------------
# Both modes on the smoke config: the tradeoff mode, then the policies of the compare mode
# (as --config.mode=adaptive, its other name) in the same workdir with its measurements.


@pytest.fixture(scope="module")
def tradeoff_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("modes"))
    summary = cifar10.run(smoke_config("tradeoff"), os.path.join(workdir, "tradeoff"))
    return workdir, summary


@pytest.mark.timeout(120)
def test_tradeoff_mode_checks_the_recommendation(tradeoff_run):
    root, s = tradeoff_run
    workdir = os.path.join(root, "tradeoff")
    assert s["mode"] == "tradeoff"
    rec_b = s["recommendation"]["batch_size"]
    batches = [p["batch_size"] for p in s["points"]]
    assert batches == sorted({16, 32, rec_b})  # smoke_config's batch sizes
    with open(os.path.join(workdir, compare.SUMMARY_FILE)) as f:  # strict: no NaN/Infinity
        written = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"not strict: {c}"))
    assert written == common.to_json(s)
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
    table = report.mode_summary(s)
    lines = table.splitlines()
    for p in s["points"]:
        row = next(ln for ln in lines if ln.split() and ln.split()[0] == str(p["batch_size"]))
        t = p["time_to_target_s"]
        cell = row.split()[3]
        assert (cell == "-") if t is None else math.isclose(float(cell), t, abs_tol=0.051)
    assert "<- recommended" in next(ln for ln in lines if ln.split()[:1] == [str(rec_b)])
    # The fit is the mode's output: drawn when it exists. The trainings and the fit are the
    # sweep's, run in WORKDIR/sweep with the recommended batch added.
    if b_crit is not None:
        assert s["plot"] == os.path.join(workdir, "sweep", "tradeoff.png")
        assert os.path.getsize(s["plot"]) > 5000
    sw = runlog.read_json(os.path.join(workdir, "sweep", sweep.SWEEP_FILE))
    assert sw["tradeoff"] == s["tradeoff"] and sw["tradeoff"]["points"] == s["points"]
    assert sw["recommendation"] == s["recommendation"] and sw["skipped_trainings"] == {}
    # Each training in its own TensorBoard run, named by batch and seed.
    for p in s["points"]:
        assert os.path.basename(p["workdir"]).startswith(f"B{p['batch_size']}-seed0-")


def _the_gns_run_continues_the_pilot(c, s, workdir, monkeypatch):
    """The recommended policy's runs go on from the measurement's pilot checkpoint: its state
    (an independent orbax load), step, examples and seconds; the measurement's cost beyond
    the pilot is in its times. The other policies start from scratch; the adaptive one's times
    hold the cost of the timing table."""
    import jax
    import orbax.checkpoint as ocp

    from experiments import data
    from gns import finder

    sw = runlog.read_json(os.path.join(workdir, "sweep", sweep.SWEEP_FILE))
    start = sw["noise_scale"]["pilot"]["start"]
    cost = sum(sw["measurement_cost_s"].values())
    where = os.path.join(workdir, "sweep", start["checkpoint"])
    assert start["step"] == sw["noise_scale"]["pilot"]["steps"] >= 2 and start["seconds"] > 0
    for r in s["runs"]:
        rows = runlog.read_jsonl(os.path.join(r["workdir"], runlog.METRICS_FILE))
        summary = runlog.read_json(os.path.join(r["workdir"], train.SUMMARY_FILE))
        if r["policy"] != "recommended":  # from scratch: step 0, example 0, no pilot row
            # the schedule pays for the timing table it decides on
            timing = sum(
                v for k, v in sw["measurement_cost_s"].items() if k.startswith("throughput")
            )
            charged = timing if r["policy"] == "adaptive" else 0
            assert r["start"] is None and summary["start"] is None
            assert r["measurement_s"] == pytest.approx(charged) and timing > 0
            assert rows[0]["examples_seen"] == rows[0]["step"] * rows[0]["batch_size"]
            continue
        b = r["batch_size"]
        assert r["start"] == summary["start"] == start | {"checkpoint": os.path.abspath(where)}
        assert r["measurement_s"] == pytest.approx(cost - start["seconds"])
        pilot, first = rows[0], rows[1]
        assert pilot == {
            "step": start["step"],
            "examples_seen": start["examples"],
            "wall_time_s": start["seconds"],
            "batch_size": start["batch_size"],
            "learning_rate": start["learning_rate"],
            "start": "pilot",
        }
        # Step start+1 is the first one trained: the counter and the stream went on from it.
        seen = finder.continue_at(start["examples"], b) * b
        assert first["examples_seen"] == seen + (first["step"] - start["step"]) * b
        assert first["wall_time_s"] > start["seconds"]  # the clock counts the pilot
        # ... at the policy's rate (constant schedule), not the pilot's.
        rate = s["policies"]["recommended"]["learning_rate"]
        assert first["learning_rate"] == pytest.approx(rate, rel=1e-6)
        assert summary["train_time_s"] > start["seconds"] and summary["steps"] > start["step"]
    # The run's start state is the pilot's saved end state, loaded independently.
    ckpt = ocp.StandardCheckpointer()
    raw = ckpt.restore(os.path.join(where, runlog.CHECKPOINT_DIR, str(start["step"]), "state"))
    cfg = compare._run_config(c, s["policies"]["recommended"] | {"start_from": where}, 0,
                              {}, 10.0)  # fmt: skip
    setup = train.build_setup(cfg, data.load(cfg.data))
    os.makedirs(os.path.join(workdir, "probe"))
    log = runlog.RunLog(os.path.join(workdir, "probe"))
    state = train.start_from_pilot(cfg, setup, log)
    assert int(state.step) == log.step == start["step"]
    assert float(state.learning_rate) == pytest.approx(cfg.learning_rate)  # not the pilot's
    assert log.clock.total("train") == pytest.approx(start["seconds"])
    for a, x in zip(jax.tree.leaves(state.params), jax.tree.leaves(raw["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(x))
    assert train.batch_policy(cfg, setup, state, log).by_example  # the pilot's example stream
    # A continued run resumes from its own checkpoint (its start kept), never the pilot again.
    run = next(r for r in s["runs"] if r["policy"] == "recommended")
    cfg.start_from = run["start"]["checkpoint"]
    meta = runlog.Checkpoints(run["workdir"]).restore(setup.state)[1]
    assert meta["start"] == run["start"] and meta["step"] == run["steps"]

    def no_pilot(*args):
        raise AssertionError("started from the pilot again")

    monkeypatch.setattr(train, "start_from_pilot", no_pilot)
    again = train.train_and_evaluate(cfg, run["workdir"])
    assert again["start"] == run["start"] and again["steps"] == run["steps"]


@pytest.mark.timeout(300)
def test_policies_each_train_once_to_the_smoothed_target_with_best_measured(
    tradeoff_run, monkeypatch
):
    root, trade = tradeoff_run
    workdir = os.path.join(root, "policies")
    shutil.copytree(os.path.join(root, "tradeoff", "sweep"), os.path.join(workdir, "sweep"))
    c = smoke_config("adaptive")  # the same runner as --config.mode=compare
    c.compare.policies = ("best_measured", "default", "adaptive", "recommended")
    c.compare.tradeoff_summary = os.path.join(root, "tradeoff", compare.SUMMARY_FILE)
    c.compare.seeds = (0, 1)
    c.compare.give_up_factor = None
    c.eval_examples = 128  # of the 256 test images; compare.eval_examples None: the runs' own
    s = cifar10.run(c, workdir)
    assert s["mode"] == "compare" and s["measurement_time_s"] < 1.0  # measurements reused
    assert s["mesh"] == runlog.read_json(os.path.join(workdir, "sweep", sweep.SWEEP_FILE))["mesh"]
    t = c.compare.target_accuracy
    assert s["eval_examples"] == 128
    assert s["standard_error_points"] == pytest.approx(100 * math.sqrt(t * (1 - t) / 128))
    # Its sweep ran no training: no (empty) tradeoff chart, the tradeoff run's one removed.
    sw = runlog.read_json(os.path.join(workdir, "sweep", sweep.SWEEP_FILE))
    assert sw["plots"]["tradeoff.png"].startswith("not drawn: no training to the target")
    assert not os.path.exists(os.path.join(workdir, "sweep", "tradeoff.png"))
    with open(os.path.join(workdir, compare.SUMMARY_FILE)) as f:  # strict: no NaN/Infinity
        assert json.loads(f.read(), parse_constant=pytest.fail) == s
    other = copy.deepcopy(c)  # the tradeoff run of another model is not this one's best
    other.model.widths = (8,)
    with pytest.raises(UserError, match=r"another setup \(model.widths: \[16\] -> \[8\]\)"):
        compare.plan_policies(
            other, workdir, runlog.read_json(os.path.join(workdir, "sweep", sweep.SWEEP_FILE))
        )
    # best_measured: the tradeoff point with the least device time; every rate by one rule.
    reached = [p for p in trade["points"] if p["reached"]]
    if reached:
        best = min(reached, key=lambda p: p["device_time_to_target_s"])["batch_size"]
        assert s["policies"]["best_measured"]["batch_size"] == best
    else:
        assert "best_measured" in s["skipped"]
    for p, plan in s["policies"].items():
        if p != "adaptive":  # smoke: Adam, default batch 32 at 3e-3, square-root rule
            assert plan["learning_rate"] == pytest.approx(3e-3 * math.sqrt(plan["batch_size"] / 32))
    assert [(r["policy"], r["seed"]) for r in s["runs"]] == [
        (p, seed) for seed in (0, 1) for p in s["policies"]
    ]
    step_time = {int(b): v["step_time_s"] for b, v in s["timing"].items()}
    for r in s["runs"]:
        rows = runlog.read_jsonl(os.path.join(r["workdir"], runlog.METRICS_FILE))
        # One training loop: a fixed batch policy for all but the schedule's runs.
        run_config = runlog.read_json(os.path.join(r["workdir"], runlog.CONFIG_FILE))
        assert run_config["adaptive"]["enabled"] == (r["policy"] == "adaptive")
        trained = [x for x in rows if "start" not in x]  # the gns run's first row: the pilot
        assert (r["policy"] == "adaptive") or {x["batch_size"] for x in trained} == {
            r["batch_size"]
        }
        steps = [x["step"] for x in rows]
        assert steps == sorted(set(steps))
        # One training: it stopped once, on its last row (no budget segments resumed).
        assert [x["step"] for x in rows if "stop_reason" in x] == [steps[-1]]
        assert rows[-1]["stop_reason"] != "target_accuracy" or r["reached"]
        evals = [x for x in rows if "test_accuracy" in x]
        acc = [x["test_accuracy"] for x in evals]
        means = [np.mean(acc[i - 1 : i + 1]) for i in range(1, len(acc))]  # window 2
        hit = next((i + 1 for i, m in enumerate(means) if m >= s["target_accuracy"]), None)
        assert r["reached"] == (hit is not None)
        assert r["best_smoothed_accuracy"] == (pytest.approx(max(means)) if means else None)
        if hit is None:
            assert r["device_time_to_target_s"] is None and r["time_to_target_s"] is None
            continue
        at = evals[hit]
        assert r["steps_to_target"] == at["step"]
        assert r["time_to_target_s"] == pytest.approx(at["wall_time_s"] + r["measurement_s"])
        assert at is rows[-1]  # the training stopped at the smoothed crossing itself
        upto = [x for x in rows if x["step"] <= at["step"]]
        n = np.diff([0] + [x["step"] for x in upto])
        expected = sum(k * step_time[x["batch_size"]] for k, x in zip(n, upto, strict=True))
        expected += r["measurement_s"]
        assert r["device_time_to_target_s"] == pytest.approx(expected, rel=1e-9)
    assert s["verdict"] == common.to_json(compare.verdict(s["runs"], s["target_accuracy"]))
    _the_gns_run_continues_the_pilot(c, s, workdir, monkeypatch)
    ad = [r for r in s["runs"] if r["policy"] == "adaptive"]
    changes = ad[0]["schedule"]["changes"]
    assert s["schedule"]["changes"] == changes
    for change in changes:
        assert change["new_batch_size"] > change["old_batch_size"] and change["reason"]
    table = report.mode_summary(s)
    for r in s["runs"]:
        assert any(line.split()[:2] == [r["policy"], str(r["seed"])] for line in table.splitlines())
    assert table.count("\n".join(s["verdict"]["text"])) == 1
    assert table.count("recommended: went on from the pilot") == 1
    assert s["plot"] == os.path.join(workdir, compare.PLOT_FILE)
    assert os.path.getsize(s["plot"]) > 5000
    # One run directory (a TensorBoard run) per policy, batch, seed and run config, with its
    # event files.
    for r in s["runs"]:
        sizes = s["policies"][r["policy"]]["batch_size"] if r["policy"] != "adaptive" else None
        name = os.path.basename(r["workdir"])
        assert re.fullmatch(rf"{r['policy']}-B[0-9-]+-seed{r['seed']}-[0-9a-f]{{8}}", name)
        assert sizes is None or name.startswith(f"{r['policy']}-B{sizes}-seed{r['seed']}-")
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(r["workdir"]))
    _a_moved_compare_resumes_and_a_changed_one_stops_before_writing(c, s, workdir)


def _a_moved_compare_resumes_and_a_changed_one_stops_before_writing(c, s, workdir):
    moved = workdir + "-moved"
    shutil.move(workdir, moved)  # the pilot the recommended runs started from moves with it
    config_json = os.path.join(moved, "config.json")
    before = open(config_json).read()
    changed = copy.deepcopy(c)
    changed.compare.baseline_learning_rate = 0.5
    with pytest.raises(UserError, match=r"other training fields: learning_rate: 0.003 -> 0.5 "
                       r"\(compare.baseline_learning_rate\)"):  # fmt: skip
        cifar10.run(changed, moved)
    assert open(config_json).read() == before
    again = cifar10.run(c, moved)  # every run already complete: the same results
    assert [r["steps"] for r in again["runs"]] == [r["steps"] for r in s["runs"]]


def _row(b, t, fits=True, reason=""):
    return {"batch_size": b, "fits": fits, "step_time_s": t, "times_s": [t, 2 * t] if t else [],
            "reason": reason}  # fmt: skip


def test_timing_reads_the_sweeps_table_and_times_it_again_only_for_sizes_it_lacks(
    tmp_path, monkeypatch
):
    """t(B) of the policies: the sweep's rows when they hold every size; else the sweep's
    table timed again with the missing ones, once (kept in timing.json for a re-run); a size
    that does not fit is a UserError naming it."""
    mesh = {"devices": 1}
    swept = {"throughput": [_row(16, 0.1), _row(32, 0.2), _row(64, 0.5, fits=False)],
             "mesh": mesh}  # fmt: skip
    calls = []

    def measure(view, ds, task, extra):
        calls.append(list(extra))
        rows = [_row(16, 0.3), _row(24, 0.4), _row(32, 0.6), _row(64, None, False, "too big")]
        return {"rows": rows, "mesh": mesh}

    monkeypatch.setattr(sweep, "measure_throughput", measure)
    c, w = smoke_config("compare"), str(tmp_path)
    assert compare._timing(c, w, swept, None, [16, 32]) == {
        16: {"step_time_s": 0.1, "times_s": [0.1, 0.2]},
        32: {"step_time_s": 0.2, "times_s": [0.2, 0.4]},
    }
    assert calls == []
    for _ in range(2):  # the second call reads timing.json
        table = compare._timing(c, w, swept, None, [16, 24])
        assert {b: v["step_time_s"] for b, v in table.items()} == {16: 0.3, 24: 0.4}
    assert calls == [[16, 24]]
    with pytest.raises(UserError, match="64: 'too big'"):
        compare._timing(c, w, swept, None, [16, 64])


@pytest.mark.parametrize("b_noise, b_simple, g_sq", [(200.0, 300.0, 1.0), (None, 300.0, 1.0),
                                                    (None, None, 0.0)])  # fmt: skip
def test_plans_under_the_sgd_rule_share_the_recommendations_noise_scale(b_noise, b_simple, g_sq):
    """Every rate of the plans comes from the recommendation's noise scale (else B_simple), and
    the schedule, which starts below the default batch where the 'sgd' rule's rate needs it,
    carries it: its first rate is the one a fixed run gets at that batch. An unresolved noise
    scale (+inf, g_sq <= 0) makes the 'sgd' rule linear, so the schedule takes that rule."""
    config = cifar10_config.get_config("mlp_sgd")
    config.compare.policies = ("default", "adaptive", "largest_fits")
    rows = [dict(batch_size=b, fits=True, step_time_s=0.01 * b, accumulation_steps=1)
            for b in (16, 32, 64, 128)]  # fmt: skip
    rec = {"batch_size": 64, "accumulation_steps": 1, "b_noise": b_noise}
    measured = {"recommendation": rec, "throughput": rows, "measurement_cost_s": {
        "noise_scale": 3.0, "throughput[table]": 2.0}, "mesh": {"devices": 1},
        "noise_scale": {"b_simple": b_simple, "g_sq": g_sq}}  # fmt: skip
    plans, _, cands = compare.plan_policies(config, "unused", measured)
    fields, noise = plans["adaptive"]["adaptive"], b_simple if b_noise is None else b_noise
    noise = math.inf if noise is None else noise
    rule = "sgd" if noise < math.inf else "linear"
    assert (cands, fields["lr_rule"]) == ([16, 32, 64, 128], rule)
    assert fields["initial_noise_scale"] == (noise if rule == "sgd" else None)
    assert plans["adaptive"]["measurement_s"] == 2.0  # the timing table, not the noise scale
    config.adaptive.lr_rule = "constant"  # the user's rule, when given, is the schedule's
    plans_constant = compare.plan_policies(config, "unused", measured)[0]
    assert plans_constant["adaptive"]["adaptive"]["lr_rule"] == "constant"
    config.adaptive.lr_rule = None
    assert plans["largest_fits"]["learning_rate"] == pytest.approx(
        scaling.learning_rate("sgd", 0.01, 64, 128, noise)[0])  # fmt: skip
    config.adaptive.update(fields)
    first = adaptive.initial_state(config)
    rate = scaling.learning_rate("sgd", 0.01, 64, 16, noise)[0]
    assert float(first.lr_multiplier) * 0.01 == pytest.approx(rate, rel=1e-6)


def test_largest_fits_is_the_largest_in_the_configured_range_and_all_skipped_is_an_error():
    """A size the widening timed past throughput.max_batch_size (it follows the pick) is not
    the policy's batch; a compare whose every policy is skipped races nothing."""
    config = cifar10_config.get_config("mlp_sgd")
    config.compare.policies = ("default", "largest_fits")
    config.throughput.max_batch_size = 256
    rows = [dict(batch_size=b, fits=True, step_time_s=0.01 * b, accumulation_steps=1)
            for b in (64, 128, 256, 512)]  # fmt: skip
    measured = {"recommendation": {"batch_size": 256, "accumulation_steps": 1, "b_noise": 900.0},
                "throughput": rows, "measurement_cost_s": {}, "mesh": {"devices": 1},
                "noise_scale": {"b_simple": 900.0, "g_sq": 1.0}}  # fmt: skip
    plans, _, _ = compare.plan_policies(config, "unused", measured)
    assert plans["largest_fits"]["batch_size"] == 256
    config.compare.policies = ("best_measured",)  # no tradeoff summary: skipped
    with pytest.raises(UserError, match="every policy was skipped.*best_measured: no tradeoff"):
        compare.plan_policies(config, "/nonexistent-workdir", measured)


def test_the_schedules_candidates_on_three_devices_are_three_times_the_powers_of_two():
    """On 3 devices no power of two splits: the adaptive policy's candidates are the timed
    batches 3 x 2^k (the sweep's ladder there), not an error."""
    config = cifar10_config.get_config("mlp_sgd")
    config.compare.policies = ("default", "adaptive")
    rows = [dict(batch_size=b, fits=True, step_time_s=0.01 * b, accumulation_steps=1)
            for b in (24, 48, 64, 96, 192)]  # fmt: skip
    measured = {"recommendation": {"batch_size": 48, "accumulation_steps": 1, "b_noise": 100.0},
                "throughput": rows, "measurement_cost_s": {}, "mesh": {"devices": 3},
                "noise_scale": {"b_simple": 100.0, "g_sq": 1.0}}  # fmt: skip
    _, _, cands = compare.plan_policies(config, "unused", measured)
    assert cands == [24, 48, 96, 192]  # 64, the baseline, is not on the ladder
