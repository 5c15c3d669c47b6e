"""The steps/examples tradeoff of large-batch training (McCandlish et al. 2018, eq. 2.11).

The number of optimizer steps ``S`` and of training examples ``E = B·S`` needed to reach a fixed
target (a loss or an accuracy) obey ``(S/S_min − 1)(E/E_min − 1) = 1``, which is the same as::

    S(B) = S_min + E_min / B,        E(B) = B·S(B) = E_min + S_min·B,        B_crit = E_min / S_min

* :func:`steps_to_target` reads one training curve and returns the step at which it first reached
  the target;
* :func:`fit` fits ``S_min`` and ``E_min`` to several (batch size, steps) points by least squares
  on ``log S`` (relative errors) and gives bootstrap intervals;
* :func:`predict_steps` and :func:`predict_examples` evaluate the fitted curve.

Example:
  >>> import numpy as np
  >>> b = np.array([32, 64, 128, 256, 512])
  >>> f = fit(b, 1000 + 64000 / b, num_bootstrap=0)
  >>> round(f.s_min), round(f.e_min), round(f.b_crit)
  (1000, 64000, 64)

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import scipy.optimize

from gns.common import check_confidence, check_resamples, percentile_interval

__all__ = ["TradeoffFit", "steps_to_target", "fit", "predict_steps", "predict_examples"]

# How far (in nats) the fitted log-parameters may move from the scale of the data. e^-30 ≈ 1e-13:
# a parameter at the lower bound is zero for every practical purpose (a plateau, see `fit`).
_LOG_RANGE = 30.0


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing (causal) moving average; the first ``window − 1`` points average what exists.
    A non-finite value makes only the windows that hold it non-finite."""
    return np.array([values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))])


def steps_to_target(
    steps: Sequence[float],
    values: Sequence[float],
    target: float,
    *,
    higher_is_better: bool = True,
    smooth: int | None = None,
    interpolate: bool = False,
) -> float | None:
    """The first step at which a training curve reaches ``target``.

    Args:
      steps: the logged steps, strictly increasing (e.g. the eval steps).
      values: the metric at those steps (e.g. test accuracy, or a loss).
      target: the value to reach.
      higher_is_better: ``True`` for accuracies (reached when ``value >= target``), ``False`` for
        losses (reached when ``value <= target``).
      smooth: if set, first replace each value by the trailing moving average over the last
        ``smooth`` logged points (fewer at the start), so that one lucky noisy evaluation does not
        count as reaching the target. ``None`` or ``1``: the raw values.
      interpolate: ``False``: return the first logged step at which the (smoothed) curve reaches
        the target. ``True``: interpolate linearly between that logged point and the one before
        it, to the step where the straight line between them crosses the target (a finer answer
        when evaluations are sparse; the first point itself is returned when it already reaches
        the target).

    Returns:
      The step as a float, or ``None`` when the curve never reaches the target.

    Example:
      >>> steps_to_target([0, 100, 200, 300], [0.1, 0.4, 0.6, 0.7], 0.5)
      200.0
      >>> steps_to_target([0, 100, 200, 300], [0.1, 0.4, 0.6, 0.7], 0.5, interpolate=True)
      150.0
      >>> steps_to_target([0, 100], [2.3, 1.9], 1.0, higher_is_better=False) is None
      True
    """
    steps, values = _paired(steps, values, "steps and values", "one value per logged step")
    if not np.all(np.isfinite(steps)) or np.any(np.diff(steps) <= 0):
        raise ValueError(
            "steps must be finite and strictly increasing: sort the curve by step first."
        )
    if not np.isfinite(target):
        raise ValueError(f"target must be a finite number, got {target!r}.")
    if smooth is not None and not (isinstance(smooth, int | np.integer) and smooth >= 1):
        raise ValueError(
            f"smooth must be a positive int (a window in logged points) or None, got {smooth!r}."
        )
    if len(steps) == 0:
        return None
    if smooth is not None and smooth > 1:
        values = _moving_average(values, int(smooth))
    sign = 1.0 if higher_is_better else -1.0
    # A non-finite value never reaches the target (a diverged run has not reached it).
    with np.errstate(invalid="ignore"):
        reached = np.isfinite(values) & (sign * (values - target) >= 0)
    if not reached.any():
        return None
    i = int(np.argmax(reached))
    if not interpolate or i == 0:
        return float(steps[i])
    v0, v1 = values[i - 1], values[i]
    if not np.isfinite(v0) or v1 == v0:
        return float(steps[i])
    frac = (target - v0) / (v1 - v0)
    return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))


