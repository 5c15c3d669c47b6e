"""The batch-size finder as one library call: your loss, your optimizer, your devices.

:func:`find_batch_size` runs the whole measurement on any JAX loss (Flax Linen, Flax NNX via
``nnx.split``, plain JAX) and returns a :class:`BatchSizeResult`:

1. a **pilot** at the reference batch ``B_ref``: ``pilot_steps`` optimizer steps (or
   ``max_seconds``), each taking its update from :mod:`gns.estimate` (``per_example`` with
   ``method="auto"``, or ``microbatch``), so every step also measures ``|G|²`` and ``tr(Σ)``
   (smoothed by :func:`gns.smoothing.ema` along the way);
2. the **noise scale along the path** (:mod:`gns.critical`): the pilot's steps pooled into
   stretches (:func:`gns.critical.trajectory_from_metrics`) and the effective noise scale
   (:func:`gns.critical.effective_noise_scale`), beside the single ``B_simple`` of the whole
   pilot (:func:`gns.smoothing.interval`);
3. optionally the **branched critical batch** (:func:`gns.critical.branched_critical_batch`):
   short forks at ``B_ref·2^j`` from in-memory states of the pilot at ``branch_points`` steps,
   combined by :func:`gns.critical.effective_critical_batch`. Off when it would cost more than
   ``branch_max_cost`` times the pilot (``branched=None``), on with ``branched=True``;
4. the **memory and step time** of the candidate batch sizes on the local device
   (:func:`gns.hardware.largest_batch_that_fits`, :func:`gns.hardware.time_batch_sizes`):
   the powers of two around the noise-scale interval first (:func:`timing_start`), timed
   interleaved, each lowered and compiled once (one executable gives the memory analysis, the
   confirming run and the timing), the sizes that cannot win pruned from the second round on
   and the timing stopped when one is left;
5. the **recommendation** (:func:`gns.recommend.recommend`) on the best evidence measured, in
   the order branched > trajectory > b_simple (``basis``, every value in ``evidence`` with its
   ratio to the basis); while the pick sits at an end of the timed sizes, the next candidate
   past it is timed with its neighbour and the recommendation made again (past the candidates
   once at most: the batch ``extend_range_to``).

Nothing measured is thrown away: the pilot is the start of the run, its state comes back as
``.state`` (:class:`TrainState`) and :func:`continue_training` goes on from it at the pick.
Every argument is checked before any work (:func:`resolve_lr_rule` reads the learning-rate rule
from the optimizer's state or takes it, :mod:`gns.scaling`). The cost is bounded and stated:
``budget_s`` (or ``budget_fraction`` of ``run_steps``) bounds the forks and the timing, the
timing stops timing sizes that cannot win (:func:`dominated_sizes`) and reuses the timings of
the same step on the same device (:class:`gns.hardware.TimingCache`), and ``.seconds`` holds
each phase. ``progress(phase, done, total)`` reports every phase; gns draws nothing. Diverged
forks, unresolved checkpoints and unstable step times are named in ``.warnings``.

The stages are public (:func:`run_pilot`, :func:`noise_evidence`, :func:`branch`,
:func:`choose_basis`, :func:`time_candidates`, :func:`decide`) and composed once, by
:func:`pipeline`, over a small interface (:class:`Steps`: a measuring step, a plain step with a
learning-rate multiplier, ``batch_fn(size, index)``, an evaluation; :class:`Plan`: the
settings; a ``time_fn`` and a ``decide_fn``): :func:`find_batch_size` runs it on any JAX loss,
``experiments/sweep.py`` on its task with a stage cache (``cache``) and its mesh's timing.

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018);
Merrill et al., "Critical Batch Size Revisited" (2025, arXiv 2505.23971).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gns import common, critical, estimate, ghost, hardware, recommend, scaling, schedule, smoothing

__all__ = [
    "BASIS_ORDER",
    "Pilot",
    "BatchSizeResult",
    "as_batch_fn",
    "run_pilot",
    "noise_evidence",
    "branch",
    "checkpoint_steps",
    "checkpoint_rows",
    "choose_basis",
    "power_of_two_candidates",
    "time_candidates",
    "decide",
    "Steps",
    "Plan",
    "Measured",
    "pipeline",
    "noise_record",
    "branch_record",
    "effective_from_record",
    "fork_noise_scale",
    "find_batch_size",
    "TrainState",
    "continue_training",
    "continue_at",
    "resolve_lr_rule",
    "dominated_sizes",
    "pilot_warnings",
    "timing_start",
]

BASIS_ORDER = ("branched", "trajectory", "b_simple")  # best evidence first


# ---------------------------------------------------------------------------------------------
# Batches.


def as_batch_fn(batch_fn) -> Callable[[int, int], Any]:
    """``batch_fn(size, index)`` from either form the finder accepts.

    Args:
      batch_fn: ``batch_fn(size, index) -> batch`` (examples ``[index·size, (index+1)·size)``
        of one fixed stream), or an iterator factory ``batch_fn(size) -> iterator of batches``
        (a fresh iterator restarts the stream; indices are then positions in it).

    Returns:
      ``fn(size, index) -> batch``.
    """
    try:
        params = inspect.signature(batch_fn).parameters.values()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        two = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):
        two = True
    if two:
        return batch_fn
    streams: dict[int, list] = {}

    def from_iterator(size, index):
        it, pos = streams.get(size, (None, math.inf))
        if pos > index:
            it, pos = batch_fn(size), 0
            if not isinstance(it, Iterator):
                raise ValueError(
                    f"batch_fn({size}) returned a {type(it).__name__}, not an iterator: a "
                    "one-argument batch_fn is an iterator factory (batch_fn(size) -> iterator "
                    "of batches); a sampler that returns one batch takes the batch's index "
                    "too, batch_fn(size, index)."
                )
        for _ in range(index - pos):
            next(it)
        streams[size] = (it, index + 1)
        return next(it)

    return from_iterator


def _checked_batch(batch_fn, size: int, index: int):
    try:
        batch = batch_fn(size, index)
        empty = any(np.ndim(x) and not np.shape(x)[0] for x in jax.tree.leaves(batch))
        what = "an empty batch"
    except (IndexError, StopIteration) as e:
        empty, what = True, f"{type(e).__name__}: {e}".rstrip(": ")
    if empty:
        raise ValueError(
            f"batch_fn({size}, {index}) gave no examples ({what}), where examples up to "
            f"{(index + 1) * size:,} of the stream are needed: pass a longer stream (e.g. wrap "
            "around: index % num_batches), or fewer steps (pilot_steps, num_steps), or "
            "branched=False (the forks read past the pilot)."
        )
    got = common.batch_size(batch, "batch_fn(size, index)")
    if got != size:
        raise ValueError(
            f"batch_fn({size}, {index}) returned a batch of {got} examples, not {size}: batch_fn "
            "must return exactly `size` examples (examples [index*size, (index+1)*size) of your "
            "stream), e.g. lambda size, index: data[index * size:(index + 1) * size], wrapping "
            "around at the end of a finite one."
        )
    return batch


def _check_loss(loss_fn, params, batch) -> None:
    common.float_params(params)  # an integer counter or a PRNG key: named, with the fix
    common.check_scalar_loss(loss_fn, params, batch)


def mean_loss_warning(loss_fn, params, batch, num_examples: int = 8) -> str | None:
    """A warning when ``loss_fn`` of the first ``num_examples`` of ``batch`` is not the mean of
    their one-example losses (``None`` when it is, to 1e-3). The per-example statistics assume
    that mean: a masked token mean, BatchNorm, in-batch contrastive terms or a target that
    broadcasts across the batch give them another objective's gradients."""
    sub = jax.tree.map(lambda x: x[:num_examples], batch)
    one = lambda example: loss_fn(params, jax.tree.map(lambda x: x[None], example))
    whole, singles = jax.jit(lambda b: (loss_fn(params, b), jax.vmap(one)(b)))(sub)
    whole, mean = float(whole), float(jnp.mean(singles))
    if math.isclose(whole, mean, rel_tol=1e-3, abs_tol=1e-6):
        return None
    return (
        f"loss_fn of the first {len(singles)} examples is {whole:.6g}, the mean of their "
        f"one-example losses {mean:.6g}: the per-example statistics measure the gradients of "
        "that mean, not of loss_fn (a masked token mean, BatchNorm, in-batch terms or a target "
        "that broadcasts across the batch; dropout drawn per call also differs): make loss_fn "
        "a mean over examples, or pass method='microbatch'"
    )


# ---------------------------------------------------------------------------------------------
# 1. The pilot.


class Pilot(NamedTuple):
    """A pilot run at the reference batch.

    Attributes:
      rows: one dict per measured step: ``step`` (1-based), ``g_sq``, ``trace_cov``,
        ``b_simple`` and the EMA values ``ema_g_sq``, ``ema_trace_cov``, ``ema_b_simple``.
      state: the state after the last step.
      checkpoints: ``{step: state}`` at the requested steps (in memory).
      steps: steps done (measured or not).
      seconds: wall time of the pilot (compile included).
      stop_reason: ``"steps"``, ``"time"``, or ``"diverged"`` (a measured step's
        ``train_loss`` was not finite: the pilot stopped there).
      step_s: mean wall time of one step after the first (the first compiles); ``nan`` with
        one step.
    """

    rows: list[dict]
    state: Any
    checkpoints: dict[int, Any]
    steps: int
    seconds: float
    stop_reason: str
    step_s: float = math.nan


