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
