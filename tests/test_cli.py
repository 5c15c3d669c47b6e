"""Tests of experiments/cli.py and the main of experiments/cifar10.py: every user mistake ends
in one line (plus a hint) on stderr and exit code 2, without a traceback.

The mistakes caught while absl parses the flags run the real command, each in its own process
(forked from one interpreter that imported the entry points' dependencies once:
``tests/conftest.py``, ``run_commands``); the later ones call the wrapped main in-process."""

import errno
import os
import subprocess
import sys
import tempfile

import pytest

from configs import cifar10 as cifar10_config
from experiments import cifar10, cli, data, runlog
from experiments.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_one_line(stderr: str, *needles: str) -> None:
    lines = [ln for ln in stderr.splitlines() if not ln.startswith(("I", "W")) or ":" not in ln]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    for needle in needles:
        assert needle in stderr, (needle, stderr)


SMOKE = "--config=configs/cifar10.py:smoke"


MISTAKES = {
    "no_file": (["--config=configs/nosuch.py:smoke"], ["config file not found: configs/nosuch.py"]),
    "variant": (["--config=configs/cifar10.py:huge"], ["variant 'huge'", "smoke"]),
    "old_variant": (["--config=configs/cifar10.py:seed"], ["variant 'seed'", "effnet_lamb"]),
    "field": ([SMOKE, "--config.nosuchfield=1"], ["unknown config field --config.nosuchfield"]),
    "task": ([SMOKE, "--config.task=teacher"], ["no field --config.task", "configs/teacher.py"]),
    "nested_field": ([SMOKE, "--config.data.sourse=x"],
                     ["--config.data.sourse", "did you mean --config.data.source?"]),
    "value": ([SMOKE, "--config.batch_size=abc"],
              ["--config.batch_size=abc", "hint: see --help for the config's fields"]),
    "mode": ([SMOKE, "--config.mode=trian"], ["config.mode='trian'", "train"]),
    "not_config": (["--config=configs/common.py"],
                   ["configs/common.py has no get_config(): not a config file"]),
    "summary": ([SMOKE, "--config.mode=compare", "--config.compare.tradeoff_summary=/no/x.json",
                 "--config.compare.policies=('default','best_measured')"],
                ["config.compare.tradeoff_summary='/no/x.json' does not exist"]),
    "baseline": ([SMOKE, "--config.mode=compare", "--config.compare.baseline_batch_size=1024",
                  "--config.data.source=synthetic"],
                 ["config.compare.baseline_batch_size=1024", "--config.compare.baseline_batch"]),
    "group": ([SMOKE, "--config.model=mlp"],
              ["--config.model is a group of fields", "--config.model.FIELD="]),
    "flag": ([SMOKE, "--nosuchflag"], ["nosuchflag", "hint: see --help for this command's"]),
    **{f"{mode}_data": ([SMOKE, f"--config.mode={mode}", "--config.data.source=folder",
                         "--config.data.path=/no/such/dir"],
                        ["data.path='/no/such/dir' does not exist"])
       for mode in ("compare", "tradeoff")},  # the data, checked before the workdir is made
}  # fmt: skip


@pytest.fixture(scope="module")
def ran(commands, tmp_path_factory):
    """Every command of this module, run once: ``(name -> completed process, directory)``;
    the command ``name`` had ``--workdir=directory/name``."""
    tmp = tmp_path_factory.mktemp("commands")
    args = {name: a for name, (a, _) in MISTAKES.items()}
    args["verbose"] = ["--config=configs/cifar10.py:huge", "--verbose"]
    runs = [
        ("experiments.cifar10", [*a, f"--workdir={tmp / name}"], ROOT) for name, a in args.items()
    ]
    return dict(zip(args, commands(runs, tmp), strict=True)), tmp


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", list(MISTAKES))
def test_command_line_mistakes_are_one_line_with_exit_2(ran, name):
    res = ran[0][name]
    assert res.returncode == cli.EXIT_USER_ERROR, res.stderr
    assert_one_line(res.stderr, *MISTAKES[name][1])
    assert not os.path.exists(ran[1] / name)


@pytest.mark.timeout(240)
def test_verbose_keeps_the_traceback(ran):
    res = ran[0]["verbose"]
    assert res.returncode != 0 and "Traceback" in res.stderr and "'huge'" in res.stderr


def run_main(capsys, config, workdir: str) -> list[str]:
    """The wrapped main in-process: returns the stderr lines; asserts exit code 2."""
    with pytest.raises(SystemExit) as e:
        cli.main(lambda argv: cifar10.run(config, workdir))(["cifar10"])
    assert e.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


def smoke(**fields):
    config = cifar10_config.get_config("smoke")
    config.update_from_flattened_dict({"data.source": "synthetic", **fields})
    return config


def test_bad_data_path(tmp_path, capsys):
    config = smoke(**{"data.source": "folder", "data.path": str(tmp_path / "missing.tar.gz")})
    err = run_main(capsys, config, str(tmp_path / "w"))
    assert err[0].startswith("error: ") and "missing.tar.gz" in err[0] and len(err) <= 2


def test_unwritable_workdir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = run_main(capsys, smoke(), str(blocker / "w"))  # a workdir under a plain file
    assert err[0] == f"error: Not a directory: {blocker / 'w'}"
    assert err[1].startswith("hint: pick a path of directories, or pass another --workdir")


