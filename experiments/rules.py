"""The one table of config fields: for every field of every config (``configs/*.py``) its valid
values and what it means, and the rules between fields. :func:`check` applies it before an
entry point loads or writes anything (a bad value: one line and a ``hint:``); ``--help`` lists
the fields from it (:func:`describe`).

A config's table (:func:`rules_of`) is a list of sections ``(prefix, rules, cross)``: ``rules``
are ``(field, kind, doc)`` (``kind``: a :class:`Kind`); ``cross`` are functions ``(node,
devices, prefix) -> (message, hint)`` or ``None`` (:func:`cross`), checked after every field is
valid (``devices``: the mesh's size, ``None`` skips the rules that need it). A field a config
lacks is skipped; a config field without a row fails ``tests/test_config.py``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from experiments.cli import UserError, config_fields

__all__ = [
    "Kind", "TASK_TABLES", "ENTRY_POINTS", "NOT_TRAINING", "check", "rules_of", "describe",
    "describer", "get",
]  # fmt: skip

GNS_METHODS = ("auto", "per_example", "microbatch", "across_devices")
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")
SCHEDULES = ("constant", "cosine")
POLICIES = ("recommended", "default", "adaptive", "best_measured", "largest_fits")
MODES = ("train", "compare", "tradeoff", "adaptive")
DATA_SOURCES = ("folder", "cifar10_binary", "tfds", "synthetic")
MODEL_NAMES = (
    "small_cnn", "mlp", "resnet", "resnet18", "efficientnet", "efficientnet_b0", "transformer",
)  # fmt: skip
# gns.scaling.RULES, named here so that checking a config imports no JAX (a test pins them).
LR_RULES = ("sgd", "linear", "sqrt", "seesaw", "constant")
INT_MAX = 2**31 - 1  # indices and step counters are int32 on the devices


class Kind(NamedTuple):
    """The valid values of a field: ``valid(value) -> bool`` and ``what`` says them."""

    valid: Callable[[Any], bool]
    what: str


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v)


def _or_none(kind: Kind, none: str | None) -> Kind:
    if none is None:
        return kind
    return Kind(lambda v: v is None or kind.valid(v), f"{kind.what}, or None ({none})")


def count(lo: int = 0, none: str | None = None, hi: int = INT_MAX) -> Kind:
    """An int in ``[lo, hi]`` (``none``: what ``None`` means, when it is valid)."""
    what = f"an int >= {lo}" if hi >= INT_MAX else f"an int in [{lo}, {hi}]"
    return _or_none(Kind(lambda v: _is_int(v) and lo <= v <= hi, what), none)


def real(lo=None, hi=None, *, open_lo=False, open_hi=False, none: str | None = None) -> Kind:
    """A finite number in the interval (``open_*``: the bound itself excluded)."""

    def ok(v):
        if not _is_real(v):
            return False
        return (lo is None or (v > lo if open_lo else v >= lo)) and (
            hi is None or (v < hi if open_hi else v <= hi)
        )

    if lo is not None and hi is not None:
        what = f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
    elif lo is not None:
        what = f"a finite number {'>' if open_lo else '>='} {lo}"
    else:
        what = "a finite number"
    return _or_none(Kind(ok, what), none)


def choice(*options: str, none: str | None = None) -> Kind:
    return _or_none(Kind(lambda v: v in options, f"one of {', '.join(options)}"), none)


def text(none: str | None = None) -> Kind:
    """A non-empty string."""
    return _or_none(Kind(lambda v: isinstance(v, str) and v.strip() != "", "a text"), none)


FLAG = Kind(lambda v: isinstance(v, bool | np.bool_), "True or False")


def ints(lo: int, *, increasing=False, empty=False, none: str | None = None) -> Kind:
    """A tuple of ints >= ``lo`` (``increasing``: strictly; ``empty``: may be ``()``)."""

    def ok(v):
        if not isinstance(v, tuple | list) or (not v and not empty):
            return False
        if not all(_is_int(x) and lo <= x <= INT_MAX for x in v):
            return False
        return not increasing or all(a < b for a, b in zip(v, v[1:], strict=False))

    what = f"a {'' if empty else 'non-empty '}tuple of ints >= {lo}"
    return _or_none(Kind(ok, what + (", increasing" if increasing else "")), none)


def reals(lo: float, none: str | None = None) -> Kind:
    """A non-empty tuple of finite numbers > ``lo``."""

    def ok(v):
        return isinstance(v, tuple | list) and v and all(_is_real(x) and x > lo for x in v)

    return _or_none(Kind(ok, f"a non-empty tuple of numbers > {lo}"), none)


def names(options, *, distinct=True, none: str | None = None) -> Kind:
    """A non-empty tuple of names from ``options`` (``None``: any non-empty strings)."""

    def ok(v):
        if not isinstance(v, tuple | list) or not v or not all(isinstance(x, str) for x in v):
            return False
        if options is not None and any(x not in options for x in v):
            return False
        return not distinct or len(set(v)) == len(v)

    what = "a non-empty tuple of " + ("texts" if options is None else f"{', '.join(options)}")
    return _or_none(Kind(ok, what + (", no repeats" if distinct else "")), none)


# ---------------------------------------------------------------------------------------------
# The fields.

# Training fields of every training config (configs/cifar10.py, configs/lm.py).
TRAIN = (
    ("mode", choice(*MODES), "what runs: 'train', 'compare' (every batch-size policy to one "
     "smoothed target; 'adaptive' is another name for it) or 'tradeoff' (time to a target at "
     "several batch sizes); experiments.lm has 'train' only"),
    ("seed", count(0), "initialization, data order, augmentation, dropout"),
    ("batch_size", count(2), "examples per step, global over the devices (>= 2: the noise "
     "scale compares examples)"),
    ("learning_rate", real(0, open_lo=True), "peak learning rate (after warmup)"),
    ("optimizer", choice(*OPTIMIZERS), "'sgd' (with momentum, nesterov), 'adam', 'adamw', "
     "'lamb'"),
    ("momentum", real(0, 1, open_hi=True), "sgd only; 0: plain SGD"),
    ("nesterov", FLAG, "sgd only: Nesterov momentum"),
    ("weight_decay", real(0), "on kernels only: L2 for sgd/adam, decoupled for adamw/lamb"),
    ("warmup_steps", count(0), "linear warmup from 0 over this many steps"),
    ("schedule", choice(*SCHEDULES), "after warmup: constant, or cosine decay to 0 at the end"),
    ("num_steps", count(1), "length of the run in steps (unless num_epochs is set)"),
    ("num_epochs", real(0, open_lo=True, none="num_steps"), "length of the run in epochs "
     "(wins over num_steps when set)"),
    ("max_wall_time_s", real(0, open_lo=True, none="no budget"), "training-time budget in "
     "seconds"),
    ("target_window", count(1), "the target is on the mean of the last N periodic "
     "evaluations (1: each evaluation itself)"),
    ("divergence_factor", real(1, open_lo=True, none="stop on a non-finite loss only"),
     "stop when the training loss exceeds this multiple of the initial loss"),
    ("eval_every", count(0), "steps between periodic evaluations (0: only the final one)"),
    ("eval_examples", count(1, none="all"), "examples of the periodic evaluations (a fixed "
     "random subset) and of the final train metric"),
    ("eval_batch_size", count(1), "examples per evaluation batch (memory only)"),
    ("log_every", count(1), "steps between metrics rows (measured and evaluated steps always "
     "get one)"),
    ("checkpoint_every", count(0), "steps between checkpoints (0: only at the end)"),
    ("start_from", text(none="a fresh start"), "a pilot's checkpoint directory (the sweep's "
     "WORKDIR/pilot/<key>): the run goes on from its state, step, examples and seconds"),
    ("progress_bar", FLAG, "a progress bar when stderr is a terminal"),
    ("plots", FLAG, "write training.png and noise_scale.png"),
    ("gns_every", count(0), "measure the noise scale every N steps (0: never)"),
    ("gns_method", choice(*GNS_METHODS), "'auto' (across_devices on >= 2 devices; on one "
     "per_example without BatchNorm, else microbatch), 'per_example', 'microbatch' or "
     "'across_devices'"),
    ("gns_microbatches", count(1), "microbatches of the microbatch estimator (and ghost "
     "BatchNorm groups); a multiple of the device count that divides batch_size"),
    ("gns_chunk_size", count(1, none="one chunk"), "per_example: examples per chunk (memory)"),
    ("gns_ema_decay", real(0, 1, open_hi=True), "EMA decay of g_sq and trace_cov "
     "(bias-corrected)"),
    ("dtype", choice(*DTYPES), "computation dtype (parameters, optimizer state and "
     "noise-scale sums stay float32)"),
    ("num_devices", count(1, none="every device"), "devices of the data-parallel mesh; "
     "batch_size is split over them"),
    ("distributed", FLAG, "call jax.distributed.initialize() first (multi-host)"),
    ("step_time_repeats", count(0), "after training, time the step alone N times and report "
     "the device utilization (0: skip)"),
)  # fmt: skip

# The image task (configs/cifar10.py): target, adaptive schedule, model, data.
IMAGE = (
    ("target_accuracy", real(0, 1, none="no target"), "stop when the periodic test accuracy "
     "(mean of target_window evaluations) reaches it; needs eval_every > 0"),
    ("adaptive.enabled", FLAG, "train with the batch-size schedule that follows the smoothed "
     "noise scale (needs gns_every > 0)"),
    ("adaptive.candidates", ints(2, increasing=True, none="powers of two in [min_batch_size, "
     "max_batch_size]"), "the schedule's compiled batch sizes"),
    ("adaptive.min_batch_size", count(2), "smallest candidate (when candidates is None)"),
    ("adaptive.max_batch_size", count(2), "largest candidate (when candidates is None; also "
     "capped by what fits in the compare mode)"),
    ("adaptive.initial_batch_size", count(2, none="the smallest candidate"), "the batch size "
     "the schedule starts at"),
    ("adaptive.initial_noise_scale", real(0, open_lo=True, none="no measurement yet"), "the "
     "noise scale that sets the 'sgd' rule's starting rate (needed when the schedule starts "
     "away from batch_size)"),
    ("adaptive.step_times", reals(0, none="timed before training"), "seconds per step of "
     "each candidate, in order"),
    ("adaptive.lr_rule", choice(*LR_RULES), "how the learning rate follows the batch size"),
    ("adaptive.margin", real(0), "relative saving a change of batch size needs"),
    ("adaptive.patience", count(1), "consecutive measurements that must agree before a "
     "change"),
    ("adaptive.allow_shrink", FLAG, "the batch may also shrink (else a ramp only grows)"),
    ("adaptive.noise_scale_factor", real(0, open_lo=True), "multiplies the smoothed "
     "B_simple fed to the schedule"),
    ("adaptive.eval_every_examples", count(1, none="eval_every x batch_size"), "evaluation "
     "interval in examples"),
    ("adaptive.timing_warmup", count(0), "untimed calls per batch size before the timing"),
    ("adaptive.timing_rounds", count(1), "interleaved timing rounds (each times every "
     "candidate once)"),
    ("model.name", choice(*(m for m in MODEL_NAMES if m != "transformer")),
     "small_cnn, mlp, resnet18 (resnet) or efficientnet_b0 (efficientnet)"),
    ("model.widths", ints(1), "small_cnn: conv widths (stride 2 each); mlp: hidden widths"),
    ("model.groups", count(1), "small_cnn: GroupNorm groups (divides every width)"),
    ("model.stage_sizes", ints(1, none="ResNet-18's"), "resnet: blocks per stage"),
    ("model.num_filters", count(1, none="64"), "resnet: stem width"),
    ("model.width_coefficient", real(0, open_lo=True, none="1.0"), "efficientnet: width "
     "multiplier"),
    ("model.depth_coefficient", real(0, open_lo=True, none="1.0"), "efficientnet: depth "
     "multiplier"),
    ("model.dropout_rate", real(0, 1, open_hi=True, none="the model's"), "efficientnet: "
     "dropout before the head"),
    ("model.drop_connect_rate", real(0, 1, open_hi=True, none="the model's"), "efficientnet: "
     "stochastic depth"),
    ("model.stem_strides", count(1, none="the model's"), "efficientnet: stem stride (1 for "
     "32x32 inputs)"),
    ("data.source", choice(*DATA_SOURCES), "'folder' (data.path: a folder or .tar.gz laid out "
     "split/class/image.jpg), 'cifar10_binary' (data.path, or downloaded once from data.url, "
     "MD5-checked), 'tfds' (a prepared tensorflow-datasets dataset) or 'synthetic'; the "
     "default is the shared JPEG archive when present, else cifar10_binary"),
    ("data.name", text(), "tfds dataset name"),
    ("data.path", text(none="download (cifar10_binary)"), "folder, archive or "
     "cifar-10-binary.tar.gz"),
    ("data.cache_dir", text(none="~/.cache/gns"), "where decoded arrays are cached"),
    ("data.tfds_data_dir", text(none="the tfds default"), "tfds data_dir"),
    ("data.url", text(), "cifar10_binary: where to download it from"),
    ("data.md5", text(none="unchecked"), "cifar10_binary: the download's published MD5"),
    ("data.num_train", count(1, none="all"), "class-stratified train subset"),
    ("data.num_test", count(1, none="all"), "class-stratified test subset"),
    ("data.augment", FLAG, "random crop (reflect padding 4) and horizontal flip"),
    ("data.on_device", FLAG, "keep the decoded train arrays on the devices and gather batches "
     "there"),
    ("data.synthetic.image_size", count(4, hi=4096), "synthetic: image side in pixels"),
    ("data.synthetic.num_classes", count(2, hi=100_000), "synthetic: classes"),
    ("data.synthetic.seed", count(0), "synthetic: the data's seed"),
)  # fmt: skip

# The language-model task (configs/lm.py).
TEXT = (
    ("task", choice("lm"), "what the data are: 'lm' (byte windows, bits per byte)"),
    ("target_bits_per_byte", real(0, open_lo=True, none="no target"), "stop when the "
     "periodic held-out bits per byte reach it or fall below; needs eval_every > 0"),
    ("final_eval_examples", count(1, none="all"), "held-out windows of the final "
     "evaluation"),
    ("model.name", choice("transformer"), "the byte-level Transformer"),
    ("model.vocab_size", count(256), "output classes: 256 (bytes) or more"),
    ("model.context", count(1, hi=65536), "tokens per example (window)"),
    ("model.width", count(1), "embedding size (a multiple of num_heads)"),
    ("model.depth", count(1), "Transformer blocks"),
    ("model.num_heads", count(1), "attention heads (divides width)"),
    ("model.mlp_ratio", count(1), "MLP hidden size / width"),
    ("model.tie_embeddings", FLAG, "the output layer is the token embedding transposed"),
    ("data.path", text(none="the Python standard library"), "a text file (split by bytes) or "
     "a directory (split by file)"),
    ("data.max_bytes", count(2, none="all"), "cap on the corpus in bytes"),
    ("data.test_fraction", real(0, 1, open_lo=True, open_hi=True), "held-out share of the "
     "files or bytes"),
    ("data.extensions", names(None, none="every file"), "in a directory, read only files with "
     "these suffixes, e.g. ('.py', '.txt')"),
)  # fmt: skip

# The synthetic teacher-student task (configs/teacher.py, experiments.tasks.teacher).
TEACHER = (
    ("task", choice("teacher"), "what the data are: 'teacher' (a random linear teacher's "
     "sampled labels)"),
    ("target_accuracy", real(0, 1, none="no target"), "stop when the periodic test accuracy "
     "reaches it; needs eval_every > 0"),
    ("model.name", choice("mlp"), "the student: dense layers"),
    ("model.widths", ints(1, empty=True), "hidden widths ((): a linear student)"),
    ("data.num_features", count(1, hi=65536), "input dimension d"),
    ("data.num_classes", count(2, hi=65536), "classes"),
    ("data.num_train", count(1, hi=10**7), "train examples"),
    ("data.num_test", count(1, hi=10**7), "test examples"),
    ("data.scale", real(0, open_lo=True), "standard deviation of each teacher logit (larger: "
     "less label noise)"),
    ("data.seed", count(0), "seed of the teacher and of the examples"),
)  # fmt: skip

# The measurement fields (configs/common.py measurement(): the sweep, the compare and tradeoff
# modes).
MEASURE = (
    ("compilation_cache", FLAG, "JAX's persistent compilation cache for the trainings"),
    ("noise.warmup_steps", count(0), "steps of training at batch_size before the "
     "noise scale is measured"),
    ("noise.batch_size", count(2), "examples per measured batch"),
    ("noise.num_batches", count(2), "independent batches pooled into one B_simple"),
    ("noise.method", choice(*GNS_METHODS), "the gns.estimate method (auto: per_example "
     "without BatchNorm, else microbatch)"),
    ("noise.chunk_size", count(1, none="one chunk"), "per_example chunk (memory)"),
    ("noise.confidence", real(0, 1, open_lo=True, open_hi=True), "level of the bootstrap "
     "interval"),
    ("throughput.min_batch_size", count(1), "smallest timed batch (powers of two up to "
     "max_batch_size)"),
    ("throughput.max_batch_size", count(1), "largest timed batch"),
    ("throughput.memory_budget_bytes", count(1, hi=2**62, none="the device's capacity, or "
     "half the free host RAM on CPU"), "memory per device a batch must fit in"),
    ("throughput.warmup", count(0), "untimed calls per batch before the timed rounds"),
    ("throughput.repeats", count(1), "interleaved timed rounds (median)"),
    ("throughput.accumulation_factors", ints(2, empty=True), "batches of factor x the "
     "largest that fits, timed as gradient accumulation"),
    ("recommend.price_per_hour", real(0, open_lo=True, none="device-seconds"), "device "
     "price, for the cost objective"),
    ("recommend.objective", choice("time", "cost"), "what the recommendation minimizes"),
    ("recommend.candidates", ints(1, none="the measured and accumulation batches"),
     "extra batch sizes to consider"),
    ("tradeoff.batch_sizes", ints(2, none="powers of two up to the largest that fits"),
     "batch sizes trained to the target"),
    ("tradeoff.max_steps", count(1), "step cap of each training"),
    ("tradeoff.max_wall_time_s", real(0, open_lo=True, none="no budget"), "time cap of "
     "each training"),
    ("tradeoff.eval_every_examples", count(1), "evaluation interval in training examples "
     "(the same resolution at every batch)"),
    ("tradeoff.num_bootstrap", count(1), "bootstrap refits of the tradeoff fit"),
    ("noise.pilot_steps", count(0, none="noise.warmup_steps"), "steps of the pilot "
     "training, measuring the noise scale every noise.every steps"),
    ("noise.every", count(1), "pilot steps between measurements"),
    ("noise.num_stretches", count(1), "equal stretches of the pilot's trajectory"),
    ("critical.num_checkpoints", count(0), "states of the pilot where the branched critical "
     "batch is measured (0: off)"),
    ("critical.exponents", ints(-64, increasing=True), "forks at batch_size x 2^j "
     "(at least 2, increasing)"),
    ("critical.fork_steps", count(1), "steps of the largest fork (in its examples for all)"),
    ("critical.num_repeats", count(1), "repeats on disjoint data"),
    ("critical.eval_examples", count(1), "held-out test images of each fork's loss"),
    ("critical.confidence", real(0, 1, open_lo=True, open_hi=True), "level of the intervals"),
    ("critical.seed_offset", count(0), "fork data stream seed: seed + this"),
    ("tradeoff.target_accuracy", real(0, 1, open_lo=True), "test accuracy each training "
     "runs to"),
    ("tradeoff.min_batch_size", count(1), "smallest trained batch when batch_sizes is None"),
    ("tradeoff.max_runs", count(0), "at most this many batch sizes when batch_sizes is None"),
    ("tradeoff.extra_seeds", count(0), "more seeds at the reseed_best fastest batches"),
    ("tradeoff.reseed_best", count(1), "how many of the fastest batches get extra seeds"),
)  # fmt: skip

# config.compare: the policy comparison of experiments.compare.
COMPARE = (
    ("policies", names(POLICIES), "the policies trained, in this order"),
    ("seeds", ints(0), "each policy once per seed"),
    ("baseline_batch_size", count(2, none="config.batch_size"), "the default policy's "
     "batch, the reference of every learning rate"),
    ("baseline_learning_rate", real(0, open_lo=True, none="config.learning_rate"), "the "
     "learning rate at baseline_batch_size"),
    ("target_accuracy", real(0, 1, open_lo=True), "the smoothed test accuracy every policy "
     "runs to"),
    ("target_window", count(1), "evaluations in the trailing mean of the target"),
    ("eval_every_examples", count(1), "evaluation interval in training examples"),
    ("eval_examples", count(1, none="config.eval_examples"), "test examples of each "
     "evaluation"),
    ("give_up_factor", real(1, none="no such cap"), "cap each run at this multiple of the "
     "fastest time to target before it"),
    ("max_wall_time_s", real(0, open_lo=True), "training-time budget of each run"),
    ("max_epochs", real(0, open_lo=True), "epoch cap of each run"),
    ("schedule", choice(*SCHEDULES, none="config.schedule"), "the runs' learning-rate "
     "schedule"),
    ("warmup_steps", count(0, none="config.warmup_steps"), "the runs' warmup"),
    ("tradeoff_summary", text(none="WORKDIR/tradeoff/summary.json"), "a tradeoff run's "
     "summary, for the best_measured policy"),
)  # fmt: skip

# The top-level fields that no training reads: experiments.cifar10's mode, the policy
# comparison and the measurement fields (a training's identity and fingerprint leave them out).
NOT_TRAINING = ("mode", "compare", *dict.fromkeys(f.split(".")[0] for f, _, _ in MEASURE))

# configs/bench.py.
BENCH = (
    ("seed", count(0), "initialization and synthetic data"),
    ("model.name", choice("small_cnn"), "the reference CNN"),
    ("model.widths", ints(1), "conv widths"),
    ("model.groups", count(1), "GroupNorm groups (divides every width)"),
    ("image_size", count(4, hi=4096), "synthetic image side in pixels"),
    ("channels", count(1, hi=64), "synthetic image channels"),
    ("num_classes", count(2, hi=100_000), "synthetic classes"),
    ("batch_sizes", ints(2), "batch sizes timed (multiples of num_microbatches)"),
    ("reference_batch_size", count(2), "the batch whose ratios are reported at the top level "
     "(one of batch_sizes)"),
    ("learning_rate", real(0, open_lo=True), "Adam's learning rate"),
    ("num_microbatches", count(2), "k of the microbatch estimator"),
    ("chunk_size", count(1, none="all at once"), "per_example chunk size"),
    ("warmup", count(0), "untimed calls of each step after compilation"),
    ("repeats", count(1), "interleaved timed rounds (median)"),
    ("parallel", FLAG, "also time across_devices on 4 simulated devices (a subprocess)"),
    ("parallel_batch_size_per_device", count(2), "its batch per device"),
    ("parallel_repeats", count(3), "its timed calls"),
    ("lm.enabled", FLAG, "also time the Transformer rows"),
    ("lm.batch_sizes", ints(2), "Transformer batch sizes (sequences; multiples of "
     "lm.num_microbatches)"),
    ("lm.num_microbatches", count(2), "k of the microbatch estimator"),
    ("lm.warmup", count(0), "untimed calls of each step"),
    ("lm.repeats", count(1), "interleaved timed rounds (median)"),
)  # fmt: skip
# config.rows of configs/bench.py: more models, each with its batch sizes (checked when present).
BENCH_ROWS = (
    ("rows.enabled", FLAG, "also time the rows of more models (experiments.bench_lm.measure_rows)"),
    ("rows.num_microbatches", count(2), "k of the microbatch estimator of the rows"),
    ("rows.warmup", count(0), "untimed calls of each step"),
    ("rows.repeats", count(1), "interleaved timed rounds (median)"),
    *((f"rows.models.{m}.batch_sizes", ints(2), f"{m}: batch sizes timed (multiples of "
       "rows.num_microbatches)") for m in ("lm1b", "nnx_mlp", "plain_mlp")),
    *((f"rows.models.{m}.dims", ints(1), f"{m}: layer widths") for m in ("nnx_mlp", "plain_mlp")),
    *((f"rows.models.lm1b.{f}", count(1), f"lm1b-style Transformer: {doc}") for f, doc in (
        ("context", "tokens per sequence"), ("depth", "blocks"), ("num_heads", "attention heads "
         "(divides width)"), ("mlp_ratio", "MLP hidden size / width"), ("vocab_size",
         "vocabulary"), ("width", "embedding size"))),
)  # fmt: skip
BENCH += BENCH_ROWS
BENCH_LM_MODEL = tuple(r for r in TEXT if r[0].startswith("model.") and r[0] != "model.vocab_size")
BENCH_LM_MODEL += (("model.vocab_size", count(2, hi=65536), "vocabulary (synthetic tokens)"),)


# ---------------------------------------------------------------------------------------------
# The rules between fields.


def cross(fields: tuple[str, ...], ok: Callable, what: str, hint: str | None = None) -> Callable:
    """The rule that ``ok(node, devices)`` holds, about ``fields`` (named in the message);
    skipped when one of them is missing."""

    def rule(node, devices, prefix):
        if not all(_present(node, f) for f in fields) or _safe(lambda n: ok(n, devices), node):
            return None
        given = ", ".join(f"config.{prefix}{f}={get(node, f)!r}" for f in fields)
        fix = " or ".join(f"--config.{prefix}{f}" for f in fields)
        return f"{given}: {what}", hint or f"change {fix}"

    return rule


def batch_problem(batch_size: int, devices: int, field: str) -> tuple[str, str] | None:
    """Why the global batch ``config.<field>`` does not split over ``devices``, with the
    hint, or ``None`` (:func:`experiments.mesh.check_batch`)."""
    n = devices
    hint = (
        f"use a multiple of {n} (e.g. --config.{field}={max(n, batch_size // n * n)} or "
        f"{(batch_size // n + 1) * n}), or fewer devices with --config.num_devices"
    )
    if batch_size < n:
        return (f"config.{field}={batch_size} is smaller than the {n} devices of the mesh: "
                "every device needs at least one example", hint)  # fmt: skip
    if batch_size % n:
        return (f"config.{field}={batch_size} is not divisible by the {n} devices of the mesh "
                "(the global batch is split evenly)", hint)  # fmt: skip
    return None


def _on_devices(field: str) -> Callable:
    """``field``, a global batch, splits evenly over the mesh's devices (when known)."""

    def rule(node, devices, prefix):
        value = get(node, field)
        if devices is None or not _is_int(value):
            return None
        return batch_problem(int(value), devices, prefix + field)

    return rule


