"""Tests for the sweep driver: the smoke config end to end, on a tiny MLP (every key of
sweep.json, checked against independent recomputations), the command line, reuse of finished
measurements, the stage fingerprints, and the pure pieces (device time to target, ranking)."""

import json
import math
import os

import numpy as np
import pytest

from configs import cifar10 as cifar10_config
from configs import sweep as sweep_config
from experiments import report, runlog, sweep, tasks, validation
from experiments.cli import UserError
from gns import finder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_json(path):
    """Parse ``path`` with a parser that rejects NaN and Infinity (as strict parsers do)."""

    def reject(name):
        raise ValueError(f"{path} is not strict JSON: it contains {name}")

    with open(path) as f:
        return json.loads(f.read(), parse_constant=reject)


# The `smoke` config with a tiny MLP on 8-pixel synthetic images in place of its CNN (as
# tests/test_compare.py and tests/test_demo.py): every stage and key of the sweep is the same,
# and its programs compile in a fraction of the CNN's time. The MLP's step is predicted at
# ~91 kB per device at global batch 64 (16 per device) and ~105 kB at 128: a 98 kB budget, 7%
# from each, makes 64 the largest that fits on the 4 devices, 128 measured over it and 256
# accumulation.
# Its target: reached at every batch within a few evaluations (batch 8 at the second). No
# training plots (tests/test_plots.py and tests/test_lm.py draw them; the sweep's are drawn),
# and 50 refits of the tradeoff's bootstrap (each run of the sweep fits it again).
SMALL = {
    "plots": False,
    "tradeoff.num_bootstrap": 50,
    "model.name": "mlp",
    "model.widths": (16,),
    "data.synthetic.image_size": 8,
    "throughput.max_batch_size": 128,
    "throughput.memory_budget_bytes": 98_000,
    "tradeoff.target": 0.9,
}
SMALL_FLAGS = [f"--config.{field}={value}" for field, value in SMALL.items()]


