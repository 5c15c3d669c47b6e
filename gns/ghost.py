"""Per-example squared gradient norms without per-example gradients ("ghost norms"), for any
JAX ``loss_fn``.

The noise scale needs, for every parameter leaf, the sum over examples of the squared norms of
the per-example gradients, and the mean gradient. ``loss_fn`` is traced to a jaxpr (nested
``jit`` calls inlined) and, for each leaf, the operations that read it with the example axis
are found (after example-free steps: casts, reshapes, transposes, any function of the
parameters alone). Where such an operation is linear in its parameter operand (or is any
other elementwise binary operation of it) and the example axis is on its other operand, one
example's gradient of the parameter is a contraction of that operand (of the output's
derivative by the parameter) with the example's output gradient ``g``, and its squared norm
has a closed form:

* ``dot_general`` (any dense layer, attention projection, einsum, ``jnp.dot``): one example's
  kernel gradient is ``Σ_t x_t g_tᵀ`` over the free positions ``t`` of the operand; its
  squared norm is either **direct** ``‖Σ_t x_t g_tᵀ‖²`` (the per-example gradients, ``K·C``
  each, which also give the kernel's gradient) or **Gram** ``Σ_{t,t'} (x_t·x_t')(g_t·g_t')``
  (cost ``T²·(K+C)`` per example), the cheaper one per operation by the cost model. Axes
  shared by both operands (``dot_general`` batch dimensions, e.g. heads) are summed over
  outside.
* ``conv_general_dilated``: the same, with ``x_t`` the input patch at output position ``t``;
  patches are strided slices of the padded input (spaced out with zeros first for a
  transposed convolution's input dilation), one per kernel offset, never concatenated. A
  grouped convolution (depthwise: one group per input channel) takes the products within
  each group, in the direct form only.
* ``gather`` of rows of a ``[vocab, D]`` table (an embedding, ``jnp.take``, ``table[tokens]``):
  the token-equality Gram ``Σ_{t,t'} [tok_t = tok_t'] (g_t·g_t')`` or, when cheaper, a
  scatter-add into a per-example table. Out-of-range tokens count for nothing (``fill``
  mode: they get no gradient) or are clamped (``clip`` mode), as the gather does.
* ``add``/``sub``/``mul`` broadcasting the parameter against an operand with the example
  axis, or ``broadcast_in_dim`` of the parameter to the example axis (biases, the scale and
  bias of ``LayerNorm``/``GroupNorm``/``RMSNorm``, a bare ``self.param`` position embedding):
  one example's gradient is ``g`` (times the other operand, for ``mul``) summed over the
  broadcast axes.
* any other elementwise binary primitive of :data:`_ELEMENTWISE` broadcasting the parameter
  against an operand with the example axis (``div``, ``pow``, ``max``, ``min``, ``atan2``,
  ``rem``, ``igamma``, ``igammac``: a learnable divisor or temperature ``x / s``, exponent
  ``x ** s``, floor ``max(x, s)``): the same, with ``g`` times the output's derivative by the
  parameter, elementwise (the JVP of the primitive with a unit tangent on the parameter
  operand, by JAX's own rule: a tie of ``max``/``min`` and a power at a zero base get the
  derivative ``jax.grad`` takes).

**One backward pass.** The jaxpr is evaluated again under ``jax.grad`` with respect to
``(params, slots)`` (a zero ``[B]`` slot per covered leaf, whose gradient receives the
per-example squared norms); each covered operation is wrapped in a custom VJP. In the backward
pass it receives ``∂(mean loss)/∂(output)``, which times ``B`` (the loss is a mean) is the
per-example output gradient ``g``, and contracts it per example, where ``g`` appears, so no
per-example tensor outlives its operation:

* in the **direct** form (dense and conv kernels) and for broadcast parameters, the
  per-example parts (the per-example kernel gradients ``Σ_t x_t g_tᵀ``, one batched product;
  the per-example sums of ``g``) are computed once and give both the squared norms and the
  parameter's gradient (their sum over examples), in place of the plain step's
  weight-gradient product or reduction: the norms cost one pass over the parts;
* in the **Gram** form (and for gathers) the wrapper is an identity on the output (``_tap``):
  the parameter's gradient is the plain one and the norms come from the Gram matrices.

Squared norms are taken of parts (or ``g``) scaled by their maximum, so that squares of tiny
gradients (a loss scaled by 1e-20) do not underflow when the squared norm is representable.

**Which axis is the example axis** of each value: the jaxpr is traced at batch sizes ``B`` and
``B + 1``; an axis that changes from ``B`` to ``B + 1`` (the only one that changes) is the
example axis. Examples must not interact (the assumption of ``per_example`` itself).

**Per-example parts.** A leaf may reach these operations through example-free steps, any
function of the parameters alone (a transpose or a cast, a scale ``exp(log_scale)``, a
weight-standardized kernel, a relative-position bias table gathered by constant indices, and
of several leaves: weight normalization's ``g · v / |v|``, a merged low-rank update
``w + a @ b``), and may be read by several of them (tied input and output embeddings, a layer
called twice). Where the steps do not keep the norm, combine leaves, or the reads are
several, each read runs in the direct form and, wrapped in an identity with a custom VJP
(``_tap_parts``), adds its per-example parts ``[B, *operand]`` to the gradients of zero
``[B, *leaf]`` slots, carried back through the derivative of the steps at the parameters (a
``jax.jvp`` per example, whose transpose the backward pass applies): each slot's gradient is
its leaf's per-example gradients, cross terms included, squared once. The leaves' gradients
stay the plain ones, so each read's parts are extra work (about a weight-gradient product and
``B`` times the leaf's bytes).

**Fallback, per leaf.** A leaf is not covered when one of its reads with the example axis is
not such an operation: any other (a ``custom_jvp`` function such as ``jnp.logaddexp``, a
comparison of the parameter: ``jnp.remainder`` and ``jnp.hypot`` compare it), one whose
other operand has no example axis or contracts it, a term
without the example axis that multiplies the loss's data term, a read that computes its operand
together with a leaf that falls back, or a read inside a primitive the analysis does not enter
(a ``scan`` that reads it as a constant of every step, as a recurrent kernel, or has more than
:data:`MAX_UNROLL` steps, ``while``, ``cond``, ``custom_jvp`` and ``custom_vjp`` calls, whose
rules may differ from the primal's gradient; nested ``jit`` calls and ``jax.checkpoint`` regions
are inlined, and shorter scans over parameters unrolled: each layer of a stack reads its own
slice of the stacked leaves, and disjoint slices add their norms). Those leaves get
per-example gradients by ``jax.vmap`` restricted to them (chunked with ``chunk_size``); that
pass backpropagates per example through everything above the deepest such leaf.
:meth:`Plan.describe` names every fallback and why, and a :class:`FallbackWarning` says so
once per loss. A penalty *added* to the loss (an L2 term on the weights) is covered: it is
the same for every example, so its gradient ``r`` is added to each example's data gradient
``d_i``, and ``Σ|d_i + r|² = Σ|d_i|² + n·r·(2G - r)`` with ``G`` the mean gradient.

**Cost model.** For each covered operation the plan counts FLOPs and bytes of each form and of
the per-example gradient ``vmap`` would materialize, and picks the cheaper form at ``flops +
FLOPS_PER_BYTE[backend] · bytes``; :attr:`Plan.method` compares the fast path with ``vmap`` on
that model. :func:`select` (``per_example(method="auto")``) times once on the actual shapes and
device (:func:`calibrate`, cached in memory by the jaxpr and shapes) the fast path on the whole
batch, the fast path over equal example chunks in turn (:func:`chunk_counts`, :func:`chunked`:
``jax.lax.scan`` sums the chunks' sums; smaller products can run faster per example, and one
chunk's intermediates exist at a time; each again with the dense kernels whose two forms the
model puts within :data:`FORM_MARGIN` of each other in the direct form,
:func:`direct_where_close`), every leaf's sums estimated from :data:`CHUNK_COUNT` microbatch
gradients (the microbatch estimator's loop: unbiased, noisier, so its time is charged
:data:`MICROBATCH_PRICE`) and ``vmap``, and keeps the fastest. The model is the
prior: when it is clear (every leaf covered and the fast path at most :data:`CLEAR_MARGIN` of
``vmap``'s estimated cost) ``vmap`` is not timed, nor anything for a batch too small to
chunk. Apart from that, a convolution whose per-example intermediates would exceed
:data:`CHUNK_BYTES` for the whole batch (or chunk) computes its norms over example chunks in
turn (``jax.lax.map``), which bounds the extra memory.

Use it through :func:`gns.estimate.per_example` (``method="auto"`` or ``"ghost"``); this
module returns the local sums that :func:`gns.estimate.per_example` reduces.

References: Goodfellow, "Efficient per-example gradient computations" (2015); Li et al., "Large
language models can be strong differentially private learners" (2021, ghost clipping); Bu et
al., "Scalable and efficient training of large convolutional neural networks with differential
privacy" (2022, mixed ghost norm); Gray et al., "Normalization layer per-example gradients are
sufficient to predict gradient noise scale in transformers" (2024).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax import lax

from gns import common, hardware

PyTree = Any

__all__ = [
    "NotApplicableError",
    "FallbackWarning",
    "Plan",
    "plan",
    "select",
    "calibrate",
    "sums",
    "per_example_sq_norms",
    "AddPositionEmbedding",
    "FORMS",
    "FLOPS_PER_BYTE",
    "CHUNK_BYTES",
    "CLEAR_MARGIN",
    "FORM_MARGIN",
    "CHUNK_SIZES",
    "CHUNK_COUNT",
    "MAX_CHUNKS",
    "MAX_UNROLL",
    "MAX_SAVING",
    "MICROBATCH_PRICE",
    "chunk_counts",
    "chunked",
    "direct_where_close",
    "fastest",
]

FORMS = ("auto", "direct", "gram")

# A convolution's kernel norms (patches, Gram matrices or per-example kernel gradients) are
# computed over example chunks in turn (a rolled loop) when these intermediates would exceed
# this many bytes for the whole batch: it bounds the fast path's extra memory. Each turn of
# the loop costs time, fewer turns cost memory (2 CPU cores, interleaved, the whole batch
# against a plain step): SmallCNN 128 ran at 0.98-1.25x with 1.11x the memory at 4 MB, 0.92x
# with 1.30x at 12 MB, 0.94-1.04x with 1.29x at 24 MB; the ConvNeXt row at 1.01x with 1.07x at
# 4 and 12 MB, 1.07x with 1.19x at 24 MB; SmallCNN 512 needed 1.02x the memory at 12 MB, 1.17x
# at 24 MB.
CHUNK_BYTES = 12 * 2**20

# Rough machine balance (FLOPs one byte of memory traffic costs in time), by JAX backend: the
# cost model weighs the per-example intermediates' bytes against FLOPs with it. Only the
# order of magnitude matters (it decides between forms whose costs differ severalfold).
FLOPS_PER_BYTE = {"cpu": 8.0, "gpu": 100.0, "tpu": 200.0}

# select(method="auto") trusts the FLOP model without timing when every leaf is covered and
# the fast path's estimated extra cost is at most this fraction of vmap's; otherwise it times
# both paths once (calibrate).
CLEAR_MARGIN = 0.25

# In a loop over example chunks, a dense kernel's direct form is timed against its Gram form
# (calibrate) where the cost model puts the two within this factor: on 2 CPU cores the direct
# form of the Transformer's 128 -> 512 layers (model: 1.14x the Gram form's cost) ran the fast
# path in 4 or 8 chunks 1.1-1.2x faster.
FORM_MARGIN = 2.0

# select(method="auto") also times the fast path over equal example chunks (a scan): chunks of
# these many examples, and batch / CHUNK_COUNT (the microbatch estimator's default count), at
# most MAX_CHUNKS chunks. Smaller products can run faster per example (on CPUs, the caches).
CHUNK_SIZES = (32,)
CHUNK_COUNT = 8
MAX_CHUNKS = 16

# calibrate(uses=...): no candidate saves more than this fraction of the fast path's time on
# the whole batch per step (on the bench rows the most was 47%: the SmallCNN at batch 512
# from microbatches), so the other candidates are timed only when that much over ``uses`` steps
# would pay for compiling and timing them.
MAX_SAVING = 0.5

# calibrate charges a candidate whose sums come from microbatches (unbiased, but noisier in
# tr(Σ)) this factor on its time: over 80 batches each, the relative variance of B_simple from
# 8 microbatches was 1.02-1.13x that from the per-example norms of the same batches (SmallCNN at
# 128 1.02 and 512 1.13, MLP at 128 1.12, Transformer LM at 32 1.08 and 128 1.02; the variance
# of tr(Σ) alone 1.0-14x, of |G|² 1.02-1.12x; docs/estimator_precision.py), so it needs about
# that many more steps for the same precision. 1.05, inside that range, is also the most that
# `auto` may cost over the microbatch estimator where that one is faster. Set it to math.inf
# for the per-example statistics only (equal to vmap's to rounding).
MICROBATCH_PRICE = 1.05

# How much slower than the plain step's one large weight-gradient product ``vmap``'s batch of
# per-example products runs, as extra multiples of its FLOPs (2 CPU cores, ``make bench``).
_VMAP_SLOWDOWN = {"conv": 4.0, "dense": 1.0}

# Primitives whose inner jaxpr is inlined: plain function calls, and ``jax.checkpoint``
# (``nn.remat``) regions, whose gradient is the plain one (the fast path then keeps their
# activations instead of recomputing them). Every other primitive with an inner jaxpr is
# evaluated as it is (a parameter reaching it falls back).
_INLINE = ("pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint")

# A ``scan`` over parameters (layers stacked along a leading axis, ``nn.scan``) is unrolled
# when it has at most this many steps (nested scans: this many copies of the inner body in
# all): its reads become reads of slices of the stacked leaves, whose per-example norms add
# up. A longer scan, or one that reads parameters only as constants, is evaluated as it is.
MAX_UNROLL = 64

# Unary steps from a parameter that keep its gradient's norm (J·Jᵀ = I): the parameter
# reaches its consumer through any number of them.
_ISOMETRIC = (
    "convert_element_type",
    "reshape",
    "transpose",
    "squeeze",
    "slice",
    "dynamic_slice",
    "copy",
    "copy_p",
    "neg",
    "rev",
    "reduce_precision",
    "pvary",
    "pcast",
    "optimization_barrier",
)


class NotApplicableError(ValueError):
    """The fast path cannot cover any parameter of this ``loss_fn``."""


class AddPositionEmbedding(nn.Module):
    """``x + embedding[:T]``: a learned position embedding as a module.

    The same computation as ``x + self.param("pos", init, (max_length, features))[:T]``; both
    are covered by :mod:`gns.ghost` (a parameter broadcast over the example axis).

    Attributes:
      max_length: number of positions (rows of the embedding); inputs may be shorter.
      embedding_init: initializer of the ``[max_length, features]`` parameter ``embedding``.
      param_dtype: its dtype.

    Example:
      >>> pos = AddPositionEmbedding(max_length=16)
      >>> x = jnp.zeros((2, 8, 4))
      >>> params = pos.init(jax.random.key(0), x)["params"]
      >>> params["embedding"].shape, pos.apply({"params": params}, x).shape
      ((16, 4), (2, 8, 4))
    """

    max_length: int
    embedding_init: Callable = nn.initializers.normal(stddev=0.02)
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 3 or x.shape[1] > self.max_length:
            raise ValueError(
                f"AddPositionEmbedding(max_length={self.max_length}) needs inputs [batch, length, "
                f"features] with length <= max_length, got shape {tuple(x.shape)}: raise "
                "max_length or reshape the input."
            )
        shape = (self.max_length, x.shape[-1])
        embedding = self.param("embedding", self.embedding_init, shape, self.param_dtype)
        return x + embedding[None, : x.shape[1]].astype(x.dtype)


def _prod(values) -> int:
    return functools.reduce(lambda a, b: a * int(b), values, 1)


# ---------------------------------------------------------------------------------------------
# The loss as one flat list of primitive applications.


@dataclasses.dataclass(frozen=True)
class _Lit:
    """A literal (or constant) operand."""

    value: Any


@dataclasses.dataclass(frozen=True)
class _Eqn:
    primitive: Any
    params: dict
    ins: tuple  # operand keys (int) or _Lit
    outs: tuple[int, ...]


@dataclasses.dataclass
class _Flat:
    """``loss_fn``'s jaxpr with nested calls inlined; values are integer keys."""

    eqns: list[_Eqn]
    invars: list[int]
    outvars: list
    shapes: dict[int, tuple[int, ...]]
    dtypes: dict[int, Any]
    consts: dict[int, Any]
    out_tree: Any

    @property
    def signature(self) -> tuple:
        return tuple(e.primitive.name for e in self.eqns)

    def producers(self) -> dict[int, int]:
        """The equation (index) that computes each key."""
        return {o: i for i, e in enumerate(self.eqns) for o in e.outs}


