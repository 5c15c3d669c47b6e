"""The data-parallel layout of the experiments: one mesh over every device, on every host.

:mod:`experiments.train` runs every step under ``jax.jit`` of ``jax.shard_map`` over a 1-D
:class:`jax.sharding.Mesh` with the axis :data:`AXIS`: the global batch is sharded over it,
the train state (parameters, optimizer state, noise-scale tracker) is replicated, and the
step's metrics come back replicated. One device is a mesh of one, so there is one code path;
the choice of ``shard_map`` over ``jit`` with ``NamedSharding`` is explained in
``docs/data-parallel.md``.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize`` (with
``config.distributed`` or ``JAX_COORDINATOR_ADDRESS`` set), the mesh spans ``jax.devices()``
(all hosts), and every process computes the same **global** batch (the data pipeline is a pure
function of seed and step) of which :func:`shard` puts on its devices only the rows they hold.
Process 0 writes the files; checkpoints are orbax's multi-process ones.

Example::

    mesh = make_mesh()                     # all devices
    per_device = check_batch(256, mesh)    # UserError unless divisible
    state = replicate(state, mesh)
    batch = shard(host_batch, mesh)        # the same global batch on every process

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018),
appendix A (the noise scale from the per-device gradients of data-parallel training).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import data, rules
from experiments.cli import UserError

PyTree = Any
AXIS = "batch"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"

__all__ = [
    "AXIS",
    "initialize_distributed",
    "make_mesh",
    "describe",
    "check_batch",
    "split_reason",
    "replicate",
    "shard",
    "placed_batches",
    "device_train_batches",
]


def initialize_distributed(enabled: bool = False, timeout_s: int = 300) -> bool:
    """``jax.distributed.initialize()`` once, when ``enabled`` or ``JAX_COORDINATOR_ADDRESS``
    is set; call it before anything touches a device.

    The coordinator, process count and id come from JAX's cluster detection (SLURM, Open MPI,
    Kubernetes, Cloud TPU) or from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. On CPU the collectives use gloo.

    Returns:
      Whether this process is part of a multi-process run.

    Raises:
      UserError: the initialization failed (coordinator unreachable, missing variables).
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if not (enabled or os.environ.get(COORDINATOR_ENV)):
        return False
    env = {k: os.environ.get(k) for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    kwargs = {
        "num_processes": int(env["JAX_NUM_PROCESSES"]) if env["JAX_NUM_PROCESSES"] else None,
        "process_id": int(env["JAX_PROCESS_ID"]) if env["JAX_PROCESS_ID"] else None,
    }
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=timeout_s,
            shutdown_timeout_seconds=timeout_s,
            **kwargs,
        )
    except (ValueError, RuntimeError) as e:
        raise UserError(
            f"jax.distributed.initialize failed: {' '.join(str(e).split())[:300]}",
            hint=f"set {COORDINATOR_ENV} (host:port of process 0), JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID, or run under a cluster JAX detects; --config.distributed=False "
            "for one host",
        ) from None
    return jax.process_count() > 1


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh (axis :data:`AXIS`) over ``jax.devices()``, or over the first
    ``num_devices`` of them (one process only).

    Raises:
      UserError: ``num_devices`` is not in ``[1, jax.device_count()]``, or is set on a
        multi-process run (which always uses every device).
    """
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices) or jax.process_count() > 1:
            raise UserError(
                f"config.num_devices={num_devices} is not available: this run sees "
                f"{len(devices)} devices on {jax.process_count()} process(es)",
                hint=f"use 1..{len(devices)} on one process, or None (all devices)",
            )
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (AXIS,))


def describe(mesh: Mesh) -> dict:
    """The record of the mesh that ``summary.json`` (:mod:`experiments.train`) and
    ``sweep.json`` (:mod:`experiments.sweep`) keep: ``devices``, ``kind`` (e.g. ``'cpu'``,
    ``'NVIDIA H100 80GB HBM3'``), ``platform``, ``hosts`` (processes whose devices it spans),
    ``shape`` (``{axis name: size}``) and ``axis``.

    Example:
      >>> describe(make_mesh(1))["shape"]
      {'batch': 1}
    """
    devices = list(mesh.devices.flat)
    return {
        "devices": len(devices),
        "kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "hosts": len({d.process_index for d in devices}),
        "shape": {str(k): int(v) for k, v in mesh.shape.items()},
        "axis": AXIS,
    }


def split_reason(batch_size: int, mesh: Mesh) -> str | None:
    """Why the global ``batch_size`` cannot be split evenly over ``mesh`` (``None``: it can):
    what the sweep records for a candidate it skips.

    Example:
      >>> split_reason(6, make_mesh(1)) is None
      True
    """
    n = mesh.size
    if batch_size < n:
        return f"skipped: global batch {batch_size} is smaller than the {n} devices"
    if batch_size % n:
        return f"skipped: global batch {batch_size} is not divisible by the {n} devices"
    return None


def check_batch(
    batch_size: int, mesh: Mesh, field: str = "batch_size", per_example: bool = False
) -> int:
    """The per-device batch of a global ``batch_size`` on ``mesh``.

    Raises:
      UserError: naming both numbers, when the global batch is smaller than the device count
        or not divisible by it, or (``per_example``: the estimator compares the examples of
        each device) leaves fewer than 2 examples per device.
    """
    n = mesh.size
    problem = rules.batch_problem(batch_size, n, field)
    if problem:
        raise UserError(*problem)
    if per_example and batch_size < 2 * n:
        raise UserError(
            f"config.{field}={batch_size} leaves fewer than 2 examples on each of the {n} "
            "devices, which gns_method='per_example' needs",
            hint=f"use a batch of at least {2 * n}, or another gns_method",
        )
    return batch_size // n


def _global(x, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from the full value ``x``, present on every process
    (each device receives only its slice)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` replicated over ``mesh``, as fresh buffers (safe to donate; also for arrays
    that an initializer shared between leaves). Works from host values, single-device
    arrays and global replicated arrays alike."""
    sharding = NamedSharding(mesh, P())
    host = jax.device_get(tree)
    return jax.tree.map(lambda x: _global(x, sharding), host)


