r"""The batch-size sweep: which batch size trains this model fastest on this device, and why.

Usage::

    python -m experiments.sweep --config configs/sweep.py:smoke --workdir /tmp/sweep_smoke

It runs :func:`gns.finder.pipeline` on the task of ``configs/sweep.py`` (noise scale, branched
critical batch, memory and step time on the mesh, recommendation), then trainings to
``tradeoff.target`` at several batch sizes and the fit ``S(B) = S_min + E_min/B``
(README, "Results"), and writes ``DIR/sweep.json``, its plots and a printed summary
(:func:`experiments.report.sweep_summary`). Each measurement is kept in
``DIR/sweep_state.json`` under the fingerprint of the fields its stage reads
(:data:`STAGE_FIELDS`): a re-run measures only what is missing or changed. The pilot's end state
is kept in ``DIR/pilot/<key>``, for a run to go on from (:func:`pilot_hooks`).
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

import contextlib
import copy
import dataclasses
import functools
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import cli, data, figures, report, rules, runlog, tasks, train, validation
from experiments import mesh as mesh_lib
from experiments.cli import UserError
from experiments.progress import Progress
from gns import common, critical, finder, hardware, scaling, smoothing, tradeoff

STATE_FILE = "sweep_state.json"
SWEEP_FILE = "sweep.json"
PILOT_DIR = "pilot"

# The config fields each stage reads (:func:`stage_config`), which key its cached result. The
# throughput stage times the step from seed 0 at a constant rate, so neither is among its fields.
TRAIN_SETUP = "model data optimizer momentum nesterov weight_decay gns_method gns_microbatches"
TRAIN_SETUP += " gns_chunk_size dtype"
PILOT = f"{TRAIN_SETUP} seed batch_size learning_rate schedule warmup_steps tradeoff.max_steps"
PILOT += " divergence_factor"
# The forks start from the pilot's states: they depend on what shapes the pilot's path (its
# training setup, its length, which of its steps measure) and on ``critical``.
PATH = f"{PILOT} noise.pilot_steps noise.every"  # the pilot's states: its checkpoint's key
FORKS = f"{PATH} critical"
# On the mesh (experiments.mesh): its record is part of this stage's key (stage_fingerprint).
TIMING = f"{TRAIN_SETUP} batch_size num_devices tradeoff.batch_sizes throughput.min_batch_size"
TIMING += " throughput.max_batch_size throughput.memory_budget_bytes throughput.warmup"
TIMING += " throughput.repeats"
STAGE_FIELDS = {
    "pilot": tuple(PATH.split()),
    "noise_scale": tuple(f"{PILOT} noise".split()),
    "critical_batch": tuple(FORKS.split()),
    "throughput": tuple(TIMING.split()),
}


def stage_config(config, stage: str) -> ml_collections.ConfigDict:
    """The part of ``config`` that ``stage`` reads (:data:`STAGE_FIELDS`), as a ConfigDict of
    the same shape: reading any other field fails."""
    out: dict[str, Any] = {}
    for path in STAGE_FIELDS[stage]:
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        value = rules.get(config, path)
        node[last] = value.to_dict() if hasattr(value, "to_dict") else copy.deepcopy(value)
    return ml_collections.ConfigDict(out)


def stage_fingerprint(config, stage: str, mesh: dict | None = None, data=None) -> str:
    """:func:`experiments.runlog.fingerprint` of :func:`stage_config` (its data fields those of
    a run's identity), the ``data`` record (the content: ``Task.describe``) and, for
    ``throughput``, the ``mesh`` record, when given (in place of ``num_devices``: ``None`` and
    the count it resolves to are the same mesh)."""
    view = {"config": data_identity(stage_config(config, stage).to_dict()), "data": data}
    if mesh is not None and stage == "throughput":
        view["mesh"] = mesh
        del view["config"]["num_devices"]
    return runlog.fingerprint(view)


def validate_config(config) -> None:
    """:func:`experiments.rules.check` of a ``configs/sweep.py`` config, then again with the
    mesh's size (``batch_size`` splits over it)."""
    if "noise" not in config or "throughput" not in config:
        raise UserError(
            f"config.task={tasks.get(config).name!r}: this config has no measurement fields "
            "(noise, critical, throughput, recommend, tradeoff)",
            hint="pass a sweep config (configs/sweep.py), or add them with "
            "configs.common.measurement(config)",
        )
    table = tasks.table(config)
    rules.check(config, table)
    rules.check(config, table, mesh_lib.make_mesh(config.num_devices).size)
    if config.gns_method == "across_devices":
        raise UserError(
            "config.gns_method='across_devices': the sweep's pilot and forks run on one "
            "device (its timing runs on the mesh)",
            hint="pass --config.gns_method=auto (per_example or microbatch)",
        )


class SweepState:
    """Finished measurements in ``workdir/sweep_state.json``, each under the fingerprint of
    the config it was measured with; :meth:`put` rewrites the file atomically."""

    VERSION = 4

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, STATE_FILE)
        self.data: dict[str, Any] = {"version": self.VERSION, "sections": {}}
        old = {}
        with contextlib.suppress(FileNotFoundError, ValueError):  # none yet, or unreadable
            old = runlog.read_json(self.path)
        if old.get("version") == self.VERSION:
            self.data = old
        elif os.path.exists(self.path):
            logging.warning("Ignoring %s: not a sweep state of this version.", self.path)
        self.reused: list[str] = []
        self.stale: list[str] = []

    def get(self, section: str, key, fp: str, valid=lambda value: True):
        """A copy of the stored ``section[key]`` if it was measured under fingerprint ``fp``
        and is ``valid`` (e.g. its pilot state still on disk)."""
        item = self.data["sections"].get(section, {}).get(str(key))
        if item is not None and item["fingerprint"] == fp and not valid(item["value"]):
            logging.info("%s[%s] lacks what it saved on disk: measuring it again.", section, key)
            return None
        if item is not None and item["fingerprint"] == fp:
            self.reused.append(f"{section}[{key}]")
            logging.info("Reusing %s[%s]: measured before with the same config.", section, key)
            return copy.deepcopy(item["value"])
        if item is not None and section not in self.stale:
            self.stale.append(section)
            logging.info("The config of %s[%s] changed: measuring it again.", section, key)
        return None

    def put(self, section: str, key, fp: str, value) -> None:
        items = self.data["sections"].setdefault(section, {})
        items[str(key)] = {"fingerprint": fp, "value": copy.deepcopy(value)}
        runlog.write_json(self.path, self.data)


