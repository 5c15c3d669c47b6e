"""Progress off a terminal (experiments/progress.py): a log line every few seconds with the
phase, the counts, the rate, the ETA and the latest fields."""

import io
import logging
import os
import re
import subprocess
import sys
import time

import pytest
from absl import logging as absl_logging

from experiments import cli, progress
from experiments.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_format_duration():
    assert [progress.format_duration(s) for s in (0.4, 42, 187, 7500, float("inf"), -1)] == [
        "0s", "42s", "3m07s", "2h05m", "-", "-",
    ]  # fmt: skip


def test_off_a_terminal_it_logs_phase_counts_rate_eta_and_fields(caplog):
    stream = io.StringIO()  # not a terminal
    with caplog.at_level(logging.INFO):
        bar = progress.Progress(100, desc="train", unit="examples", every_s=0.05, stream=stream)
        bar.set(phase="compiling", step=0)
        time.sleep(0.2)  # compiling: lines without a rate yet
        bar.set(phase="training")
        bar.update(25)
        time.sleep(0.1)
        bar.update(25)
        bar.set(step=2, B_simple="212")
        time.sleep(0.2)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    assert (
        lines[0] == "train: compiling, 0/100 examples (0%), - examples/s, ETA -, elapsed 0s, step 0"
    )
    last = lines[-1]
    m = re.fullmatch(r"train: training, 50/100 examples \(50%\), ([\d.]+) examples/s, ETA (\S+), "
                     r"elapsed \S+, step 2, B_simple 212", last)  # fmt: skip
    assert m, last
    rate = float(m.group(1))
    assert 0 < rate <= 50 / 0.1  # 50 examples over at least the 0.1 s since the first update
    assert m.group(2) == progress.format_duration(50 / rate)
    assert stream.getvalue() == ""  # no bar drawn
    n = len(caplog.records)
    time.sleep(0.15)
    assert len(caplog.records) == n  # closed: no more lines


def test_stages_show_elapsed_without_a_rate():
    bar = progress.Progress(5, desc="sweep", unit="stages", every_s=0, rate=False)
    bar.set(phase="throughput")
    bar.update(2)
    assert re.fullmatch(r"sweep: throughput, 2/5 stages \(40%\), elapsed \S+", bar.line())
    bar.close()


def test_a_run_a_target_may_stop_shows_its_rate_but_no_eta():
    bar = progress.Progress(100, desc="train", unit="examples", every_s=0, eta=False)
    bar.update(10)
    time.sleep(0.01)
    bar.update(10)
    assert re.fullmatch(
        r"train: 20/100 examples \(20%\), [\d.,]+ examples/s, elapsed \S+", bar.line()
    )
    bar.close()


def test_the_interval_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.setenv("GNS_PROGRESS_EVERY_S", "0.5")
    assert cli.progress_every_s() == 0.5
    monkeypatch.delenv("GNS_PROGRESS_EVERY_S")
    assert cli.progress_every_s() == cli.PROGRESS_EVERY_S
    for bad in ("abc", "-1", "inf"):
        monkeypatch.setenv("GNS_PROGRESS_EVERY_S", bad)
        with pytest.raises(UserError, match=f"GNS_PROGRESS_EVERY_S='{bad}' is not a number"):
            progress.Progress(3, desc="x", unit="steps", stream=io.StringIO())


def test_a_bad_interval_stops_a_command_before_its_workdir_is_made(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--config=configs/teacher.py:smoke",
         f"--workdir={workdir}"],
        cwd=ROOT, env=os.environ | {"GNS_PROGRESS_EVERY_S": "abc"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr
    assert "error: GNS_PROGRESS_EVERY_S='abc' is not a number" in proc.stderr
    assert not workdir.exists()


def test_on_a_terminal_a_log_line_clears_the_bar_first(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)  # where tqdm draws
    bar = progress.Progress(10, desc="train", unit="steps")
    cleared, handler = [], absl_logging.get_absl_handler()  # the mains' (absl.app.run)
    monkeypatch.setattr(bar._bar, "clear", lambda *a, **k: cleared.append(True))
    monkeypatch.setattr(handler, "emit", lambda record: None)

    def log(text):
        handler.handle(logging.LogRecord("absl", logging.INFO, __file__, 1, text, (), None))

    log("Compiling the training steps")
    bar.close()
    log("after the bar")
    assert cleared == [True]  # once: for the line written while the bar was up
