"""Matplotlib figures from the JSON outputs of a run.

Training plots read the rows of ``metrics.jsonl`` (one dict per logged step):

- :func:`plot_training`: train loss, train and test accuracy against steps;
- :func:`plot_noise_scale`: ``b_simple`` over training: the raw per-step estimates, the EMA of
  the tracker (``ema_b_simple``) and a band from a windowed bootstrap of the ratio of means
  (:func:`windowed_band`);
- :func:`training_plots`: both, written as PNGs into a directory.

Sweep plots read the ``sweep.json`` dict of ``experiments.sweep``:

- :func:`plot_throughput`: step time and examples/s against the batch size, the largest batch
  that fits marked, accumulated batches drawn hollow;
- :func:`plot_tradeoff`: measured steps-to-target with the fitted ``S(B) = S_min + E_min/B``,
  its asymptotes and ``B_crit``;
- :func:`plot_time_to_target`: predicted time to target ``∝ (1 + B_noise/B)·t(B)`` against the
  batch size (the curves at the ends of the noise-scale interval, the one from the fitted
  tradeoff, the measured times), the recommendation marked;
- :func:`sweep_plots`: all three, written as PNGs.

:func:`plot_policies` draws the smoothed test accuracy and the batch size against device time
for the runs of the compare mode (``summary["runs"]``), the target marked.

Example::

    rows = [json.loads(line) for line in open("run/metrics.jsonl")]
    training_plots(rows, "run")   # run/training.png, run/noise_scale.png

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gns import common, smoothing  # noqa: E402

__all__ = [
    "windowed_band",
    "plot_training",
    "plot_noise_scale",
    "training_plots",
    "plot_throughput",
    "plot_tradeoff",
    "plot_time_to_target",
    "sweep_plots",
    "plot_policies",
]


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and float values of the rows that have ``key`` (JSON ``null`` skipped)."""
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def windowed_band(
    g_sq: np.ndarray,
    trace_cov: np.ndarray,
    *,
    window: int = 20,
    confidence: float = 0.9,
    num_resamples: int = 500,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``b_simple`` over a trailing window of measurements, with a bootstrap band.

    At measurement ``i`` the window holds the finite measurements ``max(0, i-window+1) .. i``;
    the centre is ``mean(trace_cov) / mean(g_sq)`` over it (ratio of means, never mean of
    ratios) and the band the ``confidence`` percentile interval of that ratio over iid
    resamples of the window: :func:`gns.smoothing.interval` with ``block_size=1`` per window.

    Args:
      g_sq: per-measurement ``g_sq`` ``[n]``.
      trace_cov: per-measurement ``trace_cov`` ``[n]``.
      window: measurements per window.
      confidence: two-sided level of the band.
      num_resamples: bootstrap resamples per window.
      seed: NumPy seed (deterministic output).

    Returns:
      ``(centre, low, high)``, each ``[n]``; ``nan`` where the window has fewer than 2 finite
      measurements, ``inf`` where the mean ``g_sq`` is not positive.

    Example:
      >>> c, lo, hi = windowed_band(np.ones(30), 5 * np.ones(30))
      >>> float(c[-1]), float(lo[-1]), float(hi[-1])
      (5.0, 5.0, 5.0)
    """
    g = np.asarray(g_sq, np.float64)
    t = np.asarray(trace_cov, np.float64)
    if g.shape != t.shape or g.ndim != 1:
        raise ValueError(f"g_sq and trace_cov must be 1-D of one length, got {g.shape}, {t.shape}.")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}.")
    n = g.size
    centre, low, high = (np.full(n, np.nan) for _ in range(3))
    rng = np.random.default_rng(seed)
    for i in range(n):
        window_g, window_t = g[max(0, i - window + 1) : i + 1], t[max(0, i - window + 1) : i + 1]
        if np.sum(np.isfinite(window_g) & np.isfinite(window_t)) < 2:
            continue
        res = smoothing.interval(
            window_g,
            window_t,
            confidence=confidence,
            block_size=1,
            num_resamples=num_resamples,
            seed=rng,
        )
        centre[i], low[i], high[i] = res.estimate, res.low, res.high
    return centre, low, high


def plot_training(rows: Sequence[dict], path: str | None = None):
    """Train loss (left) and train/test accuracy (right) against steps.

    Args:
      rows: ``metrics.jsonl`` rows (``step``, ``train_loss``, ``train_accuracy`` and, on
        evaluation rows, ``test_accuracy``).
      path: if given, the PNG is written there and the figure closed.

    Returns:
      The matplotlib ``Figure``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (("loss", "cross-entropy", " loss"), ("accuracy", "accuracy", " accuracy"))
    for ax, (key, ylabel, what) in zip(axes, panels, strict=True):
        steps, train_values = _series(rows, f"train_{key}")
        train_label = "train" + what + (" (training batches)" if key == "accuracy" else "")
        ax.plot(steps, train_values, label=train_label)
        steps_t, test_values = _series(rows, f"test_{key}")
        if test_values.size:
            ax.plot(steps_t, test_values, "o-", label="test" + what + " (eval subset)")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, path)


