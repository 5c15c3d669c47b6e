"""Cost of the noise-scale estimators over a plain train step (``make bench``).

``get_config(arg)``: ``arg`` picks a variant (``default`` or ``tiny``). Every field is
overridable on the command line, e.g. ``--config.repeats=50``; the valid values of each are
in the table of :mod:`experiments.rules` (``python -m experiments.bench --help``).

Fields:
  ``model``: the reference model (``experiments.models.get_model`` config: the ``small_cnn`` of
  the ``cpu`` CIFAR-10 config). ``image_size``/``channels``/``num_classes``: synthetic data
  shape. ``batch_sizes``: the batch sizes timed; ``reference_batch_size``: the one whose ratios
  are reported at the top level. ``learning_rate``: Adam's. ``num_microbatches``: ``k`` of the
  microbatch estimator. ``chunk_size``: ``per_example`` chunk size (``None``: all at once).
  ``warmup``: untimed calls of each step after compilation. ``repeats``: timed rounds; each
  round times every variant once, in turn (interleaved), and the median is reported.
  ``parallel``: also run ``experiments/parallel_bench.py`` in a subprocess with 4 simulated
  devices (``across_devices_over_plain``); ``parallel_batch_size_per_device`` and
  ``parallel_repeats`` are passed to it.
  ``lm``: the Transformer rows (``experiments.bench_lm.measure``): ``enabled``, ``model`` (the
  ``transformer`` of ``configs/lm.py:cpu``: vocabulary 256, context 64, width 128, 2 blocks of 4
  heads, MLP ratio 4; AdamW), ``batch_sizes`` (sequences of ``context`` bytes),
  ``num_microbatches``, ``warmup`` and ``repeats`` (interleaved rounds, median).
  ``rows``: more models, written as a new user would (``experiments.bench_lm.measure_rows``):
  ``enabled``, ``num_microbatches``, ``warmup``, ``repeats`` and ``models``: ``lm1b`` (a
  Transformer in the style of the Flax lm1b example: a bare ``self.param`` position embedding,
  ``nn.MultiHeadDotProductAttention``; the size of the ``lm`` model), ``nnx_mlp`` and
  ``plain_mlp`` (an NNX MLP and a dict of weights with ``jnp.dot`` + bias, 3072-512-512-10),
  each with its ``batch_sizes``.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import configs
from configs import lm

VARIANTS = ("default", "tiny")


def default() -> ml_collections.ConfigDict:
    """The reference benchmark: SmallCNN (32, 64, 128), Adam, batches 128 and 512; and the
    ``lm`` ``cpu`` Transformer, AdamW, batches 32 and 128.

    Command (a few minutes on 2 idle CPU cores, most of it compiling; the rolled microbatch
    loop at batch 512 is the slowest step)::

        make bench   # = python -m experiments.bench --config configs/bench.py --workdir runs/bench
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.name = "small_cnn"
    c.model.widths = (32, 64, 128)
    c.model.groups = 8
    c.image_size = 32
    c.channels = 3
    c.num_classes = 10
    c.batch_sizes = (128, 512)
    c.reference_batch_size = 128
    c.learning_rate = 2e-3
    c.num_microbatches = 8
    c.chunk_size = config_dict.placeholder(int)
    c.warmup = 2
    c.repeats = 11
    c.parallel = True
    c.parallel_batch_size_per_device = 32
    c.parallel_repeats = 11
    c.lm = ml_collections.ConfigDict()
    c.lm.enabled = True
    c.lm.model = lm.cpu().model
    c.lm.batch_sizes = (32, 128)
    c.lm.num_microbatches = 8
    c.lm.warmup = 2
    c.lm.repeats = 7
    c.rows = ml_collections.ConfigDict()
    c.rows.enabled = True
    c.rows.num_microbatches = 8
    c.rows.warmup = 2
    c.rows.repeats = 7
    c.rows.models = ml_collections.ConfigDict()
    lm1b = dict(vocab_size=256, context=64, width=128, depth=2, num_heads=4, mlp_ratio=4)
    c.rows.models.lm1b = dict(batch_sizes=(32,), **lm1b)
    c.rows.models.nnx_mlp = dict(batch_sizes=(128,), dims=(3072, 512, 512, 10))
    c.rows.models.plain_mlp = dict(batch_sizes=(128,), dims=(3072, 512, 512, 10))
    return c


def tiny() -> ml_collections.ConfigDict:
    """A seconds-long run for the schema test: a one-conv CNN on 8x8 images, batch 8; tiny
    Transformer and MLP rows.

    Command (about 10 s on 2 CPU cores; mostly compilation)::

        python -m experiments.bench --config configs/bench.py:tiny --workdir /tmp/bench_tiny
    """
    c = default()
    c.model.update(widths=(4,), groups=2)
    c.update(image_size=8, batch_sizes=(8,), reference_batch_size=8, warmup=1, repeats=2)
    c.update(parallel=False, parallel_batch_size_per_device=8, parallel_repeats=3)
    c.lm.model.update(context=8, width=8, depth=1, num_heads=2, mlp_ratio=2, vocab_size=16)
    c.lm.update(batch_sizes=(8,), num_microbatches=2, warmup=1, repeats=2)
    c.rows.update(num_microbatches=2, warmup=1, repeats=2)
    # The MLP rows only (the lm1b model's compilation would double the test's time; its
    # statistics are tested in tests/test_ghost.py).
    mlp = dict(batch_sizes=(4,), dims=(6, 5, 3))
    c.rows.models = ml_collections.ConfigDict({"nnx_mlp": mlp, "plain_mlp": dict(mlp)})
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The ``arg`` variant (``default`` when empty)."""
    return configs.select("configs/bench.py", {"default": default, "tiny": tiny}, arg, "default")
