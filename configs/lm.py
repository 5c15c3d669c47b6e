"""A byte-level Transformer language model with the gradient noise scale tracked in training.

``get_config(arg)``: ``arg`` picks a variant (``smoke``, ``cpu``, ``sweep``; default ``cpu``).
Every field is overridable on the command line, e.g. ``--config.data.path=corpus.txt``. Each
variant's docstring gives its command and expected run time; :func:`base` defines the fields
(the training fields of :mod:`configs.common`, then the task's), and the table of
:mod:`experiments.rules` (``python -m experiments.lm --help``) gives each one's valid values.

The default corpus is the ``.py`` files of the running interpreter's standard library
(:mod:`experiments.tasks.text`): no download, but it differs between Python versions, and so
do the held-out losses; ``summary.json`` should record ``ds.source`` (Python version, corpus
hash).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import configs
from configs import common

VARIANTS = ("smoke", "cpu", "sweep")


def base() -> ml_collections.ConfigDict:
    """Every field, with the ``cpu`` variant's values: the training fields of
    :func:`configs.common.training` (an example is a window of ``model.context + 1`` bytes; an
    epoch is ``ds.examples_per_epoch`` windows, one pass over the train bytes), the task's
    target, model and data."""
    c = common.training()
    c.task = "lm"  # what the data are (experiments.tasks): byte windows, held-out bits per byte
    c.update(batch_size=32, optimizer="adamw", weight_decay=0.01, warmup_steps=100)
    c.update(schedule="cosine", num_steps=1500, eval_every=250, eval_examples=1024)
    c.update(eval_batch_size=256, checkpoint_every=500, gns_every=20)
    c.target_bits_per_byte = config_dict.placeholder(float)  # stop when the periodic held-out
    # bits per byte (mean next-byte cross-entropy in nats / ln 2) reach it or fall below;
    # needs eval_every > 0 (None: no target)
    c.final_eval_examples = 4096  # held-out windows of the final evaluation (None: all,
    # 18,840 windows of 65 bytes for the Python 3.11 standard library)

    # Model (experiments.models.get_model).
    c.model = ml_collections.ConfigDict()
    c.model.name = "transformer"  # the byte-level Transformer
    c.model.vocab_size = 256  # output classes: 256 (bytes) or more
    c.model.context = 64  # tokens per example (window)
    c.model.width = 128  # embedding size (a multiple of num_heads)
    c.model.depth = 2  # Transformer blocks
    c.model.num_heads = 4  # attention heads (divides width)
    c.model.mlp_ratio = 4  # MLP hidden size / width
    c.model.tie_embeddings = False  # the output layer is the token embedding transposed
    c.model.scan_layers = False  # the blocks as one nn.scan over layers (parameters stacked
    # along a leading axis): one block compiled instead of depth

    # Data (experiments.tasks.text.load).
    c.data = ml_collections.ConfigDict()
    c.data.path = config_dict.placeholder(str)  # a text file (split by bytes, the last
    # test_fraction held out) or a directory (split by file); None: the Python standard library
    c.data.max_bytes = config_dict.placeholder(int)  # cap on the corpus in bytes (None: all)
    c.data.test_fraction = 0.05  # held-out share of the files or bytes
    c.data.extensions = config_dict.placeholder(tuple)  # in a directory, only files with
    # these suffixes, e.g. ('.py', '.txt') (None: every file)
    return c


def smoke() -> ml_collections.ConfigDict:
    """A 1-block width-32 Transformer, context 32, on 300 KB of the standard library, 100 steps:
    a check that everything runs.

    About 7-13 s on 2 CPU cores (26,272 parameters), most of it compiling the two steps;
    held-out ~4.4 bits per byte, next-byte accuracy ~0.3. Command::

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
    byte on 1,024 windows every 250 steps and on 4,096 at the end: from 8.2 at the start to
    about 2.1 at the end. 2-4 minutes on 2 busy CPU cores (80-130 ms per step), less on idle
    ones::

        python -m experiments.lm --config configs/lm.py:cpu --workdir /tmp/lm_cpu
    """
    return base()


def sweep() -> ml_collections.ConfigDict:
    """:func:`cpu`'s Transformer in the sweep (``python -m experiments.sweep``): the noise scale
    along a 200-step pilot at batch 32, the step time of batches 4-256, trainings of batches
    4-64 at a constant rate (the square-root rule from 2e-3 at 32) to 2.6 held-out bits per
    byte, the tradeoff fit and the recommendation. Command::

        python -m experiments.sweep --config configs/lm.py:sweep --workdir /tmp/lm_sweep
    """
    c = common.measurement(cpu())
    c.update(schedule="constant", warmup_steps=0, gns_every=0, checkpoint_every=0)
    c.update(eval_examples=512, final_eval_examples=1024)
    c.throughput.update(min_batch_size=4, max_batch_size=256)
    c.tradeoff.update(batch_sizes=(4, 8, 16, 32, 64), target=2.6, max_steps=5000)
    c.tradeoff.update(max_wall_time_s=120.0, eval_every_examples=2048)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of variant ``arg`` (``smoke``, ``cpu``, ``sweep``; default ``cpu``).

    Example::

        python -m experiments.lm --config configs/lm.py:smoke --workdir /tmp/lm_smoke
    """
    return configs.select("configs/lm.py", {"smoke": smoke, "cpu": cpu, "sweep": sweep}, arg)
