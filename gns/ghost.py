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

Covered layers (Flax Linen):

* ``nn.Dense``, ``nn.DenseGeneral`` (any ``axis``/``features`` not touching the example axis,
  no ``batch_dims``: the query/key/value and output projections of
  ``nn.MultiHeadDotProductAttention``/``nn.SelfAttention``) and ``nn.Einsum`` (an equation
  whose letters are the example axis of the input, plus letters shared by input, kernel and
  output, e.g. heads): all are reduced to the ``[B·S, T, K]`` / ``[B·S, T, C]`` form above.
* ``nn.Conv`` (no groups, no input dilation).
* ``nn.GroupNorm``, ``nn.LayerNorm``, ``nn.RMSNorm``.
* ``nn.Embed``: one example's table gradient is ``Σ_t e_{tok_t} g_tᵀ``, its squared norm the
  token-equality Gram ``Σ_{t,t'} [tok_t = tok_t'] (g_t·g_t')`` or, when cheaper, the direct
  scatter-add into a per-example ``[vocab, features]`` table. Tokens outside ``[0, vocab)``
  (``jnp.take`` fills them, so they get no gradient) count for nothing; a padding token whose
  loss is masked has ``g_t = 0`` and counts for nothing either.
* :class:`AddPositionEmbedding`: a learned position embedding added to the input
  (``x + embedding[:T]``). One example's gradient is its output gradient itself, so its squared
  norm is ``Σ_t ‖g_t‖²``. A position embedding written as a bare ``self.param`` added to the
  input is not recognizable as a layer call and falls back; use this module instead (same
  parameter, same initializer argument).

``loss_fn(params, batch)`` is opaque (it closes over ``model.apply``), so the layers are found
by intercepting Flax Linen module calls in its dynamic scope (``nn.intercept_methods``):

1. **Plan** (tracing only, no FLOPs): ``jax.eval_shape`` of ``loss_fn`` on the batch and on one
   example records, in call order, every candidate layer call, its input and output shapes,
   its configuration, and which leaves of ``params`` it reads (by object identity of the
   traced leaves). A call is *covered* when its layer is supported, its leading axis is the
   example axis (size ``B`` on the batch, ``1`` on one example), each of its parameters is a leaf
   of ``params`` read by no other call (weight sharing has cross terms between calls: such
   leaves go to the fallback) and used by ``loss_fn`` nowhere else (a weight penalty inside
   ``loss_fn``, tied embeddings: checked structurally on the JVP jaxpr with the covered layer
   outputs detached). The plan also holds a **cost model** (below).
2. **One backward pass**: ``jax.grad`` of ``loss_fn`` with respect to ``(params, slots)``,
   where the interceptor wraps the output of each covered call in an identity with a custom
   VJP (``_tap``) holding the layer input (or ``x̂``, or the tokens). In the backward pass the
   tap receives ``∂(mean loss)/∂(output)``, which times ``B`` (the loss is a mean) is the
   per-example output gradient ``g``, contracts it with the input per example (step 3), and
   returns the per-example squared norms as the gradient of ``slots`` (zeros ``[B]`` per
   parameter). The parameter gradient is the mean gradient. This is the zero-perturbation
   trick with the contraction done where ``g`` appears, so no per-example tensor outlives its
   layer.
3. Contract ``g`` with the layer input per example, as above. Convolution patches are strided
   slices of the padded input, one per kernel offset, never concatenated (the norms are sums
   over offsets, the patch Gram a sum of offset Grams).

Leaves no covered call owns (custom ``self.param``, shared layers, layers inside lifted
transforms, ...) fall back to per-example gradients by ``jax.vmap`` restricted to those leaves
(chunked with ``chunk_size``). That fallback backpropagates per example through everything
above its deepest leaf, so a fallback leaf near the input costs about a whole ``vmap`` pass.

**Cost model.** For each covered call the plan counts FLOPs and bytes (of the per-example
intermediates) of each form (direct, Gram, and the per-example gradient that ``vmap`` would
materialize for it), and picks the cheaper form at ``flops + FLOPS_PER_BYTE[backend] · bytes``.
For the whole ``loss_fn`` it compares the fast path (one backward pass, the chosen forms, and
the fallback's ``vmap`` pass when any leaf falls back) with plain ``vmap`` (same backward work
per example plus ``B × params`` per-example gradients); :attr:`Plan.method` is the cheaper,
which :func:`select` (``per_example(method="auto")``) follows. A convolution whose per-example
intermediates (in its chosen form) would exceed :data:`CHUNK_BYTES` for the whole batch
computes its norms over example chunks in turn (``jax.lax.map``), which bounds the extra
memory. ``Plan.describe()`` prints every call (covered, in which form, in how many chunks, at
what cost, or why not), every fallback leaf and why, and the decision.

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

__all__ = [
    "NotApplicableError",
    "Plan",
    "plan",
    "select",
    "sums",
    "per_example_sq_norms",
    "AddPositionEmbedding",
    "FORMS",
    "FLOPS_PER_BYTE",
    "CHUNK_BYTES",
]

FORMS = ("auto", "direct", "gram")
_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)

