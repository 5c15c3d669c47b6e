"""Matplotlib figures from the JSON outputs of a run. Every function returns a ``Figure`` (the
library writes no files: ``experiments.figures`` saves them), or raises :class:`NothingToPlot`
with the reason in words when there is nothing to draw (no empty chart).

Training plots read the rows of ``metrics.jsonl`` (one dict per logged step):

- :func:`plot_training`: train loss and the held-out metric against steps, or against examples
  seen when the batch size changes during the run (the fair axis then); a language model's
  (rows with ``test_bits_per_byte``) loss in bits per byte;
- :func:`plot_noise_scale`: ``b_simple`` over training: the raw per-step estimates, the EMA of
  the tracker (``ema_b_simple``) and a band from a windowed bootstrap of the ratio of means
  (:func:`windowed_band`); measurements with ``|G|² ≤ 0`` (no estimate) are marked and counted.

Sweep plots read the ``sweep.json`` dict of ``experiments.sweep``:

- :func:`plot_throughput`: step time (median, interquartile bars) and examples/s against the
  batch size, the largest batch that fits marked (or the largest tried, when all fit),
  accumulated batches drawn hollow;
- :func:`plot_tradeoff`: measured steps-to-target with the fitted ``S(B) = S_min + E_min/B``,
  its asymptotes and ``B_crit``;
- :func:`plot_time_to_target`: predicted time to target ``∝ (1 + B_noise/B)·t(B)`` against the
  batch size (the curves at the ends of the noise-scale interval, the one from the fitted
  tradeoff, the measured times), the recommendation marked.

:func:`plot_policies` draws the smoothed test accuracy and the batch size against device time
for the runs of the compare mode (``summary["runs"]``), the target marked.

Example::

    fig = plot_training(rows)  # rows: the dicts of a run's metrics.jsonl

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gns import common, smoothing  # noqa: E402

__all__ = [
    "NothingToPlot",
    "windowed_band",
    "plot_training",
    "plot_noise_scale",
    "plot_throughput",
    "largest_fits",
    "plot_tradeoff",
    "plot_time_to_target",
    "plot_policies",
]


class NothingToPlot(ValueError):
    """The data hold nothing to draw; the message says why (written instead of the chart)."""


def _series(rows: Sequence[dict], key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """``x`` and float values of the rows that have ``key`` (JSON ``null`` skipped)."""
    pairs = [(r[x], r[key]) for r in rows if r.get(key) is not None]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    xs, values = zip(*pairs, strict=True)
    return np.asarray(xs, np.float64), np.asarray(values, np.float64)


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


def _x_axis(rows: Sequence[dict]) -> tuple[str, str]:
    """``('examples_seen', 'examples seen')`` when the batch size changes over ``rows``, else
    ``('step', 'step')``."""
    sizes = {r.get("batch_size") for r in rows if r.get("batch_size") is not None}
    if len(sizes) > 1 and all("examples_seen" in r for r in rows):
        return "examples_seen", "examples seen"
    return "step", "step"


def plot_training(rows: Sequence[dict]):
    """Train loss (left) and train/test accuracy (right) against steps, or against examples
    seen when the batch size changes.

    A language model's rows (``test_bits_per_byte`` on evaluation rows) show the loss in bits
    per byte (train loss in nats / ln 2, and the held-out ``test_bits_per_byte``) and the
    next-byte accuracy.

    Args:
      rows: ``metrics.jsonl`` rows (``step``, ``train_loss``, ``train_accuracy`` and, on
        evaluation rows, ``test_accuracy``).

    Returns:
      The matplotlib ``Figure``.

    Raises:
      NothingToPlot: no row has a finite training loss.
    """
    if not any(_finite(r.get("train_loss")) for r in rows):
        raise NothingToPlot(
            "no training row with a finite loss (the run took no logged step, or diverged)"
        )
    x, xlabel = _x_axis(rows)
    lm = any(r.get("test_bits_per_byte") is not None for r in rows)
    scale = 1 / math.log(2) if lm else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (
        (
            "loss",
            "bits_per_byte" if lm else "loss",
            "bits per byte (train loss / ln 2)" if lm else "cross-entropy (nats)",
            scale,
        ),
        ("accuracy", "accuracy", "next-byte accuracy" if lm else "accuracy", 1.0),
    )
    for ax, (key, test_key, ylabel, train_scale) in zip(axes, panels, strict=True):
        xs, train_values = _series(rows, f"train_{key}", x)
        what = " (training batches)" if key == "accuracy" else ""
        ax.plot(xs, train_scale * train_values, label=f"train{what}")
        xs_t, test_values = _series(rows, f"test_{test_key}", x)
        if test_values.size:
            ax.plot(xs_t, test_values, "o-", label="test (eval subset)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_noise_scale(rows: Sequence[dict], *, window: int | None = None):
    """``b_simple`` over training: raw estimates, EMA and a windowed bootstrap band.

    A measurement whose ``|G|²`` is not positive has no estimate (the gradient is not resolved
    above the noise): it is marked along the bottom and counted in the legend, not drawn as a
    value.

    Args:
      rows: ``metrics.jsonl`` rows; the measurement rows carry ``g_sq``, ``trace_cov``,
        ``b_simple`` and ``ema_b_simple``.
      window: measurements per window of the band (default
        :func:`gns.smoothing.recent_window`).

    Returns:
      The matplotlib ``Figure``.

    Raises:
      NothingToPlot: no measurement row (``config.gns_every`` 0, or too short a run), or
        none with finite statistics.
    """
    meas = [r for r in rows if r.get("g_sq") is not None and r.get("trace_cov") is not None]
    if not meas:
        raise NothingToPlot("no noise-scale measurement in the rows (config.gns_every)")
    if not any(_finite(r["g_sq"]) and _finite(r["trace_cov"]) for r in meas):
        raise NothingToPlot(f"none of the {len(meas)} noise-scale measurements is finite")
    window = smoothing.recent_window(len(meas)) if window is None else window
    x, xlabel = _x_axis(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.asarray([r[x] for r in meas], np.float64)
    g = np.asarray([r["g_sq"] for r in meas], np.float64)
    t = np.asarray([r["trace_cov"] for r in meas], np.float64)
    raw = common.noise_scale_ratio(t, g)
    shown = np.isfinite(raw) & (raw > 0)
    ax.plot(xs[shown], raw[shown], ".", alpha=0.25, color="gray", label="per-step")
    centre, low, high = windowed_band(g, t, window=window)
    ax.plot(xs, centre, label=f"ratio of means (last {window} measurements)")
    ema_x, ema = _series(meas, "ema_b_simple", x)
    if ema.size:
        ax.plot(ema_x, ema, "--", label="EMA (training tracker)")
    top = _open_band(ax, xs, low, high, window)
    # The window's mean |G|² not positive: its ratio drawn at the top, not as a gap; a step's
    # |G|² not positive: no estimate, marked along the bottom.
    unbounded, unresolved = np.isposinf(centre), g <= 0
    what = f"ratio of means unbounded ({int(unbounded.sum())}): the window's mean |G|² ≤ 0"
    _edge_marks(ax, xs[unbounded], 1, "^", "C0", 5, what)
    what = f"|G|² ≤ 0: no estimate ({int(unresolved.sum())} of {len(g)})"
    _edge_marks(ax, xs[unresolved], 0, "|", "C3", 12, what)
    if np.any(shown) or np.any(np.isfinite(centre) & (centre > 0)):
        ax.set_yscale("log")
    if top is not None:  # the open band runs off the top, the values stay in view
        ax.set_ylim(top=top)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("B_simple = tr(Σ) / |G|²")
    ax.set_title("Simple noise scale over training")
    _legend(ax, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def _edge_marks(ax, xs, edge: int, marker: str, color: str, size: int, label: str) -> None:
    """Markers at ``xs`` along the bottom (``edge`` 0) or top (1) of the axes, if any."""
    if len(xs):
        ys = np.full(len(xs), float(edge))
        kw = dict(color=color, ms=size, transform=ax.get_xaxis_transform(), label=label)
        ax.plot(xs, ys, marker, **kw)


def _open_band(ax, xs, low, high, window: int) -> float | None:
    """The band ``[low, high]`` of the windows with a positive lower end, drawn past the top of
    the axis where ``high`` is unbounded (the interval is open above, not absent); returns the
    axis top that keeps the finite values in view (``None``: no open band)."""
    top = max([v for v in (*high, *low, *ax.get_ylim()) if np.isfinite(v) and v > 0], default=1.0)
    drawn = np.isfinite(low) & (low > 0)
    open_above = drawn & ~np.isfinite(high)
    label = f"90% band (last {window} measurements)"
    ax.fill_between(
        xs,
        np.where(drawn, low, np.nan),
        np.where(drawn, np.where(open_above, 10 * top, high), np.nan),
        alpha=0.3,
        label=label
        + (f"; unbounded above at {int(open_above.sum())} points" if open_above.any() else ""),
    )
    return 2 * top if open_above.any() else None


def _plain_log_ticks(axis) -> None:
    """Tick labels of a log axis as plain numbers (``1.5``, not ``1.5 x 10^0``)."""
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


def _batch_axes(ax, sweep: Mapping) -> None:
    """Log-log axes over the batch size, with the largest batch that fits marked."""
    mb, what = largest_fits(sweep)
    if mb:
        ax.axvline(mb, color="gray", ls=":", label=what)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("batch size")


def _legend(ax, **kwargs):
    """A legend only when something is labelled (no warning on an empty plot)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _finite(x) -> bool:
    return common.is_real(x) and math.isfinite(x)


