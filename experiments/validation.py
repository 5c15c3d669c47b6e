"""Who won, and does the recommendation hold? Pure functions over trainings to a target.

Every time to target is the device time ``steps_to_target(B) × t(B)``, ``t(B)`` from one
interleaved timing table, which other load on a shared machine cannot skew from one training
to the next. References: McCandlish et al. 2018 (arXiv 1812.06162), ``S(B) = S_min + E_min/B``;
Merrill et al. 2025 (arXiv 2505.23971), the branched critical batch.
"""

from __future__ import annotations

import math
from typing import Any

# The targets: with the branched basis, the recommended batch's device time to target within
# 10% of the best measured; branched B_crit within 1.5x of the fitted B_crit.
MAX_OVER_BEST = 1.10
MAX_CRIT_FACTOR = 1.5
DEVICE = "device_time_to_target_s"


def _mean(rows, key):
    xs = [r[key] for r in rows if r.get(key) is not None]
    return sum(xs) / len(xs) if xs else None


def _ratio(a, b):
    return None if a is None or not b else a / b


def reseed_batch_sizes(points: list[dict], k: int) -> list[int]:
    """The ``k`` batch sizes that reached the target in the least device time (:func:`rank`)."""
    return [r["batch_size"] for r in rank(mean_over_seeds(points))][:k]


def mean_over_seeds(points: list[dict], key: str = "batch_size") -> list[dict]:
    """One row per ``key`` of the trainings ``points`` (batch sizes sorted, compare policies in
    order of appearance): ``key``, ``seeds``, ``num_reached``, ``reached`` (every seed did), the
    means of ``steps``, ``device_time_to_target_s`` and ``time_to_target_s`` over the seeds that
    reached the target (``None``: none did), ``device_time_per_seed``, ``device_time_range``."""
    groups: dict[Any, list[dict]] = {}
    for p in points:
        groups.setdefault(int(p[key]) if key == "batch_size" else p[key], []).append(p)
    out = []
    for g in sorted(groups) if key == "batch_size" else groups:
        mine = sorted(groups[g], key=lambda p: p.get("seed", 0))
        ok = [p for p in mine if p.get("reached") and p.get(DEVICE) is not None]
        dev = [p[DEVICE] for p in ok]
        out.append(
            {
                key: g,
                "seeds": [int(p.get("seed", 0)) for p in mine],
                "num_reached": len(ok),
                "reached": len(ok) == len(mine),
                "steps": _mean(ok, "steps"),
                DEVICE: _mean(ok, DEVICE),
                "time_to_target_s": _mean(ok, "time_to_target_s"),
                "device_time_per_seed": {str(p.get("seed", 0)): p.get(DEVICE) for p in mine},
                "device_time_range": [min(dev), max(dev)] if dev else None,
            }
        )
    return out


def rank(rows, key: str = "batch_size") -> list[dict]:
    """Who won: the rows of :func:`mean_over_seeds` whose every seed reached the target,
    fastest first by mean device time (ties: the smaller ``key`` first), each a copy with
    ``rank`` (1 = fastest; equal times share a rank), ``over_best`` (device time over the
    fastest's) and ``wall_over_best`` (wall clock over the least wall clock among them)."""
    done = sorted(
        (r for r in rows if r["reached"] and r.get(DEVICE) is not None),
        key=lambda r: (r[DEVICE], r[key]),
    )
    walls = [r["time_to_target_s"] for r in done if r.get("time_to_target_s") is not None]
    return [
        r
        | {
            "rank": 1 + sum(q[DEVICE] < r[DEVICE] for q in done),
            "over_best": _ratio(r[DEVICE], done[0][DEVICE]),
            "wall_over_best": _ratio(r.get("time_to_target_s"), min(walls, default=None)),
        }
        for r in done
    ]


def _step_time(sweep: dict, b: int) -> float | None:
    return next((r.get("step_time_s") for r in sweep["throughput"] if r["batch_size"] == b), None)


def _fitted_time(sweep: dict, b: int) -> float | None:
    """``S(B) × t(B)`` on the fitted curve (``None`` without a fit or a timing at ``b``)."""
    fit, t = sweep["tradeoff"], _step_time(sweep, b)
    if None in (fit.get("s_min"), fit.get("e_min"), t):
        return None
    return (fit["s_min"] + fit["e_min"] / b) * t