# A convolution's kernel norms (patches, Gram matrices or per-example kernel gradients) are
# computed over example chunks in turn (a rolled loop) when these intermediates would exceed
# this many bytes for the whole batch: it bounds the fast path's extra memory (SmallCNN at
# batch 128: 1.75x -> 1.40x the compiled temp memory of a plain gradient, its convolutions of
# 4, 9 and 5 MB in 2, 4 and 2 chunks), at the same speed on 2 CPU cores (paired medians).
CHUNK_BYTES = 4 * 2**20

# Rough machine balance (FLOPs one byte of memory traffic costs in time), by JAX backend: the
# cost model weighs the per-example intermediates' bytes against FLOPs with it. Only the
# order of magnitude matters (it decides between forms whose costs differ severalfold).
FLOPS_PER_BYTE = {"cpu": 8.0, "gpu": 100.0, "tpu": 200.0}


# How much slower than the plain step's one large weight-gradient product ``vmap``'s batch of
# per-example products runs, as extra multiples of its FLOPs. Calibrated on 2 CPU cores
# (``make bench``): per-example convolutions (a grouped convolution per batch) made vmap 3.6x a
# plain SmallCNN step, batched matmuls made it 2.2x a plain 2-layer Transformer step.
_VMAP_SLOWDOWN = {"conv": 4.0, "dense": 1.0}


class NotApplicableError(ValueError):
    """The fast path cannot cover any parameter of this ``loss_fn``."""


class AddPositionEmbedding(nn.Module):
    """``x + embedding[:T]``: a learned position embedding the fast path recognizes.

    The same computation as the usual ``x + self.param("pos", init, (max_length, features))``,
    as a module, so that :mod:`gns.ghost` intercepts it: one example's gradient of the
    embedding is that example's output gradient (rows ``0..T-1``), its squared norm
    ``Σ_t ‖g_t‖²``, computed in the backward pass without per-example gradients.

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


_CANDIDATE_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed, AddPositionEmbedding)
_CANDIDATE_TYPES += _NORM_TYPES
_KINDS = {nn.Dense: "dense", nn.DenseGeneral: "dense", nn.Einsum: "dense", nn.Conv: "conv"}
_KINDS |= {nn.Embed: "embed", AddPositionEmbedding: "position"}


def _prod(values) -> int:
    return functools.reduce(lambda a, b: a * int(b), values, 1)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a contraction layer's input and output gradient map to ``[B·S, T, K]`` and
    ``[B·S, T, C]``: transpose by ``x_perm``/``g_perm``, then reshape. ``t_axes``: the axes of
    the output gradient that the bias gradient sums over (the positions)."""

    x_perm: tuple[int, ...]
    g_perm: tuple[int, ...]
    s: int
    t: int
    t_axes: tuple[int, ...]
    k: int
    c: int


