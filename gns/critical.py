"""The critical batch along the path to the target: from the pilot's noise-scale trajectory, and
measured directly by short branched runs from the pilot's checkpoints.

McCandlish's tradeoff holds locally (McCandlish et al. 2018): a stretch of training that needs
``ΔS_min`` steps at an infinite batch needs ``ΔS_min (1 + B_noise/B)`` steps at batch ``B``.
Summed over the path to the target::

    S(B) = S_min + E_min / B,   S_min = Σ ΔS_min,i,   E_min = Σ ΔS_min,i · B_noise,i
    B_crit = E_min / S_min      (the ΔS_min-weighted mean of B_noise along the path)

and a pilot at batch ``B_ref`` that spent ``ΔS_ref,i`` steps in stretch ``i`` gives
``ΔS_min,i = ΔS_ref,i / (1 + B_noise,i / B_ref)``.

* :func:`trajectory_from_metrics` pools a pilot's logged ``(step, g_sq, trace_cov)`` rows into
  ``k`` stretches, each with ``b_simple`` and its interval (:func:`gns.smoothing.interval`);
* :func:`effective_noise_scale` turns any such trajectory into the effective ``B_noise`` for a run
  to the target, with ``S_min``, ``E_min`` and a bootstrap interval;
* :func:`branched_critical_batch` forks short runs from one pilot checkpoint at batches
  ``B_ref·2^j`` for the same number of examples and measures the local critical batch from the
  examples each batch needs to reach the same held-out loss (Merrill et al. 2025 measure it the
  same way, by branching; the rule used here is a local fit of McCandlish's tradeoff, see
  ``docs/critical-batch.md`` for why);
* :func:`effective_critical_batch` combines the local values at several checkpoints with the same
  ``ΔS_min`` weighting.

Everything here runs after (or beside) training: NumPy for the statistics, and the caller's own
jitted step for the forks. :func:`branched_critical_batch` compiles each batch size once.

References: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018);
Merrill, Arora, Groeneveld, Hajishirzi, "Critical Batch Size Revisited: A Simple Empirical
Approach to Large-Batch Language Model Training" (2025, arXiv 2505.23971).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from gns import common, scaling, smoothing

__all__ = [
    "BASIS_TRAJECTORY",
    "BASIS_SINGLE_POINT",
    "BASIS_BRANCHED",
    "BASIS_BRANCHED_SINGLE",
    "BASIS_NONE",
    "Trajectory",
    "EffectiveNoiseScale",
    "BranchedCriticalBatch",
    "stretch_lengths",
    "trajectory_from_metrics",
    "effective_noise_scale",
    "lr_multipliers",
    "check_state",
    "fork",
    "branched_critical_batch",
    "effective_critical_batch",
]

BASIS_TRAJECTORY = "trajectory"  # >= 2 noise-scale points: ΔS_min-weighted mean along the path
BASIS_SINGLE_POINT = "single_point"  # 1 usable point: that point's own value and interval
BASIS_BRANCHED = "branched"  # >= 2 branched checkpoints: ΔS_min-weighted mean along the path
BASIS_BRANCHED_SINGLE = "branched_single_checkpoint"  # 1 usable branched checkpoint
BASIS_NONE = "none"  # no usable point: value is nan


# ---------------------------------------------------------------------------------------------
# 1. The noise scale along the path.


def _plain(record) -> dict[str, Any]:
    """A NamedTuple as a dict of Python scalars, lists and strings (for JSON writers)."""
    out = {}
    for key, value in record._asdict().items():
        if isinstance(value, np.ndarray | tuple):
            value = np.asarray(value).tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


class Trajectory(NamedTuple):
    """A pilot's noise scale by stretch of training (arrays of length ``k``).

    Attributes:
      start: first step of each stretch (exclusive: the stretch covers ``(start, end]``).
      end: last step of each stretch.
      delta_steps: ``end - start``: the pilot steps ``ΔS_ref,i`` spent in the stretch.
      b_noise: ``b_simple`` of the stretch (ratio of means); ``nan`` with fewer than 2 finite
        rows, ``inf`` when the mean ``g_sq`` is not positive.
      low: lower end of its interval (``nan`` when there is none).
      high: upper end of its interval (``nan`` when there is none).
      num_rows: finite measurement rows pooled into the stretch.
    """

    start: np.ndarray
    end: np.ndarray
    delta_steps: np.ndarray
    b_noise: np.ndarray
    low: np.ndarray
    high: np.ndarray
    num_rows: np.ndarray

    def rows(self) -> list[dict[str, float]]:
        """One dict per stretch: ``step`` (its end), ``start``, ``b_simple``, ``low``, ``high``,
        ``num_rows``: the ``noise_scale.trajectory`` rows of ``sweep.json``."""
        return [
            {
                "step": float(e),
                "start": float(s),
                "b_simple": float(b),
                "low": float(lo),
                "high": float(hi),
                "num_rows": int(n),
            }
            for s, e, b, lo, hi, n in zip(
                self.start, self.end, self.b_noise, self.low, self.high, self.num_rows, strict=True
            )
        ]


class EffectiveNoiseScale(NamedTuple):
    """The effective noise scale (or critical batch) for a run to the target.

    Attributes:
      value: ``E_min / S_min``: the ``ΔS_min``-weighted mean of the points' ``B_noise`` (``nan``
        with no usable point).
      low: lower end of the interval.
      high: upper end of the interval (``inf`` when the points cannot bound it from above).
      s_min: ``Σ ΔS_min,i``: steps to the target at an infinite batch (the pilot's unit).
      e_min: ``Σ ΔS_min,i · B_noise,i``: examples to the target at a tiny batch.
      num_points: points used.
      num_dropped: points dropped (non-finite or negative ``B_noise``, or non-positive length).
      basis: one of the ``BASIS_*`` constants (``trajectory``/``single_point``/``none`` for noise
        scales, ``branched``/``branched_single_checkpoint``/``none`` for branched values).
      note: the basis and the interval method in words, including what was dropped.
      weights: ``ΔS_min,i / S_min`` per input point, in input order (0 for dropped points).
      confidence: two-sided level of the interval.
    """

    value: float
    low: float
    high: float
    s_min: float
    e_min: float
    num_points: int
    num_dropped: int
    basis: str
    note: str
    weights: np.ndarray
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (floats, ints, lists, str), for JSON."""
        return _plain(self)


def stretch_lengths(steps, *, start: float = 0.0, end: float | None = None) -> np.ndarray:
    """Pilot steps each measurement point stands for: the midpoint rule.

    Point ``i`` at step ``s_i`` covers ``(m_{i-1}, m_i]`` with ``m_i = (s_i + s_{i+1})/2``,
    ``m_{-1} = start`` and ``m_{k-1} = end`` (default: the last point's step).

    Args:
      steps: increasing pilot steps of the points (e.g. of the checkpoints that were branched).
      start: step where the path starts (0: initialization).
      end: step where the path ends (the step the pilot reached the target).

    Returns:
      ``ΔS_ref,i`` per point, summing to ``end - start``.

    Example:
      >>> stretch_lengths([100, 300, 700], end=1000).tolist()
      [200.0, 300.0, 500.0]
    """
    s = np.asarray(steps, np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"steps must be a non-empty 1-D sequence, got shape {s.shape}.")
    end = float(s[-1]) if end is None else float(end)
    finite = np.all(np.isfinite(s)) and math.isfinite(start) and math.isfinite(end)
    if not finite or not np.all(np.diff(s) > 0) or s[0] < start or s[-1] > end:
        raise ValueError(
            f"steps must increase strictly within [start={start}, end={end}], got {s.tolist()}: "
            "pass the points in the order the pilot reached them."
        )
    edges = np.concatenate([[start], (s[:-1] + s[1:]) / 2, [end]])
    return np.diff(edges)


def trajectory_from_metrics(
    rows: Sequence[Mapping[str, Any]],
    num_stretches: int = 3,
    *,
    start_step: int = 0,
    end_step: int | None = None,
    confidence: float = 0.9,
    block_size: int | None = None,
    num_resamples: int = 2000,
    seed: int = 0,
) -> Trajectory:
    """Pool a pilot's per-step noise measurements into ``k`` equal stretches of steps.

    Stretch ``i`` covers steps ``(start + i·w, start + (i+1)·w]``, ``w = (end - start)/k``. Its
    ``b_noise`` is the ratio of means ``mean(trace_cov)/mean(g_sq)`` of the rows in it, with the
    block-bootstrap interval of :func:`gns.smoothing.interval` (never a mean of ratios).

    Args:
      rows: metrics rows (dicts, e.g. from ``metrics.jsonl``); those with ``g_sq`` and
        ``trace_cov`` keys are the measurements (``None`` reads as non-finite: dropped by
        :func:`gns.smoothing.interval` and counted out of ``num_rows``).
      num_stretches: ``k``.
      start_step: start of the path (0: initialization).
      end_step: end of the path (the step the pilot reached the target); default the last
        measured step.
      confidence, block_size, num_resamples, seed: passed to :func:`gns.smoothing.interval`
        (``block_size`` capped at a stretch's finite rows minus one).

    Returns:
      A :class:`Trajectory`. A stretch with fewer than 2 finite rows has ``b_noise = nan``
      (:func:`effective_noise_scale` drops and counts it).

    Example:
      >>> rows = [{"step": s, "g_sq": 1.0 + (s % 2), "trace_cov": 100.0} for s in range(1, 61)]
      >>> t = trajectory_from_metrics(rows, 3)
      >>> t.delta_steps.tolist(), t.b_noise.round(1).tolist()
      ([20.0, 20.0, 20.0], [66.7, 66.7, 66.7])
    """
    if isinstance(num_stretches, bool) or not (
        isinstance(num_stretches, int | np.integer) and num_stretches >= 1
    ):
        raise ValueError(f"num_stretches must be a positive int, got {num_stretches!r}.")
    meas = [r for r in rows if "g_sq" in r and "trace_cov" in r]
    if any("step" not in r for r in meas):
        raise ValueError(
            "a metrics row with 'g_sq' and 'trace_cov' has no 'step': each measurement needs "
            "the pilot step it was taken at."
        )
    if not meas:
        raise ValueError(
            "no metrics row has both 'g_sq' and 'trace_cov': log noise-scale measurements "
            "along the pilot run (the noise stage) before building a trajectory."
        )

    def num(x):
        return np.nan if x is None else float(x)

    step = np.array([num(r["step"]) for r in meas])
    g = np.array([num(r["g_sq"]) for r in meas])
    t = np.array([num(r["trace_cov"]) for r in meas])
    end = float(np.nanmax(step)) if end_step is None else float(end_step)
    if not end > start_step:
        raise ValueError(f"end_step ({end}) must exceed start_step ({start_step}).")
    edges = np.linspace(float(start_step), end, num_stretches + 1)
    k = num_stretches
    b, lo, hi, n = np.full(k, np.nan), np.full(k, np.nan), np.full(k, np.nan), np.zeros(k, int)
    for i in range(k):
        inside = (step > edges[i]) & (step <= edges[i + 1])
        if i == 0:
            inside |= step == edges[0]
        gi, ti = g[inside], t[inside]
        finite = np.isfinite(gi) & np.isfinite(ti)
        n[i] = int(finite.sum())
        if n[i] < 2:
            continue
        res = smoothing.interval(
            gi,
            ti,
            confidence=confidence,
            block_size=None if block_size is None else min(block_size, n[i] - 1),
            num_resamples=num_resamples,
            seed=seed + i,
        )
        b[i], lo[i], hi[i] = res.estimate, res.low, res.high
    return Trajectory(edges[:-1], edges[1:], np.diff(edges), b, lo, hi, n)


def _path_sums(delta, b, ref):
    """``(S_min, E_min)`` contributions per point; ``b = inf`` takes its limit (0, ΔS·B_ref).

    ``B_ref/(B_ref + B_noise)`` and ``B_noise/(B_ref + B_noise)`` are each formed from the
    smaller of ``B_noise/B_ref`` and its inverse, never as ``1 - x``: at ``B_noise/B_ref``
    near ``1e30`` the difference would round to 0 and ``S_min`` vanish."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore"):
        big = b >= ref
        q = np.where(big, ref / np.where(big, b, 1.0), b / ref)  # in [0, 1]
        frac = np.where(big, 1.0, q) / (1.0 + q)  # B_noise / (B_ref + B_noise)
        rest = np.where(big, q, 1.0) / (1.0 + q)  # B_ref / (B_ref + B_noise)
    s_min = delta * rest  # ΔS_ref / (1 + B_noise/B_ref)
    e_min = delta * ref * frac  # ΔS_min · B_noise
    return s_min, e_min


def _ratio(e_min, s_min):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s_min > 0, e_min / np.where(s_min > 0, s_min, 1.0), np.inf)


def effective_noise_scale(
    delta_steps,
    b_noise,
    ref_batch_size,
    *,
    low=None,
    high=None,
    point_confidence: float = 0.9,
    confidence: float = 0.9,
    num_resamples: int = 2000,
    seed: int = 0,
) -> EffectiveNoiseScale:
    """The effective noise scale for a run to the target: ``ΔS_min``-weighted mean along the path.

    With ``ΔS_min,i = ΔS_ref,i / (1 + B_noise,i/B_ref)``: ``S_min = Σ ΔS_min,i``,
    ``E_min = Σ ΔS_min,i B_noise,i`` and the value ``E_min / S_min``, which is what
    ``S(B) = S_min (1 + B_noise/B)`` needs to predict the steps to the target at any ``B``
    (``docs/critical-batch.md``).

    Interval: a two-stage percentile bootstrap. Each resample draws the points iid with
    replacement (the ratio estimator ``Σ e_i / Σ s_i`` over resampled points) and, when the
    points carry intervals, replaces each drawn point's ``B_noise`` by a draw from a split
    log-normal whose central ``point_confidence`` interval is the point's ``[low, high]`` (a low
    end ``<= 0`` or ``nan`` reads as unresolved: draws below the point go to 0; a high end
    ``inf`` or ``nan``: draws above go to ``inf``, whose limit contributes no ``ΔS_min`` and
    ``ΔS_ref·B_ref`` examples). With one usable point the interval is that point's own.

    Args:
      delta_steps: ``ΔS_ref,i``, the pilot steps spent in stretch ``i``
        (:func:`stretch_lengths` turns points' steps into these).
      b_noise: ``B_noise,i`` (e.g. ``b_simple`` of the stretch, or a local branched ``B_crit``).
      ref_batch_size: the pilot's batch ``B_ref`` (a scalar, or one per point).
      low, high: optional per-point interval ends (both or neither).
      point_confidence: the level of the per-point intervals (0.9 for
        :func:`gns.smoothing.interval`'s default).
      confidence: level of the returned interval.
      num_resamples: bootstrap resamples.
      seed: NumPy seed (the result is deterministic given it).

    Returns:
      An :class:`EffectiveNoiseScale`. Points with a non-finite or negative ``B_noise`` or a
      non-positive ``ΔS_ref`` are dropped and counted (``num_dropped``, and named in ``note``);
      one usable point gives ``basis='single_point'``; none gives ``value = nan``,
      ``basis='none'`` (a degenerate measurement is reported, not raised).

    Raises:
      ValueError: empty or mismatched inputs, ``low`` without ``high``, a non-positive
        ``ref_batch_size``, or a bad ``confidence``/``num_resamples``.

    Example:
      >>> r = effective_noise_scale([100, 100], [100.0, 300.0], 100, num_resamples=200)
      >>> round(r.value, 1), round(r.s_min, 1), r.basis   # weights 50 and 25 steps
      (166.7, 75.0, 'trajectory')

    Reference: McCandlish et al. (2018), eq. 2.11 applied piecewise.
    """
    points = (delta_steps, b_noise, ref_batch_size, low, high)
    return _effective(points, (point_confidence, confidence, num_resamples, seed), branched=False)


# The note's ending when S_min or E_min overflow float64 and the value, computed scaled, does not.
_SUMS_OVERFLOW = (
    "; S_min or E_min is beyond the float64 range (inf), the value is not (scaled form)"
)


def _effective(points: tuple, options: tuple, *, branched: bool) -> EffectiveNoiseScale:
    """:func:`effective_noise_scale` of ``points`` ``(ΔS_ref, B_noise, B_ref, low, high)`` with
    ``options`` ``(point_confidence, confidence, num_resamples, seed)``, with the basis names of
    noise scales or of branched values."""
    low = points[3]
    point_confidence, confidence, num_resamples, seed = options
    delta, b, ref, lo, hi = _path_points(*points, point_confidence, confidence, num_resamples)
    what = "local B_crit" if branched else "B_noise"
    keep, drop_note = _usable(delta, b, what)
    dropped, n = int((~keep).sum()), int(keep.sum())
    weights = np.zeros(b.size)
    if n == 0:
        nan = float("nan")
        return EffectiveNoiseScale(
            nan,
            nan,
            nan,
            nan,
            nan,
            0,
            dropped,
            BASIS_NONE,
            f"no usable point: no effective {what}{drop_note}",
            weights,
            float(confidence),
        )

    d, bk, rk, lk, hk = delta[keep], b[keep], ref[keep], lo[keep], hi[keep]
    # In units of the largest ΔS_ref and B_ref (the value scales with B_ref and not with ΔS),
    # so neither ΔS·B_ref nor the sums overflow or underflow before the ratio.
    scales = float(d.max()), float(rk.max())
    s_i, e_i = _scaled_sums(d, bk, rk, scales)
    d_scale, r_scale = scales
    with np.errstate(over="ignore", under="ignore"):
        s_min, e_min = d_scale * float(s_i.sum()), d_scale * r_scale * float(e_i.sum())
        value = float(r_scale * _ratio(e_i.sum(), s_i.sum()))
    weights[keep] = s_i / s_i.sum() if s_i.sum() > 0 else 0.0

    if n == 1:
        value = float(bk[0])  # E_min/S_min is this exactly, up to rounding
        low_v, high_v = float(min(lk[0], value)), float(max(hk[0], value))
        note = (
            f"single point: the {what} of the one usable point, no path average; interval is "
            f"that point's own" + drop_note
        )
        basis = BASIS_BRANCHED_SINGLE if branched else BASIS_SINGLE_POINT
        return EffectiveNoiseScale(
            value, low_v, high_v, s_min, e_min, 1, dropped, basis, note, weights, float(confidence)
        )

    ratios = _bootstrap_ratios(d, bk, rk, (lk, hk), scales, point_confidence, num_resamples, seed)
    low_v, high_v = common.percentile_interval(ratios, confidence, value)
    note = (
        f"{what} along the path: ΔS_min-weighted mean of {n} points; {confidence:.0%} "
        f"percentile bootstrap ({num_resamples} resamples) over the points iid"
        + (" and each point's own interval (split log-normal)" if low is not None else "")
        + drop_note
        + ("" if math.isfinite(s_min) and math.isfinite(e_min) else _SUMS_OVERFLOW)
    )
    basis = BASIS_BRANCHED if branched else BASIS_TRAJECTORY
    return EffectiveNoiseScale(
        value, low_v, high_v, s_min, e_min, n, dropped, basis, note, weights, float(confidence)
    )


def _path_points(
    delta_steps, b_noise, ref_batch_size, low, high, point_confidence, confidence, num_resamples
):
    """The checked inputs of :func:`_effective` as float64 arrays of one shape: ``ΔS_ref``,
    ``B_noise``, ``B_ref`` and the interval ends (the point itself without an interval; an
    unknown ``nan`` end read as unresolved: 0 below, ``inf`` above)."""
    delta = np.asarray(delta_steps, np.float64)
    b = np.asarray(b_noise, np.float64)
    if delta.ndim != 1 or delta.shape != b.shape or delta.size == 0:
        raise ValueError(
            f"delta_steps and b_noise must be non-empty 1-D sequences of one length, got shapes "
            f"{delta.shape} and {b.shape}: one (ΔS_ref, B_noise) pair per stretch."
        )
    ref = np.broadcast_to(np.asarray(ref_batch_size, np.float64), b.shape)
    if not np.all(np.isfinite(ref) & (ref > 0)):
        raise ValueError(f"ref_batch_size must be positive and finite, got {ref_batch_size!r}.")
    if (low is None) != (high is None):
        raise ValueError("pass both low and high (the per-point interval) or neither.")
    common.check_confidence(point_confidence, "point_confidence")
    common.check_resamples(num_resamples, confidence)
    if low is not None:
        lo = np.broadcast_to(np.asarray(low, np.float64), b.shape).copy()
        hi = np.broadcast_to(np.asarray(high, np.float64), b.shape).copy()
    else:
        lo, hi = b.copy(), b.copy()
    lo = np.where(np.isnan(lo), 0.0, lo)  # an unknown end is an unresolved end
    hi = np.where(np.isnan(hi), np.inf, hi)
    if np.any(lo > hi):
        raise ValueError(
            f"low > high at indices {np.flatnonzero(lo > hi).tolist()}: pass each point's "
            "interval as (low, high)."
        )
    return delta, b, ref, lo, hi


def _usable(delta, b, what: str) -> tuple[np.ndarray, str]:
    """The usable points (finite, non-negative ``b`` and a positive finite length), and a note
    on the dropped ones (empty when none is)."""
    bad_b = ~np.isfinite(b) | (b < 0)
    bad_len = ~(np.isfinite(delta) & (delta > 0))
    keep = ~(bad_b | bad_len)
    dropped = int((~keep).sum())
    if not dropped:
        return keep, ""
    return keep, (
        f"; dropped {dropped} of {b.size} points ({int((bad_b & ~bad_len).sum())} with a "
        f"non-finite or negative {what} at indices {np.flatnonzero(bad_b).tolist()}, "
        f"{int(bad_len.sum())} with a non-positive or non-finite length)"
    )


def _scaled_sums(delta, b, ref, scales):
    """:func:`_path_sums` in units of ``scales = (ΔS scale, B_ref scale)``."""
    d_scale, r_scale = scales
    with np.errstate(over="ignore", under="ignore"):
        return _path_sums(delta / d_scale, b / r_scale, ref / r_scale)


def _bootstrap_ratios(d, b, ref, interval, scales, point_confidence, num_resamples, seed):
    """``E_min/S_min`` of each resample: the points drawn iid with replacement, each drawn
    point's ``B_noise`` from a split log-normal whose central ``point_confidence`` interval is
    its ``interval`` (see :func:`effective_noise_scale`)."""
    lo, hi = interval
    n = b.size
    rng = np.random.default_rng(seed)
    z_pt = statistics.NormalDist().inv_cdf(0.5 + float(point_confidence) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_b = np.log(b)
        sd_lo = np.where(lo > 0, np.maximum(log_b - np.log(np.maximum(lo, 1e-300)), 0), np.inf)
        sd_hi = np.maximum(np.log(hi) - log_b, 0) / z_pt
        sd_lo = sd_lo / z_pt
    idx = rng.integers(0, n, size=(num_resamples, n))
    z = rng.standard_normal((num_resamples, n))
    with np.errstate(invalid="ignore", over="ignore"):
        spread = np.where(z < 0, z * sd_lo[idx], z * sd_hi[idx])
        spread = np.where(z == 0, 0.0, spread)
        b_star = np.where(b[idx] > 0, np.exp(log_b[idx] + spread), 0.0)
    s_star, e_star = _scaled_sums(d[idx], b_star, ref[idx], scales)
    with np.errstate(over="ignore"):
        return scales[1] * _ratio(e_star.sum(1), s_star.sum(1))


# ---------------------------------------------------------------------------------------------
# 2. The branched critical batch.


class BranchedCriticalBatch(NamedTuple):
    """The local critical batch at one checkpoint, measured by forks.

    Attributes:
      b_crit: the local ``B_crit``: the ``B`` in ``E(B)/E(B_0) = (1 + B/B_crit)/(1 + B_0/B_crit)``
        fitted (least squares in log) to the examples each fork needs to reach the loss the
        smallest fork ``B_0`` reached; ``inf`` when no fork was slower (beyond the forked
        range), ``0`` when even the second fork made no progress (below it).
      low: lower end of the (expanded percentile) bootstrap interval (``nan`` with one repeat
        and a scalar eval).
      high: upper end of the bootstrap interval.
      b_tolerance: Merrill's rule on the same forks: the largest batch (interpolated in
        ``log2 B``) whose final loss stays within ``tolerance × (loss decrease of the smallest
        fork)`` of the smallest fork's final loss; ``inf`` if all forks keep up.
      batch_sizes: the forked batch sizes (increasing).
      lr_multipliers: the learning-rate multiplier of each fork (relative to the pilot's).
      start_loss: the held-out loss at the checkpoint.
      final_loss: mean held-out loss of each fork after ``num_examples`` examples (over the
        repeats and the held-out batch).
      examples_ratio: ``E(B)/E(B_0)`` per fork, the geometric mean over the repeats (1 for the
        smallest; capped at ``N/B_0`` where a fork made no progress).
      num_examples: examples per fork ``N``.
      num_repeats: forks per batch size on disjoint data offsets.
      examples_forked: training examples consumed by all forks.
      cost_fraction: ``examples_forked / pilot_examples`` (``nan`` when not given).
      confidence: two-sided level of the interval.
      interval_method: the interval in words.
      note: the rule and anything to be careful about, in words.
      resolved: ``True`` when the value can be used as evidence: within ``[B_0/2, 2·B_max]``
        of the forked batches, an interval with ``0 < low`` and a finite ``high``, and a
        smallest fork that made progress and did not diverge. ``False`` (``note`` then starts
        with ``unresolved``) says to fork other batch sizes, longer, or with more repeats.
      excluded: ``((B, why), ...)``: forks whose held-out loss was non-finite or ended above the
        checkpoint's in any repeat (diverged); they are left out of the fit (``batch_sizes``,
        ``final_loss`` and ``examples_ratio`` hold the kept forks only).
    """

    b_crit: float
    low: float
    high: float
    b_tolerance: float
    batch_sizes: tuple[int, ...]
    lr_multipliers: tuple[float, ...]
    start_loss: float
    final_loss: tuple[float, ...]
    examples_ratio: tuple[float, ...]
    num_examples: int
    num_repeats: int
    examples_forked: int
    cost_fraction: float
    confidence: float
    interval_method: str
    note: str
    resolved: bool
    excluded: tuple[tuple[int, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (floats, ints, lists, str), for JSON."""
        return _plain(self) | {"excluded": [[int(b), why] for b, why in self.excluded]}


def lr_multipliers(
    ref_batch_size: int, batch_sizes: Sequence[int], optimizer: str, b_noise: float = math.inf
) -> tuple[float, ...]:
    """Learning-rate multipliers ``lr(B)/lr(B_ref)`` of a rule (:func:`gns.scaling.multiplier`).

    Args:
      ref_batch_size: the pilot's batch size.
      batch_sizes: the fork batch sizes.
      optimizer: an optimizer name (``sgd``, ``momentum``, ``adam``, ...) or a rule name
        (``sgd``, ``linear``, ``sqrt``, ``constant``): :func:`gns.scaling.rule_for`.
      b_noise: the noise scale of the ``sgd`` rule (``inf``: linear scaling).

    Returns:
      One multiplier per batch size (1 at ``ref_batch_size``).

    Example:
      >>> lr_multipliers(64, [32, 64, 256], "adam")
      (0.7071067811865476, 1.0, 2.0)
    """
    rule = scaling.rule_for(optimizer, "optimizer")
    if rule == "sgd" and not b_noise > 0:  # nan or not positive: no rate to derive
        raise ValueError(
            f"b_noise={b_noise!r}: the 'sgd' rule needs a noise scale > 0 (inf: linear scaling)."
        )
    return tuple(
        float(scaling.multiplier(rule, b, ref_batch_size, b_noise, xp=np)) for b in batch_sizes
    )


def _leaf_desc(x) -> str:
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    return type(x).__name__ if shape is None else f"{dtype}{list(shape)}"


def check_state(state, template, *, name: str = "state") -> None:
    """Raise a clear error unless ``state`` has ``template``'s tree structure, shapes and dtypes.

    Use it on a restored checkpoint before forking: a checkpoint restored without a target
    comes back as plain dicts, and the step would then fail deep inside the optimizer.

    Args:
      state: the pytree to check (e.g. an orbax-restored train state).
      template: a pytree of the expected structure (e.g. the freshly initialized train state).
      name: what ``state`` is, for the message (e.g. the checkpoint's path).

    Raises:
      ValueError: naming ``name`` and the first differing leaf path.

    Example:
      >>> check_state({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, name="ckpt/100")
    """
    s_leaves, s_def = jax.tree_util.tree_flatten_with_path(state)
    t_leaves, t_def = jax.tree_util.tree_flatten_with_path(template)
    hint = (
        "restore it with the pilot's train state as the target (orbax: "
        "args=ocp.args.StandardRestore(template)) so it has the structure the step expects."
    )
    if s_def != t_def:
        s_paths = [jax.tree_util.keystr(p) for p, _ in s_leaves]
        t_paths = [jax.tree_util.keystr(p) for p, _ in t_leaves]
        only_s = sorted(set(s_paths) - set(t_paths))[:3]
        only_t = sorted(set(t_paths) - set(s_paths))[:3]
        raise ValueError(
            f"{name} does not match the expected state structure: {len(s_paths)} leaves vs "
            f"{len(t_paths)} expected; only in {name}: {only_s or 'none'}; missing: "
            f"{only_t or 'none'} (containers: {str(s_def)[:120]} vs {str(t_def)[:120]}). {hint}"
        )
    for (path, a), (_, b) in zip(s_leaves, t_leaves, strict=True):
        if getattr(a, "shape", None) != getattr(b, "shape", None) or getattr(
            a, "dtype", None
        ) != getattr(b, "dtype", None):
            raise ValueError(
                f"{name} does not match the expected state at {jax.tree_util.keystr(path)}: "
                f"{_leaf_desc(a)} vs {_leaf_desc(b)} expected. {hint}"
            )


def _copy(state):
    """A fresh copy of every array leaf: a step that donates its input cannot touch ``state``."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, state)


def fork(
    state,
    step,
    batch_fn,
    batch_size: int,
    num_steps: int,
    *,
    first_index: int = 0,
    eval_fn=None,
    eval_at=(),
):
    """Run ``num_steps`` steps of ``step`` from a copy of ``state`` on batches of ``batch_fn``.

    Step ``i`` (0-based) consumes ``batch_fn(batch_size, first_index + i)``: examples
    ``[(first_index + i)·B, (first_index + i + 1)·B)`` of the caller's stream. ``state`` itself is
    never modified (its array leaves are copied first, so a donating step is safe).

    Args:
      state: the checkpoint pytree.
      step: ``step(state, batch) -> state`` (jit it once per batch size).
      batch_fn: ``batch_fn(batch_size, index) -> batch``.
      batch_size: ``B``.
      num_steps: steps to run.
      first_index: index of the first batch (a data offset, in batches of ``B``).
      eval_fn: optional ``eval_fn(state) -> loss`` (scalar or per-example losses).
      eval_at: step counts (1-based) after which to evaluate.

    Returns:
      ``(final_state, {steps_done: np.ndarray of losses})``.

    Example:
      >>> step = jax.jit(lambda w, b: w - 0.1 * (w - b.mean()))
      >>> w, _ = fork(jnp.zeros(()), step, lambda n, i: jnp.full((n,), 1.0), 4, 10)
      >>> round(float(w), 4)
      0.6513
    """
    s = _copy(state)
    evals = {}
    wanted = set(eval_at)
    structure = jax.tree.structure(s)
    for i in range(num_steps):
        s = step(s, batch_fn(batch_size, first_index + i))
        if i == 0 and jax.tree.structure(s) != structure:
            raise ValueError(
                f"the step at batch {batch_size} returned a state of another structure than it "
                f"was given ({str(jax.tree.structure(s))[:120]} vs {str(structure)[:120]}): "
                "make_step must return step(state, batch) -> state of the same pytree."
            )
        if eval_fn is not None and (i + 1) in wanted:
            evals[i + 1] = np.atleast_1d(np.asarray(eval_fn(s), np.float64))
    return s, evals


def _ruler_points(num_steps: int, num_points: int) -> list[int]:
    """Step counts at which the smallest fork is evaluated: powers of 2 and an even grid."""
    grid = {max(1, round(num_steps * m / num_points)) for m in range(1, num_points + 1)}
    grid |= {2**p for p in range(int(math.log2(num_steps)) + 1)}
    return sorted(x for x in grid if 1 <= x <= num_steps)


def _nonincreasing(y: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit of ``y`` (pool adjacent violators); ``inf`` stays put."""
    finite = np.isfinite(y)
    if not finite.all():  # a diverged point: everything from there on is "no better than inf"
        first = int(np.argmin(finite))
        head = _nonincreasing(y[:first]) if first else y[:0]
        return np.concatenate([head, np.full(y.size - first, np.inf)])
    values, weights, sizes = [], [], []
    for v in y:
        values.append(float(v)), weights.append(1.0), sizes.append(1)
        while len(values) > 1 and values[-2] < values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (weights[-2] * values[-2] + weights[-1] * values[-1]) / w
            weights[-2], sizes[-2] = w, sizes[-2] + sizes[-1]
            del values[-1], weights[-1], sizes[-1]
    return np.repeat(values, sizes)


def _examples_ratio(ruler_x, ruler_y, final, n_examples):
    """``N / E_0(L)`` per fork: ``E_0(L)`` the examples the smallest fork needed to reach ``L``.

    ``ruler_x`` starts with 0 (the checkpoint), ``ruler_y`` is the smallest fork's loss there.
    The ruler is read on its non-increasing least-squares fit (isotonic regression): a running
    minimum would reach each level early on a noisy curve and bias the ratios up. A fork the
    ruler never matches (better than the smallest) gets ratio 1; one with no progress (or a
    non-finite loss) gets the cap ``N / ruler_x[1]``.
    """
    env = _nonincreasing(np.where(np.isfinite(ruler_y), ruler_y, np.inf))
    cap = n_examples / ruler_x[1]
    out = np.empty(final.shape)
    for j, loss in enumerate(final):
        if not np.isfinite(loss) or loss >= env[0]:
            out[j] = cap
            continue
        k = int(np.argmax(env <= loss)) if np.any(env <= loss) else -1
        if k <= 0:
            out[j] = 1.0
            continue
        y0, y1, x0, x1 = env[k - 1], env[k], ruler_x[k - 1], ruler_x[k]
        x = x1 if y0 == y1 else x0 + (x1 - x0) * (y0 - loss) / (y0 - y1)
        out[j] = min(cap, max(1.0, n_examples / x))
    return out


_GRID_SPAN = 10.0  # the fit searches B_crit in [B_0 / 2^10, B_max · 2^10]


def _fit_b_crit(batch_sizes, ratios):
    """Least squares on ``log r_j`` of ``r(B) = (B_crit + B)/(B_crit + B_0)``; rows: resamples."""
    b = np.asarray(batch_sizes, np.float64)
    log2_grid = np.arange(math.log2(b[0]) - _GRID_SPAN, math.log2(b[-1]) + _GRID_SPAN, 1 / 256)
    bc = 2.0**log2_grid
    model = np.log((bc[:, None] + b[None, 1:]) / (bc[:, None] + b[0]))  # (G, J-1)
    r = np.atleast_2d(np.log(ratios))[:, 1:]  # (R, J-1)
    sse = (r**2).sum(1)[:, None] - 2 * r @ model.T + (model**2).sum(1)[None, :]
    best = np.argmin(sse, axis=1)
    out = bc[best]
    out = np.where(best == len(bc) - 1, np.inf, out)
    return np.where(best == 0, 0.0, out)


def _b_tolerance(batch_sizes, start_loss, final, tolerance):
    """Merrill's rule: largest B (log2-interpolated) with final loss <= L_0 + tol·(start - L_0)."""
    thr = final[0] + tolerance * max(start_loss - final[0], 0.0)
    ok = np.where(np.isfinite(final), final, np.inf) <= thr
    if ok.all():
        return math.inf
    j = int(np.argmin(ok))  # first failing fork (> 0: the smallest always passes)
    lo, hi = math.log2(batch_sizes[j - 1]), math.log2(batch_sizes[j])
    if not np.isfinite(final[j]):
        return float(batch_sizes[j - 1])
    frac = (thr - final[j - 1]) / (final[j] - final[j - 1]) if final[j] != final[j - 1] else 0.0
    return float(2.0 ** (lo + (hi - lo) * min(max(frac, 0.0), 1.0)))


def _expanded_alpha(alpha: float, n: int) -> float:
    """Hesterberg's expanded percentile level: Φ⁻¹(1 − α'/2) = sqrt(n/(n−1))·t_{n−1}(1 − α/2)."""
    t = scipy.stats.t.ppf(1 - alpha / 2, n - 1)
    return float(2 * scipy.stats.norm.sf(math.sqrt(n / (n - 1)) * t))


def branched_critical_batch(
    state,
    make_step: Callable[[int, float], Callable[[Any, Any], Any]],
    batch_fn: Callable[[int, int], Any],
    eval_fn: Callable[[Any], Any],
    *,
    ref_batch_size: int,
    num_examples: int,
    pilot_examples: float | None = None,
    exponents: Sequence[int] = (-2, -1, 0, 1, 2, 3),
    lr_multiplier: Callable[[int], float] | Sequence[float] | None = None,
    num_repeats: int = 4,
    tolerance: float = 0.1,
    num_ruler_points: int = 32,
    template=None,
    checkpoint_name: str = "state",
    confidence: float = 0.9,
    num_resamples: int = 1000,
    seed: int = 0,
    jit: bool = True,
) -> BranchedCriticalBatch:
    """The local critical batch at a checkpoint, from short forks at ``B_ref·2^j``.

    From ``state`` (a checkpoint of the pilot: any pytree, optimizer state included), fork one
    run per batch size ``B_j = ref_batch_size·2^j`` for the same ``N = num_examples`` examples
    (``N/B_j`` steps) with the learning rate scaled by ``lr_multiplier``. Every fork at every
    batch size consumes the same examples: repeat ``r`` takes examples ``[r·N, (r+1)·N)`` of the
    caller's stream (batch indices ``r·N/B_j + i``), so the forks train on examples
    ``[0, num_repeats·N)`` of ``batch_fn`` and nothing else: take the held-out batch of
    ``eval_fn`` from outside them (e.g. from index ``num_repeats·N`` on, or another split). The
    smallest fork is evaluated on the fixed held-out batch at ``num_ruler_points`` points along
    the way; every fork at its end.

    The rule (a local fit of McCandlish's tradeoff, ``docs/critical-batch.md``): the smallest
    fork's loss curve is the ruler; for each fork, ``E_0(L_j)`` is the number of examples the
    smallest fork needed to reach that fork's final loss ``L_j``, so ``r_j = N/E_0(L_j)`` is the
    examples batch ``B_j`` needs relative to ``B_0`` for equal loss. Each repeat is read on its
    own ruler (its forks share its data), ``log r_j`` is averaged over the repeats, and
    ``r(B) = (1 + B/B_crit)/(1 + B_0/B_crit)`` is fitted by least squares in ``log r``.
    Merrill's tolerance rule is reported beside it (``b_tolerance``). The result is the critical
    batch of the recipe (optimizer and learning-rate rule), see ``docs/critical-batch.md``.

    Interval: expanded percentile bootstrap (Hesterberg 2015) over the repeats (iid,
    ``num_repeats`` data offsets) and, when ``eval_fn`` returns per-example losses, over the
    held-out examples (the same draw for every fork and ruler point); each resample re-reads
    the ratios and refits. The percentiles are read at the level ``1 - α'`` whose normal
    quantile is ``sqrt(n/(n−1))·t_{n−1}(1 − α/2)`` (``α = 1 - confidence``, ``n`` the repeats,
    or the held-out examples with one repeat), and the interval contains ``b_crit``. Measured
    coverage at nominal 0.9 with 8 repeats on a noisy quadratic: see ``docs/critical-batch.md``.

    Args:
      state: the checkpoint pytree; never modified.
      make_step: ``make_step(batch_size, lr_multiplier) -> step(state, batch) -> state``. Called
        once per batch size; the returned step is wrapped in ``jax.jit`` (``jit=True``), so each
        batch size compiles once (bake the multiplier in as a constant or scale the updates).
      batch_fn: ``batch_fn(batch_size, index) -> batch``: examples
        ``[index·B, (index+1)·B)`` of one fixed stream (the pilot's next examples).
      eval_fn: ``eval_fn(state) -> loss`` on one fixed held-out batch: a scalar, or a vector of
        per-example losses (enables the held-out bootstrap).
      ref_batch_size: the pilot's batch ``B_ref``.
      num_examples: ``N``, a multiple of the largest fork batch.
      pilot_examples: examples of the whole pilot run to the target, for ``cost_fraction``.
      exponents: increasing ints ``j`` (at least 2).
      lr_multiplier: the learning-rate rule: ``f(batch_size) -> lr(B)/lr(B_ref)`` or one value
        per exponent; default 1 everywhere. :func:`lr_multipliers` gives the configured rule.
      num_repeats: forks per batch size on disjoint data (``>= 2`` for an interval with a
        scalar ``eval_fn``; with 2 the expanded interval is wide: 4 or more is better).
      tolerance: Merrill's rule tolerance, a fraction of the smallest fork's loss decrease.
      num_ruler_points: evaluations of the smallest fork (plus the powers of 2 of its steps).
      template: optional expected state (e.g. the freshly initialized train state):
        :func:`check_state` checks ``state`` against it first.
      checkpoint_name: what ``state`` is, for error messages (e.g. its checkpoint path).
      confidence: level of the interval.
      num_resamples: bootstrap resamples.
      seed: NumPy seed of the bootstrap.
      jit: wrap each step in ``jax.jit``.

    Returns:
      A :class:`BranchedCriticalBatch`.

    Raises:
      ValueError: exponents not strictly increasing or fewer than 2, ``num_examples`` not a
        positive multiple of the largest fork batch, a non-integer batch, bad multipliers, or a
        ``state`` that does not match ``template`` (the message names ``checkpoint_name``), a
        non-finite held-out loss at ``state``, a bad ``confidence`` or ``num_resamples``.

    Example:
      >>> # state, make_step, batch_fn, eval_fn from your training code; see the test file
      >>> res = branched_critical_batch(state, make_step, batch_fn, eval_fn,
      ...                               ref_batch_size=64, num_examples=64 * 32)  # doctest: +SKIP

    Reference: Merrill et al. (2025), arXiv 2505.23971 (branched runs from checkpoints);
    McCandlish et al. (2018), eq. 2.11 (the tradeoff fitted locally).
    """
    sizes = _fork_sizes(ref_batch_size, exponents, num_examples, num_repeats)
    mults = _fork_multipliers(lr_multiplier, sizes)
    common.check_resamples(num_resamples, confidence)
    if template is not None:
        check_state(state, template, name=checkpoint_name)

    start = _start_losses(state, eval_fn, checkpoint_name)
    ruler_steps = _ruler_points(num_examples // sizes[0], num_ruler_points)
    forks = (make_step, batch_fn, eval_fn, jit)
    shape = (num_repeats, len(ruler_steps) + len(sizes) - 1, start.size)
    losses = _fork_losses(state, forks, sizes, mults, ruler_steps, num_examples, shape)
    n_r = len(ruler_steps)
    start_loss = float(start.mean())
    sizes, mults, losses, excluded = _without_diverged(sizes, mults, losses, n_r, start_loss)
    ruler_diverged = sizes[0] in excluded
    ruler_x = np.array([0.0] + [k * sizes[0] for k in ruler_steps])
    # Each repeat's forks share its data, so each repeat is read on its own ruler (the noise
    # common to its forks cancels); the repeats' log ratios are then averaged.
    num_h = start.size
    log_r = _log_ratios(losses, start, np.full(num_h, 1.0 / num_h), ruler_x, num_examples)
    ratios = np.exp(log_r.mean(0))
    b_crit = float(_fit_b_crit(sizes, ratios)[0]) if len(sizes) >= 2 else math.nan
    final = losses.mean(axis=(0, 2))
    final = np.concatenate([[final[n_r - 1]], final[n_r:]])
    if len(sizes) >= 2 and (num_repeats >= 2 or num_h >= 2):
        boot = _bootstrap_examples_ratios(
            losses, start, ruler_x, num_examples, log_r, num_resamples, seed
        )
        low, high, method = _expanded_interval(
            _fit_b_crit(sizes, boot), b_crit, confidence, num_repeats, num_h, num_resamples
        )
    else:
        low = high = float("nan")
        method = "none: one repeat and a scalar eval_fn; use num_repeats >= 2 or per-example losses"
    progress = start_loss - final[0] > 0
    resolved, notes = _resolution(sizes, excluded, b_crit, (low, high), progress, ruler_diverged)
    forked = num_examples * num_repeats * (len(sizes) + len(excluded) - ruler_diverged)
    return BranchedCriticalBatch(
        b_crit=b_crit,
        low=low,
        high=high,
        b_tolerance=_b_tolerance(sizes, start_loss, final, tolerance),
        batch_sizes=tuple(sizes),
        lr_multipliers=tuple(mults),
        start_loss=start_loss,
        final_loss=tuple(float(x) for x in final),
        examples_ratio=tuple(float(x) for x in ratios),
        num_examples=int(num_examples),
        num_repeats=num_repeats,
        examples_forked=int(forked),
        cost_fraction=float(forked / pilot_examples) if pilot_examples else float("nan"),
        confidence=float(confidence),
        interval_method=method,
        note="; ".join(notes),
        resolved=resolved,
        excluded=tuple(excluded.items()),
    )


def _start_losses(state, eval_fn, checkpoint_name: str) -> np.ndarray:
    """The held-out losses at the checkpoint (a vector), all finite: a ``ValueError`` else."""
    start = np.atleast_1d(np.asarray(eval_fn(state), np.float64))
    if not np.all(np.isfinite(start)):
        bad = int(np.sum(~np.isfinite(start)))
        raise ValueError(
            f"the held-out loss of {checkpoint_name} is not finite ({bad} of {start.size} "
            "values): no fork can be read against it. Check the checkpoint's parameters and "
            "eval_fn's batch (a diverged pilot, or an example the model cannot score)."
        )
    return start


def _fork_losses(state, forks, sizes, mults, ruler_steps, num_examples, shape):
    """``losses[r, p, h]`` of ``shape``: repeat ``r``, point ``p`` (the smallest fork at
    ``ruler_steps``, then the final loss of every other fork), held-out example ``h``; ``forks``
    is ``(make_step, batch_fn, eval_fn, jit)``, each batch size compiled once."""
    make_step, batch_fn, eval_fn, jit = forks
    losses = np.empty(shape)
    for j, (b, m) in enumerate(zip(sizes, mults, strict=True)):
        step = jax.jit(make_step(b, m)) if jit else make_step(b, m)
        n_steps = num_examples // b
        at = ruler_steps if j == 0 else (n_steps,)
        for r in range(shape[0]):
            _, ev = fork(
                state,
                step,
                batch_fn,
                b,
                n_steps,
                first_index=r * n_steps,
                eval_fn=eval_fn,
                eval_at=at,
            )
            if j == 0:
                losses[r, : len(ruler_steps)] = np.stack([ev[k] for k in ruler_steps])
            else:
                losses[r, len(ruler_steps) + j - 1] = ev[n_steps]
    return losses


def _fork_sizes(ref_batch_size, exponents, num_examples, num_repeats) -> list[int]:
    """The fork batch sizes ``ref_batch_size·2^j``, checked with the examples and repeats."""
    whole = [isinstance(e, int | np.integer) and not isinstance(e, bool) for e in exponents]
    exps = [int(e) for e in exponents]
    if not all(whole) or len(exps) < 2 or any(b <= a for a, b in zip(exps, exps[1:], strict=False)):
        raise ValueError(
            f"exponents must be at least 2 strictly increasing ints, got {list(exponents)}: "
            "e.g. (-2, -1, 0, 1, 2, 3) forks at B_ref/4 ... 8·B_ref."
        )
    sizes = [ref_batch_size * 2.0**e for e in exps]
    if any(s < 1 or s != int(s) for s in sizes):
        raise ValueError(
            f"every fork batch ref_batch_size·2^j must be a positive int, got {sizes}: use "
            "exponents >= -log2 of the power of 2 dividing ref_batch_size."
        )
    sizes = [int(s) for s in sizes]
    if not (isinstance(num_examples, int | np.integer) and num_examples > 0) or (
        num_examples % sizes[-1]
    ):
        raise ValueError(
            f"num_examples must be a positive multiple of the largest fork batch {sizes[-1]}, "
            f"got {num_examples!r}: e.g. num_examples={sizes[-1] * 8} gives the largest fork 8 "
            "steps."
        )
    if isinstance(num_repeats, bool) or not (isinstance(num_repeats, int) and num_repeats >= 1):
        raise ValueError(f"num_repeats must be a positive int, got {num_repeats!r}.")
    return sizes


def _fork_multipliers(lr_multiplier, sizes) -> list[float]:
    """One positive finite learning-rate multiplier per fork batch (1 without a rule)."""
    if lr_multiplier is None:
        mults = [1.0] * len(sizes)
    elif callable(lr_multiplier):
        mults = [float(lr_multiplier(b)) for b in sizes]
    else:
        mults = [float(m) for m in lr_multiplier]
    if len(mults) != len(sizes) or not all(math.isfinite(m) and m > 0 for m in mults):
        raise ValueError(
            f"lr_multiplier must give one positive finite multiplier per fork batch {sizes}, got "
            f"{mults}."
        )
    return mults


def _log_ratios(losses, start, w, ruler_x, num_examples) -> np.ndarray:
    """``log r`` (repeats, forks) under held-out weights ``w``, each repeat on its own ruler.

    ``losses[r, p, h]``: repeat ``r``, point ``p`` (the ruler's points, then the final loss of
    every fork but the smallest), held-out example ``h``; ``start`` the checkpoint's losses."""
    n_r = ruler_x.size - 1
    curves, start_w = losses @ w, float(start @ w)
    out = np.empty((losses.shape[0], losses.shape[1] - n_r + 1))
    for r in range(losses.shape[0]):
        final_r = np.concatenate([[curves[r, n_r - 1]], curves[r, n_r:]])
        ruler_y = np.concatenate([[start_w], curves[r, :n_r]])
        out[r] = np.log(_examples_ratio(ruler_x, ruler_y, final_r, num_examples))
    out[:, 0] = 0.0  # the ruler itself (its envelope may end below its last point)
    return out


def _bootstrap_examples_ratios(losses, start, ruler_x, num_examples, log_r, num_resamples, seed):
    """Examples ratios (resamples, forks): the repeats drawn iid and, with per-example losses,
    the held-out examples (the same draw for every fork and ruler point)."""
    num_repeats, num_h = losses.shape[0], start.size
    rng = np.random.default_rng(seed)
    boot = np.empty((num_resamples, log_r.shape[1]))
    for i in range(num_resamples):
        reps = rng.integers(0, num_repeats, num_repeats)
        if num_h >= 2:
            w = np.bincount(rng.integers(0, num_h, num_h), minlength=num_h) / num_h
            log_r = _log_ratios(losses, start, w, ruler_x, num_examples)
        boot[i] = np.exp(log_r[reps].mean(0))
    return boot


def _expanded_interval(fits, b_crit, confidence, num_repeats, num_h, num_resamples):
    """``(low, high, method in words)``: the expanded percentile interval of the fits.

    Hesterberg 2015: the percentile interval of a mean of n draws is too narrow by
    sqrt((n-1)/n) and by z/t_{n-1}; read it at the level whose normal quantile is
    sqrt(n/(n-1))·t_{n-1}, n the number of repeats (or held-out examples with one repeat)."""
    n_eff = num_repeats if num_repeats >= 2 else num_h
    alpha = _expanded_alpha(1 - float(confidence), n_eff)
    low, high = common.percentile_interval(fits, 1 - alpha, b_crit)
    parts = [f"{num_repeats} fork repeats (data offsets)"] if num_repeats >= 2 else []
    parts += [f"{num_h} held-out examples"] if num_h >= 2 else []
    method = (
        f"{confidence:.0%} expanded percentile bootstrap ({num_resamples} resamples) over "
        + " and ".join(parts)
    )
    return low, high, method


def _resolution(sizes, excluded, b_crit, interval, progress, ruler_diverged):
    """``(resolved, notes)``: whether ``b_crit`` can be used as evidence, and the notes on it
    (``"unresolved"`` first when it cannot)."""
    low, high = interval
    notes = _range_notes(sizes, excluded, b_crit)
    if not progress:
        notes.append("the smallest fork made no progress: the forks are too short or diverge")
    resolved = bool(
        progress
        and not ruler_diverged
        and sizes[0] / 2 <= b_crit <= 2 * sizes[-1]
        and low > 0
        and math.isfinite(high)
    )
    if not resolved:
        notes.insert(0, "unresolved")
    return resolved, notes


def _range_notes(sizes, excluded, b_crit) -> list[str]:
    """The rule, the diverged forks and where ``b_crit`` lies against the forked range."""
    notes = ["local fit of r(B) = (1 + B/B_crit)/(1 + B_0/B_crit) to the examples ratios"]
    notes += [f"fork at B = {b} excluded: {why} (diverged)" for b, why in excluded.items()]
    if len(sizes) < 2:
        notes.append("fewer than 2 forks kept: nothing to fit; fork smaller batches or lower rates")
    elif math.isinf(b_crit):
        notes.append(f"no slowdown up to B = {sizes[-1]}: B_crit is beyond the forked range")
    elif b_crit == 0.0:
        notes.append(
            f"the forks at B >= {sizes[1]} needed B/B_0 times the examples of B = {sizes[0]} or "
            "more (no fewer steps at a larger batch): B_crit is below the forked range"
        )
    elif not sizes[0] / 2 <= b_crit <= 2 * sizes[-1]:
        notes.append(f"B_crit extrapolated outside the forked batches [{sizes[0]}, {sizes[-1]}]")
    return notes


def _without_diverged(sizes, mults, losses, num_ruler, start_loss):
    """The forks (and their columns of ``losses``) whose mean held-out loss stayed finite and at
    or below the checkpoint's ``start_loss`` in every repeat, and ``{B: why}`` for the others
    (the smallest fork, the ruler, is kept and named when it diverged)."""
    final = losses[:, num_ruler - 1 :].mean(axis=2)  # repeats × forks, the smallest first
    excluded = {}
    for j, b in enumerate(sizes):
        worst = float(np.max(np.where(np.isfinite(final[:, j]), final[:, j], np.inf)))
        if worst > start_loss:
            shown = "non-finite" if math.isinf(worst) else f"{worst:.4g}"
            excluded[int(b)] = f"held-out loss {shown} above the checkpoint's {start_loss:.4g}"
    keep = [j for j, b in enumerate(sizes) if j == 0 or b not in excluded]
    losses = losses[:, list(range(num_ruler)) + [num_ruler + j - 1 for j in keep[1:]]]
    return [sizes[j] for j in keep], [mults[j] for j in keep], losses, excluded


def effective_critical_batch(
    results: Sequence[BranchedCriticalBatch],
    delta_steps,
    ref_batch_size,
    *,
    drop_unresolved: bool = False,
    confidence: float = 0.9,
    num_resamples: int = 2000,
    seed: int = 0,
) -> EffectiveNoiseScale:
    """The effective critical batch for a run to the target from local values along the path.

    The same ``ΔS_min`` weighting as :func:`effective_noise_scale`, with each checkpoint's local
    ``B_crit`` and its interval (taken as a ``confidence``-level interval) in place of
    ``B_noise``: ``Σ ΔS_min,i B_crit,i / Σ ΔS_min,i``. A checkpoint whose ``B_crit`` is ``inf``
    (beyond the forked range) or ``nan`` is dropped and counted: fork larger batches there.

    Args:
      results: :class:`BranchedCriticalBatch` per checkpoint, in path order.
      delta_steps: pilot steps each checkpoint stands for (e.g.
        ``stretch_lengths(checkpoint_steps, end=target_step)``).
      ref_batch_size: the pilot's batch size.
      drop_unresolved: drop (and count) checkpoints whose result is not ``resolved``, instead
        of weighing them in with their (wide) intervals.
      confidence, num_resamples, seed: as in :func:`effective_noise_scale`.

    Returns:
      An :class:`EffectiveNoiseScale` with ``basis`` ``branched``,
      ``branched_single_checkpoint`` or ``none``.

    Example:
      >>> # res = [branched_critical_batch(ckpt, ...) for ckpt in checkpoints]
      >>> # eff = effective_critical_batch(res, stretch_lengths(steps, end=target), 64)
    """
    if len(results) == 0:
        raise ValueError("results is empty: branch at least one checkpoint.")
    b = [r.b_crit if (r.resolved or not drop_unresolved) else math.nan for r in results]
    lo = [r.low for r in results]
    hi = [r.high for r in results]
    options = (results[0].confidence, confidence, num_resamples, seed)
    return _effective((delta_steps, b, ref_batch_size, lo, hi), options, branched=True)
