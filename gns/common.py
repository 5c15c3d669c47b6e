"""Helpers shared by the estimators (:mod:`gns.estimate`, :mod:`gns.ghost`, :mod:`gns.parallel`)
and the statistics on top of them (:mod:`gns.smoothing`, :mod:`gns.plots`).

The bottom of the package: it imports no other ``gns`` module, so ``estimate``, ``ghost`` and
``parallel`` import it (and each other, one way down: ``parallel -> estimate -> ghost ->
common``) without a cycle.

* pytree reductions: :func:`sq_norms` (per-leaf squared norms in a scaled, overflow- and
  underflow-safe form), :func:`leaf_name`, :func:`batch_size`, :func:`split_leading`;
* named axes (``pmap``/``shard_map``): :func:`axis_names`, :func:`axis_size`,
  :func:`to_varying`, :func:`psum`;
* sums over equal chunks of a batch (``jax.lax.scan``, in float32 at least), which the
  microbatch estimator, the chunked fast path and the chunked ``vmap`` share:
  :func:`acc_dtype`, :func:`zero_sums`, :func:`scan_sums`, :func:`scan_unroll`, :func:`convolves`,
  and the microbatch gradients on them, :func:`microbatch_sums`;
* the per-example gradients by ``jax.vmap`` that every fallback uses: :func:`grad_fn`,
  :func:`vmap_sums`;
* argument checks: :func:`is_real`, :func:`check_int`, :func:`check_positive`,
  :func:`check_confidence`, :func:`check_resamples`, :func:`check_batch_size`,
  :func:`check_step_times`;
* :func:`to_json`: results as strict-JSON-able values (every JSON file of the project);
* the one noise-scale ratio, :func:`noise_scale_ratio`, for NumPy and JAX arrays alike, and
  the percentile step of every bootstrap here, :func:`percentile_interval`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = [
    "PyTree",
    "LossFn",
    "leaf_name",
    "float_params",
    "check_batch_axes",
    "batch_size",
    "is_real",
    "check_int",
    "check_positive",
    "check_confidence",
    "check_resamples",
    "check_batch_size",
    "check_step_times",
    "to_json",
    "sq_norms",
    "axis_names",
    "axis_size",
    "to_varying",
    "psum",
    "acc_dtype",
    "zero_sums",
    "scan_sums",
    "microbatch_sums",
    "scan_unroll",
    "convolves",
    "split_leading",
    "grad_fn",
    "vmap_sums",
    "noise_scale_ratio",
    "percentile_interval",
]


def leaf_name(path) -> str:
    """``"params/Conv_0/kernel"`` from a ``jax.tree_util`` key path (``"."`` for the root)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts) or "."


def check_scalar_loss(loss_fn: Callable, params: PyTree, batch: PyTree) -> None:
    """A ``ValueError`` unless ``loss_fn(params, batch)`` returns a scalar (traced, not run)."""
    out = jax.eval_shape(loss_fn, params, batch)
    if not (hasattr(out, "shape") and out.shape == ()):
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"loss_fn(params, batch) must return a scalar (the mean loss over the batch), got "
            f"{shape}: reduce it with .mean() (per-example losses are not a training loss); for "
            "a (loss, aux) pair pass has_aux=True where the function takes it, else lambda "
            "params, batch: loss_fn(params, batch)[0]."
        )


