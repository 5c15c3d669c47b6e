r"""CIFAR-10 with the gradient noise scale tracked during training.

Usage::

    python -m experiments.cifar10 --config configs/cifar10.py:smoke --workdir /tmp/smoke \
      --config.data.source=folder --config.data.path=../shared/data/cifar10-jpeg.tar.gz

``--config`` takes ``configs/cifar10.py:VARIANT`` (``smoke``, ``cpu``, ``gpu``,
``effnet_lamb``); any field is overridable (``--config.batch_size=256``). ``config.mode`` picks
what runs: ``train`` (:func:`experiments.train.train_and_evaluate`), ``compare`` (every
batch-size policy, the adaptive schedule included, trained to the same smoothed target, with a
verdict: :func:`experiments.compare.run_compare`; ``make demo``; ``adaptive`` is another name
for it) or ``tradeoff`` (time to a target at several batch sizes,
:func:`experiments.compare.run_tradeoff`).
Re-running the same command resumes from the last checkpoint (and measurements) in
``--workdir``; Ctrl-C stops at the next step with everything saved (exit code 130).

A mistake (a missing config file, an unknown variant, field or mode, a bad data path, an
unwritable workdir, a full disk, a diverged run) prints one line and a hint and exits with code
2; ``--verbose`` shows the traceback (:mod:`experiments.cli`).
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli, rules, runlog
from experiments.cli import UserError
from experiments.rules import MODES

FLAGS = flags.FLAGS
SUMMARY_KEYS = ("test_accuracy", "wall_time_s", "steps", "epochs", "stop_reason", "noise_scale")


def _define_flags():
    """The flags, defined only when this module is the main program (so that importing it
    next to another main, e.g. ``experiments.sweep``, defines no clashing flags)."""
    flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and plots.")
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/cifar10.py:smoke.", lock_config=True
    )
    flags.mark_flags_as_required(["config", "workdir"])


def _check_mode(config) -> str:
    if config.mode not in MODES:
        raise UserError(
            f"config.mode={config.mode!r} is not available: use one of {', '.join(MODES)}",
            hint="e.g. --config.mode=train",
        )
    return config.mode


def run(config, workdir: str) -> dict:
    """Dispatch on ``config.mode``; returns the mode's summary."""
    mode = _check_mode(config)
    if mode == "train":
        from experiments import train

        return train.train_and_evaluate(config, workdir)
    from experiments import compare

    run_mode = {"compare": compare.run_compare, "adaptive": compare.run_compare}
    return run_mode.get(mode, compare.run_tradeoff)(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}", hint="flags take the form --name=value")
    rules.check(FLAGS.config, "cifar10")  # every field, before the slow imports
    logging.get_absl_handler().addFilter(runlog.QuietOrbax())
    summary = run(FLAGS.config, FLAGS.workdir)
    if summary.get("mode") in ("compare", "tradeoff"):
        from experiments import compare

        print(compare.report(summary))
        return
    runlog.print_summary(summary, SUMMARY_KEYS)


if __name__ == "__main__":
    _define_flags()
    cli.run(main, "configs/cifar10.py", rules.describer("cifar10"))
