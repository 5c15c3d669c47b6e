"""Tests of gns.estimate: closed form, independent references, invariants, bad input.

Every reference here is computed independently of the library: Python loops over examples or
microbatches calling ``jax.grad`` of the ordinary mean loss, with the two-batch formulas of
McCandlish et al. (2018, appendix A) evaluated in float64 NumPy.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from gns import common, estimate, smoothing

HYPOTHESIS = settings(max_examples=10, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------------------------
# Models and independent references.


def linreg_loss(w, batch):
    """½ mean squared error of a linear model."""
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2)


def mlp_init(rng, sizes):
    """MLP parameters drawn by the NumPy generator ``rng`` (no program to compile)."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"dense{i}"] = {
            "w": rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in),
            "b": 0.1 * rng.normal(size=fan_out),
        }
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def mlp_loss(params, batch):
    """Tanh MLP regression, ½ mean squared error."""
    x, y = batch
    h = x
    for i in range(len(params)):
        layer = params[f"dense{i}"]
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return 0.5 * jnp.mean(jnp.sum((h - y) ** 2, axis=-1))


def mlp_problem(seed, batch_size, dim, hidden=4, out=2):
    rng = np.random.default_rng(seed)
    params = mlp_init(rng, [dim, hidden, out])
    x = jnp.asarray(rng.normal(size=(batch_size, dim)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(batch_size, out)), jnp.float32)
    return params, (x, y)


@functools.cache
def _jitted_grad(loss_fn):
    return jax.jit(jax.grad(loss_fn))


def reference(loss_fn, params, batch, num_parts):
    """Two-batch statistics from a Python loop over ``num_parts`` equal parts of the batch.

    Returns (per-leaf g_sq list, per-leaf trace_cov list, mean gradient leaves, mean over parts of
    the squared norm of each part's gradient), all float64 NumPy.
    """
    n = jax.tree.leaves(batch)[0].shape[0]
    m = n // num_parts
    grad = _jitted_grad(loss_fn)
    parts = []
    for j in range(num_parts):
        part = jax.tree.map(lambda x, j=j: x[j * m : (j + 1) * m], batch)
        parts.append([np.asarray(g, np.float64) for g in jax.tree.leaves(grad(params, part))])
    g_sq, trace_cov, mean_grads = [], [], []
    small_total = 0.0
    for leaf in zip(*parts, strict=True):
        stacked = np.stack(leaf)
        small = np.mean([np.sum(g**2) for g in leaf])  # mean over parts of |g_part|²
        mean_grad = stacked.mean(axis=0)
        big = np.sum(mean_grad**2)
        b, big_b = float(m), float(n)
        g_sq.append((big_b * big - b * small) / (big_b - b))
        trace_cov.append((small - big) / (1 / b - 1 / big_b))
        mean_grads.append(mean_grad)
        small_total += small
    return g_sq, trace_cov, mean_grads, small_total


