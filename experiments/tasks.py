"""What :func:`experiments.train.train_and_evaluate` needs to know about a task, in one place.

A :class:`Task` says how to load the data of a config, stream its train batches, pick the
held-out arrays, batch them for evaluation, and which evaluation metric the run's target is on
(and whether lower is better). Everything else (model, loss, noise scale, checkpoints, rows) is
shared: the loss is the mean softmax cross-entropy of the model's logits against integer
targets, per image (``[B, C]`` logits, ``[B]`` labels) or per token (``[B, T, V]`` logits,
``[B, T]`` next bytes), and ``accuracy`` is the fraction of argmax hits (next-byte accuracy for
the language model).

Tasks (``config.task``; a config without the field is ``cifar10``):

* ``cifar10``: images from :mod:`experiments.data`, batches ``{'image', 'label'}``, target
  ``config.target_accuracy`` (higher is better).
* ``lm``: byte windows from :mod:`experiments.text`, batches ``{'tokens', 'targets'}``, target
  ``config.target_bits_per_byte`` (lower is better; bits per byte = loss in nats / ln 2).

Example::

    task = tasks.get(config)
    ds = task.load(config)
    batches = task.train_batches(config, ds, config.batch_size, start_example=0)
    held_out = task.eval_arrays(config, ds, "test", config.eval_examples)
    for batch in task.eval_batches(ds, held_out, 256):  # padded, with 'mask'
        inputs, targets = tasks.split_batch(batch)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from experiments import data, text
from experiments.cli import UserError

__all__ = [
    "Task",
    "TASKS",
    "get",
    "batch_keys",
    "split_batch",
    "BATCH_KEYS",
    "padded_batches",
    "subset",
]

# (inputs, targets) keys of the batches of each task.
BATCH_KEYS = (("image", "label"), ("tokens", "targets"))


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


class Task(NamedTuple):
    """The data side of a training run.

    Attributes:
      name: the value of ``config.task``.
      metric: the evaluation result the target is on (``accuracy``, ``bits_per_byte``).
      lower_is_better: whether a lower ``metric`` is better.
      target_field: the config field of the target (``None`` there: no target).
      load: ``load(config) -> dataset``.
      num_train: ``num_train(ds)``: train examples per epoch.
      input_spec: ``input_spec(ds) -> (shape, dtype)`` of one example's model input.
      train_batches: ``train_batches(config, ds, batch_size, start_example, by_example)``:
        endless batches of ``batch_size`` from train example ``start_example`` on (a pure
        function of the seed and the position, so a resume sees the batches of an uninterrupted
        run). The image stream is indexed by steps unless ``by_example`` (a changing batch
        size: :func:`experiments.data.stream_indices`), so ``start_example`` must then be a
        multiple of ``batch_size``; the text stream is always indexed by examples.
      eval_arrays: ``eval_arrays(config, ds, split, n) -> arrays``: a fixed set of ``n``
        examples (``None``: all) of ``split`` (``'test'``, or ``'train'`` for the final train
        metrics).
      eval_batches: ``eval_batches(ds, arrays, batch_size)``: batches of ``batch_size`` in
        order, the last padded, each with a bool ``mask`` of the real examples.
      metrics: ``metrics(result) -> dict``: task metrics of an evaluation result (``loss``,
        ``accuracy``), e.g. ``{'bits_per_byte': ...}`` (``None`` values for ``{}``: no
        evaluation).
      describe: ``describe(ds) -> dict | None``: where the data came from and its content's
        fingerprint, for the summary and the run's data identity (checked on resume).
    """

    name: str
    metric: str
    lower_is_better: bool
    target_field: str
    load: Callable
    num_train: Callable
    input_spec: Callable
    train_batches: Callable
    eval_arrays: Callable
    eval_batches: Callable
    metrics: Callable
    describe: Callable

    def score(self, value: float | None) -> float | None:
        """``value`` of :attr:`metric` as a higher-is-better score (negated when lower is
        better), as :class:`experiments.runlog.RunLog` tracks best and target; its own inverse."""
        return None if value is None else (-value if self.lower_is_better else value)

    def target(self, config) -> float | None:
        """The config's target as a :meth:`score` (``None``: no target)."""
        return self.score(config.get(self.target_field))


