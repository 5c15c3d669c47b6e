"""Tests of the CIFAR-10 training code (experiments/train.py, experiments/cifar10.py,
configs/cifar10.py, gns/plots.py), on tiny models and synthetic data."""

import copy
import dataclasses
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from test_tensorboard import read_scalars

from configs import cifar10 as cifar10_config
from configs import sweep as sweep_config
from experiments import adaptive, cli, data, download, events, models, rules, run, runlog, train
from experiments import mesh as mesh_lib
from experiments.cli import UserError
from gns import common, plots, smoothing


def tiny_config(**overrides):
    """The smoke config on small synthetic images (learnable: class colour + pattern)."""
    c = cifar10_config.get_config("smoke")
    c.data.source = "synthetic"
    c.data.synthetic.image_size = 16
    c.data.num_train = 512
    c.data.num_test = 256
    c.progress_bar = False
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def mlp_config(**overrides):
    """:func:`tiny_config` with a one-layer MLP, quick to compile and to run: the end-to-end
    runs here, whose checks do not depend on the model (the smoke config's CNN trains end to
    end in tests/test_demo.py, tests/test_mesh.py and tests/test_interrupt.py)."""
    return tiny_config(**{"model.name": "mlp", "model.widths": (16,), **overrides})


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_outputs(workdir):
    """config.json, summary.json and the metrics rows, parsed by a parser that rejects
    NaN/Infinity (as strict JSON parsers do)."""

    def load(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {workdir}"))

    def read(name):
        with open(os.path.join(workdir, name)) as f:
            return f.read()

    rows = [load(line) for line in read("metrics.jsonl").splitlines()]
    return load(read("config.json")), load(read("summary.json")), rows


def _restored_state(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, runlog.CHECKPOINT_DIR))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored.state


# ---------------------------------------------------------------------------------------------
# End to end: the smoke config on synthetic data.


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    config = mlp_config(num_steps=60, eval_every=20)
    summary = train.train_and_evaluate(config, workdir)
    return config, workdir, summary


@pytest.mark.timeout(240)
def test_smoke_run_learns(smoke_run):
    config, _, summary = smoke_run
    chance = 1.0 / config.data.synthetic.num_classes
    assert summary["test_accuracy"] > 2 * chance
    assert summary["test_examples"] == config.data.num_test  # final eval on the full test set
    assert summary["steps"] == config.num_steps
    assert summary["examples"] == config.num_steps * config.batch_size
    assert summary["epochs"] == pytest.approx(summary["examples"] / config.data.num_train)
    assert summary["best_test_accuracy"] >= summary["test_accuracy"]
    # On the 4 simulated devices: across_devices; on one, per_example (no BatchNorm).
    assert summary["gns_method"] == ("across_devices" if jax.device_count() > 1 else "per_example")
    assert summary["mesh"]["devices"] == jax.device_count()


@pytest.mark.timeout(240)
def test_smoke_run_files_and_rows(smoke_run):
    config, workdir, summary = smoke_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "training.png", "noise_scale.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    saved_config, saved_summary, rows = strict_outputs(workdir)
    assert saved_config == common.to_json(config.to_dict())
    assert saved_summary == summary
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == config.num_steps
    for r in rows:
        assert r["examples_seen"] == r["step"] * config.batch_size
    walls = [r["wall_time_s"] for r in rows]
    assert all(b >= a for a, b in zip(walls, walls[1:], strict=False))
    # The rows' wall_time_s is the training clock; the summary has it as train_time_s, and
    # its wall_time_s is the whole call's (data, compilation, evaluation, checkpoints too).
    assert summary["train_time_s"] == pytest.approx(walls[-1])
    assert summary["wall_time_s"] > summary["train_time_s"] + summary["compile_time_s"]

    measured = [r for r in rows if "g_sq" in r]
    expected = [s for s in range(1, config.num_steps + 1) if (s - 1) % config.gns_every == 0]
    assert [r["step"] for r in measured] == expected
    for r in measured:
        assert math.isfinite(r["g_sq"]) and math.isfinite(r["trace_cov"])
        # An estimate is +inf (null in the strict JSON file) exactly when its g_sq is not
        # positive (gradient not resolved above the noise at this batch size), raw or smoothed.
        assert (r["b_simple"] is not None) == (r["g_sq"] > 0)
        assert (r["ema_b_simple"] is not None) == (r["ema_g_sq"] > 0)
        if r["g_sq"] > 0:
            assert r["b_simple"] == pytest.approx(r["trace_cov"] / r["g_sq"], rel=1e-5)
        if r["ema_g_sq"] > 0:
            assert r["ema_b_simple"] == pytest.approx(r["ema_trace_cov"] / r["ema_g_sq"], rel=1e-5)
    assert np.mean([r["b_simple"] is not None for r in measured]) > 0.5
    assert np.mean([r["ema_b_simple"] is not None for r in measured]) > 0.8
    assert measured[0]["ema_g_sq"] == pytest.approx(measured[0]["g_sq"])  # bias-corrected EMA

    evals = [r for r in rows if "test_accuracy" in r]
    assert [r["step"] for r in evals] == list(range(20, config.num_steps + 1, 20))

    # noise_scale: ratio of means of the logged per-step statistics, inside its interval.
    ns = summary["noise_scale"]
    g = np.array([r["g_sq"] for r in measured])
    t = np.array([r["trace_cov"] for r in measured])
    assert ns["num_measurements"] == len(measured)
    assert ns["b_simple"] == pytest.approx(t.mean() / g.mean(), rel=1e-6)
    assert 0 < ns["b_simple"] < math.inf
    lo, hi = ns["interval"]
    assert lo <= ns["b_simple"] <= hi
    # recent: the ratio of means over the last recent_window measurements, where they start.
    k = smoothing.recent_window(len(measured))
    assert ns["recent"]["num_measurements"] == k
    assert ns["recent"]["from_step"] == measured[-k]["step"]
    assert ns["recent"]["b_simple"] == pytest.approx(t[-k:].mean() / g[-k:].mean(), rel=1e-6)


