"""The hardware side of the batch-size question: devices, memory per batch size, step time.

* :func:`detect_devices` says what JAX runs on (platform, kind, count, memory when reported);
* :func:`predict_step_bytes` predicts the device memory of one step from the compiled program
  (XLA's buffer assignment), **without running it**;
* :func:`largest_batch_that_fits` predicts each candidate batch size against the device's
  capacity (or a memory budget on CPU, where running out of memory kills the process instead of
  raising), then confirms the ones predicted to fit by running them, recording an accelerator
  out-of-memory error (``RESOURCE_EXHAUSTED``) instead of crashing;
* :func:`time_step` times one step (compile excluded, warm-up, ``block_until_ready``, median);
* :func:`time_batch_sizes` times all candidate batch sizes interleaved (round-robin, several
  rounds), with the median and the spread of each, re-timing the noisy ones, dropping those a
  caller's ``prune`` rule says cannot win and stopping at a time budget; every step is
  compiled once per shape (:class:`CompileCache`);
* :func:`interleaved_times` times several steps round-robin, each round's times paired (the
  per-round ratios of the benchmarks);
* :func:`step_signature` names a step by its lowered program on this device, the key of the
  in-memory :class:`TimingCache` that lets a later search reuse a measurement;
* :func:`accumulated_step_time` extends a step-time curve above the largest batch that fits, as
  gradient accumulation (:mod:`gns.recommend` reads step times through it).

The memory and the speed of a step are measured, not assumed: on a 2-core CPU the throughput of
a small CNN peaks near batch 64-128 and falls beyond, while a GPU keeps gaining up to its memory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import re
import statistics
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from gns.common import check_batch_size, check_int, check_positive

__all__ = [
    "DeviceInfo",
    "detect_devices",
    "MemoryPrediction",
    "predict_step_bytes",
    "compile_step",
    "abstract_args",
    "FitRecord",
    "FitResult",
    "largest_batch_that_fits",
    "memory_budget",
    "StepTiming",
    "time_step",
    "CompileCache",
    "BatchTiming",
    "TimingTable",
    "interleaved_timing",
    "interleaved_times",
    "time_batch_sizes",
    "step_signature",
    "TimingCache",
    "TIMING_CACHE",
    "accumulated_step_time",
    "interpolate_step_time",
    "is_out_of_memory",
]

# Fraction of host RAM available when the sweep starts that a CPU step may use by default.
DEFAULT_CPU_BUDGET_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What JAX runs on.

    Attributes:
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``.
      kind: the device kind, e.g. ``"NVIDIA H100 80GB HBM3"``, ``"TPU v4"`` or ``"cpu"``.
      count: number of devices (all processes).
      local_count: number of devices of this process.
      memory_bytes: memory of one device (``bytes_limit`` of ``device.memory_stats()``), or
        ``None`` where JAX does not report it (CPU).
    """

    platform: str
    kind: str
    count: int
    local_count: int
    memory_bytes: int | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def detect_devices(backend: str | None = None) -> DeviceInfo:
    """Describe the default (or given) JAX backend's devices.

    Example:
      >>> info = detect_devices()
      >>> info.count >= 1
      True
    """
    devices = jax.devices(backend)
    dev = devices[0]
    memory = None
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and "bytes_limit" in stats:
        memory = int(stats["bytes_limit"])
    return DeviceInfo(
        platform=dev.platform,
        kind=str(dev.device_kind),
        count=len(devices),
        local_count=len(jax.local_devices(backend=backend)),
        memory_bytes=memory,
    )


@dataclasses.dataclass(frozen=True)
class MemoryPrediction:
    """Device memory of one compiled step, from XLA's buffer assignment.

    ``total_bytes = argument + output + temp − alias``: the inputs, the outputs and the
    scratch buffers live at the same time during the step, except the outputs that alias
    (reuse) a donated input's buffer, which would otherwise be counted twice. The code size is
    left out (not reported on every backend, and small). This is an upper bound of the step's
    live memory, not counting the allocator's fragmentation and the runtime's own overhead.
    """

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def _as_jitted(step_fn: Callable) -> Any:
    return step_fn if hasattr(step_fn, "lower") else jax.jit(step_fn)


