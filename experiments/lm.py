r"""A byte-level Transformer language model with the gradient noise scale tracked in training.

Usage::

    python -m experiments.lm --config configs/lm.py:smoke --workdir /tmp/lm_smoke
    python -m experiments.lm --config configs/lm.py:cpu --workdir /tmp/lm_cpu \
      --config.data.path=corpus.txt

``--config`` takes ``configs/lm.py:VARIANT`` (``smoke``, ``cpu``); any field is overridable
(``--config.batch_size=64``). The corpus is the ``.py`` files of the running interpreter's
standard library unless ``--config.data.path`` names a text file or a directory of text files
(:mod:`experiments.text`). Training is :func:`experiments.train.train_and_evaluate` with the
``lm`` task (:mod:`experiments.tasks`), so the outputs are the CIFAR-10 experiment's:
``metrics.jsonl`` (train loss, held-out ``test_loss`` and ``test_bits_per_byte`` on evaluation
rows, noise-scale rows), ``summary.json`` (with the corpus record under ``data``),
``checkpoints/`` and the plots. ``config.target_bits_per_byte`` stops the run when a periodic
held-out evaluation reaches it.

An example of the noise scale is a window of ``context`` tokens (its loss is the mean over
them), so ``b_simple`` counts windows, as ``batch_size`` does; multiply by ``context`` for
tokens. Re-running the same command resumes from the last checkpoint;
Ctrl-C stops at the next step with everything saved (exit code 130).

A mistake (a corpus path that does not exist, an empty or binary corpus, an unknown variant or
field, an unwritable workdir, a diverged run) prints one line and a hint and exits with code 2;
``--verbose`` shows the traceback (:mod:`experiments.cli`).
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli, rules, runlog
from experiments.cli import UserError

FLAGS = flags.FLAGS
MODES = ("train",)
SUMMARY_KEYS = (
    "test_loss",
    "test_bits_per_byte",
    "train_bits_per_byte",
    "wall_time_s",
    "steps",
    "epochs",
    "stop_reason",
    "noise_scale",
)


def _define_flags():
    """The flags, defined only when this module is the main program."""
    flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and plots.")
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/lm.py:smoke.", lock_config=True
    )
    flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str) -> dict:
    """Train (``config.mode='train'``, the only mode so far); returns the summary."""
    if config.mode not in MODES:
        raise UserError(
            f"config.mode={config.mode!r} is not available for the language model: use "
            f"{', '.join(MODES)}",
            hint="e.g. --config.mode=train",
        )
    if config.get("task") != "lm":
        raise UserError(
            f"config.task={config.get('task')!r}: experiments.lm trains the 'lm' task",
            hint="use --config configs/lm.py:VARIANT",
        )
    from experiments import train

    return train.train_and_evaluate(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}", hint="flags take the form --name=value")
    rules.check(FLAGS.config, "lm")  # every field, before the slow imports
    logging.get_absl_handler().addFilter(runlog.QuietOrbax())
    runlog.print_summary(run(FLAGS.config, FLAGS.workdir), SUMMARY_KEYS)


if __name__ == "__main__":
    _define_flags()
    cli.run(main, "configs/lm.py", rules.describer("lm"))