@pytest.mark.timeout(240)
def test_smoke_run_tensorboard_files_hold_the_rows_and_files_are_readable(smoke_run):
    _, workdir, _ = smoke_run
    _, _, rows = strict_outputs(workdir)
    got = read_scalars(workdir)
    for key in ("train_loss", "test_accuracy", "b_simple", "ema_b_simple", "learning_rate"):
        tag = events.STEP_TAGS.get(key, "test/accuracy")
        assert got[tag] == [(r["step"], float(np.float32(r[key]))) for r in rows
                            if r.get(key) is not None], key  # fmt: skip
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(workdir):  # files as open() makes them: the umask decides
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.timeout(240)
def test_the_plots_are_written_before_the_summary_that_marks_the_run_done(smoke_run):
    """A run killed between the two is finished again (plots included), not taken as done."""
    _, workdir, _ = smoke_run
    done = os.stat(os.path.join(workdir, "summary.json")).st_mtime_ns
    for name in ("training.png", "noise_scale.png"):
        assert os.stat(os.path.join(workdir, name)).st_mtime_ns <= done
    assert not [f for f in os.listdir(workdir) if f.startswith(download.TEMP_PREFIX)]


@pytest.mark.timeout(240)
def test_rerunning_a_finished_run_says_already_complete(smoke_run, caplog):
    config, workdir, summary = smoke_run
    summary_path = os.path.join(workdir, "summary.json")
    before = os.stat(summary_path).st_mtime_ns
    with caplog.at_level("INFO"):
        again = train.train_and_evaluate(config, workdir)
    assert again == summary
    assert "is already complete (num_steps at step 60)" in caplog.text
    assert os.stat(summary_path).st_mtime_ns == before  # not evaluated or written again
    with open(summary_path, "w") as f:  # torn: the run is finished again from its checkpoint
        f.write('{"steps": 6')
    assert train.train_and_evaluate(config, workdir)["steps"] == summary["steps"]
    assert runlog.read_json(summary_path)["steps"] == summary["steps"]


@pytest.mark.timeout(240)
def test_stops_at_target_and_at_wall_time_budget(tmp_path):
    s = train.train_and_evaluate(
        mlp_config(num_steps=100, eval_every=5, target_accuracy=0.0, plots=False),
        str(tmp_path / "t"),
    )
    rows = runlog.read_jsonl(str(tmp_path / "t" / "metrics.jsonl"))
    assert (s["stop_reason"], s["steps"], s["steps_to_target"]) == ("target_accuracy", 5, 5)
    assert rows[-1]["step"] == 5 and s["time_to_target_s"] == rows[-1]["wall_time_s"]
    assert s["eval_time_s"] > 0

    s = train.train_and_evaluate(
        mlp_config(num_steps=100, max_wall_time_s=1e-9, plots=False), str(tmp_path / "w")
    )
    rows = runlog.read_jsonl(str(tmp_path / "w" / "metrics.jsonl"))
    assert (s["stop_reason"], s["steps"], s["steps_to_target"]) == ("max_wall_time_s", 1, None)
    assert [r["step"] for r in rows] == [1]


@pytest.mark.timeout(240)
def test_stops_where_the_trailing_mean_of_evaluations_reaches_the_target(tmp_path):
    # Target 0: every evaluation reaches it, so the raw target would stop at the first one
    # (step 5, as above); the mean of 3 needs 3 evaluations.
    workdir = str(tmp_path / "t")
    config = mlp_config(num_steps=100, eval_every=5, target_accuracy=0.0, target_window=3,
                        plots=False)  # fmt: skip
    s = train.train_and_evaluate(config, workdir)
    _, _, rows = strict_outputs(workdir)
    evals = [r for r in rows if "test_accuracy" in r]
    means = [
        sum(a["test_accuracy"] for a in evals[i - 3 : i]) / 3 for i in range(3, len(evals) + 1)
    ]
    hit = evals[next(i for i, m in enumerate(means) if m >= 0.0) + 2]  # recomputed from rows
    assert (s["stop_reason"], s["steps_to_target"], s["steps"]) == ("target_accuracy", 15, 15)
    assert hit is rows[-1] and hit["step"] == 15 and hit["stop_reason"] == "target_accuracy"
    assert s["time_to_target_s"] == hit["wall_time_s"]
    assert [r["step"] for r in evals] == [5, 10, 15]