def assert_stats_match(stats, grads, ref, rtol=2e-4):
    g_sq, trace_cov, mean_grads, _ = ref
    scale = max(abs(sum(g_sq)), abs(sum(trace_cov)), 1e-3)
    atol = 1e-5 * scale
    np.testing.assert_allclose(float(stats.g_sq), sum(g_sq), rtol=rtol, atol=atol)
    np.testing.assert_allclose(float(stats.trace_cov), sum(trace_cov), rtol=rtol, atol=atol)
    layers = list(stats.per_layer.values())
    assert len(layers) == len(g_sq)
    for layer, gs, tc in zip(layers, g_sq, trace_cov, strict=True):
        np.testing.assert_allclose(float(layer.g_sq), gs, rtol=rtol, atol=atol)
        np.testing.assert_allclose(float(layer.trace_cov), tc, rtol=rtol, atol=atol)
    for got, want in zip(jax.tree.leaves(grads), mean_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


# Jitted entry points, compiled once per shape (loss functions are static).
per_example_jit = jax.jit(
    estimate.per_example, static_argnums=0, static_argnames=("chunk_size", "axis_name")
)
microbatch_jit = jax.jit(
    estimate.microbatch,
    static_argnums=0,
    static_argnames=("num_microbatches", "axis_name", "unroll"),
)


# ---------------------------------------------------------------------------------------------
# Closed form: linear regression with Gaussian inputs.
#
# x ~ N(0, I_d), y = x·w* + ε, ε ~ N(0, s²), loss ½(x·w − y)², at w = w* + δ:
#   g = (x·δ − ε) x,  G = E[x xᵀ] δ = δ,
#   E|g|² = E[(x·δ)²|x|²] + s² E|x|² = (d + 2)|δ|² + d s²   (Isserlis: E x₁⁴ = 3),
#   tr Σ = E|g|² − |G|² = d(|δ|² + s²) + |δ|².

D, NOISE_STD, BATCH, NUM_BATCHES = 8, 0.5, 32, 1000


def closed_form_estimates():
    key = jax.random.key(42)
    kd, kw, kx, ke = jax.random.split(key, 4)
    delta = jax.random.normal(kd, (D,))
    delta = delta / jnp.linalg.norm(delta)  # |δ| = 1
    w_star = jax.random.normal(kw, (D,))
    x = jax.random.normal(kx, (NUM_BATCHES, BATCH, D))
    y = x @ w_star + NOISE_STD * jax.random.normal(ke, (NUM_BATCHES, BATCH))
    w = w_star + delta

    @jax.jit
    def run(x, y):
        def one(xb, yb, xh, yh):
            pe, _ = estimate.per_example(linreg_loss, w, (xb, yb))
            mb, _ = estimate.microbatch(linreg_loss, w, (xb, yb), num_microbatches=4)
            hs, _ = estimate.hessian_aware(linreg_loss, w, (xb, yb), (xh, yh), num_microbatches=4)
            return pe, mb, hs

        # The Hessian of batch i+1, mean(x xᵀ), is independent of batch i with E[H] = I, so
        # the Hessian-aware forms have the same expectations: GᵀE[H]G = |G|², tr(E[H]Σ) = tr Σ.
        return jax.vmap(one)(x, y, jnp.roll(x, 1, 0), jnp.roll(y, 1, 0))

    pe, mb, hs = run(x, y)
    d_sq = float(jnp.sum(delta**2))
    truth = {"g_sq": d_sq, "trace_cov": D * (d_sq + NOISE_STD**2) + d_sq}
    return pe, mb, hs, truth


@pytest.mark.timeout(60)
def test_closed_form_linear_regression():
    pe, mb, hs, truth = closed_form_estimates()
    lines = []
    for name, stats in (("per_example", pe), ("microbatch(k=4)", mb), ("hessian_aware", hs)):
        for field in ("g_sq", "trace_cov"):
            series = np.asarray(getattr(stats, field), np.float64)
            assert series.shape == (NUM_BATCHES,)
            mean = series.mean()
            se = series.std(ddof=1) / np.sqrt(series.size)
            lines.append(
                f"{name:16s} {field:9s} = {mean:.4f} ± {se:.4f} (truth {truth[field]:.4f}, "
                f"{(mean - truth[field]) / se:+.2f} s.e.)"
            )
            assert abs(mean - truth[field]) < 4 * se, lines[-1]
        # The ratio of the pooled means recovers B_simple = tr Σ / |G|².
        res = smoothing.interval(stats.g_sq, stats.trace_cov, block_size=1, confidence=0.99)
        b_true = truth["trace_cov"] / truth["g_sq"]
        lines.append(
            f"{name:16s} b_simple  = {res.estimate:.3f} [{res.low:.3f}, {res.high:.3f}] "
            f"(truth {b_true:.3f})"
        )
        assert res.low < b_true < res.high, lines[-1]
    print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Equality with independent computations.


def test_per_example_grads_equal_jax_grad_and_loop():
    params, batch = mlp_problem(0, batch_size=8, dim=3)
    stats, grads = per_example_jit(mlp_loss, params, batch)
    chex.assert_trees_all_close(grads, _jitted_grad(mlp_loss)(params, batch), rtol=1e-5, atol=1e-6)
    ref = reference(mlp_loss, params, batch, num_parts=8)
    assert_stats_match(stats, grads, ref)
    # Per-example squared norms: with b = 1, E|g_i|² = g_sq + trace_cov.
    np.testing.assert_allclose(float(stats.g_sq + stats.trace_cov), ref[3], rtol=1e-4)
    assert list(stats.per_layer) == ["dense0/b", "dense0/w", "dense1/b", "dense1/w"]
    assert (stats.small_batch_size, stats.big_batch_size) == (1.0, 8.0)


@pytest.mark.parametrize("unroll", [None, 1, True])
def test_microbatch_equals_loop_over_microbatches(unroll):
    params, batch = mlp_problem(1, batch_size=12, dim=3)
    stats, grads = microbatch_jit(mlp_loss, params, batch, num_microbatches=3, unroll=unroll)
    assert (stats.small_batch_size, stats.big_batch_size) == (4.0, 12.0)
    chex.assert_trees_all_close(grads, _jitted_grad(mlp_loss)(params, batch), rtol=1e-5, atol=1e-6)
    assert_stats_match(stats, grads, reference(mlp_loss, params, batch, num_parts=3))


def test_hessian_aware_equals_a_loop_with_the_explicit_hessian():
    params, batch = mlp_problem(3, batch_size=12, dim=3)
    _, h_batch = mlp_problem(4, batch_size=5, dim=3)
    stats, grads = estimate.hessian_aware(mlp_loss, params, batch, h_batch, num_microbatches=3)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hessian = np.asarray(jax.hessian(lambda v: mlp_loss(unravel(v), h_batch))(flat), np.float64)
    parts = [jax.tree.map(lambda x, j=j: x[4 * j : 4 * j + 4], batch) for j in range(3)]
    g = [np.asarray(jax.flatten_util.ravel_pytree(jax.grad(mlp_loss)(params, p))[0], np.float64)
         for p in parts]  # fmt: skip
    g_big = np.mean(g, axis=0)
    small, big = np.mean([v @ hessian @ v for v in g]), g_big @ hessian @ g_big
    g_hg, tr_hs = (12 * big - 4 * small) / 8, (small - big) / (1 / 4 - 1 / 12)
    np.testing.assert_allclose(float(stats.g_sq), g_hg, rtol=1e-4)
    np.testing.assert_allclose(float(stats.trace_cov), tr_hs, rtol=1e-4)
    np.testing.assert_allclose(float(stats.b_simple), tr_hs / g_hg, rtol=1e-3)
    assert (stats.small_batch_size, stats.big_batch_size) == (4.0, 12.0)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grads)[0], g_big, rtol=1e-5, atol=1e-7)


