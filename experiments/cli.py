"""What the command-line mains share: the project's error type, one-line error reports,
``--help`` and ``--print_config`` (:func:`run`, which a main calls instead of ``absl.app.run``).

A mistake a user can fix (a :class:`UserError`, a missing file, a full disk) becomes one line on
stderr plus a ``hint:`` line and exit code 2 (:func:`main`, :func:`parse_flags`); anything else
is a bug and keeps its traceback, as everything does with ``--verbose`` (or ``GNS_VERBOSE=1``).
"""

from __future__ import annotations

import difflib
import errno
import functools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from experiments import interrupt

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = interrupt.EXIT_INTERRUPTED
FLAGS = flags.FLAGS
flags.DEFINE_bool("verbose", False, "Print tracebacks for every error, user errors included.")
flags.DEFINE_bool(
    "print_config",
    False,
    "Print the resolved config (the file's variant with the --config.* overrides) and exit.",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort")
Main = Callable[[list[str]], None]
Describe = Callable[[Any, str], list[str]]  # (config, path of its file) -> --help lines


class UserError(ValueError):
    """A problem with the user's input or environment, with the fix in its message."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


# What a user can fix besides a write_fault: bad input, a missing file, a path of the wrong kind.
_USER_FAULTS = (
    UserError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    app.UsageError,
)

# A write fault in words -> its errnos, and how tensorstore (under orbax) words it.
_WRITE_FAULTS = {
    "the disk is full": (
        (errno.ENOSPC, errno.EDQUOT),
        ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded"),
    ),
    "the file system is read-only": ((errno.EROFS,), ("Read-only file system",)),
    "no permission to write there": (
        (errno.EACCES, errno.EPERM),
        ("PERMISSION_DENIED", "Permission denied"),
    ),
    "a part of the path is a file": ((errno.ENOTDIR,), ("Not a directory",)),
    "the path is too long": ((errno.ENAMETOOLONG,), ("File name too long",)),
    # An orbax writer thread that fails (e.g. on a full disk) while Python shuts down.
    "the write was cut short (a full disk?)": ((), ("sys.meta_path is None",)),
}


# XLA's words for a device (or host) allocation that failed: not a disk fault.
_OUT_OF_MEMORY = "RESOURCE_EXHAUSTED: Out of memory"


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` (or a cause) is XLA's failed allocation."""
    return any(_OUT_OF_MEMORY in str(x) for x in _chain(e))


def write_fault(e: BaseException) -> str | None:
    """What a failed write ran into, in words, when it is the disk or its permissions (in
    ``e`` or its causes, tensorstore's and orbax's wording included); ``None`` otherwise."""
    for x in _chain(e):
        if _OUT_OF_MEMORY in str(x):
            continue
        worded = isinstance(x, OSError | ValueError | ImportError | RuntimeError)
        for fault, (errnos, words) in _WRITE_FAULTS.items():
            if getattr(x, "errno", None) in errnos or worded and any(w in str(x) for w in words):
                return fault
    return None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({e.filename or e}): free space there or write elsewhere"
    if isinstance(e, OSError) and e.filename:
        name = str(e.filename)
        name = name if len(name) <= 160 else f"{name[:80]}...{name[-60:]}"
        return f"{e.strerror or e}: {name}"
    text = " ".join(str(e).split()) or type(e).__name__
    if out_of_memory(e):
        return (
            f"the device ran out of memory ({text[:200]}): lower the batch size, or measure "
            "with less memory (chunk_size, method='microbatch')"
        )
    if isinstance(e, UserError | OSError) or (fault := write_fault(e)) is None:
        return text
    return f"{fault} ({type(e).__name__}: {text[:200]})"


def _fault_hint(e: BaseException) -> str | None:
    """The fix of a :func:`write_fault` (``None`` for other errors)."""
    if (fault := write_fault(e)) is None:
        return None
    fix = "free space there" if "full" in fault or "cut short" in fault else "fix its permissions"
    fix = "pick a path of directories" if "is a file" in fault else fix
    fix = "pick a shorter path" if "too long" in fault else fix
    return f"{fix}, or pass another --workdir (--config.data.cache_dir for the data's cache)"


def _verbose(argv: list[str]) -> bool:
    if os.environ.get("GNS_VERBOSE") == "1":
        return True
    if FLAGS.is_parsed():
        return FLAGS.verbose
    return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)


# The repository's commands as the installed ``gns`` command runs them (experiments/__main__.py).
_INSTALLED = (
    (r"make demo DEMO_CONFIG=(\S+)", r"gns demo --config \1"),
    (r"make demo DATA=(\S+)", r"gns demo --config.data.source=folder --config.data.path=\1"),
    (r"make (demo|bench)\b", r"gns \1"),
    (r"python -m experiments\.(?:cifar10|run)\b", "gns train"),
    (r"python -m experiments\.(sweep|lm|bench)\b", r"gns \1"),
)


