"""The plain-text summaries the mains print, from the dicts they write: :func:`sweep_summary`
of ``sweep.json`` (:mod:`experiments.sweep`) and :func:`mode_summary` of the compare and
tradeoff modes' ``summary.json`` (:mod:`experiments.compare`). One cell format (:func:`fmt`)
and one table of column specs (:func:`table`) serve them all.
"""

from __future__ import annotations

import math

from experiments.validation import DEVICE
from gns import plots


def fmt(x, spec: str, scale: float | None = None, suffix: str = "") -> str:
    """``x`` (times ``scale``) formatted by ``spec``, then ``suffix``; ``-`` for ``None`` and
    NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x if scale is None else x * scale, spec) + suffix


# The columns of :func:`table`: ``(title, key, format[, scale[, suffix]])``, the key a row's
# key or a function of the row; a format starting with ``<`` left-aligns its column.
# The batch, rate and device time of the tables of timings and of trainings.
BATCH, RATE, DEVICE_TIME = (
    ("batch", "batch_size", "d"),
    ("lr", "learning_rate", ".3g"),
    ("steps x t(B) s", DEVICE, ".2f"),
)
THROUGHPUT_COLUMNS = [
    BATCH,
    ("fits", "fits", ""),
    ("accum", lambda r: r["accumulation_steps"] if r.get("step_time_s") else None, "d"),
    ("step ms", "step_time_s", ".2f", 1e3),
    ("examples/s", "examples_per_s", ".0f"),
    ("pred. MiB", "predicted_bytes", ".1f", 2.0**-20),
]
TRAINING_COLUMNS = [
    BATCH,
    ("seed", "seed", "d"),
    RATE,
    ("steps to target", "steps", ".0f"),
    DEVICE_TIME,
    ("wall s", "time_to_target_s", ".1f"),
]


def table(rows: list[dict], columns: list[tuple]) -> list[str]:
    """A header and one line per row, the cells of a column aligned to its widest, two spaces
    apart (no trailing spaces)."""
    cells = [[c[0] for c in columns]]
    cells += [
        [fmt(key(r) if callable(key) else r.get(key), *spec) for _, key, *spec in columns]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    align = ["<" if c[2].startswith("<") else ">" for c in columns]
    return [
        "  ".join(f"{c:{a}{w}}" for c, a, w in zip(line, align, widths, strict=True)).rstrip()
        for line in cells
    ]


def sweep_summary(sweep: dict) -> str:
    """A plain-text summary: device, throughput, noise scale, tradeoff, recommendation and
    validation."""
    d, m, n, r = sweep["device"], sweep["mesh"], sweep["noise_scale"], sweep["recommendation"]
    c, rf = sweep.get("critical_batch") or {}, sweep["recommendation_from_tradeoff"]
    iv, effective = n["interval"], (n.get("effective") or {}).get("value")
    path = [f"{fmt(x['b_simple'], '.4g')} (to step {x['step']:g})" for x in n["trajectory"]]
    evidence = [
        f"{k} {fmt(v['value'], '.4g')} (x{fmt(v['ratio_to_basis'], '.2f')})"
        for k, v in r.get("evidence", {}).items()
    ]
    lines = [
        f"device: {d['platform']} / {d['kind']} x{d['count']}",
        f"mesh: {m['devices']} device(s) on {m['hosts']} host(s); batch sizes are global "
        f"(per device: batch / {m['devices']})",
        "",
        *table(sweep["throughput"], THROUGHPUT_COLUMNS),
        "",
        f"{plots.largest_fits(sweep)[1]} ({sweep['max_batch_size_per_device']} per device)",
        *(f"batch {b} {why}" for b, why in sweep["skipped_batch_sizes"].items()),
        f"noise scale b_simple: {fmt(n['b_simple'], '.4g')}  {round(100 * n['confidence'])}% "
        f"interval [{fmt(iv[0], '.4g')}, {fmt(iv[1], '.4g')}]  (pooled over {n['num_used']} "
        f"measurements of a {n['pilot']['steps']}-step pilot at batch {n['pilot']['batch_size']}, "
        f"{n['method']})",
        f"along the pilot: {', '.join(path)}; effective {fmt(effective, '.4g')}",
        *_branched_lines(c),
        "",
        *table(sweep["tradeoff"]["points"], TRAINING_COLUMNS),
        fit_line(sweep["tradeoff"]),
        "",
        f"recommended batch size: {r['batch_size']} (accumulation steps {r['accumulation_steps']}),"
        f" learning rate {r['learning_rate']:.4g}, predicted speedup vs baseline "
        f"{r['predicted_speedup_vs_baseline']:.2f}x",
        f"  basis: {r['basis']} ({r.get('basis_note') or 'the best evidence measured'}); "
        + ", ".join(evidence),
        f"  {r['reason']}",
        f"  lr rule: {r['lr_rule']}",
        *(f"  warning: {w}" for w in r.get("warnings", ())),
    ]
    if rf is not None:
        lines.append(
            f"from the fitted tradeoff (B_crit as the noise scale): batch {rf['batch_size']}"
        )
    return "\n".join(lines + validation_lines(sweep.get("validation")))


def _branched_lines(critical: dict) -> list[str]:
    """The branched ``B_crit`` of each checkpoint and their effective value (none without)."""
    forks = [
        f"{fmt(x['b_crit'], '.4g')} (step {x['step']}, {x['status']})"
        for x in critical.get("checkpoints") or []
    ]
    if not forks:
        return []
    effective = fmt(critical["effective"]["value"], ".4g")
    return [
        f"branched B_crit: {', '.join(forks)}; effective {effective} (forks cost "
        f"{critical['cost_fraction']:.2f}x the pilot's examples)"
    ]


def fit_line(fit: dict) -> str:
    """The ``S(B)`` fit of ``sweep.json``'s ``tradeoff`` in one line (or why there is none)."""
    if fit.get("b_crit") is None:
        return f"fit: not available ({fit.get('error')})"
    iv = fit["intervals"].get("b_crit") or (None, None)
    return (
        f"fit: S_min = {fit['s_min']:.4g}, E_min = {fit['e_min']:.4g}, B_crit = "
        f"{fit['b_crit']:.4g}  interval [{fmt(iv[0], '.4g')}, {fmt(iv[1], '.4g')}]"
    )