def subset(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Indices of a fixed random subset (sorted); all of them when ``n`` is None or too big."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n])


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
        batch["mask"] = np.arange(batch_size) < size
        yield batch


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (and any image classification set of experiments.data).


def _image_load(config):
    return data.load(config.data)


def _image_train_batches(
    config, ds, batch_size: int, start_example: int, by_example: bool = False
) -> Iterator[dict]:
    if by_example:  # the example stream (a changing batch size)
        return data.train_batches(
            ds, batch_size, seed=config.seed, start_example=start_example,
            augment=config.data.augment)  # fmt: skip
    step, rest = divmod(start_example, batch_size)
    if rest:
        raise ValueError(f"start_example={start_example} is not a multiple of {batch_size}.")
    return data.train_batches(
        ds, batch_size, seed=config.seed, start_step=step, augment=config.data.augment
    )


def _image_eval_arrays(config, ds, split: str, n: int | None) -> dict:
    images, labels = (ds.test_images, ds.test_labels) if split == "test" else (
        ds.train_images, ds.train_labels)  # fmt: skip
    idx = subset(len(labels), n, 1 if split == "test" else 2)
    return {"image": images[idx], "label": labels[idx]}


def _image_eval_batches(ds, arrays: dict, batch_size: int) -> Iterator[dict]:
    return data.eval_batches(
        arrays["image"], arrays["label"], batch_size, ds.mean, ds.std, pad=True
    )


IMAGE = Task(
    name="cifar10", metric="accuracy", lower_is_better=False, target_field="target_accuracy",
    load=_image_load,
    num_train=lambda ds: len(ds.train_labels),
    input_spec=lambda ds: (tuple(ds.train_images.shape[1:]), np.float32),
    train_batches=_image_train_batches,
    eval_arrays=_image_eval_arrays,
    eval_batches=_image_eval_batches,
    metrics=lambda result: {},
    describe=lambda ds: {"fingerprint": ds.fingerprint},
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Byte-level language modelling (experiments.text).


def _text_load(config):
    return text.load(config.data, context=config.model.context)


def _text_train_batches(
    config, ds, batch_size: int, start_example: int, by_example: bool = True
) -> Iterator[dict]:
    spans = text.constant_spans(batch_size, start_example)
    return text.train_batches(ds, spans, seed=config.seed)


def _text_eval_arrays(config, ds, split: str, n: int | None) -> dict:
    if split == "test":
        return ds.eval_arrays(n)
    n = ds.examples_per_epoch if n is None else min(n, ds.examples_per_epoch)
    return text.train_batch(ds, 0, n, seed=config.seed)  # the first windows of training


def _bits_per_byte(result: dict) -> dict:
    loss = result.get("loss")
    return {"bits_per_byte": None if loss is None else text.bits_per_byte(loss)}


LM = Task(
    name="lm", metric="bits_per_byte", lower_is_better=True, target_field="target_bits_per_byte",
    load=_text_load,
    num_train=lambda ds: ds.examples_per_epoch,
    input_spec=lambda ds: ((ds.context,), np.int32),
    train_batches=_text_train_batches,
    eval_arrays=_text_eval_arrays,
    eval_batches=lambda ds, arrays, batch_size: padded_batches(arrays, batch_size),
    metrics=_bits_per_byte,
    describe=lambda ds: dict(ds.source),
)  # fmt: skip

TASKS = {task.name: task for task in (IMAGE, LM)}


def get(config) -> Task:
    """The task of ``config.task`` (``cifar10`` when the config has no such field).

    Raises:
      UserError: an unknown task name.
    """
    name = config.get("task", "cifar10")
    if name not in TASKS:
        raise UserError(
            f"config.task={name!r} is not one of {', '.join(TASKS)}",
            hint="e.g. --config.task=lm (configs/lm.py sets it)",
        )
    return TASKS[name]
