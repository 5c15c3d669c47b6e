r"""A synthetic teacher-student classification (``config.task='teacher'``), generated from a
seed in milliseconds: features ``x ~ N(0, I_d)``, each label *drawn* from ``softmax(x @ W)`` of a
random linear teacher ``W ~ N(0, scale² / d)`` (each logit's standard deviation ``scale``);
batches ``{'features', 'label'}``, target ``config.target_accuracy``. The noisy labels keep the
gradient noise scale finite; no student beats the teacher's expected loss (``bayes_loss`` of
:func:`describe`), guessing costs ``log(num_classes)``, and a linear student
(``model.widths=()``) can reach the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from experiments import data
from experiments.rules import choice, count, real, tuple_of
from experiments.tasks.base import Task, split_subset

_TEACHER_TAG = 0x74656163  # keeps the teacher's draw apart from the splits' ([seed, 1], [seed, 2])


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherData:
    """The generated splits ``{'features': float32 [N, d], 'label': int32 [N]}``."""

    train: dict
    test: dict
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
        return {"features": x, "label": y}, float(entropy)

    train, _ = split(int(cfg.num_train), 1)
    test, bayes = split(int(cfg.num_test), 2)
    return TeacherData(train, test, c, bayes)


def describe(ds: TeacherData) -> dict:
    """The data's record: a fingerprint of the arrays, the teacher's expected test loss
    (``bayes_loss``: the floor) and the loss of guessing (``chance_loss``: ``log C``)."""
    h = hashlib.sha256(b"".join(a.tobytes() for a in (*ds.train.values(), *ds.test.values())))
    return {
        "fingerprint": h.hexdigest()[:16],
        "bayes_loss": ds.bayes_loss,
        "chance_loss": math.log(ds.num_classes),
    }


def _batch(config, ds: TeacherData, size: int, start: int) -> dict:
    idx = data.train_draws(config.seed, size, len(ds.train["label"]), start_example=start)[0]
    return {k: v[idx] for k, v in ds.train.items()}


# The rows of this task's config fields (experiments.rules).
FIELDS = (
    ("task", choice("teacher")),
    ("target_accuracy", real(0, 1).or_none),
    ("model.name", choice("mlp")),
    ("model.widths", tuple_of(count(1), empty=True)),
    ("data.num_features", count(1, hi=65536)),
    ("data.num_classes", count(2, hi=65536)),
    ("data.num_train", count(1, hi=10**7)),
    ("data.num_test", count(1, hi=10**7)),
    ("data.scale", real(0, open_lo=True)),
    ("data.seed", count(0)),
)

TASK = Task(
    name="teacher",
    keys=("features", "label"),
    metric="accuracy",
    lower_is_better=False,
    target_field="target_accuracy",
    load=lambda config: generate(config.data),
    num_train=lambda ds: len(ds.train["label"]),
    input_spec=lambda ds: (ds.train["features"].shape[1:], np.float32),
    batch=_batch,
    eval_arrays=lambda config, ds, split, n: split_subset(ds.train, ds.test, split, n),
    describe=describe,
    fields=FIELDS,
)