# ---------------------------------------------------------------------------------------------
# Resume: N steps, then 2N in the same workdir (with a Ctrl-C in between), equals an
# uninterrupted 2N-step run.


def interrupt_at(monkeypatch, step):
    """Send SIGINT (a real Ctrl-C) to this process when the run reaches ``step``."""
    advance = runlog.RunLog.advance

    def advance_and_interrupt(self, batch_size):
        advance(self, batch_size)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runlog.RunLog, "advance", advance_and_interrupt)


@pytest.mark.timeout(300)
def test_resume_after_a_finished_run_and_ctrl_c_at_random_steps_matches_uninterrupted_run(
    tmp_path, monkeypatch
):
    """A finished run of n steps, continued to 20 with Ctrl-C at two random steps (rows every
    3 steps, checkpoints every 5): each leg ends with a row at the step of its exit checkpoint,
    and the resumed run ends where an uninterrupted one does, in the same state (bitwise)."""
    n = 8
    common = dict(num_steps=20, log_every=3, gns_every=4, eval_every=10, checkpoint_every=5,
                  plots=False)  # fmt: skip
    resumed, fresh = str(tmp_path / "resumed"), str(tmp_path / "fresh")
    train.train_and_evaluate(mlp_config(**{**common, "num_steps": n}), resumed)
    assert _restored_state(resumed)[0] == n
    stops = sorted(int(k) for k in np.random.default_rng(0).choice(np.arange(n + 1, 20), 2, False))
    for k in stops:
        with monkeypatch.context() as m:
            interrupt_at(m, k)
            with pytest.raises(KeyboardInterrupt):
                train.train_and_evaluate(mlp_config(**common), resumed)
        _, summary, rows = strict_outputs(resumed)
        assert rows[-1]["step"] == k == _restored_state(resumed)[0] == summary["steps"]
        assert (rows[-1]["stop_reason"], summary["stop_reason"]) == ("interrupted",) * 2
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    s_r = train.train_and_evaluate(mlp_config(**common), resumed)
    s_f = train.train_and_evaluate(mlp_config(**common), fresh)
    rows_r, rows_f = strict_outputs(resumed)[2], strict_outputs(fresh)[2]
    steps_r, steps_f = [r["step"] for r in rows_r], [r["step"] for r in rows_f]
    assert steps_r == sorted(set(steps_f) | set(stops) | {n})  # unique, ordered
    by_step = {r["step"]: r for r in rows_r}
    before_r = dict(zip(steps_r[1:], steps_r[:-1], strict=True))
    for prev, r in zip([0, *steps_f], rows_f, strict=False):  # same trajectory and measurements
        keys = ["g_sq", "trace_cov", "ema_b_simple", "test_accuracy", "examples_seen"]
        if before_r.get(r["step"], 0) == prev:  # the row's steps are the same: same means
            keys += ["train_loss", "train_accuracy"]
        for key in keys:
            assert by_step[r["step"]].get(key) == r.get(key), (r["step"], key)
    for key in ("steps", "examples", "test_accuracy", "best_step", "stop_reason"):
        assert s_r[key] == s_f[key], key
    assert s_r["noise_scale"]["num_measurements"] == s_f["noise_scale"]["num_measurements"] == 5

    (step_r, state_r), (step_f, state_f) = _restored_state(resumed), _restored_state(fresh)
    assert step_r == step_f == 20
    chex.assert_trees_all_equal(state_r["params"], state_f["params"])
    chex.assert_trees_all_equal(state_r["opt_state"], state_f["opt_state"])
    chex.assert_trees_all_equal(state_r["gns"], state_f["gns"])


@pytest.mark.timeout(240)
def test_ctrl_c_during_the_evaluation_that_reaches_the_target(tmp_path, monkeypatch):
    config = mlp_config(num_steps=100, eval_every=5, log_every=1, target_accuracy=0.0)
    config.plots = False
    workdir = str(tmp_path)
    evaluate = train._evaluate

    def interrupted_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the target evaluation runs
        return evaluate(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train, "_evaluate", interrupted_evaluate)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, workdir)
    _, s, rows = strict_outputs(workdir)
    assert (s["stop_reason"], s["steps"], s["steps_to_target"]) == ("interrupted", 5, 5)
    assert _restored_state(workdir)[0] == 5 and rows[-1]["test_accuracy"] is not None
    s = train.train_and_evaluate(config, workdir)  # resume: the target is already reached
    assert (s["stop_reason"], s["steps"], s["steps_to_target"]) == ("target_accuracy", 5, 5)
    assert [r["step"] for r in strict_outputs(workdir)[2]] == [1, 2, 3, 4, 5]
    assert s["time_to_target_s"] == rows[-1]["wall_time_s"]