def test_full_disk(tmp_path, capsys, monkeypatch):
    def full(cfg):  # as when the decoded images are cached on a full disk
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/cifar10.npz")

    monkeypatch.setattr(data, "load", full)
    err = run_main(capsys, smoke(), str(tmp_path / "w"))
    assert (
        err[0]
        == "error: the disk is full (/cache/cifar10.npz): free space there or write elsewhere"
    )
    assert not os.path.exists(tmp_path / "w" / runlog.CONFIG_FILE)


def test_bugs_keep_their_traceback(capsys):
    def bug(argv):
        raise ZeroDivisionError("a bug")

    def mistake(argv):
        raise UserError("bad  value\n of x", hint="fix it")

    with pytest.raises(ZeroDivisionError):
        cli.main(bug)(["x"])
    with pytest.raises(SystemExit):  # while a user error is one line
        cli.main(mistake)(["x"])
    assert capsys.readouterr().err == "error: bad value of x\nhint: fix it\n"


def test_workdir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    err = run_main(capsys, smoke(), str(blocker))
    assert err[0] == f"error: --workdir {blocker} is a file, not a directory"
    assert len(err) == 2 and err[1].startswith("hint: ") and blocker.read_text() == "keep"
    assert run_main(capsys, smoke(), "")[0] == "error: --workdir is empty"
    # A path so long that the checkpoints under it could not be written: refused, none made.
    deep = str(tmp_path / "/".join(["d" * 200] * (runlog.PATH_MAX // 201)))
    err = run_main(capsys, smoke(), deep)
    assert "the checkpoints under it need up to" in err[0] and err[1] == "hint: pick a shorter path"
    assert not os.path.exists(tmp_path / ("d" * 200))


WRITE_FAULTS = [
    (OSError(errno.EROFS, "Read-only file system", "/w/config.json"), "Read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/w/.lock"), "Permission denied: /w/.lock"),
    (ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space"), "the disk is full"),
    (ImportError("sys.meta_path is None, Python is likely shutting down"), "cut short"),
    (ValueError("PERMISSION_DENIED: Error opening file"), "no permission to write there"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "/w/" + "a" * 300), "File name too long"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 26 bytes."), "ran out of memory"),
]


@pytest.mark.parametrize("fault, needle", WRITE_FAULTS, ids=lambda x: type(x).__name__)
def test_write_faults_anywhere_are_one_line(capsys, fault, needle):
    def main(argv):
        raise fault

    with pytest.raises(SystemExit) as e:
        cli.main(main)(["x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == cli.EXIT_USER_ERROR and needle in err[0], err
    # One line and the fix (the device's memory is not the disk: its line says the fix).
    hint = [] if cli.out_of_memory(fault) else ["hint: "]
    assert [line[:6] for line in err[1:]] == hint, err


@pytest.mark.parametrize("fault, needle", WRITE_FAULTS[2:5], ids=["full", "shutdown", "denied"])
def test_checkpoint_write_faults_are_user_errors(tmp_path, monkeypatch, fault, needle):
    """orbax/tensorstore report a full disk as ValueError or ImportError, not OSError."""
    import numpy as np
    import orbax.checkpoint as ocp

    def failing_save(self, *args, **kwargs):
        os.makedirs(os.path.join(ckpt.directory, "1.orbax-checkpoint-tmp", "state"))
        raise fault

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    ckpt = runlog.Checkpoints(str(tmp_path))
    with pytest.raises(UserError) as e:
        ckpt.save(1, {"x": np.zeros(2)}, {})
    assert needle in str(e.value) and "step 1" in str(e.value) and "--workdir" in e.value.hint
    assert ckpt.latest_step() is None
    assert os.listdir(ckpt.directory) == []  # the half-written step is not left behind


def test_bugs_that_mention_no_fault_keep_their_traceback():
    assert cli.write_fault(ValueError("shapes (2,) and (3,) differ")) is None
    assert cli.write_fault(OSError(errno.ENOSPC, "No space")) == "the disk is full"
    assert cli.write_fault(WRITE_FAULTS[-1][0]) is None  # the device's memory, not the disk


def test_an_installed_user_is_shown_the_gns_command(monkeypatch):
    """Help, hints and summaries name the repository's commands (make, python -m); run as the
    installed ``gns SUBCOMMAND``, they name what that user can run."""
    text = (
        "python -m experiments.cifar10 --config configs/cifar10.py:smoke; "
        "python -m experiments.sweep --config X; make demo DEMO_CONFIG=configs/cifar10.py:cpu; "
        "make demo DATA=a/b.tar.gz; make bench"
    )
    monkeypatch.delenv("GNS_COMMAND", raising=False)
    assert cli.for_user(text) == text
    monkeypatch.setenv("GNS_COMMAND", "demo")
    assert cli.for_user(text) == (
        "gns train --config configs/cifar10.py:smoke; gns sweep --config X; "
        "gns demo --config configs/cifar10.py:cpu; "
        "gns demo --config.data.source=folder --config.data.path=a/b.tar.gz; gns bench"
    )
    # As a user runs it, from outside the clone: the module's usage names gns.
    monkeypatch.delenv("GNS_COMMAND")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "sweep", "--help"],
        cwd=tempfile.gettempdir(),
        env=os.environ | {"PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "gns sweep --config configs/sweep.py:smoke" in proc.stdout
    assert "python -m experiments" not in proc.stdout