@dataclasses.dataclass(frozen=True)
class TradeoffFit:
    """A fit of ``S(B) = S_min + E_min/B`` to measured (batch size, steps-to-target) points.

    Attributes:
      s_min: ``S_min``, the fewest steps any batch size can reach the target in.
      e_min: ``E_min``, the fewest training examples any batch size can reach it with.
      b_crit: ``B_crit = E_min/S_min``, the batch size at which training takes twice the minimal
        steps and twice the minimal examples: the knee of the tradeoff.
      intervals: ``{"s_min": (low, high), "e_min": ..., "b_crit": ...}`` bootstrap percentile
        intervals at ``confidence``; empty when fitted with ``num_bootstrap=0``.
      confidence: the level of the intervals (e.g. 0.95).
      batch_sizes: the batch sizes of the points that were fitted.
      steps: the steps-to-target of those points.
      residual_std: the standard deviation of the residuals of ``log S`` (relative error of one
        point), with ``n − 2`` degrees of freedom; ``nan`` with only two points' worth of freedom.
      num_bootstrap: how many bootstrap refits the intervals come from.
    """

    s_min: float
    e_min: float
    b_crit: float
    intervals: dict[str, tuple[float, float]]
    confidence: float
    batch_sizes: tuple[float, ...]
    steps: tuple[float, ...]
    residual_std: float
    num_bootstrap: int

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for ``sweep.json``)."""
        return {
            "s_min": self.s_min,
            "e_min": self.e_min,
            "b_crit": self.b_crit,
            "intervals": {k: list(v) for k, v in self.intervals.items()},
            "confidence": self.confidence,
            "points": [
                {"batch_size": b, "steps": s}
                for b, s in zip(self.batch_sizes, self.steps, strict=True)
            ],
            "residual_std": self.residual_std,
            "num_bootstrap": self.num_bootstrap,
        }


def predict_steps(fit: TradeoffFit, batch_size) -> np.ndarray | float:
    """``S(B) = S_min + E_min/B``: predicted steps to the target at batch size ``B``."""
    b = np.asarray(batch_size, dtype=np.float64)
    out = fit.s_min + fit.e_min / b
    return float(out) if out.ndim == 0 else out


def predict_examples(fit: TradeoffFit, batch_size) -> np.ndarray | float:
    """``E(B) = B·S(B) = E_min + S_min·B``: predicted training examples to the target."""
    b = np.asarray(batch_size, dtype=np.float64)
    out = b * (fit.s_min + fit.e_min / b)
    return float(out) if out.ndim == 0 else out


def _paired(x, y, names: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` as float64 arrays, 1-D and of the same length (else a ``ValueError``
    naming them and what to pass)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.shape != x.shape:
        raise ValueError(
            f"{names} must be 1-D and of the same length, got shapes {x.shape} and {y.shape}: "
            f"pass {what}."
        )
    return x, y


def _validate(batch_sizes, steps) -> tuple[np.ndarray, np.ndarray]:
    what = "one steps-to-target per batch size (repeat a batch size for several seeds)"
    b, s = _paired(batch_sizes, steps, "batch_sizes and steps", what)
    if b.size < 3:
        raise ValueError(
            f"fit needs at least 3 (batch size, steps) points, got {b.size}: S_min and E_min are "
            "two parameters, and a third point is the least that says anything about the fit. "
            "Train to the target at more batch sizes."
        )
    for name, arr in (("batch_sizes", b), ("steps", s)):
        bad = ~np.isfinite(arr) | (arr <= 0)
        if bad.any():
            raise ValueError(
                f"{name} must all be finite and positive, got {arr[bad].tolist()} at positions "
                f"{np.flatnonzero(bad).tolist()}: drop runs that never reached the target "
                "(steps_to_target returned None) before fitting."
            )
    if np.unique(b).size < 2:
        raise ValueError(
            f"fit needs at least 2 distinct batch sizes, got only B={b[0]:g}: with one batch size "
            "S_min and E_min cannot be told apart. Train at other batch sizes too."
        )
    return b, s


def _fit_log(b: np.ndarray, s: np.ndarray, x0: np.ndarray, bounds) -> np.ndarray:
    """Least squares of ``log S − log(exp(u) + exp(v)/B)`` over ``(u, v) = log(S_min, E_min)``."""
    log_s = np.log(s)
    log_b = np.log(b)

    def residuals(theta):
        return np.logaddexp(theta[0], theta[1] - log_b) - log_s

    def jac(theta):
        a = theta[0]
        c = theta[1] - log_b
        m = np.logaddexp(a, c)
        return np.stack([np.exp(a - m), np.exp(c - m)], axis=1)

    x0 = np.clip(x0, bounds[0] + 1e-9, bounds[1] - 1e-9)
    res = scipy.optimize.least_squares(
        residuals, x0, jac=jac, bounds=bounds, method="trf", x_scale=1.0, xtol=1e-12, ftol=1e-12
    )
    return res.x


def _initial_guess(b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Ordinary least squares of ``S`` on ``1/B`` (clipped positive), in log space."""
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1)
    (s_min, e_min), *_ = np.linalg.lstsq(design, s, rcond=None)
    floor_s, floor_e = 1e-3 * s.min(), 1e-3 * (s * b).min()
    return np.log([max(s_min, floor_s), max(e_min, floor_e)])