def _trace(loss_fn, params, batch) -> _Flat:
    """Trace ``loss_fn(params, batch)`` (arrays, tracers or shape structs) to a :class:`_Flat`:
    calls inlined (:data:`_INLINE`), and short scans over parameters unrolled
    (:data:`MAX_UNROLL`, :func:`_over_stacked`)."""
    closed, shape = jax.make_jaxpr(loss_fn, return_shape=True)(params, batch)
    keys = itertools.count()
    flat = _Flat([], [], [], {}, {}, {}, jax.tree.structure(shape))
    weights: set[int] = set()  # the keys computed from the parameters alone (and constants)

    def new(var) -> int:
        k = next(keys)
        flat.shapes[k] = tuple(getattr(var.aval, "shape", ()))
        flat.dtypes[k] = getattr(var.aval, "dtype", None)
        return k

    def bind_consts(jaxpr, consts, env):
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = k = new(v)
            flat.consts[k] = c

    def inline(closed_jaxpr, ins, budget: int) -> list:
        inner = getattr(closed_jaxpr, "jaxpr", closed_jaxpr)
        sub = dict(zip(inner.invars, ins, strict=True))
        bind_consts(inner, getattr(closed_jaxpr, "consts", ()), sub)
        return walk(inner, sub, budget)

    def emit(fn, ins) -> list:  # the equations of fn (jnp code) applied to keys or literals
        avals = [
            a.value if isinstance(a, _Lit) else jax.ShapeDtypeStruct(flat.shapes[a], flat.dtypes[a])
            for a in ins
        ]
        return inline(jax.make_jaxpr(fn)(*avals), ins, 1)

    def unrolled(p, ins, budget: int) -> list:  # budget: the copies of a body left to make
        nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
        consts, carry, xs = ins[:nc], list(ins[nc : nc + nk]), ins[nc + nk :]
        ys = {}
        for i in reversed(range(length)) if p["reverse"] else range(length):
            x_i = [emit(lambda x, i=i: lax.index_in_dim(x, i, keepdims=False), [x])[0] for x in xs]
            outs = inline(p["jaxpr"], [*consts, *carry, *x_i], budget // length)
            carry, ys[i] = outs[:nk], outs[nk:]
        stacked = zip(*(ys[i] for i in range(length)), strict=True)
        return [*carry, *(emit(lambda *y: jnp.stack(y), list(y))[0] for y in stacked)]

    def walk(jaxpr, env, budget: int):
        def read(a):
            return _Lit(a.val) if isinstance(a, jax.extend.core.Literal) else env[a]

        for eqn in jaxpr.eqns:
            ins = tuple(read(a) for a in eqn.invars)
            name, p = eqn.primitive.name, eqn.params
            if name == "scan" and _over_stacked(p, ins, weights) and p["length"] <= budget:
                env.update(zip(eqn.outvars, unrolled(p, list(ins), budget), strict=True))
                continue
            if name in _INLINE:
                body = p.get("jaxpr", p.get("call_jaxpr"))
                env.update(zip(eqn.outvars, inline(body, ins, budget), strict=True))
                continue
            outs = tuple(new(v) for v in eqn.outvars)
            operands = [a for a in ins if isinstance(a, int) and a not in flat.consts]
            if operands and all(a in weights for a in operands):
                weights.update(outs)
            env.update(zip(eqn.outvars, outs, strict=True))
            flat.eqns.append(_Eqn(eqn.primitive, dict(p), ins, outs))
        return [read(a) for a in jaxpr.outvars]

    env: dict = {}
    bind_consts(closed.jaxpr, closed.consts, env)
    for v in closed.jaxpr.invars:
        env[v] = k = new(v)
        flat.invars.append(k)
    weights.update(flat.invars[: len(jax.tree.leaves(params))])
    flat.outvars = walk(closed.jaxpr, env, MAX_UNROLL)
    return flat


def _over_stacked(params: dict, ins, weights: set) -> bool:
    """Whether a ``scan`` (its ``params`` and operands ``ins``) steps over values computed
    from the parameters (``xs``: layers stacked along a leading axis), which unrolling turns
    into reads of disjoint slices. A scan that reads them only as constants (a recurrent
    kernel at every step) is left rolled: unrolled, every step's read would add per-example
    parts, no cheaper than ``vmap``, at the cost of compiling every step."""
    xs = ins[params["num_consts"] + params["num_carry"] :]
    return any(isinstance(a, int) and a in weights for a in xs)


def _run(flat: _Flat, args, hook=None) -> list:
    """Evaluate ``flat`` on ``args``; ``hook(i, operands, outputs)`` may replace the outputs
    of equation ``i``."""
    env = dict(flat.consts)
    env.update(zip(flat.invars, args, strict=True))

    def read(a):
        return a.value if isinstance(a, _Lit) else env[a]

    for i, e in enumerate(flat.eqns):
        vals = [read(a) for a in e.ins]
        out = _bind(e, vals)
        if hook is not None:
            out = hook(i, vals, out)
        env.update(zip(e.outs, out, strict=True))
    return [read(a) for a in flat.outvars]


def _replay(flat: _Flat, eqns, env: dict, seen: dict | None = None) -> dict:
    """``env`` (key -> value) with the outputs of equations ``eqns`` of ``flat``, evaluated in
    order; an operand missing from ``env`` takes its value in ``seen[i]`` (the operands of
    equation ``i`` as they were evaluated)."""
    for i in eqns:
        e = flat.eqns[i]
        vals = [
            a.value if isinstance(a, _Lit) else env[a] if a in env else seen[i][p]
            for p, a in enumerate(e.ins)
        ]
        env.update(zip(e.outs, _bind(e, vals), strict=True))
    return env


def _bind(e: _Eqn, vals) -> list:
    """The outputs of equation ``e`` applied to ``vals`` (a list)."""
    bind_params = e.primitive.get_bind_params(e.params)
    subfuns = ()
    if isinstance(bind_params, tuple):  # (subfuns, params) in older JAX versions
        subfuns, bind_params = bind_params
    out = e.primitive.bind(*subfuns, *vals, **bind_params)
    return list(out) if e.primitive.multiple_results else [out]


def _live(flat: _Flat) -> list[bool]:
    """Which equations are live (their outputs reach the outputs of ``loss_fn``)."""
    live_keys = {a for a in flat.outvars if isinstance(a, int)}
    live = [False] * len(flat.eqns)
    for i in range(len(flat.eqns) - 1, -1, -1):
        e = flat.eqns[i]
        if any(o in live_keys for o in e.outs) or getattr(e.primitive, "effects", None):
            live[i] = True
            live_keys.update(a for a in e.ins if isinstance(a, int))
    return live


def _example_axes(flat: _Flat, alt: _Flat, n: int) -> dict[int, int | None]:
    """The example axis of every value: the one axis of size ``n`` that is ``n + 1`` in the
    trace at ``n + 1`` examples; ``None`` when no axis changes; ``-1`` when the change is not
    one such axis (a flattened or reduced example axis)."""
    axes: dict[int, int | None] = {}
    for k, shape in flat.shapes.items():
        other = alt.shapes[k]
        changed = [d for d, (a, b) in enumerate(zip(shape, other, strict=True)) if a != b]
        if not changed:
            axes[k] = None
        elif len(changed) == 1 and shape[changed[0]] == n and other[changed[0]] == n + 1:
            axes[k] = changed[0]
        else:
            axes[k] = -1
    return axes


# ---------------------------------------------------------------------------------------------
# The consumers of the parameters.


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a ``dot_general``'s batched operand and output gradient map to ``[B·S, T, K]`` and
    ``[B·S, T, C]``: transpose by ``x_perm``/``g_perm``, then reshape; and how a gradient
    ``[S, K, C]`` maps back to the parameter's layout: reshape to ``w_shape``, then transpose
    by the inverse of ``w_perm``."""

    x_perm: tuple[int, ...]
    g_perm: tuple[int, ...]
    w_perm: tuple[int, ...]
    w_shape: tuple[int, ...]
    s: int
    t: int
    k: int
    c: int


@dataclasses.dataclass(frozen=True)
class _Consumer:
    """The one operation reading a covered leaf, static description (no arrays).

    ``kind``: ``"dense"`` (``dot_general``), ``"conv"``, ``"embed"`` (``gather``) or
    ``"sum"`` (a broadcast ``add``/``sub``/``mul``/``broadcast_in_dim`` or another elementwise
    binary primitive of :data:`_ELEMENTWISE`: the gradient is the output gradient, times the
    operand for ``mul`` or the output's derivative by the parameter for the others
    (:func:`_batched_operand`), summed over ``sum_axes``).
    """

    kind: str
    leaf: int
    eqn: int  # index in the flat jaxpr
    primitive: str
    pos: int  # operand index of the parameter
    # operand index of the batched operand the norm needs (None: none; _ELEMENTWISE: both)
    x_pos: int | None
    out_shape: tuple[int, ...]
    axis: int  # the example axis of the output
    layout: _Layout | None = None  # dense
    # conv: (x_perm, g_perm, kernel_size, strides, padding, dilation, input dilation)
    conv: tuple | None = None
    w_perm: tuple[int, ...] = ()  # conv: kernel [*window, in, out] to the kernel's layout
    groups: int = 1  # conv: feature groups (depthwise: one per input channel)
    vocab: int = 0  # embed: rows of the table
    clip: bool = False  # embed: out-of-range tokens are clamped (else they count for nothing)
    sum_axes: tuple[int, ...] = ()  # sum: the broadcast axes of the output
    form: str = "direct"
    # ((form, flops, bytes), ...) for the whole batch: the forms, and "vmap" (what per-example
    # gradients of this leaf cost on top of the shared backward pass).
    costs: tuple[tuple[str, float, float], ...] = ()
    chunks: int = 1  # the kernel norms computed over this many example chunks, in turn
    # the example-free equations (indices, in order) that compute operand ``pos`` from the leaf
    chain: tuple[int, ...] = ()
    # the leaf's per-example gradient is assembled from per-example parts in a [B, *leaf] slot:
    # it has several reads (tied weights), or this read is through steps that do not keep the
    # norm (``via``: their primitives)
    parts: bool = False
    via: tuple[str, ...] = ()
    others: tuple[int, ...] = ()  # further leaves the chain computes the operand from
    # the box ``(starts, limits)`` of the leaf that this read's operand holds, through static
    # slices (a layer of stacked ones); reads of disjoint boxes add their norms (no parts)
    region: tuple[tuple[int, ...], tuple[int, ...]] | None = None


# Why an example axis is usually not clean (the axis of examples merged with another).
_MERGED = " (e.g. a reshape that merges it with another)"


def _dense_consumer(e: _Eqn, pos: int, shapes, axes) -> tuple[dict | None, str]:
    """A ``dot_general`` with the parameter at operand ``pos``: its layout, or why not."""
    xk = e.ins[1 - pos]
    bx = axes.get(xk) if isinstance(xk, int) else None
    if bx is None or bx < 0:
        return None, "dot_general with an operand without a clean example axis" + _MERGED
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    xc, xb = (lc, lb) if pos == 1 else (rc, rb)
    vc, vb = (rc, rb) if pos == 1 else (lc, lb)
    if bx in xc:
        return None, "dot_general contracts the example axis"
    xshape, vshape = shapes[xk], shapes[e.ins[pos]]
    x_free = [d for d in range(len(xshape)) if d not in xc and d not in xb]
    v_free = [d for d in range(len(vshape)) if d not in vc and d not in vb]
    nb = len(lb)
    x_out0 = nb if pos == 1 else nb + len(v_free)  # where the operand's free axes start
    v_out0 = nb + len(x_free) if pos == 1 else nb
    t_dims = [d for d in x_free if d != bx]
    layout = _Layout(
        x_perm=(bx, *xb, *t_dims, *xc),
        g_perm=(
            x_out0 + x_free.index(bx),
            *range(nb),
            *(x_out0 + x_free.index(d) for d in t_dims),
            *(v_out0 + i for i in range(len(v_free))),
        ),
        w_perm=(*vb, *vc, *v_free),
        w_shape=tuple(vshape[d] for d in (*vb, *vc, *v_free)),
        s=_prod(xshape[d] for d in xb),
        t=_prod(xshape[d] for d in t_dims),
        k=_prod(xshape[d] for d in xc),
        c=_prod(vshape[d] for d in v_free),
    )
    return {"kind": "dense", "x_pos": 1 - pos, "layout": layout, "axis": layout.g_perm[0]}, ""


def _conv_consumer(e: _Eqn, pos: int, shapes, axes) -> tuple[dict | None, str]:
    """A ``conv_general_dilated`` with the parameter as the kernel: its configuration."""
    p = e.params
    if pos != 1:
        return None, "conv_general_dilated with the parameter as its input"
    if p["batch_group_count"] != 1:
        return None, "batch-grouped convolution"
    lhs, rhs, out = p["dimension_numbers"]
    xk = e.ins[0]
    if not isinstance(xk, int) or axes.get(xk) != lhs[0]:
        return None, "convolution input whose batch dimension is not the example axis"
    kshape = shapes[e.ins[1]]
    conv = (
        (lhs[0], *lhs[2:], lhs[1]),
        (out[0], *out[2:], out[1]),
        tuple(kshape[d] for d in rhs[2:]),
        tuple(p["window_strides"]),
        tuple(tuple(pad) for pad in p["padding"]),
        tuple(p["rhs_dilation"]),
        tuple(p["lhs_dilation"]),
    )
    w_perm = tuple(np.argsort((*rhs[2:], rhs[1], rhs[0])))  # [*window, in, out] -> kernel
    groups = p["feature_group_count"]
    fields = {"kind": "conv", "x_pos": 0, "conv": conv, "w_perm": w_perm, "axis": out[0]}
    return fields | {"groups": groups}, ""


def _embed_consumer(e: _Eqn, pos: int, shapes, axes) -> tuple[dict | None, str]:
    """A ``gather`` of whole rows of a ``[vocab, D]`` table by batched indices."""
    dn, vshape = e.params["dimension_numbers"], shapes[e.ins[0]]
    ik = e.ins[1]
    bx = axes.get(ik) if isinstance(ik, int) else None
    out_rank = len(shapes[e.outs[0]])
    rows = (
        pos == 0
        and len(vshape) == 2
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(dn.operand_batching_dims)
        and tuple(e.params["slice_sizes"]) == (1, vshape[1])
        and tuple(dn.offset_dims) == (out_rank - 1,)
        and shapes[ik][-1:] == (1,)
    )
    if not rows:
        return None, "gather that is not a row lookup of a 2-D table"
    if bx is None or bx < 0 or bx == len(shapes[ik]) - 1:
        return None, "gather indices without a clean example axis" + _MERGED
    # CLIP clamps the ids in both passes; FILL_OR_DROP and PROMISE_IN_BOUNDS (`table[ids]`, whose
    # forward clamps on CPU and GPU) drop an id off the table from the gradient: so do the norms.
    clip = "CLIP" in str(e.params.get("mode", "")).upper()
    return {"kind": "embed", "x_pos": 1, "vocab": vshape[0], "clip": clip, "axis": bx}, ""


def _sum_consumer(e: _Eqn, pos: int, shapes, axes) -> tuple[dict | None, str]:
    """The parameter broadcast against a batched operand (``add``/``sub``/``mul`` or another
    elementwise binary primitive of :data:`_ELEMENTWISE`) or to the example axis
    (``broadcast_in_dim``, or ``tile`` along axes of size 1): the axes its gradient sums
    over."""
    out = e.outs[0]
    bo = axes.get(out)
    if bo is None or bo < 0:
        return None, f"{e.primitive.name} whose output has no clean example axis" + _MERGED
    oshape, vshape = shapes[out], shapes[e.ins[pos]]
    if e.primitive.name == "tile" and any(
        r > 1 and size > 1 for r, size in zip(e.params["reps"], vshape, strict=True)
    ):
        return None, "tile that repeats the parameter along an axis longer than 1"
    if e.primitive.name in ("broadcast_in_dim", "tile"):  # tile: a broadcast of unit axes
        dims = tuple(e.params.get("broadcast_dimensions", range(len(vshape))))
        kept = {d for d, size in zip(dims, vshape, strict=True) if size == oshape[d]}
        sum_axes = tuple(d for d in range(len(oshape)) if d not in kept and d != bo)
        return {"kind": "sum", "x_pos": None, "sum_axes": sum_axes, "axis": bo}, ""
    if vshape and len(vshape) != len(oshape):
        return None, f"{e.primitive.name} broadcasting across ranks"
    sum_axes = tuple(
        d for d in range(len(oshape)) if d != bo and (not vshape or vshape[d] != oshape[d])
    )
    x_pos = 1 - pos if e.primitive.name == "mul" or e.primitive.name in _ELEMENTWISE else None
    return {"kind": "sum", "x_pos": x_pos, "sum_axes": sum_axes, "axis": bo}, ""


# Elementwise binary primitives with a real output whose derivative by either operand JAX
# defines pointwise (its JVP rule multiplies the tangent by a factor): one example's gradient
# of the parameter operand is the output gradient times that factor (:func:`_derivative`),
# summed over the broadcast axes, as for ``mul``'s other operand. Not ``nextafter`` and
# ``zeta`` (no JVP rule; ``jax.scipy.special.zeta`` is a ``custom_jvp`` function),
# ``polygamma`` (none by its order, the operand a parameter would take beside the examples),
# ``complex`` (a complex output), nor comparisons and bitwise operations (boolean or integer
# outputs).
_ELEMENTWISE = ("div", "pow", "max", "min", "atan2", "rem", "igamma", "igammac")

_CONSUMERS = {
    "dot_general": _dense_consumer,
    "conv_general_dilated": _conv_consumer,
    "gather": _embed_consumer,
    "add": _sum_consumer,
    "sub": _sum_consumer,
    "mul": _sum_consumer,
    "broadcast_in_dim": _sum_consumer,
    "tile": _sum_consumer,
} | dict.fromkeys(_ELEMENTWISE, _sum_consumer)


def _step(e: _Eqn, pos: int, flat: _Flat, axes) -> tuple[str, dict | None, str]:
    """What equation ``e`` does with the parameter-derived operand ``pos``: ``("iso", None,
    "")`` (an example-free step that keeps the gradient's norm) or ``("chain", None, "")``
    (any other example-free step with one floating output: follow its output),
    ``("consumer", fields, "")`` or ``("fallback", None, reason)``."""
    name, shapes = e.primitive.name, flat.shapes
    out_batched = any(axes.get(o) is not None for o in e.outs)
    if not out_batched:
        iso = name in _ISOMETRIC or (
            name == "broadcast_in_dim" and _prod(shapes[e.outs[0]]) == _prod(shapes[e.ins[pos]])
        )
        if len(e.outs) != 1 or not jnp.issubdtype(flat.dtypes[e.outs[0]], jnp.inexact):
            return "fallback", None, f"{name} of the parameter to several or integer outputs"
        if name.startswith("custom_vjp"):  # its parts are carried back by forward mode
            return "fallback", None, f"read through {name}, a rule with no forward mode"
        return ("iso" if iso and pos == 0 else "chain"), None, ""
    if name == "scan":
        why = f"read inside a scan as a constant of every step, or of over {MAX_UNROLL} steps"
        return "fallback", None, why
    if _inner_jaxpr(e):
        return "fallback", None, f"read inside {name}, which is not entered"
    if name not in _CONSUMERS:
        return (
            "fallback",
            None,
            f"read by {name} beside the examples, not one of the operations the fast path knows",
        )
    if name in _ELEMENTWISE and not jnp.issubdtype(flat.dtypes[e.outs[0]], jnp.floating):
        return "fallback", None, f"{name} with a complex or integer output"
    fields, reason = _CONSUMERS[name](e, pos, shapes, axes)
    return ("consumer", fields, "") if fields else ("fallback", None, reason)


def _inner_jaxpr(e: _Eqn) -> bool:
    """Whether equation ``e`` runs an inner jaxpr (``scan``, ``cond``, a custom rule)."""
    kinds = (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)
    return any(
        isinstance(v, kinds) or (isinstance(v, tuple) and any(isinstance(b, kinds) for b in v))
        for v in e.params.values()
    )


def _find_consumers(flat: _Flat, axes, num_params: int):
    """``(consumers by leaf, fallback reasons by leaf, penalties)`` of the first
    ``num_params`` inputs; ``penalties``: the loss's terms without the batch that the leaves
    reach (``(key, coefficient)``, :func:`_loss_terms`).

    A leaf reaches its consumers through example-free steps (``chain``): a transpose or a
    cast, or any other function of the parameters alone (a scale ``exp(log_scale)``, a
    standardized kernel, a bias table gathered by relative positions, ``g · v / |v|`` of two
    leaves: the consumer's ``others``). Its per-example gradient is assembled from per-example
    parts (``parts``) when it has several consumers (tied weights: the sum of theirs) or a
    step that does not keep the norm (mapped back through it)."""
    live = _live(flat)
    # key -> (the leaves it is computed from, the example-free chain, the chain's primitives,
    # the box of the leaf it holds: _region_after)
    source = {
        flat.invars[j]: ((j,), (), (), _whole(flat.shapes[flat.invars[j]]))
        for j in range(num_params)
    }
    found: dict[int, list[_Consumer]] = {}
    reasons: dict[int, str] = {}
    for i, e in enumerate(flat.eqns):
        refs = [(p, *source[a]) for p, a in enumerate(e.ins) if isinstance(a, int) and a in source]
        if not live[i] or not refs:
            continue
        pos, js = refs[0][0], tuple(sorted({j for r in refs for j in r[1]}))
        chain = tuple(sorted({k for r in refs for k in r[2]}))
        via = tuple(name for r in refs for name in r[3])
        region = refs[0][4] if len(refs) == 1 else None
        what, fields, reason = _step(e, pos, flat, axes)
        if what in ("iso", "chain"):
            more = (e.primitive.name,) if what == "chain" or len(refs) > 1 else ()
            after = _region_after(e, region) if what == "iso" else None
            source[e.outs[0]] = (js, (*chain, i), tuple(dict.fromkeys((*via, *more))), after)
        elif what == "consumer" and len(refs) == 1:
            c = _Consumer(
                leaf=js[0],
                eqn=i,
                primitive=e.primitive.name,
                pos=pos,
                out_shape=flat.shapes[e.outs[0]],
                chain=chain,
                via=via,
                others=js[1:],
                region=region[:2] if region else None,
                **fields,
            )
            found.setdefault(js[0], []).append(c)
        else:
            why = reason
            if len(refs) > 1:  # one leaf twice (w * w), or several read together (a scan's)
                twice = f"{e.primitive.name} reads it twice"
                why = twice if len(js) == 1 else reason or f"{e.primitive.name} reads them together"
            reasons.update({j: reasons.get(j, why) for j in js})
    penalties, data_terms = _loss_terms(flat, num_params)
    for key in data_terms:  # a data term of the loss with a parameter outside a covered read
        why = "multiplies the loss's data term without the example axis (not a sum of terms)"
        reasons.update({j: reasons.get(j, why) for j in source.get(key, ((),))[0]})
    penalties = tuple((key, coef) for key, coef in penalties if key in source)
    return _without_fallback(found, reasons), reasons, penalties


def _loss_terms(flat: _Flat, num_params: int) -> tuple[list, list]:
    """The loss (``flat``'s first output) as a sum of terms: ``(penalties, data_terms)``, the
    terms without the batch (``(key, coefficient)``: weight penalties) and those with it.
    Sums, differences and scalings by constants are split; any other operation is a term."""
    batch, producer = set(flat.invars[num_params:]), flat.producers()
    for e in flat.eqns:
        if any(isinstance(a, int) and a in batch for a in e.ins):
            batch.update(e.outs)
    penalties, data_terms = [], []

    def scalar(a):  # a constant scalar operand's value, else None
        value = a.value if isinstance(a, _Lit) else flat.consts.get(a)
        return float(value) if value is not None and np.ndim(value) == 0 else None

    def visit(a, coef):
        if isinstance(a, _Lit) or a in flat.consts:  # a constant term: no gradient
            return
        if a not in batch:
            penalties.append((a, coef))
            return
        e = flat.eqns[producer[a]] if a in producer else None
        name = e.primitive.name if e else ""
        factors = [scalar(b) for b in e.ins] if e else []
        if name in ("add", "sub", "add_any"):
            visit(e.ins[0], coef)
            visit(e.ins[1], -coef if name == "sub" else coef)
        elif name in ("neg", "convert_element_type", "copy", "pvary"):
            visit(e.ins[0], -coef if name == "neg" else coef)
        elif name == "mul" and any(f is not None for f in factors):
            k = 1 if factors[0] is not None else 0
            visit(e.ins[k], coef * factors[1 - k])
        elif name == "div" and factors[1] is not None:
            visit(e.ins[0], coef / factors[1])
        else:
            data_terms.append(a)

    if flat.outvars:
        visit(flat.outvars[0], 1.0)
    return penalties, data_terms


def _penalized(flat: _Flat, penalties, eqns, num_params: int, reasons) -> tuple[int, ...]:
    """The leaves (not falling back) that the penalty terms read."""
    read = {a for i in eqns for a in flat.eqns[i].ins if isinstance(a, int)}
    read |= {key for key, _ in penalties}
    return tuple(j for j in range(num_params) if flat.invars[j] in read and j not in reasons)


def _penalty_eqns(flat: _Flat, keys) -> tuple[int, ...]:
    """The equations (in order) that compute ``keys`` from the parameters and constants."""
    producer = flat.producers()
    needed, todo = set(), [k for k in keys if k in producer]
    while todo:
        i = producer[todo.pop()]
        if i not in needed:
            needed.add(i)
            todo += [a for a in flat.eqns[i].ins if isinstance(a, int) and a in producer]
    return tuple(sorted(needed))


def _whole(shape) -> tuple:
    """The region of a whole leaf: ``(starts, limits, axes)``, ``axes`` the leaf's axis of
    each axis of the value (``None``: the value is laid out otherwise)."""
    return (0,) * len(shape), tuple(shape), tuple(range(len(shape)))


# Steps that keep a value's elements where they are (a slice after them still narrows the box).
_IN_PLACE = ("convert_element_type", "copy", "copy_p", "reduce_precision", "pvary", "pcast")


def _region_after(e: _Eqn, region):
    """The region of the leaf that the output of the norm-keeping step ``e`` holds: a static
    ``slice`` of a value laid out as (part of) its leaf narrows the box, and ``squeeze`` drops
    axes of one element; steps in :data:`_IN_PLACE` change nothing; others keep the elements
    in another layout. ``None``: not known (a dynamic slice, strides)."""
    name = e.primitive.name
    if region is None or name == "dynamic_slice":
        return None
    starts, limits, axes = region
    if axes is None or name not in ("slice", "squeeze", *_IN_PLACE):
        return None if name == "slice" else (starts, limits, None)
    if name == "squeeze":
        dropped = e.params["dimensions"]
        return starts, limits, tuple(a for d, a in enumerate(axes) if d not in dropped)
    if name in _IN_PLACE:
        return region
    if any(k != 1 for k in e.params.get("strides") or ()):
        return None
    lo, hi = list(starts), list(limits)
    for d, a in enumerate(axes):
        lo[a] = starts[a] + e.params["start_indices"][d]
        hi[a] = starts[a] + e.params["limit_indices"][d]
    return tuple(lo), tuple(hi), axes


def _box_size(region) -> int:
    return _prod(np.subtract(region[1], region[0]))


def _disjoint(consumers) -> bool:
    """Whether the reads cover pairwise disjoint boxes of their leaf (their norms add up)."""
    boxes = [c.region for c in consumers]
    if any(b is None for b in boxes):
        return False
    return all(
        any(hi_a <= lo_b or hi_b <= lo_a for lo_a, hi_a, lo_b, hi_b in zip(*a, *b, strict=True))
        for a, b in itertools.combinations(boxes, 2)
    )


def _without_fallback(found: dict, reasons: dict) -> dict:
    """``found`` without the consumers of leaves in ``reasons``; a leaf whose read computes
    its operand together with such a leaf (``others``) falls back with it, named in
    ``reasons`` (its per-example parts would be incomplete)."""
    while True:
        bad = [c for cs in found.values() for c in cs if {c.leaf, *c.others} & set(reasons)]
        new = {j for c in bad for j in (c.leaf, *c.others)} - set(reasons)
        if not new:
            return {j: cs for j, cs in found.items() if j not in reasons}
        reasons.update({j: "read together with a parameter that falls back" for j in new})


# ---------------------------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which leaves the fast path covers (and by which operation), and which fall back.

    Attributes:
      consumers: the covered leaves' consuming operations, in jaxpr order.
      fallback: flat indices (in ``jax.tree.leaves(params)`` order) of the leaves whose
        per-example norms come from ``jax.vmap``.
      reasons: ``(leaf index, why it falls back)`` for each fallback leaf.
      num_leaves: number of leaves of ``params``.
      leaf_names: the leaves' paths (for :meth:`describe`).
      leaf_sizes: the leaves' sizes.
      batch_size: the (local) batch size planned for.
      flops_per_byte: the machine balance of the cost model.
      signature: the primitives of the traced jaxpr (a trace for :func:`sums` must match).
      num_chunks: :func:`sums` splits the batch into this many equal example chunks and runs
        the plan (made at the chunk's size: ``batch_size`` is the chunk's) on each in turn.
      decision: how :func:`calibrate` chose this plan (its timings); empty when not timed.
      fallback_microbatches: when ``> 0``, the fallback leaves' sums of per-example squared
        norms are estimated (unbiased, noisier) from this many microbatch gradients instead of
        per-example gradients by ``vmap`` (:func:`calibrate` picks it when faster); with no
        ``consumers``, every leaf's is (the microbatch estimator's loop).
      penalties, penalty_eqns, penalized: the terms of the loss without the batch (weight
        penalties, ``(key, coefficient)``), the equations computing them, and the leaves
        they read: each example's gradient of those leaves also holds the penalty's.
    """

    consumers: tuple[_Consumer, ...]
    fallback: tuple[int, ...]
    reasons: tuple[tuple[int, str], ...]
    num_leaves: int
    leaf_names: tuple[str, ...] = ()
    leaf_sizes: tuple[int, ...] = ()
    batch_size: int = 0
    flops_per_byte: float = FLOPS_PER_BYTE["cpu"]
    signature: tuple = ()
    num_chunks: int = 1
    decision: str = ""
    # the loss's terms without the batch (weight penalties): (key, coefficient), and the
    # equations that compute them from the parameters
    penalties: tuple[tuple[int, float], ...] = ()
    penalty_eqns: tuple[int, ...] = ()
    penalized: tuple[int, ...] = ()  # the covered leaves that the penalty terms read
    fallback_microbatches: int = 0  # > 0: the fallback leaves' sums from as many microbatches

    def cost(self, method: str) -> float:
        """Estimated extra cost (FLOP-equivalents, bytes weighted by ``flops_per_byte``) of
        ``method`` (``"ghost"`` or ``"vmap"``) over one plain backward pass.

        ``"vmap"``: the per-example gradients of every leaf (written once, read for the sum and
        for the squared norm), and the extra time of the per-example weight-gradient products
        of the covered operations. ``"ghost"``: each covered operation in its chosen form,
        plus, when leaves fall back, a ``vmap`` pass (a forward and an input-gradient pass
        again, per example, and the fallback leaves' per-example gradients).
        """
        w, n = self.flops_per_byte, self.batch_size
        if method == "vmap":
            slow = sum(fl for c in self.consumers for f, fl, _ in c.costs if f == "vmap")
            return 12.0 * n * sum(self.leaf_sizes) * w + slow
        if method != "ghost":
            raise ValueError(f"method must be 'ghost' or 'vmap', got {method!r}.")
        total = sum(fl + w * b for c in self.consumers for f, fl, b in c.costs if f == c.form)
        if self.fallback:
            total += sum(_backward_flops(c, self.leaf_sizes[c.leaf]) for c in self.consumers)
            total += 12.0 * n * sum(self.leaf_sizes[j] for j in self.fallback) * w
        return total

    @property
    def method(self) -> str:
        """``"ghost"`` when the cost model estimates the fast path cheaper than ``vmap``, else
        ``"vmap"`` (the prior of :func:`select`)."""
        return "ghost" if self.cost("ghost") <= self.cost("vmap") else "vmap"

    @property
    def clear(self) -> bool:
        """Every leaf covered and the fast path's estimated cost at most :data:`CLEAR_MARGIN`
        of ``vmap``'s: :func:`select` takes the fast path without timing."""
        return not self.fallback and self.cost("ghost") <= CLEAR_MARGIN * self.cost("vmap")

    def name(self, j: int) -> str:
        return self.leaf_names[j] if self.leaf_names else str(j)

    def describe(self) -> str:
        """Every covered leaf (its operation, form, cost), every fallback leaf and why, and
        what ``method="auto"`` decides (or decided: the timings of :func:`calibrate`). Costs
        in MFLOP-equivalents for the whole batch (for one chunk of a chunked plan)."""
        w = self.flops_per_byte
        lines = []
        for c in self.consumers:
            costs = ", ".join(f"{f} {(fl + w * b) / 1e6:.3g}" for f, fl, b in c.costs)
            chunks = f" in {c.chunks} example chunks" if c.chunks > 1 else ""
            via = f" through {', '.join(c.via)}" if c.via else ""
            reads = sum(d.leaf == c.leaf for d in self.consumers)
            how = f", one of {reads} reads" if reads > 1 else ""
            if c.region and self.leaf_sizes and _box_size(c.region) < self.leaf_sizes[c.leaf]:
                box = ", ".join(f"{a}:{b}" for a, b in zip(*c.region, strict=True))
                how += f", its slice [{box}]"
            how += f", with {', '.join(map(self.name, c.others))}" if c.others else ""
            how += f"{via} (per-example gradients assembled)" if c.parts else ""
            lines.append(
                f"leaf {self.name(c.leaf)}: covered by {c.primitive} ({c.kind}), {c.form} form"
                f"{chunks}{how} (MFLOP-equivalents: {costs})"
            )
        read = {c.leaf for c in self.consumers}
        for j in self.penalized:
            how = "also" if j in read else "only"
            lines.append(
                f"leaf {self.name(j)}: {how} in a penalty term of the loss (without the example "
                "axis: its gradient is added to every example's)"
            )
        how = "by vmap"
        if self.fallback_microbatches:
            how = f"estimated from {self.fallback_microbatches} microbatch gradients, unbiased"
        if self.fallback_microbatches and not self.consumers:
            lines.append(f"every leaf: per-example norms {how} (the microbatch estimator's loop)")
        for j, why in self.reasons:
            lines.append(f"leaf {self.name(j)}: fallback (per-example norms {how}): {why}")
        ghost, vmap = self.cost("ghost"), self.cost("vmap")
        decision = self.decision or (
            "timed once (calibrate)"
            if not self.clear
            else "fast path, timed once (calibrate) whole and in example chunks"
            if chunk_counts(self.batch_size) and self.num_chunks == 1
            else "fast path, without timing"
        )
        if self.num_chunks > 1:
            decision += f"; the batch in {self.num_chunks} chunks of {self.batch_size} examples"
        if not self.consumers:  # the model costs the fast path, which this plan does not run
            return "\n".join([*lines, f"auto: {decision}"])
        fb = " incl. a vmap pass for the fallback" if self.fallback else ""
        fb = " incl. the fallback's microbatches" if self.fallback_microbatches else fb
        lines.append(
            f"auto: {decision}; model: {self.method} (estimated extra cost over one backward "
            f"pass: fast path {ghost / 1e6:.3g}{fb}, vmap {vmap / 1e6:.3g} MFLOP-equivalents "
            f"at {w:g} FLOPs/byte)"
        )
        return "\n".join(lines)


def _loss_only(loss_fn, has_aux):
    return (lambda p, b: loss_fn(p, b)[0]) if has_aux else loss_fn


def _grown(batch: PyTree) -> PyTree:
    """The batch with one more example (shape structs stay abstract)."""

    def grow(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype)
        return jnp.concatenate([x, x[:1]])

    return jax.tree.map(grow, batch)


def plan(loss_fn, params, batch, *, has_aux: bool = False, empty_ok: bool = False) -> Plan:
    """Find the operations of ``loss_fn`` whose per-example norms have a closed form.

    Tracing only (no computation). Raises :class:`NotApplicableError` when no leaf is covered
    (with ``empty_ok``: a plan whose every leaf falls back, which :func:`calibrate` can time
    against the microbatch sums).

    Args:
      loss_fn: ``loss_fn(params, batch)`` mean loss (``(loss, aux)`` with ``has_aux``), any JAX
        code (Flax Linen or NNX, plain ``jnp``, ...).
      params: the parameters (any pytree; arrays, tracers or ``jax.ShapeDtypeStruct``).
      batch: the batch (leading example axis).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A :class:`Plan`; ``print(plan(...).describe())`` says what is covered, in which form,
      what falls back and why.
    """
    n = common.batch_size(batch)
    loss = _loss_only(loss_fn, has_aux)
    flat = _trace(loss, params, batch)
    alt = _trace(loss, params, _grown(batch))
    paths_leaves = jax.tree_util.tree_leaves_with_path(params)
    names = tuple(common.leaf_name(path) for path, _ in paths_leaves)
    num = len(paths_leaves)
    same = flat.signature == alt.signature and all(
        len(s) == len(alt.shapes[k]) for k, s in flat.shapes.items()
    )
    if not same:
        raise NotApplicableError(
            "loss_fn traces to different operations at batch sizes "
            f"{n} and {n + 1}, so the example axis cannot be found. Use method='vmap'."
        )
    found, reasons, penalties = _find_consumers(flat, _example_axes(flat, alt, n), num)
    if not found and not empty_ok:
        why = "; ".join(f"{names[j]}: {r}" for j, r in sorted(reasons.items())[:4])
        raise NotApplicableError(
            "the fast per-example path covers no parameter of this loss_fn"
            + (f" ({why})" if why else " (no parameter reaches the loss)")
            + ": per-example gradients by vmap (method='auto' times them against the "
            "microbatch sums)."
        )
    if not found:  # every leaf by vmap, with the reasons found
        reasons = {j: reasons.get(j, "read by no covered operation") for j in range(num)}
    w = FLOPS_PER_BYTE.get(jax.default_backend(), FLOPS_PER_BYTE["gpu"])
    sizes = tuple(_prod(leaf.shape) for _, leaf in paths_leaves)
    others = {j for cs in found.values() for c in cs for j in c.others}
    consumers = tuple(
        _with_costs(
            c,
            n,
            _box_size(c.region) if c.region else sizes[c.leaf],
            w,
            parts=bool((len(cs) > 1 and not _disjoint(cs)) or c.leaf in others or c.via),
        )
        for cs in found.values()
        for c in cs
    )
    consumers = tuple(sorted(consumers, key=lambda c: c.eqn))
    fallback = tuple(sorted(reasons))
    return Plan(
        consumers,
        fallback,
        tuple(sorted(reasons.items())),
        num,
        leaf_names=names,
        leaf_sizes=sizes,
        batch_size=n,
        flops_per_byte=w,
        signature=flat.signature,
        penalties=penalties,
        penalty_eqns=(eqns := _penalty_eqns(flat, [key for key, _ in penalties])),
        penalized=_penalized(flat, penalties, eqns, num, reasons),
    )


# ---------------------------------------------------------------------------------------------
# Choosing the path: the FLOP model as prior, a one-off timing when it is not clear.

_CALIBRATED: dict[Any, Plan | None] = {}


def select(
    loss_fn,
    params,
    batch,
    *,
    has_aux: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
    uses: int | None = None,
) -> Plan | None:
    """The plan ``per_example(method=...)`` should run, or ``None`` for plain ``vmap``.

    Args:
      loss_fn, params, batch, has_aux: as for :func:`plan`.
      method: ``"auto"``: the fastest of the fast path on the whole batch, the fast path over equal
        example chunks (:func:`chunk_counts`; smaller products can run faster per example, and one
        chunk's intermediates exist at a time), every leaf's sums from microbatch gradients (charged
        :data:`MICROBATCH_PRICE` for their variance) and ``vmap``, by :func:`calibrate`. Without
        timing when nothing is left to time: the fast path covers nothing (``vmap``), or the cost
        model is clear (:attr:`Plan.clear`) and the batch is too small to chunk. A clear cost model
        leaves ``vmap`` out of the timing.
        ``"ghost"`` (or ``"fast"``): the plan on the whole batch whatever it costs.
        ``"vmap"``: ``None``.
      chunk_size: the ``vmap`` chunk size (for the timing).
      uses: how many steps will run the answer (``None``: many): :func:`calibrate` times the
        other candidates only if that can pay. The answer is cached by signature, so a later
        ``per_example(method="auto")`` on these shapes runs it (:func:`gns.finder
        .find_batch_size` passes its pilot's length).

    Returns:
      A :class:`Plan` for :func:`sums` (:meth:`Plan.describe` says what was chosen and why),
      or ``None``.

    Warns:
      FallbackWarning: once per loss (signature), when a parameter falls back to ``vmap``: it
        names the leaves and why (or that the fast path covers none, under ``"auto"``).

    Raises:
      ValueError: ``method="ghost"`` and the fast path covers no parameter.
    """
    if method == "vmap":
        return None
    try:
        the_plan = plan(loss_fn, params, batch, has_aux=has_aux)
    except NotApplicableError as e:
        if method != "auto":
            raise ValueError(f"per_example(method={method!r}): {e}") from e
        _warn_once(str(e), f"gns per-example norms by jax.vmap for every parameter: {e}")
        try:  # the microbatch sums may still be faster
            the_plan = plan(loss_fn, params, batch, has_aux=has_aux, empty_ok=True)
        except NotApplicableError:
            return None
        if not _microbatch_sums_timed(the_plan.batch_size):
            return None
        return calibrate(
            loss_fn, params, batch, the_plan, has_aux=has_aux, chunk_size=chunk_size, uses=uses
        )
    if the_plan.fallback:
        _warn_fallback(the_plan)
    if method != "auto" or (the_plan.clear and not chunk_counts(the_plan.batch_size)):
        return the_plan
    return calibrate(
        loss_fn,
        params,
        batch,
        the_plan,
        has_aux=has_aux,
        chunk_size=chunk_size,
        with_vmap=not the_plan.clear,
        uses=uses,
    )


class FallbackWarning(UserWarning):
    """Some parameters get their per-example gradients by ``jax.vmap`` (said once per loss)."""


_WARNED: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=4)


def _warn_fallback(the_plan: Plan) -> None:
    """Say once per loss which leaves fall back to ``vmap``, why, and what to do."""
    named = [f"{the_plan.name(j)} ({why})" for j, why in the_plan.reasons[:3]]
    more = len(the_plan.reasons) - len(named)
    _warn_once(
        (the_plan.signature, the_plan.fallback),
        f"gns per-example norms: {len(the_plan.fallback)} of {the_plan.num_leaves} parameter "
        f"leaves get per-example gradients by jax.vmap, which can cost several plain steps: "
        f"{'; '.join(named)}{f'; and {more} more' if more else ''}. "
        "method='auto' also times estimating their sums (or every leaf's) from 8 microbatches, "
        "as gns.estimate.microbatch does; gns.ghost.plan(loss_fn, params, batch).describe() "
        "says what is covered.",
    )


def chunk_counts(n: int) -> tuple[int, ...]:
    """The numbers of equal example chunks ``k > 1`` :func:`select` times the fast path in, at
    batch size ``n``: chunks of :data:`CHUNK_SIZES` examples or ``n /`` :data:`CHUNK_COUNT`
    (the microbatch estimator's default), of at least 4 examples, at most
    :data:`MAX_CHUNKS`."""
    sizes = {*CHUNK_SIZES, n // CHUNK_COUNT}
    return tuple(
        sorted({n // m for m in sizes if 4 <= m < n and n % m == 0 and n // m <= MAX_CHUNKS})
    )


def chunked(the_plan: Plan, loss_fn, params, batch, k: int, *, has_aux: bool = False) -> Plan:
    """The plan of the fast path over ``k`` equal example chunks of ``batch`` in turn
    (:func:`sums` sums them with ``jax.lax.scan``), planned at the chunk's size.

    Raises:
      ValueError: ``k`` is not a whole number >= 1 dividing the batch size.
      NotApplicableError: the fast path covers nothing at the chunk's size.
    """
    n = common.batch_size(batch)
    k = common.check_int(k, "k", 1, "the number of example chunks")
    if n % k:
        raise ValueError(
            f"{k} chunks do not divide the batch size {n}: pick a divisor of the batch size."
        )
    if k == 1:
        return the_plan

    def first(x):  # a slice keeps what the caller's trace knows of x (e.g. varying axes)
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((n // k, *x.shape[1:]), x.dtype)
        return x[: n // k]

    chunk = jax.tree.map(first, batch)
    return dataclasses.replace(plan(loss_fn, params, chunk, has_aux=has_aux), num_chunks=k)


def _signature_key(the_plan: Plan, params, batch, has_aux, chunk_size) -> tuple:
    def shapes(tree):
        return tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))

    structure = (str(jax.tree.structure(params)), str(jax.tree.structure(batch)))
    return (the_plan.signature, structure, shapes(params), shapes(batch), has_aux, chunk_size)


def fastest(times: dict[str, list[float]], price: Mapping[str, float] | None = None) -> str:
    """The candidate with the smallest median time times its ``price`` (default 1; the first
    of equal ones)."""
    price = price or {}
    return min(times, key=lambda name: float(np.median(times[name])) * price.get(name, 1.0))


def _microbatch_sums_timed(n: int) -> bool:
    """Whether :func:`calibrate` times sums from :data:`CHUNK_COUNT` microbatches at batch
    ``n`` (equal microbatches of two or more examples, at a finite price)."""
    return n % CHUNK_COUNT == 0 and n > CHUNK_COUNT and math.isfinite(MICROBATCH_PRICE)


def _candidates(
    loss_fn, params, batch, the_plan, has_aux, with_vmap, chunks=True
) -> dict[str, Plan | None]:
    """What :func:`calibrate` times: the fast path on the whole batch (with leaves that fall
    back: also with their sums estimated from :data:`CHUNK_COUNT` microbatches,
    :func:`_from_microbatches`), every leaf's sums so, at the microbatch estimator's cost
    (:func:`_all_from_microbatches`), and (with ``chunks``) in each of :func:`chunk_counts` chunks
    (where the fast path covers the chunk), each chunked one also with its close dense
    kernels in the direct form (:func:`direct_where_close`: a chunk's per-example gradients
    are small), and ``vmap`` (``None``)."""
    covered = bool(the_plan.consumers)  # else: vmap against the microbatch sums
    out: dict[str, Plan | None] = {"ghost": the_plan} if covered else {}
    n, k = common.batch_size(batch), CHUNK_COUNT
    if _microbatch_sums_timed(n):
        if the_plan.fallback and covered:
            out[f"ghost, fallback from {k} microbatches"] = dataclasses.replace(
                the_plan, fallback_microbatches=k
            )
        out[f"every leaf from {k} microbatches"] = dataclasses.replace(
            the_plan,
            consumers=(),
            fallback=tuple(range(the_plan.num_leaves)),
            fallback_microbatches=k,
        )
    for k in chunk_counts(n) if chunks and covered else ():
        try:
            p = chunked(the_plan, loss_fn, params, batch, k, has_aux=has_aux)
        except NotApplicableError:
            continue
        out[f"ghost in {k} chunks"] = p
        if (direct := direct_where_close(p)) is not None:
            out[f"ghost in {k} chunks, direct form"] = direct
    return out | ({"vmap": None} if with_vmap else {})


def direct_where_close(the_plan: Plan) -> Plan | None:
    """``the_plan`` with each dense kernel that the cost model puts in the Gram form moved to
    the direct form where the model's two costs are within :data:`FORM_MARGIN` of each other;
    ``None`` when there is none. The model cannot tell such forms apart on a CPU (the direct
    form's bytes may stay in cache, the Gram form's small products run below peak), so
    :func:`calibrate` times both.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda w, x: jnp.sum(jnp.einsum("btk,kc->btc", x, w) ** 2)
      >>> p = plan(loss, jnp.ones((8, 8)), jnp.ones((4, 6, 8)))  # on a CPU: 1.3x apart
      >>> [c.form for c in p.consumers], [c.form for c in direct_where_close(p).consumers]
      (['gram'], ['direct'])
    """
    w = the_plan.flops_per_byte

    def cost(c, form):
        return next(fl + w * b for f, fl, b in c.costs if f == form)

    def close(c):
        return (
            c.kind == "dense"
            and c.form == "gram"
            and cost(c, "direct") <= FORM_MARGIN * cost(c, "gram")
        )

    if not any(map(close, the_plan.consumers)):
        return None
    consumers = tuple(
        dataclasses.replace(c, form="direct") if close(c) else c for c in the_plan.consumers
    )
    return dataclasses.replace(the_plan, consumers=consumers)


def _chunks_can_fit(whole, params) -> bool:
    """Whether the fast path over example chunks could need no more temporary memory than
    ``whole``, its compiled program on the whole batch: not when ``whole`` needs less than the
    parameters' bytes, since a loop over chunks holds each chunk's gradients, as many bytes
    (an MLP, whose activations are small beside its weights; every chunk then also reads and
    writes every gradient again, so it is slower too)."""
    stats = whole.memory_analysis()
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return stats is None or int(stats.temp_size_in_bytes) >= nbytes


def _within_memory(calls: dict) -> tuple[dict, str]:
    """``calls`` without the candidates whose compiled temporary memory exceeds
    :func:`gns.hardware.memory_budget`, or, for the chunked ones, the fast path's on the whole
    batch (an unrolled loop over chunks may keep every chunk's intermediates alive); and why
    those were dropped."""

    def temp(name):
        stats = calls[name][0].memory_analysis()
        return None if stats is None else int(stats.temp_size_in_bytes)

    limit, budget = temp("ghost") if "ghost" in calls else None, hardware.memory_budget()[0]
    big = [m for m in calls if (temp(m) or 0) > budget]
    over = [m for m in calls if limit is not None and "chunks" in m and temp(m) > limit]
    over = [m for m in over if m not in big]
    why = [f"more memory than the whole batch: {', '.join(over)}"] if over else []
    why += [f"more memory than the budget: {', '.join(big)}"] if big else []
    return {m: c for m, c in calls.items() if m not in over + big}, "; ".join(why)


def calibrate(
    loss_fn,
    params,
    batch,
    the_plan: Plan,
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    rounds: int = 9,
    with_vmap: bool = True,
    uses: int | None = None,
) -> Plan | None:
    """The fastest way to compute the local sums on these shapes: a :class:`Plan` (the fast
    path on the whole batch, or over equal example chunks, :func:`chunked`, or the sums from
    microbatch gradients, :func:`_candidates`), or ``None`` (``vmap``; left out of the
    candidates with ``with_vmap=False``).

    Every candidate is compiled and timed (interleaved, ``rounds`` rounds, medians, :func:`fastest`,
    the microbatch ones charged :data:`MICROBATCH_PRICE`) on zero arrays of the shapes and dtypes of
    ``params`` and ``batch``, on the default device; none whose compiled temporary memory exceeds
    :func:`gns.hardware.memory_budget` (``vmap`` on a model with large per-example gradients), a
    chunked one only when its compiled temporary memory is at most the whole batch's (chunking is to
    lower memory, not raise it), and none (not even compiled) when the whole batch's is below the
    parameters' bytes. The answer is cached in memory by the traced jaxpr, shapes, ``has_aux``,
    ``chunk_size`` and ``with_vmap``, so each signature is timed once per process. The chosen plan's
    :meth:`Plan.describe` gives the timings. Called inside ``jit`` (and ``shard_map``) it traces and
    runs apart, on new arrays. When the paths cannot run outside the caller's trace (e.g. a
    collective inside ``loss_fn``) the cost model's answer (:attr:`Plan.method`, on the whole batch)
    is used.

    With ``uses`` (the steps that will run the answer) the fast path on the whole batch is
    compiled and timed first, and the other candidates only if :data:`MAX_SAVING` of its time
    over ``uses`` steps exceeds what compiling (as long as that one took) and timing them
    would cost; otherwise the answer is the cost model's, and :meth:`Plan.describe` says why.
    """
    key = (*_signature_key(the_plan, params, batch, has_aux, chunk_size), with_vmap)
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    n = common.batch_size(batch)
    chunk = n if chunk_size is None else min(chunk_size, n)

    def run(p):
        if p is None:
            return lambda x, b: common.vmap_sums(loss_fn, x, b, n, chunk, None, has_aux)[:2]
        return lambda x, b: sums(loss_fn, x, b, p, has_aux=has_aux, chunk_size=chunk_size)[:2]

    try:
        # Traced and run apart from the caller's trace (no compile-time evaluation: it would
        # fold constants and change the trace): zero arrays of the shapes.
        args = jax.tree.map(_zeros_like, (params, batch))
        t0 = time.perf_counter()
        base = "ghost" if the_plan.consumers else "vmap"  # compiled first: the yardstick
        whole = jax.jit(run(the_plan if the_plan.consumers else None)).lower(*args).compile()
        compile_s = time.perf_counter() - t0
        chunks = _chunks_can_fit(whole, args[0])
        candidates = _candidates(loss_fn, params, batch, the_plan, has_aux, with_vmap, chunks)
        if uses and (why := _unpaid((whole, args), compile_s, len(candidates), uses, rounds)):
            _CALIBRATED[key] = _model_choice(the_plan, why)
            return _CALIBRATED[key]
        calls = {
            m: (whole if m == base else jax.jit(run(p)).lower(*args).compile(), args)
            for m, p in candidates.items()
        }
        calls, dropped = _within_memory(calls)
        if not chunks and chunk_counts(n):
            dropped = "more memory than the whole batch: the chunked paths (each chunk's "
            dropped += "gradients alone outweigh it)"
        times = hardware.interleaved_times(calls, warmup=1, rounds=rounds)
        sampled = [m for m in times if getattr(candidates[m], "fallback_microbatches", 0)]
        price = dict.fromkeys(sampled, MICROBATCH_PRICE)
        name = fastest(times, price)
        medians = ", ".join(f"{m} {1e3 * float(np.median(t)):.3g}" for m, t in times.items())
        if sampled:
            medians += f"; sums from microbatches charged {MICROBATCH_PRICE}x for their variance"
        chosen = candidates[name]
        if chosen is not None:
            more = f"; not timed, {dropped}" if dropped else ""
            chosen = dataclasses.replace(
                chosen, decision=f"timed once: {name} (median ms: {medians}{more})"
            )
    except Exception as e:  # noqa: BLE001 (not runnable outside the caller's trace)
        # Not cached: a call outside that trace (or with the values as arguments) can time.
        why = (
            f"not timed: the paths did not run apart from the caller's trace, e.g. a loss_fn "
            f"that closes over values an enclosing jit traces, which timing needs as arguments "
            f"({type(e).__name__}: {str(e)[:120]}); the cost model's choice"
        )
        return _model_choice(the_plan, why)
    _CALIBRATED[key] = chosen
    return chosen


def _zeros_like(x):
    """Zeros of ``x``'s shape and dtype, weakly typed where ``x`` is (a Python scalar's type):
    a concrete stand-in that traces the loss as ``x`` does."""
    aval = jax.typeof(x)
    if aval.weak_type:
        return jnp.full(aval.shape, np.zeros((), aval.dtype).item())
    return np.zeros(aval.shape, aval.dtype)


def _model_choice(the_plan: Plan, why: str = "") -> Plan | None:
    """The cost model's answer: ``the_plan`` on the whole batch, or ``None`` (``vmap``)."""
    if the_plan.method != "ghost" or not the_plan.consumers:
        return None
    return dataclasses.replace(the_plan, decision=why) if why else the_plan


def _unpaid(whole, compile_s: float, num_candidates: int, uses: int, rounds: int) -> str:
    """Why timing ``num_candidates`` candidates cannot pay over ``uses`` steps ("" when it
    can): their compiles and rounds against :data:`MAX_SAVING` of ``whole``'s time."""
    if num_candidates < 2:
        return ""
    step_s = float(np.median(hardware.interleaved_times({0: whole}, warmup=1, rounds=3)[0]))
    cost = compile_s * (num_candidates - 1) + rounds * step_s * num_candidates
    saving = MAX_SAVING * step_s * uses
    if cost <= saving:
        return ""
    return (
        f"not timed: {num_candidates - 1} more candidate(s) would take about {cost:.3g} s to "
        f"compile and time, more than they could save over {uses} steps ({saving:.3g} s at "
        "most); the cost model's choice"
    )


# ---------------------------------------------------------------------------------------------
# The cost model.


def _contraction_dims(c: _Consumer, n: int, leaf_size: int) -> tuple[int, int, int, int]:
    """``(m, T, K, C)`` of a dense/conv consumer: ``m`` independent products ``[T,K]ᵀ[T,C]``
    (a convolution's ``K``: kernel offsets times input channels)."""
    if c.kind == "dense":
        lay = c.layout
        return n * lay.s, lay.t, lay.k, lay.c
    g_perm = c.conv[1]
    cout = c.out_shape[g_perm[-1]]
    return n, _prod(c.out_shape[d] for d in g_perm[1:-1]), leaf_size // cout, cout


def _form_cost(c: _Consumer, form: str, n: int, leaf_size: int) -> tuple[str, float, float]:
    """``(form, flops, bytes)`` of one consumer's per-example squared norms for the batch.

    ``"vmap"``: what per-example gradients of the leaf cost beyond a plain backward pass: their
    bytes (written, read for the sum and for the norm) and, for kernels, the per-example
    weight-gradient products counted again times :data:`_VMAP_SLOWDOWN`.
    """
    vmap_bytes = 12.0 * n * leaf_size
    if c.kind in ("dense", "conv"):
        m, t, k, cc = _contraction_dims(c, n, leaf_size)
        patches = 4.0 * m * t * k * c.groups if c.kind == "conv" else 0.0  # every input channel
        if form == "direct":  # the per-example products replace the weight gradient
            return form, 2.0 * m * k * cc, 12.0 * m * k * cc + patches
        if form == "gram":
            if t == 1:
                return form, 2.0 * m * (k + cc), 8.0 * m + patches
            return form, 2.0 * m * t * t * (k + cc + 1), 12.0 * m * t * t + patches
        return form, _VMAP_SLOWDOWN[c.kind] * 2.0 * m * t * k * cc, vmap_bytes
    size = _prod(c.out_shape)
    if c.kind == "embed":
        d = c.out_shape[-1]
        t = size // (n * d)
        if form == "direct":  # scatter-add into a per-example table
            return form, size + 2.0 * n * c.vocab * d, 8.0 * n * c.vocab * d + 4.0 * size
        if form == "gram":
            return form, 2.0 * n * t * t * (d + 1), 12.0 * n * t * t
        return form, 0.0, vmap_bytes
    return (form, 3.0 * size, 0.0) if form != "vmap" else (form, 0.0, vmap_bytes)


def _forms(c: _Consumer) -> tuple[str, ...]:
    """The forms of consumer ``c``: a grouped convolution has the direct form only (its Gram
    matrices would be one per group)."""
    if c.kind in ("dense", "conv", "embed") and c.groups == 1:
        return ("direct", "gram")
    return ("direct",)


def _with_costs(
    c: _Consumer, n: int, leaf_size: int, flops_per_byte: float, parts: bool = False
) -> _Consumer:
    """``c`` with the costs of its forms (and of vmap), the cheapest form (the direct form,
    whose per-example parts are summed and mapped back, with ``parts``), and the number of
    example chunks its kernel norms are computed in (:data:`CHUNK_BYTES`)."""
    costs = tuple(_form_cost(c, f, n, leaf_size) for f in (*_forms(c), "vmap"))
    best = min(costs[:-1], key=lambda fc: fc[1] + flops_per_byte * fc[2])
    if parts:
        direct = next(fc for fc in costs if fc[0] == "direct")
        chunks = _num_chunks(c, n, direct[2])
        return dataclasses.replace(c, costs=costs, form="direct", parts=True, chunks=chunks)
    return dataclasses.replace(c, costs=costs, form=best[0], chunks=_num_chunks(c, n, best[2]))


def _num_chunks(c: _Consumer, n: int, nbytes: float) -> int:
    """The fewest example chunks (a divisor of the batch) that keep a convolution's per-example
    intermediates (``nbytes`` for the batch) within :data:`CHUNK_BYTES`. Convolutions only:
    their patches are the large intermediates; a dense layer's are computed on the whole batch
    (chunking them raised the compiled temp memory of the ``lm`` Transformer, the loop's
    stacked inputs, and was not faster)."""
    if c.kind != "conv" or nbytes <= CHUNK_BYTES:
        return 1
    return next(d for d in range(2, n + 1) if n % d == 0 and nbytes / d <= CHUNK_BYTES or d == n)


def _backward_flops(c: _Consumer, leaf_size: int) -> float:
    """FLOPs of a forward and an input-gradient pass through one consumer: what the fallback's
    ``vmap`` pass repeats per example (other operations are not counted)."""
    if c.kind in ("dense", "conv"):
        m, t, k, cc = _contraction_dims(c, c.out_shape[c.axis], leaf_size)
        return 4.0 * m * t * k * cc
    return 10.0 * _prod(c.out_shape)


# ---------------------------------------------------------------------------------------------
# Per-example squared norms from an operand and the output gradient.


def _gram_sq(pieces: list[jax.Array], g: jax.Array) -> jax.Array:
    """Per-example ``‖Σ_t p_t g_tᵀ‖²`` in the Gram form ``Σ_{t,t'} (p_t·p_t')(g_t·g_t')``,
    shape ``[B]``.

    Args:
      pieces: the operand (patches) ``p: [B, T, K]`` split along ``K`` into pieces
        ``[B, T, K_o]`` (one per kernel offset of a convolution, the whole operand of a
        ``dot_general``): the patch Gram is the sum of the piece Grams, so the patches are
        never concatenated.
      g: output gradients ``[B, T, C]``.
    """
    if g.shape[1] == 1:  # rank one: ‖p‖²·‖g‖²
        return sum(jnp.sum(jnp.square(p), axis=(1, 2)) for p in pieces) * jnp.sum(
            jnp.square(g), axis=(1, 2)
        )
    pp = sum(jnp.einsum("btk,bsk->bts", p, p) for p in pieces)
    gg = jnp.einsum("btc,bsc->bts", g, g)
    return jnp.sum(pp * gg, axis=(1, 2))


def _conv_pieces(x: jax.Array, conv) -> list[jax.Array]:
    """The input patches of a channels-last convolution, one ``[B, T, C_in]`` slice of the
    padded input per kernel offset (strided slices: no patch-extraction convolution, whose
    one-hot filter would cost ``K²`` multiply-adds per position). An input dilation (a
    transposed convolution) spaces the input out with zeros before the padding, as the
    convolution does."""
    kernel_size, strides, padding, dilation, spacing = conv
    dilated = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True))
    pads = zip(padding, spacing, strict=True)
    config = [(0, 0, 0)] + [(lo, hi, s - 1) for (lo, hi), s in pads] + [(0, 0, 0)]
    xp = lax.pad(x, jnp.zeros((), x.dtype), config)
    out = [(n - w) // s + 1 for n, w, s in zip(xp.shape[1:-1], dilated, strides, strict=True)]
    b, c = x.shape[0], x.shape[-1]
    pieces = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        start = [o * d for o, d in zip(offset, dilation, strict=True)]
        limit = [st + (n - 1) * s + 1 for st, n, s in zip(start, out, strides, strict=True)]
        piece = lax.slice(xp, [0, *start, 0], [b, *limit, c], [1, *strides, 1])
        pieces.append(piece.reshape(b, -1, c))
    return pieces


def _embed_sq(tokens: jax.Array, g: jax.Array, vocab: int, form: str) -> jax.Array:
    """Per-example ``‖Σ_t e_{tok_t} g_tᵀ‖²`` of an embedding table, shape ``[B]``.

    Args:
      tokens: ``[B, T]`` integer ids; ids outside ``[0, vocab)`` get no gradient.
      g: output gradients ``[B, T, D]``.
      vocab: rows of the table.
      form: ``"gram"`` (token-equality Gram, ``T²·D``) or ``"direct"`` (scatter-add into a
        per-example ``[vocab, D]`` table).
    """
    valid = (tokens >= 0) & (tokens < vocab)
    if form == "direct":
        return jnp.sum(jnp.square(_embed_table(tokens, g, vocab)), axis=(1, 2))
    same = (tokens[:, :, None] == tokens[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    gg = jnp.einsum("btd,bsd->bts", g, g)
    return jnp.sum(jnp.where(same, gg, 0.0), axis=(1, 2))


def _embed_table(tokens: jax.Array, g: jax.Array, vocab: int) -> jax.Array:
    """Per-example tables ``[B, vocab, D]``: ``g`` scatter-added at the rows of ``tokens``
    (``[B, T]``; ids outside ``[0, vocab)`` dropped), one example's gradient of the table."""
    b = tokens.shape[0]
    rows = jnp.where((tokens >= 0) & (tokens < vocab), tokens, vocab)  # dropped by the scatter
    table = jnp.zeros((b, vocab, g.shape[-1]), g.dtype)
    return table.at[jnp.arange(b)[:, None], rows].add(g, mode="drop")


def _embed_inputs(c: _Consumer, n: int, x, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(tokens [n, T], g [n, T, D])`` of an embedding consumer from its index operand ``x``
    and output gradient ``g`` (tokens clamped to the table in ``clip`` mode, as the gather)."""
    tokens = jnp.moveaxis(x[..., 0], c.axis, 0).reshape(n, -1)
    if c.clip:
        tokens = jnp.clip(tokens, 0, c.vocab - 1)
    return tokens, jnp.moveaxis(g, c.axis, 0).reshape(n, tokens.shape[1], -1)


def _channels_last(c: _Consumer, x, g: jax.Array) -> tuple[tuple, jax.Array, jax.Array]:
    """``(kernel_size, strides, padding, dilation, input dilation)`` of a convolution consumer
    and its operand and output gradient channels-last."""
    x_perm, g_perm, *conv = c.conv
    return tuple(conv), jnp.transpose(x, x_perm), jnp.transpose(g, g_perm)


def _form_of(c: _Consumer, form: str) -> str:
    """The form consumer ``c`` runs in: its planned one for ``"auto"`` (the cost model) or
    where it has no such form, else ``form``."""
    return c.form if form == "auto" or form not in _forms(c) else form


def _consumer_sq_norms(c: _Consumer, x, g: jax.Array, form: str) -> jax.Array:
    """Per-example squared norms ``[B]`` of the leaf of consumer ``c`` from its batched
    operand ``x`` (``None`` when not needed) and output gradient ``g`` (float32 at least).

    ``form="auto"`` takes the consumer's planned form (the cost model), else the given one
    (where the consumer has it)."""
    form = _form_of(c, form)
    n = g.shape[c.axis]
    if c.kind == "embed":
        return _embed_sq(*_embed_inputs(c, n, x, g), c.vocab, form)
    x = x.astype(g.dtype)
    if c.kind == "dense":
        lay = c.layout
        x = jnp.transpose(x, lay.x_perm).reshape(n, lay.s, lay.t, lay.k)
        g = jnp.transpose(g, lay.g_perm).reshape(n, lay.s, lay.t, lay.c)
        fn = _dense_sq
    else:
        conv, x, g = _channels_last(c, x, g)
        fn = functools.partial(_conv_sq, conv)
    return _in_chunks(fn, (x, g), c.chunks).reshape(n)


def _dense_sq(x: jax.Array, g: jax.Array) -> jax.Array:
    """Per-example squared norms ``[b]`` of a ``dot_general`` parameter from ``x: [b, S, T, K]``
    and ``g: [b, S, T, C]`` (the ``S`` shared axes are independent products, summed)."""
    b, s, t, _ = x.shape
    sq = _gram_sq([x.reshape(b * s, t, -1)], g.reshape(b * s, t, -1))
    return jnp.sum(sq.reshape(b, s), axis=1)


def _conv_sq(conv, x: jax.Array, g: jax.Array) -> jax.Array:
    """Per-example squared norms ``[b]`` of a convolution kernel from channels-last ``x`` and
    ``g``."""
    pieces = _conv_pieces(x, conv)
    return _gram_sq(pieces, g.reshape(g.shape[0], -1, g.shape[-1]))


def _in_chunks(fn, xg: tuple, chunks: int):
    """``fn(*xg)`` over ``chunks`` equal example chunks in turn (``jax.lax.map``; the
    per-example intermediates of one chunk exist at a time), its outputs stacked along a new
    leading axis (of size 1 for one chunk)."""
    if chunks <= 1:
        return jax.tree.map(lambda a: a[None], fn(*xg))
    b = xg[-1].shape[0]
    return lax.map(
        lambda a: fn(*a), tuple(a.reshape((chunks, b // chunks) + a.shape[1:]) for a in xg)
    )


# ---------------------------------------------------------------------------------------------
# One backward pass.


def sums(
    loss_fn,
    params: PyTree,
    batch: PyTree,
    the_plan: Plan,
    *,
    has_aux: bool = False,
    axis_name: str | None = None,
    chunk_size: int | None = None,
    form: str = "auto",
):
    """Local sums for the noise statistics: one backward pass plus ghost norms (per example
    chunk, summed by ``jax.lax.scan`` in float32 at least, when the plan splits the batch:
    :attr:`Plan.num_chunks`).

    Args:
      loss_fn, params, batch, has_aux: as for :func:`gns.estimate.per_example`; ``params``
        already cast to device-varying when ``axis_name`` is set.
      the_plan: from :func:`plan` on the same ``loss_fn`` and shapes (or :func:`select`).
      axis_name: the data-parallel axis (the slots are cast to device-varying, so their
        gradients stay local).
      chunk_size: examples per vmap chunk for the fallback leaves.
      form: ``"auto"`` (each consumer's cheaper form by the plan's cost model), ``"direct"``
        or ``"gram"`` (every consumer that has that form; for a gather direct is the scatter).

    Returns:
      ``(grad_sum, sq_sum, aux)``: the sum over this device's examples of their gradients
      (``n`` times the mean gradient), the per-leaf sum of their squared norms (both in float32
      at least, whatever the parameters' dtype: bfloat16 sums would round), and the aux of each
      ``loss_fn`` call stacked along a leading axis (one call on the whole local batch, or one
      per chunk; ``None`` without ``has_aux``).

    Raises:
      ValueError: a chunked plan whose number of chunks does not divide the batch size.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
    n, k = common.batch_size(batch), the_plan.num_chunks
    if n % k:
        raise ValueError(
            f"the plan splits the batch into {k} equal chunks, which do not divide the batch "
            f"size {n}: select (or chunked) a plan for this batch's shapes."
        )

    if not the_plan.consumers:  # every leaf from microbatches (a candidate of calibrate)
        k = the_plan.fallback_microbatches
        return _all_from_microbatches(loss_fn, params, batch, k, has_aux, axis_name)

    def chunk_sums(chunk):
        return _one_pass(loss_fn, params, chunk, the_plan, has_aux, axis_name, chunk_size, form)

    if k > 1:
        unroll = common.scan_unroll(common.convolves(loss_fn, params, batch))
        return common.scan_sums(chunk_sums, params, batch, k, axis_name, unroll)
    grad_sum, sq_sum, aux = chunk_sums(batch)
    return grad_sum, sq_sum, jax.tree.map(lambda a: jnp.asarray(a)[None], aux)


def _one_pass(loss_fn, params, batch, the_plan, has_aux, axis_name, chunk_size, form):
    """:func:`sums` of one chunk (the whole batch of an unchunked plan)."""
    n = common.batch_size(batch)
    flat = _trace(loss_fn, params, batch)
    if flat.signature != the_plan.signature:
        raise RuntimeError(
            "loss_fn traced to other operations than when planned: the fast path needs the "
            "same computation on every trace. Use method='vmap'."
        )
    leaves, treedef = jax.tree.flatten(params)
    by_eqn = {c.eqn: c for c in the_plan.consumers}
    acc = [common.acc_dtype(leaf.dtype) for leaf in leaves]
    # A slot per consumer, whose gradient is its per-example squared norms [n]; the slot of a
    # leaf with parts is [n, *leaf] (every read adds its per-example parts to its gradient).
    with_parts = sorted({j for c in the_plan.consumers if c.parts for j in (c.leaf, *c.others)})
    slots = [jnp.zeros((n,), acc[c.leaf]) for c in the_plan.consumers if not c.parts]
    slots += [jnp.zeros((n, *leaves[j].shape), acc[j]) for j in with_parts]
    slots = common.to_varying(slots, axis_name)  # keep their gradients device-local
    slot_of = {c.eqn: k for k, c in enumerate(c for c in the_plan.consumers if not c.parts)}
    leaf_slot = {j: len(slot_of) + k for k, j in enumerate(with_parts)}

    def tapped(p_leaves, zs):
        seen: dict[int, list] = {}  # the operands of the example-free equations of a chain

        def hook(i, vals, outs):
            seen[i] = vals
            if i not in by_eqn:
                return outs
            c, op = by_eqn[i], functools.partial(_bind, flat.eqns[i])
            if c.parts:
                js = (c.leaf, *c.others)
                ws, leaf_zs = [p_leaves[j] for j in js], [zs[leaf_slot[j]] for j in js]
                slot = _along_chain(flat, c, seen, ws, leaf_zs)
                x = lax.stop_gradient(_batched_operand(c, op, vals))
                return [_tap_parts(c, n, outs[0], x, slot), *outs[1:]]
            if c.kind == "sum" or (c.kind in ("dense", "conv") and _form_of(c, form) == "direct"):
                return _reusing(c, n, op, vals, zs[slot_of[c.eqn]])
            x = lax.stop_gradient(_batched_operand(c, op, vals))
            return [_tap(c, n, form, outs[0], x, zs[slot_of[c.eqn]]), *outs[1:]]

        outs = _run(flat, [*p_leaves, *jax.tree.leaves(batch)], hook)
        out = jax.tree.unflatten(flat.out_tree, outs)
        return out if has_aux else (out, None)

    (grads, slot_grads), aux = jax.grad(tapped, argnums=(0, 1), has_aux=True)(leaves, slots)
    sq = [jnp.zeros((), a) for a in acc]  # unused leaves: 0
    for c in the_plan.consumers:  # several reads of one leaf: disjoint slices, norms add up
        if not c.parts:
            sq[c.leaf] = sq[c.leaf] + jnp.sum(slot_grads[slot_of[c.eqn]])
    for j in with_parts:
        sq[j] = jnp.sum(_norms_of(n, None, slot_grads[leaf_slot[j]])[1])
    sq = _with_penalties(flat, the_plan, leaves, grads, sq, n)
    grads = jax.tree.unflatten(treedef, grads)
    return _with_fallback(
        loss_fn, params, batch, the_plan, grads, sq, has_aux, axis_name, chunk_size, n, aux
    )


def _with_penalties(flat: _Flat, the_plan: Plan, leaves, grads, sq, n: int) -> list:
    """``sq`` with each penalized leaf's per-example gradients ``d_i + r`` (``r``: the
    gradient of the loss's penalty terms, the same for every example; ``sq`` holds the data
    parts' ``Σ|d_i|²``): ``Σ|d_i + r|² = Σ|d_i|² + n·r·(2G - r)`` with ``G`` the mean
    gradient (``Σ d_i = n(G - r)``; one fused pass over ``r`` and ``G``)."""
    if not the_plan.penalized:
        return sq

    def penalty(ws):
        env = dict(flat.consts) | dict(zip(flat.invars, ws, strict=False))
        env = _replay(flat, the_plan.penalty_eqns, env)
        return sum(coef * jnp.sum(env[key]) for key, coef in the_plan.penalties)

    r = jax.grad(penalty)(leaves)
    sq = list(sq)
    for j in the_plan.penalized:
        rj, gj = (x.astype(sq[j].dtype) for x in (r[j], grads[j]))
        sq[j] = sq[j] + n * jnp.vdot(rj, 2 * gj - rj)
    return sq


def _batched_operand(c: _Consumer, op, vals: list):
    """What consumer ``c`` (``op``: its equation, bound to a list of operands) reads beside
    the output gradient, from its operands ``vals`` (``None``: nothing): the batched operand
    (of ``mul``, ``dot_general``, a convolution or a ``gather``) or, for the elementwise
    primitives of :data:`_ELEMENTWISE`, the output's derivative by the parameter operand
    (:func:`_derivative`)."""
    if c.x_pos is None:
        return None
    if c.primitive not in _ELEMENTWISE:
        return vals[c.x_pos]
    return _derivative(op, c.pos, vals)


def _derivative(op, pos: int, vals: list) -> jax.Array:
    """``∂op(vals)/∂vals[pos]`` of an elementwise binary ``op``, one factor per output element
    (``vals[pos]`` broadcast), in float32 at least: the JVP of ``op`` with a unit tangent on
    operand ``pos``, by the primitive's own rule (``max``/``min`` split a tie evenly, ``pow``
    at a zero or negative base, as ``jax.grad`` does)."""
    acc = common.acc_dtype(jnp.result_type(*vals))
    vals = [jnp.asarray(v).astype(acc) for v in vals]

    def at(w):
        return op([*vals[:pos], w, *vals[pos + 1 :]])[0]

    return jax.jvp(at, (vals[pos],), (jnp.ones_like(vals[pos]),))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tap(consumer, n, form, y, x, slot):
    """Identity on ``y``. Its VJP turns the output gradient and the (detached) operand ``x``
    into per-example squared norms, returned as the cotangent of ``slot`` (a zero ``[B]``):
    the norms are computed inside the backward pass, as each output gradient arrives, and
    never leave it as activations."""
    del consumer, n, form, x, slot
    return y


def _tap_fwd(consumer, n, form, y, x, slot):
    del consumer, n, form
    return y, (x, slot)


def _tap_bwd(consumer, n, form, res, g):
    x, slot = res
    # The loss is a mean: scale by n, in float32 at least (a bfloat16 product would round).
    # Scaled by max|g| so that squares of tiny gradients (a loss scaled by 1e-20) do not
    # underflow when the squared norm itself is representable (as common.sq_norms). The
    # output's cotangent passes on in its own dtype.
    wide = g.astype(common.acc_dtype(g.dtype))
    m = jnp.max(jnp.abs(wide), initial=0.0)
    scale = jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)
    norms = _consumer_sq_norms(consumer, x, wide * (n / scale), form)
    return g, None, jnp.square(jnp.sqrt(norms) * scale).astype(slot.dtype)  # scale² may underflow


_tap.defvjp(_tap_fwd, _tap_bwd)


def _along_chain(flat: _Flat, c: _Consumer, seen: dict, leaves: list, slots: list):
    """The slots (``[n, *leaf]`` each) of ``c.leaf`` and ``c.others`` carried to consumer
    ``c``'s parameter operand, per example, by the derivative at ``leaves`` (their values) of
    the example-free equations ``c.chain`` that compute it (their other operands as they were
    evaluated): the VJP of this map takes the operand's per-example gradients back to the
    leaves'."""
    srcs, dst = [flat.invars[j] for j in (c.leaf, *c.others)], flat.eqns[c.eqn].ins[c.pos]

    def steps(*vs):
        return _replay(flat, c.chain, dict(zip(srcs, vs, strict=True)), seen)[dst]

    if not c.chain:
        return slots[0]
    ws = tuple(lax.stop_gradient(w) for w in leaves)

    def tangent(*dzs):
        return jax.jvp(steps, ws, tuple(d.astype(w.dtype) for d, w in zip(dzs, ws, strict=True)))[1]

    return jax.vmap(tangent)(*slots)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tap_parts(consumer, n, y, x, slot):
    """Identity on ``y``. Its VJP returns the per-example parts of the parameter operand's
    gradient (``[n, *operand]``, :func:`_operand_parts`) as the cotangent of ``slot``: the
    reads of a leaf add theirs up, mapped back to it (:func:`_along_chain`), in its slot's
    gradient: the per-example gradients."""
    del consumer, n, x, slot
    return y


def _tap_parts_fwd(consumer, n, y, x, slot):
    del consumer, n
    return y, (x, slot)


def _tap_parts_bwd(consumer, n, res, g):
    x, slot = res
    g32 = g.astype(common.acc_dtype(g.dtype))
    return g, None, _operand_parts(consumer, n, x, g32, slot.shape[1:]).astype(slot.dtype)


_tap_parts.defvjp(_tap_parts_fwd, _tap_parts_bwd)


def _operand_parts(c: _Consumer, n: int, x, g: jax.Array, shape) -> jax.Array:
    """Per-example parts ``[n, *shape]`` of the gradient of consumer ``c``'s parameter operand
    (of shape ``shape``): their sum over examples is that gradient."""
    if c.kind == "embed":
        return _embed_table(*_embed_inputs(c, n, x, g), c.vocab)
    if c.kind == "conv":  # [n, offsets, in, out] -> the kernel's layout
        conv, *xg = _channels_last(c, x, g)
        fn = functools.partial(_conv_example_parts, conv, groups=c.groups)
        parts = _in_chunks(fn, tuple(xg), c.chunks)  # [chunks, n / chunks, offsets, in, out]
        parts = parts.reshape(n, *conv[0], *parts.shape[-2:])  # [n, *window, in, out]
        return jnp.transpose(parts, (0, *(1 + np.asarray(c.w_perm))))
    _, parts = _per_example_parts(c, n, x, g)
    if c.kind == "dense":  # [n, s, k, c] in the layout (batch, contracted, free) of w
        lay = c.layout
        parts = parts.reshape(n, *lay.w_shape)
        return jnp.transpose(parts, (0, *(1 + np.argsort(lay.w_perm))))
    return parts.reshape(n, *shape)  # a broadcast parameter: the kept axes, in order


def _reusing(c: _Consumer, n: int, op, vals: list, slot: jax.Array) -> list:
    """The outputs of consumer ``c`` (``op(vals)``), differentiated so that the parameter's
    gradient comes from the per-example pieces of its norm (:func:`_per_example_parts`: the
    per-example kernel gradients of a ``dot_general`` in the direct form, the per-example sums
    of a broadcast parameter's gradient): they are computed once, in place of the plain
    gradient's product or reduction, and give the per-example squared norms (the cotangent of
    ``slot``). The other operands' gradients are the plain ones."""
    pos = c.pos
    others = [jnp.asarray(v) for k, v in enumerate(vals) if k != pos]

    def call(others, w):
        return op([*others[:pos], w, *others[pos:]])

    @jax.custom_vjp
    def f(others, w, slot):
        del slot
        return call(others, w)

    def fwd(others, w, slot):
        return call(others, w), (others, w, slot)

    def bwd(res, gs):
        others, w, slot = res
        (g_others,) = jax.vjp(lambda o: call(o, w), others)[1](gs)
        x = _batched_operand(c, op, [*others[:pos], w, *others[pos:]])
        if c.kind == "conv":
            conv, *xg = _channels_last(c, x, gs[0])
            parts = functools.partial(_conv_parts, conv, n, groups=c.groups)
            gw, norms = _in_chunks(parts, tuple(xg), c.chunks)
            gw, norms = jnp.transpose(jnp.sum(gw, axis=0), c.w_perm), norms.reshape(n)
        else:
            gw, norms = _norms_of(n, *_per_example_parts(c, n, x, gs[0]))
        return g_others, gw.reshape(w.shape).astype(w.dtype), norms.astype(slot.dtype)

    f.defvjp(fwd, bwd)
    return f(others, vals[pos], slot)


def _norms_of(n: int, gw: jax.Array, parts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(gw, squared norms of n·parts per example)`` (a mean loss: one example's gradient is
    ``n`` times its part), scaled by ``max|parts|`` against underflow."""
    m = jnp.max(jnp.abs(parts), initial=0.0)  # 0 for a leaf of no elements
    scale = jnp.where((m > 0) & jnp.isfinite(m), m, 1.0)
    norms = jnp.sum(jnp.square(parts * (n / scale)), axis=tuple(range(1, parts.ndim)))
    return gw, jnp.square(jnp.sqrt(norms) * scale)


def _conv_parts(
    conv, n: int, x: jax.Array, g: jax.Array, groups: int = 1
) -> tuple[jax.Array, jax.Array]:
    """A convolution kernel's gradient ``[*window, in / groups, out]`` and per-example squared
    norms from channels-last ``x`` and ``g`` (of the mean loss), by
    :func:`_conv_example_parts`."""
    parts = _conv_example_parts(conv, x, g, groups)
    gw = jnp.einsum("b,bokc->okc", jnp.ones((g.shape[0],), parts.dtype), parts)
    return _norms_of(n, gw.reshape(*conv[0], *gw.shape[1:]), parts)


def _conv_example_parts(conv, x: jax.Array, g: jax.Array, groups: int = 1) -> jax.Array:
    """Per-example parts ``[b, offsets, in / groups, out]`` of a convolution kernel's gradient
    from channels-last ``x`` and ``g``: per kernel offset, the per-example products of the
    input patches with ``g`` (their sum over examples is the kernel's gradient at that
    offset), within each of ``groups`` feature groups (group ``j``: the ``j``-th contiguous
    block of input and of output channels)."""
    acc = common.acc_dtype(g.dtype)
    b, cout = g.shape[0], g.shape[-1]
    g = g.reshape(b, -1, cout).astype(acc)
    gg = g.reshape(*g.shape[:2], groups, cout // groups)

    def product(p):  # [b, T, C_in] patches -> [b, C_in / groups, C_out]
        if groups == 1:
            return jnp.einsum("btk,btc->bkc", p.astype(acc), g)
        p = p.reshape(*p.shape[:2], groups, -1).astype(acc)
        return jnp.einsum("btgk,btgc->bkgc", p, gg).reshape(b, -1, cout)

    return jnp.stack([product(p) for p in _conv_pieces(x, conv)], 1)


def _per_example_parts(c: _Consumer, n: int, x, g) -> tuple[jax.Array, jax.Array]:
    """``(gradient of the parameter operand w, per-example parts [B, ...])`` of a consumer
    from the output gradient ``g`` (of the mean loss): the parameter's gradient is the sum of
    the parts over examples, one example's gradient (over ``n``) is its part."""
    acc = common.acc_dtype(g.dtype)
    if c.kind == "dense":
        lay = c.layout
        xr = jnp.transpose(x, lay.x_perm).reshape(n, lay.s, lay.t, lay.k).astype(acc)
        gr = jnp.transpose(g, lay.g_perm).reshape(n, lay.s, lay.t, lay.c).astype(acc)
        parts = jnp.einsum("bstk,bstc->bskc", xr, gr)
        gw = jnp.einsum("b,bskc->skc", jnp.ones((n,), acc), parts).reshape(lay.w_shape)
        return jnp.transpose(gw, np.argsort(lay.w_perm)), parts
    h = g.astype(acc) * x.astype(acc) if x is not None else g.astype(acc)
    h = jnp.sum(h, axis=c.sum_axes, keepdims=True) if c.sum_axes else h
    if c.primitive == "sub" and c.pos == 1:
        h = -h
    return jnp.sum(h, axis=c.axis), jnp.moveaxis(h, c.axis, 0)


def _with_fallback(
    loss_fn, params, batch, the_plan, grads, sq, has_aux, axis_name, chunk_size, n, aux
):
    """Fill the fallback leaves' squared-norm sums (by vmap, or estimated from microbatches:
    :func:`_from_microbatches`); returns ``(grad_sum, sq_sum, aux)``."""
    treedef = jax.tree.structure(grads)
    if the_plan.fallback:
        fb = the_plan.fallback
        params_leaves = jax.tree.leaves(params)

        def loss_fb(sub, b):
            new = list(params_leaves)
            for j, v in zip(fb, sub, strict=True):
                new[j] = v
            return loss_fn(jax.tree.unflatten(treedef, new), b)

        sub = [params_leaves[j] for j in fb]
        if the_plan.fallback_microbatches:
            mean = [jax.tree.leaves(grads)[j] for j in fb]
            k = the_plan.fallback_microbatches
            sub_sq = _from_microbatches(loss_fb, sub, batch, mean, k, has_aux, axis_name)
        else:
            chunk = n if chunk_size is None else min(chunk_size, n)
            _, sub_sq, _ = common.vmap_sums(loss_fb, sub, batch, n, chunk, axis_name, has_aux)
        for j, s in zip(fb, sub_sq, strict=True):
            sq[j] = s
    grad_sum = jax.tree.map(lambda g: g.astype(common.acc_dtype(g.dtype)) * n, grads)
    sq = [s.astype(common.acc_dtype(s.dtype)) for s in sq]
    return grad_sum, jax.tree.unflatten(treedef, sq), aux


def _from_microbatches(loss_fn, params, batch, mean, k: int, has_aux: bool, axis_name) -> list:
    """An unbiased estimate of ``Σ_i |g_i|²`` over the examples, per leaf of ``params`` (a
    list), from the gradients of ``k`` equal microbatches (:func:`_microbatch_sq_sums`);
    ``mean``: the leaves' mean gradients."""
    _, sq_sum, _ = _microbatch_sums(loss_fn, params, batch, k, has_aux, axis_name)
    return _microbatch_sq_sums(sq_sum, mean, common.batch_size(batch), k)


def _microbatch_sums(loss_fn, params, batch, k: int, has_aux: bool, axis_name):
    """``(Σ g_μ, Σ |g_μ|², aux)`` over ``k`` equal microbatches of ``batch``, in turn: the
    microbatch estimator's loop (:func:`gns.common.microbatch_sums`), unrolled as it is."""
    unroll = common.scan_unroll(common.convolves(loss_fn, params, batch))
    return common.microbatch_sums(loss_fn, params, batch, k, axis_name, has_aux, unroll)


def _microbatch_sq_sums(sq_sum, mean, n: int, k: int) -> list:
    """From the sum over ``k`` microbatches (of ``m = n/k``) of their gradients' squared norms
    (``S`` their mean) and the mean gradient: ``tr Σ ≈ (S - |G|²)/(1/m - 1/n)`` and
    ``Σ_i |g_i|² ≈ n(|G|² + (1 - 1/n) tr Σ)``, per leaf. Averaged over the ways to split the
    batch it is the per-example sum itself; one split is noisier."""
    m, out = n // k, []
    for g, s in zip(jax.tree.leaves(mean), jax.tree.leaves(sq_sum), strict=True):
        big = common.sq_norms(g)
        trace = (s / k - big) / (1 / m - 1 / n)
        out.append(n * (big + (1 - 1 / n) * trace))
    return out


def _all_from_microbatches(loss_fn, params, batch, k: int, has_aux: bool, axis_name):
    """:func:`sums` with every leaf's sum of per-example squared norms estimated from ``k``
    microbatch gradients, whose mean is the mean gradient: the microbatch estimator's cost."""
    n = common.batch_size(batch)
    grad_sum, sq_sum, aux = _microbatch_sums(loss_fn, params, batch, k, has_aux, axis_name)
    sq = _microbatch_sq_sums(sq_sum, jax.tree.map(lambda g: g / k, grad_sum), n, k)
    grad_sum = jax.tree.map(lambda g: g * (n / k), grad_sum)
    return grad_sum, jax.tree.unflatten(jax.tree.structure(params), sq), aux


def per_example_sq_norms(
    loss_fn: Callable, params: PyTree, batch: PyTree, *, has_aux: bool = False, form="auto"
) -> PyTree:
    """The per-leaf sum over examples of per-example squared gradient norms (fast path).

    Equal to ``jax.tree.map(lambda g: jnp.sum(g**2), jax.vmap(jax.grad(loss_fn))(...))`` over
    batches of one example, without materializing per-example gradients of covered leaves.

    Example:
      >>> def loss_fn(p, x):
      ...     return jnp.mean((x @ p["w"] + p["b"]) ** 2)
      >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
      >>> sq = per_example_sq_norms(loss_fn, params, jnp.ones((8, 4)))
      >>> sorted(sq)
      ['b', 'w']
    """
    the_plan = plan(loss_fn, params, batch, has_aux=has_aux)
    _, sq, _ = sums(loss_fn, params, batch, the_plan, has_aux=has_aux, form=form)
    return sq
