"""The one training loop: ``train_and_evaluate(config, workdir)`` for every task and mode.

The training step itself measures the noise scale every ``config.gns_every`` steps
(``gns.estimate``; BatchNorm models train with ghost BatchNorm over the estimator's groups);
the batch size is fixed or follows :mod:`experiments.adaptive`. ``workdir`` gets, through
:mod:`experiments.runlog`, ``config.json``, ``metrics.jsonl``, TensorBoard events,
``summary.json``, ``checkpoints/`` and the plots.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from experiments import adaptive, figures, models, progress, rules, runlog, tasks
from experiments import mesh as mesh_lib
from experiments.cli import UserError
from gns import common, estimate, finder, hardware, smoothing

PyTree = Any

SUMMARY_FILE = "summary.json"
STEP_TIMES_FILE = "step_times.json"  # the table an adaptive run decides on, kept for a resume
# Fields that do not change what a run computes, so a resume may change them (run_identity);
# adaptive.timing_* and step_times: the candidates' timing, measured again by a re-run (a
# compare's after a change of its measurement fields); num_devices: the count it resolves to is
# checked against the checkpoint's instead (None and that count are the same run).
NOT_IDENTITY = (
    *rules.NOT_TRAINING,
    *"""log_every checkpoint_every progress_bar plots max_wall_time_s eval_batch_size
    divergence_factor data.cache_dir data.tfds_data_dir data.url data.md5 data.on_device
    distributed step_time_repeats adaptive.timing_warmup adaptive.timing_rounds
    adaptive.step_times num_devices""".split(),
)


class Diverged(UserError):
    """The training loss became non-finite or exceeded ``config.divergence_factor`` times its
    initial value; raised after the metrics row and ``summary.json`` that record it."""


class TrainState(NamedTuple):
    """Everything a step changes, as one pytree (checkpointed as a whole)."""

    step: jax.Array  # optimizer updates done (int32 scalar)
    params: PyTree
    batch_stats: PyTree  # BatchNorm running statistics ({} without BatchNorm)
    opt_state: PyTree
    gns: PyTree  # the gns.smoothing.ema tracker state
    rng: jax.Array  # dropout key; step s uses fold_in(rng, s)
    # The peak learning rate (float32 scalar) multiplying the updates of an optimizer that runs
    # at the schedule's shape (peak 1, make_schedule): one compiled step serves every rate.
    learning_rate: jax.Array | float = 1.0
    schedule: PyTree = None  # the batch-size schedule's state (experiments.adaptive), if any


def validate_config(config) -> None:
    """Check every field :func:`train_and_evaluate` reads (:mod:`experiments.rules`, with
    the device count) before anything is written."""
    table = tasks.table(config)
    rules.check(config, table)  # every field, num_devices included, then the mesh's size
    rules.check(config, table, mesh_lib.make_mesh(config.num_devices).size)
    if adaptive.enabled(config):  # the schedule builds and has a starting rate
        adaptive.initial_state(config)


def run_identity(config: dict) -> dict:
    """The fields of a config dict that a resume must keep: all but :data:`NOT_IDENTITY`,
    and but ``num_steps``/``num_epochs`` with a constant schedule (there they only say where
    the run stops, so a finished run can be extended); ``data.path`` resolved;
    ``start_from`` by its directory's name (the pilot's key, wherever the workdir moved)."""
    ident = copy.deepcopy(config)
    if ident.get("data", {}).get("path"):  # the same file from any directory
        ident["data"]["path"] = os.path.realpath(ident["data"]["path"])
    if ident.get("start_from"):
        ident["start_from"] = os.path.basename(os.path.normpath(ident["start_from"]))
    constant = config.get("schedule") == "constant"
    for path in NOT_IDENTITY + (("num_steps", "num_epochs") if constant else ()):
        *parents, last = path.split(".")
        functools.reduce(lambda node, key: node.get(key, {}), parents, ident).pop(last, None)
    return ident


def resolve_num_steps(config, num_train: int) -> int:
    """``config.num_epochs`` (if set) converted to steps, else ``config.num_steps``."""
    if config.num_epochs is not None:
        return max(1, math.ceil(float(config.num_epochs) * num_train / config.batch_size))
    return int(config.num_steps)


def make_schedule(config, num_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup over ``config.warmup_steps`` to ``peak`` (default
    ``config.learning_rate``), then constant or (``config.schedule='cosine'``) a cosine decay
    to 0 at ``num_steps``."""
    lr, warmup = float(config.learning_rate if peak is None else peak), int(config.warmup_steps)
    if config.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, max(1, num_steps - warmup))
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``config.optimizer``: ``sgd`` (``config.momentum``, ``config.nesterov``) or ``adam``
    with L2 weight decay, ``adamw`` or ``lamb`` with decoupled decay, on kernels only (not on
    biases and normalization scales/offsets)."""
    wd = float(config.weight_decay)
    kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    if config.optimizer in ("adamw", "lamb"):
        return getattr(optax, config.optimizer)(schedule, weight_decay=wd, mask=kernels)
    if config.optimizer == "sgd":
        opt = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
    else:
        opt = optax.adam(schedule)
    if wd:
        opt = optax.chain(optax.add_decayed_weights(wd, mask=kernels), opt)
    return opt


def resolve_gns_method(config, model, num_devices: int = 1) -> str:
    """``config.gns_method`` with ``'auto'`` resolved: ``across_devices`` on 2 or more
    devices, else ``per_example`` without BatchNorm and ``microbatch`` with it."""
    method = config.gns_method
    bn = models.has_batch_norm(model)
    if method == "auto":
        return "across_devices" if num_devices >= 2 else "microbatch" if bn else "per_example"
    if method == "across_devices" and num_devices < 2:
        raise UserError(
            "config.gns_method='across_devices' needs at least 2 devices, this run has "
            f"{num_devices}",
            hint="--config.gns_method=auto (or microbatch, per_example)",
        )
    if method == "per_example" and bn:
        raise UserError(
            f"config.gns_method='per_example' is invalid for {type(model).__name__}, which has "
            "BatchNorm (a batch of one normalizes over itself): use 'microbatch' or 'auto'."
        )
    return method


def batch_groups(config, model, num_devices: int = 1) -> int:
    """The equal groups every global batch of ``config``'s steps splits into: the estimator's
    microbatches, which are also ghost BatchNorm's (``gns_microbatches``), where the method
    resolves to ``microbatch``; else 1."""
    microbatch = resolve_gns_method(config, model, num_devices) == "microbatch"
    return int(config.gns_microbatches) if microbatch else 1


def _forward(model, params, batch_stats, inputs, dropout_key, train):
    """float32 logits (a bfloat16 model's loss and softmax are computed in float32) and the
    batch statistics, updated when training a BatchNorm model."""
    variables = {"params": params} | ({"batch_stats": batch_stats} if batch_stats else {})
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    mutable = ["batch_stats"] if train and batch_stats else False
    out = model.apply(variables, inputs, train=train, rngs=rngs, mutable=mutable)
    logits, batch_stats = (out[0], out[1]["batch_stats"]) if mutable else (out, batch_stats)
    return logits.astype(jnp.float32), batch_stats


def make_loss_fn(
    model,
    batch_stats: PyTree,
    rng: jax.Array | None,
    loss: Callable = tasks.cross_entropy,
    groups: int = 1,
) -> Callable:
    """``loss_fn(params, batch) -> (mean loss, {'loss', 'accuracy', 'batch_stats'})`` for
    ``gns.estimate``; a (micro)batch's dropout key is ``fold_in(rng, batch['index'][0])``.
    ``groups > 1``: the mean over the groups that ``gns.estimate.microbatch`` splits the batch
    into (ghost BatchNorm), so its gradient is the microbatch estimator's."""

    def loss_fn(params, batch):
        key = None if rng is None else jax.random.fold_in(rng, batch["index"][0])
        inputs, targets = tasks.split_batch(batch)
        logits, new_stats = _forward(model, params, batch_stats, inputs, key, True)
        mean = jnp.mean(loss(logits, targets))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == targets)
        return mean, {"loss": mean, "accuracy": accuracy, "batch_stats": new_stats}

    def ghost_loss_fn(params, batch):
        split = common.split_leading(batch, groups)
        losses, aux = jax.vmap(loss_fn, in_axes=(None, 0))(params, split)
        return jnp.mean(losses), jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)

    return loss_fn if groups == 1 else ghost_loss_fn


