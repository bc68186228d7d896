"""Output files that never destroy an input: clash checks before anything is written, atomic writes.

Every `cmdcl-*` command that writes files calls `check_outputs` first (before
a model loads or a file is opened for writing): each output is compared with
every input and every other output (resolved paths, symlinks and hard links
included; a model input with every file it brings, `artifacts.model_files`),
must lie outside the folders cmdcl reads without being told (its cache, with
the demo model's export, and the bundled assets), and must be writable.
Files are then written with `atomic_write`:
to a hidden temporary file in the same directory, renamed onto the output
only when complete, so a failed or killed command leaves the old file as it
was. An output that is a symlink is written at its target (the link stays);
one that is a device or a pipe (/dev/null, /dev/stdout, a FIFO) is written
in place, never replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import CmdclError


class OutputError(CmdclError, ValueError):
    """An output that would overwrite an input or another output, or cannot be written; one line."""


def is_path(source) -> bool:
    """Whether an input is a local path (stream URLs such as rtsp://... are not)."""
    return source is not None and "://" not in str(source)


def same_file(a, b) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) one inode (hard links)."""
    if real_path(a) == real_path(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_outputs(outputs: Iterable[tuple[str, object]], inputs: Iterable[tuple[str, object]] = ()) -> None:
    """Raise OutputError unless every output is writable and names no input and no other output.

    `outputs` and `inputs` are (description, path) pairs, e.g. ("--output", "out.jsonl") and
    ("the input", "v.mp4"); a path of None (an option not given) or a stream URL is skipped.
    """
    outputs = [(name, Path(path)) for name, path in outputs if is_path(path)]
    inputs = [(name, Path(path)) for name, path in inputs if is_path(path)]
    for i, (name, path) in enumerate(outputs):
        for other, other_path in inputs:
            if same_file(path, other_path):
                raise OutputError(f"{name} {path} is {other} {other_path}: refusing to overwrite it")
        for other, other_path in outputs[:i]:
            if same_file(path, other_path):
                raise OutputError(f"{name} {path} and {other} {other_path} are the same file")
        for what, folder in cmdcl_folders():
            if real_path(path).is_relative_to(real_path(folder)):
                raise OutputError(f"{name} {path} lies in {what} {folder}, which cmdcl reads: refusing to write there")
        check_writable(path, name)


def cache_dir() -> Path:
    """Where cmdcl keeps what it makes for itself: the demo model's export, the bench's generated videos."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "cmdcl"


def cmdcl_folders() -> list[tuple[str, Path]]:
    """Folders whose files are inputs of commands that do not name them (a run without --engine reads the demo
    model's export in the cache, and exports it from the bundled checkpoint): no output may go there."""
    from .assets import ASSETS

    return [("cmdcl's cache", cache_dir()), ("cmdcl's bundled assets", ASSETS)]


def check_writable(path, name: str = "output") -> None:
    """Raise OutputError (one line) unless a new `path` can be renamed into place in its directory."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{name} {path}: is a directory, not a file")
    parent = real_path(path).parent
    if not parent.is_dir():
        raise OutputError(f"{name} {path}: directory {parent} does not exist")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{name} {path}: the file is read-only")
    if in_place(path):
        return
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputError(f"{name} {path}: cannot write in {parent}: {exc.strerror or exc}") from None


def real_path(path) -> Path:
    """Where writing `path` lands: a symlink's target (so the link is kept), else `path`."""
    return Path(os.path.realpath(path))


def in_place(path) -> bool:
    """An existing output that is not a regular file (a device such as /dev/null, a pipe): written
    directly, since renaming a file onto it would replace it."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def temporary_path(path) -> Path:
    """A new, hidden, empty file next to `path` (its target, for a symlink) that keeps its suffix (writers that
    pick the format by suffix, such as PyAV and matplotlib, still do), with the mode `path` has or a new file gets."""
    path = real_path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    os.chmod(name, _mode(path))
    return Path(name)


@contextlib.contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yield a temporary path to write instead of `path`; it replaces `path` (a symlink's target) only
    when the block ends without an exception, and is removed otherwise. A device or pipe is yielded as is."""
    if in_place(path):
        yield Path(path)
        return
    tmp = temporary_path(path)
    try:
        yield tmp
        move_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def move_into_place(finished, path) -> None:
    """Rename the finished file `finished` onto `path` (a symlink's target); a device or pipe at `path`
    gets its bytes instead (renaming onto /dev/null would replace the device with a file)."""
    if in_place(path):
        with open(finished, "rb") as source, open(path, "wb") as target:
            shutil.copyfileobj(source, target)
        os.unlink(finished)
    else:
        os.replace(finished, real_path(path))


@contextlib.contextmanager
def temporary_dir(parent, name: str) -> Iterator[Path]:
    """A new hidden directory in `parent` to stage files before they are renamed into place
    (renames stay within one file system); removed with whatever is left in it."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.cmdcl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _mode(path: Path) -> int:
    """The existing file's permissions, else those of a new file (0o666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json(path, value, indent: int | None = 2) -> None:
    """`value` as strict JSON, atomically: a float that is NaN or infinite (a metric with nothing to measure, such as
    mAP when no class has a positive target) is written as null, since JSON has no NaN; any other value a file
    would have to spell NaN or Infinity is refused (ValueError)."""
    import json
    import math

    def strict(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: strict(element) for key, element in item.items()}
        return [strict(element) for element in item] if isinstance(item, (list, tuple)) else item

    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(strict(value), f, indent=indent, allow_nan=False)
        f.write("\n")
