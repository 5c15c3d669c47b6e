"""Overhead of ``gns.estimate.across_devices`` over a plain data-parallel train step.

Two ``jax.pmap`` SmallCNN steps with Adam (:func:`gns.parallel.make_train_step`), identical
but for the gradient, timed interleaved; the median of the paired ratios is reported. Importing
this module simulates 4 CPU devices (``XLA_FLAGS``, ``JAX_PLATFORMS=cpu``) unless set
otherwise. ``experiments/bench.py`` calls :func:`run` in a subprocess. Command::

    python -m experiments.parallel_bench --batch_size_per_device=32 --repeats=20 \\
        --out=/tmp/parallel_bench.json
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=4"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli, runlog  # noqa: E402
from experiments.cli import UserError  # noqa: E402
from experiments.models import SmallCNN  # noqa: E402
from gns import estimate, hardware, parallel  # noqa: E402

WARMUP = 2


def run(batch_size_per_device: int, repeats: int, *, seed: int = 0) -> dict[str, Any]:
    """Median time of the ``across_devices`` step over the plain step, on all local devices.

    Args:
      batch_size_per_device: examples per device (global batch = this × devices).
      repeats: timed rounds (:func:`gns.hardware.interleaved_times`) after ``WARMUP``
        untimed calls of each step (at least 3).
      seed: for the parameters and the random data.

    Returns:
      ``{"across_devices_over_plain": median of per-repeat ratios, "detail": {...}}`` with the
      raw times (ms), their medians, the ratio of medians, devices and sizes.
    """
    if batch_size_per_device < 1 or repeats < 3:
        raise UserError(
            f"need batch_size_per_device >= 1 and repeats >= 3, got {batch_size_per_device} "
            f"and {repeats}."
        )
    n_dev = jax.local_device_count()
    if n_dev < 2:
        raise UserError(
            f"across_devices needs at least 2 devices, found {n_dev} ({jax.default_backend()}): "
            "run with JAX_PLATFORMS=cpu to simulate 4 CPU devices."
        )
    global_batch = batch_size_per_device * n_dev
    model = SmallCNN()
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    params = model.init(kp, jnp.zeros((1, 32, 32, 3)))["params"]
    images = jax.random.normal(kx, (global_batch, 32, 32, 3))
    labels = jax.random.randint(ky, (global_batch,), 0, 10)

    def loss_fn(p, batch):
        x, y = batch
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    optimizer = optax.adam(1e-3)
    batch = parallel.shard_batch((images, labels))
    steps = {
        name: parallel.make_train_step(loss_fn, optimizer, estimator=est, axis_name="batch")
        for name, est in (("plain", None), ("across_devices", estimate.across_devices))
    }
    args = (params, optimizer.init(params), batch)
    times = hardware.interleaved_times(
        {name: (step, args) for name, step in steps.items()}, warmup=WARMUP, rounds=repeats
    )
    # Same start, same batch: the two steps must make the same update.
    new = {name: step(*args)[0] for name, step in steps.items()}
    diff = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), new["plain"], new["across_devices"]
    )
    max_diff = max(jax.tree.leaves(diff))
    paired = [a / p for a, p in zip(times["across_devices"], times["plain"], strict=True)]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "across_devices_over_plain": statistics.median(paired),
        "detail": {
            "ratio_of_medians": med["across_devices"] / med["plain"],
            "median_ms": {name: 1e3 * m for name, m in med.items()},
            "times_ms": {name: [1e3 * t for t in ts] for name, ts in times.items()},
            "max_abs_param_diff": max_diff,
            "batch_size_per_device": batch_size_per_device,
            "global_batch_size": global_batch,
            "num_devices": n_dev,
            "platform": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind,
            "repeats": repeats,
            "warmup": WARMUP,
            "model": "SmallCNN(32, 64, 128), Adam(1e-3), pmap",
            "jax_version": jax.__version__,
        },
    }


_BATCH = flags.DEFINE_integer("batch_size_per_device", 32, "Examples per device.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls of each step after warm-up.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON result (optional).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    result = run(_BATCH.value, _REPEATS.value)
    if _OUT.value:
        runlog.write_json(_OUT.value, result)
    print(runlog.dumps(result))


if __name__ == "__main__":
    app.run(cli.main(main))
