"""Progress of a long command: a tqdm bar on a terminal; elsewhere (``nohup``, SLURM, a pipe)
a log line every ``GNS_PROGRESS_EVERY_S`` seconds (:func:`experiments.cli.progress_every_s`; 0:
none) from a thread, so that a long compilation is not silent either."""

from __future__ import annotations

import logging as std_logging
import math
import sys
import threading
import time

from absl import logging
from tqdm import tqdm

from experiments import cli


def format_duration(seconds: float) -> str:
    """``'2h05m'``, ``'3m07s'`` or ``'42s'`` (``'-'`` when unknown)."""
    if not 0 <= seconds < math.inf:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# tqdm's default bar without the time remaining (a run that stops before its total).
_NO_ETA = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class Progress:
    """A tqdm bar when ``bar`` and ``stream`` (stderr) is a terminal, else a log line every
    ``every_s`` (default :func:`experiments.cli.progress_every_s`; 0: none) of the ``total``
    (``None``: unknown) ``unit`` done (``initial`` at the start), headed ``desc``;
    ``rate=False`` leaves out the rate and the ETA (for units of very different lengths),
    ``eta=False`` the ETA (for a run that a target or a time limit may stop first)."""

    def __init__(
        self,
        total: int | None,
        *,
        desc: str,
        unit: str,
        initial: int = 0,
        bar: bool = True,
        every_s: float | None = None,
        stream=None,
        rate: bool = True,
        eta: bool = True,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.show_rate, self.show_eta, self._start = rate, rate and eta, time.perf_counter()
        self.fields: dict[str, object] = {}
        self._t0, self._n0 = None, initial  # from the first update (after compiling)
        self._bar = None
        if bar and (stream or sys.stderr).isatty():
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                dynamic_ncols=True,
                unit_scale=unit in ("examples", "bytes"),
                bar_format=None if self.show_eta else _NO_ETA,
            )
            self._clear = _ClearBar(self._bar)  # a log line gets a line of its own
            logging.get_absl_handler().addFilter(self._clear)
        self._stop = threading.Event()
        self._thread = None
        every_s = cli.progress_every_s() if every_s is None else every_s
        if self._bar is None and every_s > 0:
            self._thread = threading.Thread(target=self._tick, args=(every_s,), daemon=True)
            self._thread.start()

    def set(self, **fields) -> None:
        """Fields shown after the counts (``phase`` first), e.g. ``step=48, B_simple=212``."""
        self.fields.update(fields)
        if self._bar is not None:
            if "phase" in fields:
                self._bar.set_description(f"{self.desc}: {fields['phase']}", refresh=False)
            shown = {k: v for k, v in self.fields.items() if k != "phase"}
            self._bar.set_postfix(shown, refresh=False)

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        if self._t0 is None:
            self._t0, self._n0 = time.perf_counter(), self.n
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def line(self) -> str:
        """The log line: phase, counts, rate (since the first :meth:`update`), ETA and the
        fields."""
        phase = self.fields.get("phase")
        head = f"{self.desc}: {phase}, " if phase else f"{self.desc}: "
        done, t0 = self.n - self._n0, self._t0
        rate = done / (time.perf_counter() - t0) if t0 is not None and done > 0 else float("nan")
        parts = [
            f"{self.n:,}/{self.total:,} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%)"
            if self.total
            else f"{self.n:,} {self.unit}"
        ]
        if self.show_rate:
            parts.append(f"{rate:,.1f} {self.unit}/s" if rate == rate else f"- {self.unit}/s")
            if self.total and self.show_eta:
                parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        parts.append(f"elapsed {format_duration(time.perf_counter() - self._start)}")
        parts += [f"{k} {v}" for k, v in self.fields.items() if k != "phase"]
        return head + ", ".join(parts)

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            logging.info("%s", self.line())

    def close(self) -> None:
        """Stop the bar or the lines."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            logging.get_absl_handler().removeFilter(self._clear)
            self._bar.close()


class _ClearBar(std_logging.Filter):
    """Clears the bar's line before a log line is written on the terminal (the bar is drawn
    again on its next update), so that the two do not share a line."""

    def __init__(self, bar: tqdm):
        super().__init__()
        self.bar = bar

    def filter(self, record) -> bool:
        self.bar.clear()
        return True