def _stream(task, t, ds, seed: int):
    """``batch_fn(size, index)`` of the task's example stream from ``seed``."""
    cfg = copy.deepcopy(t)
    cfg.seed = seed
    return task.batch_fn(cfg, ds)


def pipeline_steps(config, ds, task) -> tuple[finder.Steps, Any]:
    """The :class:`gns.finder.Steps` of ``config`` and the pilot's initial state: the pilot
    on the stream of ``seed``, the forks on that of ``seed + critical.seed_offset``, evaluated
    on ``critical.eval_examples`` test examples."""
    t = stage_config(config, "critical_batch")  # what shapes the pilot, and the forks
    schedule = train.make_schedule(t, t.tradeoff.max_steps, 1.0)
    uses = int(config.noise.pilot_steps) // int(config.noise.every)  # the pilot's measurements
    model, _, plain_fn, gns_fn, state = train.build_steps(
        t, ds, task, schedule, smoothing.ema(), gns_uses=uses
    )
    fork = jax.jit(lambda st, batch, rate: plain_fn(st._replace(learning_rate=rate), batch)[0])
    by_mult: dict[float, Any] = {}

    def make_step(size, mult):  # the rate an argument: one compiled step per shape
        rate = np.float32(float(t.learning_rate) * mult)
        return by_mult.setdefault(mult, functools.partial(fork, rate=rate))

    arrays = task.eval_arrays(t, ds, "test", int(t.critical.eval_examples))
    held_out = next(iter(task.eval_batches(ds, arrays, len(next(iter(arrays.values()))))))
    inputs, targets = tasks.split_batch(held_out)
    mask = jnp.asarray(held_out["mask"], jnp.float32)
    eval_step = jax.jit(train.make_eval_step(model, task.loss))

    def eval_fn(st):
        return eval_step(st.params, st.batch_stats, inputs, targets, mask)[1] / mask.sum()

    fork_seed = int(t.seed) + int(t.critical.seed_offset)
    batch_fn, fork_batch_fn = _stream(task, t, ds, int(t.seed)), _stream(task, t, ds, fork_seed)
    return finder.Steps(jax.jit(gns_fn), make_step, batch_fn, fork_batch_fn, eval_fn), state


def pipeline_plan(config) -> finder.Plan:
    """The :class:`gns.finder.Plan` of ``config``: the pilot of ``noise``, the forks of
    ``critical``, the run planned as ``tradeoff.max_steps``."""
    t, ccfg = stage_config(config, "noise_scale"), stage_config(config, "critical_batch").critical
    return finder.Plan(
        ref_batch_size=int(t.batch_size),
        pilot_steps=int(t.noise.pilot_steps),
        every=int(t.noise.every),
        num_stretches=int(t.noise.num_stretches),
        branched=int(ccfg.num_checkpoints) > 0,
        branch_points=int(ccfg.num_checkpoints),
        branch_exponents=tuple(int(e) for e in ccfg.exponents),
        branch_steps=int(ccfg.fork_steps),
        branch_repeats=int(ccfg.num_repeats),
        fork_rule=scaling.rule_for(t.optimizer),
        confidence=float(t.noise.confidence),
        branch_confidence=float(ccfg.confidence),
        seed=int(t.seed),
        run_steps=int(t.tradeoff.max_steps),
        divergence_factor=t.divergence_factor,
    )


def fork_warning(config) -> str | None:
    """:func:`gns.scaling.short_fork_warning` of ``critical.fork_steps`` and the optimizer's
    momentum (``config.momentum`` for SGD, optax's first-moment decay 0.9 for the Adam family)."""
    t = stage_config(config, "critical_batch")
    beta = float(t.momentum or 0.0) if t.optimizer == "sgd" else 0.9
    short = scaling.short_fork_warning(int(t.critical.fork_steps), beta)
    return short and short + " (--config.critical.fork_steps)"