def small_smoke():
    """``configs/sweep.py:smoke`` with :data:`SMALL` (the command line: :data:`SMALL_FLAGS`)."""
    config = sweep_config.get_config("smoke")
    config.update_from_flattened_dict(SMALL)
    return config


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke sweep (:func:`small_smoke`), run once in-process (the other tests reuse its
    workdir)."""
    workdir = str(tmp_path_factory.mktemp("sweep_smoke"))
    config = small_smoke()
    return config, workdir, sweep.run_sweep(config, workdir)


@pytest.mark.timeout(900)
def test_smoke_sweep_writes_every_key(smoke_run):
    config, workdir, _ = smoke_run
    s = strict_json(os.path.join(workdir, sweep.SWEEP_FILE))
    for name in (sweep.STATE_FILE, "config.json"):
        strict_json(os.path.join(workdir, name))
    assert {"platform", "kind", "count"} <= set(s["device"])
    assert s["device"]["platform"] == "cpu"
    for row in s["throughput"]:
        assert {"batch_size", "fits", "step_time_s", "examples_per_s", "predicted_bytes"} <= set(
            row
        )
    assert isinstance(s["max_batch_size"], int)
    assert {"b_simple", "interval"} <= set(s["noise_scale"])
    assert {"s_min", "e_min", "b_crit", "points"} <= set(s["tradeoff"])
    assert {
        "batch_size",
        "learning_rate",
        "accumulation_steps",
        "predicted_speedup_vs_baseline",
        "reason",
    } <= set(s["recommendation"])
    for name in ("throughput.png", "tradeoff.png", "time_to_target.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 5000, name
        assert s["plots"][name] == os.path.join(workdir, name)


@pytest.mark.timeout(300)
def test_throughput_memory_and_accumulation_are_consistent(smoke_run):
    config, _, s = smoke_run
    rows = {r["batch_size"]: r for r in s["throughput"]}
    budget = config.throughput.memory_budget_bytes
    max_b = s["max_batch_size"]
    # The largest that fits is the largest candidate predicted within the budget; the smoke
    # budget leaves at least one measured candidate out (predicted over it, never run).
    fitting = sorted(b for b, r in rows.items() if r["fits"])
    measured = sorted(b for b, r in rows.items() if r["predicted_bytes"] is not None)
    assert max_b == max(fitting) == max(b for b in measured if rows[b]["predicted_bytes"] <= budget)
    assert fitting == [b for b in measured if b <= max_b]
    assert all(rows[b]["predicted_bytes"] > budget for b in measured if b > max_b)
    assert max(measured) > max_b
    predicted = [rows[b]["predicted_bytes"] for b in (8, 16, 32, 64)]
    assert predicted == sorted(predicted) and len(set(predicted)) == 4  # grows with the batch
    for b, r in rows.items():
        assert r["examples_per_s"] == pytest.approx(b / r["step_time_s"])
        if b > max_b:  # gradient accumulation of k micro batches of the largest that fits
            k = math.ceil(b / max_b)
            assert r["accumulation_steps"] == k
            # Over the memory budget: False; above the range, never tried for memory: unknown.
            assert r["fits"] is (None if r["predicted_bytes"] is None else False)
            assert r["step_time_s"] == pytest.approx(k * rows[max_b]["step_time_s"])
        else:  # one interleaved table: every batch timed once per round (and re-timing
            # rounds when noisy), median
            assert len(r["times_s"]) == config.throughput.repeats + r["extra_rounds"]
            assert r["stable"] or r["extra_rounds"] == 10
            assert r["step_time_s"] == pytest.approx(float(np.median(r["times_s"])))
    # The configured candidates, the accumulation rows, and the batch the range was extended
    # to when the pick was at an end of it (timed in one new interleaved table with the others).
    ext = s["throughput_extended_to"]
    tp = config.throughput
    expected = set(finder.power_of_two_candidates(tp.min_batch_size, tp.max_batch_size))
    expected |= {f * max_b for f in tp.accumulation_factors} | ({ext} if ext else set())
    assert sorted(rows) == sorted(expected)
    assert ext is None or ext in (tp.min_batch_size // 2, 2 * max_b)


@pytest.mark.timeout(300)
def test_the_sweep_runs_on_the_mesh_and_records_it(smoke_run):
    """On the 4 simulated devices of tests/conftest.py: global batches, 4 x the per-device
    largest batch that fits, the mesh record of experiments.mesh in sweep.json."""
    import jax

    from experiments import mesh

    _, workdir, s = smoke_run
    n = jax.device_count()
    assert (
        s["mesh"]
        == mesh.describe(mesh.make_mesh())
        == strict_json(os.path.join(workdir, sweep.SWEEP_FILE))["mesh"]
    )
    assert (s["mesh"]["devices"], s["mesh"]["hosts"], s["mesh"]["shape"]) == (n, 1, {"batch": n})
    assert s["max_batch_size"] == n * s["max_batch_size_per_device"]
    for r in s["throughput"]:
        if r["fits"]:
            assert r["per_device_batch_size"] * n == r["batch_size"]
    assert s["skipped_batch_sizes"] == {} and s["skipped_trainings"] == {}


@pytest.mark.timeout(300)
def test_noise_scale_is_the_ratio_of_the_pilots_pooled_means(smoke_run):
    config, _, s = smoke_run
    n = s["noise_scale"]
    rows = n["pilot"]["rows"]
    assert len(rows) == n["num_used"] == config.noise.pilot_steps  # every step, all finite
    g, t = np.mean([r["g_sq"] for r in rows]), np.mean([r["trace_cov"] for r in rows])
    assert (n["g_sq"], n["trace_cov"]) == pytest.approx((g, t), rel=1e-6)
    assert n["b_simple"] == pytest.approx(t / g if g > 0 else math.inf, rel=1e-5)
    assert n["method"] == "per_example"  # the MLP has no BatchNorm
    lo, hi = n["interval"]
    assert lo <= n["b_simple"] <= (math.inf if hi is None else hi)  # null: unbounded above


@pytest.mark.timeout(300)
def test_noise_trajectory_is_pooled_from_the_pilots_own_measurements(smoke_run):
    from gns import critical

    config, workdir, _ = smoke_run
    n = strict_json(os.path.join(workdir, sweep.SWEEP_FILE))["noise_scale"]
    pilot, k = n["pilot"], config.noise.num_stretches
    assert pilot["steps"] == config.noise.pilot_steps and len(pilot["rows"]) == pilot["steps"]
    rows = n["trajectory"]
    assert len(rows) == k and all({"step", "b_simple", "low", "high"} <= set(r) for r in rows)
    width = pilot["steps"] / k
    for i, r in enumerate(rows):  # ratio of means of the stretch's own rows
        inside = [p for p in pilot["rows"] if i * width < p["step"] <= (i + 1) * width]
        want = np.mean([p["trace_cov"] for p in inside]) / np.mean([p["g_sq"] for p in inside])
        assert r["step"] == (i + 1) * width and r["b_simple"] == pytest.approx(want)
        assert r["low"] <= r["b_simple"] <= (math.inf if r["high"] is None else r["high"])
    # The effective value: ΔS_min-weighted mean, ΔS_min = ΔS_ref / (1 + B/B_ref), the last
    # stretch also standing for the rest of the planned run (tradeoff.max_steps).
    b = np.array([r["b_simple"] for r in rows])
    delta = np.full(k, width)
    delta[-1] += config.tradeoff.max_steps - pilot["steps"]
    s_min = delta / (1 + b / config.batch_size)
    assert n["effective"]["value"] == pytest.approx((s_min * b).sum() / s_min.sum())
    assert n["effective"]["basis"] == critical.BASIS_TRAJECTORY
    # Each measured step's training loss is kept; a pilot whose loss rose is said so.
    losses = [p["train_loss"] for p in pilot["rows"]]
    tail = losses[-max(1, len(losses) // 10) :]
    rec = strict_json(os.path.join(workdir, sweep.SWEEP_FILE))["recommendation"]
    rose = any("training loss rose" in w for w in rec["warnings"])
    assert all(math.isfinite(x) for x in losses) and rose == (np.mean(tail) > losses[0])


@pytest.mark.timeout(300)
def test_the_pilots_end_state_is_saved_for_the_run_to_go_on_from(smoke_run):
    """The pilot's state after its last step is the orbax checkpoint of its ``start`` record
    (loaded independently, bitwise the replayed pilot's), with the step, examples and training
    seconds the run continues from; without it the noise record does not count as measured."""
    import shutil

    import jax
    import orbax.checkpoint as ocp

    from experiments import data

    config, workdir, _ = smoke_run
    s = strict_json(os.path.join(workdir, sweep.SWEEP_FILE))
    pilot = s["noise_scale"]["pilot"]
    start = pilot["start"]
    fp = s["fingerprints"]["pilot"]  # its path's fields (not noise.confidence: the same states)
    assert start == {
        "from": "pilot",
        "checkpoint": os.path.join(sweep.PILOT_DIR, fp[:16]),
        "step": pilot["steps"],
        "examples": pilot["steps"] * config.batch_size,
        "seconds": start["seconds"],
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
    }
    # Its training seconds: the pilot's steps, without the compilations and the independent
    # batches measured at its warm-up step (both inside step_s).
    assert 0 < start["seconds"] < pilot["steps"] * pilot["step_s"]
    assert start["seconds"] < s["measurement_cost_s"]["noise_scale"]
    assert set(s["measurement_cost_s"]) >= {"noise_scale", "critical_batch", "throughput[table]"}
    where = os.path.join(workdir, start["checkpoint"], runlog.CHECKPOINT_DIR, str(start["step"]))
    saved = ocp.StandardCheckpointer().restore(os.path.join(where, "state"))
    plan = sweep.pipeline_plan(config)
    steps, state = sweep.pipeline_steps(config, data.load(config.data), tasks.get(config))
    replay = finder.run_pilot(
        state, steps.measure, steps.batch_fn, batch_size=plan.ref_batch_size,
        num_steps=plan.pilot_steps, every=plan.every,
        plain_step=steps.make_step(plan.ref_batch_size, 1.0),
    ).state  # fmt: skip
    assert int(saved["step"]) == start["step"]
    for field in ("params", "opt_state", "batch_stats"):
        want, got = jax.tree.leaves(getattr(replay, field)), jax.tree.leaves(saved[field])
        assert len(want) == len(got)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sweep.pilot_saved(workdir, s["noise_scale"])
    aside = os.path.join(workdir, "aside")
    shutil.move(where, aside)
    try:
        assert not sweep.pilot_saved(workdir, s["noise_scale"])
    finally:
        shutil.move(aside, where)


@pytest.mark.timeout(300)
def test_critical_batch_rows_and_the_recommendations_basis(smoke_run):
    from gns import critical

    config, workdir, _ = smoke_run
    s = strict_json(os.path.join(workdir, sweep.SWEEP_FILE))
    c, cc = s["critical_batch"], config.critical
    steps = finder.checkpoint_steps(config.noise.pilot_steps, cc.num_checkpoints)
    assert steps == [10, 30, 50] and [r["step"] for r in c["checkpoints"]] == steps
    for r in c["checkpoints"]:
        assert {"b_crit", "low", "high", "resolved"} <= set(r)
    sizes = [config.batch_size * 2**e for e in cc.exponents]
    assert c["batch_sizes"] == sizes and c["examples_per_fork"] == cc.fork_steps * max(sizes)
    forked = len(steps) * len(sizes) * cc.num_repeats * c["examples_per_fork"]
    assert c["examples_forked"] == forked
    assert c["cost_fraction"] == pytest.approx(
        forked / (config.noise.pilot_steps * config.batch_size)
    )
    # The path average weighs the resolved checkpoints only, each by its ΔS_min; the last
    # stands for the rest of the planned run.
    delta = critical.stretch_lengths(steps, end=config.tradeoff.max_steps)
    res = [(d, r["b_crit"]) for d, r in zip(delta, c["checkpoints"], strict=True) if r["resolved"]]
    eff = c["effective"]
    if len(res) >= 2:
        d, b = np.array(res).T
        w = d / (1 + b / config.batch_size)
        assert eff["value"] == pytest.approx((w * b).sum() / w.sum())
    # The basis is the best evidence measured, and every value is reported with its ratio.
    r = s["recommendation"]
    want = (
        "branched" if eff["basis"] == critical.BASIS_BRANCHED
        else "trajectory" if s["noise_scale"]["effective"]["basis"] == critical.BASIS_TRAJECTORY
        else "b_simple"
    )  # fmt: skip
    assert r["basis"] == want and set(r["evidence"]) == {"b_simple", "trajectory", "branched"}
    for name, value in (
        ("b_simple", s["noise_scale"]["b_simple"]),
        ("trajectory", s["noise_scale"]["effective"]["value"]),
        ("branched", eff["value"]),
    ):
        ev = r["evidence"][name]
        assert ev["value"] == pytest.approx(value)
        assert ev["ratio_to_basis"] == pytest.approx(value / r["b_noise"])


@pytest.mark.timeout(120)
def test_throughput_rows_are_global_batches_and_skip_what_does_not_split():
    """Memory is per device: global batch 4b on 4 devices is predicted exactly as batch b on
    one, so with one budget the largest batch that fits on 4 devices is 4 x that on one; a
    candidate that 4 does not divide is skipped, with the reason in its row."""
    import jax

    from experiments import data

    if jax.device_count() != 4:
        pytest.skip("needs the 4 simulated devices of tests/conftest.py")
    config = sweep_config.get_config("smoke")
    config.model.widths = (8,)  # per device ~0.12 MB at 2 examples, ~0.24 MB at 4
    config.throughput.update(warmup=0, repeats=1, memory_budget_bytes=200_000)
    ds = data.load(config.data)
    out = {}
    for n, lo, hi in ((1, 2, 4), (4, 8, 16)):
        config.update(num_devices=n, batch_size=lo)
        config.throughput.update(min_batch_size=lo, max_batch_size=hi)
        config.tradeoff.batch_sizes = (6,) if n == 4 else None
        view = sweep.stage_config(config, "throughput")
        extra = (2048,) if n == 1 else ()  # more than the 1,024 train examples
        out[n] = sweep.measure_throughput(view, ds, tasks.get(config), extra)
    one = {r["batch_size"]: r for r in out[1]["rows"]}
    four = {r["batch_size"]: r for r in out[4]["rows"]}
    assert out[1]["mesh"]["devices"] == 1 and out[4]["mesh"]["shape"] == {"batch": 4}
    assert sorted(one) == [2, 4, 2048] and sorted(four) == [6, 8, 16]
    assert one[2048]["skipped"] and one[2048]["step_time_s"] is None
    assert one[2048]["reason"].endswith("batch 2048 is larger than the 1024 train examples")
    assert out[1]["max_batch_size"] == 2 and out[4]["max_batch_size"] == 8 == 4 * 2
    assert out[4]["max_batch_size_per_device"] == 2
    assert four[8]["predicted_bytes"] == one[2]["predicted_bytes"] <= 200_000
    assert four[16]["predicted_bytes"] == one[4]["predicted_bytes"] > 200_000
    assert not (four[16]["fits"] or one[4]["fits"])
    assert four[8]["per_device_batch_size"] == 2 and four[8]["fits"]
    assert four[8]["examples_per_s"] == pytest.approx(8 / four[8]["step_time_s"])
    # 6 does not split over 4 devices: skipped, never compiled or timed.
    assert four[6]["skipped"] and four[6]["fits"] is None and four[6]["step_time_s"] is None
    assert four[6]["reason"] == "skipped: global batch 6 is not divisible by the 4 devices"


def test_the_pilot_replays_exactly():
    """The forks start from states of the pilot: replayed in another process (the noise record
    cached), they are bitwise those of the first run; unmeasured steps are the plain step."""
    import jax

    from experiments import data

    config = small_smoke()
    config.noise.update(pilot_steps=4, every=2)
    ds = data.load(config.data)
    plan = sweep.pipeline_plan(config)
    runs = []
    for _ in range(2):
        steps, state = sweep.pipeline_steps(config, ds, tasks.get(config))
        runs.append(finder.run_pilot(
            state, steps.measure, steps.batch_fn, batch_size=plan.ref_batch_size,
            num_steps=plan.pilot_steps, every=plan.every,
            plain_step=steps.make_step(plan.ref_batch_size, 1.0), checkpoint_steps=[3],
        ))  # fmt: skip
    (rows1, kept1), (rows2, kept2) = [(p.rows, p.checkpoints) for p in runs]
    assert rows1 == rows2 and [r["step"] for r in rows1] == [2, 4] and runs[0].steps == 4
    for a, b in zip(jax.tree.leaves(kept1[3]), jax.tree.leaves(kept2[3]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fork_steps_share_one_compiled_step_with_the_baked_rates_numbers():
    """The forks' rate is an argument of one jitted step: one executable per batch size for
    every multiplier, and a multiplier's trajectory bitwise that of a training step whose
    optimizer has the rate ``learning_rate × multiplier`` baked in."""
    import jax

    from experiments import data, models, train
    from gns import smoothing

    config = small_smoke()
    ds, task = data.load(config.data), tasks.get(config)
    steps, state = sweep.pipeline_steps(config, ds, task)
    batches = [steps.fork_batch_fn(16, i) for i in range(2)]
    model = models.get_model(config.model, num_classes=ds.num_classes, dtype=config.dtype)
    baked_config = config.copy_and_resolve_references()
    baked_config.learning_rate = config.learning_rate * 2.0
    schedule = train.make_schedule(baked_config, config.tradeoff.max_steps)
    plain, _ = train.make_train_steps(
        model, train.make_optimizer(baked_config, schedule), smoothing.ema(),
        method="per_example", schedule=schedule, loss=task.loss,
    )  # fmt: skip
    a, b = state, state._replace(learning_rate=1.0)  # 1: the optimizer's own rate
    for batch in batches:
        a, b = steps.make_step(16, 2.0)(a, batch), jax.jit(plain)(b, batch)[0]
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps.make_step(16, 0.5)(state, batches[0])
    assert steps.make_step(16, 0.5).func._cache_size() == 1  # both multipliers, one executable


@pytest.mark.timeout(300)
def test_trainings_and_fit_match_the_runs_on_disk(smoke_run):
    config, workdir, s = smoke_run
    t = s["tradeoff"]
    target = config.tradeoff.target
    base_lr, base_b = config.learning_rate, config.batch_size
    assert [p["batch_size"] for p in t["points"]] == list(config.tradeoff.batch_sizes)
    for p in t["points"]:
        b = p["batch_size"]
        # Adam: square-root scaling from the reference batch.
        assert p["learning_rate"] == pytest.approx(base_lr * math.sqrt(b / base_b))
        assert p["workdir"].startswith(os.path.join(workdir, "train"))
        rows = runlog.read_jsonl(os.path.join(p["workdir"], runlog.METRICS_FILE))
        evals = [r for r in rows if "test_accuracy" in r]
        first = next((r["step"] for r in evals if r["test_accuracy"] >= target), None)
        assert p["steps"] == first
        assert p["reached"] == (first is not None)
        # Time to target two ways: wall clock of the run, and steps x t(B) from the table.
        t_b = next(r["step_time_s"] for r in s["throughput"] if r["batch_size"] == b)
        assert p["step_time_s"] == t_b
        if p["reached"]:
            assert p["device_time_to_target_s"] == pytest.approx(first * t_b)
            assert p["time_to_target_s"] > 0
    ranked = s["time_to_target"]
    device = {p["batch_size"]: p["device_time_to_target_s"] for p in t["points"] if p["reached"]}
    assert [r["batch_size"] for r in ranked] == sorted(device, key=device.get)
    assert ranked[0]["device_over_best"] == 1.0
    assert s["measured_time_to_target"] == {str(b): v for b, v in device.items()}
    reached = [p for p in t["points"] if p["reached"]]
    assert len(reached) >= 3, t  # the smoke target is within reach at every batch
    assert t["b_crit"] == pytest.approx(t["e_min"] / t["s_min"])
    lo, hi = t["intervals"]["b_crit"]
    assert lo <= t["b_crit"] <= hi
    # The fit describes the points to within the noise of a handful of evaluations.
    for p in reached:
        pred = t["s_min"] + t["e_min"] / p["batch_size"]
        assert pred == pytest.approx(p["steps"], rel=0.5)


@pytest.mark.timeout(300)
def test_recommendation_is_the_argmin_of_predicted_time(smoke_run):
    config, _, s = smoke_run
    r = s["recommendation"]
    n = r["b_noise"]  # the value of the basis (the best evidence measured)
    assert n == pytest.approx(r["evidence"][r["basis"]]["value"])
    # Independent recomputation over the throughput table (accumulated rows included).
    times = {row["batch_size"]: row["step_time_s"] for row in s["throughput"]}
    times.setdefault(config.batch_size, times.get(config.batch_size))
    cost = {b: (1 + n / b) * t for b, t in times.items()}
    best = min(cost, key=lambda b: (cost[b], b))
    assert r["batch_size"] == best
    assert r["accumulation_steps"] == math.ceil(best / s["max_batch_size"])
    assert r["predicted_speedup_vs_baseline"] == pytest.approx(cost[config.batch_size] / cost[best])
    assert r["learning_rate"] == pytest.approx(
        config.learning_rate * math.sqrt(best / config.batch_size)
    )
    assert r["reason"].startswith(f"Batch {best}")


@pytest.mark.timeout(300)
def test_rerun_reuses_what_was_measured(smoke_run, monkeypatch):
    config, workdir, first = smoke_run
    state_path = os.path.join(workdir, sweep.STATE_FILE)
    state = runlog.read_json(state_path)
    # Simulate an interruption after the noise scale and two trainings, before the timing
    # table was stored.
    del state["sections"]["throughput"]["table"]
    del state["sections"]["trainings"]["32"]
    runlog.write_json(state_path, state)
    # And change fields no stage's measurement reads: the fit's bootstrap, the objective.
    config = small_smoke()
    config.tradeoff.num_bootstrap = 100
    config.recommend.objective = "cost"

    calls = {"throughput": 0, "training": [], "noise": 0}
    real_tp, real_train = sweep.measure_throughput, sweep.run_training

    def count_tp(view, ds, task, extra=()):
        calls["throughput"] += not extra  # (an extension of the range past the pick: apart)
        return real_tp(view, ds, task, extra)

    def count_train(cfg, wd, rule):
        calls["training"].append(cfg.batch_size)
        return real_train(cfg, wd, rule)

    def no_noise(*args, **kwargs):  # the pilot: neither the noise scale nor the forks rerun
        calls["noise"] += 1
        raise AssertionError("the pilot ran again")

    monkeypatch.setattr(sweep, "measure_throughput", count_tp)
    monkeypatch.setattr(sweep, "run_training", count_train)
    monkeypatch.setattr(finder, "run_pilot", no_noise)
    again = sweep.run_sweep(config, workdir)
    assert calls == {"throughput": 1, "training": [32], "noise": 0}
    assert again["noise_scale"] == first["noise_scale"]
    assert again["remeasured_after_config_change"] == []
    # The training at 32 resumed from its final checkpoint: same steps to target.
    p_first = {p["batch_size"]: p for p in first["tradeoff"]["points"]}
    p_again = {p["batch_size"]: p for p in again["tradeoff"]["points"]}
    assert p_again[32]["steps"] == p_first[32]["steps"]
    for b in (8, 16):  # reused as measured; device time from the new table
        assert p_again[b]["steps"] == p_first[b]["steps"]
        assert p_again[b]["time_to_target_s"] == p_first[b]["time_to_target_s"]
    assert {"noise_scale[value]", "trainings[8]", "trainings[16]"} <= set(again["reused"])
    tables = set(runlog.read_json(state_path)["sections"]["throughput"])
    assert "table" in tables and all(k.startswith("extended_to_") for k in tables - {"table"})


@pytest.mark.timeout(300)
def test_second_seed_at_the_fastest_batches_and_the_validation_block(smoke_run, monkeypatch):
    config, workdir, _ = smoke_run
    config = small_smoke()
    config.tradeoff.update(extra_seeds=1, reseed_best=1)
    trained = []
    real_train = sweep.run_training

    def count_train(cfg, wd, rule):
        trained.append((cfg.batch_size, cfg.seed))
        return real_train(cfg, wd, rule)

    monkeypatch.setattr(sweep, "run_training", count_train)
    s = sweep.run_sweep(config, workdir)
    # Only the new seed at the fastest batch (by device time, on this sweep's timing table)
    # trains; the first seed's trainings are reused.
    dev0 = {p["batch_size"]: p["device_time_to_target_s"] for p in s["tradeoff"]["points"]
            if p["seed"] == config.seed and p["reached"]}  # fmt: skip
    fastest = min(dev0, key=lambda b: (dev0[b], b))
    assert trained == [(fastest, config.seed + 1)]
    assert s["tradeoff"]["reseeded"] == [fastest]
    pts = [p for p in s["tradeoff"]["points"] if p["batch_size"] == fastest]
    assert sorted(p["seed"] for p in pts) == [config.seed, config.seed + 1]
    row = next(r for r in s["tradeoff"]["by_batch"] if r["batch_size"] == fastest)
    dev = [p["device_time_to_target_s"] for p in pts if p["reached"]]
    if len(dev) == 2:
        assert row["device_time_to_target_s"] == pytest.approx(np.mean(dev))
        assert row["device_time_range"] == pytest.approx([min(dev), max(dev)])
    # The fit uses every training, both seeds included.
    assert len(s["tradeoff"]["points"]) == len(config.tradeoff.batch_sizes) + 1
    # Validation: every basis measured, each pick read against the trainings independently.
    v = s["validation"]
    assert set(v["by_basis"]) == set(s["recommendation"]["evidence"]) | {"tradeoff_fit"}
    assert (
        v["by_basis"][s["recommendation"]["basis"]]["batch_size"]
        == s["recommendation"]["batch_size"]
    )
    means = {r["batch_size"]: r["device_time_to_target_s"] for r in s["tradeoff"]["by_batch"]
             if r["reached"]}  # fmt: skip
    best = min(means, key=lambda b: (means[b], b))
    assert v["best_measured"]["batch_size"] == best
    for r in v["by_basis"].values():
        b = r["batch_size"]
        if b is None:  # a basis that gave no number (e.g. unresolved branched forks)
            continue
        if b in means:
            assert r["trained"] and r["over_best"] == pytest.approx(means[b] / means[best])
        else:  # interpolated on the fitted curve: S(B) t(B)
            t_b = next(x["step_time_s"] for x in s["throughput"] if x["batch_size"] == b)
            fit = s["tradeoff"]
            pred = (fit["s_min"] + fit["e_min"] / b) * t_b
            assert not r["trained"] and r["over_best"] == pytest.approx(pred / means[best])
    out = report.sweep_summary(s)
    assert "validation (device time to target over the best measured" in out
    assert f"batch {v['by_basis']['tradeoff_fit']['batch_size']:>5}" in out


# User mistakes on the command line: one line, exit code 2, no traceback (each rule's message
# in-process: test_validate_config_names_the_field).
MISTAKES = {"--config.noise.pilot_steps=1": "config.noise.pilot_steps=1 must be an int >= 2"}


@pytest.mark.timeout(300)
def test_command_line_reuses_per_stage_and_a_config_mistake_is_one_line(
    smoke_run, tmp_path, commands
):
    """The command line, each command in its own process (one batch: tests/conftest.py,
    ``run_commands``): on the finished smoke workdir with a change to the noise-scale stage
    only (the interval's confidence), it measures the noise scale again -- to the same
    b_simple, deterministic on CPU -- and reuses the step times and the trainings (whose
    learning rates depend on b_simple); each config mistake exits 2 with one line, before
    anything is written."""
    _, workdir, first = smoke_run
    args = ["--config", "configs/sweep.py:smoke", *SMALL_FLAGS]
    jobs = [("experiments.sweep", [*args, f"--workdir={tmp_path / str(i)}", flag], REPO)
            for i, flag in enumerate(MISTAKES)]  # fmt: skip
    jobs.append(("experiments.sweep", [*args, f"--workdir={workdir}",
                                       "--config.noise.confidence=0.8"], REPO))  # fmt: skip
    *mistakes, out = commands(jobs, tmp_path)
    for i, (bad, message) in enumerate(zip(mistakes, MISTAKES.values(), strict=True)):
        assert bad.returncode == 2, bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr
        errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], bad.stderr
        assert not (tmp_path / str(i)).exists()  # validated before anything is written
    assert out.returncode == 0, out.stderr[-3000:]
    assert "recommended batch size:" in out.stdout and "noise scale b_simple" in out.stdout
    s2 = strict_json(os.path.join(workdir, sweep.SWEEP_FILE))
    assert s2["remeasured_after_config_change"] == ["noise_scale"]
    assert "noise_scale[value]" not in s2["reused"]
    assert s2["noise_scale"]["confidence"] == 0.8
    assert s2["noise_scale"]["b_simple"] == pytest.approx(first["noise_scale"]["b_simple"])
    assert {"throughput[table]", "trainings[8]", "trainings[32]"} <= set(s2["reused"])
    assert s2["fingerprints"]["noise_scale"] != first["fingerprints"]["noise_scale"]
    assert s2["fingerprints"]["throughput"] == first["fingerprints"]["throughput"]
    assert s2["fingerprints"]["trainings"] == first["fingerprints"]["trainings"]


def test_throughput_candidates_and_spread():
    config = sweep_config.get_config("cpu")
    config.batch_size = 24
    config.throughput.update(min_batch_size=12, max_batch_size=100)
    config.tradeoff.batch_sizes = (48, 200)  # 200: above the largest candidate, not timed
    view = sweep.stage_config(config, "throughput")
    assert sweep.throughput_candidates(view) == [16, 24, 32, 48, 64]
    # On 3 devices (or 12 ghost-BatchNorm groups) the ladder is 3 (12) times the powers of two:
    # a power of two would split over none of them.
    assert sweep.throughput_candidates(view, 3) == [12, 24, 48, 96]
    assert sweep.throughput_candidates(view, 12) == [12, 24, 48, 96]
    config = sweep_config.get_config("cpu")
    config.tradeoff.update(batch_sizes=None, max_runs=3, min_batch_size=16)
    fitting = [8, 16, 32, 64, 128, 256, 512, 1024]
    assert sweep.train_batch_sizes(config, fitting) == [16, 128, 1024]
    config.tradeoff.max_runs = 5
    assert sweep.train_batch_sizes(config, [16, 32]) == [16, 32]


# ---------------------------------------------------------------------------------------------
# Stage fingerprints cover exactly the fields each stage reads.


def _fps(config):
    fps = {s: sweep.stage_fingerprint(config, s) for s in sweep.STAGE_FIELDS}
    cfg, _ = sweep.training_config(config, 32, 100.0)
    fps["trainings"] = sweep.training_fingerprint(cfg, 1)
    return fps


@pytest.mark.parametrize(
    "field, value, changed",
    [
        # Fields no stage measures with: every cached measurement is kept.
        ("tradeoff.num_bootstrap", 70, set()),
        ("tradeoff.max_runs", 2, set()),
        ("recommend.objective", "cost", set()),
        ("throughput.accumulation_factors", (8,), set()),
        ("compilation_cache", False, set()),
        ("data.cache_dir", "/elsewhere", set()),  # where the decoded data is kept
        # Read by one stage only (not the pilot's path: its states are the same).
        ("noise.confidence", 0.8, {"noise_scale"}),
        ("throughput.repeats", 9, {"throughput"}),
        ("tradeoff.batch_sizes", (8, 16), {"throughput"}),
        ("tradeoff.target", 0.3, {"trainings"}),
        ("eval_examples", 128, {"trainings"}),
        # Read by two or all three.
        ("critical.num_repeats", 3, {"critical_batch"}),
        ("noise.num_stretches", 2, {"noise_scale"}),
        ("noise.pilot_steps", 30, {"pilot", "noise_scale", "critical_batch"}),
        ("noise.every", 2, {"pilot", "noise_scale", "critical_batch"}),
        ("tradeoff.max_steps", 300, {"pilot", "noise_scale", "critical_batch", "trainings"}),
        ("learning_rate", 1e-3, {"pilot", "noise_scale", "critical_batch", "trainings"}),
        ("seed", 1, {"pilot", "noise_scale", "critical_batch", "trainings"}),
        (
            "model.widths",
            (4, 8),
            {"pilot", "noise_scale", "critical_batch", "throughput", "trainings"},
        ),
        (
            "data.num_train",
            512,
            {"pilot", "noise_scale", "critical_batch", "throughput", "trainings"},
        ),
        (
            "dtype",
            "bfloat16",
            {"pilot", "noise_scale", "critical_batch", "throughput", "trainings"},
        ),
        ("num_devices", 2, {"throughput"}),  # a training's key holds the count it runs on
        (  # the measuring step's memory (the pilot's), and the trainings' steps
            "gns_chunk_size",
            8,
            {"pilot", "noise_scale", "critical_batch", "throughput", "trainings"},
        ),
    ],
)
def test_stage_fingerprints_change_exactly_with_the_fields_the_stage_reads(field, value, changed):
    config = sweep_config.get_config("smoke")
    before = _fps(config)
    *parents, last = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[last] = value
    after = _fps(config)
    assert {s for s in before if before[s] != after[s]} == changed


def test_num_devices_none_and_the_count_it_resolves_to_key_the_same_measurements():
    """With the mesh record in the key, num_devices=None and the count of devices it resolves
    to are the same timing and the same trainings; another count is another mesh."""
    from experiments import mesh as mesh_lib

    config = sweep_config.get_config("smoke")

    def keys(n, mesh_size):
        config.num_devices = n
        mesh = mesh_lib.describe(mesh_lib.make_mesh(mesh_size))
        cfg, _ = sweep.training_config(config, 32, 100.0)
        fp = sweep.stage_fingerprint(config, "throughput", mesh)
        return fp, sweep.training_fingerprint(cfg, mesh_size)

    assert keys(None, 1) == keys(1, 1) != keys(2, 2)


def test_the_sweep_refuses_the_across_devices_estimator():
    """The sweep's pilot and forks run on one device: its estimator cannot be across_devices
    (said up front, not as 'this run has 1 device' on a mesh of 4)."""
    config = sweep_config.get_config("smoke")
    config.gns_method = "across_devices"
    with pytest.raises(UserError, match="config.gns_method='across_devices': the sweep's pilot"):
        sweep.validate_config(config)


def test_every_key_holds_the_data_content():
    """Other content behind the same data fields (a corpus rewritten in place) is measured and
    trained again: each stage's key and each training's hold the task's data record."""
    config = sweep_config.get_config("smoke")
    cfg, _ = sweep.training_config(config, 32, 100.0)
    a, b = {"sha256": "95935362"}, {"sha256": "2051b0b0"}
    for stage in sweep.STAGE_FIELDS:
        assert sweep.stage_fingerprint(config, stage, data=a) != sweep.stage_fingerprint(
            config, stage, data=b
        )
    assert sweep.training_fingerprint(cfg, 1, a) != sweep.training_fingerprint(cfg, 1, b)
    assert sweep.critical_fingerprint(config, 50.0, a) != sweep.critical_fingerprint(
        config, 50.0, b
    )


def test_stage_config_holds_only_the_listed_fields():
    config = sweep_config.get_config("smoke")
    view = sweep.stage_config(config, "throughput")
    setup = set(sweep.TRAIN_SETUP.split()) | {"batch_size", "num_devices"}
    assert set(view) == setup | {"tradeoff", "throughput"}
    assert set(view.tradeoff) == {"batch_sizes"}
    assert "learning_rate" not in view and "seed" not in view
    # Reading a field the stage did not declare fails loudly instead of escaping the cache key.
    with pytest.raises(AttributeError):
        _ = view.learning_rate


def test_the_sweep_config_is_the_training_config_without_the_modes():
    config = sweep_config.get_config("smoke")
    assert "compare" not in config and "mode" not in config
    reference = cifar10_config.get_config("smoke")
    for key in ("model", "optimizer", "gns_method", "eval_batch_size"):
        assert config[key] == reference[key], key
    # The compare modes: changing a compare-only field keeps every measurement stage's key.
    c = cifar10_config.get_config("smoke")
    fps = {s: sweep.stage_fingerprint(c, s) for s in sweep.STAGE_FIELDS}
    c.compare.give_up_factor = 9.0
    c.compare.max_epochs = 3.0
    c.compare.baseline_learning_rate = 1e-2
    again = {s: sweep.stage_fingerprint(c, s) for s in fps}
    assert again == fps


# ---------------------------------------------------------------------------------------------
# Time to target two ways: pure pieces.


def test_device_time_is_steps_times_the_tables_step_time():
    points = [
        {"batch_size": 16, "steps": 300, "time_to_target_s": 9.0},
        {"batch_size": 32, "steps": 100, "time_to_target_s": 8.0},
        {"batch_size": 64, "steps": None, "time_to_target_s": None},
        {"batch_size": 128, "steps": 40, "time_to_target_s": 5.0},
    ]
    times = {16: 0.01, 32: 0.03, 64: 0.05}
    out = sweep.with_device_time(points, times, max_batch=64)
    assert [p["step_time_s"] for p in out] == [0.01, 0.03, 0.05, 0.1]  # 128: 2 x t(64)
    dev = [p["device_time_to_target_s"] for p in out]
    assert dev[0] == pytest.approx(3.0) and dev[1] == pytest.approx(3.0)
    assert dev[2] is None and dev[3] == pytest.approx(4.0)
    assert "device_time_to_target_s" not in points[0]  # copies
    by_batch = validation.mean_over_seeds([p | {"reached": p["steps"] is not None} for p in out])
    ranked = sweep.ranking(by_batch)
    # The busy-machine case: batch 128 had the best wall clock, but not the best device time.
    assert [(r["batch_size"], r["rank"]) for r in ranked] == [(16, 1), (32, 1), (128, 3)]
    assert ranked[2]["device_over_best"] == pytest.approx(4.0 / 3.0)
    assert [r["wall_over_best"] for r in ranked] == pytest.approx([9.0 / 5.0, 8.0 / 5.0, 1.0])
    keys = "batch_size rank device_time_to_target_s time_to_target_s"
    assert set(ranked[0]) == {*keys.split(), "device_over_best", "wall_over_best"}
    assert sweep.ranking(validation.mean_over_seeds([out[2] | {"reached": False}])) == []


def test_a_stored_stage_whose_files_are_gone_is_measured_again_not_reused(tmp_path):
    sweep.SweepState(str(tmp_path)).put("noise_scale", "value", "fp", {"b_simple": 1.0})
    state = sweep.SweepState(str(tmp_path))
    assert state.get("noise_scale", "value", "fp", valid=lambda value: False) is None
    assert state.reused == [] and state.stale == []
    assert state.get("noise_scale", "value", "fp") == {"b_simple": 1.0}
    assert state.reused == ["noise_scale[value]"]


def test_noise_scale_read_back_from_strict_json():
    assert sweep.noise_scale_value({"b_simple": 12.5, "g_sq": 1.0}) == 12.5
    assert sweep.noise_scale_value({"b_simple": None, "g_sq": -0.1}) == math.inf
    assert math.isnan(sweep.noise_scale_value({"b_simple": None, "g_sq": None}))


@pytest.mark.parametrize(
    "optimizer, momentum, fork_steps, needed",
    [("sgd", 0.9, 8, 30), ("sgd", 0.9, 30, None), ("sgd", 0.0, 2, None), ("adam", 0.0, 8, 30)],
)
def test_forks_shorter_than_the_momentum_memory_are_named(optimizer, momentum, fork_steps, needed):
    config = small_smoke()
    config.update(optimizer=optimizer, momentum=momentum)
    config.critical.fork_steps = fork_steps
    warning = sweep.fork_warning(config)
    assert (warning is None) == (needed is None)
    if needed:
        assert f"= {needed} steps (--config.critical.fork_steps)" in warning


def test_bad_data_stops_the_sweep_before_its_workdir_is_claimed(tmp_path, caplog):
    config = sweep_config.get_config("smoke")
    config.data.update(source="folder", path=str(tmp_path / "nothing.tar.gz"))
    with pytest.raises(UserError, match="nothing.tar.gz"):
        sweep.run_sweep(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # not claimed: a training may use it


def test_validate_config_names_the_field():
    config = sweep_config.get_config("smoke")
    config.throughput.min_batch_size = 512
    with pytest.raises(ValueError, match="throughput.min_batch_size=512, config.throughput."
                       "max_batch_size=256: throughput.min_batch_size must be <="):  # fmt: skip
        sweep.validate_config(config)
    config = sweep_config.get_config("smoke")
    config.tradeoff.target = 1.5
    with pytest.raises(UserError, match=r"config.tradeoff.target=1.5: the trainings run to it "
                       r"as target_accuracy: a number in \[0, 1\]") as e:  # fmt: skip
        sweep.validate_config(config)
    assert "\n" not in str(e.value)  # the command line prints it as one line
    config = sweep_config.get_config("smoke")
    config.noise.update(pilot_steps=10, every=6)
    with pytest.raises(UserError, match=r"pilot_steps=10, config.noise.every=6: the pilot "
                       "measures every noise.every steps"):  # fmt: skip
        sweep.validate_config(config)


def test_forks_that_the_ghost_batchnorm_groups_cannot_split_stop_the_sweep_up_front(tmp_path):
    config = small_smoke()
    config.model.update(name="resnet", stage_sizes=(1, 1), num_filters=4)
    config.update(gns_microbatches=16, batch_size=16)
    config.critical.update(num_checkpoints=2, exponents=(-1, 0, 1))
    with pytest.raises(UserError, match=r"the pilot's and the forks' batches \[8\] .* do not "
                       "split into config.gns_microbatches=16"):  # fmt: skip
        sweep.run_sweep(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_a_training_that_diverges_is_a_point_that_missed_not_the_end_of_the_sweep(tmp_path):
    config = small_smoke()
    cfg, rule = sweep.training_config(config, 16, 100.0)
    cfg.learning_rate = 1e30  # diverges at once
    p = sweep.run_training(cfg, str(tmp_path / "train"), rule)
    assert p["stop_reason"] == "diverged" and not p["reached"] and p["steps"] is None


def test_a_diverged_noise_stage_is_a_clear_error_not_a_number(tmp_path):
    config = sweep_config.get_config("smoke")
    config.learning_rate = 1e30  # finite and positive: passes validation, then diverges
    config.data.num_train = 128
    config.data.synthetic.image_size = 8  # a tiny MLP: steps that compile at once
    config.model.update(name="mlp", widths=(16,))
    config.noise.pilot_steps = 6
    with pytest.raises(UserError, match=r"could not be measured: the pilot \(batch 16\) diverged"):
        sweep.run_sweep(config, str(tmp_path), trainings=False)


def test_a_pilot_or_fork_batch_beyond_the_train_set_is_refused_before_anything_is_written(tmp_path):
    """On 24 train examples the pilot at 16 and its forks up to 32 would repeat examples in
    every batch: a noise scale of that is not one of the data."""
    config = sweep_config.get_config("smoke")
    config.data.num_train = 24
    with pytest.raises(UserError, match=r"go up to 32, more than the 24 train examples"):
        sweep.run_sweep(config, str(tmp_path / "sweep"), trainings=False)
    assert not (tmp_path / "sweep").exists()


def test_trainings_none_of_which_can_run_on_the_mesh_are_refused_up_front(tmp_path):
    config = sweep_config.get_config("smoke")  # 4 simulated devices
    config.tradeoff.batch_sizes = (6, 10)
    with pytest.raises(UserError, match=r"none of config.tradeoff.batch_sizes=\(6, 10\) can"):
        sweep.run_sweep(config, str(tmp_path / "sweep"))
    assert not (tmp_path / "sweep").exists()


def test_a_fit_of_trainings_that_all_reached_the_target_at_their_first_evaluation_is_refused():
    """Steps to the target that are all the first evaluation's measure the evaluation interval,
    not the tradeoff (a B_crit of 1e10 was fitted to them)."""

    def point(b, steps, first):
        return {"batch_size": b, "seed": 0, "steps": steps, "reached": True,
                "curve": [[first, 0.5], [2 * first, 0.6]]}  # fmt: skip

    at_first = [point(b, 256 // b, 256 // b) for b in (8, 16, 32, 64)]
    fit = sweep.fit_tradeoff(at_first, num_bootstrap=50, seed=0)
    assert fit["b_crit"] is None and "reached it at its first evaluation" in fit["error"]
    later = [point(b, 2048 // b + 40, 256 // b) for b in (8, 16, 32, 64)]
    assert sweep.fit_tradeoff(later, num_bootstrap=50, seed=0)["b_crit"] is not None
