"""Unbiased estimators of the gradient noise scale.

Every estimator here measures the squared norm of the mean gradient at two batch sizes, a small
``b`` and a big ``B``, and turns the pair into unbiased estimates of ``|G|²`` and ``tr(Σ)``
(McCandlish et al. 2018, appendix A)::

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

The estimators differ only in where the two norms come from:

==================  =========================================  ==================================
estimator           small batch                                big batch
==================  =========================================  ==================================
``per_example``     each example (``b = 1``), ``jax.vmap``      the whole (global) batch
``microbatch``      each of ``k`` microbatches (``b = B/k``)    the whole (global) batch
``across_devices``  each device's local batch                  the all-reduced (global) batch
==================  =========================================  ==================================

Each returns ``(stats, grads)``: ``stats`` a :class:`NoiseStats` and ``grads`` the mean gradient
of the whole (global) batch, computed in the same pass, so a train step takes its update from it
and pays for one backward pass, not two.

``loss_fn(params, batch) -> scalar`` is the ordinary training loss: the **mean** over the
examples of the batch. ``per_example`` calls it on batches of one example; that is only the
per-example loss when examples do not interact, so models with BatchNorm must use
``microbatch`` or ``across_devices`` (each small batch then normalizes over itself, as in
training).

One estimate is unbiased but noisy, and can be negative: never average ``b_simple`` over steps.
Average ``g_sq`` and ``trace_cov`` separately (see :mod:`gns.smoothing`) and divide at the end.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gns import common, ghost
from gns.common import LossFn, PyTree, batch_size

# `batch_size` is part of this module's API.

__all__ = [
    "NoiseStats",
    "from_two_batches",
    "per_example",
    "microbatch",
    "across_devices",
    "hessian_aware",
]


@dataclasses.dataclass(frozen=True)
class NoiseStats:
    """Unbiased gradient statistics from one batch.

    Attributes:
      g_sq: unbiased estimate of ``|G|²``, the squared norm of the true gradient. Can be
        negative when the gradient is small against the noise.
      trace_cov: unbiased estimate of ``tr(Σ)``, the trace of the per-example gradient
        covariance (sum of per-parameter variances).
      small_batch_size: the small batch size ``b`` of the estimate (1 for ``per_example``).
      big_batch_size: the big batch size ``B`` (the global batch).
      per_layer: the same statistics for each parameter leaf, keyed by its path
        (e.g. ``"params/Conv_0/kernel"``); their ``g_sq`` and ``trace_cov`` sum exactly to the
        totals. Empty when built by :func:`from_two_batches` from scalars.

    ``g_sq`` and ``trace_cov`` are arrays (traced inside ``jit``); the batch sizes are static
    Python numbers. ``NoiseStats`` is a pytree, so it can be returned from ``jit``/``pmap`` and
    averaged with ``jax.tree.map``.
    """

    g_sq: jax.Array
    trace_cov: jax.Array
    small_batch_size: float
    big_batch_size: float
    per_layer: dict[str, NoiseStats] = dataclasses.field(default_factory=dict)

    @property
    def b_simple(self) -> jax.Array:
        """``B_simple = tr(Σ)/|G|²``.

        ``+inf`` when the ``g_sq`` estimate is not positive (the gradient is not resolved above
        the noise at this batch size: the noise scale is larger than anything this estimate can
        tell apart), ``nan`` when either statistic is ``nan``. A negative value means the
        ``trace_cov`` estimate came out negative: pool more batches.
        """
        return simple_noise_scale(self.g_sq, self.trace_cov)

    def to_dict(self) -> dict:
        """The statistics as plain Python floats (lists of them for the per-layer arrays of
        :func:`from_two_batches`), for logging (not jit-able)."""
        plain = lambda x: np.asarray(x, np.float64).tolist()
        keys = ("g_sq", "trace_cov", "b_simple", "small_batch_size", "big_batch_size")
        return {k: plain(getattr(self, k)) for k in keys}


jax.tree_util.register_dataclass(
    NoiseStats,
    data_fields=["g_sq", "trace_cov", "per_layer"],
    meta_fields=["small_batch_size", "big_batch_size"],
)


def simple_noise_scale(g_sq: jax.Array, trace_cov: jax.Array) -> jax.Array:
    """``trace_cov / g_sq``, with ``+inf`` for ``g_sq <= 0`` and ``nan`` propagated
    (:func:`gns.common.noise_scale_ratio`): a JAX array for JAX inputs, NumPy (in the inputs'
    precision, e.g. float64) for host numbers."""
    return common.noise_scale_ratio(trace_cov, g_sq)


def from_two_batches(
    small_sq_norm: jax.Array, big_sq_norm: jax.Array, small_size: float, big_size: float
) -> NoiseStats:
    """Unbiased ``|G|²`` and ``tr(Σ)`` from squared gradient norms at two batch sizes.

    Args:
      small_sq_norm: ``E|G_b|²`` estimate: the squared norm of a mean gradient over ``small_size``
        examples (or the mean of several such squared norms).
      big_sq_norm: ``|G_B|²``: the squared norm of a mean gradient over ``big_size`` examples.
      small_size: ``b``, the small batch size.
      big_size: ``B``, the big batch size; must be larger than ``b``.

    Returns:
      A :class:`NoiseStats` with no per-layer breakdown. The formulas are linear, so passing
      arrays of per-layer norms gives per-layer statistics elementwise. The arithmetic is in a
      scaled form (divided by the larger norm first), so nothing overflows before the result
      does. JAX arrays (also traced, inside ``jit``) give JAX arrays in their dtype (float32:
      results below its normal range, ~1.2e-38, flush to 0); host numbers (Python floats,
      NumPy) give NumPy float64, and a finite input whose result is not finite (beyond
      float64) raises.

    Raises:
      ValueError: sizes that are not finite numbers with ``0 < small_size < big_size``, norms
        of two shapes, negative host norms (a squared norm cannot be; JAX arrays are not read,
        so :func:`hessian_aware`'s quadratic forms may be), or finite host norms whose
        statistics overflow float64.

    Example:
      >>> s = from_two_batches(small_sq_norm=3.0, big_sq_norm=1.5, small_size=1, big_size=4)
      >>> float(s.g_sq), float(s.trace_cov), float(s.b_simple)
      (1.0, 2.0, 2.0)

    Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018),
    appendix A.
    """
    if any(isinstance(x, bool | str) for x in (small_size, big_size)):
        raise ValueError(
            f"small_size and big_size must be numbers, got {small_size!r} and {big_size!r}."
        )
    b, big = float(small_size), float(big_size)
    if not (0 < b < big < np.inf):
        raise ValueError(
            f"from_two_batches needs finite 0 < small_size < big_size, got small_size="
            f"{small_size}, big_size={big_size}: measure the two squared norms at two different "
            "(finite) batch sizes."
        )
    if np.shape(small_sq_norm) != np.shape(big_sq_norm):
        raise ValueError(
            f"small_sq_norm and big_sq_norm have shapes {np.shape(small_sq_norm)} and "
            f"{np.shape(big_sq_norm)}: pass one number each, or per-layer arrays of one shape."
        )
    host = not any(isinstance(x, jax.Array) for x in (small_sq_norm, big_sq_norm))
    xp = np if host else jnp
    if host:
        small_sq_norm = np.asarray(small_sq_norm, np.float64)
        big_sq_norm = np.asarray(big_sq_norm, np.float64)
        if np.any(small_sq_norm < 0) or np.any(big_sq_norm < 0):
            raise ValueError(
                f"squared norms cannot be negative, got {np.ravel(small_sq_norm)[:4].tolist()} "
                f"and {np.ravel(big_sq_norm)[:4].tolist()}: pass |G|², not a difference."
            )
    else:
        small_sq_norm, big_sq_norm = jnp.asarray(small_sq_norm), jnp.asarray(big_sq_norm)
    # Scaled form: divide by the larger magnitude first, so that B·|G_B|² cannot overflow
    # (3e38 and 1.5e38 in float32) and the result is only as large or small as it truly is.
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        scale = xp.maximum(xp.abs(small_sq_norm), xp.abs(big_sq_norm))
        scale = xp.where((scale > 0) & xp.isfinite(scale), scale, 1.0)
        small_n, big_n = small_sq_norm / scale, big_sq_norm / scale
        g_sq = scale * ((big * big_n - b * small_n) / (big - b))
        trace_cov = scale * ((small_n - big_n) / (1.0 / b - 1.0 / big))
    if host:
        finite_in = np.isfinite(small_sq_norm) & np.isfinite(big_sq_norm)
        if np.any(finite_in & ~(np.isfinite(g_sq) & np.isfinite(trace_cov))):
            raise ValueError(
                f"from_two_batches: the statistics of the finite norms "
                f"{np.ravel(small_sq_norm)[:4].tolist()} and {np.ravel(big_sq_norm)[:4].tolist()} "
                f"at sizes {b:g} and {big:g} overflow float64: divide both "
                "norms by a common factor (b_simple does not change) and scale back."
            )
    return NoiseStats(g_sq, trace_cov, b, big)


# ---------------------------------------------------------------------------------------------
# Reduction shared by the estimators.


def _is_narrow(dtype) -> bool:
    """A floating dtype narrower than float32 (bfloat16, float16)."""
    return jnp.issubdtype(dtype, jnp.floating) and common.acc_dtype(dtype) != dtype


def _to_acc(x: jax.Array) -> jax.Array:
    return x.astype(common.acc_dtype(x.dtype)) if _is_narrow(x.dtype) else x


def _upcast(loss_fn: LossFn, params: PyTree) -> tuple[LossFn, PyTree]:
    """``(loss_fn, params)`` whose gradients come out in float32 when leaves are narrower.

    Floating leaves narrower than float32 (bfloat16, float16) are passed as float32 copies and
    cast back inside the loss (exactly: the narrow values are representable), so the model
    computes in its own dtype, and each gradient is converted to float32 where it leaves the model:
    per-example (or per-microbatch) gradients are then summed in float32. The identity (no
    copy, the same ``loss_fn``) when every leaf is at least float32.
    """
    if not any(_is_narrow(x.dtype) for x in jax.tree.leaves(params)):
        return loss_fn, params
    dtypes = jax.tree.map(lambda x: x.dtype, params)
    wide = jax.tree.map(_to_acc, params)

    def loss_wide(p, batch):
        return loss_fn(jax.tree.map(lambda x, d: x.astype(d), p, dtypes), batch)

    return loss_wide, wide


def _finish(
    grad_sum: PyTree,
    small_sq_sum: PyTree,
    num_small: int,
    small_size: float,
    axis_name,
    params: PyTree,
) -> tuple[NoiseStats, PyTree]:
    """Reduce over devices and build the statistics from local sums.

    Args:
      grad_sum: sum over this device's small batches of their mean gradients.
      small_sq_sum: per-leaf sum over this device's small batches of their squared norms.
      num_small: number of small batches on this device.
      small_size: examples per small batch.
      params: the parameters: the mean gradient is returned in their dtypes (as ``jax.grad``).
    """
    n_dev = common.axis_size(axis_name)
    # Sums, the all-reduce and the mean gradient of the statistics in float32 (or wider): with
    # bfloat16 parameters a bfloat16 mean would round |G_B|² before the subtraction.
    grad_sum, small_sq_sum = jax.tree.map(_to_acc, (grad_sum, small_sq_sum))
    grad_sum, small_sq_sum = common.psum((grad_sum, small_sq_sum), axis_name)
    total_small = num_small * n_dev
    grads = jax.tree.map(lambda g: g / total_small, grad_sum)
    small_sq = jax.tree.map(lambda s: s / total_small, small_sq_sum)
    big_sq = common.sq_norms(grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)  # jax.grad's dtypes
    big_size = small_size * total_small

    return _per_leaf_stats(small_sq, big_sq, small_size, big_size), grads


def _per_leaf_stats(small: PyTree, big: PyTree, small_size: float, big_size: float) -> NoiseStats:
    """:func:`from_two_batches` of each leaf's small- and big-batch squared norms (or quadratic
    forms), keyed by the leaf's path, and their sums."""
    paths_and_small = jax.tree_util.tree_leaves_with_path(small)
    per_layer = {
        common.leaf_name(path): from_two_batches(s, bg, small_size, big_size)
        for (path, s), bg in zip(paths_and_small, jax.tree.leaves(big), strict=True)
    }
    g_sq = sum(s.g_sq for s in per_layer.values())
    trace_cov = sum(s.trace_cov for s in per_layer.values())
    return NoiseStats(
        jnp.asarray(g_sq, jnp.float32),
        jnp.asarray(trace_cov, jnp.float32),
        float(small_size),
        float(big_size),
        per_layer,
    )