def largest_fits(sweep: Mapping) -> tuple[int | None, str]:
    """The largest batch that fits and how it is known: ``(b, 'largest that fits (b)')`` when
    a larger candidate was found not to fit in memory, ``(b, 'largest tried (b; all fit)')``
    when every candidate fit (the limit is above the range tried), ``(None, ...)`` without a
    throughput table. A row tried for memory has its prediction (``predicted_bytes``), also
    when it is then timed as gradient accumulation; a row of accumulation alone has none."""
    mb = sweep.get("max_batch_size")
    if not mb:
        return None, "no batch size fits"
    tried = lambda r: r.get("accumulation_steps", 1) == 1 or r.get("predicted_bytes") is not None
    over = [
        r
        for r in sweep.get("throughput") or []
        if r["batch_size"] > mb and not r.get("skipped") and tried(r)
    ]
    if any(not r["fits"] for r in over):
        return mb, f"largest that fits ({mb})"
    return mb, f"largest tried ({mb}; all fit)"


def plot_throughput(sweep: Mapping):
    """Step time (left axis; median with interquartile bars) and examples/s (right axis)
    against the batch size.

    Raises:
      NothingToPlot: no batch size was timed.
    """
    rows = [r for r in sweep["throughput"] if _finite(r.get("step_time_s"))]
    if not rows:
        raise NothingToPlot("no batch size was timed")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax2 = ax.twinx()
    for fits, style in ((True, "o"), (False, "s")):
        sel = [r for r in rows if bool(r["fits"]) == fits]
        if not sel:
            continue
        b = np.array([r["batch_size"] for r in sel], float)
        t = np.array([r["step_time_s"] for r in sel], float)
        face = None if fits else "none"
        label = "" if fits else " (accumulation: computed from the largest that fits)"
        what = "median and quartiles" if any(r.get("times_s") for r in sel) else "median"
        q = np.array(
            [
                np.quantile(r["times_s"], [0.25, 0.75])
                if r.get("times_s")
                else (r["step_time_s"], r["step_time_s"])
                for r in sel
            ],
            float,
        )
        err = 1e3 * np.stack([np.maximum(t - q[:, 0], 0), np.maximum(q[:, 1] - t, 0)])
        ax.errorbar(
            b,
            1e3 * t,
            yerr=err,
            fmt=style,
            color="C0",
            mfc=face,
            capsize=3,
            label=f"step time, {what}" + label,
        )
        ax2.plot(b, b / t, style, color="C1", mfc=face, label="examples/s" + label)
    b_all = np.array([r["batch_size"] for r in rows], float)
    order = np.argsort(b_all)
    t_all = np.array([r["step_time_s"] for r in rows], float)
    ax.plot(b_all[order], 1e3 * t_all[order], "-", color="C0", alpha=0.5)
    ax2.plot(b_all[order], (b_all / t_all)[order], "-", color="C1", alpha=0.5)
    _batch_axes(ax, sweep)
    ax.set_ylabel("step time (ms)", color="C0")
    ax2.set_ylabel("examples / s", color="C1")
    d = sweep.get("device", {})
    ax.set_title(f"Throughput on {d.get('kind', '?')} x{d.get('count', '?')}")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_tradeoff(tradeoff: Mapping):
    """Measured steps to target and the fitted ``S(B)`` (log-log).

    Args:
      tradeoff: ``sweep["tradeoff"]`` (or the tradeoff mode's ``summary["tradeoff"]``, or
        :meth:`gns.tradeoff.TradeoffFit.to_dict`): ``points`` and the fit (``s_min``,
        ``e_min``, ``b_crit``, or ``error``). A point without ``reached`` counts as reached
        when its ``steps`` are finite.

    Raises:
      NothingToPlot: no training was run, or none reached the target.
    """
    t = tradeoff
    pts = [p for p in t["points"] if p.get("reached", True) and _finite(p.get("steps"))]
    missed = [p for p in t["points"] if p not in pts]
    if not t["points"]:
        raise NothingToPlot("no training to the target was run (measurements only)")
    if not pts:
        raise NothingToPlot(f"none of the {len(missed)} trainings reached the target")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
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
    if _finite(t.get("s_min")):
        bs = [p["batch_size"] for p in t["points"]]
        grid = np.geomspace(min(bs) / 2, max(bs) * 2, 200)
        s_min, e_min = t["s_min"], t["e_min"]
        ax.plot(
            grid, s_min + e_min / grid, "-", color="C0", label=f"S = {s_min:.3g} + {e_min:.3g}/B"
        )
        ax.plot(
            grid,
            np.full_like(grid, s_min),
            "--",
            color="gray",
            lw=0.8,
            label=f"S_min = {s_min:.3g}",
        )
        ax.plot(grid, e_min / grid, "-.", color="gray", lw=0.8, label="E_min / B")
        if grid[0] <= t["b_crit"] <= grid[-1]:
            fitted = [p["batch_size"] for p in pts]  # drawn, but past the batches it fits
            note = (
                "" if min(fitted) <= t["b_crit"] <= max(fitted) else " (beyond the batches fitted)"
            )
            ax.axvline(t["b_crit"], color="C2", ls=":", label=f"B_crit = {t['b_crit']:.3g}{note}")
            lo, hi = (t.get("intervals") or {}).get("b_crit", (None, None))
            if _finite(lo) and _finite(hi):
                level = t.get("confidence")
                what = f"{level:.0%} interval" if _finite(level) else "interval"
                span = max(lo, grid[0]), min(hi, grid[-1])  # the axis stays on the grid
                ax.axvspan(*span, color="C2", alpha=0.1, label=f"B_crit {what}")
        else:  # named, not drawn: a line far outside would squeeze the measured range
            ax.plot(
                [],
                [],
                ls=":",
                color="C2",
                label=f"B_crit = {t['b_crit']:.3g} (outside the range measured)",
            )
        low = 0.5 * min(p["steps"] for p in pts)
        if s_min > 0.05 * low:  # the S_min line in view, unless it would squeeze the points
            low = min(low, 0.8 * s_min)
        ax.set_ylim(low, 2 * max(p["steps"] for p in pts))
    else:
        why = textwrap.fill(f"no fit: {t.get('error') or 'not available'}", 110)
        ax.set_title(why, fontsize=7, loc="left")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("steps to target")
    fig.suptitle("Steps/examples tradeoff (McCandlish et al. 2018)")
    _legend(ax, fontsize=8)
    fig.tight_layout()
    return fig


