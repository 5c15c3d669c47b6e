"""Flax Linen models of the experiments: image classifiers and a byte-level Transformer.

``model.apply(variables, x, train=...)`` returns logits ``[batch, num_classes]`` (the
Transformer's: ``[batch, length, vocab_size]``); ``train=True`` uses batch statistics
(``mutable=["batch_stats"]``) and dropout (``rngs={"dropout": key}``). ``dtype`` is the
computation dtype (None: the inputs'; parameters stay float32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.rules import MODEL_NAMES
from gns.ghost import AddPositionEmbedding


class SmallCNN(nn.Module):
    """Stride-2 convolutions + GroupNorm + ReLU, then a dense head: no max-pooling (slow on
    XLA:CPU), no BatchNorm (per-example gradients stay valid); about 95k parameters."""

    widths: Sequence[int] = (32, 64, 128)
    num_classes: int = 10
    groups: int = 8
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in self.widths:
            x = nn.Conv(width, (3, 3), strides=2, padding="SAME", dtype=self.dtype)(x)
            x = nn.relu(nn.GroupNorm(num_groups=min(self.groups, width), dtype=self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class MLP(nn.Module):
    """Flattened inputs, ``Dense(width) + ReLU`` for each of ``widths``, then a dense head
    (855,050 parameters for ``widths=(256, 256)`` on 32x32x3)."""

    widths: Sequence[int] = (256, 256)
    num_classes: int = 10
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        for width in self.widths:
            x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def _layers(train: bool, dtype: Any, momentum: float = 0.9, epsilon: float = 1e-5):
    """``(norm, conv)``: ``nn.BatchNorm`` (batch statistics when ``train``; ResNet's momentum
    and epsilon by default) and ``nn.Conv`` without bias, both in ``dtype``."""
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=epsilon, dtype=dtype
    )
    return norm, functools.partial(nn.Conv, use_bias=False, dtype=dtype)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    filters: int
    strides: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        norm, conv = _layers(train, self.dtype)
        s = (self.strides, self.strides)
        y = nn.relu(norm()(conv(self.filters, (3, 3), s, padding="SAME")(x)))
        y = conv(self.filters, (3, 3), padding="SAME")(y)
        y = norm(scale_init=nn.initializers.zeros)(y)  # zero-init the residual branch (Goyal+17)
        if x.shape[-1] != self.filters or self.strides != 1:
            x = norm(name="proj_bn")(conv(self.filters, (1, 1), s, name="proj_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-18 (He et al. 2016) for 32x32 images, the CIFAR variant of pytorch-cifar: a 3x3
    stride-1 stem, four stages of ``stage_sizes`` basic blocks of ``num_filters * 2**i``
    channels (stride 2 from the second on), average pooling, a dense head (11,173,962
    parameters for 10 classes)."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    num_filters: int = 64
    num_classes: int = 10
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm, conv = _layers(train, self.dtype)
        x = conv(self.num_filters, (3, 3), padding="SAME", name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                block = BasicBlock(self.num_filters * 2**i, strides, self.dtype)
                x = block(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


# (expand_ratio, kernel, strides, input_filters, output_filters, repeats), EfficientNet-B0,
# Table 1 of the paper (with the squeeze-excitation ratio 0.25 of every stage).
EFFICIENTNET_B0_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


def round_filters(filters: int, width_coefficient: float, divisor: int = 8) -> int:
    """Channels scaled by ``width_coefficient``, rounded to a multiple of ``divisor`` (as the
    reference implementation does)."""
    filters *= width_coefficient
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * filters else new)


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, depthwise kxk, squeeze-excitation, 1x1 project."""

    input_filters: int
    output_filters: int
    expand_ratio: int
    kernel: int
    strides: int
    drop_connect_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        norm, conv = _layers(train, self.dtype, 0.99, 1e-3)
        inputs = x
        filters = self.input_filters * self.expand_ratio
        if self.expand_ratio != 1:
            x = conv(filters, (1, 1), name="expand_conv")(x)
            x = nn.swish(norm(name="expand_bn")(x))
        k, s = (self.kernel, self.kernel), (self.strides, self.strides)
        x = conv(filters, k, s, padding="SAME", feature_group_count=filters, name="dw")(x)
        x = nn.swish(norm(name="dw_bn")(x))
        se = jnp.mean(x, axis=(1, 2), keepdims=True)  # squeeze-excitation, ratio 0.25
        se = conv(max(1, self.input_filters // 4), (1, 1), use_bias=True, name="se_reduce")(se)
        se = conv(filters, (1, 1), use_bias=True, name="se_expand")(nn.swish(se))
        x = x * nn.sigmoid(se)
        x = norm(name="project_bn")(conv(self.output_filters, (1, 1), name="project_conv")(x))
        if self.strides != 1 or self.input_filters != self.output_filters:
            return x
        if train and self.drop_connect_rate > 0:
            # Stochastic depth: drop the whole residual branch per example.
            keep = 1.0 - self.drop_connect_rate
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
            x = x * mask.astype(x.dtype) / keep
        return x + inputs


class EfficientNet(nn.Module):
    """EfficientNet-B0 (Tan & Le, ICML 2019) as in its reference code: a 3x3 stride-2 stem,
    the MBConv stages of :data:`EFFICIENTNET_B0_BLOCKS`, a 1x1 head of 1280 channels, average
    pooling, dropout and a dense classifier; stochastic depth rising to ``drop_connect_rate``
    over the blocks (4,020,358 parameters for 10 classes). ``stem_strides=1`` keeps a 2x2
    feature map of 32x32 images (a common CIFAR adaptation)."""

    num_classes: int = 10
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    stem_strides: int = 2
    head_filters: int = 1280
    blocks: Sequence[Sequence[int]] = EFFICIENTNET_B0_BLOCKS
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm, conv = _layers(train, self.dtype, 0.99, 1e-3)
        wc, dc = self.width_coefficient, self.depth_coefficient
        stem = round_filters(self.blocks[0][3], wc)
        x = conv(stem, (3, 3), self.stem_strides, padding="SAME", name="stem_conv")(x)
        x = nn.swish(norm(name="stem_bn")(x))
        total = sum(math.ceil(dc * b[5]) for b in self.blocks)
        index = 0
        for expand, kernel, strides, f_in, f_out, repeats in self.blocks:
            f_in, f_out = round_filters(f_in, wc), round_filters(f_out, wc)
            for _ in range(math.ceil(dc * repeats)):
                rate = self.drop_connect_rate * index / total
                x = MBConv(f_in, f_out, expand, kernel, strides, rate, self.dtype)(x, train)
                f_in, strides, index = f_out, 1, index + 1  # the block's later repeats
        x = conv(round_filters(self.head_filters, wc), (1, 1), name="head")(x)
        x = jnp.mean(nn.swish(norm(name="head_bn")(x)), axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: causal multi-head self-attention, then a GELU MLP, each residual."""

    num_heads: int
    mlp_ratio: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, x, mask):
        norm = functools.partial(nn.LayerNorm, dtype=self.dtype)
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        attn = nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype, name="attn")
        x = x + attn(norm(name="attn_norm")(x), mask=mask)
        h = norm(name="mlp_norm")(x)
        h = nn.gelu(dense(self.mlp_ratio * x.shape[-1], name="mlp_in")(h))
        return x + dense(x.shape[-1], name="mlp_out")(h)


class ScannedBlock(TransformerBlock):
    """:class:`TransformerBlock` as ``nn.scan`` calls it: ``(carry, mask) -> (carry, None)``."""

    def __call__(self, x, mask):
        return super().__call__(x, mask), None


class TransformerLM(nn.Module):
    """Byte-level decoder-only Transformer, pre-LayerNorm as GPT-2: token embedding, a
    learned position embedding (:class:`gns.ghost.AddPositionEmbedding`), ``depth`` blocks of
    causal attention and a GELU MLP, a final LayerNorm and a dense head (or the embedding
    transposed: ``tie_embeddings``; :mod:`gns.ghost` sums the two reads' per-example parts).
    With ``scan_layers`` the blocks are one ``nn.scan`` over layers, their parameters stacked
    along a leading axis (as MaxText's ``scan_layers``): one block is compiled, not ``depth``.
    Parameters (untied, ``mlp_ratio`` 4): ``V·D + L·D + depth·(12·D² + 13·D) + 2·D + D·V +
    V`` for vocabulary ``V``, context ``L``, width ``D``."""

    vocab_size: int = 256
    context: int = 64
    width: int = 128
    tie_embeddings: bool = False
    scan_layers: bool = False
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        if tokens.ndim != 2 or tokens.shape[1] > self.context:
            raise ValueError(
                f"TransformerLM needs tokens [batch, length] with length <= context="
                f"{self.context}, got shape {tuple(tokens.shape)}."
            )
        embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="embed")
        x = AddPositionEmbedding(self.context, name="position")(embed(tokens))
        mask = nn.make_causal_mask(tokens)
        block_args = (self.num_heads, self.mlp_ratio, self.dtype)
        if self.scan_layers:
            layers = nn.scan(
                ScannedBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.depth,
            )
            x, _ = layers(*block_args, name="blocks")(x, mask)
        else:
            for i in range(self.depth):
                x = TransformerBlock(*block_args, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, name="final_norm")(x)
        if self.tie_embeddings:
            return embed.attend(x)
        return nn.Dense(self.vocab_size, dtype=self.dtype, name="head")(x)


# config.model.name -> module (rules.MODEL_NAMES lists the names without importing JAX).
MODELS = dict(
    mlp=MLP, small_cnn=SmallCNN, resnet=ResNet, resnet18=ResNet, transformer=TransformerLM
)
MODELS |= dict(efficientnet=EfficientNet, efficientnet_b0=EfficientNet)


def _tuples(value: Any) -> Any:
    """``value`` with its lists and tuples, nested too, as tuples (hashable module fields)."""
    return tuple(map(_tuples, value)) if isinstance(value, list | tuple) else value


def get_model(model_config: Any, num_classes: int | None = None, dtype: Any = None) -> nn.Module:
    """The model of ``config.model`` (a ConfigDict or dict): ``name`` in :data:`MODEL_NAMES`
    and the module's fields (a missing or None one takes the module's default);
    ``num_classes`` overrides the config's; ``dtype`` is the computation dtype (e.g.
    ``"bfloat16"``)."""
    name = model_config.get("name")
    if name not in MODELS:
        raise ValueError(
            f"config.model.name={name!r} is not a known model: use one of {', '.join(MODEL_NAMES)}."
        )
    cls = MODELS[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"name", "parent"}
    kw = {k: _tuples(v) for k, v in model_config.items() if k in fields and v is not None}
    if num_classes is not None and "num_classes" in fields:
        kw["num_classes"] = num_classes
    if dtype is not None:
        kw["dtype"] = jnp.dtype(dtype)
    return cls(**kw)


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` keeps BatchNorm statistics (then per-example gradients are invalid:
    the microbatch estimator measures them)."""
    return isinstance(model, ResNet | EfficientNet)


def uses_dropout(model: nn.Module) -> bool:
    """Whether ``model`` draws from the ``"dropout"`` RNG stream in training mode."""
    return isinstance(model, EfficientNet) and (
        model.dropout_rate > 0 or model.drop_connect_rate > 0
    )
