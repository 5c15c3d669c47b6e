r"""``make bench``: the cost of the noise-scale estimators over a plain train step.

In one process, each row a model at a batch size: a plain jit'd train step and the same step
taking its gradient from each estimator, compiled, warmed up, timed in turn
(:func:`experiments.bench_lm.time_steps`: :func:`gns.hardware.interleaved_times`, ``repeats``
rounds, median), with the compiled temporary memory. ``detail``: the reference SmallCNN with
Adam; ``per_example`` is ``method="auto"``, ``microbatch_rolled`` the microbatch loop rolled
(XLA:CPU runs convolutions in a rolled loop slowly, so the default unrolls it), ``naive_vmap``
``method="vmap"``. ``transformer`` (``config.lm``, the ``configs/lm.py:cpu`` model) and
``rows`` (``config.rows``: an lm1b-style Transformer, an NNX and a plain-JAX MLP): AdamW,
:data:`experiments.bench_lm.LM_VARIANTS`. ``across_devices`` comes from
``experiments/parallel_bench.py`` in a subprocess (4 simulated devices need an XLA flag set
before JAX starts).

Writes ``WORKDIR/bench.json`` (atomically, strict JSON: :func:`experiments.runlog.write_json`)::

    {"per_example_over_plain": ..., "microbatch_over_plain": ..., "naive_vmap_over_plain": ...,
     "microbatch_rolled_over_plain": ...,
     "memory_per_example_over_plain": ..., "across_devices_over_plain": ...,
     "reference_batch_size": 128, "device": {...}, "jax_version": ...,
     "detail": {"128": {"seconds": {...}, "over_plain": {...}, "temp_bytes": {...},
                        "memory_over_plain": {...}, "auto_method": "ghost", ...}, "512": {...}},
     "transformer": {"32": {"over_plain": {...}, "memory_over_plain": {...},
                            "auto_method": "ghost", "auto_chunks": 1, ...}, "128": {...},
                     "model": {...}},
     "rows": {"lm1b": {"32": {...}}, "nnx_mlp": {"128": {...}}, "plain_mlp": {...}},
     "seconds": ...}

and prints the ratios as a table (:func:`format_table`).

Usage::

    python -m experiments.bench --config configs/bench.py --workdir runs/bench
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import bench_lm, cli, models, rules, runlog
from gns import estimate, hardware

VARIANTS = ("plain", "per_example", "microbatch", "microbatch_rolled", "naive_vmap")

FLAGS = flags.FLAGS


def bench_batch_size(config, batch_size: int) -> dict[str, Any]:
    """Timings and compiled temp memory of the steps of :data:`VARIANTS` at one batch size
    (:func:`experiments.bench_lm.time_steps`, Adam), and what ``per_example`` ran
    (:func:`experiments.bench_lm.auto_choice`)."""
    model = models.get_model(config.model, num_classes=config.num_classes)
    rng = np.random.default_rng(config.seed)
    shape = (batch_size, config.image_size, config.image_size, config.channels)
    images = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, config.num_classes, batch_size), dtype=jnp.int32)
    params = model.init(jax.random.key(config.seed), images[:1])["params"]

    def loss_fn(params, batch):
        return bench_lm.cross_entropy(model.apply({"params": params}, batch[0]), batch[1])

    chunk, k = config.chunk_size, config.num_microbatches
    estimators = {
        "per_example": lambda p, b: estimate.per_example(loss_fn, p, b, chunk_size=chunk),
        "microbatch": lambda p, b: estimate.microbatch(loss_fn, p, b, num_microbatches=k),
        "microbatch_rolled": lambda p, b: estimate.microbatch(
            loss_fn, p, b, num_microbatches=k, unroll=1
        ),
        "naive_vmap": lambda p, b: estimate.per_example(
            loss_fn, p, b, chunk_size=chunk, method="vmap"
        ),
    }
    choice = bench_lm.auto_choice(loss_fn, params, (images, labels), chunk)
    out = bench_lm.time_steps(
        loss_fn, optax.adam(config.learning_rate), params, (images, labels), estimators,
        repeats=config.repeats, warmup=config.warmup,
    )  # fmt: skip
    return {"batch_size": batch_size, "repeats": config.repeats, **out, **choice}


# ---------------------------------------------------------------------------------------------
# across_devices, in a subprocess with 4 simulated devices.

_PARALLEL_SNIPPET = (
    "import sys\n"
    "from experiments import parallel_bench, runlog\n"
    "runlog.write_json(sys.argv[1], parallel_bench.run(int(sys.argv[2]), int(sys.argv[3])))\n"
)


def run_parallel_bench(batch_size_per_device: int, repeats: int, timeout_s: float = 1200) -> dict:
    """``experiments.parallel_bench.run(batch_size_per_device, repeats)`` in a fresh process.

    Raises:
      RuntimeError: the module is missing or the subprocess failed (with its stderr tail).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "experiments", "parallel_bench.py")):
        raise RuntimeError(
            "experiments/parallel_bench.py is missing: it measures across_devices_over_plain "
            "with 4 simulated devices. Add it, or run with --config.parallel=False."
        )
    env = dict(os.environ)
    flag = "--xla_force_host_platform_device_count=4"
    if flag not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "parallel.json")
        cmd = [sys.executable, "-c", _PARALLEL_SNIPPET, out]
        cmd += [str(batch_size_per_device), str(repeats)]
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"experiments.parallel_bench failed (exit {proc.returncode}):\n"
                + proc.stderr[-3000:]
            )
        return runlog.read_json(out)


