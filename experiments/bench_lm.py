r"""The cost of the noise-scale estimators on a small Transformer language model.

One reusable function, :func:`measure`, for ``make bench``'s Transformer rows (issue 14): on a
:class:`experiments.models.TransformerLM` with AdamW, at each batch size, a plain jit'd train
step and the same step taking its gradient from ``gns.estimate.per_example`` with
``method="auto"`` (what :func:`gns.ghost.select` picks: the fast path or ``vmap``),
``method="vmap"`` and ``microbatch``. After compilation and warm-up the steps are timed in
turn (interleaved, :func:`experiments.bench.interleaved_times`), ``repeats`` rounds, median per
variant, with the compiled temporary memory (``memory_analysis().temp_size_in_bytes``).

Usage (prints JSON)::

    python -m experiments.bench_lm 32 128
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

from experiments import models
from experiments.bench import interleaved_times
from gns import estimate, ghost

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
    repeats: int = 10,
    warmup: int = 2,
    num_microbatches: int = 8,
    variants=LM_VARIANTS,
    seed: int = 0,
) -> dict[str, Any]:
    """Time and compiled temp memory of :data:`LM_VARIANTS` on a ``TransformerLM``.

    Args:
      batch_sizes: the batch sizes (sequences of ``context`` tokens).
      width, depth, context, num_heads, vocab_size: the model.
      repeats: timed rounds (interleaved); the median is reported.
      warmup: untimed calls per step first.
      num_microbatches: ``k`` of the microbatch variant (must divide every batch size).
      variants: which of :data:`LM_VARIANTS` to run (``"plain"`` is always run).
      seed: of the parameters and the random tokens.

    Returns:
      ``{"<batch>": {"seconds", "over_plain", "temp_bytes", "memory_over_plain",
      "auto_method", "auto_describe", "compile_seconds"}, "load": os.getloadavg(), ...}``.

    Example:
      >>> out = measure((8,), width=16, depth=1, context=8, repeats=1, warmup=0)
      >>> sorted(out["8"]["over_plain"])
      ['microbatch', 'per_example_auto', 'per_example_vmap', 'plain']
    """
    model = models.TransformerLM(
        vocab_size=vocab_size, context=context, width=width, depth=depth, num_heads=num_heads
    )
    loss_fn = lm_loss(model)
    optimizer = optax.adamw(3e-4)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"load_before": list(os.getloadavg())}
    for bs in batch_sizes:
        tokens = rng.integers(0, vocab_size, (bs, context + 1), dtype=np.int32)
        params = model.init(jax.random.key(seed), tokens[:1, :-1])["params"]
        opt_state = optimizer.init(params)
        steps, auto = lm_steps(loss_fn, optimizer, params, tokens, num_microbatches)
        names = ["plain", *(v for v in variants if v != "plain")]
        compiled, temp, compile_s = {}, {}, {}
        args = (params, opt_state, tokens)
        for name in names:
            t0 = time.perf_counter()
            compiled[name] = jax.jit(steps[name]).lower(*args).compile()
            compile_s[name] = time.perf_counter() - t0
            mem = compiled[name].memory_analysis()
            temp[name] = int(mem.temp_size_in_bytes) if mem is not None else None
        times = interleaved_times(
            {n: (c, args) for n, c in compiled.items()}, warmup=warmup, rounds=repeats
        )
        seconds = {n: float(np.median(t)) for n, t in times.items()}
        out[str(bs)] = {
            "seconds": seconds,
            "over_plain": {n: s / seconds["plain"] for n, s in seconds.items()},
            "temp_bytes": temp,
            "memory_over_plain": {
                n: (b / temp["plain"] if b is not None and temp["plain"] else None)
                for n, b in temp.items()
            },
            "auto_method": auto,
            "auto_describe": ghost.plan(loss_fn, params, tokens).describe(),
            "compile_seconds": compile_s,
            "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        }
    out["load_after"] = list(os.getloadavg())
    out["device"] = f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cpus"
    return out


if __name__ == "__main__":
    sizes = tuple(int(a) for a in sys.argv[1:]) or (32, 128)
    print(json.dumps(measure(sizes), indent=1))
