r"""CIFAR-10 (or any image folder) with the gradient noise scale tracked during training::

    python -m experiments.cifar10 --config configs/cifar10.py:smoke --workdir /tmp/smoke \
      --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg.tar.gz

``config.mode``: ``train``, ``compare`` (every batch-size policy trained to one smoothed target,
with a verdict; ``make demo``) or ``tradeoff`` (time to a target at several batch sizes). The
training main of :mod:`experiments.run`: re-running resumes, Ctrl-C stops with everything saved
(exit code 130), a mistake prints one line and a hint (exit code 2).
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

from experiments.run import run, start

__all__ = ["run"]

if __name__ == "__main__":
    start("configs/cifar10.py")
