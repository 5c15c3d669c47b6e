"""What the command-line mains share: the project's error type and one-line error reports.

A mistake a user can fix (a missing file, an unknown variant, a bad value) raises
:class:`UserError` (or ``FileNotFoundError``/``PermissionError``/a full disk) with a message
that names the problem and the fix. :func:`main` turns those into one line on stderr and exit
code 2; anything else is a bug and keeps its traceback. ``--verbose`` (or ``GNS_VERBOSE=1``)
keeps tracebacks for everything.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

__all__ = ["UserError", "main", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A problem with the user's input or environment, with the fix in its message."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, UserError | FileNotFoundError | PermissionError | IsADirectoryError):
        return True
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({e.filename or e}): free space or choose another --workdir"
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.filename:
        return f"{e.strerror or e}: {e.filename}"
    return " ".join(str(e).split()) or type(e).__name__


def main(fn: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl ``main(argv)``: user errors print ``error: ...`` (and ``hint: ...``) on
    stderr and exit with code 2, without a traceback."""

    def wrapped(argv):
        verbose = "--verbose" in sys.argv or os.environ.get("GNS_VERBOSE") == "1"
        try:
            return fn(argv)
        except KeyboardInterrupt:
            print(
                "interrupted: the run saved what it had; re-run the command to resume.",
                file=sys.stderr,
            )
            sys.exit(130)
        except BaseException as e:
            if verbose or not _is_user_error(e):
                raise
            print(f"error: {_one_line(e)}", file=sys.stderr)
            if getattr(e, "hint", None):
                print(f"hint: {e.hint}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapped
