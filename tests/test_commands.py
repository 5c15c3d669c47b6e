"""Every command printed in the README, in docs/ and in the configs' docstrings runs as printed
as far as its config goes: the config file and variant exist, every ``--config.FIELD`` override
names a field, and the resolved config passes the rule table (:mod:`experiments.rules`) on the
command's devices, parsed in-process as absl parses the command line (tests/test_config.py runs
``--print_config`` and ``--help`` of each entry point as commands). The smoke-size commands
also run end to end in tests/test_train.py, test_lm.py, test_sweep.py, test_demo.py
and test_interrupt.py."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import rules, tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
           *sorted((ROOT / "configs").glob("*.py"))]  # fmt: skip


def printed_commands(text: str, spans: bool) -> list[str]:
    """The ``python -m experiments.X --flag ...`` commands of ``text`` (backslash continuations
    joined; with ``spans``, markdown code spans over several lines too), up to the first word
    that is not a flag or a flag's value; elided ones (``...``) and ``--help`` left out."""
    text = text.replace("\\\n", " ")
    chunks = []
    if spans:  # fenced blocks by line, then the code spans of the prose
        chunks = "\n".join(re.findall(r"```.*?\n(.*?)```", text, flags=re.S)).splitlines()
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        chunks += [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", text)]
    out = []
    for chunk in chunks + [line for line in text.splitlines() if not spans or "`" not in line]:
        m = re.search(r"((?:XLA_FLAGS=\S+\s+)?python -m experiments\.\w+)(.*)", chunk)
        if not m:
            continue
        words = [w.rstrip("`).,;") for w in m.group(2).split()]
        for i, w in enumerate(words):
            takes_value = i and words[i - 1] in ("--config", "--workdir")
            if not (w.startswith("--") or takes_value):
                words = words[:i]
                break
        if words and "--help" not in words and "..." not in m.group(0):
            out.append(" ".join([m.group(1), *words]))
    return out


COMMANDS = sorted({c for p in SOURCES for c in printed_commands(p.read_text(), p.suffix == ".md")})


def test_the_commands_are_found():
    modules = {re.search(r"experiments\.(\w+)", c).group(1) for c in COMMANDS}
    assert modules == {"cifar10", "lm", "sweep", "bench"}, modules  # each documented, checked


@pytest.mark.parametrize("command", COMMANDS)
def test_printed_command_has_a_valid_config(command, monkeypatch):
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words[: words.index("python")])
    module, args = words[words.index("-m") + 1], words[words.index("-m") + 2 :]
    monkeypatch.setattr(sys, "argv", ["prog", *args])  # config_flags reads the overrides there
    values = flags.FlagValues()  # the entry points' two flags, parsed as absl parses them
    config_flags.DEFINE_config_file("config", None, flag_values=values)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(sys.argv)
    devices = int(re.search(r"device_count=(\d+)", env.get("XLA_FLAGS", "device_count=1")).group(1))
    bench = module == "experiments.bench"
    rules.check(values.config, rules.BENCH_TABLE if bench else tasks.table(values.config), devices)


@pytest.mark.parametrize("smoke", ["0", "1"])
def test_gpu_script_commands_are_valid(tmp_path, smoke, monkeypatch, docs_script):
    """``.ci/gpu`` (the GPU rows, run on a lent device machine) with ``PY=echo``: each step
    logs its command line instead of running it; the bench's parses as absl parses it and
    passes the rule table, the end-to-end script's parse with that script's parser."""
    env = {**os.environ, "PY": "echo", "OUT": str(tmp_path), "GPU_SMOKE": smoke}
    proc = subprocess.run(["bash", str(ROOT / ".ci/gpu")], cwd=ROOT, env=env, timeout=60,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    steps = (tmp_path / "env.txt").read_text()
    assert "bench: exit 0" in steps and "e2e_lm: exit 0" in steps
    bench = shlex.split((tmp_path / "bench.log").read_text())
    assert bench[:2] == ["-m", "experiments.bench"]
    test_printed_command_has_a_valid_config(shlex.join(["python", *bench]), monkeypatch)
    e2e = docs_script("finder_end_to_end")
    for log in sorted(tmp_path.glob("e2e_*.log")):
        script, *args = shlex.split(log.read_text())
        assert script == "docs/finder_end_to_end.py"
        e2e.parse_args(args)  # exits 2 on a flag it does not know
