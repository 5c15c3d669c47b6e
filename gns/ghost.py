"""Per-example squared gradient norms without per-example gradients ("ghost norms").

The noise scale needs, for every parameter leaf, the sum over examples of the squared norms of
the per-example gradients, and the mean gradient. For a ``Dense`` or ``Conv`` layer, one
example's kernel gradient is ``Σ_t p_t g_tᵀ`` over the output positions ``t``, with ``p_t`` the
input patch at ``t`` (the input itself for ``Dense``) and ``g_t`` the gradient of that example's
loss at the layer output. Its squared norm is either

* **direct**: ``‖Σ_t p_t g_tᵀ‖²`` (cost ``T·K·C`` per example), or
* **Gram**: ``Σ_{t,t'} (p_t·p_t')(g_t·g_t')`` (cost ``T²·(K+C)``),

and the cheaper one is used per layer (``T`` positions, ``K`` patch size, ``C`` outputs). The
bias gradient is ``Σ_t g_t``. For ``GroupNorm``/``LayerNorm``/``RMSNorm`` (output
``x̂·scale + bias``) the scale gradient is ``Σ_t g_t ⊙ x̂_t`` and the bias gradient ``Σ_t g_t``.

``loss_fn(params, batch)`` is opaque (it closes over ``model.apply``), so the layers are found
by intercepting Flax Linen module calls in its dynamic scope (``nn.intercept_methods``):

1. **Plan** (tracing only, no FLOPs): ``jax.eval_shape`` of ``loss_fn`` on the batch and on one
   example records, in call order, every ``Dense``/``Conv``/norm call, its input and output
   shapes, its configuration, and which leaves of ``params`` it reads (by object identity of the
   traced leaves). A call is *covered* when its layer is supported, its leading axis is the
   example axis (size ``B`` on the batch, ``1`` on one example), each of its parameters is a leaf
   of ``params`` read by no other call (weight sharing has cross terms between calls: such
   leaves go to the fallback) and used by ``loss_fn`` nowhere else (a weight penalty inside
   ``loss_fn``, tied embeddings: checked structurally on the JVP jaxpr with the covered layer
   outputs detached).
2. **One backward pass**: ``jax.grad`` of ``loss_fn`` with respect to ``(params, slots)``,
   where the interceptor wraps the output of each covered call in an identity with a custom
   VJP (``_tap``) holding the layer input (or ``x̂``). In the backward pass the tap receives
   ``∂(mean loss)/∂(output)``, which times ``B`` (the loss is a mean) is the per-example output
   gradient ``g``, contracts it with the input per example (step 3), and returns the
   per-example squared norms as the gradient of ``slots`` (zeros ``[B]`` per parameter). The
   parameter gradient is the mean gradient. This is the zero-perturbation trick with the
   contraction done where ``g`` appears, so no per-example tensor outlives its layer.
3. Contract ``g`` with the layer input per example, as above. Convolution patches are strided
   slices of the padded input, one per kernel offset, never concatenated (the norms are sums
   over offsets, the patch Gram a sum of offset Grams).

Leaves no covered call owns (custom ``self.param``, ``Embed``, shared layers, layers inside
lifted transforms, ...) fall back to per-example gradients by ``jax.vmap`` restricted to those
leaves (chunked with ``chunk_size``).

Use it through :func:`gns.estimate.per_example` (``method="auto"`` or ``"ghost"``); this
module returns the local sums that :func:`gns.estimate.per_example` reduces.

References: Goodfellow, "Efficient per-example gradient computations" (2015); Li et al., "Large
language models can be strong differentially private learners" (2021, ghost clipping); Bu et
al., "Scalable and efficient training of large convolutional neural networks with differential
privacy" (2022, mixed ghost norm); Gray et al., "Normalization layer per-example gradients are
sufficient to predict gradient noise scale in transformers" (2024).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
from jax import lax

from gns import common

PyTree = Any

__all__ = ["NotApplicableError", "Plan", "plan", "sums", "per_example_sq_norms", "FORMS"]

FORMS = ("auto", "direct", "gram")
_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_CANDIDATE_TYPES = (nn.Dense, nn.Conv) + _NORM_TYPES


class NotApplicableError(ValueError):
    """The fast path cannot cover any parameter of this ``loss_fn``."""


@dataclasses.dataclass(frozen=True)
class _Call:
    """Static description of one intercepted layer call (no arrays)."""

    kind: str  # "dense" | "conv" | "norm"
    path: str  # module path, for messages
    leaves: tuple[tuple[str, int], ...]  # (param name, flat index in params)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any
    conv: tuple | None  # (kernel_size, strides, padding, kernel_dilation)
    reason: str  # "" when covered, else why not

    @property
    def covered(self) -> bool:
        return not self.reason


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which layer calls the fast path covers, and which leaves fall back to vmap.

    Attributes:
      calls: every intercepted candidate call, in call order.
      fallback: flat indices (in ``jax.tree.leaves(params)`` order) of the leaves no covered
        call owns; their per-example norms come from ``jax.vmap``.
      num_leaves: number of leaves of ``params``.
    """

    calls: tuple[_Call, ...]
    fallback: tuple[int, ...]
    num_leaves: int

    def describe(self) -> str:
        """One line per call: covered or why not."""
        return "\n".join(
            f"{c.path} ({c.kind}): " + ("covered" if c.covered else f"fallback: {c.reason}")
            for c in self.calls
        )


