"""Plain training code shared by the CIFAR-10 main, the sweep driver and the compare mode.

``train_and_evaluate(config, workdir)`` trains ``config.model`` on ``config.data`` with the
noise scale measured along the way and writes into ``workdir``:

- ``config.json``: the config of the run;
- ``metrics.jsonl``: one JSON object per logged step (``step``, ``examples_seen``, ``epoch``,
  ``wall_time_s``, ``train_loss``, ``train_accuracy``, ``learning_rate``, ``test_accuracy`` on
  evaluation rows, and on noise-scale rows the raw ``g_sq``, ``trace_cov``, ``b_simple`` and the
  smoothed ``ema_g_sq``, ``ema_trace_cov``, ``ema_b_simple``);
- ``summary.json``: final full-test-set accuracy, times, steps, and the noise scale with its
  bootstrap interval;
- ``checkpoints/``: orbax checkpoints; re-running the same command resumes from the last one;
- ``training.png`` and ``noise_scale.png``.

Every ``config.gns_every`` steps the step takes its gradient from ``gns.estimate`` (per-example
gradients for models without BatchNorm, microbatches otherwise), so the measurement costs no
second backward pass and the update is the one a plain step would make. Models with BatchNorm
train with "ghost" BatchNorm over ``config.gns_microbatches`` equal groups of the batch on every
step, plain or measured, so the measured gradient is the training gradient.

``wall_time_s`` counts training only (data and steps, compilation excluded and reported as
``compile_time_s``); periodic evaluation is timed separately (``eval_time_s``), so times to a
target compare fairly across batch sizes.

Example (as in the tests)::

    from configs import cifar10
    config = cifar10.get_config("smoke")
    config.data.source = "synthetic"
    summary = train_and_evaluate(config, "/tmp/run")
    summary["test_accuracy"], summary["noise_scale"]["b_simple"]

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018).
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from experiments import models

PyTree = Any

__all__ = [
    "TrainState",
    "train_and_evaluate",
    "make_schedule",
    "make_optimizer",
    "make_loss_fn",
    "make_plain_loss_fn",
    "make_train_steps",
    "resolve_gns_method",
    "resolve_num_steps",
    "read_metrics",
    "write_json",
]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
GNS_METHODS = ("auto", "per_example", "microbatch")
OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")
SCHEDULES = ("constant", "cosine")


class TrainState(NamedTuple):
    """Everything a step changes, as one pytree (checkpointed as a whole).

    Attributes:
      step: number of optimizer updates done (int32 scalar).
      params: model parameters.
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: optax state.
      gns: the :func:`gns.smoothing.ema` tracker state.
      rng: base PRNG key (raw ``uint32[2]``); step ``s`` uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    gns: PyTree
    rng: jax.Array


# ---------------------------------------------------------------------------------------------
# Small helpers: config, JSON.


def _get(config, key, default=None):
    """``config.key`` or ``default`` when missing or ``None``."""
    try:
        value = config[key]
    except (KeyError, AttributeError, TypeError):
        value = getattr(config, key, default)
    return default if value is None else value


