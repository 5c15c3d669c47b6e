"""The plots (gns/plots.py draws, experiments/figures.py writes): each drawn from inputs in the
formats of the smoke outputs, checked for its labels and the data it shows; nothing to draw
writes no chart but says why."""

import math
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from experiments import figures
from gns import plots, smoothing, tradeoff


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def rows(n=12, batches=None, lm=False, unresolved=()):
    """metrics.jsonl rows: a measurement at every row, an evaluation every 4th."""
    batches = batches or [32] * n
    out, seen = [], 0
    for i in range(n):
        seen += batches[i]
        g = -1.0 if i in unresolved else 100.0 / (i + 1)  # |G|² shrinks: B_simple grows
        r = {"step": i + 1, "examples_seen": seen, "batch_size": batches[i],
             "train_loss": 3.0 - 0.1 * i, "train_accuracy": 0.05 * i, "g_sq": g,
             "trace_cov": 50.0, "b_simple": 50.0 / g if g > 0 else None,
             "ema_b_simple": 1.0 + i}  # fmt: skip
        if i % 4 == 3:
            r["test_accuracy"] = 0.04 * i
            if lm:
                r["test_bits_per_byte"] = (3.0 - 0.1 * i) / math.log(2)
        out.append(r)
    return out


def line(ax, label):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


def test_training_plot_uses_examples_when_the_batch_changes_and_bits_per_byte_for_the_lm():
    fixed = plots.plot_training(rows())
    assert [ax.get_xlabel() for ax in fixed.axes] == ["step", "step"]
    assert fixed.axes[0].get_ylabel() == "cross-entropy (nats)"
    grown = rows(batches=[8] * 4 + [16] * 4 + [32] * 4)
    fig = plots.plot_training(grown)
    assert fig.axes[0].get_xlabel() == "examples seen"
    train = line(fig.axes[0], "train")
    np.testing.assert_array_equal(train.get_xdata(), [r["examples_seen"] for r in grown])
    lm = rows(lm=True)
    fig = plots.plot_training(lm)
    assert "bits per byte" in fig.axes[0].get_ylabel()
    np.testing.assert_allclose(line(fig.axes[0], "train").get_ydata(),
                               [r["train_loss"] / math.log(2) for r in lm])  # fmt: skip
    test = line(fig.axes[0], "test (eval subset)")
    np.testing.assert_allclose(
        test.get_ydata(), [r["test_bits_per_byte"] for r in lm if "test_bits_per_byte" in r]
    )
    assert fig.axes[1].get_ylabel() == "next-byte accuracy"


def test_noise_scale_plot_window_is_recent_and_unresolved_measurements_are_explained():
    rs = rows(n=24, unresolved=(5, 6))
    fig = plots.plot_noise_scale(rs)
    ax = fig.axes[0]
    k = smoothing.recent_window(24)
    assert k == 6
    centre = line(ax, f"ratio of means (last {k} measurements)")
    # The last value: ratio of means over the last k measurements, not the whole run.
    g = np.array([r["g_sq"] for r in rs[-k:]])
    t = np.array([r["trace_cov"] for r in rs[-k:]])
    assert centre.get_ydata()[-1] == pytest.approx(t.mean() / g.mean())
    assert centre.get_ydata()[-1] > 3 * np.mean([r["trace_cov"] for r in rs]) / np.mean(
        [r["g_sq"] for r in rs]
    )
    marks = line(ax, "|G|² ≤ 0: no estimate (2 of 24)")
    np.testing.assert_array_equal(marks.get_xdata(), [6, 7])
    per_step = line(ax, "per-step")
    assert 6 not in per_step.get_xdata() and len(per_step.get_xdata()) == 22


