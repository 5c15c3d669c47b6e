"""Tests for experiments.validation: the sweep's recommendations read against its trainings, on
fake sweep dicts with hand-computed answers."""

from __future__ import annotations

import pytest

from experiments import validation

DEVICE = "device_time_to_target_s"


def point(b, seed, steps, t, reached=True):
    """A training at batch ``b``: ``steps`` to the target at ``t`` seconds per step."""
    return {
        "batch_size": b,
        "seed": seed,
        "reached": reached,
        "steps": steps if reached else None,
        DEVICE: steps * t if reached else None,
        "time_to_target_s": 2.0 * steps * t if reached else None,
    }


# t(B) = 0.01 (1 + B/64) s per step; steps = S_min + E_min/B with S_min = 100, E_min = 6400
# (B_crit 64): device times 32: 4.5, 64: 4.0, 128: 4.5, 256: 6.25 (seed 0).
T = {b: 0.01 * (1 + b / 64) for b in (16, 32, 64, 128, 256, 512)}
FIT = {"s_min": 100.0, "e_min": 6400.0, "b_crit": 64.0, "intervals": {"b_crit": [50.0, 80.0]}}


def fake_sweep(points, by_basis, crit=None):
    return {
        "throughput": [{"batch_size": b, "step_time_s": t} for b, t in T.items()],
        "tradeoff": FIT | {"by_batch": validation.mean_over_seeds(points)},
        "recommendation_by_basis": by_basis,
        "critical_batch": crit,
    }


def seed0():
    return [point(b, 0, 100 + 6400 / b, T[b]) for b in (32, 64, 128, 256)]


def test_reseed_picks_the_fastest_that_reached():
    pts = seed0() + [point(16, 0, 1, 1.0, reached=False)]
    assert validation.reseed_batch_sizes(pts, 3) == [64, 32, 128]  # 4.0, then the 4.5 tie
    assert validation.reseed_batch_sizes(pts, 0) == []
    assert validation.reseed_batch_sizes(pts, 10) == [64, 32, 128, 256]


def test_mean_over_seeds_means_and_spread():
    pts = seed0() + [point(64, 1, 300, T[64]), point(128, 1, 1, 1.0, reached=False)]
    rows = {r["batch_size"]: r for r in validation.mean_over_seeds(pts)}
    r = rows[64]
    assert r["seeds"] == [0, 1] and r["num_reached"] == 2 and r["reached"]
    assert r["steps"] == pytest.approx((200 + 300) / 2)
    assert r[DEVICE] == pytest.approx(250 * 0.02)
    assert r["device_time_range"] == pytest.approx([4.0, 6.0])
    assert r["time_to_target_s"] == pytest.approx(2 * 250 * 0.02)
    assert r["device_time_per_seed"] == pytest.approx({"0": 4.0, "1": 6.0})
    # A seed that missed the target: the batch is not counted as reached; the mean is over the
    # seed that reached it, and the missed one shows as None.
    r = rows[128]
    assert not r["reached"] and r["num_reached"] == 1
    assert r[DEVICE] == pytest.approx(4.5)
    assert r["device_time_per_seed"] == {"0": pytest.approx(4.5), "1": None}
    assert rows[32]["seeds"] == [0] and rows[32]["device_time_range"] == pytest.approx([4.5, 4.5])


def test_trained_recommendation_is_measured_over_the_best_with_the_seed_spread():
    # Seed 1 at the best three: 32 is now fastest (4.0 vs 64's 4.4).
    pts = seed0() + [point(32, 1, 4.0 / T[32], T[32]), point(64, 1, 220, T[64])]
    pts.append(point(128, 1, 150, T[128]))
    by_basis = {"b_simple": {"batch_size": 128, "b_noise": 150.0}}
    by_basis["branched"] = {"batch_size": 64, "b_noise": 60.0}
    v = validation.validation(fake_sweep(pts, by_basis))
    # Means: 32: 4.25, 64: 4.2, 128: 4.5 -> best 64.
    assert v["best_measured"]["batch_size"] == 64
    assert v["best_measured"][DEVICE] == pytest.approx(4.2)
    b = v["by_basis"]["branched"]
    assert b["trained"] and b["source"].startswith("trained (2 seed(s)")
    assert b["over_best"] == pytest.approx(1.0)
    # Per seed, over the fastest batch trained with that seed: seed 0 64 is fastest (4.0);
    # seed 1 32 is (4.0), 64 took 4.4.
    assert b["over_best_per_seed"] == pytest.approx({"0": 1.0, "1": 1.1})
    assert b["over_best_range"] == pytest.approx([1.0, 1.1])
    s = v["by_basis"]["b_simple"]
    assert s["over_best"] == pytest.approx(4.5 / 4.2)
    assert s["over_best_per_seed"] == pytest.approx({"0": 4.5 / 4.0, "1": 4.5 / 4.0})
    # The model's own view: S(B) t(B) at 128 over its minimum over the trained batches (64).
    assert s["fitted_over_fitted_best"] == pytest.approx(4.5 / 4.0)
    assert v["targets"]["branched_over_best"] == pytest.approx(1.0)
    assert v["targets"]["branched_over_best_met"] is True