@dataclasses.dataclass(frozen=True)
class _Call:
    """Static description of one intercepted layer call (no arrays)."""

    kind: str  # "dense" (Dense/DenseGeneral/Einsum) | "conv" | "norm" | "embed" | "position"
    path: str  # module path, for messages
    leaves: tuple[tuple[str, int], ...]  # (param name, flat index in params)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any
    conv: tuple | None  # (kernel_size, strides, padding, kernel_dilation)
    reason: str  # "" when covered, else why not
    layout: _Layout | None = None  # kind "dense"
    vocab: int = 0  # kind "embed"
    module: str = ""  # the layer's class name
    form: str = ""  # the cheaper form (cost model), "" when not covered
    # ((form, flops, bytes), ...) for the whole batch: the forms, and "vmap" (what per-example
    # gradients of this call's parameters cost on top of the shared backward pass).
    costs: tuple[tuple[str, float, float], ...] = ()
    chunks: int = 1  # the kernel norms computed over this many example chunks, in turn

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
      leaf_names: the leaves' paths (for :meth:`describe`).
      leaf_sizes: the leaves' sizes.
      batch_size: the (local) batch size planned for.
      flops_per_byte: the machine balance of the cost model.
    """

    calls: tuple[_Call, ...]
    fallback: tuple[int, ...]
    num_leaves: int
    leaf_names: tuple[str, ...] = ()
    leaf_sizes: tuple[int, ...] = ()
    batch_size: int = 0
    flops_per_byte: float = FLOPS_PER_BYTE["cpu"]

    def cost(self, method: str) -> float:
        """Estimated cost (FLOP-equivalents, bytes weighted by ``flops_per_byte``) of
        ``method`` (``"ghost"`` or ``"vmap"``) over one plain backward pass.

        ``"vmap"``: the per-example gradients of every leaf (written once, read for the sum and
        for the squared norm), and the extra time of the per-example weight-gradient products
        of the covered calls (:func:`_form_cost`). ``"ghost"``: each covered call in its
        chosen form, plus, when leaves fall back, a ``vmap`` pass (a forward and an
        input-gradient pass again, per example, and the fallback leaves' per-example
        gradients).
        """
        w, n = self.flops_per_byte, self.batch_size
        if method == "vmap":
            slow_products = sum(fl for c in self.calls for f, fl, _ in c.costs if f == "vmap")
            return 12.0 * n * sum(self.leaf_sizes) * w + slow_products
        if method != "ghost":
            raise ValueError(f"method must be 'ghost' or 'vmap', got {method!r}.")
        total = 0.0
        for c in self.calls:
            if c.covered:
                _, flops, nbytes = _form_cost(c, c.form)
                total += flops + w * nbytes
        if self.fallback:
            total += _backward_flops(self.calls)
            total += 12.0 * n * sum(self.leaf_sizes[j] for j in self.fallback) * w
        return total

    @property
    def method(self) -> str:
        """``"ghost"`` when the fast path is estimated cheaper than plain ``vmap``, else
        ``"vmap"``: what ``per_example(method="auto")`` runs (:func:`select`)."""
        return "ghost" if self.cost("ghost") <= self.cost("vmap") else "vmap"

    def describe(self) -> str:
        """What is covered (in which form, at what cost), what falls back and why, and which
        method ``"auto"`` picks. Costs in MFLOP-equivalents for the whole batch."""
        w = self.flops_per_byte
        lines = []
        for c in self.calls:
            head = f"{c.path} ({c.module or c.kind}): "
            if not c.covered:
                lines.append(head + f"fallback: {c.reason}")
                continue
            costs = ", ".join(f"{f} {(fl + w * b) / 1e6:.3g}" for f, fl, b in c.costs)
            chunks = f" in {c.chunks} example chunks" if c.chunks > 1 else ""
            lines.append(head + f"covered, {c.form} form{chunks} (MFLOP-equivalents: {costs})")
        owned_by_uncovered = {j: c for c in self.calls if not c.covered for _, j in c.leaves}
        for j in self.fallback:
            name = self.leaf_names[j] if self.leaf_names else str(j)
            if j in owned_by_uncovered:
                why = f"its layer {owned_by_uncovered[j].path} is not covered"
            else:
                why = (
                    "read by no covered layer call (a bare self.param or an unsupported layer; "
                    "a learned position embedding: use gns.ghost.AddPositionEmbedding)"
                )
            lines.append(f"leaf {name}: per-example gradients by vmap: {why}")
        ghost, vmap = self.cost("ghost"), self.cost("vmap")
        lines.append(
            f"auto: {self.method} (estimated extra cost over one backward pass: fast path "
            f"{ghost / 1e6:.3g}{' incl. a vmap pass for the fallback' if self.fallback else ''}"
            f", vmap {vmap / 1e6:.3g} MFLOP-equivalents at {w:g} FLOPs/byte)"
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Interception.


def _is_candidate(context) -> bool:
    return context.method_name == "__call__" and type(context.module) in _CANDIDATE_TYPES


def _first_arg(args, kwargs):
    if args:
        return args[0]
    for name in ("inputs", "x", "inputs_q"):
        if name in kwargs:
            return kwargs[name]
    return None


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(a % ndim for a in axes)


def _dense_layout(module, x, kernel) -> tuple[_Layout | None, str]:
    """Layout of a ``Dense``/``DenseGeneral`` call, or the reason it is not covered."""
    if module.dot_general is not None or module.dot_general_cls is not None:
        return None, "custom dot_general"
    if x.ndim < 2:
        return None, "input without batch axis"
    if isinstance(module, nn.Dense):
        axis, features = (x.ndim - 1,), (module.features,)
    else:
        if tuple(module.batch_dims or ()):
            return None, "batch_dims (a kernel per batch index)"
        axis = _normalize_axes(module.axis, x.ndim)
        f = module.features
        features = (f,) if isinstance(f, int) else tuple(f)
    if 0 in axis:
        return None, "contracts the example axis"
    if kernel is None or tuple(kernel.shape) != tuple(x.shape[a] for a in axis) + features:
        return None, "unexpected kernel/input shapes"
    rest = tuple(d for d in range(1, x.ndim) if d not in axis)
    n_out = 1 + len(rest) + len(features)
    layout = _Layout(
        x_perm=(0, *rest, *axis),
        g_perm=tuple(range(n_out)),
        s=1,
        t=_prod(x.shape[d] for d in rest),
        k=_prod(x.shape[a] for a in axis),
        c=_prod(features),
        t_axes=tuple(range(1, 1 + len(rest))),
    )
    return layout, ""


def _einsum_layout(module, x, kernel, equation) -> tuple[_Layout | None, str]:
    """Layout of an ``nn.Einsum`` call: letters of the input's example axis ``b``, shared by
    input, kernel and output (``S``), by input and output (``T``), by input and kernel
    (``K``), by kernel and output (``C``); anything else is not covered."""
    import opt_einsum  # noqa: PLC0415 (a dependency of flax; only needed here)

    if not isinstance(equation, str) or kernel is None:
        return None, "einsum equation not found"
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, x.dtype))
    try:
        operands, out, _ = opt_einsum.parser.parse_einsum_input(
            (equation.replace(" ", ""), *shapes)
        )
    except Exception as e:  # noqa: BLE001 (report, don't crash: flax raises its own error)
        return None, f"einsum equation not parsed ({e})"
    xs, ks = operands.split(",")
    if any(len(set(sub)) != len(sub) for sub in (xs, ks, out)):
        return None, "repeated einsum letter (a diagonal)"
    b = xs[0]
    if b in ks or b not in out:
        return None, "the example axis is contracted or is a kernel axis"
    groups = {"s": [], "t": [], "k": [], "c": []}
    for ch in xs[1:]:
        key = "s" if ch in ks and ch in out else "t" if ch in out else "k" if ch in ks else None
        if key is None:
            return None, f"input letter {ch!r} is summed over alone"
        groups[key].append(ch)
    for ch in ks:
        if ch not in xs:
            if ch not in out:
                return None, f"kernel letter {ch!r} is summed over alone"
            groups["c"].append(ch)
    size = dict(zip(xs, x.shape, strict=True)) | dict(zip(ks, kernel.shape, strict=True))
    s, t, k, c = (groups[key] for key in "stkc")
    layout = _Layout(
        x_perm=tuple(xs.index(ch) for ch in (b, *s, *t, *k)),
        g_perm=tuple(out.index(ch) for ch in (b, *s, *t, *c)),
        s=_prod(size[ch] for ch in s),
        t=_prod(size[ch] for ch in t),
        k=_prod(size[ch] for ch in k),
        c=_prod(size[ch] for ch in c),
        t_axes=tuple(out.index(ch) for ch in t),
    )
    return layout, ""


def _layer_config(module, x, leaf_ids: dict[int, int], args=(), kwargs=None):
    """(kind, leaves, conv config, reason, extra) of a candidate call, static information only;
    ``extra``: the layout of a contraction, the vocabulary size of an embedding."""
    kind = "norm" if isinstance(module, _NORM_TYPES) else _KINDS[type(module)]
    variables = module.variables
    if set(variables) - {"params"}:
        return kind, (), None, f"has non-param collections {sorted(set(variables))}", None
    module_params = dict(variables.get("params", {}))
    leaves = []
    for name, value in module_params.items():
        if not isinstance(value, jax.Array) or id(value) not in leaf_ids:
            reason = f"param {name!r} is not a leaf of params as passed to loss_fn"
            return kind, (), None, reason, None
        leaves.append((name, leaf_ids[id(value)]))
    names = {n for n, _ in leaves}
    reason = ""
    conv = extra = None
    expected = {"dense": {"kernel", "bias"}, "conv": {"kernel", "bias"}}
    expected |= {"embed": {"embedding"}, "position": {"embedding"}, "norm": {"scale", "bias"}}
    if x is None or not hasattr(x, "shape"):
        reason = "input not found"
    elif names - expected[kind]:
        reason = f"unexpected params {sorted(names)}"
    elif kind == "dense":
        kernel = module_params.get("kernel")
        if isinstance(module, nn.Einsum):
            kwargs = kwargs or {}
            eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
            extra, reason = _einsum_layout(module, x, kernel, eq or module.einsum_str)
        else:
            extra, reason = _dense_layout(module, x, kernel)
    elif kind == "embed":
        table = module_params.get("embedding")
        if table is None or table.ndim != 2 or x.ndim < 1:
            reason = "unexpected embedding/input shapes"
        elif not jnp.issubdtype(x.dtype, jnp.integer):
            reason = "non-integer input"
        else:
            extra = int(table.shape[0])
    elif kind == "position":
        table = module_params.get("embedding")
        if table is None or x.ndim != 3 or table.shape[1:] != x.shape[2:]:
            reason = "unexpected embedding/input shapes"
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
        if not names:
            reason = "no scale/bias params"
        elif any(module_params[n].shape != (x.shape[-1],) for n in names):
            reason = "scale/bias not over the last axis only"
        elif x.ndim < 2:
            reason = "input without batch axis"
    return kind, tuple(leaves), conv, reason, extra


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
            module = context.module
            kind, leaves, conv, reason, extra = _layer_config(
                module, x, self.leaf_ids, args, kwargs
            )
            if not reason and not isinstance(y, jax.Array):
                reason = "output is not one array"
            if kind == "norm" and not reason and kwargs.get("mask") is not None:
                reason = "masked normalization"
            records.append(
                _Call(
                    kind=kind,
                    path="/".join(module.path) or type(module).__name__,
                    leaves=leaves,
                    in_shape=tuple(x.shape) if hasattr(x, "shape") else (),
                    out_shape=tuple(getattr(y, "shape", ())),
                    out_dtype=getattr(y, "dtype", None),
                    conv=conv,
                    reason=reason,
                    layout=extra if kind == "dense" else None,
                    vocab=extra if kind == "embed" and extra else 0,
                    module=type(module).__name__,
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

    def detached(values, new, b):
        new = list(new)
        for j, v in zip(owned, values, strict=True):
            new[j] = v
        with nn.intercept_methods(Detach()):
            return loss(jax.tree.unflatten(treedef, new), b)

    def tangent_out(v, t, new, b):  # every leaf an argument: ShapeDtypeStruct params work
        return jax.jvp(lambda v: detached(v, new, b), (v,), (t,))[1]

    values = [leaves[j] for j in owned]
    jaxpr = jax.make_jaxpr(tangent_out)(values, values, leaves, batch).jaxpr
    n_in = len(owned)
    deps: dict[Any, frozenset] = {}
    for k, var in enumerate(jaxpr.invars[n_in : 2 * n_in]):  # the tangents
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
    (no supported Flax Linen layer reading a leaf of ``params``).

    Args:
      loss_fn: ``loss_fn(params, batch)`` mean loss (``(loss, aux)`` with ``has_aux``).
      params: the parameters (any pytree; arrays or ``jax.ShapeDtypeStruct``).
      batch: the batch (leading example axis).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A :class:`Plan`; ``print(plan(...).describe())`` says what is covered, in which form,
      what falls back and why, and whether ``method="auto"`` runs it or ``vmap``.
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
    checked = [
        dataclasses.replace(c, reason="parameters also used outside the layer")
        if c.covered and any(j in elsewhere for _, j in c.leaves)
        else c
        for c in checked
    ]
    w = FLOPS_PER_BYTE.get(jax.default_backend(), FLOPS_PER_BYTE["gpu"])
    checked = tuple(_with_costs(c, w) if c.covered else c for c in checked)
    paths_leaves = jax.tree_util.tree_leaves_with_path(params)
    num_leaves = len(paths_leaves)
    owned = {j for c in checked if c.covered for _, j in c.leaves}
    if not owned:
        detail = Plan(checked, (), num_leaves).describe().rsplit("\n", 1)[0]
        raise NotApplicableError(
            "the fast per-example path covers no parameter of this loss_fn: it needs Flax Linen "
            "nn.Dense/nn.DenseGeneral/nn.Einsum/nn.Conv/nn.Embed/nn.GroupNorm/nn.LayerNorm/"
            "nn.RMSNorm/gns.ghost.AddPositionEmbedding calls reading leaves of `params` inside "
            "loss_fn"
            + (f" (intercepted calls:\n{detail}\n)" if checked else " (none were called)")
            + ". Use method='vmap' (or 'auto', which falls back to it)."
        )
    fallback = tuple(j for j in range(num_leaves) if j not in owned)
    return Plan(
        checked,
        fallback,
        num_leaves,
        leaf_names=tuple(common.leaf_name(path) for path, _ in paths_leaves),
        leaf_sizes=tuple(_prod(leaf.shape) for _, leaf in paths_leaves),
        batch_size=n,
        flops_per_byte=w,
    )


def select(loss_fn, params, batch, *, has_aux: bool = False, method: str = "auto") -> Plan | None:
    """The plan ``per_example(method=...)`` should run, or ``None`` for plain ``vmap``.

    Args:
      loss_fn, params, batch, has_aux: as for :func:`plan`.
      method: ``"auto"``: the plan when the fast path covers something and its cost model
        (:attr:`Plan.method`) says it is cheaper than ``vmap``, else ``None``. ``"ghost"`` (or
        ``"fast"``): the plan whatever it costs. ``"vmap"``: ``None``.

    Returns:
      A :class:`Plan` for :func:`sums`, or ``None``.

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
        return None
    return the_plan if method != "auto" or the_plan.method == "ghost" else None


