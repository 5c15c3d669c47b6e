r"""The batch-size sweep: which batch size trains this model fastest on this device, and why.

Usage::

    python -m experiments.sweep --config configs/sweep.py:smoke --workdir /tmp/sweep_smoke
    python -m experiments.sweep --config configs/sweep.py:cpu --workdir runs/sweep \
      --config.train.data.source=folder \
      --config.train.data.path=../shared/data/cifar10-jpeg.tar.gz

On the model and data of ``config.train`` (a ``configs/cifar10.py`` config) it

1. **measures the noise scale along a pilot**: trains ``noise.pilot_steps`` steps at
   ``train.batch_size``, measuring ``|G|²`` and ``tr(Σ)`` every ``noise.every`` steps
   (:mod:`gns.estimate`): ``noise_scale.trajectory`` (``noise.num_stretches`` stretches, each
   ``b_simple`` with its interval) and ``noise_scale.effective``, the effective noise scale
   for a run to the end of the pilot (:func:`gns.finder.noise_evidence`); after
   ``noise.warmup_steps`` steps it also estimates the early ``b_simple`` on
   ``noise.num_batches`` independent batches with a bootstrap interval
   (:func:`gns.smoothing.interval`);
   **and the branched critical batch**: forks from ``critical.num_checkpoints`` states of the
   pilot (kept in memory, or replayed exactly) at ``train.batch_size·2^j``
   (:func:`gns.finder.branch`, :func:`gns.critical.branched_critical_batch`):
   ``critical_batch.checkpoints`` and its path average ``critical_batch.effective``;
2. **sweeps step time and memory** of the **global** batch on the mesh of training
   (:mod:`experiments.mesh`, all devices by default; per device ``B / devices``, a ``B`` that
   does not split evenly is skipped with the reason in its row; memory per device, so the
   largest batch that fits is per device x devices; ``sweep.json`` records ``mesh``):
   predicts the memory of powers of two up to the largest
   batch that fits (:mod:`gns.hardware`: from the compiled step, confirmed by running it), then
   times all of them, the trained batch sizes and ``train.batch_size`` in **one interleaved
   table** (round-robin over the batch sizes, several rounds, median, noisy ones re-timed:
   :func:`gns.finder.time_candidates`; a load that comes and goes hits every batch size
   alike); batches above the largest that fits are gradient accumulation (``k × t(B/k)``);
3. **runs short trainings** to ``tradeoff.target_accuracy`` at several batch sizes, the
   learning rate scaled from ``train.learning_rate`` at ``train.batch_size`` by the rule of
   :func:`gns.recommend.scale_learning_rate`, and fits ``S(B) = S_min + E_min/B``
   (:func:`gns.tradeoff.fit`). Time to target is reported two ways: the wall clock of the run
   (``time_to_target_s``, training time only) and ``steps_to_target(B) × t(B)`` with ``t(B)``
   from the table (``device_time_to_target_s``). Rankings and ratios use the second, which
   another process on a shared machine cannot skew from one run to the next;
4. **recommends** a batch size and learning rate (:func:`gns.recommend.recommend`) on the best
   evidence measured (:func:`gns.finder.choose_basis`: branched > trajectory > b_simple):
   ``recommendation.basis`` names it, ``recommendation.basis_note`` says why a better one was
   not used, ``recommendation.evidence`` holds every measured value with its ratio to the
   basis. (The trainings' learning rates scale with the early ``b_simple``.)

It writes ``DIR/sweep.json`` (every number above; strict JSON, a non-finite number as ``null``:
an interval end of ``null`` is unbounded, a ``b_simple`` of ``null`` is ``+inf`` when the pooled
``g_sq`` is not positive; ``time_to_target`` ranks the trainings by device time, and
``measured_time_to_target``/``measured_wall_time_to_target`` give both times per batch),
``DIR/throughput.png``, ``DIR/tradeoff.png`` and ``DIR/time_to_target.png`` (``plots`` in
``sweep.json``: each path, or why it was not drawn, e.g. no tradeoff chart without trainings),
and prints a summary table; the trainings' TensorBoard runs are ``DIR/train/*``. Off a terminal
it logs its stage every few seconds (:mod:`experiments.progress`).
Each finished measurement is kept in ``DIR/sweep_state.json`` with the
fingerprint of exactly the config fields its stage reads (:data:`STAGE_FIELDS`): re-running
the same command after an interruption reuses them and only measures what is missing, and a
change to a field a stage never reads keeps its measurement. A training interrupted with
Ctrl-C resumes from its checkpoint in ``DIR/train/B<batch>-seed<seed>-<fingerprint>``.
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

import contextlib
import copy
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import (
    cli,
    data,
    figures,
    models,
    progress,
    rules,
    runlog,
    tasks,
    train,
    validation,
)
from experiments import mesh as mesh_lib
from experiments.cli import UserError
from gns import critical, estimate, finder, hardware, plots, recommend, smoothing, tradeoff

FLAGS = flags.FLAGS
STATE_FILE = "sweep_state.json"
SWEEP_FILE = "sweep.json"
METRICS_FILE = "metrics.jsonl"

__all__ = [
    "STAGE_FIELDS",
    "stage_config",
    "stage_fingerprint",
    "validate_config",
    "SweepState",
    "candidate_batch_sizes",
    "training_config",
    "training_dir",
    "with_device_time",
    "rank_time_to_target",
    "run_sweep",
    "summary_table",
]

# The config fields each stage reads, and nothing else: a stage gets only these
# (:func:`stage_config`), and its cached result is keyed by their fingerprint. The throughput
# stage times the step from seed 0 at a constant learning rate (the time of a step does not
# depend on the values of the parameters or of the rate), so neither is among its fields.
# ``tradeoff.max_steps`` is the horizon of the schedule the noise stage warms up with.
TRAIN_SETUP = (
    "model data optimizer momentum nesterov weight_decay gns_method gns_microbatches dtype"
)


def _fields(**sections: str) -> tuple[str, ...]:
    """``_fields(train="a b", noise="")`` -> ``("train.a", "train.b", "noise")``."""
    return tuple(f"{s}.{f}" if f else s for s, fs in sections.items() for f in fs.split() or [""])


PILOT_TRAIN = TRAIN_SETUP + " seed batch_size learning_rate schedule warmup_steps"
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "noise_scale": _fields(train=PILOT_TRAIN, tradeoff="max_steps", noise=""),
    # The forks start from the pilot's states: they depend on what shapes the pilot's path
    # (its training setup, its length, which of its steps measure) and on ``critical``.
    "critical_batch": _fields(
        train=PILOT_TRAIN, tradeoff="max_steps", noise="warmup_steps pilot_steps every", critical=""
    ),
    # On the mesh (experiments.mesh): its record is part of this stage's key (run_sweep).
    "throughput": _fields(
        train=TRAIN_SETUP + " batch_size num_devices",
        tradeoff="batch_sizes",
        throughput="min_batch_size max_batch_size memory_budget_bytes warmup repeats",
    ),
}
TIMING_SEED, TIMING_LEARNING_RATE = 0, 1e-3
PILOT_FIELDS = _fields(
    train=PILOT_TRAIN, tradeoff="max_steps", noise="warmup_steps pilot_steps every"
)

# Fields of the pilot and of the branched stage that configs made before them lack (the
# ``compare`` modes' ``configs/cifar10.py`` sections): a pilot as long as the warm-up, measured
# at every step, and no branching.
PATH_DEFAULTS: dict[str, Any] = {
    "train.dtype": "float32",
    "train.num_devices": None,
    "noise.pilot_steps": None,
    "noise.every": 1,
    "noise.num_stretches": 3,
    "tradeoff.extra_seeds": 0,
    "tradeoff.reseed_best": 3,
    "critical": {
        "num_checkpoints": 0, "exponents": (-1, 0, 1, 2), "fork_steps": 8, "num_repeats": 2,
        "eval_examples": 512, "confidence": 0.9, "seed_offset": 7,
    },
}  # fmt: skip


def _get_path(config, path: str):
    node = config
    try:
        for part in path.split("."):
            node = node[part]
    except (KeyError, AttributeError):
        for prefix, default in PATH_DEFAULTS.items():
            if path == prefix or path.startswith(prefix + "."):
                node = copy.deepcopy(default)
                for part in path[len(prefix) + 1 :].split(".") if path != prefix else []:
                    node = node[part]
                return node
        raise
    return node


def stage_config(config, stage: str) -> ml_collections.ConfigDict:
    """The part of ``config`` that ``stage`` reads (:data:`STAGE_FIELDS`), as a ConfigDict.

    Example:
      >>> from configs import sweep as sweep_config
      >>> view = stage_config(sweep_config.get_config("smoke"), "noise_scale")
      >>> sorted(view.keys()), "eval_every" in view.train
      (['noise', 'tradeoff', 'train'], False)
    """
    out: dict[str, Any] = {}
    for path in STAGE_FIELDS[stage]:
        *parents, last = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        value = _get_path(config, path)
        node[last] = value.to_dict() if hasattr(value, "to_dict") else copy.deepcopy(value)
    for path, default in PATH_DEFAULTS.items():  # a whole section: its fields added since
        *parents, last = path.split(".")
        if ".".join(parents) in STAGE_FIELDS[stage]:
            section = out
            for p in parents:
                section = section[p]
            section.setdefault(last, copy.deepcopy(default))
    return ml_collections.ConfigDict(out)


def stage_fingerprint(config, stage: str, mesh: dict | None = None) -> str:
    """:func:`experiments.runlog.fingerprint` of :func:`stage_config` (and, for the stage that
    runs on the mesh, ``throughput``, of the ``mesh`` record when given: a table timed on
    another set of devices is not reused)."""
    view = stage_config(config, stage).to_dict()
    if mesh is not None and stage == "throughput":
        view = {"config": view, "mesh": mesh}
    return runlog.fingerprint(view)


# ---------------------------------------------------------------------------------------------
# Validation: every field the sweep itself reads, before anything runs or is written.


def validate_config(config) -> None:
    """Check every field of a ``configs/sweep.py`` config (the table of
    :mod:`experiments.rules`, with the device count: ``train.batch_size`` and
    ``noise.batch_size`` must split over the mesh), before anything runs or is written.

    Raises:
      UserError: naming the field (as on the command line), its value and the fix.
    """
    rules.check(config, "sweep")  # every field, num_devices included, then the mesh's size
    rules.check(config, "sweep", mesh_lib.make_mesh(config.train.num_devices).size)


# ---------------------------------------------------------------------------------------------
# Persistent state: one JSON file, rewritten atomically after every finished measurement.


class SweepState:
    """Finished measurements of a sweep, persisted in ``workdir/sweep_state.json``.

    Each item (``noise_scale/value``, ``throughput/table``, ``trainings/<batch>``) carries the
    fingerprint of the config it was measured under: an item measured under another config is
    not reused, and is replaced by the new measurement. :meth:`put` rewrites the file
    atomically (:func:`experiments.runlog.write_json`), so a killed sweep loses at most the
    measurement in progress.
    """

    VERSION = 2

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, STATE_FILE)
        self.data: dict[str, Any] = {"version": self.VERSION, "sections": {}}
        if os.path.exists(self.path):
            try:
                old = runlog.read_json(self.path)
            except ValueError:
                old = {}
            if old.get("version") == self.VERSION:
                self.data = old
            else:
                logging.warning("Ignoring %s: not a sweep state of this version.", self.path)
        self.reused: list[str] = []
        self.stale: list[str] = []

    def get(self, section: str, key, fp: str):
        """The stored value of ``section[key]`` if it was measured under fingerprint ``fp``."""
        item = self.data["sections"].get(section, {}).get(str(key))
        name = f"{section}[{key}]"
        if item is None:
            return None
        if item["fingerprint"] != fp:
            if section not in self.stale:
                self.stale.append(section)
                logging.info("The config of %s changed: measuring it again.", name)
            return None
        self.reused.append(name)
        return copy.deepcopy(item["value"])  # callers may annotate it; the record stays

    def put(self, section: str, key, fp: str, value) -> None:
        items = self.data["sections"].setdefault(section, {})
        items[str(key)] = {"fingerprint": fp, "value": copy.deepcopy(value)}
        runlog.write_json(self.path, self.data)


# ---------------------------------------------------------------------------------------------
# Stage 1: the noise scale.


def _setup(t, ds, schedule, *, both: bool = False, mesh=None):
    """Model, plain train step and initial state of the training setup ``t`` (with ``both``:
    model, plain step, measuring step, state); with ``mesh`` the steps are the data-parallel
    ones of :func:`experiments.train.make_train_steps` and the state is replicated on it."""
    model = models.get_model(t.model, num_classes=ds.num_classes, dtype=t.dtype)
    optimizer = train.make_optimizer(t, schedule)
    tracker = smoothing.ema()
    plain_fn, gns_fn = train.make_train_steps(
        model,
        optimizer,
        tracker,
        method=train.resolve_gns_method(t, model, 1 if mesh is None else mesh.size),
        num_microbatches=int(t.gns_microbatches),
        use_dropout=models.uses_dropout(model),
        schedule=schedule,
        mesh=mesh,
    )
    shape = tuple(ds.train_images.shape[1:])
    state = train.init_state(t, model, optimizer, tracker, shape, mesh=mesh)
    return (model, plain_fn, gns_fn, state) if both else (model, plain_fn, state)


def pilot_length(noise) -> int:
    """Steps of the pilot: ``noise.pilot_steps`` (``None``: the warm-up), at least the
    warm-up."""
    return max(int(noise.pilot_steps or 0), int(noise.warmup_steps))


def checkpoint_steps(num_steps: int, num_checkpoints: int) -> list[int]:
    """:func:`gns.finder.checkpoint_steps` (the middles of equal stretches of the pilot)."""
    return finder.checkpoint_steps(num_steps, num_checkpoints)


_PILOT_STATES: dict[str, dict[int, Any]] = {}  # pilot fingerprint -> {step: state}, in-process


def _pilot_key(view) -> str:
    return runlog.fingerprint({p: _get_path(view, p) for p in PILOT_FIELDS})


def run_pilot(view, ds, *, keep_steps=(), on_step=None) -> tuple[list[dict], dict[int, Any]]:
    """The pilot: ``pilot_length`` steps at ``train.batch_size`` from seed ``train.seed``, the
    measuring step (:mod:`gns.estimate`, ``train.gns_method``) every ``noise.every`` steps and
    the plain step otherwise. Deterministic: a replay gives the same states (CPU).

    Args:
      view: a stage view with the :data:`PILOT_FIELDS`.
      ds: the dataset.
      keep_steps: steps after which to keep the state (in memory, also in ``_PILOT_STATES``).
      on_step: ``on_step(step, state)`` called at step 0 and after every step (e.g. the
        independent-batch measurement after the warm-up).

    Returns:
      ``(rows, {step: state})``: rows ``step``, ``g_sq``, ``trace_cov``, ``b_simple`` and the
      EMA values of the measured steps.
    """
    t, noise = view.train, view.noise
    n_steps, every = pilot_length(noise), max(1, int(noise.every))
    _, plain_fn, gns_fn, state = _setup(
        t, ds, train.make_schedule(t, view.tradeoff.max_steps), both=True
    )
    plain, meas = jax.jit(plain_fn), jax.jit(gns_fn)
    rows, kept, wanted = [], {}, set(keep_steps)
    batches = data.train_batches(ds, t.batch_size, seed=t.seed, augment=t.data.augment)
    try:
        if on_step is not None:
            on_step(0, state)
        for i in range(1, n_steps + 1):
            if i % every == 0:
                state, m = meas(state, next(batches))
                m = jax.device_get(m)
                keys = ("g_sq", "trace_cov", "b_simple", "ema_g_sq", "ema_trace_cov")
                rows.append({"step": i} | {k: float(m[k]) for k in (*keys, "ema_b_simple")})
            else:
                state, _ = plain(state, next(batches))
            if i in wanted:
                kept[i] = state
            if on_step is not None:
                on_step(i, state)
    finally:
        batches.close()
    if kept:
        _PILOT_STATES[_pilot_key(view)] = kept
    return rows, kept


def measure_noise_scale(view, ds, keep_steps=()) -> dict:
    """Stage 1: the pilot, and ``b_simple`` on independent batches after its warm-up.

    The pilot (:func:`run_pilot`) trains ``pilot_length`` steps at ``train.batch_size``,
    measuring every ``noise.every`` steps; its measurements give the noise scale along the path
    (``trajectory``: ``noise.num_stretches`` stretches, and ``effective``:
    :func:`gns.finder.noise_evidence`). After ``noise.warmup_steps`` steps, ``b_simple`` is
    estimated on ``noise.num_batches`` independent batches (the early single value).

    Args:
      view: :func:`stage_config` of ``noise_scale``.
      ds: the dataset (:func:`experiments.data.load`).
      keep_steps: pilot steps whose states the ``critical_batch`` stage forks from (kept in
        memory; they do not change the measurement).
    """
    t, noise = view.train, view.noise
    t0 = time.perf_counter()
    model = models.get_model(t.model, num_classes=ds.num_classes)
    mcfg = copy.deepcopy(t)
    mcfg.gns_method = noise.method
    method = train.resolve_gns_method(mcfg, model)
    rng = jax.random.PRNGKey(t.seed) if models.uses_dropout(model) else None

    @jax.jit
    def measure(params, batch_stats, batch):
        n = batch["label"].shape[0]
        batch = {"image": batch["image"], "label": batch["label"], "index": jnp.arange(n)}
        loss_fn = train.make_loss_fn(model, batch_stats, rng)
        if method == "per_example":
            stats, _, _ = estimate.per_example(
                loss_fn, params, batch, chunk_size=noise.chunk_size, has_aux=True
            )
        else:
            stats, _, _ = estimate.microbatch(
                loss_fn, params, batch, num_microbatches=t.gns_microbatches, has_aux=True
            )
        return stats.g_sq, stats.trace_cov, stats.b_simple

    per_batch = []

    def after_warmup(step, state):
        if step != noise.warmup_steps:
            return
        batches = data.train_batches(ds, noise.batch_size, seed=t.seed + 1, augment=t.data.augment)
        try:
            for _ in range(noise.num_batches):
                g, tc, b = measure(state.params, state.batch_stats, next(batches))
                per_batch.append({"g_sq": float(g), "trace_cov": float(tc), "b_simple": float(b)})
        finally:
            batches.close()

    rows, _ = run_pilot(view, ds, keep_steps=keep_steps, on_step=after_warmup)
    n_steps = pilot_length(noise)
    try:
        path = finder.noise_evidence(
            rows, int(t.batch_size), num_stretches=int(noise.num_stretches), end_step=n_steps,
            confidence=float(noise.confidence), seed=int(t.seed),
        )  # fmt: skip
        trajectory, effective = path["trajectory"].rows(), path["effective"].to_dict()
    except ValueError as e:  # fewer than 2 finite measurements along the path
        trajectory, effective = [], {"value": None, "basis": "none", "note": str(e)}
    pilot = {"steps": n_steps, "every": int(noise.every), "batch_size": int(t.batch_size)}
    pilot["rows"] = [{k: r[k] for k in ("step", "g_sq", "trace_cov")} for r in rows]

    g_sq = np.array([p["g_sq"] for p in per_batch])
    trace_cov = np.array([p["trace_cov"] for p in per_batch])
    finite = np.isfinite(g_sq) & np.isfinite(trace_cov)
    if finite.sum() < 2:
        raise UserError(
            f"the noise scale could not be measured: {int(finite.sum())} of {len(per_batch)} "
            f"batches gave finite statistics after {noise.warmup_steps} warm-up steps (the "
            "training diverged or the gradients overflow)",
            hint="lower config.train.learning_rate or config.noise.warmup_steps",
        )
    pooled = smoothing.interval(
        g_sq, trace_cov, confidence=noise.confidence, block_size=1, seed=t.seed
    )
    return {
        "b_simple": pooled.estimate,
        "interval": [pooled.low, pooled.high],
        "confidence": float(noise.confidence),
        "g_sq": float(np.mean(g_sq[finite])),
        "trace_cov": float(np.mean(trace_cov[finite])),
        "per_batch": per_batch,
        "batch_size": int(noise.batch_size),
        "num_batches": int(noise.num_batches),
        "num_used": pooled.n,  # the finite ones; the others are dropped and counted
        "num_nonfinite_dropped": pooled.nonfinite_dropped,
        "method": method,
        "after_warmup_steps": int(noise.warmup_steps),
        "trajectory": trajectory,
        "effective": effective,
        "pilot": pilot,
        "time_s": time.perf_counter() - t0,
    }


def measure_critical_batch(view, ds, b_noise: float = math.inf) -> dict:
    """Stage 1b: the branched critical batch at ``critical.num_checkpoints`` states of the pilot.

    From each checkpoint (the pilot's state at the middle of equal stretches, held in memory by
    the noise stage or replayed exactly by :func:`run_pilot`), forks at ``train.batch_size·2^j``
    (``critical.exponents``), the learning rate scaled by the rule of
    :func:`gns.recommend.scale_learning_rate` (:func:`gns.critical.lr_multipliers`; for SGD
    with ``b_noise``, the early ``b_simple`` the trainings scale with; ``inf``: linear), each
    for ``critical.fork_steps`` steps of the largest fork's batch in examples,
    ``critical.num_repeats`` repeats on disjoint data of one stream, evaluated on a fixed
    random subset of ``critical.eval_examples`` test images (:func:`gns.finder.branch`).

    Returns:
      ``{"checkpoints": [], "effective": None, "note"}`` when ``critical.num_checkpoints`` is
      0, else ``{"checkpoints": [rows with step,
      b_crit, low, high, b_tolerance, resolved, cost_fraction], "effective": the path average
      of the resolved checkpoints, "points": every fork result, "cost_fraction": examples forked
      / pilot examples, "replayed_pilot": bool, ...}``.
    """
    t, ccfg = view.train, view.critical
    if int(ccfg.num_checkpoints) <= 0:
        return {"checkpoints": [], "effective": None, "note": "not measured: "
                "critical.num_checkpoints = 0 (set it to branch from the pilot)"}  # fmt: skip
    t0 = time.perf_counter()
    n_steps = pilot_length(view.noise)
    steps = checkpoint_steps(n_steps, ccfg.num_checkpoints)
    states = _PILOT_STATES.get(_pilot_key(view), {})
    replayed = not set(steps) <= set(states)
    if replayed:  # the noise stage ran in another process: replay the pilot (deterministic)
        _, states = run_pilot(view, ds, keep_steps=steps)
    schedule = train.make_schedule(t, view.tradeoff.max_steps)
    model, _, template = _setup(t, ds, schedule)
    steps_by_mult: dict[float, Any] = {}

    def make_step(size, mult):
        if mult not in steps_by_mult:
            tm = copy.deepcopy(t)
            tm.learning_rate = float(t.learning_rate) * mult
            plain_fn = _setup(tm, ds, train.make_schedule(tm, view.tradeoff.max_steps))[1]
            steps_by_mult[mult] = lambda state, batch: plain_fn(state, batch)[0]
        return steps_by_mult[mult]

    seed = int(t.seed) + int(ccfg.seed_offset)

    def batch_fn(size, index):  # one shuffled stream, the same order at every batch size
        return data.train_batch(ds, size, seed=seed, step=index, augment=t.data.augment)

    # A fixed random subset of the test set (the trainings' own, for the same size): the
    # test split is stored class by class, so its first images are all of one class.
    idx = tasks.subset(len(ds.test_labels), int(ccfg.eval_examples), 1)
    n_eval = len(idx)
    images = jnp.asarray(data.normalize(ds.test_images[idx], ds.mean, ds.std))
    labels, mask = jnp.asarray(ds.test_labels[idx]), jnp.ones((n_eval,), jnp.float32)
    eval_step = jax.jit(train.make_eval_step(model))

    def eval_fn(state):
        return eval_step(state.params, state.batch_stats, images, labels, mask)[1] / n_eval

    critical.check_state(states[steps[0]], template, name=f"pilot state at step {steps[0]}")
    b_ref = int(t.batch_size)
    exps = [int(e) for e in ccfg.exponents]
    n_fork = int(ccfg.fork_steps) * b_ref * 2 ** max(exps)
    out = finder.branch(
        {s: states[s] for s in steps}, make_step, batch_fn, eval_fn, ref_batch_size=b_ref,
        end_step=n_steps, num_examples=n_fork, exponents=exps,
        lr_multiplier=lambda b: critical.lr_multipliers(b_ref, [b], t.optimizer, b_noise)[0],
        num_repeats=int(ccfg.num_repeats), pilot_examples=n_steps * b_ref,
        confidence=float(ccfg.confidence), seed=int(t.seed),
    )  # fmt: skip
    forked = sum(p.examples_forked for p in out["points"])
    return {
        "checkpoints": finder.checkpoint_rows(out["steps"], out["points"]),
        "effective": out["effective"].to_dict(),
        "points": [p.to_dict() for p in out["points"]],
        "batch_sizes": [int(b_ref * 2.0**e) for e in exps],
        "examples_per_fork": n_fork,
        "examples_forked": forked,
        "pilot_examples": n_steps * b_ref,
        "cost_fraction": forked / (n_steps * b_ref),
        "replayed_pilot": replayed,
        "time_s": time.perf_counter() - t0,
    }


def critical_fingerprint(config, b_noise: float) -> str:
    """The key of the branched stage's cached result: :func:`stage_fingerprint`, with
    ``b_noise`` folded in where the forks' learning-rate rule uses it (SGD: the McCandlish rule
    with the early ``b_simple``, as the trainings), so a new noise scale forks again.

    Example:
      >>> from configs import sweep as sweep_config
      >>> c = sweep_config.get_config("smoke")  # Adam: square-root rule, no noise scale
      >>> critical_fingerprint(c, 100.0) == stage_fingerprint(c, "critical_batch")
      True
    """
    fp, t = stage_fingerprint(config, "critical_batch"), config.train
    sizes = [int(t.batch_size * 2.0**e) for e in _get_path(config, "critical.exponents")]
    rule = critical.lr_multipliers(t.batch_size, sizes, t.optimizer, b_noise)
    if rule == critical.lr_multipliers(t.batch_size, sizes, t.optimizer):
        return fp
    return runlog.fingerprint({"fields": fp, "lr_rule_b_noise": b_noise})


def _effective_from_json(d: dict | None):
    """A stored :class:`gns.critical.EffectiveNoiseScale` dict back as the NamedTuple (strict
    JSON stores non-finite numbers as ``null``: a missing high end is ``+inf``)."""
    if not d or d.get("value") is None and d.get("basis") == "none" and "s_min" not in d:
        return None

    def num(x, default=math.nan):
        return default if x is None else x

    fields = dict(d)
    fields.update(value=num(d["value"]), low=num(d["low"]), high=num(d["high"], math.inf))
    fields.update(s_min=num(d["s_min"]), e_min=num(d["e_min"]), weights=np.asarray(d["weights"]))
    return critical.EffectiveNoiseScale(**fields)


def noise_scale_value(noise: dict) -> float:
    """``b_simple`` of a noise-scale record as a float. Strict JSON stores a non-finite value
    as ``null``; read back, it is ``+inf`` when the pooled ``g_sq`` is not positive (the
    gradient is not resolved above the noise), else ``nan``."""
    if noise["b_simple"] is not None:
        return float(noise["b_simple"])
    return math.inf if noise["g_sq"] is not None and noise["g_sq"] <= 0 else math.nan


# ---------------------------------------------------------------------------------------------
# Stage 2: memory and the one interleaved timing table.


def candidate_batch_sizes(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` (rounded up to one) to ``hi``."""
    if not 1 <= lo <= hi:
        raise UserError(
            f"need 1 <= min_batch_size <= max_batch_size, got {lo}, {hi}",
            hint="set --config.throughput.min_batch_size / max_batch_size",
        )
    return [1 << e for e in range(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1)]