def plot_noise_scale(rows: Sequence[dict], path: str | None = None, *, window: int = 20):
    """``b_simple`` over training: raw estimates, EMA and a windowed bootstrap band.

    Args:
      rows: ``metrics.jsonl`` rows; the measurement rows carry ``g_sq``, ``trace_cov``,
        ``b_simple`` and ``ema_b_simple``.
      path: if given, the PNG is written there and the figure closed.
      window: measurements per window of the band (:func:`windowed_band`).

    Returns:
      The matplotlib ``Figure``.
    """
    meas = [r for r in rows if r.get("g_sq") is not None and r.get("trace_cov") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if meas:
        steps = np.asarray([r["step"] for r in meas], np.float64)
        g = np.asarray([r["g_sq"] for r in meas], np.float64)
        t = np.asarray([r["trace_cov"] for r in meas], np.float64)
        raw = common.noise_scale_ratio(t, g)
        shown = np.isfinite(raw) & (raw > 0)
        ax.plot(steps[shown], raw[shown], ".", alpha=0.25, color="gray", label="per-step")
        centre, low, high = windowed_band(g, t, window=window)
        finite = np.isfinite(low) & np.isfinite(high) & (low > 0)
        ax.fill_between(
            steps, np.where(finite, low, np.nan), np.where(finite, high, np.nan),
            alpha=0.3, label=f"90% band (last {window} measurements)",
        )  # fmt: skip
        ax.plot(steps, centre, label=f"ratio of means (last {window})")
        ema_steps, ema = _series(meas, "ema_b_simple")
        if ema.size:
            ax.plot(ema_steps, ema, "--", label="EMA (training tracker)")
        positive = np.concatenate([raw[shown], centre[np.isfinite(centre) & (centre > 0)]])
        if positive.size:
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple = tr(Σ) / |G|²")
    ax.set_title("Simple noise scale over training")
    _legend(ax, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _finish(fig, path)


def training_plots(rows: Sequence[dict], directory: str) -> list[str]:
    """Write ``training.png`` and ``noise_scale.png`` into ``directory``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, "training.png"), os.path.join(directory, "noise_scale.png")]
    plot_training(rows, paths[0])
    plot_noise_scale(rows, paths[1])
    return paths


def _legend(ax, **kwargs):
    """A legend only when something is labelled (no warning on an empty plot)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return fig


def _finite(x) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def plot_throughput(sweep: Mapping, path: str | None = None):
    """Step time (left axis) and examples/s (right axis) against the batch size."""
    rows = [r for r in sweep["throughput"] if _finite(r.get("step_time_s"))]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax2 = ax.twinx()
    for fits, style in ((True, "o"), (False, "s")):
        sel = [r for r in rows if bool(r["fits"]) == fits]
        if not sel:
            continue
        b = np.array([r["batch_size"] for r in sel], float)
        t = np.array([r["step_time_s"] for r in sel], float)
        face = None if fits else "none"
        label = "" if fits else " (accumulation)"
        ax.plot(b, 1e3 * t, style, color="C0", mfc=face, label="step time" + label)
        ax2.plot(b, b / t, style, color="C1", mfc=face, label="examples/s" + label)
    b_all = np.array([r["batch_size"] for r in rows], float)
    order = np.argsort(b_all)
    t_all = np.array([r["step_time_s"] for r in rows], float)
    ax.plot(b_all[order], 1e3 * t_all[order], "-", color="C0", alpha=0.5)
    ax2.plot(b_all[order], (b_all / t_all)[order], "-", color="C1", alpha=0.5)
    mb = sweep.get("max_batch_size")
    if mb:
        ax.axvline(mb, color="gray", ls=":", label=f"largest that fits ({mb})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("step time (ms)", color="C0")
    ax2.set_ylabel("examples / s", color="C1")
    d = sweep.get("device", {})
    ax.set_title(f"Throughput on {d.get('kind', '?')} x{d.get('count', '?')}")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    return _finish(fig, path)


def plot_tradeoff(sweep: Mapping, path: str | None = None):
    """Measured steps to target and the fitted ``S(B)`` (log-log)."""
    t = sweep["tradeoff"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pts = [p for p in t["points"] if p.get("reached")]
    missed = [p for p in t["points"] if not p.get("reached")]
    if pts:
        ax.plot(
            [p["batch_size"] for p in pts],
            [p["steps"] for p in pts],
            "o",
            color="C0",
            label="measured steps to target",
        )
    for p in missed:
        ax.axvline(p["batch_size"], color="C3", ls=":", alpha=0.6)
    if missed:
        ax.plot([], [], ls=":", color="C3", label="target not reached")
    if _finite(t.get("s_min")) and pts:
        bs = [p["batch_size"] for p in t["points"]]
        grid = np.geomspace(min(bs) / 2, max(bs) * 2, 200)
        s_min, e_min = t["s_min"], t["e_min"]
        ax.plot(
            grid, s_min + e_min / grid, "-", color="C0", label=f"S = {s_min:.3g} + {e_min:.3g}/B"
        )
        ax.plot(grid, np.full_like(grid, s_min), "--", color="gray", lw=0.8, label="S_min")
        ax.plot(grid, e_min / grid, "-.", color="gray", lw=0.8, label="E_min / B")
        ax.axvline(t["b_crit"], color="C2", ls=":", label=f"B_crit = {t['b_crit']:.3g}")
        ax.set_ylim(0.5 * min(p["steps"] for p in pts), 2 * max(p["steps"] for p in pts))
    elif t.get("error"):
        ax.text(
            0.5,
            0.5,
            "fit not available:\n" + t["error"][:120],
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
            wrap=True,
        )
    ax.set_xscale("log", base=2)
    if pts:
        ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("steps to target")
    ax.set_title("Steps/examples tradeoff (McCandlish et al. 2018)")
    _legend(ax, fontsize=8)
    return _finish(fig, path)


def plot_time_to_target(sweep: Mapping, path: str | None = None):
    """Predicted time to target against the batch size, the recommendation marked."""
    rec = sweep["recommendation"]
    table = rec["table"]
    b = np.array([r["batch_size"] for r in table], float)
    t = np.array([r["step_time_s"] for r in table], float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    s_min = sweep["tradeoff"].get("s_min")
    absolute = _finite(s_min)
    scale = s_min if absolute else 1.0
    n = rec["b_noise"]

    def curve(noise):
        if noise is None or not isinstance(noise, int | float) or math.isnan(noise):
            return None
        if math.isinf(noise):
            return None
        return scale * (1 + max(noise, 0.0) / b) * t

    main = curve(n)
    if main is not None:
        ax.plot(b, main, "o-", color="C0", label=f"from noise scale (B_noise = {n:.3g})")
        iv = sweep["noise_scale"].get("interval") or [None, None]
        lo, hi = curve(iv[0]), curve(iv[1])
        if lo is not None and hi is not None:
            ax.fill_between(
                b,
                np.minimum(lo, hi),
                np.maximum(lo, hi),
                color="C0",
                alpha=0.15,
                label="noise-scale interval",
            )
    tr = sweep["tradeoff"]
    if _finite(tr.get("b_crit")):
        ax.plot(
            b,
            tr["s_min"] * (1 + tr["b_crit"] / b) * t,
            "s--",
            color="C2",
            mfc="none",
            label=f"from fitted tradeoff (B_crit = {tr['b_crit']:.3g})",
        )
    measured = sweep.get("measured_time_to_target") or {}
    if measured and absolute:
        mb = sorted(int(k) for k in measured)
        ax.plot(mb, [measured[str(k)] for k in mb], "k*", ms=9, label="measured")
    y = main if main is not None else scale * t / b
    i = int(np.flatnonzero(b == rec["batch_size"])[0]) if rec["batch_size"] in b else None
    if i is not None:
        ax.plot(
            [b[i]],
            [y[i]],
            "o",
            ms=14,
            mfc="none",
            mec="C3",
            mew=2,
            label=f"recommended: {rec['batch_size']}",
        )
    lo_r, hi_r = rec["near_optimal_range"]
    ax.axvspan(lo_r, hi_r, color="C3", alpha=0.08, label="within 10% of best")
    mbs = sweep.get("max_batch_size")
    if mbs:
        ax.axvline(mbs, color="gray", ls=":", label="largest that fits")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("time to target (s)" if absolute else "time to target (relative, x S_min)")
    ax.set_title("Predicted time to target")
    ax.legend(fontsize=7)
    return _finish(fig, path)


def sweep_plots(sweep: Mapping, directory: str) -> list[str]:
    """Write ``throughput.png``, ``tradeoff.png`` and ``time_to_target.png``; returns paths."""
    os.makedirs(directory, exist_ok=True)
    paths = [
        os.path.join(directory, n) for n in ("throughput.png", "tradeoff.png", "time_to_target.png")
    ]
    plot_throughput(sweep, paths[0])
    plot_tradeoff(sweep, paths[1])
    plot_time_to_target(sweep, paths[2])
    return paths


_POLICY_COLORS = {
    "recommended": "tab:orange",
    "default": "tab:blue",
    "adaptive": "tab:red",
    "best_measured": "tab:green",
    "largest_fits": "tab:purple",
}


def plot_policies(runs: Sequence[dict], target: float | None = None, path: str | None = None):
    """Smoothed test accuracy and batch size against device time, one line per run.

    The x axis is the device time ``Σ steps(B)·t(B)`` with ``t(B)`` from one interleaved timing
    table (the time the verdict ranks by); one colour per policy, one line style per seed.

    Args:
      runs: the ``runs`` of a compare ``summary.json`` (``experiments/compare.py``): each with
        ``policy``, ``seed``, ``batch_size``, ``curve`` (``[[wall_time_s, device_time_s,
        test_accuracy, smoothed_accuracy or None], ...]`` at each evaluation), ``batch_curve``
        (``[[device_time_s, batch_size], ...]``) and ``device_time_to_target_s`` (a star at
        the target when reached).
      target: the target accuracy (a horizontal line), or ``None``.
      path: where to write the PNG; ``None`` returns the figure open.

    Returns:
      ``path`` when given, else the figure.

    Example::

        plot_policies(summary["runs"], summary["target_accuracy"], "compare.png")
    """
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, height_ratios=(3, 1))
    styles = ("-", "--", ":", "-.")
    seeds = sorted({r["seed"] for r in runs})
    for r in runs:
        color = _POLICY_COLORS.get(r["policy"], "k")
        ls = styles[seeds.index(r["seed"]) % len(styles)]
        label = f"{r['policy']} (batch {r['batch_size']}), seed {r['seed']}"
        pts = [(c[1], c[3]) for c in r.get("curve") or [] if c[3] is not None]
        if pts:
            t, acc = zip(*pts, strict=True)
            top.plot(t, [100 * a for a in acc], color=color, ls=ls, marker="o", ms=3, label=label)
        if r.get("device_time_to_target_s") is not None and target is not None:
            top.plot([r["device_time_to_target_s"]], [100 * target], marker="*", ms=12,
                     color=color, ls="none")  # fmt: skip
        if r.get("batch_curve"):
            t, b = zip(*r["batch_curve"], strict=True)
            bottom.step(t, b, where="pre", color=color, ls=ls)
    if target is not None:
        top.axhline(100 * target, color="gray", lw=0.8, ls=":", label="target")
    top.set_ylabel("test accuracy, trailing mean (%)")
    top.set_title("Accuracy against device time (star: target reached)")
    top.grid(alpha=0.3)
    _legend(top, fontsize=7, loc="lower right")
    bottom.set_yscale("log", base=2)
    bottom.set_ylabel("batch size")
    bottom.set_xlabel("device time, steps x t(B) from the timing table (s)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    _finish(fig, path)
    return fig if path is None else path
