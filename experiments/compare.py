"""The seed's claim end to end: does the recommended batch size really train fastest?

Two modes of ``experiments.cifar10`` (``--config.mode=compare`` / ``tradeoff``), both starting
with the measurements of the sweep (:func:`experiments.sweep.run_sweep` without its trainings:
noise scale, step time and memory at each batch size, the recommendation), kept in
``WORKDIR/sweep`` and reused when the command is re-run.

**compare** (``make demo``) trains three runs, with the learning rate of each batch size from
:func:`gns.recommend.scale_learning_rate` (the recommended one's from the recommendation):

a. ``baseline``: ``compare.baseline_batch_size`` until ``compare.max_epochs`` or
   ``compare.baseline_budget_s`` seconds of training; its best test accuracy is the target and
   the time it reached it (``time_to_best_s``) the budget of
b. ``recommended``: the recommended batch size, stopped at the target or at that budget;
c. ``baseline_same_time``: the baseline again, for the time (b) took to the target (its whole
   training time when it never got there): what the baseline reaches in the same time.

:func:`plan_runs` decides the budgets (a pure function). Writes ``WORKDIR/summary.json``
(``recommendation``, ``runs``, ``speedup``), ``WORKDIR/compare.png`` (test accuracy against
training time) and the runs in ``WORKDIR/runs/<role>``; the table is :func:`compare_table`.

**tradeoff** trains to ``compare.tradeoff.target_accuracy`` at ``compare.tradeoff.batch_sizes``
and at the recommended batch (:func:`experiments.sweep.run_training`), fits ``S(B) = S_min +
E_min/B`` (:func:`experiments.sweep.fit_tradeoff`), and checks the recommendation
(:func:`check_recommendation`): the recommended batch's time to target over the best measured
one, and ``B_crit`` of the fit over the measured ``B_simple``. Time to target is reported two
ways: the wall clock of each run (``time_to_target_s``) and ``steps_to_target(B) × t(B)``
(``device_time_to_target_s``) with ``t(B)`` from the measurements' one interleaved timing table
(:func:`experiments.sweep.measure_throughput`); the ranking and the ratios use the second, which
a busy machine does not skew from one run to the next.

Times are training time only (``wall_time_s`` of :func:`experiments.train.train_and_evaluate`:
compilation and evaluation excluded), so they compare fairly across batch sizes.

Example::

    python -m experiments.cifar10 --config configs/cifar10.py:smoke --config.mode=compare \
      --config.data.source=synthetic --workdir /tmp/compare

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018).
"""

from __future__ import annotations

import functools
import math
import os
import time

import ml_collections
from absl import logging

from experiments import runlog, sweep, train
from experiments.cli import UserError

ROLES = ("baseline", "recommended", "baseline_same_time")
SUMMARY_FILE = "summary.json"
RUN_FIELDS = (
    "role",
    "batch_size",
    "learning_rate",
    "budget_s",
    "target_accuracy",
    "wall_time_s",
    "epochs",
    "steps",
    "train_accuracy",
    "test_accuracy",
    "best_test_accuracy",
    "time_to_best_s",
    "time_to_target_s",
    "stop_reason",
)


# ---------------------------------------------------------------------------------------------
# Pure logic: who gets which budget, and how the recommendation did.


