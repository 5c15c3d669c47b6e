"""Tasks: what training, the sweep and compare know about the data and the objective of a
run, behind one interface, :class:`Task` (:mod:`experiments.tasks.base`); model, noise scale,
checkpoints and rows are shared.

The tasks (``config.task``; a config without the field is ``cifar10``), one module each:
``cifar10`` (:mod:`~experiments.tasks.image`: :mod:`experiments.data`'s images,
``target_accuracy``), ``lm`` (:mod:`~experiments.tasks.text`: byte windows of
:mod:`experiments.text`, ``target_bits_per_byte``) and ``teacher``
(:mod:`~experiments.tasks.teacher`: a synthetic teacher-student classification). A new task is
a module here listed in :data:`TASKS`, a config file ``configs/<task>.py`` and the rows of its
fields in :mod:`experiments.rules`; it trains with ``python -m experiments.run --config
configs/<task>.py`` (``gns train``).

Example::

    task = tasks.get(config)
    ds = task.load(config)
    batches = task.train_batches(config, ds, config.batch_size, start_example=0)
    batch_fn = task.batch_fn(config, ds)  # batch_fn(size, index), as gns.finder takes it
    held_out = task.eval_arrays(config, ds, "test", config.eval_examples)
    for batch in task.eval_batches(ds, held_out, 256):  # padded, with 'mask'
        inputs, targets = tasks.split_batch(batch)
"""

from __future__ import annotations

from typing import Any

from experiments.cli import UserError
from experiments.tasks import image, teacher, text
from experiments.tasks.base import Task, cross_entropy, padded_batches, subset

__all__ = [
    "Task",
    "TASKS",
    "get",
    "batch_keys",
    "split_batch",
    "BATCH_KEYS",
    "cross_entropy",
    "padded_batches",
    "subset",
]

IMAGE, LM, TEACHER = image.TASK, text.TASK, teacher.TASK
TASKS = {task.name: task for task in (IMAGE, LM, TEACHER)}
# (inputs, targets) keys of the batches of each task.
BATCH_KEYS = tuple(task.keys for task in TASKS.values())


def get(config) -> Task:
    """The task of ``config.task`` (``cifar10`` when the config has no such field); an
    unknown name raises :class:`UserError`."""
    name = config.get("task", "cifar10")
    if name not in TASKS:
        raise UserError(
            f"config.task={name!r} is not one of {', '.join(TASKS)}",
            hint="e.g. --config.task=lm (configs/lm.py sets it)",
        )
    return TASKS[name]


def batch_keys(batch: dict) -> tuple[str, str]:
    """The ``(inputs, targets)`` keys of a batch of any task (a pair of :data:`BATCH_KEYS`)."""
    for keys in BATCH_KEYS:
        if keys[0] in batch:
            return keys
    raise KeyError(f"a batch needs one of the key pairs {BATCH_KEYS}, got {sorted(batch)}")


def split_batch(batch: dict) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch of any task."""
    inputs, targets = batch_keys(batch)
    return batch[inputs], batch[targets]