def _with_index(batch, axis_name=None):
    """The batch with each example's position in the global batch (``'index'``: dropout keys
    depend on it, so they do not depend on how the batch is split over devices)."""
    inputs, targets = tasks.batch_keys(batch)
    n = batch[targets].shape[0]
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
    return {inputs: batch[inputs], targets: batch[targets], "index": offset + jnp.arange(n)}


def make_train_steps(
    model,
    optimizer: optax.GradientTransformation,
    tracker,
    *,
    method: str,
    num_microbatches: int = 8,
    chunk_size: int | None = None,
    schedule: optax.Schedule | None = None,
    mesh=None,
    loss: Callable = tasks.cross_entropy,
    gns_uses: int | None = None,
):
    """The unjitted ``(plain_step, gns_step)``, each ``(state, batch) -> (state, metrics)``,
    the same update; ``gns_step`` takes its gradient from ``gns.estimate`` (``method``,
    resolved) and adds the raw and smoothed (``tracker``) noise statistics.
    ``num_microbatches``: the estimator's over the global batch, and the ghost-BatchNorm
    groups of both steps; ``schedule``: reports the step's rate; ``mesh``: the steps are
    ``jax.shard_map`` over it, gradients and losses averaged over the devices; ``gns_uses``:
    how many measuring steps will run (``per_example``'s ``uses``)."""
    axis, n_dev = (None, 1) if mesh is None else (mesh_lib.AXIS, mesh.size)
    k_local = num_microbatches // n_dev if method == "microbatch" else 1
    if method == "microbatch" and k_local == 1:
        method = "across_devices"  # one microbatch per device: the same estimate
    estimator = {
        "per_example": functools.partial(
            estimate.per_example, chunk_size=chunk_size, uses=gns_uses
        ),
        "microbatch": functools.partial(estimate.microbatch, num_microbatches=k_local),
        "across_devices": estimate.across_devices,
    }[method]
    bn, use_dropout = models.has_batch_norm(model), models.uses_dropout(model)

    def mean_over_devices(tree):
        return tree if axis is None else jax.lax.pmean(tree, axis)

    def step_key(state):
        return jax.random.fold_in(state.rng, state.step) if use_dropout else None

    def apply_update(state, grads, aux):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: u * jnp.asarray(state.learning_rate, u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        batch_stats = aux["batch_stats"] if bn else state.batch_stats
        return state._replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )

    def base_metrics(state, aux):
        lr = schedule(state.step) * state.learning_rate if schedule is not None else jnp.nan
        return {"train_loss": aux["loss"], "train_accuracy": aux["accuracy"], "learning_rate": lr}

    def plain_step(state, batch):
        batch = _with_index(batch, axis)
        groups = k_local if bn else 1
        loss_fn = make_loss_fn(model, state.batch_stats, step_key(state), loss, groups)
        params = common.to_varying(state.params, axis)
        grads, aux = mean_over_devices(jax.grad(loss_fn, has_aux=True)(params, batch))
        return apply_update(state, grads, aux), base_metrics(state, aux)

    def gns_step(state, batch):
        batch = _with_index(batch, axis)
        loss_fn = make_loss_fn(model, state.batch_stats, step_key(state), loss)
        stats, grads, aux = estimator(loss_fn, state.params, batch, has_aux=True, axis_name=axis)
        if method != "across_devices":  # one per example or microbatch, of equal sizes
            aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)
        aux = mean_over_devices(aux)
        ema = tracker.update(stats, state.gns)
        metrics = base_metrics(state, aux)
        for prefix, values in (("", stats), ("ema_", ema)):
            metrics |= {prefix + k: getattr(values, k) for k in ("g_sq", "trace_cov", "b_simple")}
        return apply_update(state, grads, aux)._replace(gns=ema), metrics

    if mesh is None:
        return plain_step, gns_step
    specs = dict(mesh=mesh, in_specs=(P(), P(axis)), out_specs=P())
    return jax.shard_map(plain_step, **specs), jax.shard_map(gns_step, **specs)


