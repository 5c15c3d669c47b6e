"""The two halves every config is made of, each field defined once here with its default:

* :func:`training`: what :func:`experiments.train.train_and_evaluate` reads for every task
  (a task's config file adds ``model``, ``data`` and its target);
* :func:`measurement`: the measurement and recommendation stages of :mod:`experiments.sweep`
  (``noise``, ``critical``, ``throughput``, ``recommend``, ``tradeoff``), at the top level of
  the config; the sweep (``configs/sweep.py``) and the ``compare``/``tradeoff`` modes of
  ``experiments.cifar10`` (``configs/cifar10.py``) read them at the same paths.

A config file starts from these and sets only what differs. Each field's valid values are in
the table of :mod:`experiments.rules`, which ``--help`` prints with these meanings.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def training() -> ml_collections.ConfigDict:
    """The training fields, with the defaults of ``configs/cifar10.py:cpu``."""
    c = ml_collections.ConfigDict()
    c.mode = "train"  # what runs: 'train', 'compare' (every batch-size policy to one
    # smoothed target; 'adaptive' is another name for it) or 'tradeoff' (time to a target at
    # several batch sizes; both configured by config.compare and the measurement fields);
    # experiments.lm and the teacher task have 'train' only

    # Training. A resume must keep every field that changes the results (all but logging,
    # checkpoints, plots, budgets and cache locations; see experiments.train.run_identity).
    c.seed = 0  # initialization, data order, augmentation, dropout
    c.batch_size = 128  # examples per step, global over the devices (>= 2: the noise
    # scale compares examples)
    c.learning_rate = 2e-3  # peak learning rate (after warmup)
    c.optimizer = "adam"  # 'sgd' (with momentum/nesterov), 'adam', 'adamw', 'lamb'
    c.momentum = 0.9  # sgd only; 0 = plain SGD
    c.nesterov = False  # sgd only: Nesterov momentum
    c.weight_decay = 0.0  # on kernels only: L2 for sgd/adam, decoupled for adamw/lamb
    c.warmup_steps = 0  # linear warmup from 0 over this many steps
    c.schedule = "constant"  # after warmup: 'constant' or 'cosine' (decay to 0 at the end)
    c.num_steps = 1000  # length of the run in steps (unless num_epochs is set)
    c.num_epochs = config_dict.placeholder(float)  # length of the run in epochs (wins over
    # num_steps when set; None: num_steps)
    c.max_wall_time_s = config_dict.placeholder(float)  # training-time budget in seconds
    # (None: no budget)
    c.target_window = 1  # the task's target is on the mean of the last N periodic
    # evaluations (1: each evaluation itself); steps_to_target is taken at that crossing
    c.divergence_factor = 10.0  # stop when the training loss exceeds this multiple of the
    # initial loss (a non-finite loss always stops the run); None: only non-finite losses

    # Evaluation, logging and outputs.
    c.eval_every = 500  # steps between periodic evaluations (0: only the final one)
    c.eval_examples = 5000  # fixed random held-out subset of the periodic evaluations and
    # train subset of the final train metric (None: all)
    c.eval_batch_size = 500  # examples per evaluation batch (memory only)
    c.log_every = 50  # steps between metrics rows (measured/evaluated steps always get one)
    c.checkpoint_every = 1000  # steps between checkpoints (0: only at the end)
    c.start_from = config_dict.placeholder(str)  # a pilot's checkpoint directory to go on
    # from: its state, step, examples and seconds (None: a fresh start)
    c.progress_bar = True  # a progress bar when stderr is a terminal (else a log line every
    # GNS_PROGRESS_EVERY_S seconds)
    c.plots = True  # write training.png and noise_scale.png

    # Noise scale, measured during training (gns.estimate) and smoothed (gns.smoothing.ema).
    c.gns_every = 10  # measure the noise scale every N steps (0: never)
    c.gns_method = "auto"  # 'auto' (across_devices on >= 2 devices; on one device
    # per_example without BatchNorm, else microbatch), 'per_example', 'microbatch' or
    # 'across_devices' (each device's batch against the global one: free)
    c.gns_microbatches = 8  # microbatches of the estimator in the global batch (and
    # ghost-BatchNorm groups); a multiple of the device count with 'microbatch'
    c.gns_chunk_size = config_dict.placeholder(int)  # per_example: examples per chunk, for
    # memory (None: one chunk)
    c.gns_ema_decay = 0.95  # EMA decay of g_sq and trace_cov (bias-corrected)

    # Devices and precision (experiments.mesh; docs/data-parallel.md).
    c.dtype = "float32"  # computation dtype: 'float32' or 'bfloat16' (mixed precision:
    # parameters, optimizer state and noise-scale sums stay float32)
    c.num_devices = config_dict.placeholder(int)  # devices of the data-parallel mesh; the
    # global batch_size is split over them (None: all devices of all hosts)
    c.distributed = False  # call jax.distributed.initialize() first (also done when
    # JAX_COORDINATOR_ADDRESS is set); only process 0 writes files
    c.step_time_repeats = 0  # after training, time the step alone N times and report
    # device utilization (training examples/s over step-alone examples/s); 0: skip
    return c


def measurement(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``c`` (a training config) with the measurement fields added, at the top level."""
    c.compilation_cache = True  # JAX's persistent compilation cache for the trainings, in
    # the user's $XDG_CACHE_HOME/gns/jax (never the workdir): a re-run compiles nothing

    # The noise scale along a pilot: pilot_steps steps of training at batch_size (gns_method),
    # measuring every `every` steps: b_simple pooled over the pilot with a bootstrap interval,
    # the trajectory (num_stretches stretches) and the effective noise scale. The recommended
    # run goes on from the pilot's end state.
    c.noise = ml_collections.ConfigDict()
    c.noise.pilot_steps = 200  # steps of the pilot: training at batch_size with the noise
    # scale measured (gns_method), the recommended run going on from its end state
    c.noise.confidence = 0.9  # level of the bootstrap intervals
    c.noise.every = 1  # pilot steps between its measurements (gns_every: a training's)
    c.noise.num_stretches = 3  # equal stretches of the pilot's trajectory

    # The branched critical batch (gns.critical.branched_critical_batch): forks from
    # num_checkpoints states of the pilot at batch_size x 2^j for j in exponents.
    c.critical = ml_collections.ConfigDict()
    c.critical.num_checkpoints = 0  # states of the pilot where the branched critical batch is
    # measured (0: off)
    c.critical.exponents = (-2, -1, 0, 1, 2)  # forks at batch_size x 2^j (at least 2, increasing)
    c.critical.fork_steps = 8  # steps of the largest fork (the same examples for all)
    c.critical.num_repeats = 2  # repeats on disjoint data
    c.critical.eval_examples = 1000  # held-out examples of each fork's loss
    c.critical.confidence = 0.9  # level of the intervals
    c.critical.seed_offset = 7  # the forks' data stream seed: seed + this

    # Step time and memory of the powers of two from min_batch_size to max_batch_size (global
    # batches split over the mesh; times 3 on 3 devices, where no power of two splits), one
    # interleaved table; above the largest that fits, factor x largest as gradient accumulation.
    c.throughput = ml_collections.ConfigDict()
    c.throughput.min_batch_size = 16  # smallest timed batch (powers of two up to max_batch_size)
    c.throughput.max_batch_size = 1024  # largest timed batch (a pick there: the next power
    # of two is timed once more, gns.finder's widening)
    c.throughput.memory_budget_bytes = config_dict.placeholder(int)  # memory per device a
    # batch must fit in (None: the device's capacity, or half the free host RAM on CPU)
    c.throughput.warmup = 2  # untimed calls per batch size before the timed rounds
    c.throughput.repeats = 5  # interleaved rounds timing every batch size once (median)
    c.throughput.accumulation_factors = (2, 4)  # batches of factor x the largest that fits,
    # timed as gradient accumulation

    # The recommendation (gns.finder.decide).
    c.recommend = ml_collections.ConfigDict()
    c.recommend.price_per_hour = config_dict.placeholder(float)  # device price, for the cost
    # objective (None: device-seconds)
    c.recommend.objective = "time"  # what the recommendation minimizes: 'time' or 'cost'
    c.recommend.candidates = config_dict.placeholder(tuple)  # extra batch sizes to consider
    # (None: the measured and accumulation ones)

    # Trainings to a target at several batch sizes (the sweep; the tradeoff mode), the
    # learning rate scaled from learning_rate at batch_size (gns.scaling.learning_rate).
    c.tradeoff = ml_collections.ConfigDict()
    c.tradeoff.batch_sizes = config_dict.placeholder(tuple)  # batch sizes trained to the
    # target (None: powers of two from min_batch_size up to the largest that fits, at most
    # max_runs of them, spread evenly)
    c.tradeoff.min_batch_size = 16  # smallest trained batch when batch_sizes is None
    c.tradeoff.max_runs = 5  # at most this many batch sizes when batch_sizes is None
    c.tradeoff.target = 0.5  # each training's target on the task's metric (its config field:
    # target_accuracy of the image and teacher tasks, target_bits_per_byte of the lm task)
    c.tradeoff.max_steps = 5000  # step cap of each training (and the pilot's schedule horizon)
    c.tradeoff.max_wall_time_s = 120.0  # time cap of each training (None: no budget)
    c.tradeoff.eval_every_examples = 4096  # evaluation interval in training examples (the same
    # resolution at every batch)
    c.tradeoff.num_bootstrap = 1000  # bootstrap refits of the S(B) = S_min + E_min/B fit
    c.tradeoff.extra_seeds = 0  # more seeds (seed + 1, ...) at the reseed_best fastest batches
    c.tradeoff.reseed_best = 3  # how many of the fastest batches get extra seeds
    return c
