"""Video decoding for the whole toolkit (PyAV only).

Training, the runtime and the benchmarks all read video through this module:

- `read_clip(path, F, size)`: F frames uniformly over the whole video
  (segment-based sampling), shorter side resized to `size`, centre-cropped,
  uint8 RGB. A packet scan (demuxing, no decoding) gives every frame's pts and
  the keyframes; from those the reader counts how many frames keyframe-aware
  seeking would decode and how many one sequential pass would, and takes the
  cheaper. Only the sampled frames are converted to RGB. A source of more
  than MAX_SCAN_FRAMES frames (or a network stream that never ends) is refused.
  `sampling="keyframe"` (inference): a segment that holds a keyframe takes
  the one nearest its centre, decoded alone.
- `iter_grid_frames(source, rate, size)`: (time, frame) on a fixed time grid
  from a file or a live source (rtsp://, http://, /dev/video*), for the
  streaming runtime; live sources reconnect with exponential back-off. A
  finite source (a file, an http(s) URL) is never replayed: reopened after a
  drop, it skips the frames already read. A jump in time longer than
  `max_gap(rate)` is not filled with copies: the grid restarts after it.

Times are seconds from the first frame's pts (never from a frame index or the
nominal rate, so variable frame rate is safe), and the display-matrix
rotation is applied. Every network open and read has a timeout. Every way a
file can be unreadable raises VideoError "<path>: <reason>"; container
metadata that does not parse is ignored.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import av
import numpy as np

from ..errors import CmdclError, first_line

DEFAULT_TIMEOUT = 10.0  # seconds a network source may take to open, or to deliver the next packet
GAP_GRID_STEPS, GAP_SECONDS = 3, 2.0  # a jump in time longer than both is a gap (see max_gap)
KEYFRAME_SLACK = 0.1  # keyframes up to 10% further apart than the grid step still count as one per step (camera clocks jitter)
KEYFRAME_GOPS = 2  # GOPs in a row that short before stream mode decodes keyframes only again, after GOPs too long
MAX_GOP_PACKETS = 300  # decoding keyframes only keeps the packets since the last keyframe (to decode them again on falling back)
RESIZE_ASPECT_LIMIT = 4  # frames longer than this times their width (or the reverse) are cropped before resizing
MAX_SCAN_FRAMES = 2_000_000  # video mode's packet scan holds every frame's pts: 9 h at 60 fps, and a stream that never ends stops here

SAMPLINGS = ("exact", "keyframe")  # read_clip's sampling: see there
RUNTIME_SAMPLING = "keyframe"  # the runtime's default (README "Runtime" says why); training samples "exact"
DECODER_THREADS = 0  # threads per decoder, 0: FFmpeg's choice (one per core); video mode's decoding processes set their share
LIVE_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://", "/dev/video")


class VideoError(CmdclError):
    """A video that cannot be read; str() is "<path>: <reason>"."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [F, size, size, 3], RGB
    times: np.ndarray  # float64 [F], seconds from the first frame's pts
    frames_decoded: int  # decoder output frames it took to get them
    strategy: str  # "seek" or "sequential" (the plan for the exact samples); "keyframe" when every sample is a keyframe
    duration: float  # seconds spanned by the video stream
    keyframes: int = 0  # samples taken as their segment's keyframe (sampling="keyframe"); each costs one decoded frame
    restarts: int = 0  # times the file's timestamps restarted (or ran backwards); its parts are sampled as one timeline


@dataclass
class Reconnect:
    """Back-off for live sources. A reconnect without progress (no new frame
    since the one before) is a failure; more than `tries` failures within
    `span` seconds end the stream, however much progress came in between."""

    tries: int = 5
    initial_delay: float = 0.5
    max_delay: float = 8.0
    span: float = 300.0

    def delay(self, failure: int) -> float:
        return min(self.initial_delay * 2 ** (failure - 1), self.max_delay)


def is_live(source) -> bool:
    """Network URLs and capture devices: read as streams, reconnected on errors."""
    return str(source).startswith(LIVE_PREFIXES)


def is_endless(source) -> bool:
    """Live sources with no end (rtsp, rtmp, udp, tcp, srt, devices; not http files)."""
    return is_live(source) and not str(source).startswith(("http://", "https://"))


def segment_times(duration: float, num_frames: int, offsets: str = "center", rng: np.random.Generator | None = None) -> np.ndarray:
    """Split [0, duration) into `num_frames` equal segments and pick one time in
    each: its centre ("center") or a uniform random time ("random", from `rng`)."""
    step = duration / num_frames
    if offsets == "center":
        within = np.full(num_frames, 0.5)
    elif offsets == "random":
        if rng is None:
            raise ValueError("offsets='random' needs rng (a numpy Generator)")
        within = rng.random(num_frames)
    else:
        raise ValueError(f"offsets must be 'center' or 'random', not {offsets!r}")
    return (np.arange(num_frames) + within) * step


