"""The fast per-example path (gns.ghost) against per-example gradients by jax.vmap."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, PartitionSpec

from gns import estimate, ghost

RTOL, ATOL = 2e-4, 1e-6


def vmap_sq_norms(loss_fn, params, batch):
    """Independent reference: per-leaf sum over examples of squared per-example gradients."""

    def one(example):
        return jax.grad(loss_fn)(params, jax.tree.map(lambda x: x[None], example))

    grads = jax.vmap(one)(batch)
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g)), grads)


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=str(path))


def classifier_loss(model):
    def loss_fn(params, batch):
        x, y = batch
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


def setup(model, x, num_classes=5, seed=0):
    params = model.init(jax.random.key(seed), x[:1])["params"]
    y = jnp.arange(x.shape[0]) % num_classes
    return classifier_loss(model), params, (x, y)


class ConvNet(nn.Module):
    padding: str = "SAME"
    strides: tuple = (1, 2)
    use_bias: bool = True
    kernel_size: tuple = (3, 3)
    kernel_dilation: int = 1
    norm: str | None = None

    @nn.compact
    def __call__(self, x):
        for i, s in enumerate(self.strides):
            x = nn.Conv(
                4 + 2 * i,
                self.kernel_size,
                strides=s,
                padding=self.padding,
                use_bias=self.use_bias,
                kernel_dilation=self.kernel_dilation,
            )(x)
            if self.norm == "group":
                x = nn.GroupNorm(num_groups=2)(x)
            elif self.norm == "layer":
                x = nn.LayerNorm()(x)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(5, use_bias=self.use_bias)(x)


class Mixed(nn.Module):
    """Covered layers (Conv, GroupNorm, Embed, Dense) mixed with an uncovered custom param and
    a layer called twice (shared weights)."""

    @nn.compact
    def __call__(self, x):
        images, tokens = x[..., :-1], x[:, 0, 0, -1].astype(jnp.int32)
        h = nn.Conv(4, (3, 3), strides=2)(images)
        h = nn.GroupNorm(num_groups=2)(h)
        h = h * self.param("gain", nn.initializers.ones, (4,))  # uncovered
        h = jnp.mean(nn.relu(h), axis=(1, 2))
        h = h + nn.Embed(7, 4)(tokens)  # one token per example
        shared = nn.Dense(4)
        h = shared(nn.tanh(shared(h)))  # shared: fallback
        return nn.Dense(5)(h)


class SeqModel(nn.Module):
    """Dense on a sequence (T > 1 positions per example) and LayerNorm/RMSNorm."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x)  # [B, T, 6]
        h = nn.LayerNorm()(nn.gelu(h))
        h = nn.RMSNorm()(nn.Dense(3)(h))
        return nn.Dense(5)(h.reshape(h.shape[0], -1))