# ---------------------------------------------------------------------------------------------
# The cost model.


def _contraction_dims(call: _Call) -> tuple[int, int, int, int]:
    """``(n, T, K, C)`` of a dense/conv call: ``n`` independent products ``[T,K]ᵀ[T,C]``."""
    b = call.in_shape[0]
    if call.kind == "dense":
        lay = call.layout
        return b * lay.s, lay.t, lay.k, lay.c
    kernel_size = call.conv[0]
    t = _prod(call.out_shape[1:-1])
    return b, t, _prod(kernel_size) * call.in_shape[-1], call.out_shape[-1]


def _forms(call: _Call) -> tuple[str, ...]:
    return ("direct", "gram") if call.kind in ("dense", "conv", "embed") else ("direct",)


def _form_cost(call: _Call, form: str) -> tuple[str, float, float]:
    """``(form, flops, bytes)`` of one call's per-example squared norms for the whole batch.

    ``"vmap"``: what per-example gradients of the call's parameters cost beyond a plain
    backward pass: their bytes (written, read for the sum and for the norm) and, for kernels,
    the per-example weight-gradient products counted again times :data:`_VMAP_SLOWDOWN` (a
    batch of small products runs slower than the one large product of the plain step).
    """
    if call.kind in ("dense", "conv"):
        n, t, k, c = _contraction_dims(call)
        patches = 4.0 * n * t * k if call.kind == "conv" else 0.0
        if form == "direct":
            return form, 2.0 * n * t * k * c + 2.0 * n * k * c, 8.0 * n * k * c + patches
        if form == "gram":
            if t == 1:
                return form, 2.0 * n * (k + c), 8.0 * n + patches
            return form, 2.0 * n * t * t * (k + c + 1), 12.0 * n * t * t + patches
        slow = _VMAP_SLOWDOWN[call.kind]
        return form, slow * 2.0 * n * t * k * c, 12.0 * n * (k * c + c)
    b = call.in_shape[0]
    t = _prod(call.in_shape[1:]) if call.kind == "embed" else _prod(call.out_shape[1:-1])
    d = call.out_shape[-1]
    if call.kind == "embed":
        v = call.vocab
        if form == "direct":  # scatter-add into a per-example table
            return form, b * t * d + 2.0 * b * v * d, 8.0 * b * v * d + 4.0 * b * t * d
        if form == "gram":
            return form, 2.0 * b * t * t * (d + 1), 12.0 * b * t * t
        return form, 0.0, 12.0 * b * v * d
    if call.kind == "position":
        rows = call.in_shape[1]
        return (form, 2.0 * b * t * d, 0.0) if form != "vmap" else (form, 0.0, 12.0 * b * rows * d)
    # norm: recompute x̂ and keep it for the backward pass
    if form == "vmap":
        return form, 0.0, 24.0 * b * d
    return form, 10.0 * b * t * d, 4.0 * b * t * d


