"""The batch-size sweep: noise scale, throughput and memory, tradeoff, recommendation.

``get_config(arg)``: ``arg`` picks a variant (``smoke``, ``cpu``; default ``cpu``). The training
setup is not copied here: ``config.train`` is ``configs/cifar10.py:get_config(arg)`` itself
(:func:`training_config`), without its ``compare`` subtree (the sweep never reads it) and with
the few fields the sweep changes. Every field is overridable on the command line, e.g.
``--config.tradeoff.target_accuracy=0.5`` or ``--config.train.data.source=folder``.
:func:`base` documents the fields.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import configs
from configs import cifar10

VARIANTS = ("smoke", "cpu")


def training_config(variant: str) -> ml_collections.ConfigDict:
    """``configs/cifar10.py:get_config(variant)`` as the sweep trains it.

    Without ``compare`` (the modes of ``experiments.cifar10``, not read here), with a constant
    learning rate and no warmup (steps-to-target must not depend on a decay horizon), no
    noise-scale tracking during the trainings (the sweep measures it itself), no periodic
    checkpoints and no progress bar.
    """
    t = cifar10.get_config(variant)
    del t["compare"]
    t.update(schedule="constant", warmup_steps=0, gns_every=0, checkpoint_every=0)
    t.progress_bar = False
    return t


def base(variant: str) -> ml_collections.ConfigDict:
    """Fields shared by the variants.

    ``compilation_cache``: use JAX's persistent compilation cache in ``workdir/jax_cache`` (the
    trainings compile the same programs at every batch size; a re-run compiles nothing).

    ``train``: the training config (:func:`training_config`): model, data, optimizer, ``seed``
    and the reference ``batch_size``/``learning_rate`` (the learning rate tuned at that batch;
    other batch sizes scale it by the rule of :func:`gns.recommend.scale_learning_rate`).

    ``noise``: measure the noise scale on the parameters after ``warmup_steps`` of training at
    ``train.batch_size``: ``num_batches`` independent batches of ``batch_size`` examples, the
    ``method`` of ``gns.estimate`` (``auto``: per-example without BatchNorm, else microbatch
    with ``train.gns_microbatches``), pooled into one ``b_simple`` with a ``confidence`` bootstrap
    interval (``gns.smoothing.interval``, iid since the batches are independent).

    ``noise`` (pilot fields): the pilot trains ``pilot_steps`` steps at ``train.batch_size``
    (``None``: ``warmup_steps``), measuring the noise scale every ``every`` steps; its
    measurements give ``noise_scale.trajectory`` (``num_stretches`` equal stretches) and the
    effective noise scale along the path (``gns.critical.effective_noise_scale``).

    ``critical``: the branched critical batch (``gns.critical.branched_critical_batch``) at
    ``num_checkpoints`` states of the pilot (0: off), forks at ``train.batch_size·2^j`` for
    ``j`` in ``exponents``, each ``fork_steps`` steps of the largest fork's batch in examples,
    ``num_repeats`` repeats on disjoint data (stream seed ``train.seed + seed_offset``), held-out
    loss on ``eval_examples`` test images, ``confidence`` of the intervals.

    ``throughput``: candidate (global) batch sizes are the powers of two from
    ``min_batch_size`` to ``max_batch_size``, each split over the devices of the mesh
    (``train.num_devices``, all by default; one that does not divide is skipped, with the
    reason in ``sweep.json``); each is predicted against ``memory_budget_bytes`` per device
    (``None``: the device's capacity, or half the free host RAM on CPU, shared by simulated
    devices) and confirmed by running. Then all that fit, the
    trained batch sizes and ``train.batch_size`` are timed in one interleaved table: ``warmup``
    untimed calls each, then ``repeats`` rounds timing every batch size once in turn, median.
    ``accumulation_factors``: above the largest that fits, batches of ``factor × largest`` are
    timed as gradient accumulation.

    ``tradeoff``: short trainings at ``batch_sizes`` (a list; ``None`` = every power of two from
    ``min_batch_size`` to the largest that fits, at most ``max_runs`` of them, spread evenly)
    until the test accuracy reaches ``target_accuracy`` or ``max_steps``/``max_wall_time_s``;
    evaluation every ``eval_every_examples`` training examples (so the resolution of
    steps-to-target is the same across batch sizes), ``num_bootstrap`` refits for the intervals.

    ``recommend``: ``price_per_hour`` (``None``: compute in device-seconds), ``objective``
    (``time`` or ``cost``), and extra ``candidates`` (``None``: the measured batches and the
    accumulation ones).
    """
    c = ml_collections.ConfigDict()
    c.compilation_cache = True
    c.train = training_config(variant)
    cifar10.add_measurement_stages(c)  # noise, throughput, recommend
    c.noise.update(pilot_steps=config_dict.placeholder(int), every=1, num_stretches=3)
    c.critical = ml_collections.ConfigDict(
        {"num_checkpoints": 3, "exponents": (-2, -1, 0, 1, 2), "fork_steps": 8, "num_repeats": 2}
    )
    c.critical.update(eval_examples=1000, confidence=0.9, seed_offset=7)
    c.tradeoff = ml_collections.ConfigDict({"batch_sizes": config_dict.placeholder(tuple)})
    c.tradeoff.update(min_batch_size=16, max_runs=5, target_accuracy=0.5, max_steps=5000)
    c.tradeoff.update(max_wall_time_s=120.0, eval_every_examples=4096, num_bootstrap=1000)
    return c


def smoke() -> ml_collections.ConfigDict:
    """Tiny CNN on synthetic data: every stage of the sweep, fast.

    Command (about 30-45 s on 2 CPU cores)::

        python -m experiments.sweep --config configs/sweep.py:smoke --workdir /tmp/sweep_smoke

    On real images add ``--config.train.data.source=folder
    --config.train.data.path=../shared/data/cifar10-jpeg.tar.gz`` (the first run decodes and
    caches them, about 20 s more; lower ``tradeoff.target_accuracy`` to 0.25).
    """
    c = base("smoke")
    c.train.update(batch_size=16, learning_rate=3e-3, eval_examples=256)
    c.train.data.update(source="synthetic", num_train=1024, num_test=256)
    c.noise.update(warmup_steps=10, batch_size=32, num_batches=6, pilot_steps=60)
    c.critical.update(exponents=(-1, 0, 1), fork_steps=2, eval_examples=128)
    # The tiny model's step is predicted at ~2 MiB at batch 32 and ~4 MiB at 64 per device on
    # CPU: a 3 MiB budget (per device) makes 32 the largest that fits on one device (64 and
    # 128 run as accumulation) and 128 = 32 x 4 on 4 devices (the tests), 256 over it.
    c.throughput.update(min_batch_size=8, max_batch_size=256, memory_budget_bytes=3 * 2**20)
    c.throughput.update(warmup=1, repeats=3)
    c.tradeoff.update(batch_sizes=(8, 16, 32), target_accuracy=0.4, max_steps=400)
    c.tradeoff.update(max_wall_time_s=30.0, eval_every_examples=256, num_bootstrap=200)
    return c


def cpu() -> ml_collections.ConfigDict:
    """SmallCNN (95k parameters) with Adam on CIFAR-10: a full sweep sized for 2 CPU cores.

    Noise scale from 16 batches of 128 after 200 steps, and along a 1,500-step pilot (every 5
    steps, 3 stretches); branched critical batch at 3 states of the pilot (forks at 16-256,
    2,048 examples each, 2 repeats: 61,440 examples, 0.64x the pilot's); step time at batch
    16-1024; trainings to 45% test accuracy (5,000-image eval subset) at batches 16-128.
    Measured 2026-11-24, before the pilot and the branched stage: 1 min 42 s on 2 idle CPU cores
    (recommended batch 32, B_simple 183, B_crit 184); about 20 minutes on 2 cores shared with
    three other busy processes, where big batches slow down most. The pilot and the forks add
    about 2 minutes by estimate (not yet measured).
    Command::

        python -m experiments.sweep --config configs/sweep.py:cpu --workdir runs/sweep \
          --config.train.data.source=folder \
          --config.train.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base("cpu")
    c.train.update(num_epochs=None, batch_size=64, learning_rate=2e-3, eval_examples=5000)
    c.noise.update(warmup_steps=200, batch_size=128, num_batches=16, chunk_size=64)
    c.noise.update(pilot_steps=1500, every=5)  # ~2 epochs at batch 64, measured every 5 steps
    c.throughput.update(min_batch_size=16, max_batch_size=1024, memory_budget_bytes=4 * 2**30)
    c.tradeoff.update(batch_sizes=(16, 32, 64, 128), target_accuracy=0.45, max_steps=6000)
    c.tradeoff.update(max_wall_time_s=300.0, eval_every_examples=4096)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of variant ``arg`` (``smoke`` or ``cpu``; default ``cpu``).

    Example::

        python -m experiments.sweep --config configs/sweep.py:smoke --workdir /tmp/sweep_smoke
    """
    return configs.select("configs/sweep.py", {"smoke": smoke, "cpu": cpu}, arg)