def float_params(params: PyTree) -> PyTree:
    """``params`` with every leaf an array (Python scalars converted), or a ``ValueError``
    naming the first leaf that is not floating point (an integer counter, a PRNG key)."""

    def checked(path, x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            raise ValueError(
                f"params leaf {leaf_name(path)} is {x.dtype}, not a float: pass the trainable "
                "parameters only (with Flax NNX: graphdef, params, rest = nnx.split(model, "
                "nnx.Param, ...), merged in loss_fn)."
            )
        return x

    return jax.tree_util.tree_map_with_path(checked, params)


def batch_size(batch: PyTree, argname: str = "batch") -> int:
    """The common leading size of the leaves of ``batch``, with clear errors otherwise."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(f"`{argname}` has no arrays: pass a pytree of arrays with a batch axis.")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"`{argname}` leaf {leaf_name(path)!r} is a scalar: every leaf needs a leading "
                "batch axis (reshape it to [batch, ...] or close over it in loss_fn)."
            )
        sizes.setdefault(shape[0], []).append(leaf_name(path))
    if len(sizes) > 1:
        desc = "; ".join(
            f"{n} in leaf {', '.join(repr(x) for x in names)}" for n, names in sorted(sizes.items())
        )
        raise ValueError(
            f"`{argname}` leaves have different leading (batch) sizes ({desc}): every leaf must "
            "hold the same number of examples along axis 0."
        )
    (size,) = sizes
    if size == 0:
        raise ValueError(f"`{argname}` is empty (batch size 0): pass at least two examples.")
    return int(size)


def check_int(value, name: str, minimum: int, hint: str = "") -> int:
    """``value`` as a Python int when it is an integer (``int`` or a NumPy integer, not a
    ``bool``) of at least ``minimum``; a ``ValueError`` naming ``name`` otherwise.

    Example:
      >>> check_int(np.int64(3), "chunk_size", 1)
      3
    """
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not ok or value < minimum:
        raise ValueError(
            f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})"
            + (f": {hint}" if hint else ".")
        )
    return int(value)


def is_real(value) -> bool:
    """Whether ``value`` is one real number: a Python, NumPy or 0-d array scalar of a numeric
    dtype (a JAX scalar too), not a ``bool``, a string or ``None``.

    Example:
      >>> is_real(np.float32(0.5)), is_real(jnp.array(2)), is_real(True), is_real("1")
      (True, True, False, False)
    """
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and np.ndim(value) == 0 and np.issubdtype(dtype, np.number)


def check_positive(value, name: str, hint: str, *, optional: bool = False) -> float | None:
    """``value`` as a float when it is a finite positive real number (:func:`is_real`),
    ``None`` when it is ``None`` and ``optional``; a ``ValueError`` naming ``name`` and ``hint``
    (what the number is) otherwise.

    Example:
      >>> check_positive(np.float32(0.5), "base_lr", "the rate tuned at the base batch")
      0.5
    """
    if value is None and optional:
        return None
    if not is_real(value) or not 0 < value < math.inf:
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be a finite positive number{none} ({hint}), got {value!r}.")
    return float(value)


def check_confidence(confidence, name: str = "confidence") -> float:
    """``confidence`` as a float in ``(0, 1)``, a ``ValueError`` naming ``name`` otherwise.

    Example:
      >>> check_confidence(0.9)
      0.9
    """
    if not is_real(confidence) or not 0.0 < confidence < 1.0:
        raise ValueError(f"{name} must be in (0, 1), e.g. 0.9, got {confidence!r}.")
    return float(confidence)


def check_resamples(num_resamples, confidence: float, name: str = "num_resamples") -> int:
    """``num_resamples`` as an int when it is enough for a two-sided ``confidence`` percentile
    interval, a ``ValueError`` naming ``name`` otherwise.

    Each tail of the interval must hold a resample: with fewer than ``2/(1 - confidence)``
    resamples both ends are just the smallest and the largest one (one resample: a single
    number), whatever the level asked for.

    Example:
      >>> check_resamples(20, 0.9)
      20
    """
    alpha = 1.0 - check_confidence(confidence)
    need = max(2, math.ceil(2.0 / alpha - 1e-9))
    ok = isinstance(num_resamples, int | np.integer) and not isinstance(
        num_resamples, bool | np.bool_
    )
    if not ok or num_resamples < need:
        raise ValueError(
            f"{name} must be an int >= {need} for a {float(confidence):.4g} interval (each tail "
            f"needs a resample), got {num_resamples!r}: use the default (1000 or more)."
        )
    return int(num_resamples)


def check_batch_size(value, name: str) -> int:
    """A batch size as an ``int``: an integer, or a float without a fraction (``64.0`` from
    JSON), at least 1; a ``ValueError`` naming ``name`` otherwise (``3.5`` is never truncated).

    Example:
      >>> check_batch_size(64.0, "base_batch_size")
      64
    """
    ok = is_real(value) and 1 <= value < math.inf and float(value) == math.floor(value)
    if not ok:
        raise ValueError(
            f"{name} must be a whole number of examples >= 1, got {value!r}: a batch size has "
            "no fraction (round it yourself if that is what you mean)."
        )
    return int(value)


def check_step_times(step_time, max_batch_size: int) -> dict[int, float]:
    """Measured step times ``{batch: seconds}`` at or below ``max_batch_size``, from a
    ``{batch: seconds}`` mapping or a ``(batch_sizes, seconds)`` pair: whole batch sizes
    (:func:`check_batch_size`) and finite positive seconds; a ``ValueError`` otherwise.

    Example:
      >>> check_step_times(([16, 32.0, 64], [0.1, 0.2, 0.4]), 32)
      {16: 0.1, 32: 0.2}
    """
    check_int(max_batch_size, "max_batch_size", 1, "the largest batch that fits")
    try:
        pairs = (
            step_time.items() if isinstance(step_time, Mapping) else zip(*step_time, strict=True)
        )
        pairs = list(pairs)
    except (TypeError, ValueError):
        pairs = []
    if not pairs:
        raise ValueError(
            "step_time is empty (or not a {batch_size: seconds per step} dict of measured step "
            f"times, gns.hardware.time_batch_sizes), got {step_time!r}: time at least one batch "
            "size that fits."
        )
    sizes = [check_batch_size(k, "each step_time batch size") for k, _ in pairs]
    if len(set(sizes)) < len(sizes):
        twice = sorted({b for b in sizes if sizes.count(b) > 1})
        raise ValueError(f"step_time gives batch sizes {twice} twice: one time per batch size.")
    measured = {b: v for b, (_, v) in zip(sizes, pairs, strict=True)}
    bad = {k: v for k, v in measured.items() if not (is_real(v) and 0 < v < math.inf)}
    if bad:
        raise ValueError(f"step_time needs finite positive seconds per step, got {bad}.")
    fits = {k: float(v) for k, v in measured.items() if k <= max_batch_size}
    if not fits:
        raise ValueError(
            f"step_time has no batch size at or below max_batch_size={max_batch_size} (timed: "
            f"{sorted(measured)}): time the batch sizes that fit."
        )
    return fits


def sq_norms(tree: PyTree) -> PyTree:
    """Per-leaf squared norm in float32, safe over the whole float32 range.

    One pass, ``sum(g²)``, when that is finite and large enough that squares flushed to zero
    (below the smallest normal float32, 1.2e-38; XLA flushes them) cannot matter; otherwise the
    scaled form ``‖g‖² = (m·‖g/m‖)²`` with ``m = max|g|``, whose squares are of numbers of size
    at most 1, so a gradient of a loss scaled by 1e-19 keeps its norm whenever the squared norm
    itself is representable. On stacked per-example gradients this is the sum over examples of
    their squared norms.
    """

    def scaled(g):
        m = jnp.max(jnp.abs(g))
        safe = jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)
        return jnp.square(safe * jnp.sqrt(jnp.sum(jnp.square(g / safe))))

    def one(g):
        g = g.astype(jnp.float32)
        if not g.size:
            return jnp.zeros((), jnp.float32)
        plain = jnp.sum(jnp.square(g))
        # Each flushed square is < 1.2e-38, so together they are < size·1.2e-38 <= 1e-8 x plain.
        exact = jnp.isfinite(plain) & (plain >= g.size * 1.2e-30)
        return jax.lax.cond(exact, lambda: plain, lambda: scaled(g))

    return jax.tree.map(one, tree)


def axis_names(axis_name) -> tuple:
    """``axis_name`` as a tuple of names (a tuple or list of names, or one name)."""
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def axis_size(axis_name) -> int:
    """Devices on the named axis (1 for ``None``); a clear error for an unbound name."""
    if axis_name is None:
        return 1
    try:
        return jax.lax.axis_size(axis_name)
    except NameError as e:  # unbound axis name
        raise ValueError(
            f"axis_name={axis_name!r} is not bound: call this inside jax.pmap/jax.shard_map over "
            f"an axis of that name, or pass axis_name=None on a single device. ({e})"
        ) from e


def _varying_axes(leaf) -> set:
    """The mesh axes (under ``shard_map``) that ``leaf`` varies over (named by JAX's version)."""
    aval = jax.typeof(leaf)
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return set(varying if varying is not None else getattr(aval, "vma", ()))


def check_batch_axes(batch: PyTree, axis_name) -> None:
    """A ``ValueError`` when ``batch`` varies over a mesh axis that ``axis_name`` does not
    name (under ``shard_map``): its statistics and gradient would be those of part of the
    batch, reduced over some of its devices only; with ``axis_name=None``, JAX would sum the
    replicated parameters' gradients over those devices (statistics ~devices² too large)."""
    if axis_name is None:
        varying = set().union(*map(_varying_axes, jax.tree.leaves(batch)))
        if varying:
            name = sorted(varying)[0] if len(varying) == 1 else tuple(sorted(varying))
            raise ValueError(
                f"the batch varies over the mesh axes {sorted(varying)} (inside shard_map) but "
                "axis_name is None: JAX sums the replicated parameters' gradients over those "
                f"devices, so the statistics would be wrong; pass axis_name={name!r} (the "
                "global batch's statistics)."
            )
        return
    axis_size(axis_name)  # an unbound name is said first
    names = set(axis_names(axis_name))
    for leaf in jax.tree.leaves(batch):
        extra = _varying_axes(leaf) - names
        if extra:
            every = tuple(sorted(names | extra))
            raise ValueError(
                f"the batch is sharded over the mesh axes {sorted(extra)} that "
                f"axis_name={axis_name!r} does not name: the statistics would be those of part "
                f"of the batch; pass axis_name={every!r}."
            )


def to_varying(tree: PyTree, axis_name) -> PyTree:
    """Mark replicated params as device-varying before differentiating.

    Inside ``shard_map``, the gradient of an unvarying (replicated) input is summed over the
    axis by JAX itself: the per-device and per-example gradients would silently become sums
    over devices. Casting to varying first keeps them local; the callers reduce explicitly
    afterwards. Under ``pmap`` (no varying-type check) this is a no-op. Also correct with
    ``shard_map(..., check_vma=False)`` (nothing is tracked, nothing is summed implicitly), and
    for a tuple of axis names: each name is cast separately, so a leaf already varying over
    some of them is still cast over the others.
    """
    if axis_name is None:
        return tree
    axis_size(axis_name)  # a clear ValueError for an unbound name (pcast would assert)
    names = axis_names(axis_name)

    def cast(x):
        for name in names:
            try:
                x = jax.lax.pcast(x, name, to="varying")
            except (ValueError, TypeError, NotImplementedError):
                pass  # already varying over `name`, or no varying-type tracking here
        return x

    return jax.tree.map(cast, tree)


def psum(tree: PyTree, axis_name) -> PyTree:
    """``jax.lax.psum`` over ``axis_name``; the identity for ``None``."""
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def acc_dtype(dtype):
    """Accumulation dtype: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def zero_sums(params: PyTree, axis_name) -> tuple[PyTree, PyTree]:
    """Zero accumulators (gradient sum, per-leaf squared-norm sum) for a scan carry, each in
    its leaf's accumulation dtype (:func:`acc_dtype`)."""
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, acc_dtype(x.dtype)), params)
    sq = jax.tree.map(lambda x: jnp.zeros((), acc_dtype(x.dtype)), params)
    return to_varying((zeros, sq), axis_name)