@pytest.mark.timeout(120)
def test_ctrl_c_during_compilation_exits_cleanly(tmp_path):
    """A real SIGINT to the command while it compiles: exit 130, no traceback or crash."""
    workdir = str(tmp_path / "w")
    cmd = [sys.executable, "-m", "experiments.cifar10", "--config=configs/cifar10.py:smoke",
           "--config.data.source=synthetic", "--config.data.synthetic.image_size=16",
           "--config.model.name=mlp", "--config.model.widths=(16,)", "--config.plots=False",
           f"--workdir={workdir}"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    err = []
    for line in proc.stderr:
        err.append(line)
        if "Compiling the training steps" in line:
            proc.send_signal(signal.SIGINT)
            break
    err += proc.stderr.readlines()
    assert proc.wait(timeout=60) == cli.EXIT_INTERRUPTED, "".join(err)
    assert "Traceback" not in "".join(err) and "interrupted:" in err[-1]
    _, summary, rows = strict_outputs(workdir)
    last = rows[-1]["step"] if rows else 0  # 0 unless the signal came after the compilation
    assert (summary["stop_reason"], summary["steps"]) == ("interrupted", last)
    assert last == 0 or _restored_state(workdir)[0] == last


# ---------------------------------------------------------------------------------------------
# What a run refuses: a resume with another config, a second run, a bad config, divergence.


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 16), ("learning_rate", 1e-2), ("seed", 1), ("data.num_train", 256),
     ("model.widths", (4, 8)), ("schedule", "cosine"), ("target_window", 3)],
)  # fmt: skip
def test_resume_with_a_different_config_stops(smoke_run, field, value):
    config, workdir, _ = smoke_run
    names = ("config.json", "metrics.jsonl", "summary.json")
    before = {n: open(os.path.join(workdir, n)).read() for n in names}
    changed = mlp_config(num_steps=config.num_steps, eval_every=config.eval_every)
    changed.update_from_flattened_dict({field: value})
    with pytest.raises(UserError) as e:
        train.train_and_evaluate(changed, workdir)
    message = str(e.value)
    assert f"{field}: " in message and "\n" not in message  # cosine: num_steps counts too
    assert "another --workdir" in e.value.hint and workdir in e.value.hint
    assert {n: open(os.path.join(workdir, n)).read() for n in names} == before


@pytest.mark.timeout(120)
def test_resume_on_another_number_of_devices_stops(smoke_run, monkeypatch):
    """The smoke run trained on every device (4 simulated); the same command on 1 device is
    refused before anything is written (summary.json would report only the new mesh)."""
    config, workdir, summary = smoke_run
    if summary["mesh"]["devices"] == 1:
        pytest.skip("needs several devices (tests/conftest.py simulates 4)")
    names = ("config.json", "metrics.jsonl", "summary.json")
    before = {n: open(os.path.join(workdir, n)).read() for n in names}
    make_mesh = mesh_lib.make_mesh
    monkeypatch.setattr(mesh_lib, "make_mesh", lambda num_devices=None: make_mesh(1))
    with pytest.raises(UserError, match=f"devices: {summary['mesh']['devices']} -> 1"):
        train.train_and_evaluate(
            mlp_config(num_steps=config.num_steps, eval_every=config.eval_every), workdir
        )
    assert {n: open(os.path.join(workdir, n)).read() for n in names} == before


@pytest.mark.timeout(120)
def test_resume_on_other_data_behind_the_same_config_stops(smoke_run, monkeypatch):
    """The same config, other images (an archive replaced at the same path): refused, naming
    the data's fingerprint, before anything is written."""
    config, workdir, summary = smoke_run
    names = ("config.json", "metrics.jsonl", "summary.json")
    before = {n: open(os.path.join(workdir, n)).read() for n in names}
    load = data.load
    monkeypatch.setattr(data, "load", lambda cfg: dataclasses.replace(
        load(cfg), train_images=load(cfg).train_images[::-1]))  # fmt: skip
    old = summary["data"]["fingerprint"]
    with pytest.raises(UserError, match=f"data.fingerprint: '{old}' -> '[0-9a-f]{{16}}'"):
        train.train_and_evaluate(
            mlp_config(num_steps=config.num_steps, eval_every=config.eval_every), workdir
        )
    assert {n: open(os.path.join(workdir, n)).read() for n in names} == before


