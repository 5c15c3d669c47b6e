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
   (:func:`gns.hardware.largest_batch_that_fits`, :func:`gns.hardware.time_batch_sizes`:
   powers of two up to the largest that fits, timed interleaved, each compiled once);
5. the **recommendation** (:func:`gns.recommend.recommend`) on the best evidence measured, in
   the order branched > trajectory > b_simple (``basis``, every value in ``evidence`` with its
   ratio to the basis); when the pick is at an end of the timed range, that range is extended
   once (the batch ``extend_range_to``) and the recommendation made again.

The pieces are public too (:func:`run_pilot`, :func:`noise_evidence`, :func:`branch`,
:func:`choose_basis`, :func:`time_candidates`, :func:`decide`): ``experiments/sweep.py`` calls
them with its own train step and keeps each result in its stage cache.

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018);
Merrill et al., "Critical Batch Size Revisited" (2025, arXiv 2505.23971).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gns import common, critical, estimate, hardware, recommend, smoothing

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
    "find_batch_size",
]

BASIS_ORDER = ("branched", "trajectory", "b_simple")  # best evidence first


def _json(x):
    """``x`` as strict-JSON-able Python values (non-finite floats as ``None``)."""
    if isinstance(x, Mapping):
        return {str(k): _json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json(v) for v in x]
    if hasattr(x, "to_dict"):
        return _json(x.to_dict())
    if isinstance(x, np.ndarray | np.generic | jax.Array):
        return _json(np.asarray(x).tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x if x is None or isinstance(x, bool | int | str) else str(x)


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
            it, pos = iter(batch_fn(size)), 0
        for _ in range(index - pos):
            next(it)
        streams[size] = (it, index + 1)
        return next(it)

    return from_iterator


def _checked_batch(batch_fn, size: int, index: int):
    batch = batch_fn(size, index)
    got = common.batch_size(batch, "batch_fn(size, index)")
    if got != size:
        raise ValueError(
            f"batch_fn({size}, {index}) returned a batch of {got} examples, not {size}: batch_fn "
            "must return exactly `size` examples (examples [index*size, (index+1)*size) of your "
            "stream), e.g. lambda size, index: data[index * size:(index + 1) * size]."
        )
    return batch


def _check_loss(loss_fn, params, batch) -> None:
    out = jax.eval_shape(loss_fn, params, batch)
    if not (hasattr(out, "shape") and out.shape == ()):
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"loss_fn(params, batch) must return a scalar (the mean loss over the batch), got "
            f"{shape}: reduce it with .mean() (per-example losses are not a training loss; a "
            "(loss, aux) pair is not supported: return the loss only)."
        )


# ---------------------------------------------------------------------------------------------
# 1. The pilot.


class Pilot(NamedTuple):
    """A pilot run at the reference batch.

    Attributes:
      rows: one dict per step: ``step`` (1-based), ``g_sq``, ``trace_cov``, ``b_simple`` and the
        EMA values ``ema_g_sq``, ``ema_trace_cov``, ``ema_b_simple``.
      state: the state after the last step.
      checkpoints: ``{step: state}`` at the requested steps (in memory).
      steps: steps done.
      seconds: wall time of the pilot (compile included).
      stop_reason: ``"steps"`` or ``"time"``.
    """

    rows: list[dict]
    state: Any
    checkpoints: dict[int, Any]
    steps: int
    seconds: float
    stop_reason: str


