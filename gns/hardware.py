"""The hardware side of the batch-size question: devices, memory per batch size, step time.

* :func:`detect_devices` says what JAX runs on (platform, kind, count, memory when reported);
* :func:`predict_step_bytes` predicts the device memory of one step from the compiled program
  (XLA's buffer assignment), **without running it**;
* :func:`largest_batch_that_fits` predicts each candidate batch size against the device's
  capacity (or a memory budget on CPU, where running out of memory kills the process instead of
  raising), then confirms the ones predicted to fit by running them, recording an accelerator
  out-of-memory error (``RESOURCE_EXHAUSTED``) instead of crashing;
* :func:`time_step` times one step (compile excluded, warm-up, ``block_until_ready``, median);
* :func:`accumulated_step_time` (from :mod:`gns.recommend`) extends a step-time curve above the
  largest batch that fits, as gradient accumulation.

The memory and the speed of a step are measured, not assumed: on a 2-core CPU the throughput of
a small CNN peaks near batch 64-128 and falls beyond, while a GPU keeps gaining up to its memory.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# The step-time curve helpers live with the decision logic; re-exported here.
from gns.recommend import accumulated_step_time, interpolate_step_time

__all__ = [
    "DeviceInfo",
    "detect_devices",
    "MemoryPrediction",
    "predict_step_bytes",
    "compile_step",
    "FitRecord",
    "FitResult",
    "largest_batch_that_fits",
    "StepTiming",
    "time_step",
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


def compile_step(step_fn: Callable, *example_args) -> Any:
    """``jax.jit(step_fn).lower(*example_args).compile()``: an executable callable on the args.

    ``example_args`` may be arrays or ``jax.ShapeDtypeStruct`` (nothing is allocated). Keep
    the result: calling it runs the step without compiling again.
    """
    return _as_jitted(step_fn).lower(*_abstract(example_args)).compile()


def _prediction(compiled) -> MemoryPrediction:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(
            "This backend's compiled program reports no memory analysis "
            "(compiled.memory_analysis() is None): memory cannot be predicted here; pass "
            "candidates you know to fit, or confirm by running."
        )
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
    return _prediction(compile_step(step_fn, *example_args))


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


def _default_budget(info: DeviceInfo, budget_bytes: int | None) -> tuple[int, str]:
    if budget_bytes is not None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}.")
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
) -> FitResult:
    """The largest candidate batch size whose step fits in memory.

    For each candidate, ascending: compile the step for its shapes and predict its memory
    (:func:`predict_step_bytes`); if the prediction exceeds the budget, it does not fit (no
    run, which on CPU could get the process killed). If it is predicted to fit and ``confirm``,
    build the arguments and run the step once; an out-of-memory ``JaxRuntimeError``
    (``RESOURCE_EXHAUSTED``, accelerators) marks it as not fitting instead of propagating; any
    other error propagates.

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
    cands = sorted({int(c) for c in candidates})
    if not cands or cands[0] < 1:
        raise ValueError(f"candidates must be positive batch sizes, got {list(candidates)!r}.")
    info = detect_devices()
    budget, source = _default_budget(info, budget_bytes)
    jitted = _as_jitted(step_fn)
    records: list[FitRecord] = []
    failed = False
    for b in cands:
        if failed and stop_at_first_failure:
            records.append(
                FitRecord(b, None, budget, False, False, "not tried: a smaller batch did not fit")
            )
            continue
        try:
            shapes = jax.eval_shape(lambda b=b: tuple(make_args_for_batch(b)))
        except Exception:  # noqa: BLE001 - not traceable (e.g. NumPy data): build it for real
            shapes = _abstract(tuple(make_args_for_batch(b)))
        compiled = compile_step(jitted, *shapes)
        pred = _prediction(compiled).total_bytes
        if pred > budget:
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
            args = tuple(make_args_for_batch(b))
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
    step_fn: Callable, args: Sequence[Any], *, warmup: int = 2, repeats: int = 5
) -> StepTiming:
    """Time ``step_fn(*args)``: compile excluded, ``warmup`` untimed calls, median of ``repeats``.

    Each call is followed by ``jax.block_until_ready`` on its output, so the time covers the
    computation, not only its dispatch. The same ``args`` are passed every time (the step must
    not donate them); the output is discarded.

    Args:
      step_fn: a function, a jitted function or a compiled executable (:func:`compile_step`).
      args: the positional arguments.
      warmup: untimed calls after compiling (caches, allocator, thread pools).
      repeats: timed calls, at least 1.

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
    compile_s = 0.0
    if hasattr(step_fn, "lower") or not hasattr(step_fn, "memory_analysis"):
        t0 = time.perf_counter()
        step_fn = compile_step(step_fn, *args)
        compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(step_fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step_fn(*args))
        times.append(time.perf_counter() - t0)
    return StepTiming(float(statistics.median(times)), tuple(times), compile_s)
