"""Ctrl-C at any moment of a main (experiments/interrupt.py, runlog.deferred_interrupt, the
mains' first lines): exit code 130, exactly one line about it on stderr, no traceback, no
ignored ``KeyboardInterrupt``, no crash, and a record that the next run resumes.

The real command runs a few times in one workdir, each sent SIGINT after a seeded random delay
(the first ones inside the first second: imports; the later ones in the start-up: flags, data,
the lock, the checkpoints); then it runs to the end from what they left."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import cli, interrupt, runlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 20
COMMAND = [
    sys.executable,
    "-m",
    "experiments.cifar10",
    "--config=configs/cifar10.py:smoke",
    "--config.data.source=synthetic",
    f"--config.num_steps={NUM_STEPS}",
    "--config.gns_every=0",  # one compiled training step, a one-layer MLP: compiles fast
    "--config.model.name=mlp",
    "--config.model.widths=(4,)",
    "--config.data.synthetic.image_size=8",
    "--config.eval_every=0",
    "--config.checkpoint_every=5",
    "--config.log_every=5",
    "--config.plots=False",
]


def launch(workdir: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("GNS_VERBOSE", None)
    return subprocess.Popen(
        [*COMMAND, f"--workdir={workdir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# CPU seconds after which the main has installed its handler (the interpreter's start-up and
# the main's first lines take ~0.05 s of CPU here); counted in CPU, not wall, time so that a
# busy machine, which stretches the start-up's wall time, cannot send SIGINT before it.
STARTUP_CPU_S = 0.15


def wait_for_cpu(pid: int, seconds: float) -> None:
    """Block until process ``pid`` has used ``seconds`` of CPU (user + system), or ended."""
    tick = os.sysconf("SC_CLK_TCK")
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return
        if fields[0] == "Z" or (int(fields[11]) + int(fields[12])) / tick >= seconds:
            return
        time.sleep(0.01)


def assert_one_interrupt_line(rc: int, err: str) -> None:
    about = [ln for ln in err.splitlines() if "interrupt" in ln.lower()]
    assert rc == cli.EXIT_INTERRUPTED, (rc, err)
    assert about == [interrupt.MESSAGE], err
    for bad in ("Traceback", "Exception ignored", "KeyboardInterrupt", "Fatal Python error"):
        assert bad not in err, err


@pytest.mark.timeout(180)
def test_sigint_at_random_moments_exits_130_with_one_line_and_resumes(tmp_path):
    workdir = str(tmp_path / "w")
    rng = np.random.default_rng(23)
    # Each delay counts from the main's first lines (wait_for_cpu): before them Python's own
    # start-up has only its default handler.
    delays = [*rng.uniform(0.3, 1.0, 2), *rng.uniform(1.0, 4.0, 2)]
    for i, delay in enumerate(delays):  # SIGTERM (a scheduler's time limit) as Ctrl-C
        proc = launch(workdir)
        wait_for_cpu(proc.pid, STARTUP_CPU_S)
        time.sleep(delay)
        proc.send_signal((signal.SIGINT, signal.SIGTERM)[i % 2])
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0:  # it finished first (a fast machine): nothing to interrupt
            continue
        assert_one_interrupt_line(proc.returncode, err)
    proc = launch(workdir)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["steps"] == NUM_STEPS
    rows = runlog.read_jsonl(os.path.join(workdir, runlog.METRICS_FILE))
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == NUM_STEPS  # each row once, in order


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_second_ctrl_c_in_the_loop_goes_to_the_mains_handler(sig):
    """Inside ``deferred_interrupt`` the first SIGINT or SIGTERM only sets the flag; the second
    calls the handler the block replaced (a main's :func:`interrupt.install`: exit 130 at
    once)."""
    calls = []
    outer = signal.signal(sig, lambda n, f: calls.append(n))
    try:
        with runlog.deferred_interrupt() as interrupted:
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
            assert interrupted.is_set() and calls == []
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
        assert calls == [sig]
    finally:
        signal.signal(sig, outer)
