"""Data-parallel training and mixed precision (experiments/mesh.py, experiments/train.py) on
the 4 simulated CPU devices of tests/conftest.py."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from test_estimate import reference
from test_train import _state_for, tiny_config

from configs import cifar10 as cifar10_config
from experiments import data, mesh, models, runlog, train
from experiments.cli import UserError
from gns import estimate, smoothing


def _params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, runlog.CHECKPOINT_DIR))
    restored = manager.restore(
        manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    return restored.state["params"]


@pytest.fixture(scope="module")
def one_and_four(tmp_path_factory):
    """The smoke training (tiny, synthetic) on a 1-device and a 4-device mesh, same global
    batch of 32; a plain step and a measured step (method 'auto') alternate. An MLP: its steps
    compile in a fraction of the CNN's (the convolutions on the mesh: the tests below)."""
    runs = {}
    for n in (1, 4):
        workdir = str(tmp_path_factory.mktemp(f"dev{n}"))
        config = tiny_config(num_steps=6, gns_every=2, log_every=1, eval_every=0, plots=False)
        config.model.update(name="mlp", widths=(32,))
        config.num_devices = n
        runs[n] = (workdir, train.train_and_evaluate(config, workdir))
    return runs


@pytest.mark.timeout(240)
def test_four_devices_train_like_one_device(one_and_four):
    (w1, s1), (w4, s4) = one_and_four[1], one_and_four[4]
    assert s1["mesh"]["devices"] == 1 and s4["mesh"]["devices"] == 4
    assert s4["mesh"]["hosts"] == 1 and s4["mesh"]["platform"] == "cpu"
    assert runlog.read_json(os.path.join(w4, "summary.json"))["mesh"] == s4["mesh"]
    assert (s1["gns_method"], s4["gns_method"]) == ("per_example", "across_devices")
    # The update does not depend on the estimator: the same parameters to float tolerance.
    p1, p4 = jax.device_get((_params(w1), _params(w4)))
    leaves = zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True)
    diff = max(float(np.max(np.abs(a - b))) for a, b in leaves)
    print(f"1 vs 4 devices, max |param difference| after 6 steps: {diff:.3g}")
    chex.assert_trees_all_close(p1, p4, rtol=1e-4, atol=1e-5)
    rows1 = runlog.read_jsonl(os.path.join(w1, "metrics.jsonl"))
    rows4 = runlog.read_jsonl(os.path.join(w4, "metrics.jsonl"))
    np.testing.assert_allclose(
        [r["train_loss"] for r in rows1], [r["train_loss"] for r in rows4], rtol=1e-5
    )
    assert s1["test_accuracy"] == pytest.approx(s4["test_accuracy"], abs=1 / 256)
    for r in rows4:  # across_devices: the per-device batch (8) against the global one (32)
        if "g_sq" in r:
            assert math.isfinite(r["g_sq"]) and math.isfinite(r["trace_cov"])


def _steps(model, method, k, mesh_, tracker, optimizer):
    plain, measured = train.make_train_steps(
        model, optimizer, tracker, method=method, num_microbatches=k, mesh=mesh_
    )
    return jax.jit(plain), jax.jit(measured)


