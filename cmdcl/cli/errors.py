"""The one error path of every `cmdcl-*` command.

Inside `cli_errors`, a failure becomes one line on stderr, `PROG: error: MESSAGE`
(the first line of the exception's message), and the exit status of the table in
cmdcl.errors.ExitCode: 1 for any error, 130 for Ctrl-C and 143 for SIGTERM (where
the command ends on it, see `end_on_sigterm`). An exception of a type the command
does not expect is marked as unexpected. `--debug` prints the traceback first; the
exit status stays the same. Click's own errors (bad options: exit status 2) pass.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

import click

from ..errors import CmdclError, ExitCode, describe

EXPECTED = (CmdclError, OSError, ImportError)  # a bad file, a missing extra; anything else is marked unexpected
# and the plain ValueErrors of the data, training and synthesis code (bad manifests, classes, sizes): one line too
WITH_DATA_ERRORS = (*EXPECTED, ValueError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is so that it unwinds as Ctrl-C does."""


def end_on_sigterm() -> None:
    """Let SIGTERM (docker stop, systemd, kill) end the command as Ctrl-C does: its outputs are closed and renamed into place."""
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum, frame):
    raise Terminated


def _fail(prog: str, message: str, code: int, debug: bool = False, exc: BaseException | None = None, *,
          label: str | None = "error") -> NoReturn:
    """Echo `prog: label: message` (or `prog: message` with label=None) to stderr and exit with `code`;
    with `debug`, `exc`'s traceback comes first."""
    if debug and exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    click.echo(f"{prog}: {label}: {message}" if label else f"{prog}: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def cli_errors(prog: str, debug: bool, *, prefix: str = "", expected: tuple | type = EXPECTED,
               interrupted: Callable[[], str] | None = None):
    """Every command's error handling: an exception leaving the block ends the command through `_fail`
    (`prefix` goes before its message); Ctrl-C and SIGTERM end it with `PROG: interrupted` (or
    `terminated (SIGTERM)`) followed by `interrupted()`, what the user should know about the outputs."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise  # click reports these itself (usage errors: exit status 2)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        note = interrupted() if interrupted else ""
        _fail(prog, f"{'terminated (SIGTERM)' if terminated else 'interrupted'}{note}",
              ExitCode.TERMINATED if terminated else ExitCode.INTERRUPTED, label=None)
    except Exception as exc:
        _fail(prog, prefix + describe(exc, expected), ExitCode.FAILED, debug, exc)