# ---------------------------------------------------------------------------------------------
# Estimators.


def per_example(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    axis_name: str | None = None,
    has_aux: bool = False,
    method: str = "auto",
    uses: int | None = None,
):
    """Noise statistics from per-example gradients (``jax.vmap`` of ``jax.grad``).

    Each example is passed to ``loss_fn`` as a batch of one; the small batch is one example
    (``b = 1``), the big batch the whole (global) batch. Unbiased for any ``loss_fn`` that is a
    mean of independent per-example losses. Not for BatchNorm in training mode (a batch of one
    normalizes over itself), a masked token mean over the batch, or in-batch terms: use
    :func:`microbatch` there (:func:`gns.finder.mean_loss_warning` checks a ``loss_fn``).

    For any JAX ``loss_fn`` (Flax Linen or NNX, plain ``jnp``) the per-example squared norms of
    parameters read by one operation linear in them (``dot_general``, convolutions, embedding
    gathers, broadcast biases and scales) or by another elementwise binary operation with the
    data (``x / s``, ``x ** s``, ``max(x, s)``) come without per-example gradients, from the
    one backward pass of the mean gradient (:mod:`gns.ghost`); other leaves
    fall back to ``jax.vmap``. On that path the statistics are the same as the ``vmap`` path's
    to float rounding; ``method="auto"`` may instead take the sums from 8 microbatch gradients
    where that is faster (below): then they are the :func:`microbatch` estimator's, unbiased for
    the same quantities, and which path ran depends on a timing (pass ``method="ghost"`` or
    ``"vmap"`` for a fixed one). Differentiating the statistics themselves (a function of
    ``stats`` under ``jax.grad``) is exact on the ``vmap`` path only.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (or ``(loss, aux)`` with
        ``has_aux=True``).
      params: the parameters (any pytree).
      batch: pytree of arrays sharing a leading batch axis of size ``>= 2`` (per device).
      chunk_size: process the batch ``chunk_size`` examples at a time (``jax.lax.scan``), so
        that at most ``chunk_size`` per-example gradients exist at once. A remainder that does
        not fill a chunk is processed as one smaller chunk. ``None``: all at once.
      axis_name: inside ``jax.pmap``/``jax.shard_map``, the data-parallel axis: statistics and
        gradients are then those of the global batch, identical on every device.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux of each call of ``loss_fn`` is
        returned stacked along a leading axis: one entry per example on the ``vmap`` path,
        one per call on the fast path (a single call on the whole local batch, or one per
        equal example chunk or microbatch when ``auto`` chose to split it). Either way, the
        mean over that axis of a per-example mean (loss, accuracy) is its batch mean; pass
        ``method="vmap"`` when you need the aux of every example.
      method: ``"auto"`` (default): the fastest of the fast path (:mod:`gns.ghost`) on the
        whole batch, the fast path over equal example chunks in turn (``jax.lax.scan``: the
        same statistics; smaller products can run faster per example), the sums estimated
        from 8 microbatch gradients (:func:`microbatch`'s loop: unbiased, a little noisier,
        so it must be :data:`gns.ghost.MICROBATCH_PRICE` faster; set that to ``math.inf``
        for statistics equal to ``vmap``'s to rounding), and ``vmap``. Timed
        once on these shapes and cached (:func:`gns.ghost.calibrate`), with the cost model as
        the prior: the fast path without timing when it is clearly cheaper and the batch too
        small to chunk; ``vmap`` when the fast path covers no parameter
        (:func:`gns.ghost.select`, which returns the chosen plan, ``None`` for ``vmap``: its
        ``describe()`` says what is covered, why not, and what was timed). ``"vmap"``:
        always per-example gradients by ``jax.vmap``. ``"ghost"`` (alias ``"fast"``): always
        the fast path on the whole batch; a ``ValueError`` when it covers no parameter (e.g.
        every parameter used nonlinearly).
      uses: how many steps will run this call's path (``None``: many); ``"auto"`` then times
        the other paths only where that can pay over so many steps (a short pilot keeps the
        cost model's choice; :func:`gns.ghost.calibrate`).

    Returns:
      ``(stats, grads)`` (``(stats, grads, aux)`` with ``has_aux``): the statistics and the
      mean gradient of the (global) batch, equal to ``jax.grad(loss_fn)(params, batch)`` (and
      in its dtypes) for a loss that is such a mean (dropout whose key the loss draws from the
      batch draws other masks on ``vmap``'s batches of one: the same in law, not equal).
      With parameters narrower than float32 (bfloat16) the per-example squared norms, the
      gradient sums and the mean gradient of the statistics are accumulated in float32; the
      statistics are float32.

    Example:
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> x = jax.random.normal(jax.random.key(0), (64, 3))
      >>> stats, grads = per_example(loss_fn, jnp.zeros(3), (x, x @ jnp.ones(3)))
      >>> float(stats.b_simple) > 0
      True
    """
    params, n = _checked(loss_fn, params, batch, axis_name, has_aux)
    if n < 2:
        raise ValueError(
            "per_example needs at least 2 examples per batch (per device with axis_name): "
            "with one example the gradient variance cannot be estimated. Pass a larger batch "
            "(with one example per device, across_devices gives these statistics)."
        )
    if chunk_size is not None:
        chunk_size = common.check_int(chunk_size, "chunk_size", 1, "or None for no chunking")
    chunk = n if chunk_size is None else min(chunk_size, n)
    if method not in ("auto", "vmap", "ghost", "fast"):
        raise ValueError(
            f"method must be 'auto', 'vmap' or 'ghost' (alias 'fast'), got {method!r}."
        )
    if has_aux:  # a clear error before any path indexes into a missing aux
        jax.eval_shape(common.checked_aux(loss_fn), params, batch)
    params = common.to_varying(params, axis_name)
    plan = ghost.select(
        loss_fn, params, batch, has_aux=has_aux, method=method, chunk_size=chunk_size, uses=uses
    )
    if plan is not None:  # the fast path: chosen ("ghost"), or the faster path (whole or chunked)
        kw = dict(has_aux=has_aux, axis_name=axis_name, chunk_size=chunk_size)
        grad_sum, sq_sum, aux = ghost.sums(loss_fn, params, batch, plan, **kw)
    else:
        wide_loss, wide_params = _upcast(loss_fn, params)
        grad_sum, sq_sum, aux = common.vmap_sums(
            wide_loss, wide_params, batch, n, chunk, axis_name, has_aux
        )
    stats, grads = _finish(grad_sum, sq_sum, n, 1.0, axis_name, params)
    return (stats, grads, aux) if has_aux else (stats, grads)