def fit(
    batch_sizes: Sequence[float],
    steps: Sequence[float],
    *,
    num_bootstrap: int = 1000,
    confidence: float = 0.95,
    method: str = "residuals",
    seed: int = 0,
) -> TradeoffFit:
    """Fit ``S(B) = S_min + E_min/B`` to (batch size, steps-to-target) points.

    The fit minimizes ``Σ (log S_i − log(S_min + E_min/B_i))²``: relative errors, since
    steps-to-target is noisy by a roughly constant *fraction* (seeds move it ±20%), whatever the
    batch size. It optimizes ``log S_min`` and ``log E_min`` (``scipy.optimize.least_squares``,
    bounded), so both stay positive.

    A **plateau** (steps no longer fall with the batch size) is a legitimate answer, not an
    error: ``E_min`` then goes to (numerically) zero and ``B_crit`` to a tiny number; steps that
    halve with every doubling send ``S_min`` to zero and ``B_crit`` to a huge one. Both are
    bounded ``e^30`` away from the data's scale, so the result stays finite. The fit runs in
    units of the geometric means of the batch sizes and the steps, so any magnitude (1e±300)
    fits alike; ``S_min`` or ``E_min`` is ``inf`` only where it is beyond float64 itself
    (``B_crit`` is formed from the logarithms and stays finite).

    Intervals come from the bootstrap, refitting ``num_bootstrap`` resampled data sets:

    * ``method="residuals"`` (default): keep the batch sizes, add resampled residuals of
      ``log S`` (inflated by ``sqrt(n/(n − 2))`` to undo the shrinkage of fitted residuals) to
      the fitted curve. Works with few points, where resampling the points would often leave a
      single batch size.
    * ``method="pairs"``: resample the points themselves (draws with a single distinct batch size
      are redrawn). Assumes less, needs more points.

    Args:
      batch_sizes: batch size of each point (repeat a batch size for several seeds).
      steps: steps to the target of each point, all positive.
      num_bootstrap: number of bootstrap refits (at least ``2/(1 - confidence)``, so that
        each tail holds one); 0 for no intervals.
      confidence: the level of the percentile intervals.
      method: ``"residuals"`` or ``"pairs"`` (see above).
      seed: seed of the bootstrap resampling.

    Returns:
      A :class:`TradeoffFit`.

    Raises:
      ValueError: fewer than 3 points, a non-positive or non-finite value, a single distinct
        batch size, or bad options.

    Example:
      >>> f = fit([64, 128, 256, 512], [3000, 2000, 1500, 1250], num_bootstrap=0)
      >>> round(f.s_min), round(f.e_min), round(f.b_crit)
      (1000, 128000, 128)

    Reference: McCandlish, Kaplan, Amodei (2018), eq. 2.11 and section 2.2.
    """
    b, s = _validate(batch_sizes, steps)
    if num_bootstrap != 0 or isinstance(num_bootstrap, bool):  # 0: no interval
        check_resamples(num_bootstrap, confidence, "num_bootstrap (or 0: no interval)")
    check_confidence(confidence)
    if method not in ("residuals", "pairs"):
        raise ValueError(f"method must be 'residuals' or 'pairs', got {method!r}.")

    # Fit in units of the geometric means of B and S (the fit is equivariant to them), so
    # neither S·B nor 1/B overflows or underflows at any magnitude (1e±300).
    log_cb, log_cs = float(np.mean(np.log(b))), float(np.mean(np.log(s)))
    b_all, s_all = b, s
    b, s = np.exp(np.log(b) - log_cb), np.exp(np.log(s) - log_cs)
    scale_s = np.log(s.min())
    scale_e = np.log((s * b).min())
    bounds = (
        np.array([scale_s - _LOG_RANGE, scale_e - _LOG_RANGE]),
        np.array([np.log(s.max()) + 5.0, np.log((s * b).max()) + 5.0]),
    )
    theta = _fit_log(b, s, _initial_guess(b, s), bounds)
    unscale = np.array([log_cs, log_cs + log_cb])  # log S_min, log E_min back in units
    with np.errstate(over="ignore"):
        s_min, e_min = (float(v) for v in np.exp(theta + unscale))
    b_crit = float(np.exp(theta[1] - theta[0] + log_cb))
    if theta[1] - np.log(b.min()) - theta[0] < np.log(0.01) and s.max() > 2 * s.min():
        raise ValueError(
            f"the steps to the target ({', '.join(f'{v:g}' for v in s_all)} at batch sizes "
            f"{', '.join(f'{v:g}' for v in b_all)}) do not fall "
            "with the batch size, so S(B) = S_min + E_min/B does not describe them (its 1/B "
            "term fits to nothing): check that the rate is scaled with the batch and that "
            "every training converged."
        )
    fitted = np.logaddexp(theta[0], theta[1] - np.log(b))
    resid = np.log(s) - fitted
    dof = b.size - 2
    residual_std = float(np.sqrt(np.sum(resid**2) / dof)) if dof > 0 else math.nan

    intervals: dict[str, tuple[float, float]] = {}
    if num_bootstrap:
        rng = np.random.default_rng(seed)
        samples = np.empty((num_bootstrap, 2))
        centered = (resid - resid.mean()) * np.sqrt(b.size / max(dof, 1))
        for i in range(num_bootstrap):
            if method == "residuals":
                bb = b
                ss = np.exp(fitted + rng.choice(centered, size=b.size, replace=True))
            else:
                while True:
                    idx = rng.integers(0, b.size, size=b.size)
                    if np.unique(b[idx]).size >= 2:
                        break
                bb, ss = b[idx], s[idx]
            samples[i] = _fit_log(bb, ss, theta, bounds)
        with np.errstate(over="ignore"):
            s_boot, e_boot = np.exp(samples + unscale).T
        bc_boot = np.exp(samples[:, 1] - samples[:, 0] + log_cb)
        for name, vals in (("s_min", s_boot), ("e_min", e_boot), ("b_crit", bc_boot)):
            intervals[name] = percentile_interval(vals, confidence)

    return TradeoffFit(
        s_min=s_min,
        e_min=e_min,
        b_crit=b_crit,
        intervals=intervals,
        confidence=float(confidence),
        batch_sizes=tuple(float(v) for v in b_all),
        steps=tuple(float(v) for v in s_all),
        residual_std=residual_std,
        num_bootstrap=int(num_bootstrap),
    )
