"""A synthetic teacher-student classification (:mod:`experiments.tasks.teacher`): the training
of ``configs/lm.py`` on feature vectors labelled by a random linear teacher, with a dense
student. Generated from a seed, no files; small enough to train on a CPU in seconds.

``get_config(arg)``: ``arg`` picks a variant (``smoke``, ``cpu``; default ``cpu``). The
training fields are those of :func:`configs.lm.base` (documented there); this file sets what
differs: ``task``, ``target_accuracy``, ``model`` (``mlp`` with hidden ``widths``) and ``data``
(``num_features``, ``num_classes``, ``num_train``, ``num_test``, ``scale``: each teacher
logit's standard deviation, ``seed``). ``summary.json`` records under ``data`` the teacher's
expected test loss (``bayes_loss``, the floor) and the loss of guessing (``chance_loss``).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import configs
from configs import lm

VARIANTS = ("smoke", "cpu")


def base() -> ml_collections.ConfigDict:
    """The ``cpu`` variant: 16 features, 4 classes, 8,192 train examples, a width-64 student,
    Adam 3e-3, batch 64, 1,000 steps (about 8 epochs)."""
    c = lm.base()
    del c.target_bits_per_byte, c.final_eval_examples, c.model, c.data
    c.update(task="teacher", batch_size=64, learning_rate=3e-3, optimizer="adam")
    c.update(weight_decay=0.0, warmup_steps=0, schedule="constant", num_steps=1000)
    c.update(eval_every=200, eval_examples=2048, log_every=50, checkpoint_every=500)
    c.update(gns_every=10)
    c.target_accuracy = config_dict.placeholder(float)
    c.model = ml_collections.ConfigDict({"name": "mlp", "widths": (64,)})
    c.data = ml_collections.ConfigDict(
        {"num_features": 16, "num_classes": 4, "num_train": 8192, "num_test": 2048,
         "scale": 3.0, "seed": 0}
    )  # fmt: skip
    return c


def smoke() -> ml_collections.ConfigDict:
    """200 steps of batch 32 on 2,048 examples (about 3 epochs), a width-32 student: a few
    seconds on a CPU. Command::

        python -m experiments.cifar10 --config configs/teacher.py:smoke --workdir /tmp/teacher
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
