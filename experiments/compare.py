"""Which batch-size policy trains fastest on this machine? The ``compare`` and ``tradeoff`` modes
of ``experiments.cifar10``, each a run of the sweep (:mod:`experiments.sweep`) in
``WORKDIR/sweep``, reused on a re-run, and each writing ``WORKDIR/summary.json``.

**compare** trains each of ``compare.policies`` once per seed to a smoothed target in
``WORKDIR/runs/<policy>-B<batch>-seed<seed>`` and ranks them by device time ``Σ_B steps(B)·t(B)``
(:func:`verdict`, ``compare.png``). **tradeoff** is the sweep with its trainings, the
recommended batch among them, and checks the recommendation (:func:`check_recommendation`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Sequence

from absl import logging

from experiments import adaptive, figures, progress, runlog, sweep, tasks, train, validation
from experiments.cli import UserError
from experiments.sweep import fmt
from gns import common, plots, scaling
from gns import schedule as gschedule

SUMMARY_FILE = "summary.json"
TIMING_FILE = "timing.json"
PLOT_FILE = "compare.png"


def trailing_means(values: Sequence[float], window: int) -> list[float | None]:
    """The mean of the last ``window`` values at each position (``None`` until ``window``
    values exist): ``trailing_means([0.1, 0.3, 0.5], 2) == [None, 0.2, 0.4]``."""
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window={window!r}: need an int >= 1.")
    return [
        None if i + 1 < window else float(sum(values[i + 1 - window : i + 1])) / window
        for i in range(len(values))
    ]


def verdict(runs: Sequence[dict], target_accuracy: float | None = None) -> dict:
    """The policies of ``runs`` (as in ``summary.json``) ranked by mean device time to target
    over their seeds. A policy reaches the target when all its runs did; its spread is half the
    range of its runs' device times. Another ties with the fastest when their means differ by at
    most the sum of their spreads, or when it is not slower in every paired comparison (per
    seed, and per timing round where the runs carry ``device_time_by_round``).

    Returns ``fastest`` (``None``: none reached the target), ``tie`` (the fastest first; ``[]``
    when none), ``ranking``, ``policies`` (per policy: means, ``spread_s``, ``ratio`` to the
    fastest, its paired ``ratio_range``, ``tie``...), ``over_default`` (each policy's speedup
    over the ``default`` policy, :func:`_over_default`) and ``text`` (the lines to print)."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["policy"], []).append(r)
    rows = validation.mean_over_seeds(runs, key="policy")
    ranked = validation.rank(rows, key="policy")
    ratio = {r["policy"]: r["over_best"] for r in ranked}
    ranking = list(ratio)
    fastest = ranking[0] if ranking else None
    stats: dict[str, dict] = {}
    for row in rows:
        rs, ok = by[row["policy"]], row["reached"]
        best = [r["best_smoothed_accuracy"] for r in rs if r["best_smoothed_accuracy"] is not None]
        lo, hi = row["device_time_range"] or (0.0, 0.0)
        stats[row["policy"]] = {
            **{k: row[k] for k in ("seeds", "num_reached", "reached")},
            "batch_size": rs[0]["batch_size"],
            "device_time_to_target_s": row[validation.DEVICE] if ok else None,
            "time_to_target_s": row["time_to_target_s"] if ok else None,
            "spread_s": (hi - lo) / 2 if ok else None,
            "ratio": ratio.get(row["policy"]),
            "ratio_range": None,
            "tie": False,
            "best_smoothed_accuracy": max(best, default=None),
        }
    f = stats.get(fastest)
    for p in ranking:
        s = stats[p]
        paired = _paired(by[p], by[fastest])
        gap = s["device_time_to_target_s"] - f["device_time_to_target_s"]
        inside = gap <= s["spread_s"] + f["spread_s"] or bool(paired and min(paired) <= 1)
        s["ratio_range"] = [min(paired), max(paired)] if paired else None
        s["tie"] = p != fastest and inside
    tie = [p for p in ranking if stats[p]["tie"]]
    out = {"fastest": fastest, "tie": [fastest, *tie] if tie else [], "ranking": ranking,
           "policies": stats, "over_default": _over_default(by, stats)}  # fmt: skip
    out["text"] = _verdict_text(out, target_accuracy)
    return out


