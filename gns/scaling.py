"""The learning-rate rules: how the rate tuned at one batch size moves to another.

One vocabulary for every place that moves a batch size (the finder's forks and its recommended
rate, :mod:`gns.schedule`, :mod:`gns.critical`): a **rule** names the multiplier
``lr(B)/lr(B_0)``:

==============  ==================================  =============================================
rule            ``lr(B)/lr(B_0)``                   for
==============  ==================================  =============================================
``"sgd"``       ``(1 + N/B_0)/(1 + N/B)``           SGD, momentum, LARS: McCandlish eq. 2.6 with
                                                    the noise scale ``N`` (linear for ``N = inf``,
                                                    1 for ``N <= 0`` or ``nan``)
``"linear"``    ``B/B_0``                           SGD far below the noise scale (Goyal 2017)
``"sqrt"``      ``sqrt(B/B_0)``                     Adam-family, a heuristic (Malladi et al. 2022)
``"seesaw"``    ``sqrt(B_0/B)``                     growing the batch in place of decaying the
                                                    rate (Meterez et al. 2025)
``"constant"``  ``1``                               a rate the user keeps
==============  ==================================  =============================================

An optimizer name maps to its rule (:data:`OPTIMIZER_RULES`), and :func:`infer_rule` reads it
from an optax optimizer state when it can tell (Adam's second moment, or SGD's momentum trace
only), and says it cannot otherwise: a wrong rule silently mis-scales the rate.
:func:`multiplier` is the rule as a jit-able multiplier; :func:`learning_rate` the rate itself on
the host, with the rule in words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "RULES",
    "OPTIMIZER_RULES",
    "check_rule",
    "rule_for",
    "infer_rule",
    "is_stateless",
    "has_momentum",
    "short_fork_warning",
    "multiplier",
    "learning_rate",
]

RULES = ("sgd", "linear", "sqrt", "seesaw", "constant")
OPTIMIZER_RULES = {
    "sgd": "sgd",
    "momentum": "sgd",
    "lars": "sgd",
    "adam": "sqrt",
    "adamw": "sqrt",
    "lamb": "sqrt",
}

# optax state classes that decide the rule: a second-moment estimate means an adaptive rate
# (square-root rule); momentum traces and stateless transforms alone mean SGD.
_ADAPTIVE_STATES = frozenset({"ScaleByAdamState", "ScaleByAmsgradState", "ScaleByLambState"})
_SGD_STATES = frozenset(
    {
        "EmptyState",
        "TraceState",
        "ScaleByTrustRatioState",
        "ScaleByScheduleState",
        "ScaleByLearningRateState",
        "AddDecayedWeightsState",
        "WrappedScheduleState",
    }
)
_WRAPPERS = frozenset(
    {
        "InjectHyperparamsState",
        "InjectStatefulHyperparamsState",
        "MaskedState",
        "ApplyIfFiniteState",
    }
)


def check_rule(rule: str, name: str = "lr_rule") -> str:
    """``rule`` if it is one of :data:`RULES`, else a ``ValueError`` naming them."""
    if rule not in RULES:
        raise ValueError(
            f"{name} must be one of {RULES} ('sgd' for SGD/momentum/LARS, 'sqrt' for "
            f"Adam-family), got {rule!r}."
        )
    return rule


def rule_for(name: str, what: str = "optimizer_name") -> str:
    """The rule of an optimizer name (:data:`OPTIMIZER_RULES`) or a rule name itself.

    Example:
      >>> rule_for("adamw"), rule_for("momentum"), rule_for("linear")
      ('sqrt', 'sgd', 'linear')
    """
    key = name.lower() if isinstance(name, str) else name
    if key in OPTIMIZER_RULES:
        return OPTIMIZER_RULES[key]
    if key in RULES:
        return key
    raise ValueError(
        f"{what} must be an optimizer name {tuple(OPTIMIZER_RULES)} or a learning-rate rule "
        f"{RULES}, got {name!r}."
    )


def _state_names(state, out: set[str]) -> set[str]:
    """Class names of the NamedTuple nodes of an optax state (wrappers looked through)."""
    if hasattr(state, "_fields"):
        name = type(state).__name__
        if name not in _WRAPPERS:
            out.add(name)
        if name in _WRAPPERS or name not in _ADAPTIVE_STATES | _SGD_STATES:
            for child in state:
                _state_names(child, out)
    elif isinstance(state, list | tuple):
        for child in state:
            _state_names(child, out)
    elif isinstance(state, Mapping):
        for child in state.values():
            _state_names(child, out)
    return out


def infer_rule(opt_state) -> str | None:
    """The rule of an optax optimizer from its state, or ``None`` when it cannot tell.

    ``"sqrt"`` when the state holds a second-moment estimate (Adam, AdamW, LAMB, AMSGrad);
    ``"sgd"`` when it holds only momentum traces and stateless transforms (SGD, momentum,
    LARS; also a stateless sign or normalized update, which has the state of plain SGD:
    :func:`is_stateless` says when it is a guess); ``None`` for anything else (Adafactor, Lion,
    RMSProp, parts of ``optax.multi_transform`` or ``optax.masked`` that follow different
    rules, a custom state...): pass the rule.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> w = jnp.zeros(3)
      >>> infer_rule(optax.adamw(1e-3).init(w)), infer_rule(optax.sgd(0.1, 0.9).init(w))
      ('sqrt', 'sgd')
    """
    names = _state_names(opt_state, set())
    masked = lambda x: type(x).__name__ == "MaskedState"
    parts = [x.inner_state for x in jax.tree.leaves(opt_state, is_leaf=masked) if masked(x)]
    if "PartitionState" in names or len({infer_rule(p) for p in parts}) > 1:
        return None
    if names & _ADAPTIVE_STATES:
        return "sqrt"
    if names <= _SGD_STATES and names:
        return "sgd"
    return None


def is_stateless(opt_state) -> bool:
    """Whether an optax state holds no statistics of the gradients (plain SGD; also a sign or
    normalized update), so that :func:`infer_rule`'s ``"sgd"`` is a guess.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> w = jnp.zeros(3)
      >>> is_stateless(optax.sgd(0.1).init(w)), is_stateless(optax.sgd(0.1, 0.9).init(w))
      (True, False)
    """
    return _state_names(opt_state, set()) <= _SGD_STATES - {"TraceState", "ScaleByTrustRatioState"}


# optax state classes that hold a first moment: an update averages about 1/(1-β) gradients.
_MOMENTUM_STATES = frozenset({"TraceState"}) | _ADAPTIVE_STATES


def has_momentum(opt_state) -> bool:
    """Whether an optax state holds a momentum trace or an Adam-family first moment.

    The decay is not in the state: ``optax.sgd(lr, momentum=0.0)`` keeps a trace too, and
    counts (``momentum=None`` builds plain SGD without one).

    Example:
      >>> import optax, jax.numpy as jnp
      >>> w = jnp.zeros(3)
      >>> has_momentum(optax.sgd(0.1).init(w)), has_momentum(optax.sgd(0.1, 0.9).init(w))
      (False, True)
    """
    return bool(_state_names(opt_state, set()) & _MOMENTUM_STATES)


def short_fork_warning(fork_steps: int, momentum: float) -> str | None:
    """A warning when forks of ``fork_steps`` steps are shorter than ``3/(1-momentum)``, or
    ``None``. An update averages about ``1/(1-β)`` steps of gradients, so a shorter fork's loss
    says more about the optimizer's lag than about its batch size (``docs/critical-batch.md``).

    Example:
      >>> short_fork_warning(40, 0.9) is None, short_fork_warning(8, 0.0) is None
      (True, True)
    """
    if not 0.0 < momentum < 1.0:
        return None
    needed = math.ceil(3.0 / (1.0 - momentum) - 1e-9)
    if fork_steps >= needed:
        return None
    return (
        f"forks of {fork_steps} steps with momentum {momentum:g}: an update averages about "
        f"{1.0 / (1.0 - momentum):.3g} steps of gradients, so the branched critical batch may "
        f"measure that lag more than the batch size; fork at least 3/(1-momentum) = {needed} steps"
    )


def multiplier(rule: str, batch_size, base_batch_size, noise=math.inf, xp=jnp):
    """``lr(B)/lr(B_0)`` of ``rule``: with ``xp=jnp`` jit-able (float32), with ``xp=numpy``
    in float64 on the host; Python numbers in, a 0-d array out.

    Example:
      >>> float(multiplier("sqrt", 256, 64)), float(multiplier("sgd", 256, 64, 64.0, xp=np))
      (2.0, 1.6)
    """
    check_rule(rule)
    dtype = jnp.float32 if xp is jnp else np.float64
    b = xp.asarray(batch_size, dtype)
    b0 = xp.asarray(base_batch_size, dtype)
    if rule == "linear":
        return b / b0
    if rule == "sqrt":
        return xp.sqrt(b / b0)
    if rule == "seesaw":
        return xp.sqrt(b0 / b)
    if rule == "constant":
        return xp.ones((), dtype)
    n = xp.asarray(noise, dtype)
    finite = xp.where(xp.isfinite(n) & (n > 0), n, 1.0)
    # (1 + N/B_0)/(1 + N/B) in units of N when N >= 1: a huge N (1e308) stays finite.
    unit = xp.maximum(finite, 1.0)
    saturating = (1.0 / unit + (finite / unit) / b0) / (1.0 / unit + (finite / unit) / b)
    return xp.where(xp.isposinf(n), b / b0, xp.where(n > 0, saturating, 1.0))


def learning_rate(
    name: str, base_lr: float, base_batch_size: float, batch_size: float, noise: float = math.inf
) -> tuple[float, str]:
    """The learning rate at ``batch_size`` of a rate ``base_lr`` tuned at ``base_batch_size``,
    by the rule of ``name`` (an optimizer or a rule, :func:`rule_for`), with the rule in words.

    The float64 host form of :func:`multiplier`. The ``"sgd"`` rule is McCandlish eq. 2.6,
    ``lr(B) = base_lr·(1 + N/B_0)/(1 + N/B)``: linear scaling well below the noise scale ``N``,
    saturating above it, linear for ``N = +inf``, the rate kept for ``N <= 0`` (a degenerate
    estimate, read as no noise); ``N = nan`` raises a ``ValueError`` (there is no rate to
    derive). The other rules ignore ``noise``. A rate that overflows float64 raises a
    ``ValueError``, never returns ``inf``.

    Example:
      >>> lr, _ = learning_rate("sgd", 0.1, 64, 256, 128.0)
      >>> round(lr, 4), learning_rate("adamw", 1e-3, 64, 256)[0]
      (0.2, 0.002)
    """
    rule, name = rule_for(name, "optimizer"), name.lower()
    if not all(0 < x < math.inf for x in (base_lr, base_batch_size, batch_size)):
        raise ValueError(
            f"base_lr, base_batch_size and batch_size must be finite and positive, got "
            f"{base_lr}, {base_batch_size}, {batch_size}."
        )
    if rule == "sgd" and math.isnan(noise):
        raise ValueError(
            f"b_noise is nan: the {name} rule eps_opt(B) = eps_max/(1 + B_noise/B) needs a noise "
            "scale. Measure it again on finite gradients (over more batches), or keep base_lr."
        )
    lr = base_lr * float(multiplier(rule, batch_size, base_batch_size, noise, xp=np))
    if not math.isfinite(lr):
        raise ValueError(
            f"the scaled learning rate overflows float64 (inf) from base_lr={base_lr!r}: pass "
            "a learning rate in its usual units."
        )
    return lr, _in_words(rule, name, base_lr, base_batch_size, batch_size, noise, lr)


def _in_words(rule, name, base_lr, base_batch_size, batch_size, noise, lr) -> str:
    """What :func:`learning_rate` did, and on what grounds."""
    eq = "eps_opt(B) = eps_max/(1 + B_noise/B)"
    if rule == "sqrt":
        return (
            f"square-root scaling lr = {base_lr:g}·sqrt(B/{base_batch_size:g}) for {name}: a "
            "heuristic for adaptive optimizers (Malladi et al. 2022), not derived from the noise "
            "scale; re-tune within a factor of 2 around it."
        )
    if rule == "linear":
        return (
            f"linear scaling lr = {base_lr:g}·B/{base_batch_size:g} (Goyal et al. 2017): SGD far "
            "below the noise scale."
        )
    if rule == "seesaw":
        return (
            f"seesaw lr = {base_lr:g}·sqrt({base_batch_size:g}/B) (Meterez et al. 2025): the "
            "batch grows in place of a learning-rate decay."
        )
    if rule == "constant":
        return f"lr kept at the tuned value {base_lr:g} (constant rule)."
    if noise == math.inf:
        return (
            f"linear scaling lr = {base_lr:g}·B/{base_batch_size:g}: the limit of {eq} for an "
            "unresolved (infinite) noise scale."
        )
    if noise <= 0:
        return (
            f"lr kept at the tuned value: the noise-scale estimate {noise:.4g} is not positive "
            f"(no measurable gradient noise), and then {eq} does not depend on B."
        )
    eps_max = lr * (1.0 + noise / batch_size)
    return (
        f"{eq} (McCandlish et al. 2018, eq. 2.6) with B_noise = {noise:.4g} and "
        f"eps_max = {eps_max:.4g} solved from lr {base_lr:g} tuned at batch {base_batch_size:g}; "
        "exact for SGD on a locally quadratic loss."
    )