# ---- opening and checking ---------------------------------------------------------------
def open_video(source, timeout: float | None = DEFAULT_TIMEOUT):
    """Open `source` and return (container, its first video stream); VideoError otherwise.
    A network source gets `timeout` seconds to open and to deliver each packet."""
    source = str(source)
    if not is_live(source):
        path = Path(source)
        if not path.exists():
            raise VideoError(source, "no such file")
        if path.is_dir():
            raise VideoError(source, "is a directory, not a video")
        if not path.is_file():  # a FIFO or a device would block the open with no timeout
            raise VideoError(source, "not a regular file")
        if path.stat().st_size == 0:
            raise VideoError(source, "empty file")
    options = {"format": "v4l2"} if source.startswith("/dev/video") else {}
    try:
        container = av.open(source, timeout=timeout if is_live(source) else None, **options)
    except av.error.FileNotFoundError:
        raise VideoError(source, "no such file or device") from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        if is_live(source):
            raise VideoError(source, f"cannot open stream ({_cause(exc)})") from None
        container_kind = _container_signature(source)
        if container_kind:  # the header says video, yet FFmpeg cannot read it: typically cut short
            raise VideoError(source, f"truncated or corrupt {container_kind} file ({_cause(exc)})") from None
        raise VideoError(source, f"not a video ({_cause(exc)})") from None
    # Cover art (an audio file's attached picture) is a one-frame "video" stream: not a video.
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        kinds = {s.type for s in container.streams}
        container.close()
        raise VideoError(source, "no video stream (audio only)" if "audio" in kinds else "no video stream")
    stream = videos[0]
    stream.thread_type = "AUTO"
    stream.thread_count = DECODER_THREADS
    return container, stream


def _damage(source) -> str:
    """': a truncated or corrupt MP4/MOV file' when a local file FFmpeg fails to decode starts like a
    video container (typically a file cut short), else nothing."""
    kind = None if is_live(source) else _container_signature(source)
    return f": a truncated or corrupt {kind} file" if kind else ""


def _container_signature(path) -> str | None:
    """'MP4/MOV' or 'Matroska/WebM' when the file starts like one."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] == b"ftyp":
        return "MP4/MOV"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    return None


def _cause(exc: Exception) -> str:
    """A decoding error's first line: an OSError's strerror (no errno), or what PyAV's timeout means."""
    if isinstance(exc, av.error.ExitError):  # FFmpeg stopped by PyAV's timeout callback, the only interrupt we set
        return "timed out waiting for data"
    return first_line(getattr(exc, "strerror", None) or exc)


def _decode_error(path, exc: Exception) -> VideoError:
    """A decoding failure after the scan: stalled (PyAV's timeout) or undecodable, with its cause."""
    return VideoError(path, f"{'stalled' if isinstance(exc, av.error.ExitError) else 'undecodable'} ({_cause(exc)})")