def scan_sums(chunk_sums, params: PyTree, batch: PyTree, k: int, axis_name, unroll=1):
    """``chunk_sums(chunk) -> (grad_sum, sq_sum, aux)`` summed over ``k`` equal chunks of
    ``batch`` by ``jax.lax.scan`` (carry: :func:`zero_sums` of ``params``).

    Returns:
      ``(grad_sum, sq_sum, aux)``: the sums, and the chunks' aux stacked along a leading axis
      of size ``k``.
    """

    def body(carry, chunk):
        g, s, a = chunk_sums(chunk)
        return jax.tree.map(lambda c, x: c + x.astype(c.dtype), carry, (g, s)), a

    init = zero_sums(params, axis_name)
    (grad_sum, sq_sum), aux = jax.lax.scan(body, init, split_leading(batch, k), unroll=unroll)
    return grad_sum, sq_sum, aux


def scan_unroll(convolves: bool) -> int | bool:
    """The ``unroll`` of a loop over chunks whose body ``convolves`` (or not, :func:`convolves`):
    ``True`` (unrolled) for a convolution on the CPU, whose XLA runs convolutions inside a
    rolled loop an order of magnitude slower (jax-ml/jax#12868); ``1`` (one chunk in memory at
    a time) otherwise. On 2 CPU cores a rolled loop of dense layers ran 1.15-1.5x faster than
    the unrolled one (the Transformer and MLP of ``make bench``, 8 chunks), compiled 2-3x
    faster and needed 7x less temporary memory."""
    return True if convolves and jax.default_backend() == "cpu" else 1