def run_pilot(
    state,
    measure_step: Callable,
    batch_fn: Callable[[int, int], Any],
    *,
    batch_size: int,
    num_steps: int,
    max_seconds: float | None = None,
    checkpoint_steps: Sequence[int] = (),
    bar=None,
) -> Pilot:
    """Run ``measure_step`` for ``num_steps`` steps (or ``max_seconds``), recording its stats.

    Args:
      state: the initial state (any pytree).
      measure_step: jitted ``measure_step(state, batch) -> (state, metrics)`` whose metrics hold
        ``g_sq`` and ``trace_cov`` (and optionally ``ema_*``) scalars. It must not donate.
      batch_fn: ``batch_fn(size, index)``; step ``i`` (0-based) takes batch ``i``.
      batch_size: the pilot's batch ``B_ref``.
      num_steps: steps to run at most.
      max_seconds: stop after this wall time (checked after each step).
      checkpoint_steps: keep the state after these steps (for :func:`branch`).
      bar: an optional tqdm bar, advanced once per step.

    Returns:
      A :class:`Pilot`.
    """
    t0 = time.perf_counter()
    rows, keep, wanted = [], {}, set(int(s) for s in checkpoint_steps)
    stop = "steps"
    for i in range(num_steps):
        state, m = measure_step(state, batch_fn(batch_size, i))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        rows.append({"step": i + 1, **m})
        if i + 1 in wanted:
            keep[i + 1] = state
        if bar is not None:
            bar.update(1)
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            stop = "time"
            break
    return Pilot(rows, state, keep, len(rows), time.perf_counter() - t0, stop)


# ---------------------------------------------------------------------------------------------
# 2. The noise scale along the path.


