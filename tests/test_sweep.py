"""Tests for the sweep driver: the smoke config end to end (every key of sweep.json, checked
against independent recomputations), the command line, and reuse of finished measurements."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import sweep as sweep_config
from experiments import sweep, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The exact `smoke` config, run once in-process (the other tests reuse its workdir)."""
    workdir = str(tmp_path_factory.mktemp("sweep_smoke"))
    config = sweep_config.get_config("smoke")
    t0 = time.perf_counter()
    result = sweep.run_sweep(config, workdir)
    elapsed = time.perf_counter() - t0
    return config, workdir, result, elapsed


@pytest.mark.timeout(300)
def test_smoke_sweep_writes_every_key_within_budget(smoke_run):
    config, workdir, _, elapsed = smoke_run
    assert elapsed < 180, f"the smoke sweep took {elapsed:.0f} s (issue: < 3 minutes)"
    with open(os.path.join(workdir, sweep.SWEEP_FILE)) as f:
        s = json.load(f)
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


@pytest.mark.timeout(300)
def test_throughput_memory_and_accumulation_are_consistent(smoke_run):
    config, _, s, _ = smoke_run
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
            assert not r["fits"] and r["accumulation_steps"] == k
            assert r["step_time_s"] == pytest.approx(k * rows[max_b]["step_time_s"])
        else:
            assert r["step_time_s"] == pytest.approx(float(np.median(r["times_s"])))
    assert sorted(rows) == [8, 16, 32, 64, 128]


@pytest.mark.timeout(300)
def test_noise_scale_is_the_ratio_of_pooled_means(smoke_run):
    config, _, s, _ = smoke_run
    n = s["noise_scale"]
    assert n["num_batches"] == len(n["per_batch"]) == config.noise.num_batches
    g = np.mean([p["g_sq"] for p in n["per_batch"]])
    t = np.mean([p["trace_cov"] for p in n["per_batch"]])
    assert n["b_simple"] == pytest.approx(t / g if g > 0 else math.inf)
    lo, hi = n["interval"]
    assert lo <= n["b_simple"] <= hi
    assert n["method"] == "per_example"  # SmallCNN has no BatchNorm


@pytest.mark.timeout(300)
def test_trainings_and_fit_match_the_runs_on_disk(smoke_run):
    config, workdir, s, _ = smoke_run
    t = s["tradeoff"]
    target = config.tradeoff.target_accuracy
    base_lr, base_b = config.train.learning_rate, config.train.batch_size
    assert [p["batch_size"] for p in t["points"]] == list(config.tradeoff.batch_sizes)
    for p in t["points"]:
        b = p["batch_size"]
        # Adam: square-root scaling from the reference batch.
        assert p["learning_rate"] == pytest.approx(base_lr * math.sqrt(b / base_b))
        assert p["workdir"].startswith(os.path.join(workdir, "train"))
        rows = train.read_metrics(os.path.join(p["workdir"], train.METRICS_FILE))
        evals = [r for r in rows if "test_accuracy" in r]
        first = next((r["step"] for r in evals if r["test_accuracy"] >= target), None)
        assert p["steps"] == first
        assert p["reached"] == (first is not None)
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
    config, _, s, _ = smoke_run
    r = s["recommendation"]
    n = s["noise_scale"]["b_simple"]
    # Independent recomputation over the throughput table (accumulated rows included).
    times = {row["batch_size"]: row["step_time_s"] for row in s["throughput"]}
    times.setdefault(config.train.batch_size, times.get(config.train.batch_size))
    cost = {b: (1 + n / b) * t for b, t in times.items()}
    best = min(cost, key=lambda b: (cost[b], b))
    assert r["batch_size"] == best
    assert r["accumulation_steps"] == math.ceil(best / s["max_batch_size"])
    assert r["predicted_speedup_vs_baseline"] == pytest.approx(
        cost[config.train.batch_size] / cost[best]
    )
    assert r["learning_rate"] == pytest.approx(
        config.train.learning_rate * math.sqrt(best / config.train.batch_size)
    )
    assert r["reason"].startswith(f"Batch {best}")


