"""``make demo`` end to end on the smoke settings with synthetic data (seconds, no download):
the policy table printed, ``summary.json`` with ``runs`` and ``verdict``, the plot.

The model is a one-layer MLP on 8x8 images: every stage of the command runs as with the
smoke CNN (sweep, timing table, each policy's training, verdict, plot) at half the CPU time,
and it learns the synthetic task within the smoke budgets (so the verdict ranks times). Fewer
programs than the smoke defaults: batch sizes from 16 (the throughput table, the timing table
and the adaptive schedule's candidates, 16 -> 32) and no per-run plots (compare.png, the
command's own plot, is drawn; the runs' plots are tests/test_train.py's)."""

import json
import os
import subprocess

import pytest

from experiments import compare, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_KEYS = ("policy", "batch_size", "seed", "time_to_target_s", "device_time_to_target_s",
            "reached")  # fmt: skip


@pytest.mark.timeout(300)
def test_make_demo_on_the_smoke_settings_prints_the_policy_table_and_verdict(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [
        "make", "-s", "-o", ".venv/.installed", "demo",  # the venv exists: install nothing
        "DEMO_CONFIG=configs/cifar10.py:smoke",
        "DATA_FLAGS=--config.data.source=synthetic",
        "DEMO_FLAGS=--config.data.synthetic.image_size=8 --config.model.name=mlp "
        "--config.model.widths='(16,)' --config.plots=False "
        "--config.tradeoff.batch_sizes='(16,32)' --config.adaptive.min_batch_size=16",
        f"WORKDIR={tmp_path}",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    workdir = tmp_path / "demo"
    with open(workdir / compare.SUMMARY_FILE) as f:
        s = json.loads(f.read(), parse_constant=pytest.fail)
    assert s["mode"] == "compare"
    # Every policy of the smoke setup ran (no tradeoff summary: best_measured skipped).
    assert {r["policy"] for r in s["runs"]} == {
        "recommended", "default", "adaptive", "largest_fits"
    }  # fmt: skip
    assert set(s["skipped"]) == {"best_measured"}
    fits = [r["batch_size"] for r in
            json.loads((workdir / "sweep" / "sweep.json").read_text())["throughput"]
            if r["fits"]]  # fmt: skip
    by = {r["policy"]: r for r in s["runs"]}
    top = json.loads((workdir / "config.json").read_text())["throughput"]["max_batch_size"]
    assert by["largest_fits"]["batch_size"] == max(b for b in fits if b <= top)  # the range's
    assert by["default"]["batch_size"] == 32  # smoke: config.batch_size
    assert by["recommended"]["batch_size"] == s["recommendation"]["batch_size"]
    for r in s["runs"]:
        assert set(RUN_KEYS) <= set(r)
        assert r["reached"] == (r["device_time_to_target_s"] is not None)
    for key in ("fastest", "tie", "ranking", "policies", "text"):
        assert key in s["verdict"], key
    assert s["verdict"] == compare.verdict(s["runs"], s["target_accuracy"])
    # The printed table is the report of the summary: one row per run, then the verdict.
    assert report.mode_summary(s) in out.stdout
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("policy"))
    rows = [line.split() for line in lines[head + 2 : head + 2 + len(s["runs"])]]
    assert [(c[0], int(c[1])) for c in rows] == [(r["policy"], r["seed"]) for r in s["runs"]]
    assert (workdir / compare.PLOT_FILE).stat().st_size > 0