def declared_duration(container, stream) -> float | None:
    """The video stream's duration as the file declares it (seconds), if it does."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", stream.metadata.get("DURATION", "").strip())  # Matroska/WebM, per stream
    if tag:  # a malformed tag is ignored, like a missing one
        h, m, s = tag.groups()
        return int(h) * 3600 + int(m) * 60 + float(s)
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _check_complete(path, container, stream, covered: float, interval: float) -> None:
    """Raise 'truncated' when the frames end well before the declared duration.

    Matroska/WebM cut short decode without any error from FFmpeg; the header
    still states the full duration, which is how truncation shows."""
    declared = declared_duration(container, stream)
    if declared is not None and covered < declared - max(3 * interval, 0.02 * declared):
        raise VideoError(path, f"truncated: frames end at {covered:.2f} s of the declared {declared:.2f} s")


# ---- packet scan and the decoding plan -----------------------------------------------------
class _Restarts:
    """Where a stream's timestamps restart, packet by packet in decode order: MPEG-TS segments joined with `cat`,
    spliced camera recordings. A restart is a decode timestamp that goes backwards, or (streams without dts) a
    keyframe whose pts is not after every pts before it, which no frame of one coded sequence can be. B-frames
    send pts backwards by a few frames in decode order; neither rule takes that for a restart."""

    def __init__(self):
        self.count = 0  # restarts so far: the index of the current part
        self.last_dts = self.latest_pts = None

    def part(self, packet) -> int:
        """The index of the part `packet` (with a pts) belongs to."""
        dts_back = packet.dts is not None and self.last_dts is not None and packet.dts < self.last_dts
        if dts_back or (packet.is_keyframe and self.latest_pts is not None and packet.pts <= self.latest_pts):
            self.count += 1
            self.latest_pts = None
        self.last_dts = packet.dts if packet.dts is not None else self.last_dts
        self.latest_pts = packet.pts if self.latest_pts is None else max(self.latest_pts, packet.pts)
        return self.count


class _Timeline:
    """One increasing time line over the parts of a stream whose timestamps restart: each part continues one
    frame interval after the latest frame of the part before it. Positions on it are ints in the stream's
    time base (a part's pts plus its offset), so a stream without restarts keeps its own pts."""

    def __init__(self, parts: list, step: int):
        self.offsets = [0]
        for previous, part in zip(parts, parts[1:]):
            self.offsets.append(self.offsets[-1] + max(previous) + step - min(part))
        # each part's pts, to follow decoded frames from part to part (not kept for the usual file of one part)
        self.members = [set(part) for part in parts] if len(parts) > 1 else []

    @property
    def restarts(self) -> int:
        return len(self.offsets) - 1

    def packet_positions(self):
        """position(packet) for the packets of one demuxing pass from the file's first packet."""
        restarts = _Restarts()
        return lambda packet: packet.pts + self.offsets[restarts.part(packet)]

    def frame_positions(self):
        """position(pts) for the frames of one decoding pass from the file's start, in display order; None for a
        frame of no part. Decoded frames leave a part when their pts goes backwards or is not in it."""
        if not self.restarts:
            return lambda pts: pts
        part, last = 0, None

        def position(pts):
            nonlocal part, last
            if last is not None and (pts < last or pts not in self.members[part]):
                later = next((i for i in range(part + 1, len(self.members)) if pts in self.members[i]), None)
                if later is None:
                    return None
                part = later
            last = pts
            return pts + self.offsets[part]

        return position


@dataclass
class _Scan:
    frame_pts: list  # every frame's position on the timeline (_Timeline; its pts without restarts), sorted (display order)
    keyframe_pts: list  # positions of the packets flagged as keyframes, sorted
    interval: float  # median frame interval, seconds
    timeline: _Timeline

    @cached_property
    def seek_points(self) -> list:
        """Where decoding can start: the keyframes, and the first frame (decoding starts there either way)."""
        if self.keyframe_pts and self.keyframe_pts[0] <= self.first:
            return self.keyframe_pts
        return [self.first, *self.keyframe_pts]

    @property
    def first(self) -> int:
        return self.frame_pts[0]


def _scan(path, container, stream) -> _Scan:
    """Demux (not decode) the video stream: the position of every frame and keyframe on the file's timeline."""
    parts, keyframes, restarts, count = [[]], [], _Restarts(), 0  # keyframes: (part, pts)
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.pts is None:
                continue
            part = restarts.part(packet)
            if part == len(parts):
                parts.append([])
            parts[part].append(packet.pts)
            count += 1
            if count > MAX_SCAN_FRAMES:
                raise VideoError(path, f"more than {MAX_SCAN_FRAMES} frames: too long for video mode (use stream mode)")
            if packet.is_keyframe:
                keyframes.append((part, packet.pts))
    except (av.error.FFmpegError, OSError) as exc:
        if not count:
            raise VideoError(path, f"undecodable ({_cause(exc)})") from None
        at = sum(max(part) - min(part) for part in parts if part) * stream.time_base
        kind = "stalled" if isinstance(exc, av.error.ExitError) else "truncated or corrupt"
        raise VideoError(path, f"{kind} after {float(at):.2f} s ({_cause(exc)})") from None
    if not count:
        declared = declared_duration(container, stream)
        raise VideoError(path, f"truncated: no frame of the declared {declared:.2f} s" if declared
                         else "undecodable (no video frames with timestamps)")
    tb = float(stream.time_base)
    steps = np.concatenate([np.diff(sorted(part)) for part in parts])
    if len(steps):
        interval = float(np.median(steps)) * tb
    else:  # one frame: it is on screen for one frame period, as the file declares it
        interval = 1 / float(stream.average_rate) if stream.average_rate else 0.0
    timeline = _Timeline(parts, max(round(interval / tb), 1))
    frame_pts = sorted(pts + offset for part, offset in zip(parts, timeline.offsets) for pts in part)
    keyframe_pts = sorted(pts + timeline.offsets[part] for part, pts in keyframes)
    if stream.frames and count < stream.frames:
        raise VideoError(path, f"truncated: {count} of {stream.frames} frames present")
    _check_complete(path, container, stream, (frame_pts[-1] - frame_pts[0]) * tb + interval, interval)
    return _Scan(frame_pts, keyframe_pts, interval, timeline)


def _seek_cost(scan: _Scan, targets: list) -> int:
    """Frames decoded when each target's GOP is reached by seeking to its
    keyframe, decoding on within a GOP (targets sorted)."""
    index = {pts: i for i, pts in enumerate(scan.frame_pts)}
    cost, position, gop = 0, None, None
    for target in targets:
        keyframe = scan.seek_points[bisect.bisect_right(scan.seek_points, target) - 1]
        if keyframe != gop or position is None:
            gop, position = keyframe, index[keyframe] - 1
        cost += index[target] - position
        position = index[target]
    return cost


# ---- decoding ----------------------------------------------------------------------------
def frame_to_rgb(frame, size: int) -> np.ndarray:
    """Shorter side to `size`, display rotation applied, centre crop: uint8 [size, size, 3].

    A frame of extreme aspect ratio (say 2 x 16000) is cropped to its centre
    square before it is resized: resizing it whole would take gigabytes."""
    short, long = sorted((frame.width, frame.height))
    if long > RESIZE_ASPECT_LIMIT * short:
        image = frame.to_ndarray(format="rgb24")  # the decoded size: no larger than the frame already is
        top, left = (image.shape[0] - short) // 2, (image.shape[1] - short) // 2
        square = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[top : top + short, left : left + short]), format="rgb24")
        image = square.to_ndarray(width=size, height=size, format="rgb24", interpolation="BILINEAR")
    else:
        scale = size / short
        width, height = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
        image = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BILINEAR")
    turns = round(frame.rotation / 90) % 4
    if turns:
        image = np.rot90(image, k=turns)  # rotation is counter-clockwise, as np.rot90
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def _decode_targets(path, container, stream, targets: list, size: int, out: dict, after_seek: bool, position=None) -> int:
    """Decode on from the current position, converting the frames whose positions
    (`position(pts)`, _Timeline.frame_positions; by default the pts) are in `targets`
    (sorted) into `out`; return frames decoded. Raises _Overshoot when, right after
    a seek, the first frame is already past the first target."""
    decoded, wanted = 0, 0
    try:
        for frame in container.decode(stream):
            decoded += 1
            at = frame.pts if position is None or frame.pts is None else position(frame.pts)
            if at is None:
                continue
            if after_seek and decoded == 1 and at > targets[0]:
                raise _Overshoot
            while wanted < len(targets) and at >= targets[wanted]:
                out[targets[wanted]] = frame_to_rgb(frame, size)
                wanted += 1
            if wanted == len(targets):
                break
    except (av.error.FFmpegError, OSError) as exc:
        raise _decode_error(path, exc) from None
    if wanted < len(targets):
        raise VideoError(path, "undecodable: the decoder returned fewer frames than the file holds")
    return decoded


