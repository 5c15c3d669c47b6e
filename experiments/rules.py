"""The rows of the config fields: each field's valid values, and the rules between fields.

Here the fields every training config has, the measurement and comparison fields and the
bench's; a task's own fields are rows of its :class:`experiments.tasks.Task`, and
:func:`task_table` puts them together. :func:`check` applies a table before an entry point
loads or writes anything (a bad value: one line and a ``hint:``). A config field without a row
fails ``tests/test_config.py``; what a field means is its comment in ``configs/*.py``, which
``--help`` prints (:func:`describe`).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import math
import textwrap
import tokenize
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from experiments.cli import UserError, config_fields

GNS_METHODS = ("auto", "per_example", "microbatch", "across_devices")
OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")
SCHEDULES = ("constant", "cosine")
POLICIES = ("recommended", "default", "adaptive", "best_measured", "largest_fits")
MODES = ("train", "compare", "tradeoff", "adaptive")
MODEL_NAMES = tuple(
    "small_cnn mlp resnet resnet18 efficientnet efficientnet_b0 transformer".split()
)
# gns.scaling.RULES, named here so that checking a config imports no JAX (a test pins them).
LR_RULES = ("sgd", "linear", "sqrt", "seesaw", "constant")
INT_MAX = 2**31 - 1  # indices and step counters are int32 on the devices
_MISSING = object()


class Kind(NamedTuple):
    """The valid values of a field: ``valid(value) -> bool`` and ``what`` says them."""

    valid: Callable[[Any], bool]
    what: str

    @property
    def or_none(self) -> Kind:
        """This kind or ``None`` (what ``None`` means: the field's comment)."""
        return Kind(lambda v: v is None or self.valid(v), f"{self.what}, or None")


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v)


def count(lo: int, hi: int = INT_MAX) -> Kind:
    """An int in ``[lo, hi]``."""
    what = f"an int >= {lo}" if hi >= INT_MAX else f"an int in [{lo}, {hi}]"
    return Kind(lambda v: _is_int(v) and lo <= v <= hi, what)


def real(lo, hi=math.inf, *, open_lo=False, open_hi=False) -> Kind:
    """A finite number in the interval (``open_*``: the bound itself excluded)."""

    def ok(v):
        return _is_real(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)

    what = f"a finite number {'>' if open_lo else '>='} {lo}"
    if hi < math.inf:
        what = f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
    return Kind(ok, what)


def choice(*options: str) -> Kind:
    return Kind(lambda v: v in options, f"one of {', '.join(options)}")


FLAG = Kind(lambda v: isinstance(v, bool | np.bool_), "True or False")
TEXT = Kind(lambda v: isinstance(v, str) and v.strip() != "", "a text")  # non-empty


def tuple_of(item: Kind, *, empty=False, increasing=False, distinct=False) -> Kind:
    """A tuple of ``item`` values (``empty``: may be ``()``; ``increasing``: strictly;
    ``distinct``: no repeats)."""

    def ok(v):
        if not isinstance(v, tuple | list) or not (v or empty) or not all(map(item.valid, v)):
            return False
        unique = len(set(v)) == len(v)
        return (not increasing or unique and list(v) == sorted(v)) and (unique or not distinct)

    what = f"a {'' if empty else 'non-empty '}tuple, each {item.what}"
    what += (", increasing" if increasing else "") + (", no repeats" if distinct else "")
    return Kind(ok, what)


# Training fields of every training config (configs/cifar10.py, configs/lm.py).
TRAIN = (
    ("mode", choice(*MODES)),
    ("seed", count(0)),
    ("batch_size", count(2)),
    ("learning_rate", real(0, open_lo=True)),
    ("optimizer", choice(*OPTIMIZERS)),
    ("momentum", real(0, 1, open_hi=True)),
    ("nesterov", FLAG),
    ("weight_decay", real(0)),
    ("warmup_steps", count(0)),
    ("schedule", choice(*SCHEDULES)),
    ("num_steps", count(1)),
    ("num_epochs", real(0, open_lo=True).or_none),
    ("max_wall_time_s", real(0, open_lo=True).or_none),
    ("target_window", count(1)),
    ("divergence_factor", real(1, open_lo=True).or_none),
    ("eval_every", count(0)),
    ("eval_examples", count(1).or_none),
    ("eval_batch_size", count(1)),
    ("log_every", count(1)),
    ("checkpoint_every", count(0)),
    ("start_from", TEXT.or_none),
    ("progress_bar", FLAG),
    ("plots", FLAG),
    ("gns_every", count(0)),
    ("gns_method", choice(*GNS_METHODS)),
    ("gns_microbatches", count(1)),
    ("gns_chunk_size", count(1).or_none),
    ("gns_ema_decay", real(0, 1, open_hi=True)),
    ("dtype", choice("float32", "bfloat16")),
    ("num_devices", count(1).or_none),
    ("distributed", FLAG),
    ("step_time_repeats", count(0)),
)