def _divides(k, values) -> bool:
    return all(v % k == 0 for v in values)


def _target_needs_eval(target: str) -> Callable:
    return cross(
        (target, "eval_every"),
        lambda c, d: c[target] is None or c.eval_every > 0,
        f"{target} is checked at the periodic evaluations: it needs eval_every > 0",
    )


TRAIN_CROSS = (
    _on_devices("batch_size"),
    cross(("gns_method", "gns_microbatches", "batch_size"),
          lambda c, d: c.gns_method != "microbatch"
          or (c.gns_microbatches >= 2 and c.batch_size % c.gns_microbatches == 0),
          "gns_method='microbatch' needs gns_microbatches >= 2 that divides batch_size"),
)  # fmt: skip

IMAGE_CROSS = (
    _target_needs_eval("target_accuracy"),
    cross(("data.num_train", "batch_size"),
          lambda c, d: c.data.num_train is None or c.data.num_train >= c.batch_size,
          "a batch cannot be larger than the train subset"),
    cross(("model.widths", "model.groups"),
          lambda c, d: c.model.name != "small_cnn" or _divides(c.model.groups, c.model.widths),
          "model.groups must divide every one of model.widths (GroupNorm)"),
    cross(("data.source", "data.path"),
          lambda c, d: c.data.source != "folder" or c.data.path is not None,
          "data.source='folder' reads data.path",
          "set --config.data.path=path/to/folder_or.tar.gz (laid out split/class/image.jpg)"),
    cross(("adaptive.min_batch_size", "adaptive.max_batch_size"),
          lambda c, d: c.adaptive.min_batch_size <= c.adaptive.max_batch_size,
          "adaptive.min_batch_size must be <= adaptive.max_batch_size"),
    cross(("adaptive.enabled", "gns_every"),
          lambda c, d: not c.adaptive.enabled or c.gns_every > 0,
          "the batch-size schedule follows the measured noise scale: it needs gns_every > 0"),
)  # fmt: skip