# ---------------------------------------------------------------------------------------------
# Interception.


def _is_candidate(context) -> bool:
    return context.method_name == "__call__" and type(context.module) in _CANDIDATE_TYPES


def _first_arg(args, kwargs):
    if args:
        return args[0]
    for name in ("inputs", "x"):
        if name in kwargs:
            return kwargs[name]
    return None


def _layer_config(module, x, leaf_ids: dict[int, int]):
    """(kind, leaves, conv config, reason) of a candidate call, static information only."""
    kind = "norm" if isinstance(module, _NORM_TYPES) else type(module).__name__.lower()
    variables = module.variables
    if set(variables) - {"params"}:
        return kind, (), None, f"has non-param collections {sorted(set(variables))}"
    module_params = dict(variables.get("params", {}))
    leaves = []
    for name, value in module_params.items():
        if not isinstance(value, jax.Array) or id(value) not in leaf_ids:
            return kind, (), None, f"param {name!r} is not a leaf of params as passed to loss_fn"
        leaves.append((name, leaf_ids[id(value)]))
    names = {n for n, _ in leaves}
    reason = ""
    conv = None
    if x is None or not hasattr(x, "shape"):
        reason = "input not found"
    elif kind == "dense":
        kernel = module_params.get("kernel")
        if kernel is None or kernel.shape != (x.shape[-1], module.features) or x.ndim < 2:
            reason = "unexpected kernel/input shapes"
        elif module.dot_general is not None or module.dot_general_cls is not None:
            reason = "custom dot_general"
    elif kind == "conv":
        kernel = module_params.get("kernel")
        nsp = x.ndim - 2
        padding = nn.linear.canonicalize_padding(module.padding, max(nsp, 0))

        def tup(v):
            return (v,) * nsp if v is None or isinstance(v, int) else tuple(v)

        if kernel is None or kernel.ndim != x.ndim or nsp < 1:
            reason = "input must have exactly one batch axis"
        elif module.feature_group_count != 1 or module.mask is not None:
            reason = "grouped or masked convolution"
        elif tup(module.input_dilation) not in ((None,) * nsp, (1,) * nsp):
            reason = "input dilation"
        elif isinstance(padding, str) and padding not in ("SAME", "VALID"):
            reason = f"padding {padding!r}"
        elif module.conv_general_dilated is not None or module.conv_general_dilated_cls:
            reason = "custom conv_general_dilated"
        else:
            strides = tuple(1 if s is None else s for s in tup(module.strides))
            dil = tuple(1 if d is None else d for d in tup(module.kernel_dilation))
            pad = padding if isinstance(padding, str) else tuple(map(tuple, padding))
            conv = (tuple(kernel.shape[:nsp]), strides, pad, dil)
    else:  # norm: output x̂·scale + bias with scale and bias over the last axis
        if not names or names - {"scale", "bias"}:
            reason = "no scale/bias params"
        elif any(module_params[n].shape != (x.shape[-1],) for n in names):
            reason = "scale/bias not over the last axis only"
        elif x.ndim < 2:
            reason = "input without batch axis"
    if kind in ("dense", "conv") and not reason and names - {"kernel", "bias"}:
        reason = f"unexpected params {sorted(names)}"
    return kind, tuple(leaves), conv, reason


