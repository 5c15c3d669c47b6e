"""The scheduled batch policy of ``config.adaptive``: a batch size that follows the measured
noise scale (:class:`gns.schedule.BatchSizeSchedule`), its state and rate in the train state
(checkpointed; a change needs no recompilation). Each decision goes into the measured row, from
which a resume rebuilds the :class:`gns.schedule.ScheduleLog`.

References: McCandlish et al. 2018 (arXiv 1812.06162); Merrill et al. 2025 (arXiv 2505.23971);
Meterez et al. 2025 (Seesaw, arXiv 2510.14717).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from experiments import mesh as mesh_lib
from experiments.cli import UserError
from gns import scaling
from gns import schedule as gschedule


def enabled(config) -> bool:
    """Whether ``config`` trains with the batch-size schedule."""
    return bool(config.get("adaptive", {}).get("enabled"))


def candidates(config) -> list[int]:
    """The compiled batch sizes: ``config.adaptive.candidates`` or the powers of two in
    ``[min_batch_size, max_batch_size]`` (times the device count where that is not one: each
    splits over the devices)."""
    a = config.adaptive
    if a.candidates is not None:
        return [int(b) for b in a.candidates]
    n = mesh_lib.make_mesh(config.num_devices).size
    cands = list(gschedule.powers_of_two(a.min_batch_size, a.max_batch_size, n))
    if not cands:
        raise UserError(
            f"no power of two (times the {n} devices) in [{a.min_batch_size}, "
            f"{a.max_batch_size}] (config.adaptive.min_batch_size, max_batch_size)",
            hint="e.g. --config.adaptive.candidates='(16, 32, 64, 128)'",
        )
    return cands


def lr_rule(config) -> str:
    """``config.adaptive.lr_rule``, by default the rule of ``config.optimizer``."""
    return config.adaptive.lr_rule or scaling.rule_for(config.optimizer)


def make_batch_schedule(config, step_times: Sequence[float] | None = None):
    """The :class:`gns.schedule.BatchSizeSchedule` of ``config.adaptive``, base learning rate
    ``config.learning_rate`` at ``config.batch_size``; ``step_times``: seconds per step of
    each candidate (default ``config.adaptive.step_times``; both ``None``: a flat table, good
    only for ``init``)."""
    a, cands = config.adaptive, candidates(config)
    times = step_times if step_times is not None else a.step_times
    times = [1.0] * len(cands) if times is None else [float(t) for t in times]
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
            initial_batch_size=a.initial_batch_size,
            lr_rule=lr_rule(config),
            base_batch_size=int(config.batch_size),
            base_lr=float(config.learning_rate),
            margin=float(a.margin),
            patience=int(a.patience),
            allow_shrink=bool(a.allow_shrink),
        )
    except ValueError as e:
        raise UserError(f"config.adaptive: {e}", hint="see configs/cifar10.py base()") from None


def initial_state(config) -> gschedule.ScheduleState:
    """The starting state of :func:`make_batch_schedule`, its rate from
    ``config.adaptive.initial_noise_scale`` (the 'sgd' rule needs it when the schedule starts
    away from ``config.batch_size``)."""
    noise, sched = config.adaptive.initial_noise_scale, make_batch_schedule(config)
    try:
        return sched.init(noise=None if noise is None else float(noise))
    except ValueError:
        start = config.adaptive.initial_batch_size or candidates(config)[0]
        raise UserError(
            f"the 'sgd' rule (config.adaptive.lr_rule) starts at batch {start}, not "
            f"config.batch_size={config.batch_size}, and its rate there needs "
            "config.adaptive.initial_noise_scale",
            hint="set it (e.g. the noise scale a sweep measured), or start at config.batch_size",
        ) from None


def validate(config, num_train: int, microbatches: int | None) -> None:
    """A :class:`UserError` unless every candidate fits in ``num_train`` examples and splits
    into ``microbatches`` (the estimator's and ghost BatchNorm's groups; ``None``: any)."""
    cands = candidates(config)
    if cands[-1] > num_train:
        raise UserError(
            f"config.adaptive candidate {cands[-1]} exceeds the {num_train} train examples",
            hint="drop it from config.adaptive.candidates"
            if config.adaptive.candidates
            else "lower config.adaptive.max_batch_size",
        )
    if microbatches and any(b % microbatches for b in cands):
        raise UserError(
            f"config.adaptive candidates {cands} must all divide into config.gns_microbatches="
            f"{microbatches} equal microbatches",
            hint="use multiples of it",
        )


def with_schedule(config, state):
    """``state`` with the schedule's starting state and learning rate."""
    start = initial_state(config)
    rate = jnp.float32(config.learning_rate) * start.lr_multiplier
    return state._replace(schedule=start, learning_rate=rate)


def schedule_from_rows(rows: Sequence[dict]) -> dict:
    """``{'changes', 'reason_counts'}`` of a run's :class:`gns.schedule.ScheduleLog`, rebuilt
    from its metrics rows."""
    changes = [r["schedule_change"] for r in rows if r.get("schedule_change")]
    counts = Counter(r["schedule_reason"] for r in rows if r.get("schedule_reason"))
    return {"changes": changes, "reason_counts": dict(counts)}


class ScheduledBatch:
    """The batch policy (:class:`experiments.train.FixedBatch`) of the schedule ``sched``, its
    state in the train state; ``rows``: the run's rows so far (a resumed run's decisions)."""

    by_example = True

    def __init__(self, config, sched, eval_every_examples: int, rows: Sequence[dict] = ()):
        self.eval_every_examples = int(eval_every_examples)
        self.log = gschedule.ScheduleLog(sched, **schedule_from_rows(rows))
        self.factor = float(config.adaptive.noise_scale_factor)
        self.base_lr = float(config.learning_rate)
        self._update = jax.jit(sched.update)
        self.sizes = [int(r["batch_size"]) for r in sched.table]

    def batch_size(self, state) -> int:
        return self.sizes[int(jax.device_get(state.schedule.index))]

    def update(self, state, noise: float, step: int) -> tuple[Any, dict]:
        """Feed one smoothed noise scale (``ema_b_simple``) to the schedule: ``(state, row
        fields)``, ``schedule_reason`` and, where the batch changes at the next step,
        ``schedule_change`` (the ScheduleLog entry)."""
        noise = float(noise) * self.factor if noise is not None else math.nan
        decision, s = self._update(jnp.float32(noise), state.schedule)
        entry = self.log.record(step, decision)
        rate = jnp.float32(self.base_lr) * jnp.float32(decision.lr_multiplier)
        fields = {"schedule_reason": gschedule.REASONS[int(decision.reason)]}
        if entry is not None:
            fields["schedule_change"] = entry
            logging.info("step %d: %s", step, entry["reason"])
        return state._replace(schedule=s, learning_rate=rate), fields


def steps_by_batch_size(rows: Sequence[dict], upto_step: int) -> dict[int, int]:
    """Optimizer steps taken at each batch size, from a run's rows in order, up to
    ``upto_step`` (the batch changes only right after a row, so the steps since the previous
    row ran at the row's ``batch_size``)."""
    out, prev = Counter(), 0
    for r in rows:
        if r["step"] > upto_step:
            break
        out[int(r["batch_size"])] += int(r["step"]) - prev
        prev = int(r["step"])
    return dict(out)
