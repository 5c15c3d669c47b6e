"""Tests of experiments/runlog.py: strict JSON, the clock, the run record, the identity check,
the deferred Ctrl-C and the checkpoint fallback (no training here; see test_train.py)."""

import json
import logging
import os
import shutil
import signal
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest

from configs import sweep as sweep_config
from experiments import cli, runlog, sweep
from experiments.cli import UserError


def strict_load(text: str):
    """json.loads that rejects NaN/Infinity, as strict parsers do."""

    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_write_json_is_strict_and_atomic(tmp_path):
    path = str(tmp_path / "out.json")
    obj = {
        "nan": float("nan"),
        "inf": np.float32(np.inf),
        "arr": np.array([1.0, -np.inf]),
        "t": (1, 2),
    }
    runlog.write_json(path, obj)
    with open(path) as f:
        assert strict_load(f.read()) == {"nan": None, "inf": None, "arr": [1.0, None], "t": [1, 2]}
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left


def test_clock_charges_each_moment_to_one_kind_and_resumes():
    clock = runlog.Clock()
    clock.charge("compile")
    time.sleep(0.02)
    clock.charge("train")
    time.sleep(0.03)
    assert clock.total("train") >= 0.03  # the running stretch counts
    clock.charge("pause")
    state = clock.state()
    assert state["compile_time_s"] >= 0.02 and state["eval_time_s"] == 0.0
    frozen = clock.total("train")
    time.sleep(0.01)
    assert clock.total("train") == frozen  # not charged while paused
    resumed = runlog.Clock(state)
    assert resumed.state() == pytest.approx(state)  # totals travel through the metadata
    with pytest.raises(ValueError, match="kind"):
        clock.charge("lunch")


def _log_with_rows(workdir, steps):
    log = runlog.RunLog(str(workdir))
    for s in steps:
        log.write_row({"step": s})
    return log


def test_resume_keeps_exactly_the_rows_of_the_checkpoint(tmp_path):
    log = _log_with_rows(tmp_path, [1, 2, 3, 4])
    with open(log.metrics_path, "a") as f:  # rows of another tool, then one torn by a kill
        f.write('{"epoch": 1, "loss": 0.5}\n5\n{"step": "abc"}\n{"step": 1e400}\n{"step": 5, "tra')
    assert [r["step"] for r in log.rows()] == [1, 2, 3, 4]
    meta = {"step": 2, "examples_seen": 64, "clock": {"train_time_s": 3.0}}
    kept = log.resume(2, meta)
    assert [r["step"] for r in kept] == [1, 2]
    assert [r["step"] for r in log.rows()] == [1, 2]
    assert (log.step, log.examples_seen, log.clock.total("train")) == (2, 64, 3.0)
    log.advance(32)
    row = log.row(train_loss=1.0)
    assert (row["step"], row["examples_seen"], row["wall_time_s"]) == (3, 96, 3.0)


def test_target_crossing_recorded_once_at_its_step(tmp_path):
    log = runlog.RunLog(str(tmp_path), target=0.5)
    accuracies = {5: 0.3, 10: 0.55, 15: 0.4, 20: 0.7}
    crossed = []
    for step in range(1, 21):
        log.advance(8)
        if step in accuracies:
            crossed.append(log.record_eval(accuracies[step]))
    assert crossed == [False, True, False, False]
    assert log.to_target["steps"] == 10 and log.reached
    assert (log.best["accuracy"], log.best["step"]) == (0.7, 20)
    again = runlog.RunLog(str(tmp_path), target=0.5)
    again.resume(20, log.meta())  # through the checkpoint metadata
    assert again.to_target == log.to_target and again.best == log.best


def _crossings(log, scores, first_step=1):
    """Record ``scores`` as periodic evaluations 10 steps apart; the steps where they cross."""
    out = []
    for step, score in enumerate(scores, start=first_step):
        while log.step < 10 * step:
            log.advance(8)
        if log.record_eval(score):
            out.append(log.step)
    return out


def _first_window_mean_at(scores, target, window):
    """The 1-based index of the first full trailing mean of ``window`` scores >= ``target``
    (computed independently of RunLog)."""
    for i in range(window, len(scores) + 1):
        if np.mean(scores[i - window : i]) >= target:
            return i
    return None


