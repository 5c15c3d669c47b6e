"""Tests of gns.common and of the package's import structure: no cycle, no private name used
across modules."""

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

GNS = pathlib.Path(__file__).resolve().parent.parent / "gns"
MODULES = sorted(p.stem for p in GNS.glob("*.py") if p.stem != "__init__")


def _gns_imports(path: pathlib.Path) -> tuple[set[str], list[str]]:
    """The gns modules ``path`` imports (anywhere, function-local included) and every use of a
    private name of another gns module (``from gns.x import _y``, ``x._y``)."""
    tree = ast.parse(path.read_text())
    deps, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "gns":
            for a in node.names:
                deps.add(a.name)
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gns."):
            mod = node.module.split(".")[1]
            deps.add(mod)
            private += [f"{mod}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("gns."):
                    deps.add(a.name.split(".")[1])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
        ):
            private.append(f"{aliases[node.value.id]}.{node.attr}")
    return deps - {path.stem}, private


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
    graph, private = {}, {}
    for name in MODULES:
        graph[name], private[name] = _gns_imports(GNS / f"{name}.py")
    assert not any(private.values()), private
    assert graph["common"] == set()  # the bottom of the package
    # Depth-first search for a back edge.
    state = dict.fromkeys(MODULES, 0)  # 0 unseen, 1 on the stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state[dep] != 1, "import cycle: " + " -> ".join([*stack, node, dep])
            if state[dep] == 0:
                visit(dep, [*stack, node])
        state[node] = 2

    for name in MODULES:
        if state[name] == 0:
            visit(name, [])
    decisions = {"recommend", "schedule", "finder"}  # measurement never imports a decision
    for name in ("common", "estimate", "ghost", "smoothing", "hardware", "tradeoff", "scaling"):
        assert not graph[name] & decisions, (name, graph[name] & decisions)


def test_the_checker_sees_a_cycle_and_a_private_name(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from gns import b\n    return b._x\n")
    deps, private = _gns_imports(tmp_path / "a.py")
    assert deps == {"b"} and private == ["b._x"]


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