def _with_costs(call: _Call, flops_per_byte: float) -> _Call:
    """``call`` with the costs of its forms (and of vmap), the cheapest form, and the number of
    example chunks its kernel norms are computed in (:data:`CHUNK_BYTES`)."""
    costs = tuple(_form_cost(call, f) for f in (*_forms(call), "vmap"))
    best = min(costs[:-1], key=lambda fc: fc[1] + flops_per_byte * fc[2])
    return dataclasses.replace(call, costs=costs, form=best[0], chunks=_num_chunks(call, best[2]))


def _num_chunks(call: _Call, nbytes: float) -> int:
    """The fewest example chunks (a divisor of the batch) that keep a convolution's per-example
    intermediates (``nbytes`` for the batch) within :data:`CHUNK_BYTES`.

    Convolutions only: their patches are the large intermediates, and chunks bound them. A dense
    layer's are a Gram or a per-example kernel gradient; measured on the ``lm`` ``cpu``
    Transformer at batch 128 (2 CPU cores), chunking its dense layers raised the compiled temp
    memory (1.18x -> 1.32x a plain gradient: the loop's stacked inputs) and did not make it
    faster, so they are computed on the whole batch."""
    b = call.in_shape[0] if call.in_shape else 1
    if call.kind != "conv" or nbytes <= CHUNK_BYTES:
        return 1
    return next(d for d in range(2, b + 1) if b % d == 0 and nbytes / d <= CHUNK_BYTES or d == b)


