"""The package's error root and the exit statuses of its commands.

Every error the package raises on purpose derives from `CmdclError` (and keeps
its older base, e.g. `ValueError`, so that callers catching that still work):
its message is one line for the user, naming the file or option at fault.
The command-line tools (cmdcl.cli) turn it into that line and an `ExitCode`.
"""

from __future__ import annotations

from enum import IntEnum


class CmdclError(Exception):
    """An expected failure (bad model, input or output file, missing extra): its message is the line the user sees."""


class ExitCode(IntEnum):
    """The exit status of every `cmdcl-*` command (the README's table is this one).

    0 success; 1 the command failed (a bad model, config or input file, a clashing output, a missing extra, a server
    that stopped, an unexpected error); 2 bad options (click's own code for usage errors); 3 the command ran but some
    inputs failed or some answers mismatched (cmdcl-run, cmdcl-client), each reported on its own line; 130 interrupted
    (Ctrl-C); 143 terminated (SIGTERM), both 128 + the signal's number, as a shell reports a process the signal ended.
    """

    OK = 0
    FAILED = 1
    USAGE = 2
    INPUTS_FAILED = 3
    INTERRUPTED = 130
    TERMINATED = 143


def first_line(exc_or_text: BaseException | str) -> str:
    """The first line of a message; an exception with an empty message gives its type name."""
    text = str(exc_or_text).strip()
    if text:
        return text.splitlines()[0]
    return type(exc_or_text).__name__ if isinstance(exc_or_text, BaseException) else ""


def describe(exc: BaseException, known: tuple | type | None = None) -> str:
    """`first_line(exc)`; with `known`, an exception of another type is marked as unexpected."""
    message = first_line(exc)
    if known is not None and not isinstance(exc, known):
        message = f"unexpected {type(exc).__name__}: {message} (rerun with --debug for the traceback)"
    return message