def plan_runs(
    baseline_budget_s: float, baseline: dict | None = None, recommended: dict | None = None
) -> list[dict]:
    """The budgets and targets of the compare runs, from the results known so far.

    Call it with no results for the first run, then again with each finished one:

    * ``baseline``: ``baseline_budget_s`` seconds, no target (it runs to convergence, i.e. the
      epoch cap, or to the budget).
    * ``recommended``: the baseline's ``time_to_best_s`` (the time it first reached its best
      test accuracy), target the baseline's ``best_test_accuracy``. Fallback: the baseline's
      whole ``wall_time_s`` when it has no time to best (no evaluation happened).
    * ``baseline_same_time``: the recommended run's ``time_to_target_s``, same target.
      Fallback: when the recommended run never reached the target, its whole ``wall_time_s``
      (the time it was given), so both batch sizes are compared at equal time anyway.

    Args:
      baseline_budget_s: training-time budget of the baseline (> 0).
      baseline: the baseline's summary (``time_to_best_s``, ``best_test_accuracy``,
        ``wall_time_s``), or ``None`` if it has not run yet.
      recommended: the recommended run's summary (``time_to_target_s``, ``wall_time_s``), or
        ``None``.

    Returns:
      One dict per run that can be planned, in order: ``role``, ``budget_s``,
      ``target_accuracy`` (``None``: no target) and ``budget_from`` (where the budget comes
      from, in words).

    Example:
      >>> [p["budget_s"] for p in plan_runs(300.0, {"time_to_best_s": 250.0,
      ...     "best_test_accuracy": 0.7, "wall_time_s": 300.0}, {"time_to_target_s": 90.0,
      ...     "wall_time_s": 90.0})]
      [300.0, 250.0, 90.0]
    """
    if not (isinstance(baseline_budget_s, int | float) and baseline_budget_s > 0):
        raise UserError(
            f"baseline_budget_s must be a positive number of seconds, got {baseline_budget_s!r}: "
            "set --config.compare.baseline_budget_s."
        )
    plans = [
        {
            "role": "baseline",
            "budget_s": float(baseline_budget_s),
            "target_accuracy": None,
            "budget_from": "compare.baseline_budget_s",
        }
    ]
    if baseline is None:
        return plans
    best = baseline.get("best_test_accuracy")
    t_best = baseline.get("time_to_best_s")
    if t_best is not None and t_best > 0:
        plans.append(
            {
                "role": "recommended",
                "budget_s": float(t_best),
                "target_accuracy": best,
                "budget_from": "the baseline's time to its best test accuracy",
            }
        )
    else:
        plans.append(
            {
                "role": "recommended",
                "budget_s": float(baseline["wall_time_s"]),
                "target_accuracy": best,
                "budget_from": "the baseline's whole training time (it has no time to best)",
            }
        )
    if recommended is None:
        return plans
    t_target = recommended.get("time_to_target_s")
    if t_target is not None and t_target > 0:
        budget, source = float(t_target), "the recommended run's time to target"
    else:
        budget = float(recommended["wall_time_s"])
        source = "the recommended run's whole training time (it never reached the target)"
    plans.append(
        {
            "role": "baseline_same_time",
            "budget_s": budget,
            "target_accuracy": best,
            "budget_from": source,
        }
    )
    return plans


def check_recommendation(
    points: list[dict], recommended_batch_size: int, b_simple: float, b_crit: float | None
) -> dict:
    """How the recommended batch size did against the best one measured.

    The ranking and ``time_ratio`` use the device time to target ``steps × t(B)``
    (``device_time_to_target_s``, :func:`experiments.sweep.with_device_time`), which load on a
    shared machine does not skew from run to run; the wall-clock ones are reported beside them.

    Args:
      points: trainings to the target (:func:`experiments.sweep.run_training` dicts with
        :func:`experiments.sweep.with_device_time`: ``batch_size``, ``reached``,
        ``device_time_to_target_s``, ``time_to_target_s``).
      recommended_batch_size: the recommended batch (one of the points).
      b_simple: the measured noise scale.
      b_crit: ``B_crit`` of the fitted tradeoff, or ``None`` when it could not be fitted.

    Returns:
      ``recommended_device_time_to_target_s``, ``recommended_time_to_target_s`` (wall),
      ``best_batch_size``, ``best_device_time_to_target_s``, ``time_ratio`` (recommended over
      best in device time: 1 means the recommendation was the fastest measured; ``None`` when
      it missed the target), ``wall_time_ratio`` (the same in wall-clock time, over the
      fastest wall clock), ``rank`` (1 = fastest in device time), ``ranking``
      (:func:`experiments.sweep.rank_time_to_target`), ``b_simple``, ``b_crit`` and
      ``b_crit_over_b_simple``.

    Example:
      >>> pts = [{"batch_size": 32, "device_time_to_target_s": 20.0, "time_to_target_s": 30.0},
      ...        {"batch_size": 64, "device_time_to_target_s": 25.0, "time_to_target_s": 24.0}]
      >>> c = check_recommendation(pts, 64, 100.0, 50.0)
      >>> c["time_ratio"], c["wall_time_ratio"], c["rank"]
      (1.25, 1.0, 2)
    """
    if not any(p["batch_size"] == recommended_batch_size for p in points):
        raise ValueError(
            f"recommended_batch_size={recommended_batch_size} is not among the trained batch "
            f"sizes {[p['batch_size'] for p in points]}: train it too."
        )
    ranking = sweep.rank_time_to_target(points)
    walls = sweep.rank_time_to_target(points, key="time_to_target_s")
    rec = next((r for r in ranking if r["batch_size"] == recommended_batch_size), {})
    rec_wall = next((r for r in walls if r["batch_size"] == recommended_batch_size), {})
    finite = b_crit is not None and b_simple is not None and 0 < b_simple < math.inf
    return {
        "recommended_batch_size": int(recommended_batch_size),
        "recommended_device_time_to_target_s": rec.get("device_time_to_target_s"),
        "recommended_time_to_target_s": rec.get("time_to_target_s"),
        "best_batch_size": ranking[0]["batch_size"] if ranking else None,
        "best_device_time_to_target_s": ranking[0]["device_time_to_target_s"] if ranking else None,
        "time_ratio": rec.get("device_over_best"),
        "wall_time_ratio": rec_wall.get("wall_over_best"),
        "rank": rec.get("rank"),
        "ranking": ranking,
        "num_reached": len(ranking),
        "num_trained": len(points),
        "b_simple": b_simple,
        "b_crit": b_crit,
        "b_crit_over_b_simple": float(b_crit) / float(b_simple) if finite else None,
    }