def test_hessian_aware_equals_b_simple_when_the_hessian_is_isotropic():
    """Loss c·|w − x|²/2: H = c·I, so GᵀHG = c|G|², tr(HΣ) = c·tr Σ and B_noise = B_simple."""
    x = jnp.asarray(np.random.default_rng(5).normal(1.0, 2.0, size=(32, 6)), jnp.float32)

    def loss_fn(w, batch):
        return 1.5 * jnp.mean(jnp.sum((w - batch) ** 2, axis=-1))

    w = jnp.zeros(6)
    h, _ = estimate.hessian_aware(loss_fn, w, x, x[:3], num_microbatches=4)
    s, _ = estimate.microbatch(loss_fn, w, x, num_microbatches=4)
    np.testing.assert_allclose(float(h.g_sq), 3.0 * float(s.g_sq), rtol=1e-5)
    np.testing.assert_allclose(float(h.trace_cov), 3.0 * float(s.trace_cov), rtol=1e-5)
    np.testing.assert_allclose(float(h.b_simple), float(s.b_simple), rtol=1e-5)


def scan_unrolls(fn, *args) -> list:
    """The ``unroll`` of every ``scan`` in the jaxpr of ``fn(*args)``."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e.params["unroll"] for e in jaxpr.eqns if e.primitive.name == "scan"]


def test_microbatch_unrolls_its_loop_by_default_only_for_convolutions_on_cpu():
    """XLA:CPU runs a convolution inside a rolled loop an order of magnitude slower, so the
    default unrolls the loop (unroll = the number of microbatches) there; a loop of dense
    layers stays rolled (one microbatch in memory at a time), as does every loop off the CPU."""
    assert jax.default_backend() == "cpu"
    conv = nn.Conv(2, (3, 3))
    x = jnp.ones((8, 5, 5, 1))
    conv_params = conv.init(jax.random.key(0), x[:1])

    def conv_loss(p, b):
        return jnp.mean(conv.apply(p, b) ** 2)

    params, batch = mlp_problem(1, batch_size=8, dim=3)
    k = 4
    micro = functools.partial(estimate.microbatch, num_microbatches=k)
    assert scan_unrolls(lambda p, b: micro(conv_loss, p, b), conv_params, x) == [k]
    assert scan_unrolls(lambda p, b: micro(mlp_loss, p, b), params, batch) == [1]
    assert common.convolves(conv_loss, conv_params, x) and not common.convolves(
        mlp_loss, params, batch
    )
    assert common.scan_unroll(True) is True and common.scan_unroll(False) == 1


def test_microbatch_with_one_example_per_microbatch_equals_per_example():
    params, batch = mlp_problem(2, batch_size=6, dim=3)

    @jax.jit
    def both(p, b):
        return (
            estimate.per_example(mlp_loss, p, b),
            estimate.microbatch(mlp_loss, p, b, num_microbatches=6),
        )

    (pe, pe_grads), (mb, mb_grads) = both(params, batch)
    chex.assert_trees_all_close(mb, pe, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(mb_grads, pe_grads, rtol=1e-5, atol=1e-6)


def test_has_aux_returns_the_aux_of_every_call():
    params, batch = mlp_problem(8, batch_size=8, dim=3)

    def loss_with_aux(p, b):
        loss = mlp_loss(p, b)
        return loss, {"loss": loss}

    @jax.jit  # one program: the estimates with aux, microbatch's without, the losses
    def run(p, b):
        with_aux = (
            estimate.per_example(loss_with_aux, p, b, chunk_size=3, has_aux=True, method="vmap"),
            estimate.microbatch(loss_with_aux, p, b, num_microbatches=4, has_aux=True),
        )
        plain_mb = estimate.microbatch(mlp_loss, p, b, num_microbatches=4)
        per_example_losses = [
            mlp_loss(p, jax.tree.map(lambda x, i=i: x[i : i + 1], b)) for i in range(8)
        ]
        microbatch_losses = [
            mlp_loss(p, jax.tree.map(lambda x, j=j: x[2 * j : 2 * j + 2], b)) for j in range(4)
        ]
        return with_aux, plain_mb, per_example_losses, microbatch_losses

    ((pe, pe_grads, pe_aux), (mb, _, mb_aux)), plain_mb, pe_losses, mb_losses = run(params, batch)
    np.testing.assert_allclose(pe_aux["loss"], pe_losses, rtol=1e-5)
    np.testing.assert_allclose(mb_aux["loss"], mb_losses, rtol=1e-5)
    # The statistics are those without aux.
    plain_pe = per_example_jit(mlp_loss, params, batch)  # the program of the tests above
    chex.assert_trees_all_close((pe, pe_grads), plain_pe, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(mb, plain_mb[0], rtol=1e-5, atol=1e-6)


class VariantsTest(chex.TestCase):
    """jit and no-jit give the same statistics (both equal the independent reference)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_example_and_microbatch(self):
        rng = np.random.default_rng(3)
        params = mlp_init(rng, [2, 2])  # one layer, two leaves: half the eager ops of two
        batch = tuple(jnp.asarray(rng.normal(size=(8, 2)), jnp.float32) for _ in range(2))

        @self.variant
        def both(p, b):
            return (estimate.per_example(mlp_loss, p, b, chunk_size=3),
                    estimate.microbatch(mlp_loss, p, b, num_microbatches=4))  # fmt: skip

        pe, mb = both(params, batch)
        assert_stats_match(*pe, reference(mlp_loss, params, batch, 8))
        assert_stats_match(*mb, reference(mlp_loss, params, batch, 4))


