"""Flax Linen models for the CIFAR-10 experiments.

Parameters are a plain pytree (``variables["params"]``), which is what ``gns.estimate`` wants
from a ``loss_fn(params, batch)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
    """Stride-2 convolutions + GroupNorm + ReLU, then a dense head.

    No max-pooling (slow on XLA:CPU) and no BatchNorm (so per-example gradients are valid).
    With the default widths (32, 64, 128) it has about 95k parameters and trains at
    2,000-2,700 examples/s on 2 CPU cores.
    """

    widths: Sequence[int] = (32, 64, 128)
    num_classes: int = 10
    groups: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout or batch statistics
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), strides=(1, 1) if i == 0 else (2, 2), padding="SAME")(x)
            x = nn.GroupNorm(num_groups=min(self.groups, width))(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)
