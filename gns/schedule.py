"""A batch-size schedule that follows the measured noise scale during training.

The critical batch grows several-fold during a run (small at initialization, large near the
end), so a fixed batch is right for one phase at most. Locally the McCandlish tradeoff holds: a
stretch of training that needs ``dS_min`` steps at an infinite batch needs
``dS_min·(1 + B_noise/B)`` steps at batch ``B``, each taking ``t(B)`` seconds. So the time per
unit of progress at the current noise scale is::

    score(B) = (1 + B_noise/B) · t(B)

and :func:`batch_size_schedule` picks, among a fixed set of compiled batch sizes, the one that
minimizes it, with hysteresis so that a noisy estimate does not make the batch flap:

* a change needs the new size to be predicted faster by a relative ``margin``
  (``score(new) <= (1 - margin)·score(current)``) on ``patience`` consecutive updates (in the
  same direction: growing or shrinking);
* by default the batch only grows (``allow_shrink=False``);
* a noise scale that is ``nan``, ``+inf`` or ``<= 0`` keeps the current batch (and resets the
  streak): the decision's reason says which.

Above the largest batch that fits, a candidate is run as gradient accumulation and timed as
:func:`gns.hardware.accumulated_step_time` does (``k·t(B/k)``); on the same devices that never
shortens the time to target (see :mod:`gns.recommend`), so the schedule only moves there when
the caller starts there (a recipe's fixed batch).

At every change the learning rate follows one rule of :mod:`gns.scaling` (``lr_rule``: "sgd"
with ``N`` the noise scale at the change, "linear", "sqrt", "seesaw", or "constant", which is
Smith et al.'s 2018 "increase the batch instead of decaying"), as a multiplier of a base
learning rate tuned at a base batch ``B_0``; between changes the multiplier is held.

Seesaw (Meterez, Morwani, Wu, Oncescu, Pehlevan, Kakade, "Seesaw: Accelerating Training by
Balancing Learning Rate and Batch Size Scheduling", arXiv 2510.14717, 2025): wherever a
standard schedule would multiply the learning rate by ``alpha < 1``, multiply it by
``sqrt(alpha)`` and the batch by ``1/alpha`` instead (halve -> ``1/sqrt(2)`` and double). Read
backwards, a batch growth by ``k`` multiplies the rate by ``1/sqrt(k)`` and stands for a decay by
``k`` of the base schedule, so use it with a base schedule that does not also decay by that
amount. The paper proves the equivalence for SGD on noisy linear regression and, for
normalized SGD (a proxy of Adam), in the variance-dominated regime; it is meant for batches at
or below the critical batch.

The schedule is an optax-style pair of pure functions over a :class:`ScheduleState` of scalar
arrays (checkpoint it with the train state); ``update`` is jit-able (``jnp`` ops on the array
of candidates, no Python control flow on values). Reasons are integer codes in the state;
:attr:`BatchSizeSchedule.explain` turns a :class:`Decision` into words on the host and
:class:`ScheduleLog` keeps the changes for a run's summary.

In a training loop (host side; the step for each batch size compiled once and cached)::

    sched = schedule.batch_size_schedule(step_times, max_batch_size=fits, lr_rule="sqrt",
                                         base_lr=config.lr, base_batch_size=config.batch_size)
    s_state, log = sched.init(), schedule.ScheduleLog(sched)
    decision = sched.current(s_state)                  # initial batch and learning rate
    ...
    if step % every == 0:                              # patience counts these updates
        decision, s_state = sched.update(ema_state.b_simple, s_state)
        log.record(step, decision)
        batch, lr = int(decision.batch_size), float(decision.learning_rate)

The EMA tracker need not be reset at a change: ``|G|²`` and ``tr(Σ)`` do not depend on the
batch they were measured at (in expectation), so the smoothed noise scale carries over.

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018);
Merrill et al. 2025 (arXiv 2505.23971, batch-size warmup from the measured critical batch).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gns import common, scaling
from gns.hardware import accumulated_step_time

__all__ = [
    "LR_RULES",
    "REASONS",
    "INITIAL",
    "GREW",
    "SHRANK",
    "KEPT_BEST",
    "KEPT_WITHIN_MARGIN",
    "KEPT_WAITING",
    "KEPT_NO_SHRINK",
    "KEPT_NAN",
    "KEPT_INF",
    "KEPT_NONPOSITIVE",
    "ScheduleState",
    "Decision",
    "BatchSizeSchedule",
    "check_candidates",
    "batch_size_schedule",
    "powers_of_two",
    "lr_multiplier",
    "simulate",
    "ScheduleLog",
]

LR_RULES = scaling.RULES

# Reason codes (int32 in the state; words on the host via REASONS and explain).
INITIAL = 0
GREW = 1
SHRANK = 2
KEPT_BEST = 3
KEPT_WITHIN_MARGIN = 4
KEPT_WAITING = 5
KEPT_NO_SHRINK = 6
KEPT_NAN = 7
KEPT_INF = 8
KEPT_NONPOSITIVE = 9

REASONS = {
    INITIAL: "initial",
    GREW: "grew",
    SHRANK: "shrank",
    KEPT_BEST: "kept_best",
    KEPT_WITHIN_MARGIN: "kept_within_margin",
    KEPT_WAITING: "kept_waiting",
    KEPT_NO_SHRINK: "kept_no_shrink",
    KEPT_NAN: "kept_nan",
    KEPT_INF: "kept_inf",
    KEPT_NONPOSITIVE: "kept_nonpositive",
}


class ScheduleState(NamedTuple):
    """State of the schedule: scalar arrays (a pytree; checkpoint it with the train state).

    Attributes:
      index: index of the current batch size in the candidates.
      previous_index: index of the batch size before the last update (``== index`` unless the
        last update changed it).
      lr_multiplier: learning-rate multiplier of the current batch (set at each change).
      streak: consecutive updates so far in which a candidate was predicted faster by the
        margin, in the direction ``direction``.
      direction: ``+1`` (a larger batch is better), ``-1`` (smaller) or ``0`` (none).
      best_index: the candidate with the smallest score at the last noise scale, without
        hysteresis or the no-shrink rule (``index`` after a non-usable noise scale).
      target_index: the allowed candidate with the smallest score (the challenger; ``index``
        after a non-usable noise scale).
      gain: predicted relative saving ``1 - score(best allowed)/score(current)`` at the last
        update (``nan`` for a non-usable noise scale or at init).
      noise: the last noise scale given (as given: may be ``nan``/``inf``).
      reason: reason code of the last decision (see :data:`REASONS`).
      count: number of updates so far.
      num_changes: number of batch-size changes so far.
    """

    index: jax.Array
    previous_index: jax.Array
    lr_multiplier: jax.Array
    streak: jax.Array
    direction: jax.Array
    best_index: jax.Array
    target_index: jax.Array
    gain: jax.Array
    noise: jax.Array
    reason: jax.Array
    count: jax.Array
    num_changes: jax.Array


class Decision(NamedTuple):
    """What to train with next, and why (scalar arrays; ``int(...)``/``float(...)`` on host).

    Attributes:
      batch_size: the (effective) batch size of the next steps.
      previous_batch_size: the batch size before this update.
      changed: whether this update changed the batch size.
      accumulation_steps: gradient-accumulation steps for ``batch_size`` (1: one batch).
      micro_batch_size: examples per accumulation step (``batch_size / accumulation_steps``).
      lr_multiplier: learning-rate multiplier relative to the base rate at the base batch.
      learning_rate: ``base_lr · lr_multiplier``.
      reason: reason code (:data:`REASONS`); ``explain`` gives the words.
      noise_scale: the noise scale this update saw.
      best_batch_size: the fastest candidate at that noise scale, before hysteresis and the
        no-shrink rule.
      target_batch_size: the fastest allowed candidate (the one a change would move to).
      predicted_gain: predicted relative time saving of the best allowed candidate over the
        current one (``nan`` when the noise scale was not usable).
      streak: consecutive qualifying updates so far (see :class:`ScheduleState`).
    """

    batch_size: jax.Array
    previous_batch_size: jax.Array
    changed: jax.Array
    accumulation_steps: jax.Array
    micro_batch_size: jax.Array
    lr_multiplier: jax.Array
    learning_rate: jax.Array
    reason: jax.Array
    noise_scale: jax.Array
    best_batch_size: jax.Array
    target_batch_size: jax.Array
    predicted_gain: jax.Array
    streak: jax.Array


class BatchSizeSchedule(NamedTuple):
    """An optax-style pair of pure functions, with host-side helpers.

    Attributes:
      init: ``init(noise=None) -> ScheduleState`` at the initial batch; ``noise`` is needed only
        by the ``"sgd"`` rule when the initial batch differs from the base batch.
      update: ``update(noise, state) -> (Decision, ScheduleState)``; pure and jit-able.
      current: ``current(state) -> Decision``: the decision a state stands for (e.g. the
        initial batch and learning rate, from ``init()``); pure and jit-able.
      explain: ``explain(decision) -> str``: the decision in words (host-side).
      describe: ``describe(state) -> str``: ``explain(current(state))`` (host-side).
      table: one dict per candidate: ``batch_size``, ``fits``, ``accumulation_steps``,
        ``micro_batch_size``, ``step_time_s``, ``measured`` (whether ``t(B)`` was timed or
        interpolated), in increasing batch size.
    """

    init: Callable[..., ScheduleState]
    update: Callable[[Any, ScheduleState], tuple[Decision, ScheduleState]]
    current: Callable[[ScheduleState], Decision]
    explain: Callable[[Decision], str]
    describe: Callable[[ScheduleState], str]
    table: tuple[dict, ...]


def powers_of_two(low: int, high: int, unit: int = 1) -> tuple[int, ...]:
    """The powers of two times ``unit`` in ``[low, high]`` (the default compiled sizes;
    ``unit``: the smallest batch the devices split, e.g. 3 on 3 devices).

    Example:
      >>> powers_of_two(12, 300)
      (16, 32, 64, 128, 256)
      >>> powers_of_two(12, 300, unit=3)
      (12, 24, 48, 96, 192)
    """
    if not (low >= 1 and high >= low and unit >= 1):
        raise ValueError(f"need 1 <= low <= high and unit >= 1, got {low}, {high}, {unit}.")
    first = unit << max(0, math.ceil(math.log2(low / unit)))
    out = []
    b = first
    while b <= high:
        out.append(b)
        b *= 2
    return tuple(out)


def lr_multiplier(rule: str, batch_size, base_batch_size, noise=jnp.inf) -> jax.Array:
    """Learning-rate multiplier at ``batch_size`` relative to the rate tuned at
    ``base_batch_size`` (jnp; jit-able): :func:`gns.scaling.multiplier`.

    For ``"sgd"`` it is ``(1 + N/B_0)/(1 + N/B)``, linear for ``N = inf`` and ``1`` for
    ``N <= 0``: :func:`gns.scaling.learning_rate` divided by the base rate.

    Example:
      >>> round(float(lr_multiplier("seesaw", 256, 128)), 4)  # batch x2 -> lr x 1/sqrt(2)
      0.7071
    """
    return scaling.multiplier(rule, batch_size, base_batch_size, noise)


def check_candidates(candidates: Sequence[int]) -> list[int]:
    """``candidates`` as a list of ints, checked as :func:`batch_size_schedule` checks them
    (non-empty, whole batch sizes, strictly increasing); ``ValueError`` naming the problem
    otherwise."""
    cands = [common.check_batch_size(b, "each of candidates") for b in candidates]
    if not cands:
        raise ValueError(
            "candidates is empty: pass the batch sizes to compile, e.g. powers_of_two(16, 1024)."
        )
    if any(b <= a for a, b in zip(cands, cands[1:], strict=False)):
        raise ValueError(
            f"candidates must be strictly increasing (sorted, no duplicates), got {cands}: pass "
            f"sorted(set(candidates)) = {sorted(set(cands))}."
        )
    return cands


def _candidate_sizes(candidates, measured: Mapping[int, float]) -> list[int]:
    """The given candidates, checked, or the powers of two between the timed batch sizes."""
    if candidates is not None:
        return check_candidates(candidates)
    cands = list(powers_of_two(min(measured), max(measured)))
    if not cands:
        raise ValueError(
            f"no power of two between the timed batch sizes {sorted(measured)}: pass "
            "candidates explicitly."
        )
    return cands


def _check_settings(lr_rule, margin, patience, base_lr) -> None:
    scaling.check_rule(lr_rule)
    if isinstance(margin, bool) or not (0.0 <= float(margin) < 1.0):
        raise ValueError(f"margin must be in [0, 1) (e.g. 0.05 for 5%), got {margin!r}.")
    if isinstance(patience, bool) or not (isinstance(patience, int | np.integer) and patience >= 1):
        raise ValueError(f"patience must be an int >= 1 (consecutive updates), got {patience!r}.")
    common.check_positive(base_lr, "base_lr", "the learning rate tuned at base_batch_size")


def _candidate_rows(cands, measured, max_batch_size) -> list[dict]:
    """One :attr:`BatchSizeSchedule.table` row per candidate."""
    rows = []
    for b in cands:
        seconds, k, micro = accumulated_step_time(measured, b, max_batch_size)
        rows.append(
            {
                "batch_size": b,
                "fits": b <= max_batch_size,
                "accumulation_steps": k,
                "micro_batch_size": micro,
                "step_time_s": seconds,
                "measured": k == 1 and b in measured,
            }
        )
    return rows


def batch_size_schedule(
    step_time: Mapping[int, float],
    *,
    max_batch_size: int,
    candidates: Sequence[int] | None = None,
    initial_batch_size: int | None = None,
    lr_rule: str = "sqrt",
    base_batch_size: int | None = None,
    base_lr: float = 1.0,
    margin: float = 0.05,
    patience: int = 5,
    allow_shrink: bool = False,
    accumulate: bool = True,
) -> BatchSizeSchedule:
    """A batch-size schedule driven by the noise scale, with hysteresis and an lr rule.

    Each ``update(noise, state)`` scores every candidate by the predicted time per unit of
    progress ``(1 + noise/B)·t(B)`` (McCandlish eq. 2.11 applied locally) and moves to the best
    allowed candidate once it has been predicted faster than the current one by ``margin`` on
    ``patience`` consecutive updates in the same direction (``allow_shrink=False``: only
    larger candidates are allowed). A non-usable noise scale (``nan``, ``+inf``, ``<= 0``)
    keeps the batch and resets the streak. At each change the learning-rate multiplier is set
    by ``lr_rule`` (module docstring) and held until the next change.

    ``noise`` is the smoothed noise scale: ``state.b_simple`` of the EMA tracker
    (:func:`gns.smoothing.ema`: smoothed ``trace_cov``/``g_sq``, ``+inf`` when the smoothed
    ``g_sq <= 0``, ``nan`` before any finite step), or the local critical batch of a branched
    measurement (Merrill et al. 2025). ``B_simple`` can be several times smaller than the
    critical batch with Adam (``docs/critical-batch.md``): scale it before passing it if you
    have the ratio.

    Args:
      step_time: measured seconds per step ``{batch_size: seconds}`` at batch sizes that fit;
        the candidates' times come from :func:`gns.hardware.accumulated_step_time` (log-log
        interpolation between timed sizes, accumulation above ``max_batch_size``).
      max_batch_size: the largest batch that fits in memory
        (:func:`gns.hardware.largest_batch_that_fits`).
      candidates: the compiled batch sizes, strictly increasing; default the powers of two from
        the smallest to the largest timed batch that fits.
      initial_batch_size: the batch of the first steps (a candidate); default the smallest
        candidate (the critical batch is small at initialization).
      lr_rule: one of :data:`LR_RULES`: ``"linear"``, ``"sgd"``, ``"sqrt"`` (Adam-family),
        ``"seesaw"`` or ``"constant"``.
      base_batch_size: the batch at which ``base_lr`` was tuned (default the initial batch).
      base_lr: the tuned learning rate; decisions report ``base_lr · lr_multiplier``.
      margin: relative predicted saving in ``[0, 1)`` a change needs.
      patience: consecutive qualifying updates (``>= 1``) a change needs.
      allow_shrink: whether the batch may shrink (default: a ramp only grows).
      accumulate: whether candidates above ``max_batch_size`` run as gradient accumulation;
        with ``False`` such a candidate is an error.

    Returns:
      A :class:`BatchSizeSchedule` ``(init, update, current, explain, describe, table)``.

    Raises:
      ValueError: empty, non-integer, non-positive or non-increasing candidates; an initial or
        base batch that is not usable; a candidate above ``max_batch_size`` with
        ``accumulate=False``; a bad
        step-time table, rule, margin or patience.

    Example:
      >>> times = {b: 0.01 + 0.001 * b for b in (16, 32, 64, 128, 256)}
      >>> sched = batch_size_schedule(times, max_batch_size=256, patience=2, lr_rule="sqrt")
      >>> state = sched.init()
      >>> for noise in (50.0, 900.0, 900.0):          # the noise scale grows during training
      ...     decision, state = jax.jit(sched.update)(noise, state)
      >>> int(decision.batch_size), round(float(decision.lr_multiplier), 3)  # sqrt(128/16)
      (128, 2.828)
      >>> sched.explain(decision)[:42]
      'grew 16 -> 128: at noise scale 900, batch '
    """
    measured = common.check_step_times(step_time, max_batch_size)
    max_batch_size = int(max_batch_size)
    cands = _candidate_sizes(candidates, measured)
    _check_settings(lr_rule, margin, patience, base_lr)
    too_big = [b for b in cands if b > max_batch_size]
    if too_big and not accumulate:
        raise ValueError(
            f"candidates {too_big} do not fit: max_batch_size={max_batch_size} and gradient "
            "accumulation is disabled (accumulate=False). Drop them, or pass accumulate=True."
        )
    if initial_batch_size is None:
        initial_batch_size = cands[0]
    if initial_batch_size not in cands:
        raise ValueError(
            f"initial_batch_size={initial_batch_size!r} is not a candidate {cands}: start from one "
            "of the compiled sizes."
        )
    if base_batch_size is None:
        base_batch_size = initial_batch_size
    base_batch_size = common.check_batch_size(base_batch_size, "base_batch_size")

    rows = _candidate_rows(cands, measured, max_batch_size)
    table = tuple(rows)
    n = len(cands)
    sizes = jnp.asarray(cands, jnp.int32)
    sizes_f = jnp.asarray(cands, jnp.float32)
    times = jnp.asarray([r["step_time_s"] for r in rows], jnp.float32)
    accum = jnp.asarray([r["accumulation_steps"] for r in rows], jnp.int32)
    micro = jnp.asarray([r["micro_batch_size"] for r in rows], jnp.int32)
    positions = jnp.arange(n, dtype=jnp.int32)
    start = cands.index(initial_batch_size)
    log_keep = math.log1p(-float(margin))  # a change must save more than the margin
    base_b = float(base_batch_size)

    def init(noise=None) -> ScheduleState:
        needs_noise = lr_rule == "sgd" and initial_batch_size != base_batch_size
        if noise is None:
            if needs_noise:
                raise ValueError(
                    f"the 'sgd' rule needs the noise scale to set the learning rate at the "
                    f"initial batch {initial_batch_size} != base batch {base_batch_size}: call "
                    "init(noise=...)."
                )
            noise = jnp.nan
        elif needs_noise and not isinstance(noise, jax.core.Tracer) and not np.all(noise > 0):
            raise ValueError(
                f"init(noise={noise}): the 'sgd' rule sets the learning rate at the initial "
                f"batch {initial_batch_size} from the noise scale, which must be > 0 "
                "(a fresh EMA's b_simple is nan until it has measured): measure first, or start "
                f"at the base batch {base_batch_size}."
            )
        noise = jnp.asarray(noise, jnp.float32)
        i32 = lambda v: jnp.asarray(v, jnp.int32)
        return ScheduleState(
            index=i32(start),
            previous_index=i32(start),
            lr_multiplier=lr_multiplier(lr_rule, initial_batch_size, base_b, noise),
            streak=i32(0),
            direction=i32(0),
            best_index=i32(start),
            target_index=i32(start),
            gain=jnp.asarray(jnp.nan, jnp.float32),
            noise=noise,
            reason=i32(INITIAL),
            count=i32(0),
            num_changes=i32(0),
        )

    def current(state: ScheduleState) -> Decision:
        return Decision(
            batch_size=sizes[state.index],
            previous_batch_size=sizes[state.previous_index],
            changed=state.index != state.previous_index,
            accumulation_steps=accum[state.index],
            micro_batch_size=micro[state.index],
            lr_multiplier=state.lr_multiplier,
            learning_rate=base_lr * state.lr_multiplier,
            reason=state.reason,
            noise_scale=state.noise,
            best_batch_size=sizes[state.best_index],
            target_batch_size=sizes[state.target_index],
            predicted_gain=state.gain,
            streak=state.streak,
        )

    def update(noise, state: ScheduleState) -> tuple[Decision, ScheduleState]:
        if noise is None:
            raise ValueError("noise is None: pass the noise scale (nan where none is measured).")
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != ():
            raise ValueError(
                f"noise must be a scalar (one noise scale per update), got shape {noise.shape}."
            )
        usable = jnp.isfinite(noise) & (noise > 0)
        safe = jnp.where(usable, noise, 1.0)
        # log((1 + noise/B)·t(B)): finite for any finite noise (the product overflows float32).
        score = jnp.log1p(safe / sizes_f) + jnp.log(times)
        cur = state.index
        cur_score = score[cur]
        best_all = jnp.argmin(score).astype(jnp.int32)
        allowed = positions >= cur if not allow_shrink else jnp.ones((n,), bool)
        allowed_score = jnp.where(allowed, score, jnp.inf)
        best = jnp.argmin(allowed_score).astype(jnp.int32)
        better = usable & (best != cur) & (allowed_score[best] <= log_keep + cur_score)
        direction = jnp.where(better, jnp.sign(best - cur), 0).astype(jnp.int32)
        same_way = better & (direction == state.direction)
        streak = jnp.where(same_way, state.streak + 1, jnp.where(better, 1, 0)).astype(jnp.int32)
        switch = better & (streak >= patience)
        index = jnp.where(switch, best, cur)
        multiplier = jnp.where(
            switch, lr_multiplier(lr_rule, sizes_f[best], base_b, noise), state.lr_multiplier
        )
        kept_reason = jnp.select(
            [
                better,
                (best_all < cur) & (score[best_all] <= log_keep + cur_score),
                score[best_all] < cur_score,
            ],
            [KEPT_WAITING, KEPT_NO_SHRINK, KEPT_WITHIN_MARGIN],
            KEPT_BEST,
        )
        reason = jnp.select(
            [jnp.isnan(noise), jnp.isposinf(noise), ~usable, switch],
            [KEPT_NAN, KEPT_INF, KEPT_NONPOSITIVE, jnp.where(best > cur, GREW, SHRANK)],
            kept_reason,
        ).astype(jnp.int32)
        new = ScheduleState(
            index=index,
            previous_index=cur,
            lr_multiplier=multiplier.astype(jnp.float32),
            streak=jnp.where(switch, 0, streak).astype(jnp.int32),
            direction=jnp.where(switch, 0, direction).astype(jnp.int32),
            best_index=jnp.where(usable, best_all, cur),
            target_index=jnp.where(usable, best, cur),
            gain=jnp.where(usable, -jnp.expm1(allowed_score[best] - cur_score), jnp.nan),
            noise=noise,
            reason=reason,
            count=state.count + 1,
            num_changes=state.num_changes + switch.astype(jnp.int32),
        )
        return current(new), new

    def explain(decision: Decision) -> str:
        code = int(decision.reason)
        b, prev = int(decision.batch_size), int(decision.previous_batch_size)
        best = int(decision.best_batch_size)
        noise = float(decision.noise_scale)
        gain = float(decision.predicted_gain)
        lr = (
            f"lr x{float(decision.lr_multiplier):.4g} of the rate at batch {base_batch_size} "
            f"({lr_rule} rule)"
        )
        at = f"at noise scale {noise:.4g}"
        accum_note = (
            f" as {int(decision.accumulation_steps)} x {int(decision.micro_batch_size)} "
            "(gradient accumulation)"
            if int(decision.accumulation_steps) > 1
            else ""
        )
        if code == INITIAL:
            return f"initial batch {b}{accum_note}, {lr}."
        if code in (GREW, SHRANK):
            verb = "grew" if code == GREW else "shrank"
            return (
                f"{verb} {prev} -> {b}: {at}, batch {b} is predicted to take {gain:.1%} less time "
                f"per unit of progress ((1 + B_noise/B)·t(B)) than {prev}, at least the "
                f"{margin:.0%} margin on {patience} consecutive updates; {lr}{accum_note}."
            )
        kept = f"kept batch {b}{accum_note}"
        if code == KEPT_BEST:
            return f"{kept}: {at} it is predicted fastest."
        if code == KEPT_WITHIN_MARGIN:
            return (
                f"{kept}: {at} batch {best} is predicted faster, but by less than the "
                f"{margin:.0%} margin."
            )
        if code == KEPT_WAITING:
            return (
                f"{kept}: {at} batch {int(decision.target_batch_size)} is predicted to take "
                f"{gain:.1%} less time, {int(decision.streak)} of {patience} consecutive "
                "updates so far."
            )
        if code == KEPT_NO_SHRINK:
            return (
                f"{kept}: {at} the smaller batch {best} is predicted faster by more than the "
                f"margin, but shrinking is not allowed (allow_shrink=False)."
            )
        if code == KEPT_NAN:
            return (
                f"{kept}: the noise scale is nan (no finite noise statistics yet, or a diverged "
                "step); streak reset."
            )
        if code == KEPT_INF:
            return (
                f"{kept}: the noise scale is +inf (smoothed |G|^2 <= 0: the gradient is not "
                "resolved above its noise; or beyond float32); streak reset."
            )
        if code == KEPT_NONPOSITIVE:
            return (
                f"{kept}: the noise scale {noise:.4g} is not positive (smoothed tr(Sigma) <= 0); "
                "streak reset."
            )
        raise ValueError(f"unknown reason code {code}: expected one of {sorted(REASONS)}.")

    def describe(state: ScheduleState) -> str:
        return explain(current(state))

    return BatchSizeSchedule(init, update, current, explain, describe, table)


def simulate(
    schedule: BatchSizeSchedule, noise_scales, state: ScheduleState | None = None
) -> tuple[Decision, ScheduleState]:
    """Run ``schedule`` over a series of noise scales (``jax.lax.scan``, jitted).

    For previews (replay a pilot run's noise series) and tests.

    Args:
      schedule: a :class:`BatchSizeSchedule`.
      noise_scales: 1-D sequence of noise scales, one per update.
      state: the starting state (default ``schedule.init()``).

    Returns:
      ``(decisions, final_state)``: each field of ``decisions`` is an array over the updates.
    """
    noise = jnp.asarray(noise_scales, jnp.float32)
    if noise.ndim != 1:
        raise ValueError(f"noise_scales must be 1-D (one per update), got shape {noise.shape}.")
    if state is None:
        state = schedule.init()
    final, decisions = _scan(schedule.update)(state, noise)
    return decisions, final


@functools.lru_cache(maxsize=32)
def _scan(update: Callable) -> Callable:
    """One jitted scan per schedule (so repeated simulations reuse the compiled program)."""

    def step(s, x):
        decision, s = update(x, s)
        return s, decision

    return jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))


class ScheduleLog:
    """Host-side record of a schedule's decisions: every change (step, old, new, reason) and a
    count of the reasons for keeping, for a run's summary.

    Args:
      schedule: the :class:`BatchSizeSchedule` (for its ``explain``).
      changes: earlier changes (e.g. ``summary()["changes"]`` of a run being resumed).
      reason_counts: earlier counts of reasons (``summary()["reason_counts"]``).

    Example:
      >>> times = {b: 0.01 + 0.001 * b for b in (16, 32, 64, 128, 256)}
      >>> sched = batch_size_schedule(times, max_batch_size=256, patience=1, lr_rule="sqrt")
      >>> log, state = ScheduleLog(sched), sched.init()
      >>> for step, noise in enumerate((50.0, 900.0)):
      ...     decision, state = sched.update(noise, state)
      ...     entry = log.record(step, decision)   # the change's entry, else None
      >>> entry["step"], entry["old_batch_size"], entry["new_batch_size"]
      (1, 16, 128)
    """

    def __init__(
        self,
        schedule: BatchSizeSchedule,
        changes: Sequence[dict] = (),
        reason_counts: Mapping[str, int] | None = None,
    ):
        self._explain = schedule.explain
        self.changes: list[dict] = [dict(c) for c in changes]
        self.reason_counts: dict[str, int] = dict(reason_counts or {})
        self.last: dict | None = None

    def record(self, step: int, decision: Decision) -> dict | None:
        """Record one decision taken at training ``step`` (or examples seen: the caller's
        clock). Returns the change entry when the batch changed, else ``None``."""
        code = int(decision.reason)
        name = REASONS[code]
        self.reason_counts[name] = self.reason_counts.get(name, 0) + 1
        entry = {
            "step": int(step),
            "old_batch_size": int(decision.previous_batch_size),
            "new_batch_size": int(decision.batch_size),
            "accumulation_steps": int(decision.accumulation_steps),
            "lr_multiplier": float(decision.lr_multiplier),
            "learning_rate": float(decision.learning_rate),
            "noise_scale": float(decision.noise_scale),
            "predicted_gain": float(decision.predicted_gain),
            "reason_code": code,
            "reason_name": name,
            "reason": self._explain(decision),
        }
        self.last = entry
        if not bool(decision.changed):
            return None
        self.changes.append(entry)
        return entry

    def summary(self) -> dict:
        """``{"changes": [...], "reason_counts": {...}, "last": {...}}`` (JSON-ready)."""
        return {
            "changes": list(self.changes),
            "reason_counts": dict(self.reason_counts),
            "last": self.last,
        }