# ---------------------------------------------------------------------------------------------
# Configs.


def _baseline(config) -> tuple[int, float]:
    cc = config.compare
    b = cc.baseline_batch_size if cc.baseline_batch_size is not None else config.batch_size
    lr = cc.baseline_learning_rate
    return int(b), float(lr if lr is not None else config.learning_rate)


def _train_config(config) -> ml_collections.ConfigDict:
    """``config`` without ``compare``, as the runs train it: the baseline's batch size and
    learning rate, ``compare``'s schedule, no noise-scale tracking, no progress bar."""
    cc = config.compare
    d = config.to_dict()
    d.pop("compare")
    c = ml_collections.ConfigDict(d)
    c.mode = "train"
    c.batch_size, c.learning_rate = _baseline(config)
    if cc.schedule is not None:
        c.schedule = cc.schedule
    if cc.warmup_steps is not None:
        c.warmup_steps = int(cc.warmup_steps)
    if cc.eval_examples is not None:
        c.eval_examples = int(cc.eval_examples)
    c.gns_every = 0  # the sweep measured the noise scale; the runs time plain training
    c.checkpoint_every = 0
    c.progress_bar = False
    return c


def measurement_config(config) -> ml_collections.ConfigDict:
    """The ``configs/sweep.py``-shaped config of the measurements and of the tradeoff mode's
    trainings: ``train`` is :func:`_train_config`, the stages are ``config.compare``'s
    (``tradeoff.batch_sizes`` are timed in the sweep's table; trained only by the tradeoff
    mode)."""
    cc = config.compare
    s = ml_collections.ConfigDict({"compilation_cache": True, "train": _train_config(config)})
    for section in ("noise", "throughput", "recommend", "tradeoff"):
        s[section] = ml_collections.ConfigDict(cc[section].to_dict())
    s.tradeoff.update(min_batch_size=1, max_runs=0)  # (only for batch_sizes=None)
    return s


def validate_config(config) -> None:
    """Check the ``compare`` fields both modes read (and the measurement stages, through
    :func:`experiments.sweep.validate_config`); a :class:`~experiments.cli.UserError` names
    the field and the fix."""
    cc = config.compare
    plan_runs(cc.baseline_budget_s)
    for field in ("max_epochs", "eval_every_examples"):
        if not (isinstance(cc[field], int | float) and cc[field] > 0):
            raise UserError(
                f"config.compare.{field}={cc[field]!r} must be a positive number",
                hint=f"--config.compare.{field}=...",
            )
    names = {"train": "", **{s: f"compare.{s}" for s in ("noise", "throughput", "tradeoff")}}
    sweep.validate_config(measurement_config(config), names | {"recommend": "compare.recommend"})


