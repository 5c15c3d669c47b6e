"""Byte-level language modelling (``config.task='lm'``): the byte windows of
:mod:`experiments.text`, batches ``{'tokens', 'targets'}`` (the next byte of each token),
target ``config.target_bits_per_byte`` (lower is better; bits per byte = loss in nats / ln 2)."""

from __future__ import annotations

import numpy as np

from experiments import text
from experiments.tasks.base import Task, eval_padded


def _eval_arrays(config, ds, split: str, n: int | None) -> dict:
    if split == "test":
        return text.eval_arrays(ds, n)
    n = ds.examples_per_epoch if n is None else min(n, ds.examples_per_epoch)
    return text.train_batch(ds, 0, n, seed=config.seed)  # the first windows of training


def _bits_per_byte(result: dict) -> dict:
    loss = result.get("loss")
    return {"bits_per_byte": None if loss is None else text.bits_per_byte(loss)}


TASK = Task(
    name="lm", keys=("tokens", "targets"), metric="bits_per_byte", lower_is_better=True,
    target_field="target_bits_per_byte",
    load=lambda config: text.load(config.data, context=config.model.context),
    num_train=lambda ds: ds.examples_per_epoch,
    input_spec=lambda ds: ((ds.context,), np.int32),
    batch=lambda config, ds, size, start: text.train_batch(ds, start, size, seed=config.seed),
    eval_arrays=_eval_arrays,
    eval_batches=eval_padded,
    metrics=_bits_per_byte,
    describe=lambda ds: dict(ds.source),
)  # fmt: skip
