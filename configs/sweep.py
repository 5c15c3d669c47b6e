"""The batch-size sweep: noise scale, throughput and memory, tradeoff, recommendation.

``get_config(arg)``: ``arg`` picks a variant (``smoke``, ``cpu``, ``resnet_sgd``; default
``cpu``). The training
setup is not copied here: ``config.train`` is ``configs/cifar10.py:get_config(arg)`` itself
(:func:`training_config`), without its ``compare`` subtree (the sweep never reads it) and with
the few fields the sweep changes. Every field is overridable on the command line, e.g.
``--config.tradeoff.target_accuracy=0.5`` or ``--config.train.data.source=folder``.
:func:`base` documents the fields, and the table of :mod:`experiments.rules`
(``python -m experiments.sweep --help``) gives each one's valid values.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import configs
from configs import cifar10

VARIANTS = ("smoke", "cpu", "resnet_sgd")


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

    ``compilation_cache``: use JAX's persistent compilation cache in the user's
    ``$XDG_CACHE_HOME/gns/jax`` (mode 0700; never in the workdir, which is untrusted input; the
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
    ``extra_seeds`` more trainings (seeds ``train.seed + 1, ...``) at the ``reseed_best``
    batches that reached the target in the least device time: ``tradeoff.by_batch`` gives the
    mean and spread over seeds, and ``validation`` the recommendations read against them
    (:func:`experiments.validation.validation`).

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
    c.tradeoff.update(extra_seeds=0, reseed_best=3)
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

    Noise scale from 16 batches of 128 after 200 steps, and along a 500-step pilot (every 5
    steps, 3 stretches: about the path to the target); branched critical batch at 3 states of
    the pilot (forks at 16-256, 16,384 examples each, 2 repeats: 491,520 examples, 15x the
    pilot's); step time at batch
    16-1024; trainings to 45% test accuracy (5,000-image eval subset) at batches 16-256, and a
    second seed at the 3 fastest.
    Measured 2026-12-01 on 2 cores at load 4-11, stage by stage (resumed runs): noise 22 s,
    branched 5.4 min, timing 53 s, the 8 trainings 6 min: about 12.5 minutes in all.
    Command::

        python -m experiments.sweep --config configs/sweep.py:cpu --workdir runs/sweep \
          --config.train.data.source=folder \
          --config.train.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base("cpu")
    c.train.update(num_epochs=None, batch_size=64, learning_rate=2e-3, eval_examples=5000)
    c.noise.update(warmup_steps=200, batch_size=128, num_batches=16, chunk_size=64)
    # The pilot runs to about the target: the trainings at batch 64 reach it at step 448 and
    # 576 (seeds 0, 1), so the path averages describe the run to the target.
    c.noise.update(pilot_steps=500, every=5)
    # Forks of 64 steps at the largest batch (16,384 examples): 8-step forks (2,048 examples)
    # were shorter than the held-out loss's step-to-step jitter at a constant rate (every
    # checkpoint unresolved).
    c.critical.update(fork_steps=64)
    c.throughput.update(min_batch_size=16, max_batch_size=1024, memory_budget_bytes=4 * 2**30)
    c.tradeoff.update(batch_sizes=(16, 32, 64, 128, 256), target_accuracy=0.45, max_steps=6000)
    c.tradeoff.update(max_wall_time_s=600.0, eval_every_examples=4096)
    c.tradeoff.update(extra_seeds=1, reseed_best=3)
    return c


def resnet_sgd() -> ml_collections.ConfigDict:
    """A second setup for the validation: a small ResNet (BatchNorm) with SGD + momentum 0.9.

    ResNet with one basic block per stage, 3 stages, 8 filters (19,954 parameters; the CIFAR
    stem, no max-pooling), SGD with momentum 0.9 at 0.05 for batch 64 (other batches: the
    McCandlish rule of :func:`gns.recommend.scale_learning_rate` with the early ``B_simple``),
    constant rate, trainings to 35% test accuracy (2,000-image eval subset). BatchNorm: the
    noise scale from 2 microbatches, which are also the ghost-BatchNorm groups of every step
    (``train.gns_microbatches = 2``, so a batch of 16 still normalizes over 8 examples).
    Pilot of 600 steps at batch 64 (~0.8 epoch, past the target), every 5 steps; branched
    critical batch at 3 states (forks at 16-256, 8,192 examples each, 2 repeats: 6.4x the
    pilot's examples); step time at batch 16-512; trainings at 16-256, a second seed at the 3
    fastest. Measured 2026-12-01 on 2 cores at load 5-11, stage by stage (resumed runs): noise
    2.3 min, branched 8.1 min, timing 1.9 min, the 8 trainings 9.8 min: about 22 minutes.
    Command::

        python -m experiments.sweep --config configs/sweep.py:resnet_sgd --workdir runs/resnet \
          --config.train.data.source=folder \
          --config.train.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = cpu()
    c.train.update(optimizer="sgd", momentum=0.9, nesterov=False, learning_rate=0.05)
    c.train.update(gns_microbatches=2, eval_examples=2000)
    c.train.model.update(name="resnet", stage_sizes=(1, 1, 1), num_filters=8)
    c.noise.update(chunk_size=None, pilot_steps=600, every=5)
    c.critical.update(eval_examples=1000, fork_steps=32)  # 8,192 examples per fork
    c.throughput.update(max_batch_size=512)
    c.tradeoff.update(target_accuracy=0.35, max_steps=4000, max_wall_time_s=400.0)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of variant ``arg`` (``smoke``, ``cpu`` or ``resnet_sgd``; default ``cpu``).

    Example::

        python -m experiments.sweep --config configs/sweep.py:smoke --workdir /tmp/sweep_smoke
    """
    setups = {"smoke": smoke, "cpu": cpu, "resnet_sgd": resnet_sgd}
    return configs.select("configs/sweep.py", setups, arg)
