"""Video decoding for the whole toolkit (PyAV only).

Training, the runtime and the benchmarks all read video through this module:

- `read_clip(path, F, size)`: F frames uniformly over the whole video
  (segment-based sampling), shorter side resized to `size`, centre-cropped,
  uint8 RGB. A packet scan (demuxing, no decoding) gives every frame's pts and
  the keyframes; from those the reader counts how many frames keyframe-aware
  seeking would decode and how many one sequential pass would, and takes the
  cheaper. Only the sampled frames are converted to RGB. A source of more
  than MAX_SCAN_FRAMES frames (or a network stream that never ends) is refused.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

DEFAULT_TIMEOUT = 10.0  # seconds a network source may take to open, or to deliver the next packet
GAP_GRID_STEPS, GAP_SECONDS = 3, 2.0  # a jump in time longer than both is a gap (see max_gap)
RESIZE_ASPECT_LIMIT = 4  # frames longer than this times their width (or the reverse) are cropped before resizing
MAX_SCAN_FRAMES = 2_000_000  # video mode's packet scan holds every frame's pts: 9 h at 60 fps, and a stream that never ends stops here

LIVE_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://", "/dev/video")


class VideoError(Exception):
    """A video that cannot be read; str() is "<path>: <reason>"."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [F, size, size, 3], RGB
    times: np.ndarray  # float64 [F], seconds from the first frame's pts
    frames_decoded: int  # decoder output frames it took to get them
    strategy: str  # "seek" or "sequential"
    duration: float  # seconds spanned by the video stream


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
            raise VideoError(source, f"cannot open stream ({_first_line(exc)})") from None
        container_kind = _container_signature(source)
        if container_kind:  # the header says video, yet FFmpeg cannot read it: typically cut short
            raise VideoError(source, f"truncated or corrupt {container_kind} file ({_first_line(exc)})") from None
        raise VideoError(source, f"not a video ({_first_line(exc)})") from None
    # Cover art (an audio file's attached picture) is a one-frame "video" stream: not a video.
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        kinds = {s.type for s in container.streams}
        container.close()
        raise VideoError(source, "no video stream (audio only)" if "audio" in kinds else "no video stream")
    stream = videos[0]
    stream.thread_type = "AUTO"
    return container, stream


