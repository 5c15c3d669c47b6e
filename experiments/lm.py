r"""A byte-level Transformer language model with the gradient noise scale tracked in training::

    python -m experiments.lm --config configs/lm.py:cpu --workdir /tmp/lm_cpu

The corpus is the standard library's ``.py`` files unless ``--config.data.path=PATH`` names a
text file or a directory of them (:mod:`experiments.tasks.text`). The training main of
:mod:`experiments.run`, as ``experiments.cifar10`` (held-out ``test_bits_per_byte`` instead of
accuracy; ``b_simple`` counts windows of ``context`` tokens).
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

from experiments.run import run, start

__all__ = ["run"]

if __name__ == "__main__":
    start("configs/lm.py")