@pytest.mark.timeout(60)
def test_a_second_run_in_the_workdir_stops_naming_the_first(tmp_path):
    workdir = str(tmp_path / "w")
    read, write = os.pipe()
    with warnings.catch_warnings():  # JAX's warning on fork: the child only takes the lock
        warnings.simplefilter("ignore", RuntimeWarning)
        holder = os.fork()  # another process (no new interpreter to import JAX into)
    if holder == 0:
        try:
            with runlog.workdir_lock(workdir):
                os.write(write, b"held")
                time.sleep(60)
        finally:
            os._exit(0)
    try:
        os.close(write)
        assert os.read(read, 4) == b"held"
        with pytest.raises(UserError, match=f"another run \\(pid {holder}\\)"):
            train.train_and_evaluate(tiny_config(num_steps=5), workdir)
        assert os.listdir(workdir) == [runlog.LOCK_FILE]  # nothing written
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os.close(read)


@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", 0.0), ("learning_rate", -1e-3), ("learning_rate", math.nan),
     ("learning_rate", math.inf), ("batch_size", 1), ("optimizer", "rmsprop"),
     ("schedule", "linear"), ("model.name", "vgg"), ("gns_method", "bogus"),
     ("divergence_factor", 0.5), ("num_steps", 0), ("target_accuracy", 1.5),
     ("target_window", 0)],
)  # fmt: skip
def test_bad_config_stops_before_anything_is_written(tmp_path, field, value):
    config = tiny_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(UserError, match=f"^config.{field}=") as e:
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert f"--config.{field}=" in e.value.hint
    assert not os.path.exists(tmp_path / "w")


def test_microbatches_that_auto_resolves_to_are_checked_before_the_run(tmp_path):
    """gns_method='auto' on one device and a BatchNorm model resolves to the microbatch
    estimator, whose microbatches must divide the batch: one line naming the field, not a
    reshape error."""
    config = tiny_config(gns_microbatches=3, num_devices=1, **{"model.name": "resnet",
                         "model.stage_sizes": (1,), "model.num_filters": 4})  # fmt: skip
    assert config.gns_method == "auto" and config.batch_size % 3
    with pytest.raises(UserError, match="^config.gns_microbatches=3 must be >= 2, divide") as e:
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert e.value.hint == "set it on the command line: --config.gns_microbatches=..."


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "lr, why",
    # inf on one device; nan when the devices' losses (inf and nan) are averaged.
    [(1e38, "the training loss is (inf|nan)"), (1e6, "exceeds 10 x the initial")],
    ids=["non_finite", "exploding"],
)
def test_divergence_stops_with_a_one_line_error(tmp_path, capsys, lr, why):
    # The smoke config's Adam: the rate is a value of the state, so these runs use the steps
    # the smoke run compiled (the compilation cache of tests/conftest.py).
    config = mlp_config(num_steps=40, log_every=5, learning_rate=lr)
    config.plots = False
    main = cli.main(lambda argv: train.train_and_evaluate(config, str(tmp_path)))
    with pytest.raises(SystemExit) as e:
        main(["cifar10"])
    assert e.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: training diverged at step"), err
    assert re.search(why, err[0]) and "lower config.learning_rate" in err[1]
    _, summary, rows = strict_outputs(str(tmp_path))
    assert (summary["stop_reason"], rows[-1]["stop_reason"]) == ("diverged", "diverged")
    assert summary["steps"] == rows[-1]["step"] < config.num_steps
    measured = [r for r in rows if "g_sq" in r]
    used = [r for r in measured if r["g_sq"] is not None and r["trace_cov"] is not None]
    ns = summary["noise_scale"]
    assert (ns["num_measurements"], ns["num_dropped"]) == (len(used), len(measured) - len(used))
    if lr == 1e38:
        assert ns["num_dropped"] >= 1 and rows[-1]["train_loss"] is None  # inf -> null


@pytest.mark.parametrize(
    "g_sq, needle",
    [([1.0, None, None, None], "3 of 4 noise-scale measurements are not finite"),
     ([1.0, -1.0, -2.0, 0.0], "3 of 4 finite noise-scale measurements have g_sq <= 0"),
     ([1.0, -1.0, 2.0, 3.0], None),
     ([-1.0], None)],  # one step's estimate (a run interrupted after its first): not a finding
    ids=["overflow", "unresolved", "fine", "one"],
)  # fmt: skip
def test_null_noise_scale_values_are_warned(caplog, g_sq, needle):
    """Null noise-scale values (a run a huge divergence_factor lets go on) get a warning, in
    the log and in summary.json's warnings."""
    rows = [{"step": i, "g_sq": g, "trace_cov": 1.0} for i, g in enumerate(g_sq)]
    with caplog.at_level("WARNING"):
        ns = train.noise_scale_summary(rows)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert ns["num_dropped"] == sum(g is None for g in g_sq)
    assert [needle in w for w in warnings] == ([] if needle is None else [True]), warnings
    assert [needle in w for w in ns["warnings"]] == ([] if needle is None else [True])


# ---------------------------------------------------------------------------------------------
# The noise-scale step makes the same update as the plain step.


