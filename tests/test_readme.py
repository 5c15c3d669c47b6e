"""The README's and docs' examples run as printed: the noise-scale example, the research-code
example of ``find_batch_size`` (kept in ``docs/find_batch_size.py``, pasted into the README as
is), docs/estimate.md, docs/data-parallel.md in a fresh Python with the devices it sets up
itself (docs/critical-batch.md runs in tests/test_critical.py), the ``gns`` command, and
every docstring example of ``gns/``."""

import contextlib
import doctest
import importlib
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FINDER_EXAMPLE = ROOT / "docs" / "find_batch_size.py"
DOCS = ROOT / "docs"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run(block: str, name: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, name, "exec"), {"__name__": "__readme__"})
    return out.getvalue()


@pytest.mark.parametrize("module", sorted(p.stem for p in (ROOT / "gns").glob("[a-z]*.py")))
def test_docstring_examples_run_as_printed(module):
    mod = importlib.import_module(f"gns.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in gns.{module}"


def test_readme_example_runs_as_printed():
    (block,) = [b for b in python_blocks(README.read_text()) if "find_batch_size" not in b]
    (value,) = re.findall(r"B_simple = (\S+)", run(block, str(README)))
    # y = x·1 + N(0, 1) noise: tr Σ ≈ d(|δ|² + 1) stays O(d) while |G|² = |δ|² shrinks as w -> 1,
    # so after 100 steps the noise scale is finite, positive and well above d = 8.
    assert math.isfinite(float(value)) and float(value) > 8


def test_find_batch_size_example_runs_as_printed():
    block = FINDER_EXAMPLE.read_text()
    assert len(block.strip().splitlines()) < 20, "the README example must stay under 20 lines"
    out = run(block, str(FINDER_EXAMPLE))
    batch, lr, basis = re.fullmatch(r"batch (\d+), lr (\S+), (\w+)\n.*", out, flags=re.S).groups()
    # A power of two among the default candidates (B_ref/8 .. 8·B_ref, or accumulation of the
    # largest) with Adam's square-root rule from 1e-3 at B_ref = 32, on a stated basis.
    assert int(batch) in {2**k for k in range(2, 11)}
    assert float(lr) == pytest.approx(1e-3 * math.sqrt(int(batch) / 32), rel=0.05)
    assert basis in ("branched", "trajectory", "b_simple")
    assert f"Basis: {basis}." in out


@pytest.mark.parametrize(
    "task_flags",
    [
        ["--target=0"],
        ["--task=lm", "--optimizer=adam", "--ref=16", "--target=9", "--run_steps=100"],
    ],
    ids=["image", "lm"],
)
def test_end_to_end_script_continues_the_pilot_and_adds_up(
    tmp_path, capsys, task_flags, docs_script
):
    """docs/finder_end_to_end.py (the README's end-to-end table) at smoke size, on images and
    on text (a target of 9 bits per byte: reached at the first evaluation)."""
    e2e = docs_script("finder_end_to_end")
    out_file = tmp_path / "e2e.json"
    argv = ["--smoke", "--batch_sizes=16,32", *task_flags, "--window=1", f"--out={out_file}"]
    out = e2e.main(argv)
    assert json.loads(out_file.read_text()) == json.loads(capsys.readouterr().out)
    run_, seconds = out["gns_run"], out["finder_seconds"]
    assert run_["batch_size"] == out["pick"] and run_["steps"] > run_["start_step"] > 0
    assert out["end_to_end_s"] == pytest.approx(seconds["total"] + run_["s"])
    assert out["overhead_over_run_at_pick"] == pytest.approx(seconds["overhead"] / run_["s"])
    assert [r["start_step"] for r in out["fixed"]] == [None, None]  # from scratch
    assert out["task"] == ("lm" if "--task=lm" in task_flags else "image")
    fastest = min(out["fixed"], key=lambda r: r["s"])
    assert out["best_fixed"] == fastest["batch_size"]
    assert out["end_to_end_over_best"] == pytest.approx(out["end_to_end_s"] / fastest["s"])
    with pytest.raises(SystemExit):
        e2e.parse_args(["--smoke", *task_flags, "--eval_every=0"])
    assert "--eval_every=0" in capsys.readouterr().err
    if "--task=lm" in task_flags:  # no default target in bits per byte (0.47 is an accuracy)
        with pytest.raises(SystemExit):
            e2e.main(["--smoke", "--task=lm"])
        assert "--task=lm needs --target" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["--model=cnn", "--model=mlp", "--task=lm"])
def test_precision_script_compares_two_unbiased_estimators(capsys, model, docs_script):
    """docs/estimator_precision.py (behind gns.ghost.MICROBATCH_PRICE) at smoke size: both
    estimators are unbiased for the same statistics of the same batches, so their means agree
    within a few standard errors, and the ratios are of the printed deviations."""
    estimator_precision = docs_script("estimator_precision")
    argv = ["--smoke", model, "--batch=16", "--steps=3", "--n=12"]
    out = estimator_precision.main(argv)
    assert json.loads(capsys.readouterr().out) == out
    for k in ("g_sq", "trace_cov"):
        exact, sampled = out["per_example"][k], out["microbatch"][k]
        err = math.hypot(exact["sd"], sampled["sd"]) / math.sqrt(out["n"])
        assert abs(exact["mean"] - sampled["mean"]) <= 4 * err
        assert out["variance_ratio"][k] == pytest.approx((sampled["sd"] / exact["sd"]) ** 2)
    with pytest.raises(SystemExit):
        estimator_precision.main(["--smoke", "--batch=12"])  # not 8 microbatches


