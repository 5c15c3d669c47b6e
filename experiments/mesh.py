"""The data-parallel layout: one 1-D mesh (axis :data:`AXIS`) over every device, on every host.

The steps of :mod:`experiments.train` are ``jax.shard_map`` over the mesh: the global batch
sharded, the train state and the metrics replicated (``docs/data-parallel.md``). Every process
computes the same global batch and :func:`shard` puts on its devices only their rows.
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


def initialize_distributed(enabled: bool, timeout_s: int = 300) -> None:
    """``jax.distributed.initialize()`` once, when ``enabled`` or ``JAX_COORDINATOR_ADDRESS``
    is set, before anything touches a device. The cluster comes from JAX's detection (SLURM,
    Open MPI, Kubernetes, Cloud TPU) or from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; CPU collectives use gloo."""
    if jax.distributed.is_initialized() or not (enabled or os.environ.get(COORDINATOR_ENV)):
        return
    env = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    kwargs = {k: int(os.environ[v]) if os.environ.get(v) else None for k, v in env.items()}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            initialization_timeout=timeout_s,
            **kwargs,
            heartbeat_timeout_seconds=timeout_s,
            shutdown_timeout_seconds=min(timeout_s, 60),  # the processes end together
        )
    except (ValueError, RuntimeError) as e:
        raise UserError(
            f"jax.distributed.initialize failed: {' '.join(str(e).split())[:300]}",
            hint=f"set {COORDINATOR_ENV} (host:port of process 0), JAX_NUM_PROCESSES and "
            "JAX_PROCESS_ID, or run under a cluster JAX detects; --config.distributed=False "
            "for one host",
        ) from None


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over ``jax.devices()``, or over the first ``num_devices`` of them (one
    process only)."""
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
    """The ``mesh`` record of ``summary.json`` and ``sweep.json`` (``hosts``: the processes it
    spans)."""
    devices = list(mesh.devices.flat)
    return {
        "devices": len(devices),
        "kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "hosts": len({d.process_index for d in devices}),
        "shape": {str(k): int(v) for k, v in mesh.shape.items()},
        "axis": AXIS,
    }


def split_reason(
    batch_size: int,
    mesh: Mesh,
    groups: int = 1,
    per_example: bool = False,
    num_train: int | None = None,
) -> str | None:
    """Why the global ``batch_size`` cannot be split evenly over ``mesh``, or into ``groups``
    (``experiments.train.batch_groups``), or (``per_example``) leaves fewer than 2 examples on
    a device, or exceeds the ``num_train`` train examples (``None``: it can): what the sweep
    records for a candidate it skips."""
    if num_train is not None and batch_size > num_train:
        return f"skipped: global batch {batch_size} is larger than the {num_train} train examples"
    if batch_size % groups:
        return (
            f"skipped: global batch {batch_size} does not split into the {groups} microbatches "
            "of the estimator and ghost BatchNorm (config.gns_microbatches)"
        )
    if batch_size < mesh.size or batch_size % mesh.size:
        why = "smaller than" if batch_size < mesh.size else "not divisible by"
        return f"skipped: global batch {batch_size} is {why} the {mesh.size} devices"
    if per_example and batch_size < 2 * mesh.size:
        return f"skipped: per_example needs 2 examples on each of the {mesh.size} devices"
    return None


def check_batch(
    batch_size: int, mesh: Mesh, field: str = "batch_size", per_example: bool = False
) -> None:
    """A :class:`UserError` when the global ``batch_size`` does not split evenly over ``mesh``,
    or (``per_example``) leaves fewer than 2 examples per device."""
    n = mesh.size
    if problem := rules.batch_problem(batch_size, n, field):
        raise UserError(*problem)
    if per_example and batch_size < 2 * n:
        raise UserError(
            f"config.{field}={batch_size} leaves fewer than 2 examples on each of the {n} "
            "devices, which gns_method='per_example' needs",
            hint=f"use a batch of at least {2 * n}, or another gns_method",
        )


def _global(x, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from the full value ``x`` on every process."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` (host values, single-device or replicated arrays) replicated over ``mesh`` as
    fresh buffers: safe to donate, even where an initializer shared one array between leaves."""
    return jax.tree.map(lambda x: _global(x, NamedSharding(mesh, P())), jax.device_get(tree))


def shard(batch: PyTree, mesh: Mesh) -> PyTree:
    """The global ``batch`` (the same on every process) split over the mesh axis: device ``i``
    holds rows ``i·b .. (i+1)·b``."""
    return jax.tree.map(lambda x: _global(x, NamedSharding(mesh, P(AXIS))), batch)


def placed_batches(batches: Iterator[PyTree], mesh: Mesh) -> Iterator[PyTree]:
    """Host ``batches`` put on the mesh one by one (asynchronously: the transfer overlaps the
    previous step); closing it closes ``batches``."""
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
    """The endless batches of :func:`experiments.data.train_batch` (of steps from
    ``start_step``, or with ``start_example`` of the example stream), gathered, cropped, flipped
    and normalized on the devices, sharded over :data:`AXIS`: the uint8 train set is put on
    every device once (CIFAR-10: 150 MB), each step sends only indices and augmentation draws."""
    num_train = len(ds.train_labels)
    images, labels = replicate((ds.train_images, ds.train_labels), mesh)
    std = np.asarray(ds.std, np.float32)
    scale = np.float32(1.0 / 255.0) / std  # as data.normalize computes it
    shift = np.asarray(ds.mean, np.float32) / std
    pad = data.CROP_PADDING

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

    def batches():  # the indices, crop offsets and flips of the host pipeline's batches
        for k in itertools.count():
            if start_example is None:
                where = {"step": start_step + k}
            else:
                where = {"start_example": start_example + k * batch_size}
            idx, offsets, flips = data.train_draws(seed, batch_size, num_train, **where)
            yield gather(images, labels, *replicate((idx, offsets.astype(np.int32), flips), mesh))

    return batches()
