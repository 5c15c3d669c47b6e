"""The tasks behind one interface, :class:`~experiments.tasks.base.Task`; ``config.task``
names one (default ``cifar10``). A new task is two files: a module ``experiments/tasks/<name>.py``
whose ``TASK`` is a :class:`Task` named ``<name>`` (with the rows of its config fields), and a
config file ``configs/<name>.py`` setting ``config.task = "<name>"``."""

from __future__ import annotations

import importlib
import re
from typing import Any

from experiments import rules
from experiments.cli import UserError
from experiments.tasks import image, teacher, text
from experiments.tasks.base import Task, cross_entropy, padded_batches

__all__ = [
    "Task", "TASKS", "get", "table", "batch_keys", "split_batch", "cross_entropy",
    "padded_batches",
]  # fmt: skip

IMAGE, LM, TEACHER = image.TASK, text.TASK, teacher.TASK
TASKS = {task.name: task for task in (IMAGE, LM, TEACHER)}  # and those get() has imported


def get(config) -> Task:
    """The task of ``config.task`` (``cifar10`` when the config has no such field): a built-in
    one, or the ``TASK`` of the module ``experiments.tasks.<name>``."""
    name = config.get("task", "cifar10")
    if name not in TASKS and isinstance(name, str) and re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        try:
            module = importlib.import_module(f"experiments.tasks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"experiments.tasks.{name}":
                raise
        else:
            task = getattr(module, "TASK", None)
            if not (isinstance(task, Task) and task.name == name):
                raise UserError(
                    f"experiments/tasks/{name}.py has no TASK = Task(name={name!r}, ...)",
                    hint="define it as experiments/tasks/teacher.py does",
                )
            TASKS[name] = task
    if name not in TASKS:
        raise UserError(
            f"config.task={name!r} is not one of {', '.join(TASKS)} and there is no module "
            f"experiments/tasks/{name}.py",
            hint="fix the name, or add the task (README: 'Adding a task')",
        )
    return TASKS[name]


def table(config) -> tuple[tuple, tuple]:
    """The rows and rules of ``config``'s fields (:func:`experiments.rules.task_table` of its
    task)."""
    return rules.task_table(get(config))


def batch_keys(batch: dict) -> tuple[str, str]:
    """The ``(inputs, targets)`` keys of a batch of any task (both in ``batch``)."""
    for task in TASKS.values():
        if task.keys[0] in batch and task.keys[1] in batch:
            return task.keys
    keys = [task.keys for task in TASKS.values()]
    raise KeyError(f"a batch needs one of the key pairs {keys}, got {sorted(batch)}")


def split_batch(batch: dict) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch of any task."""
    inputs, targets = batch_keys(batch)
    return batch[inputs], batch[targets]
