"""Test set-up: 4 simulated CPU devices for the data-parallel tests.

The XLA flag must be set before JAX initializes its backend, so it is set here, at import time
of the test session. Tests that need one device simply use the default device.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Caches (decoded data, the sweep's compilation cache) go to a directory of this session, not the
# user's ~/.cache/gns: the suite reads nothing an earlier run left there and writes nothing there.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gns-tests-cache-")

# Test files by their measured time on 2 cores (--durations), longest first. `make test` runs
# them in 2 processes, a file at a time, in this order (--dist loadfile --no-loadscope-reorder):
# the long files start first and the short ones fill in behind them, so neither process is left
# with a long file at the end. Files not listed follow in their usual order.
LONGEST_FIRST = (
    "test_mesh.py", "test_bench.py", "test_sweep.py", "test_compare.py", "test_train.py",
    "test_ghost.py", "test_lm.py", "test_adaptive.py", "test_demo.py", "test_distributed.py",
    "test_multihost.py", "test_estimate.py", "test_config.py", "test_cli.py", "test_readme.py",
    "test_interrupt.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
