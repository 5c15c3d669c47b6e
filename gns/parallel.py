"""A data-parallel train step that measures the gradient noise scale on the way.

:func:`make_train_step` builds a complete step, under ``jax.pmap`` (``mesh=None``) or under
``jax.jit`` of ``jax.shard_map`` (a :class:`jax.sharding.Mesh`, also across hosts). The update
is taken from the ``grads`` the estimator returns (the mean gradient of the global batch), so
measuring costs one scalar all-reduce per parameter leaf with :func:`gns.estimate.across_devices`
and nothing but the split into microbatches with :func:`gns.estimate.microbatch`.

Which estimator: :func:`gns.estimate.per_example` feeds each example to ``loss_fn`` as a batch of
one. With BatchNorm in training mode that batch of one normalizes over itself, so the
"per-example gradients" are those of a different function and do not even average to the
batch gradient; BatchNorm models use ``microbatch`` or ``across_devices``, where each small
batch (a microbatch, or one device's batch) normalizes over itself, as in data-parallel
training with per-device batch statistics. See ``docs/data-parallel.md`` for the full recipe.

Example::

    step = make_train_step(loss_fn, optax.adam(1e-3), estimator=estimate.across_devices,
                           axis_name="batch")                       # pmap over local devices
    params, opt_state, stats = step(params, opt_state, shard_batch(batch))
    print(stats.to_dict())                                          # g_sq, trace_cov, b_simple

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018),
appendix A.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gns.common import LossFn, axis_names, to_varying
from gns.estimate import NoiseStats

PyTree = Any
Estimator = Callable[..., tuple[NoiseStats, PyTree]]
TrainStep = Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree, NoiseStats | None]]

__all__ = ["make_train_step", "shard_batch"]


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    estimator: Estimator | None,
    axis_name: str | tuple[str, ...],
    mesh: Mesh | None = None,
) -> TrainStep:
    """A data-parallel ``step(params, opt_state, batch) -> (params, opt_state, stats)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over a batch.
      optimizer: an optax gradient transformation.
      estimator: ``estimator(loss_fn, params, local_batch, axis_name=...) -> (stats, grads)``,
        e.g. ``estimate.across_devices`` or
        ``functools.partial(estimate.microbatch, num_microbatches=4)``; ``None`` for a plain
        data-parallel step (all-reduced mean of ``jax.grad``) that returns ``stats=None``.
      axis_name: the data-parallel axis: the ``pmap`` axis, or the mesh axis (or tuple of
        axes) the batch is sharded over.
      mesh: ``None``: ``jax.pmap`` over all local devices; ``batch`` leaves have shape
        ``[local_devices, per_device, ...]`` (see :func:`shard_batch`). A ``Mesh``: ``jax.jit``
        of ``jax.shard_map`` over it; ``batch`` is a global array sharded over ``axis_name``
        (see :func:`shard_batch`), which also works across hosts.

    Returns:
      ``step(params, opt_state, batch)``; ``params``, ``opt_state`` and ``stats`` come back
      replicated (one copy, not stacked per device) and feed the next call as they are.
      ``stats`` are those of the global batch.
    """
    if axis_name is None:
        raise ValueError(
            "make_train_step needs axis_name, the data-parallel axis (e.g. 'batch'); for one "
            "device call the estimator directly."
        )
    if mesh is not None:
        missing = [n for n in axis_names(axis_name) if n not in mesh.axis_names]
        if missing:
            raise ValueError(
                f"axis_name {missing} is not an axis of the mesh (axes {mesh.axis_names}): pass "
                "the mesh axis the batch is sharded over."
            )

    def local_step(params, opt_state, batch):
        if estimator is None:
            # Cast to varying: under shard_map, jax.grad of replicated params would already be
            # summed over devices, and pmean would then return that sum, not the mean.
            local_grads = jax.grad(loss_fn)(to_varying(params, axis_name), batch)
            stats, grads = None, jax.lax.pmean(local_grads, axis_name)
        else:
            out = estimator(loss_fn, params, batch, axis_name=axis_name)
            if len(out) != 2:  # e.g. an estimator bound with has_aux=True
                raise ValueError(
                    "make_train_step takes a loss without aux: its estimator must return "
                    f"(stats, grads), got {len(out)} values; drop has_aux (return the loss only)."
                )
            stats, grads = out
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats

    if mesh is None:
        step = jax.pmap(local_step, axis_name=axis_name, in_axes=(None, None, 0), out_axes=None)
        replicated = NamedSharding(Mesh(np.array(jax.local_devices()), (axis_name,)), P())
    else:
        batch_spec = P(axis_name if isinstance(axis_name, str) else tuple(axis_name))
        replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, batch_spec)
        step = jax.jit(
            jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), batch_spec), out_specs=P()),
            in_shardings=(replicated, replicated, data),
            out_shardings=replicated,
        )

    def train_step(params, opt_state, batch):
        # Place params and state as the step returns them (a no-op from the second call on):
        # one compilation, whether they come from the host or from the previous step.
        params, opt_state = jax.device_put((params, opt_state), replicated)
        return step(params, opt_state, batch)

    return train_step


def shard_batch(
    batch: PyTree, *, mesh: Mesh | None = None, axis_name: str | tuple[str, ...] | None = None
) -> PyTree:
    """Lay out this process's batch for the step of :func:`make_train_step`.

    Args:
      batch: pytree of arrays with a leading batch axis: this process's examples (the whole
        batch on a single host).
      mesh: ``None`` for ``pmap``: reshape to ``[local_devices, per_device, ...]``. A ``Mesh``:
        a global array sharded over ``axis_name`` (all mesh axes by default), assembled from
        every process's local batch with ``jax.make_array_from_process_local_data``.
      axis_name: the mesh axis (or axes) to shard the batch over.

    Returns:
      The batch, laid out for the step.
    """
    if mesh is None:
        n = jax.local_device_count()

        def split(x):
            if x.shape[0] % n:
                raise ValueError(
                    f"batch size {x.shape[0]} is not divisible by the {n} local devices: pick a "
                    "batch size that is a multiple of jax.local_device_count()."
                )
            return x.reshape((n, x.shape[0] // n) + x.shape[1:])

        return jax.tree.map(split, batch)
    names = mesh.axis_names if axis_name is None else axis_names(axis_name)
    sharding = NamedSharding(mesh, P(names[0] if len(names) == 1 else tuple(names)))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