def measure_throughput(view, ds, extra=()) -> dict:
    """Stage 2: memory of each candidate, then one interleaved timing table, on the mesh.

    The candidates are **global** batch sizes: the powers of two of ``view.throughput`` plus
    ``train.batch_size`` and the fixed ``tradeoff.batch_sizes`` (so that every trained batch
    has its ``t(B)`` from the same table). The step is the data-parallel one of training
    (:mod:`experiments.mesh`: ``train.num_devices`` devices, all by default), each device
    holding ``B / devices`` examples; a candidate that does not split evenly over the devices
    is skipped, with the reason in its row. Memory is per device (XLA's analysis of the
    partitioned step, against a per-device budget: ``throughput.memory_budget_bytes``, or the
    device's memory, or on CPU half the available host RAM shared by the simulated devices),
    so the largest global batch that fits is the largest per-device batch times the devices.
    Each is predicted against the memory budget and confirmed by running
    (:func:`gns.hardware.largest_batch_that_fits`); those that fit are timed round-robin,
    ``throughput.repeats`` rounds after ``throughput.warmup`` untimed rounds, and a batch whose
    relative interquartile range stays above 10% gets extra rounds
    (:func:`gns.finder.time_candidates`, :func:`gns.hardware.time_batch_sizes`), reusing the
    executables compiled for the prediction.

    Returns:
      ``{"rows": [...], "max_batch_size": int | None, "max_batch_size_per_device": int |
      None, "mesh": dict}``: one row per candidate, ascending, with ``batch_size`` (global),
      ``per_device_batch_size``, ``fits``, ``predicted_bytes`` (per device), ``budget_bytes``,
      ``budget_source``, ``reason``, ``step_time_s`` (median), ``step_time_iqr_s``,
      ``times_s`` (one per round), ``extra_rounds`` (re-timing rounds), ``stable`` and
      ``examples_per_s`` (global); ``mesh`` is :func:`experiments.mesh.describe`.
    """
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    timing, t = view.throughput, copy.deepcopy(view.train)
    t.seed = TIMING_SEED
    mesh = mesh_lib.make_mesh(t.num_devices)
    n = mesh.size
    schedule = optax.constant_schedule(TIMING_LEARNING_RATE)
    _, plain_fn, state = _setup(t, ds, schedule, mesh=mesh)
    # The batch sharded over the devices, the state replicated: what XLA compiles (and its
    # memory analysis counts) is one device's part of the step.
    step = jax.jit(
        plain_fn, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh_lib.AXIS)))
    )
    image_shape = tuple(ds.train_images.shape[1:])
    cands = set(candidate_batch_sizes(timing.min_batch_size, timing.max_batch_size))
    cands |= {
        b for b in [t.batch_size, *(view.tradeoff.batch_sizes or ())] if b <= timing.max_batch_size
    }
    cands |= {int(b) for b in extra}  # the range extended past an end (``run_sweep``)
    skipped = {b: mesh_lib.split_reason(b, mesh) for b in cands}
    skipped = {b: why for b, why in skipped.items() if why}

    def make_args(b):  # traceable: under jax.eval_shape it allocates nothing
        images = jnp.zeros((b,) + image_shape, jnp.float32)
        return state, {"image": images, "label": jnp.zeros((b,), jnp.int32)}

    def placed_args(b):  # the timed batch on the devices, split as in training
        batch = {"image": np.zeros((b,) + image_shape, np.float32), "label": np.zeros(b, np.int32)}
        return state, mesh_lib.shard(batch, mesh)

    budget, budget_source = timing.memory_budget_bytes, None
    if budget is None and mesh.devices.flat[0].platform == "cpu" and n > 1:
        budget, budget_source = _shared_host_budget(n)
    timed = sorted(cands - set(skipped))
    res, table = finder.time_candidates(
        step, placed_args, timed, memory_budget_bytes=budget, rounds=timing.repeats,
        warmup=timing.warmup, make_shape_args=make_args,
    ) if timed else (None, None)  # fmt: skip
    timings = {} if table is None else table.timings
    rows = []
    for rec in [] if res is None else res.records:
        row = rec.to_dict() | {
            "budget_source": budget_source or res.budget_source,
            "accumulation_steps": 1,
            "per_device_batch_size": rec.batch_size // n,
        }
        bt = timings.get(rec.batch_size)
        row.update(
            step_time_s=None if bt is None else bt.median_s,
            step_time_iqr_s=None if bt is None else bt.q75_s - bt.q25_s,
            times_s=[] if bt is None else list(bt.times_s),
            extra_rounds=None if bt is None else bt.extra_rounds,
            stable=None if bt is None else bt.stable,
            examples_per_s=None if bt is None else rec.batch_size / bt.median_s,
        )
        rows.append(row)
    for b, why in skipped.items():
        rows.append(
            {"batch_size": b, "per_device_batch_size": None, "predicted_bytes": None,
             "budget_bytes": None if res is None else res.budget_bytes, "fits": False,
             "confirmed": False, "reason": why, "budget_source": None, "accumulation_steps": 1,
             "step_time_s": None, "step_time_iqr_s": None, "times_s": [], "extra_rounds": None,
             "stable": None, "examples_per_s": None, "skipped": True}
        )  # fmt: skip
    max_b = None if res is None else res.max_batch_size
    return {
        "rows": sorted(rows, key=lambda r: r["batch_size"]),
        "max_batch_size": max_b,
        "max_batch_size_per_device": None if max_b is None else max_b // n,
        "mesh": mesh_lib.describe(mesh),
    }