def test_noise_scale_plot_draws_unbounded_windows_at_the_top_not_as_gaps():
    """A window whose mean |G|² is not positive has an unbounded ratio of means: marked at the
    top (it was a gap in the line). A band open above is drawn past the axis top and counted
    (it was left out where it was least certain)."""
    rs = rows(n=24, unresolved=tuple(range(12, 18)))  # the window of steps 13-18 all <= 0
    ax = plots.plot_noise_scale(rs).axes[0]
    (marks,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("ratio of means unb")]
    np.testing.assert_array_equal(marks.get_xdata(), [18])
    (band,) = [c for c in ax.collections if c.get_label().startswith("90% band")]
    assert "unbounded above at" in band.get_label()
    assert max(p.vertices[:, 1].max() for p in band.get_paths()) > ax.get_ylim()[1]  # past the top


def test_nothing_to_draw_writes_no_chart_and_says_why(tmp_path):
    path = tmp_path / "noise_scale.png"
    path.write_bytes(b"an old chart")
    no_measurements = [{k: v for k, v in r.items() if k != "g_sq"} for r in rows()]
    out = figures.save(plots.plot_noise_scale, str(path), no_measurements)
    assert out.startswith("not drawn: no noise-scale measurement") and not path.exists()
    empty = {"points": [], "s_min": None}
    out = figures.save(plots.plot_tradeoff, str(tmp_path / "tradeoff.png"), empty)
    assert out == "not drawn: no training to the target was run (measurements only)"
    assert os.listdir(tmp_path) == []
    written = figures.training_plots(rows(), str(tmp_path))
    assert all(os.path.getsize(p) > 5000 for p in written.values())


def test_a_figure_that_fails_is_an_entry_saying_why_not_a_lost_run(tmp_path):
    def broken(rows):
        raise KeyError("step")

    path = tmp_path / "training.png"
    path.write_bytes(b"an old chart")
    out = figures.save(broken, str(path), rows())
    assert out == "not drawn: could not write it (KeyError: 'step')" and not path.exists()


def sweep_record(fits_32=True):
    """The parts of sweep.json the sweep plots read."""
    table = [{"batch_size": b, "fits": True, "step_time_s": 0.01 * b / 16,
              "times_s": [0.009 * b / 16, 0.01 * b / 16, 0.012 * b / 16], "accumulation_steps": 1}
             for b in (8, 16, 32)]  # fmt: skip
    if not fits_32:
        table[-1] |= {"fits": False, "step_time_s": None, "times_s": []}
    rec_table = [{"batch_size": r["batch_size"], "step_time_s": r["step_time_s"]}
                 for r in table if r["fits"]]  # fmt: skip
    return {
        "throughput": table,
        "max_batch_size": 32 if fits_32 else 16,
        "device": {"kind": "cpu", "count": 1},
        "noise_scale": {"interval": [10.0, 40.0]},
        "tradeoff": {"points": [], "s_min": None, "e_min": None, "b_crit": None},
        "recommendation": {
            "batch_size": 16,
            "b_noise": 20.0,
            "table": rec_table,
            "near_optimal_range": [16, 32],
        },  # fmt: skip
    }


def test_throughput_plot_has_spread_bars_and_an_honest_largest_batch():
    fig = plots.plot_throughput(sweep_record())
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "largest tried (32; all fit)" in labels and "step time, median and quartiles" in labels
    # Rows without their timed calls (a finder's result) draw no bars, and do not say they do.
    untimed = sweep_record()
    for r in untimed["throughput"]:
        r["times_s"] = []
    assert (
        "step time, median" in plots.plot_throughput(untimed).axes[0].get_legend_handles_labels()[1]
    )
    (bars,) = ax.collections  # the interquartile bars, one segment per batch
    segs = bars.get_segments()
    for seg, b in zip(segs, (8, 16, 32), strict=True):
        q25, q75 = np.quantile([0.009 * b / 16, 0.01 * b / 16, 0.012 * b / 16], [0.25, 0.75])
        np.testing.assert_allclose(sorted(seg[:, 1]), [1e3 * q25, 1e3 * q75])
    fig = plots.plot_throughput(sweep_record(fits_32=False))
    assert "largest that fits (16)" in fig.axes[0].get_legend_handles_labels()[1]
    # 32 tried and too big, then timed as 2 x 16 (a sweep's accumulation row): still the limit.
    sw = sweep_record(fits_32=False)
    sw["throughput"][-1] |= {"accumulation_steps": 2, "predicted_bytes": 4.0e6}
    assert plots.largest_fits(sw) == (16, "largest that fits (16)")
    sw["throughput"][-1]["predicted_bytes"] = None  # accumulation alone: never tried
    assert plots.largest_fits(sw) == (16, "largest tried (16; all fit)")


