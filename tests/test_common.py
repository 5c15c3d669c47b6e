"""Tests of gns.common and of the project's import structure (gns/, experiments/, configs/): no
cycle, no private name used across modules, no project import inside a function but the allowed
ones."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gns import common

ROOT = pathlib.Path(__file__).resolve().parent.parent
GNS = ROOT / "gns"
MODULES = sorted(p.stem for p in GNS.glob("*.py") if p.stem != "__init__")
PACKAGES = ("gns", "experiments", "configs")
# Every module of the project by dotted name (a package's __init__ by the package's name).
PROJECT = {
    ".".join(p.relative_to(ROOT).with_suffix("").parts[: -1 if p.stem == "__init__" else None]): p
    for pkg in PACKAGES
    for p in sorted((ROOT / pkg).rglob("*.py"))
}
# Project imports allowed inside a function, (importer, imported): gns.plots needs matplotlib,
# an optional dependency; the training entry points check the config before training's imports.
LOCAL_IMPORTS = {
    ("gns.finder", "gns.plots"),
    ("experiments.run", "experiments.train"),
    ("experiments.run", "experiments.compare"),
}


def _imports(path: pathlib.Path, name: str) -> tuple[set[str], list[str], set[str]]:
    """The project modules that module ``name`` (file ``path``) imports (anywhere,
    function-local included), every use of a private name of another project module
    (``from gns.x import _y``, ``x._y``), and the project modules imported inside a function."""
    tree = ast.parse(path.read_text())
    in_function = {
        id(c)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for c in ast.walk(f)
    }
    deps, private, local, aliases = set(), [], set(), {}
    for node in ast.walk(tree):
        found = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in PROJECT:
                    found.append(full)
                    aliases[a.asname or a.name] = full
                else:
                    found.append(node.module)
                    if a.name.startswith("_"):
                        private.append(full)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    found.append(a.name)
                    aliases[a.asname or a.name] = a.name
        deps.update(found)
        if id(node) in in_function:
            local.update(found)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and aliases[node.value.id] != name
        ):
            private.append(f"{aliases[node.value.id]}.{node.attr}")
    return deps - {name}, private, local - {name}


def test_every_module_imports_first():
    """Each module imported first, in a fresh package state (a cycle fails on some order)."""
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    for m in [m for m in sys.modules if m == 'gns' or m.startswith('gns.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module('gns.' + name)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(GNS.parent), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_import_cycle_and_no_private_names_across_modules():
    """Over gns/, experiments/ and configs/: no import cycle, no private name of another
    module, project imports inside functions only where LOCAL_IMPORTS allows them."""
    graph, private, local = {}, {}, {}
    for name, path in PROJECT.items():
        graph[name], private[name], local[name] = _imports(path, name)
    assert not any(private.values()), {k: v for k, v in private.items() if v}
    unexpected = {(n, m) for n, mods in local.items() for m in mods} - LOCAL_IMPORTS
    assert not unexpected, sorted(unexpected)
    assert graph["gns.common"] == set()  # the bottom of the library
    assert not any(d.startswith(("experiments", "configs")) for n in graph
                   if n.startswith("gns") for d in graph[n])  # fmt: skip
    # Depth-first search for a back edge (an edge to a module outside PROJECT is not followed).
    state = dict.fromkeys(PROJECT, 0)  # 0 unseen, 1 on the stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node] & set(PROJECT)):
            assert state[dep] != 1, "import cycle: " + " -> ".join([*stack, node, dep])
            if state[dep] == 0:
                visit(dep, [*stack, node])
        state[node] = 2

    for name in PROJECT:
        if state[name] == 0:
            visit(name, [])
    # Measurement never imports a decision.
    decisions = {"gns.recommend", "gns.schedule", "gns.finder"}
    for name in ("common", "estimate", "ghost", "smoothing", "hardware", "tradeoff", "scaling"):
        assert not graph[f"gns.{name}"] & decisions, (name, graph[f"gns.{name}"] & decisions)


def test_the_checker_sees_a_cycle_a_private_name_and_a_local_import(tmp_path):
    (tmp_path / "a.py").write_text(
        "from experiments import cli\n\ndef f():\n    from gns import hardware\n"
        "    return hardware._x, cli.UserError\n"
    )
    deps, private, local = _imports(tmp_path / "a.py", "gns.a")
    assert deps == {"gns.hardware", "experiments.cli"}
    assert private == ["gns.hardware._x"] and local == {"gns.hardware"}
    (tmp_path / "b.py").write_text("from gns.hardware import _x, time_step\n")
    assert _imports(tmp_path / "b.py", "gns.b") == ({"gns.hardware"}, ["gns.hardware._x"], set())


def test_sq_norms_equals_numpy_and_survives_the_float32_range():
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(7, 3)), "b": rng.normal(size=5), "z": np.zeros(4)}
    got = common.sq_norms(jax.tree.map(jnp.asarray, tree))
    for k, v in tree.items():
        np.testing.assert_allclose(float(got[k]), np.sum(v.astype(np.float32) ** 2), rtol=1e-5)
    # Elements whose squares fall below float32's smallest normal while the norm does not.
    for scale in (1e-20, 3e-21):
        v = scale * np.ones(10_000, np.float32)
        np.testing.assert_allclose(float(common.sq_norms(jnp.asarray(v))), 1e4 * scale**2, 1e-5)


def test_noise_scale_ratio_numpy_and_jax_agree():
    tc = np.array([8.0, 8.0, np.nan, 3.0, -2.0])
    g = np.array([2.0, -1.0, 1.0, 0.0, 4.0])
    want = np.array([4.0, np.inf, np.nan, np.inf, -0.5])
    np.testing.assert_array_equal(common.noise_scale_ratio(tc, g), want)
    got = jax.jit(common.noise_scale_ratio)(jnp.asarray(tc), jnp.asarray(g))
    assert isinstance(got, jax.Array)
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))


@pytest.mark.parametrize(
    ("value", "ok"), [(3, True), (np.int64(3), True), (np.int32(1), True), (True, False),
                      (np.bool_(True), False), (3.0, False), (0, False), ("3", False)]
)  # fmt: skip
def test_check_int(value, ok):
    if ok:
        assert common.check_int(value, "k", 1) == int(value)
        assert type(common.check_int(value, "k", 1)) is int
    else:
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            common.check_int(value, "k", 1)