def _shared_host_budget(num_devices: int) -> tuple[int, str]:
    """The per-device memory budget of ``num_devices`` simulated CPU devices: their share of
    the default CPU budget (:data:`gns.hardware.DEFAULT_CPU_BUDGET_FRACTION` of the available
    host RAM), since they all allocate from the one host."""
    import psutil

    frac = hardware.DEFAULT_CPU_BUDGET_FRACTION
    budget = int(frac * psutil.virtual_memory().available / num_devices)
    return budget, f"{round(100 * frac)}% of available host RAM / {num_devices} devices"


def add_accumulation_rows(rows: list[dict], factors, max_batch: int) -> list[dict]:
    """``rows`` plus the batches ``factor × max_batch`` timed as gradient accumulation
    (:func:`gns.hardware.accumulated_step_time` on the measured table)."""
    rows = [dict(r) for r in rows]
    times = step_times(rows)
    for factor in factors:
        b = int(factor) * max_batch
        row = next((r for r in rows if r["batch_size"] == b), None)
        if row is None:
            row = {"batch_size": b, "fits": False, "predicted_bytes": None, "reason": ""}
            rows.append(row)
        t, k, micro = hardware.accumulated_step_time(times, b, max_batch)
        note = f"timed as gradient accumulation {k} x {micro}"
        row.update(
            accumulation_steps=k,
            micro_batch_size=micro,
            step_time_s=t,
            examples_per_s=b / t,
            reason="; ".join(x for x in (row.get("reason"), note) if x),
        )
    return sorted(rows, key=lambda r: r["batch_size"])


