"""Test set-up: 4 simulated CPU devices for the data-parallel tests, the order of the files
(longest first), and a batch runner of commands (the ``commands`` fixture).

The XLA flag must be set before JAX initializes its backend, so it is set here, at import time
of the test session. Tests that need one device simply use the default device.
"""

import atexit
import importlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

# The suite compiles hundreds of small programs and runs each a few times: XLA:CPU's LLVM
# optimizations cost more compile time than they save (a third of the suite's time), and so do
# its MLIR fusion emitters against the classic ones (about 40% of the compile-bound files' time,
# results unchanged); no test depends on them (timing tests compare paths compiled alike).
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=4",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
]).strip()  # fmt: skip
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The Ctrl-C tests need Python's own SIGINT handler, in this process and (by not ignoring the
# signal) in the commands it starts; a runner started in the background (`nohup`, `&` in a
# script) hands its processes SIGINT ignored.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Caches (decoded data, the sweep's compilation cache) go to a directory of this session, not the
# user's ~/.cache/gns: the suite reads nothing an earlier run left there and writes nothing there.
# The session's first process makes it; its pytest-xdist workers inherit it, so a program one
# worker compiled is a cache hit in the other (a partly written entry is a warned miss).
if "GNS_TESTS_CACHE" not in os.environ:
    os.environ["GNS_TESTS_CACHE"] = tempfile.mkdtemp(prefix="gns-tests-cache-")
    # removed when the process that made it exits, after its workers (hundreds of MB)
    atexit.register(shutil.rmtree, os.environ["GNS_TESTS_CACHE"], ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = os.environ["GNS_TESTS_CACHE"]
# Every test of this process, and every command it runs, shares JAX's persistent compilation
# cache there: the runs of different tests build the same programs (closures differ, HLO does
# not; the learning rate is a value of the train state, not of the step), so each compiles once.
os.environ.update(
    JAX_COMPILATION_CACHE_DIR=os.path.join(os.environ["XDG_CACHE_HOME"], "jax-compiled"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
)

# Test files by their measured time on 2 cores (--durations), longest first. `make test` runs
# them in 2 processes, a file at a time, in this order (--dist loadfile --no-loadscope-reorder):
# the long files start first and the short ones fill in behind them, so neither process is left
# with a long file at the end. Files not listed follow in their usual order.
LONGEST_FIRST = (
    "test_ghost.py", "test_sweep.py", "test_train.py", "test_lm.py", "test_mesh.py",
    "test_estimate.py", "test_bench.py", "test_readme.py", "test_adaptive.py", "test_multihost.py",
    "test_compare.py", "test_config.py", "test_distributed.py", "test_schedule.py",
    "test_models.py", "test_demo.py", "test_interrupt.py", "test_finder.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


# One interpreter imports what every entry point imports (JAX, absl, ml_collections: seconds),
# then forks a child per command, which runs ``python -m MODULE ARGS`` as Python does (runpy,
# the module as ``__main__``; its exit code, message or traceback as the interpreter's own).
DRIVER = """
import json, os, runpy, sys
import experiments.cli, experiments.rules, experiments.runlog
codes = []
for module, args, cwd, out, err in json.loads(sys.argv[1]):
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.chdir(cwd)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        sys.exit(0)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_commands(commands, scratch, timeout=240) -> list[subprocess.CompletedProcess]:
    """``python -m MODULE *ARGS`` in ``CWD`` for each ``(module, args, cwd)``, with the
    repository on PYTHONPATH: the completed processes, in order. The imports are paid once
    (:data:`DRIVER`); ``scratch`` is a directory for the captured outputs."""
    jobs = [(m, list(a), str(cwd), f"{scratch}/{i}.out", f"{scratch}/{i}.err")
            for i, (m, a, cwd) in enumerate(commands)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.splitlines()[-1])
    read = lambda path: pathlib.Path(path).read_text()
    return [subprocess.CompletedProcess([m, *a], code, read(out), read(err))
            for (m, a, _, out, err), code in zip(jobs, codes, strict=True)]  # fmt: skip


@pytest.fixture(scope="session")
def commands():
    """:func:`run_commands`."""
    return run_commands


def import_docs_script(name: str):
    """The module of ``docs/<name>.py`` (docs/ is no package: on the path for the import)."""
    docs = os.path.join(ROOT, "docs")
    sys.path.insert(0, docs)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(docs)


@pytest.fixture(scope="session")
def docs_script():
    """:func:`import_docs_script`."""
    return import_docs_script
