"""Tests of the config table (experiments/rules.py) and the config side of the command line
(experiments/cli.py): every field of every config variant has a rule and a description; every
wrong value is one line with a hint before anything runs; --help, --print_config and --config
from the repository; the default data source.

The bulk calls the checker in-process (no JAX); the command-line path runs the real commands,
each in its own process (one batch: ``tests/conftest.py``, ``run_commands``)."""

import json
import math
import os

import ml_collections
import pytest

from configs import bench as bench_config
from configs import cifar10 as cifar10_config
from configs import common
from configs import lm as lm_config
from configs import sweep as sweep_config
from configs import teacher as teacher_config
from experiments import cli, models, rules, tasks, train
from experiments.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"cifar10": cifar10_config, "lm": lm_config, "sweep": sweep_config, "bench": bench_config}
VARIANTS = [(kind, v) for kind, module in KINDS.items() for v in module.VARIANTS]
HUGE = 2**40


def table(config, kind: str) -> tuple:
    """The rule table of ``config`` as the entry point ``kind`` reads it."""
    return rules.BENCH_TABLE if kind == "bench" else tasks.table(config)


def documented(config, kind: str) -> dict:
    """``{dotted field: kind}`` of the table for ``config``."""
    return dict(table(config, kind)[0])


class Fields(dict):
    """A config as nested dicts with attribute access: what the checker reads, without
    ConfigDict's type locking (so a wrong type can be set and undone) and fast."""

    __getattr__ = dict.__getitem__

    @classmethod
    def of(cls, config) -> "Fields":
        return cls({k: cls.of(v) if hasattr(v, "keys") else v for k, v in config.items()})


def set_field(config, path: str, value) -> None:
    *parents, last = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[last] = value


def assert_one_line(e: UserError) -> None:
    assert "\n" not in str(e) and str(e).startswith("config."), str(e)
    assert e.hint and "\n" not in e.hint


@pytest.mark.parametrize("kind, variant", VARIANTS)
def test_every_field_has_a_rule_and_a_description_and_the_defaults_pass(kind, variant):
    config = KINDS[kind].get_config(variant)
    docs = documented(config, kind)
    names = [name for name, _ in cli.config_fields(config)]
    assert [n for n in names if n not in docs] == []
    assert all(kind_.what for kind_ in docs.values())
    comments = rules.field_comments(KINDS[kind].__file__, names)
    assert [n for n, c in comments.items() if not (c and len(c) > 5)] == []
    # A field that may be None says what None means.
    assert [
        n for n in names if docs[n].what.endswith("or None") and "None" not in comments[n]
    ] == []
    rules.check(config, table(config, kind))
    lines = rules.describe(config, table(config, kind), KINDS[kind].__file__)
    assert sum(ln.startswith("  --config.") for ln in lines) == len(names)
    assert "(no rule)" not in "\n".join(lines) and "(no comment)" not in "\n".join(lines)


def test_help_reads_each_field_s_comment_from_the_config_file_that_defines_it(tmp_path):
    """The comment on the assignment line and the comment lines below it; a variant's own
    comment never replaces the definition's; a sub-config from another file (bench's
    lm.model) has its comments there."""
    image = rules.field_comments(cifar10_config.__file__, ["seed", "data.source", "compare.seeds"])
    assert image["seed"] == "initialization, data order, augmentation, dropout"  # common.py
    assert image["data.source"].startswith("'folder' (data.path), 'cifar10_binary' (the official")
    assert image["data.source"].endswith("else cifar10_binary")  # two continuation lines
    assert image["compare.seeds"] == "each policy once per seed"
    bench = rules.field_comments(bench_config.__file__, ["model.name", "lm.model.name"])
    assert bench == {
        "model.name": "the reference CNN",
        "lm.model.name": "the byte-level Transformer",
    }
    mine = tmp_path / "mine.py"  # a user's config elsewhere, built on the repository's
    mine.write_text(
        "from configs import cifar10\n\n\ndef get_config():\n"
        "    c = cifar10.get_config()\n    c.seed = 3  # my seed\n    return c\n\n\n"
        "def variant():\n    c = get_config()\n    c.seed = 4  # a variant's note\n    return c\n"
    )
    assert rules.field_comments(str(mine), ["seed", "compare.seeds"]) == {
        "seed": "my seed",
        "compare.seeds": "each policy once per seed",
    }