# ---------------------------------------------------------------------------------------------
# Invariants (hypothesis over shapes and seeds).

# (batch size, input dimension): every batch size with both dimensions among three shapes (the
# invariants do not depend on the size); one compiled program a shape for all of them.
shapes = st.sampled_from([(4, 3), (6, 2), (8, 3)])
seeds = st.integers(0, 2**16)


@jax.jit
def _invariant_stats(params, batch, c):
    """The estimates of the invariants below, of the loss scaled by ``c``, in one program a
    shape (called again on permuted batches and other scales): per-example, microbatch (k = 2),
    and per-example with chunk sizes dividing the batch (``n // 2``, and 3 for 6), not dividing
    it (a remainder chunk: ``n - 1``, and 3 for 4 and 8) and past it."""
    n = jax.tree.leaves(batch)[0].shape[0]
    scaled = lambda p, b: c * mlp_loss(p, b)
    return {
        "per_example": estimate.per_example(scaled, params, batch),
        "microbatch": estimate.microbatch(scaled, params, batch, num_microbatches=2),
        "chunked": {
            k: estimate.per_example(scaled, params, batch, chunk_size=k)
            for k in sorted({3, n // 2, n - 1, n + 1})
        },
    }


def invariant_stats(shape, seed, c=1.0, order=None):
    """``(params, stats)``: :func:`_invariant_stats` on the MLP problem of ``seed``,
    its examples taken in ``order`` (a function of the batch size and a NumPy generator)."""
    params, batch = mlp_problem(seed, *shape)
    if order is not None:
        idx = order(shape[0], np.random.default_rng(seed))
        batch = jax.tree.map(lambda x: x[idx], batch)
    return params, _invariant_stats(params, batch, c)


def _block_permutation(n, rng, k=2):
    """The ``k`` microbatches in a random order, and the examples inside each of them."""
    m = n // k
    return np.concatenate([j * m + rng.permutation(m) for j in rng.permutation(k)])


@HYPOTHESIS
@given(shape=shapes, seed=seeds)
def test_permuting_examples_changes_nothing(shape, seed):
    _, base = invariant_stats(shape, seed)
    _, permuted = invariant_stats(shape, seed, order=lambda n, rng: rng.permutation(n))
    chex.assert_trees_all_close(permuted["per_example"], base["per_example"], rtol=1e-4, atol=1e-6)
    # Microbatch: permute the microbatches and the examples inside each of them.
    _, permuted = invariant_stats(shape, seed, order=_block_permutation)
    chex.assert_trees_all_close(permuted["microbatch"], base["microbatch"], rtol=1e-4, atol=1e-6)


@HYPOTHESIS
@given(shape=shapes, seed=seeds, c=st.floats(0.1, 10.0))
def test_scaling_the_loss(shape, seed, c):
    _, base = invariant_stats(shape, seed)
    _, scaled = invariant_stats(shape, seed, c)
    for key in ("per_example", "microbatch"):
        s0, s1 = base[key][0], scaled[key][0]
        np.testing.assert_allclose(s1.g_sq, c**2 * s0.g_sq, rtol=1e-4, atol=1e-6 * c**2)
        np.testing.assert_allclose(s1.trace_cov, c**2 * s0.trace_cov, rtol=1e-4)
        if abs(float(s0.g_sq)) > 1e-3 * float(s0.trace_cov):  # ratio well conditioned
            np.testing.assert_allclose(s1.b_simple, s0.b_simple, rtol=1e-3)
        else:
            assert np.sign(s1.g_sq) == np.sign(s0.g_sq) or abs(float(s1.g_sq)) < 1e-6


@HYPOTHESIS
@given(shape=shapes, seed=seeds)
def test_per_layer_sums_to_totals(shape, seed):
    params, out = invariant_stats(shape, seed)
    for stats, _ in (out["per_example"], out["microbatch"]):
        assert len(stats.per_layer) == len(jax.tree.leaves(params))
        layers = stats.per_layer.values()
        np.testing.assert_allclose(sum(float(s.g_sq) for s in layers), stats.g_sq, rtol=1e-5)
        np.testing.assert_allclose(
            sum(float(s.trace_cov) for s in layers), stats.trace_cov, rtol=1e-5
        )


@HYPOTHESIS
@given(shape=shapes, seed=seeds)
def test_chunk_size_does_not_change_the_result(shape, seed):
    _, out = invariant_stats(shape, seed)
    for chunk, chunked in out["chunked"].items():
        message = f"chunk_size={chunk}"
        chex.assert_trees_all_close(
            chunked, out["per_example"], rtol=1e-4, atol=1e-6, custom_message=message
        )


# ---------------------------------------------------------------------------------------------
# Frameworks: Flax Linen (closing over model.apply) and Flax NNX (nnx.split / nnx.merge).


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jnp.tanh(nn.Dense(5)(x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(3, 5, rngs=rngs)
        self.out = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def test_flax_linen():
    _, (x, y) = mlp_problem(4, batch_size=8, dim=3)
    model = LinenMLP()
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]

    def loss_fn(params, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((model.apply({"params": params}, x) - y) ** 2, -1))

    ref = reference(loss_fn, params, (x, y), num_parts=8)
    names = {"Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"}

    @jax.jit  # one program for the three estimates
    def run(p, b):
        methods = ("auto", "vmap")  # "auto": the fast path of gns.ghost
        pe = {m: estimate.per_example(loss_fn, p, b, method=m) for m in methods}
        return pe, estimate.microbatch(loss_fn, p, b, num_microbatches=4)[0]

    per_example, mb = run(params, (x, y))
    for stats, grads in per_example.values():
        assert_stats_match(stats, grads, ref)
        assert set(stats.per_layer) == names
    assert_stats_match(mb, grads, reference(loss_fn, params, (x, y), num_parts=4))


def test_flax_nnx():
    _, (x, y) = mlp_problem(5, batch_size=8, dim=3)
    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))

    def loss_fn(state, batch):
        model = nnx.merge(graphdef, state)
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((model(x) - y) ** 2, -1))

    stats, grads = jax.jit(lambda s, b: estimate.per_example(loss_fn, s, b))(state, (x, y))
    assert jax.tree.structure(grads) == jax.tree.structure(state)
    assert_stats_match(stats, grads, reference(loss_fn, state, (x, y), num_parts=8))
    # Keys are the state paths (NNX adds a trailing "/value" for the Variable's array).
    layers = {"/".join(k.split("/")[:2]) for k in stats.per_layer}
    assert layers == {"hidden/bias", "hidden/kernel", "out/bias", "out/kernel"}


