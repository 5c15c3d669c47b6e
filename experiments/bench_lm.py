r"""The bench rows beyond the CNN: the models, and the one timer of ``make bench``'s rows.

:func:`time_steps` compiles a plain jit'd train step and the same step taking its gradient from
each estimator, times them in turn (:func:`gns.hardware.interleaved_times`) and reports the
medians, their ratios and the compiled temporary memory; ``experiments.bench`` uses it for
every row. :func:`measure` times the ``lm`` Transformer (:class:`experiments.models
.TransformerLM`), :func:`measure_rows` the models of :func:`row_problem` (a Transformer in the
style of the Flax lm1b example, an NNX MLP, a plain-JAX MLP), each with AdamW and the variants
of :data:`LM_VARIANTS`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import models
from gns import common, estimate, ghost, hardware

LM_VARIANTS = ("plain", "per_example_auto", "per_example_vmap", "microbatch")


def time_steps(loss_fn, optimizer, params, batch, estimators, *, repeats, warmup) -> dict:
    """Compile and time (interleaved, median) a plain step and one step per estimator.

    ``estimators[name](params, batch) -> (stats, grads)``; every step applies the same
    ``optimizer`` update from the mean gradient.

    Returns:
      ``{"seconds", "seconds_iqr", "examples_per_second", "over_plain", "temp_bytes",
      "memory_over_plain", "compile_seconds", "num_params"}``, each by name (``"plain"``
      first).
    """

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def plain(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        return (*update(params, opt_state, grads), {"loss": loss})

    def with_estimator(estimator):
        def step(params, opt_state, batch):
            stats, grads = estimator(params, batch)
            metrics = {"g_sq": stats.g_sq, "trace_cov": stats.trace_cov}
            return (*update(params, opt_state, grads), metrics)

        return step

    steps = {"plain": plain} | {n: with_estimator(e) for n, e in estimators.items()}
    args = (params, optimizer.init(params), batch)
    compiled, temp, compile_s = {}, {}, {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        compiled[name] = jax.jit(step).lower(*args).compile()
        compile_s[name] = time.perf_counter() - t0
        mem = compiled[name].memory_analysis()
        temp[name] = int(mem.temp_size_in_bytes) if mem is not None else None
    times = hardware.interleaved_times(
        {n: (c, args) for n, c in compiled.items()}, warmup=warmup, rounds=repeats
    )
    seconds = {n: float(np.median(t)) for n, t in times.items()}
    bs = common.batch_size(batch)
    iqr = {n: float(np.subtract(*np.percentile(t, [75, 25]))) for n, t in times.items()}
    return {
        "seconds": seconds,
        "seconds_iqr": iqr,
        "examples_per_second": {n: bs / s for n, s in seconds.items()},
        "over_plain": {n: s / seconds["plain"] for n, s in seconds.items()},
        "temp_bytes": temp,
        "memory_over_plain": {
            n: (b / temp["plain"] if b is not None and temp["plain"] else None)
            for n, b in temp.items()
        },
        "compile_seconds": compile_s,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
    }


def auto_choice(loss_fn, params, batch, chunk_size=None) -> dict:
    """What ``per_example(method="auto", chunk_size=chunk_size)`` runs
    (:func:`gns.ghost.select`, timed once here and cached for the step): ``"auto_method"``
    (``"ghost"`` or ``"vmap"``), ``"auto_chunks"`` (the fast path's example chunks, 1: the
    whole batch) and ``"auto_describe"`` (the plan's description, with the timings)."""
    chosen = ghost.select(loss_fn, params, batch, chunk_size=chunk_size)
    if chosen is not None:
        described = chosen.describe()
    else:
        try:
            described = ghost.plan(loss_fn, params, batch).describe() + " -> timed: vmap"
        except ghost.NotApplicableError as e:
            described = f"auto: vmap ({e})"
    return {
        "auto_method": "vmap" if chosen is None else "ghost",
        "auto_chunks": 1 if chosen is None else chosen.num_chunks,
        "auto_describe": described,
    }


def time_row(loss_fn, params, batch, *, num_microbatches, repeats, warmup) -> dict:
    """:func:`time_steps` of :data:`LM_VARIANTS` with AdamW, plus :func:`auto_choice`."""
    choice = auto_choice(loss_fn, params, batch)
    k = num_microbatches
    estimators = {
        "per_example_auto": lambda p, b: estimate.per_example(loss_fn, p, b),
        "per_example_vmap": lambda p, b: estimate.per_example(loss_fn, p, b, method="vmap"),
        "microbatch": lambda p, b: estimate.microbatch(loss_fn, p, b, num_microbatches=k),
    }
    out = time_steps(loss_fn, optax.adamw(3e-4), params, batch, estimators,
                     repeats=repeats, warmup=warmup)  # fmt: skip
    return out | choice


def lm_loss(model):
    """Next-token cross entropy of ``model`` on a batch of tokens ``[B, length + 1]``."""

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss_fn


class Lm1bTransformer(models.TransformerLM):
    """:class:`experiments.models.TransformerLM` written as the Flax ``lm1b`` example writes
    it: a learned position embedding as a bare ``self.param``, unnamed layers, untied head."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab_size, self.width)(tokens)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1, self.context, self.width)
        )
        x = x + pos[:, : tokens.shape[1]]
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.depth):
            y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(
                nn.LayerNorm()(x), mask=mask
            )
            x = x + y
            y = nn.Dense(self.width)(
                nn.gelu(nn.Dense(self.mlp_ratio * self.width)(nn.LayerNorm()(x)))
            )
            x = x + y
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


class NnxMLP(nnx.Module):
    """An NNX MLP with ReLU."""

    def __init__(self, dims, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def cross_entropy(logits, labels):
    """Mean softmax cross entropy of integer ``labels``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def row_problem(name: str, batch_size: int, dims=(3072, 512, 512, 10), seed: int = 0, **lm):
    """``(loss_fn, params, batch)`` of a bench row's model on random data: ``"transformer"``
    (:class:`experiments.models.TransformerLM`) or ``"lm1b"`` (:class:`Lm1bTransformer`) with
    ``lm`` fields, next-token loss; ``"nnx_mlp"`` (:class:`NnxMLP`, ``nnx.split`` state as
    params) or ``"plain_mlp"`` (a dict of weights, ``jnp.dot`` + bias, ReLU) of ``dims``."""
    rng = np.random.default_rng(seed)
    if name in ("transformer", "lm1b"):
        model = (models.TransformerLM if name == "transformer" else Lm1bTransformer)(**lm)
        tokens = rng.integers(0, model.vocab_size, (batch_size, model.context + 1), dtype=np.int32)
        params = jax.jit(model.init)(jax.random.key(seed), tokens[:1, :-1])["params"]
        return lm_loss(model), params, tokens
    x = rng.standard_normal((batch_size, dims[0]), dtype=np.float32)
    batch = (x, rng.integers(0, dims[-1], batch_size).astype(np.int32))
    if name == "nnx_mlp":
        graphdef, state = nnx.split(NnxMLP(dims, nnx.Rngs(seed)))

        def nnx_loss(state, batch):
            return cross_entropy(nnx.merge(graphdef, state)(batch[0]), batch[1])

        return nnx_loss, state, batch
    if name != "plain_mlp":
        raise ValueError(f"unknown bench row {name!r}: use lm1b, nnx_mlp or plain_mlp.")
    params = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        params[f"w{i}"] = jnp.asarray(rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a))
        params[f"b{i}"] = jnp.zeros(b)
    layers = len(dims) - 1

    def plain_loss(p, batch):
        h = batch[0]
        for i in range(layers):
            h = jnp.dot(h, p[f"w{i}"]) + p[f"b{i}"]
            h = jax.nn.relu(h) if i < layers - 1 else h
        return cross_entropy(h, batch[1])

    return plain_loss, params, batch


