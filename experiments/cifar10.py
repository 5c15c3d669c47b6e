"""CIFAR-10 with the gradient noise scale tracked during training.

Usage::

    python -m experiments.cifar10 --config configs/cifar10.py:smoke --workdir /tmp/smoke \
      --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg.tar.gz

``--config`` takes ``configs/cifar10.py:VARIANT`` (``smoke``, ``cpu``, ``gpu``, ``seed``); any
field is overridable (``--config.batch_size=256``). ``config.mode`` picks what runs: ``train``
(:func:`experiments.train.train_and_evaluate`), ``compare`` (the baseline against the recommended
batch size, :func:`experiments.compare.run_compare`; ``make demo``) or ``tradeoff`` (time to a
target at several batch sizes, :func:`experiments.compare.run_tradeoff`). Re-running the same
command resumes from the last checkpoint (and measurements) in ``--workdir``.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import compare, train

FLAGS = flags.FLAGS


def _define_flags():
    """The flags, defined only when this module is the main program (so that importing it
    next to another main, e.g. ``experiments.sweep``, defines no clashing flags)."""
    flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and plots.")
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/cifar10.py:smoke.", lock_config=True
    )
    flags.mark_flags_as_required(["config", "workdir"])


MODES = {
    "train": train.train_and_evaluate,
    "compare": compare.run_compare,
    "tradeoff": compare.run_tradeoff,
}


def run(config, workdir: str) -> dict:
    """Dispatch on ``config.mode``; returns the mode's summary."""
    mode = config.get("mode", "train")
    if mode not in MODES:
        raise ValueError(
            f"config.mode={mode!r} is not available: use one of {', '.join(sorted(MODES))} "
            "(--config.mode=train)."
        )
    return MODES[mode](config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(train.QuietOrbax())
    summary = run(FLAGS.config, FLAGS.workdir)
    if summary.get("mode") in ("compare", "tradeoff"):
        print(compare.report(summary))
        return
    keys = ("test_accuracy", "wall_time_s", "steps", "epochs", "stop_reason", "noise_scale")
    logging.info("Summary: %s", json.dumps({k: summary.get(k) for k in keys}))
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
