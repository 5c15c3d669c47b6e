"""Multi-host: the estimators under ``jax.distributed`` with 2 processes on localhost.

Starts ``tests/multihost_worker.py`` twice (process 0 and 1, 2 CPU devices each, gloo CPU
collectives, loopback coordinator), once for the module: each process trains the smoke config
with ``config.distributed=True`` into one workdir, then computes the estimators holding only its
own half of the batch. Both must print the same global statistics, equal to one process
computing over the whole batch, and the run must equal one process training on 4 devices.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import multihost_worker as worker
import numpy as np
import optax
import pytest

REPO = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # The pytest session forces 4 simulated devices through XLA_FLAGS (tests/conftest.py); the
    # workers choose their device count themselves (--local_devices), so drop that flag.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_workers(tmp_path: Path, *extra: str) -> list[dict]:
    port = _free_port()
    procs, logs = [], []
    try:
        for pid in range(NUM_PROCESSES):
            out = open(tmp_path / f"worker{pid}.out", "w+")
            err = open(tmp_path / f"worker{pid}.err", "w+")
            logs.append((out, err))
            cmd = [
                sys.executable,
                str(REPO / "tests" / "multihost_worker.py"),
                f"--port={port}",
                f"--process_id={pid}",
                f"--num_processes={NUM_PROCESSES}",
                f"--local_devices={LOCAL_DEVICES}",
                f"--timeout_s={TIMEOUT_S // 2}",
                *extra,
            ]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=_worker_env(), stdout=out, stderr=err))
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    results = []
    for pid, (p, (out, err)) in enumerate(zip(procs, logs, strict=True)):
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        out.close()
        err.close()
        assert p.returncode == 0, f"worker {pid} exited {p.returncode}:\n{stderr[-4000:]}"
        lines = [ln for ln in stdout.splitlines() if ln.startswith(worker.RESULT_PREFIX)]
        assert len(lines) == 1, f"worker {pid} printed no result:\n{stdout}\n{stderr[-4000:]}"
        results.append(json.loads(lines[0][len(worker.RESULT_PREFIX) :]))
    return results


def _close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=what)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The 2-process job, run once: (its results, its training workdir, a scratch directory)."""
    tmp_path = tmp_path_factory.mktemp("multihost")
    workdir = tmp_path / "two"
    return _run_workers(tmp_path, f"--train_workdir={workdir}"), workdir, tmp_path