class QuietOrbax(std_logging.Filter):
    """A logging filter for the mains: drops orbax's INFO chatter (several lines per
    checkpoint), keeps its warnings."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same directory, then ``os.replace``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_default(x):
    if isinstance(x, np.generic | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def read_metrics(path: str) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file; a torn last line (killed run) is skipped."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("Skipping a malformed line of %s: %r", path, line[:80])
    return rows


def _truncate_metrics(path: str, last_step: int) -> list[dict]:
    """Keep only rows with ``step <= last_step`` (atomic rewrite); returns the kept rows."""
    rows = [r for r in read_metrics(path) if int(r.get("step", -1)) <= last_step]
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return rows


def _float(x) -> float:
    return float(np.asarray(x))


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule.


def resolve_num_steps(config, num_train: int) -> int:
    """``config.num_epochs`` (if set) converted to steps, else ``config.num_steps``."""
    epochs = _get(config, "num_epochs")
    if epochs is not None:
        return max(1, math.ceil(float(epochs) * num_train / config.batch_size))
    steps = _get(config, "num_steps")
    if steps is None or int(steps) < 1:
        raise ValueError(
            f"config.num_steps={steps!r}: set config.num_steps to a positive int or "
            "config.num_epochs to a positive number."
        )
    return int(steps)


def make_schedule(config, num_steps: int) -> optax.Schedule:
    """Linear warmup over ``config.warmup_steps`` then constant or cosine decay to zero.

    Args:
      config: with ``learning_rate``, ``warmup_steps`` and ``schedule`` in ``{'constant',
        'cosine'}``.
      num_steps: total number of steps (the cosine reaches 0 there).

    Returns:
      An optax schedule ``step -> learning rate``.
    """
    lr = float(config.learning_rate)
    warmup = int(_get(config, "warmup_steps", 0))
    kind = _get(config, "schedule", "constant")
    if kind not in SCHEDULES:
        raise ValueError(f"config.schedule={kind!r}: use one of {', '.join(SCHEDULES)}.")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, max(1, num_steps - warmup))
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(params):
    """Weight decay on kernels only (not on biases and normalization scales/offsets)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optax optimizer named by ``config.optimizer``.

    ``sgd``: SGD with ``config.momentum`` (Nesterov if ``config.nesterov``) and L2 weight decay
    ``config.weight_decay``; ``adam``: Adam with L2 weight decay; ``adamw``: AdamW (decoupled
    decay); ``lamb``: LAMB (You et al. 2020). Weight decay applies to kernels only.
    """
    name = _get(config, "optimizer", "adam")
    wd = float(_get(config, "weight_decay", 0.0))
    momentum = float(_get(config, "momentum", 0.9))
    if name == "sgd":
        opt = optax.sgd(
            schedule, momentum=momentum or None, nesterov=bool(_get(config, "nesterov"))
        )
    elif name == "adam":
        opt = optax.adam(schedule)
    elif name == "adamw":
        return optax.adamw(schedule, weight_decay=wd, mask=_decay_mask)
    elif name == "lamb":
        return optax.lamb(schedule, weight_decay=wd, mask=_decay_mask)
    else:
        raise ValueError(f"config.optimizer={name!r}: use one of {', '.join(OPTIMIZERS)}.")
    if wd:
        opt = optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask), opt)
    return opt


# ---------------------------------------------------------------------------------------------
# Losses and steps.


def resolve_gns_method(config, model) -> str:
    """``config.gns_method`` with ``'auto'`` resolved: per_example without BatchNorm, else
    microbatch. Explicit per_example on a BatchNorm model is an error."""
    method = _get(config, "gns_method", "auto")
    if method not in GNS_METHODS:
        raise ValueError(f"config.gns_method={method!r}: use one of {', '.join(GNS_METHODS)}.")
    bn = models.has_batch_norm(model)
    if method == "auto":
        return "microbatch" if bn else "per_example"
    if method == "per_example" and bn:
        raise ValueError(
            f"config.gns_method='per_example' is invalid for {type(model).__name__}, which has "
            "BatchNorm (a batch of one normalizes over itself): use 'microbatch' or 'auto'."
        )
    return method


def _forward(model, params, batch_stats, images, dropout_key, train):
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    rngs = {"dropout": dropout_key} if dropout_key is not None else None
    if train and batch_stats:
        logits, updates = model.apply(
            variables, images, train=True, rngs=rngs, mutable=["batch_stats"]
        )
        return logits, updates["batch_stats"]
    return model.apply(variables, images, train=train, rngs=rngs), batch_stats


def make_loss_fn(model, batch_stats: PyTree, rng: jax.Array | None) -> Callable:
    """The training loss as ``loss_fn(params, batch) -> (loss, aux)``, for ``gns.estimate``.

    Args:
      model: a Flax module from :func:`experiments.models.get_model`.
      batch_stats: BatchNorm statistics (``{}`` without BatchNorm), closed over.
      rng: PRNG key for dropout, or ``None``. The key of a (micro)batch is
        ``fold_in(rng, batch['index'][0])``, so different microbatches (and examples) draw
        different masks.

    Returns:
      ``loss_fn`` with ``batch = {'image', 'label', 'index'}``: mean cross-entropy and
      ``aux = {'loss', 'accuracy', 'batch_stats'}`` (the updated BatchNorm statistics).
    """

    def loss_fn(params, batch):
        key = None if rng is None else jax.random.fold_in(rng, batch["index"][0])
        logits, new_stats = _forward(model, params, batch_stats, batch["image"], key, True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"loss": loss, "accuracy": accuracy, "batch_stats": new_stats}

    return loss_fn


def make_plain_loss_fn(model, batch_stats, rng, groups: int = 1) -> Callable:
    """:func:`make_loss_fn` over ``groups`` equal groups of the batch (ghost BatchNorm).

    With ``groups > 1`` the batch is split as ``gns.estimate.microbatch`` splits it and the
    groups run in parallel (``jax.vmap``); the loss is the mean of the group losses and the
    BatchNorm statistics the mean of the groups' updates. Its gradient is exactly the mean of
    the microbatch gradients, i.e. the gradient the microbatch estimator returns.
    """
    base = make_loss_fn(model, batch_stats, rng)
    if groups == 1:
        return base

    def loss_fn(params, batch):
        split = jax.tree.map(
            lambda x: x.reshape((groups, x.shape[0] // groups) + x.shape[1:]), batch
        )
        losses, aux = jax.vmap(base, in_axes=(None, 0))(params, split)
        return jnp.mean(losses), jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)

    return loss_fn


def _with_index(batch):
    n = batch["label"].shape[0]
    return {"image": batch["image"], "label": batch["label"], "index": jnp.arange(n)}


def make_train_steps(
    model,
    optimizer: optax.GradientTransformation,
    tracker,
    *,
    method: str,
    num_microbatches: int = 8,
    chunk_size: int | None = None,
    use_dropout: bool = False,
    schedule: optax.Schedule | None = None,
):
    """The two (unjitted) step functions ``step(state, batch) -> (state, metrics)``.

    Args:
      model: the Flax module.
      optimizer: the optax optimizer.
      tracker: a :func:`gns.smoothing.ema` tracker.
      method: ``'per_example'`` or ``'microbatch'`` (see :func:`resolve_gns_method`).
      num_microbatches: microbatches of the estimator; BatchNorm models also use them as
        ghost-BatchNorm groups in the plain step.
      chunk_size: ``gns.estimate.per_example`` chunk size.
      use_dropout: draw dropout keys (the model has dropout).
      schedule: to report the learning rate of the step.

    Returns:
      ``(plain_step, gns_step)``. Both apply the same update for the same batch; ``gns_step``
      takes its gradient from ``gns.estimate`` and adds ``g_sq``, ``trace_cov``, ``b_simple``
      and the smoothed ``ema_*`` values to its metrics.
    """
    from gns import estimate

    bn = models.has_batch_norm(model)
    groups = num_microbatches if (bn and method == "microbatch") else 1

    def step_key(state):
        return jax.random.fold_in(state.rng, state.step) if use_dropout else None

    def apply_update(state, grads, aux):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        batch_stats = aux["batch_stats"] if bn else state.batch_stats
        return state._replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )

    def base_metrics(state, aux):
        lr = schedule(state.step) if schedule is not None else jnp.nan
        return {"train_loss": aux["loss"], "train_accuracy": aux["accuracy"], "learning_rate": lr}

    def plain_step(state, batch):
        batch = _with_index(batch)
        loss_fn = make_plain_loss_fn(model, state.batch_stats, step_key(state), groups)
        grads, aux = jax.grad(loss_fn, has_aux=True)(state.params, batch)
        return apply_update(state, grads, aux), base_metrics(state, aux)

    def gns_step(state, batch):
        batch = _with_index(batch)
        loss_fn = make_loss_fn(model, state.batch_stats, step_key(state))
        if method == "per_example":
            stats, grads, aux = estimate.per_example(
                loss_fn, state.params, batch, chunk_size=chunk_size, has_aux=True
            )
        elif method == "microbatch":
            stats, grads, aux = estimate.microbatch(
                loss_fn, state.params, batch, num_microbatches=num_microbatches, has_aux=True
            )
        else:
            raise ValueError(f"method={method!r}: use 'per_example' or 'microbatch'.")
        aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)  # equal-size pieces
        gns_state = tracker.update(stats, state.gns)
        metrics = base_metrics(state, aux)
        metrics.update(
            g_sq=stats.g_sq,
            trace_cov=stats.trace_cov,
            b_simple=stats.b_simple,
            ema_g_sq=gns_state.g_sq,
            ema_trace_cov=gns_state.trace_cov,
            ema_b_simple=gns_state.b_simple,
        )
        return apply_update(state, grads, aux)._replace(gns=gns_state), metrics

    return plain_step, gns_step


def make_eval_step(model):
    """``eval_step(params, batch_stats, images, labels, mask) -> (correct, loss_sum)``."""

    def eval_step(params, batch_stats, images, labels, mask):
        logits, _ = _forward(model, params, batch_stats, images, None, False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.sum(correct * mask), jnp.sum(losses * mask)

    return eval_step


def _evaluate(eval_step, state, images, labels, mean, std, batch_size) -> dict[str, float]:
    """Accuracy and mean loss over ``images`` (the last batch padded to a fixed shape)."""
    from experiments import data

    correct = loss = 0.0
    n = 0
    for batch in data.eval_batches(images, labels, batch_size, mean, std, pad=True):
        mask = np.asarray(batch["mask"], np.float32)
        c, s = eval_step(state.params, state.batch_stats, batch["image"], batch["label"], mask)
        correct, loss, n = correct + _float(c), loss + _float(s), n + int(mask.sum())
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "examples": n}


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _checkpoint_manager(workdir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True, enable_async_checkpointing=False
        ),
    )


def _save_checkpoint(manager, state: TrainState, meta: dict) -> None:
    import orbax.checkpoint as ocp

    step = int(state.step)
    if manager.latest_step() == step:
        return
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    manager.wait_until_finished()


def _restore_checkpoint(manager, target: TrainState):
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None, None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, dict(restored.meta)


# ---------------------------------------------------------------------------------------------
# The training loop.


def _progress_bar(config, total: int, initial: int):
    from tqdm import tqdm

    enabled = bool(_get(config, "progress_bar", True)) and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _subset(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Indices of a fixed random subset (sorted); all of them when ``n`` is None or too big."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


def init_state(config, model, optimizer, tracker, image_shape) -> TrainState:
    """A fresh :class:`TrainState` from ``config.seed``."""
    rng = jax.random.PRNGKey(int(config.seed))
    init_rng, dropout_rng = jax.random.split(rng)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1,) + tuple(image_shape)), train=False))(
        init_rng
    )
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        gns=tracker.init(),
        rng=dropout_rng,
    )


def train_and_evaluate(config, workdir: str) -> dict:
    """Train, evaluate and write the outputs described in the module docstring.

    Args:
      config: an ``ml_collections.ConfigDict`` from ``configs/cifar10.py``.
      workdir: output directory; if it holds a checkpoint the run resumes from it (metrics
        rows after the checkpoint are dropped, the data stream restarts at that step).

    Returns:
      The summary dict (also written to ``workdir/summary.json``).
    """
    from experiments import data
    from gns import plots, smoothing

    os.makedirs(workdir, exist_ok=True)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    write_json(os.path.join(workdir, CONFIG_FILE), config_dict)

    ds = data.load(config.data)
    num_train = int(ds.train_labels.shape[0])
    image_shape = tuple(ds.train_images.shape[1:])
    batch_size = int(config.batch_size)
    if batch_size < 2:
        raise ValueError(f"config.batch_size={batch_size}: the noise scale needs batch_size >= 2.")
    model = models.get_model(config.model, num_classes=ds.num_classes)
    method = resolve_gns_method(config, model)
    k = int(_get(config, "gns_microbatches", 8))
    if method == "microbatch" and (k < 2 or batch_size % k):
        raise ValueError(
            f"config.gns_microbatches={k} must be >= 2 and divide config.batch_size="
            f"{batch_size} (equal microbatches for the estimator and for ghost BatchNorm): "
            "pick a divisor of the batch size."
        )
    num_steps = resolve_num_steps(config, num_train)
    schedule = make_schedule(config, num_steps)
    optimizer = make_optimizer(config, schedule)
    tracker = smoothing.ema(float(_get(config, "gns_ema_decay", 0.95)))
    gns_every = int(_get(config, "gns_every", 0))
    log_every = max(1, int(_get(config, "log_every", 100)))
    eval_every = int(_get(config, "eval_every", 0))
    checkpoint_every = int(_get(config, "checkpoint_every", 0))
    target = _get(config, "target_accuracy")
    max_wall = _get(config, "max_wall_time_s")
    eval_batch = min(int(_get(config, "eval_batch_size", 500)), int(ds.test_labels.shape[0]))
    if target is not None and eval_every <= 0:
        raise ValueError("config.target_accuracy is set but config.eval_every <= 0: set both.")

    plain_fn, gns_fn = make_train_steps(
        model,
        optimizer,
        tracker,
        method=method,
        num_microbatches=k,
        chunk_size=_get(config, "gns_chunk_size"),
        use_dropout=models.uses_dropout(model),
        schedule=schedule,
    )
    eval_step = jax.jit(make_eval_step(model))

    state = init_state(config, model, optimizer, tracker, image_shape)
    manager = _checkpoint_manager(workdir)
    restored, meta = _restore_checkpoint(manager, state)
    meta = meta or {}
    if restored is not None:
        state = restored
        logging.info("Resumed from the checkpoint at step %d.", int(state.step))
    # Distinct buffers per leaf: state is donated to the steps, and init functions may share
    # one array between leaves (e.g. two zeros), which donation rejects.
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    start_step = int(state.step)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    _truncate_metrics(metrics_path, start_step)

    wall = float(meta.get("wall_time_s", 0.0))
    eval_time = float(meta.get("eval_time_s", 0.0))
    best = {
        "accuracy": meta.get("best_test_accuracy"),
        "time": meta.get("time_to_best_s"),
        "step": meta.get("best_step"),
    }
    to_target = {"time": meta.get("time_to_target_s"), "steps": meta.get("steps_to_target")}
    test_idx = _subset(int(ds.test_labels.shape[0]), _get(config, "eval_examples"), 1)
    train_idx = _subset(num_train, _get(config, "eval_examples", 5000), 2)
    mean, std = ds.mean, ds.std

    def evaluate(images, labels):
        return _evaluate(eval_step, state, images, labels, mean, std, eval_batch)

    # Compile both steps before the clock starts (compilation is not training time).
    batches: Iterator = data.train_batches(
        ds,
        batch_size,
        seed=int(config.seed),
        start_step=start_step,
        augment=bool(_get(config.data, "augment", True)),
    )
    t_compile = time.perf_counter()
    example = next(batches)
    plain_step = jax.jit(plain_fn, donate_argnums=0).lower(state, example).compile()
    gns_step = (
        jax.jit(gns_fn, donate_argnums=0).lower(state, example).compile() if gns_every else None
    )
    compile_time = time.perf_counter() - t_compile

    def meta_now():
        return {
            "wall_time_s": wall,
            "eval_time_s": eval_time,
            "best_test_accuracy": best["accuracy"],
            "time_to_best_s": best["time"],
            "best_step": best["step"],
            "time_to_target_s": to_target["time"],
            "steps_to_target": to_target["steps"],
        }

    pending: list[dict] = []  # device metrics since the last row
    bar = _progress_bar(config, num_steps, start_step)
    stop_reason = "num_steps"
    step = start_step
    seg_start = time.perf_counter()
    seg_examples = 0
    pending_batch = example
    reached = to_target["steps"] is not None
    try:
        with open(metrics_path, "a") as metrics_file:
            while step < num_steps:
                if reached and target is not None:
                    stop_reason = "target_accuracy"
                    break
                if max_wall is not None and wall >= max_wall:  # resumed past the budget
                    stop_reason = "max_wall_time_s"
                    break
                batch = pending_batch if pending_batch is not None else next(batches)
                pending_batch = None
                measured = bool(gns_every) and step % gns_every == 0
                state, m = (gns_step if measured else plain_step)(state, batch)
                step += 1
                seg_examples += batch_size
                pending.append(m)
                if max_wall is not None and len(pending) > 1:
                    # Keep at most one step in flight, so the clock read below is the device's
                    # (asynchronous dispatch would otherwise let a budget overshoot).
                    jax.block_until_ready(pending[-2])
                do_eval = eval_every > 0 and (step % eval_every == 0 or step == num_steps)
                do_save = checkpoint_every > 0 and step % checkpoint_every == 0
                last = step == num_steps
                over = max_wall is not None and wall + time.perf_counter() - seg_start >= max_wall
                if not (measured or do_eval or do_save or last or over or step % log_every == 0):
                    bar.update(1)
                    continue
                # A row: block, account time, then (outside the clock) evaluate and write.
                jax.block_until_ready(state.params)
                now = time.perf_counter()
                wall += now - seg_start
                host = jax.device_get(pending)
                pending = []
                row = {
                    "step": step,
                    "examples_seen": step * batch_size,
                    "epoch": data.epochs_of(step, batch_size, num_train),
                    "wall_time_s": wall,
                    "examples_per_s": seg_examples / max(now - seg_start, 1e-9),
                    "train_loss": float(np.mean([h["train_loss"] for h in host])),
                    "train_accuracy": float(np.mean([h["train_accuracy"] for h in host])),
                    "learning_rate": float(host[-1]["learning_rate"]),
                }
                if measured:
                    for key in ("g_sq", "trace_cov", "b_simple") + tuple(
                        "ema_" + s for s in ("g_sq", "trace_cov", "b_simple")
                    ):
                        row[key] = float(host[-1][key])
                if do_eval:
                    t_eval = time.perf_counter()
                    res = evaluate(ds.test_images[test_idx], ds.test_labels[test_idx])
                    eval_time += time.perf_counter() - t_eval
                    row["test_accuracy"], row["test_loss"] = res["accuracy"], res["loss"]
                    if best["accuracy"] is None or res["accuracy"] > best["accuracy"]:
                        best.update(accuracy=res["accuracy"], time=wall, step=step)
                    if target is not None and not reached and res["accuracy"] >= float(target):
                        reached = True
                        to_target.update(time=wall, steps=step)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                bar.set_postfix(
                    loss=f"{row['train_loss']:.3f}",
                    acc=f"{row['train_accuracy']:.3f}",
                    ex_s=f"{row['examples_per_s']:.0f}",
                    b_simple=f"{row.get('ema_b_simple', float('nan')):.4g}",
                    refresh=False,
                )
                bar.update(1)
                if do_save and step < num_steps:
                    _save_checkpoint(manager, state, meta_now())
                seg_start, seg_examples = time.perf_counter(), 0
                if over and wall >= max_wall:  # the last row is the step that used the budget
                    stop_reason = "max_wall_time_s"
                    break
    except KeyboardInterrupt:
        logging.warning("Interrupted at step %d: saving a checkpoint, then exiting.", step)
        _save_on_exit(manager, state, meta_now)
        raise
    finally:
        bar.close()
        batches.close()
    if pending:  # defensive: every way out of the loop follows a row
        jax.block_until_ready(state.params)
        wall += time.perf_counter() - seg_start
    _save_checkpoint(manager, state, meta_now())

    # Final evaluation on the full test set and a train subset (eval mode, no augmentation).
    t_eval = time.perf_counter()
    final = evaluate(ds.test_images, ds.test_labels)
    train_eval = evaluate(ds.train_images[train_idx], ds.train_labels[train_idx])
    final_eval_time = time.perf_counter() - t_eval
    if best["accuracy"] is None or final["accuracy"] > best["accuracy"]:
        best.update(accuracy=final["accuracy"], time=wall, step=step)
    if target is not None and to_target["steps"] is None and final["accuracy"] >= float(target):
        to_target.update(time=wall, steps=step)

    rows = read_metrics(metrics_path)
    summary = {
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "test_examples": final["examples"],
        "train_accuracy": train_eval["accuracy"],
        "train_accuracy_examples": train_eval["examples"],
        "best_test_accuracy": best["accuracy"],
        "best_step": best["step"],
        "time_to_best_s": best["time"],
        "wall_time_s": wall,
        "eval_time_s": eval_time,
        "final_eval_time_s": final_eval_time,
        "compile_time_s": compile_time,
        "steps": step,
        "examples": step * batch_size,
        "epochs": data.epochs_of(step, batch_size, num_train),
        "batch_size": batch_size,
        "learning_rate": float(config.learning_rate),
        "optimizer": _get(config, "optimizer"),
        "model": _get(config.model, "name"),
        "num_params": int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
        "gns_method": method,
        "target_accuracy": target,
        "time_to_target_s": to_target["time"],
        "steps_to_target": to_target["steps"],
        "stop_reason": stop_reason,
        "noise_scale": noise_scale_summary(rows, smoothing),
    }
    write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    try:
        if _get(config, "plots", True):
            plots.training_plots(rows, workdir)
    except Exception as e:  # plots are a convenience: never lose a finished run to them
        logging.warning("Could not write the plots: %s", e)
    return summary


def _save_on_exit(manager, state, meta_now):
    try:
        jax.block_until_ready(state.params)
        _save_checkpoint(manager, state, meta_now())
    except Exception as e:  # e.g. buffers donated to a step that was interrupted
        logging.error("Could not save a checkpoint on exit (%s); the last periodic one stays.", e)


def noise_scale_summary(rows: list[dict], smoothing) -> dict:
    """``b_simple`` over all measured steps (ratio of means) with its bootstrap interval.

    Args:
      rows: metrics rows; those with ``g_sq`` and ``trace_cov`` are the measurements.
      smoothing: the :mod:`gns.smoothing` module.

    Returns:
      ``{'b_simple', 'interval': [lo, hi], 'g_sq', 'trace_cov', 'num_measurements',
      'last_ema_b_simple'}`` (``None`` values when fewer than 2 finite measurements).
    """
    meas = [r for r in rows if "g_sq" in r and "trace_cov" in r]
    g = np.array([r["g_sq"] for r in meas], np.float64)
    t = np.array([r["trace_cov"] for r in meas], np.float64)
    out = {
        "b_simple": None,
        "interval": None,
        "g_sq": None,
        "trace_cov": None,
        "num_measurements": len(meas),
        "last_ema_b_simple": meas[-1].get("ema_b_simple") if meas else None,
    }
    finite = np.isfinite(g) & np.isfinite(t)
    if finite.sum() >= 2:
        res = smoothing.interval(g, t)
        out.update(
            b_simple=res.estimate,
            interval=[res.low, res.high],
            g_sq=float(np.mean(g[finite])),
            trace_cov=float(np.mean(t[finite])),
            block_size=res.block_size,
        )
    return out