def test_untrained_recommendation_is_interpolated_on_the_fitted_curve_and_says_so():
    by_basis = {"trajectory": {"batch_size": 512, "b_noise": 900.0}}
    by_basis["branched"] = {"batch_size": 16, "b_noise": 10.0}
    v = validation.validation(fake_sweep(seed0(), by_basis))
    t = v["by_basis"]["trajectory"]
    fitted = (100 + 6400 / 512) * T[512]  # 112.5 steps x 0.09 s
    assert not t["trained"] and t["source"].startswith("interpolated")
    assert "not trained" in t["source"]
    assert t[DEVICE] == pytest.approx(fitted)
    assert t["over_best"] == pytest.approx(fitted / 4.0)
    assert t["over_best_per_seed"] == pytest.approx({"0": fitted / 4.0})
    b = v["by_basis"]["branched"]
    assert b["over_best"] == pytest.approx((100 + 400) * T[16] / 4.0)  # 6.25 / 4 = 1.5625
    assert v["targets"]["branched_over_best_met"] is False


def test_a_recommendation_that_missed_without_a_fit_is_not_measured_and_says_why():
    pts = seed0() + [point(16, 0, 1, 1.0, reached=False)]
    sweep = fake_sweep(pts, {"branched": {"batch_size": 16, "b_noise": 10.0}})
    sweep["tradeoff"] |= {"s_min": None, "e_min": None, "b_crit": None}  # no fit
    b = validation.validation(sweep)["by_basis"]["branched"]
    assert b["source"] == "no fitted S(B) to interpolate (trained, but a seed missed the target)"
    assert b[DEVICE] is None and b["over_best"] is None


def test_branched_over_fitted_ratio_interval_and_target():
    crit = {
        "effective": {"value": 80.0, "low": 60.0, "high": 100.0},
        "checkpoints": [{"step": 10, "b_crit": 32.0}, {"step": 30, "b_crit": None}],
    }
    by_basis = {"branched": {"batch_size": 64, "b_noise": 80.0}}
    v = validation.validation(fake_sweep(seed0(), by_basis, crit))
    r = v["branched_over_fitted"]
    assert r["value"] == pytest.approx(80 / 64)
    assert r["low"] == pytest.approx(60 / 80) and r["high"] == pytest.approx(100 / 50)
    assert r["per_checkpoint"] == [{"step": 10, "ratio": 0.5}, {"step": 30, "ratio": None}]
    assert v["targets"]["branched_over_fitted_met"] is True
    # 97 / 64 = 1.52 > 1.5; 64 / 42 = 1.52: too small by the same factor
    for value in (97.0, 42.0):
        crit["effective"]["value"] = value
        targets = validation.validation(fake_sweep(seed0(), by_basis, crit))["targets"]
        assert targets["branched_over_fitted_met"] is False


def test_unmeasured_bases_and_no_reached_training_are_reported_not_crashed():
    by_basis = {"branched": {"batch_size": None, "b_noise": None}}
    v = validation.validation(fake_sweep(seed0(), by_basis))
    assert v["by_basis"]["branched"] == {"batch_size": None, "b_noise": None}
    assert v["targets"]["branched_over_best"] is None
    assert v["targets"]["branched_over_best_met"] is None
    assert v["targets"]["branched_over_fitted_met"] is None  # no critical_batch stage
    missed = [point(b, 0, 1, 1.0, reached=False) for b in (32, 64)]
    assert "error" in validation.validation(fake_sweep(missed, by_basis))


def test_branched_stage_is_keyed_by_the_noise_scale_only_where_its_rule_uses_it():
    from configs import sweep as sweep_config
    from experiments import sweep

    adam = sweep_config.get_config("smoke")
    plain = sweep.stage_fingerprint(adam, "critical_batch")
    assert sweep.critical_fingerprint(adam, 50.0) == plain
    assert sweep.critical_fingerprint(adam, 500.0) == plain
    sgd = sweep_config.get_config("resnet_sgd")
    fp = sweep.critical_fingerprint(sgd, 176.0)
    assert fp == sweep.critical_fingerprint(sgd, 176.0)
    assert fp != sweep.critical_fingerprint(sgd, 200.0)
    assert fp != sweep.stage_fingerprint(sgd, "critical_batch")
    # inf: the SGD rule is linear scaling, the rule's default: nothing to fold in.
    assert sweep.critical_fingerprint(sgd, float("inf")) == sweep.stage_fingerprint(
        sgd, "critical_batch"
    )


def test_rank_is_who_won_fastest_first_ties_share_a_rank_misses_left_out():
    rows = [
        {"batch_size": 16, "reached": True, DEVICE: 3.0, "time_to_target_s": 2.0},
        {"batch_size": 64, "reached": True, DEVICE: 2.0, "time_to_target_s": 5.0},
        {"batch_size": 32, "reached": True, DEVICE: 2.0, "time_to_target_s": 4.0},
        {"batch_size": 128, "reached": False, DEVICE: 1.0, "time_to_target_s": 1.0},
    ]
    r = validation.rank(rows)
    assert [x["batch_size"] for x in r] == [32, 64, 16]  # equal times: the smaller batch first
    assert [x["rank"] for x in r] == [1, 1, 3]
    assert [x["over_best"] for x in r] == pytest.approx([1.0, 1.0, 1.5])
    assert [x["wall_over_best"] for x in r] == pytest.approx([2.0, 2.5, 1.0])
    assert validation.rank(rows[3:]) == []
    # Grouped by policy (compare): rows in order of first appearance, means over the seeds.
    times = {"default": (4.0, 5.0), "adaptive": (3.0, 5.0)}
    runs = [dict(policy=p, seed=s, reached=True, time_to_target_s=t[s], **{DEVICE: t[s]})
            for s in (0, 1) for p, t in times.items()]  # fmt: skip
    means = validation.mean_over_seeds(runs, key="policy")
    assert [m["policy"] for m in means] == ["default", "adaptive"]
    assert [m[DEVICE] for m in means] == pytest.approx([4.5, 4.0])
    assert [x["policy"] for x in validation.rank(means, key="policy")] == ["adaptive", "default"]