def pilot_hooks(config, ds, task, workdir: str, fp: str):
    """``(on_step, finish)`` of the pilot: ``finish(run_pilot)`` returns the noise record of
    ``run_pilot()`` with its estimator (``method``) and saves the pilot's end state in
    ``workdir/pilot/<fp[:16]>`` (``record["pilot"]["start"]``, for
    :func:`experiments.train.start_from_pilot`)."""
    t = stage_config(config, "noise_scale")
    method = train.resolve_gns_method(t, train.make_model(t, ds))
    last, gaps = {}, []

    def on_step(step, state):  # one pilot step in flight: the gaps are the device's step time
        if step >= 2:
            gaps.append(time.perf_counter() - last["t"])
        last.update(state=state, t=time.perf_counter())

    def finish(run_pilot):
        try:
            record = common.to_json(run_pilot())
        except ValueError as e:  # e.g. a diverged pilot, which stopped at its first nan
            raise UserError(
                f"the noise scale could not be measured: {e}",
                hint="lower config.learning_rate (config.divergence_factor: the pilot's bound)",
            ) from e
        p, rel = record["pilot"], os.path.join(PILOT_DIR, fp[:16])
        # Steps x the median step: the measurements and compilations left out, as a run's clock.
        seconds = p["steps"] * float(np.median(gaps))
        start = {
            "from": "pilot",
            "checkpoint": rel,
            "step": p["steps"],
            "seconds": seconds,
            "examples": p["steps"] * p["batch_size"],
            "batch_size": p["batch_size"],
            "learning_rate": float(t.learning_rate),
        }
        where = os.path.join(workdir, rel)
        shutil.rmtree(where, ignore_errors=True)  # a pilot measured again replaces its state
        meta = {
            "step": p["steps"],
            "examples_seen": start["examples"],
            "start": start,
            "clock": {"train_time_s": seconds},
            "data": task.describe(ds),
        }
        with runlog.Checkpoints(where) as ckpt:
            ckpt.save(p["steps"], last["state"], meta)
        return record | {"method": method, "pilot": p | {"start": start}}

    return on_step, finish


def pilot_saved(workdir: str, noise: dict) -> bool:
    """Whether the pilot state of the noise record ``noise`` is on disk (:func:`pilot_hooks`)."""
    start = noise.get("pilot", {}).get("start")
    return bool(start) and os.path.isdir(
        os.path.join(workdir, start["checkpoint"], runlog.CHECKPOINT_DIR, str(start["step"]))
    )


def critical_fingerprint(config, b_noise: float, data=None) -> str:
    """The key of the branched stage's cached result: :func:`stage_fingerprint`, with
    ``b_noise`` folded in where the forks' learning-rate rule uses it (SGD)."""
    fp = stage_fingerprint(config, "critical_batch", data=data)
    sizes = [int(config.batch_size * 2.0**e) for e in config.critical.exponents]
    args = (config.batch_size, sizes, config.optimizer)
    if critical.lr_multipliers(*args, b_noise) == critical.lr_multipliers(*args):
        return fp
    return runlog.fingerprint({"fields": fp, "lr_rule_b_noise": b_noise})


def noise_scale_value(noise: dict) -> float:
    """``b_simple`` of a noise-scale record as a float. Strict JSON stores a non-finite value
    as ``null``: read back, it is ``+inf`` when the pooled ``g_sq`` is not positive (the
    gradient is not resolved above the noise), else ``nan``."""
    if noise["b_simple"] is not None:
        return float(noise["b_simple"])
    return math.inf if noise["g_sq"] is not None and noise["g_sq"] <= 0 else math.nan


def throughput_candidates(view, unit: int = 1) -> list[int]:
    """The powers of two (times ``unit``, the smallest batch that splits over the mesh and into
    the steps' groups) of ``throughput``, ``batch_size`` and the fixed ``tradeoff.batch_sizes``
    (every trained batch has its ``t(B)`` from the same table)."""
    lo, hi = view.throughput.min_batch_size, view.throughput.max_batch_size
    extra = [view.batch_size, *(view.tradeoff.batch_sizes or ())]
    ladder = finder.power_of_two_candidates(lo, hi, unit)
    return sorted({int(b) for b in [*ladder, *extra] if b <= hi})


