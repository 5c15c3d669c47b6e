r"""A byte-level Transformer language model with the gradient noise scale tracked in training.

Usage::

    python -m experiments.lm --config configs/lm.py:smoke --workdir /tmp/lm_smoke
    python -m experiments.lm --config configs/lm.py:cpu --workdir /tmp/lm_cpu \
      --config.data.path=corpus.txt

``--config`` takes ``configs/lm.py:VARIANT`` (``smoke``, ``cpu``); any field is overridable
(``--config.batch_size=64``). The corpus is the ``.py`` files of the running interpreter's
standard library unless ``--config.data.path`` names a text file or a directory of text files
(:mod:`experiments.text`). This is the training main of :mod:`experiments.run` (mode
``train``) with ``configs/lm.py`` as the default of ``--help``, so the outputs are the CIFAR-10
experiment's: ``metrics.jsonl`` (train loss, held-out ``test_loss`` and ``test_bits_per_byte``
on evaluation rows, noise-scale rows), ``summary.json`` (with the corpus record under
``data``), ``checkpoints/`` and the plots. ``config.target_bits_per_byte`` stops the run when a
periodic held-out evaluation reaches it.

An example of the noise scale is a window of ``context`` tokens (its loss is the mean over
them), so ``b_simple`` counts windows, as ``batch_size`` does; multiply by ``context`` for
tokens. Re-running the same command resumes from the last checkpoint; Ctrl-C stops at the next
step with everything saved (exit code 130). A mistake (a corpus path that does not exist, an
empty or binary corpus, an unknown variant or field, an unwritable workdir, a diverged run)
prints one line and a hint and exits with code 2; ``--verbose`` shows the traceback.
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

from experiments.run import run, start

__all__ = ["run"]

if __name__ == "__main__":
    start("configs/lm.py")