SCORES = [0.3, 0.62, 0.45, 0.57, 0.61, 0.7, 0.4]  # raw crosses 0.55 at #2, mean of 3 at #6


@pytest.mark.parametrize("window, expected", [(1, 2), (3, 6), (7, None)])
def test_windowed_target_crosses_where_the_trailing_mean_does(tmp_path, window, expected):
    assert _first_window_mean_at(SCORES, 0.55, window) == expected  # the sequence's premise
    log = runlog.RunLog(str(tmp_path), target=0.55, window=window)
    crossed = _crossings(log, SCORES)
    assert crossed == ([] if expected is None else [10 * expected])  # once, at that step
    assert log.to_target["steps"] == (None if expected is None else 10 * expected)
    assert log.reached == (expected is not None)
    assert (log.best["accuracy"], log.best["step"]) == (0.7, 60)  # best: raw, any window
    # A final (non-periodic) evaluation enters no window: it crosses with window 1 only.
    final = runlog.RunLog(str(tmp_path), target=0.55, window=window)
    assert final.record_eval(0.9, periodic=False) == (window == 1)
    assert final.recent_evals == []


@pytest.mark.parametrize("stop_after", [1, 3, 4])
def test_windowed_target_resumed_mid_window_crosses_at_the_same_step(tmp_path, stop_after):
    whole = runlog.RunLog(str(tmp_path / "a"), target=0.55, window=3)
    expected = _crossings(whole, SCORES)
    first = runlog.RunLog(str(tmp_path / "b"), target=0.55, window=3)
    _crossings(first, SCORES[:stop_after])
    meta = json.loads(runlog.dumps(first.meta()))  # as the checkpoint stores it
    assert meta["recent_evals"] == SCORES[max(0, stop_after - 3) : stop_after]
    again = runlog.RunLog(str(tmp_path / "b"), target=0.55, window=3)
    again.resume(10 * stop_after, meta)
    assert _crossings(again, SCORES[stop_after:], first_step=stop_after + 1) == expected
    assert again.to_target == whole.to_target and again.best == whole.best


def test_windowed_target_of_a_lower_is_better_metric(tmp_path):
    """The text task's target (bits per byte, lower is better) as Task.score gives it: negated.
    The mean of 2 falls under 3.0 at the 5th evaluation ((3.2 + 2.7) / 2), the raw one at the
    2nd."""
    bits = [4.0, 2.9, 3.3, 3.2, 2.7]
    log = runlog.RunLog(str(tmp_path), target=-3.0, window=2)
    assert _crossings(log, [-b for b in bits]) == [50]
    assert (log.best["accuracy"], log.best["step"]) == (-2.7, 50)


def test_check_losses_non_finite_and_factor(tmp_path):
    log = runlog.RunLog(str(tmp_path))
    assert log.check_losses([2.0, 2.5, 15.0], factor=10.0) is None  # 15 < 10 x 2
    assert log.initial_loss == 2.0
    assert "exceeds 10 x the initial 2" in log.check_losses([20.5], factor=10.0)
    log = runlog.RunLog(str(tmp_path))
    assert log.check_losses([2.0, 1e30], factor=None) is None  # factor None: finite is fine
    assert "nan" in log.check_losses([float("nan")], factor=None)


def identity(config):
    return {k: v for k, v in config.items() if k != "log_every"}


def test_identity_check_lists_fields_and_keeps_config_json(tmp_path):
    log = runlog.RunLog(str(tmp_path))
    old = {"batch_size": 32, "learning_rate": 1e-3, "log_every": 10, "data": {"num_train": 512}}
    log.write_config(old)
    before = open(log.config_path).read()
    log.check_identity({**old, "log_every": 5}, identity, resuming=True)  # not an identity field
    new = {**old, "batch_size": 64, "data": {"num_train": 256}}
    log.check_identity(new, identity, resuming=False)  # nothing to resume: anything goes
    with pytest.raises(UserError) as e:
        log.check_identity(new, identity, resuming=True)
    assert "batch_size: 32 -> 64" in str(e.value) and "data.num_train: 512 -> 256" in str(e.value)
    assert "\n" not in str(e.value) and "--workdir" in e.value.hint
    assert open(log.config_path).read() == before