def _abstract(args: Sequence[Any]) -> Any:
    """Shapes and dtypes of ``args`` (arrays or ShapeDtypeStructs), allocating nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), args)


def abstract_args(make_args_for_batch: Callable[[int], Sequence[Any]], batch_size: int):
    """The shapes and dtypes of ``make_args_for_batch(batch_size)``: traced under
    ``jax.eval_shape`` (nothing allocated) when it is traceable, else built and described."""
    try:
        return jax.eval_shape(lambda: tuple(make_args_for_batch(batch_size)))
    except Exception:  # noqa: BLE001 - not traceable (e.g. NumPy data): build it for real
        return _abstract(tuple(make_args_for_batch(batch_size)))


def _is_compiled(step_fn: Callable) -> bool:
    return hasattr(step_fn, "memory_analysis") and not hasattr(step_fn, "lower")


class CompileCache:
    """Compiled executables, by step function and the shapes/dtypes of its arguments.

    A step is compiled once per signature: timing it again, predicting its memory again or
    timing it in more rounds reuses the executable (compiling costs seconds per batch size on a
    CPU). Entries live as long as the step function does (weak keys); a function that cannot be
    weakly referenced is compiled every time.

    Attributes:
      compiles: how many compilations this cache has done.
      compile_s: the seconds they took.
    """

    def __init__(self):
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.compiles = 0
        self.compile_s = 0.0

    def _slot(self, step_fn: Callable, example_args) -> tuple[list, Any]:
        """``([lowered, executable], the shapes)`` of ``step_fn`` at these shapes (``None``
        where not made yet)."""
        shapes = _abstract(example_args)
        leaves, treedef = jax.tree.flatten(shapes)
        key = (treedef, tuple((x.shape, str(x.dtype)) for x in leaves))
        try:
            per_fn = self._entries.setdefault(step_fn, {})
        except TypeError:  # not weakly referenceable: nothing to key on safely
            per_fn = {}
        return per_fn.setdefault(key, [None, None]), shapes

    def lowered(self, step_fn: Callable, *example_args) -> Any:
        """``jax.jit(step_fn).lower(...)`` for these shapes, kept until :meth:`get` compiles it
        (lowering traces the step: a signature and the compile share one lowering)."""
        entry, shapes = self._slot(step_fn, example_args)
        if entry[0] is None:
            entry[0] = _as_jitted(step_fn).lower(*shapes)
        return entry[0]

    def get(self, step_fn: Callable, *example_args) -> tuple[Any, float]:
        """``(executable, seconds spent compiling now)``: ``0.0`` when it was cached."""
        if _is_compiled(step_fn):
            return step_fn, 0.0
        entry, shapes = self._slot(step_fn, example_args)
        if entry[1] is None:
            t0 = time.perf_counter()
            entry[1] = (entry[0] or _as_jitted(step_fn).lower(*shapes)).compile()
            dt = time.perf_counter() - t0
            self.compiles += 1
            self.compile_s += dt
            return entry[1], dt
        return entry[1], 0.0


_CACHE = CompileCache()


def compile_step(step_fn: Callable, *example_args, cache: CompileCache | None = None) -> Any:
    """``jax.jit(step_fn).lower(*example_args).compile()``: an executable callable on the args.

    ``example_args`` may be arrays or ``jax.ShapeDtypeStruct`` (nothing is allocated). The
    executable is cached (``cache``, default the module's :class:`CompileCache`): compiling the
    same function for the same shapes again returns it without compiling.
    """
    return (cache or _CACHE).get(step_fn, *example_args)[0]


NO_ANALYSIS = "this backend's compiled program reports no memory analysis"


def _prediction(compiled) -> MemoryPrediction | None:
    """XLA's memory analysis of ``compiled`` (``None`` where the backend reports none)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return MemoryPrediction(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
    )


def predict_step_bytes(step_fn: Callable, *example_args) -> MemoryPrediction:
    """Predict the device memory of one call of ``step_fn`` without running it.

    Compiles ``jax.jit(step_fn)`` for the shapes of ``example_args`` and reads XLA's
    ``memory_analysis()``. Pass ``jax.ShapeDtypeStruct`` to predict a batch size whose arrays
    would not even fit.

    Args:
      step_fn: the step (jitted or not); its positional arguments are ``example_args``.
      *example_args: arrays or ``jax.ShapeDtypeStruct`` pytrees.

    Returns:
      A :class:`MemoryPrediction`; ``.total_bytes`` is ``argument + output + temp − alias``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jax.ShapeDtypeStruct((1024, 256), jnp.float32)
      >>> pred = predict_step_bytes(lambda x: jnp.tanh(x) @ x.T, x)
      >>> pred.argument_bytes, pred.output_bytes
      (1048576, 4194304)
    """
    pred = _prediction(compile_step(step_fn, *example_args))
    if pred is None:
        raise RuntimeError(
            f"{NO_ANALYSIS} (compiled.memory_analysis() is None): memory cannot be predicted "
            "here; run the step to see whether it fits (largest_batch_that_fits with confirm)."
        )
    return pred


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is XLA's out-of-memory error (``RESOURCE_EXHAUSTED``)."""
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