def _over_best(sweep: dict, b: int, rows: dict[int, dict], best: dict) -> dict:
    """Device time to target at batch ``b`` over the best measured: measured (mean over seeds)
    where every seed at ``b`` reached it, else interpolated on the fitted curve (where there
    is one), and said so."""
    fitted = _fitted_time(sweep, b)
    fitted_trained = [x for x in (_fitted_time(sweep, c) for c in rows) if x is not None]
    out: dict[str, Any] = {
        "step_time_s": _step_time(sweep, b),
        "fitted_device_time_s": fitted,
        # Model against model: the fitted curve at b over its minimum over the trained batches.
        "fitted_over_fitted_best": _ratio(fitted, min(fitted_trained, default=None)),
    }
    row = rows.get(b)
    if row is not None and row["reached"]:
        source = f"trained ({len(row['seeds'])} seed(s), mean)"
        out.update({"trained": True, "source": source, DEVICE: row[DEVICE]})
        per_seed = {}
        for seed, v in row["device_time_per_seed"].items():  # every seed reached: v is a time
            # Over the fastest batch trained with the same seed (seed 0: every batch).
            same = [r["device_time_per_seed"].get(seed) for r in rows.values()]
            per_seed[seed] = v / min(x for x in same if x is not None)
    else:
        why = "not trained" if row is None else "trained, but a seed missed the target"
        how = (
            "no fitted S(B) to interpolate"
            if fitted is None
            else "interpolated: fitted S(B) x t(B)"
        )
        source = f"{how} ({why})"
        out.update({"trained": False, "source": source, DEVICE: fitted})
        per_seed = {
            s: fitted / v
            for s, v in best["device_time_per_seed"].items()
            if fitted is not None and v
        }
    out["over_best"] = _ratio(out[DEVICE], best[DEVICE])
    out["over_best_per_seed"] = per_seed
    out["over_best_range"] = [min(per_seed.values()), max(per_seed.values())] if per_seed else None
    return out


def validation(sweep: dict) -> dict:
    """The ``validation`` block of a ``sweep.json`` dict: does the recommendation hold on the
    trainings? ``best_measured`` (the top of :func:`rank`); ``by_basis``: per basis the
    recommended ``batch_size`` and :func:`_over_best`; ``branched_over_fitted`` (branched over
    fitted ``B_crit``, interval and per checkpoint); ``targets``, each ``met`` or ``None``."""
    rows = {r["batch_size"]: r for r in sweep["tradeoff"]["by_batch"]}
    ranked = rank(rows.values())
    if not ranked:
        return {"error": "no batch size reached the target with every seed: nothing to compare"}
    best = ranked[0]
    keep = ("batch_size", DEVICE, "device_time_per_seed", "seeds")
    out: dict[str, Any] = {"best_measured": {k: best[k] for k in keep}, "by_basis": {}}
    for name, rec in sweep["recommendation_by_basis"].items():
        b = rec.get("batch_size")
        if b is None:  # nothing measured under this basis
            out["by_basis"][name] = dict(rec)
        else:
            picked = {"batch_size": int(b), "b_noise": rec.get("b_noise")}
            out["by_basis"][name] = picked | _over_best(sweep, int(b), rows, best)
    fit, crit = sweep["tradeoff"], sweep.get("critical_batch") or {}
    eff = crit.get("effective") or {}
    f_lo, f_hi = (fit.get("intervals") or {}).get("b_crit") or (None, None)
    out["branched_over_fitted"] = ratio = {
        "value": _ratio(eff.get("value"), fit.get("b_crit")),
        "low": _ratio(eff.get("low"), f_hi),
        "high": _ratio(eff.get("high"), f_lo),
        "per_checkpoint": [
            {"step": c["step"], "ratio": _ratio(c.get("b_crit"), fit.get("b_crit"))}
            for c in crit.get("checkpoints") or []
        ],
    }
    br, r = out["by_basis"].get("branched", {}).get("over_best"), ratio["value"]
    out["targets"] = {
        "branched_over_best": br,
        "branched_over_best_max": MAX_OVER_BEST,
        "branched_over_best_met": None if br is None else br <= MAX_OVER_BEST,
        "branched_over_fitted": r,
        "branched_over_fitted_max_factor": MAX_CRIT_FACTOR,
        "branched_over_fitted_met": None
        if r is None or not math.isfinite(r)
        else 1 / MAX_CRIT_FACTOR <= r <= MAX_CRIT_FACTOR,
    }
    return out
