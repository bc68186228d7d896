"""Video mode's decoding, in parallel and ahead of the model: `decoded_in_order`.

Inputs are decoded in worker processes while the caller (the model) works on
those already decoded; at most `ahead` results wait, decoded or in progress,
so memory stays bounded however many inputs there are; results come out in
input order. Whatever goes wrong while reading one input becomes that input's
`Failure`, and a worker that dies (a crashing decoder, the OOM killer, kill -9)
costs only the input it was reading: a new worker takes over.

Processes, not threads: PyAV releases the GIL while decoding, and on 720p
files two threads and two processes decode alike (1.82x and 1.81x one process
on 2 cores; 1.45x and 1.49x with other work on the machine), but a process
fails alone and can be stopped at once, where a thread in the middle of a long
file can be neither. Workers are forked (cheap, and they share the parent's
imports and settings); they ignore SIGINT, so a terminal's Ctrl-C reaches the
parent alone, which ends them without a traceback, and they die with the
parent even when it is killed. A worker's decoder gets its share of the cores
(`cmdcl.data.video.DECODER_THREADS`): FFmpeg's default, a thread per core in
each of N decoders, oversubscribes them (2 workers: 1.3x one process instead of 1.8x).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait

from ..data import video
from ..data.video import VideoError
from ..errors import first_line

MAX_WORKERS = 64  # more decoding processes than this only cost memory (each holds its clips and a decoder)
PR_SET_PDEATHSIG = 1  # Linux prctl(2): a signal the kernel sends this process when its parent dies
POLL_SECONDS = 0.1  # how often the dispatcher looks up from waiting, to notice a stop
STOP_SECONDS = 2.0  # a worker not gone this long after SIGTERM gets SIGKILL


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform
        return os.cpu_count() or 1


def default_workers() -> int:
    """One decoding process per usable core, at most MAX_WORKERS."""
    return min(usable_cores(), MAX_WORKERS)


def check_workers(workers: int) -> int:
    """`workers`, or ValueError when it is not between 1 and MAX_WORKERS."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, got {workers}")
    return workers


@dataclass
class Failure:
    """Why one input could not be read, as text: it may come from another process."""

    reason: str  # for the record: a VideoError's reason, else "unexpected <type>: <first line>"
    message: str  # the exception's first line, naming the input ("<path>: <reason>" for a VideoError)
    traceback: str | None = None  # an unexpected error's traceback, for --debug

    @classmethod
    def of(cls, exc: Exception) -> Failure:
        if isinstance(exc, VideoError):
            return cls(exc.reason, first_line(exc))
        return cls(f"unexpected {type(exc).__name__}: {first_line(exc)}", first_line(exc), "".join(traceback.format_exception(exc)))


def read_or_fail(read: Callable, item):
    """read(item), or the Failure it raised."""
    try:
        return read(item)
    except Exception as exc:  # a bug or a resource running out: this input fails, the others go on
        return Failure.of(exc)


