"""Tests of experiments/tasks/: the registry, the example stream every task shares, the image
task's evaluation batches, the loss, and the synthetic teacher-student task end to end
(configs/teacher.py through experiments.train, on a CPU in seconds)."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import teacher as teacher_config
from experiments import data, rules, run, runlog, tasks, train
from experiments.cli import UserError
from experiments.tasks import teacher


def _configs(tmp_path) -> dict:
    """A tiny config of each task."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(b"line %d of the corpus\n" % i for i in range(200)))
    image = ml_collections.ConfigDict({"seed": 3, "data": {
        "source": "synthetic", "num_train": 40, "num_test": 12, "augment": True,
        "synthetic": {"image_size": 8, "num_classes": 4}}})  # fmt: skip
    lm = ml_collections.ConfigDict({"task": "lm", "seed": 3, "model": {"context": 8},
                                    "data": {"path": str(corpus)}})  # fmt: skip
    small = teacher_config.smoke()
    small.data.update(num_train=50, num_test=20)
    return {"cifar10": image, "lm": lm, "teacher": small}


def test_registry_names_keys_and_errors():
    assert set(tasks.TASKS) == {"cifar10", "lm", "teacher"}
    assert tasks.get(ml_collections.ConfigDict({"seed": 0})) is tasks.IMAGE  # no task field
    assert len({t.keys[0] for t in tasks.TASKS.values()}) == len(tasks.TASKS)  # split_batch
    assert tasks.split_batch({"features": 1, "label": 2}) == (1, 2)
    with pytest.raises(UserError, match="config.task='speech'.*no module experiments/tasks/"):
        tasks.get(ml_collections.ConfigDict({"task": "speech"}))
    # Another task's config with this task's name: the fields the task reads are missing.
    from configs import lm as lm_config

    config = lm_config.get_config("smoke")
    config.task, config.model.name = "teacher", "mlp"
    with pytest.raises(UserError, match=r"'teacher' task reads config.target_accuracy \(and"):
        rules.check(config, tasks.table(config))


@pytest.mark.parametrize("name", ["cifar10", "lm", "teacher"])
def test_example_stream_is_the_batches_of_batch_fn_and_resumes(tmp_path, name):
    config = _configs(tmp_path)[name]
    task = tasks.TASKS[name]
    ds = task.load(config)
    batch_fn = task.batch_fn(config, ds)
    stream = task.train_batches(config, ds, 6, 12, by_example=True)  # examples 12-17, 18-23...
    try:
        got = [next(stream) for _ in range(3)]
    finally:
        stream.close()
    whole = task.batch(config, ds, 18, 12)
    inputs, targets = task.keys
    for i, b in enumerate(got):
        np.testing.assert_array_equal(b[targets], batch_fn(6, 2 + i)[targets])
        np.testing.assert_array_equal(b[inputs], whole[inputs][6 * i : 6 * (i + 1)])
    assert task.input_spec(ds)[0] == got[0][inputs].shape[1:]
    with pytest.raises(ValueError, match="batch_size"):
        task.train_batches(config, ds, task.num_train(ds) + 1, 0)
    with pytest.raises(ValueError, match="start_example"):
        task.train_batches(config, ds, 6, -6)


def test_image_step_stream_is_the_data_step_stream(tmp_path):
    config = _configs(tmp_path)["cifar10"]
    ds = tasks.IMAGE.load(config)
    got = tasks.IMAGE.train_batches(config, ds, 8, 16)  # step 2 of batch 8
    want = data.train_batches(ds, 8, seed=3, start_step=2)
    for _ in range(6):  # past the end of the first epoch (5 steps): its tail is dropped
        a, b = next(got), next(want)
        np.testing.assert_array_equal(a["image"], b["image"])
    got.close()
    with pytest.raises(ValueError, match="not a multiple"):
        tasks.IMAGE.train_batches(config, ds, 8, 4)