LM_MODEL_CROSS = (
    cross(("model.width", "model.num_heads"),
          lambda c, d: c.model.width % c.model.num_heads == 0,
          "model.num_heads must divide model.width (each head gets width / num_heads)"),
)  # fmt: skip

TEXT_CROSS = (_target_needs_eval("target_bits_per_byte"),) + LM_MODEL_CROSS

TEACHER_CROSS = (
    _target_needs_eval("target_accuracy"),
    cross(("mode",), lambda c, d: c.mode == "train", "config.task='teacher' trains only: the "
          "compare and tradeoff modes take image data", "--config.mode=train"),
)  # fmt: skip

MEASURE_CROSS = (
    cross(("throughput.min_batch_size", "throughput.max_batch_size"),
          lambda c, d: c.throughput.min_batch_size <= c.throughput.max_batch_size,
          "throughput.min_batch_size must be <= throughput.max_batch_size"),
    _on_devices("noise.batch_size"),
    cross(("critical.exponents",), lambda c, d: len(c.critical.exponents) >= 2,
          "the branched critical batch needs at least 2 fork sizes", "e.g. '(-1, 0, 1, 2)'"),
)  # fmt: skip

BENCH_CROSS = (
    cross(("batch_sizes", "num_microbatches"),
          lambda c, d: _divides(c.num_microbatches, c.batch_sizes),
          "every batch size must split into num_microbatches equal microbatches"),
    cross(("reference_batch_size", "batch_sizes"),
          lambda c, d: c.reference_batch_size in c.batch_sizes,
          "reference_batch_size must be one of batch_sizes"),
    cross(("model.widths", "model.groups"),
          lambda c, d: _divides(c.model.groups, c.model.widths),
          "model.groups must divide every one of model.widths (GroupNorm)"),
    *(cross((f"rows.models.{m}.batch_sizes", "rows.num_microbatches"),
            lambda c, d, m=m: _divides(c.rows.num_microbatches, c.rows.models[m].batch_sizes),
            "every batch size must split into rows.num_microbatches equal microbatches")
      for m in ("lm1b", "nnx_mlp", "plain_mlp")),
    cross(("rows.models.lm1b.width", "rows.models.lm1b.num_heads"),
          lambda c, d: c.rows.models.lm1b.width % c.rows.models.lm1b.num_heads == 0,
          "rows.models.lm1b.num_heads must divide its width"),
    cross(("lm.batch_sizes", "lm.num_microbatches"),
          lambda c, d: _divides(c.lm.num_microbatches, c.lm.batch_sizes),
          "every lm batch size must split into lm.num_microbatches equal microbatches"),
)  # fmt: skip

