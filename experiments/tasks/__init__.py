"""The tasks of :data:`TASKS` behind one interface, :class:`~experiments.tasks.base.Task`;
``config.task`` names one (default ``cifar10``). A new task is a module here listed in
:data:`TASKS`, a config file ``configs/<task>.py`` and the rows of its fields in
:mod:`experiments.rules`."""

from __future__ import annotations

from typing import Any

from experiments.cli import UserError
from experiments.tasks import image, teacher, text
from experiments.tasks.base import Task, cross_entropy, padded_batches

__all__ = ["Task", "TASKS", "get", "batch_keys", "split_batch", "cross_entropy", "padded_batches"]

IMAGE, LM, TEACHER = image.TASK, text.TASK, teacher.TASK
TASKS = {task.name: task for task in (IMAGE, LM, TEACHER)}


def get(config) -> Task:
    """The task of ``config.task`` (``cifar10`` when the config has no such field)."""
    name = config.get("task", "cifar10")
    if name not in TASKS:
        raise UserError(
            f"config.task={name!r} is not one of {', '.join(TASKS)}",
            hint="e.g. --config.task=lm (configs/lm.py sets it)",
        )
    return TASKS[name]


def batch_keys(batch: dict) -> tuple[str, str]:
    """The ``(inputs, targets)`` keys of a batch of any task."""
    for task in TASKS.values():
        if task.keys[0] in batch:
            return task.keys
    keys = [task.keys for task in TASKS.values()]
    raise KeyError(f"a batch needs one of the key pairs {keys}, got {sorted(batch)}")


def split_batch(batch: dict) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch of any task."""
    inputs, targets = batch_keys(batch)
    return batch[inputs], batch[targets]
