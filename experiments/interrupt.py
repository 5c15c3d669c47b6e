"""Ctrl-C from the first line of a main to its last: one line on stderr and exit code 130.

(Before the main's first line runs, during the interpreter's own start-up, a few tens of
milliseconds on an idle machine, Python's default handler is the only one there is.)

A main installs :func:`install` before it imports anything else (standard library only here,
so the handler is in place before JAX loads). Until the run's own handling takes over
(:func:`experiments.runlog.deferred_interrupt`, around the training loop) a SIGINT ends the
process at once with :func:`exit_now`: everything a run writes outside that block is written
atomically (temporary file, then rename), so stopping there loses nothing but the unfinished
step, as a SIGKILL would, and re-running the command resumes.

:func:`exit_now` leaves with ``os._exit`` after flushing the output: no ``KeyboardInterrupt``
travels through JAX (where a garbage-collection callback swallows it, or a C++ frame aborts
on it) and no interpreter finalization tears XLA down while its threads still run (which can
crash).

Example (the top of a main module)::

    from experiments import interrupt

    if __name__ == "__main__":
        interrupt.install()

    import jax  # a Ctrl-C from here on: one line, exit 130
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

__all__ = ["EXIT_INTERRUPTED", "MESSAGE", "install", "exit_now"]

EXIT_INTERRUPTED = 130
MESSAGE = "interrupted: the run saved what it had; re-run the command to resume."


def exit_now(message: str | None = MESSAGE, code: int = EXIT_INTERRUPTED) -> NoReturn:
    """Flush stdout and stderr, write ``message`` (if any) on stderr and end the process with
    ``code``, without running Python's finalizers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream, or one the interrupted code was writing to
            pass
    try:
        if message is not None:
            os.write(2, (message + "\n").encode())  # unbuffered: safe inside a signal handler
    finally:
        os._exit(code)


def _handler(signum, frame) -> NoReturn:
    exit_now()


def install() -> None:
    """Make SIGINT call :func:`exit_now` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