@dataclasses.dataclass
class FitRecord:
    """The memory verdict for one batch size.

    Attributes:
      batch_size: the candidate.
      predicted_bytes: predicted device memory of the step (``None`` if it could not be
        compiled/predicted).
      budget_bytes: what it was compared with.
      fits: ``True`` when predicted to fit and (if confirmed) ran; ``False`` otherwise.
      confirmed: whether it was actually run.
      reason: a short explanation when it does not fit (``"predicted ..."``, ``"out of memory
        when run: ..."``, ``"not tried: a smaller batch did not fit"``).
      compiled: the compiled executable (kept to time it without compiling again; not part of
        :meth:`to_dict`).
    """

    batch_size: int
    predicted_bytes: int | None
    budget_bytes: int
    fits: bool
    confirmed: bool
    reason: str = ""
    compiled: Any = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "predicted_bytes": self.predicted_bytes,
            "budget_bytes": self.budget_bytes,
            "fits": self.fits,
            "confirmed": self.confirmed,
            "reason": self.reason,
        }


@dataclasses.dataclass
class FitResult:
    """Result of :func:`largest_batch_that_fits`.

    Attributes:
      max_batch_size: the largest candidate that fits (``None`` if none does).
      budget_bytes: the memory budget used.
      budget_source: where the budget came from (``"device bytes_limit"``, ``"configured"``,
        ``"50% of available host RAM"``).
      records: one :class:`FitRecord` per candidate, ascending.
    """

    max_batch_size: int | None
    budget_bytes: int
    budget_source: str
    records: list[FitRecord]

    def to_dict(self) -> dict:
        return {
            "max_batch_size": self.max_batch_size,
            "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source,
            "records": [r.to_dict() for r in self.records],
        }


def memory_budget(
    budget_bytes: int | None = None, info: DeviceInfo | None = None
) -> tuple[int, str]:
    """``(bytes, source)``: the memory a step may use, ``budget_bytes`` when given, else the
    device's ``bytes_limit`` where JAX reports it, else (CPU)
    :data:`DEFAULT_CPU_BUDGET_FRACTION` of the host RAM available now."""
    info = info or detect_devices()
    if budget_bytes is not None:
        if check_positive(budget_bytes, "budget_bytes", "the bytes a step may use") < 1:
            raise ValueError(f"budget_bytes must be at least 1 byte, got {budget_bytes!r}.")
        return int(budget_bytes), "configured"
    if info.memory_bytes is not None:
        return info.memory_bytes, "device bytes_limit"
    import psutil  # only needed on backends that do not report their memory (CPU)

    avail = psutil.virtual_memory().available
    pct = round(100 * DEFAULT_CPU_BUDGET_FRACTION)
    return int(DEFAULT_CPU_BUDGET_FRACTION * avail), f"{pct}% of available host RAM"


