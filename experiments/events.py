"""TensorBoard event files of a run beside its ``metrics.jsonl`` (tensorboardX: no TensorFlow):
a view of the metrics rows, written with each row and rewritten from the rows kept on a resume.
Tags (x axis: the step; non-finite values left out): :data:`STEP_TAGS`, ``test/<metric>``,
``time/step_time_s``, ``noise_scale/window`` (``_low``, ``_high``: the ratio of means over the
last :data:`WINDOW` measurements, 90% bootstrap interval), and ``by_examples/<key>`` of
:data:`BY_EXAMPLES` over the examples seen (the fair axis across batch sizes)."""

from __future__ import annotations

import collections
import glob
import math
import os
from collections.abc import Sequence

import numpy as np

from gns import smoothing

WINDOW = 20  # measurements in the trailing window of noise_scale/window*
STEP_TAGS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "b_simple": "noise_scale/b_simple",
    "ema_b_simple": "noise_scale/ema_b_simple",
    "g_sq": "noise_scale/g_sq",
    "trace_cov": "noise_scale/trace_cov",
    "batch_size": "schedule/batch_size",
    "learning_rate": "schedule/learning_rate",
    "examples_per_s": "time/examples_per_s",
    "wall_time_s": "time/train_time_s",
}
BY_EXAMPLES = tuple("train_loss test_accuracy test_loss test_bits_per_byte".split())
BY_EXAMPLES += ("ema_b_simple", "batch_size", "learning_rate")
_PATTERN = "events.out.tfevents.*"


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class EventLog:
    """The event files of the run in ``workdir`` (one writer, opened on first use)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._writer = None
        self._window: collections.deque = collections.deque(maxlen=WINDOW)  # (g_sq, trace_cov)

    def reset(self, rows: Sequence[dict]) -> None:
        """Delete the run's event files and write ``rows`` into a new one."""
        self.close()
        for path in glob.glob(os.path.join(self.workdir, _PATTERN)):
            os.remove(path)
        self._window.clear()
        for i, row in enumerate(rows):
            self.write(row, flush=i == len(rows) - 1)  # one flush, after the last

    def write(self, row: dict, *, flush: bool = True) -> None:
        """Write the finite scalars of ``row``: the tags of the module's docstring."""
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=self.workdir, flush_secs=30)
        out = {tag: row.get(k) for k, tag in STEP_TAGS.items()}
        out.update({"test/" + k[5:]: v for k, v in row.items() if k.startswith("test_")})
        rate, size = row.get("examples_per_s"), row.get("batch_size")
        if _finite(rate) and _finite(size) and rate > 0:
            out["time/step_time_s"] = size / rate
        if _finite(row.get("g_sq")) and _finite(row.get("trace_cov")):
            self._window.append((row["g_sq"], row["trace_cov"]))
        if "g_sq" in row and len(self._window) >= 2:
            g, t = (np.asarray(x, np.float64) for x in zip(*self._window, strict=True))
            res = smoothing.interval(g, t, confidence=0.9, block_size=1, num_resamples=200, seed=0)
            w = "noise_scale/window"
            out.update({w: res.estimate, f"{w}_low": res.low, f"{w}_high": res.high})
        for tag, value in out.items():
            if _finite(value):
                self._writer.add_scalar(tag, float(value), int(row["step"]))
        for k in BY_EXAMPLES if row.get("examples_seen") is not None else ():
            if _finite(row.get(k)):
                self._writer.add_scalar(f"by_examples/{k}", float(row[k]), row["examples_seen"])
        if flush:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