def _four_devices_vs_microbatch_k4(model, state, batch, optimizer, tracker):
    """One measured step with across_devices on 4 devices against microbatch with k = 4 on
    one: the update, BatchNorm statistics, loss and accuracy of the one-device plain step with
    4 BatchNorm groups (that of the microbatch step: tests/test_train.py), and the noise
    statistics of the two-batch formulas over the 4 quarters of the batch (the independent
    reference that gns.estimate.microbatch equals: tests/test_estimate.py)."""
    four, one = mesh.make_mesh(4), mesh.make_mesh(1)
    _, gns4 = _steps(model, "across_devices", 8, four, tracker, optimizer)
    plain1, _ = _steps(model, "microbatch", 4, one, tracker, optimizer)
    s4, m4 = gns4(mesh.replicate(state, four), mesh.shard(batch, four))
    s1, m1 = plain1(mesh.replicate(state, one), mesh.shard(batch, one))
    for key in ("train_loss", "train_accuracy"):
        assert float(m4[key]) == pytest.approx(float(m1[key]), rel=1e-4, abs=1e-7), key
    chex.assert_trees_all_close(s4.params, s1.params, rtol=1e-5, atol=1e-6)
    # Each device's batch normalizes over itself: BatchNorm groups of 4 either way.
    chex.assert_trees_all_close(s4.batch_stats, s1.batch_stats, rtol=1e-5, atol=1e-6)
    loss_fn = train.make_loss_fn(model, state.batch_stats, None)
    indexed = {**batch, "index": np.arange(len(next(iter(batch.values()))))}
    g_sq, trace_cov, _, _ = reference(lambda p, b: loss_fn(p, b)[0], state.params, indexed, 4)
    assert float(m4["g_sq"]) == pytest.approx(sum(g_sq), rel=1e-4, abs=1e-7)
    assert float(m4["trace_cov"]) == pytest.approx(sum(trace_cov), rel=1e-4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "model",
    [models.SmallCNN(widths=(4,), groups=2), models.ResNet(stage_sizes=(1,), num_filters=4)],
    ids=["small_cnn", "resnet-batchnorm"],
)
def test_across_devices_is_the_default_and_equals_microbatch_k4_on_one_device(model):
    config = tiny_config(gns_method="auto")
    assert train.resolve_gns_method(config, model, num_devices=4) == "across_devices"
    with pytest.raises(UserError, match="at least 2 devices"):
        train.resolve_gns_method(tiny_config(gns_method="across_devices"), model, 1)

    optimizer, tracker = optax.sgd(0.1), smoothing.ema(0.9)
    state = _state_for(model, (8, 8, 3), optimizer, tracker)
    rng = np.random.default_rng(3)
    batch = {
        "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    _four_devices_vs_microbatch_k4(model, state, batch, optimizer, tracker)


@pytest.mark.parametrize("batch_size, why", [(2, "smaller than the 4 devices"),
                                             (30, "not divisible by the 4 devices")])  # fmt: skip
def test_global_batch_smaller_or_not_divisible_is_a_user_error(tmp_path, batch_size, why):
    config = tiny_config(batch_size=batch_size, gns_method="per_example")
    with pytest.raises(UserError, match=f"config.batch_size={batch_size} is {why}") as e:
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert "--config.batch_size=" in e.value.hint and "num_devices" in e.value.hint
    assert not os.path.exists(tmp_path / "w")
    mesh.check_batch(32, mesh.make_mesh(4))  # 8 per device: no error


def test_adaptive_candidate_not_divisible_by_the_devices_is_a_user_error(tmp_path):
    """A batch size of the schedule that does not split over the 4 devices stops the run
    before training, naming both numbers (it is not silently dropped from the schedule)."""
    if jax.device_count() != 4:
        pytest.skip("needs the 4 simulated devices of tests/conftest.py")
    config = tiny_config(gns_every=2, plots=False)
    config.adaptive.update(enabled=True, candidates=(6, 32), step_times=(1.0, 1.0))
    with pytest.raises(UserError, match=r"candidates=\(6, 32\): \[6\] do not split evenly over "
                       "the 4 devices") as e:  # fmt: skip
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert "num_devices" in e.value.hint
    assert not os.path.exists(tmp_path / "w" / runlog.CONFIG_FILE)
    assert not os.path.exists(tmp_path / "w" / runlog.METRICS_FILE)


def test_the_mesh_record_and_why_a_batch_does_not_split():
    four = mesh.make_mesh(4)
    rec = mesh.describe(four)
    assert (rec["devices"], rec["hosts"], rec["shape"], rec["kind"]) == (
        4, jax.process_count(), {mesh.AXIS: 4}, jax.devices()[0].device_kind,
    )  # fmt: skip
    assert mesh.split_reason(32, four) is None and mesh.split_reason(3, mesh.make_mesh(1)) is None
    assert mesh.split_reason(2, four) == "skipped: global batch 2 is smaller than the 4 devices"
    assert mesh.split_reason(6, four) == "skipped: global batch 6 is not divisible by the 4 devices"
    # The estimator's microbatches (ghost BatchNorm's groups) split every batch too.
    assert mesh.split_reason(16, four, groups=8) is None
    assert "batch 4 does not split into the 8 microbatches" in mesh.split_reason(4, four, groups=8)
    # The per-example estimator needs 2 examples on each device.
    assert mesh.split_reason(4, four, per_example=True) == (
        "skipped: per_example needs 2 examples on each of the 4 devices"
    )
    assert mesh.split_reason(8, four, per_example=True) is None
    # Nor a batch larger than the train set (a stream would repeat examples within it).
    assert mesh.split_reason(64, four, num_train=64) is None
    assert mesh.split_reason(128, four, num_train=64) == (
        "skipped: global batch 128 is larger than the 64 train examples"
    )


@pytest.mark.timeout(120)
def test_text_task_steps_on_four_devices_equal_one_device():
    """The language model's step (token batches, experiments.tasks) on the mesh: the same
    update and loss on 4 devices as on 1, and across_devices equals microbatch with k = 4."""
    model = models.TransformerLM(vocab_size=16, context=8, width=16, depth=1, num_heads=2)
    tokens = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    rng = np.random.default_rng(0)  # NumPy-random parameters: no initializer to compile
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    # SGD: Adam would blow up the float noise of the attention key bias (gradient 0).
    optimizer, tracker = optax.sgd(0.1), smoothing.ema(0.9)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
        opt_state=optimizer.init(params), gns=tracker.init(), rng=jax.random.PRNGKey(1),
    )  # fmt: skip
    batch = {
        "tokens": rng.integers(0, 16, (16, 8)).astype(np.int32),
        "targets": rng.integers(0, 16, (16, 8)).astype(np.int32),
    }
    _four_devices_vs_microbatch_k4(model, state, batch, optimizer, tracker)


