"""Tests of training with a changing batch size (experiments/adaptive.py, the example stream of
experiments/data.py) on a tiny config with synthetic data. The adaptive mode is the policy
comparison of experiments/compare.py: tests/test_compare.py runs it."""

import math
import os
import signal
import subprocess
import sys
from typing import Any, NamedTuple

import chex
import numpy as np
import pytest
from test_train import _restored_state, interrupt_at, tiny_config

from experiments import adaptive, data, runlog, train
from experiments.cli import UserError
from gns import scaling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def adaptive_config(**overrides):
    """tiny_config training with the schedule: from 8 to 32, constant lr 3e-3 tuned at 32. The
    model is a one-layer MLP: each batch size's steps quick to compile (the loop does not
    depend on the model)."""
    c = tiny_config(plots=False, log_every=1, gns_every=2, eval_every=10, **overrides)
    c.model.update(name="mlp", widths=(64,))
    c.adaptive.enabled = True
    c.adaptive.candidates = (8, 32)
    c.adaptive.step_times = (1.0, 1.0)  # flat: any positive noise scale favours 32
    c.adaptive.patience = 2
    return c


# ---------------------------------------------------------------------------------------------
# The example stream.


def test_example_stream_is_cut_by_any_batch_sizes_into_the_same_examples():
    n, seed = 40, 3
    sizes = [8, 8, 16, 4, 32, 12, 24, 16]  # 120 examples: 3 epochs, batches straddle them
    starts = np.cumsum([0] + sizes[:-1])
    draws = [
        data.train_draws(seed, b, n, start_example=int(s))
        for s, b in zip(starts, sizes, strict=True)
    ]
    whole = np.concatenate([d[0] for d in draws])
    idx, offsets, flips = data.train_draws(seed, sum(sizes), n, start_example=0)
    np.testing.assert_array_equal(whole, idx)
    for e in range(3):  # every example once per epoch, in the epoch's permutation
        np.testing.assert_array_equal(
            whole[e * n : (e + 1) * n], np.random.default_rng([seed, e]).permutation(n)
        )
    np.testing.assert_array_equal(np.concatenate([d[1] for d in draws]), offsets)
    np.testing.assert_array_equal(np.concatenate([d[2] for d in draws]), flips)


def test_example_stream_equals_the_step_stream_when_the_batch_divides_the_epoch():
    c = tiny_config()
    ds = data.load(c.data)
    by_step = data.train_batches(ds, 32, seed=1, start_step=5, augment=False)
    by_example = (
        data.train_batch(ds, 32, seed=1, start_example=start, augment=False)
        for start in range(5 * 32, 25 * 32, 32)
    )
    for _ in range(20):  # across an epoch boundary (16 steps per epoch)
        a, b = next(by_step), next(by_example)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    by_example.close()
    with pytest.raises(ValueError, match="exactly one"):
        data.train_batch(ds, 8, seed=0, step=0, start_example=0, augment=False)


# ---------------------------------------------------------------------------------------------
# The learning-rate multiplier and the host-side control.


class _State(NamedTuple):
    learning_rate: Any = 1.0
    schedule: Any = None


def test_the_schedule_and_its_rate_start_in_the_train_state():
    """The schedule's state and its starting rate go into the train state, whose rate scales
    the updates (tests/test_train.py: the rate in the state trains as the rate baked in)."""
    state = adaptive.with_schedule(adaptive_config(), _State())
    assert int(state.schedule.index) == 0  # the initial batch 8
    assert float(state.schedule.lr_multiplier) == 0.5  # sqrt(8/32): the initial batch 8, base 32
    assert float(state.learning_rate) == pytest.approx(0.5 * 3e-3, rel=1e-7)


def test_sgd_rule_starts_from_the_given_noise_scale_or_says_what_is_missing(tmp_path):
    config = adaptive_config()
    config.adaptive.lr_rule = "sgd"  # starts at 8, tuned at 32: the rate needs a noise scale
    with pytest.raises(UserError, match="starts at batch 8, not config.batch_size=32") as err:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "initial_noise_scale" in str(err.value) and "sweep measured" in err.value.hint
    assert not (tmp_path / "run").exists()  # said before anything is written
    config.adaptive.initial_noise_scale = 24.0
    state = adaptive.initial_state(config)
    lr = scaling.learning_rate("sgd", 3e-3, 32, 8, 24.0)[0]
    assert float(state.lr_multiplier) == pytest.approx(lr / 3e-3, rel=1e-6)
    assert float(state.lr_multiplier) == pytest.approx((1 + 24 / 32) / (1 + 24 / 8), rel=1e-6)