def make_eval_step(model, loss: Callable = tasks.cross_entropy):
    """``eval_step(params, batch_stats, inputs, targets, mask) -> (correct, loss_sum)``: the
    sums over the examples in ``mask`` of their accuracy (mean over positions) and ``loss``."""

    def eval_step(params, batch_stats, inputs, targets, mask):
        logits, _ = _forward(model, params, batch_stats, inputs, None, False)
        n = targets.shape[0]
        correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32).reshape(n, -1).mean(1)
        return jnp.sum(correct * mask), jnp.sum(loss(logits, targets) * mask)

    return eval_step


def _evaluate(eval_step, state, batches, mesh) -> dict[str, float]:
    """Accuracy and mean loss over padded ``batches`` with a ``mask`` (Task.eval_batches),
    each sharded over ``mesh``."""
    correct = loss = n = 0
    for batch in batches:
        mask = np.asarray(batch["mask"], np.float32)
        sharded = mesh_lib.shard((*tasks.split_batch(batch), mask), mesh)
        c, s = eval_step(state.params, state.batch_stats, *sharded)
        correct, loss, n = correct + float(c), loss + float(s), n + int(mask.sum())
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "examples": n}


def init_state(
    config, model, optimizer, tracker, image_shape, dtype=jnp.float32, mesh=None
) -> TrainState:
    """A fresh :class:`TrainState` from ``config.seed`` at ``config.learning_rate``
    (``image_shape``, ``dtype``: one example's model input, e.g. ``((context,), jnp.int32)``
    for tokens), float32 whatever the model's computation dtype; replicated over ``mesh``."""
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
    x = jnp.zeros((1,) + tuple(image_shape), dtype)
    variables = jax.jit(lambda r: model.init(r, x, train=False))(init_rng)
    params = variables["params"]
    state = TrainState(
        jnp.zeros((), jnp.int32),
        params,
        variables.get("batch_stats", {}),
        optimizer.init(params),
        tracker.init(),
        dropout_rng,
        jnp.float32(config.learning_rate),
    )
    return state if mesh is None else mesh_lib.replicate(state, mesh)


class Setup(NamedTuple):
    """What the loop needs besides the config: built before anything is written."""

    method: str
    num_steps: int
    plain_fn: Callable
    gns_fn: Callable
    evaluate: Callable  # (state, arrays) -> {'accuracy', 'loss', 'examples', task metrics}
    state: TrainState  # the fresh state (the template a checkpoint restores into)
    task: tasks.Task
    mesh: Any  # the data-parallel mesh (experiments.mesh)
    train_batches: Callable  # (batch_size, start_example, by_example=False) -> batches on mesh
    num_train: int  # train examples per epoch


def make_model(config, ds, dtype=None):
    """The model of ``config.model`` (computing in ``dtype``), its outputs the data's
    ``num_classes`` where ``ds`` has one, else ``config.model.num_classes``."""
    return models.get_model(config.model, num_classes=getattr(ds, "num_classes", None), dtype=dtype)


