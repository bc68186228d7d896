"""The videos the bench reads: synthetic 720p H.264 (FFmpeg's testsrc2 pattern), generated once into the cache.

Latency does not depend on what the frames show, only on their size, codec and keyframe interval (GOP),
so a test pattern stands in for real footage; --video / --long-video replace it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..data.video import open_video, read_clip
from ..output_files import cache_dir

VIDEO_SIZE, VIDEO_RATE = (1280, 720), 30
BENCH_GOP_SECONDS = 2  # a common keyframe interval
LONG_GOP_SECONDS = 10  # sparse keyframes: seeking has to decode up to 300 frames per target
MAX_VIDEO_SECONDS = 10 * 3600  # a generated video: 1.08 M frames, within video mode's packet scan (MAX_SCAN_FRAMES)


def synthetic_video(seconds: float, gop_seconds: float, log) -> Path:
    """A 720p 30 fps H.264 test pattern (FFmpeg's testsrc2 through PyAV's lavfi input), keyframes every
    `gop_seconds`, cached under the cmdcl cache directory; ValueError when longer than MAX_VIDEO_SECONDS."""
    import av

    if not 0 < seconds <= MAX_VIDEO_SECONDS:
        raise ValueError(f"the bench would generate a {seconds:.0f} s test video; at most {MAX_VIDEO_SECONDS} s (10 h): "
                         "lower --iters, --warmup, --stride-frames or --long-minutes, or give --video / --long-video")
    width, height = VIDEO_SIZE
    seconds = round(seconds, 1)
    path = cache_dir() / "bench" / f"testsrc2-{width}x{height}-{VIDEO_RATE}fps-gop{gop_seconds}s-{seconds:g}s-v2.mp4"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"cmdcl-bench: generating {path.name} (once; cached)")
    tmp = path.with_name(path.name + ".tmp.mp4")
    source = av.open(f"testsrc2=size={width}x{height}:rate={VIDEO_RATE}:duration={seconds:g}", format="lavfi")
    with source, av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=VIDEO_RATE, options={"preset": "ultrafast", "crf": "30"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = int(gop_seconds * VIDEO_RATE)
        for frame in source.decode(video=0):
            frame = frame.reformat(format="yuv420p")
            frame.pict_type = av.video.frame.PictureType.NONE  # lavfi marks every frame I, which would force all-intra
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)
    return path


def bench_video(settings, seconds: float, log) -> Path:
    """--video, or a generated 720p video of `seconds` (what the stages that need it asked for)."""
    if settings.video:
        return Path(settings.video)
    return synthetic_video(seconds, BENCH_GOP_SECONDS, log)


def long_video(settings, log) -> Path:
    """--long-video, or a generated 720p H.264 of --long-minutes with a keyframe every LONG_GOP_SECONDS."""
    return Path(settings.long_video) if settings.long_video else synthetic_video(settings.long_minutes * 60, LONG_GOP_SECONDS, log)


def first_frames(video: Path, count: int) -> list:
    """The first `count` decoded frames (PyAV frames, native size), repeated if the video is shorter."""
    container, stream = open_video(video)
    with container:
        frames = []
        for frame in container.decode(stream):
            frames.append(frame)
            if len(frames) == count:
                break
    return [frames[i % len(frames)] for i in range(count)]


@functools.cache
def video_label(path: Path) -> str:
    """'name 1280x720 h264': the video a record was measured on, for its note (read once per run)."""
    container, stream = open_video(path)
    with container:
        return f"{Path(path).name} {stream.codec_context.width}x{stream.codec_context.height} {stream.codec_context.name}"


@functools.cache
def clip_duration(path: Path, num_frames: int, image_size: int) -> float:
    """The seconds `read_clip` spans in the bench video: decoded once per run, not once per backend and batch."""
    return read_clip(path, num_frames, image_size).duration