def noise_evidence(
    rows: Sequence[Mapping],
    ref_batch_size: int,
    *,
    num_stretches: int = 3,
    end_step: int | None = None,
    confidence: float = 0.9,
    seed: int = 0,
) -> dict[str, Any]:
    """``B_simple`` of the whole pilot, its trajectory and the effective noise scale.

    Args:
      rows: the pilot's rows (``step``, ``g_sq``, ``trace_cov``).
      ref_batch_size: the pilot's batch.
      num_stretches: stretches of the trajectory (at most half the rows).
      end_step: end of the path (default the last row's step).
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
    eff = critical.effective_noise_scale(
        traj.delta_steps, traj.b_noise, ref_batch_size, low=traj.low, high=traj.high,
        point_confidence=confidence, confidence=confidence, seed=seed,
    )  # fmt: skip
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
    bar=None,
) -> dict[str, Any]:
    """The branched critical batch at each checkpoint and its path average.

    Args:
      checkpoints: ``{pilot step: state}`` in path order.
      make_step, batch_fn, eval_fn, exponents, lr_multiplier, num_repeats, num_examples,
        pilot_examples, confidence: as in :func:`gns.critical.branched_critical_batch`.
      ref_batch_size: the pilot's batch.
      end_step: end of the path (the pilot's last step): each checkpoint stands for the steps
        around it (:func:`gns.critical.stretch_lengths`).
      seed: bootstrap seed.
      bar: an optional tqdm bar, advanced once per checkpoint.

    Returns:
      ``{"steps": [...], "points": [BranchedCriticalBatch], "effective":
      EffectiveNoiseScale}``; the effective value weighs only the ``resolved`` checkpoints
      (``docs/critical-batch.md``, "which basis to trust"), the others are dropped and counted.
    """
    steps = sorted(int(s) for s in checkpoints)
    points = []
    for s in steps:
        points.append(
            critical.branched_critical_batch(
                checkpoints[s], make_step, batch_fn, eval_fn, ref_batch_size=ref_batch_size,
                num_examples=num_examples, exponents=exponents, lr_multiplier=lr_multiplier,
                num_repeats=num_repeats, pilot_examples=pilot_examples, confidence=confidence,
                checkpoint_name=f"pilot state at step {s}", seed=seed,
            )
        )  # fmt: skip
        if bar is not None:
            bar.update(1)
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
    ``resolved``, ``cost_fraction`` per checkpoint."""
    return [
        {"step": int(s), "b_crit": p.b_crit, "low": p.low, "high": p.high,
         "b_tolerance": p.b_tolerance, "resolved": p.resolved, "cost_fraction": p.cost_fraction}
        for s, p in zip(steps, points, strict=True)
    ]  # fmt: skip


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
    evidence = {"b_simple": _triple(*b_simple)}
    notes = []
    wanted = {"trajectory": critical.BASIS_TRAJECTORY, "branched": critical.BASIS_BRANCHED}
    for name, eff in (("trajectory", trajectory), ("branched", branched)):
        if eff is None:
            continue
        evidence[name] = _triple(eff.value, eff.low, eff.high)
        if eff.basis != wanted[name] or not np.isfinite(eff.value):
            notes.append(f"{name} not used ({eff.basis}: {eff.note})")
    for name in BASIS_ORDER:
        ev = evidence.get(name)
        usable = name == "b_simple" or f"{name} not used" not in " ".join(notes)
        if ev is not None and usable and not math.isnan(ev[0]):
            return name, ev, evidence, "; ".join(notes)
    raise ValueError(
        "no noise scale was measured (every estimate is nan): the pilot diverged or its "
        "gradients are not finite; lower the learning rate or check the loss."
    )


# ---------------------------------------------------------------------------------------------
# 5. Memory and step time.


def power_of_two_candidates(lo: int, hi: int) -> list[int]:
    """Powers of two in ``[lo, hi]`` (at least ``[lo]`` rounded up).

    Example:
      >>> power_of_two_candidates(6, 64)
      [8, 16, 32, 64]
    """
    lo, hi = max(1, int(lo)), max(1, int(hi))
    out = [1 << e for e in range(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1)]
    return out or [1 << math.ceil(math.log2(lo))]


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
) -> tuple[hardware.FitResult, hardware.TimingTable | None]:
    """Memory of every candidate, then one interleaved timing table of those that fit.

    Args:
      step_fn: the train step ``step_fn(*args)`` (must not donate).
      make_args: ``B -> args`` with real data, for the timing.
      candidates: batch sizes.
      memory_budget_bytes: see :func:`gns.hardware.largest_batch_that_fits`.
      rounds, warmup: interleaved timed rounds and untimed warm-up rounds.
      make_shape_args: ``B -> args`` that is traceable (e.g. ``jnp.zeros``) for the memory
        prediction and its confirming run; default ``make_args``.
      cache: compiled executables (each shape compiles once).

    Returns:
      ``(FitResult, TimingTable or None when nothing fits)``.
    """
    cache = cache or hardware.CompileCache()
    fit = hardware.largest_batch_that_fits(
        make_shape_args or make_args, step_fn, candidates, memory_budget_bytes, cache=cache
    )
    fitting = [r.batch_size for r in fit.records if r.fits]
    if not fitting:
        return fit, None
    table = hardware.time_batch_sizes(
        step_fn, make_args, fitting, rounds=rounds, warmup=warmup, cache=cache
    )
    return fit, table


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
) -> recommend.Recommendation:
    """:func:`gns.recommend.recommend` on a timing table with the chosen basis and evidence.

    Returns:
      The :class:`gns.recommend.Recommendation` (``basis`` and ``evidence`` filled in).
    """
    v, lo, hi = value
    interval = None
    if not (math.isnan(lo) or math.isnan(hi)):
        interval = (min(lo, v), max(hi, v))
    times = table.step_time()
    if candidates is None:
        candidates = sorted(set(times) | {base_batch_size} | {f * max_batch_size for f in (2, 4)})
    return recommend.recommend(
        v, times, max_batch_size=max_batch_size, base_lr=base_lr, base_batch_size=base_batch_size,
        optimizer=optimizer, b_noise_interval=interval, step_time_range=table.step_time_range(),
        basis=basis, evidence=dict(evidence), objective=objective, candidates=candidates,
        s_min=s_min, price_per_hour=price_per_hour,
    )  # fmt: skip


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
      seconds: wall time of each phase.
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

    @property
    def batch_size(self) -> int:
        """The recommended batch size."""
        return self.recommendation.batch_size

    def throughput_rows(self) -> list[dict]:
        """One row per candidate: memory verdict and step time (``plots.plot_throughput``)."""
        times = self.timing.step_time()
        return [
            r.to_dict() | {"step_time_s": times.get(r.batch_size),
                           "examples_per_s": r.batch_size / times[r.batch_size]
                           if r.batch_size in times else None}
            for r in self.memory.records
        ]  # fmt: skip

    def to_dict(self) -> dict:
        """Every measurement as strict-JSON-able values (non-finite numbers as ``None``)."""
        b = self.b_simple
        out = {
            "batch_size": self.batch_size,
            "basis": self.basis,
            "basis_note": self.basis_note,
            "recommendation": self.recommendation.to_dict(),
            "noise_scale": {
                "b_simple": b.estimate,
                "interval": [b.low, b.high],
                "num_used": b.n,
                "num_nonfinite_dropped": b.nonfinite_dropped,
                "trajectory": self.trajectory.rows(),
                "effective": self.effective_noise_scale.to_dict(),
            },
            "critical_batch": None,
            "pilot": self.pilot_rows,
            "memory": self.memory.to_dict(),
            "timing": self.timing.to_dict(),
            "throughput": self.throughput_rows(),
            "max_batch_size": self.memory.max_batch_size,
            "extended_to": self.extended_to,
            "device": self.device.to_dict(),
            "settings": self.settings,
            "seconds": self.seconds,
        }
        if self.branched is not None:
            out["critical_batch"] = {
                "checkpoints": checkpoint_rows(self.branched["steps"], self.branched["points"]),
                "effective": self.branched["effective"].to_dict(),
                "points": [p.to_dict() for p in self.branched["points"]],
            }
        return _json(out)

    def plot(self) -> list:
        """The noise scale over the pilot and the throughput curve (:mod:`gns.plots`), as two
        matplotlib figures."""
        from gns import plots

        return [plots.plot_noise_scale(self.pilot_rows), plots.plot_throughput(self.to_dict())]