def convolves(fn: Callable, *args) -> bool:
    """Whether ``fn(*args)`` runs a convolution, anywhere in its jaxpr (traced, not run)."""
    return "conv_general_dilated" in str(jax.make_jaxpr(fn)(*args))


def split_leading(batch: PyTree, k: int) -> PyTree:
    """Reshape every leaf ``[n, ...]`` to ``[k, n/k, ...]``."""
    return jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)


def grad_fn(loss_fn: LossFn, has_aux: bool):
    """``(params, batch) -> (grads, aux)`` (``aux`` ``None`` without ``has_aux``), with a clear
    error when ``has_aux=True`` and ``loss_fn`` does not return a ``(loss, aux)`` pair."""
    if not has_aux:
        g = jax.grad(loss_fn)
        return lambda p, b: (g(p, b), None)
    return jax.grad(checked_aux(loss_fn), has_aux=True)


def checked_aux(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` that raises a clear ``ValueError`` unless it returns ``(loss, aux)``."""

    def checked(p, b):
        out = loss_fn(p, b)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            what = type(out).__name__ + (
                f" of length {len(out)}" if isinstance(out, tuple | list) else ""
            )
            raise ValueError(
                f"has_aux=True but loss_fn returned a {what}, not a (loss, aux) pair: return "
                "(loss, aux) from loss_fn, or pass has_aux=False."
            )
        return tuple(out)

    return checked


def microbatch_sums(loss_fn, params, batch, k: int, axis_name, has_aux: bool, unroll=1):
    """The gradients of ``k`` equal microbatches of ``batch``, one at a time
    (:func:`scan_sums`; ``k = 1``: the whole batch).

    Returns:
      ``(grad_sum, sq_sum, aux)``: the sum of their gradients, the per-leaf sum of their
      squared norms, and their aux stacked along a leading axis of size ``k``.
    """
    grad = grad_fn(loss_fn, has_aux)

    def one(microbatch):
        g, aux = grad(params, microbatch)
        return g, sq_norms(g), aux

    if k == 1:
        g, s, aux = one(batch)
        return g, s, jax.tree.map(lambda a: a[None], aux)
    return scan_sums(one, params, batch, k, axis_name, unroll)


def vmap_sums(loss_fn, params, batch, n, chunk, axis_name, has_aux):
    """Per-example gradients by ``jax.vmap``, ``chunk`` examples at a time.

    Returns:
      ``(grad_sum, sq_sum, aux)``: the sum over the ``n`` local examples of their gradients,
      the per-leaf sum of their squared norms, and the per-example aux stacked along axis 0.
    """
    one_grad = grad_fn(loss_fn, has_aux)

    def one_example(example):
        return one_grad(params, jax.tree.map(lambda x: x[None], example))

    def chunk_sums(examples):
        grads, aux = jax.vmap(one_example)(examples)
        grad_sum = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
        return grad_sum, sq_norms(grads), aux

    num_chunks, rem = divmod(n, chunk)
    head = jax.tree.map(lambda x: x[: num_chunks * chunk], batch)
    if num_chunks == 1:
        grad_sum, sq_sum, aux = chunk_sums(head)
    else:
        grad_sum, sq_sum, aux = scan_sums(chunk_sums, params, head, num_chunks, axis_name)
        aux = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), aux)
    if rem:
        g, s, a = chunk_sums(jax.tree.map(lambda x: x[num_chunks * chunk :], batch))
        grad_sum, sq_sum = jax.tree.map(jnp.add, (grad_sum, sq_sum), (g, s))
        aux = jax.tree.map(lambda u, v: jnp.concatenate([u, v]), aux, a)
    return grad_sum, sq_sum, aux


def noise_scale_ratio(trace_cov, g_sq):
    """``trace_cov / g_sq`` with the noise-scale conventions: ``+inf`` where ``g_sq <= 0`` (the
    gradient is not resolved above the noise), ``nan`` where either input is ``nan``.

    The one ratio of the package: JAX arrays (also inside ``jit``) give a JAX array, anything
    else (NumPy arrays, Python floats) a NumPy array, computed in the inputs' precision.

    Example:
      >>> noise_scale_ratio(np.array([8.0, 8.0, np.nan]), np.array([2.0, -1.0, 1.0]))
      array([ 4., inf, nan])
    """
    xp = jnp if isinstance(trace_cov, jax.Array) or isinstance(g_sq, jax.Array) else np
    trace_cov, g_sq = xp.asarray(trace_cov), xp.asarray(g_sq)
    positive = g_sq > 0
    with np.errstate(invalid="ignore", divide="ignore"):  # inf/inf: nan, as wanted
        ratio = xp.where(positive, trace_cov / xp.where(positive, g_sq, 1.0), xp.inf)
    return xp.where(xp.isnan(g_sq) | xp.isnan(trace_cov), xp.nan, ratio)


def percentile_interval(samples, confidence: float, estimate=None) -> tuple[float, float]:
    """The two-sided ``confidence`` percentile interval of bootstrap ``samples``.

    Quantiles are order statistics (the lower one for the low end, the higher one for the
    high end), never interpolated: an infinite sample (a resample whose mean ``g_sq`` is not
    positive) gives an infinite end, never ``nan``. With ``estimate`` (the point estimate the
    samples resample), the interval always contains it: an end that misses it (rounding when
    every resample gives the same value, or a strongly skewed bootstrap distribution) is moved
    to it, so no interval here ever excludes its own estimate.

    Example:
      >>> percentile_interval([1.0, 2.0, 3.0, np.inf], 0.5)
      (1.0, inf)
      >>> percentile_interval([1.0, 2.0, 3.0], 0.5, estimate=0.5)
      (0.5, 3.0)
    """
    alpha = 1.0 - float(confidence)
    x = np.asarray(samples, np.float64).ravel()
    low = float(np.quantile(x, alpha / 2, method="lower"))
    high = float(np.quantile(x, 1.0 - alpha / 2, method="higher"))
    if estimate is not None and not math.isnan(float(estimate)):
        low, high = min(low, float(estimate)), max(high, float(estimate))
    return low, high


def to_json(x: Any) -> Any:
    """``x`` as strict-JSON-able Python values: mappings with string keys, tuples as lists,
    NumPy/JAX scalars and arrays as Python values, objects with ``to_dict`` as their dict, every
    non-finite float as ``None`` (what :func:`json.dumps` writes with ``allow_nan=False``), and
    anything else as its ``str``.

    Example:
      >>> to_json({"b": (1.5, float("nan")), 2: np.float32(0.5)})
      {'b': [1.5, None], '2': 0.5}
    """
    if isinstance(x, Mapping):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_json(v) for v in x]
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "to_dict"):
        return to_json(x.to_dict())
    if hasattr(x, "__array__") or isinstance(x, np.generic):
        return to_json(np.asarray(x).tolist())
    return str(x)