def microbatch(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    num_microbatches: int = 8,
    axis_name: str | None = None,
    has_aux: bool = False,
    unroll: int | bool | None = None,
):
    """Noise statistics from microbatch gradients (gradient accumulation).

    The batch is split into ``k = num_microbatches`` equal microbatches whose gradients are
    accumulated with ``jax.lax.scan`` (memory of one microbatch at a time); the small batch is
    one microbatch (``b = B/k``), the big batch the whole (global) batch. Costs nearly nothing
    over plain gradient accumulation. Suits BatchNorm: each microbatch normalizes over itself.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (or ``(loss, aux)``).
      params: the parameters.
      batch: pytree of arrays with a leading batch axis divisible by ``num_microbatches``.
      num_microbatches: ``k >= 2`` microbatches per device.
      axis_name: inside ``jax.pmap``/``jax.shard_map``: statistics and gradients of the global
        batch (``k`` microbatches on every device).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux of each microbatch is returned
        stacked along a leading axis of size ``k``.
      unroll: passed to ``jax.lax.scan``. ``1`` keeps one microbatch in memory at a time (the
        memory bound of gradient accumulation). ``True`` unrolls the loop, which may keep
        every microbatch's activations alive at once. ``None`` (default): ``True`` when JAX's
        default backend is the CPU and ``loss_fn`` convolves, ``1`` otherwise, because XLA:CPU
        runs convolutions inside a rolled loop an order of magnitude slower
        (jax-ml/jax#12868; :func:`gns.common.scan_unroll`; the measured ratios are the
        ``microbatch`` rows of ``make bench``, in the README). The results are the same either
        way.

    Returns:
      ``(stats, grads)`` (``(stats, grads, aux)`` with ``has_aux``).

    Example:
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> x = jax.random.normal(jax.random.key(0), (64, 3))
      >>> stats, grads = microbatch(loss_fn, jnp.zeros(3), (x, x @ jnp.ones(3)),
      ...                           num_microbatches=8)
      >>> stats.small_batch_size, stats.big_batch_size
      (8.0, 64.0)
    """
    params, _ = _checked(loss_fn, params, batch, axis_name, has_aux)
    n, k = _microbatches(batch, num_microbatches)
    if unroll is None:
        unroll = common.scan_unroll(common.convolves(loss_fn, params, batch))
    return _accumulate(loss_fn, params, batch, n, k, axis_name, has_aux, unroll)