def _state_for(model, image_shape, optimizer, tracker, seed=0):
    """A TrainState with NumPy-random parameters (no flax initializer to compile)."""
    x = jnp.zeros((1,) + image_shape)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes["params"]
    )
    batch_stats = jax.tree.map(
        lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes.get("batch_stats", {})
    )
    return train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        gns=tracker.init(),
        rng=jax.random.PRNGKey(seed),
    )


def _independent_grads(model, params, batch_stats, batch, groups):
    """Gradient of the mean cross-entropy over `groups` equal groups, each normalizing over
    itself (BatchNorm in training mode), written with a Python loop."""

    def loss(p):
        total, new_stats = 0.0, []
        for images, labels in zip(
            np.split(batch["image"], groups), np.split(batch["label"], groups), strict=True
        ):
            if batch_stats:
                logits, upd = model.apply(
                    {"params": p, "batch_stats": batch_stats}, images, train=True,
                    mutable=["batch_stats"],
                )  # fmt: skip
                new_stats.append(upd["batch_stats"])
            else:
                logits = model.apply({"params": p}, images, train=True)
            total += optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return total / groups, new_stats

    grads, new_stats = jax.jit(jax.grad(loss, has_aux=True))(params)
    mean_stats = jax.tree.map(lambda *s: sum(s) / len(s), *new_stats) if new_stats else {}
    return grads, mean_stats


@pytest.mark.parametrize("kind, exact", [("constant", True), ("cosine", False)])
def test_the_rate_in_the_state_trains_as_the_rate_baked_into_the_optimizer(kind, exact):
    """The steps' optimizer runs at the schedule's shape and the state's ``learning_rate``
    scales its updates: the same trajectory as the optimizer built at the rate (bitwise with
    a constant schedule; warmup and cosine round the rate once more), and the row's rate."""
    c = tiny_config(optimizer="sgd", momentum=0.9, learning_rate=0.05, schedule=kind,
                    warmup_steps=0 if exact else 2)  # fmt: skip
    model, tracker = models.SmallCNN(widths=(4,), groups=2), smoothing.ema(0.9)
    shape, baked = train.make_schedule(c, 8, peak=1.0), train.make_schedule(c, 8)
    steps = [
        train.make_train_steps(
            model, train.make_optimizer(c, s), tracker, method="per_example", schedule=s
        )[0]
        for s in (shape, baked)
    ]
    state = _state_for(model, (8, 8, 3), train.make_optimizer(c, baked), tracker)
    a, b = state._replace(learning_rate=jnp.float32(c.learning_rate)), state
    rng = np.random.default_rng(2)
    for _ in range(4):
        batch = {"image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
                 "label": rng.integers(0, 10, 8).astype(np.int32)}  # fmt: skip
        (a, ma), (b, mb) = jax.jit(steps[0])(a, batch), jax.jit(steps[1])(b, batch)
        if exact:
            chex.assert_trees_all_equal(a.params, b.params)
        else:
            chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
        assert float(ma["learning_rate"]) == pytest.approx(float(mb["learning_rate"]), rel=1e-6)
        assert float(ma["train_loss"]) == pytest.approx(float(mb["train_loss"]), rel=1e-6)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "model, method",
    [
        (models.SmallCNN(widths=(4,), groups=2), "per_example"),
        (models.ResNet(stage_sizes=(1,), num_filters=4), "microbatch"),
    ],
    ids=["small_cnn-per_example", "resnet-microbatch"],
)
def test_gns_step_equals_plain_step(model, method):
    lr, k, batch_size, image_shape = 0.1, 2, 8, (8, 8, 3)
    optimizer = optax.sgd(lr)  # update = -lr * gradient
    tracker = smoothing.ema(0.9)
    state = _state_for(model, image_shape, optimizer, tracker)
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.normal(size=(batch_size,) + image_shape).astype(np.float32),
        "label": rng.integers(0, 10, batch_size).astype(np.int32),
    }
    plain_step, gns_step = train.make_train_steps(
        model, optimizer, tracker, method=method, num_microbatches=k
    )
    # No donation here: the same state goes into both steps.
    plain_state, plain_m = jax.jit(plain_step)(state, batch)
    gns_state, gns_m = jax.jit(gns_step)(state, batch)

    groups = k if models.has_batch_norm(model) else 1
    grads, new_stats = _independent_grads(model, state.params, state.batch_stats, batch, groups)
    expected = jax.tree.map(lambda p, g: p - lr * g, state.params, grads)
    tol = dict(rtol=2e-5, atol=2e-6)
    chex.assert_trees_all_close(plain_state.params, expected, **tol)
    chex.assert_trees_all_close(gns_state.params, expected, **tol)
    chex.assert_trees_all_close(gns_state.params, plain_state.params, **tol)
    chex.assert_trees_all_close(gns_state.batch_stats, plain_state.batch_stats, **tol)
    if groups > 1:
        chex.assert_trees_all_close(gns_state.batch_stats, new_stats, **tol)
    assert int(gns_state.step) == int(plain_state.step) == 1
    assert float(gns_m["train_loss"]) == pytest.approx(float(plain_m["train_loss"]), rel=1e-5)
    # The plain step leaves the tracker alone; the gns step's first EMA equals the raw stats.
    chex.assert_trees_all_equal(plain_state.gns, state.gns)
    assert int(gns_state.gns.count) == 1
    assert float(gns_m["ema_g_sq"]) == pytest.approx(float(gns_m["g_sq"]), rel=1e-6)
    g_sq, trace_cov = float(gns_m["g_sq"]), float(gns_m["trace_cov"])
    expected_b = trace_cov / g_sq if g_sq > 0 else math.inf  # +inf: g_sq not resolved
    assert float(gns_m["b_simple"]) == pytest.approx(expected_b, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Pieces.


def test_schedule_warmup_cosine_closed_form():
    c = tiny_config(learning_rate=0.4, warmup_steps=10, schedule="cosine")
    s = train.make_schedule(c, num_steps=110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.2)
    assert float(s(10)) == pytest.approx(0.4)
    assert float(s(60)) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-7)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-7)
    const = train.make_schedule(tiny_config(learning_rate=0.3), num_steps=50)
    assert float(const(0)) == float(const(49)) == pytest.approx(0.3)


