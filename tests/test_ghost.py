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

from gns import common, estimate, ghost

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


def test_kernel_norms_in_example_chunks_equal_vmap(monkeypatch):
    """Convolutions whose per-example intermediates exceed ghost.CHUNK_BYTES are computed over
    example chunks in turn: the same norms (a tiny budget here forces chunking)."""
    monkeypatch.setattr(ghost, "CHUNK_BYTES", 100)
    loss_fn, params, batch = setup(ConvNet(norm="group"), images((6, 7, 7, 3)))
    plan = ghost.plan(loss_fn, params, batch)
    chunks = {c.path: c.chunks for c in plan.calls if c.kind == "conv"}
    assert min(chunks.values()) > 1 and all(6 % k == 0 for k in chunks.values()), chunks
    assert all(c.chunks == 1 for c in plan.calls if c.kind != "conv")  # dense: whole batch
    assert f"in {max(chunks.values())} example chunks" in plan.describe()
    check_equal_to_vmap(loss_fn, params, batch, forms=("auto", "direct", "gram"))
    monkeypatch.setattr(ghost, "CHUNK_BYTES", 4 * 2**20)  # the default: no chunks at this size
    assert all(c.chunks == 1 for c in ghost.plan(loss_fn, params, batch).calls)


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
    names = [common.leaf_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
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
        return estimate.per_example(
            loss_fn, p, b, has_aux=True, method="ghost"
        ), estimate.per_example(loss_fn, p, b, has_aux=True, method="vmap")

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
    assert ghost.select(plain_loss, w, batch) is None  # "auto": vmap
    with pytest.raises(ValueError, match="method='ghost'.*covers no parameter"):
        ghost.select(plain_loss, w, batch, method="ghost")


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


# ---------------------------------------------------------------------------------------------
# Transformer layers (float64: the fast path must equal vmap to float64 rounding).

RTOL64, ATOL64 = 1e-10, 1e-13


def check_equal_to_vmap_x64(loss_fn, params, batch, forms=("auto",), the_plan=None):
    """Like check_equal_to_vmap, in float64, and the mean gradient equals jax.grad's."""
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    the_plan = the_plan or ghost.plan(loss_fn, params, batch)
    n = estimate.batch_size(batch)

    def all_of_it(p, b):
        fast = [ghost.sums(loss_fn, p, b, the_plan, form=f)[:2] for f in forms]
        return vmap_sq_norms(loss_fn, p, b), fast, jax.grad(loss_fn)(p, b)

    want, fast, true_grads = jax.jit(all_of_it)(params, batch)
    # gns.estimate accumulates the fallback leaves' per-example norms in float32
    rtol = 1e-6 if the_plan.fallback else RTOL64
    for grad_sum, sq in fast:
        assert_trees_close(sq, want, rtol=rtol, atol=ATOL64)
        mean = jax.tree.map(lambda g: g / n, grad_sum)
        assert_trees_close(mean, true_grads, rtol=1e-12, atol=1e-14)


def init64(model, *args):
    """float64 random parameters from NumPy (eager flax init of a Transformer costs seconds)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float64), shapes)


class TokenModel(nn.Module):
    """Embed -> per-position Dense; token 0 is padding (its positions carry no loss)."""

    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(5)(jnp.tanh(nn.Embed(6, 3)(tokens)))


def test_embed_repeated_and_padding_tokens_equal_vmap():
    with jax.enable_x64(True):
        tokens = jnp.array([[1, 2, 1, 1, 0, 0], [3, 3, 3, 3, 3, 3], [5, 4, 2, 0, 0, 0]])
        targets = jnp.arange(18).reshape(3, 6) % 5
        model = TokenModel()

        def loss_fn(p, batch):
            tok, y = batch
            nll = optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, tok), y
            )
            mask = tok != 0
            return jnp.mean(jnp.sum(nll * mask, axis=1) / jnp.sum(mask, axis=1))

        params = init64(model, tokens[:1])
        the_plan = ghost.plan(loss_fn, params, (tokens, targets))
        assert all(c.covered for c in the_plan.calls) and the_plan.fallback == ()
        # direct = scatter into a per-example table, gram = token-equality Gram
        check_equal_to_vmap_x64(
            loss_fn, params, (tokens, targets), forms=("direct", "gram"), the_plan=the_plan
        )


class DenseGeneralStack(nn.Module):
    """DenseGeneral layouts: features tuples, several (non-adjacent) contracted axes."""

    @nn.compact
    def __call__(self, x):  # [B, 3, 4, 5]
        h = nn.DenseGeneral(features=(2, 3), axis=-1)(x)  # [B, 3, 4, 2, 3]
        h = nn.DenseGeneral(features=4, axis=(-2, -1), use_bias=False)(jnp.tanh(h))  # [B,3,4,4]
        h = nn.DenseGeneral(features=(2,), axis=(1, 3))(jnp.tanh(h))  # [B, 4, 2]
        return nn.Dense(5)(h.reshape(h.shape[0], -1))


def test_dense_general_layouts_equal_vmap():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (3, 3, 4, 5), jnp.float64)
        model = DenseGeneralStack()
        params = init64(model, x[:1])
        loss_fn = classifier_loss(model)
        batch = (x, jnp.arange(3) % 5)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert [c.module for c in the_plan.calls] == ["DenseGeneral"] * 3 + ["Dense"]
        assert all(c.covered for c in the_plan.calls), the_plan.describe()
        check_equal_to_vmap_x64(loss_fn, params, batch, ("direct", "gram"), the_plan)


class Attention(nn.Module):
    masked: bool = False

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        mask = None
        if self.masked:  # causal, and per-example key padding (from the data)
            keep = x[..., 0] < 0.5
            mask = nn.combine_masks(
                nn.make_causal_mask(x[..., 0]), nn.make_attention_mask(keep, keep)
            )
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, normalize_qk=True)(
            x, mask=mask
        )
        return nn.Dense(5)(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("masked", [False, True])
def test_multi_head_attention_equals_vmap(masked):
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(2), (4, 3, 6), jnp.float64)
        model = Attention(masked=masked)
        params = init64(model, x[:1])
        loss_fn = classifier_loss(model)
        batch = (x, jnp.arange(4) % 5)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert all(c.covered for c in the_plan.calls), the_plan.describe()
        assert the_plan.fallback == ()
        check_equal_to_vmap_x64(loss_fn, params, batch, the_plan=the_plan)


class EinsumModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, T, D]
        h = nn.Einsum((2, 5, 3), "btd,hdf->bthf")(x)  # heads as output features
        h = nn.Einsum((2, 3, 4), "bthf,hfk->bthk", use_bias=False)(jnp.tanh(h))  # h shared
        h = nn.Einsum((4, 5), "...k,kc->...c")(jnp.tanh(h))  # ellipsis
        return h.sum(axis=(1, 2))


def test_einsum_equals_vmap():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(3), (3, 4, 5), jnp.float64)
        model = EinsumModel()
        params = init64(model, x[:1])
        loss_fn = classifier_loss(model)
        batch = (x, jnp.arange(3) % 5)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert all(c.covered for c in the_plan.calls), the_plan.describe()
        assert the_plan.calls[1].layout.s == 2  # the shared head letter
        check_equal_to_vmap_x64(loss_fn, params, batch, ("direct", "gram"), the_plan)


class PositionModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, T, D], T shorter than max_length
        h = ghost.AddPositionEmbedding(max_length=6)(x)
        return nn.Dense(5)(jnp.tanh(h).reshape(h.shape[0], -1))


def test_position_embedding_equals_vmap():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(4), (3, 4, 2), jnp.float64)
        model = PositionModel()
        params = init64(model, x[:1])
        loss_fn = classifier_loss(model)
        batch = (x, jnp.arange(3) % 5)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert [c.kind for c in the_plan.calls] == ["position", "dense"]
        assert the_plan.fallback == ()
        check_equal_to_vmap_x64(loss_fn, params, batch, the_plan=the_plan)
    with pytest.raises(ValueError, match="length <= max_length"):
        model.init(jax.random.key(0), jnp.zeros((1, 7, 2)))


def lm_setup(tie=False, batch=3, context=5, vocab=7, abstract=False):
    from experiments import bench_lm, models  # noqa: PLC0415

    model = models.TransformerLM(
        vocab_size=vocab, context=context, width=4, depth=1, num_heads=2, tie_embeddings=tie
    )
    tokens = jax.random.randint(jax.random.key(5), (batch, context + 1), 0, vocab)
    tokens = tokens.at[0, :3].set(2)  # a repeated token
    if abstract:  # shapes only, for the cost model
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens[:1, :-1])["params"])
    else:
        params = init64(model, tokens[:1, :-1])
    return bench_lm.lm_loss(model), params, tokens


@pytest.mark.parametrize("tie", [False, True])
def test_transformer_lm_equals_vmap(tie):
    with jax.enable_x64(True):
        loss_fn, params, tokens = lm_setup(tie)
        the_plan = ghost.plan(loss_fn, params, tokens)
        uncovered = {c.path: c.reason for c in the_plan.calls if not c.covered}
        # a tied head reads the embedding outside nn.Embed.__call__: the embedding falls back
        assert uncovered == ({"embed": "parameters also used outside the layer"} if tie else {})
        check_equal_to_vmap_x64(loss_fn, params, tokens, the_plan=the_plan)


# ---------------------------------------------------------------------------------------------
# The cost model: auto never picks a path that is slower than vmap.


class BarePositionModel(nn.Module):
    """A bare self.param position embedding at the input of a long-sequence model: the fallback
    backpropagates per example through the whole network, so the fast path would cost a plain
    backward pass more than vmap (measured at batch 8, 2 CPU cores: 0.61 ms against 0.38)."""

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        for _ in range(2):
            x = nn.gelu(nn.Dense(16)(x))
        return nn.Dense(5)(x.mean(axis=1))


def test_cost_model_picks_vmap_when_the_fallback_dominates():
    x = jnp.zeros((8, 128, 16))
    model = BarePositionModel()
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1])["params"])
    loss_fn = classifier_loss(model)
    batch = (x, jnp.zeros(8, jnp.int32))
    the_plan = ghost.plan(loss_fn, params, batch)
    assert all(c.covered for c in the_plan.calls)
    assert [the_plan.leaf_names[j] for j in the_plan.fallback] == ["pos"]
    assert the_plan.cost("ghost") > the_plan.cost("vmap")
    assert the_plan.method == "vmap"
    assert ghost.select(loss_fn, params, batch) is None  # method="auto" runs vmap
    assert ghost.select(loss_fn, params, batch, method="ghost").method == "vmap"  # forced
    assert ghost.select(loss_fn, params, batch, method="vmap") is None
    text = the_plan.describe()
    assert "leaf pos: per-example gradients by vmap" in text and "AddPositionEmbedding" in text
    assert text.splitlines()[-1].startswith("auto: vmap")


def test_cost_model_picks_the_fast_path_for_transformer_and_cnn():
    loss_fn, params, tokens = lm_setup(batch=16, context=16, vocab=32, abstract=True)
    lm_plan = ghost.select(loss_fn, params, tokens)
    assert lm_plan is not None and lm_plan.method == "ghost"
    assert lm_plan.cost("ghost") < lm_plan.cost("vmap")
    assert lm_plan.describe().splitlines()[-1].startswith("auto: ghost")
    from experiments import models  # noqa: PLC0415

    cnn = models.SmallCNN()  # the CIFAR-10 cpu model, at batch 128
    x = jnp.zeros((128, 32, 32, 3))
    cnn_params = jax.eval_shape(lambda: cnn.init(jax.random.key(0), x[:1])["params"])
    cnn_batch = (x, jnp.zeros(128, jnp.int32))
    assert ghost.plan(classifier_loss(cnn), cnn_params, cnn_batch).method == "ghost"


def with_aux(loss_fn):
    def loss_aux(p, b):
        loss = loss_fn(p, b)
        return loss, loss

    return loss_aux


def check_auto_runs(method, loss_fn, params, batch, rtol):
    """per_example(method="auto") runs ``method`` (the fast path returns one aux, vmap one per
    example) and gives vmap's statistics and jax.grad's mean gradient."""
    n = estimate.batch_size(batch)

    def run(p, b):
        auto = estimate.per_example(with_aux(loss_fn), p, b, has_aux=True)
        return auto, estimate.per_example(loss_fn, p, b, method="vmap"), jax.grad(loss_fn)(p, b)

    (stats, grads, aux), (ref, ref_grads), true_grads = jax.jit(run)(params, batch)
    assert aux.shape == ((1,) if method == "ghost" else (n,))
    np.testing.assert_allclose(stats.g_sq, ref.g_sq, rtol=rtol)
    np.testing.assert_allclose(stats.trace_cov, ref.trace_cov, rtol=rtol)
    assert_trees_close(grads, true_grads, rtol=1e-5, atol=1e-7)
    assert_trees_close(ref_grads, true_grads, rtol=1e-5, atol=1e-7)


def test_per_example_auto_follows_the_cost_model():
    # Slower fast path (the bare position embedding falls back at the input): auto runs vmap.
    x = jax.random.normal(jax.random.key(2), (8, 128, 16))
    model = BarePositionModel()
    loss_fn, params, batch = setup(model, x)
    assert ghost.plan(loss_fn, params, batch).method == "vmap"
    check_auto_runs("vmap", loss_fn, params, batch, rtol=1e-6)
    # Faster fast path (the Transformer, every layer covered): auto runs it.
    loss_fn, shapes, tokens = lm_setup(batch=16, context=16, vocab=32, abstract=True)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), shapes)
    assert ghost.plan(loss_fn, params, tokens).method == "ghost"
    check_auto_runs("ghost", loss_fn, params, tokens, rtol=2e-4)


def test_cost_model_forms_for_embed_and_dense():
    # Embedding: Gram T²·D against a per-example [vocab, D] table.
    loss_fn, params, tokens = lm_setup(batch=4, context=16, vocab=4096, abstract=True)
    forms = {c.path: c.form for c in ghost.plan(loss_fn, params, tokens).calls}
    assert forms["embed"] == "gram"  # a large vocabulary: no per-example table
    loss_fn, params, tokens = lm_setup(batch=4, context=64, vocab=2, abstract=True)
    assert {c.path: c.form for c in ghost.plan(loss_fn, params, tokens).calls}["embed"] == "direct"