# config.task -> (rules, cross) of its training fields (a config without ``task`` is the image
# task's), checked by the entry points and again by experiments.train.
TASK_TABLES = {
    "cifar10": (TRAIN + IMAGE, TRAIN_CROSS + IMAGE_CROSS),
    "lm": (TRAIN + TEXT, TRAIN_CROSS + TEXT_CROSS),
    "teacher": (TRAIN + TEACHER, TRAIN_CROSS + TEACHER_CROSS),
}
# The sections a training config may have beyond its task's: the measurement fields and the
# policy comparison (a config without them skips their rows).
MEASURE_SECTIONS = [("", MEASURE, MEASURE_CROSS), ("compare.", COMPARE, ())]
BENCH_SECTIONS = [("", BENCH, BENCH_CROSS), ("lm.", BENCH_LM_MODEL, LM_MODEL_CROSS)]
# The entry points (python -m experiments.X); all but bench read a training config.
ENTRY_POINTS = ("cifar10", "lm", "sweep", "bench")


# ---------------------------------------------------------------------------------------------
# The checker.


def get(config, path: str, default=None):
    """``config.a.b`` of ``path='a.b'`` (``default`` when a part is missing)."""
    for part in path.split(".") if path else ():
        if not hasattr(config, "keys") or part not in config.keys():
            return default
        config = config[part]
    return config