def largest_batch_that_fits(
    make_args_for_batch: Callable[[int], Sequence[Any]],
    step_fn: Callable,
    candidates: Sequence[int],
    budget_bytes: int | None = None,
    *,
    confirm: bool = True,
    stop_at_first_failure: bool = True,
    cache: CompileCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    run_args: Callable[[int], Sequence[Any]] | None = None,
) -> FitResult:
    """The largest candidate batch size whose step fits in memory.

    For each candidate, ascending: compile the step for its shapes and predict its memory
    (:func:`predict_step_bytes`); if the prediction exceeds the budget, it does not fit (no
    run, which on CPU could get the process killed). If it is predicted to fit and ``confirm``,
    build the arguments and run the step once; an out-of-memory ``JaxRuntimeError``
    (``RESOURCE_EXHAUSTED``, accelerators) marks it as not fitting instead of propagating; any
    other error propagates. On a backend that reports no memory analysis the run alone decides
    (``predicted_bytes`` is ``None``; with ``confirm=False`` the candidate does not fit and its
    ``reason`` says why).

    Args:
      make_args_for_batch: ``B -> args`` (a tuple of pytrees) for ``step_fn(*args)`` at batch
        size ``B``. Called under ``jax.eval_shape`` for the prediction when it is traceable
        (nothing allocated), and for real only to confirm.
      step_fn: the step (jitted or not). It must not donate its arguments.
      candidates: batch sizes to try (sorted ascending here).
      budget_bytes: memory budget. ``None``: the device's ``bytes_limit`` where JAX reports
        it, else (CPU) half the host RAM available now.
      confirm: run the candidates predicted to fit.
      stop_at_first_failure: do not try candidates above the first that does not fit.
      cache: where the compiled steps are kept (default: the module's :class:`CompileCache`),
        so that timing them later compiles nothing.
      progress: ``progress(done, total)`` before each candidate and at the end.
      run_args: ``B -> args`` the confirming run takes (default ``make_args_for_batch``): e.g.
        the real batch a timing runs next, so that nothing is built only to be thrown away.

    Returns:
      A :class:`FitResult`.

    Example:
      >>> import jax.numpy as jnp
      >>> make = lambda b: (jnp.ones((b, 256)),)
      >>> res = largest_batch_that_fits(make, lambda x: jnp.tanh(x) @ x.T, [64, 256, 1024],
      ...                               budget_bytes=2 * 1024**2)
      >>> res.max_batch_size, [r.fits for r in res.records]
      (256, [True, True, False])
    """
    cands = sorted({check_batch_size(c, "each of candidates") for c in candidates})
    if not cands:
        raise ValueError("candidates is empty: pass the batch sizes to try, e.g. [64, 128, 256].")
    info = detect_devices()
    budget, source = memory_budget(budget_bytes, info)
    records: list[FitRecord] = []
    failed = False
    for b in cands:
        if progress is not None:  # before each candidate: compiling it is the phase's work
            progress(len(records), len(cands))
        if failed and stop_at_first_failure:
            records.append(
                FitRecord(b, None, budget, False, False, "not tried: a smaller batch did not fit")
            )
            continue
        shapes = abstract_args(make_args_for_batch, b)
        compiled = compile_step(step_fn, *shapes, cache=cache)
        pred = getattr(_prediction(compiled), "total_bytes", None)
        if pred is None and not confirm:
            failed = True
            why = f"{NO_ANALYSIS}, and confirm=False forbids running it"
            records.append(FitRecord(b, None, budget, False, False, why))
            continue
        if pred is not None and pred > budget:
            failed = True
            records.append(
                FitRecord(
                    b,
                    pred,
                    budget,
                    False,
                    False,
                    f"predicted {pred / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB",
                )
            )
            continue
        if not confirm:
            records.append(FitRecord(b, pred, budget, True, False, "", compiled))
            continue
        try:
            args = tuple((run_args or make_args_for_batch)(b))
            jax.block_until_ready(compiled(*args))
            del args
            records.append(FitRecord(b, pred, budget, True, True, "", compiled))
        except Exception as err:  # noqa: BLE001 - only out-of-memory is swallowed
            if not is_out_of_memory(err):
                raise
            failed = True
            first_line = str(err).splitlines()[0][:200]
            records.append(
                FitRecord(b, pred, budget, False, True, f"out of memory when run: {first_line}")
            )
    if progress is not None:
        progress(len(records), len(cands))
    fitting = [r.batch_size for r in records if r.fits]
    return FitResult(max(fitting) if fitting else None, budget, source, records)


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """Wall-clock time of one step.

    Attributes:
      median_s: median over the timed repeats (robust to a stray slow call).
      times_s: every timed repeat, in order.
      compile_s: time to compile (``0.0`` when given an already compiled step).
    """

    median_s: float
    times_s: tuple[float, ...]
    compile_s: float