class _Overshoot(Exception):
    """A seek landed after the frame it was meant to reach (or a keyframe did not decode alone): decode in one pass instead."""


def read_clip(path, num_frames: int, size: int, offsets: str = "center", rng: np.random.Generator | None = None,
              strategy: str = "auto", timeout: float = DEFAULT_TIMEOUT, sampling: str = "exact") -> Clip:
    """F frames uniformly over the whole video (see `segment_times`), each
    resized so the shorter side is `size` and centre-cropped to size x size.
    Videos with fewer frames than F repeat frames. `strategy` "seek" or
    "sequential" forces a decoding plan (the benchmark compares them); "auto"
    takes the one that decodes fewer frames. A network source that takes
    longer than `timeout` seconds to open or to send data raises VideoError.

    `sampling` "keyframe" (inference only; training stays "exact"): a segment
    that holds a keyframe is represented by the keyframe nearest its sample
    time, decoded alone (one frame, where an exact sample can cost a whole GOP;
    segment-based sampling accepts any frame of a segment). Segments without a
    keyframe keep their exact sample, decoded by the plan above, which also
    supplies the keyframes it passes anyway.

    A file whose timestamps restart (MPEG-TS segments joined with `cat`) is
    sampled over all its parts, each continuing the time of the one before
    (`Clip.restarts` counts the restarts); such a file is decoded in one pass,
    since seeking to a timestamp that several parts hold is ambiguous."""
    if strategy not in ("auto", "seek", "sequential"):
        raise ValueError(f"strategy must be 'auto', 'seek' or 'sequential', not {strategy!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be 'exact' or 'keyframe', not {sampling!r}")
    if is_endless(path):
        raise VideoError(path, "a live stream has no end to sample up to; use stream mode")
    container, stream = open_video(path, timeout)
    with container:
        scan = _scan(path, container, stream)
        tb = float(stream.time_base)
    duration = (scan.frame_pts[-1] - scan.first) * tb + scan.interval
    times = segment_times(duration, num_frames, offsets, rng)
    if scan.timeline.restarts:
        strategy = "sequential"
    # Each sample shows the frame on screen at its time: the last one with pts <= it.
    chosen = [scan.frame_pts[max(bisect.bisect_right(scan.frame_pts, scan.first + t / tb + 1e-9) - 1, 0)] for t in times]
    keyframes = [None] * num_frames
    if sampling == "keyframe":
        keyframes = _segment_keyframes(scan, tb, duration, times)
        chosen = [key if key is not None else pts for key, pts in zip(keyframes, chosen)]
    alone = sorted({key for key in keyframes if key is not None})
    targets = sorted({pts for pts, key in zip(chosen, keyframes) if key is None})
    if targets:  # the plan for the exact samples; keyframes it decodes anyway are taken from it
        on_the_way = {"sequential": {key for key in alone if key <= targets[-1]},
                      "seek": set(alone) & {group[0][1] for group in _gop_groups(scan, targets)}}
        if strategy == "auto":
            seek_cost = _seek_cost(scan, targets) + len(alone) - len(on_the_way["seek"])
            sequential_cost = scan.frame_pts.index(targets[-1]) + 1 + len(alone) - len(on_the_way["sequential"])
            strategy = "seek" if seek_cost < sequential_cost else "sequential"
        targets, alone = sorted({*targets, *on_the_way[strategy]}), [key for key in alone if key not in on_the_way[strategy]]
    rgb: dict = {}
    decoded = 0
    if alone:
        try:
            decoded += _decode_keyframes(path, timeout, alone, size, rgb, scan.timeline)
        except _Overshoot:  # a keyframe that does not decode alone: every sample from one pass
            strategy, targets = "sequential", sorted(set(chosen))
    if targets:
        if strategy == "seek":
            try:
                container, stream = open_video(path, timeout)
                with container:
                    for group in _gop_groups(scan, targets):
                        container.seek(group[0][1], stream=stream, backward=True)
                        decoded += _decode_targets(path, container, stream, [t for t, _ in group], size, rgb, after_seek=True)
            except _Overshoot:  # an imprecise index: fall back to one pass
                strategy = "sequential"
        if strategy == "sequential":
            container, stream = open_video(path, timeout)
            with container:
                decoded += _decode_targets(path, container, stream, targets, size, rgb, after_seek=False,
                                           position=scan.timeline.frame_positions())
    else:
        strategy = "keyframe"
    frames = np.stack([rgb[pts] for pts in chosen])
    return Clip(frames, np.array([(pts - scan.first) * tb for pts in chosen]), decoded, strategy, duration,
                sum(key is not None for key in keyframes), scan.timeline.restarts)