def test_one_shape_training_fields_at_the_top_and_measurement_fields_at_one_path():
    """Every training config has the training fields of configs/common.py at the top level
    (with their types); the configs of experiments.cifar10 and of the sweep (the language
    model's sweep variant too) have the measurement fields at the same paths, and only those
    of the cifar10 modes differ."""
    training = dict(cli.config_fields(common.training()))
    measurement = set(dict(cli.config_fields(common.measurement(ml_collections.ConfigDict()))))
    modules = (cifar10_config, lm_config, teacher_config, sweep_config)
    for module in modules:
        for variant in module.VARIANTS:
            config = module.get_config(variant)
            names = dict(cli.config_fields(config))
            assert set(training) - {"mode"} <= set(names), (module.__name__, variant)
            for name in set(training) & set(names):
                assert config.get_type(name) == common.training().get_type(name), name
            measures = module in (cifar10_config, sweep_config) or variant == "sweep"
            assert (measurement <= set(names)) == measures, (module.__name__, variant)
    image = set(dict(cli.config_fields(cifar10_config.get_config("smoke"))))
    sweep = set(dict(cli.config_fields(sweep_config.get_config("smoke"))))
    assert image - sweep == {"mode"} | {n for n in image if n.startswith("compare.")}
    assert sweep <= image


def bad_values(default, declared: type) -> list:
    """Wrong types, 0, negatives, NaN, inf, huge values, empty sequences."""
    values = [0, -1, -1.5, math.nan, math.inf, HUGE, 1e300, (), ("abc",), "abc", "", 1.5]
    if declared is not bool:
        values.append(True)
    return values


def rejected_always(value, declared: type, kind_: rules.Kind) -> bool:
    """Values no field takes, whatever its range: non-finite numbers, a text where a number,
    flag or tuple is declared (and the reverse), ints over int32 (but byte counts), an empty
    tuple unless the table says a tuple may be empty."""
    what = kind_.what
    if isinstance(value, float) and not math.isfinite(value):
        return True
    if declared in (int, float, bool, tuple) and isinstance(value, str):
        return True
    if declared is str and not isinstance(value, str):
        return True
    if declared in (int, float) and isinstance(value, tuple | bool):
        return True
    if declared is int and isinstance(value, float):
        return True
    if declared is int and value == HUGE and not kind_.valid(2**62):
        return True
    if value == () and ("non-empty" in what or "tuple" not in what):
        return True
    return value == "" and declared is str


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, variant", VARIANTS)
def test_every_wrong_value_of_every_field_is_one_line_or_a_documented_accept(kind, variant):
    """Each field in turn gets each wrong value: the checker raises a UserError of one line
    with a hint (never another exception), or accepts a value its rule says is valid; the
    values no field takes are never accepted."""
    original = KINDS[kind].get_config(variant)
    docs = documented(original, kind)
    config = Fields.of(original.to_dict())
    accepted = []
    for name, default in list(cli.config_fields(original)):
        parent, _, last = name.rpartition(".")
        declared = (rules.get(original, parent) if parent else original).get_type(last)
        kind_ = docs[name]
        for value in bad_values(default, declared):
            set_field(config, name, value)
            try:
                rules.check(config, table(config, kind), devices=1)
            except UserError as e:
                assert_one_line(e)
            else:
                assert kind_.valid(value), (name, value)  # the table documents the accept
                assert not rejected_always(value, declared, kind_), (name, value)
                accepted.append((name, value))
            finally:
                set_field(config, name, default)
    assert accepted  # e.g. 0 steps of warmup, a huge learning rate (it diverges, one line)
    rules.check(config, table(config, kind))  # restored