def _normalized(module, x):
    """``x̂``: the norm layer applied without its scale and bias (same epsilon, groups, dtype)."""
    fields = {f: False for f in ("use_scale", "use_bias") if hasattr(module, f)}
    return module.clone(parent=None, **fields).apply({}, x)


class _Interceptor:
    """Counts candidate calls in order; subclasses decide what to do with each."""

    def __init__(self):
        self.index = 0
        self.busy = False  # our own module calls (x̂) are not intercepted

    def __call__(self, next_fun, args, kwargs, context):
        if self.busy or not _is_candidate(context):
            return next_fun(*args, **kwargs)
        i = self.index
        self.index += 1
        return self.handle(i, next_fun, args, kwargs, context)

    def handle(self, i, next_fun, args, kwargs, context):  # pragma: no cover - abstract
        raise NotImplementedError

    @contextlib.contextmanager
    def own_calls(self):
        self.busy = True
        try:
            yield
        finally:
            self.busy = False


def _loss_only(loss_fn, has_aux):
    return (lambda p, b: loss_fn(p, b)[0]) if has_aux else loss_fn


def _record_calls(loss_fn, params, batch, has_aux):
    """eval_shape ``loss_fn`` under an interceptor; the static info of every candidate call."""
    records = []
    loss = _loss_only(loss_fn, has_aux)

    class Record(_Interceptor):
        def handle(self, i, next_fun, args, kwargs, context):
            x = _first_arg(args, kwargs)
            y = next_fun(*args, **kwargs)
            kind, leaves, conv, reason = _layer_config(context.module, x, self.leaf_ids)
            if not reason and not isinstance(y, jax.Array):
                reason = "output is not one array"
            if kind == "norm" and not reason and kwargs.get("mask") is not None:
                reason = "masked normalization"
            records.append(
                _Call(
                    kind=kind,
                    path="/".join(context.module.path) or type(context.module).__name__,
                    leaves=leaves,
                    in_shape=tuple(x.shape) if hasattr(x, "shape") else (),
                    out_shape=tuple(getattr(y, "shape", ())),
                    out_dtype=getattr(y, "dtype", None),
                    conv=conv,
                    reason=reason,
                )
            )
            return y

    def traced(p, b):
        icpt = Record()
        icpt.leaf_ids = {id(leaf): j for j, leaf in enumerate(jax.tree.leaves(p))}
        with nn.intercept_methods(icpt):
            return loss(p, b)

    jax.eval_shape(traced, params, batch)
    return records