def test_deferred_interrupt_sets_a_flag_then_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with runlog.deferred_interrupt() as interrupted:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
        assert interrupted.is_set()
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C aborts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def corrupt(ckpt: runlog.Checkpoints, step: int) -> None:
    """Overwrite the array data of a checkpoint's state (as a bad disk or a torn copy would)."""
    for root, _, files in os.walk(os.path.join(ckpt.directory, str(step), "state")):
        for name in files:
            if "ocdbt" in root or name.endswith(".ocdbt"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\x00garbage")


def test_checkpoint_fallback_to_the_previous_readable_one(tmp_path, caplog, monkeypatch):
    unraisable = []  # what reaches the interpreter's hook: printed as a traceback
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    ckpt = runlog.Checkpoints(str(tmp_path))
    state = {"w": jnp.arange(4.0), "step": jnp.zeros((), jnp.int32)}
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] * step, "step": jnp.int32(step)}, {"step": step})
    ckpt.close()
    corrupt(ckpt, 2)
    with caplog.at_level(logging.WARNING), runlog.Checkpoints(str(tmp_path)) as again:
        restored, meta = again.restore(state)
    assert meta == {"step": 1} and int(restored["step"]) == 1
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step 2" in warnings[0].getMessage()
    assert "Traceback" not in caplog.text
    assert os.path.isdir(os.path.join(tmp_path, runlog.UNREADABLE_DIR, "2"))
    assert runlog.Checkpoints(str(tmp_path)).latest_step() == 1
    # The failed read's late callbacks on orbax's closed loop are dropped; other errors are not.
    for error in (RuntimeError("Event loop is closed"), ValueError("another")):
        sys.unraisablehook(types.SimpleNamespace(exc_value=error))
    assert [type(u.exc_value) for u in unraisable] == [ValueError]
    corrupt(ckpt, 1)  # none readable: say so rather than silently start over
    with pytest.raises(UserError, match="no readable checkpoint"):
        runlog.Checkpoints(str(tmp_path)).restore(state)


def test_another_runs_checkpoint_that_does_not_fit_is_named_and_left_as_it_is(tmp_path):
    """A pilot's checkpoint read by a run of another setup (start_from): one error, and the
    pilot's directory untouched (a run's own unreadable checkpoint is set aside instead)."""
    with runlog.Checkpoints(str(tmp_path)) as ckpt:
        ckpt.save(5, {"w": jnp.ones(2)}, {"step": 5})
    with runlog.Checkpoints(str(tmp_path)) as pilot:
        with pytest.raises(UserError, match="checkpoint of step 5 .* does not restore into"):
            pilot.restore({"w": jnp.ones(2), "schedule": jnp.zeros(())}, set_aside=False)
    assert os.listdir(os.path.join(tmp_path, runlog.CHECKPOINT_DIR)) == ["5"]
    assert not os.path.exists(os.path.join(tmp_path, runlog.UNREADABLE_DIR))


def test_a_save_killed_midway_leaves_nothing_behind_on_the_next_start(tmp_path):
    """Orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames it when done: one
    left by a killed save is removed when the run starts again; the finished steps stay."""
    with runlog.Checkpoints(str(tmp_path)) as ckpt:
        ckpt.save(1, {"w": jnp.ones(2)}, {"step": 1})
    partial = os.path.join(ckpt.directory, "2.orbax-checkpoint-tmp-1765000000")
    shutil.copytree(os.path.join(ckpt.directory, "1"), partial)
    with runlog.Checkpoints(str(tmp_path)) as again:
        assert sorted(os.listdir(again.directory)) == ["1"]
        restored, meta = again.restore({"w": jnp.zeros(2)})
    assert meta == {"step": 1} and np.array_equal(restored["w"], np.ones(2))