@pytest.mark.parametrize(
    "kind, fields, words",
    [
        ("cifar10", {"eval_batch_size": 0}, "config.eval_batch_size=0 must be an int >= 1"),
        ("cifar10", {"eval_examples": 0}, "config.eval_examples=0"),
        ("cifar10", {"eval_examples": -1}, "config.eval_examples=-1"),
        ("cifar10", {"data.num_train": 5}, "config.data.num_train=5, config.batch_size=32"),
        ("cifar10", {"model.widths": ("abc",)}, "config.model.widths=('abc',)"),
        ("cifar10", {"model.widths": ()}, "config.model.widths=()"),
        ("cifar10", {"model.groups": 3}, "model.groups must divide every one of model.widths"),
        ("cifar10", {"gns_chunk_size": 0}, "config.gns_chunk_size=0"),
        ("cifar10", {"data.source": "folder", "data.path": None}, "reads data.path"),
        (
            "cifar10",
            {"adaptive.enabled": True, "schedule": "cosine"},
            "the learning-rate schedule counts steps, which the batch-size schedule changes",
        ),
        ("cifar10", {"adaptive.enabled": True, "warmup_steps": 10}, "config.warmup_steps=10: the"),
        ("lm", {"model.num_heads": 3}, "model.num_heads must divide model.width"),
        ("lm", {"eval_examples": 0}, "config.eval_examples=0"),
        ("lm", {"final_eval_examples": 0}, "config.final_eval_examples=0"),
        ("lm", {"eval_batch_size": 0}, "config.eval_batch_size=0"),
        ("lm", {"model.context": 0}, "config.model.context=0"),
        ("bench", {"batch_sizes": ("abc",)}, "config.batch_sizes=('abc',)"),
        ("bench", {"num_microbatches": 0}, "config.num_microbatches=0"),
        ("bench", {"image_size": 0}, "config.image_size=0"),
        ("sweep", {"critical.exponents": (1,)}, "at least 2 fork sizes"),
        ("sweep", {"noise.batch_size": 64}, "config.noise.batch_size is not a field of this"),
        ("cifar10", {"adaptive.margin": 1.5}, "config.adaptive.margin=1.5 must be a number in"),
        (
            "cifar10",
            {"adaptive.initial_batch_size": 12},
            "adaptive.initial_batch_size must be one of the candidates",
        ),
        ("cifar10", {"batchsize": 64}, "config.batchsize is not a field of this config"),
        ("cifar10", {"compare.policies": ("default,adaptive",)}, "config.compare.policies="),
        ("cifar10", {"compare.seeds": (0, 0)}, "config.compare.seeds=(0, 0) must be"),
    ],
)
def test_the_reported_mistakes_are_caught(kind, fields, words):
    config = Fields.of(KINDS[kind].get_config("smoke" if kind != "bench" else "tiny").to_dict())
    for name, value in fields.items():
        set_field(config, name, value)
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        rules.check(config, table(config, kind))
    assert_one_line(e.value)
    if "compare.policies" in fields:  # a tuple of texts typed as one: the hint shows how
        assert "--config.compare.policies=\"('default','adaptive')\"" in e.value.hint


def test_another_commands_config_is_named_as_such_not_as_a_typo():
    config = sweep_config.get_config("smoke")
    words = r"allow_shrink and 96 more fields .* another command's"
    with pytest.raises(UserError, match=words) as e:
        rules.check(config, rules.BENCH_TABLE)
    assert_one_line(e.value)


def test_the_batch_hint_names_distinct_multiples():
    _, hint = rules.batch_problem(2, 4, "batch_size")
    assert "--config.batch_size=4)" in hint
    _, hint = rules.batch_problem(30, 4, "batch_size")
    assert "--config.batch_size=28 or 32)" in hint


def test_batches_must_split_over_the_devices():
    """The sweep's reference batch 6 on 4 devices stops the sweep (it is not only skipped)."""
    config = sweep_config.get_config("smoke")
    config.batch_size = 6
    rules.check(config, tasks.table(config))  # the device count is not known yet: not checked
    with pytest.raises(UserError, match=r"config.batch_size=6 is not divisible by the 4"):
        rules.check(config, tasks.table(config), devices=4)
    rules.check(config, tasks.table(config), devices=2)
    config.batch_size, config.recommend.candidates = 8, (8, 16, 18)  # a pick it cannot run
    with pytest.raises(UserError, match=r"recommend.candidates=\(8, 16, 18\): \[18\] do not"):
        rules.check(config, tasks.table(config), devices=4)


