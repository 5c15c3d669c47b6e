"""The estimators with ``axis_name`` under ``jax.pmap`` and ``jax.shard_map`` on 4 devices.

Uses the 4 simulated CPU devices set by ``tests/conftest.py``. Every data-parallel result is
compared with an independent single-device computation on the concatenated (global) batch.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gns import common, estimate, parallel

N_DEV = 4
AXIS = "i"
LOCAL = 8  # examples per device
GLOBAL = N_DEV * LOCAL

pytestmark = [
    pytest.mark.skipif(
        jax.device_count() != N_DEV,
        reason=(
            f"needs {N_DEV} devices, found {jax.device_count()}: tests/conftest.py sets "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={N_DEV} before JAX starts; run "
            "with pytest from the repository root, and do not import JAX in an earlier plugin."
        ),
    ),
    pytest.mark.timeout(300),
]


# ---------------------------------------------------------------------------------------------
# A small 2-layer MLP in plain JAX (softmax cross-entropy, mean over the batch).


def init_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "hidden": {
            "kernel": 0.5 * jax.random.normal(k1, (5, 8)),
            "bias": 0.1 * jax.random.normal(k2, (8,)),
        },
        "out": {"kernel": 0.5 * jax.random.normal(k3, (8, 3)), "bias": jnp.zeros(3)},
    }


def loss_fn(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_batch(key, n=GLOBAL):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, 5)), jax.random.randint(ky, (n,), 0, 3)


@pytest.fixture(scope="module")
def problem():
    # One program for the parameters and the data, not op by op.
    return jax.jit(lambda k0, k1: (init_params(k0), make_batch(k1)))(
        jax.random.key(0), jax.random.key(1)
    )


def mesh_1d(n=N_DEV):
    return jax.make_mesh((n,), (AXIS,), devices=jax.devices()[:n])


# ---------------------------------------------------------------------------------------------
# Running a function f(params, local_batch) data-parallel; each returns the (replicated) output.


def run_pmap(f, params, batch, n=N_DEV):
    sharded = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    out = jax.pmap(f, axis_name=AXIS, in_axes=(None, 0), devices=jax.devices()[:n])(params, sharded)
    # Identical on every device: compare each device's copy with device 0's.
    for leaf in jax.tree.leaves(out):
        for d in range(1, n):
            np.testing.assert_array_equal(leaf[d], leaf[0])
    return jax.tree.map(lambda x: x[0], out)


def run_shard_map(f, params, batch, n=N_DEV, check_vma=True):
    mesh = mesh_1d(n)
    batch = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))
    # out_specs=P(): with check_vma=True, JAX checks the outputs are replicated (unvarying).
    fn = jax.shard_map(f, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=check_vma)
    return jax.jit(fn)(params, batch)


RUNNERS = {
    "pmap": run_pmap,
    "shard_map": run_shard_map,
    "shard_map_no_vma": functools.partial(run_shard_map, check_vma=False),
}


def assert_stats_close(
    got: estimate.NoiseStats, want: estimate.NoiseStats, rtol=2e-5, num_layers=4
):
    assert got.small_batch_size == want.small_batch_size
    assert got.big_batch_size == want.big_batch_size
    scale = float(abs(want.g_sq) + abs(want.trace_cov) / want.small_batch_size)
    close = functools.partial(np.testing.assert_allclose, rtol=rtol, atol=rtol * scale)
    close(got.g_sq, want.g_sq, err_msg="g_sq")
    close(got.trace_cov, want.trace_cov, err_msg="trace_cov")
    assert got.per_layer.keys() == want.per_layer.keys()
    assert len(got.per_layer) == num_layers
    for name, s in got.per_layer.items():
        close(s.g_sq, want.per_layer[name].g_sq, err_msg=f"{name} g_sq")
        close(s.trace_cov, want.per_layer[name].trace_cov, err_msg=f"{name} trace_cov")


# ---------------------------------------------------------------------------------------------
# Equality with one device.

# name -> (estimator on each device's shard, same estimator on one device over the global batch)
ESTIMATORS = {
    "per_example": (functools.partial(estimate.per_example, axis_name=AXIS), estimate.per_example),
    # 8 local examples in chunks of 3: two scanned chunks and a remainder of 2.
    "per_example_chunked": (
        functools.partial(estimate.per_example, chunk_size=3, axis_name=AXIS),
        estimate.per_example,
    ),
    # 2 microbatches of 4 per device = 8 microbatches of 4 over the global batch.
    "microbatch": (
        functools.partial(estimate.microbatch, num_microbatches=2, axis_name=AXIS),
        functools.partial(estimate.microbatch, num_microbatches=2 * N_DEV),
    ),
    # Each device's batch is one small batch: 4 microbatches of 8 over the global batch.
    "across_devices": (
        functools.partial(estimate.across_devices, axis_name=AXIS),
        functools.partial(estimate.microbatch, num_microbatches=N_DEV),
    ),
}


@functools.cache
def single_device():
    """Every one-device estimator of ``ESTIMATORS`` on ``loss_fn`` (by name), and ``jax.grad``,
    in one program compiled once for all the tests that compare with them."""
    return jax.jit(
        lambda p, b: ({n: e[1](loss_fn, p, b) for n, e in ESTIMATORS.items()},
                      jax.grad(loss_fn)(p, b))
    )  # fmt: skip


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_data_parallel_equals_single_device(problem, runner):
    """Each estimator of ``ESTIMATORS`` on the 4 devices' shards (all in one mapped program)
    equals its one-device counterpart on the global batch, and its grads are jax.grad's."""
    params, batch = problem
    got = RUNNERS[runner](
        lambda p, b: {n: e[0](loss_fn, p, b) for n, e in ESTIMATORS.items()}, params, batch
    )
    want, plain = single_device()(params, batch)
    for name, (stats, grads) in got.items():
        want_stats, want_grads = want[name]
        try:
            assert_stats_close(stats, want_stats)
            assert stats.big_batch_size == GLOBAL
            chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-7)
            chex.assert_trees_all_close(grads, plain, rtol=1e-5, atol=1e-7)
        except AssertionError as err:
            raise AssertionError(f"{name} under {runner}: {err}") from err