ESTIMATOR_KEYS = ("num_devices", "per_example", "microbatch", "across_devices", "train")


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_two_processes_match_one_process(job):
    results = job[0]
    assert [r["process_id"] for r in results] == list(range(NUM_PROCESSES))
    num_devices = NUM_PROCESSES * LOCAL_DEVICES
    assert all(r["num_devices"] == num_devices for r in results)

    # Both processes print the same global statistics (the all-reduce is the same on both).
    first = {k: results[0][k] for k in ESTIMATOR_KEYS}
    for r in results[1:]:
        assert {k: r[k] for k in ESTIMATOR_KEYS} == first

    # ... and they are those of one process computing over the whole batch.
    params, batch = worker.make_problem()
    singles = {name: single for name, (_, single) in worker.estimators(num_devices).items()}
    # One program for every reference: the estimators on one device and jax.grad.
    refs, expected_grads = jax.jit(
        lambda p, b: (
            {n: f(worker.loss_fn, p, b) for n, f in singles.items()},
            jax.grad(worker.loss_fn)(p, b),
        )
    )(params, batch)
    for name, ref in refs.items():
        got = first[name]
        want = worker.result_to_json(*ref)
        assert got["small_batch_size"] == want["small_batch_size"], name
        assert got["big_batch_size"] == want["big_batch_size"] == worker.GLOBAL_BATCH, name
        _close(got["g_sq"], want["g_sq"], f"{name} g_sq")
        _close(got["trace_cov"], want["trace_cov"], f"{name} trace_cov")
        assert got["per_layer"].keys() == want["per_layer"].keys()
        for layer, value in got["per_layer"].items():
            _close(value, want["per_layer"][layer], f"{name} {layer}")
        is_list = lambda x: isinstance(x, list)
        for g, w, e in zip(
            jax.tree.leaves(got["grads"], is_leaf=is_list),
            jax.tree.leaves(want["grads"], is_leaf=is_list),
            jax.tree.leaves(expected_grads),
            strict=True,
        ):
            _close(g, w, f"{name} grads")
            _close(g, np.ravel(e), f"{name} grads vs jax.grad")

    # gns.parallel.make_train_step across the two processes: Adam from the global gradient.
    optimizer = optax.adam(worker.TRAIN_LR)

    @jax.jit
    def adam_step(p, opt_state):
        updates, opt_state = optimizer.update(jax.grad(worker.loss_fn)(p, batch), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    p, opt_state = params, jax.jit(optimizer.init)(params)
    for _ in range(worker.TRAIN_STEPS):
        p, opt_state = adam_step(p, opt_state)
    for g, w in zip(
        jax.tree.leaves(first["train"]["grads"], is_leaf=is_list), jax.tree.leaves(p), strict=True
    ):
        _close(g, np.ravel(w), "params after make_train_step")


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_smoke_training_on_two_processes_matches_one_process_with_four_devices(job):
    """config.distributed=True, 2 processes x 2 CPU devices, one workdir: process 0 writes the
    files, and the run equals one process training on 4 devices."""
    from experiments import runlog, train

    results, workdir, tmp_path = job
    assert [r["num_devices"] for r in results] == [4, 4]
    assert results[0]["summary"]["mesh"] == {
        "devices": 4, "kind": "cpu", "platform": "cpu", "hosts": 2, "shape": {"batch": 4},
        "axis": "batch",
    }  # fmt: skip
    assert runlog.read_json(str(workdir / "summary.json")) == results[0]["summary"]
    rows = results[0]["rows"]
    assert [r["step"] for r in rows] == list(range(1, 7))  # each row once: one writer
    assert {"3", "6"} <= set(os.listdir(workdir / runlog.CHECKPOINT_DIR))  # orbax, 2 processes

    config = worker.smoke_config()
    config.num_devices = 4
    config.checkpoint_every = 0  # the reference's checkpoints are not compared: only the last
    single = train.train_and_evaluate(config, str(tmp_path / "one"))
    want = runlog.read_jsonl(str(tmp_path / "one" / runlog.METRICS_FILE))
    assert single["gns_method"] == results[0]["summary"]["gns_method"] == "across_devices"
    for got, ref in zip(rows, want, strict=True):
        for key in ("train_loss", "train_accuracy", "g_sq", "trace_cov", "test_accuracy"):
            if ref.get(key) is None:
                assert got.get(key) is None, (ref["step"], key)
            else:
                _close(got[key], ref[key], f"step {ref['step']} {key}")
    for key in ("test_accuracy", "test_loss", "steps", "examples"):
        _close(results[0]["summary"][key], single[key], key)
        _close(results[1]["summary"][key], single[key], f"process 1 {key}")


@pytest.mark.timeout(TIMEOUT_S)
def test_a_mistake_every_process_makes_is_one_error_line_on_each(tmp_path):
    """Process 0 hosts the coordinator: leaving at once on a config mistake aborted process 1
    (JAX's "distributed service detected fatal errors") before it could report it too, when
    process 1 was the slower to start (2 of 5 tries on a loaded machine; on an idle one both
    report it either way)."""
    port, procs = _free_port(), []
    for pid in range(NUM_PROCESSES):
        env = _worker_env() | {
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": str(NUM_PROCESSES),
            "JAX_PROCESS_ID": str(pid),
        }
        cmd = [sys.executable, "-m", "experiments.run", "--config=configs/teacher.py:smoke",
               f"--workdir={tmp_path / 'run'}", "--config.num_devices=3"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 2, err[-3000:]
        assert "error: config.num_devices=3 is not available" in err and "Fatal" not in err
    assert not (tmp_path / "run").exists()
