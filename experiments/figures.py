"""The PNG plots of a training run, a sweep and the compare and tradeoff modes.

:mod:`gns.plots` draws the figures (and writes nothing); this module writes them. A figure with
nothing to draw (:class:`gns.plots.NothingToPlot`, e.g. ``tradeoff.png`` of a sweep that ran no
training) is not written: its entry says why in words instead, and a stale file of an earlier
run at that path is removed, so a directory never holds an empty or outdated chart.

Example::

    training_plots(rows, "runs/cpu")
    # {'training.png': 'runs/cpu/training.png', 'noise_scale.png': 'not drawn: no
    #  noise-scale measurement in the rows (config.gns_every)'}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from absl import logging

from gns import plots

__all__ = ["save", "training_plots", "sweep_plots", "compare_plot", "tradeoff_plot"]


def save(draw: Callable, path: str, *args, **kwargs) -> str:
    """Write the figure of ``draw(*args, **kwargs)`` as a PNG at ``path``.

    Returns:
      ``path``, or ``'not drawn: <reason>'`` when ``draw`` raised
      :class:`gns.plots.NothingToPlot` (then nothing is left at ``path``).
    """
    import matplotlib.pyplot as plt

    try:
        fig = draw(*args, **kwargs)
    except plots.NothingToPlot as e:
        if os.path.exists(path):
            os.remove(path)
        logging.info("%s not drawn: %s", os.path.basename(path), e)
        return f"not drawn: {e}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def training_plots(rows: Sequence[dict], directory: str) -> dict[str, str]:
    """``training.png`` and ``noise_scale.png`` of a run's rows in ``directory``: ``{name:
    path or 'not drawn: ...'}``."""
    return {
        "training.png": save(plots.plot_training, os.path.join(directory, "training.png"), rows),
        "noise_scale.png": save(
            plots.plot_noise_scale, os.path.join(directory, "noise_scale.png"), rows
        ),
    }


def sweep_plots(sweep: Mapping, directory: str) -> dict[str, str]:
    """``throughput.png``, ``tradeoff.png`` and ``time_to_target.png`` of a ``sweep.json``
    dict in ``directory``: ``{name: path or 'not drawn: ...'}``."""
    return {
        "throughput.png": save(
            plots.plot_throughput, os.path.join(directory, "throughput.png"), sweep
        ),
        "tradeoff.png": tradeoff_plot(sweep["tradeoff"], os.path.join(directory, "tradeoff.png")),
        "time_to_target.png": save(
            plots.plot_time_to_target, os.path.join(directory, "time_to_target.png"), sweep
        ),
    }


def tradeoff_plot(tradeoff: Mapping, path: str) -> str:
    """``tradeoff.png`` of a tradeoff fit (a sweep's or the tradeoff mode's)."""
    return save(plots.plot_tradeoff, path, tradeoff)


def compare_plot(runs: Sequence[dict], target: float | None, path: str) -> str:
    """``compare.png`` of the compare mode's runs."""
    return save(plots.plot_policies, path, runs, target)