class TinyCNN(nn.Module):
    """Conv + GroupNorm + Dense: per_example takes its fast (ghost-norm) path for these."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
        x = nn.relu(nn.GroupNorm(num_groups=2)(x))
        return nn.Dense(3)(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("runner", ["shard_map"])  # where the cast matters (pmap: same code)
def test_per_example_flax_fast_path_equals_single_device_vmap(runner):
    model = TinyCNN()

    @jax.jit  # the data and the parameters in one program, not op by op
    def make_problem(key):
        kx, ky, kp = jax.random.split(key, 3)
        batch = jax.random.normal(kx, (16, 6, 6, 2)), jax.random.randint(ky, (16,), 0, 3)
        return model.init(kp, batch[0][:1])["params"], batch

    params, batch = make_problem(jax.random.key(2))

    def cnn_loss(p, b):
        logits = model.apply({"params": p}, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    stats, grads = RUNNERS[runner](
        lambda p, b: estimate.per_example(cnn_loss, p, b, axis_name=AXIS), params, batch
    )
    reference = jax.jit(lambda p, b: estimate.per_example(cnn_loss, p, b, method="vmap"))
    want_stats, want_grads = reference(params, batch)
    assert_stats_close(stats, want_stats, rtol=1e-4, num_layers=6)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-7)


def test_tuple_axis_name_on_2d_mesh(problem):
    """axis_name=('a', 'b') over a 2x2 mesh is one data-parallel axis of 4 devices."""
    params, batch = problem
    mesh = jax.make_mesh((2, 2), ("a", "b"))
    f = jax.shard_map(
        lambda p, b: estimate.per_example(loss_fn, p, b, axis_name=("a", "b")),
        mesh=mesh,
        in_specs=(P(), P(("a", "b"))),
        out_specs=P(),
    )
    stats, grads = jax.jit(f)(params, jax.device_put(batch, NamedSharding(mesh, P(("a", "b")))))
    want_stats, want_grads = single_device()(params, batch)[0]["per_example"]
    assert_stats_close(stats, want_stats)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The shard_map pitfall: gradients of replicated params are summed over the axis by JAX.


def _per_example_sq_norms(params, batch):
    """|g_i|² of each example, from a plain vmap of grad (no gns code)."""
    one = lambda p, x, y: loss_fn(p, (x[None], y[None]))
    grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, *batch)
    return sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads))


def test_shard_map_plain_grad_sums_per_example_grads_over_devices(problem):
    """Without a cast to varying, a per-example gradient under shard_map is the SUM over the 4
    devices of the gradients of the examples at the same local position (JAX transposes the
    implicit broadcast of the replicated params into a psum); estimate.per_example keeps them
    local: its mean |g_i|² matches one device."""
    params, batch = problem
    mesh = mesh_1d()
    sharded = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))

    # estimate.per_example under the same shard_map, in the same program.
    def naive_and_gns(p, b):
        return _per_example_sq_norms(p, b), estimate.per_example(loss_fn, p, b, axis_name=AXIS)[0]

    naive, stats = jax.jit(
        jax.shard_map(naive_and_gns, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(AXIS), P()))
    )(params, sharded)

    # The single-device per-example gradients, and their sums over devices at equal positions.
    @jax.jit
    def reference(p, b):
        one = lambda p, x, y: loss_fn(p, (x[None], y[None]))
        g = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(p, *b)
        summed = jax.tree.map(lambda a: a.reshape((N_DEV, LOCAL, -1)).sum(0), g)
        return _per_example_sq_norms(p, b), sum(
            jnp.sum(a**2, axis=1) for a in jax.tree.leaves(summed)
        )

    true_sq, summed_sq = (np.asarray(a) for a in reference(params, batch))
    naive = np.asarray(naive)
    np.testing.assert_allclose(naive, np.tile(summed_sq, N_DEV), rtol=1e-5)
    assert naive.mean() > 1.5 * true_sq.mean()  # inflated, not just noisy

    # gns: mean |g_i|² = g_sq + trace_cov (b = 1), that of one device, not the naive one.
    np.testing.assert_allclose(stats.g_sq + stats.trace_cov, true_sq.mean(), rtol=1e-5)
    wrong = naive.mean()
    assert abs(float(stats.g_sq + stats.trace_cov) - wrong) > 0.3 * wrong


def test_per_example_without_its_cast_is_wrong_or_refused(problem, monkeypatch):
    """Remove the cast inside gns: under shard_map the vmap path's statistics are inflated by
    the implicit sum, and the fast path's custom VJP no longer type-checks."""
    params, batch = problem
    want, _ = single_device()(params, batch)[0]["per_example"]

    def est(method):
        return lambda p, b: estimate.per_example(loss_fn, p, b, axis_name=AXIS, method=method)[0]

    monkeypatch.setattr(common, "to_varying", lambda tree, axis_name: tree)
    broken = run_shard_map(est("vmap"), params, batch)
    assert float(broken.trace_cov) > 1.5 * float(want.trace_cov)
    with pytest.raises(ValueError, match="manual axis types"):
        run_shard_map(est("auto"), params, batch)
    # pmap has no implicit sum: the cast is a no-op there and both methods are still right.
    both = run_pmap(lambda p, b: (est("vmap")(p, b), est("auto")(p, b)), params, batch)
    for got in both:
        assert_stats_close(got, want)


# ---------------------------------------------------------------------------------------------
# across_devices: unbiased on linear regression with a closed form.


def test_across_devices_unbiased_linear_regression():
    """loss ½(x·w − y)², x ~ N(0, I_d), y = x·w* + s·ε, at w = w* + δ: the per-example gradient
    is g = x(x·δ) − s·ε·x, so G = δ and Σ = |δ|²I + δδᵀ + s²I, tr Σ = d(|δ|² + s²) + |δ|²."""
    d, local, num_batches, s = 4, 4, 2000, 1.0
    w_star = np.arange(1.0, d + 1.0, dtype=np.float32)
    delta = np.array([0.5, -0.5, 0.5, -0.5], np.float32)
    g_sq_true = float(delta @ delta)
    tr_true = d * (g_sq_true + s**2) + g_sq_true

    def loss(w, batch):
        x, y = batch
        return 0.5 * jnp.mean((x @ w - y) ** 2)

    @jax.jit  # the data in one program, not op by op
    def make_data(key):
        kx, ke = jax.random.split(key)
        x = jax.random.normal(kx, (N_DEV, num_batches, local, d))
        return x, x @ w_star + s * jax.random.normal(ke, (N_DEV, num_batches, local))

    x, y = make_data(jax.random.key(7))

    def per_device(xs, ys):  # all batches at once: vmap over batches inside the pmap
        def one(xb, yb):
            stats, _ = estimate.across_devices(loss, w_star + delta, (xb, yb), axis_name=AXIS)
            big = jax.lax.pmean(jax.grad(loss)(w_star + delta, (xb, yb)), AXIS)
            return stats.g_sq, stats.trace_cov, big @ big

        return jax.vmap(one)(xs, ys)

    g_sq, tr, naive = (np.asarray(a[0]) for a in jax.pmap(per_device, axis_name=AXIS)(x, y))
    assert g_sq.shape == (num_batches,)
    for est, truth, name in ((g_sq, g_sq_true, "g_sq"), (tr, tr_true, "trace_cov")):
        se = float(np.std(est)) / np.sqrt(num_batches)
        assert se < 0.1 * truth, f"{name}: too few batches for a meaningful test"
        assert abs(float(np.mean(est)) - truth) < 4 * se, (name, float(np.mean(est)), truth)
    # The test has power: the naive |G_B|² is biased by tr Σ / B and is rejected.
    se = float(np.std(naive)) / np.sqrt(num_batches)
    assert abs(float(np.mean(naive)) - g_sq_true) > 4 * se
    np.testing.assert_allclose(np.mean(naive), g_sq_true + tr_true / (N_DEV * local), rtol=0.1)