def decoded_in_order(items: Sequence, read: Callable, workers: int, ahead: int, name: Callable = str) -> Iterator[tuple]:
    """(item, read(item) or its Failure) for each item, in order. With `workers` 1
    (or one item, or no fork on this platform) the items are read here, one at a
    time; else by up to `workers` processes, at most `ahead` (>= workers) items
    read or being read before the caller takes them. A worker's death gives the
    item it was reading a Failure naming it with `name(item)`.

    Closing the iterator (or an exception in the caller, Ctrl-C included) ends
    the workers; close it explicitly (contextlib.closing) to end them at once."""
    workers = min(workers, len(items))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for item in items:
            yield item, read_or_fail(read, item)
        return
    pool = _Pool(items, read, workers, max(ahead, workers), name)
    try:
        for index, item in enumerate(items):
            yield item, pool.take(index)
    finally:
        pool.close()


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies, even by SIGKILL (Linux): else it
    would decode on to the end of its file first. (Where prctl is missing, the parent's end of
    the pipe closing still ends it, after that file.)"""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it died before the prctl
        os._exit(0)


def _work(connection, read: Callable, parent_ends: list, decoder_threads: int, parent: int) -> None:
    """A worker: read the items the parent sends, one at a time, until it sends None or goes away."""
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (cmdcl-run turns SIGTERM into KeyboardInterrupt)
    for end in parent_ends:  # inherited copies: while a worker held them, no worker would see the parent go (EOF)
        end.close()
    video.DECODER_THREADS = decoder_threads  # this process's own copy of the setting
    while True:
        try:
            task = connection.recv()
            if task is None:
                return
            index, item = task
            connection.send((index, read_or_fail(read, item)))
        except (EOFError, OSError):  # the parent is gone
            return


class _Worker:
    def __init__(self, context, read: Callable, others: list, decoder_threads: int):
        self.connection, child = context.Pipe()
        parent_ends = [self.connection, *(other.connection for other in others)]
        self.process = context.Process(target=_work, args=(child, read, parent_ends, decoder_threads, os.getpid()), daemon=True,
                                       name="cmdcl-decode")
        self.process.start()
        child.close()
        self.task: int | None = None  # the index it is reading

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(STOP_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()

    def death(self) -> str:
        """How the process ended: 'killed by SIGKILL', 'exit status 1'."""
        self.process.join(STOP_SECONDS)
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"


class _Pool:
    """The workers and a dispatcher thread that keeps them busy while the caller works:
    it hands each idle worker the next item (while fewer than `ahead` wait) and files
    the results, which `take` hands out in order."""

    def __init__(self, items: Sequence, read: Callable, workers: int, ahead: int, name: Callable):
        self.items, self.read, self.ahead, self.name = items, read, ahead, name
        self.context = multiprocessing.get_context("fork")
        self.results: dict = {}  # index -> result, not yet taken
        self.next, self.taken = 0, 0  # the next index to hand out; results taken so far
        self.changed = threading.Condition()
        self.stopping, self.error = False, None
        self.decoder_threads = max(1, usable_cores() // workers)
        self.workers: list[_Worker] = []
        for _ in range(workers):
            self.workers.append(_Worker(self.context, read, self.workers, self.decoder_threads))
        self.thread = threading.Thread(target=self._dispatch, daemon=True, name="cmdcl-decode-dispatch")
        self.thread.start()

    def take(self, index: int):
        with self.changed:
            while index not in self.results:
                if self.error is not None:
                    raise self.error
                self.changed.wait(POLL_SECONDS)
            self.taken = index + 1
            self.changed.notify_all()
            return self.results.pop(index)

    def close(self) -> None:
        with self.changed:
            self.stopping = True
        self.thread.join()
        for worker in self.workers:
            worker.stop()

    def _dispatch(self) -> None:
        try:
            while not self.stopping:
                self._hand_out()
                busy = [w for w in self.workers if w.task is not None]
                if not busy:
                    if self.next == len(self.items):
                        return
                    with self.changed:  # every worker idle: the caller has `ahead` results to take first
                        self.changed.wait(POLL_SECONDS)
                    continue
                ready = wait([w.connection for w in busy], POLL_SECONDS)  # a result, or the end of file a dead worker leaves
                for worker in busy:
                    if worker.connection in ready:
                        self._receive(worker)
        except Exception as exc:  # noqa: BLE001 - e.g. no more processes (fork failed): handed to the caller, who raises it
            with self.changed:
                self.error = exc
                self.changed.notify_all()

    def _hand_out(self) -> None:
        for worker in self.workers:
            if worker.task is None and not worker.process.is_alive():  # died while idle: nothing lost
                worker = self._replace(worker)
            with self.changed:
                if worker.task is not None or self.next == len(self.items) or self.next - self.taken >= self.ahead:
                    continue
                index, self.next = self.next, self.next + 1
            worker.task = index
            try:
                worker.connection.send((index, self.items[index]))
            except OSError:  # it died just now
                self._lost(worker)

    def _receive(self, worker: _Worker) -> None:
        try:
            index, result = worker.connection.recv()
        except (EOFError, OSError):  # it died (its end of the pipe closed with it)
            self._lost(worker)
            return
        worker.task = None
        self._file(index, result)

    def _lost(self, worker: _Worker) -> None:
        """A worker died reading `worker.task`: that item fails, a new worker takes its place."""
        reason = f"the decoding process died ({worker.death()})"
        self._file(worker.task, Failure(reason, f"{self.name(self.items[worker.task])}: {reason}"))
        self._replace(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        others = [w for w in self.workers if w is not worker]
        self.workers[self.workers.index(worker)] = new = _Worker(self.context, self.read, others, self.decoder_threads)
        return new

    def _file(self, index: int, result) -> None:
        with self.changed:
            self.results[index] = result
            self.changed.notify_all()