@pytest.mark.timeout(300)
def test_rerun_reuses_what_was_measured(smoke_run, monkeypatch):
    config, workdir, first, _ = smoke_run
    state_path = os.path.join(workdir, sweep.STATE_FILE)
    with open(state_path) as f:
        state = json.load(f)
    # Simulate an interruption after the noise scale, three step times and two trainings.
    del state["sections"]["throughput"]["items"]["16"]
    del state["sections"]["trainings"]["items"]["32"]
    train.write_json(state_path, state)

    calls = {"throughput": [], "training": [], "noise": 0}
    real_tp, real_train = sweep.measure_throughput_one, sweep.run_training

    def count_tp(cfg, fn, st, shape, b):
        calls["throughput"].append(b)
        return real_tp(cfg, fn, st, shape, b)

    def count_train(cfg, wd, b, n):
        calls["training"].append(b)
        return real_train(cfg, wd, b, n)

    def no_noise(*args, **kwargs):
        calls["noise"] += 1
        raise AssertionError("the noise scale was measured again")

    monkeypatch.setattr(sweep, "measure_throughput_one", count_tp)
    monkeypatch.setattr(sweep, "run_training", count_train)
    monkeypatch.setattr(sweep, "measure_noise_scale", no_noise)
    again = sweep.run_sweep(config, workdir)
    assert calls == {"throughput": [16], "training": [32], "noise": 0}
    assert again["noise_scale"] == first["noise_scale"]
    keep = {b: r for b, r in zip([8, 32, 64], [0, 2, 3], strict=True)}
    for b, i in keep.items():
        assert again["throughput"][i] == first["throughput"][i], b
    # The training at 32 resumed from its final checkpoint: same steps to target.
    p_first = {p["batch_size"]: p for p in first["tradeoff"]["points"]}
    p_again = {p["batch_size"]: p for p in again["tradeoff"]["points"]}
    assert p_again[32]["steps"] == p_first[32]["steps"]
    assert p_again[8] == p_first[8] and p_again[16] == p_first[16]
    assert "noise_scale" in again["reused"] and "trainings[8]" in again["reused"]
    with open(state_path) as f:
        assert set(json.load(f)["sections"]["throughput"]["items"]) == {"8", "16", "32", "64"}


@pytest.mark.timeout(300)
def test_command_line_reuses_per_stage_after_a_config_change(smoke_run):
    _, workdir, first, _ = smoke_run
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)  # same XLA_FLAGS as here
    cmd = [
        sys.executable,
        "-m",
        "experiments.sweep",
        "--config",
        "configs/sweep.py:smoke",
        "--workdir",
        workdir,
    ]
    # The command line, on the finished smoke workdir, with a change to the noise-scale stage
    # only (the interval's confidence): it measures the noise scale again -- to the same
    # b_simple, deterministic on CPU -- and reuses the step times and the trainings (whose
    # learning rates depend on b_simple).
    out = subprocess.run(
        cmd + ["--config.noise.confidence=0.8"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "recommended batch size:" in out.stdout and "noise scale b_simple" in out.stdout
    with open(os.path.join(workdir, sweep.SWEEP_FILE)) as f:
        s2 = json.load(f)
    assert s2["remeasured_after_config_change"] == ["noise_scale"]
    assert "noise_scale" not in s2["reused"]
    assert s2["noise_scale"]["confidence"] == 0.8
    assert s2["noise_scale"]["b_simple"] == pytest.approx(first["noise_scale"]["b_simple"])
    assert {"throughput[8]", "throughput[32]", "trainings[8]", "trainings[32]"} <= set(s2["reused"])
    assert s2["fingerprints"]["noise_scale"] != first["fingerprints"]["noise_scale"]
    assert s2["fingerprints"]["throughput"] == first["fingerprints"]["throughput"]
    assert s2["fingerprints"]["trainings"] == first["fingerprints"]["trainings"]


def test_candidate_batch_sizes_and_spread():
    assert sweep.candidate_batch_sizes(16, 1024) == [16, 32, 64, 128, 256, 512, 1024]
    assert sweep.candidate_batch_sizes(12, 100) == [16, 32, 64]
    with pytest.raises(ValueError, match="min_batch_size"):
        sweep.candidate_batch_sizes(64, 32)
    assert sweep._spread([16, 32, 64, 128, 256, 512, 1024], 3) == [16, 128, 1024]
    assert sweep._spread([16, 32], 5) == [16, 32]