def measure_rows(rows, *, repeats: int, warmup: int, num_microbatches: int) -> dict[str, Any]:
    """:func:`time_row` on each row of ``rows``: ``{name: {"batch_sizes", ...model fields}}``;
    returns ``{name: {"<batch>": {...}}, "load_before", "load_after"}``."""
    out: dict[str, Any] = {"load_before": list(os.getloadavg())}
    for name, row in rows.items():
        fields = dict(row)
        out[name] = {}
        for bs in fields.pop("batch_sizes"):
            out[name][str(bs)] = time_row(
                *row_problem(name, int(bs), **fields), num_microbatches=num_microbatches,
                repeats=repeats, warmup=warmup,
            )  # fmt: skip
    out["load_after"] = list(os.getloadavg())
    return out


def measure(batch_sizes, model: dict, *, repeats: int, warmup: int, num_microbatches: int):
    """:func:`time_row` of a ``TransformerLM`` with the ``model`` fields (vocab_size, context,
    width, depth, num_heads, mlp_ratio) at each batch size (sequences of ``context`` tokens).

    Returns:
      ``{"<batch>": {...}, "model": model, "load_before"/"load_after": os.getloadavg(),
      "device", "seconds"}`` (``"seconds"``: the wall clock of the whole measurement).
    """
    t_start = time.perf_counter()
    rows = {"transformer": dict(model, batch_sizes=batch_sizes)}
    out = measure_rows(rows, repeats=repeats, warmup=warmup, num_microbatches=num_microbatches)
    out = {**out.pop("transformer"), "model": dict(model), **out}
    out["device"] = f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cpus"
    out["seconds"] = time.perf_counter() - t_start
    return out
