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
import itertools
import math
import os
import re
import time
from collections.abc import Sequence

import ml_collections
from absl import logging

from experiments import adaptive, cli, figures, progress, runlog, sweep, tasks, train, validation
from experiments import mesh as mesh_lib
from experiments.cli import UserError
from experiments.report import fmt
from experiments.validation import DEVICE
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
    most the sum of their spreads, or when it is not slower in every paired comparison
    (:func:`_paired_range`).

    Returns ``fastest`` (``None``: none reached the target), ``tie`` (the fastest first; ``[]``
    when none), ``ranking``, ``policies`` (per policy: means, ``spread_s``, ``ratio`` to the
    fastest, its paired ``ratio_range``, ``tie``...), ``over_default`` (per policy that reached
    the target when the ``default`` one, the usual batch 64, did in every seed: the default's
    mean device time over the policy's, ``speedup``, and its ``paired_range``) and ``text``
    (the lines to print)."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["policy"], []).append(r)
    rows = validation.mean_over_seeds(runs, key="policy")
    ratio = {r["policy"]: r["over_best"] for r in validation.rank(rows, key="policy")}
    ranking = list(ratio)
    fastest = ranking[0] if ranking else None
    stats: dict[str, dict] = {}
    for row in rows:
        p, ok = row["policy"], row["reached"]
        lo, hi = row["device_time_range"] or (0.0, 0.0)
        missed = [r for r in by[p] if not r["reached"]]  # the best of those that missed
        best = [r["best_smoothed_accuracy"] for r in missed or by[p]]
        stats[p] = {
            **{k: row[k] for k in ("seeds", "num_reached", "reached")},
            "batch_size": by[p][0]["batch_size"],
            "batches": _batches(by[p]),
            DEVICE: row[DEVICE] if ok else None,
            "time_to_target_s": row["time_to_target_s"] if ok else None,
            "spread_s": (hi - lo) / 2 if ok else None,
            "ratio": ratio.get(p),
            "ratio_range": _paired_range(by[p], by[fastest]) if p in ratio else None,
            "tie": False,
            "best_smoothed_accuracy": max((x for x in best if x is not None), default=None),
            "at_first_evaluation": all(r.get("at_first_evaluation") for r in by[p]),
        }
    f = stats.get(fastest)
    for p in ranking[1:]:  # inside the spreads, or the order flips on a seed or a round
        s = stats[p]
        flips = s["ratio_range"] is not None and s["ratio_range"][0] <= 1
        s["tie"] = flips or s[DEVICE] - f[DEVICE] <= s["spread_s"] + f["spread_s"]
    tie = [p for p in ranking if stats[p]["tie"]]
    d = stats.get("default")
    over_default = {
        p: {"speedup": d[DEVICE] / s[DEVICE], "paired_range": _paired_range(by["default"], by[p])}
        for p, s in stats.items()
        if d is not None and d["reached"] and p != "default" and s["reached"]
    }
    out = {
        "fastest": fastest,
        "tie": [fastest, *tie] if tie else [],
        "ranking": ranking,
        "policies": stats,
        "over_default": over_default,
    }
    out["text"] = _verdict_text(out, target_accuracy)
    return out


def _batches(runs: Sequence[dict]) -> str:
    """The batch sizes ``runs`` trained at: ``"64"``, or ``"16-256"`` for a schedule's (from
    its first to its largest last batch)."""
    sizes = sorted({b for r in runs for b in (r["batch_size"], r.get("final_batch_size")) if b})
    return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"


def _paired_range(runs: Sequence[dict], ref_runs: Sequence[dict]) -> list[float] | None:
    """``[min, max]`` of the device times of ``runs`` over those of ``ref_runs``, each run paired
    with the reference run of its seed: by the table's step times (the medians of every round,
    those the point ratio reads), and under each timing round where both carry
    ``device_time_by_round`` (``None``: no seed in common). The ratio of the mean device
    times lies between the per-seed ones, so the range holds it."""
    ref = {x["seed"]: x for x in ref_runs}
    ratios: list[float] = []
    for run, other in ((run, ref[run["seed"]]) for run in runs if run["seed"] in ref):
        ratios.append(run[DEVICE] / other[DEVICE])
        a, b = run.get("device_time_by_round"), other.get("device_time_by_round")
        if a and b and len(a) == len(b):
            ratios += [x / y for x, y in zip(a, b, strict=True)]
    return [min(ratios), max(ratios)] if ratios else None


def _verdict_text(v: dict, target: float | None) -> list[str]:
    stats, fastest = v["policies"], v["fastest"]
    what = "the target" if target is None else f"{100 * target:.1f}%"
    if fastest is None:
        lines = [f"verdict: no policy reached {what} (smoothed test accuracy) in every seed."]
    else:
        f = stats[fastest]
        lines = [
            f"fastest to {what}: {fastest} (batch {f['batches']}), {f[DEVICE]:.1f} s of steps "
            f"x t(B) (mean of {len(f['seeds'])} seed(s), spread +/- {f['spread_s']:.1f} s; wall "
            f"clock {f['time_to_target_s']:.1f} s)"
        ]
    for p in v["ranking"][1:]:
        s = stats[p]
        lo, hi = s["ratio_range"] or (s["ratio"], s["ratio"])
        lines.append(
            f"  {p} (batch {s['batches']}): {s['ratio']:.2f}x the fastest (paired by seed and "
            f"timing round {lo:.2f}-{hi:.2f}x){': tie, inside the spread' if s['tie'] else ''}"
        )
    lines += [
        f"  {p} (batch {s['batches']}): never reached {what} in "
        f"{len(s['seeds']) - s['num_reached']} of {len(s['seeds'])} seed(s); best smoothed "
        f"accuracy {fmt(s['best_smoothed_accuracy'], '.1f', 100, '%')}"
        for p, s in stats.items()
        if not s["reached"]
    ]
    if first := [p for p, s in stats.items() if s["at_first_evaluation"]]:
        lines.append(
            f"  {', '.join(first)} reached {what} at the first evaluation that could show it: "
            "its time measures the evaluation interval (raise compare.target_accuracy, or "
            "lower compare.eval_every_examples)"
        )
    if v["over_default"]:
        each = [
            "{} {:.2f}x (paired {:.2f}-{:.2f}x)".format(p, o["speedup"], *o["paired_range"])
            for p, o in v["over_default"].items()
        ]
        lines.append(
            f"default (batch {stats['default']['batch_size']})'s device time to {what} over each "
            f"policy's: {', '.join(each)}"
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
        "recommended_device_time_to_target_s": rec.get(DEVICE),
        "recommended_time_to_target_s": rec.get("time_to_target_s"),
        "best_batch_size": best.get("batch_size"),
        "best_device_time_to_target_s": best.get(DEVICE),
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


# The training fields that a compare field sets where it is not None (_train_config).
FROM_COMPARE = {
    "batch_size": "baseline_batch_size",
    "learning_rate": "baseline_learning_rate",
    **{k: k for k in ("schedule", "warmup_steps", "eval_examples")},
}


@contextlib.contextmanager
def _compare_names(config):
    """A mistake in a training field that a compare field sets (:data:`FROM_COMPARE`) is
    named by the compare field, the one the user set."""
    try:
        yield
    except UserError as e:
        text, hint = str(e), e.hint
        for k, f in FROM_COMPARE.items():
            if k != f and config.compare[f] is not None:
                text = re.sub(rf"config\.{k}\b", f"config.compare.{f}", text)
                hint = hint and re.sub(rf"config\.{k}\b", f"config.compare.{f}", hint)
        if (text, hint) == (str(e), e.hint):
            raise
        raise type(e)(text, hint) from e


def _train_config(config):
    """``config`` as the measurements and the runs train it: ``compare``'s baseline batch and
    rate (the default policy's, the reference of every rate), schedule, warmup and evaluation
    size where set (:data:`FROM_COMPARE`); no noise-scale tracking (the sweep measured it), no
    checkpoints, no bar."""
    cmp, c = config.compare, copy.deepcopy(config)
    c.update({k: cmp[f] for k, f in FROM_COMPARE.items() if cmp[f] is not None})
    c.update(mode="train", gns_every=0, checkpoint_every=0, progress_bar=False)
    return c


def _best_measured(config, workdir: str) -> int | None:
    """The fastest batch of a tradeoff mode's summary (its ``check``), or ``None`` when there
    is no such summary or no point reached its target."""
    given = config.compare.tradeoff_summary
    path = given or os.path.join(workdir, "tradeoff", SUMMARY_FILE)
    if not os.path.exists(path):
        if given:  # asked for: a missing file is a mistake, not "no summary"
            raise UserError(
                f"config.compare.tradeoff_summary={given!r} does not exist",
                hint="point it at WORKDIR/summary.json of a --config.mode=tradeoff run",
            )
        return None
    s = runlog.read_json(path)
    if s.get("mode") != "tradeoff":
        raise UserError(
            f"{path} is not the summary of a tradeoff run (mode={s.get('mode')!r})",
            hint="point config.compare.tradeoff_summary at WORKDIR/summary.json of "
            "--config.mode=tradeoff",
        )
    beside = os.path.join(os.path.dirname(path), runlog.CONFIG_FILE)  # the run's config
    if os.path.exists(beside):
        keys, theirs = ("task", "model", "optimizer"), runlog.read_json(beside)
        mine = config.to_dict()
        if diffs := runlog.differing_fields(*({k: c.get(k) for k in keys} for c in (theirs, mine))):
            raise UserError(
                f"{path} is a tradeoff run of another setup ({'; '.join(diffs[:3])})",
                hint="point config.compare.tradeoff_summary at a tradeoff run of this task, "
                "model and optimizer",
            )
    return s["check"]["best_batch_size"]


_NOT_PLANNED = {
    "recommended": "needs gradient accumulation, which the runs do not do",
    "largest_fits": "no timed batch size fits the memory budget",
    "best_measured": "no tradeoff summary with a point at its target",
}


def plan_policies(config, workdir: str, sweep_result: dict) -> tuple[dict, dict, list[int]]:
    """What each policy trains after the measurements ``sweep_result`` (a ``sweep.json`` dict):
    ``({policy: {'batch_size', 'learning_rate', 'gns_every', 'adaptive'...}}, {policy: why
    skipped}, adaptive candidates)``. Every rate comes from one noise scale, the
    recommendation's; the runs' times carry what their policy's measurements cost."""
    names, a, base = tuple(config.compare.policies), config.adaptive, _train_config(config)
    base_b, base_lr = base.batch_size, base.learning_rate
    rec, costs = sweep_result["recommendation"], sweep_result["measurement_cost_s"]
    b_noise = rec.get("b_noise")
    b_noise = sweep.noise_scale_value(sweep_result["noise_scale"]) if b_noise is None else b_noise
    fits = sorted(sweep.step_times(sweep_result["throughput"]))  # accumulation rows never fit
    if a.candidates is not None:
        cands = adaptive.candidates(config)
    else:  # the schedule's powers of two (times the devices) that were timed and fit
        n = sweep_result["mesh"]["devices"]
        powers = set(gschedule.powers_of_two(a.min_batch_size, a.max_batch_size, n))
        cands = [b for b in fits if b in powers]
        if "adaptive" in names and not cands:
            raise UserError(
                f"no power-of-two batch (times the {n} devices) in [{a.min_batch_size}, "
                f"{a.max_batch_size}] was timed and fits (config.adaptive.min_batch_size, "
                "max_batch_size)",
                hint="lower config.adaptive.min_batch_size or widen config.throughput",
            )
    batch = {
        "default": base_b,
        "recommended": rec["batch_size"] if rec["accumulation_steps"] == 1 else None,
        # Within the configured range: a size the widening timed past it depends on the pick.
        "largest_fits": max(
            (b for b in fits if b <= config.throughput.max_batch_size), default=None
        ),
        "best_measured": _best_measured(config, workdir) if "best_measured" in names else None,
    }
    plans, skipped = {}, {}
    for p in names:
        if p == "adaptive":
            start = b_noise if 0 < b_noise < math.inf else None  # the 'sgd' rule's first rate
            rule = adaptive.lr_rule(config)
            if rule == "sgd" and b_noise == math.inf:  # unresolved: the rule's limit, linear
                rule = "linear"
            plans[p] = dict(
                batch_size=base_b,
                learning_rate=base_lr,
                adaptive=dict(candidates=tuple(cands), lr_rule=rule, initial_noise_scale=start),
                gns_every=int(config.gns_every),
                measurement_s=sum(v for k, v in costs.items() if k.startswith("throughput")),
            )
        elif batch[p] is None:
            skipped[p] = _NOT_PLANNED[p]
        else:
            b = int(batch[p])
            lr = scaling.learning_rate(config.optimizer, base_lr, base_b, b, b_noise)[0]
            plans[p] = dict(batch_size=b, learning_rate=lr, gns_every=0)
    if "recommended" in plans:  # the gns run goes on from the measurement's pilot...
        start = sweep_result["noise_scale"]["pilot"]["start"]
        plans["recommended"].update(
            start_from=os.path.abspath(os.path.join(workdir, "sweep", start["checkpoint"])),
            start=start,
            measurement_s=max(0.0, sum(costs.values()) - start["seconds"]),  # ...and its cost
        )
    if not plans:
        raise UserError(
            "every policy was skipped, nothing to race: "
            + "; ".join(f"{p}: {why}" for p, why in skipped.items()),
            hint="add policies to --config.compare.policies (e.g. default, recommended)",
        )
    return plans, skipped, cands


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
    by_b, timed = {r["batch_size"]: r for r in rows}, sweep.step_times(rows)
    missing = {b: by_b[b]["reason"] if b in by_b else None for b in sizes if b not in timed}
    if missing:
        raise UserError(
            f"the policies' batch sizes {missing} could not be timed",
            hint="lower config.adaptive.candidates or config.compare.baseline_batch_size",
        )
    return {b: {k: by_b[b][k] for k in ("step_time_s", "times_s")} for b in sizes}


def _device_times(rows: list[dict], step_time: dict[int, float], start: float) -> dict:
    """``{step: device time}`` at each row: ``start`` plus the steps since the previous row
    times ``t(B)`` of the row's batch (the batch changes only right after a row)."""
    out, prev, total = {}, 0, start
    for r in rows:
        total += (r["step"] - prev) * step_time[int(r["batch_size"])]
        out[r["step"]], prev = total, r["step"]
    return out


def _run_record(policy, seed, run_dir, s, target_window, table, measurement_s) -> dict:
    """One run of the summary from its training summary ``s`` and rows: where it reached its
    smoothed target, the times to it (device time also under each round of the timing table)
    and the curves. Every time counts ``measurement_s``, what the policy's measurements cost."""
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
    first = next((r for r in rows if "start" not in r), {})  # the first trained, not the pilot's
    rec = {
        "policy": policy,
        "seed": seed,
        "batch_size": first.get("batch_size"),
        "final_batch_size": rows[-1]["batch_size"] if rows else None,
        "learning_rate": first.get("learning_rate"),
        "start": s.get("start"),
        "measurement_s": measurement_s,
        "reached": at is not None,
        "time_to_target_s": at["wall_time_s"] + measurement_s if at else None,
        DEVICE: device[at["step"]] if at else None,
        "device_time_by_round": [d[at["step"]] for d in per_round] if at else None,
        "steps_to_target": at["step"] if at else None,
        # Reached as soon as the smoothed accuracy exists: the time is the evaluation interval's.
        "at_first_evaluation": at is not None and evals.index(at) == target_window - 1,
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
def _mode(config, workdir: str, mode: str):
    """Validate ``config``, load its data, lock ``workdir``, record ``config.json`` and run
    the sweep in ``workdir/sweep`` (the tradeoff mode: with its trainings, the recommended
    batch's included). Yields its ``sweep.json`` dict, the summary, which the mode fills in,
    and the data; when the mode is done, the summary gets the times and is written to
    ``summary.json``."""
    t0, trainings = time.perf_counter(), mode == "tradeoff"
    train.validate_config(config)  # the rules of both modes, compare's included
    task = tasks.get(config)
    kind = f"{task.name} {mode}"
    runlog.check_workdir(workdir, kind)  # a wrong workdir, said before the data's load
    ds = task.load(config)  # before the lock: bad data leaves the workdir untouched
    with _compare_names(config), runlog.workdir_lock(workdir, kind):
        _check_resume(config, workdir, mode)
        runlog.write_json(os.path.join(workdir, runlog.CONFIG_FILE), config.to_dict())
        swept = sweep.run_sweep(
            _train_config(config),
            os.path.join(workdir, "sweep"),
            trainings=trainings,
            train_recommended=trainings,
            ds=ds,
        )
        noise, stages = swept["noise_scale"], swept["stage_time_s"]
        summary = {
            "mode": mode,
            "device": swept["device"],
            "mesh": swept["mesh"],
            "noise_scale": {k: noise[k] for k in ("b_simple", "interval", "confidence")},
            "recommendation": swept["recommendation"],
        }
        yield swept, summary, ds
        summary["measurement_time_s"] = sum(v for k, v in stages.items() if k != "trainings")
        summary["total_time_s"] = time.perf_counter() - t0
        runlog.write_json(os.path.join(workdir, SUMMARY_FILE), summary)


def _check_resume(config, workdir: str, mode: str) -> None:
    """Stop before anything is written when ``workdir`` holds runs trained with other training
    fields (model, data, optimizer, baseline rate, ...) or measured on another number of
    devices: every run of the mode would differ.
    Measurement and ``compare`` fields may change: the sweep measures a changed stage again,
    and a run whose config changed with it (or of a new seed or policy) starts in a directory
    of its own."""
    path = os.path.join(workdir, runlog.CONFIG_FILE)
    if not (os.path.isdir(os.path.join(workdir, "runs")) and os.path.exists(path)):
        return
    try:
        old = ml_collections.ConfigDict(runlog.read_json(path))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(
            f"cannot read {path} to check the runs to resume ({e})",
            hint=f"delete {workdir} to start over, or pass another --workdir",
        ) from None
    diffs = runlog.differing_fields(
        train.run_identity(_train_config(old).to_dict()),
        train.run_identity(_train_config(config).to_dict()),
    )
    for i, d in enumerate(diffs):  # a field compare's sets: named by that, what the user set
        f = FROM_COMPARE.get(d.split(":")[0])
        if f and (old.compare[f] is not None or config.compare[f] is not None):
            diffs[i] = f"{d} (compare.{f})"
    swept = os.path.join(workdir, "sweep", sweep.SWEEP_FILE)
    devices = mesh_lib.make_mesh(config.num_devices).size
    if os.path.exists(swept) and (was := runlog.read_json(swept)["mesh"]["devices"]) != devices:
        diffs.append(f"devices: {was} -> {devices}")
    if diffs:
        raise UserError(
            f"{workdir} holds the runs of a {mode} with other training fields: " + "; ".join(diffs),
            hint=f"re-run with the old values to resume, pass another --workdir, or delete "
            f"{workdir} to start over",
        )


def run_compare(config, workdir: str) -> dict:
    """The compare mode: each policy's run per seed, capped at ``compare.give_up_factor``
    times the fastest time to target before it; returns ``summary.json`` (strict JSON)."""
    cmp = config.compare
    if "adaptive" in cmp.policies:  # its run's fields, checked before anything is measured
        probe = _train_config(config)
        probe.gns_every, probe.adaptive.enabled = config.gns_every, True
        probe.adaptive.initial_noise_scale = 1.0  # a stand-in: the measurement's, later
        with _compare_names(config):
            train.validate_config(probe)
    if "best_measured" in cmp.policies and cmp.tradeoff_summary:
        _best_measured(config, workdir)  # a wrong file, said before anything is measured
    if cmp.setup:  # which setup this is, before the minutes it takes
        logging.info("%s", cli.for_user(f"setup: {cmp.setup}"))
    with _mode(config, workdir, "compare") as (sweep_result, summary, ds):
        plans, skipped, cands = plan_policies(config, workdir, sweep_result)
        sizes = {b for p in plans.values() for b in plan_batch_sizes(p)}
        sizes = sorted(sizes | {p["start"]["batch_size"] for p in plans.values() if "start" in p})
        bar = progress.Progress(
            len(cmp.seeds) * len(plans), desc="compare", unit="runs", rate=False
        )
        runs: list[dict] = []
        with contextlib.closing(bar):
            bar.set(phase=f"timing batch sizes {sizes}")
            table = _timing(config, workdir, sweep_result, ds, sizes)
            for seed, (policy, plan) in itertools.product(map(int, cmp.seeds), plans.items()):
                walls = [r["time_to_target_s"] for r in runs if r["reached"]]
                limit = float(cmp.max_wall_time_s)
                if walls and cmp.give_up_factor is not None:
                    limit = min(limit, float(cmp.give_up_factor) * min(walls))
                b = plan_batch_sizes(plan)
                batch = f"{min(b)}" + (f"-{max(b)}" if min(b) < max(b) else "")
                cfg = _run_config(config, plan, seed, table, limit)
                # Keyed by the run's config: a run measured again (another rate, pilot or
                # schedule start) trains in a directory of its own, an unchanged one resumes.
                key = runlog.fingerprint(train.run_identity(cfg.to_dict()))[:8]
                run_dir = os.path.join(workdir, "runs", f"{policy}-B{batch}-seed{seed}-{key}")
                size, lr = plan["batch_size"], plan["learning_rate"]
                logging.info(
                    f"compare: {policy}, seed {seed}, batch {batch}, lr {lr:.4g} at batch "
                    f"{size}, at most {limit:.3g} s"
                )
                bar.set(phase=f"{policy} seed {seed}")
                s = train.train_and_evaluate(cfg, run_dir)
                cost = plan.get("measurement_s", 0.0)
                runs.append(_run_record(policy, seed, run_dir, s, cmp.target_window, table, cost))
                bar.update(1)
        n = min(_train_config(config).eval_examples or len(ds.test_labels), len(ds.test_labels))
        t = float(cmp.target_accuracy)
        first = next((r for r in runs if r["policy"] == "adaptive"), None)
        summary.update(
            setup=cmp.setup,
            target_accuracy=t,
            target_window=int(cmp.target_window),
            eval_examples=int(n),
            standard_error_points=100 * math.sqrt(t * (1 - t) / n),
            policies={p: {k: v for k, v in x.items() if k != "adaptive"} for p, x in plans.items()},
            skipped=skipped,
            candidates=cands,
            timing={str(b): v for b, v in sorted(table.items())},
            runs=runs,
            verdict=verdict(runs, t),
            schedule=None if first is None else {**first["schedule"], "seed": first["seed"]},
        )
        path = os.path.join(workdir, PLOT_FILE)
        summary["plot"] = figures.save(plots.plot_policies, path, runs, t)
    return common.to_json(summary)


def run_tradeoff(config, workdir: str) -> dict:
    """The tradeoff mode; returns ``summary.json`` (strict JSON; its ``plot``: the sweep's
    ``tradeoff.png``, the fit)."""
    with _mode(config, workdir, "tradeoff") as (sweep_result, summary, _):
        rec_b, fit = int(sweep_result["recommendation"]["batch_size"]), sweep_result["tradeoff"]
        why = sweep_result["skipped_trainings"].get(str(rec_b))
        if why is not None:
            raise UserError(
                f"the recommended batch {rec_b} was not trained: {why}",
                hint="the trainings do not accumulate gradients: "
                "--config.throughput.accumulation_factors='()' recommends a batch that fits",
            )
        b_simple = sweep.noise_scale_value(sweep_result["noise_scale"])
        summary.update(
            target_accuracy=float(config.tradeoff.target),
            points=fit["points"],
            skipped_trainings=sweep_result["skipped_trainings"],
            tradeoff=fit,
            check=check_recommendation(fit["points"], rec_b, b_simple, fit["b_crit"]),
            plot=sweep_result.get("plots", {}).get("tradeoff.png"),  # the sweep's: the fit
        )
    return common.to_json(summary)