def run_pilot(
    state,
    measure_step: Callable,
    batch_fn: Callable[[int, int], Any],
    *,
    batch_size: int,
    num_steps: int,
    every: int = 1,
    plain_step: Callable | None = None,
    max_seconds: float | None = None,
    checkpoint_steps: Sequence[int] = (),
    on_step: Callable[[int, Any], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    divergence_factor: float | None = None,
) -> Pilot:
    """Run ``num_steps`` steps (or ``max_seconds``), measuring every ``every``-th step;
    stop early when it diverges (:func:`divergence`: a ``train_loss`` not finite, or its
    median blown up by ``divergence_factor``; ``stop_reason`` ``"diverged"``).

    Args:
      state: the initial state (any pytree).
      measure_step: jitted ``measure_step(state, batch) -> (state, metrics)`` whose metrics hold
        ``g_sq`` and ``trace_cov`` (and optionally ``train_loss`` and ``ema_*``) scalars. It
        must not donate.
      batch_fn: ``batch_fn(size, index)``; step ``i`` (0-based) takes batch ``i``.
      batch_size: the pilot's batch ``B_ref``.
      num_steps: steps to run at most.
      every: measure at steps ``every, 2·every, ...`` (1-based); the others are ``plain_step``.
      plain_step: jitted ``plain_step(state, batch) -> state``; needed when ``every > 1``; it
        must not donate either (after dispatching a step the loop waits on that step's input
        state, and it keeps checkpoints).
      max_seconds: stop after this wall time (checked after each step).
      checkpoint_steps: keep the state after these steps (for :func:`branch`).
      on_step: ``on_step(step, state)`` at step 0 and after every step (e.g. more measurements
        at one state of the path).
      progress: ``progress(done, num_steps)`` before the first step and after every step.

    Returns:
      A :class:`Pilot` (``rows``: the measured steps).
    """
    t0 = time.perf_counter()
    measured, keep, wanted = [], {}, set(int(s) for s in checkpoint_steps)
    stop, t1, done, losses = "steps", t0, 0, []
    if on_step is not None:
        on_step(0, state)
    if progress is not None:  # shown while the first step compiles (and times its path)
        progress(0, num_steps)
    for i in range(num_steps):
        batch, last, in_flight = batch_fn(batch_size, i), state, measured[-1:]
        if (i + 1) % max(1, every) == 0 or plain_step is None:
            state, m = measure_step(state, batch)
            measured.append((i + 1, m))  # fetched at the end: no host sync per step
        else:
            state = plain_step(state, batch)
        # One step in flight: the next batch is built while this one runs, and the clock
        # below (max_seconds, step_s) is the device's.
        jax.block_until_ready(state if i == 0 else last)
        done, t1 = i + 1, t1 if i else time.perf_counter()
        ready = measured[-1:] if i == 0 else in_flight  # the metrics of a finished step
        if ready and "train_loss" in ready[0][1] and (not losses or losses[-1][0] < ready[0][0]):
            losses.append((ready[0][0], float(ready[0][1]["train_loss"])))
            if divergence(losses, divergence_factor):
                stop = "diverged"
                break
        if i + 1 in wanted:
            keep[i + 1] = state
        if on_step is not None:
            on_step(i + 1, state)
        if progress is not None:
            progress(i + 1, num_steps)
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            stop = "time"
            break
    jax.block_until_ready(state)
    t_end = time.perf_counter()
    step_s = (t_end - t1) / (done - 1) if done > 1 else math.nan
    rows = [
        {"step": step, **{k: float(v) for k, v in m.items() if np.ndim(v) == 0}}
        for step, m in jax.device_get(measured)
    ]
    return Pilot(rows, state, keep, done, t_end - t0, stop, step_s)


DIVERGENCE_WINDOW = 5  # measured pilot steps in each median of the divergence check


def divergence(losses: Sequence[tuple[int, float]], factor: float | None) -> str | None:
    """Why a pilot with the measured ``(step, train_loss)`` so far diverged, ``None`` while it
    did not: its last loss not finite, or the median of its last :data:`DIVERGENCE_WINDOW`
    losses above ``factor`` times the scale of its first (their median, or their median
    deviation from it where that is larger: a loss near 0; ``factor`` ``None``: no such bound).
    One batch whose loss spikes is not divergence, and losses at 0 set no scale.

    Example:
      >>> divergence([(1, 2.0), (2, 50.0), (3, 1.9)], 10.0) is None  # one hard batch
      True
    """
    if not losses:
        return None
    step, last = losses[-1]
    if not math.isfinite(last) and len(losses) == 1 and step == 1:
        return (
            f"its training loss was {last} at the initial parameters (step 1, before any "
            "update): check the loss and the data."
        )
    if not math.isfinite(last):
        return (
            f"its training loss was {last} at step {step}; lower the learning rate (or warm it "
            "up, or clip the gradients)."
        )
    w = DIVERGENCE_WINDOW
    if factor is None or not math.isfinite(factor) or len(losses) < 2 * w:
        return None
    early = [x for _, x in losses[:w]]
    first, now = statistics.median(early), statistics.median(x for _, x in losses[-w:])
    scale = max(first, statistics.median(abs(x - first) for x in early))  # a loss near 0 scatters
    if not (scale > 0 and now > factor * scale):
        return None
    return (
        f"the median of its training loss over steps {losses[-w][0]}-{step} was {now:.4g}, over "
        f"{factor:g} times the {scale:.4g} of its first {w} measured steps; lower the learning "
        "rate (or warm it up, or clip the gradients), or, where the loss is meant to rise (the "
        "data get harder), raise divergence_factor."
    )


# ---------------------------------------------------------------------------------------------
# 2. The noise scale along the path.


def noise_evidence(
    rows: Sequence[Mapping],
    ref_batch_size: int,
    *,
    num_stretches: int = 3,
    end_step: int | None = None,
    run_steps: int | None = None,
    confidence: float = 0.9,
    seed: int = 0,
) -> dict[str, Any]:
    """``B_simple`` of the whole pilot, its trajectory and the effective noise scale.

    Args:
      rows: the pilot's rows (``step``, ``g_sq``, ``trace_cov``).
      ref_batch_size: the pilot's batch.
      num_stretches: stretches of the trajectory (at most half the rows).
      end_step: end of the path (default the last row's step).
      run_steps: the planned run's length at ``ref_batch_size``: in the effective noise scale
        the last stretch also stands for the steps from the path's end to it. Default: the
        path alone.
      confidence: level of the intervals.
      seed: bootstrap seed.

    Returns:
      ``{"b_simple": gns.smoothing.Interval, "trajectory": gns.critical.Trajectory,
      "effective": gns.critical.EffectiveNoiseScale}``.

    Raises:
      ValueError: fewer than 2 finite measurements (nothing to estimate from).
    """
    g = np.array([np.nan if r.get("g_sq") is None else r["g_sq"] for r in rows], np.float64)
    t = np.array([np.nan if r.get("trace_cov") is None else r["trace_cov"] for r in rows])
    finite = int((np.isfinite(g) & np.isfinite(t)).sum())
    if finite < 2:
        raise ValueError(
            f"the pilot gave {finite} finite noise-scale measurement(s) of {len(rows)}: at least 2 "
            "are needed. Raise the budget (pilot_steps / max_seconds), or lower the learning "
            "rate if the pilot diverged."
        )
    single = smoothing.interval(g, t, confidence=confidence, seed=seed)
    k = max(1, min(int(num_stretches), finite // 2))
    traj = critical.trajectory_from_metrics(
        rows, k, end_step=end_step, confidence=confidence, seed=seed
    )
    delta = traj.delta_steps.copy()
    delta[-1] += max(0.0, (run_steps or 0) - traj.end[-1])
    eff = critical.effective_noise_scale(
        delta,
        traj.b_noise,
        ref_batch_size,
        low=traj.low,
        high=traj.high,
        point_confidence=confidence,
        confidence=confidence,
        seed=seed,
    )
    return {"b_simple": single, "trajectory": traj, "effective": eff}


# ---------------------------------------------------------------------------------------------
# 3. The branched critical batch.


def branch(
    checkpoints: Mapping[int, Any],
    make_step: Callable[[int, float], Callable],
    batch_fn: Callable[[int, int], Any],
    eval_fn: Callable[[Any], Any],
    *,
    ref_batch_size: int,
    end_step: int,
    num_examples: int,
    exponents: Sequence[int] = (-1, 0, 1, 2),
    lr_multiplier=None,
    num_repeats: int = 2,
    pilot_examples: float | None = None,
    confidence: float = 0.9,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The branched critical batch at each checkpoint and its path average.

    Args:
      checkpoints: ``{pilot step: state}`` in path order.
      make_step: ``make_step(size, lr_multiplier) -> step(state, batch) -> state``, a jitted
        step (called as is: one compiled step per shape may serve every multiplier).
      batch_fn, eval_fn, exponents, lr_multiplier, num_repeats, num_examples, pilot_examples,
        confidence: as in :func:`gns.critical.branched_critical_batch`.
      ref_batch_size: the pilot's batch.
      end_step: end of the path (the pilot's last step): each checkpoint stands for the steps
        around it (:func:`gns.critical.stretch_lengths`).
      seed: bootstrap seed.
      progress: ``progress(done, total)`` as each fork batch size of each checkpoint starts
        (``total``: checkpoints × fork batch sizes).

    Returns:
      ``{"steps": [...], "points": [BranchedCriticalBatch], "effective":
      EffectiveNoiseScale}``; the effective value weighs only the ``resolved`` checkpoints
      (``docs/critical-batch.md``, "which basis to trust"), the others are dropped and counted;
      a fork that diverged is excluded from its checkpoint's fit and named there
      (``BranchedCriticalBatch.excluded``).
    """
    steps = sorted(int(s) for s in checkpoints)
    points, total, started = [], len(steps) * len(exponents), [0]

    def counting_step(size, mult):  # make_step is called once per fork batch size
        if progress is not None:
            progress(started[0], total)
        started[0] += 1
        return make_step(size, mult)

    for s in steps:
        points.append(
            critical.branched_critical_batch(
                checkpoints[s],
                counting_step,
                batch_fn,
                eval_fn,
                ref_batch_size=ref_batch_size,
                num_examples=num_examples,
                exponents=exponents,
                lr_multiplier=lr_multiplier,
                num_repeats=num_repeats,
                pilot_examples=pilot_examples,
                confidence=confidence,
                checkpoint_name=f"pilot state at step {s}",
                seed=seed,
                jit=False,
            )
        )
    if progress is not None:
        progress(total, total)
    delta = critical.stretch_lengths(steps, end=max(end_step, steps[-1]))
    eff = critical.effective_critical_batch(
        points, delta, ref_batch_size, drop_unresolved=True, confidence=confidence, seed=seed
    )
    return {"steps": steps, "points": points, "effective": eff}


def checkpoint_steps(num_steps: int, num_checkpoints: int) -> list[int]:
    """The pilot steps to branch from: the middles of ``num_checkpoints`` equal stretches.

    Example:
      >>> checkpoint_steps(60, 3)
      [10, 30, 50]
    """
    k = max(1, int(num_checkpoints))
    return sorted({max(1, round(num_steps * (2 * i + 1) / (2 * k))) for i in range(k)})


def checkpoint_rows(steps: Sequence[int], points: Sequence[critical.BranchedCriticalBatch]):
    """``critical_batch`` rows: ``step``, ``b_crit``, ``low``, ``high``, ``b_tolerance``,
    ``resolved``, ``status`` (``"resolved"`` or ``"unresolved"``), ``excluded_forks`` (the fork
    batch sizes that diverged) and ``cost_fraction`` per checkpoint."""
    return [
        {
            "step": int(s),
            "b_crit": p.b_crit,
            "low": p.low,
            "high": p.high,
            "b_tolerance": p.b_tolerance,
            "resolved": p.resolved,
            "status": "resolved" if p.resolved else "unresolved",
            "excluded_forks": [int(b) for b, _ in p.excluded],
            "cost_fraction": p.cost_fraction,
        }
        for s, p in zip(steps, points, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# 4. Which evidence.


def _triple(value, low, high) -> tuple[float, float, float]:
    return tuple(math.nan if x is None else float(x) for x in (value, low, high))


def choose_basis(
    b_simple: tuple[float, float, float],
    trajectory: critical.EffectiveNoiseScale | None = None,
    branched: critical.EffectiveNoiseScale | None = None,
) -> tuple[str, tuple[float, float, float], dict[str, tuple[float, float, float]], str]:
    """The best evidence measured: branched > trajectory > b_simple (:data:`BASIS_ORDER`).

    A branched or trajectory value is used when it rests on at least 2 points along the path
    (``basis`` ``branched``/``trajectory`` of :mod:`gns.critical`) and is finite; otherwise the
    next one, and the note says why.

    Args:
      b_simple: ``(value, low, high)`` of the single pooled ``B_simple``.
      trajectory: :func:`gns.critical.effective_noise_scale` of the pilot's trajectory.
      branched: :func:`gns.critical.effective_critical_batch` of the branched checkpoints.

    Returns:
      ``(basis, (value, low, high), evidence, note)``; ``evidence`` maps every measured name
      (``b_simple``, ``trajectory``, ``branched``) to its ``(value, low, high)``.

    Example:
      >>> basis, v, ev, _ = choose_basis((100.0, 80.0, 130.0))
      >>> basis, v
      ('b_simple', (100.0, 80.0, 130.0))
    """
    evidence, notes = {"b_simple": _triple(*b_simple)}, {}
    wanted = {"trajectory": critical.BASIS_TRAJECTORY, "branched": critical.BASIS_BRANCHED}
    for name, eff in (("trajectory", trajectory), ("branched", branched)):
        if eff is None:
            continue
        evidence[name] = _triple(eff.value, eff.low, eff.high)
        if eff.basis != wanted[name] or not np.isfinite(eff.value):
            notes[name] = f"{name} not used ({eff.basis}: {eff.note})"
    for name in BASIS_ORDER:
        ev = evidence.get(name)
        if ev is not None and name not in notes and not math.isnan(ev[0]):
            return name, ev, evidence, "; ".join(notes.values())
    raise ValueError(
        "no noise scale was measured (every estimate is nan): the pilot diverged or its "
        "gradients are not finite; lower the learning rate or check the loss."
    )


# ---------------------------------------------------------------------------------------------
# 5. Memory and step time.


def power_of_two_candidates(lo: int, hi: int, unit: int = 1) -> list[int]:
    """Powers of two times ``unit`` in ``[lo, hi]`` (at least ``[lo]`` rounded up to one;
    :func:`gns.schedule.powers_of_two`).

    Example:
      >>> power_of_two_candidates(6, 64)
      [8, 16, 32, 64]
    """
    lo, hi = max(1, int(lo)), max(1, int(hi))
    ladder = schedule.powers_of_two(lo, 2 * max(lo, hi, unit), unit)  # its first: the fallback
    return [b for b in ladder if b <= hi] or [ladder[0]]


def dominated_sizes(
    b_noise_interval: tuple[float, float], objective: str = "time", keep: Sequence[int] = ()
) -> Callable[[Mapping[int, Sequence[float]]], dict[int, str]]:
    """The pruning rule of the timing stage: which batch sizes cannot win.

    With the noise scale ``n`` anywhere in ``[low, high]`` and each step time anywhere in its
    quartiles ``[q25, q75]``, batch ``B`` cannot win when another size ``B'`` is faster at both
    ends of the interval even with ``B`` at its fastest and ``B'`` at its slowest step time:
    ``(1 + n/B)·q25(B) > (1 + n/B')·q75(B')`` for ``n = low`` and ``n = high`` (time to target up
    to ``S_min``; for ``objective="cost"`` the compute ``(1 + B/n)·t(B)/B``). Both sides are
    monotone in ``n`` (or ``1/n``), so the two ends decide for the whole interval. This drops
    everything the rule of the issue drops (``B``'s best case worse than ``B'``'s worst case),
    and sizes that lose at every noise scale of the interval.

    Args:
      b_noise_interval: ``(low, high)`` of the noise scale; no pruning unless
        ``0 < low <= high < inf``.
      objective: ``"time"`` or ``"cost"``.
      keep: sizes never pruned (the reference batch: the recommendation states its speedup
        over it, from timings of as many rounds as the pick's).

    Returns:
      ``prune({batch: times}) -> {batch: reason}`` for :func:`gns.hardware.time_batch_sizes`.

    Example:
      >>> prune = dominated_sizes((40.0, 60.0))
      >>> prune({8: [1.0, 1.1], 64: [1.2, 1.3], 1024: [30.0, 31.0]})  # doctest: +ELLIPSIS
      {8: 'cannot win against B=64 ...', 1024: 'cannot win against B=8 ...'}
    """
    lo, hi = (float(x) for x in b_noise_interval)
    usable = 0 < lo <= hi < math.inf

    def cost(b, n, t):
        return (1 + n / b) * t if objective == "time" else (1 + b / n) * t / b

    def prune(times):
        if not usable:
            return {}
        q = {b: np.quantile(np.asarray(t, np.float64), [0.25, 0.75]) for b, t in times.items()}
        out = {}
        for b in (b for b in q if b not in keep):
            for c in q:
                if c != b and all(cost(b, n, q[b][0]) > cost(c, n, q[c][1]) for n in (lo, hi)):
                    out[b] = (
                        f"cannot win against B={c} after {len(times[b])} rounds: slower at both "
                        f"ends of the noise-scale interval [{lo:.4g}, {hi:.4g}] even at its "
                        "fastest step time"
                    )
                    break
        return out

    return prune


def time_candidates(
    step_fn: Callable,
    make_args: Callable[[int], Sequence[Any]],
    candidates: Sequence[int],
    *,
    memory_budget_bytes: int | None = None,
    rounds: int = 5,
    warmup: int = 1,
    make_shape_args: Callable[[int], Sequence[Any]] | None = None,
    cache: hardware.CompileCache | None = None,
    max_extra_rounds: int = 10,
    prune: Callable | None = None,
    max_seconds: float | None = None,
    timing_cache: hardware.TimingCache | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    seconds: dict | None = None,
    retime: Sequence[int] = (),
    pruned_here: Sequence[int] = (),
) -> tuple[hardware.FitResult, hardware.TimingTable | None]:
    """Memory of every candidate, then one interleaved timing table of those that fit.

    Args:
      step_fn: the train step ``step_fn(*args)`` (must not donate).
      make_args: ``B -> args`` with real data, for the timing.
      candidates: batch sizes.
      memory_budget_bytes: see :func:`gns.hardware.largest_batch_that_fits`.
      rounds, warmup, max_extra_rounds, prune, max_seconds: as for
        :func:`gns.hardware.time_batch_sizes` (``prune``: e.g. :func:`dominated_sizes`); the
        memory check's confirming run of each size is its first warm-up call.
      make_shape_args: ``B -> args`` that is traceable (e.g. ``jnp.zeros``) for the memory
        prediction; default ``make_args``. The confirming run takes ``make_args(B)``, built
        once and timed next.
      cache: compiled executables: each shape is lowered once (its signature and its compile
        share it) and compiled once, for the memory analysis and the timing alike.
      timing_cache: a :class:`gns.hardware.TimingCache`: a candidate whose step signature
        (:func:`gns.hardware.step_signature`, with the memory budget) is in it is neither
        compiled nor timed again (``BatchTiming.cached``); the others are measured and stored.
        An entry pruned (:func:`dominated_sizes`) is taken only for the sizes in
        ``pruned_here`` (pruned in the same search, which keeps their reason and shorter
        timing): any other was pruned against sizes this table may lack, and is measured.
      progress: ``progress(phase, done, total)`` with phases ``"memory"`` and ``"timing"``.
      seconds: a dict to add the wall time of each phase to (``"memory"``, ``"timing"``).
      retime: candidates timed again even when ``timing_cache`` holds them, interleaved with
        the new ones (a size added to a table is compared with its neighbours under the same
        load).

    Returns:
      ``(FitResult, TimingTable or None when nothing fits)``.
    """
    cache = cache or hardware.CompileCache()
    shape_args = make_shape_args or make_args
    seconds = {} if seconds is None else seconds
    cands = sorted({int(c) for c in candidates})
    t0 = time.perf_counter()
    keys, hits = _cache_lookup(
        step_fn, shape_args, cands, memory_budget_bytes, cache, timing_cache, retime, pruned_here
    )
    todo, built = [b for b in cands if b not in hits], {}

    def real_args(b):  # built once: the confirming run and the timing take the same batch
        if b not in built:
            built[b] = tuple(make_args(b))
        return built[b]

    report = None if progress is None else (lambda phase: lambda d, t: progress(phase, d, t))
    fit = (
        hardware.largest_batch_that_fits(
            shape_args,
            step_fn,
            todo,
            memory_budget_bytes,
            cache=cache,
            progress=None if report is None else report("memory"),
            run_args=real_args,
        )
        if todo
        else None
    )
    seconds["memory"] = seconds.get("memory", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    fitting = [] if fit is None else [r.batch_size for r in fit.records if r.fits]
    table = (
        hardware.time_batch_sizes(
            step_fn,
            real_args,
            fitting,
            rounds=rounds,
            warmup=max(0, warmup - 1),
            cache=cache,
            max_extra_rounds=max_extra_rounds,
            prune=prune,
            max_seconds=max_seconds,
            progress=None if report is None else report("timing"),
        )
        if fitting
        else None
    )
    seconds["timing"] = seconds.get("timing", 0.0) + time.perf_counter() - t0
    records = {b: rec for b, (rec, _, _) in hits.items()}
    timings = {b: dataclasses.replace(t, cached=True) for b, (_, t, _) in hits.items() if t}
    for rec in [] if fit is None else fit.records:
        bt = None if table is None else table.timings.get(rec.batch_size)
        records[rec.batch_size] = rec
        timings.update({} if bt is None else {rec.batch_size: bt})
        if timing_cache is not None and keys[rec.batch_size][0]:
            plain = dataclasses.replace(rec, compiled=None)
            timing_cache[keys[rec.batch_size]] = (plain, bt, fit.budget_source)
    return _merged(fit, table, hits, records, timings, rounds)


def _cache_lookup(step_fn, shape_args, cands, budget, cache, timing_cache, retime, pruned_here):
    """The :class:`gns.hardware.TimingCache` key of each candidate and the entries it holds
    (none for the sizes in ``retime``, nor pruned ones outside ``pruned_here``)."""
    keys, hits, retime = {}, {}, set(retime)
    if timing_cache is None:
        return keys, hits
    for b in cands:
        sig = hardware.step_signature(step_fn, *hardware.abstract_args(shape_args, b), cache=cache)
        keys[b] = (sig, budget)
        entry = timing_cache.get(keys[b]) if sig is not None and b not in retime else None
        if entry is not None and (entry[1] is None or not entry[1].pruned or b in pruned_here):
            hits[b] = entry
    return keys, hits


def _merged(fit, table, hits, records, timings, rounds):
    """The fit result and the timing table of the sizes measured now and those from the cache."""
    budget, source = (
        (fit.budget_bytes, fit.budget_source)
        if fit
        else (next(iter(hits.values()))[0].budget_bytes, next(iter(hits.values()))[2])
    )
    fits = [b for b, r in records.items() if r.fits]
    result = hardware.FitResult(
        max(fits) if fits else None, budget, source, [records[b] for b in sorted(records)]
    )
    if not timings:
        return result, None
    rounds_done = table.rounds if table is not None else rounds
    max_spread = table.max_spread if table is not None else 0.1
    return result, hardware.TimingTable(dict(sorted(timings.items())), rounds_done, max_spread)


def decide(
    basis: str,
    value: tuple[float, float, float],
    evidence: Mapping[str, tuple[float, float, float]],
    table: hardware.TimingTable,
    max_batch_size: int,
    *,
    base_batch_size: int,
    base_lr: float = 1.0,
    optimizer: str = "adam",
    objective: str = "time",
    candidates: Sequence[int] | None = None,
    s_min: float | None = None,
    price_per_hour: float | None = None,
    limits: tuple[float, float] = (1, math.inf),
) -> recommend.Recommendation:
    """:func:`gns.recommend.recommend` on a timing table with the chosen basis and evidence.

    ``candidates`` default: the timed sizes the timing did not prune (:func:`dominated_sizes`),
    the base batch (unless pruned) and 2×, 4× ``max_batch_size`` (accumulation). Only those
    within ``limits`` (the smallest and largest batch the caller allows, e.g. the train set's
    size) are candidates; a pick at a limit is not told to time a batch past it.

    Returns:
      The :class:`gns.recommend.Recommendation` (``basis`` and ``evidence`` filled in).
    """
    v, lo, hi = value
    interval = None
    if not (math.isnan(lo) or math.isnan(hi)):
        interval = (min(lo, v), max(hi, v))
    times = table.step_time()
    if candidates is None:  # a size the timing pruned cannot win: it is not a candidate
        pruned = {b for b, t in table.timings.items() if t.pruned}
        accumulated = {f * max_batch_size for f in (2, 4)}
        candidates = (set(times) | {base_batch_size} | accumulated) - pruned
    candidates = sorted(b for b in candidates if limits[0] <= b <= limits[1])
    return recommend.recommend(
        v,
        times,
        max_batch_size=max_batch_size,
        base_lr=base_lr,
        base_batch_size=base_batch_size,
        optimizer=optimizer,
        b_noise_interval=interval,
        step_time_range=table.step_time_range(),
        basis=basis,
        evidence=dict(evidence),
        objective=objective,
        candidates=candidates,
        s_min=s_min,
        price_per_hour=price_per_hour,
        limits=limits,
    )


# ---------------------------------------------------------------------------------------------
# The pipeline: the stages above composed, for find_batch_size and experiments/sweep.py.


class Steps(NamedTuple):
    """What the pipeline trains, measures and evaluates with: the model's side of it.

    Attributes:
      measure: jitted ``measure(state, batch) -> (state, metrics)``: one optimizer step that
        also measures ``g_sq`` and ``trace_cov`` (:func:`run_pilot`).
      make_step: ``make_step(size, lr_multiplier) -> step(state, batch) -> state``: the jitted
        plain step at the learning rate times the multiplier; the pilot's unmeasured steps are
        ``make_step(ref_batch_size, 1.0)``, the forks the others (:func:`branch`). Pass the
        multiplier to one jitted function as an argument, so that one compiled step per batch
        size serves every multiplier.
      batch_fn: ``batch_fn(size, index) -> batch`` of the pilot's stream.
      fork_batch_fn: ``batch_fn(size, index)`` of the forks' stream (past the pilot's).
      eval_fn: ``eval_fn(state) -> held-out loss`` of the forks.
    """

    measure: Callable
    make_step: Callable[[int, float], Callable]
    batch_fn: Callable[[int, int], Any]
    fork_batch_fn: Callable[[int, int], Any]
    eval_fn: Callable[[Any], Any]


class Plan(NamedTuple):
    """The settings of one measurement (the arguments of :func:`find_batch_size`).

    ``branched``: ``True``/``False``, or ``None`` to fork only when the forks cost at most
    ``branch_max_cost`` times the pilot's examples and half the budget. ``budget_s`` (or
    ``budget_fraction`` of ``run_steps`` pilot steps) bounds the search beyond the pilot.
    ``run_steps``, the planned run's length at ``ref_batch_size``, is also where the measured
    path ends (:meth:`path_end`). A pilot that diverges (:func:`divergence`, with
    ``divergence_factor``) stops there, and nothing is measured from it.
    """

    ref_batch_size: int
    pilot_steps: int
    every: int = 1
    max_seconds: float | None = None
    num_stretches: int = 3
    branched: bool | None = None
    branch_points: int = 3
    branch_exponents: tuple[int, ...] = (-1, 0, 1, 2)
    branch_steps: int = 8
    branch_repeats: int = 2
    branch_max_cost: float = 1.0
    fork_rule: str = "sgd"
    budget_s: float | None = None
    budget_fraction: float | None = None
    run_steps: int | None = None
    confidence: float = 0.9
    branch_confidence: float | None = None
    seed: int = 0
    divergence_factor: float | None = 100.0

    def path_end(self, pilot_steps: int) -> int:
        """The last step the pilot's measurements stand for: ``run_steps`` when it is longer,
        so that the last stretch (and checkpoint) weighs for the rest of the run, which the
        recommendation is for (the noise scale held at its last measured value: a lower bound
        while it grows as the loss falls); else the pilot's end."""
        return max(int(pilot_steps), int(self.run_steps or 0))

    def fork_examples(self) -> tuple[int, int]:
        """``(examples per fork, examples of all forks)``."""
        n = int(self.branch_steps) * int(self.ref_batch_size * 2.0 ** max(self.branch_exponents))
        k = max(1, int(self.branch_points))
        return n, n * int(self.branch_repeats) * len(self.branch_exponents) * k


class Measured(NamedTuple):
    """What :func:`pipeline` measured and decided.

    Attributes:
      noise, branched: the records of the noise stage and of the forks (:func:`noise_record`,
        :func:`branch_record`; a ``note`` and no ``checkpoints`` when the forks did not run).
      basis, value, evidence, note: :func:`choose_basis` on the records.
      recommendation: :func:`decide`'s on the final table (``extended_to``: the batch past
        the candidates the timed range was extended to, or ``None``; ``candidates``: every
        candidate, of which the timing started around the noise scale and widened).
      timed: ``time_fn``'s ``(max_batch_size, TimingTable, extra)`` of the final table.
      live: the objects of the stages run in this call (not read from the cache): ``pilot``
        (:class:`Pilot`), ``noise`` (:func:`noise_evidence`), ``branched`` (:func:`branch`).
      budget_s: the budget beyond the pilot in seconds (``None``: not bounded).
      seconds: wall time of ``pilot``, ``noise`` (its evidence) and ``branched``.
    """

    noise: dict
    branched: dict
    basis: str
    value: tuple[float, float, float]
    evidence: dict
    note: str
    recommendation: recommend.Recommendation
    timed: tuple
    extended_to: int | None
    candidates: list[int]
    live: dict
    budget_s: float | None
    seconds: dict


def _noise_fields(evidence: Mapping) -> dict:
    """``b_simple``, ``interval``, ``num_used``, ``num_nonfinite_dropped``, ``trajectory``
    rows and ``effective`` of :func:`noise_evidence`'s dict."""
    b = evidence["b_simple"]
    return {
        "b_simple": b.estimate,
        "interval": [b.low, b.high],
        "num_used": b.n,
        "num_nonfinite_dropped": b.nonfinite_dropped,
        "trajectory": evidence["trajectory"].rows(),
        "effective": evidence["effective"].to_dict(),
    }


def _branch_fields(out: Mapping) -> dict:
    """``checkpoints`` (:func:`checkpoint_rows`), ``effective`` and ``points`` of
    :func:`branch`'s dict."""
    return {
        "checkpoints": checkpoint_rows(out["steps"], out["points"]),
        "effective": out["effective"].to_dict(),
        "points": [p.to_dict() for p in out["points"]],
    }


def noise_record(pilot: Pilot, evidence: Mapping, plan: Plan) -> dict:
    """The noise stage as plain values: ``b_simple``, ``interval``, the pooled ``g_sq`` and
    ``trace_cov`` (their ratio is ``b_simple``), ``confidence``, ``num_used``,
    ``num_nonfinite_dropped``, ``trajectory`` rows, ``effective`` and ``pilot`` (``steps``,
    ``every``, ``batch_size``, ``step_s``, ``stop_reason``, ``rows`` of ``step``, ``g_sq``,
    ``trace_cov`` and, where measured, ``train_loss``)."""
    keys = ("step", "g_sq", "trace_cov", "train_loss")
    rows = [{k: r[k] for k in keys if k in r} for r in pilot.rows]
    finite = [r for r in rows if math.isfinite(r["g_sq"]) and math.isfinite(r["trace_cov"])]
    return common.to_json(
        _noise_fields(evidence)
        | {k: float(np.mean([r[k] for r in finite])) for k in ("g_sq", "trace_cov")}
        | {
            "confidence": plan.confidence,
            "pilot": {
                "steps": pilot.steps,
                "every": int(plan.every),
                "batch_size": plan.ref_batch_size,
                "step_s": pilot.step_s,
                "stop_reason": pilot.stop_reason,
                "rows": rows,
            },
        }
    )


def branch_record(out: Mapping, plan: Plan, pilot: Pilot, replayed: bool) -> dict:
    """The forks as plain values: ``checkpoints`` (:func:`checkpoint_rows`), ``effective``,
    ``points``, ``batch_sizes``, ``examples_per_fork``, ``examples_forked``,
    ``pilot_examples``, ``cost_fraction`` (forked over pilot examples), ``replayed_pilot``,
    ``lr_rule`` and ``lr_rule_noise_scale``."""
    forked = sum(p.examples_forked for p in out["points"])
    pilot_examples = pilot.steps * plan.ref_batch_size
    ref, exps = plan.ref_batch_size, plan.branch_exponents
    return common.to_json(
        _branch_fields(out)
        | {
            "batch_sizes": [int(ref * 2.0**e) for e in exps],
            "examples_per_fork": out["examples_per_fork"],
            "examples_forked": forked,
            "pilot_examples": pilot_examples,
            "cost_fraction": forked / pilot_examples,
            "replayed_pilot": replayed,
            "lr_rule": out["lr_rule"],
            "lr_rule_noise_scale": out["lr_rule_noise_scale"],
        }
    )


def effective_from_record(d: Mapping | None) -> critical.EffectiveNoiseScale | None:
    """A stored ``effective`` record back as the NamedTuple (strict JSON stores non-finite
    numbers as ``null``: a missing high end is ``+inf``); ``None`` for no measurement."""
    if not d or d.get("value") is None and d.get("basis") == "none" and "s_min" not in d:
        return None

    def num(x, default=math.nan):
        return default if x is None else x

    fields = dict(d)
    fields.update(value=num(d["value"]), low=num(d["low"]), high=num(d["high"], math.inf))
    fields.update(s_min=num(d["s_min"]), e_min=num(d["e_min"]), weights=np.asarray(d["weights"]))
    return critical.EffectiveNoiseScale(**fields)


def fork_noise_scale(noise: Mapping) -> float:
    """The noise scale of the forks' ``sgd`` rule, from a noise record: the effective value
    along the pilot, else ``b_simple``, else ``inf`` (linear)."""
    for v in ((noise.get("effective") or {}).get("value"), noise.get("b_simple")):
        if v is not None and np.isfinite(v) and v > 0:
            return float(v)
    return math.inf


def _fork_note(plan: Plan, pilot_steps: int, step_s: float, budget_s: float | None) -> str:
    """Why the forks do not run (``""``: they do)."""
    if plan.branched is False or int(plan.branch_points) <= 0:
        return "branched critical batch not measured: branched=False"
    if plan.branched:
        return ""
    _, total = plan.fork_examples()
    pilot_examples = pilot_steps * plan.ref_batch_size
    est_s = total / plan.ref_batch_size * step_s if np.isfinite(step_s) else math.nan
    if total > plan.branch_max_cost * pilot_examples:
        return (
            f"branched critical batch not measured: its forks ({total} examples) would cost "
            f"more than {plan.branch_max_cost}x the pilot's {pilot_examples}; pass branched=True"
        )
    if budget_s is not None and not est_s <= 0.5 * budget_s:
        return (
            f"branched critical batch not measured: its forks (about {est_s:.3g} s) would take "
            f"more than half the budget of {budget_s:.3g} s; pass branched=True"
        )
    return ""


def _run_forks(steps: Steps, plan: Plan, pilot: Pilot, noise: Mapping, report) -> dict:
    """:func:`branch` from the pilot's checkpoints at the forks' rule."""
    ref, rule, fork_noise = plan.ref_batch_size, plan.fork_rule, fork_noise_scale(noise)
    n_fork, _ = plan.fork_examples()
    out = branch(
        pilot.checkpoints,
        steps.make_step,
        steps.fork_batch_fn,
        steps.eval_fn,
        ref_batch_size=ref,
        end_step=plan.path_end(pilot.steps),
        num_examples=n_fork,
        exponents=plan.branch_exponents,
        lr_multiplier=lambda b: critical.lr_multipliers(ref, [b], rule, fork_noise)[0],
        num_repeats=plan.branch_repeats,
        pilot_examples=pilot.steps * ref,
        confidence=plan.branch_confidence or plan.confidence,
        seed=plan.seed,
        progress=lambda d, t: report("branched", d, t),
    )
    return out | {"lr_rule": rule, "lr_rule_noise_scale": fork_noise, "examples_per_fork": n_fork}


def _no_cache(name: str, compute: Callable[[], Any]) -> Any:
    return compute()


def pipeline(
    steps: Steps,
    state,
    plan: Plan,
    *,
    time_fn: Callable,
    decide_fn: Callable,
    candidates: Sequence[int],
    cache: Callable[[str, Callable[[], dict]], dict] = _no_cache,
    on_step: Callable[[int, Any], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    limits: tuple[float, float] = (1, math.inf),
) -> Measured:
    """Pilot, noise evidence, forks, basis, timing and the decision, widened while it sits at
    an end of the timed sizes.

    The stages of the module docstring in order; each measuring stage's result is a record of
    plain values (:func:`noise_record`, :func:`branch_record`) passed through
    ``cache(name, compute)`` (names ``"noise_scale"`` and ``"critical_batch"``): the default
    computes it, a stage cache may return a stored record instead. The forks start from states
    of this call's pilot, or of its exact replay when the noise record came from the cache.

    Args:
      steps: the :class:`Steps`.
      state: the state the pilot starts from.
      plan: the :class:`Plan`.
      time_fn: ``time_fn(candidates, b_noise_interval, seconds_left) -> (max_batch_size,
        TimingTable, extra)``: memory and step time of the candidates (raise when none fits);
        called again with one size more while the search widens (a table may hold more sizes
        than asked).
      decide_fn: ``decide_fn(basis, value, evidence, table, max_batch_size) ->
        Recommendation`` (e.g. :func:`decide` with the rate and objective bound).
      candidates: the batch sizes the search may time: it starts with those around the
        noise-scale interval (:func:`timing_start`) and, while the pick sits at an end of the
        timed sizes, times the next candidate past that end; once past the candidates at most
        (``Recommendation.extend_range_to``), within ``limits`` (the smallest and largest
        batch the caller allows). Sizes never reached are never compiled.
      cache: see above.
      on_step: passed to :func:`run_pilot` (not to a replay).
      progress: ``progress(phase, done, total)`` for ``"pilot"`` and ``"branched"``.

    Returns:
      A :class:`Measured`.

    Raises:
      ValueError: a pilot that diverged (:func:`divergence`), or one of fewer than 2 steps or
        2 finite measurements.
    """
    ref, report = plan.ref_batch_size, progress or (lambda phase, done, total: None)
    live, seconds, t0 = {}, {}, time.perf_counter()
    may_fork = not _fork_note(plan, plan.pilot_steps, math.nan, None)
    ck = checkpoint_steps(plan.pilot_steps, plan.branch_points) if may_fork else ()

    def pilot_run(hook=None):
        return run_pilot(
            state,
            steps.measure,
            steps.batch_fn,
            batch_size=ref,
            num_steps=plan.pilot_steps,
            every=plan.every,
            plain_step=steps.make_step(ref, 1.0) if plan.every > 1 else None,
            max_seconds=plan.max_seconds,
            checkpoint_steps=ck,
            on_step=hook,
            progress=lambda d, t: report("pilot", d, t),
            divergence_factor=plan.divergence_factor,
        )

    def noise_stage():
        pilot = live["pilot"] = pilot_run(on_step)
        if pilot.stop_reason == "diverged":
            losses = [(r["step"], r["train_loss"]) for r in pilot.rows if "train_loss" in r]
            why = (divergence(losses[:k], plan.divergence_factor) for k in range(len(losses) + 1))
            raise ValueError(f"the pilot (batch {ref}) diverged: {next(w for w in why if w)}")
        if pilot.rows and all(r["g_sq"] == 0 == r["trace_cov"] for r in pilot.rows):
            raise ValueError(
                "the gradient was zero at every measured step of the pilot: no parameter "
                "reaches the loss, or the loss is constant; check that loss_fn reads params."
            )
        if pilot.steps < 2:
            raise ValueError(
                f"the budget is too small to measure anything: the pilot ran {pilot.steps} "
                f"step in max_seconds={plan.max_seconds} (compilation included); raise it."
            )
        t1 = time.perf_counter()
        live["noise"] = noise_evidence(
            pilot.rows,
            ref,
            num_stretches=plan.num_stretches,
            end_step=pilot.steps,
            run_steps=plan.run_steps,
            confidence=plan.confidence,
            seed=plan.seed,
        )
        seconds["noise"] = time.perf_counter() - t1
        return noise_record(pilot, live["noise"], plan)

    noise = cache("noise_scale", noise_stage)
    seconds["noise"] = seconds.get("noise", 0.0)
    seconds["pilot"] = time.perf_counter() - t0 - seconds["noise"]
    pilot_note = noise["pilot"]
    budget_s = plan.budget_s
    if plan.budget_fraction is not None:
        budget_s = plan.budget_fraction * plan.run_steps * _num(pilot_note["step_s"])
    why = _fork_note(plan, pilot_note["steps"], _num(pilot_note["step_s"]), budget_s)

    def fork_stage():
        pilot = live.get("pilot") or pilot_run()  # replayed: the same states (deterministic)
        if not pilot.checkpoints:
            return {
                "checkpoints": [],
                "effective": None,
                "note": "branched critical batch "
                "not measured: the pilot stopped before checkpoints",
            }
        live["branched"] = _run_forks(steps, plan, pilot, noise, report)
        return branch_record(live["branched"], plan, pilot, "pilot" not in live)

    t1 = time.perf_counter()
    forks = (
        {"checkpoints": [], "effective": None, "note": why}
        if why
        else cache("critical_batch", fork_stage)
    )
    seconds["branched"] = time.perf_counter() - t1
    b_simple = tuple(math.inf if x is None else x for x in (noise["b_simple"], *noise["interval"]))
    basis, value, evidence, note = choose_basis(
        b_simple,
        effective_from_record(noise.get("effective")),
        effective_from_record(forks.get("effective")),
    )
    note = "; ".join(x for x in (note, forks.get("note", "")) if x)
    rec, timed, extended, cands = _widen(
        time_fn,
        decide_fn,
        candidates,
        (basis, value, evidence),
        lambda: (
            None
            if budget_s is None
            else max(budget_s - (time.perf_counter() - t0 - seconds["pilot"]), 1e-9)
        ),
        limits,
    )
    return Measured(
        noise,
        forks,
        basis,
        value,
        evidence,
        note,
        rec,
        timed,
        extended,
        cands,
        live,
        budget_s,
        seconds,
    )


def _num(x) -> float:
    return math.nan if x is None else float(x)


def timing_start(candidates: Sequence[int], interval: tuple[float, float]) -> list[int]:
    """The candidates timed first: the one nearest the noise scale (log scale, the geometric
    middle of its interval) and its two neighbours; all of them when the interval is not
    known.

    Three sizes are the fewest that can show a pick inside the timed range. The time to
    target ``(1 + n/B)·t(B)`` has its optimum near ``n`` when the step time grows with the
    batch at a rate set by its fixed cost, and elsewhere on other hardware: the search widens
    from there while the pick sits at an end (:func:`pipeline`), so a start off the optimum
    costs one more size per doubling, not the answer.

    Example:
      >>> timing_start([8, 16, 32, 64, 128, 256, 512], (190.0, 400.0))
      [128, 256, 512]
      >>> timing_start([8, 16, 32], (1000.0, math.inf))
      [16, 32]
    """
    cands = sorted({int(c) for c in candidates})
    lo, hi = (float(x) for x in interval)
    if not 0 < lo <= hi or lo == math.inf:  # nan, not positive or infinite: no start
        return cands
    mid = math.sqrt(lo) * math.sqrt(hi) if math.isfinite(hi) else lo
    i = min(range(len(cands)), key=lambda j: abs(math.log(cands[j] / mid)))
    return cands[max(0, i - 1) : i + 2]


def _next_size(rec, table, cands: Sequence[int], asked: set, extended, limits) -> int | None:
    """The size to time next: the candidate past the end of the timed sizes the pick sits at
    (smaller first), else once past the candidates ``rec.extend_range_to`` if it is within
    ``limits``; ``None`` when the pick is inside the timed sizes or nothing is left in its
    direction (an end that did not fit closes its side)."""
    timed = sorted(table.timings)
    lo, hi, pick = timed[0], timed[-1], rec.batch_size
    beyond = rec.extend_range_to if extended is None else None
    beyond = beyond if beyond is not None and limits[0] <= beyond <= limits[1] else None
    if pick <= lo:
        down = [c for c in cands if c < lo and c not in asked]
        if down:
            return max(down)
        if rec.at_range_end == "smallest":
            return beyond if beyond not in asked else None
    if pick >= hi and not any(a > hi for a in asked):
        up = [c for c in cands if c > hi]
        if up:
            return min(up)
        if rec.at_range_end == "largest":
            return beyond
    return None


def _widen(time_fn, decide_fn, candidates, chosen, seconds_left, limits=(1, math.inf)):
    """Time the candidates around the noise-scale interval (:func:`timing_start`), decide,
    and while the pick sits at an end of the timed sizes, time the next size past it
    (:func:`_next_size`; once past the candidates at most, within ``limits``) and decide
    again."""
    basis, value, evidence = chosen
    interval = (min(value[1], value[0]), max(value[2], value[0]))
    cands = sorted({int(c) for c in candidates})
    asked = set(timing_start(cands, interval))
    timed = time_fn(sorted(asked), interval, seconds_left())
    rec = decide_fn(basis, value, evidence, timed[1], timed[0])
    extended = None
    while (nxt := _next_size(rec, timed[1], cands, asked, extended, limits)) is not None:
        left = seconds_left()
        if left is not None and left <= 1e-9:
            break  # the budget is spent: the pick stays at the end, and says so
        asked.add(nxt)
        extended = nxt if nxt not in cands else extended
        timed = time_fn(sorted(asked), interval, left)
        rec = decide_fn(basis, value, evidence, timed[1], timed[0])
    return rec, timed, (extended if extended in timed[1].timings else None), cands


# ---------------------------------------------------------------------------------------------
# The result.


@dataclasses.dataclass
class BatchSizeResult:
    """What :func:`find_batch_size` measured and recommends.

    Attributes:
      recommendation: the :class:`gns.recommend.Recommendation` (``batch_size``,
        ``learning_rate``, ``plausible_batch_sizes``, ``basis``, ``evidence``, ``reason``...).
      basis: the evidence the recommendation rests on (``branched``, ``trajectory`` or
        ``b_simple``), and ``basis_note`` why a better one was not used.
      pilot_rows: the pilot's per-step measurements.
      b_simple: :class:`gns.smoothing.Interval` of the whole pilot.
      trajectory: :class:`gns.critical.Trajectory`.
      effective_noise_scale: :class:`gns.critical.EffectiveNoiseScale` of the trajectory.
      branched: ``None`` when not run, else :func:`branch`'s dict.
      memory: :class:`gns.hardware.FitResult`.
      timing: :class:`gns.hardware.TimingTable` (after the range extension, if any).
      extended_to: the batch the timed range was extended to (``None``: not extended).
      device: :class:`gns.hardware.DeviceInfo`.
      settings: the arguments that shaped the measurement.
      seconds: wall time of each phase: ``path`` (choosing the pilot's per-example path:
        :func:`gns.ghost.select`), ``pilot`` (training that :attr:`state` keeps, its step's
        compile included), ``noise``, ``branched``, ``memory`` (per batch size reached:
        lowering, compiling, the memory analysis and one confirming run; summed over the
        widening steps), ``timing`` (the interleaved rounds, summed likewise), ``decide``,
        ``total`` and ``overhead`` (``total − pilot``: what the search cost beyond the training
        it hands back).
      state: the trained state after the pilot (:class:`TrainState`): continue the run from it
        (:func:`continue_training`) instead of starting over.
      budget_s: the overhead budget in seconds (``None``: not bounded).
    """

    recommendation: recommend.Recommendation
    basis: str
    basis_note: str
    pilot_rows: list[dict]
    b_simple: smoothing.Interval
    trajectory: critical.Trajectory
    effective_noise_scale: critical.EffectiveNoiseScale
    branched: dict | None
    memory: hardware.FitResult
    timing: hardware.TimingTable
    extended_to: int | None
    device: hardware.DeviceInfo
    settings: dict
    seconds: dict
    state: TrainState | None = None
    budget_s: float | None = None

    @property
    def batch_size(self) -> int:
        """The recommended batch size."""
        return self.recommendation.batch_size

    @property
    def warnings(self) -> tuple[str, ...]:
        """What makes the answer less trustworthy, in words (the recommendation's
        ``warnings``: unstable step times and how far the pick could move, unresolved or
        diverged forks and the fallback, an overhead over budget, a pick at a range end)."""
        return self.recommendation.warnings

    def throughput_rows(self) -> list[dict]:
        """One row per candidate: memory verdict and step time (``plots.plot_throughput``)."""
        times = self.timing.step_time()
        return [
            r.to_dict()
            | {
                "step_time_s": times.get(r.batch_size),
                "examples_per_s": r.batch_size / times[r.batch_size]
                if r.batch_size in times
                else None,
            }
            for r in self.memory.records
        ]

    def to_dict(self) -> dict:
        """Every measurement as strict-JSON-able values (non-finite numbers as ``None``)."""
        evidence = {
            "b_simple": self.b_simple,
            "trajectory": self.trajectory,
            "effective": self.effective_noise_scale,
        }
        out = {
            "batch_size": self.batch_size,
            "basis": self.basis,
            "basis_note": self.basis_note,
            "recommendation": self.recommendation.to_dict(),
            "noise_scale": _noise_fields(evidence),
            "critical_batch": None if self.branched is None else _branch_fields(self.branched),
            "pilot": self.pilot_rows,
            "memory": self.memory.to_dict(),
            "timing": self.timing.to_dict(),
            "throughput": self.throughput_rows(),
            "max_batch_size": self.memory.max_batch_size,
            "extended_to": self.extended_to,
            "device": self.device.to_dict(),
            "settings": self.settings,
            "seconds": self.seconds,
            "warnings": list(self.warnings),
            "budget_s": self.budget_s,
            "state": None
            if self.state is None
            else {"step": self.state.step, "examples_seen": self.state.examples_seen},
        }
        return common.to_json(out)

    def plot(self) -> list:
        """The noise scale over the pilot and the throughput curve (:mod:`gns.plots`), as two
        matplotlib figures."""
        from gns import plots

        return [plots.plot_noise_scale(self.pilot_rows), plots.plot_throughput(self.to_dict())]


# ---------------------------------------------------------------------------------------------
# Continuing the run.


class TrainState(NamedTuple):
    """Where the pilot left the run: continue training from here.

    Attributes:
      params: the parameters after the pilot.
      opt_state: the optimizer state after the pilot.
      step: optimizer steps done.
      examples_seen: position in the ``batch_fn`` stream: the examples ``[0, examples_seen)``
        were trained on (or skipped, to continue at another batch size).
    """

    params: Any
    opt_state: Any
    step: int
    examples_seen: int


def continue_at(examples_seen: int, batch_size: int) -> int:
    """The index of the first ``batch_fn(batch_size, index)`` batch after ``examples_seen``
    examples of the stream: the run goes on from there at ``batch_size`` (fewer than
    ``batch_size`` examples are skipped when the batch changes).

    Example:
      >>> continue_at(200 * 32, 128), continue_at(200 * 32, 96)
      (50, 67)
    """
    return math.ceil(int(examples_seen) / int(batch_size))


@functools.lru_cache(maxsize=16)
def _plain_step(loss_fn: Callable, optimizer, batch_size: int, accumulation_steps: int):
    """The jitted step of :func:`continue_training`, one per loss, optimizer and shape (kept, so
    that training on in chunks compiles once)."""
    b, k = batch_size, accumulation_steps

    @jax.jit
    def step(params, opt_state, batch):
        micro = jax.tree.map(lambda x: x.reshape((k, b // k) + x.shape[1:]), batch)

        def add(acc, mb):
            loss, g = jax.value_and_grad(loss_fn)(params, mb)
            return jax.tree.map(jnp.add, acc, (loss, g)), None

        zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(add, zero, micro)
        grads = jax.tree.map(lambda g: g / k, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss / k

    return step


_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _injected(x) -> bool:
    return isinstance(x, _INJECTED)


def _injected_rates(opt_state) -> list:
    """The ``optax.inject_hyperparams`` states of ``opt_state`` that hold a learning rate."""
    leaves = jax.tree.leaves(opt_state, is_leaf=_injected)
    return [x for x in leaves if _injected(x) and "learning_rate" in x.hyperparams]


def _injected_rate(opt_state) -> float | None:
    """The constant learning rate an ``optax.inject_hyperparams`` state holds (``None``: none,
    several, or one that follows a schedule)."""
    rates = _injected_rates(opt_state)
    if len(rates) != 1 or _scheduled(opt_state):
        return None
    return float(rates[0].hyperparams["learning_rate"])


def _base_rate(a: dict) -> float | None:
    """The rate the recommendation scales: ``learning_rate``, else the one the optimizer's
    state holds (``None``: neither, the recommended rate is then relative)."""
    return a["learning_rate"] if a["learning_rate"] is not None else _injected_rate(a["opt_state"])


def _follows_schedule(optimizer, params, opt_state) -> bool:
    """Whether ``optimizer`` scales its updates by a schedule built into it
    (``optax.adamw(schedule)``: an ``optax.ScaleByScheduleState`` in its state)."""
    state = jax.eval_shape(optimizer.init, params) if opt_state is None else opt_state
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return any(map(is_schedule, jax.tree.leaves(state, is_leaf=is_schedule)))


def _scheduled(opt_state) -> bool:
    """Whether an injected learning rate follows a schedule (its value now is not the rate a
    batch size scales)."""
    return any(
        "learning_rate" in getattr(x, "hyperparams_states", {}) for x in _injected_rates(opt_state)
    )


def _with_rate_of(optimizer, opt_state, params):
    """``opt_state`` with ``optimizer``'s own hyperparameters where it injects them
    (``optax.inject_hyperparams`` keeps the rate in the state, so the pilot's would carry
    over); a ``ValueError`` when ``optimizer``'s state has another structure."""
    fresh = optimizer.init(params)
    if jax.tree.structure(fresh) != jax.tree.structure(opt_state):
        raise ValueError(
            "optimizer's state has another structure than the optimizer state given: pass the "
            "optimizer that state was made with, at the rate to use (e.g. "
            "optax.adam(rec.learning_rate) after a pilot with optax.adam(1e-3))."
        )
    return jax.tree.map(
        lambda old, new: old._replace(hyperparams=new.hyperparams) if _injected(old) else old,
        opt_state,
        fresh,
        is_leaf=_injected,
    )


def continue_training(
    loss_fn: Callable,
    optimizer,
    batch_fn,
    state: TrainState | BatchSizeResult,
    num_steps: int,
    *,
    batch_size: int | None = None,
    accumulation_steps: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[TrainState, np.ndarray]:
    """Train ``num_steps`` more plain steps from ``state`` at ``batch_size``.

    The stream continues where ``state`` left it: the first batch is ``batch_fn(batch_size,
    continue_at(examples_seen, batch_size))`` (:func:`continue_at`). Build ``optimizer`` at the
    recommended learning rate: the pilot's state carries over (moments, counts), and where
    the state holds the rate (``optax.inject_hyperparams``) it is ``optimizer``'s.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, as for :func:`find_batch_size`.
      optimizer: an optax ``GradientTransformation`` whose state has ``state.opt_state``'s
        structure (e.g. the same optimizer at another rate).
      batch_fn: as for :func:`find_batch_size`.
      state: a :class:`TrainState` (this function's), or the :class:`BatchSizeResult` of
        :func:`find_batch_size`: its ``.state`` at its recommended batch and accumulation.
      num_steps: steps to train.
      batch_size: the batch of every step (default: the recommendation's, with a result).
      accumulation_steps: split each batch into this many micro-batches and average their
        gradients, one optimizer step per batch (default: the recommendation's at its batch,
        else 1): above the largest batch that fits.
      progress: ``progress("train", done, num_steps)`` after every step.

    Returns:
      ``(TrainState, losses)``: the state after the last step and each step's training loss.
    """
    if isinstance(state, BatchSizeResult):
        rec = state.recommendation
        if accumulation_steps is None and batch_size in (None, rec.batch_size):
            accumulation_steps = rec.accumulation_steps  # the pick's own split
        batch_size = rec.batch_size if batch_size is None else batch_size
        state = state.state
    if batch_size is None:
        raise ValueError("batch_size is needed to continue from a TrainState.")
    accumulation_steps = 1 if accumulation_steps is None else accumulation_steps
    get = as_batch_fn(batch_fn)
    b = common.check_int(batch_size, "batch_size", 1)
    k = common.check_int(accumulation_steps, "accumulation_steps", 1)
    common.check_int(num_steps, "num_steps", 0)
    if b % k:
        raise ValueError(f"batch_size={b} is not a multiple of accumulation_steps={k}.")
    step = _plain_step(loss_fn, optimizer, b, k)
    params = state.params
    opt_state = _with_rate_of(optimizer, state.opt_state, params)
    first = continue_at(state.examples_seen, b)
    losses = []
    for i in range(num_steps):
        params, opt_state, loss = step(params, opt_state, _checked_batch(get, b, first + i))
        losses.append(loss)
        if progress is not None:
            progress("train", i + 1, num_steps)
    out = TrainState(params, opt_state, state.step + num_steps, (first + num_steps) * b)
    return out, np.asarray(jax.device_get(losses), np.float64)


# ---------------------------------------------------------------------------------------------
# Checking every argument before any work.


def resolve_lr_rule(lr_rule: str | None, optimizer_name: str | None, opt_state) -> tuple[str, str]:
    """The learning-rate rule (:mod:`gns.scaling`) and where it came from.

    ``lr_rule`` when given, else the rule of ``optimizer_name``, else the rule read from the
    optax state (:func:`gns.scaling.infer_rule`); an optimizer whose rule cannot be read is an
    error: a wrong rule (Adam's square root for SGD, or the reverse) silently mis-scales every
    rate.

    Returns:
      ``(rule, source in words)``.

    Example:
      >>> import optax
      >>> resolve_lr_rule(None, None, optax.sgd(0.1, momentum=0.9).init(jnp.zeros(2)))[0]
      'sgd'
    """
    if lr_rule is not None:
        if optimizer_name is not None:
            scaling.rule_for(optimizer_name)
        return scaling.check_rule(lr_rule), "lr_rule"
    if optimizer_name is not None:
        return scaling.rule_for(optimizer_name), f"optimizer_name={optimizer_name!r}"
    rule = scaling.infer_rule(opt_state)
    if rule is None:
        raise ValueError(
            "cannot tell this optimizer's learning-rate rule from its state: pass "
            "lr_rule='sgd' (SGD, momentum, LARS: the noise-scale rule), 'sqrt' (Adam-family), "
            "'linear' or 'constant' (or optimizer_name='sgd', 'adam', ...)."
        )
    if scaling.is_stateless(opt_state):
        return rule, STATELESS
    return rule, "inferred from the optimizer state"


# The rule's source when the optimizer state holds nothing to tell plain SGD from a sign or
# normalized update (also a warning of the result).
STATELESS = (
    "assumed: the optimizer state holds no statistics, as plain SGD's; a sign or normalized "
    "update (optax.scale_by_sign, fromage) wants lr_rule='sqrt', plain SGD lr_rule='sgd'"
)


def _check_batch_fn(get, ref: int, other: int):
    """Batch 0 at ``ref`` and batch 1 at ``other``: exactly the examples asked, and the same
    structure, per-example shapes and dtypes (one stream). Returns batch 0."""
    first, second = _checked_batch(get, ref, 0), _checked_batch(get, other, 1)

    def spec(batch):
        leaves, tree = jax.tree.flatten(batch)
        return tree, [(np.shape(x)[1:], jnp.result_type(x)) for x in leaves]

    if spec(first) != spec(second):
        raise ValueError(
            f"batch_fn({ref}, 0) and batch_fn({other}, 1) differ in structure, per-example shape "
            f"or dtype ({spec(first)} vs {spec(second)}): batch_fn must serve one stream, the "
            "same kind of example at every batch size."
        )
    return first


def _check_optimizer(a: dict) -> tuple[str, str, str]:
    """``(rule, where it came from, the forks' rule)`` of the optimizer and its rate."""
    if a["learning_rate"] is None and _scheduled(a["opt_state"]):
        raise ValueError(
            "the optimizer's learning rate follows a schedule (optax.inject_hyperparams with a "
            "callable), so its value now is not the rate to scale: pass learning_rate= the "
            "schedule's peak; the recommended rate is the peak to build the schedule with."
        )
    held = _injected_rate(a["opt_state"])
    if a["learning_rate"] is None and held is not None and not held > 0:
        raise ValueError(
            f"the optimizer's state holds learning rate {held:g} (optax.inject_hyperparams): "
            "the pilot would not train; pass a positive rate."
        )
    if None not in (held, a["learning_rate"]) and not math.isclose(
        held, a["learning_rate"], rel_tol=1e-6
    ):
        raise ValueError(
            f"learning_rate={a['learning_rate']!r}, but the optimizer's state holds {held:.6g} "
            f"(optax.inject_hyperparams): pass learning_rate={held:.6g}, or leave it out."
        )
    multi = lambda x: isinstance(x, optax.MultiStepsState | optax.ApplyEvery)
    if any(map(multi, jax.tree.leaves(a["opt_state"], is_leaf=multi))):
        raise ValueError(
            "optax.MultiSteps and optax.apply_every take one update every k batches, so the "
            "batch the finder measures is not the update's: pass the inner optimizer "
            "(continue_training's accumulation_steps= runs a batch above the largest that fits)."
        )
    rule, source = resolve_lr_rule(a["lr_rule"], a["optimizer_name"], a["opt_state"])
    fork_rule = scaling.check_rule(a["branch_lr_rule"] or rule, "branch_lr_rule")
    return rule, source, fork_rule


def _check_sizes(a: dict, ref: int) -> tuple[list[int], list[int] | None, tuple]:
    """``(fork exponents, candidates or None, (smallest, largest) batch allowed)``."""
    exps = sorted(int(e) for e in a["branch_exponents"])
    bad = len(set(exps)) < 2 or any(ref * 2.0**e != int(ref * 2.0**e) for e in exps)
    if bad and a["branched"] is not False:
        raise ValueError(
            f"branch_exponents must be at least 2 distinct ints with ref_batch_size·2^j whole "
            f"batch sizes (the forks' batches), got {list(a['branch_exponents'])} at "
            f"ref_batch_size={ref}: pass other branch_exponents, an even ref_batch_size, or "
            "branched=False."
        )
    cands = a["candidates"]
    if cands is not None:
        cands = sorted({common.check_int(c, "candidate batch size", 1) for c in cands})
        if not cands:
            raise ValueError("candidates is empty: pass batch sizes to time, or None.")
    lo, hi = a["min_batch_size"], a["max_batch_size"]
    lo = lo if lo is None else common.check_int(lo, "min_batch_size", 1)
    hi = hi if hi is None else common.check_int(hi, "max_batch_size", 1)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min_batch_size={lo} > max_batch_size={hi}: swap them.")
    limits = (lo or (cands[0] if cands else 1), hi or (cands[-1] if cands else math.inf))
    return exps, cands, limits


def _check_transformation(optimizer) -> None:
    """A ``ValueError`` unless ``optimizer`` is an optax ``GradientTransformation`` (before its
    ``init``; :func:`_check_optimizer` then checks its state and rate)."""
    if not all(callable(getattr(optimizer, f, None)) for f in ("init", "update")):
        raise ValueError(
            f"optimizer must be an optax.GradientTransformation (init and update), got "
            f"{optimizer!r}: pass e.g. optax.adam(1e-3) (its name goes in optimizer_name)."
        )


def _check_arguments(a: dict) -> dict:
    """Every argument of :func:`find_batch_size` (``a``: its locals), before any work.

    Returns the derived plan: ``ref``, ``get``, ``first``, ``rule``, ``rule_source``,
    ``fork_rule``, ``exps``, ``cands`` (``None``: default), ``limits``, ``progress``."""
    ref = common.check_int(a["ref_batch_size"], "ref_batch_size", 2)
    steps = a["pilot_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 2:
        raise ValueError(
            f"the budget is too small to measure anything: pilot_steps={steps!r}; the noise "
            "scale needs at least 2 measured steps (a trajectory 2 per stretch): use "
            f"pilot_steps >= {2 * a['num_stretches']}, e.g. 200."
        )
    if a["max_seconds"] is not None and not a["max_seconds"] > 0:
        raise ValueError(
            f"the budget is too small to measure anything: max_seconds={a['max_seconds']!r}; "
            "give a positive time budget (or None for pilot_steps alone)."
        )
    if a["method"] not in ("auto", "vmap", "microbatch"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'microbatch', got {a['method']!r}.")
    if a["method"] == "microbatch" and ref % a["num_microbatches"]:
        raise ValueError(
            f"ref_batch_size={ref} is not a multiple of num_microbatches={a['num_microbatches']}."
        )
    if a["objective"] not in ("time", "cost"):
        raise ValueError(f"objective must be 'time' or 'cost', got {a['objective']!r}.")
    common.check_confidence(a["confidence"])
    if a["divergence_factor"] is not None and not (
        common.is_real(a["divergence_factor"]) and a["divergence_factor"] > 1
    ):
        raise ValueError(
            f"divergence_factor must be a number > 1 (or None), got {a['divergence_factor']!r}."
        )
    for name, hint in (
        ("learning_rate", "the rate of `optimizer` at ref_batch_size"),
        ("budget_s", "the seconds the search may cost beyond the pilot"),
        ("budget_fraction", "e.g. 0.1 for 10% of the planned run"),
    ):
        common.check_positive(a[name], name, hint, optional=True)
    if a["budget_fraction"] is not None and (a["budget_s"] is not None or not a["run_steps"]):
        raise ValueError(
            "budget_fraction needs run_steps (the planned run's length in steps at "
            "ref_batch_size) and no budget_s: pass one budget, e.g. budget_fraction=0.1, "
            "run_steps=5000."
        )
    if a["run_steps"] is not None:
        common.check_int(a["run_steps"], "run_steps", 1)
    rule, source, fork_rule = _check_optimizer(a)
    exps, cands, limits = _check_sizes(a, ref)
    progress = a["progress"]
    if progress is True or (progress not in (None, False) and not callable(progress)):
        raise ValueError(
            f"progress must be a callable progress(phase, done, total) or None, got "
            f"{progress!r}: gns draws nothing itself (e.g. update a tqdm bar per phase in it)."
        )
    get = as_batch_fn(a["batch_fn"])
    first = _check_batch_fn(get, ref, max(1, ref // 2))
    _check_loss(a["loss_fn"], a["params"], first)
    per_example = a["method"] != "microbatch"
    return {
        "mean_loss": per_example and mean_loss_warning(a["loss_fn"], a["params"], first),
        "ref": ref,
        "get": get,
        "first": first,
        "rule": rule,
        "rule_source": source,
        "fork_rule": fork_rule,
        "exps": exps,
        "cands": cands,
        "limits": limits,
        "progress": progress or (lambda phase, done, total: None),
    }


# ---------------------------------------------------------------------------------------------
# The entry point.


def _zeros_like_batch(template, size: int):
    return jax.tree.map(
        lambda x: jnp.zeros((size,) + np.shape(x)[1:], jnp.result_type(x)), template
    )


def _loss_as_aux(loss_fn):
    """``loss_fn`` returning ``(loss, loss)``: the measuring step reports the loss at no extra
    cost (``has_aux=True``; the per-example path is chosen for this form)."""

    def with_loss(params, batch):
        loss = loss_fn(params, batch)
        return loss, loss

    return with_loss


def _make_steps(loss_fn, optimizer, method: str, num_microbatches: int, tracker):
    """``(measure_step, train_step, make_step)`` of the pilot, the timing and the forks."""

    def update(params, opt_state, grads, mult=None):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        if mult is not None:
            updates = jax.tree.map(lambda u: mult.astype(u.dtype) * u, updates)
        return optax.apply_updates(params, updates), opt_state

    with_loss = _loss_as_aux(loss_fn)

    @jax.jit
    def measure_step(state, batch):
        p, o, g = state
        if method == "microbatch":
            out = estimate.microbatch(
                with_loss, p, batch, num_microbatches=num_microbatches, has_aux=True
            )
        else:
            out = estimate.per_example(with_loss, p, batch, method=method, has_aux=True)
        stats, grads, losses = out
        g = tracker.update(stats, g)
        metrics = {"g_sq": stats.g_sq, "trace_cov": stats.trace_cov, "b_simple": stats.b_simple}
        metrics["train_loss"] = jnp.mean(losses)
        metrics |= {"ema_g_sq": g.g_sq, "ema_trace_cov": g.trace_cov, "ema_b_simple": g.b_simple}
        return (*update(p, o, grads), g), metrics

    def train_step(params, opt_state, batch):
        return update(params, opt_state, jax.grad(loss_fn)(params, batch))

    @jax.jit
    def scaled_step(state, batch, mult):
        p, o, g = state
        return (*update(p, o, jax.grad(loss_fn)(p, batch), mult), g)

    fork_steps: dict[float, Callable] = {}

    def make_step(size, mult):  # the multiplier an argument: one compiled step per shape
        return fork_steps.setdefault(mult, functools.partial(scaled_step, mult=np.float32(mult)))

    return measure_step, train_step, make_step


def _branch_warnings(branched, basis: str) -> list[str]:
    """Diverged forks (excluded, named), unresolved checkpoints and the basis fallback."""
    if branched is None:
        return []
    out = []
    for s, p in zip(branched["steps"], branched["points"], strict=True):
        out += [f"pilot step {s}: fork at B = {b} excluded, {why}" for b, why in p.excluded]
    bad = [s for s, p in zip(branched["steps"], branched["points"], strict=True) if not p.resolved]
    if bad:
        where = "basis falls back to " + basis if basis != "branched" else "left out of the fit"
        out.append(
            f"branched critical batch unresolved at pilot step(s) {bad} ({where}): fork other "
            "batch sizes (branch_exponents), longer (branch_steps) or more repeats"
        )
    return out


def pilot_warnings(rows: list[dict]) -> list[str]:
    """A pilot whose training loss ended above where it started: the median of its last
    :data:`DIVERGENCE_WINDOW` measured losses over that of its first (one batch's loss
    scatters)."""
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    w = DIVERGENCE_WINDOW
    if len(losses) < 2 * w:
        return []
    first, end = statistics.median(losses[:w]), statistics.median(losses[-w:])
    if end <= first:
        return []
    return [
        f"the pilot's training loss rose from {first:.4g} (the median of its first {w} "
        f"measured steps) to {end:.4g} (of its last {w}): the noise scale of a run that does "
        "not learn says little about the batch size; lower the learning rate and measure again"
    ]


def _timing_warnings(table, rec, timing_only) -> list[str]:
    """Step times whose spread stayed above ``max_spread``, and how far that moves the pick
    (``timing_only``: the decision on the step times alone)."""
    shaky = {b: t.spread for b, t in table.timings.items() if not t.stable and not t.pruned}
    if not shaky:
        return []
    moves = sorted(set(timing_only.plausible_batch_sizes) | {rec.batch_size})
    if moves == [rec.batch_size]:  # the pick holds within every quartile
        return []
    rel = {r["batch_size"]: r.get("relative_time") for r in rec.table}
    worst = max((rel.get(b) or 1.0) for b in moves)
    return [
        f"step times unstable at B = {sorted(shaky)} (interquartile range up to "
        f"{max(shaky.values()):.0%} of the median, above {table.max_spread:.0%}): within their "
        f"quartiles the pick could move to any of {moves}, up to {worst - 1:.0%} slower than "
        f"the pick by the medians; re-time on a quieter machine or raise timing_rounds"
    ]


def _fork_data(loss_fn, get, plan: Plan, eval_batch_size: int | None):
    """The forks' stream (past everything the pilot uses) and their held-out loss (a batch
    past everything the forks use)."""
    ref = plan.ref_batch_size
    b_max = int(ref * 2.0 ** max(plan.branch_exponents))
    offset = math.ceil(plan.pilot_steps * ref / b_max) * b_max
    n_fork, _ = plan.fork_examples()
    n_eval = int(eval_batch_size or 4 * ref)
    index = math.ceil((offset + plan.branch_repeats * n_fork) / n_eval)
    eval_batch = functools.cache(lambda: _checked_batch(get, n_eval, index))
    if plan.branched is not False:  # read before any work where the forks may need it
        eval_batch()
    jitted_loss = jax.jit(loss_fn)

    def fork_batch(size, index):
        return get(size, offset // size + index)

    return fork_batch, lambda state: jitted_loss(state[0], eval_batch())


def _neighbours(new: set, seen: set) -> set:
    """The sizes of ``seen`` next to each of ``new`` (below and above)."""
    out = set()
    for b in new:
        out |= {
            max((s for s in seen if s < b), default=None),
            min((s for s in seen if s > b), default=None),
        }
    return out - {None}


def _time_fn(train_step, params, opt_state, checked: dict, a: dict, seconds: dict):
    """``time_fn`` of :func:`pipeline`: memory and pruned, cached interleaved timing. Each
    size is compiled once per call; a size added as the search widens is timed interleaved
    with its timed neighbours and every size not pruned so far (the pick is made among sizes
    timed under the same load), the pruned ones keep their timing and reason (in
    ``timing_cache``, or in a store of this call's when it is ``None``)."""
    get, first, cache = checked["get"], checked["first"], hardware.CompileCache()
    store = a["timing_cache"] if a["timing_cache"] is not None else hardware.TimingCache()
    seen, fresh, last = set(), set(), {}

    def time_fn(cands, interval, seconds_left):
        new = set(cands) - seen
        retime = _neighbours(new, seen) | {b for b, t in last.items() if not t.pruned}
        fit, table = time_candidates(
            train_step,
            lambda b: (params, opt_state, _checked_batch(get, b, 0)),
            cands,
            memory_budget_bytes=a["memory_budget_bytes"],
            rounds=a["timing_rounds"],
            warmup=2,  # the confirming run, then an untimed round: a cold first call is slower
            make_shape_args=lambda b: (params, opt_state, _zeros_like_batch(first, b)),
            cache=cache,
            max_extra_rounds=2,
            prune=dominated_sizes(interval, a["objective"], keep=(checked["ref"],)),
            max_seconds=seconds_left,
            timing_cache=store,
            progress=checked["progress"],
            seconds=seconds,
            retime=sorted(retime),
            pruned_here=sorted(fresh),
        )
        if table is not None:  # timed earlier in this call is not "cached" (an earlier call)
            mine = [b for b, t in table.timings.items() if b in fresh and t.cached]
            table.timings.update(
                {b: dataclasses.replace(table.timings[b], cached=False) for b in mine}
            )
            fresh.update(b for b, t in table.timings.items() if not t.cached)
            last.clear()
            last.update(table.timings)
        seen.update(cands)
        if table is None:
            raise ValueError(
                f"no candidate batch size fits in memory ({fit.records[0].reason}): pass smaller "
                "candidates (min_batch_size) or a larger memory_budget_bytes."
            )
        return fit.max_batch_size, table, fit

    return time_fn


def find_batch_size(
    loss_fn: Callable,
    params,
    optimizer,
    batch_fn,
    *,
    ref_batch_size: int = 32,
    pilot_steps: int = 200,
    max_seconds: float | None = None,
    opt_state=None,
    method: str = "auto",
    num_microbatches: int = 4,
    num_stretches: int = 3,
    branched: bool | None = None,
    branch_points: int = 3,
    branch_exponents: Sequence[int] = (-1, 0, 1, 2),
    branch_steps: int = 8,
    branch_repeats: int = 2,
    branch_max_cost: float = 1.0,
    branch_lr_rule: str | None = None,
    eval_batch_size: int | None = None,
    candidates: Sequence[int] | None = None,
    min_batch_size: int | None = None,
    max_batch_size: int | None = None,
    memory_budget_bytes: int | None = None,
    timing_rounds: int = 5,
    timing_cache: hardware.TimingCache | None = hardware.TIMING_CACHE,
    budget_s: float | None = None,
    budget_fraction: float | None = None,
    run_steps: int | None = None,
    learning_rate: float | None = None,
    optimizer_name: str | None = None,
    lr_rule: str | None = None,
    objective: str = "time",
    confidence: float = 0.9,
    seed: int = 0,
    divergence_factor: float | None = 100.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> BatchSizeResult:
    """Find the batch size that trains ``loss_fn`` fastest on the local device.

    Every argument is checked first (a wrong name or shape costs no training). Then a pilot at
    ``ref_batch_size`` trains and measures the noise scale at every step; its state is handed
    back (``.state``: continue the run from it, :func:`continue_training`). The trajectory
    and the effective noise scale follow, optionally the branched critical batch from states of
    the pilot, then memory and step time of the candidate batch sizes (sizes that cannot win are
    pruned, timings of the same step on the same device are reused), and the recommendation on
    the best evidence (module docstring). Nothing is written to disk, nothing is drawn.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch (Flax Linen
        ``model.apply``, NNX via ``nnx.split``/``nnx.merge``, plain JAX).
      params: the initial parameters (a pytree). From a train state pass its ``params`` and
        ``opt_state=``.
      optimizer: an optax ``GradientTransformation``.
      batch_fn: ``batch_fn(size, index) -> batch`` (examples ``[index·size, (index+1)·size)``
        of one stream, any pytree with a leading batch axis), or ``batch_fn(size) -> iterator``.
      ref_batch_size: the pilot's batch ``B_ref`` (and the baseline of the speedup).
      pilot_steps: pilot steps (at least 2): the start of the run, kept in ``.state``.
      max_seconds: stop the pilot after this many seconds.
      opt_state: the optimizer state to start from (default ``optimizer.init(params)``); where
        ``optimizer`` injects hyperparameters (``optax.inject_hyperparams``), its own replace
        the state's (the rate to fine-tune at, not the rate the state was trained with).
      method: the noise estimator: ``"auto"`` or ``"vmap"`` (:func:`gns.estimate.per_example`)
        or ``"microbatch"`` (:func:`gns.estimate.microbatch` with ``num_microbatches``; for
        BatchNorm-like losses where examples interact).
      num_microbatches: microbatches of the ``microbatch`` estimator.
      num_stretches: stretches of the trajectory.
      branched: measure the branched critical batch: ``True``/``False``, or ``None`` (default)
        to run it only if its forks cost at most ``branch_max_cost`` times the pilot's examples
        (and at most half the budget, when one is given).
      branch_points: checkpoints of the pilot to branch from (mid-stretch steps).
      branch_exponents: forks at ``ref_batch_size·2^j``.
      branch_steps: steps of the largest fork (each fork sees ``branch_steps·B_max`` examples).
      branch_repeats: forks per batch size on disjoint data.
      branch_max_cost: see ``branched``.
      branch_lr_rule: the forks' learning-rate rule (:data:`gns.scaling.RULES`); default the
        run's rule (``lr_rule``). The ``sgd`` rule uses the pilot's effective noise scale. A
        fork that diverges under it is excluded and named in ``warnings``.
      eval_batch_size: held-out examples for the forks (default ``4·ref_batch_size``), taken from
        the stream past everything the pilot and the forks use.
      candidates: batch sizes the search may time (default powers of two in
        ``[min_batch_size, max_batch_size]``, default ``[B_ref/8, 8·B_ref]``), up to the
        largest that fits: it times those around the noise-scale interval first and widens
        while the pick sits at an end (:func:`pipeline`); the others are never compiled.
        Past the default candidates the search times one size more at most; never past
        given ``candidates``, ``min_batch_size`` or ``max_batch_size``.
      min_batch_size: the smallest batch the search may time and recommend.
      max_batch_size: the largest batch it may time and recommend (no gradient accumulation
        above it either).
      memory_budget_bytes: see :func:`gns.hardware.largest_batch_that_fits`.
      timing_rounds: interleaved timing rounds (at most 2 more for noisy sizes); a size that
        cannot win stops being timed (:func:`dominated_sizes`).
      timing_cache: where step timings are kept across calls (default the process-wide
        :data:`gns.hardware.TIMING_CACHE`; ``None`` re-times everything).
      budget_s: the seconds the search may cost beyond the pilot (forks, memory, timing): the
        forks are skipped (``branched=None``) when they would take over half of it, and timing
        rounds stop when it is spent. ``None``: not bounded.
      budget_fraction: the budget as a fraction of the planned run, with ``run_steps`` (its
        length in steps at ``ref_batch_size``, timed by the pilot's step time).
      run_steps: the planned run's length in steps at ``ref_batch_size``. Besides the budget,
        it weighs the noise scale for the run: the pilot's last stretch (and last branched
        checkpoint) stands for the steps from the pilot's end to ``run_steps``, with the noise
        scale held at its last measured value (:meth:`Plan.path_end`). The noise scale grows
        as the loss falls, so without it the effective value is the pilot's alone, which
        under-weighs the later run the recommendation is for.
      learning_rate: the learning rate of ``optimizer`` at ``ref_batch_size``, to scale the
        recommended rate (default: the rate an ``optax.inject_hyperparams`` state holds, else
        the recommendation's ``learning_rate`` is relative, 1.0 at ``ref_batch_size``).
      optimizer_name: an optimizer name (``sgd``, ``momentum``, ``lars``, ``adam``, ``adamw``,
        ``lamb``) naming the rule: :func:`gns.scaling.rule_for`.
      lr_rule: the learning-rate rule of the run (:data:`gns.scaling.RULES`: ``sgd``,
        ``linear``, ``sqrt``, ``seesaw``, ``constant``). Default: from ``optimizer_name``, else
        read from the optimizer's state (Adam-family: ``sqrt``; SGD/momentum: ``sgd``), else an
        error asking for it.
      objective: ``"time"`` or ``"cost"``.
      confidence: level of every interval.
      seed: bootstrap seed.
      divergence_factor: the pilot diverged (it stops there, with an error: no noise scale is
        measured from it) when the median of its last 5 training losses exceeds this multiple
        of that of its first 5 (:func:`divergence`; ``None``: only a loss that is not finite).
      progress: ``progress(phase, done, total)`` for every phase (``"pilot"``, ``"branched"``,
        ``"memory"``, ``"timing"``): draw a bar with it (gns draws nothing).

    Returns:
      A :class:`BatchSizeResult`: ``.batch_size``, ``.recommendation``, ``.basis``, ``.state``,
      ``.warnings``, ``.seconds``, ``.to_dict()`` (strict JSON), ``.plot()``.

    Raises:
      ValueError: before any work, for a ``batch_fn`` that returns another number of examples
        than asked or another kind of example at another size (or none: a stream too short
        for the pilot and the forks), a ``loss_fn`` that does not return a scalar, ``params``
        that are not all floats, an unknown name (``optimizer_name``, ``lr_rule``,
        ``method``, ``objective``), a rule that cannot be read from the optimizer, an
        ``optax.MultiSteps`` optimizer, a rate other than the one an injected optimizer
        holds, a non-positive rate or budget, ``min_batch_size > max_batch_size``, a budget
        too small to measure anything (fewer than 2 pilot steps); during the pilot, at its
        first non-finite training loss; after it, for a gradient that was zero throughout or
        nothing that fits in memory.

    Example:
      >>> def loss_fn(w, batch):
      ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
      >>> def batch_fn(size, index):
      ...     x = jax.random.normal(jax.random.key(index), (size, 4))
      ...     return {"x": x, "y": x.sum(1) + jax.random.normal(jax.random.key(-index), (size,))}
      >>> res = find_batch_size(loss_fn, jnp.zeros(4), optax.adam(1e-2), batch_fn,
      ...                       pilot_steps=40)  # doctest: +SKIP
      >>> res.batch_size, res.basis, res.state.step  # doctest: +SKIP

    Reference: McCandlish et al. (2018); Merrill et al. (2025), arXiv 2505.23971.
    """
    t_start = time.perf_counter()
    _check_transformation(optimizer)
    # A given state (a run's, fine-tuned on) trains at `optimizer`'s injected rate, not its own.
    opt_state = (
        optimizer.init(params) if opt_state is None else _with_rate_of(optimizer, opt_state, params)
    )
    a = dict(locals())
    checked = _check_arguments(a)
    base_lr = _base_rate(a) or 1.0
    ref, rule = checked["ref"], checked["rule"]
    plan = _plan(a, checked)
    t_path = time.perf_counter()
    if method == "auto":  # the pilot's per-example path, timed only where that pays over it
        first, uses = checked["first"], plan.pilot_steps
        ghost.select(_loss_as_aux(loss_fn), params, first, has_aux=True, uses=uses)
    seconds = {"path": time.perf_counter() - t_path}
    tracker = smoothing.ema()
    measure, train_step, make_step = _make_steps(
        loss_fn, optimizer, method, num_microbatches, tracker
    )
    forks = _fork_data(loss_fn, checked["get"], plan, eval_batch_size)
    limits = checked["limits"]
    kw = dict(base_batch_size=ref, base_lr=base_lr, objective=objective, optimizer=rule)
    kw["limits"] = limits
    m = pipeline(
        Steps(measure, make_step, functools.partial(_checked_batch, checked["get"]), *forks),
        (params, opt_state, tracker.init()),
        plan,
        time_fn=_time_fn(train_step, params, opt_state, checked, a, seconds),
        decide_fn=functools.partial(decide, **kw),
        progress=checked["progress"],
        candidates=checked["cands"]
        or power_of_two_candidates(min_batch_size or max(1, ref // 8), max_batch_size or 8 * ref),
        limits=limits,
    )
    return _result(checked, a, m, kw, seconds | m.seconds, t_start)


def _plan(a: dict, checked: dict) -> Plan:
    """The :class:`Plan` of a :func:`find_batch_size` call (``a``: its arguments)."""
    return Plan(
        checked["ref"],
        a["pilot_steps"],
        1,
        a["max_seconds"],
        a["num_stretches"],
        a["branched"],
        a["branch_points"],
        tuple(checked["exps"]),
        a["branch_steps"],
        a["branch_repeats"],
        a["branch_max_cost"],
        checked["fork_rule"],
        a["budget_s"],
        a["budget_fraction"],
        a["run_steps"],
        a["confidence"],
        None,
        a["seed"],
        a["divergence_factor"],
    )


def _relative_rate_warning(a: dict, rate: float, ref: int) -> str:
    """What a relative recommended ``rate`` (no ``learning_rate`` given or held) multiplies."""
    if _follows_schedule(a["optimizer"], a["params"], a["opt_state"]):
        return (
            f"learning_rate {rate:.4g} is relative: 1 is the schedule built into `optimizer` "
            f"(optax.scale_by_schedule) at batch {ref}; multiply the schedule by it (or pass "
            "learning_rate= its peak)"
        )
    return (
        f"learning_rate {rate:.4g} is relative: 1 is the rate of `optimizer` at batch {ref}, "
        "which its state does not hold; multiply it by that rate (or pass learning_rate=, or "
        "build the optimizer with optax.inject_hyperparams)"
    )


def _result(checked, a, m: Measured, kw: dict, seconds: dict, t_start: float):
    """The :class:`BatchSizeResult`, with every warning and the settings."""
    t0 = time.perf_counter()
    rec, (max_b, table, fit) = m.recommendation, m.timed
    timing_only = decide(m.basis, (m.value[0], math.nan, math.nan), m.evidence, table, max_b, **kw)
    seconds["decide"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    seconds["overhead"] = seconds["total"] - seconds["pilot"]
    pilot, noise, forks = m.live["pilot"], m.live["noise"], m.live.get("branched")
    warn = pilot_warnings(pilot.rows) + _branch_warnings(forks, m.basis)
    warn += _timing_warnings(table, rec, timing_only)
    short = scaling.short_fork_warning(a["branch_steps"], 0.9)
    if forks is not None and short and scaling.has_momentum(a["opt_state"]):
        warn.append(
            short
            + " (β = 0.9 assumed: an optax state does not hold it; with momentum=0.0, ignore this)"
        )
    if m.budget_s is not None and seconds["overhead"] > m.budget_s:
        warn.append(
            f"the search cost {seconds['overhead']:.3g} s beyond the pilot, over the budget of "
            f"{m.budget_s:.3g} s (compiling each candidate is not bounded: pass fewer candidates)"
        )
    if checked["mean_loss"]:
        warn.append(checked["mean_loss"])
    if checked["rule_source"] == STATELESS:
        warn.append(f"the learning-rate rule 'sgd' is {STATELESS}")
    if _base_rate(a) is None:
        warn.append(_relative_rate_warning(a, rec.learning_rate, checked["ref"]))
    rate = f" Learning rate by the {checked['rule']} rule ({checked['rule_source']})."
    rec = dataclasses.replace(rec, warnings=(*rec.warnings, *warn), reason=rec.reason + rate)
    ref = checked["ref"]
    settings = {
        "ref_batch_size": ref,
        "pilot_steps": a["pilot_steps"],
        "pilot_steps_done": pilot.steps,
        "pilot_stop_reason": pilot.stop_reason,
        "max_seconds": a["max_seconds"],
        "method": a["method"],
        "num_stretches": a["num_stretches"],
        "branched": forks is not None,
        "branch_checkpoint_steps": sorted(pilot.checkpoints) if forks else [],
        "branch_exponents": checked["exps"],
        "branch_repeats": a["branch_repeats"],
        "branch_examples_per_fork": None if forks is None else forks["examples_per_fork"],
        "branch_lr_rule": checked["fork_rule"],
        "candidates": m.candidates,
        "learning_rate": _base_rate(a),
        "optimizer_name": a["optimizer_name"],
        "lr_rule": checked["rule"],
        "lr_rule_source": checked["rule_source"],
        "objective": a["objective"],
        "confidence": a["confidence"],
    }
    state = TrainState(pilot.state[0], pilot.state[1], pilot.steps, pilot.steps * ref)
    return BatchSizeResult(
        recommendation=rec,
        basis=m.basis,
        basis_note=m.note,
        pilot_rows=pilot.rows,
        b_simple=noise["b_simple"],
        trajectory=noise["trajectory"],
        effective_noise_scale=noise["effective"],
        branched=forks,
        memory=fit,
        timing=table,
        extended_to=m.extended_to,
        device=hardware.detect_devices(),
        settings=settings,
        seconds=seconds,
        state=state,
        budget_s=m.budget_s,
    )