def test_num_steps_from_epochs():
    assert train.resolve_num_steps(tiny_config(num_steps=7), 1000) == 7
    c = tiny_config(batch_size=128, num_epochs=2.5)
    assert train.resolve_num_steps(c, 1000) == math.ceil(2.5 * 1000 / 128)


def test_gns_method_resolution_and_errors():
    cnn, resnet = models.SmallCNN(), models.ResNet()
    assert train.resolve_gns_method(tiny_config(gns_method="auto"), cnn) == "per_example"
    assert train.resolve_gns_method(tiny_config(gns_method="auto"), resnet) == "microbatch"
    assert train.resolve_gns_method(tiny_config(gns_method="microbatch"), cnn) == "microbatch"
    with pytest.raises(ValueError, match="BatchNorm"):
        train.resolve_gns_method(tiny_config(gns_method="per_example"), resnet)
    # An unknown gns_method or optimizer: test_bad_config_stops_before_anything_is_written.


@pytest.mark.parametrize("name", rules.OPTIMIZERS)
def test_optimizers_decay_kernels_only(name):
    """With zero gradients, only weight decay moves parameters: kernels shrink, biases stay."""
    c = tiny_config(optimizer=name, weight_decay=0.1, learning_rate=0.5)
    opt = train.make_optimizer(c, optax.constant_schedule(0.5))
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(lambda: opt.update(zeros, opt.init(params), params))()
    assert float(jnp.max(updates["kernel"])) < 0
    chex.assert_trees_all_equal(updates["bias"], jnp.zeros(2))


def test_mode_dispatch_rejects_unknown_modes(tmp_path):
    from experiments import cifar10

    with pytest.raises(ValueError, match="config.mode='bogus'.*train"):
        cifar10.run(tiny_config(mode="bogus"), str(tmp_path))


def test_config_variants():
    assert "seed" not in cifar10_config.VARIANTS
    with pytest.raises(UserError, match="effnet_lamb"):
        cifar10_config.get_config("seed")  # an unknown variant names the known ones
    for arg in cifar10_config.VARIANTS:
        c = cifar10_config.get_config(arg)
        doc = getattr(cifar10_config, arg).__doc__
        assert f"configs/cifar10.py:{arg}" in doc and "python -m experiments.cifar10" in doc
        models.get_model(c.model, num_classes=10)  # every variant names a buildable model
    effnet = cifar10_config.get_config("effnet_lamb")
    assert (effnet.model.name, effnet.optimizer, effnet.batch_size, effnet.learning_rate) == (
        "efficientnet_b0", "lamb", 64, 1e-3,
    )  # fmt: skip
    assert cifar10_config.get_config("gpu").model.name == "resnet18"
    c = cifar10_config.get_config("cpu")
    c.batch_size = 256  # overridable
    c.max_wall_time_s = 60.0
    c.data.path = "/x.tar.gz"
    with pytest.raises(UserError, match="smoke"):
        cifar10_config.get_config("huge")


def test_windowed_band():
    # Constant ratio: centre and band collapse onto it.
    c, lo, hi = plots.windowed_band(np.full(30, 2.0), np.full(30, 10.0), window=10)
    assert np.isnan(c[0])  # one measurement: no band yet
    np.testing.assert_allclose(c[1:], 5.0)
    np.testing.assert_allclose(lo[1:], 5.0)
    np.testing.assert_allclose(hi[1:], 5.0)
    # Noisy series: the centre is the ratio of the window means, inside the band.
    rng = np.random.default_rng(0)
    g, t = 1.0 + 0.3 * rng.normal(size=50), 20.0 + 5 * rng.normal(size=50)
    c, lo, hi = plots.windowed_band(g, t, window=10)
    np.testing.assert_allclose(c[-1], t[-10:].mean() / g[-10:].mean())
    assert np.all(lo[1:] <= c[1:]) and np.all(c[1:] <= hi[1:])