def images(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def check_equal_to_vmap(loss_fn, params, batch, forms=("auto",)):
    """Ghost norms in each form equal vmap's (one jit: a single compilation per model)."""

    def both(p, b):
        forms_sq = [ghost.per_example_sq_norms(loss_fn, p, b, form=f) for f in forms]
        return vmap_sq_norms(loss_fn, p, b), forms_sq

    want, got = jax.jit(both)(params, batch)
    for g in got:
        assert_trees_close(g, want)


@pytest.mark.parametrize(
    "padding, strides, use_bias, norm",
    [("SAME", (1, 2), True, "group"), ("VALID", (2, 1), False, "layer")],
)
def test_conv_nets_equal_vmap_in_both_forms(padding, strides, use_bias, norm):
    model = ConvNet(padding=padding, strides=strides, use_bias=use_bias, norm=norm)
    loss_fn, params, batch = setup(model, images((3, 7, 7, 3)))
    plan = ghost.plan(loss_fn, params, batch)
    assert all(c.covered for c in plan.calls), plan.describe()
    assert plan.fallback == ()
    check_equal_to_vmap(loss_fn, params, batch, forms=("direct", "gram"))


@settings(max_examples=3, deadline=None)
@given(
    kernel=st.sampled_from([(1, 1), (2, 3), (3, 3)]),
    stride=st.sampled_from([1, 2, 3]),
    dilation=st.sampled_from([1, 2]),
    padding=st.sampled_from(["SAME", "VALID", ((2, 0), (1, 1))]),
    form=st.sampled_from(["direct", "gram"]),
)
def test_conv_configs_property(kernel, stride, dilation, padding, form):
    """Any kernel size, stride, dilation and padding: ghost kernel norms equal vmap's."""
    model = ConvNet(
        padding=padding, strides=(stride,), kernel_size=kernel, kernel_dilation=dilation
    )
    loss_fn, params, batch = setup(model, images((3, 8, 7, 2)))
    check_equal_to_vmap(loss_fn, params, batch, forms=(form,))


def test_sequence_dense_and_norm_layers_equal_vmap():
    loss_fn, params, batch = setup(SeqModel(), images((4, 3, 3)))
    plan = ghost.plan(loss_fn, params, batch)
    assert [c.kind for c in plan.calls] == ["dense", "norm", "dense", "norm", "dense"]
    assert all(c.covered for c in plan.calls), plan.describe()
    check_equal_to_vmap(loss_fn, params, batch, forms=("direct", "gram"))


def test_mixed_model_routes_uncovered_leaves_to_vmap():
    x = images((4, 6, 6, 4))
    tokens = jnp.arange(4) % 7
    x = x.at[..., -1].set(tokens[:, None, None].astype(jnp.float32))
    loss_fn, params, batch = setup(Mixed(), x)
    plan = ghost.plan(loss_fn, params, batch)
    status = {c.path: c.covered for c in plan.calls}
    assert status == {
        "Conv_0": True,
        "GroupNorm_0": True,
        "Embed_0": True,
        "Dense_0": False,
        "Dense_1": True,
    }
    names = [estimate._leaf_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert sorted(names[j] for j in plan.fallback) == ["Dense_0/bias", "Dense_0/kernel", "gain"]
    described = plan.describe()
    assert "Dense_0 (Dense): fallback: parameters shared with another call" in described
    assert "leaf gain: per-example gradients by vmap: read by no covered layer" in described
    check_equal_to_vmap(loss_fn, params, batch)


def test_weight_penalty_in_loss_goes_to_fallback():
    """A leaf used outside its layer (here an L2 term inside loss_fn) is not ghost-normed."""
    model = ConvNet(strides=(2,))
    base, params, batch = setup(model, images((3, 6, 6, 3)))

    def loss_fn(p, b):
        return base(p, b) + 0.1 * jnp.sum(p["Dense_0"]["kernel"] ** 2)

    plan = ghost.plan(loss_fn, params, batch)
    assert {c.path: c.covered for c in plan.calls} == {"Conv_0": True, "Dense_0": False}
    check_equal_to_vmap(loss_fn, params, batch)


def test_cost_model_picks_cheaper_form():
    # A stride-1 first conv at 32x32 (T=1024) is direct, a conv at 8x8 (T=64) Gram.
    assert ghost._pick("auto", 1024, 27, 32) == "direct"
    assert ghost._pick("auto", 64, 576, 128) == "gram"
    assert ghost._pick("auto", 1, 128, 10) == "gram"  # Dense: rank one
    assert ghost._pick("direct", 1, 128, 10) == "direct"


def test_per_example_auto_and_vmap_give_same_stats_and_grad():
    model = ConvNet(norm="group")
    loss_fn, params, batch = setup(model, images((6, 7, 7, 3)))

    def both(p, b):
        fast = estimate.per_example(loss_fn, p, b)
        return fast, estimate.per_example(loss_fn, p, b, method="vmap"), jax.grad(loss_fn)(p, b)

    (fast, g_fast), (ref, g_ref), g_true = jax.jit(both)(params, batch)
    assert_trees_close(g_fast, g_true, rtol=1e-5)  # the mean gradient is jax.grad's
    assert_trees_close(g_ref, g_true, rtol=1e-5)
    np.testing.assert_allclose(fast.g_sq, ref.g_sq, rtol=RTOL)
    np.testing.assert_allclose(fast.trace_cov, ref.trace_cov, rtol=RTOL)
    assert fast.per_layer.keys() == ref.per_layer.keys()
    for k in ref.per_layer:
        np.testing.assert_allclose(
            fast.per_layer[k].trace_cov, ref.per_layer[k].trace_cov, rtol=RTOL, atol=ATOL
        )


def test_has_aux_returns_one_batch_aux():
    model = ConvNet(strides=(2,))
    base, params, batch = setup(model, images((4, 6, 6, 3)))

    def loss_fn(p, b):
        loss = base(p, b)
        return loss, {"loss": loss}

    def both(p, b):
        return estimate.per_example(loss_fn, p, b, has_aux=True), estimate.per_example(
            loss_fn, p, b, has_aux=True, method="vmap"
        )

    (stats, _, aux), (ref, _, ref_aux) = jax.jit(both)(params, batch)
    assert aux["loss"].shape == (1,) and ref_aux["loss"].shape == (4,)
    np.testing.assert_allclose(aux["loss"][0], jnp.mean(ref_aux["loss"]), rtol=1e-5)
    np.testing.assert_allclose(stats.trace_cov, ref.trace_cov, rtol=RTOL)


def plain_loss(w, batch):
    x, y = batch
    return jnp.mean((x @ w - y) ** 2)


def test_plain_jax_loss_falls_back_or_errors():
    x = images((16, 3))
    batch, w = (x, x @ jnp.ones(3)), jnp.zeros(3)
    auto, _ = estimate.per_example(plain_loss, w, batch)
    ref, _ = estimate.per_example(plain_loss, w, batch, method="vmap")
    np.testing.assert_allclose(auto.trace_cov, ref.trace_cov, rtol=1e-6)
    with pytest.raises(ValueError, match="method='ghost'.*covers no parameter"):
        estimate.per_example(plain_loss, w, batch, method="ghost")
    with pytest.raises(ValueError, match="method must be"):
        estimate.per_example(plain_loss, w, batch, method="ghosts")


def test_axis_name_in_shard_map_matches_global_vmap():
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py simulates them on CPU)")
    mesh = Mesh(np.array(devices), ("batch",))
    model = ConvNet(strides=(2,), norm="group")
    loss_fn, params, batch = setup(model, images((8, 6, 6, 3)))

    def local(p, b):
        stats, grads = estimate.per_example(loss_fn, p, b, axis_name="batch", method="ghost")
        return stats.g_sq, stats.trace_cov, grads

    sharded = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec("batch")),
            out_specs=PartitionSpec(),
        )
    )
    g_sq, trace_cov, grads = sharded(params, batch)
    ref, ref_grads = jax.jit(lambda p, b: estimate.per_example(loss_fn, p, b, method="vmap"))(
        params, batch
    )
    np.testing.assert_allclose(g_sq, ref.g_sq, rtol=1e-3)
    np.testing.assert_allclose(trace_cov, ref.trace_cov, rtol=RTOL)
    assert_trees_close(grads, ref_grads, rtol=1e-5)