def test_the_compare_batches_must_split_over_the_devices_before_any_work():
    """The compare mode's baseline batch and the adaptive candidates are checked against the
    mesh with the config (they stopped the run after its measurements, naming batch_size)."""
    config = cifar10_config.get_config("smoke")
    config.compare.baseline_batch_size = 6
    with pytest.raises(UserError, match=r"config.compare.baseline_batch_size=6 is not divisible"):
        rules.check(config, tasks.table(config), devices=4)
    config.compare.baseline_batch_size = None
    config.adaptive.candidates = (6, 8, 16)
    with pytest.raises(UserError, match=r"\[6\] do not split evenly over the 4 devices"):
        rules.check(config, tasks.table(config), devices=4)
    rules.check(config, tasks.table(config), devices=2)


def test_constants_are_the_library_s():
    from gns import schedule

    assert rules.LR_RULES == schedule.LR_RULES
    assert models.MODEL_NAMES is rules.MODEL_NAMES


# ---------------------------------------------------------------------------------------------
# The command line.


MISTAKES = {
    "eval_batch": ("cifar10", ["--config=configs/cifar10.py:smoke", "--config.eval_batch_size=0"],
                   "config.eval_batch_size=0"),
    "heads": ("lm", ["--config=configs/lm.py:smoke", "--config.model.num_heads=3"], "num_heads"),
    "section": ("sweep", ["--config=configs/sweep.py:smoke", "--config.source=folder"],
                "did you mean --config.data.source?"),
    "workdir": ("cifar10", ["--config=configs/cifar10.py:smoke", "--workdir="],
                "--workdir is empty"),
    "none": ("cifar10", ["--config=configs/cifar10.py:smoke", "--config.batch_size=None"],
             "config.batch_size=None must be an int >= 2"),
    "none_unknown": ("lm", ["--config=configs/lm.py:smoke", "--config.nosuch=None"],
                     "unknown config field --config.nosuch"),
    "bench_file": ("bench", ["--config", "configs/bench.py:tiny", "--workdir=/dev/null"],
                   "--workdir /dev/null is a file, not a directory"),
    "bench_reference": ("bench", ["--config", "configs/bench.py:tiny",
                                  "--config.reference_batch_size=7"],
                        "config.reference_batch_size=7, config.batch_sizes=(8,)"),
}  # fmt: skip


def _has_workdir(args):
    return any(a.startswith("--workdir=") for a in args)


@pytest.fixture(scope="module")
def ran(commands, tmp_path_factory):
    """Every command of this module, run once: ``(name -> completed process, directory)``;
    a mistake ``name`` had ``--workdir=directory/name`` (unless it gives its own);
    ``print_config`` ran in ``directory/elsewhere``, an empty directory."""
    tmp = tmp_path_factory.mktemp("commands")
    runs = {
        name: (module, [*args, *([] if _has_workdir(args) else [f"--workdir={tmp / name}"])])
        for name, (module, args, _) in MISTAKES.items()
    }
    runs.update({f"help_{module}": (module, ["--help"]) for module in KINDS})
    runs["helpfull"] = ("sweep", ["--helpfull"])
    runs["print_config"] = ("lm", ["--config", "configs/lm.py:smoke", "--config.batch_size=8",
                                   "--config.divergence_factor=None",
                                   "--print_config"])  # fmt: skip
    runs["print_bad_config"] = ("lm", ["--config", "configs/lm.py:smoke", "--config.batch_size=1",
                                       "--print_config"])  # fmt: skip
    (tmp / "elsewhere").mkdir()
    jobs = [(f"experiments.{module}", args, tmp / "elsewhere" if name == "print_config" else ROOT)
            for name, (module, args) in runs.items()]  # fmt: skip
    return dict(zip(runs, commands(jobs, tmp), strict=True)), tmp


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(MISTAKES))
def test_command_line_mistakes_stop_before_anything_is_written(ran, name):
    res, words = ran[0][name], MISTAKES[name][2]
    assert res.returncode == cli.EXIT_USER_ERROR, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and words in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert not (ran[1] / name).exists()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("module", list(KINDS))