# ---------------------------------------------------------------------------------------------
# The batch-size schedule's config (experiments/adaptive.py; its loop is tested in
# tests/test_adaptive.py): off by default, and then the rows are those of a fixed batch.


def test_fixed_batch_rows_carry_batch_size_and_learning_rate(smoke_run):
    config, workdir, _ = smoke_run
    rows = runlog.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert {r["batch_size"] for r in rows} == {config.batch_size}
    assert all(r["learning_rate"] == pytest.approx(config.learning_rate) for r in rows)
    assert not any("schedule_reason" in r for r in rows)


def test_adaptive_fields_of_the_variants_and_the_identity():
    for arg in cifar10_config.VARIANTS:
        c = cifar10_config.get_config(arg)
        assert not adaptive.enabled(c)
        cands = adaptive.candidates(c)
        assert cands == sorted(set(cands)) and all(b & (b - 1) == 0 for b in cands)
    assert adaptive.candidates(cifar10_config.get_config("cpu")) == [16, 32, 64, 128, 256]
    three = cifar10_config.get_config("cpu")
    three.num_devices = 3  # a power of two would split over none: 3 times the powers of two
    assert adaptive.candidates(three) == [24, 48, 96, 192]
    ident = train.run_identity(tiny_config().to_dict())
    assert "seeds" not in ident["adaptive"] and "candidates" in ident["adaptive"]
    # data.path is resolved: the same file from another directory is the same run.
    config = tiny_config().to_dict()
    config["data"]["path"] = os.path.join(os.getcwd(), "x", "..", "data.tar.gz")
    relative = copy.deepcopy(config)
    relative["data"]["path"] = "data.tar.gz"
    assert train.run_identity(config) == train.run_identity(relative)
    # num_devices=None and an explicit count: the same run (the devices are checked apart).
    assert train.run_identity(config) == train.run_identity(config | {"num_devices": 1})
    # A compare workdir moved elsewhere moves its pilot: the same run. Another pilot (its key,
    # the directory's name) is another run.
    moved = copy.deepcopy(config) | {"start_from": "/elsewhere/sweep/pilot/0123abcd/"}
    here = config | {"start_from": "/a/sweep/pilot/0123abcd"}
    assert train.run_identity(moved) == train.run_identity(here)
    other = config | {"start_from": "/a/sweep/pilot/4567ef01"}
    assert train.run_identity(other) != train.run_identity(here)
    # The candidates' step times are measured again by a compare re-run: not the identity.
    timed = copy.deepcopy(config)
    timed["adaptive"]["step_times"] = (0.1, 0.2)
    assert train.run_identity(timed) == train.run_identity(config)
    assert run.check_mode(tiny_config(mode="adaptive")) == "adaptive"


def test_a_sweep_config_given_to_the_training_main_says_what_it_runs(caplog):
    with caplog.at_level(logging.WARNING):
        assert run.check_mode(sweep_config.get_config("smoke")) == "train"
    assert "python -m experiments.sweep" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run.check_mode(tiny_config())
    assert not caplog.text


# ---------------------------------------------------------------------------------------------
# Devices and precision (the data-parallel tests are in tests/test_mesh.py).


@pytest.mark.parametrize(
    "field, value, message",
    [("dtype", "float16", "config.dtype='float16' is not one of float32, bfloat16"),
     ("num_devices", 0, "config.num_devices=0 must be an int >= 1"),
     ("num_devices", 5, "config.num_devices=5 is not available: this run sees 4 devices"),
     ("step_time_repeats", -1, "config.step_time_repeats=-1 must be an int >= 0")],
)  # fmt: skip
def test_bad_device_and_precision_fields_stop_before_anything_is_written(
    tmp_path, field, value, message
):
    if jax.device_count() != 4:
        pytest.skip("needs the 4 simulated devices of tests/conftest.py")
    config = tiny_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(UserError, match=re.escape(message)):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_a_run_that_did_not_learn_is_said_so():
    log, ds = types.SimpleNamespace(initial_loss=2.5), types.SimpleNamespace(num_classes=10)
    warn = train._learning_warnings
    assert "accuracy 9.8% is at chance (1/10 classes)" in warn(log, {"accuracy": 0.098}, {}, ds)[0]
    fell = warn(log, {"accuracy": 0.3}, {"loss": 2.6}, ds)[0]
    assert "did not fall: 2.5 at the first step, 2.6 at the end" in fell
    assert warn(log, {"accuracy": 0.3}, {"loss": 2.0}, ds) == []
    assert warn(log, {}, {}, object()) == []  # interrupted: nothing evaluated, nothing said
