"""One-line errors for the command-line tools, shared by every `cmdcl-*` CLI.

An expected failure becomes one line on stderr (the first line of the
exception's message, or its type name when the message is empty) and an exit
status; `--debug` shows the traceback. Each tool keeps its own prefix and exit
status (see the callers).
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from typing import NoReturn

import click

ERRORS = (ValueError, OSError, ImportError)  # clean_errors also handles VideoError (ManifestError, CheckpointError are ValueErrors)


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


def fail(prog: str, message: str, code: int = 1, debug: bool = False, exc: BaseException | None = None, *,
         reraise: bool = False, label: str | None = "error") -> NoReturn:
    """Echo `prog: label: message` (or `prog: message` with label=None) to stderr and exit with `code`.

    With `debug` and an exception: `reraise` lets the exception through instead (Python's traceback,
    exit status 1); otherwise its traceback is printed before the line.
    """
    if debug and exc is not None:
        if reraise:
            if exc is sys.exc_info()[1]:
                raise  # called from the except block: re-raise without adding this frame
            raise exc
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    click.echo(f"{prog}: {label}: {message}" if label else f"{prog}: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def clean_errors(debug: bool, errors: tuple = ERRORS):
    """Turn expected failures (bad input files, missing extras) into one-line
    click errors (`Error: ...`, exit status 1); `--debug` lets the traceback through."""
    from cmdcl.data.video import VideoError

    try:
        yield
    except (*errors, VideoError) as exc:
        if debug:
            raise
        raise click.ClickException(first_line(exc)) from None