def time_step(
    step_fn: Callable,
    args: Sequence[Any],
    *,
    warmup: int = 2,
    repeats: int = 5,
    cache: CompileCache | None = None,
) -> StepTiming:
    """Time ``step_fn(*args)``: compile excluded, ``warmup`` untimed calls, median of ``repeats``.

    One batch size at a time: on a shared machine prefer :func:`time_batch_sizes`, which
    interleaves the candidates so that a burst of load hits them all alike.

    Each call is followed by ``jax.block_until_ready`` on its output, so the time covers the
    computation, not only its dispatch. The same ``args`` are passed every time (the step must
    not donate them); the output is discarded.

    Args:
      step_fn: a function, a jitted function or a compiled executable (:func:`compile_step`).
      args: the positional arguments.
      warmup: untimed calls after compiling (caches, allocator, thread pools).
      repeats: timed calls, at least 1.
      cache: where compiled executables are kept (default: the module's); a step already
        compiled for these shapes is not compiled again (``compile_s`` is then 0).

    Returns:
      A :class:`StepTiming`.

    Example:
      >>> import jax.numpy as jnp
      >>> t = time_step(lambda x: x @ x.T, (jnp.ones((64, 64)),), warmup=1, repeats=3)
      >>> len(t.times_s), t.median_s > 0
      (3, True)
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}."
        )
    args = tuple(args)
    step_fn, compile_s = (cache or _CACHE).get(step_fn, *args)
    for _ in range(warmup):
        jax.block_until_ready(step_fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step_fn(*args))
        times.append(time.perf_counter() - t0)
    return StepTiming(float(statistics.median(times)), tuple(times), compile_s)


@dataclasses.dataclass(frozen=True)
class BatchTiming:
    """The interleaved timing of one batch size (see :func:`time_batch_sizes`).

    Attributes:
      batch_size: the batch size.
      median_s: median seconds per step over all timed calls.
      q25_s, q75_s: the quartiles of the timed calls: the step-time range to pass to
        :func:`gns.recommend.recommend` (``step_time_range``).
      spread: ``(q75 − q25) / median``, the relative interquartile range.
      times_s: every timed call, in order.
      extra_rounds: rounds added because the spread was above ``max_spread`` (a re-time).
      stable: whether the spread ended at or below ``max_spread``.
      compile_s: seconds spent compiling this batch's step now (0 when it was cached).
      pruned: why it stopped being timed before the others (``prune`` of
        :func:`time_batch_sizes`: it cannot win), ``""`` when it was timed to the end.
      cached: taken from a :class:`TimingCache` (measured by an earlier call), not timed now.
    """

    batch_size: int
    median_s: float
    q25_s: float
    q75_s: float
    spread: float
    times_s: tuple[float, ...]
    extra_rounds: int
    stable: bool
    compile_s: float = 0.0
    pruned: str = ""
    cached: bool = False

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "times_s": list(self.times_s)}


@dataclasses.dataclass(frozen=True)
class TimingTable:
    """Step times of several batch sizes, timed interleaved (:func:`time_batch_sizes`).

    Attributes:
      timings: ``{batch_size: BatchTiming}``, ascending.
      rounds: the interleaved rounds every batch size got.
      max_spread: the spread above which a batch size was re-timed.
    """

    timings: dict[int, BatchTiming]
    rounds: int
    max_spread: float

    def step_time(self) -> dict[int, float]:
        """``{batch: median seconds}``, the ``step_time`` of :func:`gns.recommend.recommend`."""
        return {b: t.median_s for b, t in self.timings.items()}

    def step_time_range(self) -> dict[int, tuple[float, float]]:
        """``{batch: (q25, q75)}``, the ``step_time_range`` of :func:`gns.recommend.recommend`."""
        return {b: (t.q25_s, t.q75_s) for b, t in self.timings.items()}

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "max_spread": self.max_spread,
            "batch_sizes": [t.to_dict() for t in self.timings.values()],
        }


def _summary(times: Sequence[float]) -> tuple[float, float, float, float]:
    q25, med, q75 = (
        float(q) for q in np.quantile(np.asarray(times, np.float64), [0.25, 0.5, 0.75])
    )
    return med, q25, q75, (q75 - q25) / med if med > 0 else math.inf


def interleaved_timing(
    runs: Mapping[int, Callable[[], Any]],
    *,
    rounds: int = 5,
    warmup: int = 1,
    max_spread: float = 0.1,
    max_extra_rounds: int = 10,
    clock: Callable[[], float] = time.perf_counter,
    prune: Callable[[dict[int, tuple[float, ...]]], Mapping[int, str]] | None = None,
    max_seconds: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, tuple[tuple[float, ...], int]]:
    """Time several callables round-robin; re-time the noisy ones in extra rounds.

    Every round calls each of ``runs`` once, timed by ``clock`` (forward in even rounds,
    backward in odd ones, so no batch size always follows the same neighbour). After
    ``rounds`` rounds, the keys whose relative interquartile range exceeds ``max_spread`` get
    more rounds (among themselves, still interleaved), until their spread is small or
    ``max_extra_rounds`` is spent. Pure Python: ``runs`` and ``clock`` can be fakes.

    Args:
      runs: ``{key: run}``; ``run()`` does one step and returns when it is done.
      rounds: interleaved timed rounds for every key (at least 1).
      warmup: untimed interleaved rounds first.
      max_spread: re-time a key while ``(q75 − q25)/median`` is above it.
      max_extra_rounds: at most this many extra rounds.
      clock: seconds, monotonic.
      prune: called after every timed round from the second on with ``{key: times}`` of the
        keys still timed; the keys it returns (``{key: reason}``) are timed no more (they
        cannot win). At least one key is always kept; when one is left, the timing stops (the
        ranking is settled, more rounds of that key alone would decide nothing).
      max_seconds: stop after the round in which the timed rounds' wall time (``clock``)
        passes it (at least one round is timed).
      progress: ``progress(done, total)`` after every round (``total`` grows when noisy keys
        get extra rounds).

    Returns:
      ``{key: (times, extra_rounds)}``.

    Example:
      >>> ticks = iter(range(100))
      >>> out = interleaved_timing({8: lambda: None}, rounds=3, clock=lambda: next(ticks))
      >>> out[8]
      ((1.0, 1.0, 1.0), 0)
    """
    rounds = check_int(rounds, "rounds", 1)
    warmup = check_int(warmup, "warmup", 0)
    max_extra_rounds = check_int(max_extra_rounds, "max_extra_rounds", 0)
    if not max_spread > 0:
        raise ValueError(f"max_spread must be positive (e.g. 0.1 for 10%), got {max_spread!r}.")
    keys = list(runs)
    times: dict[int, list[float]] = {k: [] for k in keys}
    extra = dict.fromkeys(keys, 0)
    round_index = itertools.count()
    active, spent, done = list(keys), [0.0], [0]

    def one_round(order, timed=True):
        t_round = clock()
        for k in order if next(round_index) % 2 == 0 else order[::-1]:
            t0 = clock()
            runs[k]()
            if timed:
                times[k].append(float(clock() - t0))
        if timed:
            spent[0] += clock() - t_round
            done[0] += 1
            if progress is not None:
                progress(done[0], rounds + done[0] - min(done[0], rounds))
            if prune is not None and done[0] >= 2:
                drop = prune({k: tuple(times[k]) for k in active})
                active[:] = [k for k in active if k not in drop] or active[:1]

    def over_budget():  # out of time, or the ranking is settled: one key left after pruning
        settled = prune is not None and len(active) == 1 < len(keys)
        return settled or max_seconds is not None and spent[0] > max_seconds

    for _ in range(warmup):
        one_round(keys, timed=False)
    for _ in range(rounds):
        one_round(list(active))
        if over_budget():
            break
    for _ in range(max_extra_rounds):
        noisy = [k for k in active if _summary(times[k])[3] > max_spread]
        if not noisy or over_budget():
            break
        one_round(noisy)
        for k in noisy:
            extra[k] += 1
    return {k: (tuple(times[k]), extra[k]) for k in keys}


def interleaved_times(
    calls: Mapping[Hashable, tuple[Callable, Sequence[Any]]], *, warmup: int, rounds: int
) -> dict[Hashable, list[float]]:
    """Seconds per call of each ``fn(*args)`` in ``calls``, timed round-robin.

    Each is warmed up (``warmup`` untimed calls), then every round times each once, in turn,
    alternating the order from round to round: a load that comes and goes hits all of them
    alike, and no call always follows the same one. One timed call is :func:`time_step` with
    one repeat (``block_until_ready`` on the output; a compiled executable is not compiled
    again). Round ``r`` of every list is one round, so
    paired ratios are ``a[r] / b[r]``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((64, 64))
      >>> t = interleaved_times({"mm": (lambda x: x @ x, (x,)), "add": (lambda x: x + x, (x,))},
      ...                       warmup=1, rounds=3)
      >>> sorted(t), len(t["mm"])
      (['add', 'mm'], 3)
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}.")
    fns = {}
    for key, (fn, args) in calls.items():  # compile once, warm up
        fns[key] = fn if hasattr(fn, "memory_analysis") else compile_step(fn, *args)
        if warmup:
            time_step(fns[key], args, warmup=warmup - 1, repeats=1)
    times: dict[Hashable, list[float]] = {key: [] for key in calls}
    for r in range(rounds):
        for key in list(calls)[:: 1 if r % 2 == 0 else -1]:
            (t,) = time_step(fns[key], calls[key][1], warmup=0, repeats=1).times_s
            times[key].append(t)
    return times


