"""CIFAR-10 with the gradient noise scale tracked during training.

``get_config(arg)``: ``arg`` picks a variant (``smoke``, ``cpu``, ``gpu``, ``seed``; default
``cpu``). Every field is overridable on the command line, e.g. ``--config.batch_size=256``.
Each variant's docstring gives its command and expected run time; :func:`base` documents the
fields.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

DATA = "../shared/data/cifar10-jpeg.tar.gz"
VARIANTS = ("smoke", "cpu", "gpu", "seed")


def base() -> ml_collections.ConfigDict:
    """Fields shared by all variants (defaults of the ``cpu`` variant).

    Training: ``seed``, ``batch_size``, ``learning_rate``, ``optimizer`` (``sgd`` with
    ``momentum``/``nesterov``, ``adam``, ``adamw``, ``lamb``), ``weight_decay`` (kernels only),
    ``warmup_steps``, ``schedule`` (``constant``/``cosine``), ``num_steps`` or ``num_epochs``
    (wins when set), ``max_wall_time_s`` (training-time budget), ``target_accuracy`` (stop when
    the periodic test accuracy reaches it).
    Evaluation and logging: ``eval_every`` (steps; 0 = only at the end), ``eval_examples``
    (fixed random test subset for periodic evaluation; the final one uses the full test set),
    ``eval_batch_size``, ``log_every``, ``checkpoint_every``, ``progress_bar``, ``plots`` (PNGs).
    Noise scale: ``gns_every`` (measure every N steps; 0 = never), ``gns_method`` (``auto``:
    ``per_example`` without BatchNorm, ``microbatch`` with), ``gns_microbatches``,
    ``gns_chunk_size``, ``gns_ema_decay``.
    ``mode``: ``train`` (other modes are dispatched by ``experiments/cifar10.py``).
    """
    c = ml_collections.ConfigDict()
    c.mode = "train"
    c.seed = 0
    c.batch_size = 128
    c.learning_rate = 2e-3
    c.optimizer = "adam"
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.0
    c.warmup_steps = 0
    c.schedule = "constant"
    c.num_steps = 1000
    c.num_epochs = config_dict.placeholder(float)
    c.max_wall_time_s = config_dict.placeholder(float)
    c.target_accuracy = config_dict.placeholder(float)
    c.eval_every = 500
    c.eval_examples = 5000
    c.eval_batch_size = 500
    c.log_every = 50
    c.checkpoint_every = 1000
    c.progress_bar = True
    c.plots = True
    c.gns_every = 10
    c.gns_method = "auto"
    c.gns_microbatches = 8
    c.gns_chunk_size = config_dict.placeholder(int)
    c.gns_ema_decay = 0.95

    c.model = ml_collections.ConfigDict()
    c.model.name = "small_cnn"
    c.model.widths = (32, 64, 128)
    c.model.groups = 8
    c.model.stage_sizes = config_dict.placeholder(tuple)
    c.model.num_filters = config_dict.placeholder(int)
    c.model.width_coefficient = config_dict.placeholder(float)
    c.model.depth_coefficient = config_dict.placeholder(float)
    c.model.dropout_rate = config_dict.placeholder(float)
    c.model.drop_connect_rate = config_dict.placeholder(float)
    c.model.stem_strides = config_dict.placeholder(int)

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"
    c.data.name = "cifar10"
    c.data.path = config_dict.placeholder(str)
    c.data.cache_dir = config_dict.placeholder(str)
    c.data.tfds_data_dir = config_dict.placeholder(str)
    c.data.num_train = config_dict.placeholder(int)
    c.data.num_test = config_dict.placeholder(int)
    c.data.augment = True
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.image_size = 32
    c.data.synthetic.num_classes = 10
    return c


def smoke() -> ml_collections.ConfigDict:
    """Tiny CNN on 512 train / 256 test examples, 150 steps: a check that everything runs.

    Command (about 15-25 s on 2 CPU cores, including start-up; the first run on the real
    images also decodes and caches them, about 20 s more)::

        python -m experiments.cifar10 --config configs/cifar10.py:smoke --workdir /tmp/smoke \
          --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base()
    c.batch_size = 32
    c.learning_rate = 3e-3
    c.num_steps = 150
    c.eval_every = 50
    c.eval_examples = 256
    c.eval_batch_size = 256
    c.log_every = 10
    c.checkpoint_every = 50
    c.gns_every = 3
    c.gns_ema_decay = 0.9
    c.model.widths = (8, 16)
    c.model.groups = 4
    c.data.num_train = 512
    c.data.num_test = 256
    c.data.augment = False
    return c


