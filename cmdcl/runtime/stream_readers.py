"""Stream mode's readers: each source decoded in its own thread into a small buffer.

PyAV releases the GIL while it demuxes, decodes and converts frames, so the
readers decode in parallel with each other and with the model, and a source
that stalls, waits for a timeout or sleeps before a reconnect holds up only its
own thread. A file's reader waits while its buffer is full (nothing is ever
dropped). A live source without an end (rtsp, devices, ...) does not wait for
us: when its buffer stays full for a grid step (the model is not keeping up)
the reader drops the oldest grid frame, so the newest are classified, and the
frame after it says how many were dropped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..data.video import GridStatus, VideoError


@dataclass
class GridItem:
    """One grid frame as a reader delivers it."""

    t: float  # seconds (the grid time)
    frame: np.ndarray  # uint8 [size, size, 3]
    decode: str  # "all" or "keyframes": how it was chosen (GridStatus.decode)
    arrival: float  # time.monotonic() when the reader had it
    dropped: int = 0  # grid frames dropped just before this one


class _Stopped(Exception):
    """The reader was stopped while its source slept before a reconnect."""


class StreamReader:
    """Reads one source in a daemon thread: `open_frames(sleep, status)` gives its
    (t, frame) grid iterator, run with this reader's `sleep` (which a stop cuts
    short) and a GridStatus. The consumer calls `take()`; `finished` once the
    source has ended and everything was taken; `error` then says why it failed,
    if it did. `drop_after`: seconds a live source's reader waits on a full
    buffer before it drops the oldest frame (None: wait as long as it takes)."""

    def __init__(self, source, open_frames, capacity: int, drop_after: float | None, wake: threading.Event, unexpected):
        self.capacity, self.drop_after, self.wake, self.unexpected = capacity, drop_after, wake, unexpected
        self.items: deque = deque()
        self.changed = threading.Condition()
        self.stopped, self.done, self.error = False, False, None
        self.thread = threading.Thread(target=self._run, args=(open_frames,), name=f"cmdcl reader {source}", daemon=True)
        self.thread.start()

    def take(self) -> GridItem | None:
        """The oldest grid frame ready, or None."""
        with self.changed:
            if not self.items:
                return None
            item = self.items.popleft()
            self.changed.notify_all()
        return item

    @property
    def finished(self) -> bool:
        with self.changed:
            return self.done and not self.items

    def stop(self) -> None:
        """End the reader at its next frame or back-off sleep (a read in progress ends at its timeout)."""
        with self.changed:
            self.stopped = True
            self.changed.notify_all()

    def sleep(self, seconds: float) -> None:
        with self.changed:
            if self.changed.wait_for(lambda: self.stopped, seconds):
                raise _Stopped

    def _run(self, open_frames) -> None:
        status = GridStatus()
        try:
            with contextlib.closing(open_frames(self.sleep, status)) as frames:  # closing it closes its container, in this thread
                for t, frame in frames:
                    if not self._put(GridItem(t, frame, status.decode, time.monotonic())):
                        break
        except _Stopped:
            pass
        except VideoError as exc:
            self.error = exc.reason
        except Exception as exc:  # a bug or a resource running out: this source fails, the others go on
            self.error = self.unexpected(exc)
        finally:
            with self.changed:
                self.done = True
            self.wake.set()

    def _put(self, item: GridItem) -> bool:
        """Buffer `item`, waiting for room (dropping the oldest after `drop_after`); False once stopped."""
        with self.changed:
            room = lambda: self.stopped or len(self.items) < self.capacity  # noqa: E731
            if not self.changed.wait_for(room, self.drop_after):
                oldest = self.items.popleft()
                (self.items[0] if self.items else item).dropped += oldest.dropped + 1
            if self.stopped:
                return False
            self.items.append(item)
        self.wake.set()
        return True