def _extra_uses(loss_fn, params, batch, has_aux, calls) -> set[int]:
    """Flat indices of covered leaves that reach the loss other than through their layer.

    Differentiates (forward mode, symbolically) the loss with respect to the covered leaves with
    every covered layer output detached; a leaf whose tangent still reaches the output is used
    elsewhere (a penalty in ``loss_fn``, a tied weight). Conservative dependency analysis of the
    traced JVP: a false alarm only costs speed (that leaf goes to the fallback).
    """
    owned = sorted({j for c in calls if c.covered for _, j in c.leaves})
    if not owned:
        return set()
    leaves, treedef = jax.tree.flatten(params)
    loss = _loss_only(loss_fn, has_aux)

    class Detach(_Interceptor):
        def handle(self, i, next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            return lax.stop_gradient(y) if calls[i].covered else y

    def detached(values):
        new = list(leaves)
        for j, v in zip(owned, values, strict=True):
            new[j] = v
        with nn.intercept_methods(Detach()):
            return loss(jax.tree.unflatten(treedef, new), batch)

    values = [leaves[j] for j in owned]
    closed = jax.make_jaxpr(lambda v, t: jax.jvp(detached, (v,), (t,))[1])(values, values)
    jaxpr = closed.jaxpr
    n_in = len(owned)
    deps: dict[Any, frozenset] = {}
    for k, var in enumerate(jaxpr.invars[n_in:]):  # the tangents
        deps[var] = frozenset([owned[k]])

    def dep(v):
        return deps.get(v, frozenset()) if not isinstance(v, jax.extend.core.Literal) else set()

    for eqn in jaxpr.eqns:
        d = frozenset().union(*(dep(v) for v in eqn.invars))
        if d:
            for v in eqn.outvars:
                deps[v] = d
    return set().union(*(dep(v) for v in jaxpr.outvars))


def plan(loss_fn, params, batch, *, has_aux: bool = False) -> Plan:
    """Find the Linen layer calls of ``loss_fn`` whose per-example norms have a closed form.

    Tracing only (no computation). Raises :class:`NotApplicableError` when no call is covered
    (no Flax Linen ``Dense``/``Conv``/norm layer reading a leaf of ``params``).

    Args:
      loss_fn: ``loss_fn(params, batch)`` mean loss (``(loss, aux)`` with ``has_aux``).
      params: the parameters (any pytree; arrays or ``jax.ShapeDtypeStruct``).
      batch: the batch (leading example axis).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A :class:`Plan`; ``print(plan(...).describe())`` says what is covered and why not.
    """
    n = common.batch_size(batch)
    calls = _record_calls(loss_fn, params, batch, has_aux)
    one = jax.tree.map(lambda x: x[:1], batch)
    calls_one = _record_calls(loss_fn, params, one, has_aux)
    if [(c.path, c.kind) for c in calls_one] != [(c.path, c.kind) for c in calls]:
        calls_one = [None] * len(calls)  # the call sequence depends on the batch size
    checked = []
    for c, c1 in zip(calls, calls_one, strict=True):
        reason = c.reason
        if not reason:
            per_example_axis = (
                c1 is not None
                and c.in_shape[:1] == c.out_shape[:1] == (n,)
                and c1.in_shape == (1,) + c.in_shape[1:]
                and c1.out_shape == (1,) + c.out_shape[1:]
            )
            if not per_example_axis:
                reason = "leading axis of its input/output is not the example axis"
        checked.append(dataclasses.replace(c, reason=reason))
    # A leaf read by several calls (weight sharing) goes to the fallback for every such call.
    readers: dict[int, int] = {}
    for c in checked:
        for _, j in c.leaves:
            readers[j] = readers.get(j, 0) + 1
    checked = [
        dataclasses.replace(c, reason="parameters shared with another call")
        if c.covered and any(readers[j] > 1 for _, j in c.leaves)
        else c
        for c in checked
    ]
    elsewhere = _extra_uses(loss_fn, params, batch, has_aux, checked)
    checked = tuple(
        dataclasses.replace(c, reason="parameters also used outside the layer")
        if c.covered and any(j in elsewhere for _, j in c.leaves)
        else c
        for c in checked
    )
    num_leaves = len(jax.tree.leaves(params))
    owned = {j for c in checked if c.covered for _, j in c.leaves}
    if not owned:
        detail = Plan(checked, (), num_leaves).describe()
        raise NotApplicableError(
            "the fast per-example path covers no parameter of this loss_fn: it needs Flax Linen "
            "nn.Dense/nn.Conv/nn.GroupNorm/nn.LayerNorm/nn.RMSNorm calls reading leaves of "
            "`params` inside loss_fn"
            + (f" (intercepted calls:\n{detail}\n)" if detail else " (none were called)")
            + ". Use method='vmap' (or 'auto', which falls back to it)."
        )
    fallback = tuple(j for j in range(num_leaves) if j not in owned)
    return Plan(checked, fallback, num_leaves)


# ---------------------------------------------------------------------------------------------
# Per-example squared norms from layer inputs and output gradients.


def _cost(t: int, k: int, c: int) -> tuple[int, int]:
    """(direct, Gram) multiply-adds per example of the kernel norm."""
    return t * k * c, t * t * (k + c)


def _pick(form: str, t: int, k: int, c: int) -> str:
    if form != "auto":
        return form
    direct, gram = _cost(t, k, c)
    return "gram" if gram < direct else "direct"


def _kernel_sq(pieces: list[jax.Array], g: jax.Array, form: str) -> jax.Array:
    """Per-example ``‖Σ_t p_t g_tᵀ‖²``, shape ``[B]``.

    Args:
      pieces: the input patches ``p: [B, T, K]`` split along ``K`` into pieces ``[B, T, K_o]``
        (one per kernel offset of a convolution, the whole input of a ``Dense``). The squared
        norm is a sum over pieces (direct) and the patch Gram a sum of piece Grams, so the
        patches are never concatenated.
      g: output gradients ``[B, T, C]``.
      form: ``"direct"``, ``"gram"`` or ``"auto"`` (fewer multiply-adds).
    """
    t, c = g.shape[1], g.shape[2]
    form = _pick(form, t, sum(p.shape[-1] for p in pieces), c)
    if form == "direct":
        return sum(
            jnp.sum(jnp.square(jnp.einsum("btk,btc->bkc", p, g)), axis=(1, 2)) for p in pieces
        )
    if t == 1:  # rank one: ‖p‖²·‖g‖²
        return sum(jnp.sum(jnp.square(p), axis=(1, 2)) for p in pieces) * jnp.sum(
            jnp.square(g), axis=(1, 2)
        )
    pp = sum(jnp.einsum("btk,bsk->bts", p, p) for p in pieces)
    gg = jnp.einsum("btc,bsc->bts", g, g)
    return jnp.sum(pp * gg, axis=(1, 2))


def _conv_pieces(x: jax.Array, conv) -> list[jax.Array]:
    """The input patches of a channels-last convolution, one ``[B, T, C_in]`` slice of the
    padded input per kernel offset (strided slices: no patch-extraction convolution, whose
    one-hot filter would cost ``K²`` multiply-adds per position)."""
    kernel_size, strides, padding, dilation = conv
    spatial = x.shape[1:-1]
    dilated = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True))
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(spatial, dilated, strides, padding)
    config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding] + [(0, 0, 0)]
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


