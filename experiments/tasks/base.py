"""The :class:`Task` interface and what its implementations share; :mod:`experiments.tasks`
holds the registry."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import optax

from experiments import data


def cross_entropy(logits, targets):
    """Per-example softmax cross-entropy of integer ``targets``, the mean over the positions
    of a sequence (``[B, T, V]`` logits, ``[B, T]`` targets) or of ``[B, C]`` logits."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return losses.reshape(losses.shape[0], -1).mean(1)


def padded_batches(arrays: dict, batch_size: int) -> Iterator[dict]:
    """``arrays`` (equal leading axes) in batches of ``batch_size``, the last one padded with
    zeros, each with a bool ``mask`` of the real examples."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        pad = batch_size - size
        batch = {
            k: np.pad(v[start : start + size], [(0, pad)] + [(0, 0)] * (v.ndim - 1))
            for k, v in arrays.items()
        }
        yield {**batch, "mask": np.arange(batch_size) < size}


class Task(NamedTuple):
    """A task: its data (``ds``, what ``load`` returns), batches, loss and target metric. Its
    train examples form a stream, a pure function of the seed and the positions, so a run that
    changes its batch size, or resumes, sees the examples of an uninterrupted run."""

    name: str  # the value of config.task
    keys: tuple[str, str]  # the (inputs, targets) keys of its batches
    metric: str  # the evaluation result its target is on
    lower_is_better: bool  # which way the metric improves
    target_field: str  # the config field of the target
    load: Callable  # load(config) -> ds
    num_train: Callable  # num_train(ds): train examples per epoch
    input_spec: Callable  # input_spec(ds) -> (shape, dtype) of one model input
    batch: Callable  # batch(config, ds, size, start): train examples [start, start + size)
    eval_arrays: Callable  # eval_arrays(config, ds, split, n): n (None: all) fixed examples
    describe: Callable  # describe(ds): the data's record (a resume checks it) or None
    # eval_batches(ds, arrays, batch_size): the arrays as padded_batches
    eval_batches: Callable = lambda ds, arrays, batch_size: padded_batches(arrays, batch_size)
    metrics: Callable = lambda result: {}  # the task's own metrics of an evaluation result
    loss: Callable = cross_entropy  # loss(logits, targets) -> [B]
    # step_batches(config, ds, batch_size, start_step): a stream by steps (epoch tails dropped)
    # that train_batches yields instead of the example stream
    step_batches: Callable | None = None
    # The rows (field, experiments.rules.Kind) of the task's own config fields, and its rules
    # between fields (experiments.rules.cross): rules.task_table adds the training fields'.
    fields: tuple = ()
    cross: tuple = ()
    modes: tuple[str, ...] = ("train",)  # config.mode values it runs (compare needs images)

    def score(self, value: float | None) -> float | None:
        """``value`` of :attr:`metric` as a higher-is-better score, as
        :class:`experiments.runlog.RunLog` tracks it (its own inverse)."""
        return None if value is None else (-value if self.lower_is_better else value)

    def target(self, config) -> float | None:
        """The config's target as a :meth:`score` (``None``: no target)."""
        return self.score(config.get(self.target_field))

    def batch_fn(self, config, ds) -> Callable[[int, int], dict]:
        """``batch_fn(size, index)``: examples ``[index·size, (index+1)·size)`` of the example
        stream (the form :func:`gns.finder.as_batch_fn` takes)."""
        return lambda size, index: self.batch(config, ds, size, index * size)

    def train_batches(
        self, config, ds, batch_size: int, start_example: int, by_example: bool = False
    ) -> Iterator[dict]:
        """Endless train batches of ``batch_size`` from example ``start_example`` on, computed
        ahead in a thread (close the iterator to stop it): the step stream where the task has
        one and not ``by_example``, else the example stream of :attr:`batch`."""
        if not 1 <= batch_size <= self.num_train(ds) or start_example < 0:
            raise ValueError(
                f"batch_size={batch_size} must be in [1, {self.num_train(ds)}] and "
                f"start_example={start_example} >= 0."
            )
        if self.step_batches is not None and not by_example:
            step, rest = divmod(start_example, batch_size)
            if rest:
                raise ValueError(
                    f"start_example={start_example} is not a multiple of {batch_size}."
                )
            return self.step_batches(config, ds, batch_size, step)
        starts = itertools.count(start_example, batch_size)
        return data.prefetched(lambda: self.batch(config, ds, batch_size, next(starts)))


def split_subset(train: dict, test: dict, split: str, n: int | None) -> dict:
    """:attr:`Task.eval_arrays` of a task with its splits in memory: a fixed random subset of
    ``n`` examples (``None``: all) of the ``test`` arrays, or of the ``train`` ones."""
    arrays = test if split == "test" else train
    total = len(next(iter(arrays.values())))
    if n is None or n >= total:
        return arrays
    rng = np.random.default_rng(1 if split == "test" else 2)
    idx = np.sort(rng.permutation(total)[:n])
    return {k: v[idx] for k, v in arrays.items()}