def _over_default(by: dict[str, list[dict]], stats: dict[str, dict]) -> dict[str, dict]:
    """How much sooner than the ``default`` policy (the usual batch 64) each policy that
    reached the target did: ``{policy: {'speedup', 'paired_range'}}``, the default's mean device
    time over the policy's and the same ratio paired by seed and timing round; ``{}`` when the
    default did not reach the target in every seed."""
    d = stats.get("default")
    if d is None or not d["reached"]:
        return {}
    out = {}
    for p, s in stats.items():
        if p == "default" or not s["reached"]:
            continue
        paired = _paired(by["default"], by[p])
        out[p] = {
            "speedup": d["device_time_to_target_s"] / s["device_time_to_target_s"],
            "paired_range": [min(paired), max(paired)],
        }
    return out


def _paired(runs: Sequence[dict], ref_runs: Sequence[dict]) -> list[float]:
    """The device times of ``runs`` over ``ref_runs``', each run paired with the reference run
    of its seed (:func:`_paired_ratios`)."""
    ref = {x["seed"]: x for x in ref_runs}
    return [x for run in runs if run["seed"] in ref for x in _paired_ratios(run, ref[run["seed"]])]


def _paired_ratios(run: dict, fastest: dict) -> list[float]:
    """Device time of ``run`` over the fastest's run of the same seed: under each timing round
    when both carry ``device_time_by_round``, else the one ratio of their device times."""
    a, b = run.get("device_time_by_round"), fastest.get("device_time_by_round")
    if a and b and len(a) == len(b):
        return [x / y for x, y in zip(a, b, strict=True)]
    return [run["device_time_to_target_s"] / fastest["device_time_to_target_s"]]


def _verdict_text(v: dict, target: float | None) -> list[str]:
    stats, fastest = v["policies"], v["fastest"]
    what = "the target" if target is None else f"{100 * target:.1f}%"
    if fastest is None:
        lines = [f"verdict: no policy reached {what} (smoothed test accuracy) in every seed."]
    else:
        f = stats[fastest]
        lines = [
            f"fastest to {what}: {fastest} (batch {f['batch_size']}), "
            f"{f['device_time_to_target_s']:.1f} s of steps x t(B) (mean of {len(f['seeds'])} "
            f"seed(s), spread +/- {f['spread_s']:.1f} s; wall clock {f['time_to_target_s']:.1f} s)"
        ]
    for p in v["ranking"][1:]:
        s = stats[p]
        lo, hi = s["ratio_range"] or (s["ratio"], s["ratio"])
        lines.append(
            f"  {p} (batch {s['batch_size']}): {s['ratio']:.2f}x the fastest (paired by seed and "
            f"timing round {lo:.2f}-{hi:.2f}x){': tie, inside the spread' if s['tie'] else ''}"
        )
    for p, s in stats.items():
        if not s["reached"]:
            lines.append(
                f"  {p} (batch {s['batch_size']}): never reached {what} in "
                f"{len(s['seeds']) - s['num_reached']} of {len(s['seeds'])} seed(s); best "
                f"smoothed accuracy {fmt(s['best_smoothed_accuracy'], '.1f', 100, '%')}"
            )
    if v["over_default"]:
        d = stats["default"]
        lines.append(
            f"default (batch {d['batch_size']})'s device time to {what} over each policy's: "
            + ", ".join(
                f"{p} {o['speedup']:.2f}x (paired {o['paired_range'][0]:.2f}-"
                f"{o['paired_range'][1]:.2f}x)"
                for p, o in v["over_default"].items()
            )
        )
    if v["tie"]:
        lines.append(
            f"verdict: tie between {', '.join(v['tie'])} (the difference is inside the seed "
            "spread, or the order flips on a seed or a timing round)."
        )
    elif fastest is not None:
        lines.append(f"verdict: {fastest} is the fastest.")
    return lines


