"""Shapes and parameter counts of the CIFAR-10 models (experiments/models.py).

Full-size models are only traced (``jax.eval_shape``), never run, so these tests cost no
compilation of ResNet-18 or EfficientNet-B0.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models


def _abstract_variables(model, image_size=32, batch=2):
    x = jnp.zeros((batch, image_size, image_size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    logits = jax.eval_shape(
        lambda v: model.apply(v, x, train=False), variables
    )  # shapes only: nothing is computed
    return variables, logits


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- independent parameter counts from the architecture tables --------------------------------


def _bn(c):  # scale + bias (running statistics live in batch_stats)
    return 2 * c


def resnet18_cifar_count(num_classes=10, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)):
    n = 3 * 3 * 3 * widths[0] + _bn(widths[0])  # stem
    c_in = widths[0]
    for width, num in zip(widths, blocks, strict=True):
        for _ in range(num):
            n += 9 * c_in * width + _bn(width) + 9 * width * width + _bn(width)
            if c_in != width:
                n += c_in * width + _bn(width)  # 1x1 projection shortcut
            c_in = width
    return n + c_in * num_classes + num_classes


def efficientnet_b0_count(num_classes=10):
    # Tan & Le (2019), Table 1: (expand, kernel, in, out, repeats); SE ratio 0.25 of the input.
    table = [
        (1, 3, 32, 16, 1),
        (6, 3, 16, 24, 2),
        (6, 5, 24, 40, 2),
        (6, 3, 40, 80, 3),
        (6, 5, 80, 112, 3),
        (6, 5, 112, 192, 4),
        (6, 3, 192, 320, 1),
    ]
    n = 3 * 3 * 3 * 32 + _bn(32)  # stem
    for expand, k, c_in, c_out, repeats in table:
        for r in range(repeats):
            i = c_in if r == 0 else c_out
            mid = i * expand
            if expand != 1:
                n += i * mid + _bn(mid)
            n += k * k * mid + _bn(mid)  # depthwise
            se = max(1, int(i * 0.25))
            n += mid * se + se + se * mid + mid  # squeeze-excitation (with biases)
            n += mid * c_out + _bn(c_out)
    n += 320 * 1280 + _bn(1280)  # head
    return n + 1280 * num_classes + num_classes


def test_independent_counts_match_published_numbers():
    # ResNet-18 (CIFAR) 11.17M; EfficientNet-B0 5.29M trainable with the ImageNet head
    # (Keras: 5,288,548 trainable parameters).
    assert resnet18_cifar_count() == 11_173_962
    assert efficientnet_b0_count(1000) == 5_288_548


def test_resnet18_shapes_and_count():
    model = models.ResNet()
    variables, logits = _abstract_variables(model)
    assert logits.shape == (2, 10)
    n = _count(variables["params"])
    assert n == resnet18_cifar_count()
    assert 11.1e6 <= n <= 11.3e6
    assert "batch_stats" in variables and models.has_batch_norm(model)


def test_efficientnet_b0_shapes_and_count():
    model = models.EfficientNet()
    variables, logits = _abstract_variables(model)
    assert logits.shape == (2, 10)
    n = _count(variables["params"])
    assert n == efficientnet_b0_count(10)
    assert 3.9e6 <= n <= 4.2e6
    assert "batch_stats" in variables and models.has_batch_norm(model)
    # BatchNorm running statistics: a mean and a variance per BatchNorm channel.
    bn_channels = sum(
        x.shape[0] for p, x in jax.tree_util.tree_leaves_with_path(variables["params"])
        if any(getattr(k, "key", "") == "scale" for k in p)
    )  # fmt: skip
    assert _count(variables["batch_stats"]) == 2 * bn_channels


def test_efficientnet_head_follows_num_classes():
    v10, _ = _abstract_variables(models.EfficientNet(num_classes=10))
    v100, logits = _abstract_variables(models.EfficientNet(num_classes=100))
    assert logits.shape == (2, 100)
    assert _count(v100["params"]) - _count(v10["params"]) == 90 * (1280 + 1)


def test_small_cnn_has_no_batch_stats():
    model = models.SmallCNN(widths=(8, 16), groups=4)
    variables, logits = _abstract_variables(model)
    assert logits.shape == (2, 10)
    assert set(variables) == {"params"}
    assert not models.has_batch_norm(model)
    # conv 3x3x3x8 + GN(8) + conv 3x3x8x16 + GN(16) + dense 16x10
    assert _count(variables["params"]) == (27 * 8 + 8 + 16) + (72 * 16 + 16 + 32) + (160 + 10)


def test_mlp_flattens_pixels_into_dense_layers_of_the_given_widths():
    model = models.get_model({"name": "mlp", "widths": [256, 256]}, num_classes=10)
    variables, logits = _abstract_variables(model)
    assert logits.shape == (2, 10)
    assert not models.has_batch_norm(model)
    kernels = [variables["params"][f"Dense_{i}"]["kernel"].shape for i in range(3)]
    assert kernels == [(32 * 32 * 3, 256), (256, 256), (256, 10)]
    # the count in the MLP docstring: sum of (inputs + 1) x outputs over the layers
    assert _count(variables["params"]) == 855_050


@pytest.mark.parametrize(
    "cfg, cls, field, value",
    [
        ({"name": "small_cnn", "widths": [4, 8]}, models.SmallCNN, "widths", (4, 8)),
        ({"name": "resnet18"}, models.ResNet, "stage_sizes", (2, 2, 2, 2)),
        (
            {"name": "resnet", "stage_sizes": (1, 1), "num_filters": 8},
            models.ResNet,
            "num_filters",
            8,
        ),
        ({"name": "efficientnet_b0", "stem_strides": 1}, models.EfficientNet, "stem_strides", 1),
    ],
)
def test_get_model(cfg, cls, field, value):
    model = models.get_model(cfg, num_classes=7)
    assert isinstance(model, cls)
    assert getattr(model, field) == value
    assert model.num_classes == 7


def test_get_model_knows_every_name_the_config_rules_accept():
    assert set(models.MODELS) == set(models.MODEL_NAMES)


def test_get_model_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="small_cnn"):
        models.get_model({"name": "vgg"})


def test_tiny_batchnorm_models_run_in_both_modes():
    """Train mode updates the running statistics and draws dropout; eval mode is deterministic."""
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    tiny_effnet = models.EfficientNet(
        width_coefficient=0.25,
        blocks=((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2)),
        head_filters=64,
        dropout_rate=0.5,
        drop_connect_rate=0.5,
    )
    for model in (models.ResNet(stage_sizes=(1, 1), num_filters=4), tiny_effnet):
        # Random parameters from NumPy (compiling flax's initializers costs seconds on CPU).
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, train=False))
        rng = np.random.default_rng(0)
        variables = {
            "params": jax.tree.map(
                lambda s, rng=rng: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes["params"]
            ),
            "batch_stats": jax.tree.map(
                lambda s: np.full(s.shape, 0.5, np.float32), shapes["batch_stats"]
            ),
        }

        @jax.jit
        def both_modes(variables, m=model):
            train_out = m.apply(
                variables,
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )
            return train_out, m.apply(variables, x, train=False), m.apply(variables, x, train=False)

        (logits, updates), out1, out2 = both_modes(variables)
        assert logits.shape == (4, 10)
        chex.assert_tree_all_finite(logits)
        changed = jax.tree.map(
            lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"]
        )
        assert all(jax.tree.leaves(changed))  # every running statistic moved
        chex.assert_trees_all_equal(out1, out2)
        assert not np.allclose(out1, logits)  # train mode: batch statistics and dropout


def transformer_lm_count(vocab, context, width, depth, mlp_ratio=4, tied=False):
    """Independent count from the architecture: embeddings, blocks, final LayerNorm, head."""
    ln = 2 * width  # scale + bias
    attention = 4 * (width * width + width)  # query, key, value, out: kernel + bias each
    mlp = width * mlp_ratio * width + mlp_ratio * width + mlp_ratio * width * width + width
    block = 2 * ln + attention + mlp
    head = 0 if tied else width * vocab + vocab
    return vocab * width + context * width + depth * block + ln + head


@pytest.mark.parametrize("tied", [False, True])
def test_transformer_lm_shapes_and_count(tied):
    cfg = {"name": "transformer", "vocab_size": 256, "context": 64, "width": 128, "depth": 2}
    model = models.get_model(cfg | {"num_heads": 4, "tie_embeddings": tied})
    assert isinstance(model, models.TransformerLM) and not models.has_batch_norm(model)
    tokens = jnp.zeros((2, 64), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
    logits = jax.eval_shape(lambda v: model.apply(v, tokens), variables)
    assert logits.shape == (2, 64, 256)
    assert set(variables) == {"params"}
    assert _count(variables["params"]) == transformer_lm_count(256, 64, 128, 2, tied=tied)
    if not tied:  # the closed form of the docstring: V·D + L·D + depth·(12·D² + 13·D) + ...
        assert (
            _count(variables["params"])
            == 2 * 256 * 128 + 64 * 128 + 2 * (12 * 128**2 + 13 * 128) + 2 * 128 + 256
        )


def test_transformer_lm_scan_layers_equals_the_loop():
    """``scan_layers``: the blocks' parameters stacked along a leading axis, and the same
    function of them as the loop over ``block_i``."""
    fields = dict(vocab_size=11, context=6, width=8, depth=3, num_heads=2, mlp_ratio=2)
    loop, scanned = models.TransformerLM(**fields), models.TransformerLM(**fields, scan_layers=True)
    tokens = jnp.array([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    shapes = jax.eval_shape(lambda: loop.init(jax.random.key(0), tokens)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), shapes)
    blocks = [params.pop(f"block_{i}") for i in range(3)]
    stacked = params | {"blocks": jax.tree.map(lambda *b: np.stack(b), *blocks)}
    want = jax.eval_shape(lambda: scanned.init(jax.random.key(0), tokens)["params"])
    assert jax.tree.map(lambda s: s.shape, want) == jax.tree.map(np.shape, stacked)
    np.testing.assert_allclose(
        scanned.apply({"params": stacked}, tokens),
        loop.apply({"params": params | {f"block_{i}": b for i, b in enumerate(blocks)}}, tokens),
        rtol=1e-5,
        atol=1e-5,
    )


def test_transformer_lm_is_causal_and_checks_length():
    model = models.TransformerLM(vocab_size=11, context=6, width=8, depth=1, num_heads=2)
    tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    rng = np.random.default_rng(0)  # NumPy parameters: no compilation of flax's initializers
    params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), shapes)
    changed = tokens.at[0, 4].set(9)  # change a late token: earlier logits must not move
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    a, b = apply(tokens), apply(changed)
    np.testing.assert_allclose(a[0, :4], b[0, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[0, 4:], b[0, 4:])
    with pytest.raises(ValueError, match="context=6"):
        model.apply({"params": params}, jnp.zeros((1, 7), jnp.int32))