# ---------------------------------------------------------------------------------------------
# Bad input.


def _estimator_calls(axis_name):
    return {
        "per_example": lambda p, b: estimate.per_example(loss_fn, p, b, axis_name=axis_name),
        "microbatch": lambda p, b: estimate.microbatch(
            loss_fn, p, b, num_microbatches=2, axis_name=axis_name
        ),
        "across_devices": lambda p, b: estimate.across_devices(loss_fn, p, b, axis_name=axis_name),
    }


@pytest.mark.parametrize("runner", ["pmap", "shard_map"])
@pytest.mark.parametrize("name", ["per_example", "microbatch", "across_devices"])
def test_unbound_axis_name_is_a_clear_error(problem, name, runner):
    params, batch = problem
    f = _estimator_calls("nope")[name]
    with pytest.raises(ValueError, match=re.escape("axis_name='nope' is not bound")):
        RUNNERS[runner](f, params, batch)


@pytest.mark.parametrize("name", ["per_example", "microbatch", "across_devices"])
def test_axis_name_outside_any_map_is_a_clear_error(problem, name):
    params, batch = problem
    with pytest.raises(ValueError, match=re.escape(f"axis_name={AXIS!r} is not bound")):
        _estimator_calls(AXIS)[name](params, batch)


@pytest.mark.parametrize("runner", ["pmap", "shard_map"])
def test_per_example_local_batch_of_one_errors_as_on_one_device(problem, runner):
    params, batch = problem
    one_each = jax.tree.map(lambda x: x[:N_DEV], batch)  # one example per device
    with pytest.raises(ValueError) as single:
        estimate.per_example(loss_fn, params, jax.tree.map(lambda x: x[:1], batch))
    with pytest.raises(ValueError) as mapped:
        RUNNERS[runner](_estimator_calls(AXIS)["per_example"], params, one_each)
    assert str(mapped.value) == str(single.value)
    assert "at least 2 examples" in str(mapped.value)


@pytest.mark.parametrize("runner", ["pmap", "shard_map"])
def test_across_devices_on_one_device_errors(problem, runner):
    params, batch = problem
    with pytest.raises(ValueError, match="at least 2 devices"):
        RUNNERS[runner](_estimator_calls(AXIS)["across_devices"], params, batch, n=1)


# ---------------------------------------------------------------------------------------------
# The data-parallel train step (gns.parallel) and the recipe in docs/data-parallel.md.


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_make_train_step_without_estimator_is_plain_data_parallel(problem, mode):
    params, b = problem
    optimizer = optax.sgd(0.1)
    mesh = mesh_1d() if mode == "shard_map" else None
    step = parallel.make_train_step(loss_fn, optimizer, estimator=None, axis_name=AXIS, mesh=mesh)
    p, _, stats = step(params, optimizer.init(params), parallel.shard_batch(b, mesh=mesh))
    assert stats is None
    _, grads = single_device()(params, b)  # jax.grad's
    want = jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)
    chex.assert_trees_all_close(p, want, rtol=1e-5, atol=1e-6)


def test_make_train_step_rejects_bad_arguments():
    with pytest.raises(ValueError, match="axis_name"):
        parallel.make_train_step(loss_fn, optax.sgd(0.1), estimator=None, axis_name=None)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        parallel.make_train_step(
            loss_fn, optax.sgd(0.1), estimator=None, axis_name="batch", mesh=mesh_1d()
        )
    with pytest.raises(ValueError, match="devices"):
        parallel.shard_batch(make_batch(jax.random.key(0), n=6), mesh=None)