def check_recommendation(
    points: list[dict], recommended_batch_size: int, b_simple: float, b_crit: float | None
) -> dict:
    """How the recommended batch did among the trainings ``points`` (:func:`validation.rank`):
    ``time_ratio`` (over the best in device time; ``None`` when it missed the target),
    ``wall_time_ratio``, ``rank``, and the fitted ``b_crit`` over the measured ``b_simple``."""
    if not any(p["batch_size"] == recommended_batch_size for p in points):
        raise ValueError(
            f"recommended_batch_size={recommended_batch_size} is not among the trained batch "
            f"sizes {[p['batch_size'] for p in points]}: train it too."
        )
    ranking = validation.rank(validation.mean_over_seeds(points))
    rec = next((r for r in ranking if r["batch_size"] == recommended_batch_size), {})
    best = ranking[0] if ranking else {}
    finite = b_crit is not None and 0 < b_simple < math.inf
    return {
        "recommended_batch_size": int(recommended_batch_size),
        "recommended_device_time_to_target_s": rec.get(validation.DEVICE),
        "recommended_time_to_target_s": rec.get("time_to_target_s"),
        "best_batch_size": best.get("batch_size"),
        "best_device_time_to_target_s": best.get(validation.DEVICE),
        "time_ratio": rec.get("over_best"),
        "wall_time_ratio": rec.get("wall_over_best"),
        "rank": rec.get("rank"),
        "ranking": ranking,
        "num_reached": len(ranking),
        "num_trained": len(points),
        "b_simple": b_simple,
        "b_crit": b_crit,
        "b_crit_over_b_simple": b_crit / b_simple if finite else None,
    }


def _train_config(config):
    """``config`` as the measurements and the runs train it: ``compare``'s baseline batch and
    rate (the default policy's, the reference of every rate), schedule, warmup and evaluation
    size where set; no noise-scale tracking (the sweep measured it), no checkpoints, no bar."""
    cmp, c = config.compare, copy.deepcopy(config)
    fields = {"batch_size": cmp.baseline_batch_size, "learning_rate": cmp.baseline_learning_rate,
              **{k: cmp[k] for k in ("schedule", "warmup_steps", "eval_examples")}}  # fmt: skip
    c.update({k: v for k, v in fields.items() if v is not None})
    c.update(mode="train", gns_every=0, checkpoint_every=0, progress_bar=False)
    return c