def test_the_time_to_target_band_is_the_interval_of_the_pick_s_basis():
    """The band around the curve of B_noise is the interval of the estimate the pick is on
    (a branched 20 [15, 30]), not b_simple's ([10, 40] in this record)."""
    sw = sweep_record()
    sw["recommendation"] |= {
        "basis": "branched",
        "evidence": {"branched": {"value": 20.0, "low": 15.0, "high": 30.0}},
    }
    ax = plots.plot_time_to_target(sw).axes[0]
    (band,) = ax.collections
    top = band.get_paths()[0].vertices[:, 1].max()
    b, t = np.array([8, 16, 32.0]), 0.01 * np.array([8, 16, 32.0]) / 16
    rel = (1 + 30 / b) * t / ((1 + 20 / 16) * t[1])  # the high end's curve, scaled as the plot
    assert top == pytest.approx(rel.max(), rel=1e-6)


def test_time_to_target_is_relative_to_the_recommendation_without_s_min_legend_outside():
    sw = sweep_record()
    fig = plots.plot_time_to_target(sw)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "time to target, relative to batch 16"
    curve = line(ax, "from noise scale (B_noise = 20)")
    b, t = np.array([8, 16, 32.0]), 0.01 * np.array([8, 16, 32.0]) / 16
    expected = (1 + 20 / b) * t / ((1 + 20 / 16) * t[1])
    np.testing.assert_allclose(curve.get_ydata(), expected)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # beside the data, not over it


def test_time_to_target_in_seconds_pairs_each_noise_scale_with_the_fits_e_min():
    """With a fit, the fit's curve is (S_min + E_min/B)·t(B) and a noise scale's is
    E_min·(1/B_noise + 1/B)·t(B): the fit's S_min belongs to its own B_crit (paired with another
    noise scale it put the curve 2-3x below the measured times)."""
    sw = sweep_record()
    sw["tradeoff"] = {"points": [], "s_min": 100.0, "e_min": 1600.0, "b_crit": 16.0}
    ax = plots.plot_time_to_target(sw).axes[0]
    b, t = np.array([8, 16, 32.0]), 0.01 * np.array([8, 16, 32.0]) / 16
    assert ax.get_ylabel() == "time to target (s)"
    np.testing.assert_allclose(line(ax, "from fitted tradeoff (B_crit = 16)").get_ydata(),
                               (100 + 1600 / b) * t)  # fmt: skip
    np.testing.assert_allclose(line(ax, "from noise scale (B_noise = 20)").get_ydata(),
                               1600 * (1 / 20 + 1 / b) * t)  # fmt: skip