@pytest.mark.parametrize(
    "noise,reason,words",
    [(math.nan, "kept_nan", "nan"), (None, "kept_nan", "nan"), (math.inf, "kept_inf", "+inf"),
     (-3.0, "kept_nonpositive", "not positive")],
)  # fmt: skip
def test_unusable_noise_keeps_the_batch_and_says_why(noise, reason, words):
    config = adaptive_config()
    config.adaptive.patience = 1
    sched = adaptive.make_batch_schedule(config)
    policy = adaptive.ScheduledBatch(config, sched, eval_every_examples=0)
    new, fields = policy.update(adaptive.with_schedule(config, _State()), noise, step=7)
    assert (policy.batch_size(new), float(new.schedule.lr_multiplier)) == (8, 0.5)
    assert float(new.learning_rate) == pytest.approx(0.5 * 3e-3, rel=1e-7)
    assert fields == {"schedule_reason": reason}
    assert words in policy.log.last["reason"] and policy.log.last["step"] == 7
    grown, fields = policy.update(new, 100.0, step=9)  # a usable one: grows at once (patience 1)
    assert policy.batch_size(grown) == 32 and float(grown.schedule.lr_multiplier) == 1.0
    assert float(grown.learning_rate) == pytest.approx(3e-3, rel=1e-7)
    assert fields["schedule_change"]["new_batch_size"] == 32
    assert adaptive.schedule_from_rows([{"schedule_reason": reason}, fields]) == {
        "changes": [fields["schedule_change"]],
        "reason_counts": {reason: 1, "grew": 1},
    }