# ---------------------------------------------------------------------------------------------
# The entry point.


def _zeros_like_batch(template, size: int):
    return jax.tree.map(
        lambda x: jnp.zeros((size,) + np.shape(x)[1:], jnp.result_type(x)), template
    )


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
    eval_batch_size: int | None = None,
    candidates: Sequence[int] | None = None,
    min_batch_size: int | None = None,
    max_batch_size: int | None = None,
    memory_budget_bytes: int | None = None,
    timing_rounds: int = 5,
    learning_rate: float | None = None,
    optimizer_name: str = "adam",
    objective: str = "time",
    confidence: float = 0.9,
    seed: int = 0,
    progress: bool = True,
) -> BatchSizeResult:
    """Find the batch size that trains ``loss_fn`` fastest on the local device.

    Runs a pilot at ``ref_batch_size`` measuring the noise scale at every step, turns it into
    the trajectory and the effective noise scale, optionally measures the branched critical
    batch from states of the pilot, measures memory and step time of the candidate batch sizes,
    and recommends on the best evidence (module docstring). Nothing is written to disk.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch (Flax Linen
        ``model.apply``, NNX via ``nnx.split``/``nnx.merge``, plain JAX).
      params: the initial parameters (a pytree). From a train state pass its ``params`` and
        ``opt_state=``.
      optimizer: an optax ``GradientTransformation``.
      batch_fn: ``batch_fn(size, index) -> batch`` (examples ``[index·size, (index+1)·size)``
        of one stream, any pytree with a leading batch axis), or ``batch_fn(size) -> iterator``.
      ref_batch_size: the pilot's batch ``B_ref`` (and the baseline of the speedup).
      pilot_steps: pilot steps (the budget in steps; at least 2).
      max_seconds: stop the pilot after this many seconds (the budget in time).
      opt_state: the optimizer state to start from (default ``optimizer.init(params)``).
      method: the noise estimator: ``"auto"`` or ``"vmap"`` (:func:`gns.estimate.per_example`)
        or ``"microbatch"`` (:func:`gns.estimate.microbatch` with ``num_microbatches``; for
        BatchNorm-like losses where examples interact).
      num_microbatches: microbatches of the ``microbatch`` estimator.
      num_stretches: stretches of the trajectory.
      branched: measure the branched critical batch: ``True``/``False``, or ``None`` (default)
        to run it only if its forks cost at most ``branch_max_cost`` times the pilot's examples.
      branch_points: checkpoints of the pilot to branch from (mid-stretch steps).
      branch_exponents: forks at ``ref_batch_size·2^j``.
      branch_steps: steps of the largest fork (each fork sees ``branch_steps·B_max`` examples).
      branch_repeats: forks per batch size on disjoint data.
      branch_max_cost: see ``branched``.
      eval_batch_size: held-out examples for the forks (default ``4·ref_batch_size``), taken from
        the stream past everything the pilot and the forks use.
      candidates: batch sizes to time (default powers of two in ``[min_batch_size,
        max_batch_size]``, default ``[B_ref/8, 8·B_ref]``), up to the largest that fits.
      memory_budget_bytes: see :func:`gns.hardware.largest_batch_that_fits`.
      timing_rounds: interleaved timing rounds.
      learning_rate: the learning rate of ``optimizer`` at ``ref_batch_size``, to scale the
        recommended rate (default: the recommendation's ``learning_rate`` is relative, 1.0 at
        ``ref_batch_size``).
      optimizer_name: the learning-rate rule (:func:`gns.recommend.scale_learning_rate`:
        ``adam``/``adamw``/``lamb`` square root, ``sgd``/``momentum``/``lars`` the noise-scale
        rule); also the rule of the forks' learning rates (updates scaled by the multiplier).
      objective: ``"time"`` or ``"cost"``.
      confidence: level of every interval.
      seed: bootstrap seed.
      progress: show a tqdm progress bar.

    Returns:
      A :class:`BatchSizeResult`: ``.batch_size``, ``.recommendation``, ``.basis``,
      ``.to_dict()`` (strict JSON), ``.plot(path)``.

    Raises:
      ValueError: a ``batch_fn`` that returns another number of examples than asked, a
        ``loss_fn`` that does not return a scalar, a budget too small to measure anything
        (fewer than 2 pilot steps), or nothing that fits in memory.

    Example:
      >>> def loss_fn(w, batch):
      ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
      >>> def batch_fn(size, index):
      ...     x = jax.random.normal(jax.random.key(index), (size, 4))
      ...     return {"x": x, "y": x.sum(1) + jax.random.normal(jax.random.key(-index), (size,))}
      >>> res = find_batch_size(loss_fn, jnp.zeros(4), optax.adam(1e-2), batch_fn,
      ...                       pilot_steps=40, progress=False)  # doctest: +SKIP
      >>> res.batch_size, res.basis  # doctest: +SKIP

    Reference: McCandlish et al. (2018); Merrill et al. (2025), arXiv 2505.23971.
    """
    import optax
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    ref = common.check_int(ref_batch_size, "ref_batch_size", 2)
    if (
        isinstance(pilot_steps, bool)
        or not isinstance(pilot_steps, int | np.integer)
        or (pilot_steps < 2)
    ):
        raise ValueError(
            f"the budget is too small to measure anything: pilot_steps={pilot_steps!r}; the "
            "noise scale needs at least 2 measured steps (a trajectory 2 per stretch): use "
            f"pilot_steps >= {2 * num_stretches}, e.g. 200."
        )
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(
            f"the budget is too small to measure anything: max_seconds={max_seconds!r}; give a "
            "positive time budget (or None for pilot_steps alone)."
        )
    if method not in ("auto", "vmap", "microbatch"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'microbatch', got {method!r}.")
    get = as_batch_fn(batch_fn)
    first = _checked_batch(get, ref, 0)
    _check_loss(loss_fn, params, first)
    if method == "microbatch" and ref % num_microbatches:
        raise ValueError(
            f"ref_batch_size={ref} is not a multiple of num_microbatches={num_microbatches}."
        )
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    tracker = smoothing.ema()

    def update(params, opt_state, grads, mult=1.0):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        if mult != 1.0:
            updates = jax.tree.map(lambda u: mult * u, updates)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def measure_step(state, batch):
        p, o, g = state
        if method == "microbatch":
            stats, grads = estimate.microbatch(loss_fn, p, batch, num_microbatches=num_microbatches)
        else:
            stats, grads = estimate.per_example(loss_fn, p, batch, method=method)
        g = tracker.update(stats, g)
        metrics = {"g_sq": stats.g_sq, "trace_cov": stats.trace_cov, "b_simple": stats.b_simple}
        metrics |= {"ema_g_sq": g.g_sq, "ema_trace_cov": g.trace_cov, "ema_b_simple": g.b_simple}
        return (*update(p, o, grads), g), metrics

    def train_step(params, opt_state, batch):
        return update(params, opt_state, jax.grad(loss_fn)(params, batch))

    fork_steps: dict[float, Callable] = {}

    def make_step(size, mult):
        # One function per multiplier: jax.jit of the same function compiles once per shape,
        # so the forks of every checkpoint share their executables.
        if mult not in fork_steps:

            def step(state, batch):
                p, o = state
                return update(p, o, jax.grad(loss_fn)(p, batch), mult)

            fork_steps[mult] = step
        return fork_steps[mult]

    # Branching plan and its cost.
    exps = sorted(int(e) for e in branch_exponents)
    sizes = [ref * 2.0**e for e in exps]
    b_max = int(max(sizes))
    n_fork = int(branch_steps) * b_max
    fork_examples = n_fork * branch_repeats * len(exps) * branch_points
    pilot_examples = pilot_steps * ref
    run_branched = (
        branched if branched is not None else fork_examples <= branch_max_cost * pilot_examples
    )
    k_pts = max(1, int(branch_points))
    ckpt_steps = checkpoint_steps(pilot_steps, k_pts)

    bar = tqdm(
        total=pilot_steps + (k_pts if run_branched else 0) + 1, desc="pilot", unit="step",
        disable=not progress,
    )  # fmt: skip
    seconds = {}
    pilot = run_pilot(
        (params, opt_state, tracker.init()), measure_step, get, batch_size=ref,
        num_steps=pilot_steps, max_seconds=max_seconds,
        checkpoint_steps=ckpt_steps if run_branched else (), bar=bar,
    )  # fmt: skip
    seconds["pilot"] = pilot.seconds
    if pilot.steps < 2:
        bar.close()
        raise ValueError(
            f"the budget is too small to measure anything: the pilot ran {pilot.steps} step in "
            f"max_seconds={max_seconds} (compilation included); raise max_seconds."
        )
    noise = noise_evidence(
        pilot.rows, ref, num_stretches=num_stretches, end_step=pilot.steps,
        confidence=confidence, seed=seed,
    )  # fmt: skip

    branched_out = None
    if run_branched and pilot.checkpoints:
        bar.set_description("branched critical batch")
        t0 = time.perf_counter()
        offset = math.ceil(pilot.steps * ref / b_max) * b_max  # past the pilot's examples
        n_eval = int(eval_batch_size or 4 * ref)
        eval_batch = _checked_batch(
            get, n_eval, math.ceil((offset + branch_repeats * n_fork) / n_eval)
        )
        jitted_loss = jax.jit(loss_fn)

        def fork_batch(size, index):
            return get(size, offset // size + index)

        branched_out = branch(
            {s: pilot.checkpoints[s][:2] for s in pilot.checkpoints}, make_step, fork_batch,
            lambda st: jitted_loss(st[0], eval_batch), ref_batch_size=ref,
            end_step=pilot.steps, num_examples=n_fork, exponents=exps,
            lr_multiplier=lambda b: critical.lr_multipliers(ref, [b], optimizer_name)[0],
            num_repeats=branch_repeats, pilot_examples=pilot.steps * ref,
            confidence=confidence, seed=seed, bar=bar,
        )  # fmt: skip
        seconds["branched"] = time.perf_counter() - t0

    bi = noise["b_simple"]
    basis, value, evidence, note = choose_basis(
        (bi.estimate, bi.low, bi.high), noise["effective"],
        None if branched_out is None else branched_out["effective"],
    )  # fmt: skip
    if not run_branched:
        why = "branched=False" if branched is False else (
            f"its forks ({fork_examples} examples) would cost more than {branch_max_cost}x the "
            f"pilot's {pilot_examples}; pass branched=True"
        )  # fmt: skip
        note = "; ".join(x for x in (note, f"branched critical batch not measured: {why}") if x)

    # Memory and step time.
    bar.set_description("memory and step time")
    t0 = time.perf_counter()
    if candidates is None:
        lo = min_batch_size or max(1, ref // 8)
        candidates = power_of_two_candidates(lo, max_batch_size or 8 * ref)
    cache = hardware.CompileCache()
    p0, o0 = pilot.state[0], pilot.state[1]

    def real_args(b):
        return p0, o0, _checked_batch(get, b, 0)

    def shape_args(b):
        return p0, o0, _zeros_like_batch(first, b)

    def measure(cands):
        fit, table = time_candidates(
            train_step, real_args, cands, memory_budget_bytes=memory_budget_bytes,
            rounds=timing_rounds, make_shape_args=shape_args, cache=cache,
        )  # fmt: skip
        if table is None:
            raise ValueError(
                f"no candidate batch size fits in memory ({fit.records[0].reason}): pass smaller "
                "candidates (min_batch_size) or a larger memory_budget_bytes."
            )
        return fit, table

    cands = sorted(set(int(c) for c in candidates))
    fit, table = measure(cands)
    common_kw = dict(
        base_batch_size=ref, base_lr=learning_rate or 1.0, optimizer=optimizer_name,
        objective=objective,
    )  # fmt: skip
    rec = decide(basis, value, evidence, table, fit.max_batch_size, **common_kw)
    extended = None
    nxt = rec.extend_range_to
    if nxt is not None and nxt not in cands and nxt >= 1:
        fit2, table2 = measure(sorted({*cands, nxt}))
        if nxt in table2.timings:  # it fits: recommend once more on the wider table
            extended, fit, table = nxt, fit2, table2
            rec = decide(basis, value, evidence, table, fit.max_batch_size, **common_kw)
    seconds["hardware"] = time.perf_counter() - t0
    bar.update(1)
    bar.close()
    seconds["total"] = time.perf_counter() - t_start
    settings = {
        "ref_batch_size": ref, "pilot_steps": pilot_steps, "pilot_steps_done": pilot.steps,
        "pilot_stop_reason": pilot.stop_reason, "max_seconds": max_seconds, "method": method,
        "num_stretches": num_stretches, "branched": bool(run_branched),
        "branch_checkpoint_steps": sorted(pilot.checkpoints), "branch_exponents": exps,
        "branch_examples_per_fork": n_fork, "branch_repeats": branch_repeats,
        "candidates": cands, "learning_rate": learning_rate, "optimizer_name": optimizer_name,
        "objective": objective, "confidence": confidence,
    }  # fmt: skip
    return BatchSizeResult(
        recommendation=rec, basis=basis, basis_note=note, pilot_rows=pilot.rows,
        b_simple=bi, trajectory=noise["trajectory"], effective_noise_scale=noise["effective"],
        branched=branched_out, memory=fit, timing=table, extended_to=extended,
        device=hardware.detect_devices(), settings=settings, seconds=seconds,
    )  # fmt: skip