def test_tradeoff_plot_draws_the_points_and_the_fit():
    pts = [{"batch_size": b, "steps": 100 + 1600 / b, "reached": True} for b in (8, 16, 32)]
    pts.append({"batch_size": 64, "steps": None, "reached": False})
    fit = {"points": pts, "s_min": 100.0, "e_min": 1600.0, "b_crit": 16.0}
    ax = plots.plot_tradeoff(fit).axes[0]
    measured = line(ax, "measured steps to target")
    np.testing.assert_array_equal(measured.get_ydata(), [300.0, 200.0, 150.0])
    assert {"S = 100 + 1.6e+03/B", "S_min = 100", "B_crit = 16", "target not reached"} <= set(
        ax.get_legend_handles_labels()[1]
    )
    # S_min's line stays in view when it lies below half the fewest steps (75 here).
    assert plots.plot_tradeoff(fit | {"s_min": 40.0}).axes[0].get_ylim()[0] < 40.0
    # Its interval is drawn (clipped to the axis); one beyond the fitted batches says so.
    ranged = fit | {"b_crit": 50.0, "intervals": {"b_crit": [30.0, 1e6]}, "confidence": 0.95}
    ax = plots.plot_tradeoff(ranged).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "B_crit = 50 (beyond the batches fitted)" in labels and "B_crit 95% interval" in labels
    assert ax.get_xlim()[1] < 1e3  # the span (to 1e6) stops at the axis
    far = plots.plot_tradeoff(fit | {"b_crit": 1e9}).axes[0]
    assert "B_crit = 1e+09 (outside the range measured)" in far.get_legend_handles_labels()[1]
    assert far.get_xlim()[1] < 1e3  # the axis stays on the measured batch sizes
    with pytest.raises(plots.NothingToPlot, match="none of the 1 trainings"):
        plots.plot_tradeoff({"points": pts[3:], "s_min": None})
    # A fit's own dict (points without "reached") draws its points; a nan step is not drawn.
    b = np.array([8.0, 16, 32, 64])
    own = tradeoff.fit(b, 100 + 1600 / b, num_bootstrap=0).to_dict()
    ax = plots.plot_tradeoff(own).axes[0]
    assert len(line(ax, "measured steps to target").get_xdata()) == 4
    own["points"][0]["steps"] = math.nan
    ax = plots.plot_tradeoff(own).axes[0]
    assert len(line(ax, "measured steps to target").get_xdata()) == 3


def test_all_non_finite_statistics_are_nothing_to_plot_not_an_empty_chart():
    nan_loss = [r | {"train_loss": math.nan} for r in rows()]
    with pytest.raises(plots.NothingToPlot, match="finite loss"):
        plots.plot_training(nan_loss)
    nan_stats = [r | {"g_sq": math.nan} if "g_sq" in r else r for r in rows()]
    with pytest.raises(plots.NothingToPlot, match="noise-scale measurements is finite"):
        plots.plot_noise_scale(nan_stats)
    record = sweep_record()
    for r in record["throughput"]:
        r["step_time_s"] = np.float32(r["step_time_s"])  # a NumPy scalar is a time too
    assert plots.plot_throughput(record).axes


def run(policy, batches, acc, seed=0):
    return {"policy": policy, "seed": seed, "batch_size": batches[0],
            "curve": [[1.0 * i, 1.0 * i, a, a] for i, a in enumerate(acc)],
            "batch_curve": [[1.0 * i, b] for i, b in enumerate(batches)],
            "device_time_to_target_s": None}  # fmt: skip


def test_compare_plot_shows_policies_that_share_a_run_and_a_grown_batch():
    runs = [run("default", [32, 32], [0.1, 0.3]), run("recommended", [32, 32], [0.1, 0.3]),
            run("adaptive", [8, 32], [0.1, 0.4])]  # fmt: skip
    ax = plots.plot_policies(runs, 0.3).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "default = recommended (batch 32), seed 0" in labels
    assert "adaptive (batch 8→32), seed 0" in labels
    np.testing.assert_allclose(line(ax, "adaptive (batch 8→32), seed 0").get_ydata(), [10, 40])
    # A run's measurement cost (counted in its times) is a bar from 0 at its first batch.
    measured = run("adaptive", [8, 32], [0.1, 0.4]) | {"measurement_s": 0.7}
    fig = plots.plot_policies([runs[0], measured], 0.3)
    assert "measurement's cost (counted)" in fig.axes[0].get_legend_handles_labels()[1]
    (bar,) = fig.axes[1].collections
    np.testing.assert_allclose(bar.get_segments()[0], [[0.0, 8.0], [0.7, 8.0]])
