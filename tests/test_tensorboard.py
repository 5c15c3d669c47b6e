"""TensorBoard event files beside metrics.jsonl (experiments/events.py through RunLog): read back
with the plain TFRecord/Event parser, they hold exactly the scalars of the rows."""

import collections
import glob
import math
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from experiments import events, runlog


def read_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the event files in ``directory`` (not below) as ``{tag: [(step,
    value), ...]}`` in the order written: plain TFRecord framing, no TensorBoard needed (also
    read by tests/test_train.py)."""
    out: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(directory, events._PATTERN))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]  # after length and its CRC
            pos += 12 + length + 4  # and the data's CRC
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out[v.tag].append((int(event.step), float(v.simple_value)))
    return dict(out)


def rows_of_a_run(n=8, batch=(16, 16, 16, 32, 32, 32, 64, 64)):
    """Rows as train.py writes them: a measurement every row, an evaluation every 3rd, one
    |G|² <= 0 (b_simple null), a batch size that grows."""
    rows, seen = [], 0
    for i in range(n):
        seen += batch[i]
        g = -0.5 if i == 2 else 1.0 + 0.1 * i
        t = 10.0 + i
        row = {"step": i + 1, "examples_seen": seen, "wall_time_s": 0.5 * (i + 1),
               "examples_per_s": 100.0 + i, "train_loss": 2.0 - 0.1 * i,
               "train_accuracy": 0.1 * i, "learning_rate": 1e-3, "batch_size": batch[i],
               "g_sq": g, "trace_cov": t, "b_simple": t / g if g > 0 else None,
               "ema_b_simple": 9.0 + i}  # fmt: skip
        if i % 3 == 2:
            row["test_accuracy"] = 0.05 * i
        rows.append(row)
    return rows


def f32(x):
    return float(np.float32(x))


def expected(rows, key):
    return [(r["step"], f32(r[key])) for r in rows if r.get(key) is not None]


def write(workdir, rows):
    log = runlog.RunLog(str(workdir))
    log.resume(0, None)
    for r in rows:
        log.write_row(r)
    log.close()
    return log


def test_event_files_hold_the_rows_scalars(tmp_path):
    rows = rows_of_a_run()
    write(tmp_path, rows)
    assert runlog.read_jsonl(str(tmp_path / runlog.METRICS_FILE)) == rows
    got = read_scalars(str(tmp_path))
    for key, tag in events.STEP_TAGS.items():
        assert got[tag] == expected(rows, key), tag
    assert got["test/accuracy"] == expected(rows, "test_accuracy")
    assert got["time/step_time_s"] == [
        (r["step"], f32(r["batch_size"] / r["examples_per_s"])) for r in rows
    ]
    # By examples: the x axis is examples_seen, the values those of the rows.
    assert got["by_examples/batch_size"] == [(r["examples_seen"], r["batch_size"]) for r in rows]
    # The window: ratio of means over the last measurements with a positive-mean |G|².
    for i, (step, value) in enumerate(got["noise_scale/window"]):
        w = [r for r in rows[:step] if r["g_sq"] is not None][-events.WINDOW :]
        assert step == rows[step - 1]["step"] and len(w) >= 2
        ratio = np.mean([r["trace_cov"] for r in w]) / np.mean([r["g_sq"] for r in w])
        assert value == pytest.approx(ratio, rel=1e-6), i
    lo, hi = dict(got["noise_scale/window_low"]), dict(got["noise_scale/window_high"])
    assert lo and all(lo[s] <= c <= hi.get(s, math.inf) for s, c in got["noise_scale/window"])
    # The unresolved measurement (g_sq <= 0) has no b_simple scalar: absent, not a number.
    assert 3 not in [s for s, _ in got["noise_scale/b_simple"]]
    assert all(math.isfinite(v) for series in got.values() for _, v in series)


def test_a_resume_rewrites_the_event_files_to_the_rows_kept(tmp_path):
    rows = rows_of_a_run()
    write(tmp_path, rows)
    log = runlog.RunLog(str(tmp_path))
    log.resume(5, {"examples_seen": rows[4]["examples_seen"]})  # back to the checkpoint
    for r in rows[5:]:  # the same steps again, as the resumed run writes them
        log.write_row(r)
    log.close()
    files = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    assert len(files) == 1
    got = read_scalars(str(tmp_path))
    assert got["train/loss"] == expected(rows, "train_loss")  # each step once, in order


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write(tmp_path / "a", rows_of_a_run(2))
        runlog.write_json(str(tmp_path / "a" / "summary.json"), {"x": 1})
    finally:
        os.umask(old)
    for name in os.listdir(tmp_path / "a"):
        assert (os.stat(tmp_path / "a" / name).st_mode & 0o777) == 0o640, name
