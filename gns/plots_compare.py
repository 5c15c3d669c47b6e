"""Matplotlib figure of the compare mode (imports no JAX): test accuracy against training time.

Example::

    summary = json.load(open("runs/demo/summary.json"))
    plot_compare(summary["runs"], "compare.png")

Reference: McCandlish, Kaplan, Amodei, "An Empirical Model of Large-Batch Training" (2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_compare"]

_STYLE = {
    "baseline": dict(color="tab:blue", ls="-"),
    "recommended": dict(color="tab:orange", ls="-"),
    "baseline_same_time": dict(color="tab:green", ls="--", marker="s"),
}


def plot_compare(runs: Sequence[dict], path: str | None = None):
    """Test accuracy against training wall-clock time, one line per run.

    Args:
      runs: the ``runs`` of a compare ``summary.json``: each with ``role``, ``batch_size``,
        ``learning_rate``, ``curve`` (``[[wall_time_s, test_accuracy], ...]``, the periodic
        evaluations) and optionally ``wall_time_s`` and ``test_accuracy`` (the final evaluation,
        drawn as the last point), ``time_to_target_s`` and ``target_accuracy``.
      path: where to write the PNG; ``None`` returns the figure open.

    Returns:
      ``path`` when given, else the figure.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    target = None
    for r in runs:
        curve = r.get("curve") or []
        style = _STYLE.get(r["role"], {})
        label = f"{r['role']}: batch {r['batch_size']}, lr {r['learning_rate']:.3g}"
        final = (r.get("wall_time_s"), r.get("test_accuracy"))
        if None not in final and (not curve or final[0] > curve[-1][0]):
            curve = [*curve, list(final)]  # the final evaluation, at the end of training
        if curve:
            t, acc = zip(*curve, strict=True)
            ax.plot(t, [100 * a for a in acc], ms=4, label=label, **{"marker": "o", **style})
        if r.get("time_to_target_s") is not None and r.get("target_accuracy") is not None:
            ax.plot(
                [r["time_to_target_s"]],
                [100 * r["target_accuracy"]],
                marker="*",
                ms=12,
                color=style.get("color", "k"),
                ls="none",
            )
        if r["role"] == "baseline" and r.get("best_test_accuracy") is not None:
            target = r["best_test_accuracy"]
    if target is not None:
        ax.axhline(100 * target, color="gray", lw=0.8, ls=":", label="target: baseline's best")
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against wall-clock time (star: time to target)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