def _segment_keyframes(scan: _Scan, tb: float, duration: float, times) -> list:
    """For each of the len(times) equal segments of [0, duration): the pts of its keyframe
    nearest its sample time `times[i]`, or None when the segment holds no keyframe."""
    step = duration / len(times)
    key_times = [(pts - scan.first) * tb for pts in scan.keyframe_pts]
    picks = []
    for i, t in enumerate(times):
        inside = range(bisect.bisect_left(key_times, i * step), bisect.bisect_left(key_times, (i + 1) * step))
        picks.append(scan.keyframe_pts[min(inside, key=lambda k: abs(key_times[k] - t))] if inside else None)
    return picks


def _decode_keyframes(path, timeout, keyframes: list, size: int, out: dict, timeline: _Timeline) -> int:
    """Decode each keyframe (a position on `timeline`) alone into `out`; return frames decoded. Each is
    reached by seeking to it; from the first seek that lands past its keyframe (MPEG-TS seeks by decoding
    time), or in a file whose timestamps restart, by demuxing from the start instead, which reads packets
    but decodes only the keyframes'."""
    decoded = 0

    def decode_alone(packet, stream, key) -> None:
        nonlocal decoded
        frames = stream.codec_context.decode(packet) + stream.codec_context.decode(None)  # None drains the decoder
        stream.codec_context.flush_buffers()  # ready for the next packet
        if not frames:  # flagged as a keyframe, yet it needs frames before it
            raise _Overshoot
        decoded += len(frames)
        out[key] = frame_to_rgb(frames[0], size)

    try:
        container, stream = open_video(path, timeout)
        with container:
            for key in keyframes if not timeline.restarts else ():
                container.seek(key, stream=stream, backward=True)
                packet = next((p for p in container.demux(stream) if p.pts is not None and p.size and p.pts >= key), None)
                if packet is None or packet.pts != key:
                    break
                decode_alone(packet, stream, key)
        wanted = {key for key in keyframes if key not in out}
        if wanted:
            container, stream = open_video(path, timeout)
            with container:
                position = timeline.packet_positions()
                for packet in container.demux(stream):
                    if packet.pts is None or not packet.size:
                        continue
                    key = position(packet)
                    if key in wanted:
                        decode_alone(packet, stream, key)
                        wanted.discard(key)
                        if not wanted:
                            break
            if wanted:
                raise VideoError(path, "undecodable: keyframes found by the packet scan are missing on a second read")
    except (av.error.FFmpegError, OSError) as exc:
        raise _decode_error(path, exc) from None
    return decoded


