"""One process of the 2-process job started by ``tests/test_multihost.py``.

Every process builds the same problem (a small MLP and a batch of ``GLOBAL_BATCH`` examples,
from a fixed seed) but hands JAX only **its own** contiguous slice of the batch; the global
batch array is assembled with ``jax.make_array_from_process_local_data`` over a mesh of all
processes' devices. The estimators then run under ``jax.shard_map`` over that global mesh, and
the process prints the global statistics as one JSON line prefixed with ``RESULT_PREFIX``.

Run by hand (two shells)::

    python tests/multihost_worker.py --port 12345 --process_id 0 --num_processes 2
    python tests/multihost_worker.py --port 12345 --process_id 1 --num_processes 2

The problem (``make_problem``, ``loss_fn``, ``ESTIMATORS``, ``result_to_json``) is importable
without side effects, so the test computes the single-process reference with the same code.

With ``--train_workdir DIR`` the process first trains :func:`smoke_config` with
``experiments.train.train_and_evaluate`` and ``config.distributed=True`` (the coordinator,
process count and id passed as ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, as a launcher would: the run initializes ``jax.distributed`` itself), then
computes the estimators on the same runtime, and prints the summary and metrics rows too (one
start-up of the job for both checks).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import numpy as np

RESULT_PREFIX = "GNS_RESULT "
GLOBAL_BATCH = 32
AXIS = "batch"
TRAIN_STEPS = 2
TRAIN_LR = 1e-2


def smoke_config():
    """The smoke config, tiny and on synthetic data (the multi-host training run): a one-layer
    MLP on 8x8 images, quick to compile in each process."""
    from configs import cifar10

    c = cifar10.get_config("smoke")
    c.data.source = "synthetic"
    c.data.synthetic.image_size = 8
    c.model.update(name="mlp", widths=(16,))
    c.data.num_train, c.data.num_test = 256, 128
    c.num_steps, c.gns_every, c.log_every, c.eval_every, c.checkpoint_every = 6, 2, 1, 3, 3
    c.progress_bar = c.plots = False
    return c


def train_smoke(workdir: str) -> dict:
    """Train :func:`smoke_config` on every device of the job; summary and rows as JSON."""
    from experiments import runlog, train

    config = smoke_config()
    config.distributed = True
    summary = train.train_and_evaluate(config, workdir)
    rows = runlog.read_jsonl(f"{workdir}/{runlog.METRICS_FILE}")
    return {"summary": summary, "rows": rows}


def make_problem() -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Parameters of a 2-layer MLP and a classification batch, as NumPy arrays (seed 0)."""
    rng = np.random.default_rng(0)
    params = {
        "hidden": {
            "kernel": rng.normal(0.0, 0.5, (5, 8)).astype(np.float32),
            "bias": rng.normal(0.0, 0.1, (8,)).astype(np.float32),
        },
        "out": {
            "kernel": rng.normal(0.0, 0.5, (8, 3)).astype(np.float32),
            "bias": np.zeros((3,), np.float32),
        },
    }
    x = rng.normal(size=(GLOBAL_BATCH, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=(GLOBAL_BATCH,)).astype(np.int32)
    return params, (x, y)


def loss_fn(params, batch):
    """Mean softmax cross-entropy of the MLP over the batch."""
    import jax
    import jax.numpy as jnp

    x, y = batch
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def estimators(num_devices: int) -> dict:
    """name -> (estimator under the data-parallel axis, same estimator on one device; for
    ``per_example`` the per-example gradients by ``jax.vmap``, its definition: no timed choice
    of a path for the reference)."""
    from gns import estimate

    per_dev = 2  # microbatches per device
    return {
        "per_example": (
            functools.partial(estimate.per_example, chunk_size=3, axis_name=AXIS),
            functools.partial(estimate.per_example, method="vmap"),
        ),
        "microbatch": (
            functools.partial(estimate.microbatch, num_microbatches=per_dev, axis_name=AXIS),
            functools.partial(estimate.microbatch, num_microbatches=per_dev * num_devices),
        ),
        "across_devices": (
            functools.partial(estimate.across_devices, axis_name=AXIS),
            functools.partial(estimate.microbatch, num_microbatches=num_devices),
        ),
    }


def result_to_json(stats, grads) -> dict:
    """Statistics (with per-layer) and mean gradient as plain Python numbers."""
    import jax

    def host(x):  # the outputs are replicated: any addressable copy is the value
        return np.asarray(x.addressable_data(0)) if hasattr(x, "addressable_data") else x

    return {
        "g_sq": float(host(stats.g_sq)),
        "trace_cov": float(host(stats.trace_cov)),
        "small_batch_size": stats.small_batch_size,
        "big_batch_size": stats.big_batch_size,
        "per_layer": {
            k: [float(host(s.g_sq)), float(host(s.trace_cov))] for k, s in stats.per_layer.items()
        },
        "grads": jax.tree.map(lambda g: np.asarray(host(g)).ravel().tolist(), grads),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--local_devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("--timeout_s", type=int, default=60, help="init/heartbeat timeout")
    parser.add_argument("--train_workdir", default=None, help="train the smoke config there")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    trained = {}
    if args.train_workdir:
        import os

        os.environ.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}",
            JAX_NUM_PROCESSES=str(args.num_processes),
            JAX_PROCESS_ID=str(args.process_id),
        )
        trained = train_smoke(args.train_workdir)
    else:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=args.timeout_s,
            heartbeat_timeout_seconds=args.timeout_s,
            shutdown_timeout_seconds=args.timeout_s,
        )
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n_dev = jax.device_count()
    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.local_device_count() == args.local_devices, jax.local_device_count()
    mesh = jax.make_mesh((n_dev,), (AXIS,))

    params_np, (x, y) = make_problem()
    per_proc = GLOBAL_BATCH // args.num_processes
    mine = slice(args.process_id * per_proc, (args.process_id + 1) * per_proc)
    data_sharding = NamedSharding(mesh, P(AXIS))
    batch = tuple(jax.make_array_from_process_local_data(data_sharding, a[mine]) for a in (x, y))
    params = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(NamedSharding(mesh, P()), a), params_np
    )

    out = {"process_id": jax.process_index(), "num_devices": n_dev, **trained}
    distributed = {name: est for name, (est, _) in estimators(n_dev).items()}
    fn = jax.jit(  # every estimator in one program
        jax.shard_map(
            lambda p, b: {name: est(loss_fn, p, b) for name, est in distributed.items()},
            mesh=mesh,
            in_specs=(P(), P(AXIS)),
            out_specs=P(),
        )
    )
    out |= {name: result_to_json(*res) for name, res in fn(params, batch).items()}

    # The train step of gns.parallel, fed with this process's examples only.
    import optax

    from gns import estimate, parallel

    optimizer = optax.adam(TRAIN_LR)
    step = parallel.make_train_step(
        loss_fn, optimizer, estimator=estimate.across_devices, axis_name=AXIS, mesh=mesh
    )
    p, opt_state = params_np, optimizer.init(params_np)
    for _ in range(TRAIN_STEPS):
        p, opt_state, stats = step(
            p, opt_state, parallel.shard_batch((x[mine], y[mine]), mesh=mesh)
        )
    out["train"] = result_to_json(stats, p)
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