def step_time_ranges(rows: list[dict]) -> dict[int, tuple[float, float]]:
    """``{batch: (q25, q75)}`` of the timed rows that fit: the spread the recommendation's
    ``plausible_batch_sizes`` allows for."""
    return {
        r["batch_size"]: tuple(float(q) for q in np.quantile(r["times_s"], [0.25, 0.75]))
        for r in rows
        if r["fits"] and r["step_time_s"] and r.get("times_s")
    }


def step_times(rows: list[dict]) -> dict[int, float]:
    """``{batch: median seconds per step}`` of the timed rows that fit."""
    return {r["batch_size"]: r["step_time_s"] for r in rows if r["fits"] and r["step_time_s"]}


# ---------------------------------------------------------------------------------------------
# Stage 3: trainings to the target, and time to target two ways.


def training_config(
    config, batch_size: int, b_noise: float, seed_offset: int = 0
) -> tuple[Any, str]:
    """The training config of the run at ``batch_size``: ``config.train`` with the scaled
    learning rate, the target and the caps of ``config.tradeoff``, evaluation every
    ``tradeoff.eval_every_examples`` examples, seed ``train.seed + seed_offset`` (its
    fingerprint keys the cached result), and the learning-rate rule in words."""
    t, tr = config.train, config.tradeoff
    lr, rule = recommend.scale_learning_rate(
        t.learning_rate, t.batch_size, batch_size, b_noise, t.optimizer
    )
    cfg = copy.deepcopy(t)
    eval_every = max(1, round(tr.eval_every_examples / batch_size))
    cfg.update(batch_size=int(batch_size), learning_rate=float(lr), num_epochs=None)
    if seed_offset:
        cfg.seed = int(t.seed) + int(seed_offset)
    cfg.update(num_steps=tr.max_steps, max_wall_time_s=tr.max_wall_time_s)
    cfg.update(target_accuracy=tr.target_accuracy, eval_every=eval_every, log_every=eval_every)
    return cfg, rule