def validation_lines(v: dict | None) -> list[str]:
    """The ``validation`` block of ``sweep.json`` as summary lines (none without one)."""
    if not v or "error" in v:
        return ["", f"validation: {v['error']}"] if v else []
    best, c, g = v["best_measured"], v["branched_over_fitted"], v["targets"]
    lines = [
        "",
        f"validation (device time to target over the best measured, batch {best['batch_size']}"
        f" at {best['device_time_to_target_s']:.2f} s, mean of seeds {best['seeds']}):",
    ]
    for name, r in v["by_basis"].items():
        rng = r.get("over_best_range")
        spread = f" [seeds {rng[0]:.2f}-{rng[1]:.2f}]" if rng else ""
        if r.get("batch_size") is None:
            lines.append(f"  {name:>12}: not measured")
            continue
        lines.append(
            f"  {name:>12}: batch {r['batch_size']:>5} (noise scale {fmt(r['b_noise'], '.4g')}):"
            f" {fmt(r['over_best'], '.2f')}x{spread}, {r['source']}"
        )
    ratios = [f"{fmt(x['ratio'], '.2f')} (step {x['step']})" for x in c["per_checkpoint"]]
    return lines + [
        f"  branched B_crit / fitted B_crit: {fmt(c['value'], '.2f')} [{fmt(c['low'], '.2f')}, "
        f"{fmt(c['high'], '.2f')}]; per checkpoint {', '.join(ratios)}",
        f"  targets: branched over best <= {g['branched_over_best_max']:.2f}: "
        f"{g['branched_over_best_met']}; branched within {g['branched_over_fitted_max_factor']}x "
        f"of fitted: {g['branched_over_fitted_met']}",
    ]