def time_batch_sizes(
    step_fn: Callable | Mapping[int, Callable],
    make_args_for_batch: Callable[[int], Sequence[Any]],
    batch_sizes: Sequence[int],
    *,
    rounds: int = 5,
    warmup: int = 1,
    max_spread: float = 0.1,
    max_extra_rounds: int = 10,
    cache: CompileCache | None = None,
    clock: Callable[[], float] = time.perf_counter,
    prune: Callable[[dict[int, tuple[float, ...]]], Mapping[int, str]] | None = None,
    max_seconds: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TimingTable:
    """Step times of all candidate batch sizes, timed interleaved, median and spread each.

    Timing one batch size after another lets a burst of load on a shared machine land on some
    of them only (re-timing minutes apart moved a step time by 40% here). Interleaving them
    (round-robin, several rounds) spreads any burst over all of them; the median of each is
    robust to a stray slow call, and a batch size whose interquartile range stays large is
    re-timed in extra rounds (:func:`interleaved_timing`). Each step is compiled once per
    shape (``cache``): a batch size compiled before (e.g. by :func:`largest_batch_that_fits`)
    is not compiled again. Each call is followed by ``jax.block_until_ready``.

    Args:
      step_fn: the step (function, jitted function or compiled executable), or
        ``{batch_size: step}`` (e.g. the ``compiled`` of :class:`FitRecord`).
      make_args_for_batch: ``B -> args`` for ``step(*args)``; called once per batch size, the
        arguments are kept for all rounds (the step must not donate them).
      batch_sizes: the candidates.
      rounds, warmup, max_spread, max_extra_rounds, clock, max_seconds, progress: as for
        :func:`interleaved_timing` (``progress(0, rounds)`` first, before the compiles).
      cache: where compiled executables are kept (default: the module's).
      prune: as for :func:`interleaved_timing`; a pruned batch keeps the times it got and its
        reason (``BatchTiming.pruned``).

    Returns:
      A :class:`TimingTable`; ``.step_time()`` and ``.step_time_range()`` feed
      :func:`gns.recommend.recommend`.

    Example:
      >>> import jax.numpy as jnp
      >>> table = time_batch_sizes(lambda x: x @ x.T, lambda b: (jnp.ones((b, 8)),), [8, 16])
      >>> sorted(table.step_time()), table.rounds
      ([8, 16], 5)
    """
    cands = sorted({check_int(b, "batch size", 1) for b in batch_sizes})
    if not cands:
        raise ValueError("batch_sizes is empty: pass the candidate batch sizes to time.")
    runs, compile_s = {}, {}
    if progress is not None:  # the phase starts with the compiles and the warm-up
        progress(0, rounds)
    for b in cands:
        fn = step_fn[b] if isinstance(step_fn, Mapping) else step_fn
        args = tuple(make_args_for_batch(b))
        compiled, compile_s[b] = (cache or _CACHE).get(fn, *args)
        runs[b] = functools.partial(lambda c, a: jax.block_until_ready(c(*a)), compiled, args)
    pruned: dict[int, str] = {}

    def recording_prune(times):
        drop = prune(times)
        pruned.update({b: why for b, why in drop.items() if b not in pruned})
        return drop

    raw = interleaved_timing(
        runs,
        rounds=rounds,
        warmup=warmup,
        max_spread=max_spread,
        max_extra_rounds=max_extra_rounds,
        clock=clock,
        prune=None if prune is None else recording_prune,
        max_seconds=max_seconds,
        progress=progress,
    )
    timings = {}
    for b, (times, extra) in raw.items():
        med, q25, q75, spread = _summary(times)
        timings[b] = BatchTiming(
            b,
            med,
            q25,
            q75,
            spread,
            times,
            extra,
            spread <= max_spread,
            compile_s[b],
            pruned.get(b, ""),
        )
    return TimingTable(timings, rounds, float(max_spread))


def step_signature(
    step_fn: Callable, *example_args, cache: CompileCache | None = None
) -> str | None:
    """A key for ``step_fn`` at these argument shapes on this backend's devices.

    The SHA-256 of the device kind and count and of the step's lowered program (StableHLO,
    without its module name): two steps that compute the same thing for the same shapes share
    it, whatever their Python identity. Lowering traces the step but compiles nothing; with
    ``cache`` the lowering is kept there, and compiling the step for these shapes through the
    cache later does not trace it again. ``None`` for an already compiled executable (nothing to
    lower).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
      >>> step_signature(lambda x: x * 2, x) == step_signature(lambda y: y * 2, x)
      True
    """
    if _is_compiled(step_fn):
        return None
    if cache is None:
        lowered = _as_jitted(step_fn).lower(*_abstract(example_args))
    else:
        lowered = cache.lowered(step_fn, *example_args)
    text = lowered.as_text()
    text = re.sub(r"^module @\S+", "module", text)
    dev = jax.devices()[0]
    key = f"{dev.platform}|{dev.device_kind}|{jax.device_count()}|{text}"
    return hashlib.sha256(key.encode()).hexdigest()


class TimingCache(dict):
    """Measurements of earlier calls in this process, by :func:`step_signature` (in memory).

    ``{signature: value}``: :func:`gns.finder.time_candidates` keeps ``(FitRecord,
    BatchTiming)`` per batch size here, so a second search for the same step on the same device
    (the same model at another budget, a re-run in a notebook) does not measure again the
    sizes timed to the end (it does those an earlier search pruned). A step time measured
    under another load is reused as it was: clear the cache to re-time.
    """


TIMING_CACHE = TimingCache()


def accumulated_step_time(
    step_time: dict[int, float], batch_size: int, max_batch_size: int
) -> tuple[float, int, int]:
    """Time of one optimizer step at ``batch_size`` on the measured step-time curve.

    Up to ``max_batch_size`` the step runs as one batch: its time is the measured one, or a
    log-log interpolation between the nearest measured batch sizes (clamped extrapolation at
    the ends, proportional to the batch). Above it the step is **gradient accumulation** of
    ``k`` equal microbatches of ``B/k`` examples, ``k`` the smallest divisor of ``B`` with
    ``B/k <= max_batch_size`` (``ceil(B / max_batch_size)`` for a power of two; a batch of 300
    with 128 fitting runs as 3 x 100), timed as ``k × t(B/k)``. That counts the optimizer
    update ``k`` times instead of once, a slight overestimate when the update is cheap next to
    the backward pass (it is for the models here); it needs no extra measurement and makes no
    assumption about the memory behaviour of a ``scan`` over microbatches.

    Args:
      step_time: measured ``{batch size: seconds per step}`` at batch sizes that fit.
      batch_size: the (effective) batch size to time.
      max_batch_size: the largest batch that fits.

    Returns:
      ``(seconds, accumulation_steps, micro_batch_size)``.

    Example:
      >>> accumulated_step_time({64: 0.1, 128: 0.2}, 512, 128)
      (0.8, 4, 128)
    """
    if not step_time:
        raise ValueError("step_time is empty: measure at least one batch size that fits.")
    batch_size = check_batch_size(batch_size, "batch_size")
    max_batch_size = check_batch_size(max_batch_size, "max_batch_size")
    k = max(1, math.ceil(batch_size / max_batch_size))
    while batch_size % k:
        k += 1
    micro = batch_size // k
    return k * interpolate_step_time(step_time, micro), k, micro


def interpolate_step_time(step_time: dict[int, float], batch_size: float) -> float:
    """Measured step time at ``batch_size``, else log-log interpolation (see above)."""
    bs = np.array(sorted(step_time), dtype=np.float64)
    ts = np.array([step_time[b] for b in sorted(step_time)], dtype=np.float64)
    if np.any(~np.isfinite(ts)) or np.any(ts <= 0):
        raise ValueError(f"step times must be finite and positive, got {dict(step_time)!r}.")
    b = float(batch_size)
    if b in step_time:
        return float(step_time[b])
    if b <= bs[0]:
        return float(ts[0])  # a smaller batch is not faster than the smallest measured one
    if b >= bs[-1]:
        return float(ts[-1] * b / bs[-1])  # no better throughput than the largest measured
    return float(np.exp(np.interp(np.log(b), np.log(bs), np.log(ts))))
