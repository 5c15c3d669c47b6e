"""Ctrl-C (SIGINT) or SIGTERM (a scheduler's time limit, ``kill``) from the first line of a
main to its last: one line on stderr and exit code 130.

A main calls :func:`install` before it imports anything else. Until the run's own handling
takes over around the training loop (:func:`experiments.runlog.deferred_interrupt`), either
signal ends the process at once: what a run writes is written atomically, so re-running
resumes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import NoReturn

EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)
MESSAGE = (
    "interrupted: re-run the same command to resume; it goes on from whatever this run "
    "completed (checkpoints, measurements, finished runs)."
)


def exit_now(message: str | None = MESSAGE, code: int = EXIT_INTERRUPTED) -> NoReturn:
    """Flush stdout and stderr, write ``message`` (if any) on stderr and end the process with
    ``code`` by ``os._exit``: no ``KeyboardInterrupt`` travels through JAX and no interpreter
    finalization tears XLA down while its threads run."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or the interrupted code was writing
            stream.flush()
    try:
        if message is not None:
            os.write(2, (message + "\n").encode())  # unbuffered: safe inside a signal handler
    finally:
        os._exit(code)


def install(message: str = MESSAGE) -> None:
    """Make SIGINT and SIGTERM call :func:`exit_now` with ``message`` (main thread only;
    elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, lambda signum, frame: exit_now(message))