def _batches(run: dict) -> str:
    """The batch of a compare run, ``a->b`` when it ended at another."""
    a, b = run["batch_size"], run["final_batch_size"]
    return f"{a}" if b == a else f"{a}->{b}"


POLICY_COLUMNS = [
    ("policy", "policy", "<"),
    ("seed", "seed", "d"),
    ("batch", _batches, ""),
    ("lr", "learning_rate", ".3g"),
    ("steps", "steps_to_target", "d"),
    ("wall s", "time_to_target_s", ".1f"),
    ("device s", DEVICE, ".1f"),
    ("best acc", "best_smoothed_accuracy", ".1f", 100, "%"),
]
TRADEOFF_COLUMNS = [
    BATCH,
    RATE,
    ("steps", "steps", ".0f"),
    ("to target s", "time_to_target_s", ".1f"),
    DEVICE_TIME,
    ("final acc", lambda p: p["final_test_accuracy"] or 0.0, ".1f", 100, "%"),
]


def policy_table(summary: dict) -> str:
    """The runs of a compare summary (one line per policy and seed) and the verdict."""
    lines = [f"setup: {summary['setup']}"] if summary.get("setup") else []
    lines += [
        f"target: {100 * summary['target_accuracy']:.1f}% test accuracy, trailing mean of "
        f"{summary['target_window']} evaluations on {summary['eval_examples']} test images "
        f"(standard error {summary['standard_error_points']:.2f} points); device s = steps x "
        "t(B) from one interleaved timing table"
    ]
    head, *rows = table(summary["runs"], POLICY_COLUMNS)
    lines += [head, "-" * len(head), *rows, "", *summary["verdict"]["text"]]
    lines += [
        f"  adaptive, seed {summary['schedule']['seed']}, step {c['step']}: {c['reason']}"
        for c in (summary.get("schedule") or {}).get("changes", [])
    ]
    for r in summary["runs"][: len(summary["policies"])]:  # one line per policy
        if r.get("start"):
            lines.append(
                f"{r['policy']}: went on from the pilot ({r['start']['step']} steps at batch "
                f"{r['start']['batch_size']}, {r['start']['seconds']:.1f} s, counted); its times "
                f"add {r['measurement_s']:.1f} s, the rest of the measurement's cost"
            )
        elif r["measurement_s"]:
            lines.append(
                f"{r['policy']}: its times add {r['measurement_s']:.1f} s, the "
                "timing table its schedule decides on"
            )
    lines += [f"skipped {policy}: {why}" for policy, why in summary.get("skipped", {}).items()]
    r, n = summary["recommendation"], summary["noise_scale"]
    lines.append(
        f"recommendation: batch {r['batch_size']}, lr {r['learning_rate']:.3g} (B_noise = "
        f"{fmt(r.get('b_noise'), '.4g')} from {r.get('basis', 'b_simple')}; B_simple = "
        f"{fmt(n['b_simple'], '.4g')}); this call took {summary['total_time_s']:.0f} s (what it "
        "reused from an earlier call not counted)"
    )
    return "\n".join(lines)


def tradeoff_table(summary: dict) -> str:
    """Time to target per batch size, the fit, and the check of the recommendation."""
    rec_b, ch, fit = summary["recommendation"]["batch_size"], summary["check"], summary["tradeoff"]
    marker = ("", lambda p: "<- recommended" if p["batch_size"] == rec_b else "", "<")
    lines = [f"target test accuracy: {100 * summary['target_accuracy']:.1f}%"]
    lines += table(summary["points"], [*TRADEOFF_COLUMNS, marker])
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
    lines.append(fit_line(fit))
    if fit.get("b_crit") is not None:
        lines.append(
            f"measured B_simple = {fmt(ch['b_simple'], '.4g')} (B_crit / B_simple = "
            f"{fmt(ch['b_crit_over_b_simple'], '.3g')})"
        )
    return "\n".join(lines)


def mode_summary(summary: dict) -> str:
    """The table of a compare or tradeoff mode's ``summary.json``."""
    return {"compare": policy_table, "tradeoff": tradeoff_table}[summary["mode"]](summary)