# ---------------------------------------------------------------------------------------------
# Memory: chunking bounds the per-example gradients held at once.


def test_chunking_reduces_compiled_temp_memory():
    params = mlp_init(np.random.default_rng(0), [32, 128, 10])  # ~5.5k parameters
    batch = (jnp.zeros((128, 32)), jnp.zeros((128, 10)))

    def temp_bytes(chunk_size):
        fn = jax.jit(  # vmap: the fast path has no per-example gradients to chunk
            lambda p, b: estimate.per_example(mlp_loss, p, b, chunk_size=chunk_size, method="vmap")
        )
        analysis = fn.lower(params, batch).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    whole, chunked = temp_bytes(None), temp_bytes(16)
    # 128 per-example gradients of 5.5k float32 parameters are ~2.8 MB; 16 of them ~0.35 MB.
    assert chunked * 4 < whole, (chunked, whole)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument.

_x = jnp.ones((8, 3))
_y = jnp.ones((8, 2))
_params, _ = mlp_problem(0, batch_size=8, dim=3)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: estimate.per_example(mlp_loss, _params, (_x[:1], _y[:1])), "at least 2 examples"),
        (lambda: estimate.per_example(mlp_loss, _params, (_x, _y), chunk_size=0), "chunk_size"),
        (lambda: estimate.per_example(mlp_loss, _params, (_x[:0], _y[:0])), "`batch` is empty"),
        (lambda: estimate.per_example(mlp_loss, _params, {}), "`batch` has no arrays"),
        (lambda: estimate.per_example(mlp_loss, _params, (_x, _y[:4])), "different leading"),
        (lambda: estimate.per_example(mlp_loss, _params, (_x, jnp.ones(()))), "is a scalar"),
        (lambda: estimate.per_example(mlp_loss, _params, (_x, _y), axis_name="nope"), "axis_name"),
        (lambda: estimate.microbatch(mlp_loss, _params, (_x, _y), num_microbatches=1), "num_mic"),
        (lambda: estimate.microbatch(mlp_loss, _params, (_x, _y), num_microbatches=2.0), "num_mic"),
        (lambda: estimate.microbatch(mlp_loss, _params, (_x, _y), num_microbatches=3), "divide"),
        (lambda: estimate.microbatch(mlp_loss, _params, (_x[:0], _y[:0])), "`batch` is empty"),
        (lambda: estimate.microbatch(mlp_loss, _params, (_x, _y[:4])), "different leading"),
        (lambda: estimate.across_devices(mlp_loss, _params, (_x, _y), axis_name=None), "axis_name"),
        (
            lambda: estimate.hessian_aware(
                mlp_loss, _params, (_x, _y), (_x, _y), num_microbatches=1
            ),
            "num_mic",
        ),
        (
            lambda: estimate.hessian_aware(
                mlp_loss, _params, (_x, _y), (_x, _y), num_microbatches=3
            ),
            "divide",
        ),
        (lambda: estimate.from_two_batches(1.0, 0.5, 8, 8), "small_size"),
        (lambda: estimate.from_two_batches(1.0, 0.5, 16, 8), "small_size"),
        (lambda: estimate.from_two_batches(1.0, 0.5, 0, 8), "small_size"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# Degenerate results are reported, not hidden.


def test_non_positive_g_sq_gives_infinite_b_simple():
    # Two examples with opposite gradients: the batch gradient is 0, so g_sq = -|g_i|² < 0.
    w = jnp.ones(1)
    batch = (jnp.ones((2, 1)), jnp.array([2.0, 0.0]))  # residuals -1 and +1
    stats, grads = per_example_jit(linreg_loss, w, batch)
    np.testing.assert_allclose(grads, 0.0)
    assert float(stats.g_sq) < 0 and float(stats.trace_cov) > 0
    assert float(stats.b_simple) == np.inf
    # g_sq exactly 0 also reads as inf; from_two_batches reports the same way.
    assert float(estimate.from_two_batches(4.0, 1.0, 1, 4).b_simple) == np.inf
    assert float(estimate.from_two_batches(3.0, 0.5, 1, 4).b_simple) == np.inf


def test_nan_loss_propagates_and_tracker_skips_it():
    params, (x, y) = mlp_problem(7, batch_size=8, dim=3)
    x = x.at[3, 0].set(jnp.nan)
    stats, _ = per_example_jit(mlp_loss, params, (x, y))
    for value in (stats.g_sq, stats.trace_cov, stats.b_simple):
        assert np.isnan(float(value))
    assert all(np.isnan(float(s.g_sq)) for s in stats.per_layer.values())

    good, _ = per_example_jit(mlp_loss, *mlp_problem(7, batch_size=8, dim=3))
    tracker = smoothing.ema(decay=0.9)
    update = jax.jit(tracker.update)
    state = update(good, tracker.init())
    state = update(stats, state)  # NaN statistics: skipped and counted
    assert (int(state.count), int(state.skipped)) == (1, 1)
    np.testing.assert_allclose(state.g_sq, good.g_sq)
    np.testing.assert_allclose(state.b_simple, good.b_simple, rtol=1e-6)
    unsafe = smoothing.ema(decay=0.9, skip_nonfinite=False)
    state = unsafe.update(stats, unsafe.update(good, unsafe.init()))
    assert int(state.skipped) == 0 and np.isnan(float(state.b_simple))


# ---------------------------------------------------------------------------------------------
# Library edge cases (issue 10): integer types, a missing aux, float32 range.


def test_numpy_integers_are_accepted_and_bools_refused():
    params, batch = mlp_problem(3, batch_size=8, dim=3)

    @jax.jit  # one program, traced with the Python ints and with the NumPy ones
    def both(p, b):
        pe = [estimate.per_example(mlp_loss, p, b, chunk_size=c, method="vmap")[0]
              for c in (3, np.int64(3))]  # fmt: skip
        mb = [estimate.microbatch(mlp_loss, p, b, num_microbatches=k)[0] for k in (2, np.int64(2))]
        return pe, mb

    for want, got in both(params, batch):
        chex.assert_trees_all_close(got, want, rtol=1e-6)
    assert got.small_batch_size == 4.0
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got True"):
        estimate.per_example(mlp_loss, params, batch, chunk_size=True)
    with pytest.raises(ValueError, match="num_microbatches must be an int >= 2, got True"):
        estimate.microbatch(mlp_loss, params, batch, num_microbatches=True)


@pytest.mark.parametrize(
    "call",
    [
        lambda p, b: estimate.per_example(mlp_loss, p, b, has_aux=True, method="vmap"),
        lambda p, b: estimate.per_example(mlp_loss, p, b, has_aux=True),
        lambda p, b: estimate.microbatch(mlp_loss, p, b, num_microbatches=2, has_aux=True),
    ],
)
def test_has_aux_without_aux_is_a_clear_error(call):
    params, batch = mlp_problem(3, batch_size=8, dim=3)
    with pytest.raises(ValueError, match=r"has_aux=True but loss_fn returned .* \(loss, aux\)"):
        call(params, batch)


def test_from_two_batches_does_not_overflow_near_the_float32_maximum():
    # B·|G_B|² = 6e38 overflows float32 when formed directly; the result itself is in range.
    s = estimate.from_two_batches(3e38, 1.5e38, 1, 4)
    small, big, b, B = 3e38, 1.5e38, 1.0, 4.0
    np.testing.assert_allclose(float(s.g_sq), (B * big - b * small) / (B - b), rtol=1e-6)
    np.testing.assert_allclose(float(s.trace_cov), (small - big) / (1 / b - 1 / B), rtol=1e-6)
    assert float(s.b_simple) == pytest.approx(2.0, rel=1e-6)


def test_tiny_loss_scale_does_not_underflow():
    # Mean-gradient elements ~1e-20 square below float32's smallest normal (flushed to 0),
    # yet |G|² (~8e-38, summed over 20,000 parameters) is representable: the scaled norms keep
    # it. Reference: the two-batch formulas on per-example gradients in float64 NumPy.
    rng = np.random.default_rng(0)
    n, d, c = 16, 20_000, 1e-20
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (10 * rng.normal(size=n)).astype(np.float32)

    def loss(w, batch):
        xb, yb = batch
        return c * 0.5 * jnp.mean((xb @ w - yb) ** 2)

    stats, _ = per_example_jit(loss, jnp.zeros(d), (jnp.asarray(x), jnp.asarray(y)))
    g = -c * y.astype(np.float64)[:, None] * x.astype(np.float64)  # per-example grads at w=0
    small, big = np.mean(np.sum(g**2, axis=1)), np.sum(g.mean(0) ** 2)
    g_sq, trace_cov = (n * big - small) / (n - 1), (small - big) / (1 - 1 / n)
    assert 0 < g_sq < 1e-36  # the regime of the issue: below 1e-38 per element
    np.testing.assert_allclose(float(stats.g_sq), g_sq, rtol=1e-4)
    np.testing.assert_allclose(float(stats.trace_cov), trace_cov, rtol=1e-4)
    np.testing.assert_allclose(float(stats.b_simple), trace_cov / g_sq, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Mixed precision: the sums accumulate in float32 whatever the parameters' dtype.


def test_bfloat16_sums_accumulate_in_float32():
    """512 per-example gradients of 1 or 2 summed one chunk (or microbatch) at a time: a
    bfloat16 running sum stalls at 256 (256 + 1 is not a bfloat16); a float32 one is exact."""
    n, d = 512, 4
    scale = np.where(np.arange(n) % 2 == 0, 1.0, 2.0)
    x = jnp.asarray(np.ones((n, d)) * scale[:, None], jnp.bfloat16)
    w = jnp.zeros(d, jnp.bfloat16)

    def loss_fn(w, x):  # per-example gradient: scale_i * ones(d), exact in bfloat16
        return jnp.mean(x @ w)

    # Closed form: mean gradient 1.5, mean squared per-example norm d * (1 + 4) / 2.
    big, small = d * 1.5**2, d * 2.5
    want_g_sq = (n * big - small) / (n - 1)
    want_trace = (small - big) / (1 - 1 / n)
    runs = {
        "vmap": lambda w, x: estimate.per_example(loss_fn, w, x, method="vmap", chunk_size=1),
        "microbatch": lambda w, x: estimate.microbatch(
            loss_fn, w, x, num_microbatches=n // 2, unroll=1
        ),
    }
    results = jax.jit(lambda w, x: {name: fn(w, x) for name, fn in runs.items()})(w, x)
    for name, (stats, grads) in results.items():
        assert grads.dtype == jnp.bfloat16, name  # jax.grad's dtype
        np.testing.assert_allclose(grads, np.full(d, 1.5), rtol=0, err_msg=name)
        if name == "vmap":
            np.testing.assert_allclose(stats.g_sq, want_g_sq, rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(stats.trace_cov, want_trace, rtol=1e-5, err_msg=name)
        else:  # microbatches of 2 examples: b = 2, each microbatch's mean gradient is 1.5
            np.testing.assert_allclose(stats.g_sq, big, rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(stats.trace_cov, 0.0, atol=1e-5, err_msg=name)


class BF16Net(nn.Module):
    """Dense -> LayerNorm -> Dense, computing in the dtype of its inputs and parameters."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.LayerNorm()(nn.relu(nn.Dense(32)(x))))


@pytest.mark.parametrize("penalty", [0.0, 1e-2])
def test_bfloat16_statistics_within_one_percent_of_float32(penalty):
    """bf16 parameters and activations, fast path and vmap, on a fixed batch; also with an L2
    penalty in the loss (a leaf's cotangent then arrives by two paths, each in bf16)."""
    n = 128
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 24)).astype(np.float32)
    logits = x @ rng.standard_normal((24, 10)) + 3 * rng.standard_normal((n, 10))
    y = jnp.asarray(np.argmax(logits, 1))  # learnable, noisy labels: B_simple ~ 100
    model = BF16Net()
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]

    def loss_fn(p, batch):
        xs, ys = batch
        out = model.apply({"params": p}, xs).astype(jnp.float32)
        l2 = sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(p)).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), ys[:, None], 1)) + (
            penalty * l2
        )

    def all_stats(p, b):
        return [estimate.per_example(loss_fn, p, b, method=m)[0] for m in ("ghost", "vmap")]

    @jax.jit  # float32 and bfloat16 in one program
    def both(p, xs, ys):
        cast = lambda dtype: (jax.tree.map(lambda a: a.astype(dtype), p), (xs.astype(dtype), ys))
        return [all_stats(*cast(dtype)) for dtype in (jnp.float32, jnp.bfloat16)]

    want, got = both(params, x, y)
    np.testing.assert_allclose(want[0].trace_cov, want[1].trace_cov, rtol=1e-4)
    for method, w, g in zip(("ghost", "vmap"), want, got, strict=True):
        assert g.g_sq.dtype == jnp.float32, method
        assert 20 < float(w.b_simple) < 1000, method  # the statistics are both resolved
        for field in ("g_sq", "trace_cov", "b_simple"):
            np.testing.assert_allclose(
                getattr(g, field), getattr(w, field), rtol=0.01, err_msg=f"{method} {field}"
            )