PROGRESS_EVERY_S = 30.0


def progress_every_s() -> float:
    """Seconds between progress lines off a terminal (:mod:`experiments.progress`):
    ``GNS_PROGRESS_EVERY_S`` (0: none), default :data:`PROGRESS_EVERY_S`; :func:`run` checks
    it before the main."""
    text = os.environ.get("GNS_PROGRESS_EVERY_S", str(PROGRESS_EVERY_S))
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise UserError(
            f"GNS_PROGRESS_EVERY_S={text!r} is not a number of seconds >= 0",
            hint="e.g. GNS_PROGRESS_EVERY_S=60, or 0 for no progress lines off a terminal",
        )
    return value


def for_user(text: str) -> str:
    """``text`` with the repository's commands (``make demo``, ``python -m experiments.sweep``)
    named as this process was started: under the installed ``gns SUBCOMMAND`` (which sets
    ``GNS_COMMAND``), its way."""
    if not os.environ.get("GNS_COMMAND"):
        return text
    for pattern, replacement in _INSTALLED:
        text = re.sub(pattern, replacement, text)
    return text


def _exit(message: str, hint: str | None = None):
    print(for_user(f"error: {message}"), file=sys.stderr)
    if hint:
        print(for_user(f"hint: {hint}"), file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


class QuietLibraries(logging.Filter):
    """A logging filter for the mains: drops the INFO chatter of orbax and of JAX's backend
    discovery, keeps their warnings; drops orbax's errors of a failed write (a full disk: its
    writer threads' tracebacks), which ``runlog.Checkpoints.save`` reports in one line."""

    def filter(self, record):
        orbax = "orbax" in record.pathname
        if orbax and write_fault(ValueError(record.getMessage())):
            return False
        chatty = orbax or "xla_bridge" in record.pathname
        return record.levelno >= logging.WARNING or not chatty


def _leave_the_cluster() -> None:
    """Leave a ``jax.distributed`` cluster with the others (its shutdown barrier): process 0
    hosts the coordinator, and a process 0 that exits on a mistake that every process makes
    would abort the others before they can say it too."""
    jax = sys.modules.get("jax")  # loaded by the main; never imported here for a mistake
    if jax is not None and jax.distributed.is_initialized():
        try:
            jax.distributed.shutdown()
        except Exception:  # noqa: BLE001 (a process that does not follow: leave anyway)
            pass


def main(fn: Main) -> Main:
    """Wrap an absl ``main(argv)``: a user error prints ``error: ...`` (and ``hint: ...``) on
    stderr and exits with code 2; Ctrl-C exits with 130 and one line."""

    def wrapped(argv):
        try:
            return fn(argv)
        except KeyboardInterrupt:
            if _verbose(argv):
                raise
            interrupt.exit_now()  # no interpreter teardown of XLA (it can crash)
        except Exception as e:
            user = isinstance(e, _USER_FAULTS) or write_fault(e) or out_of_memory(e)
            if _verbose(argv) or not user:
                raise
            _leave_the_cluster()
            _exit(_one_line(e), getattr(e, "hint", None) or _fault_hint(e))

    return wrapped


def run(
    fn: Main,
    config: str,
    describe: Describe,
    check: Callable[[Any], None],
    *,
    workdir: str,
    argv: list[str] | None = None,
) -> None:
    """``absl.app.run`` of ``main(fn)`` with the flags ``--config`` (a file such as ``config``)
    and ``--workdir`` (``workdir``: what it holds), defined here rather than on import (no
    clash with another main's), :func:`parse_flags` and ``check(config)`` before it (a
    mistake: one error line, before anything is loaded or written), ``--help``
    (:func:`print_help`) and ``--print_config`` (the config, then the check); arguments
    other than flags are refused, the libraries' chatter filtered (:class:`QuietLibraries`).
    An exit with code 2 skips Python's finalizers, so that a writer thread cut short by the
    fault (orbax's, on a full disk) adds no traceback."""
    flags.DEFINE_string("workdir", None, f"Directory for {workdir}.")
    config_flags.DEFINE_config_file(
        "config", None, f"Config file: {config}[:variant].", lock_config=True
    )
    flags.mark_flags_as_required(["config", "workdir"])
    argv = resolve_config_paths(sys.argv if argv is None else argv)
    if any(a in HELP_FLAGS for a in argv[1:]):
        try:
            print_help([a for a in argv if a not in HELP_FLAGS], config, describe)
            sys.stdout.flush()
        except BrokenPipeError:  # e.g. piped into head
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)

    def flags_only(argv):  # argv: what the flags left
        if len(argv) > 1:
            raise UserError(
                f"unexpected arguments {argv[1:]}", hint="flags take the form --name=value"
            )
        progress_every_s()  # a bad setting, said before anything is written
        absl_logging.get_absl_handler().addFilter(QuietLibraries())
        return fn(argv)

    parse = functools.partial(_parse_or_print, check=check)
    try:
        app.run(main(flags_only), argv=argv, flags_parser=parse)
    except SystemExit as e:
        if e.code == EXIT_USER_ERROR:
            interrupt.exit_now(None, EXIT_USER_ERROR)
        if "--helpfull" in argv[1:]:  # absl's help exits 1 after printing it: asked for, 0
            sys.exit(0)
        raise


