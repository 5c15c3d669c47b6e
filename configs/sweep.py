"""The batch-size sweep: noise scale, throughput and memory, tradeoff, recommendation.

``get_config(arg)``: ``arg`` picks a variant (``smoke``, ``cpu``, ``resnet_sgd``; default
``cpu``). A sweep config has the shape of every training config: the training setup of
``configs/cifar10.py:get_config(arg)`` at the top level and the measurement fields of
:func:`configs.common.measurement` (``noise``, ``critical``, ``throughput``, ``recommend``,
``tradeoff``) at the same paths as there; this file sets only what differs. Every field is
overridable on the command line, e.g. ``--config.tradeoff.target=0.5`` or
``--config.data.source=folder``; ``python -m experiments.sweep --help`` lists them with their
meanings and valid values (:mod:`experiments.rules`).
"""

from __future__ import annotations

import ml_collections

import configs
from configs import cifar10

VARIANTS = ("smoke", "cpu", "resnet_sgd")


def base(variant: str) -> ml_collections.ConfigDict:
    """``configs/cifar10.py:get_config(variant)`` as the sweep trains it: a constant learning
    rate and no warmup (steps-to-target must not depend on a decay horizon), no noise-scale
    tracking during the trainings (the sweep measures it itself), no periodic checkpoints, no
    progress bar; the branched critical batch at 3 states of the pilot, and batches of 2 and 4
    times the largest that fits timed as gradient accumulation. Without ``mode`` and
    ``compare`` (experiments.cifar10's modes)."""
    c = cifar10.get_config(variant)
    del c.mode, c.compare
    c.update(schedule="constant", warmup_steps=0, gns_every=0, checkpoint_every=0)
    c.progress_bar = False
    c.critical.num_checkpoints = 3
    c.throughput.accumulation_factors = (2, 4)
    return c


def smoke() -> ml_collections.ConfigDict:
    """Tiny CNN on synthetic data: every stage of the sweep, fast.

    Command (about 30-45 s on 2 CPU cores)::

        python -m experiments.sweep --config configs/sweep.py:smoke --workdir /tmp/sweep_smoke

    On real images add ``--config.data.source=folder
    --config.data.path=../shared/data/cifar10-jpeg.tar.gz`` (the first run decodes and
    caches them, about 20 s more; lower ``tradeoff.target`` to 0.25).
    """
    c = base("smoke")
    c.update(batch_size=16, learning_rate=3e-3, eval_examples=256)
    c.data.update(source="synthetic", num_train=1024, num_test=256)
    c.noise.pilot_steps = 60
    c.critical.update(exponents=(-1, 0, 1), fork_steps=2, eval_examples=128)
    # The tiny model's step is predicted at ~2 MiB at batch 32 and ~4 MiB at 64 per device on
    # CPU: a 3 MiB budget (per device) makes 32 the largest that fits on one device (64 and
    # 128 run as accumulation) and 128 = 32 x 4 on 4 devices (the tests), 256 over it.
    c.throughput.update(min_batch_size=8, max_batch_size=256, memory_budget_bytes=3 * 2**20)
    c.throughput.update(warmup=1, repeats=3)
    c.tradeoff.update(batch_sizes=(8, 16, 32), target=0.4, max_steps=400)
    c.tradeoff.update(max_wall_time_s=30.0, eval_every_examples=256, num_bootstrap=200)
    return c


def cpu() -> ml_collections.ConfigDict:
    """SmallCNN (95k parameters) with Adam on CIFAR-10: a full sweep sized for 2 CPU cores.

    Noise scale along a 500-step pilot (every 5 steps, 3 stretches: about the path to the
    target); branched critical batch at 3 states of
    the pilot (forks at 16-256, 16,384 examples each, 2 repeats: 491,520 examples, 15x the
    pilot's); step time at batch
    16-1024; trainings to 45% test accuracy (5,000-image eval subset) at batches 16-256, and a
    second seed at the 3 fastest.
    About 12.5 minutes on 2 busy CPU cores: noise 22 s, branched 5.4 min, timing 53 s, the
    8 trainings 6 min.
    Command::

        python -m experiments.sweep --config configs/sweep.py:cpu --workdir runs/sweep \
          --config.data.source=folder \
          --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base("cpu")
    c.update(num_epochs=None, batch_size=64, learning_rate=2e-3, eval_examples=5000)
    # The pilot runs to about the target: the trainings at batch 64 reach it at step 448 and
    # 576 (seeds 0, 1), so the path averages describe the run to the target.
    c.noise.update(pilot_steps=500, every=5)
    # Forks of 64 steps at the largest batch (16,384 examples): 8-step forks (2,048 examples)
    # were shorter than the held-out loss's step-to-step jitter at a constant rate (every
    # checkpoint unresolved).
    c.critical.update(fork_steps=64)
    c.throughput.update(min_batch_size=16, max_batch_size=1024, memory_budget_bytes=4 * 2**30)
    c.tradeoff.update(batch_sizes=(16, 32, 64, 128, 256), target=0.45, max_steps=6000)
    c.tradeoff.update(max_wall_time_s=600.0, eval_every_examples=4096)
    c.tradeoff.update(extra_seeds=1, reseed_best=3)
    return c


def resnet_sgd() -> ml_collections.ConfigDict:
    """A second setup for the validation: a small ResNet (BatchNorm) with SGD + momentum 0.9.

    ResNet with one basic block per stage, 3 stages, 8 filters (19,954 parameters; the CIFAR
    stem, no max-pooling), SGD with momentum 0.9 at 0.05 for batch 64 (other batches: the
    McCandlish rule of :func:`gns.scaling.learning_rate` with the recommendation's noise scale),
    constant rate, trainings to 35% test accuracy (2,000-image eval subset). BatchNorm: the
    noise scale from 2 microbatches, which are also the ghost-BatchNorm groups of every step
    (``gns_microbatches = 2``, so a batch of 16 still normalizes over 8 examples).
    Pilot of 600 steps at batch 64 (~0.8 epoch, past the target), every 5 steps; branched
    critical batch at 3 states (forks at 16-256, 8,192 examples each, 2 repeats: 6.4x the
    pilot's examples); step time at batch 16-512; trainings at 16-256, a second seed at the 3
    fastest. About 22 minutes on 2 busy CPU cores: noise 2.3 min, branched 8.1 min, timing
    1.9 min, the 8 trainings 9.8 min.
    Command::

        python -m experiments.sweep --config configs/sweep.py:resnet_sgd --workdir runs/resnet \
          --config.data.source=folder \
          --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = cpu()
    c.update(optimizer="sgd", momentum=0.9, nesterov=False, learning_rate=0.05)
    c.update(gns_microbatches=2, eval_examples=2000)
    c.model.update(name="resnet", stage_sizes=(1, 1, 1), num_filters=8)
    c.noise.update(pilot_steps=600, every=5)
    c.critical.update(eval_examples=1000, fork_steps=32)  # 8,192 examples per fork
    c.throughput.update(max_batch_size=512)
    c.tradeoff.update(target=0.35, max_steps=4000, max_wall_time_s=400.0)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of variant ``arg`` (``smoke``, ``cpu`` or ``resnet_sgd``; default ``cpu``).

    Example::

        python -m experiments.sweep --config configs/sweep.py:smoke --workdir /tmp/sweep_smoke
    """
    setups = {"smoke": smoke, "cpu": cpu, "resnet_sgd": resnet_sgd}
    return configs.select("configs/sweep.py", setups, arg)
