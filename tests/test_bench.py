"""experiments/bench.py: the bench.json schema on the tiny config (not a timing assertion). A
bad config on its command line is one of tests/test_config.py's mistakes."""

from __future__ import annotations

import json
import math
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bench as bench_config
from experiments import bench
from gns import ghost, hardware

RATIOS = (
    "per_example_over_plain",
    "microbatch_over_plain",
    "naive_vmap_over_plain",
    "microbatch_rolled_over_plain",
    "memory_per_example_over_plain",
)


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_timed(d, variants):
    """A row's timing of ``variants``: the medians and ratios of its rounds' times (each round's
    time over the same round's plain step), the memory ratios of its compiled steps."""
    assert set(d["seconds"]) == set(d["times"]) == set(variants)
    for name in variants:
        t = d["times"][name]
        # The vmap steps are timed in a block of their own, with a plain step of their own.
        plain = d["vmap_block_plain_times"] if "vmap" in name else d["times"]["plain"]
        assert len(t) == len(plain) == d["repeats"] and all(positive_finite(x) for x in t)
        assert d["seconds"][name] == pytest.approx(float(np.median(t)))
        assert d["over_plain"][name] == pytest.approx(float(np.median(np.divide(t, plain))))
        p10 = np.percentile(t, 10) / np.percentile(plain, 10)
        assert d["over_plain_p10"][name] == pytest.approx(float(p10))
        assert d["examples_per_second"][name] == pytest.approx(d["batch_size"] / d["seconds"][name])
        assert positive_finite(d["temp_bytes"][name])
        assert d["memory_over_plain"][name] == pytest.approx(
            d["temp_bytes"][name] / d["temp_bytes"]["plain"]
        )
    assert d["over_plain"]["plain"] == 1.0


@pytest.mark.timeout(300)
def test_tiny_bench_writes_consistent_json(tmp_path, monkeypatch):
    # The schema, not the choice of path (tests/test_ghost.py tests calibrate): the cost
    # model's answer in place of timing both paths of every row.
    monkeypatch.setattr(
        ghost, "calibrate", lambda f, p, b, plan, **k: plan if plan.method == "ghost" else None
    )
    config = bench_config.get_config("tiny")
    # One MLP row: every row runs the same bench.time_row; the NNX row's model is covered
    # and equal to vmap in tests/test_ghost.py.
    del config.rows.models["nnx_mlp"]
    # The CNN's microbatch steps in 2 microbatches, as the other rows' (the unrolled loop of 8
    # compiles 8 copies of the step; the estimator's k is tested in tests/test_estimate.py).
    config.num_microbatches = 2
    result = bench.run_bench(config, str(tmp_path))
    with open(tmp_path / "bench.json") as f:
        written = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"not strict: {c}"))
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
        check_timed(d, bench.VARIANTS)

    bs_ref = config.reference_batch_size
    ref = written["detail"][str(bs_ref)]
    assert ref["auto_method"] in ("ghost", "microbatches", "vmap") and ref["auto_chunks"] == 1
    assert written["per_example_over_plain"] == ref["over_plain"]["per_example"]
    assert written["microbatch_over_plain"] == ref["over_plain"]["microbatch"]
    assert written["naive_vmap_over_plain"] == ref["over_plain"]["naive_vmap"]
    assert written["memory_per_example_over_plain"] == ref["memory_over_plain"]["per_example"]

    # The Transformer rows: the lm model of the config, every variant, both ratios.
    tr = written["transformer"]
    assert tr["model"]["width"] == config.lm.model.width and positive_finite(tr["seconds"])
    for bs in config.lm.batch_sizes:
        d = tr[str(bs)]
        check_timed(d, bench.LM_VARIANTS)
        assert (
            d["auto_method"] in ("ghost", "microbatches", "vmap")
            and d["auto_describe"].count("auto: ") == 1
        )
        assert d["auto_chunks"] == 1  # batch 8: too small to chunk
    table = bench.format_table(written).splitlines()
    assert table[0].split() == [
        "model",
        "batch",
        "variant",
        "ms/step",
        "time/plain",
        "p10",
        "memory/plain",
    ]
    # The other rows: the lm1b-style Transformer, the NNX and the plain-JAX MLP.
    rows = written["rows"]
    assert set(rows) == set(config.rows.models) | {"load_before", "load_after"}
    n_rows = 0
    for name, row in config.rows.models.items():
        assert set(rows[name]) == {str(b) for b in row.batch_sizes}
        for rd in rows[name].values():
            check_timed(rd, bench.LM_VARIANTS)
            assert rd["auto_method"] in ("ghost", "microbatches", "vmap")
            assert "fallback" not in rd["auto_describe"]  # every leaf covered
            n_rows += len(bench.LM_VARIANTS)
    n_cnn = len(config.batch_sizes) * len(bench.VARIANTS)
    n_lm = len(config.lm.batch_sizes) * len(bench.LM_VARIANTS)
    assert len(table) == 1 + n_cnn + n_lm + n_rows
    auto_row = next(r.split() for r in table if "per_example_auto" in r)
    assert auto_row[:4] == ["transformer", "8", "per_example_auto", f"({d['auto_method']})"]
    assert auto_row[-3] == f"{d['over_plain']['per_example_auto']:.2f}x"
    assert auto_row[-2] == f"{d['over_plain_p10']['per_example_auto']:.2f}x"
    # A vmap row's ratio is over the plain step of its own block, whose time it names.
    vmap_row = next(r for r in table if r.split()[:3] == ["cnn", str(bs_ref), "naive_vmap"])
    block = 1e3 * float(np.median(ref["vmap_block_plain_times"]))
    assert f"(over its own block's plain step, {block:.1f} ms)" in vmap_row