def measure_throughput(view, ds, task, extra=()) -> dict:
    """Memory of each global batch of :func:`throughput_candidates` and ``extra`` on the mesh
    (one that does not split over it: skipped), then one interleaved timing table of those
    that fit: ``rows`` (``sweep.json``'s ``throughput``), ``table`` (TimingTable.to_dict),
    ``max_batch_size``, ``max_batch_size_per_device`` and ``mesh``."""
    t = copy.deepcopy(view)
    t.update(seed=0, learning_rate=1e-3)
    mesh = mesh_lib.make_mesh(t.num_devices)
    n = mesh.size
    constant = optax.constant_schedule(1.0)
    model, method, plain_fn, _, state = train.build_steps(
        t, ds, task, constant, smoothing.ema(), mesh=mesh
    )
    per_example = method == "per_example"
    # What each step splits a batch into, and the examples there are.
    splits = (train.batch_groups(t, model, n), per_example, task.num_train(ds))
    # The batch sharded over the devices, the state replicated: what XLA compiles (and its
    # memory analysis counts) is one device's part of the step.
    step = jax.jit(
        plain_fn, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh_lib.AXIS)))
    )
    template = task.batch_fn(t, ds)(1, 0)

    def zeros(b, xp):  # a batch of b examples shaped as the task's (jnp: traceable, no memory)
        return jax.tree.map(lambda x: xp.zeros((b,) + x.shape[1:], x.dtype), template)

    cands = set(throughput_candidates(view, math.lcm(n, splits[0]))) | {int(b) for b in extra}
    skipped = {b: why for b in cands if (why := mesh_lib.split_reason(b, mesh, *splits))}
    budget, source = t.throughput.memory_budget_bytes, None
    if budget is None and mesh.devices.flat[0].platform == "cpu" and n > 1:
        # Simulated CPU devices share the host: each gets its share of the default budget.
        budget, source = hardware.memory_budget()
        budget, source = budget // n, f"{source} / {n} devices"
    res, table = hardware.FitResult(None, None, None, []), None  # nothing splits: none timed
    if len(cands) > len(skipped):
        res, table = finder.time_candidates(
            step,
            lambda b: (state, mesh_lib.shard(zeros(b, np), mesh)),
            sorted(cands - set(skipped)),
            memory_budget_bytes=budget,
            rounds=t.throughput.repeats,
            warmup=t.throughput.warmup,
            make_shape_args=lambda b: (state, zeros(b, jnp)),
        )
    timings = {} if table is None else table.timings
    rows = [
        rec.to_dict()
        | _timing_row(timings.get(rec.batch_size))
        | {
            "budget_source": source or res.budget_source,
            "per_device_batch_size": rec.batch_size // n,
        }
        for rec in res.records
    ]
    rows += [
        hardware.FitRecord(b, None, res.budget_bytes, False, False, why).to_dict()
        | _timing_row(None)
        | {"fits": None, "budget_source": None, "per_device_batch_size": None, "skipped": True}
        for b, why in skipped.items()
    ]
    max_b = res.max_batch_size
    return {
        "rows": sorted(
            ({"accumulation_steps": 1} | r for r in rows), key=lambda r: r["batch_size"]
        ),
        "table": None if table is None else table.to_dict(),
        "max_batch_size": max_b,
        "max_batch_size_per_device": None if max_b is None else max_b // n,
        "mesh": mesh_lib.describe(mesh),
    }


def _timing_row(bt: hardware.BatchTiming | None) -> dict:
    """The timing fields of a throughput row (``None`` and ``[]`` when not timed)."""
    if bt is None:
        keys = "step_time_s step_time_iqr_s times_s extra_rounds stable examples_per_s"
        return dict.fromkeys(keys.split()) | {"times_s": []}
    return dict(
        step_time_s=bt.median_s,
        step_time_iqr_s=bt.q75_s - bt.q25_s,
        times_s=list(bt.times_s),
        extra_rounds=bt.extra_rounds,
        stable=bt.stable,
        examples_per_s=bt.batch_size / bt.median_s,
    )


def add_accumulation_rows(rows: list[dict], factors, max_batch: int) -> list[dict]:
    """``rows`` plus the batches ``factor × max_batch`` run as gradient accumulation
    (:func:`gns.hardware.accumulated_step_time` on the measured table)."""
    times, by_batch = step_times(rows), {r["batch_size"]: dict(r) for r in rows}
    for b in (int(f) * max_batch for f in factors):
        t, k, micro = hardware.accumulated_step_time(times, b, max_batch)
        # A size above the range was never tried for memory: its fits is unknown (None).
        row = by_batch.setdefault(b, {"batch_size": b, "fits": None, "predicted_bytes": None})
        note = f"gradient accumulation {k} x {micro}: its time computed from batch {micro}'s"
        reason = "; ".join(filter(None, (row.get("reason"), note)))
        row.update(
            accumulation_steps=k,
            micro_batch_size=micro,
            step_time_s=t,
            examples_per_s=b / t,
            reason=reason,
        )
    return [by_batch[b] for b in sorted(by_batch)]


def step_times(rows: list[dict]) -> dict[int, float]:
    """``{batch: median seconds per step}`` of the timed rows that fit."""
    return {r["batch_size"]: r["step_time_s"] for r in rows if r["fits"] and r["step_time_s"]}


def training_config(config, batch_size: int, b_noise: float, seed_offset=0) -> tuple[Any, str]:
    """The training config at ``batch_size`` (without :data:`experiments.rules.NOT_TRAINING`;
    the scaled learning rate, ``config.tradeoff``'s target as the task's target field and its
    caps, seed ``seed + seed_offset``) and the learning-rate rule in words."""
    tr = config.tradeoff
    lr, rule = scaling.learning_rate(
        config.optimizer, config.learning_rate, config.batch_size, batch_size, b_noise
    )
    cfg = ml_collections.ConfigDict(
        {k: v for k, v in config.to_dict().items() if k not in rules.NOT_TRAINING}
    )
    eval_every = max(1, round(tr.eval_every_examples / batch_size))
    cfg.update(batch_size=int(batch_size), learning_rate=float(lr), num_epochs=None)
    cfg.update(seed=int(config.seed) + int(seed_offset), num_steps=tr.max_steps)
    cfg.update(max_wall_time_s=tr.max_wall_time_s)
    cfg[tasks.get(config).target_field] = tr.target
    cfg.update(eval_every=eval_every, log_every=eval_every)
    return cfg, rule


def data_identity(view: dict) -> dict:
    """``view`` (a config dict) with the data fields of a run's identity
    (:func:`experiments.train.run_identity`: e.g. not where the data is cached)."""
    return view | {"data": train.run_identity({"data": view["data"]})["data"]}