def test_the_readme_carries_the_find_batch_size_example_as_tested():
    blocks = [b for b in python_blocks(README.read_text()) if "find_batch_size" in b]
    if not blocks:
        pytest.skip("README.md has no find_batch_size block yet (paste docs/find_batch_size.py)")
    assert blocks == [FINDER_EXAMPLE.read_text()]


def test_estimate_doc_example_runs_as_printed():
    (block,) = python_blocks((DOCS / "estimate.md").read_text())
    out = run(block, "docs/estimate.md")
    # The EMA state and the interval, whose estimate lies inside [low, high].
    estimate, low, high = (float(x) for x in re.search(
        r"estimate=(\S+?), low=(\S+?), high=(\S+?),", out).groups())  # fmt: skip
    assert low <= estimate <= high and "g_sq" in out


@pytest.mark.timeout(120)
def test_data_parallel_doc_sets_up_its_devices_in_a_fresh_python_on_one_cpu():
    """As a reader runs it: a fresh interpreter without the test session's 4 simulated
    devices. The page's first blocks (the device setup, the model and data) give the 4
    devices its steps need (tests/test_distributed.py runs every block on 4 devices)."""
    blocks = python_blocks((DOCS / "data-parallel.md").read_text())
    assert "xla_force_host_platform_device_count=4" in blocks[0]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    code = "\n".join([*blocks[:2], "print(jax.device_count(), len(get_batch(0)[0]))"])
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["4", "64"]


@pytest.mark.parametrize("script", ["finder_end_to_end.py", "estimator_precision.py"])
def test_docs_scripts_start_as_printed_from_any_directory(tmp_path, script):
    """``python docs/<script> ...`` as the docstrings print it: Python puts docs/ first on the
    path, not the clone, so the script must find experiments/ and configs/ itself."""
    proc = subprocess.run([sys.executable, str(DOCS / script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "--smoke" in proc.stdout


def test_the_gns_command_lists_its_subcommands_and_maps_them_to_the_experiments():
    proc = subprocess.run([sys.executable, "-m", "experiments", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    from experiments import __main__ as gns_command

    listed = [ln.split()[0] for ln in proc.stdout.splitlines()[2:] if ln.strip()]
    assert listed == list(gns_command.COMMANDS)
    module, argv = gns_command.command_line("demo", ["--config.seed=1"], root="/r")
    assert module == "experiments.cifar10"
    assert argv == ["gns demo", "--config=/r/configs/cifar10.py:demo", "--config.seed=1",
                    "--config.mode=compare", "--workdir=runs/demo"]  # fmt: skip
    # Its help says what the subcommand runs, above the module's own (a smoke training's).
    assert gns_command.help_header("demo", module, argv[1:]) is None
    header = gns_command.help_header("demo", module, [*argv[1:], "--help"])
    assert header.startswith("gns demo: every batch-size policy") and header.count("--help") == 0
    assert "experiments.cifar10 with --config=/r/configs/cifar10.py:demo" in header
    # absl takes -flag as --flag: a given -workdir is not overridden by the default.
    _, argv = gns_command.command_line("bench", ["-config=c.py", "-workdir=w"], root="/r")
    assert argv == ["gns bench", "-config=c.py", "-workdir=w"]
    # The user's --config (either form) comes before the defaults that override its fields.
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "demo", "--config", "configs/teacher.py:smoke",
         "--print_config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mode"] == "compare"
    for name, (module, config, *_) in gns_command.COMMANDS.items():
        assert (ROOT / config.split(":")[0]).is_file(), name
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), name
    proc = subprocess.run([sys.executable, "-m", "experiments", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert proc.returncode == 0 and proc.stdout == f"gns {version}\n"


def test_the_readme_lists_every_variant_of_every_config():
    start = README.read_text().index("Configs are `ml_collections` files with variants")
    listed = dict(re.findall(r"`configs/(\w+)\.py:([\w|]+)`", README.read_text()[start:][:600]))
    for name in ("cifar10", "sweep", "lm", "teacher", "bench"):
        config = importlib.import_module(f"configs.{name}")
        assert listed[name].split("|") == list(config.VARIANTS), name


def test_the_wheel_lists_every_package_of_the_tree():
    """``pip install .`` installs what ``[tool.setuptools]`` lists: every directory with an
    ``__init__.py`` under gns/, experiments/ and configs/ (a subpackage left out broke every
    ``gns`` subcommand of an installed copy)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]

    def folder(pkg: str) -> str:  # where setuptools reads the package from
        top = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len, default="")
        rest = pkg[len(top) :].lstrip(".").replace(".", "/")
        return "/".join(x for x in (dirs[top] if top else "", rest) if x)

    listed = {folder(pkg) for pkg in tool["packages"]}
    tree = {
        str(p.parent.relative_to(ROOT))
        for top in ("gns", "experiments", "configs")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert listed == tree
