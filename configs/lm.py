"""A byte-level Transformer language model with the gradient noise scale tracked in training.

``get_config(arg)``: ``arg`` picks a variant (``smoke``, ``cpu``; default ``cpu``). Every field is
overridable on the command line, e.g. ``--config.data.path=corpus.txt``. Each variant's
docstring gives its command and expected run time; :func:`base` documents the fields, and the
table of :mod:`experiments.rules` (``python -m experiments.lm --help``) gives each one's valid
values.

The default corpus is the ``.py`` files of the running interpreter's standard library
(:mod:`experiments.text`): no download, but it differs between Python versions, and so do the
held-out losses; ``summary.json`` should record ``ds.source`` (Python version, corpus hash).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import configs
from configs import cifar10

VARIANTS = ("smoke", "cpu")


def base() -> ml_collections.ConfigDict:
    """Fields shared by all variants (defaults of the ``cpu`` variant).

    Training: ``seed`` (initialization, dropout and the order of the train windows),
    ``batch_size`` (windows per step), ``learning_rate`` (peak), ``optimizer`` (``sgd`` with
    ``momentum``/``nesterov``, ``adam``, ``adamw``, ``lamb``), ``weight_decay`` (kernels only),
    ``warmup_steps`` (linear warmup), ``schedule`` (``constant``/``cosine``), ``num_steps`` or
    ``num_epochs`` (wins when set; an epoch is ``ds.examples_per_epoch`` windows, one pass over
    the train bytes), ``max_wall_time_s`` (training-time budget), ``target_bits_per_byte`` (stop
    when the periodic held-out bits per byte reach it or fall below; bits per byte = the mean
    next-byte cross-entropy in nats / ln 2), ``target_window`` (the target is on the mean of
    the last N periodic evaluations; 1: each evaluation itself), ``divergence_factor`` (stop
    when the training loss exceeds this multiple of the initial loss; ``None``: only on a
    non-finite loss).
    Evaluation and logging: ``eval_every`` (steps; 0 = only at the end), ``eval_examples``
    (held-out windows of ``context + 1`` bytes of the periodic evaluations, non-overlapping and
    spread evenly over the test split; ``None``: all of them; also the number of train windows
    of the final ``train_bits_per_byte``), ``final_eval_examples`` (the same for the final
    held-out evaluation of ``summary.json``; ``None``: all, 18,840 windows of 65 bytes for the
    Python 3.11 standard library, 40 s on 2 busy CPU cores with the ``cpu`` model),
    ``eval_batch_size``, ``log_every``, ``checkpoint_every``, ``progress_bar``, ``plots``
    (PNGs).
    Noise scale: ``gns_every`` (measure every N steps; 0 = never), ``gns_method`` (``auto`` or
    ``per_example``: per-example gradient norms, on the fast path of :mod:`gns.ghost` for the
    layers it covers and by ``jax.vmap`` for the rest; ``microbatch``), ``gns_microbatches``,
    ``gns_chunk_size``, ``gns_ema_decay``.
    Devices and precision: ``dtype`` (``float32`` or ``bfloat16`` computation, float32
    parameters), ``num_devices`` (the data-parallel mesh; ``None``: every device, with the
    global ``batch_size`` split over them and ``gns_method='auto'`` then ``across_devices``),
    ``distributed`` (``jax.distributed.initialize`` first), ``step_time_repeats`` (time the step
    alone after training; 0: skip), as in ``configs/cifar10.py``.
    ``task``: ``lm`` (:mod:`experiments.tasks`: byte windows, held-out bits per byte).
    ``mode``: ``train`` (the only mode of ``experiments.lm`` so far; ``config.compare`` holds
    the settings of the ``compare``/``tradeoff`` modes for when they take this task).

    ``model`` (``experiments.models.get_model``): ``name`` (``transformer``), ``vocab_size``
    (256: bytes), ``context`` (tokens per example), ``width`` (embedding size), ``depth``
    (blocks), ``num_heads``, ``mlp_ratio`` (MLP hidden size / ``width``), ``tie_embeddings``
    (the output layer is the token embedding transposed).

    ``data`` (:func:`experiments.text.load`): ``path`` (a text file, split by bytes with the last
    ``test_fraction`` held out, or a directory, split by file; ``None``: the Python standard
    library), ``max_bytes`` (cap on the corpus; ``None``: all), ``test_fraction`` (held-out share
    of the files or bytes), ``extensions`` (in a directory, read only files with these suffixes,
    e.g. ``('.py', '.txt')``; ``None``: every file).
    """
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.mode = "train"
    c.seed = 0
    c.batch_size = 32
    c.learning_rate = 2e-3
    c.optimizer = "adamw"
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.01
    c.warmup_steps = 100
    c.schedule = "cosine"
    c.num_steps = 1500
    c.num_epochs = config_dict.placeholder(float)
    c.max_wall_time_s = config_dict.placeholder(float)
    c.target_bits_per_byte = config_dict.placeholder(float)
    c.target_window = 1
    c.divergence_factor = 10.0
    c.eval_every = 250
    c.eval_examples = 1024
    c.final_eval_examples = 4096
    c.eval_batch_size = 256
    c.log_every = 50
    c.checkpoint_every = 500
    c.progress_bar = True
    c.plots = True
    c.gns_every = 20
    c.gns_method = "auto"
    c.gns_microbatches = 8
    c.gns_chunk_size = config_dict.placeholder(int)
    c.gns_ema_decay = 0.95
    # Devices and precision, as in configs/cifar10.py (experiments.mesh, docs/data-parallel.md).
    c.dtype = "float32"
    c.num_devices = config_dict.placeholder(int)
    c.distributed = False
    c.step_time_repeats = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "transformer"
    c.model.vocab_size = 256
    c.model.context = 64
    c.model.width = 128
    c.model.depth = 2
    c.model.num_heads = 4
    c.model.mlp_ratio = 4
    c.model.tie_embeddings = False

    c.data = ml_collections.ConfigDict()
    c.data.path = config_dict.placeholder(str)
    c.data.max_bytes = config_dict.placeholder(int)
    c.data.test_fraction = 0.05
    c.data.extensions = config_dict.placeholder(tuple)
    return c


def smoke() -> ml_collections.ConfigDict:
    """A 1-block width-32 Transformer, context 32, on 300 KB of the standard library, 100 steps:
    a check that everything runs.

    Measured (2026-11-30, 2 CPU cores shared with other jobs, Python 3.11.7,
    ``experiments.models.TransformerLM`` of 26,272 parameters with the fast per-example path):
    7.1 s for the command at load average ~2 (9.3 s of CPU; 12.6 s at load ~4), of which 3.0 s
    compile the two steps, 0.23 s train the 100 steps and 0.3 s evaluate; held-out 4.43 bits
    per byte (train 4.27), next-byte accuracy 0.30. Command::

        python -m experiments.lm --config configs/lm.py:smoke --workdir /tmp/lm_smoke
    """
    c = base()
    c.update(batch_size=16, learning_rate=3e-3, warmup_steps=10, num_steps=100)
    c.update(eval_every=50, eval_examples=128, eval_batch_size=128, log_every=10)
    c.update(checkpoint_every=50, gns_every=5, gns_ema_decay=0.9)
    c.model.update(context=32, width=32, depth=1, num_heads=2, mlp_ratio=2)
    c.data.max_bytes = 300_000
    return c


def cpu() -> ml_collections.ConfigDict:
    """A 2-block width-128 Transformer (4 heads, MLP 512; about 0.47M parameters), context 64,
    AdamW 2e-3 (weight decay 0.01) with 100 warmup steps and cosine decay, batch 32, 1,500 steps
    (48,000 windows, 3.1M bytes: about 0.3 epoch of the ~11 MB standard library).

    Noise scale from per-example gradients every 20 steps (75 measurements); held-out bits per
    byte on 1,024 windows every 250 steps and on 4,096 at the end. Measured with a stand-in
    Transformer of this shape (2 idle CPU cores, no noise-scale steps): 46 ms per plain step, 94
    s for the 1,500 steps; held-out bits per byte 8.2 at start, 2.9 at step 250, 2.5 at 500, 2.2
    at 1,000, 2.07 at the end. With ``experiments.models.TransformerLM`` (the fast per-example
    path) and the noise-scale steps, the first 200 steps (2026-11-30, 2 CPU cores shared with
    other jobs, load average ~5): 250-390 windows per second (80-130 ms per step), 5 s of
    compilation, training loss 2.26 nats at step 200. Expected run time of the command (an
    estimate from these): 2-4 minutes on a busy machine, less on an idle one::

        python -m experiments.lm --config configs/lm.py:cpu --workdir /tmp/lm_cpu
    """
    return base()


def compare_config(variant: str) -> ml_collections.ConfigDict:
    """``config.compare``: the ``compare`` and ``tradeoff`` modes, as in ``configs/cifar10.py``
    (:func:`configs.cifar10.compare_config` documents the fields), with a held-out
    ``tradeoff.target_bits_per_byte`` instead of ``target_accuracy``; example counts are windows.
    """
    c = cifar10.compare_config("smoke" if variant == "smoke" else "cpu")
    del c.tradeoff.target_accuracy
    c.tradeoff.target_bits_per_byte = 2.5
    if variant == "smoke":
        c.update(baseline_batch_size=16, baseline_learning_rate=3e-3)
        c.noise.batch_size = 16
        c.throughput.update(min_batch_size=8, max_batch_size=16)
        c.tradeoff.update(batch_sizes=(8, 16), target_bits_per_byte=5.0)
    else:
        c.update(baseline_batch_size=32, baseline_learning_rate=2e-3)
        c.update(eval_every_examples=8192, eval_examples=512)
        c.noise.update(warmup_steps=100, batch_size=64)
        c.noise.chunk_size = config_dict.placeholder(int)
        c.throughput.max_batch_size = 256
        c.tradeoff.update(batch_sizes=(16, 32, 64, 128, 256), eval_every_examples=2048)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of variant ``arg`` (``smoke``, ``cpu``; default ``cpu``).

    Example::

        python -m experiments.lm --config configs/lm.py:smoke --workdir /tmp/lm_smoke
    """
    arg = arg or "cpu"
    config = configs.select("configs/lm.py", {"smoke": smoke, "cpu": cpu}, arg)
    config.compare = compare_config(arg)
    return config