def training_dir(workdir: str, cfg, fingerprint: str) -> str:
    """``workdir/train/B<batch>-seed<seed>-<fingerprint[:8]>``: the directory of one training
    (and its run name in ``tensorboard --logdir workdir``)."""
    return os.path.join(workdir, "train", f"B{cfg.batch_size}-seed{cfg.seed}-{fingerprint[:8]}")


def run_training(cfg, workdir: str, lr_rule: str) -> dict:
    """Stage 3 for one batch: train ``cfg`` to its target; steps and wall-clock time to it
    (``None`` if missed) and the test-accuracy curve."""
    summary = train.train_and_evaluate(cfg, workdir)
    evals = [
        r for r in runlog.read_jsonl(os.path.join(workdir, METRICS_FILE)) if "test_accuracy" in r
    ]
    steps = tradeoff.steps_to_target(
        [r["step"] for r in evals], [r["test_accuracy"] for r in evals], cfg.target_accuracy
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
        "curve": [[r["step"], r["test_accuracy"]] for r in evals],
    }


def with_device_time(points: list[dict], times: dict[int, float], max_batch: int) -> list[dict]:
    """Copies of ``points`` with ``step_time_s`` (``t(B)`` from the timing table; gradient
    accumulation above ``max_batch``) and ``device_time_to_target_s = steps × t(B)``
    (``None`` for a point that missed the target).

    Example:
      >>> with_device_time([{"batch_size": 32, "steps": 100}], {32: 0.02}, 32)[0][
      ...     "device_time_to_target_s"]
      2.0
    """
    out = []
    for p in points:
        t = hardware.accumulated_step_time(times, p["batch_size"], max_batch)[0]
        steps = p.get("steps")
        out.append(
            p | {"step_time_s": t, "device_time_to_target_s": None if steps is None else steps * t}
        )
    return out