def plot_time_to_target(sweep: Mapping):
    """Predicted time to target against the batch size, the recommendation marked.

    In seconds when the sweep measured a tradeoff fit: the fit's ``(S_min + E_min/B)·t(B)``,
    and a noise scale's curve with the fit's ``E_min`` and that noise scale as the critical
    batch, ``E_min·(1/B_noise + 1/B)·t(B)`` (the fit's ``S_min`` belongs to its own ``B_crit``).
    Otherwise relative to the recommended batch (1 there): ``(1 + B_noise/B)·t(B)`` fixes the
    time only up to the factor ``S_min``. The legend sits outside the axes.

    Raises:
      NothingToPlot: the noise scale is not a number and there is no tradeoff fit.
    """
    rec = sweep["recommendation"]
    b = np.array([r["batch_size"] for r in rec["table"]], float)
    t = np.array([r["step_time_s"] for r in rec["table"]], float)
    tr = sweep["tradeoff"]
    absolute = _finite(tr.get("s_min"))

    def curve(noise):  # time to target / S_min; None when not a number
        if not isinstance(noise, int | float) or math.isnan(noise):
            return None
        return t / b if math.isinf(noise) else (1 + max(noise, 0.0) / b) * t

    n = rec["b_noise"]
    main = curve(n)
    fit = (1 + tr["b_crit"] / b) * t if _finite(tr.get("b_crit")) else None
    ref = main if main is not None else fit
    if ref is None or not b.size:
        raise NothingToPlot("no finite noise scale and no tradeoff fit to predict from")
    i = int(np.flatnonzero(b == rec["batch_size"])[0]) if rec["batch_size"] in b else None
    scale = tr["s_min"] if absolute else 1 / ref[i if i is not None else int(np.argmin(ref))]

    def steps_per(noise):  # the factor of a noise scale's curve: S_min = E_min / B_noise
        if not absolute:
            return scale
        if noise == math.inf:  # S = E_min / B
            return tr["e_min"]
        return tr["e_min"] / noise if noise > 0 else tr["s_min"]

    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    if main is not None:
        ax.plot(
            b, steps_per(n) * main, "o-", color="C0", label=f"from noise scale (B_noise = {n:.3g})"
        )
        # The interval of the estimate the pick is on (the basis's), else of b_simple.
        basis = (rec.get("evidence") or {}).get(rec.get("basis")) or {}
        iv = [basis.get("low"), basis.get("high")]
        if None in iv:
            iv = sweep["noise_scale"].get("interval") or [None, None]
        lo, hi = curve(iv[0]), curve(iv[1])
        if lo is not None and hi is not None:
            lo, hi = steps_per(iv[0]) * lo, steps_per(iv[1]) * hi
            ax.fill_between(
                b,
                np.minimum(lo, hi),
                np.maximum(lo, hi),
                color="C0",
                alpha=0.15,
                label="noise-scale interval",
            )
    if fit is not None:
        ax.plot(
            b,
            scale * fit,
            "s--",
            color="C2",
            mfc="none",
            label=f"from fitted tradeoff (B_crit = {tr['b_crit']:.3g})",
        )
    measured = sweep.get("measured_time_to_target") or {}
    if measured and absolute:
        mb = sorted(int(k) for k in measured)
        ax.plot(mb, [measured[str(k)] for k in mb], "k*", ms=9, label="measured")
    if i is not None:
        ax.plot(
            [b[i]],
            [(steps_per(n) if main is not None else scale) * ref[i]],
            "o",
            ms=14,
            mfc="none",
            mec="C3",
            mew=2,
            label=f"recommended: {rec['batch_size']}",
        )
    lo_r, hi_r = rec["near_optimal_range"]
    ax.axvspan(lo_r, hi_r, color="C3", alpha=0.08, label="within 10% of best")
    _batch_axes(ax, sweep)
    ax.set_ylabel(
        "time to target (s)"
        if absolute
        else f"time to target, relative to batch {rec['batch_size']}"
    )
    ax.set_title("Predicted time to target")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