def build_steps(config, ds, task: tasks.Task, schedule, tracker, *, mesh=None, gns_uses=None):
    """``(model, method, plain_fn, gns_fn, state)`` of ``config`` on the data ``ds``: the
    model, the resolved estimator, the unjitted steps (:func:`make_train_steps`) and the fresh
    state, replicated over ``mesh`` (data-parallel steps; ``None``: one device).
    ``schedule``: the rate's shape (peak 1, the rate being in the state); ``tracker``: the
    noise statistics' smoothing; ``gns_uses``: the measuring steps that will run."""
    model = make_model(config, ds, config.dtype)
    method = resolve_gns_method(config, model, 1 if mesh is None else mesh.size)
    optimizer = make_optimizer(config, schedule)
    plain_fn, gns_fn = make_train_steps(
        model,
        optimizer,
        tracker,
        method=method,
        num_microbatches=int(config.gns_microbatches),
        chunk_size=config.gns_chunk_size,
        schedule=schedule,
        mesh=mesh,
        loss=task.loss,
        gns_uses=gns_uses,
    )
    shape, dtype = task.input_spec(ds)
    state = init_state(config, model, optimizer, tracker, shape, dtype, mesh=mesh)
    return model, method, plain_fn, gns_fn, state


def build_setup(config, ds, task: tasks.Task | None = None) -> Setup:
    """Everything a run of ``config`` on the loaded data ``ds`` needs before its first step,
    after checking the batch and estimator fields against the data and the devices; writes
    nothing. ``task`` defaults to ``tasks.get(config)``."""
    task = task or tasks.get(config)
    num_train = task.num_train(ds)
    mesh = mesh_lib.make_mesh(config.num_devices)
    num_steps = resolve_num_steps(config, num_train)
    schedule = make_schedule(config, num_steps, peak=1.0)  # the rate: in the state
    model, method, plain_fn, gns_fn, state = build_steps(
        config,
        ds,
        task,
        schedule,
        smoothing.ema(config.gns_ema_decay),
        mesh=mesh,
        gns_uses=num_steps // config.gns_every if config.gns_every > 0 else None,
    )
    k = config.gns_microbatches
    # The rules check this for gns_method='microbatch'; 'auto' resolves to it with BatchNorm.
    if method == "microbatch" and not rules.microbatches_fit(k, config.batch_size, mesh.size):
        raise UserError(
            f"config.gns_microbatches={k} must be >= 2, divide config.batch_size="
            f"{config.batch_size} (equal microbatches for the estimator and ghost BatchNorm) "
            f"and be a multiple of the {mesh.size} device(s)",
            hint="set it on the command line: --config.gns_microbatches=...",
        )
    mesh_lib.check_batch(config.batch_size, mesh, per_example=method == "per_example")
    if config.batch_size > num_train:
        raise UserError(
            f"config.batch_size={config.batch_size} is larger than the {num_train} train examples",
            hint=f"set it on the command line: --config.batch_size=... (at most {num_train})",
        )
    if adaptive.enabled(config):
        adaptive.validate(config, num_train, k if method == "microbatch" else None)
        for b in adaptive.candidates(config):  # each splits over the devices, none is skipped
            mesh_lib.check_batch(b, mesh, "adaptive.candidates", method == "per_example")
        state = adaptive.with_schedule(config, state)
    eval_step = jax.jit(make_eval_step(model, task.loss))

    def evaluate(state, arrays):
        size = min(config.eval_batch_size, len(tasks.split_batch(arrays)[1]))
        size = -(-size // mesh.size) * mesh.size  # padded batches split evenly over devices
        res = _evaluate(eval_step, state, task.eval_batches(ds, arrays, size), mesh)
        return {**res, **task.metrics(res)}

    def train_batches(batch_size: int, start_example: int, by_example: bool = False):
        if not config.data.get("on_device", False):  # a field of image configs only
            host = task.train_batches(config, ds, batch_size, start_example, by_example=by_example)
            return mesh_lib.placed_batches(host, mesh)
        return mesh_lib.device_train_batches(
            ds,
            batch_size,
            seed=config.seed,
            augment=config.data.augment,
            mesh=mesh,
            start_step=start_example // batch_size,
            start_example=start_example if by_example else None,
        )

    state = mesh_lib.replicate(state, mesh)
    return Setup(
        method, num_steps, plain_fn, gns_fn, evaluate, state, task, mesh, train_batches, num_train
    )


def _first_batch(train_batches: Callable, batch_size: int, by_example: bool = False):
    """The first batch of ``train_batches`` (:attr:`Setup.train_batches`), on the mesh."""
    with contextlib.closing(train_batches(batch_size, 0, by_example=by_example)) as batches:
        return next(batches)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train, evaluate and write the outputs of the module docstring into ``workdir`` (one
    run at a time; a checkpoint there is resumed: rows after it are dropped and the data
    stream restarts at its step). Returns the summary (also ``workdir/summary.json``).

    Raises:
      UserError: a bad config; a resume with another identity, data or device count; a
        workdir in use.
      Diverged: after writing the row and the summary that say so.
      KeyboardInterrupt: after Ctrl-C, once the row, checkpoint and summary are written.
    """
    t_call = time.perf_counter()
    mesh_lib.initialize_distributed(bool(config.distributed))  # before any use of the devices
    validate_config(config)
    task = tasks.get(config)
    primary = jax.process_index() == 0  # the one process that writes files
    kind = f"{task.name} training"
    runlog.check_workdir(workdir, kind)  # a wrong workdir, said before the data's load
    ds = task.load(config)  # before the lock: a bad data source leaves the workdir untouched
    setup = build_setup(config, ds, task)  # and so does a batch the data or devices cannot take
    lock = runlog.workdir_lock(workdir, kind) if primary else contextlib.nullcontext()
    with lock, runlog.Checkpoints(workdir) as ckpt:
        log = runlog.RunLog(
            workdir,
            target=task.target(config),
            window=int(config.target_window),
            primary=primary,
            devices=setup.mesh.size,
        )
        config_dict = config.to_dict()
        log.check_identity(config_dict, run_identity, resuming=ckpt.latest_step() is not None)
        log.data = task.describe(ds)  # the content's identity, checked against the checkpoint
        with runlog.deferred_interrupt() as interrupted, contextlib.closing(log):
            log.clock.charge("pause")
            state, meta = ckpt.restore(setup.state, check=log.check_meta)
            log.resume(0 if state is None else int(state.step), meta)
            if state is not None:
                logging.info("Resuming %s from its checkpoint of step %d.", workdir, log.step)
            log.write_config(config_dict)
            if state is None and config.get("start_from"):
                state = start_from_pilot(config, setup, log)
            if (done := _already_complete(config, setup, log)) is not None:
                return done
            # Fresh buffers per leaf: the steps donate the state, and donation rejects leaves
            # that share one array (as init functions may make them).
            state = mesh_lib.replicate(setup.state if state is None else state, setup.mesh)
            state, stop = _train(config, ds, setup, state, log, ckpt, interrupted)
            if stop != "diverged" and log.step > 0:
                ckpt.save(log.step, state, log.meta())
            summary = _summarize(config, ds, setup, state, log, stop, t_call)
            if stop == "diverged":
                raise Diverged(
                    f"training diverged at step {log.step}: {log.diverged}",
                    hint=f"lower config.learning_rate (now {config.learning_rate:g}) or add "
                    f"warmup; the metrics and summary are in {workdir}",
                )
            if interrupted.is_set():
                raise KeyboardInterrupt
    return summary


def start_from_pilot(config, setup: Setup, log: runlog.RunLog):
    """The state of the pilot checkpoint in ``config.start_from`` at this run's rate
    (``config.learning_rate``, not the pilot's), with ``log`` at its step, examples
    (:func:`gns.finder.continue_at` on its example stream) and training seconds, its ``start``
    record kept and its row written (the pilot's steps at its batch size)."""
    where = os.path.join(config.start_from, runlog.CHECKPOINT_DIR)
    state, meta = None, None
    if os.path.isdir(where):
        with runlog.Checkpoints(config.start_from) as pilot:  # another run's: left as it is
            state, meta = pilot.restore(setup.state, log.check_meta, set_aside=False)
    if state is None:
        raise UserError(
            f"no pilot checkpoint in {where}",
            hint="re-run the sweep that writes it, or set config.start_from=None",
        )
    start = dict(meta["start"], checkpoint=config.start_from)
    seen = finder.continue_at(start["examples"], config.batch_size) * config.batch_size
    meta = {"examples_seen": seen, "start": start, "clock": {"train_time_s": start["seconds"]}}
    log.resume(int(start["step"]), meta, truncate=False)
    log.write_row(
        {
            "step": start["step"],
            "examples_seen": start["examples"],
            "wall_time_s": start["seconds"],
            "batch_size": start["batch_size"],
            "learning_rate": start["learning_rate"],
            "start": "pilot",
        }
    )
    return state._replace(learning_rate=jnp.float32(config.learning_rate))


def _already_complete(config, setup: Setup, log: runlog.RunLog) -> dict | None:
    """The stored summary when the run in ``log.workdir`` finished at the checkpoint's step
    for a reason that still holds under ``config``; else ``None``, and always with several
    processes (the others cannot see the file, and the final evaluation is collective)."""
    path = os.path.join(log.workdir, SUMMARY_FILE)
    if not (jax.process_count() == 1 and log.step > 0 and os.path.exists(path)):
        return None
    try:
        stored = runlog.read_json(path)
    except (OSError, ValueError) as e:
        logging.warning(
            "Cannot read %s (%s): finishing the run again from its checkpoint.", path, e
        )
        return None
    if not isinstance(stored, dict):
        return None
    stop = _stop_reason(config, log, setup.num_steps * config.batch_size, threading.Event())
    if stored.get("steps") != log.step or stop is None or stored.get("stop_reason") != stop:
        return None
    logging.info(
        "%s is already complete (%s at step %d): nothing to train; its summary is %s.",
        log.workdir,
        stop,
        log.step,
        path,
    )
    return stored


def _stop_reason(config, log: runlog.RunLog, num_examples: int, interrupted) -> str | None:
    """Why the run stops now, if it does (checked at rows only, so a row exists there)."""
    if interrupted.is_set():
        return "interrupted"
    if log.examples_seen >= num_examples:
        return "num_steps"
    if log.target is not None and log.reached:
        return tasks.get(config).target_field
    if config.max_wall_time_s is not None and log.clock.total("train") >= config.max_wall_time_s:
        return "max_wall_time_s"
    return None


class FixedBatch(NamedTuple):
    """The policy of a fixed batch size (the step stream). Every policy has
    ``batch_size(state)``, ``update(state, noise, step) -> (state, row fields)``,
    ``by_example`` (which stream) and ``eval_every_examples`` (0: never)."""

    size: int
    eval_every_examples: int
    by_example: bool = False

    def batch_size(self, state) -> int:
        return self.size

    def update(self, state, noise, step: int) -> tuple[Any, dict]:
        return state, {}


def batch_policy(config, setup: Setup, state, log: runlog.RunLog):
    """:class:`FixedBatch`, or with ``config.adaptive.enabled`` the
    :class:`experiments.adaptive.ScheduledBatch` (its past decisions from the rows; without
    ``config.adaptive.step_times`` the candidates are timed first, and that table is kept in
    :data:`STEP_TIMES_FILE` for a resume to decide on)."""
    every = config.eval_every * config.batch_size
    if not adaptive.enabled(config):  # from a pilot: its example stream goes on
        return FixedBatch(config.batch_size, every, by_example=bool(config.get("start_from")))
    times, cands = config.adaptive.step_times, adaptive.candidates(config)
    saved = os.path.join(log.workdir, STEP_TIMES_FILE)
    if times is None and log.step > 0 and jax.process_count() == 1 and os.path.exists(saved):
        kept = runlog.read_json(saved)  # a resume decides on the table the run began with
        times = kept["step_times"] if kept.get("candidates") == cands else None
    if times is None:  # timed interleaved, the median of each
        logging.info("Timing the batch sizes %s (config.adaptive.step_times is None).", cands)
        calls = {
            b: (setup.plain_fn, (state, _first_batch(setup.train_batches, b, True))) for b in cands
        }
        table = hardware.interleaved_times(
            calls, warmup=config.adaptive.timing_warmup, rounds=config.adaptive.timing_rounds
        )
        times = [float(np.median(table[b])) for b in cands]
        timed = ", ".join(f"{b}: {1e3 * t:.3g} ms" for b, t in zip(cands, times, strict=True))
        logging.info("The schedule decides on these step times: %s.", timed)
        if log.primary:
            runlog.write_json(saved, {"candidates": cands, "step_times": times})
    sched = adaptive.make_batch_schedule(config, times)
    every = config.adaptive.eval_every_examples or every
    return adaptive.ScheduledBatch(config, sched, every, log.rows())


class StepCache:
    """The compiled ``(plain, measure)`` steps of each batch size (``steps``), compiled on
    first use (``gns_fn`` ``None``: never measured), donating the state, and charged to
    ``clock``'s ``compile``."""

    def __init__(self, plain_fn: Callable, gns_fn: Callable | None, clock):
        self.plain_fn, self.gns_fn, self.clock = plain_fn, gns_fn, clock
        self.steps: dict[int, tuple] = {}

    def get(self, batch_size: int, state, batch) -> tuple:
        """The steps of ``batch_size`` (shapes from ``state``, ``batch``); the clock goes
        back to ``pause``."""
        if batch_size not in self.steps:
            self.clock.charge("compile")
            logging.info("Compiling the training steps (batch size %d).", batch_size)
            self.steps[batch_size] = tuple(
                None if f is None else jax.jit(f, donate_argnums=0).lower(state, batch).compile()
                for f in (self.plain_fn, self.gns_fn)
            )
            self.clock.charge("pause")
        return self.steps[batch_size]


def _train(config, ds, setup: Setup, state, log: runlog.RunLog, ckpt, interrupted):
    """Steps until a stop reason, with a row at every logged, measured, evaluated,
    checkpointed or last step; the policy's batch size may change at a measured row, from the
    next step. Returns ``(state, stop_reason)``."""
    policy = batch_policy(config, setup, state, log)
    num_examples = setup.num_steps * config.batch_size
    stop_now = functools.partial(_stop_reason, config, log, num_examples, interrupted)
    if stop_now() is not None:
        return state, stop_now()
    gns_every, every = config.gns_every, policy.eval_every_examples
    steps = StepCache(setup.plain_fn, setup.gns_fn if gns_every > 0 else None, log.clock)
    held_out = setup.task.eval_arrays(config, ds, "test", config.eval_examples)
    bar = progress.Progress(
        num_examples,
        desc="train",
        unit="examples",
        initial=log.examples_seen,
        bar=config.progress_bar,
        eta=setup.task.target(config) is None and config.max_wall_time_s is None,
    )
    stop, pending = None, []  # pending: the device metrics since the last row

    def write_row(state, bs: int, measured: bool, do_eval: bool):
        """The row of the steps in ``pending`` at batch ``bs``: mean loss and accuracy, the
        last step's rate and noise statistics, the policy's update, the evaluation and the stop
        reason; written and shown. Returns ``(state, row)``."""
        jax.block_until_ready(state)
        log.clock.charge("pause")
        host, means = jax.device_get(pending), ("train_loss", "train_accuracy")
        metrics = {
            k: float(np.mean([h[k] for h in host]) if k in means else v)
            for k, v in host[-1].items()
        }
        row = log.row(**metrics, batch_size=bs, epoch=log.examples_seen / setup.num_train)
        log.check_losses([h["train_loss"] for h in host], config.divergence_factor)
        if measured and not log.diverged:
            state, fields = policy.update(state, row["ema_b_simple"], log.step)
            row.update(fields)
        if do_eval and not log.diverged:
            log.clock.charge("eval")
            bar.set(phase="evaluating")
            res = setup.evaluate(state, held_out)
            bar.set(phase="training")
            log.clock.charge("pause")
            row.update({f"test_{k}": v for k, v in res.items() if k != "examples"})
            log.record_eval(setup.task.score(res[setup.task.metric]))
        stop = "diverged" if log.diverged else stop_now()
        if stop is not None:
            row["stop_reason"] = stop
        log.write_row(row)
        b_simple = row.get("ema_b_simple")  # a float where measured: else the bar's last one
        b_simple = bar.fields.get("B_simple", "-") if b_simple is None else f"{b_simple:.4g}"
        bar.set(
            step=row["step"],
            loss=f"{row['train_loss']:.3f}",
            B_simple=b_simple,
            **{"last-step examples/s": f"{row['examples_per_s']:.0f}"},
        )
        return state, row

    try:
        while stop is None:  # one stream and compiled steps per batch size
            bs = policy.batch_size(state)
            bar.set(phase=f"compiling (batch {bs})", step=log.step)
            stream = setup.train_batches(bs, log.examples_seen, by_example=policy.by_example)
            with contextlib.closing(stream):
                first = next(stream)  # compiled for its shapes, then trained on
                plain, measure = steps.get(bs, state, first)
                bar.set(phase="training")
                log.clock.charge("train")
                for batch in itertools.chain([first], stream):
                    measured = gns_every > 0 and log.step % gns_every == 0
                    state, m = (measure if measured else plain)(state, batch)
                    log.advance(bs)
                    pending.append(m)
                    if config.max_wall_time_s is not None and len(pending) > 1:
                        # At most one step in flight, so that the clock below is the device's.
                        jax.block_until_ready(pending[-2])
                    seen, step = log.examples_seen, log.step
                    do_eval = every > 0 and (
                        seen // every > (seen - bs) // every or seen >= num_examples
                    )
                    do_save = config.checkpoint_every > 0 and step % config.checkpoint_every == 0
                    bar.update(bs)
                    if not (
                        measured or do_eval or do_save or step % config.log_every == 0 or stop_now()
                    ):
                        continue
                    state, row = write_row(state, bs, measured, do_eval)
                    stop, pending = row.get("stop_reason"), []
                    if do_save and not log.diverged:
                        ckpt.save(step, state, log.meta())
                    if stop is not None or policy.batch_size(state) != bs:
                        break
                    log.clock.charge("train")
    finally:
        log.clock.charge("pause")
        bar.close()
    return state, stop


def _learning_warnings(log: runlog.RunLog, final: dict, train_eval: dict, ds) -> list[str]:
    """A run that did not learn (a rate too large, or too small): its loss on the training
    data not below its first step's, or a test accuracy at chance; said in the log and
    ``summary.json``."""
    first, end, acc = log.initial_loss, train_eval.get("loss"), final.get("accuracy")
    classes = getattr(ds, "num_classes", None)
    if acc is not None and classes and acc <= 1.2 / classes:
        why = f"the test accuracy {acc:.1%} is at chance (1/{classes} classes)"
    elif first is not None and end is not None and end >= 0.98 * first:
        why = f"the training loss did not fall: {first:.4g} at the first step, {end:.4g} at the end"
    else:
        return []
    warning = why + ": the run did not learn; re-tune config.learning_rate"
    logging.warning("%s", warning)
    return [warning]


def _summarize(config, ds, setup: Setup, state, log: runlog.RunLog, stop: str, t_call: float):
    """The final evaluation (test set and a train subset, unless the run was interrupted or
    diverged), ``summary.json`` and the plots; ``t_call``: the call's start."""
    task = setup.task
    evaluate = stop in ("num_steps", task.target_field, "max_wall_time_s")
    final, train_eval, step_time, t0 = {}, {}, None, time.perf_counter()
    if evaluate:
        n_final = config.get("final_eval_examples")  # None (or no such field): all
        final = setup.evaluate(state, task.eval_arrays(config, ds, "test", n_final))
        train_eval = setup.evaluate(
            state, task.eval_arrays(config, ds, "train", config.eval_examples)
        )
        log.record_eval(task.score(final[task.metric]), periodic=False)
        if config.step_time_repeats:  # the step alone, for the device utilization
            batch = _first_batch(setup.train_batches, config.batch_size)
            step_time = hardware.time_step(
                jax.jit(setup.plain_fn),
                (state, batch),
                warmup=1,
                repeats=config.step_time_repeats,
                cache=hardware.CompileCache(),
            ).median_s
    rows = log.rows()
    clock = log.clock.state()
    summary = {
        # None where not evaluated; setup.evaluate's results include the task's metric
        **{f"test_{k}": final.get(k) for k in ("accuracy", "loss", task.metric, "examples")},
        **{f"train_{k}": train_eval.get(k) for k in ("accuracy", task.metric)},
        "train_accuracy_examples": train_eval.get("examples"),
        f"best_test_{task.metric}": task.score(log.best["accuracy"]),
        "best_step": log.best["step"],
        "time_to_best_s": log.best["time_s"],
        **clock,  # train_time_s, eval_time_s, compile_time_s, pause_time_s
        "final_eval_time_s": time.perf_counter() - t0,
        "wall_time_s": time.perf_counter() - t_call,
        "steps": log.step,
        "examples": log.examples_seen,
        "epochs": log.examples_seen / setup.num_train,
        **{k: config[k] for k in ("batch_size", "learning_rate", "optimizer")},
        "model": config.model.name,
        "num_params": int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
        "gns_method": setup.method,
        task.target_field: config[task.target_field],
        "time_to_target_s": log.to_target["time_s"],
        "steps_to_target": log.to_target["steps"],
        "stop_reason": stop,
        "start": log.start,
        "diverged": log.diverged,
        "noise_scale": (noise := noise_scale_summary(rows)),
        "warnings": _learning_warnings(log, final, train_eval, ds) + noise.pop("warnings"),
        "dtype": config.dtype,
        "mesh": mesh_lib.describe(setup.mesh),
    }
    if step_time is not None:  # how busy the pipeline (data and steps) keeps the devices
        rate = log.examples_seen / max(clock["train_time_s"], 1e-9)
        step_rate = config.batch_size / step_time
        summary.update(
            step_time_s=step_time,
            step_examples_per_s=step_rate,
            train_examples_per_s=rate,
            device_utilization=rate / step_rate,
        )
    if adaptive.enabled(config):  # its batch sizes and rates: the rows' columns
        last = next((r for r in reversed(rows) if "batch_size" in r), {})  # where it ended
        summary["schedule"] = adaptive.schedule_from_rows(rows) | {
            "final_batch_size": last.get("batch_size"),
            "final_learning_rate": last.get("learning_rate"),
        }
        if os.path.exists(table := os.path.join(log.workdir, STEP_TIMES_FILE)):
            summary["schedule"] |= runlog.read_json(table)  # what it decided on
    if log.data is not None:
        summary["data"] = log.data
    if config.plots and evaluate and log.primary:  # before the summary, which marks the end
        figures.training_plots(rows, log.workdir)
    if log.primary:
        runlog.write_json(os.path.join(log.workdir, SUMMARY_FILE), summary)
    return common.to_json(summary)


def noise_scale_summary(rows: list[dict]) -> dict:
    """``summary.json``'s ``noise_scale`` over the measured rows: ``b_simple`` (ratio of means)
    with its block-bootstrap ``interval``, mean ``g_sq`` and ``trace_cov``, ``block_size``,
    ``num_measurements``, ``num_dropped`` (non-finite, left out), ``last_ema_b_simple``, and
    ``recent``: the same over the last :func:`gns.smoothing.recent_window` (iid bootstrap,
    from ``from_step``). ``None`` values with fewer than 2 finite measurements. ``warnings``:
    measurements left out or unresolved (also logged)."""
    meas = [r for r in rows if "g_sq" in r]
    g = np.array([r["g_sq"] for r in meas], np.float64)  # None -> nan
    t = np.array([r.get("trace_cov") for r in meas], np.float64)
    finite = np.isfinite(g) & np.isfinite(t)
    g, t = g[finite], t[finite]
    out = dict.fromkeys(("b_simple", "interval", "g_sq", "trace_cov", "block_size"))
    out.update(
        num_measurements=len(g),
        num_dropped=len(meas) - len(g),
        recent=None,
        last_ema_b_simple=meas[-1].get("ema_b_simple") if meas else None,
    )
    warnings = []
    if out["num_dropped"]:
        warnings.append(
            f"{out['num_dropped']} of {len(meas)} noise-scale measurements are not finite (left "
            "out): the gradients overflowed; lower config.learning_rate, or stop such a run "
            "with config.divergence_factor"
        )
    if len(g) >= 3 and 2 * np.sum(g <= 0) > len(g):  # one step's estimate is often <= 0
        warnings.append(
            f"{np.sum(g <= 0)} of {len(g)} finite noise-scale measurements have g_sq <= 0 "
            "(b_simple null): the gradient is not resolved above its noise, or the run diverges"
        )
    for warning in warnings:
        logging.warning("%s.", warning)
    out["warnings"] = warnings
    if len(g) >= 2:
        k = smoothing.recent_window(len(g))
        last = smoothing.interval(g[-k:], t[-k:], block_size=1)
        steps = [r["step"] for r, ok in zip(meas, finite, strict=True) if ok]
        out["recent"] = {
            "b_simple": last.estimate,
            "interval": [last.low, last.high],
            "num_measurements": k,
            "from_step": steps[-k],
        }
        res = smoothing.interval(g, t)
        out.update(
            b_simple=res.estimate,
            interval=[res.low, res.high],
            g_sq=float(np.mean(g)),
            trace_cov=float(np.mean(t)),
            block_size=res.block_size,
        )
    return out
