"""The ``gns`` command: ``gns SUBCOMMAND [FLAGS]`` (or ``python -m experiments SUBCOMMAND``)
runs one experiment of :data:`COMMANDS`; without ``--config``, with its default config from this
installation (the wheel's ``gns_jax/`` directory, put on ``sys.path``), from any directory."""

from __future__ import annotations

import os
import runpy
import sys

import gns  # light: the library loads on first use

# subcommand -> (module, default config relative to the root, default flags, what it does)
COMMANDS = {
    "demo": (
        "experiments.cifar10",
        "configs/cifar10.py:demo",
        ("--config.mode=compare", "--workdir=runs/demo"),
        "every batch-size policy trained to the same target, with a verdict",
    ),
    "train": (
        "experiments.run",
        "configs/cifar10.py:cpu",
        (),
        "any task (config.task; CIFAR-10 by default) with the noise scale tracked",
    ),
    "sweep": (
        "experiments.sweep",
        "configs/sweep.py:cpu",
        (),
        "noise scale, throughput, tradeoff fit and a recommended batch size",
    ),
    "bench": (
        "experiments.bench",
        "configs/bench.py",
        ("--workdir=runs/bench",),
        "cost of each noise-scale estimator over a plain training step",
    ),
    "lm": (
        "experiments.lm",
        "configs/lm.py:cpu",
        (),
        "the byte-level Transformer language model with the noise scale tracked",
    ),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE = "usage: gns SUBCOMMAND [FLAGS]   (gns SUBCOMMAND --help: its flags; gns --version)\n\n"
USAGE += "\n".join(f"  {name:<6} {spec[3]}" for name, spec in COMMANDS.items())


def command_line(name: str, args: list[str], root: str = ROOT) -> tuple[str, list[str]]:
    """The module to run and its ``argv`` for ``gns NAME ARGS``: ``--config`` from ``root``
    when ``args`` has none, ``args``, then the subcommand's defaults that ``args`` does not
    set (after ``args``: a ``--config.FIELD`` must follow the ``--config`` it overrides)."""
    module, config, defaults, _ = COMMANDS[name]
    given = {a.lstrip("-").split("=", 1)[0] for a in args if a.startswith("-")}  # absl: - or --
    argv = [] if "config" in given else [f"--config={os.path.join(root, config)}"]
    argv += [*args, *(d for d in defaults if d.lstrip("-").split("=", 1)[0] not in given)]
    return module, [f"gns {name}", *argv]


def help_header(name: str, module: str, args: list[str]) -> str | None:
    """What ``gns NAME`` is and runs, shown above the module's help when ``args`` asks for
    help (``None`` otherwise)."""
    helps = [a for a in args if a.lstrip("-") in ("help", "helpfull", "h")]
    if not helps:
        return None
    flags = " ".join(a for a in args if a not in helps)
    return f"gns {name}: {COMMANDS[name][3]}.\nIt runs {module} with {flags}\n"


def main() -> None:
    """Run ``gns SUBCOMMAND [FLAGS]`` of ``sys.argv``."""
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0)
    if name == "--version":
        print(f"gns {gns.__version__}")
        sys.exit(0)
    if name not in COMMANDS:
        error = f"error: unknown subcommand {name!r}\n" if name else ""
        print(error + USAGE, file=sys.stderr)
        sys.exit(2)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # the directory that holds experiments/ and configs/
    module, sys.argv = command_line(name, sys.argv[2:])
    if header := help_header(name, module, sys.argv[1:]):
        print(header)
    os.environ["GNS_COMMAND"] = name  # what experiments.cli.for_user names commands by
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