def rules_of(config, kind: str) -> list[tuple[str, tuple, tuple]]:
    """The sections ``(prefix, rules, cross)`` of ``config`` as the entry point (or task)
    ``kind`` reads it."""
    if kind not in ENTRY_POINTS and kind not in TASK_TABLES:
        raise ValueError(f"unknown config kind {kind!r}: one of {', '.join(ENTRY_POINTS)}")
    if kind == "bench":
        return BENCH_SECTIONS
    task = get(config, "task")
    return [("", *TASK_TABLES.get(task, TASK_TABLES["cifar10"]))] + MEASURE_SECTIONS


def _present(node, path: str) -> bool:
    return get(node, path, _MISSING) is not _MISSING


_MISSING = object()


def check(config, kind: str, devices: int | None = None) -> None:
    """Check every field of ``config`` that ``kind``'s table names, then the rules between
    them (those about the mesh only with ``devices``, its size); fields it lacks are skipped.

    Raises:
      UserError: the first violation, naming the field(s), the value(s), what is valid and a hint.
    """
    sections = rules_of(config, kind)
    for prefix, rules, _ in sections:
        node = get(config, prefix.rstrip("."))
        for field, kind_, _doc in rules:
            if node is None or not _present(node, field):
                continue
            value = get(node, field)
            if not _safe(kind_.valid, value):
                name = prefix + field
                verb = "is not" if kind_.what.startswith("one of") else "must be"
                raise UserError(
                    f"config.{name}={value!r} {verb} {kind_.what}",
                    hint=f"set --config.{name}=... (--help lists every field and its values)",
                )
    for prefix, _, rules_between in sections:
        node = get(config, prefix.rstrip("."))
        for rule in rules_between if node is not None else ():
            problem = rule(node, devices, prefix)
            if problem:
                raise UserError(*problem)


def _safe(fn, value) -> bool:
    try:
        return bool(fn(value))
    except Exception:  # a wrong type of another field: that field's own rule names it
        return False


def describer(kind: str) -> Callable[[Any], list[str]]:
    """``config -> describe(config, kind)``: the ``--help`` of an entry point
    (:func:`experiments.cli.run`)."""
    return lambda config: describe(config, kind)


def describe(config, kind: str) -> list[str]:
    """The ``--help`` lines of ``config``'s fields: ``name = value`` then what it means and
    its valid values, in the config's order; a field without a rule says so."""
    docs = {}
    for prefix, rules, _ in rules_of(config, kind):
        docs.update({prefix + f: (doc, k.what) for f, k, doc in rules})
    lines = []
    for name, value in config_fields(config):
        doc, what = docs.get(name, ("(no rule)", "any value"))
        lines.append(f"  --config.{name}={value!r}")
        lines += textwrap.wrap(
            f"{doc}; {what}.", 96, initial_indent=" " * 6, subsequent_indent=" " * 6
        )
    return lines