def across_devices(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    axis_name: str = "batch",
    has_aux: bool = False,
):
    """Noise statistics from data parallelism itself: local versus all-reduced gradients.

    Call inside ``jax.pmap``/``jax.shard_map`` over ``axis_name``. Each device takes one ordinary
    backward pass on its local batch (the small batch, ``b = B_local``); the all-reduced mean
    gradient is the big batch (``B = B_local · devices``). The extra cost over a plain
    data-parallel step is one all-reduce of one scalar per parameter leaf.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (or ``(loss, aux)``).
      params: the (replicated) parameters.
      batch: this device's shard of the batch.
      axis_name: the data-parallel axis; at least 2 devices on it.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; this device's aux is returned.

    Returns:
      ``(stats, grads)`` (``(stats, grads, aux)`` with ``has_aux``), identical on every device.
    """
    params, n = _checked(loss_fn, params, batch, axis_name, has_aux)
    if axis_name is None:
        raise ValueError(
            "across_devices needs axis_name: the data-parallel axis of pmap/shard_map."
        )
    if common.axis_size(axis_name) < 2:
        raise ValueError(
            f"across_devices needs at least 2 devices on axis {axis_name!r}, got 1: use "
            "microbatch() on a single device."
        )
    out = _accumulate(loss_fn, params, batch, n, 1, axis_name, has_aux)
    if has_aux:
        stats, grads, aux = out
        return stats, grads, jax.tree.map(lambda a: a[0], aux)
    return out


