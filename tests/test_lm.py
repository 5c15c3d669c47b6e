"""Tests of the language-model experiment: experiments/lm.py, experiments/tasks/text.py and the
``lm`` task of experiments/train.py, on a tiny Transformer and a small generated corpus."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import lm as lm_config
from experiments import cli, lm, models, runlog, tasks, train
from experiments.cli import UserError
from experiments.tasks import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    """The subprocesses' environment: with the session's compilation cache (conftest)."""
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 24 KB of repetitive Python-like text: learnable in tens of steps."""
    lines = [f"def f_{i % 37}(x):\n    return x * {i % 11} + {i % 5}\n\n" for i in range(700)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(lines))
    return str(path)


# Flags of a tiny run (also used on the command line).
TINY = {
    "batch_size": 8,
    "learning_rate": 3e-3,
    "warmup_steps": 5,
    "num_steps": 60,
    "eval_every": 20,
    "eval_examples": 64,
    "eval_batch_size": 64,
    "log_every": 10,
    "checkpoint_every": 20,
    "gns_every": 5,
    "progress_bar": False,
    "plots": False,
    "model.context": 16,
    "model.width": 16,
    "model.depth": 1,
    "model.num_heads": 2,
    "model.mlp_ratio": 2,
}


def tiny_config(corpus, **overrides):
    c = lm_config.get_config("smoke")
    c.data.path = corpus
    for key, value in {**TINY, **overrides}.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def _flags(corpus, **overrides):
    out = []
    for key, value in {**TINY, **overrides, "data.path": corpus}.items():
        if value is not None:
            out.append(f"--config.{key}={value}")
    return out


def _rows(workdir):
    return runlog.read_jsonl(os.path.join(workdir, runlog.METRICS_FILE))


def _params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, runlog.CHECKPOINT_DIR))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = restored.state
    return step, state["params"] if isinstance(state, dict) else state.params


