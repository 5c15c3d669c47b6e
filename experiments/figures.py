"""The PNG files of the figures that :mod:`gns.plots` draws. A figure with nothing to draw
(:class:`gns.plots.NothingToPlot`) is not written: its entry says why instead, and a stale file
at that path is removed."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from absl import logging

from experiments import download
from gns import plots


def save(draw: Callable, path: str, *args) -> str:
    """Write the figure of ``draw(*args)`` as a PNG at ``path`` (atomically); returns ``path``, or
    ``'not drawn: <reason>'`` (nothing left at ``path``) when there is nothing to draw, or
    drawing or writing failed (logged: a figure is a convenience, never worth a finished run)."""
    import matplotlib.pyplot as plt

    try:
        fig = draw(*args)
        try:
            with download.atomic_file(path) as f:  # a killed run leaves no torn PNG
                fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        finally:
            plt.close(fig)
    except Exception as e:  # noqa: BLE001
        if os.path.exists(path):
            os.remove(path)
        if not isinstance(e, plots.NothingToPlot):  # else the entry says why
            logging.warning("Could not write %s: %s: %s", path, type(e).__name__, e)
            e = f"could not write it ({type(e).__name__}: {e})"
        return f"not drawn: {e}"
    return path


def training_plots(rows: Sequence[dict], directory: str) -> dict[str, str]:
    """``{'training.png': path or why not, 'noise_scale.png': ...}`` of a run's rows."""
    draw = {"training.png": plots.plot_training, "noise_scale.png": plots.plot_noise_scale}
    return {name: save(f, os.path.join(directory, name), rows) for name, f in draw.items()}


def sweep_plots(sweep: Mapping, directory: str) -> dict[str, str]:
    """``throughput.png``, ``tradeoff.png`` and ``time_to_target.png`` of a ``sweep.json``
    dict in ``directory`` (each path or why not)."""
    figures = {
        "throughput.png": (plots.plot_throughput, sweep),
        "tradeoff.png": (plots.plot_tradeoff, sweep["tradeoff"]),
        "time_to_target.png": (plots.plot_time_to_target, sweep),
    }
    return {name: save(f, os.path.join(directory, name), x) for name, (f, x) in figures.items()}
