"""Cost of the noise-scale estimators over a plain train step (``make bench``).

``get_config(arg)``: ``arg`` picks a variant (``default`` or ``tiny``). Every field is
overridable on the command line, e.g. ``--config.repeats=50``; the valid values of each are
in the table of :mod:`experiments.rules` (``python -m experiments.bench --help`` prints them
with the comments below).
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
    c.seed = 0  # initialization and synthetic data
    c.model = ml_collections.ConfigDict()  # experiments.models.get_model: the small_cnn of
    # configs/cifar10.py:cpu
    c.model.name = "small_cnn"  # the reference CNN
    c.model.widths = (32, 64, 128)  # conv widths
    c.model.groups = 8  # GroupNorm groups (divides every width)
    c.image_size = 32  # synthetic image side in pixels
    c.channels = 3  # synthetic image channels
    c.num_classes = 10  # synthetic classes
    c.batch_sizes = (128, 512)  # batch sizes timed (multiples of num_microbatches)
    c.reference_batch_size = 128  # the batch whose ratios are reported at the top level (one
    # of batch_sizes)
    c.learning_rate = 2e-3  # Adam's learning rate
    c.num_microbatches = 8  # k of the microbatch estimator
    c.chunk_size = config_dict.placeholder(int)  # per_example chunk size (None: all at once)
    c.warmup = 2  # untimed calls of each step after compilation
    c.repeats = 11  # timed rounds, each timing every variant once in turn (median of the
    # paired ratios)
    c.parallel = True  # also time across_devices on 4 simulated devices
    # (experiments.bench.across_devices, a subprocess: across_devices_over_plain)
    c.parallel_batch_size_per_device = 32  # its batch per device
    c.parallel_repeats = 11  # its timed calls

    # The Transformer rows (experiments.bench.measure_rows): the model of configs/lm.py:cpu
    # (its fields are documented there), AdamW.
    c.lm = ml_collections.ConfigDict()
    c.lm.enabled = True  # also time the Transformer rows
    c.lm.model = lm.cpu().model
    c.lm.batch_sizes = (32, 128)  # Transformer batch sizes (sequences of context bytes;
    # multiples of lm.num_microbatches)
    c.lm.num_microbatches = 8  # k of the microbatch estimator
    c.lm.warmup = 2  # untimed calls of each step
    c.lm.repeats = 11  # interleaved timed rounds (median of the paired ratios)

    # More models, written as a new user would (experiments.bench.measure_rows).
    c.rows = ml_collections.ConfigDict()
    c.rows.enabled = True  # also time the rows of more models
    c.rows.num_microbatches = 8  # k of the microbatch estimator of the rows
    c.rows.warmup = 2  # untimed calls of each step
    c.rows.repeats = 21  # interleaved timed rounds (median of the paired ratios; the MLP
    # steps take about 5 ms, where one busy moment moves a ratio)
    c.rows.models = ml_collections.ConfigDict()
    c.rows.models.lm1b = ml_collections.ConfigDict()  # a Transformer in the style of the Flax
    # lm1b example (a bare self.param position embedding, nn.MultiHeadDotProductAttention),
    # the size of the lm model
    c.rows.models.lm1b.batch_sizes = (32,)  # lm1b: batch sizes timed (multiples of
    # rows.num_microbatches)
    c.rows.models.lm1b.vocab_size = 256  # lm1b: vocabulary
    c.rows.models.lm1b.context = 64  # lm1b: tokens per sequence
    c.rows.models.lm1b.width = 128  # lm1b: embedding size
    c.rows.models.lm1b.depth = 2  # lm1b: blocks
    c.rows.models.lm1b.num_heads = 4  # lm1b: attention heads (divides width)
    c.rows.models.lm1b.mlp_ratio = 4  # lm1b: MLP hidden size / width

    # The lm Transformer with its output layer the token embedding transposed (one leaf read
    # by a gather and a dot_general), the size of the lm model
    c.rows.models.tied_transformer = ml_collections.ConfigDict()
    c.rows.models.tied_transformer.batch_sizes = (32,)  # tied_transformer: batch sizes timed
    c.rows.models.tied_transformer.vocab_size = 256  # tied_transformer: vocabulary
    c.rows.models.tied_transformer.context = 64  # tied_transformer: tokens per sequence
    c.rows.models.tied_transformer.width = 128  # tied_transformer: embedding size
    c.rows.models.tied_transformer.depth = 2  # tied_transformer: blocks
    c.rows.models.tied_transformer.num_heads = 4  # tied_transformer: heads (divides width)
    c.rows.models.tied_transformer.mlp_ratio = 4  # tied_transformer: MLP hidden size / width

    # The lm Transformer, 4 blocks as one nn.scan over layers (their parameters stacked)
    c.rows.models.scanned_transformer = ml_collections.ConfigDict()
    c.rows.models.scanned_transformer.batch_sizes = (32,)  # scanned_transformer: batch sizes
    c.rows.models.scanned_transformer.vocab_size = 256  # scanned_transformer: vocabulary
    c.rows.models.scanned_transformer.context = 64  # scanned_transformer: tokens per sequence
    c.rows.models.scanned_transformer.width = 128  # scanned_transformer: embedding size
    c.rows.models.scanned_transformer.depth = 4  # scanned_transformer: blocks (scan length)
    c.rows.models.scanned_transformer.num_heads = 4  # scanned_transformer: heads (divides width)
    c.rows.models.scanned_transformer.mlp_ratio = 4  # scanned_transformer: MLP size / width
    c.rows.models.convnext = ml_collections.ConfigDict()  # a ConvNeXt-style net: depthwise
    # 7x7 convolutions, LayerNorm, no BatchNorm (experiments.bench.ConvNeXtStyle)
    c.rows.models.convnext.batch_sizes = (128,)  # convnext: batch sizes timed
    c.rows.models.convnext.widths = (32, 64)  # convnext: the stages' widths
    c.rows.models.nnx_mlp = ml_collections.ConfigDict()  # an NNX MLP
    c.rows.models.nnx_mlp.batch_sizes = (128,)  # nnx_mlp: batch sizes timed (multiples of
    # rows.num_microbatches)
    c.rows.models.nnx_mlp.dims = (3072, 512, 512, 10)  # nnx_mlp: layer widths
    c.rows.models.plain_mlp = ml_collections.ConfigDict()  # a dict of weights, jnp.dot + bias
    c.rows.models.plain_mlp.batch_sizes = (128,)  # plain_mlp: batch sizes timed (multiples of
    # rows.num_microbatches)
    c.rows.models.plain_mlp.dims = (3072, 512, 512, 10)  # plain_mlp: layer widths
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
