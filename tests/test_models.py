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
                lambda s, rng=rng: rng.normal(0, 0.3, s.shape).astype(np.float32),
                shapes["params"],
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
