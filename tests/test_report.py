"""The column-spec table all printed summaries share (experiments/report.py); the summaries
themselves are read in the tests of the runs that write them (test_sweep, test_compare)."""

import math

from experiments import report


def test_table_aligns_each_column_to_its_widest_and_formats_missing_values_as_a_dash():
    rows = [{"name": "a", "x": 0.5, "n": 3}, {"name": "longer", "x": None, "n": 12}]
    columns = [
        ("name", "name", "<"),
        ("x %", "x", ".1f", 100, "%"),
        ("n+1", lambda r: r["n"] + 1, "d"),
        ("", lambda r: "<- big" if r["n"] > 10 else "", "<"),
    ]
    assert report.table(rows, columns) == [
        "name      x %  n+1",
        "a       50.0%    4",
        "longer      -   13  <- big",
    ]
    assert report.fmt(math.nan, ".2f") == "-" and report.fmt(2, "d", suffix="x") == "2x"


def test_the_throughput_table_gives_accumulation_steps_only_for_timed_rows():
    rows = [
        {"batch_size": 32, "fits": True, "accumulation_steps": 1, "step_time_s": 0.002},
        {"batch_size": 64, "fits": False, "accumulation_steps": 2, "step_time_s": 0.004},
        {"batch_size": 256, "fits": False, "accumulation_steps": 1, "step_time_s": None},
    ]
    accum = [line.split()[2] for line in report.table(rows, report.THROUGHPUT_COLUMNS)[1:]]
    assert accum == ["1", "2", "-"]  # a batch that was not run has no accumulation count
