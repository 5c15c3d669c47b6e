"""The fast per-example path (gns.ghost) against per-example gradients by jax.vmap."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from gns import common, estimate, ghost, hardware

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


def random_init(model, *args, dtype=None):
    """Random parameters from NumPy (in ``dtype``, else the model's): tracing only, no
    compilation (eager flax init compiles every layer's initializers)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jax.device_put(rng.normal(0, 0.5, s.shape).astype(dtype or s.dtype)), shapes
    )


def setup(model, x, num_classes=5, dtype=None):
    params = random_init(model, x[:1], dtype=dtype)
    y = np.arange(x.shape[0]) % num_classes
    return classifier_loss(model), params, (x, y)


def setup64(model, shape):
    """:func:`setup` in float64 on random images of ``shape`` (inside ``jax.enable_x64``)."""
    return setup(model, images(shape, dtype=np.float64), dtype=jnp.float64)


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
    """Covered layers (Conv, GroupNorm, Embed, Dense, a layer called twice: shared weights, a
    scale read through ``exp``) mixed with an uncovered custom param (a soft floor read by
    ``jnp.logaddexp``, a ``custom_jvp`` function)."""

    @nn.compact
    def __call__(self, x):
        images, tokens = x[..., :-1], x[:, 0, 0, -1].astype(jnp.int32)
        h = nn.Conv(4, (3, 3), strides=2)(images)
        h = nn.GroupNorm(num_groups=2)(h)
        h = h * self.param("gain", nn.initializers.ones, (4,))  # covered: a broadcast scale
        h = h * jnp.exp(self.param("log_scale", nn.initializers.zeros, (4,)))  # through exp
        h = jnp.logaddexp(h, self.param("floor", nn.initializers.zeros, (4,)))  # uncovered
        h = jnp.mean(nn.relu(h), axis=(1, 2))
        h = h + nn.Embed(7, 4)(tokens)  # one token per example
        shared = nn.Dense(4)
        h = shared(nn.tanh(shared(h)))  # shared: per-example gradients summed
        return nn.Dense(5)(h)


class SeqModel(nn.Module):
    """Dense on a sequence (T > 1 positions per example) and LayerNorm/RMSNorm."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x)  # [B, T, 6]
        h = nn.LayerNorm()(nn.gelu(h))
        h = nn.RMSNorm()(nn.Dense(3)(h))
        return nn.Dense(5)(h.reshape(h.shape[0], -1))


def images(shape, seed=1, dtype=np.float32):
    return jax.device_put(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def check_equal_to_vmap(loss_fn, params, batch, forms=("auto",)):
    """Ghost norms in each form equal vmap's (one jit: a single compilation per model)."""

    def both(p, b):
        forms_sq = [ghost.per_example_sq_norms(loss_fn, p, b, form=f) for f in forms]
        return vmap_sq_norms(loss_fn, p, b), forms_sq

    want, got = jax.jit(both)(params, batch)
    for g in got:
        assert_trees_close(g, want)


def test_conv_net_valid_padding_no_bias_equals_vmap_in_both_forms():
    model = ConvNet(padding="VALID", strides=(2, 1), use_bias=False, norm="layer")
    loss_fn, params, batch = setup(model, images((3, 7, 7, 3)))
    plan = ghost.plan(loss_fn, params, batch)
    assert plan.fallback == () and len(plan.consumers) == plan.num_leaves, plan.describe()
    assert {c.kind for c in plan.consumers} >= {"conv", "dense", "sum"}
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
    kinds = {plan.leaf_names[c.leaf]: c.kind for c in plan.consumers}
    assert plan.fallback == () and len(kinds) == plan.num_leaves, plan.describe()
    assert kinds["Dense_0/kernel"] == "dense" and kinds["LayerNorm_0/scale"] == "sum"
    check_equal_to_vmap(loss_fn, params, batch, forms=("direct", "gram"))


def test_conv_net_equals_vmap_in_every_form_whole_and_in_chunks(monkeypatch):
    """A conv net (SAME padding, biases, GroupNorm), every leaf covered: each form equals vmap,
    on the whole batch and over 2 example chunks. Convolutions whose per-example intermediates
    exceed ghost.CHUNK_BYTES are computed over example chunks in turn: the same norms (a tiny
    budget here forces chunking)."""
    loss_fn, params, batch = setup(ConvNet(norm="group"), images((6, 7, 7, 3)))
    plan = ghost.plan(loss_fn, params, batch)  # the default budget: no chunks at this size
    assert plan.fallback == () and len(plan.consumers) == plan.num_leaves, plan.describe()
    assert {c.kind for c in plan.consumers} >= {"conv", "dense", "sum"}
    assert all(c.chunks == 1 for c in plan.consumers)
    monkeypatch.setattr(ghost, "CHUNK_BYTES", 100)
    tiny = ghost.plan(loss_fn, params, batch)
    chunks = {c.leaf: c.chunks for c in tiny.consumers if c.kind == "conv"}
    assert min(chunks.values()) > 1 and all(6 % k == 0 for k in chunks.values()), chunks
    assert all(c.chunks == 1 for c in tiny.consumers if c.kind != "conv")  # dense: whole batch
    assert f"in {max(chunks.values())} example chunks" in tiny.describe()
    more = [(tiny, f) for f in ghost.FORMS]
    check_sums(loss_fn, params, batch, ("direct", "gram"), plan, k=2, more=more)


class GroupedConvNet(nn.Module):
    """A depthwise convolution (one group per input channel, 2 outputs each) and a grouped
    one (2 groups), as in MobileNet or ConvNeXt blocks."""

    stride: int = 1
    dilation: int = 1
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        kw = dict(strides=self.stride, kernel_dilation=self.dilation, padding=self.padding)
        x = nn.Conv(8, (3, 3), feature_group_count=4, **kw)(x)  # depthwise, multiplier 2
        x = nn.LayerNorm()(nn.gelu(x))
        x = nn.relu(nn.Conv(6, (2, 2), feature_group_count=2, use_bias=False)(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("stride, dilation, padding", [(1, 1, "SAME"), (2, 2, "VALID")])
def test_grouped_convolutions_equal_vmap(monkeypatch, stride, dilation, padding):
    """Depthwise and grouped convolutions are covered, in the direct form (their Gram form
    would need one Gram matrix per group): norms equal vmap's, on the whole batch, over 2
    example chunks, and with their norms computed over example chunks in turn."""
    model = GroupedConvNet(stride, dilation, padding)
    with jax.enable_x64(True):
        loss_fn, params, batch = setup64(model, (4, 9, 9, 3))
        the_plan = ghost.plan(loss_fn, params, batch)
        assert the_plan.fallback == () and len(the_plan.consumers) == the_plan.num_leaves
        grouped = {
            the_plan.name(c.leaf): (c.groups, c.form) for c in the_plan.consumers if c.groups > 1
        }
        assert grouped == {"Conv_1/kernel": (4, "direct"), "Conv_2/kernel": (2, "direct")}
        monkeypatch.setattr(ghost, "CHUNK_BYTES", 100)
        tiny = ghost.plan(loss_fn, params, batch)
        assert max(c.chunks for c in tiny.consumers if c.groups > 1) > 1
        more = [(tiny, "auto")]
        check_sums(loss_fn, params, batch, ("auto", "direct", "gram"), the_plan, k=2, more=more)


class Decoder(nn.Module):
    """Transposed convolutions (input dilation: a decoder's upsampling) with GroupNorm."""

    transpose_kernel: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        up = dict(strides=(2, 2), transpose_kernel=self.transpose_kernel)
        x = nn.GroupNorm(num_groups=2)(nn.ConvTranspose(4, (3, 3), **up)(x))
        x = nn.ConvTranspose(2, (2, 2), strides=(2, 2), padding="VALID")(nn.relu(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_transposed_convolutions_equal_vmap(transpose_kernel):
    """A transposed convolution is a convolution of the zero-spaced input: its kernels are
    covered in both forms (the kernel flipped and transposed by ``transpose_kernel``: steps
    that keep the norm), and the norms equal vmap's."""
    model = Decoder(transpose_kernel)
    with jax.enable_x64(True):
        loss_fn, params, batch = setup64(model, (4, 8, 8, 2))
        the_plan = ghost.plan(loss_fn, params, batch)
        assert the_plan.fallback == () and len(the_plan.consumers) == the_plan.num_leaves
        convs = sorted(the_plan.name(c.leaf) for c in the_plan.consumers if c.kind == "conv")
        assert convs == ["ConvTranspose_0/kernel", "ConvTranspose_1/kernel", "Conv_0/kernel"]
        check_sums(loss_fn, params, batch, ("auto", "direct", "gram"), the_plan, k=2)


def test_mixed_model_covers_shared_weights_and_routes_the_rest_to_vmap():
    x = np.array(images((4, 6, 6, 4)))
    x[..., -1] = (np.arange(4) % 7)[:, None, None]  # one token per example
    loss_fn, params, batch = setup(Mixed(), x)
    plan = ghost.plan(loss_fn, params, batch)
    names = [common.leaf_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert [names[j] for j in plan.fallback] == ["floor"]
    kinds = {names[c.leaf]: (c.primitive, c.kind) for c in plan.consumers}
    assert kinds["gain"] == ("mul", "sum")  # a bare self.param scale: covered
    assert kinds["Embed_0/embedding"] == ("gather", "embed")
    assert kinds["Conv_0/kernel"] == ("conv_general_dilated", "conv")
    parts = [names[c.leaf] for c in plan.consumers if c.parts]
    assert sorted(parts) == ["Dense_0/bias"] * 2 + ["Dense_0/kernel"] * 2 + ["log_scale"]
    described = plan.describe()
    assert "leaf floor: fallback (per-example norms by vmap): read inside custom_jvp" in described
    assert "leaf Dense_0/kernel: covered by dot_general (dense), direct form, one of 2 reads" in (
        described
    )
    assert "leaf log_scale: covered by mul (sum), direct form through exp (per-example" in (
        described
    )
    check_equal_to_vmap(loss_fn, params, batch)


def test_shared_weights_sum_their_reads_per_example():
    """Plain JAX, each leaf read by several covered operations: a kernel in two products and
    through a transpose, a bias added and subtracted, a scale multiplying twice, a table
    gathered and used as the (tied) output head. The per-example gradient of each is the
    sum of its reads' parts: squared norms equal vmap's to float64 rounding, in every form
    and over 2 example chunks, also with a weight penalty added to the loss."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        p = {
            "w": rng.normal(size=(5, 5)),
            "b": rng.normal(size=(5,)),
            "s": rng.normal(size=(1, 5)),
            "table": rng.normal(size=(7, 5)),
        }
        p = jax.tree.map(jnp.asarray, p)
        tokens = rng.integers(0, 7, (4, 3)).astype(np.int32)
        tokens[0, :2] = 2  # a repeated token

        def loss_fn(p, tokens):
            h = p["table"][tokens] * p["s"]
            h = jnp.tanh(h @ p["w"] + p["b"])
            h = jnp.tanh((h @ p["w"] - p["b"]) * p["s"]) @ p["w"].T
            logits = h @ p["table"].T
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.sum(logits, -1) / 7)

        the_plan = ghost.plan(loss_fn, p, tokens)
        reads = sorted(the_plan.name(c.leaf) for c in the_plan.consumers)
        assert reads == ["b"] * 2 + ["s"] * 2 + ["table"] * 2 + ["w"] * 3
        assert the_plan.fallback == () and all(c.parts for c in the_plan.consumers)
        check_sums(loss_fn, p, tokens, ("auto", "direct", "gram"), the_plan, k=2)

        def penalized(q, t):
            return loss_fn(q, t) + jnp.sum(q["w"] ** 2)

        with_penalty = ghost.plan(penalized, p, tokens)
        assert with_penalty.fallback == () and with_penalty.name(with_penalty.penalized[0]) == "w"
        check_sums(penalized, p, tokens, ("auto",), with_penalty, k=2)


class RematScan(nn.Module):
    """Blocks under ``nn.remat`` (a ``jax.checkpoint`` region) and a recurrent kernel read
    inside ``jax.lax.scan`` at every step."""

    @nn.compact
    def __call__(self, x):  # [B, T, 4]
        for _ in range(2):
            x = x + nn.remat(nn.Dense)(4)(jnp.tanh(x))
        w = self.param("recurrent", nn.initializers.orthogonal(), (4, 4))

        def cell(h, x_t):
            h = jnp.tanh(h @ w + x_t)
            return h, h

        _, hs = jax.lax.scan(cell, jnp.zeros((x.shape[0], 4)), jnp.swapaxes(x, 0, 1))
        return nn.Dense(5)(hs[-1])


def test_remat_regions_are_entered_and_a_recurrent_kernel_falls_back():
    """A remat region is inlined (its gradient is the plain one): the Dense layers inside are
    covered. A kernel read inside ``scan`` as a constant of every step falls back, named (the
    scan stays rolled: unrolled, each step would add per-example parts, no cheaper than
    vmap). Norms equal vmap's."""
    loss_fn, params, batch = setup(RematScan(), images((4, 3, 4)))
    the_plan = ghost.plan(loss_fn, params, batch)
    assert [the_plan.name(j) for j in the_plan.fallback] == ["recurrent"]
    assert (
        "leaf recurrent: fallback (per-example norms by vmap): read inside a scan as a "
        "constant of every step" in the_plan.describe()
    )
    assert len(the_plan.consumers) == the_plan.num_leaves - 1
    check_sums(loss_fn, params, batch, ("auto", "direct", "gram"), the_plan)


def test_a_scan_that_reads_two_kernels_names_why_for_each():
    x, p = images((8, 5, 3)), {"wx": jnp.full((3, 4), 0.1), "wh": jnp.full((4, 4), 0.1)}

    def loss(p, batch):
        def step(h, x_t):
            return jnp.tanh(x_t @ p["wx"] + h @ p["wh"]), None

        h, _ = jax.lax.scan(step, jnp.zeros((batch.shape[0], 4)), jnp.swapaxes(batch, 0, 1))
        return jnp.mean(h**2)

    with pytest.raises(ghost.NotApplicableError) as e:  # no leaf covered: the reasons say why
        ghost.plan(loss, p, x)
    assert "twice" not in str(e.value)  # each is read once: the scan's reason for both
    assert str(e.value).count("read inside a scan as a constant of every step") == 2


def test_a_model_of_one_example_vmapped_inside_the_loss_is_covered():
    """The Equinox idiom: the model takes one example and the loss maps it over the batch with
    ``jax.vmap``. The batched dot_generals, the broadcast bias and the convolution that vmap
    produces are covered like a batched model's: norms equal vmap's in every form."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        p = {
            "w1": rng.normal(size=(6, 5)),
            "b1": rng.normal(size=5),
            "w2": rng.normal(size=(5, 3)),
            "conv": rng.normal(size=(2, 1, 3, 3)),
        }
        p = jax.tree.map(jnp.asarray, p)

        def model(p, x, img):  # x [6], img [1, 5, 5]: one example
            c = jax.lax.conv_general_dilated(img[None], p["conv"], (1, 1), "SAME")[0]
            return (jnp.tanh(x @ p["w1"] + p["b1"]) + jnp.mean(c)) @ p["w2"]

        def loss_fn(p, batch):
            xs, imgs, ys = batch
            errors = jax.vmap(lambda x, i, y: jnp.sum((model(p, x, i) - y) ** 2))(xs, imgs, ys)
            return jnp.mean(errors)

        shapes = ((4, 6), (4, 1, 5, 5), (4, 3))
        batch = tuple(jnp.asarray(rng.normal(size=s)) for s in shapes)
        the_plan = ghost.plan(loss_fn, p, batch)
        assert the_plan.fallback == () and len(the_plan.consumers) == 4
        check_sums(loss_fn, p, batch, ("auto", "direct", "gram"), the_plan, k=2)


def test_nested_scans_unroll_within_one_budget():
    """A scan over 2 groups of stacked kernels, each group a scan over its 3 layers: 6 copies
    of the inner body, each reading its own slice ``[i:i+1, j:j+1]`` (no parts), equal to
    vmap. With ``MAX_UNROLL`` 4 the inner scans (2 x 3 > 4) stay rolled: the kernels fall
    back, named."""

    def loss_fn(p, x):
        def group(h, ws):
            return jax.lax.scan(lambda g, w: (jnp.tanh(g @ w), None), h, ws)[0], None

        return jnp.mean(jax.lax.scan(group, x, p["w"])[0] ** 2)

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        p = {"w": jnp.asarray(0.5 * rng.normal(size=(2, 3, 4, 4)))}
        x = jnp.asarray(rng.normal(size=(4, 4)))
        the_plan = ghost.plan(loss_fn, p, x)
        assert len(the_plan.consumers) == 6 and not any(c.parts for c in the_plan.consumers)
        assert "its slice [1:2, 0:1, 0:4, 0:4]" in the_plan.describe()
        check_sums(loss_fn, p, x, ("auto", "direct", "gram"), the_plan)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ghost, "MAX_UNROLL", 4)
            with pytest.raises(ghost.NotApplicableError, match="or of over 4 steps"):
                ghost.plan(loss_fn, p, x)


def test_nnx_layers_made_by_vmap_and_run_by_scan_equal_vmap():
    """Flax NNX's stacked layers (``nnx.vmap`` of the constructor, ``nnx.scan`` in the
    forward): each layer's slice of the stacked leaves is covered, no parts; equal to vmap."""
    from flax import nnx  # noqa: PLC0415

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin, self.norm = nnx.Linear(8, 8, rngs=rngs), nnx.LayerNorm(8, rngs=rngs)

        def __call__(self, x):
            return self.norm(x + jnp.tanh(self.lin(x)))

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
        return Block(rngs)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run_blocks(x, block):
        return block(x)

    graphdef, state = nnx.split((nnx.Linear(6, 8, rngs=nnx.Rngs(0)), make_blocks(nnx.Rngs(1))))

    def loss_fn(state, batch):
        inp, blocks = nnx.merge(graphdef, state)
        return jnp.mean((run_blocks(inp(batch[0]), blocks) - batch[1]) ** 2)

    batch = (images((8, 6)), images((8, 8), seed=2))
    the_plan = ghost.plan(loss_fn, state, batch)
    assert the_plan.fallback == () and not any(c.parts for c in the_plan.consumers)
    assert len(the_plan.consumers) == 2 + 4 * 3
    check_sums(loss_fn, state, batch, ("auto", "direct", "gram"), the_plan, k=2)


class ScannedBlocks(nn.Module):
    """Three residual blocks as one ``nn.scan`` over layers (their parameters stacked along a
    leading axis, as MaxText and big_vision stack them), each under ``nn.remat``."""

    @nn.compact
    def __call__(self, x):  # [B, 6]
        class Block(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                return nn.LayerNorm()(x + jnp.tanh(nn.Dense(x.shape[-1])(x))), None

        x = nn.Dense(8)(x)
        layers = nn.scan(
            nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x, _ = layers()(x, None)
        return nn.Dense(5)(x)


def test_scanned_layers_are_disjoint_slices_whose_norms_add():
    """A scan over stacked layers is unrolled: each layer reads its own slice of the stacked
    leaves, so their per-example squared norms add up (no cross terms, no parts). So does a
    plain-JAX reverse scan over stacked kernels whose outputs (``ys``) reach the loss. Both
    equal vmap's, in every form and in 2 chunks."""
    loss_fn, params, batch = setup64(ScannedBlocks(), (4, 6))
    the_plan = ghost.plan(loss_fn, params, batch)
    stacked = [c for c in the_plan.consumers if "ScanCheckpoint" in the_plan.name(c.leaf)]
    assert the_plan.fallback == () and len(stacked) == 4 * 3 and not any(c.parts for c in stacked)
    assert sorted({c.region[0][0] for c in stacked}) == [0, 1, 2]
    assert "one of 3 reads, its slice [1:2, 0:8, 0:8]" in the_plan.describe()
    check_sums(loss_fn, params, batch, ("auto", "direct", "gram"), the_plan, k=2)

    def plain_loss(p, x):  # x [B, 4]; p["w"] [3, 4, 4]
        def layer(h, w):
            h = jnp.tanh(h @ w)
            return h, jnp.sum(h, axis=-1)

        h, ys = jax.lax.scan(layer, x, p["w"], reverse=True)
        return jnp.mean((h @ p["out"]) ** 2) + jnp.mean(ys**2)

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        p = {"w": jnp.asarray(rng.normal(size=(3, 4, 4))), "out": jnp.asarray(rng.normal(size=4))}
        x = jnp.asarray(rng.normal(size=(4, 4)))
        the_plan = ghost.plan(plain_loss, p, x)
        assert the_plan.fallback == () and not any(c.parts for c in the_plan.consumers)
        check_sums(plain_loss, p, x, ("auto", "direct", "gram"), the_plan, k=2)


def test_parameters_through_example_free_steps_equal_vmap():
    """Plain JAX, each leaf reaching a covered read through a function of the parameters
    alone: a scale ``exp(log_scale)``, a kernel times a constant, a relative-position bias
    table gathered by a constant index matrix (T5 style) and broadcast to the attention
    logits. Each read's per-example parts are mapped back through the derivative of those
    steps: squared norms equal vmap's to float64 rounding, in every form and in 2 chunks."""
    rng = np.random.default_rng(4)
    t, h, d = 3, 2, 4
    rel = np.subtract.outer(np.arange(t), np.arange(t)) + t - 1  # [T, T] bucket of each pair
    with jax.enable_x64(True):
        p = {
            "log_scale": rng.normal(size=(d,)),
            "w": rng.normal(size=(d, h * d)),
            "rel_bias": rng.normal(size=(2 * t - 1, h)),
            "out": rng.normal(size=(h * d, 3)),
        }
        p = jax.tree.map(jnp.asarray, p)
        x = jnp.asarray(rng.normal(size=(4, t, d)))

        def loss_fn(p, x):
            x = x * jnp.exp(p["log_scale"])
            q = (x @ (0.5 * p["w"])).reshape(x.shape[0], t, h, d)
            logits = jnp.einsum("bthd,bshd->bhts", q, q)
            logits = logits + jnp.transpose(p["rel_bias"][rel], (2, 0, 1))
            y = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits), q).reshape(-1, t, h * d)
            return jnp.mean(jnp.tanh(y @ p["out"]) ** 2)

        the_plan = ghost.plan(loss_fn, p, x)
        assert the_plan.fallback == (), the_plan.describe()
        via = {the_plan.name(c.leaf): c.via for c in the_plan.consumers if c.parts}
        assert via == {"log_scale": ("exp",), "w": ("mul",), "rel_bias": ("gather",)}
        check_sums(loss_fn, p, x, ("auto", "direct", "gram"), the_plan, k=2)


def test_a_custom_vjp_on_a_parameter_falls_back_and_an_empty_leaf_counts_zero():
    """A parameter read through a ``custom_vjp`` (a clipped gradient) has no forward-mode
    derivative to carry per-example parts back through: that leaf falls back to vmap, and
    the statistics equal vmap's (the rule applied per example); a leaf of no elements adds 0."""

    @jax.custom_vjp
    def clip_grad(v):
        return v

    clip_grad.defvjp(lambda v: (v, None), lambda _, g: (jnp.clip(g, -0.01, 0.01),))
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        p = {"w": rng.normal(size=(4, 3)), "v": rng.normal(size=(4, 3)), "e": np.zeros((0, 3))}
        p = jax.tree.map(jnp.asarray, p)
        x = jnp.asarray(rng.normal(size=(8, 4)))

        def loss_fn(p, x):
            y = x @ clip_grad(p["w"]) + x @ p["v"] + p["e"].sum(0)
            return jnp.mean(jnp.tanh(y) ** 2)

        the_plan = ghost.plan(loss_fn, p, x)
        assert [the_plan.name(j) for j in the_plan.fallback] == ["w"]
        assert "custom_vjp" in the_plan.describe()
        check_equal_to_vmap(loss_fn, p, x)


def test_standardized_and_shared_conv_kernels_equal_vmap(monkeypatch):
    """A weight-standardized kernel (its mean and scale taken over the kernel, as in BiT and
    NFNets) and a kernel read by two convolutions: per-example parts carried back, squared
    norms equal vmap's to float64 rounding, in every form, in 2 chunks and with the parts
    computed over example chunks in turn."""
    rng = np.random.default_rng(6)
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(x, w, stride, padding):
        return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=dn)

    def loss_fn(p, x):
        k = p["k"] - jnp.mean(p["k"], axis=(0, 1, 2))
        k = k / jnp.sqrt(jnp.mean(k**2, axis=(0, 1, 2)) + 1e-5)
        h = jnp.tanh(conv(x, k, (1, 1), "SAME"))
        h = jnp.tanh(conv(h, p["shared"], (1, 1), "SAME"))
        return jnp.mean(conv(h, p["shared"], (2, 2), "VALID") ** 2)

    with jax.enable_x64(True):
        p = {"k": rng.normal(size=(3, 3, 2, 4)), "shared": rng.normal(size=(2, 2, 4, 4))}
        p = jax.tree.map(jnp.asarray, p)
        x = jnp.asarray(rng.normal(size=(4, 6, 6, 2)))
        the_plan = ghost.plan(loss_fn, p, x)
        assert the_plan.fallback == () and all(c.parts for c in the_plan.consumers)
        reads = sorted(the_plan.name(c.leaf) for c in the_plan.consumers)
        assert reads == ["k", "shared", "shared"]
        monkeypatch.setattr(ghost, "CHUNK_BYTES", 100)
        tiny = ghost.plan(loss_fn, p, x)
        assert min(c.chunks for c in tiny.consumers) > 1
        check_sums(loss_fn, p, x, ("auto", "direct", "gram"), the_plan, k=2, more=[(tiny, "auto")])


class WeightNormed(nn.Module):
    """``nn.WeightNorm`` around a Dense layer: its kernel is ``scale · v / |v|``, a function of
    two leaves."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(jnp.tanh(nn.WeightNorm(nn.Dense(6))(x)))


def test_parameters_combined_before_their_read_equal_vmap():
    """Leaves combined by a function of the parameters alone before their read: weight
    normalization and a merged low-rank update ``w + a @ b``. The read's per-example parts
    are carried back to every leaf of the combination: squared norms equal vmap's, also with
    a penalty on ``a``. A leaf combined with one that falls back falls back with it, named."""
    with jax.enable_x64(True):
        x = images((4, 4), dtype=np.float64)
        loss_fn, params, batch = setup(WeightNormed(), x, dtype=jnp.float64)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert the_plan.fallback == (), the_plan.describe()
        (scaled,) = [c for c in the_plan.consumers if c.others]  # the kernel and its scale
        assert {the_plan.name(j) for j in (scaled.leaf, *scaled.others)} == {
            "Dense_1/kernel",
            "WeightNorm_0/Dense_1/kernel/scale",
        }
        check_sums(loss_fn, params, batch, ("auto", "direct", "gram"), the_plan, k=2)

        rng = np.random.default_rng(7)
        shapes = {"w": (4, 3), "a": (4, 2), "b": (2, 3)}
        p = {k: jnp.asarray(rng.normal(size=shape)) for k, shape in shapes.items()}

        def lora(p, x):
            return jnp.mean(jnp.tanh(x @ (p["w"] + p["a"] @ p["b"])) ** 2)

        def also_apart(p, x):  # a and b also read apart, as an unmerged adapter
            return lora(p, x) + jnp.mean(jnp.sin((x @ p["a"]) @ p["b"]))

        the_plan = ghost.plan(lora, p, x)
        (c,) = the_plan.consumers
        assert the_plan.fallback == () and {c.leaf, *c.others} == {0, 1, 2}
        check_sums(lora, p, x, ("auto",), the_plan, k=2)
        apart = ghost.plan(also_apart, p, x)
        assert apart.fallback == () and all(c.parts for c in apart.consumers)
        check_sums(also_apart, p, x, ("auto",), apart, k=2)

        def penalized(q, b):
            return lora(q, b) + jnp.sum(q["a"] ** 2)

        check_sums(penalized, p, x, ("auto",), ghost.plan(penalized, p, x), k=2)
        with pytest.raises(ghost.NotApplicableError, match="w: read together with a param"):
            ghost.plan(lambda q, b: lora(q, b) + jnp.mean(jnp.logaddexp(b[:, :2], q["a"][0])), p, x)


def test_weight_penalties_add_their_gradient_to_every_example():
    """Weight penalties added to the loss (an L2 term on a kernel, a linear term on a bias, a
    leaf read only there), scaled and subtracted: each example's gradient of those leaves is
    its data part plus the penalty's gradient, assembled from the data part's norms, the
    mean gradient and the penalty's gradient: equal to vmap's in every form and in 3
    chunks. A loss that multiplies its data term by a penalty is not a sum: that leaf
    falls back, named."""
    with jax.enable_x64(True):
        model = ConvNet(strides=(2,))
        base, params, batch = setup64(model, (6, 6, 6, 3))
        params = {"net": params, "extra": jnp.asarray([0.5, -1.0])}

        def loss_fn(p, b):
            l2 = jnp.sum(p["net"]["Dense_0"]["kernel"] ** 2) + jnp.sum(p["extra"] ** 2)
            return base(p["net"], b) + 0.1 * l2 - jnp.sum(p["net"]["Conv_0"]["bias"]) / 3

        the_plan = ghost.plan(loss_fn, params, batch)
        named = {the_plan.name(j) for j in the_plan.penalized}
        assert the_plan.fallback == () and named == {
            "extra",
            "net/Dense_0/kernel",
            "net/Conv_0/bias",
        }
        assert "leaf extra: only in a penalty term of the loss" in the_plan.describe()
        check_sums(loss_fn, params, batch, ("auto", "direct", "gram"), the_plan, k=3)

        def scaled(p, b):
            return base(p["net"], b) * (1 + jnp.sum(p["net"]["Dense_0"]["kernel"] ** 2))

        the_plan = ghost.plan(scaled, params, batch)
        assert [the_plan.name(j) for j in the_plan.fallback] == ["net/Dense_0/kernel"]
        assert "multiplies the loss's data term" in the_plan.describe()
        check_sums(scaled, params, batch, ("auto",), the_plan)


def test_a_fallback_is_said_once_per_loss(monkeypatch):
    """A leaf that falls back is named in one FallbackWarning per loss (however often the step
    is traced); a loss the fast path cannot cover at all says so once under "auto"; a loss
    fully covered says nothing."""
    monkeypatch.setattr(ghost, "_WARNED", set())
    x = images((4, 3))
    p = {"w": jnp.ones((3, 2)), "floor": jnp.zeros(2)}

    def partly(q, b):
        return jnp.mean(jnp.logaddexp(b @ q["w"], q["floor"]) ** 2)

    with pytest.warns(
        ghost.FallbackWarning, match=r"1 of 2 parameter leaves .* floor \(read inside"
    ) as seen:
        for _ in range(3):  # three traces
            jax.jit(lambda q, b: estimate.per_example(partly, q, b)[0].g_sq).lower(p, x)
    assert len(seen) == 1

    def none(q, b):
        return jnp.mean(jnp.logaddexp(b[:, :2], q["floor"]) ** 2)

    with pytest.warns(ghost.FallbackWarning, match="by jax.vmap for every parameter") as seen:
        ghost.select(none, p, x)
        ghost.select(none, p, x)
    assert len(seen) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ghost.select(lambda q, b: jnp.mean((b @ q["w"]) ** 2), p, x)


def test_cost_model_picks_cheaper_form():
    # A dense layer on one position per example: the rank-one Gram form (the direct form's
    # per-example gradients would be B·K·C). A Transformer at context 64: the attention
    # projections (K = C = 128) direct, the 128 -> 512 MLP Gram (T²·(K+C) < bytes of B·K·C).
    # A stride-1 first conv at 32x32 (T=1024, K=27): direct; a conv at 8x8 (T=64, K=576): Gram.
    from experiments import bench, models  # noqa: PLC0415

    def forms(loss_fn, params, batch):  # tracing only: abstract parameters and batches
        the_plan = ghost.plan(loss_fn, params, batch)
        return {the_plan.name(c.leaf): c.form for c in the_plan.consumers}

    loss_fn, params, batch = bench.row_problem("plain_mlp", 128)
    assert {forms(loss_fn, params, batch)[f"w{i}"] for i in range(3)} == {"gram"}
    lm = bench.Lm1bTransformer(depth=1)
    tokens = jax.ShapeDtypeStruct((32, 65), jnp.int32)
    params = jax.eval_shape(lambda: lm.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32)))
    lm_forms = forms(bench.lm_loss(lm), params["params"], tokens)
    assert lm_forms["MultiHeadDotProductAttention_0/query/kernel"] == "direct"
    assert lm_forms["Dense_0/kernel"] == "gram"
    cnn = models.SmallCNN()
    x = jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(lambda: cnn.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    batch = (x, jax.ShapeDtypeStruct((128,), jnp.int32))
    cnn_forms = forms(classifier_loss(cnn), params["params"], batch)
    assert cnn_forms["Conv_0/kernel"] == "direct" and cnn_forms["Conv_2/kernel"] == "gram"


def test_per_example_auto_ghost_and_vmap_give_same_stats_grad_and_aux():
    """auto (timed), the fast path and vmap: the same statistics (per layer too), jax.grad's
    mean gradient; with has_aux one batch aux on the fast path, one per example on vmap."""
    model = ConvNet(strides=(2,), norm="group")
    loss_fn, params, batch = setup(model, images((6, 6, 6, 3)))

    def loss_aux(p, b):
        loss = loss_fn(p, b)
        return loss, {"loss": loss}

    def all_of_it(p, b):
        auto = estimate.per_example(loss_fn, p, b)
        fast = estimate.per_example(loss_aux, p, b, has_aux=True, method="ghost")
        ref = estimate.per_example(loss_aux, p, b, has_aux=True, method="vmap")
        return auto, fast, ref, jax.grad(loss_fn)(p, b)

    (auto, g_auto), (fast, g_fast, aux), (ref, g_ref, ref_aux), g_true = jax.jit(all_of_it)(
        params, batch
    )
    for g in (g_auto, g_fast, g_ref):  # the mean gradient is jax.grad's
        assert_trees_close(g, g_true, rtol=1e-5)
    for stats in (auto, fast):
        np.testing.assert_allclose(stats.g_sq, ref.g_sq, rtol=RTOL)
        np.testing.assert_allclose(stats.trace_cov, ref.trace_cov, rtol=RTOL)
    assert auto.per_layer.keys() == ref.per_layer.keys()
    for k in ref.per_layer:
        np.testing.assert_allclose(
            auto.per_layer[k].trace_cov, ref.per_layer[k].trace_cov, rtol=RTOL, atol=ATOL
        )
    assert aux["loss"].shape == (1,) and ref_aux["loss"].shape == (6,)
    np.testing.assert_allclose(aux["loss"][0], np.mean(ref_aux["loss"]), rtol=1e-5)


def plain_loss(w, batch):
    x, y = batch
    return jnp.mean((x @ w - y) ** 2)


def nonlinear_loss(w, batch):
    x, y = batch
    return jnp.mean((jnp.sum(jnp.logaddexp(x, w), -1) - y) ** 2)  # a custom_jvp function


@pytest.mark.filterwarnings("ignore::gns.ghost.FallbackWarning")
def test_plain_jax_loss_is_covered_and_a_nonlinear_use_falls_back():
    x = images((16, 3))
    batch, w = (x, x @ jnp.ones(3)), jnp.full(3, 0.1)
    the_plan = ghost.select(plain_loss, w, batch)  # "auto": the model is clear, no timing
    assert the_plan is not None and the_plan.clear and the_plan.fallback == ()
    auto, ref = jax.jit(
        lambda w, b: [estimate.per_example(plain_loss, w, b, method=m)[0] for m in ("auto", "vmap")]
    )(w, batch)
    np.testing.assert_allclose(auto.trace_cov, ref.trace_cov, rtol=1e-5)
    with pytest.raises(ValueError, match="method='ghost'.*covers no parameter.*custom_jvp"):
        estimate.per_example(nonlinear_loss, w, batch, method="ghost")
    with pytest.raises(ValueError, match="method must be"):
        estimate.per_example(plain_loss, w, batch, method="ghosts")
    chosen = ghost.select(nonlinear_loss, w, batch)  # "auto": vmap or every leaf's sums
    assert chosen is None or (chosen.consumers == () and chosen.fallback_microbatches)
    with pytest.raises(ValueError, match="method='ghost'.*covers no parameter"):
        ghost.select(nonlinear_loss, w, batch, method="ghost")


def test_a_scalar_bias_and_temperature_are_covered_and_equal_vmap():
    x = images((16, 5))
    batch = (x, x @ jnp.full(5, 0.3))
    params = {"w": jnp.full((5, 3), 0.1), "b": jnp.array(0.3), "t": jnp.array(1.5)}

    def loss(p, b):  # a rank-0 bias (added, subtracted) and temperature (multiplied)
        logits = (b[0] @ p["w"] + p["b"]) * p["t"]
        return jnp.mean((jax.nn.logsumexp(logits, -1) - p["b"] - b[1]) ** 2)

    the_plan = ghost.plan(loss, params, batch)
    assert the_plan.fallback == () and "broadcasting across ranks" not in the_plan.describe()
    fast, ref = (estimate.per_example(loss, params, batch, method=m)[0] for m in ("ghost", "vmap"))
    for k in ("g_sq", "trace_cov"):
        np.testing.assert_allclose(getattr(fast, k), getattr(ref, k), rtol=1e-5)
    # A weakly typed scalar (jnp.asarray(0.3): a Python float's type) is timed like the rest
    # (its zero stand-in was strongly typed: the trace changed, the timing silently skipped).
    weak = params | {"b": jnp.asarray(0.3)}
    chosen = ghost.calibrate(loss, weak, batch, ghost.plan(loss, weak, batch), rounds=1,
                             with_vmap=False)  # fmt: skip
    assert chosen.decision.startswith("timed once:"), chosen.decision


def learnable_s(use, shape, seed=7):
    """A float64 MLP whose hidden layer ``h`` meets a learnable ``s`` of ``shape`` by ``use(h,
    s)``: ``(loss_fn, params, batch)``."""
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(3, 4)), "s": 1.5 + rng.uniform(size=shape)}
    params = jax.tree.map(jnp.asarray, params | {"out": rng.normal(size=(4, 2))})
    batch = (jnp.asarray(rng.normal(size=(6, 3))), jnp.asarray(rng.normal(size=(6, 2))))

    def loss_fn(p, b):
        h = use(b[0] @ p["w"], p["s"])
        return jnp.mean((jnp.tanh(h) @ p["out"] - b[1]) ** 2)

    return loss_fn, params, batch


def check_sums_and_b_simple(loss_fn, params, batch, the_plan):
    """:func:`check_sums`, and ``b_simple`` of ``per_example`` on the fast path equal to vmap's
    (float32 statistics)."""
    check_sums(loss_fn, params, batch, the_plan=the_plan)
    fast, ref = (
        estimate.per_example(loss_fn, params, batch, method=m)[0] for m in ("ghost", "vmap")
    )
    np.testing.assert_allclose(fast.b_simple, ref.b_simple, rtol=1e-5)


# How s meets h (elementwise, beside the examples), the shape of s, and how describe() says s
# is read.
ELEMENTWISE = {
    "x / s": (lambda h, s: h / s, (4,), "div (sum), direct form (MFLOP"),
    "x / exp(log_s)": (lambda h, s: h / jnp.exp(s), (4,), "div (sum), direct form through exp ("),
    "x / (s + eps)": (lambda h, s: h / (s + 1e-3), (4,), "div (sum), direct form through add ("),
    "x / scalar s": (lambda h, s: h / s, (), "div (sum), direct form (MFLOP"),
    "s / x": (lambda h, s: s / (1 + h * h), (4,), "div (sum), direct form (MFLOP"),
    "both": (lambda h, s: h / s - s / (1 + h * h), (4,), "div (sum), direct form, one of 2 reads"),
    "x ** s": (lambda h, s: jnp.abs(h) ** s, (4,), "pow (sum), direct form (MFLOP"),
    "x ** scalar s": (lambda h, s: jnp.abs(h) ** s, (), "pow (sum), direct form (MFLOP"),
    "s ** x": (lambda h, s: s**h, (4,), "pow (sum), direct form (MFLOP"),
    "max(x, s)": (lambda h, s: jnp.maximum(h, s - 2), (4,), "max (sum), direct form through sub"),
    "min(x, s)": (lambda h, s: jnp.minimum(h, s), (4,), "min (sum), direct form (MFLOP"),
    "atan2(x, s)": (lambda h, s: jnp.arctan2(h, s), (4,), "atan2 (sum), direct form (MFLOP"),
    "atan2(s, x)": (lambda h, s: jnp.arctan2(s, h), (4,), "atan2 (sum), direct form (MFLOP"),
    "fmod(x, s)": (lambda h, s: jnp.fmod(h, s), (4,), "rem (sum), direct form (MFLOP"),
    "gammainc(s, x)": (
        lambda h, s: jax.scipy.special.gammainc(s, 1 + h * h),
        (4,),
        "igamma (sum), direct form (MFLOP",
    ),
    "x ** s and x * s": (
        lambda h, s: jnp.abs(h) ** s + h * s,
        (4,),
        "pow (sum), direct form, one of 2 reads",
    ),
}


@pytest.mark.parametrize("use", ELEMENTWISE)
def test_a_parameter_in_an_elementwise_binary_operation_is_covered_and_equals_vmap(use):
    """A parameter meeting a batched value in any elementwise binary operation of
    ``ghost._ELEMENTWISE`` (a learnable divisor or temperature ``x / s``, a dividend ``s / x``,
    an exponent ``x ** s`` or base ``s ** x``, floor ``max(x, s)`` or ceiling ``min(x, s)``,
    ``atan2``, ``fmod``, ``gammainc``; per feature or a scalar, through a step of ``s`` alone
    such as ``exp`` or ``+ eps``, read twice): covered, one example's
    gradient the output gradient times the output's derivative by ``s``. Squared norms and the
    mean gradient equal vmap's to float64 rounding, ``b_simple`` to float32's."""
    use, shape, read = ELEMENTWISE[use]
    with jax.enable_x64(True):
        loss_fn, p, batch = learnable_s(use, shape)
        the_plan = ghost.plan(loss_fn, p, batch)
        assert the_plan.fallback == (), the_plan.describe()
        assert f"leaf s: covered by {read}" in the_plan.describe()
        check_sums_and_b_simple(loss_fn, p, batch, the_plan)


# How s meets h where h equals s at some entries (a tie), or is 0 (the base of a power).
TIES = {
    "max(x, s)": jnp.maximum,
    "min(x, s)": jnp.minimum,
    "max(s, x)": lambda h, s: jnp.maximum(s, h),
    "x ** s at 0": lambda h, s: jnp.abs(h) ** (s + 1.5),
}


@pytest.mark.parametrize("use", TIES)
def test_ties_and_zero_bases_take_the_derivative_jax_grad_takes(use):
    """``max``/``min`` with the parameter equal to the batched value (9 of 24 entries, every
    example at one feature) and a power at a zero base: the derivative by ``s`` there is
    JAX's own (half of the output gradient for a tie, 0 for ``0 ** s``), as ``jax.grad`` per
    example gives: squared norms and ``b_simple`` equal vmap's."""
    with jax.enable_x64(True):
        loss_fn, p, (x, y) = learnable_s(TIES[use], (4,))
        p["w"] = jnp.eye(3, 4)  # h = [x, 0]: exact, s[3] = 0 ties every example
        x = x.at[2, 2].set(0.25)
        p["s"] = jnp.stack([x[0, 0], x[1, 1], x[2, 2], 0.0])
        h = x @ p["w"]
        assert int(jnp.sum(h == p["s"])) == 6 + 3
        the_plan = ghost.plan(loss_fn, p, (x, y))
        assert the_plan.fallback == (), the_plan.describe()
        check_sums_and_b_simple(loss_fn, p, (x, y), the_plan)


# How s meets h in an operation the fast path does not cover, and the reason describe() gives.
NOT_COVERED = {
    "logaddexp(x, s)": (jnp.logaddexp, "read inside custom_jvp_call, which is not entered"),
    "remainder(x, s)": (jnp.remainder, "lt of the parameter to several or integer outputs"),
}


@pytest.mark.filterwarnings("ignore::gns.ghost.FallbackWarning")
@pytest.mark.parametrize("use", NOT_COVERED)
def test_a_parameter_read_by_an_uncovered_operation_falls_back_with_its_reason(use):
    """A soft floor ``logaddexp(x, s)`` (a ``custom_jvp`` function, not entered) and a
    ``remainder(x, s)`` (its sign correction compares ``s`` with 0: a boolean output of ``s``)
    are not covered: ``s`` falls back to vmap, ``describe()`` says why, the other leaves stay
    covered, and every squared norm and ``b_simple`` equal vmap's."""
    use, reason = NOT_COVERED[use]
    with jax.enable_x64(True):
        loss_fn, p, batch = learnable_s(use, (4,))
        the_plan = ghost.plan(loss_fn, p, batch)
        assert [the_plan.name(j) for j in the_plan.fallback] == ["s"]
        assert f"leaf s: fallback (per-example norms by vmap): {reason}" in the_plan.describe()
        check_sums_and_b_simple(loss_fn, p, batch, the_plan)


class PartsModel(nn.Module):
    """Leaves assembled from parts: a weight-normalized kernel (two leaves), an embedding read
    as the output head and, scaled by ``exp(log_scale)``, as a bias."""

    @nn.compact
    def __call__(self, x):
        embed = nn.Embed(5, 6)
        scale = jnp.exp(self.param("log_scale", nn.initializers.zeros, (6,)))
        h = nn.WeightNorm(nn.Dense(6))(x) + embed.embedding[0] * scale
        return embed.attend(jnp.tanh(h))


@pytest.mark.parametrize("path", ["whole", "chunks", "microbatches"])
@pytest.mark.parametrize("name", ["conv", "parts", "scanned", "penalized"])
def test_axis_name_in_shard_map_matches_global_vmap(path, name, monkeypatch):
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py simulates them on CPU)")
    mesh = Mesh(np.array(devices), ("batch",))
    if name == "conv":
        loss_fn, params, batch = setup(ConvNet(strides=(2,), norm="group"), images((16, 6, 6, 3)))
    elif name == "scanned":
        loss_fn, params, batch = setup(ScannedBlocks(), images((16, 6)))
    elif name == "penalized":  # each device adds the penalty's gradient to its examples'
        data_loss, params, batch = setup(ScannedBlocks(), images((16, 6)))

        def loss_fn(p, b):
            return data_loss(p, b) + 0.1 * sum(jnp.sum(w**2) for w in jax.tree.leaves(p))

    else:
        loss_fn, params, batch = setup(PartsModel(), images((16, 4)))
        assert {c.parts for c in ghost.plan(loss_fn, params, batch).consumers} == {True, False}
    select = ghost.select

    def chunked(f, p, b, **kw):  # each device's 4 examples in 2 chunks
        plan = select(f, p, b, **kw)
        return plan and ghost.chunked(plan, f, p, b, 2)

    def microbatches(f, p, b, **kw):  # every leaf from 4 microbatches of one example: exact
        plan = select(f, p, b, **kw)  # None for the reference's method="vmap"
        every = plan and tuple(range(plan.num_leaves))
        return plan and dataclasses.replace(
            plan, consumers=(), fallback=every, fallback_microbatches=4
        )

    if path != "whole":
        monkeypatch.setattr(ghost, "select", chunked if path == "chunks" else microbatches)

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


def with_aux(loss_fn):
    def loss_aux(p, b):
        loss = loss_fn(p, b)
        return loss, loss

    return loss_aux


def check_sums(loss_fn, params, batch, forms=("auto",), the_plan=None, k=1, more=()):
    """ghost.sums in each form (and of each further ``(plan, form)`` in ``more``), and over
    ``k`` equal example chunks (one aux per chunk) when ``k > 1``, equal vmap's squared norms
    and n times jax.grad's mean gradient (one jit). In float64 (float64 params) to float64
    rounding, else to float32's."""
    the_plan = the_plan or ghost.plan(loss_fn, params, batch)
    n, loss_aux = estimate.batch_size(batch), with_aux(loss_fn)
    chunked = ghost.chunked(the_plan, loss_aux, params, batch, k, has_aux=True)
    if k > 1:
        assert (chunked.num_chunks, chunked.batch_size) == (k, n // k)
        assert f"the batch in {k} chunks of {n // k} examples" in chunked.describe()
        assert chunked.fallback == the_plan.fallback

    def all_of_it(p, b):
        pairs = [(the_plan, f) for f in forms] + list(more)
        fast = [ghost.sums(loss_fn, p, b, pl, form=f)[:2] for pl, f in pairs]
        in_chunks = ghost.sums(loss_aux, p, b, chunked, has_aux=True) if k > 1 else None
        return vmap_sq_norms(loss_fn, p, b), fast, in_chunks, jax.value_and_grad(loss_fn)(p, b)

    want, fast, in_chunks, (loss, true_grads) = jax.jit(all_of_it)(params, batch)
    if in_chunks is not None:
        assert in_chunks[2].shape == (k,)  # one loss_fn call per chunk
        np.testing.assert_allclose(np.mean(in_chunks[2]), loss, rtol=1e-5)
        fast.append(in_chunks[:2])
    x64 = jax.tree.leaves(params)[0].dtype == jnp.float64
    # gns.estimate accumulates the fallback leaves' per-example norms in float32
    rtols = [
        (1e-6 if j in the_plan.fallback else RTOL64) if x64 else RTOL
        for j in range(the_plan.num_leaves)
    ]
    grad_tol = dict(rtol=1e-12, atol=1e-14) if x64 else dict(rtol=1e-5, atol=1e-7)
    for grad_sum, sq in fast:
        assert jax.tree.structure(sq) == jax.tree.structure(want)
        for (path, x), y, rtol in zip(
            jax.tree_util.tree_leaves_with_path(sq), jax.tree.leaves(want), rtols, strict=True
        ):
            np.testing.assert_allclose(
                x, y, rtol=rtol, atol=ATOL64 if x64 else ATOL, err_msg=str(path)
            )
        mean = jax.tree.map(lambda g: np.asarray(g) / n, grad_sum)
        assert_trees_close(mean, true_grads, **grad_tol)


class TokenModel(nn.Module):
    """Embed -> per-position Dense; token 0 is padding (its positions carry no loss)."""

    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(5)(jnp.tanh(nn.Embed(6, 3)(tokens)))


def test_embed_repeated_and_padding_tokens_equal_vmap():
    with jax.enable_x64(True):
        tokens = jnp.array([[1, 2, 1, 1, 0, 0], [3, 3, 3, 3, 3, 3], [5, 4, 2, 0, 0, 0]])
        targets = np.arange(18).reshape(3, 6) % 5
        model = TokenModel()

        def loss_fn(p, batch):
            tok, y = batch
            nll = optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, tok), y
            )
            mask = tok != 0
            return jnp.mean(jnp.sum(nll * mask, axis=1) / jnp.sum(mask, axis=1))

        params = random_init(model, tokens[:1], dtype=jnp.float64)
        the_plan = ghost.plan(loss_fn, params, (tokens, targets))
        assert the_plan.fallback == ()
        assert {c.kind for c in the_plan.consumers} == {"embed", "dense", "sum"}
        # direct = scatter into a per-example table, gram = token-equality Gram
        check_sums(loss_fn, params, (tokens, targets), forms=("direct", "gram"), the_plan=the_plan)


@pytest.mark.parametrize("mode", [None, "clip", "fill"])
def test_ids_off_the_table_count_as_the_gradient_does(mode):
    """``table[ids]`` clamps an id off the table in the forward pass, and its gradient drops it;
    ``mode="clip"`` clamps in both: the per-example norms follow the gradient either way."""
    table = jax.random.normal(jax.random.key(0), (20, 12))
    take = lambda t, ids: t[ids] if mode is None else jnp.take(t, ids, axis=0, mode=mode)
    loss_fn = lambda t, b: jnp.mean((take(t, b["ids"]) - b["y"]) ** 2)
    ids = jax.random.randint(jax.random.key(2), (16, 8), 0, 23)  # 20-22: off the table
    batch = {"ids": ids, "y": jax.random.normal(jax.random.key(1), (16, 8, 12))}
    assert ghost.plan(loss_fn, table, batch).fallback == ()
    check_sums(loss_fn, table, batch)


def test_a_token_tiled_over_the_examples_is_covered_as_a_broadcast():
    """``jnp.tile(cls, (n, 1, 1))`` (a ViT's class token) repeats unit axes: a broadcast, on the
    fast path; a tile that repeats an axis the parameter has falls back, named."""
    cls, w = (
        jax.random.normal(jax.random.key(0), (1, 1, 8)),
        jax.random.normal(jax.random.key(1), (8, 8)),
    )
    batch = {"x": jax.random.normal(jax.random.key(2), (16, 5, 8))}

    def loss_fn(p, b, reps=1):
        h = jnp.concatenate([jnp.tile(p["cls"], (len(b["x"]), reps, 1)), b["x"]], 1)
        return jnp.mean(jnp.tanh(h @ p["w"]).mean(1) ** 2)

    params = {"cls": cls, "w": w / 3}
    assert ghost.plan(loss_fn, params, batch).fallback == ()
    check_sums(loss_fn, params, batch)
    two = {"cls": jnp.concatenate([cls, cls], 1), "w": w / 3}
    repeated = ghost.plan(functools.partial(loss_fn, reps=3), two, batch)
    assert dict(repeated.reasons) == {
        0: "tile that repeats the parameter along an axis longer than 1"
    }


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
        x = images((3, 3, 4, 5), seed=1, dtype=jnp.float64)
        model = DenseGeneralStack()
        params = random_init(model, x[:1], dtype=jnp.float64)
        loss_fn = classifier_loss(model)
        batch = (x, np.arange(3) % 5)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert the_plan.fallback == (), the_plan.describe()
        kernels = [c for c in the_plan.consumers if c.kind == "dense"]
        assert len(kernels) == 4
        check_sums(loss_fn, params, batch, ("direct", "gram"), the_plan)


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
        x = images((4, 3, 6), seed=2, dtype=jnp.float64)
        model = Attention(masked=masked)
        params = random_init(model, x[:1], dtype=jnp.float64)
        loss_fn = classifier_loss(model)
        batch = (x, np.arange(4) % 5)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert the_plan.fallback == (), the_plan.describe()
        check_sums(loss_fn, params, batch, the_plan=the_plan)


class EinsumModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, T, D]
        h = nn.Einsum((2, 5, 3), "btd,hdf->bthf")(x)  # heads as output features
        h = nn.Einsum((2, 3, 4), "bthf,hfk->bthk", use_bias=False)(jnp.tanh(h))  # h shared
        h = nn.Einsum((4, 5), "...k,kc->...c")(jnp.tanh(h))  # ellipsis
        return h.sum(axis=(1, 2))


def test_einsum_equals_vmap():
    with jax.enable_x64(True):
        x = images((3, 4, 5), seed=3, dtype=jnp.float64)
        model = EinsumModel()
        params = random_init(model, x[:1], dtype=jnp.float64)
        loss_fn = classifier_loss(model)
        batch = (x, np.arange(3) % 5)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert the_plan.fallback == (), the_plan.describe()
        assert any(c.kind == "dense" and c.layout.s == 2 for c in the_plan.consumers)  # heads
        check_sums(loss_fn, params, batch, ("direct", "gram"), the_plan)


class PositionModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, T, D], T shorter than max_length
        h = ghost.AddPositionEmbedding(max_length=6)(x)
        return nn.Dense(5)(jnp.tanh(h).reshape(h.shape[0], -1))