def shard(batch: PyTree, mesh: Mesh) -> PyTree:
    """The global ``batch`` (leading axis = global batch size, the same on every process)
    split over the mesh axis: device ``i`` holds rows ``i·b .. (i+1)·b``."""
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(lambda x: _global(x, sharding), batch)


def placed_batches(batches: Iterator[PyTree], mesh: Mesh) -> Iterator[PyTree]:
    """``batches`` (host, prefetched) put on the mesh one by one; the transfer is
    asynchronous, so it overlaps the previous step. Closing it closes ``batches``."""
    try:
        for batch in batches:
            yield shard(batch, mesh)
    finally:
        batches.close()


def device_train_batches(
    ds,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    augment: bool = True,
    mesh: Mesh,
    start_example: int | None = None,
) -> Iterator[dict]:
    """The batches of :func:`experiments.data.train_batches`, gathered on the devices
    (the step stream, or with ``start_example`` the example stream of a changing batch size).

    The decoded uint8 train images and labels are put on every device of ``mesh`` once
    (CIFAR-10: 150 MB); each step sends only the example indices and augmentation parameters
    (:func:`experiments.data.train_indices`, :func:`experiments.data.augment_params`, so the
    batches are those of the host pipeline) and one compiled function gathers, crops, flips
    and normalizes the batch on the devices, sharded over the mesh axis. Nothing waits for the
    host between steps: the GPU stays busy.

    Returns:
      An endless iterator of ``{'image': float32 [B, H, W, C], 'label': int32 [B]}`` global
      arrays sharded over :data:`AXIS`.
    """
    num_train = len(ds.train_labels)
    if not 1 <= batch_size <= num_train:
        raise ValueError(
            f"batch_size={batch_size} must be in [1, {num_train}] (the number of train examples)."
        )
    images, labels = replicate((ds.train_images, ds.train_labels), mesh)
    std = np.asarray(ds.std, np.float32)
    scale = np.float32(1.0 / 255.0) / std  # as data.normalize computes it
    shift = np.asarray(ds.mean, np.float32) / std
    pad = data.CROP_PADDING
    replicated = NamedSharding(mesh, P())

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P(AXIS)))
    def gather(images, labels, idx, offsets, flips):
        x = images[idx]
        if augment:
            h, w = x.shape[1:3]
            x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")

            def crop(img, offset, flip):
                out = jax.lax.dynamic_slice(img, (offset[0], offset[1], 0), (h, w, img.shape[-1]))
                return jnp.where(flip, out[:, ::-1], out)

            x = jax.vmap(crop)(x, offsets, flips)
        image = x.astype(jnp.float32) * scale - shift
        return {"image": image, "label": labels[idx].astype(jnp.int32)}

    def draw(k):  # indices, crop offsets and flips of the k-th batch, as the host pipeline's
        if start_example is None:
            step = start_step + k
            idx = data.train_indices(seed, step, batch_size, num_train)
            return (idx, *data.augment_params(seed, step, batch_size))
        start = start_example + k * batch_size
        idx = data.stream_indices(seed, start, batch_size, num_train)
        return (idx, *data.stream_augment_params(seed, start, batch_size, num_train))

    def batches():
        for k in itertools.count():
            idx, offsets, flips = draw(k)
            if not augment:
                offsets, flips = np.zeros((batch_size, 2), np.int32), np.zeros(batch_size, bool)
            args = [_global(a, replicated) for a in (idx, offsets.astype(np.int32), flips)]
            yield gather(images, labels, *args)

    return batches()