@pytest.mark.parametrize("n", [23, 20])
def test_image_eval_batches_cover_the_arrays_in_order_normalized(tmp_path, n):
    config = _configs(tmp_path)["cifar10"]
    ds = tasks.IMAGE.load(config)
    arrays = {"image": ds.train_images[:n], "label": ds.train_labels[:n]}
    batches = list(tasks.IMAGE.eval_batches(ds, arrays, 10))
    assert [len(b["label"]) for b in batches] == [10] * -(-n // 10)  # padded to one shape
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == n and mask[:n].all()
    images = np.concatenate([b["image"] for b in batches])[mask]
    np.testing.assert_allclose(images, data.normalize(arrays["image"], ds.mean, ds.std))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask],
                                  arrays["label"])  # fmt: skip


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 7)])
def test_loss_is_the_mean_negative_log_likelihood_per_example(shape):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=shape)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    want = nll.reshape(shape[0], -1).mean(1)
    got = tasks.TEACHER.loss(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_teacher_data_is_a_function_of_its_seed_with_closed_form_limits():
    cfg = teacher_config.smoke().data
    a, b = teacher.generate(cfg), teacher.generate(cfg)
    assert teacher.describe(a) == teacher.describe(b)
    cfg.seed = 1
    assert (
        teacher.describe(teacher.generate(cfg))["fingerprint"] != teacher.describe(a)["fingerprint"]
    )
    assert 0 < a.bayes_loss < math.log(4)
    # A teacher of near-zero logits: uniform labels, its loss that of guessing.
    cfg.update(scale=1e-9, num_train=8000)
    flat = teacher.generate(cfg)
    assert flat.bayes_loss == pytest.approx(math.log(4), abs=1e-9)
    counts = np.bincount(flat.train["label"], minlength=4) / 8000
    np.testing.assert_allclose(counts, 0.25, atol=0.02)  # 4 standard errors


@pytest.mark.parametrize("variant", teacher_config.VARIANTS)
def test_teacher_config_passes_and_documents_every_field(variant):
    config = teacher_config.get_config(variant)
    rules.check(config, tasks.table(config))
    lines = rules.describe(config, tasks.table(config), teacher_config.__file__)
    assert not [ln for ln in lines if "(no rule)" in ln or "(no comment)" in ln]
    config.mode = "compare"
    with pytest.raises(UserError, match="not available for the 'teacher' task"):
        run.check_mode(config)
    config.mode, config.data.scale = "train", 0.0
    with pytest.raises(UserError, match=r"data\.scale=0\.0"):
        rules.check(config, tasks.table(config))


@pytest.mark.timeout(60)
def test_teacher_trains_from_chance_towards_the_bayes_loss(tmp_path):
    """configs/teacher.py:smoke, shortened: the student ends well below the loss of guessing
    (log 4) and cannot beat the teacher's expected loss by more than the test set's noise."""
    config = teacher_config.get_config("smoke")
    config.update(num_steps=120, eval_every=0, gns_every=10, checkpoint_every=0)
    summary = train.train_and_evaluate(config, str(tmp_path))
    bayes, chance = summary["data"]["bayes_loss"], summary["data"]["chance_loss"]
    assert chance == pytest.approx(math.log(4))
    assert bayes - 0.1 < summary["test_loss"] < bayes + 0.4 * (chance - bayes)
    assert summary["test_accuracy"] > 0.5  # chance: 0.25
    assert summary["noise_scale"]["num_measurements"] == 12


def test_training_and_evaluation_use_the_tasks_loss():
    """A task's ``loss`` is the loss of the training steps and of the evaluation: a task whose
    loss is 3x the cross-entropy trains on and reports 3x the loss of the same setup."""
    config = teacher_config.get_config("smoke")
    config.data.update(num_train=64, num_test=32)
    task = tasks.get(config)
    ds = task.load(config)
    tripled = task._replace(loss=lambda logits, targets: 3.0 * tasks.cross_entropy(logits, targets))
    out = []
    for t in (task, tripled):
        setup = train.build_setup(config, ds, t)
        state = setup.state  # on the mesh already; jit(plain_fn) does not donate it
        batch = next(setup.train_batches(int(config.batch_size), 0))
        _, metrics = jax.jit(setup.plain_fn)(state, batch)
        evaluated = setup.evaluate(state, t.eval_arrays(config, ds, "test", None))
        out.append((float(metrics["train_loss"]), float(evaluated["loss"])))
    np.testing.assert_allclose(np.array(out[1]), 3.0 * np.array(out[0]), rtol=1e-5)


# A task that is not in the repository: a noisy regression with a loss as its metric (lower is
# better), written as README's "Adding a task" says: this module and a config.
SINREG = '''
"""y = sin(2x) + N(0, noise^2): a regression with the squared error as its loss and metric."""
import hashlib
import numpy as np
from experiments import data
from experiments.rules import choice, count, real, tuple_of
from experiments.tasks.base import Task, split_subset

def load(config):
    rng = np.random.default_rng(config.data.seed)
    def split(n):
        x = rng.uniform(-2, 2, (n, 1)).astype(np.float32)
        noise = config.data.noise * rng.normal(size=n)
        return {"x": x, "y": (np.sin(2 * x[:, 0]) + noise).astype(np.float32)}
    return {"train": split(config.data.num_train), "test": split(256)}

TASK = Task(
    name="sinreg", keys=("x", "y"), metric="mse", lower_is_better=True, target_field="target_mse",
    load=load, num_train=lambda ds: len(ds["train"]["y"]),
    input_spec=lambda ds: ((1,), np.float32),
    batch=lambda config, ds, size, start: {k: v[data.train_draws(config.seed, size,
        len(ds["train"]["y"]), start_example=start)[0]] for k, v in ds["train"].items()},
    eval_arrays=lambda config, ds, split, n: split_subset(ds["train"], ds["test"], split, n),
    describe=lambda ds: {"fingerprint": hashlib.sha256(ds["train"]["x"].tobytes()).hexdigest()},
    loss=lambda out, y: (out[:, 0] - y) ** 2,
    metrics=lambda result: {"mse": result["loss"]},
    fields=(("task", choice("sinreg")), ("target_mse", real(0, open_lo=True).or_none),
            ("model.name", choice("mlp")), ("model.widths", tuple_of(count(1))),
            ("model.num_classes", count(1)), ("data.seed", count(0)),
            ("data.noise", real(0)), ("data.num_train", count(16))),
)
'''


def sinreg_config():
    from configs import common

    c = common.training()
    c.task, c.target_mse = "sinreg", 0.2
    c.update(batch_size=16, learning_rate=1e-2, num_steps=300, eval_every=25, eval_examples=256)
    c.update(checkpoint_every=0, progress_bar=False, plots=False)
    c.model = ml_collections.ConfigDict({"name": "mlp", "widths": (32,), "num_classes": 1})
    c.data = ml_collections.ConfigDict({"seed": 0, "noise": 0.3, "num_train": 2048})
    return c


@pytest.mark.timeout(240)
def test_a_new_task_is_a_module_and_a_config_and_the_sweep_runs_it_to_its_own_target(
    tmp_path, monkeypatch
):
    from configs import common
    from experiments import sweep

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "sinreg.py").write_text(SINREG)
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path / "pkg")])
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    monkeypatch.delitem(sys.modules, "experiments.tasks.sinreg", raising=False)
    config = sinreg_config()
    assert tasks.get(config).name == "sinreg"  # found by its name, nothing registered by hand
    bad = sinreg_config()
    bad.data.noise = -1.0
    with pytest.raises(UserError, match=r"config.data.noise=-1.0 must be a finite number >= 0"):
        train.validate_config(bad)  # its own rows, beside the training fields'
    summary = train.train_and_evaluate(config, str(tmp_path / "train"))
    assert summary["stop_reason"] == "target_mse" and summary["test_mse"] <= 0.2
    # The sweep: measured on the task, its trainings run to tradeoff.target as target_mse.
    c = common.measurement(sinreg_config())
    c.update(schedule="constant", gns_every=0)
    c.noise.pilot_steps = 40
    c.critical.num_checkpoints = 0
    c.throughput.update(min_batch_size=8, max_batch_size=64, warmup=1, repeats=2)
    c.tradeoff.update(batch_sizes=(16, 32), target=0.2, max_steps=300, eval_every_examples=400)
    result = sweep.run_sweep(c, str(tmp_path / "sweep"))
    points = result["tradeoff"]["points"]
    assert [p["batch_size"] for p in points] == [16, 32] and all(p["reached"] for p in points)
    for p in points:  # the first evaluation at or below the target: lower is better
        rows = runlog.read_jsonl(os.path.join(p["workdir"], runlog.METRICS_FILE))
        assert p["steps"] == next(r["step"] for r in rows if r.get("test_mse", 1) <= 0.2)


def test_batch_keys_need_both_keys_and_a_batch_the_data_cannot_take_writes_nothing(
    tmp_path, monkeypatch
):
    # A task with the teacher's input key and a target of its own is told apart by both keys.
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    tasks.TASKS["arms"] = tasks.TEACHER._replace(name="arms", keys=("features", "arm"))
    assert tasks.batch_keys({"features": 1, "arm": 2}) == ("features", "arm")
    assert tasks.batch_keys({"features": 1, "label": 2}) == ("features", "label")
    config = teacher_config.smoke()
    config.batch_size = 4096
    with pytest.raises(UserError, match="larger than the 2048 train examples"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # not claimed: another run may use it