def test_position_embedding_equals_vmap():
    with jax.enable_x64(True):
        x = images((3, 4, 2), seed=4, dtype=jnp.float64)
        model = PositionModel()
        params = random_init(model, x[:1], dtype=jnp.float64)
        loss_fn = classifier_loss(model)
        batch = (x, np.arange(3) % 5)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert the_plan.fallback == ()
        kinds = {the_plan.leaf_names[c.leaf]: c.kind for c in the_plan.consumers}
        assert kinds["AddPositionEmbedding_0/embedding"] == "sum"
        check_sums(loss_fn, params, batch, the_plan=the_plan)
    with pytest.raises(ValueError, match="length <= max_length"):
        model.init(jax.random.key(0), jnp.zeros((1, 7, 2)))


def lm_setup(tie=False, batch=3, context=5, vocab=7, abstract=False):
    from experiments import bench, models  # noqa: PLC0415

    model = models.TransformerLM(
        vocab_size=vocab, context=context, width=4, depth=1, num_heads=2, tie_embeddings=tie
    )
    tokens = np.random.default_rng(5).integers(0, vocab, (batch, context + 1), dtype=np.int32)
    tokens[0, :3] = 2  # a repeated token
    if abstract:  # shapes only, for the cost model
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens[:1, :-1])["params"])
    else:
        params = random_init(model, tokens[:1, :-1], dtype=jnp.float64)
    return bench.lm_loss(model), params, tokens