def test_make_train_step_names_an_estimator_with_aux(problem):
    params, b = problem
    with_aux = functools.partial(estimate.across_devices, has_aux=True)
    step = parallel.make_train_step(
        lambda p, batch: (loss_fn(p, batch), jnp.zeros(())), optax.sgd(0.1), estimator=with_aux,
        axis_name=AXIS, mesh=mesh_1d(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="takes a loss without aux.*got 3 values"):
        step(params, optax.sgd(0.1).init(params), parallel.shard_batch(b, mesh=mesh_1d()))


def _doc_code_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "data-parallel.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_doc_recipe_runs_and_matches_single_device():
    """Runs every Python block of docs/data-parallel.md, in order, in one namespace."""
    blocks = _doc_code_blocks()
    assert len(blocks) >= 3
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "docs/data-parallel.md", "exec"), ns)  # noqa: S102
    # The doc trains the same model with pmap and with shard_map from the same start: the two
    # runs (and their logged statistics) agree.
    chex.assert_trees_all_close(ns["params_pmap"], ns["params_shard_map"], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(ns["params_by_hand"], ns["params_shard_map"], rtol=1e-5, atol=1e-6)
    # ... equal to three Adam steps on one device, and the logged statistics are those of 4
    # microbatches on one device (across_devices on 4 devices), whose grads are jax.grad's.
    loss_fn, optimizer = ns["loss_fn"], ns["optimizer"]

    @jax.jit
    def reference_step(p, opt_state, batch):
        want, grads = estimate.microbatch(loss_fn, p, batch, num_microbatches=4)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, want, grads, jax.grad(loss_fn)(p, batch)

    p, opt_state = ns["params"], optimizer.init(ns["params"])
    for i, logged in enumerate(ns["log_pmap"]):
        p, opt_state, want, grads, plain = reference_step(p, opt_state, ns["get_batch"](i))
        chex.assert_trees_all_close(grads, plain, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            [logged["g_sq"], logged["trace_cov"]],
            [want.g_sq, want.trace_cov],
            rtol=1e-4,
            atol=1e-4 * float(want.trace_cov / want.small_batch_size),
        )
        assert logged["big_batch_size"] == want.big_batch_size == 64
        assert logged["small_batch_size"] == want.small_batch_size == 16
    chex.assert_trees_all_close(ns["params_pmap"], p, rtol=1e-5, atol=1e-6)
    assert len(ns["log_pmap"]) == len(ns["log_shard_map"]) > 0
    for a, b in zip(ns["log_pmap"], ns["log_shard_map"], strict=True):
        assert a.keys() == b.keys() >= {"step", "g_sq", "trace_cov", "b_simple"}
        np.testing.assert_allclose(
            [a["g_sq"], a["trace_cov"]], [b["g_sq"], b["trace_cov"]], rtol=1e-4, atol=1e-6
        )


def test_a_batch_sharded_over_an_axis_that_axis_name_does_not_name_is_refused(problem):
    params, batch = problem
    mesh = jax.make_mesh((2, 2), ("a", "b"))
    f = jax.shard_map(
        lambda p, b: estimate.across_devices(loss_fn, p, b, axis_name="a"),
        mesh=mesh,
        in_specs=(P(), P(("a", "b"))),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match=r"sharded over the mesh axes \['b'\].*\('a', 'b'\)"):
        jax.jit(f)(params, jax.device_put(batch, NamedSharding(mesh, P(("a", "b")))))


@pytest.mark.parametrize("method", ["per_example", "microbatch"])
def test_a_sharded_batch_without_axis_name_is_refused_not_summed_over_the_devices(problem, method):
    """Inside shard_map with axis_name=None JAX sums the replicated parameters' gradients over
    the devices: the statistics came out ~16x too large on 4 devices (vmap, microbatch), or the
    fast path crashed inside JAX. Refused, naming the axis to pass."""
    params, batch = problem
    mesh = jax.make_mesh((4,), ("batch",))
    est = getattr(estimate, method)
    f = jax.shard_map(
        lambda p, b: est(loss_fn, p, b)[0].g_sq, mesh=mesh, in_specs=(P(), P("batch")),
        out_specs=P("batch"),
    )  # fmt: skip
    sharded = jax.device_put(batch, NamedSharding(mesh, P("batch")))
    with pytest.raises(
        ValueError, match=r"varies over the mesh axes \['batch'\].*axis_name='batch'"
    ):
        jax.jit(f)(params, sharded)