_POLICY_COLORS = {
    "recommended": "tab:orange",
    "default": "tab:blue",
    "adaptive": "tab:red",
    "best_measured": "tab:green",
    "largest_fits": "tab:purple",
}


def _batch_label(run: Mapping) -> str:
    """``'batch 32'``, or ``'batch 8→32'`` for a run whose batch size changed."""
    sizes = [b for _, b in run.get("batch_curve") or []] or [run["batch_size"]]
    first, last = run["batch_size"], sizes[-1]
    return f"batch {first}" if first == last else f"batch {first}→{last}"


def _same_runs(runs: Sequence[dict]) -> list[list[dict]]:
    """The runs grouped by identical curves (policies that picked the same batch and learning
    rate train the same run, whose lines would hide each other)."""
    groups: dict = {}
    for r in runs:
        key = (r["seed"], repr([c[1:] for c in r.get("curve") or []]), repr(r.get("batch_curve")))
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def plot_policies(runs: Sequence[dict], target: float | None = None):
    """Smoothed test accuracy and batch size against device time, one line per run.

    The x axis is the device time ``Σ steps(B)·t(B)`` with ``t(B)`` from one interleaved timing
    table (the time the verdict ranks by); one colour per policy, one line style per seed.
    Policies whose runs are identical (same batch and learning rate) share one line whose
    label names them all (``default = recommended (batch 32), seed 0``); a run whose batch
    changed is labelled with its first and last batch (``adaptive (batch 8→32)``).

    Args:
      runs: the ``runs`` of a compare ``summary.json`` (``experiments/compare.py``): each with
        ``policy``, ``seed``, ``batch_size``, ``curve`` (``[[train_time_s, device_time_s,
        test_accuracy, smoothed_accuracy or None], ...]`` at each evaluation), ``batch_curve``
        (``[[device_time_s, batch_size], ...]``), ``device_time_to_target_s`` (a star at
        the target when reached) and ``measurement_s`` (a thick bar from 0 in the batch panel:
        the measurement's cost that the run's times count).
      target: the target accuracy (a horizontal line), or ``None``.

    Returns:
      The matplotlib ``Figure``.

    Raises:
      NothingToPlot: no run has an evaluation.

    Example::

        fig = plot_policies(summary["runs"], summary["target_accuracy"])
    """
    if not any(r.get("curve") for r in runs):
        raise NothingToPlot("no run has an evaluation to draw")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, height_ratios=(3, 1))
    styles = ("-", "--", ":", "-.")
    seeds, measured = sorted({r["seed"] for r in runs}), False
    for group in _same_runs(runs):
        r = group[0]
        color = _POLICY_COLORS.get(r["policy"], "k")
        ls = styles[seeds.index(r["seed"]) % len(styles)]
        names = " = ".join(g["policy"] for g in group)
        label = f"{names} ({_batch_label(r)}), seed {r['seed']}"
        pts = [(c[1], c[3]) for c in r.get("curve") or [] if c[3] is not None]
        if pts:
            t, acc = zip(*pts, strict=True)
            top.plot(t, [100 * a for a in acc], color=color, ls=ls, marker="o", ms=3, label=label)
        if r.get("device_time_to_target_s") is not None and target is not None:
            top.plot(
                [r["device_time_to_target_s"]],
                [100 * target],
                marker="*",
                ms=12,
                color=color,
                ls="none",
            )
        if r.get("batch_curve"):
            t, b = zip(*r["batch_curve"], strict=True)
            bottom.step(t, b, where="pre", color=color, ls=ls)
            if r.get("measurement_s"):  # the measurement's cost, before the run's first step
                bottom.hlines(b[0], 0, r["measurement_s"], color=color, lw=5, alpha=0.35)
                measured = True
    if measured:
        top.plot([], [], color="gray", lw=5, alpha=0.35, label="measurement's cost (counted)")
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
    return fig