def rank_time_to_target(points: list[dict], key: str = "device_time_to_target_s") -> list[dict]:
    """The points that reached the target, fastest first by ``key``, each as ``batch_size``,
    ``rank``, ``device_time_to_target_s``, ``time_to_target_s`` (wall clock) and both over the
    fastest's (``device_over_best``, ``wall_over_best``; ties share a rank).

    Example:
      >>> pts = [{"batch_size": 16, "device_time_to_target_s": 3.0, "time_to_target_s": 2.0},
      ...        {"batch_size": 32, "device_time_to_target_s": 2.0, "time_to_target_s": 4.0}]
      >>> [(r["batch_size"], r["rank"], r["wall_over_best"]) for r in rank_time_to_target(pts)]
      [(32, 1, 1.0), (16, 2, 0.5)]
    """
    done = sorted((p for p in points if p.get(key) is not None), key=lambda p: p[key])
    if not done:
        return []
    best = done[0]

    def over(p, k):
        return None if p.get(k) is None or not best.get(k) else p[k] / best[k]

    return [
        {
            "batch_size": int(p["batch_size"]),
            "rank": 1 + sum(q[key] < p[key] for q in done),
            "device_time_to_target_s": p.get("device_time_to_target_s"),
            "time_to_target_s": p.get("time_to_target_s"),
            "device_over_best": over(p, "device_time_to_target_s"),
            "wall_over_best": over(p, "time_to_target_s"),
        }
        for p in done
    ]


def fit_tradeoff(points: list[dict], num_bootstrap: int, seed: int) -> dict:
    """Fit ``S(B)`` to the reached points; an ``error`` entry instead when it cannot be fitted."""
    reached = [p for p in points if p["reached"]]
    keys = ("batch_size", "seed", "steps", "time_to_target_s", "device_time_to_target_s")
    keys += ("step_time_s", "learning_rate", "reached", "workdir")
    out = {
        "s_min": None,
        "e_min": None,
        "b_crit": None,
        "intervals": {},
        "points": [{k: p.get(k) for k in keys} for p in points],
    }
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
    d = f.to_dict()
    d.pop("points")
    return out | d


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


# ---------------------------------------------------------------------------------------------
# The sweep.


def run_sweep(config, workdir: str, *, trainings: bool = True) -> dict:
    """Run (or resume) the sweep of ``config`` in ``workdir``; returns the ``sweep.json`` dict.

    ``trainings=False`` measures and recommends only (the ``compare``/``tradeoff`` modes train
    themselves).
    """
    validate_config(config)
    bar = progress.Progress(5, desc="sweep", unit="stages", rate=False)
    with contextlib.closing(bar), runlog.workdir_lock(workdir):
        return _run_sweep(config, workdir, trainings, bar)