@pytest.mark.parametrize("candidates", [(), (32, 16), (8, 8, 16), (1, 8)])
def test_bad_candidates_are_a_user_error_before_training(tmp_path, candidates):
    config = adaptive_config()
    config.adaptive.candidates = candidates
    with pytest.raises(UserError, match="config.adaptive.candidates"):
        train.validate_config(config)
    with pytest.raises(UserError, match="config.adaptive.candidates"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_bad_adaptive_fields_are_user_errors(tmp_path):
    for field, value, match in [
        ("adaptive.step_times", (1.0,), "step_times has 1 entries"),
        ("adaptive.lr_rule", "cubic", "lr_rule"),
        ("gns_every", 0, "gns_every > 0"),
        ("adaptive.max_batch_size", 1024, "exceeds the 512 train examples"),
    ]:
        config = adaptive_config()
        if field == "adaptive.max_batch_size":
            config.adaptive.candidates = None
            config.adaptive.step_times = None
        *parents, last = field.split(".")
        (config[parents[0]] if parents else config)[last] = value
        with pytest.raises(UserError, match=match) as err:
            train.train_and_evaluate(config, str(tmp_path / last))
        if last == "max_batch_size":
            assert err.value.hint == "lower config.adaptive.max_batch_size"
    config = adaptive_config()
    config.adaptive.update(candidates=(8, 1024), step_times=None)  # given: the list is the fix
    with pytest.raises(UserError, match="candidate 1024 exceeds the 512") as err:
        train.train_and_evaluate(config, str(tmp_path / "given"))
    assert err.value.hint == "drop it from config.adaptive.candidates"


# ---------------------------------------------------------------------------------------------
# The loop: lazily compiled steps, rows, resume across a batch change.


def _scripted_noise(monkeypatch, values):
    """Feed the schedule ``values`` (one per update, the last one repeated) instead of the
    measured noise scale, so that the batch sizes a run visits are known."""
    update = adaptive.ScheduledBatch.update
    calls = []

    def scripted(self, state, noise, step):
        calls.append(step)
        return update(self, state, values[min(len(calls), len(values)) - 1], step)

    monkeypatch.setattr(adaptive.ScheduledBatch, "update", scripted)


@pytest.mark.timeout(300)
def test_each_batch_size_compiles_once_and_rows_carry_batch_and_lr(tmp_path, monkeypatch):
    config = adaptive_config(num_steps=12)
    a = config.adaptive
    a.candidates, a.step_times = (8, 16, 32), (2.0**1.5, 4.0, 2.0**2.5)  # t(B) = sqrt(B)
    a.margin, a.patience, a.allow_shrink = 0.0, 1, True
    # score (1 + N/B)·sqrt(B) is least at B = N: N = 16 -> 16, 64 -> 32, 4 -> 8, 64 -> 32.
    _scripted_noise(monkeypatch, [16.0, 64.0, 64.0, 4.0, 64.0])
    caches = []
    get = train.StepCache.get

    def recording_get(self, *args, **kwargs):
        if self not in caches:
            caches.append(self)
        return get(self, *args, **kwargs)

    monkeypatch.setattr(train.StepCache, "get", recording_get)
    summary = train.train_and_evaluate(config, str(tmp_path))
    rows = runlog.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    changes = [(r["step"], r["schedule_change"]["new_batch_size"]) for r in rows
               if "schedule_change" in r]  # fmt: skip
    assert changes == [(1, 16), (3, 32), (7, 8), (9, 32)]
    assert [c["new_batch_size"] for c in summary["schedule"]["changes"]] == [16, 32, 8, 32]
    assert summary["schedule"]["final_batch_size"] == rows[-1]["batch_size"] == 32
    assert len(caches) == 1 and set(caches[0].steps) == {8, 16, 32}  # each compiled once
    assert [r["step"] for r in rows] == list(range(1, summary["steps"] + 1))  # log_every=1
    seen = 0
    for r in rows:  # each step's batch: the size the last change set; lr = 3e-3·sqrt(B/32)
        seen += r["batch_size"]
        assert r["examples_seen"] == seen
        expected_b = [b for s, b in [(0, 8), *changes] if s < r["step"]][-1]
        assert r["batch_size"] == expected_b, r["step"]
        assert r["learning_rate"] == pytest.approx(3e-3 * math.sqrt(expected_b / 32), rel=1e-6)
    assert seen >= 12 * 32 > seen - rows[-1]["batch_size"]  # the budget is in examples
    assert summary["stop_reason"] == "num_steps" and summary["compile_time_s"] > 0
    evals = [r["examples_seen"] for r in rows if "test_accuracy" in r]
    assert len(evals) == 1 and evals[0] == seen  # every 512 examples (and at the end)


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_adaptive import adaptive_config
from experiments import runlog, train
advance = runlog.RunLog.advance
def advance_and_die(self, batch_size):
    advance(self, batch_size)
    if self.step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
runlog.RunLog.advance = advance_and_die
train.train_and_evaluate(adaptive_config(**{overrides!r}), {workdir!r})
"""


@pytest.mark.timeout(300)
def test_resume_across_a_batch_change_after_ctrl_c_and_sigkill(tmp_path, monkeypatch):
    """8 -> 32 after the measurement row of step 3; Ctrl-C at step 6, SIGKILL at step 10
    (checkpoints every 4 steps): the resumed run is the uninterrupted one, step for step."""
    common = dict(num_steps=12, checkpoint_every=4)
    resumed, fresh = str(tmp_path / "resumed"), str(tmp_path / "fresh")
    with monkeypatch.context() as m:
        interrupt_at(m, 6)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(adaptive_config(**common), resumed)
    rows = runlog.read_jsonl(os.path.join(resumed, "metrics.jsonl"))
    assert [r["batch_size"] for r in rows] == [8, 8, 8, 32, 32, 32]  # changed, then stopped
    assert _restored_state(resumed)[0] == 6

    script = _KILL_SCRIPT.format(
        tests=os.path.join(ROOT, "tests"), step=10, overrides=common, workdir=resumed
    )
    env = dict(os.environ, PYTHONPATH=ROOT)  # with the session's compilation cache (conftest)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    rows = runlog.read_jsonl(os.path.join(resumed, "metrics.jsonl"))
    assert rows[-1]["step"] == 9  # killed in step 10, before its row
    assert _restored_state(resumed)[0] == 8  # the rows after it are dropped on resume

    s_r = train.train_and_evaluate(adaptive_config(**common), resumed)
    s_f = train.train_and_evaluate(adaptive_config(**common), fresh)
    rows_r = runlog.read_jsonl(os.path.join(resumed, "metrics.jsonl"))
    rows_f = runlog.read_jsonl(os.path.join(fresh, "metrics.jsonl"))
    assert [r["step"] for r in rows_r] == list(range(1, s_f["steps"] + 1))  # each step once
    keys = ("examples_seen", "batch_size", "learning_rate", "train_loss", "g_sq", "ema_b_simple",
            "schedule_reason", "schedule_change", "test_accuracy")  # fmt: skip
    for a, b in zip(rows_r, rows_f, strict=True):
        for key in keys:
            assert a.get(key) == b.get(key), (a["step"], key)
    starts = [r["examples_seen"] - r["batch_size"] for r in rows_r]  # every example once
    assert starts == [0] + [r["examples_seen"] for r in rows_r[:-1]]
    for key in ("steps", "examples", "test_accuracy", "stop_reason"):
        assert s_r[key] == s_f[key], key
    (step_r, state_r), (step_f, state_f) = _restored_state(resumed), _restored_state(fresh)
    assert step_r == step_f == s_f["steps"]
    chex.assert_trees_all_equal(state_r["params"], state_f["params"])
    chex.assert_trees_all_equal(state_r["opt_state"], state_f["opt_state"])
    chex.assert_trees_all_equal(state_r["schedule"], state_f["schedule"])
    assert state_r["learning_rate"] == state_f["learning_rate"]


@pytest.mark.timeout(300)
def test_a_resume_decides_on_the_step_times_the_run_began_with(tmp_path, monkeypatch):
    """Timed before training (step_times None), the table is kept in step_times.json and in
    summary.json's schedule; a resume decides on it instead of timing again."""
    from gns import hardware

    def config():
        c = adaptive_config(num_steps=8)
        c.adaptive.step_times = None
        return c

    workdir = str(tmp_path / "run")
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config(), workdir)
    kept = runlog.read_json(os.path.join(workdir, train.STEP_TIMES_FILE))
    assert kept["candidates"] == [8, 32] and len(kept["step_times"]) == 2

    def no_timing(*a, **k):
        raise AssertionError("timed again on resume")

    monkeypatch.setattr(hardware, "interleaved_times", no_timing)
    s = train.train_and_evaluate(config(), workdir)
    assert s["schedule"]["step_times"] == kept["step_times"]