def cpu() -> ml_collections.ConfigDict:
    """SmallCNN (95k parameters, GroupNorm), Adam 2e-3 with cosine decay, batch 128, 8 epochs.

    Crop + flip augmentation; noise scale from per-example gradients every 20 steps (157
    measurements). Measured (2026-11-24, 2 idle CPU cores, ~4,000 examples/s): 61.3% test
    accuracy (62.3% train), 108 s of training + 4.5 s of periodic evaluation, 2 minutes for the
    whole command; B_simple rose from ~90 (first third of training) to ~120 (middle) and
    ~580 (last third). Command::

        python -m experiments.cifar10 --config configs/cifar10.py:cpu --workdir /tmp/cpu \
          --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base()
    c.batch_size = 128
    c.learning_rate = 2e-3
    c.optimizer = "adam"
    c.schedule = "cosine"
    c.warmup_steps = 100
    c.num_epochs = 8.0
    c.eval_every = 500
    c.eval_examples = 5000
    c.log_every = 50
    c.checkpoint_every = 1000
    c.gns_every = 20
    c.gns_chunk_size = 64
    return c


def gpu() -> ml_collections.ConfigDict:
    """ResNet-18 (CIFAR variant, BatchNorm, 11.2M parameters), SGD+Nesterov 0.1, batch 128.

    30 epochs with 2 warmup epochs and cosine decay, weight decay 5e-4, crop + flip; noise
    scale from 8 microbatches (ghost BatchNorm of 16) every 20 steps. This recipe typically
    reaches about 94% test accuracy; on one modern GPU roughly 10-20 minutes (neither measured
    here: no GPU was available; the code path is tested on CPU with a tiny ResNet). Command::

        python -m experiments.cifar10 --config configs/cifar10.py:gpu --workdir runs/gpu \
          --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base()
    c.batch_size = 128
    c.learning_rate = 0.1
    c.optimizer = "sgd"
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 5e-4
    c.schedule = "cosine"
    c.num_epochs = 30.0
    c.warmup_steps = 780
    c.eval_every = 1000
    c.eval_examples = 10000
    c.log_every = 100
    c.checkpoint_every = 2000
    c.gns_every = 20
    c.gns_method = "microbatch"
    c.gns_microbatches = 8
    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18"
    c.model.stage_sizes = (2, 2, 2, 2)
    c.model.num_filters = 64
    return c


def seed() -> ml_collections.ConfigDict:
    """EfficientNet-B0 (BatchNorm, as in the paper; 4.0M parameters with a 10-class head),
    LAMB, batch 64, learning rate 1e-3: the setting of the study that motivates the project.

    Cosine decay over 30 epochs with 500 warmup steps; noise scale from 8 microbatches (ghost
    BatchNorm of 8) every 20 steps. Runs on an accelerator (hours on a CPU); on one modern
    GPU roughly 30-60 minutes (not timed here). Command::

        python -m experiments.cifar10 --config configs/cifar10.py:seed --workdir runs/seed \
          --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg.tar.gz

    The study's comparison (batch 64 against the recommended batch, ``config.compare``: a
    2.5-hour baseline budget, then the recommended batch for the baseline's time to its best and
    the baseline again for the recommended run's time to target; the study took 7416 + 1914 +
    1928 s of training, so plan on 3-4 hours of one GPU, not timed here)::

        python -m experiments.cifar10 --config configs/cifar10.py:seed --config.mode=compare \
          --workdir runs/seed_compare --config.data.source=folder \
          --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base()
    c.batch_size = 64
    c.learning_rate = 1e-3
    c.optimizer = "lamb"
    c.weight_decay = 1e-2
    c.schedule = "cosine"
    c.warmup_steps = 500
    c.num_epochs = 30.0
    c.eval_every = 2000
    c.eval_examples = 10000
    c.log_every = 100
    c.checkpoint_every = 2000
    c.gns_every = 20
    c.gns_method = "microbatch"
    c.gns_microbatches = 8
    c.model = ml_collections.ConfigDict()
    c.model.name = "efficientnet_b0"
    c.model.width_coefficient = 1.0
    c.model.depth_coefficient = 1.0
    c.model.dropout_rate = 0.2
    c.model.drop_connect_rate = 0.2
    c.model.stem_strides = 2
    return c


def add_measurement_stages(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds ``c.noise``, ``c.throughput`` and ``c.recommend``: the measurement and
    recommendation stages shared by the sweep (``configs/sweep.py``, where they are documented)
    and the ``compare``/``tradeoff`` modes, with their defaults for the ``cpu`` model."""
    c.noise = ml_collections.ConfigDict()
    c.noise.warmup_steps = 200
    c.noise.batch_size = 128
    c.noise.num_batches = 16
    c.noise.method = "auto"
    c.noise.chunk_size = config_dict.placeholder(int)
    c.noise.confidence = 0.9

    c.throughput = ml_collections.ConfigDict()
    c.throughput.min_batch_size = 16
    c.throughput.max_batch_size = 1024
    c.throughput.memory_budget_bytes = config_dict.placeholder(int)
    c.throughput.warmup = 2
    c.throughput.repeats = 5
    c.throughput.accumulation_factors = (2, 4)

    c.recommend = ml_collections.ConfigDict()
    c.recommend.price_per_hour = config_dict.placeholder(float)
    c.recommend.objective = "time"
    c.recommend.candidates = config_dict.placeholder(tuple)
    return c