def _run_sweep(config, workdir: str, trainings: bool, bar: progress.Progress) -> dict:
    t_start = time.perf_counter()
    st = SweepState(workdir)
    mesh = mesh_lib.make_mesh(config.train.num_devices)
    mesh_record = mesh_lib.describe(mesh)
    fps: dict[str, Any] = {s: stage_fingerprint(config, s, mesh_record) for s in STAGE_FIELDS}
    if config.compilation_cache:  # the user's own cache: never compiled code from the workdir
        _enable_compilation_cache(data.private_cache_dir("jax"))
    runlog.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    device = hardware.detect_devices()
    with cli.under("train"):  # the hints name --config.train.data.*
        ds = data.load(config.train.data)
    stage_t = {"setup": time.perf_counter() - t_start}

    def stage(name, key, measure):
        bar.set(phase=name)
        value = st.get(name, key, fps[name])
        if value is None:
            # As stored (strict JSON): a fresh result reads the same as a reused one.
            value = runlog.to_strict_json(measure(stage_config(config, name), ds))
            st.put(name, key, fps[name], value)
        stage_t[name] = time.perf_counter() - t_start - sum(stage_t.values())
        bar.update(1)
        return value

    # 1. Noise scale along the pilot, branched critical batch; 2. memory and the timing table.
    ccfg = stage_config(config, "critical_batch")
    ck = checkpoint_steps(pilot_length(ccfg.noise), ccfg.critical.num_checkpoints)
    ck = ck if ccfg.critical.num_checkpoints > 0 else []
    noise = stage(
        "noise_scale", "value", lambda view, ds: measure_noise_scale(view, ds, keep_steps=ck)
    )
    b_noise = noise_scale_value(noise)
    if math.isnan(b_noise):
        raise UserError(
            f"the noise scale of {os.path.join(workdir, STATE_FILE)} is not a number",
            hint=f"delete {workdir} and run again",
        )
    fps["critical_batch"] = critical_fingerprint(config, b_noise)
    crit = stage(
        "critical_batch", "value", lambda view, ds: measure_critical_batch(view, ds, b_noise)
    )
    _PILOT_STATES.clear()
    tput = stage("throughput", "table", measure_throughput)
    recommend_config, t = config.recommend, config.train
    basis, value, evidence, basis_note = finder.choose_basis(
        (b_noise, *(math.inf if x is None else x for x in noise["interval"])),
        _effective_from_json(noise.get("effective")),
        _effective_from_json(crit.get("effective")),
    )

    def table_of(throughput):
        if throughput["max_batch_size"] is None:
            raise UserError(
                f"no candidate batch size fits in memory ({throughput['rows'][0]['reason']})",
                hint="lower config.throughput.min_batch_size or raise "
                "config.throughput.memory_budget_bytes",
            )
        mb = throughput["max_batch_size"]
        r = add_accumulation_rows(throughput["rows"], config.throughput.accumulation_factors, mb)
        return mb, r, step_times(r)

    def recommend_on(b_noise, interval=None, s_min=None, **kw):
        cands = sorted({r["batch_size"] for r in rows if r["step_time_s"]} | {t.batch_size})
        return recommend.recommend(
            b_noise, times, max_batch_size=max_batch, base_lr=t.learning_rate,
            base_batch_size=t.batch_size, optimizer=t.optimizer,
            price_per_hour=recommend_config.price_per_hour, objective=recommend_config.objective,
            candidates=list(recommend_config.candidates) if recommend_config.candidates else cands,
            b_noise_interval=interval, s_min=s_min, **kw,
        )  # fmt: skip

    interval = (value[1], value[2]) if not math.isnan(value[1]) else None
    basis_kw = dict(step_time_range=None, basis=basis, evidence=evidence)
    max_batch, rows, times = table_of(tput)
    # A pick at an end of the timed range: time the next batch (in one new interleaved table
    # with all the others, cached like the first) and recommend on it, once.
    nxt, extended_to = recommend_on(value[0], interval, **basis_kw).extend_range_to, None
    if nxt is not None and nxt not in {r["batch_size"] for r in tput["rows"]}:
        key = f"extended_to_{nxt}"
        ext = st.get("throughput", key, fps["throughput"])
        if ext is None:
            view = stage_config(config, "throughput")
            ext = runlog.to_strict_json(measure_throughput(view, ds, extra=(nxt,)))
            st.put("throughput", key, fps["throughput"], ext)
        if any(r["batch_size"] == nxt and r["fits"] for r in ext["rows"]):
            tput, extended_to = ext, nxt
            max_batch, rows, times = table_of(tput)

    # 3. Trainings to the target (``tradeoff.extra_seeds`` more seeds at the
    # ``tradeoff.reseed_best`` fastest batches) and the tradeoff fit on every training.
    fps["trainings"] = {}
    bar.set(phase="trainings" if trainings else "recommend")

    def train_at(b, seed_offset=0):
        bar.set(phase=f"training B={b}" + (f" seed +{seed_offset}" if seed_offset else ""))
        cfg, rule = training_config(config, b, b_noise, seed_offset)
        key = f"{b}/seed{cfg.seed}" if seed_offset else str(b)  # the first seed: the batch alone
        fp = fps["trainings"][key] = runlog.fingerprint(cfg.to_dict())
        p = st.get("trainings", key, fp)
        if p is None:
            p = runlog.to_strict_json(run_training(cfg, training_dir(workdir, cfg, fp), rule))
            st.put("trainings", key, fp, p)
        return with_device_time([p | {"seed": int(cfg.seed)}], times, max_batch)[0]

    points = []
    fitting = [r["batch_size"] for r in rows if r["fits"]]
    skipped_trainings = {}
    for b in train_batch_sizes(config, fitting) if trainings else []:
        why = mesh_lib.split_reason(b, mesh)
        if why is None and b > max_batch:
            why = f"skipped: above the largest batch that fits ({max_batch})"
        if why is not None:
            logging.warning("The training at batch %d is %s.", b, why)
            skipped_trainings[str(b)] = why
            continue
        points.append(train_at(b))
    reseed = validation.reseed_batch_sizes(points, _get_path(config, "tradeoff.reseed_best"))
    for offset in range(1, _get_path(config, "tradeoff.extra_seeds") + 1):
        points += [train_at(b, offset) for b in reseed]
    by_batch = validation.mean_over_seeds(points)
    tradeoff_out = fit_tradeoff(points, config.tradeoff.num_bootstrap, config.train.seed)
    tradeoff_out.update(by_batch=by_batch, reseeded=reseed if len(by_batch) < len(points) else [])
    bar.update(1)
    stage_t["trainings"] = time.perf_counter() - t_start - sum(stage_t.values())

    # 4. Recommendation, from the best evidence (primary) and from the fitted curve (check).
    bar.set(phase="recommend")
    basis_kw["step_time_range"] = step_time_ranges(rows)
    rec = recommend_on(value[0], interval, s_min=tradeoff_out["s_min"], **basis_kw)
    rec_fit = None
    if tradeoff_out["b_crit"] is not None:
        rec_fit = recommend_on(
            tradeoff_out["b_crit"], s_min=tradeoff_out["s_min"], basis="tradeoff_fit"
        )
    # The pick under every basis measured (the validation compares them on the trainings).
    by_basis = {}
    fit_iv = tradeoff_out["intervals"].get("b_crit") or (None, None)
    for name, (v, lo, hi) in [
        *evidence.items(),
        ("tradeoff_fit", (tradeoff_out["b_crit"], *fit_iv)),
    ]:
        r = {basis: rec, "tradeoff_fit": rec_fit}.get(name)
        if r is None and name != "tradeoff_fit" and not math.isnan(v):
            iv = None if math.isnan(lo) else (lo, hi)
            r = recommend_on(v, iv, s_min=tradeoff_out["s_min"], step_time_range=None, basis=name)
        by_basis[name] = {"b_noise": v, "low": lo, "high": hi}
        by_basis[name] |= {"batch_size": None} if r is None else {
            "batch_size": r.batch_size, "batch_size_range": r.batch_size_range,
        }  # fmt: skip
    bar.update(1)
    stage_t["recommend"] = time.perf_counter() - t_start - sum(stage_t.values())
    reached = [p for p in by_batch if p["reached"]]
    sweep = {
        "device": device.to_dict(),
        "mesh": mesh_record,
        "fingerprints": fps,
        "throughput": rows,
        "max_batch_size": max_batch,
        "max_batch_size_per_device": max_batch // mesh.size,
        "skipped_batch_sizes": {
            str(r["batch_size"]): r["reason"] for r in rows if r.get("skipped")
        },
        "skipped_trainings": skipped_trainings,
        "throughput_extended_to": extended_to,
        "noise_scale": noise,
        "tradeoff": tradeoff_out,
        "time_to_target": rank_time_to_target(reached),
        "critical_batch": crit,
        "recommendation": rec.to_dict() | {"basis_note": basis_note},
        "recommendation_from_tradeoff": None if rec_fit is None else rec_fit.to_dict(),
        "recommendation_by_basis": by_basis,
        # Device time (steps x t(B)), mean over seeds: comparable to the predicted S(B) t(B).
        "measured_time_to_target": {
            str(p["batch_size"]): p["device_time_to_target_s"] for p in reached
        },
        "measured_wall_time_to_target": {
            str(p["batch_size"]): p["time_to_target_s"] for p in reached
        },
        "reused": st.reused,
        "remeasured_after_config_change": st.stale,
        "stage_time_s": stage_t,
    }
    if trainings:
        sweep["validation"] = validation.validation(runlog.to_strict_json(sweep))
    try:  # {name: path, or why it was not drawn}
        sweep["plots"] = figures.sweep_plots(runlog.to_strict_json(sweep), workdir)
    except Exception as e:  # plots are a convenience: never lose a finished sweep to them
        logging.warning("Could not write the sweep plots: %s", e)
    runlog.write_json(os.path.join(workdir, SWEEP_FILE), sweep)
    return sweep


