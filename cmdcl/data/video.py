"""Video decoding for the whole toolkit (PyAV only).

Training, the runtime and the benchmarks all read video through this module:

- `read_clip(path, F, size)`: F frames uniformly over the whole video
  (segment-based sampling), shorter side resized to `size`, centre-cropped,
  uint8 RGB. A packet scan (demuxing, no decoding) gives every frame's pts and
  the keyframes; from those the reader counts how many frames keyframe-aware
  seeking would decode and how many one sequential pass would, and takes the
  cheaper. Only the sampled frames are converted to RGB.
- `iter_grid_frames(source, rate, size)`: (time, frame) on a fixed time grid
  from a file or a live source (rtsp://, http://, /dev/video*), for the
  streaming runtime; live sources reconnect with exponential back-off.

Times are seconds from the first frame's pts (never from a frame index or the
nominal rate, so variable frame rate is safe), and the display-matrix
rotation is applied. Every way a file can be unreadable raises VideoError
"<path>: <reason>".
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

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
    """Back-off for live sources: `tries` consecutive failures end the stream."""

    tries: int = 5
    initial_delay: float = 0.5
    max_delay: float = 8.0

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
def open_video(source, timeout: float | None = None):
    """Open `source` and return (container, its first video stream); VideoError otherwise."""
    source = str(source)
    if not is_live(source):
        path = Path(source)
        if not path.exists():
            raise VideoError(source, "no such file")
        if path.is_dir():
            raise VideoError(source, "is a directory, not a video")
        if path.stat().st_size == 0:
            raise VideoError(source, "empty file")
    options = {"format": "v4l2"} if source.startswith("/dev/video") else {}
    try:
        container = av.open(source, timeout=timeout, **options)
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
    text = (getattr(exc, "strerror", None) or str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def declared_duration(container, stream) -> float | None:
    """The video stream's duration as the file declares it (seconds), if it does."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")  # Matroska/WebM write it per stream
    if tag:
        h, m, s = tag.split(":")
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
            if packet.is_keyframe:
                keyframe_pts.append(packet.pts)
    except (av.error.FFmpegError, OSError) as exc:
        if not frame_pts:
            raise VideoError(path, f"undecodable ({_first_line(exc)})") from None
        at = (max(frame_pts) - min(frame_pts)) * stream.time_base
        raise VideoError(path, f"truncated or corrupt after {float(at):.2f} s ({_first_line(exc)})") from None
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
    """Shorter side to `size`, display rotation applied, centre crop: uint8 [size, size, 3]."""
    scale = size / min(frame.width, frame.height)
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
        raise VideoError(path, f"undecodable ({_first_line(exc)})") from None
    if wanted < len(targets):
        raise VideoError(path, "undecodable: the decoder returned fewer frames than the file holds")
    return decoded


class _Overshoot(Exception):
    """A seek landed after the frame it was meant to reach."""


def read_clip(path, num_frames: int, size: int, offsets: str = "center", rng: np.random.Generator | None = None,
              strategy: str = "auto") -> Clip:
    """F frames uniformly over the whole video (see `segment_times`), each
    resized so the shorter side is `size` and centre-cropped to size x size.
    Videos with fewer frames than F repeat frames. `strategy` "seek" or
    "sequential" forces a decoding plan (the benchmark compares them); "auto"
    takes the one that decodes fewer frames."""
    if strategy not in ("auto", "seek", "sequential"):
        raise ValueError(f"strategy must be 'auto', 'seek' or 'sequential', not {strategy!r}")
    if is_endless(path):
        raise VideoError(path, "a live stream has no end to sample up to; use stream mode")
    container, stream = open_video(path)
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
            container, stream = open_video(path)
            with container:
                for group in _gop_groups(scan, targets):
                    container.seek(group[0][1], stream=stream, backward=True)
                    decoded += _decode_targets(path, container, stream, [t for t, _ in group], size, rgb, after_seek=True)
        except _Overshoot:  # an imprecise index: fall back to one pass
            strategy, rgb = "sequential", {}
    if strategy == "sequential":
        container, stream = open_video(path)
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
def iter_grid_frames(source, rate: float, size: int, reconnect: Reconnect | None = None, sleep=time.sleep) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (t, frame) for t = k / rate, k = 0, 1, ...: the frame on screen at
    t (the last with pts <= t), uint8 [size, size, 3], each decoded frame
    converted at most once.

    A file ends at its last frame (a truncated Matroska file raises VideoError
    after yielding its frames). A live source that fails to open, errors, or
    (rtsp, rtmp, udp, srt, devices: sources without an end) stops, is reopened
    after a back-off, the grid going on where it stopped; more than
    `reconnect.tries` failures in a row raise VideoError."""
    reconnect = reconnect or Reconnect()
    live = is_live(source)
    endless = is_endless(source)
    grid_index, failures = 0, 0
    while True:
        offset = grid_index / rate  # a reopened live source continues the grid
        try:
            container, stream = open_video(source, timeout=10.0 if live else None)
        except VideoError as exc:
            if not live:
                raise
            failures += 1
            if failures > reconnect.tries:
                raise VideoError(source, f"gave up after {reconnect.tries} reconnects ({exc.reason})") from None
            sleep(reconnect.delay(failures))
            continue
        with container:
            tb = float(stream.time_base)
            first = held = held_rgb = None  # held: the frame on screen; held_rgb: its RGB once converted
            t, dropped = 0.0, None
            try:
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    first = frame.pts if first is None else first
                    t = offset + (frame.pts - first) * tb
                    while held is not None and grid_index / rate < t:
                        held_rgb = frame_to_rgb(held, size) if held_rgb is None else held_rgb
                        yield grid_index / rate, held_rgb
                        grid_index += 1
                    held, held_rgb, failures = frame, None, 0
                if endless:
                    dropped = "the stream ended"
            except (av.error.FFmpegError, OSError) as exc:
                if not live:
                    raise VideoError(source, f"undecodable after {t:.2f} s ({_first_line(exc)})") from None
                dropped = _first_line(exc)
            if dropped:
                failures += 1
                if failures > reconnect.tries:
                    raise VideoError(source, f"stream dropped; gave up after {reconnect.tries} reconnects ({dropped})")
                sleep(reconnect.delay(failures))
                continue
            if held is None:
                raise VideoError(source, "undecodable (no frame decoded)")
            while grid_index / rate <= t:
                held_rgb = frame_to_rgb(held, size) if held_rgb is None else held_rgb
                yield grid_index / rate, held_rgb
                grid_index += 1
            if not live:
                interval = 1 / float(stream.average_rate) if stream.average_rate else 0.0
                _check_complete(source, container, stream, t + interval, interval)
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
