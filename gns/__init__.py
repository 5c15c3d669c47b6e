"""gns: the gradient noise scale, the device's throughput and memory per batch size, and the
batch size (and learning rate) that trains fastest, for any JAX loss.

The one entry point for research code is :func:`find_batch_size` (:mod:`gns.finder`); the
pieces are the modules ``gns.estimate``, ``gns.ghost``, ``gns.smoothing``, ``gns.critical``,
``gns.hardware``, ``gns.tradeoff``, ``gns.recommend`` and ``gns.plots``.

``gns.find_batch_size`` and ``gns.BatchSizeResult`` are loaded on first use (a module
``__getattr__``), so ``import gns`` alone imports nothing heavy (no JAX).

Example:
  >>> import gns
  >>> gns.find_batch_size is gns.finder.find_batch_size
  True
"""

from __future__ import annotations

import importlib
import importlib.metadata

__all__ = ["find_batch_size", "BatchSizeResult"]

try:  # the installed distribution's (pyproject.toml); a source tree on the path has none
    __version__ = importlib.metadata.version("gns-jax")
except importlib.metadata.PackageNotFoundError:
    __version__ = "unknown (not installed)"

_LAZY = {"find_batch_size": "finder", "BatchSizeResult": "finder"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"gns.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'gns' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