def training_fingerprint(cfg, devices: int, data=None) -> str:
    """The key of a training to the target: its config (:func:`data_identity`) on ``devices``
    devices (in place of ``num_devices``), on the data of record ``data`` (``Task.describe``)."""
    fields = {k: v for k, v in cfg.to_dict().items() if k != "num_devices"}
    view = {"config": data_identity(fields), "devices": devices, "data": data}
    return runlog.fingerprint(view)


def run_training(cfg, workdir: str, lr_rule: str) -> dict:
    """Train ``cfg`` to its target: steps and wall-clock time to it (``None`` if missed: also
    a training that diverged, its ``stop_reason``) and the curve of the task's metric on the
    test data."""
    try:
        summary = train.train_and_evaluate(cfg, workdir)
    except train.Diverged as e:  # one batch size's rate: the others still say what they say
        logging.warning("The training at batch %d: %s", cfg.batch_size, e)
        summary = runlog.read_json(os.path.join(workdir, train.SUMMARY_FILE))
    rows = runlog.read_jsonl(os.path.join(workdir, runlog.METRICS_FILE))
    task = tasks.get(cfg)
    metric = f"test_{task.metric}"
    evals = [r for r in rows if metric in r]
    steps = tradeoff.steps_to_target(
        [r["step"] for r in evals],
        [r[metric] for r in evals],
        cfg[task.target_field],
        higher_is_better=not task.lower_is_better,
    )
    return {
        "batch_size": int(cfg.batch_size),
        "seed": int(cfg.seed),
        "workdir": workdir,
        "learning_rate": float(cfg.learning_rate),
        "lr_rule": lr_rule,
        "reached": steps is not None,
        "steps": steps,
        "time_to_target_s": summary.get("time_to_target_s") if steps is not None else None,
        "eval_every": int(cfg.eval_every),
        "stop_reason": summary.get("stop_reason"),
        "steps_run": summary.get("steps"),
        "wall_time_s": summary.get("wall_time_s"),
        "final_test_accuracy": summary.get("test_accuracy"),
        "best_test_accuracy": summary.get("best_test_accuracy"),
        "curve": [[r["step"], r[metric]] for r in evals],
    }


def with_device_time(points: list[dict], times: dict[int, float], max_batch: int) -> list[dict]:
    """Copies of ``points`` with ``step_time_s`` (``t(B)``, accumulated above ``max_batch``)
    and ``device_time_to_target_s = steps × t(B)`` (``None``: missed the target)."""
    out = []
    for p in points:
        t = hardware.accumulated_step_time(times, p["batch_size"], max_batch)[0]
        device = None if p.get("steps") is None else p["steps"] * t
        out.append(p | {"step_time_s": t, "device_time_to_target_s": device})
    return out


def ranking(by_batch: list[dict]) -> list[dict]:
    """``sweep.json``'s ``time_to_target``: :func:`experiments.validation.rank` of the rows of
    :func:`experiments.validation.mean_over_seeds`."""
    keys = ("batch_size", "rank", validation.DEVICE, "time_to_target_s")
    return [
        {k: r[k] for k in keys}
        | {"device_over_best": r["over_best"], "wall_over_best": r["wall_over_best"]}
        for r in validation.rank(by_batch)
    ]


def fit_tradeoff(points: list[dict], num_bootstrap: int, seed: int) -> dict:
    """Fit ``S(B)`` to the reached points; an ``error`` entry instead when it cannot be fitted."""
    reached = [p for p in points if p["reached"]]
    keys = "batch_size seed steps time_to_target_s device_time_to_target_s step_time_s "
    keys += "learning_rate reached workdir wall_time_s final_test_accuracy stop_reason"
    kept = [{k: p.get(k) for k in keys.split()} for p in points]
    out = {"s_min": None, "e_min": None, "b_crit": None, "intervals": {}, "points": kept}
    if reached and all(p["steps"] <= p["curve"][0][0] for p in reached):
        out["error"] = (
            f"every training that reached the target ({len(reached)} of {len(points)}) reached "
            "it at its first evaluation, so its steps to it are not measured: raise "
            "tradeoff.target or lower tradeoff.eval_every_examples"
        )
        return out
    try:
        f = tradeoff.fit(
            [p["batch_size"] for p in reached],
            [p["steps"] for p in reached],
            num_bootstrap=num_bootstrap,
            seed=seed,
        )
    except ValueError as e:
        out["error"] = f"{e} ({len(reached)} of {len(points)} trainings reached the target)"
        return out
    return out | {k: v for k, v in f.to_dict().items() if k != "points"}


def train_batch_sizes(config, fitting: list[int]) -> list[int]:
    """``tradeoff.batch_sizes``, or at most ``tradeoff.max_runs`` of the batches that fit from
    ``tradeoff.min_batch_size`` up, evenly spread, ends included."""
    tr = config.tradeoff
    if tr.batch_sizes:
        return [int(b) for b in tr.batch_sizes]
    values = [b for b in fitting if b >= tr.min_batch_size]
    if len(values) <= tr.max_runs:
        return values
    idx = np.unique(np.round(np.linspace(0, len(values) - 1, tr.max_runs)).astype(int))
    return [values[i] for i in idx]


