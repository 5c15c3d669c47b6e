"""The one training main (``gns train``, ``python -m experiments.cifar10`` and ``.lm``)::

    python -m experiments.run --config configs/teacher.py:smoke --workdir /tmp/teacher

Re-running the same command resumes; Ctrl-C stops with everything saved (exit code 130); a
mistake prints one line and a hint (exit code 2).
"""

from __future__ import annotations

from experiments import interrupt

if __name__ == "__main__":  # first: Ctrl-C during the imports exits with one line, 130
    interrupt.install()

from absl import flags, logging

from experiments import cli, report, rules, runlog, tasks
from experiments.cli import UserError

FLAGS = flags.FLAGS


def check_mode(config) -> str:
    """``config.mode`` (``train`` for a config without it, e.g. a sweep's), when the config's
    task has it (only images have the other modes)."""
    task, mode = tasks.get(config), config.get("mode", "train")
    if "mode" not in config:
        logging.warning(
            "%s",
            cli.for_user(
                "This config has no config.mode: a sweep's. Training its setup once; for the "
                "sweep itself run python -m experiments.sweep with the same --config and --workdir"
            ),
        )
    if mode not in task.modes:
        raise UserError(
            f"config.mode={mode!r} is not available for the {task.name!r} task: use one of "
            f"{', '.join(task.modes)}",
            hint="e.g. --config.mode=train",
        )
    return mode


def run(config, workdir: str) -> dict:
    """Run ``config.mode`` (:mod:`experiments.train` or :mod:`experiments.compare`); returns
    its summary."""
    mode = check_mode(config)
    if mode == "train":
        from experiments import train

        return train.train_and_evaluate(config, workdir)
    from experiments import compare

    return (compare.run_tradeoff if mode == "tradeoff" else compare.run_compare)(config, workdir)


def main(_):
    summary = run(FLAGS.config, FLAGS.workdir)
    if summary.get("mode") in ("compare", "tradeoff"):
        print(cli.for_user(report.mode_summary(summary)))
        return
    task = tasks.get(FLAGS.config)
    keys = ["test_loss", f"test_{task.metric}", f"train_{task.metric}", "wall_time_s", "steps"]
    keys += ["epochs", "stop_reason", "noise_scale", "warnings"]
    if summary.get(task.target_field) is not None:  # the target, and whether it was reached
        keys[2:2] = [task.target_field, "steps_to_target", "time_to_target_s"]
    print(runlog.dumps({k: summary.get(k) for k in keys}, indent=2))  # a missing key: null


def start(config_file: str, argv: list[str] | None = None) -> None:
    """Run :func:`main` on the command line (``config_file``: what ``--help`` describes
    without ``--config``)."""
    cli.run(
        main,
        config_file,
        rules.describer(tasks.table),
        lambda config: rules.check(config, tasks.table(config)),
        workdir="metrics, checkpoints and plots",
        argv=argv,
    )


if __name__ == "__main__":
    start("configs/cifar10.py")
