r"""A synthetic teacher-student classification (``config.task='teacher'``): a few thousand
random feature vectors labelled by a random linear teacher, generated from a seed in
milliseconds, no files; batches ``{'features', 'label'}``, target ``config.target_accuracy``.

The teacher's logits are ``x @ W`` with ``x ~ N(0, I_d)`` and ``W ~ N(0, scale² / d)``
(so each logit has standard deviation ``scale``), and each label is *drawn* from
``softmax(x @ W)``: the labels are noisy, so the gradient noise scale stays finite, and no
student can beat the teacher's expected loss, the mean entropy of its predictions
(``bayes_loss`` of :func:`describe`), while guessing costs ``log(num_classes)``. A student
that learns lands between the two; a linear one (``model.widths=()``) can reach the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from experiments import data
from experiments.tasks.base import Task, split_subset

_TEACHER_TAG = 0x74656163  # keeps the teacher's draw apart from the splits' ([seed, 1], [seed, 2])


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherData:
    """The generated splits: float32 features ``[N, d]``, int32 labels ``[N]``."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    bayes_loss: float  # the teacher's expected loss on the test inputs (nats)


def generate(cfg) -> TeacherData:
    """The data of ``config.data``: ``num_features``, ``num_classes``, ``num_train``,
    ``num_test``, ``scale`` (each teacher logit's standard deviation) and ``seed``."""
    d, c, seed = int(cfg.num_features), int(cfg.num_classes), int(cfg.seed)
    w = np.random.default_rng([seed, _TEACHER_TAG]).normal(0.0, cfg.scale / math.sqrt(d), (d, c))

    def split(n: int, part: int):
        rng = np.random.default_rng([seed, part])
        x = rng.normal(size=(n, d)).astype(np.float32)
        logits = x @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        y = np.minimum((p.cumsum(1) < rng.random((n, 1))).sum(1), c - 1).astype(np.int32)
        entropy = -np.sum(p * np.log(np.maximum(p, 1e-30)), 1).mean()
        return x, y, float(entropy)

    train_x, train_y, _ = split(int(cfg.num_train), 1)
    test_x, test_y, bayes = split(int(cfg.num_test), 2)
    return TeacherData(train_x, train_y, test_x, test_y, c, bayes)


def describe(ds: TeacherData) -> dict:
    """The data's record: a fingerprint of the arrays, the teacher's expected test loss
    (``bayes_loss``: the floor) and the loss of guessing (``chance_loss``: ``log C``)."""
    h = hashlib.sha256()
    for a in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
        h.update(a.tobytes())
    return {"fingerprint": h.hexdigest()[:16], "bayes_loss": ds.bayes_loss,
            "chance_loss": math.log(ds.num_classes)}  # fmt: skip


def _batch(config, ds: TeacherData, size: int, start: int) -> dict:
    idx = data.train_draws(config.seed, size, len(ds.train_y), start_example=start)[0]
    return {"features": ds.train_x[idx], "label": ds.train_y[idx]}


def _eval_arrays(config, ds: TeacherData, split: str, n: int | None) -> dict:
    train = {"features": ds.train_x, "label": ds.train_y}
    return split_subset(train, {"features": ds.test_x, "label": ds.test_y}, split, n)


TASK = Task(
    name="teacher",
    keys=("features", "label"),
    metric="accuracy",
    lower_is_better=False,
    target_field="target_accuracy",
    load=lambda config: generate(config.data),
    num_train=lambda ds: len(ds.train_y),
    input_spec=lambda ds: (ds.train_x.shape[1:], np.float32),
    batch=_batch,
    eval_arrays=_eval_arrays,
    describe=describe,
)
