"""The scheduled batch policy: a batch size that follows the measured noise scale.

With ``config.adaptive.enabled`` the training loop of :mod:`experiments.train` runs with
:class:`ScheduledBatch` as its batch policy: the :class:`gns.schedule.BatchSizeSchedule` of
``config.adaptive`` (:func:`make_batch_schedule`), its state carried in the optimizer state
(:func:`with_batch_schedule`: the learning-rate multiplier scales the updates, so a change of
learning rate needs no recompilation, and the schedule is checkpointed with the train state).
At each measurement the smoothed noise scale updates the schedule and the decision goes into
the metrics row (``schedule_reason``; ``schedule_change`` where the batch changed, so that the
:class:`gns.schedule.ScheduleLog` is rebuilt from the rows on resume). The data come from the
example-indexed stream (:func:`experiments.data.stream_indices`), so a run resumed after a
batch change sees the same examples at the same batch size as an uninterrupted one.

The ``adaptive`` mode is another name for the policy comparison of :mod:`experiments.compare`,
where the device time of a run is ``Σ_B steps(B)·t(B)`` (:func:`steps_by_batch_size`,
:func:`device_time`).

References: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018);
Merrill et al. 2025 (arXiv 2505.23971); Meterez et al. 2025 (Seesaw, arXiv 2510.14717).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import logging

from experiments.cli import UserError
from gns import schedule as gschedule

PyTree = Any

__all__ = [
    "ScheduledOptState",
    "enabled",
    "candidates",
    "make_batch_schedule",
    "validate",
    "with_batch_schedule",
    "ScheduledBatch",
    "schedule_from_rows",
    "steps_by_batch_size",
    "device_time",
]


# ---------------------------------------------------------------------------------------------
# The schedule from the config.


def enabled(config) -> bool:
    """Whether ``config`` trains with the batch-size schedule."""
    section = config.get("adaptive")
    return bool(section is not None and section.get("enabled"))


def candidates(config) -> list[int]:
    """The compiled batch sizes: ``config.adaptive.candidates`` or the powers of two in
    ``[min_batch_size, max_batch_size]`` (the fields as :mod:`experiments.rules` checks them:
    strictly increasing ints >= 2)."""
    a = config.adaptive
    if a.candidates is not None:
        return [int(b) for b in a.candidates]
    cands = list(gschedule.powers_of_two(a.min_batch_size, a.max_batch_size))
    if not cands:
        raise UserError(f"no power of two in [{a.min_batch_size}, {a.max_batch_size}] "
                        "(config.adaptive.min_batch_size, max_batch_size)",
                        hint="e.g. --config.adaptive.candidates='(16, 32, 64, 128)'")  # fmt: skip
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
    """The checks of an adaptive training config beyond :mod:`experiments.rules` and
    :func:`make_batch_schedule`: against the data and the estimator.

    Args:
      config: the training config.
      num_train: number of train examples (every candidate must be at most that).
      microbatches: microbatches every candidate must split into (the microbatch estimator
        and ghost BatchNorm), or ``None``.
    """
    cands = candidates(config)
    make_batch_schedule(config)
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
# The batch policy of the training loop.


def schedule_from_rows(rows: Sequence[dict]) -> dict:
    """``{'changes', 'reason_counts'}`` of a run's :class:`gns.schedule.ScheduleLog`, rebuilt
    from its metrics rows (``schedule_change`` entries and ``schedule_reason`` counts)."""
    changes = [r["schedule_change"] for r in rows if r.get("schedule_change")]
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("schedule_reason"):
            counts[r["schedule_reason"]] = counts.get(r["schedule_reason"], 0) + 1
    return {"changes": changes, "reason_counts": counts}


class ScheduledBatch:
    """The batch policy of the schedule (the interface of
    :class:`experiments.train.FixedBatch`): the batch size and rate multiplier that the
    schedule state in the train state stands for, updated at each measurement; the example
    stream.

    Args:
      config: the training config (``adaptive`` enabled).
      sched: the :class:`gns.schedule.BatchSizeSchedule`.
      eval_every_examples: examples between evaluations (0: none).
      rows: the rows of the run so far (a resumed run's history of decisions).
    """

    by_example = True

    def __init__(self, config, sched, eval_every_examples: int, rows: Sequence[dict] = ()):
        self.sched, self.eval_every_examples = sched, int(eval_every_examples)
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