def test_help_exits_0_with_plain_usage_and_every_field(ran, module):
    res = ran[0][f"help_{module}"]
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "``" not in out and ":func:" not in out and ":mod:" not in out and "**" not in out
    assert "--print_config" in out and "--workdir" in out
    config = KINDS[module].get_config()
    for name, _ in cli.config_fields(config):
        assert f"  --config.{name}=" in out, name
    if module == "cifar10":  # the continuation lines of the usage kept
        assert "--workdir /tmp/smoke \\\n" in out
    full = ran[0]["helpfull"]  # absl's every flag (it exits 1 itself)
    assert full.returncode == 0 and "--undefok" in full.stdout + full.stderr


@pytest.mark.timeout(240)
def test_print_config_and_config_from_the_repository(ran):
    """From another directory, --config configs/lm.py:smoke is the repository's file;
    --print_config prints the resolved config (overrides applied, ``=None`` included) as
    JSON, no --workdir needed."""
    res = ran[0]["print_config"]
    assert res.returncode == 0, res.stderr[-2000:]
    expected = lm_config.get_config("smoke")
    expected.batch_size, expected.divergence_factor = 8, None  # "None" typed is None
    assert json.loads(res.stdout) == json.loads(json.dumps(expected.to_dict()))
    assert os.listdir(ran[1] / "elsewhere") == []
    bad = ran[0]["print_bad_config"]  # printed, then checked: the mistake as a run would say it
    assert bad.returncode == cli.EXIT_USER_ERROR and json.loads(bad.stdout)["batch_size"] == 1
    assert bad.stderr.strip().splitlines()[0] == "error: config.batch_size=1 must be an int >= 2"


def test_a_relative_data_path_is_recorded_absolute(tmp_path, monkeypatch):
    """A run's config.json names its data file from anywhere: a resume from another
    directory compares the same file (train.run_identity resolves paths from the cwd)."""
    monkeypatch.chdir(tmp_path)
    config = lm_config.get_config("smoke")
    config.data.path = "corpus.txt"
    cli.absolute_data_path(config)
    assert config.data.path == os.path.join(os.path.realpath(tmp_path), "corpus.txt")
    monkeypatch.chdir(ROOT)
    assert train.run_identity(config.to_dict())["data"]["path"] == config.data.path


def test_config_paths_resolve_from_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["x", "--config", "configs/lm.py:smoke", "--config=configs/sweep.py", "--config=no.py"]
    out = cli.resolve_config_paths(argv)
    assert out[2] == os.path.join(cli.ROOT, "configs/lm.py") + ":smoke"
    assert out[3] == "--config=" + os.path.join(cli.ROOT, "configs/sweep.py")
    assert out[4] == "--config=no.py"  # not in the repository either: reported as missing
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "lm.py").write_text("")
    assert cli.resolve_config_paths(argv)[2] == "configs/lm.py:smoke"  # the current directory's


def test_plain_text_drops_the_markup_and_keeps_the_layout():
    doc = "Run :func:`experiments.train.train_and_evaluate` (:mod:`~gns.estimate`)::\n\n" \
          "    python -m x \\\n      --config ``y``\n**bold**"  # fmt: skip
    assert cli.plain_text(doc) == (
        "Run experiments.train.train_and_evaluate (estimate):\n\n"
        "    python -m x \\\n      --config y\nbold"
    )


# ---------------------------------------------------------------------------------------------
# The default data source.


def test_default_data_is_the_shared_archive_when_present_else_the_download(tmp_path, monkeypatch):
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(cifar10_config, "ROOT", str(work))
    assert cifar10_config.default_data() == ("cifar10_binary", None)
    config = cifar10_config.get_config("smoke")
    assert (config.data.source, config.data.path) == ("cifar10_binary", None)
    archive = tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"")
    assert cifar10_config.default_data() == ("folder", cifar10_config.DATA)
    config = sweep_config.get_config("cpu")
    assert (config.data.source, config.data.path) == ("folder", cifar10_config.DATA)
    monkeypatch.chdir(tmp_path)  # elsewhere: the archive beside the repository
    assert cifar10_config.default_data() == ("folder", os.path.join(str(work), cifar10_config.DATA))