def hessian_aware(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    hessian_batch: PyTree,
    *,
    num_microbatches: int = 8,
) -> tuple[NoiseStats, PyTree]:
    """The Hessian-aware noise scale ``B_noise = tr(HΣ)/(GᵀHG)`` from microbatch gradients.

    The two-batch estimators of :func:`microbatch` with the quadratic form ``vᵀHv`` in place of
    ``|v|²``: ``E[G_bᵀHG_b] = GᵀHG + tr(HΣ)/b`` for a Hessian ``H`` independent of the
    gradients, taken at ``params`` on ``hessian_batch`` (Hessian-vector products,
    ``jax.jvp`` of ``jax.grad``). It costs ``k + 1`` Hessian-vector products on
    ``hessian_batch`` besides the ``k`` microbatch gradients: a diagnostic, not a per-step
    estimator, on one device (call it outside ``pmap``/``shard_map``, under ``jit``).
    ``B_noise`` is what McCandlish et al.'s tradeoff predicts for SGD at its per-step optimal
    rate; ``B_simple`` equals it when ``H`` is a multiple of the identity.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
      params: the parameters.
      batch: the gradients' batch, its leading axis divisible by ``num_microbatches``.
      hessian_batch: the Hessian's batch, independent of ``batch`` (a shared batch biases both
        forms).
      num_microbatches: ``k >= 2`` microbatches (the small batch size is ``B/k``).

    Returns:
      ``(stats, grads)``: a :class:`NoiseStats` whose ``g_sq`` is ``GᵀHG``, ``trace_cov``
      ``tr(HΣ)`` and ``b_simple`` ``B_noise`` (per leaf: each leaf's share of the forms), and
      the mean gradient of ``batch``.

    Example:
      >>> def loss_fn(w, batch):  # H = 2I: B_noise equals B_simple
      ...     return jnp.mean(jnp.sum((w - batch) ** 2, axis=-1))
      >>> x = jax.random.normal(jax.random.key(0), (64, 3)) + 1.0
      >>> h, _ = hessian_aware(loss_fn, jnp.zeros(3), x, x[:8])
      >>> s, _ = microbatch(loss_fn, jnp.zeros(3), x)
      >>> bool(jnp.allclose(h.b_simple, s.b_simple))
      True

    Reference: McCandlish et al. (2018), section 2.2 and appendix A.
    """
    params = common.float_params(params)
    sizes = [np.shape(x)[0] if np.ndim(x) else 0 for x in jax.tree.leaves(hessian_batch)]
    if min(sizes, default=0) < 1:
        raise ValueError("hessian_batch is empty: pass examples to estimate the Hessian on.")
    common.check_scalar_loss(loss_fn, params, hessian_batch)
    n, k = _microbatches(batch, num_microbatches)
    grad = jax.grad(loss_fn)

    def hvp(v):
        return jax.jvp(lambda p: grad(p, hessian_batch), (params,), (v,))[1]

    def forms(v):  # per-leaf vᵀHv
        return jax.tree.map(lambda a, b: jnp.sum(_to_acc(a) * _to_acc(b)), v, hvp(v))

    def micro_sums(micro):
        g = grad(params, micro)
        return g, forms(g), None

    grad_sum, small_sum, _ = common.scan_sums(micro_sums, params, batch, k, None)
    grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grad_sum, params)
    small = jax.tree.map(lambda s: s / k, small_sum)
    return _per_leaf_stats(small, forms(grads), n / k, n), grads