# ---------------------------------------------------------------------------------------------
# The compare mode.


def _curve(workdir: str) -> list[list[float]]:
    rows = runlog.read_jsonl(os.path.join(workdir, sweep.METRICS_FILE))
    return [[r["wall_time_s"], r["test_accuracy"]] for r in rows if "test_accuracy" in r]


def _train_run(config, workdir, plan, batch_size, learning_rate) -> dict:
    cc = config.compare
    cfg = _train_config(config)
    cfg.batch_size = int(batch_size)
    cfg.learning_rate = float(learning_rate)
    cfg.num_epochs = float(cc.max_epochs)
    cfg.max_wall_time_s = float(plan["budget_s"])
    cfg.target_accuracy = plan["target_accuracy"]
    cfg.eval_every = max(1, round(int(cc.eval_every_examples) / int(batch_size)))
    cfg.log_every = min(int(cfg.log_every), cfg.eval_every)
    run_dir = os.path.join(workdir, "runs", plan["role"])
    logging.info(
        "compare: %s run at batch %d, lr %.4g, budget %.1f s (%s), target %s",
        plan["role"],
        batch_size,
        learning_rate,
        plan["budget_s"],
        plan["budget_from"],
        plan["target_accuracy"],
    )
    s = train.train_and_evaluate(cfg, run_dir)
    row = {k: s.get(k) for k in RUN_FIELDS if k in s}
    row.update(
        role=plan["role"],
        budget_s=plan["budget_s"],
        budget_from=plan["budget_from"],
        target_accuracy=plan["target_accuracy"],
        workdir=run_dir,
        curve=_curve(run_dir),
    )
    if plan["role"] == "baseline":
        # The baseline's target is its own best: it reached it at its time to best.
        row["target_accuracy"] = s.get("best_test_accuracy")
        row["time_to_target_s"] = s.get("time_to_best_s")
    return row


def _mode(body):
    """A mode ``run(config, workdir) -> summary`` from ``body(config, workdir, sw, t0)``: it
    validates ``config`` before anything is written, holds the workdir
    (:func:`experiments.runlog.workdir_lock`), records ``config.json``, runs (or reuses) the
    measurements in ``workdir/sweep`` and passes their ``sweep.json`` dict ``sw`` on."""

    @functools.wraps(body)
    def run(config, workdir: str) -> dict:
        t0 = time.perf_counter()
        validate_config(config)
        with runlog.workdir_lock(workdir):
            runlog.write_json(os.path.join(workdir, "config.json"), config.to_dict())
            mcfg = measurement_config(config)
            sw = sweep.run_sweep(mcfg, os.path.join(workdir, "sweep"), trainings=False)
            return body(config, workdir, sw, t0)

    del run.__wrapped__  # its signature is (config, workdir), not the body's
    return run


@_mode
def run_compare(config, workdir: str, sw: dict, t0: float) -> dict:
    """The compare mode: measure, recommend, train the three runs; returns ``summary.json``."""
    from gns import plots

    rec = sw["recommendation"]
    if rec["accumulation_steps"] > 1:
        raise UserError(
            f"The recommended batch {rec['batch_size']} needs gradient accumulation "
            f"({rec['accumulation_steps']} x {rec['micro_batch_size']}), which "
            "experiments.train does not do: lower compare.throughput.max_batch_size or set "
            "compare.recommend.candidates to batch sizes that fit."
        )
    base_b, base_lr = _baseline(config)
    budget = float(config.compare.baseline_budget_s)
    a = _train_run(config, workdir, plan_runs(budget)[0], base_b, base_lr)
    b = _train_run(
        config, workdir, plan_runs(budget, a)[1], rec["batch_size"], rec["learning_rate"]
    )
    c = _train_run(config, workdir, plan_runs(budget, a, b)[2], base_b, base_lr)
    runs = [a, b, c]
    speedup = None
    if b["time_to_target_s"] and a["time_to_target_s"]:
        speedup = a["time_to_target_s"] / b["time_to_target_s"]
    summary = {
        "mode": "compare",
        "device": sw["device"],
        "noise_scale": {k: sw["noise_scale"][k] for k in ("b_simple", "interval", "confidence")},
        "recommendation": rec,
        "baseline": {"batch_size": base_b, "learning_rate": base_lr},
        "runs": runs,
        "speedup": speedup,
        "measurement_time_s": sum(sw["stage_time_s"].values()),
        "total_time_s": time.perf_counter() - t0,
    }
    try:
        summary["plot"] = plots.plot_compare(runs, os.path.join(workdir, "compare.png"))
    except Exception as e:  # a plot is a convenience: never lose the finished runs to it
        logging.warning("Could not write the compare plot: %s", e)
    runlog.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    return summary