def test_params_leaves_are_checked_and_python_scalars_are_arrays():
    x = jax.random.normal(jax.random.key(0), (8, 3))

    def loss_fn(p, batch):
        return jnp.mean((batch @ p["w"] + p["b"]) ** 2)

    w = jnp.ones(3)
    want, _ = estimate.per_example(loss_fn, {"w": w, "b": jnp.asarray(0.5)}, x, method="vmap")
    got, grads = estimate.per_example(loss_fn, {"w": w, "b": 0.5}, x, method="vmap")  # a float
    np.testing.assert_allclose(got.g_sq, want.g_sq, rtol=1e-6)
    assert grads["b"].shape == ()
    bad = {"w": w, "b": 0.5, "count": jnp.zeros((), jnp.uint32)}  # e.g. an nnx RngCount
    for fn in (estimate.per_example, estimate.microbatch):
        with pytest.raises(ValueError, match="params leaf count is uint32, not a float"):
            fn(lambda p, batch: loss_fn(p, batch), bad, x)


def test_impossible_inputs_are_named_before_any_statistic():
    """Negative squared norms, per-layer arrays of two shapes, a loss that is not a scalar and
    an empty Hessian batch are errors that say what to pass (not a negative b_simple, a
    broadcast, JAX's gradient error or an infinite noise scale)."""
    with pytest.raises(ValueError, match="squared norms cannot be negative"):
        estimate.from_two_batches(-3.0, 1.5, 1, 4)
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(1,\)"):
        estimate.from_two_batches([1.0, 2.0], [1.0], 1, 4)
    layers = estimate.from_two_batches(np.array([3.0, 2.0]), np.array([1.5, 1.0]), 1, 4)
    assert layers.to_dict()["g_sq"] == pytest.approx([1.0, 2 / 3])  # per layer, as lists
    x, w = jnp.ones((8, 3)), jnp.zeros(3)
    for f in (estimate.per_example, functools.partial(estimate.microbatch, num_microbatches=2)):
        with pytest.raises(ValueError, match=r"must return a scalar .*got \(8,\).*has_aux=True"):
            f(lambda p, b: b @ p, w, x)
    loss = lambda p, b: jnp.mean((b @ p) ** 2)
    with pytest.raises(ValueError, match="hessian_batch is empty"):
        estimate.hessian_aware(loss, w, x, x[:0])