def resolve_config_paths(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config=PATH[:VARIANT]`` (or ``--config PATH...``) that is not a
    file from the current directory but is one in the repository replaced by that file."""
    out = list(argv)
    for i, arg in enumerate(out):
        prefix = "--config=" if arg.startswith("--config=") else ""
        if prefix or i and out[i - 1] == "--config":
            path, sep, variant = arg.removeprefix(prefix).partition(":")
            if path and not os.path.exists(path) and os.path.isfile(os.path.join(ROOT, path)):
                out[i] = prefix + os.path.join(ROOT, path) + sep + variant
    return out


def _parse_or_print(argv: list[str], check: Callable[[Any], None]) -> list[str]:
    """:func:`parse_flags`, then ``check(config)`` (a mistake: its error line, exit 2) before
    the main; with ``--print_config`` prints the resolved config first and exits 0."""
    printing = any(re.match(r"--print_config(=(true|1))?$", a) for a in argv[1:])
    if printing:
        _parse_to_read(argv)
        print(json.dumps(FLAGS.config.to_dict(), indent=2))
        sys.stdout.flush()
    else:
        args = parse_flags(argv)
        if not FLAGS.workdir:
            _exit("--workdir is empty", hint="pass the run's directory, e.g. --workdir runs/smoke")
    main(lambda _: check(FLAGS.config))(argv)
    if printing:
        sys.exit(0)
    return args


def _parse_to_read(argv: list[str]) -> None:
    """:func:`parse_flags` for ``--help`` and ``--print_config``, which need no ``--workdir``."""
    if not any(a.startswith("--workdir") for a in argv):
        argv = [*argv, "--workdir=unused"]
    parse_flags(argv)


def print_help(argv: list[str], config: str, describe: Describe) -> None:
    """The usage of the ``__main__`` module (its docstring as plain text), its flags, and the
    fields of its config (``--config`` of ``argv``, else ``config``'s default variant) with
    their values, meaning and valid values."""
    if "config" not in _flag_values(argv):
        argv = [*argv, f"--config={os.path.join(ROOT, config)}"]
    _parse_to_read(argv)
    print(for_user(plain_text(sys.modules["__main__"].__doc__ or "")).strip() + "\n\nFlags:")
    for name in ("config", "workdir", "print_config", "verbose"):
        print(f"  --{name}: {FLAGS[name].help}")
    print("  --helpfull: every flag, absl's included\n")
    path, _, variant = FLAGS["config"].config_filename.partition(":")
    name = os.path.relpath(path, ROOT) + (f":{variant}" if variant else " (default variant)")
    print(f"Config fields ({name}; set any with --config.FIELD=VALUE):")
    print(for_user("\n".join(describe(FLAGS.config, path))))


def plain_text(doc: str) -> str:
    """A docstring without reStructuredText markup: ``:func:`~a.b``` -> ``b``, ````x```` and
    ``**x**`` -> ``x``, a paragraph's closing ``::`` -> ``:``; the layout kept."""
    doc = re.sub(r":\w+:`(?:~(?:[^`]*\.)?)?([^`]+)`", r"\1", doc)
    doc = doc.replace("``", "").replace("**", "")
    return re.sub(r"(\S)::$", r"\1:", doc, flags=re.M)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``FLAGS(argv)``), with the mistakes reported as one line and exit
    code 2: a missing config file, an error in its ``get_config`` (e.g. an unknown variant), an
    unknown ``--config.field``, a bad value, an unknown or missing flag. ``--config.field=None``
    sets the field to ``None`` (the rules then say whether it may be)."""
    nones = [a for a in argv[1:] if re.fullmatch(r"--config\.[\w.]+=None", a)]
    try:
        args = FLAGS([a for a in argv if a not in nones])
        getattr(FLAGS.config, "keys", None)  # raises config_flags' deferred error
        fields = [a.removeprefix("--config.").removesuffix("=None") for a in nones]
        if unknown := _unknown_field({f"config.{f}": "None" for f in fields}):
            _exit(*unknown)
        for field in fields:  # config_flags parses "None" as the field's type: set it here
            *parents, last = field.split(".")
            functools.reduce(lambda node, key: node[key], parents, FLAGS.config)[last] = None
        absolute_data_path(FLAGS.config)
        return args
    except Exception as e:
        if _verbose(argv):
            raise
        _exit(*_flag_error(e, argv))


def absolute_data_path(config) -> None:
    """``config.data.path`` made absolute, so that the records of a run (``config.json``) name
    the same file when it is resumed from another directory."""
    data = config.get("data")
    if data is not None and isinstance(data.get("path"), str) and data.path:
        data.path = os.path.abspath(os.path.expanduser(data.path))


def _flag_values(argv: list[str]) -> dict[str, str]:
    """``{name: value}`` of the ``--name=value`` and ``--name value`` arguments (the last wins)."""
    out = {}
    for i, arg in enumerate(argv[1:], 1):
        m = re.match(r"--([\w.]+)(?:=(.*))?$", arg)
        if m and m.group(2) is not None:
            out[m.group(1)] = m.group(2)
        elif m and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out[m.group(1)] = argv[i + 1]
    return out


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and its causes/contexts, outermost first."""
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _flag_error(e: BaseException, argv: list[str]) -> tuple[str, str | None]:
    """``(message, hint)`` of a flag-parsing failure."""
    user = [x for x in _chain(e) if isinstance(x, UserError)]
    if user:  # the innermost: config_flags re-raises it with the traceback as its message
        return " ".join(str(user[-1]).split()), user[-1].hint
    given = _flag_values(argv)
    path = given.get("config", "").split(":", 1)[0]
    if "config" in given and not os.path.isfile(path):
        return (
            f"config file not found: {path}",
            "pass --config=path/to/config.py[:variant], e.g. configs/cifar10.py:smoke",
        )
    if unknown := _unknown_field(given):
        return unknown
    if "has no attribute 'get_config'" in str(e):
        return (
            f"{path} has no get_config(): not a config file",
            "pass a config file, e.g. --config=configs/cifar10.py:smoke",
        )
    if isinstance(e, flags.Error):
        text = " ".join(str(e).split())
        if group := re.search(r"--config\.([\w.]+)=.*as a ConfigDict", text):
            name = group.group(1)
            return (
                f"--config.{name} is a group of fields, not one value",
                f"set its fields one by one, --config.{name}.FIELD=... (--help lists them)",
            )
        if "--config." in text:
            return text, "see --help for the config's fields, their values and what each takes"
        return text, "see --help for this command's flags (--helpfull: absl's too)"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__), "run with --verbose for the traceback"