def _check_pilot_batches(config, ds, task) -> None:
    """A :class:`UserError` unless the pilot's batch and the forks' are within the train set
    (a larger one repeats examples in every batch) and split into the estimator's
    microbatches, ghost BatchNorm's groups (:func:`experiments.train.batch_groups`; both run on
    one device)."""
    groups = train.batch_groups(config, train.make_model(config, ds))
    forks = [int(config.batch_size * 2.0**e) for e in config.critical.exponents]
    sizes = [int(config.batch_size), *(forks if config.critical.num_checkpoints else ())]
    if (num_train := task.num_train(ds)) < max(sizes):
        raise UserError(
            f"the pilot's and the forks' batches (config.batch_size, critical.exponents) go up "
            f"to {max(sizes)}, more than the {num_train} train examples",
            hint="lower --config.batch_size or the largest --config.critical.exponents, or "
            "--config.critical.num_checkpoints=0 (no forks)",
        )
    if bad := [b for b in sizes if b % groups]:
        raise UserError(
            f"the pilot's and the forks' batches {bad} (config.batch_size, critical.exponents) "
            f"do not split into config.gns_microbatches={groups} equal microbatches (the "
            "estimator's, and ghost BatchNorm's groups)",
            hint="lower --config.gns_microbatches, or raise the batch or the smallest exponent",
        )


def run_sweep(
    config, workdir: str, *, trainings: bool = True, train_recommended: bool = False, ds=None
) -> dict:
    """Run (or resume) the sweep of ``config`` in ``workdir``; returns the ``sweep.json`` dict
    (``trainings=False``: measure and recommend only; ``train_recommended``: train the
    recommended batch too, as the tradeoff mode of ``experiments.compare`` does; ``ds``: the
    task's data, when loaded already)."""
    validate_config(config)
    task = tasks.get(config)
    runlog.check_workdir(workdir, "sweep")  # a wrong workdir, said before the data's load
    if ds is None:
        ds = task.load(config)  # before the lock: bad data leaves the workdir untouched
    _check_pilot_batches(config, ds, task)
    if trainings and config.tradeoff.batch_sizes:  # at least one can train, or no fit
        mesh, num_train = mesh_lib.make_mesh(config.num_devices), task.num_train(ds)
        n, sizes = mesh.size, config.tradeoff.batch_sizes
        if all(mesh_lib.split_reason(b, mesh, num_train=num_train) for b in sizes):
            raise UserError(
                f"none of config.tradeoff.batch_sizes={tuple(sizes)} can "
                f"train here: each must split over the {n} devices and be at most the "
                f"{num_train} train examples",
                hint=f"pass multiples of {n}, e.g. --config.tradeoff.batch_sizes='({2 * n}, "
                f"{4 * n}, {8 * n})'",
            )
    if trainings and (config.schedule != "constant" or config.warmup_steps > 0):
        logging.warning(
            "The trainings to the target follow config.schedule=%r with %d warmup steps over "
            "tradeoff.max_steps: their steps to the target then depend on that horizon "
            "(configs/sweep.py trains at a constant rate: --config.schedule=constant "
            "--config.warmup_steps=0).",
            config.schedule,
            config.warmup_steps,
        )
    bar = Progress(5, desc="sweep", unit="stages", rate=False)
    with contextlib.closing(bar), runlog.workdir_lock(workdir, "sweep"):
        return _Sweep(config, workdir, bar, (task, ds)).run(trainings, train_recommended)


def _decide(config, basis, value, evidence, table, max_batch, s_min=None, limits=(1, math.inf)):
    """:func:`gns.finder.decide` with the reference run's rate and ``config.recommend``."""
    rc, factors = config.recommend, config.throughput.accumulation_factors
    fits = {*table.step_time(), config.batch_size, *(int(f) * max_batch for f in factors)}
    return finder.decide(
        basis,
        value,
        evidence,
        table,
        max_batch,
        base_batch_size=config.batch_size,
        base_lr=config.learning_rate,
        optimizer=config.optimizer,
        objective=rc.objective,
        candidates=list(rc.candidates or sorted(fits)),
        s_min=s_min,
        price_per_hour=rc.price_per_hour,
        limits=limits,
    )


def _recommendations(config, m: finder.Measured, fit: dict, limits) -> dict:
    """The pick under every basis measured (``recommendation_by_basis``: the validation compares
    them on the trainings), from the best evidence (``recommendation``) and from the fitted
    ``B_crit`` as the noise scale (``recommendation_from_tradeoff``: a check)."""
    max_batch, table, _ = m.timed
    fit_iv = fit["intervals"].get("b_crit") or (None, None)
    picks, by_basis = {}, {}
    for name, (v, lo, hi) in [*m.evidence.items(), ("tradeoff_fit", (fit["b_crit"], *fit_iv))]:
        by_basis[name] = {"b_noise": v, "low": lo, "high": hi, "batch_size": None}
        if v is not None and not math.isnan(v):
            value = (v, math.nan, math.nan) if name == "tradeoff_fit" else (v, lo, hi)
            r = picks[name] = _decide(
                config, name, value, m.evidence, table, max_batch, fit["s_min"], limits
            )
            by_basis[name].update(batch_size=r.batch_size, batch_size_range=r.batch_size_range)
    rec, rec_fit = picks[m.basis], picks.get("tradeoff_fit")
    warnings = (*rec.warnings, *finder.pilot_warnings(m.noise["pilot"]["rows"]))  # loss rose
    return {
        "recommendation": dataclasses.replace(rec, warnings=warnings).to_dict()
        | {"basis_note": m.note},
        "recommendation_from_tradeoff": None if rec_fit is None else rec_fit.to_dict(),
        "recommendation_by_basis": by_basis,
    }