def test_reference_batch_size_must_be_timed(tmp_path):
    config = bench_config.get_config("tiny")
    config.reference_batch_size = 7
    with pytest.raises(ValueError, match="reference_batch_size=7"):
        bench.run_bench(config, str(tmp_path))


def test_transformer_batch_sizes_must_divide_into_microbatches(tmp_path):
    config = bench_config.get_config("tiny")
    config.lm.batch_sizes = (8, 12)
    config.lm.num_microbatches = 8
    with pytest.raises(ValueError, match=r"config.lm.batch_sizes=\(8, 12\).*num_microbatches=8"):
        bench.run_bench(config, str(tmp_path))


def test_failed_parallel_bench_is_a_clear_error(monkeypatch):
    """The across_devices subprocess gets 4 simulated devices; its failure is a RuntimeError
    with its exit code and stderr tail."""
    seen = {}

    def failing_run(cmd, env, **kw):
        seen.update(env=env)
        return subprocess.CompletedProcess(cmd, 3, "", "Traceback ...\nboom")

    monkeypatch.setattr(bench.subprocess, "run", failing_run)
    with pytest.raises(
        RuntimeError, match=r"across_devices failed \(exit 3\):\nTraceback ...\nboom"
    ):
        bench.run_parallel_bench(8, 3)
    assert "xla_force_host_platform_device_count" in seen["env"]["XLA_FLAGS"]


def test_interleaved_times_round_robin_alternating_order(monkeypatch):
    """One timer: warm-up first, then every round times each call once, the order reversed
    from one round to the next, and every call goes through gns.hardware.time_step."""
    log = []

    def fake_time_step(fn, args, *, warmup, repeats):
        log.append((args[0], warmup, repeats))
        return hardware.StepTiming(float(len(log)), (float(len(log)),) * repeats, 0.0)

    monkeypatch.setattr(hardware, "time_step", fake_time_step)

    class Compiled:  # stands for a compiled executable: not compiled again
        def memory_analysis(self):
            return None

    calls = {k: (Compiled(), (k,)) for k in ("a", "b", "c")}
    times = hardware.interleaved_times(calls, warmup=3, rounds=4)
    warm, timed = log[:3], log[3:]
    assert warm == [("a", 2, 1), ("b", 2, 1), ("c", 2, 1)]  # 3 untimed calls each
    order = [k for k, w, r in timed]
    assert order == list("abccbaabccba") and all(r == 1 and w == 0 for _, w, r in timed)
    # Each list holds one time per round, in round order (the fake returns the call index).
    assert times["a"] == [4.0, 9.0, 10.0, 15.0] and times["c"] == [6.0, 7.0, 12.0, 13.0]
    with pytest.raises(ValueError, match="rounds >= 1"):
        hardware.interleaved_times(calls, warmup=0, rounds=0)


def test_plain_g_sq_is_the_squared_norm_of_the_plain_gradient():
    """The floor row: the plain step's gradient, unchanged, and its squared norm |G_B|²."""
    loss_fn, params, batch = bench.row_problem("plain_mlp", 8, dims=(6, 5, 3))
    stats, grads = bench.estimators(loss_fn, num_microbatches=2)["plain_g_sq"](params, batch)
    expected = jax.grad(loss_fn)(params, batch)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), grads, expected))
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(expected)]).astype(np.float64)
    assert float(stats.g_sq) == pytest.approx(float(flat @ flat), rel=1e-5)
    assert float(stats.trace_cov) == 0.0