def test_bfloat16_leaf_with_a_penalty_takes_its_cotangents_in_bfloat16():
    """A bf16 Transformer with an L2 term: the embedding table's cotangent arrives from its
    read and from the penalty, both in bf16 (a tap that passed it on in float32 broke their
    sum). The mean gradient is jax.grad's, in bf16; the statistics are vmap's to bf16's
    precision."""
    loss_fn, params, tokens = lm_setup(batch=8, context=8, vocab=16)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)

    def penalized(p, t):
        l2 = sum(jnp.sum(jnp.square(w)) for w in jax.tree.leaves(p)).astype(jnp.float32)
        return loss_fn(p, t) + 1e-2 * l2

    @jax.jit
    def both(p, t):
        fast = estimate.per_example(penalized, p, t, method="ghost")
        return (
            fast,
            estimate.per_example(penalized, p, t, method="vmap")[0],
            jax.grad(penalized)(p, t),
        )

    (stats, grads), ref, want = both(params, tokens)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    assert_trees_close(grads, want, rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(stats.trace_cov, ref.trace_cov, rtol=0.02)


def test_transformer_lm_equals_vmap():
    """Every leaf is covered, untied and tied. A tied head reads the embedding twice (a
    gather, and a dot_general through a transpose): each read adds its per-example parts to
    the embedding's, whose squared norms (with the cross terms) equal vmap's to float64
    rounding, on the whole batch and over 2 example chunks (the loop rolled)."""
    with jax.enable_x64(True):
        for tie in (False, True):
            loss_fn, params, tokens = lm_setup(tie, batch=4)
            the_plan = ghost.plan(loss_fn, params, tokens)
            assert the_plan.fallback == ()
            reads = [the_plan.name(c.leaf) for c in the_plan.consumers if c.parts]
            assert reads == (["embed/embedding"] * 2 if tie else [])
            assert len(the_plan.consumers) == the_plan.num_leaves + tie
        check_sums(loss_fn, params, tokens, forms=(), the_plan=the_plan, k=2)  # tied


# ---------------------------------------------------------------------------------------------
# A bare self.param position embedding (lm1b style) and the path auto picks.


class BarePositionModel(nn.Module):
    """A bare self.param position embedding added at the input of a sequence model."""

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        for _ in range(2):
            x = nn.gelu(nn.Dense(16)(x))
        return nn.Dense(5)(x.mean(axis=1))


class FloorModel(nn.Module):
    """A parameter read by a ``custom_jvp`` function (a soft floor ``jnp.logaddexp`` with the
    input): that leaf falls back to vmap."""

    @nn.compact
    def __call__(self, x):
        x = jnp.logaddexp(x, self.param("floor", nn.initializers.zeros, x.shape[-1:]))
        return nn.Dense(5)(nn.gelu(nn.Dense(8)(x)).mean(axis=1))


def test_bare_position_parameter_is_covered_and_equals_vmap():
    with jax.enable_x64(True):
        x = images((3, 4, 2), seed=2, dtype=jnp.float64)
        loss_fn, _, batch = setup(BarePositionModel(), x)
        params = random_init(BarePositionModel(), x[:1], dtype=jnp.float64)
        the_plan = ghost.plan(loss_fn, params, batch)
        assert the_plan.fallback == () and the_plan.clear, the_plan.describe()
        pos = next(c for c in the_plan.consumers if the_plan.leaf_names[c.leaf] == "pos")
        assert (pos.primitive, pos.kind) == ("add", "sum")
        check_sums(loss_fn, params, batch, the_plan=the_plan)


@pytest.mark.filterwarnings("ignore::gns.ghost.FallbackWarning")
def test_nonlinear_leaf_falls_back_and_auto_times_both_paths(monkeypatch):
    x = images((4, 3, 6), seed=2)
    loss_fn, params, batch = setup(FloorModel(), x)
    the_plan = ghost.plan(loss_fn, params, batch)
    assert [the_plan.leaf_names[j] for j in the_plan.fallback] == ["floor"]
    text = the_plan.describe()
    assert "leaf floor: fallback (per-example norms by vmap): read inside custom_jvp" in text
    assert not the_plan.clear and "timed once (calibrate)" in text.splitlines()[-1]
    check_equal_to_vmap(loss_fn, params, batch)
    # auto follows the timing; the timing runs once per signature (cached).
    for answer in (None, the_plan):
        monkeypatch.setattr(ghost, "calibrate", lambda *a, answer=answer, **k: answer)
        assert ghost.select(loss_fn, params, batch) is answer
    monkeypatch.undo()
    first = ghost.calibrate(loss_fn, params, batch, the_plan, rounds=1)
    assert first is None or "timed once: ghost" in first.describe()
    monkeypatch.setattr(jax, "jit", None)  # a second timing would fail: the answer is cached
    assert ghost.calibrate(loss_fn, params, batch, the_plan, rounds=1) is first


@pytest.mark.filterwarnings("ignore::gns.ghost.FallbackWarning")
def test_sums_from_microbatches_are_the_per_example_sums_on_average():
    """The sums of per-example squared norms estimated from microbatches, for the fallback leaf
    (the covered ones by the fast path) or for every leaf (the microbatch estimator's cost):
    with microbatches of one example they are the per-example sums; with 2 of 2 examples,
    their mean over the 3 ways to pair 4 examples is (the estimate is unbiased given the
    batch), and the gradient sum is n times the mean gradient. ``auto`` times both at 16."""
    with jax.enable_x64(True):
        x = images((4, 3, 6), seed=2, dtype=np.float64)
        loss_fn, params, (x, y) = setup(FloorModel(), x, dtype=jnp.float64)
        the_plan = ghost.plan(loss_fn, params, (x, y))
        (floor,) = the_plan.fallback
        want = jax.tree.leaves(vmap_sq_norms(loss_fn, params, (x, y)))
        grads = jax.tree.leaves(jax.grad(loss_fn)(params, (x, y)))
        every = dataclasses.replace(the_plan, consumers=(), fallback=tuple(range(len(want))))

        def estimate_with(plan, k, order):
            batch = (x[np.asarray(order)], y[np.asarray(order)])
            out = ghost.sums(loss_fn, params, batch, replace(plan, fallback_microbatches=k))
            for got, g in zip(jax.tree.leaves(out[0]), grads, strict=True):
                np.testing.assert_allclose(got, 4 * g, rtol=1e-6, atol=1e-12)
            return jax.tree.leaves(out[1])

        replace = dataclasses.replace
        pairings = [[0, 1, 2, 3], [0, 2, 1, 3], [0, 3, 1, 2]]
        for plan, fallback in ((the_plan, [floor]), (every, range(len(want)))):
            # (squared norms estimated from microbatches are taken in float32, as vmap's)
            np.testing.assert_allclose(estimate_with(plan, 4, pairings[0]), want, rtol=1e-6)
            got = np.mean([estimate_with(plan, 2, order) for order in pairings], axis=0)
            np.testing.assert_allclose(got, want, rtol=1e-6)
            one = estimate_with(plan, 2, pairings[0])
            assert all(abs(one[j] - want[j]) > 1e-4 * abs(want[j]) for j in fallback)  # noisy
    big = setup(FloorModel(), images((16, 3, 6), seed=2))
    candidates = ghost._candidates(*big, ghost.plan(*big), False, True)
    assert candidates["ghost, fallback from 8 microbatches"].fallback_microbatches == 8
    every = candidates["every leaf from 8 microbatches"]
    assert every.consumers == () and "every leaf: per-example norms estimated from 8" in (
        every.describe()
    )


def test_clear_plans_time_only_the_fast_path_and_small_ones_are_not_timed(monkeypatch):
    from experiments import models  # noqa: PLC0415

    cnn = models.SmallCNN()  # the CIFAR-10 cpu model

    def cnn_problem(n):
        x = jnp.zeros((n, 32, 32, 3))
        params = jax.eval_shape(lambda: cnn.init(jax.random.key(0), x[:1])["params"])
        return classifier_loss(cnn), params, (x, jnp.zeros(n, jnp.int32))

    # Batch 128: the model is clear, so vmap is not timed; the fast path is, whole and chunked.
    asked = []
    monkeypatch.setattr(ghost, "calibrate", lambda *a, **k: asked.append(k) or a[3])
    cnn_plan = ghost.select(*cnn_problem(128))
    assert cnn_plan is not None and cnn_plan.clear and cnn_plan.method == "ghost"
    assert [k["with_vmap"] for k in asked] == [False]
    assert "timed once (calibrate) whole and in example chunks" in cnn_plan.describe()
    # Batch 8: too small to chunk, and clear: the fast path without timing.
    monkeypatch.setattr(ghost, "calibrate", None)  # would fail if called
    small = ghost.select(*cnn_problem(8))
    assert small.clear and small.describe().splitlines()[-1].startswith(
        "auto: fast path, without timing"
    )
    # The Transformer: the model prefers the fast path, not by the clear margin: timed.
    loss_fn, params, tokens = lm_setup(batch=16, context=16, vocab=32, abstract=True)
    lm_plan = ghost.plan(loss_fn, params, tokens)
    assert lm_plan.method == "ghost" and not lm_plan.clear


def test_calibrate_times_the_other_candidates_only_where_that_can_pay(monkeypatch):
    """With ``uses`` steps to run the answer, the candidates beyond the whole-batch fast path
    are compiled and timed only if half the fast path's time over those steps could pay for
    them: over 1 step it cannot (the cost model's choice, said in ``describe``); over 10**9
    steps it can (all timed)."""
    loss_fn, params, batch = setup(BarePositionModel(), images((16, 8, 4)))
    the_plan = ghost.plan(loss_fn, params, batch)
    assert (
        not the_plan.clear
        and len(ghost._candidates(loss_fn, params, batch, the_plan, False, True)) >= 2
    )
    monkeypatch.setattr(ghost, "_CALIBRATED", {})
    once = ghost.calibrate(loss_fn, params, batch, the_plan, rounds=1, uses=1)
    assert (
        once.num_chunks == 1
        and "not timed: " in once.describe()
        and "over 1 steps" in once.describe()
    )
    monkeypatch.setattr(ghost, "_CALIBRATED", {})
    many = ghost.calibrate(loss_fn, params, batch, the_plan, rounds=1, uses=10**9)
    assert many is None or "timed once: " in many.describe()
    # per_example(uses=...) decides the same way (a short pilot's measuring step).
    monkeypatch.setattr(ghost, "_CALIBRATED", {})
    estimate.per_example(loss_fn, params, batch, uses=1)
    (cached,) = ghost._CALIBRATED.values()
    assert "over 1 steps" in cached.describe()


def test_per_example_auto_follows_the_decision(monkeypatch):
    """per_example(method="auto") runs the path that calibrate decides, for each decision in
    turn: ``None`` (vmap: one call of ``loss_fn`` per example; the reference statistics) or
    ``k`` (the fast path over ``k`` example chunks, the whole batch at 1: one call per chunk).
    Each gives vmap's statistics and jax.grad's mean gradient (all in one jit). The model:
    every leaf covered, not clearly faster by the cost model (so timed)."""
    loss_fn, params, batch = setup(BarePositionModel(), images((8, 8, 4)))
    the_plan = ghost.plan(loss_fn, params, batch)
    assert the_plan.fallback == () and not the_plan.clear
    decisions = [None, 1, 2]
    answers = iter(decisions)

    def decide(f, p, b, planned, **kw):
        k = next(answers)
        return k and ghost.chunked(planned, f, p, b, k, has_aux=kw["has_aux"])

    monkeypatch.setattr(ghost, "calibrate", decide)

    def run(p, b):
        autos = [estimate.per_example(with_aux(loss_fn), p, b, has_aux=True) for _ in decisions]
        return autos, jax.value_and_grad(loss_fn)(p, b)

    autos, (loss, true_grads) = jax.jit(run)(params, batch)
    assert next(answers, "all") == "all"  # one decision per per_example call
    ref = autos[0][0]  # vmap's (its aux has one entry per example, below)
    for k, (stats, grads, aux) in zip(decisions, autos, strict=True):
        assert aux.shape == (k or 8,)
        np.testing.assert_allclose(np.mean(aux), loss, rtol=1e-5)
        np.testing.assert_allclose(stats.g_sq, ref.g_sq, rtol=RTOL)
        np.testing.assert_allclose(stats.trace_cov, ref.trace_cov, rtol=RTOL)
        assert_trees_close(grads, true_grads, rtol=1e-5, atol=1e-7)


def chunk_problem(name, n=8):
    """``(loss_fn, params, batch)`` of ``n`` examples: a bench row's small model."""
    from experiments import bench  # noqa: PLC0415

    lm = dict(vocab_size=16, context=8, width=8, depth=1, num_heads=2, mlp_ratio=2)
    fields = {m: lm for m in ("lm1b", "tied_transformer")} | {
        "scanned_transformer": lm | {"depth": 2},
        "convnext": dict(widths=(4, 8), image_size=8),
    }
    return bench.row_problem(name, n, **fields.get(name, dict(dims=(6, 5, 3))))


@pytest.mark.parametrize(
    "name", ["plain_mlp", "nnx_mlp", "lm1b", "tied_transformer", "scanned_transformer", "convnext"]
)
def test_bench_row_models_are_covered_and_equal_vmap_in_chunks(name):
    """The bench rows' models: every leaf covered (the tied embedding by its two reads, the
    scanned blocks' stacked leaves by one read of each layer's slice, the depthwise kernels in
    the direct form); the fast path over 4 example chunks (each chunk by the whole-batch code,
    planned at the chunk's size) equals vmap."""
    loss_fn, params, batch = chunk_problem(name)
    the_plan = ghost.plan(loss_fn, params, batch)
    stacked = sum(name.startswith("blocks/") for name in the_plan.leaf_names)  # 2 layers each
    reads = {"tied_transformer": 1, "scanned_transformer": stacked}.get(name, 0)
    assert the_plan.fallback == () and len(the_plan.consumers) == the_plan.num_leaves + reads
    check_sums(loss_fn, params, batch, forms=(), the_plan=the_plan, k=4)


def test_chunk_counts_and_invalid_chunks():
    assert ghost.chunk_counts(128) == (4, 8)  # chunks of 32 and 16 (128 / 8)
    assert ghost.chunk_counts(512) == (8, 16)
    assert ghost.chunk_counts(32) == (8,)  # the microbatch default: 8 chunks of 4
    assert ghost.chunk_counts(16) == ghost.chunk_counts(100) == ()  # too small; no divisor
    for n in range(2, 700):
        for k in ghost.chunk_counts(n):
            assert n % k == 0 and n // k >= 4 and 1 < k <= ghost.MAX_CHUNKS
    loss_fn, params, batch = chunk_problem("plain_mlp")
    the_plan = ghost.plan(loss_fn, params, batch)
    assert ghost.chunked(the_plan, loss_fn, params, batch, 1) is the_plan
    with pytest.raises(ValueError, match="3 chunks do not divide the batch size 8"):
        ghost.chunked(the_plan, loss_fn, params, batch, 3)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        ghost.chunked(the_plan, loss_fn, params, batch, 0)
    four = ghost.chunked(the_plan, loss_fn, params, batch, 4)
    six = jax.tree.map(lambda x: x[:6], batch)
    with pytest.raises(ValueError, match="4 equal chunks, which do not divide the batch size 6"):
        ghost.sums(loss_fn, params, six, four)


def test_fastest_takes_the_smallest_median():
    times = {"ghost": [3.0, 1.0, 9.0], "ghost in 2 chunks": [2.0, 2.5, 2.0], "vmap": [1.0, 5, 5]}
    assert ghost.fastest(times) == "ghost in 2 chunks"  # medians 3, 2, 5
    assert ghost.fastest({"ghost": [1.0], "vmap": [1.0]}) == "ghost"  # a tie: the first
    # A candidate with a price wins only when its median times the price is the smallest.
    for sampled, winner in [(0.95, "ghost"), (0.85, "every leaf from 8 microbatches")]:
        times = {"ghost": [1.0], "every leaf from 8 microbatches": [sampled]}
        assert ghost.fastest(times, {"every leaf from 8 microbatches": 1.1}) == winner


def test_microbatch_sums_are_a_candidate_unless_priced_out(monkeypatch):
    """A fully covered model's candidates include every leaf's sums from 8 microbatches;
    MICROBATCH_PRICE = inf builds only the exact ones."""
    loss_fn, params, batch = chunk_problem("plain_mlp", n=16)
    the_plan = ghost.plan(loss_fn, params, batch)
    every = ghost._candidates(loss_fn, params, batch, the_plan, False, True)
    assert every["every leaf from 8 microbatches"].fallback_microbatches == 8
    monkeypatch.setattr(ghost, "MICROBATCH_PRICE", math.inf)
    exact = ghost._candidates(loss_fn, params, batch, the_plan, False, True)
    assert not any("microbatches" in name for name in exact) and "ghost" in exact


def _time_with_winner(monkeypatch, winner: str) -> list:
    """Timings in which ``winner`` is twice as fast as every other candidate, and a fresh
    calibration cache; returns the list the timed candidates' names are appended to."""
    seen = []

    def fake(calls, warmup, rounds):
        seen.extend(calls)
        return {m: [1.0 if m == winner else 2.0] * rounds for m in calls}

    monkeypatch.setattr(hardware, "interleaved_times", fake)
    monkeypatch.setattr(ghost, "_CALIBRATED", {})
    return seen


def test_auto_times_the_microbatch_sums_when_the_fast_path_covers_nothing(monkeypatch):
    """A loss that merges the example axis (``x.reshape(-1, D) @ w``) leaves the fast path
    nothing: ``auto`` times vmap against every leaf's sums from 8 microbatches, and takes the
    faster (it took vmap untimed); ``ghost`` is still an error."""
    w = jax.random.normal(jax.random.key(0), (6, 3))
    loss_fn = lambda w, b: jnp.mean(jnp.tanh(b["x"].reshape(-1, 6) @ w) ** 2)
    batch = {"x": jax.random.normal(jax.random.key(1), (16, 4, 6))}
    with pytest.raises(ValueError, match="covers no parameter"):
        ghost.select(loss_fn, w, batch, method="ghost")
    for winner in ("every leaf from 8 microbatches", "vmap"):
        seen = _time_with_winner(monkeypatch, winner)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ghost.FallbackWarning)
            chosen = ghost.select(loss_fn, w, batch)
        assert seen == ["every leaf from 8 microbatches", "vmap"]
        if winner == "vmap":
            assert chosen is None
        else:
            assert chosen.consumers == () and chosen.fallback_microbatches == 8
            assert "timed once: every leaf from 8 microbatches" in chosen.describe()


