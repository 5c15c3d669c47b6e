r"""A byte-level Transformer language model with the gradient noise scale tracked in training.

Usage::

    python -m experiments.lm --config configs/lm.py:smoke --workdir /tmp/lm_smoke
    python -m experiments.lm --config configs/lm.py:cpu --workdir /tmp/lm_cpu \
      --config.data.path=corpus.txt

``--config`` takes ``configs/lm.py:VARIANT`` (``smoke``, ``cpu``); any field is overridable.
The corpus is the ``.py`` files of the running interpreter's standard library unless
``--config.data.path`` names a text file or a directory
(:mod:`experiments.tasks.text`). The training main of
:mod:`experiments.run`, with the outputs of ``experiments.cifar10`` (held-out
``test_bits_per_byte`` instead of accuracy; ``b_simple`` counts windows of ``context``
tokens); re-running resumes, Ctrl-C stops with everything saved (exit code 130), a mistake
prints one line and a hint (exit code 2).
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

from experiments.run import run, start

__all__ = ["run"]

if __name__ == "__main__":
    start("configs/lm.py")
