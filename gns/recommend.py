"""From noise scale + step time + memory limit to one batch size and learning rate.

With ``B_noise`` the noise scale and ``t(B)`` the measured time of one optimizer step at batch
``B`` on the devices at hand, the McCandlish tradeoff ``S(B) = S_min(1 + B_noise/B)`` gives::

    time to target     T(B) = S(B)·t(B)        ∝ (1 + B_noise/B) · t(B)
    compute to target  C(B) = S(B)·t(B)·price  ∝ (1 + B/B_noise) · t(B)/B      (× E_min, price)

``S_min`` (and ``E_min``) cancel: the noise scale and the throughput curve alone pick the batch
size. The time-optimal batch minimizes ``T``, the cost-optimal one ``C``. For ``t(B) = a + b·B``
(a fixed overhead plus a per-example cost), ``T`` is minimal at ``B* = sqrt(a·B_noise/b)``.

Above the largest batch that fits, a step is gradient accumulation over
``k >= ceil(B/max_batch_size)`` equal microbatches, ``t(B) = k·t(B/k)``
(:func:`accumulated_step_time`). On the same devices accumulation never shortens
the time to target: ``(1 + N/(k·m))·k·t(m) = (k + N/m)·t(m) ≥ (1 + N/m)·t(m)`` for any micro
batch ``m``, and it never lowers the compute either. It is what you do when a recipe fixes a
batch size larger than memory allows; the table shows its price.

Neither input is exact. The noise scale has an interval and each measured step time a spread
(the quartiles of interleaved repeats, :func:`gns.hardware.time_batch_sizes`), so the answer is
a set: every candidate that is optimal for *some* noise scale in its interval combined with
*some* step times within their spreads (``plausible_batch_sizes``; each pairwise comparison is
linear in ``B_noise``, so the set is exact, not sampled). A pick at an end of the timed batch
sizes is flagged with the batch to time next (``at_range_end``, ``extend_range_to``), and step
times that fall with the batch (``t(8) > t(16)``) are warned about. ``basis`` says which
evidence the noise scale came from and ``evidence`` lists every measurement with its ratio to it.

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018),
sections 2.2-2.3 (eq. 2.6 for the SGD learning rate, eq. 2.11 for the tradeoff).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from gns import common, scaling
from gns.hardware import accumulated_step_time

__all__ = ["Recommendation", "recommend"]


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """The recommended batch size, with the evidence.

    Attributes:
      batch_size: the recommended (effective) batch size: ``time_optimal`` or ``cost_optimal``
        depending on ``objective``.
      time_optimal: the candidate with the smallest predicted time to target (of equal
        predicted times, the smaller batch).
      cost_optimal: the candidate with the smallest predicted compute (device-hours, or money
        with a price) to target (of equal ones, the smaller batch).
      accumulation_steps: gradient-accumulation steps for ``batch_size`` (1: one batch per step).
      micro_batch_size: examples per accumulation step.
      learning_rate: the learning rate for ``batch_size`` from ``base_lr`` at
        ``base_batch_size``.
      lr_rule: the rule that gave it, in words (and whether it is a heuristic).
      predicted_speedup_vs_baseline: ``T(base_batch_size) / T(batch_size)``.
      near_optimal_range: ``(smallest, largest)`` candidate whose predicted time is within
        ``near_optimal_tolerance`` (10%) of the best: how sharply the answer is determined.
      batch_size_under_interval: ``(batch at the low end, batch at the high end)`` of the
        noise-scale interval, when one was given, else ``None``.
      plausible_batch_sizes: every candidate that is optimal for some noise scale in its
        interval combined with some step times within their spreads (``step_time_range``):
        the recommendation's interval from both sources of uncertainty. Just the pick when
        neither interval is given.
      batch_size_range: ``(min, max)`` of ``plausible_batch_sizes``.
      at_range_end: ``"smallest"`` or ``"largest"`` when the pick is at (or beyond) that end of
        the timed batch sizes, so a batch outside them might be better; else ``None``.
      extend_range_to: with ``at_range_end``, the batch size to time next (half the smallest,
        or twice the largest timed one, if it fits); the caller times it and recommends once
        more.
      warnings: things that make the answer less trustworthy, in words: step times that fall
        with the batch size (``t(8) > t(16)``), a pick at an end of the timed range.
      basis: which evidence gave ``b_noise`` (e.g. ``"branched"``, ``"trajectory"``,
        ``"b_simple"``).
      evidence: every noise-scale measurement the caller passed (and the basis), as
        ``{name: {"value", "low", "high", "ratio_to_basis"}}``.
      noise_scale_status: ``"positive"``, ``"infinite"`` (not resolved: ``+inf``) or
        ``"non-positive"`` (a degenerate estimate, zero, negative or ``-inf``: treated as no
        noise, and said so in ``reason``).
      reason: the recommendation in plain English.
      table: one dict per candidate: ``batch_size``, ``fits``, ``accumulation_steps``,
        ``micro_batch_size``, ``step_time_s``, ``relative_steps`` (``S/S_min``),
        ``relative_time`` (``T/T_best``), ``relative_cost`` (``C/C_best``) and, with ``s_min``,
        ``time_to_target_s``; with a price, ``cost_to_target`` (``cost_per_s_min`` without
        ``s_min``: the cost per minimal step).
    """

    batch_size: int
    time_optimal: int
    cost_optimal: int
    accumulation_steps: int
    micro_batch_size: int
    learning_rate: float
    lr_rule: str
    predicted_speedup_vs_baseline: float
    near_optimal_range: tuple[int, int]
    batch_size_under_interval: tuple[int, int] | None
    reason: str
    table: list[dict]
    b_noise: float
    objective: str
    plausible_batch_sizes: tuple[int, ...] = ()
    batch_size_range: tuple[int, int] = (0, 0)
    at_range_end: str | None = None
    extend_range_to: int | None = None
    warnings: tuple[str, ...] = ()
    basis: str = "b_simple"
    evidence: dict = dataclasses.field(default_factory=dict)
    noise_scale_status: str = "positive"

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples as lists; non-finite floats stay floats)."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out


def _unit(n: float) -> float:
    """The factor :func:`_objectives` divides by: ``max(N, 1)`` for a finite ``N``, else 1."""
    return max(n, 1.0) if math.isfinite(n) else 1.0


def _objectives(b: np.ndarray, t: np.ndarray, n: float):
    """Relative steps ``1 + N/B``, and the per-``S_min`` time and compute for noise scale ``n``
    divided by ``_unit(n)`` (a factor common to every candidate: rankings and ratios do not
    change, and a huge ``N`` such as 1e308 cannot overflow them)."""
    if n == math.inf:
        # S ∝ 1/B: every factor of B_noise cancels after dividing by it; compare t(B)/B.
        rel_steps = np.full_like(b, np.inf)
        return rel_steps, t / b, t / b
    n = max(n, 0.0)
    rel_steps = 1.0 + n / b
    unit = _unit(n)
    per_unit = (1.0 / unit + (n / unit) / b) * t  # (1 + N/B)·t(B) / unit
    # (1 + B/N)·t(B)/B · E_min = S_min·(1 + N/B)·t(B): per device, compute is the time.
    return rel_steps, per_unit, per_unit


def _argmin_batch(b: np.ndarray, values: np.ndarray) -> int:
    """Smallest batch among the minima (ties, e.g. flat curves, go to the smaller batch)."""
    best = values.min()
    return int(b[np.flatnonzero(values <= best * (1 + 1e-12))[0]])


def _pick(b, t, n, objective, devices):
    _, time_obj, compute = _objectives(b, t, n)
    return _argmin_batch(b, time_obj if objective == "time" else compute * devices)


# The per-candidate columns of ``Recommendation.table``, in their order.
_COLUMNS = (
    "step_time_s",
    "accumulation_steps",
    "micro_batch_size",
    "relative_steps",
    "time",
    "compute",
)


def recommend(
    b_noise: float,
    step_time: Mapping[int, float] | tuple[Sequence[int], Sequence[float]],
    *,
    max_batch_size: int,
    base_lr: float,
    base_batch_size: int,
    optimizer: str = "sgd",
    b_noise_interval: tuple[float, float] | None = None,
    step_time_range: Mapping[int, tuple[float, float]] | None = None,
    basis: str = "b_simple",
    evidence: Mapping[str, float | Sequence[float]] | None = None,
    price_per_hour: float | None = None,
    num_devices: int | Callable[[int], float] = 1,
    s_min: float | None = None,
    candidates: Sequence[int] | None = None,
    objective: str = "time",
    near_optimal_tolerance: float = 0.1,
    limits: tuple[float, float] = (1, math.inf),
) -> Recommendation:
    """Recommend a batch size (and learning rate) for the time (or cost) to a target.

    Args:
      b_noise: the noise scale (``B_simple`` as a stand-in for ``B_noise``, or better evidence:
        see ``basis``). ``+inf`` (gradient not resolved above the noise) is allowed: steps then
        fall like ``1/B`` and the batch with the best throughput wins. Zero, negative or
        ``-inf`` (a degenerate estimate: the ``tr Σ`` estimate came out non-positive) is
        reported as such (``noise_scale_status="non-positive"``) and treated as no noise: steps
        do not depend on ``B``. ``nan`` is refused.
      step_time: measured seconds per step at batch sizes that fit, ``{batch: seconds}`` or
        ``(batch_sizes, seconds)`` (e.g. the medians of :func:`gns.hardware.time_batch_sizes`).
      max_batch_size: the largest batch that fits; bigger candidates use gradient accumulation.
      base_lr: learning rate tuned at ``base_batch_size``.
      base_batch_size: the reference batch (the baseline of ``predicted_speedup_vs_baseline``).
      optimizer: ``"sgd"``, ``"momentum"``, ``"lars"`` (noise-scale rule) or ``"adam"``,
        ``"adamw"``, ``"lamb"`` (square-root heuristic), or a rule of
        :data:`gns.scaling.RULES`: the learning rate's rule (:func:`gns.scaling.learning_rate`).
      b_noise_interval: ``(low, high)`` of the noise scale; the recommendation under each end is
        reported, and the interval enters ``plausible_batch_sizes``.
      step_time_range: ``{batch: (low, high)}`` seconds per step (e.g. the quartiles of the
        timed repeats) for measured batch sizes; enters ``plausible_batch_sizes``. Batches
        left out count as exact.
      basis: which evidence ``b_noise`` comes from, in words the caller chooses; by convention
        ``"branched"`` (branched critical batch along the path), ``"trajectory"`` (effective
        noise scale of the pilot's trajectory) or ``"b_simple"`` (one early measurement).
      evidence: every noise-scale measurement the caller has, ``{name: value}`` or
        ``{name: (value, low, high)}``; reported with its ratio to ``b_noise``. An entry named
        ``basis`` must equal ``b_noise``.
      price_per_hour: price of one device-hour, finite and positive; adds money columns to the
        table (a value there beyond float64 is ``inf`` and named in ``warnings``).
      num_devices: devices the step runs on (compute = time × devices), or a function
        ``B -> devices`` when the device count grows with the batch (data parallelism at a
        fixed per-device batch; ``step_time`` must then be measured that way too). With a fixed
        device count the cost-optimal batch is the time-optimal one: the devices are paid for
        the whole wall time, and ``(1 + B/N)·t(B)/B·E_min = S_min·(1 + N/B)·t(B)``.
      s_min: fitted ``S_min`` (steps), to report absolute times to target in the table; finite
        and positive (``nan``, negative or ``inf`` is refused).
      candidates: batch sizes to consider; default the measured ones and 2×, 4× the largest
        that fits (accumulation), and the base batch size. Every batch size here, in
        ``step_time`` and ``base_batch_size`` is a whole number (``64`` or ``64.0``); ``3.5``
        is refused, never truncated.
      limits: the smallest and largest batch the caller can run (e.g. a ``min_batch_size``):
        a pick at an end of the timed sizes is told to time the next batch only within them.
      objective: ``"time"`` or ``"cost"``: which optimum ``batch_size`` is.
      near_optimal_tolerance: relative slack defining ``near_optimal_range``.

    Returns:
      A :class:`Recommendation`.

    Example:
      >>> # t(B) = 0.01 + 0.001·B and B_noise = 400: the optimum is sqrt(0.01·400/0.001) = 63.2
      >>> times = {b: 0.01 + 0.001 * b for b in (16, 32, 64, 128, 256)}
      >>> r = recommend(400.0, times, max_batch_size=256, base_lr=0.1, base_batch_size=32)
      >>> r.batch_size, r.accumulation_steps, r.at_range_end
      (64, 1, None)
    """
    n = _check_noise(b_noise, objective, basis)
    measured = common.check_step_times(step_time, max_batch_size)
    ranges = _ranges(step_time_range, measured)
    _check_options(price_per_hour, s_min, near_optimal_tolerance)
    base = common.check_batch_size(base_batch_size, "base_batch_size")
    common.check_positive(base_lr, "base_lr", f"the learning rate tuned at batch {base}")
    b = _candidates(candidates, measured, max_batch_size, base)
    t, accum, micro = _timed(measured, b, max_batch_size)
    rel_steps, time_obj, compute = _objectives(b, t, n)
    devices = _devices(num_devices, b)
    compute = compute * devices
    time_opt, cost_opt = _argmin_batch(b, time_obj), _argmin_batch(b, compute)
    chosen = time_opt if objective == "time" else cost_opt
    i = int(np.flatnonzero(b == chosen)[0])
    near = b[time_obj <= time_obj.min() * (1.0 + near_optimal_tolerance)]

    base_t, _, _ = accumulated_step_time(measured, base, max_batch_size)
    _, base_time, _ = _objectives(np.array([float(base)]), np.array([base_t]), n)
    speedup = float(base_time[0] / time_obj[i])
    lr, lr_rule = scaling.learning_rate(optimizer, base_lr, base, chosen, n)

    under, n_range = _under_interval(b_noise_interval, n, b, t, objective, devices)
    weight = devices if objective == "cost" else np.ones_like(b)
    t_lo, t_hi = (_timed(r, b, max_batch_size)[0] for r in ranges)
    plausible = _plausible(b, t_lo * weight, t_hi * weight, n_range)
    plausible -= _accumulation_dominated(b, accum, micro, weight)
    plausible = tuple(sorted(plausible | {chosen}))

    end, extend_to, end_note = _range_end(chosen, accum[i], measured, limits)
    warnings = _monotone_warnings(measured, ranges) + ([end_note] if end_note else [])
    evid = _evidence(basis, n, n_range if b_noise_interval is not None else None, evidence)
    columns = dict(zip(_COLUMNS, (t, accum, micro, rel_steps, time_obj, compute), strict=True))
    table = _table(b, columns, (t_lo, t_hi), max_batch_size, plausible, n, s_min, price_per_hour)
    warnings += _overflow_warnings(table)
    rec = Recommendation(
        batch_size=int(chosen),
        time_optimal=int(time_opt),
        cost_optimal=int(cost_opt),
        accumulation_steps=int(accum[i]),
        micro_batch_size=int(micro[i]),
        learning_rate=float(lr),
        lr_rule=lr_rule,
        predicted_speedup_vs_baseline=speedup,
        near_optimal_range=(int(near.min()), int(near.max())),
        batch_size_under_interval=under,
        reason="",
        table=table,
        b_noise=n,
        objective=objective,
        plausible_batch_sizes=plausible,
        batch_size_range=(plausible[0], plausible[-1]),
        at_range_end=end,
        extend_range_to=extend_to,
        warnings=tuple(warnings),
        basis=basis,
        evidence=evid,
        noise_scale_status=_status(n),
    )
    reason = _reason(rec, max_batch_size, near_optimal_tolerance, base, base in measured)
    return dataclasses.replace(rec, reason=reason)


def _check_noise(b_noise, objective, basis) -> float:
    """``b_noise`` as a float; a ``ValueError`` for ``nan`` or a bad ``objective`` or ``basis``."""
    if not common.is_real(b_noise):
        raise ValueError(f"b_noise must be a number (one noise scale), got {b_noise!r}.")
    n = float(b_noise)
    if math.isnan(n):
        raise ValueError(
            "b_noise is nan: the noise-scale statistics are not finite (a diverged run, or no "
            "finite steps). Measure the noise scale again on finite gradients, over more batches."
        )
    if objective not in ("time", "cost"):
        raise ValueError(f"objective must be 'time' or 'cost', got {objective!r}.")
    if not (isinstance(basis, str) and basis):
        raise ValueError(f"basis must be a non-empty string (e.g. 'b_simple'), got {basis!r}.")
    return n


def _status(n: float) -> str:
    """``noise_scale_status`` of a (non-nan) noise scale."""
    return "infinite" if n == math.inf else ("positive" if n > 0 else "non-positive")


def _candidates(candidates, measured, max_batch_size, base) -> np.ndarray:
    """The candidate batch sizes, increasing: the given ones, or the measured ones, 2× and 4×
    the largest that fits, and the base batch."""
    if candidates is None:
        cands = set(measured) | {max_batch_size * 2, max_batch_size * 4, base}
    elif not isinstance(candidates, Iterable) or isinstance(candidates, str):
        raise ValueError(f"candidates must be a list of batch sizes (or None), got {candidates!r}.")
    else:
        cands = {common.check_batch_size(c, "each of candidates") for c in candidates}
    if not cands:
        raise ValueError(f"candidates must be positive batch sizes, got {candidates!r}.")
    return np.array(sorted(cands), dtype=np.float64)


def _timed(step_time, b, max_batch_size) -> tuple[np.ndarray, list[int], list[int]]:
    """Seconds per step, accumulation steps and micro batch of each batch in ``b``."""
    timed = [accumulated_step_time(step_time, int(x), max_batch_size) for x in b]
    return np.array([x[0] for x in timed]), [x[1] for x in timed], [x[2] for x in timed]


def _devices(num_devices, b) -> np.ndarray:
    """Devices per candidate batch (a count, or a function of the batch), checked positive."""
    if callable(num_devices):
        devices = [num_devices(int(x)) for x in b]
    else:
        devices = [num_devices] * len(b)
    if not all(common.is_real(d) and 0 < d < math.inf for d in devices):
        raise ValueError(
            "num_devices must be a positive number of devices (or a function of the batch "
            f"size giving one), got {devices} for batch sizes {b.astype(int).tolist()}."
        )
    return np.array(devices, dtype=np.float64)


def _under_interval(b_noise_interval, n, b, t, objective, devices):
    """The pick at each end of the noise-scale interval (``None`` without one), and the
    interval (``(n, n)`` without one)."""
    if b_noise_interval is None:
        return None, (n, n)
    try:
        lo, hi = (float(v) for v in b_noise_interval)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if math.isnan(lo) or math.isnan(hi) or not lo <= n <= hi:
        raise ValueError(
            f"b_noise_interval must be two numbers (low, high) with low <= b_noise <= high, got "
            f"{b_noise_interval!r} for b_noise={n!r}: the interval of that estimate."
        )
    return (_pick(b, t, lo, objective, devices), _pick(b, t, hi, objective, devices)), (lo, hi)


def _table(b, columns, spread, max_batch_size, plausible, n, s_min, price_per_hour) -> list[dict]:
    """One row per candidate (see :class:`Recommendation`'s ``table``)."""
    time_obj, compute = columns["time"], columns["compute"]
    with np.errstate(over="ignore"):
        per_s = b / columns["step_time_s"]
    table = []
    for j, x in enumerate(b):
        row = {
            "batch_size": int(x),
            "fits": bool(x <= max_batch_size),
            "accumulation_steps": int(columns["accumulation_steps"][j]),
            "micro_batch_size": int(columns["micro_batch_size"][j]),
            "step_time_s": float(columns["step_time_s"][j]),
            "step_time_range_s": [float(spread[0][j]), float(spread[1][j])],
            "examples_per_s": float(per_s[j]),
            "relative_steps": float(columns["relative_steps"][j]),
            "relative_time": float(time_obj[j] / time_obj.min()),
            "relative_cost": float(compute[j] / compute.min()),
            "plausible": int(x) in plausible,
        }
        with np.errstate(over="ignore"):
            if s_min is not None and math.isfinite(n):
                row["time_to_target_s"] = float(s_min * time_obj[j] * _unit(n))
            if price_per_hour is not None:
                key = "cost_to_target" if "time_to_target_s" in row else "cost_per_s_min"
                scale = s_min if key == "cost_to_target" else 1.0
                row[key] = float(scale * compute[j] * _unit(n) * (price_per_hour / 3600.0))
        table.append(row)
    return table


def _check_options(price_per_hour, s_min, near_optimal_tolerance) -> None:
    """A ``ValueError`` for a price or ``S_min`` that is not finite and positive (or ``None``),
    or a negative or non-finite tolerance."""
    common.check_positive(price_per_hour, "price_per_hour", "a device-hour's price", optional=True)
    common.check_positive(
        s_min, "s_min", "the fitted minimal steps, TradeoffFit.s_min", optional=True
    )
    if not common.is_real(near_optimal_tolerance) or not 0 <= near_optimal_tolerance < math.inf:
        raise ValueError(
            f"near_optimal_tolerance must be a finite fraction >= 0 (e.g. 0.1), got "
            f"{near_optimal_tolerance!r}."
        )


def _overflow_warnings(table: list[dict]) -> list[str]:
    """A warning naming the table columns with a value beyond float64 (``inf``), if any
    (``relative_steps`` is ``inf`` by design for an infinite noise scale)."""
    columns = {k for row in table for k, v in row.items() if v == math.inf} - {"relative_steps"}
    if not columns:
        return []
    return [
        f"Table values beyond the float64 range (inf) in {sorted(columns)}: the inputs (s_min, "
        "price_per_hour, step times) are too large or small to multiply; rescale them."
    ]


def _ranges(step_time_range, measured) -> tuple[dict[int, float], dict[int, float]]:
    """The low and the high step-time curves (the measured one where no range is given)."""
    low, high = dict(measured), dict(measured)
    if not isinstance(step_time_range or {}, Mapping):
        raise ValueError(
            "step_time_range must be {batch_size: (low, high) seconds} (e.g. "
            f"TimingTable.step_time_range()), got {step_time_range!r}."
        )
    for k, v in (step_time_range or {}).items():
        if int(k) not in measured:
            continue
        try:
            lo, hi = (float(x) for x in v)
        except (TypeError, ValueError):
            lo = hi = math.nan
        if not (0 < lo <= hi < math.inf):
            raise ValueError(
                f"step_time_range[{k}] must be (low, high) seconds with 0 < low <= high, got {v!r}."
            )
        low[int(k)], high[int(k)] = min(lo, measured[int(k)]), max(hi, measured[int(k)])
    return low, high


def _plausible(b, w_lo, w_hi, n_range) -> set[int]:
    """The candidates that minimize ``(1 + N/B)·w(B)`` for some ``N`` in ``n_range`` and some
    ``w`` between ``w_lo`` and ``w_hi`` (a candidate is most favoured at its own ``w_lo`` against
    everyone else's ``w_hi``). Each pairwise condition is linear in ``N``, so the feasible ``N``
    of a candidate is an interval, intersected exactly."""
    n_lo, n_hi = max(n_range[0], 0.0), max(n_range[1], 0.0)
    out = set()
    for i in range(b.size):
        lower, upper = n_lo, n_hi
        ok = True
        for j in range(b.size):
            if j == i:
                continue
            a = w_lo[i] - w_hi[j]  # condition a + c·N <= 0
            c = w_lo[i] / b[i] - w_hi[j] / b[j]
            if c > 0:
                upper = min(upper, -a / c)
            elif c < 0:
                lower = max(lower, -a / c)
            elif a > 0:
                ok = False
        tol = 1e-12 * max(1.0, abs(lower)) if math.isfinite(lower) else 0.0
        if ok and lower <= upper + tol:
            out.add(int(b[i]))
    return out


def _accumulation_dominated(b, accum, micro, weight) -> set[int]:
    """Candidates run as ``k`` microbatches of another candidate ``m`` (on no fewer devices):
    ``(k + N/m)·t(m) >= (1 + N/m)·t(m)`` for every noise scale and every draw of ``t(m)``, so
    they are never the best, whatever the spreads (which :func:`_plausible` draws apart)."""
    index = {int(x): i for i, x in enumerate(b)}
    return {
        int(b[i])
        for i in range(b.size)
        if accum[i] > 1 and micro[i] in index and weight[i] >= weight[index[micro[i]]]
    }


def _range_end(chosen, k, measured, limits) -> tuple[str | None, int | None, str]:
    """Whether the pick sits at an end of the timed batch sizes, and what to time next (none
    past ``limits``: the pick is then at the end the caller allows)."""
    lo, hi = min(measured), max(measured)
    if k == 1 and chosen <= lo and lo > 1:
        end, nxt, edge, timed, what = "smallest", max(1, lo // 2), "small", lo, "a smaller batch"
    elif k == 1 and chosen >= hi:
        end, nxt, edge, timed, what = "largest", 2 * hi, "large", hi, "a larger batch"
    else:
        return None, None, ""
    if not limits[0] <= nxt <= limits[1]:
        limit = limits[0] if nxt < limits[0] else limits[1]
        note = f"The pick {chosen} is at the {end} batch size allowed here ({limit:g}): "
        return end, None, note + f"batch {nxt} was not timed."
    fits = " (if it fits)" if end == "largest" else ""
    return (
        end,
        nxt,
        f"The pick {chosen} is at the {edge} end of the timed batch sizes ({timed}): {what} "
        f"might be faster; time batch {nxt}{fits} and recommend again.",
    )


def _monotone_warnings(measured, ranges) -> list[str]:
    """A warning for each pair of neighbouring timed batches where the bigger one is faster,
    by more than 10% and beyond the timing spreads (less is the timing's noise, which the
    plausible range already carries: a step that the dispatch dominates takes the same time
    at every batch)."""
    low, high = ranges
    return [
        f"Step time falls with the batch: t({small}) = {measured[small] * 1e3:.3g} ms > "
        f"t({big}) = {measured[big] * 1e3:.3g} ms beyond the timing spreads: a busy machine or "
        "a noisy timing; re-time them interleaved, with more rounds."
        for small, big in itertools.pairwise(sorted(measured))
        if low[small] > high[big] and measured[small] > 1.1 * measured[big]
    ]


def _evidence(basis, n, n_range, evidence) -> dict[str, dict]:
    """``{name: {value, low, high, ratio_to_basis}}``, the basis included."""
    rows: dict[str, dict] = {}
    if not isinstance(evidence or {}, Mapping):
        raise ValueError(f"evidence must be {{name: (value, low, high)}}, got {evidence!r}.")
    for name, v in (evidence or {}).items():
        try:
            value, lo, hi = (float(v), None, None) if np.ndim(v) == 0 else (float(x) for x in v)
        except (TypeError, ValueError):
            raise ValueError(
                f"evidence[{name!r}] must be a number or (value, low, high), got {v!r}."
            ) from None
        rows[str(name)] = {"value": value, "low": lo, "high": hi}
    if basis in rows:
        given = rows[basis]["value"]
        if not (given == n or math.isclose(given, n, rel_tol=1e-9)):
            raise ValueError(
                f"evidence[{basis!r}] = {given!r} but b_noise = {n!r}: the basis must be the "
                "value the recommendation uses."
            )
    else:
        lo, hi = n_range if n_range is not None else (None, None)
        rows[basis] = {"value": n, "low": lo, "high": hi}
    for row in rows.values():
        ok = math.isfinite(n) and n > 0
        row["ratio_to_basis"] = row["value"] / n if ok else math.nan
    return rows


def _reason(rec: Recommendation, max_b: int, tol: float, base: int, base_timed: bool) -> str:
    """The recommendation in plain English: the pick and why, then its basis and warnings."""
    n, chosen, k = rec.b_noise, rec.batch_size, rec.accumulation_steps
    row = next(r for r in rec.table if r["batch_size"] == chosen)
    parts = [_noise_words(n, chosen, rec.objective, row["step_time_s"])]
    if k > 1:
        parts.append(
            f"It does not fit in memory (largest that fits: {max_b}), so run it as {k} "
            f"accumulation steps of {rec.micro_batch_size} examples."
        )
    elif chosen == max_b and max(r["batch_size"] for r in rec.table) > max_b:
        parts.append(
            f"It is the largest batch that fits (max_batch_size={max_b}); run as gradient "
            "accumulation, a larger batch does not shorten the time to target on these devices."
        )
    near = rec.near_optimal_range
    if near[0] == near[1]:
        parts.append(f"No other candidate is within {round(100 * tol)}% of its predicted time.")
    else:
        parts.append(
            f"Batches {near[0]}-{near[1]} are within {round(100 * tol)}% of the best predicted "
            "time."
        )
    if rec.cost_optimal != rec.time_optimal:
        time_first = rec.objective == "time"
        other = rec.cost_optimal if time_first else rec.time_optimal
        parts.append(f"The {'cheapest in compute' if time_first else 'fastest'} is batch {other}.")
    untimed = "" if base_timed else " (not timed: its step time estimated from the timed sizes)"
    parts.append(
        f"Predicted speedup over batch {base}{untimed}: {rec.predicted_speedup_vs_baseline:.2f}x."
    )
    under = rec.batch_size_under_interval
    if under is not None:
        parts.append(
            f"Across the noise-scale interval the recommendation ranges from {under[0]} "
            f"(low end) to {under[1]} (high end)."
        )
    parts.append(f"Basis: {rec.basis}.")
    if len(rec.plausible_batch_sizes) > 1:
        parts.append(
            "Within the noise-scale interval and the step-time spreads, any of "
            f"{list(rec.plausible_batch_sizes)} can be the best."
        )
    return " ".join([*parts, *rec.warnings])


def _noise_words(n: float, chosen: int, objective: str, t_chosen: float) -> str:
    """Why ``chosen`` wins at noise scale ``n``, in words."""
    if n == math.inf:
        return (
            "The noise scale is not resolved (infinite): gradient noise dominates at every "
            "candidate batch, so steps to target fall like 1/B and the batch with the highest "
            f"throughput wins: {chosen}."
        )
    if n <= 0:
        sign = "negative" if n < 0 else "zero"
        return (
            f"The noise-scale estimate is {n:.3g} ({sign}, not positive: a degenerate estimate, "
            "read as no gradient noise), so bigger batches do not save steps and the fastest "
            f"step wins: {chosen}. A non-positive estimate is usually sampling noise (the tr(Σ) "
            "estimate came out non-positive): pool more batches."
        )
    what = "time to target" if objective == "time" else "compute to target"
    words = (
        f"Batch {chosen} minimizes the predicted {what} (1 + B_noise/B)·t(B) with "
        f"B_noise = {n:.4g} and t({chosen}) = {t_chosen * 1e3:.3g} ms per step on this device."
    )
    if chosen < n:
        words += (
            " It is below the noise scale: each step is still noise-dominated, but a bigger "
            "batch would cost more time per step than it saves in steps here."
        )
    return words