def _enable_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache in ``path`` (``None``: none): the trainings compile
    the same model init, train and eval programs at every batch size, and a re-run compiles
    nothing again. JAX keys each entry by the program, its compile options, the jaxlib version
    and the device. (Process-wide, and only where JAX has no cache directory configured yet.)"""
    if path is None or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def summary_table(sweep: dict) -> str:
    """A plain-text summary: device, throughput, noise scale, tradeoff, recommendation."""
    d, m = sweep["device"], sweep.get("mesh") or {}
    lines = [f"device: {d['platform']} / {d['kind']} x{d['count']}"]
    if m:
        lines.append(
            f"mesh: {m['devices']} device(s) on {m['hosts']} host(s); batch sizes are global "
            f"(per device: batch / {m['devices']})"
        )
    lines.append("")
    lines.append(
        f"{'batch':>7} {'fits':>5} {'accum':>5} {'step ms':>9} {'examples/s':>11} {'pred. MiB':>10}"
    )
    for r in sweep["throughput"]:
        ms = None if r.get("step_time_s") is None else 1e3 * r["step_time_s"]
        mib = None if r.get("predicted_bytes") is None else r["predicted_bytes"] / 2**20
        lines.append(
            f"{r['batch_size']:>7} {str(r['fits']):>5} {r.get('accumulation_steps', 1):>5} "
            f"{_fmt(ms, '9.2f'):>9} {_fmt(r.get('examples_per_s'), '11.0f'):>11} "
            f"{_fmt(mib, '10.1f'):>10}"
        )
    n = sweep["noise_scale"]
    lines += [
        "",
        plots.largest_fits(sweep)[1]
        + (f" ({sweep['max_batch_size_per_device']} per device)" if m else ""),
        *(f"batch {b} {why}" for b, why in (sweep.get("skipped_batch_sizes") or {}).items()),
        f"noise scale b_simple: {_fmt(n['b_simple'], '.4g')}  "
        f"{round(100 * n['confidence'])}% interval [{_fmt(n['interval'][0], '.4g')}, "
        f"{_fmt(n['interval'][1], '.4g')}]  ({n['num_batches']} batches of {n['batch_size']}, "
        f"{n['method']}, after {n['after_warmup_steps']} steps)",
        "along the pilot: "
        + ", ".join(
            f"{_fmt(r['b_simple'], '.4g')} (to step {r['step']:g})" for r in n.get("trajectory", [])
        )
        + f"; effective {_fmt((n.get('effective') or {}).get('value'), '.4g')}",
    ]
    c = sweep.get("critical_batch") or {}
    if c.get("checkpoints"):
        lines.append(
            "branched B_crit: "
            + ", ".join(f"{_fmt(r['b_crit'], '.4g')} (step {r['step']}"
                        + ("" if r["resolved"] else ", unresolved") + ")" for r in c["checkpoints"])
            + f"; effective {_fmt(c['effective']['value'], '.4g')} "
            f"(forks cost {c['cost_fraction']:.2f}x the pilot's examples)"
        )  # fmt: skip
    lines += [
        "",
        f"{'batch':>7} {'seed':>4} {'lr':>10} {'steps to target':>16} {'steps x t(B) s':>15} "
        f"{'wall s':>8}",
    ]
    t = sweep["tradeoff"]
    for p in t["points"]:
        lines.append(
            f"{p['batch_size']:>7} {_fmt(p.get('seed'), 'd'):>4} {p['learning_rate']:>10.3g} "
            f"{_fmt(p['steps'], '16.0f'):>16} {_fmt(p['device_time_to_target_s'], '15.2f'):>15} "
            f"{_fmt(p['time_to_target_s'], '8.1f'):>8}"
        )
    if t.get("b_crit") is not None:
        iv = t.get("intervals", {}).get("b_crit")
        ivs = "" if not iv else f"  interval [{_fmt(iv[0], '.4g')}, {_fmt(iv[1], '.4g')}]"
        lines.append(
            f"fit: S_min = {t['s_min']:.4g}, E_min = {t['e_min']:.4g}, B_crit = {t['b_crit']:.4g}"
            + ivs
        )
    else:
        lines.append(f"fit: not available ({t.get('error')})")
    r = sweep["recommendation"]
    lines += [
        "",
        f"recommended batch size: {r['batch_size']} (accumulation steps {r['accumulation_steps']}),"
        f" learning rate {r['learning_rate']:.4g}, predicted speedup vs baseline "
        f"{r['predicted_speedup_vs_baseline']:.2f}x",
        f"  basis: {r['basis']} ({r.get('basis_note') or 'the best evidence measured'}); "
        + ", ".join(
            f"{k} {_fmt(v['value'], '.4g')} (x{_fmt(v['ratio_to_basis'], '.2f')})"
            for k, v in r.get("evidence", {}).items()
        ),
        f"  {r['reason']}",
        f"  lr rule: {r['lr_rule']}",
    ]
    rf = sweep.get("recommendation_from_tradeoff")
    if rf is not None:
        lines.append(
            f"from the fitted tradeoff (B_crit as the noise scale): batch {rf['batch_size']}"
        )
    return "\n".join(lines + validation_lines(sweep.get("validation")))


def validation_lines(v: dict | None) -> list[str]:
    """The ``validation`` block of ``sweep.json`` as summary lines (none without one)."""
    if not v:
        return []
    if "error" in v:
        return ["", f"validation: {v['error']}"]
    best = v["best_measured"]
    lines = [
        "",
        f"validation (device time to target over the best measured, batch {best['batch_size']}"
        f" at {best['device_time_to_target_s']:.2f} s, mean of seeds {best['seeds']}):",
    ]
    for name, r in v["by_basis"].items():
        if r.get("batch_size") is None:
            lines.append(f"  {name:>12}: not measured")
            continue
        rng = r.get("over_best_range")
        spread = "" if not rng else f" [seeds {rng[0]:.2f}-{rng[1]:.2f}]"
        lines.append(
            f"  {name:>12}: batch {r['batch_size']:>5} (noise scale "
            f"{_fmt(r['b_noise'], '.4g')}): {_fmt(r['over_best'], '.2f')}x{spread}, {r['source']}"
        )
    c, g = v["branched_over_fitted"], v["targets"]
    lines.append(
        f"  branched B_crit / fitted B_crit: {_fmt(c['value'], '.2f')} "
        f"[{_fmt(c['low'], '.2f')}, {_fmt(c['high'], '.2f')}]; per checkpoint "
        + ", ".join(f"{_fmt(x['ratio'], '.2f')} (step {x['step']})" for x in c["per_checkpoint"])
    )
    lines.append(
        f"  targets: branched over best <= {g['branched_over_best_max']:.2f}: "
        f"{g['branched_over_best_met']}; branched within {g['branched_over_fitted_max_factor']}x "
        f"of fitted: {g['branched_over_fitted_met']}"
    )
    return lines


# ---------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
    """The flags, defined only when this module is the main program: flags defined at import
    would clash with those of another main that imports it (``experiments.cifar10`` does)."""
    flags.DEFINE_string("workdir", None, "Directory for sweep.json, plots and state.")
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/sweep.py:smoke.", lock_config=True
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(runlog.QuietOrbax())
    sweep = run_sweep(FLAGS.config, FLAGS.workdir)
    print(summary_table(sweep))
    print(f"\nwrote {os.path.join(FLAGS.workdir, SWEEP_FILE)}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main, "configs/sweep.py", rules.describer("sweep"))
