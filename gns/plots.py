"""Matplotlib figures from the JSON outputs of a run (imports no JAX).

Training plots read the rows of ``metrics.jsonl`` (one dict per logged step):

- :func:`plot_training`: train loss, train and test accuracy against steps;
- :func:`plot_noise_scale`: ``b_simple`` over training: the raw per-step estimates, the EMA of
  the tracker (``ema_b_simple``) and a band from a windowed bootstrap of the ratio of means
  (:func:`windowed_band`);
- :func:`training_plots`: both, written as PNGs into a directory.

Example::

    rows = [json.loads(line) for line in open("run/metrics.jsonl")]
    training_plots(rows, "run")   # run/training.png, run/noise_scale.png

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["windowed_band", "plot_training", "plot_noise_scale", "training_plots"]


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and float values of the rows that have ``key`` (JSON ``null`` skipped)."""
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def _ratio(trace_cov: np.ndarray, g_sq: np.ndarray) -> np.ndarray:
    safe = np.where(g_sq > 0, g_sq, 1.0)
    return np.where(g_sq > 0, trace_cov / safe, np.inf)


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
    resamples of the window.

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
    alpha = 1.0 - confidence
    for i in range(n):
        gw, tw = g[max(0, i - window + 1) : i + 1], t[max(0, i - window + 1) : i + 1]
        ok = np.isfinite(gw) & np.isfinite(tw)
        gw, tw = gw[ok], tw[ok]
        m = gw.size
        if m < 2:
            continue
        centre[i] = _ratio(tw.mean(), gw.mean())
        idx = rng.integers(0, m, size=(num_resamples, m))
        ratios = _ratio(tw[idx].mean(axis=1), gw[idx].mean(axis=1))
        low[i] = np.quantile(ratios, alpha / 2, method="lower")
        high[i] = np.quantile(ratios, 1 - alpha / 2, method="higher")
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
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps, loss = _series(rows, "train_loss")
    ax_loss.plot(steps, loss, label="train loss")
    steps_t, test_loss = _series(rows, "test_loss")
    if test_loss.size:
        ax_loss.plot(steps_t, test_loss, "o-", label="test loss (eval subset)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    steps, acc = _series(rows, "train_accuracy")
    ax_acc.plot(steps, acc, label="train accuracy (training batches)")
    steps_t, test_acc = _series(rows, "test_accuracy")
    if test_acc.size:
        ax_acc.plot(steps_t, test_acc, "o-", label="test accuracy (eval subset)")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
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
        raw = _ratio(t, g)
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
    ax.legend(fontsize=8)
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


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