# The Transformer's fields: the language-model task's model and bench's lm.model (whose
# vocabulary may be smaller).
TRANSFORMER = (
    ("model.name", choice("transformer")),
    ("model.context", count(1, hi=65536)),
    ("model.width", count(1)),
    ("model.depth", count(1)),
    ("model.num_heads", count(1)),
    ("model.mlp_ratio", count(1)),
    ("model.tie_embeddings", FLAG),
    ("model.scan_layers", FLAG),
)

# The measurement fields (configs/common.py measurement(): the sweep, compare and tradeoff).
MEASURE = (
    ("compilation_cache", FLAG),
    ("noise.confidence", real(0, 1, open_lo=True, open_hi=True)),
    ("throughput.min_batch_size", count(1)),
    ("throughput.max_batch_size", count(1)),
    ("throughput.memory_budget_bytes", count(1, hi=2**62).or_none),
    ("throughput.warmup", count(0)),
    ("throughput.repeats", count(1)),
    ("throughput.accumulation_factors", tuple_of(count(2), empty=True)),
    ("recommend.price_per_hour", real(0, open_lo=True).or_none),
    ("recommend.objective", choice("time", "cost")),
    ("recommend.candidates", tuple_of(count(1)).or_none),
    ("tradeoff.batch_sizes", tuple_of(count(2)).or_none),
    ("tradeoff.max_steps", count(1)),
    ("tradeoff.max_wall_time_s", real(0, open_lo=True).or_none),
    ("tradeoff.eval_every_examples", count(1)),
    ("tradeoff.num_bootstrap", count(40)),  # each tail of a 0.95 interval holds one
    ("noise.pilot_steps", count(2)),
    ("noise.every", count(1)),
    ("noise.num_stretches", count(1)),
    ("critical.num_checkpoints", count(0)),
    ("critical.exponents", tuple_of(count(-64), increasing=True)),
    ("critical.fork_steps", count(1)),
    ("critical.num_repeats", count(1)),
    ("critical.eval_examples", count(1)),
    ("critical.confidence", real(0, 1, open_lo=True, open_hi=True)),
    ("critical.seed_offset", count(0)),
    ("tradeoff.target", real(0, open_lo=True)),  # and as the task's target field: task_table
    ("tradeoff.min_batch_size", count(1)),
    ("tradeoff.max_runs", count(0)),
    ("tradeoff.extra_seeds", count(0)),
    ("tradeoff.reseed_best", count(1)),
)

# config.compare: the policy comparison of experiments.compare.
COMPARE = (
    ("compare.policies", tuple_of(choice(*POLICIES), distinct=True)),
    ("compare.seeds", tuple_of(count(0), distinct=True)),
    ("compare.baseline_batch_size", count(2).or_none),
    ("compare.baseline_learning_rate", real(0, open_lo=True).or_none),
    ("compare.target_accuracy", real(0, 1, open_lo=True)),
    ("compare.target_window", count(1)),
    ("compare.eval_every_examples", count(1)),
    ("compare.eval_examples", count(1).or_none),
    ("compare.give_up_factor", real(1).or_none),
    ("compare.max_wall_time_s", real(0, open_lo=True)),
    ("compare.max_epochs", real(0, open_lo=True)),
    ("compare.schedule", choice(*SCHEDULES).or_none),
    ("compare.warmup_steps", count(0).or_none),
    ("compare.tradeoff_summary", TEXT.or_none),
    ("compare.setup", TEXT.or_none),
)

# The top-level fields that no training reads: experiments.cifar10's mode, the policy
# comparison and the measurement fields (a training's identity and fingerprint leave them out).
NOT_TRAINING = ("mode", "compare", *dict.fromkeys(f.split(".")[0] for f, _ in MEASURE))

