"""The record of a run: strict JSON files (non-finite floats as ``null``, written atomically),
the metrics log, the workdir lock, the clock, the checkpoints and Ctrl-C at a step boundary.

A checkpoint at step ``s`` is saved only after the row of step ``s``; resuming from it drops the
later rows and restores the clock, the best score and the target crossing, so a resumed run
reports what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging as std_logging
import math
import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import logging

from experiments import cli, download, interrupt
from experiments import events as events_lib
from experiments.cli import UserError
from gns.common import to_json

LOCK_FILE = ".lock"
KIND_FILE = "kind"  # what kind of run the workdir holds (workdir_lock)
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints-unreadable"


def dumps(obj: Any, **kwargs) -> str:
    """One strict-JSON string (non-finite floats as ``null``)."""
    return json.dumps(to_json(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as strict JSON atomically (:func:`experiments.download.atomic_file`)."""
    with download.atomic_file(path) as f:
        f.write((dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any:
    """The parsed JSON file at ``path``."""
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines file (``[]`` when it does not exist); a torn last line (killed
    run) is skipped with a warning."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in filter(None, map(str.strip, f)):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("Skipping a malformed line of %s: %r", path, line[:80])
    return rows


# The longest path a run writes below its workdir (an orbax checkpoint's temporary files in a
# sweep's pilot directory take about 130 characters), and the system's limit on a whole path.
DEEPEST_PATH = 256
PATH_MAX = os.pathconf("/", "PC_PATH_MAX")


def check_workdir(workdir: str, kind: str | None = None) -> None:
    """A :class:`UserError` when ``workdir`` cannot hold the run: empty, a file, a path too
    long for the checkpoints under it, or (with ``kind``) holding another kind of run. Reads
    only: a main calls it before the minutes of loading its data, :func:`workdir_lock` again."""
    if not workdir:
        raise UserError("--workdir is empty", hint="pass a directory, e.g. --workdir=runs/cpu")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(
            f"--workdir {workdir} is a file, not a directory",
            hint="pass a directory (it is created when missing)",
        )
    if len(full := os.path.abspath(workdir)) + DEEPEST_PATH > PATH_MAX:
        raise UserError(
            f"--workdir is {len(full)} characters long: the checkpoints under it need up to "
            f"{DEEPEST_PATH} more, past this system's {PATH_MAX}-character path limit",
            hint="pick a shorter path",
        )
    held = os.path.join(workdir, KIND_FILE)
    if kind is not None and os.path.isfile(held):
        with open(held) as f:
            if (was := f.read().strip()) != kind:
                raise UserError(
                    f"{workdir} holds a {was} run, not a {kind} one: this run would overwrite "
                    "its files",
                    hint="pass another --workdir",
                )


@contextlib.contextmanager
def workdir_lock(workdir: str, kind: str | None = None):
    """Hold ``workdir`` (created when missing) with an advisory ``flock`` on ``workdir/.lock``,
    released however the holder exits: a second run there stops at once, naming the holder's
    pid. A ``.lock`` that is a link or a special file stops the run. With ``kind`` (e.g.
    ``"cifar10 training"``, ``"sweep"``), a workdir that holds another kind of run, whose files
    this one would overwrite, stops it too (:func:`check_workdir`); else ``kind`` is recorded."""
    check_workdir(workdir, kind)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    refuse = UserError(
        f"{path} is not a plain lock file (a symbolic link, a hard link or a special file): "
        "refusing to write to it",
        hint=f"delete {path} (a run creates its own), or pass another --workdir",
    )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise refuse from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise refuse
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"another run (pid {holder}) is using the workdir {workdir}",
                hint="wait for it to finish, stop it, or pass another --workdir",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if kind is not None:  # again under the lock: another kind of run may have just begun
            check_workdir(workdir, kind)
            if not os.path.isfile(path := os.path.join(workdir, KIND_FILE)):
                with download.atomic_file(path) as f:
                    f.write(kind.encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def fingerprint(fields: dict) -> str:
    """A short stable hash of ``fields`` (canonical strict JSON): equal fields, equal hash."""
    text = dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differing_fields(old: dict, new: dict) -> list[str]:
    """Dotted names of the fields whose values differ between two nested dicts, e.g.
    ``['batch_size: 64 -> 128', 'data.num_train: None -> 512']``."""
    a, b = dict(cli.config_fields(to_json(old))), dict(cli.config_fields(to_json(new)))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


class Clock:
    """Where a run's time goes: from :meth:`charge` on, time counts as one of :data:`KINDS`
    (``train``: data and steps, read after the device finished them; ``eval``; ``compile``;
    ``pause``: everything else). The totals continue across resumed legs through
    :meth:`state` and ``totals``."""

    KINDS = ("train", "eval", "compile", "pause")

    def __init__(self, totals: dict | None = None):
        totals = totals or {}
        self._totals = {k: float(totals.get(f"{k}_time_s") or 0.0) for k in self.KINDS}
        self._kind: str | None = None
        self._since = 0.0

    def charge(self, kind: str) -> None:
        """Charge the time from now on to ``kind``."""
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r}: use one of {', '.join(self.KINDS)}.")
        now = time.perf_counter()
        if self._kind is not None:
            self._totals[self._kind] += now - self._since
        self._kind, self._since = kind, now

    def total(self, kind: str) -> float:
        """Seconds charged to ``kind`` so far, the running stretch included."""
        running = time.perf_counter() - self._since if self._kind == kind else 0.0
        return self._totals[kind] + running

    def state(self) -> dict[str, float]:
        """``{'train_time_s', 'eval_time_s', 'compile_time_s', 'pause_time_s'}``."""
        return {f"{k}_time_s": self.total(k) for k in self.KINDS}


@dataclasses.dataclass(eq=False)
class RunLog:
    """The record of one training run in ``workdir``: identity, clock, best and target,
    initial loss and the metrics rows, saved with (and restored from) its checkpoints
    (:meth:`meta`, :meth:`resume`; ``experiments.train`` shows the order of the calls).

    ``target``: the score (higher is better) that reaches the target, on the mean of the last
    ``window`` periodic evaluations; ``primary``: whether this process writes the files (other
    hosts keep the record in memory); ``devices``: a resume on another number is refused.
    """

    workdir: str
    target: float | None = None
    _: dataclasses.KW_ONLY
    window: int = 1
    primary: bool = True
    devices: int | None = None

    def __post_init__(self):
        self._rows: list[dict] = []  # the metrics rows, as metrics.jsonl holds them
        self.metrics_path = os.path.join(self.workdir, METRICS_FILE)
        self.config_path = os.path.join(self.workdir, CONFIG_FILE)
        self.data: dict | None = None  # the data's record, set once loaded (checked like devices)
        self.identity: dict | None = None
        self.events = events_lib.EventLog(self.workdir)  # TensorBoard files (primary only)
        self.resume(0, None, truncate=False)

    def check_identity(self, config: dict, identity: Callable, *, resuming: bool) -> None:
        """Stop when the run to resume (``resuming``: there is a checkpoint) was trained with
        a config whose ``identity`` (``config -> dict`` of the fields that change the results)
        differs."""
        self.identity = to_json(identity(config))  # also checked against the checkpoint
        if not resuming or not os.path.exists(self.config_path):
            return
        try:
            old = read_json(self.config_path)
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot read {self.config_path} to check the run to resume ({e})",
                hint=f"delete {self.workdir} to start over, or pass another --workdir",
            ) from None
        self.check_meta({"identity": identity(old)})

    def check_meta(self, meta: dict) -> None:
        """A :class:`UserError` when a checkpoint's metadata has another identity, data record
        or number of devices than this run (one record would mix two setups)."""
        old_devices = meta.get("devices")
        for key, old, new, what, hint in (  # key "": the identity's fields, unprefixed
            (
                "",
                meta.get("identity"),
                self.identity,
                "with a different config",
                f"pass another --workdir to start a new run, delete {self.workdir} to start over, "
                "or re-run with the old values to resume",
            ),
            (
                "data",
                meta.get("data"),
                self.data,
                "trained on other data (the source behind the config's data fields changed)",
                "resume with the original data, or pass "
                "another --workdir to start a new run on these",
            ),
            (
                "devices",
                old_devices,
                self.devices,
                "trained on another number of devices (the batch would split differently)",
                f"resume on {old_devices} device(s) with config.num_devices as it was (None: "
                "every device the process sees; on a CPU XLA_FLAGS="
                f"--xla_force_host_platform_device_count={old_devices}), or pass another "
                "--workdir to start a new run",
            ),
        ):
            if old is None or new is None:
                continue
            if diffs := differing_fields({key: old} if key else old, {key: new} if key else new):
                raise UserError(f"{self.workdir} holds a run {what}: {'; '.join(diffs)}", hint)

    def write_config(self, config: dict) -> None:
        """Write ``config.json`` (after :meth:`check_identity` and :meth:`resume`)."""
        if self.primary:
            write_json(self.config_path, config)

    def resume(self, step: int, meta: dict | None, *, truncate: bool = True) -> list[dict]:
        """Continue the record of the checkpoint at ``step`` with metadata ``meta`` (``0`` and
        ``None``: a fresh run), :meth:`check_meta` first; returns the rows kept (those after
        ``step`` are dropped)."""
        meta = meta or {}
        self.check_meta(meta)
        self.step = int(step)
        self.examples_seen = int(meta.get("examples_seen") or 0)
        self.clock = Clock(meta.get("clock"))
        self.best = dict(meta.get("best") or {"accuracy": None, "step": None, "time_s": None})
        self.to_target = dict(meta.get("to_target") or {"steps": None, "time_s": None})
        recent = meta.get("recent_evals") or []  # null: a non-finite score
        self.recent_evals = [math.nan if x is None else float(x) for x in recent][-self.window :]
        self.initial_loss = meta.get("initial_loss")
        self.start = meta.get("start")  # where the run began when not from scratch (a pilot)
        self.diverged: str | None = None
        self._last_row = (self.clock.total("train"), self.examples_seen)
        if not truncate:
            return []
        rows = read_jsonl(self.metrics_path)
        stepped = [r for r in rows if isinstance(r, dict) and type(r.get("step")) is int]
        if len(stepped) < len(rows):
            logging.warning(
                "Dropping %d rows of %s without an integer step (not rows of a run).",
                len(rows) - len(stepped),
                self.metrics_path,
            )
        self._rows = [r for r in stepped if r["step"] <= step]
        if self.primary:
            with download.atomic_file(self.metrics_path) as f:
                f.write("".join(dumps(r) + "\n" for r in self._rows).encode())
            self.events.reset(self._rows)
        return self.rows()

    def meta(self) -> dict:
        """What a checkpoint stores besides the state: the inverse of :meth:`resume`."""
        keys = "step examples_seen best to_target recent_evals initial_loss identity devices data"
        meta = {k: getattr(self, k) for k in (*keys.split(), "start")}
        return to_json(meta | {"clock": self.clock.state()})

    def advance(self, batch_size: int) -> None:
        """One optimizer step of ``batch_size`` examples was taken."""
        self.step += 1
        self.examples_seen += int(batch_size)

    @property
    def reached(self) -> bool:
        """Whether the run has reached the target (:meth:`record_eval`)."""
        return self.to_target["steps"] is not None

    def record_eval(self, score: float, *, periodic: bool = True) -> bool:
        """Track the best and the target of a higher-is-better ``score`` at the current step;
        returns whether the mean of the last ``window`` periodic scores reaches ``target`` for
        the first time. A final evaluation (``periodic=False``) updates the best and, with
        ``window`` 1 only, can reach the target."""
        t = self.clock.total("train")
        if self.best["accuracy"] is None or score > self.best["accuracy"]:
            self.best = {"accuracy": score, "step": self.step, "time_s": t}
        if periodic:
            self.recent_evals = [*self.recent_evals, float(score)][-self.window :]
        last = self.recent_evals if periodic else [float(score)]
        mean = sum(last) / len(last) if len(last) == self.window else math.nan
        if self.target is None or self.reached or not mean >= self.target:
            return False
        self.to_target = {"steps": self.step, "time_s": t}
        return True

    def check_losses(self, losses, factor: float | None) -> str | None:
        """Divergence check of the training losses since the last row: sets and returns
        :attr:`diverged`, a message, when a loss is not finite or exceeds ``factor`` (``None``:
        no bound) times the run's first loss; else ``None``."""
        losses = [float(x) for x in losses]
        if self.initial_loss is None and losses:
            self.initial_loss = losses[0]
        for loss in losses:
            if not math.isfinite(loss):
                self.diverged = f"the training loss is {loss} (initial {self.initial_loss:.4g})"
            elif factor is not None and loss > factor * self.initial_loss:
                self.diverged = (
                    f"the training loss {loss:.4g} exceeds {factor:g} x the initial "
                    f"{self.initial_loss:.4g} (config.divergence_factor)"
                )
            if self.diverged:
                return self.diverged
        return None

    def row(self, **metrics) -> dict:
        """A metrics row of the current step: ``step``, ``examples_seen``, ``wall_time_s``
        (training time), ``examples_per_s`` since the last row, and ``metrics``."""
        t = self.clock.total("train")
        dt, dn = t - self._last_row[0], self.examples_seen - self._last_row[1]
        self._last_row = (t, self.examples_seen)
        return {
            "step": self.step,
            "examples_seen": self.examples_seen,
            "wall_time_s": t,
            "examples_per_s": dn / max(dt, 1e-9),
            **metrics,
        }

    def write_row(self, row: dict) -> None:
        """Append ``row`` to the record and (primary process) to ``metrics.jsonl`` and the
        TensorBoard files."""
        line = dumps(row)
        self._rows.append(json.loads(line))
        if self.primary:
            with open(self.metrics_path, "a") as f:
                f.write(line + "\n")
            self.events.write(self._rows[-1])

    def close(self) -> None:
        """Close the TensorBoard files."""
        self.events.close()

    def rows(self) -> list[dict]:
        """The metrics rows written so far."""
        return list(self._rows)


class Checkpoints(contextlib.AbstractContextManager):
    """Orbax checkpoints of a run's state and :meth:`RunLog.meta` in ``workdir/checkpoints``;
    the last two are kept, so that :meth:`restore` falls back to the previous one when the
    latest is unreadable (moved to ``checkpoints-unreadable/``)."""

    def __init__(self, workdir: str):
        import orbax.checkpoint as ocp

        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self._remove_partial()  # a save killed midway (a second Ctrl-C): nothing to resume
        options = ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release orbax's manager (its threads), as ``with Checkpoints(...)`` does on exit."""
        self._manager.close()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save ``state`` and ``meta`` at ``step`` (no-op when that step is saved); a full,
        read-only or unwritable disk raises :class:`UserError` (the previous ones stay)."""
        import orbax.checkpoint as ocp

        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(to_json(meta))
        )
        try:
            self._manager.save(step, args=args)
            self._manager.wait_until_finished()
        except Exception as e:
            fault = cli.write_fault(e)
            if fault is None:
                raise
            self._remove_partial(step)
            raise UserError(
                f"cannot write the checkpoint of step {step} in {self.directory}: {fault} "
                f"({type(e).__name__}: {' '.join(str(e).split())[:160]})",
                hint="free space there (or fix its permissions) or pass another --workdir; "
                "re-running the command resumes from the last checkpoint",
            ) from e

    def _remove_partial(self, step: int | None = None) -> None:
        """Remove the half-written checkpoint of ``step`` (of any step: ``None``), in which
        orbax leaves a killed or failed save (``<step>.orbax-checkpoint-tmp*``)."""
        import jax

        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        tag = ".orbax-checkpoint-tmp"
        for name in os.listdir(self.directory):
            if tag in name and (step is None or name.startswith(f"{step}{tag}")):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def restore(
        self, target: Any, check: Callable | None = None, set_aside: bool = True
    ) -> tuple[Any, dict | None]:
        """The newest readable checkpoint as ``(state, meta)`` shaped like ``target``
        (``(None, None)``: none), ``check(meta)`` called before the state is read; a
        :class:`UserError` when there are checkpoints but none is readable, or (not
        ``set_aside``: another run's directory, left as it is) when the newest is not."""
        import jax
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        steps = sorted(self._manager.all_steps(), reverse=True)
        for step in steps:
            try:
                meta = dict(self._read(step, meta=ocp.args.JsonRestore()).meta)
                if check is not None:
                    check(meta)
                return self._read(step, state=ocp.args.StandardRestore(abstract)).state, meta
            except UserError:  # check refused the checkpoint's run: stop
                raise
            except Exception as e:  # unreadable: fall back to the previous one
                _ignore_closed_loop_callbacks()
                if not set_aside:
                    raise UserError(
                        f"the checkpoint of step {step} in {self.directory} does not restore "
                        f"into this run's state ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]})",
                        hint="it was written by another model or setup (e.g. adaptive.enabled "
                        "adds the schedule's state): start from a checkpoint of this config",
                    ) from e
                self._set_aside(step, e)
        if steps:
            raise UserError(
                f"no readable checkpoint in {self.directory} (set aside in {UNREADABLE_DIR}/)",
                hint="pass another --workdir or delete this one to start over",
            )
        return None, None

    def _read(self, step: int, **items):
        """The ``items`` of the checkpoint at ``step``, with logging off meanwhile (orbax logs
        the traceback of an unreadable one)."""
        import orbax.checkpoint as ocp

        std_logging.disable(std_logging.CRITICAL)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        finally:
            std_logging.disable(std_logging.NOTSET)

    def _set_aside(self, step: int, error: Exception) -> None:
        """Move the unreadable checkpoint out of the way (kept, for a post-mortem)."""
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR, str(step))
        shutil.rmtree(dst, ignore_errors=True)  # an older copy of this step
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        self._manager.reload()
        logging.warning(
            "The checkpoint at step %d is unreadable (%s: %s); moved it to %s and "
            "falling back to the previous one.",
            step,
            type(error).__name__,
            " ".join(str(error).split())[:200],
            dst,
        )


def _ignore_closed_loop_callbacks() -> None:
    """Drop the "Event loop is closed" errors of a failed orbax read: its other reads still
    in flight complete after orbax closed their asyncio loop, and each would print a
    traceback (through ``sys.unraisablehook``) although nothing is lost."""
    previous = sys.unraisablehook
    if getattr(previous, "ignores_closed_loop", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.ignores_closed_loop = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def deferred_interrupt():
    """Inside the block the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's time limit) sets
    the yielded ``threading.Event`` instead of raising, so the loop stops at a step boundary
    with its row and checkpoint written; a second one goes to the handler the block replaced
    (exit 130 at once). Outside the main thread the event never gets set."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in interrupt.SIGNALS}

    def handler(signum, frame):
        if flag.is_set():
            for sig, before in previous.items():
                signal.signal(sig, before)
            signal.raise_signal(signum)
        flag.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
