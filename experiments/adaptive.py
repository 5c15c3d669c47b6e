"""Training with a batch size that follows the measured noise scale, and the ``adaptive`` mode.

**Training side** (used by :func:`experiments.train.train_and_evaluate` when
``config.adaptive.enabled``): the :class:`gns.schedule.BatchSizeSchedule` built from
``config.adaptive`` (:func:`make_batch_schedule`), its state carried in the optimizer state
(:func:`with_batch_schedule`: the learning-rate multiplier scales the updates, so a change of
learning rate needs no recompilation, and the schedule is checkpointed with the train state),
one compiled step per batch size (:class:`StepCache`: compiled on first use, cached, compile
time charged to the run clock's ``compile``), and :class:`BatchControl`, which feeds the
smoothed noise scale of each measurement to the schedule and records each decision in the
metrics row (``schedule_reason``; ``schedule_change`` where the batch changed, so that the
:class:`gns.schedule.ScheduleLog` is rebuilt from the rows on resume). The data come from the
example-indexed stream (:func:`experiments.data.stream_indices`), so a run resumed after a
batch change sees the same examples at the same batch size as an uninterrupted one.

**The mode** (``--config.mode=adaptive``, :func:`run_adaptive`): the sweep's measurements
(:func:`experiments.sweep.run_sweep` without trainings, as :mod:`experiments.compare` does:
the static recommendation and the largest batch that fits), one interleaved timing table of
every batch size involved (:func:`time_batch_sizes`), then for each seed the schedule and the
fixed-batch policies it competes with, trained to ``config.adaptive.target_accuracy`` with the
same evaluation interval in examples:

=================  ==========================================================================
``adaptive``       the schedule, from ``config.adaptive.initial_batch_size`` (default the
                   smallest candidate), learning rate ``config.learning_rate`` at
                   ``config.batch_size`` times the ``lr_rule`` multiplier
``config``         ``config.batch_size`` at ``config.learning_rate``
``recommended``    the sweep's recommendation (its batch size and learning rate)
``tradeoff_best``  the batch of a ``tradeoff`` mode's summary with the shortest time to its
                   target (``config.adaptive.tradeoff_summary``), when that file exists
=================  ==========================================================================

Only the ``adaptive`` runs measure the noise scale (every ``config.gns_every`` steps; its cost
is in their wall clock, not in their device time); the fixed batches train plain steps, as in
the ``compare`` mode. Every run is a schedule run (a fixed batch is the schedule with one
candidate), so all read the same example stream and evaluate at the same examples.
Time to target is reported as training wall clock (``time_to_target_s``) and as
``device_time_to_target_s = Σ_B steps(B)·t(B)`` with ``t(B)`` from the one timing table
(robust to a machine that is busy at different times for different runs). Writes
``WORKDIR/summary.json`` (``runs``, ``schedule``, ``timing``, ``comparison``),
``WORKDIR/adaptive.png`` and the runs in ``WORKDIR/runs/<policy>-s<seed>``; re-running the
command reuses the timing table and resumes or reuses the runs.

Example::

    python -m experiments.cifar10 --config configs/cifar10.py:smoke --config.mode=adaptive \\
      --config.data.source=synthetic --workdir /tmp/adaptive

References: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018);
Merrill et al. 2025 (arXiv 2505.23971); Meterez et al. 2025 (Seesaw, arXiv 2510.14717).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from experiments import runlog
from experiments.cli import UserError
from gns import schedule as gschedule

PyTree = Any

__all__ = [
    "POLICIES",
    "ScheduledOptState",
    "enabled",
    "candidates",
    "make_batch_schedule",
    "validate",
    "with_batch_schedule",
    "StepCache",
    "BatchControl",
    "schedule_from_rows",
    "steps_by_batch_size",
    "device_time",
    "time_batch_sizes",
    "run_adaptive",
    "adaptive_table",
]

POLICIES = ("adaptive", "config", "recommended", "tradeoff_best")
SUMMARY_FILE = "summary.json"
TIMING_FILE = "timing.json"


# ---------------------------------------------------------------------------------------------
# The schedule from the config.


def enabled(config) -> bool:
    """Whether ``config`` trains with the batch-size schedule."""
    section = config.get("adaptive")
    return bool(section is not None and section.get("enabled"))


def candidates(config) -> list[int]:
    """The compiled batch sizes: ``config.adaptive.candidates`` (checked: a non-empty,
    strictly increasing list of ints >= 2) or the powers of two in ``[min_batch_size,
    max_batch_size]``.

    Raises:
      UserError: naming the field and the fix.
    """
    a = config.adaptive
    hint = "e.g. --config.adaptive.candidates='(16, 32, 64, 128)'"
    if a.candidates is None:
        lo, hi = a.min_batch_size, a.max_batch_size
        if not (isinstance(lo, int) and isinstance(hi, int) and 2 <= lo <= hi):
            raise UserError(
                f"config.adaptive.min_batch_size={lo!r}, max_batch_size={hi!r}: need ints with "
                "2 <= min <= max",
                hint=hint,
            )
        cands = list(gschedule.powers_of_two(lo, hi))
        if not cands:
            raise UserError(f"no power of two in [{lo}, {hi}] (config.adaptive)", hint=hint)
        return cands
    cands = list(a.candidates)
    try:
        cands = list(gschedule._check_candidates(cands))  # the schedule's own check
    except ValueError as e:
        raise UserError(f"config.adaptive.candidates={a.candidates!r}: {e}", hint=hint) from None
    if cands[0] < 2:
        raise UserError(
            f"config.adaptive.candidates={a.candidates!r}: batch sizes must be >= 2 (the noise "
            "scale compares examples)",
            hint=hint,
        )
    return cands


def make_batch_schedule(config, step_times: Sequence[float] | None = None):
    """The :class:`gns.schedule.BatchSizeSchedule` of ``config.adaptive``.

    Args:
      config: a training config with ``adaptive`` enabled.
      step_times: seconds per step of each candidate (default ``config.adaptive.step_times``;
        when both are ``None`` a flat table, good only for :meth:`init`).

    Returns:
      The schedule: base learning rate ``config.learning_rate`` tuned at
      ``config.batch_size``; no gradient accumulation (every candidate is compiled as one
      batch).

    Raises:
      UserError: bad candidates, step times, rule, margin or patience.
    """
    a = config.adaptive
    cands = candidates(config)
    times = step_times if step_times is not None else a.step_times
    if times is None:
        times = [1.0] * len(cands)
    times = [float(t) for t in times]
    if len(times) != len(cands):
        raise UserError(
            f"config.adaptive.step_times has {len(times)} entries for {len(cands)} candidates "
            f"{cands}: give one time per candidate, in order",
            hint="or leave it None to time them before training",
        )
    try:
        return gschedule.batch_size_schedule(
            dict(zip(cands, times, strict=True)),
            max_batch_size=cands[-1],
            candidates=cands,
            initial_batch_size=a.initial_batch_size or cands[0],
            lr_rule=a.lr_rule,
            base_batch_size=int(config.batch_size),
            base_lr=float(config.learning_rate),
            margin=float(a.margin),
            patience=int(a.patience),
            allow_shrink=bool(a.allow_shrink),
            accumulate=False,
        )
    except ValueError as e:
        raise UserError(f"config.adaptive: {e}", hint="see configs/cifar10.py base()") from None


def validate(config, num_train: int, microbatches: int | None) -> None:
    """The checks of an adaptive training config beyond :func:`make_batch_schedule`'s.

    Args:
      config: the training config.
      num_train: number of train examples (every candidate must be at most that).
      microbatches: microbatches every candidate must split into (the microbatch estimator
        and ghost BatchNorm), or ``None``.
    """
    cands = candidates(config)
    make_batch_schedule(config)
    if config.gns_every <= 0 and len(cands) > 1:
        raise UserError(
            "config.adaptive.enabled needs config.gns_every > 0 (the schedule follows the "
            "measured noise scale)",
            hint="e.g. --config.gns_every=10",
        )
    if cands[-1] > num_train:
        raise UserError(
            f"config.adaptive candidate {cands[-1]} exceeds the {num_train} train examples",
            hint="lower config.adaptive.max_batch_size",
        )
    if microbatches and any(b % microbatches for b in cands):
        raise UserError(
            f"config.adaptive candidates {cands} must all divide into config.gns_microbatches="
            f"{microbatches} equal microbatches",
            hint="use multiples of it",
        )
    e = config.adaptive.eval_every_examples
    if e is not None and not (isinstance(e, int) and e >= 1):
        raise UserError(f"config.adaptive.eval_every_examples={e!r} must be an int >= 1 or None")


# ---------------------------------------------------------------------------------------------
# The learning-rate multiplier and the schedule state inside the optimizer state.


class ScheduledOptState(NamedTuple):
    """Optimizer state of :func:`with_batch_schedule`.

    Attributes:
      inner: the wrapped optimizer's state.
      lr_multiplier: float32 scalar multiplying every update (the schedule's multiplier).
      schedule: the :class:`gns.schedule.ScheduleState` (checkpointed with the train state).
    """

    inner: PyTree
    lr_multiplier: jax.Array
    schedule: gschedule.ScheduleState


def with_batch_schedule(
    optimizer: optax.GradientTransformation, initial: gschedule.ScheduleState
) -> optax.GradientTransformation:
    """``optimizer`` with its updates multiplied by the state's ``lr_multiplier``.

    Every optax optimizer of :func:`experiments.train.make_optimizer` applies its learning
    rate last (``-lr · direction``, weight decay included), so scaling the update scales the
    learning rate; the multiplier is an array in the state, so the host changes it without
    recompiling (``state.opt_state._replace(lr_multiplier=...)``). A multiplier of 1 leaves
    the updates bit for bit unchanged.

    Args:
      optimizer: the optimizer to wrap.
      initial: the schedule's initial state (its ``lr_multiplier`` is the initial one).
    """

    def init(params):
        return ScheduledOptState(
            optimizer.init(params), jnp.asarray(initial.lr_multiplier, jnp.float32), initial
        )

    def update(grads, state, params=None):
        updates, inner = optimizer.update(grads, state.inner, params)
        m = state.lr_multiplier
        updates = jax.tree.map(lambda u: u * m.astype(u.dtype), updates)
        return updates, state._replace(inner=inner)

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# Compiled steps per batch size and the host-side control.


class StepCache:
    """The compiled ``(plain, measure)`` steps of each batch size, compiled on first use.

    Args:
      plain_fn: ``step(state, batch) -> (state, metrics)``.
      gns_fn: the measuring step, or ``None`` (never measured).
      clock: the run's :class:`experiments.runlog.Clock`: compilation is charged to
        ``compile``, then the clock goes back to ``after`` (see :meth:`get`).

    Attributes:
      compiles: ``{batch_size: number of compilations}`` (1 each, once used).
    """

    def __init__(self, plain_fn: Callable, gns_fn: Callable | None, clock):
        self._plain, self._gns, self._clock = plain_fn, gns_fn, clock
        self._steps: dict[int, tuple] = {}
        self.compiles: dict[int, int] = {}

    def get(self, batch_size: int, state, batch, after: str = "train") -> tuple:
        """``(plain, measure)`` compiled for ``batch_size`` (``measure`` is ``None`` without a
        measuring step); ``state``/``batch`` give the shapes."""
        if batch_size not in self._steps:
            self._clock.charge("compile")
            logging.info("Compiling the training steps (batch size %d).", batch_size)
            plain = self._compile(self._plain, state, batch)
            measure = None if self._gns is None else self._compile(self._gns, state, batch)
            self._steps[batch_size] = (plain, measure)
            self.compiles[batch_size] = self.compiles.get(batch_size, 0) + 1
            self._clock.charge(after)
        return self._steps[batch_size]

    @staticmethod
    def _compile(fn, state, batch):
        return jax.jit(fn, donate_argnums=0).lower(state, batch).compile()


def schedule_from_rows(rows: Sequence[dict]) -> dict:
    """``{'changes', 'reason_counts'}`` of a run's :class:`gns.schedule.ScheduleLog`, rebuilt
    from its metrics rows (``schedule_change`` entries and ``schedule_reason`` counts)."""
    changes = [r["schedule_change"] for r in rows if r.get("schedule_change")]
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("schedule_reason"):
            counts[r["schedule_reason"]] = counts.get(r["schedule_reason"], 0) + 1
    return {"changes": changes, "reason_counts": counts}


class BatchControl:
    """Host side of the schedule in the training loop.

    Args:
      config: the training config (``adaptive`` enabled).
      sched: the :class:`gns.schedule.BatchSizeSchedule`.
      rows: the rows of the run so far (a resumed run's history of decisions).
    """

    def __init__(self, config, sched, rows: Sequence[dict] = ()):
        self.sched = sched
        past = schedule_from_rows(rows)
        self.log = gschedule.ScheduleLog(sched, past["changes"], past["reason_counts"])
        self.factor = float(config.adaptive.noise_scale_factor)
        self._update = jax.jit(sched.update)
        self.sizes = [int(r["batch_size"]) for r in sched.table]

    def batch_size(self, state) -> int:
        """The batch size the schedule state in ``state`` stands for."""
        return self.sizes[int(jax.device_get(state.opt_state.schedule.index))]

    @staticmethod
    def lr_multiplier(state) -> float:
        """The learning-rate multiplier in ``state``."""
        return float(jax.device_get(state.opt_state.lr_multiplier))

    def update(self, state, noise: float, step: int) -> tuple[Any, dict]:
        """Feed one smoothed noise scale (``ema_b_simple`` of a measurement) to the schedule.

        Returns:
          ``(state, fields)``: the state with the new schedule state and multiplier, and the
          row fields ``schedule_reason`` (and ``schedule_change``, the ScheduleLog entry,
          when the batch changes at the next step).
        """
        noise = float(noise) * self.factor if noise is not None else math.nan
        decision, s = self._update(jnp.float32(noise), state.opt_state.schedule)
        entry = self.log.record(step, decision)
        opt = state.opt_state._replace(
            schedule=s, lr_multiplier=jnp.asarray(decision.lr_multiplier, jnp.float32)
        )
        fields = {"schedule_reason": gschedule.REASONS[int(decision.reason)]}
        if entry is not None:
            fields["schedule_change"] = entry
            logging.info("step %d: %s", step, entry["reason"])
        return state._replace(opt_state=opt), fields


def steps_by_batch_size(rows: Sequence[dict], upto_step: int | None = None) -> dict[int, int]:
    """Optimizer steps taken at each batch size, from the metrics rows (the batch changes only
    right after a row, so the steps since the previous row ran at the row's ``batch_size``).

    Args:
      rows: a run's metrics rows (``step``, ``batch_size``), in order.
      upto_step: count only the steps up to this one (e.g. the step the target was reached).
    """
    out: dict[int, int] = {}
    prev = 0
    for r in rows:
        step = int(r["step"])
        if upto_step is not None and step > upto_step:
            break
        b = int(r["batch_size"])
        out[b] = out.get(b, 0) + step - prev
        prev = step
    return out


def device_time(steps: dict[int, int], step_time: dict[int, float]) -> float:
    """``Σ_B steps(B)·t(B)``: the time the steps take on the timing table's device."""
    return float(sum(n * step_time[int(b)] for b, n in steps.items()))


def time_batch_sizes(
    step_fn: Callable,
    state,
    make_batch: Callable[[int], dict],
    batch_sizes: Sequence[int],
    *,
    warmup: int = 2,
    rounds: int = 7,
) -> dict[int, dict]:
    """One timing table, measured interleaved: every batch size compiled (no donation) and
    warmed up, then ``rounds`` rounds that each time one step of every batch size, so a
    machine that gets busier or quieter over time affects all sizes alike.

    Args:
      step_fn: ``step(state, batch) -> outputs`` (unjitted or jitted).
      state: the state passed to every call (not donated).
      make_batch: ``batch_size -> batch``.
      batch_sizes: the sizes to time.
      warmup: untimed calls per size.
      rounds: timed rounds, at least 1.

    Returns:
      ``{batch_size: {'step_time_s' (median), 'times_s', 'compile_s'}}``.
    """
    from gns import hardware

    if rounds < 1:
        raise ValueError(f"rounds={rounds}: need at least one timing round.")
    compiled, args, compile_s = {}, {}, {}
    for b in batch_sizes:
        args[b] = (state, make_batch(b))
        t0 = time.perf_counter()
        compiled[b] = hardware.compile_step(step_fn, *args[b])
        compile_s[b] = time.perf_counter() - t0
        for _ in range(warmup):
            jax.block_until_ready(compiled[b](*args[b]))
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for _ in range(rounds):
        for b in batch_sizes:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[b](*args[b]))
            times[b].append(time.perf_counter() - t0)
    return {
        int(b): {
            "step_time_s": float(statistics.median(times[b])),
            "times_s": times[b],
            "compile_s": compile_s[b],
        }
        for b in batch_sizes
    }


# ---------------------------------------------------------------------------------------------
# The adaptive mode.


def _policy_config(config, *, batch_size: int, learning_rate: float, seed: int, schedule: dict):
    """The training config of one policy run: ``config`` as the compare mode trains it
    (:func:`experiments.compare.measurement_config`: its lr schedule and warmup, no checkpoints
    but the last, no progress bar), to ``config.adaptive.target_accuracy``, capped by
    ``max_epochs``/``max_wall_time_s``, on the example stream with evaluations every
    ``adaptive.eval_every_examples``; ``schedule`` sets the ``adaptive`` fields (a fixed batch
    is the schedule with one candidate)."""
    from experiments import compare

    a = config.adaptive
    c = compare.measurement_config(config).train
    c.batch_size, c.learning_rate, c.seed = int(batch_size), float(learning_rate), int(seed)
    c.target_accuracy = float(a.target_accuracy)
    c.num_epochs = float(a.max_epochs)
    c.max_wall_time_s = None if a.max_wall_time_s is None else float(a.max_wall_time_s)
    every = a.eval_every_examples or int(config.eval_every) * int(config.batch_size)
    c.adaptive.eval_every_examples = int(every)
    c.eval_every = max(1, round(every / batch_size))  # unused on the example stream
    c.log_every = min(int(c.log_every), c.eval_every)
    c.adaptive.enabled = True
    for key, value in schedule.items():
        c.adaptive[key] = value
    return c


def _tradeoff_best(config, workdir: str) -> dict | None:
    """The point of a tradeoff mode's summary with the shortest time to its target, or
    ``None`` when there is no such summary (or no point reached the target)."""
    path = config.adaptive.tradeoff_summary or os.path.join(workdir, "tradeoff", SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    s = runlog.read_json(path)
    if s.get("mode") != "tradeoff":
        raise UserError(
            f"{path} is not the summary of a tradeoff run (mode={s.get('mode')!r})",
            hint="point config.adaptive.tradeoff_summary at WORKDIR/summary.json of "
            "--config.mode=tradeoff",
        )
    reached = [p for p in s.get("points", []) if p.get("time_to_target_s") is not None]
    return min(reached, key=lambda p: p["time_to_target_s"]) if reached else None


def _timing(config, workdir: str, batch_sizes: list[int]) -> dict[int, dict]:
    """The interleaved timing table of ``batch_sizes`` (``WORKDIR/timing.json``, reused when
    it holds the same batch sizes)."""
    from experiments import data, mesh, train

    path = os.path.join(workdir, TIMING_FILE)
    if os.path.exists(path):
        saved = {int(b): v for b, v in runlog.read_json(path)["table"].items()}
        if sorted(saved) == sorted(batch_sizes):
            return saved
    ds = data.load(config.data)
    b0 = int(config.batch_size)
    cfg = _policy_config(config, batch_size=b0, learning_rate=config.learning_rate,
                         seed=config.seed, schedule={"enabled": False})  # fmt: skip
    setup = train._setup(cfg, ds)
    for b in batch_sizes:  # global batches, split over the devices of training's mesh
        train._check_candidate(b, setup.mesh, setup.method)
    logging.info("adaptive: timing batch sizes %s, interleaved.", batch_sizes)
    table = time_batch_sizes(
        setup.plain_fn,
        setup.state,
        lambda b: mesh.shard(
            data.train_batch(ds, b, seed=int(config.seed), start_example=0, augment=False),
            setup.mesh,
        ),
        batch_sizes,
        warmup=int(config.adaptive.timing_warmup),
        rounds=int(config.adaptive.timing_rounds),
    )
    runlog.write_json(path, {"table": {str(b): v for b, v in table.items()}})
    return table


def _run_record(policy: str, seed: int, run_dir: str, s: dict, step_time: dict) -> dict:
    rows = runlog.read_jsonl(os.path.join(run_dir, runlog.METRICS_FILE))
    reached = s.get("steps_to_target") is not None
    upto = s["steps_to_target"] if reached else s["steps"]
    by_b = steps_by_batch_size(rows, upto)
    at = [r for r in rows if r["step"] == upto]
    rec = {
        "policy": policy,
        "seed": seed,
        "batch_size": rows[0]["batch_size"] if rows else None,
        "final_batch_size": rows[-1]["batch_size"] if rows else None,
        "learning_rate": rows[0]["learning_rate"] if rows else None,
        "reached": reached,
        "target_accuracy": s.get("target_accuracy"),
        "time_to_target_s": s.get("time_to_target_s") if reached else None,
        "device_time_to_target_s": device_time(by_b, step_time) if reached else None,
        "steps_to_target": s.get("steps_to_target"),
        "examples_to_target": at[0]["examples_seen"] if (reached and at) else None,
        "steps_by_batch_size": {str(b): n for b, n in sorted(by_b.items())},
        "steps": s.get("steps"),
        "wall_time_s": s.get("wall_time_s"),
        "compile_time_s": s.get("compile_time_s"),
        "test_accuracy": s.get("test_accuracy"),
        "best_test_accuracy": s.get("best_test_accuracy"),
        "stop_reason": s.get("stop_reason"),
        "workdir": run_dir,
        "curve": [[r["wall_time_s"], r["test_accuracy"]] for r in rows if "test_accuracy" in r],
        "batch_curve": [[r["wall_time_s"], r["batch_size"]] for r in rows],
    }
    if policy == "adaptive":
        rec["schedule"] = schedule_from_rows(rows)
    return rec


def _comparison(runs: list[dict]) -> dict:
    """Per-policy means over seeds (of runs that all reached the target) and the ratios of
    the adaptive run to the best fixed batch (time) and to the config's batch (steps)."""
    by_policy: dict[str, dict] = {}
    for policy in dict.fromkeys(r["policy"] for r in runs):
        rs = [r for r in runs if r["policy"] == policy]
        all_reached = all(r["reached"] for r in rs)

        def mean(key, rs=rs, ok=all_reached):
            return float(np.mean([r[key] for r in rs])) if ok else None

        by_policy[policy] = {
            "batch_size": rs[0]["batch_size"],
            "seeds": len(rs),
            "all_reached": all_reached,
            "time_to_target_s": mean("time_to_target_s"),
            "device_time_to_target_s": mean("device_time_to_target_s"),
            "steps_to_target": mean("steps_to_target"),
        }
    out: dict[str, Any] = {"policies": by_policy}
    ad = by_policy.get("adaptive")
    fixed = {p: v for p, v in by_policy.items() if p != "adaptive" and v["all_reached"]}
    if ad and ad["all_reached"] and fixed:
        for key in ("device_time_to_target_s", "time_to_target_s"):
            best = min(fixed, key=lambda p, k=key: fixed[p][k])
            out[f"best_fixed_by_{key}"] = best
            out[f"{key}_ratio"] = ad[key] / fixed[best][key]
        if "config" in fixed:
            out["steps_ratio_vs_config"] = (
                ad["steps_to_target"] / fixed["config"]["steps_to_target"]
            )
    return out


def run_adaptive(config, workdir: str) -> dict:
    """The adaptive mode (module docstring); returns the ``summary.json`` dict.

    Raises:
      UserError: a bad ``config.adaptive`` (e.g. empty or non-monotone candidates, an unknown
        policy), or a tradeoff summary that is not one.
    """
    from experiments import compare, sweep
    from gns import plots

    t0 = time.perf_counter()
    a = config.adaptive
    policies = tuple(a.policies)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or "adaptive" not in policies:
        raise UserError(
            f"config.adaptive.policies={policies!r}: need 'adaptive' and only {POLICIES}",
            hint='e.g. --config.adaptive.policies=\'("adaptive", "config")\'',
        )
    if a.candidates is not None:
        candidates(config)  # checked before the measurements
    os.makedirs(workdir, exist_ok=True)
    runlog.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    sw = sweep.run_sweep(compare.measurement_config(config), os.path.join(workdir, "sweep"))
    rec, fits = sw["recommendation"], int(sw["max_batch_size"])
    if a.candidates is not None:
        cands = candidates(config)
    else:
        lo, hi = int(a.min_batch_size), min(int(a.max_batch_size), fits)
        cands = list(gschedule.powers_of_two(lo, hi)) if lo <= hi else []
        if not cands:
            raise UserError(
                f"no power-of-two batch in [{lo}, {hi}] (config.adaptive.min_batch_size, and "
                f"max_batch_size capped by the largest batch that fits, {fits})",
                hint="lower config.adaptive.min_batch_size",
            )
    fixed = {"config": (int(config.batch_size), float(config.learning_rate))}
    skipped = {}
    if rec["accumulation_steps"] == 1:
        fixed["recommended"] = (int(rec["batch_size"]), float(rec["learning_rate"]))
    else:
        skipped["recommended"] = "needs gradient accumulation, which the runs do not do"
    best = _tradeoff_best(config, workdir) if "tradeoff_best" in policies else None
    if best is not None:
        fixed["tradeoff_best"] = (int(best["batch_size"]), float(best["learning_rate"]))
    elif "tradeoff_best" in policies:
        skipped["tradeoff_best"] = "no tradeoff summary with a point at its target"
    fixed = {p: v for p, v in fixed.items() if p in policies}
    sizes = sorted(set(cands) | {b for b, _ in fixed.values()})
    table = _timing(config, workdir, sizes)
    step_time = {b: v["step_time_s"] for b, v in table.items()}
    schedules = {
        p: {"candidates": (b,), "step_times": (step_time[b],), "initial_batch_size": b}
        for p, (b, _) in fixed.items()
    }
    # policy -> (batch size, learning rate, config.adaptive fields, gns_every): the fixed
    # batches measure no noise scale (as in the compare mode), the schedule needs it.
    plan = {p: (b, lr, schedules[p], 0) for p, (b, lr) in fixed.items()}
    adaptive_fields = {"candidates": tuple(cands), "step_times": tuple(step_time[b] for b in cands)}
    plan["adaptive"] = (
        int(config.batch_size),
        float(config.learning_rate),
        adaptive_fields,
        int(config.gns_every),
    )
    runs = []
    for seed in a.seeds:
        for policy in [p for p in policies if p in plan]:
            b, lr, fields, gns_every = plan[policy]
            cfg = _policy_config(
                config, batch_size=b, learning_rate=lr, seed=int(seed), schedule=fields
            )
            cfg.gns_every = gns_every
            run_dir = os.path.join(workdir, "runs", f"{policy}-s{seed}")
            logging.info("adaptive: %s run, seed %d, batch %d, lr %.4g", policy, seed, b, lr)
            s = _train(cfg, run_dir)
            runs.append(_run_record(policy, int(seed), run_dir, s, step_time))
    first = next(r for r in runs if r["policy"] == "adaptive")
    summary = {
        "mode": "adaptive",
        "device": sw["device"],
        "target_accuracy": float(a.target_accuracy),
        "noise_scale": {k: sw["noise_scale"][k] for k in ("b_simple", "interval", "confidence")},
        "recommendation": rec,
        "candidates": cands,
        "timing": {str(b): v for b, v in sorted(table.items())},
        "runs": runs,
        "skipped": skipped,
        "schedule": {**first["schedule"], "seed": first["seed"]},
        "comparison": _comparison(runs),
        "total_time_s": time.perf_counter() - t0,
    }
    try:
        summary["plot"] = plots.plot_adaptive(runs, os.path.join(workdir, "adaptive.png"))
    except Exception as e:  # a plot is a convenience: never lose the finished runs to it
        logging.warning("Could not write the adaptive plot: %s", e)
    runlog.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    return runlog.to_strict_json(summary)


def _train(cfg, run_dir: str) -> dict:
    from experiments import train

    return train.train_and_evaluate(cfg, run_dir)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def adaptive_table(summary: dict) -> str:
    """The runs and the comparison of an adaptive ``summary.json``, as text."""
    lines = [
        f"target test accuracy {summary['target_accuracy']:.3f}; device time = "
        "sum over steps of t(B) from one interleaved timing table",
        f"{'policy':<14}{'seed':>5}{'batch':>12}{'lr':>10}{'steps':>8}{'wall s':>9}"
        f"{'device s':>10}  reached",
    ]
    for r in summary["runs"]:
        b = f"{r['batch_size']}->{r['final_batch_size']}"
        lines.append(
            f"{r['policy']:<14}{r['seed']:>5}{b:>12}{_fmt(r['learning_rate'], '.3g'):>10}"
            f"{_fmt(r['steps_to_target'], 'd'):>8}{_fmt(r['time_to_target_s'], '.4g'):>9}"
            f"{_fmt(r['device_time_to_target_s'], '.4g'):>10}  {r['reached']}"
        )
    c = summary["comparison"]
    for key, what in (
        ("device_time_to_target_s_ratio", "adaptive / best fixed, device time (target <= 0.9)"),
        ("time_to_target_s_ratio", "adaptive / best fixed, wall clock"),
        ("steps_ratio_vs_config", "adaptive / config batch, steps (target <= 0.7)"),
    ):
        lines.append(f"{what}: {_fmt(c.get(key), '.3f')}")
    for change in summary["schedule"]["changes"]:
        lines.append(f"  step {change['step']}: {change['reason']}")
    for policy, why in summary.get("skipped", {}).items():
        lines.append(f"skipped {policy}: {why}")
    return "\n".join(lines)