def _call_sq_norms(call: _Call, x: jax.Array, g: jax.Array, form: str) -> dict[str, jax.Array]:
    """Per-example squared norms ``[B]`` of each parameter of one covered call."""
    b, c = g.shape[0], g.shape[-1]
    g = g.astype(jnp.float32).reshape(b, -1, c)
    x = x.astype(jnp.float32)
    names = dict(call.leaves)
    out = {}
    if call.kind == "norm":
        xhat = x.reshape(b, -1, c)
        if "scale" in names:
            out["scale"] = jnp.sum(jnp.square(jnp.sum(g * xhat, axis=1)), axis=-1)
    else:
        if call.kind == "conv":
            pieces = _conv_pieces(x, call.conv)
        else:
            pieces = [x.reshape(b, -1, x.shape[-1])]
        if pieces[0].shape[1] != g.shape[1]:
            raise RuntimeError(
                f"{call.path}: {pieces[0].shape[1]} input positions, {g.shape[1]} out"
            )
        out["kernel"] = _kernel_sq(pieces, g, form)
    if "bias" in names:
        out["bias"] = jnp.sum(jnp.square(jnp.sum(g, axis=1)), axis=-1)
    return out


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
    """Local sums for the noise statistics: one backward pass plus ghost norms.

    Args:
      loss_fn, params, batch, has_aux: as for :func:`gns.estimate.per_example`; ``params``
        already cast to device-varying when ``axis_name`` is set.
      the_plan: from :func:`plan` on the same ``loss_fn`` and shapes.
      axis_name: the data-parallel axis (the slots are cast to device-varying, so their
        gradients stay local).
      chunk_size: examples per vmap chunk for the fallback leaves.
      form: ``"auto"`` (cheaper of direct and Gram per layer), ``"direct"`` or ``"gram"``.

    Returns:
      ``(grad_sum, sq_sum, aux)``: the sum over this device's examples of their gradients
      (``n`` times the mean gradient), the per-leaf sum of their squared norms, and the aux of
      the one ``loss_fn`` call on the whole local batch (``None`` without ``has_aux``).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
    n = common.batch_size(batch)
    calls = the_plan.calls
    covered = [c for c in calls if c.covered]
    slot_of = {id(c): k for k, c in enumerate(covered)}
    slots = [{name: jnp.zeros((n,), jnp.float32) for name, _ in c.leaves} for c in covered]
    slots = common.to_varying(slots, axis_name)  # keep their gradients device-local

    def tapped(p, zs):
        class Tap(_Interceptor):
            def handle(self, i, next_fun, args, kwargs, context):
                y = next_fun(*args, **kwargs)
                if i >= len(calls) or not calls[i].covered:
                    return y
                x = _first_arg(args, kwargs)
                if calls[i].kind == "norm":
                    with self.own_calls():
                        x = _normalized(context.module, x)
                x = lax.stop_gradient(x)
                return _tap(calls[i], n, form, y, x, zs[slot_of[id(calls[i])]])

        icpt = Tap()
        with nn.intercept_methods(icpt):
            out = loss_fn(p, batch)
        if icpt.index != len(calls):
            raise RuntimeError(
                f"loss_fn made {icpt.index} layer calls, {len(calls)} when planned: the fast "
                "path needs the same calls on every trace. Use method='vmap'."
            )
        return out if has_aux else (out, None)

    grad_fn = jax.grad(tapped, argnums=(0, 1), has_aux=True)
    (grads, slot_grads), aux = grad_fn(params, slots)
    sq = [None] * the_plan.num_leaves
    for call, norms in zip(covered, slot_grads, strict=True):
        for name, j in call.leaves:
            sq[j] = jnp.sum(norms[name])
    return _with_fallback(
        loss_fn, params, batch, the_plan, grads, sq, has_aux, axis_name, chunk_size, n, aux
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tap(call, n, form, y, x, slots):
    """Identity on ``y``. Its VJP turns the output gradient and the (detached) layer input
    ``x`` into per-example squared norms, returned as the cotangent of ``slots`` (a zero ``[B]``
    per parameter): the norms are computed inside the backward pass, as each layer's output
    gradient arrives, and never leave it as activations."""
    del call, n, form, x, slots
    return y


def _tap_fwd(call, n, form, y, x, slots):
    del call, n, form
    return y, (x, slots)


def _tap_bwd(call, n, form, res, g):
    x, slots = res
    norms = _call_sq_norms(call, x, g * n, form)  # the loss is a mean: scale by n
    cot = {name: norms[name].astype(slots[name].dtype) for name in slots}
    return g, jnp.zeros_like(x), cot


_tap.defvjp(_tap_fwd, _tap_bwd)


def _with_fallback(
    loss_fn, params, batch, the_plan, grads, sq, has_aux, axis_name, chunk_size, n, aux
):
    """Fill the fallback leaves' squared-norm sums by vmap; returns ``(grad_sum, sq_sum, aux)``."""
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
        chunk = n if chunk_size is None else min(chunk_size, n)
        _, sub_sq, _ = common.vmap_sums(loss_fb, sub, batch, n, chunk, axis_name, has_aux)
        for j, s in zip(fb, sub_sq, strict=True):
            sq[j] = s
    grad_sum = jax.tree.map(lambda g: g * n, grads)
    return grad_sum, jax.tree.unflatten(treedef, sq), aux


def per_example_sq_norms(
    loss_fn: Callable, params: PyTree, batch: PyTree, *, has_aux: bool = False, form="auto"
) -> PyTree:
    """The per-leaf sum over examples of per-example squared gradient norms (fast path).

    Equal to ``jax.tree.map(lambda g: jnp.sum(g**2), jax.vmap(jax.grad(loss_fn))(...))`` over
    batches of one example, without materializing per-example gradients of covered layers.

    Example:
      >>> model = nn.Dense(3)
      >>> x = jnp.ones((8, 4))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> def loss_fn(p, x):
      ...     return jnp.mean(model.apply({"params": p}, x) ** 2)
      >>> sq = per_example_sq_norms(loss_fn, params, x)
      >>> sorted(sq)
      ['bias', 'kernel']
    """
    the_plan = plan(loss_fn, params, batch, has_aux=has_aux)
    _, sq, _ = sums(loss_fn, params, batch, the_plan, has_aux=has_aux, form=form)
    return sq