def _container_signature(path) -> str | None:
    """'MP4/MOV' or 'Matroska/WebM' when the file starts like one."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] == b"ftyp":
        return "MP4/MOV"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    return None


def _first_line(exc: Exception) -> str:
    if isinstance(exc, av.error.ExitError):  # FFmpeg stopped by PyAV's timeout callback, the only interrupt we set
        return "timed out waiting for data"
    text = (getattr(exc, "strerror", None) or str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
@dataclass
class _Scan:
    frame_pts: list  # every frame's pts, sorted (display order)
    keyframe_pts: list  # keyframes' pts, sorted
    interval: float  # median frame interval, seconds

    @property
    def first(self) -> int:
        return self.frame_pts[0]


def _scan(path, container, stream) -> _Scan:
    """Demux (not decode) the video stream: pts of every frame and keyframe."""
    frame_pts, keyframe_pts = [], []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.pts is None:
                continue
            frame_pts.append(packet.pts)
            if len(frame_pts) > MAX_SCAN_FRAMES:
                raise VideoError(path, f"more than {MAX_SCAN_FRAMES} frames: too long for video mode (use stream mode)")
            if packet.is_keyframe:
                keyframe_pts.append(packet.pts)
    except (av.error.FFmpegError, OSError) as exc:
        if not frame_pts:
            raise VideoError(path, f"undecodable ({_first_line(exc)})") from None
        at = (max(frame_pts) - min(frame_pts)) * stream.time_base
        kind = "stalled" if isinstance(exc, av.error.ExitError) else "truncated or corrupt"
        raise VideoError(path, f"{kind} after {float(at):.2f} s ({_first_line(exc)})") from None
    if not frame_pts:
        declared = declared_duration(container, stream)
        raise VideoError(path, f"truncated: no frame of the declared {declared:.2f} s" if declared else "undecodable (no video frames with timestamps)")
    frame_pts.sort()
    keyframe_pts.sort()
    if not keyframe_pts or keyframe_pts[0] > frame_pts[0]:
        keyframe_pts.insert(0, frame_pts[0])  # decoding starts at the first frame either way
    tb = float(stream.time_base)
    interval = float(np.median(np.diff(frame_pts))) * tb if len(frame_pts) > 1 else 0.0
    if stream.frames and len(frame_pts) < stream.frames:
        raise VideoError(path, f"truncated: {len(frame_pts)} of {stream.frames} frames present")
    _check_complete(path, container, stream, (frame_pts[-1] - frame_pts[0]) * tb + interval, interval)
    return _Scan(frame_pts, keyframe_pts, interval)


def _seek_cost(scan: _Scan, targets: list) -> int:
    """Frames decoded when each target's GOP is reached by seeking to its
    keyframe, decoding on within a GOP (targets sorted)."""
    index = {pts: i for i, pts in enumerate(scan.frame_pts)}
    cost, position, gop = 0, None, None
    for target in targets:
        keyframe = scan.keyframe_pts[bisect.bisect_right(scan.keyframe_pts, target) - 1]
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


def _decode_targets(path, container, stream, targets: list, size: int, out: dict, after_seek: bool) -> int:
    """Decode on from the current position, converting the frames whose pts are
    in `targets` (sorted) into `out`; return frames decoded. Raises _Overshoot
    when, right after a seek, the first frame is already past the first target."""
    decoded, wanted = 0, 0
    try:
        for frame in container.decode(stream):
            decoded += 1
            if frame.pts is None:
                continue
            if after_seek and decoded == 1 and frame.pts > targets[0]:
                raise _Overshoot
            while wanted < len(targets) and frame.pts >= targets[wanted]:
                out[targets[wanted]] = frame_to_rgb(frame, size)
                wanted += 1
            if wanted == len(targets):
                break
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError(path, f"{'stalled' if isinstance(exc, av.error.ExitError) else 'undecodable'} ({_first_line(exc)})") from None
    if wanted < len(targets):
        raise VideoError(path, "undecodable: the decoder returned fewer frames than the file holds")
    return decoded


class _Overshoot(Exception):
    """A seek landed after the frame it was meant to reach."""


def read_clip(path, num_frames: int, size: int, offsets: str = "center", rng: np.random.Generator | None = None,
              strategy: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Clip:
    """F frames uniformly over the whole video (see `segment_times`), each
    resized so the shorter side is `size` and centre-cropped to size x size.
    Videos with fewer frames than F repeat frames. `strategy` "seek" or
    "sequential" forces a decoding plan (the benchmark compares them); "auto"
    takes the one that decodes fewer frames. A network source that takes
    longer than `timeout` seconds to open or to send data raises VideoError."""
    if strategy not in ("auto", "seek", "sequential"):
        raise ValueError(f"strategy must be 'auto', 'seek' or 'sequential', not {strategy!r}")
    if is_endless(path):
        raise VideoError(path, "a live stream has no end to sample up to; use stream mode")
    container, stream = open_video(path, timeout)
    with container:
        scan = _scan(path, container, stream)
        tb = float(stream.time_base)
    duration = (scan.frame_pts[-1] - scan.first) * tb + scan.interval
    times = segment_times(duration, num_frames, offsets, rng)
    # Each sample shows the frame on screen at its time: the last one with pts <= it.
    chosen = [scan.frame_pts[max(bisect.bisect_right(scan.frame_pts, scan.first + t / tb + 1e-9) - 1, 0)] for t in times]
    targets = sorted(set(chosen))
    sequential_cost = scan.frame_pts.index(targets[-1]) + 1
    if strategy == "auto":
        strategy = "seek" if _seek_cost(scan, targets) < sequential_cost else "sequential"
    rgb: dict = {}
    decoded = 0
    if strategy == "seek":
        try:
            container, stream = open_video(path, timeout)
            with container:
                for group in _gop_groups(scan, targets):
                    container.seek(group[0][1], stream=stream, backward=True)
                    decoded += _decode_targets(path, container, stream, [t for t, _ in group], size, rgb, after_seek=True)
        except _Overshoot:  # an imprecise index: fall back to one pass
            strategy, rgb = "sequential", {}
    if strategy == "sequential":
        container, stream = open_video(path, timeout)
        with container:
            decoded += _decode_targets(path, container, stream, targets, size, rgb, after_seek=False)
    frames = np.stack([rgb[pts] for pts in chosen])
    return Clip(frames, np.array([(pts - scan.first) * tb for pts in chosen]), decoded, strategy, duration)


def _gop_groups(scan: _Scan, targets: list) -> list:
    """Targets grouped by GOP: [[(target, keyframe), ...], ...]."""
    groups: list = []
    for target in targets:
        keyframe = scan.keyframe_pts[bisect.bisect_right(scan.keyframe_pts, target) - 1]
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


def iter_grid_frames(source, rate: float, size: int, reconnect: Reconnect | None = None, sleep=time.sleep,
                     timeout: float = DEFAULT_TIMEOUT) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (t, frame) for t = k / rate: the frame on screen at t (the last
    with pts <= t), uint8 [size, size, 3], each decoded frame converted at
    most once. k counts up by one, except after a gap: when the next frame
    comes more than `max_gap(rate)` after the one on screen, k jumps to that
    frame's time (consumers see the gap as a jump of more than one grid step).
    A jump backwards in time continues the grid after the frame on screen.

    A file ends at its last frame (a truncated Matroska file raises VideoError
    after yielding its frames). A live source that fails to open, errors, stalls
    for `timeout` seconds, or (rtsp, rtmp, udp, srt, devices: sources without an
    end) stops is reopened after a back-off (`reconnect`). A reopened http(s)
    file skips the frames already read, so nothing is replayed and times stay
    the file's; a reopened endless source goes on after the wall-clock time it
    was away. Reconnects without progress are counted (see Reconnect); too
    many raise VideoError."""
    reconnect = reconnect or Reconnect()
    live, endless, gap = is_live(source), is_endless(source), max_gap(rate)
    grid_index, failures, run = 0, [], 0  # failures: clock times of reconnects without progress; run: in a row, for the back-off
    held = held_rgb = held_t = held_clock = None  # the frame on screen, its RGB once converted, its time, when it came
    first, last_pts, shift = None, None, 0.0  # shift: seconds added to pts times (backward jumps, endless reconnects)

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
            if endless:  # a new connection, new pts: its first frame comes as long after the held one as the source was away
                first, shift = None, (held_t + time.monotonic() - held_clock if held is not None else 0.0)
            resume_after, progress, dropped = last_pts, False, None  # a reopened file skips frames up to the last one read
            try:
                for frame in container.decode(stream):
                    if frame.pts is None or (not endless and resume_after is not None and frame.pts <= resume_after):
                        continue
                    resume_after, progress = None, True
                    first = frame.pts if first is None else first
                    t = shift + (frame.pts - first) * tb
                    if held is not None and t < held_t - gap:  # timestamps jumped back: go on from the frame on screen
                        shift, t = shift + held_t - t, held_t
                    if held is not None and t > held_t + gap:  # a gap: end the grid at the held frame, restart it at this one
                        yield from show_held(held_t, inclusive=True)
                        grid_index = max(grid_index, math.ceil(t * rate - 1e-6))
                    if held is not None:
                        yield from show_held(t, inclusive=False)
                    held, held_rgb, held_t, held_clock, last_pts = frame, None, t, time.monotonic(), frame.pts
                if endless:
                    dropped = "the stream ended"
            except (av.error.FFmpegError, OSError) as exc:
                if not live:
                    raise VideoError(source, f"undecodable after {held_t or 0.0:.2f} s ({_first_line(exc)})") from None
                dropped = _first_line(exc)
            if dropped:
                back_off(progress, f"stream dropped: {dropped}")
                continue
            if held is None:
                raise VideoError(source, "undecodable (no frame decoded)")
            yield from show_held(held_t, inclusive=True)
            if not live:
                interval = 1 / float(stream.average_rate) if stream.average_rate else 0.0
                _check_complete(source, container, stream, held_t + interval, interval)
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
