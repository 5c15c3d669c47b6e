"""``make bench``: the cost of the noise-scale estimators over a plain train step.

Each row (:func:`time_row`) times a plain jit'd train step of a model on random data and the
same step taking its gradient from each estimator, interleaved, with their compiled temporary
memory. ``WORKDIR/bench.json`` (strict JSON, :func:`run_bench`) holds ``detail`` (the SmallCNN
of ``config.model``, with its ``*_over_plain`` ratios at ``reference_batch_size`` at the top),
``transformer`` (``config.lm``), ``rows`` (``config.rows``) and ``across_devices_*``
(:func:`across_devices`); the command prints it as a table (:func:`format_table`).
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install("interrupted: bench.json is written at the end, so nothing was; re-run.")

import functools
import os
import subprocess
import sys
import tempfile
import time
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from flax import nnx

from experiments import cli, models, rules, runlog, tasks
from experiments.cli import UserError
from gns import common, estimate, ghost, hardware, parallel

# per_example(_auto): method="auto"; naive_vmap, per_example_vmap: method="vmap";
# microbatch_rolled: the loop rolled (slow for convolutions on XLA:CPU: the default unrolls it);
# plain_g_sq: the plain gradient and its squared norm, the least an estimator of |G_B|² adds.
VARIANTS = ("plain", "plain_g_sq", "per_example", "microbatch", "microbatch_rolled", "naive_vmap")
LM_VARIANTS = ("plain", "plain_g_sq", "per_example_auto", "per_example_vmap", "microbatch")

FLAGS = flags.FLAGS


def estimators(loss_fn, *, num_microbatches: int, chunk_size=None) -> dict:
    """``{variant: estimator(params, batch) -> (stats, grads)}`` (``"plain"``: None)."""
    per_example = functools.partial(estimate.per_example, loss_fn, chunk_size=chunk_size)
    microbatch = functools.partial(estimate.microbatch, loss_fn, num_microbatches=num_microbatches)
    vmap = functools.partial(per_example, method="vmap")

    def plain_g_sq(params, batch):  # |G_B|² of the batch, no trace: not a noise estimate
        grads = jax.grad(loss_fn)(params, batch)
        g_sq = sum(jax.tree.leaves(common.sq_norms(grads)))
        return types.SimpleNamespace(g_sq=g_sq, trace_cov=jnp.zeros(())), grads

    return {
        "plain": None,
        "plain_g_sq": plain_g_sq,
        "per_example": per_example,
        "per_example_auto": per_example,
        "naive_vmap": vmap,
        "per_example_vmap": vmap,
        "microbatch": microbatch,
        "microbatch_rolled": functools.partial(microbatch, unroll=1),
    }


def over_plain(times: dict[str, list[float]]) -> dict[str, float]:
    """By variant of ``times`` (:func:`gns.hardware.interleaved_times`): the median of the
    per-round ratios over ``"plain"`` (paired: a load that comes and goes cancels out)."""
    return {n: float(np.median(np.divide(t, times["plain"]))) for n, t in times.items()}


def over_plain_p10(times: dict[str, list[float]]) -> dict[str, float]:
    """By variant: its 10th-percentile time over the plain step's, the cost on a quiet machine.
    A load that comes in bursts longer than a round slows some rounds of every variant; the
    fast rounds of each are the ones it missed."""
    p10 = {n: float(np.percentile(t, 10)) for n, t in times.items()}
    return {n: p / p10["plain"] for n, p in p10.items()}


def time_row(loss_fn, params, batch, optimizer, variants, *, repeats, warmup, **kw) -> dict:
    """A step of each of ``variants`` (:func:`estimators` of ``kw``), all with the same
    ``optimizer`` update, compiled and timed interleaved (:func:`gns.hardware.interleaved_times`):
    by variant, each round's ``times``, their statistics and the compiled memory; and what
    ``method="auto"`` runs (:func:`gns.ghost.select`): ``auto_method``, ``auto_chunks``,
    ``auto_describe``. A variant whose compiled temporary memory exceeds
    :func:`gns.hardware.memory_budget` is not run (``not_timed`` says why). The ``vmap``
    variants are timed in a second block with the plain step
    (``vmap_block_plain_times``, their ratios' base): interleaved with the others, their
    rounds (up to 200x a plain step and 1.7 GB on the MLPs) slowed the steps that followed."""

    def step(estimator, params, opt_state, batch):
        if estimator is None:
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            metrics = {"loss": loss}
        else:
            stats, grads = estimator(params, batch)
            metrics = {"g_sq": stats.g_sq, "trace_cov": stats.trace_cov}
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    chosen = ghost.select(loss_fn, params, batch, chunk_size=kw.get("chunk_size"))
    if chosen is not None:
        described = chosen.describe()
    else:
        try:
            described = ghost.plan(loss_fn, params, batch).describe() + " -> timed: vmap"
        except ghost.NotApplicableError as e:
            described = f"auto: vmap ({e})"
    args = jax.device_put((params, optimizer.init(params), batch))
    cache, table = hardware.CompileCache(), estimators(loss_fn, **kw)
    compiled, compile_s = {}, {}
    for name in variants:
        compiled[name], compile_s[name] = cache.get(functools.partial(step, table[name]), *args)
    temp = {n: hardware.predict_step_bytes(c).temp_bytes for n, c in compiled.items()}
    budget, source = hardware.memory_budget()
    not_timed = {  # e.g. vmap's per-example gradients of a ConvNeXt's depthwise kernels
        n: f"{b / 1e9:.3g} GB of temporary memory, over the budget of {budget / 1e9:.3g} GB "
        f"({source})"
        for n, b in temp.items()
        if b > budget and n != "plain"
    }
    compiled = {n: c for n, c in compiled.items() if n not in not_timed}
    heavy = [n for n in compiled if "vmap" in n]
    blocks = [[n for n in compiled if n not in heavy]] + ([["plain", *heavy]] if heavy else [])
    times, ratios, p10, heavy_plain = {}, {}, {}, None
    for i, block in enumerate(blocks):
        timed = hardware.interleaved_times(
            {n: (compiled[n], args) for n in block}, warmup=warmup, rounds=repeats
        )
        ratios, p10 = over_plain(timed) | ratios, over_plain_p10(timed) | p10
        if i:  # the second block's plain step is the base of the vmap steps only
            heavy_plain = timed.pop("plain")
        times |= timed
    times = {n: times[n] for n in compiled}  # in the order of variants
    seconds = {n: float(np.median(t)) for n, t in times.items()}
    size = estimate.batch_size(batch)
    path = "vmap" if chosen is None else "ghost" if chosen.consumers else "microbatches"
    return {
        "batch_size": size,
        "repeats": repeats,
        "times": times,
        "seconds": seconds,
        "seconds_iqr": {
            n: float(np.subtract(*np.percentile(t, [75, 25]))) for n, t in times.items()
        },
        "examples_per_second": {n: size / s for n, s in seconds.items()},
        "over_plain": ratios,
        "over_plain_p10": p10,
        "vmap_block_plain_times": heavy_plain,
        "not_timed": not_timed,
        "temp_bytes": temp,
        "memory_over_plain": {
            n: b / temp["plain"] if temp["plain"] else None for n, b in temp.items()
        },
        "compile_seconds": compile_s,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "auto_method": path,
        "auto_chunks": 1 if chosen is None else chosen.num_chunks,
        "auto_describe": described,
    }


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
            attend = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)
            x = x + attend(nn.LayerNorm()(x), mask=mask)
            down, up = nn.Dense(self.width), nn.Dense(self.mlp_ratio * self.width)
            x = x + down(nn.gelu(up(nn.LayerNorm()(x))))
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


class ConvNeXtStyle(nn.Module):
    """A small ConvNeXt-style classifier: a patchify stem, then per stage of ``widths`` a
    downsampling conv and a block (a 7x7 depthwise convolution, LayerNorm, an MLP of 4x the
    width, a residual); no BatchNorm."""

    widths: tuple[int, ...] = (32, 64)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (4, 4) if i == 0 else (2, 2), strides=4 if i == 0 else 2)(x)
            h = nn.Conv(width, (7, 7), feature_group_count=width)(nn.LayerNorm()(x))
            x = x + nn.Dense(width)(nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(h))))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


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


def lm_loss(model):
    """The mean next-token cross entropy of ``model`` on a batch of tokens ``[B, length + 1]``."""
    return lambda params, tokens: tasks.cross_entropy(
        model.apply({"params": params}, tokens[:, :-1]), tokens[:, 1:]
    ).mean()


def row_problem(name: str, batch_size: int, seed: int = 0, dims=(3072, 512, 512, 10), **fields):
    """``(loss_fn, params, batch)`` of a bench row's model on random data: ``"transformer"``,
    ``"lm1b"``, ``"tied_transformer"`` (its output layer the embedding transposed) or
    ``"scanned_transformer"`` (its blocks one ``nn.scan``) of ``fields`` on tokens;
    classifiers on ``(inputs, labels)``: ``"small_cnn"`` or ``"convnext"``
    (:class:`ConvNeXtStyle`) of ``fields`` (with ``image_size``, ``channels``,
    ``num_classes``), ``"nnx_mlp"`` or ``"plain_mlp"`` (a dict of weights, ``jnp.dot`` + bias,
    ReLU) of ``dims``."""
    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    if name in ("transformer", *rules.BENCH_LMS):
        variant = {"tied_transformer": "tie_embeddings", "scanned_transformer": "scan_layers"}
        fields |= {variant[name]: True} if name in variant else {}
        model = (Lm1bTransformer if name == "lm1b" else models.TransformerLM)(**fields)
        tokens = rng.integers(0, model.vocab_size, (batch_size, model.context + 1), dtype=np.int32)
        return lm_loss(model), jax.jit(model.init)(key, tokens[:1, :-1])["params"], tokens
    if name in ("small_cnn", "convnext"):
        size, classes = fields.pop("image_size", 32), fields.pop("num_classes", 10)
        shape = (size, size, fields.pop("channels", 3))
    else:
        shape, classes = (dims[0],), dims[-1]
    x = rng.standard_normal((batch_size, *shape), dtype=np.float32)
    batch = (x, rng.integers(0, classes, batch_size).astype(np.int32))
    if name in ("small_cnn", "convnext"):
        if name == "small_cnn":
            model = models.get_model(fields | {"name": name}, num_classes=classes)
        else:
            model = ConvNeXtStyle(num_classes=classes, **fields)
        params = jax.jit(model.init)(key, x[:1])["params"]
        apply = lambda params, x: model.apply({"params": params}, x)
    elif name == "nnx_mlp":
        graphdef, params = nnx.split(NnxMLP(dims, nnx.Rngs(seed)))
        apply = lambda state, x: nnx.merge(graphdef, state)(x)
    elif name == "plain_mlp":
        params = {}
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            params[f"w{i}"] = jnp.asarray(rng.standard_normal((a, b), np.float32) / np.sqrt(a))
            params[f"b{i}"] = jnp.zeros(b)

        def apply(p, h):
            for i in range(len(dims) - 1):
                h = jnp.dot(h, p[f"w{i}"]) + p[f"b{i}"]
                h = jax.nn.relu(h) if i < len(dims) - 2 else h
            return h
    else:
        raise ValueError(
            f"unknown bench row {name!r}: use transformer, {', '.join(rules.BENCH_ROWS[:-1])} "
            f"or {rules.BENCH_ROWS[-1]}."
        )
    return lambda p, b: tasks.cross_entropy(apply(p, b[0]), b[1]).mean(), params, batch


def measure_rows(rows, variants, optimizer, *, seed: int = 0, **kw) -> dict[str, Any]:
    """:func:`time_row` of each of ``rows`` (``{key: {"batch_sizes", "name" (default: the key),
    ...the fields of :func:`row_problem`}}``) at each of its batch sizes: ``{key: {"<batch>":
    {...}}, "load_before", "load_after"}`` (``os.getloadavg()``)."""
    out: dict[str, Any] = {"load_before": list(os.getloadavg())}
    for key, row in rows.items():
        fields = dict(row)
        name, sizes = fields.pop("name", key), fields.pop("batch_sizes")
        out[key] = {}
        for bs in sizes:
            logging.info("bench: %s at batch size %d", key, bs)
            problem = row_problem(name, int(bs), seed, **fields)
            out[key][str(bs)] = time_row(*problem, optimizer, variants, **kw)
    out["load_after"] = list(os.getloadavg())
    return out


def across_devices(batch_size_per_device: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """A ``jax.pmap`` SmallCNN Adam step (:func:`gns.parallel.make_train_step`) taking its
    gradient from :func:`gns.estimate.across_devices`, timed interleaved with the plain step on
    all local devices: ``{"across_devices_over_plain": median of the per-round ratios,
    "detail": {...}}`` (the raw times, their medians, devices and sizes)."""
    n_dev, warmup = jax.local_device_count(), 2
    if n_dev < 2:
        raise UserError(
            f"across_devices needs at least 2 devices, found {n_dev}",
            hint="run with JAX_PLATFORMS=cpu to simulate 4 CPU devices",
        )
    loss_fn, params, batch = row_problem("small_cnn", batch_size_per_device * n_dev, seed)
    optimizer = optax.adam(1e-3)
    steps = {
        name: parallel.make_train_step(loss_fn, optimizer, estimator=est, axis_name="batch")
        for name, est in (("plain", None), ("across_devices", estimate.across_devices))
    }
    args = (params, optimizer.init(params), parallel.shard_batch(batch))
    calls = {name: (step, args) for name, step in steps.items()}
    times = hardware.interleaved_times(calls, warmup=warmup, rounds=repeats)
    # Same start, same batch: the two steps must make the same update.
    new = [step(*args)[0] for step in steps.values()]
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), *new)
    med = {name: float(np.median(ts)) for name, ts in times.items()}
    return {
        "across_devices_over_plain": over_plain(times)["across_devices"],
        "detail": {
            "ratio_of_medians": med["across_devices"] / med["plain"],
            "median_ms": {name: 1e3 * m for name, m in med.items()},
            "times_ms": {name: [1e3 * t for t in ts] for name, ts in times.items()},
            "max_abs_param_diff": max(jax.tree.leaves(diffs)),
            "batch_size_per_device": batch_size_per_device,
            "global_batch_size": batch_size_per_device * n_dev,
            "num_devices": n_dev,
            "platform": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "repeats": repeats,
            "warmup": warmup,
            "model": "SmallCNN(32, 64, 128), Adam(1e-3), pmap",
            "jax_version": jax.__version__,
        },
    }


def run_parallel_bench(batch_size_per_device: int, repeats: int, timeout_s: float = 1200) -> dict:
    """:func:`across_devices` in a fresh process on 4 simulated CPU devices (an XLA flag that
    must be set before JAX starts); a RuntimeError with the stderr tail if it fails."""
    env = {"JAX_PLATFORMS": "cpu"} | dict(os.environ)
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "parallel.json")
        code = "from experiments import bench, runlog\nrunlog.write_json("
        code += f"{out!r}, bench.across_devices({int(batch_size_per_device)}, {int(repeats)}))"
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=cli.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"across_devices failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        return runlog.read_json(out)


# Below this the plain step's compiled temporary memory is not a base for a ratio (XLA:CPU
# runs an MLP step in its output buffers): the table gives the other steps' memory in MB.
TINY_TEMP_BYTES = 4096


def format_table(result: dict[str, Any]) -> str:
    """The time and compiled temp-memory ratios over a plain step, one row per model, batch
    size and variant (``per_example_auto`` and the CNN's ``per_example`` say which path
    ``auto`` ran, and in how many example chunks)."""
    rows = [("model", "batch", "variant", "ms/step", "time/plain", "p10", "memory/plain")]
    sections = {"cnn": result["detail"], "transformer": result["transformer"]}
    for model, sizes in (sections | (result["rows"] or {})).items():
        for bs, d in sizes.items() if isinstance(sizes, dict) else ():
            if not (isinstance(d, dict) and "seconds" in d):
                continue  # the records next to the rows: load, device, model
            temp, chunks = d["temp_bytes"], d["auto_chunks"]
            method = d["auto_method"] + (f" in {chunks} chunks" if chunks > 1 else "")
            tiny = temp["plain"] < TINY_TEMP_BYTES  # a ratio over a few bytes says nothing
            for name, s in d["seconds"].items():
                ratio = d["memory_over_plain"][name]
                mem = f"{temp[name] / 1e6:.1f} MB" if tiny else f"{ratio:.2f}x"
                auto = name.endswith("_auto") or name == "per_example"
                label = name + (f" ({method})" if auto else "")
                if "vmap" in name and d.get("vmap_block_plain_times"):  # timed apart
                    base = 1e3 * float(np.median(d["vmap_block_plain_times"]))
                    label += f" (over its own block's plain step, {base:.1f} ms)"
                ratios = (f"{d[k][name]:.2f}x" for k in ("over_plain", "over_plain_p10"))
                rows.append((model, bs, label, f"{1e3 * s:.1f}", *ratios, mem))
            for name, why in d.get("not_timed", {}).items():
                rows.append((model, bs, name, "-", "-", "-", f"not run: {why}"))
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    lines = ("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def run_bench(config, workdir: str) -> dict[str, Any]:
    """Run the benchmark of ``config`` and write ``workdir/bench.json``; returns its content."""
    rules.check(config, rules.BENCH_TABLE)  # a UserError naming the field and the fix
    t_start = time.perf_counter()
    timing = lambda section: (
        {"seed": config.seed} | {f: section[f] for f in ("repeats", "warmup", "num_microbatches")}
    )
    cnn = config.model.to_dict() | {"batch_sizes": config.batch_sizes}
    cnn |= {f: config[f] for f in ("image_size", "channels", "num_classes")}
    adam = optax.adam(config.learning_rate)
    detail = measure_rows(
        {"cnn": cnn}, VARIANTS, adam, chunk_size=config.chunk_size, **timing(config)
    )["cnn"]
    ref = detail[str(config.reference_batch_size)]
    result = {
        "reference_batch_size": int(config.reference_batch_size),
        **{f"{n}_over_plain": ref["over_plain"][n] for n in VARIANTS[1:]},
        "memory_per_example_over_plain": ref["memory_over_plain"]["per_example"],
        "across_devices_over_plain": None,
        "detail": detail,
        "device": hardware.detect_devices().to_dict() | {"cpu_count": os.cpu_count()},
        "jax_version": jax.__version__,
        "config": config.to_dict(),
        "transformer": None,
        "rows": None,
    }
    if config.parallel:
        try:
            par = run_parallel_bench(config.parallel_batch_size_per_device, config.parallel_repeats)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            logging.error("bench: across_devices not measured: %s", e)
            result["across_devices_error"] = str(e)[-2000:]
        else:
            result["across_devices_over_plain"] = par["across_devices_over_plain"]
            result["across_devices_detail"] = par
    if config.lm.enabled:
        lm, t0 = config.lm, time.perf_counter()
        rows = {"transformer": lm.model.to_dict() | {"batch_sizes": lm.batch_sizes}}
        out = measure_rows(rows, LM_VARIANTS, optax.adamw(3e-4), **timing(lm))
        device = f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cpus"
        result["transformer"] = out.pop("transformer") | {"model": lm.model.to_dict()} | out
        result["transformer"] |= {"device": device, "seconds": time.perf_counter() - t0}
    if config.rows.enabled:
        result["rows"] = measure_rows(
            config.rows.models.to_dict(), LM_VARIANTS, optax.adamw(3e-4), **timing(config.rows)
        )
    result["seconds"] = time.perf_counter() - t_start
    runlog.write_json(os.path.join(workdir, "bench.json"), result)
    return result


def main(_):
    with runlog.workdir_lock(FLAGS.workdir, "bench"):  # a file, or a bench there: said first
        if os.path.exists(path := os.path.join(FLAGS.workdir, "bench.json")):
            logging.warning("bench: measuring again; %s is replaced when this one ends", path)
        result = run_bench(FLAGS.config, FLAGS.workdir)
    summary = {k: v for k, v in result.items() if k.endswith("_over_plain")}
    print(runlog.dumps(summary, indent=2))
    print(format_table(result))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"bench: {result['seconds']:.0f} s, load average {load} (1, 5, 15 min)")


if __name__ == "__main__":
    cli.run(
        main,
        "configs/bench.py",
        rules.describer(lambda config: rules.BENCH_TABLE),
        lambda config: rules.check(config, rules.BENCH_TABLE),
        workdir="bench.json",
    )
