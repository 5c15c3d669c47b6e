"""A synthetic teacher-student classification (:mod:`experiments.tasks.teacher`): the training
of :func:`configs.common.training` on feature vectors labelled by a random linear teacher, with
a dense student. Generated from a seed, no files; small enough to train on a CPU in seconds.

``get_config(arg)``: ``arg`` picks a variant (``smoke``, ``cpu``; default ``cpu``). The
training fields are those of :func:`configs.common.training`; this file sets what differs and
the task's fields: ``task``, ``target_accuracy``, ``model`` and ``data``. ``summary.json``
records under ``data`` the teacher's expected test loss (``bayes_loss``, the floor) and the
loss of guessing (``chance_loss``).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import configs
from configs import common

VARIANTS = ("smoke", "cpu")


def base() -> ml_collections.ConfigDict:
    """The ``cpu`` variant: 16 features, 4 classes, 8,192 train examples, a width-64 student,
    Adam 3e-3, batch 64, 1,000 steps (about 8 epochs)."""
    c = common.training()
    c.task = "teacher"  # what the data are (experiments.tasks.teacher): a random linear
    # teacher's sampled labels
    c.update(batch_size=64, learning_rate=3e-3, num_steps=1000, eval_every=200)
    c.update(eval_examples=2048, eval_batch_size=256, checkpoint_every=500)
    c.target_accuracy = config_dict.placeholder(float)  # stop when the periodic test
    # accuracy reaches it (needs eval_every > 0; None: no target)
    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"  # the student: dense layers
    c.model.widths = (64,)  # hidden widths ((): a linear student)
    c.data = ml_collections.ConfigDict()
    c.data.num_features = 16  # input dimension d
    c.data.num_classes = 4  # classes
    c.data.num_train = 8192  # train examples
    c.data.num_test = 2048  # test examples
    c.data.scale = 3.0  # standard deviation of each teacher logit (larger: less label noise)
    c.data.seed = 0  # seed of the teacher and of the examples
    return c


def smoke() -> ml_collections.ConfigDict:
    """200 steps of batch 32 on 2,048 examples (about 3 epochs), a width-32 student: a few
    seconds on a CPU. Command::

        python -m experiments train --config configs/teacher.py:smoke --workdir /tmp/teacher
    """
    c = base()
    c.update(batch_size=32, num_steps=200, eval_every=100, eval_examples=512, log_every=20)
    c.update(checkpoint_every=100, gns_every=5, progress_bar=False, plots=False)
    c.model.widths = (32,)
    c.data.update(num_train=2048, num_test=1024)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of variant ``arg`` (``smoke``, ``cpu``; default ``cpu``)."""
    return configs.select("configs/teacher.py", {"smoke": smoke, "cpu": base}, arg)
