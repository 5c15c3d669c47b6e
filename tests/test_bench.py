"""experiments/bench.py: the bench.json schema on the tiny config (not a timing assertion)."""

from __future__ import annotations

import json
import math
import os

import pytest

from configs import bench as bench_config
from experiments import bench

RATIOS = (
    "per_example_over_plain",
    "microbatch_over_plain",
    "naive_vmap_over_plain",
    "microbatch_rolled_over_plain",
    "memory_per_example_over_plain",
)


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(300)
def test_tiny_bench_writes_consistent_json(tmp_path):
    config = bench_config.get_config("tiny")
    result = bench.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "bench.json") as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(result))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # atomic write

    for key in RATIOS:
        assert positive_finite(written[key]), key
    assert written["across_devices_over_plain"] is None  # tiny: parallel=False
    assert written["jax_version"]
    assert written["device"]["count"] >= 1 and written["device"]["platform"]

    assert set(written["detail"]) == {str(b) for b in config.batch_sizes}
    for bs, d in written["detail"].items():
        assert d["batch_size"] == int(bs)
        assert set(d["seconds"]) == set(bench.VARIANTS)
        for name in bench.VARIANTS:
            s = d["seconds"][name]
            assert positive_finite(s) and positive_finite(d["temp_bytes"][name])
            assert d["over_plain"][name] == pytest.approx(s / d["seconds"]["plain"])
            assert d["examples_per_second"][name] == pytest.approx(int(bs) / s)
            assert d["memory_over_plain"][name] == pytest.approx(
                d["temp_bytes"][name] / d["temp_bytes"]["plain"]
            )
        assert d["over_plain"]["plain"] == 1.0

    ref = written["detail"][str(config.reference_batch_size)]
    assert written["per_example_over_plain"] == ref["over_plain"]["per_example"]
    assert written["microbatch_over_plain"] == ref["over_plain"]["microbatch"]
    assert written["naive_vmap_over_plain"] == ref["over_plain"]["naive_vmap"]
    assert written["memory_per_example_over_plain"] == ref["memory_over_plain"]["per_example"]


def test_reference_batch_size_must_be_timed(tmp_path):
    config = bench_config.get_config("tiny")
    config.reference_batch_size = 7
    with pytest.raises(ValueError, match="reference_batch_size=7"):
        bench.train_and_evaluate(config, str(tmp_path))


def test_missing_parallel_bench_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(bench.os.path, "exists", lambda path: False)
    with pytest.raises(RuntimeError, match="parallel_bench.py is missing"):
        bench.run_parallel_bench(8, 1)
