"""CIFAR-10 with the gradient noise scale tracked during training.

``get_config(arg)``: ``arg`` picks a setup (``smoke``, ``cpu``, ``gpu``, ``gpu_study``,
``effnet_lamb``;
default ``cpu``). Every field is overridable on the command line, e.g.
``--config.batch_size=256``. :func:`base` holds every field the code reads, each with its
default (as flax's ``configs/default.py``); each setup's function overrides some of them, and
its docstring gives its command and expected run time. Each field's meaning and valid values
are in the table of :mod:`experiments.rules`, which checks them before a run and which
``python -m experiments.cifar10 --help`` prints; a new field needs a row there.
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

import configs
from experiments.data import CIFAR10_BINARY_MD5, CIFAR10_BINARY_URL

DATA = "../shared/data/cifar10-jpeg.tar.gz"  # the shared JPEG archive, beside the repository
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("smoke", "cpu", "gpu", "gpu_study", "effnet_lamb", "mlp_sgd", "mlp_adam")


def default_data() -> tuple[str, str | None]:
    """The data source as ``make demo`` finds it: ``('folder', DATA)`` when the shared JPEG
    archive exists (from the current directory, else beside the repository), else
    ``('cifar10_binary', None)`` (the official archive, downloaded once into the cache; offline
    it says what to pass instead). ``tfds`` only when asked for
    (``--config.data.source=tfds``)."""
    for path in (DATA, os.path.join(ROOT, DATA)):
        if os.path.exists(path):
            return "folder", path
    return "cifar10_binary", None


def base() -> ml_collections.ConfigDict:
    """Every field, with its default (the ``cpu`` setup's training fields)."""
    c = ml_collections.ConfigDict()
    # What experiments/cifar10.py runs: 'train' (experiments.train.train_and_evaluate),
    # 'compare' (every batch-size policy to one smoothed target; 'adaptive' is another name for
    # it) or 'tradeoff' (experiments.compare, configured by config.compare).
    c.mode = "train"

    # Training. A resume must keep every field that changes the results (all but logging,
    # checkpoints, plots, budgets and cache locations; see experiments.train.run_identity).
    c.seed = 0  # initialization, data order, augmentation, dropout
    c.batch_size = 128  # examples per step (>= 2: the noise scale compares examples)
    c.learning_rate = 2e-3  # peak learning rate (after warmup)
    c.optimizer = "adam"  # 'sgd' (with momentum/nesterov), 'adam', 'adamw', 'lamb'
    c.momentum = 0.9  # sgd only; 0 = plain SGD
    c.nesterov = False  # sgd only
    c.weight_decay = 0.0  # on kernels only: L2 for sgd/adam, decoupled for adamw/lamb
    c.warmup_steps = 0  # linear warmup from 0
    c.schedule = "constant"  # after warmup: 'constant' or 'cosine' (decay to 0 at the end)
    c.num_steps = 1000  # length of the run in steps...
    c.num_epochs = config_dict.placeholder(float)  # ...or in epochs (wins when set)
    c.max_wall_time_s = config_dict.placeholder(float)  # training-time budget (None: none)
    c.target_accuracy = config_dict.placeholder(float)  # stop when the periodic test
    # accuracy reaches it (needs eval_every > 0); None: no target
    c.target_window = 1  # ...the mean of the last N periodic evaluations reaches it (1: the
    # evaluation itself); steps_to_target and time_to_target_s are taken at that crossing
    c.divergence_factor = 10.0  # stop when the training loss exceeds this multiple of the
    # initial loss (a non-finite loss always stops the run); None: only non-finite losses

    # Evaluation, logging and outputs.
    c.eval_every = 500  # steps between test evaluations (0: only the final one)
    c.eval_examples = 5000  # fixed random test subset of the periodic evaluations and train
    # subset of the final train accuracy (None: all); the final test accuracy uses all
    c.eval_batch_size = 500  # examples per evaluation batch (memory only)
    c.log_every = 50  # steps between metrics rows (measured/evaluated steps always get one)
    c.checkpoint_every = 1000  # steps between checkpoints (0: only at the end)
    c.progress_bar = True  # a tqdm bar when stderr is a terminal
    c.plots = True  # training.png and noise_scale.png

    # Noise scale, measured during training (gns.estimate) and smoothed (gns.smoothing.ema).
    c.gns_every = 10  # measure every N steps (0: never)
    c.gns_method = "auto"  # 'auto' (across_devices on >= 2 devices; on one device
    # per_example without BatchNorm, else microbatch), 'per_example', 'microbatch' or
    # 'across_devices' (each device's batch against the global one: free)
    c.gns_microbatches = 8  # microbatches of the estimator in the global batch (and
    # ghost-BatchNorm groups); a multiple of the device count with 'microbatch'

    # Devices and precision (experiments.mesh; docs/data-parallel.md).
    c.dtype = "float32"  # computation dtype: 'float32' or 'bfloat16' (mixed precision:
    # parameters, optimizer state and noise-scale sums stay float32)
    c.num_devices = config_dict.placeholder(int)  # devices of the data-parallel mesh; the
    # global batch_size is split over them (None: all devices of all hosts)
    c.distributed = False  # call jax.distributed.initialize() first (also done when
    # JAX_COORDINATOR_ADDRESS is set); only process 0 writes files
    c.step_time_repeats = 0  # after training, time the step alone N times and report
    # device utilization (training examples/s over step-alone examples/s); 0: skip
    c.gns_chunk_size = config_dict.placeholder(int)  # per_example chunk (None: one chunk)
    c.gns_ema_decay = 0.95  # EMA of g_sq and trace_cov (bias-corrected)

    # Batch-size schedule (gns.schedule.batch_size_schedule; experiments/adaptive.py): with
    # adaptive.enabled the batch size follows the smoothed noise scale (updated at each
    # noise-scale measurement, so gns_every > 0), the learning rate is config.learning_rate
    # (tuned at config.batch_size) times the schedule's multiplier, the data come from the
    # example-indexed stream, and the run stops after num_steps x batch_size examples (or
    # num_epochs). --config.mode=adaptive runs it against fixed batch sizes.
    c.adaptive = ml_collections.ConfigDict()
    c.adaptive.enabled = False  # train with the schedule (mode=adaptive sets it for its runs)
    c.adaptive.candidates = config_dict.placeholder(tuple)  # compiled batch sizes, strictly
    # increasing (None: the powers of two in [min_batch_size, max_batch_size])
    c.adaptive.min_batch_size = 16  # smallest candidate (when candidates is None)
    c.adaptive.max_batch_size = 512  # also capped by what fits (the mode's sweep)
    c.adaptive.initial_batch_size = config_dict.placeholder(int)  # None: smallest candidate
    c.adaptive.step_times = config_dict.placeholder(tuple)  # seconds per step of each
    # candidate, in order (None: timed, interleaved, before training)
    c.adaptive.lr_rule = "sqrt"  # 'linear', 'sgd', 'sqrt' (Adam-family), 'seesaw', 'constant'
    c.adaptive.margin = 0.05  # predicted relative saving a change needs
    c.adaptive.patience = 3  # consecutive measurements that must agree before a change
    c.adaptive.allow_shrink = False  # a ramp only grows
    c.adaptive.noise_scale_factor = 1.0  # multiplies the smoothed B_simple fed to the schedule
    c.adaptive.eval_every_examples = config_dict.placeholder(int)  # evaluation interval in
    # examples (None: eval_every x batch_size)
    c.adaptive.timing_warmup = 2  # untimed calls per batch size before the timing rounds
    c.adaptive.timing_rounds = 7  # interleaved rounds (each times every batch size once)
    # (The policy comparison it runs in, --config.mode=compare or adaptive: config.compare.)

    # Model (experiments.models.get_model; None: the model's default).
    c.model = ml_collections.ConfigDict()
    c.model.name = "small_cnn"  # small_cnn, mlp, resnet18 (resnet), efficientnet_b0 (efficientnet)
    c.model.widths = (32, 64, 128)  # small_cnn: conv widths (stride 2 each); mlp: hidden widths
    c.model.groups = 8  # small_cnn: GroupNorm groups
    c.model.stage_sizes = config_dict.placeholder(tuple)  # resnet: blocks per stage
    c.model.num_filters = config_dict.placeholder(int)  # resnet: stem width
    c.model.width_coefficient = config_dict.placeholder(float)  # efficientnet
    c.model.depth_coefficient = config_dict.placeholder(float)  # efficientnet
    c.model.dropout_rate = config_dict.placeholder(float)  # efficientnet
    c.model.drop_connect_rate = config_dict.placeholder(float)  # efficientnet
    c.model.stem_strides = config_dict.placeholder(int)  # efficientnet (1 for 32x32 inputs)

    # Data (experiments.data.load).
    c.data = ml_collections.ConfigDict()
    c.data.source, path = default_data()  # 'folder' (data.path), 'cifar10_binary' (the
    # official binary archive: data.path, or downloaded once from data.url into the cache,
    # MD5-checked), 'tfds' (a prepared tfds dataset) or 'synthetic'
    c.data.name = "cifar10"  # tfds name
    c.data.path = config_dict.placeholder(str)  # folder or .tar.gz laid out split/class/x.jpg
    c.data.path = path
    c.data.cache_dir = config_dict.placeholder(str)  # decoded arrays (None: ~/.cache/gns)
    c.data.tfds_data_dir = config_dict.placeholder(str)  # tfds data_dir (None: its default)
    c.data.url = CIFAR10_BINARY_URL  # cifar10_binary: where to download it from...
    c.data.md5 = CIFAR10_BINARY_MD5  # ...and its published checksum (None: unchecked)
    c.data.num_train = config_dict.placeholder(int)  # class-stratified subset (None: all)
    c.data.num_test = config_dict.placeholder(int)  # same for the test split
    c.data.augment = True  # random crop (reflect padding 4) and horizontal flip
    c.data.on_device = False  # decoded train arrays kept on the devices and batches gathered
    # there (same batches as the host pipeline; no host work between steps)
    c.data.synthetic = ml_collections.ConfigDict()  # source='synthetic' only
    c.data.synthetic.image_size = 32  # image side in pixels
    c.data.synthetic.num_classes = 10
    c.data.synthetic.seed = 0  # the data's seed
    return c


def smoke() -> ml_collections.ConfigDict:
    """Tiny CNN on 512 train / 256 test examples, 150 steps: a check that everything runs.

    Command (about 15-25 s on 2 CPU cores, including start-up; the first run on the real
    images also decodes and caches them, about 20 s more)::

        python -m experiments.cifar10 --config configs/cifar10.py:smoke --workdir /tmp/smoke \
          --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg.tar.gz

    It trains on every device it sees: with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
    on 4 simulated CPU devices (batch 8 each, noise scale ``across_devices``; ``summary.json``
    records the mesh), with the same test accuracy as on one device (0.207 both, measured
    2026-11-30 on the real images).
    """
    c = base()
    c.update(batch_size=32, learning_rate=3e-3, num_steps=150, gns_every=3, gns_ema_decay=0.9)
    c.update(eval_every=50, eval_examples=256, eval_batch_size=256)
    c.update(log_every=10, checkpoint_every=50)
    c.model.update(widths=(8, 16), groups=4)
    c.data.update(num_train=512, num_test=256, augment=False)
    c.adaptive.update(min_batch_size=8, max_batch_size=32, patience=2, eval_every_examples=512)
    c.adaptive.update(timing_warmup=1, timing_rounds=2)
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

    ``make demo`` (``--config.mode=compare``, ``config.compare``): the batch-size policies
    (recommended, default 64, the adaptive schedule 16 -> 256, the largest batch that fits),
    2 seeds each, to a smoothed 55% on the whole test set (sized for about 10-15 minutes on 2
    idle cores; the measured time is in the README)::

        python -m experiments.cifar10 --config configs/cifar10.py:cpu --config.mode=compare \
          --workdir /tmp/cpu_compare --config.data.source=folder \
          --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base()
    c.update(batch_size=128, learning_rate=2e-3, optimizer="adam")
    c.update(schedule="cosine", warmup_steps=100, num_epochs=8.0)
    c.update(eval_every=500, eval_examples=5000, log_every=50, checkpoint_every=1000)
    c.update(gns_every=20, gns_chunk_size=64)
    c.adaptive.max_batch_size = 256
    c.adaptive.eval_every_examples = 10000
    c.adaptive.timing_rounds = 15  # the demo's one timing table (a busy machine: more rounds)
    return c


def mlp_sgd() -> ml_collections.ConfigDict:
    """A dense-only setup where bigger batches keep paying on a CPU: an MLP (2 hidden layers of
    512, 1.84M parameters) on CIFAR-10 pixels, SGD momentum 0.9, learning rate 0.01 at batch 64,
    no augmentation. Its step time per example keeps falling up to batch 512 on 2 CPU cores,
    so the best batch there is large (the README's validation table); ``compare`` and
    ``tradeoff`` modes race batch 16-512 to a smoothed 47% test accuracy. Command::

        python -m experiments.cifar10 --config configs/cifar10.py:mlp_sgd \
          --config.mode=tradeoff --workdir /tmp/mlp_sgd --config.data.source=folder \
          --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base()
    c.update(batch_size=64, learning_rate=0.01, optimizer="sgd", momentum=0.9)
    c.update(num_epochs=10.0, eval_every=500, eval_examples=5000, log_every=50)
    c.update(gns_every=20, checkpoint_every=0)
    c.model.update(name="mlp", widths=(512, 512))
    c.data.augment = False
    return c


def mlp_adam() -> ml_collections.ConfigDict:
    """:func:`mlp_sgd` trained with Adam, learning rate 1e-3 at batch 64 (square-root rule for
    other batch sizes). Command::

        python -m experiments.cifar10 --config configs/cifar10.py:mlp_adam \
          --config.mode=tradeoff --workdir /tmp/mlp_adam --config.data.source=folder \
          --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = mlp_sgd()
    c.update(learning_rate=1e-3, optimizer="adam")
    return c


def _accelerator_defaults(c: ml_collections.ConfigDict) -> None:
    """Evaluation, logging and noise-scale fields of the accelerator setups (BatchNorm models:
    the noise scale from 8 microbatches, which are also the ghost-BatchNorm groups; on 2 or
    more devices from the devices' batches, each its own BatchNorm group)."""
    c.update(eval_examples=10000, log_every=100, checkpoint_every=2000)
    c.update(gns_every=20, gns_method="auto", gns_microbatches=8)


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
    c.update(batch_size=128, learning_rate=0.1, optimizer="sgd", momentum=0.9, nesterov=True)
    c.update(weight_decay=5e-4, schedule="cosine", num_epochs=30.0, warmup_steps=780)
    c.eval_every = 1000
    _accelerator_defaults(c)
    c.model.update(name="resnet18", stage_sizes=(2, 2, 2, 2), num_filters=64)
    return c


def effnet_lamb() -> ml_collections.ConfigDict:
    """EfficientNet-B0 (BatchNorm, as in the paper; 4.0M parameters with a 10-class head),
    LAMB, batch 64, learning rate 1e-3: the setting of the study that motivates the project.

    Cosine decay over 30 epochs with 500 warmup steps; noise scale from 8 microbatches (ghost
    BatchNorm of 8) every 20 steps. Runs on an accelerator (hours on a CPU); on one modern
    GPU roughly 30-60 minutes (not timed here). Command::

        python -m experiments.cifar10 --config configs/cifar10.py:effnet_lamb \
          --workdir runs/effnet_lamb --config.data.source=folder \
          --config.data.path=../shared/data/cifar10-jpeg.tar.gz

    The policy comparison (``config.compare``: batch 64, the recommended batch, the schedule
    and the largest batch that fits, 2 seeds each, to a smoothed 85% test accuracy, each run
    capped at 2.5 hours; the study's batch-64 run took 7416 s to its best, so plan on many
    hours of one GPU, not timed here)::

        python -m experiments.cifar10 --config configs/cifar10.py:effnet_lamb \
          --config.mode=compare --workdir runs/effnet_lamb_compare --config.data.source=folder \
          --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = base()
    c.update(batch_size=64, learning_rate=1e-3, optimizer="lamb", weight_decay=1e-2)
    c.update(schedule="cosine", warmup_steps=500, num_epochs=30.0)
    c.eval_every = 2000
    _accelerator_defaults(c)
    c.model.update(name="efficientnet_b0", width_coefficient=1.0, depth_coefficient=1.0)
    c.model.update(dropout_rate=0.2, drop_connect_rate=0.2, stem_strides=2)
    return c


def gpu_study() -> ml_collections.ConfigDict:
    """The study's claim on one modern GPU in about 10 minutes: ResNet-18 on CIFAR-10 in
    bfloat16, batch 64 against the recommended batch, to the same accuracy (``compare`` mode).

    The measurements (noise scale from 4 microbatches, step time at batch 64..2048), then the
    baseline at batch 64 (SGD + Nesterov 0.05, constant learning rate, 2 minutes of training),
    the recommended batch until the baseline's best accuracy, and the baseline again for the
    recommended run's time. Data stay on the GPU (``data.on_device``: batches gathered and
    augmented there); every run's ``summary.json`` reports ``device_utilization``
    (training examples/s over the step alone). Not yet run on a GPU; on CPU it is tested with
    a tiny ResNet. Command::

        python -m experiments.cifar10 --config configs/cifar10.py:gpu_study \
          --workdir runs/gpu_study --config.data.source=folder \
          --config.data.path=../shared/data/cifar10-jpeg.tar.gz
    """
    c = gpu()
    c.update(mode="compare", dtype="bfloat16", step_time_repeats=20, progress_bar=False)
    c.data.on_device = True
    c.update(batch_size=64, learning_rate=0.05, warmup_steps=0, num_epochs=15.0)
    c.update(eval_every=500, eval_examples=5000)
    c.gns_microbatches = 4  # ghost BatchNorm of 16 at batch 64
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

    The policy comparison (``compare``, also run by ``--config.mode=adaptive``): ``policies``
    trained in this order (``recommended``, ``default``, ``adaptive``, ``best_measured``,
    ``largest_fits``), each once per seed in ``seeds``. ``baseline_batch_size`` /
    ``baseline_learning_rate`` (``None``: ``config.batch_size`` and ``config.learning_rate``):
    the ``default`` policy, and the reference every other batch size's learning rate is scaled
    from (:func:`gns.recommend.scale_learning_rate`, the same rule for every policy). The
    target: the trailing mean of the last ``target_window`` test evaluations reaches
    ``target_accuracy``; evaluations every ``eval_every_examples`` training examples on
    ``eval_examples`` test images (``None``: the config's). Each run is one training (its
    ``target_accuracy`` and ``target_window`` are these) that stops at the target,
    ``max_epochs``, or a training-time budget: ``max_wall_time_s``, or ``give_up_factor``
    times the fastest time to target before it when that is less (``None``: no such cap).
    ``tradeoff_summary``: the summary of a ``tradeoff`` run for ``best_measured`` (``None``:
    ``WORKDIR/tradeoff/summary.json``).
    ``schedule`` and ``warmup_steps`` replace the config's (``None``: keep them); the default
    is a constant learning rate without warmup, so that a budget does not cut a decay short and
    a warmup counted in steps does not penalize the larger batch sizes.

    ``noise``, ``throughput``, ``recommend``: the measurement and recommendation stages of
    ``configs/sweep.py`` (documented there); ``tradeoff``: the trainings to
    ``target_accuracy`` of the ``tradeoff`` mode at ``batch_sizes`` (plus the recommended
    one), each capped by ``max_steps`` and ``max_wall_time_s``, evaluated every
    ``eval_every_examples``, ``num_bootstrap`` refits.
    """
    c = ml_collections.ConfigDict()
    c.policies = ("recommended", "default", "adaptive", "best_measured", "largest_fits")
    c.seeds = (0, 1)
    c.baseline_batch_size = config_dict.placeholder(int)
    c.baseline_learning_rate = config_dict.placeholder(float)
    c.update(target_accuracy=0.5, target_window=3, eval_every_examples=25000)
    c.eval_examples = config_dict.placeholder(int)
    c.update(give_up_factor=3.0, max_wall_time_s=600.0)
    c.update(max_epochs=100.0, schedule="constant", warmup_steps=0)
    c.tradeoff_summary = config_dict.placeholder(str)
    add_measurement_stages(c)
    c.tradeoff = ml_collections.ConfigDict(
        dict(batch_sizes=(16, 32, 64, 128, 256), target_accuracy=0.5, max_steps=5000)
    )
    c.tradeoff.update(max_wall_time_s=150.0, eval_every_examples=4096, num_bootstrap=1000)
    if variant == "smoke":
        # Seconds: one seed, the synthetic target of the tests, budgets of a second or two.
        c.update(seeds=(0,), target_accuracy=0.2, target_window=2, eval_every_examples=512)
        c.update(max_wall_time_s=3.0, max_epochs=8.0)
        c.noise.update(warmup_steps=5, batch_size=32, num_batches=3)
        c.throughput.update(min_batch_size=16, max_batch_size=32, accumulation_factors=())
        c.throughput.update(warmup=1, repeats=2)
        c.tradeoff.update(batch_sizes=(8, 16, 32), target_accuracy=0.2, max_steps=200)
        c.tradeoff.update(max_wall_time_s=3.0, eval_every_examples=256, num_bootstrap=50)
    elif variant == "cpu":
        # make demo. The target on the whole test set (n = 10,000: standard error <= 0.5
        # points), smoothed over 3 evaluations 10,000 examples apart; the largest batch that
        # fits (512) is given at most 3x the fastest time to target.
        c.update(baseline_batch_size=64, baseline_learning_rate=2e-3)
        c.update(target_accuracy=0.55, eval_every_examples=10000, eval_examples=10000)
        c.update(max_wall_time_s=150.0)
        c.noise.chunk_size = 64
        c.throughput.update(max_batch_size=512, memory_budget_bytes=4 * 2**30)
        c.throughput.accumulation_factors = ()
    elif variant in ("mlp_sgd", "mlp_adam"):
        # Batch 16-512 to a smoothed 47% on 5,000 test images, evaluated every 8,192 examples.
        c.update(baseline_batch_size=64, target_accuracy=0.47, eval_every_examples=8192)
        c.update(eval_examples=5000, max_wall_time_s=150.0)
        c.noise.update(batch_size=64, num_batches=16)
        c.throughput.update(max_batch_size=512, accumulation_factors=())
        c.tradeoff.update(batch_sizes=(16, 32, 64, 128, 256, 512), target_accuracy=0.47)
        c.tradeoff.update(max_steps=20000, max_wall_time_s=150.0, eval_every_examples=8192)
    elif variant == "gpu_study":
        # About 10 minutes on one modern GPU: few batch sizes to compile, 2-minute baseline.
        c.update(baseline_batch_size=64, max_epochs=15.0)
        c.update(eval_every_examples=10000, eval_examples=5000)
        c.noise.update(warmup_steps=200, batch_size=256, num_batches=8)
        c.throughput.update(min_batch_size=64, max_batch_size=2048, repeats=5)
        c.throughput.accumulation_factors = ()
        c.recommend.candidates = (64, 128, 256, 512, 1024, 2048)
    elif variant in ("gpu", "effnet_lamb"):
        # effnet_lamb: EfficientNet-B0 + LAMB at batch 64, lr 1e-3 as in the study; candidates up to
        # 4096 (above what fits: gradient accumulation).
        c.update(target_accuracy=0.85, max_wall_time_s=9000.0)
        c.update(max_epochs=100.0, eval_every_examples=50000)
        c.eval_examples = 10000
        c.noise.update(batch_size=256, num_batches=16)
        c.throughput.update(min_batch_size=32, max_batch_size=4096)
        c.tradeoff.update(batch_sizes=(64, 128, 256, 512, 1024, 2048), target_accuracy=0.6)
        c.tradeoff.update(max_steps=100000, max_wall_time_s=3600.0, eval_every_examples=25000)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of setup ``arg`` (``smoke``, ``cpu``, ``gpu``, ``effnet_lamb``; default
    ``cpu``), with ``config.compare`` for the compare and tradeoff modes.

    Example::

        python -m experiments.cifar10 --config configs/cifar10.py:smoke --workdir /tmp/smoke
    """
    arg = arg or "cpu"
    config = configs.select("configs/cifar10.py", {v: globals()[v] for v in VARIANTS}, arg)
    config.compare = compare_config(arg)
    return config
