"""Image classification (``config.task='cifar10'``, the default): the images of
:mod:`experiments.data` (CIFAR-10 or any image folder), batches ``{'image', 'label'}``, target
``config.target_accuracy`` (higher is better)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from experiments import data
from experiments.tasks.base import Task, padded_batches, split_subset


def _eval_arrays(config, ds, split: str, n: int | None) -> dict:
    train = {"image": ds.train_images, "label": ds.train_labels}
    return split_subset(train, {"image": ds.test_images, "label": ds.test_labels}, split, n)


def _eval_batches(ds, arrays: dict, batch_size: int) -> Iterator[dict]:
    """The padded batches, normalized (the padding too: it is masked)."""
    for batch in padded_batches(arrays, batch_size):
        yield {**batch, "image": data.normalize(batch["image"], ds.mean, ds.std)}


TASK = Task(
    name="cifar10",
    keys=("image", "label"),
    metric="accuracy",
    lower_is_better=False,
    target_field="target_accuracy",
    load=lambda config: data.load(config.data),
    num_train=lambda ds: len(ds.train_labels),
    input_spec=lambda ds: (tuple(ds.train_images.shape[1:]), np.float32),
    batch=lambda config, ds, size, start: data.train_batch(
        ds, size, seed=config.seed, augment=config.data.augment, start_example=start
    ),
    eval_arrays=_eval_arrays,
    describe=lambda ds: {"fingerprint": ds.fingerprint},
    eval_batches=_eval_batches,
    step_batches=lambda config, ds, batch_size, start_step: data.train_batches(
        ds, batch_size, seed=config.seed, start_step=start_step, augment=config.data.augment
    ),
)