# configs/bench.py. Its three measurements (the CNN at the top level, lm and rows) share the
# timing fields; its language model (lm.model) has the rows of TRANSFORMER.
BENCH_LMS = ("lm1b", "tied_transformer", "scanned_transformer")  # the rows that are Transformers
BENCH_ROWS = (*BENCH_LMS, "convnext", "nnx_mlp", "plain_mlp")  # rows.models
BENCH = (
    ("seed", count(0)),
    ("model.name", choice("small_cnn")),
    ("model.widths", tuple_of(count(1))),
    ("model.groups", count(1)),
    ("image_size", count(4, hi=4096)),
    ("channels", count(1, hi=64)),
    ("num_classes", count(2, hi=100_000)),
    ("batch_sizes", tuple_of(count(2))),
    ("reference_batch_size", count(2)),
    ("learning_rate", real(0, open_lo=True)),
    ("chunk_size", count(1).or_none),
    ("parallel", FLAG),
    ("parallel_batch_size_per_device", count(2)),
    ("parallel_repeats", count(3)),
    *(
        (p + f, k)
        for p in ("", "lm.", "rows.")
        for f, k in (("num_microbatches", count(2)), ("warmup", count(0)), ("repeats", count(1)))
    ),
    ("lm.enabled", FLAG),
    ("lm.batch_sizes", tuple_of(count(2))),
    ("rows.enabled", FLAG),
    *((f"rows.models.{m}.batch_sizes", tuple_of(count(2))) for m in BENCH_ROWS),
    ("rows.models.convnext.widths", tuple_of(count(1))),
    *((f"rows.models.{m}.dims", tuple_of(count(1))) for m in ("nnx_mlp", "plain_mlp")),
    *(
        (f"rows.models.{m}.{f}", count(1))
        for m in BENCH_LMS
        for f in ("context", "depth", "num_heads", "mlp_ratio", "vocab_size", "width")
    ),
    *(("lm." + f, k) for f, k in TRANSFORMER),
    ("lm.model.vocab_size", count(2, hi=65536)),
)


def cross(fields: tuple[str, ...], ok: Callable, what: str, hint: str | None = None) -> Callable:
    """The rule that ``ok(*values of fields, devices)`` holds; skipped when a field is missing.
    Its message names the fields and their values."""

    def rule(config, devices):
        values = [get(config, f, _MISSING) for f in fields]
        if any(v is _MISSING for v in values) or _safe(lambda v: ok(*v, devices), values):
            return None
        given = ", ".join(f"config.{f}={v!r}" for f, v in zip(fields, values, strict=True))
        return f"{given}: {what}", hint or "change " + " or ".join(f"--config.{f}" for f in fields)

    return rule


def multiples(values: str, k: str, what: str) -> Callable:
    """The rule that ``config.<k>`` divides ``config.<values>`` (an int, or each of a tuple)."""
    return cross((values, k), lambda v, m, d: not np.any(np.mod(v, m)), what)


def at_most(lo: str, hi: str) -> Callable:
    return cross((lo, hi), lambda a, b, d: a <= b, f"{lo} must be <= {hi}")


def microbatches_fit(k: int, batch_size: int, devices: int | None) -> bool:
    """Whether ``k >= 2`` equal microbatches split ``batch_size`` and (``devices`` known) are
    a multiple of the devices (the estimator's and ghost BatchNorm's groups)."""
    return k >= 2 and batch_size % k == 0 and (devices is None or k % devices == 0)