def _backward_flops(calls) -> float:
    """FLOPs of one forward pass and one input-gradient pass through the intercepted layers:
    what the fallback's ``vmap`` pass repeats per example (it differentiates the fallback
    leaves only, so no other layer's weight-gradient product). Other operations (attention
    scores, activations) are not counted."""
    total = 0.0
    for c in calls:
        if c.kind in ("dense", "conv") and (c.layout is not None or c.conv is not None):
            n, t, k, cc = _contraction_dims(c)
            total += 4.0 * n * t * k * cc
        elif c.out_shape:
            total += 10.0 * _prod(c.out_shape)
    return total


def _cost(t: int, k: int, c: int) -> tuple[int, int]:
    """(direct, Gram) multiply-adds per example of the kernel norm."""
    return t * k * c, t * t * (k + c)


def _pick(form: str, t: int, k: int, c: int) -> str:
    if form != "auto":
        return form
    direct, gram = _cost(t, k, c)
    return "gram" if gram < direct else "direct"


# ---------------------------------------------------------------------------------------------
# Per-example squared norms from layer inputs and output gradients.


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


def _embed_sq(tokens: jax.Array, g: jax.Array, vocab: int, form: str) -> jax.Array:
    """Per-example ``‖Σ_t e_{tok_t} g_tᵀ‖²`` of an embedding table, shape ``[B]``.

    Args:
      tokens: ``[B, T]`` integer ids; ids outside ``[0, vocab)`` get no gradient.
      g: output gradients ``[B, T, D]``.
      vocab: rows of the table (with one row every id reads it, as ``nn.Embed`` does).
      form: ``"gram"`` (token-equality Gram, ``T²·D``) or ``"direct"`` (scatter-add into a
        per-example ``[vocab, D]`` table).
    """
    b = tokens.shape[0]
    if vocab == 1:
        tokens = jnp.zeros_like(tokens)
    valid = (tokens >= 0) & (tokens < vocab)
    if form == "direct":
        rows = jnp.where(valid, tokens, vocab)  # out of range: dropped by the scatter
        table = jnp.zeros((b, vocab, g.shape[-1]), g.dtype)
        table = table.at[jnp.arange(b)[:, None], rows].add(g, mode="drop")
        return jnp.sum(jnp.square(table), axis=(1, 2))
    same = (tokens[:, :, None] == tokens[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    gg = jnp.einsum("btd,bsd->bts", g, g)
    return jnp.sum(jnp.where(same, gg, 0.0), axis=(1, 2))


def _acc_dtype(dtype):
    """Accumulation dtype: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _call_sq_norms(call: _Call, x: jax.Array, g: jax.Array, form: str) -> dict[str, jax.Array]:
    """Per-example squared norms ``[B]`` of each parameter of one covered call.

    ``form="auto"`` takes the call's planned form (the cost model), else the given one."""
    if form == "auto":
        form = call.form or "auto"
    b = g.shape[0]
    g = g.astype(_acc_dtype(g.dtype))
    names = dict(call.leaves)
    out = {}
    if call.kind == "position":
        return {"embedding": jnp.sum(jnp.square(g.reshape(b, -1)), axis=1)}
    if call.kind == "embed":
        tokens = x.reshape(b, -1)
        return {"embedding": _embed_sq(tokens, g.reshape(b, tokens.shape[1], -1), call.vocab, form)}
    x = x.astype(g.dtype)
    if call.kind in ("dense", "conv"):
        out["kernel"] = _in_chunks(functools.partial(_kernel_norms, call, form), x, g, call.chunks)
    if call.kind == "dense":
        if "bias" in names:
            bias_grad = jnp.sum(g, axis=call.layout.t_axes).reshape(b, -1)
            out["bias"] = jnp.sum(jnp.square(bias_grad), axis=1)
        return out
    c = g.shape[-1]
    g = g.reshape(b, -1, c)
    if call.kind == "norm" and "scale" in names:
        xhat = x.reshape(b, -1, c)
        out["scale"] = jnp.sum(jnp.square(jnp.sum(g * xhat, axis=1)), axis=-1)
    if "bias" in names:
        out["bias"] = jnp.sum(jnp.square(jnp.sum(g, axis=1)), axis=-1)
    return out


def _kernel_norms(call: _Call, form: str, x: jax.Array, g: jax.Array) -> jax.Array:
    """Per-example squared norms ``[b]`` of a dense/conv kernel from (a chunk of) ``b``
    examples' layer inputs ``x`` and output gradients ``g``."""
    b = g.shape[0]
    if call.kind == "dense":
        lay = call.layout
        xk = jnp.transpose(x, lay.x_perm).reshape(b * lay.s, lay.t, lay.k)
        gk = jnp.transpose(g, lay.g_perm).reshape(b * lay.s, lay.t, lay.c)
        return jnp.sum(_kernel_sq([xk], gk, form).reshape(b, lay.s), axis=1)
    g = g.reshape(b, -1, g.shape[-1])
    pieces = _conv_pieces(x, call.conv)
    if pieces[0].shape[1] != g.shape[1]:
        raise RuntimeError(f"{call.path}: {pieces[0].shape[1]} input positions, {g.shape[1]} out")
    return _kernel_sq(pieces, g, form)


def _in_chunks(fn, x: jax.Array, g: jax.Array, chunks: int) -> jax.Array:
    """``fn(x, g)`` (per-example values ``[B]``) over ``chunks`` equal example chunks in turn
    (``jax.lax.map``): the per-example intermediates of one chunk exist at a time."""
    if chunks <= 1:
        return fn(x, g)
    b = g.shape[0]

    def split(a):
        return a.reshape((chunks, b // chunks) + a.shape[1:])

    return lax.map(lambda xg: fn(*xg), (split(x), split(g))).reshape(b)


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
      form: ``"auto"`` (each call's cheaper form by the plan's cost model), ``"direct"`` or
        ``"gram"`` (every call that has that form; for ``nn.Embed`` direct is the scatter).

    Returns:
      ``(grad_sum, sq_sum, aux)``: the sum over this device's examples of their gradients
      (``n`` times the mean gradient), the per-leaf sum of their squared norms (both in float32
      at least, whatever the parameters' dtype: bfloat16 sums would round), and the aux of the
      one ``loss_fn`` call on the whole local batch (``None`` without ``has_aux``).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
    n = common.batch_size(batch)
    calls = the_plan.calls
    covered = [c for c in calls if c.covered]
    slot_of = {id(c): k for k, c in enumerate(covered)}
    dtypes = [_acc_dtype(leaf.dtype) for leaf in jax.tree.leaves(params)]
    slots = [{name: jnp.zeros((n,), dtypes[j]) for name, j in c.leaves} for c in covered]
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
                elif calls[i].kind == "position":
                    x = jnp.zeros((), jnp.float32)  # the norm needs only the output gradient
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
    # The loss is a mean: scale by n, in float32 at least (a bfloat16 product would round).
    norms = _call_sq_norms(call, x, g.astype(_acc_dtype(g.dtype)) * n, form)
    cot = {name: norms[name].astype(slots[name].dtype) for name in slots}
    return g, None, cot  # x is detached (and may be integer tokens): no cotangent


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
    grad_sum = jax.tree.map(lambda g: g.astype(_acc_dtype(g.dtype)) * n, grads)
    sq = [s.astype(_acc_dtype(s.dtype)) for s in sq]
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
