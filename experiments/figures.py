"""The PNG plots of a training run, a sweep and the compare and tradeoff modes.

:mod:`gns.plots` draws the figures; this module writes them. A figure with nothing to draw
(:class:`gns.plots.NothingToPlot`) is not written: its entry says why instead, and a stale file
at that path is removed.

Example::

    training_plots(rows, "runs/cpu")
    # {'training.png': 'runs/cpu/training.png', 'noise_scale.png': 'not drawn: no
    #  noise-scale measurement in the rows (config.gns_every)'}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging

from gns import plots

__all__ = ["save", "training_plots", "sweep_plots", "compare_plot", "tradeoff_plot"]


def save(draw: Callable, path: str, *args, **kwargs) -> str:
    """Write the figure of ``draw(*args, **kwargs)`` as a PNG at ``path``; returns ``path``,
    or ``'not drawn: <reason>'`` (nothing left at ``path``) when there is nothing to draw."""
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


def _save_all(directory: str, figures: dict[str, tuple[Callable, Any]]) -> dict[str, str]:
    """``{name: path or 'not drawn: ...'}`` of ``figures``' ``name: (draw, data)``."""
    return {name: save(draw, os.path.join(directory, name), x)
            for name, (draw, x) in figures.items()}  # fmt: skip


def training_plots(rows: Sequence[dict], directory: str) -> dict[str, str]:
    """``training.png`` and ``noise_scale.png`` of a run's rows in ``directory``."""
    return _save_all(directory, {"training.png": (plots.plot_training, rows),
                                 "noise_scale.png": (plots.plot_noise_scale, rows)})  # fmt: skip


def sweep_plots(sweep: Mapping, directory: str) -> dict[str, str]:
    """``throughput.png``, ``tradeoff.png`` and ``time_to_target.png`` of a ``sweep.json``
    dict in ``directory``."""
    return _save_all(directory, {
        "throughput.png": (plots.plot_throughput, sweep),
        "tradeoff.png": (plots.plot_tradeoff, sweep["tradeoff"]),
        "time_to_target.png": (plots.plot_time_to_target, sweep),
    })  # fmt: skip


def tradeoff_plot(tradeoff: Mapping, path: str) -> str:
    """``tradeoff.png`` of a tradeoff fit (a sweep's or the tradeoff mode's)."""
    return save(plots.plot_tradeoff, path, tradeoff)


def compare_plot(runs: Sequence[dict], target: float | None, path: str) -> str:
    """``compare.png`` of the compare mode's runs."""
    return save(plots.plot_policies, path, runs, target)