# ---------------------------------------------------------------------------------------------
# Mixed precision.


@pytest.mark.timeout(120)
def test_bfloat16_statistics_within_one_percent_of_float32():
    """The fast path and vmap, chunked, with bfloat16 compute on float32 parameters (as in
    training) and on bfloat16 parameters too, against float32 (vmap: the paths agree to float
    rounding in float32, tests/test_ghost.py): one program for all five."""
    f32 = models.SmallCNN(widths=(8,), groups=4)
    bf16 = models.SmallCNN(widths=(8,), groups=4, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: f32.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    params = params["params"]
    images = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
    labels = (images[:, :, :, 0].mean(axis=(1, 2)) > 0).astype(np.int32)  # a learnable rule
    batch = {"image": images, "label": labels, "index": np.arange(32)}

    def stats(model, p, path):
        loss_fn = train.make_loss_fn(model, {}, None)
        s = estimate.per_example(loss_fn, p, batch, has_aux=True, method=path, chunk_size=16)[0]
        return s.g_sq, s.trace_cov

    @jax.jit
    def all_stats(p):
        p_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
        paths = ("ghost", "vmap")
        got = {path: [stats(bf16, p, path), stats(bf16, p_bf16, path)] for path in paths}
        return stats(f32, p, "vmap"), got

    ref, got = jax.device_get(all_stats(params))
    assert ref[0] > 0 and ref[1] > 0
    for path, (compute, both) in got.items():
        print(f"{path}: float32 {np.array(ref)}, bfloat16 compute {np.array(compute)}, "
              f"bfloat16 params {np.array(both)}")  # fmt: skip
        np.testing.assert_allclose(compute, ref, rtol=0.01, err_msg=path)
        np.testing.assert_allclose(both, ref, rtol=0.01, err_msg=path)


# ---------------------------------------------------------------------------------------------
# Data kept on the devices; the GPU study variant.


@pytest.mark.parametrize("stream", [dict(start_step=5), dict(start_example=100)],
                         ids=["steps", "examples"])  # fmt: skip
def test_device_batches_equal_the_host_pipeline(stream):
    """Gathered on the devices: the batches of the host pipeline, of the step stream and of
    the example stream (a changing batch size, experiments.adaptive)."""
    ds = data.load(tiny_config().data)
    four = mesh.make_mesh(4)
    dev = mesh.device_train_batches(ds, 32, mesh=four, seed=3, augment=True, **stream)
    for k in range(2):
        where = {"step": 5 + k} if "start_step" in stream else {"start_example": 100 + 32 * k}
        h, d = data.train_batch(ds, 32, seed=3, augment=True, **where), next(dev)
        assert d["image"].sharding.spec == jax.sharding.PartitionSpec(mesh.AXIS)
        np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])
        np.testing.assert_allclose(np.asarray(d["image"]), h["image"], rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(180)
def test_gpu_study_variant_on_cpu_with_a_tiny_resnet(tmp_path):
    c = cifar10_config.get_config("gpu_study")
    assert (c.mode, c.dtype, c.data.on_device, c.model.name) == (
        "compare", "bfloat16", True, "resnet18",
    )  # fmt: skip
    assert c.compare.baseline_batch_size == c.batch_size == 64
    c.mode = "train"
    c.model.stage_sizes, c.model.num_filters = (1,), 4
    c.num_epochs, c.num_steps, c.warmup_steps = None, 8, 0
    c.eval_every, c.gns_every, c.log_every, c.step_time_repeats = 4, 4, 4, 3
    c.plots = False
    tiny = tiny_config()
    c.data = tiny.data
    c.data.on_device = True
    s = train.train_and_evaluate(c, str(tmp_path))
    assert (s["dtype"], s["gns_method"], s["mesh"]["devices"]) == (
        "bfloat16", "across_devices", 4,
    )  # fmt: skip
    assert s["step_examples_per_s"] == pytest.approx(64 / s["step_time_s"])
    assert s["train_examples_per_s"] == pytest.approx(s["examples"] / s["train_time_s"])
    assert s["device_utilization"] == pytest.approx(
        s["train_examples_per_s"] / s["step_examples_per_s"]
    )
    assert 0 < s["device_utilization"] < 5 and math.isfinite(s["test_loss"])