def _best_measured(config, workdir: str) -> int | None:
    """The fastest batch of a tradeoff mode's summary (its ``check``), or ``None`` when there
    is no such summary or no point reached its target."""
    path = config.compare.tradeoff_summary or os.path.join(workdir, "tradeoff", SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    s = runlog.read_json(path)
    if s.get("mode") != "tradeoff":
        raise UserError(
            f"{path} is not the summary of a tradeoff run (mode={s.get('mode')!r})",
            hint="point config.compare.tradeoff_summary at WORKDIR/summary.json of "
            "--config.mode=tradeoff",
        )
    return s["check"]["best_batch_size"]


def plan_policies(config, workdir: str, sweep_result: dict) -> tuple[dict, dict, list[int]]:
    """What each policy trains after the measurements ``sweep_result`` (a ``sweep.json`` dict):
    ``({policy: {'batch_size', 'learning_rate', 'gns_every', 'adaptive'...}}, {policy: why
    skipped}, adaptive candidates)``."""
    names = tuple(config.compare.policies)
    rec = sweep_result["recommendation"]
    b_noise = rec.get("b_noise")  # the recommendation's basis: one noise scale for every rate
    b_noise = sweep.noise_scale_value(sweep_result["noise_scale"]) if b_noise is None else b_noise
    base = _train_config(config)
    base_b, base_lr = base.batch_size, base.learning_rate
    rows = sweep_result["throughput"]
    fits = sorted(r["batch_size"] for r in rows if r["fits"] and r["step_time_s"]
                  and r.get("accumulation_steps", 1) == 1)  # fmt: skip
    batch = {
        "default": base_b,
        "recommended": rec["batch_size"] if rec["accumulation_steps"] == 1 else None,
        "largest_fits": max(fits, default=None),
        "best_measured": _best_measured(config, workdir) if "best_measured" in names else None,
    }
    why = {
        "recommended": "needs gradient accumulation, which the runs do not do",
        "largest_fits": "no timed batch size fits the memory budget",
        "best_measured": "no tradeoff summary with a point at its target",
    }
    a = config.adaptive
    if a.candidates is not None:
        cands = adaptive.candidates(config)
    else:  # the schedule's powers of two that were timed and fit
        powers = set(gschedule.powers_of_two(a.min_batch_size, a.max_batch_size))
        cands = [b for b in fits if b in powers]
        if "adaptive" in names and not cands:
            raise UserError(
                f"no power-of-two batch in [{a.min_batch_size}, {a.max_batch_size}] was timed "
                "and fits (config.adaptive.min_batch_size, max_batch_size)",
                hint="lower config.adaptive.min_batch_size or widen config.throughput",
            )
    plans = {}
    for p in names:
        if p == "adaptive":
            start = b_noise if 0 < b_noise < math.inf else None  # the 'sgd' rule's first rate
            rule = scaling.rule_for(config.optimizer)
            if rule == "sgd" and b_noise == math.inf:  # unresolved: the rule's limit, linear
                rule = "linear"
            fields = {"candidates": tuple(cands), "lr_rule": rule, "initial_noise_scale": start}
            plans[p] = dict(batch_size=base_b, learning_rate=base_lr, adaptive=fields,
                            gns_every=int(config.gns_every))  # fmt: skip
        elif batch[p] is not None:
            b = int(batch[p])
            lr = scaling.learning_rate(config.optimizer, base_lr, base_b, b, b_noise)[0]
            plans[p] = dict(batch_size=b, learning_rate=lr, gns_every=0)
    costs = sweep_result["measurement_cost_s"]
    if "adaptive" in plans:  # the schedule decides on the throughput stage's timing table
        plans["adaptive"]["measurement_s"] = sum(
            v for k, v in costs.items() if k.startswith("throughput")
        )
    if "recommended" in plans:  # the gns run goes on from the measurement's pilot...
        start = sweep_result["noise_scale"]["pilot"]["start"]
        cost = sum(costs.values())
        plans["recommended"].update(
            start_from=os.path.abspath(os.path.join(workdir, "sweep", start["checkpoint"])),
            start=start,
            measurement_s=max(0.0, cost - start["seconds"]),  # ...adding what it cost beyond
        )
    return plans, {p: why[p] for p in names if p in why and p not in plans}, cands


def plan_batch_sizes(plan: dict) -> list[int]:
    """The batch sizes a policy's run may train at: the schedule's candidates, or its batch."""
    return list(plan.get("adaptive", {}).get("candidates", [plan["batch_size"]]))


def _run_config(config, plan: dict, seed: int, table: dict[int, dict], limit_s: float):
    """The training config of one policy run: the plan's batch, rate (and schedule), stopping at
    the smoothed target, after ``compare.max_epochs`` or after ``limit_s`` seconds."""
    cmp, c = config.compare, _train_config(config)
    b = int(plan["batch_size"])
    c.update(batch_size=b, learning_rate=float(plan["learning_rate"]), seed=int(seed))
    c.update(target_accuracy=float(cmp.target_accuracy), target_window=int(cmp.target_window))
    c.update(max_wall_time_s=float(limit_s), num_epochs=float(cmp.max_epochs))
    c.eval_every = max(1, round(int(cmp.eval_every_examples) / b))
    c.log_every = min(int(c.log_every), c.eval_every)
    c.gns_every = int(plan["gns_every"])
    c.start_from = plan.get("start_from")
    c.adaptive.enabled = "adaptive" in plan
    if c.adaptive.enabled:
        c.adaptive.update(plan["adaptive"], eval_every_examples=int(cmp.eval_every_examples))
        c.adaptive.step_times = tuple(table[b]["step_time_s"] for b in c.adaptive.candidates)
    return c


def _timing(config, workdir: str, sweep_result: dict, ds, sizes: list[int]) -> dict[int, dict]:
    """``{B: {'step_time_s', 'times_s'}}`` of the global batch ``sizes`` from the sweep's one
    interleaved throughput table, or, when it lacks some, from that table timed again with them
    (``WORKDIR/timing.json``, reused while it holds the same sizes on the same mesh)."""
    rows = sweep_result["throughput"]
    if not set(sizes) <= set(sweep.step_times(rows)):
        path = os.path.join(workdir, TIMING_FILE)
        saved = runlog.read_json(path) if os.path.exists(path) else {}
        if saved.get("sizes") != sizes or saved.get("mesh") != sweep_result["mesh"]:
            logging.info("compare: timing %s with the sweep's batch sizes, interleaved.", sizes)
            view = sweep.stage_config(_train_config(config), "throughput")
            tput = sweep.measure_throughput(view, ds, tasks.get(config), extra=sizes)
            saved = {"sizes": sizes, "mesh": tput["mesh"], "rows": tput["rows"]}
            runlog.write_json(path, saved)
        rows = saved["rows"]
    timed = {r["batch_size"]: r for r in rows if r["fits"] and r["step_time_s"]}
    reasons = {r["batch_size"]: r["reason"] for r in rows}
    missing = {b: reasons.get(b) for b in sizes if b not in timed}
    if missing:
        raise UserError(
            f"the policies' batch sizes {missing} could not be timed",
            hint="lower config.adaptive.candidates or config.compare.baseline_batch_size",
        )
    return {b: {k: timed[b][k] for k in ("step_time_s", "times_s")} for b in sizes}


def _device_times(rows: list[dict], step_time: dict[int, float], start: float) -> dict:
    """``{step: device time}`` at each row: ``start`` plus the steps since the previous row
    times ``t(B)`` of the row's batch (the batch changes only right after a row)."""
    out, prev, total = {}, 0, start
    for r in rows:
        total += (r["step"] - prev) * step_time[int(r["batch_size"])]
        out[r["step"]], prev = total, r["step"]
    return out


def _run_record(policy: str, seed: int, run_dir: str, s: dict, target_window: int,
                table: dict[int, dict], measurement_s: float) -> dict:  # fmt: skip
    """One run of the summary from its training summary ``s`` and rows: where it reached its
    smoothed target, the times to it (device time also under each round of the timing table),
    the curves. ``measurement_s`` (what the policy's measurements cost: the adaptive schedule's
    timing table; beyond the pilot, for a run from the pilot, which counts the pilot's steps)
    is in every time."""
    rows = runlog.read_jsonl(os.path.join(run_dir, runlog.METRICS_FILE))
    evals = [r for r in rows if "test_accuracy" in r]
    smooth = trailing_means([r["test_accuracy"] for r in evals], target_window)
    at = next((r for r in evals if r["step"] == s.get("steps_to_target")), None)
    device = _device_times(rows, {b: v["step_time_s"] for b, v in table.items()}, measurement_s)
    per_round = [
        _device_times(rows, {b: v["times_s"][k] for b, v in table.items()}, measurement_s)
        for k in range(min(len(v["times_s"]) for v in table.values()))
    ]
    by_b = adaptive.steps_by_batch_size(rows, at["step"] if at else s["steps"])
    trained = [r for r in rows if "start" not in r]  # without the pilot's row
    rec = {
        "policy": policy,
        "seed": seed,
        "batch_size": trained[0]["batch_size"] if trained else None,
        "final_batch_size": rows[-1]["batch_size"] if rows else None,
        "learning_rate": trained[0]["learning_rate"] if trained else None,
        "start": s.get("start"),
        "measurement_s": measurement_s,
        "reached": at is not None,
        "time_to_target_s": at["wall_time_s"] + measurement_s if at else None,
        "device_time_to_target_s": device[at["step"]] if at else None,
        "device_time_by_round": None if at is None else [d[at["step"]] for d in per_round],
        "steps_to_target": at["step"] if at else None,
        "examples_to_target": at["examples_seen"] if at else None,
        "steps_by_batch_size": {str(b): n for b, n in sorted(by_b.items())},
        "best_smoothed_accuracy": max((m for m in smooth if m is not None), default=None),
        "steps": s.get("steps"),
        "wall_time_s": s.get("wall_time_s"),
        "compile_time_s": s.get("compile_time_s"),
        "final_test_accuracy": s.get("test_accuracy"),
        "stop_reason": s.get("stop_reason"),
        "workdir": run_dir,
        "curve": [
            [r["wall_time_s"] + measurement_s, device[r["step"]], r["test_accuracy"], m]
            for r, m in zip(evals, smooth, strict=True)
        ],
        "batch_curve": [[device[r["step"]], r["batch_size"]] for r in rows],
    }
    if policy == "adaptive":
        rec["schedule"] = adaptive.schedule_from_rows(rows)
    return rec


@contextlib.contextmanager
def _measured(config, workdir: str, trainings: bool = False):
    """Validate, lock the workdir, record ``config.json``; yields the ``sweep.json`` dict of the
    sweep in ``workdir/sweep`` (with ``trainings``: the recommended batch's included)."""
    train.validate_config(config)  # the rules of both modes, compare's included
    with runlog.workdir_lock(workdir):
        runlog.write_json(os.path.join(workdir, "config.json"), config.to_dict())
        yield sweep.run_sweep(_train_config(config), os.path.join(workdir, "sweep"),
                              trainings=trainings, train_recommended=trainings)  # fmt: skip


def _train_policies(config, workdir: str, plans: dict, table: dict, bar) -> list[dict]:
    """Each policy's run per seed (:func:`_run_record`), capped at ``compare.give_up_factor``
    times the fastest time to target before it."""
    cmp = config.compare
    runs: list[dict] = []
    for seed in cmp.seeds:
        for policy, plan in plans.items():
            walls = [r["time_to_target_s"] for r in runs if r["reached"]]
            limit = float(cmp.max_wall_time_s)
            if walls and cmp.give_up_factor is not None:
                limit = min(limit, float(cmp.give_up_factor) * min(walls))
            sizes = plan_batch_sizes(plan)
            batch = f"B{min(sizes)}" + (f"-{max(sizes)}" if len(set(sizes)) > 1 else "")
            run_dir = os.path.join(workdir, "runs", f"{policy}-{batch}-seed{int(seed)}")
            logging.info("compare: %s, seed %d, batch %d, lr %.4g, at most %.0f s", policy,
                         seed, plan["batch_size"], plan["learning_rate"], limit)  # fmt: skip
            bar.set(phase=f"{policy} seed {seed}")
            s = train.train_and_evaluate(_run_config(config, plan, int(seed), table, limit),
                                         run_dir)  # fmt: skip
            runs.append(_run_record(policy, int(seed), run_dir, s, cmp.target_window, table,
                                    plan.get("measurement_s", 0.0)))  # fmt: skip
            bar.update(1)
    return runs


def run_compare(config, workdir: str) -> dict:
    """The compare mode; returns ``summary.json``."""
    t0 = time.perf_counter()
    with _measured(config, workdir) as sweep_result:
        cmp = config.compare
        plans, skipped, cands = plan_policies(config, workdir, sweep_result)
        ds = tasks.get(config).load(config)
        sizes = {b for p in plans.values() for b in plan_batch_sizes(p)}
        sizes = sorted(sizes | {p["start"]["batch_size"] for p in plans.values() if "start" in p})
        bar = progress.Progress(
            len(cmp.seeds) * len(plans), desc="compare", unit="runs", rate=False
        )
        with contextlib.closing(bar):
            bar.set(phase=f"timing batch sizes {sizes}")
            table = _timing(config, workdir, sweep_result, ds, sizes)
            runs = _train_policies(config, workdir, plans, table, bar)
        n = min(_train_config(config).eval_examples or len(ds.test_labels), len(ds.test_labels))
        t = float(cmp.target_accuracy)
        first = next((r for r in runs if r["policy"] == "adaptive"), None)
        draw = lambda: figures.save(plots.plot_policies, os.path.join(workdir, PLOT_FILE), runs, t)
        return _write_summary(workdir, "compare", sweep_result, t0, {
            "setup": cmp.setup,
            "target_accuracy": t,
            "target_window": int(cmp.target_window),
            "eval_examples": int(n),
            "standard_error_points": 100 * math.sqrt(t * (1 - t) / n),
            "policies": {p: {k: v for k, v in plan.items() if k != "adaptive"}
                         for p, plan in plans.items()},
            "skipped": skipped,
            "candidates": cands,
            "timing": {str(b): v for b, v in sorted(table.items())},
            "runs": runs,
            "verdict": verdict(runs, t),
            "schedule": None if first is None else {**first["schedule"], "seed": first["seed"]},
        }, plot=draw)  # fmt: skip


def _write_summary(
    workdir: str, mode: str, sweep_result: dict, t0: float, fields: dict, plot=None
) -> dict:
    """Write and return (strict JSON) ``summary.json`` of a mode: the measurements' device,
    noise scale and recommendation, ``fields``, the times and, when given, ``plot()``'s path
    (or why not) as ``plot``."""
    summary = {
        "mode": mode,
        "device": sweep_result["device"],
        "noise_scale": {
            k: sweep_result["noise_scale"][k] for k in ("b_simple", "interval", "confidence")
        },
        "recommendation": sweep_result["recommendation"],
        **fields,
        "measurement_time_s": sum(
            v for k, v in sweep_result["stage_time_s"].items() if k != "trainings"
        ),
        "total_time_s": time.perf_counter() - t0,
    }
    try:
        if plot is not None:
            summary["plot"] = plot()
    except Exception as e:  # a plot is a convenience: never lose the finished runs to it
        logging.warning("Could not write the %s plot: %s", mode, e)
    runlog.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    return common.to_json(summary)


def policy_table(summary: dict) -> str:
    """The runs of a compare summary (one line per policy and seed) and the verdict."""
    head = (
        f"{'policy':<14}{'seed':>5}{'batch':>11}{'lr':>10}{'steps':>8}{'wall s':>9}"
        f"{'device s':>10}{'best acc':>10}"
    )
    lines = [f"setup: {summary['setup']}"] if summary.get("setup") else []
    lines += [
        f"target: {100 * summary['target_accuracy']:.1f}% test accuracy, trailing mean of "
        f"{summary['target_window']} evaluations on {summary['eval_examples']} test images "
        f"(standard error {summary['standard_error_points']:.2f} points); device s = steps x "
        "t(B) from one interleaved timing table",
        head,
        "-" * len(head),
    ]
    for r in summary["runs"]:
        b = f"{r['batch_size']}"
        if r["final_batch_size"] != r["batch_size"]:
            b += f"->{r['final_batch_size']}"
        lines.append(
            f"{r['policy']:<14}{r['seed']:>5}{b:>11}{fmt(r['learning_rate'], '.3g'):>10}"
            f"{fmt(r['steps_to_target'], 'd'):>8}{fmt(r['time_to_target_s'], '.1f'):>9}"
            f"{fmt(r['device_time_to_target_s'], '.1f'):>10}"
            f"{fmt(r['best_smoothed_accuracy'], '.1f', 100, '%'):>10}"
        )
    lines += ["", *summary["verdict"]["text"]]
    for change in (summary.get("schedule") or {}).get("changes", []):
        lines.append(f"  adaptive, seed {summary['schedule']['seed']}, step {change['step']}: "
                     f"{change['reason']}")  # fmt: skip
    for r in summary["runs"][: len(summary["policies"])]:  # one line per policy
        st = r.get("start")
        if st:
            lines.append(
                f"{r['policy']}: went on from the pilot ({st['step']} steps at batch "
                f"{st['batch_size']}, {st['seconds']:.1f} s, counted); its times add "
                f"{r['measurement_s']:.1f} s, the rest of the measurement's cost"
            )
        elif r["measurement_s"]:
            lines.append(f"{r['policy']}: its times add {r['measurement_s']:.1f} s, the "
                         "timing table its schedule decides on")  # fmt: skip
    for policy, why in summary.get("skipped", {}).items():
        lines.append(f"skipped {policy}: {why}")
    r, n = summary["recommendation"], summary["noise_scale"]
    lines.append(
        f"recommendation: batch {r['batch_size']}, lr {r['learning_rate']:.3g} (B_noise = "
        f"{fmt(r.get('b_noise'), '.4g')} from {r.get('basis', 'b_simple')}; B_simple = "
        f"{fmt(n['b_simple'], '.4g')}); {summary['total_time_s']:.0f} s in all"
    )
    return "\n".join(lines)


def run_tradeoff(config, workdir: str) -> dict:
    """The tradeoff mode; returns ``summary.json`` (its ``plot``: the sweep's ``tradeoff.png``,
    the fit)."""
    t0 = time.perf_counter()
    with _measured(config, workdir, trainings=True) as sweep_result:
        rec_b, fit = int(sweep_result["recommendation"]["batch_size"]), sweep_result["tradeoff"]
        why = sweep_result["skipped_trainings"].get(str(rec_b))
        if why is not None:
            raise UserError(
                f"the recommended batch {rec_b} was not trained: {why}",
                hint="the trainings do not accumulate gradients: "
                "--config.throughput.accumulation_factors='()' recommends a batch that fits",
            )
        b_simple = sweep.noise_scale_value(sweep_result["noise_scale"])
        return _write_summary(workdir, "tradeoff", sweep_result, t0, {
            "target_accuracy": float(config.tradeoff.target_accuracy),
            "points": fit["points"],
            "skipped_trainings": sweep_result["skipped_trainings"],
            "tradeoff": fit,
            "check": check_recommendation(fit["points"], rec_b, b_simple, fit["b_crit"]),
            "plot": sweep_result.get("plots", {}).get("tradeoff.png"),  # the sweep's: the fit
        })  # fmt: skip


def tradeoff_table(summary: dict) -> str:
    """Time to target per batch size, the fit, and the check of the recommendation."""
    rec_b, ch, fit = summary["recommendation"]["batch_size"], summary["check"], summary["tradeoff"]
    head = (
        f"{'batch':>6} {'lr':>9} {'steps':>7} {'to target s':>12} {'steps x t(B) s':>15} "
        f"{'final acc':>10}"
    )
    lines = [f"target test accuracy: {100 * summary['target_accuracy']:.1f}%", head]
    for p in summary["points"]:
        lines.append(
            f"{p['batch_size']:>6d} {p['learning_rate']:>9.3g} {fmt(p['steps'], '7.0f'):>7} "
            f"{fmt(p['time_to_target_s'], '12.1f'):>12} "
            f"{fmt(p['device_time_to_target_s'], '15.2f'):>15} "
            f"{fmt(p['final_test_accuracy'] or 0.0, '9.1f', 100, '%'):>10}"
            + ("  <- recommended" if p["batch_size"] == rec_b else "")
        )
    if ch["time_ratio"] is None:
        lines += ["", f"recommended batch {rec_b} did not reach the target."]
    else:
        lines += [
            "",
            f"recommended batch {rec_b}: {ch['recommended_device_time_to_target_s']:.2f} s of "
            f"steps x t(B) to target, {ch['time_ratio']:.2f}x the best measured "
            f"({ch['best_device_time_to_target_s']:.2f} s at batch {ch['best_batch_size']}); "
            f"rank {ch['rank']} of {ch['num_reached']} (wall clock: "
            f"{fmt(ch['wall_time_ratio'], '.2f')}x the fastest).",
        ]
    lines += [f"batch {b} {why}" for b, why in summary["skipped_trainings"].items()]
    lines.append(sweep.fit_line(fit))
    if fit.get("b_crit") is not None:
        lines.append(f"measured B_simple = {fmt(ch['b_simple'], '.4g')} (B_crit / B_simple = "
                     f"{fmt(ch['b_crit_over_b_simple'], '.3g')})")  # fmt: skip
    return "\n".join(lines)


def report(summary: dict) -> str:
    """The table of a compare or tradeoff summary."""
    return {"compare": policy_table, "tradeoff": tradeoff_table}[summary["mode"]](summary)