def _checked(loss_fn, params, batch, axis_name, has_aux: bool) -> tuple[PyTree, int]:
    """``(params as float arrays, the batch size)`` (:func:`gns.common.float_params`,
    :func:`batch_size`), after checking the batch and, for a loss without aux outside a device
    map (whose collectives bind only there), that ``loss_fn`` returns a scalar."""
    params = common.float_params(params)
    common.check_batch_axes(batch, axis_name)
    n = batch_size(batch)  # its leaves' leading axes, named when they differ
    if axis_name is None and not has_aux:
        common.check_scalar_loss(loss_fn, params, batch)
    return params, n


def _microbatches(batch: PyTree, num_microbatches) -> tuple[int, int]:
    """``(batch size, k)``, with a ``ValueError`` unless ``k = num_microbatches >= 2`` divides
    the batch size."""
    n = batch_size(batch)
    k = common.check_int(
        num_microbatches, "num_microbatches", 2, "one microbatch gives no second batch size."
    )
    if n % k:
        raise ValueError(
            f"num_microbatches={k} does not divide the batch size {n}: pick a divisor of the "
            "batch size (the microbatches must be equal for the estimator to be unbiased)."
        )
    return n, k


def _accumulate(loss_fn, params, batch, n, k, axis_name, has_aux, unroll=1):
    """Accumulate ``k`` microbatch gradients and their squared norms (in float32 at least),
    then reduce."""
    params = common.to_varying(params, axis_name)
    wide_loss, wide_params = _upcast(loss_fn, params)
    grad_sum, sq_sum, aux = common.microbatch_sums(
        wide_loss, wide_params, batch, k, axis_name, has_aux, unroll
    )
    stats, grads = _finish(grad_sum, sq_sum, k, n / k, axis_name, params)
    return (stats, grads, aux) if has_aux else (stats, grads)