def test_checkpoint_identity_is_checked_before_its_state_is_read(tmp_path):
    """With config.json gone, the identity in the checkpoint still stops a mixed resume, and a
    checkpoint of another model (other shapes) is not mistaken for an unreadable one."""
    first = runlog.RunLog(str(tmp_path))
    first.check_identity({"batch_size": 32, "width": 2}, identity, resuming=False)
    runlog.Checkpoints(str(tmp_path)).save(1, {"w": jnp.zeros(2)}, first.meta())
    second = runlog.RunLog(str(tmp_path))
    second.check_identity({"batch_size": 64, "width": 3}, identity, resuming=True)
    ckpt = runlog.Checkpoints(str(tmp_path))
    with pytest.raises(UserError, match="batch_size: 32 -> 64; width: 2 -> 3"):
        ckpt.restore({"w": jnp.zeros(3)}, check=second.check_meta)
    assert ckpt.latest_step() == 1 and not os.path.exists(tmp_path / runlog.UNREADABLE_DIR)


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symlink", "hardlink"])
def test_workdir_lock_never_writes_through_a_planted_link(tmp_path, link):
    """An untrusted workdir's ``.lock`` pointing at another file: refused, the file intact."""
    victim, workdir = tmp_path / "victim", tmp_path / "w"
    victim.write_text("precious")
    workdir.mkdir()
    link(victim, workdir / runlog.LOCK_FILE)
    with pytest.raises(UserError, match="not a plain lock file") as e:
        with runlog.workdir_lock(str(workdir)):
            pass
    assert victim.read_text() == "precious" and "delete" in e.value.hint


def test_a_workdir_holding_another_kind_of_run_is_refused(tmp_path):
    with runlog.workdir_lock(str(tmp_path), "cifar10 training"):
        pass
    with runlog.workdir_lock(str(tmp_path), "cifar10 training"):  # the same kind: a resume
        pass
    with pytest.raises(UserError, match="holds a cifar10 training run, not a sweep one"):
        with runlog.workdir_lock(str(tmp_path), "sweep"):
            pass
    assert (tmp_path / runlog.KIND_FILE).read_text() == "cifar10 training"
    # Said before a main loads its data (which may take minutes, or fail for another reason).
    config = sweep_config.get_config("smoke")
    config.data.update(source="folder", path=str(tmp_path / "no-such-data"))
    with pytest.raises(UserError, match="holds a cifar10 training run, not a sweep one"):
        sweep.run_sweep(config, str(tmp_path))


def test_a_resume_on_another_number_of_devices_is_refused(tmp_path):
    one = runlog.RunLog(str(tmp_path), devices=1)
    one.advance(8)
    meta = json.loads(runlog.dumps(one.meta()))  # as the checkpoint stores it
    runlog.RunLog(str(tmp_path), devices=1).resume(1, meta)  # same count: resumes
    with pytest.raises(UserError, match="devices: 1 -> 4") as e:
        runlog.RunLog(str(tmp_path), devices=4).resume(1, meta)
    assert "on 1 device(s) with config.num_devices as it was" in e.value.hint
    assert "--xla_force_host_platform_device_count=1" in e.value.hint
    meta.pop("devices")  # a checkpoint that predates the field: not checked
    assert runlog.RunLog(str(tmp_path), devices=4).resume(1, meta) == []


def test_a_resume_on_other_data_is_refused_naming_the_field(tmp_path):
    first = runlog.RunLog(str(tmp_path))
    first.data = {"fingerprint": "aaaa", "kind": "folder"}
    meta = json.loads(runlog.dumps(first.meta()))
    again = runlog.RunLog(str(tmp_path))
    again.data = {"fingerprint": "bbbb", "kind": "folder"}
    with pytest.raises(UserError, match="data.fingerprint: 'aaaa' -> 'bbbb'") as e:
        again.resume(0, meta)
    assert "kind" not in str(e.value) and "another --workdir" in e.value.hint
    again.data = dict(first.data)
    again.resume(0, meta)  # the same data: resumes


def test_the_mains_log_filter_keeps_library_warnings_and_drops_a_write_faults_tracebacks():
    def kept(path, level, message):
        record = logging.LogRecord("x", level, path, 1, message, None, None)
        return cli.QuietLibraries().filter(record)

    orbax = "/site-packages/orbax/checkpoint/_src/futures/future.py"
    full = "raised an exception: RESOURCE_EXHAUSTED: Error writing local file: No space left"
    assert not kept(orbax, logging.ERROR, full)  # Checkpoints.save says it in one line
    assert kept(orbax, logging.ERROR, "raised an exception: shapes differ")  # a bug: shown
    assert not kept(orbax, logging.INFO, "Saving checkpoint")
    assert kept(orbax, logging.WARNING, "a deprecation")
    assert kept("/work/experiments/train.py", logging.INFO, "Compiling")