# ---------------------------------------------------------------------------------------------
# Main.


def bench_transformer_and_rows(config) -> tuple[dict | None, dict | None]:
    """The Transformer rows (:func:`experiments.bench_lm.measure` with ``config.lm``) and the
    other models' rows (:func:`experiments.bench_lm.measure_rows` with ``config.rows``), each
    ``None`` when not enabled."""
    transformer = rows = None
    if config.lm.enabled:
        lm, m = config.lm, config.lm.model
        logging.info("bench: Transformer (lm cpu model) at batch sizes %s", lm.batch_sizes)
        model = {f: m[f] for f in ("vocab_size", "context", "width", "depth", "num_heads",
                                   "mlp_ratio")}  # fmt: skip
        transformer = bench_lm.measure(
            tuple(int(b) for b in lm.batch_sizes), model, repeats=lm.repeats, warmup=lm.warmup,
            num_microbatches=lm.num_microbatches,
        )  # fmt: skip
    if config.rows.enabled:
        logging.info("bench: rows %s", list(config.rows.models))
        rows = bench_lm.measure_rows(
            config.rows.models.to_dict(), repeats=config.rows.repeats,
            warmup=config.rows.warmup, num_microbatches=config.rows.num_microbatches,
        )  # fmt: skip
    return transformer, rows


# Below this the plain step's compiled temporary memory is not a base for a ratio (XLA:CPU
# runs an MLP step in its output buffers): the table gives the other steps' memory in MB.
TINY_TEMP_BYTES = 4096


def format_table(result: dict[str, Any]) -> str:
    """The time and compiled temp-memory ratios over a plain step, one row per model, batch
    size and variant (``per_example_auto`` and the CNN's ``per_example`` say which path
    ``auto`` ran, and in how many example chunks)."""
    rows = [("model", "batch", "variant", "ms/step", "time/plain", "memory/plain")]

    def add(model, bs, d):
        temp = d.get("temp_bytes", {})
        for name, s in d["seconds"].items():
            mem = d["memory_over_plain"].get(name)
            mem = "-" if mem is None else f"{mem:.2f}x"
            if temp.get("plain", TINY_TEMP_BYTES) < TINY_TEMP_BYTES and name in temp:
                mem = f"{temp[name] / 1e6:.1f} MB"  # a ratio over a few bytes says nothing
            chunks = d.get("auto_chunks", 1)
            method = d.get("auto_method", "") + (f" in {chunks} chunks" if chunks > 1 else "")
            auto = name.endswith("_auto") or name == "per_example"
            label = name + (f" ({method})" if auto and method else "")
            rows.append((model, bs, label, f"{1e3 * s:.1f}", f"{d['over_plain'][name]:.2f}x", mem))

    for bs, d in result["detail"].items():
        add("cnn", bs, d)
    for bs, d in (result.get("transformer") or {}).items():
        if isinstance(d, dict) and "seconds" in d:
            add("transformer", bs, d)
    for name, sizes in (result.get("rows") or {}).items():
        for bs, d in sizes.items() if isinstance(sizes, dict) else ():
            add(name, bs, d)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def run_bench(config, workdir: str) -> dict[str, Any]:
    """Run the benchmark of ``config`` and write ``workdir/bench.json``; returns its content."""
    rules.check(config, "bench")  # a UserError naming the field and the fix
    t_start = time.perf_counter()
    detail = {}
    for bs in config.batch_sizes:
        logging.info("bench: batch size %d", bs)
        detail[str(bs)] = bench_batch_size(config, int(bs))
        logging.info("bench: %s", runlog.dumps(detail[str(bs)]["over_plain"]))
    ref = detail[str(config.reference_batch_size)]
    result = {
        "reference_batch_size": int(config.reference_batch_size),
        "per_example_over_plain": ref["over_plain"]["per_example"],
        "microbatch_over_plain": ref["over_plain"]["microbatch"],
        "microbatch_rolled_over_plain": ref["over_plain"]["microbatch_rolled"],
        "naive_vmap_over_plain": ref["over_plain"]["naive_vmap"],
        "memory_per_example_over_plain": ref["memory_over_plain"]["per_example"],
        "across_devices_over_plain": None,
        "detail": detail,
        "device": hardware.detect_devices().to_dict() | {"cpu_count": os.cpu_count()},
        "jax_version": jax.__version__,
        "config": config.to_dict(),
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
    result["transformer"], result["rows"] = bench_transformer_and_rows(config)
    result["seconds"] = time.perf_counter() - t_start
    runlog.write_json(os.path.join(workdir, "bench.json"), result)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(runlog.QuietLibraries())
    result = run_bench(FLAGS.config, FLAGS.workdir)
    summary = {k: v for k, v in result.items() if k.endswith("_over_plain")}
    print(runlog.dumps(summary, indent=2))
    print(format_table(result))
    print(f"bench: {result['seconds']:.0f} s, load average {os.getloadavg()}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Directory for bench.json.", required=True)
    config_flags.DEFINE_config_file("config", None, "configs/bench.py[:variant]", lock_config=True)
    flags.mark_flag_as_required("config")
    cli.run(main, "configs/bench.py", rules.describer("bench"))