class _Sweep:
    """A run of the sweep: :func:`gns.finder.pipeline` with each stage read from the
    :class:`SweepState` or measured and stored with its cost (``seconds``), then trainings."""

    def __init__(self, config, workdir: str, bar: Progress, loaded):
        t_start = time.perf_counter()
        self.config, self.workdir, self.bar, self.st = config, workdir, bar, SweepState(workdir)
        self.mesh = mesh_lib.make_mesh(config.num_devices)
        self.task, self.ds = loaded  # the task and its data, loaded before the workdir's lock
        self.data = self.task.describe(self.ds)  # the content: a stage's key holds it
        mesh_record = mesh_lib.describe(self.mesh)
        self.fps = {s: stage_fingerprint(config, s, mesh_record, self.data) for s in STAGE_FIELDS}
        # JAX's persistent compilation cache, unless one is configured: the user's own (a cache
        # in the workdir would run code from it).
        cache_dir = data.private_cache_dir("jax") if config.compilation_cache else None
        if cache_dir and not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        runlog.write_json(os.path.join(workdir, runlog.CONFIG_FILE), config.to_dict())
        self.t = {"setup": time.perf_counter() - t_start}  # the seconds of each stage, this run
        self.cost: dict[str, float] = {}  # seconds each stage took when it was measured
        self.view = stage_config(config, "throughput")
        # The pipeline's candidates: those that split over the mesh and into the steps' groups
        # (the others are skipped rows of the table; asked for, they would close the widening's
        # side as if they did not fit).
        model = train.make_model(config, self.ds)
        self.groups = train.batch_groups(config, model, self.mesh.size)
        cands = throughput_candidates(self.view, math.lcm(self.mesh.size, self.groups))
        self.per_example = train.resolve_gns_method(config, model, self.mesh.size) == "per_example"
        self.base = [b for b in cands if self.split_reason(b) is None]
        smallest = 2 * self.mesh.size if self.per_example else self.mesh.size
        # No smaller batch runs, and no batch larger than the train set.
        self.limits = (max(self.groups, smallest), self.task.num_train(self.ds))
        self.on_step, self.finish = pilot_hooks(
            config, self.ds, self.task, workdir, self.fps["pilot"]
        )

    def split_reason(self, batch_size: int) -> str | None:
        """:func:`experiments.mesh.split_reason` of this sweep's mesh and steps."""
        return mesh_lib.split_reason(
            batch_size, self.mesh, self.groups, self.per_example, self.task.num_train(self.ds)
        )

    def _stored(self, section: str, key: str, compute, valid=lambda value: True) -> dict:
        self.bar.set(phase=section)
        t0 = time.perf_counter()
        value = self.st.get(section, key, self.fps[section], valid)
        if value is None:
            value = common.to_json(compute())
            value["seconds"] = time.perf_counter() - t0
            self.st.put(section, key, self.fps[section], value)
        self.cost[section if key == "value" else f"{section}[{key}]"] = value.get("seconds") or 0.0
        self.t[section] = self.t.get(section, 0.0) + time.perf_counter() - t0
        return value

    def cache(self, name: str, compute) -> dict:
        """``cache`` of the pipeline. The noise record counts only with its pilot state on disk
        (the start of a run); the forks' key holds the noise scale their rule reads."""
        if name == "critical_batch":
            if short := fork_warning(self.config):
                logging.warning("%s", short)
            b_noise = finder.fork_noise_scale(self.noise)
            self.fps[name] = critical_fingerprint(self.config, b_noise, self.data)
            value = self._stored(name, "value", compute)
        else:
            valid = functools.partial(pilot_saved, self.workdir)
            value = self.noise = self._stored(name, "value", lambda: self.finish(compute), valid)
        self.bar.update(1)
        return value

    def time(self, cands, interval, seconds_left):
        """``time_fn`` of the pipeline: the table (``extended_to_<B>``: with one batch more)."""
        extra = tuple(sorted(set(cands) - set(self.base)))
        tput = self._stored(
            "throughput",
            f"extended_to_{extra[-1]}" if extra else "table",
            lambda: measure_throughput(self.view, self.ds, self.task, extra),
        )
        mb = tput["max_batch_size"]
        if mb is None:
            raise UserError(
                f"no candidate batch size fits in memory ({tput['rows'][0]['reason']})",
                hint="lower config.throughput.min_batch_size or raise "
                "config.throughput.memory_budget_bytes",
            )
        factors = self.config.throughput.accumulation_factors
        factors = [f for f in factors if self.split_reason(int(f) * mb) is None]
        rows = add_accumulation_rows(tput["rows"], factors, mb)
        d = tput["table"]  # the TimingTable as measured (to_dict)
        timings = {t["batch_size"]: hardware.BatchTiming(**t) for t in d["batch_sizes"]}
        table = hardware.TimingTable(timings, d["rounds"], d["max_spread"])
        return mb, table, tput | {"rows": rows}

    def tradeoff(self, m: finder.Measured, sizes: list[int]) -> tuple[dict, dict]:
        """Trainings at ``sizes`` (``tradeoff.extra_seeds`` more seeds at the
        ``tradeoff.reseed_best`` fastest) in ``workdir/train/B<batch>-seed<seed>-<fp>``, each
        reused once finished: ``(fit of S(B), {batch: why it was skipped})``."""
        config, (max_batch, _, tput) = self.config, m.timed
        # Every rate from one noise scale, the recommendation's (as the compare mode's runs).
        times, b_noise = step_times(tput["rows"]), m.value[0]
        fps = self.fps["trainings"] = {}

        def train_at(b, seed_offset=0):
            seed_note = f" seed +{seed_offset}" if seed_offset else ""
            self.bar.set(phase=f"training B={b}{seed_note}")
            cfg, rule = training_config(config, b, b_noise, seed_offset)
            key = f"{b}/seed{cfg.seed}" if seed_offset else str(b)  # the first: the batch
            fp = fps[key] = training_fingerprint(cfg, self.mesh.size, self.data)
            p = self.st.get("trainings", key, fp)
            if p is None:
                run_dir = os.path.join(self.workdir, "train", f"B{b}-seed{cfg.seed}-{fp[:8]}")
                p = common.to_json(run_training(cfg, run_dir, rule))
                self.st.put("trainings", key, fp, p)
            return with_device_time([p], times, max_batch)[0]

        skipped = {}
        for b in sizes:
            why = self.split_reason(b)
            if why is None and b > max_batch:
                why = f"skipped: above the largest batch that fits ({max_batch})"
            if why is not None:
                logging.warning("The training at batch %d is %s.", b, why)
                skipped[str(b)] = why
        points = [train_at(b) for b in sizes if str(b) not in skipped]
        reseed = validation.reseed_batch_sizes(points, config.tradeoff.reseed_best)
        points += [
            train_at(b, k) for k in range(1, config.tradeoff.extra_seeds + 1) for b in reseed
        ]
        by_batch = validation.mean_over_seeds(points)
        fit = fit_tradeoff(points, config.tradeoff.num_bootstrap, config.seed)
        fit.update(by_batch=by_batch, reseeded=reseed if len(by_batch) < len(points) else [])
        return fit, skipped

    def run(self, trainings: bool, train_recommended: bool) -> dict:
        """Measurements, trainings (at :func:`train_batch_sizes`) and recommendations:
        ``sweep.json``, written."""
        config, bar = self.config, self.bar
        steps, state = pipeline_steps(config, self.ds, self.task)
        m = finder.pipeline(
            steps,
            state,
            pipeline_plan(config),
            time_fn=self.time,
            decide_fn=functools.partial(_decide, config, limits=self.limits),
            candidates=self.base,
            cache=self.cache,
            on_step=self.on_step,
            limits=self.limits,
        )
        bar.update(1)
        max_batch, _, tput = m.timed
        rows = tput["rows"]
        t0 = time.perf_counter()
        bar.set(phase="trainings" if trainings else "recommend")
        sizes = train_batch_sizes(config, [r["batch_size"] for r in rows if r["fits"]])
        if train_recommended:
            sizes = sorted({*sizes, m.recommendation.batch_size})
        fit, skipped = self.tradeoff(m, sizes if trainings else [])
        bar.update(1)
        self.t["trainings"] = time.perf_counter() - t0
        bar.set(phase="recommend")
        recommendations = _recommendations(config, m, fit, self.limits)
        bar.update(1)
        self.t["recommend"] = time.perf_counter() - t0 - self.t["trainings"]
        reached = {str(p["batch_size"]): p for p in fit["by_batch"] if p["reached"]}
        sweep = {
            "device": hardware.detect_devices().to_dict(),
            "mesh": mesh_lib.describe(self.mesh),
            "fingerprints": self.fps,
            "throughput": rows,
            "max_batch_size": max_batch,
            "max_batch_size_per_device": max_batch // self.mesh.size,
            "skipped_batch_sizes": {
                str(r["batch_size"]): r["reason"] for r in rows if r.get("skipped")
            },
            "skipped_trainings": skipped,
            "throughput_extended_to": m.extended_to,
            "noise_scale": m.noise,
            "tradeoff": fit,
            "time_to_target": ranking(fit["by_batch"]),
            "critical_batch": m.branched,
            **recommendations,
            # Device time (steps x t(B)), mean over seeds: comparable to the predicted S(B) t(B).
            "measured_time_to_target": {b: p[validation.DEVICE] for b, p in reached.items()},
            "measured_wall_time_to_target": {b: p["time_to_target_s"] for b, p in reached.items()},
            "reused": self.st.reused,
            "remeasured_after_config_change": self.st.stale,
            "stage_time_s": self.t,
            # What each stage cost when it was measured (also when reused): the price of gns.
            "measurement_cost_s": self.cost,
        }
        if trainings:
            sweep["validation"] = validation.validation(common.to_json(sweep))
        sweep["plots"] = figures.sweep_plots(common.to_json(sweep), self.workdir)
        runlog.write_json(os.path.join(self.workdir, SWEEP_FILE), sweep)
        return sweep


def main(_):
    sweep = run_sweep(flags.FLAGS.config, flags.FLAGS.workdir)
    print(report.sweep_summary(sweep))
    print(f"\nwrote {os.path.join(flags.FLAGS.workdir, SWEEP_FILE)}")


if __name__ == "__main__":
    cli.run(
        main,
        "configs/sweep.py",
        rules.describer(tasks.table),
        validate_config,
        workdir="sweep.json, plots and state",
    )