def _gop_groups(scan: _Scan, targets: list) -> list:
    """Targets grouped by GOP: [[(target, keyframe), ...], ...]."""
    groups: list = []
    for target in targets:
        keyframe = scan.seek_points[bisect.bisect_right(scan.seek_points, target) - 1]
        if groups and groups[-1][0][1] == keyframe:
            groups[-1].append((target, keyframe))
        else:
            groups.append([(target, keyframe)])
    return groups


# ---- stream mode -------------------------------------------------------------------------
def max_gap(rate: float) -> float:
    """The longest jump in time (seconds) the grid bridges by holding a frame;
    after a longer one the grid restarts instead of repeating one frame."""
    return max(GAP_GRID_STEPS / rate, GAP_SECONDS)


@dataclass
class GridStatus:
    """How `iter_grid_frames` is decoding, kept up to date as it goes: read it after each grid frame."""

    decode: str = "all"  # how the last grid frame was chosen: "all" (the frame on screen) or "keyframes" (see iter_grid_frames)
    frames_decoded: int = 0  # decoder output frames so far


class _KeyframeGate:
    """Packet by packet, whether the decoder gets every packet or keyframes only.

    Keyframes only from the first keyframe on, and again once the last KEYFRAME_GOPS GOPs (keyframe to keyframe,
    from the demuxed packets) each spanned at most the grid step (give or take KEYFRAME_SLACK) and more than one
    but at most MAX_GOP_PACKETS packets (an all-intra source has nothing to skip). Back to every frame as soon as
    the current GOP proves longer (a packet past either bound, or a keyframe ending it too late): the packets held
    back since its keyframe are decoded then, so every frame from the keyframe on is the one full decoding gives.
    Starting with keyframes only is therefore safe, and it saves decoding the first GOPs of every source whose
    keyframes are dense.

    Keyframes only means that the decoder is given nothing but keyframes, not FFmpeg's skip_frame, and falling
    back gives it the held-back packets, with no drain or flush: decoders differ in both. libdav1d (AV1) reads
    skip_frame only when it opens, and the first keyframe opened it with "NONKEY": it decoded keyframes only for
    good, so falling back gave no frames (one window over HTTP, a false "truncated" as a file); other decoders
    ignore skip_frame. A keyframe needs nothing before it, and the packets after it, given in demuxed order,
    continue from it as in full decoding, with any decoder. Frames shown before the keyframe (leading frames of
    an open GOP) need the GOP before it: decoded where that GOP was, dropped on falling back where it was not."""

    def __init__(self, time_base: float, step: float, enabled: bool):
        self.time_base, self.enabled = time_base, enabled
        self.limit = step * (1 + KEYFRAME_SLACK)
        self.keyframes_only = False
        self.key_pts, self.gop_packets = None, 0  # the last keyframe packet, packets since it
        self.after_full_gop = True  # the GOP before the last keyframe was decoded in full
        self.dense = KEYFRAME_GOPS  # short GOPs in a row; a source is taken to have them until one proves longer
        self.gop: list = []  # while keyframes_only: the packets held back since the last keyframe
        # pts of keyframes decoded keyframes-only, in decoding order, until their frames come (a decoder holds back a few)
        self.nearest: deque = deque(maxlen=MAX_GOP_PACKETS)
        self.leading: set = set()  # pts of the leading frames of the GOP decoded on falling back, until they come
        self.leading_key = None  # the pts of that GOP's keyframe
        self.gop_end = None  # the latest pts since the last keyframe (one part's, where timestamps restart at a keyframe)

    def decode(self, packet) -> Iterator[tuple]:
        """(frame, nearest) for each frame decoded after `packet`; nearest: a keyframe decoded keyframes-only."""
        timed = bool(packet.size) and packet.pts is not None
        keyframe = timed and packet.is_keyframe
        if timed:
            self.gop_end = packet.pts if keyframe or self.gop_end is None else max(self.gop_end, packet.pts)
        if self.keyframes_only and packet.size:
            if keyframe:
                if not self._short(packet.pts):  # the GOP it ends was too long after all
                    yield from self._fall_back()
            elif self._too_long(packet):
                yield from self._fall_back()
            elif not (self.after_full_gop and timed and packet.pts < self.key_pts):  # a leading frame: decodable from that GOP
                self.gop.append(packet)  # held back
                self.gop_packets += timed
                return
        if keyframe:
            self._keyframe(packet.pts)
        self.gop_packets += timed
        if keyframe and self.keyframes_only:
            self.nearest.append(packet.pts)
        yield from self._frames(packet.decode())

    def _elapsed(self, pts) -> float:
        return (pts - self.key_pts) * self.time_base

    def _too_long(self, packet) -> bool:
        """Whether the current GOP, with `packet` (not a keyframe), is too long to decode keyframes only."""
        return (packet.pts is not None and self._elapsed(packet.pts) > self.limit) or len(self.gop) >= MAX_GOP_PACKETS

    def _short(self, pts) -> bool:
        """Whether the GOP that the keyframe at `pts` ends is short enough to decode keyframes only."""
        return 0 < self._elapsed(pts) <= self.limit and 1 < self.gop_packets <= MAX_GOP_PACKETS  # 1: all-intra, nothing to skip

    def _keyframe(self, pts) -> None:
        if self.key_pts is not None:  # the GOP this keyframe ends
            self.dense = self.dense + 1 if self._short(pts) else 0
        self.key_pts, self.gop_packets, self.gop = pts, 0, []
        self.after_full_gop = not self.keyframes_only
        self.keyframes_only = self.enabled and self.dense >= KEYFRAME_GOPS  # switching at a keyframe: it needs nothing before it

    def _fall_back(self) -> Iterator[tuple]:
        held, self.gop, self.keyframes_only, self.dense = self.gop, [], False, 0
        self.leading_key = self.key_pts
        self.leading = {p.pts for p in held if p.pts is not None and p.pts < self.key_pts}
        for kept in held:
            yield from self._frames(kept.decode())

    def _frames(self, frames) -> Iterator[tuple]:
        for frame in frames:
            if frame.pts in self.leading:
                self.leading.discard(frame.pts)
                continue
            if self.leading and frame.pts is not None and frame.pts > self.leading_key:  # shown after the keyframe: none is to come
                self.leading.clear()
            nearest = frame.pts in self.nearest
            if nearest:  # done with it, and with keyframes decoded before it whose frames did not come (they never will)
                while self.nearest.popleft() != frame.pts:
                    pass
            yield frame, nearest


