"""Image classification (``config.task='cifar10'``, the default): the images of
:mod:`experiments.data` (CIFAR-10 or any image folder), batches ``{'image', 'label'}``, target
``config.target_accuracy`` (higher is better)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from experiments import data, rules
from experiments.rules import FLAG, TEXT, choice, count, real, tuple_of
from experiments.tasks.base import Task, padded_batches, split_subset
from gns import schedule

# The rows of this task's config fields (experiments.rules): target, adaptive schedule, model,
# data.
FIELDS = (
    ("target_accuracy", real(0, 1).or_none),
    ("adaptive.enabled", FLAG),
    ("adaptive.candidates", tuple_of(count(2), increasing=True).or_none),
    ("adaptive.min_batch_size", count(2)),
    ("adaptive.max_batch_size", count(2)),
    ("adaptive.initial_batch_size", count(2).or_none),
    ("adaptive.initial_noise_scale", real(0, open_lo=True).or_none),
    ("adaptive.step_times", tuple_of(real(0, open_lo=True)).or_none),
    ("adaptive.lr_rule", choice(*rules.LR_RULES).or_none),
    ("adaptive.margin", real(0, 1, open_hi=True)),
    ("adaptive.patience", count(1)),
    ("adaptive.allow_shrink", FLAG),
    ("adaptive.noise_scale_factor", real(0, open_lo=True)),
    ("adaptive.eval_every_examples", count(1).or_none),
    ("adaptive.timing_warmup", count(0)),
    ("adaptive.timing_rounds", count(1)),
    ("model.name", choice(*(m for m in rules.MODEL_NAMES if m != "transformer"))),
    ("model.widths", tuple_of(count(1))),
    ("model.groups", count(1)),
    ("model.stage_sizes", tuple_of(count(1)).or_none),
    ("model.num_filters", count(1).or_none),
    ("model.width_coefficient", real(0, open_lo=True).or_none),
    ("model.depth_coefficient", real(0, open_lo=True).or_none),
    ("model.dropout_rate", real(0, 1, open_hi=True).or_none),
    ("model.drop_connect_rate", real(0, 1, open_hi=True).or_none),
    ("model.stem_strides", count(1).or_none),
    ("data.source", choice("folder", "cifar10_binary", "tfds", "synthetic")),
    ("data.name", TEXT),
    ("data.path", TEXT.or_none),
    ("data.cache_dir", TEXT.or_none),
    ("data.tfds_data_dir", TEXT.or_none),
    ("data.url", TEXT),
    ("data.md5", TEXT.or_none),
    ("data.num_train", count(1).or_none),
    ("data.num_test", count(1).or_none),
    ("data.augment", FLAG),
    ("data.on_device", FLAG),
    ("data.synthetic.image_size", count(4, hi=4096)),
    ("data.synthetic.num_classes", count(2, hi=100_000)),
    ("data.synthetic.seed", count(0)),
)

CROSS = (
    rules.cross(
        ("data.num_train", "batch_size"),
        lambda n, batch, d: n is None or n >= batch,
        "a batch cannot be larger than the train subset",
    ),
    rules.GROUPS,
    rules.cross(
        ("data.source", "data.path"),
        lambda s, p, d: s != "folder" or p is not None,
        "data.source='folder' reads data.path",
        "set --config.data.path=path/to/folder_or.tar.gz (laid out split/class/image.jpg)",
    ),
    rules.at_most("adaptive.min_batch_size", "adaptive.max_batch_size"),
    rules.each_on_devices("adaptive.candidates"),
    rules.cross(
        (
            "adaptive.initial_batch_size",
            "adaptive.candidates",
            "adaptive.min_batch_size",
            "adaptive.max_batch_size",
        ),
        lambda b, cands, lo, hi, d: (
            b is None or b in (cands or schedule.powers_of_two(lo, hi, d or 1))
        ),
        "adaptive.initial_batch_size must be one of the candidates (adaptive.candidates, or "
        "the powers of two (times the devices) from adaptive.min_batch_size to max_batch_size)",
    ),  # fmt: skip
    rules.cross(
        ("adaptive.enabled", "gns_every"),
        lambda enabled, every, d: not enabled or every > 0,
        "the batch-size schedule follows the measured noise scale: it needs gns_every > 0",
    ),
    rules.cross(
        ("adaptive.enabled", "schedule", "warmup_steps"),
        lambda enabled, schedule, warmup, d: not enabled or (schedule, warmup) == ("constant", 0),
        "the learning-rate schedule counts steps, which the batch-size schedule changes (a run "
        "that stays below batch_size would decay to 0 early)",
        "pass --config.schedule=constant --config.warmup_steps=0 (the compare mode does)",
    ),
)


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
    fields=FIELDS,
    cross=CROSS,
    modes=rules.MODES,
)
