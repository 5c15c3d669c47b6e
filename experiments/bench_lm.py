r"""The cost of the noise-scale estimators on a small Transformer language model.

One reusable function, :func:`measure`, for ``make bench``'s Transformer rows: on a
:class:`experiments.models.TransformerLM` with AdamW, at each batch size, a plain jit'd train
step and the same step taking its gradient from ``gns.estimate.per_example`` with
``method="auto"`` (what :func:`gns.ghost.select` picks: the fast path or ``vmap``),
``method="vmap"`` and ``microbatch``. After compilation and warm-up the steps are timed in
turn (interleaved, :func:`gns.hardware.interleaved_times`), ``repeats`` rounds, median per
variant, with the compiled temporary memory (``memory_analysis().temp_size_in_bytes``).

Usage (prints JSON)::

    python -m experiments.bench_lm 32 128

:func:`find` runs the library call :func:`gns.find_batch_size` on the ``lm`` model of
``configs/lm.py`` (its corpus, optimizer and reference batch) with a small budget and prints
the recommendation::

    python -m experiments.bench_lm --find [VARIANT [MAX_SECONDS]]   # default: cpu 60
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import gns
from configs import lm as lm_config
from experiments import models, text, train
from gns import common, estimate, ghost, hardware

LM_VARIANTS = ("plain", "per_example_auto", "per_example_vmap", "microbatch")


def lm_loss(model):
    """Next-token cross entropy of ``model`` on a batch of tokens ``[B, length + 1]``."""

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss_fn


def lm_steps(loss_fn, optimizer, params, tokens, num_microbatches: int = 8) -> dict[str, Any]:
    """The train steps of :data:`LM_VARIANTS` (not jitted), and what ``auto`` picked.

    Returns:
      ``(steps, auto)``: ``steps[name]`` is ``step(params, opt_state, tokens) -> (params,
      opt_state, metrics)``, all with the same AdamW update; ``auto`` is ``"ghost"`` or
      ``"vmap"``: what ``per_example(method="auto")`` runs, decided by
      :func:`gns.ghost.select` (the fast path when its cost model says it is cheaper).
    """
    auto = "ghost" if ghost.select(loss_fn, params, tokens) is not None else "vmap"

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def plain(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        return (*update(params, opt_state, grads), {"loss": loss})

    def with_estimator(estimator):
        def step(params, opt_state, tokens):
            stats, grads = estimator(params, tokens)
            return (*update(params, opt_state, grads), {"g_sq": stats.g_sq})

        return step

    k = num_microbatches
    return {
        "plain": plain,
        "per_example_auto": with_estimator(
            lambda p, b: estimate.per_example(loss_fn, p, b, method=auto)
        ),
        "per_example_vmap": with_estimator(
            lambda p, b: estimate.per_example(loss_fn, p, b, method="vmap")
        ),
        "microbatch": with_estimator(
            lambda p, b: estimate.microbatch(loss_fn, p, b, num_microbatches=k)
        ),
    }, auto


def measure(
    batch_sizes=(32, 128),
    *,
    width: int = 128,
    depth: int = 2,
    context: int = 64,
    num_heads: int = 4,
    vocab_size: int = 256,
    mlp_ratio: int = 4,
    repeats: int = 10,
    warmup: int = 2,
    num_microbatches: int = 8,
    variants=LM_VARIANTS,
    seed: int = 0,
) -> dict[str, Any]:
    """Time and compiled temp memory of :data:`LM_VARIANTS` on a ``TransformerLM``.

    Args:
      batch_sizes: the batch sizes (sequences of ``context`` tokens).
      width, depth, context, num_heads, vocab_size, mlp_ratio: the model (the defaults are
        the ``cpu`` model of ``configs/lm.py``).
      repeats: timed rounds (interleaved); the median is reported.
      warmup: untimed calls per step first.
      num_microbatches: ``k`` of the microbatch variant (must divide every batch size).
      variants: which of :data:`LM_VARIANTS` to run (``"plain"`` is always run).
      seed: of the parameters and the random tokens.

    Returns:
      ``{"<batch>": {"seconds", "seconds_iqr", "examples_per_second", "over_plain",
      "temp_bytes", "memory_over_plain", "auto_method", "auto_describe", "compile_seconds",
      "num_params"}, "model": {...}, "load_before"/"load_after": os.getloadavg(), "device",
      "seconds"}`` (``"seconds"``: the wall clock of the whole measurement).

    Example:
      >>> out = measure((8,), width=16, depth=1, context=8, repeats=1, warmup=0)
      >>> sorted(out["8"]["over_plain"])
      ['microbatch', 'per_example_auto', 'per_example_vmap', 'plain']
    """
    t_start = time.perf_counter()
    spec = dict(vocab_size=vocab_size, context=context, width=width, depth=depth)
    spec |= dict(num_heads=num_heads, mlp_ratio=mlp_ratio)
    model = models.TransformerLM(**spec)
    loss_fn = lm_loss(model)
    optimizer = optax.adamw(3e-4)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"model": spec, "load_before": list(os.getloadavg())}
    for bs in batch_sizes:
        tokens = rng.integers(0, vocab_size, (bs, context + 1), dtype=np.int32)
        params = model.init(jax.random.key(seed), tokens[:1, :-1])["params"]
        out[str(bs)] = time_steps(
            loss_fn, optimizer, params, tokens, num_microbatches=num_microbatches,
            repeats=repeats, warmup=warmup, variants=variants,
        )  # fmt: skip
    out["load_after"] = list(os.getloadavg())
    out["device"] = f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cpus"
    out["seconds"] = time.perf_counter() - t_start
    return out


def time_steps(
    loss_fn, optimizer, params, batch, *, num_microbatches, repeats, warmup, variants=LM_VARIANTS
) -> dict[str, Any]:
    """Compile the steps of :func:`lm_steps` on one batch and time them interleaved.

    Returns:
      ``{"seconds", "seconds_iqr", "examples_per_second", "over_plain", "temp_bytes",
      "memory_over_plain", "auto_method", "auto_describe", "compile_seconds", "num_params"}``.
    """
    bs = common.batch_size(batch)
    opt_state = optimizer.init(params)
    steps, auto = lm_steps(loss_fn, optimizer, params, batch, num_microbatches)
    names = ["plain", *(v for v in variants if v != "plain")]
    compiled, temp, compile_s = {}, {}, {}
    args = (params, opt_state, batch)
    for name in names:
        t0 = time.perf_counter()
        compiled[name] = jax.jit(steps[name]).lower(*args).compile()
        compile_s[name] = time.perf_counter() - t0
        mem = compiled[name].memory_analysis()
        temp[name] = int(mem.temp_size_in_bytes) if mem is not None else None
    times = hardware.interleaved_times(
        {n: (c, args) for n, c in compiled.items()}, warmup=warmup, rounds=repeats
    )
    seconds = {n: float(np.median(t)) for n, t in times.items()}
    try:
        described = ghost.plan(loss_fn, params, batch).describe()
    except ghost.NotApplicableError as e:
        described = f"auto: vmap ({e})"
    return {
        "seconds": seconds,
        "seconds_iqr": {
            n: float(np.subtract(*np.percentile(t, [75, 25]))) for n, t in times.items()
        },
        "examples_per_second": {n: bs / s for n, s in seconds.items()},
        "over_plain": {n: s / seconds["plain"] for n, s in seconds.items()},
        "temp_bytes": temp,
        "memory_over_plain": {
            n: (b / temp["plain"] if b is not None and temp["plain"] else None)
            for n, b in temp.items()
        },
        "auto_method": auto,
        "auto_describe": described,
        "compile_seconds": compile_s,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
    }


# ---------------------------------------------------------------------------------------------
# More models, written as a new user would: a Transformer in the style of the Flax lm1b
# example, an NNX MLP and a plain-JAX MLP.


class Lm1bTransformer(nn.Module):
    """A decoder in the style of the Flax ``lm1b`` example: ``nn.Embed``, a learned position
    embedding as a bare ``self.param`` added to the input, pre-LayerNorm blocks of causal
    ``nn.MultiHeadDotProductAttention`` and a GELU MLP, an untied ``nn.Dense`` head."""

    vocab_size: int = 256
    context: int = 64
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4

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


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def row_problem(name: str, batch_size: int, dims=(3072, 512, 512, 10), seed: int = 0, **lm):
    """``(loss_fn, params, batch)`` of a bench row's model: ``"lm1b"`` (:class:`Lm1bTransformer`
    with ``lm`` fields, next-token loss on random tokens), ``"nnx_mlp"`` (:class:`NnxMLP`,
    ``nnx.split`` state as params) or ``"plain_mlp"`` (a dict of weights, ``jnp.dot`` + bias,
    ReLU), both MLPs of ``dims`` on random features with labels."""
    rng = np.random.default_rng(seed)
    if name == "lm1b":
        model = Lm1bTransformer(**lm)
        tokens = rng.integers(0, model.vocab_size, (batch_size, model.context + 1), dtype=np.int32)
        params = jax.jit(model.init)(jax.random.key(seed), tokens[:1, :-1])["params"]
        return lm_loss(model), params, tokens
    x = rng.standard_normal((batch_size, dims[0]), dtype=np.float32)
    batch = (x, rng.integers(0, dims[-1], batch_size).astype(np.int32))
    if name == "nnx_mlp":
        graphdef, state = nnx.split(NnxMLP(dims, nnx.Rngs(seed)))

        def nnx_loss(state, batch):
            return _cross_entropy(nnx.merge(graphdef, state)(batch[0]), batch[1])

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
        return _cross_entropy(h, batch[1])

    return plain_loss, params, batch


def measure_rows(rows, *, repeats: int, warmup: int, num_microbatches: int) -> dict[str, Any]:
    """:func:`time_steps` (AdamW) on each row of ``rows``: ``{name: {"batch_sizes", ...model
    fields}}``; returns ``{name: {"<batch>": {...}}, "load_before", "load_after"}``."""
    out: dict[str, Any] = {"load_before": list(os.getloadavg())}
    for name, row in rows.items():
        fields = dict(row)
        sizes = fields.pop("batch_sizes")
        out[name] = {}
        for bs in sizes:
            loss_fn, params, batch = row_problem(name, int(bs), **fields)
            out[name][str(bs)] = time_steps(
                loss_fn, optax.adamw(3e-4), params, batch, num_microbatches=num_microbatches,
                repeats=repeats, warmup=warmup,
            )  # fmt: skip
    out["load_after"] = list(os.getloadavg())
    return out


def find(
    variant: str = "cpu",
    *,
    max_seconds: float = 60.0,
    pilot_steps: int = 300,
    candidates=(16, 32, 64, 128),
    timing_rounds: int = 3,
    warmup_steps: int = 20,
    progress: bool = False,
):
    """:func:`gns.find_batch_size` on the ``lm`` model of ``configs/lm.py:VARIANT``.

    The model, corpus (:mod:`experiments.text`, the Python standard library by default),
    optimizer (``config.optimizer``, AdamW with weight decay on kernels) and reference batch
    (``config.batch_size``) of the variant; the learning rate warms up linearly over
    ``warmup_steps`` then stays at ``config.learning_rate`` (the pilot is a short run, not a
    full schedule). A batch of ``size`` is the train windows ``[index·size, (index+1)·size)``
    (``context + 1`` bytes each) of the experiment's shuffled stream.

    Args:
      variant: the ``configs/lm.py`` variant (``smoke`` or ``cpu``).
      max_seconds: the pilot's time budget (compilation included).
      pilot_steps: the pilot's step budget.
      candidates: batch sizes timed (each compiled twice: memory, then timing).
      timing_rounds: interleaved timing rounds.
      warmup_steps: linear learning-rate warmup of the pilot.
      progress: show the progress bar.

    Returns:
      ``(result, seconds)``: the :class:`gns.finder.BatchSizeResult` and the wall clock.
    """
    t0 = time.perf_counter()
    config = lm_config.get_config(variant)
    config.warmup_steps, config.schedule = warmup_steps, "constant"
    ds = text.load(config.data, context=config.model.context)
    model = models.get_model(config.model)
    optimizer = train.make_optimizer(config, train.make_schedule(config, pilot_steps))

    def batch_fn(size, index):
        b = ds.train_batch(index * size, size, seed=config.seed)
        return np.concatenate([b["tokens"], b["targets"][:, -1:]], axis=1)  # [size, context+1]

    init = batch_fn(1, 0)[:, :-1]
    params = jax.jit(model.init)(jax.random.key(config.seed), init)["params"]
    result = gns.find_batch_size(
        lm_loss(model), params, optimizer, batch_fn, ref_batch_size=config.batch_size,
        pilot_steps=pilot_steps, max_seconds=max_seconds, candidates=candidates,
        timing_rounds=timing_rounds, learning_rate=config.learning_rate,
        optimizer_name=config.optimizer, progress=progress_bars() if progress else None,
    )  # fmt: skip
    return result, time.perf_counter() - t0


def progress_bars():
    """``progress(phase, done, total)`` for :func:`gns.find_batch_size`: a tqdm bar per phase."""
    bars = {}

    def progress(phase, done, total):
        bar = bars.setdefault(phase, tqdm(total=total, desc=phase, leave=False))
        bar.total, bar.n = total, done
        bar.refresh()

    return progress


def describe_result(result, seconds: float) -> str:
    """The recommendation of :func:`find` in a few lines."""
    rec = result.recommendation
    b = result.b_simple
    lines = [
        f"recommended batch size: {rec.batch_size} (accumulation steps {rec.accumulation_steps})",
        f"learning rate: {rec.learning_rate:.3g} ({rec.lr_rule})",
        f"basis: {result.basis} ({result.basis_note or 'the best evidence measured'})",
        f"plausible batch sizes: {list(rec.plausible_batch_sizes)}, "
        f"near-optimal range: {rec.near_optimal_range}",
        f"B_simple over the pilot: {b.estimate:.4g} (interval {b.low:.4g} .. {b.high:.4g}, "
        f"{b.n} steps)",
        f"effective noise scale: {result.effective_noise_scale.to_dict()}",
        f"step times (s): { {k: round(v, 4) for k, v in result.timing.step_time().items()} }",
        f"largest batch that fits: {result.memory.max_batch_size}",
        f"pilot: {result.settings['pilot_steps_done']} steps "
        f"({result.settings['pilot_stop_reason']}); seconds: "
        f"{ {k: round(v, 1) for k, v in result.seconds.items()} }; wall {seconds:.1f} s",
        f"reason: {rec.reason}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--find"]:
        # python -m experiments.bench_lm --find [VARIANT [MAX_SECONDS]]
        args = sys.argv[2:]
        res, wall = find(
            args[0] if args else "cpu", max_seconds=float(args[1]) if args[1:] else 60.0
        )
        print(describe_result(res, wall))
    else:
        sizes = tuple(int(a) for a in sys.argv[1:]) or (32, 128)
        print(json.dumps(measure(sizes), indent=1))