def _unknown_field(given: dict[str, str]) -> tuple[str, str] | None:
    """The first ``--config.a.b=...`` of ``given`` whose field is not in the config."""
    node = FLAGS["config"].value
    if node is None and "config" in given:  # the override failed before the config was set
        try:
            node = FLAGS["config"].parser.parse(given["config"])
        except Exception:
            return None
    paths = [p for p, _ in config_fields(node)] if hasattr(node, "keys") else []
    for field in (a.removeprefix("config.") for a in given if a.startswith("config.")):
        if paths and field not in paths and not any(p.startswith(field + ".") for p in paths):
            if field == "task":  # a config file is one task's: the image task's has no field
                hint = "another task is another config file, e.g. --config configs/teacher.py"
                return "this config has no field --config.task (its task is fixed)", hint
            return f"unknown config field --config.{field}", _did_you_mean(field, paths)
    return None


def _did_you_mean(field: str, paths: list[str]) -> str:
    """The hint for an unknown ``--config.field``: the field under another section (e.g.
    ``data.source`` for ``source``), else the closest name."""
    parent, _, last = field.rpartition(".")
    siblings = [p.rpartition(".")[2] for p in paths if p.rpartition(".")[0] == parent]
    if nested := [p for p in paths if p.endswith("." + field)]:
        guess = f"did you mean --config.{nested[0]}? "
    elif close := difflib.get_close_matches(last, siblings, 1, 0.6):
        guess = f"did you mean --config.{parent + '.' if parent else ''}{close[0]}? "
    elif close := difflib.get_close_matches(field, paths, 1, 0.6):
        guess = f"did you mean --config.{close[0]}? "
    else:
        guess = ""
    return guess + "--help lists every field"


def config_fields(config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of every leaf of a config (nested dicts flattened), in order."""
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys"):
            yield from config_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
