"""Figures of a batch-size sweep, from its ``sweep.json`` dict (matplotlib only, no JAX).

* :func:`plot_throughput`: step time and examples/s against the batch size, the largest batch
  that fits marked, accumulated batches drawn hollow;
* :func:`plot_tradeoff`: measured steps-to-target with the fitted ``S(B) = S_min + E_min/B``,
  its asymptotes and ``B_crit``;
* :func:`plot_time_to_target`: predicted time to target ``∝ (1 + B_noise/B)·t(B)`` against the
  batch size (with the curves at the ends of the noise-scale interval, the one from the fitted
  tradeoff, and the measured times), the recommendation marked;
* :func:`sweep_plots` writes all three PNGs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np

__all__ = ["plot_throughput", "plot_tradeoff", "plot_time_to_target", "sweep_plots"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
        _plt().close(fig)
    return fig


def _finite(x) -> bool:
    return x is not None and isinstance(x, int | float) and math.isfinite(x)


def plot_throughput(sweep: Mapping, path: str | None = None):
    """Step time (left axis) and examples/s (right axis) against the batch size."""
    plt = _plt()
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
    plt = _plt()
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
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_time_to_target(sweep: Mapping, path: str | None = None):
    """Predicted time to target against the batch size, the recommendation marked."""
    plt = _plt()
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