def compare_config(variant: str) -> ml_collections.ConfigDict:
    """``config.compare``: the ``compare`` and ``tradeoff`` modes (:mod:`experiments.compare`).

    ``baseline_batch_size``/``baseline_learning_rate`` (``None``: ``config.batch_size`` and
    ``config.learning_rate``): the baseline, and the reference the learning rate of other batch
    sizes is scaled from (:func:`gns.recommend.scale_learning_rate`). ``baseline_budget_s``:
    training-time budget of the baseline run (a); ``max_epochs`` caps every run and is the
    horizon of a cosine ``schedule``. ``schedule`` and ``warmup_steps`` replace the config's
    (``None``: keep them); the default is a constant learning rate without warmup, so that a
    wall-clock budget does not cut a decay short and a warmup counted in steps does not
    penalize the larger batch sizes.
    ``eval_every_examples``: evaluation interval in training examples (the time resolution of
    time-to-target, the same for every batch size); ``eval_examples``: test examples per
    evaluation (``None``: the config's). ``noise``, ``throughput``, ``recommend``: the
    measurement and recommendation stages of ``configs/sweep.py`` (documented there);
    ``tradeoff``: the trainings to ``target_accuracy`` of the ``tradeoff`` mode at
    ``batch_sizes`` (plus the recommended one), each capped by ``max_steps`` and
    ``max_wall_time_s``, evaluated every ``eval_every_examples``, ``num_bootstrap`` refits.
    """
    c = ml_collections.ConfigDict()
    c.baseline_batch_size = config_dict.placeholder(int)
    c.baseline_learning_rate = config_dict.placeholder(float)
    c.update(baseline_budget_s=240.0, max_epochs=100.0, schedule="constant", warmup_steps=0)
    c.eval_every_examples = 25000
    c.eval_examples = config_dict.placeholder(int)
    add_measurement_stages(c)
    c.tradeoff = ml_collections.ConfigDict(
        dict(batch_sizes=(16, 32, 64, 128, 256), target_accuracy=0.5, max_steps=5000)
    )
    c.tradeoff.update(max_wall_time_s=150.0, eval_every_examples=4096, num_bootstrap=1000)
    if variant == "smoke":
        c.update(baseline_budget_s=3.0, max_epochs=50.0, eval_every_examples=512)
        c.noise.update(warmup_steps=5, batch_size=32, num_batches=3)
        c.throughput.update(min_batch_size=16, max_batch_size=32, accumulation_factors=())
        c.throughput.update(warmup=1, repeats=2)
        c.tradeoff.update(batch_sizes=(16, 32), target_accuracy=0.2, max_steps=200)
        c.tradeoff.update(max_wall_time_s=3.0, eval_every_examples=256, num_bootstrap=50)
    elif variant == "cpu":
        # make demo: about 15-20 minutes on 2 shared CPU cores (see experiments/compare.py).
        c.update(baseline_batch_size=64, baseline_learning_rate=2e-3, baseline_budget_s=210.0)
        c.update(eval_every_examples=10000, eval_examples=5000)
        c.noise.chunk_size = 64
        c.throughput.update(max_batch_size=512, memory_budget_bytes=4 * 2**30)
        c.throughput.accumulation_factors = ()
    elif variant in ("gpu", "seed", "effnet_lamb"):
        # seed: EfficientNet-B0 + LAMB at batch 64, lr 1e-3 as in the study; candidates up to
        # 4096 (above what fits: gradient accumulation). The study's baseline ran 7416 s to its
        # best: a budget of 2.5 h lets it converge.
        c.update(baseline_budget_s=9000.0, max_epochs=100.0, eval_every_examples=50000)
        c.eval_examples = 10000
        c.noise.update(batch_size=256, num_batches=16)
        c.throughput.update(min_batch_size=32, max_batch_size=4096)
        c.tradeoff.update(batch_sizes=(64, 128, 256, 512, 1024, 2048), target_accuracy=0.6)
        c.tradeoff.update(max_steps=100000, max_wall_time_s=3600.0, eval_every_examples=25000)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of variant ``arg`` (``smoke``, ``cpu``, ``gpu``, ``seed``; default ``cpu``).

    Example::

        python -m experiments.cifar10 --config configs/cifar10.py:smoke --workdir /tmp/smoke
    """
    arg = arg or "cpu"
    variants = {"smoke": smoke, "cpu": cpu, "gpu": gpu, "seed": seed}
    if arg not in variants:
        raise ValueError(
            f"Unknown configs/cifar10.py variant {arg!r}: use one of {', '.join(VARIANTS)} "
            "(e.g. --config configs/cifar10.py:smoke)."
        )
    config = variants[arg]()
    config.compare = compare_config(arg)
    return config