# ---------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope="module")
def smoke_run(corpus, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    config = tiny_config(corpus, plots=True)
    summary = lm.run(config, workdir)
    return config, workdir, summary


@pytest.mark.timeout(120)
def test_smoke_run_learns_and_writes_the_outputs(smoke_run):
    config, workdir, summary = smoke_run
    rows = _rows(workdir)
    losses = [r["train_loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(256) - 1.0  # starts near chance (ln 256 = 5.5 nats)
    assert losses[-1] < losses[0] - 1.0, losses  # and learns the repetitive text
    # Noise-scale rows: steps 0, 5, 10, ... measure; their rows are at steps 1, 6, 11, ...
    measured = [r for r in rows if "g_sq" in r]
    assert [r["step"] for r in measured] == list(range(1, 61, 5))
    for r in measured:
        assert r["trace_cov"] > 0
        if r["g_sq"] > 0:
            assert r["b_simple"] == pytest.approx(r["trace_cov"] / r["g_sq"], rel=1e-5)
    evals = [r for r in rows if "test_loss" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    for r in evals:
        assert r["test_bits_per_byte"] == pytest.approx(r["test_loss"] / math.log(2))
    # Summary: the held-out metrics of the final evaluation, the corpus and the noise scale.
    assert summary["stop_reason"] == "num_steps" and summary["steps"] == 60
    assert summary["test_bits_per_byte"] == pytest.approx(summary["test_loss"] / math.log(2))
    assert summary["test_bits_per_byte"] < 6.0 < 8.0  # 8 bits: a uniform guess
    assert summary["best_test_bits_per_byte"] <= min(r["test_bits_per_byte"] for r in evals)
    assert summary["target_bits_per_byte"] is None and "target_accuracy" not in summary
    assert summary["data"]["kind"] == "file" and summary["data"]["path"] == config.data.path
    assert summary["noise_scale"]["num_measurements"] + summary["noise_scale"]["num_dropped"] == 12
    # On the mesh of every device (tests/conftest.py: 4): the noise scale comes free from the
    # devices' batches; on one device from per-example gradients.
    n = jax.device_count()
    assert summary["mesh"]["devices"] == n and summary["model"] == "transformer"
    assert summary["gns_method"] == ("across_devices" if n >= 2 else "per_example")
    ds = text.load(config.data, context=config.model.context)
    assert summary["test_examples"] == ds.num_eval_windows
    assert summary["epochs"] == pytest.approx(60 * 8 / ds.examples_per_epoch)
    assert os.path.exists(os.path.join(workdir, "training.png"))
    assert os.path.exists(os.path.join(workdir, "noise_scale.png"))


@pytest.mark.timeout(120)
def test_final_held_out_loss_equals_a_direct_computation(smoke_run):
    """The summary's test loss is the mean next-byte cross-entropy of the checkpointed params
    over every held-out window, computed here without the training code."""
    config, workdir, summary = smoke_run
    step, params = _params(workdir)
    assert step == 60
    ds = text.load(config.data, context=config.model.context)
    windows = text.eval_arrays(ds)
    model = models.get_model(config.model)

    @jax.jit
    def mean_loss(params, tokens, targets):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss = mean_loss(params, windows["tokens"], windows["targets"])
    assert summary["test_loss"] == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.timeout(120)
def test_target_bits_per_byte_stops_the_run_and_final_eval_cap(corpus, tmp_path):
    config = tiny_config(corpus, eval_every=10, target_bits_per_byte=7.5, final_eval_examples=32)
    summary = lm.run(config, str(tmp_path))
    rows = _rows(str(tmp_path))
    first = next(r for r in rows if "test_bits_per_byte" in r and r["test_bits_per_byte"] <= 7.5)
    assert summary["stop_reason"] == "target_bits_per_byte"
    assert summary["steps"] == summary["steps_to_target"] == first["step"] < 60
    assert summary["best_test_bits_per_byte"] <= 7.5  # a value in bits, not a negated score
    assert summary["test_examples"] == 32  # config.final_eval_examples


@pytest.mark.timeout(120)
def test_a_diverging_run_raises_diverged_with_a_null_final_metric(corpus, tmp_path):
    """The text task's summary is written, with null held-out keys, when training diverges."""
    config = tiny_config(corpus, learning_rate=1e6, eval_every=10)
    with pytest.raises(train.Diverged):
        lm.run(config, str(tmp_path))
    summary = runlog.read_json(os.path.join(str(tmp_path), train.SUMMARY_FILE))
    assert summary["stop_reason"] == "diverged"
    assert summary["test_loss"] is None and summary["test_bits_per_byte"] is None


# ---------------------------------------------------------------------------------------------
# Resume after SIGKILL.


# The main in a subprocess whose batches take at least 20 ms each (the data are unchanged), so
# that a kill lands mid-run however fast the steps are.
_SLOW_BOOT = (
    "import sys, time; "
    "from experiments import run; from experiments.tasks import text; "
    "batch = text.train_batch; "
    "text.train_batch = lambda *a, **k: (time.sleep(0.02), batch(*a, **k))[1]; "
    "run.start('configs/lm.py', argv=['experiments.lm', *sys.argv[1:]])"
)


@pytest.mark.timeout(180)
def test_resume_after_sigkill_matches_an_uninterrupted_run(smoke_run, corpus, tmp_path):
    """A run killed (SIGKILL) mid-way, past its first checkpoint, and re-run has every row
    once, in order, and ends with the parameters and held-out loss of the uninterrupted smoke
    run (same config)."""
    _, fresh, s_f = smoke_run
    killed = str(tmp_path / "killed")
    args = ["--config", "configs/lm.py:smoke", "--workdir", killed, "--config.plots=False"]
    cmd = [sys.executable, "-c", _SLOW_BOOT, *args, *_flags(corpus)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    metrics, t0 = os.path.join(killed, runlog.METRICS_FILE), time.monotonic()
    while time.monotonic() < t0 + 120 and proc.poll() is None:
        if os.path.exists(metrics) and any(r["step"] > 20 for r in _rows(killed)):
            break  # past the checkpoint of step 20
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()[1][-2000:]  # still running: kill it mid-way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "summary.json"))
    assert 20 < _rows(killed)[-1]["step"] < 60
    s_r = lm.run(tiny_config(corpus), killed)
    rows_r, rows_f = _rows(killed), _rows(fresh)
    steps = [r["step"] for r in rows_r]
    assert steps == [r["step"] for r in rows_f] == sorted(set(steps))  # contiguous and unique
    assert set(range(10, 61, 10)) <= set(steps) and steps[-1] == 60
    for a, b in zip(rows_r, rows_f, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6), a["step"]
        assert ("g_sq" in a) == ("g_sq" in b), a["step"]
        if "g_sq" in b:
            assert a["g_sq"] == pytest.approx(b["g_sq"], rel=1e-5), a["step"]
        assert a["examples_seen"] == b["examples_seen"] == a["step"] * 8
    jax.tree.map(np.testing.assert_array_equal, _params(killed)[1], _params(fresh)[1])
    assert s_r["test_loss"] == s_f["test_loss"] and s_r["steps"] == s_f["steps"] == 60


# ---------------------------------------------------------------------------------------------
# Bad corpora: one line, exit code 2, no traceback.


def _binary(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 40)
    return str(path)


def _empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    return str(path)


@pytest.mark.timeout(60)
def test_bad_corpus_is_one_line_and_exit_2(corpus, tmp_path, capsys):
    """The command on a binary corpus: one line and a hint, exit 2, nothing else on stderr (no
    library chatter); a missing and an empty corpus the same through the command's main."""
    path, workdir = _binary(tmp_path), tmp_path / "w"
    cmd = [sys.executable, "-m", "experiments.lm", "--config", "configs/lm.py:smoke",
           "--workdir", str(workdir), f"--config.data.path={path}"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=50)
    assert res.returncode == 2, res.stderr[-2000:]
    outputs = [(path, "is a binary file", workdir, res.stderr)]
    for i, (path, message) in enumerate(
        [(str(tmp_path / "missing.txt"), "does not exist"), (_empty(tmp_path), "empty corpus")]
    ):
        config, workdir = tiny_config(corpus), tmp_path / f"w{i}"
        config.data.path = path
        with pytest.raises(SystemExit) as e:
            cli.main(lambda argv, c=config, w=workdir: lm.run(c, str(w)))(["lm"])
        assert e.value.code == cli.EXIT_USER_ERROR
        outputs.append((path, message, workdir, capsys.readouterr().err))
    for path, message, workdir, err in outputs:
        error, hint = err.strip().splitlines()  # nothing else
        assert error.startswith("error: ") and message in error and path in error, err
        assert hint.startswith("hint: ")
        assert not workdir.exists()  # the data is read before the workdir is locked or written


# ---------------------------------------------------------------------------------------------
# Config and task units.


def test_config_is_the_lm_task_with_a_checked_target(corpus):
    config = tiny_config(corpus)
    assert tasks.get(config) is tasks.LM and config.task == "lm"
    train.validate_config(config)
    config.target_bits_per_byte = -1.0
    with pytest.raises(UserError, match="target_bits_per_byte=-1.0"):
        train.validate_config(config)
    config.target_bits_per_byte = 2.0
    config.eval_every = 0
    with pytest.raises(UserError, match=r"eval_every=0.*target_bits_per_byte"):
        train.validate_config(config)


def test_unknown_task_and_mode(corpus, tmp_path):
    config = tiny_config(corpus, task="speech")
    with pytest.raises(UserError, match="config.task='speech'"):
        tasks.get(config)
    with pytest.raises(UserError, match="mode='compare'"):
        lm.run(tiny_config(corpus, mode="compare"), str(tmp_path))


def test_lm_score_is_the_negated_bits_and_its_own_inverse():
    assert tasks.LM.score(2.5) == -2.5 and tasks.LM.score(tasks.LM.score(2.5)) == 2.5
    assert tasks.IMAGE.score(0.7) == 0.7 and tasks.LM.score(None) is None


def test_padded_batches_cover_every_example_once():
    arrays = {"tokens": np.arange(10 * 3).reshape(10, 3), "targets": np.arange(10 * 3)[:, None]}
    batches = list(tasks.padded_batches({**arrays, "targets": arrays["tokens"] + 1}, 4))
    assert [b["mask"].sum() for b in batches] == [4, 4, 2]
    assert all(b["tokens"].shape == (4, 3) for b in batches)
    real = np.concatenate([b["tokens"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(real, arrays["tokens"])
    assert not batches[-1]["tokens"][~batches[-1]["mask"]].any()  # zero padding


def test_split_batch_names_the_expected_keys():
    assert tasks.split_batch({"tokens": 1, "targets": 2}) == (1, 2)
    assert tasks.split_batch({"image": 1, "label": 2, "mask": 3}) == (1, 2)
    with pytest.raises(KeyError, match="tokens"):
        tasks.split_batch({"x": 1})


def test_summary_json_is_strict(smoke_run):
    _, workdir, _ = smoke_run
    with open(os.path.join(workdir, "summary.json")) as f:
        json.loads(f.read(), parse_constant=lambda name: pytest.fail(name))


def test_lm_task_streams_and_eval_arrays_are_the_corpus_windows(corpus):
    config = tiny_config(corpus, seed=3)
    ds = tasks.LM.load(config)
    stream = tasks.LM.train_batches(config, ds, 4, 12)  # examples 12-15, 16-19, ...
    try:
        first, second = next(stream), next(stream)
    finally:
        stream.close()
    both = text.train_batch(ds, 12, 8, seed=3)
    np.testing.assert_array_equal(
        np.concatenate([first["tokens"], second["tokens"]]), both["tokens"]
    )
    np.testing.assert_array_equal(first["targets"][:, :-1], first["tokens"][:, 1:])
    held_out = tasks.LM.eval_arrays(config, ds, "test", 5)
    np.testing.assert_array_equal(held_out["tokens"], text.eval_arrays(ds, 5)["tokens"])
    train_part = tasks.LM.eval_arrays(config, ds, "train", 6)
    np.testing.assert_array_equal(train_part["tokens"], text.train_batch(ds, 0, 6, 3)["tokens"])
    assert tasks.LM.input_spec(ds) == ((16,), np.int32)
    assert tasks.LM.num_train(ds) == len(ds.train) // 17
