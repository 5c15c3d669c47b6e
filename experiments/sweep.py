"""The batch-size sweep: which batch size trains this model fastest on this device, and why.

Usage::

    python -m experiments.sweep --config configs/sweep.py:smoke --workdir /tmp/sweep_smoke
    python -m experiments.sweep --config configs/sweep.py:cpu --workdir runs/sweep \
      --config.train.data.source=folder \
      --config.train.data.path=../shared/data/cifar10-jpeg.tar.gz

On the model and data of ``config.train`` (a ``configs/cifar10.py`` config) it

1. **measures the noise scale**: trains ``noise.warmup_steps`` steps, then on those parameters
   estimates ``|G|²`` and ``tr(Σ)`` on ``noise.num_batches`` independent batches
   (:mod:`gns.estimate`) and pools them into ``b_simple`` with a bootstrap interval
   (:func:`gns.smoothing.interval`);
2. **sweeps step time and memory**: for powers of two up to the largest batch that fits
   (:mod:`gns.hardware`: predicted from the compiled step, confirmed by running it), the median
   time of one training step; batches above it are gradient accumulation (``k × t(B/k)``);
3. **runs short trainings** to ``tradeoff.target_accuracy`` at several batch sizes, the
   learning rate scaled from ``train.learning_rate`` at ``train.batch_size`` by the rule of
   :func:`gns.recommend.scale_learning_rate`, and fits ``S(B) = S_min + E_min/B``
   (:func:`gns.tradeoff.fit`);
4. **recommends** a batch size and learning rate (:func:`gns.recommend.recommend`).

It writes ``DIR/sweep.json`` (every number above), ``DIR/throughput.png``, ``DIR/tradeoff.png``
and ``DIR/time_to_target.png``, and prints a summary table. Each finished measurement is kept in
``DIR/sweep_state.json`` (written atomically); re-running the same command after an
interruption reuses them and only measures what is missing (a training interrupted with
Ctrl-C saves a checkpoint in ``DIR/train/<hash>/B<batch>`` and resumes from it; a killed one starts
over). Each stage is keyed by the part of the config it depends on: changing, say, the target
accuracy re-runs the trainings (in a new ``DIR/train/<hash>/``) but reuses the noise scale and
the step times.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import train

FLAGS = flags.FLAGS
STATE_FILE = "sweep_state.json"
SWEEP_FILE = "sweep.json"

__all__ = ["run_sweep", "SweepState", "candidate_batch_sizes", "summary_table"]


# ---------------------------------------------------------------------------------------------
# Persistent state: one JSON file, rewritten atomically after every finished measurement.


def fingerprint(*parts) -> str:
    """A short hash of config parts (ConfigDicts or JSON-able values)."""
    plain = [p.to_dict() if hasattr(p, "to_dict") else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def section_fingerprints(config, b_noise: float | None = None) -> dict[str, str]:
    """What each stage's measurements depend on; a stage is re-measured when its part changes.

    ``noise_scale``: the seed, the training config and ``noise``. ``throughput``: the model,
    data, optimizer and ``throughput`` (not the seed or the learning rate). ``trainings``: the
    seed, the training config, ``tradeoff`` and the measured noise scale (the learning rates
    are scaled with it).
    """
    t = config.train
    return {
        "noise_scale": fingerprint(config.seed, t, config.noise),
        "throughput": fingerprint(
            t.model, t.data, t.optimizer, t.gns_microbatches, config.throughput
        ),
        # 6 significant digits: a re-measured noise scale equal up to float noise keeps them.
        "trainings": fingerprint(
            config.seed, t, config.tradeoff, None if b_noise is None else f"{b_noise:.6g}"
        ),
    }


class SweepState:
    """Finished measurements of a sweep, persisted in ``workdir/sweep_state.json``.

    Sections: ``noise_scale`` (one value), ``throughput`` and ``trainings`` (items keyed by the
    batch size). Each section carries the fingerprint of the config it was measured under
    (:func:`section_fingerprints`): a section measured under another config is not reused, and
    is replaced by the first new measurement. :meth:`put` rewrites the file atomically, so a
    killed sweep loses at most the measurement in progress.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, STATE_FILE)
        self.data: dict[str, Any] = {"version": 1, "sections": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                old = json.load(f)
            if isinstance(old.get("sections"), dict):
                self.data = old
            else:
                logging.warning("Ignoring %s: not a sweep state file of this version.", self.path)
        self.reused: list[str] = []
        self.stale: list[str] = []

    def _section(self, section: str, fp: str) -> dict | None:
        sec = self.data["sections"].get(section)
        if sec is not None and sec.get("fingerprint") != fp:
            if section not in self.stale:
                self.stale.append(section)
                logging.info("The config of %s changed: measuring it again.", section)
            return None
        return sec

    def get(self, section: str, fp: str, key=None):
        sec = self._section(section, fp)
        if sec is None:
            return None
        value = sec.get("value") if key is None else sec.get("items", {}).get(str(key))
        if value is not None:
            self.reused.append(section if key is None else f"{section}[{key}]")
        return copy.deepcopy(value)  # callers may annotate it; the stored record stays as measured

    def put(self, section: str, fp: str, value, key=None) -> None:
        sec = self._section(section, fp)
        if sec is None:
            sec = {"fingerprint": fp, "value": None, "items": {}}
            self.data["sections"][section] = sec
        value = copy.deepcopy(value)  # later annotations by the caller must not leak in
        if key is None:
            sec["value"] = value
        else:
            sec["items"][str(key)] = value
        train.write_json(self.path, self.data)


# ---------------------------------------------------------------------------------------------
# Model, optimizer and steps shared by the stages.


def _setup(config, ds):
    from experiments import models
    from gns import smoothing

    model = models.get_model(config.train.model, num_classes=ds.num_classes)
    schedule = train.make_schedule(config.train, int(config.tradeoff.max_steps))
    optimizer = train.make_optimizer(config.train, schedule)
    tracker = smoothing.ema()
    plain_fn, _ = train.make_train_steps(
        model,
        optimizer,
        tracker,
        method=train.resolve_gns_method(config.train, model),
        num_microbatches=int(config.train.gns_microbatches),
        use_dropout=models.uses_dropout(model),
        schedule=schedule,
    )
    state = train.init_state(
        config.train, model, optimizer, tracker, tuple(ds.train_images.shape[1:])
    )
    return model, plain_fn, state


def _noise_method(config, model) -> str:
    cfg = copy.deepcopy(config.train)
    cfg.gns_method = config.noise.method
    return train.resolve_gns_method(cfg, model)


def measure_noise_scale(config, ds, model, plain_fn, state) -> dict:
    """Stage 1: warm up, then estimate ``b_simple`` on independent batches with an interval."""
    from experiments import data, models
    from gns import estimate, smoothing

    ncfg = config.noise
    augment = bool(config.train.data.get("augment", True))
    t0 = time.perf_counter()
    step = jax.jit(plain_fn)  # no donation: the caller's state stays valid for the timing
    warm = data.train_batches(
        ds, int(config.train.batch_size), seed=int(config.seed), augment=augment
    )
    try:
        for _ in range(int(ncfg.warmup_steps)):
            state, _ = step(state, next(warm))
    finally:
        warm.close()
    jax.block_until_ready(state.params)
    method = _noise_method(config, model)
    rng = jax.random.PRNGKey(int(config.seed)) if models.uses_dropout(model) else None
    k = int(config.train.gns_microbatches)

    @jax.jit
    def measure(params, batch_stats, batch):
        n = batch["label"].shape[0]
        batch = {"image": batch["image"], "label": batch["label"], "index": jnp.arange(n)}
        loss_fn = train.make_loss_fn(model, batch_stats, rng)
        if method == "per_example":
            stats, _, _ = estimate.per_example(
                loss_fn, params, batch, chunk_size=ncfg.chunk_size, has_aux=True
            )
        else:
            stats, _, _ = estimate.microbatch(
                loss_fn, params, batch, num_microbatches=k, has_aux=True
            )
        return stats.g_sq, stats.trace_cov

    batches = data.train_batches(
        ds, int(ncfg.batch_size), seed=int(config.seed) + 1, augment=augment
    )
    g_sq, trace_cov = [], []
    try:
        for _ in range(int(ncfg.num_batches)):
            g, t = measure(state.params, state.batch_stats, next(batches))
            g_sq.append(float(g))
            trace_cov.append(float(t))
    finally:
        batches.close()
    pooled = smoothing.interval(
        g_sq, trace_cov, confidence=float(ncfg.confidence), block_size=1, seed=int(config.seed)
    )
    return {
        "b_simple": pooled.estimate,
        "interval": [pooled.low, pooled.high],
        "confidence": float(ncfg.confidence),
        "g_sq": float(np.mean(g_sq)),
        "trace_cov": float(np.mean(trace_cov)),
        "per_batch": [
            {"g_sq": g, "trace_cov": t, "b_simple": (t / g if g > 0 else math.inf)}
            for g, t in zip(g_sq, trace_cov, strict=True)
        ],
        "batch_size": int(ncfg.batch_size),
        "num_batches": int(ncfg.num_batches),
        "method": method,
        "after_warmup_steps": int(ncfg.warmup_steps),
        "time_s": time.perf_counter() - t0,
    }


def candidate_batch_sizes(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` (rounded up to one) to ``hi``."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= min_batch_size <= max_batch_size, got {lo}, {hi}.")
    b = 1 << max(0, math.ceil(math.log2(lo)))
    out = []
    while b <= hi:
        out.append(b)
        b *= 2
    return out


def measure_throughput_one(config, plain_fn, state, image_shape, batch_size: int) -> dict:
    """Stage 2 for one batch: predicted memory, fits (confirmed by running), median step time."""
    from gns import hardware

    tcfg = config.throughput

    def make_args(b):  # traceable: under jax.eval_shape it allocates nothing
        images = jnp.zeros((b,) + tuple(image_shape), jnp.float32)
        return state, {"image": images, "label": jnp.zeros((b,), jnp.int32)}

    res = hardware.largest_batch_that_fits(
        make_args, plain_fn, [batch_size], tcfg.memory_budget_bytes
    )
    rec = res.records[0]
    row = {
        "batch_size": batch_size,
        "fits": rec.fits,
        "predicted_bytes": rec.predicted_bytes,
        "budget_bytes": res.budget_bytes,
        "budget_source": res.budget_source,
        "reason": rec.reason,
        "accumulation_steps": 1,
        "step_time_s": None,
        "examples_per_s": None,
        "times_s": [],
    }
    if rec.fits:
        timing = hardware.time_step(
            rec.compiled, make_args(batch_size), warmup=int(tcfg.warmup), repeats=int(tcfg.repeats)
        )
        row.update(
            step_time_s=timing.median_s,
            examples_per_s=batch_size / timing.median_s,
            times_s=list(timing.times_s),
        )
    return row


def run_training(config, workdir: str, batch_size: int, b_noise: float) -> dict:
    """Stage 3 for one batch: train to the target; steps and time to it (``None`` if missed)."""
    from gns import recommend, tradeoff

    tcfg = config.tradeoff
    lr, rule = recommend.scale_learning_rate(
        float(config.train.learning_rate),
        int(config.train.batch_size),
        batch_size,
        b_noise,
        str(config.train.optimizer),
    )
    cfg = copy.deepcopy(config.train)
    cfg.batch_size = int(batch_size)
    cfg.learning_rate = float(lr)
    cfg.seed = int(config.seed)
    cfg.target_accuracy = float(tcfg.target_accuracy)
    cfg.num_epochs = None
    cfg.num_steps = int(tcfg.max_steps)
    cfg.max_wall_time_s = float(tcfg.max_wall_time_s)
    cfg.eval_every = max(1, round(int(tcfg.eval_every_examples) / batch_size))
    cfg.log_every = cfg.eval_every
    summary = train.train_and_evaluate(cfg, workdir)
    rows = train.read_metrics(os.path.join(workdir, train.METRICS_FILE))
    evals = [r for r in rows if "test_accuracy" in r]
    steps = tradeoff.steps_to_target(
        [r["step"] for r in evals], [r["test_accuracy"] for r in evals], float(tcfg.target_accuracy)
    )
    return {
        "batch_size": int(batch_size),
        "workdir": workdir,
        "learning_rate": float(lr),
        "lr_rule": rule,
        "reached": steps is not None,
        "steps": steps,
        "time_to_target_s": summary.get("time_to_target_s") if steps is not None else None,
        "eval_every": int(cfg.eval_every),
        "stop_reason": summary.get("stop_reason"),
        "steps_run": summary.get("steps"),
        "wall_time_s": summary.get("wall_time_s"),
        "final_test_accuracy": summary.get("test_accuracy"),
        "best_test_accuracy": summary.get("best_test_accuracy"),
        "curve": [[r["step"], r["test_accuracy"]] for r in evals],
    }


def fit_tradeoff(points: list[dict], num_bootstrap: int, seed: int) -> dict:
    """Fit ``S(B)`` to the reached points; an ``error`` entry instead when it cannot be fitted."""
    from gns import tradeoff

    reached = [p for p in points if p["reached"]]
    out = {
        "s_min": None,
        "e_min": None,
        "b_crit": None,
        "intervals": {},
        "points": [
            {
                k: p.get(k)
                for k in (
                    "batch_size",
                    "steps",
                    "time_to_target_s",
                    "learning_rate",
                    "reached",
                    "workdir",
                )
            }
            for p in points
        ],
    }
    try:
        f = tradeoff.fit(
            [p["batch_size"] for p in reached],
            [p["steps"] for p in reached],
            num_bootstrap=num_bootstrap,
            seed=seed,
        )
    except ValueError as e:
        out["error"] = f"{e} ({len(reached)} of {len(points)} trainings reached the target)"
        return out
    d = f.to_dict()
    d.pop("points")
    out.update(d)
    return out


def _step_times(throughput: list[dict]) -> dict[int, float]:
    return {r["batch_size"]: r["step_time_s"] for r in throughput if r["fits"]}


# ---------------------------------------------------------------------------------------------
# The sweep.


def run_sweep(config, workdir: str) -> dict:
    """Run (or resume) the sweep of ``config`` in ``workdir``; returns the ``sweep.json`` dict."""
    from tqdm import tqdm

    from experiments import data
    from gns import hardware, plots, recommend

    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    st = SweepState(workdir)
    fps = section_fingerprints(config)
    if config.get("compilation_cache", True):
        _enable_compilation_cache(os.path.join(workdir, "jax_cache"))
    train.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    device = hardware.detect_devices()
    tcfg = config.throughput
    cands = candidate_batch_sizes(int(tcfg.min_batch_size), int(tcfg.max_batch_size))
    fixed = config.tradeoff.batch_sizes
    n_train = len(fixed) if fixed else int(config.tradeoff.max_runs)
    bar = tqdm(
        total=1 + len(cands) + n_train + 1,
        desc="sweep",
        unit="task",
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )

    ds = data.load(config.train.data)
    image_shape = tuple(ds.train_images.shape[1:])
    model, plain_fn, state0 = _setup(config, ds)

    stage_t = {"setup": time.perf_counter() - t_start}
    # 1. Noise scale.
    bar.set_description("noise scale")
    noise = st.get("noise_scale", fps["noise_scale"])
    if noise is None:
        noise = measure_noise_scale(config, ds, model, plain_fn, state0)
        st.put("noise_scale", fps["noise_scale"], noise)
    b_noise = float(noise["b_simple"])
    fps = section_fingerprints(config, b_noise)
    if math.isnan(b_noise):
        raise ValueError("The noise scale came out nan (non-finite gradients): check the model.")
    bar.update(1)
    stage_t["noise_scale"] = time.perf_counter() - t_start - sum(stage_t.values())

    # 2. Throughput and memory.
    throughput = []
    failed = False
    for b in cands:
        bar.set_description(f"step time B={b}")
        row = st.get("throughput", fps["throughput"], b)
        if row is None and failed:
            row = {
                "batch_size": b,
                "fits": False,
                "predicted_bytes": None,
                "step_time_s": None,
                "examples_per_s": None,
                "accumulation_steps": 1,
                "reason": "not tried: a smaller batch did not fit",
            }
        elif row is None:
            row = measure_throughput_one(config, plain_fn, state0, image_shape, b)
            st.put("throughput", fps["throughput"], row, b)
        failed = failed or not row["fits"]
        throughput.append(row)
        bar.update(1)
    fitting = [r["batch_size"] for r in throughput if r["fits"]]
    if not fitting:
        raise RuntimeError(
            f"No candidate batch size fits in memory ({throughput[0].get('reason')}): lower "
            "config.throughput.min_batch_size or raise config.throughput.memory_budget_bytes."
        )
    max_batch = max(fitting)
    times = _step_times(throughput)
    for factor in tcfg.accumulation_factors:
        b = int(factor) * max_batch
        if any(r["batch_size"] == b for r in throughput):
            row = next(r for r in throughput if r["batch_size"] == b)
        else:
            row = {"batch_size": b, "fits": False, "predicted_bytes": None, "reason": ""}
            throughput.append(row)
        t, k, micro = hardware.accumulated_step_time(times, b, max_batch)
        row.update(
            accumulation_steps=k,
            micro_batch_size=micro,
            step_time_s=t,
            examples_per_s=b / t,
            reason="; ".join(
                x for x in (row.get("reason"), f"timed as gradient accumulation {k} x {micro}") if x
            ),
        )

    stage_t["throughput"] = time.perf_counter() - t_start - sum(stage_t.values())

    # 3. Trainings to the target and the tradeoff fit.
    train_batches = (
        list(fixed)
        if fixed
        else _spread([b for b in fitting if b >= int(config.tradeoff.min_batch_size)], n_train)
    )
    points = []
    for b in train_batches:
        bar.set_description(f"training B={b}")
        p = st.get("trainings", fps["trainings"], b)
        if p is None:
            if b > max_batch:
                logging.warning(
                    "Skipping the training at batch %d: above the largest that fits.", b
                )
                bar.update(1)
                continue
            run_dir = os.path.join(workdir, "train", fps["trainings"][:8], f"B{b}")
            p = run_training(config, run_dir, b, b_noise)
            st.put("trainings", fps["trainings"], p, b)
        points.append(p)
        bar.update(1)
    tradeoff_out = fit_tradeoff(points, int(config.tradeoff.num_bootstrap), int(config.seed))

    stage_t["trainings"] = time.perf_counter() - t_start - sum(stage_t.values())

    # 4. Recommendation, from the noise scale (primary) and from the fitted curve (check).
    bar.set_description("recommend")
    rcfg = config.recommend
    common = dict(
        max_batch_size=max_batch,
        base_lr=float(config.train.learning_rate),
        base_batch_size=int(config.train.batch_size),
        optimizer=str(config.train.optimizer),
        price_per_hour=rcfg.price_per_hour,
        candidates=list(rcfg.candidates)
        if rcfg.candidates
        else sorted(
            {r["batch_size"] for r in throughput if r["step_time_s"] is not None}
            | {int(config.train.batch_size)}
        ),
        objective=str(rcfg.objective),
    )
    rec = recommend.recommend(
        b_noise,
        times,
        b_noise_interval=tuple(noise["interval"]),
        s_min=tradeoff_out["s_min"],
        **common,
    )
    rec_fit = None
    if tradeoff_out["b_crit"] is not None:
        rec_fit = recommend.recommend(
            tradeoff_out["b_crit"], times, s_min=tradeoff_out["s_min"], **common
        )
    bar.update(1)
    bar.close()
    stage_t["recommend"] = time.perf_counter() - t_start - sum(stage_t.values())

    sweep = {
        "device": device.to_dict(),
        "fingerprints": fps,
        "throughput": sorted(throughput, key=lambda r: r["batch_size"]),
        "max_batch_size": max_batch,
        "noise_scale": noise,
        "tradeoff": tradeoff_out,
        "recommendation": rec.to_dict(),
        "recommendation_from_tradeoff": None if rec_fit is None else rec_fit.to_dict(),
        "measured_time_to_target": {
            str(p["batch_size"]): p["time_to_target_s"] for p in points if p["reached"]
        },
        "reused": st.reused,
        "remeasured_after_config_change": st.stale,
        "stage_time_s": stage_t,
    }
    train.write_json(os.path.join(workdir, SWEEP_FILE), sweep)
    try:
        sweep["plots"] = plots.sweep_plots(sweep, workdir)
    except Exception as e:  # plots are a convenience: never lose a finished sweep to them
        logging.warning("Could not write the sweep plots: %s", e)
    return sweep


def _enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path``: the trainings compile the same model
    init, train and eval programs at every batch size, and a re-run compiles nothing again.
    (Process-wide, and only where JAX has no cache directory configured yet.)"""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _spread(values: list[int], n: int) -> list[int]:
    """At most ``n`` of ``values`` (sorted), evenly spread, ends included."""
    if len(values) <= n:
        return values
    idx = np.unique(np.round(np.linspace(0, len(values) - 1, n)).astype(int))
    return [values[i] for i in idx]


def _fmt(x, spec: str) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


def summary_table(sweep: dict) -> str:
    """A plain-text summary: device, throughput, noise scale, tradeoff, recommendation."""
    d = sweep["device"]
    lines = [f"device: {d['platform']} / {d['kind']} x{d['count']}", ""]
    lines.append(
        f"{'batch':>7} {'fits':>5} {'accum':>5} {'step ms':>9} {'examples/s':>11} {'pred. MiB':>10}"
    )
    for r in sweep["throughput"]:
        ms = None if r.get("step_time_s") is None else 1e3 * r["step_time_s"]
        mib = None if r.get("predicted_bytes") is None else r["predicted_bytes"] / 2**20
        lines.append(
            f"{r['batch_size']:>7} {str(r['fits']):>5} {r.get('accumulation_steps', 1):>5} "
            f"{_fmt(ms, '9.2f'):>9} {_fmt(r.get('examples_per_s'), '11.0f'):>11} "
            f"{_fmt(mib, '10.1f'):>10}"
        )
    n = sweep["noise_scale"]
    lines += [
        "",
        f"max batch that fits: {sweep['max_batch_size']}",
        f"noise scale b_simple: {_fmt(n['b_simple'], '.4g')}  "
        f"{round(100 * n['confidence'])}% interval [{_fmt(n['interval'][0], '.4g')}, "
        f"{_fmt(n['interval'][1], '.4g')}]  ({n['num_batches']} batches of {n['batch_size']}, "
        f"{n['method']}, after {n['after_warmup_steps']} steps)",
        "",
        f"{'batch':>7} {'lr':>10} {'steps to target':>16} {'time to target s':>17}",
    ]
    t = sweep["tradeoff"]
    for p in t["points"]:
        lines.append(
            f"{p['batch_size']:>7} {p['learning_rate']:>10.3g} {_fmt(p['steps'], '16.0f'):>16} "
            f"{_fmt(p['time_to_target_s'], '17.1f'):>17}"
        )
    if t.get("b_crit") is not None:
        iv = t.get("intervals", {}).get("b_crit")
        ivs = "" if not iv else f"  interval [{iv[0]:.4g}, {iv[1]:.4g}]"
        lines.append(
            f"fit: S_min = {t['s_min']:.4g}, E_min = {t['e_min']:.4g}, B_crit = {t['b_crit']:.4g}"
            + ivs
        )
    else:
        lines.append(f"fit: not available ({t.get('error')})")
    r = sweep["recommendation"]
    lines += [
        "",
        f"recommended batch size: {r['batch_size']} (accumulation steps {r['accumulation_steps']}),"
        f" learning rate {r['learning_rate']:.4g}, predicted speedup vs baseline "
        f"{r['predicted_speedup_vs_baseline']:.2f}x",
        f"  {r['reason']}",
        f"  lr rule: {r['lr_rule']}",
    ]
    rf = sweep.get("recommendation_from_tradeoff")
    if rf is not None:
        lines.append(
            f"from the fitted tradeoff (B_crit as the noise scale): batch {rf['batch_size']}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
    """The flags, defined only when this module is the main program: flags defined at import
    would clash with those of another main that imports it (``experiments.cifar10`` does)."""
    flags.DEFINE_string("workdir", None, "Directory for sweep.json, plots and state.")
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/sweep.py:smoke.", lock_config=True
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(train.QuietOrbax())
    sweep = run_sweep(FLAGS.config, FLAGS.workdir)
    print(summary_table(sweep))
    print(f"\nwrote {os.path.join(FLAGS.workdir, SWEEP_FILE)}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