def batch_problem(batch_size: int, n: int, field: str) -> tuple[str, str] | None:
    """Why the global batch ``config.<field>`` does not split over ``n`` devices, with the
    hint, or ``None`` (:func:`experiments.mesh.check_batch`)."""
    if batch_size < n:
        why = (
            f"is smaller than the {n} devices of the mesh: every device needs at least one example"
        )
    elif batch_size % n:
        why = f"is not divisible by the {n} devices of the mesh (the global batch is split evenly)"
    else:
        return None
    near = sorted({max(n, batch_size // n * n), (batch_size // n + 1) * n})
    return f"config.{field}={batch_size} {why}", (
        f"use a multiple of {n} (e.g. --config.{field}={' or '.join(map(str, near))}), or "
        "fewer devices with --config.num_devices"
    )


def _on_devices(field: str) -> Callable:
    """``field``, a global batch, splits evenly over the mesh's devices (when known)."""

    def rule(config, devices):
        value = get(config, field)
        return batch_problem(int(value), devices, field) if devices and _is_int(value) else None

    return rule


def each_on_devices(field: str) -> Callable:
    """Every batch of the tuple ``field`` splits evenly over the mesh's devices (when known)."""

    def rule(config, devices):
        values = get(config, field) or ()
        bad = [b for b in values if devices and _is_int(b) and batch_problem(b, devices, field)]
        if not bad:
            return None
        return (
            f"config.{field}={tuple(values)}: {bad} do not split evenly over the {devices} "
            "devices of the mesh",
            f"use multiples of {devices} in --config.{field}, or fewer devices with "
            "--config.num_devices",
        )

    return rule


HEADS = "model.num_heads must divide model.width (each head gets width / num_heads)"

TRAIN_CROSS = (
    _on_devices("batch_size"),
    cross(
        ("gns_method", "gns_microbatches", "batch_size"),
        lambda method, k, batch, d: method != "microbatch" or microbatches_fit(k, batch, d),
        "gns_method='microbatch' needs gns_microbatches >= 2 that divides batch_size "
        "(equal microbatches) and is a multiple of the devices",
    ),
)

# small_cnn's GroupNorm (the image task's other models take no groups).
GROUPS = cross(
    ("model.name", "model.widths", "model.groups"),
    lambda name, widths, groups, d: name != "small_cnn" or not np.any(np.mod(widths, groups)),
    "model.groups must divide every one of model.widths (small_cnn's GroupNorm)",
)


MEASURE_CROSS = (
    at_most("throughput.min_batch_size", "throughput.max_batch_size"),
    each_on_devices("recommend.candidates"),
    cross(
        ("noise.pilot_steps", "noise.every"),
        lambda steps, every, d: steps >= 2 * every,
        "the pilot measures every noise.every steps: the noise scale needs 2 measurements",
        "raise --config.noise.pilot_steps or lower --config.noise.every",
    ),
    cross(
        ("critical.exponents",),
        lambda exponents, d: len(exponents) >= 2,
        "the branched critical batch needs at least 2 fork sizes",
        "e.g. '(-1, 0, 1, 2)'",
    ),
)

BENCH_CROSS = (
    *(  # the batch sizes of the CNN, the lm and each row
        multiples(
            sizes + "batch_sizes",
            k + "num_microbatches",
            f"every batch size must split into {k}num_microbatches equal microbatches",
        )
        for sizes, k in (
            ("", ""),
            ("lm.", "lm."),
            *((f"rows.models.{m}.", "rows.") for m in BENCH_ROWS),
        )
    ),
    cross(
        ("reference_batch_size", "batch_sizes"),
        lambda ref, sizes, d: ref in sizes,
        "reference_batch_size must be one of batch_sizes",
    ),
    GROUPS,
    *(
        multiples(
            f"rows.models.{m}.width",
            f"rows.models.{m}.num_heads",
            f"rows.models.{m}.num_heads must divide its width",
        )
        for m in BENCH_LMS
    ),
    multiples("lm.model.width", "lm.model.num_heads", HEADS),
)

BENCH_TABLE = (BENCH, BENCH_CROSS)


def get(config, path: str, default=None):
    """``config.a.b`` of ``path='a.b'`` (``default`` when a part is missing)."""
    for part in path.split("."):
        if not hasattr(config, "keys") or part not in config.keys():
            return default
        config = config[part]
    return config


def task_table(task) -> tuple[tuple, tuple]:
    """``(rows, rules between fields)`` of a training config of ``task``
    (:class:`experiments.tasks.Task`): the training fields, the task's own (``task.fields``,
    ``task.cross``) and the measurement and comparison fields (a config without them skips
    their rows). A row is ``(field, Kind)``; a rule, ``(config, devices) -> (message, hint)``
    or ``None`` (:func:`cross`)."""
    target = cross(
        (task.target_field, "eval_every"),
        lambda target, every, d: target is None or every > 0,
        f"{task.target_field} is checked at the periodic evaluations: it needs eval_every > 0",
    )
    kind = dict(task.fields).get(task.target_field, real(0, open_lo=True))
    trainings = cross(
        ("tradeoff.target",),
        lambda value, d: value is not None and kind.valid(value),
        f"the trainings run to it as {task.target_field}: {kind.what.removesuffix(', or None')}",
    )
    rows = TRAIN + task.fields + MEASURE + COMPARE
    cross_rules = (*TRAIN_CROSS, target, trainings, *task.cross, *MEASURE_CROSS)
    return rows, (_has(task), *cross_rules, _on_devices("compare.baseline_batch_size"))


def _has(task) -> Callable:
    """The rule that the config has every field of ``task.fields`` (the task reads them)."""

    def rule(config, devices):
        missing = [f"config.{f}" for f, _ in task.fields if get(config, f, _MISSING) is _MISSING]
        if not missing:
            return None
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return (
            f"the {task.name!r} task reads {missing[0]}{more}, which this config does not have",
            f"start from the task's config file (configs/*.py with task = {task.name!r})",
        )

    return rule


def check(config, table: tuple[tuple, tuple], devices: int | None = None) -> None:
    """Check the fields of ``config`` that ``table`` (:func:`task_table`, or
    :data:`BENCH_TABLE`) names, the rules between them (those about the mesh only with
    ``devices``, its size), then that it names every field: the first violation raises a
    one-line UserError naming the field(s) and value(s), what is valid, and a hint."""
    rows, rules_between = table
    for name, kind_ in rows:
        value = get(config, name, _MISSING)
        if value is not _MISSING and not _safe(kind_.valid, value):
            verb = "is not" if kind_.what.startswith("one of") else "must be"
            hint = f"set --config.{name}=... (--help lists every field and its values)"
            if isinstance(value, tuple) and any("," in str(v) for v in value):  # one text
                items = ",".join(repr(v.strip()) for v in ",".join(map(str, value)).split(","))
                hint = f'write a tuple of texts as --config.{name}="({items})"'
            raise UserError(f"config.{name}={value!r} {verb} {kind_.what}", hint=hint)
    for rule in rules_between:
        if problem := rule(config, devices):
            raise UserError(*problem)
    known = {name for name, _ in rows}
    if unknown := [name for name, _ in config_fields(config) if name not in known]:
        if len(unknown) >= 5:  # not a stray field: a whole config of another command
            raise UserError(
                f"config.{unknown[0]} and {len(unknown) - 1} more fields are read by no part "
                "of this command: the config file is another command's",
                hint="pass this command's config (--help names its default config file)",
            )
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(
            f"config.{unknown[0]}{more} is not a field of this config: nothing reads it (a "
            "typo, or a field set by a config file written for another version)",
            hint="remove it from the config file (--help lists every field and its values)",
        )


def _safe(fn, value) -> bool:
    try:
        return bool(fn(value))
    except Exception:  # a wrong type of another field: that field's own rule names it
        return False


def describer(table_of: Callable[[Any], tuple]) -> Callable[[Any, str], list[str]]:
    """``(config, path) -> describe(config, table_of(config), path)``, for
    :func:`experiments.cli.run`."""
    return lambda config, path: describe(config, table_of(config), path)


def describe(config, table: tuple[tuple, tuple], path: str) -> list[str]:
    """The ``--help`` lines of ``config`` (read from the config file ``path``): for each field,
    in order, ``--config.name=value``, then its comment and its valid values (``table``)."""
    kinds = {name: k.what for name, k in table[0]}
    fields = dict(config_fields(config))
    comments = field_comments(path, list(fields))
    lines = []
    for name, value in fields.items():
        text = f"{comments[name] or '(no comment)'}; {kinds.get(name, '(no rule)')}."
        lines.append(f"  --config.{name}={value!r}")
        lines += textwrap.wrap(text, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines


def field_comments(path: str, names: list[str]) -> dict[str, str | None]:
    """``{name: comment or None}`` of the fields ``names`` of the config file ``path``: the
    comment of the first assignment ``c.name = ...`` that has one, in ``path``, else in the
    configs modules it imports, there also under the name's tail (bench's ``lm.model.width``
    is ``model.width`` of configs/lm.py)."""
    own, imports = _assignment_comments(path)
    borrowed: dict[str, str] = {}
    while imports:
        spec = importlib.util.find_spec(imports.pop(0))
        if spec is not None and spec.origin:
            found, more = _assignment_comments(spec.origin)
            borrowed = found | borrowed  # the first found wins
            imports += more
    out = {}
    for name in names:
        parts = name.split(".")
        tails = [borrowed.get(".".join(parts[i:])) for i in range(len(parts))]
        out[name] = next((c for c in (own.get(name), *tails) if c), None)
    return out


def _assignment_comments(path: str) -> tuple[dict[str, str], list[str]]:
    """``({dotted target: comment}, the configs modules it imports)`` of one file; a comment is
    the one on the assignment's line(s) plus the comment-only lines right below."""
    with open(path) as f:
        source = f.read()
    comments = {
        t.start[0]: (t.string.lstrip("# "), t.line.lstrip().startswith("#"))
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    }
    tree = ast.parse(source)
    out: dict[str, str] = {}
    for node in sorted(
        (n for n in ast.walk(tree) if isinstance(n, ast.Assign)), key=lambda n: n.lineno
    ):
        lines = [i for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        while lines and comments.get(lines[-1] + 1, ("", False))[1]:  # a comment-only line
            lines.append(lines[-1] + 1)
        for target in node.targets:
            for t in getattr(target, "elts", [target]):  # c.a.b or (c.a.b, x)
                name = ast.unparse(t).partition(".")[2]  # a.b
                if name and lines:
                    out.setdefault(name, " ".join(comments[i][0] for i in lines))
    imports = [
        f"configs.{a.name}" if n.module == "configs" else n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "configs"
        for a in n.names
    ]
    return out, imports