def _secs(x: float) -> str:
    return f"{x:.1f} s" if x < 100 else f"{x:.0f} s"


def _fmt(x, spec: str, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec) + suffix


def compare_table(summary: dict) -> str:
    """The seed-style table of a compare summary, one line per run.

    Columns: role, batch size, learning rate, training time, epochs, train accuracy,
    validation (test) accuracy, time to the target (the baseline's best accuracy).
    """
    head = (
        f"{'run':<19} {'batch':>6} {'lr':>9} {'time s':>8} {'epochs':>7} "
        f"{'train acc':>10} {'val acc':>8} {'to target s':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in summary["runs"]:
        lines.append(
            f"{r['role']:<19} {r['batch_size']:>6d} {r['learning_rate']:>9.3g} "
            f"{_fmt(r['wall_time_s'], '8.1f'):>8} {_fmt(r['epochs'], '7.2f'):>7} "
            f"{_fmt(100 * r['train_accuracy'], '9.1f', '%'):>10} "
            f"{_fmt(100 * r['test_accuracy'], '7.1f', '%'):>8} "
            f"{_fmt(r['time_to_target_s'], '12.1f'):>12}"
        )
    a, b, c = summary["runs"]
    target = a["best_test_accuracy"]
    lines.append("")
    if b["time_to_target_s"] is not None:
        lines.append(
            f"batch {b['batch_size']} reached the baseline's best validation accuracy "
            f"({100 * target:.1f}%, after {_secs(a['time_to_target_s'])} at batch "
            f"{a['batch_size']}) in {_secs(b['time_to_target_s'])} "
            f"({100 * (1 - b['time_to_target_s'] / a['time_to_target_s']):.0f}% less time); "
            f"batch {c['batch_size']} given {_secs(c['budget_s'])} reached "
            f"{100 * c['test_accuracy']:.1f}%."
        )
    else:
        lines.append(
            f"batch {b['batch_size']} did not reach the baseline's best validation accuracy "
            f"({100 * target:.1f}%) within {_secs(b['budget_s'])}: it reached "
            f"{100 * b['test_accuracy']:.1f}%; batch {c['batch_size']} given the same time "
            f"reached {100 * c['test_accuracy']:.1f}%."
        )
    r = summary["recommendation"]
    n = summary["noise_scale"]
    lines.append(
        f"recommendation: batch {r['batch_size']}, lr {r['learning_rate']:.3g} "
        f"(B_simple = {_fmt(n['b_simple'], '.4g')}, predicted speedup "
        f"{r['predicted_speedup_vs_baseline']:.2f}x over batch {summary['baseline']['batch_size']})"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The tradeoff mode.


@_mode
def run_tradeoff(config, workdir: str, sw: dict, t0: float) -> dict:
    """The tradeoff mode: measure, recommend, train to the target at each batch size, fit, and
    check the recommendation; returns ``summary.json``."""
    mcfg = measurement_config(config)
    rec = sw["recommendation"]
    b_simple = sweep.noise_scale_value(sw["noise_scale"])
    batches = sorted({int(b) for b in mcfg.tradeoff.batch_sizes} | {int(rec["batch_size"])})
    too_big = [b for b in batches if b > sw["max_batch_size"]]
    if too_big:
        raise UserError(
            f"batch sizes {too_big} do not fit in memory (largest that fits: "
            f"{sw['max_batch_size']})",
            hint="remove them from --config.compare.tradeoff.batch_sizes",
        )
    st = sweep.SweepState(workdir)  # finished trainings, reused when the command is re-run
    points = []
    for b in batches:
        cfg, rule = sweep.training_config(mcfg, b, b_simple)
        fp = runlog.fingerprint(cfg.to_dict())
        p = st.get("trainings", b, fp)
        if p is None:
            p = sweep.run_training(cfg, os.path.join(workdir, "train", f"B{b}-{fp[:8]}"), rule)
            st.put("trainings", b, fp, p)
        points.append(p)
    points = sweep.with_device_time(
        points, sweep.step_times(sw["throughput"]), sw["max_batch_size"]
    )
    fit = sweep.fit_tradeoff(points, mcfg.tradeoff.num_bootstrap, mcfg.train.seed)
    check = check_recommendation(points, int(rec["batch_size"]), b_simple, fit["b_crit"])
    summary = {
        "mode": "tradeoff",
        "device": sw["device"],
        "noise_scale": {k: sw["noise_scale"][k] for k in ("b_simple", "interval", "confidence")},
        "recommendation": rec,
        "target_accuracy": float(mcfg.tradeoff.target_accuracy),
        "points": points,
        "tradeoff": fit,
        "check": check,
        "measurement_time_s": sum(sw["stage_time_s"].values()),
        "total_time_s": time.perf_counter() - t0,
    }
    runlog.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    return summary


def tradeoff_table(summary: dict) -> str:
    """Time to target per batch size, the fit, and the check of the recommendation."""
    rec_b = summary["recommendation"]["batch_size"]
    head = (
        f"{'batch':>6} {'lr':>9} {'steps':>7} {'to target s':>12} {'steps x t(B) s':>15} "
        f"{'final acc':>10}"
    )
    lines = [f"target test accuracy: {100 * summary['target_accuracy']:.1f}%", head]
    for p in summary["points"]:
        mark = "  <- recommended" if p["batch_size"] == rec_b else ""
        lines.append(
            f"{p['batch_size']:>6d} {p['learning_rate']:>9.3g} {_fmt(p['steps'], '7.0f'):>7} "
            f"{_fmt(p['time_to_target_s'], '12.1f'):>12} "
            f"{_fmt(p['device_time_to_target_s'], '15.2f'):>15} "
            f"{_fmt(100 * (p['final_test_accuracy'] or 0.0), '9.1f', '%'):>10}{mark}"
        )
    ch, fit = summary["check"], summary["tradeoff"]
    lines.append("")
    if ch["time_ratio"] is not None:
        lines.append(
            f"recommended batch {rec_b}: {ch['recommended_device_time_to_target_s']:.2f} s of "
            f"steps x t(B) to target, {ch['time_ratio']:.2f}x the best measured "
            f"({ch['best_device_time_to_target_s']:.2f} s at batch {ch['best_batch_size']}); "
            f"rank {ch['rank']} of {ch['num_reached']} (wall clock: "
            f"{_fmt(ch['wall_time_ratio'], '.2f')}x the fastest)."
        )
    else:
        lines.append(f"recommended batch {rec_b} did not reach the target.")
    if fit.get("b_crit") is not None:
        lines.append(
            f"fit: S_min = {fit['s_min']:.4g}, E_min = {fit['e_min']:.4g}, B_crit = "
            f"{fit['b_crit']:.4g}; measured B_simple = {_fmt(ch['b_simple'], '.4g')} "
            f"(B_crit / B_simple = {_fmt(ch['b_crit_over_b_simple'], '.3g')})"
        )
    else:
        lines.append(f"fit: not available ({fit.get('error')})")
    return "\n".join(lines)


def report(summary: dict) -> str:
    """The table of a compare or tradeoff summary."""
    if summary.get("mode") == "compare":
        return compare_table(summary)
    if summary.get("mode") == "tradeoff":
        return tradeoff_table(summary)
    raise ValueError(f"summary of mode {summary.get('mode')!r}: expected compare or tradeoff.")