def iter_grid_frames(source, rate: float, size: int, reconnect: Reconnect | None = None, sleep=time.sleep,
                     timeout: float = DEFAULT_TIMEOUT, keyframes: bool = True,
                     status: GridStatus | None = None) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (t, frame) for t = k / rate: the frame on screen at t (the last
    with pts <= t), uint8 [size, size, 3], each decoded frame converted at
    most once. k counts up by one, except after a gap: when the next frame
    comes more than `max_gap(rate)` after the one on screen, k jumps to that
    frame's time (consumers see the gap as a jump of more than one grid step).
    A jump backwards in time (longer than a gap, or to a keyframe: timestamps
    that restart) continues the grid from the frame on screen.

    With `keyframes`, once the source's keyframes come at least once per grid
    step (see _KeyframeGate) only keyframes are decoded and each grid time
    takes the keyframe nearest to it (the earlier one on a tie); when they
    become sparser, decoding goes back to every frame. `status.decode` says
    which way the last grid frame was chosen.

    A file ends at its last frame (a truncated Matroska file raises VideoError
    after yielding its frames). A live source that fails to open, errors, stalls
    for `timeout` seconds, or (rtsp, rtmp, udp, srt, devices: sources without an
    end) stops is reopened after a back-off (`reconnect`). A reopened http(s)
    file skips as many frames as were read (a count: pts repeat where
    timestamps restart), so nothing is replayed and times stay the file's; a reopened endless source goes on after the wall-clock time it
    was away. Reconnects without progress are counted (see Reconnect); too
    many raise VideoError."""
    reconnect, status = reconnect or Reconnect(), status or GridStatus()
    live, endless, gap = is_live(source), is_endless(source), max_gap(rate)
    grid_index, failures, run = 0, [], 0  # failures: clock times of reconnects without progress; run: in a row, for the back-off
    held = held_rgb = held_t = held_clock = None  # the frame on screen, its RGB once converted, its time, when it came
    held_nearest = False  # the held frame is a keyframe decoded keyframes-only
    frames_read = 0  # frames with a pts read from the source: a reopened finite source skips as many
    first, shift = None, 0.0  # shift: seconds added to pts times (backward jumps, endless reconnects)

    def back_off(progress: bool, reason: str) -> None:
        nonlocal run
        run = 1 if progress else run + 1
        if not progress:
            now = time.monotonic()
            failures[:] = [f for f in failures if now - f < reconnect.span] + [now]
            if len(failures) > reconnect.tries:
                raise VideoError(source, f"gave up after {reconnect.tries} reconnects without progress within {reconnect.span:g} s "
                                         f"({reason})")
        sleep(reconnect.delay(run))

    def show_held(until: float, inclusive: bool) -> Iterator[tuple[float, np.ndarray]]:
        """The grid frames before `until` (or at it, when inclusive): the held frame."""
        nonlocal grid_index, held_rgb
        while grid_index / rate < until or (inclusive and grid_index / rate == until):
            held_rgb = frame_to_rgb(held, size) if held_rgb is None else held_rgb
            status.decode = "keyframes" if held_nearest else "all"
            yield grid_index / rate, held_rgb
            grid_index += 1

    while True:
        try:
            container, stream = open_video(source, timeout)
        except VideoError as exc:
            if not live:
                raise
            back_off(False, exc.reason)
            continue
        with container:
            tb = float(stream.time_base)
            if endless:  # frame threads hold frames back and cost CPU: a live source needs low latency, not more than real time
                stream.thread_type = "SLICE"
            gate = _KeyframeGate(tb, 1 / rate, keyframes)
            if endless:  # a new connection, new pts: its first frame comes as long after the held one as the source was away
                first, shift = None, (held_t + time.monotonic() - held_clock if held is not None else 0.0)
            skip = 0 if endless else frames_read  # a reopened file skips the frames already read
            progress, dropped = False, None
            try:
                for packet in container.demux(stream):
                    for frame, nearest in gate.decode(packet):
                        status.frames_decoded += 1
                        if frame.pts is None:
                            continue
                        if skip:
                            skip -= 1
                            continue
                        frames_read, progress = frames_read + 1, True
                        first = frame.pts if first is None else first
                        t = shift + (frame.pts - first) * tb
                        # timestamps jumped back, or restarted (a keyframe before the frame on screen, which no coded
                        # sequence has): go on from the frame on screen
                        if held is not None and (t < held_t - gap or (frame.key_frame and t < held_t)):
                            shift, t = shift + held_t - t, held_t
                        if held is not None and t > held_t + gap:  # a gap: end the grid at the held frame, restart it at this one
                            yield from show_held(held_t, inclusive=True)
                            grid_index = max(grid_index, math.ceil(t * rate - 1e-6))
                        if held is not None:  # keyframes: the earlier one up to half way to the next
                            yield from show_held((held_t + t) / 2 if nearest else t, inclusive=nearest)
                        held, held_rgb, held_t, held_clock, held_nearest = frame, None, t, time.monotonic(), nearest
                        yield from show_held(t, inclusive=False)  # keyframes: the later one from half way on
                if endless:
                    dropped = "the stream ended"
            except (av.error.FFmpegError, OSError) as exc:
                if not live:
                    raise VideoError(source, f"undecodable after {held_t or 0.0:.2f} s ({_cause(exc)}){_damage(source)}") from None
                dropped = _cause(exc)
            if dropped:
                back_off(progress, f"stream dropped: {dropped}")
                continue
            if held is None:
                what = "no video frames with timestamps" if status.frames_decoded else "no frame decoded"  # (a raw .h264 stream)
                raise VideoError(source, f"undecodable ({what}){_damage(source)}")
            end = held_t
            if gate.keyframes_only:  # the frames after the last keyframe were not decoded: the grid still runs to the last one
                end = max(held_t, shift + (gate.gop_end - first) * tb)
            yield from show_held(end, inclusive=True)
            if not live:
                interval = 1 / float(stream.average_rate) if stream.average_rate else 0.0
                _check_complete(source, container, stream, end + interval, interval)
            return


VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp", ".ogv"}


def list_videos(directory) -> list[Path]:
    """Video files (by extension) under `directory`, recursively and sorted, hidden ones skipped."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in VIDEO_EXTENSIONS]
    return found


def write_video(path, frames, rate: float = 24.0, times=None, codec: str = "libx264", gop: int = 12, rotation: int | None = None) -> Path:
    """Encode uint8 RGB frames (an array [N, H, W, 3] or any iterable of
    [H, W, 3]) to `path`; odd sizes lose their last row/column.

    `times` (seconds, increasing) gives variable-frame-rate timestamps;
    `rotation` stores a display rotation (degrees counter-clockwise). Used by
    the runtime's overlay output, and by tests to make small videos."""
    from fractions import Fraction

    path = Path(path)
    time_base = Fraction(1, 1000)  # for `times`
    with av.open(str(path), "w") as container:
        stream = None
        for i, image in enumerate(frames):
            image = np.asarray(image, dtype=np.uint8)
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(rate).limit_denominator(1001))
                stream.width, stream.height, stream.pix_fmt = image.shape[1] // 2 * 2, image.shape[0] // 2 * 2, "yuv420p"
                stream.codec_context.gop_size = gop
                if times is not None:
                    stream.codec_context.time_base = stream.time_base = time_base
                if rotation:
                    stream.set_display_rotation(rotation)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[: stream.height, : stream.width]), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    return path