def test_calibrate_picks_the_fastest_of_injected_timings(monkeypatch):
    # chunks of 8 or n / 4 examples: chunk_counts(16) == (2, 4) (small unrolled programs)
    monkeypatch.setattr(ghost, "CHUNK_SIZES", (8,))
    monkeypatch.setattr(ghost, "CHUNK_COUNT", 4)
    loss_fn, params, batch = chunk_problem("plain_mlp", n=16)
    the_plan = ghost.plan(loss_fn, params, batch)
    sampled = "every leaf from 4 microbatches"
    names = ["ghost", sampled, "ghost in 2 chunks", "ghost in 4 chunks", "vmap"]
    within_memory = ghost._within_memory  # tested below
    monkeypatch.setattr(ghost, "_within_memory", lambda calls: (calls, ""))
    cases = [("ghost in 2 chunks", True), ("vmap", True), ("ghost", False), (sampled, False)]
    for winner, with_vmap in cases:
        seen = _time_with_winner(monkeypatch, winner)
        chosen = ghost.calibrate(loss_fn, params, batch, the_plan, with_vmap=with_vmap)
        assert seen == names[: 5 if with_vmap else 4]
        if winner == "vmap":
            assert chosen is None
            continue
        if winner == sampled:  # every leaf's sums from microbatches: the estimator's loop
            assert chosen.consumers == () and chosen.fallback_microbatches == 4
            assert f"charged {ghost.MICROBATCH_PRICE}x for their variance" in chosen.describe()
            continue
        k = int(winner.split()[2]) if "chunks" in winner else 1
        assert chosen.num_chunks == k and chosen.batch_size == 16 // k
        assert f"auto: timed once: {winner} (median ms: ghost " in chosen.describe()

    # A chunked candidate with more compiled temporary memory than the whole batch is dropped,
    # and any candidate over the memory budget.
    class Compiled:
        def __init__(self, temp):
            self.temp = temp

        def memory_analysis(self):
            return (
                None if self.temp is None else types.SimpleNamespace(temp_size_in_bytes=self.temp)
            )

    calls = {"ghost": 10, "ghost in 2 chunks": 11, "ghost in 8 chunks": 10, "vmap": 99}
    kept, dropped = within_memory({m: (Compiled(t), ()) for m, t in calls.items()})
    assert list(kept) == ["ghost", "ghost in 8 chunks", "vmap"]
    assert dropped == "more memory than the whole batch: ghost in 2 chunks"
    monkeypatch.setattr(hardware, "memory_budget", lambda: (50, "configured"))
    kept, dropped = within_memory({m: (Compiled(t), ()) for m, t in calls.items()})
    assert list(kept) == ["ghost", "ghost in 8 chunks"]
    assert dropped.endswith("; more memory than the budget: vmap")
    unknown = {m: (Compiled(None), ()) for m in calls}  # no memory analysis: all kept
    assert within_memory(unknown) == (unknown, "")
    # A timing that cannot run: the cost model decides (the fast path on the whole batch), and
    # the plan says the timing failed (it said "timed once" with no timings).
    monkeypatch.setattr(hardware, "interleaved_times", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(ghost, "_CALIBRATED", {})
    chosen = ghost.calibrate(loss_fn, params, batch, the_plan)
    assert chosen.consumers == the_plan.consumers and chosen.num_chunks == 1
    assert chosen.decision.startswith("not timed: the paths did not run apart from the caller")
    assert "(ZeroDivisionError: division by zero)" in chosen.decision
    assert ghost._CALIBRATED == {}  # not cached: a later call may time


def test_calibrate_also_times_the_direct_form_where_the_model_cannot_tell(monkeypatch):
    """A dense kernel over 6 positions, whose Gram form the CPU cost model puts 1.3x below the
    direct one: calibrate also times each chunked candidate with that kernel in the direct form
    (not on an MLP, whose Gram form is far cheaper), and a direct variant that times fastest is
    the plan. The direct plan's norms equal vmap's."""
    w = jax.random.normal(jax.random.key(0), (8, 8)) / 3
    x = jax.random.normal(jax.random.key(1), (16, 6, 8))

    def loss_fn(w, x):
        return jnp.mean(jnp.tanh(jnp.einsum("btk,kc->btc", x, w)) ** 2)

    the_plan = ghost.plan(loss_fn, w, x)
    direct = ghost.direct_where_close(the_plan)
    assert [c.form for c in the_plan.consumers] == ["gram"]
    assert [c.form for c in direct.consumers] == ["direct"]
    assert ghost.direct_where_close(ghost.plan(*chunk_problem("plain_mlp"))) is None
    check_sums(loss_fn, w, x, forms=(), the_plan=the_plan, more=[(direct, "auto")])

    monkeypatch.setattr(ghost, "CHUNK_SIZES", (8,))  # chunk_counts(16) == (2, 4)
    monkeypatch.setattr(ghost, "CHUNK_COUNT", 4)
    monkeypatch.setattr(ghost, "_CALIBRATED", {})
    monkeypatch.setattr(ghost, "_within_memory", lambda calls: (calls, ""))
    seen, winner = [], "ghost in 2 chunks, direct form"

    def fake(calls, warmup, rounds):
        seen.extend(calls)
        return {m: [1.0 if m == winner else 2.0] * rounds for m in calls}

    monkeypatch.setattr(hardware, "interleaved_times", fake)
    chosen = ghost.calibrate(loss_fn, w, x, the_plan)
    chunks = [f"ghost in {k} chunks{form}" for k in (2, 4) for form in ("", ", direct form")]
    assert seen == ["ghost", "every leaf from 4 microbatches", *chunks, "vmap"]
    assert chosen.num_chunks == 2 and [c.form for c in chosen.consumers] == ["direct"]
    assert f"auto: timed once: {winner} (median ms: ghost " in chosen.describe()


def test_calibrate_skips_the_chunks_when_the_weights_outweigh_the_batch(monkeypatch):
    """A wide dense layer on a small batch: the whole batch's program needs less temporary
    memory than the weights' bytes, which a loop over chunks holds for each chunk's gradients,
    so no chunked path is built, compiled or timed, and the plan says why."""
    w = jnp.ones((256, 256)) / 16
    x = jax.random.normal(jax.random.key(0), (32, 256))

    def loss_fn(w, x):
        return jnp.mean(jnp.tanh(x @ w) ** 2)

    assert ghost.chunk_counts(32)  # a batch that could be chunked
    monkeypatch.setattr(ghost, "_CALIBRATED", {})
    monkeypatch.setattr(ghost, "chunked", None)  # would fail if called
    seen = []

    def fake(calls, warmup, rounds):
        seen.extend(calls)
        return {m: [1.0] * rounds for m in calls}

    monkeypatch.setattr(hardware, "interleaved_times", fake)
    chosen = ghost.calibrate(loss_fn, w, x, ghost.plan(loss_fn, w, x))
    assert seen == ["ghost", "every leaf from 8 microbatches", "vmap"]
    assert chosen.num_chunks == 1
    assert "not timed, more memory than the whole batch: the chunked paths" in chosen.describe()


def test_cost_model_forms_for_embed_and_dense():
    # Embedding: Gram T²·D against a per-example [vocab, D] table.
    def embed_form(**kw):
        loss_fn, params, tokens = lm_setup(batch=4, abstract=True, **kw)
        the_plan = ghost.plan(loss_fn, params, tokens)
        return next(c.form for c in the_plan.consumers if c.kind == "embed")

    assert embed_form(context=16, vocab=4096) == "gram"  # a large vocabulary: no table
    assert embed_form(context=64, vocab=2) == "direct"


# ---------------------------------------------------------------------------------------------
# Any JAX code: the CPU CNN, and random shapes of each covered operation.


def test_small_cnn_is_covered_and_equals_vmap():
    from experiments import models  # noqa: PLC0415

    loss_fn, params, batch = setup(models.SmallCNN(widths=(4, 8), groups=2), images((3, 8, 8, 3)))
    the_plan = ghost.plan(loss_fn, params, batch)
    assert the_plan.fallback == () and len(the_plan.consumers) == the_plan.num_leaves
    check_equal_to_vmap(loss_fn, params, batch)


def random_problem(kind, b, t, k, c, stride, rng):
    """A plain-JAX loss with one parameter read by one operation of ``kind``."""
    normal = functools.partial(rng.standard_normal, dtype=np.float32)
    target = jnp.asarray(normal((b, t, c)))
    if kind == "dense":  # jnp.dot on [B, T, K]
        w, x = normal((k, c)), normal((b, t, k))
        out = lambda w, x: jnp.tanh(jnp.dot(x, w))  # noqa: E731
    elif kind == "conv":  # NHWC, HWIO
        w, x = normal((2, 3, k, c)), normal((b, t * stride, t * stride + 1, k))

        def out(w, x):
            y = lax.conv_general_dilated(
                x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            return jnp.tanh(y.reshape(x.shape[0], -1, c)[:, :t])
    elif kind == "embed":  # table[tokens], repeated tokens
        w, x = normal((k + 1, c)), rng.integers(0, k + 1, (b, t)).astype(np.int32)
        out = lambda w, x: jnp.tanh(w[x])  # noqa: E731
    else:  # a bias / position parameter broadcast over the examples
        w, x = normal((t, c)), normal((b, t, c))
        out = lambda w, x: jnp.tanh(x + w)  # noqa: E731

    def loss_fn(w, batch):
        x, y = batch
        return jnp.mean(jnp.sum(out(w, x) * y, axis=(1, 2)))

    return loss_fn, jnp.asarray(w), (jnp.asarray(x), target)


@settings(max_examples=3, deadline=None)
@given(
    b=st.integers(2, 4),
    t=st.integers(1, 4),
    k=st.integers(1, 5),
    c=st.integers(1, 4),
    stride=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_property(b, t, k, c, stride, seed):
    """Any shapes: the fast path covers one parameter per operation kind, each read by that
    operation alone (the sum of their losses: one jit), and their norms equal vmap's."""
    rng = np.random.default_rng(seed)
    kinds = ["dense", "conv", "embed", "bias"]
    problems = [random_problem(kind, b, t, k, c, stride, rng) for kind in kinds]
    ws, batches = [w for _, w, _ in problems], [batch for *_, batch in problems]

    def loss_fn(ws, batches):
        return sum(f(w, batch) for (f, _, _), w, batch in zip(problems, ws, batches, strict=True))

    the_plan = ghost.plan(loss_fn, ws, batches)
    assert the_plan.fallback == (), the_plan.describe()
    assert [op.kind for op in the_plan.consumers] == ["dense", "conv", "embed", "sum"]
    check_equal_to_vmap(loss_fn, ws, batches, forms=("direct", "gram"))
